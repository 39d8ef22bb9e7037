//! `comfy-worker worker`: the RunPod job loop (also the default when `RUNPOD_WEBHOOK_GET_JOB` is set).

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Settings;
use crate::job::Engine;
use crate::platform::runpod::{PlatformClient, RunPodSettings, Worker};
use crate::runner::Runner;
use crate::webhook::{WebhookPolicy, Webhooks};

/// Runs the job loop until SIGTERM / Ctrl+C (the job in progress is finished and posted first).
pub(crate) async fn run(runpod: RunPodSettings) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            return ExitCode::FAILURE;
        }
    };
    let engine = match Engine::new(settings) {
        Ok(e) => e.with_test_hooks_from_env(),
        Err(e) => {
            error!(error = %e, "invalid ComfyUI configuration");
            return ExitCode::FAILURE;
        }
    };
    let grace = runpod.shutdown_grace;
    let client = match PlatformClient::new(runpod) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "invalid platform configuration");
            return ExitCode::FAILURE;
        }
    };
    let webhooks = match WebhookPolicy::from_lookup(|k| std::env::var(k).ok()) {
        Ok(policy) => Webhooks::new(policy),
        Err(e) => {
            error!(error = %e, "invalid webhook configuration");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        on_signal.cancel();
        info!("shutdown requested: finishing the job in progress, taking no new ones");
    });
    let runner = Runner::new(engine, grace);
    match Worker::new(runner, client, webhooks).run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        // The warm-up failed: exit non-zero so the platform replaces the worker.
        Err(_) => ExitCode::FAILURE,
    }
}
