//! `comfy-worker serve` (or the SDK's `--rp_serve_api`): the local endpoint, an HTTP server that
//! behaves like a RunPod cloud endpoint, in front of the local ComfyUI (or the simulator).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::comfy_arg::ComfyArg;
use super::exit_code::{exit, FAILED, USAGE};
use super::{terminal, SimulateArgs};
use crate::config::{shutdown_grace_from, Settings};
use crate::endpoint::{self, ServeOptions, WorkerMode};
use crate::job::Engine;
use crate::secret::Secret;
use crate::webhook::{WebhookPolicy, Webhooks};

/// Options of `serve`.
#[derive(Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (a name or an IP); anything but loopback needs an API key (or
    /// --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require this key (`Authorization: Bearer KEY` or the raw key) on every API route.
    #[arg(
        long,
        env = "SERVE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Seconds a finished job stays visible on /status (a job's policy.ttl overrides it).
    #[arg(long = "job-ttl-s", value_name = "N", default_value_t = 1800)]
    pub job_ttl_s: u64,
    /// Jobs kept at most; the oldest finished ones are dropped first.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_positive)]
    pub max_jobs: usize,
    /// `--simulate`, `--sim-step-ms` (none without the `simulator` feature).
    #[command(flatten)]
    pub sim: SimulateArgs,
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
    /// Listen beyond loopback without an API key (anyone who reaches the port can run jobs).
    #[arg(long)]
    pub insecure: bool,
    /// Who runs the jobs: this process (`internal`), or `comfy-worker worker --platform URL`
    /// processes taking them over RunPod's worker protocol (`external`), as on RunPod.
    #[arg(long, value_enum, value_name = "WHO", default_value_t = Workers::Internal)]
    pub workers: Workers,
}

/// `--workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Workers {
    /// This process runs the jobs on its ComfyUI.
    #[default]
    Internal,
    /// Worker processes take the jobs from /worker/job-take/{worker id} (RunPod's protocol).
    External,
}

/// Hand-written so the API key never reaches a log or a panic message.
impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("job_ttl_s", &self.job_ttl_s)
            .field("max_jobs", &self.max_jobs)
            .field("sim", &self.sim)
            .field("comfy", &self.comfy)
            .field("insecure", &self.insecure)
            .field("workers", &self.workers)
            .finish()
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

impl ServeArgs {
    /// What `--rp_serve_api` runs: these defaults, the SDK flags' address, `SERVE_API_KEY`.
    pub(crate) fn sdk_defaults(
        host: Option<String>,
        port: Option<u16>,
        insecure: bool,
    ) -> ServeArgs {
        ServeArgs {
            host: host.unwrap_or_else(|| "127.0.0.1".into()),
            port: port.unwrap_or(8000),
            api_key: std::env::var("SERVE_API_KEY").ok(),
            job_ttl_s: 1800,
            max_jobs: 1000,
            sim: SimulateArgs::default(),
            comfy: ComfyArg::default(),
            insecure,
            workers: Workers::Internal,
        }
    }

    fn options(&self, shutdown_grace: Duration) -> ServeOptions {
        ServeOptions {
            api_key: self
                .api_key
                .as_deref()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(Secret::new),
            job_ttl: Duration::from_secs(self.job_ttl_s),
            max_jobs: self.max_jobs,
            shutdown_grace,
            workers: match self.workers {
                Workers::Internal => WorkerMode::Internal,
                Workers::External => WorkerMode::External,
            },
            ..ServeOptions::default()
        }
    }
}

/// An error that stops `serve`, said once: a log line when logs are JSON (a collector reads
/// them), else one plain line.
fn fail(code: u8, message: String) -> ExitCode {
    if crate::telemetry::json_requested() {
        error!("{message}");
    } else {
        terminal::error("serve", &message);
    }
    exit(code)
}

/// Serves until Ctrl+C / SIGTERM; the running job is given time to finish.
pub(crate) async fn run(args: ServeArgs) -> ExitCode {
    crate::telemetry::init(
        "comfy_worker=info,comfy_sim=info",
        crate::telemetry::json_requested(),
    );
    let mut settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    args.comfy.apply(&mut settings);
    let policy = match WebhookPolicy::from_lookup(|k| std::env::var(k).ok()) {
        Ok(p) => p,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    let grace = match shutdown_grace_from(|k| std::env::var(k).ok()) {
        Ok(g) => g,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    let limits = match crate::endpoint::ConnectionLimits::from_lookup(|k| std::env::var(k).ok()) {
        Ok(l) => l,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    let v2 = match crate::endpoint::V2Options::from_lookup(|k| std::env::var(k).ok()) {
        Ok(v) => v,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    let results = match crate::endpoint::ResultStorage::from_lookup(|k| std::env::var(k).ok()) {
        Ok(r) => r,
        Err(e) => return fail(USAGE, e.to_string()),
    };
    let cors_origins: Vec<String> = std::env::var("SERVE_CORS_ORIGINS")
        .unwrap_or_default()
        .split(',')
        .map(|o| o.trim().trim_end_matches('/').to_owned())
        .filter(|o| !o.is_empty())
        .collect();
    let options = ServeOptions {
        limits,
        cors_origins,
        v2,
        results,
        ..args.options(grace)
    };
    let listener = match tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                FAILED,
                format!("cannot listen on {}:{}: {e}", args.host, args.port),
            )
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(FAILED, format!("cannot read the listening address: {e}")),
    };
    if !addr.ip().is_loopback() && options.api_key.is_none() {
        if !args.insecure {
            let message = format!(
                "refusing to listen on {addr} without an API key: anyone who can reach that address could run jobs on this machine. Set --api-key or SERVE_API_KEY, listen on 127.0.0.1, or pass --insecure to accept the risk (e.g. in a container whose port is not published)"
            );
            return fail(USAGE, message);
        }
        warn!(%addr, "--insecure: listening beyond loopback without an API key; anyone who reaches this port can run jobs");
    }
    let simulator = match args.sim.start(&mut settings).await {
        Ok(sim) => sim,
        Err(e) => return fail(FAILED, e.to_string()),
    };
    let engine = match Engine::new(settings) {
        Ok(e) => e.with_test_hooks_from_env(),
        Err(e) => return fail(USAGE, e.to_string()),
    };
    terminal::err(&match args.workers {
        Workers::Internal => format!(
            "comfy-worker: local endpoint on http://{addr} (ComfyUI at {}; Ctrl+C to stop)",
            engine.comfy().host()
        ),
        Workers::External => format!(
            "comfy-worker: local endpoint on http://{addr} (jobs are taken by workers: start them with `comfy-worker worker --platform http://{addr}`; Ctrl+C to stop)"
        ),
    });
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    let signals = tokio::spawn(async move {
        super::shutdown_signal().await;
        on_signal.cancel();
    });
    let served = endpoint::serve(listener, engine, Webhooks::new(policy), options, shutdown).await;
    signals.abort();
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(FAILED, format!("the server failed: {e}")),
    }
}
