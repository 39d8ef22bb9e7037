//! `FREE_MEMORY_AFTER_JOB`: a `POST /free` once a job's result is out.

use std::time::Instant;

use tracing::{info, warn};

use crate::config::FreeMemory;
use crate::job::Engine;

/// `FREE_MEMORY_AFTER_JOB`: asks ComfyUI to free memory (`memory`) or also unload its models
/// (`models`). Called by the front ends after a job's result was delivered and before the next
/// job is taken, for successes and failures alike. A failure is logged and otherwise ignored:
/// it never changes a job's result.
pub async fn after_job(engine: &Engine) {
    let mode = engine.settings().housekeeping.free_memory_after_job;
    let unload_models = match mode {
        FreeMemory::Off => return,
        FreeMemory::Memory => false,
        FreeMemory::Models => true,
    };
    let started = Instant::now();
    match engine.comfy().free(unload_models, true).await {
        Ok(()) => info!(
            mode = mode.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "asked ComfyUI to free memory (POST /free)"
        ),
        Err(e) => warn!(
            mode = mode.as_str(),
            error = %e,
            "POST /free failed; the next job runs anyway"
        ),
    }
}
