//! Comfy's own Python SDK (comfy-sdk, from PyPI) against `serve`'s Comfy API v2 surface, in
//! process over the simulator: `client.run()` of a 20-step workflow, `job.events()` with a
//! `Progress` for every step, outputs downloaded and decoded, an uploaded asset used as a
//! `LoadImage` input, `cancel()` of a running job (ComfyUI idle afterwards), a reused
//! idempotency key and a UI-format workflow refused with the SDK's own exceptions. Every
//! response and event-stream payload of that run is validated against the contract's models
//! (the SDK's generated ones, see tests/fixtures/v2/conformance.py). `scripts/test` installs
//! the SDK into `target/test-deps/venv`.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use comfy_worker::endpoint::ServeOptions;
use comfy_worker::secret::Secret;
use serde_json::Value;

use crate::harness::{self, LIMIT};

/// The test venv's Python (with comfy-sdk), as `scripts/test` makes it.
pub fn python_with_comfy_sdk() -> PathBuf {
    let path = std::env::var_os("COMFY_WORKER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/venv/bin/python")
        });
    assert!(
        path.exists(),
        "no Python with comfy-sdk at {}: run the suite with scripts/test, which installs it",
        path.display()
    );
    path
}

/// The fixtures of the v2 tests (the SDK flow, the conformance checks).
pub fn v2_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2")
}

/// test_input.json's workflow with 20 sampler steps.
pub fn twenty_steps() -> Value {
    let mut workflow = harness::test_input()["input"]["workflow"].clone();
    workflow["3"]["inputs"]["steps"] = 20.into();
    workflow
}

#[tokio::test]
async fn the_comfy_sdk_runs_cancels_and_uploads_against_serve_and_every_response_conforms() {
    let python = python_with_comfy_sdk();
    let sim = crate::worker_process::simulator(5).await;
    let ep = crate::serve::Endpoint::start(
        &sim,
        ServeOptions {
            api_key: Some(Secret::new("v2-key")),
            ..ServeOptions::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let workflow = dir.path().join("workflow.json");
    std::fs::write(&workflow, twenty_steps().to_string()).unwrap();
    let mut child = Command::new(python)
        .arg(v2_fixtures().join("sdk_flow.py"))
        .env("COMFY_BASE_URL", ep.base())
        .env("COMFY_API_KEY", "v2-key")
        .env("WORKFLOW", &workflow)
        .env("OUT_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let child = KillOnDrop(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr_text = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let flow = async {
        let mut last = String::new();
        while let Some(line) = lines.recv().await {
            match line.as_str() {
                "cancel-phase" => {
                    // The next job stops after its second step until the cancel reached ComfyUI:
                    // the SDK's cancel() meets a running job, whatever the machine's speed.
                    sim.pause_after_step(2);
                    stdin.write_all(b"go\n").unwrap();
                    stdin.flush().unwrap();
                    let sim = &sim;
                    tokio::time::timeout(LIMIT, async move {
                        sim.paused().await;
                        sim.interrupt_handled(1).await;
                        sim.resume();
                    })
                    .await
                    .expect("the cancel never reached ComfyUI");
                }
                "canceled" => {
                    // The SDK saw `canceled`: ComfyUI runs nothing any more.
                    assert_eq!(
                        sim.queue_remaining(),
                        0,
                        "ComfyUI still busy after the cancel"
                    );
                    stdin.write_all(b"checked\n").unwrap();
                    stdin.flush().unwrap();
                }
                _ => last = line,
            }
        }
        last
    };
    let last = tokio::time::timeout(LIMIT * 4, flow)
        .await
        .expect("the SDK flow timed out");
    let status = child.wait();
    ep.stop().await;
    let stderr = stderr_text.join().unwrap();
    assert!(status.success(), "the SDK flow failed:\n{stderr}\n{last}");
    let result: Value = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("no JSON result ({e}): {last}\n{stderr}"));

    // client.run(): succeeded; its output downloads whole (and by range) and decodes.
    assert_eq!(result["run"]["status"], "succeeded", "{result}");
    let outputs = result["run"]["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{result}");
    assert_eq!(outputs[0]["type"], "image");
    assert_eq!(outputs[0]["size_ok"], true);
    assert_eq!(outputs[0]["png"], serde_json::json!([1024, 1024]));
    assert_eq!(outputs[0]["head"], "89504e470d0a1a0a");

    // job.events(): a Progress for each of the 20 steps, the output, then the terminal status.
    let steps: Vec<u64> = result["events"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "{result}");
    let sequence: Vec<&str> = result["events"]["sequence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(sequence.last(), Some(&"status:succeeded"), "{sequence:?}");
    let output_at = sequence.iter().position(|e| *e == "output");
    assert!(
        output_at.is_some_and(|at| at < sequence.len() - 1),
        "the output comes before the terminal status: {sequence:?}"
    );

    // The uploaded asset reached ComfyUI's input folder and LoadImage read it.
    let asset = &result["asset"];
    assert_eq!(asset["status"], "succeeded", "{result}");
    assert_eq!(asset["created_new"], true);
    assert_eq!(
        asset["again_same"], true,
        "the same bytes and name: the same asset"
    );
    assert_eq!(asset["format"], "api");
    assert_eq!(asset["outputs"], serde_json::json!([[16, 8]]));
    let name = asset["input_name"].as_str().unwrap();
    let hex = asset["hash"]
        .as_str()
        .unwrap()
        .trim_start_matches("blake3:");
    assert!(
        name.starts_with(&hex[..16]) && name.ends_with("-input.png"),
        "{name}"
    );
    let uploaded = sim
        .input_file("", name)
        .expect("the asset in ComfyUI's input folder");
    assert!(uploaded.starts_with(b"\x89PNG"));

    // cancel(): canceling while ComfyUI interrupts, then canceled; a second cancel is a no-op.
    let cancel = &result["cancel"];
    assert!(
        matches!(cancel["answered"].as_str(), Some("canceling" | "canceled")),
        "{cancel}"
    );
    assert_eq!(cancel["final"], "canceled", "{cancel}");
    assert_eq!(cancel["again"], "canceled");
    assert_eq!(
        cancel["statuses"].as_array().unwrap().last(),
        Some(&Value::from("canceled"))
    );
    assert_eq!(sim.interrupts().len(), 1);

    assert_eq!(
        result["reuse"],
        serde_json::json!(["idempotency_key_reuse", 422])
    );
    assert_eq!(
        result["ui"],
        serde_json::json!([["workflow_format_ui", 422], ["workflow_format_ui", 422]])
    );

    // Every body and event of the run, against the contract's models.
    let conformance = &result["conformance"];
    assert_eq!(
        conformance["errors"],
        serde_json::json!([]),
        "{conformance:#}"
    );
    for kind in ["Job", "Asset", "JobWorkflowResponse", "ErrorEnvelope"] {
        assert!(
            conformance["checked"][kind].as_u64() > Some(0),
            "no {kind} checked: {conformance}"
        );
    }
    let streams = conformance["checked"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("sse("))
        .count();
    assert!(streams >= 1, "no event stream checked: {conformance}");
}

/// A child process killed (and reaped) when dropped, so a failed assertion leaves none behind.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn wait(mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
