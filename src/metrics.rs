//! The worker's Prometheus metrics: one [`Metrics`] handle, cheap to clone, that the job runner
//! feeds (jobs, durations, ComfyUI's busy and idle time, result bytes) and the front ends read
//! out as text (`GET /metrics` on `serve`, `METRICS_PORT` in the RunPod loop). The RunPod loop
//! adds what only it sees (progress posts, retries of platform calls).
//!
//! Built on `prometheus-client` with a registry of its own (no global state), so tests and
//! several workers in one process never share counters. The text is OpenMetrics 1.0, which
//! Prometheus scrapes as it does its own format.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a job ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// It returned its outputs.
    Completed,
    /// It failed (bad input, ComfyUI error, node error, ...).
    Failed,
    /// Cancelled by its client or the platform.
    Cancelled,
    /// Its deadline passed.
    Timeout,
    /// Interrupted at the end of the shutdown grace.
    Shutdown,
}

impl JobOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Completed => "completed",
            JobOutcome::Failed => "failed",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::Timeout => "timeout",
            JobOutcome::Shutdown => "shutdown",
        }
    }
}

/// What was retried, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// A result post the platform did not take (5xx, 429, no answer, connection error).
    ResultPost,
    /// A job-take that failed (backed off, then polled again).
    JobTake,
    /// A reconnect of a job's ComfyUI WebSocket after it dropped (each attempt).
    WebSocket,
}

impl RetryReason {
    fn as_str(self) -> &'static str {
        match self {
            RetryReason::ResultPost => "result_post",
            RetryReason::JobTake => "job_take",
            RetryReason::WebSocket => "websocket",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PostLabel {
    result: &'static str,
}

/// Which ComfyUI (its address, as logs show it): one per GPU with `COMFY_HOST=a,b`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabel {
    instance: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// ComfyUI's busy/idle bookkeeping: prompts running now, since when, idle since when.
#[derive(Debug, Default)]
struct Busy {
    running: usize,
    busy_since: Option<Instant>,
    idle_since: Option<Instant>,
}

struct Inner {
    registry: Registry,
    jobs: Family<OutcomeLabel, Counter>,
    job_duration: Histogram,
    queue_wait: Histogram,
    busy_seconds: Family<InstanceLabel, Counter<f64>>,
    idle_gap: Family<InstanceLabel, Histogram, fn() -> Histogram>,
    up: Family<InstanceLabel, Gauge>,
    progress_posts: Family<PostLabel, Counter>,
    result_bytes: Counter,
    retries: Family<ReasonLabel, Counter>,
    rss: Gauge,
    busy: Mutex<HashMap<String, Busy>>,
}

/// The worker's metrics; clones share one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every series at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("comfy_worker");
        let jobs = Family::<OutcomeLabel, Counter>::default();
        registry.register("jobs", "Jobs run to their end, by outcome", jobs.clone());
        let job_duration = Histogram::new(exponential_buckets(0.1, 2.0, 14));
        registry.register_with_unit(
            "job_duration",
            "Time from the runner taking a job to its result",
            Unit::Seconds,
            job_duration.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register_with_unit(
            "queue_wait",
            "Time from the runner taking a job to its prompt starting in ComfyUI",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let busy_seconds = Family::<InstanceLabel, Counter<f64>>::default();
        registry.register_with_unit(
            "comfy_busy",
            "Time each ComfyUI spent executing this worker's prompts",
            Unit::Seconds,
            busy_seconds.clone(),
        );
        let idle_gap: Family<InstanceLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 20)));
        registry.register_with_unit(
            "comfy_idle_gap",
            "Time each ComfyUI sat idle between the end of one prompt and the start of the next",
            Unit::Seconds,
            idle_gap.clone(),
        );
        let up = Family::<InstanceLabel, Gauge>::default();
        registry.register(
            "comfy_up",
            "Whether each ComfyUI takes jobs (1) or is down and skipped (0)",
            up.clone(),
        );
        let progress_posts = Family::<PostLabel, Counter>::default();
        registry.register(
            "progress_posts",
            "Progress updates for the platform: sent, coalesced (replaced by a newer one) or failed",
            progress_posts.clone(),
        );
        let result_bytes = Counter::default();
        registry.register_with_unit(
            "result",
            "Bytes of returned files in job results (base64 or bucket URLs)",
            Unit::Bytes,
            result_bytes.clone(),
        );
        let retries = Family::<ReasonLabel, Counter>::default();
        registry.register("retries", "Calls retried, by reason", retries.clone());
        let rss = Gauge::default();
        if cfg!(target_os = "linux") {
            registry.register_with_unit(
                "resident_memory",
                "The worker process's resident set size (from /proc/self/statm)",
                Unit::Bytes,
                rss.clone(),
            );
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                jobs,
                job_duration,
                queue_wait,
                busy_seconds,
                idle_gap,
                up,
                progress_posts,
                result_bytes,
                retries,
                rss,
                busy: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn busy(&self) -> MutexGuard<'_, HashMap<String, Busy>> {
        self.inner.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn label(instance: &str) -> InstanceLabel {
        InstanceLabel {
            instance: instance.to_owned(),
        }
    }

    /// Whether the ComfyUI `instance` takes jobs (`comfy_up`).
    pub fn instance_up(&self, instance: &str, up: bool) {
        self.inner
            .up
            .get_or_create(&Metrics::label(instance))
            .set(i64::from(up));
    }

    /// A job ended with `outcome` after `took`.
    pub fn job_ended(&self, outcome: JobOutcome, took: Duration) {
        self.inner
            .jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        self.inner.job_duration.observe(took.as_secs_f64());
    }

    /// A job's prompt started executing `waited` after the runner took the job.
    pub fn queue_waited(&self, waited: Duration) {
        self.inner.queue_wait.observe(waited.as_secs_f64());
    }

    /// A prompt started executing in the ComfyUI `instance` at `at`. Ends that ComfyUI's idle
    /// gap when none was running there.
    pub fn prompt_started(&self, instance: &str, at: Instant) {
        let mut all = self.busy();
        let busy = all.entry(instance.to_owned()).or_default();
        if busy.running == 0 {
            if let Some(idle) = busy.idle_since.take() {
                self.inner
                    .idle_gap
                    .get_or_create(&Metrics::label(instance))
                    .observe(at.saturating_duration_since(idle).as_secs_f64());
            }
            busy.busy_since = Some(at);
        }
        busy.running += 1;
    }

    /// A prompt that [`Metrics::prompt_started`] ended at `at`.
    pub fn prompt_ended(&self, instance: &str, at: Instant) {
        let mut all = self.busy();
        let Some(busy) = all.get_mut(instance).filter(|b| b.running > 0) else {
            return;
        };
        busy.running -= 1;
        if busy.running == 0 {
            if let Some(since) = busy.busy_since.take() {
                self.inner
                    .busy_seconds
                    .get_or_create(&Metrics::label(instance))
                    .inc_by(at.saturating_duration_since(since).as_secs_f64());
            }
            busy.idle_since = Some(at);
        }
    }

    /// What one job's progress relay did.
    pub fn progress_posts(&self, sent: u64, coalesced: u64, failed: u64) {
        for (result, n) in [("sent", sent), ("coalesced", coalesced), ("failed", failed)] {
            self.inner
                .progress_posts
                .get_or_create(&PostLabel { result })
                .inc_by(n);
        }
    }

    /// A result returned `bytes` of file data.
    pub fn result_bytes(&self, bytes: u64) {
        self.inner.result_bytes.inc_by(bytes);
    }

    /// A call is retried.
    pub fn retry(&self, reason: RetryReason) {
        self.inner
            .retries
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Every series as OpenMetrics text ([`CONTENT_TYPE`]), the resident set size read now.
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.inner.rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry) {
            // Writing into a String cannot fail; say so rather than panic if it ever does.
            text = format!("# encoding failed: {e}\n# EOF\n");
        }
        text
    }
}

/// The process's resident set size: `/proc/self/statm`'s second field, in pages of 4 KiB
/// (the page size of the x86-64 and arm64 Linux kernels GPU hosts run). `None` elsewhere.
fn resident_bytes() -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_gaps_are_between_prompts_and_overlaps_count_as_busy() {
        let m = Metrics::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let a = "127.0.0.1:8188";
        m.prompt_started(a, t0);
        m.prompt_ended(a, t0 + ms(100));
        m.prompt_started(a, t0 + ms(110));
        m.prompt_started(a, t0 + ms(120));
        // Another ComfyUI's prompts never close this one's gaps or count in its busy time.
        m.prompt_started("127.0.0.1:8189", t0 + ms(130));
        m.prompt_ended(a, t0 + ms(150));
        m.prompt_ended(a, t0 + ms(200));
        m.prompt_ended(a, t0 + ms(300));
        m.prompt_ended("127.0.0.1:8189", t0 + ms(400));
        let text = m.encode();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get("instance") == Some(a))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert_eq!(value("comfy_worker_comfy_idle_gap_seconds_count"), 1.0);
        assert!((value("comfy_worker_comfy_idle_gap_seconds_sum") - 0.010).abs() < 1e-9);
        assert!((value("comfy_worker_comfy_busy_seconds_total") - 0.190).abs() < 1e-9);
        let other = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "comfy_worker_comfy_busy_seconds_total"
                    && s.labels.get("instance") == Some("127.0.0.1:8189")
            })
            .expect("the second ComfyUI's busy time");
        assert!(
            matches!(
                other.value,
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v)
                    if (v - 0.270).abs() < 1e-9
            ),
            "{text}"
        );
    }
}
