//! Operator tools through the real binary: the warm-up (`WARMUP_WORKFLOW`), `/free` after each
//! job (`FREE_MEMORY_AFTER_JOB`) and the clean-up of a job's files (`CLEANUP_FILES`) in serverless
//! mode against the fake platform and the simulator (which mirrors its folders to disk here), and
//! the health views: `comfy-worker health` and `serve`'s `/health`, warm-up included.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_sim::{SimConfig, Simulator};
use serde_json::{json, Value};

use crate::cli::bin;
use crate::fake_platform::{FakePlatform, PlatformOptions, PostKind};
use crate::harness::{self, LIMIT};
use crate::serve_process::ServeProcess;
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

/// A 1 × 1 PNG in base64.
const PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

/// Polls `check` every 10 ms until it returns `Some`, within [`LIMIT`].
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let found = async {
        loop {
            if let Some(v) = check() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(LIMIT, found)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

/// A workflow ComfyUI refuses at validation (`EmptyImage.width: 0`).
fn invalid_workflow() -> Value {
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["width"] = json!(0);
    wf
}

#[tokio::test]
async fn warm_up_runs_before_the_first_job_take() {
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // A bare API-format workflow, as exported from ComfyUI.
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["color"] = json!(0x123456);
    let warmup = write_json(dir.path(), "warmup.json", &wf);
    platform.push_job("after-warmup", job_input(0x654321, 2));
    let worker = WorkerProcess::start(
        &platform,
        &sim,
        &[("WARMUP_WORKFLOW", warmup.to_str().unwrap())],
    );
    let body = final_of(&platform, "after-warmup").await;
    assert!(body["output"]["images"].is_array(), "{body}");

    let prompts = sim.prompts();
    assert_eq!(prompts.len(), 2, "the warm-up and the job");
    assert_eq!(
        prompts[0]["prompt"]["1"]["inputs"]["color"], 0x123456,
        "the warm-up's workflow is ComfyUI's first prompt"
    );
    let warmup_id = prompts[0]["prompt_id"].as_str().unwrap().to_owned();
    let (_, warmup_done) = sim
        .completions()
        .into_iter()
        .find(|(id, _)| *id == warmup_id)
        .expect("the warm-up prompt ran to its end");
    let first_take = platform.takes()[0].at;
    assert!(
        warmup_done < first_take,
        "the warm-up finished before the worker asked for its first job"
    );
    let log = worker.log();
    let line = log
        .lines()
        .find(|l| l.contains("warm-up finished"))
        .expect("the warm-up's outcome is logged");
    assert!(
        line.contains("ok=true") && line.contains("elapsed_ms="),
        "{line}"
    );
    assert!(line.contains("files=2"), "{line}");
    assert!(
        !log.contains("iVBORw0KGgo"),
        "the warm-up's outputs are not logged"
    );
}

#[tokio::test]
async fn a_failed_warm_up_takes_no_job_and_exits_non_zero() {
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // A test-input file, as test_input.json is written.
    let warmup = write_json(
        dir.path(),
        "warmup.json",
        &json!({"input": {"workflow": invalid_workflow()}}),
    );
    platform.push_job("never-taken", job_input(1, 1));
    let mut worker = WorkerProcess::start(
        &platform,
        &sim,
        &[("WARMUP_WORKFLOW", warmup.to_str().unwrap())],
    );
    let status = worker.exited().await;
    assert_eq!(status.code(), Some(1), "{}", worker.log());
    assert!(
        platform.takes().is_empty(),
        "no job-take after a failed warm-up"
    );
    assert_eq!(sim.prompts().len(), 1, "only the warm-up reached ComfyUI");
    let log = worker.log();
    let line = log
        .lines()
        .find(|l| l.contains("warm-up finished"))
        .expect("the warm-up's outcome is logged");
    assert!(line.contains("ok=false"), "{line}");
    assert!(line.contains("warm-up failed"), "{line}");
    assert!(
        line.contains("width"),
        "the reason names the bad input: {line}"
    );
    assert!(log.contains("unhealthy"), "{log}");
    let ping = platform
        .pings()
        .into_iter()
        .find(|p| p.query.contains("status=unhealthy"))
        .expect("an unhealthy report on the ping URL");
    assert!(ping.query.contains("check=warmup"), "{}", ping.query);
    assert!(ping.query.contains("reason=warm-up"), "{}", ping.query);
    assert!(ping.query.contains("runpod_version="), "{}", ping.query);
    assert!(ping.job_ids.is_none());
}

#[tokio::test]
async fn an_unreadable_warm_up_file_fails_the_same_way() {
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(
        &platform,
        &sim,
        &[("WARMUP_WORKFLOW", "/nonexistent/comfy-worker/warmup.json")],
    );
    assert_eq!(worker.exited().await.code(), Some(1));
    assert!(platform.takes().is_empty());
    assert!(sim.prompts().is_empty());
    assert!(
        worker.log().contains("cannot read WARMUP_WORKFLOW"),
        "{}",
        worker.log()
    );
}

/// Every file below `dir`, as `sub/name` paths.
fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// A job that uploads `ops/<name>` and saves it (output) and previews it (temp).
fn upload_job(name: &str, prefix: &str) -> Value {
    json!({
        "workflow": {
            "1": {"class_type": "LoadImage", "inputs": {"image": format!("ops/{name}")}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": format!("ops/{prefix}")}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        },
        "images": [{"name": name, "image": PNG, "subfolder": "ops"}],
    })
}

#[tokio::test]
async fn cleanup_removes_the_jobs_files_and_leaves_the_rest() {
    let folders = tempfile::tempdir().unwrap();
    let (input, output, temp) = (
        folders.path().join("input"),
        folders.path().join("output"),
        folders.path().join("temp"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: Duration::from_millis(1),
            input_dir: Some(input.clone()),
            output_dir: Some(output.clone()),
            temp_dir: Some(temp.clone()),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let folder_env = [
        ("COMFY_INPUT_DIR", input.to_str().unwrap()),
        ("COMFY_OUTPUT_DIR", output.to_str().unwrap()),
        ("COMFY_TEMP_DIR", temp.to_str().unwrap()),
    ];

    // Without CLEANUP_FILES the job's files stay: these are the "other files" below.
    let keeper = WorkerProcess::start(&platform, &sim, &folder_env);
    platform.push_job("kept", upload_job("kept.png", "kept"));
    let body = final_of(&platform, "kept").await;
    // The preview (temp) is not returned, only saved.
    assert_eq!(
        body["output"]["images"].as_array().unwrap().len(),
        1,
        "{body}"
    );
    drop(keeper);
    // The killed worker's job-take poll must be gone before the next job is pushed, or the
    // platform hands that job to the dead poll.
    tokio::time::timeout(LIMIT, platform.wait_held_takes(0))
        .await
        .expect("the dead worker's job-take poll ends");
    let before = (tree(&input), tree(&output), tree(&temp));
    assert_eq!(
        before.0,
        BTreeSet::from(["example.png".to_owned(), "ops/kept.png".to_owned()])
    );
    assert_eq!(before.1, BTreeSet::from(["ops/kept_00001_.png".to_owned()]));
    assert_eq!(before.2.len(), 1, "one preview: {:?}", before.2);

    let mut env = folder_env.to_vec();
    env.push(("CLEANUP_FILES", "true"));
    let worker = WorkerProcess::start(&platform, &sim, &env);
    platform.push_job("cleaned", upload_job("cleaned.png", "cleaned"));
    let body = final_of(&platform, "cleaned").await;
    let images = body["output"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "outputs were collected first: {body}");
    for image in images {
        harness::png_size(image["data"].as_str().unwrap());
    }
    // The simulator wrote the job's files (the upload it recorded is on disk no more).
    let uploads = sim.uploads();
    assert_eq!(uploads.last().unwrap().name, "cleaned.png");
    assert_eq!(
        (tree(&input), tree(&output), tree(&temp)),
        before,
        "exactly the job's input, output and preview are gone"
    );
    let log = worker.log();
    let line = log
        .lines()
        .find(|l| l.contains("job files cleaned up"))
        .expect("the clean-up is logged");
    assert!(
        line.contains("deleted=3") && line.contains("refused=0") && line.contains("failed=0"),
        "{line}"
    );
}

/// The accepted final post of `id`.
fn final_post(platform: &FakePlatform, id: &str) -> std::time::Instant {
    platform
        .posts(id)
        .into_iter()
        .find(|p| p.kind == PostKind::Final && p.accepted)
        .expect("a final post")
        .at
}

#[tokio::test]
async fn free_memory_after_each_job_models() {
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[("FREE_MEMORY_AFTER_JOB", "models")]);
    platform.push_job("first", job_input(0x010101, 2));
    final_of(&platform, "first").await;
    until("the first /free", || (sim.frees().len() == 1).then_some(())).await;
    platform.push_job("second", job_input(0x020202, 2));
    final_of(&platform, "second").await;
    let frees = until("the second /free", || {
        let f = sim.frees();
        (f.len() == 2).then_some(f)
    })
    .await;
    for free in &frees {
        assert_eq!(
            free.body,
            json!({"unload_models": true, "free_memory": true})
        );
    }
    let (first, second) = (
        final_post(&platform, "first"),
        final_post(&platform, "second"),
    );
    assert!(first < frees[0].at, "after the result post, not before");
    assert!(frees[0].at < second);
    assert!(second < frees[1].at);
}

#[tokio::test]
async fn free_memory_after_a_failed_job_too() {
    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let worker = WorkerProcess::start(&platform, &sim, &[("FREE_MEMORY_AFTER_JOB", "memory")]);
    platform.push_job(
        "fails",
        json!({"workflow": harness::workflow("runtime_error")}),
    );
    let body = final_of(&platform, "fails").await;
    assert!(body["error"].is_string(), "{body}");
    let frees = until("a /free", || {
        let f = sim.frees();
        (!f.is_empty()).then_some(f)
    })
    .await;
    assert_eq!(frees[0].body, json!({"free_memory": true}));
    worker.wait_log("asked ComfyUI to free memory").await;
    assert_eq!(sim.frees().len(), 1, "one per job");
}

/// Runs `comfy-worker health <args>`; its exit code and stdout.
async fn health_cli(args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin())
            .arg("health")
            .args(&args)
            .env_remove("COMFY_HOST")
            .output()
            .expect("run comfy-worker health")
    })
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn health_command_shows_system_stats_and_the_queue() {
    let sim = simulator(20).await;
    let host = sim.host();

    let (code, text) = health_cli(&["--comfy", &host]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("ComfyUI at {host}: reachable, version 0.3.64")),
        "{text}"
    );
    assert!(
        text.contains("device cpu (cpu): VRAM 22.5 GiB free of 23.5 GiB"),
        "{text}"
    );
    assert!(text.contains("pytorch 2.11.0+cu130"), "{text}");
    assert!(text.contains("queue: 0 running, 0 pending"), "{text}");

    // A prompt held at its first step: the queue shows it.
    let engine = harness::engine(&host);
    sim.pause_after_step(1);
    let job = harness::spawn_job(&engine, job_input(0x0a0b0c, 5));
    sim.paused().await;
    let (code, text) = health_cli(&["--comfy", &host, "--json"]).await;
    assert_eq!(code, Some(0), "{text}");
    let j: Value = serde_json::from_str(text.trim()).expect("one JSON object");
    assert_eq!(j["reachable"], true);
    assert_eq!(j["version"], "0.3.64");
    assert_eq!(j["queue"], json!({"running": 1, "pending": 0}), "{j}");
    assert_eq!(j["devices"][0]["name"], "cpu");
    assert_eq!(j["devices"][0]["vram_total"], 25_276_502_016_u64);
    assert_eq!(j["devices"][0]["vram_free"], 24_167_591_936_u64);
    assert!(j["python_version"].as_str().unwrap().starts_with("3.11"));
    sim.resume();
    job.finish().await;

    // Nothing listens there any more.
    let gone = sim.addr();
    sim.shutdown().await;
    let (code, text) = health_cli(&["--comfy", &gone.to_string(), "--timeout-s", "2"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    let (code, text) = health_cli(&["--comfy", &gone.to_string(), "--json"]).await;
    assert_eq!(code, Some(1));
    let j: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(j["reachable"], false);
    assert!(j["error"].is_string(), "{j}");
}

async fn get(url: &str) -> (u16, Value) {
    send(reqwest::Client::new().get(url)).await
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    send(reqwest::Client::new().post(url).json(body)).await
}

/// The reply's status and JSON body, within [`LIMIT`].
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = tokio::time::timeout(LIMIT, request.send())
        .await
        .expect("in time")
        .expect("a reply");
    let code = resp.status().as_u16();
    (code, resp.json().await.expect("JSON"))
}

#[tokio::test]
async fn serve_health_shows_comfyui_and_the_warm_up() {
    let sim = simulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = write_json(
        dir.path(),
        "warmup.json",
        &json!({"input": job_input(0x0d0e0f, 1)}),
    );
    let serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[("WARMUP_WORKFLOW", warmup.to_str().unwrap())],
    )
    .await;
    serve.wait_log("warm-up finished").await;
    let (code, health) = get(&format!("{}/health", serve.base())).await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["warmup"]["state"], "done", "{health}");
    assert!(health["warmup"]["elapsed_ms"].is_u64());
    assert_eq!(health["workers"], json!({"idle": 1, "running": 0}));
    assert_eq!(health["jobs"]["completed"], 0, "the warm-up is not a job");
    let comfy = &health["comfyui"];
    assert_eq!(comfy["reachable"], true);
    assert_eq!(comfy["version"], "0.3.64");
    assert_eq!(comfy["devices"][0]["type"], "cpu");
    assert_eq!(comfy["queue"], json!({"running": 0, "pending": 0}));
    assert_eq!(sim.prompts().len(), 1, "the warm-up ran");
}

#[tokio::test]
async fn serve_shows_a_failed_warm_up_and_refuses_jobs() {
    let sim = simulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = write_json(dir.path(), "warmup.json", &invalid_workflow());
    let serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[("WARMUP_WORKFLOW", warmup.to_str().unwrap())],
    )
    .await;
    serve.wait_log("warm-up finished").await;
    let (code, health) = get(&format!("{}/health", serve.base())).await;
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["warmup"]["state"], "failed");
    let error = health["error"].as_str().unwrap();
    assert!(error.starts_with("warm-up failed"), "{error}");
    assert_eq!(health["warmup"]["error"], error);
    assert_eq!(
        health["comfyui"]["reachable"], true,
        "ComfyUI itself is fine"
    );

    let (code, body) = post(
        &format!("{}/run", serve.base()),
        &json!({"input": job_input(1, 1)}),
    )
    .await;
    assert_eq!(code, 503);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("unhealthy") && message.contains("warm-up failed"),
        "{message}"
    );
    assert_eq!(sim.prompts().len(), 1, "no job reached ComfyUI");
}

#[tokio::test]
async fn serve_queues_jobs_while_warming_up() {
    let sim = simulator(1).await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = write_json(
        dir.path(),
        "warmup.json",
        &json!({"input": job_input(0x111111, 3)}),
    );
    // The warm-up's prompt stops at its first step until resumed.
    sim.pause_after_step(1);
    let serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[("WARMUP_WORKFLOW", warmup.to_str().unwrap())],
    )
    .await;
    tokio::time::timeout(LIMIT, sim.paused())
        .await
        .expect("the warm-up reached ComfyUI");
    let (code, health) = get(&format!("{}/health", serve.base())).await;
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["status"], "warming_up");
    assert_eq!(health["warmup"], json!({"state": "running"}));
    assert_eq!(
        health["comfyui"]["queue"],
        json!({"running": 1, "pending": 0})
    );

    let (_, queued) = post(
        &format!("{}/run", serve.base()),
        &json!({"input": job_input(0x222222, 1)}),
    )
    .await;
    assert_eq!(queued["status"], "IN_QUEUE", "{queued}");
    let id = queued["id"].as_str().unwrap();
    let (_, status) = get(&format!("{}/status/{id}", serve.base())).await;
    assert_eq!(
        status["status"], "IN_QUEUE",
        "the job waits for the warm-up"
    );
    assert_eq!(sim.prompts().len(), 1);

    sim.resume();
    // Runs after the queued job (one at a time, in order), so both are done when it returns.
    let (_, body) = post(
        &format!("{}/runsync?wait=20000", serve.base()),
        &json!({"input": job_input(0x333333, 1)}),
    )
    .await;
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let (_, status) = get(&format!("{}/status/{id}", serve.base())).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    let colours: Vec<Value> = sim
        .prompts()
        .iter()
        .map(|p| p["prompt"]["1"]["inputs"]["color"].clone())
        .collect();
    assert_eq!(
        colours,
        vec![json!(0x111111), json!(0x222222), json!(0x333333)]
    );
    let (code, health) = get(&format!("{}/health", serve.base())).await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["jobs"]["completed"], 2);
}
