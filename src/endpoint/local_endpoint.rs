//! The local endpoint: its job store and the queue runner, a single task that takes jobs in
//! submission order and runs them one at a time on the [`Runner`] (ComfyUI runs one prompt at
//! a time anyway), recording each one's progress and end in the store.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

use super::error::ApiError;
use super::job_status::JobStatus;
use super::store::{
    lock, Counts, End, Ending, Job, JobEvent, LastEvent, Started, State, EVENT_BUFFER,
};
use super::submission::Submission;
use super::{ServeOptions, WorkerMode};
use crate::housekeeping::warmup::WarmupState;
use crate::job::{DeadlineSource, Engine, JobRequest};
use crate::progress::ProgressSnapshot;
use crate::runner::{job_span, Controls, Deadline, Runner};
use crate::webhook::Webhooks;

/// The error of a job still queued when the endpoint shut down.
pub(super) const NOT_STARTED: &str =
    "The endpoint shut down before the job started; submit it again";

/// The local endpoint's jobs and their runner; cheap to clone.
///
/// [`LocalEndpoint::new`] starts the runner task; [`LocalEndpoint::close`] stops it taking jobs
/// (the running one gets the shutdown grace to finish, then it is interrupted).
#[derive(Clone)]
pub struct LocalEndpoint {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEndpoint")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    runner: Runner,
    webhooks: Webhooks,
    pub(super) options: ServeOptions,
    pub(super) state: Mutex<State>,
    /// Wakes the runner when a job is queued.
    wake: Notify,
    /// Cancelled by [`LocalEndpoint::close`]: the runner takes no new job, long replies end.
    pub(super) closing: CancellationToken,
    /// Cancelled when the runner task has ended.
    pub(super) stopped: CancellationToken,
    /// Progress-webhook deliveries still finishing, awaited (bounded) at shutdown.
    hooks: TaskTracker,
    /// Bumped when a job is queued or an external worker has a job to stop: wakes every
    /// long-polling job-take and job-stop (`serve --workers external`).
    pub(super) changes: watch::Sender<()>,
}

impl Ending {
    pub(super) fn deliver(self, inner: &Inner) {
        if let Some(url) = self.webhook {
            // Tracked, so a shutdown waits (bounded) for the final call to go out.
            let delivery = inner.webhooks.final_delivery(url, (*self.body).clone());
            inner.hooks.spawn(delivery.in_current_span());
        }
        if let Some((hook, last)) = self.hook {
            match last {
                LastEvent::Completed(output) => hook.completed(output),
                LastEvent::Failed(message, details) => hook.failed(&message, details.as_deref()),
            }
            inner.hooks.spawn(hook.finish());
        }
    }
}

impl LocalEndpoint {
    /// A store for `engine`'s jobs; starts the runner task (call inside a tokio runtime), unless
    /// the jobs are for external workers: then call `worker_hub::start`.
    pub fn new(engine: Engine, webhooks: Webhooks, options: ServeOptions) -> LocalEndpoint {
        let inner = Arc::new(Inner {
            runner: Runner::new(engine, options.shutdown_grace),
            webhooks,
            options,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: CancellationToken::new(),
            stopped: CancellationToken::new(),
            hooks: TaskTracker::new(),
            changes: watch::Sender::new(()),
        });
        // With external workers the hub (`worker_hub::start`) takes the runner's place.
        if inner.options.workers == WorkerMode::Internal {
            tokio::spawn(queue_runner(inner.clone()));
        }
        LocalEndpoint { inner }
    }

    /// The options it was built with.
    pub fn options(&self) -> &ServeOptions {
        &self.inner.options
    }

    /// The engine jobs run on.
    pub fn engine(&self) -> &Engine {
        self.inner.runner.engine()
    }

    /// The metrics its runner counts jobs in (`GET /metrics`).
    pub fn metrics(&self) -> crate::metrics::Metrics {
        self.inner.runner.metrics()
    }

    /// Stops taking jobs and ends event streams and `/runsync` waits; the running job gets the grace
    /// to finish before it is interrupted. New submissions are refused with 503.
    pub fn close(&self) {
        self.inner.closing.cancel();
        self.inner.wake.notify_one();
    }

    /// Resolves once the runner has ended (after [`LocalEndpoint::close`]) and progress webhooks
    /// have been handed over (at most 10 s more).
    pub async fn stopped(&self) {
        self.inner.stopped.cancelled().await;
        self.inner.hooks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.inner.hooks.wait()).await;
    }

    /// Where the warm-up is (`Off` without `WARMUP_WORKFLOW`).
    pub fn warmup(&self) -> WarmupState {
        self.inner.runner.warmup_state()
    }

    /// Cancelled once [`LocalEndpoint::close`] was called.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.inner.closing
    }

    /// The state, with expired jobs dropped first (so retention is applied on every request).
    fn fresh_state(&self) -> MutexGuard<'_, State> {
        let mut state = lock(&self.inner.state);
        state.evict(Instant::now(), self.inner.options.max_jobs);
        state
    }

    /// Queues a job; returns its id and a watch that gets its final `/status` body.
    pub(crate) async fn submit(
        &self,
        submission: Submission,
    ) -> Result<(String, watch::Receiver<Option<Arc<Value>>>), ApiError> {
        let webhooks = &self.inner.webhooks;
        let webhook = match &submission.webhook {
            Some(url) => Some(
                webhooks
                    .validate(url)
                    .await
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
            ),
            None => None,
        };
        let progress_webhook = match &submission.progress_webhook {
            Some(url) => Some(
                webhooks
                    .validate(url)
                    .await
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
            ),
            None => None,
        };
        if self.inner.closing.is_cancelled() {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the endpoint is shutting down",
            ));
        }
        if let WarmupState::Failed(why) = self.inner.runner.warmup_state() {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the worker is unhealthy and takes no jobs: {why}"),
            ));
        }
        let id = format!("{}-l1", uuid::Uuid::new_v4());
        let now = Instant::now();
        let mut state = self.fresh_state();
        let unfinished = state.jobs.values().filter(|j| !j.status.is_final()).count();
        let max_jobs = self.inner.options.max_jobs;
        if unfinished >= max_jobs {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!("{unfinished} jobs are queued or running, the most this endpoint keeps (--max-jobs); try again later"),
            ));
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (done, done_rx) = watch::channel(None);
        let seq = state.next_seq;
        state.next_seq += 1;
        let external = self.inner.options.workers == WorkerMode::External;
        let mut request = JobRequest::new(id.clone(), Some(submission.input))
            .with_s3_config(submission.s3_config);
        // An external worker delivers the progress webhook itself, as on RunPod.
        let progress_hook = match progress_webhook {
            Some(_) if external => {
                request = request.with_progress_webhook(submission.progress_webhook.clone());
                None
            }
            Some(url) => Some(webhooks.progress(url, &id)),
            None => None,
        };
        let job = Job {
            seq,
            request: Some(request),
            status: JobStatus::InQueue,
            submitted: now,
            started: None,
            ended: None,
            progress: None,
            final_body: None,
            cancel: CancellationToken::new(),
            execution_timeout: submission.execution_timeout,
            ttl: submission.ttl.unwrap_or(self.inner.options.job_ttl),
            webhook,
            progress_hook,
            events,
            done,
            worker: None,
        };
        state.jobs.insert(id.clone(), job);
        state.queue.push_back(id.clone());
        state.evict(now, max_jobs);
        let queued = state.queue.len();
        drop(state);
        info!(job_id = %id, queued, "job queued");
        self.inner.wake.notify_one();
        self.inner.changes.send_replace(());
        Ok((id, done_rx))
    }

    /// The job's `/status` body.
    pub(crate) fn status(&self, id: &str) -> Result<Arc<Value>, ApiError> {
        let state = self.fresh_state();
        let job = state
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::job_not_found(id))?;
        Ok(job.status_body(id, Instant::now()))
    }

    /// The `/status` body without applying retention (for a reply that is already under way).
    pub(crate) fn current_status(&self, id: &str) -> Option<Arc<Value>> {
        let state = lock(&self.inner.state);
        state
            .jobs
            .get(id)
            .map(|job| job.status_body(id, Instant::now()))
    }

    /// The `/stream` body: `{"id", "status", "stream": [...]}`; the handler is not a generator,
    /// so the stream holds the output once, when the job completed.
    pub(crate) fn stream(&self, id: &str) -> Result<Value, ApiError> {
        let body = self.status(id)?;
        let mut reply = Map::new();
        reply.insert("id".into(), json!(id));
        reply.insert("status".into(), body["status"].clone());
        let chunks = match (body["status"].as_str(), body.get("output")) {
            (Some("COMPLETED"), Some(output)) => vec![json!({ "output": output })],
            _ => Vec::new(),
        };
        reply.insert("stream".into(), Value::Array(chunks));
        if let Some(error) = body.get("error") {
            reply.insert("error".into(), error.clone());
        }
        Ok(Value::Object(reply))
    }

    /// The current body and a receiver for every later event, taken atomically.
    pub(crate) fn subscribe(
        &self,
        id: &str,
    ) -> Result<(Arc<Value>, broadcast::Receiver<JobEvent>), ApiError> {
        let state = self.fresh_state();
        let job = state
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::job_not_found(id))?;
        Ok((job.status_body(id, Instant::now()), job.events.subscribe()))
    }

    /// Cancels a job: a queued one at once, a running one through its token (the engine
    /// interrupts ComfyUI); a final one stays as it is. Returns its status now.
    pub(crate) fn cancel(&self, id: &str) -> Result<JobStatus, ApiError> {
        let now = Instant::now();
        let (status, ending) = {
            let mut state = self.fresh_state();
            let job = state
                .jobs
                .get(id)
                .ok_or_else(|| ApiError::job_not_found(id))?;
            match job.status {
                JobStatus::InQueue => {
                    state.queue.retain(|q| q != id);
                }
                JobStatus::InProgress => {
                    job.cancel.cancel();
                    if let Some(worker) = job.worker.clone() {
                        state.stops.entry(worker).or_default().push(id.to_owned());
                        self.inner.changes.send_replace(());
                    }
                }
                done => return Ok(done),
            }
            info!(job_id = %id, "job cancelled by the client");
            let ending = state.finalize(id, End::Cancelled, now);
            (JobStatus::Cancelled, ending)
        };
        if let Some(ending) = ending {
            ending.deliver(&self.inner);
        }
        Ok(status)
    }

    /// Removes every queued job (each ends as cancelled for its webhooks and event streams, then
    /// is dropped); returns how many.
    pub(crate) fn purge_queue(&self) -> usize {
        let now = Instant::now();
        let endings: Vec<Ending> = {
            let mut state = self.fresh_state();
            let ids: Vec<String> = state.queue.drain(..).collect();
            let mut endings = Vec::new();
            for id in &ids {
                if let Some(ending) = state.finalize(id, End::Cancelled, now) {
                    endings.push(ending);
                    state.jobs.remove(id);
                }
            }
            endings
        };
        let removed = endings.len();
        for ending in endings {
            ending.deliver(&self.inner);
        }
        if removed > 0 {
            info!(removed, "queue purged");
        }
        removed
    }

    /// Job counts for `/health`.
    pub(crate) fn counts(&self) -> Counts {
        let state = self.fresh_state();
        let mut counts = Counts {
            completed: state.completed,
            failed: state.failed,
            in_progress: 0,
            in_queue: 0,
            worker_busy: state.running.is_some(),
            workers: state.workers.len(),
            workers_busy: 0,
        };
        let mut busy = std::collections::HashSet::new();
        for job in state.jobs.values() {
            match job.status {
                JobStatus::InQueue => counts.in_queue += 1,
                JobStatus::InProgress => {
                    counts.in_progress += 1;
                    if let Some(w) = &job.worker {
                        busy.insert(w.as_str());
                    }
                }
                _ => {}
            }
        }
        counts.workers_busy = busy.len();
        counts
    }
}

#[cfg(test)]
impl LocalEndpoint {
    /// An endpoint whose jobs tests move by hand: no runner, no ComfyUI.
    pub(crate) fn without_runner() -> LocalEndpoint {
        let engine = Engine::new(crate::config::Settings::default()).expect("engine");
        let options = ServeOptions::default();
        LocalEndpoint {
            inner: Arc::new(Inner {
                runner: Runner::new(engine, options.shutdown_grace),
                webhooks: Webhooks::new(crate::webhook::WebhookPolicy::default()),
                options,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                closing: CancellationToken::new(),
                stopped: CancellationToken::new(),
                hooks: TaskTracker::new(),
                changes: watch::Sender::new(()),
            }),
        }
    }

    /// What the runner does when it takes the next job.
    pub(crate) fn start_next_by_hand(&self) -> Option<String> {
        lock(&self.inner.state)
            .start_next(Instant::now(), None)
            .map(|s| s.request.id)
    }

    /// What the runner does with a snapshot.
    pub(crate) fn progress_by_hand(&self, id: &str, snapshot: &ProgressSnapshot) {
        record_progress(&self.inner, id, snapshot);
    }

    /// What the runner does when the engine returned `completed`.
    pub(crate) fn complete_by_hand(&self, id: &str, completed: crate::job::Completed) {
        let ending = {
            let mut state = lock(&self.inner.state);
            state.running = None;
            state.finalize(id, End::Ran(Ok(completed)), Instant::now())
        };
        if let Some(ending) = ending {
            ending.deliver(&self.inner);
        }
    }
}

/// Takes queued jobs in order and runs them, one at a time, until the endpoint closes.
async fn queue_runner(inner: Arc<Inner>) {
    let _stopped = inner.stopped.clone().drop_guard();
    let healthy = inner.runner.warm_up(&inner.closing).await.is_ok();
    loop {
        if inner.closing.is_cancelled() {
            break;
        }
        if !healthy {
            // Unhealthy: jobs queued during the warm-up fail with its error, new ones are refused.
            if let WarmupState::Failed(why) = inner.runner.warmup_state() {
                end_queued(&inner, &why.to_string());
            }
            tokio::select! {
                _ = inner.closing.cancelled() => break,
                _ = inner.wake.notified() => continue,
            }
        }
        let next = lock(&inner.state).start_next(Instant::now(), None);
        match next {
            Some(job) => {
                let span = job_span(&job.request.id);
                run_job(&inner, job).instrument(span.clone()).await;
                // After the job's end is published, before the next one starts.
                inner.runner.after_job().instrument(span).await;
            }
            None => tokio::select! {
                _ = inner.closing.cancelled() => break,
                _ = inner.wake.notified() => {}
            },
        }
    }
    // Jobs still queued end now, failed, so their webhooks and event streams hear of it.
    let left = end_queued(&inner, NOT_STARTED);
    info!(queued_jobs_failed = left, "job runner stopped");
}

/// Ends every queued job as failed with `why`; returns how many.
pub(super) fn end_queued(inner: &Inner, why: &str) -> usize {
    let endings: Vec<Ending> = {
        let mut state = lock(&inner.state);
        let ids: Vec<String> = state.queue.drain(..).collect();
        let now = Instant::now();
        ids.iter()
            .filter_map(|id| state.finalize(id, End::NotRun(why.to_owned()), now))
            .collect()
    };
    let count = endings.len();
    for ending in endings {
        ending.deliver(inner);
    }
    count
}

/// Runs one job to its end and records the outcome (unless it was cancelled meanwhile).
async fn run_job(inner: &Inner, job: Started) {
    let Started {
        request,
        cancel,
        execution_timeout,
    } = job;
    let id = request.id.clone();
    let deadlines = [
        execution_timeout.map(|d| Deadline::new(d, DeadlineSource::Policy)),
        request
            .timeout
            .map(|d| Deadline::new(d, DeadlineSource::Input)),
    ];
    let controls = Controls {
        cancel,
        shutdown: Some(inner.closing.clone()),
        deadlines: deadlines.into_iter().flatten().collect(),
    };
    let mut record = |snapshot: &ProgressSnapshot| record_progress(inner, &id, snapshot);
    let result = inner
        .runner
        .run(&request, controls, &mut [&mut record])
        .await;
    let ending = {
        let mut state = lock(&inner.state);
        state.running = None;
        // None when the job was cancelled (or purged) meanwhile: its end is already recorded.
        state.finalize(&id, End::Ran(result), Instant::now())
    };
    if let Some(ending) = ending {
        ending.deliver(inner);
    }
}

/// Keeps the latest snapshot for `/status`, publishes it, and feeds the progress webhook.
fn record_progress(inner: &Inner, id: &str, snapshot: &ProgressSnapshot) {
    let json = Arc::new(snapshot.to_json());
    let mut state = lock(&inner.state);
    let Some(job) = state.jobs.get_mut(id) else {
        return;
    };
    if job.status != JobStatus::InProgress {
        return;
    }
    if let Some(hook) = &job.progress_hook {
        hook.snapshot(snapshot);
    }
    job.progress = Some(json.clone());
    let _ = job.events.send(JobEvent::Progress(json));
}
