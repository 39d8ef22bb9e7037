//! The Comfy API v2 surface of `serve` over raw HTTP, in front of the in-process simulator: one
//! job store with the RunPod-style routes (a v2 job's `/status`), the queue's limit
//! (`queue_full` with `Retry-After`), queue positions, a queued job's cancel, the list's pages,
//! a late subscriber's snapshot, and every refusal in the contract's envelope, each error body
//! validated against the contract's models (tests/fixtures/v2/conformance.py).

use std::time::Duration;

use comfy_sim::Simulator;
use comfy_worker::endpoint::{self, ServeOptions};
use comfy_worker::secret::Secret;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::comfy_sdk::{python_with_comfy_sdk, twenty_steps, v2_fixtures};
use crate::harness::{self, LIMIT};
use crate::worker_process::simulator;

struct Serve {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    key: Option<String>,
    /// Every response: (method, path, status, content type, body).
    seen: std::sync::Mutex<Vec<Value>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Serve {
    async fn start(sim: &Simulator, options: ServeOptions) -> Serve {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let key = options.api_key.as_ref().map(|k| k.expose().to_owned());
        tokio::spawn(endpoint::serve(
            listener,
            harness::engine(&sim.host()),
            Webhooks::new(WebhookPolicy::default()),
            options,
            stop.clone(),
        ));
        Serve {
            base,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            stop,
            key,
            seen: Default::default(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        r: reqwest::RequestBuilder,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let resp = tokio::time::timeout(LIMIT, r.send())
            .await
            .expect("no reply")
            .expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = resp.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if path.starts_with("/api/v2/") && !path.ends_with("/content") {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            self.seen.lock().unwrap().push(json!([
                method,
                path.split('?').next().unwrap(),
                status,
                content_type,
                text
            ]));
        }
        (status, body, headers)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, b, _) = self
            .send("GET", path, self.request(reqwest::Method::GET, path))
            .await;
        (s, b)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value, reqwest::header::HeaderMap) {
        self.send(
            "POST",
            path,
            self.request(reqwest::Method::POST, path).json(&body),
        )
        .await
    }

    async fn submit(&self, workflow: Value) -> Value {
        let (status, body, _) = self
            .post("/api/v2/jobs", json!({ "workflow": workflow }))
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Polls `GET /api/v2/jobs/{id}` until `done` holds.
    async fn until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let path = format!("/api/v2/jobs/{id}");
        let wait = async {
            loop {
                let (status, job) = self.get(&path).await;
                assert_eq!(status, 200, "{job}");
                if done(&job) {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .expect("the job never got there")
    }

    /// Runs conformance.py over every response seen; returns what each was checked as.
    fn conforms(&self) -> Value {
        let seen = serde_json::to_string(&*self.seen.lock().unwrap()).unwrap();
        let script = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import conformance
errors, kinds = [], {}
for method, path, status, ctype, text in json.load(sys.stdin):
    body = text.encode()
    kind = conformance.validate_response(method, path, status, ctype, body, None, errors)
    kinds[kind] = kinds.get(kind, 0) + 1
print(json.dumps({"errors": errors, "kinds": kinds}))
"#;
        let mut child = std::process::Command::new(python_with_comfy_sdk())
            .arg("-c")
            .arg(script)
            .arg(v2_fixtures())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(seen.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).expect("conformance report");
        assert_eq!(report["errors"], json!([]), "{report:#}");
        report["kinds"].clone()
    }
}

fn seeded(seed: u64) -> Value {
    let mut w = twenty_steps();
    w["3"]["inputs"]["seed"] = seed.into();
    w
}

#[tokio::test]
async fn v2_jobs_share_the_store_the_queue_limit_and_the_runpod_status() {
    let sim = simulator(1).await;
    let serve = Serve::start(
        &sim,
        ServeOptions {
            max_jobs: 2,
            ..ServeOptions::default()
        },
    )
    .await;
    sim.pause_after_step(2);
    let a = serve.submit(seeded(1)).await;
    let a_id = a["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(LIMIT, sim.paused())
        .await
        .expect("job A never ran");
    let b = serve.submit(seeded(2)).await;
    let b_id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (b["status"].as_str(), b["queue_position"].as_u64()),
        (Some("queued"), Some(1)),
        "{b}"
    );
    // Two unfinished jobs, the most this endpoint keeps.
    let (status, full, headers) = serve
        .post("/api/v2/jobs", json!({"workflow": seeded(3)}))
        .await;
    assert_eq!(
        (status, full["error"]["code"].as_str()),
        (429, Some("queue_full")),
        "{full}"
    );
    assert_eq!(headers["retry-after"], "5");
    // The same job on the RunPod-style route.
    let (status, runpod) = serve.get(&format!("/status/{a_id}")).await;
    assert_eq!(
        (status, runpod["status"].as_str()),
        (200, Some("IN_PROGRESS")),
        "{runpod}"
    );
    // A late subscriber of the running job: status, the latest progress, then live events.
    let events = serve
        .request(reqwest::Method::GET, &format!("/api/v2/jobs/{a_id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut stream = events.bytes_stream();
    let mut text = String::new();
    while text.matches("\n\n").count() < 2 {
        let chunk = tokio::time::timeout(LIMIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.starts_with("event: status\ndata: {\"status\":\"running\"}\n\n"),
        "{text}"
    );
    assert!(
        text.contains("event: progress\ndata: {") && text.contains("\"step\":2"),
        "{text}"
    );
    // A queued job's cancel: canceled at once, out of the queue.
    let (status, canceled, _) = serve
        .post(&format!("/api/v2/jobs/{b_id}/cancel"), json!({}))
        .await;
    assert_eq!(
        (status, canceled["status"].as_str()),
        (200, Some("canceled")),
        "{canceled}"
    );
    assert_eq!(canceled["started_at"], Value::Null);
    sim.resume();
    while !text.contains("\"status\":\"succeeded\"") {
        match tokio::time::timeout(LIMIT, stream.next()).await.unwrap() {
            Some(chunk) => text.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
            None => break,
        }
    }
    let steps = (3..=20)
        .filter(|s| text.contains(&format!("\"step\":{s},\"steps\":20")))
        .count();
    assert_eq!(steps, 18, "every later step: {text}");
    let output_at = text.find("event: output").expect("an output event");
    let end_at = text.find("{\"status\":\"succeeded\"}").unwrap();
    assert!(
        output_at < end_at && text.ends_with("{\"status\":\"succeeded\"}\n\n"),
        "{text}"
    );
    let done = serve.until(&a_id, |j| j["status"] == "succeeded").await;
    assert_eq!(done["outputs"].as_array().unwrap().len(), 1, "{done}");
    assert!(done["metrics"]["execution_ms"].as_u64().is_some(), "{done}");
    assert_eq!(done["progress"]["value"], 1.0);
    let (_, runpod) = serve.get(&format!("/status/{a_id}")).await;
    assert_eq!(runpod["status"], "COMPLETED", "{runpod}");
    assert_eq!(runpod["output"]["images"].as_array().map(Vec::len), Some(1));
    // The list, newest first, one per page.
    let (status, page) = serve.get("/api/v2/jobs?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["jobs"][0]["id"], json!(b_id));
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, next) = serve
        .get(&format!("/api/v2/jobs?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(next["jobs"][0]["id"], json!(a_id));
    assert_eq!(next["next_cursor"], Value::Null);
    let (_, only) = serve.get("/api/v2/jobs?status=canceled").await;
    assert_eq!(only["jobs"].as_array().unwrap().len(), 1, "{only}");
    serve.conforms();
}

#[tokio::test]
async fn every_refusal_is_the_contracts_envelope() {
    let sim = simulator(1).await;
    let serve = Serve::start(
        &sim,
        ServeOptions {
            api_key: Some(Secret::new("k")),
            ..ServeOptions::default()
        },
    )
    .await;
    // Health needs no key; everything else does.
    let (status, health, _) = serve
        .send(
            "GET",
            "/api/v2/health",
            serve.http.get(format!("{}/api/v2/health", serve.base)),
        )
        .await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("healthy")),
        "{health}"
    );
    let (status, body, headers) = serve
        .send(
            "GET",
            "/api/v2/jobs",
            serve.http.get(format!("{}/api/v2/jobs", serve.base)),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let code = |b: &Value| b["error"]["code"].as_str().unwrap_or("").to_owned();
    let (s, b) = serve.get("/api/v2/jobs/nope").await;
    assert_eq!((s, code(&b)), (404, "not_found".into()));
    let (s, b) = serve.get("/api/v2/assets/nope").await;
    assert_eq!((s, code(&b)), (404, "not_found".into()));
    let (s, b) = serve.get("/api/v2/nothing-here").await;
    assert_eq!((s, code(&b)), (404, "not_found".into()));
    let (s, b) = serve.get("/api/v2/jobs?limit=0").await;
    assert_eq!((s, code(&b)), (400, "invalid_request".into()));
    let (s, b, _) = serve
        .send(
            "POST",
            "/api/v2/jobs",
            serve
                .request(reqwest::Method::POST, "/api/v2/jobs")
                .header("content-type", "application/json")
                .body("{"),
        )
        .await;
    assert_eq!((s, code(&b)), (400, "invalid_request".into()));
    // ComfyUI's own validation, with its node errors.
    let (s, b, _) = serve
        .post(
            "/api/v2/jobs",
            json!({"workflow": harness::workflow("bad_node")}),
        )
        .await;
    assert_eq!((s, code(&b)), (422, "invalid_workflow".into()), "{b}");
    assert!(
        b["error"]["details"]["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min",
        "{b}"
    );
    let (s, b, _) = serve
        .post(
            "/api/v2/jobs",
            json!({"workflow": {"nodes": [], "links": []}}),
        )
        .await;
    assert_eq!((s, code(&b)), (422, "workflow_format_ui".into()));
    let ghost = json!({"1": {"class_type": "LoadImage", "inputs": {"image": {"__type": "core/ASSET", "info": {"id": "ghost"}}}}});
    let (s, b, _) = serve.post("/api/v2/jobs", json!({"workflow": ghost})).await;
    assert_eq!((s, code(&b)), (422, "missing_asset".into()));
    assert_eq!(b["error"]["details"], json!({"missing_ids": ["ghost"]}));
    // Assets: a miss, a wrong hash, an upload, its range, a bad range, delete twice.
    let zero = format!("blake3:{}", "0".repeat(64));
    let (s, b, _) = serve
        .post("/api/v2/assets/from-hash", json!({"hash": zero}))
        .await;
    assert_eq!((s, code(&b)), (404, "blob_not_found".into()));
    let (s, _, _) = serve
        .send(
            "HEAD",
            "/by-hash",
            serve.request(
                reqwest::Method::HEAD,
                &format!("/api/v2/assets/by-hash/{zero}"),
            ),
        )
        .await;
    assert_eq!(s, 404);
    let upload = |bytes: &'static [u8], expected: Option<String>| {
        let mut form = reqwest::multipart::Form::new()
            .text("content_type", "text/plain")
            .text("file_path", "note.txt");
        if let Some(h) = expected {
            form = form.text("expected_hash", h);
        }
        form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("note.txt"),
        )
    };
    let (s, b, _) = serve
        .send(
            "POST",
            "/api/v2/assets",
            serve
                .request(reqwest::Method::POST, "/api/v2/assets")
                .multipart(upload(b"0123456789", Some(zero.clone()))),
        )
        .await;
    assert_eq!((s, code(&b)), (409, "hash_mismatch".into()), "{b}");
    let (s, asset, _) = serve
        .send(
            "POST",
            "/api/v2/assets",
            serve
                .request(reqwest::Method::POST, "/api/v2/assets")
                .multipart(upload(b"0123456789", None)),
        )
        .await;
    assert_eq!(
        (s, asset["created_new"].as_bool()),
        (201, Some(true)),
        "{asset}"
    );
    let id = asset["id"].as_str().unwrap();
    let content = format!("/api/v2/assets/{id}/content");
    let part = serve
        .request(reqwest::Method::GET, &content)
        .header("range", "bytes=2-4")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 2-4/10");
    assert_eq!(&part.bytes().await.unwrap()[..], b"234");
    let past = serve
        .request(reqwest::Method::GET, &content)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    let (s, _, _) = serve
        .send(
            "HEAD",
            "/by-hash",
            serve.request(
                reqwest::Method::HEAD,
                &format!("/api/v2/assets/by-hash/{}", asset["hash"].as_str().unwrap()),
            ),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = serve
        .send(
            "DELETE",
            "/api/v2/assets/x",
            serve.request(reqwest::Method::DELETE, &format!("/api/v2/assets/{id}")),
        )
        .await;
    assert_eq!(s, 204);
    let (s, b, _) = serve
        .send(
            "DELETE",
            "/api/v2/assets/x",
            serve.request(reqwest::Method::DELETE, &format!("/api/v2/assets/{id}")),
        )
        .await;
    assert_eq!((s, code(&b)), (404, "not_found".into()));
    // A job's output goes with its job.
    let job = serve.submit(harness::workflow("ok")).await;
    let job_id = job["id"].as_str().unwrap().to_owned();
    let done = serve.until(&job_id, |j| j["status"] == "succeeded").await;
    let output = done["outputs"][0]["id"].as_str().unwrap().to_owned();
    let (s, b, _) = serve
        .send(
            "DELETE",
            "/api/v2/assets/x",
            serve.request(reqwest::Method::DELETE, &format!("/api/v2/assets/{output}")),
        )
        .await;
    assert_eq!((s, code(&b)), (409, "asset_in_use".into()));
    let (s, out) = serve.get(&format!("/api/v2/assets/{output}")).await;
    assert_eq!(
        (s, out["job_id"].as_str()),
        (200, Some(job_id.as_str())),
        "{out}"
    );
    // A reused key; a terminal job's cancel answers it as it is.
    let (s, _, _) = serve
        .send(
            "POST",
            "/api/v2/jobs",
            serve
                .request(reqwest::Method::POST, "/api/v2/jobs")
                .header("idempotency-key", "k1")
                .json(&json!({"workflow": seeded(9)})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, b, _) = serve
        .send(
            "POST",
            "/api/v2/jobs",
            serve
                .request(reqwest::Method::POST, "/api/v2/jobs")
                .header("idempotency-key", "k1")
                .json(&json!({"workflow": seeded(10)})),
        )
        .await;
    assert_eq!((s, code(&b)), (422, "idempotency_key_reuse".into()));
    let (s, b, _) = serve
        .post(&format!("/api/v2/jobs/{job_id}/cancel"), json!({}))
        .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("succeeded")));
    let kinds = serve.conforms();
    assert!(kinds["ErrorEnvelope"].as_u64() >= Some(12), "{kinds}");
    assert!(kinds["Asset"].as_u64() >= Some(2), "{kinds}");

    // Without a key, a web page elsewhere is refused.
    let open = Serve::start(&sim, ServeOptions::default()).await;
    let (s, b, _) = open
        .send(
            "POST",
            "/api/v2/jobs",
            open.request(reqwest::Method::POST, "/api/v2/jobs")
                .header("origin", "https://evil.example")
                .json(&json!({"workflow": seeded(11)})),
        )
        .await;
    assert_eq!((s, code(&b)), (403, "forbidden_origin".into()), "{b}");
}

#[tokio::test]
async fn previews_reach_the_stream_and_ui_workflows_convert_when_configured() {
    let sim = simulator(1).await;
    let serve = Serve::start(
        &sim,
        ServeOptions {
            v2: endpoint::V2Options {
                convert_ui: true,
                ..endpoint::V2Options::default()
            },
            ..ServeOptions::default()
        },
    )
    .await;
    // A node that sends a preview at every step: `preview` events on the stream, the latest
    // kept on the job for late subscribers.
    let mut workflow = harness::workflow("ok");
    workflow["2"]["inputs"]["send_preview"] = json!(true);
    workflow["2"]["inputs"]["seconds_per_step"] = json!(0.0);
    sim.pause_after_step(3);
    let job = serve.submit(workflow).await;
    let id = job["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(LIMIT, sim.paused())
        .await
        .expect("never ran");
    let events = serve
        .request(reqwest::Method::GET, &format!("/api/v2/jobs/{id}/events"))
        .send()
        .await
        .unwrap();
    let mut stream = events.bytes_stream();
    sim.resume();
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(LIMIT, stream.next()).await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let previews: Vec<Value> = text
        .split("event: preview\ndata: ")
        .skip(1)
        .map(|rest| serde_json::from_str(rest.split('\n').next().unwrap()).unwrap())
        .collect();
    assert!(previews.len() >= 7, "a preview per later step: {text}");
    assert_eq!(previews[0]["node_id"], "2");
    assert_eq!(previews[0]["content_type"], "image/jpeg");
    assert!(previews[0]["data_base64"]
        .as_str()
        .unwrap()
        .starts_with("/9j/"));
    assert!(text.ends_with("{\"status\":\"succeeded\"}\n\n"), "{text}");

    // A UI-format export, converted with ComfyUI's /object_info as RunPod-style jobs are.
    let ui: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/ui_workflows/txt2img.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let job = serve.submit(ui.clone()).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = serve
        .until(&id, |j| {
            j["status"] == "succeeded" || j["status"] == "failed"
        })
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, graph) = serve.get(&format!("/api/v2/jobs/{id}/workflow")).await;
    assert_eq!(
        (graph["format"].as_str(), &graph["workflow"]),
        (Some("save"), &ui)
    );
    serve.conforms();
}
