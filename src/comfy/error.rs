//! Errors talking to ComfyUI.

use super::rejection::PromptRejection;

/// Anything that went wrong between us and ComfyUI.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// No TCP connection (ComfyUI down, wrong host) or the request timed out.
    #[error("ComfyUI at {host} is not reachable ({what}): {detail}")]
    Unreachable {
        /// `host:port`.
        host: String,
        /// The call that failed.
        what: String,
        /// Cause.
        detail: String,
    },
    /// ComfyUI answered with an unexpected status.
    #[error("ComfyUI {what} returned HTTP {status}: {body}")]
    Status {
        /// The call.
        what: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// ComfyUI refused the prompt (HTTP 400 from `POST /prompt`).
    #[error("ComfyUI rejected the workflow: {}", .0.summary())]
    Rejected(Box<PromptRejection>),
    /// The reply was not what the protocol says.
    #[error("unexpected reply from ComfyUI {what}: {detail}")]
    Protocol {
        /// The call.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// The WebSocket failed.
    #[error("WebSocket communication error: {0}")]
    WebSocket(String),
    /// ComfyUI stopped answering during a prompt.
    #[error("ComfyUI stopped responding: {0}")]
    Stopped(String),
    /// After the connection was lost, ComfyUI answers again but has the prompt neither in its
    /// queue nor in its history: it restarted (on the same address) and the prompt is gone.
    #[error("ComfyUI restarted during the job; the prompt was lost (it is neither queued nor in the history of the ComfyUI now answering); submit the job again")]
    PromptLost,
}

impl ComfyError {
    /// True when retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ComfyError::Unreachable { .. } | ComfyError::WebSocket(_) => true,
            ComfyError::Status { status, .. } => *status >= 500,
            ComfyError::Rejected(_)
            | ComfyError::Protocol { .. }
            | ComfyError::Stopped(_)
            | ComfyError::PromptLost => false,
        }
    }
}
