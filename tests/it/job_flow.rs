//! The real engine against the in-process ComfyUI simulator: the whole job flow, uploads,
//! caching, validation, runtime errors, cancel, and a socket killed or silenced mid-run. Every
//! test runs against both simulator profiles, ComfyUI 0.3.64 and today's (`current`): `cargo
//! test job_flow::<test>::current`.

use comfy_sim::{Profile, Simulator};
use comfy_worker::comfy::PromptEvent;
use comfy_worker::job::{Engine, JobOutput};
use comfy_worker::progress::ProgressKind;
use serde_json::{json, Value};

use crate::harness::{self, error_text, images, png_size, run_job, spawn_job, steps_of};
use crate::worker_process::{simulator, simulator_as};

/// Each test as `<name>::v0_3_64` and `<name>::current`.
macro_rules! on_both_profiles {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn v0_3_64() {
                    super::$name(comfy_sim::Profile::V0_3_64).await
                }
                #[tokio::test]
                async fn current() {
                    super::$name(comfy_sim::Profile::Current).await
                }
            }
        )*
    };
}

on_both_profiles!(
    test_input_runs_end_to_end_with_every_step,
    two_outputs_sized_from_the_graph_then_a_cached_rerun,
    outputs_in_dated_subfolders_are_fetched_where_comfyui_put_them,
    validation_errors_are_readable_and_hint_models,
    runtime_errors_name_node_type_and_message,
    the_api_key_goes_to_comfyui_as_extra_data,
    a_killed_websocket_mid_run_still_returns_every_output,
    a_silent_websocket_is_caught_by_the_history_fallback,
    capabilities_are_detected,
    cancel_interrupts_the_running_prompt,
    history_written_late_still_returns_every_output,
    a_missing_model_is_refused_before_queueing,
    cancel_of_a_queued_prompt_takes_it_off_the_queue,
    subgraph_nodes_are_reported_by_their_display_ids,
    model_loading_is_a_progress_phase,
    text_and_preview_frames_are_events,
    live_previews_come_with_the_progress,
    bad_inputs_get_clear_errors_and_never_reach_comfyui,
);

/// How many jobs-API cancels named `prompt_id` (the capability probe names a nil id).
fn cancels_of(sim: &Simulator, prompt_id: &str) -> usize {
    sim.job_cancels()
        .iter()
        .filter(|id| *id == prompt_id)
        .count()
}

fn engine(sim: &Simulator) -> Engine {
    harness::engine(&sim.host())
}

/// A 32×32 PNG as a data URL.
const TEST_PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAKklEQVR42mM4YaNBU8QwasGoBaMWjFowasGoBaMWjFowasGoBaMWDBULADahsD1yPRQZAAAAAElFTkSuQmCC";

async fn test_input_runs_end_to_end_with_every_step(profile: Profile) {
    let sim = simulator_as(1, profile).await;
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

async fn two_outputs_sized_from_the_graph_then_a_cached_rerun(profile: Profile) {
    let sim = simulator_as(1, profile).await;
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

/// Outputs in nested subfolders, as `--date-based-output` (ComfyUI PR #16000) would put them
/// (`2026-12-04/portraits`), are fetched by the `subfolder` ComfyUI reports: a wrong one would
/// be a 404 from `/view` and a failed job.
async fn outputs_in_dated_subfolders_are_fetched_where_comfyui_put_them(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let mut wf = harness::workflow("ok");
    wf["3"]["inputs"]["filename_prefix"] = json!("2026-12-04/portraits/full");
    wf["5"]["inputs"]["filename_prefix"] = json!("2026-12-04/small");
    let (out, _) = run_job(&engine(&sim), json!({ "workflow": wf })).await;
    let sizes: Vec<(u32, u32)> = images(&out).iter().map(|(_, d)| png_size(d)).collect();
    assert_eq!(sizes, [(512, 512), (256, 256)]);
    assert!(sim
        .output_file("2026-12-04/portraits", "full_00001_.png")
        .is_some());
}

async fn validation_errors_are_readable_and_hint_models(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let engine = engine(&sim);
    let (out, _) = run_job(&engine, json!({"workflow": harness::workflow("bad_node")})).await;
    let err = error_text(&out);
    assert!(
        err.contains("Node 1 (EmptyImage): Value 0 smaller than min of 1"),
        "{err}"
    );
    assert!(err.contains("Node 2 (SlowSteps)"), "{err}");
    let (out, _) = run_job(&engine, json!({"workflow": harness::workflow("bad_class")})).await;
    let err = error_text(&out);
    assert!(err.contains("NoSuchNodeClass"), "{err}");
    if profile == Profile::Current {
        assert!(
            err.contains("not found. The custom node may not be installed."),
            "{err}"
        );
    }

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

async fn runtime_errors_name_node_type_and_message(profile: Profile) {
    let sim = simulator_as(1, profile).await;
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

async fn the_api_key_goes_to_comfyui_as_extra_data(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let input = json!({"workflow": harness::workflow("ok"), "comfy_org_api_key": "key-abc"});
    run_job(&engine(&sim), input).await;
    assert_eq!(
        sim.prompts()[0]["extra_data"]["api_key_comfy_org"],
        json!("key-abc")
    );
}

async fn a_killed_websocket_mid_run_still_returns_every_output(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    sim.pause_after_step(3);
    let job = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    let before = sim.ws_client_ids().len();
    sim.drop_websockets();
    sim.resume();
    let metrics = job.metrics.clone();
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
    // Each reconnect is a retry in the metrics.
    let m = harness::Scraped::parse(&metrics.encode());
    assert_eq!(
        m.count("comfy_worker_retries_total", &[("reason", "websocket")]),
        (ids.len() - before) as f64
    );
}

async fn a_silent_websocket_is_caught_by_the_history_fallback(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    sim.pause_after_step(2);
    let job = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    sim.set_websockets_silent(true);
    sim.resume();
    let (output, _) = job.finish().await;
    assert_eq!(images(&output).len(), 2, "{}", output.to_json());
    // Today's ComfyUI is asked through its jobs API first; 0.3.64 has none.
    match profile {
        Profile::Current => assert!(sim.job_lookups() > 0),
        Profile::V0_3_64 => assert_eq!(sim.job_lookups(), 0),
    }
}

/// What each ComfyUI can do is detected from its answers.
async fn capabilities_are_detected(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let caps = engine(&sim).comfy().capabilities().await;
    match profile {
        Profile::V0_3_64 => {
            assert_eq!(
                caps.version,
                Some(comfy_worker::comfy::ComfyVersion(0, 3, 64))
            );
            assert!(!caps.jobs_api && !caps.jobs_cancel && !caps.features.assets);
        }
        Profile::Current => {
            assert_eq!(
                caps.version,
                Some(comfy_worker::comfy::ComfyVersion(0, 38, 1))
            );
            assert!(caps.jobs_api && caps.jobs_cancel && caps.features.assets);
        }
    }
    assert!(caps.features.supports_preview_metadata);
}

async fn cancel_interrupts_the_running_prompt(profile: Profile) {
    let sim = simulator_as(1, profile).await;
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
    match profile {
        // 0.3.64: `/interrupt {"prompt_id"}` (and a queue delete).
        Profile::V0_3_64 => {
            assert_eq!(
                sim.interrupts()[0].as_ref().unwrap()["prompt_id"],
                prompt_id
            );
            assert!(sim.job_cancels().is_empty());
        }
        // Today: one atomic `POST /api/jobs/{id}/cancel`, no `/interrupt`.
        Profile::Current => {
            assert_eq!(cancels_of(&sim, prompt_id.as_str().unwrap()), 1);
            assert!(sim.interrupts().is_empty(), "{:?}", sim.interrupts());
        }
    }
}

/// A workflow naming a model ComfyUI does not have is refused before anything is queued, naming
/// the node, the input and the closest names ComfyUI lists.
async fn a_missing_model_is_refused_before_queueing(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let mut job = harness::test_input()["input"].clone();
    job["workflow"]["4"]["inputs"]["ckpt_name"] = json!("sd_xl_base_1.1.safetensors");
    let (out, progress) = run_job(&engine(&sim), job).await;
    let err = error_text(&out);
    assert!(
        err.contains("Node 4 (CheckpointLoaderSimple): model not found: ckpt_name: 'sd_xl_base_1.1.safetensors' is not among ComfyUI's models (closest: sd_xl_base_1.0.safetensors, flux1-dev-fp8.safetensors)"),
        "{err}"
    );
    assert!(sim.prompts().is_empty(), "nothing was queued");
    assert!(progress.iter().all(|s| s.prompt_id.is_none()));
}

/// The prompt's end is seen (`execution_success`) but its history is not written yet when the
/// socket dies: an empty `/history` there is not "no outputs"; the job waits for the write.
async fn history_written_late_still_returns_every_output(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    sim.hold_history();
    let job = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.history_held())
        .await
        .unwrap();
    sim.drop_websockets();
    sim.release_history();
    let (output, progress) = job.finish().await;
    let sizes: Vec<(u32, u32)> = images(&output).iter().map(|(_, d)| png_size(d)).collect();
    assert_eq!(sizes, [(512, 512), (256, 256)], "{}", output.to_json());
    assert_eq!(
        progress.last().map(|s| s.kind),
        Some(ProgressKind::Finished)
    );
}

/// A pending prompt (another one runs) is cancelled: it leaves the queue and never runs.
async fn cancel_of_a_queued_prompt_takes_it_off_the_queue(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    sim.pause_after_step(1);
    let first = spawn_job(&engine(&sim), json!({"workflow": harness::workflow("ok")}));
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["color"] = json!(5);
    let mut second = spawn_job(&engine(&sim), json!({ "workflow": wf }));
    second
        .until(|s| s.kind == ProgressKind::Queued && s.queue_position == Some(1))
        .await;
    second.cancel.cancel();
    let (output, _) = second.finish().await;
    assert!(
        error_text(&output).starts_with("Job cancelled"),
        "{}",
        output.to_json()
    );
    assert_eq!(sim.queue_remaining(), 1, "only the running prompt is left");
    sim.resume();
    let (output, _) = first.finish().await;
    assert_eq!(images(&output).len(), 2);
    if profile == Profile::Current {
        let second_id = sim.prompts()[1]["prompt_id"].as_str().unwrap().to_owned();
        assert_eq!(cancels_of(&sim, &second_id), 1);
    }
}

/// A workflow whose nodes come from a subgraph (the front end flattens them to `12:3`-style
/// ids) is reported under those ids, with the titles the user gave them.
async fn subgraph_nodes_are_reported_by_their_display_ids(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let mut wf = harness::workflow("ok");
    let sampler = wf["2"].take();
    let wf_map = wf.as_object_mut().unwrap();
    wf_map.remove("2");
    wf_map.insert("10:2".into(), sampler);
    wf["10:2"]["_meta"]["title"] = json!("Refine (inside Upscale group)");
    wf["3"]["inputs"]["images"] = json!(["10:2", 0]);
    wf["4"]["inputs"]["image"] = json!(["10:2", 0]);
    let (output, progress) = run_job(&engine(&sim), json!({ "workflow": wf })).await;
    assert_eq!(images(&output).len(), 2, "{}", output.to_json());
    assert_eq!(steps_of(&progress, "10:2"), (1..=10).collect::<Vec<_>>());
    let step = progress
        .iter()
        .find(|s| s.kind == ProgressKind::Progress)
        .unwrap();
    assert_eq!(step.title.as_deref(), Some("Refine (inside Upscale group)"));
    assert_eq!(step.step.as_deref(), Some("Sampling"));
    let top = progress
        .iter()
        .find(|s| s.node.as_deref() == Some("1"))
        .unwrap();
    assert_eq!(top.title, None, "top-level nodes carry no title");
}

/// Today's ComfyUI says when a node loads its models: a `loading` snapshot, `Loading models`,
/// before the node's first step. 0.3.64 does not say it.
async fn model_loading_is_a_progress_phase(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let (_, progress) = run_job(&engine(&sim), json!({"workflow": harness::workflow("ok")})).await;
    let loading: Vec<_> = progress
        .iter()
        .filter(|s| s.kind == ProgressKind::Loading)
        .collect();
    match profile {
        Profile::V0_3_64 => assert!(loading.is_empty(), "{loading:?}"),
        Profile::Current => {
            assert_eq!(loading.len(), 1, "{loading:?}");
            assert_eq!(loading[0].step.as_deref(), Some("Loading models"));
            assert_eq!(loading[0].node.as_deref(), Some("2"));
            let at = progress
                .iter()
                .position(|s| s.kind == ProgressKind::Loading);
            let first_step = progress
                .iter()
                .position(|s| s.kind == ProgressKind::Progress);
            assert!(at < first_step, "loading comes before the first step");
        }
    }
}

/// A job that asks for previews (`input.previews: true`) asks ComfyUI for them per prompt
/// (`extra_data.preview_method`, which today's ComfyUI honours); without asking, it does not.
/// How previews reach the front ends is tested in `previews.rs`.
async fn live_previews_come_with_the_progress(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let mut wf = harness::workflow("preview");
    let (output, _) = run_job(
        &engine(&sim),
        json!({"workflow": wf.clone(), "previews": true}),
    )
    .await;
    assert!(
        matches!(output, JobOutput::Completed(_)),
        "{}",
        output.to_json()
    );
    assert_eq!(
        sim.prompts()[0]["extra_data"]["preview_method"],
        json!("auto")
    );
    wf["1"]["inputs"]["color"] = json!(1);
    run_job(&engine(&sim), json!({ "workflow": wf })).await;
    assert!(sim.prompts()[1]["extra_data"]
        .get("preview_method")
        .is_none());
}

/// Text a node sends (binary event 3) and previews with their metadata header (event 4) reach
/// the prompt's events, attributed to their node.
async fn text_and_preview_frames_are_events(profile: Profile) {
    let sim = simulator_as(1, profile).await;
    let wf = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 255}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": 2, "seconds_per_step": 0.1, "send_preview": true}},
        "3": {"class_type": "GetImageSize", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    });
    let workflow = comfy_worker::comfy::Workflow::from_value(wf).unwrap();
    let mut texts = Vec::new();
    let mut previews = Vec::new();
    let result = engine(&sim)
        .comfy()
        .run_prompt(
            &workflow,
            None,
            &comfy_worker::comfy::WatchOptions::default(),
            &tokio_util::sync::CancellationToken::new(),
            &mut |e| match e {
                PromptEvent::Text { node, text } => texts.push((node, text)),
                PromptEvent::Preview { node, mime, .. } => previews.push((node, mime)),
                _ => {}
            },
        )
        .await
        .unwrap();
    assert_eq!(result.outcome, comfy_worker::comfy::Outcome::Success);
    assert_eq!(
        texts,
        [(
            "3".to_owned(),
            "width: 64, height: 48\n batch size: 1".to_owned()
        )]
    );
    assert_eq!(
        previews,
        [
            (Some("2".to_owned()), "image/jpeg"),
            (Some("2".to_owned()), "image/jpeg")
        ]
    );
}

async fn bad_inputs_get_clear_errors_and_never_reach_comfyui(profile: Profile) {
    let sim = simulator_as(1, profile).await;
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
