//! `comfy-worker watch`, the real binary: its readable output for replays of real recordings
//! (`ok`, `runtime_error`, `interrupt`) against golden files in `tests/fixtures/watch/`, `--submit`
//! against the simulator (every step, exit codes), broadcasts with a reconnect and Ctrl+C,
//! `--json`, and the same lines in a worker's debug log.
//!
//! Golden files hold the output with its variable parts replaced: the timestamps (`HH:MM:SS.mmm`),
//! the ETA figures (`ETA <eta>`: they come from the replay's wall-clock timing), prompt and client
//! ids, the ComfyUI address and the submitted file's path. Everything else is compared as it is.
//! After an intended change of wording, regenerate them with
//! `COMFY_WORKER_BLESS=1 cargo test --test it watch::` and review the diff.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use comfy_sim::{DropPoint, Simulator};
use serde_json::{json, Value};

use crate::cli::bin;
use crate::harness::{self, LIMIT};
use crate::replay::{ReplayOptions, ReplayServer, Transcript};
use crate::worker_process::simulator;

/// A running `comfy-worker watch`; killed when dropped. Its stdout and stderr go to files.
struct WatchProcess {
    child: Option<Child>,
    pid: u32,
    out: PathBuf,
    err: PathBuf,
    dir: tempfile::TempDir,
}

impl WatchProcess {
    /// Starts `comfy-worker watch --comfy HOST ARGS…` with test reconnect timings.
    fn start(host: &str, args: &[&str]) -> WatchProcess {
        WatchProcess::start_in(tempfile::tempdir().unwrap(), host, args)
    }

    fn start_in(dir: tempfile::TempDir, host: &str, args: &[&str]) -> WatchProcess {
        let out = dir.path().join("watch.out");
        let err = dir.path().join("watch.err");
        let child = crate::harness::clear_worker_env(&mut Command::new(bin()))
            .arg("watch")
            .args(["--comfy", host])
            .args(args)
            .current_dir(dir.path())
            .env("WEBSOCKET_RECONNECT_DELAY_S", "0.02")
            .env("COMFY_WS_SILENCE_S", "1")
            .env("COMFY_HISTORY_POLL_INTERVAL_MS", "50")
            .env("RUST_LOG", "comfy_worker=warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start comfy-worker watch");
        WatchProcess {
            pid: child.id(),
            child: Some(child),
            out,
            err,
            dir,
        }
    }

    /// `watch --submit workflow.json` (the workflow written into the process's directory).
    fn submit(host: &str, workflow: &Value, extra: &[&str]) -> WatchProcess {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("workflow.json");
        std::fs::write(&file, workflow.to_string()).unwrap();
        let file = file.to_str().unwrap().to_owned();
        let mut args = vec!["--submit", file.as_str()];
        args.extend_from_slice(extra);
        WatchProcess::start_in(dir, host, &args)
    }

    /// The path `submit` passed.
    fn submitted_file(&self) -> String {
        self.dir.path().join("workflow.json").display().to_string()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits (within [`LIMIT`]) until stdout has `n` lines containing `text`.
    async fn wait_for(&self, text: &str, n: usize) {
        let found = async {
            while self.stdout().lines().filter(|l| l.contains(text)).count() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(LIMIT, found).await.is_err() {
            panic!(
                "watch never printed {text:?} ({n}×):\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.pid);
    }

    /// Waits for the process to exit on its own.
    async fn exited(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(LIMIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .unwrap_or_else(|_| panic!("watch did not exit:\n{}", self.stdout()))
            .unwrap()
            .unwrap()
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- watch stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Replaces UUIDs (`8-4-4-4-12`) with `<prompt-id>` and 32-digit hex ids with `<client-id>`.
fn normalise_ids(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    'outer: while !rest.is_empty() {
        for (len, with) in [(36, "<prompt-id>"), (32, "<client-id>")] {
            if let Some(candidate) = rest.get(..len) {
                let uuid = len == 36
                    && candidate.split('-').map(str::len).eq([8, 4, 4, 4, 12])
                    && is_hex(&candidate.replace('-', ""));
                if uuid || (len == 32 && is_hex(candidate)) {
                    out.push_str(with);
                    rest = &rest[len..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The output with its variable parts replaced (see the module docs).
fn normalise(stdout: &str, host: &str, file: Option<&str>) -> String {
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let mut line = line.to_owned();
        let stamp = line.get(..12).unwrap_or("");
        let shape = stamp.bytes().enumerate().all(|(i, b)| {
            matches!(i, 2 | 5) && b == b':' || i == 8 && b == b'.' || b.is_ascii_digit()
        });
        if stamp.len() == 12 && shape {
            line.replace_range(..12, "HH:MM:SS.mmm");
        }
        if let Some(at) = line.find(", ETA ") {
            line.replace_range(at.., ", ETA <eta>");
        }
        line = line.replace(host, "<comfy>");
        if let Some(f) = file {
            line = line.replace(f, "<file>");
        }
        lines.push(normalise_ids(&line));
    }
    lines.join("\n") + "\n"
}

/// Compares with `tests/fixtures/watch/<name>.txt` (or writes it with `COMFY_WORKER_BLESS=1`).
fn assert_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/watch")
        .join(format!("{name}.txt"));
    if std::env::var_os("COMFY_WORKER_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with COMFY_WORKER_BLESS=1 cargo test --test it watch::",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "watch output differs from {}\n--- expected ---\n{expected}--- actual ---\n{actual}",
            path.display()
        );
    }
}

/// The lines of one kind (the column after the timestamp), with their text.
fn texts_of(stdout: &str, kind: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.get(14..)?;
            let (k, text) = rest.split_once(' ')?;
            (k == kind).then(|| text.trim_start().to_owned())
        })
        .collect()
}

async fn replay_submit(name: &str) -> (ReplayServer, WatchProcess) {
    let t = Transcript::load(name);
    let workflow = t.workflow();
    let server = ReplayServer::start(t, ReplayOptions { time_scale: 0.1 }).await;
    let p = WatchProcess::submit(&server.host(), &workflow, &[]);
    (server, p)
}

fn golden_of(server: &ReplayServer, p: &WatchProcess) -> String {
    normalise(&p.stdout(), &server.host(), Some(&p.submitted_file()))
}

fn assert_clean(server: &ReplayServer) {
    assert!(
        server.violations().is_empty(),
        "protocol violations: {:?}",
        server.violations()
    );
}

#[tokio::test]
async fn ok_replay_output_matches_the_golden_file_and_exits_0() {
    let (server, mut p) = replay_submit("ok").await;
    let status = p.exited().await;
    assert_eq!(status.code(), Some(0), "{}", p.stdout());
    let out = p.stdout();
    let steps = texts_of(&out, "progress");
    assert_eq!(steps.len(), 10, "{out}");
    for (i, s) in steps.iter().enumerate() {
        assert!(s.contains(&format!(": {}/10 (", i + 1)), "{s}");
    }
    assert_golden("ok", &golden_of(&server, &p));
    assert_clean(&server);
}

#[tokio::test]
async fn runtime_error_replay_shows_the_exception_and_traceback_and_exits_1() {
    let (server, mut p) = replay_submit("runtime_error").await;
    let status = p.exited().await;
    assert_eq!(status.code(), Some(1), "{}", p.stdout());
    let out = p.stdout();
    let errors = texts_of(&out, "error");
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].starts_with("3 SaveImage"), "{}", errors[0]);
    assert!(
        out.contains("raise Exception(err)"),
        "traceback missing:\n{out}"
    );
    assert_golden("runtime_error", &golden_of(&server, &p));
    assert_clean(&server);
}

#[tokio::test]
async fn interrupt_replay_interrupted_elsewhere_shows_it_and_exits_1() {
    let (server, mut p) = replay_submit("interrupt").await;
    p.wait_for("3/50 (6.0%)", 1).await;
    // Someone else (the ComfyUI page, another client) interrupts the running prompt.
    let reply = reqwest::Client::new()
        .post(format!("http://{}/interrupt", server.host()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(reply.status().is_success());
    let status = p.exited().await;
    assert_eq!(status.code(), Some(1), "{}", p.stdout());
    let out = p.stdout();
    assert_eq!(texts_of(&out, "interrupted").len(), 1, "{out}");
    assert_golden("interrupt", &golden_of(&server, &p));
    assert_clean(&server);
}

#[tokio::test]
async fn preview_replays_show_binary_frames_by_format_and_size() {
    for name in ["preview", "preview_metadata"] {
        let (server, mut p) = replay_submit(name).await;
        let status = p.exited().await;
        assert_eq!(status.code(), Some(0), "{}", p.stdout());
        let previews = texts_of(&p.stdout(), "preview");
        assert!(
            !previews.is_empty(),
            "{name}: no preview line:\n{}",
            p.stdout()
        );
        assert_golden(name, &golden_of(&server, &p));
        assert_clean(&server);
    }
}

#[tokio::test]
async fn ctrl_c_interrupts_the_submitted_prompt_and_exits_130() {
    let (server, mut p) = replay_submit("interrupt").await;
    p.wait_for("3/50 (6.0%)", 1).await;
    p.signal("-INT");
    let status = p.exited().await;
    assert_eq!(status.code(), Some(130), "{}", p.stdout());
    let out = p.stdout();
    assert!(out.contains("Ctrl+C: interrupting the prompt"), "{out}");
    assert_eq!(texts_of(&out, "interrupted").len(), 1, "{out}");
    let interrupts = server.interrupts();
    assert_eq!(interrupts.len(), 1, "{interrupts:?}");
    assert_clean(&server);
}

#[tokio::test]
async fn submit_against_the_simulator_shows_every_step_and_exits_0() {
    let sim = simulator(1).await;
    let mut wf = harness::workflow("ok");
    wf["2"]["inputs"]["steps"] = json!(20);
    let mut p = WatchProcess::submit(&sim.host(), &wf, &[]);
    let status = p.exited().await;
    let out = p.stdout();
    assert_eq!(status.code(), Some(0), "{out}");
    let steps = texts_of(&out, "progress");
    let expected: Vec<String> = (1..=20)
        .map(|i| {
            format!(
                "2 SlowSteps \"SlowSteps 10 x 0.1s\": {i}/20 ({:.1}%)",
                100.0 * f64::from(i) / 20.0
            )
        })
        .collect();
    let shown: Vec<String> = steps
        .iter()
        .map(|s| s.split(", ETA").next().unwrap().to_owned())
        .collect();
    assert_eq!(shown, expected, "{out}");
    assert!(
        steps[..19].iter().all(|s| s.contains(", ETA ")),
        "every step but the last has an ETA: {steps:?}"
    );
    let kinds: Vec<&str> = [
        "start",
        "executing",
        "executed",
        "success",
        "done",
        "result",
    ]
    .into_iter()
    .filter(|k| texts_of(&out, k).is_empty())
    .collect();
    assert!(kinds.is_empty(), "missing {kinds:?}:\n{out}");
    assert_eq!(
        texts_of(&out, "executed"),
        [
            "3 SaveImage \"Save 512x512\" → 1 image(s)",
            "5 SaveImage \"Save 256x256\" → 1 image(s)"
        ]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_ui_format_workflow_is_converted_and_runs() {
    let sim = simulator(1).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ui_workflows");
    let read = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let mut p = WatchProcess::submit(&sim.host(), &read("txt2img.json"), &[]);
    let status = p.exited().await;
    let out = p.stdout();
    assert_eq!(status.code(), Some(0), "{out}\n{}", p.stderr());
    // What ComfyUI was sent is the golden conversion, and it ran to its two images.
    let sent = sim.prompts().last().expect("a prompt")["prompt"].clone();
    assert_eq!(sent, read("txt2img.api.json"));
    assert_eq!(texts_of(&out, "executed").len(), 2, "{out}");
    assert!(
        texts_of(&out, "progress")
            .last()
            .is_some_and(|s| s.ends_with("10/10 (100.0%)")),
        "{out}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_socket_dropped_mid_prompt_is_reconnected_and_the_end_comes_from_history() {
    let sim = simulator(1).await;
    sim.drop_websockets_at(DropPoint::AfterStep(3));
    let mut wf = harness::workflow("ok");
    wf["2"]["inputs"]["steps"] = json!(8);
    let mut p = WatchProcess::submit(&sim.host(), &wf, &[]);
    let status = p.exited().await;
    let out = p.stdout();
    assert_eq!(status.code(), Some(0), "{out}");
    assert_eq!(sim.drops_fired(), 1);
    let notes = texts_of(&out, "watch");
    assert!(
        notes.iter().any(|n| n.starts_with("connection lost")),
        "{out}"
    );
    assert!(notes.iter().any(|n| n.starts_with("reconnected")), "{out}");
    // The new socket has a fresh client id: the prompt's later steps go to no one.
    let steps = texts_of(&out, "progress");
    assert!(
        !steps.is_empty() && steps.iter().all(|s| !s.contains(": 4/8 (")),
        "{out}"
    );
    let prompt_id = sim.prompts()[0]["prompt_id"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    assert_eq!(
        texts_of(&out, "result"),
        [format!(
            "success: prompt {prompt_id}, 2 output file(s) in /history"
        )]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_refused_workflow_prints_the_validation_errors_and_exits_1() {
    let sim = simulator(1).await;
    let mut p = WatchProcess::submit(&sim.host(), &harness::workflow("bad_node"), &[]);
    let status = p.exited().await;
    let out = p.stdout();
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(texts_of(&out, "refused"), ["Workflow validation failed:"]);
    assert!(
        out.contains("• Node 1 (EmptyImage): Value 0 smaller than min of 1: width"),
        "{out}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let sim = simulator(1).await;
    let mut p = WatchProcess::start(&sim.host(), &["--submit", "/nonexistent/wf.json"]);
    assert_eq!(p.exited().await.code(), Some(2));
    assert!(p.stderr().contains("cannot read"), "{}", p.stderr());
    let mut p = WatchProcess::start(&sim.host(), &["--bogus"]);
    assert_eq!(p.exited().await.code(), Some(2));
    sim.shutdown().await;
}

#[tokio::test]
async fn json_prints_every_frame_as_ndjson_with_binary_summaries() {
    let sim = simulator(1).await;
    let mut p = WatchProcess::submit(&sim.host(), &harness::workflow("preview"), &["--json"]);
    let status = p.exited().await;
    let out = p.stdout();
    assert_eq!(status.code(), Some(0), "{out}\n{}", p.stderr());
    let frames: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let kinds: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
    for k in [
        "status",
        "execution_start",
        "progress",
        "progress_state",
        "executed",
    ] {
        assert!(kinds.contains(&k), "no {k} frame: {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"executing"));
    let previews: Vec<&Value> = frames.iter().filter_map(|f| f.get("binary")).collect();
    assert!(!previews.is_empty(), "no binary frame summary:\n{out}");
    for b in previews {
        assert_eq!(b["format"], "jpeg", "{b}");
        assert!(b["bytes"].as_u64().unwrap() > 0, "{b}");
    }
    assert!(p.stderr().contains("success"), "{}", p.stderr());
    sim.shutdown().await;
}

/// Queues `workflow` without a client id, as a script or another tool might: ComfyUI then
/// broadcasts its events to every socket.
async fn queue_without_client_id(sim: &Simulator, workflow: &Value) -> String {
    let reply: Value = reqwest::Client::new()
        .post(format!("http://{}/prompt", sim.host()))
        .json(&json!({ "prompt": workflow }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["prompt_id"].as_str().expect("prompt_id").to_owned()
}

#[tokio::test]
async fn broadcasts_say_so_reconnect_and_exit_0_on_ctrl_c() {
    let sim = simulator(1).await;
    let mut p = WatchProcess::start(&sim.host(), &[]);
    p.wait_for("connected to ComfyUI", 1).await;
    let first = p.stdout();
    assert!(
        first
            .lines()
            .next()
            .unwrap()
            .contains("ComfyUI sends a prompt's events only to the client that queued it"),
        "{first}"
    );
    let mut wf = harness::workflow("ok");
    wf["2"]["inputs"]["steps"] = json!(4);
    assert!(!queue_without_client_id(&sim, &wf).await.is_empty());
    // Only its progress is broadcast (execution_start, executing, executed, success are sent
    // to no one when a prompt has no client id); class types and titles come from /queue.
    p.wait_for("4/4 (100.0%)", 1).await;
    let out = p.stdout();
    assert!(
        out.contains("progress    2 SlowSteps \"SlowSteps 10 x 0.1s\": 4/4 (100.0%)"),
        "{out}"
    );
    sim.drop_websockets();
    p.wait_for("connected to ComfyUI", 2).await;
    assert!(p.stdout().contains("reconnecting in"), "{}", p.stdout());
    p.signal("-INT");
    assert_eq!(p.exited().await.code(), Some(0));
    sim.shutdown().await;
}

#[test]
fn the_worker_logs_the_same_lines_at_debug_level_for_its_prompts() {
    let dir = crate::cli::job_dir();
    let out = crate::harness::clear_worker_env(&mut Command::new(bin()))
        .args([
            "run",
            "test_input.json",
            "--simulate",
            "--quiet",
            "--sim-step-ms",
            "1",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "comfy_worker=debug")
        .output()
        .expect("run comfy-worker");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let events: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("comfy event"))
        .collect();
    for i in 1..=25 {
        let step = format!(
            "event=progress 3 KSampler: {i}/25 ({:.1}%)",
            100.0 * f64::from(i) / 25.0
        );
        assert!(
            events.iter().any(|l| l.contains(&step)),
            "no {step:?} in the debug log:\n{stderr}"
        );
    }
    for line in [
        "event=start prompt ",
        "event=success prompt ",
        "event=executed 9 SaveImage \"Save Image\" → 1 image(s)",
    ] {
        assert!(
            events.iter().any(|l| l.contains(line)),
            "no {line:?} in the debug log:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("iVBORw0KGgo"),
        "base64 image data in the log"
    );
}
