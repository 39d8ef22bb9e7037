//! The local endpoint (`comfy-worker serve`): an HTTP server that behaves like a RunPod cloud
//! endpoint (`/run`, `/runsync`, `/status`, `/stream`, `/cancel`, `/health`, `/purge-queue`),
//! plus live progress as Server-Sent Events (`/events/{id}`), an OpenAPI document and a page.
//!
//! * `local_endpoint.rs`: [`LocalEndpoint`], the handle, and the queue runner (jobs run in
//!   order, one at a time, on the [`crate::runner::Runner`]);
//! * `store.rs`: the job store (statuses, timings, retention, event channels);
//! * `submission.rs`: a `/run` body, checked; `job_status.rs`: `IN_QUEUE`, `COMPLETED`, ...;
//! * `routes.rs`: the axum router (auth, body limits, SSE, JSON errors); `error.rs`: `ApiError`;
//! * `worker_hub.rs` and `worker_routes.rs`: with `--workers external`, the endpoint as the
//!   platform of worker processes (RunPod's worker protocol under `/worker/`);
//! * `openapi.json` and `page.html`, served as they are;
//! * `auth.rs`: the API key check; `cross_site.rs`: the guard of a keyless endpoint;
//! * `v2/`: the Comfy API v2 surface (`/api/v2/...`) on the same store and runner.
//!
//! Only this module knows the endpoint's wire format; it reports a job's end with the
//! serverless mode's result mapping ([`crate::job::output::result_body`]) so both modes report a
//! job the same way.

mod auth;
mod cross_site;
mod error;
mod job_status;
mod local_endpoint;
mod routes;
mod server;
mod status_body;
mod store;
mod submission;
mod v2;
mod worker_hub;
mod worker_routes;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::job::Engine;
use crate::secret::Secret;
use crate::webhook::Webhooks;

pub use job_status::JobStatus;
pub use local_endpoint::LocalEndpoint;
pub use routes::router;
pub use server::ConnectionLimits;
pub use status_body::ResultStorage;
pub use v2::V2Options;
pub use worker_hub::{LONG_POLL, WORKER_LOST_AFTER};

/// How the local endpoint behaves; [`ServeOptions::default`] matches the cloud's limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// When set, every route except `GET /` and `GET /openapi.json` needs
    /// `Authorization: Bearer <key>` (or the raw key, as the RunPod docs also show).
    pub api_key: Option<Secret>,
    /// How long a finished job stays visible (the cloud keeps `/run` results 30 min);
    /// a job's `policy.ttl` overrides it.
    pub job_ttl: Duration,
    /// Jobs kept at most; beyond it the oldest finished ones are dropped, and while every kept job
    /// is queued or running, new submissions are refused with 429.
    pub max_jobs: usize,
    /// Largest `/run` request body (the cloud's 10 MB).
    pub max_run_bytes: usize,
    /// Largest `/runsync` request body (the cloud's 20 MB).
    pub max_runsync_bytes: usize,
    /// How long `/runsync` waits without `?wait=` (the cloud's 90 s).
    pub runsync_default_wait: Duration,
    /// After shutdown began, how long the running job may take to finish before it is
    /// interrupted and failed (`SHUTDOWN_GRACE_S`, 20 s).
    pub shutdown_grace: Duration,
    /// Every connection's timeouts and the connection cap.
    pub limits: ConnectionLimits,
    /// `SERVE_CORS_ORIGINS`: web origins (`https://app.example`) allowed to call the API from a
    /// browser; without an API key, the only cross-site callers accepted.
    pub cors_origins: Vec<String>,
    /// The address the endpoint listens on (set by [`serve`]): a keyless endpoint accepts it in
    /// `Host` beside the loopback names.
    pub bound: Option<std::net::SocketAddr>,
    /// Who runs the jobs.
    pub workers: WorkerMode,
    /// With external workers: a job whose worker was not heard from (no job-take, ping or
    /// post) for this long fails ([`WORKER_LOST_AFTER`], 60 s; workers ping every 10 s).
    pub worker_lost_after: Duration,
    /// The Comfy API v2 surface's settings (assets, UI-format workflows).
    pub v2: V2Options,
    /// Where final results are kept: in memory up to a size, in files beyond.
    pub results: ResultStorage,
}

/// Who runs the local endpoint's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerMode {
    /// This process, on its ComfyUI, one at a time.
    #[default]
    Internal,
    /// Worker processes (`comfy-worker worker --platform URL`), which take them over RunPod's
    /// worker protocol under `/worker/` (job-take, job-stop, job-done, ping), as on RunPod.
    External,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            api_key: None,
            job_ttl: Duration::from_secs(30 * 60),
            max_jobs: 1000,
            max_run_bytes: 10 * 1000 * 1000,
            max_runsync_bytes: 20 * 1000 * 1000,
            runsync_default_wait: Duration::from_secs(90),
            shutdown_grace: crate::config::DEFAULT_SHUTDOWN_GRACE,
            limits: ConnectionLimits::default(),
            cors_origins: Vec::new(),
            bound: None,
            workers: WorkerMode::Internal,
            worker_lost_after: WORKER_LOST_AFTER,
            v2: V2Options::default(),
            results: ResultStorage::default(),
        }
    }
}

/// Serves the local endpoint on `listener` until `shutdown` is cancelled; then it stops accepting,
/// ends event streams and `/runsync` waits, and lets the running job finish (for at most
/// [`ServeOptions::shutdown_grace`]; then it is interrupted and fails). Queued jobs fail as not
/// started (their webhooks are told).
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    webhooks: Webhooks,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let options = ServeOptions {
        bound: Some(addr),
        ..options
    };
    let endpoint = LocalEndpoint::try_new(engine, webhooks, options).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot make the asset store's directory (SERVE_ASSET_DIR): {e}"),
        )
    })?;
    if endpoint.options().workers == WorkerMode::External {
        worker_hub::start(&endpoint);
    }
    let app = router(endpoint.clone());
    let closing = {
        let endpoint = endpoint.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            // Long-lived replies (event streams, `/runsync`) end now, so the server can drain.
            endpoint.close();
            info!("shutdown requested: finishing the running job, accepting no new requests");
        }
    };
    info!(%addr, auth = endpoint.options().api_key.is_some(), "local endpoint listening");
    let limits = endpoint.options().limits.clone();
    let served = server::serve_http(listener, app, &limits, closing).await;
    // Also when the server failed: the runner must not outlive it.
    endpoint.close();
    // The grace, the interrupt's confirmation (at most 15 s) and the webhooks' hand-over.
    let bound = endpoint.options().shutdown_grace + Duration::from_secs(40);
    if tokio::time::timeout(bound, endpoint.stopped())
        .await
        .is_err()
    {
        warn!("the running job did not end in time; exiting anyway");
    }
    info!("local endpoint stopped");
    served
}
