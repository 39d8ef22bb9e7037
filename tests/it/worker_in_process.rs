//! The RunPod adapter in process: [`spawn_app`] builds the real [`Worker`] (the real runner,
//! engine and platform client) against the fake platform and the simulator, without a child
//! process, and a test drives it one job-take at a time with [`Worker::step`] (zero2prod's
//! `try_execute_task`). The process tests (`serverless.rs`, `faults.rs`, ...) cover the binary.

use std::collections::HashMap;
use std::time::Duration;

use comfy_sim::Simulator;
use comfy_worker::platform::runpod::{
    Delivery, JobEnd, PlatformClient, RunPodSettings, Step, Worker,
};
use comfy_worker::runner::Runner;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::fake_platform::{FakePlatform, PlatformOptions, PostKind};
use crate::harness::{self, LIMIT};
use crate::worker_process::{job_input, simulator};

/// The worker, its platform and its ComfyUI, all in this process.
pub struct TestWorker {
    pub platform: FakePlatform,
    pub sim: Simulator,
    pub worker: Worker,
    pub shutdown: CancellationToken,
}

/// A worker for a fresh fake platform and simulator; `extra` adds platform variables.
pub async fn spawn_app(extra: &[(&str, &str)]) -> TestWorker {
    let platform = FakePlatform::start(PlatformOptions {
        long_poll: Duration::from_millis(50),
        ..PlatformOptions::default()
    })
    .await;
    let sim = simulator(2).await;
    let mut env: HashMap<String, String> = platform.env().into_iter().collect();
    env.insert("RUNPOD_RESULT_RETRY_DELAY_MS".into(), "20".into());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let settings = RunPodSettings::from_lookup(|k| env.get(k).cloned())
        .expect("platform settings")
        .expect("a RunPod environment");
    let runner = Runner::new(harness::engine(&sim.host()), settings.shutdown_grace);
    let client = PlatformClient::new(settings).expect("platform client");
    let webhooks = Webhooks::new(WebhookPolicy::default());
    TestWorker {
        worker: Worker::new(runner, client, webhooks),
        platform,
        sim,
        shutdown: CancellationToken::new(),
    }
}

impl TestWorker {
    /// One turn of the worker's loop, bounded so a hang fails the test.
    pub async fn step(&self) -> Step {
        tokio::time::timeout(LIMIT, self.worker.step(&self.shutdown))
            .await
            .expect("one job-take and its jobs within the limit")
    }
}

/// Asserts the step took `n` jobs and delivered each one's result.
#[track_caller]
fn assert_delivered(step: Step, n: usize) {
    let delivered = matches!(&step, Step::Ran(ends) if ends.len() == n
        && ends.iter().all(|e| matches!(e, JobEnd::Posted(Delivery::Delivered))));
    assert!(delivered, "{step:?}");
}

#[tokio::test]
async fn the_loop_steps_one_job_take_at_a_time() {
    let app = spawn_app(&[]).await;
    app.platform.push_job("first", job_input(0x11_2233, 3));
    app.platform.push_job("second", job_input(0x44_5566, 2));

    assert_delivered(app.step().await, 1);
    // The first is done and posted; the second was not taken yet.
    let first = app.platform.status("first");
    assert_eq!(first["status"], "COMPLETED", "{first}");
    assert_eq!(first["output"]["images"].as_array().map(Vec::len), Some(2));
    assert_eq!(app.platform.status("second")["status"], "IN_QUEUE");
    // Every progress post went out before the result, none after it.
    let posts = app.platform.posts("first");
    let last = posts.last().expect("posts for the first job");
    assert_eq!(last.kind, PostKind::Final);
    assert!(
        posts[..posts.len() - 1]
            .iter()
            .all(|p| p.kind == PostKind::Progress),
        "{posts:?}"
    );
    assert!(posts.len() > 2, "progress was relayed: {}", posts.len());

    assert_delivered(app.step().await, 1);
    assert_eq!(app.platform.status("second")["status"], "COMPLETED");
    // An empty queue: the take is held, then answered with nothing.
    assert!(matches!(app.step().await, Step::NoJob));
    assert_eq!(app.sim.prompts().len(), 2);
    assert!(
        app.platform.violations().is_empty(),
        "{:?}",
        app.platform.violations()
    );
}

#[tokio::test]
async fn a_failing_job_is_answered_and_the_next_one_runs() {
    let app = spawn_app(&[]).await;
    app.platform.push_job("bad", json!({"workflow": 7}));
    app.platform.push_job("good", job_input(0x77_8899, 1));

    assert_delivered(app.step().await, 1);
    let bad = app.platform.status("bad");
    assert_eq!(bad["status"], "FAILED", "{bad}");
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(error.contains("'workflow' must be a JSON object"), "{bad}");
    assert!(
        app.sim.prompts().is_empty(),
        "a bad input never reaches ComfyUI"
    );

    assert_delivered(app.step().await, 1);
    let good: Value = app.platform.status("good");
    assert_eq!(good["status"], "COMPLETED", "{good}");
}

#[tokio::test]
async fn shutdown_during_the_job_take_ends_the_step() {
    let app = spawn_app(&[]).await;
    app.shutdown.cancel();
    assert!(matches!(app.step().await, Step::ShutDown));
    assert!(app.platform.takes().len() <= 1);
}

/// The whole loop ([`Worker::run`]) on a task of its own, with its shutdown token.
pub struct RunningWorker {
    pub platform: FakePlatform,
    pub sim: Simulator,
    pub worker: std::sync::Arc<Worker>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    /// A worker as [`spawn_app`] builds it, bound (`METRICS_PORT`, if given) and running.
    pub async fn start(extra: &[(&str, &str)]) -> RunningWorker {
        let app = spawn_app(extra).await;
        let worker = std::sync::Arc::new(app.worker);
        worker.bind_metrics().await.expect("the metrics port binds");
        let task = {
            let worker = worker.clone();
            let shutdown = app.shutdown.clone();
            tokio::spawn(async move {
                worker.run(shutdown).await.expect("no warm-up to fail");
            })
        };
        RunningWorker {
            platform: app.platform,
            sim: app.sim,
            worker,
            shutdown: app.shutdown,
            task,
        }
    }

    /// SIGTERM: the loop ends, bounded.
    pub async fn stop(self) -> (FakePlatform, Simulator) {
        self.shutdown.cancel();
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the loop ends after shutdown")
            .expect("the loop did not panic");
        (self.platform, self.sim)
    }
}

#[tokio::test]
async fn metrics_port_serves_what_the_runner_and_the_loop_counted() {
    let app = RunningWorker::start(&[("METRICS_PORT", "0")]).await;
    let addr = app
        .worker
        .bind_metrics()
        .await
        .unwrap()
        .expect("METRICS_PORT is set");
    assert!(addr.ip().is_loopback(), "{addr}");
    app.platform.push_job("m1", job_input(0x0a0b0c, 2));
    app.platform.push_job("bad", json!({"workflow": 7}));
    app.platform.push_job("m2", job_input(0x0c0b0a, 2));
    for id in ["m1", "bad", "m2"] {
        crate::worker_process::final_of(&app.platform, id).await;
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = tokio::time::timeout(LIMIT, http.get(format!("http://{addr}/metrics")).send())
        .await
        .expect("a reply in time")
        .expect("the metrics listener answers");
    assert_eq!(resp.status(), 200);
    let m = harness::Scraped::parse(&resp.text().await.unwrap());
    let jobs = |outcome| m.count("comfy_worker_jobs_total", &[("outcome", outcome)]);
    assert_eq!((jobs("completed"), jobs("failed")), (2.0, 1.0));
    assert_eq!(m.histogram_count("comfy_worker_job_duration_seconds"), 3);
    assert_eq!(m.histogram_count("comfy_worker_queue_wait_seconds"), 2);
    let sent = m.count("comfy_worker_progress_posts_total", &[("result", "sent")]);
    let progress_posts: usize = ["m1", "m2", "bad"]
        .iter()
        .map(|id| {
            app.platform
                .posts(id)
                .iter()
                .filter(|p| p.kind == PostKind::Progress && p.accepted)
                .count()
        })
        .sum();
    assert_eq!(sent, progress_posts as f64);
    assert!(m.count("comfy_worker_result_bytes_total", &[]) > 0.0);
    assert_eq!(
        m.count("comfy_worker_retries_total", &[("reason", "result_post")]),
        0.0
    );
    let other = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(other.status(), 404);
    app.stop().await;
}

/// The prompt id of the simulator's `n`th `POST /prompt`.
fn prompt_id_of(sim: &Simulator, n: usize) -> String {
    sim.prompts()[n]["prompt_id"]
        .as_str()
        .expect("a prompt id")
        .to_owned()
}

/// No progress post for `id` after its final one, and exactly one final.
#[track_caller]
fn assert_final_last(platform: &FakePlatform, id: &str) {
    let posts = platform.posts(id);
    let finals: Vec<usize> = posts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind == PostKind::Final)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(finals, [posts.len() - 1], "{id}: {posts:?}");
    assert_eq!(platform.repeated_finals(id), 0, "{id}");
}

/// When `id`'s final post arrived.
fn final_at(platform: &FakePlatform, id: &str) -> std::time::Instant {
    platform
        .posts(id)
        .iter()
        .find(|p| p.kind == PostKind::Final)
        .map(|p| p.at)
        .unwrap_or_else(|| panic!("no final for {id}"))
}

/// Starts a worker, pushes `first` (6 steps) and `second`, holds the simulator after the
/// first's fifth step (close to done: the loop takes the second) and waits until the second's
/// prompt is queued in ComfyUI behind it.
async fn one_running_one_queued(extra: &[(&str, &str)]) -> RunningWorker {
    let app = RunningWorker::start(extra).await;
    app.sim.pause_after_step(5);
    app.platform.push_job("first", job_input(0x31_3131, 6));
    app.platform.push_job("second", job_input(0x32_3232, 2));
    tokio::time::timeout(LIMIT, app.sim.paused())
        .await
        .expect("the first job reaches its fifth step");
    tokio::time::timeout(
        LIMIT,
        app.platform
            .wait_progress("second", |o| o["type"] == "queued"),
    )
    .await
    .expect("the second job is taken and queued behind the first");
    assert_eq!(app.sim.prompts().len(), 2);
    assert_eq!(app.sim.queue_remaining(), 2, "one running, one pending");
    let takes = app.platform.takes();
    assert_eq!(takes[1].job_in_progress.as_deref(), Some("1"), "{takes:?}");
    app
}

#[tokio::test]
async fn a_stop_for_the_queued_ahead_job_leaves_the_running_one_alone() {
    let app = one_running_one_queued(&[]).await;
    app.platform.stop_job("second");
    let stopped = tokio::time::timeout(LIMIT, app.platform.wait_stop_delivered("second"))
        .await
        .expect("the stop is delivered");
    // The worker let go of the second job (its prompt is off ComfyUI's queue) while the first
    // still runs: a heartbeat after the stop holds the first only.
    tokio::time::timeout(
        LIMIT,
        app.platform.wait_ping(|p| {
            p.at > stopped.at && p.job_ids.as_deref() == Some(&["first".to_owned()][..])
        }),
    )
    .await
    .expect("a heartbeat without the stopped job");
    assert_eq!(
        app.sim.queue_remaining(),
        1,
        "the second prompt left the queue"
    );
    assert!(
        app.sim.interrupts().is_empty(),
        "no /interrupt: {:?}",
        app.sim.interrupts()
    );
    app.sim.resume();
    let first = crate::worker_process::final_of(&app.platform, "first").await;
    assert_eq!(first["output"]["images"].as_array().map(Vec::len), Some(2));
    let first_prompt = prompt_id_of(&app.sim, 0);
    let (platform, sim) = app.stop().await;
    // Only the first prompt ever ran; the stopped job posted no result.
    let ran: Vec<String> = sim.completions().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ran, [first_prompt]);
    assert!(sim.interrupts().is_empty());
    assert!(platform
        .posts("second")
        .iter()
        .all(|p| p.kind == PostKind::Progress));
    assert_final_last(&platform, "first");
    assert!(
        platform.violations().is_empty(),
        "{:?}",
        platform.violations()
    );
}

#[tokio::test]
async fn sigterm_with_one_running_and_one_queued_delivers_both_once() {
    let app = one_running_one_queued(&[]).await;
    app.shutdown.cancel();
    app.sim.resume();
    let (first_prompt, second_prompt) = (prompt_id_of(&app.sim, 0), prompt_id_of(&app.sim, 1));
    let (platform, sim) = app.stop().await;
    for id in ["first", "second"] {
        let status = platform.status(id);
        assert_eq!(status["status"], "COMPLETED", "{id}: {status}");
        assert_final_last(&platform, id);
    }
    // ComfyUI ran them in order, and each result went out as its job completed.
    let ran: Vec<String> = sim.completions().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ran, [first_prompt, second_prompt]);
    assert!(final_at(&platform, "first") < final_at(&platform, "second"));
    assert!(sim.interrupts().is_empty());
    assert!(
        platform.violations().is_empty(),
        "{:?}",
        platform.violations()
    );
}

#[tokio::test]
async fn pipelined_jobs_deliver_in_order_of_completion_and_pipeline_off_takes_one_at_a_time() {
    for pipeline in ["on", "off"] {
        let app = RunningWorker::start(&[("PIPELINE", pipeline)]).await;
        let ids = ["p1", "p2", "p3", "p4"];
        for (i, id) in ids.iter().enumerate() {
            app.platform
                .push_job(id, job_input(0x40_0000 + i as u64, 3));
        }
        for id in ids {
            crate::worker_process::final_of(&app.platform, id).await;
        }
        let (platform, sim) = app.stop().await;
        for id in ids {
            assert_eq!(
                platform.status(id)["status"],
                "COMPLETED",
                "{pipeline} {id}"
            );
            assert_final_last(&platform, id);
        }
        let finals: Vec<_> = ids.iter().map(|id| final_at(&platform, id)).collect();
        assert!(finals.windows(2).all(|w| w[0] < w[1]), "{pipeline}");
        assert_eq!(sim.completions().len(), 4);
        let busy_takes = platform
            .takes()
            .iter()
            .filter(|t| t.job_in_progress.as_deref() == Some("1"))
            .count();
        match pipeline {
            // Every job after the first was taken while one was in progress.
            "on" => assert!(busy_takes >= 3, "{:?}", platform.takes()),
            _ => assert_eq!(busy_takes, 0, "{:?}", platform.takes()),
        }
        assert!(
            platform.violations().is_empty(),
            "{:?}",
            platform.violations()
        );
    }
}

#[tokio::test]
async fn result_post_retries_are_counted_by_reason() {
    let app = spawn_app(&[]).await;
    app.platform
        .push_fault_run(crate::fake_platform::Fault::Status(503), 2);
    app.platform.push_job("retried", job_input(0x51_5151, 1));
    assert_delivered(app.step().await, 1);
    assert_eq!(app.platform.status("retried")["status"], "COMPLETED");
    let m = harness::Scraped::parse(&app.worker.metrics().encode());
    assert_eq!(
        m.count("comfy_worker_retries_total", &[("reason", "result_post")]),
        2.0
    );
    assert_eq!(
        m.count("comfy_worker_jobs_total", &[("outcome", "completed")]),
        1.0
    );
}

/// A job's outputs wait in the engine's spool folder between `/view` and the result post (a
/// refused post is sent again from there, byte for byte), and are gone once the result is
/// delivered.
#[tokio::test]
async fn outputs_wait_on_disk_and_are_removed_once_posted() {
    let app = RunningWorker::start(&[]).await;
    app.platform
        .push_fault_run(crate::fake_platform::Fault::Status(503), 1);
    let spool = app
        .worker
        .runner()
        .engine()
        .spool_dir()
        .expect("an output spool in TMPDIR")
        .to_owned();
    app.platform.push_job("sp1", job_input(0x5a5a5a, 2));
    let result = crate::worker_process::final_of(&app.platform, "sp1").await;
    let images = result["output"]["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{result}");
    for image in images {
        let png = comfy_worker::job::codec::decode_input(image["data"].as_str().unwrap()).unwrap();
        assert!(
            png.starts_with(b"\x89PNG"),
            "the outputs' bytes, encoded from the spool"
        );
    }
    let finals: Vec<_> = app
        .platform
        .posts("sp1")
        .into_iter()
        .filter(|p| p.kind == PostKind::Final)
        .collect();
    assert_eq!(finals.len(), 2, "refused once, then delivered");
    assert_eq!(finals[0].response, Some(503));
    assert!(finals[1].accepted);
    assert_eq!(finals[0].raw, finals[1].raw, "the same bytes sent again");
    // The post returns, then the output (and its files) is dropped.
    let left = tokio::time::timeout(LIMIT, async {
        loop {
            let files = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
            if files == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(left.is_ok(), "spooled outputs left in {}", spool.display());
    app.stop().await;
}
