//! What the job store keeps of a job submitted through the Comfy API v2 surface, beside what
//! every local job has: its wall-clock creation time, labels, the graph it runs, its outputs as
//! assets (filled in as nodes finish), the latest progress and preview, and how it ended in the
//! contract's terms.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::stamp::rfc3339;
use crate::comfy::ExecutionFailure;

/// The v2 part of a job in the store.
#[derive(Debug)]
pub(crate) struct V2Job {
    /// When it was submitted (wall clock; the store's instants are monotonic).
    pub(crate) created: SystemTime,
    /// `metadata`, as submitted (a map of labels, or a string).
    pub(crate) metadata: Option<Value>,
    /// The graph it runs (asset references resolved), and in which shape.
    pub(crate) workflow: Arc<Value>,
    pub(crate) format: WorkflowFormat,
    /// Its outputs, in the order they were committed.
    pub(crate) outputs: Vec<Arc<V2Output>>,
    /// The latest `Progress` object.
    pub(crate) progress: Option<Arc<Value>>,
    /// The latest `preview` event payload.
    pub(crate) preview: Option<Arc<Value>>,
    /// The node failure ComfyUI reported, if any (its end is then `failed`, even with outputs).
    pub(crate) node_failure: Option<ExecutionFailure>,
    /// The `JobError` object once it ended badly.
    pub(crate) error: Option<Arc<Value>>,
    /// True once nothing runs for it any more: the runner is done with it (or it never started).
    pub(crate) settled: bool,
    /// Asset blobs it uses as inputs, held until it is settled.
    pub(crate) pins: Vec<String>,
}

/// The shape of `GET /api/v2/jobs/{id}/workflow`'s `workflow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkflowFormat {
    /// The API-format graph it runs.
    Api,
    /// A UI-format export, converted when the job runs (`SERVE_V2_CONVERT_UI`).
    Save,
}

impl WorkflowFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WorkflowFormat::Api => "api",
            WorkflowFormat::Save => "save",
        }
    }
}

impl V2Job {
    pub(crate) fn new(
        workflow: Value,
        format: WorkflowFormat,
        metadata: Option<Value>,
        pins: Vec<String>,
    ) -> V2Job {
        V2Job {
            created: SystemTime::now(),
            metadata,
            workflow: Arc::new(workflow),
            format,
            outputs: Vec::new(),
            progress: None,
            preview: None,
            node_failure: None,
            error: None,
            settled: false,
            pins,
        }
    }
}

/// One committed output: an asset the job produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct V2Output {
    pub(crate) node_id: String,
    pub(crate) name: String,
    /// `image`, `video`, `audio`, `text`, `file` or `latent`.
    pub(crate) kind: &'static str,
    pub(crate) content_type: String,
    pub(crate) size: u64,
    /// The asset id (`GET /api/v2/assets/{id}/content` serves it).
    pub(crate) asset_id: String,
    /// blake3, lowercase hex.
    pub(crate) hash_hex: String,
    pub(crate) job_id: String,
}

impl V2Output {
    /// The contract's `Output` object; `base` is the origin the client used
    /// (`http://host:port`), `url_expires` when the content URL stops working.
    pub(crate) fn to_json(&self, base: &str, url_expires: SystemTime) -> Value {
        json!({
            "node_id": self.node_id,
            "name": self.name,
            "type": self.kind,
            "content_type": self.content_type,
            "size_bytes": self.size,
            "id": self.asset_id,
            "hash": format!("blake3:{}", self.hash_hex),
            "url": format!("{base}/api/v2/assets/{}/content", self.asset_id),
            "url_expires_at": rfc3339(url_expires),
            "job_id": self.job_id,
        })
    }
}
