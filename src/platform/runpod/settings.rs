//! RunPod settings from the environment (the SDK's variable names) and the URL templating rules.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

use crate::config::{ConfigError, EnvReader};
use crate::secret::Secret;

/// The protocol version sent in pings: the RunPod SDK release whose wire behaviour this implements.
pub const SDK_PROTOCOL_VERSION: &str = "1.12.0";

/// Settings of the RunPod job loop.
#[derive(Debug, Clone)]
pub struct RunPodSettings {
    /// `RUNPOD_WEBHOOK_GET_JOB`: job-take URL template (`$ID` = worker id).
    pub get_job_url: String,
    /// `RUNPOD_WEBHOOK_POST_OUTPUT`: job-done URL template (`$RUNPOD_POD_ID`, `$ID` = job id).
    pub post_output_url: String,
    /// `RUNPOD_WEBHOOK_PING`: heartbeat URL template (`$RUNPOD_POD_ID`).
    pub ping_url: Option<String>,
    /// `RUNPOD_POD_ID`: the worker id (random when unset; then there is no heartbeat).
    pub worker_id: String,
    /// True when `RUNPOD_POD_ID` was set.
    pub worker_id_given: bool,
    /// `RUNPOD_AI_API_KEY`: sent raw as `Authorization` on every platform call.
    pub api_key: Option<Secret>,
    /// `RUNPOD_PING_INTERVAL` (ms): heartbeat period.
    pub ping_interval: Duration,
    /// `REFRESH_WORKER=true`: ask the platform to stop this worker after each job (`stopPod`), and exit.
    pub refresh_worker: bool,
    /// `JOB_TIMEOUT_S`: per-job deadline; the prompt is interrupted and the job fails with a timeout error.
    pub job_timeout: Option<Duration>,
    /// `RUNPOD_RESULT_RETRY_DELAY_MS`: first retry delay for result posts (doubles, capped at 30 s).
    pub result_retry_delay: Duration,
    /// `RUNPOD_RESULT_ATTEMPTS`: result post attempts in all; `None` (the default, or 0): as
    /// many as [`RunPodSettings::result_window`] allows.
    pub result_attempts: Option<u32>,
    /// `RUNPOD_RESULT_RETRY_WINDOW_S` (600, the platform's default execution timeout, after which
    /// it takes no result): how long a result post is retried.
    pub result_window: Duration,
    /// `RUNPOD_RESULT_SPOOL_DIR` (`/tmp/comfy-worker/results`; `off` for none): where a result
    /// that could not be delivered is kept, to be posted again when the worker starts.
    pub result_spool: Option<std::path::PathBuf>,
    /// `RUNPOD_RESULT_TIMEOUT_S` (120): how long one result post may wait for the platform's answer.
    pub result_timeout: Duration,
    /// `RUNPOD_PROGRESS=false` turns the progress relay off.
    pub relay_progress: bool,
    /// Client-side bound of one job-take or job-stop long poll (90 s, like the SDK).
    pub long_poll_timeout: Duration,
    /// `SHUTDOWN_GRACE_S`: after SIGTERM, how long the job in progress may take to finish before
    /// it is interrupted and failed (20 s).
    pub shutdown_grace: Duration,
    /// `METRICS_PORT` (with `METRICS_ADDR`, `127.0.0.1` by default): where Prometheus metrics
    /// are served at `GET /metrics`; `None` (the default): nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `PIPELINE` (`on` by default; `off`): take the next job while the running one is close to
    /// done and queue its prompt behind it in ComfyUI.
    pub pipeline: bool,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl RunPodSettings {
    /// Reads the environment through `lookup`; `None` when `RUNPOD_WEBHOOK_GET_JOB` is unset (local mode).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<RunPodSettings>, ConfigError> {
        let env = EnvReader::new(&lookup);
        let get = |k: &str| env.get(k);
        let Some(get_job_url) = get("RUNPOD_WEBHOOK_GET_JOB") else {
            return Ok(None);
        };
        let ms = |name: &'static str, default: u64| -> Result<u64, ConfigError> {
            let ms = env.parse(name, "a whole number of milliseconds", |v| {
                v.parse::<u64>().ok()
            })?;
            Ok(ms.unwrap_or(default))
        };
        let ping_ms = ms("RUNPOD_PING_INTERVAL", 10_000)?.max(100);
        let job_timeout = env
            .parse(
                "JOB_TIMEOUT_S",
                "a positive number of seconds (0 = none)",
                |v| match v.parse::<f64>() {
                    Ok(s) if s.is_finite() && s > 0.0 => Some(Some(Duration::from_secs_f64(s))),
                    Ok(0.0) => Some(None),
                    _ => None,
                },
            )?
            .flatten();
        let attempts = env
            .parse(
                "RUNPOD_RESULT_ATTEMPTS",
                "a whole number (0 = as many as RUNPOD_RESULT_RETRY_WINDOW_S allows)",
                |v| v.parse::<u32>().ok(),
            )?
            .filter(|n| *n >= 1);
        let result_window = env
            .parse(
                "RUNPOD_RESULT_RETRY_WINDOW_S",
                "a number of seconds above 0",
                |v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(7.0 * 86_400.0)))
                },
            )?
            .unwrap_or(DEFAULT_RESULT_WINDOW);
        let result_spool = match get("RUNPOD_RESULT_SPOOL_DIR") {
            Some(v) if matches!(v.to_ascii_lowercase().as_str(), "off" | "false" | "none") => None,
            Some(v) => Some(std::path::PathBuf::from(v)),
            None => Some(std::path::PathBuf::from(DEFAULT_RESULT_SPOOL)),
        };
        let result_timeout = env
            .parse(
                "RUNPOD_RESULT_TIMEOUT_S",
                "a number of seconds above 0",
                |v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
                },
            )?
            .unwrap_or(Duration::from_secs(120));
        let metrics_port = env.parse("METRICS_PORT", "a port number (0 to 65535)", |v| {
            v.parse::<u16>().ok()
        })?;
        let metrics_ip = env
            .parse("METRICS_ADDR", "an IP address such as 0.0.0.0", |v| {
                v.parse::<std::net::IpAddr>().ok()
            })?
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let pipeline = env
            .parse("PIPELINE", "on or off", |v| {
                match v.trim().to_ascii_lowercase().as_str() {
                    "1" | "true" | "yes" | "on" => Some(true),
                    "0" | "false" | "no" | "off" => Some(false),
                    _ => None,
                }
            })?
            .unwrap_or(true);
        let worker_id_env = get("RUNPOD_POD_ID");
        let shutdown_grace = crate::config::shutdown_grace_from(&lookup)?;
        Ok(Some(RunPodSettings {
            get_job_url,
            post_output_url: get("RUNPOD_WEBHOOK_POST_OUTPUT")
                .unwrap_or_else(|| "JOB_DONE_URL".into()),
            ping_url: get("RUNPOD_WEBHOOK_PING"),
            worker_id_given: worker_id_env.is_some(),
            worker_id: worker_id_env.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            api_key: get("RUNPOD_AI_API_KEY").map(Secret::new),
            ping_interval: Duration::from_millis(ping_ms),
            refresh_worker: get("REFRESH_WORKER").is_some_and(|v| truthy(&v)),
            job_timeout,
            result_retry_delay: Duration::from_millis(ms("RUNPOD_RESULT_RETRY_DELAY_MS", 1000)?),
            result_attempts: attempts,
            result_window,
            result_spool,
            result_timeout,
            relay_progress: get("RUNPOD_PROGRESS").is_none_or(|v| truthy(&v)),
            long_poll_timeout: Duration::from_secs(90),
            shutdown_grace,
            metrics_addr: metrics_port.map(|port| std::net::SocketAddr::new(metrics_ip, port)),
            pipeline,
        }))
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Option<RunPodSettings>, ConfigError> {
        RunPodSettings::from_lookup(|k| std::env::var(k).ok())
    }

    /// The job-take URL for up to `batch` jobs: the job-take-batch endpoint with `batch_size`
    /// when `batch` > 1 (as the SDK builds it), else job-take.
    pub fn take_url(&self, job_in_progress: bool, batch: usize) -> String {
        let base = self.get_job_url.replace("$ID", &self.worker_id);
        let base = if batch > 1 {
            with_param(
                &base.replace("/job-take/", "/job-take-batch/"),
                "batch_size",
                &batch.to_string(),
            )
        } else {
            base
        };
        with_param(
            &base,
            "job_in_progress",
            if job_in_progress { "1" } else { "0" },
        )
    }

    /// The job-stop URL, when the take URL has the platform's `/job-take/` shape.
    pub fn stop_url(&self) -> Option<String> {
        let base = self.get_job_url.replace("$ID", &self.worker_id);
        base.contains("/job-take/")
            .then(|| base.replace("/job-take/", "/job-stop/"))
    }

    /// The job-done URL for a job (results and progress); the id is percent-encoded as a path
    /// segment, so `/`, `?`, `#` or a newline in it cannot change where the result goes.
    pub fn result_url(&self, job_id: &str) -> String {
        let base = self
            .post_output_url
            .replace("$RUNPOD_POD_ID", &self.worker_id)
            .replace(
                "$ID",
                &utf8_percent_encode(job_id, PATH_SEGMENT).to_string(),
            );
        with_param(&base, "isStream", "false")
    }

    /// The ping URL for the jobs held now (none when idle), when the heartbeat is configured.
    pub fn ping_url_for(&self, job_ids: &[String]) -> Option<String> {
        if !self.worker_id_given || self.api_key.is_none() {
            return None;
        }
        let mut url = self
            .ping_url
            .as_ref()?
            .replace("$RUNPOD_POD_ID", &self.worker_id);
        if !job_ids.is_empty() {
            // `,` is sent as %2C, as `requests` encodes it; each id is encoded for a query.
            let ids: Vec<String> = job_ids
                .iter()
                .map(|id| utf8_percent_encode(id, QUERY_VALUE).to_string())
                .collect();
            url = with_param(&url, "job_id", &ids.join("%2C"));
        }
        Some(with_param(&url, "runpod_version", SDK_PROTOCOL_VERSION))
    }
}

/// What a job id may not hold as it is in a URL path segment: controls, space, and the
/// characters that end or restructure a segment (`/`, `?`, `#`, `%`, ...).
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A query value: a path segment's set plus `&`, `=`, `+` and `,` (the ids' separator).
const QUERY_VALUE: &AsciiSet = &PATH_SEGMENT.add(b'&').add(b'=').add(b'+').add(b',');

/// The default of `RUNPOD_RESULT_RETRY_WINDOW_S`: the platform's default execution timeout.
pub const DEFAULT_RESULT_WINDOW: Duration = Duration::from_secs(600);

/// The default of `RUNPOD_RESULT_SPOOL_DIR`.
pub const DEFAULT_RESULT_SPOOL: &str = "/tmp/comfy-worker/results";

/// Appends `k=v` with `&`, or `?` when the URL has no query yet.
pub(crate) fn with_param(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Option<RunPodSettings> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RunPodSettings::from_lookup(|k| map.get(k).cloned()).unwrap()
    }

    #[test]
    fn local_mode_without_get_job() {
        assert!(settings(&[]).is_none());
    }

    #[test]
    fn templates_like_the_sdk() {
        let s = settings(&[
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                "https://api.runpod.ai/v2/ep/job-take/$ID?gpu=H100",
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "https://api.runpod.ai/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=H100",
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                "https://api.runpod.ai/v2/ep/ping/$RUNPOD_POD_ID?gpu=H100",
            ),
            ("RUNPOD_POD_ID", "pod1"),
            ("RUNPOD_AI_API_KEY", "key"),
        ])
        .unwrap();
        assert_eq!(
            s.take_url(false, 1),
            "https://api.runpod.ai/v2/ep/job-take/pod1?gpu=H100&job_in_progress=0"
        );
        assert_eq!(
            s.take_url(true, 1),
            "https://api.runpod.ai/v2/ep/job-take/pod1?gpu=H100&job_in_progress=1"
        );
        assert_eq!(
            s.take_url(true, 3),
            "https://api.runpod.ai/v2/ep/job-take-batch/pod1?gpu=H100&batch_size=3&job_in_progress=1",
            "the SDK's job-take-batch URL"
        );
        assert_eq!(
            s.stop_url().unwrap(),
            "https://api.runpod.ai/v2/ep/job-stop/pod1?gpu=H100"
        );
        assert_eq!(
            s.result_url("j-1"),
            "https://api.runpod.ai/v2/ep/job-done/pod1/j-1?gpu=H100&isStream=false"
        );
        assert_eq!(
            s.ping_url_for(&["a".into(), "b".into()]).unwrap(),
            "https://api.runpod.ai/v2/ep/ping/pod1?gpu=H100&job_id=a%2Cb&runpod_version=1.12.0"
        );
        assert_eq!(
            s.ping_url_for(&[]).unwrap(),
            "https://api.runpod.ai/v2/ep/ping/pod1?gpu=H100&runpod_version=1.12.0"
        );
        assert_eq!(s.ping_interval, Duration::from_secs(10));
        assert!(!s.refresh_worker && s.relay_progress && s.job_timeout.is_none());
    }

    #[test]
    fn question_mark_when_the_template_has_no_query() {
        let s = settings(&[
            ("RUNPOD_WEBHOOK_GET_JOB", "http://h/job-take/$ID"),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "http://h/job-done/$RUNPOD_POD_ID/$ID",
            ),
            ("RUNPOD_POD_ID", "w"),
            ("REFRESH_WORKER", "true"),
            ("JOB_TIMEOUT_S", "2.5"),
        ])
        .unwrap();
        assert_eq!(
            s.take_url(false, 1),
            "http://h/job-take/w?job_in_progress=0"
        );
        assert_eq!(
            s.take_url(false, 2),
            "http://h/job-take-batch/w?batch_size=2&job_in_progress=0"
        );
        assert_eq!(s.result_url("j"), "http://h/job-done/w/j?isStream=false");
        assert!(
            s.ping_url_for(&[]).is_none(),
            "no ping without a key and a ping URL"
        );
        assert!(s.refresh_worker);
        assert_eq!(s.job_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(s.result_timeout, Duration::from_secs(120));
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let map: HashMap<&str, &str> = [
            ("RUNPOD_WEBHOOK_GET_JOB", "http://h/x"),
            ("RUNPOD_PING_INTERVAL", "often"),
        ]
        .into();
        let err = RunPodSettings::from_lookup(|k| map.get(k).map(|v| v.to_string())).unwrap_err();
        assert_eq!(err.name, "RUNPOD_PING_INTERVAL");
    }

    #[test]
    fn the_loop_takes_shutdown_grace_s() {
        let s = settings(&[
            ("RUNPOD_WEBHOOK_GET_JOB", "http://h/x"),
            ("SHUTDOWN_GRACE_S", "3"),
        ])
        .unwrap();
        assert_eq!(s.shutdown_grace, Duration::from_secs(3));
    }
}
