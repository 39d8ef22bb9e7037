//! The axum router: the cloud endpoint's routes at the root and under `/v2/{endpoint_id}/`,
//! the API key check, per-route body limits, and JSON errors for everything a client can get
//! wrong (bad JSON, unknown ids, unknown routes, wrong methods).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tracing::debug;

use super::error::ApiError;
use super::job_status::status_is_final;
use super::local_endpoint::LocalEndpoint;
use super::status_body::StatusBody;
use super::store::JobEvent;
use super::submission::Submission;
use super::v2::error::V2Error;
use super::WorkerMode;
use crate::housekeeping::warmup::WarmupState;

/// The page served at `GET /`.
const PAGE: &str = include_str!("page.html");

/// The OpenAPI 3.0 description served at `GET /openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// `/runsync?wait=` bounds, as the cloud clamps them (ms).
const RUNSYNC_WAIT_MS: (u64, u64) = (1_000, 300_000);

/// How long `/health` waits for ComfyUI's `/system_stats`.
const HEALTH_PROBE: Duration = Duration::from_secs(2);

/// The local endpoint's routes, at the root and under `/v2/{endpoint_id}/` (the cloud's path
/// shape, so `RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:8000/v2` works for the official clients).
pub fn router(endpoint: LocalEndpoint) -> Router {
    let options = endpoint.options().clone();
    let protected = Router::new()
        .route(
            "/run",
            post(run)
                .layer(DefaultBodyLimit::max(options.max_run_bytes))
                .layer(middleware::from_fn_with_state(
                    options.max_run_bytes,
                    refuse_announced_oversize,
                )),
        )
        .route(
            "/runsync",
            post(runsync)
                .layer(DefaultBodyLimit::max(options.max_runsync_bytes))
                .layer(middleware::from_fn_with_state(
                    options.max_runsync_bytes,
                    refuse_announced_oversize,
                )),
        )
        .route("/status/{id}", get(status).post(status))
        .route("/stream/{id}", get(stream).post(stream))
        .route("/cancel/{id}", post(cancel))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/purge-queue", post(purge_queue))
        .route("/events/{id}", get(events));
    let protected = match options.workers {
        WorkerMode::Internal => protected,
        WorkerMode::External => protected.merge(super::worker_routes::routes()),
    };
    let protected = protected
        .route_layer(middleware::from_fn_with_state(
            endpoint.clone(),
            require_api_key,
        ))
        .route_layer(middleware::from_fn_with_state(
            endpoint.clone(),
            super::cross_site::refuse_cross_site,
        ));
    let api = Router::new()
        .route("/", get(page))
        .route("/openapi.json", get(openapi))
        .merge(protected);
    let router = Router::new()
        .route("/v2/{endpoint_id}/", get(page))
        .nest("/v2/{endpoint_id}", api.clone())
        .merge(api)
        .merge(super::v2::routes::router(&endpoint))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(endpoint);
    match cors(&options.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// CORS for the origins in `SERVE_CORS_ORIGINS` (none: no CORS headers, so browsers keep
/// other sites' pages from reading any reply).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<header::HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    (!origins.is_empty()).then(|| {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::HEAD])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::CONTENT_RANGE,
                header::ACCEPT_RANGES,
            ])
    })
}

/// The `{id}` of a job route; by name, so the `{endpoint_id}` of the prefix does not matter.
#[derive(Debug, Deserialize)]
struct JobPath {
    id: String,
}

fn job_id(path: Result<Path<JobPath>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(p)| p.id)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// The request body as JSON; over the route's limit is 413.
fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than this route's limit of {limit} bytes"),
            )
        } else if body_timed_out(&rejection) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body stopped arriving (SERVE_BODY_TIMEOUT_S)",
            )
        } else {
            ApiError::new(rejection.status(), rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// Refuses a body that announces more than the route takes (`Content-Length`) before it is
/// read: 413 at once, not after the body timeout. (`DefaultBodyLimit` catches one that turns
/// out larger as it is read.)
async fn refuse_announced_oversize(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than this route's limit of {limit} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether reading the body failed for the body timeout (the server's `TimeoutBody`).
fn body_timed_out(rejection: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Accepts `Authorization: Bearer <key>` or the raw key, when a key is configured.
async fn require_api_key(
    State(endpoint): State<LocalEndpoint>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &endpoint.options().api_key {
        if !super::auth::authorized(request.headers(), key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn run(
    State(endpoint): State<LocalEndpoint>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(body, endpoint.options().max_run_bytes)?;
    let (id, _) = endpoint.submit(Submission::parse(body)?).await?;
    Ok(Json(json!({ "id": id, "status": "IN_QUEUE" })))
}

/// `?wait=ms` clamped to the cloud's bounds; the default otherwise.
fn runsync_wait(query: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    let wait = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "wait")
        .map(|(_, v)| v.into_owned());
    let Some(wait) = wait else {
        return Ok(default);
    };
    let ms: f64 = wait
        .trim()
        .parse()
        .ok()
        .filter(|ms: &f64| ms.is_finite())
        .ok_or_else(|| ApiError::bad_request("'wait' must be a number of milliseconds"))?;
    let (low, high) = RUNSYNC_WAIT_MS;
    Ok(Duration::from_millis(
        ms.clamp(low as f64, high as f64) as u64
    ))
}

async fn runsync(
    State(endpoint): State<LocalEndpoint>,
    RawQuery(query): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let wait = runsync_wait(query.as_deref(), endpoint.options().runsync_default_wait)?;
    let body = json_body(body, endpoint.options().max_runsync_bytes)?;
    let (id, mut done) = endpoint.submit(Submission::parse(body)?).await?;
    let closing = endpoint.closing().clone();
    let finished: Option<StatusBody> = tokio::select! {
        r = tokio::time::timeout(wait, done.wait_for(Option::is_some)) => match r {
            Ok(Ok(body)) => body.clone(),
            _ => None,
        },
        _ = closing.cancelled() => None,
    };
    // Not final in time: the current status; the client polls `/status` from here.
    let body = finished
        .or_else(|| endpoint.current_status(&id))
        .or_else(|| done.borrow().clone())
        .ok_or_else(|| ApiError::job_not_found(&id))?;
    Ok(body.response().await)
}

async fn status(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<JobPath>, PathRejection>,
) -> Result<Response, ApiError> {
    let body = endpoint.status(&job_id(path)?)?;
    Ok(body.response().await)
}

async fn stream(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<JobPath>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(endpoint.stream(&job_id(path)?)?))
}

async fn cancel(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<JobPath>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(path)?;
    let status = endpoint.cancel(&id)?;
    Ok(Json(json!({ "id": id, "status": status.as_str() })))
}

async fn purge_queue(State(endpoint): State<LocalEndpoint>) -> Json<Value> {
    let removed = endpoint.purge_queue();
    Json(json!({ "removed": removed, "status": "completed" }))
}

/// The cloud's `/health` body plus `comfyui` (system stats and queue) and `warmup`. 503 while
/// the warm-up runs or after it failed (the worker takes no jobs then), 200 otherwise.
/// Prometheus metrics (OpenMetrics text), behind the API key like every other route.
async fn metrics(State(endpoint): State<LocalEndpoint>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        endpoint.metrics().encode(),
    )
        .into_response()
}

async fn health(State(endpoint): State<LocalEndpoint>) -> Response {
    let counts = endpoint.counts();
    let external = endpoint.options().workers == WorkerMode::External;
    // With external workers, ComfyUI is theirs: nothing to ask here. With several ComfyUIs,
    // each is asked at once; the endpoint is degraded only when none answers.
    let probes = match external {
        true => Vec::new(),
        false => {
            let clients = endpoint.comfy_clients();
            futures_util::future::join_all(
                clients
                    .iter()
                    .map(|c| crate::comfy::health::probe(c, HEALTH_PROBE)),
            )
            .await
        }
    };
    let reachable = probes.is_empty() || probes.iter().any(|c| c.reachable());
    let hosts: Vec<String> = probes.iter().map(|c| c.host.clone()).collect();
    let several =
        (probes.len() > 1).then(|| probes.iter().map(|c| c.to_json()).collect::<Vec<_>>());
    let comfyui = probes.into_iter().next();
    let warmup = endpoint.warmup();
    let instances = endpoint.instances();
    let busy = counts.running.min(instances);
    let (code, status) = match &warmup {
        WarmupState::Failed(_) => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
        WarmupState::Running => (StatusCode::SERVICE_UNAVAILABLE, "warming_up"),
        // Jobs would only wait: say so. (With external workers, ComfyUI is theirs.)
        _ if !reachable => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
        WarmupState::Off | WarmupState::Done(_) => (StatusCode::OK, "healthy"),
    };
    let workers = if external {
        json!({ "idle": counts.workers - counts.workers_busy.min(counts.workers), "running": counts.workers_busy })
    } else {
        json!({ "idle": instances - busy, "running": busy })
    };
    let mut body = json!({
        "status": status,
        "jobs": {
            "completed": counts.completed,
            "failed": counts.failed,
            "inProgress": counts.in_progress,
            "inQueue": counts.in_queue,
            "retried": 0,
        },
        "workers": workers,
        "comfyui": comfyui.map(|c| c.to_json()),
        "warmup": warmup.to_json(),
    });
    if let Some(all) = several {
        body["instances"] = Value::Array(all);
    }
    if let WarmupState::Failed(why) = &warmup {
        body["error"] = json!(why.to_string());
    } else if status == "degraded" {
        body["error"] = json!(format!(
            "ComfyUI at {} does not answer; jobs wait for it (COMFY_READY_TIMEOUT_S), then fail",
            hosts.join(", ")
        ));
    }
    (code, Json(body)).into_response()
}

async fn events(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<JobPath>, PathRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = job_id(path)?;
    let (first, receiver) = endpoint.subscribe(&id)?;
    let feed = Feed::new(endpoint, id, &first, receiver);
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        feed.next().await.map(|event| (Ok(event), feed))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One `/events` subscriber: `status` first, then `progress` and `status` events as they come,
/// until a final status (or shutdown). A subscriber that falls behind skips to the current state.
struct Feed {
    endpoint: LocalEndpoint,
    id: String,
    receiver: tokio::sync::broadcast::Receiver<JobEvent>,
    pending: VecDeque<Event>,
    last_status: String,
    done: bool,
}

fn sse_event(name: &'static str, data: &(impl serde::Serialize + ?Sized)) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".into()))
}

impl Feed {
    fn new(
        endpoint: LocalEndpoint,
        id: String,
        first: &StatusBody,
        receiver: tokio::sync::broadcast::Receiver<JobEvent>,
    ) -> Feed {
        let mut feed = Feed {
            endpoint,
            id,
            receiver,
            pending: VecDeque::new(),
            last_status: String::new(),
            done: false,
        };
        feed.push_status(first);
        if !feed.done {
            // A late subscriber sees the image as it stands.
            if let Some(preview) = feed.endpoint.preview(&feed.id) {
                feed.pending
                    .push_back(sse_event("preview", preview.as_ref()));
            }
        }
        feed
    }

    fn push_status(&mut self, body: &StatusBody) {
        self.pending.push_back(sse_event("status", body));
        self.last_status = body.status().to_owned();
        if status_is_final(body.status()) {
            self.done = true;
        }
    }

    /// After skipped events: the status if it changed, else the latest snapshot.
    fn catch_up(&mut self) {
        match self.endpoint.current_status(&self.id) {
            Some(body) if body.status() != self.last_status => self.push_status(&body),
            Some(body) => {
                // A body not final yet is in memory: its `output` is the latest snapshot.
                if !status_is_final(body.status()) {
                    if let Some(snapshot) = body.value().ok().and_then(|v| v.get("output").cloned())
                    {
                        self.pending.push_back(sse_event("progress", &snapshot));
                    }
                }
            }
            None => self.done = true,
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
                Ok(JobEvent::Status(body)) => self.push_status(&body),
                Ok(JobEvent::Progress(snapshot)) => self
                    .pending
                    .push_back(sse_event("progress", snapshot.as_ref())),
                Ok(JobEvent::Preview(preview)) => self
                    .pending
                    .push_back(sse_event("preview", preview.as_ref())),
                Err(RecvError::Lagged(skipped)) => {
                    debug!(job_id = %self.id, skipped, "event subscriber fell behind");
                    self.catch_up();
                }
                Err(RecvError::Closed) => {
                    self.catch_up();
                    self.done = true;
                }
                // The Comfy API v2 surface's own events.
                Ok(_) => {}
            }
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The Comfy API v2 surface answers in its own envelope.
fn is_v2(uri: &Uri) -> bool {
    uri.path().starts_with("/api/v2/")
}

async fn no_route(method: Method, uri: Uri) -> Response {
    let message = format!("no route for {method} {}", uri.path());
    if is_v2(&uri) {
        return V2Error::new(StatusCode::NOT_FOUND, "not_found", message).into_response();
    }
    ApiError::new(StatusCode::NOT_FOUND, message).into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    let message = format!("{method} is not allowed on {}", uri.path());
    if is_v2(&uri) {
        return V2Error::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
        .into_response();
    }
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Event`'s wire form, e.g. `event: status\ndata: {...}\n\n`.
    async fn wire(event: Event) -> String {
        use axum::response::IntoResponse;
        let stream = futures_util::stream::iter([Ok::<_, Infallible>(event)]);
        let response = Sse::new(stream).into_response();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_skips_to_the_current_state() {
        use crate::progress::ProgressTracker;
        use futures_util::FutureExt;
        use std::time::Instant;

        let endpoint = LocalEndpoint::without_runner();
        let submission = Submission::parse(json!({"input": {}})).unwrap();
        let (id, _) = endpoint.submit(submission).await.unwrap();
        let (first, receiver) = endpoint.subscribe(&id).unwrap();
        let mut feed = Feed::new(endpoint.clone(), id.clone(), &first, receiver);
        assert_eq!(endpoint.start_next_by_hand().as_deref(), Some(id.as_str()));
        // Far more events than the buffer holds, with nobody reading: the job never waits.
        let workflow = crate::comfy::Workflow::from_value(
            json!({"1": {"class_type": "SaveImage", "inputs": {}}}),
        )
        .unwrap();
        let snapshot = ProgressTracker::new(&workflow, Instant::now()).finished(Instant::now());
        let flood = 3 * super::super::store::EVENT_BUFFER;
        for _ in 0..flood {
            endpoint.progress_by_hand(&id, &snapshot);
        }
        // What the subscriber can read now: it skipped to the current state.
        let mut events = Vec::new();
        while let Some(Some(event)) = feed.next().now_or_never() {
            events.push(wire(event).await);
        }
        assert!(events[0].starts_with("event: status") && events[0].contains("IN_QUEUE"));
        assert!(
            events[1].starts_with("event: status") && events[1].contains("IN_PROGRESS"),
            "the missed status change comes first: {}",
            events[1]
        );
        assert!(events.len() < flood, "skipped events: {}", events.len());

        let nothing = crate::job::Completed::from_parts(vec![], vec![]).unwrap();
        endpoint.complete_by_hand(&id, nothing);
        let mut rest = Vec::new();
        while let Some(event) = tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .unwrap()
        {
            rest.push(wire(event).await);
        }
        let last = rest.last().unwrap();
        assert!(
            last.starts_with("event: status") && last.contains("COMPLETED"),
            "{last}"
        );
    }

    #[test]
    fn runsync_wait_is_clamped() {
        let default = Duration::from_secs(90);
        assert_eq!(runsync_wait(None, default).unwrap(), default);
        assert_eq!(runsync_wait(Some("x=1"), default).unwrap(), default);
        assert_eq!(
            runsync_wait(Some("wait=10"), default).unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            runsync_wait(Some("wait=2500"), default).unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(
            runsync_wait(Some("wait=9999999"), default).unwrap(),
            Duration::from_secs(300)
        );
        assert!(runsync_wait(Some("wait=soon"), default).is_err());
    }

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
        for path in [
            "/",
            "/run",
            "/runsync",
            "/status/{id}",
            "/stream/{id}",
            "/cancel/{id}",
            "/health",
            "/metrics",
            "/purge-queue",
            "/events/{id}",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
    }
}
