//! The Comfy API v2 surface of the local endpoint (`/api/v2/...`): the job contract Comfy Org
//! publishes for running ComfyUI workflows (served by Comfy Cloud, by their comfy-api-proxy for
//! self-hosted ComfyUI, and consumed by the Comfy SDKs), built from the contract on the same job
//! store, runner, auth and limits as the RunPod-style routes. A v2 job is a local job with v2
//! extras ([`job_record::V2Job`]): its `/status` works like any job's.
//!
//! * `routes.rs`: the job routes and `/api/v2/health`, the auth and origin guard in the
//!   contract's envelope; `asset_routes.rs`: the asset routes (multipart upload, `Range`);
//! * `submission.rs`: a `POST /api/v2/jobs` body, checked, asset references resolved;
//! * `job_view.rs`: the `Job` object and the contract's status lifecycle;
//! * `events.rs`: the `text/event-stream` of a job (every step; outputs before the end);
//! * `outputs.rs`: each node's outputs, fetched from ComfyUI as it finishes and stored as assets;
//! * `assets.rs`: the asset store (blake3-addressed blobs on disk); `range.rs`: `Range`;
//!   `request.rs`: a route's `{id}` and body;
//! * `idempotency.rs`: single-use `Idempotency-Key`s; `progress.rs`: the `Progress` object;
//! * `job_record.rs`: what the store keeps of a v2 job; `job_error.rs`: the `JobError` of a
//!   job that ended badly; `error.rs`: the error envelope;
//!   `stamp.rs`: RFC 3339 stamps.

pub(crate) mod asset_routes;
pub(crate) mod assets;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod idempotency;
pub(crate) mod job_error;
pub(crate) mod job_record;
pub(crate) mod job_view;
pub(crate) mod outputs;
pub(crate) mod progress;
pub(crate) mod range;
pub(crate) mod request;
pub(crate) mod routes;
pub(crate) mod stamp;
pub(crate) mod submission;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use assets::AssetStore;
use idempotency::IdempotencyKeys;

/// The v2 surface's settings (part of [`super::ServeOptions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct V2Options {
    /// `SERVE_ASSET_DIR`: where the asset store makes its directory (the system's temporary
    /// directory when unset); the directory is removed when the endpoint stops.
    pub asset_dir: Option<PathBuf>,
    /// `SERVE_ASSET_TTL_S`: how long an uploaded asset is kept (24 h); a job's outputs are kept
    /// as long as the job.
    pub asset_ttl: Duration,
    /// `SERVE_MAX_UPLOAD_MB`: the largest asset upload (100 MB, the contract's expectation).
    pub max_upload_bytes: u64,
    /// `SERVE_V2_CONVERT_UI`: convert UI-format workflows (as RunPod-style jobs always are)
    /// instead of refusing them with `workflow_format_ui`, as the contract does.
    pub convert_ui: bool,
    /// Event streams open at once; the next is refused with `too_many_streams`.
    pub max_streams: usize,
    /// How long `POST /api/v2/jobs` waits, when the job starts at once, for ComfyUI to take or
    /// refuse the prompt (so its validation errors come back as `invalid_workflow`).
    pub validation_wait: Duration,
}

impl Default for V2Options {
    fn default() -> Self {
        V2Options {
            asset_dir: None,
            asset_ttl: Duration::from_secs(24 * 3600),
            max_upload_bytes: 100 * 1000 * 1000,
            convert_ui: false,
            max_streams: 64,
            validation_wait: Duration::from_secs(5),
        }
    }
}

impl V2Options {
    /// Reads `SERVE_ASSET_DIR`, `SERVE_ASSET_TTL_S`, `SERVE_MAX_UPLOAD_MB` and
    /// `SERVE_V2_CONVERT_UI`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<V2Options, crate::config::ConfigError> {
        let env = crate::config::EnvReader::new(lookup);
        let d = V2Options::default();
        let positive = |v: &str| v.parse::<u64>().ok().filter(|n| *n >= 1);
        Ok(V2Options {
            asset_dir: env
                .get("SERVE_ASSET_DIR")
                .map(PathBuf::from)
                .or(d.asset_dir),
            asset_ttl: env
                .parse(
                    "SERVE_ASSET_TTL_S",
                    "a whole number of seconds of at least 1",
                    positive,
                )?
                .map_or(d.asset_ttl, Duration::from_secs),
            max_upload_bytes: env
                .parse(
                    "SERVE_MAX_UPLOAD_MB",
                    "a whole number of MB of at least 1",
                    positive,
                )?
                .map_or(d.max_upload_bytes, |mb| mb.saturating_mul(1000 * 1000)),
            convert_ui: env.flag("SERVE_V2_CONVERT_UI", d.convert_ui)?,
            ..d
        })
    }
}

/// The v2 surface's state beside the job store.
#[derive(Debug)]
pub(crate) struct V2State {
    /// `None` when the asset directory could not be made (asset routes then answer 500).
    pub(crate) assets: Option<Arc<AssetStore>>,
    pub(crate) keys: IdempotencyKeys,
    /// Event streams open now.
    pub(crate) streams: Arc<AtomicUsize>,
}

impl V2State {
    pub(crate) fn new(options: &V2Options) -> std::io::Result<V2State> {
        let assets = AssetStore::create(
            options.asset_dir.as_deref(),
            options.asset_ttl,
            options.max_upload_bytes,
        )?;
        Ok(V2State::with_assets(Some(Arc::new(assets))))
    }

    pub(crate) fn with_assets(assets: Option<Arc<AssetStore>>) -> V2State {
        V2State {
            assets,
            keys: IdempotencyKeys::default(),
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }
}
