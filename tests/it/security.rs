//! Security through the real binary: no secret ever reaches a log line, stdout, a result or a
//! response body (worker and serve modes, at `comfy_worker=trace`, over success and failure
//! paths); `serve` refuses to listen beyond loopback without a key; a panic inside a job fails
//! that job only (and its prompt is interrupted in ComfyUI), in both modes.

use serde_json::{json, Value};

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::harness::{self, LIMIT};
use crate::serve_process::ServeProcess;
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

/// Distinctive values, one per kind of secret the worker handles.
const COMFY_ORG_ENV: &str = "orgenv-SECRET-5a7c22e1";
const COMFY_ORG_JOB: &str = "orgjob-SECRET-e0f913a4";
const COMFY_ORG_JOB_NO_ID: &str = "orgjob-SECRET-noid-77b2";
const SERVE_KEY: &str = "servekey-SECRET-93de41f0";
const BUCKET_SECRET: &str = "bucket-SECRET-0c44d7aa";
const S3_CONFIG_SECRET: &str = "s3cfg-SECRET-71ab3e90";
const COMFY_HOST_PASSWORD: &str = "hostpw-SECRET-2fd9c1";
const URL_PASSWORD: &str = "urlpw-SECRET-8e21b7";
const HOOK_TOKEN: &str = "hooktoken-SECRET-4c0d99";
const NODE_KEY: &str = "nodekey-SECRET-61fa03";

/// The secrets every test here scans for (the RunPod key is the fake platform's own).
fn secrets(extra: &[&str]) -> Vec<String> {
    [
        COMFY_ORG_ENV,
        COMFY_ORG_JOB,
        COMFY_ORG_JOB_NO_ID,
        SERVE_KEY,
        BUCKET_SECRET,
        S3_CONFIG_SECRET,
        COMFY_HOST_PASSWORD,
        URL_PASSWORD,
        HOOK_TOKEN,
        NODE_KEY,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Fails naming every secret found and where.
fn assert_no_secret(secrets: &[String], captured: &[(String, String)]) {
    let mut leaks = Vec::new();
    for (place, text) in captured {
        for secret in secrets {
            if let Some(at) = text.find(secret.as_str()) {
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(120)
                    .map_or(0, |(i, _)| i);
                let to = (at + secret.len() + 80).min(text.len());
                let to = (to..=text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                leaks.push(format!("{secret} in {place}: …{}…", &text[from..to]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

/// The environment both modes run with: secrets in every variable that can hold one.
fn secret_env(comfy_host: &str) -> Vec<(&str, &str)> {
    vec![
        ("RUST_LOG", "comfy_worker=trace"),
        ("COMFY_HOST", comfy_host),
        ("COMFY_ORG_API_KEY", COMFY_ORG_ENV),
        ("SERVE_API_KEY", SERVE_KEY),
        ("BUCKET_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("BUCKET_SECRET_ACCESS_KEY", BUCKET_SECRET),
        ("COMFY_WORKER_TEST_PANIC_NODE", "ImageInvert"),
        ("WEBSOCKET_RECONNECT_DELAY_S", "0.02"),
        // The jobs' s3Config points at 127.0.0.1; outputs are small, so it is never contacted.
        ("ALLOW_PRIVATE_S3_ENDPOINTS", "true"),
    ]
}

/// `COMFY_HOST` with credentials (the simulator ignores them).
fn host_with_password(sim: &comfy_sim::Simulator) -> String {
    format!("http://comfy:{COMFY_HOST_PASSWORD}@{}", sim.host())
}

/// The jobs both modes run: each carries the job-level secrets and takes a different path.
fn jobs() -> Vec<(&'static str, Value)> {
    let with_secrets = |mut input: Value| {
        input["comfy_org_api_key"] = json!(COMFY_ORG_JOB);
        input["s3Config"] = json!({"accessId": "AKIDEXAMPLE", "accessSecret": S3_CONFIG_SECRET,
                                   "bucketName": "b", "endpointUrl": "http://127.0.0.1:9"});
        input
    };
    let mut ok = with_secrets(job_input(0x010203, 3));
    // A refused progress webhook whose URL holds credentials and a token.
    ok["progress_webhook"] = json!(format!(
        "http://hook:{URL_PASSWORD}@127.0.0.1:9/h?token={HOOK_TOKEN}"
    ));
    // An API node's key in the workflow itself.
    ok["workflow"]["1"]["inputs"]["api_key"] = json!(NODE_KEY);
    ok["workflow"]["1"]["_meta"] = json!({"title": "node with a key"});
    let bad_name = with_secrets(json!({
        "workflow": harness::workflow("ok"),
        "images": [{"name": "../escape.png", "image": "aGk="}]
    }));
    let bad_url = with_secrets(json!({
        "workflow": harness::workflow("ok"),
        "images": [{"name": "x.png",
                    "image": format!("http://user:{URL_PASSWORD}@127.0.0.1:9/x.png?sig={HOOK_TOKEN}")}]
    }));
    let rejected = with_secrets(json!({"workflow": harness::workflow("bad_node")}));
    let runtime = with_secrets(json!({"workflow": harness::workflow("runtime_error_custom")}));
    let panic = with_secrets(panic_input());
    vec![
        ("ok", ok),
        ("bad-name", bad_name),
        ("bad-url", bad_url),
        ("rejected", rejected),
        ("runtime", runtime),
        ("panic", panic),
    ]
}

/// EmptyImage → ImageInvert (the armed test hook panics when it starts) → SlowSteps → SaveImage:
/// the panic comes mid-prompt, with ComfyUI still busy.
fn panic_input() -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 4242}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SlowSteps", "inputs": {"image": ["2", 0], "steps": 200, "seconds_per_step": 0.1}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "boom"}}
    }})
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
}

#[tokio::test]
async fn worker_mode_never_shows_a_secret() {
    let sim = simulator(2).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let host = host_with_password(&sim);
    let mut env = secret_env(&host);
    env.push(("SHUTDOWN_GRACE_S", "5"));
    let mut worker = WorkerProcess::start(&platform, &sim, &env);
    let mut captured = Vec::new();
    let jobs = jobs();
    for (id, input) in &jobs {
        platform.push_job(id, input.clone());
    }
    // A job without an id is logged and skipped: it must be logged without its key.
    // (The key first: the log line shows the start of the job.)
    platform.push_raw_job(json!({"input": {"comfy_org_api_key": COMFY_ORG_JOB_NO_ID,
                                           "workflow": harness::workflow("ok")}}));
    platform.push_job("after", job_input(0x0a0b0c, 2));
    for (id, _) in &jobs {
        let body = final_of(&platform, id).await;
        match *id {
            "ok" => assert_eq!(body["output"]["images"].as_array().map(Vec::len), Some(2)),
            "panic" => assert!(
                error_of(&body).starts_with("Internal error in comfy-worker: test hook"),
                "{body}"
            ),
            _ => {
                error_of(&body);
            }
        }
    }
    let after = final_of(&platform, "after").await;
    assert!(
        after["output"]["images"].is_array(),
        "the worker kept serving: {after}"
    );
    // The key reached ComfyUI (where it is needed) and nowhere else.
    let prompts = sim.prompts();
    assert!(prompts
        .iter()
        .any(|p| p["extra_data"]["api_key_comfy_org"] == COMFY_ORG_JOB));
    worker.terminate();
    assert_eq!(worker.exited().await.code(), Some(0));

    assert!(
        worker.log().contains("missing field(s)"),
        "{}",
        worker.log()
    );
    captured.push(("worker stderr".to_owned(), worker.log()));
    captured.push(("worker stdout".to_owned(), worker.stdout()));
    for (id, _) in jobs
        .iter()
        .map(|(id, v)| (*id, v))
        .chain([("after", &Value::Null)])
    {
        for post in platform.posts(id) {
            captured.push((format!("post for {id}"), post.body.to_string()));
        }
        captured.push((format!("status of {id}"), platform.status(id).to_string()));
    }
    assert_no_secret(&secrets(&[platform.api_key()]), &captured);
}

/// Sends a request and returns (status, body text).
async fn call(request: reqwest::RequestBuilder) -> (u16, String) {
    let resp = tokio::time::timeout(LIMIT, request.send())
        .await
        .expect("no reply in time")
        .expect("request failed");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn serve_mode_never_shows_a_secret() {
    let sim = simulator(2).await;
    let host = host_with_password(&sim);
    let env = secret_env(&host);
    let mut serve = ServeProcess::start(&[], &env).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = serve.base();
    let auth = format!("Bearer {SERVE_KEY}");
    let mut captured = Vec::new();

    // Bad or missing keys.
    for header in [
        None,
        Some("Bearer wrong-key"),
        Some("servekey-SECRET-93de41f"),
    ] {
        let mut req = http.get(format!("{base}/health"));
        if let Some(h) = header {
            req = req.header("Authorization", h);
        }
        let (code, body) = call(req).await;
        assert_eq!(code, 401, "{body}");
        captured.push(("401 body".to_owned(), body));
    }
    // Requests the endpoint refuses.
    let (code, body) = call(
        http.post(format!("{base}/run"))
            .header("Authorization", &auth)
            .body("{not json"),
    )
    .await;
    assert_eq!(code, 400);
    captured.push(("bad JSON".to_owned(), body));
    let (code, body) = call(
        http.post(format!("{base}/run"))
            .header("Authorization", &auth)
            .json(&json!({"input": job_input(1, 1),
                          "webhook": format!("http://u:{URL_PASSWORD}@127.0.0.1:9/h?token={HOOK_TOKEN}")})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    captured.push(("refused webhook".to_owned(), body));

    // Every job path, then a job after the panic: the endpoint keeps serving.
    let mut all = jobs();
    all.push(("after", job_input(0x0d0e0f, 2)));
    for (name, input) in all {
        // The refused progress webhook would fail the submission: it is tested above.
        let mut input = input;
        if let Some(obj) = input.as_object_mut() {
            obj.remove("progress_webhook");
        }
        let (code, text) = call(
            http.post(format!("{base}/runsync?wait=60000"))
                .header("Authorization", &auth)
                .json(&json!({ "input": input })),
        )
        .await;
        assert_eq!(code, 200, "{name}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        match name {
            "ok" | "after" => assert_eq!(body["status"], "COMPLETED", "{name}: {body}"),
            "panic" => {
                assert_eq!(body["status"], "FAILED", "{body}");
                assert!(
                    error_of(&body).starts_with("Internal error in comfy-worker: test hook"),
                    "{body}"
                );
            }
            _ => assert_eq!(body["status"], "FAILED", "{name}: {body}"),
        }
        let id = body["id"].as_str().unwrap();
        for route in ["status", "stream"] {
            let (_, text) = call(
                http.get(format!("{base}/{route}/{id}"))
                    .header("Authorization", &auth),
            )
            .await;
            captured.push((format!("/{route} of {name}"), text));
        }
        captured.push((format!("/runsync of {name}"), text));
    }
    let (_, health) = call(
        http.get(format!("{base}/health"))
            .header("Authorization", &auth),
    )
    .await;
    captured.push(("/health".to_owned(), health));

    serve.terminate();
    assert_eq!(serve.exited().await.code(), Some(0));
    captured.push(("serve stderr".to_owned(), serve.log()));
    captured.push(("serve stdout".to_owned(), serve.stdout()));
    assert_no_secret(&secrets(&[]), &captured);
}

#[tokio::test]
async fn a_panic_fails_the_job_interrupts_its_prompt_and_the_worker_goes_on() {
    let sim = simulator(5).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(
        &platform,
        &sim,
        &[("COMFY_WORKER_TEST_PANIC_NODE", "ImageInvert")],
    );
    platform.push_job("boom", panic_input());
    let body = final_of(&platform, "boom").await;
    assert_eq!(
        error_of(&body),
        "Internal error in comfy-worker: test hook COMFY_WORKER_TEST_PANIC_NODE: node 2 (ImageInvert) started"
    );
    assert_eq!(platform.status("boom")["status"], "FAILED");
    // The abandoned prompt is interrupted, so ComfyUI is free for the next job at once.
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .expect("the panicked job's prompt was not interrupted");
    let prompt_id = sim.prompts()[0]["prompt_id"].clone();
    assert_eq!(
        sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
        prompt_id
    );
    platform.push_job("next", job_input(0x111111, 2));
    let next = final_of(&platform, "next").await;
    assert_eq!(next["output"]["images"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn a_panic_in_serve_fails_the_job_and_the_endpoint_goes_on() {
    let sim = simulator(5).await;
    let serve = ServeProcess::start(
        &["--comfy-host", &sim.host()],
        &[("COMFY_WORKER_TEST_PANIC_NODE", "ImageInvert")],
    )
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let runsync = |input: Value| {
        http.post(format!("{}/runsync?wait=60000", serve.base()))
            .json(&json!({ "input": input }))
    };
    let (_, text) = call(runsync(panic_input())).await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "FAILED", "{body}");
    assert!(
        error_of(&body).starts_with("Internal error in comfy-worker: test hook"),
        "{body}"
    );
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .expect("the panicked job's prompt was not interrupted");
    let (_, text) = call(runsync(job_input(0x222222, 2))).await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let (_, health) = call(http.get(format!("{}/health", serve.base()))).await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["jobs"]["failed"], 1, "{health}");
    assert_eq!(health["jobs"]["completed"], 1, "{health}");
}

#[tokio::test]
async fn serve_refuses_a_public_address_without_a_key_unless_insecure() {
    // Refused: exit 2, a clear message, nothing served.
    let mut refused = ServeProcess::spawn(&["--host", "0.0.0.0", "--simulate"], &[]);
    let status = refused.exited().await;
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("refusing to listen on 0.0.0.0:")
            && log.contains("without an API key")
            && log.contains("--insecure"),
        "{log}"
    );
    assert!(!log.contains("local endpoint on"), "{log}");
    // The SDK's spelling is held to the same rule.
    let out = std::process::Command::new(crate::cli::bin())
        .args([
            "--rp_serve_api",
            "--rp_api_host",
            "0.0.0.0",
            "--rp_api_port",
            "0",
        ])
        .env_remove("SERVE_API_KEY")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // With a key, or with --insecure, it serves (and only loopback is ever contacted here).
    for (args, env) in [
        (
            vec!["--host", "0.0.0.0", "--simulate"],
            vec![("SERVE_API_KEY", SERVE_KEY)],
        ),
        (
            vec!["--host", "0.0.0.0", "--simulate", "--insecure"],
            vec![],
        ),
    ] {
        let mut serve = ServeProcess::start(&args, &env).await;
        let port = serve.base().rsplit(':').next().unwrap().to_owned();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let (code, _) = call(http.get(format!("http://127.0.0.1:{port}/openapi.json"))).await;
        assert_eq!(code, 200);
        if args.contains(&"--insecure") {
            assert!(serve.log().contains("--insecure"), "{}", serve.log());
        }
        serve.terminate();
        assert_eq!(serve.exited().await.code(), Some(0));
    }
}

/// `RUST_LOG=trace` for every crate: the WebSocket library logs each frame (its payload in hex)
/// at trace, past the secret scrubber. Those lines never appear, while the worker's own trace
/// level does.
#[test]
fn trace_logging_for_every_crate_never_prints_websocket_frames() {
    let dir = crate::cli::job_dir();
    let out = crate::harness::clear_worker_env(&mut std::process::Command::new(crate::cli::bin()))
        .args(["run", "--simulate", "--quiet"])
        .current_dir(dir.path())
        .env("RUST_LOG", "trace")
        .output()
        .expect("run comfy-worker");
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("DEBUG"),
        "the worker's own debug lines are there"
    );
    for frame_line in ["received frame", "writing frame", "Received message"] {
        assert!(
            !log.contains(frame_line),
            "a WebSocket frame was logged ({frame_line}):\n{log}"
        );
    }
}
