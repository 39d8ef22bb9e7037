//! The command line: `run` (one job, live progress), `worker`, `serve` (the local endpoint),
//! `lambda` (AWS Lambda's Runtime API), `simulate-comfyui` (with the `simulator` feature),
//! `convert` (UI-format workflow to API format), `watch` (ComfyUI's events, readable), and the
//! default mode.

mod convert;
mod health;
mod json_file;
mod lambda;
mod run;
mod serve;
mod sim;
mod view;
mod watch;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use serve::ServeArgs;
pub use sim::SimulateArgs;
pub use watch::WatchArgs;

/// A serverless worker for ComfyUI with live progress.
#[derive(Debug, Parser)]
#[command(
    name = "comfy-worker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: the RunPod job loop when RUNPOD_WEBHOOK_GET_JOB is set, the Lambda
    /// loop when AWS_LAMBDA_RUNTIME_API is set and no RUNPOD_* variable is, otherwise run
    /// ./test_input.json (or --test_input) once, like the RunPod SDK.
    #[command(flatten)]
    run: RunArgs,
    /// The RunPod SDK's spellings for the local API server.
    #[command(flatten)]
    sdk_serve: SdkServeArgs,
}

/// `--rp_serve_api [--rp_api_host HOST] [--rp_api_port PORT]`, as the RunPod SDK spells them.
#[derive(Debug, Clone, Args)]
struct SdkServeArgs {
    /// Start the local endpoint (same as `serve`), like the RunPod SDK's flag.
    #[arg(long = "rp_serve_api")]
    rp_serve_api: bool,
    /// Address for --rp_serve_api [default: 127.0.0.1].
    #[arg(long = "rp_api_host", value_name = "HOST", requires = "rp_serve_api")]
    rp_api_host: Option<String>,
    /// Port for --rp_serve_api [default: 8000].
    #[arg(long = "rp_api_port", value_name = "PORT", requires = "rp_serve_api")]
    rp_api_port: Option<u16>,
    /// With --rp_serve_api: listen beyond loopback without an API key (as `serve --insecure`).
    #[arg(long, requires = "rp_serve_api")]
    insecure: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one job from a test-input file and print its output JSON on stdout.
    Run(RunArgs),
    /// Take jobs from the RunPod platform (needs RUNPOD_WEBHOOK_GET_JOB and friends).
    Worker,
    /// Serve a local endpoint that behaves like a RunPod cloud endpoint (/run, /runsync, /status,
    /// /stream, /cancel, /health, live progress on /events/{id}).
    Serve(ServeArgs),
    /// Take invocations from AWS Lambda's Runtime API (needs AWS_LAMBDA_RUNTIME_API and the
    /// function variables Lambda sets; LAMBDA_RESPONSE_MODE=buffered|streaming).
    Lambda,
    /// Check ComfyUI: version, devices and VRAM, queue length (exit 0 when reachable, 1 when not).
    Health(health::HealthArgs),
    /// Serve a simulated ComfyUI (real protocol, fake images) for trying the worker without a GPU.
    #[cfg(feature = "simulator")]
    #[command(name = "simulate-comfyui")]
    SimulateComfyui(sim::SimArgs),
    /// Convert a workflow saved with the UI's plain "Save" to API format and print it.
    Convert(convert::ConvertArgs),
    /// Print ComfyUI's WebSocket events readably, one line each (broadcasts only, or a prompt of
    /// your own with --submit).
    Watch(WatchArgs),
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Test-input file, shaped `{"input": {...}}` [default: ./test_input.json].
    pub file: Option<PathBuf>,
    /// The test input as a JSON string instead of a file (RunPod SDK flag).
    #[arg(long = "test_input", visible_alias = "test-input", value_name = "JSON")]
    pub test_input: Option<String>,
    /// `--simulate`, `--sim-step-ms` (none without the `simulator` feature).
    #[command(flatten)]
    pub sim: SimulateArgs,
    /// Progress as one JSON object per line on stderr.
    #[arg(long, conflicts_with = "quiet")]
    pub json_progress: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    /// Also write the decoded output files into this directory.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// ComfyUI address (overrides COMFY_HOST).
    #[arg(long, value_name = "HOST:PORT")]
    pub comfy_host: Option<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    crate::telemetry::install_panic_hook();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("comfy-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Some(Command::Run(args)) => run::run(args).await,
            Some(Command::Worker) => match runpod_settings() {
                Ok(Some(settings)) => worker::run(settings).await,
                Ok(None) => {
                    eprintln!("comfy-worker worker: RUNPOD_WEBHOOK_GET_JOB is not set; it is the platform's job-take URL");
                    ExitCode::FAILURE
                }
                Err(code) => code,
            },
            Some(Command::Serve(args)) => serve::run(args).await,
            Some(Command::Lambda) => lambda::run().await,
            Some(Command::Health(args)) => health::run(args).await,
            #[cfg(feature = "simulator")]
            Some(Command::SimulateComfyui(args)) => sim::serve(args).await,
            Some(Command::Convert(args)) => convert::run(args).await,
            Some(Command::Watch(args)) => watch::run(args).await,
            None if cli.sdk_serve.rp_serve_api => {
                let mut args = ServeArgs::sdk_defaults(
                    cli.sdk_serve.rp_api_host,
                    cli.sdk_serve.rp_api_port,
                    cli.sdk_serve.insecure,
                );
                args.sim = cli.run.sim;
                args.comfy_host = cli.run.comfy_host;
                serve::run(args).await
            }
            // Like the SDK: the platform's variables select the job loop; without them, a local test run.
            // `--test_input` always means a local run.
            None if cli.run.test_input.is_none() => match runpod_settings() {
                Ok(Some(settings)) => worker::run(settings).await,
                Ok(None) if lambda::selected_by_env() => lambda::run().await,
                Ok(None) => run::run(cli.run).await,
                Err(code) => code,
            },
            None => run::run(cli.run).await,
        }
    })
}

/// The RunPod settings (None in local mode); logs are set up here, as JSON on the platform.
fn runpod_settings() -> Result<Option<crate::platform::runpod::RunPodSettings>, ExitCode> {
    match crate::platform::runpod::RunPodSettings::from_env() {
        Ok(Some(s)) => {
            crate::telemetry::init("comfy_worker=info", crate::telemetry::json_requested());
            Ok(Some(s))
        }
        Ok(None) => Ok(None),
        Err(e) => {
            eprintln!("comfy-worker: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Resolves on Ctrl+C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sdk_style_and_subcommands() {
        let cli = Cli::try_parse_from(["comfy-worker", "--test_input", "{}"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.test_input.as_deref(), Some("{}"));
        let cli =
            Cli::try_parse_from(["comfy-worker", "run", "x.json", "--json-progress"]).unwrap();
        match cli.command {
            Some(Command::Run(a)) => {
                assert_eq!(a.file, Some(PathBuf::from("x.json")));
                assert!(a.json_progress);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["comfy-worker", "lambda"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Lambda)));
        assert!(
            Cli::try_parse_from(["comfy-worker", "run", "--quiet", "--json-progress"]).is_err()
        );
        let cli =
            Cli::try_parse_from(["comfy-worker", "health", "--comfy", "h:1", "--json"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Health(ref h)) if h.json && h.comfy.as_deref() == Some("h:1"))
        );
    }

    #[test]
    fn convert_takes_a_file_and_one_source_of_object_info() {
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "convert",
            "-",
            "--object-info",
            "info.json",
            "--seed",
            "4",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Convert(a)) => {
                assert_eq!(a.file, PathBuf::from("-"));
                assert_eq!(a.object_info, Some(PathBuf::from("info.json")));
                assert_eq!((a.comfy, a.seed), (None, Some(4)));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from([
            "comfy-worker",
            "convert",
            "w.json",
            "--comfy",
            "h:1",
            "--object-info",
            "i.json"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["comfy-worker", "convert"]).is_err());
    }

    #[test]
    fn parses_watch() {
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "watch",
            "--comfy",
            "10.0.0.2:8188",
            "--json",
            "--submit",
            "wf.json",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Watch(a)) => {
                assert_eq!(a.comfy.as_deref(), Some("10.0.0.2:8188"));
                assert!(a.json);
                assert_eq!(a.submit, Some(PathBuf::from("wf.json")));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["comfy-worker", "watch", "--comfy-host", "h:1"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Watch(ref a)) if a.comfy.as_deref() == Some("h:1") && a.submit.is_none())
        );
    }

    #[test]
    fn serve_flags_insecure_and_no_key_in_debug() {
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "serve",
            "--host",
            "0.0.0.0",
            "--insecure",
            "--api-key",
            "debug-hidden-key",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(!shown.contains("debug-hidden-key"), "{shown}");
        assert!(matches!(cli.command, Some(Command::Serve(ref a)) if a.insecure));
        let cli = Cli::try_parse_from(["comfy-worker", "--rp_serve_api", "--insecure"]).unwrap();
        assert!(cli.sdk_serve.insecure);
        assert!(Cli::try_parse_from(["comfy-worker", "--insecure"]).is_err());
    }

    #[test]
    fn parses_serve_and_the_sdk_flags() {
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "serve",
            "--port",
            "9000",
            "--api-key",
            "k",
            "--job-ttl-s",
            "5",
            "--max-jobs",
            "3",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Serve(a)) => {
                assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 9000));
                assert_eq!(a.api_key.as_deref(), Some("k"));
                assert_eq!((a.job_ttl_s, a.max_jobs), (5, 3));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["comfy-worker", "serve", "--max-jobs", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "--rp_serve_api",
            "--rp_api_host",
            "0.0.0.0",
            "--rp_api_port",
            "9001",
        ])
        .unwrap();
        assert!(cli.command.is_none() && cli.sdk_serve.rp_serve_api);
        assert_eq!(cli.sdk_serve.rp_api_host.as_deref(), Some("0.0.0.0"));
        assert_eq!(cli.sdk_serve.rp_api_port, Some(9001));
        assert!(
            Cli::try_parse_from(["comfy-worker", "--rp_api_port", "9001"]).is_err(),
            "the address flags need --rp_serve_api"
        );
    }
}
