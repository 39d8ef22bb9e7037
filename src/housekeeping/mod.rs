//! Housekeeping around jobs, run by the runner for every front end:
//!
//! * [`warmup`]: `WARMUP_WORKFLOW`, one job run before the first real one so models are loaded;
//!   its outcome decides whether the worker takes jobs at all.
//! * [`cleanup`]: `CLEANUP_FILES`, deleting a job's uploaded inputs and output files from
//!   ComfyUI's folders on disk (ComfyUI has no delete API), with strict path checks.
//! * [`free_memory`]: `FREE_MEMORY_AFTER_JOB`, a `POST /free` once a job's result is out.

pub mod cleanup;
pub mod free_memory;
pub mod warmup;

pub use free_memory::after_job;
