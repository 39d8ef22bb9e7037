//! `docker/start.sh` outside Docker: it starts "ComfyUI" (here the simulator) in the background,
//! writes its PID file, and execs the worker, which waits for ComfyUI and runs test_input.json.

use std::path::Path;
use std::process::{Command, Output};

use crate::cli::{bin, job_dir};

struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start(dir: &Path, comfy_cmd: &str, port: u16) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    Command::new("bash")
        .arg(script)
        .arg("--quiet")
        .current_dir(dir)
        .env("COMFYUI_START_CMD", comfy_cmd)
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", dir.join("comfyui.pid"))
        .env("COMFY_HOST", format!("127.0.0.1:{port}"))
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "20")
        .env("COMFY_API_AVAILABLE_MAX_RETRIES", "200")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .expect("run start.sh")
}

#[test]
fn start_script_launches_comfyui_and_runs_the_test_job() {
    let dir = job_dir();
    let port = free_port();
    let _guard = KillOnDrop(dir.path().join("comfyui.pid"));
    let out = start(
        dir.path(),
        // Its output goes to a file: an inherited stdout would keep the pipe open after the worker exits.
        &format!(
            "{} simulate-comfyui --port {port} --step-ms 1 >{} 2>&1",
            bin(),
            dir.path().join("comfyui.log").display()
        ),
        port,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pid: u32 = std::fs::read_to_string(dir.path().join("comfyui.pid"))
        .unwrap()
        .trim()
        .parse()
        .expect("a PID in the PID file");
    assert!(pid > 0);
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        output["images"].as_array().map(Vec::len),
        Some(1),
        "{output}"
    );
}

#[test]
fn a_comfyui_that_dies_at_start_fails_the_job_at_once() {
    let dir = job_dir();
    let port = free_port();
    // Nothing listens on the port: without the PID check the worker would give up only after
    // its retries, with a different message.
    let out = start(dir.path(), "bash -c 'exit 3'", port);
    assert_eq!(out.status.code(), Some(1));
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let err = output["error"].as_str().unwrap();
    assert!(err.contains("the ComfyUI process (pid"), "{err}");
    assert!(err.contains("has exited"), "{err}");
}
