//! The local endpoint's HTTP server: its own accept loop over hyper, so every connection is
//! bounded. A request's headers must arrive within the header timeout (also the idle time a
//! kept-alive connection may wait for its next request), its body within the body timeout
//! between frames; at most `max_connections` are open at once (the next waits in the listen
//! backlog); and shutdown closes what is idle at once and gives the rest a short drain, so a
//! half-open connection never delays the exit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tracing::{debug, warn};

/// How long connections in flight may take to end once shutdown began (their replies are
/// already ending: the endpoint closed its event streams and `/runsync` waits first).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// The bounds of every connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// `SERVE_HEADER_TIMEOUT_S` (10): a request's headers must arrive within this, and a
    /// kept-alive connection is closed after this long without a new request.
    pub header_timeout: Duration,
    /// `SERVE_BODY_TIMEOUT_S` (30): the longest wait for the next part of a request body.
    pub body_timeout: Duration,
    /// `SERVE_MAX_CONNECTIONS` (256): connections open at once.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// Reads `SERVE_HEADER_TIMEOUT_S`, `SERVE_BODY_TIMEOUT_S` and `SERVE_MAX_CONNECTIONS`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnectionLimits, crate::config::ConfigError> {
        let env = crate::config::EnvReader::new(lookup);
        let d = ConnectionLimits::default();
        let seconds = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .map(Duration::from_secs_f64)
        };
        Ok(ConnectionLimits {
            header_timeout: env
                .parse("SERVE_HEADER_TIMEOUT_S", "seconds above 0", seconds)?
                .unwrap_or(d.header_timeout),
            body_timeout: env
                .parse("SERVE_BODY_TIMEOUT_S", "seconds above 0", seconds)?
                .unwrap_or(d.body_timeout),
            max_connections: env
                .parse(
                    "SERVE_MAX_CONNECTIONS",
                    "a whole number of at least 1",
                    |v| v.parse::<usize>().ok().filter(|n| *n >= 1),
                )?
                .unwrap_or(d.max_connections),
        })
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (see the module docs).
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = app.layer(RequestBodyTimeoutLayer::new(limits.body_timeout));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    let result = loop {
        // Finished connections' tasks are reaped as the loop goes.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
            _ = &mut shutdown => break Ok(()),
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_transient(&e) => {
                    debug!(error = %e, "accept failed; going on");
                    continue;
                }
                Err(e) => break Err(e),
            },
            _ = &mut shutdown => break Ok(()),
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    };
    drop(listener);
    // Idle connections close now, the others after their current request, within the drain.
    if tokio::time::timeout(SHUTDOWN_DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "connections still open after the drain; closing them"
        );
    }
    connections.shutdown().await;
    result
}

/// Accept errors that concern one connection, not the listener (a client that reset at once,
/// or a momentary lack of file descriptors).
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 24 || code == 23)
}
