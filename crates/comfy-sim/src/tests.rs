//! Wire-level tests: a simulator on `127.0.0.1:0`, driven by raw clients (reqwest, tokio-tungstenite) and
//! compared frame by frame with the real ComfyUI recordings in `tests/fixtures/comfyui/transcripts`. Waiting
//! is always on messages; timeouts only turn a hang into a failure.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{SimConfig, Simulator};

/// The recordings shared with the root package's tests (`tests/fixtures/comfyui` at the repository
/// root); tests only, so the packaged crate does not need them.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/comfyui");
/// Upper bound for any single wait; only reached when something is broken.
const WAIT: Duration = Duration::from_secs(30);

async fn start() -> Simulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = SimConfig {
        step_delay: Duration::from_millis(2),
        ..SimConfig::default()
    };
    Simulator::start(listener, config)
        .await
        .expect("start simulator")
}

fn read_json(relative: &str) -> Value {
    let path = format!("{FIXTURES}/{relative}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn workflow(name: &str) -> Value {
    read_json(&format!("workflows/{name}.json"))
}

fn transcript(name: &str) -> Value {
    read_json(&format!("transcripts/{name}.json"))
}

fn url(sim: &Simulator, path: &str) -> String {
    format!("http://{}{path}", sim.host())
}

async fn post_json(sim: &Simulator, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url(sim, path))
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get_json(sim: &Simulator, path: &str) -> Value {
    let response = reqwest::get(url(sim, path)).await.expect("GET");
    assert_eq!(response.status().as_u16(), 200, "GET {path}");
    response.json().await.expect("JSON")
}

async fn queue_prompt(sim: &Simulator, prompt: &Value, client_id: Option<&str>) -> String {
    let mut body = json!({ "prompt": prompt });
    if let Some(id) = client_id {
        body["client_id"] = json!(id);
    }
    let (status, reply) = post_json(sim, "/prompt", &body).await;
    assert_eq!(status, 200, "POST /prompt: {reply}");
    reply["prompt_id"].as_str().expect("prompt_id").to_owned()
}

/// A frame received by a test client.
#[derive(Debug)]
enum Got {
    Text(Value),
    Binary(Vec<u8>),
    Close,
    /// The connection ended without a close frame.
    #[allow(dead_code)]
    Dropped(String),
}

impl Got {
    fn text(&self) -> Option<&Value> {
        match self {
            Got::Text(v) => Some(v),
            _ => None,
        }
    }

    fn kind(&self) -> Option<&str> {
        self.text()?.get("type")?.as_str()
    }
}

struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    async fn connect(sim: &Simulator, client_id: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/ws?clientId={client_id}",
            sim.host()
        ))
        .await
        .expect("ws connect");
        Ws { stream }
    }

    async fn next(&mut self) -> Got {
        let message = tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("timed out waiting for a frame");
        match message {
            Some(Ok(Message::Text(text))) => {
                Got::Text(serde_json::from_str(text.as_str()).expect("JSON frame"))
            }
            Some(Ok(Message::Binary(data))) => Got::Binary(data.to_vec()),
            Some(Ok(Message::Close(_))) => Got::Close,
            Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            Some(Err(error)) => Got::Dropped(error.to_string()),
            None => Got::Dropped("stream ended".into()),
        }
    }

    async fn send_text(&mut self, value: &Value) {
        self.stream
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send");
    }

    /// Frames up to and including `executing{node: null, prompt_id}`.
    async fn until_done(&mut self, prompt_id: &str) -> Vec<Got> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let done = frame.kind() == Some("executing")
                && frame.text().is_some_and(|t| {
                    t["data"]["node"].is_null() && t["data"]["prompt_id"] == prompt_id
                });
            assert!(
                !matches!(frame, Got::Close | Got::Dropped(_)),
                "socket ended: {frame:?}"
            );
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Close with a handshake and wait for the server's reply (the server unregisters before replying).
    async fn close(mut self) {
        let _ = self.stream.close(None).await;
        while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, self.stream.next()).await {
            if message.is_close() {
                break;
            }
        }
    }
}

/// Replace what differs between runs (ids, times, random names, host paths) by placeholders.
fn normalize(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "prompt_id" => *v = json!("<prompt_id>"),
                    "sid" | "client_id" => *v = json!("<client_id>"),
                    "timestamp" => *v = json!(0),
                    "exception_message" => {
                        let first = v
                            .as_str()
                            .and_then(|s| s.lines().next())
                            .unwrap_or_default()
                            .to_owned();
                        *v = json!(first);
                    }
                    "filename" => {
                        if let Some(name) = v.as_str().and_then(|s| s.strip_prefix("ComfyUI_temp_"))
                        {
                            *v = json!(format!(
                                "ComfyUI_temp_?????{}",
                                name.get(5..).unwrap_or_default()
                            ));
                        }
                    }
                    _ => normalize(v),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// A comparable description of one frame.
fn describe(frame: &Got) -> Value {
    match frame {
        Got::Text(v) => {
            let mut v = v.clone();
            normalize(&mut v);
            v
        }
        Got::Binary(data) => {
            let event = u32::from_be_bytes(data[0..4].try_into().expect("event"));
            let word = u32::from_be_bytes(data[4..8].try_into().expect("second word"));
            match event {
                4 => {
                    let len = word as usize;
                    let mut metadata: Value =
                        serde_json::from_slice(&data[8..8 + len]).expect("metadata");
                    normalize(&mut metadata);
                    json!({"binary": 4, "metadata": metadata, "image_head": hex(&data[8 + len..8 + len + 4])})
                }
                _ => json!({"binary": event, "word": word}),
            }
        }
        other => json!(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The recording's frames in the same form (the final close left out).
fn recorded_frames(transcript: &Value) -> Vec<Value> {
    transcript["ws_frames"]
        .as_array()
        .expect("ws_frames")
        .iter()
        .filter_map(|frame| match frame["opcode"].as_str() {
            Some("text") => {
                let mut data = frame["data"].clone();
                normalize(&mut data);
                Some(data)
            }
            Some("binary") => {
                let head = frame["head_hex"].as_str().expect("head_hex");
                let event = u32::from_str_radix(&head[0..8], 16).expect("event");
                let word = u32::from_str_radix(&head[8..16], 16).expect("word");
                Some(match event {
                    4 => {
                        let mut metadata = frame["decoded_metadata"].clone();
                        normalize(&mut metadata);
                        json!({"binary": 4, "metadata": metadata, "image_head": frame["image_head_hex"]})
                    }
                    _ => json!({"binary": event, "word": word}),
                })
            }
            _ => None,
        })
        .collect()
}

fn assert_frames_match(scenario: &str, ours: &[Got]) {
    let recorded = recorded_frames(&transcript(scenario));
    let ours: Vec<Value> = ours.iter().map(describe).collect();
    for (i, (a, b)) in ours.iter().zip(&recorded).enumerate() {
        assert_eq!(a, b, "{scenario}: frame {i} differs");
    }
    assert_eq!(ours.len(), recorded.len(), "{scenario}: frame count");
}

/// The recorded `GET /history/{id}` entry of a scenario.
fn recorded_history(scenario: &str) -> Value {
    let transcript = transcript(scenario);
    let call = transcript["http"]
        .as_array()
        .expect("http")
        .iter()
        .find(|c| {
            c["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/history/"))
        })
        .expect("history call")
        .clone();
    call["body"]
        .as_object()
        .expect("history body")
        .values()
        .next()
        .expect("entry")
        .clone()
}

fn normalize_history(mut entry: Value) -> Value {
    entry["prompt"][0] = json!(0);
    entry["prompt"][1] = json!("<prompt_id>");
    normalize(&mut entry);
    entry
}

async fn history_entry(sim: &Simulator, prompt_id: &str) -> Value {
    let history = get_json(sim, &format!("/history/{prompt_id}")).await;
    history[prompt_id].clone()
}

async fn assert_history_matches(sim: &Simulator, scenario: &str, prompt_id: &str) -> Value {
    let ours = history_entry(sim, prompt_id).await;
    assert_eq!(
        normalize_history(ours.clone()),
        normalize_history(recorded_history(scenario)),
        "{scenario}: history"
    );
    ours
}

/// Connect, post the scenario's workflow with this socket's client id, and collect every frame.
async fn run_scenario(sim: &Simulator, workflow_name: &str, client_id: &str) -> (String, Vec<Got>) {
    let mut ws = Ws::connect(sim, client_id).await;
    let mut frames = vec![ws.next().await];
    let prompt_id = queue_prompt(sim, &workflow(workflow_name), Some(client_id)).await;
    frames.extend(ws.until_done(&prompt_id).await);
    ws.close().await;
    (prompt_id, frames)
}

async fn view(sim: &Simulator, query: &str) -> reqwest::Response {
    reqwest::get(url(sim, &format!("/view?{query}")))
        .await
        .expect("GET /view")
}

fn png_size(bytes: &[u8]) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    (info.width, info.height)
}

#[tokio::test]
async fn ok_run_matches_the_recording_and_saves_real_pngs() {
    let sim = start().await;
    let (prompt_id, frames) = run_scenario(&sim, "ok", "client-ok").await;
    assert_frames_match("ok", &frames);
    let entry = assert_history_matches(&sim, "ok", &prompt_id).await;

    for (node, size) in [("3", (512, 512)), ("5", (256, 256))] {
        let image = &entry["outputs"][node]["images"][0];
        let query = format!(
            "filename={}&subfolder=&type=output",
            image["filename"].as_str().expect("filename")
        );
        let response = view(&sim, &query).await;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "image/png");
        let disposition = format!(
            "filename=\"{}\"",
            image["filename"].as_str().expect("filename")
        );
        assert_eq!(
            response.headers()["content-disposition"],
            disposition.as_str()
        );
        let bytes = response.bytes().await.expect("bytes");
        assert_eq!(png_size(&bytes), size, "node {node}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn identical_prompt_is_served_from_cache() {
    let sim = start().await;
    run_scenario(&sim, "ok", "client-first").await;
    let files_before = get_json(&sim, "/history").await;
    let (prompt_id, frames) = run_scenario(&sim, "ok", "client-second").await;
    assert_frames_match("ok_cached", &frames);
    let entry = assert_history_matches(&sim, "ok_cached", &prompt_id).await;
    // Same file names as the first run: nothing was written again.
    let first = files_before
        .as_object()
        .expect("history")
        .values()
        .next()
        .expect("first entry");
    assert_eq!(entry["outputs"], first["outputs"]);

    // A changed input re-runs that branch only.
    let mut changed = workflow("ok");
    changed["5"]["inputs"]["filename_prefix"] = json!("anchors_ok_other");
    let mut ws = Ws::connect(&sim, "client-third").await;
    ws.next().await;
    let prompt_id = queue_prompt(&sim, &changed, Some("client-third")).await;
    let frames = ws.until_done(&prompt_id).await;
    let cached = frames
        .iter()
        .find(|f| f.kind() == Some("execution_cached"))
        .expect("execution_cached");
    assert_eq!(
        cached.text().expect("text")["data"]["nodes"],
        json!(["1", "2", "3", "4"])
    );
    let executing: Vec<&Value> = frames
        .iter()
        .filter(|f| f.kind() == Some("executing"))
        .map(|f| &f.text().expect("text")["data"]["node"])
        .collect();
    assert_eq!(executing, vec![&json!("5"), &Value::Null]);
    sim.shutdown().await;
}

#[tokio::test]
async fn free_memory_drops_the_cache() {
    let sim = start().await;
    run_scenario(&sim, "ok", "c1").await;
    let (status, _) = post_json(
        &sim,
        "/free",
        &json!({"unload_models": true, "free_memory": true}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, frames) = run_scenario(&sim, "ok", "c2").await;
    let cached = frames
        .iter()
        .find(|f| f.kind() == Some("execution_cached"))
        .expect("execution_cached");
    assert_eq!(cached.text().expect("text")["data"]["nodes"], json!([]));
    // The files were written again under the next counter.
    let executed = frames
        .iter()
        .find(|f| f.kind() == Some("executed"))
        .expect("executed");
    assert_eq!(
        executed.text().expect("text")["data"]["output"]["images"][0]["filename"],
        "anchors_ok_full_00002_.png"
    );
}

#[tokio::test]
async fn runtime_errors_match_the_recordings() {
    for (scenario, workflow_name) in [
        ("runtime_error", "runtime_error"),
        ("runtime_error_custom", "runtime_error_custom"),
    ] {
        let sim = start().await;
        let (prompt_id, frames) = run_scenario(&sim, workflow_name, "client-err").await;
        assert_frames_match(scenario, &frames);
        let entry = assert_history_matches(&sim, scenario, &prompt_id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        assert_eq!(entry["status"]["completed"], false);
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn previews_without_feature_flags_use_event_1() {
    let sim = start().await;
    let (prompt_id, frames) = run_scenario(&sim, "preview", "client-preview").await;
    assert_frames_match("preview", &frames);
    let entry = assert_history_matches(&sim, "preview", &prompt_id).await;
    let image = &entry["outputs"]["3"]["images"][0];
    let query = format!(
        "filename={}&type=temp",
        image["filename"].as_str().expect("filename")
    );
    let bytes = view(&sim, &query).await.bytes().await.expect("bytes");
    assert_eq!(png_size(&bytes), (128, 128));
    // Event 1 carries a JPEG after the format code.
    let preview = frames
        .iter()
        .find_map(|f| match f {
            Got::Binary(data) => Some(data),
            _ => None,
        })
        .expect("a preview");
    assert_eq!(&preview[8..11], &[0xFF, 0xD8, 0xFF]);
    assert_eq!(&preview[preview.len() - 2..], &[0xFF, 0xD9]);
}

#[tokio::test]
async fn previews_with_feature_flags_use_event_4() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "client-meta").await;
    let mut frames = vec![ws.next().await];
    ws.send_text(&json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    frames.push(ws.next().await);
    let prompt_id = queue_prompt(&sim, &workflow("preview"), Some("client-meta")).await;
    frames.extend(ws.until_done(&prompt_id).await);
    assert_frames_match("preview_metadata", &frames);
    assert_history_matches(&sim, "preview_metadata", &prompt_id).await;
    // The header length is what Python's json.dumps gives (166 bytes for a uuid prompt id).
    let preview = frames
        .iter()
        .find_map(|f| match f {
            Got::Binary(data) => Some(data),
            _ => None,
        })
        .expect("a preview");
    assert_eq!(
        u32::from_be_bytes(preview[4..8].try_into().expect("len")),
        166
    );
}

async fn interrupt_scenario(scenario: &str, with_prompt_id: bool) {
    let sim = start().await;
    let client_id = "client-interrupt";
    let mut ws = Ws::connect(&sim, client_id).await;
    let mut frames = vec![ws.next().await];
    sim.pause_after_step(3);
    let prompt_id = queue_prompt(&sim, &workflow("interrupt"), Some(client_id)).await;
    sim.paused().await;
    loop {
        let frame = ws.next().await;
        let step = frame
            .text()
            .filter(|t| t["type"] == "progress")
            .map(|t| t["data"]["value"].clone());
        frames.push(frame);
        if step.is_some_and(|v| v.as_u64() >= Some(3)) {
            break;
        }
    }
    let body = with_prompt_id.then(|| json!({"prompt_id": prompt_id}));
    let request = reqwest::Client::new().post(url(&sim, "/interrupt"));
    let request = match &body {
        Some(body) => request.json(body),
        None => request,
    };
    let response = request.send().await.expect("POST /interrupt");
    assert_eq!(response.status().as_u16(), 200);
    sim.resume();
    frames.extend(ws.until_done(&prompt_id).await);
    assert_frames_match(scenario, &frames);
    assert_history_matches(&sim, scenario, &prompt_id).await;
    assert_eq!(sim.interrupts(), vec![body]);
}

#[tokio::test]
async fn interrupt_with_prompt_id_matches_the_recording() {
    interrupt_scenario("interrupt", true).await;
}

#[tokio::test]
async fn global_interrupt_matches_the_recording() {
    interrupt_scenario("interrupt_global", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_between_nodes_blames_the_next_node() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "between").await;
    ws.next().await;
    sim.pause_after_step(3);
    let mut prompt = workflow("interrupt");
    prompt["2"]["inputs"]["steps"] = json!(3);
    let prompt_id = queue_prompt(&sim, &prompt, Some("between")).await;
    sim.paused().await;
    let (status, _) = post_json(&sim, "/interrupt", &json!({})).await;
    assert_eq!(status, 200);
    sim.resume();
    let frames = ws.until_done(&prompt_id).await;
    let kinds: Vec<&str> = frames.iter().rev().take(6).filter_map(Got::kind).collect();
    assert_eq!(
        kinds,
        [
            "executing",
            "status",
            "execution_interrupted",
            "executing",
            "progress_state",
            "progress_state"
        ]
    );
    let interrupted = frames
        .iter()
        .find(|f| f.kind() == Some("execution_interrupted"))
        .expect("interrupted");
    let data = &interrupted.text().expect("text")["data"];
    assert_eq!(
        (data["node_id"].clone(), data["node_type"].clone()),
        (json!("3"), json!("SaveImage"))
    );
    assert_eq!(data["executed"], json!(["2", "1"]));
    let entry = history_entry(&sim, &prompt_id).await;
    assert_eq!(entry["status"]["messages"][2][0], "execution_interrupted");
    assert_eq!(entry["outputs"], json!({}));
}

#[tokio::test]
async fn interrupt_for_another_prompt_is_ignored() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "c").await;
    ws.next().await;
    sim.pause_after_step(1);
    let mut prompt = workflow("interrupt");
    prompt["2"]["inputs"]["steps"] = json!(3);
    let prompt_id = queue_prompt(&sim, &prompt, Some("c")).await;
    sim.paused().await;
    let (status, _) = post_json(&sim, "/interrupt", &json!({"prompt_id": "not-running"})).await;
    assert_eq!(status, 200);
    sim.resume();
    let frames = ws.until_done(&prompt_id).await;
    assert!(frames.iter().any(|f| f.kind() == Some("execution_success")));
}

#[tokio::test]
async fn validation_failures_match_the_recorded_bodies() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "client-bad").await;
    ws.next().await;
    for scenario in ["bad_node", "bad_class"] {
        let recorded = transcript(scenario)["http"][0].clone();
        let (status, body) = post_json(&sim, "/prompt", &recorded["request_body"]).await;
        assert_eq!(status, 400, "{scenario}");
        assert_eq!(body, recorded["body"], "{scenario}");
    }
    // Nothing was queued and no message was sent: the next frame is the status of a later put.
    queue_prompt(&sim, &workflow("runtime_error_custom"), None).await;
    let frame = ws.next().await;
    assert_eq!(
        frame.text().expect("text")["data"]["status"]["exec_info"]["queue_remaining"],
        1
    );
    // Both rejected prompts still consumed a queue number, like the real server.
    assert_eq!(sim.prompts().len(), 3);
}

#[tokio::test]
async fn validation_reports_the_real_reasons() {
    let sim = start().await;
    let prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 20000, "batch_size": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0, 1]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
    });
    let (status, body) = post_json(&sim, "/prompt", &json!({"prompt": prompt})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let errors = &body["node_errors"];
    // Node 1 is only reached through a mismatched link, so it is never validated.
    assert!(errors.get("1").is_none());
    // Reasons come in input order: height, then the missing color.
    assert_eq!(
        errors["2"]["errors"][0]["message"],
        "Value 20000 bigger than max of 16384"
    );
    assert_eq!(errors["2"]["errors"][1]["type"], "required_input_missing");
    assert_eq!(errors["2"]["errors"][1]["details"], "color");
    assert_eq!(
        errors["3"]["errors"][0]["type"],
        "exception_during_validation"
    );
    assert_eq!(errors["3"]["errors"][0]["details"], "'9'");
    assert_eq!(errors["4"]["errors"][0]["type"], "return_type_mismatch");
    assert_eq!(
        errors["4"]["errors"][0]["details"],
        "images, received_type(VAE) mismatch input_type(IMAGE)"
    );
    assert_eq!(errors["5"]["errors"][0]["type"], "bad_linked_input");
    assert_eq!(errors["6"]["errors"][0]["type"], "required_input_missing");
    // Output 5 stops at its malformed link, so only 6 reaches node 2.
    assert_eq!(errors["2"]["dependent_outputs"], json!(["6"]));

    let prompt = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    });
    let (status, body) = post_json(&sim, "/prompt", &json!({"prompt": prompt})).await;
    assert_eq!(status, 400);
    let error = &body["node_errors"]["1"];
    assert_eq!(error["errors"][0]["type"], "value_not_in_list");
    assert_eq!(
        error["errors"][0]["details"],
        "ckpt_name: 'missing.safetensors' not in ['flux1-dev-fp8.safetensors', 'sd_xl_base_1.0.safetensors']"
    );
    assert_eq!(error["dependent_outputs"], json!(["4"]));
    assert_eq!(body["node_errors"].as_object().map(|o| o.len()), Some(1));

    let (status, body) =
        post_json(&sim, "/prompt", &json!({"prompt": {"1": {"inputs": {}}}})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "Cannot execute because a node is missing the class_type property."
    );
    let (status, body) = post_json(
        &sim,
        "/prompt",
        &json!({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (400, json!("prompt_no_outputs"))
    );
    let (status, body) = post_json(&sim, "/prompt", &json!({"client_id": "x"})).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (400, json!("no_prompt"))
    );
}

#[tokio::test]
async fn partially_valid_prompt_runs_the_valid_outputs() {
    let sim = start().await;
    let mut prompt = workflow("runtime_error_custom");
    prompt["3"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}});
    prompt["4"] = json!({"class_type": "LoadImage", "inputs": {"image": "does-not-exist.png"}});
    prompt["5"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}});
    let mut ws = Ws::connect(&sim, "p").await;
    ws.next().await;
    let (status, body) = post_json(
        &sim,
        "/prompt",
        &json!({"prompt": prompt, "client_id": "p"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["node_errors"],
        json!({"4": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
            "details": "image - Invalid image file: does-not-exist.png", "extra_info": {"input_name": "image"}}],
            "dependent_outputs": ["5"], "class_type": "LoadImage"}})
    );
    let prompt_id = body["prompt_id"].as_str().expect("prompt_id");
    ws.until_done(prompt_id).await;
    let entry = history_entry(&sim, prompt_id).await;
    assert_eq!(entry["prompt"][4], json!(["3"]));
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["outputs"].as_object().map(|o| o.len()), Some(1));
}

#[tokio::test]
async fn sdxl_job_validates_and_runs() {
    let sim = start().await;
    let prompt = json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286_u64, "steps": 4, "cfg": 8, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 2}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sdxl/run", "images": ["8", 0]}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
    });
    let mut ws = Ws::connect(&sim, "sdxl").await;
    ws.next().await;
    let prompt_id = queue_prompt(&sim, &prompt, Some("sdxl")).await;
    let frames = ws.until_done(&prompt_id).await;
    let progress: Vec<u64> = frames
        .iter()
        .filter(|f| f.kind() == Some("progress"))
        .filter_map(|f| f.text()?["data"]["value"].as_u64())
        .collect();
    assert_eq!(progress, vec![1, 2, 3, 4]);
    let order: Vec<&str> = frames
        .iter()
        .filter(|f| f.kind() == Some("executing"))
        .filter_map(|f| f.text()?["data"]["node"].as_str())
        .collect();
    // ExecutionList order: ready nodes in pending order, preferring those two links from an output.
    assert_eq!(order, vec!["10", "5", "4", "7", "6", "3", "8", "9"]);
    let entry = history_entry(&sim, &prompt_id).await;
    // Validation converted `cfg` and `denoise` to floats in the stored prompt, like the real server.
    assert_eq!(entry["prompt"][2]["3"]["inputs"]["cfg"], json!(8.0));
    let images = entry["outputs"]["9"]["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    assert_eq!(
        images[1],
        json!({"filename": "run_00002_.png", "subfolder": "sdxl", "type": "output"})
    );
    let bytes = view(&sim, "filename=run_00001_.png&subfolder=sdxl")
        .await
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(png_size(&bytes), (1024, 768));
}

#[tokio::test]
async fn messages_are_routed_by_client_id() {
    let sim = start().await;
    let mut mine = Ws::connect(&sim, "mine").await;
    let mut other = Ws::connect(&sim, "other").await;
    mine.next().await;
    other.next().await;
    let prompt_id = queue_prompt(&sim, &workflow("preview"), Some("mine")).await;
    let frames = mine.until_done(&prompt_id).await;
    assert!(frames.iter().any(|f| matches!(f, Got::Binary(_))));
    // The other socket sees the three status broadcasts only, the last one being queue_remaining 0.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let frame = other.next().await;
        assert_eq!(frame.kind(), Some("status"), "{frame:?}");
        seen.push(
            frame.text().expect("text")["data"]["status"]["exec_info"]["queue_remaining"].clone(),
        );
    }
    assert_eq!(seen, vec![json!(1), json!(1), json!(0)]);

    // Without client_id, progress and previews are broadcast but the client-only events are not sent.
    let mut changed = workflow("preview");
    changed["1"]["inputs"]["color"] = json!(255);
    let prompt_id = queue_prompt(&sim, &changed, None).await;
    let mut kinds = Vec::new();
    loop {
        let frame = other.next().await;
        let last_status = frame.kind() == Some("status")
            && frame.text().expect("text")["data"]["status"]["exec_info"]["queue_remaining"] == 0;
        kinds.push(match &frame {
            Got::Binary(data) => format!("binary{}", data[3]),
            f => f.kind().unwrap_or("?").to_owned(),
        });
        if last_status {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "progress_state",
            "progress_state",
            "progress_state",
            "progress_state",
            "progress",
            "binary1",
            "progress_state",
            "progress",
            "binary1",
            "progress_state",
            "progress",
            "binary1",
            "progress_state",
            "progress_state",
            "progress_state",
            "status"
        ]
    );
    let entry = history_entry(&sim, &prompt_id).await;
    assert_eq!(entry["status"]["status_str"], "success");
}

#[tokio::test]
async fn queue_runs_by_number_and_front_jumps() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "q").await;
    ws.next().await;
    sim.pause_after_step(1);
    let mut slow = workflow("interrupt");
    slow["2"]["inputs"]["steps"] = json!(2);
    let first = queue_prompt(&sim, &slow, Some("q")).await;
    sim.paused().await;
    let mut other = slow.clone();
    other["1"]["inputs"]["color"] = json!(1);
    let second = queue_prompt(&sim, &other, Some("q")).await;
    let (status, reply) = post_json(
        &sim,
        "/prompt",
        &json!({"prompt": slow, "client_id": "q", "front": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["number"], json!(-2));
    let third = reply["prompt_id"].as_str().expect("id").to_owned();
    let queue = get_json(&sim, "/queue").await;
    assert_eq!(queue["queue_running"][0][1], json!(first));
    let pending: Vec<&Value> = queue["queue_pending"]
        .as_array()
        .expect("pending")
        .iter()
        .map(|i| &i[1])
        .collect();
    assert_eq!(pending, vec![&json!(third), &json!(second)]);
    assert_eq!(
        get_json(&sim, "/prompt").await,
        json!({"exec_info": {"queue_remaining": 3}})
    );
    sim.resume();
    let mut started = Vec::new();
    while started.len() < 3 {
        if let Some(t) = ws
            .next()
            .await
            .text()
            .filter(|t| t["type"] == "execution_start")
        {
            started.push(t["data"]["prompt_id"].as_str().expect("id").to_owned());
        }
    }
    ws.until_done(&second).await;
    assert_eq!(started, vec![first, third, second]);

    // Deleting a pending prompt removes it before it runs.
    sim.pause_after_step(1);
    let running = queue_prompt(&sim, &slow, None).await;
    sim.paused().await;
    let doomed = queue_prompt(&sim, &other, None).await;
    let (status, _) = post_json(&sim, "/queue", &json!({"delete": [doomed]})).await;
    assert_eq!(status, 200);
    assert_eq!(get_json(&sim, "/queue").await["queue_pending"], json!([]));
    sim.resume();
    let _ = running;
}

#[tokio::test]
async fn uploads_follow_the_rename_rules() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let upload =
        |name: &'static str, bytes: &'static [u8], extra: Vec<(&'static str, &'static str)>| {
            let client = client.clone();
            let target = url(&sim, "/upload/image");
            async move {
                let mut form = reqwest::multipart::Form::new().part(
                    "image",
                    reqwest::multipart::Part::bytes(bytes).file_name(name),
                );
                for (k, v) in extra {
                    form = form.text(k, v);
                }
                let response = client
                    .post(target)
                    .multipart(form)
                    .send()
                    .await
                    .expect("upload");
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                )
            }
        };
    let (status, body) = upload("test.png", b"first", vec![]).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"name": "test.png", "subfolder": "", "type": "input"})
        )
    );
    let (_, body) = upload("test.png", b"first", vec![]).await;
    assert_eq!(body["name"], "test.png", "identical bytes reuse the name");
    let (_, body) = upload("test.png", b"second", vec![]).await;
    assert_eq!(body["name"], "test (1).png");
    let (_, body) = upload("test.png", b"third", vec![]).await;
    assert_eq!(body["name"], "test (2).png");
    let (_, body) = upload("test.png", b"fourth", vec![("overwrite", "true")]).await;
    assert_eq!(body["name"], "test.png");
    assert_eq!(
        sim.input_file("", "test.png").as_deref(),
        Some(&b"fourth"[..])
    );
    assert_eq!(
        sim.input_file("", "test (1).png").as_deref(),
        Some(&b"second"[..])
    );
    let (_, body) = upload("in.png", b"sub", vec![("subfolder", "rusttest")]).await;
    assert_eq!(
        body,
        json!({"name": "in.png", "subfolder": "rusttest", "type": "input"})
    );
    assert_eq!(
        sim.input_file("rusttest", "in.png").as_deref(),
        Some(&b"sub"[..])
    );
    let (status, _) = upload("x.png", b"x", vec![("subfolder", "../escape")]).await;
    assert_eq!(status, 400);
    let (status, _) = upload("x.png", b"x", vec![("type", "bogus")]).await;
    assert_eq!(status, 500);
    let form = reqwest::multipart::Form::new().text("subfolder", "");
    let response = client
        .post(url(&sim, "/upload/image"))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status().as_u16(), 400);

    // LoadImage lists top-level input images and validates names against the folder.
    let info = get_json(&sim, "/object_info/LoadImage").await;
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["example.png", "test (1).png", "test (2).png", "test.png"])
    );
    assert_eq!(get_json(&sim, "/object_info/NoSuchNode").await, json!({}));
}

#[tokio::test]
async fn uploaded_image_flows_through_load_image() {
    let sim = start().await;
    let png_bytes =
        super::image::encode_png(&super::image::ImageInfo::solid(40, 30, 1, [1, 2, 3]), &[])
            .expect("png");
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png_bytes).file_name("in.png"),
        )
        .text("subfolder", "rusttest");
    let response = reqwest::Client::new()
        .post(url(&sim, "/upload/image"))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status().as_u16(), 200);
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "rusttest/in.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 80, "height": 0, "crop": "disabled"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    });
    let mut ws = Ws::connect(&sim, "b").await;
    ws.next().await;
    let prompt_id = queue_prompt(&sim, &prompt, Some("b")).await;
    let frames = ws.until_done(&prompt_id).await;
    let text = frames
        .iter()
        .find_map(|f| match f {
            Got::Binary(data) if data[3] == 3 => Some(data),
            _ => None,
        })
        .expect("TEXT frame");
    assert_eq!(&text[8..9], b"4");
    assert_eq!(&text[9..], b"width: 80, height: 60\n batch size: 1");
    let entry = history_entry(&sim, &prompt_id).await;
    assert_eq!(entry["outputs"]["5"], json!({"text": ["60"]}));
    let name = entry["outputs"]["3"]["images"][0]["filename"]
        .as_str()
        .expect("filename")
        .to_owned();
    let bytes = view(&sim, &format!("filename={name}&type=temp"))
        .await
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(png_size(&bytes), (80, 60));
}

#[tokio::test]
async fn view_enforces_the_path_rules() {
    let sim = start().await;
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(&b"abc"[..]).file_name("a.png"),
        )
        .text("subfolder", "sub");
    reqwest::Client::new()
        .post(url(&sim, "/upload/image"))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    let status = |q: &'static str| {
        let sim = &sim;
        async move { view(sim, q).await.status().as_u16() }
    };
    assert_eq!(status("filename=a.png&type=input&subfolder=sub").await, 200);
    assert_eq!(status("filename=a.png [input]&subfolder=sub").await, 200);
    assert_eq!(
        status("filename=other/a.png&type=input&subfolder=sub").await,
        200
    );
    assert_eq!(status("filename=a.png&type=input").await, 404);
    assert_eq!(status("filename=../a.png&type=input").await, 400);
    assert_eq!(status("filename=/etc/passwd").await, 400);
    assert_eq!(status("filename=a.png&type=bogus").await, 400);
    assert_eq!(
        status("filename=a.png&type=input&subfolder=../output").await,
        403
    );
    assert_eq!(status("type=input").await, 404);
    let response = view(&sim, "filename=example.png&type=input").await;
    assert_eq!(response.headers()["content-type"], "image/png");
}

#[tokio::test]
async fn origin_mismatch_is_forbidden() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let evil = client
        .get(url(&sim, "/system_stats"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .expect("GET");
    assert_eq!(evil.status().as_u16(), 403);
    let same = client
        .get(url(&sim, "/api/system_stats"))
        .header("Origin", format!("http://{}", sim.host()))
        .send()
        .await
        .expect("GET");
    assert_eq!(same.status().as_u16(), 200);
    let stats: Value = same.json().await.expect("JSON");
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");

    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/ws",
        sim.host()
    ))
    .expect("request");
    request
        .headers_mut()
        .insert("Origin", "http://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 403),
        other => panic!("expected a 403 handshake, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn malformed_requests_get_the_real_status_codes() {
    let sim = start().await;
    let client = reqwest::Client::new();
    let post_raw = |path: &'static str, body: &'static str| {
        let request = client.post(url(&sim, path)).body(body);
        async move {
            let response = request.send().await.expect("POST");
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            (status, content_type)
        }
    };
    assert_eq!(
        post_raw("/prompt", "not json").await,
        (500, Some("text/plain; charset=utf-8".into()))
    );
    assert_eq!(post_raw("/free", "").await.0, 500);
    assert_eq!(post_raw("/queue", "[").await.0, 500);
    assert_eq!(post_raw("/interrupt", "").await.0, 200);
    assert_eq!(post_raw("/interrupt", "[1]").await.0, 500);
    assert_eq!(post_raw("/prompt", "{\"prompt\": 5}").await.0, 500);
    assert_eq!(post_raw("/prompt", "{\"prompt\": {\"1\": 5}}").await.0, 500);
    assert_eq!(
        post_raw("/prompt", "{\"prompt\": {}, \"number\": \"x\"}")
            .await
            .0,
        500
    );
    assert_eq!(post_raw("/history", "{\"delete\": 5}").await.0, 500);
    let cycle = r#"{"prompt": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}}}}"#;
    assert_eq!(post_raw("/prompt", cycle).await.0, 400);
    let response = client
        .get(url(&sim, "/no/such/route"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status().as_u16(), 404);
    let too_big = vec![b' '; 100 * 1024 * 1024 + 1];
    let response = client
        .post(url(&sim, "/prompt"))
        .body(too_big)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 413);
    // The server still works.
    assert_eq!(
        get_json(&sim, "/features").await["max_upload_size"],
        104_857_600
    );
    assert_eq!(get_json(&sim, "/api/history?max_items=1").await, json!({}));
    assert_eq!(
        client
            .get(url(&sim, "/history?max_items=x"))
            .send()
            .await
            .expect("GET")
            .status()
            .as_u16(),
        500
    );
}

#[tokio::test]
async fn pause_holds_the_executor_until_resume() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "p").await;
    ws.next().await;
    sim.pause_after_step(2);
    let mut prompt = workflow("interrupt");
    prompt["2"]["inputs"]["steps"] = json!(5);
    let prompt_id = queue_prompt(&sim, &prompt, Some("p")).await;
    sim.paused().await;
    let mut last_progress = None;
    while last_progress != Some(2) {
        if let Some(t) = ws.next().await.text().filter(|t| t["type"] == "progress") {
            last_progress = t["data"]["value"].as_u64();
        }
    }
    // Nothing more arrives while paused (at 2 ms per step the prompt would otherwise finish quickly).
    assert!(
        tokio::time::timeout(Duration::from_millis(200), ws.stream.next())
            .await
            .is_err()
    );
    let queue = get_json(&sim, "/queue").await;
    assert_eq!(queue["queue_running"][0][1], json!(prompt_id));
    assert!(history_entry(&sim, &prompt_id).await.is_null());
    sim.resume();
    let frames = ws.until_done(&prompt_id).await;
    let rest: Vec<u64> = frames
        .iter()
        .filter(|f| f.kind() == Some("progress"))
        .filter_map(|f| f.text()?["data"]["value"].as_u64())
        .collect();
    assert_eq!(rest, vec![3, 4, 5]);
    assert_eq!(
        history_entry(&sim, &prompt_id).await["status"]["status_str"],
        "success"
    );
}

#[tokio::test]
async fn reconnecting_socket_gets_the_current_node() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "r").await;
    ws.next().await;
    sim.pause_after_step(1);
    let prompt_id = queue_prompt(&sim, &workflow("interrupt"), Some("r")).await;
    sim.paused().await;
    sim.drop_websockets();
    loop {
        match ws.next().await {
            Got::Dropped(_) => break,
            Got::Close => panic!("drop_websockets must not send a close frame"),
            _ => {}
        }
    }
    let mut again = Ws::connect(&sim, "r").await;
    let status = again.next().await;
    assert_eq!(status.text().expect("text")["data"]["sid"], "r");
    assert_eq!(
        status.text().expect("text")["data"]["status"]["exec_info"]["queue_remaining"],
        1
    );
    let executing = again.next().await;
    assert_eq!(
        executing.text().expect("text"),
        &json!({"type": "executing", "data": {"node": "2"}})
    );
    let (status, _) = post_json(&sim, "/interrupt", &json!({"prompt_id": prompt_id})).await;
    assert_eq!(status, 200);
    sim.resume();
    let frames = again.until_done(&prompt_id).await;
    assert!(frames
        .iter()
        .any(|f| f.kind() == Some("execution_interrupted")));
    assert_eq!(sim.ws_client_ids(), vec!["r".to_owned(), "r".to_owned()]);
}

#[tokio::test]
async fn silent_sockets_lose_messages_but_stay_open() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "s").await;
    ws.next().await;
    sim.set_websockets_silent(true);
    sim.pause_after_step(1);
    let mut prompt = workflow("interrupt");
    prompt["2"]["inputs"]["steps"] = json!(3);
    let prompt_id = queue_prompt(&sim, &prompt, Some("s")).await;
    sim.paused().await;
    assert_eq!(
        get_json(&sim, "/queue").await["queue_running"][0][1],
        json!(prompt_id)
    );
    sim.set_websockets_silent(false);
    sim.resume();
    // Everything up to step 1 was lost; delivery resumes with step 2.
    let first = ws.next().await;
    assert_eq!(first.kind(), Some("progress_state"));
    assert_eq!(
        first.text().expect("text")["data"]["nodes"]["2"]["value"],
        2
    );
    ws.until_done(&prompt_id).await;
}

#[tokio::test]
async fn reconnect_bug_leaves_the_new_socket_deaf() {
    let sim = start().await;
    let old = Ws::connect(&sim, "dup").await;
    let mut new = Ws::connect(&sim, "dup").await;
    new.next().await;
    // Closing the old socket unregisters the id, taking the new socket with it.
    old.close().await;
    let mut witness = Ws::connect(&sim, "witness").await;
    witness.next().await;
    let prompt_id = queue_prompt(&sim, &workflow("runtime_error_custom"), Some("dup")).await;
    for _ in 0..3 {
        assert_eq!(witness.next().await.kind(), Some("status"));
    }
    assert!(history_entry(&sim, &prompt_id).await.is_object());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), new.stream.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn feature_flags_only_count_as_first_message() {
    let sim = start().await;
    let mut ws = Ws::connect(&sim, "f").await;
    ws.next().await;
    ws.send_text(&json!({"type": "hello"})).await;
    ws.send_text(&json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    let prompt_id = queue_prompt(&sim, &workflow("preview"), Some("f")).await;
    let frames = ws.until_done(&prompt_id).await;
    assert!(frames.iter().all(|f| f.kind() != Some("feature_flags")));
    let events: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Got::Binary(data) => Some(data[3]),
            _ => None,
        })
        .collect();
    assert_eq!(events, vec![1, 1, 1]);
}

#[tokio::test]
async fn serve_runs_until_shutdown() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr")
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::serve(port, SimConfig::default(), async {
        let _ = stopped.await;
    }));
    let mut response = None;
    for _ in 0..100 {
        match reqwest::get(format!("http://{port}/system_stats")).await {
            Ok(r) => {
                response = Some(r);
                break;
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
    assert_eq!(response.expect("server answers").status().as_u16(), 200);
    let _ = stop.send(());
    tokio::time::timeout(WAIT, server)
        .await
        .expect("stops")
        .expect("joins")
        .expect("serves");
}

#[tokio::test]
async fn deep_graphs_neither_overflow_nor_hang() {
    let sim = start().await;
    let chain = |length: usize| {
        let mut prompt = serde_json::Map::new();
        prompt.insert("0".into(), json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}));
        for i in 1..length {
            prompt.insert(
                i.to_string(),
                json!({"class_type": "ImageInvert", "inputs": {"image": [(i - 1).to_string(), 0]}}),
            );
        }
        prompt.insert("out".into(), json!({"class_type": "PreviewImage", "inputs": {"images": [(length - 1).to_string(), 0]}}));
        Value::Object(prompt)
    };
    // Deeper than Python's recursion limit: rejected like the real server, through a RecursionError.
    let (status, body) = post_json(&sim, "/prompt", &json!({"prompt": chain(3000)})).await;
    assert_eq!(status, 400);
    let reasons: Vec<&Value> = body["node_errors"]
        .as_object()
        .expect("node_errors")
        .values()
        .collect();
    assert_eq!(
        reasons[0]["errors"][0]["extra_info"]["exception_type"],
        "RecursionError"
    );
    // A long but legal chain runs.
    let mut ws = Ws::connect(&sim, "deep").await;
    ws.next().await;
    let prompt_id = queue_prompt(&sim, &chain(120), Some("deep")).await;
    let frames = ws.until_done(&prompt_id).await;
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.kind() == Some("executing"))
            .count(),
        122
    );
}

#[tokio::test]
async fn video_audio_and_latent_nodes_save_files_like_comfyui() {
    let sim = start().await;
    let prompt = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 3368601}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 12}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "video/clip", "format": "auto", "codec": "auto"}},
        "4": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "webm", "codec": "vp9", "fps": 24, "crf": 32}},
        "5": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6, "lossless": true, "quality": 80, "method": "default"}},
        "6": {"class_type": "EmptyAudio", "inputs": {"duration": 1.5, "sample_rate": 22050, "channels": 1}},
        "7": {"class_type": "SaveAudio", "inputs": {"audio": ["6", 0], "filename_prefix": "audio/tone"}},
        "8": {"class_type": "PreviewAudio", "inputs": {"audio": ["6", 0]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/l"}},
        "11": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0,
               "filename_prefix": "vhs/combined", "format": "video/h264-mp4", "pingpong": false, "save_output": true,
               "audio": ["6", 0], "pix_fmt": "yuv420p", "crf": 19}},
        "12": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 2.5, "loop_count": 1,
               "filename_prefix": "preview", "format": "image/gif", "pingpong": true, "save_output": false}},
        "13": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    });
    let mut ws = Ws::connect(&sim, "m").await;
    ws.next().await;
    let prompt_id = queue_prompt(&sim, &prompt, Some("m")).await;
    let frames = ws.until_done(&prompt_id).await;
    let entry = history_entry(&sim, &prompt_id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    // Validation made the FLOAT input a float, as ComfyUI does for VHS's `frame_rate`.
    let outputs = &entry["outputs"];
    assert_eq!(
        outputs["3"],
        json!({"images": [{"filename": "clip_00001_.mp4", "subfolder": "video", "type": "output"}], "animated": [true]})
    );
    assert_eq!(
        outputs["4"],
        json!({"images": [{"filename": "webm_00001_.webm", "subfolder": "", "type": "output"}], "animated": [true]})
    );
    assert_eq!(
        outputs["5"],
        json!({"images": [{"filename": "anim_00001_.webp", "subfolder": "", "type": "output"}], "animated": [true]})
    );
    assert_eq!(
        outputs["7"],
        json!({"audio": [{"filename": "tone_00001_.flac", "subfolder": "audio", "type": "output"}]})
    );
    let preview = outputs["8"]["audio"][0]["filename"].as_str().unwrap();
    assert!(
        preview.starts_with("ComfyUI_temp_") && preview.ends_with("_00001_.flac"),
        "{preview}"
    );
    assert_eq!(outputs["8"]["audio"][0]["type"], "temp");
    assert_eq!(
        outputs["10"],
        json!({"latents": [{"filename": "l_00001_.latent", "subfolder": "latents", "type": "output"}]})
    );
    assert_eq!(
        outputs["11"],
        json!({"gifs": [{"filename": "combined_00001-audio.mp4", "subfolder": "vhs", "type": "output",
            "format": "video/h264-mp4", "frame_rate": 8.0, "workflow": "combined_00001.png",
            "fullpath": "/comfyui/output/vhs/combined_00001-audio.mp4"}]})
    );
    assert_eq!(
        outputs["12"],
        json!({"gifs": [{"filename": "preview_00001.gif", "subfolder": "", "type": "temp",
            "format": "image/gif", "frame_rate": 2.5, "workflow": "preview_00001.png",
            "fullpath": "/comfyui/temp/preview_00001.gif"}]})
    );
    assert!(outputs.get("13").is_none(), "SaveImageWebsocket has no ui");

    // The files are there, with their headers and content types.
    for (query, content_type, magic) in [
        (
            "filename=clip_00001_.mp4&subfolder=video",
            "video/mp4",
            &b"ftyp"[..],
        ),
        (
            "filename=webm_00001_.webm",
            "video/webm",
            &[0x1A, 0x45, 0xDF, 0xA3][..],
        ),
        ("filename=anim_00001_.webp", "image/webp", &b"RIFF"[..]),
        (
            "filename=tone_00001_.flac&subfolder=audio",
            "audio/flac",
            &b"fLaC"[..],
        ),
        (
            "filename=combined_00001-audio.mp4&subfolder=vhs",
            "video/mp4",
            &b"ftyp"[..],
        ),
        (
            "filename=combined_00001.mp4&subfolder=vhs",
            "video/mp4",
            &b"ftyp"[..],
        ),
        (
            "filename=combined_00001.png&subfolder=vhs",
            "image/png",
            &[0x89, b'P'][..],
        ),
        (
            "filename=preview_00001.gif&type=temp",
            "image/gif",
            &b"GIF89a"[..],
        ),
    ] {
        let response = view(&sim, query).await;
        assert_eq!(response.status().as_u16(), 200, "{query}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            content_type,
            "{query}"
        );
        let bytes = response.bytes().await.unwrap();
        let at = if magic == b"ftyp" { 4 } else { 0 };
        assert_eq!(&bytes[at..at + magic.len()], magic, "{query}");
    }

    // VHS reports progress per frame; SaveImageWebsocket sends one PNG per image, 0..N-1.
    let progress = |node: &str| -> Vec<(u64, u64)> {
        frames
            .iter()
            .filter_map(Got::text)
            .filter(|t| t["type"] == "progress" && t["data"]["node"] == node)
            .map(|t| {
                (
                    t["data"]["value"].as_u64().unwrap(),
                    t["data"]["max"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(progress("11"), [(1, 3), (2, 3), (3, 3)]);
    assert_eq!(progress("13"), [(0, 3), (1, 3), (2, 3)]);
    let sent = sim.websocket_images();
    assert_eq!(sent.len(), 3);
    assert!(sent
        .iter()
        .all(|(node, png)| node == "13" && png_size(png) == (64, 48)));

    // A second run (with another colour, so nothing is cached) counts on, like the real nodes.
    let mut prompt = prompt;
    prompt["1"]["inputs"]["color"] = json!(0);
    let prompt_id = queue_prompt(&sim, &prompt, Some("m")).await;
    ws.until_done(&prompt_id).await;
    let entry = history_entry(&sim, &prompt_id).await;
    assert_eq!(
        entry["outputs"]["3"]["images"][0]["filename"],
        "clip_00002_.mp4"
    );
    assert_eq!(
        entry["outputs"]["11"]["gifs"][0]["filename"],
        "combined_00002-audio.mp4"
    );
    ws.close().await;
}
