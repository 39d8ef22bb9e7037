//! The local endpoint's job store: jobs by id with their status, timings, latest progress
//! snapshot and final `/status` body; the queue in submission order; retention by ttl and
//! `max_jobs`. Every status change and snapshot is also published on the job's broadcast
//! channel (what `/events/{id}` streams) and the final body on a watch channel (what `/runsync`
//! waits on).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::job_status::JobStatus;
use super::status_body::StatusBody;
use super::v2::job_record::{V2Job, V2Output};
use crate::job::output::result_body;
use crate::job::{Completed, DeadlineSource, JobFailure, JobOutput, JobRequest};
use crate::webhook::{ProgressHook, WebhookUrl};

/// What `/status` reports as `workerId` for jobs this process runs.
const WORKER_ID: &str = "local";

/// Events buffered per job for `/events` subscribers; one that falls further behind skips.
pub(crate) const EVENT_BUFFER: usize = 256;

/// What a job's event stream carries.
#[derive(Debug, Clone)]
pub(crate) enum JobEvent {
    /// The new `/status` body.
    Status(StatusBody),
    /// A progress snapshot as JSON.
    Progress(Arc<Value>),
    /// A live preview: `{"node", "mime", "width", "height", "data"}` (`data` in base64).
    Preview(Arc<Value>),
    /// A v2 job's `Progress` object (Comfy API v2).
    V2Progress(Arc<Value>),
    /// A v2 job's `preview` event payload.
    V2Preview(Arc<Value>),
    /// A v2 job's committed output.
    V2Output(Arc<V2Output>),
    /// A v2 job's `log` event payload.
    V2Log(Arc<Value>),
    /// A v2 job's status or queue position may have changed (read it from the store).
    V2Changed,
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
    pub(crate) running: usize,
    /// External workers heard from (`serve --workers external`).
    pub(crate) workers: usize,
    /// Those of them holding a job.
    pub(crate) workers_busy: usize,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) jobs: HashMap<String, Job>,
    /// Queued job ids, in submission order.
    pub(super) queue: VecDeque<String>,
    /// The jobs this process's runners are on, one per ComfyUI at most (a job may already be
    /// CANCELLED while ComfyUI is interrupted).
    pub(super) running: std::collections::BTreeSet<String>,
    pub(super) next_seq: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    /// External workers (`serve --workers external`) by id: when each was last heard from.
    pub(super) workers: HashMap<String, Instant>,
    /// Jobs each external worker must stop (cancelled, timed out), not yet handed over.
    pub(super) stops: HashMap<String, Vec<String>>,
}

pub(super) struct Job {
    /// Submission order, to break ties when dropping old jobs.
    pub(super) seq: u64,
    /// Taken by the runner when the job starts.
    pub(super) request: Option<JobRequest>,
    pub(super) status: JobStatus,
    pub(super) submitted: Instant,
    pub(super) started: Option<Instant>,
    pub(super) ended: Option<Instant>,
    /// The latest snapshot while running.
    pub(super) progress: Option<Arc<Value>>,
    /// The `/status` body once final (timings no longer change); in a file when large.
    pub(super) final_body: Option<StatusBody>,
    pub(super) cancel: CancellationToken,
    pub(super) execution_timeout: Option<Duration>,
    /// How long the job is kept once final.
    pub(super) ttl: Duration,
    pub(super) webhook: Option<WebhookUrl>,
    pub(super) progress_hook: Option<ProgressHook>,
    pub(super) events: broadcast::Sender<JobEvent>,
    pub(super) done: watch::Sender<Option<StatusBody>>,
    /// The external worker that took the job (`serve --workers external`).
    pub(super) worker: Option<String>,
    /// The latest live preview while the job runs (for `/stream` and late subscribers).
    pub(super) preview: Option<Arc<Value>>,
    /// What a job submitted through the Comfy API v2 surface has beside (`None` for the others).
    pub(super) v2: Option<Box<V2Job>>,
}

pub(super) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Job {
    pub(super) fn status_body(&self, id: &str, now: Instant) -> StatusBody {
        if let Some(body) = &self.final_body {
            return body.clone();
        }
        StatusBody::new(self.build_body(id, now, self.progress.as_deref().cloned(), None))
    }

    pub(super) fn build_body(
        &self,
        id: &str,
        now: Instant,
        output: Option<Value>,
        error: Option<Value>,
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
        body.insert(
            "workerId".into(),
            json!(self.worker.as_deref().unwrap_or(WORKER_ID)),
        );
        if let Some(output) = output {
            body.insert("output".into(), output);
        }
        if let Some(error) = error {
            body.insert("error".into(), error);
        }
        Value::Object(body)
    }

    pub(super) fn publish_status(&self, id: &str, now: Instant) {
        let _ = self
            .events
            .send(JobEvent::Status(self.status_body(id, now)));
    }
}

/// How a job ended, as the store records it.
pub(super) enum End {
    /// The runner returned the job's result.
    Ran(Result<Completed, JobFailure>),
    /// Cancelled by the client (`/cancel`, `/purge-queue`).
    Cancelled,
    /// Never run, with this error: the endpoint shut down, or the warm-up failed; or lost with
    /// the external worker that took it.
    NotRun(String),
    /// An external worker's final post: RunPod's result body, `{"output"?, "error"?}`.
    Delivered(Value),
}

/// The final event of a job's progress webhook.
pub(super) enum LastEvent {
    Completed(Value),
    Failed(String, Option<Vec<String>>),
}

/// A job that just became final: what is left to deliver outside the lock.
pub(super) struct Ending {
    /// The job's id.
    pub(super) id: String,
    pub(super) body: StatusBody,
    pub(super) webhook: Option<WebhookUrl>,
    pub(super) hook: Option<(ProgressHook, LastEvent)>,
    /// Asset blobs a v2 job that never ran held.
    pub(super) pins: Vec<String>,
}

impl State {
    /// Makes a job final, publishes its final body, and counts it.
    pub(super) fn finalize(&mut self, id: &str, end: End, now: Instant) -> Option<Ending> {
        let job = self.jobs.get_mut(id)?;
        if job.status.is_final() {
            return None;
        }
        if let Some(v2) = &mut job.v2 {
            v2.error = match &end {
                End::Ran(result) => {
                    super::v2::job_error::job_error(result, v2.node_failure.as_ref()).map(Arc::new)
                }
                End::NotRun(why) => Some(Arc::new(super::v2::job_error::not_run(why))),
                End::Cancelled => None,
                // v2 jobs are not handed to external workers; should one be, its error stands.
                End::Delivered(body) => body
                    .get("error")
                    .filter(|e| truthy(e))
                    .map(|e| Arc::new(super::v2::job_error::not_run(&e.to_string()))),
            };
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
            End::Delivered(mut body) => {
                let error = body.get("error").filter(|e| truthy(e)).cloned();
                // Moved out, not copied: it may hold megabytes of base64.
                let output = body.as_object_mut().and_then(|b| b.remove("output"));
                match error {
                    Some(error) => {
                        let message = match &error {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        let details = output
                            .as_ref()
                            .and_then(|o| o.get("details"))
                            .and_then(Value::as_array)
                            .map(|d| {
                                d.iter()
                                    .map(|v| {
                                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                                    })
                                    .collect()
                            });
                        (
                            JobStatus::Failed,
                            output,
                            Some(error),
                            LastEvent::Failed(message, details),
                        )
                    }
                    None => (
                        JobStatus::Completed,
                        output,
                        None,
                        LastEvent::Completed(Value::Null),
                    ),
                }
            }
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
                let mut body = result_body(JobOutput::from(result).into_json(), false);
                // Moved out, not copied: it may hold megabytes of base64.
                let output = body.as_object_mut().and_then(|b| b.remove("output"));
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
        // A job that never started is settled now: its held asset bytes go back.
        let mut pins = Vec::new();
        if job.started.is_none() {
            if let Some(v2) = &mut job.v2 {
                v2.settled = true;
                pins = std::mem::take(&mut v2.pins);
            }
        }
        job.request = None;
        job.progress = None;
        let body = StatusBody::new(job.build_body(id, now, output, error));
        job.final_body = Some(body.clone());
        let _ = job.events.send(JobEvent::Status(body.clone()));
        job.done.send_replace(Some(body.clone()));
        let ending = Ending {
            id: id.to_owned(),
            body,
            webhook: job.webhook.take(),
            hook: job.progress_hook.take().map(|hook| (hook, last)),
            pins,
        };
        match status {
            JobStatus::Completed => self.completed += 1,
            JobStatus::Failed | JobStatus::TimedOut => self.failed += 1,
            _ => {}
        }
        if crate::runner::in_job_span() {
            info!(status = status.as_str(), "job ended");
        } else {
            info!(job_id = %id, status = status.as_str(), "job ended");
        }
        Some(ending)
    }

    /// Tells every queued v2 job that its place in the queue may have changed.
    pub(super) fn queue_moved(&self) {
        for id in &self.queue {
            if let Some(job) = self.jobs.get(id).filter(|j| j.v2.is_some()) {
                let _ = job.events.send(JobEvent::V2Changed);
            }
        }
    }

    /// 1-based place of a queued job in the queue.
    pub(super) fn queue_position(&self, id: &str) -> Option<usize> {
        self.queue.iter().position(|q| q == id).map(|i| i + 1)
    }

    /// Drops final jobs past their ttl, then the oldest final ones beyond `max_jobs`; returns
    /// the ids of the v2 jobs dropped (their output assets go with them).
    pub(super) fn evict(&mut self, now: Instant, max_jobs: usize) -> Vec<String> {
        let mut dropped = Vec::new();
        self.jobs.retain(|id, job| {
            let keep = match job.ended {
                Some(ended) if job.status.is_final() => {
                    now.saturating_duration_since(ended) < job.ttl
                }
                _ => true,
            };
            if !keep && job.v2.is_some() {
                dropped.push(id.clone());
            }
            keep
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
                if self.jobs.remove(&id).is_some_and(|j| j.v2.is_some()) {
                    dropped.push(id);
                }
            }
        }
        dropped
    }

    /// Takes the next queued job and marks it running: on this process's runner, or on the
    /// external `worker` that took it.
    pub(super) fn start_next(&mut self, now: Instant, worker: Option<&str>) -> Option<Started> {
        while let Some(id) = self.queue.pop_front() {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if job.status != JobStatus::InQueue {
                continue;
            }
            job.status = JobStatus::InProgress;
            job.started = Some(now);
            job.worker = worker.map(str::to_owned);
            job.publish_status(&id, now);
            if job.v2.is_some() {
                let _ = job.events.send(JobEvent::V2Changed);
            }
            let started = Started {
                request: job.request.take().unwrap_or_default(),
                cancel: job.cancel.clone(),
                execution_timeout: job.execution_timeout,
            };
            if worker.is_none() {
                self.running.insert(id);
            }
            self.queue_moved();
            return Some(started);
        }
        None
    }
}

/// A result's `error` counts when it is truthy, as the RunPod SDK reads it (`""`, `null`,
/// `false`, `0`, `[]` and `{}` do not).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A job the runner just took.
pub(super) struct Started {
    pub(super) request: JobRequest,
    pub(super) cancel: CancellationToken,
    pub(super) execution_timeout: Option<Duration>,
}
