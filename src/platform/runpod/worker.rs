//! The job loop and its two companions: the heartbeat and the stop channel, each on its own task
//! so job work never delays them. A job's progress webhook, if it names one, is fed from the same
//! snapshots as the relay and never delays the job or its result either.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::client::{result_body, Delivery, PlatformClient, PlatformJob, Take};
use super::relay::Relay;
use crate::job::{Engine, JobOptions, JobOutput};
use crate::progress::{self, ProgressSnapshot};
use crate::webhook::{ProgressHook, Webhooks};

/// Why a running job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    /// The platform's stop channel named it: post nothing.
    Stopped,
    /// Its deadline passed: post a timeout error.
    TimedOut,
    /// The worker is shutting down: post what the job produced (an interruption error).
    Shutdown,
}

/// How a job ended, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The result was posted.
    Posted(Delivery),
    /// Stopped by the platform; nothing posted.
    Stopped,
}

struct Running {
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
}

#[derive(Default)]
struct State {
    /// Taken but unfinished jobs (what the ping reports).
    held: BTreeSet<String>,
    /// The job being run now.
    running: HashMap<String, Running>,
}

/// The RunPod worker: a job loop plus heartbeat and stop-channel tasks.
pub struct Worker {
    engine: Engine,
    client: PlatformClient,
    webhooks: Webhooks,
    state: Arc<Mutex<State>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Worker {
    /// A worker running jobs on `engine` for the platform behind `client`, delivering jobs'
    /// progress webhooks through `webhooks`.
    pub fn new(engine: Engine, client: PlatformClient, webhooks: Webhooks) -> Worker {
        Worker {
            engine,
            client,
            webhooks,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Runs until `shutdown` is cancelled (then the job in progress finishes and is posted) or,
    /// with `REFRESH_WORKER`, until the first job is done.
    ///
    /// With `WARMUP_WORKFLOW`, the warm-up runs first, before the heartbeat and the first
    /// job-take (as the SDK's start-up checks do). If it fails, no job is taken: one
    /// `status=unhealthy&check=warmup` ping is sent (the SDK's fitness-check report) and the
    /// error is returned, for the process to exit non-zero so the platform replaces the worker.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), String> {
        let settings = self.client.settings().clone();
        info!(
            worker_id = %settings.worker_id,
            progress = settings.relay_progress,
            heartbeat = settings.ping_url_for(&[]).is_some(),
            stop_channel = settings.stop_url().is_some(),
            "RunPod worker started"
        );
        if let Some(path) = &self.engine.settings().housekeeping.warmup_workflow {
            let warmed = crate::ops::warmup::run(&self.engine, path, &shutdown).await;
            if shutdown.is_cancelled() {
                info!("RunPod worker stopped during the warm-up");
                return Ok(());
            }
            if let Err(why) = warmed {
                self.client.report_unhealthy("warmup", &why).await;
                error!(error = %why, "the worker is unhealthy and takes no job; exiting");
                return Err(why);
            }
            // No `/free` after it: the point is to keep what it loaded.
        }
        let companions = CancellationToken::new();
        let heartbeat = tokio::spawn(self.heartbeat(companions.clone()));
        let stops = tokio::spawn(self.stop_channel(companions.clone()));
        let mut backoff = Duration::from_secs(1);
        while !shutdown.is_cancelled() {
            let in_progress = !lock(&self.state).held.is_empty();
            let started = Instant::now();
            let take = tokio::select! {
                _ = shutdown.cancelled() => break,
                t = self.client.take(in_progress) => t,
            };
            match take {
                Take::Jobs(jobs) => {
                    backoff = Duration::from_secs(1);
                    {
                        let mut st = lock(&self.state);
                        st.held.extend(jobs.iter().map(|j| j.id.clone()));
                    }
                    for job in jobs {
                        self.run_job(job, &shutdown).await;
                    }
                    if settings.refresh_worker {
                        info!("REFRESH_WORKER is set: exiting after the job");
                        break;
                    }
                }
                Take::NoJob => {
                    backoff = Duration::from_secs(1);
                    // A platform that answers at once instead of long-polling must not be hammered.
                    let floor = Duration::from_millis(250);
                    if let Some(rest) = floor.checked_sub(started.elapsed()) {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(rest) => {}
                        }
                    }
                }
                Take::RateLimited => {
                    warn!("job-take rate limited (HTTP 429); waiting 5 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
                Take::Failed(e) => {
                    warn!(error = %e, retry_in_s = backoff.as_secs(), "Failed to get job");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        companions.cancel();
        let _ = heartbeat.await;
        let _ = stops.await;
        info!("RunPod worker stopped");
        Ok(())
    }

    fn heartbeat(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let client = self.client.clone();
        let state = self.state.clone();
        async move {
            if client.settings().ping_url_for(&[]).is_none() {
                return;
            }
            let mut tick = tokio::time::interval(client.settings().ping_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let held: Vec<String> = lock(&state).held.iter().cloned().collect();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = client.ping(&held) => {}
                }
            }
        }
    }

    fn stop_channel(
        &self,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let client = self.client.clone();
        let state = self.state.clone();
        async move {
            if client.settings().stop_url().is_none() {
                return;
            }
            loop {
                let polled = Instant::now();
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = client.stopped_jobs() => r,
                };
                let pause = match result {
                    Ok(ids) => {
                        let st = lock(&state);
                        for id in &ids {
                            if let Some(running) = st.running.get(id) {
                                info!(job_id = %id, "the platform stopped the job");
                                lock(&running.reason).get_or_insert(CancelReason::Stopped);
                                running.cancel.cancel();
                            }
                        }
                        // The SDK's 1 s floor between polls that return at once.
                        Duration::from_secs(1).saturating_sub(polled.elapsed())
                    }
                    Err((why, wait)) => {
                        warn!(error = %why, "job-stop poll failed");
                        wait.min(Duration::from_secs(30))
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Runs one job and posts its result (unless the platform stopped it).
    pub async fn run_job(&self, job: PlatformJob, shutdown: &CancellationToken) -> JobEnd {
        let span = tracing::info_span!("job", job_id = %job.id);
        // Whether ComfyUI gets to run anything for it (else there is nothing to free).
        let runs = job.unreadable.is_none() && !shutdown.is_cancelled();
        let end = self
            .run_job_inner(&job, shutdown)
            .instrument(span.clone())
            .await;
        lock(&self.state).held.remove(&job.id);
        if runs {
            // After the result post (no delay for the client), before the next job-take.
            crate::ops::after_job(&self.engine).instrument(span).await;
        }
        end
    }

    async fn run_job_inner(&self, job: &PlatformJob, shutdown: &CancellationToken) -> JobEnd {
        let settings = self.client.settings();
        if let Some(why) = &job.unreadable {
            // Its id is all that could be read: answer it at once rather than leave it hanging.
            warn!(error = %why, "the job cannot be read; answering it with an error");
            let output = JobOutput::error(why.clone()).into_json();
            return self.post_result(job, output).await;
        }
        if shutdown.is_cancelled() {
            // The rest of a batch taken before SIGTERM: answered at once, so no job is left
            // waiting for a worker that is going away.
            info!("not started: the worker is shutting down");
            let output = JobOutput::error(NOT_STARTED).into_json();
            JobWebhook::start(&self.webhooks, job).end(Some(&output));
            return self.post_result(job, output).await;
        }
        info!("Started.");
        let shutdown_grace = settings.shutdown_grace;
        let cancel = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        lock(&self.state).running.insert(
            job.id.clone(),
            Running {
                cancel: cancel.clone(),
                reason: reason.clone(),
            },
        );
        let timeout = job_timeout(settings.job_timeout, job.input.as_ref());
        let watchdog = {
            let cancel = cancel.clone();
            let reason = reason.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let deadline = async {
                    match timeout {
                        Some(t) => tokio::time::sleep(t).await,
                        None => std::future::pending().await,
                    }
                };
                let why = tokio::select! {
                    _ = deadline => CancelReason::TimedOut,
                    _ = shutdown.cancelled() => CancelReason::Shutdown,
                    _ = cancel.cancelled() => return,
                };
                if why == CancelReason::Shutdown {
                    // Give the job time to finish on its own before interrupting it.
                    tokio::select! {
                        _ = tokio::time::sleep(shutdown_grace) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
                lock(&reason).get_or_insert(why);
                cancel.cancel();
            })
        };

        let (sender, mut snapshots) = progress::channel();
        let relay = settings
            .relay_progress
            .then(|| Relay::start(self.client.clone(), job.id.clone()));
        let mut webhook = JobWebhook::start(&self.webhooks, job);
        let forward = async {
            while let Some(s) = snapshots.recv().await {
                webhook.snapshot(&s);
                if let Some(relay) = &relay {
                    relay.update(s.to_json());
                }
            }
        };
        let engine = &self.engine;
        let run_cancel = cancel.clone();
        let options = JobOptions {
            s3_config: job.s3_config.clone(),
        };
        let run = async move {
            // A panic in the engine fails this job only; the worker keeps serving.
            let out = AssertUnwindSafe(engine.run_with(
                &job.id,
                job.input.as_ref(),
                &options,
                &sender,
                &run_cancel,
            ))
            .catch_unwind()
            .await;
            // Closing the channel ends the forwarding below.
            drop(sender);
            out
        };
        let (output, ()) = tokio::join!(run, forward);
        let output = output.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            error!(panic = %what, "the job panicked");
            JobOutput::error(format!(
                "Internal error in comfy-worker: {}",
                crate::telemetry::scrub(&what)
            ))
        });
        watchdog.abort();
        lock(&self.state).running.remove(&job.id);
        let why = *lock(&reason);
        let output = match why {
            Some(CancelReason::Stopped) => None,
            Some(CancelReason::TimedOut) => {
                let secs = timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
                Some(
                    JobOutput::error(format!(
                        "Job timed out after {} s (JOB_TIMEOUT_S or input.timeout_s); the ComfyUI prompt was interrupted",
                        humane_seconds(secs)
                    ))
                    .to_json(),
                )
            }
            // Unless it completed just as the grace ran out: then its output stands.
            Some(CancelReason::Shutdown) if output.is_error() => {
                warn!(
                    grace_s = shutdown_grace.as_secs_f64(),
                    "the job did not finish within the shutdown grace; it was interrupted"
                );
                Some(JobOutput::error(shutdown_message(shutdown_grace)).into_json())
            }
            Some(CancelReason::Shutdown) | None => Some(output.into_json()),
        };
        // Before the relay drains, so the webhook's final event is on its way at once.
        webhook.end(output.as_ref());
        if let Some(relay) = relay {
            // A stopped job posts nothing more; otherwise /status is brought up to date first.
            let drain = why != Some(CancelReason::Stopped);
            let stats = relay.finish(drain).await;
            info!(
                posted = stats.posted,
                failed = stats.failed,
                coalesced = stats.coalesced,
                "progress relay finished"
            );
        }

        let Some(output) = output else {
            info!("Finished. (stopped by the platform; nothing posted)");
            return JobEnd::Stopped;
        };
        self.post_result(job, output).await
    }

    /// Posts a job's result (with the platform's retries) and logs how it went. Takes the output
    /// by value: it holds megabytes of base64, never copied.
    async fn post_result(&self, job: &PlatformJob, output: Value) -> JobEnd {
        let settings = self.client.settings();
        let failed = output.get("error").is_some();
        let body = result_body(output, settings.refresh_worker);
        let delivery = self.client.post_result(&job.id, &body).await;
        drop(body);
        match &delivery {
            Delivery::Delivered => info!(failed, "Finished."),
            Delivery::Lost(e) => error!(error = %e, "Failed to return job results."),
        }
        JobEnd::Posted(delivery)
    }
}

/// A job's progress webhook: off, being checked (snapshots wait), or running.
enum JobWebhook {
    Off,
    Checking {
        check: JoinHandle<Option<ProgressHook>>,
        early: Vec<ProgressSnapshot>,
    },
    Ready(ProgressHook),
}

impl JobWebhook {
    /// Checks the job's `progress_webhook` on a task of its own (a DNS lookup must not hold up
    /// the job); an invalid or refused URL is logged and the job runs without it.
    fn start(webhooks: &Webhooks, job: &PlatformJob) -> JobWebhook {
        let Some(url) = job.progress_webhook.clone() else {
            return JobWebhook::Off;
        };
        let webhooks = webhooks.clone();
        let job_id = job.id.clone();
        let check = tokio::spawn(
            async move {
                match webhooks.validate(&url).await {
                    Ok(url) => {
                        info!("progress webhook accepted");
                        Some(webhooks.progress(url, &job_id))
                    }
                    Err(e) => {
                        warn!(error = %e, "progress webhook ignored; the job runs without it");
                        None
                    }
                }
            }
            .in_current_span(),
        );
        JobWebhook::Checking {
            check,
            early: Vec::new(),
        }
    }

    /// Passes a snapshot on, or keeps it until the check is done. Never blocks.
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        if let JobWebhook::Checking { check, early } = self {
            match check.now_or_never() {
                None => {
                    early.push(snapshot.clone());
                    return;
                }
                Some(checked) => {
                    *self = match checked.ok().flatten() {
                        Some(hook) => {
                            early.drain(..).for_each(|s| hook.snapshot(&s));
                            JobWebhook::Ready(hook)
                        }
                        None => JobWebhook::Off,
                    }
                }
            }
        }
        if let JobWebhook::Ready(hook) = self {
            hook.snapshot(snapshot);
        }
    }

    /// Sends the final event for `output` (`None`: stopped by the platform) and lets the hook
    /// deliver what is queued, on a task of its own: the result post never waits for it.
    fn end(self, output: Option<&Value>) {
        if matches!(self, JobWebhook::Off) {
            return;
        }
        let end = match output {
            None => Err(("Job cancelled".to_owned(), None)),
            Some(out) => match failure(out) {
                Some(failed) => Err(failed),
                None => Ok(out.clone()),
            },
        };
        tokio::spawn(
            async move {
                let hook = match self {
                    JobWebhook::Off => return,
                    JobWebhook::Ready(hook) => hook,
                    JobWebhook::Checking { check, early } => match check.await {
                        Ok(Some(hook)) => {
                            early.iter().for_each(|s| hook.snapshot(s));
                            hook
                        }
                        _ => return,
                    },
                };
                match end {
                    Ok(result) => hook.completed(&result),
                    Err((message, details)) => hook.failed(&message, details.as_deref()),
                }
                hook.finish().await;
            }
            .in_current_span(),
        );
    }
}

/// The error message and details of a failed job's output; `None` for a success.
fn failure(output: &Value) -> Option<(String, Option<Vec<String>>)> {
    let message = match output.get("error")? {
        Value::Null | Value::Bool(false) => return None,
        Value::String(s) if s.is_empty() => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let details = output.get("details").and_then(Value::as_array).map(|list| {
        list.iter()
            .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_owned))
            .collect()
    });
    Some((message, details))
}

/// `2.5`, `30`, `600`: seconds without noise.
fn humane_seconds(secs: f64) -> String {
    if secs < 10.0 && secs.fract() != 0.0 {
        format!("{secs:.1}")
    } else {
        format!("{secs:.0}")
    }
}

/// The result of a job taken in a batch but not started before SIGTERM.
pub(crate) const NOT_STARTED: &str =
    "Worker shutting down: the job was not started; submit it again";

/// The error of a job interrupted because it outlived the shutdown grace (both front ends).
pub fn shutdown_message(grace: Duration) -> String {
    format!(
        "Worker shutting down: the job did not finish within the {} s shutdown grace (SHUTDOWN_GRACE_S), so its ComfyUI prompt was interrupted",
        humane_seconds(grace.as_secs_f64())
    )
}

/// The job's deadline: `JOB_TIMEOUT_S`, or the input's `timeout_s` when shorter (or when no
/// worker-wide timeout is set).
fn job_timeout(worker: Option<Duration>, input: Option<&Value>) -> Option<Duration> {
    let requested = input
        .and_then(|i| i.get("timeout_s"))
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(7.0 * 86_400.0)));
    match (worker, requested) {
        (Some(w), Some(r)) => Some(w.min(r)),
        (w, r) => w.or(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_timeout_takes_the_shorter() {
        let s = Duration::from_secs;
        assert_eq!(job_timeout(None, None), None);
        assert_eq!(job_timeout(Some(s(60)), None), Some(s(60)));
        assert_eq!(
            job_timeout(None, Some(&json!({"timeout_s": 5}))),
            Some(s(5))
        );
        assert_eq!(
            job_timeout(Some(s(60)), Some(&json!({"timeout_s": 600}))),
            Some(s(60))
        );
        assert_eq!(
            job_timeout(Some(s(60)), Some(&json!({"timeout_s": "x"}))),
            Some(s(60))
        );
        assert_eq!(job_timeout(None, Some(&json!({"timeout_s": -1}))), None);
    }

    #[test]
    fn failures_for_the_webhook() {
        assert_eq!(failure(&json!({"images": []})), None);
        assert_eq!(failure(&json!({"error": "", "images": []})), None);
        assert_eq!(failure(&json!({"error": null})), None);
        assert_eq!(
            failure(&json!({"error": "boom"})),
            Some(("boom".into(), None))
        );
        assert_eq!(
            failure(&json!({"error": "boom", "details": ["a", 1]})),
            Some(("boom".into(), Some(vec!["a".into(), "1".into()])))
        );
    }
}
