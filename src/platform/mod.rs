//! Platform adapters: the only modules that know a serverless platform's wire format.
//!
//! * [`runpod`]: RunPod's worker protocol (job-take, job-done, progress, ping, job-stop).
//! * [`lambda`] (cargo feature `lambda`): AWS Lambda's Runtime API through `lambda_runtime`.

#[cfg(feature = "lambda")]
pub mod lambda;
pub mod runpod;
