//! The ComfyUI client: the only module that knows ComfyUI's wire format.
//!
//! * [`api`]: the HTTP endpoints, typed replies and errors.
//! * [`messages`]: WebSocket text and binary frames.
//! * [`describe`]: those frames as readable lines (`watch`, debug logs).
//! * [`ws`]: the socket itself.
//! * [`run`]: following one prompt to its end (socket + `/history` fallback).
//! * [`workflow`]: the API-format graph a job submits (or a UI-format one to convert).
//! * [`ui_workflow`]: UI-format exports converted to the API format with `/object_info`.

pub mod api;
pub mod describe;
pub mod error;
pub mod messages;
pub mod run;
pub mod ui_workflow;
pub mod workflow;
pub mod ws;

pub use api::{
    ClientOptions, ComfyClient, ExecutionFailure, FileKind, FileRef, HistoryEntry, Interruption,
    NodeErrors, NodeOutput, ObjectInfo, Outcome, OutputFile, PromptRejection, QueueSnapshot,
    SystemStats,
};
pub use error::ComfyError;
pub use run::{ExtraData, NodeState, PromptEvent, PromptResult, WatchOptions};
pub use ui_workflow::{ConvertError, ConvertOptions, UiWorkflow};
pub use workflow::{Workflow, WorkflowError, WorkflowInput};
