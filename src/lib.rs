//! comfy-worker: a serverless worker for ComfyUI with live progress.

pub mod simulator;
