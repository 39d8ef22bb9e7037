//! A local job's state, as the cloud endpoint names it (`IN_QUEUE`, `IN_PROGRESS`, ...).

use serde::Serialize;

/// A job's state, as the cloud endpoint names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for the runner.
    InQueue,
    /// Running on ComfyUI.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled (`/cancel`, `/purge-queue`).
    Cancelled,
    /// `policy.executionTimeout` passed; the prompt was interrupted.
    TimedOut,
}

impl JobStatus {
    /// The wire name (`IN_QUEUE`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
            JobStatus::TimedOut => "TIMED_OUT",
        }
    }

    /// True once the job can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::InQueue | JobStatus::InProgress)
    }
}

/// True when a `/status` body has a final status.
/// Whether a `/status` body's `status` is a final one.
pub(crate) fn status_is_final(status: &str) -> bool {
    !matches!(status, "IN_QUEUE" | "IN_PROGRESS")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn final_statuses() {
        assert!(!JobStatus::InQueue.is_final() && !JobStatus::InProgress.is_final());
        for s in [
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::TimedOut,
        ] {
            assert!(s.is_final());
            assert!(status_is_final(s.as_str()));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        assert!(!status_is_final("IN_PROGRESS") && !status_is_final("IN_QUEUE"));
    }
}
