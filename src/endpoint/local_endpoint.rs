//! The local endpoint: its job store and the queue runner, a single task that takes jobs in
//! submission order and runs them one at a time on the [`Runner`] (ComfyUI runs one prompt at
//! a time anyway), recording each one's progress and end in the store.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::error::ApiError;
use super::job_status::JobStatus;
use super::status_body::{ResultFolder, StatusBody};
use super::store::{
    lock, Counts, End, Ending, Job, JobEvent, LastEvent, Started, State, EVENT_BUFFER,
};
use super::submission::Submission;
use super::v2::job_record::V2Job;
use super::v2::outputs::{Collected, OutputCollector};
use super::v2::progress::progress_object;
use super::v2::V2State;
use super::{ServeOptions, WorkerMode};
use crate::housekeeping::warmup::WarmupState;
use crate::job::{DeadlineSource, Engine, JobRequest};
use crate::progress::{preview_body, NodeEvent, ProgressSnapshot};
use crate::runner::{job_span, Controls, Deadline, Pool, ProgressSink, Runner};
use crate::webhook::{ProgressHook, WebhookUrl, Webhooks};

/// How long a job's end waits for its outputs to be stored (v2), at most.
const OUTPUTS_BOUND: Duration = Duration::from_secs(120);

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
    /// One runner per ComfyUI; each runs one job at a time from the one queue.
    pool: Pool,
    webhooks: Webhooks,
    pub(super) options: ServeOptions,
    pub(super) state: Mutex<State>,
    /// Wakes the runner when a job is queued.
    wake: Notify,
    /// Cancelled by [`LocalEndpoint::close`]: the runner takes no new job, long replies end.
    pub(super) closing: CancellationToken,
    /// Cancelled when every runner task has ended.
    pub(super) stopped: CancellationToken,
    /// Where final bodies over `SERVE_RESULT_MEMORY_BYTES` go (`None`: the folder could not be
    /// made, every result stays in memory).
    results: Option<Arc<ResultFolder>>,
    /// Runner tasks still running (the last one out cancels `stopped`).
    runners_left: std::sync::atomic::AtomicUsize,
    /// Progress-webhook deliveries still finishing, awaited (bounded) at shutdown.
    hooks: TaskTracker,
    /// Bumped when a job is queued or an external worker has a job to stop: wakes every
    /// long-polling job-take and job-stop (`serve --workers external`).
    pub(super) changes: watch::Sender<()>,
    /// The Comfy API v2 surface's asset store and keys.
    v2: V2State,
}

/// A job to queue, from either surface.
pub(super) struct NewJob {
    pub(super) id: String,
    pub(super) request: JobRequest,
    pub(super) execution_timeout: Option<Duration>,
    pub(super) ttl: Duration,
    pub(super) webhook: Option<WebhookUrl>,
    pub(super) progress_webhook: Option<WebhookUrl>,
    pub(super) v2: Option<Box<V2Job>>,
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Refusal {
    /// The endpoint is shutting down.
    Closing,
    /// The warm-up failed: the worker takes no jobs.
    Unhealthy(String),
    /// This many jobs are queued or running, the most the endpoint keeps.
    Full(usize),
}

/// A job just queued: a watch for its final `/status` body, a receiver for its events (taken
/// as it was queued, so none is missed), and whether it starts at once.
pub(super) struct Queued {
    pub(super) done: watch::Receiver<Option<StatusBody>>,
    pub(super) events: broadcast::Receiver<JobEvent>,
    pub(super) starts_now: bool,
}

impl Ending {
    pub(super) fn deliver(self, inner: &Arc<Inner>) {
        if let Some(url) = self.webhook {
            // Tracked, so a shutdown waits (bounded) for the final call to go out.
            match self.body.value() {
                Ok(body) => {
                    let delivery = inner.webhooks.final_delivery(url, body);
                    inner.hooks.spawn(delivery.in_current_span());
                }
                Err(e) => {
                    warn!(error = %e, "the final webhook cannot be sent: its body cannot be read")
                }
            }
        }
        if let Some(folder) = &inner.results {
            // A large final body moves to a file; the store and `/runsync` waiters then hold the
            // file, not the megabytes.
            let store = Arc::downgrade(inner);
            let (id, held) = (self.id.clone(), self.body.clone());
            folder.store(self.id, self.body, move |file| {
                let Some(inner) = store.upgrade() else {
                    return;
                };
                let mut state = lock(&inner.state);
                if let Some(job) = state.jobs.get_mut(&id) {
                    if job.final_body.as_ref().is_some_and(|b| b.same(&held)) {
                        job.final_body = Some(file.clone());
                        job.done.send_replace(Some(file));
                    }
                }
            });
        }
        if let Some((hook, last)) = self.hook {
            match last {
                LastEvent::Completed(output) => hook.completed(output),
                LastEvent::Failed(message, details) => hook.failed(&message, details.as_deref()),
            }
            inner.hooks.spawn(hook.finish());
        }
        if let (false, Some(assets)) = (self.pins.is_empty(), &inner.v2.assets) {
            assets.unpin(&self.pins);
        }
    }
}

impl LocalEndpoint {
    /// A store for `engine`'s jobs; starts the runner task (call inside a tokio runtime) unless the
    /// jobs are for external workers (then `worker_hub::start` takes its place). When
    /// the Comfy API v2 asset store's directory cannot be made, the v2 surface runs without it
    /// (its asset routes answer 500); [`LocalEndpoint::try_new`] fails instead.
    pub fn new(engine: Engine, webhooks: Webhooks, options: ServeOptions) -> LocalEndpoint {
        let v2 = V2State::new(&options.v2).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot make the asset store's directory (SERVE_ASSET_DIR); /api/v2 runs without assets");
            V2State::with_assets(None)
        });
        LocalEndpoint::start(engine, webhooks, options, v2)
    }

    /// [`LocalEndpoint::new`], failing when the asset store's directory cannot be made.
    pub fn try_new(
        engine: Engine,
        webhooks: Webhooks,
        options: ServeOptions,
    ) -> std::io::Result<LocalEndpoint> {
        let v2 = V2State::new(&options.v2)?;
        Ok(LocalEndpoint::start(engine, webhooks, options, v2))
    }

    fn start(
        engine: Engine,
        webhooks: Webhooks,
        options: ServeOptions,
        v2: V2State,
    ) -> LocalEndpoint {
        let pool = Pool::new(Runner::new(engine, options.shutdown_grace));
        let results = match ResultFolder::create(
            options.results.dir.as_deref(),
            options.results.memory_bytes,
        ) {
            Ok(folder) => Some(Arc::new(folder)),
            Err(e) => {
                tracing::error!(error = %e, "cannot make the result folder (SERVE_RESULT_DIR); results stay in memory");
                None
            }
        };
        let inner = Arc::new(Inner {
            results,
            runners_left: std::sync::atomic::AtomicUsize::new(pool.len()),
            pool,
            webhooks,
            options,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: CancellationToken::new(),
            stopped: CancellationToken::new(),
            hooks: TaskTracker::new(),
            changes: watch::Sender::new(()),
            v2,
        });
        // With external workers the hub (`worker_hub::start`) takes the runners' place.
        if inner.options.workers == WorkerMode::Internal {
            for at in 0..inner.pool.len() {
                tokio::spawn(queue_runner(inner.clone(), at));
            }
        }
        LocalEndpoint { inner }
    }

    /// The Comfy API v2 surface's state.
    pub(super) fn v2(&self) -> &V2State {
        &self.inner.v2
    }

    /// The options it was built with.
    pub fn options(&self) -> &ServeOptions {
        &self.inner.options
    }

    /// The engine of the first ComfyUI (the others differ only in their address).
    pub fn engine(&self) -> &Engine {
        self.inner.pool.first().engine()
    }

    /// How many ComfyUIs run its jobs (one job each at a time).
    pub fn instances(&self) -> usize {
        self.inner.pool.len()
    }

    /// The clients of every ComfyUI its jobs run on, the first first.
    pub(crate) fn comfy_clients(&self) -> Vec<crate::comfy::ComfyClient> {
        (0..self.inner.pool.len())
            .map(|i| self.inner.pool.runner(i).engine().comfy().clone())
            .collect()
    }

    /// The metrics its runners count jobs in (`GET /metrics`).
    pub fn metrics(&self) -> crate::metrics::Metrics {
        self.inner.pool.metrics()
    }

    /// Stops taking jobs and ends event streams and `/runsync` waits; the running job gets the grace
    /// to finish before it is interrupted. New submissions are refused with 503.
    pub fn close(&self) {
        self.inner.closing.cancel();
        self.inner.wake.notify_waiters();
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
        self.inner.pool.warmup_state()
    }

    /// Cancelled once [`LocalEndpoint::close`] was called.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.inner.closing
    }

    /// The state, with expired jobs dropped first (so retention is applied on every request).
    pub(super) fn fresh_state(&self) -> MutexGuard<'_, State> {
        fresh(&self.inner)
    }

    /// Queues a job (see [`NewJob`]).
    pub(super) fn enqueue(&self, new: NewJob) -> Result<Queued, Refusal> {
        if self.inner.closing.is_cancelled() {
            return Err(Refusal::Closing);
        }
        if let WarmupState::Failed(why) = self.inner.pool.warmup_state() {
            return Err(Refusal::Unhealthy(why.to_string()));
        }
        let NewJob {
            id,
            request,
            execution_timeout,
            ttl,
            webhook,
            progress_webhook,
            v2,
        } = new;
        let now = Instant::now();
        let mut state = self.fresh_state();
        let unfinished = state.jobs.values().filter(|j| !j.status.is_final()).count();
        let max_jobs = self.inner.options.max_jobs;
        if unfinished >= max_jobs {
            return Err(Refusal::Full(unfinished));
        }
        let (events, events_rx) = broadcast::channel(EVENT_BUFFER);
        let (done, done_rx) = watch::channel(None);
        let seq = state.next_seq;
        state.next_seq += 1;
        let progress_hook: Option<ProgressHook> = progress_webhook.map(|url| {
            self.inner
                .webhooks
                .progress(url, &id)
                .with_previews(request.previews)
        });
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
            execution_timeout,
            ttl,
            webhook,
            progress_hook,
            events,
            done,
            worker: None,
            preview: None,
            v2,
        };
        let starts_now = state.queue.is_empty() && state.running.len() < self.inner.pool.len();
        state.jobs.insert(id.clone(), job);
        state.queue.push_back(id.clone());
        let dropped = state.evict(now, max_jobs);
        let queued = state.queue.len();
        drop(state);
        self.forget_outputs(&dropped);
        info!(job_id = %id, queued, "job queued");
        self.inner.wake.notify_one();
        self.inner.changes.send_replace(());
        Ok(Queued {
            done: done_rx,
            events: events_rx,
            starts_now,
        })
    }

    fn forget_outputs(&self, jobs: &[String]) {
        if let (false, Some(assets)) = (jobs.is_empty(), &self.inner.v2.assets) {
            assets.forget_jobs(jobs);
        }
    }

    /// Drops a job that never became one for its client (ComfyUI refused a v2 submission).
    pub(super) fn discard(&self, id: &str) {
        let removed = self.fresh_state().jobs.remove(id).is_some();
        if removed {
            self.forget_outputs(&[id.to_owned()]);
        }
    }

    /// Queues a job; returns its id and a watch that gets its final `/status` body.
    pub(crate) async fn submit(
        &self,
        submission: Submission,
    ) -> Result<(String, watch::Receiver<Option<StatusBody>>), ApiError> {
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
        let id = format!("{}-l1", uuid::Uuid::new_v4());
        let mut request = JobRequest::new(id.clone(), Some(submission.input))
            .with_s3_config(submission.s3_config);
        // An external worker delivers the progress webhook itself, as on RunPod.
        let progress_webhook = match progress_webhook {
            Some(_) if self.inner.options.workers == WorkerMode::External => {
                request = request.with_progress_webhook(submission.progress_webhook.clone());
                None
            }
            other => other,
        };
        let new = NewJob {
            id: id.clone(),
            request,
            execution_timeout: submission.execution_timeout,
            ttl: submission.ttl.unwrap_or(self.inner.options.job_ttl),
            webhook,
            progress_webhook,
            v2: None,
        };
        let queued = self.enqueue(new).map_err(|refusal| match refusal {
            Refusal::Closing => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the endpoint is shutting down",
            ),
            Refusal::Unhealthy(why) => ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("the worker is unhealthy and takes no jobs: {why}"),
            ),
            Refusal::Full(unfinished) => ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!("{unfinished} jobs are queued or running, the most this endpoint keeps (--max-jobs); try again later"),
            ),
        })?;
        Ok((id, queued.done))
    }

    /// The job's `/status` body.
    pub(crate) fn status(&self, id: &str) -> Result<StatusBody, ApiError> {
        let state = self.fresh_state();
        let job = state
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::job_not_found(id))?;
        Ok(job.status_body(id, Instant::now()))
    }

    /// The `/status` body without applying retention (for a reply that is already under way).
    pub(crate) fn current_status(&self, id: &str) -> Option<StatusBody> {
        let state = lock(&self.inner.state);
        state
            .jobs
            .get(id)
            .map(|job| job.status_body(id, Instant::now()))
    }

    /// A running job's latest live preview.
    pub(crate) fn preview(&self, id: &str) -> Option<Arc<Value>> {
        let state = self.fresh_state();
        let job = state.jobs.get(id)?;
        (job.status == JobStatus::InProgress)
            .then(|| job.preview.clone())
            .flatten()
    }

    /// The `/stream` body: `{"id", "status", "stream": [...]}`; the handler is not a generator,
    /// so the stream holds the running job's latest preview (`{"output": {"preview": …}}`), and
    /// the output once, when the job completed.
    pub(crate) fn stream(&self, id: &str) -> Result<Value, ApiError> {
        let body = self.status(id)?.value().map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("the job's stored result cannot be read: {e}"),
            )
        })?;
        let preview = self.preview(id);
        let mut reply = Map::new();
        reply.insert("id".into(), json!(id));
        reply.insert("status".into(), body["status"].clone());
        let chunks = match (body["status"].as_str(), body.get("output"), preview) {
            (Some("COMPLETED"), Some(output), _) => vec![json!({ "output": output })],
            (Some("IN_PROGRESS"), _, Some(preview)) => {
                vec![json!({ "output": { "preview": *preview } })]
            }
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
    ) -> Result<(StatusBody, broadcast::Receiver<JobEvent>), ApiError> {
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
                    state.queue_moved();
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
            drop(state);
            self.forget_outputs(&ids);
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
            running: state.running.len(),
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
                pool: Pool::new(Runner::new(engine, options.shutdown_grace)),
                results: None,
                runners_left: std::sync::atomic::AtomicUsize::new(1),
                webhooks: Webhooks::new(crate::webhook::WebhookPolicy::default()),
                options,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                closing: CancellationToken::new(),
                stopped: CancellationToken::new(),
                hooks: TaskTracker::new(),
                changes: watch::Sender::new(()),
                v2: V2State::new(&super::v2::V2Options::default())
                    .unwrap_or_else(|_| V2State::with_assets(None)),
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
            state.running.remove(id);
            state.finalize(id, End::Ran(Ok(completed)), Instant::now())
        };
        if let Some(ending) = ending {
            ending.deliver(&self.inner);
        }
    }
}

/// Takes queued jobs in order and runs them on ComfyUI `at`, one at a time, until the endpoint
/// closes; one such task per ComfyUI drains the one queue. A ComfyUI the pool set aside takes no
/// job until it answers again.
async fn queue_runner(inner: Arc<Inner>, at: usize) {
    let _stopped = RunnerExit(&inner);
    let runner = inner.pool.runner(at);
    let mut health = inner.pool.subscribe();
    let healthy = runner.warm_up(&inner.closing).await.is_ok();
    loop {
        // Registered before the checks, so a job queued meanwhile wakes this task.
        let woken = inner.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if inner.closing.is_cancelled() {
            break;
        }
        if !healthy {
            // Unhealthy: jobs queued during the warm-up fail with its error, new ones are refused.
            if let WarmupState::Failed(why) = runner.warmup_state() {
                end_queued(&inner, &why.to_string());
            }
            tokio::select! {
                _ = inner.closing.cancelled() => break,
                _ = woken => continue,
            }
        }
        let next = if inner.pool.takes_jobs(at) {
            lock(&inner.state).start_next(Instant::now(), None)
        } else {
            None
        };
        match next {
            Some(job) => {
                // Another runner may be idle for the next queued job.
                inner.wake.notify_one();
                let span = job_span(&job.request.id);
                run_job(&inner, at, job).instrument(span.clone()).await;
                // After the job's end is published, before the next one starts.
                runner.after_job().instrument(span).await;
            }
            None => tokio::select! {
                _ = inner.closing.cancelled() => break,
                _ = woken => {}
                Ok(()) = health.changed() => {}
            },
        }
    }
}

/// Counts a runner task out when it ends (also if it panicked). The last one out ends the jobs
/// still queued, failed, so their webhooks and event streams hear of it, then cancels `stopped`.
struct RunnerExit<'a>(&'a Arc<Inner>);

impl Drop for RunnerExit<'_> {
    fn drop(&mut self) {
        let inner = self.0;
        if inner
            .runners_left
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            let left = end_queued(inner, NOT_STARTED);
            info!(queued_jobs_failed = left, "job runner stopped");
            inner.stopped.cancel();
        }
    }
}

/// Ends every queued job as failed with `why`; returns how many.
pub(super) fn end_queued(inner: &Arc<Inner>, why: &str) -> usize {
    end_jobs(inner, why, |state| state.queue.drain(..).collect())
}

/// Ends the jobs `pick` names (taken under the store's lock) as failed with `why`, then tells
/// their clients; returns how many ended.
pub(super) fn end_jobs(
    inner: &Arc<Inner>,
    why: &str,
    pick: impl FnOnce(&mut State) -> Vec<String>,
) -> usize {
    let endings: Vec<Ending> = {
        let mut state = lock(&inner.state);
        let ids = pick(&mut state);
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

/// The state, with expired jobs dropped first (their v2 outputs with them).
fn fresh(inner: &Inner) -> MutexGuard<'_, State> {
    let mut state = lock(&inner.state);
    let dropped = state.evict(Instant::now(), inner.options.max_jobs);
    if let (false, Some(assets)) = (dropped.is_empty(), &inner.v2.assets) {
        assets.forget_jobs(&dropped);
    }
    state
}

/// Runs one job to its end and records the outcome (unless it was cancelled meanwhile).
async fn run_job(inner: &Arc<Inner>, at: usize, job: Started) {
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
    // A v2 job: its outputs are stored as its nodes finish; the blobs its inputs come from are
    // held until it has run.
    let pins = {
        let mut state = lock(&inner.state);
        state
            .jobs
            .get_mut(&id)
            .and_then(|j| j.v2.as_mut())
            .map(|v2| std::mem::take(&mut v2.pins))
    };
    let collector = pins.is_some().then(|| {
        OutputCollector::start(
            id.clone(),
            inner.pool.runner(at).engine().comfy().clone(),
            inner.v2.assets.clone(),
            publisher(inner.clone(), id.clone()),
        )
    });
    let mut sink = EndpointSink {
        inner,
        id: &id,
        collector: collector.as_ref(),
    };
    let result = inner
        .pool
        .runner(at)
        .run(&request, controls, &mut [&mut sink])
        .await;
    inner.pool.job_ended(at, &result);
    if let Some(collector) = collector {
        collector.finish(OUTPUTS_BOUND).await;
    }
    let ending = {
        let mut state = lock(&inner.state);
        state.running.remove(&id);
        if let Some(job) = state.jobs.get_mut(&id) {
            if let Some(v2) = &mut job.v2 {
                // Nothing runs for it any more: a cancelled job is now `canceled`.
                v2.settled = true;
                let _ = job.events.send(JobEvent::V2Changed);
            }
        }
        // None when the job was cancelled (or purged) meanwhile: its end is already recorded.
        state.finalize(&id, End::Ran(result), Instant::now())
    };
    if let Some(ending) = ending {
        ending.deliver(inner);
    }
    if let (Some(pins), Some(assets)) = (pins, &inner.v2.assets) {
        assets.unpin(&pins);
    }
}

/// Where a v2 job's collected outputs go: into its record and onto its event stream.
fn publisher(inner: Arc<Inner>, id: String) -> super::v2::outputs::Publish {
    Box::new(move |collected: Collected| {
        let mut state = lock(&inner.state);
        let Some(job) = state.jobs.get_mut(&id) else {
            return;
        };
        let Job { v2, events, .. } = job;
        let Some(v2) = v2 else {
            return;
        };
        match collected {
            Collected::Output(output) => {
                let output = Arc::new(output);
                v2.outputs.push(output.clone());
                let _ = events.send(JobEvent::V2Output(output));
            }
            Collected::Log { level, message } => {
                let _ = events.send(JobEvent::V2Log(Arc::new(
                    json!({"level": level, "message": message}),
                )));
            }
        }
    })
}

/// The runner's sink for a job of the endpoint: progress for `/status`, the event streams and
/// the progress webhook; for a v2 job also its outputs (to the collector), previews, node text
/// and node failure.
struct EndpointSink<'a> {
    inner: &'a Inner,
    id: &'a str,
    collector: Option<&'a OutputCollector>,
}

impl ProgressSink for EndpointSink<'_> {
    fn snapshot(&mut self, snapshot: &ProgressSnapshot) {
        record_progress(self.inner, self.id, snapshot);
    }

    fn node_event(&mut self, event: &NodeEvent) {
        if let NodeEvent::Preview {
            node,
            mime,
            data,
            size,
        } = event
        {
            let size = size.unwrap_or_default();
            publish_preview(self.inner, self.id, node.as_deref(), mime, data, size);
        }
        let Some(collector) = self.collector else {
            return;
        };
        if let NodeEvent::Output(output) = event {
            collector.push(output.clone());
            return;
        }
        let mut state = lock(&self.inner.state);
        let Some(job) = state.jobs.get_mut(self.id) else {
            return;
        };
        let Job { v2, events, .. } = job;
        let Some(v2) = v2 else {
            return;
        };
        match event {
            // Published above, for either surface.
            NodeEvent::Output(_) | NodeEvent::Preview { .. } => {}
            NodeEvent::Text { node, text } => {
                let _ = events.send(JobEvent::V2Log(Arc::new(
                    json!({"level": "info", "message": format!("node {node}: {text}")}),
                )));
            }
            NodeEvent::Failed(failure) => {
                v2.node_failure = Some(failure.clone());
            }
        }
    }
}

/// Keeps a running job's latest preview (the page and `/stream` show it) and publishes it on
/// its event stream, its progress webhook (when asked) and, for a v2 job, as the contract's
/// `preview` event: encoded once. The runner's gate already held it to the rate and size caps.
fn publish_preview(
    inner: &Inner,
    id: &str,
    node: Option<&str>,
    mime: &str,
    data: &[u8],
    (width, height): (u32, u32),
) {
    let mut state = lock(&inner.state);
    let Some(job) = state.jobs.get_mut(id) else {
        return;
    };
    if job.status != JobStatus::InProgress {
        return;
    }
    let node = node.map(str::to_owned).or_else(|| {
        job.progress
            .as_ref()
            .and_then(|p| p["node"].as_str().map(str::to_owned))
    });
    let mut body = preview_body(node.as_deref(), mime, data);
    if let Some(hook) = &job.progress_hook {
        hook.preview(body.clone());
    }
    if let Some(v2) = &mut job.v2 {
        let preview = Arc::new(json!({
            "node_id": node.unwrap_or_default(),
            "content_type": mime,
            "data_base64": body["data"],
        }));
        v2.preview = Some(preview.clone());
        let _ = job.events.send(JobEvent::V2Preview(preview));
    }
    body["width"] = json!(width);
    body["height"] = json!(height);
    let preview = Arc::new(body);
    job.preview = Some(preview.clone());
    let _ = job.events.send(JobEvent::Preview(preview));
}

/// Keeps the latest snapshot for `/status`, publishes it, and feeds the progress webhook; for
/// a v2 job also its `Progress` object (published when it changed).
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
    if let Some(v2) = &mut job.v2 {
        let object = progress_object(snapshot);
        if v2.progress.as_deref() != Some(&object) {
            let object = Arc::new(object);
            v2.progress = Some(object.clone());
            let _ = job.events.send(JobEvent::V2Progress(object));
        }
    }
}
