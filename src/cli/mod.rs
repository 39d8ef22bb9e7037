//! The command line: `run` (one job, live progress), `worker`, `serve` (the local endpoint),
//! `lambda` (AWS Lambda's Runtime API), `simulate-comfyui` (with the `simulator` feature),
//! `convert` (UI-format workflow to API format), `watch` (ComfyUI's events, readable), and the
//! default mode.

mod comfy_arg;
mod convert;
mod exit_code;
mod health;
mod json_file;
mod lambda;
mod run;
mod serve;
mod sim;
mod terminal;
mod view;
mod watch;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use comfy_arg::ComfyArg;
pub use serve::ServeArgs;
pub use sim::SimulateArgs;
pub use watch::WatchArgs;

/// A serverless worker for ComfyUI with live progress.
#[derive(Debug, Parser)]
#[command(
    name = "comfy-worker",
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_help = exit_code::TABLE
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
    /// Run one job (a test input, or a workflow saved in API or UI format) with live progress;
    /// on a terminal its outputs go to ./outputs/<job id>/, piped (or with --json) the output
    /// JSON goes to stdout.
    #[command(after_help = exit_code::TABLE)]
    Run(RunArgs),
    /// Take jobs from the RunPod platform (needs RUNPOD_WEBHOOK_GET_JOB and friends, or
    /// --platform pointing at `serve --workers external`).
    #[command(after_help = exit_code::TABLE)]
    Worker(worker::WorkerArgs),
    /// Serve a local endpoint that behaves like a RunPod cloud endpoint (/run, /runsync, /status,
    /// /stream, /cancel, /health, live progress on /events/{id}).
    #[command(after_help = exit_code::TABLE)]
    Serve(ServeArgs),
    /// Take invocations from AWS Lambda's Runtime API (needs AWS_LAMBDA_RUNTIME_API and the
    /// function variables Lambda sets; LAMBDA_RESPONSE_MODE=buffered|streaming).
    #[command(after_help = exit_code::TABLE)]
    Lambda(lambda::LambdaArgs),
    /// Check ComfyUI: version, devices and VRAM, queue length (exit 0 when reachable, 1 when not).
    #[command(after_help = exit_code::TABLE)]
    Health(health::HealthArgs),
    /// Serve a simulated ComfyUI (real protocol, fake images) for trying the worker without a GPU.
    #[cfg(feature = "simulator")]
    #[command(name = "simulate-comfyui", after_help = exit_code::TABLE)]
    SimulateComfyui(sim::SimArgs),
    /// Convert a workflow saved with the UI's plain "Save" to API format and print it.
    #[command(after_help = exit_code::TABLE)]
    Convert(convert::ConvertArgs),
    /// Print ComfyUI's WebSocket events readably, one line each (broadcasts only, or a prompt of
    /// your own with --submit).
    #[command(after_help = exit_code::TABLE)]
    Watch(WatchArgs),
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The job: a test input `{"input": {...}}`, or a workflow saved with "Save (API Format)" or
    /// the plain "Save" [default: ./test_input.json].
    #[arg(conflicts_with = "test_input")]
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
    /// Print the job output JSON on stdout even on a terminal (what happens when stdout is piped).
    #[arg(long)]
    pub json: bool,
    /// Write the decoded output files into this directory [default on a terminal:
    /// ./outputs/<job id>/].
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
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
            terminal::error("", &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Some(Command::Run(args)) => run::run(args).await,
            Some(Command::Worker(args)) => worker::run(args).await,
            Some(Command::Serve(args)) => serve::run(args).await,
            Some(Command::Lambda(args)) => lambda::run(args).await,
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
                args.comfy = cli.run.comfy;
                serve::run(args).await
            }
            // Like the SDK: the platform's variables select the job loop; without them, a local test run.
            // A file or `--test_input` always means a local run.
            None if cli.run.test_input.is_none() && cli.run.file.is_none() => {
                if worker::selected_by_env() {
                    worker::run(worker::WorkerArgs::from_run(cli.run)).await
                } else if lambda::selected_by_env() {
                    lambda::run(lambda::LambdaArgs {
                        comfy: cli.run.comfy,
                    })
                    .await
                } else {
                    run::run(cli.run).await
                }
            }
            None => run::run(cli.run).await,
        }
    })
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
        assert!(matches!(cli.command, Some(Command::Lambda(_))));
        assert!(
            Cli::try_parse_from(["comfy-worker", "run", "--quiet", "--json-progress"]).is_err()
        );
        let cli =
            Cli::try_parse_from(["comfy-worker", "health", "--comfy", "h:1", "--json"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Health(ref h)) if h.json && h.comfy.shown().as_deref() == Some("h:1"))
        );
    }

    /// Every subcommand that talks to ComfyUI takes `--comfy` and `--comfy-host` alike, with the
    /// same help text; bad addresses are usage errors naming the flag.
    #[test]
    fn one_comfy_flag_everywhere() {
        use clap::CommandFactory;
        let mut helps = Vec::new();
        for sub in [
            "run", "worker", "serve", "lambda", "health", "watch", "convert",
        ] {
            let extra: &[&str] = if sub == "convert" { &["w.json"] } else { &[] };
            for flag in ["--comfy", "--comfy-host"] {
                let mut argv = vec!["comfy-worker", sub, flag, "10.0.0.2:8188"];
                argv.extend(extra);
                Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            }
            for bad in ["127.0.0.1:99999", "ftp://x:1", "http://", "localhost"] {
                let mut argv = vec!["comfy-worker", sub, "--comfy", bad];
                argv.extend(extra);
                let e = Cli::try_parse_from(&argv).unwrap_err();
                assert_eq!(e.exit_code(), 2, "{argv:?}");
                assert!(e.to_string().contains("--comfy <ADDR>"), "{e}");
            }
            let mut cmd = Cli::command();
            let help = cmd
                .find_subcommand_mut(sub)
                .unwrap()
                .render_help()
                .to_string();
            let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let start = flat.find("--comfy <ADDR>").expect("--comfy in help");
            let end = flat[start..]
                .find("[alias: --comfy-host]")
                .expect("alias shown");
            let line = flat[start..start + end].to_owned();
            assert!(
                line.contains("127.0.0.1:8188") && line.contains("COMFY_HOST"),
                "{sub}: {help}"
            );
            assert!(help.contains("Exit codes"), "{sub}");
            helps.push(line);
        }
        assert!(helps.windows(2).all(|w| w[0] == w[1]), "{helps:#?}");
        // The top level and the no-subcommand mode too.
        assert!(Cli::try_parse_from(["comfy-worker", "--comfy", "h:1"]).is_ok());
        assert!(
            Cli::try_parse_from(["comfy-worker", "run", "f.json", "--test_input", "{}"]).is_err()
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
                assert_eq!((a.comfy.shown(), a.seed), (None, Some(4)));
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
                assert_eq!(a.comfy.shown().as_deref(), Some("10.0.0.2:8188"));
                assert!(a.json);
                assert_eq!(a.submit, Some(PathBuf::from("wf.json")));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["comfy-worker", "watch", "--comfy-host", "h:1"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Watch(ref a)) if a.comfy.shown().as_deref() == Some("h:1") && a.submit.is_none())
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
