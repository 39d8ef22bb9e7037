//! Self-tests of the replay fake, driven by a raw client (reqwest + tokio-tungstenite) that does
//! what the worker's ComfyUI client will do. No sleeps as synchronisation: every wait is on a
//! message, and every test is bounded by [`LIMIT`].

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::replay::{png_of_length, to_python_json, ReplayOptions, ReplayServer, Transcript};

/// Upper bound for any single test.
const LIMIT: Duration = Duration::from_secs(30);
const FLAGS: &str = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One received WebSocket frame.
#[derive(Debug)]
enum Got {
    Text(Value),
    Binary(Vec<u8>),
}

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test did not finish in time");
}

fn fresh_client_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn fresh_prompt_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn start(name: &str, time_scale: f64) -> (Transcript, ReplayServer) {
    let t = Transcript::load(name);
    let server = ReplayServer::start(t.clone(), ReplayOptions { time_scale }).await;
    (t, server)
}

async fn connect(host: &str, client_id: &str, send_flags: bool) -> Ws {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{host}/ws?clientId={client_id}"))
            .await
            .expect("WebSocket handshake");
    if send_flags {
        ws.send(Message::Text(FLAGS.into()))
            .await
            .expect("send feature_flags");
    }
    ws
}

async fn next_frame(ws: &mut Ws) -> Got {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return Got::Text(serde_json::from_str(t.as_str()).expect("text frame is JSON"))
            }
            Some(Ok(Message::Binary(b))) => return Got::Binary(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            other => panic!("WebSocket ended unexpectedly: {other:?}"),
        }
    }
}

fn is_done(frame: &Got, prompt_id: &str) -> bool {
    matches!(frame, Got::Text(v) if v["type"] == "executing"
        && v["data"]["node"].is_null()
        && v["data"]["prompt_id"] == prompt_id)
}

/// Reads until (and including) `executing{node:null}` for `prompt_id`.
async fn read_until_done(ws: &mut Ws, prompt_id: &str) -> Vec<Got> {
    let mut got = Vec::new();
    loop {
        let f = next_frame(ws).await;
        let done = is_done(&f, prompt_id);
        got.push(f);
        if done {
            return got;
        }
    }
}

/// Text frames minus feature_flags replies, and the feature_flags replies.
fn split_texts(got: &[Got]) -> (Vec<Value>, Vec<Value>) {
    let texts = got.iter().filter_map(|g| match g {
        Got::Text(v) => Some(v.clone()),
        Got::Binary(_) => None,
    });
    texts.partition(|v| v["type"] != "feature_flags")
}

fn binaries(got: &[Got]) -> Vec<&[u8]> {
    got.iter()
        .filter_map(|g| match g {
            Got::Binary(b) => Some(b.as_slice()),
            Got::Text(_) => None,
        })
        .collect()
}

fn prompt_body(t: &Transcript, client_id: &str, prompt_id: &str) -> Value {
    json!({
        "prompt": t.workflow(),
        "client_id": client_id,
        "prompt_id": prompt_id,
        "extra_data": {"extra_pnginfo": {"job": "selftest"}},
    })
}

async fn post_json(http: &reqwest::Client, url: String, body: &Value) -> (u16, Value) {
    let resp = http.post(url).json(body).send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON reply"))
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    let resp = http.get(url).send().await.expect("GET");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("JSON reply")
}

/// Recorded `body_length` of the `/view` call for `filename`.
fn recorded_view_length(t: &Transcript, filename: &str) -> Option<usize> {
    t.raw()["http"].as_array()?.iter().find_map(|h| {
        let path = h["path"].as_str()?;
        (path.starts_with("/view?") && path.contains(filename))
            .then(|| h["body_length"].as_u64().map(|l| l as usize))?
    })
}

/// Number of recorded text frames (without feature_flags and close) sent before `t_ms`.
fn text_frames_before(t: &Transcript, t_ms: f64) -> usize {
    t.raw()["ws_frames"]
        .as_array()
        .expect("ws_frames")
        .iter()
        .filter(|f| {
            f["opcode"] == "text"
                && f["data"]["type"] != "feature_flags"
                && f["t_ms"].as_f64().is_some_and(|ms| ms <= t_ms)
        })
        .count()
}

async fn run_ok(time_scale: f64) {
    let (t, server) = start("ok", time_scale).await;
    assert_eq!(t.outcome(), "execution_success");
    let host = server.host();
    let http = reqwest::Client::new();
    let (cid, pid) = (fresh_client_id(), fresh_prompt_id());

    assert_eq!(
        get_json(&http, format!("http://{host}/history/{pid}")).await,
        json!({})
    );
    let mut ws = connect(&host, &cid, true).await;
    let (status, reply) = post_json(
        &http,
        format!("http://{host}/prompt"),
        &prompt_body(&t, &cid, &pid),
    )
    .await;
    assert_eq!((status, reply.clone()), t.prompt_reply(&cid, &pid));
    assert_eq!(reply["prompt_id"], pid.as_str());

    let got = read_until_done(&mut ws, &pid).await;
    let (texts, flags) = split_texts(&got);
    assert_eq!(
        flags,
        vec![
            json!({"type":"feature_flags","data":{"supports_preview_metadata":true,"max_upload_size":104857600}})
        ]
    );
    assert_eq!(texts, t.text_frames(&cid, &pid));
    assert_eq!(texts[0]["data"]["sid"], cid.as_str());
    assert!(binaries(&got).is_empty());

    let history = get_json(&http, format!("http://{host}/history/{pid}")).await;
    assert_eq!(Some(&history), t.history(&cid, &pid).as_ref());
    assert_eq!(history[&pid]["prompt"][3]["client_id"], cid.as_str());
    assert_eq!(
        get_json(
            &http,
            format!("http://{host}/history/{}", fresh_prompt_id())
        )
        .await,
        json!({})
    );

    let images: Vec<Value> = history[&pid]["outputs"]
        .as_object()
        .expect("outputs")
        .values()
        .flat_map(|o| o["images"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(images.len(), 2);
    for image in images {
        let filename = image["filename"].as_str().expect("filename");
        let url = url::Url::parse_with_params(
            &format!("http://{host}/view"),
            [
                ("type", image["type"].as_str().expect("type")),
                ("filename", filename),
                ("subfolder", image["subfolder"].as_str().expect("subfolder")),
            ],
        )
        .expect("view URL");
        let resp = http.get(url).send().await.expect("GET /view");
        assert_eq!(resp.status(), 200);
        let bytes = resp.bytes().await.expect("view body");
        assert_eq!(Some(bytes.len()), recorded_view_length(&t, filename));
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()))
            .read_info()
            .expect("a decodable PNG");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        reader.next_frame(&mut buf).expect("PNG pixels");
    }
    let missing = http
        .get(format!(
            "http://{host}/view?filename=nope.png&subfolder=&type=output"
        ))
        .send()
        .await
        .expect("GET /view");
    assert_eq!(missing.status(), 404);

    assert_eq!(server.violations(), Vec::<String>::new());
    let requests = server.requests();
    assert_eq!(requests[1], format!("GET /ws?clientId={cid}"));
    assert_eq!(requests[2], "POST /prompt");
}

#[tokio::test]
async fn ok_without_delays_replays_the_recorded_frames() {
    bounded(run_ok(0.0)).await;
}

#[tokio::test]
async fn ok_with_scaled_timing_replays_the_recorded_frames() {
    bounded(run_ok(0.02)).await;
}

#[tokio::test]
async fn other_recordings_replay_to_their_terminal_frame() {
    bounded(async {
        for (name, outcome_frame) in [
            ("ok_cached", "execution_success"),
            ("runtime_error", "execution_error"),
            ("runtime_error_custom", "execution_error"),
        ] {
            let (t, server) = start(name, 0.0).await;
            let host = server.host();
            let http = reqwest::Client::new();
            let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
            let mut ws = connect(&host, &cid, true).await;
            let (status, _) = post_json(
                &http,
                format!("http://{host}/prompt"),
                &prompt_body(&t, &cid, &pid),
            )
            .await;
            assert_eq!(status, 200, "{name}");
            let got = read_until_done(&mut ws, &pid).await;
            let (texts, _) = split_texts(&got);
            assert_eq!(texts, t.text_frames(&cid, &pid), "{name}");
            assert!(
                texts
                    .iter()
                    .any(|v| v["type"] == outcome_frame && v["data"]["prompt_id"] == pid.as_str()),
                "{name}"
            );
            assert_eq!(
                Some(get_json(&http, format!("http://{host}/history/{pid}")).await),
                t.history(&cid, &pid),
                "{name}"
            );
            assert_eq!(server.violations(), Vec::<String>::new(), "{name}");
        }
    })
    .await;
}

#[tokio::test]
async fn frames_are_written_like_python_json_dumps() {
    bounded(async {
        let (_t, server) = start("ok", 0.0).await;
        let cid = fresh_client_id();
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?clientId={cid}", server.host()))
                .await
                .expect("handshake");
        match ws.next().await {
            Some(Ok(Message::Text(text))) => assert_eq!(
                text.as_str(),
                format!(
                    r#"{{"type": "status", "data": {{"status": {{"exec_info": {{"queue_remaining": 0}}}}, "sid": "{cid}"}}}}"#
                )
            ),
            other => panic!("expected the connect-time status, got {other:?}"),
        }
        assert_eq!(to_python_json(&json!({"a": ["é", 1.0]})), r#"{"a": ["\u00e9", 1.0]}"#);
    })
    .await;
}

/// `with_prompt_id`: interrupt with `{"prompt_id": <the client's id>}`, else with no body.
async fn run_interrupt(name: &str, with_prompt_id: bool) {
    let (t, server) = start(name, 0.0).await;
    assert_eq!(t.outcome(), "execution_interrupted");
    let host = server.host();
    let http = reqwest::Client::new();
    let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
    let mut ws = connect(&host, &cid, true).await;
    let (status, _) = post_json(
        &http,
        format!("http://{host}/prompt"),
        &prompt_body(&t, &cid, &pid),
    )
    .await;
    assert_eq!(status, 200);

    let expected = t.text_frames(&cid, &pid);
    let t_interrupt = t.raw()["http"]
        .as_array()
        .expect("http")
        .iter()
        .find(|h| h["path"] == "/interrupt")
        .and_then(|h| h["t_ms_sent"].as_f64())
        .expect("recorded POST /interrupt");
    let held_from = text_frames_before(&t, t_interrupt);
    assert!(held_from < expected.len());

    let mut before = Vec::new();
    while before.len() < held_from {
        match next_frame(&mut ws).await {
            Got::Text(v) if v["type"] == "feature_flags" => {}
            Got::Text(v) => before.push(v),
            Got::Binary(b) => panic!("unexpected binary frame {b:?}"),
        }
    }
    assert_eq!(before, expected[..held_from]);
    assert_eq!(before.last().expect("frames")["type"], "progress");

    // Nothing after the interrupt point has been sent: no history, still in the queue.
    assert_eq!(
        get_json(&http, format!("http://{host}/history/{pid}")).await,
        json!({})
    );
    let queue = get_json(&http, format!("http://{host}/queue")).await;
    assert_eq!(queue["queue_running"][0][1], pid.as_str());
    assert_eq!(queue["queue_running"][0][3]["client_id"], cid.as_str());
    assert!(server.interrupts().is_empty());

    let interrupt_body = with_prompt_id.then(|| json!({"prompt_id": pid}));
    let request = http.post(format!("http://{host}/interrupt"));
    let request = match &interrupt_body {
        Some(body) => request.json(body),
        None => request,
    };
    let resp = request.send().await.expect("POST /interrupt");
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.expect("body").is_empty());

    let rest = read_until_done(&mut ws, &pid).await;
    let (after, _) = split_texts(&rest);
    assert_eq!(after, expected[held_from..]);
    assert_eq!(after[0]["type"], "execution_interrupted");
    assert_eq!(server.interrupts(), vec![interrupt_body]);
    assert_eq!(
        Some(get_json(&http, format!("http://{host}/history/{pid}")).await),
        t.history(&cid, &pid)
    );
    assert_eq!(
        get_json(&http, format!("http://{host}/queue")).await,
        json!({"queue_running": [], "queue_pending": []})
    );
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn interrupt_holds_frames_until_the_client_interrupts() {
    bounded(run_interrupt("interrupt", true)).await;
}

#[tokio::test]
async fn global_interrupt_without_body_releases_the_held_frames() {
    bounded(run_interrupt("interrupt_global", false)).await;
}

#[tokio::test]
async fn interrupt_for_another_prompt_is_ignored_and_flagged() {
    bounded(run_interrupt_for_another_prompt("interrupt")).await;
}

/// A stale interrupt naming another prompt must not release the held frames.
async fn run_interrupt_for_another_prompt(name: &str) {
    let (t, server) = start(name, 0.0).await;
    let host = server.host();
    let http = reqwest::Client::new();
    let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
    let mut ws = connect(&host, &cid, true).await;
    post_json(
        &http,
        format!("http://{host}/prompt"),
        &prompt_body(&t, &cid, &pid),
    )
    .await;
    // Wait for the last frame before the recorded interrupt (progress 3/50).
    loop {
        if let Got::Text(v) = next_frame(&mut ws).await {
            if v["type"] == "progress" && v["data"]["value"] == 3 {
                break;
            }
        }
    }
    // A stale interrupt for another prompt is ignored (and is a client bug).
    let other = fresh_prompt_id();
    http.post(format!("http://{host}/interrupt"))
        .json(&json!({"prompt_id": other}))
        .send()
        .await
        .expect("POST /interrupt");
    assert_eq!(
        get_json(&http, format!("http://{host}/history/{pid}")).await,
        json!({})
    );
    assert_eq!(server.violations().len(), 1);

    http.post(format!("http://{host}/interrupt"))
        .json(&json!({"prompt_id": pid}))
        .send()
        .await
        .expect("POST /interrupt");
    let rest = read_until_done(&mut ws, &pid).await;
    let (after, _) = split_texts(&rest);
    assert_eq!(after[0]["type"], "execution_interrupted");
    assert_eq!(after[0]["data"]["prompt_id"], pid.as_str());
    assert_eq!(
        server.interrupts(),
        vec![
            Some(json!({"prompt_id": other})),
            Some(json!({"prompt_id": pid}))
        ]
    );
}

async fn run_rejected(name: &str) {
    let (t, server) = start(name, 0.0).await;
    assert_eq!(t.outcome(), "rejected_http_400");
    assert_eq!(t.recorded_prompt_id(), None);
    let host = server.host();
    let http = reqwest::Client::new();
    let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
    let mut ws = connect(&host, &cid, true).await;
    let (status, body) = post_json(
        &http,
        format!("http://{host}/prompt"),
        &prompt_body(&t, &cid, &pid),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!((status, body.clone()), t.prompt_reply(&cid, &pid));
    assert!(body["error"]["type"].is_string());
    // Connect-time status and the feature_flags reply only.
    let mut types = Vec::new();
    for _ in 0..2 {
        if let Got::Text(v) = next_frame(&mut ws).await {
            types.push(v["type"].as_str().unwrap_or("").to_string());
        }
    }
    types.sort();
    assert_eq!(types, ["feature_flags", "status"]);
    assert_eq!(
        get_json(&http, format!("http://{host}/history/{pid}")).await,
        json!({})
    );
    assert_eq!(server.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn bad_node_returns_the_recorded_400() {
    bounded(async {
        run_rejected("bad_node").await;
        let t = Transcript::load("bad_node");
        let (_, body) = t.prompt_reply("c", "p");
        assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
        assert_eq!(
            body["node_errors"].as_object().map(|o| o.len()),
            Some(2),
            "width and steps"
        );
    })
    .await;
}

#[tokio::test]
async fn bad_class_returns_the_recorded_400() {
    bounded(run_rejected("bad_class")).await;
}

#[tokio::test]
async fn posting_before_the_websocket_is_open_is_a_violation() {
    bounded(async {
        let (t, server) = start("ok", 0.0).await;
        let host = server.host();
        let http = reqwest::Client::new();
        let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
        let (status, _) = post_json(
            &http,
            format!("http://{host}/prompt"),
            &prompt_body(&t, &cid, &pid),
        )
        .await;
        assert_eq!(status, 200);
        let violations = server.violations();
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].contains("no open WebSocket"),
            "{violations:?}"
        );

        // A second POST /prompt is a violation too.
        post_json(
            &http,
            format!("http://{host}/prompt"),
            &prompt_body(&t, &cid, &fresh_prompt_id()),
        )
        .await;
        assert!(server
            .violations()
            .iter()
            .any(|v| v.contains("second POST /prompt")));
    })
    .await;
}

#[tokio::test]
async fn mismatched_client_id_and_missing_prompt_id_are_violations() {
    bounded(async {
        let (t, server) = start("ok", 0.0).await;
        let host = server.host();
        let http = reqwest::Client::new();
        let _ws = connect(&host, &fresh_client_id(), true).await;
        let (status, reply) = post_json(
            &http,
            format!("http://{host}/prompt"),
            &json!({"prompt": t.workflow(), "client_id": fresh_client_id()}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(reply["prompt_id"], t.recorded_prompt_id().expect("id"));
        let violations = server.violations();
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations.iter().any(|v| v.contains("prompt_id")));
        assert!(violations.iter().any(|v| v.contains("no open WebSocket")));
    })
    .await;
}

#[tokio::test]
async fn preview_metadata_frames_are_event_4_with_the_clients_prompt_id() {
    bounded(async {
        let (t, server) = start("preview_metadata", 0.0).await;
        let host = server.host();
        let http = reqwest::Client::new();
        let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
        let mut ws = connect(&host, &cid, true).await;
        post_json(
            &http,
            format!("http://{host}/prompt"),
            &prompt_body(&t, &cid, &pid),
        )
        .await;
        let got = read_until_done(&mut ws, &pid).await;
        let (texts, flags) = split_texts(&got);
        assert_eq!(texts, t.text_frames(&cid, &pid));
        // The recorded feature_flags reply is replayed.
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0]["data"]["max_upload_size"], 104857600);

        let bins = binaries(&got);
        assert_eq!(bins.len(), 3);
        for b in bins {
            assert_eq!(b.len(), 869, "recorded length");
            // Same header as recorded: event 4, metadata length 0xa6 (json.dumps spacing).
            assert_eq!(b[..8], [0, 0, 0, 4, 0, 0, 0, 0xa6]);
            let meta_len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize;
            let meta: Value = serde_json::from_slice(&b[8..8 + meta_len]).expect("metadata JSON");
            assert_eq!(
                meta,
                json!({"node_id":"2","prompt_id":pid,"display_node_id":"2","parent_node_id":null,"real_node_id":"2","image_type":"image/jpeg"})
            );
            assert_eq!(b[8 + meta_len..8 + meta_len + 3], [0xFF, 0xD8, 0xFF]);
        }
        // Event 4 arrives between progress_state and progress, as recorded.
        let i = got
            .iter()
            .position(|g| matches!(g, Got::Binary(_)))
            .expect("a binary frame");
        assert!(matches!(&got[i - 1], Got::Text(v) if v["type"] == "progress_state"));
        assert!(matches!(&got[i + 1], Got::Text(v) if v["type"] == "progress"));
        assert_eq!(server.violations(), Vec::<String>::new());
    })
    .await;
}

#[tokio::test]
async fn legacy_preview_frames_are_event_1_jpeg() {
    bounded(async {
        let (t, server) = start("preview", 0.0).await;
        let host = server.host();
        let http = reqwest::Client::new();
        let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
        let mut ws = connect(&host, &cid, false).await;
        post_json(
            &http,
            format!("http://{host}/prompt"),
            &prompt_body(&t, &cid, &pid),
        )
        .await;
        let got = read_until_done(&mut ws, &pid).await;
        let (texts, flags) = split_texts(&got);
        assert!(flags.is_empty(), "no flags sent, no reply");
        assert_eq!(texts, t.text_frames(&cid, &pid));
        let bins = binaries(&got);
        assert_eq!(bins.len(), 3);
        for b in bins {
            assert_eq!(b.len(), 703);
            assert_eq!(b[..11], [0, 0, 0, 1, 0, 0, 0, 1, 0xFF, 0xD8, 0xFF]);
        }
    })
    .await;
}

/// Drives `interrupt` up to the held-back point with client `cid`.
async fn run_until_held(
    t: &Transcript,
    server: &ReplayServer,
    cid: &str,
    pid: &str,
) -> (reqwest::Client, Ws) {
    let host = server.host();
    let http = reqwest::Client::new();
    let mut ws = connect(&host, cid, true).await;
    post_json(
        &http,
        format!("http://{host}/prompt"),
        &prompt_body(t, cid, pid),
    )
    .await;
    loop {
        if let Got::Text(v) = next_frame(&mut ws).await {
            if v["type"] == "progress" && v["data"]["value"] == 3 {
                return (http, ws);
            }
        }
    }
}

async fn expect_abrupt_end(ws: &mut Ws) {
    match ws.next().await {
        None | Some(Err(_)) => {}
        Some(Ok(m)) => panic!("expected the connection to drop without a close frame, got {m:?}"),
    }
}

#[tokio::test]
async fn reconnect_with_a_new_client_id_recovers_through_history() {
    bounded(async {
        let (t, server) = start("interrupt", 0.0).await;
        let host = server.host();
        let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
        let (http, mut ws) = run_until_held(&t, &server, &cid, &pid).await;

        server.drop_websockets();
        expect_abrupt_end(&mut ws).await;

        let cid2 = fresh_client_id();
        let mut ws2 = connect(&host, &cid2, true).await;
        match next_frame(&mut ws2).await {
            Got::Text(v) => {
                assert_eq!(v["type"], "status");
                assert_eq!(v["data"]["sid"], cid2.as_str());
                // The prompt is still queued (running).
                assert_eq!(v["data"]["status"]["exec_info"]["queue_remaining"], 1);
            }
            other => panic!("expected status, got {other:?}"),
        }
        http.post(format!("http://{host}/interrupt"))
            .json(&json!({"prompt_id": pid}))
            .send()
            .await
            .expect("POST /interrupt");
        // The new socket only gets broadcasts: the feature_flags reply, then status{0}.
        loop {
            if let Got::Text(v) = next_frame(&mut ws2).await {
                assert!(
                    matches!(v["type"].as_str(), Some("status" | "feature_flags")),
                    "{v}"
                );
                if v["data"]["status"]["exec_info"]["queue_remaining"] == 0 {
                    break;
                }
            }
        }
        // Poll history the way a recovering client does.
        let history = loop {
            let h = get_json(&http, format!("http://{host}/history/{pid}")).await;
            if h != json!({}) {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(Some(history), t.history(&cid, &pid));
        assert_eq!(server.violations(), Vec::<String>::new());
    })
    .await;
}

#[tokio::test]
async fn reconnect_with_the_same_client_id_resumes_the_stream() {
    bounded(async {
        let (t, server) = start("interrupt", 0.0).await;
        let host = server.host();
        let (cid, pid) = (fresh_client_id(), fresh_prompt_id());
        let (http, mut ws) = run_until_held(&t, &server, &cid, &pid).await;

        server.drop_websockets();
        expect_abrupt_end(&mut ws).await;

        let mut ws = connect(&host, &cid, false).await;
        match (next_frame(&mut ws).await, next_frame(&mut ws).await) {
            (Got::Text(status), Got::Text(executing)) => {
                assert_eq!(status["data"]["sid"], cid.as_str());
                assert_eq!(
                    executing,
                    json!({"type": "executing", "data": {"node": "2"}})
                );
            }
            other => panic!("expected status + executing, got {other:?}"),
        }
        http.post(format!("http://{host}/interrupt"))
            .send()
            .await
            .expect("POST /interrupt");
        let rest = read_until_done(&mut ws, &pid).await;
        let (texts, _) = split_texts(&rest);
        let types: Vec<&str> = texts.iter().filter_map(|v| v["type"].as_str()).collect();
        assert_eq!(types, ["execution_interrupted", "status", "executing"]);
        assert_eq!(server.interrupts(), vec![None]);
        assert_eq!(server.violations(), Vec::<String>::new());
    })
    .await;
}

#[tokio::test]
async fn side_endpoints_answer_like_comfyui() {
    bounded(async {
        let (t, server) = start("ok", 0.0).await;
        let host = server.host();
        let http = reqwest::Client::new();

        let object_info = http
            .get(format!("http://{host}/object_info"))
            .send()
            .await
            .expect("GET /object_info")
            .bytes()
            .await
            .expect("body");
        let file = std::fs::read(format!(
            "{}/crates/comfy-sim/assets/object_info.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("asset");
        assert_eq!(object_info.as_ref(), file.as_slice());

        let stats = get_json(&http, format!("http://{host}/api/system_stats")).await;
        assert_eq!(stats, t.raw()["setup_http"][0]["body"]);
        assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
        assert_eq!(
            get_json(&http, format!("http://{host}/queue")).await,
            json!({"queue_running": [], "queue_pending": []})
        );

        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(png_of_length(None)).file_name("in.png"),
            )
            .text("overwrite", "true");
        let uploaded: Value = http
            .post(format!("http://{host}/upload/image"))
            .multipart(form)
            .send()
            .await
            .expect("POST /upload/image")
            .json()
            .await
            .expect("JSON");
        assert_eq!(
            uploaded,
            json!({"name": "in.png", "subfolder": "", "type": "input"})
        );
        assert_eq!(server.violations(), Vec::<String>::new());

        let unknown = http
            .get(format!("http://{host}/no/such/route"))
            .send()
            .await
            .expect("GET");
        assert_eq!(unknown.status(), 404);
        let with_origin = http
            .get(format!("http://{host}/system_stats"))
            .header("Origin", "http://example.invalid")
            .send()
            .await
            .expect("GET");
        assert_eq!(with_origin.status(), 403);
        let violations = server.violations();
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations[0].contains("unknown route: GET /no/such/route"));
        assert!(violations[1].contains("Origin"));
        assert_eq!(
            server.requests(),
            [
                "GET /object_info",
                "GET /api/system_stats",
                "GET /queue",
                "POST /upload/image",
                "GET /no/such/route",
                "GET /system_stats",
            ]
        );
    })
    .await;
}

#[test]
fn padded_pngs_have_the_requested_length_and_decode() {
    for len in [2680, 1559, 980, 695] {
        let bytes = png_of_length(Some(len));
        assert_eq!(bytes.len(), len);
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("decodable");
        assert_eq!(reader.info().width, 16);
    }
    let small = png_of_length(Some(10));
    assert_eq!(small[..4], [0x89, b'P', b'N', b'G']);
}

#[test]
fn every_transcript_loads() {
    for name in [
        "ok",
        "ok_cached",
        "bad_node",
        "bad_class",
        "runtime_error",
        "runtime_error_custom",
        "interrupt",
        "interrupt_global",
        "preview",
        "preview_metadata",
    ] {
        let t = Transcript::load(name);
        assert_eq!(t.name(), name);
        assert!(t.workflow().is_object(), "{name}");
        assert!(!t.recorded_client_id().is_empty(), "{name}");
        assert!(!t.outcome().is_empty(), "{name}");
    }
}
