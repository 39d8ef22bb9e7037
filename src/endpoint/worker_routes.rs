//! RunPod's worker protocol, served by `serve --workers external` under `/worker/` (the URLs
//! `comfy-worker worker --platform URL` fills in):
//!
//! * `GET /worker/job-take/{worker}`: a job `{"id", "input", …}` (200) or none (204) after a
//!   long poll; `GET /worker/job-take-batch/{worker}?batch_size=N`: a list of jobs;
//! * `GET /worker/job-stop/{worker}`: `{"jobsToStop": [ids]}` (200) or none (204);
//! * `POST /worker/job-done/{worker}/{job id}`: progress (`{"status": "IN_PROGRESS", "output"}`)
//!   or the final result (`{"output"?, "error"?}`), whatever its content type (the RunPod SDK
//!   sends JSON as `application/x-www-form-urlencoded`);
//! * `GET /worker/ping/{worker}`: the heartbeat.
//!
//! The logic is `worker_hub.rs`'s; this file only speaks the wire format.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::local_endpoint::LocalEndpoint;

/// The largest job-done body: about the platform's result limit (worker-comfyui#129).
const MAX_RESULT_BYTES: usize = 20 * 1000 * 1000;

/// The largest batch one job-take-batch hands out.
const MAX_BATCH: usize = 16;

/// The worker routes (added to the protected API, so the key and the cross-site guard apply).
pub(super) fn routes() -> Router<LocalEndpoint> {
    Router::new()
        .route("/worker/job-take/{worker}", get(job_take))
        .route("/worker/job-take-batch/{worker}", get(job_take_batch))
        .route("/worker/job-stop/{worker}", get(job_stop))
        .route(
            "/worker/job-done/{worker}/{id}",
            post(job_done).layer(DefaultBodyLimit::max(MAX_RESULT_BYTES)),
        )
        .route("/worker/ping/{worker}", get(ping))
}

#[derive(Debug, Deserialize)]
struct WorkerPath {
    worker: String,
}

#[derive(Debug, Deserialize)]
struct PostPath {
    worker: String,
    id: String,
}

#[derive(Debug, Deserialize)]
struct Batch {
    batch_size: Option<usize>,
}

async fn job_take(
    State(endpoint): State<LocalEndpoint>,
    Path(WorkerPath { worker }): Path<WorkerPath>,
) -> Response {
    match endpoint.take_jobs(&worker, 1).await.pop() {
        Some(job) => Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn job_take_batch(
    State(endpoint): State<LocalEndpoint>,
    Path(WorkerPath { worker }): Path<WorkerPath>,
    Query(batch): Query<Batch>,
) -> Response {
    let n = batch.batch_size.unwrap_or(1).clamp(1, MAX_BATCH);
    let jobs = endpoint.take_jobs(&worker, n).await;
    if jobs.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(Value::Array(jobs)).into_response()
    }
}

async fn job_stop(
    State(endpoint): State<LocalEndpoint>,
    Path(WorkerPath { worker }): Path<WorkerPath>,
) -> Response {
    let ids = endpoint.jobs_to_stop(&worker).await;
    if ids.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(json!({ "jobsToStop": ids })).into_response()
    }
}

async fn job_done(
    State(endpoint): State<LocalEndpoint>,
    Path(PostPath { worker, id }): Path<PostPath>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            // What the platform answers to an oversize result: the worker then reports the
            // job's failure in a small body.
            ApiError::bad_request(format!(
                "the result is larger than the limit of {MAX_RESULT_BYTES} bytes"
            ))
        } else {
            ApiError::new(rejection.status(), rejection.body_text())
        }
    })?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the result is not valid JSON: {e}")))?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the result must be a JSON object like {\"output\": …} or {\"error\": …}",
        ));
    }
    endpoint.posted(&worker, &id, body);
    Ok(Json(json!({})))
}

async fn ping(
    State(endpoint): State<LocalEndpoint>,
    Path(WorkerPath { worker }): Path<WorkerPath>,
) -> StatusCode {
    endpoint.ping(&worker);
    StatusCode::OK
}
