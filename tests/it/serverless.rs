//! The real binary in serverless mode: a fake RunPod platform hands out jobs, the ComfyUI
//! simulator runs them; progress, results, pings and stops are checked on the platform's side.

use std::time::Duration;

use comfy_sim::{SimConfig, Simulator};
use serde_json::{json, Value};

use crate::fake_platform::{FakePlatform, Fault, PlatformOptions, PostKind};
use crate::harness::{self, png_size, LIMIT};
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

fn assert_clean(platform: &FakePlatform) {
    assert!(
        platform.violations().is_empty(),
        "platform violations: {:?}",
        platform.violations()
    );
}

/// The progress outputs `/status` showed for a job, in order.
fn progress_views(platform: &FakePlatform, id: &str) -> Vec<Value> {
    platform
        .status_history(id)
        .into_iter()
        .filter(|s| s["status"] == "IN_PROGRESS")
        .map(|s| s["output"].clone())
        .collect()
}

#[tokio::test]
async fn queued_jobs_complete_with_every_step_relayed() {
    let sim = simulator(40).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[]);
    let ids = ["job-a", "job-b", "job-c"];
    for (n, id) in ids.iter().enumerate() {
        platform.push_job(id, job_input(0x100000 * (n as u64 + 1), 10));
    }
    for id in ids {
        let body = final_of(&platform, id).await;
        let images = body["output"]["images"].as_array().expect("images");
        assert_eq!(images.len(), 2, "{body}");
        for img in images {
            png_size(img["data"].as_str().unwrap());
        }
        let status = platform.status(id);
        assert_eq!(status["status"], "COMPLETED", "{status}");

        let views = progress_views(&platform, id);
        let mut last = -1.0;
        for v in &views {
            let overall = v["overall_percent"].as_f64().unwrap();
            assert!(overall >= last, "{id}: progress went back: {views:#?}");
            last = overall;
        }
        let steps: Vec<u64> = views
            .iter()
            .filter(|v| v["type"] == "progress" && v["node"] == "2")
            .map(|v| v["value"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=10).collect::<Vec<_>>(),
            "{id}: every step relayed"
        );
        let step = views.iter().find(|v| v["type"] == "progress").unwrap();
        for key in [
            "value",
            "max",
            "percent",
            "node",
            "node_type",
            "step",
            "overall_percent",
            "nodes_done",
            "nodes_total",
            "nodes_cached",
            "eta_seconds",
            "elapsed_seconds",
            "prompt_id",
            "queue_remaining",
        ] {
            assert!(step.get(key).is_some(), "{key} missing in {step}");
        }
        assert_eq!(step["step"], "Sampling");
        let before_result = views.last().unwrap();
        assert_eq!(
            before_result["type"], "finished",
            "status is current before the result"
        );
        assert_eq!(before_result["overall_percent"], 100.0);
    }
    assert_clean(&platform);
}

/// Milliseconds from the take to the accepted result, as the platform measured it.
async fn execution_ms(progress_delay: Duration) -> (u64, Vec<Value>) {
    let sim = simulator(50).await;
    let platform = FakePlatform::start(PlatformOptions {
        progress_delay,
        ..PlatformOptions::default()
    })
    .await;
    let _worker = WorkerProcess::start(&platform, &sim, &[]);
    platform.push_job("timed", job_input(7, 40));
    final_of(&platform, "timed").await;
    assert_clean(&platform);
    let status = platform.status("timed");
    assert_eq!(status["status"], "COMPLETED");
    (
        status["executionTime"].as_u64().unwrap(),
        progress_views(&platform, "timed"),
    )
}

#[tokio::test]
async fn a_slow_progress_endpoint_does_not_slow_the_job() {
    let delay = Duration::from_millis(500);
    let (fast, _) = execution_ms(Duration::ZERO).await;
    let (slow, views) = execution_ms(delay).await;
    // 40 steps: relaying each in line would add 40 × 0.5 s. Allowed: the post in flight at the
    // end and the flush of the latest snapshot (2 × 0.5 s), plus scheduling slack.
    assert!(
        slow <= fast + 2 * delay.as_millis() as u64 + 500,
        "fast {fast} ms, slow {slow} ms"
    );
    assert!(
        views.len() < 20,
        "snapshots coalesced while the platform was slow: {}",
        views.len()
    );
    assert_eq!(
        views.last().unwrap()["type"],
        "finished",
        "status is current before the result"
    );
}

#[tokio::test]
async fn a_result_survives_503s_and_a_connection_reset_and_lands_once() {
    let sim = simulator(5).await;
    let platform = FakePlatform::start(PlatformOptions {
        result_faults: vec![Fault::Status(503), Fault::Status(503), Fault::Reset],
        ..PlatformOptions::default()
    })
    .await;
    let _worker = WorkerProcess::start(&platform, &sim, &[]);
    platform.push_job("flaky", job_input(9, 3));
    let body = final_of(&platform, "flaky").await;
    assert_eq!(body["output"]["images"].as_array().unwrap().len(), 2);
    let finals: Vec<_> = platform
        .posts("flaky")
        .into_iter()
        .filter(|p| p.kind == PostKind::Final)
        .collect();
    assert_eq!(
        finals.len(),
        4,
        "three failed attempts, then one that landed"
    );
    assert_eq!(finals.iter().filter(|p| p.accepted).count(), 1);
    assert_eq!(platform.status("flaky")["status"], "COMPLETED");
    assert_clean(&platform);
}

#[tokio::test]
async fn pings_carry_the_running_job_and_none_when_idle() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[("RUNPOD_PING_INTERVAL", "100")]);
    let idle = tokio::time::timeout(LIMIT, platform.wait_ping(|p| p.job_ids.is_none()))
        .await
        .unwrap();
    assert!(idle.query.contains("runpod_version="), "{}", idle.query);
    platform.push_job("pinged", job_input(11, 5));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let busy = tokio::time::timeout(
        LIMIT,
        platform.wait_ping(|p| p.job_ids.as_deref() == Some(&["pinged".to_owned()][..])),
    )
    .await
    .unwrap();
    assert!(busy.query.contains("job_id=pinged"), "{}", busy.query);
    sim.resume();
    final_of(&platform, "pinged").await;
    let done_at = platform
        .posts("pinged")
        .iter()
        .find(|p| p.kind == PostKind::Final && p.accepted)
        .unwrap()
        .at;
    tokio::time::timeout(
        LIMIT,
        platform.wait_ping(|p| p.at > done_at && p.job_ids.is_none()),
    )
    .await
    .unwrap();
    assert_clean(&platform);
}

#[tokio::test]
async fn a_stopped_job_is_interrupted_and_posts_nothing() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[("RUNPOD_PING_INTERVAL", "100")]);
    platform.push_job("stopme", job_input(13, 50));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    platform.stop_job("stopme");
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .unwrap();
    sim.resume();
    let prompt_id = sim.prompts()[0]["prompt_id"].clone();
    assert_eq!(
        sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
        prompt_id
    );
    // The worker keeps serving: the next job runs, and by then the stopped one was released.
    platform.push_job("after", job_input(14, 2));
    final_of(&platform, "after").await;
    assert!(
        platform
            .posts("stopme")
            .iter()
            .all(|p| p.kind != PostKind::Final),
        "a stopped job posts no result"
    );
    assert_ne!(platform.status("stopme")["status"], "COMPLETED");
    assert_clean(&platform);
}

#[tokio::test]
async fn a_deadline_interrupts_comfyui_and_fails_the_job() {
    let sim = simulator(20).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[("JOB_TIMEOUT_S", "60")]);
    let mut input = job_input(15, 500);
    input["timeout_s"] = json!(0.5);
    platform.push_job("slowjob", input);
    let body = final_of(&platform, "slowjob").await;
    let err = body["error"].as_str().unwrap();
    assert!(err.starts_with("Job timed out after 0.5 s"), "{err}");
    assert_eq!(sim.interrupts().len(), 1);
    assert_eq!(platform.status("slowjob")["status"], "FAILED");
    // ComfyUI is clean for the next job.
    platform.push_job("next", job_input(16, 2));
    assert!(final_of(&platform, "next").await["output"]["images"].is_array());
    assert_clean(&platform);
}

#[tokio::test]
async fn batches_and_jobs_without_id_or_input_never_stop_the_loop() {
    let sim = simulator(2).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let worker = WorkerProcess::start(&platform, &sim, &[]);
    platform.push_raw_job(json!([
        {"id": "b1", "input": job_input(17, 2)},
        {"input": job_input(18, 2)},
        {"id": "b3"}
    ]));
    assert_eq!(
        final_of(&platform, "b1").await["output"]["images"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        final_of(&platform, "b3").await,
        json!({"error": "Please provide input"})
    );
    platform.push_raw_job(json!("garbage"));
    platform.push_job("c1", job_input(19, 2));
    assert!(final_of(&platform, "c1").await["output"]["images"].is_array());
    assert!(
        worker.log().contains("missing field(s)"),
        "the job without id was reported"
    );
}

#[tokio::test]
async fn json_logs_carry_the_job_id_and_refresh_worker_stops_the_pod() {
    let sim = simulator(2).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(
        &platform,
        &sim,
        &[
            ("RUNPOD_ENDPOINT_ID", "ep-test"),
            ("REFRESH_WORKER", "true"),
            ("RUST_LOG", "comfy_worker=info"),
        ],
    );
    platform.push_job(
        "logged",
        json!({"workflow": harness::workflow("ok"), "comfy_org_api_key": "secret-key-123"}),
    );
    let body = final_of(&platform, "logged").await;
    assert_eq!(body["stopPod"], true, "{body}");
    assert!(
        worker.exited().await.success(),
        "REFRESH_WORKER exits after the job"
    );
    let log = worker.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let job_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["requestId"] == "logged")
        .collect();
    assert!(
        job_lines.iter().any(|l| l["message"] == "Started."),
        "{log}"
    );
    assert!(
        job_lines.iter().any(|l| l["message"] == "Finished."),
        "{log}"
    );
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l.get("message").is_some()));
    assert!(!log.contains("secret-key-123"), "a secret reached the log");
    assert_clean(&platform);
}

#[tokio::test]
async fn an_oversize_result_refused_by_the_platform_becomes_a_short_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(1),
            noise_images: true,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let platform = FakePlatform::start(PlatformOptions {
        max_result_bytes: 1 << 20,
        ..PlatformOptions::default()
    })
    .await;
    let _worker = WorkerProcess::start(&platform, &sim, &[]);
    // Two 700 × 700 noise PNGs: about 4 MB, over the (lowered) limit.
    let mut input = job_input(21, 1);
    input["workflow"]["1"]["inputs"]["width"] = json!(700);
    input["workflow"]["1"]["inputs"]["height"] = json!(700);
    platform.push_job("huge", input);
    let body = final_of(&platform, "huge").await;
    let err = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(err.contains("MB, which the platform refused"), "{err}");
    let finals: Vec<_> = platform
        .posts("huge")
        .into_iter()
        .filter(|p| p.kind == PostKind::Final)
        .collect();
    assert_eq!(
        finals.len(),
        2,
        "the full result once, then the short error"
    );
    assert_eq!(finals[0].response, Some(400));
    assert_eq!(platform.status("huge")["status"], "FAILED");
    assert_clean(&platform);
}
