//! Warm-up and housekeeping settings: `WARMUP_WORKFLOW`, `FREE_MEMORY_AFTER_JOB`,
//! `CLEANUP_FILES` and ComfyUI's folders as the worker sees them.

use std::path::PathBuf;

use super::env::{ConfigError, EnvReader};

/// `FREE_MEMORY_AFTER_JOB`: what `POST /free` asks of ComfyUI after each job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreeMemory {
    /// `off` (the default): no `/free`.
    #[default]
    Off,
    /// `memory`: `{"free_memory": true}`: ComfyUI resets its output cache and frees memory
    /// (ComfyUI 0.3.x unloads the models then too: its worker defaults `unload_models` to
    /// `free_memory`).
    Memory,
    /// `models`: `{"unload_models": true, "free_memory": true}`: unloads every model as well.
    Models,
}

impl FreeMemory {
    /// The setting's value as written in the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            FreeMemory::Off => "off",
            FreeMemory::Memory => "memory",
            FreeMemory::Models => "models",
        }
    }
}

/// Warm-up and housekeeping settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Housekeeping {
    /// `WARMUP_WORKFLOW`: a test-input file (`{"input": {...}}`) or a bare API-format workflow,
    /// run once before the first job.
    pub warmup_workflow: Option<PathBuf>,
    /// `FREE_MEMORY_AFTER_JOB`: `off` (default), `memory` or `models`.
    pub free_memory_after_job: FreeMemory,
    /// `CLEANUP_FILES`: delete a job's uploaded inputs and its output files from ComfyUI's folders.
    pub cleanup_files: bool,
    /// `COMFY_INPUT_DIR` (`/comfyui/input`): ComfyUI's input folder, as the worker sees it.
    pub input_dir: PathBuf,
    /// `COMFY_OUTPUT_DIR` (`/comfyui/output`): ComfyUI's output folder.
    pub output_dir: PathBuf,
    /// `COMFY_TEMP_DIR` (`/comfyui/temp`): ComfyUI's temp folder (previews).
    pub temp_dir: PathBuf,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            warmup_workflow: None,
            free_memory_after_job: FreeMemory::Off,
            cleanup_files: false,
            input_dir: PathBuf::from("/comfyui/input"),
            output_dir: PathBuf::from("/comfyui/output"),
            temp_dir: PathBuf::from("/comfyui/temp"),
        }
    }
}

impl Housekeeping {
    /// Reads `WARMUP_WORKFLOW`, `FREE_MEMORY_AFTER_JOB`, `CLEANUP_FILES` and ComfyUI's folders.
    pub(crate) fn read<F: Fn(&str) -> Option<String>>(
        env: &EnvReader<F>,
    ) -> Result<Housekeeping, ConfigError> {
        let d = Housekeeping::default();
        let free_memory_after_job = match env.get("FREE_MEMORY_AFTER_JOB") {
            None => d.free_memory_after_job,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "off" | "false" | "0" | "no" | "none" => FreeMemory::Off,
                "memory" => FreeMemory::Memory,
                "models" => FreeMemory::Models,
                _ => {
                    return Err(ConfigError {
                        name: "FREE_MEMORY_AFTER_JOB",
                        value: v,
                        expected: "models, memory or off".into(),
                    })
                }
            },
        };
        Ok(Housekeeping {
            warmup_workflow: env.get("WARMUP_WORKFLOW").map(PathBuf::from),
            free_memory_after_job,
            cleanup_files: env.flag("CLEANUP_FILES", d.cleanup_files)?,
            input_dir: env.path("COMFY_INPUT_DIR", d.input_dir),
            output_dir: env.path("COMFY_OUTPUT_DIR", d.output_dir),
            temp_dir: env.path("COMFY_TEMP_DIR", d.temp_dir),
        })
    }
}
