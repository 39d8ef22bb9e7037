//! A fake of the RunPod serverless platform (the worker side of `runpod-protocol.md` §1, plus the
//! public `/status` view of §3), for end-to-end tests of the real worker binary.
//!
//! The fake binds `127.0.0.1:0` and serves the routes the platform's URL templates point at
//! ([`FakePlatform::env`]): job-take and job-stop long-polls, job-done / job-stream posts and the
//! heartbeat ping. It keeps each job's `/status` view the way the platform would, including the
//! platform's hazard that a progress post accepted after the final result overwrites the job back
//! to `IN_PROGRESS` (runpod-python#250). Everything the worker does that the real platform or the
//! SDK's wire format would not do is recorded as a [`FakePlatform::violations`] entry instead of
//! panicking; tests assert that list is empty.
//!
//! Rules worth knowing when writing a test:
//! - A post is *accepted* when the platform applies it, which for a delayed answer
//!   ([`PlatformOptions::progress_delay`], [`Fault::Delay`]) is when the answer is sent. A delayed
//!   post is applied even if the worker gives up on it meanwhile, as a real platform that has
//!   received the request would.
//! - [`FakePlatform::stop_job`] models a client's `/cancel`: the job's status becomes `CANCELLED`
//!   at once and later posts for it are answered 200 but no longer change its status. A job
//!   stopped while still queued is not withdrawn: the next job-take still hands it out.
//! - Posts to the job-stream URL without a `status` are stream chunks ([`PostKind::Stream`]); they
//!   never finish a job.
//! - A job-take poll the worker abandons ends as soon as hyper notices the connection's EOF
//!   ([`FakePlatform::wait_held_takes`]); a job pushed before that goes to the dead poll and is
//!   lost, as it could be on the real platform.
//! - [`Fault::Reset`] closes the connection with a TCP reset before any response byte, so the
//!   client sees a connection error, not an HTTP status.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The `gpu` query parameter every template carries; a worker that loses it mangled the template.
const GPU: &str = "test";
/// Largest request body the fake reads at all (anything beyond is answered 400 unread).
const READ_CAP: usize = 256 * 1024 * 1024;

/// A failure injected into a final result post. Faults are consumed in order, one per final post
/// attempt; once they are used up, final posts succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status; the post is not accepted.
    Status(u16),
    /// Close the connection with a TCP reset, without any response; the post is not accepted.
    Reset,
    /// Wait this long, then handle the post normally (and accept it unless it is too large).
    Delay(Duration),
}

/// How the fake platform behaves.
#[derive(Clone, Debug)]
pub struct PlatformOptions {
    /// How long job-take and job-stop hold a poll with nothing to deliver before answering 204.
    pub long_poll: Duration,
    /// How long each progress post waits before it is applied and answered (a slow platform).
    pub progress_delay: Duration,
    /// Failures for the final result posts, consumed one per attempt, in order.
    pub result_faults: Vec<Fault>,
    /// A final body larger than this is answered 400 "Bad Request", like job-done does at 20 MB.
    pub max_result_bytes: usize,
    /// How long each ping waits before it is answered (a slow heartbeat endpoint); the ping is
    /// recorded when it arrives.
    pub ping_delay: Duration,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        PlatformOptions {
            long_poll: Duration::from_millis(200),
            progress_delay: Duration::ZERO,
            result_faults: Vec::new(),
            max_result_bytes: 20 * 1024 * 1024,
            ping_delay: Duration::ZERO,
        }
    }
}

/// What a post to job-done / job-stream was, judged by its URL and body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostKind {
    /// `{"status": "IN_PROGRESS", "output": …}` (job-done URL).
    Progress,
    /// A body without `status` on the job-done URL (also unparsable bodies there).
    Final,
    /// A body without `status` on the job-stream URL: one streamed chunk.
    Stream,
}

/// One post for a job, accepted or not.
#[derive(Clone, Debug)]
pub struct Post {
    pub kind: PostKind,
    /// The parsed body; a body that is not JSON is kept as a lossy string, one that was too
    /// large to read as `null`.
    pub body: Value,
    /// The body exactly as it arrived (the wire golden files compare its bytes).
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    pub raw: bytes::Bytes,
    /// The platform applied it (for a delayed post: once its delay is over).
    pub accepted: bool,
    /// When the request (with its whole body) arrived.
    pub at: Instant,
    /// The request's query string, e.g. `gpu=test&isStream=false`.
    pub url_query: String,
    /// The HTTP status answered; `None` while a delayed answer is pending or after a reset.
    pub response: Option<u16>,
    /// A final post repeating the result the job already has (sent again after an unanswered
    /// post): answered and not applied.
    pub repeat: bool,
}

/// One heartbeat.
#[derive(Clone, Debug)]
pub struct Ping {
    /// The decoded `job_id` parameter split on `,`; `None` when the parameter is absent (idle).
    pub job_ids: Option<Vec<String>>,
    pub at: Instant,
    /// The raw query string.
    pub query: String,
}

/// One job-take request.
#[derive(Clone, Debug)]
pub struct Take {
    /// The raw `job_in_progress` parameter (`"0"` or `"1"`), if any.
    pub job_in_progress: Option<String>,
    /// `batch_size` of a job-take-batch; `None` for a job-take.
    pub batch_size: Option<usize>,
    pub at: Instant,
}

/// One answered job-stop poll.
#[derive(Clone, Debug)]
pub struct StopPoll {
    /// The ids delivered in `jobsToStop`; empty for a 204.
    pub job_ids: Vec<String>,
    /// When the answer was sent.
    pub at: Instant,
}

/// The running fake; stops serving when dropped.
pub struct FakePlatform {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The result spool of the workers that talk to this platform ([`FakePlatform::env`]), so a
    /// result one test could not deliver never reaches another test's platform.
    spool: tempfile::TempDir,
}

impl FakePlatform {
    /// Binds `127.0.0.1:0` and serves the platform routes.
    pub async fn start(opts: PlatformOptions) -> FakePlatform {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let shared = Arc::new(Shared {
            worker_id: format!("test-worker-{}", &suffix[..8]),
            api_key: format!("test-key-{}", &suffix[8..]),
            long_poll: opts.long_poll,
            progress_delay: opts.progress_delay,
            max_result_bytes: opts.max_result_bytes,
            ping_delay: opts.ping_delay,
            state: Mutex::new(PlatformState {
                faults: opts.result_faults.into(),
                ..PlatformState::default()
            }),
            changed: watch::channel(0).0,
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<ConnKill>();
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(ResettableListener(listener), app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        FakePlatform {
            shared,
            addr,
            spool: tempfile::tempdir().expect("a spool directory"),
        }
    }

    /// `http://127.0.0.1:PORT`, e.g. for `GET {base_url}/status/{id}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment the worker needs to talk to this platform, with the URLs in the platform's
    /// template form (`$ID`, `$RUNPOD_POD_ID` left for the worker to substitute).
    pub fn env(&self) -> Vec<(String, String)> {
        let base = self.base_url();
        [
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{base}/job-take/$ID?gpu={GPU}"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{base}/job-done/$RUNPOD_POD_ID/$ID?gpu={GPU}"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu={GPU}"),
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                format!("{base}/ping/$RUNPOD_POD_ID?gpu={GPU}"),
            ),
            ("RUNPOD_POD_ID", self.shared.worker_id.clone()),
            ("RUNPOD_AI_API_KEY", self.shared.api_key.clone()),
            ("RUNPOD_PING_INTERVAL", "100".to_string()),
            (
                "RUNPOD_RESULT_SPOOL_DIR",
                self.spool.path().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn worker_id(&self) -> &str {
        &self.shared.worker_id
    }

    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// Queues `{"id": id, "input": input}` for job-take; the job's status is `IN_QUEUE`.
    pub fn push_job(&self, id: &str, input: Value) {
        self.push_raw_job(json!({"id": id, "input": input}));
    }

    /// Queues `body` as the exact job-take reply (an object, an array for a batch, or garbage).
    /// Every object in it (or in the array) with a string `id` becomes a known job.
    pub fn push_raw_job(&self, body: Value) {
        let now = Instant::now();
        {
            let mut st = self.shared.lock();
            for id in job_ids_in(&body) {
                st.jobs.insert(id, JobRecord::queued(now));
            }
            st.queue.push_back(Reply::Json(body));
        }
        self.shared.bump();
    }

    /// Queues `body` byte for byte as a job-take reply (`Content-Type: application/json`), for
    /// replies a `Value` cannot hold: invalid JSON, invalid UTF-8, nesting too deep to build.
    /// `ids` become known jobs, as [`FakePlatform::push_raw_job`]'s ids do.
    pub fn push_raw_bytes(&self, body: Vec<u8>, ids: &[&str]) {
        self.push_raw_typed(body, ids, Some("application/json"));
    }

    /// [`FakePlatform::push_raw_bytes`] answered with this `Content-Type` (`None`: none at all).
    pub fn push_raw_typed(&self, body: Vec<u8>, ids: &[&str], content_type: Option<&str>) {
        let now = Instant::now();
        {
            let mut st = self.shared.lock();
            for id in ids {
                st.jobs.insert(id.to_string(), JobRecord::queued(now));
            }
            let ids = ids.iter().map(|id| id.to_string()).collect();
            st.queue.push_back(Reply::Raw {
                body,
                ids,
                content_type: content_type.map(str::to_owned),
            });
        }
        self.shared.bump();
    }

    /// Adds `n` copies of `fault` for the next result posts.
    pub fn push_fault_run(&self, fault: Fault, n: usize) {
        let mut st = self.shared.lock();
        st.faults.extend(std::iter::repeat_n(fault, n));
    }

    /// Drops the result-post faults not consumed yet: the platform is healthy from now on.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Final posts for the job that repeated a result the platform already had (answered, not
    /// applied again: the platform keeps a job's first final result).
    pub fn repeated_finals(&self, id: &str) -> usize {
        self.posts(id)
            .iter()
            .filter(|p| p.kind == PostKind::Final && p.repeat)
            .count()
    }

    /// Makes the next job-stop poll answer `{"jobsToStop": [id]}` (with any other pending ids),
    /// and marks the job `CANCELLED` unless it already finished, like a client's `/cancel`.
    pub fn stop_job(&self, id: &str) {
        {
            let mut st = self.shared.lock();
            st.pending_stops.push(id.to_string());
            if let Some(job) = st.jobs.get_mut(id) {
                if !job.status.is_final() {
                    job.status = JobStatus::Cancelled;
                    job.ended_at = Some(Instant::now());
                }
            }
        }
        self.shared.bump();
    }

    /// Waits for the job's first accepted final post and returns its body. Unbounded: wrap it in
    /// `tokio::time::timeout`.
    pub async fn wait_final(&self, id: &str) -> Value {
        self.wait_for(|f| {
            let st = f.shared.lock();
            st.jobs.get(id).and_then(|j| j.finals.first().cloned())
        })
        .await
    }

    /// Waits for the job's first accepted progress post whose `output` matches `pred` (earlier
    /// posts included) and returns that `output`.
    pub async fn wait_progress(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(|f| {
            let outputs = f.shared.lock().jobs.get(id).map(|j| j.progress.clone());
            outputs.unwrap_or_default().into_iter().find(|o| pred(o))
        })
        .await
    }

    /// Waits for the first post for the job (in arrival order, accepted or not) matching `pred`.
    pub async fn wait_post(&self, id: &str, pred: impl Fn(&Post) -> bool) -> Post {
        self.wait_for(|f| f.posts(id).into_iter().find(|p| pred(p)))
            .await
    }

    /// The job's `/status` view now: `{"id","status","delayTime","executionTime","output"?,
    /// "error"?}`; `null` for a job that was never pushed.
    pub fn status(&self, id: &str) -> Value {
        self.shared
            .lock()
            .jobs
            .get(id)
            .map_or(Value::Null, |j| j.view(id, Instant::now()))
    }

    /// The job's `/status` view right after every accepted post, in acceptance order.
    pub fn status_history(&self, id: &str) -> Vec<Value> {
        self.shared
            .lock()
            .jobs
            .get(id)
            .map(|j| j.history.clone())
            .unwrap_or_default()
    }

    /// Whether an accepted final post for the job asked for the worker to stop (`"stopPod": true`).
    pub fn stop_pod_requested(&self, id: &str) -> bool {
        self.shared.lock().jobs.get(id).is_some_and(|j| j.stop_pod)
    }

    /// Every post for the job in arrival order, failed attempts included.
    pub fn posts(&self, id: &str) -> Vec<Post> {
        self.shared
            .lock()
            .posts
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, p)| p.clone())
            .collect()
    }

    pub fn pings(&self) -> Vec<Ping> {
        self.shared.lock().pings.clone()
    }

    /// Waits for the first ping (earlier ones included) matching `pred`.
    pub async fn wait_ping(&self, pred: impl Fn(&Ping) -> bool) -> Ping {
        self.wait_for(|f| f.pings().into_iter().find(|p| pred(p)))
            .await
    }

    /// Every job-take request, in arrival order.
    pub fn takes(&self) -> Vec<Take> {
        self.shared.lock().takes.clone()
    }

    /// Waits until at least `n` job-take requests have arrived.
    pub async fn wait_takes(&self, n: usize) -> Vec<Take> {
        self.wait_for(|f| Some(f.takes()).filter(|t| t.len() >= n))
            .await
    }

    /// Waits until exactly `n` job-take polls are being held (not yet answered, and not yet
    /// abandoned by the worker).
    pub async fn wait_held_takes(&self, n: usize) {
        self.wait_for(|f| (f.shared.lock().held_takes == n).then_some(()))
            .await
    }

    /// Waits until at least `n` job-stop polls have arrived (answered or still held).
    pub async fn wait_stop_requests(&self, n: usize) {
        self.wait_for(|f| (f.shared.lock().stop_requests >= n).then_some(()))
            .await
    }

    /// Every answered job-stop poll, in answer order.
    pub fn stop_polls(&self) -> Vec<StopPoll> {
        self.shared.lock().stop_polls.clone()
    }

    /// Waits until a job-stop poll has delivered `id` to the worker.
    pub async fn wait_stop_delivered(&self, id: &str) -> StopPoll {
        self.wait_for(|f| {
            f.stop_polls()
                .into_iter()
                .find(|s| s.job_ids.iter().any(|j| j == id))
        })
        .await
    }

    /// Protocol violations by the worker, in order. Tests assert this is empty.
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Re-checks `probe` after every state change until it yields something. Probes copy what
    /// they need out of the lock before calling a test's predicate, so a predicate may call back
    /// into the fake.
    async fn wait_for<T>(&self, mut probe: impl FnMut(&FakePlatform) -> Option<T>) -> T {
        let mut changed = self.shared.changed.subscribe();
        loop {
            if let Some(found) = probe(self) {
                return found;
            }
            // The sender lives as long as `self`, so this cannot fail while we wait.
            let _ = changed.changed().await;
        }
    }
}

impl Drop for FakePlatform {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// Everything the handlers share.
struct Shared {
    worker_id: String,
    api_key: String,
    long_poll: Duration,
    progress_delay: Duration,
    max_result_bytes: usize,
    ping_delay: Duration,
    state: Mutex<PlatformState>,
    /// Bumped after every state change; waiters subscribe before they look.
    changed: watch::Sender<u64>,
    /// Cancelled when the [`FakePlatform`] is dropped.
    stop: CancellationToken,
}

/// Mutable state, behind one lock that is never held across an await.
#[derive(Default)]
struct PlatformState {
    /// Job-take reply bodies, oldest first.
    queue: VecDeque<Reply>,
    jobs: HashMap<String, JobRecord>,
    faults: VecDeque<Fault>,
    pending_stops: Vec<String>,
    /// `(job id from the URL, post)`, in arrival order.
    posts: Vec<(String, Post)>,
    pings: Vec<Ping>,
    takes: Vec<Take>,
    /// How many job-take polls are being held right now.
    held_takes: usize,
    /// How many job-stop polls have arrived (answered or still held).
    stop_requests: usize,
    stop_polls: Vec<StopPoll>,
    violations: Vec<String>,
}

/// A queued job-take reply.
enum Reply {
    Json(Value),
    Raw {
        body: Vec<u8>,
        ids: Vec<String>,
        /// The `Content-Type` to answer with (`None`: no header at all).
        content_type: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
        }
    }

    fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What the platform knows about one job.
struct JobRecord {
    queued_at: Instant,
    taken_at: Option<Instant>,
    ended_at: Option<Instant>,
    status: JobStatus,
    output: Option<Value>,
    error: Option<Value>,
    stop_pod: bool,
    /// Accepted final bodies, in acceptance order.
    finals: Vec<Value>,
    /// Accepted progress `output`s, in acceptance order.
    progress: Vec<Value>,
    /// The view after every accepted post.
    history: Vec<Value>,
}

impl JobRecord {
    fn queued(now: Instant) -> JobRecord {
        JobRecord {
            queued_at: now,
            taken_at: None,
            ended_at: None,
            status: JobStatus::InQueue,
            output: None,
            error: None,
            stop_pod: false,
            finals: Vec::new(),
            progress: Vec::new(),
            history: Vec::new(),
        }
    }

    /// The public `/status` view (§3.1), keys in the platform's order.
    fn view(&self, id: &str, now: Instant) -> Value {
        let delay = self.taken_at.unwrap_or(now) - self.queued_at;
        let execution = self
            .taken_at
            .map_or(Duration::ZERO, |t| self.ended_at.unwrap_or(now) - t);
        let mut v = Map::new();
        v.insert("id".into(), id.into());
        v.insert("status".into(), self.status.as_str().into());
        v.insert("delayTime".into(), millis(delay).into());
        v.insert("executionTime".into(), millis(execution).into());
        if let Some(output) = &self.output {
            v.insert("output".into(), output.clone());
        }
        if let Some(error) = &self.error {
            v.insert("error".into(), error.clone());
        }
        Value::Object(v)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PlatformState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn violation(&self, v: String) {
        self.lock().violations.push(v);
        self.bump();
    }
}

/// The request line as violations quote it.
struct Ctx {
    method: Method,
    target: String,
}

impl Ctx {
    fn violation(&self, sh: &Shared, what: impl std::fmt::Display) {
        sh.violation(format!("{} {}: {what}", self.method, self.target));
    }
}

/// The single entry point: dispatches by hand so that unknown routes are recorded as violations.
async fn handle(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnKill>,
    req: Request,
) -> Response {
    let uri = req.uri().clone();
    let ctx = Ctx {
        method: req.method().clone(),
        target: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string()),
    };
    let query = uri.query().unwrap_or("").to_string();
    let segments: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let is_get = ctx.method == Method::GET;
    let is_post = ctx.method == Method::POST;
    match seg.as_slice() {
        ["status", job_id] if is_get => status_route(&sh, job_id),
        ["job-take", worker] if is_get => {
            worker_checks(&sh, &ctx, worker, req.headers(), &query);
            job_take(sh, ctx, &query, false).await
        }
        ["job-take-batch", worker] if is_get => {
            worker_checks(&sh, &ctx, worker, req.headers(), &query);
            job_take(sh, ctx, &query, true).await
        }
        ["job-stop", worker] if is_get => {
            worker_checks(&sh, &ctx, worker, req.headers(), &query);
            job_stop(sh, ctx, &query).await
        }
        ["ping", worker] if is_get => {
            worker_checks(&sh, &ctx, worker, req.headers(), &query);
            let answer = ping(&sh, &ctx, &query);
            if !sh.ping_delay.is_zero() {
                tokio::time::sleep(sh.ping_delay).await;
            }
            answer
        }
        [route @ ("job-done" | "job-stream"), worker, job_id] if is_post => {
            worker_checks(&sh, &ctx, worker, req.headers(), &query);
            let stream = *route == "job-stream";
            let job_id = job_id.to_string();
            post(sh, ctx, conn, req, job_id, stream, query).await
        }
        ["status", _] | ["job-take" | "job-take-batch", _] | ["job-stop", _] | ["ping", _] => {
            ctx.violation(&sh, "wrong method (the platform expects GET)");
            StatusCode::METHOD_NOT_ALLOWED.into_response()
        }
        ["job-done" | "job-stream", _, _] => {
            ctx.violation(&sh, "wrong method (the platform expects POST)");
            StatusCode::METHOD_NOT_ALLOWED.into_response()
        }
        _ => {
            ctx.violation(&sh, "unknown route");
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

/// `GET /status/{id}`: the public view (not a worker route, so nothing is checked).
fn status_route(sh: &Shared, job_id: &str) -> Response {
    let view = sh
        .lock()
        .jobs
        .get(job_id)
        .map(|j| j.view(job_id, Instant::now()));
    match view {
        Some(v) => json_response(StatusCode::OK, &v),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("job {job_id} not found")}),
        ),
    }
}

/// Checks shared by every worker route: the worker id in the path, the raw API key, the
/// template's own query parameter and no duplicated parameters.
fn worker_checks(sh: &Shared, ctx: &Ctx, worker: &str, headers: &HeaderMap, query: &str) {
    if worker != sh.worker_id {
        ctx.violation(
            sh,
            format!(
                "worker id {worker:?} in the path, expected {:?}",
                sh.worker_id
            ),
        );
    }
    let auth: Vec<_> = headers.get_all(header::AUTHORIZATION).iter().collect();
    match auth.as_slice() {
        [] => ctx.violation(sh, "no Authorization header"),
        [one] => match one.to_str() {
            Ok(v) if v == sh.api_key => {}
            Ok(v) if v.strip_prefix("Bearer ") == Some(sh.api_key.as_str()) => ctx.violation(
                sh,
                "Authorization has a `Bearer ` prefix; the platform wants the raw API key",
            ),
            _ => ctx.violation(sh, "Authorization is not the API key"),
        },
        _ => ctx.violation(sh, "more than one Authorization header"),
    }
    let params = parse_query(query);
    match param(&params, "gpu") {
        Some(GPU) => {}
        other => ctx.violation(
            sh,
            format!("the template's `gpu={GPU}` parameter is {other:?}; the template's query was not kept"),
        ),
    }
    let mut seen: Vec<&str> = Vec::new();
    for (k, _) in &params {
        if seen.contains(&k.as_str()) {
            ctx.violation(sh, format!("query parameter `{k}` given twice"));
        }
        seen.push(k);
    }
}

/// `GET /job-take/{worker}`: a queued job at once, or the first one pushed within the long-poll,
/// or 204. `GET /job-take-batch/{worker}?batch_size=N` (`batch`): the same as a list of up to
/// N jobs, as many as are queued when the first is there.
async fn job_take(sh: Arc<Shared>, ctx: Ctx, query: &str, batch: bool) -> Response {
    let params = parse_query(query);
    let batch_size = if batch {
        match param(&params, "batch_size").map(str::parse::<usize>) {
            Some(Ok(n)) if n >= 2 => Some(n),
            other => {
                ctx.violation(
                    &sh,
                    format!("`batch_size` is {other:?}; job-take-batch wants 2 or more"),
                );
                Some(1)
            }
        }
    } else {
        None
    };
    let job_in_progress = param(&params, "job_in_progress").map(str::to_string);
    match job_in_progress.as_deref() {
        Some("0" | "1") => {}
        None => ctx.violation(&sh, "no `job_in_progress` parameter"),
        Some(other) => ctx.violation(&sh, format!("`job_in_progress={other}`, expected 0 or 1")),
    }
    for (k, _) in &params {
        let known = matches!(k.as_str(), "gpu" | "job_in_progress") || (batch && k == "batch_size");
        if !known {
            ctx.violation(&sh, format!("unexpected query parameter `{k}`"));
        }
    }
    // Subscribe before recording, so a push after the record always wakes this poll.
    let mut changed = sh.changed.subscribe();
    {
        let mut st = sh.lock();
        st.takes.push(Take {
            job_in_progress,
            batch_size,
            at: Instant::now(),
        });
        st.held_takes += 1;
    }
    sh.bump();
    let _held = HeldTake(&sh);
    let deadline = tokio::time::Instant::now() + sh.long_poll;
    loop {
        match take_next(&sh, batch_size) {
            Some(Reply::Json(body)) => return json_response(StatusCode::OK, &body),
            Some(Reply::Raw {
                body, content_type, ..
            }) => {
                let mut response = (StatusCode::OK, body).into_response();
                response.headers_mut().remove(header::CONTENT_TYPE);
                if let Some(value) = content_type.and_then(|v| v.parse().ok()) {
                    response.headers_mut().insert(header::CONTENT_TYPE, value);
                }
                return response;
            }
            None => {}
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return StatusCode::NO_CONTENT.into_response(),
            _ = sh.stop.cancelled() => return StatusCode::NO_CONTENT.into_response(),
        }
    }
}

/// Counts a job-take poll as held until its handler ends, answered or dropped with its connection.
struct HeldTake<'a>(&'a Shared);

impl Drop for HeldTake<'_> {
    fn drop(&mut self) {
        self.0.lock().held_takes -= 1;
        self.0.bump();
    }
}

/// Pops the next queued reply and marks the jobs in it `IN_PROGRESS`.
fn take_next(sh: &Shared, batch: Option<usize>) -> Option<Reply> {
    let body = {
        let mut st = sh.lock();
        let mut body = st.queue.pop_front()?;
        if let (Some(n), Reply::Json(first @ Value::Object(_))) = (batch, &body) {
            // A batch: this job and the single jobs queued behind it, up to `n`, as one list.
            let mut jobs = vec![first.clone()];
            while jobs.len() < n && matches!(st.queue.front(), Some(Reply::Json(Value::Object(_))))
            {
                if let Some(Reply::Json(job)) = st.queue.pop_front() {
                    jobs.push(job);
                }
            }
            body = Reply::Json(Value::Array(jobs));
        }
        let now = Instant::now();
        let ids = match &body {
            Reply::Json(body) => job_ids_in(body),
            Reply::Raw { ids, .. } => ids.clone(),
        };
        for id in ids {
            if let Some(job) = st.jobs.get_mut(&id) {
                if job.status == JobStatus::InQueue {
                    job.status = JobStatus::InProgress;
                    job.taken_at = Some(now);
                }
            }
        }
        body
    };
    sh.bump();
    Some(body)
}

/// `GET /job-stop/{worker}`: the pending stops at once, or the first within the long-poll, or 204.
async fn job_stop(sh: Arc<Shared>, ctx: Ctx, query: &str) -> Response {
    for (k, _) in parse_query(query) {
        if k != "gpu" {
            ctx.violation(
                &sh,
                format!(
                    "unexpected query parameter `{k}` (job-stop takes the template's query only)"
                ),
            );
        }
    }
    let mut changed = sh.changed.subscribe();
    sh.lock().stop_requests += 1;
    sh.bump();
    let deadline = tokio::time::Instant::now() + sh.long_poll;
    loop {
        let delivered = {
            let mut st = sh.lock();
            let ids = std::mem::take(&mut st.pending_stops);
            let answered = !ids.is_empty();
            if answered || tokio::time::Instant::now() >= deadline || sh.stop.is_cancelled() {
                st.stop_polls.push(StopPoll {
                    job_ids: ids.clone(),
                    at: Instant::now(),
                });
                Some(ids)
            } else {
                None
            }
        };
        if let Some(ids) = delivered {
            sh.bump();
            if ids.is_empty() {
                return StatusCode::NO_CONTENT.into_response();
            }
            return json_response(StatusCode::OK, &json!({ "jobsToStop": ids }));
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = sh.stop.cancelled() => {}
        }
    }
}

/// `GET /ping/{worker}`: always 200; records the `job_id` list.
fn ping(sh: &Shared, ctx: &Ctx, query: &str) -> Response {
    let params = parse_query(query);
    let job_ids = param(&params, "job_id").map(|ids| {
        if ids.is_empty() {
            ctx.violation(sh, "empty `job_id`; an idle worker omits the parameter");
            Vec::new()
        } else {
            ids.split(',').map(str::to_string).collect::<Vec<_>>()
        }
    });
    if param(&params, "runpod_version").is_none() {
        ctx.violation(sh, "no `runpod_version` parameter");
    }
    if let Some(ids) = &job_ids {
        let unknown: Vec<&String> = {
            let st = sh.lock();
            ids.iter().filter(|id| !st.jobs.contains_key(*id)).collect()
        };
        if !unknown.is_empty() {
            ctx.violation(sh, format!("ping names unknown jobs {unknown:?}"));
        }
    }
    sh.lock().pings.push(Ping {
        job_ids,
        at: Instant::now(),
        query: query.to_string(),
    });
    sh.bump();
    StatusCode::OK.into_response()
}

/// `POST /job-done/{worker}/{job}` and `POST /job-stream/{worker}/{job}`.
async fn post(
    sh: Arc<Shared>,
    ctx: Ctx,
    conn: ConnKill,
    req: Request,
    job_id: String,
    stream: bool,
    query: String,
) -> Response {
    check_post_headers(&sh, &ctx, req.headers(), &job_id);
    let bytes = match axum::body::to_bytes(req.into_body(), READ_CAP).await {
        Ok(b) => b,
        Err(_) => {
            // The worker went away mid-body, or sent more than the fake reads: nothing arrived.
            return bad_request();
        }
    };
    let at = Instant::now();
    let route_kind = if stream {
        PostKind::Stream
    } else {
        PostKind::Final
    };
    let record = |kind: PostKind, body: Value, response: Option<u16>| -> usize {
        let mut st = sh.lock();
        st.posts.push((
            job_id.clone(),
            Post {
                kind,
                body,
                raw: bytes.clone(),
                accepted: false,
                at,
                url_query: query.clone(),
                response,
                repeat: false,
            },
        ));
        st.posts.len() - 1
    };

    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            ctx.violation(&sh, format!("body is not JSON: {e}"));
            let raw = String::from_utf8_lossy(&bytes).into_owned();
            record(route_kind, Value::String(raw), Some(400));
            sh.bump();
            return bad_request();
        }
    };
    let kind = match body.get("status") {
        None => route_kind,
        Some(s) if s == "IN_PROGRESS" => PostKind::Progress,
        Some(other) => {
            ctx.violation(
                &sh,
                format!("`status` is {other}; only progress posts carry one (\"IN_PROGRESS\")"),
            );
            record(route_kind, body, Some(400));
            sh.bump();
            return bad_request();
        }
    };
    check_post_body(&sh, &ctx, kind, stream, &body, &query);
    if !body.is_object() {
        record(kind, body, Some(400));
        sh.bump();
        return bad_request();
    }
    if !sh.lock().jobs.contains_key(&job_id) {
        ctx.violation(&sh, format!("post for unknown job {job_id:?}"));
        record(kind, body, Some(404));
        sh.bump();
        return StatusCode::NOT_FOUND.into_response();
    }

    match kind {
        PostKind::Progress => {
            let index = record(kind, body.clone(), None);
            sh.bump();
            let delay = sh.progress_delay;
            run_detached(sh.clone(), delay, move |sh| {
                accept(&sh, &ctx, index, &job_id, kind, &body);
                StatusCode::OK.into_response()
            })
            .await
        }
        PostKind::Stream => {
            let index = record(kind, body.clone(), None);
            accept(&sh, &ctx, index, &job_id, kind, &body);
            StatusCode::OK.into_response()
        }
        PostKind::Final => {
            let fault = sh.lock().faults.pop_front();
            match fault {
                Some(Fault::Status(code)) => {
                    record(kind, body, Some(code));
                    sh.bump();
                    StatusCode::from_u16(code)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                        .into_response()
                }
                Some(Fault::Reset) => {
                    record(kind, body, None);
                    sh.bump();
                    // The connection fails its next write (this response) with a TCP reset.
                    conn.0.store(true, Ordering::SeqCst);
                    StatusCode::INTERNAL_SERVER_ERROR.into_response()
                }
                Some(Fault::Delay(delay)) => {
                    let index = record(kind, body.clone(), None);
                    sh.bump();
                    let len = bytes.len();
                    run_detached(sh.clone(), delay, move |sh| {
                        finish_final(&sh, &ctx, index, &job_id, &body, len)
                    })
                    .await
                }
                None => {
                    let index = record(kind, body.clone(), None);
                    finish_final(&sh, &ctx, index, &job_id, &body, bytes.len())
                }
            }
        }
    }
}

/// The size check and the acceptance of a final post.
fn finish_final(
    sh: &Shared,
    ctx: &Ctx,
    index: usize,
    job_id: &str,
    body: &Value,
    len: usize,
) -> Response {
    if len > sh.max_result_bytes {
        sh.lock().posts[index].1.response = Some(400);
        sh.bump();
        return bad_request();
    }
    accept(sh, ctx, index, job_id, PostKind::Final, body);
    StatusCode::OK.into_response()
}

/// Runs `answer` after `delay` on its own task, so that it happens even if the worker drops the
/// request meanwhile (the platform has received it).
async fn run_detached(
    sh: Arc<Shared>,
    delay: Duration,
    answer: impl FnOnce(Arc<Shared>) -> Response + Send + 'static,
) -> Response {
    if delay.is_zero() {
        return answer(sh);
    }
    let task = tokio::spawn(async move {
        let stop = sh.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => Some(answer(sh)),
            _ = stop.cancelled() => None,
        }
    });
    match task.await {
        Ok(Some(response)) => response,
        _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Applies an accepted post to the job's status, the way the platform does.
fn accept(sh: &Shared, ctx: &Ctx, index: usize, job_id: &str, kind: PostKind, body: &Value) {
    let now = Instant::now();
    let mut violations = Vec::new();
    {
        let mut st = sh.lock();
        let post = &mut st.posts[index].1;
        post.accepted = true;
        post.response = Some(200);
        let Some(job) = st.jobs.get_mut(job_id) else {
            return;
        };
        if job.status == JobStatus::InQueue {
            violations.push(format!(
                "{kind:?} post for job {job_id:?} before it was taken"
            ));
        }
        let cancelled = job.status == JobStatus::Cancelled;
        match kind {
            PostKind::Progress => {
                if !job.finals.is_empty() {
                    violations.push(format!(
                        "progress after final for job {job_id:?}: the platform shows it IN_PROGRESS again (runpod-python#250)"
                    ));
                }
                let output = body.get("output").cloned();
                if let Some(o) = &output {
                    job.progress.push(o.clone());
                }
                if !cancelled {
                    job.status = JobStatus::InProgress;
                    job.ended_at = None;
                    job.output = output;
                    job.error = None;
                }
            }
            PostKind::Final if job.finals.first() == Some(body) => {
                // The same result again (its first post went unanswered): kept once.
                let post = &mut st.posts[index].1;
                post.accepted = false;
                post.repeat = true;
                drop(st);
                sh.bump();
                return;
            }
            PostKind::Final => {
                if !job.finals.is_empty() {
                    violations.push(format!("result delivered twice for job {job_id:?}"));
                }
                job.finals.push(body.clone());
                if body.get("stopPod") == Some(&Value::Bool(true)) {
                    job.stop_pod = true;
                }
                if !cancelled {
                    let error = body.get("error").filter(|e| !e.is_null()).cloned();
                    job.status = if error.is_some() {
                        JobStatus::Failed
                    } else {
                        JobStatus::Completed
                    };
                    job.output = body.get("output").cloned();
                    job.error = error;
                    job.ended_at = Some(now);
                }
            }
            PostKind::Stream => {}
        }
        if job.taken_at.is_none() {
            job.taken_at = Some(now);
        }
        let view = job.view(job_id, now);
        job.history.push(view);
    }
    for v in violations {
        ctx.violation(sh, v);
    }
    sh.bump();
}

/// The SDK's per-post headers (§1.7): the form content type over a JSON body, a `charset`
/// header and the job id as `X-Request-ID`.
fn check_post_headers(sh: &Shared, ctx: &Ctx, headers: &HeaderMap, job_id: &str) {
    let one = |name: &str| -> Result<Option<String>, ()> {
        let all: Vec<_> = headers.get_all(name).iter().collect();
        match all.as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(String::from_utf8_lossy(v.as_bytes()).into_owned())),
            _ => Err(()),
        }
    };
    // aiohttp sends a bytes body with its length, never chunked; so must the worker, also for
    // a result it sends in pieces.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        ctx.violation(
            sh,
            "a post with `Transfer-Encoding` (expected a `Content-Length`)",
        );
    } else if one("content-length").ok().flatten().is_none() {
        ctx.violation(sh, "a post without one `Content-Length` header");
    }
    // An id no header can carry goes without `X-Request-ID`.
    let header_id = axum::http::HeaderValue::from_str(job_id).is_ok();
    let expect = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("charset", "utf-8"),
        ("x-request-id", job_id),
    ];
    for (name, want) in expect {
        if name == "x-request-id" && !header_id {
            if one(name) != Ok(None) {
                ctx.violation(
                    sh,
                    format!("an `{name}` header for an id no header can carry"),
                );
            }
            continue;
        }
        match one(name) {
            Ok(Some(v)) if v == want => {}
            Ok(Some(v)) => ctx.violation(sh, format!("header `{name}: {v}`, expected {want:?}")),
            Ok(None) => ctx.violation(sh, format!("no `{name}` header (expected {want:?})")),
            Err(()) => ctx.violation(sh, format!("more than one `{name}` header")),
        }
    }
}

/// The body's shape and the `isStream` parameter, per §1.7–§1.10.
fn check_post_body(sh: &Shared, ctx: &Ctx, kind: PostKind, stream: bool, body: &Value, q: &str) {
    let params = parse_query(q);
    let is_stream = param(&params, "isStream");
    let allowed_stream: &[&str] = match kind {
        PostKind::Final => &["false", "true"],
        PostKind::Progress | PostKind::Stream => &["false"],
    };
    match is_stream {
        Some(v) if allowed_stream.contains(&v) => {}
        other => ctx.violation(
            sh,
            format!("`isStream` is {other:?}, expected one of {allowed_stream:?}"),
        ),
    }
    for (k, _) in &params {
        if !matches!(k.as_str(), "gpu" | "isStream") {
            ctx.violation(sh, format!("unexpected query parameter `{k}`"));
        }
    }
    if kind == PostKind::Progress && stream {
        ctx.violation(
            sh,
            "progress posted to the job-stream URL; the SDK posts it to job-done",
        );
    }
    let Some(obj) = body.as_object() else {
        ctx.violation(sh, format!("body is not a JSON object: {body}"));
        return;
    };
    let allowed: &[&str] = match kind {
        PostKind::Progress => &["status", "output"],
        PostKind::Final => &["output", "error", "stopPod"],
        PostKind::Stream => &["output"],
    };
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            ctx.violation(
                sh,
                format!("unexpected key `{k}` in a {kind:?} body (allowed: {allowed:?})"),
            );
        }
    }
    if kind == PostKind::Progress && !obj.contains_key("output") {
        ctx.violation(sh, "progress post without `output`");
    }
    if let Some(s) = obj.get("stopPod") {
        if s != &Value::Bool(true) {
            ctx.violation(
                sh,
                format!("`stopPod` is {s}; the SDK only ever sends true"),
            );
        }
    }
}

/// The string ids of the job objects in a job-take body (an object or a batch array).
fn job_ids_in(body: &Value) -> Vec<String> {
    let one = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_string);
    match body {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn bad_request() -> Response {
    (StatusCode::BAD_REQUEST, "Bad Request").into_response()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Decodes `%XX` escapes in a path segment (`+` stays a plus, as in paths).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP listener whose connections can be reset from inside a handler ([`Fault::Reset`]).
struct ResettableListener(TcpListener);

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    // No Nagle delay on loopback (it would add ~40 ms to answers sent in parts).
                    let _ = inner.set_nodelay(true);
                    let io = ResettableStream {
                        inner,
                        kill: Arc::new(AtomicBool::new(false)),
                    };
                    return (io, addr);
                }
                // Out of file descriptors and the like: wait a little, as axum's listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The handle a handler gets (as connect info) to reset its own connection.
#[derive(Clone)]
struct ConnKill(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, ResettableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        ConnKill(stream.io().kill.clone())
    }
}

/// A TCP stream that, once killed, fails every read and write and closes with `SO_LINGER` 0 —
/// that is, with a reset — when hyper drops it.
struct ResettableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl ResettableStream {
    fn killed(&self) -> Option<io::Error> {
        if !self.kill.load(Ordering::SeqCst) {
            return None;
        }
        let _ = self.inner.set_zero_linger();
        Some(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by an injected fault",
        ))
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
