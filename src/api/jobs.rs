//! The job store and the runner: jobs are kept by id with their status, timings, latest progress
//! snapshot and final `/status` body; a single runner task takes them in submission order and
//! runs them one at a time on the engine (ComfyUI runs one prompt at a time anyway).
//!
//! Every status change and snapshot is also published on the job's broadcast channel (what
//! `/events/{id}` streams; a lagging subscriber skips, it never holds up the job) and the final
//! body on a watch channel (what `/runsync` waits on).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

use super::error::ApiError;
use super::ServeOptions;
use crate::housekeeping::warmup::WarmupState;
use crate::job::output::result_body;
use crate::job::request::MAX_JOB_TIMEOUT;
use crate::job::{Completed, DeadlineSource, Engine, JobFailure, JobOutput, JobRequest};
use crate::progress::ProgressSnapshot;
use crate::runner::{job_span, Controls, Deadline, Runner};
use crate::webhook::{ProgressHook, WebhookUrl, Webhooks};

/// What `/status` reports as `workerId`: there is one worker, this process.
const WORKER_ID: &str = "local";

/// The error of a job still queued when the endpoint shut down.
const NOT_STARTED: &str = "The endpoint shut down before the job started; submit it again";

/// Events buffered per job for `/events` subscribers; one that falls further behind skips.
pub(crate) const EVENT_BUFFER: usize = 256;

/// The longest `policy.executionTimeout` / `policy.ttl` accepted (the cloud's 7 days).
const MAX_POLICY: Duration = MAX_JOB_TIMEOUT;

/// A job's state, as the cloud endpoint names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Waiting for the runner.
    InQueue,
    /// Running on ComfyUI.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled (`/cancel`, `/purge-queue`).
    Cancelled,
    /// `policy.executionTimeout` passed; the prompt was interrupted.
    TimedOut,
}

impl JobStatus {
    /// The wire name (`IN_QUEUE`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
            JobStatus::TimedOut => "TIMED_OUT",
        }
    }

    /// True once the job can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::InQueue | JobStatus::InProgress)
    }
}

/// True when a `/status` body has a final status.
pub(crate) fn body_is_final(body: &Value) -> bool {
    !matches!(
        body.get("status").and_then(Value::as_str),
        Some("IN_QUEUE") | Some("IN_PROGRESS")
    )
}

/// What a job's event stream carries.
#[derive(Debug, Clone)]
pub(crate) enum JobEvent {
    /// The new `/status` body.
    Status(Arc<Value>),
    /// A progress snapshot as JSON.
    Progress(Arc<Value>),
}

/// A `/run` or `/runsync` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Submission {
    pub(crate) input: Value,
    pub(crate) webhook: Option<String>,
    pub(crate) progress_webhook: Option<String>,
    pub(crate) execution_timeout: Option<Duration>,
    pub(crate) ttl: Option<Duration>,
    /// `s3Config` on the job (the engine also reads `input.s3Config`).
    pub(crate) s3_config: Option<Value>,
}

impl Submission {
    /// Checks `{"input": …, "webhook"?, "progress_webhook"?, "policy"?: {"executionTimeout"?, "ttl"?}}`;
    /// `progress_webhook` may also sit inside `input`.
    pub(crate) fn parse(body: Value) -> Result<Submission, ApiError> {
        let Value::Object(mut body) = body else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object like {\"input\": {...}}",
            ));
        };
        let input = match body.remove("input") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad_request(
                    "missing 'input': the request body must look like {\"input\": {...}}",
                ))
            }
            Some(v) => v,
        };
        let webhook = url_field(body.get("webhook"), "webhook")?;
        let progress_webhook = match url_field(body.get("progress_webhook"), "progress_webhook")? {
            Some(url) => Some(url),
            None => url_field(input.get("progress_webhook"), "input.progress_webhook")?,
        };
        let (execution_timeout, ttl) = match body.get("policy") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(policy)) => (
                millis_field(policy.get("executionTimeout"), "policy.executionTimeout")?,
                millis_field(policy.get("ttl"), "policy.ttl")?,
            ),
            Some(_) => return Err(ApiError::bad_request("'policy' must be an object")),
        };
        let s3_config = body.remove("s3Config").filter(|v| !v.is_null());
        Ok(Submission {
            input,
            webhook,
            progress_webhook,
            execution_timeout,
            ttl,
            s3_config,
        })
    }
}

fn url_field(value: Option<&Value>, name: &str) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(ApiError::bad_request(format!(
            "'{name}' must be a URL string"
        ))),
    }
}

fn millis_field(value: Option<&Value>, name: &str) -> Result<Option<Duration>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                // Clamped before the conversion, which panics beyond `u64::MAX` seconds.
                let secs = (ms / 1000.0).min(MAX_POLICY.as_secs_f64());
                Ok(Some(Duration::from_secs_f64(secs)))
            }
            _ => Err(ApiError::bad_request(format!(
                "'{name}' must be a positive number of milliseconds"
            ))),
        },
    }
}

/// Job counts for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Jobs completed since start.
    pub(crate) completed: u64,
    /// Jobs failed or timed out since start.
    pub(crate) failed: u64,
    pub(crate) in_progress: usize,
    pub(crate) in_queue: usize,
    /// The runner is busy (also while a cancelled job is still being interrupted).
    pub(crate) worker_busy: bool,
}

/// The local endpoint's jobs and their runner; cheap to clone.
///
/// [`LocalEndpoint::new`] starts the runner task; [`LocalEndpoint::close`] stops it taking jobs
/// (the running one gets the shutdown grace to finish, then it is interrupted).
#[derive(Clone)]
pub struct LocalEndpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEndpoint")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct Inner {
    runner: Runner,
    webhooks: Webhooks,
    options: ServeOptions,
    state: Mutex<State>,
    /// Wakes the runner when a job is queued.
    wake: Notify,
    /// Cancelled by [`LocalEndpoint::close`]: the runner takes no new job, long replies end.
    closing: CancellationToken,
    /// Cancelled when the runner task has ended.
    stopped: CancellationToken,
    /// Progress-webhook deliveries still finishing, awaited (bounded) at shutdown.
    hooks: TaskTracker,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, Job>,
    /// Queued job ids, in submission order.
    queue: VecDeque<String>,
    /// The job the runner is on (it may already be CANCELLED while ComfyUI is interrupted).
    running: Option<String>,
    next_seq: u64,
    completed: u64,
    failed: u64,
}

struct Job {
    /// Submission order, to break ties when dropping old jobs.
    seq: u64,
    /// Taken by the runner when the job starts.
    request: Option<JobRequest>,
    status: JobStatus,
    submitted: Instant,
    started: Option<Instant>,
    ended: Option<Instant>,
    /// The latest snapshot while running.
    progress: Option<Arc<Value>>,
    /// The `/status` body once final (timings no longer change).
    final_body: Option<Arc<Value>>,
    cancel: CancellationToken,
    execution_timeout: Option<Duration>,
    /// How long the job is kept once final.
    ttl: Duration,
    webhook: Option<WebhookUrl>,
    progress_hook: Option<ProgressHook>,
    events: broadcast::Sender<JobEvent>,
    done: watch::Sender<Option<Arc<Value>>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Job {
    fn status_body(&self, id: &str, now: Instant) -> Arc<Value> {
        if let Some(body) = &self.final_body {
            return body.clone();
        }
        Arc::new(self.build_body(id, now, self.progress.as_deref(), None))
    }

    fn build_body(
        &self,
        id: &str,
        now: Instant,
        output: Option<&Value>,
        error: Option<&Value>,
    ) -> Value {
        let until_start = self.started.or(self.ended).unwrap_or(now);
        let delay = until_start.saturating_duration_since(self.submitted);
        let execution = self
            .started
            .map(|s| self.ended.unwrap_or(now).saturating_duration_since(s))
            .unwrap_or_default();
        let mut body = Map::new();
        body.insert("id".into(), json!(id));
        body.insert("status".into(), json!(self.status.as_str()));
        body.insert("delayTime".into(), json!(millis(delay)));
        body.insert("executionTime".into(), json!(millis(execution)));
        body.insert("workerId".into(), json!(WORKER_ID));
        if let Some(output) = output {
            body.insert("output".into(), output.clone());
        }
        if let Some(error) = error {
            body.insert("error".into(), error.clone());
        }
        Value::Object(body)
    }

    fn publish_status(&self, id: &str, now: Instant) {
        let _ = self
            .events
            .send(JobEvent::Status(self.status_body(id, now)));
    }
}

/// How a job ended, as the store records it.
enum End {
    /// The runner returned the job's result.
    Ran(Result<Completed, JobFailure>),
    /// Cancelled by the client (`/cancel`, `/purge-queue`).
    Cancelled,
    /// Never run, with this error: the endpoint shut down, or the warm-up failed.
    NotRun(String),
}

/// The final event of a job's progress webhook.
enum LastEvent {
    Completed(Value),
    Failed(String, Option<Vec<String>>),
}

/// A job that just became final: what is left to deliver outside the lock.
struct Ending {
    body: Arc<Value>,
    webhook: Option<WebhookUrl>,
    hook: Option<(ProgressHook, LastEvent)>,
}

impl Ending {
    fn deliver(self, inner: &Inner) {
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

impl State {
    /// Makes a job final, publishes its final body, and counts it.
    fn finalize(&mut self, id: &str, end: End, now: Instant) -> Option<Ending> {
        let job = self.jobs.get_mut(id)?;
        if job.status.is_final() {
            return None;
        }
        let (status, output, error, last) = match end {
            End::Cancelled => (
                JobStatus::Cancelled,
                None,
                None,
                LastEvent::Failed("Job cancelled".into(), None),
            ),
            End::NotRun(why) => (
                JobStatus::Failed,
                None,
                Some(json!(why)),
                LastEvent::Failed(why, None),
            ),
            End::Ran(result) => {
                let (status, failed) = match &result {
                    Ok(_) => (JobStatus::Completed, None),
                    Err(f) => {
                        let status = match f {
                            JobFailure::Deadline {
                                source: DeadlineSource::Policy,
                                ..
                            } => JobStatus::TimedOut,
                            _ => JobStatus::Failed,
                        };
                        let details = f.details().map(<[String]>::to_vec);
                        (status, Some((f.message().into_owned(), details)))
                    }
                };
                // The serverless mode's mapping: `error` when set, the rest as `output`.
                let body = result_body(JobOutput::from(result).into_json(), false);
                let output = body.get("output").cloned();
                let last = match failed {
                    Some((message, details)) => LastEvent::Failed(message, details),
                    // Only copied (it may hold megabytes of base64) for a progress webhook.
                    None if job.progress_hook.is_some() => {
                        LastEvent::Completed(output.clone().unwrap_or(Value::Null))
                    }
                    None => LastEvent::Completed(Value::Null),
                };
                (status, output, body.get("error").cloned(), last)
            }
        };
        job.status = status;
        job.ended = Some(now);
        job.request = None;
        job.progress = None;
        let body = Arc::new(job.build_body(id, now, output.as_ref(), error.as_ref()));
        job.final_body = Some(body.clone());
        let _ = job.events.send(JobEvent::Status(body.clone()));
        job.done.send_replace(Some(body.clone()));
        let ending = Ending {
            body,
            webhook: job.webhook.take(),
            hook: job.progress_hook.take().map(|hook| (hook, last)),
        };
        match status {
            JobStatus::Completed => self.completed += 1,
            JobStatus::Failed | JobStatus::TimedOut => self.failed += 1,
            _ => {}
        }
        info!(job_id = %id, status = status.as_str(), "job ended");
        Some(ending)
    }

    /// Drops final jobs past their ttl, then the oldest final ones beyond `max_jobs`.
    fn evict(&mut self, now: Instant, max_jobs: usize) {
        self.jobs.retain(|_, job| match job.ended {
            Some(ended) if job.status.is_final() => now.saturating_duration_since(ended) < job.ttl,
            _ => true,
        });
        if self.jobs.len() > max_jobs {
            let mut finished: Vec<(Instant, u64, String)> = self
                .jobs
                .iter()
                .filter(|(_, job)| job.status.is_final())
                .map(|(id, job)| (job.ended.unwrap_or(job.submitted), job.seq, id.clone()))
                .collect();
            finished.sort();
            let excess = self.jobs.len() - max_jobs;
            for (_, _, id) in finished.into_iter().take(excess) {
                self.jobs.remove(&id);
            }
        }
    }

    /// Takes the next queued job and marks it running.
    fn start_next(&mut self, now: Instant) -> Option<Started> {
        while let Some(id) = self.queue.pop_front() {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.status != JobStatus::InQueue {
                continue;
            }
            job.status = JobStatus::InProgress;
            job.started = Some(now);
            job.publish_status(&id, now);
            let started = Started {
                request: job.request.take().unwrap_or_default(),
                cancel: job.cancel.clone(),
                execution_timeout: job.execution_timeout,
            };
            self.running = Some(id);
            return Some(started);
        }
        None
    }
}

/// A job the runner just took.
struct Started {
    request: JobRequest,
    cancel: CancellationToken,
    execution_timeout: Option<Duration>,
}

impl LocalEndpoint {
    /// A store for `engine`'s jobs; starts the runner task (call inside a tokio runtime).
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
        });
        tokio::spawn(queue_runner(inner.clone()));
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
        let request = JobRequest::new(id.clone(), Some(submission.input))
            .with_s3_config(submission.s3_config);
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
            progress_hook: progress_webhook.map(|url| webhooks.progress(url, &id)),
            events,
            done,
        };
        state.jobs.insert(id.clone(), job);
        state.queue.push_back(id.clone());
        state.evict(now, max_jobs);
        let queued = state.queue.len();
        drop(state);
        info!(job_id = %id, queued, "job queued");
        self.inner.wake.notify_one();
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
                JobStatus::InProgress => job.cancel.cancel(),
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
        };
        for job in state.jobs.values() {
            match job.status {
                JobStatus::InQueue => counts.in_queue += 1,
                JobStatus::InProgress => counts.in_progress += 1,
                _ => {}
            }
        }
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
            }),
        }
    }

    /// What the runner does when it takes the next job.
    pub(crate) fn start_next_by_hand(&self) -> Option<String> {
        lock(&self.inner.state)
            .start_next(Instant::now())
            .map(|s| s.request.id)
    }

    /// What the runner does with a snapshot.
    pub(crate) fn progress_by_hand(&self, id: &str, snapshot: &ProgressSnapshot) {
        record_progress(&self.inner, id, snapshot);
    }

    /// What the runner does when the engine returned `completed`.
    pub(crate) fn complete_by_hand(&self, id: &str, completed: Completed) {
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
                end_queued(&inner, &why);
            }
            tokio::select! {
                _ = inner.closing.cancelled() => break,
                _ = inner.wake.notified() => continue,
            }
        }
        let next = lock(&inner.state).start_next(Instant::now());
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
fn end_queued(inner: &Inner, why: &str) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_checked() {
        let sub = Submission::parse(json!({
            "input": {"workflow": {}, "progress_webhook": "http://inner"},
            "webhook": "http://final",
            "policy": {"executionTimeout": 1500, "ttl": 60000}
        }))
        .unwrap();
        assert_eq!(sub.webhook.as_deref(), Some("http://final"));
        assert_eq!(sub.progress_webhook.as_deref(), Some("http://inner"));
        assert_eq!(sub.execution_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(sub.ttl, Some(Duration::from_secs(60)));
        let top = Submission::parse(json!({
            "input": {"progress_webhook": "http://inner"},
            "progress_webhook": "http://top"
        }))
        .unwrap();
        assert_eq!(top.progress_webhook.as_deref(), Some("http://top"));
        let huge = Submission::parse(json!({
            "input": {}, "policy": {"executionTimeout": 1e300, "ttl": 1e30}
        }))
        .unwrap();
        assert_eq!(huge.execution_timeout, Some(MAX_POLICY));
        assert_eq!(huge.ttl, Some(MAX_POLICY));

        for (body, wanted) in [
            (json!([1]), "JSON object"),
            (json!({}), "missing 'input'"),
            (json!({"input": null}), "missing 'input'"),
            (json!({"input": {}, "webhook": 3}), "'webhook' must be"),
            (json!({"input": {}, "policy": 5}), "'policy' must be"),
            (
                json!({"input": {}, "policy": {"executionTimeout": -1}}),
                "policy.executionTimeout",
            ),
            (json!({"input": {}, "policy": {"ttl": "x"}}), "policy.ttl"),
        ] {
            let err = Submission::parse(body).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(err.message.contains(wanted), "{}", err.message);
        }
    }

    #[test]
    fn final_statuses() {
        assert!(!JobStatus::InQueue.is_final() && !JobStatus::InProgress.is_final());
        for s in [
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
            JobStatus::TimedOut,
        ] {
            assert!(s.is_final());
            assert!(body_is_final(&json!({"status": s.as_str()})));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        assert!(!body_is_final(&json!({"status": "IN_PROGRESS"})));
    }
}
