//! The `current` profile on the wire: `/features`, `/system_stats`, the jobs API with its
//! statuses and cancel, the held history window, the loading activity; and that 0.3.64 has none
//! of it. Waits are on messages and hooks; timeouts only turn a hang into a failure.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use super::{Profile, SimConfig, Simulator};

const WAIT: Duration = Duration::from_secs(30);
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/comfyui");

async fn start(profile: Profile) -> Simulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = SimConfig {
        step_delay: Duration::from_millis(2),
        profile,
        ..SimConfig::default()
    };
    Simulator::start(listener, config).await.expect("start")
}

fn workflow(steps: u64) -> Value {
    let path = format!("{FIXTURES}/workflows/ok.json");
    let mut wf: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    wf["2"]["inputs"]["steps"] = json!(steps);
    wf
}

async fn get(sim: &Simulator, path: &str) -> (u16, String, Value) {
    let response = reqwest::get(format!("http://{}{path}", sim.host()))
        .await
        .expect("GET");
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    (
        status,
        kind,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(sim: &Simulator, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}{path}", sim.host()))
        .json(body)
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn queue(sim: &Simulator, prompt: &Value, client_id: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let (status, reply) = post(
        sim,
        "/prompt",
        &json!({"prompt": prompt, "client_id": client_id, "prompt_id": id, "extra_data": {"api_key_comfy_org": "key-1"}}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    id
}

#[tokio::test]
async fn current_reports_its_features_version_and_devices() {
    let sim = start(Profile::Current).await;
    let (_, _, features) = get(&sim, "/features").await;
    assert_eq!(features.as_object().unwrap().len(), 6, "{features}");
    assert_eq!(features["assets"], json!(true));
    let (_, _, stats) = get(&sim, "/api/system_stats").await;
    assert_eq!(stats["system"]["comfyui_version"], json!("0.38.1"));
    assert_eq!(stats["system"]["os"], json!("linux"));
    assert_eq!(stats["devices"].as_array().unwrap().len(), 2);
    assert_eq!(stats["devices"][0]["index"], json!(0));

    let old = start(Profile::V0_3_64).await;
    let (_, _, features) = get(&old, "/features").await;
    assert_eq!(features.as_object().unwrap().len(), 2);
    let (status, kind, body) = get(&old, "/api/jobs?limit=1").await;
    assert_eq!((status, kind.as_str()), (404, "text/plain; charset=utf-8"));
    assert_eq!(body, json!("404: Not Found"));
    assert_eq!(post(&old, "/api/jobs/x/cancel", &json!({})).await.0, 404);
}

#[tokio::test]
async fn jobs_follow_a_prompt_from_pending_to_completed() {
    let sim = start(Profile::Current).await;
    let (status, _, empty) = get(&sim, "/api/jobs?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(
        empty,
        json!({"jobs": [], "pagination": {"offset": 0, "limit": 1, "total": 0, "has_more": false}})
    );
    assert_eq!(
        get(&sim, "/api/jobs?status=done").await.2["error"],
        json!("Invalid status value(s): done. Valid values: pending, in_progress, completed, failed, cancelled")
    );
    let (status, _, missing) = get(&sim, "/api/jobs/nope").await;
    assert_eq!((status, missing), (404, json!({"error": "Job not found"})));

    sim.pause_after_step(2);
    let running = queue(&sim, &workflow(5), "c1").await;
    let mut other = workflow(5);
    other["1"]["inputs"]["color"] = json!(7);
    let pending = queue(&sim, &other, "c1").await;
    tokio::time::timeout(WAIT, sim.paused()).await.unwrap();
    let (_, _, job) = get(&sim, &format!("/api/jobs/{running}")).await;
    assert_eq!(job["status"], json!("in_progress"));
    assert!(job["workflow"]["extra_data"]
        .get("api_key_comfy_org")
        .is_none());
    let (_, _, queue) = get(&sim, "/queue").await;
    assert!(
        queue["queue_running"][0][3]
            .get("api_key_comfy_org")
            .is_none(),
        "{queue}"
    );
    assert!(job["create_time"].as_u64().is_some(), "{job}");
    assert!(job["workflow"]["prompt"].is_object());
    assert_eq!(
        get(&sim, &format!("/api/jobs/{pending}")).await.2["status"],
        json!("pending")
    );

    // Cancelling the pending one removes it: it never reaches history.
    let cancel = format!("/api/jobs/{pending}/cancel");
    assert_eq!(
        post(&sim, &cancel, &json!({})).await,
        (200, json!({"cancelled": true}))
    );
    assert_eq!(get(&sim, &format!("/api/jobs/{pending}")).await.0, 404);
    assert_eq!(
        post(&sim, &cancel, &json!({})).await,
        (200, json!({"cancelled": false}))
    );

    sim.hold_history();
    sim.resume();
    tokio::time::timeout(WAIT, sim.history_held())
        .await
        .unwrap();
    // Between execution_success and the history write: still in progress, no history yet.
    assert_eq!(
        get(&sim, &format!("/api/jobs/{running}")).await.2["status"],
        json!("in_progress")
    );
    assert_eq!(get(&sim, &format!("/history/{running}")).await.2, json!({}));
    sim.release_history();
    let job = loop {
        let (_, _, job) = get(&sim, &format!("/api/jobs/{running}")).await;
        if job["status"] != json!("in_progress") {
            break job;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(job["status"], json!("completed"), "{job}");
    assert_eq!(job["outputs_count"], json!(2));
    assert_eq!(job["preview_output"]["nodeId"], json!("3"));
    assert_eq!(job["execution_status"]["status_str"], json!("success"));
    // Output files carry their media metadata and an asset id, in history as in the jobs API.
    let image = &job["outputs"]["3"]["images"][0];
    assert_eq!(
        image["metadata"],
        json!({"kind": "image", "width": 512, "height": 512})
    );
    assert!(
        image["id"]
            .as_str()
            .is_some_and(super::jobs::canonical_uuid),
        "{image}"
    );
    assert_eq!(image["preview_id"], image["id"]);
    let history = get(&sim, &format!("/history/{running}")).await.2;
    assert_eq!(
        history[&running]["outputs"]["3"]["images"][0]["id"],
        image["id"]
    );
    let (_, _, list) = get(&sim, "/api/jobs?status=completed").await;
    assert_eq!(list["pagination"]["total"], json!(1));
    assert!(
        list["jobs"][0].get("outputs").is_none(),
        "lists carry no outputs"
    );
    let done = format!("/api/jobs/{running}/cancel");
    assert_eq!(
        post(&sim, &done, &json!({})).await,
        (200, json!({"cancelled": false}))
    );
    assert_eq!(
        post(&sim, "/api/jobs/cancel", &json!({"job_ids": ["X"]}))
            .await
            .1,
        json!({"error": "job_ids contains invalid id(s)", "invalid_ids": ["X"]})
    );
}

#[tokio::test]
async fn cancelling_a_running_job_interrupts_it_and_reads_cancelled() {
    let sim = start(Profile::Current).await;
    sim.pause_after_step(1);
    let id = queue(&sim, &workflow(5), "c2").await;
    tokio::time::timeout(WAIT, sim.paused()).await.unwrap();
    let cancel = format!("/api/jobs/{id}/cancel");
    assert_eq!(
        post(&sim, &cancel, &json!({})).await.1,
        json!({"cancelled": true})
    );
    // Idempotent while it still runs.
    assert_eq!(
        post(&sim, &cancel, &json!({})).await.1,
        json!({"cancelled": true})
    );
    sim.resume();
    let job = loop {
        let (_, _, job) = get(&sim, &format!("/api/jobs/{id}")).await;
        if job["status"] != json!("in_progress") {
            break job;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(job["status"], json!("cancelled"), "{job}");
    assert_eq!(sim.job_cancels(), [id.clone(), id]);
}

#[tokio::test]
async fn current_checks_prompt_ids_and_shows_the_loading_activity() {
    let sim = start(Profile::Current).await;
    let (status, reply) = post(
        &sim,
        "/prompt",
        &json!({"prompt": workflow(2), "prompt_id": "NOT-A-UUID"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(reply["error"]["type"], json!("invalid_prompt_id"));

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?clientId=c3", sim.host()))
            .await
            .unwrap();
    let id = queue(&sim, &workflow(2), "c3").await;
    let mut activities = Vec::new();
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = frame else { continue };
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        if v["type"] == "progress_state" {
            activities.push(v["data"]["nodes"]["2"]["activity"].clone());
        }
        if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == id {
            break;
        }
    }
    let loading = activities
        .iter()
        .position(|a| a == "loading")
        .expect("a loading phase");
    assert!(
        activities[loading + 1].is_null(),
        "then cleared: {activities:?}"
    );
}
