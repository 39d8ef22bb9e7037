//! Platform adapters: the only modules that know a serverless platform's wire format.
//!
//! * [`runpod`]: RunPod's worker protocol (job-take, job-done, progress, ping, job-stop).

pub mod runpod;
