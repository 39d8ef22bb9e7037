//! The real binary in serverless mode, shared by the serverless and webhook tests: the worker
//! process, the simulator it runs jobs on, and the job inputs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use comfy_sim::{Profile, SimConfig, Simulator};
use serde_json::{json, Value};

use crate::cli::bin;
use crate::fake_platform::FakePlatform;
use crate::harness::{self, LIMIT};

/// The worker process; killed when dropped. Its stderr and stdout go to files kept for
/// inspection.
pub struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
    out: PathBuf,
    pid: u32,
    _dir: tempfile::TempDir,
}

impl WorkerProcess {
    /// Starts `comfy-worker worker` against `platform` and `sim`, with test timings; `extra`
    /// adds or overrides variables.
    pub fn start(
        platform: &FakePlatform,
        sim: &Simulator,
        extra: &[(&str, &str)],
    ) -> WorkerProcess {
        let host = sim.host();
        let env: Vec<(&str, &str)> = [("COMFY_HOST", host.as_str())]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        WorkerProcess::start_with_host(platform, &env)
    }

    /// [`WorkerProcess::start`] for a ComfyUI that is not an in-process simulator: `extra`
    /// names it (`COMFY_HOST`).
    pub fn start_with_host(platform: &FakePlatform, extra: &[(&str, &str)]) -> WorkerProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let out = dir.path().join("worker.out");
        let mut cmd = Command::new(bin());
        crate::harness::clear_worker_env(&mut cmd)
            .arg("worker")
            .current_dir(dir.path())
            .envs(platform.env())
            .env("COMFY_PID_FILE", dir.path().join("no.pid"))
            .env("COMFY_API_AVAILABLE_INTERVAL_MS", "10")
            .env("WEBSOCKET_RECONNECT_DELAY_S", "0.02")
            .env("COMFY_WS_SILENCE_S", "1")
            .env("COMFY_HISTORY_POLL_INTERVAL_MS", "50")
            .env("RUNPOD_RESULT_RETRY_DELAY_MS", "20")
            .env("RUST_LOG", "comfy_worker=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the worker");
        WorkerProcess {
            pid: child.id(),
            child: Some(child),
            log,
            out,
            _dir: dir,
        }
    }

    /// What the worker wrote on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Sends SIGTERM, as the platform does to stop a worker.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits (within [`LIMIT`]) until the log contains `text`.
    pub async fn wait_log(&self, text: &str) {
        let found = async {
            while !self.log().contains(text) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(LIMIT, found).await.is_err() {
            panic!("the worker never logged {text:?}:\n{}", self.log());
        }
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the process to exit on its own.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(LIMIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("the worker did not exit")
            .unwrap()
            .unwrap()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- worker log ---\n{}", self.log());
        }
    }
}

/// The ComfyUI simulator on `127.0.0.1:0`, `step_ms` per sampler step.
pub async fn simulator(step_ms: u64) -> Simulator {
    simulator_as(step_ms, Profile::V0_3_64).await
}

/// [`simulator`] playing the ComfyUI of `profile`.
pub async fn simulator_as(step_ms: u64, profile: Profile) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(step_ms),
            profile,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

/// `ok.json` (EmptyImage → SlowSteps → two SaveImage) with its own colour, so no run is cached.
pub fn job_input(colour: u64, steps: u64) -> Value {
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["color"] = json!(colour);
    wf["2"]["inputs"]["steps"] = json!(steps);
    json!({ "workflow": wf })
}

/// The job's accepted result, within [`LIMIT`].
pub async fn final_of(platform: &FakePlatform, id: &str) -> Value {
    tokio::time::timeout(LIMIT, platform.wait_final(id))
        .await
        .unwrap_or_else(|_| panic!("no result for {id}; status {}", platform.status(id)))
}
