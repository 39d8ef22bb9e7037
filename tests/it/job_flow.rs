//! The real engine against the in-process ComfyUI simulator: the whole job flow, uploads,
//! caching, validation, runtime errors, cancel, and a socket killed or silenced mid-run.

use comfy_sim::Simulator;
use comfy_worker::job::Engine;
use comfy_worker::progress::ProgressKind;
use serde_json::{json, Value};

use crate::harness::{self, error_text, images, png_size, run_job, spawn_job, steps_of};
use crate::worker_process::simulator;

fn engine(sim: &Simulator) -> Engine {
    harness::engine(&sim.host())
}

/// A 32×32 PNG as a data URL.
const TEST_PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42mM4YaNBU8QwasGoBaMWjFowasGoBaMWjFowasGoBaMWDBULADahsD1yPRQZAAAAAElFTkSuQmCC";

#[tokio::test]
async fn test_input_runs_end_to_end_with_every_step() {
    let sim = simulator(1).await;
    let mut job = harness::test_input();
    // With an input image beside it (the bundled job needs none), uploaded before the prompt.
    job["input"]["images"] = json!([{"name": "test.png", "image": TEST_PNG}]);
    let (output, progress) = run_job(&engine(&sim), job["input"].clone()).await;
    let imgs = images(&output);
    assert_eq!(imgs.len(), 1, "{}", output.to_json());
    assert_eq!(png_size(&imgs[0].1), (1024, 1024));
    assert!(
        imgs[0].0.starts_with("ComfyUI_") && imgs[0].0.ends_with("_.png"),
        "{}",
        imgs[0].0
    );
    assert_eq!(steps_of(&progress, "3"), (1..=25).collect::<Vec<_>>());
    let step = progress
        .iter()
        .find(|s| s.kind == ProgressKind::Progress)
        .unwrap();
    assert_eq!(step.node_type.as_deref(), Some("KSampler"));
    assert_eq!(step.step.as_deref(), Some("Sampling"));
    assert!(step.prompt_id.is_some());
    let last = progress.last().unwrap();
    assert_eq!(
        (last.kind, last.overall_percent, last.nodes_done),
        (ProgressKind::Finished, 100.0, 7)
    );
    // The input image was uploaded byte for byte.
    let bytes = comfy_worker::job::codec::decode_input(TEST_PNG).unwrap();
    assert_eq!(sim.input_file("", "test.png"), Some(bytes));
    // The socket was opened before the prompt, with the prompt's client id.
    let prompt = &sim.prompts()[0];
    assert!(sim
        .ws_client_ids()
        .contains(&prompt["client_id"].as_str().unwrap().to_owned()));
}

#[tokio::test]
async fn two_outputs_sized_from_the_graph_then_a_cached_rerun() {
    let sim = simulator(1).await;
    let engine = engine(&sim);
    let input = json!({"workflow": harness::workflow("ok")});
    let (first, _) = run_job(&engine, input.clone()).await;
    let sizes: Vec<(u32, u32)> = images(&first).iter().map(|(_, d)| png_size(d)).collect();
    assert_eq!(sizes, [(512, 512), (256, 256)]);
    let (second, progress) = run_job(&engine, input).await;
    assert_eq!(
        images(&second),
        images(&first),
        "cached outputs are the same files"
    );
    let cached = progress
        .iter()
        .find(|s| s.kind == ProgressKind::Cached)
        .unwrap();
    assert_eq!(cached.nodes_cached, 5);
    assert!(steps_of(&progress, "2").is_empty(), "nothing re-ran");
}

#[tokio::test]
async fn validation_errors_are_readable_and_hint_models() {
    let sim = simulator(1).await;
    let engine = engine(&sim);
    let (out, _) = run_job(&engine, json!({"workflow": harness::workflow("bad_node")})).await;
    let err = error_text(&out);
    assert!(
        err.contains("Node 1 (EmptyImage): Value 0 smaller than min of 1"),
        "{err}"
    );
    assert!(err.contains("Node 2 (SlowSteps)"), "{err}");
    let (out, _) = run_job(&engine, json!({"workflow": harness::workflow("bad_class")})).await;
    assert!(error_text(&out).contains("NoSuchNodeClass"));

    let mut job = harness::test_input()["input"].clone();
    job["workflow"]["4"]["inputs"]["ckpt_name"] = json!("missing.safetensors");
    let (out, _) = run_job(&engine, job).await;
    let err = error_text(&out);
    assert!(err.contains("Node 4 (CheckpointLoaderSimple)"), "{err}");
    assert!(
        err.contains("Available checkpoint models for CheckpointLoaderSimple.ckpt_name: ")
            && err.contains("sd_xl_base_1.0.safetensors"),
        "{err}"
    );
    let details = out.to_json()["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(details.len() >= 2, "{details:?}");
}

#[tokio::test]
async fn runtime_errors_name_node_type_and_message() {
    let sim = simulator(1).await;
    let (out, _) = run_job(
        &engine(&sim),
        json!({"workflow": harness::workflow("runtime_error_custom")}),
    )
    .await;
    let err = error_text(&out);
    assert!(err.contains("Node Type: RaiseError, Node ID: 3"), "{err}");
    assert!(err.contains("RaiseError node failed on purpose"), "{err}");
    let (out, _) = run_job(
        &engine(&sim),
        json!({"workflow": harness::workflow("runtime_error")}),
    )
    .await;
    let err = error_text(&out);
    assert!(err.contains("Node Type: SaveImage, Node ID: 3"), "{err}");
}

#[tokio::test]
async fn the_api_key_goes_to_comfyui_as_extra_data() {
    let sim = simulator(1).await;
    let input = json!({"workflow": harness::workflow("ok"), "comfy_org_api_key": "key-abc"});
    run_job(&engine(&sim), input).await;
    assert_eq!(
        sim.prompts()[0]["extra_data"]["api_key_comfy_org"],
        json!("key-abc")
    );
}

#[tokio::test]
async fn a_killed_websocket_mid_run_still_returns_every_output() {
    let sim = simulator(1).await;
    sim.pause_after_step(3);
    let job = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    let before = sim.ws_client_ids().len();
    sim.drop_websockets();
    sim.resume();
    let (output, progress) = job.finish().await;
    let sizes: Vec<(u32, u32)> = images(&output).iter().map(|(_, d)| png_size(d)).collect();
    assert_eq!(sizes, [(512, 512), (256, 256)]);
    assert_eq!(
        progress.last().map(|s| s.kind),
        Some(ProgressKind::Finished)
    );
    assert!(sim.ws_client_ids().len() > before, "the client reconnected");
    let ids = sim.ws_client_ids();
    assert_ne!(ids[ids.len() - 1], ids[0], "with a fresh client id");
}

#[tokio::test]
async fn a_silent_websocket_is_caught_by_the_history_fallback() {
    let sim = simulator(1).await;
    sim.pause_after_step(2);
    let job = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    sim.set_websockets_silent(true);
    sim.resume();
    let (output, _) = job.finish().await;
    assert_eq!(images(&output).len(), 2, "{}", output.to_json());
}

#[tokio::test]
async fn cancel_interrupts_the_running_prompt() {
    let sim = simulator(1).await;
    sim.pause_after_step(3);
    let job = spawn_job(
        &engine(&sim),
        json!({"workflow": harness::workflow("interrupt")}),
    );
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    job.cancel.cancel();
    // The interrupt reaches the simulator while it is paused; then it may go on.
    tokio::time::timeout(harness::LIMIT, sim.interrupt_handled(1))
        .await
        .unwrap();
    sim.resume();
    let (output, _) = job.finish().await;
    let err = error_text(&output);
    assert!(err.starts_with("Job cancelled"), "{err}");
    let prompt_id = sim.prompts()[0]["prompt_id"].clone();
    assert_eq!(
        sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
        prompt_id
    );
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_never_reach_comfyui() {
    let sim = simulator(1).await;
    let engine = engine(&sim);
    let ok = harness::workflow("ok");
    let cases: Vec<(Option<Value>, &str)> = vec![
        (None, "Please provide input"),
        (Some(json!({})), "Missing 'workflow' parameter"),
        (
            Some(json!({"workflow": "not an object"})),
            "must be a JSON object",
        ),
        (Some(json!({"workflow": [1, 2]})), "must be a JSON object"),
        (
            Some(json!({"workflow": {"nodes": [], "links": [], "last_node_id": 3}})),
            "Cannot convert the UI-format workflow to API format: the workflow has no nodes",
        ),
        (
            Some(json!({"workflow": ok, "images": {"name": "a"}})),
            "'images' must be a list",
        ),
        (
            Some(json!({"workflow": ok, "images": [{"name": "a.png"}]})),
            "'images' must be a list",
        ),
        (
            Some(json!({"workflow": ok, "images": [{"name": "a.png", "image": "%%%"}]})),
            "Failed to upload one or more input images",
        ),
        (
            Some(json!({"workflow": ok, "images": [{"name": "../a.png", "image": "aGk="}]})),
            "Invalid image name",
        ),
        (
            Some(json!({"workflow": ok, "images": [{"name": "dir/a.png", "image": "aGk="}]})),
            "Invalid image name",
        ),
    ];
    let runner = comfy_worker::runner::Runner::new(engine, std::time::Duration::ZERO);
    for (input, expected) in cases {
        let request = comfy_worker::job::JobRequest::new("bad", input.clone());
        let out = runner.run(&request, Default::default(), &mut []).await;
        let out = comfy_worker::job::JobOutput::from(out);
        let err = error_text(&out);
        assert!(err.contains(expected), "{input:?}: {err}");
    }
    assert!(sim.prompts().is_empty(), "no bad job was queued");
}

#[tokio::test]
async fn an_unreachable_comfyui_is_reported_after_the_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (out, _) = run_job(
        &harness::engine(&addr.to_string()),
        json!({"workflow": harness::workflow("ok")}),
    )
    .await;
    let err = error_text(&out);
    assert_eq!(
        err,
        format!("ComfyUI server ({addr}) not reachable after 30 ms (COMFY_READY_TIMEOUT_S). Last error: connection refused")
    );
}

/// A sink that records, in order, snapshots' kinds and node outputs (as the v2 surface uses them).
#[derive(Default)]
struct NodeEventLog(Vec<String>);

impl comfy_worker::runner::ProgressSink for NodeEventLog {
    fn snapshot(&mut self, s: &comfy_worker::progress::ProgressSnapshot) {
        self.0.push(format!("{:?}", s.kind));
    }
    fn node_event(&mut self, e: &comfy_worker::progress::NodeEvent) {
        if let comfy_worker::progress::NodeEvent::Output(o) = e {
            self.0
                .push(format!("output {} {}", o.node_id, o.files.len()));
        }
    }
}

#[tokio::test]
async fn node_outputs_reach_the_sinks_as_each_node_finishes() {
    use comfy_worker::job::JobRequest;
    use comfy_worker::runner::{Controls, Runner};
    let sim = simulator(1).await;
    let runner = Runner::new(engine(&sim), std::time::Duration::ZERO);
    let request = JobRequest::new("j", Some(json!({"workflow": harness::workflow("ok")})));
    let mut log = NodeEventLog::default();
    let result = tokio::time::timeout(
        harness::LIMIT,
        runner.run(&request, Controls::default(), &mut [&mut log]),
    )
    .await
    .expect("job timed out");
    assert!(result.is_ok(), "{result:?}");
    let outputs: Vec<&String> = log.0.iter().filter(|l| l.starts_with("output")).collect();
    assert_eq!(outputs.len(), 2, "{:?}", log.0);
    assert!(outputs.iter().all(|o| o.ends_with(" 1")), "{outputs:?}");
    // Each output comes as its node finishes, before the prompt's end.
    let first_output = log.0.iter().position(|l| l.starts_with("output")).unwrap();
    let finished = log.0.iter().position(|l| l == "Finished").unwrap();
    assert!(first_output < finished, "{:?}", log.0);
}
