//! ComfyUI's HTTP API: one method per endpoint, typed replies.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ComfyError;
use super::messages::ExecutionError;
use crate::secret::Secret;

/// How long HTTP calls may take.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect bound.
    pub connect_timeout: Duration,
    /// Bound for ordinary calls (prompt, history, upload).
    pub request_timeout: Duration,
    /// Bound for `/view` downloads (videos can be large).
    pub view_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            view_timeout: Duration::from_secs(120),
        }
    }
}

/// A client for one ComfyUI server.
#[derive(Clone)]
pub struct ComfyClient {
    http: reqwest::Client,
    /// `http://host:port` without a trailing slash (with `user:password@` when `COMFY_HOST` has
    /// them: reqwest turns them into basic auth and keeps them out of its error messages).
    base: String,
    /// `ws://host:port` (never with credentials).
    ws_base: String,
    /// `host:port` for messages (never with credentials).
    host: String,
    options: ClientOptions,
    /// The `user:password` of `COMFY_HOST`, kept so logs scrub it.
    _credentials: Option<Secret>,
}

/// Hand-written: `base` may carry credentials.
impl std::fmt::Debug for ComfyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyClient")
            .field("host", &self.host)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Body of `POST /prompt`.
#[derive(Debug, Serialize)]
pub struct PromptRequest<'a> {
    /// The API-format graph.
    pub prompt: &'a Map<String, Value>,
    /// Routing key for WebSocket events.
    pub client_id: &'a str,
    /// Chosen by us, so events arriving before the reply can be attributed.
    pub prompt_id: &'a str,
    /// `extra_data` (e.g. `api_key_comfy_org`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_data: Option<&'a Map<String, Value>>,
}

/// Reply of `POST /prompt` (HTTP 200).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPrompt {
    /// The prompt id (ours, echoed).
    pub prompt_id: String,
    /// Queue number.
    pub number: Option<f64>,
    /// Outputs dropped because their inputs failed validation (the rest runs).
    pub node_errors: Vec<NodeErrors>,
}

/// ComfyUI's refusal of a prompt (HTTP 400).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRejection {
    /// `error.type`, e.g. `prompt_outputs_failed_validation`, `invalid_prompt`.
    pub error_type: Option<String>,
    /// `error.message`.
    pub message: String,
    /// `error.details`.
    pub details: String,
    /// Per-node reasons.
    pub node_errors: Vec<NodeErrors>,
    /// The body as received, for the rare case nothing above explains it.
    pub raw: String,
}

/// `node_errors[id]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeErrors {
    /// Node id.
    pub node_id: String,
    /// Its class type.
    pub class_type: Option<String>,
    /// The reasons.
    pub errors: Vec<ValidationReason>,
    /// Output nodes that depend on it.
    pub dependent_outputs: Vec<String>,
}

/// One validation reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReason {
    /// e.g. `value_not_in_list`.
    pub kind: String,
    /// Human message.
    pub message: String,
    /// Details (input name, values).
    pub details: String,
    /// `extra_info.input_name`.
    pub input_name: Option<String>,
}

impl PromptRejection {
    /// One line for logs and error chains.
    pub fn summary(&self) -> String {
        let nodes: Vec<&str> = self
            .node_errors
            .iter()
            .map(|n| n.node_id.as_str())
            .collect();
        if nodes.is_empty() {
            format!("{} {}", self.message, self.details)
                .trim()
                .to_string()
        } else {
            format!("{} (nodes {})", self.message, nodes.join(", "))
        }
    }

    fn parse(body: &str) -> Option<PromptRejection> {
        let v: Value = serde_json::from_str(body).ok()?;
        let obj = v.as_object()?;
        let err = obj.get("error")?;
        let (error_type, message, details) = match err {
            Value::Object(e) => (
                e.get("type").and_then(Value::as_str).map(str::to_owned),
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                e.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            ),
            Value::String(s) => (None, s.clone(), String::new()),
            other => (None, other.to_string(), String::new()),
        };
        Some(PromptRejection {
            error_type,
            message,
            details,
            node_errors: parse_node_errors(obj.get("node_errors")),
            raw: body.to_owned(),
        })
    }
}

fn parse_node_errors(v: Option<&Value>) -> Vec<NodeErrors> {
    let Some(Value::Object(map)) = v else {
        return Vec::new();
    };
    map.iter()
        .map(|(id, entry)| NodeErrors {
            node_id: id.clone(),
            class_type: entry
                .get("class_type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            errors: entry
                .get("errors")
                .and_then(Value::as_array)
                .map(|list| list.iter().map(parse_reason).collect())
                .unwrap_or_default(),
            dependent_outputs: entry
                .get("dependent_outputs")
                .and_then(Value::as_array)
                .map(|l| l.iter().map(value_to_id).collect())
                .unwrap_or_default(),
        })
        .collect()
}

fn parse_reason(v: &Value) -> ValidationReason {
    let text = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    ValidationReason {
        kind: text("type"),
        message: text("message"),
        details: text("details"),
        input_name: v
            .get("extra_info")
            .and_then(|e| e.get("input_name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

fn value_to_id(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A file ComfyUI stored (`{filename, subfolder, type}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// File name.
    pub filename: String,
    /// Subfolder ("" = root).
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    pub folder_type: String,
}

impl FileRef {
    /// True for ComfyUI's `temp` folder (PreviewImage, PreviewAudio, VHS with `save_output` off).
    pub fn is_temp(&self) -> bool {
        self.folder_type == "temp"
    }
}

/// What kind of file an output entry is, from the `ui` key it came under (protocol spec §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// `images`: SaveImage, PreviewImage, SaveAnimatedWEBP/PNG, and also the mp4/webm files of
    /// SaveVideo/SaveWEBM (the node's `animated` flag is set then).
    Image,
    /// `gifs` (VideoHelperSuite's `VHS_VideoCombine`) or `videos`.
    Video,
    /// `audio`: SaveAudio, SaveAudioMP3/Opus, PreviewAudio.
    Audio,
    /// Any other key whose entries are file references (`latents`, `3d`, ...), by name.
    Other(String),
}

impl FileKind {
    fn from_key(key: &str) -> FileKind {
        match key {
            "images" => FileKind::Image,
            "gifs" | "videos" => FileKind::Video,
            "audio" => FileKind::Audio,
            other => FileKind::Other(other.to_owned()),
        }
    }
}

/// One output file of a node, with the output key it came under.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    /// The `ui` key as ComfyUI sent it (`images`, `gifs`, `audio`, ...).
    pub key: String,
    /// What the key means.
    pub kind: FileKind,
    /// Where to fetch it.
    pub file: FileRef,
    /// `format` when the node gave one (VideoHelperSuite: `video/h264-mp4`, `image/gif`, ...).
    pub format: Option<String>,
    /// `frame_rate` when the node gave one (VideoHelperSuite), as sent (integer or float).
    pub frame_rate: Option<serde_json::Number>,
}

/// Outputs of one node from `/history`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeOutput {
    /// Node id.
    pub node_id: String,
    /// File entries under any key.
    pub files: Vec<OutputFile>,
    /// Strings under `text`.
    pub texts: Vec<String>,
    /// `animated: [true]`: the `images` entries are animations or videos.
    pub animated: bool,
    /// Entries that could not be understood, as readable warnings.
    pub problems: Vec<String>,
}

/// How a finished prompt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished without error.
    Success,
    /// A node raised.
    Failed(ExecutionFailure),
    /// The prompt was interrupted.
    Interrupted(Interruption),
}

/// Details of a node's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionFailure {
    /// Node id.
    pub node_id: String,
    /// Class type.
    pub node_type: String,
    /// Exception class.
    pub exception_type: String,
    /// Exception text, trailing whitespace removed.
    pub message: String,
    /// Python traceback lines.
    pub traceback: Vec<String>,
}

impl From<&ExecutionError> for ExecutionFailure {
    fn from(e: &ExecutionError) -> Self {
        ExecutionFailure {
            node_id: e.node_id.clone().unwrap_or_default(),
            node_type: e.node_type.clone().unwrap_or_default(),
            exception_type: e.exception_type.clone(),
            message: e.exception_message.trim_end().to_owned(),
            traceback: e.traceback.clone(),
        }
    }
}

/// Where an interrupt stopped the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Interruption {
    /// Node id.
    pub node_id: String,
    /// Class type.
    pub node_type: String,
}

/// A `/history/{id}` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// `status.status_str` (`success` or `error`).
    pub status_str: String,
    /// `status.completed`.
    pub completed: bool,
    /// How it ended, from `status.messages`.
    pub outcome: Outcome,
    /// Outputs per node, in ComfyUI's order.
    pub outputs: Vec<NodeOutput>,
}

impl HistoryEntry {
    /// Reads one entry of a `/history` reply (the value under the prompt id). Never panics:
    /// whatever does not have the documented shape is skipped or reported in the node's
    /// `problems`.
    pub fn parse(entry: &Value) -> HistoryEntry {
        let status = entry.get("status");
        let status_str = status
            .and_then(|s| s.get("status_str"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let completed = status
            .and_then(|s| s.get("completed"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut outcome = Outcome::Success;
        let messages = status
            .and_then(|s| s.get("messages"))
            .and_then(Value::as_array);
        for msg in messages.into_iter().flatten() {
            let (Some(kind), Some(data)) = (msg.get(0).and_then(Value::as_str), msg.get(1)) else {
                continue;
            };
            match kind {
                "execution_error" => {
                    if let Ok(e) = serde_json::from_value::<ExecutionError>(data.clone()) {
                        if !e.is_blocked_variant() {
                            outcome = Outcome::Failed(ExecutionFailure::from(&e));
                        }
                    }
                }
                "execution_interrupted" => {
                    let text = |k: &str| {
                        data.get(k)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned()
                    };
                    outcome = Outcome::Interrupted(Interruption {
                        node_id: text("node_id"),
                        node_type: text("node_type"),
                    });
                }
                _ => {}
            }
        }
        if matches!(outcome, Outcome::Success) && status_str == "error" {
            outcome = Outcome::Failed(ExecutionFailure {
                node_id: String::new(),
                node_type: String::new(),
                exception_type: String::new(),
                message: "ComfyUI reported the prompt as failed without details".into(),
                traceback: Vec::new(),
            });
        }
        let outputs = entry
            .get("outputs")
            .and_then(Value::as_object)
            .map(|outs| {
                outs.iter()
                    .map(|(id, ui)| parse_node_output(id, ui))
                    .collect()
            })
            .unwrap_or_default();
        HistoryEntry {
            status_str,
            completed,
            outcome,
            outputs,
        }
    }
}

/// Reads one node's `ui` dict: every value is a list; file entries are `{filename, subfolder, type}`.
pub(crate) fn parse_node_output(node_id: &str, ui: &Value) -> NodeOutput {
    let mut out = NodeOutput {
        node_id: node_id.to_owned(),
        ..NodeOutput::default()
    };
    let Some(map) = ui.as_object() else {
        out.problems.push(format!(
            "Node {node_id} output is not an object: {}",
            truncate(&ui.to_string(), 200)
        ));
        return out;
    };
    for (key, value) in map {
        let Some(items) = value.as_array() else {
            continue;
        };
        match key.as_str() {
            "animated" => out.animated = items.iter().any(|b| b.as_bool() == Some(true)),
            "text" => out
                .texts
                .extend(items.iter().filter_map(|t| t.as_str().map(str::to_owned))),
            _ => {
                for item in items {
                    let Some(obj) = item.as_object() else {
                        continue;
                    };
                    // Only entries that look like file references count as files.
                    if !obj.contains_key("filename") && !obj.contains_key("type") {
                        continue;
                    }
                    match obj.get("filename").and_then(Value::as_str) {
                        Some(filename) if !filename.is_empty() => out.files.push(OutputFile {
                            key: key.clone(),
                            kind: FileKind::from_key(key),
                            file: FileRef {
                                filename: filename.to_owned(),
                                subfolder: obj
                                    .get("subfolder")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                folder_type: obj
                                    .get("type")
                                    .and_then(Value::as_str)
                                    .unwrap_or("output")
                                    .to_owned(),
                            },
                            format: obj.get("format").and_then(Value::as_str).map(str::to_owned),
                            frame_rate: match obj.get("frame_rate") {
                                Some(Value::Number(n)) => Some(n.clone()),
                                _ => None,
                            },
                        }),
                        _ => out.problems.push(format!(
                            "Skipping image in node {node_id} due to missing filename: {}",
                            truncate(&item.to_string(), 200)
                        )),
                    }
                }
            }
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reply of `POST /upload/image`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UploadedFile {
    /// Stored name (may differ from the requested one when renamed).
    pub name: String,
    /// Subfolder.
    #[serde(default)]
    pub subfolder: String,
    /// Folder type.
    #[serde(rename = "type", default)]
    pub folder_type: String,
}

/// A subset of `/system_stats`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct SystemStats {
    /// `system` block.
    #[serde(default)]
    pub system: SystemInfo,
    /// Compute devices.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// `system_stats.system`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct SystemInfo {
    /// ComfyUI version.
    #[serde(default)]
    pub comfyui_version: Option<String>,
    /// PyTorch version.
    #[serde(default)]
    pub pytorch_version: Option<String>,
    /// Python version (`sys.version`, with its build line).
    #[serde(default)]
    pub python_version: Option<String>,
}

/// `system_stats.devices[]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct DeviceInfo {
    /// Device name.
    #[serde(default)]
    pub name: String,
    /// `cuda`, `cpu`, ...
    #[serde(default, rename = "type")]
    pub kind: String,
    /// VRAM bytes.
    #[serde(default)]
    pub vram_total: u64,
    /// Free VRAM bytes.
    #[serde(default)]
    pub vram_free: u64,
}

/// `/queue`, reduced to what we use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueSnapshot {
    /// Running prompt ids.
    pub running: Vec<String>,
    /// Pending prompt ids, sorted by queue number (run order).
    pub pending: Vec<String>,
}

impl QueueSnapshot {
    /// 0 when running, n when n prompts run before it, None when not in the queue.
    pub fn position(&self, prompt_id: &str) -> Option<usize> {
        if self.running.iter().any(|p| p == prompt_id) {
            return Some(0);
        }
        self.pending
            .iter()
            .position(|p| p == prompt_id)
            .map(|i| i + self.running.len())
    }

    fn parse(v: &Value) -> QueueSnapshot {
        let items = |k: &str| -> Vec<(f64, String)> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .filter_map(|item| {
                            let number = item.get(0).and_then(Value::as_f64).unwrap_or(0.0);
                            let id = item.get(1).and_then(Value::as_str)?;
                            Some((number, id.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut pending = items("queue_pending");
        pending.sort_by(|a, b| a.0.total_cmp(&b.0));
        QueueSnapshot {
            running: items("queue_running").into_iter().map(|i| i.1).collect(),
            pending: pending.into_iter().map(|i| i.1).collect(),
        }
    }
}

/// `/object_info`: node class → definition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectInfo {
    classes: Map<String, Value>,
}

impl ObjectInfo {
    /// Wraps a parsed `/object_info` reply.
    pub fn from_value(v: Value) -> ObjectInfo {
        ObjectInfo {
            classes: match v {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    /// The allowed values of a combo input (V1 `[[..], {..}]` or V3 `["COMBO", {"options": [..]}]`).
    pub fn choices(&self, class_type: &str, input: &str) -> Option<Vec<String>> {
        let inputs = self.classes.get(class_type)?.get("input")?;
        let spec = ["required", "optional"]
            .iter()
            .find_map(|section| inputs.get(*section)?.get(input))?;
        let list = match spec.get(0)? {
            Value::Array(list) => list,
            Value::String(s) if s == "COMBO" => spec.get(1)?.get("options")?.as_array()?,
            _ => return None,
        };
        Some(
            list.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        )
    }

    /// Whether the class exists.
    pub fn has_class(&self, class_type: &str) -> bool {
        self.classes.contains_key(class_type)
    }

    /// A class's definition (`input`, `input_order`, `output`, `display_name`, ...), when it is
    /// an object.
    pub fn class(&self, class_type: &str) -> Option<&Map<String, Value>> {
        self.classes.get(class_type)?.as_object()
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether no class is known.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

/// The media type a file name's extension stands for, if it is a known one.
pub fn media_type_for_name(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let (_, ext) = lower.rsplit_once('.')?;
    Some(match ext {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "avif" => "image/avif",
        "heic" => "image/heic",
        "exr" => "image/x-exr",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "glb" => "model/gltf-binary",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => return None,
    })
}

fn mime_for(name: &str) -> &'static str {
    media_type_for_name(name).unwrap_or("application/octet-stream")
}

/// One file for `POST /upload/image`, or `POST /upload/mask` when it has an `original_ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// File name (ComfyUI keeps it with `overwrite=true`).
    pub name: String,
    /// The bytes.
    pub data: Bytes,
    /// Subfolder of the target folder ("" = its root).
    pub subfolder: String,
    /// Target folder: `input`, `temp` or `output`.
    pub folder_type: String,
    /// The part's media type; from the name when `None`.
    pub content_type: Option<String>,
    /// For a mask: the image whose alpha channel it replaces (`/upload/mask`).
    pub original_ref: Option<FileRef>,
}

impl ComfyClient {
    /// A client for `host` (`host:port`, or a full `http://host:port` URL).
    pub fn new(host: &str, options: ClientOptions) -> Result<ComfyClient, ComfyError> {
        let trimmed = host.trim().trim_end_matches('/');
        let (scheme, authority) = match trimmed.split_once("://") {
            Some((s, rest)) => (s.to_ascii_lowercase(), rest.to_owned()),
            None => ("http".to_owned(), trimmed.to_owned()),
        };
        if authority.is_empty() || !(scheme == "http" || scheme == "https") {
            return Err(ComfyError::Protocol {
                what: "COMFY_HOST".into(),
                detail: format!(
                    "'{}' is not host:port or an http(s) URL",
                    match host.rsplit_once('@') {
                        Some((_, rest)) => format!("…@{rest}"),
                        None => host.to_owned(),
                    }
                ),
            });
        }
        // `user:password@host:port/prefix`: the credentials stay out of every shown form.
        let (hostport, path) = match authority.find('/') {
            Some(i) => authority.split_at(i),
            None => (authority.as_str(), ""),
        };
        let (credentials, hostport) = match hostport.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(Secret::new(userinfo)), rest),
            None => (None, hostport),
        };
        if hostport.is_empty() {
            return Err(ComfyError::Protocol {
                what: "COMFY_HOST".into(),
                detail: "no host after the credentials".into(),
            });
        }
        let shown = format!("{hostport}{path}");
        let ws_scheme = if scheme == "https" { "wss" } else { "ws" };
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| ComfyError::Protocol {
                what: "HTTP client".into(),
                detail: e.to_string(),
            })?;
        Ok(ComfyClient {
            http,
            base: format!("{scheme}://{authority}"),
            ws_base: format!("{ws_scheme}://{shown}"),
            host: shown,
            options,
            _credentials: credentials,
        })
    }

    /// `host:port`, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The WebSocket URL for a client id.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!("{}/ws?clientId={}", self.ws_base, client_id)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn transport_error(&self, what: &str, e: reqwest::Error) -> ComfyError {
        ComfyError::Unreachable {
            host: self.host.clone(),
            what: what.to_owned(),
            detail: error_chain(&e),
        }
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, ComfyError> {
        req.timeout(timeout)
            .send()
            .await
            .map_err(|e| self.transport_error(what, e))
    }

    async fn expect_ok(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, ComfyError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(ComfyError::Status {
            what: what.to_owned(),
            status,
            body: truncate(&body, 500),
        })
    }

    async fn get_json(&self, what: &str, path: &str) -> Result<Value, ComfyError> {
        let resp = self
            .send(
                what,
                self.http.get(self.url(path)),
                self.options.request_timeout,
            )
            .await?;
        let resp = self.expect_ok(what, resp).await?;
        resp.json::<Value>()
            .await
            .map_err(|e| ComfyError::Protocol {
                what: what.to_owned(),
                detail: error_chain(&e),
            })
    }

    async fn post_json(&self, what: &str, path: &str, body: &Value) -> Result<(), ComfyError> {
        let resp = self
            .send(
                what,
                self.http.post(self.url(path)).json(body),
                self.options.request_timeout,
            )
            .await?;
        self.expect_ok(what, resp).await.map(drop)
    }

    /// `GET /system_stats`: also the readiness probe.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let v = self.get_json("GET /system_stats", "/system_stats").await?;
        serde_json::from_value(v).map_err(|e| ComfyError::Protocol {
            what: "GET /system_stats".into(),
            detail: e.to_string(),
        })
    }

    /// `POST /prompt`. HTTP 400 becomes [`ComfyError::Rejected`].
    pub async fn queue_prompt(&self, req: &PromptRequest<'_>) -> Result<QueuedPrompt, ComfyError> {
        const WHAT: &str = "POST /prompt";
        let resp = self
            .send(
                WHAT,
                self.http.post(self.url("/prompt")).json(req),
                self.options.request_timeout,
            )
            .await?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| self.transport_error(WHAT, e))?;
        if status == StatusCode::BAD_REQUEST {
            return Err(match PromptRejection::parse(&body) {
                Some(r) => ComfyError::Rejected(Box::new(r)),
                None => ComfyError::Protocol {
                    what: WHAT.into(),
                    detail: format!(
                        "ComfyUI validation failed (could not parse error response): {}",
                        truncate(&body, 1000)
                    ),
                },
            });
        }
        if !status.is_success() {
            return Err(ComfyError::Status {
                what: WHAT.into(),
                status: status.as_u16(),
                body: truncate(&body, 500),
            });
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| ComfyError::Protocol {
            what: WHAT.into(),
            detail: format!("{e}: {}", truncate(&body, 200)),
        })?;
        let prompt_id =
            v.get("prompt_id")
                .and_then(Value::as_str)
                .ok_or_else(|| ComfyError::Protocol {
                    what: WHAT.into(),
                    detail: format!(
                        "Missing 'prompt_id' in queue response: {}",
                        truncate(&body, 200)
                    ),
                })?;
        Ok(QueuedPrompt {
            prompt_id: prompt_id.to_owned(),
            number: v.get("number").and_then(Value::as_f64),
            node_errors: parse_node_errors(v.get("node_errors")),
        })
    }

    /// `GET /history/{id}`: `None` while the prompt is queued or running.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let v = self
            .get_json("GET /history", &format!("/history/{prompt_id}"))
            .await?;
        Ok(v.get(prompt_id).map(HistoryEntry::parse))
    }

    /// `GET /view`: the bytes of a stored file.
    pub async fn view(&self, file: &FileRef) -> Result<Bytes, ComfyError> {
        let what = format!("GET /view {}", file.filename);
        let req = self.http.get(self.url("/view")).query(&[
            ("filename", file.filename.as_str()),
            ("subfolder", file.subfolder.as_str()),
            ("type", file.folder_type.as_str()),
        ]);
        let resp = self.send(&what, req, self.options.view_timeout).await?;
        let resp = self.expect_ok(&what, resp).await?;
        resp.bytes()
            .await
            .map_err(|e| self.transport_error(&what, e))
    }

    /// `POST /upload/image` (multipart) of an input image with `overwrite=true`, like
    /// worker-comfyui.
    pub async fn upload_image(
        &self,
        name: &str,
        data: Bytes,
        subfolder: &str,
    ) -> Result<UploadedFile, ComfyError> {
        self.upload(&Upload {
            name: name.to_owned(),
            data,
            subfolder: subfolder.to_owned(),
            folder_type: "input".into(),
            content_type: None,
            original_ref: None,
        })
        .await
    }

    /// `POST /upload/image`, or `POST /upload/mask` when `upload.original_ref` is set (multipart,
    /// `overwrite=true`). ComfyUI stores any file sent to `/upload/image`, not only images.
    pub async fn upload(&self, upload: &Upload) -> Result<UploadedFile, ComfyError> {
        let path = if upload.original_ref.is_some() {
            "/upload/mask"
        } else {
            "/upload/image"
        };
        let name = &upload.name;
        let what = format!("POST {path} {name}");
        let content_type = upload
            .content_type
            .as_deref()
            .unwrap_or_else(|| mime_for(name));
        let part = reqwest::multipart::Part::stream_with_length(
            reqwest::Body::from(upload.data.clone()),
            upload.data.len() as u64,
        )
        .file_name(name.clone())
        .mime_str(content_type)
        .map_err(|e| ComfyError::Protocol {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let folder_type = if upload.folder_type.is_empty() {
            "input"
        } else {
            upload.folder_type.as_str()
        };
        let mut form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("overwrite", "true")
            .text("type", folder_type.to_owned());
        if !upload.subfolder.is_empty() {
            form = form.text("subfolder", upload.subfolder.clone());
        }
        if let Some(original) = &upload.original_ref {
            let original = serde_json::json!({
                "filename": original.filename,
                "subfolder": original.subfolder,
                "type": original.folder_type,
            });
            form = form.text("original_ref", original.to_string());
        }
        let resp = self
            .send(
                &what,
                self.http.post(self.url(path)).multipart(form),
                self.options.request_timeout,
            )
            .await?;
        let resp = self.expect_ok(&what, resp).await?;
        resp.json::<UploadedFile>()
            .await
            .map_err(|e| ComfyError::Protocol {
                what,
                detail: error_chain(&e),
            })
    }

    /// `GET /object_info`.
    pub async fn object_info(&self) -> Result<ObjectInfo, ComfyError> {
        self.get_json("GET /object_info", "/object_info")
            .await
            .map(ObjectInfo::from_value)
    }

    /// `POST /interrupt`: only `prompt_id` if given (no-op when it is not running), else whatever runs.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), ComfyError> {
        let body = match prompt_id {
            Some(id) => serde_json::json!({ "prompt_id": id }),
            None => serde_json::json!({}),
        };
        self.post_json("POST /interrupt", "/interrupt", &body).await
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<QueueSnapshot, ComfyError> {
        let v = self.get_json("GET /queue", "/queue").await?;
        Ok(QueueSnapshot::parse(&v))
    }

    /// The API-format workflow of a running or pending prompt, from `GET /queue` (each entry is
    /// `[number, prompt_id, prompt, extra_data, outputs]`); `None` when it is not queued.
    pub async fn queued_workflow(
        &self,
        prompt_id: &str,
    ) -> Result<Option<Map<String, Value>>, ComfyError> {
        let v = self.get_json("GET /queue", "/queue").await?;
        Ok(["queue_running", "queue_pending"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_array))
            .flatten()
            .find(|item| item.get(1).and_then(Value::as_str) == Some(prompt_id))
            .and_then(|item| item.get(2))
            .and_then(Value::as_object)
            .cloned())
    }

    /// `POST /queue {"delete": [...]}`: removes pending prompts (running ones are unaffected).
    pub async fn delete_from_queue(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_json(
            "POST /queue",
            "/queue",
            &serde_json::json!({ "delete": prompt_ids }),
        )
        .await
    }

    /// `POST /free` with the flags that are set (`{"unload_models": true, "free_memory": true}`,
    /// `{"free_memory": true}`, ...). ComfyUI applies them after the running prompt; a missing
    /// flag reads as false, but its prompt worker defaults `unload_models` to `free_memory`, so
    /// `free_memory` alone unloads the models too, and it also resets the output cache.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), ComfyError> {
        let mut body = serde_json::Map::new();
        if unload_models {
            body.insert("unload_models".into(), Value::Bool(true));
        }
        if free_memory {
            body.insert("free_memory".into(), Value::Bool(true));
        }
        self.post_json("POST /free", "/free", &Value::Object(body))
            .await
    }
}

/// `e` and its sources, joined, so "connection refused" is not hidden behind "error sending request".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_recorded_validation_failure() {
        let body = json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width",
                "extra_info": {"input_name": "width"}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}});
        let r = PromptRejection::parse(&body.to_string()).unwrap();
        assert_eq!(
            r.error_type.as_deref(),
            Some("prompt_outputs_failed_validation")
        );
        assert_eq!(r.node_errors[0].node_id, "1");
        assert_eq!(
            r.node_errors[0].errors[0].input_name.as_deref(),
            Some("width")
        );
        assert_eq!(r.node_errors[0].dependent_outputs, ["3"]);
        assert!(PromptRejection::parse("not json").is_none());
        let s = PromptRejection::parse(r#"{"error":"boom"}"#).unwrap();
        assert_eq!(s.message, "boom");
    }

    #[test]
    fn history_entry_outcomes_and_outputs() {
        let entry = json!({"outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}, {"subfolder": "", "type": "output"}]},
                                        "5": {"text": ["60"]}},
            "status": {"status_str": "error", "completed": false, "messages": [
                ["execution_start", {"prompt_id": "p"}],
                ["execution_error", {"prompt_id": "p", "node_id": "3", "node_type": "SaveImage", "exception_message": "bad\n", "exception_type": "Exception", "traceback": [], "current_inputs": {}, "executed": []}]]}});
        let h = HistoryEntry::parse(&entry);
        assert!(
            matches!(h.outcome, Outcome::Failed(ref f) if f.node_id == "3" && f.message == "bad")
        );
        assert_eq!(h.outputs[0].node_id, "9");
        assert_eq!(h.outputs[0].files[0].file.filename, "a.png");
        assert_eq!(h.outputs[0].problems.len(), 1);
        assert_eq!(h.outputs[1].texts, ["60"]);
        let interrupted = json!({"outputs": {}, "status": {"status_str": "error", "completed": false, "messages": [
            ["execution_interrupted", {"prompt_id": "p", "node_id": "2", "node_type": "SlowSteps", "executed": ["1"]}]]}});
        assert!(
            matches!(HistoryEntry::parse(&interrupted).outcome, Outcome::Interrupted(ref i) if i.node_id == "2")
        );
    }

    #[test]
    fn every_output_kind_is_typed() {
        let ui = json!({
            "images": [{"filename": "v_00001_.mp4", "subfolder": "video", "type": "output"}],
            "animated": [true],
            "gifs": [{"filename": "AnimateDiff_00001.mp4", "subfolder": "", "type": "temp",
                      "format": "video/h264-mp4", "frame_rate": 8, "workflow": "AnimateDiff_00001.png",
                      "fullpath": "/comfyui/temp/AnimateDiff_00001.mp4"}],
            "audio": [{"filename": "a_00001_.flac", "subfolder": "audio", "type": "output"}],
            "latents": [{"filename": "l_00001_.latent", "subfolder": "latents", "type": "output"}],
            "text": ["20"],
            "result": ["model.glb", {"camera": 1}],
            "unfinished_batch": [true]
        });
        let out = parse_node_output("7", &ui);
        assert!(out.animated);
        assert_eq!(out.texts, ["20"]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let kinds: Vec<(&str, &FileKind)> = out
            .files
            .iter()
            .map(|f| (f.file.filename.as_str(), &f.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("v_00001_.mp4", &FileKind::Image),
                ("AnimateDiff_00001.mp4", &FileKind::Video),
                ("a_00001_.flac", &FileKind::Audio),
                ("l_00001_.latent", &FileKind::Other("latents".into())),
            ]
        );
        let vhs = &out.files[1];
        assert_eq!(vhs.format.as_deref(), Some("video/h264-mp4"));
        assert_eq!(vhs.frame_rate, Some(8.into()));
        assert!(vhs.file.is_temp());
        assert_eq!(out.files[2].file.subfolder, "audio");
    }

    #[test]
    fn combo_choices_in_both_formats() {
        let info = ObjectInfo::from_value(json!({
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}},
            "SaveVideo": {"input": {"required": {"format": ["COMBO", {"options": ["auto", "mp4"]}]}}}
        }));
        assert_eq!(
            info.choices("CheckpointLoaderSimple", "ckpt_name").unwrap(),
            ["a.safetensors", "b.safetensors"]
        );
        assert_eq!(
            info.choices("SaveVideo", "format").unwrap(),
            ["auto", "mp4"]
        );
        assert_eq!(info.choices("SaveVideo", "nope"), None);
    }

    #[test]
    fn queue_position_sorts_pending_by_number() {
        let q = QueueSnapshot::parse(&json!({"queue_running": [[0, "r", {}, {}, []]],
            "queue_pending": [[5, "late", {}, {}, []], [2, "early", {}, {}, []]]}));
        assert_eq!(q.position("r"), Some(0));
        assert_eq!(q.position("early"), Some(1));
        assert_eq!(q.position("late"), Some(2));
        assert_eq!(q.position("x"), None);
    }

    #[test]
    fn host_forms() {
        let c = ComfyClient::new("127.0.0.1:8188", ClientOptions::default()).unwrap();
        assert_eq!(c.ws_url("abc"), "ws://127.0.0.1:8188/ws?clientId=abc");
        let c = ComfyClient::new("https://comfy.example/", ClientOptions::default()).unwrap();
        assert_eq!(c.ws_url("x"), "wss://comfy.example/ws?clientId=x");
        assert!(ComfyClient::new("ftp://x", ClientOptions::default()).is_err());
        let c = ComfyClient::new(
            "http://comfy:pw-host-secret@10.0.0.2:8188",
            ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(c.host(), "10.0.0.2:8188");
        assert_eq!(c.ws_url("x"), "ws://10.0.0.2:8188/ws?clientId=x");
        assert_eq!(
            c.url("/prompt"),
            "http://comfy:pw-host-secret@10.0.0.2:8188/prompt"
        );
        assert!(!format!("{c:?}").contains("pw-host-secret"));
        let e = ComfyClient::new("ftp://u:pw-host-secret@x", ClientOptions::default())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pw-host-secret"), "{e}");
    }
}
