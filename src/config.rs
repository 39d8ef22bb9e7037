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

/// Reads numbers with a clear error naming the variable.
struct Reader<F: Fn(&str) -> Option<String>>(F);

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
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
        let r = Reader(lookup);
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
}
