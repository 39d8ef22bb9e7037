//! Progress and result latency of the serverless mode, end to end on loopback:
//! the ComfyUI simulator → the worker (in-process, the real engine and RunPod adapter) → the fake
//! RunPod platform used by the integration tests.
//!
//! `cargo bench --bench relay` prints one table:
//! * step latency: the simulator sending a sampler step's `progress` message → the platform
//!   receiving the progress post that carries that step;
//! * result latency: the simulator sending `executing{node: null}` (ComfyUI done) → the platform
//!   receiving the final post, for a job with 4 × ~2 MB PNG outputs (fetch, base64, post).

#[allow(dead_code)]
#[path = "../tests/it/fake_platform.rs"]
mod fake_platform;

use std::collections::HashMap;
use std::time::Duration;

use comfy_worker::config::Settings;
use comfy_worker::job::Engine;
use comfy_worker::platform::runpod::{PlatformClient, RunPodSettings, Worker};
use comfy_worker::simulator::{SimConfig, Simulator};
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use fake_platform::{FakePlatform, PlatformOptions, PostKind};

const STEP_JOBS: usize = 8;
const STEPS: u64 = 50;
const BIG_JOBS: usize = 8;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn row(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "| {name:<52} | {:>5} | {:>8.2} | {:>8.2} | {:>8.2} |",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    )
}

async fn start(sim_config: SimConfig) -> (Simulator, FakePlatform, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(listener, sim_config).await.unwrap();
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let env: HashMap<String, String> = platform.env().into_iter().collect();
    let runpod = RunPodSettings::from_lookup(|k| env.get(k).cloned())
        .unwrap()
        .expect("platform env");
    let settings = Settings {
        comfy_host: sim.host(),
        comfy_pid_file: "/nonexistent/bench.pid".into(),
        ..Settings::default()
    };
    let worker = Worker::new(
        Engine::new(settings).unwrap(),
        PlatformClient::new(runpod).unwrap(),
        Webhooks::new(WebhookPolicy::default()),
    );
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { worker.run(token).await });
    (sim, platform, stop)
}

fn workflow(colour: u64, steps: u64, size: u64, batch: u64) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": batch, "color": colour}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": 0.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": format!("bench{colour}")}}
    }})
}

async fn step_latency() -> Vec<f64> {
    let (sim, platform, stop) = start(SimConfig {
        step_delay: Duration::from_millis(20),
        ..SimConfig::default()
    })
    .await;
    for j in 0..STEP_JOBS {
        let id = format!("steps-{j}");
        platform.push_job(&id, workflow(j as u64 + 1, STEPS, 64, 1));
        platform.wait_final(&id).await;
    }
    stop.cancel();
    let mut latencies = Vec::new();
    for j in 0..STEP_JOBS {
        let posts = platform.posts(&format!("steps-{j}"));
        for mark in sim.step_marks() {
            let received = posts.iter().find(|p| {
                p.kind == PostKind::Progress
                    && p.body["output"]["type"] == "progress"
                    && p.body["output"]["prompt_id"] == mark.prompt_id.as_str()
                    && p.body["output"]["value"] == mark.step
            });
            if let Some(post) = received {
                let ms = post.at.saturating_duration_since(mark.at).as_secs_f64() * 1000.0;
                if std::env::var_os("BENCH_DEBUG").is_some() && ms > 5.0 {
                    eprintln!("slow step {} of {}: {ms:.1} ms", mark.step, mark.prompt_id);
                }
                latencies.push(ms);
            } else if std::env::var_os("BENCH_DEBUG").is_some()
                && posts
                    .iter()
                    .any(|p| p.body["output"]["prompt_id"] == mark.prompt_id.as_str())
            {
                eprintln!("missing step {} of {}", mark.step, mark.prompt_id);
            }
        }
    }
    latencies
}

async fn result_latency() -> (Vec<f64>, usize) {
    let (sim, platform, stop) = start(SimConfig {
        step_delay: Duration::from_millis(1),
        noise_images: true,
    })
    .await;
    let mut bytes = 0;
    for j in 0..BIG_JOBS {
        let id = format!("big-{j}");
        // 700 × 700 RGB noise: a ~2 MB PNG each (the fast deflate does not shrink noise), four per job.
        platform.push_job(&id, workflow(j as u64 + 100, 2, 700, 4));
        let body = platform.wait_final(&id).await;
        let images = body["output"]["images"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(images.len(), 4, "{}", body);
        bytes = images
            .iter()
            .map(|i| i["data"].as_str().unwrap().len() * 3 / 4)
            .sum();
    }
    stop.cancel();
    let completions: HashMap<String, std::time::Instant> = sim.completions().into_iter().collect();
    let mut latencies = Vec::new();
    for j in 0..BIG_JOBS {
        let posts = platform.posts(&format!("big-{j}"));
        let Some(fin) = posts
            .iter()
            .find(|p| p.kind == PostKind::Final && p.accepted)
        else {
            continue;
        };
        let Some(prompt_id) = posts
            .iter()
            .find_map(|p| p.body["output"]["prompt_id"].as_str().map(str::to_owned))
        else {
            continue;
        };
        if let Some(done) = completions.get(&prompt_id) {
            latencies.push(fin.at.saturating_duration_since(*done).as_secs_f64() * 1000.0);
        }
    }
    (latencies, bytes)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let steps = step_latency().await;
        let (results, bytes) = result_latency().await;
        println!("comfy-worker relay benchmark (loopback; simulator → worker → fake platform)");
        println!(
            "{} jobs × {STEPS} steps sent (n = steps whose progress post arrived), then {BIG_JOBS} jobs with 4 PNG outputs",
            STEP_JOBS
        );
        println!(
            "| {:<52} | {:>5} | {:>8} | {:>8} | {:>8} |",
            "latency (ms)", "n", "median", "p99", "max"
        );
        println!(
            "|{:-<54}|{:-<7}|{:-<10}|{:-<10}|{:-<10}|",
            "", "", "", "", ""
        );
        println!(
            "{}",
            row("sampler step sent → progress post received", steps)
        );
        println!(
            "{}",
            row(
                &format!(
                    "ComfyUI done → final post received (4 PNGs, {:.1} MB)",
                    bytes as f64 / 1e6
                ),
                results
            )
        );
    });
}
