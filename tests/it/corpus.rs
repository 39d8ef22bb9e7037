//! The bad-input corpus (`tests/fixtures/bad_inputs/`): every malformed job goes through the
//! real binary in serverless mode (fake platform, simulator), gets its expected error (or, for
//! the cases worker-comfyui accepts, a normal result), and the worker keeps serving.
//!
//! A case file is `{"description", "job": <the job-take body>, "expected_error": <substring of
//! the error and its details, or null for a success>}`. Cases too large or not representable as
//! JSON text have `"generate": {"kind", ...}` instead of `job`, and are built here; their job id
//! is the file name without `.json`. `CORPUS_SHOW=1` prints every answer.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::faults::instant_input;
use crate::worker_process::{final_of, simulator, WorkerProcess};

pub(crate) struct Case {
    pub(crate) file: String,
    pub(crate) id: String,
    // Read by the wire goldens, which need the `lambda` feature.
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    pub(crate) description: String,
    pub(crate) expected_error: Option<String>,
    pub(crate) body: Body,
}

pub(crate) enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad_inputs")
}

/// Every case of the corpus, in file name order (also the wire golden test's bad inputs).
pub(crate) fn load_cases() -> Vec<Case> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/fixtures/bad_inputs")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let expected_error = match &doc["expected_error"] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => panic!("{file}: expected_error is {other}"),
            };
            let description = doc["description"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no description"))
                .to_owned();
            let (id, body) = match (doc.get("job"), doc.get("generate")) {
                (Some(job), None) => {
                    let id = job["id"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{file}: the job needs a string id"))
                        .to_owned();
                    (id, Body::Json(job.clone()))
                }
                (None, Some(spec)) => {
                    let id = file.trim_end_matches(".json").to_owned();
                    let body = generate(&id, spec);
                    (id, Body::Bytes(body))
                }
                _ => panic!("{file}: needs either `job` or `generate`"),
            };
            Case {
                file,
                id,
                description,
                expected_error,
                body,
            }
        })
        .collect()
}

/// A job body with `"input": <input_json>`, where `input_json` is raw JSON text.
fn job_bytes(id: &str, input_json: &str) -> Vec<u8> {
    format!(r#"{{"id": {}, "input": {input_json}}}"#, json!(id)).into_bytes()
}

/// The instant workflow as JSON text.
fn workflow_text() -> String {
    instant_input(255)["workflow"].to_string()
}

/// A 1 × 1 PNG in base64.
const PNG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

/// Builds a generated case's job body from its descriptor.
fn generate(id: &str, spec: &Value) -> Vec<u8> {
    let depth = spec["depth"].as_u64().unwrap_or(0) as usize;
    let bytes = spec["bytes"].as_u64().unwrap_or(0) as usize;
    let wf = workflow_text();
    let image_item = |image: &str| format!(r#"[{{"name": "in.png", "image": "{image}"}}]"#);
    match spec["kind"].as_str().unwrap_or_default() {
        "deep_array" => job_bytes(
            id,
            &format!(
                r#"{{"workflow": {wf}, "extra": {}1{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            ),
        ),
        "deep_object" => job_bytes(
            id,
            &format!(
                r#"{{"workflow": {wf}, "extra": {}1{}}}"#,
                r#"{"a": "#.repeat(depth),
                "}".repeat(depth)
            ),
        ),
        "deep_string_input" => job_bytes(
            id,
            &format!("\"{}1{}\"", "[".repeat(depth), "]".repeat(depth)),
        ),
        "deep_node_input" => {
            let mut workflow = instant_input(255)["workflow"].clone();
            workflow["1"]["inputs"]["width"] = json!("DEEP");
            let text = workflow.to_string().replace(
                "\"DEEP\"",
                &format!("{}8{}", "[".repeat(depth), "]".repeat(depth)),
            );
            job_bytes(id, &format!(r#"{{"workflow": {text}}}"#))
        }
        "huge_name" => {
            let input = json!({
                "workflow": instant_input(255)["workflow"],
                "images": [{"name": format!("{}.png", "a".repeat(bytes)), "image": PNG}],
            });
            job_bytes(id, &input.to_string())
        }
        "huge_bad_base64" => {
            let input = json!({
                "workflow": instant_input(255)["workflow"],
                "images": [{"name": "in.png", "image": "!".repeat(bytes)}],
            });
            job_bytes(id, &input.to_string())
        }
        "invalid_utf8_image" => {
            let mut body = format!(
                r#"{{"id": {}, "input": {{"workflow": {wf}, "images": [{{"name": "in.png", "image": "{}"#,
                json!(id),
                &PNG[..8]
            )
            .into_bytes();
            body.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
            body.extend_from_slice(format!(r#"{}"}}]}}}}"#, &PNG[8..]).as_bytes());
            body
        }
        "lone_surrogate_image" => job_bytes(
            id,
            &format!(
                r#"{{"workflow": {wf}, "images": {}}}"#,
                image_item(&format!(r"{}\udc80{}", &PNG[..8], &PNG[8..]))
            ),
        ),
        other => panic!("unknown generated case kind {other:?}"),
    }
}

/// The error of a job-done body with its details, one per line; `None` for a success.
fn error_of(body: &Value) -> Option<String> {
    let error = body.get("error")?;
    let mut text = error
        .as_str()
        .map_or_else(|| error.to_string(), str::to_owned);
    for d in body["output"]["details"].as_array().into_iter().flatten() {
        text.push('\n');
        text.push_str(d.as_str().unwrap_or_default());
    }
    Some(text)
}

#[tokio::test]
async fn every_bad_input_gets_its_error_and_the_worker_keeps_serving() {
    let cases = load_cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), cases.len(), "case ids must be unique");

    let sim = simulator(1).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let mut worker = WorkerProcess::start(&platform, &sim, &[]);
    let started = Instant::now();
    for case in &cases {
        match &case.body {
            Body::Json(job) => platform.push_raw_job(job.clone()),
            Body::Bytes(bytes) => platform.push_raw_bytes(bytes.clone(), &[&case.id]),
        }
    }
    let mut failures = Vec::new();
    let (mut errors, mut accepted, mut generated) = (0, 0, 0);
    for case in &cases {
        if matches!(case.body, Body::Bytes(_)) {
            generated += 1;
        }
        let body = final_of(&platform, &case.id).await;
        if std::env::var_os("CORPUS_SHOW").is_some() {
            eprintln!("{}: {}", case.file, short(&body.to_string()));
        }
        match (&case.expected_error, error_of(&body)) {
            (Some(expected), Some(error)) if error.contains(expected.as_str()) => errors += 1,
            (None, None)
                if body["output"]["images"]
                    .as_array()
                    .is_some_and(|i| !i.is_empty()) =>
            {
                accepted += 1
            }
            (expected, _) => failures.push(format!(
                "{}: expected {}, got {}",
                case.file,
                expected.as_deref().map_or_else(
                    || "a success".to_owned(),
                    |e| format!("an error with {e:?}")
                ),
                short(&body.to_string())
            )),
        }
    }
    let elapsed = started.elapsed();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Still serving, never exited, never panicked.
    platform.push_job("after-the-corpus", instant_input(0xABCDEF));
    let body = final_of(&platform, "after-the-corpus").await;
    assert!(error_of(&body).is_none(), "{body}");
    assert_eq!(body["output"]["images"].as_array().map(Vec::len), Some(1));
    assert!(worker.running(), "the worker process exited");
    let log = worker.log();
    assert!(!log.contains("panicked"), "a job panicked:\n{log}");
    assert!(
        platform.violations().is_empty(),
        "{:#?}",
        platform.violations()
    );
    eprintln!(
        "bad-input corpus: {} cases ({generated} generated), {errors} refused with the expected \
         error, {accepted} accepted as worker-comfyui accepts them; the worker kept serving; \
         {:.1} s",
        cases.len(),
        elapsed.as_secs_f64()
    );
}

fn short(s: &str) -> String {
    if s.len() > 600 {
        let head: String = s.chars().take(600).collect();
        format!("{head}… ({} bytes)", s.len())
    } else {
        s.to_owned()
    }
}
