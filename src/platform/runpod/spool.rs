//! Results that could not be delivered, kept on disk (`RUNPOD_RESULT_SPOOL_DIR`) so a worker
//! that restarts posts them again: one file per job, `{"job_id": ..., "result": <the body>}`,
//! written whole to a temporary name and renamed, so a crash never leaves half a result.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::value::RawValue;
use tracing::warn;

/// A result kept in the spool.
#[derive(Debug, Clone)]
pub struct Kept {
    /// The job it answers.
    pub job_id: String,
    /// The job-done body, as it was to be posted.
    pub body: Bytes,
    path: PathBuf,
}

/// Keeps `body`, the result of `job_id`, in `dir`.
pub fn write(dir: &Path, job_id: &str, body: &[u8]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let result = std::str::from_utf8(body)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the result is not JSON"))?;
    let kept = serde_json::json!({"job_id": job_id, "result": result});
    let name = file_name(job_id);
    let path = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, serde_json::to_vec(&kept)?)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// Every result kept in `dir` (none when it does not exist); unreadable files are logged and
/// left alone.
pub fn read_all(dir: &Path) -> Vec<Kept> {
    #[derive(serde::Deserialize)]
    struct File {
        job_id: String,
        result: Box<RawValue>,
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let read = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<File>(&bytes).map_err(|e| e.to_string()));
            match read {
                Ok(file) => Some(Kept {
                    job_id: file.job_id,
                    body: Bytes::from(file.result.get().to_owned()),
                    path,
                }),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "a spooled result cannot be read; left in place");
                    None
                }
            }
        })
        .collect()
}

/// Removes a kept result.
pub fn remove(kept: &Kept) {
    if let Err(e) = std::fs::remove_file(&kept.path) {
        warn!(path = %kept.path.display(), error = %e, "a delivered spooled result could not be removed");
    }
}

/// A file name for a job id: its characters kept when they are safe in a name, the rest
/// percent-encoded.
fn file_name(job_id: &str) -> String {
    let mut name = String::with_capacity(job_id.len() + 5);
    for b in job_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name.push_str(".json");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_whatever_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let body = br#"{"output":{"images":[]},"stopPod":true}"#;
        for id in ["job-1", "../../x", "a\nb", "7"] {
            let path = write(dir.path(), id, body).unwrap();
            assert_eq!(path.parent(), Some(dir.path()), "{id}");
        }
        let kept = read_all(dir.path());
        let mut ids: Vec<&str> = kept.iter().map(|k| k.job_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["../../x", "7", "a\nb", "job-1"]);
        assert!(kept.iter().all(|k| &k.body[..] == body));
        for k in &kept {
            remove(k);
        }
        assert!(read_all(dir.path()).is_empty());
        assert!(read_all(&dir.path().join("missing")).is_empty());
        assert!(write(dir.path(), "x", b"not json").is_err());
    }
}
