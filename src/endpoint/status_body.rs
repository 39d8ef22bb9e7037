//! A job's `/status` body as the store keeps it. While the job runs, and for a final body up to
//! `SERVE_RESULT_MEMORY_BYTES`, it is a JSON value in memory. A larger final body (a video's
//! base64, a batch of images) is written once into the endpoint's result folder and read back
//! for each reply, so a finished job's megabytes are not held in memory for its whole TTL; the
//! file goes when the job does, and the folder when the endpoint does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::ser::Error as _;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use tracing::{debug, warn};

use crate::scratch_dir::ScratchDir;

/// A `/status` body; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct StatusBody(Arc<Stored>);

#[derive(Debug)]
enum Stored {
    Memory(Value),
    /// Serialised in `path`; `status` is its `status` field.
    File {
        path: PathBuf,
        status: String,
    },
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Stored::File { path, .. } = self {
            if let Err(e) = std::fs::remove_file(path.as_path()) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(file = %path.display(), error = %e, "could not remove a stored result");
                }
            }
        }
    }
}

impl StatusBody {
    /// A body held in memory.
    pub(crate) fn new(body: Value) -> StatusBody {
        StatusBody(Arc::new(Stored::Memory(body)))
    }

    /// Its `status` field (`IN_QUEUE`, `COMPLETED`, ...).
    pub(crate) fn status(&self) -> &str {
        match &*self.0 {
            Stored::Memory(v) => v["status"].as_str().unwrap_or_default(),
            Stored::File { status, .. } => status,
        }
    }

    /// Whether both are the same stored body.
    pub(crate) fn same(&self, other: &StatusBody) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The body as a JSON value (read back from its file when it is in one).
    pub(crate) fn value(&self) -> std::io::Result<Value> {
        match &*self.0 {
            Stored::Memory(v) => Ok(v.clone()),
            Stored::File { path, .. } => {
                let bytes = std::fs::read(path)?;
                serde_json::from_slice(&bytes).map_err(std::io::Error::other)
            }
        }
    }

    /// The HTTP reply: the JSON, read from its file without blocking when it is in one.
    pub(crate) async fn response(&self) -> Response {
        match &*self.0 {
            Stored::Memory(v) => Json(v).into_response(),
            Stored::File { path, .. } => match tokio::fs::read(path).await {
                Ok(bytes) => (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    bytes,
                )
                    .into_response(),
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "a stored result cannot be read");
                    super::error::ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "the job's stored result cannot be read",
                    )
                    .into_response()
                }
            },
        }
    }

    /// The same body in a file of `folder` when its JSON is over `folder`'s limit (`None`:
    /// it stays in memory). Runs on a blocking thread (it serialises and writes megabytes).
    fn spilled(&self, folder: &ResultFolder, id: &str) -> std::io::Result<Option<StatusBody>> {
        let Stored::Memory(value) = &*self.0 else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        if bytes.len() as u64 <= folder.memory_limit {
            return Ok(None);
        }
        let path = folder.dir.path().join(format!(
            "{}-{}.json",
            uuid::Uuid::new_v4().simple(),
            id.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(64)
                .collect::<String>()
        ));
        std::fs::write(&path, &bytes)?;
        debug!(file = %path.display(), bytes = bytes.len(), "result stored on disk");
        Ok(Some(StatusBody(Arc::new(Stored::File {
            path,
            status: self.status().to_owned(),
        }))))
    }
}

impl Serialize for StatusBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &*self.0 {
            Stored::Memory(v) => v.serialize(s),
            Stored::File { path, .. } => {
                let text = std::fs::read_to_string(path).map_err(S::Error::custom)?;
                RawValue::from_string(text)
                    .map_err(S::Error::custom)?
                    .serialize(s)
            }
        }
    }
}

/// Where the local endpoint keeps final results: in memory up to `memory_bytes` of JSON, in
/// files beyond.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultStorage {
    /// `SERVE_RESULT_DIR`: where the endpoint makes its result folder (the system's temporary
    /// directory when `None`).
    pub dir: Option<PathBuf>,
    /// `SERVE_RESULT_MEMORY_BYTES`: a final `/status` body larger than this is kept in a file
    /// (1,000,000 bytes; 0 keeps every final body in a file).
    pub memory_bytes: u64,
}

impl Default for ResultStorage {
    fn default() -> Self {
        ResultStorage {
            dir: None,
            memory_bytes: 1_000_000,
        }
    }
}

impl ResultStorage {
    /// Reads `SERVE_RESULT_DIR` and `SERVE_RESULT_MEMORY_BYTES`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ResultStorage, crate::config::ConfigError> {
        let env = crate::config::EnvReader::new(lookup);
        let d = ResultStorage::default();
        Ok(ResultStorage {
            dir: env.get("SERVE_RESULT_DIR").map(PathBuf::from).or(d.dir),
            memory_bytes: env
                .parse(
                    "SERVE_RESULT_MEMORY_BYTES",
                    "a whole number of bytes",
                    |v| v.parse::<u64>().ok(),
                )?
                .unwrap_or(d.memory_bytes),
        })
    }
}

/// Where final bodies over the memory limit go: a folder of the endpoint's own, removed with it.
#[derive(Debug)]
pub(crate) struct ResultFolder {
    dir: ScratchDir,
    memory_limit: u64,
}

impl ResultFolder {
    /// A new folder under `base` (the system's temporary directory when `None`) for bodies
    /// over `memory_limit` bytes.
    pub(crate) fn create(base: Option<&Path>, memory_limit: u64) -> std::io::Result<ResultFolder> {
        let dir = ScratchDir::create(base, "comfy-worker-results")?;
        Ok(ResultFolder { dir, memory_limit })
    }

    /// Moves `body` into a file when it is over the limit: the write happens on a blocking
    /// thread, then `swap` gets the file-backed body (to put in place of the one in memory).
    /// A body that cannot be written stays in memory (logged).
    pub(crate) fn store(
        self: &Arc<ResultFolder>,
        id: String,
        body: StatusBody,
        swap: impl FnOnce(StatusBody) + Send + 'static,
    ) {
        let folder = self.clone();
        tokio::task::spawn_blocking(move || match body.spilled(&folder, &id) {
            Ok(Some(file)) => swap(file),
            Ok(None) => {}
            Err(e) => {
                warn!(job_id = %id, error = %e, "could not store a result on disk; it stays in memory")
            }
        });
    }
}
