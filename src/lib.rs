//! comfy-worker: a serverless worker for ComfyUI with live progress.
//!
//! # Layout
//! * [`comfy`]: the ComfyUI client (HTTP, WebSocket, prompt watching). Only it knows ComfyUI's JSON.
//! * [`job`]: the job engine: worker-comfyui's input and output schema, uploads, outputs.
//! * [`progress`]: turns prompt events into progress snapshots, the one place that computes them.
//! * [`config`]: settings from the environment.

pub mod comfy;
pub mod config;
pub mod job;
pub mod progress;
