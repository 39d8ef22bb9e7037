//! The RunPod loop's metrics listener (`METRICS_PORT`): a tiny HTTP server that answers
//! `GET /metrics` with the worker's Prometheus metrics and 404 to everything else. It has no
//! key of its own: it listens on `127.0.0.1` unless `METRICS_ADDR` says otherwise.

use std::net::SocketAddr;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{Metrics, CONTENT_TYPE};

/// A bound metrics listener, not serving yet.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` (port 0: any free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<MetricsListener> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(MetricsListener { listener, addr })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `metrics` until `stop` is cancelled.
    pub async fn serve(self, metrics: Metrics, stop: CancellationToken) {
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.encode()) }
                }),
            )
            .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n").into_response() });
        info!(addr = %self.addr, "metrics listening at /metrics");
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            warn!(error = %e, "the metrics listener failed");
        }
    }
}
