//! One ComfyUI per GPU (`COMFY_HOST=a,b`): jobs run on several ComfyUIs at once, through the
//! RunPod loop (the worker binary, taking jobs with job-take-batch) and through `serve` (one
//! queue drained by every ComfyUI); a ComfyUI killed mid-job fails that job clearly while the
//! other keeps serving, and takes jobs again once it answers.

use comfy_sim::Simulator;
use comfy_worker::config::ComfyInstance;
use comfy_worker::endpoint::ServeOptions;
use comfy_worker::job::Engine;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::Value;

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::faults::{free_port, stepped_input, ComfyProcess};
use crate::harness::{self, LIMIT};
use crate::serve::{job, Endpoint};
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

/// Waits for both simulators to stop at their breakpoint: two prompts executing at once.
async fn both_paused(a: &Simulator, b: &Simulator) {
    tokio::time::timeout(LIMIT, async { tokio::join!(a.paused(), b.paused()) })
        .await
        .expect("both ComfyUIs run a job at the same time");
}

/// An engine for the ComfyUIs at `hosts` (the first is `COMFY_HOST`'s first entry).
fn engine_for(hosts: &[String]) -> Engine {
    let mut settings = harness::settings(&hosts[0]);
    settings.other_instances = hosts[1..]
        .iter()
        .map(|h| ComfyInstance {
            host: h.parse().unwrap(),
            pid_file: None,
            temp_dir: None,
        })
        .collect();
    Engine::new(settings).unwrap()
}

#[tokio::test]
async fn the_runpod_loop_takes_a_batch_and_runs_a_job_on_each_comfyui_at_once() {
    let (a, b) = (simulator(5).await, simulator(5).await);
    a.pause_after_step(1);
    b.pause_after_step(1);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    platform.push_job("j1", job_input(0x11_0001, 3));
    platform.push_job("j2", job_input(0x11_0002, 3));
    let hosts = format!("{},{}", a.host(), b.host());
    let worker = WorkerProcess::start(
        &platform,
        &a,
        &[
            ("COMFY_HOST", hosts.as_str()),
            ("COMFY_PID_FILE", "no-a.pid,no-b.pid"),
        ],
    );
    both_paused(&a, &b).await;
    let takes = platform.takes();
    assert_eq!(
        takes[0].batch_size,
        Some(2),
        "two idle ComfyUIs: one job-take-batch for two; takes {takes:?}"
    );
    a.resume();
    b.resume();
    for id in ["j1", "j2"] {
        let done = final_of(&platform, id).await;
        assert!(done.get("error").is_none(), "{done}");
        assert_eq!(done["output"]["images"].as_array().map(Vec::len), Some(2));
    }
    assert_eq!(
        (a.executions().len(), b.executions().len()),
        (1, 1),
        "one job on each ComfyUI"
    );
    assert!(
        platform.violations().is_empty(),
        "{:?}",
        platform.violations()
    );
    drop(worker);
}

/// `GET path` of the `simulate-comfyui` process on `port`, as JSON.
async fn get_json(port: u16, path: &str) -> Value {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Whether a prompt is running in that process (`GET /queue`).
async fn running_on(port: u16) -> bool {
    get_json(port, "/queue").await["queue_running"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
}

/// How many prompts that process ran (`GET /history`).
async fn history_len(port: u16) -> usize {
    get_json(port, "/history")
        .await
        .as_object()
        .map_or(0, |h| h.len())
}

#[tokio::test]
async fn a_comfyui_killed_mid_job_fails_that_job_and_the_other_keeps_serving() {
    let ports = [free_port(), free_port()];
    let dir = tempfile::tempdir().unwrap();
    let pid_files = [
        dir.path().join("comfy-0.pid"),
        dir.path().join("comfy-1.pid"),
    ];
    let mut comfy = Vec::new();
    for (port, pid_file) in ports.iter().zip(&pid_files) {
        let process = ComfyProcess::start(*port, 20).await;
        std::fs::write(pid_file, format!("{}\n", process.pid())).unwrap();
        comfy.push(Some(process));
    }
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let pids = format!("{},{}", pid_files[0].display(), pid_files[1].display());
    let worker = WorkerProcess::start_with_host(
        &platform,
        &[
            ("COMFY_HOST", hosts.as_str()),
            ("COMFY_PID_FILE", pids.as_str()),
        ],
    );
    platform.push_job("long", stepped_input(0x71_7171, 500));
    platform
        .wait_progress("long", |p| p["type"] == "progress")
        .await;
    // Kill the ComfyUI that runs it.
    let mut victim = None;
    for (i, port) in ports.iter().enumerate() {
        if running_on(*port).await {
            victim = Some(i);
        }
    }
    let victim = victim.expect("one ComfyUI runs the job");
    let survivor = 1 - victim;
    let pid = comfy[victim].as_ref().unwrap().pid();
    comfy[victim].take().unwrap().kill();
    let lost = final_of(&platform, "long").await;
    let err = lost["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&format!("the ComfyUI process (pid {pid} from "))
            && err.contains("exited during the job"),
        "{lost}"
    );
    worker
        .wait_log("it takes no jobs until it answers again")
        .await;
    // The survivor takes every job meanwhile: none goes to the dead one.
    for (i, id) in ["after-1", "after-2", "after-3"].iter().enumerate() {
        platform.push_job(id, stepped_input(0x72_0000 + i as u64, 2));
    }
    for id in ["after-1", "after-2", "after-3"] {
        let done = final_of(&platform, id).await;
        assert!(done.get("error").is_none(), "{id}: {done}");
        assert_eq!(done["output"]["images"].as_array().map(Vec::len), Some(2));
    }
    assert_eq!(history_len(ports[survivor]).await, 3);
    // Back on its port (a supervisor restarted it): it takes jobs again.
    let back = ComfyProcess::start(ports[victim], 20).await;
    std::fs::write(&pid_files[victim], format!("{}\n", back.pid())).unwrap();
    worker
        .wait_log("ComfyUI answers again and takes jobs")
        .await;
    platform.push_job("both-1", stepped_input(0x73_0001, 2));
    platform.push_job("both-2", stepped_input(0x73_0002, 2));
    for id in ["both-1", "both-2"] {
        let done = final_of(&platform, id).await;
        assert!(done.get("error").is_none(), "{id}: {done}");
    }
    assert_eq!(
        history_len(ports[victim]).await + history_len(ports[survivor]).await,
        5,
        "the three jobs on the survivor and the two last ones"
    );
    assert!(
        platform.violations().is_empty(),
        "{:?}",
        platform.violations()
    );
    drop(worker);
}

#[tokio::test]
async fn serve_drains_its_queue_over_every_comfyui() {
    let (a, b) = (simulator(5).await, simulator(5).await);
    a.pause_after_step(1);
    b.pause_after_step(1);
    let ep = Endpoint::start_on(
        engine_for(&[a.host(), b.host()]),
        ServeOptions::default(),
        Webhooks::new(WebhookPolicy::default()),
    )
    .await;
    let ids = [
        ep.run(job(0x21_0001, 3)).await,
        ep.run(job(0x21_0002, 3)).await,
        ep.run(job(0x21_0003, 3)).await,
    ];
    both_paused(&a, &b).await;
    let (code, health) = ep.get("/health").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(
        (&health["workers"]["running"], &health["workers"]["idle"]),
        (&Value::from(2), &Value::from(0)),
        "{health}"
    );
    assert_eq!(ep.status(&ids[2]).await["status"], "IN_QUEUE");
    let probed: Vec<(&Value, &Value)> = health["instances"]
        .as_array()
        .expect("every ComfyUI in /health")
        .iter()
        .map(|c| (&c["host"], &c["reachable"]))
        .collect();
    assert_eq!(
        probed,
        [
            (&Value::from(a.host()), &Value::Bool(true)),
            (&Value::from(b.host()), &Value::Bool(true))
        ],
        "{health}"
    );
    a.resume();
    b.resume();
    for id in &ids {
        let done = ep.final_status(id).await;
        assert_eq!(done["status"], "COMPLETED", "{done}");
    }
    assert_eq!(a.executions().len() + b.executions().len(), 3);
    assert!(!a.executions().is_empty() && !b.executions().is_empty());
    // Busy time is counted per ComfyUI.
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(ep.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = harness::Scraped::parse(&text);
    for sim in [&a, &b] {
        let host = sim.host();
        assert!(
            m.count(
                "comfy_worker_comfy_busy_seconds_total",
                &[("instance", host.as_str())]
            ) > 0.0,
            "{host}: {text}"
        );
        assert_eq!(
            m.value("comfy_worker_comfy_up", &[("instance", host.as_str())]),
            Some(1.0),
            "{text}"
        );
    }
    ep.stop().await;
}

#[tokio::test]
async fn health_asks_every_comfyui_and_fails_when_one_does_not_answer() {
    let sim = simulator(5).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let hosts = format!("{},{dead}", sim.host());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(crate::cli::bin());
        harness::clear_worker_env(&mut cmd)
            .args(["health", "--json", "--timeout-s", "5"])
            .env("COMFY_HOST", hosts)
            .output()
            .expect("run comfy-worker health")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let all: Value = serde_json::from_str(text.trim()).expect("one JSON array");
    let seen: Vec<(&Value, &Value)> = all
        .as_array()
        .expect("an array for several ComfyUIs")
        .iter()
        .map(|c| (&c["host"], &c["reachable"]))
        .collect();
    assert_eq!(
        seen,
        [
            (&Value::from(sim.host()), &Value::Bool(true)),
            (&Value::from(dead.as_str()), &Value::Bool(false))
        ],
        "{all}"
    );
}
