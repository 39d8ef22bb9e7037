//! The benchmark suite: `scripts/bench` (= `cargo bench --bench suite`) prints one table.
//!
//! Every figure is measured end to end on loopback with the real `comfy-worker` binary in
//! serverless mode between the ComfyUI simulator and the fake RunPod platform of the test suite,
//! and printed beside its physical floor measured on the same machine in the same run:
//!
//! | figure | floor |
//! |---|---|
//! | cold start: process spawn → first job-take request | spawning and reaping `/bin/true` |
//! | relay latency: simulator sends a step → platform receives its progress post | one loopback HTTP round trip |
//! | completion overhead, small output: ComfyUI done → result at the platform | three round trips (history, view, result) |
//! | completion overhead, 4 × ~2 MB PNGs | moving the bytes: view download + base64 + result upload at loopback and base64 speed, plus three round trips |
//! | peak RSS above idle, 4 × ~2 MB job | the output held once raw and once as base64 (an in-memory worker; spooled outputs stay below it) |
//! | jobs per second, instant workflow | one job = 8 sequential loopback round trips (take, readiness, socket, prompt, queue, history, view, result) |
//! | bookkeeping of a 5,000-node job, in process | the target: well under a second, and linear (twice the nodes, twice the time) |
//!
//! The bookkeeping figure is the worker's own per-job work for a graph of 5,000 output nodes,
//! without ComfyUI: reading the job, decoding ComfyUI's frames (executing, executed, one
//! `progress_state` per node change), turning them into progress snapshots and their JSON,
//! reading the history entry and selecting the outputs. Real ComfyUI's `progress_state` is
//! cumulative (every node so far, in each frame), so the bytes it sends grow with the square of
//! the node count whatever a worker does; the frames here carry the changed node only, so the
//! figure measures the worker, not that protocol cost.

#[allow(dead_code)]
#[path = "../tests/it/fake_platform.rs"]
mod fake_platform;
#[allow(dead_code)]
#[path = "common/process.rs"]
mod process;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use comfy_sim::{SimConfig, Simulator};
use comfy_worker::job::codec;
use serde_json::{json, Value};

use fake_platform::{FakePlatform, PlatformOptions, PostKind};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * 0.99).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The worker process; killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(platform: &FakePlatform, sim: &Simulator) -> Worker {
        let child = process::worker(platform.env(), &sim.host())
            // The figures here are per job, one job at a time; pipelining, which overlaps a
            // job's delivery with the next job, has its own benchmark (benches/pipeline.rs).
            .env("PIPELINE", "off")
            .env("COMFY_PID_FILE", "/nonexistent/bench.pid")
            .spawn()
            .expect("start the worker");
        Worker(child)
    }

    /// `VmHWM` / `VmRSS` of the process, in bytes.
    fn memory(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn simulator(step_ms: u64, noise: bool) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(step_ms),
            noise_images: noise,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

fn workflow(colour: u64, steps: u64, size: u64, batch: u64) -> Value {
    let mut graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": batch, "color": colour}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": format!("bench{colour}")}}
    });
    if steps > 0 {
        graph["2"] = json!({"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": 0.0}});
        graph["3"]["inputs"]["images"] = json!(["2", 0]);
    }
    json!({ "workflow": graph })
}

struct Floors {
    spawn: f64,
    rtt: f64,
    loopback_bytes_per_ms: f64,
    base64_bytes_per_ms: f64,
    memcpy_bytes_per_ms: f64,
}

async fn floors() -> Floors {
    let mut spawn = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        spawn.push(ms(t.elapsed()));
    }
    let big = vec![7u8; 8 << 20];
    let big_for_server = big.clone();
    let app = Router::new().route("/echo", post(|| async { "" })).route(
        "/big",
        get(move || {
            let b = big_for_server.clone();
            async move { b }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let listener = axum::serve::ListenerExt::tap_io(listener, |t| {
            let _ = t.set_nodelay(true);
        });
        axum::serve(listener, app).await.unwrap();
    });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut rtt = Vec::new();
    let body = vec![b'x'; 1024];
    for i in 0..220 {
        let t = Instant::now();
        http.post(format!("http://{addr}/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if i >= 20 {
            rtt.push(ms(t.elapsed()));
        }
    }
    let mut download = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        let n = http
            .get(format!("http://{addr}/big"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len();
        download.push(n as f64 / ms(t.elapsed()));
    }
    let mut b64 = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let s = codec::encode(&big);
        b64.push(big.len() as f64 / ms(t.elapsed()));
        std::hint::black_box(s);
        let t = Instant::now();
        let c = big.clone();
        copy.push(big.len() as f64 / ms(t.elapsed()));
        std::hint::black_box(c);
    }
    Floors {
        spawn: median(spawn),
        rtt: median(rtt),
        loopback_bytes_per_ms: median(download),
        base64_bytes_per_ms: median(b64),
        memcpy_bytes_per_ms: median(copy),
    }
}

async fn cold_start() -> f64 {
    let mut starts = Vec::new();
    for _ in 0..10 {
        let sim = simulator(1, false).await;
        let platform = FakePlatform::start(PlatformOptions::default()).await;
        let t = Instant::now();
        let _worker = Worker::start(&platform, &sim);
        let first = platform.wait_takes(1).await[0].at;
        starts.push(ms(first.saturating_duration_since(t)));
    }
    median(starts)
}

/// Runs `jobs` through one worker; returns the platform and the simulator for inspection.
async fn run_jobs(
    sim: Simulator,
    jobs: Vec<(String, Value)>,
) -> (Simulator, FakePlatform, u64, u64) {
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let worker = Worker::start(&platform, &sim);
    platform.wait_takes(1).await;
    let idle = worker.memory("VmRSS:");
    for (id, input) in &jobs {
        platform.push_job(id, input.clone());
    }
    for (id, _) in &jobs {
        platform.wait_final(id).await;
    }
    let peak = worker.memory("VmHWM:");
    (sim, platform, idle, peak)
}

fn completion_overheads(sim: &Simulator, platform: &FakePlatform, ids: &[String]) -> Vec<f64> {
    let done: HashMap<String, Instant> = sim.completions().into_iter().collect();
    let mut out = Vec::new();
    for id in ids {
        let posts = platform.posts(id);
        let Some(fin) = posts
            .iter()
            .find(|p| p.kind == PostKind::Final && p.accepted)
        else {
            continue;
        };
        let Some(prompt) = posts
            .iter()
            .find_map(|p| p.body["output"]["prompt_id"].as_str().map(str::to_owned))
        else {
            continue;
        };
        if let Some(at) = done.get(&prompt) {
            out.push(ms(fin.at.saturating_duration_since(*at)));
        }
    }
    out
}

/// The worker's bookkeeping for one job of `n` PreviewImage nodes, in process (see the module
/// docs): the median of three runs.
fn graph_bookkeeping(n: usize) -> Duration {
    use comfy_worker::comfy::messages::WsEvent;
    use comfy_worker::comfy::{HistoryEntry, PromptEvent};
    use comfy_worker::job::collect::select;
    use comfy_worker::job::{Job, JobRequest, OutputOptions};
    use comfy_worker::progress::ProgressTracker;

    let mut graph = serde_json::Map::new();
    graph.insert(
        "1".into(),
        json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}),
    );
    for i in 0..n {
        graph.insert(
            (i + 2).to_string(),
            json!({"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}),
        );
    }
    let input = json!({"workflow": graph});
    let pid = "8c5b9d8e-3c59-4c3e-9d39-3c1d6f6a2b11";
    let mut frames = Vec::with_capacity(4 * n);
    for i in 0..n {
        let id = (i + 2).to_string();
        let node = |state: &str, v: f64| json!({"prompt_id": pid, "nodes": {&id: {"value": v, "max": 1.0, "state": state, "node_id": &id, "prompt_id": pid, "display_node_id": &id, "parent_node_id": null, "real_node_id": &id}}});
        frames.push(json!({"type": "executing", "data": {"node": &id, "display_node": &id, "prompt_id": pid}}).to_string());
        frames.push(json!({"type": "progress_state", "data": node("running", 0.0)}).to_string());
        frames.push(json!({"type": "progress_state", "data": node("finished", 1.0)}).to_string());
        frames.push(json!({"type": "executed", "data": {"node": &id, "display_node": &id, "prompt_id": pid,
            "output": {"images": [{"filename": format!("ComfyUI_temp_{i:05}_.png"), "subfolder": "", "type": "temp"}]}}}).to_string());
    }
    let outputs: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            (
                (i + 2).to_string(),
                json!({"images": [{"filename": format!("ComfyUI_temp_{i:05}_.png"), "subfolder": "", "type": "temp"}]}),
            )
        })
        .collect();
    let history = json!({"prompt": [], "outputs": outputs,
        "status": {"status_str": "success", "completed": true, "messages": []}, "meta": {}});

    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let request = JobRequest::new("bench", Some(input.clone()));
        let job = Job::parse(&request).expect("a valid job");
        let comfy_worker::comfy::WorkflowInput::Api(workflow) = &job.input.workflow else {
            panic!("an API-format workflow");
        };
        let mut tracker = ProgressTracker::new(workflow, started);
        let mut snapshots = 0usize;
        for frame in &frames {
            let event = match WsEvent::parse(frame).expect("a frame") {
                WsEvent::Executing(e) => PromptEvent::Executing {
                    node: e.node.unwrap_or_default(),
                },
                WsEvent::ProgressState(s) => PromptEvent::NodeStates {
                    nodes: s
                        .nodes
                        .into_iter()
                        .map(|(id, p)| comfy_worker::comfy::NodeState {
                            node: id,
                            value: p.value,
                            max: p.max,
                            finished: p.state == "finished",
                        })
                        .collect(),
                },
                WsEvent::Executed(e) => PromptEvent::Executed {
                    node: e.node,
                    files: 1,
                    output: Box::default(),
                },
                _ => continue,
            };
            if let Some(snapshot) = tracker.apply(&event, Instant::now()) {
                snapshots += snapshot.to_json().to_string().len().min(1);
            }
        }
        let entry = HistoryEntry::parse(&history);
        let options = OutputOptions {
            include_temp: true,
            ..OutputOptions::default()
        };
        let selected = select(&entry.outputs, &options);
        assert_eq!(selected.files.len(), n);
        assert!(snapshots >= n);
        runs.push(started.elapsed().as_secs_f64());
    }
    Duration::from_secs_f64(median(runs))
}

fn line(name: &str, value: String, floor: String, ratio: f64) {
    println!("| {name:<58} | {value:>16} | {floor:>16} | {ratio:>7.1}× |");
}

#[tokio::main]
async fn main() {
    let f = floors().await;
    let cold = cold_start().await;

    // Relay latency: 8 jobs × 50 steps, 20 ms per step.
    let jobs: Vec<(String, Value)> = (0..8)
        .map(|j| (format!("steps-{j}"), workflow(j + 1, 50, 64, 1)))
        .collect();
    let ids: Vec<String> = jobs.iter().map(|j| j.0.clone()).collect();
    let (sim, platform, _, _) = run_jobs(simulator(20, false).await, jobs).await;
    let mut relay = Vec::new();
    for id in &ids {
        let posts = platform.posts(id);
        for mark in sim.step_marks() {
            if let Some(p) = posts.iter().find(|p| {
                p.kind == PostKind::Progress
                    && p.body["output"]["type"] == "progress"
                    && p.body["output"]["prompt_id"] == mark.prompt_id.as_str()
                    && p.body["output"]["value"] == mark.step
            }) {
                relay.push(ms(p.at.saturating_duration_since(mark.at)));
            }
        }
    }
    let relayed = relay.len();
    let small = completion_overheads(&sim, &platform, &ids);

    // 4 × ~2 MB outputs (700 × 700 noise PNGs).
    let jobs: Vec<(String, Value)> = (0..8)
        .map(|j| (format!("big-{j}"), workflow(j + 100, 1, 700, 4)))
        .collect();
    let ids: Vec<String> = jobs.iter().map(|j| j.0.clone()).collect();
    let (sim, platform, idle, peak) = run_jobs(simulator(1, true).await, jobs).await;
    let big = completion_overheads(&sim, &platform, &ids);
    let final_body = platform.wait_final(&ids[0]).await;
    let raw: usize = final_body["output"]["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["data"].as_str().unwrap_or("").len() * 3 / 4)
                .sum()
        })
        .unwrap_or(0);
    let b64 = raw * 4 / 3;

    // Jobs per second: 200 instant jobs.
    let n = 200;
    let jobs: Vec<(String, Value)> = (0..n)
        .map(|j| (format!("fast-{j}"), workflow(j + 1000, 0, 8, 1)))
        .collect();
    let t = Instant::now();
    let (_sim, _platform, _, _) = run_jobs(simulator(0, false).await, jobs).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();

    let big_floor = (raw as f64 / f.loopback_bytes_per_ms)
        + (raw as f64 / f.base64_bytes_per_ms)
        + (b64 as f64 / f.loopback_bytes_per_ms)
        + 3.0 * f.rtt;
    let rate_ceiling = 1000.0 / (8.0 * f.rtt);
    println!("comfy-worker benchmark suite (release build, loopback, this machine, one run)");
    println!(
        "floors measured now: loopback round trip {:.3} ms, loopback {:.0} MB/s, base64 {:.0} MB/s, memcpy {:.0} MB/s, spawn /bin/true {:.2} ms",
        f.rtt,
        f.loopback_bytes_per_ms / 1000.0,
        f.base64_bytes_per_ms / 1000.0,
        f.memcpy_bytes_per_ms / 1000.0,
        f.spawn
    );
    println!(
        "| {:<58} | {:>16} | {:>16} | {:>8} |",
        "figure", "measured", "floor", "ratio"
    );
    println!("|{:-<60}|{:-<18}|{:-<18}|{:-<10}|", "", "", "", "");
    line(
        "cold start: spawn → first job-take request",
        format!("{cold:.1} ms"),
        format!("{:.2} ms", f.spawn),
        cold / f.spawn,
    );
    let (rm, rp) = (median(relay.clone()), p99(relay));
    line(
        &format!("relay latency median ({relayed}/400 steps relayed)"),
        format!("{rm:.2} ms"),
        format!("{:.3} ms", f.rtt),
        rm / f.rtt,
    );
    line(
        "relay latency p99",
        format!("{rp:.2} ms"),
        format!("{:.3} ms", f.rtt),
        rp / f.rtt,
    );
    let sm = median(small);
    line(
        "completion overhead, small output (median)",
        format!("{sm:.1} ms"),
        format!("{:.2} ms", 3.0 * f.rtt),
        sm / (3.0 * f.rtt),
    );
    let bm = median(big);
    line(
        &format!(
            "completion overhead, 4 PNGs = {:.1} MB (median)",
            raw as f64 / 1e6
        ),
        format!("{bm:.1} ms"),
        format!("{big_floor:.1} ms"),
        bm / big_floor,
    );
    let grown = peak.saturating_sub(idle) as f64;
    line(
        &format!(
            "peak RSS above idle ({:.1} MB idle), 4-PNG jobs",
            idle as f64 / 1e6
        ),
        format!("{:.1} MB", grown / 1e6),
        format!("{:.1} MB", (raw + b64) as f64 / 1e6),
        grown / (raw + b64) as f64,
    );
    line(
        "jobs per second, instant workflow (200 jobs)",
        format!("{rate:.1} /s"),
        format!("{rate_ceiling:.0} /s"),
        rate_ceiling / rate,
    );
    let (small_graph, large_graph) = (graph_bookkeeping(2_500), graph_bookkeeping(5_000));
    line(
        "bookkeeping of a 5,000-node job, in process",
        format!("{:.1} ms", ms(large_graph)),
        "< 1000 ms".to_owned(),
        ms(large_graph) / 1000.0,
    );
    line(
        "  the same for 2,500 nodes (linear: about half)",
        format!("{:.1} ms", ms(small_graph)),
        format!("{:.1} ms", ms(large_graph) / 2.0),
        small_graph.as_secs_f64() / (large_graph.as_secs_f64() / 2.0),
    );
    let _ = f.memcpy_bytes_per_ms;
}
