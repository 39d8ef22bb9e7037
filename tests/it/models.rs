//! Models that arrive with the job (`input.models`): served by a local HTTP server (allowed by
//! the test's guard setting), downloaded once into the content-addressed cache and linked into
//! ComfyUI's model folder, reused by later jobs (by sha256 or by URL), shared by jobs asking at
//! once, refused on a wrong sha256 without leaving a file, evicted least recently used first,
//! and checked against the simulator's model lists before queueing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use comfy_sim::{SimConfig, Simulator};
use comfy_worker::config::{ModelPolicy, Settings};
use comfy_worker::job::input::ModelSpec;
use comfy_worker::job::model_store::ModelStore;
use comfy_worker::job::Engine;
use comfy_worker::progress::ProgressKind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::{self, error_text, images, run_job, spawn_job};

/// A model file server counting the requests per path.
struct ModelServer {
    addr: std::net::SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

fn model_bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn sha_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn serve_model(
    State(hits): State<Arc<Mutex<HashMap<String, usize>>>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    *hits.lock().unwrap().entry(name.clone()).or_default() += 1;
    let seed = name.bytes().fold(0u8, u8::wrapping_add);
    (StatusCode::OK, model_bytes(seed, 300_000)).into_response()
}

impl ModelServer {
    async fn start() -> ModelServer {
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let app = Router::new()
            .route("/{name}", get(serve_model))
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ModelServer { addr, hits }
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The bytes it serves for `name`.
    fn bytes(name: &str) -> Vec<u8> {
        model_bytes(name.bytes().fold(0u8, u8::wrapping_add), 300_000)
    }

    fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

fn policy(dir: &Path) -> ModelPolicy {
    ModelPolicy {
        models_dir: dir.join("models"),
        cache_dir: dir.join("cache"),
        ..ModelPolicy::default()
    }
}

async fn setup(dir: &Path) -> (Simulator, Engine) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(
        listener,
        SimConfig {
            step_delay: std::time::Duration::from_millis(1),
            models_dir: Some(dir.join("models")),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let mut settings: Settings = harness::settings(&sim.host());
    // The model server is on 127.0.0.1: allowed the way an operator allows an internal host.
    settings.inputs.allow_private = true;
    settings.models = policy(dir);
    (sim, Engine::new(settings).unwrap())
}

/// The bundled SDXL job with its checkpoint brought along.
fn job_with_model(ckpt: &str, models: Value) -> Value {
    let mut input = harness::test_input()["input"].clone();
    input["workflow"]["4"]["inputs"]["ckpt_name"] = json!(ckpt);
    input["models"] = models;
    input
}

#[tokio::test]
async fn a_model_is_downloaded_once_then_reused_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = ModelServer::start().await;
    let (sim, engine) = setup(dir.path()).await;
    let bytes = ModelServer::bytes("juggernaut.safetensors");
    let sha = sha_of(&bytes);
    let model = json!([{
        "url": server.url("juggernaut.safetensors"),
        "folder": "checkpoints",
        "name": "juggernaut.safetensors",
        "sha256": sha,
    }]);

    let (output, progress) = run_job(
        &engine,
        job_with_model("juggernaut.safetensors", model.clone()),
    )
    .await;
    assert_eq!(images(&output).len(), 1, "{}", output.to_json());
    assert_eq!(server.hits("juggernaut.safetensors"), 1);
    let installed = dir.path().join("models/checkpoints/juggernaut.safetensors");
    assert_eq!(std::fs::read(&installed).unwrap(), bytes);
    assert_eq!(
        std::fs::read(dir.path().join("cache/sha256").join(&sha)).unwrap(),
        bytes
    );
    let downloads: Vec<_> = progress
        .iter()
        .filter(|s| s.kind == ProgressKind::Downloading)
        .collect();
    assert!(!downloads.is_empty());
    let last = downloads.last().unwrap();
    assert_eq!((last.value.0, last.max.0), (300_000.0, 300_000.0));
    assert_eq!(last.step.as_deref(), Some("Downloading model"));
    let queued = progress
        .iter()
        .position(|s| s.kind == ProgressKind::Queued)
        .unwrap();
    assert!(
        progress
            .iter()
            .rposition(|s| s.kind == ProgressKind::Downloading)
            < Some(queued),
        "downloaded before the prompt was queued"
    );

    // A second job: nothing downloaded again.
    let (output, progress) =
        run_job(&engine, job_with_model("juggernaut.safetensors", model)).await;
    assert_eq!(images(&output).len(), 1, "{}", output.to_json());
    assert_eq!(server.hits("juggernaut.safetensors"), 1);
    assert!(progress.iter().all(|s| s.kind != ProgressKind::Downloading));

    // The same URL under another name, without a sha256: found by its URL, linked again.
    let (output, _) = run_job(
        &engine,
        job_with_model(
            "copy.safetensors",
            json!([{"url": server.url("juggernaut.safetensors"), "folder": "checkpoints", "name": "copy.safetensors"}]),
        ),
    )
    .await;
    assert_eq!(images(&output).len(), 1, "{}", output.to_json());
    assert_eq!(server.hits("juggernaut.safetensors"), 1);
    assert_eq!(
        std::fs::read(dir.path().join("models/checkpoints/copy.safetensors")).unwrap(),
        bytes
    );
    assert_eq!(sim.prompts().len(), 3);
}

#[tokio::test]
async fn a_wrong_sha256_fails_clearly_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = ModelServer::start().await;
    let (sim, engine) = setup(dir.path()).await;
    let wrong = "0".repeat(64);
    let (output, _) = run_job(
        &engine,
        job_with_model(
            "bad.safetensors",
            json!([{"url": server.url("bad.safetensors"), "folder": "checkpoints", "name": "bad.safetensors", "sha256": wrong}]),
        ),
    )
    .await;
    let err = error_text(&output);
    let actual = sha_of(&ModelServer::bytes("bad.safetensors"));
    assert!(
        err.contains(&format!("model bad.safetensors: sha256 mismatch: the job says {wrong}, the file from {} is {actual}; nothing was installed", server.url("bad.safetensors"))),
        "{err}"
    );
    assert!(!dir
        .path()
        .join("models/checkpoints/bad.safetensors")
        .exists());
    for sub in ["sha256", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join("cache").join(sub))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    assert!(sim.prompts().is_empty(), "nothing was queued");
}

#[tokio::test]
async fn jobs_asking_at_once_share_one_download() {
    let dir = tempfile::tempdir().unwrap();
    let server = ModelServer::start().await;
    let (_sim, engine) = setup(dir.path()).await;
    let model = json!([{"url": server.url("shared.safetensors"), "folder": "loras", "name": "shared.safetensors"}]);
    let mut input = json!({"workflow": harness::workflow("ok"), "models": model});
    let first = spawn_job(&engine, input.clone());
    input["workflow"]["1"]["inputs"]["color"] = json!(3);
    let second = spawn_job(&engine, input);
    let (a, _) = first.finish().await;
    let (b, _) = second.finish().await;
    assert_eq!((images(&a).len(), images(&b).len()), (2, 2));
    assert_eq!(server.hits("shared.safetensors"), 1);
}

#[tokio::test]
async fn a_url_the_guard_refuses_fails_before_anything_is_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let server = ModelServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::start(listener, SimConfig::default())
        .await
        .unwrap();
    let mut settings = harness::settings(&sim.host());
    settings.models = policy(dir.path());
    let engine = Engine::new(settings).unwrap();
    let input = json!({"workflow": harness::workflow("ok"), "models": [{"url": server.url("x.safetensors"), "folder": "loras", "name": "x.safetensors"}]});
    let (output, _) = run_job(&engine, input).await;
    let err = error_text(&output);
    assert!(err.contains("refused"), "{err}");
    assert_eq!(server.hits("x.safetensors"), 0);
    assert!(sim.prompts().is_empty());
}

#[tokio::test]
async fn the_cache_drops_the_least_recently_used_model_and_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let server = ModelServer::start().await;
    let inputs = comfy_worker::config::InputPolicy {
        allow_private: true,
        ..Default::default()
    };
    // Room for two of the 300 kB models.
    let store = ModelStore::new(
        &ModelPolicy {
            cache_max_bytes: 700_000,
            ..policy(dir.path())
        },
        &inputs,
    );
    let spec = |name: &str| ModelSpec {
        url: server.url(name),
        folder: "loras".into(),
        name: name.into(),
        sha256: None,
    };
    // No bucket: these models come by URL.
    let storage = comfy_worker::job::Storage::new(Default::default())
        .for_job("j", None)
        .await
        .unwrap();
    for name in ["a.safetensors", "b.safetensors", "c.safetensors"] {
        assert!(store
            .ensure(&spec(name), &storage, &mut |_, _| {})
            .await
            .unwrap());
    }
    let loras = dir.path().join("models/loras");
    assert!(!loras.join("a.safetensors").exists(), "the oldest is gone");
    assert!(loras.join("b.safetensors").exists() && loras.join("c.safetensors").exists());
    let cached = std::fs::read_dir(dir.path().join("cache/sha256"))
        .unwrap()
        .count();
    assert_eq!(cached, 2);
    // Asked for again, it comes back.
    assert!(store
        .ensure(&spec("a.safetensors"), &storage, &mut |_, _| {})
        .await
        .unwrap());
    assert_eq!(server.hits("a.safetensors"), 2);
}
