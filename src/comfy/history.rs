//! A prompt's `/history` entry, typed: how it ended ([`Outcome`]), and each output node's files
//! ([`NodeOutput`]) by kind.

use serde_json::Value;

use super::file_ref::FileRef;
use super::messages::ExecutionError;

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

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
