//! The web page of `comfy-worker serve` (`src/api/page.html`), driven in headless Chromium over
//! the DevTools protocol ([`super::cdp`]), against the real local endpoint in front of the
//! in-process ComfyUI simulator. Nothing here is scripted: jobs run through the real engine.
//!
//! * [`page_streams_progress_and_renders_the_image`] is the acceptance run: [`endpoint::serve`] (what
//!   `comfy-worker serve` runs) with an API key; the page's own example (EmptyImage → SlowSteps,
//!   20 steps → SaveImage) runs on the simulator; the bar advances over `/events` and the
//!   512×512 result decodes. It keeps `target/test-artifacts/page-running.png` (the simulator
//!   held at step 10) and `page.png` (done).
//! * [`page_shows_a_rejected_workflow_readably`]: ComfyUI's validation error in `#error`.
//! * [`page_falls_back_to_polling_when_events_are_unavailable`]: the real router behind a layer
//!   that answers 404 for `/events/…`, as a reverse proxy that cannot stream would; the page must
//!   poll `/status` instead.
//! * [`page_input_forms_sse_parser_and_cancel`]: the page's own functions called directly, and
//!   Cancel, which interrupts the running prompt in the simulator.
//!
//! The tests never sleep to sample the page: each observation is a `Runtime.evaluate` of a
//! promise that resolves in the page when the DOM changes ([`Page::wait_for`]); mid-run states
//! are pinned with the simulator's breakpoint ([`Simulator::pause_after_step`]). Every wait is
//! bounded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use comfy_sim::{SimConfig, Simulator};
use comfy_worker::endpoint::{self, LocalEndpoint, ServeOptions};
use comfy_worker::secret::Secret;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::cdp::{Browser, Event, Page};
use crate::harness::{self, LIMIT};

/// The key the authenticated server is started with.
const KEY: &str = "page-test-key";
/// Bound for one wait on the page.
const WAIT: Duration = Duration::from_secs(15);
/// Time per simulated sampler step: the example's 20 steps take 1.2 s, long enough for several
/// distinct progress values to reach the page.
const STEP: Duration = Duration::from_millis(60);
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
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": 20, "seconds_per_step": 0.1, "send_preview": true}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "page"}}
    }}})
}

// ------------------------------------------------------------------------------------------------
// The servers
// ------------------------------------------------------------------------------------------------

/// The simulated ComfyUI, `STEP` per sampler step.
async fn simulator() -> Result<Simulator> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: STEP,
            ..SimConfig::default()
        },
    )
    .await?;
    Ok(sim)
}

/// Requests that reached [`Server::without_events`]: method, path, answer.
type Seen = Arc<Mutex<Vec<(Method, String, StatusCode)>>>;

/// A local endpoint on a port of its own, in front of a simulator; stopped when dropped.
struct Server {
    /// `http://127.0.0.1:PORT/`, where the page is.
    url: String,
    shutdown: CancellationToken,
    _task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Server {
    /// [`endpoint::serve`], exactly what `comfy-worker serve` runs.
    async fn start(sim: &Simulator, api_key: Option<&str>) -> Result<Server> {
        harness::init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let options = ServeOptions {
            api_key: api_key.map(Secret::new),
            ..ServeOptions::default()
        };
        let task = tokio::spawn(endpoint::serve(
            listener,
            harness::engine(&sim.host()),
            Webhooks::new(WebhookPolicy::default()),
            options,
            shutdown.clone(),
        ));
        Ok(Server {
            url,
            shutdown,
            _task: task,
        })
    }

    /// The real router ([`endpoint::router`]) behind a layer that answers `GET /events/…` with a plain
    /// 404, as a reverse proxy that buffers or blocks Server-Sent Events would, and passes every
    /// other request through. Records what it saw.
    async fn without_events(sim: &Simulator) -> Result<(Server, Seen)> {
        harness::init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let endpoint = LocalEndpoint::new(
            harness::engine(&sim.host()),
            Webhooks::new(WebhookPolicy::default()),
            ServeOptions::default(),
        );
        let seen = Seen::default();
        let app = endpoint::router(endpoint.clone())
            .layer(middleware::from_fn_with_state(seen.clone(), no_events));
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            endpoint.close();
            served
        });
        let server = Server {
            url,
            shutdown,
            _task: task,
        };
        Ok((server, seen))
    }
}

/// The layer of [`Server::without_events`].
async fn no_events(State(seen): State<Seen>, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = if path.starts_with("/events/") {
        (StatusCode::NOT_FOUND, "404 page not found").into_response()
    } else {
        next.run(request).await
    };
    seen.lock().unwrap().push((method, path, response.status()));
    response
}

/// A JSON request to the server, bounded by [`LIMIT`]; returns the status code and the body.
async fn call(method: Method, url: &str, key: Option<&str>) -> Result<(StatusCode, Value)> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .build()?;
    let mut request = http.request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let status = response.status();
    let body = response.json().await.context("the reply is not JSON")?;
    Ok((status, body))
}

// ------------------------------------------------------------------------------------------------
// The browser
// ------------------------------------------------------------------------------------------------

/// Chromium showing the page, with the page's uncaught exceptions collected from the start.
struct Session {
    _browser: Browser,
    page: Page,
    events: broadcast::Receiver<Event>,
}

impl Session {
    /// Starts Chromium and opens `url` in a 1280×900 viewport without scrollbars (a screenshot of
    /// a tall page is then 1280 wide), with reduced motion (the page then draws bars without
    /// transitions, so a screenshot shows the value the bar holds).
    async fn open(url: &str) -> Result<Session> {
        let browser = Browser::launch().await?;
        let page = browser.page().await?;
        let events = page.events();
        page.set_viewport(1280, 900).await?;
        page.call("Emulation.setScrollbarsHidden", json!({"hidden": true}))
            .await?;
        page.call(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-reduced-motion", "value": "reduce"}]}),
        )
        .await?;
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

/// The job id the page shows in `#job-id` ("Job <id> · …").
async fn shown_job_id(page: &Page) -> Result<String> {
    let shown = text(page, "#job-id").await?;
    shown
        .strip_prefix("Job ")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no job id in #job-id: {shown:?}"))
}

/// Waits until the page shows a decoded image in `#images`; returns each one's natural size,
/// the start of its `src` and its `alt`.
async fn decoded_images(page: &Page) -> Result<Value> {
    page.wait_for(
        "(() => { const imgs = [...document.querySelectorAll('#images img')];
            return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)
              ? imgs.map(i => ({ w: i.naturalWidth, h: i.naturalHeight, src: i.src.slice(0, 22), alt: i.alt }))
              : null; })()",
        WAIT,
    )
    .await
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
    transport: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_streams_progress_and_renders_the_image() -> Result<()> {
    let sim = simulator().await?;
    let server = Server::start(&sim, Some(KEY)).await?;
    let mut session = Session::open(&server.url).await?;
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

    // Without the key the endpoint refuses; the page says why, and no job exists.
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
        json!("Submitting the job failed:\nHTTP 401: unauthorized\nSet the API key the server was started with.")
    );
    let (code, health) = call(Method::GET, &format!("{}health", server.url), Some(KEY)).await?;
    assert_eq!(code, StatusCode::OK, "{health}");
    assert_eq!(
        health["jobs"],
        json!({"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0})
    );
    assert!(sim.prompts().is_empty());

    // The simulator will hold the job after sampler step 10, for the mid-run screenshot.
    sim.pause_after_step(10);

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
    let mut held = false;
    loop {
        let condition = format!(
            "(() => {{
               const bar = document.getElementById('overall-bar');
               const now = bar.getAttribute('aria-valuenow');
               if (now === {last}) return null;
               const t = (id) => document.getElementById(id).textContent;
               return {{ now, status: document.getElementById('status').dataset.state,
                         label: t('node-label'), step: t('step'), eta: t('eta'),
                         transport: t('transport'),
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
            transport: field("transport"),
        };
        let finished = sample.overall >= 100.0;
        if sample.step == "step 10/20" && !held {
            // The simulator holds the job here, so the page cannot move on before the shot.
            held = true;
            // The example previews every step: the image forms under the bars, decoded by the
            // browser (the simulator's 64-pixel previews of the 512×512 image).
            let preview = page
                .wait_for(
                    "(() => { const box = document.getElementById('preview-box');
                       const img = document.getElementById('preview');
                       return !box.hidden && img.complete && img.naturalWidth > 0
                         ? { w: img.naturalWidth, h: img.naturalHeight,
                             caption: document.getElementById('preview-caption').textContent }
                         : null; })()",
                    WAIT,
                )
                .await?;
            assert_eq!(
                preview,
                json!({"w": 64, "h": 64, "caption": "Live preview · node 2 · 64×64"})
            );
            save_artifact("page-running.png", &page.screenshot().await?)?;
            // Held, the job sends nothing; the "queued · ran" times still move on their own.
            let before = text(page, "#job-id").await?;
            assert!(before.contains(" · ran "), "{before}");
            let later = page
                .wait_for(
                    &format!(
                        "(() => {{ const t = document.getElementById('job-id').textContent;
                           return t !== {} ? t : null; }})()",
                        serde_json::to_string(&before)?
                    ),
                    WAIT,
                )
                .await?;
            let later = later.as_str().unwrap_or_default();
            assert!(
                later.contains(" · ran ") && later != before,
                "{before} → {later}"
            );
            sim.resume();
        }
        samples.push(sample);
        if finished {
            break;
        }
    }
    println!("samples: {samples:#?}");
    assert!(held, "the page never showed step 10/20: {samples:?}");
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
    // The stream is behind the key too: progress arriving on it shows the page sent the key.
    assert!(
        live.iter()
            .all(|s| s.transport == "Live updates: streaming /events."),
        "the page did not stream /events: {samples:?}"
    );
    let sampling = samples
        .iter()
        .find(|s| s.step == "step 10/20")
        .with_context(|| format!("no sampler step seen: {samples:?}"))?;
    assert_eq!(sampling.node_label, "Sampling · SlowSteps · node 2");
    assert_eq!(sampling.node_bar, 50.0, "{sampling:?}");
    assert!(sampling.eta.ends_with(" s"), "{sampling:?}");

    // The final image, decoded by the browser at the example's size, in the preview's place.
    let preview_gone = page
        .wait_for("document.getElementById('preview-box').hidden", WAIT)
        .await?;
    assert_eq!(preview_gone, json!(true));
    let images = decoded_images(page).await?;
    assert_eq!(
        images,
        json!([{"w": 512, "h": 512, "src": "data:image/png;base64,", "alt": "Output image 1: page_00001_.png"}])
    );
    page.wait_for(
        "document.getElementById('status').dataset.state === 'COMPLETED'",
        WAIT,
    )
    .await?;
    assert_eq!(text(page, "#status").await?, "COMPLETED");
    assert_eq!(
        page.eval("document.getElementById('error').hidden").await?,
        json!(true)
    );
    assert_eq!(
        page.eval("[document.getElementById('cancel').disabled, document.getElementById('submit').disabled]")
            .await?,
        json!([true, false])
    );

    let shot = page.screenshot().await?;
    let path = save_artifact("page.png", &shot)?;
    let info = png::Decoder::new(std::io::Cursor::new(shot))
        .read_info()
        .context("the screenshot is not a PNG")?;
    let (w, h) = (info.info().width, info.info().height);
    ensure!(w == 1280 && h >= 600, "screenshot is {w}×{h}");
    println!("screenshot: {}", path.display());

    // The server's view: the example ran as sent, the job is behind the key.
    let prompts = sim.prompts();
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert_eq!(prompts[0]["prompt"], example_input()["input"]["workflow"]);
    let status_url = format!("{}status/{}", server.url, shown_job_id(page).await?);
    let (code, _) = call(Method::GET, &status_url, None).await?;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, status) = call(Method::GET, &status_url, Some(KEY)).await?;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status["status"], "COMPLETED");
    let data = status["output"]["images"][0]["data"]
        .as_str()
        .context("no image in /status")?;
    assert_eq!(harness::png_size(data), (512, 512));
    let shown = page
        .eval("document.querySelector('#images img').src")
        .await?;
    assert_eq!(shown, json!(format!("data:image/png;base64,{data}")));

    // The key survives a reload (sessionStorage), the view starts clean.
    page.navigate(&server.url).await?;
    assert_eq!(
        page.eval("[document.getElementById('api-key').value, document.getElementById('overall-bar').getAttribute('aria-valuenow')]")
            .await?,
        json!([KEY, "0"])
    );
    session.assert_no_page_errors();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_a_rejected_workflow_readably() -> Result<()> {
    let sim = simulator().await?;
    let server = Server::start(&sim, None).await?;
    let mut session = Session::open(&server.url).await?;
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
    let (_, health) = call(Method::GET, &format!("{}health", server.url), None).await?;
    assert_eq!(
        health["jobs"],
        json!({"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0})
    );

    // A bare API-format workflow that ComfyUI refuses: wrapped, submitted, the failure shown.
    let workflow = harness::workflow("bad_node");
    page.eval(&format!(
        "document.getElementById('input').value = {};
         document.getElementById('submit').click();",
        serde_json::to_string(&serde_json::to_string_pretty(&workflow)?)?
    ))
    .await?;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'FAILED'",
        WAIT,
    )
    .await?;
    let prompts = sim.prompts();
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert_eq!(prompts[0]["prompt"], workflow);

    // The message keeps its line breaks (one line per refused input), the details are listed.
    // `innerText` follows the rendering: without `white-space: pre-wrap` the breaks would be
    // spaces.
    let node_1 = "Node 1 (EmptyImage): Value 0 smaller than min of 1: width";
    let node_2 =
        "Node 2 (SlowSteps): Failed to convert an input value to a INT value: steps, ten, \
                  invalid literal for int() with base 10: 'ten'";
    let message = format!("Workflow validation failed:\n• {node_1}\n• {node_2}");
    assert_eq!(text(page, "#error .error-text").await?, message);
    // The details repeat the message's lines, so they are not shown a second time.
    assert_eq!(
        text(page, "#error").await?,
        message,
        "#error as the user reads it"
    );
    let details = page
        .eval("[...document.querySelectorAll('#error li')].map(li => li.textContent)")
        .await?;
    assert_eq!(details, json!([]));
    assert_eq!(
        page.eval("document.querySelectorAll('#images img').length")
            .await?,
        json!(0)
    );
    save_artifact("page-error.png", &page.screenshot().await?)?;
    session.assert_no_page_errors();
    Ok(())
}

/// Some reverse proxies buffer or block `text/event-stream`. The page then follows the job by
/// polling `/status`; here the real router sits behind a layer that answers 404 for `/events/…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_falls_back_to_polling_when_events_are_unavailable() -> Result<()> {
    let sim = simulator().await?;
    let (server, seen) = Server::without_events(&sim).await?;
    let mut session = Session::open(&server.url).await?;
    let page = &session.page;

    // Held at step 5, so the page shows a running job it learnt of by polling.
    sim.pause_after_step(5);
    page.eval(
        "document.getElementById('load-example').click();
         document.getElementById('submit').click();",
    )
    .await?;
    let transport = page
        .wait_for(
            "document.getElementById('status').dataset.state === 'IN_PROGRESS'
             && document.getElementById('step').textContent === 'step 5/20'
             && document.getElementById('transport').textContent",
            WAIT,
        )
        .await?;
    assert_eq!(
        transport,
        json!("Polling /status every 0.5 s (/events answered HTTP 404).")
    );
    assert_eq!(
        text(page, "#node-label").await?,
        "Sampling · SlowSteps · node 2"
    );
    sim.resume();

    let images = decoded_images(page).await?;
    assert_eq!(images[0]["w"], 512, "{images}");
    page.wait_for(
        "document.getElementById('status').dataset.state === 'COMPLETED'",
        WAIT,
    )
    .await?;

    let seen = seen.lock().unwrap().clone();
    let events: Vec<StatusCode> = seen
        .iter()
        .filter(|(_, path, _)| path.starts_with("/events/"))
        .map(|(_, _, status)| *status)
        .collect();
    assert_eq!(events, [StatusCode::NOT_FOUND], "{seen:?}");
    let polls = seen
        .iter()
        .filter(|(method, path, status)| {
            method == Method::GET && path.starts_with("/status/") && *status == StatusCode::OK
        })
        .count();
    assert!(polls >= 2, "the page should have polled /status: {seen:?}");
    session.assert_no_page_errors();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_input_forms_sse_parser_and_cancel() -> Result<()> {
    let sim = simulator().await?;
    let server = Server::start(&sim, None).await?;
    let mut session = Session::open(&server.url).await?;
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

    // Cancel a running job: the page posts /cancel, the endpoint interrupts ComfyUI's prompt.
    sim.pause_after_step(2);
    page.eval(
        "document.getElementById('load-example').click();
         document.getElementById('submit').click();",
    )
    .await?;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'IN_PROGRESS'
         && document.getElementById('step').textContent === 'step 2/20'
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
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .context("the simulator was not interrupted")?;
    sim.resume();
    let (prompts, interrupts) = (sim.prompts(), sim.interrupts());
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert!(!interrupts.is_empty());
    assert_eq!(
        interrupts[0].as_ref().map(|i| &i["prompt_id"]),
        Some(&prompts[0]["prompt_id"]),
        "{interrupts:?}"
    );
    let id = shown_job_id(page).await?;
    let (_, status) = call(Method::GET, &format!("{}status/{id}", server.url), None).await?;
    assert_eq!(status["status"], "CANCELLED", "{status}");
    session.assert_no_page_errors();
    Ok(())
}

/// The same page on the Comfy API v2 surface: the job submitted to `/api/v2/jobs`, followed on
/// its event stream, and its output fetched as an asset (with the API key) and shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_runs_a_job_through_the_comfy_api_v2() -> Result<()> {
    let sim = simulator().await?;
    let server = Server::start(&sim, Some(KEY)).await?;
    let mut session = Session::open(&server.url).await?;
    let page = &session.page;
    page.eval(&format!(
        "document.getElementById('api-key').value = {};
         document.getElementById('surface').value = 'v2';
         document.getElementById('load-example').click();
         document.getElementById('submit').click();",
        serde_json::to_string(KEY)?
    ))
    .await?;
    page.wait_for(
        "document.getElementById('status').dataset.state === 'COMPLETED'",
        WAIT,
    )
    .await?;
    let images = decoded_images(page).await?;
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    assert_eq!(images[0]["w"], 512);
    assert_eq!(images[0]["src"].as_str().map(|s| &s[..5]), Some("blob:"));
    // It was a v2 job: the v2 surface knows it, with the example's workflow.
    let id = shown_job_id(page).await?;
    let (status, workflow) = call(
        Method::GET,
        &format!("{}api/v2/jobs/{id}/workflow", server.url),
        Some(KEY),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{workflow}");
    assert_eq!(workflow["workflow"], example_input()["input"]["workflow"]);
    assert_eq!(text(page, "#overall-text").await?, "100 %");
    session.assert_no_page_errors();
    Ok(())
}
