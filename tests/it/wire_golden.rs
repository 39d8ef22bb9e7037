//! Golden files of the wire: for every job of a broad case list, the exact bodies each front end
//! of the real binary answers with, in `tests/fixtures/wire/<case>.txt`:
//!
//! * **RunPod** (`worker` against the fake platform): the job-done POST body with its query.
//! * **Lambda** (`lambda` against the fake Runtime API): the buffered `…/response` or `…/error`
//!   body with its error-type header; for a few cases the streamed response's prelude and last
//!   NDJSON line (`LAMBDA_RESPONSE_MODE=streaming`).
//! * **Local endpoint** (`serve`): the `POST /run` reply, then the final `GET /status/{id}` body.
//! * **CLI** (`run`): stdout and the exit code, for a few cases.
//!
//! Every front end gets the same job bytes: the RunPod job-take body is also the Lambda event and
//! the `/run` body (which ignore its `id`). The cases: successes (images, images and text, text
//! only, nothing, audio), partial results with `errors`, ComfyUI validation refusals, runtime
//! errors, an interrupt from outside, refused input URLs, bad `s3Config`s, a panicking job, an
//! output over the inline limit, `input.timeout_s`, `policy.executionTimeout`, the Lambda
//! deadline, ComfyUI unreachable, `REFRESH_WORKER`'s `stopPod`, and the whole bad-input corpus
//! (`tests/fixtures/bad_inputs/`). Cases needing other settings run on processes of their own;
//! each process has a simulator of its own, so file counters and the cache depend only on its
//! own (ordered) jobs.
//!
//! Bodies are kept byte for byte except for what legitimately varies between runs ([`normalise`]):
//! `delayTime`/`executionTime` numbers become `"<ms>"`, UUIDs the job did not contain (the local
//! job ids, prompt ids) become `<uuid>`, `127.0.0.1:PORT` of the test servers (ports from 1024
//! up) becomes `127.0.0.1:<port>`. Long base64 strings (and any string over 4096 bytes) are
//! replaced by their SHA-256 and length: the simulator's files are deterministic, so this still
//! pins every byte while keeping the files small.
//!
//! After an intended change of a wire output, regenerate with
//! `COMFY_WORKER_BLESS=1 scripts/test wire_golden` and review the diff.

#![cfg(feature = "lambda")]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use comfy_sim::Simulator;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::cli::bin;
use crate::corpus;
use crate::fake_platform::{FakePlatform, PlatformOptions, PostKind};
use crate::harness::{self, LIMIT};
use crate::lambda::{Answer, FakeRuntime, LambdaProcess};
use crate::serve_process::ServeProcess;
use crate::worker_process::{simulator, WorkerProcess};

/// A front end of the binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Front {
    RunPod,
    Lambda,
    LambdaStream,
    Local,
    Cli,
}

/// The settings a case needs; each is a process (per front end) of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Env {
    /// Test timings, and the panic test hook on ImageInvert nodes.
    Main,
    /// `MAX_INLINE_OUTPUT_BYTES=100` without a bucket.
    SmallInline,
    /// ComfyUI at a closed port, two readiness attempts.
    Unreachable,
    /// `REFRESH_WORKER=true` (RunPod only: `stopPod`).
    Refresh,
    /// A 0.5 s `LAMBDA_DEADLINE_MARGIN_S` (Lambda only).
    Deadline,
}

impl Env {
    fn vars(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Env::Main => vec![("COMFY_WORKER_TEST_PANIC_NODE", "ImageInvert")],
            Env::SmallInline => vec![("MAX_INLINE_OUTPUT_BYTES", "100")],
            Env::Unreachable => vec![
                ("COMFY_HOST", UNREACHABLE),
                ("COMFY_API_AVAILABLE_MAX_RETRIES", "2"),
            ],
            Env::Refresh => vec![("REFRESH_WORKER", "true")],
            Env::Deadline => vec![("LAMBDA_DEADLINE_MARGIN_S", "0.5")],
        }
    }
}

/// Nothing listens on the discard port.
const UNREACHABLE: &str = "127.0.0.1:9";

/// The `Lambda-Runtime-Deadline-Ms` of the deadline case: a duration (as `cargo lambda watch`
/// sends it), so the figures in the message are fixed: 4.0 s away, interrupted after 3.5 s, 0.5 s
/// before it (they hold while less than 90 ms pass between reading the header and the check).
const LAMBDA_DEADLINE_MS: u64 = 4_040;

struct Case {
    /// The golden file's stem.
    name: String,
    description: String,
    /// The RunPod job id and the Lambda request id.
    id: String,
    /// The job-take body, also the Lambda event and the `/run` body.
    body: Vec<u8>,
    env: Env,
    fronts: Vec<Front>,
    /// The Lambda invocation's deadline header, when not ten minutes from now.
    lambda_deadline_ms: Option<u64>,
}

const ALL: &[Front] = &[Front::RunPod, Front::Lambda, Front::Local];

fn case(name: &str, description: &str, env: Env, fronts: &[Front], job: Value) -> Case {
    let mut job = job;
    job["id"] = json!(name);
    // `id` first, as the platform sends it.
    let mut body = serde_json::Map::new();
    body.insert("id".into(), job["id"].take());
    for (k, v) in job.as_object().unwrap() {
        if k != "id" {
            body.insert(k.clone(), v.clone());
        }
    }
    Case {
        name: name.to_owned(),
        description: description.to_owned(),
        id: name.to_owned(),
        body: serde_json::to_vec(&Value::Object(body)).unwrap(),
        env,
        fronts: fronts.to_vec(),
        lambda_deadline_ms: None,
    }
}

fn with(fronts: &[Front], more: &[Front]) -> Vec<Front> {
    let mut all = fronts.to_vec();
    all.extend_from_slice(more);
    all
}

/// EmptyImage (its own colour) → SlowSteps (`steps`) → SaveImage (its own prefix).
fn slow_workflow(name: &str, colour: u64, steps: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": 0.1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": name}}
    })
}

/// An 8 × 8 image of its own colour, saved under its own prefix.
fn instant_workflow(name: &str, colour: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": colour}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": name}}
    })
}

/// `ok.json` (two images) with its own colour and prefixes, 3 steps.
fn ok_workflow(name: &str, colour: u64) -> Value {
    let mut wf = harness::workflow("ok");
    wf["1"]["inputs"]["color"] = json!(colour);
    wf["2"]["inputs"]["steps"] = json!(3);
    wf["3"]["inputs"]["filename_prefix"] = json!(format!("{name}_full"));
    wf["5"]["inputs"]["filename_prefix"] = json!(format!("{name}_small"));
    wf
}

/// The case list. `interrupted` comes first: the simulator pauses the first sampler to reach
/// step 2, which must be its.
fn cases() -> Vec<Case> {
    use Front::*;
    let slow = |name: &str, colour| slow_workflow(name, colour, 10_000);
    let mut cases = vec![
        case(
            "interrupted",
            "ComfyUI receives POST /interrupt from outside while the sampler runs (step 2)",
            Env::Main,
            ALL,
            json!({"input": {"workflow": slow_workflow("interrupted", 0x010101, 1000)}}),
        ),
        case(
            "success-images",
            "ok.json: two SaveImage outputs",
            Env::Main,
            &with(ALL, &[LambdaStream, Cli]),
            json!({"input": {"workflow": ok_workflow("success_images", 0x020202)}}),
        ),
        case(
            "success-images-and-text",
            "a SaveImage and a PreviewAny: images and text",
            Env::Main,
            ALL,
            json!({"input": {"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x030303}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "images_and_text"}},
                "3": {"class_type": "PrimitiveString", "inputs": {"value": "a caption, with words"}},
                "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}
            }}}),
        ),
        case(
            "success-no-images-text",
            "only a PreviewAny: success_no_images with text",
            Env::Main,
            &with(ALL, &[Cli]),
            json!({"input": {"workflow": {
                "1": {"class_type": "PrimitiveString", "inputs": {"value": "text only"}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
            }}}),
        ),
        case(
            "success-no-images-nothing",
            "images made but output.kinds asks for videos only: nothing returned",
            Env::Main,
            ALL,
            json!({"input": {
                "workflow": instant_workflow("nothing", 0x040404),
                "output": {"kinds": ["videos"]}
            }}),
        ),
        case(
            "success-audio",
            "EmptyAudio → SaveAudio: audio, no images",
            Env::Main,
            ALL,
            json!({"input": {"workflow": {
                "1": {"class_type": "EmptyAudio", "inputs": {"duration": 0.1, "sample_rate": 8000, "channels": 1}},
                "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/wire"}}
            }}}),
        ),
        case(
            "partial-errors-runtime",
            "one SaveImage runs, then a RaiseError node fails the prompt: images with errors",
            Env::Main,
            ALL,
            json!({"input": {"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x050505}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "partial_a"}},
                "3": {"class_type": "RaiseError", "inputs": {"image": ["1", 0], "message": "the second branch fails"}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "partial_b"}}
            }}}),
        ),
        case(
            "partial-errors-validation",
            "two outputs, one failing validation: ComfyUI runs the other (dropped output warning)",
            Env::Main,
            ALL,
            json!({"input": {"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x060606}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "kept"}},
                "3": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
                "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "dropped"}}
            }}}),
        ),
        case(
            "validation-bad-node",
            "bad_node.json: ComfyUI refuses the prompt with node errors",
            Env::Main,
            &with(ALL, &[LambdaStream, Cli]),
            json!({"input": {"workflow": harness::workflow("bad_node")}}),
        ),
        case(
            "validation-bad-class",
            "bad_class.json: an unknown node class",
            Env::Main,
            ALL,
            json!({"input": {"workflow": harness::workflow("bad_class")}}),
        ),
        case(
            "runtime-error-save-outside",
            "runtime_error.json: SaveImage raises (path outside the output folder)",
            Env::Main,
            &with(ALL, &[LambdaStream]),
            json!({"input": {"workflow": harness::workflow("runtime_error")}}),
        ),
        case(
            "runtime-error-raise",
            "runtime_error_custom.json: a custom node raises RuntimeError",
            Env::Main,
            &with(ALL, &[Cli]),
            json!({"input": {"workflow": harness::workflow("runtime_error_custom")}}),
        ),
        case(
            "invalid-input-workflow-number",
            "input.workflow is a number",
            Env::Main,
            &with(ALL, &[LambdaStream, Cli]),
            json!({"input": {"workflow": 7}}),
        ),
        case(
            "url-input-refused",
            "image URLs to a private address and to the metadata service, refused by the SSRF guard",
            Env::Main,
            ALL,
            json!({"input": {
                "workflow": instant_workflow("url_refused", 0x070707),
                "images": [
                    {"name": "a.png", "image": "http://10.0.0.1/a.png"},
                    {"name": "b.png", "image": "http://169.254.169.254/latest/meta-data/"}
                ]
            }}),
        ),
        case(
            "s3config-missing-secret",
            "the job's s3Config has no accessSecret",
            Env::Main,
            ALL,
            json!({
                "input": {"workflow": instant_workflow("s3_missing", 0x080808)},
                "s3Config": {"accessId": "a", "endpointUrl": "https://10.0.0.1:9000/bucket"}
            }),
        ),
        case(
            "s3config-private-endpoint",
            "the job's s3Config points at a private address",
            Env::Main,
            ALL,
            json!({
                "input": {"workflow": instant_workflow("s3_private", 0x090909)},
                "s3Config": {
                    "accessId": "a",
                    "accessSecret": "wire-golden-secret",
                    "endpointUrl": "https://10.0.0.1:9000/bucket"
                }
            }),
        ),
        case(
            "panic-in-engine",
            "the test hook panics the job when an ImageInvert node starts",
            Env::Main,
            ALL,
            json!({"input": {"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x0a0a0a}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "panics"}}
            }}}),
        ),
        case(
            "timeout-input",
            "input.timeout_s 0.3 on a job of 10000 steps (10 s)",
            Env::Main,
            &[RunPod, Lambda, LambdaStream, Local],
            json!({"input": {"workflow": slow("timeout_input", 0x0b0b0b), "timeout_s": 0.3}}),
        ),
        case(
            "timeout-policy",
            "policy.executionTimeout 300 ms on a job of 10000 steps (10 s) (local endpoint only)",
            Env::Main,
            &[Local],
            json!({
                "input": {"workflow": slow("timeout_policy", 0x0c0c0c)},
                "policy": {"executionTimeout": 300}
            }),
        ),
        case(
            "output-too-large",
            "two PNGs over MAX_INLINE_OUTPUT_BYTES=100, no bucket",
            Env::SmallInline,
            &with(ALL, &[Cli]),
            json!({"input": {"workflow": ok_workflow("too_large", 0x0d0d0d)}}),
        ),
        case(
            "comfyui-unreachable",
            "nothing listens at COMFY_HOST",
            Env::Unreachable,
            &with(ALL, &[Cli]),
            json!({"input": {"workflow": instant_workflow("unreachable", 0x0e0e0e)}}),
        ),
        case(
            "comfyui-unreachable-invalid-input",
            "an invalid input while nothing listens at COMFY_HOST",
            Env::Unreachable,
            ALL,
            json!({"input": {"workflow": 7}}),
        ),
        case(
            "stop-pod",
            "REFRESH_WORKER=true: the result asks the platform to stop the worker",
            Env::Refresh,
            &[RunPod],
            json!({"input": {"workflow": instant_workflow("stop_pod", 0x0f0f0f)}}),
        ),
    ];
    let mut deadline = case(
        "lambda-deadline",
        "a job of 10000 steps (10 s), 4.04 s before the invocation's deadline, margin 0.5 s",
        Env::Deadline,
        &[Lambda],
        json!({"input": {"workflow": slow("lambda_deadline", 0x101010)}}),
    );
    deadline.lambda_deadline_ms = Some(LAMBDA_DEADLINE_MS);
    cases.push(deadline);

    for c in corpus::load_cases() {
        let body = match c.body {
            corpus::Body::Json(job) => serde_json::to_vec(&job).unwrap(),
            corpus::Body::Bytes(bytes) => bytes,
        };
        cases.push(Case {
            name: format!("corpus-{}", c.file.trim_end_matches(".json")),
            description: format!("bad-input corpus: {}", c.description),
            id: c.id,
            body,
            env: Env::Main,
            fronts: ALL.to_vec(),
            lambda_deadline_ms: None,
        });
    }
    cases
}

/// One captured wire output of a case.
struct Section {
    case: usize,
    front: Front,
    /// Its order within the case's front end (e.g. `/run` before `/status`).
    seq: u8,
    title: String,
    body: String,
}

fn section(c: (usize, &Case), front: Front, seq: u8, title: String, body: &[u8]) -> Section {
    Section {
        case: c.0,
        front,
        seq,
        title,
        body: normalise(&String::from_utf8_lossy(body), &c.1.body),
    }
}

/// The cases of `cases` a process of `front` with `env` runs, with their index.
fn select(cases: &[Case], front: Front, env: Env) -> Vec<(usize, &Case)> {
    cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.env == env && c.fronts.contains(&front))
        .collect()
}

/// While `cases` has `interrupted`: the simulator stops the first sampler reaching step 2, and
/// this interrupts ComfyUI from outside, then lets it go on.
async fn interrupter(sim: &Simulator, cases: &[(usize, &Case)]) {
    if !cases.iter().any(|(_, c)| c.name == "interrupted") {
        return;
    }
    let interrupt = async {
        sim.paused().await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let status = http
            .post(format!("http://{}/interrupt", sim.host()))
            .body("{}")
            .send()
            .await
            .expect("POST /interrupt")
            .status();
        assert!(status.is_success(), "POST /interrupt: {status}");
        sim.interrupt_handled(1).await;
        sim.resume();
    };
    tokio::time::timeout(LIMIT, interrupt)
        .await
        .expect("the interrupted case never reached step 2");
}

/// A simulator (1 ms per step) armed for [`interrupter`].
async fn sim_for(cases: &[(usize, &Case)]) -> Simulator {
    let sim = simulator(1).await;
    if cases.iter().any(|(_, c)| c.name == "interrupted") {
        assert_eq!(cases[0].1.name, "interrupted", "it must be the first job");
        sim.pause_after_step(2);
    }
    sim
}

// ---- RunPod ----------------------------------------------------------------------------------

async fn runpod(cases: &[Case]) -> Vec<Section> {
    let groups = [Env::Main, Env::SmallInline, Env::Unreachable, Env::Refresh];
    let runs = groups.map(|env| runpod_group(select(cases, Front::RunPod, env), env));
    join_all(runs).await.into_iter().flatten().collect()
}

async fn runpod_group(cases: Vec<(usize, &Case)>, env: Env) -> Vec<Section> {
    if cases.is_empty() {
        return Vec::new();
    }
    let sim = sim_for(&cases).await;
    let platform = FakePlatform::start(PlatformOptions::default()).await;
    let _worker = WorkerProcess::start(&platform, &sim, &env.vars());
    for (_, c) in &cases {
        platform.push_raw_bytes(c.body.clone(), &[&c.id]);
    }
    let collect = async {
        let mut out = Vec::new();
        for (i, c) in &cases {
            let wait = platform.wait_post(&c.id, |p| p.kind == PostKind::Final && p.accepted);
            let post = tokio::time::timeout(LIMIT, wait)
                .await
                .unwrap_or_else(|_| panic!("runpod: no result for {}", c.name));
            let title = format!("runpod: POST job-done?{}", post.url_query);
            out.push(section((*i, c), Front::RunPod, 0, title, &post.raw));
        }
        out
    };
    let (out, ()) = tokio::join!(collect, interrupter(&sim, &cases));
    let violations = platform.violations();
    assert!(violations.is_empty(), "runpod ({env:?}): {violations:#?}");
    out
}

// ---- Lambda ----------------------------------------------------------------------------------

async fn lambda(cases: &[Case]) -> Vec<Section> {
    let groups = [
        (Front::Lambda, Env::Main),
        (Front::Lambda, Env::SmallInline),
        (Front::Lambda, Env::Unreachable),
        (Front::Lambda, Env::Deadline),
        (Front::LambdaStream, Env::Main),
    ];
    let runs = groups.map(|(front, env)| lambda_group(select(cases, front, env), front, env));
    join_all(runs).await.into_iter().flatten().collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn lambda_group(cases: Vec<(usize, &Case)>, front: Front, env: Env) -> Vec<Section> {
    if cases.is_empty() {
        return Vec::new();
    }
    let sim = sim_for(&cases).await;
    let runtime = FakeRuntime::start().await;
    let mut vars = env.vars();
    let (label, mode) = if front == Front::LambdaStream {
        ("lambda-streaming", "streaming")
    } else {
        ("lambda", "buffered")
    };
    vars.push(("LAMBDA_RESPONSE_MODE", mode));
    let _process = LambdaProcess::start(&["lambda"], &runtime.env(), &sim.host(), &vars);
    for (_, c) in &cases {
        let deadline = c.lambda_deadline_ms.unwrap_or_else(|| unix_ms() + 600_000);
        runtime.invoke_raw(&c.id, c.body.clone(), deadline);
    }
    let collect = async {
        let mut out = Vec::new();
        for (i, c) in &cases {
            let (answer, raw) = runtime.raw_answer(&c.id).await;
            match answer {
                Answer::Buffered(_) => {
                    let title = format!("{label}: POST …/response");
                    out.push(section((*i, c), front, 0, title, &raw));
                }
                Answer::Error { header, .. } => {
                    let title = format!(
                        "{label}: POST …/error (Lambda-Runtime-Function-Error-Type: {header})"
                    );
                    out.push(section((*i, c), front, 0, title, &raw));
                }
                Answer::Streamed { .. } => {
                    let at = raw
                        .windows(8)
                        .position(|w| w == [0u8; 8])
                        .unwrap_or_else(|| panic!("{}: no prelude delimiter", c.name));
                    let title = format!("{label}: POST …/response, metadata prelude");
                    out.push(section((*i, c), front, 0, title, &raw[..at]));
                    let rest = String::from_utf8_lossy(&raw[at + 8..]).into_owned();
                    let last = rest.lines().last().unwrap_or_default();
                    let title = format!("{label}: POST …/response, last NDJSON line");
                    out.push(section((*i, c), front, 1, title, last.as_bytes()));
                }
            }
        }
        out
    };
    let (out, ()) = tokio::join!(collect, interrupter(&sim, &cases));
    runtime.assert_no_violations();
    out
}

// ---- Local endpoint --------------------------------------------------------------------------

async fn local(cases: &[Case]) -> Vec<Section> {
    let groups = [Env::Main, Env::SmallInline, Env::Unreachable];
    let runs = groups.map(|env| local_group(select(cases, Front::Local, env), env));
    join_all(runs).await.into_iter().flatten().collect()
}

/// Sends a request; returns the status and the body's bytes (within [`LIMIT`]).
async fn send(request: reqwest::RequestBuilder, what: &str) -> (u16, Vec<u8>) {
    let exchange = async {
        let resp = request.send().await.expect(what);
        let status = resp.status().as_u16();
        (status, resp.bytes().await.expect(what).to_vec())
    };
    tokio::time::timeout(LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in time"))
}

async fn local_group(cases: Vec<(usize, &Case)>, env: Env) -> Vec<Section> {
    if cases.is_empty() {
        return Vec::new();
    }
    let sim = sim_for(&cases).await;
    let mut vars = env.vars();
    let host = sim.host();
    if !vars.iter().any(|(k, _)| *k == "COMFY_HOST") {
        vars.push(("COMFY_HOST", &host));
    }
    let serve = ServeProcess::start(&[], &vars).await;
    let base = serve.base();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut out = Vec::new();
    let mut accepted = Vec::new();
    for (i, c) in &cases {
        let request = http
            .post(format!("{base}/run"))
            .header("content-type", "application/json")
            .body(c.body.clone());
        let (code, body) = send(request, &format!("{}: POST /run", c.name)).await;
        let title = format!("local: POST /run → {code}");
        out.push(section((*i, c), Front::Local, 0, title, &body));
        if code == 200 {
            let reply: Value = serde_json::from_slice(&body).unwrap();
            accepted.push((*i, *c, reply["id"].as_str().unwrap().to_owned()));
        }
    }
    let collect = async {
        let mut out = Vec::new();
        for (i, c, id) in &accepted {
            // The event stream ends with the job's final status.
            let what = format!("{}: GET /events", c.name);
            send(http.get(format!("{base}/events/{id}")), &what).await;
            let what = format!("{}: GET /status", c.name);
            let (code, body) = send(http.get(format!("{base}/status/{id}")), &what).await;
            let title = format!("local: GET /status/{{id}} → {code}");
            out.push(section((*i, c), Front::Local, 1, title, &body));
        }
        out
    };
    let (statuses, ()) = tokio::join!(collect, interrupter(&sim, &cases));
    out.extend(statuses);
    drop(serve);
    out
}

// ---- CLI -------------------------------------------------------------------------------------

async fn cli(cases: &[Case]) -> Vec<Section> {
    let runs = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.fronts.contains(&Front::Cli))
        .map(|(i, c)| cli_case(i, c));
    join_all(runs).await
}

async fn cli_case(i: usize, c: &Case) -> Section {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin());
    harness::clear_worker_env(&mut cmd)
        .args(["run", "-q", "--test_input"])
        .arg(String::from_utf8(c.body.clone()).unwrap())
        .current_dir(dir.path())
        .env("COMFY_PID_FILE", dir.path().join("no.pid"))
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "10")
        .envs(c.env.vars())
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    if c.env == Env::Unreachable {
        cmd.args(["--comfy-host", UNREACHABLE]);
    } else {
        cmd.args(["--simulate", "--sim-step-ms", "1"]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("run comfy-worker run");
    let pid = child.id().to_string();
    let run = tokio::task::spawn_blocking(move || child.wait_with_output().expect("its output"));
    let Ok(out) = tokio::time::timeout(LIMIT, run).await else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("cli: {} did not finish", c.name);
    };
    let out = out.unwrap();
    let code = out.status.code().map_or("killed".into(), |c| c.to_string());
    let title = format!("cli: comfy-worker run → exit {code}, stdout");
    section((i, c), Front::Cli, 0, title, &out.stdout)
}

// ---- The test --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_outputs_match_the_golden_files() {
    let started = Instant::now();
    let cases = cases();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be unique");

    let (a, b, c, d) = tokio::join!(
        timed("runpod", runpod(&cases)),
        timed("lambda", lambda(&cases)),
        timed("local", local(&cases)),
        timed("cli", cli(&cases)),
    );
    let times = [a.1, b.1, c.1, d.1].join(", ");
    let mut sections: Vec<Section> = [a.0, b.0, c.0, d.0].into_iter().flatten().collect();
    sections.sort_by_key(|x| (x.case, x.front, x.seq));

    let mut docs: BTreeMap<String, String> = BTreeMap::new();
    for (i, c) in cases.iter().enumerate() {
        let mut doc = format!("# {}: {}\n", c.name, c.description);
        for s in sections.iter().filter(|s| s.case == i) {
            doc.push_str(&format!("\n== {}\n{}\n", s.title, s.body));
        }
        docs.insert(format!("{}.txt", c.name), doc);
    }
    check_goldens(&docs);
    eprintln!(
        "wire goldens: {} cases, {} wire outputs, {:.1} s ({})",
        cases.len(),
        sections.len(),
        started.elapsed().as_secs_f64(),
        times
    );
}

/// Runs one front end's share, timed.
async fn timed(name: &str, run: impl Future<Output = Vec<Section>>) -> (Vec<Section>, String) {
    let at = Instant::now();
    let sections = run.await;
    (
        sections,
        format!("{name} {:.1} s", at.elapsed().as_secs_f64()),
    )
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire")
}

/// Compares every document with its file (or writes them, and removes stale ones, with
/// `COMFY_WORKER_BLESS=1`).
fn check_goldens(docs: &BTreeMap<String, String>) {
    let dir = golden_dir();
    let existing: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".txt"))
                .collect()
        })
        .unwrap_or_default();
    if std::env::var_os("COMFY_WORKER_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, doc) in docs {
            std::fs::write(dir.join(name), doc).unwrap();
        }
        for stale in existing.iter().filter(|n| !docs.contains_key(*n)) {
            std::fs::remove_file(dir.join(stale)).unwrap();
        }
        return;
    }
    let mut problems = Vec::new();
    for (name, doc) in docs {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Err(e) => problems.push(format!("{name}: {e} (a new case? bless it)")),
            Ok(expected) if expected != *doc => problems.push(explain(name, &expected, doc)),
            Ok(_) => {}
        }
    }
    for stale in existing.iter().filter(|n| !docs.contains_key(*n)) {
        problems.push(format!("{stale}: no case produces it any more"));
    }
    if !problems.is_empty() {
        panic!(
            "{} wire golden file(s) in {} differ; after an intended change run \
             COMFY_WORKER_BLESS=1 scripts/test wire_golden and review the diff\n\n{}",
            problems.len(),
            dir.display(),
            problems.join("\n\n")
        );
    }
}

/// Where `actual` first departs from `expected`: the line, its section and, for JSON bodies, the
/// first differing path.
fn explain(name: &str, expected: &str, actual: &str) -> String {
    let (e_lines, a_lines): (Vec<&str>, Vec<&str>) =
        (expected.lines().collect(), actual.lines().collect());
    let n = e_lines
        .iter()
        .zip(&a_lines)
        .position(|(e, a)| e != a)
        .unwrap_or(e_lines.len().min(a_lines.len()));
    let e = e_lines.get(n).copied().unwrap_or("<end of file>");
    let a = a_lines.get(n).copied().unwrap_or("<end of file>");
    let heading = a_lines[..n.min(a_lines.len())]
        .iter()
        .rev()
        .find(|l| l.starts_with("== "))
        .copied()
        .unwrap_or("(header)");
    let column = e
        .chars()
        .zip(a.chars())
        .position(|(x, y)| x != y)
        .unwrap_or(e.chars().count().min(a.chars().count()));
    let mut text = format!(
        "{name}, line {}, column {}, in `{heading}`:",
        n + 1,
        column + 1
    );
    if let (Ok(ev), Ok(av)) = (
        serde_json::from_str::<Value>(e),
        serde_json::from_str::<Value>(a),
    ) {
        match first_difference(&ev, &av, String::new()) {
            Some((path, what)) => text.push_str(&format!("\n  at {path}: {what}")),
            None => text.push_str("\n  same JSON value, different bytes (formatting or escapes)"),
        }
    }
    text.push_str(&format!(
        "\n  expected: {}\n  actual:   {}",
        clip(e),
        clip(a)
    ));
    text
}

/// The first path at which two JSON values differ (object key order included).
fn first_difference(e: &Value, a: &Value, path: String) -> Option<(String, String)> {
    match (e, a) {
        (Value::Object(eo), Value::Object(ao)) => {
            let (ek, ak): (Vec<&String>, Vec<&String>) = (eo.keys().collect(), ao.keys().collect());
            if ek != ak {
                return Some((path, format!("keys {ek:?} ≠ {ak:?}")));
            }
            eo.iter()
                .find_map(|(k, ev)| first_difference(ev, &ao[k], format!("{path}.{k}")))
        }
        (Value::Array(ea), Value::Array(aa)) if ea.len() == aa.len() => ea
            .iter()
            .zip(aa)
            .enumerate()
            .find_map(|(i, (ev, av))| first_difference(ev, av, format!("{path}[{i}]"))),
        _ if e == a => None,
        _ => Some((
            if path.is_empty() { "$".into() } else { path },
            format!(
                "expected {}, actual {}",
                clip(&e.to_string()),
                clip(&a.to_string())
            ),
        )),
    }
}

fn clip(s: &str) -> String {
    if s.len() <= 1500 {
        return s.to_owned();
    }
    let head: String = s.chars().take(1500).collect();
    format!("{head}… ({} bytes)", s.len())
}

// ---- Normalisation ---------------------------------------------------------------------------

/// The body with what varies between runs replaced, everything else kept byte for byte: the
/// `delayTime`/`executionTime` numbers, the UUIDs the worker made up (those not in the job's
/// bytes `job`: local job ids, prompt ids), loopback ports from 1024 up (the test servers'), and
/// long base64 (or any string over 4096 bytes) as its SHA-256 and length. Works on the JSON text
/// itself (no re-serialising), and passes anything that is not JSON through unchanged (but for
/// the same replacements).
fn normalise(text: &str, job: &[u8]) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len().min(1 << 20));
    // The key whose value comes next.
    let mut key: Option<&str> = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string_end(b, i);
                let token = &text[i..end];
                let next = b[end..].iter().position(|c| !c.is_ascii_whitespace());
                if next.is_some_and(|n| b[end + n] == b':') {
                    key = Some(token.trim_matches('"'));
                    out.push_str(token);
                } else {
                    out.push_str(&string_token(token, job));
                    key = None;
                }
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let end = i + b[i..]
                    .iter()
                    .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                    .unwrap_or(b.len() - i);
                if matches!(key, Some("delayTime" | "executionTime")) {
                    out.push_str("\"<ms>\"");
                } else {
                    out.push_str(&text[i..end]);
                }
                key = None;
                i = end;
            }
            c => {
                if c != b':' && !c.is_ascii_whitespace() {
                    key = None;
                }
                let ch = text[i..].chars().next().unwrap();
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The index just past the string starting at `start` (its closing quote), or the end.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// A JSON string token (quotes included), normalised.
fn string_token(token: &str, job: &[u8]) -> String {
    let inner = token
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(token);
    let base64 = inner.len() >= 256
        && inner
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
    if base64 || inner.len() > 4096 {
        return format!(
            "\"sha256:{}:{}\"",
            hex(&sha256(inner.as_bytes())),
            inner.len()
        );
    }
    let text = replace_uuids(token, job);
    replace_ports(&text)
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex) → `<uuid>`, unless the job itself has it.
fn replace_uuids(s: &str, job: &[u8]) -> String {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let b = s.as_bytes();
    let is_uuid_at = |at: usize| -> bool {
        let mut i = at;
        for (n, len) in SHAPE.iter().enumerate() {
            if n > 0 {
                if b.get(i) != Some(&b'-') {
                    return false;
                }
                i += 1;
            }
            let part = match b.get(i..i + len) {
                Some(p) => p,
                None => return false,
            };
            if !part.iter().all(|c| c.is_ascii_hexdigit()) {
                return false;
            }
            i += len;
        }
        true
    };
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let boundary = i == 0 || !b[i - 1].is_ascii_hexdigit();
        if boundary && is_uuid_at(i) && !contains(job, &b[i..i + 36]) {
            out.push_str("<uuid>");
            i += 36;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `127.0.0.1:12345` → `127.0.0.1:<port>` (ports from 1024 up: the test servers' ephemeral ones).
fn replace_ports(s: &str) -> String {
    const HOST: &str = "127.0.0.1:";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(HOST) {
        out.push_str(&rest[..at + HOST.len()]);
        rest = &rest[at + HOST.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if rest[..digits].parse::<u32>().is_ok_and(|port| port >= 1024) {
            out.push_str("<port>");
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (FIPS 180-4), to pin long strings in the golden files without storing them.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16]
                .wrapping_add(s0)
                .wrapping_add(w[t - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for (k, wt) in K.iter().zip(w) {
            let [a, b, c, d, e, f, g, hh] = v;
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(*k)
                .wrapping_add(wt);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), a, b, c, d.wrapping_add(t1), e, f, g];
        }
        for (x, y) in h.iter_mut().zip(v) {
            *x = x.wrapping_add(y);
        }
    }
    let mut digest = [0u8; 32];
    for (out, word) in digest.chunks_exact_mut(4).zip(h) {
        out.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

#[test]
fn the_normaliser_keeps_everything_but_what_varies() {
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(&sha256(&[b'a'; 1000])),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
    let job = br#"{"input": {"workflow": {"3": {"class_type": "0f1c2a4e-0b1d-4c8e-9f00-123456789abc"}}}}"#;
    let body = r#"{"id":"6f1c2a4e-0b1d-4c8e-9f00-123456789abc-l1","status":"FAILED","delayTime":12,"executionTime":3045,"workerId":"local","error":"at http://127.0.0.1:40123/x, not 127.0.0.1:9, 1.5e3 \"delayTime\":7, class 0f1c2a4e-0b1d-4c8e-9f00-123456789abc"}"#;
    assert_eq!(
        normalise(body, job),
        r#"{"id":"<uuid>-l1","status":"FAILED","delayTime":"<ms>","executionTime":"<ms>","workerId":"local","error":"at http://127.0.0.1:<port>/x, not 127.0.0.1:9, 1.5e3 \"delayTime\":7, class 0f1c2a4e-0b1d-4c8e-9f00-123456789abc"}"#
    );
    let data = "iVBORw0K".repeat(40);
    let normalised = normalise(&format!(r#"{{"data": "{data}", "n": [1, -2.5]}}"#), job);
    assert_eq!(
        normalised,
        format!(
            r#"{{"data": "sha256:{}:320", "n": [1, -2.5]}}"#,
            hex(&sha256(data.as_bytes()))
        )
    );
    assert_eq!(normalise("Bad Request", job), "Bad Request");
}
