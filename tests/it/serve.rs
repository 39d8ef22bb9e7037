//! The local endpoint (`serve`) over real HTTP, in front of the in-process ComfyUI simulator:
//! the cloud endpoint's routes and statuses, progress on `/status` and `/events`, cancel,
//! timeouts, auth, body limits, retention, shutdown, and the binary's `--rp_serve_api`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use comfy_sim::Simulator;
use comfy_worker::endpoint::{self, ServeOptions};
use comfy_worker::secret::Secret;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, png_size, LIMIT};
use crate::worker_process::simulator;

/// A local endpoint served on a port of its own, in front of `sim`.
pub(crate) struct Endpoint {
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Endpoint {
    pub(crate) async fn start(sim: &Simulator, options: ServeOptions) -> Endpoint {
        Endpoint::start_with(sim, options, Webhooks::new(WebhookPolicy::default())).await
    }

    /// With the given webhook delivery (tests with a receiver on loopback must allow it).
    pub(crate) async fn start_with(
        sim: &Simulator,
        options: ServeOptions,
        webhooks: Webhooks,
    ) -> Endpoint {
        Endpoint::start_on(harness::engine(&sim.host()), options, webhooks).await
    }

    /// In front of the ComfyUIs `engine` names.
    pub(crate) async fn start_on(
        engine: comfy_worker::job::Engine,
        options: ServeOptions,
        webhooks: Webhooks,
    ) -> Endpoint {
        harness::init_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(endpoint::serve(
            listener,
            engine,
            webhooks,
            options,
            shutdown.clone(),
        ));
        Endpoint {
            base,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            shutdown,
            server: Some(server),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = tokio::time::timeout(LIMIT, request.send())
            .await
            .expect("no reply in time")
            .expect("request failed");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("reply {status} is not JSON ({e}): {text}"));
        (status, body)
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// `POST /run`; returns the job id.
    pub(crate) async fn run(&self, body: Value) -> String {
        let (code, reply) = self.post("/run", body).await;
        assert_eq!(code, 200, "{reply}");
        assert_eq!(reply["status"], "IN_QUEUE", "{reply}");
        let id = reply["id"].as_str().unwrap().to_owned();
        assert!(id.ends_with("-l1"), "{id}");
        id
    }

    pub(crate) async fn status(&self, id: &str) -> Value {
        let (code, body) = self.get(&format!("/status/{id}")).await;
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Polls `/status` until `done` holds; returns every body seen, the last one matching.
    async fn poll(&self, id: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let wait = async {
            loop {
                let body = self.status(id).await;
                let hit = done(&body);
                seen.push(body);
                if hit {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        if tokio::time::timeout(LIMIT, wait).await.is_err() {
            panic!("job {id} never got there; last status {:?}", seen.last());
        }
        seen
    }

    pub(crate) async fn final_status(&self, id: &str) -> Value {
        self.poll(id, is_final).await.pop().unwrap()
    }

    /// Stops the server and waits for it to exit.
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let server = self.server.take().unwrap();
        tokio::time::timeout(LIMIT, server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn is_final(body: &Value) -> bool {
    !matches!(body["status"].as_str(), Some("IN_QUEUE" | "IN_PROGRESS"))
}

/// `ok.json` (EmptyImage → SlowSteps → two SaveImage) with its own colour, so no run is cached.
pub(crate) fn job(colour: u64, steps: u64) -> Value {
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["color"] = json!(colour);
    wf["2"]["inputs"]["steps"] = json!(steps);
    json!({"input": {"workflow": wf}})
}

fn assert_images(body: &Value) {
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let images = body["output"]["images"].as_array().expect("images");
    let sizes: Vec<(u32, u32)> = images
        .iter()
        .map(|i| png_size(i["data"].as_str().unwrap()))
        .collect();
    assert_eq!(sizes, [(512, 512), (256, 256)]);
}

/// The colour a prompt the simulator received was submitted with.
fn colour_of(prompt: &Value) -> u64 {
    prompt["prompt"]["1"]["inputs"]["color"].as_u64().unwrap()
}

#[tokio::test]
async fn run_then_status_shows_queue_progress_and_images_in_order() {
    let sim = simulator(5).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    sim.pause_after_step(3);
    let first = ep.run(job(0x110000, 8)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let second = ep.run(job(0x220000, 4)).await;

    let queued = ep.status(&second).await;
    assert_eq!(queued["status"], "IN_QUEUE", "{queued}");
    assert!(queued["delayTime"].is_u64() && queued["executionTime"] == 0);
    assert!(queued.get("output").is_none(), "{queued}");

    let running = ep
        .poll(&first, |b| {
            b["status"] == "IN_PROGRESS"
                && b["output"]["type"] == "progress"
                && b["output"]["value"] == 3
        })
        .await;
    let snapshot = &running.last().unwrap()["output"];
    assert_eq!(snapshot["node_type"], "SlowSteps");
    assert_eq!(snapshot["max"], 8);
    assert_eq!(running.last().unwrap()["workerId"], "local");
    sim.resume();

    let mut seen = ep.poll(&first, is_final).await;
    let done = seen.pop().unwrap();
    assert_images(&done);
    assert!(done["executionTime"].as_u64().unwrap() > 0, "{done}");
    let mut last = -1.0;
    for body in running.iter().chain(&seen) {
        if body["status"] != "IN_PROGRESS" {
            continue;
        }
        let overall = body["output"]["overall_percent"].as_f64().unwrap();
        assert!(overall >= last, "progress went back: {body}");
        last = overall;
    }
    assert!(last > 0.0);

    let second_done = ep.final_status(&second).await;
    assert_eq!(second_done["status"], "COMPLETED", "{second_done}");
    assert!(
        second_done["delayTime"].as_u64().unwrap() > 0,
        "it waited for the first"
    );
    let colours: Vec<u64> = sim.prompts().iter().map(colour_of).collect();
    assert_eq!(
        colours,
        [0x110000, 0x220000],
        "jobs ran in submission order"
    );
    ep.stop().await;
}

#[tokio::test]
async fn runsync_returns_the_output_or_the_status_when_the_wait_ends() {
    let sim = simulator(2).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    let (code, done) = ep.post("/runsync", job(0x330000, 3)).await;
    assert_eq!(code, 200);
    assert_images(&done);
    assert!(done["delayTime"].is_u64() && done["executionTime"].is_u64());
    assert_eq!(done["workerId"], "local");

    // A failing job: `error` plus the rest of the output, as the serverless mode posts it.
    let (_, failed) = ep
        .post(
            "/runsync",
            json!({"input": {"workflow": harness::workflow("bad_node")}}),
        )
        .await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    assert!(failed["error"]
        .as_str()
        .unwrap()
        .contains("Node 1 (EmptyImage)"));
    assert!(failed["output"]["details"].is_array(), "{failed}");

    sim.pause_after_step(1);
    let (code, pending) = ep.post("/runsync?wait=1000", job(0x340000, 3)).await;
    assert_eq!(code, 200);
    assert_eq!(pending["status"], "IN_PROGRESS", "{pending}");
    let id = pending["id"].as_str().unwrap().to_owned();
    sim.resume();
    assert_images(&ep.final_status(&id).await);

    let (code, stream) = ep.get(&format!("/stream/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(stream["status"], "COMPLETED");
    assert_eq!(stream["stream"].as_array().unwrap().len(), 1);
    assert_eq!(
        stream["stream"][0]["output"],
        ep.status(&id).await["output"]
    );
    ep.stop().await;
}

#[tokio::test]
async fn cancel_interrupts_a_running_job_and_drops_a_queued_one() {
    let sim = simulator(5).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    sim.pause_after_step(2);
    let running = ep.run(job(0x440000, 20)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let queued = ep.run(job(0x450000, 2)).await;

    let (code, reply) = ep.post(&format!("/cancel/{queued}"), json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(reply, json!({"id": queued, "status": "CANCELLED"}));
    let body = ep.status(&queued).await;
    assert_eq!(body["status"], "CANCELLED");
    assert_eq!(body["executionTime"], 0);

    let (_, reply) = ep.post(&format!("/cancel/{running}"), json!({})).await;
    assert_eq!(reply["status"], "CANCELLED");
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .unwrap();
    sim.resume();
    assert_eq!(ep.status(&running).await["status"], "CANCELLED");
    let prompts = sim.prompts();
    assert_eq!(prompts.len(), 1, "the cancelled queued job never ran");
    assert_eq!(
        sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
        prompts[0]["prompt_id"]
    );

    // A final job keeps its status; the endpoint goes on serving.
    let (_, reply) = ep.post(&format!("/cancel/{running}"), json!({})).await;
    assert_eq!(reply["status"], "CANCELLED");
    let (_, next) = ep.post("/runsync", job(0x460000, 2)).await;
    assert_images(&next);
    let (_, reply) = ep
        .post(
            &format!("/cancel/{}", next["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(reply["status"], "COMPLETED");
    ep.stop().await;
}

#[tokio::test]
async fn execution_timeout_interrupts_the_prompt_and_times_the_job_out() {
    let sim = simulator(5).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    sim.pause_after_step(1);
    let mut body = job(0x550000, 20);
    body["policy"] = json!({"executionTimeout": 200});
    let id = ep.run(body).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .unwrap();
    sim.resume();
    let done = ep.final_status(&id).await;
    assert_eq!(done["status"], "TIMED_OUT", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.starts_with("Job timed out after 0.2 s (policy.executionTimeout)"),
        "{err}"
    );
    assert!(done.get("output").is_none(), "{done}");
    // ComfyUI is clean for the next job.
    let (_, next) = ep.post("/runsync", job(0x560000, 2)).await;
    assert_images(&next);

    // The worker's own `input.timeout_s` fails the job, as in serverless mode.
    sim.pause_after_step(1);
    let mut body = job(0x570000, 20);
    body["input"]["timeout_s"] = json!(0.2);
    let id = ep.run(body).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    tokio::time::timeout(LIMIT, sim.interrupt_handled(2))
        .await
        .unwrap();
    sim.resume();
    let done = ep.final_status(&id).await;
    assert_eq!(done["status"], "FAILED", "{done}");
    assert!(done["error"]
        .as_str()
        .unwrap()
        .starts_with("Job timed out after 0.2 s (input.timeout_s)"));
    ep.stop().await;
}

#[tokio::test]
async fn client_errors_are_json() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            max_run_bytes: 1000,
            max_runsync_bytes: 10_000,
            ..ServeOptions::default()
        },
    )
    .await;
    let (code, body) = ep.get("/status/nope").await;
    assert_eq!((code, body), (404, json!({"error": "job nope not found"})));
    for path in ["/stream/nope", "/events/nope"] {
        assert_eq!(ep.get(path).await.0, 404, "{path}");
    }
    assert_eq!(ep.post("/cancel/nope", json!({})).await.0, 404);
    let (code, body) = ep.get("/no/such/route").await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("no route"));
    let (code, body) = ep.get("/run").await;
    assert_eq!(code, 405, "{body}");
    assert!(body["error"].is_string());

    let (code, body) = ep
        .send(
            ep.http
                .post(ep.url("/run"))
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("not valid JSON"));
    // Without a key, a body must say it is JSON (a web page's form or text/plain cannot).
    let (code, body) = ep
        .send(ep.http.post(ep.url("/run")).body("{\"input\": {}}"))
        .await;
    assert_eq!(code, 415, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("Content-Type: application/json"));
    let (code, body) = ep.post("/run", json!({"workflow": {}})).await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("missing 'input'"));
    let (code, _) = ep.post("/run", json!({"input": {}, "webhook": 7})).await;
    assert_eq!(code, 400);

    // Over /run's limit, within /runsync's: the padding makes the body ~5 kB.
    let padded = json!({"input": {"padding": "x".repeat(5000)}});
    let (code, body) = ep.post("/run", padded.clone()).await;
    assert_eq!(code, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("1000 bytes"));
    let (code, body) = ep.post("/runsync", padded).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "FAILED");
    assert_eq!(body["error"], "Missing 'workflow' parameter");
    let (code, _) = ep
        .post(
            "/runsync",
            json!({"input": {"padding": "x".repeat(20_000)}}),
        )
        .await;
    assert_eq!(code, 413);
    ep.stop().await;
}

#[tokio::test]
async fn an_api_key_guards_every_route_but_the_page_and_the_document() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            api_key: Some(Secret::new("s3cret-key")),
            ..ServeOptions::default()
        },
    )
    .await;
    let health = |auth: Option<&str>| {
        let mut req = ep.http.get(ep.url("/health"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req
    };
    for bad in [None, Some("Bearer wrong"), Some("s3cret"), Some("Bearer ")] {
        let (code, body) = ep.send(health(bad)).await;
        assert_eq!(
            (code, body),
            (401, json!({"error": "unauthorized"})),
            "{bad:?}"
        );
    }
    for good in ["Bearer s3cret-key", "s3cret-key", "bearer s3cret-key"] {
        assert_eq!(ep.send(health(Some(good))).await.0, 200, "{good}");
    }
    let (code, _) = ep.post("/run", job(1, 1)).await;
    assert_eq!(code, 401);
    let (code, _) = ep.get("/v2/ep1/status/x").await;
    assert_eq!(code, 401);
    let (code, _) = ep
        .send(
            ep.http
                .post(ep.url("/v2/ep1/runsync"))
                .bearer_auth("s3cret-key")
                .json(&job(0x660000, 1)),
        )
        .await;
    assert_eq!(code, 200);

    let page = ep.http.get(ep.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(ep.get("/openapi.json").await.0, 200);
    ep.stop().await;
}

#[tokio::test]
async fn metrics_count_jobs_by_outcome_behind_the_api_key() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            api_key: Some(Secret::new("metrics-key")),
            ..ServeOptions::default()
        },
    )
    .await;
    let runsync = |body: Value| {
        ep.http
            .post(ep.url("/runsync"))
            .bearer_auth("metrics-key")
            .json(&body)
    };
    let runtime_error = json!({"input": {"workflow": harness::workflow("runtime_error")}});
    for (body, want) in [
        (job(0x010101, 2), "COMPLETED"),
        (runtime_error, "FAILED"),
        (job(0x020202, 2), "COMPLETED"),
        (json!({"input": {"workflow": 7}}), "FAILED"),
    ] {
        let (code, reply) = ep.send(runsync(body)).await;
        assert_eq!(
            (code, reply["status"].as_str()),
            (200, Some(want)),
            "{reply}"
        );
    }
    let scrape = |auth: bool| {
        let req = ep.http.get(ep.url("/metrics"));
        if auth {
            req.bearer_auth("metrics-key")
        } else {
            req
        }
    };
    assert_eq!(scrape(false).send().await.unwrap().status(), 401);
    let resp = scrape(true).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = harness::Scraped::parse(&resp.text().await.unwrap());
    let jobs = |outcome| m.count("comfy_worker_jobs_total", &[("outcome", outcome)]);
    assert_eq!(jobs("completed"), 2.0);
    assert_eq!(jobs("failed"), 2.0);
    assert_eq!(jobs("cancelled"), 0.0);
    assert_eq!(m.histogram_count("comfy_worker_job_duration_seconds"), 4);
    // Three prompts ran in ComfyUI (the bad input never got there), one after another.
    assert_eq!(m.histogram_count("comfy_worker_queue_wait_seconds"), 3);
    assert_eq!(m.histogram_count("comfy_worker_comfy_idle_gap_seconds"), 2);
    assert!(m.count("comfy_worker_comfy_busy_seconds_total", &[]) > 0.0);
    assert!(m.count("comfy_worker_result_bytes_total", &[]) > 0.0);
    if cfg!(target_os = "linux") {
        assert!(m.count("comfy_worker_resident_memory_bytes", &[]) > 1e6);
    }
    // The cloud path prefix serves the same registry.
    let prefixed = ep
        .http
        .get(ep.url("/v2/ep1/metrics"))
        .bearer_auth("metrics-key")
        .send()
        .await
        .unwrap();
    assert_eq!(prefixed.status(), 200);
    ep.stop().await;
}

#[tokio::test]
async fn the_cloud_path_prefix_reaches_the_same_jobs() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    let (code, reply) = ep.post("/v2/my-endpoint/run", job(0x770000, 2)).await;
    assert_eq!(code, 200);
    let id = reply["id"].as_str().unwrap().to_owned();
    let done = ep.final_status(&id).await;
    assert_images(&done);
    let (code, via_prefix) = ep.get(&format!("/v2/my-endpoint/status/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(via_prefix, done);
    let (code, health) = ep.get("/v2/other/health").await;
    assert_eq!(code, 200);
    assert_eq!(health["jobs"]["completed"], 1);
    let (code, stream) = ep.get(&format!("/v2/x/stream/{id}")).await;
    assert_eq!((code, stream["status"].as_str()), (200, Some("COMPLETED")));
    ep.stop().await;
}

#[tokio::test]
async fn health_counts_jobs_and_probes_comfyui() {
    let sim = simulator(2).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    let (_, idle) = ep.get("/health").await;
    assert_eq!(
        idle["jobs"],
        json!({"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0})
    );
    assert_eq!(idle["workers"], json!({"idle": 1, "running": 0}));
    assert_eq!(idle["comfyui"]["reachable"], true);
    assert_eq!(idle["comfyui"]["host"], sim.host());
    assert_eq!(idle["comfyui"]["version"], "0.3.64");

    ep.post("/runsync", job(0x880000, 1)).await;
    ep.post("/runsync", json!({"input": {}})).await;
    sim.pause_after_step(1);
    let running = ep.run(job(0x890000, 3)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let queued = ep.run(job(0x8a0000, 1)).await;
    let queued_too = ep.run(job(0x8b0000, 1)).await;
    let (_, busy) = ep.get("/health").await;
    assert_eq!(
        busy["jobs"],
        json!({"completed": 1, "failed": 1, "inProgress": 1, "inQueue": 2, "retried": 0})
    );
    assert_eq!(busy["workers"], json!({"idle": 0, "running": 1}));

    // Purging removes the queued jobs, not the running one.
    let (code, purged) = ep.post("/purge-queue", json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(purged, json!({"removed": 2, "status": "completed"}));
    assert_eq!(ep.get(&format!("/status/{queued}")).await.0, 404);
    assert_eq!(ep.get(&format!("/status/{queued_too}")).await.0, 404);
    sim.resume();
    assert_images(&ep.final_status(&running).await);
    let (_, after) = ep.get("/health").await;
    assert_eq!(after["jobs"]["completed"], 2);
    assert_eq!(after["jobs"]["inQueue"], 0);
    ep.stop().await;

    // An unreachable ComfyUI is reported, not an error.
    let host = sim.host();
    sim.shutdown().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(endpoint::serve(
        listener,
        harness::engine(&host),
        Webhooks::new(WebhookPolicy::default()),
        ServeOptions::default(),
        shutdown.clone(),
    ));
    let body: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["comfyui"]["reachable"], false, "{body}");
    shutdown.cancel();
    tokio::time::timeout(LIMIT, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A Server-Sent Events reader: `(event, data as JSON)` until the stream ends.
/// A job's `/events` stream, read event by event.
pub(crate) struct Events {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Events {
    async fn open(ep: &Endpoint, id: &str) -> Events {
        Events::at(&ep.http, &ep.url(&format!("/events/{id}"))).await
    }

    /// The stream at `url` (`…/events/{id}`).
    pub(crate) async fn at(http: &reqwest::Client, url: &str) -> Events {
        let response = tokio::time::timeout(LIMIT, http.get(url).send())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        Events {
            response,
            buffer: Vec::new(),
        }
    }

    pub(crate) async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(LIMIT, self.response.chunk())
                .await
                .expect("no event in time")
                .expect("the event stream failed");
            self.buffer.extend_from_slice(&chunk?);
        }
    }

    pub(crate) async fn rest(mut self) -> Vec<(String, Value)> {
        let mut all = Vec::new();
        while let Some(event) = self.next().await {
            all.push(event);
        }
        all
    }
}

#[tokio::test]
async fn events_stream_status_then_progress_then_the_final_status() {
    let sim = simulator(5).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    sim.pause_after_step(2);
    let first = ep.run(job(0x990000, 6)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let second = ep.run(job(0x9a0000, 6)).await;

    let mut running = Events::open(&ep, &first).await;
    let (name, body) = running.next().await.unwrap();
    assert_eq!(
        (name.as_str(), body["status"].as_str()),
        ("status", Some("IN_PROGRESS"))
    );
    let queued = Events::open(&ep, &second).await;
    sim.resume();

    let events = queued.rest().await;
    assert_eq!(events[0].0, "status");
    assert_eq!(events[0].1["status"], "IN_QUEUE");
    let statuses: Vec<&str> = events
        .iter()
        .filter(|(n, _)| n == "status")
        .map(|(_, b)| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]);
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "status");
    assert_images(last);
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, b)| b)
        .collect();
    let steps: Vec<u64> = progress
        .iter()
        .filter(|p| p["type"] == "progress")
        .map(|p| p["value"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "every step streamed");
    let overall: Vec<f64> = progress
        .iter()
        .map(|p| p["overall_percent"].as_f64().unwrap())
        .collect();
    assert!(overall.windows(2).all(|w| w[0] <= w[1]), "{overall:?}");
    assert_eq!(progress.last().unwrap()["type"], "finished");

    let rest = running.rest().await;
    assert_eq!(rest.last().unwrap().1["status"], "COMPLETED");

    // A late subscriber gets the final status and the end of the stream.
    let late = Events::open(&ep, &first).await.rest().await;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].0, "status");
    assert_images(&late[0].1);
    ep.stop().await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_the_router_serves() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    let (code, doc) = ep.get("/openapi.json").await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/",
        "/openapi.json",
        "/run",
        "/runsync",
        "/status/{id}",
        "/stream/{id}",
        "/cancel/{id}",
        "/health",
        "/purge-queue",
        "/events/{id}",
    ] {
        assert!(paths.contains_key(route), "{route} missing");
    }
    // Every documented operation exists: no route-level 404 or 405.
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let Ok(method) = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()) else {
                continue;
            };
            if method != reqwest::Method::GET && method != reqwest::Method::POST {
                continue;
            }
            let url = ep.url(&path.replace("{id}", "no-such-job"));
            let resp = ep
                .http
                .request(method.clone(), &url)
                .json(&json!({"input": {}}))
                .send()
                .await
                .unwrap();
            let code = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            assert_ne!(code, 405, "{method} {path}: {text}");
            assert!(!text.contains("no route"), "{method} {path}: {text}");
        }
    }
    ep.stop().await;
}

#[tokio::test]
async fn finished_jobs_are_dropped_after_their_ttl_or_beyond_max_jobs() {
    let sim = simulator(1).await;
    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            job_ttl: Duration::ZERO,
            ..ServeOptions::default()
        },
    )
    .await;
    let (_, done) = ep.post("/runsync", job(0xaa0000, 1)).await;
    assert_images(&done);
    let id = done["id"].as_str().unwrap();
    // Retention is applied on every request: a finished job past its ttl is gone.
    assert_eq!(ep.get(&format!("/status/{id}")).await.0, 404);
    // A job's own policy.ttl overrides the endpoint's.
    let mut kept = job(0xab0000, 1);
    kept["policy"] = json!({"ttl": 600_000});
    let (_, done) = ep.post("/runsync", kept).await;
    let kept_id = done["id"].as_str().unwrap();
    assert_eq!(ep.status(kept_id).await["status"], "COMPLETED");
    ep.stop().await;

    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            max_jobs: 2,
            ..ServeOptions::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, body) = ep.post("/runsync", json!({"input": {}})).await;
        assert_eq!(body["status"], "FAILED");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        ep.get(&format!("/status/{}", ids[0])).await.0,
        404,
        "the oldest went"
    );
    ep.status(&ids[1]).await;
    ep.status(&ids[2]).await;
    // Queued and running jobs are never dropped: with both places taken, new jobs wait outside.
    sim.pause_after_step(1);
    let running = ep.run(job(0xac0000, 2)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let queued = ep.run(job(0xad0000, 1)).await;
    let (code, body) = ep.post("/run", job(0xae0000, 1)).await;
    assert_eq!(code, 429, "{body}");
    sim.resume();
    assert_images(&ep.final_status(&running).await);
    assert_images(&ep.final_status(&queued).await);
    ep.stop().await;
}

#[tokio::test]
async fn shutdown_ends_event_streams_and_lets_the_running_job_finish() {
    let sim = simulator(5).await;
    let ep = Endpoint::start(&sim, ServeOptions::default()).await;
    sim.pause_after_step(2);
    let id = ep.run(job(0xbb0000, 4)).await;
    tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
    let events = Events::open(&ep, &id).await;
    ep.shutdown.cancel();
    // The stream ends without a final status; the server waits for the job.
    let seen = events.rest().await;
    assert_eq!(seen[0].1["status"], "IN_PROGRESS");
    assert!(
        seen.iter()
            .all(|(name, b)| name != "status" || !is_final(b)),
        "{seen:?}"
    );
    sim.resume();
    ep.stop().await;
    let steps = sim.step_marks().iter().filter(|m| m.node == "2").count();
    assert_eq!(steps, 4, "the running job finished");
}

/// Reads the binary's stderr until it names its address.
fn wait_for_address(stderr: std::process::ChildStderr) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("local endpoint on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                let _ = tx.send(addr.parse::<SocketAddr>().ok());
            }
        }
    });
    rx.recv_timeout(LIMIT)
        .expect("the binary never named its address")
        .expect("an address")
}

#[tokio::test]
async fn the_binary_serves_with_the_sdk_flags_and_stops_on_sigterm() {
    let mut child = Command::new(crate::cli::bin())
        .args([
            "--rp_serve_api",
            "--rp_api_port",
            "0",
            "--simulate",
            "--sim-step-ms",
            "1",
        ])
        .env("RUST_LOG", "comfy_worker=info")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("SERVE_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || wait_for_address(stderr))
        .await
        .unwrap();
    assert!(addr.ip().is_loopback(), "loopback by default: {addr}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let body: Value = http
        .post(format!("http://{addr}/runsync"))
        .json(&harness::test_input())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "COMPLETED", "{body}");
    let image = body["output"]["images"][0]["data"].as_str().unwrap();
    assert_eq!(png_size(image), (1024, 1024));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(LIMIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("the binary did not stop on SIGTERM")
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The files in the endpoint's result folder under `base` (`comfy-worker-results-*`).
fn stored_results(base: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("comfy-worker-results-")
        })
        .flat_map(|folder| std::fs::read_dir(folder.path()).unwrap().flatten())
        .map(|e| e.path())
        .collect()
}

#[tokio::test]
async fn large_results_are_kept_in_files_and_served_as_they_were() {
    let sim = simulator(1).await;
    let base = tempfile::tempdir().unwrap();
    let ep = Endpoint::start(
        &sim,
        ServeOptions {
            max_jobs: 1,
            results: comfy_worker::endpoint::ResultStorage {
                dir: Some(base.path().to_owned()),
                memory_bytes: 2_000,
            },
            ..ServeOptions::default()
        },
    )
    .await;
    let (_, first) = ep.post("/runsync", job(0xba0000, 1)).await;
    assert_images(&first);
    let id = first["id"].as_str().unwrap().to_owned();
    // The body (two images' base64) moves to a file once the job is final.
    let stored = tokio::time::timeout(LIMIT, async {
        loop {
            let files = stored_results(base.path());
            if !files.is_empty() {
                return files;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the result is stored in a file");
    assert_eq!(stored.len(), 1, "{stored:?}");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&stored[0]).unwrap()).unwrap();
    assert_eq!(on_disk, first);
    // Every way of reading it gives the same body, now read from the file.
    assert_eq!(ep.status(&id).await, first);
    let (code, stream) = ep.get(&format!("/stream/{id}")).await;
    assert_eq!(code, 200, "{stream}");
    assert_eq!(stream["stream"][0]["output"], first["output"]);
    let events = Events::at(&ep.http, &ep.url(&format!("/events/{id}"))).await;
    let seen = events.rest().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0], ("status".to_owned(), first.clone()));
    // A small result (a failure) stays in memory.
    let (_, failed) = ep.post("/runsync", json!({"input": {}})).await;
    assert_eq!(failed["status"], "FAILED");
    // With max_jobs 1, the first job went when the second came: its file with it.
    assert_eq!(ep.get(&format!("/status/{id}")).await.0, 404);
    assert!(!stored[0].exists(), "the file goes with the job");
    assert!(stored_results(base.path()).is_empty());
    ep.stop().await;
}
