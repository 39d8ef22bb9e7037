//! Fault injection (P5: never lose a result, never hang a job): ComfyUI's socket dropped at
//! seeded points of 100 jobs, ComfyUI killed mid-job and restarted, a socket that goes silent,
//! deadlines and cancels that must leave ComfyUI clean, and 1000 jobs through the real binary
//! against a platform that fails its result posts, answers late, sends garbage and pings slowly.
//!
//! Every random choice comes from [`Rng`] with a fixed seed, so a failure replays exactly; the
//! counts are printed (`cargo test --test it faults -- --nocapture`) so CI logs show them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comfy_sim::DropPoint;
use comfy_worker::comfy::FileRef;
use comfy_worker::config::Settings;
use comfy_worker::job::{codec, Completed, Engine, JobOutput};
use comfy_worker::progress::ProgressKind;
use serde_json::{json, Value};

use crate::cli::bin;
use crate::fake_platform::{FakePlatform, Fault, PlatformOptions, PostKind};
use crate::harness::{self, error_text, images, spawn_job, LIMIT};
use crate::worker_process::{final_of, simulator, WorkerProcess};

/// The seed of every test here.
const SEED: u64 = 0x00C0_FFEE_FA17;

/// SplitMix64: a tiny deterministic PRNG, enough to pick fault points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `ok.json` shrunk (24 × 24, then 12 × 12) with `steps` sampler steps and its own colour, so no
/// two jobs share a cached node.
pub(crate) fn stepped_input(colour: u64, steps: u64) -> Value {
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["width"] = json!(24);
    wf["1"]["inputs"]["height"] = json!(24);
    wf["1"]["inputs"]["color"] = json!(colour & 0xFF_FFFF);
    wf["2"]["inputs"]["steps"] = json!(steps);
    wf["4"]["inputs"]["width"] = json!(12);
    wf["4"]["inputs"]["height"] = json!(12);
    json!({ "workflow": wf })
}

/// The instant workflow: an 8 × 8 image of its own colour, saved. No steps.
pub fn instant_input(colour: u64) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour & 0xFF_FFFF}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fault"}}
    }})
}

/// Asserts every `(filename, base64)` is byte for byte what the simulator serves at `/view`.
async fn assert_same_as_view(engine: &Engine, files: &[(String, String)], what: &str) {
    for (filename, data) in files {
        let served = engine
            .comfy()
            .view(&FileRef {
                filename: filename.clone(),
                subfolder: String::new(),
                folder_type: "output".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: /view {filename}: {e}"));
        let returned = codec::decode_input(data).expect("base64");
        assert!(
            served[..] == returned[..],
            "{what}: {filename} differs from /view ({} vs {} bytes)",
            returned.len(),
            served.len()
        );
    }
}

/// The `(filename, data)` of a job-done body's images.
fn body_images(body: &Value) -> Vec<(String, String)> {
    body["output"]["images"]
        .as_array()
        .unwrap_or_else(|| panic!("no images in {body}"))
        .iter()
        .map(|i| {
            (
                i["filename"].as_str().unwrap().to_owned(),
                i["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn assert_clean(platform: &FakePlatform) {
    assert!(
        platform.violations().is_empty(),
        "platform violations: {:#?}",
        platform.violations()
    );
}

#[tokio::test]
async fn websocket_drops_at_seeded_points_lose_no_result() {
    const JOBS: usize = 100;
    let sim = simulator(1).await;
    let engine = harness::engine(&sim.host());
    let mut rng = Rng(SEED);
    let started = Instant::now();
    let mut counts = [0usize; 4];
    for job in 0..JOBS {
        let steps = 2 + rng.below(4);
        // One or two points per job; a second drop hits the socket the worker reconnected.
        let mut points: Vec<DropPoint> = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let point = match rng.below(4) {
                0 => DropPoint::BeforeQueue,
                1 => DropPoint::AfterStep(1 + rng.below(steps) as u32),
                2 => DropPoint::BeforeCompletion,
                _ => DropPoint::OnHistory,
            };
            if !points.contains(&point) {
                points.push(point);
            }
        }
        for point in &points {
            counts[match point {
                DropPoint::BeforeQueue => 0,
                DropPoint::AfterStep(_) => 1,
                DropPoint::BeforeCompletion => 2,
                DropPoint::OnHistory => 3,
            }] += 1;
            sim.drop_websockets_at(*point);
        }
        let fired = sim.drops_fired();
        let input = stepped_input(0x10_0000 + job as u64 * 97, steps);
        let (output, progress) = harness::run_job(&engine, input).await;
        let what = format!("job {job} (drops at {points:?})");
        let files = match &output {
            JobOutput::Completed(Completed::Images { .. }) => images(&output),
            other => panic!("{what}: {}", other.to_json()),
        };
        assert_eq!(files.len(), 2, "{what}: {}", output.to_json());
        assert_same_as_view(&engine, &files, &what).await;
        assert_eq!(
            progress.last().map(|s| s.kind),
            Some(ProgressKind::Finished),
            "{what}"
        );
        assert!(sim.armed_drops().is_empty(), "{what}: a point never fired");
        assert_eq!(sim.drops_fired() - fired, points.len(), "{what}");
    }
    assert_eq!(sim.queue_remaining(), 0);
    eprintln!(
        "websocket drops: {JOBS} jobs, {JOBS}/{JOBS} complete with their outputs, {} drops \
         ({} before queueing, {} mid-progress, {} right before completion, {} at a /history \
         request), {:.1} s",
        sim.drops_fired(),
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        started.elapsed().as_secs_f64()
    );
}

/// `comfy-worker simulate-comfyui` on `port`, as a process of its own.
pub(crate) struct ComfyProcess(Child);

impl ComfyProcess {
    pub(crate) async fn start(port: u16, step_ms: u64) -> ComfyProcess {
        let child = Command::new(bin())
            .args(["simulate-comfyui", "--port", &port.to_string()])
            .args(["--step-ms", &step_ms.to_string()])
            .env("RUST_LOG", "comfy_worker=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start simulate-comfyui");
        let process = ComfyProcess(child);
        tokio::time::timeout(LIMIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("simulate-comfyui did not start listening");
        process
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap it (so its PID is gone, not a zombie).
    pub(crate) fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ComfyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The watcher's reconnect delay before attempt `attempt` (0-based): at most 250 ms first, then
/// the base doubling, capped at 30 s (README, `WEBSOCKET_RECONNECT_DELAY_S`).
fn reconnect_delay(base: Duration, attempt: u32) -> Duration {
    if attempt == 0 {
        return base.min(Duration::from_millis(250));
    }
    base.saturating_mul(1 << (attempt - 1).min(16))
        .min(Duration::from_secs(30))
}

/// How long a job may take to fail once ComfyUI is gone, from the settings alone: every
/// reconnect attempt with its delay (a refused connection fails at once), then one more
/// `/history` poll, plus one poll interval of slack on either side and a fixed allowance for a
/// loaded machine.
fn stopped_bound(s: &Settings) -> Duration {
    let reconnects: Duration = (0..s.ws_reconnect_attempts)
        .map(|i| reconnect_delay(s.ws_reconnect_delay, i))
        .sum();
    reconnects + 3 * s.history_poll_interval + Duration::from_secs(2)
}

#[tokio::test]
async fn comfyui_killed_mid_job_fails_in_bounded_time_and_the_next_job_runs_after_restart() {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let comfy = ComfyProcess::start(port, 20).await;
    let settings = Settings {
        ws_reconnect_attempts: 3,
        ws_reconnect_delay: Duration::from_millis(100),
        history_poll_interval: Duration::from_millis(50),
        ready_timeout: Some(Duration::from_secs(5)),
        ..harness::settings(&host)
    };
    let bound = stopped_bound(&settings);
    let engine = Engine::new(settings).unwrap();

    let mut job = spawn_job(&engine, stepped_input(0x123456, 500));
    job.until(|s| s.kind == ProgressKind::Progress).await;
    comfy.kill();
    let killed = Instant::now();
    let output = tokio::time::timeout(bound, job.output)
        .await
        .unwrap_or_else(|_| panic!("the job did not end within {bound:?} after ComfyUI died"))
        .unwrap();
    let took = killed.elapsed();
    let err = error_text(&output);
    assert!(err.contains("ComfyUI stopped responding"), "{err}");

    // ComfyUI comes back on the same port: the next job runs as if nothing happened.
    let _comfy = ComfyProcess::start(port, 1).await;
    let (output, _) = harness::run_job(&engine, stepped_input(0x654321, 3)).await;
    let files = images(&output);
    assert_eq!(files.len(), 2, "{}", output.to_json());
    assert_same_as_view(&engine, &files, "after the restart").await;
    eprintln!(
        "ComfyUI killed mid-job: the job failed after {} ms (bound from the settings: {} ms): {err}",
        took.as_millis(),
        bound.as_millis()
    );
}

/// How long a job may take to fail once ComfyUI froze (the process stopped, its sockets open):
/// the socket's silence, then a failed `/history` poll (each bounded by `COMFY_HTTP_TIMEOUT_S`)
/// per reconnect attempt plus one, a poll interval apart, plus the same allowance.
fn frozen_bound(s: &Settings) -> Duration {
    s.ws_silence_timeout
        + (s.ws_reconnect_attempts + 1) * (s.history_poll_interval + s.http_timeout)
        + Duration::from_secs(2)
}

#[tokio::test]
async fn a_frozen_comfyui_fails_the_job_in_bounded_time() {
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let comfy = ComfyProcess::start(port, 20).await;
    let settings = Settings {
        ws_reconnect_attempts: 2,
        ws_silence_timeout: Duration::from_millis(300),
        history_poll_interval: Duration::from_millis(50),
        http_timeout: Duration::from_millis(500),
        ..harness::settings(&host)
    };
    let bound = frozen_bound(&settings);
    let engine = Engine::new(settings).unwrap();
    let mut job = spawn_job(&engine, stepped_input(0x0F0F0F, 500));
    job.until(|s| s.kind == ProgressKind::Progress).await;
    // SIGSTOP: the process and its sockets stay, nothing answers (a hung ComfyUI).
    let stopped = Command::new("kill")
        .args(["-STOP", &comfy.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let frozen = Instant::now();
    let output = tokio::time::timeout(bound, job.output)
        .await
        .unwrap_or_else(|_| panic!("the job did not end within {bound:?} after ComfyUI froze"))
        .unwrap();
    let err = error_text(&output);
    assert!(err.contains("ComfyUI stopped responding"), "{err}");
    eprintln!(
        "ComfyUI frozen mid-job: the job failed after {} ms (bound from the settings: {} ms): {err}",
        frozen.elapsed().as_millis(),
        bound.as_millis()
    );
    comfy.kill();
}

#[tokio::test]
async fn a_dead_pid_in_the_pid_file_fails_the_job_at_once() {
    let port = free_port();
    let comfy = ComfyProcess::start(port, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("comfyui.pid");
    // As docker/start.sh writes it.
    std::fs::write(&pid_file, format!("{}\n", comfy.pid())).unwrap();
    let pid = comfy.pid();
    comfy.kill();
    let interval = Duration::from_secs(5);
    let settings = Settings {
        comfy_pid_file: Some(pid_file.clone()),
        api_available_interval: interval,
        ready_timeout: None,
        ..harness::settings(&format!("127.0.0.1:{port}"))
    };
    let engine = Engine::new(settings).unwrap();
    let started = Instant::now();
    let (output, _) = harness::run_job(&engine, instant_input(1)).await;
    let err = error_text(&output);
    assert!(
        err.contains(&format!("the ComfyUI process (pid {pid} from "))
            && err.contains("has exited"),
        "{err}"
    );
    // At once: without waiting even one readiness interval.
    assert!(started.elapsed() < interval, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_silent_socket_is_caught_by_the_history_fallback_in_serverless_mode() {
    let sim = simulator(2).await;
    let engine = harness::engine(&sim.host());
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[("COMFY_WS_SILENCE_S", "0.3")]);
    sim.pause_after_step(2);
    platform.push_job("silent", stepped_input(0xABCDEF, 6));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    sim.set_websockets_silent(true);
    sim.resume();
    let body = final_of(&platform, "silent").await;
    let files = body_images(&body);
    assert_eq!(files.len(), 2, "{body}");
    assert_same_as_view(&engine, &files, "silent socket").await;
    assert_eq!(platform.status("silent")["status"], "COMPLETED");
    sim.set_websockets_silent(false);
    assert_clean(&platform);
}

#[tokio::test]
async fn a_deadline_and_a_stop_leave_comfyui_clean_for_the_next_job() {
    let sim = simulator(5).await;
    let engine = harness::engine(&sim.host());
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[]);

    // The deadline: interrupted mid-run, failed, and ComfyUI has nothing left to do.
    let mut slow = stepped_input(0x111111, 1000);
    slow["timeout_s"] = json!(0.3);
    platform.push_job("deadline", slow);
    let body = final_of(&platform, "deadline").await;
    let err = body["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("Job timed out after 0.3 s"), "{body}");
    platform.push_job("after-deadline", stepped_input(0x222222, 2));
    let files = body_images(&final_of(&platform, "after-deadline").await);
    assert_same_as_view(&engine, &files, "after the deadline").await;
    assert_eq!(sim.queue_remaining(), 0, "ComfyUI's queue is empty");

    // The platform's stop: interrupted, nothing posted, and the same.
    sim.pause_after_step(2);
    platform.push_job("stopped", stepped_input(0x333333, 1000));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    platform.stop_job("stopped");
    tokio::time::timeout(LIMIT, sim.interrupt_handled(2))
        .await
        .unwrap();
    sim.resume();
    platform.push_job("after-stop", stepped_input(0x444444, 2));
    let files = body_images(&final_of(&platform, "after-stop").await);
    assert_same_as_view(&engine, &files, "after the stop").await;
    assert_eq!(sim.queue_remaining(), 0, "ComfyUI's queue is empty");
    assert!(platform
        .posts("stopped")
        .iter()
        .all(|p| p.kind != PostKind::Final));
    // Both interrupted prompts ended there (history entries), none is left running or pending.
    let prompts: Vec<String> = sim
        .prompts()
        .iter()
        .map(|p| p["prompt_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let completed: Vec<String> = sim.completions().into_iter().map(|(id, _)| id).collect();
    assert_eq!(prompts.len(), 4);
    for id in &prompts {
        assert!(completed.contains(id), "prompt {id} never ended");
    }
    assert_clean(&platform);
}

#[tokio::test]
async fn a_job_cancelled_while_queued_behind_another_prompt_leaves_the_queue() {
    let sim = simulator(1).await;
    let engine = harness::engine(&sim.host());
    sim.pause_after_step(1);
    let blocker = spawn_job(&engine, stepped_input(0x555555, 3));
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let mut waiting = spawn_job(&engine, stepped_input(0x666666, 3));
    waiting
        .until(|s| s.kind == ProgressKind::Queued && s.queue_position == Some(1))
        .await;
    assert_eq!(sim.queue_remaining(), 2);
    let cancelled = Instant::now();
    waiting.cancel.cancel();
    let (output, _) = waiting.finish().await;
    // At the next poll: a prompt taken off the queue has no history entry to wait for.
    let bound =
        harness::settings("127.0.0.1:1").history_poll_interval + Duration::from_millis(1500);
    assert!(cancelled.elapsed() < bound, "{:?}", cancelled.elapsed());
    assert!(
        error_text(&output).starts_with("Job cancelled"),
        "{}",
        output.to_json()
    );
    assert_eq!(
        sim.queue_remaining(),
        1,
        "taken off the queue before it ran"
    );
    sim.resume();
    let (output, _) = blocker.finish().await;
    assert_eq!(images(&output).len(), 2);
    let (output, _) = harness::run_job(&engine, stepped_input(0x777777, 2)).await;
    assert_eq!(images(&output).len(), 2);
    assert_eq!(sim.queue_remaining(), 0);
    assert_eq!(sim.completions().len(), 2, "the cancelled prompt never ran");
}

/// One platform fault plan entry, for the counts.
#[derive(Default, Debug)]
struct FaultCounts {
    /// Results planned (each ends with an attempt that is taken).
    attempts_planned: usize,
    /// Attempts that failed (HTTP errors, resets, no answer in time).
    faulty_attempts: usize,
    status: usize,
    resets: usize,
    slow_answers: usize,
    timeouts: usize,
    garbage_takes: usize,
    wrong_shapes: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_faults_over_1000_jobs_deliver_every_result_exactly_once() {
    const JOBS: usize = 1000;
    /// The worker's `RUNPOD_RESULT_TIMEOUT_S`, and a delay beyond it.
    const RESULT_TIMEOUT: &str = "0.1";
    const BEYOND_TIMEOUT: Duration = Duration::from_millis(150);
    let mut rng = Rng(SEED ^ 0x1000);
    let mut counts = FaultCounts::default();
    let mut faults = Vec::new();
    // Faults are consumed one per result post attempt, in order, and the worker posts one
    // result at a time, so each job's attempts meet exactly the faults planned for it. Every
    // attempt fails half the time (up to 10 in a row), so half the results meet at least one
    // fault and some meet many; the worker keeps trying within its retry window.
    let mut plan_result = |rng: &mut Rng, counts: &mut FaultCounts| {
        for _ in 0..10 {
            if !rng.chance(50) {
                break;
            }
            counts.faulty_attempts += 1;
            match rng.below(20) {
                0..=8 => {
                    counts.status += 1;
                    faults.push(Fault::Status([500, 502, 503, 429][rng.below(4) as usize]));
                }
                9..=17 => {
                    counts.resets += 1;
                    faults.push(Fault::Reset);
                }
                _ => {
                    // Not answered in time: the platform has it; the worker sends it again,
                    // and the platform keeps it once.
                    counts.timeouts += 1;
                    faults.push(Fault::Delay(BEYOND_TIMEOUT));
                }
            }
        }
        counts.attempts_planned += 1;
        if rng.chance(70) {
            faults.push(Fault::Delay(Duration::ZERO));
        } else {
            counts.slow_answers += 1;
            faults.push(Fault::Delay(Duration::from_millis(10 + rng.below(40))));
        }
    };

    enum Push {
        Job(String, Value),
        Raw(Value),
        /// Bytes, and the ids of the jobs the platform knows in them.
        Bytes(Vec<u8>, Vec<String>),
    }
    let mut pushes = Vec::new();
    let mut with_result: Vec<(String, Option<&'static str>)> = Vec::new();
    for job in 0..JOBS {
        if job % 100 == 25 {
            let garbage: Push = match (job / 100) % 5 {
                0 => {
                    // Cut short after its id: answered for that id, with an error.
                    let id = format!("cut-{job}");
                    plan_result(&mut rng, &mut counts);
                    with_result.push((id.clone(), Some("cannot be read, so it was not run")));
                    Push::Bytes(
                        format!("{{\"id\": \"{id}\", \"input\": ").into_bytes(),
                        vec![id],
                    )
                }
                1 => Push::Bytes(
                    b"<html><body>502 Bad Gateway</body></html>".to_vec(),
                    vec![],
                ),
                2 => Push::Raw(json!("garbage")),
                3 => Push::Raw(json!([42, {"no_id": true}, {"id": ""}])),
                _ => Push::Raw(json!({"input": {"workflow": {}}})),
            };
            counts.garbage_takes += 1;
            pushes.push(garbage);
        }
        if job % 100 == 75 {
            let id = format!("shape-{job}");
            let (body, expected) = if (job / 100) % 2 == 0 {
                (
                    json!({"id": id, "input": 5}),
                    "'input' must be a JSON object",
                )
            } else {
                (json!({"id": id}), "Please provide input")
            };
            counts.wrong_shapes += 1;
            plan_result(&mut rng, &mut counts);
            pushes.push(Push::Raw(body));
            with_result.push((id, Some(expected)));
        }
        let id = format!("job-{job:04}");
        plan_result(&mut rng, &mut counts);
        pushes.push(Push::Job(id.clone(), instant_input(0x40_0000 + job as u64)));
        with_result.push((id, None));
    }
    let planned_faults = faults.len();

    let sim = simulator(1).await;
    let engine = harness::engine(&sim.host());
    let platform = FakePlatform::start(PlatformOptions {
        result_faults: faults,
        ping_delay: Duration::from_millis(300),
        ..PlatformOptions::default()
    })
    .await;
    for push in pushes {
        match push {
            Push::Job(id, input) => platform.push_job(&id, input),
            Push::Raw(body) => platform.push_raw_job(body),
            Push::Bytes(bytes, ids) => {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                platform.push_raw_bytes(bytes, &ids)
            }
        }
    }
    let started = Instant::now();
    let mut worker = WorkerProcess::start(
        &platform,
        &sim,
        &[
            ("RUST_LOG", "comfy_worker=info"),
            ("RUNPOD_RESULT_RETRY_DELAY_MS", "2"),
            ("RUNPOD_RESULT_TIMEOUT_S", RESULT_TIMEOUT),
            // A ping every 50 ms, answered after 300 ms: every ping times out (at 2 × 50 ms).
            ("RUNPOD_PING_INTERVAL", "50"),
        ],
    );
    for (id, _) in &with_result {
        tokio::time::timeout(Duration::from_secs(120), platform.wait_final(id))
            .await
            .unwrap_or_else(|_| panic!("no result for {id}; status {}", platform.status(id)));
    }
    let elapsed = started.elapsed();

    let (mut progress_posts, mut late_progress) = (0, 0);
    for (id, expected) in &with_result {
        let posts = platform.posts(id);
        let finals: Vec<_> = posts
            .iter()
            .filter(|p| p.kind == PostKind::Final && p.accepted)
            .collect();
        assert_eq!(finals.len(), 1, "{id}: {} accepted results", finals.len());
        progress_posts += posts
            .iter()
            .filter(|p| p.kind == PostKind::Progress)
            .count();
        // Counted from the first result attempt, failed ones included.
        let first_final = posts.iter().find(|p| p.kind == PostKind::Final).unwrap().at;
        late_progress += posts
            .iter()
            .filter(|p| p.kind == PostKind::Progress && p.at >= first_final)
            .count();
        let body = &finals[0].body;
        match expected {
            Some(error) => {
                let got = body["error"].as_str().unwrap_or_default();
                assert!(got.contains(error), "{id}: {body}");
            }
            None => {
                let files = body_images(body);
                assert_eq!(files.len(), 1, "{id}: {body}");
                assert_same_as_view(&engine, &files, id).await;
                assert_eq!(platform.status(id)["status"], "COMPLETED", "{id}");
            }
        }
    }
    // Idle again: the worker is back to polling, every result is in, none came twice.
    tokio::time::timeout(LIMIT, platform.wait_held_takes(1))
        .await
        .unwrap();
    assert!(worker.running(), "the worker process exited");
    assert_eq!(late_progress, 0, "progress posts after a result");
    assert_clean(&platform);
    let pings = platform.pings().len();
    assert!(pings > 0, "the heartbeat kept going");
    // A result sent again after an unanswered post is the same result, kept once: no job's
    // result changed, and the repeats are no more than the unanswered posts.
    let repeats: usize = with_result
        .iter()
        .map(|(id, _)| platform.repeated_finals(id))
        .sum();
    assert!(
        repeats <= counts.timeouts,
        "{repeats} repeats for {} timeouts",
        counts.timeouts
    );
    let fault_rate =
        counts.faulty_attempts as f64 / (counts.faulty_attempts + counts.attempts_planned) as f64;
    eprintln!(
        "platform faults: {JOBS} jobs + {} wrong-shaped jobs, {} results delivered exactly \
         once (0 lost, 0 applied twice, {repeats} repeats of a result the platform had), \
         {planned_faults} result-post attempts of which {:.0} % failed ({} HTTP errors, {} \
         connection resets, {} answers beyond the timeout; {} slow answers), {} garbage \
         job-take replies, {progress_posts} progress posts ({late_progress} after a result), \
         {pings} slow pings; {:.1} s ({:.1} ms per job)",
        counts.wrong_shapes,
        with_result.len(),
        fault_rate * 100.0,
        counts.status,
        counts.resets,
        counts.timeouts,
        counts.slow_answers,
        counts.garbage_takes,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / with_result.len() as f64,
    );
}
