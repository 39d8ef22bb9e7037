//! The Comfy API v2 comparison (`scripts/bench v2`): the same 20-step workflow through Comfy's
//! own proxy (comfy-api-proxy, from PyPI) and through comfy-worker's `serve`, both in front of one
//! `comfy-worker simulate-comfyui`, driven by Comfy's Python SDK, alternately, ten times each,
//! in one run. Reported for each server:
//!
//! * the sampler steps the SDK's `job.events()` yielded (of 20);
//! * the time from ComfyUI's own `execution_success` (the simulator logs each one with its
//!   wall-clock stamp) to the SDK yielding the terminal status, p50 and max;
//! * the server process's peak RSS (`VmHWM`).
//!
//! Needs `target/test-deps/venv` with comfy-sdk and comfy-api-proxy (scripts/bench installs the
//! pinned versions, as scripts/test does).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-worker");
const RUNS: usize = 10;
const STEPS: u64 = 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A process killed when dropped.
struct Proc(Child, &'static str);

impl Proc {
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits (at most 60 s) until `url` answers 200.
fn wait_ready(url: &str, what: &str, proc: &mut Proc) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!("{what} exited: {status}");
        }
        let ok = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false);
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} never answered {url}");
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let venv = root().join("target/test-deps/venv/bin");
    let python = venv.join("python");
    let proxy_bin = venv.join("comfy-api-proxy");
    assert!(
        python.exists() && proxy_bin.exists(),
        "run scripts/bench, which installs comfy-sdk and comfy-api-proxy into {}",
        venv.display()
    );
    let dir = std::env::temp_dir().join(format!("comfy-worker-v2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let step_ms = std::env::var("BENCH_STEP_MS").unwrap_or_else(|_| "50".into());

    let sim_port = free_port();
    let sim_log = dir.join("simulator.log");
    let mut sim = Proc(
        Command::new(BIN)
            .args([
                "simulate-comfyui",
                "--port",
                &sim_port.to_string(),
                "--step-ms",
                &step_ms,
            ])
            .env("RUST_LOG", "comfy_sim=info")
            .env_remove("RUNPOD_ENDPOINT_ID")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).unwrap())
            .spawn()
            .expect("start the simulator"),
        "simulator",
    );
    let comfy = format!("http://127.0.0.1:{sim_port}");
    wait_ready(&format!("{comfy}/system_stats"), "the simulator", &mut sim);

    let proxy_port = free_port();
    let mut proxy = Proc(
        Command::new(&proxy_bin)
            .args(["--comfyui", &comfy, "--port", &proxy_port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
            .spawn()
            .expect("start comfy-api-proxy"),
        "comfy-api-proxy",
    );
    let worker_port = free_port();
    let mut worker = Proc(
        Command::new(BIN)
            .args([
                "serve",
                "--port",
                &worker_port.to_string(),
                "--comfy-host",
                &format!("127.0.0.1:{sim_port}"),
            ])
            .env("RUST_LOG", "warn")
            .env("COMFY_PID_FILE", "/nonexistent/bench.pid")
            .env_remove("RUNPOD_ENDPOINT_ID")
            .env_remove("SERVE_API_KEY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("worker.log")).unwrap())
            .spawn()
            .expect("start comfy-worker serve"),
        "comfy-worker serve",
    );
    let proxy_base = format!("http://127.0.0.1:{proxy_port}");
    let worker_base = format!("http://127.0.0.1:{worker_port}");
    wait_ready(&format!("{proxy_base}/api/v2/health"), proxy.1, &mut proxy);
    wait_ready(
        &format!("{worker_base}/api/v2/health"),
        worker.1,
        &mut worker,
    );

    let input: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("test_input.json")).unwrap())
            .unwrap();
    let mut workflow = input["input"]["workflow"].clone();
    workflow["3"]["inputs"]["steps"] = STEPS.into();
    let workflow_path = dir.join("workflow.json");
    std::fs::write(&workflow_path, workflow.to_string()).unwrap();

    let out = Command::new(&python)
        .arg(root().join("tests/fixtures/v2/bench_driver.py"))
        .arg(&workflow_path)
        .arg(format!("comfy-api-proxy={proxy_base}"))
        .arg(format!("comfy-worker={worker_base}"))
        .args(["--runs", &RUNS.to_string()])
        .output()
        .expect("run the SDK driver");
    assert!(
        out.status.success(),
        "the SDK driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let rss_proxy = proxy.peak_rss();
    let rss_worker = worker.peak_rss();
    drop(worker);
    drop(proxy);
    drop(sim);
    let stamps = success_stamps(&sim_log);
    assert_eq!(
        stamps.len(),
        runs.len(),
        "one execution_success per run (see {})",
        sim_log.display()
    );
    let mut steps: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut latency: HashMap<&str, Vec<f64>> = HashMap::new();
    for (run, stamp_us) in runs.iter().zip(&stamps) {
        let server = run["server"].as_str().unwrap_or("?");
        assert_eq!(run["status"], "succeeded", "{run}");
        steps
            .entry(server)
            .or_default()
            .push(run["steps"].as_u64().unwrap_or(0));
        let terminal_ms = run["terminal_unix"].as_f64().unwrap_or(0.0) * 1000.0;
        latency
            .entry(server)
            .or_default()
            .push(terminal_ms - *stamp_us as f64 / 1000.0);
    }
    println!(
        "Comfy API v2: one {STEPS}-step workflow, {RUNS} runs per server, alternating, {step_ms} ms per step, one `comfy-worker simulate-comfyui`, Comfy's Python SDK as the client\n"
    );
    println!("| server | steps seen by job.events() (min / max of {STEPS}) | execution_success → SDK sees terminal status, p50 | max | peak RSS |");
    println!("|---|---|---|---|---|");
    for (name, rss) in [("comfy-api-proxy", rss_proxy), ("comfy-worker", rss_worker)] {
        let s = &steps[name];
        let l = &latency[name];
        println!(
            "| {name} | {} / {} | {:.1} ms | {:.1} ms | {:.1} MB |",
            s.iter().min().unwrap_or(&0),
            s.iter().max().unwrap_or(&0),
            percentile(l, 0.5),
            l.iter().copied().fold(f64::MIN, f64::max),
            rss as f64 / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The simulator's `execution_success sent ... unix_us=N` lines, in order (µs since the epoch).
fn success_stamps(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("execution_success sent"))
        .filter_map(|l| {
            l.split("unix_us=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .collect()
}
