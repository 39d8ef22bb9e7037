//! The real engine and client against replays of real ComfyUI recordings
//! (`tests/fixtures/comfyui/transcripts`), races and all.

use comfy_worker::comfy::{Outcome, PromptEvent, WatchOptions, Workflow};
use comfy_worker::progress::ProgressKind;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{self, error_text, images, png_size, run_job, spawn_job, steps_of};
use crate::replay::{ReplayOptions, ReplayServer, Transcript};

async fn replay(name: &str, time_scale: f64) -> (ReplayServer, serde_json::Value) {
    harness::init_logs();
    let t = Transcript::load(name);
    let input = json!({ "workflow": t.workflow() });
    (
        ReplayServer::start(t, ReplayOptions { time_scale }).await,
        input,
    )
}

fn assert_clean(server: &ReplayServer) {
    assert!(
        server.violations().is_empty(),
        "protocol violations: {:?}",
        server.violations()
    );
}

#[tokio::test]
async fn ok_returns_both_images_and_every_step() {
    for scale in [0.0, 0.05] {
        let (server, input) = replay("ok", scale).await;
        let (output, progress) = run_job(&harness::engine(&server.host()), input).await;
        let imgs = images(&output);
        let names: Vec<&str> = imgs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["anchors_ok_full_00001_.png", "anchors_ok_small_00001_.png"]
        );
        for (_, data) in &imgs {
            png_size(data);
        }
        assert_eq!(
            steps_of(&progress, "2"),
            (1..=10).collect::<Vec<_>>(),
            "scale {scale}"
        );
        let last = progress.last().unwrap();
        assert_eq!(
            (last.kind, last.overall_percent),
            (ProgressKind::Finished, 100.0)
        );
        let mut prev = 0.0;
        for s in &progress {
            assert!(s.overall_percent >= prev, "overall went back: {s:?}");
            prev = s.overall_percent;
        }
        assert_clean(&server);
    }
}

#[tokio::test]
async fn cached_rerun_still_returns_outputs() {
    let (server, input) = replay("ok_cached", 0.0).await;
    let (output, progress) = run_job(&harness::engine(&server.host()), input).await;
    assert_eq!(images(&output).len(), 2);
    let cached = progress
        .iter()
        .find(|s| s.kind == ProgressKind::Cached)
        .expect("a cached snapshot");
    assert_eq!(
        (cached.nodes_cached, cached.nodes_done, cached.nodes_total),
        (5, 5, 5)
    );
    assert_clean(&server);
}

#[tokio::test]
async fn validation_failures_name_the_nodes() {
    let (server, input) = replay("bad_node", 0.0).await;
    let (output, _) = run_job(&harness::engine(&server.host()), input).await;
    let err = error_text(&output);
    assert!(err.starts_with("Workflow validation failed:"), "{err}");
    assert!(
        err.contains("Node 1 (EmptyImage): Value 0 smaller than min of 1: width"),
        "{err}"
    );
    assert!(
        err.contains(
            "Node 2 (SlowSteps): Failed to convert an input value to a INT value: steps, ten"
        ),
        "{err}"
    );
    assert_clean(&server);

    let (server, input) = replay("bad_class", 0.0).await;
    let (output, _) = run_job(&harness::engine(&server.host()), input).await;
    let err = error_text(&output);
    assert!(err.contains("NoSuchNodeClass does not exist"), "{err}");
    assert!(err.contains("'#2'"), "{err}");
    assert_clean(&server);
}

#[tokio::test]
async fn runtime_errors_carry_node_type_and_message() {
    for (name, node, class, text) in [
        (
            "runtime_error",
            "3",
            "SaveImage",
            "Saving image outside the output folder is not allowed",
        ),
        (
            "runtime_error_custom",
            "3",
            "RaiseError",
            "RaiseError node failed on purpose",
        ),
    ] {
        let (server, input) = replay(name, 0.0).await;
        let (output, progress) = run_job(&harness::engine(&server.host()), input).await;
        let err = error_text(&output);
        assert!(err.contains(&format!("Node Type: {class}")), "{err}");
        assert!(err.contains(&format!("Node ID: {node}")), "{err}");
        assert!(err.contains(text), "{err}");
        let failed = progress
            .iter()
            .find(|s| s.kind == ProgressKind::Error)
            .expect("error snapshot");
        assert_eq!(failed.node.as_deref(), Some(node));
        assert_clean(&server);
    }
}

#[tokio::test]
async fn cancelling_interrupts_the_prompt() {
    let (server, input) = replay("interrupt", 0.02).await;
    let mut job = spawn_job(&harness::engine(&server.host()), input);
    job.until(|s| s.kind == ProgressKind::Progress && s.value.0 >= 3.0)
        .await;
    job.cancel.cancel();
    let (output, _) = job.finish().await;
    let err = error_text(&output);
    assert!(err.starts_with("Job cancelled"), "{err}");
    assert!(err.contains("node 2 (SlowSteps)"), "{err}");
    let interrupts = server.interrupts();
    assert_eq!(interrupts.len(), 1, "{interrupts:?}");
    assert!(
        interrupts[0]
            .as_ref()
            .and_then(|b| b.get("prompt_id"))
            .is_some(),
        "{interrupts:?}"
    );
    assert_clean(&server);
}

#[tokio::test]
async fn an_interrupt_from_elsewhere_is_a_clear_error() {
    let (server, input) = replay("interrupt_global", 0.02).await;
    let mut job = spawn_job(&harness::engine(&server.host()), input);
    job.until(|s| s.kind == ProgressKind::Progress && s.value.0 >= 3.0)
        .await;
    // An operator interrupts ComfyUI directly (no body: the global form).
    let resp = reqwest::Client::new()
        .post(format!("http://{}/interrupt", server.host()))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let (output, progress) = job.finish().await;
    let err = error_text(&output);
    assert!(err.contains("interrupted at node 2 (SlowSteps)"), "{err}");
    assert!(!err.starts_with("Job cancelled"), "{err}");
    assert!(progress.iter().any(|s| s.kind == ProgressKind::Interrupted));
    assert_clean(&server);
}

#[tokio::test]
async fn previews_are_attributed_in_both_binary_formats() {
    for name in ["preview", "preview_metadata"] {
        let (server, input) = replay(name, 0.0).await;
        let client = harness::engine(&server.host()).comfy().clone();
        let workflow = Workflow::from_value(input["workflow"].clone()).unwrap();
        let mut previews = Vec::new();
        let result = client
            .run_prompt(
                &workflow,
                None,
                &WatchOptions::default(),
                &CancellationToken::new(),
                &mut |e| {
                    if let PromptEvent::Preview { node, mime, data } = e {
                        previews.push((node, mime, data.len()));
                    }
                },
            )
            .await
            .unwrap();
        assert_eq!(result.outcome, Outcome::Success, "{name}");
        assert_eq!(previews.len(), 3, "{name}: {previews:?}");
        for (node, mime, len) in &previews {
            assert_eq!(node.as_deref(), Some("2"), "{name}");
            assert_eq!(*mime, "image/jpeg", "{name}");
            assert!(*len > 0);
        }
        assert_clean(&server);
        // Only a temp (PreviewImage) output: nothing to return, like worker-comfyui.
        let (server, input) = replay(name, 0.0).await;
        let (output, _) = run_job(&harness::engine(&server.host()), input).await;
        assert_eq!(
            output.to_json(),
            json!({"status": "success_no_images", "images": []}),
            "{name}"
        );
        assert_clean(&server);
    }
}

#[tokio::test]
async fn a_dropped_socket_mid_run_still_completes_through_history() {
    let (server, input) = replay("ok", 0.05).await;
    let mut job = spawn_job(&harness::engine(&server.host()), input);
    job.until(|s| s.kind == ProgressKind::Progress && s.value.0 >= 2.0)
        .await;
    server.drop_websockets();
    let (output, progress) = job.finish().await;
    assert_eq!(images(&output).len(), 2, "{}", output.to_json());
    assert_eq!(
        progress.last().map(|s| s.kind),
        Some(ProgressKind::Finished)
    );
    assert_clean(&server);
}
