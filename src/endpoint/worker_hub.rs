//! `serve --workers external`: the local endpoint as the platform for worker processes. Jobs
//! submitted with `/run`, `/runsync` or the page wait in the same queue; `comfy-worker worker
//! --platform URL` processes take them over RunPod's worker protocol (job-take, job-stop,
//! job-done, ping; the wire format is `worker_routes.rs`'s), exactly as on RunPod, each job
//! handed to one worker once. Progress posts become the job's `/status` output and events;
//! the final post ends the job as the RunPod SDK's body says (`error` set: FAILED).
//!
//! The endpoint keeps what the platform keeps: `policy.executionTimeout` (the job times out and
//! its worker is told to stop), cancels (told through job-stop), and workers that go silent (a
//! job held by a worker not heard from for [`WORKER_LOST_AFTER`] fails, so it never hangs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tracing::{info, warn};

use super::job_status::JobStatus;
use super::local_endpoint::{end_jobs, end_queued, Inner, LocalEndpoint, NOT_STARTED};
use super::store::{lock, End, Ending, JobEvent, State};
use crate::job::{DeadlineSource, JobFailure};

/// A job whose worker was not heard from (no job-take, ping or post) for this long fails.
/// Workers ping every `RUNPOD_PING_INTERVAL` (10 s by default) while they hold a job.
pub const WORKER_LOST_AFTER: Duration = Duration::from_secs(60);

/// How long a job-take or job-stop waits for something before answering 204 (the worker asks
/// again at once); well under the worker's own 90 s bound.
pub const LONG_POLL: Duration = Duration::from_secs(20);

/// How often deadlines and silent workers are checked (at most; sooner for short limits).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The error of a job whose worker went silent for `after`.
fn lost(worker: &str, after: Duration) -> String {
    format!(
        "The worker '{worker}' that took the job stopped responding (no ping, job-take or result for {:.0} s); submit the job again",
        after.as_secs_f64()
    )
}

/// The error of a job a worker held when the endpoint shut down.
const SHUT_DOWN_WHILE_HELD: &str =
    "The endpoint shut down while a worker ran the job; submit it again";

/// What a worker's job-done post did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Posted {
    /// Progress recorded.
    Progress,
    /// The job ended with this result.
    Final,
    /// Nothing: the job is unknown, already final (a repeat, or cancelled meanwhile), or held
    /// by another worker.
    Ignored,
}

impl LocalEndpoint {
    /// Takes up to `n` queued jobs for `worker` (RunPod's job-take and job-take-batch), waiting
    /// up to [`LONG_POLL`] for one; each becomes `{"id", "input", "s3Config"?,
    /// "progress_webhook"?}`. Empty when none came or the endpoint is closing.
    pub(crate) async fn take_jobs(&self, worker: &str, n: usize) -> Vec<Value> {
        let inner = &self.inner;
        let mut changes = inner.changes.subscribe();
        let until = tokio::time::Instant::now() + LONG_POLL;
        loop {
            changes.borrow_and_update();
            let taken = take_now(inner, worker, n.max(1));
            if !taken.is_empty() || inner.closing.is_cancelled() {
                return taken;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(until) => return Vec::new(),
                _ = inner.closing.cancelled() => return Vec::new(),
            }
        }
    }

    /// The jobs `worker` must stop (RunPod's job-stop), waiting up to [`LONG_POLL`] for one.
    pub(crate) async fn jobs_to_stop(&self, worker: &str) -> Vec<String> {
        let inner = &self.inner;
        let mut changes = inner.changes.subscribe();
        let until = tokio::time::Instant::now() + LONG_POLL;
        loop {
            changes.borrow_and_update();
            let stops = {
                let mut state = lock(&inner.state);
                seen(&mut state, worker);
                state.stops.remove(worker).unwrap_or_default()
            };
            if !stops.is_empty() || inner.closing.is_cancelled() {
                return stops;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(until) => return Vec::new(),
                _ = inner.closing.cancelled() => return Vec::new(),
            }
        }
    }

    /// A worker's heartbeat.
    pub(crate) fn ping(&self, worker: &str) {
        seen(&mut lock(&self.inner.state), worker);
    }

    /// A worker's job-done post: progress (`"status": "IN_PROGRESS"`) or the final result.
    pub(crate) fn posted(&self, worker: &str, id: &str, body: Value) -> Posted {
        let inner = &self.inner;
        let now = Instant::now();
        let progress = body.get("status").and_then(Value::as_str) == Some("IN_PROGRESS");
        let ending = {
            let mut state = lock(&inner.state);
            seen(&mut state, worker);
            let Some(job) = state.jobs.get_mut(id) else {
                warn!(job_id = %id, worker, "a post for a job this endpoint does not know; ignored");
                return Posted::Ignored;
            };
            if job.status != JobStatus::InProgress || job.worker.as_deref() != Some(worker) {
                // A repeat of a delivered result, or a job cancelled or timed out meanwhile.
                return Posted::Ignored;
            }
            if progress {
                let output = Arc::new(body.get("output").cloned().unwrap_or(Value::Null));
                job.progress = Some(output.clone());
                let _ = job.events.send(JobEvent::Progress(output));
                return Posted::Progress;
            }
            state.finalize(id, End::Delivered(body), now)
        };
        if let Some(ending) = ending {
            ending.deliver(inner);
        }
        Posted::Final
    }
}

/// Takes up to `n` queued jobs for `worker` now.
fn take_now(inner: &Inner, worker: &str, n: usize) -> Vec<Value> {
    let mut state = lock(&inner.state);
    seen(&mut state, worker);
    let now = Instant::now();
    let mut taken = Vec::new();
    while taken.len() < n {
        let Some(started) = state.start_next(now, Some(worker)) else {
            break;
        };
        let request = started.request;
        let mut body = Map::new();
        body.insert("id".into(), json!(request.id));
        body.insert("input".into(), request.input.unwrap_or(Value::Null));
        if let Some(s3) = request.s3_config {
            body.insert("s3Config".into(), s3);
        }
        if let Some(url) = request.progress_webhook {
            body.insert("progress_webhook".into(), json!(url));
        }
        info!(job_id = %request.id, worker, "job taken by a worker");
        taken.push(Value::Object(body));
    }
    taken
}

fn seen(state: &mut State, worker: &str) {
    state.workers.insert(worker.to_owned(), Instant::now());
}

/// Starts the endpoint's task in external mode ([`watch_jobs`]).
pub(super) fn start(endpoint: &LocalEndpoint) {
    tokio::spawn(watch_jobs(endpoint.inner.clone()));
}

/// The endpoint's task in external mode: times out jobs past `policy.executionTimeout`, fails
/// those whose worker went silent (telling the worker to stop), and at shutdown ends every job
/// still queued or held.
async fn watch_jobs(inner: Arc<Inner>) {
    let _stopped = inner.stopped.clone().drop_guard();
    let every = SWEEP_EVERY
        .min(inner.options.worker_lost_after / 4)
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.closing.cancelled() => break,
            _ = tick.tick() => sweep(&inner, Instant::now()),
        }
    }
    let queued = end_queued(&inner, NOT_STARTED);
    let held = end_held(&inner, SHUT_DOWN_WHILE_HELD);
    info!(
        queued_jobs_failed = queued,
        held_jobs_failed = held,
        "job hub stopped"
    );
}

/// One pass over the running jobs.
fn sweep(inner: &Arc<Inner>, now: Instant) {
    let lost_after = inner.options.worker_lost_after;
    let mut endings: Vec<Ending> = Vec::new();
    {
        let mut state = lock(&inner.state);
        let mut ends: Vec<(String, String, End)> = Vec::new();
        for (id, job) in &state.jobs {
            let (JobStatus::InProgress, Some(worker)) = (job.status, &job.worker) else {
                continue;
            };
            let ran = job.started.map(|s| now.saturating_duration_since(s));
            if let (Some(limit), Some(ran)) = (job.execution_timeout, ran) {
                if ran >= limit {
                    let failure = JobFailure::Deadline {
                        after: limit,
                        source: DeadlineSource::Policy,
                    };
                    ends.push((id.clone(), worker.clone(), End::Ran(Err(failure))));
                    continue;
                }
            }
            let silent = state
                .workers
                .get(worker)
                .is_none_or(|at| now.saturating_duration_since(*at) >= lost_after);
            if silent {
                warn!(job_id = %id, worker = %worker, "the worker holding the job went silent");
                ends.push((
                    id.clone(),
                    worker.clone(),
                    End::NotRun(lost(worker, lost_after)),
                ));
            }
        }
        for (id, worker, end) in ends {
            if let Some(ending) = state.finalize(&id, end, now) {
                endings.push(ending);
            }
            state.stops.entry(worker).or_default().push(id);
        }
        // Workers not heard from for long are forgotten (they hold nothing any more).
        state
            .workers
            .retain(|_, at| now.saturating_duration_since(*at) < lost_after * 2);
    }
    if !endings.is_empty() {
        inner.changes.send_replace(());
        for ending in endings {
            ending.deliver(inner);
        }
    }
}

/// Ends every job a worker holds as failed with `why`; returns how many.
fn end_held(inner: &Arc<Inner>, why: &str) -> usize {
    end_jobs(inner, why, |state| {
        state
            .jobs
            .iter()
            .filter(|(_, j)| j.status == JobStatus::InProgress && j.worker.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    })
}
