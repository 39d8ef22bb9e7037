//! The real `comfy-worker` binary: `run` with the built-in simulator, progress lines, exit codes.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::png_size;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_comfy-worker")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary directory holding a copy of the repository's test_input.json.
pub fn job_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("test_input.json"),
        dir.path().join("test_input.json"),
    )
    .unwrap();
    dir
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    crate::harness::clear_worker_env(&mut Command::new(bin()))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .expect("run comfy-worker")
}

fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
}

#[test]
fn run_simulate_prints_step_lines_and_png_outputs() {
    let out = run_in(
        repo(),
        &[
            "run",
            "test_input.json",
            "--simulate",
            "--json-progress",
            "--sim-step-ms",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {stderr}",
        out.status
    );
    let output = stdout_json(&out);
    let images = output["images"].as_array().expect("images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["type"], "base64");
    assert_eq!(png_size(images[0]["data"].as_str().unwrap()), (1024, 1024));

    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let steps: Vec<&Value> = lines.iter().filter(|l| l["type"] == "progress").collect();
    let numbers: Vec<u64> = steps.iter().map(|l| l["value"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=25).collect::<Vec<_>>());
    for l in &steps {
        // One vocabulary with /status: `step` is the label, `value`/`max` the numbers; the
        // line's older names stay as aliases.
        assert_eq!(l["step"], "Sampling");
        assert_eq!(l["max"], 25);
        assert_eq!(l["max_steps"], 25);
        assert_eq!(l["node"], "3");
        assert_eq!(l["node_type"], "KSampler");
        assert_eq!(l["stage"], "Sampling");
        assert!(l["percent"].is_number() && l.get("eta_seconds").is_some());
    }
    assert_eq!(lines.last().unwrap()["type"], "finished");
    assert_eq!(lines.last().unwrap()["overall_percent"], 100.0);
}

#[test]
fn default_mode_runs_test_input_json_in_the_current_directory() {
    let dir = job_dir();
    let out_dir = dir.path().join("out");
    let out = run_in(
        dir.path(),
        &[
            "--simulate",
            "--quiet",
            "--sim-step-ms",
            "1",
            "--output-dir",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "--quiet printed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output = stdout_json(&out);
    let name = output["images"][0]["filename"].as_str().unwrap();
    let written = std::fs::read(out_dir.join(name)).expect("decoded file written");
    assert!(written.starts_with(&[0x89, b'P', b'N', b'G']));
}

#[test]
fn an_error_output_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            "run",
            "--simulate",
            "-q",
            "--test_input",
            r#"{"input": {}}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout_json(&out),
        serde_json::json!({"error": "Missing 'workflow' parameter"})
    );

    // No job at all is unreadable input: 2, as for usage errors.
    let out = run_in(dir.path(), &["run", "-q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout_json(&out)["error"]
        .as_str()
        .unwrap()
        .contains("test_input.json not found"));
}

/// `run` prints to stdout, which has no result limit: the inline limit (the platform's) applies
/// only when MAX_INLINE_OUTPUT_BYTES is set (that it is off otherwise is a unit test of
/// `settings_for_run`).
#[test]
fn run_applies_the_inline_limit_only_when_set() {
    let out = crate::harness::clear_worker_env(&mut Command::new(bin()))
        .args([
            "run",
            "test_input.json",
            "--simulate",
            "-q",
            "--sim-step-ms",
            "1",
        ])
        .current_dir(repo())
        .env("MAX_INLINE_OUTPUT_BYTES", "1000")
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .expect("run comfy-worker");
    assert_eq!(out.status.code(), Some(1));
    let error = stdout_json(&out)["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("The job output is ")
            && error.contains("MAX_INLINE_OUTPUT_BYTES")
            && error.contains("(or send s3Config)"),
        "{error}"
    );
}
