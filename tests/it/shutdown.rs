//! SIGTERM with a job in progress, through the real binary in both modes: the job finishes
//! within the grace and its result lands exactly once, or it is interrupted and failed when the
//! grace runs out; no job is taken or started afterwards; the process exits 0.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::fake_platform::{FakePlatform, PlatformOptions, PostKind};
use crate::harness::LIMIT;
use crate::serve_process::ServeProcess;
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

/// Accepted result posts for a job.
fn accepted_finals(platform: &FakePlatform, id: &str) -> usize {
    platform
        .posts(id)
        .iter()
        .filter(|p| p.kind == PostKind::Final && p.accepted)
        .count()
}

fn assert_clean(platform: &FakePlatform) {
    assert!(
        platform.violations().is_empty(),
        "platform violations: {:?}",
        platform.violations()
    );
}

#[tokio::test]
async fn sigterm_with_a_job_queued_ahead_delivers_both_once_and_exits_0() {
    let sim = simulator(5).await;
    // Step 5 of 6: close to done, so the pipelined loop takes the next job and queues it.
    sim.pause_after_step(5);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(&platform, &sim, &[("SHUTDOWN_GRACE_S", "30")]);
    platform.push_job("running", job_input(0x330000, 6));
    platform.push_job("queued", job_input(0x340000, 2));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    tokio::time::timeout(
        LIMIT,
        platform.wait_progress("queued", |o| o["type"] == "queued"),
    )
    .await
    .expect("the next job is queued behind the running one");
    platform.push_job("waiting", job_input(0x350000, 2));
    worker.terminate();
    worker.wait_log("shutdown requested").await;
    sim.resume();

    for id in ["running", "queued"] {
        let body = final_of(&platform, id).await;
        assert_eq!(body["output"]["images"].as_array().map(Vec::len), Some(2));
    }
    let status = worker.exited().await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    for id in ["running", "queued"] {
        assert_eq!(
            accepted_finals(&platform, id),
            1,
            "{id}: the result landed once"
        );
        assert_eq!(platform.status(id)["status"], "COMPLETED");
        let posts = platform.posts(id);
        assert_eq!(
            posts.last().map(|p| p.kind),
            Some(PostKind::Final),
            "{id}: no progress after the result"
        );
    }
    assert_eq!(platform.status("waiting")["status"], "IN_QUEUE");
    assert!(sim.interrupts().is_empty(), "both finished on their own");
    assert_eq!(sim.prompts().len(), 2);
    assert_clean(&platform);
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_posts_it_once_and_exits_0() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(&platform, &sim, &[("SHUTDOWN_GRACE_S", "30")]);
    platform.push_job("running", job_input(0x310000, 6));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    // Queued on the platform while the worker is busy: it must never be taken.
    platform.push_job("waiting", job_input(0x320000, 2));
    worker.terminate();
    worker.wait_log("shutdown requested").await;
    sim.resume();

    let body = final_of(&platform, "running").await;
    assert_eq!(
        body["output"]["images"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let status = worker.exited().await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    assert_eq!(
        accepted_finals(&platform, "running"),
        1,
        "the result landed once"
    );
    assert_eq!(platform.status("running")["status"], "COMPLETED");
    assert_eq!(
        platform.status("waiting")["status"],
        "IN_QUEUE",
        "no job is taken after SIGTERM"
    );
    assert!(platform.posts("waiting").is_empty());
    assert!(sim.interrupts().is_empty(), "the job finished on its own");
    assert_eq!(sim.prompts().len(), 1);
    assert_clean(&platform);
}

#[tokio::test]
async fn a_job_that_outlives_the_grace_is_interrupted_and_fails_and_the_worker_exits_0() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(&platform, &sim, &[("SHUTDOWN_GRACE_S", "0.2")]);
    platform.push_job("slow", job_input(0x330000, 50));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    worker.terminate();
    // The grace runs out while ComfyUI is stuck mid-prompt: the worker interrupts it.
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .expect("ComfyUI was never interrupted");
    sim.resume();

    let body = final_of(&platform, "slow").await;
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(
        error.starts_with(
            "Worker shutting down: the job did not finish within the 0.2 s shutdown grace"
        ),
        "{error}"
    );
    assert_eq!(platform.status("slow")["status"], "FAILED");
    let status = worker.exited().await;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    assert_eq!(accepted_finals(&platform, "slow"), 1);
    let prompt_id = sim.prompts()[0]["prompt_id"].clone();
    assert_eq!(
        sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
        prompt_id
    );
    assert_clean(&platform);
}

#[tokio::test]
async fn the_rest_of_a_batch_is_answered_not_started_on_sigterm() {
    let sim = simulator(5).await;
    sim.pause_after_step(1);
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(&platform, &sim, &[("SHUTDOWN_GRACE_S", "30")]);
    platform.push_raw_job(json!([
        {"id": "first", "input": job_input(0x340000, 3)},
        {"id": "second", "input": job_input(0x350000, 3)}
    ]));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    worker.terminate();
    worker.wait_log("shutdown requested").await;
    sim.resume();
    let first = final_of(&platform, "first").await;
    assert!(first["output"]["images"].is_array(), "{first}");
    let second = final_of(&platform, "second").await;
    assert_eq!(
        second,
        json!({"error": "Worker shutting down: the job was not started; submit it again"})
    );
    assert_eq!(worker.exited().await.code(), Some(0), "{}", worker.log());
    assert_eq!(
        sim.prompts().len(),
        1,
        "the second job never reached ComfyUI"
    );
    assert_eq!(accepted_finals(&platform, "first"), 1);
    assert_eq!(accepted_finals(&platform, "second"), 1);
    assert_clean(&platform);
}

/// A webhook receiver on `127.0.0.1:0` that keeps every JSON body posted to it.
struct Receiver {
    url: String,
    bodies: watch::Receiver<Vec<Value>>,
    _stop: tokio_util::sync::DropGuard,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, bodies) = watch::channel(Vec::new());
        let tx = Arc::new(Mutex::new(tx));
        async fn receive(
            State(tx): State<Arc<Mutex<watch::Sender<Vec<Value>>>>>,
            Json(body): Json<Value>,
        ) -> &'static str {
            tx.lock().unwrap().send_modify(|b| b.push(body));
            "ok"
        }
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(tx);
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await;
        });
        Receiver {
            url,
            bodies,
            _stop: stop.drop_guard(),
        }
    }

    /// The final `/status` body the webhook got for job `id`.
    async fn final_for(&self, id: &str) -> Value {
        let mut rx = self.bodies.clone();
        let found = async {
            rx.wait_for(|bodies| bodies.iter().any(|b| b["id"] == id))
                .await
                .unwrap()
                .iter()
                .find(|b| b["id"] == id)
                .cloned()
                .unwrap()
        };
        tokio::time::timeout(LIMIT, found)
            .await
            .unwrap_or_else(|_| panic!("no webhook for {id}"))
    }

    fn count_for(&self, id: &str) -> usize {
        self.bodies
            .borrow()
            .iter()
            .filter(|b| b["id"] == id)
            .count()
    }
}

/// `POST /run` with a completion webhook; returns the job id.
async fn submit(serve: &ServeProcess, input: Value, webhook: &str) -> String {
    let reply: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/run", serve.base()))
        .json(&json!({"input": input, "webhook": webhook}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned()
}

#[tokio::test]
async fn serve_finishes_the_running_job_on_sigterm_and_exits_0() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let hooks = Receiver::start().await;
    let mut serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[
            ("SHUTDOWN_GRACE_S", "30"),
            ("ALLOW_PRIVATE_WEBHOOKS", "true"),
        ],
    )
    .await;
    let running = submit(&serve, job_input(0x360000, 6), &hooks.url).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let queued = submit(&serve, job_input(0x370000, 2), &hooks.url).await;
    serve.terminate();
    serve.wait_log("shutdown requested").await;
    sim.resume();

    let done = hooks.final_for(&running).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["output"]["images"].as_array().map(Vec::len), Some(2));
    let dropped = hooks.final_for(&queued).await;
    assert_eq!(dropped["status"], "FAILED", "{dropped}");
    assert_eq!(
        dropped["error"],
        "The endpoint shut down before the job started; submit it again"
    );
    assert_eq!(serve.exited().await.code(), Some(0), "{}", serve.log());
    assert_eq!(hooks.count_for(&running), 1, "the result went out once");
    assert!(sim.interrupts().is_empty(), "the job finished on its own");
    assert_eq!(sim.prompts().len(), 1, "the queued job never started");
}

#[tokio::test]
async fn serve_fails_a_job_that_outlives_the_grace_and_exits_0() {
    let sim = simulator(5).await;
    sim.pause_after_step(2);
    let hooks = Receiver::start().await;
    let mut serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[
            ("SHUTDOWN_GRACE_S", "0.2"),
            ("ALLOW_PRIVATE_WEBHOOKS", "true"),
        ],
    )
    .await;
    let id = submit(&serve, job_input(0x380000, 50), &hooks.url).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    serve.terminate();
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .expect("ComfyUI was never interrupted");
    sim.resume();
    let body = hooks.final_for(&id).await;
    assert_eq!(body["status"], "FAILED", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("Worker shutting down: the job did not finish within the 0.2 s"),
        "{error}"
    );
    assert_eq!(serve.exited().await.code(), Some(0), "{}", serve.log());
}
