//! The web page of `comfy-worker serve` (`src/api/page.html`), driven in headless Chromium over
//! the DevTools protocol ([`super::cdp`]).
//!
//! TEMPORARY: `comfy-worker serve` is not merged yet, so the page is served here by
//! [`FakeEndpoint`], a scripted stand-in for its API (`/run`, `/status/{id}`, `/events/{id}`,
//! `/cancel/{id}`, optional bearer key). Once the real server lands, point these tests at it
//! (with the simulator's `SlowSteps` example) and delete the fake.
//!
//! The tests never sleep to sample the page: each observation is a `Runtime.evaluate` of a
//! promise that resolves in the page when the DOM changes ([`Page::wait_for`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use super::cdp::{Browser, Event, Page};

/// The page under test, exactly as the server embeds it.
const PAGE_HTML: &str = include_str!("../../src/api/page.html");
/// The key the authenticated fake expects.
const KEY: &str = "page-test-key";
/// Bound for one wait on the page.
const WAIT: Duration = Duration::from_secs(15);
/// The ids tests and users rely on.
const IDS: &[&str] = &[
    "input",
    "submit",
    "cancel",
    "status",
    "overall-bar",
    "node-bar",
    "node-label",
    "eta",
    "images",
    "error",
    "load-example",
    "api-key",
];

/// The page's embedded example, as the test expects it to be submitted.
fn example_input() -> Value {
    json!({"input": {"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 16744448}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": 20, "seconds_per_step": 0.1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "page"}}
    }}})
}

// ------------------------------------------------------------------------------------------------
// TEMPORARY fake endpoint (replace with `comfy-worker serve` when it lands).
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Progress through a 20-step node, then COMPLETED with one PNG.
    Image,
    /// A little progress, then FAILED with a multi-line error and `output.details`.
    Failure,
}

#[derive(Clone, Copy)]
struct FakeOptions {
    api_key: Option<&'static str>,
    /// Serve `/events/{id}`; without it that route answers 404 and the page must poll `/status`.
    events: bool,
    outcome: Outcome,
}

/// One request the fake answered.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    status: StatusCode,
}

struct Job {
    started: Instant,
    cancelled: bool,
}

struct Fake {
    options: FakeOptions,
    png: Vec<u8>,
    jobs: Mutex<HashMap<String, Job>>,
    runs: Mutex<Vec<Value>>,
    seen: Mutex<Vec<Seen>>,
}

struct FakeEndpoint {
    url: String,
    fake: Arc<Fake>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const TICK: Duration = Duration::from_millis(200);

/// What the scripted job reports at each moment: `(due after /run, snapshot)`, then the final
/// status at [`Fake::end`]. The job is IN_QUEUE until the first snapshot.
fn script(outcome: Outcome) -> Vec<(Duration, Value)> {
    // (node id, class type, human step name)
    type Node = (&'static str, &'static str, &'static str);
    const EMPTY: Node = ("1", "EmptyImage", "EmptyImage");
    const SLOW: Node = ("2", "SlowSteps", "Sampling");
    const SAVE: Node = ("3", "SaveImage", "Saving image");
    const BROKEN: Node = ("1", "Broken", "Broken");
    // (type, value, max, node, overall %, nodes done, eta, elapsed)
    type Row = (&'static str, u32, u32, Node, f64, u32, Option<f64>, f64);
    let rows: &[Row] = match outcome {
        Outcome::Image => &[
            ("executing", 0, 1, EMPTY, 0.0, 0, None, 0.01),
            ("executed", 1, 1, EMPTY, 4.3, 1, None, 0.02),
            ("progress", 5, 20, SLOW, 26.1, 1, Some(1.5), 0.52),
            ("progress", 10, 20, SLOW, 47.8, 1, Some(1.0), 1.02),
            ("progress", 15, 20, SLOW, 69.6, 1, Some(0.5), 1.52),
            ("progress", 20, 20, SLOW, 91.3, 1, Some(0.0), 2.02),
            ("executing", 0, 1, SAVE, 95.7, 2, None, 2.03),
            ("finished", 1, 1, SAVE, 100.0, 3, None, 2.05),
        ],
        Outcome::Failure => &[("executing", 0, 1, BROKEN, 0.0, 0, None, 0.01)],
    };
    rows.iter()
        .enumerate()
        .map(|(i, &(kind, value, max, (node, node_type, step), overall, done, eta, elapsed))| {
            let snapshot = json!({
                "type": kind, "value": value, "max": max,
                "percent": (1000.0 * f64::from(value) / f64::from(max)).round() / 10.0,
                "node": node, "node_type": node_type, "step": step,
                "overall_percent": overall, "nodes_done": done, "nodes_total": 3, "nodes_cached": 0,
                "eta_seconds": eta, "elapsed_seconds": elapsed,
                "prompt_id": "11111111-2222-3333-4444-555555555555",
                "queue_remaining": 1, "queue_position": null
            });
            (TICK * (i as u32 + 1), snapshot)
        })
        .collect()
}

impl Fake {
    fn end(&self) -> Duration {
        TICK * (script(self.options.outcome).len() as u32 + 1)
    }

    /// The `/status` body of job `id` at `at` after its `/run`.
    fn status_at(&self, id: &str, at: Duration, cancelled: bool) -> Value {
        let script = script(self.options.outcome);
        let first = script[0].0;
        let ms = |d: Duration| d.as_millis() as u64;
        if cancelled {
            return json!({"id": id, "status": "CANCELLED", "delayTime": ms(first), "executionTime": 0});
        }
        if at < first {
            return json!({"id": id, "status": "IN_QUEUE", "delayTime": 0, "executionTime": 0});
        }
        let running = ms(at - first);
        if at < self.end() {
            let latest = script
                .iter()
                .rev()
                .find(|(due, _)| *due <= at)
                .map(|(_, s)| s);
            return json!({"id": id, "status": "IN_PROGRESS", "delayTime": ms(first),
                          "executionTime": running, "output": latest});
        }
        let execution = ms(self.end() - first);
        match self.options.outcome {
            Outcome::Image => json!({
                "id": id, "status": "COMPLETED", "delayTime": ms(first), "executionTime": execution,
                "output": {"images": [{
                    "filename": "page_00001_.png",
                    "type": "base64",
                    "data": comfy_worker::job::codec::encode(&self.png),
                }]}
            }),
            Outcome::Failure => json!({
                "id": id, "status": "FAILED", "delayTime": ms(first), "executionTime": execution,
                "error": "Workflow validation failed:\n• Node 1 (Broken): Invalid node type\n\nCheck the custom nodes.",
                "output": {"details": [
                    "Node 1 (Broken): Invalid node type",
                    "Available node types: EmptyImage, SlowSteps, SaveImage"
                ]}
            }),
        }
    }

    /// Records the request (answered with `status` unless refused); returns the 401 reply when a
    /// key is required and not given.
    fn refuse(
        &self,
        method: Method,
        path: String,
        headers: &HeaderMap,
        status: StatusCode,
    ) -> Option<Response> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let authorized = match self.options.api_key {
            None => true,
            Some(key) => authorization.as_deref() == Some(&format!("Bearer {key}")),
        };
        let status = if authorized {
            status
        } else {
            StatusCode::UNAUTHORIZED
        };
        self.seen.lock().unwrap().push(Seen {
            method,
            path,
            authorization,
            status,
        });
        (!authorized).then(|| error(StatusCode::UNAUTHORIZED, "Unauthorized"))
    }

    fn job(&self, id: &str) -> Option<(Duration, bool)> {
        let jobs = self.jobs.lock().unwrap();
        jobs.get(id).map(|j| (j.started.elapsed(), j.cancelled))
    }

    fn runs(&self) -> Vec<Value> {
        self.runs.lock().unwrap().clone()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

impl FakeEndpoint {
    async fn start(options: FakeOptions) -> FakeEndpoint {
        let fake = Arc::new(Fake {
            options,
            png: test_png(96, 64),
            jobs: Mutex::default(),
            runs: Mutex::default(),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/", get(|| async { Html(PAGE_HTML) }))
            .route("/run", post(run))
            .route("/status/{id}", get(status))
            .route("/events/{id}", get(events))
            .route("/cancel/{id}", post(cancel))
            .with_state(fake.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake endpoint");
        });
        FakeEndpoint { url, fake, server }
    }
}

async fn run(State(fake): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = fake.refuse(Method::POST, "/run".into(), &headers, StatusCode::OK) {
        return refused;
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "The body is not JSON");
    };
    if !body["input"].is_object() {
        return error(StatusCode::BAD_REQUEST, "Missing 'input'");
    }
    let id = {
        let mut jobs = fake.jobs.lock().unwrap();
        let id = format!("job-{}-e1", jobs.len() + 1);
        jobs.insert(
            id.clone(),
            Job {
                started: Instant::now(),
                cancelled: false,
            },
        );
        id
    };
    fake.runs.lock().unwrap().push(body);
    Json(json!({"id": id, "status": "IN_QUEUE"})).into_response()
}

async fn status(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/status/{id}");
    let Some((at, cancelled)) = fake.job(&id) else {
        return fake
            .refuse(Method::GET, path, &headers, StatusCode::NOT_FOUND)
            .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "No such job"));
    };
    if let Some(refused) = fake.refuse(Method::GET, path, &headers, StatusCode::OK) {
        return refused;
    }
    Json(fake.status_at(&id, at, cancelled)).into_response()
}

async fn cancel(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refuse(
        Method::POST,
        format!("/cancel/{id}"),
        &headers,
        StatusCode::OK,
    ) {
        return refused;
    }
    match fake.jobs.lock().unwrap().get_mut(&id) {
        Some(job) => job.cancelled = true,
        None => return error(StatusCode::NOT_FOUND, "No such job"),
    }
    Json(json!({"id": id, "status": "CANCELLED"})).into_response()
}

/// `text/event-stream` of the scripted job. Events are written in two TCP chunks split mid-event
/// (sometimes mid-character), progress events with CRLF line ends, status events with LF, and a
/// keep-alive comment first: all cases the page's SSE parser must handle.
async fn events(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/events/{id}");
    if !fake.options.events {
        return fake
            .refuse(Method::GET, path, &headers, StatusCode::NOT_FOUND)
            .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "Not found"));
    }
    let Some((at, cancelled)) = fake.job(&id) else {
        return fake
            .refuse(Method::GET, path, &headers, StatusCode::NOT_FOUND)
            .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "No such job"));
    };
    if let Some(refused) = fake.refuse(Method::GET, path, &headers, StatusCode::OK) {
        return refused;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let started = Instant::now() - at;
    tokio::spawn(async move {
        let send = |event: String| {
            let tx = tx.clone();
            async move {
                let bytes = event.into_bytes();
                let (a, b) = bytes.split_at(bytes.len() / 2);
                tx.send(Bytes::copy_from_slice(a)).await.ok()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                tx.send(Bytes::copy_from_slice(b)).await.ok()
            }
        };
        let status_event = |body: &Value| format!("event: status\ndata: {body}\n\n");
        let mut last = fake.status_at(&id, at, cancelled);
        if tx
            .send(Bytes::from_static(b": connected\n\n"))
            .await
            .is_err()
            || send(status_event(&last)).await.is_none()
        {
            return;
        }
        for (due, snapshot) in script(fake.options.outcome) {
            if due <= at {
                continue;
            }
            tokio::time::sleep_until((started + due).into()).await;
            let progress = format!("event: progress\r\ndata: {snapshot}\r\n\r\n");
            if send(progress).await.is_none() {
                return;
            }
            let now = fake.status_at(&id, due, fake.job(&id).is_some_and(|j| j.1));
            if now["status"] != last["status"] {
                if send(status_event(&now)).await.is_none() {
                    return;
                }
                last = now;
            }
        }
        tokio::time::sleep_until((started + fake.end()).into()).await;
        let cancelled = fake.job(&id).is_some_and(|j| j.1);
        let _ = send(status_event(&fake.status_at(&id, fake.end(), cancelled))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A small real PNG: an RGB gradient.
fn test_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("png header");
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            data.extend_from_slice(&[
                255,
                (x * 255 / width.max(1)) as u8,
                (y * 255 / height.max(1)) as u8,
            ]);
        }
    }
    writer.write_image_data(&data).expect("png data");
    writer.finish().expect("png end");
    out
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

/// Chromium showing the page, with the page's uncaught exceptions collected from the start.
struct Session {
    _browser: Browser,
    page: Page,
    events: broadcast::Receiver<Event>,
}

impl Session {
    /// Starts Chromium and opens `url` in a 1280×900 viewport.
    async fn open(url: &str) -> Result<Session> {
        let browser = Browser::launch().await?;
        let page = browser.page().await?;
        let events = page.events();
        page.set_viewport(1280, 900).await?;
        page.navigate(url).await?;
        Ok(Session {
            _browser: browser,
            page,
            events,
        })
    }

    /// Fails if the page threw an uncaught exception or logged an error so far.
    fn assert_no_page_errors(&mut self) {
        let mut errors = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            match event.method.as_str() {
                "Runtime.exceptionThrown" => {
                    let details = &event.params["exceptionDetails"];
                    let text = details["exception"]["description"]
                        .as_str()
                        .or_else(|| details["text"].as_str())
                        .unwrap_or_default();
                    errors.push(format!("uncaught: {text}"));
                }
                "Runtime.consoleAPICalled" if event.params["type"] == "error" => {
                    errors.push(format!("console.error: {}", event.params["args"]));
                }
                _ => {}
            }
        }
        assert!(errors.is_empty(), "the page reported errors: {errors:#?}");
    }
}

/// Text of an element (`innerText`, so CSS `white-space` decides the newlines).
async fn text(page: &Page, selector: &str) -> Result<String> {
    let value = page
        .eval(&format!(
            "document.querySelector({}).innerText",
            serde_json::to_string(selector)?
        ))
        .await?;
    Ok(value.as_str().unwrap_or_default().to_owned())
}

/// Writes `target/test-artifacts/<name>` and returns its path.
fn save_artifact(name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// One observation of the live view, taken when `#overall-bar`'s `aria-valuenow` changed.
#[derive(Debug)]
struct Sample {
    overall: f64,
    status: String,
    node_label: String,
    step: String,
    eta: String,
    node_bar: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_streams_progress_and_renders_the_image() -> Result<()> {
    let endpoint = FakeEndpoint::start(FakeOptions {
        api_key: Some(KEY),
        events: true,
        outcome: Outcome::Image,
    })
    .await;
    let mut session = Session::open(&endpoint.url).await?;
    let page = &session.page;

    let missing = page
        .eval(&format!(
            "{}.filter(id => !document.getElementById(id))",
            serde_json::to_string(IDS)?
        ))
        .await?;
    assert_eq!(missing, json!([]), "element ids missing from the page");
    let bar = page
        .eval(
            "(() => { const b = document.getElementById('overall-bar'); \
             return [b.getAttribute('role'), b.getAttribute('aria-valuenow')]; })()",
        )
        .await?;
    assert_eq!(bar, json!(["progressbar", "0"]));

    // Without the key the endpoint refuses; the page says why.
    page.eval(
        "document.getElementById('load-example').click();
         document.getElementById('submit').click();",
    )
    .await?;
    let refused = page
        .wait_for(
            "document.getElementById('status').dataset.state === 'ERROR'
             && document.getElementById('error').innerText",
            WAIT,
        )
        .await?;
    assert_eq!(
        refused,
        json!("Submitting the job failed:\nHTTP 401: Unauthorized\nSet the API key the server was started with.")
    );
    assert!(endpoint.fake.runs().is_empty());

    // The key (typed like a user would), the example, submit.
    let loaded = page
        .eval(&format!(
            "(() => {{ const k = document.getElementById('api-key'); k.value = {};
               k.dispatchEvent(new Event('input', {{ bubbles: true }}));
               document.getElementById('load-example').click();
               const value = document.getElementById('input').value;
               document.getElementById('submit').click();
               return value; }})()",
            serde_json::to_string(KEY)?
        ))
        .await?;
    let loaded: Value = serde_json::from_str(loaded.as_str().context("#input value")?)?;
    assert_eq!(loaded, example_input(), "the example in #input");

    // Sample the bars each time the overall percent changes, until it reaches 100.
    let mut samples: Vec<Sample> = Vec::new();
    let mut last = "0".to_owned();
    loop {
        let condition = format!(
            "(() => {{
               const bar = document.getElementById('overall-bar');
               const now = bar.getAttribute('aria-valuenow');
               if (now === {last}) return null;
               const t = (id) => document.getElementById(id).textContent;
               return {{ now, status: document.getElementById('status').dataset.state,
                         label: t('node-label'), step: t('step'), eta: t('eta'),
                         node: document.getElementById('node-bar').getAttribute('aria-valuenow') }};
             }})()",
            last = serde_json::to_string(&last)?
        );
        let seen = page
            .wait_for(&condition, WAIT)
            .await
            .with_context(|| format!("after samples {samples:?}"))?;
        let field = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
        last = field("now");
        let sample = Sample {
            overall: last.parse().context("aria-valuenow")?,
            status: field("status"),
            node_label: field("label"),
            step: field("step"),
            eta: field("eta"),
            node_bar: field("node").parse().context("node aria-valuenow")?,
        };
        let finished = sample.overall >= 100.0;
        if sample.step == "step 10/20" {
            // Mid-run view, for people looking at the artifacts.
            save_artifact("page-running.png", &page.screenshot().await?)?;
        }
        samples.push(sample);
        if finished {
            break;
        }
    }
    println!("samples: {samples:#?}");
    assert!(
        samples.windows(2).all(|w| w[0].overall < w[1].overall),
        "overall progress must only increase: {samples:?}"
    );
    let live: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.status == "IN_PROGRESS" && s.overall < 100.0)
        .collect();
    assert!(
        live.len() >= 3,
        "expected at least 3 distinct live values before completion: {samples:?}"
    );
    let sampling = samples
        .iter()
        .find(|s| s.step == "step 10/20")
        .or_else(|| samples.iter().find(|s| s.step.ends_with("/20")))
        .with_context(|| format!("no sampler step seen: {samples:?}"))?;
    assert_eq!(sampling.node_label, "Sampling · SlowSteps · node 2");
    assert!(
        sampling.eta.ends_with(" s") && sampling.node_bar > 0.0,
        "{sampling:?}"
    );

    // The final image, decoded by the browser.
    let images = page
        .wait_for(
            "(() => { const imgs = [...document.querySelectorAll('#images img')];
                return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)
                  ? imgs.map(i => ({ w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 22), alt: i.alt }))
                  : null; })()",
            WAIT,
        )
        .await?;
    assert_eq!(
        images,
        json!([{"w": 96, "h": 64, "src": "data:image/png;base64,", "alt": "Output image 1: page_00001_.png"}])
    );
    assert_eq!(text(page, "#status").await?, "COMPLETED");
    assert_eq!(
        page.eval("document.getElementById('error').hidden").await?,
        json!(true)
    );
    assert_eq!(
        page.eval("document.getElementById('cancel').disabled")
            .await?,
        json!(true)
    );
    assert_eq!(
        page.eval("document.getElementById('submit').disabled")
            .await?,
        json!(false)
    );

    let shot = page.screenshot().await?;
    let path = save_artifact("page.png", &shot)?;
    let info = png::Decoder::new(std::io::Cursor::new(shot))
        .read_info()
        .context("the screenshot is not a PNG")?;
    let (w, h) = (info.info().width, info.info().height);
    ensure!(w == 1280 && h >= 600, "screenshot is {w}×{h}");
    println!("screenshot: {}", path.display());

    // What the endpoint saw: the example as sent, the key on every call, the stream used.
    assert_eq!(endpoint.fake.runs(), vec![example_input()]);
    let seen = endpoint.fake.seen();
    let bearer = format!("Bearer {KEY}");
    let (refused, admitted): (Vec<&Seen>, Vec<&Seen>) = seen
        .iter()
        .partition(|s| s.status == StatusCode::UNAUTHORIZED);
    assert!(
        refused.len() == 1 && refused[0].path == "/run" && refused[0].authorization.is_none(),
        "{seen:?}"
    );
    assert!(
        admitted
            .iter()
            .all(|s| s.authorization.as_deref() == Some(bearer.as_str())),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.path.starts_with("/events/") && s.status == StatusCode::OK),
        "the page did not stream /events: {seen:?}"
    );

    // The key survives a reload (sessionStorage), the view starts clean.
    page.navigate(&endpoint.url).await?;
    assert_eq!(
        page.eval("[document.getElementById('api-key').value, document.getElementById('overall-bar').getAttribute('aria-valuenow')]")
            .await?,
        json!([KEY, "0"])
    );
    session.assert_no_page_errors();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_polls_status_and_shows_a_failure_readably() -> Result<()> {
    let endpoint = FakeEndpoint::start(FakeOptions {
        api_key: None,
        events: false,
        outcome: Outcome::Failure,
    })
    .await;
    let mut session = Session::open(&endpoint.url).await?;
    let page = &session.page;

    // Not JSON: refused in the page, nothing sent.
    page.eval(
        "document.getElementById('input').value = '{not json';
         document.getElementById('submit').click();",
    )
    .await?;
    let shown = page
        .wait_for(
            "(() => { const e = document.getElementById('error'); return !e.hidden && e.innerText; })()",
            WAIT,
        )
        .await?;
    assert!(
        shown
            .as_str()
            .unwrap_or_default()
            .starts_with("The input is not valid JSON"),
        "{shown}"
    );
    assert!(endpoint.fake.runs().is_empty());
    assert!(endpoint.fake.seen().iter().all(|s| s.method == Method::GET));

    // A bare API-format workflow: wrapped, submitted, followed by polling, failure shown.
    let workflow = json!({"1": {"class_type": "Broken", "inputs": {}}});
    page.eval(&format!(
        "document.getElementById('input').value = {};
         document.getElementById('submit').click();",
        serde_json::to_string(&workflow.to_string())?
    ))
    .await?;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'FAILED'",
        WAIT,
    )
    .await?;
    assert_eq!(
        endpoint.fake.runs(),
        vec![json!({"input": {"workflow": workflow}})]
    );
    let error = text(page, "#error").await?;
    assert!(
        error.starts_with(
            "Workflow validation failed:\n• Node 1 (Broken): Invalid node type\n\nCheck the custom nodes."
        ),
        "newlines must survive: {error:?}"
    );
    let details = page
        .eval("[...document.querySelectorAll('#error li')].map(li => li.textContent)")
        .await?;
    assert_eq!(
        details,
        json!([
            "Node 1 (Broken): Invalid node type",
            "Available node types: EmptyImage, SlowSteps, SaveImage"
        ])
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#images img').length")
            .await?,
        json!(0)
    );
    let seen = endpoint.fake.seen();
    assert!(
        seen.iter()
            .any(|s| s.path.starts_with("/events/") && s.status == StatusCode::NOT_FOUND),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| s.path.starts_with("/status/"))
            .count()
            >= 2,
        "the page should have polled /status: {seen:?}"
    );
    save_artifact("page-error.png", &page.screenshot().await?)?;
    session.assert_no_page_errors();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_input_forms_sse_parser_and_cancel() -> Result<()> {
    let endpoint = FakeEndpoint::start(FakeOptions {
        api_key: None,
        events: true,
        outcome: Outcome::Image,
    })
    .await;
    let mut session = Session::open(&endpoint.url).await?;
    let page = &session.page;

    // The three accepted input forms (the page's own buildRequest).
    let built = page
        .eval(
            r#"[
              buildRequest('{"input": {"workflow": {"1": {"class_type": "A", "inputs": {}}}}, "webhook": "x"}'),
              buildRequest('{"workflow": {"1": {"class_type": "A", "inputs": {}}}, "images": []}'),
              buildRequest('{"1": {"class_type": "A", "inputs": {}}}'),
            ]"#,
        )
        .await?;
    let wf = json!({"1": {"class_type": "A", "inputs": {}}});
    assert_eq!(
        built,
        json!([
            {"input": {"workflow": wf}, "webhook": "x"},
            {"input": {"workflow": wf, "images": []}},
            {"input": {"workflow": wf}},
        ])
    );
    let refused = page
        .eval("(() => { try { buildRequest('[1]'); return null; } catch (e) { return e.message; } })()")
        .await?;
    assert!(refused
        .as_str()
        .unwrap_or_default()
        .starts_with("Expected a JSON object"));

    // The SSE parser: CR, LF and CRLF line ends split anywhere, comments, multi-line data.
    let events = page
        .eval(
            r#"(() => {
              const out = [];
              const p = sseParser((name, data) => out.push([name, data]));
              for (const chunk of [': hi\r', '\nevent: status\r', '\ndata: {"a"', ':1}\r\n\r', '\n',
                                   'data: x\ndata: y\n\n', 'event: progress\rdata: 2\r\r', 'event: lost\ndata: 3'])
                p.push(chunk);
              return out;
            })()"#,
        )
        .await?;
    assert_eq!(
        events,
        json!([
            ["status", "{\"a\":1}"],
            ["message", "x\ny"],
            ["progress", "2"]
        ])
    );

    // Rendering of final results, fed straight to the page's status handler: the MIME type from
    // the file name, the `errors` list, and `success_no_images`.
    let rendered = page
        .eval(
            r#"(() => {
              const run = { id: 'synthetic', ctrl: new AbortController(), done: false, timer: null, failures: 0 };
              applyStatus(run, { id: 'synthetic', status: 'COMPLETED', output: {
                images: [{ filename: 'a.JPG', type: 'base64', data: 'AAAA' },
                         { filename: 'b.webp', type: 'base64', data: 'AAAA' }],
                errors: ['Failed to fetch image data for c.png from /view endpoint: 404\nretry later'] } });
              const first = {
                srcs: [...document.querySelectorAll('#images img')].map(i => i.src),
                errors: [...document.querySelectorAll('#errors li')].map(li => li.textContent),
                warningsShown: !document.getElementById('warnings').hidden,
                overall: document.getElementById('overall-bar').getAttribute('aria-valuenow'),
              };
              resetView();
              applyStatus({ ...run, done: false }, { id: 'synthetic', status: 'COMPLETED',
                                                     output: { status: 'success_no_images', images: [] } });
              return [first, document.getElementById('result-empty').textContent,
                      document.querySelectorAll('#images img').length];
            })()"#,
        )
        .await?;
    assert_eq!(
        rendered,
        json!([
            {
                "srcs": ["data:image/jpeg;base64,AAAA", "data:image/webp;base64,AAAA"],
                "errors": ["Failed to fetch image data for c.png from /view endpoint: 404\nretry later"],
                "warningsShown": true,
                "overall": "100",
            },
            "The workflow finished without images.",
            0
        ])
    );
    page.eval("resetView()").await?;

    // Cancel a running job: the page posts /cancel and shows the final state.
    page.eval(
        "document.getElementById('load-example').click();
         document.getElementById('submit').click();",
    )
    .await?;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'IN_PROGRESS'
         && !document.getElementById('cancel').disabled",
        WAIT,
    )
    .await?;
    page.eval("document.getElementById('cancel').click()")
        .await?;
    let after = page
        .wait_for(
            "document.getElementById('status').dataset.state === 'CANCELLED'
             && [document.getElementById('result-empty').textContent,
                 document.getElementById('cancel').disabled,
                 document.getElementById('submit').disabled]",
            WAIT,
        )
        .await?;
    assert_eq!(after, json!(["The job was cancelled.", true, false]));
    let seen = endpoint.fake.seen();
    assert!(
        seen.iter()
            .any(|s| s.method == Method::POST && s.path == "/cancel/job-1-e1"),
        "{seen:?}"
    );
    session.assert_no_page_errors();
    Ok(())
}
