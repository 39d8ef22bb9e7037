//! The Comfy API v2 job routes under `/api/v2/` and `GET /api/v2/health`, with the API key
//! check and the cross-site guard of the endpoint answering in the contract's envelope.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tracing::info;

use super::super::local_endpoint::{LocalEndpoint, NewJob, Queued, Refusal};
use super::super::store::JobEvent;
use super::super::{ServeOptions, WorkerMode};
use super::error::V2Error;
use super::idempotency::read_key;
use super::job_record::V2Job;
use super::job_view::{job_object, status_filter, status_of, Origin};
use super::request::{body_bytes, path_id, IdPath};
use super::submission::V2Submission;
use crate::job::{Job, JobRequest};

/// `Retry-After` of a full queue, in seconds.
const QUEUE_FULL_RETRY_S: u64 = 5;

/// Labels a job list may filter on at most.
const MAX_METADATA_FILTERS: usize = 3;

/// The v2 routes, for [`super::super::routes::router`] to merge.
pub(crate) fn router(endpoint: &LocalEndpoint) -> Router<LocalEndpoint> {
    let options: &ServeOptions = endpoint.options();
    let upload_limit = usize::try_from(options.v2.max_upload_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20);
    let protected = Router::new()
        .route(
            "/api/v2/jobs",
            post(submit)
                .get(list)
                .layer(DefaultBodyLimit::max(options.max_run_bytes)),
        )
        .route("/api/v2/jobs/{id}", get(get_job))
        .route("/api/v2/jobs/{id}/workflow", get(workflow))
        .route("/api/v2/jobs/{id}/cancel", post(cancel))
        .route("/api/v2/jobs/{id}/events", get(super::events::events))
        .route(
            "/api/v2/assets",
            post(super::asset_routes::upload).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/api/v2/assets/from-hash",
            post(super::asset_routes::from_hash).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .route(
            "/api/v2/assets/by-hash/{hash}",
            axum::routing::head(super::asset_routes::by_hash),
        )
        .route(
            "/api/v2/assets/{id}",
            get(super::asset_routes::get_asset).delete(super::asset_routes::delete_asset),
        )
        .route(
            "/api/v2/assets/{id}/content",
            get(super::asset_routes::content),
        )
        .route_layer(middleware::from_fn_with_state(
            endpoint.clone(),
            require_api_key,
        ))
        .route_layer(middleware::from_fn_with_state(
            endpoint.clone(),
            refuse_cross_site,
        ));
    Router::new()
        .route("/api/v2/health", get(health))
        .merge(protected)
}

/// `Authorization: Bearer <key>` when the endpoint has a key; 401 `unauthorized` otherwise.
async fn require_api_key(
    State(endpoint): State<LocalEndpoint>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &endpoint.options().api_key {
        if !super::super::auth::authorized(request.headers(), key) {
            return V2Error::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// The endpoint's cross-site guard (a keyless endpoint takes no request a web page could
/// forge), answering 403 `forbidden_origin`.
async fn refuse_cross_site(
    State(endpoint): State<LocalEndpoint>,
    request: Request,
    next: Next,
) -> Response {
    let options = endpoint.options();
    if options.api_key.is_none() {
        let checked = super::super::cross_site::check(
            request.method(),
            request.uri().path(),
            request.headers(),
            options.bound,
            &options.cors_origins,
        );
        if let Err(refused) = checked {
            let code = if refused.status == StatusCode::FORBIDDEN {
                "forbidden_origin"
            } else {
                "invalid_request"
            };
            return V2Error::new(refused.status, code, refused.message).into_response();
        }
    }
    next.run(request).await
}

/// `GET /api/v2/health`: cheap, unauthenticated; never asks ComfyUI.
async fn health(State(endpoint): State<LocalEndpoint>) -> Response {
    let upstream = format!("http://{}", endpoint.engine().comfy().host());
    let unhealthy = endpoint.closing().is_cancelled()
        || matches!(
            endpoint.warmup(),
            crate::housekeeping::warmup::WarmupState::Failed(_)
        );
    let status = if unhealthy { "unhealthy" } else { "healthy" };
    let code = if unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(json!({"status": status, "upstream": upstream}))).into_response()
}

/// `POST /api/v2/jobs`.
async fn submit(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, V2Error> {
    let options = endpoint.options();
    if options.workers == WorkerMode::External {
        // Worker processes take RunPod jobs: no node events, no input files, no assets.
        return Err(V2Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            "This endpoint hands its jobs to worker processes (serve --workers external), which take RunPod-style jobs only; the Comfy API v2 needs serve's own runner (--workers internal).",
        ));
    }
    let body = body_bytes(body)?;
    let assets = endpoint.v2().assets.clone().ok_or_else(V2Error::upstream)?;
    let submission = V2Submission::parse(&body, &assets, options.v2.convert_ui)?;
    let key = read_key(headers.get("idempotency-key"))?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut input = json!({ "workflow": submission.workflow });
    if let Some(api_key) = &submission.api_key {
        input["comfy_org_api_key"] = json!(api_key);
    }
    let request = JobRequest::new(id.clone(), Some(input)).with_local_files(submission.local_files);
    // The engine's own checks of the graph's shape, before anything is claimed or queued.
    if let Err(failure) = Job::parse(&request) {
        let mut error = V2Error::invalid_workflow(failure.message());
        if let Some(lines) = failure.details() {
            error = error.with_details(json!({ "lines": lines }));
        }
        return Err(error);
    }
    if let Some(key) = &key {
        endpoint.v2().keys.claim(key)?;
    }
    let release = |key: &Option<String>| {
        if let Some(key) = key {
            endpoint.v2().keys.release(key);
        }
    };
    let shown_workflow = request
        .input
        .as_ref()
        .and_then(|i| i.get("workflow"))
        .cloned()
        .unwrap_or(Value::Null);
    let pins = submission.pins;
    let v2 = V2Job::new(
        shown_workflow,
        submission.format,
        submission.metadata,
        pins.hexes().to_vec(),
    );
    let new = NewJob {
        id: id.clone(),
        request,
        execution_timeout: None,
        ttl: options.job_ttl,
        webhook: None,
        progress_webhook: None,
        v2: Some(Box::new(v2)),
    };
    let queued = match endpoint.enqueue(new) {
        Ok(q) => q,
        Err(refusal) => {
            release(&key);
            return Err(refused(refusal));
        }
    };
    // The job holds its inputs' bytes from here on.
    let _ = pins.hand_over();
    if queued.starts_now {
        if let Some(rejected) = accepted_or_rejected(&endpoint, &id, queued).await {
            release(&key);
            endpoint.discard(&id);
            info!(job_id = %id, "v2 submission refused by ComfyUI's validation");
            return Err(rejected);
        }
    }
    let origin = Origin::of(&headers);
    let state = endpoint.fresh_state();
    let body = state
        .jobs
        .get(&id)
        .map(|job| job_object(&id, job, &state, &origin, Instant::now()))
        .ok_or_else(|| V2Error::not_found("job", &id))?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn refused(refusal: Refusal) -> V2Error {
    match refusal {
        Refusal::Full(unfinished) => V2Error::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("{unfinished} jobs are queued or running, the most this endpoint keeps; retry after Retry-After."),
        )
        .retry_after(QUEUE_FULL_RETRY_S),
        Refusal::Closing => V2Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            "The endpoint is shutting down; submit the job again once it is back.",
        ),
        Refusal::Unhealthy(why) => V2Error::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "deployment_stopped",
            format!("The worker is unhealthy and takes no jobs (its warm-up failed): {why}"),
        ),
    }
}

/// For a job that starts at once: waits (bounded) until ComfyUI took its prompt, or the job
/// ended; `Some` when ComfyUI's validation refused it (then no job is created).
async fn accepted_or_rejected(
    endpoint: &LocalEndpoint,
    id: &str,
    queued: Queued,
) -> Option<V2Error> {
    let Queued {
        mut done,
        mut events,
        ..
    } = queued;
    let bound = endpoint.options().v2.validation_wait;
    let waited = tokio::time::timeout(bound, async {
        loop {
            tokio::select! {
                ended = done.wait_for(Option::is_some) => {
                    let _ = ended;
                    return;
                }
                event = events.recv() => match event {
                    // The engine's first snapshot comes once ComfyUI queued the prompt.
                    Ok(JobEvent::Progress(_)) => return,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        }
    })
    .await;
    if waited.is_err() {
        return None;
    }
    let state = endpoint.fresh_state();
    let job = state.jobs.get(id)?;
    let error = job.v2.as_ref()?.error.as_deref()?;
    if error["code"] != "invalid_workflow" || !job.status.is_final() {
        return None;
    }
    let message = error["message"].as_str().unwrap_or("Workflow rejected.");
    let mut refusal = V2Error::invalid_workflow(message);
    if let Some(details) = error.get("details") {
        refusal = refusal.with_details(details.clone());
    }
    Some(refusal)
}

/// `GET /api/v2/jobs/{id}`.
async fn get_job(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Json<Value>, V2Error> {
    let id = path_id(path)?;
    let origin = Origin::of(&headers);
    let state = endpoint.fresh_state();
    let job = state
        .jobs
        .get(&id)
        .filter(|j| j.v2.is_some())
        .ok_or_else(|| V2Error::not_found("job", &id))?;
    Ok(Json(job_object(&id, job, &state, &origin, Instant::now())))
}

/// `GET /api/v2/jobs/{id}/workflow`.
async fn workflow(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Json<Value>, V2Error> {
    let id = path_id(path)?;
    let state = endpoint.fresh_state();
    let v2 = state
        .jobs
        .get(&id)
        .and_then(|j| j.v2.as_deref())
        .ok_or_else(|| V2Error::not_found("job", &id))?;
    Ok(Json(json!({
        "workflow": *v2.workflow,
        "format": v2.format.as_str(),
    })))
}

/// `POST /api/v2/jobs/{id}/cancel`: idempotent; a queued job is removed from the queue
/// (`canceled`), a running one interrupted in ComfyUI (`canceling` until it stopped), a job
/// already ended is answered as it is.
async fn cancel(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Json<Value>, V2Error> {
    let id = path_id(path)?;
    let is_v2 = endpoint
        .fresh_state()
        .jobs
        .get(&id)
        .is_some_and(|j| j.v2.is_some());
    if !is_v2 {
        return Err(V2Error::not_found("job", &id));
    }
    endpoint
        .cancel(&id)
        .map_err(|_| V2Error::not_found("job", &id))?;
    let origin = Origin::of(&headers);
    let state = endpoint.fresh_state();
    let job = state
        .jobs
        .get(&id)
        .ok_or_else(|| V2Error::not_found("job", &id))?;
    Ok(Json(job_object(&id, job, &state, &origin, Instant::now())))
}

/// `GET /api/v2/jobs?status=a,b&limit=N&cursor=C&metadata[k]=v`: newest first.
async fn list(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, V2Error> {
    let mut limit = 50usize;
    let mut statuses = None;
    let mut cursor: Option<u64> = None;
    let mut labels: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        V2Error::bad_request("'limit' must be a whole number from 1 to 100.")
                    })?;
            }
            "status" => {
                statuses = Some(
                    status_filter(&v)
                        .map_err(|e| V2Error::bad_request(format!("'status': {e}.")))?,
                );
            }
            "cursor" => {
                cursor = Some(
                    v.strip_prefix('s')
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| {
                            V2Error::new(
                                StatusCode::BAD_REQUEST,
                                "invalid_cursor",
                                "'cursor' is not one this endpoint gave.",
                            )
                        })?,
                );
            }
            key => {
                if let Some(label) = key
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    labels.push((label.to_owned(), v.into_owned()));
                    if labels.len() > MAX_METADATA_FILTERS || label.is_empty() {
                        return Err(V2Error::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_metadata_filter",
                            format!("At most {MAX_METADATA_FILTERS} 'metadata[key]=value' filters, each with a key."),
                        ));
                    }
                }
            }
        }
    }
    let origin = Origin::of(&headers);
    let state = endpoint.fresh_state();
    let now = Instant::now();
    let mut jobs: Vec<(u64, &String, &super::super::store::Job)> = state
        .jobs
        .iter()
        .filter(|(_, j)| j.v2.is_some())
        .filter(|(_, j)| cursor.is_none_or(|c| j.seq < c))
        .filter(|(_, j)| {
            statuses
                .as_ref()
                .is_none_or(|wanted: &Vec<_>| wanted.contains(&status_of(j)))
        })
        .filter(|(_, j)| {
            let metadata = j.v2.as_ref().and_then(|v| v.metadata.as_ref());
            labels
                .iter()
                .all(|(k, v)| metadata.and_then(|m| m.get(k)).and_then(Value::as_str) == Some(v))
        })
        .map(|(id, j)| (j.seq, id, j))
        .collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.0));
    let more = jobs.len() > limit;
    jobs.truncate(limit);
    let next_cursor = if more {
        jobs.last().map(|(seq, _, _)| json!(format!("s{seq}")))
    } else {
        None
    };
    let items: Vec<Value> = jobs
        .iter()
        .map(|(_, id, job)| job_object(id, job, &state, &origin, now))
        .collect();
    Ok(Json(json!({
        "jobs": items,
        "next_cursor": next_cursor,
        "truncated": false,
    })))
}
