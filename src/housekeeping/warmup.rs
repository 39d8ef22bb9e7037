//! `WARMUP_WORKFLOW`: one job run before the worker takes its first, so ComfyUI has loaded the
//! models by then. The file is a test input (`{"input": {...}}`, as `test_input.json`), a bare
//! input (`{"workflow": {...}, "images": [...]}`) or a bare API-format workflow. It runs through
//! the same runner as a job ([`crate::runner::Runner::warm_up`]): progress is logged at debug level, the outputs are discarded
//! (only counted), and `CLEANUP_FILES` applies to it like to any job.
//!
//! Its outcome is one log line. A failure (unreadable file, refused workflow, execution error,
//! ComfyUI unreachable) makes the worker unhealthy instead of taking jobs: the serverless worker
//! exits with code 1 after an `unhealthy` ping, and `serve` answers `/health` with 503 and
//! refuses `/run` and `/runsync` with the warm-up's error.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::job::JobFailure;

/// A successful warm-up.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupDone {
    /// How long it took, file reading and ComfyUI's readiness wait included.
    pub elapsed: Duration,
    /// Output files it produced (discarded).
    pub files: usize,
}

/// Where the warm-up is, for `serve`'s `/health`.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmupState {
    /// No `WARMUP_WORKFLOW`.
    Off,
    /// Running: jobs wait.
    Running,
    /// Succeeded.
    Done(WarmupDone),
    /// Failed: the worker is unhealthy and takes no jobs.
    Failed(String),
}

impl WarmupState {
    /// True when jobs may run (no warm-up, or it succeeded).
    pub fn ready(&self) -> bool {
        matches!(self, WarmupState::Off | WarmupState::Done(_))
    }

    /// `{"state": "off"|"running"|"done"|"failed", "elapsed_ms"?, "error"?}`.
    pub fn to_json(&self) -> Value {
        match self {
            WarmupState::Off => json!({"state": "off"}),
            WarmupState::Running => json!({"state": "running"}),
            WarmupState::Done(done) => json!({
                "state": "done",
                "elapsed_ms": done.elapsed.as_millis() as u64,
            }),
            WarmupState::Failed(error) => json!({"state": "failed", "error": error}),
        }
    }
}

/// Reads a warm-up file into a job input.
pub fn load(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read WARMUP_WORKFLOW {}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| format!("WARMUP_WORKFLOW {} is not JSON: {e}", path.display()))?;
    input_of(value).map_err(|why| format!("WARMUP_WORKFLOW {}: {why}", path.display()))
}

/// The job input a warm-up file stands for.
fn input_of(value: Value) -> Result<Value, String> {
    let Value::Object(mut map) = value else {
        return Err(
            "expected a JSON object (a test input, a job input or an API-format workflow)".into(),
        );
    };
    if let Some(input) = map.remove("input") {
        return match input {
            Value::Object(_) => Ok(input),
            _ => Err("`input` is not an object".into()),
        };
    }
    if map.contains_key("workflow") {
        return Ok(Value::Object(map));
    }
    if !map.is_empty() && map.values().all(|node| node.get("class_type").is_some()) {
        return Ok(json!({ "workflow": map }));
    }
    Err("expected {\"input\": {...}}, {\"workflow\": {...}} or an API-format workflow (nodes with class_type)".into())
}

/// A failed warm-up job's error and details on one line (one log line per event).
pub fn one_line_failure(failure: &JobFailure) -> String {
    let mut text = one_line(&failure.message());
    for detail in failure.details().unwrap_or_default() {
        let detail = one_line(detail);
        if !text.contains(&detail) {
            text = format!("{text}; {detail}");
        }
    }
    text
}

/// A multi-line message on one line (one log line per event).
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_shapes() {
        let wf = json!({"1": {"class_type": "EmptyImage", "inputs": {}}});
        assert_eq!(
            input_of(json!({"input": {"workflow": wf}})).unwrap(),
            json!({"workflow": wf})
        );
        assert_eq!(
            input_of(json!({"workflow": wf, "images": []})).unwrap(),
            json!({"workflow": wf, "images": []})
        );
        assert_eq!(input_of(wf.clone()).unwrap(), json!({"workflow": wf}));
    }

    #[test]
    fn refuses_other_shapes_with_a_reason() {
        for bad in [
            json!([1]),
            json!({}),
            json!({"input": "x"}),
            json!({"1": {"inputs": {}}}),
        ] {
            assert!(input_of(bad.clone()).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = load(&dir.path().join("none.json")).unwrap_err();
        assert!(missing.contains("cannot read WARMUP_WORKFLOW"), "{missing}");
        let file = dir.path().join("bad.json");
        std::fs::write(&file, "{nope").unwrap();
        assert!(load(&file).unwrap_err().contains("is not JSON"));
    }

    #[test]
    fn messages_fit_one_line() {
        assert_eq!(
            one_line("Workflow validation failed:\n• Node 1: bad\n\n"),
            "Workflow validation failed: • Node 1: bad"
        );
    }

    #[test]
    fn state_json() {
        assert_eq!(WarmupState::Off.to_json()["state"], "off");
        assert!(WarmupState::Off.ready() && !WarmupState::Running.ready());
        let failed = WarmupState::Failed("warm-up failed: boom".into());
        assert!(!failed.ready());
        assert_eq!(failed.to_json()["error"], "warm-up failed: boom");
    }
}
