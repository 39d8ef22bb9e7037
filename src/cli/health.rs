//! `comfy-worker health`: is ComfyUI up, and what does it run on? Prints `/system_stats`
//! (version, Python, PyTorch, devices with free and total VRAM) and the queue length; exits 0
//! when ComfyUI answered, 1 when it did not.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::comfy::{ClientOptions, ComfyClient};
use crate::config::Settings;

/// Options of `health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// ComfyUI address (overrides COMFY_HOST).
    #[arg(long, visible_alias = "comfy-host", value_name = "HOST:PORT")]
    pub comfy: Option<String>,
    /// Print one JSON object (the `comfyui` object of `serve`'s /health) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for ComfyUI's answers, in seconds.
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 5.0)]
    pub timeout_s: f64,
}

pub(crate) async fn run(args: HealthArgs) -> ExitCode {
    crate::telemetry::init("comfy_worker=warn", crate::telemetry::json_requested());
    let host = match args.comfy {
        Some(h) => h,
        None => match Settings::from_env() {
            Ok(s) => s.comfy_host,
            Err(e) => {
                eprintln!("comfy-worker health: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let timeout = Duration::try_from_secs_f64(args.timeout_s)
        .ok()
        .filter(|t| !t.is_zero())
        .unwrap_or(Duration::from_secs(5));
    let client = match ComfyClient::new(
        &host,
        ClientOptions {
            connect_timeout: timeout,
            request_timeout: timeout,
            view_timeout: timeout,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comfy-worker health: {e}");
            return ExitCode::from(2);
        }
    };
    let health = crate::comfy::health::probe(&client, timeout).await;
    if args.json {
        println!("{}", health.to_json());
    } else {
        for line in health.lines() {
            println!("{line}");
        }
    }
    if health.reachable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
