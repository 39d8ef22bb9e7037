//! Settings from the environment, with worker-comfyui's variable names where they exist.
//!
//! Everything is read once at start-up through [`Settings::from_lookup`], so tests build
//! settings from a map instead of mutating the process environment.

use std::path::PathBuf;
use std::time::Duration;

use crate::job::input::InputPolicy;
use crate::job::storage::StorageSettings;

/// A value that must never appear in logs or error messages. `Debug` hides it, and while any
/// `Secret` holding a value is alive, [`crate::telemetry::scrub`] removes that value from every
/// log line (and the job output's error messages), wherever it came from.
#[derive(PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        crate::telemetry::remember_secret(&value);
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret::new(self.0.clone())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        crate::telemetry::forget_secret(&self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Worker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `COMFY_HOST`: where ComfyUI listens (`host:port` or an http URL).
    pub comfy_host: String,
    /// `COMFY_API_AVAILABLE_INTERVAL_MS`: readiness poll interval.
    pub api_available_interval: Duration,
    /// `COMFY_API_AVAILABLE_MAX_RETRIES`: readiness polls when there is no PID file (0 = 500).
    pub api_available_max_retries: u32,
    /// `COMFY_PID_FILE`: the PID file the start script writes; while that process lives, readiness waits without limit.
    pub comfy_pid_file: PathBuf,
    /// `WEBSOCKET_RECONNECT_ATTEMPTS`: reconnects after the socket drops during a job.
    pub ws_reconnect_attempts: u32,
    /// `WEBSOCKET_RECONNECT_DELAY_S`: base delay between reconnects (doubles each time, capped at 30 s).
    pub ws_reconnect_delay: Duration,
    /// `COMFY_WS_SILENCE_S`: after this long without an event for our prompt, check `/history`.
    pub ws_silence_timeout: Duration,
    /// `COMFY_HISTORY_POLL_INTERVAL_MS`: `/history` poll interval while the socket is down or silent.
    pub history_poll_interval: Duration,
    /// `COMFY_HTTP_TIMEOUT_S`: bound for ComfyUI API calls.
    pub http_timeout: Duration,
    /// `COMFY_VIEW_TIMEOUT_S`: bound for downloading one output file.
    pub view_timeout: Duration,
    /// `COMFY_ORG_API_KEY`: default key for Comfy.org API nodes (a job's `comfy_org_api_key` wins).
    pub comfy_org_api_key: Option<Secret>,
    /// URL inputs: `INPUT_URL_MAX_BYTES`, `INPUT_URL_TIMEOUT_S`, `ALLOW_PRIVATE_INPUT_URLS`,
    /// `INPUT_URL_ALLOW_HOSTS`.
    pub inputs: InputPolicy,
    /// Where outputs go and where `s3://` inputs come from: `BUCKET_*`, `OUTPUT_UPLOAD`,
    /// `MAX_INLINE_OUTPUT_BYTES`, `ALLOW_PRIVATE_S3_ENDPOINTS` (see `job::storage`).
    pub storage: StorageSettings,
    /// Warm-up and housekeeping: `WARMUP_WORKFLOW`, `FREE_MEMORY_AFTER_JOB`, `CLEANUP_FILES`,
    /// `COMFY_INPUT_DIR`, `COMFY_OUTPUT_DIR`, `COMFY_TEMP_DIR` (see [`crate::housekeeping`]).
    pub housekeeping: Housekeeping,
}

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

impl Default for Settings {
    fn default() -> Self {
        Settings {
            comfy_host: "127.0.0.1:8188".into(),
            api_available_interval: Duration::from_millis(50),
            api_available_max_retries: 0,
            comfy_pid_file: PathBuf::from("/tmp/comfyui.pid"),
            ws_reconnect_attempts: 5,
            ws_reconnect_delay: Duration::from_secs(3),
            ws_silence_timeout: Duration::from_secs(5),
            history_poll_interval: Duration::from_secs(1),
            http_timeout: Duration::from_secs(30),
            view_timeout: Duration::from_secs(120),
            comfy_org_api_key: None,
            inputs: InputPolicy::default(),
            storage: StorageSettings::default(),
            housekeeping: Housekeeping::default(),
        }
    }
}

/// A variable with a value that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid value for {name}: '{value}' ({expected})")]
pub struct ConfigError {
    /// Variable name.
    pub name: &'static str,
    /// The value found.
    pub value: String,
    /// What was expected.
    pub expected: &'static str,
}

/// Reads variables through a lookup (the environment, or a map in tests): values are trimmed,
/// an empty one counts as unset, and a value that does not parse is a [`ConfigError`] naming
/// the variable. Every settings reader of the crate goes through it.
pub(crate) struct EnvReader<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> EnvReader<F> {
    pub(crate) fn new(lookup: F) -> Self {
        EnvReader(lookup)
    }

    /// The trimmed value, `None` when unset or empty.
    pub(crate) fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The value as `parse` reads it, `None` when unset; a value `parse` refuses is an error
    /// saying what was `expected`.
    pub(crate) fn parse<T>(
        &self,
        name: &'static str,
        expected: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match parse(&v) {
                Some(t) => Ok(Some(t)),
                None => Err(ConfigError {
                    name,
                    value: v,
                    expected,
                }),
            },
        }
    }

    fn number(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
                _ => Err(ConfigError {
                    name,
                    value: v,
                    expected: "a non-negative number",
                }),
            },
        }
    }

    fn millis(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.number(name, default.as_millis() as f64)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    }

    fn secs(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        self.number(name, default.as_secs_f64())
            .map(Duration::from_secs_f64)
    }

    /// `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`, any case.
    pub(crate) fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        let value = self.parse(name, "true or false", |v| {
            match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            }
        })?;
        Ok(value.unwrap_or(default))
    }

    fn path(&self, name: &str, default: PathBuf) -> PathBuf {
        self.get(name).map(PathBuf::from).unwrap_or(default)
    }

    fn housekeeping(&self) -> Result<Housekeeping, ConfigError> {
        let d = Housekeeping::default();
        let free_memory_after_job = match self.get("FREE_MEMORY_AFTER_JOB") {
            None => d.free_memory_after_job,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "off" | "false" | "0" | "no" | "none" => FreeMemory::Off,
                "memory" => FreeMemory::Memory,
                "models" => FreeMemory::Models,
                _ => {
                    return Err(ConfigError {
                        name: "FREE_MEMORY_AFTER_JOB",
                        value: v,
                        expected: "models, memory or off",
                    })
                }
            },
        };
        Ok(Housekeeping {
            warmup_workflow: self.get("WARMUP_WORKFLOW").map(PathBuf::from),
            free_memory_after_job,
            cleanup_files: self.flag("CLEANUP_FILES", d.cleanup_files)?,
            input_dir: self.path("COMFY_INPUT_DIR", d.input_dir),
            output_dir: self.path("COMFY_OUTPUT_DIR", d.output_dir),
            temp_dir: self.path("COMFY_TEMP_DIR", d.temp_dir),
        })
    }

    fn count(&self, name: &'static str, default: u32) -> Result<u32, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<u32>().map_err(|_| ConfigError {
                name,
                value: v,
                expected: "a non-negative integer",
            }),
        }
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let inputs = InputPolicy::from_lookup(&lookup)?;
        let storage = StorageSettings::from_lookup(&lookup)?;
        let r = EnvReader::new(lookup);
        let d = Settings::default();
        Ok(Settings {
            comfy_host: r.get("COMFY_HOST").unwrap_or(d.comfy_host),
            api_available_interval: r
                .millis("COMFY_API_AVAILABLE_INTERVAL_MS", d.api_available_interval)?,
            api_available_max_retries: r.count(
                "COMFY_API_AVAILABLE_MAX_RETRIES",
                d.api_available_max_retries,
            )?,
            comfy_pid_file: r
                .get("COMFY_PID_FILE")
                .map(PathBuf::from)
                .unwrap_or(d.comfy_pid_file),
            ws_reconnect_attempts: r
                .count("WEBSOCKET_RECONNECT_ATTEMPTS", d.ws_reconnect_attempts)?,
            ws_reconnect_delay: r.secs("WEBSOCKET_RECONNECT_DELAY_S", d.ws_reconnect_delay)?,
            ws_silence_timeout: r.secs("COMFY_WS_SILENCE_S", d.ws_silence_timeout)?,
            history_poll_interval: r
                .millis("COMFY_HISTORY_POLL_INTERVAL_MS", d.history_poll_interval)?,
            http_timeout: r.secs("COMFY_HTTP_TIMEOUT_S", d.http_timeout)?,
            view_timeout: r.secs("COMFY_VIEW_TIMEOUT_S", d.view_timeout)?,
            comfy_org_api_key: r.get("COMFY_ORG_API_KEY").map(Secret::new),
            housekeeping: r.housekeeping()?,
            inputs,
            storage,
        })
    }

    /// Readiness polls allowed when there is no PID file.
    pub fn readiness_attempts(&self) -> u32 {
        if self.api_available_max_retries == 0 {
            500
        } else {
            self.api_available_max_retries
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_worker_comfyui() {
        let s = from(&[]).unwrap();
        assert_eq!(s.comfy_host, "127.0.0.1:8188");
        assert_eq!(s.api_available_interval, Duration::from_millis(50));
        assert_eq!(s.readiness_attempts(), 500);
        assert_eq!(s.ws_reconnect_attempts, 5);
        assert_eq!(s.ws_reconnect_delay, Duration::from_secs(3));
    }

    #[test]
    fn reads_values_and_names_bad_ones() {
        let s = from(&[
            ("COMFY_HOST", "10.0.0.2:9000"),
            ("WEBSOCKET_RECONNECT_DELAY_S", "0.5"),
            ("COMFY_ORG_API_KEY", "sk-secret"),
        ])
        .unwrap();
        assert_eq!(s.comfy_host, "10.0.0.2:9000");
        assert_eq!(s.ws_reconnect_delay, Duration::from_millis(500));
        assert!(!format!("{s:?}").contains("sk-secret"));
        let err = from(&[("WEBSOCKET_RECONNECT_ATTEMPTS", "many")]).unwrap_err();
        assert_eq!(err.name, "WEBSOCKET_RECONNECT_ATTEMPTS");
        assert!(err.to_string().contains("'many'"));
    }

    #[test]
    fn housekeeping_defaults_and_values() {
        let h = from(&[]).unwrap().housekeeping;
        assert_eq!(h, Housekeeping::default());
        assert_eq!(h.free_memory_after_job, FreeMemory::Off);
        assert!(!h.cleanup_files && h.warmup_workflow.is_none());
        assert_eq!(h.input_dir, PathBuf::from("/comfyui/input"));
        assert_eq!(h.output_dir, PathBuf::from("/comfyui/output"));
        let h = from(&[
            ("WARMUP_WORKFLOW", " /warmup.json "),
            ("FREE_MEMORY_AFTER_JOB", "Models"),
            ("CLEANUP_FILES", "true"),
            ("COMFY_INPUT_DIR", "/data/in"),
            ("COMFY_OUTPUT_DIR", "/data/out"),
            ("COMFY_TEMP_DIR", "/data/tmp"),
        ])
        .unwrap()
        .housekeeping;
        assert_eq!(h.warmup_workflow, Some(PathBuf::from("/warmup.json")));
        assert_eq!(h.free_memory_after_job, FreeMemory::Models);
        assert!(h.cleanup_files);
        assert_eq!(
            (h.input_dir, h.output_dir, h.temp_dir),
            ("/data/in".into(), "/data/out".into(), "/data/tmp".into())
        );
        let memory = from(&[("FREE_MEMORY_AFTER_JOB", "memory")]).unwrap();
        assert_eq!(
            memory.housekeeping.free_memory_after_job,
            FreeMemory::Memory
        );
        let off = from(&[("FREE_MEMORY_AFTER_JOB", "off"), ("WARMUP_WORKFLOW", "  ")]).unwrap();
        assert_eq!(off.housekeeping.free_memory_after_job, FreeMemory::Off);
        assert_eq!(off.housekeeping.warmup_workflow, None);
    }

    #[test]
    fn housekeeping_names_bad_values() {
        let err = from(&[("FREE_MEMORY_AFTER_JOB", "everything")]).unwrap_err();
        assert_eq!(err.name, "FREE_MEMORY_AFTER_JOB");
        assert!(err.to_string().contains("models, memory or off"), "{err}");
        let err = from(&[("CLEANUP_FILES", "sometimes")]).unwrap_err();
        assert_eq!(err.name, "CLEANUP_FILES");
        assert!(err.to_string().contains("'sometimes'"), "{err}");
    }
}
