//! Shared helpers: fast settings, running a job while collecting its progress, decoding outputs.

use std::path::PathBuf;
use std::time::Duration;

use comfy_worker::config::{PreviewPolicy, Settings};
use comfy_worker::job::{codec, Completed, Engine, JobOutput, JobRequest};
use comfy_worker::progress::ProgressSnapshot;
use comfy_worker::runner::{Controls, Runner};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single test step; a hang fails the test instead of CI.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Settings pointing at `host` with timings suited to tests (fast reconnects and polls).
pub fn settings(host: &str) -> Settings {
    Settings {
        comfy_host: host.parse().expect("a valid ComfyUI address"),
        api_available_interval: Duration::from_millis(10),
        ready_timeout: Some(Duration::from_millis(30)),
        comfy_pid_file: None,
        ws_reconnect_attempts: 3,
        ws_reconnect_delay: Duration::from_millis(20),
        ws_silence_timeout: Duration::from_millis(300),
        history_poll_interval: Duration::from_millis(30),
        // Every preview (a test counts them; the rate cap has its own tests).
        previews: PreviewPolicy {
            max_per_second: 1e9,
            ..PreviewPolicy::default()
        },
        ..Settings::default()
    }
}

pub fn engine(host: &str) -> Engine {
    Engine::new(settings(host)).expect("engine")
}

/// The repository's fixtures directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/comfyui")
}

/// A recorded workflow (`tests/fixtures/comfyui/workflows/<name>.json`).
pub fn workflow(name: &str) -> Value {
    let path = fixtures().join("workflows").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

/// The repository's test_input.json.
pub fn test_input() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test_input.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("test_input.json")).expect("json")
}

/// A job in progress: its output future runs on a task, its snapshots arrive on `progress`.
pub struct RunningJob {
    pub output: tokio::task::JoinHandle<JobOutput>,
    pub progress: UnboundedReceiver<ProgressSnapshot>,
    pub cancel: CancellationToken,
    /// What the runner counted.
    pub metrics: comfy_worker::metrics::Metrics,
}

pub fn spawn_job(engine: &Engine, input: Value) -> RunningJob {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let engine = engine.clone();
    let token = cancel.clone();
    let metrics = comfy_worker::metrics::Metrics::new();
    let counted = metrics.clone();
    // Through the runner, as every front end runs a job (no deadline: the tests' own bound).
    let output = tokio::spawn(async move {
        let runner = Runner::new(engine, Duration::ZERO).with_metrics(counted);
        let request = JobRequest::new("test-job", Some(input));
        let controls = Controls {
            cancel: token,
            ..Controls::default()
        };
        let mut to_test = |s: &ProgressSnapshot| {
            let _ = tx.send(s.clone());
        };
        JobOutput::from(runner.run(&request, controls, &mut [&mut to_test]).await)
    });
    RunningJob {
        output,
        progress: rx,
        cancel,
        metrics,
    }
}

impl RunningJob {
    /// Waits for the first snapshot matching `pred`, returning every snapshot seen up to it.
    pub async fn until(
        &mut self,
        pred: impl Fn(&ProgressSnapshot) -> bool,
    ) -> Vec<ProgressSnapshot> {
        let mut seen = Vec::new();
        let wait = async {
            while let Some(s) = self.progress.recv().await {
                let hit = pred(&s);
                seen.push(s);
                if hit {
                    return true;
                }
            }
            false
        };
        let found = tokio::time::timeout(LIMIT, wait)
            .await
            .expect("timed out waiting for progress");
        assert!(
            found,
            "job ended before the expected progress; saw {seen:#?}"
        );
        seen
    }

    /// Waits for the output and the rest of the snapshots.
    pub async fn finish(mut self) -> (JobOutput, Vec<ProgressSnapshot>) {
        let output = tokio::time::timeout(LIMIT, self.output)
            .await
            .expect("job timed out")
            .expect("job task panicked");
        let mut rest = Vec::new();
        while let Ok(s) = self.progress.try_recv() {
            rest.push(s);
        }
        (output, rest)
    }
}

/// Runs a job to its end.
pub async fn run_job(engine: &Engine, input: Value) -> (JobOutput, Vec<ProgressSnapshot>) {
    spawn_job(engine, input).finish().await
}

/// Decodes a base64 PNG and returns its (width, height).
pub fn png_size(b64: &str) -> (u32, u32) {
    let bytes = codec::decode_input(b64).expect("base64");
    assert!(bytes.starts_with(&[0x89, b'P', b'N', b'G']), "not a PNG");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("PNG header");
    let info = reader.info();
    (info.width, info.height)
}

/// The images of a successful output.
pub fn images(output: &JobOutput) -> Vec<(String, String)> {
    match output {
        JobOutput::Completed(Completed::Images { images, .. }) => images
            .iter()
            .map(|i| {
                (
                    i.filename.clone(),
                    i.data.to_text().expect("readable").into_owned(),
                )
            })
            .collect(),
        other => panic!("expected images, got {}", other.to_json()),
    }
}

/// The error text of a failed output.
pub fn error_text(output: &JobOutput) -> String {
    match output {
        JobOutput::Failed { error, .. } => error.clone(),
        other => panic!("expected an error, got {}", other.to_json()),
    }
}

/// Sampler steps seen for `node`, in order.
pub fn steps_of(snapshots: &[ProgressSnapshot], node: &str) -> Vec<u64> {
    snapshots
        .iter()
        .filter(|s| {
            s.kind == comfy_worker::progress::ProgressKind::Progress
                && s.node.as_deref() == Some(node)
        })
        .map(|s| s.value.0 as u64)
        .collect()
}

/// Logs to the test output when `TEST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("TEST_LOG").unwrap_or_default(),
            ))
            .with_test_writer()
            .try_init();
    }
}

/// Removes from `cmd` every variable of the caller's environment that comfy-worker reads, so a
/// developer's shell (a `COMFY_HOST`, a `BUCKET_*`, a `WARMUP_WORKFLOW`, …) cannot change what a
/// test of the binary sees. Call it first: what the test sets afterwards stands.
pub fn clear_worker_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    const PREFIXES: &[&str] = &[
        "RUNPOD_",
        "COMFY_",
        "BUCKET_",
        "WEBHOOK_",
        "INPUT_URL_",
        "LAMBDA_",
        "AWS_LAMBDA_",
        "WEBSOCKET_",
        "ALLOW_PRIVATE_",
        "PREVIEW_",
        "MODEL_",
    ];
    const NAMES: &[&str] = &[
        "JOB_TIMEOUT_S",
        "REFRESH_WORKER",
        "OUTPUT_UPLOAD",
        "MAX_INLINE_OUTPUT_BYTES",
        "SHUTDOWN_GRACE_S",
        "SERVE_API_KEY",
        "SERVE_API_LOCALLY",
        "START_COMFYUI",
        "WARMUP_WORKFLOW",
        "FREE_MEMORY_AFTER_JOB",
        "CLEANUP_FILES",
        "METRICS_PORT",
        "METRICS_ADDR",
        "PIPELINE",
        "RUST_LOG",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name.as_ref()) {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// A `/metrics` reply read with a Prometheus text parser (`prometheus-parse`).
pub struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    pub fn parse(text: &str) -> Scraped {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Scraped(prometheus_parse::Scrape::parse(lines).expect("Prometheus text"))
    }

    /// The value of the sample `name` whose labels include `labels`; `None` when absent.
    /// (OpenMetrics names a counter's sample `NAME_total` and a histogram's `NAME_count`; the
    /// parser gives those as untyped samples, which is what they are read as here.)
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// Like [`Scraped::value`], 0 when the series is absent (a labelled counter never
    /// incremented is not listed).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// A histogram's observations, from its `+Inf` bucket (and its `_count`, which must agree).
    pub fn histogram_count(&self, name: &str) -> u64 {
        let inf = self
            .0
            .samples
            .iter()
            .find(|s| s.metric == name)
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than == f64::INFINITY)
                    .map(|b| b.count),
                _ => None,
            })
            .unwrap_or_else(|| panic!("histogram {name} missing"));
        let count = self.value(&format!("{name}_count"), &[]);
        assert_eq!(count, Some(inf), "{name}: _count and +Inf bucket differ");
        inf as u64
    }
}
