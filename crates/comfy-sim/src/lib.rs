//! A fake ComfyUI 0.3.64 server that speaks the real protocol: the HTTP API, the `/ws` WebSocket with its
//! message order and routing, validation with the real error bodies, a classic output cache, and simulated
//! node execution that produces real PNG files. It needs no GPU and no models.
//!
//! It serves two purposes: `comfy-worker simulate-comfyui` / `run --simulate` let newcomers see the whole
//! flow, and integration tests run it in-process on `127.0.0.1:0` with deterministic hooks
//! ([`Simulator::pause_after_step`], [`Simulator::drop_websockets`], ...).
//!
//! It is a crate of its own so the worker library carries no fake ComfyUI: `comfy-worker` depends on it
//! only through its `simulator` cargo feature (on by default; the commands above), and its tests and
//! benchmarks as a dev-dependency. The crate knows nothing of the worker.
//!
//! # Layout
//! * `http`: the routes (also under `/api`), the Origin check and the body limit.
//! * `ws`: `/ws` and the socket registry that routes messages by client id.
//! * `graph`: `POST /prompt` validation (`validate_prompt` / `validate_inputs`).
//! * `exec`: the single prompt worker: queue, cache, execution order and message emission.
//! * `nodes`: what each simulated node class does with its inputs.
//! * `store`: files, queue and history.
//! * `profile`: which ComfyUI it plays (`0.3.64`, or `current`: today's, from its source).
//! * `jobs`: the jobs API of the `current` profile (`/api/jobs…`).
//! * `catalog`: the recorded `object_info` with model names added.
//! * `image`: PNG/JPEG bytes and tensor text.
//! * `media`: VIDEO/AUDIO values and the container bytes the video, audio and latent save nodes write.
//! * `pyfmt`: Python-style JSON and `str()`/`repr()` text.

mod catalog;
mod exec;
mod graph;
mod http;
mod image;
mod jobs;
mod media;
mod nodes;
mod profile;
mod prompt_run;
mod pyfmt;
mod reply;
mod store;
mod ws;

#[cfg(test)]
mod current_tests;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use profile::{Profile, UnknownProfile, CURRENT_VERSION};

use catalog::Catalog;
use store::{Folder, Store};
use ws::Hub;

/// How the simulated server behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Time per sampler step for every node that has an INT `steps` input.
    pub step_delay: Duration,
    /// Save images with pseudo-random pixels, so PNG sizes are realistic (benchmarks); default off.
    pub noise_images: bool,
    /// When set, uploaded inputs are also written to this directory (`<dir>/<subfolder>/<name>`),
    /// as ComfyUI's input folder holds them. Files stay served from memory.
    pub input_dir: Option<PathBuf>,
    /// When set, output files are also written here (`<dir>/<subfolder>/<name>`).
    pub output_dir: Option<PathBuf>,
    /// When set, temp files (previews) are also written here.
    pub temp_dir: Option<PathBuf>,
    /// Which ComfyUI to play (default 0.3.64).
    pub profile: Profile,
    /// When set, ComfyUI's model folder: the files in its `checkpoints/`, `loras/`, `vae/`, …
    /// are offered in the loaders' lists (`/object_info`) and accepted by validation.
    pub models_dir: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            step_delay: Duration::from_millis(50),
            noise_images: false,
            input_dir: None,
            output_dir: None,
            temp_dir: None,
            profile: Profile::default(),
            models_dir: None,
        }
    }
}

/// A running simulated ComfyUI server. Dropping it or calling [`Simulator::shutdown`] stops it.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The HTTP server and the prompt worker, awaited by `shutdown`.
    tasks: Vec<JoinHandle<()>>,
}

impl Simulator {
    /// Serve on an already-bound listener (tests pass `127.0.0.1:0`).
    pub async fn start(listener: TcpListener, config: SimConfig) -> std::io::Result<Simulator> {
        let addr = listener.local_addr()?;
        let catalog = Catalog::load().map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared::new(config, catalog));
        {
            let config = &shared.config;
            let mut store = lock(&shared.store);
            for (folder, dir) in [
                (Folder::Input, &config.input_dir),
                (Folder::Output, &config.output_dir),
                (Folder::Temp, &config.temp_dir),
            ] {
                if let Some(dir) = dir {
                    std::fs::create_dir_all(dir)?;
                    store.files.mirror_to_disk(folder, dir.clone());
                }
            }
        }
        // Like a fresh ComfyUI checkout, the input folder holds `example.png`.
        let example = image::encode_png(&image::ImageInfo::gradient(64, 64, 1), &[])
            .map_err(std::io::Error::other)?;
        lock(&shared.store)
            .files
            .put(Folder::Input, "example.png", example.into());

        let app = http::router(shared.clone());
        let stop = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            // No Nagle delay: responses written in two parts would otherwise wait for the
            // client's delayed ACK (~40 ms on loopback), which no real ComfyUI shows.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "simulated ComfyUI server failed");
            }
        });
        let worker = tokio::spawn(exec::run(shared.clone()));
        tracing::info!(%addr, "simulated ComfyUI listening");
        Ok(Simulator {
            addr,
            shared,
            tasks: vec![server, worker],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"127.0.0.1:PORT"`, the form `COMFY_HOST` takes.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stop serving and wait for the server and the prompt worker to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    /// Abruptly close every open WebSocket connection (TCP dropped, no close handshake).
    /// New connections still work.
    pub fn drop_websockets(&self) {
        self.shared.hub.drop_all();
    }

    /// Arm a one-shot breakpoint that drops every WebSocket (as [`Simulator::drop_websockets`]) when the
    /// simulator reaches `point`, for fault-injection tests that need a drop at an exact moment without
    /// sleeping. Several points may be armed at once; each fires once, then is disarmed.
    pub fn drop_websockets_at(&self, point: DropPoint) {
        lock(&self.shared.control.drops).push(point);
    }

    /// The drop points armed with [`Simulator::drop_websockets_at`] that have not fired yet.
    pub fn armed_drops(&self) -> Vec<DropPoint> {
        lock(&self.shared.control.drops).clone()
    }

    /// How many armed drop points have fired so far.
    pub fn drops_fired(&self) -> usize {
        lock(&self.shared.log).drops_fired
    }

    /// Prompts queued or running now (`exec_info.queue_remaining`); 0 when ComfyUI is idle.
    pub fn queue_remaining(&self) -> usize {
        lock(&self.shared.store).queue.remaining()
    }

    /// While true, sockets stay open but receive nothing (the known zombie-socket bug); HTTP keeps working.
    /// Messages sent meanwhile are lost, not delayed.
    pub fn set_websockets_silent(&self, silent: bool) {
        self.shared.hub.set_silent(silent);
    }

    /// Arm a breakpoint: the executor stops right after emitting sampler step `step` (of the next node with
    /// steps that reaches it) and waits until [`Simulator::resume`]. [`Simulator::paused`] returns once it is
    /// stopped there.
    pub fn pause_after_step(&self, step: u32) {
        self.shared.control.pause.send_replace(Pause::Armed(step));
    }

    /// Wait until the executor is stopped at the armed breakpoint.
    pub async fn paused(&self) {
        let mut rx = self.shared.control.pause.subscribe();
        let _ = rx.wait_for(|p| *p == Pause::Paused).await;
    }

    /// Arm a breakpoint between a prompt's terminal message (`execution_success`, `execution_error`,
    /// `execution_interrupted`) and its history write: until [`Simulator::release_history`],
    /// `/history/{id}` is `{}` and the jobs API says `in_progress`, as in ComfyUI's race window
    /// (its issue #11540). [`Simulator::history_held`] returns once a prompt is stopped there.
    pub fn hold_history(&self) {
        self.shared.control.history.send_replace(Pause::Armed(0));
    }

    /// Wait until a prompt is stopped before its history write.
    pub async fn history_held(&self) {
        let mut rx = self.shared.control.history.subscribe();
        let _ = rx.wait_for(|p| *p == Pause::Paused).await;
    }

    /// Let the held prompt write its history (also disarms a hold not reached yet).
    pub fn release_history(&self) {
        self.shared.control.history.send_replace(Pause::Off);
    }

    /// The profile this simulator plays.
    pub fn profile(&self) -> Profile {
        self.shared.config.profile
    }

    /// How many times `GET /api/jobs/{id}` was asked.
    pub fn job_lookups(&self) -> usize {
        lock(&self.shared.log).job_lookups
    }

    /// Every job id `POST /api/jobs/{id}/cancel` or `POST /api/jobs/cancel` was asked to cancel.
    pub fn job_cancels(&self) -> Vec<String> {
        lock(&self.shared.log).job_cancels.clone()
    }

    /// Let a paused executor continue (also disarms a breakpoint not reached yet).
    pub fn resume(&self) {
        self.shared.control.pause.send_replace(Pause::Off);
    }

    /// Every `POST /prompt` body received (parsed JSON), in order.
    pub fn prompts(&self) -> Vec<Value> {
        lock(&self.shared.log).prompts.clone()
    }

    /// Every `POST /free` request with a JSON object body, in order.
    pub fn frees(&self) -> Vec<FreeMark> {
        lock(&self.shared.log).frees.clone()
    }

    /// How many times the whole `GET /object_info` was asked for.
    pub fn object_info_requests(&self) -> usize {
        lock(&self.shared.log).object_info_requests
    }

    /// Every `POST /interrupt` body received (`None` when empty/non-JSON), in order.
    pub fn interrupts(&self) -> Vec<Option<Value>> {
        lock(&self.shared.log).interrupts.clone()
    }

    /// Every sampler step sent so far, with its time.
    pub fn step_marks(&self) -> Vec<StepMark> {
        lock(&self.shared.log).steps.clone()
    }

    /// When each finished prompt's terminal `executing{node: null}` was sent.
    pub fn completions(&self) -> Vec<(String, std::time::Instant)> {
        lock(&self.shared.log).completions.clone()
    }

    /// Every prompt's `execution_start` and `execution_success` stamps, in execution order
    /// (`execution_success` is also logged at info level as `execution_success sent` with
    /// `unix_us`, for a benchmark in another process).
    pub fn executions(&self) -> Vec<ExecutionMark> {
        lock(&self.shared.log).executions.clone()
    }

    /// Resolves once `n` `POST /interrupt` or `POST /api/jobs/{id}/cancel` requests have been
    /// handled (their flag is set).
    pub async fn interrupt_handled(&self, n: usize) {
        let mut rx = self.shared.control.interrupts_handled.subscribe();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// Every upload stored so far, in order.
    pub fn uploads(&self) -> Vec<UploadMark> {
        lock(&self.shared.log).uploads.clone()
    }

    /// Bytes of a file in the simulated input folder (after `/upload/image`), e.g. `input_file("", "test.png")`.
    pub fn input_file(&self, subfolder: &str, name: &str) -> Option<Vec<u8>> {
        self.file(Folder::Input, subfolder, name)
    }

    /// Bytes of a file a node saved in the simulated output folder, e.g.
    /// `output_file("portraits", "x_00001_.png")`.
    pub fn output_file(&self, subfolder: &str, name: &str) -> Option<Vec<u8>> {
        self.file(Folder::Output, subfolder, name)
    }

    fn file(&self, folder: Folder, subfolder: &str, name: &str) -> Option<Vec<u8>> {
        let abs = store::path::join(&store::path::join(&folder.root(), subfolder), name);
        let rel = folder.relative(&abs)?;
        lock(&self.shared.store)
            .files
            .get(folder, &rel)
            .map(|b| b.to_vec())
    }

    /// The images `SaveImageWebsocket` nodes sent as binary frames so far, as `(node id, PNG bytes)`,
    /// in order (one per image; they are never stored as files).
    pub fn websocket_images(&self) -> Vec<(String, Vec<u8>)> {
        lock(&self.shared.log).websocket_images.clone()
    }

    /// The clientIds of the WebSocket connections accepted so far, one per connection.
    pub fn ws_client_ids(&self) -> Vec<String> {
        lock(&self.shared.log).ws_client_ids.clone()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Run a simulated server on `addr` until `shutdown` resolves (used by the CLI subcommand).
pub async fn serve(
    addr: SocketAddr,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind the simulated ComfyUI to {addr}"))?;
    let simulator = Simulator::start(listener, config)
        .await
        .context("failed to start the simulated ComfyUI")?;
    shutdown.await;
    simulator.shutdown().await;
    Ok(())
}

/// State shared by the HTTP handlers, the socket tasks and the prompt worker.
pub(crate) struct Shared {
    pub(crate) config: SimConfig,
    pub(crate) catalog: Catalog,
    /// Files, queue and history. Lock order: `store` before the hub's socket table.
    pub(crate) store: Mutex<Store>,
    pub(crate) hub: Hub,
    pub(crate) control: Control,
    /// What the test hooks report.
    pub(crate) log: Mutex<Log>,
    pub(crate) shutdown: CancellationToken,
}

/// Signals between the HTTP side and the prompt worker.
pub(crate) struct Control {
    /// `nodes.interrupt_processing()`: checked before each node and at each step; cleared per prompt.
    pub(crate) interrupt: AtomicBool,
    /// Wakes the worker when a prompt is queued or a flag is set.
    pub(crate) wake: Notify,
    /// `POST /free {"free_memory": true}`: the worker drops its cache before the next prompt.
    pub(crate) free_memory: AtomicBool,
    pub(crate) pause: watch::Sender<Pause>,
    /// [`Simulator::hold_history`]'s breakpoint (`Armed(_)` = armed).
    pub(crate) history: watch::Sender<Pause>,
    pub(crate) current: Mutex<Current>,
    /// `POST /interrupt` requests fully handled so far (for [`Simulator::interrupt_handled`]).
    pub(crate) interrupts_handled: watch::Sender<usize>,
    /// Armed [`DropPoint`]s, each fired once.
    pub(crate) drops: Mutex<Vec<DropPoint>>,
}

/// Where [`Simulator::drop_websockets_at`] drops every WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPoint {
    /// When a `POST /prompt` arrives, before it is validated and queued (the client's socket is
    /// already open).
    BeforeQueue,
    /// Right after sampler step `k` was sent, for the next prompt that reaches it.
    AfterStep(u32),
    /// Right before a prompt's terminal `executing{node: null}`, its history entry already stored.
    BeforeCompletion,
    /// When `/history` or `/history/{prompt_id}` is requested, before it is answered.
    OnHistory,
}

/// The breakpoint of [`Simulator::pause_after_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pause {
    Off,
    Armed(u32),
    Paused,
}

/// `server.client_id` / `server.last_node_id`, read when a socket connects.
#[derive(Default)]
pub(crate) struct Current {
    pub(crate) client_id: Option<String>,
    pub(crate) last_node: Option<String>,
}

#[derive(Default)]
pub(crate) struct Log {
    pub(crate) prompts: Vec<Value>,
    pub(crate) interrupts: Vec<Option<Value>>,
    pub(crate) job_cancels: Vec<String>,
    pub(crate) job_lookups: usize,
    pub(crate) ws_client_ids: Vec<String>,
    pub(crate) steps: Vec<StepMark>,
    pub(crate) completions: Vec<(String, std::time::Instant)>,
    pub(crate) executions: Vec<ExecutionMark>,
    pub(crate) uploads: Vec<UploadMark>,
    pub(crate) websocket_images: Vec<(String, Vec<u8>)>,
    pub(crate) drops_fired: usize,
    pub(crate) frees: Vec<FreeMark>,
    pub(crate) object_info_requests: usize,
}

/// One `POST /free` the simulator accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct FreeMark {
    /// The JSON body (`{"unload_models": bool, "free_memory": bool}`).
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// One upload the simulator stored (`/upload/image` or `/upload/mask`).
#[derive(Clone, Debug, PartialEq)]
pub struct UploadMark {
    /// `/upload/image` or `/upload/mask` (also when reached under `/api`).
    pub endpoint: &'static str,
    /// The name it was stored under.
    pub name: String,
    /// The `subfolder` field.
    pub subfolder: String,
    /// The `type` field (`input` when absent).
    pub folder_type: String,
    /// The file part's `Content-Type`.
    pub content_type: Option<String>,
    /// The `original_ref` field (masks).
    pub original_ref: Option<String>,
}

/// When the simulator sent a prompt's `execution_start` and its `execution_success`, in
/// wall-clock microseconds since the Unix epoch (for the idle-gap benchmark).
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutionMark {
    /// The prompt.
    pub prompt_id: String,
    /// When `execution_start` was sent.
    pub started_us: u64,
    /// When `execution_success` was sent; `None` while running, or when it failed or was
    /// interrupted.
    pub succeeded_us: Option<u64>,
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// When the simulator sent a sampler step's `progress` message (for latency benchmarks).
#[derive(Clone, Debug, PartialEq)]
pub struct StepMark {
    /// The prompt.
    pub prompt_id: String,
    /// The node.
    pub node: String,
    /// The step value sent.
    pub step: u64,
    /// When it was handed to the sockets.
    pub at: std::time::Instant,
}

impl Shared {
    fn new(config: SimConfig, catalog: Catalog) -> Shared {
        Shared {
            config,
            catalog,
            store: Mutex::new(Store::default()),
            hub: Hub::new(),
            control: Control {
                interrupt: AtomicBool::new(false),
                wake: Notify::new(),
                free_memory: AtomicBool::new(false),
                pause: watch::Sender::new(Pause::Off),
                history: watch::Sender::new(Pause::Off),
                current: Mutex::new(Current::default()),
                interrupts_handled: watch::Sender::new(0),
                drops: Mutex::new(Vec::new()),
            },
            log: Mutex::new(Log::default()),
            shutdown: CancellationToken::new(),
        }
    }

    /// `get_queue_info()`.
    pub(crate) fn queue_info(&self) -> Value {
        let remaining = lock(&self.store).queue.remaining();
        json!({"exec_info": {"queue_remaining": remaining}})
    }

    /// `queue_updated()`: broadcast `status`. Called with the store locked so that the announcements of a
    /// put and of the worker's get cannot swap.
    pub(crate) fn announce_queue(&self, store: &Store) {
        let info = json!({"exec_info": {"queue_remaining": store.queue.remaining()}});
        self.hub
            .send_json("status", json!({ "status": info }), None);
    }

    /// Drops every WebSocket if `point` is armed (and disarms it).
    pub(crate) fn reached(&self, point: DropPoint) {
        let fired = {
            let mut drops = lock(&self.control.drops);
            match drops.iter().position(|p| *p == point) {
                Some(i) => {
                    drops.remove(i);
                    true
                }
                None => false,
            }
        };
        if fired {
            tracing::debug!(?point, "dropping every WebSocket (armed drop point)");
            lock(&self.log).drops_fired += 1;
            self.hub.drop_all();
        }
    }

    /// The model folder an input's files live in (`folder_paths` names), for the inputs the
    /// simulator lists from [`SimConfig::models_dir`].
    pub(crate) fn model_folder(input: &str) -> Option<&'static str> {
        Some(match input {
            "ckpt_name" => "checkpoints",
            "lora_name" => "loras",
            "vae_name" => "vae",
            "unet_name" => "diffusion_models",
            "control_net_name" => "controlnet",
            "model_name" => "upscale_models",
            n if n.starts_with("clip_name") => "text_encoders",
            _ => return None,
        })
    }

    /// The files of an input's model folder in [`SimConfig::models_dir`], sorted.
    pub(crate) fn models_on_disk(&self, input: &str) -> Vec<String> {
        let (Some(dir), Some(folder)) = (&self.config.models_dir, Shared::model_folder(input))
        else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(dir.join(folder))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Whether `name` is a file of the input's model folder on disk.
    pub(crate) fn model_on_disk(&self, input: &str, name: &str) -> bool {
        self.models_on_disk(input).iter().any(|n| n == name)
    }

    pub(crate) fn interrupted(&self) -> bool {
        self.control.interrupt.load(Ordering::SeqCst)
    }
}

/// Lock a mutex, ignoring poisoning (a panicking holder leaves consistent-enough simulator state).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
