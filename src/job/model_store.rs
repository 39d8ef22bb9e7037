//! The models jobs bring (`input.models`), downloaded into ComfyUI's model folder before the
//! prompt is queued. Files are kept in a content-addressed cache (`MODEL_CACHE_DIR/sha256/<hex>`)
//! and hard-linked into the model folder (`COMFY_MODELS_DIR/<folder>/<name>`; copied when the two
//! are on different file systems). A model is downloaded once: a later job naming the same
//! sha256 or URL reuses the file, and jobs asking at once share one download. A given sha256 is
//! checked before anything is installed; a mismatch leaves no file. The cache keeps to
//! `MODEL_CACHE_MAX_GB`, dropping the least recently used models (and their links) first.
//! Every URL passes the SSRF guard of URL inputs, within `MODEL_URL_MAX_BYTES` and
//! `MODEL_URL_TIMEOUT_S`.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::input::ModelSpec;
use super::storage::{JobStorage, ReadError};
use crate::config::{InputPolicy, ModelPolicy};
use crate::redact::display_url;
use crate::ssrf::{Downloader, FetchError, Guard, Limits};

/// Redirects a model URL may take (hosting sites redirect to their CDN).
const MAX_REDIRECTS: usize = 10;

/// Why a model could not be made available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The download failed or was refused.
    #[error("model {name}: download from {url} failed: {reason}")]
    Download {
        /// The file name.
        name: String,
        /// The URL, without its query.
        url: String,
        /// Why.
        reason: String,
    },
    /// The file's sha256 is not the one the job gave; nothing was installed.
    #[error("model {name}: sha256 mismatch: the job says {expected}, the file from {url} is {actual}; nothing was installed")]
    Checksum {
        /// The file name.
        name: String,
        /// The URL, without its query.
        url: String,
        /// The job's sha256.
        expected: String,
        /// The downloaded file's.
        actual: String,
    },
    /// A different file with that name is already in the folder.
    #[error("model {name}: {folder}/{name} already exists with another sha256 ({actual}); nothing was replaced")]
    Conflict {
        /// The file name.
        name: String,
        /// The folder.
        folder: String,
        /// The existing file's sha256.
        actual: String,
    },
    /// The cache or the model folder could not be written.
    #[error("model {name}: {what}: {detail}")]
    Io {
        /// The file name.
        name: String,
        /// What failed.
        what: String,
        /// The system's error.
        detail: String,
    },
}

/// A download in flight or done, shared by the jobs that ask for the same file.
type Shared = Arc<OnceCell<Result<String, ModelError>>>;

/// The model cache and installer; cheap to clone, one per engine.
#[derive(Clone)]
pub struct ModelStore {
    policy: ModelPolicy,
    downloader: Downloader,
    inflight: Arc<Mutex<HashMap<String, Shared>>>,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The sha256 of a file on disk.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// Marks a cache file used now (the LRU order is the files' modification times).
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

impl ModelStore {
    /// A store under `policy`, its URLs checked by the guard of URL inputs (`inputs`).
    pub fn new(policy: &ModelPolicy, inputs: &InputPolicy) -> ModelStore {
        let guard = Guard::new(inputs.allow_private, inputs.timeout)
            .with_allowed_hosts(&inputs.allowed_hosts);
        let limits = Limits {
            max_bytes: policy.max_bytes,
            timeout: policy.timeout,
            max_redirects: MAX_REDIRECTS,
        };
        ModelStore {
            policy: policy.clone(),
            downloader: Downloader::new(guard, limits, "model URL host"),
            inflight: Arc::default(),
        }
    }

    fn cached(&self, sha: &str) -> PathBuf {
        self.policy.cache_dir.join("sha256").join(sha)
    }

    fn url_index(&self, url: &str) -> PathBuf {
        self.policy
            .cache_dir
            .join("urls")
            .join(sha256_hex(url.as_bytes()))
    }

    fn links(&self, sha: &str) -> PathBuf {
        self.policy.cache_dir.join("links").join(sha)
    }

    /// Makes `spec` available in ComfyUI's model folder: already there, in the cache, or
    /// downloaded (once, whoever asks at the same time). `on_bytes` hears a download's progress
    /// (bytes so far, bytes announced). Returns whether this call downloaded it.
    pub async fn ensure(
        &self,
        spec: &ModelSpec,
        storage: &JobStorage,
        on_bytes: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<bool, ModelError> {
        let io = |what: &str, e: std::io::Error| ModelError::Io {
            name: spec.name.clone(),
            what: what.to_owned(),
            detail: e.to_string(),
        };
        let target = self.policy.models_dir.join(&spec.folder).join(&spec.name);
        // Known content: the cache may have it.
        let known = match &spec.sha256 {
            Some(sha) => Some(sha.clone()),
            // An `s3://` object is read with the job's own credentials: a copy another job
            // fetched is reused only by its sha256, which the job must then name.
            None if spec.is_s3() => None,
            None => std::fs::read_to_string(self.url_index(&spec.url))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|sha| self.cached(sha).is_file()),
        };
        if target.exists() {
            match &known {
                Some(sha) if same_file(&target, &self.cached(sha)) => {
                    touch(&self.cached(sha));
                    return Ok(false);
                }
                // No sha256 given: a file of that name is the model.
                None => return Ok(false),
                Some(sha) => {
                    let actual =
                        file_sha256(&target).map_err(|e| io("reading the installed file", e))?;
                    if &actual == sha {
                        return Ok(false);
                    }
                    return Err(ModelError::Conflict {
                        name: spec.name.clone(),
                        folder: spec.folder.clone(),
                        actual,
                    });
                }
            }
        }
        let mut downloaded = false;
        let sha = match known.filter(|sha| self.cached(sha).is_file()) {
            Some(sha) => sha,
            None => {
                let key = spec.sha256.clone().unwrap_or_else(|| spec.url.clone());
                let shared = {
                    let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                    inflight.entry(key.clone()).or_default().clone()
                };
                let result = shared
                    .get_or_init(|| async {
                        downloaded = true;
                        self.download(spec, storage, on_bytes).await
                    })
                    .await
                    .clone();
                self.inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                result?
            }
        };
        let cached = self.cached(&sha);
        touch(&cached);
        self.install(spec, &sha, &cached, &target)
            .map_err(|e| io("installing into the model folder", e))?;
        Ok(downloaded)
    }

    /// Downloads `spec` into the cache, checking its sha256; returns the content's sha256.
    async fn download(
        &self,
        spec: &ModelSpec,
        storage: &JobStorage,
        on_bytes: &mut (dyn FnMut(u64, Option<u64>) + Send),
    ) -> Result<String, ModelError> {
        let io = |what: &str, e: std::io::Error| ModelError::Io {
            name: spec.name.clone(),
            what: what.to_owned(),
            detail: e.to_string(),
        };
        let tmp_dir = self.policy.cache_dir.join("tmp");
        for dir in ["tmp", "sha256", "urls", "links"] {
            std::fs::create_dir_all(self.policy.cache_dir.join(dir))
                .map_err(|e| io("creating the model cache", e))?;
        }
        let part = tmp_dir.join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let mut file = std::fs::File::create(&part).map_err(|e| io("creating the download", e))?;
        let url = display_url(&spec.url);
        info!(model = %spec.name, folder = %spec.folder, url = %url, "downloading a model");
        let started = std::time::Instant::now();
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let streamed: Result<u64, String> = {
            let mut on_chunk = |announced: Option<u64>, chunk: &[u8]| -> std::io::Result<()> {
                file.write_all(chunk)?;
                hasher.update(chunk);
                done += chunk.len() as u64;
                on_bytes(done, announced);
                Ok(())
            };
            match spec.s3_location() {
                Some((bucket, key)) => {
                    let mut sink = |size: u64, chunk: &[u8]| on_chunk(Some(size), chunk);
                    let read = storage.read_stream(bucket, key, self.policy.max_bytes, &mut sink);
                    match tokio::time::timeout(self.policy.timeout, read).await {
                        Ok(read) => read.map_err(|e| self.describe_s3(&e)),
                        Err(_) => Err(self.describe(&FetchError::TimedOut)),
                    }
                }
                None => self
                    .downloader
                    .stream(&spec.url, &mut on_chunk)
                    .await
                    .map_err(|e| self.describe(&e)),
            }
        };
        let finished =
            streamed.and_then(|n| file.sync_all().map(|()| n).map_err(|e| e.to_string()));
        drop(file);
        let bytes = match finished {
            Ok(n) => n,
            Err(reason) => {
                let _ = std::fs::remove_file(&part);
                return Err(ModelError::Download {
                    name: spec.name.clone(),
                    url,
                    reason,
                });
            }
        };
        let actual = hex(&hasher.finalize());
        if let Some(expected) = &spec.sha256 {
            if *expected != actual {
                let _ = std::fs::remove_file(&part);
                warn!(model = %spec.name, %expected, %actual, "model sha256 mismatch; removed");
                return Err(ModelError::Checksum {
                    name: spec.name.clone(),
                    url,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        std::fs::rename(&part, self.cached(&actual)).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            io("storing the model in the cache", e)
        })?;
        if !spec.is_s3() {
            let _ = std::fs::write(self.url_index(&spec.url), &actual);
        }
        info!(
            model = %spec.name,
            bytes,
            sha256 = %actual,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model downloaded"
        );
        self.evict(&actual);
        Ok(actual)
    }

    /// Links (or copies) the cached file to `target`, and records the link for eviction.
    fn install(
        &self,
        spec: &ModelSpec,
        sha: &str,
        cached: &Path,
        target: &Path,
    ) -> std::io::Result<()> {
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if !target.exists() {
            if let Err(e) = std::fs::hard_link(cached, target) {
                warn!(model = %spec.name, error = %e, "cannot link the cached model; copying it");
                let part = target.with_extension(format!("part-{}", uuid::Uuid::new_v4().simple()));
                std::fs::copy(cached, &part)?;
                std::fs::rename(&part, target)?;
            }
        }
        let mut links = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.links(sha))?;
        writeln!(links, "{}", target.display())
    }

    /// Drops the least recently used models (and their links in the model folder) until the
    /// cache fits `MODEL_CACHE_MAX_GB`; `keep` stays.
    fn evict(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(self.policy.cache_dir.join("sha256")) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                Some((
                    modified,
                    meta.len(),
                    e.file_name().to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, sha) in files {
            if total <= self.policy.cache_max_bytes {
                break;
            }
            if sha == keep {
                continue;
            }
            let cached = self.cached(&sha);
            if let Ok(links) = std::fs::read_to_string(self.links(&sha)) {
                for link in links.lines().map(PathBuf::from) {
                    if same_file(&link, &cached) {
                        let _ = std::fs::remove_file(&link);
                    }
                }
            }
            let _ = std::fs::remove_file(self.links(&sha));
            if std::fs::remove_file(&cached).is_ok() {
                info!(sha256 = %sha, bytes = len, "model evicted from the cache (MODEL_CACHE_MAX_GB)");
                total = total.saturating_sub(len);
            }
        }
    }

    /// An `s3://` read's failure, with the model limits it names.
    fn describe_s3(&self, e: &ReadError) -> String {
        match e {
            ReadError::TooLarge { size, .. } => format!(
                "the object is {size} bytes, larger than MODEL_URL_MAX_BYTES ({} bytes)",
                self.policy.max_bytes
            ),
            ReadError::LargerThan { .. } => format!(
                "the object is larger than MODEL_URL_MAX_BYTES ({} bytes)",
                self.policy.max_bytes
            ),
            ReadError::NoBucket => "no bucket is configured: s3:// models are read from the worker's bucket (BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY) or the job's s3Config".into(),
            ReadError::OtherBucket { bucket, configured } => format!(
                "the bucket {bucket:?} is not the configured one ({configured:?}); s3:// models are read from the job's bucket only"
            ),
            other => other.to_string(),
        }
    }

    fn describe(&self, e: &FetchError) -> String {
        match e {
            FetchError::Invalid { reason, .. } => format!("invalid URL: {reason}"),
            FetchError::Refused { reason, .. } => format!(
                "refused: {reason} (set ALLOW_PRIVATE_INPUT_URLS=true or INPUT_URL_ALLOW_HOSTS for an internal host)"
            ),
            FetchError::TooLarge { .. } => format!(
                "the file is larger than MODEL_URL_MAX_BYTES ({} bytes)",
                self.policy.max_bytes
            ),
            FetchError::TimedOut => format!(
                "timed out after {} s (MODEL_URL_TIMEOUT_S)",
                self.policy.timeout.as_secs_f64()
            ),
            FetchError::TooManyRedirects => format!("more than {MAX_REDIRECTS} redirects"),
            FetchError::Status(status) => format!("the server answered {status}"),
            FetchError::Transport(e) => e.clone(),
        }
    }
}
