//! UI-format workflows: the golden conversions (`tests/fixtures/ui_workflows/<name>.json`, a UI
//! export built by hand from the frontend's format, beside `<name>.api.json`, the API workflow
//! the frontend's `graphToPrompt` sends for it, or `<name>.error.txt`, the start of the error),
//! the round trip against the simulator's `/object_info`, converted workflows run as jobs
//! (engine and `run` CLI), and the `convert` command.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use comfy_worker::comfy::{
    ClientOptions, ComfyClient, ConvertOptions, ObjectInfo, UiWorkflow, Workflow,
};
use serde_json::{json, Map, Value};

use crate::harness::{self, error_text, images, png_size, run_job};
use crate::worker_process::simulator;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ui_workflows")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The recorded server's `/object_info` (what the simulator serves, less its additions).
fn recorded_object_info() -> ObjectInfo {
    ObjectInfo::from_value(read_json(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/comfy-sim/assets/object_info.json"),
    ))
}

fn ui(name: &str) -> Value {
    read_json(&dir().join(format!("{name}.json")))
}

fn parse(value: &Value) -> UiWorkflow {
    UiWorkflow::from_map(value.as_object().expect("object")).expect("a readable UI workflow")
}

/// The fixture names: every `<name>.json` that is not an expected output.
fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".json") && !f.ends_with(".api.json"))
        .map(|f| f.trim_end_matches(".json").to_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn golden_conversions_match_what_the_frontend_sends() {
    let info = recorded_object_info();
    let names = cases();
    let mut checked = (0, 0);
    for name in &names {
        let expected_api = dir().join(format!("{name}.api.json"));
        let expected_error = dir().join(format!("{name}.error.txt"));
        let result = parse(&ui(name)).convert_with(&info, &ConvertOptions { seed: Some(7) });
        match (expected_api.exists(), expected_error.exists()) {
            (true, false) => {
                let got = Value::Object(result.unwrap_or_else(|e| panic!("{name}: {e}")));
                let want = read_json(&expected_api);
                assert_eq!(
                    got,
                    want,
                    "{name}: got\n{}",
                    serde_json::to_string_pretty(&got).unwrap()
                );
                // And it is a workflow the engine accepts.
                Workflow::from_value(got).unwrap_or_else(|e| panic!("{name}: {e}"));
                checked.0 += 1;
            }
            (false, true) => {
                let want = std::fs::read_to_string(&expected_error).unwrap();
                let err = result.expect_err(name);
                assert!(err.node.is_some(), "{name}: the error names no node: {err}");
                assert!(
                    err.to_string().starts_with(want.trim()),
                    "{name}: got {err:?}, want it to start with {want:?}"
                );
                checked.1 += 1;
            }
            _ => panic!("{name}: needs exactly one of {name}.api.json and {name}.error.txt"),
        }
    }
    // The brief's cases are all there: plain txt2img, seed control, primitive, reroutes,
    // bypass, mute, LoadImage upload, notes; unknown class, widget count, subgraph.
    for needed in [
        "txt2img",
        "seed_control",
        "primitive",
        "reroute",
        "bypass",
        "muted",
        "load_image",
        "note",
        "unknown_class",
        "widget_count",
        "subgraph",
    ] {
        assert!(
            names.iter().any(|n| n == needed),
            "missing fixture {needed}"
        );
    }
    assert!(checked.0 >= 9 && checked.1 >= 4, "{checked:?}");
}

/// `converted` without the optional inputs `reference` leaves out that hold their declared
/// default (the recorded `ok.json` was written by hand and omits SlowSteps' optional
/// `send_preview`, which the frontend always sends); anything else left over is a mismatch.
fn without_omitted_defaults(
    converted: &Map<String, Value>,
    reference: &Value,
    info: &Value,
) -> Value {
    let mut out = converted.clone();
    for (id, node) in out.iter_mut() {
        let class = node["class_type"].as_str().unwrap().to_owned();
        let inputs = node["inputs"].as_object_mut().unwrap();
        inputs.retain(|name, value| {
            if reference[id]["inputs"].get(name).is_some() {
                return true;
            }
            let spec = &info[&class]["input"]["optional"][name];
            let omitted_default = spec.is_array() && spec[1]["default"] == *value;
            assert!(
                omitted_default,
                "node {id}: input {name} = {value} is not in the reference and not an optional default"
            );
            false
        });
    }
    Value::Object(out)
}

fn without_meta(mut workflow: Value) -> Value {
    for node in workflow.as_object_mut().unwrap().values_mut() {
        node.as_object_mut().unwrap().remove("_meta");
    }
    workflow
}

#[tokio::test]
async fn the_ui_version_of_ok_json_round_trips_through_the_simulators_object_info() {
    let sim = simulator(1).await;
    let client = ComfyClient::new(&sim.host().parse().unwrap(), ClientOptions::default()).unwrap();
    let info = client.object_info().await.unwrap();
    let raw_info: Value = reqwest::get(format!("http://{}/object_info", sim.host()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let converted = parse(&ui("txt2img")).convert(&info).unwrap();
    let reference = harness::workflow("ok");
    assert_eq!(
        without_meta(without_omitted_defaults(&converted, &reference, &raw_info)),
        without_meta(reference.clone())
    );
    // The titles survive too.
    for (id, node) in converted {
        assert_eq!(node["_meta"], reference[&id]["_meta"], "node {id}");
    }
}

#[tokio::test]
async fn a_ui_format_job_runs_in_the_simulator_and_object_info_is_fetched_once() {
    let sim = simulator(1).await;
    let engine = harness::engine(&sim.host());
    let (output, progress) = run_job(&engine, json!({"workflow": ui("txt2img")})).await;
    let imgs = images(&output);
    assert_eq!(imgs.len(), 2, "{}", output.to_json());
    let mut sizes: Vec<(u32, u32)> = imgs.iter().map(|(_, data)| png_size(data)).collect();
    sizes.sort();
    assert_eq!(sizes, [(256, 256), (512, 512)]);
    assert!(
        progress.iter().any(|s| s.node.as_deref() == Some("2")),
        "progress names the converted nodes"
    );
    // What was queued is the converted workflow.
    let queued = &sim.prompts()[0]["prompt"];
    let expected = read_json(&dir().join("txt2img.api.json"));
    assert_eq!(*queued, expected);
    assert_eq!(sim.object_info_requests(), 1);

    // A second UI job uses the kept /object_info.
    let (output, _) = run_job(&engine, json!({"workflow": ui("note")})).await;
    assert_eq!(images(&output).len(), 1, "{}", output.to_json());
    assert_eq!(sim.object_info_requests(), 1);
    // API-format jobs never ask for it.
    let (output, _) = run_job(
        &harness::engine(&sim.host()),
        json!({"workflow": harness::workflow("ok")}),
    )
    .await;
    assert_eq!(images(&output).len(), 2);
    assert_eq!(sim.object_info_requests(), 1);
}

#[tokio::test]
async fn an_unconvertible_ui_job_fails_naming_the_node_and_queues_nothing() {
    let sim = simulator(1).await;
    let engine = harness::engine(&sim.host());
    let (output, _) = run_job(&engine, json!({"workflow": ui("unknown_class")})).await;
    let err = error_text(&output);
    assert_eq!(
        err,
        "Cannot convert the UI-format workflow to API format: Node 2 (FancyUpscaler \"My upscaler\"): unknown node class 'FancyUpscaler': this ComfyUI does not have it (is its custom node installed?)"
    );
    // The copy was fresh: no second fetch.
    assert_eq!(sim.object_info_requests(), 1);
    let (output, _) = run_job(&engine, json!({"workflow": ui("unknown_class")})).await;
    error_text(&output);
    assert_eq!(sim.object_info_requests(), 2, "kept copy, then one refresh");
    let (output, _) = run_job(&engine, json!({"workflow": ui("widget_count")})).await;
    assert!(
        error_text(&output).contains("Node 3 (KSampler \"My sampler\"): has 6 widget values"),
        "{}",
        output.to_json()
    );
    assert!(sim.prompts().is_empty(), "nothing was queued");
    assert!(sim.uploads().is_empty(), "nothing was uploaded");
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_comfy-worker")
}

fn convert_cmd(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("convert")
        .args(args)
        .env_remove("COMFY_HOST")
        .env("RUST_LOG", "comfy_worker=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match stdin {
        Some(bytes) => {
            cmd.stdin(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn comfy-worker");
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes).unwrap();
            child.wait_with_output().unwrap()
        }
        None => cmd.stdin(Stdio::null()).output().expect("run comfy-worker"),
    }
}

fn stdout_value(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn convert_prints_the_api_json_from_a_file_or_stdin() {
    let object_info =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/comfy-sim/assets/object_info.json");
    let object_info = object_info.to_str().unwrap();
    let file = dir().join("seed_control.json");
    let out = convert_cmd(
        &[file.to_str().unwrap(), "--object-info", object_info],
        None,
    );
    assert_eq!(
        stdout_value(&out),
        read_json(&dir().join("seed_control.api.json"))
    );
    let bytes = std::fs::read(dir().join("load_image.json")).unwrap();
    let out = convert_cmd(&["-", "--object-info", object_info], Some(&bytes));
    assert_eq!(
        stdout_value(&out),
        read_json(&dir().join("load_image.api.json"))
    );
    // An unconvertible workflow: exit 1, the node named on stderr, nothing on stdout.
    let file = dir().join("subgraph.json");
    let out = convert_cmd(
        &[file.to_str().unwrap(), "--object-info", object_info],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "Node 12 (a3f1c2d4-7b8e-4f60-9c1d-2e3f4a5b6c7d \"Invert twice\"): is a subgraph"
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn convert_asks_a_running_comfyui_for_its_object_info() {
    let sim = simulator(1).await;
    let host = sim.host();
    let file = dir().join("txt2img.json");
    let out = tokio::task::spawn_blocking(move || {
        convert_cmd(&[file.to_str().unwrap(), "--comfy", &host], None)
    })
    .await
    .unwrap();
    assert_eq!(
        stdout_value(&out),
        read_json(&dir().join("txt2img.api.json"))
    );
    assert_eq!(sim.object_info_requests(), 1);
    // No ComfyUI there: a clear error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap().to_string();
    drop(listener);
    let file = dir().join("txt2img.json");
    let out = tokio::task::spawn_blocking(move || {
        convert_cmd(&[file.to_str().unwrap(), "--comfy", &dead], None)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot get /object_info"), "{stderr}");
}

#[test]
fn run_simulate_takes_a_ui_format_test_input() {
    let job_dir = tempfile::tempdir().unwrap();
    let input = json!({"input": {"workflow": ui("txt2img")}});
    std::fs::write(
        job_dir.path().join("ui_input.json"),
        serde_json::to_vec(&input).unwrap(),
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "run",
            "ui_input.json",
            "--simulate",
            "--quiet",
            "--sim-step-ms",
            "1",
        ])
        .current_dir(job_dir.path())
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("COMFY_HOST")
        .env_remove("BUCKET_ENDPOINT_URL")
        .env_remove("OUTPUT_UPLOAD")
        .env_remove("MAX_INLINE_OUTPUT_BYTES")
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output: Value = serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap();
    let images = output["images"].as_array().expect("images");
    let mut names: Vec<&str> = images
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{output}");
    assert!(
        names[0].starts_with("anchors_ok_full") && names[1].starts_with("anchors_ok_small"),
        "{names:?}"
    );
}

/// A seeded xorshift, for the mutation test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Replaces one value somewhere in `v` (picked by walking down at random) with an odd one.
fn mutate(v: &mut Value, rng: &mut Rng) {
    let odd = [
        Value::Null,
        json!(-1),
        json!(1.5),
        json!(""),
        json!("*"),
        json!([]),
        json!({}),
        json!([1, 2]),
        json!(u64::MAX),
        json!(true),
    ];
    let stop = rng.below(4) == 0;
    match v {
        Value::Array(list) if !list.is_empty() && !stop => {
            let i = rng.below(list.len());
            if rng.below(8) == 0 {
                list.remove(i);
            } else {
                mutate(&mut list[i], rng);
            }
        }
        Value::Object(map) if !map.is_empty() && !stop => {
            let i = rng.below(map.len());
            let key = map.keys().nth(i).unwrap().clone();
            if rng.below(8) == 0 {
                map.remove(&key);
            } else {
                mutate(map.get_mut(&key).unwrap(), rng);
            }
        }
        _ => *v = odd[rng.below(odd.len())].clone(),
    }
}

#[test]
fn mutated_exports_never_panic_and_errors_stay_readable() {
    let info = recorded_object_info();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut converted, mut refused) = (0, 0);
    for name in cases() {
        let original = ui(&name);
        for _ in 0..300 {
            let mut graph = original.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut graph, &mut rng);
            }
            let Some(map) = graph.as_object() else {
                continue;
            };
            let result = UiWorkflow::from_map(map)
                .and_then(|ui| ui.convert_with(&info, &ConvertOptions { seed: Some(1) }));
            match result {
                Ok(api) => {
                    converted += 1;
                    // Whatever converts is a workflow the engine takes.
                    if !api.is_empty() {
                        Workflow::from_value(Value::Object(api)).unwrap();
                    }
                }
                Err(e) => {
                    refused += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
    assert!(converted > 100 && refused > 100, "{converted} {refused}");
}
