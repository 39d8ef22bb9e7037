//! The contract's `Job` object of a job in the store: its status in the contract's lifecycle
//! (`queued → running → succeeded | failed`, `canceling → canceled`), queue position, latest
//! progress, outputs so far, error, metrics, timestamps and follow-up links.

use std::time::{Duration, Instant, SystemTime};

use axum::http::{header, HeaderMap};
use serde_json::{json, Map, Value};

use super::super::job_status::JobStatus;
use super::super::store::{Job, State};
use super::stamp::{millis, rfc3339, wall};

/// A job's status in the contract's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum V2Status {
    Queued,
    Running,
    Canceling,
    Succeeded,
    Failed,
    Canceled,
}

impl V2Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            V2Status::Queued => "queued",
            V2Status::Running => "running",
            V2Status::Canceling => "canceling",
            V2Status::Succeeded => "succeeded",
            V2Status::Failed => "failed",
            V2Status::Canceled => "canceled",
        }
    }

    /// Succeeded, failed or canceled (`canceling` is not: ComfyUI may still be running it).
    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            V2Status::Succeeded | V2Status::Failed | V2Status::Canceled
        )
    }

    /// Reads a `status` filter value (`expired` is known but never held by a kept job).
    fn parse(text: &str) -> Option<Option<V2Status>> {
        Some(Some(match text {
            "queued" => V2Status::Queued,
            "running" => V2Status::Running,
            "canceling" => V2Status::Canceling,
            "succeeded" => V2Status::Succeeded,
            "failed" => V2Status::Failed,
            "canceled" => V2Status::Canceled,
            "expired" => return Some(None),
            _ => return None,
        }))
    }
}

/// Parses `status=a,b`: the statuses to keep (an empty list keeps none; `None` keeps all).
pub(crate) fn status_filter(text: &str) -> Result<Vec<V2Status>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match V2Status::parse(part) {
            Some(Some(s)) => out.push(s),
            Some(None) => {}
            None => return Err(format!("unknown status '{}'", part.escape_debug())),
        }
    }
    Ok(out)
}

/// A v2 job's status. A cancelled job is `canceling` until the runner is done with it (its
/// prompt interrupted in ComfyUI); a job whose prompt failed in a node is `failed` even when
/// some outputs were returned.
pub(crate) fn status_of(job: &Job) -> V2Status {
    let v2 = job.v2.as_deref();
    match job.status {
        JobStatus::InQueue => V2Status::Queued,
        JobStatus::InProgress => V2Status::Running,
        JobStatus::Completed if v2.is_some_and(|v| v.error.is_some()) => V2Status::Failed,
        JobStatus::Completed => V2Status::Succeeded,
        JobStatus::Failed | JobStatus::TimedOut => V2Status::Failed,
        JobStatus::Cancelled if job.started.is_none() || v2.is_some_and(|v| v.settled) => {
            V2Status::Canceled
        }
        JobStatus::Cancelled => V2Status::Canceling,
    }
}

/// The origin a client used (`http://host:port`), for absolute content URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin(pub(crate) String);

impl Origin {
    /// From the request's `Host` (and `X-Forwarded-Proto` when a TLS proxy set it).
    pub(crate) fn of(headers: &HeaderMap) -> Origin {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("localhost");
        let scheme = match headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
        {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        Origin(format!("{scheme}://{host}"))
    }
}

/// When a job's record (and its outputs) go: its end plus its retention; for a job not ended
/// yet, the earliest that could be (now plus its retention).
pub(crate) fn expires_at(job: &Job, created: SystemTime, now: Instant) -> SystemTime {
    let from = job.ended.unwrap_or(now);
    wall(job.submitted, created, from) + job.ttl
}

/// The contract's `Job` object.
pub(crate) fn job_object(
    id: &str,
    job: &Job,
    state: &State,
    origin: &Origin,
    now: Instant,
) -> Value {
    let Some(v2) = job.v2.as_deref() else {
        return Value::Null;
    };
    let status = status_of(job);
    let at = |i: Instant| rfc3339(wall(job.submitted, v2.created, i));
    let expires = expires_at(job, v2.created, now);
    let outputs: Vec<Value> = v2
        .outputs
        .iter()
        .map(|o| o.to_json(&origin.0, expires))
        .collect();
    let queue_position = match status {
        V2Status::Queued => state.queue_position(id).map(|p| json!(p)),
        _ => None,
    };
    let queue_ms = job
        .started
        .map(|s| millis(s.saturating_duration_since(job.submitted)));
    let execution_ms = match (job.started, job.ended, status.is_terminal()) {
        (Some(s), Some(e), true) => Some(millis(e.saturating_duration_since(s))),
        _ => None,
    };
    let completed_at = match (job.ended, status.is_terminal()) {
        (Some(e), true) => json!(at(e)),
        _ => Value::Null,
    };
    let error = match status {
        V2Status::Failed => v2.error.as_deref().cloned().unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let mut body = Map::new();
    body.insert("id".into(), json!(id));
    body.insert("status".into(), json!(status.as_str()));
    body.insert("created_at".into(), json!(rfc3339(v2.created)));
    body.insert("started_at".into(), job.started.map(at).into());
    body.insert("completed_at".into(), completed_at);
    body.insert("expires_at".into(), json!(rfc3339(expires)));
    body.insert(
        "queue_position".into(),
        queue_position.unwrap_or(Value::Null),
    );
    body.insert(
        "progress".into(),
        v2.progress.as_deref().cloned().unwrap_or(Value::Null),
    );
    body.insert("outputs".into(), Value::Array(outputs));
    body.insert("error".into(), error);
    body.insert(
        "metrics".into(),
        json!({"queue_ms": queue_ms, "execution_ms": execution_ms}),
    );
    body.insert("urls".into(), urls(id));
    if let Some(metadata) = &v2.metadata {
        body.insert("metadata".into(), metadata.clone());
    }
    // What the Comfy SDK's job list reads (`create_time`, `update_time`).
    let updated = job.ended.or(job.started).map(at);
    body.insert("create_time".into(), json!(rfc3339(v2.created)));
    body.insert(
        "update_time".into(),
        json!(updated.unwrap_or_else(|| rfc3339(v2.created))),
    );
    Value::Object(body)
}

/// `urls`: host-relative links, which the contract lets clients resolve against the origin
/// they used (so a token is never sent to another origin).
fn urls(id: &str) -> Value {
    let base = format!("/api/v2/jobs/{id}");
    json!({
        "self": base,
        "events": format!("{base}/events"),
        "cancel": format!("{base}/cancel"),
    })
}

/// The content URL's stated lifetime when nothing shorter applies.
pub(crate) const URL_LIFETIME: Duration = Duration::from_secs(24 * 3600);
