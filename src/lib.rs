//! comfy-worker: a serverless worker for ComfyUI with live progress.
//!
//! # Layout
//! From the front ends down; a module imports only from the groups below it
//! (`tests/it/architecture.rs` checks it, ARCHITECTURE.md explains it).
//!
//! Front ends, which know nothing of one another:
//! * [`cli`]: the command line (`run`, `worker`, `serve`, `lambda`, `health`, `watch`,
//!   `convert`, `simulate-comfyui`).
//! * [`platform`]: the serverless adapters: RunPod's worker protocol, AWS Lambda's Runtime API.
//! * [`endpoint`]: the local endpoint (`serve`): RunPod's endpoint API, live progress as SSE, the
//!   Comfy API v2, and RunPod's worker protocol for worker processes.
//!
//! The engine:
//! * [`runner`]: the one job runner under every front end (deadlines, cancel, shutdown grace,
//!   panics, progress fan-out, warm-up, housekeeping), and its pool: one runner per ComfyUI.
//! * [`webhook`]: completion and progress webhooks.
//! * [`housekeeping`]: warm-up, clean-up of a job's files, `/free` after a job.
//! * [`job`]: one job: its input read once, the run against ComfyUI, outputs in
//!   worker-comfyui's schema, typed failures.
//! * [`progress`]: prompt events into progress snapshots, the one place that computes them.
//!
//! Peers and settings:
//! * [`comfy`]: the ComfyUI client (HTTP, WebSocket, prompt watching). Only it knows ComfyUI's JSON.
//! * [`ssrf`]: the SSRF guard and guarded downloads, for URLs a job names.
//! * [`config`]: every setting, read from the environment.
//! * [`telemetry`]: log set-up (every line through the secret scrubber).
//!
//! Leaves, which import nothing from the crate:
//! * [`secret`]: `Secret`, the live-secret registry and the scrubber.
//! * [`redact`]: URLs as messages may show them, also inside error chains.
//! * [`media_type`]: media types from names and bytes.
//! * [`json_type`]: a JSON value's type, named for messages.
//! * [`eta`]: a node's remaining time from its step rate.
//! * [`comfy_address`]: where ComfyUI listens, checked before anything connects.
//! * [`metrics`]: the Prometheus metrics the runner feeds and the front ends serve.
//! * [`scratch_dir`]: a folder of the worker's own, removed with it (and after a killed worker).
//!
//! The fake ComfyUI (real protocol, no GPU) that `simulate-comfyui` and `--simulate` run and the
//! tests use is not in this library: it is the workspace's `comfy-sim` crate
//! (`crates/comfy-sim`), which the command line uses only with the `simulator` cargo feature (on
//! by default).

pub mod cli;
pub mod comfy;
pub mod comfy_address;
pub mod config;
pub mod endpoint;
pub mod eta;
pub mod housekeeping;
pub mod job;
pub mod json_type;
pub mod media_type;
pub mod metrics;
pub mod platform;
pub mod progress;
pub mod redact;
pub mod runner;
pub mod scratch_dir;
pub mod secret;
pub mod ssrf;
pub mod telemetry;
pub mod webhook;
