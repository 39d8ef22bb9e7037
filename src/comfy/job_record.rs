//! `GET /api/jobs/{id}` of today's ComfyUI: a prompt's state as the server sees it. Its status
//! moves from `pending` to `in_progress` to one of the finished states in one step, under the
//! queue lock, so unlike `/history` it never reads "unknown" between `execution_success` and the
//! history write. Unknown statuses and keys are tolerated.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::history::HistoryEntry;

/// A job's status (`JobStatus` in `comfy_execution/jobs.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting in the queue.
    Pending,
    /// Running.
    InProgress,
    /// Finished with success.
    Completed,
    /// Finished with an error.
    Failed,
    /// Interrupted while running.
    Cancelled,
    /// A status this client does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// Whether the job is queued or running (its history is not written yet).
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Pending | JobStatus::InProgress)
    }
}

/// One job of `GET /api/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobRecord {
    /// The prompt id.
    pub id: String,
    /// Its status.
    pub status: JobStatus,
    /// Outputs per node, as in `/history` (finished jobs only).
    #[serde(default)]
    pub outputs: Option<Map<String, Value>>,
    /// The history entry's raw `status` (finished jobs only).
    #[serde(default)]
    pub execution_status: Option<Value>,
}

impl JobRecord {
    /// The history entry a finished job carries (its outputs and status), `None` while active.
    pub fn history_entry(&self) -> Option<HistoryEntry> {
        if self.status.is_active() {
            return None;
        }
        let entry = json!({
            "outputs": self.outputs.clone().unwrap_or_default(),
            "status": self.execution_status.clone().unwrap_or(Value::Null),
        });
        Some(HistoryEntry::parse(&entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_unknown_keys() {
        let running: JobRecord = serde_json::from_value(json!({
            "id": "p", "status": "in_progress", "priority": 3, "create_time": 1, "workflow": {}
        }))
        .unwrap();
        assert!(running.status.is_active() && running.history_entry().is_none());
        let odd: JobRecord =
            serde_json::from_value(json!({"id": "p", "status": "partial_success"})).unwrap();
        assert_eq!(odd.status, JobStatus::Unknown);
        let done: JobRecord = serde_json::from_value(json!({
            "id": "p", "status": "completed",
            "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
            "execution_status": {"status_str": "success", "completed": true, "messages": []}
        }))
        .unwrap();
        let entry = done.history_entry().unwrap();
        assert!(entry.completed);
        assert_eq!(entry.outputs.len(), 1);
    }
}
