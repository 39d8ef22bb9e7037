//! The several-ComfyUIs benchmark: `scripts/bench instances` (= `cargo bench --bench instances`).
//!
//! The real `comfy-worker` binary in the RunPod loop runs the same step-bound jobs (the time is
//! ComfyUI's sampler steps, as on a GPU) against one `simulate-comfyui` process, then against
//! two (`COMFY_HOST=a,b`, as `COMFY_INSTANCES=2` in the start script sets it), all jobs pushed
//! at once to the fake RunPod platform. The figure is jobs per second from the first push to the
//! last result; the goal is at least 1.8 times as many with two ComfyUIs as with one.

#[allow(dead_code)]
#[path = "../tests/it/fake_platform.rs"]
mod fake_platform;
#[path = "common/process.rs"]
mod process;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use fake_platform::{FakePlatform, PlatformOptions};
use process::Process;

const BIN: &str = env!("CARGO_BIN_EXE_comfy-worker");

/// Jobs per run.
const JOBS: usize = 24;
/// Sampler steps per job, and each simulator's time per step.
const STEPS: u64 = 20;
const STEP_MS: u64 = 15;

/// A `simulate-comfyui` process on a free port, once it accepts connections.
async fn simulator() -> (Process, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let process = Process(
        Command::new(BIN)
            .args(["simulate-comfyui", "--port", &port.to_string()])
            .args(["--step-ms", &STEP_MS.to_string()])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start simulate-comfyui"),
    );
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "simulate-comfyui did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (process, port)
}

fn workflow(colour: u64) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": STEPS, "seconds_per_step": 0.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": format!("inst{colour}")}}
    }})
}

/// How many prompts a simulator process ran (`GET /history`).
async fn prompts_run(port: u16) -> usize {
    let history: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/history"))
        .send()
        .await
        .expect("GET /history")
        .json()
        .await
        .expect("history JSON");
    history.as_object().map_or(0, |h| h.len())
}

/// One run over `instances` simulators: jobs per second, and the prompts each ComfyUI ran.
async fn run(instances: usize) -> (f64, Vec<usize>) {
    let mut sims = Vec::new();
    for _ in 0..instances {
        sims.push(simulator().await);
    }
    let hosts: Vec<String> = sims
        .iter()
        .map(|(_, port)| format!("127.0.0.1:{port}"))
        .collect();
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = Process(
        process::worker(platform.env(), &hosts.join(","))
            .env_remove("COMFY_PID_FILE")
            .spawn()
            .expect("start the worker"),
    );
    platform.wait_takes(1).await;
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{instances}-{i}")).collect();
    let t = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        platform.push_job(id, workflow(0x20_0000 + (instances * 1000 + i) as u64));
    }
    for id in &ids {
        let result = platform.wait_final(id).await;
        assert!(result.get("error").is_none(), "{id}: {result}");
    }
    let took = t.elapsed();
    let mut per = Vec::new();
    for (_, port) in &sims {
        per.push(prompts_run(*port).await);
    }
    assert_eq!(per.iter().sum::<usize>(), JOBS, "every job ran once");
    (JOBS as f64 / took.as_secs_f64(), per)
}

#[tokio::main]
async fn main() {
    println!(
        "comfy-worker several-ComfyUIs benchmark: {JOBS} jobs ({STEPS} steps × {STEP_MS} ms) through the RunPod loop, one simulate-comfyui process per ComfyUI"
    );
    println!(
        "| {:<10} | {:>10} | {:>8} | {:<16} |",
        "ComfyUIs", "jobs/s", "speed-up", "jobs per ComfyUI"
    );
    println!("|{:-<12}|{:-<12}|{:-<10}|{:-<18}|", "", "", "", "");
    let (one, per_one) = run(1).await;
    println!(
        "| {:<10} | {:>10.2} | {:>7.2}× | {:<16} |",
        1,
        one,
        1.0,
        format!("{per_one:?}")
    );
    let (two, per_two) = run(2).await;
    println!(
        "| {:<10} | {:>10.2} | {:>7.2}× | {:<16} |",
        2,
        two,
        two / one,
        format!("{per_two:?}")
    );
    println!(
        "goal: at least 1.8× with two ComfyUIs: {}",
        if two / one >= 1.8 { "met" } else { "NOT met" }
    );
}
