//! `GET /api/v2/jobs/{id}/events`: the job's live state as Server-Sent Events.
//!
//! On connect: `status` (with `queue_position` while queued), then, for a job not ended, the
//! latest `progress`, the latest `preview` and the outputs so far. Then `progress` for every
//! snapshot the tracker makes (every sampler step: no throttle; a client that reads slower than
//! steps arrive skips to the latest), `preview`, `output` as each output is committed, `log`,
//! and `status` at every change (queue position, start, cancel). Before the terminal `status`
//! every output not sent yet goes out (the SDKs stop reading at the terminal status); the
//! stream ends after it. No `id:` lines: the contract's stream is live, not a replayable log.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tracing::debug;

use super::super::local_endpoint::LocalEndpoint;
use super::super::store::{Job, JobEvent, State as Store};
use super::error::V2Error;
use super::job_record::V2Output;
use super::job_view::{expires_at, status_of, Origin, V2Status};
use super::request::{path_id, IdPath};

/// `GET /api/v2/jobs/{id}/events`.
pub(crate) async fn events(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Response, V2Error> {
    let id = path_id(path)?;
    let origin = Origin::of(&headers);
    let slot = StreamSlot::take(&endpoint.v2().streams, endpoint.options().v2.max_streams)?;
    let mut feed = {
        let state = endpoint.fresh_state();
        let job = state
            .jobs
            .get(&id)
            .filter(|j| j.v2.is_some())
            .ok_or_else(|| V2Error::not_found("job", &id))?;
        let mut feed = Feed {
            endpoint: endpoint.clone(),
            id: id.clone(),
            origin,
            receiver: job.events.subscribe(),
            pending: VecDeque::new(),
            status: None,
            progress: None,
            sent: HashSet::new(),
            done: false,
            _slot: slot,
        };
        feed.snapshot(job, &state);
        feed
    };
    feed.pending.shrink_to_fit();
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        feed.next()
            .await
            .map(|event| (Ok::<_, Infallible>(event), feed))
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One subscriber.
struct Feed {
    endpoint: LocalEndpoint,
    id: String,
    origin: Origin,
    receiver: Receiver<JobEvent>,
    pending: VecDeque<Event>,
    /// The last status sent, with its queue position.
    status: Option<(V2Status, Option<usize>)>,
    /// The last progress sent.
    progress: Option<Arc<Value>>,
    /// The outputs sent (asset ids).
    sent: HashSet<String>,
    done: bool,
    _slot: StreamSlot,
}

fn event(name: &'static str, data: &Value) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

impl Feed {
    /// What a new subscriber gets first.
    fn snapshot(&mut self, job: &Job, state: &Store) {
        let Some(v2) = job.v2.as_deref() else {
            self.done = true;
            return;
        };
        let status = status_of(job);
        self.push_status(status, state.queue_position(&self.id));
        if status.is_terminal() {
            return;
        }
        if let Some(progress) = &v2.progress {
            self.push_progress(progress.clone());
        }
        if let Some(preview) = &v2.preview {
            self.pending.push_back(event("preview", preview));
        }
        self.push_outputs(job);
    }

    fn push_status(&mut self, status: V2Status, position: Option<usize>) {
        let position = if status == V2Status::Queued {
            position
        } else {
            None
        };
        if self.status == Some((status, position)) {
            return;
        }
        let mut data = json!({ "status": status.as_str() });
        if let Some(p) = position {
            data["queue_position"] = json!(p);
        }
        self.pending.push_back(event("status", &data));
        self.status = Some((status, position));
        if status.is_terminal() {
            self.done = true;
        }
    }

    fn push_progress(&mut self, progress: Arc<Value>) {
        if self.progress.as_deref() == Some(&*progress) {
            return;
        }
        self.pending.push_back(event("progress", &progress));
        self.progress = Some(progress);
    }

    fn push_output(&mut self, output: &V2Output, job: &Job) {
        if !self.sent.insert(output.asset_id.clone()) {
            return;
        }
        let created = job
            .v2
            .as_ref()
            .map_or_else(std::time::SystemTime::now, |v| v.created);
        let expires = expires_at(job, created, Instant::now());
        self.pending
            .push_back(event("output", &output.to_json(&self.origin.0, expires)));
    }

    /// Every output of the job not sent yet.
    fn push_outputs(&mut self, job: &Job) {
        let outputs: Vec<Arc<V2Output>> = job
            .v2
            .as_ref()
            .map(|v| v.outputs.clone())
            .unwrap_or_default();
        for output in outputs {
            self.push_output(&output, job);
        }
    }

    /// Reads the job's status from the store; at its end, first what is not sent yet.
    fn sync(&mut self) {
        let endpoint = self.endpoint.clone();
        let state = endpoint.fresh_state();
        let Some(job) = state.jobs.get(&self.id) else {
            self.done = true;
            return;
        };
        let status = status_of(job);
        if status.is_terminal() {
            self.push_outputs(job);
            if let Some(progress) = job.v2.as_ref().and_then(|v| v.progress.clone()) {
                self.push_progress(progress);
            }
        }
        self.push_status(status, state.queue_position(&self.id));
    }

    /// An output committed: sent with the job's current expiry.
    fn output(&mut self, output: Arc<V2Output>) {
        let endpoint = self.endpoint.clone();
        let state = endpoint.fresh_state();
        if let Some(job) = state.jobs.get(&self.id) {
            self.push_output(&output, job);
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let closing = self.endpoint.closing().clone();
            let received = tokio::select! {
                _ = closing.cancelled() => {
                    self.done = true;
                    continue;
                }
                r = self.receiver.recv() => r,
            };
            match received {
                Ok(JobEvent::V2Progress(progress)) => self.push_progress(progress),
                Ok(JobEvent::V2Preview(preview)) => {
                    self.pending.push_back(event("preview", &preview))
                }
                Ok(JobEvent::V2Output(output)) => self.output(output),
                Ok(JobEvent::V2Log(line)) => self.pending.push_back(event("log", &line)),
                Ok(JobEvent::Status(_)) | Ok(JobEvent::V2Changed) => self.sync(),
                Ok(JobEvent::Progress(_)) | Ok(JobEvent::Preview(_)) => {}
                Err(RecvError::Lagged(skipped)) => {
                    // Slower than the job: skip to its current state (outputs are never skipped).
                    debug!(job_id = %self.id, skipped, "v2 event subscriber fell behind");
                    self.catch_up();
                }
                Err(RecvError::Closed) => {
                    self.sync();
                    self.done = true;
                }
            }
        }
    }

    fn catch_up(&mut self) {
        let latest = {
            let state = self.endpoint.fresh_state();
            state.jobs.get(&self.id).map(|job| {
                (
                    job.v2.as_ref().and_then(|v| v.progress.clone()),
                    status_of(job).is_terminal(),
                )
            })
        };
        match latest {
            None => self.done = true,
            Some((progress, terminal)) => {
                if !terminal {
                    if let Some(p) = progress {
                        self.push_progress(p);
                    }
                }
                self.sync_outputs();
                self.sync();
            }
        }
    }

    fn sync_outputs(&mut self) {
        let endpoint = self.endpoint.clone();
        let state = endpoint.fresh_state();
        if let Some(job) = state.jobs.get(&self.id) {
            self.push_outputs(job);
        }
    }
}

/// How long an idle SSE stream waits between keep-alive comments (under the SDKs' 45 s).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);

/// Holds a stream slot; let go when dropped.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    /// One of `max` slots, or 429 `too_many_streams`.
    pub(crate) fn take(
        count: &Arc<std::sync::atomic::AtomicUsize>,
        max: usize,
    ) -> Result<StreamSlot, V2Error> {
        use std::sync::atomic::Ordering;
        let taken = count.fetch_add(1, Ordering::SeqCst);
        if taken >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return Err(V2Error::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("{max} event streams are open, the most this endpoint serves; close one or poll GET /api/v2/jobs/{{id}}."),
            )
            .retry_after(5));
        }
        Ok(StreamSlot(count.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
