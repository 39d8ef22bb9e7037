//! comfy-worker: a serverless worker for ComfyUI with live progress.
//!
//! # Layout
//! * [`comfy`]: the ComfyUI client (HTTP, WebSocket, prompt watching). Only it knows ComfyUI's JSON.
//! * [`job`]: the job engine: worker-comfyui's input and output schema, uploads, outputs.
//! * [`progress`]: turns prompt events into progress snapshots, the one place that computes them.
//! * [`platform`]: serverless platform adapters (RunPod worker protocol).
//! * [`api`]: the local endpoint (`serve`): RunPod's endpoint API, live progress as SSE.
//! * [`cli`]: the command line (`run`, `worker`, `serve`, `simulate-comfyui`, `watch`).
//! * [`config`]: settings from the environment.
//! * [`net`]: the SSRF guard and guarded downloads, for URLs a job names.
//! * [`telemetry`]: log set-up.
//! * [`webhook`]: completion and progress webhooks, with an SSRF guard.
//!
//! The fake ComfyUI (real protocol, no GPU) that `simulate-comfyui` and `--simulate` run and the
//! tests use is not in this library: it is the workspace's `comfy-sim` crate
//! (`crates/comfy-sim`), which the command line uses only with the `simulator` cargo feature (on
//! by default).

pub mod cli;
pub mod comfy;
pub mod config;
pub mod endpoint;
pub mod error_chain;
pub mod eta;
pub mod housekeeping;
pub mod job;
pub mod json_type;
pub mod media_type;
pub mod platform;
pub mod progress;
pub mod redact;
pub mod runner;
pub mod secret;
pub mod ssrf;
pub mod telemetry;
pub mod webhook;
