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

use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// Why the warm-up failed, which makes the worker unhealthy. Its text (`warm-up failed: …`) is
/// what `/health`, the `unhealthy` ping, Lambda's init error and the logs show.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WarmupError {
    /// The file cannot be read.
    #[error("warm-up failed: cannot read WARMUP_WORKFLOW {}: {source}", path.display())]
    Unreadable {
        /// `WARMUP_WORKFLOW`.
        path: PathBuf,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// The file is not JSON.
    #[error("warm-up failed: WARMUP_WORKFLOW {} is not JSON: {source}", path.display())]
    NotJson {
        /// `WARMUP_WORKFLOW`.
        path: PathBuf,
        /// Where and why.
        source: Arc<serde_json::Error>,
    },
    /// The file is JSON, but not a job input.
    #[error("warm-up failed: WARMUP_WORKFLOW {}: {shape}", path.display())]
    NotAnInput {
        /// `WARMUP_WORKFLOW`.
        path: PathBuf,
        /// What is wrong with it.
        shape: ShapeError,
    },
    /// The warm-up job failed (its error and details on one line).
    #[error("warm-up failed: {}", one_line_failure(.0))]
    Job(JobFailure),
}

/// Why a warm-up file's JSON is not a job input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Not an object.
    #[error("expected a JSON object (a test input, a job input or an API-format workflow)")]
    NotAnObject,
    /// A test input whose `input` is not an object.
    #[error("`input` is not an object")]
    InputNotAnObject,
    /// An object of none of the three shapes.
    #[error("expected {{\"input\": {{...}}}}, {{\"workflow\": {{...}}}} or an API-format workflow (nodes with class_type)")]
    Unknown,
}

/// Where the warm-up is, for `serve`'s `/health`.
#[derive(Debug, Clone)]
pub enum WarmupState {
    /// No `WARMUP_WORKFLOW`.
    Off,
    /// Running: jobs wait.
    Running,
    /// Succeeded.
    Done(WarmupDone),
    /// Failed: the worker is unhealthy and takes no jobs.
    Failed(WarmupError),
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
            WarmupState::Failed(error) => {
                json!({"state": "failed", "error": error.to_string()})
            }
        }
    }
}

/// Reads a warm-up file into a job input.
pub fn load(path: &Path) -> Result<Value, WarmupError> {
    let text = std::fs::read_to_string(path).map_err(|e| WarmupError::Unreadable {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| WarmupError::NotJson {
        path: path.to_owned(),
        source: Arc::new(e),
    })?;
    input_of(value).map_err(|shape| WarmupError::NotAnInput {
        path: path.to_owned(),
        shape,
    })
}

/// The job input a warm-up file stands for.
fn input_of(value: Value) -> Result<Value, ShapeError> {
    let Value::Object(mut map) = value else {
        return Err(ShapeError::NotAnObject);
    };
    if let Some(input) = map.remove("input") {
        return match input {
            Value::Object(_) => Ok(input),
            _ => Err(ShapeError::InputNotAnObject),
        };
    }
    if map.contains_key("workflow") {
        return Ok(Value::Object(map));
    }
    if !map.is_empty() && map.values().all(|node| node.get("class_type").is_some()) {
        return Ok(json!({ "workflow": map }));
    }
    Err(ShapeError::Unknown)
}

/// A failed warm-up job's error and details on one line (one log line per event).
fn one_line_failure(failure: &JobFailure) -> String {
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
        assert_eq!(input_of(json!([1])), Err(ShapeError::NotAnObject));
        assert_eq!(
            input_of(json!({"input": 1})),
            Err(ShapeError::InputNotAnObject)
        );
        assert_eq!(input_of(json!({})), Err(ShapeError::Unknown));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.json");
        let missing = load(&path).unwrap_err();
        assert!(
            matches!(missing, WarmupError::Unreadable { .. }),
            "{missing:?}"
        );
        assert_eq!(
            missing.to_string(),
            format!(
                "warm-up failed: cannot read WARMUP_WORKFLOW {}: No such file or directory (os error 2)",
                path.display()
            )
        );
        let file = dir.path().join("bad.json");
        std::fs::write(&file, "{nope").unwrap();
        let bad = load(&file).unwrap_err();
        assert!(matches!(bad, WarmupError::NotJson { .. }), "{bad:?}");
        assert_eq!(
            bad.to_string(),
            format!(
                "warm-up failed: WARMUP_WORKFLOW {} is not JSON: key must be a string at line 1 column 2",
                file.display()
            )
        );
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(
            load(&file).unwrap_err().to_string(),
            format!(
                "warm-up failed: WARMUP_WORKFLOW {}: expected {{\"input\": {{...}}}}, {{\"workflow\": {{...}}}} or an API-format workflow (nodes with class_type)",
                file.display()
            )
        );
    }

    #[test]
    fn shape_messages() {
        assert_eq!(
            ShapeError::NotAnObject.to_string(),
            "expected a JSON object (a test input, a job input or an API-format workflow)"
        );
        assert_eq!(
            ShapeError::InputNotAnObject.to_string(),
            "`input` is not an object"
        );
        assert_eq!(
            ShapeError::Unknown.to_string(),
            r#"expected {"input": {...}}, {"workflow": {...}} or an API-format workflow (nodes with class_type)"#
        );
    }

    #[test]
    fn a_failed_job_is_one_line() {
        let failure = JobFailure::NodeError(crate::job::Report::with_details(
            "Workflow execution error:\n  Node 2 failed",
            vec!["Node 2 failed".into(), "out of memory".into()],
        ));
        assert_eq!(
            WarmupError::Job(failure).to_string(),
            "warm-up failed: Workflow execution error: Node 2 failed; out of memory"
        );
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
        let failed = WarmupState::Failed(WarmupError::NotAnInput {
            path: "w.json".into(),
            shape: ShapeError::InputNotAnObject,
        });
        assert!(!failed.ready());
        assert_eq!(
            failed.to_json(),
            json!({"state": "failed", "error": "warm-up failed: WARMUP_WORKFLOW w.json: `input` is not an object"})
        );
    }
}
