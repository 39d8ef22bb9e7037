//! `serve --workers external` as a platform, driven in process by a hand-written worker that
//! speaks RunPod's worker protocol: jobs handed out once, progress and results recorded, and
//! the platform's duties (cancels and timeouts told through job-stop, silent workers' jobs
//! failed, repeated or stray posts ignored, the key required).

use std::time::Duration;

use comfy_worker::endpoint::{self, ServeOptions, WorkerMode};
use comfy_worker::secret::Secret;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::harness::{self, LIMIT};

struct Platform {
    base: String,
    http: reqwest::Client,
    key: Option<String>,
    shutdown: CancellationToken,
}

impl Platform {
    async fn start(options: ServeOptions) -> Platform {
        harness::init_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let key = options.api_key.as_ref().map(|k| k.expose().to_owned());
        tokio::spawn(endpoint::serve(
            listener,
            // Never asked: the workers have the ComfyUI.
            harness::engine("127.0.0.1:1"),
            Webhooks::new(WebhookPolicy {
                allow_private: true,
                ..WebhookPolicy::default()
            }),
            ServeOptions {
                workers: WorkerMode::External,
                ..options
            },
            shutdown.clone(),
        ));
        Platform {
            base,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            key,
            shutdown,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            // As the worker sends it: the raw key.
            Some(k) => r.header("authorization", k),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = tokio::time::timeout(LIMIT, r.send())
            .await
            .unwrap()
            .unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn submit(&self, body: Value) -> String {
        let (code, reply) = self
            .send(self.request(reqwest::Method::POST, "/run").json(&body))
            .await;
        assert_eq!(code, 200, "{reply}");
        reply["id"].as_str().unwrap().to_owned()
    }

    async fn status(&self, id: &str) -> Value {
        self.send(self.request(reqwest::Method::GET, &format!("/status/{id}")))
            .await
            .1
    }

    async fn take(&self, worker: &str) -> (u16, Value) {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/worker/job-take/{worker}?job_in_progress=0"),
        ))
        .await
    }

    async fn stops(&self, worker: &str) -> (u16, Value) {
        self.send(self.request(reqwest::Method::GET, &format!("/worker/job-stop/{worker}")))
            .await
    }

    async fn post(&self, worker: &str, id: &str, body: Value) -> u16 {
        // As the RunPod SDK sends it.
        self.send(
            self.request(
                reqwest::Method::POST,
                &format!("/worker/job-done/{worker}/{id}?isStream=false"),
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string()),
        )
        .await
        .0
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        let wait = async {
            loop {
                let body = self.status(id).await;
                if body["status"] == status {
                    return body;
                }
                // The long poll of job-stop is the event this waits on elsewhere; here the
                // sweep runs every few ms, so a short pause keeps the loop cheap.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .expect("status never came")
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn input(n: u64) -> Value {
    json!({"input": {"workflow": harness::workflow("ok"), "n": n}})
}

#[tokio::test]
async fn jobs_are_handed_out_once_with_progress_and_results_recorded() {
    let p = Platform::start(ServeOptions::default()).await;
    let first = p.submit(input(1)).await;
    let second = p.submit(json!({"input": {"workflow": {}}, "s3Config": {"bucketName": "b"}, "progress_webhook": "http://127.0.0.1:9/p"})).await;
    let (code, job) = p.take("w1").await;
    assert_eq!(code, 200);
    assert_eq!(job["id"], first.as_str());
    assert_eq!(job["input"]["n"], 1);
    let (code, job2) = p.take("w2").await;
    assert_eq!(code, 200);
    assert_eq!(job2["id"], second.as_str());
    assert_eq!(job2["s3Config"]["bucketName"], "b");
    assert_eq!(
        job2["progress_webhook"], "http://127.0.0.1:9/p",
        "the worker delivers the progress webhook, as on RunPod"
    );
    let status = p.status(&first).await;
    assert_eq!(
        (status["status"].as_str(), status["workerId"].as_str()),
        (Some("IN_PROGRESS"), Some("w1"))
    );

    let progress = json!({"type": "progress", "value": 3, "max": 10, "overall_percent": 30.0});
    assert_eq!(
        p.post(
            "w1",
            &first,
            json!({"status": "IN_PROGRESS", "output": progress})
        )
        .await,
        200
    );
    assert_eq!(p.status(&first).await["output"], progress);
    // Another worker's post for w1's job changes nothing.
    assert_eq!(
        p.post("w2", &first, json!({"output": {"images": []}}))
            .await,
        200
    );
    assert_eq!(p.status(&first).await["status"], "IN_PROGRESS");

    assert_eq!(
        p.post(
            "w1",
            &first,
            json!({"output": {"images": [{"filename": "a.png"}]}})
        )
        .await,
        200
    );
    let done = p.status(&first).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["output"]["images"][0]["filename"], "a.png");
    // A repeat of the final post (an unanswered post sent again) is ignored.
    assert_eq!(p.post("w1", &first, json!({"error": "late"})).await, 200);
    assert_eq!(p.status(&first).await["status"], "COMPLETED");

    let failed = json!({"error": "Workflow validation failed: x", "output": {"details": ["x"]}});
    assert_eq!(p.post("w2", &second, failed).await, 200);
    let body = p.status(&second).await;
    assert_eq!(body["status"], "FAILED");
    assert_eq!(body["error"], "Workflow validation failed: x");
    // A post for a job the endpoint never had, and a body that is not JSON.
    assert_eq!(p.post("w1", "nope-l1", json!({"output": 1})).await, 200);
    let (code, _) = p
        .send(
            p.request(reqwest::Method::POST, "/worker/job-done/w1/x")
                .body("{not json"),
        )
        .await;
    assert_eq!(code, 400);
    // Nothing left: a take waits, then answers 204.
    let (code, _) = p.take("w1").await;
    assert_eq!(code, 204);
}

#[tokio::test]
async fn cancels_and_timeouts_reach_the_worker_through_job_stop() {
    let p = Platform::start(ServeOptions::default()).await;
    let cancelled = p.submit(input(1)).await;
    let timed = p
        .submit(json!({"input": {"workflow": {}}, "policy": {"executionTimeout": 200}}))
        .await;
    assert_eq!(p.take("w1").await.1["id"], cancelled.as_str());
    assert_eq!(p.take("w2").await.1["id"], timed.as_str());

    // The worker's stop channel, long-polling while the client cancels.
    let stops = tokio::spawn({
        let (http, url) = (p.http.clone(), format!("{}/worker/job-stop/w1", p.base));
        async move {
            let resp = http.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    });
    let (code, reply) = p
        .send(p.request(reqwest::Method::POST, &format!("/cancel/{cancelled}")))
        .await;
    assert_eq!((code, reply["status"].as_str()), (200, Some("CANCELLED")));
    let (code, stop) = stops.await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(stop, json!({"jobsToStop": [cancelled]}));
    // The worker posts nothing for a stopped job; a late result changes nothing.
    assert_eq!(p.post("w1", &cancelled, json!({"output": {}})).await, 200);
    assert_eq!(p.status(&cancelled).await["status"], "CANCELLED");

    // The execution timeout is the platform's: the job times out, its worker is told.
    let (code, stop) = p.stops("w2").await;
    assert_eq!(code, 200);
    assert_eq!(stop, json!({"jobsToStop": [timed]}));
    let body = p.status(&timed).await;
    assert_eq!(body["status"], "TIMED_OUT", "{body}");
}

#[tokio::test]
async fn a_job_whose_worker_goes_silent_fails() {
    let p = Platform::start(ServeOptions {
        worker_lost_after: Duration::from_millis(300),
        ..ServeOptions::default()
    })
    .await;
    let id = p.submit(input(1)).await;
    assert_eq!(p.take("gone").await.1["id"], id.as_str());
    let body = p.wait_status(&id, "FAILED").await;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("The worker 'gone' that took the job stopped responding"),
        "{body}"
    );
}

#[tokio::test]
async fn a_pinging_worker_keeps_its_job() {
    let p = Platform::start(ServeOptions {
        worker_lost_after: Duration::from_millis(300),
        ..ServeOptions::default()
    })
    .await;
    let id = p.submit(input(1)).await;
    assert_eq!(p.take("alive").await.1["id"], id.as_str());
    // Pings for three times the silence bound, each well within it.
    for _ in 0..9 {
        let (code, _) = p
            .send(p.request(reqwest::Method::GET, "/worker/ping/alive?job_id=x"))
            .await;
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.status(&id).await["status"], "IN_PROGRESS");
}

#[tokio::test]
async fn the_worker_routes_need_the_key_and_exist_only_for_external_workers() {
    let p = Platform::start(ServeOptions {
        api_key: Some(Secret::new("platform-key")),
        ..ServeOptions::default()
    })
    .await;
    let bare = p
        .http
        .get(format!("{}/worker/job-take/w1", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 401);
    let id = p.submit(input(1)).await;
    assert_eq!(p.take("w1").await.1["id"], id.as_str());
    // The Comfy API v2 needs serve's own runner: refused clearly, nothing queued for a worker.
    let (code, body) = p
        .send(
            p.request(reqwest::Method::POST, "/api/v2/jobs")
                .header("x-api-key", "platform-key")
                .json(&json!({"workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}}})),
        )
        .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--workers internal"),
        "{body}"
    );
    let (_, health) = p.send(p.request(reqwest::Method::GET, "/health")).await;
    assert_eq!(health["jobs"]["inQueue"], 0, "{health}");

    let sim = crate::worker_process::simulator(1).await;
    let ep = crate::serve::Endpoint::start(&sim, ServeOptions::default()).await;
    let (code, _) = ep.get("/worker/job-take/w1").await;
    assert_eq!(code, 404, "internal mode has no worker routes");
}
