//! A fake ComfyUI server that replays a real recording (`tests/fixtures/comfyui/transcripts/*.json`).
//!
//! The recordings come from a real ComfyUI 0.3.64 server (see `shared/comfyui/README.md`). The fake
//! serves the same HTTP + WebSocket protocol on `127.0.0.1:0`, and when the client under test posts
//! its prompt it plays the recorded WebSocket frames back with the recorded relative timing
//! (scaled by [`ReplayOptions::time_scale`]), including the races between the `POST /prompt`
//! reply and the first frames. Every recorded `prompt_id` / `client_id` is replaced by the ids the
//! client actually used. Things the real server would accept but that break the client's contract
//! are recorded as [`ReplayServer::violations`] instead of panicking.
//!
//! Routing follows the real server: `status` frames and binary `TEXT` (event 3) frames are
//! broadcast to every open socket, everything else goes only to the newest socket registered under
//! the prompt's `client_id` and is silently dropped if there is none (no buffering).
//!
//! Other rules worth knowing when writing a test:
//! - In the `interrupt*` recordings the frames recorded after `POST /interrupt` are held until the
//!   client interrupts; a client that never does waits forever (bound the test with a timeout).
//! - `GET /history/{id}` is `{}` until `executing{node:null}` has been sent; `GET /queue` lists
//!   the prompt as running from the accepted `POST /prompt` until then, as ComfyUI does.
//! - A socket reconnecting with the prompting client's id while a node runs first gets the
//!   connect-time `status`, then `executing{node}` (no `prompt_id`), like the real server.
//! - Binary previews are replayed in the recorded format: `preview` has event 1 even if the
//!   client negotiated `supports_preview_metadata` (use `preview_metadata` for event 4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, FromRequestParts, Multipart, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the recordings live, relative to the crate root.
const TRANSCRIPT_DIR: &str = "tests/fixtures/comfyui/transcripts";
/// The `GET /object_info` reply of the recorded server.
const OBJECT_INFO: &str = "crates/comfy-sim/assets/object_info.json";
/// What ComfyUI 0.3.64 answers to a client's `feature_flags` frame (observed).
const DEFAULT_FEATURE_FLAGS: &str = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"max_upload_size":104857600}}"#;
/// Largest request body the fake reads (ComfyUI's default `--max-upload-size`).
const MAX_BODY: usize = 100 * 1024 * 1024;

/// One parsed recording.
#[derive(Clone, Debug)]
pub struct Transcript {
    name: String,
    raw: Value,
}

impl Transcript {
    /// Loads `tests/fixtures/comfyui/transcripts/<name>.json`.
    pub fn load(name: &str) -> Transcript {
        let path = format!(
            "{}/{TRANSCRIPT_DIR}/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read transcript {path}: {e}"));
        let raw: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("transcript {path} is not JSON: {e}"));
        Transcript {
            name: name.to_string(),
            raw,
        }
    }

    /// The scenario name (`"ok"`, `"interrupt"`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The recorded `POST /prompt` request body's `prompt` (the API-format workflow).
    pub fn workflow(&self) -> Value {
        self.post_prompt()
            .and_then(|h| h.get("request_body"))
            .and_then(|b| b.get("prompt"))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The recorded outcome: `execution_success`, `execution_error`, `execution_interrupted`,
    /// `rejected_http_400`.
    pub fn outcome(&self) -> &str {
        self.raw["outcome"].as_str().unwrap_or("")
    }

    /// The whole recording, for assertions on fields this API doesn't expose.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The recorded text frames in order, without the `feature_flags` reply (which depends on what
    /// the client sends) and without the recording client's close, with the ids replaced.
    pub fn text_frames(&self, client_id: &str, prompt_id: &str) -> Vec<Value> {
        let subs = self.subs(client_id, prompt_id);
        self.frames()
            .iter()
            .filter(|f| f["opcode"] == "text" && f["data"]["type"] != "feature_flags")
            .map(|f| substitute(&f["data"], &subs))
            .collect()
    }

    /// The recorded `POST /prompt` reply (status, JSON body), with the ids replaced.
    pub fn prompt_reply(&self, client_id: &str, prompt_id: &str) -> (u16, Value) {
        let subs = self.subs(client_id, prompt_id);
        let h = self.post_prompt().cloned().unwrap_or(Value::Null);
        let status = h["status"].as_u64().unwrap_or(200) as u16;
        (status, substitute(&h["body"], &subs))
    }

    /// The recorded `GET /history/{id}` reply `{id: entry}`, with the ids replaced, if the
    /// recording has one.
    pub fn history(&self, client_id: &str, prompt_id: &str) -> Option<Value> {
        let subs = self.subs(client_id, prompt_id);
        self.http()
            .iter()
            .rfind(|h| {
                h["method"] == "GET"
                    && h["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("/history/"))
                    && h["body"].as_object().is_some_and(|o| !o.is_empty())
            })
            .map(|h| substitute(&h["body"], &subs))
    }

    /// The recorded `client_id` of the recording client.
    pub fn recorded_client_id(&self) -> &str {
        self.raw["client_id"].as_str().unwrap_or("")
    }

    /// The recorded `prompt_id` (`None` for the 400 scenarios).
    pub fn recorded_prompt_id(&self) -> Option<&str> {
        self.raw["prompt_id"].as_str()
    }

    fn frames(&self) -> &[Value] {
        self.raw["ws_frames"]
            .as_array()
            .map_or(&[], |a| a.as_slice())
    }

    fn http(&self) -> &[Value] {
        self.raw["http"].as_array().map_or(&[], |a| a.as_slice())
    }

    fn setup_http(&self) -> &[Value] {
        self.raw["setup_http"]
            .as_array()
            .map_or(&[], |a| a.as_slice())
    }

    fn post_prompt(&self) -> Option<&Value> {
        self.http()
            .iter()
            .find(|h| h["method"] == "POST" && h["path"] == "/prompt")
    }

    fn post_interrupt(&self) -> Option<&Value> {
        self.http()
            .iter()
            .find(|h| h["method"] == "POST" && h["path"] == "/interrupt")
    }

    fn subs(&self, client_id: &str, prompt_id: &str) -> Vec<(String, String)> {
        let mut subs = Vec::new();
        if let Some(p) = self.recorded_prompt_id() {
            subs.push((p.to_string(), prompt_id.to_string()));
        }
        subs.push((self.recorded_client_id().to_string(), client_id.to_string()));
        subs
    }
}

/// How to replay.
#[derive(Clone, Copy, Debug)]
pub struct ReplayOptions {
    /// 1.0 = recorded timing, 0.05 = twenty times faster, 0.0 = no delays (same order).
    pub time_scale: f64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { time_scale: 1.0 }
    }
}

/// The running fake; stops when dropped.
pub struct ReplayServer {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
}

impl ReplayServer {
    /// Binds `127.0.0.1:0` and serves the recording.
    pub async fn start(t: Transcript, opts: ReplayOptions) -> ReplayServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::new(t, opts));
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        ReplayServer { shared, addr }
    }

    /// `"127.0.0.1:PORT"`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Protocol violations by the client (e.g. `POST /prompt` before the WS with that client_id
    /// was open, client_id mismatch, Origin header sent, unknown route, a second `POST /prompt`).
    /// Tests assert this is empty.
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Bodies of every `POST /interrupt`, in order (`None` = empty body).
    pub fn interrupts(&self) -> Vec<Option<Value>> {
        self.shared.lock().interrupts.clone()
    }

    /// Every request as `"METHOD /path?query"`, in arrival order (WS upgrades included).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Abruptly drops every WS connection (no close handshake), for reconnect tests.
    pub fn drop_websockets(&self) {
        let conns = std::mem::take(&mut self.shared.lock().conns);
        for c in conns {
            c.kill.cancel();
        }
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// Everything the handlers share.
struct Shared {
    script: Script,
    opts: ReplayOptions,
    state: Mutex<RunState>,
    /// Set by an effective `POST /interrupt`; releases the held-back frames.
    interrupted: watch::Sender<bool>,
    /// Cancelled when the [`ReplayServer`] is dropped.
    stop: CancellationToken,
}

/// Mutable state, behind one lock that is never held across an await.
#[derive(Default)]
struct RunState {
    violations: Vec<String>,
    interrupts: Vec<Option<Value>>,
    requests: Vec<String>,
    conns: Vec<Conn>,
    next_conn: u64,
    run: Option<Run>,
    /// `executing.node` / `display_node` of the last `executing` frame sent.
    last_node: Option<(String, String)>,
    /// The terminal `executing{node:null}` has been sent: history is stored.
    done: bool,
}

/// The client's prompt, once posted.
struct Run {
    client_id: Option<String>,
    prompt_id: String,
    subs: Vec<(String, String)>,
    /// The queue 5-array `[number, prompt_id, prompt, extra_data, outputs]` while it runs.
    queue_item: Option<Value>,
}

/// One open WebSocket.
struct Conn {
    id: u64,
    client_id: String,
    tx: mpsc::UnboundedSender<Out>,
    kill: CancellationToken,
}

/// What a connection's writer does next.
enum Out {
    Msg(Message),
    /// Acknowledge once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// The recording, pre-digested for replay.
struct Script {
    transcript: Transcript,
    /// Recorded clock at which the client sent `POST /prompt`.
    t_post: f64,
    /// Recorded clock at which the `POST /prompt` reply arrived.
    t_reply: f64,
    post_status: StatusCode,
    post_body: Value,
    /// Frames sent on connect (recorded before `POST /prompt`, minus the feature_flags reply).
    connect_frames: Vec<Frame>,
    feature_flags: Option<Value>,
    /// Frames replayed after `POST /prompt`, in recorded order.
    run_frames: Vec<Frame>,
    /// `(sent, received)` of the recorded `POST /interrupt`.
    interrupt: Option<(f64, f64)>,
    history: Option<Value>,
    system_stats: Value,
    views: Vec<ViewFile>,
}

#[derive(Clone)]
struct Frame {
    t_ms: f64,
    kind: FrameKind,
}

#[derive(Clone)]
enum FrameKind {
    Text(Value),
    Binary {
        length: usize,
        head: Vec<u8>,
        image_type: Option<String>,
    },
}

struct ViewFile {
    filename: String,
    subfolder: String,
    kind: String,
    length: Option<usize>,
}

impl Script {
    fn new(t: Transcript) -> Script {
        let post = t.post_prompt().cloned().unwrap_or(Value::Null);
        let t_post = post["t_ms_sent"].as_f64().unwrap_or(0.0);
        let t_reply = post["t_ms_received"].as_f64().unwrap_or(t_post);
        let post_status = post["status"]
            .as_u64()
            .and_then(|s| StatusCode::from_u16(s as u16).ok())
            .unwrap_or(StatusCode::OK);
        let mut connect_frames = Vec::new();
        let mut run_frames = Vec::new();
        let mut feature_flags = None;
        for f in t.frames() {
            let t_ms = f["t_ms"].as_f64().unwrap_or(0.0);
            let kind = match f["opcode"].as_str() {
                Some("text") => {
                    if f["data"]["type"] == "feature_flags" {
                        feature_flags.get_or_insert_with(|| f["data"].clone());
                        continue;
                    }
                    FrameKind::Text(f["data"].clone())
                }
                Some("binary") => FrameKind::Binary {
                    length: f["length"].as_u64().unwrap_or(0) as usize,
                    head: hex_decode(f["head_hex"].as_str().unwrap_or("")),
                    image_type: f["decoded_metadata"]["image_type"]
                        .as_str()
                        .map(str::to_string),
                },
                // The close frame was the recording client's own close.
                _ => continue,
            };
            let frame = Frame { t_ms, kind };
            if t_ms < t_post {
                connect_frames.push(frame);
            } else {
                run_frames.push(frame);
            }
        }
        let interrupt = t.post_interrupt().map(|h| {
            let sent = h["t_ms_sent"].as_f64().unwrap_or(0.0);
            (sent, h["t_ms_received"].as_f64().unwrap_or(sent))
        });
        let system_stats = t
            .setup_http()
            .iter()
            .chain(t.http())
            .find(|h| h["path"] == "/system_stats")
            .map(|h| h["body"].clone())
            .unwrap_or_else(|| json!({"system": {"comfyui_version": "0.3.64"}, "devices": []}));
        let history = t.history(t.recorded_client_id(), t.recorded_prompt_id().unwrap_or(""));
        let mut views: Vec<ViewFile> = Vec::new();
        for h in t.http() {
            let Some(path) = h["path"].as_str() else {
                continue;
            };
            let Some(query) = path.strip_prefix("/view?") else {
                continue;
            };
            let q = parse_query(query);
            views.push(ViewFile {
                filename: q.get("filename").cloned().unwrap_or_default(),
                subfolder: q.get("subfolder").cloned().unwrap_or_default(),
                kind: q.get("type").cloned().unwrap_or_else(|| "output".into()),
                length: h["body_length"].as_u64().map(|l| l as usize),
            });
        }
        // Files named in the recorded history but never fetched by the recording client.
        if let Some(outputs) = history.as_ref().and_then(|h| {
            h.as_object()
                .and_then(|o| o.values().next())
                .map(|e| e["outputs"].clone())
        }) {
            let mut refs = Vec::new();
            collect_file_refs(&outputs, &mut refs);
            for (filename, subfolder, kind) in refs {
                if !views
                    .iter()
                    .any(|v| v.filename == filename && v.subfolder == subfolder && v.kind == kind)
                {
                    views.push(ViewFile {
                        filename,
                        subfolder,
                        kind,
                        length: None,
                    });
                }
            }
        }
        Script {
            post_body: post["body"].clone(),
            transcript: t,
            t_post,
            t_reply,
            post_status,
            connect_frames,
            feature_flags,
            run_frames,
            interrupt,
            history,
            system_stats,
            views,
        }
    }
}

impl Shared {
    fn new(t: Transcript, opts: ReplayOptions) -> Shared {
        Shared {
            script: Script::new(t),
            opts,
            state: Mutex::new(RunState::default()),
            interrupted: watch::channel(false).0,
            stop: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn violation(&self, v: String) {
        self.lock().violations.push(v);
    }

    /// Recorded milliseconds scaled to real time.
    fn scaled(&self, ms: f64) -> Duration {
        let scale = if self.opts.time_scale.is_finite() && self.opts.time_scale > 0.0 {
            self.opts.time_scale
        } else {
            0.0
        };
        let secs = (ms.max(0.0) * scale / 1000.0).min(3600.0);
        Duration::from_secs_f64(secs)
    }

    async fn sleep_until(&self, due: Instant) -> bool {
        if due <= Instant::now() {
            return !self.stop.is_cancelled();
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

/// The single entry point: logs the request, checks Origin, dispatches by hand so that unknown
/// routes can be recorded as violations.
async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    sh.lock()
        .requests
        .push(format!("{method} {path_and_query}"));

    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("<non-ascii>").to_string();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        sh.violation(format!(
            "{method} {path_and_query}: sent an Origin header ({origin:?}); ComfyUI answers 403 unless it equals http://<host>"
        ));
        let origin_host = origin.split("://").nth(1).unwrap_or(&origin);
        if origin_host != host {
            return (StatusCode::FORBIDDEN, "403: Forbidden").into_response();
        }
    }

    // Every route is also served under /api (server.py add_routes).
    let full = uri.path();
    let path = match full.strip_prefix("/api") {
        Some(p) if p.starts_with('/') => p,
        _ => full,
    }
    .to_string();
    let query = parse_query(uri.query().unwrap_or(""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();

    match (method.as_str(), segments.as_slice()) {
        ("GET", ["ws"]) => ws_connect(sh, req, query).await,
        ("GET", ["prompt"]) => {
            let running = sh
                .lock()
                .run
                .as_ref()
                .is_some_and(|r| r.queue_item.is_some());
            json_response(
                StatusCode::OK,
                &json!({"exec_info": {"queue_remaining": usize::from(running)}}),
            )
        }
        ("POST", ["prompt"]) => post_prompt(sh, req).await,
        ("POST", ["interrupt"]) => post_interrupt(sh, req).await,
        // Deleting pending prompts: the replayed prompt is never pending once accepted, so this
        // changes nothing, as on the real server for a running prompt.
        ("POST", ["queue"]) => (StatusCode::OK, "").into_response(),
        ("GET", ["history"]) => json_response(StatusCode::OK, &history(&sh, None)),
        ("GET", ["history", id]) => json_response(StatusCode::OK, &history(&sh, Some(id))),
        ("GET", ["view"]) => view(&sh, &query),
        ("GET", ["object_info"]) => object_info(None),
        ("GET", ["object_info", class]) => object_info(Some(class)),
        ("GET", ["system_stats"]) => json_response(StatusCode::OK, &sh.script.system_stats),
        ("GET", ["features"]) => json_response(
            StatusCode::OK,
            &serde_json::from_str::<Value>(DEFAULT_FEATURE_FLAGS).unwrap_or_default()["data"],
        ),
        ("GET", ["queue"]) => {
            let running: Vec<Value> = sh
                .lock()
                .run
                .as_ref()
                .and_then(|r| r.queue_item.clone())
                .into_iter()
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"queue_running": running, "queue_pending": []}),
            )
        }
        ("POST", ["upload", "image"]) => upload_image(sh, req).await,
        ("POST", ["free"]) => StatusCode::OK.into_response(),
        // The recordings are of 0.3.64, which has no jobs API: the static route answers, as a
        // client probing for it expects.
        ("GET", ["jobs"]) if full.starts_with("/api/") => {
            (StatusCode::NOT_FOUND, "404: Not Found").into_response()
        }
        _ => {
            sh.violation(format!("unknown route: {method} {path_and_query}"));
            (StatusCode::NOT_FOUND, "404: Not Found").into_response()
        }
    }
}

/// `GET /history[/{id}]`: `{}` until the terminal `executing{node:null}` has been sent.
fn history(sh: &Shared, id: Option<&str>) -> Value {
    let st = sh.lock();
    match (&st.run, st.done, &sh.script.history) {
        (Some(run), true, Some(h)) if id.is_none_or(|id| id == run.prompt_id) => {
            substitute(h, &run.subs)
        }
        _ => json!({}),
    }
}

/// `GET /ws?clientId=`: registers the socket *before* answering 101, so that a `POST /prompt`
/// sent right after the handshake always finds it, and queues the connect-time frames first.
async fn ws_connect(sh: Arc<Shared>, req: Request, query: HashMap<String, String>) -> Response {
    let (mut parts, _body) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => {
            sh.violation(format!(
                "GET /ws without a WebSocket upgrade: {}",
                rejection.body_text()
            ));
            return rejection.into_response();
        }
    };
    let client_id = match query.get("clientId") {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            sh.violation("GET /ws without clientId (the server invents one; the client can't route its prompt)".into());
            uuid::Uuid::new_v4().simple().to_string()
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let kill = CancellationToken::new();
    let conn_id = {
        let mut st = sh.lock();
        // The connect-time status carries *this* socket's id as `sid`.
        let recorded_cid = sh.script.transcript.recorded_client_id().to_string();
        let mut subs = vec![(recorded_cid.clone(), client_id.clone())];
        if let Some(run) = &st.run {
            subs.extend(
                run.subs
                    .iter()
                    .filter(|(from, _)| *from != recorded_cid)
                    .cloned(),
            );
        }
        let queued = st.run.as_ref().is_some_and(|r| r.queue_item.is_some());
        for f in &sh.script.connect_frames {
            let m = match &f.kind {
                FrameKind::Text(v) => {
                    let mut v = substitute(v, &subs);
                    // Recorded with an empty queue; a prompt may be running now.
                    if queued && v["type"] == "status" {
                        v["data"]["status"]["exec_info"]["queue_remaining"] = json!(1);
                    }
                    text_message(&v)
                }
                FrameKind::Binary { .. } => render_frame(f, &subs, None, ""),
            };
            let _ = tx.send(Out::Msg(m));
        }
        // Reconnecting prompting client while a node runs: the server repeats `executing`.
        if let (Some(run), Some((_, display))) = (&st.run, &st.last_node) {
            if run.client_id.as_deref() == Some(client_id.as_str()) && !st.done {
                let m = json!({"type": "executing", "data": {"node": display}});
                let _ = tx.send(Out::Msg(text_message(&m)));
            }
        }
        if st.conns.iter().any(|c| c.client_id == client_id) {
            st.violations.push(format!(
                "second WebSocket opened with clientId {client_id} while the first is still open (ComfyUI's socket-replacement bug)"
            ));
        }
        st.next_conn += 1;
        let id = st.next_conn;
        st.conns.push(Conn {
            id,
            client_id: client_id.clone(),
            tx: tx.clone(),
            kill: kill.clone(),
        });
        id
    };
    let sh_failed = sh.clone();
    upgrade
        .on_failed_upgrade(move |_| {
            sh_failed.lock().conns.retain(|c| c.id != conn_id);
        })
        .on_upgrade(move |socket| serve_socket(sh, socket, conn_id, tx, rx, kill))
}

async fn serve_socket(
    sh: Arc<Shared>,
    socket: WebSocket,
    conn_id: u64,
    tx: mpsc::UnboundedSender<Out>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    kill: CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let writer = async {
        while let Some(out) = rx.recv().await {
            match out {
                Out::Msg(m) => {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
                Out::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    };
    let reader = async {
        let mut first_text = true;
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Text(text) if first_text => {
                    first_text = false;
                    // Only the first text frame is inspected (server.py websocket_handler).
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    if v["type"] == "feature_flags" && v["data"].is_object() {
                        let reply = sh.script.feature_flags.clone().unwrap_or_else(|| {
                            serde_json::from_str(DEFAULT_FEATURE_FLAGS).unwrap_or_default()
                        });
                        let _ = tx.send(Out::Msg(text_message(&reply)));
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = kill.cancelled() => {}
        _ = sh.stop.cancelled() => {}
    }
    sh.lock().conns.retain(|c| c.id != conn_id);
    // Dropping the socket here closes the TCP connection; after `kill` there is no close frame.
}

/// `POST /prompt`: checks the client's contract, then replays.
async fn post_prompt(sh: Arc<Shared>, req: Request) -> Response {
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            sh.violation(format!("POST /prompt: unreadable body: {e}"));
            return internal_error();
        }
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            sh.violation(format!(
                "POST /prompt: body is not a JSON object ({} bytes); ComfyUI answers 500",
                body.len()
            ));
            return internal_error();
        }
    };
    let script = &sh.script;
    let t = &script.transcript;
    let (reply_rx, reply) = {
        let mut st = sh.lock();
        let prompt_id = match v.get("prompt_id") {
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            _ => {
                st.violations.push(
                    "POST /prompt without a client-generated prompt_id (execution_start can race the reply)".into(),
                );
                t.recorded_prompt_id()
                    .map(str::to_string)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
            }
        };
        if !v.get("prompt").is_some_and(Value::is_object) {
            st.violations
                .push("POST /prompt: `prompt` missing or not an object".into());
        }
        let client_id = match v.get("client_id") {
            Some(Value::String(c)) => Some(c.clone()),
            _ => {
                st.violations.push(
                    "POST /prompt without client_id: ComfyUI would not send it execution events"
                        .into(),
                );
                None
            }
        };
        if let Some(c) = &client_id {
            if !st.conns.iter().any(|conn| &conn.client_id == c) {
                let open: Vec<String> = st.conns.iter().map(|c| c.client_id.clone()).collect();
                st.violations.push(format!(
                    "POST /prompt with client_id {c:?} but no open WebSocket with that clientId (open: {open:?}); its frames are dropped"
                ));
            }
        }
        let subs = t.subs(client_id.as_deref().unwrap_or(""), &prompt_id);
        let reply = substitute(&script.post_body, &subs);
        if st.run.is_some() {
            st.violations.push(format!(
                "second POST /prompt (prompt_id {prompt_id}); nothing replayed for it"
            ));
            drop(st);
            return json_response(script.post_status, &reply);
        }
        let queue_item = script.post_status.is_success().then(|| {
            let mut extra = v
                .get("extra_data")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if let Some(c) = &client_id {
                extra.insert("client_id".into(), json!(c));
            }
            let outputs = script
                .history
                .as_ref()
                .and_then(|h| {
                    h.as_object()?
                        .values()
                        .next()
                        .map(|e| e["prompt"][4].clone())
                })
                .unwrap_or_else(|| json!([]));
            json!([reply["number"], prompt_id, v["prompt"], extra, outputs])
        });
        st.run = Some(Run {
            client_id,
            prompt_id,
            subs,
            queue_item,
        });
        let (reply_tx, reply_rx) = oneshot::channel();
        tokio::spawn(replay(sh.clone(), reply_tx));
        (reply_rx, reply)
    };
    match reply_rx.await {
        Ok(()) => json_response(script.post_status, &reply),
        // The server is shutting down.
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// One step of the replay timeline.
enum Step {
    Frame(usize),
    Reply,
    AwaitInterrupt,
}

/// Plays the run frames from the moment `POST /prompt` arrived; answers the POST at the recorded
/// moment, after every frame recorded before the reply has been written.
async fn replay(sh: Arc<Shared>, reply_tx: oneshot::Sender<()>) {
    let script = &sh.script;
    let mut steps: Vec<(f64, u8, Step)> = script
        .run_frames
        .iter()
        .enumerate()
        .map(|(i, f)| (f.t_ms, 0, Step::Frame(i)))
        .collect();
    steps.push((script.t_reply, 1, Step::Reply));
    if let Some((sent, _)) = script.interrupt {
        steps.push((sent, 2, Step::AwaitInterrupt));
    }
    steps.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    let mut reply_tx = Some(reply_tx);
    let mut base = Instant::now();
    let mut t0 = script.t_post;
    for (t_ms, _, step) in steps {
        if !sh.sleep_until(base + sh.scaled(t_ms - t0)).await {
            return;
        }
        match step {
            Step::Frame(i) => dispatch(&sh, &script.run_frames[i]),
            Step::Reply => {
                let acks: Vec<oneshot::Receiver<()>> = {
                    let st = sh.lock();
                    st.conns
                        .iter()
                        .filter_map(|c| {
                            let (ack_tx, ack_rx) = oneshot::channel();
                            c.tx.send(Out::Flush(ack_tx)).ok().map(|_| ack_rx)
                        })
                        .collect()
                };
                for ack in acks {
                    // An error just means the connection went away meanwhile.
                    let _ = ack.await;
                }
                if let Some(tx) = reply_tx.take() {
                    let _ = tx.send(());
                }
            }
            Step::AwaitInterrupt => {
                let mut rx = sh.interrupted.subscribe();
                tokio::select! {
                    _ = rx.wait_for(|v| *v) => {}
                    _ = sh.stop.cancelled() => return,
                }
                base = Instant::now();
                t0 = t_ms;
            }
        }
    }
}

/// Sends one run frame to its recipients, as the real server routes it.
fn dispatch(sh: &Shared, frame: &Frame) {
    let mut st = sh.lock();
    let Some(run) = &st.run else {
        return;
    };
    let subs = run.subs.clone();
    let target = run.client_id.clone();
    let prompt_id = run.prompt_id.clone();
    let broadcast = match &frame.kind {
        FrameKind::Text(v) => v["type"] == "status",
        FrameKind::Binary { head, .. } => head.get(..4) == Some(&[0, 0, 0, 3]),
    };
    let node = st.last_node.clone();
    let msg = render_frame(frame, &subs, node.as_ref(), &prompt_id);
    if broadcast {
        for c in &st.conns {
            let _ = c.tx.send(Out::Msg(msg.clone()));
        }
    } else if let Some(c) = st
        .conns
        .iter()
        .rev()
        .find(|c| Some(&c.client_id) == target.as_ref())
    {
        let _ = c.tx.send(Out::Msg(msg));
    }
    if let FrameKind::Text(v) = &frame.kind {
        if v["type"] == "executing" {
            match v["data"]["node"].as_str() {
                Some(n) => {
                    let display = v["data"]["display_node"].as_str().unwrap_or(n);
                    st.last_node = Some((n.to_string(), display.to_string()));
                }
                None => {
                    st.last_node = None;
                    st.done = true;
                    if let Some(run) = st.run.as_mut() {
                        run.queue_item = None;
                    }
                }
            }
        }
    }
}

/// Turns a recorded frame into a message: ids substituted, binary payloads synthesized.
fn render_frame(
    frame: &Frame,
    subs: &[(String, String)],
    last_node: Option<&(String, String)>,
    prompt_id: &str,
) -> Message {
    match &frame.kind {
        FrameKind::Text(v) => text_message(&substitute(v, subs)),
        FrameKind::Binary {
            length,
            head,
            image_type,
        } => Message::Binary(
            synth_binary(*length, head, image_type.as_deref(), last_node, prompt_id).into(),
        ),
    }
}

fn text_message(v: &Value) -> Message {
    Message::Text(to_python_json(v).into())
}

/// Only the first 8 bytes of binary frames were recorded; rebuild a plausible frame.
fn synth_binary(
    length: usize,
    head: &[u8],
    image_type: Option<&str>,
    last_node: Option<&(String, String)>,
    prompt_id: &str,
) -> Vec<u8> {
    let event = head
        .get(..4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match event {
        1 => {
            let format = head
                .get(4..8)
                .map_or(1, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let mut out = Vec::with_capacity(length);
            out.extend_from_slice(&1u32.to_be_bytes());
            out.extend_from_slice(&format.to_be_bytes());
            let image_len = length.saturating_sub(8);
            if format == 2 {
                out.extend(png_of_length(Some(image_len)));
            } else {
                out.extend(jpeg_ish(image_len));
            }
            out
        }
        4 => {
            let (node, display) = last_node
                .cloned()
                .unwrap_or_else(|| (String::new(), String::new()));
            let image_type = image_type.unwrap_or("image/jpeg");
            let meta = to_python_json(&json!({
                "node_id": node,
                "prompt_id": prompt_id,
                "display_node_id": display,
                "parent_node_id": null,
                "real_node_id": node,
                "image_type": image_type,
            }));
            let mut out = Vec::with_capacity(length);
            out.extend_from_slice(&4u32.to_be_bytes());
            out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            out.extend_from_slice(meta.as_bytes());
            let image_len = length.saturating_sub(out.len());
            if image_type == "image/png" {
                out.extend(png_of_length(Some(image_len)));
            } else {
                out.extend(jpeg_ish(image_len));
            }
            out
        }
        _ => {
            let mut out = head.to_vec();
            out.resize(length.max(head.len()), 0);
            out
        }
    }
}

/// `FF D8 FF E0` JFIF start, zero filler, `FF D9` end: enough for magic-byte sniffing.
fn jpeg_ish(len: usize) -> Vec<u8> {
    let mut out = vec![
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00,
    ];
    let len = len.max(out.len() + 2);
    out.resize(len - 2, 0);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// `POST /interrupt`: records the body; releases the held-back frames if it targets the run.
async fn post_interrupt(sh: Arc<Shared>, req: Request) -> Response {
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .unwrap_or_default();
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
        )
    };
    {
        let mut st = sh.lock();
        st.interrupts.push(parsed.clone());
        let running = st
            .run
            .as_ref()
            .filter(|_| !st.done)
            .map(|r| r.prompt_id.clone());
        match (
            running,
            parsed.as_ref().and_then(|p| p["prompt_id"].as_str()),
        ) {
            (Some(running), Some(target)) if running != target => {
                st.violations.push(format!(
                    "POST /interrupt for prompt_id {target:?} while {running:?} runs: ComfyUI ignores it"
                ));
            }
            (Some(_), _) => {
                sh.interrupted.send_replace(true);
            }
            (None, _) => {}
        }
    }
    if let Some((sent, received)) = sh.script.interrupt {
        let _ = sh
            .sleep_until(Instant::now() + sh.scaled(received - sent))
            .await;
    }
    StatusCode::OK.into_response()
}

/// `GET /view`: a valid PNG (of the recorded size when possible) for a known file, else 404.
fn view(sh: &Shared, query: &HashMap<String, String>) -> Response {
    let Some(filename) = query.get("filename") else {
        return (StatusCode::NOT_FOUND, "404: Not Found").into_response();
    };
    let subfolder = query.get("subfolder").map_or("", String::as_str);
    let kind = query.get("type").map_or("output", String::as_str);
    if !matches!(kind, "output" | "input" | "temp") {
        return (StatusCode::BAD_REQUEST, "400: Bad Request").into_response();
    }
    // Recorded names carry the recording's ids only by accident; substitute anyway.
    let subs = sh
        .lock()
        .run
        .as_ref()
        .map(|r| r.subs.clone())
        .unwrap_or_default();
    let found = sh.script.views.iter().find(|v| {
        replace_all(&v.filename, &subs) == *filename
            && replace_all(&v.subfolder, &subs) == subfolder
            && v.kind == kind
    });
    match found {
        Some(v) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_str(&format!("filename=\"{filename}\""))
                        .unwrap_or(HeaderValue::from_static("inline")),
                ),
            ],
            png_of_length(v.length),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "404: Not Found").into_response(),
    }
}

fn object_info(class: Option<&str>) -> Response {
    let path = format!("{}/{OBJECT_INFO}", env!("CARGO_MANIFEST_DIR"));
    let Ok(bytes) = std::fs::read(&path) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {path}"),
        )
            .into_response();
    };
    match class {
        None => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            bytes,
        )
            .into_response(),
        Some(class) => {
            let all: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let body = match all.get(class) {
                Some(info) => json!({ class: info }),
                None => json!({}),
            };
            json_response(StatusCode::OK, &body)
        }
    }
}

/// `POST /upload/image` (multipart): answers `{"name","subfolder","type"}` like ComfyUI.
async fn upload_image(sh: Arc<Shared>, req: Request) -> Response {
    let mut multipart = match Multipart::from_request(req, &()).await {
        Ok(m) => m,
        Err(e) => {
            sh.violation(format!(
                "POST /upload/image: not multipart: {}",
                e.body_text()
            ));
            return (StatusCode::BAD_REQUEST, "400: Bad Request").into_response();
        }
    };
    let mut name = None;
    let mut subfolder = String::new();
    let mut kind = "input".to_string();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let field_name = field.name().unwrap_or("").to_string();
                let file_name = field.file_name().map(str::to_string);
                let data = field.bytes().await.unwrap_or_default();
                match field_name.as_str() {
                    "image" => name = file_name.or(Some(String::new())),
                    "subfolder" => subfolder = String::from_utf8_lossy(&data).into_owned(),
                    "type" => kind = String::from_utf8_lossy(&data).into_owned(),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                sh.violation(format!("POST /upload/image: bad multipart: {e}"));
                return (StatusCode::BAD_REQUEST, "400: Bad Request").into_response();
            }
        }
    }
    match name {
        Some(name) if !name.is_empty() => json_response(
            StatusCode::OK,
            &json!({"name": name, "subfolder": subfolder, "type": kind}),
        ),
        _ => {
            sh.violation("POST /upload/image without an `image` file part".into());
            (StatusCode::BAD_REQUEST, "400: Bad Request").into_response()
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(to_python_json(body)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn internal_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error",
    )
        .into_response()
}

/// Deep string replace over values and object keys (history is keyed by prompt_id).
fn substitute(v: &Value, subs: &[(String, String)]) -> Value {
    match v {
        Value::String(s) => Value::String(replace_all(s, subs)),
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, subs)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (replace_all(k, subs), substitute(x, subs)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn replace_all(s: &str, subs: &[(String, String)]) -> String {
    let mut out = s.to_string();
    for (from, to) in subs {
        if !from.is_empty() && out.contains(from.as_str()) {
            out = out.replace(from.as_str(), to);
        }
    }
    out
}

fn parse_query(q: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .collect()
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// `{filename, subfolder, type}` objects anywhere inside `v`.
fn collect_file_refs(v: &Value, out: &mut Vec<(String, String, String)>) {
    match v {
        Value::Object(m) => {
            if let Some(f) = m.get("filename").and_then(Value::as_str) {
                out.push((
                    f.to_string(),
                    m.get("subfolder")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    m.get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("output")
                        .to_string(),
                ));
            }
            m.values().for_each(|x| collect_file_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_file_refs(x, out)),
        _ => {}
    }
}

/// A valid 16×16 RGB PNG, padded with a `tEXt` chunk to exactly `len` bytes when `len` is large
/// enough (otherwise the smallest one this makes).
pub fn png_of_length(len: Option<usize>) -> Vec<u8> {
    const KEYWORD: &str = "Comment";
    let base = encode_png(None);
    if let Some(len) = len {
        // tEXt chunk: length(4) + type(4) + keyword + NUL + text + crc(4).
        let overhead = 12 + KEYWORD.len() + 1;
        if len >= base.len() + overhead {
            let padded = encode_png(Some((KEYWORD, "x".repeat(len - base.len() - overhead))));
            if padded.len() == len {
                return padded;
            }
        }
    }
    base
}

fn encode_png(text: Option<(&str, String)>) -> Vec<u8> {
    const SIDE: u32 = 16;
    let pixels: Vec<u8> = (0..SIDE * SIDE)
        .flat_map(|i| [(i % SIDE * 16) as u8, (i / SIDE * 16) as u8, 128])
        .collect();
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, SIDE, SIDE);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some((keyword, text)) = text {
        enc.add_text_chunk(keyword.to_string(), text)
            .expect("ASCII tEXt chunk");
    }
    let mut writer = enc.write_header().expect("PNG header into a Vec");
    writer
        .write_image_data(&pixels)
        .expect("PNG data into a Vec");
    writer.finish().expect("PNG end into a Vec");
    out
}

/// JSON the way Python's `json.dumps` writes it (aiohttp `send_json` / `json_response`):
/// `", "` and `": "` separators and `\uXXXX` escapes for non-ASCII.
pub fn to_python_json(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    serde::Serialize::serialize(v, &mut ser).expect("serializing a Value into a Vec");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}
