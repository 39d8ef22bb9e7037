//! Progress webhooks through the serverless mode (the real binary, the fake platform, the
//! simulator), received by a small in-process webhook receiver; and `send_final`'s retries.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::Router;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fake_platform::{FakePlatform, PlatformOptions, PostKind};
use crate::harness::{self, LIMIT};
use crate::worker_process::{final_of, job_input, simulator, WorkerProcess};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    /// The request path, e.g. `/hook/job-a`.
    path: String,
    /// The parsed body (`null` when it is not JSON).
    body: Value,
    content_type: Option<String>,
    /// The status answered.
    status: u16,
    /// When the request arrived.
    at: Instant,
}

/// How the receiver behaves.
#[derive(Debug, Clone, Copy, Default)]
struct ReceiverOptions {
    /// Answer 500 to this many requests first.
    fail_first: usize,
    /// Answer 500 to this many final events (`completed` or `error`) first.
    fail_finals: usize,
    /// Time taken to answer each request.
    delay: Duration,
}

struct Shared {
    opts: ReceiverOptions,
    state: Mutex<(Vec<Hit>, ReceiverOptions)>,
    changed: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, (Vec<Hit>, ReceiverOptions)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A webhook receiver on `127.0.0.1:0` recording every request in order; stops when dropped.
struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(opts: ReceiverOptions) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new((Vec::new(), opts)),
            changed: watch::channel(0).0,
        });
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await;
        });
        Receiver { shared, addr, stop }
    }

    /// The URL of `path` on this receiver.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.shared
            .lock()
            .0
            .iter()
            .filter(|h| h.path == path)
            .cloned()
            .collect()
    }

    /// Waits (within [`LIMIT`]) until the hits on `path` satisfy `pred`; returns them.
    async fn wait(&self, path: &str, pred: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let mut changed = self.shared.changed.subscribe();
        let wait = async {
            loop {
                let hits = self.hits(path);
                if pred(&hits) {
                    return hits;
                }
                changed.changed().await.expect("receiver running");
            }
        };
        tokio::time::timeout(LIMIT, wait)
            .await
            .unwrap_or_else(|_| panic!("receiver: timed out on {path}: {:#?}", self.hits(path)))
    }

    /// Waits for an accepted final event on `path`; returns every hit there.
    async fn wait_final(&self, path: &str) -> Vec<Hit> {
        self.wait(path, |hits| {
            hits.iter().any(|h| is_final(h) && h.status == 200)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn is_final(hit: &Hit) -> bool {
    matches!(hit.body["status"].as_str(), Some("completed" | "error"))
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let status = {
        let mut st = shared.lock();
        let left = &mut st.1;
        let final_event = matches!(body["status"].as_str(), Some("completed" | "error"));
        if left.fail_first > 0 {
            left.fail_first -= 1;
            StatusCode::INTERNAL_SERVER_ERROR
        } else if final_event && left.fail_finals > 0 {
            left.fail_finals -= 1;
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    };
    if !shared.opts.delay.is_zero() {
        tokio::time::sleep(shared.opts.delay).await;
    }
    let hit = Hit {
        path: uri.path().to_owned(),
        body,
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        status: status.as_u16(),
        at,
    };
    let n = {
        let mut st = shared.lock();
        st.0.push(hit);
        st.0.len()
    };
    shared.changed.send_replace(n);
    status
}

/// The worker's environment for webhook tests: the receiver is on loopback.
const ALLOW: (&str, &str) = ("ALLOW_PRIVATE_WEBHOOKS", "true");

/// The event bodies of `hits` that were accepted, in order.
fn accepted(hits: &[Hit]) -> Vec<Value> {
    hits.iter()
        .filter(|h| h.status == 200)
        .map(|h| h.body.clone())
        .collect()
}

/// Checks the shape every event shares and that it belongs to `job`.
fn assert_event(event: &Value, job: &str) {
    assert_eq!(event["taskId"], job, "{event}");
    let progress = &event["progress"];
    for key in ["percentage", "currentValue", "maxValue"] {
        assert!(progress[key].is_number(), "{key} in {event}");
    }
    assert!(progress["currentStep"].is_string(), "{event}");
    let ts = event["timestamp"].as_str().expect("timestamp");
    assert!(
        ts.len() == "2025-01-31T12:00:00.123Z".len() && ts.ends_with('Z'),
        "{ts}"
    );
    humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("{ts}: {e}"));
}

/// The distinct sampler steps the events reported, in order.
fn sampler_steps(events: &[Value]) -> Vec<u64> {
    let mut steps: Vec<u64> = events
        .iter()
        .filter(|e| e["status"] == "in-progress" && e["progress"]["currentStep"] == "Sampling")
        .filter_map(|e| e["progress"]["currentValue"].as_u64())
        .filter(|v| *v > 0)
        .collect();
    steps.dedup();
    steps
}

/// Checks a completed job's events: in order, rising, every step, one `completed` at the end
/// whose `result` is the job's output.
fn assert_completed_stream(events: &[Value], job: &str, steps: u64, output: &Value) {
    assert!(events.len() > steps as usize, "{events:#?}");
    let mut last_pct = -1.0;
    let mut last_ts = String::new();
    for e in events {
        assert_event(e, job);
        let pct = e["progress"]["percentage"].as_f64().unwrap();
        assert!(pct >= last_pct, "{job}: percentage went back: {events:#?}");
        last_pct = pct;
        let ts = e["timestamp"].as_str().unwrap().to_owned();
        assert!(ts >= last_ts, "{job}: timestamps out of order");
        last_ts = ts;
    }
    let (done, progress) = events.split_last().unwrap();
    assert!(progress.iter().all(|e| e["status"] == "in-progress"));
    assert!(progress.iter().all(|e| e.get("result").is_none()));
    assert_eq!(done["status"], "completed");
    assert_eq!(done["progress"]["percentage"], 100);
    assert_eq!(&done["result"], output, "the result is the job's output");
    assert!(done.get("error").is_none());
    assert_eq!(sampler_steps(events), (1..=steps).collect::<Vec<_>>());
}

#[tokio::test]
async fn progress_events_arrive_in_order_and_end_with_the_result() {
    let sim = simulator(20).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let receiver = Receiver::start(ReceiverOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[ALLOW]);

    // Inside `input`, and top-level on the job (the platform passes unknown keys through).
    let mut input = job_input(0x200001, 8);
    input["progress_webhook"] = json!(receiver.url("/hook/in-input"));
    platform.push_job("in-input", input);
    platform.push_raw_job(json!({
        "id": "top-level",
        "input": job_input(0x200002, 5),
        "progress_webhook": receiver.url("/hook/top-level?token=abc"),
    }));

    for (job, steps) in [("in-input", 8), ("top-level", 5)] {
        let body = final_of(&platform, job).await;
        assert_eq!(body["output"]["images"].as_array().unwrap().len(), 2);
        let hits = receiver.wait_final(&format!("/hook/{job}")).await;
        assert!(hits.iter().all(|h| h.status == 200));
        assert!(hits
            .iter()
            .all(|h| h.content_type.as_deref() == Some("application/json")));
        assert_completed_stream(&accepted(&hits), job, steps, &body["output"]);
    }
}

#[tokio::test]
async fn a_failing_job_ends_with_an_error_event() {
    let sim = simulator(5).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let receiver = Receiver::start(ReceiverOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &[ALLOW]);
    platform.push_job(
        "fails",
        json!({
            "workflow": harness::workflow("runtime_error"),
            "progress_webhook": receiver.url("/hook/fails"),
        }),
    );
    let body = final_of(&platform, "fails").await;
    let message = body["error"].as_str().unwrap_or_else(|| panic!("{body}"));
    let events = accepted(&receiver.wait_final("/hook/fails").await);
    for e in &events {
        assert_event(e, "fails");
    }
    let (failed, progress) = events.split_last().unwrap();
    assert!(progress.iter().all(|e| e["status"] == "in-progress"));
    assert_eq!(failed["status"], "error", "{failed}");
    assert_eq!(failed["error"]["message"], message);
    let details = body["output"]["details"].clone();
    if details.is_array() {
        assert_eq!(failed["error"]["details"], details);
    }
    assert!(failed.get("result").is_none());
    assert!(failed["progress"]["percentage"].as_f64().unwrap() < 100.0);
}

#[tokio::test]
async fn a_receiver_failing_twice_still_gets_the_final_event() {
    let sim = simulator(5).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let receiver = Receiver::start(ReceiverOptions {
        fail_finals: 2,
        ..ReceiverOptions::default()
    })
    .await;
    let _worker = WorkerProcess::start(&platform, &sim, &[ALLOW, ("WEBHOOK_RETRY_DELAY_MS", "20")]);
    let mut input = job_input(0x200003, 3);
    input["progress_webhook"] = json!(receiver.url("/hook/retried"));
    platform.push_job("retried", input);
    let body = final_of(&platform, "retried").await;
    let hits = receiver.wait_final("/hook/retried").await;
    let finals: Vec<&Hit> = hits.iter().filter(|h| is_final(h)).collect();
    assert_eq!(
        finals.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500, 200],
        "two refusals, then the retry that landed"
    );
    assert!(
        finals.iter().all(|h| h.body == finals[0].body),
        "the same event each time"
    );
    assert_eq!(finals[2].body["result"], body["output"]);
    assert!(finals[1].at.duration_since(finals[0].at) >= Duration::from_millis(20));
}

#[tokio::test]
async fn a_refused_webhook_is_logged_and_the_job_still_completes() {
    let sim = simulator(5).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let worker = WorkerProcess::start(&platform, &sim, &[]);
    let mut input = job_input(0x200004, 3);
    input["progress_webhook"] = json!("http://169.254.169.254/latest");
    platform.push_job("metadata", input);
    let body = final_of(&platform, "metadata").await;
    assert_eq!(
        body["output"]["images"].as_array().unwrap().len(),
        2,
        "{body}"
    );
    assert_eq!(platform.status("metadata")["status"], "COMPLETED");
    let log = worker.log();
    assert!(
        log.contains(
            r#"webhook URL "http://169.254.169.254/latest" refused: 169.254.169.254 is a link-local address (the cloud metadata service) (set ALLOW_PRIVATE_WEBHOOKS=true to allow it)"#
        ),
        "{log}"
    );
    assert!(log.contains("progress webhook ignored"), "{log}");
}

#[tokio::test]
async fn a_slow_receiver_does_not_slow_the_job() {
    let delay = Duration::from_millis(300);
    let sim = simulator(20).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let receiver = Receiver::start(ReceiverOptions {
        delay,
        ..ReceiverOptions::default()
    })
    .await;
    let _worker = WorkerProcess::start(&platform, &sim, &[ALLOW]);
    let mut input = job_input(0x200005, 10);
    input["progress_webhook"] = json!(receiver.url("/hook/slow"));
    platform.push_job("slow", input);
    let body = final_of(&platform, "slow").await;
    let result_at = platform
        .posts("slow")
        .iter()
        .find(|p| p.kind == PostKind::Final && p.accepted)
        .unwrap()
        .at;
    let hits = receiver.wait_final("/hook/slow").await;
    let events = accepted(&hits);
    let done_at = hits.last().unwrap().at;
    assert!(
        done_at > result_at,
        "the result was posted while the webhook events were still being delivered"
    );
    // Delivered one at a time, each taking `delay`: posting them in line would have held the
    // result back by that much.
    let delivery = delay * events.len() as u32;
    let execution =
        Duration::from_millis(platform.status("slow")["executionTime"].as_u64().unwrap());
    assert!(
        execution * 2 < delivery,
        "the job took {execution:?}; delivering its {} events took at least {delivery:?}",
        events.len()
    );
    assert_completed_stream(&events, "slow", 10, &body["output"]);
}

#[tokio::test]
async fn send_final_retries_until_delivered() {
    let receiver = Receiver::start(ReceiverOptions {
        fail_first: 2,
        ..ReceiverOptions::default()
    })
    .await;
    let hooks = Webhooks::new(WebhookPolicy {
        allow_private: true,
        attempts: 3,
        retry_delay: Duration::from_millis(10),
        ..WebhookPolicy::default()
    });
    let url = hooks.validate(&receiver.url("/final")).await.unwrap();
    let body = json!({"id": "job-x", "status": "COMPLETED", "output": {"images": []}});
    hooks.send_final(url, body.clone());
    let hits = receiver
        .wait("/final", |hits| hits.iter().any(|h| h.status == 200))
        .await;
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    assert!(hits.iter().all(|h| h.body == body));
}

// --- The local endpoint (`serve`): the cloud's `webhook` plus progress webhooks. ---

fn loopback_policy() -> WebhookPolicy {
    WebhookPolicy {
        allow_private: true,
        retry_delay: Duration::from_millis(20),
        ..WebhookPolicy::default()
    }
}

#[tokio::test]
async fn serve_sends_the_final_status_and_every_progress_event() {
    let sim = simulator(10).await;
    let receiver = Receiver::start(ReceiverOptions::default()).await;
    let endpoint = crate::serve::Endpoint::start_with(
        &sim,
        comfy_worker::endpoint::ServeOptions::default(),
        Webhooks::new(loopback_policy()),
    )
    .await;
    let mut body = crate::serve::job(31, 6);
    body["webhook"] = json!(receiver.url("/final"));
    body["progress_webhook"] = json!(receiver.url("/progress"));
    let id = endpoint.run(body).await;
    let status = endpoint.final_status(&id).await;
    assert_eq!(status["status"], "COMPLETED", "{status}");

    let finals = receiver.wait("/final", |hits| !hits.is_empty()).await;
    assert_eq!(finals.len(), 1);
    assert_eq!(
        finals[0].body, status,
        "the webhook body is the final /status body"
    );

    let hits = receiver.wait_final("/progress").await;
    let events = accepted(&hits);
    assert_completed_stream(&events, &id, 6, &status["output"]);
}

#[tokio::test]
async fn serve_refuses_webhooks_to_private_addresses_with_a_clear_error() {
    let sim = simulator(1).await;
    let endpoint =
        crate::serve::Endpoint::start(&sim, comfy_worker::endpoint::ServeOptions::default()).await;
    for (field, url, why) in [
        ("webhook", "http://127.0.0.1:9/hook", "loopback"),
        (
            "progress_webhook",
            "http://169.254.169.254/latest",
            "metadata",
        ),
        ("webhook", "ftp://example.com/x", "http"),
    ] {
        let mut body = crate::serve::job(32, 1);
        body[field] = json!(url);
        let (code, reply) = endpoint.post("/run", body).await;
        assert_eq!(code, 400, "{field} {url}: {reply}");
        let err = reply["error"].as_str().unwrap();
        assert!(err.contains(url) && err.contains(why), "{err}");
    }
    assert!(sim.prompts().is_empty(), "nothing was queued");
}

/// A job with `input.previews: true` gets its live previews on its progress webhook (the event
/// after the last preview is held back by pausing the sampler, so none can supersede it);
/// a job that did not ask gets none.
#[tokio::test]
async fn progress_webhooks_carry_previews_only_when_asked() {
    let sim = simulator(1).await;
    let receiver = Receiver::start(ReceiverOptions::default()).await;
    let endpoint = crate::serve::Endpoint::start_with(
        &sim,
        comfy_worker::endpoint::ServeOptions::default(),
        Webhooks::new(loopback_policy()),
    )
    .await;
    let job = |previews: bool, path: &str| {
        let mut body = crate::serve::job(0x40_80_c0, 6);
        body["input"]["workflow"]["2"]["inputs"]["send_preview"] = json!(true);
        body["input"]["previews"] = json!(previews);
        body["progress_webhook"] = json!(receiver.url(path));
        body
    };
    sim.pause_after_step(3);
    let id = endpoint.run(job(true, "/asked")).await;
    let hits = receiver
        .wait("/asked", |hits| {
            hits.iter().any(|h| h.body.get("preview").is_some())
        })
        .await;
    let event = &hits
        .iter()
        .find(|h| h.body.get("preview").is_some())
        .unwrap()
        .body;
    assert_event(event, &id);
    assert_eq!(event["status"], "in-progress", "{event}");
    assert_eq!(event["preview"]["mime"], "image/jpeg", "{event}");
    assert_eq!(event["preview"]["node"], "2", "{event}");
    assert!(event["preview"]["data"]
        .as_str()
        .unwrap()
        .starts_with("/9j/"));
    sim.resume();
    assert_eq!(endpoint.final_status(&id).await["status"], "COMPLETED");

    let id = endpoint.run(job(false, "/plain")).await;
    assert_eq!(endpoint.final_status(&id).await["status"], "COMPLETED");
    let hits = receiver.wait_final("/plain").await;
    assert!(hits.len() > 2, "progress events were sent");
    assert!(hits.iter().all(|h| h.body.get("preview").is_none()));
}
