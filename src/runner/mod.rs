//! The one job runner: every front end (the RunPod loop, Lambda, the local endpoint, `run`)
//! hands it a [`JobRequest`] and gets back the job's typed result. It owns the job's lifecycle
//! from accepted to delivered, so no front end repeats it:
//!
//! * the **deadlines** (the earliest of those the front end passes wins; a Lambda deadline also
//!   bounds the wind-down, after which the job is dropped and its prompt interrupted),
//! * **cancellation** (the front end's token: platform stop, client cancel, Ctrl-C),
//! * the **shutdown grace** (after the worker's shutdown token fires, the job gets
//!   `SHUTDOWN_GRACE_S` to finish before it is interrupted),
//! * the **panic catch** (a panicking job fails alone; the worker keeps serving),
//! * the **progress fan-out** to any number of [`ProgressSink`]s (snapshots, and what nodes
//!   produced on the way: outputs as each node finishes, previews, text),
//! * the **warm-up** (`WARMUP_WORKFLOW`, run once before the first job; its state gates `serve`),
//! * the **housekeeping**: `CLEANUP_FILES` before the result is returned, and
//!   [`Runner::after_job`] (`FREE_MEMORY_AFTER_JOB`) for the front end to call once the result
//!   is delivered,
//! * the job's **secrets**, scrubbed from its messages.
//!
//! A completed job's output always stands, even when a deadline or the shutdown grace ran out
//! as it completed: a finished result is the most expensive thing the worker holds.

mod pool;

pub use pool::Pool;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument, Span};

use crate::housekeeping::warmup::{self, WarmupDone, WarmupError, WarmupState};
use crate::job::{
    Completed, DeadlineSource, Engine, Job, JobFailure, JobFiles, JobRequest, Report,
};
use crate::metrics::{JobOutcome, Metrics};
use crate::progress::{self, NodeEvent, PreviewGate, ProgressKind, ProgressSnapshot, Update};

/// The job id the warm-up runs under (in logs and ComfyUI's prompt history).
pub const WARMUP_JOB_ID: &str = "warmup";

/// A limit on a job's run time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadline {
    /// How long the job may run.
    pub after: Duration,
    /// Which limit it is (it names the setting in the failure's message).
    pub source: DeadlineSource,
    /// Once the deadline passed and the prompt is being interrupted, how long the job may still
    /// take to wind down before it is dropped (`None`: as long as it takes).
    pub wind_down: Option<Duration>,
}

impl Deadline {
    /// A deadline without a wind-down bound.
    pub fn new(after: Duration, source: DeadlineSource) -> Deadline {
        Deadline {
            after,
            source,
            wind_down: None,
        }
    }
}

/// What bounds and stops one job.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// The front end's cancel (platform stop, client cancel, Ctrl-C): the job ends as
    /// [`JobFailure::Cancelled`].
    pub cancel: CancellationToken,
    /// The worker's shutdown: the job gets the shutdown grace, then it is interrupted.
    pub shutdown: Option<CancellationToken>,
    /// The job's deadlines; the earliest wins.
    pub deadlines: Vec<Deadline>,
}

/// Where a job's progress goes. Called for every snapshot and node event, in order, on the
/// job's task: a sink must never block (queue what it cannot hand over at once).
pub trait ProgressSink: Send {
    /// One snapshot.
    fn snapshot(&mut self, snapshot: &ProgressSnapshot);

    /// What a node produced or reported (its outputs as it finished, a preview, text, its
    /// failure). Ignored unless the sink wants it.
    fn node_event(&mut self, _event: &NodeEvent) {}
}

impl<F: FnMut(&ProgressSnapshot) + Send> ProgressSink for F {
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        self(snapshot)
    }
}

/// Why the runner cut a job short.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    Deadline(Deadline),
    Shutdown,
}

/// The job span every front end logs a job's lines under (`job_id` is what the JSON log
/// format reports as `requestId`). An id with control characters is shown escaped, so it cannot
/// break a text log line or forge one.
pub fn job_span(job_id: &str) -> Span {
    if job_id.chars().any(char::is_control) {
        tracing::info_span!("job", job_id = %job_id.escape_debug())
    } else {
        tracing::info_span!("job", job_id = %job_id)
    }
}

/// Whether the current span is a job's ([`job_span`]): a line logged there shows the job id in
/// its prefix already, so it does not repeat it as a field.
pub fn in_job_span() -> bool {
    Span::current()
        .metadata()
        .is_some_and(|m| m.name() == "job")
}

/// Runs jobs on one engine; cheap to clone.
#[derive(Debug, Clone)]
pub struct Runner {
    engine: Engine,
    shutdown_grace: Duration,
    warmup: Arc<watch::Sender<WarmupState>>,
    /// Where every job's outcome, timings and result size are counted (`None`: the warm-up).
    metrics: Option<Metrics>,
}

impl Runner {
    /// A runner for `engine`, giving running jobs `shutdown_grace` to finish at shutdown.
    pub fn new(engine: Engine, shutdown_grace: Duration) -> Runner {
        Runner {
            engine,
            shutdown_grace,
            warmup: Arc::new(watch::Sender::new(WarmupState::Off)),
            metrics: Some(Metrics::new()),
        }
    }

    /// A runner like this one (its shutdown grace and metrics) for another engine, with a
    /// warm-up of its own.
    pub fn for_engine(&self, engine: Engine) -> Runner {
        Runner {
            engine,
            shutdown_grace: self.shutdown_grace,
            warmup: Arc::new(watch::Sender::new(WarmupState::Off)),
            metrics: self.metrics.clone(),
        }
    }

    /// The same runner counting into `metrics` (shared with the front end that serves them).
    pub fn with_metrics(mut self, metrics: Metrics) -> Runner {
        self.metrics = Some(metrics);
        self
    }

    /// The metrics jobs are counted in.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone().unwrap_or_default()
    }

    /// The engine jobs run on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The shutdown grace.
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace
    }

    /// Runs one job to its result: reads the request (a bad input fails at once), then
    /// [`Runner::run_job`].
    pub async fn run(
        &self,
        request: &JobRequest,
        controls: Controls,
        sinks: &mut [&mut dyn ProgressSink],
    ) -> Result<Completed, JobFailure> {
        let job = match Job::parse(request) {
            Ok(job) => job,
            Err(failure) => {
                info!(error = %failure, "job input rejected");
                if let Some(metrics) = &self.metrics {
                    metrics.job_ended(JobOutcome::Failed, Duration::ZERO);
                }
                return Err(failure);
            }
        };
        self.run_job(job, controls, sinks).await
    }

    /// Runs a job already read (see [`Job::parse`]) within its controls, with its progress
    /// going to every sink.
    pub async fn run_job(
        &self,
        job: Job,
        controls: Controls,
        sinks: &mut [&mut dyn ProgressSink],
    ) -> Result<Completed, JobFailure> {
        let taken = Instant::now();
        let mut observed = PromptClock::new(self.engine.comfy().host());
        let Controls {
            cancel,
            shutdown,
            deadlines,
        } = controls;
        let deadline = deadlines
            .into_iter()
            .reduce(|a, b| if b.after < a.after { b } else { a });
        let cut: Arc<Mutex<Option<Cut>>> = Arc::default();
        let (wind_down_tx, wind_down_rx) = tokio::sync::oneshot::channel::<Duration>();
        let watchdog = tokio::spawn(watchdog(
            cancel.clone(),
            shutdown,
            deadline,
            self.shutdown_grace,
            cut.clone(),
            wind_down_tx,
        ));

        let (sender, mut updates) = progress::channel();
        let run = async {
            let mut engine_run =
                Box::pin(AssertUnwindSafe(self.engine.run(&job, &sender, &cancel)).catch_unwind());
            // Past a deadline with a wind-down bound, the job is dropped: its prompt watcher
            // interrupts the prompt as it goes.
            let dropped = async {
                match wind_down_rx.await {
                    Ok(bound) => tokio::time::sleep(bound).await,
                    Err(_) => std::future::pending().await,
                }
            };
            let out = tokio::select! {
                out = &mut engine_run => Some(out),
                _ = dropped => None,
            };
            drop(engine_run);
            // Closing the channel ends the fan-out below.
            drop(sender);
            out
        };
        let mut previews = PreviewGate::new(self.engine.settings().previews.clone());
        let fan_out = async {
            while let Some(mut update) = updates.recv().await {
                match &mut update {
                    Update::Snapshot(snapshot) => {
                        if let Some(metrics) = &self.metrics {
                            observed.snapshot(metrics, taken, snapshot);
                        }
                    }
                    // Every sink sees the same previews: those within the rate and size caps,
                    // with the size the gate read.
                    Update::Node(NodeEvent::Preview { data, size, .. }) => {
                        match previews.admit(Instant::now(), data) {
                            Ok(read) => *size = Some(read),
                            Err(why) => {
                                tracing::trace!(?why, bytes = data.len(), "preview not relayed");
                                continue;
                            }
                        }
                    }
                    Update::Node(_) => {}
                    Update::Retry(reason) => {
                        if let Some(metrics) = &self.metrics {
                            metrics.retry(*reason);
                        }
                        continue;
                    }
                }
                for sink in sinks.iter_mut() {
                    match &update {
                        Update::Snapshot(snapshot) => sink.snapshot(snapshot),
                        Update::Node(event) => sink.node_event(event),
                        Update::Retry(_) => {}
                    }
                }
            }
        };
        let (out, ()) = tokio::join!(run, fan_out);
        watchdog.abort();

        let (result, files) = match out {
            Some(Ok(ran)) => (ran.result, ran.files),
            Some(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                error!(panic = %what, "the job panicked");
                (Err(JobFailure::Panic(what)), JobFiles::default())
            }
            None => {
                warn!("the job did not wind down in time; it was dropped");
                (
                    Err(JobFailure::Cancelled(Report::new(String::new()))),
                    JobFiles::default(),
                )
            }
        };
        let cut = *cut.lock().unwrap_or_else(|p| p.into_inner());
        let result = match (cut, result) {
            // A completed job's output stands, whatever happened as it completed.
            (_, Ok(completed)) => Ok(completed),
            (Some(Cut::Deadline(d)), Err(_)) => Err(JobFailure::Deadline {
                after: d.after,
                source: d.source,
            }),
            (Some(Cut::Shutdown), Err(_)) => {
                warn!(
                    grace_s = self.shutdown_grace.as_secs_f64(),
                    "the job did not finish within the shutdown grace; it was interrupted"
                );
                Err(JobFailure::Shutdown {
                    grace: self.shutdown_grace,
                })
            }
            (None, Err(failure)) if cancel.is_cancelled() => Err(match failure {
                JobFailure::Cancelled(report) => JobFailure::Cancelled(report),
                other => JobFailure::Cancelled(other.into_report()),
            }),
            (None, Err(failure)) => Err(failure),
        };
        if self.engine.settings().housekeeping.cleanup_files {
            self.clean_up(files).await;
        }
        if let Some(metrics) = &self.metrics {
            observed.end(metrics);
            count(metrics, &result, taken.elapsed());
        }
        // While the job (and so its secrets) is alive.
        let result = scrub(result);
        drop(job);
        result
    }

    /// `FREE_MEMORY_AFTER_JOB`: for the front end to call once a job's result is delivered,
    /// before it takes the next one.
    pub async fn after_job(&self) {
        crate::housekeeping::after_job(&self.engine).await;
    }

    /// Where the warm-up is (`Off` without `WARMUP_WORKFLOW`).
    pub fn warmup_state(&self) -> WarmupState {
        self.warmup.borrow().clone()
    }

    /// `WARMUP_WORKFLOW`: runs it once (no-op without it) and logs its outcome in one line.
    /// `Err` is the reason the worker is unhealthy. `shutdown` cancels it.
    pub async fn warm_up(&self, shutdown: &CancellationToken) -> Result<(), WarmupError> {
        let Some(path) = self.engine.settings().housekeeping.warmup_workflow.clone() else {
            return Ok(());
        };
        self.warmup.send_replace(WarmupState::Running);
        let started = Instant::now();
        info!(file = %path.display(), "warm-up started");
        let outcome = self
            .warm_up_job(&path, shutdown)
            .instrument(job_span(WARMUP_JOB_ID))
            .await;
        let elapsed = started.elapsed();
        let state = match outcome {
            Ok(files) => {
                info!(
                    file = %path.display(),
                    ok = true,
                    elapsed_ms = elapsed.as_millis() as u64,
                    files,
                    "warm-up finished"
                );
                WarmupState::Done(WarmupDone { elapsed, files })
            }
            Err(why) => {
                error!(
                    file = %path.display(),
                    ok = false,
                    elapsed_ms = elapsed.as_millis() as u64,
                    error = %why,
                    "warm-up finished"
                );
                WarmupState::Failed(why)
            }
        };
        let result = match &state {
            WarmupState::Failed(why) => Err(why.clone()),
            _ => Ok(()),
        };
        self.warmup.send_replace(state);
        result
    }

    /// The warm-up as a job: progress at debug level, outputs counted and dropped.
    async fn warm_up_job(
        &self,
        path: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> Result<usize, WarmupError> {
        let input = warmup::load(path)?;
        let request = JobRequest::new(WARMUP_JOB_ID, Some(input));
        let controls = Controls {
            cancel: shutdown.child_token(),
            ..Controls::default()
        };
        let mut log = |s: &ProgressSnapshot| {
            debug!(
                kind = ?s.kind,
                node = s.node.as_deref().unwrap_or(""),
                overall_percent = s.overall_percent,
                "warm-up progress"
            );
        };
        // The warm-up is not a job: it is not counted.
        let uncounted = Runner {
            metrics: None,
            ..self.clone()
        };
        match uncounted.run(&request, controls, &mut [&mut log]).await {
            // The outputs (base64 perhaps) are dropped here, unlogged.
            Ok(completed) => Ok(completed.files().len()),
            Err(failure) => Err(WarmupError::Job(failure)),
        }
    }

    /// `CLEANUP_FILES`: deletes what the job left in ComfyUI's folders (its outputs are
    /// already collected and delivered by now) and logs the counts.
    async fn clean_up(&self, files: JobFiles) {
        if files.is_empty() {
            return;
        }
        let dirs = self.engine.settings().housekeeping.clone();
        let done = tokio::task::spawn_blocking(move || {
            crate::housekeeping::cleanup::delete_job_files(&dirs, &files)
        })
        .await;
        match done {
            Ok(report) => info!(
                deleted = report.deleted,
                missing = report.missing,
                refused = report.refused,
                failed = report.failed,
                "job files cleaned up"
            ),
            Err(e) => warn!(error = %e, "the clean-up task failed"),
        }
    }
}

/// Cancels the job when its deadline passes, or when the shutdown grace ends after the
/// worker's shutdown; records why in `cut`. Ends quietly when the job is cancelled otherwise.
async fn watchdog(
    cancel: CancellationToken,
    shutdown: Option<CancellationToken>,
    deadline: Option<Deadline>,
    grace: Duration,
    cut: Arc<Mutex<Option<Cut>>>,
    wind_down: tokio::sync::oneshot::Sender<Duration>,
) {
    let at_deadline = async {
        match deadline {
            Some(d) => {
                tokio::time::sleep(d.after).await;
                d
            }
            None => std::future::pending().await,
        }
    };
    let after_grace = async {
        match &shutdown {
            Some(token) => {
                token.cancelled().await;
                // Give the job time to finish on its own before interrupting it.
                tokio::time::sleep(grace).await;
            }
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        d = at_deadline => Cut::Deadline(d),
        _ = after_grace => Cut::Shutdown,
        _ = cancel.cancelled() => return,
    };
    if let Cut::Deadline(d) = why {
        info!(
            after_s = d.after.as_secs_f64(),
            "time is up: interrupting the job"
        );
        if let Some(bound) = d.wind_down {
            let _ = wind_down.send(bound);
        }
    }
    cut.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(why);
    cancel.cancel();
}

/// Where a job's prompt is in ComfyUI, for the busy/idle metrics: started when its `started`
/// snapshot passes, ended at its first terminal snapshot (or when the job returns).
#[derive(Debug)]
struct PromptClock {
    /// The ComfyUI it runs on.
    instance: String,
    started: bool,
    ended: bool,
}

impl PromptClock {
    fn new(instance: &str) -> PromptClock {
        PromptClock {
            instance: instance.to_owned(),
            started: false,
            ended: false,
        }
    }

    fn snapshot(&mut self, metrics: &Metrics, taken: Instant, snapshot: &ProgressSnapshot) {
        let now = Instant::now();
        match snapshot.kind {
            ProgressKind::Started if !self.started => {
                self.started = true;
                metrics.queue_waited(now.saturating_duration_since(taken));
                metrics.prompt_started(&self.instance, now);
            }
            ProgressKind::Finished | ProgressKind::Error | ProgressKind::Interrupted => {
                self.end(metrics)
            }
            _ => {}
        }
    }

    fn end(&mut self, metrics: &Metrics) {
        if self.started && !self.ended {
            self.ended = true;
            metrics.prompt_ended(&self.instance, Instant::now());
        }
    }
}

/// Counts a job's outcome, duration and returned bytes.
fn count(metrics: &Metrics, result: &Result<Completed, JobFailure>, took: Duration) {
    let outcome = match result {
        Ok(completed) => {
            let bytes: usize = completed.files().iter().map(|f| f.data.len()).sum();
            metrics.result_bytes(bytes as u64);
            JobOutcome::Completed
        }
        Err(JobFailure::Cancelled(_)) => JobOutcome::Cancelled,
        Err(JobFailure::Deadline { .. }) => JobOutcome::Timeout,
        Err(JobFailure::Shutdown { .. }) => JobOutcome::Shutdown,
        Err(_) => JobOutcome::Failed,
    };
    metrics.job_ended(outcome, took);
}

/// The job's secrets (live while the job is) removed from its messages.
fn scrub(result: Result<Completed, JobFailure>) -> Result<Completed, JobFailure> {
    let clean = |text: &str| crate::secret::scrub(text).into_owned();
    match result {
        Ok(completed) => Ok(completed.map_warnings(clean)),
        Err(failure) => Err(failure.map_text(clean)),
    }
}
