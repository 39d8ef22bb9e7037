//! RunPod's serverless worker protocol: take jobs, run them on the engine, relay every progress
//! snapshot to the job-done URL (what `/status` shows while the job runs), post the result, keep
//! the heartbeat going, and obey the stop channel. Wire format per the SDK (runpod-python 1.12).

pub mod client;
pub mod job;
pub mod metrics_listener;
pub mod relay;
mod relay_sink;
pub mod result_body;
pub mod settings;
pub mod spool;
mod take_pacing;
mod worker;

pub use client::{
    ClientError, Delivery, PlatformClient, PostError, ProgressError, StopPollError, Take, TakeError,
};
pub use job::{PlatformJob, ReplyError, Unreadable};
pub use metrics_listener::MetricsListener;
pub use relay::{Relay, RelayStats};
pub use result_body::ResultBody;
pub use settings::RunPodSettings;
pub use worker::{JobEnd, Step, Worker};
