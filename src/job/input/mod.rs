//! The job input schema of worker-comfyui: `workflow`, `images: [{name, image}]`,
//! `comfy_org_api_key`, with the same validation messages, plus checks it lacks
//! (workflow shape, image names that could escape ComfyUI's input folder, bad base64), and
//! extensions it lacks:
//! * `image` may be an `http(s)://` URL, downloaded through the SSRF guard of [`crate::ssrf`] within
//!   [`InputPolicy`]'s limits, or an `s3://bucket/key` read from the job's bucket within the same
//!   size limit (see [`Fetcher::fetch_s3`]);
//! * an item may carry `subfolder`, `type` (`input`, `temp`, `output`) and `kind: "mask"` with an
//!   `original_ref` (uploaded to `/upload/mask`); any file (video, audio) may be sent;
//! * the list may be called `files` instead of `images`;
//! * `models` names model files to download into ComfyUI's model folder (see [`ModelSpec`]).
//!
//! [`parse_input`] validates without touching the network; [`Fetcher::fetch_all`] then downloads
//! every URL input (a few at a time) before anything is uploaded, so a bad URL fails the job
//! before ComfyUI sees any of it.

mod fetcher;
mod file_name;
mod media;
mod model_spec;

use bytes::Bytes;
use serde_json::{Map, Value};

pub use fetcher::{DownloadError, DownloadFailure, Fetcher, DOWNLOAD_CONCURRENCY, MAX_REDIRECTS};
pub use file_name::{
    check_image_name, check_subfolder, name_from_url, sanitize_file_name, InvalidImageName,
    InvalidSubfolder, NameProblem, SubfolderProblem,
};
pub use model_spec::ModelSpec;

use super::codec;
use super::failure::{JobFailure, Report};
use crate::comfy::{FileRef, WorkflowInput};
use crate::json_type::json_type;
use crate::redact::display_url;
use crate::secret::Secret;
use file_name::truncate_chars;
use media::{data_uri_media_type, note_mismatch};

/// A validated job input.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// The workflow: API format, or a UI-format export the engine converts with `/object_info`.
    pub workflow: WorkflowInput,
    /// Files to upload before queueing (`images`, or its alias `files`), in order.
    pub files: Vec<InputFile>,
    /// Per-job Comfy.org API key (wins over `COMFY_ORG_API_KEY`).
    pub comfy_org_api_key: Option<Secret>,
    /// Model files to download into ComfyUI's model folder before queueing (`models`).
    pub models: Vec<ModelSpec>,
    /// `previews: true`: ask ComfyUI for sampler previews and publish them with the progress.
    pub previews: bool,
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
    /// A file the front end holds on disk (see [`crate::job::request::LocalFile`]); never
    /// made from a job's JSON.
    Local(std::path::PathBuf),
}

impl Source {
    /// Where the bytes come from, for messages (a URL without its query).
    fn describe(&self) -> String {
        match self {
            Source::Inline { .. } => "the job".into(),
            Source::Url(url) => display_url(url),
            Source::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
            Source::Local(_) => "the endpoint's asset store".into(),
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
                check_image_name(n).map_err(|e| bad_input(e.to_string()))?;
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
    let previews = match obj.get("previews") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad_input(format!(
                "'previews' must be true or false, got {}",
                json_type(other)
            )))
        }
    };
    let models = model_spec::parse_models(obj.get("models"))
        .map_err(|problems| bad_input_with_details("Invalid 'models'", problems))?;
    Ok(JobInput {
        workflow,
        files,
        comfy_org_api_key,
        models,
        previews,
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

#[cfg(test)]
mod name_props;

#[cfg(test)]
mod tests {
    use super::media::media_type_of;
    use super::*;
    use crate::job::JobOutput;
    use crate::media_type::sniff_media_type;
    use serde_json::json;

    fn err(input: Option<Value>) -> Value {
        match parse_input(input.as_ref()) {
            Ok(_) => panic!("accepted {input:?}"),
            Err(out) => JobOutput::from(out).to_json(),
        }
    }

    pub(super) const WF: &str = r#"{"1": {"class_type": "EmptyImage", "inputs": {}}}"#;

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
        let e = err(Some(json!({"workflow": wf, "previews": "yes"})));
        assert_eq!(
            e["error"],
            json!("'previews' must be true or false, got a string")
        );
        let e = err(Some(
            json!({"workflow": wf, "models": [{"url": "ftp://x/m", "folder": "loras", "name": "m.safetensors"}]}),
        ));
        assert_eq!(e["error"], json!("Invalid 'models'"));
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

    pub(super) fn files_of(input: Value) -> Vec<InputFile> {
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
}
