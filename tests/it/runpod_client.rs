//! The official RunPod Python client (`runpod.Endpoint`, from PyPI) against `serve`, pointed at
//! it through `RUNPOD_ENDPOINT_BASE_URL`: a client written for the cloud works unchanged.
//! `scripts/test` installs the SDK into `target/test-deps/venv`.

use std::path::PathBuf;
use std::process::Command;

use comfy_worker::endpoint::ServeOptions;
use comfy_worker::secret::Secret;
use serde_json::{json, Value};

use crate::harness::{self, png_size, LIMIT};

fn python() -> PathBuf {
    let path = std::env::var_os("COMFY_WORKER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-deps/venv/bin/python")
        });
    assert!(
        path.exists(),
        "no Python with the RunPod SDK at {}: run the suite with scripts/test, which installs it",
        path.display()
    );
    path
}

const CLIENT: &str = r#"
import json, os, sys
import runpod

runpod.api_key = os.environ["KEY"]
workflow = json.loads(os.environ["WORKFLOW"])
endpoint = runpod.Endpoint("local-endpoint")

job = endpoint.run({"workflow": workflow})          # /run, wrapped into {"input": ...} by the SDK
output = job.output(timeout=60)                     # polls /status until final
status = job.status()

workflow["1"]["inputs"]["color"] = 255
sync = endpoint.run_sync({"input": {"workflow": workflow}}, timeout=60)   # /runsync

health = endpoint.health()
print(json.dumps({"status": status, "output": output, "sync": sync, "health": health}))
"#;

#[tokio::test]
async fn the_official_runpod_client_runs_jobs_against_serve() {
    let python = python();
    let sim = crate::worker_process::simulator(5).await;
    let ep = crate::serve::Endpoint::start(
        &sim,
        ServeOptions {
            api_key: Some(Secret::new("local-key")),
            ..ServeOptions::default()
        },
    )
    .await;
    let workflow = harness::workflow("ok").to_string();
    let base = format!("{}/v2", ep.base());
    let run = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(CLIENT)
            .env("RUNPOD_ENDPOINT_BASE_URL", base)
            .env("KEY", "local-key")
            .env("WORKFLOW", workflow)
            .output()
            .expect("run python")
    });
    let out = tokio::time::timeout(LIMIT * 4, run)
        .await
        .expect("client timed out")
        .unwrap();
    ep.stop().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {stdout}"));
    assert_eq!(result["status"], "COMPLETED", "{result}");
    for key in ["output", "sync"] {
        let images = result[key]["images"]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {result}"));
        assert_eq!(images.len(), 2, "{key}");
        for image in images {
            png_size(image["data"].as_str().unwrap());
        }
    }
    assert_eq!(
        result["health"]["jobs"]["completed"],
        json!(2),
        "{}",
        result["health"]
    );
}
