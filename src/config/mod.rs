//! Settings from the environment, with worker-comfyui's variable names where they exist.
//!
//! Everything is read once at start-up through [`Settings::from_lookup`], so tests build
//! settings from a map instead of mutating the process environment.

use std::path::PathBuf;
use std::time::Duration;

mod env;
mod housekeeping;
mod inputs;
mod models;
mod previews;
mod shutdown;
mod storage;

pub use env::ConfigError;
pub(crate) use env::EnvReader;
pub use housekeeping::{FreeMemory, Housekeeping};
pub use inputs::InputPolicy;
pub use models::ModelPolicy;
pub use previews::PreviewPolicy;
pub use shutdown::{shutdown_grace_from, DEFAULT_SHUTDOWN_GRACE};
pub(crate) use storage::{locate, Names, ENV_NAMES, JOB_NAMES};
pub use storage::{
    BucketLocation, BucketSettings, LocateError, StorageSettings, UploadMode,
    DEFAULT_MAX_INLINE_OUTPUT_BYTES, DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE,
    MAX_URL_EXPIRY,
};

use crate::comfy_address::{self, ComfyAddress, DEFAULT_COMFY_ADDRESS};
use crate::secret::Secret;

/// How long `worker`, `serve` and `lambda` wait for ComfyUI to answer when no live ComfyUI
/// process stands behind the wait (`COMFY_READY_TIMEOUT_S` unset): what worker-comfyui's 500
/// polls every 50 ms came to.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(25);

/// The same for `run`, `health`, `watch` and `convert`, where someone waits at a terminal.
pub const RUN_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Worker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `COMFY_HOST`: where ComfyUI listens (`host:port` or an http(s) URL), checked. A
    /// comma-separated list names one ComfyUI per GPU: this is the first, the others are in
    /// [`Settings::other_instances`].
    pub comfy_host: ComfyAddress,
    /// The ComfyUIs after the first in `COMFY_HOST`'s list, each with its own PID file and
    /// temp folder (`COMFY_PID_FILE` and `COMFY_TEMP_DIR` as lists in the same order).
    pub other_instances: Vec<ComfyInstance>,
    /// `COMFY_API_AVAILABLE_INTERVAL_MS`: readiness poll interval.
    pub api_available_interval: Duration,
    /// `COMFY_READY_TIMEOUT_S`: how long a job waits for ComfyUI to answer when no live ComfyUI
    /// process stands behind the wait; `None`: the command's default ([`DEFAULT_READY_TIMEOUT`]
    /// for the long-running modes, [`RUN_READY_TIMEOUT`] for `run`). The older
    /// `COMFY_API_AVAILABLE_MAX_RETRIES` (polls, worker-comfyui's name) still sets it as polls
    /// times the interval when `COMFY_READY_TIMEOUT_S` is unset.
    pub ready_timeout: Option<Duration>,
    /// `COMFY_PID_FILE`: the PID file of the ComfyUI the start script launched (it sets the
    /// variable; a list, one per `COMFY_HOST` entry, with several ComfyUIs). While that process lives, a job waits for it without limit; once it is gone,
    /// not at all. Without the variable, or with an address given on the command line, no PID
    /// file counts.
    pub comfy_pid_file: Option<PathBuf>,
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
    /// Models a job brings: `COMFY_MODELS_DIR`, `MODEL_CACHE_DIR`, `MODEL_CACHE_MAX_GB`,
    /// `MODEL_URL_MAX_BYTES`, `MODEL_URL_TIMEOUT_S`.
    pub models: ModelPolicy,
    /// Where outputs go and where `s3://` inputs come from: `BUCKET_*`, `OUTPUT_UPLOAD`,
    /// `MAX_INLINE_OUTPUT_BYTES`, `ALLOW_PRIVATE_S3_ENDPOINTS` (see `job::storage`).
    pub storage: StorageSettings,
    /// Warm-up and housekeeping: `WARMUP_WORKFLOW`, `FREE_MEMORY_AFTER_JOB`, `CLEANUP_FILES`,
    /// `COMFY_INPUT_DIR`, `COMFY_OUTPUT_DIR`, `COMFY_TEMP_DIR` (see [`crate::housekeeping`]).
    pub housekeeping: Housekeeping,
    /// Live previews: `PREVIEW_MAX_PER_S`, `PREVIEW_MAX_BYTES`, `PREVIEW_MAX_SIDE`,
    /// `RUNPOD_PREVIEWS`.
    pub previews: PreviewPolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            comfy_host: DEFAULT_COMFY_ADDRESS
                .parse()
                .expect("the default address is valid"),
            other_instances: Vec::new(),
            api_available_interval: Duration::from_millis(50),
            ready_timeout: None,
            comfy_pid_file: None,
            ws_reconnect_attempts: 5,
            ws_reconnect_delay: Duration::from_secs(3),
            ws_silence_timeout: Duration::from_secs(5),
            history_poll_interval: Duration::from_secs(1),
            http_timeout: Duration::from_secs(30),
            view_timeout: Duration::from_secs(120),
            comfy_org_api_key: None,
            inputs: InputPolicy::default(),
            models: ModelPolicy::default(),
            storage: StorageSettings::default(),
            housekeeping: Housekeeping::default(),
            previews: PreviewPolicy::default(),
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
        let models = ModelPolicy::from_lookup(&lookup)?;
        let storage = StorageSettings::from_lookup(&lookup)?;
        let r = EnvReader::new(lookup);
        let d = Settings::default();
        let mut instances = read_instances(&r)?.into_iter();
        let first = instances.next();
        let housekeeping = Housekeeping::read(&r)?;
        let (comfy_host, comfy_pid_file, first_temp) = match first {
            Some(i) => (i.host, i.pid_file, i.temp_dir),
            None => (d.comfy_host, None, None), // never: the list has at least one entry
        };
        Ok(Settings {
            comfy_host,
            other_instances: instances.collect(),
            comfy_pid_file,
            housekeeping: Housekeeping {
                temp_dir: first_temp.unwrap_or(housekeeping.temp_dir),
                ..housekeeping
            },
            api_available_interval: r
                .millis("COMFY_API_AVAILABLE_INTERVAL_MS", d.api_available_interval)?,
            ready_timeout: match r.get("COMFY_READY_TIMEOUT_S") {
                Some(_) => Some(r.secs("COMFY_READY_TIMEOUT_S", Duration::ZERO)?),
                None => match r.count("COMFY_API_AVAILABLE_MAX_RETRIES", 0)? {
                    0 => None,
                    polls => Some(
                        r.millis("COMFY_API_AVAILABLE_INTERVAL_MS", d.api_available_interval)?
                            * polls,
                    ),
                },
            },
            ws_reconnect_attempts: r
                .count("WEBSOCKET_RECONNECT_ATTEMPTS", d.ws_reconnect_attempts)?,
            ws_reconnect_delay: r.secs("WEBSOCKET_RECONNECT_DELAY_S", d.ws_reconnect_delay)?,
            ws_silence_timeout: r.secs("COMFY_WS_SILENCE_S", d.ws_silence_timeout)?,
            history_poll_interval: r
                .millis("COMFY_HISTORY_POLL_INTERVAL_MS", d.history_poll_interval)?,
            http_timeout: r.secs("COMFY_HTTP_TIMEOUT_S", d.http_timeout)?,
            view_timeout: r.secs("COMFY_VIEW_TIMEOUT_S", d.view_timeout)?,
            comfy_org_api_key: r.get("COMFY_ORG_API_KEY").map(Secret::new),
            previews: PreviewPolicy::read(&r)?,
            inputs,
            models,
            storage,
        })
    }

    /// How long a job waits for ComfyUI without a live ComfyUI process behind the wait.
    pub fn ready_timeout(&self) -> Duration {
        self.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT)
    }

    /// How many ComfyUIs `COMFY_HOST` names.
    pub fn instance_count(&self) -> usize {
        1 + self.other_instances.len()
    }

    /// The settings for each ComfyUI `COMFY_HOST` names, the first first: each names one
    /// ComfyUI, with its PID file and temp folder; everything else is shared.
    pub fn per_instance(&self) -> Vec<Settings> {
        let one = Settings {
            other_instances: Vec::new(),
            ..self.clone()
        };
        let others = self.other_instances.iter().map(|i| {
            let mut s = one.clone();
            s.comfy_host = i.host.clone();
            s.comfy_pid_file = i.pid_file.clone();
            if let Some(temp) = &i.temp_dir {
                s.housekeeping.temp_dir = temp.clone();
            }
            s
        });
        std::iter::once(one.clone()).chain(others).collect()
    }

    /// Points the settings at one ComfyUI, `address` (named on the command line or started by
    /// the worker): the list `COMFY_HOST` may have named and the start script's PID files no
    /// longer count.
    pub fn use_only(&mut self, address: ComfyAddress) {
        self.comfy_host = address;
        self.comfy_pid_file = None;
        self.other_instances.clear();
    }
}

/// One ComfyUI of several (`COMFY_HOST=a,b`): one per GPU, started by the start script with
/// `COMFY_INSTANCES`.
#[derive(Debug, Clone, PartialEq)]
pub struct ComfyInstance {
    /// Where it listens.
    pub host: ComfyAddress,
    /// Its PID file (its entry in `COMFY_PID_FILE`).
    pub pid_file: Option<PathBuf>,
    /// Its temp folder (its entry in `COMFY_TEMP_DIR`), when the list names one per instance.
    pub temp_dir: Option<PathBuf>,
}

/// `COMFY_HOST`, `COMFY_PID_FILE` and `COMFY_TEMP_DIR` read together: one entry per ComfyUI
/// (the default address when `COMFY_HOST` is unset). A PID-file list names one file per address; a temp-folder
/// list names one folder per address, or one for all (then it is `Housekeeping`'s).
fn read_instances<F: Fn(&str) -> Option<String>>(
    r: &EnvReader<F>,
) -> Result<Vec<ComfyInstance>, ConfigError> {
    let list = |name: &str| -> Vec<String> {
        r.get(name)
            .map(|v| {
                v.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    };
    let pid_files = list("COMFY_PID_FILE");
    let temp_dirs = list("COMFY_TEMP_DIR");
    let hosts = r
        .get("COMFY_HOST")
        .unwrap_or_else(|| DEFAULT_COMFY_ADDRESS.to_owned());
    let mut addresses: Vec<ComfyAddress> = Vec::new();
    for part in hosts.split(',').map(str::trim) {
        let address = ComfyAddress::parse(part).map_err(|e| ConfigError {
            name: "COMFY_HOST",
            value: comfy_address::without_credentials(&hosts),
            expected: if part.is_empty() {
                "an address between every two commas".into()
            } else {
                e.to_string().into()
            },
        })?;
        if addresses.iter().any(|a| a.base_url() == address.base_url()) {
            return Err(ConfigError {
                name: "COMFY_HOST",
                value: comfy_address::without_credentials(&hosts),
                expected: format!("each ComfyUI once; {} is named twice", address.shown()).into(),
            });
        }
        addresses.push(address);
    }
    let n = addresses.len();
    if !pid_files.is_empty() && pid_files.len() != n {
        return Err(ConfigError {
            name: "COMFY_PID_FILE",
            value: pid_files.join(","),
            expected: format!(
                "one PID file per COMFY_HOST address, in the same order; COMFY_HOST names {n}"
            )
            .into(),
        });
    }
    if temp_dirs.len() > 1 && temp_dirs.len() != n {
        return Err(ConfigError {
            name: "COMFY_TEMP_DIR",
            value: temp_dirs.join(","),
            expected: format!(
                "one folder for every ComfyUI, or one per COMFY_HOST address; COMFY_HOST names {n}"
            )
            .into(),
        });
    }
    Ok(addresses
        .into_iter()
        .enumerate()
        .map(|(i, host)| ComfyInstance {
            host,
            pid_file: pid_files.get(i).map(PathBuf::from),
            temp_dir: (temp_dirs.len() > 1).then(|| PathBuf::from(&temp_dirs[i])),
        })
        .collect())
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
        assert_eq!(s.comfy_host.shown(), "127.0.0.1:8188");
        assert_eq!(s.api_available_interval, Duration::from_millis(50));
        assert_eq!(
            s.ready_timeout(),
            Duration::from_secs(25),
            "500 polls of 50 ms"
        );
        assert_eq!(
            s.comfy_pid_file, None,
            "only the start script's variable names one"
        );
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
        assert_eq!(s.comfy_host.shown(), "10.0.0.2:9000");
        assert_eq!(s.ws_reconnect_delay, Duration::from_millis(500));
        assert!(!format!("{s:?}").contains("sk-secret"));
        let s = from(&[
            ("COMFY_READY_TIMEOUT_S", "3"),
            ("COMFY_PID_FILE", "/run/c.pid"),
        ])
        .unwrap();
        assert_eq!(s.ready_timeout, Some(Duration::from_secs(3)));
        assert_eq!(s.comfy_pid_file, Some(PathBuf::from("/run/c.pid")));
        let s = from(&[
            ("COMFY_API_AVAILABLE_MAX_RETRIES", "10"),
            ("COMFY_API_AVAILABLE_INTERVAL_MS", "200"),
        ])
        .unwrap();
        assert_eq!(
            s.ready_timeout,
            Some(Duration::from_secs(2)),
            "worker-comfyui's polls"
        );
        for bad in ["localhost", "127.0.0.1:99999", "ftp://x:1", "http://"] {
            let err = from(&[("COMFY_HOST", bad)]).unwrap_err();
            assert_eq!(err.name, "COMFY_HOST", "{bad}");
        }
        let err = from(&[("COMFY_HOST", "ftp://user:pw-in-host@x")]).unwrap_err();
        assert!(!err.to_string().contains("pw-in-host"), "{err}");
        let err = from(&[("WEBSOCKET_RECONNECT_ATTEMPTS", "many")]).unwrap_err();
        assert_eq!(err.name, "WEBSOCKET_RECONNECT_ATTEMPTS");
        assert!(err.to_string().contains("'many'"));
    }

    #[test]
    fn comfy_host_names_one_comfyui_per_gpu_with_its_pid_file_and_temp_folder() {
        let s = from(&[
            (
                "COMFY_HOST",
                "127.0.0.1:8188, 127.0.0.1:8189,http://10.0.0.3:8190",
            ),
            ("COMFY_PID_FILE", "/tmp/c0.pid,/tmp/c1.pid,/tmp/c2.pid"),
            ("COMFY_TEMP_DIR", "/t0,/t1,/t2"),
        ])
        .unwrap();
        assert_eq!(s.instance_count(), 3);
        let each = s.per_instance();
        let shown: Vec<String> = each.iter().map(|s| s.comfy_host.shown()).collect();
        assert_eq!(shown, ["127.0.0.1:8188", "127.0.0.1:8189", "10.0.0.3:8190"]);
        let pids: Vec<_> = each.iter().map(|s| s.comfy_pid_file.clone()).collect();
        assert_eq!(
            pids,
            [
                Some("/tmp/c0.pid".into()),
                Some("/tmp/c1.pid".into()),
                Some("/tmp/c2.pid".into())
            ]
        );
        let temps: Vec<_> = each
            .iter()
            .map(|s| s.housekeeping.temp_dir.clone())
            .collect();
        assert_eq!(temps, [PathBuf::from("/t0"), "/t1".into(), "/t2".into()]);
        assert!(each.iter().all(|s| s.other_instances.is_empty()));
        // One temp folder for all; no PID files.
        let s = from(&[("COMFY_HOST", "a:1,b:2"), ("COMFY_TEMP_DIR", "/shared")]).unwrap();
        let each = s.per_instance();
        assert!(each.iter().all(
            |s| s.housekeeping.temp_dir == std::path::Path::new("/shared")
                && s.comfy_pid_file.is_none()
        ));
        // One address is the single ComfyUI, as before.
        let s = from(&[("COMFY_PID_FILE", "/run/c.pid")]).unwrap();
        assert_eq!(
            (s.instance_count(), s.comfy_pid_file),
            (1, Some(PathBuf::from("/run/c.pid")))
        );
        // Narrowed to one (`--comfy`, `--simulate`): the list and the PID files go.
        let mut s = from(&[("COMFY_HOST", "a:1,b:2"), ("COMFY_PID_FILE", "/p0,/p1")]).unwrap();
        s.use_only("c:3".parse().unwrap());
        assert_eq!((s.instance_count(), s.comfy_pid_file), (1, None));
    }

    #[test]
    fn comfy_host_lists_that_cannot_work_are_named() {
        for (pairs, name, says) in [
            (
                &[("COMFY_HOST", "a:1,,b:2")][..],
                "COMFY_HOST",
                "between every two commas",
            ),
            (
                &[("COMFY_HOST", "a:1,a:1")][..],
                "COMFY_HOST",
                "a:1 is named twice",
            ),
            (&[("COMFY_HOST", "a:1,b")][..], "COMFY_HOST", "port"),
            (
                &[("COMFY_HOST", "a:1,b:2"), ("COMFY_PID_FILE", "/p0")][..],
                "COMFY_PID_FILE",
                "COMFY_HOST names 2",
            ),
            (
                &[("COMFY_PID_FILE", "/p0,/p1")][..],
                "COMFY_PID_FILE",
                "COMFY_HOST names 1",
            ),
            (
                &[("COMFY_HOST", "a:1,b:2,c:3"), ("COMFY_TEMP_DIR", "/t0,/t1")][..],
                "COMFY_TEMP_DIR",
                "COMFY_HOST names 3",
            ),
        ] {
            let err = from(pairs).unwrap_err();
            assert_eq!(err.name, name, "{pairs:?}: {err}");
            assert!(err.to_string().contains(says), "{pairs:?}: {err}");
        }
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
