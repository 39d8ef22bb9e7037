//! The job engine: a job's input read into typed parts ([`request`]), the run against ComfyUI
//! ([`engine`]), and its result in worker-comfyui's schema ([`output`]) or as a typed
//! [`JobFailure`] ([`failure`]). It sees ComfyUI only through [`crate::comfy`]'s typed API.
//!
//! * [`request`]: `JobRequest` (what a front end received) and `Job` (read once: input, output
//!   options, `timeout_s`, bucket, secrets).
//! * [`engine`]: `Engine::run`: bucket, input files, readiness, uploads, prompt, outputs.
//! * [`failure`]: `JobFailure`, the typed failures, and their messages.
//! * [`output`]: the output shapes (`Completed`, and `JobOutput` for the wire).
//! * [`input`]: worker-comfyui's input schema and the input files' fetching.
//! * [`collect`]: output collection (select, fetch, deliver).
//! * [`storage`]: where output files go (inline or a bucket) and `s3://` inputs come from.
//! * [`readiness`]: waiting for ComfyUI (with the start script's PID file).
//! * [`files`]: what a job left in ComfyUI's folders.
//! * [`model_store`]: models a job brings, downloaded once into a content-addressed cache.
//! * `model_check`: model names checked against `/object_info` before queueing.
//! * [`report`], [`codec`], `convert`: messages, base64, UI-format workflows.

pub mod codec;
pub mod collect;
pub mod collected_file;
mod convert;
pub mod engine;
pub mod failure;
pub mod files;
pub mod input;
mod model_check;
pub mod model_store;
pub mod output;
pub mod readiness;
pub(crate) mod report;
pub mod request;
pub mod spooled_file;
pub mod storage;

pub use collect::WebSocketImages;
pub use collected_file::{base64_entry, CollectedFile};
pub use engine::{Engine, Ran, TEST_PANIC_ENV};
pub use failure::{DeadlineSource, JobFailure, Report};
pub use files::JobFiles;
pub use input::{parse_input, JobInput};
pub use output::{
    Completed, FileData, FileEntry, JobOutput, MoreOutputs, OutputImage, OutputKind, OutputOptions,
    Outputs,
};
pub use request::{Job, JobRequest, LocalFile};
pub use storage::{JobStorage, Storage};
