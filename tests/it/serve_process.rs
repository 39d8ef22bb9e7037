//! The real binary as `comfy-worker serve`, for tests that need the process itself (signals,
//! exit codes, everything it prints): started on port 0, its address read from its stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cli::bin;
use crate::harness::LIMIT;

/// A `serve` process; killed when dropped. Its stderr and stdout go to files.
pub struct ServeProcess {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    out: PathBuf,
    addr: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Starts `comfy-worker serve --port 0 <args>` with `env` added; does not wait.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let out = dir.path().join("serve.out");
        let mut cmd = Command::new(bin());
        crate::harness::clear_worker_env(&mut cmd)
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .current_dir(dir.path())
            .env("COMFY_PID_FILE", dir.path().join("no.pid"))
            .env("COMFY_API_AVAILABLE_INTERVAL_MS", "10")
            .env("RUST_LOG", "comfy_worker=debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start comfy-worker serve");
        ServeProcess {
            pid: child.id(),
            child: Some(child),
            log,
            out,
            addr: None,
            _dir: dir,
        }
    }

    /// Starts it and waits until it names its address.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        let mut p = ServeProcess::spawn(args, env);
        let found = async {
            loop {
                let log = p.log();
                // Only a whole line: the file may be read while the line is being written.
                if let Some((line, _)) = log
                    .split("local endpoint on http://")
                    .nth(1)
                    .and_then(|rest| rest.split_once('\n'))
                {
                    let addr = line.split_whitespace().next().unwrap_or_default();
                    return addr.parse::<SocketAddr>().expect("an address");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        match tokio::time::timeout(LIMIT, found).await {
            Ok(addr) => p.addr = Some(addr),
            Err(_) => panic!("serve never named its address:\n{}", p.log()),
        }
        p
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr.expect("started"))
    }

    /// What it logged on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What it wrote on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits for the process to exit on its own.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(LIMIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("serve did not exit")
            .unwrap()
            .unwrap()
    }

    /// Waits (within [`LIMIT`]) until the log contains `text`.
    pub async fn wait_log(&self, text: &str) {
        let found = async {
            while !self.log().contains(text) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(LIMIT, found).await.is_err() {
            panic!("serve never logged {text:?}:\n{}", self.log());
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- serve log ---\n{}", self.log());
        }
    }
}
