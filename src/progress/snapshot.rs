//! A progress snapshot: what every front end shows or forwards of a running job. It is a
//! superset of the payload proposed upstream for worker-comfyui (`{"type": "progress", "value",
//! "max", "percent", "node"}`), so clients written for that keep working.

use serde::{Serialize, Serializer};

/// What a snapshot reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressKind {
    /// Waiting for ComfyUI to answer at all (starting, restarting or unreachable); `message`
    /// says where and for how long.
    Waiting,
    /// Downloading a model the job brings (`input.models`), before the prompt is queued:
    /// `value`/`max` are bytes, `message` names the file.
    Downloading,
    /// Waiting in ComfyUI's queue.
    Queued,
    /// Execution began.
    Started,
    /// Nodes served from the cache.
    Cached,
    /// A node started.
    Executing,
    /// A node loads its models (`step` is `Loading models`); reported by today's ComfyUI.
    Loading,
    /// A sampler-like step.
    Progress,
    /// A node produced output.
    Executed,
    /// A node failed.
    Error,
    /// The prompt was interrupted.
    Interrupted,
    /// The prompt finished; outputs are being collected.
    Finished,
}

/// A number that serialises as an integer when it is whole (ComfyUI sends `1` and `1.0` alike).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Num(pub f64);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
            s.serialize_i64(v as i64)
        } else {
            s.serialize_f64(v)
        }
    }
}

/// One progress report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressSnapshot {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: ProgressKind,
    /// Steps done in the current node.
    pub value: Num,
    /// Steps of the current node.
    pub max: Num,
    /// `value / max` in percent, one decimal.
    pub percent: f64,
    /// Current node id.
    pub node: Option<String>,
    /// Its class type.
    pub node_type: Option<String>,
    /// Human name of what the node does ("Sampling", "Decoding", ...), else its class type.
    pub step: Option<String>,
    /// For a node inside a subgraph (an id like `12:3`), the title the user sees (its
    /// `_meta.title`, else its class type); absent for other nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Percent of the workflow done, never decreasing. Cached nodes count as done; each node weighs
    /// 1 plus its `steps` input, so sampling dominates as it does in wall time.
    pub overall_percent: f64,
    /// Nodes finished or cached.
    pub nodes_done: usize,
    /// Nodes in the workflow.
    pub nodes_total: usize,
    /// Nodes served from the cache.
    pub nodes_cached: usize,
    /// Seconds left in the current node, from its step rate.
    pub eta_seconds: Option<f64>,
    /// Seconds since the job started.
    pub elapsed_seconds: f64,
    /// ComfyUI prompt id.
    pub prompt_id: Option<String>,
    /// Prompts in ComfyUI's queue (pending plus running), when known.
    pub queue_remaining: Option<u64>,
    /// Prompts ahead of ours (0 = ours runs), while queued.
    pub queue_position: Option<usize>,
    /// Error or interrupt text for `error` / `interrupted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ProgressSnapshot {
    /// Before the prompt is queued: the job waits for ComfyUI to answer (`message` says where,
    /// why and for how long).
    pub fn waiting(message: String, elapsed: std::time::Duration) -> ProgressSnapshot {
        ProgressSnapshot {
            kind: ProgressKind::Waiting,
            value: Num(0.0),
            max: Num(1.0),
            percent: 0.0,
            node: None,
            node_type: None,
            step: None,
            title: None,
            overall_percent: 0.0,
            nodes_done: 0,
            nodes_total: 0,
            nodes_cached: 0,
            eta_seconds: None,
            elapsed_seconds: (elapsed.as_secs_f64() * 100.0).round() / 100.0,
            prompt_id: None,
            queue_remaining: None,
            queue_position: None,
            message: Some(message),
        }
    }

    /// Before the prompt is queued: a model the job brings is downloading (`done` of `total`
    /// bytes, when announced).
    pub fn downloading(
        name: &str,
        done: u64,
        total: Option<u64>,
        elapsed: std::time::Duration,
    ) -> ProgressSnapshot {
        let max = total.unwrap_or(0) as f64;
        let percent = if max > 0.0 {
            ((done as f64 / max * 1000.0).round() / 10.0).min(100.0)
        } else {
            0.0
        };
        ProgressSnapshot {
            kind: ProgressKind::Downloading,
            value: Num(done as f64),
            max: Num(max),
            percent,
            step: Some("Downloading model".to_owned()),
            message: Some(format!("downloading model {name}")),
            ..ProgressSnapshot::waiting(String::new(), elapsed)
        }
    }

    /// The snapshot as a JSON value (what the platform's `/status` shows as `output`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
