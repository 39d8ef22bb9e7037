//! `docker/start.sh` outside Docker: it starts "ComfyUI" (here the simulator) in the background,
//! writes its PID file, and execs the worker, which waits for ComfyUI and runs test_input.json,
//! or, with `SERVE_API_LOCALLY=true`, serves the local endpoint.

use std::path::Path;
use std::process::{Command, Output};

use crate::cli::{bin, job_dir};

struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start(dir: &Path, comfy_cmd: &str, port: u16) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    Command::new("bash")
        .arg(script)
        .arg("--quiet")
        .current_dir(dir)
        .env("COMFYUI_START_CMD", comfy_cmd)
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", dir.join("comfyui.pid"))
        .env("COMFY_HOST", format!("127.0.0.1:{port}"))
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "20")
        .env("COMFY_API_AVAILABLE_MAX_RETRIES", "200")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .expect("run start.sh")
}

#[test]
fn start_script_launches_comfyui_and_runs_the_test_job() {
    let dir = job_dir();
    let port = free_port();
    let _guard = KillOnDrop(dir.path().join("comfyui.pid"));
    let out = start(
        dir.path(),
        // Its output goes to a file: an inherited stdout would keep the pipe open after the worker exits.
        &format!(
            "{} simulate-comfyui --port {port} --step-ms 1 >{} 2>&1",
            bin(),
            dir.path().join("comfyui.log").display()
        ),
        port,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pid: u32 = std::fs::read_to_string(dir.path().join("comfyui.pid"))
        .unwrap()
        .trim()
        .parse()
        .expect("a PID in the PID file");
    assert!(pid > 0);
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        output["images"].as_array().map(Vec::len),
        Some(1),
        "{output}"
    );
}

#[test]
fn a_comfyui_that_dies_at_start_fails_the_job_at_once() {
    let dir = job_dir();
    let port = free_port();
    // Nothing listens on the port: without the PID check the worker would give up only after
    // its retries, with a different message.
    let out = start(dir.path(), "bash -c 'exit 3'", port);
    assert_eq!(out.status.code(), Some(1));
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let err = output["error"].as_str().unwrap();
    assert!(err.contains("the ComfyUI process (pid"), "{err}");
    assert!(err.contains("has exited"), "{err}");
}

struct KillChild(std::process::Child);

impl Drop for KillChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serve_api_locally_starts_the_local_endpoint() {
    let dir = job_dir();
    let (comfy_port, api_port) = (free_port(), free_port());
    let _comfy = KillOnDrop(dir.path().join("comfyui.pid"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    let child = Command::new("bash")
        .arg(script)
        .current_dir(dir.path())
        .env(
            "COMFYUI_START_CMD",
            format!(
                "{} simulate-comfyui --port {comfy_port} --step-ms 1 >{} 2>&1",
                bin(),
                dir.path().join("comfyui.log").display()
            ),
        )
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", dir.path().join("comfyui.pid"))
        .env("COMFY_HOST", format!("127.0.0.1:{comfy_port}"))
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "20")
        .env("SERVE_API_LOCALLY", "true")
        .env("SERVE_API_PORT", api_port.to_string())
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env_remove("SERVE_API_KEY")
        .env("RUST_LOG", "comfy_worker=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .expect("run start.sh");
    let _worker = KillChild(child);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{api_port}");
    // Readiness: the endpoint answers once the worker has started (a client would retry too).
    let ready = async {
        loop {
            if let Ok(r) = http.get(format!("{base}/health")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(crate::harness::LIMIT, ready)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the endpoint never answered; worker log:\n{}",
                std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
            )
        });
    let job = std::fs::read_to_string(dir.path().join("test_input.json")).unwrap();
    let reply: serde_json::Value = http
        .post(format!("{base}/runsync?wait=60000"))
        .header("Content-Type", "application/json")
        .body(job)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["status"], "COMPLETED", "{reply}");
    assert_eq!(reply["output"]["images"].as_array().map(Vec::len), Some(1));
    // Without SERVE_API_KEY the endpoint on 0.0.0.0 runs with --insecure, and says so.
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(
        log.contains("WARNING: SERVE_API_KEY is not set"),
        "no warning in the log:\n{log}"
    );
}

/// A ComfyUI checkout whose "python" records the flags it is started with, then runs the
/// simulator; `cli_args` is the text of its `comfy/cli_args.py` (which flags it knows).
fn fake_comfyui(dir: &Path, port: u16, cli_args: &str) -> std::path::PathBuf {
    let comfy = dir.join("comfyui");
    std::fs::create_dir_all(comfy.join("comfy")).unwrap();
    std::fs::write(comfy.join("comfy/cli_args.py"), cli_args).unwrap();
    let python = dir.join("python");
    std::fs::write(
        &python,
        format!(
            "#!/usr/bin/env bash\necho \"$@\" > {args}\nexec {bin} simulate-comfyui --port {port} --step-ms 1 >{log} 2>&1\n",
            args = dir.join("comfy-args").display(),
            bin = bin(),
            log = dir.join("comfyui.log").display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    comfy
}

/// Runs start.sh with the fake ComfyUI and `env`; returns its stderr and ComfyUI's flags.
fn start_with_flags(dir: &Path, cli_args: &str, env: &[(&str, String)]) -> (String, String) {
    let port = free_port();
    let comfy = fake_comfyui(dir, port, cli_args);
    let _guard = KillOnDrop(dir.join("comfyui.pid"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    let mut command = Command::new("bash");
    command
        .arg(script)
        .arg("--quiet")
        .current_dir(dir)
        .env_remove("COMFYUI_START_CMD")
        .env_remove("COMFYUI_EXTRA_ARGS")
        .env_remove("COMFY_PREVIEW_METHOD")
        .env_remove("COMFY_DISABLE_ASSETS")
        .env_remove("COMFYUI_USER_DIR")
        .env("COMFYUI_DIR", &comfy)
        .env("COMFYUI_PYTHON", dir.join("python"))
        .env("NETWORK_VOLUME_DIR", dir.join("volume"))
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", dir.join("comfyui.pid"))
        .env("COMFY_HOST", format!("127.0.0.1:{port}"))
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "20")
        .env("COMFY_API_AVAILABLE_MAX_RETRIES", "200")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env("RUST_LOG", "comfy_worker=warn");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().expect("run start.sh");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let args = std::fs::read_to_string(dir.join("comfy-args")).unwrap_or_default();
    (stderr, args)
}

const KNOWS_DISABLE_ASSETS: &str =
    "parser.add_argument(\"--disable-assets\", action=\"store_true\")\n";

#[test]
fn a_user_folder_on_a_network_volume_starts_comfyui_without_assets() {
    // $COMFYUI_DIR/user is a link into the volume, as images that keep user data there have.
    let dir = job_dir();
    let shared = dir.path().join("volume/comfyui-user");
    std::fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, dir.path().join("user")).unwrap();
    let (stderr, args) = start_with_flags(
        dir.path(),
        KNOWS_DISABLE_ASSETS,
        &[
            (
                "COMFYUI_USER_DIR",
                dir.path().join("user").display().to_string(),
            ),
            ("COMFY_PREVIEW_METHOD", "latent2rgb".to_owned()),
        ],
    );
    assert!(args.contains("--disable-assets"), "{args}");
    assert!(args.contains("--preview-method latent2rgb"), "{args}");
    assert!(
        stderr.contains("ASSETS_STARTUP_FAILED"),
        "the why is logged: {stderr}"
    );
}

#[test]
fn a_local_user_folder_or_an_old_comfyui_keeps_the_default_flags() {
    // A user folder on the container's own disk: assets stay on, no previews asked for.
    let dir = job_dir();
    let (_, args) = start_with_flags(dir.path(), KNOWS_DISABLE_ASSETS, &[]);
    assert!(args.contains("--disable-auto-launch"), "{args}");
    assert!(!args.contains("--disable-assets"), "{args}");
    assert!(!args.contains("--preview-method"), "{args}");

    // ComfyUI 0.3.64 has no such flag (it would exit on it): not passed, and said why.
    let dir = job_dir();
    let (stderr, args) = start_with_flags(
        dir.path(),
        "parser.add_argument(\"--preview-method\")\n",
        &[(
            "COMFYUI_USER_DIR",
            dir.path().join("volume/user").display().to_string(),
        )],
    );
    assert!(!args.contains("--disable-assets"), "{args}");
    assert!(
        stderr.contains("no assets database to turn off"),
        "{stderr}"
    );
}

/// Every model folder on the network volume reaches ComfyUI (not only the base image's fixed
/// list): one more `--extra-model-paths-config`, naming each folder; a name that is not a plain
/// folder name is skipped and said.
#[test]
fn every_model_folder_on_the_network_volume_is_passed_to_comfyui() {
    let dir = job_dir();
    let models = dir.path().join("volume/models");
    for folder in ["checkpoints", "loras", "ipadapter", "odd name: x"] {
        std::fs::create_dir_all(models.join(folder)).unwrap();
    }
    std::fs::write(models.join("README.txt"), "not a folder").unwrap();
    let list = dir.path().join("volume-models.yaml");
    let (stderr, args) = start_with_flags(
        dir.path(),
        KNOWS_DISABLE_ASSETS,
        &[("COMFY_VOLUME_MODELS", list.display().to_string())],
    );
    assert!(
        args.contains(&format!("--extra-model-paths-config {}", list.display())),
        "{args}"
    );
    let yaml = std::fs::read_to_string(&list).unwrap();
    let lines: Vec<&str> = yaml.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "comfy_worker_network_volume:".to_owned(),
            format!("  base_path: '{}'", models.display()),
            "  checkpoints: 'checkpoints/'".to_owned(),
            "  ipadapter: 'ipadapter/'".to_owned(),
            "  loras: 'loras/'".to_owned(),
        ]
    );
    assert!(
        stderr.contains("ignoring the model folder 'odd name: x'"),
        "{stderr}"
    );

    // No models folder on the volume: no extra flag.
    let dir = job_dir();
    let (_, args) = start_with_flags(dir.path(), KNOWS_DISABLE_ASSETS, &[]);
    assert!(!args.contains("--extra-model-paths-config"), "{args}");
}

/// A port `p` with `p` and `p + 1` both free, below the ephemeral range other tests' port-0
/// listeners come from.
fn free_port_pair() -> u16 {
    let seed = std::process::id() as u16;
    (0..2000u16)
        .map(|k| 20000 + (seed.wrapping_add(k.wrapping_mul(7))) % 10000)
        .find(|&p| {
            let a = std::net::TcpListener::bind(("127.0.0.1", p));
            let b = std::net::TcpListener::bind(("127.0.0.1", p + 1));
            a.is_ok() && b.is_ok()
        })
        .expect("two free ports in a row")
}

/// `COMFY_INSTANCES=auto` with two visible GPUs: two ComfyUIs, each on its GPU, port, temp
/// folder and PID file, without the assets database they would share; the worker gets the
/// lists and runs the job.
#[test]
fn comfy_instances_auto_starts_one_comfyui_per_visible_gpu() {
    let dir = job_dir();
    let d = dir.path();
    let base = free_port_pair();
    let comfy = d.join("comfyui");
    std::fs::create_dir_all(comfy.join("comfy")).unwrap();
    std::fs::write(comfy.join("comfy/cli_args.py"), KNOWS_DISABLE_ASSETS).unwrap();
    let python = d.join("python");
    std::fs::write(
        &python,
        format!(
            "#!/usr/bin/env bash\nport=''; prev=''\nfor a in \"$@\"; do [ \"$prev\" = --port ] && port=\"$a\"; prev=\"$a\"; done\n\
             echo \"gpu=$CUDA_VISIBLE_DEVICES $*\" > {dir}/comfy-args-$port\n\
             exec {bin} simulate-comfyui --port \"$port\" --step-ms 1 >{dir}/comfyui-$port.log 2>&1\n",
            dir = d.display(),
            bin = bin(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _guards = [
        KillOnDrop(d.join("comfyui-0.pid")),
        KillOnDrop(d.join("comfyui-1.pid")),
    ];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--quiet")
        .current_dir(d)
        .env_remove("COMFYUI_START_CMD")
        .env_remove("COMFYUI_EXTRA_ARGS")
        .env_remove("COMFY_DISABLE_ASSETS")
        .env_remove("COMFY_HOST")
        .env_remove("COMFY_TEMP_DIR")
        .env("COMFYUI_DIR", &comfy)
        .env("COMFYUI_PYTHON", &python)
        .env("NETWORK_VOLUME_DIR", d.join("volume"))
        .env("COMFY_WORKER_BIN", bin())
        .env("COMFY_PID_FILE", d.join("comfyui.pid"))
        .env("COMFY_INSTANCES", "auto")
        .env("CUDA_VISIBLE_DEVICES", "3, 5")
        .env("COMFY_BASE_PORT", base.to_string())
        .env("COMFY_TEMP_BASE", d)
        .env("COMFY_API_AVAILABLE_INTERVAL_MS", "20")
        .env("COMFY_API_AVAILABLE_MAX_RETRIES", "200")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .env("RUST_LOG", "comfy_worker=warn")
        .output()
        .expect("run start.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let hosts = format!("127.0.0.1:{base},127.0.0.1:{}", base + 1);
    assert!(
        stderr.contains(&format!("2 ComfyUIs: COMFY_HOST={hosts}")),
        "{stderr}"
    );
    for (i, gpu) in [(0u16, "3"), (1, "5")] {
        let port = base + i;
        let args = std::fs::read_to_string(d.join(format!("comfy-args-{port}")))
            .unwrap_or_else(|_| panic!("ComfyUI {i} was not started: {stderr}"));
        assert!(args.starts_with(&format!("gpu={gpu} ")), "{args}");
        let temp = d.join(format!("comfyui-{i}"));
        for flag in [
            format!("--port {port}"),
            format!("--temp-directory {}", temp.display()),
            "--disable-assets".to_owned(),
        ] {
            assert!(
                args.contains(&flag),
                "ComfyUI {i}: {flag} missing in {args}"
            );
        }
        let pid: u32 = std::fs::read_to_string(d.join(format!("comfyui-{i}.pid")))
            .unwrap()
            .trim()
            .parse()
            .expect("a PID");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "ComfyUI {i} runs"
        );
    }
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        output["images"].as_array().map(Vec::len),
        Some(1),
        "{output}"
    );

    // A count that is not one: refused before anything starts.
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/start.sh"))
        .current_dir(d)
        .env("COMFY_INSTANCES", "two")
        .env("COMFY_WORKER_BIN", "/bin/false")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("COMFY_INSTANCES must be auto or a number")
    );
}
