//! The built-in ComfyUI simulator on the command line: `simulate-comfyui`, and the `--simulate`
//! and `--sim-step-ms` options of `run` and `serve`, which start one in process. The only module
//! of the worker that knows the `comfy-sim` crate.
//!
//! Built without the `simulator` cargo feature, the subcommand does not exist, [`SimulateArgs`]
//! has no options and `SimulateArgs::start` never starts anything.

#[cfg(feature = "simulator")]
pub use with_simulator::SimulateArgs;
#[cfg(feature = "simulator")]
pub(crate) use with_simulator::{serve, SimArgs};
#[cfg(not(feature = "simulator"))]
pub use without_simulator::SimulateArgs;

#[cfg(feature = "simulator")]
mod with_simulator {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::ExitCode;
    use std::time::Duration;

    use clap::Args;
    use comfy_sim::{Profile, SimConfig, Simulator};

    use crate::config::Settings;

    /// `--simulate` and `--sim-step-ms`, options of `run` and `serve`.
    #[derive(Debug, Clone, Args)]
    pub struct SimulateArgs {
        /// Run jobs on a built-in ComfyUI simulator instead of a real ComfyUI.
        #[arg(long)]
        pub simulate: bool,
        /// Simulated time per sampler step, in milliseconds (with --simulate).
        #[arg(long, value_name = "MS", default_value_t = 50)]
        pub sim_step_ms: u64,
        /// Which ComfyUI the simulator plays: 0.3.64, or current (with --simulate).
        #[arg(long, value_name = "VERSION", default_value_t = Profile::V0_3_64)]
        pub sim_comfy_version: Profile,
    }

    impl Default for SimulateArgs {
        /// As on a command line without the options.
        fn default() -> Self {
            SimulateArgs {
                simulate: false,
                sim_step_ms: 50,
                sim_comfy_version: Profile::V0_3_64,
            }
        }
    }

    /// A simulator started for `--simulate`; shut it down when the command is done.
    pub(crate) struct Running(Simulator);

    /// Why `--simulate` could not start the simulator (no loopback port, or it failed to start).
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the simulator: {0}")]
    pub(crate) struct StartError(std::io::Error);

    impl SimulateArgs {
        /// With `--simulate`: starts a simulator on a free loopback port and points `settings`
        /// at it. The error is a sentence for the user.
        pub(crate) async fn start(
            &self,
            settings: &mut Settings,
        ) -> Result<Option<Running>, StartError> {
            if !self.simulate {
                return Ok(None);
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(StartError)?;
            let config = SimConfig {
                step_delay: Duration::from_millis(self.sim_step_ms),
                profile: self.sim_comfy_version,
                ..SimConfig::default()
            };
            let sim = Simulator::start(listener, config)
                .await
                .map_err(StartError)?;
            // A PID file of some other ComfyUI must not decide readiness here.
            settings.use_only(
                sim.host()
                    .parse()
                    .map_err(|e| StartError(std::io::Error::other(e)))?,
            );
            Ok(Some(Running(sim)))
        }
    }

    impl Running {
        pub(crate) async fn shutdown(self) {
            self.0.shutdown().await;
        }
    }

    /// Options of `simulate-comfyui`.
    #[derive(Debug, Clone, Args)]
    pub(crate) struct SimArgs {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port to listen on.
        #[arg(long, default_value_t = 8188)]
        pub(crate) port: u16,
        /// Time per sampler step, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 50)]
        step_ms: u64,
        /// Also write uploaded inputs into this directory, as ComfyUI's input folder.
        #[arg(long, value_name = "DIR")]
        input_dir: Option<PathBuf>,
        /// Also write output files into this directory, as ComfyUI's output folder.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
        /// Also write temp files (previews) into this directory.
        #[arg(long, value_name = "DIR")]
        temp_dir: Option<PathBuf>,
        /// Which ComfyUI to play: 0.3.64 (the recorded one) or current (today's, with the
        /// jobs API).
        #[arg(long, value_name = "VERSION", default_value_t = Profile::V0_3_64)]
        pub(crate) comfy_version: Profile,
    }

    /// `simulate-comfyui`: serves the simulator until Ctrl+C / SIGTERM.
    pub(crate) async fn serve(args: SimArgs) -> ExitCode {
        crate::telemetry::init(
            "comfy_worker=info,comfy_sim=info",
            crate::telemetry::json_requested(),
        );
        let addr = SocketAddr::new(args.host, args.port);
        let config = SimConfig {
            step_delay: Duration::from_millis(args.step_ms),
            input_dir: args.input_dir,
            output_dir: args.output_dir,
            temp_dir: args.temp_dir,
            profile: args.comfy_version,
            ..SimConfig::default()
        };
        eprintln!(
            "comfy-worker: simulated ComfyUI {} on http://{addr} (Ctrl+C to stop)",
            args.comfy_version
        );
        match comfy_sim::serve(addr, config, crate::cli::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("comfy-worker: simulator failed: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(not(feature = "simulator"))]
mod without_simulator {
    use clap::Args;

    use crate::config::Settings;

    /// No options: built without the `simulator` feature.
    #[derive(Debug, Clone, Default, Args)]
    pub struct SimulateArgs {}

    /// Never made: nothing is started without the `simulator` feature.
    pub(crate) enum Running {}

    impl SimulateArgs {
        /// Nothing to start: never fails.
        pub(crate) async fn start(
            &self,
            _: &mut Settings,
        ) -> Result<Option<Running>, std::convert::Infallible> {
            Ok(None)
        }
    }

    impl Running {
        pub(crate) async fn shutdown(self) {
            match self {}
        }
    }
}

#[cfg(all(test, feature = "simulator"))]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::super::{Cli, Command};

    #[test]
    fn parses_the_simulator_options() {
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "run",
            "x.json",
            "--simulate",
            "--sim-step-ms",
            "7",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Run(a)) => {
                assert_eq!(a.file, Some(PathBuf::from("x.json")));
                assert!(a.sim.simulate);
                assert_eq!(a.sim.sim_step_ms, 7);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["comfy-worker", "serve", "--simulate"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Serve(ref a)) if a.sim.simulate && a.sim.sim_step_ms == 50)
        );
        let cli = Cli::try_parse_from(["comfy-worker", "--rp_serve_api", "--simulate"]).unwrap();
        assert!(cli.sdk_serve.rp_serve_api && cli.run.sim.simulate);
        let cli =
            Cli::try_parse_from(["comfy-worker", "simulate-comfyui", "--port", "9000"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::SimulateComfyui(ref s)) if s.port == 9000 && s.comfy_version == comfy_sim::Profile::V0_3_64)
        );
        let cli = Cli::try_parse_from([
            "comfy-worker",
            "simulate-comfyui",
            "--comfy-version",
            "current",
        ])
        .unwrap();
        assert!(
            matches!(cli.command, Some(Command::SimulateComfyui(ref s)) if s.comfy_version == comfy_sim::Profile::Current)
        );
        assert!(Cli::try_parse_from([
            "comfy-worker",
            "simulate-comfyui",
            "--comfy-version",
            "0.2"
        ])
        .is_err());
    }
}
