//! A child process of a benchmark (the worker, a `simulate-comfyui`), killed and reaped when
//! dropped, so a panicking run leaves nothing behind; and the worker's command line.

use std::process::{Child, Command, Stdio};

/// The process; killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `comfy-worker worker` for the fake platform whose variables are `platform_env`, on the
/// ComfyUI(s) at `comfy_host`: quiet, with a heartbeat too rare to matter. The caller adds its
/// own variables (`PIPELINE`, `COMFY_PID_FILE`) and spawns it.
pub fn worker(platform_env: Vec<(String, String)>, comfy_host: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_comfy-worker"));
    command
        .arg("worker")
        .envs(platform_env)
        .env("RUNPOD_PING_INTERVAL", "60000")
        .env("COMFY_HOST", comfy_host)
        .env("RUST_LOG", "error")
        .env_remove("RUNPOD_ENDPOINT_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}
