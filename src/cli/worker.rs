//! `comfy-worker worker`: the RunPod job loop (also the default when `RUNPOD_WEBHOOK_GET_JOB` is
//! set). `--platform URL` points it at a `comfy-worker serve --workers external` instead of
//! RunPod: the worker protocol's URLs are filled in from that one address.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::comfy_arg::ComfyArg;
use super::exit_code::{exit, FAILED, SUCCESS, USAGE};
use super::terminal;
use crate::config::Settings;
use crate::job::Engine;
use crate::platform::runpod::{PlatformClient, RunPodSettings, Worker};
use crate::runner::Runner;
use crate::webhook::{WebhookPolicy, Webhooks};

/// Options of `worker`.
#[derive(Debug, Clone, Default, Args)]
pub struct WorkerArgs {
    /// Take jobs from this `comfy-worker serve --workers external` (its base URL, e.g.
    /// http://127.0.0.1:8000) instead of RunPod: sets the RUNPOD_WEBHOOK_* URLs, a worker id
    /// (RUNPOD_POD_ID, unless set) and the key (RUNPOD_AI_API_KEY, else SERVE_API_KEY).
    #[arg(long, value_name = "URL", value_parser = parse_platform)]
    pub platform: Option<String>,
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
}

impl WorkerArgs {
    /// The options of the no-subcommand mode, when the platform's variables select the loop.
    pub(crate) fn from_run(run: super::RunArgs) -> WorkerArgs {
        WorkerArgs {
            platform: None,
            comfy: run.comfy,
        }
    }
}

/// `http(s)://host[:port][/prefix]`, without a trailing slash.
fn parse_platform(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| {
        format!("not a URL ({e}); give the address `serve` prints, e.g. http://127.0.0.1:8000")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("give the http(s) address `serve` prints, e.g. http://127.0.0.1:8000".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("give the base address only, without ? or #".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Whether the environment selects the RunPod job loop (`RUNPOD_WEBHOOK_GET_JOB` is set).
pub(crate) fn selected_by_env() -> bool {
    std::env::var("RUNPOD_WEBHOOK_GET_JOB").is_ok_and(|v| !v.trim().is_empty())
}

/// The worker-protocol variables for a `serve --workers external` at `base`, over `env`.
pub(crate) fn platform_env(
    base: &str,
    env: impl Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    vars.insert(
        "RUNPOD_WEBHOOK_GET_JOB".to_owned(),
        format!("{base}/worker/job-take/$ID"),
    );
    vars.insert(
        "RUNPOD_WEBHOOK_POST_OUTPUT".to_owned(),
        format!("{base}/worker/job-done/$RUNPOD_POD_ID/$ID"),
    );
    vars.insert(
        "RUNPOD_WEBHOOK_PING".to_owned(),
        format!("{base}/worker/ping/$RUNPOD_POD_ID"),
    );
    let id = env("RUNPOD_POD_ID")
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    vars.insert("RUNPOD_POD_ID".to_owned(), id);
    // The heartbeat runs only with a key; `serve` without one accepts any.
    let key = env("RUNPOD_AI_API_KEY")
        .or_else(|| env("SERVE_API_KEY"))
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "local".to_owned());
    vars.insert("RUNPOD_AI_API_KEY".to_owned(), key);
    vars
}

/// Runs the job loop until SIGTERM / Ctrl+C (the job in progress is finished and posted first).
pub(crate) async fn run(args: WorkerArgs) -> ExitCode {
    crate::telemetry::init("comfy_worker=info", crate::telemetry::json_requested());
    let overlay = args
        .platform
        .as_deref()
        .map(|base| platform_env(base, |k| std::env::var(k).ok()))
        .unwrap_or_default();
    let lookup = |k: &str| overlay.get(k).cloned().or_else(|| std::env::var(k).ok());
    let runpod = match RunPodSettings::from_lookup(lookup) {
        Ok(Some(s)) => s,
        Ok(None) => {
            terminal::error(
                "worker",
                &"RUNPOD_WEBHOOK_GET_JOB is not set (the platform's job-take URL); on your machine, use --platform with the address of `comfy-worker serve --workers external`",
            );
            return exit(USAGE);
        }
        Err(e) => return config_error(&e),
    };
    if let Some(base) = &args.platform {
        info!(platform = %base, worker_id = %runpod.worker_id, "taking jobs from a local endpoint");
    }
    let mut settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return config_error(&e),
    };
    args.comfy.apply(&mut settings);
    let engine = match Engine::new(settings) {
        Ok(e) => e.with_test_hooks_from_env(),
        Err(e) => return config_error(&e),
    };
    let grace = runpod.shutdown_grace;
    let client = match PlatformClient::new(runpod) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let webhooks = match WebhookPolicy::from_lookup(|k| std::env::var(k).ok()) {
        Ok(policy) => Webhooks::new(policy),
        Err(e) => return config_error(&e),
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
        Ok(()) => exit(SUCCESS),
        // The warm-up failed: exit non-zero so the platform replaces the worker.
        Err(_) => exit(FAILED),
    }
}

/// A setting that cannot work: one log line (the platform reads logs), exit 2.
fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    error!(error = %e, "invalid configuration");
    exit(USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_fills_the_worker_protocol() {
        let base = parse_platform("http://127.0.0.1:8000/").unwrap();
        let env = |k: &str| (k == "SERVE_API_KEY").then(|| "k1".to_owned());
        let vars = platform_env(&base, env);
        assert_eq!(
            vars["RUNPOD_WEBHOOK_GET_JOB"],
            "http://127.0.0.1:8000/worker/job-take/$ID"
        );
        assert_eq!(
            vars["RUNPOD_WEBHOOK_POST_OUTPUT"],
            "http://127.0.0.1:8000/worker/job-done/$RUNPOD_POD_ID/$ID"
        );
        assert_eq!(vars["RUNPOD_AI_API_KEY"], "k1");
        assert!(vars["RUNPOD_POD_ID"].starts_with("worker-"));
        assert!(parse_platform("ftp://x").is_err());
        assert!(parse_platform("127.0.0.1:8000").is_err());
        assert!(parse_platform("http://h:1/?x=1").is_err());
    }
}
