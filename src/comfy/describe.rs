//! ComfyUI's WebSocket events as readable one-line descriptions: the one place they are worded.
//!
//! [`Describer`] turns a [`WsEvent`] or [`BinaryFrame`] into a [`Line`] (`kind` + text, plus
//! detail lines for a traceback). It knows the workflow (node id → class type and `_meta.title`)
//! and keeps the little state the lines need: the running node (previews without ids belong to
//! it) and the current node's first step, for the ETA (computed by [`crate::progress::step_eta`]).
//! `comfy-worker watch` prints these lines with a timestamp ([`clock`]); the prompt watcher
//! (`comfy/run.rs`) logs the same lines at debug level for its own prompts. Binary payloads are
//! described by format and size, never shown.

use std::collections::HashMap;
use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::messages::{BinaryFrame, WsEvent};
use super::workflow::Workflow;

/// Longest text (a node's message, a custom message's data) shown in a line, in characters.
const MAX_TEXT: usize = 200;

/// One described event.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// A short label: `status`, `start`, `cached`, `executing`, `progress`, `executed`,
    /// `success`, `error`, `interrupted`, `done`, `preview`, `text`, `binary`, `features`,
    /// `other`, `malformed`.
    pub kind: &'static str,
    /// What happened.
    pub text: String,
    /// Further lines (an error's traceback).
    pub detail: Vec<String>,
}

impl Line {
    fn new(kind: &'static str, text: String) -> Line {
        Line {
            kind,
            text,
            detail: Vec::new(),
        }
    }

    /// The line as printed by `watch`: `kind` padded to a column, then the text; detail lines
    /// follow, indented under the text.
    pub fn to_lines(&self, prefix: &str) -> Vec<String> {
        let mut out = vec![format!("{prefix}{:<11} {}", self.kind, self.text)];
        let indent = " ".repeat(prefix.chars().count() + 12);
        out.extend(self.detail.iter().map(|d| format!("{indent}{d}")));
        out
    }
}

/// One line (details joined with ` | `), for logs.
impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.text)?;
        for d in &self.detail {
            write!(f, " | {d}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct NodeLabel {
    class_type: Option<String>,
    title: Option<String>,
}

#[derive(Debug, Clone)]
struct StepClock {
    node: String,
    last_value: f64,
    first: (f64, Instant),
    node_started: Instant,
}

/// Describes events; one per stream (it keeps the running node and step timing).
#[derive(Debug, Clone, Default)]
pub struct Describer {
    labels: HashMap<String, NodeLabel>,
    /// The prompt the labels belong to, when known; events of other prompts get bare node ids
    /// (node ids repeat across workflows). A describer made [`Describer::for_workflow`] takes
    /// the first prompt that starts on its socket: `execution_start` goes only to the client
    /// that queued the prompt.
    labels_for: Option<String>,
    /// The running node and when it started.
    current: Option<(String, Instant)>,
    step: Option<StepClock>,
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= MAX_TEXT {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX_TEXT).collect::<String>())
    }
}

/// Several lines of text on one line.
fn one_line(s: &str) -> String {
    clip(&s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A duration in seconds, short: `4.2s`, `1m05s`, `2h03m`.
pub fn short_duration(seconds: f64) -> String {
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// A step count: `5`, or `2.5` / `0.33` for nodes that report fractions.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// `HH:MM:SS.mmm` (UTC) of a moment, the timestamp `watch` puts before each line.
pub fn clock(at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let day_ms = (ms % 86_400_000) as u64;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        (day_ms / 60_000) % 60,
        (day_ms / 1000) % 60,
        day_ms % 1000
    )
}

/// `→ 2 image(s), 1 text(s)` for a node's UI output.
fn outputs(output: Option<&Map<String, Value>>) -> String {
    let Some(output) = output else {
        return "(no output)".to_owned();
    };
    let mut parts = Vec::new();
    for (key, value) in output {
        let Some(list) = value.as_array() else {
            continue;
        };
        if list.is_empty() || key == "animated" {
            continue;
        }
        let n = list.len();
        let temp = key == "images"
            && list
                .iter()
                .all(|f| f.get("type").and_then(Value::as_str) == Some("temp"));
        let what = match key.as_str() {
            "images" if temp => "preview image(s)".to_owned(),
            "images" => "image(s)".to_owned(),
            "gifs" | "videos" => "video(s)".to_owned(),
            "audio" => "audio file(s)".to_owned(),
            "text" => "text(s)".to_owned(),
            other => format!("{other} item(s)"),
        };
        parts.push(format!("{n} {what}"));
    }
    if parts.is_empty() {
        "(no output)".to_owned()
    } else {
        format!("→ {}", parts.join(", "))
    }
}

/// ` 64×64` for an image whose size its header tells (JPEG, PNG, WebP), else nothing.
fn dimensions(data: &[u8]) -> String {
    imagesize::blob_size(data)
        .map(|s| format!(" {}×{}", s.width, s.height))
        .unwrap_or_default()
}

fn short_mime(mime: &str) -> &str {
    mime.strip_prefix("image/").unwrap_or(mime)
}

impl Describer {
    /// A describer that knows no workflow (node ids only).
    pub fn new() -> Describer {
        Describer::default()
    }

    /// A describer that labels nodes with `workflow`'s class types and titles.
    pub fn for_workflow(workflow: &Workflow) -> Describer {
        let mut d = Describer::new();
        d.learn(workflow.as_json(), None);
        d
    }

    /// Labels nodes from an API-format graph (replacing earlier labels), e.g. a broadcast
    /// prompt's workflow read from `/queue`.
    pub fn learn(&mut self, graph: &Map<String, Value>, prompt_id: Option<&str>) {
        self.labels = graph
            .iter()
            .map(|(id, node)| {
                let class_type = node
                    .get("class_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let title = node
                    .get("_meta")
                    .and_then(|m| m.get("title"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                (id.clone(), NodeLabel { class_type, title })
            })
            .collect();
        self.labels_for = prompt_id.map(str::to_owned);
    }

    /// True when the labels are those of `prompt_id`'s workflow.
    pub fn knows(&self, prompt_id: &str) -> bool {
        self.labels_for.as_deref() == Some(prompt_id)
    }

    /// `2 KSampler "Sampler"`: the id, the class type and the title when it says more.
    pub fn node(&self, id: &str) -> String {
        self.node_of(id, None)
    }

    /// [`Describer::node`] for a node of `prompt_id`: the bare id when the labels belong to
    /// another prompt.
    fn node_of(&self, id: &str, prompt_id: Option<&str>) -> String {
        let foreign = matches!((prompt_id, &self.labels_for), (Some(p), Some(l)) if p != l);
        let label = if foreign { None } else { self.labels.get(id) };
        let Some(label) = label else {
            return id.to_owned();
        };
        let mut out = id.to_owned();
        if let Some(c) = &label.class_type {
            out.push(' ');
            out.push_str(c);
        }
        if let Some(t) = &label.title {
            if Some(t) != label.class_type.as_ref() && !t.trim().is_empty() {
                out.push_str(&format!(" \"{}\"", one_line(t)));
            }
        }
        out
    }

    fn node_or_type(
        &self,
        id: Option<&str>,
        node_type: Option<&str>,
        prompt_id: Option<&str>,
    ) -> String {
        match (id, node_type) {
            (Some(id), _) if self.node_of(id, prompt_id) != id => self.node_of(id, prompt_id),
            (Some(id), Some(t)) if !t.is_empty() => format!("{id} {t}"),
            (Some(id), _) => id.to_owned(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => "?".to_owned(),
        }
    }

    /// Describes a text event received at `at`; `None` for `progress_state`, which repeats
    /// what `executing`, `progress` and `executed` say (it is in `watch --json`).
    pub fn event(&mut self, ev: &WsEvent, at: Instant) -> Option<Line> {
        let pid = |p: &Option<String>| p.clone().unwrap_or_else(|| "?".to_owned());
        if let WsEvent::ExecutionStart(s) = ev {
            if self.labels_for.is_none() && !self.labels.is_empty() {
                self.labels_for = s.prompt_id.clone();
            }
        }
        let of = ev.prompt_id();
        Some(match ev {
            WsEvent::Status(s) => {
                let remaining = s.status.exec_info.queue_remaining;
                let queue = format!("queue: {remaining} prompt(s) pending or running");
                match &s.sid {
                    Some(sid) => Line::new("status", format!("connected as {sid}; {queue}")),
                    None => Line::new("status", queue),
                }
            }
            WsEvent::FeatureFlags(flags) => {
                let list: Vec<String> = flags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                Line::new("features", clip(&list.join(" ")))
            }
            WsEvent::ExecutionStart(s) => {
                self.current = None;
                self.step = None;
                Line::new("start", format!("prompt {}", pid(&s.prompt_id)))
            }
            WsEvent::ExecutionCached(c) => {
                let text = if c.nodes.is_empty() {
                    "no cached nodes".to_owned()
                } else {
                    format!("{} cached node(s): {}", c.nodes.len(), c.nodes.join(", "))
                };
                Line::new("cached", text)
            }
            WsEvent::Executing(e) => match &e.node {
                Some(node) => {
                    if self.current.as_ref().map(|c| c.0.as_str()) != Some(node.as_str()) {
                        self.current = Some((node.clone(), at));
                    }
                    let mut text = self.node_of(node, of);
                    if e.prompt_id.is_none() {
                        text.push_str(" (prompt not named: sent on connect)");
                    }
                    Line::new("executing", text)
                }
                None => {
                    self.current = None;
                    self.step = None;
                    Line::new("done", format!("prompt {}", pid(&e.prompt_id)))
                }
            },
            WsEvent::Progress(p) => {
                let node = p
                    .node
                    .clone()
                    .or_else(|| self.current.as_ref().map(|c| c.0.clone()));
                let eta = node
                    .as_deref()
                    .and_then(|n| self.step(n, p.value, p.max, at));
                let percent = if p.max > 0.0 {
                    100.0 * p.value / p.max
                } else {
                    0.0
                };
                let mut text = match &node {
                    Some(n) => format!("{}: ", self.node_of(n, of)),
                    None => String::new(),
                };
                text.push_str(&format!(
                    "{}/{} ({percent:.1}%)",
                    number(p.value),
                    number(p.max)
                ));
                if let Some(eta) = eta.filter(|_| p.value < p.max) {
                    text.push_str(&format!(", ETA {}", short_duration(eta)));
                }
                Line::new("progress", text)
            }
            WsEvent::ProgressState(_) => return None,
            WsEvent::Executed(e) => Line::new(
                "executed",
                format!(
                    "{} {}",
                    self.node_of(&e.node, of),
                    outputs(e.output.as_ref())
                ),
            ),
            WsEvent::ExecutionSuccess(s) => {
                Line::new("success", format!("prompt {}", pid(&s.prompt_id)))
            }
            WsEvent::ExecutionError(e) => {
                let who = self.node_or_type(e.node_id.as_deref(), e.node_type.as_deref(), of);
                let mut line = if e.is_blocked_variant() {
                    Line::new(
                        "blocked",
                        format!(
                            "{who}: {} (execution continues)",
                            one_line(&e.exception_message)
                        ),
                    )
                } else {
                    Line::new(
                        "error",
                        format!(
                            "{who} raised {}: {}",
                            if e.exception_type.is_empty() {
                                "an exception"
                            } else {
                                e.exception_type.as_str()
                            },
                            one_line(&e.exception_message)
                        ),
                    )
                };
                line.detail = e
                    .traceback
                    .iter()
                    .flat_map(|t| t.lines())
                    .map(|l| l.trim_end().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect();
                line
            }
            WsEvent::ExecutionInterrupted(i) => {
                let mut text = format!("prompt {}", pid(&i.prompt_id));
                if i.node_id.is_some() || i.node_type.is_some() {
                    text.push_str(&format!(
                        " at node {}",
                        self.node_or_type(i.node_id.as_deref(), i.node_type.as_deref(), of)
                    ));
                }
                Line::new("interrupted", text)
            }
            WsEvent::Unknown { kind, data } => {
                let text = match data.as_object() {
                    Some(o) if !o.is_empty() => format!(
                        "{kind} (keys: {})",
                        clip(&o.keys().cloned().collect::<Vec<_>>().join(", "))
                    ),
                    _ => clip(kind),
                };
                Line::new("other", text)
            }
            WsEvent::Malformed { kind, error } => {
                Line::new("malformed", format!("{kind}: {}", clip(error)))
            }
        })
    }

    /// Records a step; returns the ETA.
    fn step(&mut self, node: &str, value: f64, max: f64, at: Instant) -> Option<f64> {
        let fresh = match &self.step {
            Some(s) => s.node != node || value < s.last_value,
            None => true,
        };
        if fresh {
            let node_started = match &self.current {
                Some((n, t)) if n == node => *t,
                _ => at,
            };
            self.step = Some(StepClock {
                node: node.to_owned(),
                last_value: value,
                first: (value, at),
                node_started,
            });
        }
        let s = self.step.as_mut()?;
        s.last_value = value;
        crate::eta::step_eta(s.first, s.node_started, value, max, at)
    }

    /// Describes a binary frame: its type, format, image size and byte count, never its bytes.
    pub fn binary(&self, frame: &BinaryFrame) -> Line {
        match frame {
            BinaryFrame::Preview { mime, data } => {
                let mut text = format!(
                    "{}{}, {} bytes",
                    short_mime(mime),
                    dimensions(data),
                    data.len()
                );
                if let Some((node, _)) = &self.current {
                    text.push_str(&format!(" (running: {})", self.node(node)));
                }
                Line::new("preview", text)
            }
            BinaryFrame::PreviewWithMetadata { metadata, data } => {
                let mime = frame.image_mime().unwrap_or("application/octet-stream");
                let mut text = format!(
                    "{}{}, {} bytes",
                    short_mime(mime),
                    dimensions(data),
                    data.len()
                );
                if let Some(node) = &metadata.node_id {
                    let of = metadata.prompt_id.as_deref();
                    text.push_str(&format!(" from node {}", self.node_of(node, of)));
                }
                if let Some(p) = &metadata.prompt_id {
                    text.push_str(&format!(" of prompt {p}"));
                }
                Line::new("preview", text)
            }
            BinaryFrame::Text { node_id, text } => Line::new(
                "text",
                format!("{}: \"{}\"", self.node(node_id), one_line(text)),
            ),
            BinaryFrame::Unknown { event, len } => {
                Line::new("binary", format!("event {event}, {len} bytes"))
            }
        }
    }
}

/// A binary frame as the JSON object `watch --json` prints in its place.
pub fn binary_summary(frame: &BinaryFrame) -> Value {
    let inner = match frame {
        BinaryFrame::Preview { mime, data } => serde_json::json!({
            "type": 1, "format": short_mime(mime), "bytes": data.len(),
        }),
        BinaryFrame::PreviewWithMetadata { metadata, data } => serde_json::json!({
            "type": 4,
            "format": short_mime(frame.image_mime().unwrap_or("application/octet-stream")),
            "bytes": data.len(),
            "node_id": metadata.node_id,
            "prompt_id": metadata.prompt_id,
        }),
        BinaryFrame::Text { node_id, text } => serde_json::json!({
            "type": 3, "node_id": node_id, "text": text,
        }),
        BinaryFrame::Unknown { event, len } => serde_json::json!({
            "type": event, "bytes": len,
        }),
    };
    serde_json::json!({ "binary": inner })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::comfy::messages::PreviewMetadata;

    fn ev(text: &str) -> WsEvent {
        WsEvent::parse(text).unwrap()
    }

    fn describer() -> Describer {
        let wf = Workflow::from_value(serde_json::json!({
            "3": {"class_type": "KSampler", "inputs": {"steps": 4}, "_meta": {"title": "Main sampler"}},
            "9": {"class_type": "SaveImage", "inputs": {}, "_meta": {"title": "SaveImage"}},
        }))
        .unwrap();
        Describer::for_workflow(&wf)
    }

    #[test]
    fn nodes_get_class_and_title_and_steps_an_eta() {
        let mut d = describer();
        let t0 = Instant::now();
        let l = d
            .event(
                &ev(r#"{"type":"executing","data":{"node":"3","prompt_id":"p"}}"#),
                t0,
            )
            .unwrap();
        assert_eq!(l.to_string(), r#"executing 3 KSampler "Main sampler""#);
        let step = |d: &mut Describer, v: u32, after_ms: u64| {
            d.event(
                &ev(&format!(
                    r#"{{"type":"progress","data":{{"value":{v},"max":4,"prompt_id":"p","node":"3"}}}}"#
                )),
                t0 + Duration::from_millis(after_ms),
            )
            .unwrap()
            .text
        };
        assert_eq!(
            step(&mut d, 1, 500),
            r#"3 KSampler "Main sampler": 1/4 (25.0%), ETA 1.5s"#
        );
        assert_eq!(
            step(&mut d, 2, 1500),
            r#"3 KSampler "Main sampler": 2/4 (50.0%), ETA 2.0s"#
        );
        assert_eq!(
            step(&mut d, 4, 2500),
            r#"3 KSampler "Main sampler": 4/4 (100.0%)"#
        );
        let l = d
            .event(
                &ev(r#"{"type":"executed","data":{"node":"9","output":{"images":[{"filename":"a.png","type":"output"},{"filename":"b.png","type":"output"}]},"prompt_id":"p"}}"#),
                t0,
            )
            .unwrap();
        assert_eq!(l.to_string(), "executed 9 SaveImage → 2 image(s)");
    }

    #[test]
    fn errors_carry_their_traceback_and_previews_only_their_size() {
        let mut d = describer();
        let l = d
            .event(
                &ev(r#"{"type":"execution_error","data":{"prompt_id":"p","node_id":"9","node_type":"SaveImage","exception_message":"disk full\n","exception_type":"OSError","traceback":["  File \"a.py\", line 1\n    x()\n"]}}"#),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(l.kind, "error");
        assert_eq!(l.text, "9 SaveImage raised OSError: disk full");
        assert_eq!(l.detail, vec!["  File \"a.py\", line 1", "    x()"]);
        assert_eq!(
            l.to_lines("T  ")[1],
            format!("{}  File \"a.py\", line 1", " ".repeat(15))
        );
        let frame = BinaryFrame::PreviewWithMetadata {
            metadata: PreviewMetadata {
                node_id: Some("3".into()),
                prompt_id: Some("p".into()),
                ..PreviewMetadata::default()
            },
            data: Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0]),
        };
        assert_eq!(
            d.binary(&frame).to_string(),
            r#"preview jpeg, 6 bytes from node 3 KSampler "Main sampler" of prompt p"#
        );
        assert_eq!(
            binary_summary(&frame)["binary"],
            serde_json::json!({"type": 4, "format": "jpeg", "bytes": 6, "node_id": "3", "prompt_id": "p"})
        );
        // An image whose header tells its size: the line says it.
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&[0, 0, 0, 64, 0, 0, 0, 48, 8, 2, 0, 0, 0]);
        let frame = BinaryFrame::Preview {
            mime: "image/png",
            data: Bytes::from(png),
        };
        assert_eq!(d.binary(&frame).to_string(), "preview png 64×48, 29 bytes");
    }

    #[test]
    fn labels_apply_to_the_first_prompt_started_not_to_others() {
        let mut d = describer();
        let at = Instant::now();
        let start = ev(r#"{"type":"execution_start","data":{"prompt_id":"ours"}}"#);
        d.event(&start, at).unwrap();
        let step = |p: &str| {
            ev(&format!(
                r#"{{"type":"progress","data":{{"value":1,"max":4,"prompt_id":"{p}","node":"3"}}}}"#
            ))
        };
        assert!(d
            .event(&step("ours"), at)
            .unwrap()
            .text
            .starts_with("3 KSampler"));
        assert!(d
            .event(&step("theirs"), at)
            .unwrap()
            .text
            .starts_with("3: 1/4"));
        let mut broadcast = Describer::new();
        broadcast.learn(
            serde_json::json!({"3": {"class_type": "Upscale"}})
                .as_object()
                .unwrap(),
            Some("theirs"),
        );
        assert!(broadcast.knows("theirs"));
        assert!(broadcast
            .event(&step("theirs"), at)
            .unwrap()
            .text
            .starts_with("3 Upscale: "));
    }

    #[test]
    fn unknown_messages_show_keys_not_data() {
        let mut d = Describer::new();
        let l = d
            .event(
                &ev(r#"{"type":"crystools.monitor","data":{"cpu":3,"blob":"AAAA"}}"#),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(l.to_string(), "other crystools.monitor (keys: cpu, blob)");
        assert!(d
            .event(
                &ev(r#"{"type":"progress_state","data":{"prompt_id":"p","nodes":{}}}"#),
                Instant::now()
            )
            .is_none());
    }

    #[test]
    fn clock_and_durations() {
        let at = UNIX_EPOCH + Duration::from_millis(86_400_000 * 3 + 45_296_789);
        assert_eq!(clock(at), "12:34:56.789");
        assert_eq!(short_duration(4.24), "4.2s");
        assert_eq!(short_duration(65.0), "1m05s");
        assert_eq!(short_duration(7380.0), "2h03m");
        assert_eq!(
            [number(5.0), number(2.5), number(0.1 + 0.2)],
            ["5", "2.5", "0.3"]
        );
    }
}
