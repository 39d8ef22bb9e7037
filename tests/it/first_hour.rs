//! A new user's first hour, through the real binary: no silent waits, addresses checked before
//! any connect, one `--comfy` flag and one exit-code table, no panic on a closed pipe, `run`
//! taking what users have (bare API and UI workflows; outputs to a folder on a terminal),
//! progress said once and within 80 columns, a `/health` that tells the truth, and a local
//! RunPod loop (`serve --workers external` with `worker --platform`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::{bin, job_dir};
use crate::faults::ComfyProcess;
use crate::harness::{clear_worker_env, png_size, LIMIT};
use crate::serve::Events;
use crate::serve_process::ServeProcess;
use crate::worker_process::simulator;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary with a clean environment, run in `dir`.
fn worker_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(bin());
    clear_worker_env(&mut cmd);
    cmd.current_dir(dir).stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run comfy-worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON reply to `request`.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// An address that refuses connections, reserved for as long as the guard lives: a socket
/// bound to it that does not listen (a port merely freed could be taken by a concurrent test).
fn refusing() -> (String, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (
        format!("127.0.0.1:{}", socket.local_addr().unwrap().port()),
        socket,
    )
}

/// `run` against an address that refuses connections: the first line on stderr says it waits
/// (long before the end), and the job fails within the documented default of 10 s, with the
/// start script's PID file (naming a live process) ignored because the address came from the
/// command line.
#[test]
fn run_against_a_refusing_address_says_it_waits_and_gives_up_in_10_s() {
    let dir = job_dir();
    let pid_file = dir.path().join("comfyui.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    let (address, _reserved) = refusing();
    let started = Instant::now();
    let mut child = worker_cmd(dir.path())
        .args(["run", "test_input.json", "--comfy", &address])
        .env("COMFY_PID_FILE", &pid_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let first_at = started.elapsed();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let took = started.elapsed();
    assert_eq!(
        first.trim_end(),
        format!("waiting for ComfyUI at {address} (connection refused; up to 10 s)")
    );
    assert_eq!(status.code(), Some(1), "{first}{rest}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "the documented 10 s, not the PID file's unlimited wait: {took:?}"
    );
    assert!(
        took - first_at > Duration::from_secs(5),
        "the wait was said at its start ({first_at:?} of {took:?})"
    );
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        out["error"],
        format!(
            "ComfyUI server ({address}) not reachable after 10 s (COMFY_READY_TIMEOUT_S). Last error: connection refused"
        )
    );
    assert!(!rest.contains("panicked"), "{rest}");
}

/// The start script's PID file counts when the address is the container's own (COMFY_HOST, not
/// a flag): then the wait lasts while that process lives, and says so. COMFY_READY_TIMEOUT_S
/// bounds the other case.
#[test]
fn the_pid_file_counts_only_for_the_containers_own_comfyui() {
    let dir = job_dir();
    let pid_file = dir.path().join("comfyui.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    let (address, _reserved) = refusing();
    let mut child = worker_cmd(dir.path())
        .args(["run", "test_input.json"])
        .env("COMFY_HOST", &address)
        .env("COMFY_PID_FILE", &pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        first.trim_end(),
        format!(
            "waiting for ComfyUI at {address} (connection refused; its process {} is starting)",
            std::process::id()
        )
    );

    let started = Instant::now();
    let out = output(
        worker_cmd(dir.path())
            .args(["run", "test_input.json", "--comfy", &address])
            .env("COMFY_READY_TIMEOUT_S", "1"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(
        text(&out.stderr).contains("up to 1 s"),
        "{}",
        text(&out.stderr)
    );
}

/// Bad addresses are usage errors (exit 2) on every subcommand, before anything connects,
/// naming where they came from: the flag, or COMFY_HOST.
#[test]
fn addresses_are_checked_before_any_connect() {
    let dir = job_dir();
    std::fs::copy(
        repo().join("tests/fixtures/ui_workflows/note.json"),
        dir.path().join("ui.json"),
    )
    .unwrap();
    let commands: &[&[&str]] = &[
        &["run", "test_input.json"],
        &["health"],
        &["watch"],
        &["convert", "ui.json"],
        &["serve", "--port", "0"],
        &["worker", "--platform", "http://127.0.0.1:9"],
    ];
    for command in commands {
        for bad in ["127.0.0.1:99999", "ftp://x:1", "http://", "localhost"] {
            let out = output(worker_cmd(dir.path()).args(*command).args(["--comfy", bad]));
            let err = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command:?} --comfy {bad}: {err}"
            );
            assert!(err.contains("--comfy <ADDR>"), "{command:?} {bad}: {err}");

            let started = Instant::now();
            let out = output(worker_cmd(dir.path()).args(*command).env("COMFY_HOST", bad));
            let err = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command:?} COMFY_HOST={bad}: {err}"
            );
            assert!(err.contains("COMFY_HOST"), "{command:?} {bad}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{command:?} {bad}"
            );
        }
    }
    let out = output(worker_cmd(dir.path()).args(["run", "--comfy", "localhost"]));
    assert!(
        text(&out.stderr).contains("so write localhost:8188"),
        "{}",
        text(&out.stderr)
    );
}

/// One flag, one default shown one way, one exit-code table, in every `--help`; a file and
/// `--test_input` together are a usage error.
#[test]
fn every_help_shows_the_same_comfy_flag_and_the_exit_codes() {
    let mut lines = Vec::new();
    for sub in [
        "run", "worker", "serve", "lambda", "health", "watch", "convert",
    ] {
        let out = output(worker_cmd(repo()).args([sub, "--help"]));
        assert_eq!(out.status.code(), Some(0), "{sub}");
        let help = text(&out.stdout);
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let start = flat
            .find("--comfy <ADDR>")
            .unwrap_or_else(|| panic!("{sub}: {help}"));
        let end = start + flat[start..].find("[alias: --comfy-host]").unwrap();
        lines.push(flat[start..end].to_owned());
        for code in ["0 ", "1 ", "2 ", "130 ", "141 "] {
            assert!(
                help.lines()
                    .skip_while(|l| !l.starts_with("Exit codes"))
                    .any(|l| l.trim_start().starts_with(code)),
                "{sub}: exit code {code}missing:\n{help}"
            );
        }
    }
    assert!(lines.windows(2).all(|w| w[0] == w[1]), "{lines:#?}");
    assert!(
        lines[0].contains("[default: 127.0.0.1:8188]"),
        "{}",
        lines[0]
    );

    let out = output(worker_cmd(repo()).args([
        "run",
        "test_input.json",
        "--test_input",
        r#"{"input": {}}"#,
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        text(&out.stderr)
    );
}

/// A pipe whose reader is already gone: whatever the command writes there fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

/// A closed stdout ends each command quietly with 141 (a shell's status for SIGPIPE); a closed
/// stderr changes nothing.
#[tokio::test]
async fn a_closed_pipe_ends_commands_quietly() {
    let sim = simulator(1).await;
    let dir = job_dir();
    std::fs::copy(
        repo().join("tests/fixtures/ui_workflows/note.json"),
        dir.path().join("ui.json"),
    )
    .unwrap();
    let object_info = repo().join("crates/comfy-sim/assets/object_info.json");
    let host = sim.host();
    let commands: Vec<Vec<String>> = vec![
        vec![
            "run",
            "test_input.json",
            "--simulate",
            "--sim-step-ms",
            "1",
            "-q",
        ],
        vec!["health", "--json", "--comfy", &host],
        vec![
            "convert",
            "ui.json",
            "--object-info",
            object_info.to_str().unwrap(),
        ],
        vec!["watch", "--comfy", &host, "--submit", "test_input.json"],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(str::to_owned).collect())
    .collect();
    for command in &commands {
        let dir = dir.path().to_owned();
        let args = command.clone();
        let out = tokio::task::spawn_blocking(move || {
            worker_cmd(&dir)
                .args(&args)
                .stdout(closed_pipe())
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{command:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "{command:?}: {err}");
    }
    // clap prints the help itself: quietly too.
    let out = output(worker_cmd(dir.path()).arg("--help").stdout(closed_pipe()));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );

    let out = output(
        worker_cmd(dir.path())
            .args(["run", "test_input.json", "--simulate", "--sim-step-ms", "1"])
            .stdout(Stdio::null())
            .stderr(closed_pipe()),
    );
    assert_eq!(out.status.code(), Some(0), "a closed stderr is no failure");
}

/// An output folder that cannot be written is a usage error before the job runs.
#[test]
fn an_unwritable_output_dir_is_refused_before_the_job_runs() {
    let dir = job_dir();
    std::fs::write(dir.path().join("a-file"), b"").unwrap();
    let out = output(worker_cmd(dir.path()).args([
        "run",
        "test_input.json",
        "--simulate",
        "--sim-step-ms",
        "1",
        "--output-dir",
        "a-file/outputs",
    ]));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--output-dir: cannot create a-file/outputs"),
        "{err}"
    );
    assert!(!err.contains("Sampling"), "nothing ran: {err}");
}

/// `run` takes a workflow as "Save (API Format)" writes it, and as the plain "Save" does.
#[test]
fn run_takes_bare_api_and_ui_workflows() {
    let dir = job_dir();
    let job: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("test_input.json")).unwrap())
            .unwrap();
    std::fs::write(
        dir.path().join("api.json"),
        serde_json::to_string(&job["input"]["workflow"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/ui_workflows/load_image.json"),
        dir.path().join("ui.json"),
    )
    .unwrap();
    for file in ["api.json", "ui.json"] {
        let out = output(worker_cmd(dir.path()).args([
            "run",
            file,
            "--simulate",
            "--sim-step-ms",
            "1",
            "--json",
            "-q",
        ]));
        let stdout = text(&out.stdout);
        let result: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{file}: {e}: {stdout}{}", text(&out.stderr)));
        if file == "api.json" {
            assert_eq!(out.status.code(), Some(0), "{file}: {result}");
            let png = result["images"][0]["data"].as_str().unwrap();
            assert_eq!(png_size(png), (1024, 1024));
        } else {
            // The UI workflow was converted and queued: ComfyUI itself judged it (the fixture
            // loads an image the simulator does not have).
            let error = result["error"].as_str().unwrap_or_default();
            assert!(
                out.status.code() == Some(0) || error.contains("Workflow validation failed"),
                "{file}: {result}"
            );
        }
    }
}

/// On a terminal, `run` writes the outputs to ./outputs/<job id>/ and prints one line.
#[test]
fn on_a_terminal_run_writes_the_outputs_to_a_folder() {
    let dir = job_dir();
    let command = format!("{} run test_input.json --simulate --sim-step-ms 1", bin());
    let out = output(
        Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .current_dir(dir.path())
            .env_remove("COMFY_HOST")
            .stdin(Stdio::null()),
    );
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        !shown.contains("iVBORw0KGgo"),
        "no base64 on a terminal: {shown}"
    );
    // The bar redraws in place; the summary follows its last erase.
    let from = shown
        .rfind("completed in ")
        .unwrap_or_else(|| panic!("{shown}"));
    let summary = shown[from..].lines().next().unwrap();
    let path = summary
        .split(": ")
        .nth(1)
        .unwrap_or_else(|| panic!("{summary}"))
        .trim();
    assert!(
        path.starts_with("outputs/run-") && path.ends_with("/ComfyUI_00001_.png"),
        "{summary}"
    );
    let bytes = std::fs::read(dir.path().join(path)).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "{summary}");
}

/// Progress: `queued` said once; plain lines within 80 columns, both percentages labelled; the
/// JSON lines use /status's vocabulary.
#[test]
fn progress_says_queued_once_and_fits_80_columns() {
    let dir = job_dir();
    let out = output(worker_cmd(dir.path()).args([
        "run",
        "test_input.json",
        "--simulate",
        "--sim-step-ms",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(0));
    let lines = text(&out.stderr);
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.ends_with("· queued")).count(),
        1,
        "{lines:#?}"
    );
    for l in &lines {
        assert!(l.chars().count() <= 80, "{l}");
        assert!(l.starts_with("job "), "{l}");
    }
    let sampling = lines
        .iter()
        .find(|l| l.contains("Sampling #3 12/25"))
        .unwrap();
    assert!(
        sampling.contains("% · Sampling") && sampling.contains("node 48%"),
        "{sampling}"
    );

    let out = output(worker_cmd(dir.path()).args([
        "run",
        "test_input.json",
        "--simulate",
        "--sim-step-ms",
        "1",
        "--json-progress",
    ]));
    let events: Vec<Value> = text(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.iter().filter(|e| e["type"] == "queued").count(), 1);
    let step = events.iter().find(|e| e["type"] == "progress").unwrap();
    assert_eq!(
        (step["step"].clone(), step["value"].clone()),
        (json!("Sampling"), json!(1))
    );
}

/// `serve`'s /health is 503 "degraded" while its ComfyUI does not answer, and a job submitted
/// meanwhile says it waits for ComfyUI; once ComfyUI answers, /health is 200 and the job runs.
#[tokio::test]
async fn serve_health_tells_the_truth_about_comfyui() {
    let (address, reserved) = refusing();
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    let serve =
        ServeProcess::start(&["--comfy", &address], &[("COMFY_READY_TIMEOUT_S", "120")]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let health = http
        .get(format!("{}/health", serve.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["comfyui"]["reachable"], false, "{body}");

    let reply = json_of(
        http.post(format!("{}/run", serve.base())).json(
            &serde_json::from_str::<Value>(
                &std::fs::read_to_string(repo().join("test_input.json")).unwrap(),
            )
            .unwrap(),
        ),
    )
    .await;
    let id = reply["id"].as_str().unwrap().to_owned();
    let mut events = Events::at(&http, &format!("{}/events/{id}", serve.base())).await;
    let waiting = loop {
        let (name, body) = events
            .next()
            .await
            .expect("the stream goes on while it waits");
        // The wait may have begun before the subscription: then the first status carries it.
        match name.as_str() {
            "progress" => break body,
            "status" if body["output"]["type"] == "waiting" => break body["output"].clone(),
            _ => {}
        }
    };
    assert_eq!(waiting["type"], "waiting", "{waiting}");
    assert_eq!(
        waiting["message"],
        format!("waiting for ComfyUI at {address} (connection refused; up to 120 s)"),
        "{waiting}"
    );
    let status = json_of(http.get(format!("{}/status/{id}", serve.base()))).await;
    assert_eq!(status["output"]["type"], "waiting", "{status}");

    drop(reserved);
    let _comfy = ComfyProcess::start(port, 1).await;
    let health = http
        .get(format!("{}/health", serve.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let rest = events.rest().await;
    let last = &rest.last().unwrap().1;
    assert_eq!(last["status"], "COMPLETED", "{last}");
}

/// The local RunPod loop: `serve --workers external` as the platform, two `worker --platform`
/// processes against one ComfyUI; 20 jobs submitted with /run all complete, each taken once,
/// with live progress on the job's stream (queued said once).
#[tokio::test]
async fn two_workers_drain_one_local_queue() {
    let sim = simulator(2).await;
    let serve = ServeProcess::start(&["--workers", "external"], &[]).await;
    let mut workers = Vec::new();
    let logs = tempfile::tempdir().unwrap();
    for n in 0..2 {
        let log = logs.path().join(format!("worker-{n}.log"));
        let child = worker_cmd(logs.path())
            .args([
                "worker",
                "--platform",
                &serve.base(),
                "--comfy",
                &sim.host(),
            ])
            .env("RUNPOD_POD_ID", format!("w{n}"))
            .env("RUNPOD_RESULT_SPOOL_DIR", "off")
            .env("RUST_LOG", "comfy_worker=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        workers.push(KillOnDrop(child));
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut ids = Vec::new();
    for n in 0..20u64 {
        let job = crate::serve::job(0x100000 + n, 4);
        let reply = json_of(http.post(format!("{}/run", serve.base())).json(&job)).await;
        ids.push(reply["id"].as_str().unwrap().to_owned());
    }
    let events = Events::at(&http, &format!("{}/events/{}", serve.base(), ids[19])).await;
    let streamed = tokio::time::timeout(LIMIT * 2, events.rest())
        .await
        .unwrap();
    let progress: Vec<&Value> = streamed
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, b)| b)
        .collect();
    // Queued is said once, then only when the place in ComfyUI's queue (shared by both
    // workers) moves.
    let places: Vec<u64> = progress
        .iter()
        .filter(|p| p["type"] == "queued")
        .map(|p| p["queue_position"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        !places.is_empty() && places.windows(2).all(|w| w[0] > w[1]),
        "{places:?}"
    );
    let steps: Vec<u64> = progress
        .iter()
        .filter(|p| p["type"] == "progress")
        .map(|p| p["value"].as_u64().unwrap())
        .collect();
    assert!(
        !steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]) && steps.last() == Some(&4),
        "sampler steps relayed live by the worker: {steps:?}"
    );

    let mut by_worker = std::collections::HashMap::<String, usize>::new();
    for id in &ids {
        let stream = Events::at(&http, &format!("{}/events/{id}", serve.base())).await;
        let body = stream.rest().await.pop().expect("a final status").1;
        assert_eq!(body["status"], "COMPLETED", "{body}");
        assert_eq!(
            png_size(body["output"]["images"][0]["data"].as_str().unwrap()),
            (512, 512)
        );
        *by_worker
            .entry(body["workerId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<usize>(), 20, "{by_worker:?}");
    assert_eq!(by_worker.len(), 2, "both workers took jobs: {by_worker:?}");
    // Each job ran once: every id appears in exactly one worker's log as finished.
    let finished: Vec<String> = (0..2)
        .map(|n| std::fs::read_to_string(logs.path().join(format!("worker-{n}.log"))).unwrap())
        .collect();
    for id in &ids {
        let runs: usize = finished
            .iter()
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains(id.as_str()) && l.contains("job finished"))
                    .count()
            })
            .sum();
        assert_eq!(runs, 1, "{id} ran {runs} times");
    }
    let health = json_of(http.get(format!("{}/health", serve.base()))).await;
    assert_eq!(health["jobs"]["completed"], 20, "{health}");
    assert_eq!(health["workers"]["idle"], 2, "{health}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `health`, `watch` and `convert` against an address that refuses: each ends on its own,
/// quickly, with 1 and a sentence naming the address.
#[test]
fn health_watch_and_convert_fail_fast_on_a_refusing_address() {
    let dir = job_dir();
    std::fs::copy(
        repo().join("tests/fixtures/ui_workflows/note.json"),
        dir.path().join("ui.json"),
    )
    .unwrap();
    let (address, _reserved) = refusing();
    let commands: &[&[&str]] = &[&["health"], &["watch"], &["convert", "ui.json"]];
    for command in commands {
        let started = Instant::now();
        let out = output(
            worker_cmd(dir.path())
                .args(*command)
                .args(["--comfy", &address])
                .env("COMFY_READY_TIMEOUT_S", "1"),
        );
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{command:?}: {all}");
        assert!(all.contains(&address), "{command:?}: {all}");
        assert!(!all.contains("panicked"), "{command:?}: {all}");
        assert!(started.elapsed() < Duration::from_secs(10), "{command:?}");
    }
}

/// A failure is said once: `run`'s JSON holds it and stderr does not repeat it; `serve` says
/// why it cannot start in one line; a job's log lines name the job once.
#[tokio::test]
async fn errors_are_said_once_and_log_lines_name_the_job_once() {
    let dir = job_dir();
    let bad = r#"{"input": {"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}}"#;
    let out = output(worker_cmd(dir.path()).args([
        "run",
        "--simulate",
        "--sim-step-ms",
        "1",
        "--test_input",
        bad,
    ]));
    assert_eq!(out.status.code(), Some(1));
    let result: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(result["error"]
        .as_str()
        .unwrap()
        .contains("NoSuchNode does not exist"));
    let err = text(&out.stderr);
    assert!(
        !err.contains("NoSuchNode"),
        "the output JSON says it, stderr does not: {err}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = output(worker_cmd(dir.path()).args(["serve", "--port", &port]));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("cannot listen on").count(), 1, "{err}");

    let serve = ServeProcess::start(&["--simulate", "--sim-step-ms", "1"], &[]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let reply = json_of(
        http.post(format!("{}/runsync", serve.base()))
            .json(&serde_json::from_str::<Value>(bad).unwrap()),
    )
    .await;
    assert_eq!(reply["status"], "FAILED", "{reply}");
    let id = reply["id"].as_str().unwrap();
    serve.wait_log("job ended").await;
    let log = serve.log();
    let job_lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
    assert!(job_lines.len() >= 3, "{log}");
    for line in job_lines {
        assert_eq!(line.matches(id).count(), 1, "the job named once: {line}");
        assert_eq!(
            line.matches("job{").count(),
            line.contains("job{") as usize,
            "{line}"
        );
    }
}
