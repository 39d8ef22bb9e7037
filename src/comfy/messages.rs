//! ComfyUI's WebSocket messages as typed values.
//!
//! Text frames are `{"type": <string>, "data": <object>}` envelopes. The envelope is decoded
//! first and then dispatched on `type`, so a message type this code does not know (custom nodes
//! add their own) becomes [`WsEvent::Unknown`] instead of an error, and a known type whose
//! payload does not match becomes [`WsEvent::Malformed`] instead of being silently swallowed.
//! Binary frames start with a big-endian `u32` event type and are decoded by
//! [`BinaryFrame::parse`], which checks every length before reading.

use std::collections::HashMap;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// One decoded text frame from `/ws`.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    /// Queue status; broadcast on connect (with `sid`) and on every queue change.
    Status(Status),
    /// The server's reply to our feature-flags frame.
    FeatureFlags(serde_json::Map<String, Value>),
    /// A prompt started executing.
    ExecutionStart(PromptStamp),
    /// Nodes whose outputs come from the cache.
    ExecutionCached(ExecutionCached),
    /// A node started (`node: Some`), or the prompt is done (`node: None`).
    Executing(Executing),
    /// A step of a node with a progress bar (samplers).
    Progress(Progress),
    /// Cumulative per-node state of the prompt.
    ProgressState(ProgressState),
    /// A node produced UI output (files, text).
    Executed(Executed),
    /// The prompt finished without error (history is written after this).
    ExecutionSuccess(PromptStamp),
    /// A node raised; the prompt stops (unless it is the `ExecutionBlocked` variant).
    ExecutionError(ExecutionError),
    /// The prompt was interrupted.
    ExecutionInterrupted(ExecutionInterrupted),
    /// A message type this client does not know; kept so callers can log it.
    Unknown {
        /// The envelope's `type`.
        kind: String,
        /// The envelope's `data`.
        data: Value,
    },
    /// A known message type whose payload did not have the documented shape.
    Malformed {
        /// The envelope's `type`.
        kind: String,
        /// Why decoding failed.
        error: String,
    },
}

/// A frame's envelope, its `data` left unparsed: each message type is then read straight into
/// its own struct, in one pass (a large graph's `progress_state` frames are big, and many).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// An error's message without serde_json's " at line L column C" (the message a payload read
/// as a value gets).
fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&suffix) {
        Some(bare) => bare.to_owned(),
        None => text,
    }
}

impl WsEvent {
    /// Decodes one text frame. Fails only when the text is not a JSON envelope at all.
    pub fn parse(text: &str) -> Result<WsEvent, serde_json::Error> {
        let envelope: Envelope = serde_json::from_str(text)?;
        let data = envelope.data.map_or("null", RawValue::get);
        Ok(Self::from_envelope(envelope.kind, data))
    }

    fn from_envelope(kind: String, data: &str) -> WsEvent {
        fn typed<T: DeserializeOwned>(
            kind: String,
            data: &str,
            wrap: impl FnOnce(T) -> WsEvent,
        ) -> WsEvent {
            match serde_json::from_str::<T>(data) {
                Ok(v) => wrap(v),
                Err(e) => WsEvent::Malformed {
                    kind,
                    // As serde_json words it for a value: without the position in the frame.
                    error: strip_position(&e),
                },
            }
        }
        match kind.as_str() {
            "status" => typed(kind, data, WsEvent::Status),
            "feature_flags" => typed(kind, data, WsEvent::FeatureFlags),
            "execution_start" => typed(kind, data, WsEvent::ExecutionStart),
            "execution_cached" => typed(kind, data, WsEvent::ExecutionCached),
            "executing" => typed(kind, data, WsEvent::Executing),
            "progress" => typed(kind, data, WsEvent::Progress),
            "progress_state" => typed(kind, data, WsEvent::ProgressState),
            "executed" => typed(kind, data, WsEvent::Executed),
            "execution_success" => typed(kind, data, WsEvent::ExecutionSuccess),
            "execution_error" => typed(kind, data, WsEvent::ExecutionError),
            "execution_interrupted" => typed(kind, data, WsEvent::ExecutionInterrupted),
            _ => WsEvent::Unknown {
                kind,
                data: serde_json::from_str(data).unwrap_or(Value::Null),
            },
        }
    }

    /// The prompt this message belongs to, when it says.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            WsEvent::ExecutionStart(m) | WsEvent::ExecutionSuccess(m) => m.prompt_id.as_deref(),
            WsEvent::ExecutionCached(m) => m.prompt_id.as_deref(),
            WsEvent::Executing(m) => m.prompt_id.as_deref(),
            WsEvent::Progress(m) => m.prompt_id.as_deref(),
            WsEvent::ProgressState(m) => m.prompt_id.as_deref(),
            WsEvent::Executed(m) => m.prompt_id.as_deref(),
            WsEvent::ExecutionError(m) => m.prompt_id.as_deref(),
            WsEvent::ExecutionInterrupted(m) => m.prompt_id.as_deref(),
            WsEvent::Status(_)
            | WsEvent::FeatureFlags(_)
            | WsEvent::Unknown { .. }
            | WsEvent::Malformed { .. } => None,
        }
    }

    /// The envelope's `type` string, for logs.
    pub fn kind(&self) -> &str {
        match self {
            WsEvent::Status(_) => "status",
            WsEvent::FeatureFlags(_) => "feature_flags",
            WsEvent::ExecutionStart(_) => "execution_start",
            WsEvent::ExecutionCached(_) => "execution_cached",
            WsEvent::Executing(_) => "executing",
            WsEvent::Progress(_) => "progress",
            WsEvent::ProgressState(_) => "progress_state",
            WsEvent::Executed(_) => "executed",
            WsEvent::ExecutionSuccess(_) => "execution_success",
            WsEvent::ExecutionError(_) => "execution_error",
            WsEvent::ExecutionInterrupted(_) => "execution_interrupted",
            WsEvent::Unknown { kind, .. } | WsEvent::Malformed { kind, .. } => kind,
        }
    }
}

/// `status` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Status {
    /// Queue information.
    pub status: StatusInner,
    /// The socket's client id; only in the message sent on connect.
    #[serde(default)]
    pub sid: Option<String>,
}

/// `status.status`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusInner {
    /// Queue counters.
    pub exec_info: ExecInfo,
}

/// `status.status.exec_info`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecInfo {
    /// Pending plus running prompts.
    pub queue_remaining: u64,
}

/// `execution_start` / `execution_success` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptStamp {
    /// The prompt.
    pub prompt_id: Option<String>,
    /// Milliseconds since the epoch.
    #[serde(default)]
    pub timestamp: Option<u64>,
}

/// `execution_cached` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutionCached {
    /// Every prompt node whose output is cached.
    pub nodes: Vec<String>,
    /// The prompt.
    pub prompt_id: Option<String>,
}

/// `executing` payload; all three shapes (connect-time, node start, terminal `node: null`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Executing {
    /// The node that starts; `None` marks the end of the prompt.
    pub node: Option<String>,
    /// The node id to show (differs for nodes expanded from subgraphs).
    #[serde(default)]
    pub display_node: Option<String>,
    /// Absent in the connect-time message.
    #[serde(default)]
    pub prompt_id: Option<String>,
}

/// `progress` payload. Numbers are sometimes ints, sometimes floats.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub value: f64,
    /// Steps in all.
    pub max: f64,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node.
    #[serde(default)]
    pub node: Option<String>,
}

/// `progress_state` payload: every node started or finished so far in the prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProgressState {
    /// The prompt.
    pub prompt_id: Option<String>,
    /// Node id → state.
    pub nodes: HashMap<String, NodeProgress>,
}

/// One node in `progress_state`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeProgress {
    /// Progress value.
    pub value: f64,
    /// Progress maximum.
    pub max: f64,
    /// `running` or `finished` in practice.
    pub state: String,
    /// Node id.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Node id to display: for a node expanded at run time (`"5.0.0.1"`), the prompt node the
    /// user sees (`"5"`); for a subgraph's node (`"12:3"`) its own id.
    #[serde(default)]
    pub display_node_id: Option<String>,
    /// The node that expanded this one, `None` for prompt nodes.
    #[serde(default)]
    pub parent_node_id: Option<String>,
    /// The prompt node this one comes from.
    #[serde(default)]
    pub real_node_id: Option<String>,
    /// What the node is doing besides its steps, while it does: `"loading"` (models) in today's
    /// ComfyUI; absent otherwise.
    #[serde(default)]
    pub activity: Option<String>,
}

/// `executed` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Executed {
    /// The node.
    pub node: String,
    /// Node id to display.
    #[serde(default)]
    pub display_node: Option<String>,
    /// UI output: every value is a JSON array; `null` for some cached nodes.
    #[serde(default)]
    pub output: Option<serde_json::Map<String, Value>>,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
}

/// `execution_error` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutionError {
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node that raised.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Its class type.
    #[serde(default)]
    pub node_type: Option<String>,
    /// Nodes that ran in this prompt.
    #[serde(default)]
    pub executed: Vec<String>,
    /// The exception text (usually ends with a newline).
    #[serde(default)]
    pub exception_message: String,
    /// The exception class, e.g. `RuntimeError`, or `ExecutionBlocked` for the non-fatal variant.
    #[serde(default)]
    pub exception_type: String,
    /// Python traceback lines.
    #[serde(default)]
    pub traceback: Vec<String>,
    /// An object normally, an empty list for some variants.
    #[serde(default)]
    pub current_inputs: Value,
    /// Absent in the blocked variant.
    #[serde(default)]
    pub timestamp: Option<u64>,
}

impl ExecutionError {
    /// The `ExecutionBlocked` variant reports a blocked branch; execution continues.
    pub fn is_blocked_variant(&self) -> bool {
        self.exception_type == "ExecutionBlocked"
    }
}

/// `execution_interrupted` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutionInterrupted {
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node that was running.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Its class type.
    #[serde(default)]
    pub node_type: Option<String>,
    /// Nodes that ran before the interrupt.
    #[serde(default)]
    pub executed: Vec<String>,
}

/// A decoded binary frame.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryFrame {
    /// Event 1: a preview image without ids (attribute it to the running node).
    Preview {
        /// MIME type from the format code (`image/jpeg`, `image/png`), checked against the magic bytes.
        mime: &'static str,
        /// Encoded image.
        data: Bytes,
    },
    /// Event 3: progress text a node sent (broadcast to every socket).
    Text {
        /// The node that sent it.
        node_id: String,
        /// The text.
        text: String,
    },
    /// Event 4: a preview image with a JSON header naming its node and prompt.
    PreviewWithMetadata {
        /// Header fields.
        metadata: PreviewMetadata,
        /// Encoded image.
        data: Bytes,
    },
    /// Any other event type (custom nodes send their own).
    Unknown {
        /// The event type.
        event: u32,
        /// Payload after the event type.
        len: usize,
    },
}

/// The JSON header of a binary event 4.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct PreviewMetadata {
    /// Node id.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Prompt id.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// Node id to display.
    #[serde(default)]
    pub display_node_id: Option<String>,
    /// Claimed MIME type.
    #[serde(default)]
    pub image_type: Option<String>,
}

/// Why a binary frame could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// A length field points past the end of the frame.
    #[error("binary frame too short: need {need} bytes, have {have}")]
    TooShort {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A text or JSON part is invalid.
    #[error("binary frame event {event}: {reason}")]
    Invalid {
        /// Event type.
        event: u32,
        /// What was wrong.
        reason: String,
    },
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, FrameError> {
    let end = at.checked_add(4).ok_or(FrameError::TooShort {
        need: usize::MAX,
        have: bytes.len(),
    })?;
    let slice = bytes.get(at..end).ok_or(FrameError::TooShort {
        need: end,
        have: bytes.len(),
    })?;
    let mut word = [0u8; 4];
    word.copy_from_slice(slice);
    Ok(u32::from_be_bytes(word))
}

fn image_mime(data: &[u8], claimed: Option<&str>) -> &'static str {
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if data.starts_with(&[0x89, b'P', b'N', b'G']) {
        "image/png"
    } else if data.len() >= 12 && &data[0..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        "image/webp"
    } else {
        match claimed {
            Some("image/png") => "image/png",
            Some("image/jpeg") => "image/jpeg",
            _ => "application/octet-stream",
        }
    }
}

impl BinaryFrame {
    /// Decodes one binary frame; never panics on short or garbled input.
    pub fn parse(frame: &[u8]) -> Result<BinaryFrame, FrameError> {
        let event = read_u32(frame, 0)?;
        let payload = &frame[4..];
        match event {
            1 => {
                let format = read_u32(payload, 0)?;
                let data = &payload[4..];
                let claimed = match format {
                    1 => Some("image/jpeg"),
                    2 => Some("image/png"),
                    _ => None,
                };
                Ok(BinaryFrame::Preview {
                    mime: image_mime(data, claimed),
                    data: Bytes::copy_from_slice(data),
                })
            }
            3 => {
                let n = read_u32(payload, 0)? as usize;
                let rest = &payload[4..];
                let node = rest.get(..n).ok_or(FrameError::TooShort {
                    need: n + 8,
                    have: frame.len(),
                })?;
                let node_id = std::str::from_utf8(node).map_err(|e| FrameError::Invalid {
                    event,
                    reason: format!("node id is not UTF-8: {e}"),
                })?;
                let text = String::from_utf8_lossy(&rest[n..]).into_owned();
                Ok(BinaryFrame::Text {
                    node_id: node_id.to_owned(),
                    text,
                })
            }
            4 => {
                let m = read_u32(payload, 0)? as usize;
                let rest = &payload[4..];
                let header = rest.get(..m).ok_or(FrameError::TooShort {
                    need: m + 8,
                    have: frame.len(),
                })?;
                let metadata: PreviewMetadata =
                    serde_json::from_slice(header).map_err(|e| FrameError::Invalid {
                        event,
                        reason: format!("metadata is not JSON: {e}"),
                    })?;
                let data = &rest[m..];
                Ok(BinaryFrame::PreviewWithMetadata {
                    metadata,
                    data: Bytes::copy_from_slice(data),
                })
            }
            _ => Ok(BinaryFrame::Unknown {
                event,
                len: payload.len(),
            }),
        }
    }

    /// MIME type of the image in a preview frame, from its magic bytes.
    pub fn image_mime(&self) -> Option<&'static str> {
        match self {
            BinaryFrame::Preview { mime, .. } => Some(mime),
            BinaryFrame::PreviewWithMetadata { metadata, data } => {
                Some(image_mime(data, metadata.image_type.as_deref()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_with_data_are_kept() {
        let ev = WsEvent::parse(r#"{"type":"crystools.monitor","data":{"cpu":3}}"#).unwrap();
        assert_eq!(ev.kind(), "crystools.monitor");
        assert!(matches!(ev, WsEvent::Unknown { .. }));
    }

    #[test]
    fn known_type_with_bad_payload_is_malformed_not_unknown() {
        let ev = WsEvent::parse(r#"{"type":"progress","data":{"value":"bad","max":3}}"#).unwrap();
        assert!(matches!(ev, WsEvent::Malformed { ref kind, .. } if kind == "progress"));
    }

    #[test]
    fn executing_has_three_shapes() {
        let connect = WsEvent::parse(r#"{"type":"executing","data":{"node":"5"}}"#).unwrap();
        let done =
            WsEvent::parse(r#"{"type":"executing","data":{"node":null,"prompt_id":"p"}}"#).unwrap();
        let start = WsEvent::parse(
            r#"{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"p"}}"#,
        )
        .unwrap();
        match (connect, done, start) {
            (WsEvent::Executing(a), WsEvent::Executing(b), WsEvent::Executing(c)) => {
                assert_eq!((a.node.as_deref(), a.prompt_id), (Some("5"), None));
                assert_eq!((b.node, b.prompt_id.as_deref()), (None, Some("p")));
                assert_eq!(c.display_node.as_deref(), Some("3"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_with_list_current_inputs_decodes() {
        let ev = WsEvent::parse(
            r#"{"type":"execution_error","data":{"prompt_id":"p","node_id":"2","node_type":"X","executed":[],
            "exception_message":"cycle","exception_type":"DependencyCycleError","traceback":[],"current_inputs":[],"current_outputs":[]}}"#,
        )
        .unwrap();
        assert!(
            matches!(ev, WsEvent::ExecutionError(ref e) if e.current_inputs == Value::Array(vec![]))
        );
    }

    #[test]
    fn binary_frames_are_bounds_checked() {
        assert!(BinaryFrame::parse(&[]).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 1, 0]).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 3, 0, 0, 0, 9, b'a']).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).is_err());
        let text = [&[0, 0, 0, 3, 0, 0, 0, 1][..], b"5hello"].concat();
        assert_eq!(
            BinaryFrame::parse(&text).unwrap(),
            BinaryFrame::Text {
                node_id: "5".into(),
                text: "hello".into()
            }
        );
        let jpeg = [&[0, 0, 0, 1, 0, 0, 0, 1][..], &[0xFF, 0xD8, 0xFF, 0xE0]].concat();
        assert_eq!(
            BinaryFrame::parse(&jpeg).unwrap().image_mime(),
            Some("image/jpeg")
        );
        let meta = br#"{"node_id":"2","prompt_id":"p","image_type":"image/jpeg"}"#;
        let mut with_meta = vec![0, 0, 0, 4];
        with_meta.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        with_meta.extend_from_slice(meta);
        with_meta.extend_from_slice(&[0x89, b'P', b'N', b'G']);
        match BinaryFrame::parse(&with_meta).unwrap() {
            f @ BinaryFrame::PreviewWithMetadata { .. } => {
                assert_eq!(f.image_mime(), Some("image/png"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            BinaryFrame::parse(&[0, 0, 0, 77, 1, 2]).unwrap(),
            BinaryFrame::Unknown { event: 77, len: 2 }
        ));
    }
}
