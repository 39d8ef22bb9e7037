//! `comfy-worker lambda`: the AWS Lambda Runtime API loop (also the default when
//! `AWS_LAMBDA_RUNTIME_API` is set and no `RUNPOD_*` variable is). Built with the `lambda`
//! cargo feature (on by default); without it the command explains how to get it.

use std::process::ExitCode;

use clap::Args;

use super::comfy_arg::ComfyArg;
#[cfg(feature = "lambda")]
use super::exit_code::FAILED;
use super::exit_code::{exit, USAGE};

/// Options of `lambda`.
#[derive(Debug, Clone, Default, Args)]
pub struct LambdaArgs {
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
}

#[cfg(feature = "lambda")]
pub(crate) async fn run(args: LambdaArgs) -> ExitCode {
    use tokio_util::sync::CancellationToken;
    use tracing::{error, info, warn};

    use crate::config::Settings;
    use crate::config::StorageSettings;
    use crate::job::Engine;
    use crate::platform::lambda::{LambdaConfigError, LambdaSettings, LambdaWorker};
    use crate::runner::Runner;
    use std::time::Duration;

    let json = crate::telemetry::json_requested()
        || std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    crate::telemetry::init("comfy_worker=info", json);
    let lookup = |k: &str| std::env::var(k).ok();
    let lambda = match LambdaSettings::from_lookup(lookup) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "invalid Lambda configuration");
            if !matches!(&e, LambdaConfigError::Missing(m) if m.contains(&"AWS_LAMBDA_RUNTIME_API"))
            {
                init_error("InvalidConfiguration", &e.to_string()).await;
            }
            return exit(USAGE);
        }
    };
    let mut settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            init_error("InvalidConfiguration", &e.to_string()).await;
            return exit(USAGE);
        }
    };
    args.comfy.apply(&mut settings);
    if settings.instance_count() > 1 {
        // An invocation is one job: one ComfyUI serves it.
        warn!(
            instances = settings.instance_count(),
            comfy = %settings.comfy_host.shown(),
            "COMFY_HOST names several ComfyUIs; Lambda runs one invocation at a time, on the first"
        );
        settings.other_instances.clear();
    }
    // Lambda's response limits, unless the operator chose a limit.
    if !StorageSettings::inline_limit_is_set(&lookup) {
        settings.storage.max_inline_bytes = Some(lambda.response_mode.inline_limit());
    }
    let engine = match Engine::new(settings) {
        Ok(e) => e.with_test_hooks_from_env(),
        Err(e) => {
            error!(error = %e, "invalid ComfyUI configuration");
            init_error("InvalidConfiguration", &e.to_string()).await;
            return exit(USAGE);
        }
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        super::shutdown_signal().await;
        info!("shutdown requested");
        on_signal.cancel();
    });
    // Lambda has no shutdown grace: the runtime ends the invocation.
    let runner = Runner::new(engine, Duration::ZERO);
    // WARMUP_WORKFLOW runs in the init phase; a failure is an init error, as in the other modes.
    if let Err(why) = runner.warm_up(&shutdown).await {
        if !shutdown.is_cancelled() {
            init_error("WarmupFailed", &why.to_string()).await;
            return exit(FAILED);
        }
    }
    match LambdaWorker::new(runner, lambda).run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "the Lambda Runtime API failed");
            exit(FAILED)
        }
    }
}

/// Reports why the function cannot start (`InvalidConfiguration`, `WarmupFailed`) to the Runtime
/// API's init-error endpoint, so the invoker sees it (best effort; the process exits after it).
#[cfg(feature = "lambda")]
async fn init_error(error_type: &str, message: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    // `host:port` from Lambda; emulators may give a URL (`http://host:port/prefix`).
    let api = api.trim().trim_end_matches('/');
    let base = if api.starts_with("http://") || api.starts_with("https://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let url = format!("{base}/2018-06-01/runtime/init/error");
    let body = serde_json::json!({
        "errorType": error_type,
        "errorMessage": crate::secret::scrub(message),
    });
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(_) => return,
    };
    if let Err(e) = client
        .post(url)
        .header("Lambda-Runtime-Function-Error-Type", "Runtime.InitError")
        .json(&body)
        .send()
        .await
    {
        tracing::warn!(error = %e, "could not report the init error to the Runtime API");
    }
}

/// Without the `lambda` feature: a clear error.
#[cfg(not(feature = "lambda"))]
pub(crate) async fn run(_args: LambdaArgs) -> ExitCode {
    super::terminal::error(
        "lambda",
        &"Lambda mode is not in this build (it was built without the `lambda` cargo feature); rebuild with default features, e.g. `cargo build --release`, or use the Docker image",
    );
    exit(USAGE)
}

/// [`selected`] for the process environment.
pub(crate) fn selected_by_env() -> bool {
    selected(std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    }))
}

/// True when the environment asks for Lambda mode: `AWS_LAMBDA_RUNTIME_API` is set and no
/// `RUNPOD_*` variable is (a RunPod worker that happens to carry the variable stays one).
pub(crate) fn selected(vars: impl IntoIterator<Item = (String, String)>) -> bool {
    let mut lambda = false;
    for (name, value) in vars {
        if value.trim().is_empty() {
            continue;
        }
        if name.starts_with("RUNPOD_") {
            return false;
        }
        if name == "AWS_LAMBDA_RUNTIME_API" {
            lambda = true;
        }
    }
    lambda
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_needs_the_runtime_api_and_no_runpod_variable() {
        let v = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(selected(v(&[("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")])));
        assert!(!selected(v(&[("AWS_LAMBDA_RUNTIME_API", " ")])));
        assert!(!selected(v(&[])));
        assert!(!selected(v(&[
            ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
            ("RUNPOD_ENDPOINT_ID", "e")
        ])));
        assert!(selected(v(&[
            ("RUNPOD_ENDPOINT_ID", ""),
            ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001")
        ])));
    }
}
