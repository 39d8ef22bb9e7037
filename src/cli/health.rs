//! `comfy-worker health`: is ComfyUI up, and what does it run on? Prints `/system_stats`
//! (version, Python, PyTorch, devices with free and total VRAM) and the queue length; exits 0
//! when ComfyUI answered, 1 when it did not. With several ComfyUIs in `COMFY_HOST`, each in
//! turn (`--json`: an array), and 0 only when every one answered.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::comfy_arg::ComfyArg;
use super::exit_code::{exit, FAILED, SUCCESS, USAGE};
use super::terminal;
use crate::comfy::{ClientOptions, ComfyClient};
use crate::config::Settings;

/// Options of `health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
    /// Print one JSON object (the `comfyui` object of `serve`'s /health) instead of lines; an
    /// array of them when COMFY_HOST names several ComfyUIs.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for ComfyUI's answers, in seconds.
    #[arg(long = "timeout-s", value_name = "S", default_value_t = 5.0, value_parser = positive_seconds)]
    pub timeout_s: f64,
}

/// A number of seconds above 0, at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err("expected a number of seconds above 0 (at most 86400)".into()),
    }
}

pub(crate) async fn run(args: HealthArgs) -> ExitCode {
    crate::telemetry::init("comfy_worker=warn", crate::telemetry::json_requested());
    let mut settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            terminal::error("health", &e);
            return exit(USAGE);
        }
    };
    args.comfy.apply(&mut settings);
    let timeout = Duration::from_secs_f64(args.timeout_s);
    let options = ClientOptions {
        connect_timeout: timeout,
        request_timeout: timeout,
        view_timeout: timeout,
    };
    let client = match ComfyClient::new(&settings.comfy_host, options) {
        Ok(c) => c,
        Err(e) => {
            terminal::error("health", &e);
            return exit(FAILED);
        }
    };
    // Every ComfyUI COMFY_HOST names (one per GPU), asked at once.
    let clients: Vec<ComfyClient> = settings
        .per_instance()
        .iter()
        .map(|s| client.for_address(&s.comfy_host))
        .collect();
    let probes = futures_util::future::join_all(
        clients
            .iter()
            .map(|c| crate::comfy::health::probe(c, timeout)),
    )
    .await;
    if args.json {
        let text = match probes.as_slice() {
            [one] => one.to_json().to_string(),
            several => {
                serde_json::Value::Array(several.iter().map(|h| h.to_json()).collect()).to_string()
            }
        };
        terminal::out(&text);
    } else {
        for (i, health) in probes.iter().enumerate() {
            if i > 0 {
                terminal::out("");
            }
            for line in health.lines() {
                terminal::out(&line);
            }
        }
    }
    if probes.iter().all(|h| h.reachable()) {
        exit(SUCCESS)
    } else {
        exit(FAILED)
    }
}
