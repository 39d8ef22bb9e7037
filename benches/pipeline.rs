//! The pipelining benchmark: `scripts/bench pipeline` (= `cargo bench --bench pipeline`).
//!
//! 50 short jobs pushed at once to the fake RunPod platform, run back to back by the real
//! `comfy-worker` binary against the ComfyUI simulator, once with `PIPELINE=on` (the default)
//! and once with `PIPELINE=off`. The figure is ComfyUI's idle gap between two jobs, from the
//! simulator's own stamps: one prompt's `execution_success` to the next one's
//! `execution_start` (wall-clock microseconds). The goal is a median of at most 3 ms with
//! pipelining.

#[allow(dead_code)]
#[path = "../tests/it/fake_platform.rs"]
mod fake_platform;
#[path = "common/process.rs"]
mod process;

use std::time::{Duration, Instant};

use comfy_sim::{SimConfig, Simulator};
use serde_json::{json, Value};

use fake_platform::{FakePlatform, PlatformOptions};

/// Jobs per run.
const JOBS: usize = 50;
/// Sampler steps per job, and the simulator's time per step.
const STEPS: u64 = 4;
const STEP_MS: u64 = 10;

fn workflow(colour: u64) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": STEPS, "seconds_per_step": 0.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": format!("pipe{colour}")}}
    }})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// One run: the idle gaps in ms, sorted, and the run's wall time.
async fn run(pipeline: &str) -> (Vec<f64>, Duration) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(STEP_MS),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = process::Process(
        process::worker(platform.env(), &sim.host())
            .env("PIPELINE", pipeline)
            .env("COMFY_PID_FILE", "/nonexistent/bench.pid")
            .spawn()
            .expect("start the worker"),
    );
    platform.wait_takes(1).await;
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{pipeline}-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        platform.push_job(id, workflow(0x10_0000 + i as u64));
    }
    let t = Instant::now();
    for id in &ids {
        platform.wait_final(id).await;
    }
    let took = t.elapsed();
    let marks = sim.executions();
    assert_eq!(marks.len(), JOBS, "every job ran once");
    let mut gaps: Vec<f64> = marks
        .windows(2)
        .map(|w| {
            let end = w[0].succeeded_us.expect("every job succeeded");
            w[1].started_us.saturating_sub(end) as f64 / 1000.0
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    (gaps, took)
}

#[tokio::main]
async fn main() {
    println!(
        "comfy-worker pipelining benchmark: {JOBS} jobs back to back ({STEPS} steps × {STEP_MS} ms), ComfyUI idle gap between jobs (simulator stamps)"
    );
    println!(
        "| {:<14} | {:>10} | {:>10} | {:>10} | {:>12} |",
        "PIPELINE", "gap p50", "gap p90", "gap max", "50 jobs in"
    );
    println!(
        "|{:-<16}|{:-<12}|{:-<12}|{:-<12}|{:-<14}|",
        "", "", "", "", ""
    );
    for pipeline in ["on", "off"] {
        let (gaps, took) = run(pipeline).await;
        println!(
            "| {:<14} | {:>7.2} ms | {:>7.2} ms | {:>7.2} ms | {:>10.2} s |",
            pipeline,
            percentile(&gaps, 0.5),
            percentile(&gaps, 0.9),
            percentile(&gaps, 1.0),
            took.as_secs_f64()
        );
    }
}
