//! The job input schema of worker-comfyui: `workflow`, `images: [{name, image}]`,
//! `comfy_org_api_key`, with the same validation messages, plus checks it lacks
//! (workflow shape, image names that could escape ComfyUI's input folder, bad base64), and
//! extensions it lacks:
//! * `image` may be an `http(s)://` URL, downloaded through the SSRF guard of [`crate::ssrf`] within
//!   [`InputPolicy`]'s limits, or an `s3://bucket/key` read from the job's bucket within the same
//!   size limit (see [`Fetcher::fetch_s3`]);
//! * an item may carry `subfolder`, `type` (`input`, `temp`, `output`) and `kind: "mask"` with an
//!   `original_ref` (uploaded to `/upload/mask`); any file (video, audio) may be sent;
//! * the list may be called `files` instead of `images`.
//!
//! [`parse_input`] validates without touching the network; [`Fetcher::fetch_all`] then downloads
//! every URL input (a few at a time) before anything is uploaded, so a bad URL fails the job
//! before ComfyUI sees any of it.

use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::codec;
use super::failure::{JobFailure, Report};
use super::storage::JobStorage;
use crate::comfy::Upload;
use crate::comfy::{FileRef, WorkflowInput};
use crate::config::InputPolicy;
use crate::json_type::json_type;
use crate::media_type::{extension_for, media_type_for_name, sniff_media_type};
use crate::redact::display_url;
use crate::secret::Secret;
use crate::ssrf::{Downloader, FetchError, Guard, Limits};

/// Redirects followed for one URL input.
pub const MAX_REDIRECTS: usize = 5;
/// URL inputs downloaded at once.
pub const DOWNLOAD_CONCURRENCY: usize = 4;
/// How to ask for a refused URL anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_INPUT_URLS=true to allow it)";

/// A validated job input.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// The workflow: API format, or a UI-format export the engine converts with `/object_info`.
    pub workflow: WorkflowInput,
    /// Files to upload before queueing (`images`, or its alias `files`), in order.
    pub files: Vec<InputFile>,
    /// Per-job Comfy.org API key (wins over `COMFY_ORG_API_KEY`).
    pub comfy_org_api_key: Option<Secret>,
}

/// One input file, validated; its bytes may still have to be downloaded.
#[derive(Debug, Clone, PartialEq)]
pub struct InputFile {
    /// File name in ComfyUI's folder (checked, or derived from the URL and made safe).
    pub name: String,
    /// Whether `name` was derived from the URL (then the file type's extension is added after
    /// the download when it has none).
    pub name_derived: bool,
    /// Where the bytes come from.
    pub source: Source,
    /// Subfolder ("" = the folder's root), checked and normalised.
    pub subfolder: String,
    /// `input` (default), `temp` or `output`.
    pub folder_type: String,
    /// For a mask (`kind: "mask"`): the image it applies to, uploaded to `/upload/mask`.
    pub original_ref: Option<FileRef>,
}

/// Where an input file's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Base64 in the job (decoded), with the media type of its `data:` URI if any.
    Inline {
        /// The bytes.
        data: Bytes,
        /// The `data:` URI's media type.
        media_type: Option<String>,
    },
    /// An `http(s)://` URL.
    Url(String),
    /// An `s3://bucket/key` object.
    S3 {
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
    },
}

impl Source {
    /// Where the bytes come from, for messages (a URL without its query).
    fn describe(&self) -> String {
        match self {
            Source::Inline { .. } => "the job".into(),
            Source::Url(url) => display_url(url),
            Source::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }
}

fn bad_input(message: impl Into<String>) -> JobFailure {
    JobFailure::BadInput(Report::new(message))
}

fn bad_input_with_details(message: impl Into<String>, details: Vec<String>) -> JobFailure {
    JobFailure::BadInput(Report::with_details(message, details))
}

fn shape_error(key: &str) -> JobFailure {
    bad_input(format!(
        "'{key}' must be a list of objects with 'name' and 'image' keys"
    ))
}

#[cfg(test)]
const IMAGES_SHAPE: &str = "'images' must be a list of objects with 'name' and 'image' keys";

/// Folds characters that look like `.`, `/`, `\` or `:` (fullwidth forms, dot leaders, division
/// and fraction slashes, ...) into the ASCII character they imitate, so the name checks see what
/// a normalising file system, a Windows "best fit" code page or a person would. `‥` and `…`
/// become two and three dots.
fn fold_lookalikes(s: &str) -> std::borrow::Cow<'_, str> {
    let lookalike = |c: char| {
        matches!(
            c,
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' | '\u{2025}' | '\u{2026}' // dots
                | '\u{FF0F}' | '\u{2215}' | '\u{2044}' | '\u{29F8}' | '\u{1735}' // slashes
                | '\u{FF3C}' | '\u{2216}' | '\u{FE68}' | '\u{29F9}' | '\u{29F5}' // backslashes
                | '\u{FF1A}' | '\u{A789}' | '\u{2236}' | '\u{FE55}' // colons
        )
    };
    if !s.chars().any(lookalike) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => out.push('.'),
            '\u{2025}' => out.push_str(".."),
            '\u{2026}' => out.push_str("..."),
            '\u{FF0F}' | '\u{2215}' | '\u{2044}' | '\u{29F8}' | '\u{1735}' => out.push('/'),
            '\u{FF3C}' | '\u{2216}' | '\u{FE68}' | '\u{29F9}' | '\u{29F5}' => out.push('\\'),
            '\u{FF1A}' | '\u{A789}' | '\u{2236}' | '\u{FE55}' => out.push(':'),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Checks a file name for ComfyUI's input folder; returns why it is refused.
///
/// An accepted name is one plain path segment on every platform ComfyUI runs on: not empty,
/// not `.` or `..` and without `..` anywhere, not only dots and spaces (Windows trims trailing
/// dots and spaces), no `/`, `\` or `:` (a drive or stream on Windows), no control characters
/// (NUL included), at most 255 bytes, and none of that through look-alike characters (`．．`,
/// `／`, `＼`, `‥`).
pub fn check_image_name(name: &str) -> Result<(), String> {
    let folded = fold_lookalikes(name);
    let lookalike = matches!(folded, std::borrow::Cow::Owned(_));
    let n: &str = &folded;
    let why = if name.trim().is_empty() {
        Some("it is empty")
    } else if n.contains('/') || n.contains('\\') {
        Some(if lookalike {
            "it contains a character that looks like a path separator"
        } else {
            "it contains a path separator ('/' or '\\')"
        })
    } else if n == "." || n.contains("..") {
        Some(if lookalike {
            "it contains characters that look like '..'"
        } else {
            "it contains '..'"
        })
    } else if n
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .is_empty()
    {
        Some("it is only dots and spaces")
    } else if n.contains(':') {
        Some("it contains ':' (a drive or stream separator on Windows)")
    } else if name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "Invalid image name {:?}: {why}; use a plain file name such as \"input.png\"",
            truncate_chars(name, 80)
        )),
        None => Ok(()),
    }
}

/// Checks a `subfolder`: relative, no `..`, no `\`, no `:`, no control characters, no look-alikes
/// of those, each folder a valid name. Returns it normalised (empty and `.` segments dropped, so
/// `a//b/` is `a/b`), or why it is refused.
pub fn check_subfolder(subfolder: &str) -> Result<String, String> {
    let s = subfolder.trim();
    let folded = fold_lookalikes(s);
    let lookalike = matches!(folded, std::borrow::Cow::Owned(_));
    let f: &str = &folded;
    let why = if s.starts_with('/') {
        Some("it starts with '/' (it must be relative)")
    } else if s.contains('\\') {
        Some("it contains '\\' (separate folders with '/')")
    } else if s.contains("..") {
        Some("it contains '..'")
    } else if lookalike && (f.contains('/') || f.contains('\\') || f.contains("..")) {
        Some("it contains characters that look like '/', '\\' or '..'")
    } else if f.contains(':') {
        Some("it contains ':' (a drive or stream separator on Windows)")
    } else if s.chars().any(char::is_control) {
        Some("it contains control characters")
    } else if s.len() > 255 {
        Some("it is longer than 255 bytes")
    } else if s.split('/').any(|seg| {
        seg != "."
            && !seg.is_empty()
            && seg
                .trim_matches(|c: char| c == '.' || c.is_whitespace())
                .is_empty()
    }) {
        Some("a folder name is only dots and spaces")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "Invalid subfolder {:?}: {why}; use a relative folder such as \"uploads/job-1\"",
            truncate_chars(subfolder, 80)
        )),
        // Trimmed again: `a /` must give what `a` gives (and what `a` normalises to), so
        // normalising twice changes nothing.
        None => Ok(s
            .split('/')
            .filter(|seg| !seg.is_empty() && *seg != ".")
            .collect::<Vec<_>>()
            .join("/")
            .trim()
            .to_owned()),
    }
}

/// A safe ASCII file name from an untrusted one (a URL's last path segment, percent-decoded):
/// only letters, digits, `.`, `-` and `_`; anything else becomes `_`; no `..`, no leading dot;
/// at most 100 bytes (the extension kept); `input` when nothing is left.
pub fn sanitize_file_name(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        match c {
            c if c.is_ascii_alphanumeric() || c == '-' => out.push(c),
            '.' => {
                while out.ends_with('_') {
                    out.pop();
                }
                if !out.ends_with('.') {
                    out.push('.');
                }
            }
            _ => {
                if !out.ends_with('_') {
                    out.push('_');
                }
            }
        }
    }
    let trimmed = out
        .trim_start_matches(['.', '_', '-'])
        .trim_end_matches(['.', '_']);
    let mut name = trimmed.to_owned();
    const MAX: usize = 100;
    if name.len() > MAX {
        // ASCII only, so byte positions are character positions.
        let ext = match name.rfind('.') {
            Some(i) if name.len() - i <= 10 => name[i..].to_owned(),
            _ => String::new(),
        };
        let stem: String = name[..MAX - ext.len()]
            .trim_end_matches(['.', '_'])
            .to_owned();
        name = stem + &ext;
    }
    if name.is_empty() || name.starts_with('.') {
        format!("input{name}")
    } else {
        name
    }
}

/// Percent-decodes a URL path segment (invalid UTF-8 is replaced).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name for a URL input without one: its path's last segment, made safe.
pub fn name_from_url(url: &str) -> String {
    let last = url::Url::parse(url.trim())
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut segs| segs.next_back().map(str::to_owned))
        })
        .unwrap_or_default();
    sanitize_file_name(&percent_decode(&last))
}

/// A media type without parameters, lower-cased, with common aliases folded.
fn canonical_media_type(media_type: &str) -> String {
    let base = media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg".into(),
        "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => "audio/wav".into(),
        "audio/mp3" | "audio/x-mp3" => "audio/mpeg".into(),
        "audio/x-flac" => "audio/flac".into(),
        "video/x-matroska" => "video/webm".into(),
        "image/x-ms-bmp" => "image/bmp".into(),
        _ => base,
    }
}

/// The media type of a `data:` URI (`data:image/png;base64,…` gives `image/png`).
fn data_uri_media_type(text: &str) -> Option<String> {
    let rest = text.trim_start();
    let rest = rest
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("data:"))
        .map(|_| &rest[5..])?;
    let (meta, _) = rest.split_once(',')?;
    let media = meta.split(';').next().unwrap_or("").trim();
    (!media.is_empty()).then(|| media.to_owned())
}

/// The upload's media type: from the name's extension, else the bytes, else what was declared.
fn media_type_of(name: &str, data: &[u8], declared: Option<&str>) -> String {
    media_type_for_name(name)
        .or_else(|| sniff_media_type(data))
        .map(str::to_owned)
        .or_else(|| declared.map(canonical_media_type))
        .unwrap_or_else(|| "application/octet-stream".into())
}

/// Logs (at debug) a declared media type that the bytes contradict; such inputs are accepted.
fn note_mismatch(name: &str, declared: Option<&str>, data: &[u8], what: &str) {
    if let (Some(declared), Some(sniffed)) = (declared, sniff_media_type(data)) {
        let declared = canonical_media_type(declared);
        if declared != sniffed && declared != "application/octet-stream" {
            debug!(name, declared = %declared, detected = sniffed, "{what} does not match the bytes; using the bytes");
        }
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// What an item's `image` holds.
enum Content<'a> {
    /// Base64, maybe a `data:` URI.
    Inline(&'a str),
    /// `http(s)://`.
    Url(&'a str),
    /// `s3://`.
    S3(&'a str),
    /// Another `scheme://`.
    Unsupported(String),
}

fn classify(text: &str) -> Content<'_> {
    let t = text.trim();
    if let Some((scheme, _)) = t.split_once("://") {
        let valid = scheme.len() <= 32
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if valid {
            return match scheme.to_ascii_lowercase().as_str() {
                "http" | "https" => Content::Url(t),
                "s3" => Content::S3(t),
                other => Content::Unsupported(other.to_owned()),
            };
        }
    }
    Content::Inline(text)
}

/// One list item, before its fields are checked.
struct RawItem<'a> {
    obj: &'a Map<String, Value>,
    name: Option<&'a str>,
    image: &'a str,
}

/// Parses and validates `job["input"]`.
pub fn parse_input(input: Option<&Value>) -> Result<JobInput, JobFailure> {
    let parsed;
    let input = match input {
        None | Some(Value::Null) => return Err(bad_input("Please provide input")),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|_| bad_input("Invalid JSON format in input"))?;
            &parsed
        }
        Some(v) => v,
    };
    let obj = match input {
        Value::Object(o) => o,
        Value::Null => return Err(bad_input("Please provide input")),
        other => {
            return Err(bad_input(format!(
                "Invalid input: 'input' must be a JSON object with a 'workflow' key, got {}",
                json_type(other)
            )))
        }
    };
    let workflow = match obj.get("workflow") {
        None | Some(Value::Null) => return Err(bad_input("Missing 'workflow' parameter")),
        Some(w) => w.clone(),
    };
    let present = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if present("images") && present("files") {
        return Err(bad_input(
            "Use either 'images' or 'files' for the input files, not both",
        ));
    }
    let key = if present("files") { "files" } else { "images" };
    let raw_items: Vec<RawItem> = match obj.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|item| {
                let Some(o) = item.as_object() else {
                    return Err(shape_error(key));
                };
                let name = match o.get("name") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(n)) => Some(n.as_str()),
                    Some(_) => return Err(shape_error(key)),
                };
                let Some(image) = o.get("image").and_then(Value::as_str) else {
                    return Err(shape_error(key));
                };
                // Only a URL may leave the name out: it is then derived from the URL.
                if name.is_none() && matches!(classify(image), Content::Inline(_)) {
                    return Err(shape_error(key));
                }
                Ok(RawItem {
                    obj: o,
                    name,
                    image,
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(shape_error(key)),
    };
    let comfy_org_api_key = match obj.get("comfy_org_api_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(Secret::new(s.trim())),
        Some(other) => {
            return Err(bad_input(format!(
                "'comfy_org_api_key' must be a string, got {}",
                json_type(other)
            )))
        }
    };
    let workflow =
        WorkflowInput::from_value(workflow).map_err(|e| bad_input(capitalise(&e.to_string())))?;
    let mut files = Vec::with_capacity(raw_items.len());
    let mut problems = Vec::new();
    for item in &raw_items {
        let content = classify(item.image);
        let (name, name_derived) = match (item.name, &content) {
            (Some(n), _) => {
                check_image_name(n).map_err(bad_input)?;
                (n.to_owned(), false)
            }
            (None, Content::Url(u)) => (name_from_url(u), true),
            (None, Content::S3(u)) => (name_from_url(u), true),
            (None, _) => return Err(shape_error(key)),
        };
        let fields = item_fields(item.obj, &name)?;
        let source = match content {
            Content::Inline(text) => match codec::decode_input(text) {
                Ok(data) if data.is_empty() => {
                    problems.push(format!(
                        "Error decoding base64 for {name}: the image is empty"
                    ));
                    continue;
                }
                Ok(data) => {
                    let media_type = data_uri_media_type(text);
                    note_mismatch(
                        &name,
                        media_type.as_deref(),
                        &data,
                        "the data URI's media type",
                    );
                    Source::Inline {
                        data: Bytes::from(data),
                        media_type,
                    }
                }
                Err(e) => {
                    problems.push(format!("Error decoding base64 for {name}: {e}"));
                    continue;
                }
            },
            Content::Url(url) => Source::Url(url.to_owned()),
            Content::S3(url) => match parse_s3(url) {
                Some((bucket, key)) => Source::S3 { bucket, key },
                None => {
                    problems.push(format!(
                        "Error downloading {name} from {}: an s3:// URL needs a bucket and a key (s3://bucket/key)",
                        display_url(url)
                    ));
                    continue;
                }
            },
            Content::Unsupported(scheme) => {
                problems.push(format!(
                    "Error downloading {name} from {}: the scheme {scheme:?} is not supported (use base64, a data: URI, http, https or s3)",
                    display_url(item.image)
                ));
                continue;
            }
        };
        files.push(InputFile {
            name,
            name_derived,
            source,
            subfolder: fields.subfolder,
            folder_type: fields.folder_type,
            original_ref: fields.original_ref,
        });
    }
    if !problems.is_empty() {
        return Err(bad_input_with_details(
            "Failed to upload one or more input images",
            problems,
        ));
    }
    Ok(JobInput {
        workflow,
        files,
        comfy_org_api_key,
    })
}

/// An item's optional fields, checked.
struct ItemFields {
    subfolder: String,
    folder_type: String,
    original_ref: Option<FileRef>,
}

fn item_fields(obj: &Map<String, Value>, name: &str) -> Result<ItemFields, JobFailure> {
    let text = |field: &str| -> Result<Option<&str>, JobFailure> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(bad_input(format!(
                "'{field}' of {name} must be a string, got {}",
                json_type(other)
            ))),
        }
    };
    let subfolder = match text("subfolder")? {
        None => String::new(),
        Some(s) => check_subfolder(s).map_err(|e| bad_input(format!("{e} (for {name})")))?,
    };
    let folder_type = check_folder_type(text("type")?, name)?;
    let is_mask = match text("kind")? {
        None => false,
        Some(k) => match k.trim().to_ascii_lowercase().as_str() {
            "" | "image" | "file" => false,
            "mask" => true,
            _ => {
                return Err(bad_input(format!(
                    "Invalid kind {:?} for {name}: use \"mask\" (uploaded to /upload/mask), or leave it out",
                    truncate_chars(k, 40)
                )))
            }
        },
    };
    let original_ref = match obj.get("original_ref") {
        None | Some(Value::Null) => None,
        Some(_) if !is_mask => {
            return Err(bad_input(format!(
                "'original_ref' of {name} only applies to kind \"mask\""
            )))
        }
        Some(Value::String(filename)) => Some(original_ref(filename, None, None, name)?),
        Some(Value::Object(o)) => {
            let field = |k: &str| match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(bad_input(format!(
                    "'original_ref.{k}' of {name} must be a string"
                ))),
            };
            let Some(filename) = field("filename")? else {
                return Err(bad_input(format!(
                    "'original_ref' of {name} needs a 'filename'"
                )));
            };
            Some(original_ref(
                filename,
                field("subfolder")?,
                field("type")?,
                name,
            )?)
        }
        Some(other) => {
            return Err(bad_input(format!(
                "'original_ref' of {name} must be an object {{\"filename\", \"subfolder\", \"type\"}} or a file name, got {}",
                json_type(other)
            )))
        }
    };
    if is_mask && original_ref.is_none() {
        return Err(bad_input(format!(
            "The mask {name} needs an 'original_ref': the image it applies to, e.g. {{\"filename\": \"photo.png\"}}"
        )));
    }
    Ok(ItemFields {
        subfolder,
        folder_type,
        original_ref,
    })
}

fn check_folder_type(folder_type: Option<&str>, name: &str) -> Result<String, JobFailure> {
    match folder_type.map(str::trim) {
        None | Some("") => Ok("input".into()),
        Some(t @ ("input" | "temp" | "output")) => Ok(t.to_owned()),
        Some(other) => Err(bad_input(format!(
            "Invalid type {:?} for {name}: use \"input\" (the default), \"temp\" or \"output\"",
            truncate_chars(other, 40)
        ))),
    }
}

fn original_ref(
    filename: &str,
    subfolder: Option<&str>,
    folder_type: Option<&str>,
    name: &str,
) -> Result<FileRef, JobFailure> {
    check_image_name(filename)
        .map_err(|e| bad_input(format!("{e} (in 'original_ref' of {name})")))?;
    let subfolder = check_subfolder(subfolder.unwrap_or(""))
        .map_err(|e| bad_input(format!("{e} (in 'original_ref' of {name})")))?;
    Ok(FileRef {
        filename: filename.to_owned(),
        subfolder,
        folder_type: check_folder_type(folder_type, name)?,
    })
}

/// `s3://bucket/key` → (bucket, key).
fn parse_s3(url: &str) -> Option<(String, String)> {
    let rest = url.trim().split_once("://")?.1;
    let (bucket, key) = rest.split_once('/')?;
    let key = key.split(['?', '#']).next().unwrap_or("");
    (!bucket.is_empty() && !key.is_empty()).then(|| (bucket.to_owned(), key.to_owned()))
}

pub(crate) fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() => c.to_ascii_uppercase().to_string() + chars.as_str(),
        _ => s.to_owned(),
    }
}

/// Gets the bytes of input files: decoded ones as they are, URL inputs downloaded through the
/// SSRF guard within the [`InputPolicy`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Fetcher {
    downloader: Downloader,
    policy: InputPolicy,
}

impl Fetcher {
    /// A fetcher under `policy`.
    pub fn new(policy: &InputPolicy) -> Fetcher {
        let guard = Guard::new(policy.allow_private, policy.timeout)
            .with_allowed_hosts(&policy.allowed_hosts);
        let limits = Limits {
            max_bytes: policy.max_bytes,
            timeout: policy.timeout,
            max_redirects: MAX_REDIRECTS,
        };
        Fetcher {
            downloader: Downloader::new(guard, limits, "input URL host"),
            policy: policy.clone(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &InputPolicy {
        &self.policy
    }

    /// Every file's bytes, ready to upload in order: URL inputs are downloaded and `s3://`
    /// inputs read from the job's bucket (`storage`) [`DOWNLOAD_CONCURRENCY`] at a time. Any
    /// failure fails the whole list (each one named under `Failed to upload one or more input
    /// images`), so nothing is uploaded.
    pub async fn fetch_all(
        &self,
        files: &[InputFile],
        storage: &JobStorage,
        cancel: &CancellationToken,
    ) -> Result<Vec<Upload>, JobFailure> {
        // Owned futures: borrowed ones trip the compiler's `Send` inference for spawned callers.
        let all = futures_util::stream::iter(files.to_vec())
            .map(|file| {
                let this = self.clone();
                let storage = storage.clone();
                async move { this.fetch_one(&file, &storage).await }
            })
            .buffered(DOWNLOAD_CONCURRENCY)
            .collect::<Vec<_>>();
        let results = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return Err(JobFailure::Cancelled(Report::new("Job cancelled while downloading input files")))
            }
            results = all => results,
        };
        let mut uploads = Vec::with_capacity(results.len());
        let mut problems = Vec::new();
        for r in results {
            match r {
                Ok(upload) => uploads.push(upload),
                Err(problem) => problems.push(problem),
            }
        }
        if problems.is_empty() {
            Ok(uploads)
        } else {
            Err(JobFailure::InputFiles(Report::with_details(
                "Failed to upload one or more input images",
                problems,
            )))
        }
    }

    async fn fetch_one(&self, file: &InputFile, storage: &JobStorage) -> Result<Upload, String> {
        let (data, declared) = match &file.source {
            Source::Inline { data, media_type } => (data.clone(), media_type.clone()),
            Source::Url(url) => {
                let started = Instant::now();
                let fetched = self.downloader.get(url).await.map_err(|e| {
                    format!(
                        "Error downloading {} from {}: {}",
                        file.name,
                        file.source.describe(),
                        self.describe(e)
                    )
                })?;
                info!(
                    name = %file.name,
                    url = %file.source.describe(),
                    bytes = fetched.data.len(),
                    redirects = fetched.redirects,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "input downloaded"
                );
                note_mismatch(
                    &file.name,
                    fetched.content_type.as_deref(),
                    &fetched.data,
                    "the server's Content-Type",
                );
                (fetched.data, fetched.content_type)
            }
            Source::S3 { bucket, key } => {
                let started = Instant::now();
                let data = self.fetch_s3(bucket, key, storage).await.map_err(|e| {
                    format!(
                        "Error downloading {} from {}: {e}",
                        file.name,
                        file.source.describe()
                    )
                })?;
                info!(
                    name = %file.name,
                    url = %file.source.describe(),
                    bytes = data.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "input read from the bucket"
                );
                (data, None)
            }
        };
        if data.is_empty() {
            return Err(format!(
                "Error downloading {} from {}: the file is empty",
                file.name,
                file.source.describe()
            ));
        }
        let mut name = file.name.clone();
        if file.name_derived && !name.contains('.') {
            if let Some(ext) = sniff_media_type(&data).and_then(extension_for) {
                name = format!("{name}.{ext}");
            }
        }
        let content_type = media_type_of(&name, &data, declared.as_deref());
        Ok(Upload {
            name,
            data,
            subfolder: file.subfolder.clone(),
            folder_type: file.folder_type.clone(),
            content_type: Some(content_type),
            original_ref: file.original_ref.clone(),
        })
    }

    /// The bytes of `s3://bucket/key`, read from the job's bucket (its `s3Config`, else the
    /// worker's `BUCKET_*`) when `bucket` is that bucket, within `INPUT_URL_MAX_BYTES` and
    /// `INPUT_URL_TIMEOUT_S` (see [`JobStorage::read`]).
    pub async fn fetch_s3(
        &self,
        bucket: &str,
        key: &str,
        storage: &JobStorage,
    ) -> Result<Bytes, String> {
        let read = storage.read(bucket, key, self.policy.max_bytes);
        match tokio::time::timeout(self.policy.timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "timed out after {} s (INPUT_URL_TIMEOUT_S)",
                self.policy.timeout.as_secs_f64()
            )),
        }
    }

    /// A download failure, in words.
    fn describe(&self, e: FetchError) -> String {
        let max = self.policy.max_bytes;
        match e {
            FetchError::Invalid {
                redirect: None,
                reason,
            } => format!("invalid URL: {reason}"),
            FetchError::Invalid {
                redirect: Some(to),
                reason,
            } => format!("invalid redirect to {to}: {reason}"),
            FetchError::Refused {
                redirect: None,
                reason,
            } => format!("refused: {reason} {ALLOW_HINT}"),
            FetchError::Refused {
                redirect: Some(to),
                reason,
            } => format!("redirect to {to} refused: {reason} {ALLOW_HINT}"),
            FetchError::TooLarge {
                announced: Some(len),
            } => format!(
                "the server announces {len} bytes, larger than INPUT_URL_MAX_BYTES ({max} bytes)"
            ),
            FetchError::TooLarge { announced: None } => {
                format!("the file is larger than INPUT_URL_MAX_BYTES ({max} bytes)")
            }
            FetchError::TimedOut => format!(
                "timed out after {} s (INPUT_URL_TIMEOUT_S)",
                self.policy.timeout.as_secs_f64()
            ),
            FetchError::TooManyRedirects => format!("more than {MAX_REDIRECTS} redirects"),
            FetchError::Status(status) => format!("the server answered {status}"),
            FetchError::Transport(e) => e,
        }
    }
}

#[cfg(test)]
mod name_props;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobOutput;
    use serde_json::json;

    fn err(input: Option<Value>) -> Value {
        match parse_input(input.as_ref()) {
            Ok(_) => panic!("accepted {input:?}"),
            Err(out) => JobOutput::from(out).to_json(),
        }
    }

    const WF: &str = r#"{"1": {"class_type": "EmptyImage", "inputs": {}}}"#;

    #[test]
    fn worker_comfyui_messages() {
        assert_eq!(err(None), json!({"error": "Please provide input"}));
        assert_eq!(
            err(Some(Value::Null)),
            json!({"error": "Please provide input"})
        );
        assert_eq!(
            err(Some(json!("{not json"))),
            json!({"error": "Invalid JSON format in input"})
        );
        assert_eq!(
            err(Some(json!({}))),
            json!({"error": "Missing 'workflow' parameter"})
        );
        assert_eq!(
            err(Some(json!({"workflow": null}))),
            json!({"error": "Missing 'workflow' parameter"})
        );
        let wf: Value = serde_json::from_str(WF).unwrap();
        for images in [
            json!("x"),
            json!([1]),
            json!([{"name": "a.png"}]),
            json!([{"name": 1, "image": "aGk="}]),
        ] {
            assert_eq!(
                err(Some(json!({"workflow": wf, "images": images}))),
                json!({"error": IMAGES_SHAPE})
            );
        }
    }

    #[test]
    fn string_input_is_parsed() {
        let input = json!(format!("{{\"workflow\": {WF}}}"));
        assert!(parse_input(Some(&input)).is_ok());
    }

    #[test]
    fn clear_errors_for_what_worker_comfyui_lets_through() {
        let e = err(Some(json!({"workflow": "text"})));
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{e}"
        );
        let e = err(Some(json!({"workflow": {"nodes": [], "links": []}})));
        assert_eq!(
            e["error"],
            "Cannot convert the UI-format workflow to API format: the workflow has no nodes",
            "{e}"
        );
        let e = err(Some(json!([1, 2])));
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{e}"
        );
        let wf: Value = serde_json::from_str(WF).unwrap();
        for name in ["../x.png", "a/b.png", "..", "", "a\\b.png", "x\u{0}.png"] {
            let e = err(Some(
                json!({"workflow": wf, "images": [{"name": name, "image": "aGk="}]}),
            ));
            assert!(
                e["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("Invalid image name"),
                "{name}: {e}"
            );
        }
        let e = err(Some(
            json!({"workflow": wf, "images": [{"name": "a.png", "image": "!!!"}, {"name": "b.png", "image": ""}]}),
        ));
        assert_eq!(e["error"], "Failed to upload one or more input images");
        let details = e["details"].as_array().unwrap();
        assert!(details[0]
            .as_str()
            .unwrap()
            .starts_with("Error decoding base64 for a.png"));
        assert!(details[1].as_str().unwrap().contains("b.png"));
        let e = err(Some(json!({"workflow": wf, "comfy_org_api_key": 5})));
        assert!(e["error"].as_str().unwrap().contains("comfy_org_api_key"));
    }

    #[test]
    fn accepts_data_uris_and_keeps_the_key_secret() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let input = json!({"workflow": wf, "images": [{"name": "in.png", "image": "data:image/png;base64,aGk="}], "comfy_org_api_key": "k-123"});
        let parsed = parse_input(Some(&input)).unwrap();
        assert!(
            matches!(&parsed.files[0].source, Source::Inline { data, media_type } if &data[..] == b"hi" && media_type.as_deref() == Some("image/png"))
        );
        assert!(!format!("{parsed:?}").contains("k-123"));
    }

    #[test]
    fn names_from_urls_are_made_safe() {
        for (raw, safe) in [
            ("photo.png", "photo.png"),
            ("My Photo (1).PNG", "My_Photo_1.PNG"),
            ("../../etc/passwd", "etc_passwd"),
            ("..", "input"),
            ("", "input"),
            (".hidden.png", "hidden.png"),
            ("a..b.png", "a.b.png"),
            ("a._.b", "a.b"),
            ("ünïcödé.jpg", "n_c_d.jpg"),
            ("x\u{0}y\n.png", "x_y.png"),
            ("-rf.png", "rf.png"),
            ("a\\b.png", "a_b.png"),
            ("___", "input"),
            (".png", "png"),
        ] {
            let name = sanitize_file_name(raw);
            assert_eq!(name, safe, "{raw:?}");
            assert!(check_image_name(&name).is_ok(), "{raw:?} -> {name:?}");
        }
        let long = format!("{}.webp", "a".repeat(300));
        let name = sanitize_file_name(&long);
        assert_eq!(name.len(), 100);
        assert!(name.ends_with("a.webp"), "{name}");
        let long_ext = format!("b.{}", "c".repeat(300));
        assert_eq!(sanitize_file_name(&long_ext).len(), 100);
        for (url, name) in [
            ("https://example.com/img/cat.png?sig=abc#x", "cat.png"),
            ("https://example.com/img/My%20Cat%2B1.png", "My_Cat_1.png"),
            ("https://example.com/a/%2e%2e%2fsecret", "secret"),
            ("https://example.com/", "input"),
            ("https://example.com", "input"),
            ("https://example.com/512", "512"),
            ("s3://bucket/dir/clip.mp4", "clip.mp4"),
            ("https://example.com/%ff%fe.png", "png"),
        ] {
            assert_eq!(name_from_url(url), name, "{url}");
        }
    }

    #[test]
    fn subfolders_are_relative_and_stay_inside() {
        for (raw, normal) in [
            ("", ""),
            ("uploads", "uploads"),
            ("uploads/job-1/", "uploads/job-1"),
            ("a//b/./c", "a/b/c"),
            (" x ", "x"),
        ] {
            assert_eq!(check_subfolder(raw).as_deref(), Ok(normal), "{raw:?}");
        }
        for (raw, why) in [
            ("/etc", "it starts with '/'"),
            ("..", "it contains '..'"),
            ("a/../../b", "it contains '..'"),
            ("a\\b", "it contains '\\'"),
            ("a\u{7}b", "control characters"),
        ] {
            let err = check_subfolder(raw).unwrap_err();
            assert!(err.starts_with("Invalid subfolder"), "{err}");
            assert!(err.contains(why), "{raw:?}: {err}");
        }
        assert!(check_subfolder(&"a/".repeat(200)).is_err());
    }

    /// Found by the `job_input_json` fuzz target (fuzz/regressions/job_input_json/): a folder
    /// with trailing spaces before a `/` normalised to a form that normalised differently again.
    #[test]
    fn fuzz_regression_subfolder_normalisation_is_idempotent() {
        for raw in ["KSampler% /", "a /", "a / ", "x/y  /", " a/b /"] {
            let once = check_subfolder(raw).unwrap();
            assert_eq!(
                check_subfolder(&once).as_deref(),
                Ok(once.as_str()),
                "{raw:?}"
            );
        }
        assert_eq!(check_subfolder("KSampler% /").as_deref(), Ok("KSampler%"));
        let wf: Value = serde_json::from_str(WF).unwrap();
        let input = json!({"workflow": wf,
            "images": [{"name": "x.png", "image": "aGk=", "subfolder": "KSampler% /"}]});
        let files = parse_input(Some(&input)).unwrap().files;
        assert_eq!(files[0].subfolder, "KSampler%");
    }

    fn files_of(input: Value) -> Vec<InputFile> {
        match parse_input(Some(&input)) {
            Ok(parsed) => parsed.files,
            Err(out) => panic!("refused: {out}"),
        }
    }

    #[test]
    fn url_items_and_the_extended_fields() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let files = files_of(json!({"workflow": wf, "images": [
            {"image": "https://example.com/x/cat%20(2).png?token=1"},
            {"name": "clip.mp4", "image": "HTTP://example.com/v", "subfolder": "videos/", "type": "temp"},
            {"name": "m.png", "image": "aGk=", "kind": "mask", "original_ref": {"filename": "cat.png", "subfolder": "a"}},
            {"name": "m2.png", "image": "aGk=", "kind": "MASK", "original_ref": "cat.png"},
            {"name": "s.png", "image": "s3://bucket/dir/s.png"},
        ]}));
        assert_eq!(files[0].name, "cat_2.png");
        assert!(files[0].name_derived);
        assert_eq!(
            files[0].source,
            Source::Url("https://example.com/x/cat%20(2).png?token=1".into())
        );
        assert_eq!(
            (files[0].subfolder.as_str(), files[0].folder_type.as_str()),
            ("", "input")
        );
        assert_eq!(files[1].name, "clip.mp4");
        assert!(!files[1].name_derived);
        assert_eq!(
            (files[1].subfolder.as_str(), files[1].folder_type.as_str()),
            ("videos", "temp")
        );
        assert_eq!(
            files[2].original_ref,
            Some(FileRef {
                filename: "cat.png".into(),
                subfolder: "a".into(),
                folder_type: "input".into()
            })
        );
        assert_eq!(
            files[3].original_ref.as_ref().map(|r| r.filename.as_str()),
            Some("cat.png")
        );
        assert_eq!(
            files[4].source,
            Source::S3 {
                bucket: "bucket".into(),
                key: "dir/s.png".into()
            }
        );
        // `files` is an alias of `images`.
        let files =
            files_of(json!({"workflow": wf, "files": [{"name": "a.wav", "image": "UklGRg=="}]}));
        assert_eq!(files[0].name, "a.wav");
    }

    #[test]
    fn bad_extended_fields_get_clear_errors() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let error = |items: Value| {
            err(Some(json!({"workflow": wf, "images": items})))["error"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        for (items, expected) in [
            (
                json!([{"name": "a.png", "image": "aGk=", "subfolder": "../x"}]),
                "Invalid subfolder \"../x\": it contains '..'",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "subfolder": "/abs"}]),
                "it starts with '/'",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "subfolder": 3}]),
                "'subfolder' of a.png must be a string",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "type": "models"}]),
                "Invalid type \"models\" for a.png",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "kind": "video"}]),
                "Invalid kind \"video\" for a.png",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "kind": "mask"}]),
                "The mask a.png needs an 'original_ref'",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "original_ref": "b.png"}]),
                "only applies to kind \"mask\"",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "kind": "mask", "original_ref": {"filename": "../b.png"}}]),
                "Invalid image name \"../b.png\"",
            ),
            (
                json!([{"name": "a.png", "image": "aGk=", "kind": "mask", "original_ref": {"subfolder": "x"}}]),
                "needs a 'filename'",
            ),
            (json!([{"image": "aGk="}]), IMAGES_SHAPE),
            (
                json!([{"name": "../a.png", "image": "https://example.com/a.png"}]),
                "Invalid image name",
            ),
        ] {
            let e = error(items.clone());
            assert!(e.contains(expected), "{items}: {e}");
        }
        let e = err(Some(json!({"workflow": wf, "images": [], "files": []})));
        assert!(e["error"].as_str().unwrap().contains("not both"), "{e}");
        let e = err(Some(json!({"workflow": wf, "files": "x"})));
        assert_eq!(
            e["error"],
            "'files' must be a list of objects with 'name' and 'image' keys"
        );
        let e = err(Some(json!({"workflow": wf, "images": [
            {"name": "a.png", "image": "ftp://example.com/a.png"},
            {"name": "b.png", "image": "s3://bucket-only"},
        ]})));
        assert_eq!(e["error"], "Failed to upload one or more input images");
        assert_eq!(
            e["details"],
            json!([
                "Error downloading a.png from ftp://example.com/a.png: the scheme \"ftp\" is not supported (use base64, a data: URI, http, https or s3)",
                "Error downloading b.png from s3://bucket-only: an s3:// URL needs a bucket and a key (s3://bucket/key)"
            ])
        );
    }

    #[test]
    fn media_types_from_names_bytes_and_data_uris() {
        const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(sniff_media_type(PNG), Some("image/png"));
        assert_eq!(sniff_media_type(b"\xff\xd8\xff\xe0xx"), Some("image/jpeg"));
        assert_eq!(
            sniff_media_type(b"RIFF\0\0\0\0WEBPVP8 "),
            Some("image/webp")
        );
        assert_eq!(sniff_media_type(b"RIFF\0\0\0\0WAVEfmt "), Some("audio/wav"));
        assert_eq!(sniff_media_type(b"\0\0\0\x18ftypmp42"), Some("video/mp4"));
        assert_eq!(
            sniff_media_type(b"\0\0\0\x14ftypqt  "),
            Some("video/quicktime")
        );
        assert_eq!(
            sniff_media_type(b"\x1a\x45\xdf\xa3\x01"),
            Some("video/webm")
        );
        assert_eq!(sniff_media_type(b"ID3\x04\0"), Some("audio/mpeg"));
        assert_eq!(sniff_media_type(b"fLaC\0"), Some("audio/flac"));
        assert_eq!(sniff_media_type(b"hello"), None);
        assert_eq!(sniff_media_type(b""), None);
        // The name wins, then the bytes, then the declared type.
        assert_eq!(media_type_of("a.mp4", PNG, None), "video/mp4");
        assert_eq!(media_type_of("a", PNG, Some("image/jpeg")), "image/png");
        assert_eq!(media_type_of("a", b"??", Some("Image/JPG")), "image/jpeg");
        assert_eq!(media_type_of("a", b"??", None), "application/octet-stream");
        assert_eq!(
            data_uri_media_type("data:video/mp4;base64,AAAA").as_deref(),
            Some("video/mp4")
        );
        assert_eq!(data_uri_media_type("DATA:;base64,AAAA"), None);
        assert_eq!(data_uri_media_type("AAAA"), None);
        // A data URI whose type contradicts the bytes is still accepted.
        let wf: Value = serde_json::from_str(WF).unwrap();
        let png = codec::encode(PNG);
        let files = files_of(
            json!({"workflow": wf, "images": [{"name": "a.png", "image": format!("data:image/jpeg;base64,{png}")}]}),
        );
        assert!(matches!(&files[0].source, Source::Inline { data, .. } if &data[..] == PNG));
    }

    #[tokio::test]
    async fn fetching_inline_files_and_s3_without_a_bucket() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let files = files_of(json!({"workflow": wf, "images": [
            {"name": "a.png", "image": "aGk=", "subfolder": "x", "type": "temp"},
            {"name": "b.bin", "image": "data:image/png;base64,aGk="},
        ]}));
        let fetcher = Fetcher::new(&InputPolicy::default());
        let storage = crate::job::Storage::new(Default::default())
            .for_job("job-1", None)
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let uploads = fetcher.fetch_all(&files, &storage, &cancel).await.unwrap();
        assert_eq!(uploads[0].name, "a.png");
        assert_eq!(uploads[0].subfolder, "x");
        assert_eq!(uploads[0].folder_type, "temp");
        assert_eq!(uploads[0].content_type.as_deref(), Some("image/png"));
        assert_eq!(&uploads[0].data[..], b"hi");
        assert_eq!(uploads[1].content_type.as_deref(), Some("image/png"));
        let files =
            files_of(json!({"workflow": wf, "images": [{"image": "s3://bucket/in/a.png"}]}));
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        let out = JobOutput::from(out).to_json();
        assert_eq!(
            out,
            json!({"error": "Failed to upload one or more input images", "details": [
                "Error downloading a.png from s3://bucket/in/a.png: no bucket is configured: s3:// inputs are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config"
            ]})
        );
        // Refused before any connection: no network needed.
        let files = files_of(
            json!({"workflow": wf, "images": [{"name": "input.png", "image": "http://10.0.0.5/x.png?sig=1"}]}),
        );
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        let out = JobOutput::from(out).to_json();
        assert_eq!(
            out["details"][0],
            "Error downloading input.png from http://10.0.0.5/x.png?…: refused: 10.0.0.5 is a private address (set ALLOW_PRIVATE_INPUT_URLS=true to allow it)"
        );
        cancel.cancel();
        let out = fetcher
            .fetch_all(&files, &storage, &cancel)
            .await
            .unwrap_err();
        assert!(matches!(out, JobFailure::Cancelled(_)), "{out}");
        assert!(out.message().contains("cancelled"));
    }
}
