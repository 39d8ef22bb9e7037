//! ComfyUI restarted, or gone, in the middle of a job (issue: "a ComfyUI restart must never hang
//! a job"). ComfyUI is `comfy-worker simulate-comfyui`, a process of its own, killed and started
//! again on the same port. The job must end with a clear error within a bound the settings give,
//! and the next job must run: in process (the engine through the runner), through the worker
//! binary, and through the local endpoint.

use std::time::{Duration, Instant};

use comfy_worker::config::Settings;
use comfy_worker::endpoint::{self, ServeOptions};
use comfy_worker::job::Engine;
use comfy_worker::progress::ProgressKind;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::faults::{free_port, stepped_input, ComfyProcess};
use crate::harness::{self, error_text, images, spawn_job, LIMIT};
use crate::worker_process::{final_of, WorkerProcess};

/// The message of a prompt lost to a restart.
const LOST: &str = "ComfyUI restarted during the job; the prompt was lost";

/// Settings whose reconnect window outlasts a restart (ten attempts from 100 ms, doubling) and
/// that poll `/history` every 50 ms, so the new ComfyUI is asked as soon as it answers.
fn patient(host: &str) -> Settings {
    Settings {
        ws_reconnect_attempts: 10,
        ws_reconnect_delay: Duration::from_millis(100),
        history_poll_interval: Duration::from_millis(50),
        ready_timeout: Some(Duration::from_secs(5)),
        ..harness::settings(host)
    }
}

/// From the moment ComfyUI answers again: one reconnect delay at most (the first ones are
/// 100 ms), one `/history` poll and the queue check, plus an allowance for a loaded machine.
const AFTER_RESTART: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_restart_mid_job_ends_it_clearly_and_the_next_job_runs() {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let comfy = ComfyProcess::start(port, 20).await;
    let engine = Engine::new(patient(&host)).unwrap();
    let mut job = spawn_job(&engine, stepped_input(0x21_2121, 500));
    job.until(|s| s.kind == ProgressKind::Progress).await;
    comfy.kill();
    let _comfy = ComfyProcess::start(port, 1).await;
    let back = Instant::now();
    let output = tokio::time::timeout(AFTER_RESTART, job.output)
        .await
        .unwrap_or_else(|_| panic!("the job still waits {AFTER_RESTART:?} after ComfyUI came back"))
        .unwrap();
    let err = error_text(&output);
    assert!(err.starts_with(LOST), "{err}");
    eprintln!(
        "restart detected {} ms after ComfyUI answered again",
        back.elapsed().as_millis()
    );

    let (output, _) = harness::run_job(&engine, stepped_input(0x12_1212, 2)).await;
    assert_eq!(images(&output).len(), 2, "{}", output.to_json());
}

/// The PID file naming another live process mid-job (a supervisor restarted ComfyUI and wrote
/// the new PID) ends the job at once. Here the new process is a second simulator beside the
/// first, so the replacement is seen whatever the timing; a restart on the same port is the
/// test above.
#[tokio::test]
async fn a_new_pid_in_the_pid_file_ends_the_job_at_once() {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let comfy = ComfyProcess::start(port, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("comfyui.pid");
    std::fs::write(&pid_file, format!("{}\n", comfy.pid())).unwrap();
    let old = comfy.pid();
    let engine = Engine::new(Settings {
        comfy_pid_file: Some(pid_file.clone()),
        ..patient(&host)
    })
    .unwrap();
    let mut job = spawn_job(&engine, stepped_input(0x31_3131, 500));
    job.until(|s| s.kind == ProgressKind::Progress).await;
    let other = ComfyProcess::start(free_port(), 1).await;
    // As docker/start.sh writes it.
    std::fs::write(&pid_file, format!("{}\n", other.pid())).unwrap();
    let output = tokio::time::timeout(Duration::from_secs(3), job.output)
        .await
        .expect("the job ends within a few poll intervals of the new PID")
        .unwrap();
    let err = error_text(&output);
    assert!(
        err.starts_with(&format!(
            "ComfyUI restarted during the job (pid {old} became {} in ",
            other.pid()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn a_comfyui_that_exits_mid_job_is_seen_in_the_pid_file_at_once() {
    let port = free_port();
    let comfy = ComfyProcess::start(port, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("comfyui.pid");
    std::fs::write(&pid_file, format!("{}\n", comfy.pid())).unwrap();
    let pid = comfy.pid();
    let engine = Engine::new(Settings {
        comfy_pid_file: Some(pid_file),
        ws_reconnect_attempts: 10,
        ws_reconnect_delay: Duration::from_secs(5),
        ..patient(&format!("127.0.0.1:{port}"))
    })
    .unwrap();
    let mut job = spawn_job(&engine, stepped_input(0x41_4141, 500));
    job.until(|s| s.kind == ProgressKind::Progress).await;
    comfy.kill();
    let output = tokio::time::timeout(Duration::from_secs(3), job.output)
        .await
        .expect("the job ends within a few poll intervals of the exit")
        .unwrap();
    let err = error_text(&output);
    assert!(
        err.contains(&format!("the ComfyUI process (pid {pid} from "))
            && err.contains("exited during the job"),
        "{err}"
    );
}

/// Worker-binary settings for [`patient`] timings.
const PATIENT_ENV: &[(&str, &str)] = &[
    ("WEBSOCKET_RECONNECT_ATTEMPTS", "10"),
    ("WEBSOCKET_RECONNECT_DELAY_S", "0.1"),
    ("COMFY_HISTORY_POLL_INTERVAL_MS", "50"),
];

#[tokio::test]
async fn the_worker_answers_a_job_lost_to_a_restart_and_takes_the_next() {
    let port = free_port();
    let comfy = ComfyProcess::start(port, 20).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let sim_host = format!("127.0.0.1:{port}");
    let env: Vec<(&str, &str)> = PATIENT_ENV
        .iter()
        .copied()
        .chain([("COMFY_HOST", sim_host.as_str())])
        .collect();
    let worker = WorkerProcess::start_with_host(&platform, &env);
    platform.push_job("long", stepped_input(0x51_5151, 500));
    platform
        .wait_progress("long", |p| p["type"] == "progress")
        .await;
    comfy.kill();
    let _comfy = ComfyProcess::start(port, 1).await;
    platform.push_job("next", stepped_input(0x15_1515, 2));
    let lost = final_of(&platform, "long").await;
    let err = lost["error"].as_str().unwrap_or_default();
    assert!(err.starts_with(LOST), "{lost}");
    let next = final_of(&platform, "next").await;
    assert!(next.get("error").is_none(), "{next}");
    assert_eq!(next["output"]["images"].as_array().map(Vec::len), Some(2));
    drop(worker);
}

#[tokio::test]
async fn sigterm_with_comfyui_gone_ends_the_worker_in_seconds() {
    let port = free_port();
    let comfy = ComfyProcess::start(port, 20).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let sim_host = format!("127.0.0.1:{port}");
    // A long reconnect window: only the shutdown can end the job here.
    let env = [
        ("COMFY_HOST", sim_host.as_str()),
        ("WEBSOCKET_RECONNECT_ATTEMPTS", "10"),
        ("WEBSOCKET_RECONNECT_DELAY_S", "30"),
        ("SHUTDOWN_GRACE_S", "0.5"),
    ];
    let mut worker = WorkerProcess::start_with_host(&platform, &env);
    platform.push_job("stuck", stepped_input(0x61_6161, 500));
    platform
        .wait_progress("stuck", |p| p["type"] == "progress")
        .await;
    comfy.kill();
    let signalled = Instant::now();
    worker.terminate();
    let status = tokio::time::timeout(LIMIT, worker.exited())
        .await
        .expect("exit");
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    let result = final_of(&platform, "stuck").await;
    let err = result["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("Worker shutting down"), "{result}");
    // The grace, then a cancel that does not wait on a ComfyUI that is gone.
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn serve_fails_the_running_job_on_a_restart_and_runs_the_queued_one() {
    let port = free_port();
    let comfy = ComfyProcess::start(port, 20).await;
    let engine = Engine::new(patient(&format!("127.0.0.1:{port}"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(endpoint::serve(
        listener,
        engine,
        Webhooks::new(WebhookPolicy::default()),
        ServeOptions::default(),
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let run = |input: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let reply: Value = http
                .post(format!("{base}/run"))
                .json(&json!({ "input": input }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            reply["id"].as_str().unwrap().to_owned()
        }
    };
    let running = run(stepped_input(0x71_7171, 500)).await;
    let queued = run(stepped_input(0x17_1717, 2)).await;
    wait_status(&base, &running, |b| b["output"]["type"] == "progress").await;
    comfy.kill();
    let _comfy = ComfyProcess::start(port, 1).await;
    let failed = wait_status(&base, &running, |b| b["status"] == "FAILED").await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with(LOST),
        "{failed}"
    );
    let done = wait_status(&base, &queued, |b| b["status"] == "COMPLETED").await;
    assert_eq!(done["output"]["images"].as_array().map(Vec::len), Some(2));
    shutdown.cancel();
    let _ = server.await;
}

/// The job's `/status` body once `pred` holds for it: checked at each event of the job's
/// `/events` feed (never on a timer), within [`LIMIT`].
async fn wait_status(base: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut feed = reqwest::get(format!("{base}/events/{id}"))
        .await
        .expect("events");
    tokio::time::timeout(LIMIT, async {
        loop {
            let body: Value = reqwest::get(format!("{base}/status/{id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if pred(&body) {
                return body;
            }
            match feed.chunk().await {
                Ok(Some(_)) => {}
                _ => panic!("the feed ended before the state was reached: {body}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job {id} did not reach the state within {LIMIT:?}"))
}
