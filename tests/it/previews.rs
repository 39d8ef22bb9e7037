//! Live previews: ComfyUI's previews of a sampling node reach the local endpoint's `/events`
//! and `/stream` (held to the size caps), and RunPod progress posts only when a job asks.

use std::collections::BTreeSet;

use base64::Engine as _;
use comfy_sim::Simulator;
use comfy_worker::config::{PreviewPolicy, Settings};
use comfy_worker::endpoint::{self, ServeOptions};
use comfy_worker::job::Engine;
use comfy_worker::webhook::{WebhookPolicy, Webhooks};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::fake_platform::PostKind;
use crate::harness::{self, LIMIT};
use crate::serve::Events;
use crate::worker_in_process::spawn_app;
use crate::worker_process::{job_input, simulator};

/// A 20-step job whose sampler previews every step (the simulator's previews converge from grey
/// to the image's colour).
fn previewing_job(colour: u64) -> Value {
    let mut input = job_input(colour, 20);
    input["workflow"]["2"]["inputs"]["send_preview"] = json!(true);
    input
}

/// `serve` in process over `sim`, with these preview settings; returns its base URL and the
/// token that stops it.
async fn serve(sim: &Simulator, previews: PreviewPolicy) -> (String, CancellationToken) {
    harness::init_logs();
    let settings = Settings {
        previews,
        ..harness::settings(&sim.host())
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(endpoint::serve(
        listener,
        Engine::new(settings).unwrap(),
        Webhooks::new(WebhookPolicy::default()),
        ServeOptions::default(),
        stop.clone(),
    ));
    (base, stop)
}

async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    tokio::time::timeout(LIMIT, http.post(url).json(body).send())
        .await
        .unwrap()
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn previews_reach_events_and_stream_within_the_caps() {
    let sim = simulator(1).await;
    let policy = PreviewPolicy {
        max_per_second: 1e9,
        ..PreviewPolicy::default()
    };
    let (base, stop) = serve(&sim, policy.clone()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // Held at five steps in turn: /stream holds the latest preview each time.
    let holds = [2, 5, 8, 11, 14];
    sim.pause_after_step(holds[0]);
    let reply = post_json(
        &http,
        &format!("{base}/run"),
        &json!({ "input": previewing_job(0x20_60_e0) }),
    )
    .await;
    let id = reply["id"].as_str().unwrap().to_owned();
    let mut events = Events::at(&http, &format!("{base}/events/{id}")).await;
    let mut on_stream = Vec::new();
    for (i, _) in holds.iter().enumerate() {
        tokio::time::timeout(LIMIT, sim.paused()).await.unwrap();
        let stream = post_json(&http, &format!("{base}/stream/{id}"), &json!({})).await;
        assert_eq!(stream["status"], "IN_PROGRESS", "{stream}");
        let held = &stream["stream"][0]["output"]["preview"];
        assert_eq!(held["mime"], "image/jpeg", "{stream}");
        assert_eq!(held["node"], "2", "{stream}");
        assert_eq!(
            (held["width"].clone(), held["height"].clone()),
            (json!(64), json!(64))
        );
        on_stream.push(held["data"].as_str().unwrap().to_owned());
        // On to the next hold (arming it lets the sampler go on), or to the end.
        match holds.get(i + 1) {
            Some(next) => sim.pause_after_step(*next),
            None => sim.resume(),
        }
    }
    let distinct_on_stream: BTreeSet<&String> = on_stream.iter().collect();
    assert_eq!(distinct_on_stream.len(), 5, "{on_stream:?}");

    let mut previews = Vec::new();
    while let Some((name, body)) = events.next().await {
        if name == "preview" {
            previews.push(body);
        }
    }
    let distinct: BTreeSet<&str> = previews
        .iter()
        .map(|p| p["data"].as_str().unwrap())
        .collect();
    assert!(
        distinct.len() >= 5,
        "{} distinct previews of {}",
        distinct.len(),
        previews.len()
    );
    for preview in &previews {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(preview["data"].as_str().unwrap())
            .unwrap();
        assert!(bytes.len() <= policy.max_bytes, "{} bytes", bytes.len());
        assert!(bytes.starts_with(&[0xff, 0xd8]), "a JPEG");
        assert!(preview["width"].as_u64().unwrap() <= u64::from(policy.max_side));
    }
    // The last preview is the image's own colour; the first is still near grey.
    assert_ne!(previews.first(), previews.last());

    // Done: /stream holds the output, not a preview.
    let stream = post_json(&http, &format!("{base}/stream/{id}"), &json!({})).await;
    assert_eq!(stream["status"], "COMPLETED", "{stream}");
    assert!(
        stream["stream"][0]["output"]["images"].is_array(),
        "{stream}"
    );
    assert!(stream["stream"][0]["output"].get("preview").is_none());
    stop.cancel();
}

#[tokio::test]
async fn previews_over_the_size_cap_are_not_relayed() {
    let sim = simulator(1).await;
    // The simulator's previews are 64 pixels wide: a 32-pixel cap lets none through.
    let (base, stop) = serve(
        &sim,
        PreviewPolicy {
            max_per_second: 1e9,
            max_side: 32,
            ..PreviewPolicy::default()
        },
    )
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let reply = post_json(
        &http,
        &format!("{base}/run"),
        &json!({ "input": previewing_job(0xff_00_00) }),
    )
    .await;
    let id = reply["id"].as_str().unwrap().to_owned();
    let events = Events::at(&http, &format!("{base}/events/{id}")).await;
    let all = events.rest().await;
    let last = &all.last().unwrap().1;
    assert_eq!(last["status"], "COMPLETED", "{last}");
    assert!(
        all.iter().all(|(name, _)| name != "preview"),
        "no preview passes the cap"
    );
    assert!(
        all.iter().filter(|(name, _)| name == "progress").count() > 10,
        "progress still flows"
    );
    stop.cancel();
}

#[tokio::test]
async fn runpod_posts_carry_previews_only_when_asked() {
    let app = spawn_app(&[]).await;
    app.platform.push_job("plain", previewing_job(0x10_20_30));
    let mut asked = previewing_job(0x30_20_10);
    asked["previews"] = json!(true);
    app.platform.push_job("asked", asked);
    app.step().await;
    app.step().await;

    let progress = |id: &str| -> Vec<Value> {
        app.platform
            .posts(id)
            .into_iter()
            .filter(|p| p.kind == PostKind::Progress)
            .map(|p| p.body)
            .collect()
    };
    let plain = progress("plain");
    assert!(plain.len() > 2, "progress was relayed: {plain:?}");
    assert!(
        plain.iter().all(|b| b["output"].get("preview").is_none()),
        "no preview unless asked"
    );
    let asked = progress("asked");
    let with_preview: Vec<&Value> = asked
        .iter()
        .filter_map(|b| b["output"].get("preview"))
        .collect();
    assert!(!with_preview.is_empty(), "{asked:?}");
    for preview in with_preview {
        assert_eq!(preview["mime"], "image/jpeg");
        assert_eq!(preview["node"], "2");
        assert!(preview["data"].as_str().unwrap().starts_with("/9j/"));
    }
    for id in ["plain", "asked"] {
        let status = app.platform.status(id);
        assert_eq!(status["status"], "COMPLETED", "{status}");
        assert!(
            status["output"].get("preview").is_none(),
            "the result is the output"
        );
    }
}
