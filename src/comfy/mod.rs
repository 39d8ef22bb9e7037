//! The ComfyUI client: the only module that knows ComfyUI's wire format.
//!
//! * [`client`]: `ComfyClient`, one method per HTTP endpoint.
//! * [`capabilities`]: what the ComfyUI at hand supports (version, `/features`, the jobs API),
//!   detected once per client.
//! * Typed replies: [`history`] (a prompt's outcome and output files), [`rejection`] (a refused
//!   prompt's node errors), [`upload`], [`file_ref`], [`object_info`], [`queue`],
//!   [`system_stats`], [`features`], [`job_record`] (the jobs API); [`error`] (`ComfyError`).
//! * [`messages`]: WebSocket text and binary frames.
//! * [`socket`]: the WebSocket itself.
//! * [`prompt_watcher`]: following one prompt to its end (socket + `/history` fallback).
//! * [`health`]: `/system_stats` and `/queue` read together (`serve`'s `/health`, `health`).
//! * [`describe`]: frames as readable lines (`watch`, debug logs).
//! * [`workflow`]: the API-format graph a job submits; [`workflow_input`]: API or UI format.
//! * [`ui_workflow`]: UI-format exports converted to the API format with `/object_info`.

pub mod capabilities;
pub mod client;
pub mod describe;
pub mod error;
pub mod features;
pub mod file_ref;
pub mod health;
pub mod history;
pub mod job_record;
pub mod messages;
pub mod object_info;
pub mod prompt_watcher;
pub mod queue;
pub mod rejection;
pub mod socket;
pub mod system_stats;
pub mod ui_workflow;
pub mod upload;
pub mod workflow;

pub use capabilities::{Capabilities, ComfyVersion};
pub use client::{ClientOptions, ComfyClient, ViewDownload};
pub use error::ComfyError;
pub use features::Features;
pub use file_ref::FileRef;
pub use history::{
    ExecutionFailure, FileKind, HistoryEntry, Interruption, NodeOutput, Outcome, OutputFile,
};
pub use job_record::{JobRecord, JobStatus};
pub use object_info::ObjectInfo;
pub use prompt_watcher::{ExtraData, NodeState, PromptEvent, PromptResult, WatchOptions};
pub use queue::QueueSnapshot;
pub use rejection::{NodeErrors, PromptRejection, ValidationReason};
pub use system_stats::{DeviceInfo, SystemInfo, SystemStats};
pub use ui_workflow::{ConvertError, ConvertOptions, UiWorkflow};
pub use upload::{Upload, UploadedFile};
pub use workflow::{Workflow, WorkflowError, WorkflowInput};
