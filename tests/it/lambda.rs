//! The real binary in Lambda mode against an in-process fake of AWS Lambda's Runtime API
//! (`/2018-06-01/runtime/...`) and the ComfyUI simulator: buffered and streamed responses,
//! error responses, the invocation deadline, init errors, and the automatic mode selection.

#![cfg(feature = "lambda")]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::cli::bin;
use crate::harness::{png_size, LIMIT};
use crate::worker_process::{job_input, simulator};

/// An invocation waiting for the runtime.
struct Pending {
    id: String,
    /// The event's bytes, sent as they are.
    payload: Vec<u8>,
    deadline_ms: u64,
}

/// How the runtime answered an invocation.
#[derive(Debug, Clone)]
pub enum Answer {
    /// `POST …/response` without streaming: the JSON body.
    Buffered(Value),
    /// `POST …/response` with `Lambda-Runtime-Function-Response-Mode: streaming`: the metadata
    /// prelude, then the body after its 8-NUL delimiter, split into lines.
    Streamed {
        prelude: Value,
        lines: Vec<String>,
        headers: HeaderMap,
    },
    /// `POST …/error`: the error-type header and the JSON body.
    Error {
        /// `Lambda-Runtime-Function-Error-Type`.
        #[allow(dead_code)]
        header: String,
        body: Value,
    },
}

#[derive(Default)]
struct FakeState {
    queue: VecDeque<Pending>,
    /// Invocations handed out, by id, with when.
    taken: Vec<String>,
    answers: HashMap<String, Answer>,
    /// Each answer's body exactly as it arrived (for a streamed one: prelude, delimiter, lines).
    raw_answers: HashMap<String, Vec<u8>>,
    /// Streamed bytes received so far per invocation (while the response is still open).
    live: HashMap<String, Vec<u8>>,
    init_errors: Vec<(String, Value)>,
    /// Protocol slips: an answer for an unknown or already answered invocation.
    violations: Vec<String>,
}

/// The fake Runtime API on `127.0.0.1:0`.
pub struct FakeRuntime {
    addr: SocketAddr,
    state: Arc<(Mutex<FakeState>, Notify)>,
    task: tokio::task::JoinHandle<()>,
}

type Shared = Arc<(Mutex<FakeState>, Notify)>;

fn lock(s: &Shared) -> MutexGuard<'_, FakeState> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn next(State(s): State<Shared>) -> Response {
    loop {
        let notified = s.1.notified();
        let job = {
            let mut st = lock(&s);
            let job = st.queue.pop_front();
            if let Some(j) = &job {
                st.taken.push(j.id.clone());
            }
            job
        };
        if let Some(job) = job {
            s.1.notify_waiters();
            return (
                [
                    ("Lambda-Runtime-Aws-Request-Id", job.id.clone()),
                    ("Lambda-Runtime-Deadline-Ms", job.deadline_ms.to_string()),
                    (
                        "Lambda-Runtime-Invoked-Function-Arn",
                        "arn:aws:lambda:us-east-1:123456789012:function:comfy".to_owned(),
                    ),
                    (
                        "Lambda-Runtime-Trace-Id",
                        format!("Root=1-00000000-{};Sampled=0", job.id),
                    ),
                    ("Content-Type", "application/json".to_owned()),
                ],
                job.payload,
            )
                .into_response();
        }
        notified.await;
    }
}

fn answered(s: &Shared, id: &str, answer: Answer, raw: Vec<u8>) {
    let mut st = lock(s);
    st.raw_answers.insert(id.to_owned(), raw);
    if !st.taken.iter().any(|t| t == id) {
        st.violations
            .push(format!("answer for unknown invocation {id}"));
    }
    if st.answers.insert(id.to_owned(), answer).is_some() {
        st.violations.push(format!("second answer for {id}"));
    }
    drop(st);
    s.1.notify_waiters();
}

async fn response(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> StatusCode {
    let streaming = headers
        .get("Lambda-Runtime-Function-Response-Mode")
        .is_some_and(|v| v == "streaming");
    let mut stream = body.into_data_stream();
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        all.extend_from_slice(&chunk);
        if streaming {
            lock(&s).live.insert(id.clone(), all.clone());
            s.1.notify_waiters();
        }
    }
    let answer = if streaming {
        let delimiter = [0u8; 8];
        let at = all
            .windows(8)
            .position(|w| w == delimiter)
            .unwrap_or(all.len());
        let prelude = serde_json::from_slice(&all[..at]).unwrap_or(Value::Null);
        let rest = all.get(at + 8..).unwrap_or_default();
        Answer::Streamed {
            prelude,
            lines: String::from_utf8_lossy(rest)
                .lines()
                .map(str::to_owned)
                .collect(),
            headers,
        }
    } else {
        Answer::Buffered(serde_json::from_slice(&all).unwrap_or(Value::Null))
    };
    answered(&s, &id, answer, all);
    StatusCode::ACCEPTED
}

async fn error(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let header = header_of(&headers);
    let raw = body.clone().into_bytes();
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    answered(&s, &id, Answer::Error { header, body }, raw);
    StatusCode::ACCEPTED
}

async fn init_error(State(s): State<Shared>, headers: HeaderMap, body: String) -> StatusCode {
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    lock(&s).init_errors.push((header_of(&headers), body));
    s.1.notify_waiters();
    StatusCode::ACCEPTED
}

fn header_of(headers: &HeaderMap) -> String {
    headers
        .get("Lambda-Runtime-Function-Error-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

impl FakeRuntime {
    pub async fn start() -> FakeRuntime {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRuntime { addr, state, task }
    }

    /// `AWS_LAMBDA_RUNTIME_API` and the function variables Lambda sets.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_LAMBDA_RUNTIME_API", self.addr.to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME", "comfy".into()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048".into()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "stream".into()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/comfy".into()),
        ]
    }

    /// Queues an invocation whose deadline is `timeout` from now.
    pub fn invoke(&self, id: &str, payload: Value, timeout: Duration) {
        let deadline_ms = now_ms() + timeout.as_millis() as u64;
        self.invoke_raw(id, payload.to_string().into_bytes(), deadline_ms);
    }

    /// Queues an invocation of `payload` byte for byte, with `deadline_ms` as the
    /// `Lambda-Runtime-Deadline-Ms` header (Unix milliseconds, or a duration as `cargo lambda
    /// watch` sends it).
    pub fn invoke_raw(&self, id: &str, payload: Vec<u8>, deadline_ms: u64) {
        lock(&self.state).queue.push_back(Pending {
            id: id.to_owned(),
            payload,
            deadline_ms,
        });
        self.state.1.notify_waiters();
    }

    /// Waits (within [`LIMIT`]) until `pred` holds for the state, and returns what it gives.
    async fn wait<T>(&self, what: &str, pred: impl Fn(&FakeState) -> Option<T>) -> T {
        let wait = async {
            loop {
                let notified = self.state.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(v) = pred(&lock(&self.state)) {
                    return v;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(LIMIT, wait).await {
            Ok(v) => v,
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }

    /// The runtime's answer to invocation `id`.
    pub async fn answer(&self, id: &str) -> Answer {
        self.wait(&format!("the answer to {id}"), |st| {
            st.answers.get(id).cloned()
        })
        .await
    }

    /// The runtime's answer to invocation `id`, with its body exactly as it arrived.
    pub async fn raw_answer(&self, id: &str) -> (Answer, Vec<u8>) {
        self.wait(&format!("the answer to {id}"), |st| {
            Some((st.answers.get(id)?.clone(), st.raw_answers.get(id)?.clone()))
        })
        .await
    }

    /// The streamed lines received so far for `id` (after the prelude), waiting for `n`.
    pub async fn live_lines(&self, id: &str, n: usize) -> Vec<String> {
        self.wait(&format!("{n} streamed lines for {id}"), |st| {
            let bytes = st.live.get(id)?;
            let at = bytes.windows(8).position(|w| w == [0u8; 8])?;
            let text = String::from_utf8_lossy(&bytes[at + 8..]).into_owned();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            (lines.len() >= n).then_some(lines)
        })
        .await
    }

    pub async fn init_error(&self) -> (String, Value) {
        self.wait("an init error", |st| st.init_errors.first().cloned())
            .await
    }

    pub fn answered(&self, id: &str) -> bool {
        lock(&self.state).answers.contains_key(id)
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.state).violations.clone()
    }

    /// Fails the test if the worker broke the Runtime API's protocol.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(violations.is_empty(), "{violations:?}");
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The binary in Lambda mode; killed when dropped, its log printed if the test failed.
pub(crate) struct LambdaProcess {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LambdaProcess {
    /// Starts `comfy-worker` with `args` against the Runtime API in `runtime_env` and the
    /// simulator at `comfy_host`.
    pub(crate) fn start(
        args: &[&str],
        runtime_env: &[(&'static str, String)],
        comfy_host: &str,
        extra: &[(&str, &str)],
    ) -> LambdaProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("lambda.log");
        let mut cmd = Command::new(bin());
        crate::harness::clear_worker_env(&mut cmd)
            .args(args)
            .current_dir(dir.path())
            .envs(runtime_env.iter().cloned())
            .env("COMFY_HOST", comfy_host)
            .env("COMFY_PID_FILE", dir.path().join("no.pid"))
            .env("COMFY_API_AVAILABLE_INTERVAL_MS", "10")
            .env("WEBSOCKET_RECONNECT_DELAY_S", "0.02")
            .env("COMFY_WS_SILENCE_S", "1")
            .env("COMFY_HISTORY_POLL_INTERVAL_MS", "50")
            .env("RUST_LOG", "comfy_worker=info");
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("RUNPOD_")
                || name.starts_with("BUCKET_")
                || name.starts_with("LAMBDA_")
                || matches!(
                    name.as_ref(),
                    "OUTPUT_UPLOAD"
                        | "MAX_INLINE_OUTPUT_BYTES"
                        | "AWS_LAMBDA_LOG_FORMAT"
                        | "COMFY_WORKER_TEST_PANIC_NODE"
                        | "WARMUP_WORKFLOW"
                        | "FREE_MEMORY_AFTER_JOB"
                        | "CLEANUP_FILES"
                )
            {
                cmd.env_remove(name.as_ref());
            }
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        LambdaProcess {
            child: Some(cmd.spawn().expect("start comfy-worker")),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn exited(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(LIMIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("comfy-worker did not exit")
            .unwrap()
            .unwrap()
    }
}

impl Drop for LambdaProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- comfy-worker log ---\n{}", self.log());
        }
    }
}

const MINUTE: Duration = Duration::from_secs(60);

fn assert_two_pngs(output: &Value) {
    let images = output["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{output}");
    let sizes: Vec<(u32, u32)> = images
        .iter()
        .map(|i| {
            assert_eq!(i["type"], "base64");
            assert_eq!(i["content_type"], "image/png");
            png_size(i["data"].as_str().unwrap())
        })
        .collect();
    assert_eq!(sizes, vec![(512, 512), (256, 256)]);
}

#[tokio::test]
async fn buffered_jobs_return_their_output_selected_without_a_subcommand() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    // No subcommand: AWS_LAMBDA_RUNTIME_API without RUNPOD_* variables selects Lambda mode.
    let worker = LambdaProcess::start(
        &[],
        &runtime.env(),
        &sim.host(),
        &[("AWS_LAMBDA_LOG_FORMAT", "JSON")],
    );
    runtime.invoke("inv-1", json!({ "input": job_input(0x102030, 4) }), MINUTE);
    // The bare input is a job too.
    runtime.invoke("inv-2", job_input(0x405060, 3), MINUTE);
    for id in ["inv-1", "inv-2"] {
        match runtime.answer(id).await {
            Answer::Buffered(output) => assert_two_pngs(&output),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(sim.prompts().len(), 2);
    // Progress went to the log as structured JSON lines, one per snapshot, with the request id.
    let log = worker.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "Lambda runtime started")
        .expect("a start line");
    assert_eq!(started["response_mode"], "buffered");
    for id in ["inv-1", "inv-2"] {
        let progress: Vec<f64> = lines
            .iter()
            .filter(|l| l["message"] == "progress" && l["requestId"] == id)
            .map(|l| l["overall_percent"].as_f64().expect("overall_percent"))
            .collect();
        assert!(progress.len() >= 5, "{id}: {log}");
        assert!(
            progress.windows(2).all(|w| w[0] <= w[1]),
            "{id}: {progress:?}"
        );
        assert_eq!(progress.last(), Some(&100.0), "{id}: {progress:?}");
    }
    runtime.assert_no_violations();
}

#[tokio::test]
async fn bad_jobs_get_lambda_error_responses_and_the_runtime_keeps_serving() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    let _worker = LambdaProcess::start(&["lambda"], &runtime.env(), &sim.host(), &[]);
    runtime.invoke("no-workflow", json!({"input": {"images": []}}), MINUTE);
    let mut bad_node = job_input(0x111111, 2);
    bad_node["workflow"]["2"]["inputs"]["steps"] = json!("many");
    runtime.invoke("bad-node", json!({ "input": bad_node }), MINUTE);
    runtime.invoke("good", json!({ "input": job_input(0x222222, 2) }), MINUTE);
    match runtime.answer("no-workflow").await {
        Answer::Error { body, .. } => assert_eq!(
            body,
            json!({"errorType": "InvalidInput", "errorMessage": "Missing 'workflow' parameter"})
        ),
        other => panic!("{other:?}"),
    }
    match runtime.answer("bad-node").await {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "ComfyUIError", "{body}");
            let message = body["errorMessage"].as_str().unwrap();
            // The same message as the serverless mode's `error`, which lists the nodes.
            let mut lines = message.lines();
            assert_eq!(
                lines.next(),
                Some("Workflow validation failed:"),
                "{message}"
            );
            let detail = lines.next().expect("a detail line");
            assert!(detail.starts_with("• Node 2 (SlowSteps): "), "{message}");
            assert_eq!(lines.next(), None, "{message}");
        }
        other => panic!("{other:?}"),
    }
    match runtime.answer("good").await {
        Answer::Buffered(output) => assert_two_pngs(&output),
        other => panic!("{other:?}"),
    }
    runtime.assert_no_violations();
}

#[tokio::test]
async fn streamed_jobs_yield_ordered_progress_lines_then_the_output() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    let _worker = LambdaProcess::start(
        &["lambda"],
        &runtime.env(),
        &sim.host(),
        &[("LAMBDA_RESPONSE_MODE", "streaming")],
    );
    // Stopped mid-sampling: the lines so far must already have reached the Runtime API.
    sim.pause_after_step(3);
    runtime.invoke(
        "stream-1",
        json!({ "input": job_input(0x303030, 8) }),
        MINUTE,
    );
    tokio::time::timeout(LIMIT, sim.paused())
        .await
        .expect("the job reached step 3");
    let early = runtime.live_lines("stream-1", 1).await;
    assert!(!runtime.answered("stream-1"));
    assert!(
        early.iter().all(|l| l.starts_with("{\"progress\":")),
        "{early:?}"
    );
    sim.resume();

    let (prelude, lines, headers) = match runtime.answer("stream-1").await {
        Answer::Streamed {
            prelude,
            lines,
            headers,
        } => (prelude, lines, headers),
        other => panic!("{other:?}"),
    };
    assert_eq!(prelude["statusCode"], 200, "{prelude}");
    assert_eq!(
        prelude["headers"]["content-type"], "application/x-ndjson",
        "{prelude}"
    );
    assert_eq!(headers["transfer-encoding"], "chunked");
    let lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let (last, progress) = lines.split_last().expect("lines");
    assert_two_pngs(&last["output"]);
    assert_eq!(last.as_object().unwrap().len(), 1, "{last}");
    assert!(progress.len() >= 8, "{lines:#?}");
    let mut overall = -1.0;
    let mut steps = Vec::new();
    for line in progress {
        let p = &line["progress"];
        assert_eq!(line.as_object().unwrap().len(), 1, "{line}");
        let o = p["overall_percent"].as_f64().expect("overall_percent");
        assert!(o >= overall, "progress went back: {lines:#?}");
        overall = o;
        if p["type"] == "progress" && p["node"] == "2" {
            steps.push(p["value"].as_u64().unwrap());
        }
    }
    assert_eq!(overall, 100.0);
    assert_eq!(steps, (1..=8).collect::<Vec<u64>>());
    assert!(
        progress.starts_with(
            &early
                .iter()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        ),
        "the early lines are the first lines"
    );

    // A job that fails once running ends its stream with the error line.
    runtime.invoke(
        "stream-fail",
        json!({"input": {"workflow": crate::harness::workflow("runtime_error")}}),
        MINUTE,
    );
    let lines = match runtime.answer("stream-fail").await {
        Answer::Streamed { lines, .. } => lines,
        other => panic!("{other:?}"),
    };
    let last: Value = serde_json::from_str(lines.last().expect("lines")).unwrap();
    assert_eq!(last["errorType"], "ComfyUIError", "{last}");
    let message = last["errorMessage"].as_str().unwrap();
    assert!(
        message.contains("Node Type: SaveImage, Node ID: 3"),
        "{message}"
    );
    assert_eq!(last["output"]["error"].as_str(), Some(message), "{last}");
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines[..lines.len() - 1] {
        assert!(line.starts_with("{\"progress\":"), "{line}");
    }

    // A job the engine refuses is an error response, not a stream.
    runtime.invoke("stream-bad", json!({"input": {"workflow": 7}}), MINUTE);
    match runtime.answer("stream-bad").await {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "InvalidInput", "{body}");
            assert!(
                body["errorMessage"].as_str().unwrap().contains("workflow"),
                "{body}"
            );
        }
        other => panic!("{other:?}"),
    }
    runtime.assert_no_violations();
}

#[tokio::test]
async fn the_deadline_interrupts_the_prompt_and_returns_a_timeout_error() {
    let sim = simulator(50).await;
    let runtime = FakeRuntime::start().await;
    let _worker = LambdaProcess::start(
        &["lambda"],
        &runtime.env(),
        &sim.host(),
        &[("LAMBDA_DEADLINE_MARGIN_S", "3")],
    );
    // 400 steps of 50 ms cannot finish within a 12 s deadline (cut at 9 s: time to reach step 1
    // even on a loaded machine).
    sim.pause_after_step(1);
    let started = Instant::now();
    runtime.invoke(
        "slow",
        json!({ "input": job_input(0x404040, 400) }),
        Duration::from_secs(12),
    );
    tokio::time::timeout(LIMIT, sim.paused())
        .await
        .expect("the job started sampling");
    sim.resume();
    match runtime.answer("slow").await {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "Timeout", "{body}");
            let message = body["errorMessage"].as_str().unwrap();
            assert!(
                message.starts_with("Invocation timed out: the Lambda deadline was"),
                "{message}"
            );
            assert!(message.contains("LAMBDA_DEADLINE_MARGIN_S"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Answered before the deadline, and ComfyUI was told to stop.
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    tokio::time::timeout(LIMIT, sim.interrupt_handled(1))
        .await
        .expect("the prompt was interrupted");
}

#[tokio::test]
async fn missing_function_variables_are_an_init_error() {
    let runtime = FakeRuntime::start().await;
    let mut worker = LambdaProcess::start(
        &["lambda"],
        &runtime.env(),
        "127.0.0.1:9",
        &[("AWS_LAMBDA_FUNCTION_VERSION", "")],
    );
    let (header, body) = runtime.init_error().await;
    assert_eq!(header, "Runtime.InitError");
    assert_eq!(body["errorType"], "InvalidConfiguration", "{body}");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("AWS_LAMBDA_FUNCTION_VERSION not set"),
        "{body}"
    );
    assert!(!worker.exited().await.success());
}

/// `cargo-lambda`, installed by `scripts/test` (from PyPI) into `target/test-deps/venv`.
fn cargo_lambda() -> PathBuf {
    let path = std::env::var_os("COMFY_WORKER_TEST_CARGO_LAMBDA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/venv/bin/cargo-lambda")
        });
    assert!(
        path.exists(),
        "no cargo-lambda at {}: run the suite with scripts/test, which installs it",
        path.display()
    );
    path
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo lambda invoke` against `cargo lambda watch` (its Runtime API emulator, with the
/// function started here rather than built by `watch`, so the test builds nothing).
#[tokio::test]
async fn cargo_lambda_invoke_against_cargo_lambda_watch() {
    let tool = cargo_lambda();
    let sim = simulator(5).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let watch_log = dir.path().join("watch.log");
    let _watch = Killed(
        Command::new(&tool)
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
            ])
            .arg(port.to_string())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&watch_log).unwrap())
            .spawn()
            .expect("start cargo lambda watch"),
    );
    let up = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(LIMIT, up).await.is_err() {
        panic!(
            "cargo lambda watch never listened:\n{}",
            std::fs::read_to_string(&watch_log).unwrap_or_default()
        );
    }
    let env = vec![
        (
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt/comfy-worker"),
        ),
        ("AWS_LAMBDA_FUNCTION_NAME", "comfy-worker".to_owned()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096".to_owned()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1".to_owned()),
    ];
    let _worker = LambdaProcess::start(&["lambda"], &env, &sim.host(), &[]);
    let invoke = |payload: Value| {
        let file = dir.path().join("event.json");
        std::fs::write(&file, payload.to_string()).unwrap();
        let tool = tool.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(tool)
                    .args(["lambda", "invoke", "-A", "127.0.0.1", "-P"])
                    .arg(port.to_string())
                    .arg("comfy-worker")
                    .arg("--data-file")
                    .arg(&file)
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .stdin(Stdio::null())
                    .output()
                    .expect("run cargo lambda invoke")
            });
            tokio::time::timeout(LIMIT, out)
                .await
                .expect("cargo lambda invoke finished")
                .unwrap()
        }
    };
    let out = invoke(json!({ "input": job_input(0x505050, 3) })).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output: Value = serde_json::from_str(stdout.trim()).expect("the output JSON");
    assert_two_pngs(&output);

    let out = invoke(json!({"input": {"images": []}})).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidInput"), "{stderr}");
    assert!(stderr.contains("Missing 'workflow' parameter"), "{stderr}");
}

/// `docker/start.sh` in Lambda mode: ComfyUI is not started in the function (it is reached at
/// COMFY_HOST), and the worker it execs serves the Runtime API without a subcommand.
#[tokio::test]
async fn the_start_script_skips_comfyui_in_lambda_mode() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("comfyui-started");
    let log = dir.path().join("start.log");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .current_dir(dir.path())
        .envs(runtime.env())
        .env("COMFYUI_START_CMD", format!("touch {}", marker.display()))
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", dir.path().join("comfyui.pid"))
        .env("COMFY_HOST", sim.host())
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "10")
        .env("RUST_LOG", "comfy_worker=info");
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("RUNPOD_") || name == "START_COMFYUI" || name == "SERVE_API_LOCALLY" {
            cmd.env_remove(name.as_ref());
        }
    }
    let _script = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run start.sh"),
    );
    runtime.invoke(
        "via-script",
        json!({ "input": job_input(0x606060, 2) }),
        MINUTE,
    );
    match runtime.answer("via-script").await {
        Answer::Buffered(output) => assert_two_pngs(&output),
        other => panic!("{other:?}"),
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("not starting ComfyUI"), "{text}");
    assert!(!marker.exists(), "start.sh started ComfyUI: {text}");
    assert!(!dir.path().join("comfyui.pid").exists());
}

#[tokio::test]
async fn a_panicking_job_and_an_oversize_output_are_error_responses() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    // The test hook panics the job when a SlowSteps node starts; 2000 bytes hold no PNG pair.
    let _worker = LambdaProcess::start(
        &["lambda"],
        &runtime.env(),
        &sim.host(),
        &[
            ("COMFY_WORKER_TEST_PANIC_NODE", "SlowSteps"),
            ("MAX_INLINE_OUTPUT_BYTES", "2000"),
        ],
    );
    runtime.invoke("panics", json!({ "input": job_input(0x707070, 2) }), MINUTE);
    let mut big = crate::harness::workflow("ok");
    big["2"] = json!({"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}});
    runtime.invoke("too-big", json!({"input": {"workflow": big}}), MINUTE);
    match runtime.answer("panics").await {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "InternalError", "{body}");
            assert!(
                body["errorMessage"]
                    .as_str()
                    .unwrap()
                    .starts_with("Internal error in comfy-worker: "),
                "{body}"
            );
        }
        other => panic!("{other:?}"),
    }
    match runtime.answer("too-big").await {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "OutputTooLarge", "{body}");
            let message = body["errorMessage"].as_str().unwrap();
            assert!(message.starts_with("The job output is "), "{message}");
            assert!(message.contains("BUCKET_ENDPOINT_URL"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    runtime.assert_no_violations();
}

#[tokio::test]
async fn a_failed_warm_up_is_an_init_error() {
    let sim = simulator(5).await;
    let runtime = FakeRuntime::start().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-warmup.json");
    let mut worker = LambdaProcess::start(
        &["lambda"],
        &runtime.env(),
        &sim.host(),
        &[("WARMUP_WORKFLOW", missing.to_str().unwrap())],
    );
    let (header, body) = runtime.init_error().await;
    assert_eq!(header, "Runtime.InitError");
    assert_eq!(body["errorType"], "WarmupFailed", "{body}");
    let message = body["errorMessage"].as_str().unwrap();
    assert!(
        message.starts_with("warm-up failed: cannot read WARMUP_WORKFLOW"),
        "{message}"
    );
    assert!(!worker.exited().await.success());
    assert!(sim.prompts().is_empty());
}
