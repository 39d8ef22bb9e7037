//! The job output: worker-comfyui's shapes, extended with the output kinds it drops.
//!
//! * Success: `{"images": [entry…], "videos"?: [entry…], "audio"?: [entry…], "text"?: ["…"],
//!   "<other key>"?: [entry…], "errors"?: ["…"]}`.
//! * Nothing in `images`: `{"status": "success_no_images", "images": [], …the other kinds, "errors"?}`
//!   (worker-comfyui's marker, with the other kinds next to it).
//! * Failure: `{"error": "…", "details"?: ["…"]}`.
//!
//! A file entry is `{"filename", "type": "base64", "data", "content_type"}`, plus `format` and
//! `frame_rate` when the node gave them (VideoHelperSuite); a file uploaded to a bucket (see
//! [`super::storage`]) has `"type": "s3_url"` and a presigned GET URL in `data`, in the same
//! shape. `output.images` holds exactly what worker-comfyui returned (same entries, same order,
//! `s3_url` entries as worker-comfyui's with a bucket), each with a `content_type` added.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::ser::Error as _;
use serde::{Serialize, Serializer};
use serde_json::{Map, Number, Value};

use super::codec;
use super::failure::{JobFailure, Report};
use super::spooled_file::SpooledFile;
use crate::json_type::json_type;

/// One returned file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileEntry {
    /// The file name ComfyUI gave it (or a generated one for WebSocket images).
    pub filename: String,
    /// `base64`, or `s3_url` for a file uploaded to a bucket.
    #[serde(rename = "type")]
    pub kind: String,
    /// Base64 of the file, or the presigned URL of the uploaded object.
    pub data: FileData,
    /// MIME type, from the file extension (see [`content_type_for`]).
    pub content_type: String,
    /// The container/codec VideoHelperSuite reported, e.g. `video/h264-mp4`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Frames per second VideoHelperSuite reported, as it sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_rate: Option<Number>,
}

/// A file entry's `data`: its text (base64, or a bucket URL), or the base64 of an output kept
/// in the engine's spool, encoded only as it is written out (into a result body in pieces by
/// the RunPod front end, whole by serialisation).
#[derive(Debug, Clone)]
pub enum FileData {
    /// The text as it is.
    Text(String),
    /// The base64 of this file.
    Base64Of(Arc<SpooledFile>),
}

impl FileData {
    /// Its length as text, in bytes (a spooled file's base64 length, without reading it).
    pub fn len(&self) -> usize {
        match self {
            FileData::Text(t) => t.len(),
            FileData::Base64Of(file) => codec::encoded_len(file.len()) as usize,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text, when it is held as text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            FileData::Text(t) => Some(t),
            FileData::Base64Of(_) => None,
        }
    }

    /// The text, a spooled file encoded now (read on the calling thread).
    pub fn to_text(&self) -> std::io::Result<Cow<'_, str>> {
        match self {
            FileData::Text(t) => Ok(Cow::Borrowed(t)),
            FileData::Base64Of(file) => Ok(Cow::Owned(codec::encode(&file.read_all_blocking()?))),
        }
    }
}

impl From<String> for FileData {
    fn from(text: String) -> FileData {
        FileData::Text(text)
    }
}

impl From<&str> for FileData {
    fn from(text: &str) -> FileData {
        FileData::Text(text.to_owned())
    }
}

impl PartialEq for FileData {
    fn eq(&self, other: &FileData) -> bool {
        match (self, other) {
            (FileData::Text(a), FileData::Text(b)) => a == b,
            (FileData::Base64Of(a), FileData::Base64Of(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Serialize for FileData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text().map_err(S::Error::custom)?)
    }
}

/// The name worker-comfyui's schema uses for a returned file.
pub type OutputImage = FileEntry;

/// Where a returned file goes in the output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// `images` (also SaveVideo's and SaveWEBM's mp4/webm files, which ComfyUI lists there).
    Images,
    /// `videos` (ComfyUI's `gifs` and `videos` keys).
    Videos,
    /// `audio`.
    Audio,
    /// Any other ComfyUI key holding files, under its own name (see [`OutputKind::other`]).
    Other(String),
}

/// Output keys a file key of ComfyUI's may not take over.
const RESERVED_KEYS: [&str; 8] = [
    "images", "videos", "audio", "text", "status", "errors", "error", "details",
];

impl OutputKind {
    /// An unknown ComfyUI key; one that would collide with a key of the output schema is
    /// prefixed with `output_` (e.g. a node's `errors` files become `output_errors`).
    pub fn other(key: &str) -> OutputKind {
        if RESERVED_KEYS.contains(&key) {
            OutputKind::Other(format!("output_{key}"))
        } else {
            OutputKind::Other(key.to_owned())
        }
    }

    /// The key in the output JSON, and the name `input.output.kinds` uses.
    pub fn name(&self) -> &str {
        match self {
            OutputKind::Images => "images",
            OutputKind::Videos => "videos",
            OutputKind::Audio => "audio",
            OutputKind::Other(name) => name,
        }
    }
}

/// The name of text outputs (`text`, e.g. PreviewAny) in the output and in `kinds`.
pub const TEXT_KIND: &str = "text";

/// Everything but `images`, each kind omitted when empty.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct MoreOutputs {
    /// Videos and animations from ComfyUI's `gifs` / `videos` keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<FileEntry>,
    /// Audio files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audio: Vec<FileEntry>,
    /// Text outputs (`text`), in node order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub text: Vec<String>,
    /// Files under other keys, by key name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Vec<FileEntry>>,
}

impl MoreOutputs {
    /// True when no other kind has anything.
    pub fn is_empty(&self) -> bool {
        self.videos.is_empty()
            && self.audio.is_empty()
            && self.text.is_empty()
            && self.other.values().all(Vec::is_empty)
    }
}

/// The returned outputs of a run, by kind, before the assembly rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outputs {
    /// `images`.
    pub images: Vec<FileEntry>,
    /// The other kinds.
    pub more: MoreOutputs,
}

impl Outputs {
    /// Adds a file under its kind, keeping the order of arrival within each kind.
    pub fn push(&mut self, kind: &OutputKind, entry: FileEntry) {
        match kind {
            OutputKind::Images => self.images.push(entry),
            OutputKind::Videos => self.more.videos.push(entry),
            OutputKind::Audio => self.more.audio.push(entry),
            OutputKind::Other(name) => self.more.other.entry(name.clone()).or_default().push(entry),
        }
    }

    /// True when nothing at all is returned.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.more.is_empty()
    }
}

/// A job that ran to a result: worker-comfyui's two success shapes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Completed {
    /// At least one image; `errors` lists non-fatal problems.
    Images {
        /// The images.
        images: Vec<FileEntry>,
        /// The other kinds (each omitted when empty).
        #[serde(flatten)]
        more: Box<MoreOutputs>,
        /// Warnings (omitted when empty).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        errors: Vec<String>,
    },
    /// Ran fine but produced no returnable image; other kinds may be present.
    NoImages {
        /// Always `success_no_images`.
        status: &'static str,
        /// Always empty.
        images: Vec<FileEntry>,
        /// The other kinds (each omitted when empty).
        #[serde(flatten)]
        more: Box<MoreOutputs>,
        /// Warnings (omitted when empty; only present next to other kinds).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        errors: Vec<String>,
    },
}

impl Completed {
    /// The result of a run that returns only images (worker-comfyui's assembly rules).
    pub fn from_parts(
        images: Vec<FileEntry>,
        errors: Vec<String>,
    ) -> Result<Completed, JobFailure> {
        Completed::assemble(
            Outputs {
                images,
                more: MoreOutputs::default(),
            },
            errors,
        )
    }

    /// The result of a run: images first (worker-comfyui's rules), then the other kinds. With
    /// no images, the `success_no_images` marker carries the other kinds; with nothing at all
    /// and warnings, the job failed (`Job processing failed`), as in worker-comfyui.
    pub fn assemble(outputs: Outputs, errors: Vec<String>) -> Result<Completed, JobFailure> {
        let Outputs { images, more } = outputs;
        if !images.is_empty() {
            Ok(Completed::Images {
                images,
                more: Box::new(more),
                errors,
            })
        } else if errors.is_empty() || !more.is_empty() {
            Ok(Completed::NoImages {
                status: "success_no_images",
                images: Vec::new(),
                more: Box::new(more),
                errors,
            })
        } else {
            Err(JobFailure::NoOutput(Report::with_details(
                "Job processing failed",
                errors,
            )))
        }
    }

    /// Every returned file: images, videos, audio, then the other keys.
    pub fn files(&self) -> Vec<&FileEntry> {
        let (Completed::Images { images, more, .. } | Completed::NoImages { images, more, .. }) =
            self;
        images
            .iter()
            .chain(&more.videos)
            .chain(&more.audio)
            .chain(more.other.values().flatten())
            .collect()
    }

    /// Every returned file, mutably, in the order of [`Completed::files`].
    pub fn files_mut(&mut self) -> Vec<&mut FileEntry> {
        let (Completed::Images { images, more, .. } | Completed::NoImages { images, more, .. }) =
            self;
        let more = &mut **more;
        images
            .iter_mut()
            .chain(&mut more.videos)
            .chain(&mut more.audio)
            .chain(more.other.values_mut().flatten())
            .collect()
    }

    /// The warnings (`errors`) next to the outputs.
    pub fn warnings(&self) -> &[String] {
        let (Completed::Images { errors, .. } | Completed::NoImages { errors, .. }) = self;
        errors
    }

    /// The same result with `f` applied to its warnings (the secret scrubber); files and texts
    /// are the workflow's own results and are left alone.
    pub fn map_warnings(mut self, f: impl Fn(&str) -> String) -> Completed {
        let (Completed::Images { errors, .. } | Completed::NoImages { errors, .. }) = &mut self;
        *errors = errors.iter().map(|e| f(e)).collect();
        self
    }
}

/// What a job returns on the wire: its output, or worker-comfyui's `{"error", "details"?}`.
/// Built only at the edge, from the engine's `Result<Completed, JobFailure>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JobOutput {
    /// The job ran to a result.
    Completed(Completed),
    /// The job failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Details (omitted when absent).
        #[serde(skip_serializing_if = "Option::is_none")]
        details: Option<Vec<String>>,
    },
}

impl From<Result<Completed, JobFailure>> for JobOutput {
    fn from(result: Result<Completed, JobFailure>) -> JobOutput {
        match result {
            Ok(completed) => JobOutput::Completed(completed),
            Err(failure) => failure.into(),
        }
    }
}

impl From<JobFailure> for JobOutput {
    fn from(failure: JobFailure) -> JobOutput {
        let Report { message, details } = failure.into_report();
        JobOutput::Failed {
            error: message,
            details,
        }
    }
}

impl From<Completed> for JobOutput {
    fn from(completed: Completed) -> JobOutput {
        JobOutput::Completed(completed)
    }
}

impl JobOutput {
    /// A failure without details (for what fails before a job exists, e.g. an unreadable file).
    pub fn error(message: impl Into<String>) -> JobOutput {
        JobOutput::Failed {
            error: message.into(),
            details: None,
        }
    }

    /// True for a failure.
    pub fn is_error(&self) -> bool {
        matches!(self, JobOutput::Failed { .. })
    }

    /// The error message of a failure.
    pub fn error_message(&self) -> Option<&str> {
        match self {
            JobOutput::Failed { error, .. } => Some(error),
            JobOutput::Completed(_) => None,
        }
    }

    /// Every returned file: images, videos, audio, then the other keys.
    pub fn files(&self) -> Vec<&FileEntry> {
        match self {
            JobOutput::Completed(c) => c.files(),
            JobOutput::Failed { .. } => Vec::new(),
        }
    }

    /// Every returned file, mutably (the RunPod front end moves their data into its body).
    pub fn files_mut(&mut self) -> Vec<&mut FileEntry> {
        match self {
            JobOutput::Completed(c) => c.files_mut(),
            JobOutput::Failed { .. } => Vec::new(),
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// As JSON, freeing the output's own buffers at once (they can hold megabytes of base64).
    pub fn into_json(self) -> Value {
        self.to_json()
    }
}

/// The job-done body for an output, exactly as the SDK derives it from a handler's return value
/// (`output`, then `error`, then `stopPod`).
pub fn result_body(output: Value, stop_pod: bool) -> Value {
    let mut body = Map::new();
    match output {
        Value::Object(mut rest) => {
            // Taken by value: outputs hold megabytes of base64, never copied here.
            let error = rest.remove("error");
            let error = error.filter(truthy);
            // The SDK drops an empty `output`.
            if !rest.is_empty() {
                body.insert("output".into(), Value::Object(rest));
            }
            if let Some(e) = error {
                body.insert("error".into(), e);
            }
        }
        other => {
            body.insert("output".into(), other);
        }
    }
    if stop_pod {
        body.insert("stopPod".into(), Value::Bool(true));
    }
    Value::Object(body)
}

/// Python truthiness, which decides whether the SDK treats `error` as set.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Per-job output options, `input.output`:
/// `{"include_temp": false, "kinds": ["images", "videos", "audio", "text", …]}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OutputOptions {
    /// Also return files from ComfyUI's `temp` folder (PreviewImage, PreviewAudio, …).
    pub include_temp: bool,
    /// The output keys to return; `None` = every kind.
    pub kinds: Option<Vec<String>>,
}

const OUTPUT_SHAPE: &str =
    r#"{"include_temp": false, "kinds": ["images", "videos", "audio", "text"]}"#;

impl OutputOptions {
    /// Reads `input.output` (absent or `null`: the defaults). `input` is the job's `input`,
    /// an object or a string holding one, already accepted by [`super::parse_input`].
    pub fn parse(input: Option<&Value>) -> Result<OutputOptions, JobFailure> {
        let parsed;
        let input = match input {
            Some(Value::String(s)) => {
                parsed = serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
                &parsed
            }
            Some(v) => v,
            None => return Ok(OutputOptions::default()),
        };
        let obj = match input.get("output") {
            None | Some(Value::Null) => return Ok(OutputOptions::default()),
            Some(Value::Object(obj)) => obj,
            Some(other) => {
                return Err(bad_input(format!(
                    "'output' must be an object like {OUTPUT_SHAPE}, got {}",
                    json_type(other)
                )))
            }
        };
        let mut options = OutputOptions::default();
        for (key, value) in obj {
            match (key.as_str(), value) {
                (_, Value::Null) => {}
                ("include_temp", Value::Bool(b)) => options.include_temp = *b,
                ("include_temp", other) => {
                    return Err(bad_input(format!(
                        "'output.include_temp' must be true or false, got {}",
                        json_type(other)
                    )))
                }
                ("kinds", Value::Array(list)) => {
                    let names: Option<Vec<String>> = list
                        .iter()
                        .map(|v| v.as_str().filter(|s| !s.trim().is_empty()).map(str::to_owned))
                        .collect();
                    match names {
                        Some(names) => options.kinds = Some(names),
                        None => return Err(kinds_error()),
                    }
                }
                ("kinds", _) => return Err(kinds_error()),
                (other, _) => {
                    return Err(bad_input(format!(
                        "'output' has an unknown key '{other}'; it takes 'include_temp' and 'kinds', like {OUTPUT_SHAPE}"
                    )))
                }
            }
        }
        Ok(options)
    }

    /// Whether outputs of this kind (an output key: `images`, `videos`, `audio`, `text`, or
    /// another key's name) are returned.
    pub fn wants(&self, kind: &str) -> bool {
        self.kinds
            .as_ref()
            .is_none_or(|kinds| kinds.iter().any(|k| k == kind))
    }
}

fn kinds_error() -> JobFailure {
    bad_input(format!(
        "'output.kinds' must be a list of output names (\"images\", \"videos\", \"audio\", \"text\", or another output key), like {OUTPUT_SHAPE}"
    ))
}

fn bad_input(message: String) -> JobFailure {
    JobFailure::BadInput(Report::new(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media_type::content_type_for;
    use serde_json::json;

    fn entry(name: &str) -> FileEntry {
        FileEntry {
            filename: name.into(),
            kind: "base64".into(),
            data: "aGk=".into(),
            content_type: content_type_for(name, None),
            format: None,
            frame_rate: None,
        }
    }

    #[test]
    fn shapes_match_worker_comfyui() {
        let img = entry("a.png");
        assert_eq!(
            JobOutput::from(Completed::from_parts(vec![img.clone()], vec![])).to_json(),
            json!({"images": [{"filename": "a.png", "type": "base64", "data": "aGk=", "content_type": "image/png"}]})
        );
        assert_eq!(
            JobOutput::from(Completed::from_parts(vec![img], vec!["w".into()])).to_json()["errors"],
            json!(["w"])
        );
        assert_eq!(
            JobOutput::from(Completed::from_parts(vec![], vec![])).to_json(),
            json!({"status": "success_no_images", "images": []})
        );
        assert_eq!(
            JobOutput::from(Completed::from_parts(vec![], vec!["x".into()])).to_json(),
            json!({"error": "Job processing failed", "details": ["x"]})
        );
        assert_eq!(JobOutput::error("e").to_json(), json!({"error": "e"}));
    }

    #[test]
    fn other_kinds_sit_next_to_images_or_the_no_images_marker() {
        let mut outputs = Outputs::default();
        let mut video = entry("v_00001.mp4");
        video.format = Some("video/h264-mp4".into());
        video.frame_rate = Some(8.into());
        outputs.push(&OutputKind::Videos, video);
        outputs.push(&OutputKind::Audio, entry("a_00001_.flac"));
        outputs.push(&OutputKind::other("latents"), entry("l_00001_.latent"));
        outputs.more.text.push("20".into());
        let out = JobOutput::from(Completed::assemble(outputs.clone(), vec!["w".into()])).to_json();
        assert_eq!(
            out,
            json!({
                "status": "success_no_images", "images": [],
                "videos": [{"filename": "v_00001.mp4", "type": "base64", "data": "aGk=", "content_type": "video/mp4",
                            "format": "video/h264-mp4", "frame_rate": 8}],
                "audio": [{"filename": "a_00001_.flac", "type": "base64", "data": "aGk=", "content_type": "audio/flac"}],
                "text": ["20"],
                "latents": [{"filename": "l_00001_.latent", "type": "base64", "data": "aGk=", "content_type": "application/octet-stream"}],
                "errors": ["w"]
            })
        );
        let keys: Vec<String> = out.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["status", "images", "videos", "audio", "text", "latents", "errors"]
        );
        outputs.push(&OutputKind::Images, entry("i.png"));
        let out = JobOutput::from(Completed::assemble(outputs, vec![]));
        let json = out.to_json();
        assert_eq!(json["images"][0]["filename"], "i.png");
        assert!(json.get("status").is_none() && json.get("errors").is_none());
        let names: Vec<&str> = out.files().iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(
            names,
            ["i.png", "v_00001.mp4", "a_00001_.flac", "l_00001_.latent"]
        );
    }

    #[test]
    fn result_body_follows_the_sdk_table() {
        assert_eq!(
            result_body(json!({"images": []}), false),
            json!({"output": {"images": []}})
        );
        assert_eq!(result_body(json!({}), false), json!({}));
        assert_eq!(
            result_body(json!({"error": "e"}), false),
            json!({"error": "e"})
        );
        assert_eq!(
            result_body(json!({"error": "e", "details": ["d"]}), false),
            json!({"output": {"details": ["d"]}, "error": "e"})
        );
        assert_eq!(
            result_body(json!({"error": "", "a": 1}), false),
            json!({"output": {"a": 1}})
        );
        assert_eq!(result_body(json!({"error": null}), false), json!({}));
        assert_eq!(result_body(json!([1]), false), json!({"output": [1]}));
        assert_eq!(
            result_body(json!({"images": []}), true),
            json!({"output": {"images": []}, "stopPod": true})
        );
        let keys: Vec<String> = result_body(json!({"details": [], "error": "x"}), true)
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["output", "error", "stopPod"]);
    }

    #[test]
    fn reserved_keys_are_prefixed() {
        assert_eq!(OutputKind::other("errors").name(), "output_errors");
        assert_eq!(OutputKind::other("3d").name(), "3d");
    }

    #[test]
    fn options_parse_with_clear_errors() {
        let parse = |v: Value| OutputOptions::parse(Some(&v));
        assert_eq!(
            parse(json!({"workflow": {}})).unwrap(),
            OutputOptions::default()
        );
        assert_eq!(
            parse(json!({"output": null})).unwrap(),
            OutputOptions::default()
        );
        let o =
            parse(json!({"output": {"include_temp": true, "kinds": ["videos", "text"]}})).unwrap();
        assert!(o.include_temp);
        assert!(o.wants("videos") && o.wants("text") && !o.wants("images"));
        assert!(OutputOptions::default().wants("latents"));
        let s = json!({"output": {"kinds": ["audio"]}}).to_string();
        assert!(!OutputOptions::parse(Some(&Value::String(s)))
            .unwrap()
            .wants("images"));
        for (bad, expected) in [
            (json!({"output": "all"}), "'output' must be an object"),
            (
                json!({"output": {"include_temp": "yes"}}),
                "'output.include_temp' must be true or false, got a string",
            ),
            (
                json!({"output": {"kinds": "images"}}),
                "'output.kinds' must be a list",
            ),
            (
                json!({"output": {"kinds": [1]}}),
                "'output.kinds' must be a list",
            ),
            (
                json!({"output": {"kinds": [""]}}),
                "'output.kinds' must be a list",
            ),
            (
                json!({"output": {"include_temps": true}}),
                "unknown key 'include_temps'",
            ),
        ] {
            let err = parse(bad.clone()).unwrap_err();
            assert!(matches!(err, JobFailure::BadInput(_)), "{err}");
            let msg = err.message();
            assert!(msg.contains(expected), "{bad}: {msg}");
        }
    }
}
