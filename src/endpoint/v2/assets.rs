//! The asset store of the Comfy API v2 surface: UUID-named records over content-addressed
//! blobs, on disk in a directory of the endpoint's own (`SERVE_ASSET_DIR`, else the system's
//! temporary directory; removed when the endpoint stops).
//!
//! * A blob is named by its blake3 hash and shared by every record over the same bytes
//!   (uploads dedup by content); it is deleted once no record and no job uses it.
//! * Uploads expire after the upload retention (`SERVE_ASSET_TTL_S`, or the request's
//!   `expires_in`); outputs live exactly as long as the job that made them.
//! * A job pins the blobs its workflow references until it has run, so deleting an asset
//!   record never pulls the bytes from under a queued job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::scratch_dir::ScratchDir;

/// Lowercase hex of a blake3 hash.
pub(crate) fn hex_of(hash: &blake3::Hash) -> String {
    hash.to_hex().to_string()
}

/// The hex of a `blake3:<64 hex>` string (any case), if it is one.
pub(crate) fn parse_hash(text: &str) -> Option<String> {
    let hex = text.strip_prefix("blake3:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

/// One asset record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AssetRecord {
    pub(crate) id: String,
    /// blake3 of its bytes, lowercase hex.
    pub(crate) hash_hex: String,
    pub(crate) size: u64,
    pub(crate) content_type: String,
    pub(crate) file_path: Option<String>,
    pub(crate) created: SystemTime,
    /// Uploads: when the record goes; outputs: `None` (they go with their job).
    pub(crate) expires: Option<SystemTime>,
    /// The job that produced it (outputs only).
    pub(crate) job_id: Option<String>,
}

/// Why a record could not be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeleteRefused {
    /// No such record.
    NotFound,
    /// A job's output: it goes with its job.
    InUse,
}

/// Why an upload's bytes were not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error("the file is larger than this endpoint takes ({0} bytes)")]
    TooLarge(u64),
    #[error("cannot store the file: {0}")]
    Io(#[from] std::io::Error),
}

struct Blob {
    size: u64,
    /// Records and job pins using it.
    refs: usize,
}

#[derive(Default)]
struct Index {
    records: HashMap<String, AssetRecord>,
    blobs: HashMap<String, Blob>,
    last_sweep: Option<Instant>,
}

/// The asset store; see the module docs.
pub(crate) struct AssetStore {
    root: ScratchDir,
    upload_ttl: Duration,
    max_upload: u64,
    index: Mutex<Index>,
}

impl std::fmt::Debug for AssetStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssetStore")
            .field("root", &self.root.path())
            .finish_non_exhaustive()
    }
}

/// How often expired uploads are looked for (on the next access after this long).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl AssetStore {
    /// A fresh store in a new directory under `base` (the system's temporary directory when
    /// `None`).
    pub(crate) fn create(
        base: Option<&Path>,
        upload_ttl: Duration,
        max_upload: u64,
    ) -> std::io::Result<AssetStore> {
        let root = ScratchDir::create(base, "comfy-worker-assets")?;
        std::fs::create_dir_all(root.path().join("blobs"))?;
        std::fs::create_dir_all(root.path().join("tmp"))?;
        debug!(dir = %root.path().display(), "asset store created");
        Ok(AssetStore {
            root,
            upload_ttl,
            max_upload,
            index: Mutex::new(Index::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if index
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            index.last_sweep = Some(now);
            let wall = SystemTime::now();
            let expired: Vec<String> = index
                .records
                .values()
                .filter(|r| r.expires.is_some_and(|e| e <= wall))
                .map(|r| r.id.clone())
                .collect();
            for id in expired {
                if let Some(path) = self.remove_record(&mut index, &id) {
                    remove_file(&path);
                }
            }
        }
        index
    }

    /// Where a blob's bytes are.
    pub(crate) fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.path().join("blobs").join(hex)
    }

    fn temp_path(&self) -> PathBuf {
        self.root
            .path()
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    /// Starts taking an upload's bytes (written to a temporary file, hashed as they come).
    pub(crate) async fn ingest(&self) -> Result<Ingest, IngestError> {
        let path = self.temp_path();
        let file = tokio::fs::File::create(&path).await?;
        Ok(Ingest {
            file,
            path,
            hasher: blake3::Hasher::new(),
            size: 0,
            max: self.max_upload,
        })
    }

    /// Records an upload over `bytes` (taken by [`AssetStore::ingest`]): the existing record
    /// when one with the same bytes and `file_path` is live (its retention extended), else a
    /// new one. Returns it, and whether the bytes were new to the store.
    pub(crate) fn add_upload(
        &self,
        bytes: Ingested,
        content_type: String,
        file_path: Option<String>,
        expires_in: Option<Duration>,
    ) -> std::io::Result<(AssetRecord, bool)> {
        let expires = SystemTime::now() + expires_in.unwrap_or(self.upload_ttl);
        let mut index = self.lock();
        let new_blob = !index.blobs.contains_key(&bytes.hex);
        if new_blob {
            std::fs::rename(&bytes.path, self.blob_path(&bytes.hex))?;
            index.blobs.insert(
                bytes.hex.clone(),
                Blob {
                    size: bytes.size,
                    refs: 0,
                },
            );
        } else {
            remove_file(&bytes.path);
        }
        let same = index
            .records
            .values_mut()
            .find(|r| r.job_id.is_none() && r.hash_hex == bytes.hex && r.file_path == file_path);
        if let Some(record) = same {
            // Re-referencing content extends its retention, never shortens it.
            if record.expires.is_some_and(|e| e < expires) {
                record.expires = Some(expires);
            }
            return Ok((record.clone(), new_blob));
        }
        let record = AssetRecord {
            id: uuid::Uuid::new_v4().to_string(),
            hash_hex: bytes.hex.clone(),
            size: bytes.size,
            content_type,
            file_path,
            created: SystemTime::now(),
            expires: Some(expires),
            job_id: None,
        };
        self.insert(&mut index, record.clone());
        Ok((record, new_blob))
    }

    fn insert(&self, index: &mut Index, record: AssetRecord) {
        if let Some(blob) = index.blobs.get_mut(&record.hash_hex) {
            blob.refs += 1;
        }
        index.records.insert(record.id.clone(), record);
    }

    /// `POST /api/v2/assets/from-hash`: a record over bytes the store already has; the live
    /// upload record with the same bytes and `file_path` when there is one (`false`), else a
    /// new one (`true`). `None` when the store has no such bytes.
    pub(crate) fn mint_from_hash(
        &self,
        hex: &str,
        file_path: Option<String>,
        expires_in: Option<Duration>,
    ) -> Option<(AssetRecord, bool)> {
        let expires = SystemTime::now() + expires_in.unwrap_or(self.upload_ttl);
        let mut index = self.lock();
        let size = index.blobs.get(hex)?.size;
        let same = index
            .records
            .values_mut()
            .find(|r| r.job_id.is_none() && r.hash_hex == hex && r.file_path == file_path);
        if let Some(record) = same {
            if record.expires.is_some_and(|e| e < expires) {
                record.expires = Some(expires);
            }
            return Some((record.clone(), false));
        }
        let content_type = index
            .records
            .values()
            .find(|r| r.hash_hex == hex)
            .map(|r| r.content_type.clone())
            .or_else(|| {
                file_path
                    .as_deref()
                    .map(|p| crate::media_type::content_type_for(p, None))
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        let record = AssetRecord {
            id: uuid::Uuid::new_v4().to_string(),
            hash_hex: hex.to_owned(),
            size,
            content_type,
            file_path,
            created: SystemTime::now(),
            expires: Some(expires),
            job_id: None,
        };
        self.insert(&mut index, record.clone());
        Some((record, true))
    }

    /// Stores a job's output (its bytes hashed here) and records it.
    pub(crate) async fn add_output(
        &self,
        job_id: &str,
        bytes: &[u8],
        content_type: String,
        name: String,
    ) -> std::io::Result<AssetRecord> {
        let hex = hex_of(&blake3::hash(bytes));
        loop {
            let have = self.lock().blobs.contains_key(&hex);
            let temp = if have {
                None
            } else {
                let path = self.temp_path();
                tokio::fs::write(&path, bytes).await?;
                Some(path)
            };
            if let Some(record) =
                self.commit_output(job_id, &hex, bytes.len() as u64, temp, &content_type, &name)?
            {
                return Ok(record);
            }
            // The bytes went between the two looks: write them again.
        }
    }

    /// Records an output over `hex` (its bytes in `temp` when they were new); `None` when the
    /// blob it counted on went meanwhile.
    fn commit_output(
        &self,
        job_id: &str,
        hex: &str,
        size: u64,
        temp: Option<PathBuf>,
        content_type: &str,
        name: &str,
    ) -> std::io::Result<Option<AssetRecord>> {
        let mut index = self.lock();
        match temp {
            Some(path) if !index.blobs.contains_key(hex) => {
                std::fs::rename(&path, self.blob_path(hex))?;
                index.blobs.insert(hex.to_owned(), Blob { size, refs: 0 });
            }
            Some(path) => remove_file(&path),
            None if !index.blobs.contains_key(hex) => return Ok(None),
            None => {}
        }
        let record = AssetRecord {
            id: uuid::Uuid::new_v4().to_string(),
            hash_hex: hex.to_owned(),
            size,
            content_type: content_type.to_owned(),
            file_path: Some(name.to_owned()),
            created: SystemTime::now(),
            expires: None,
            job_id: Some(job_id.to_owned()),
        };
        self.insert(&mut index, record.clone());
        Ok(Some(record))
    }

    /// A live record.
    pub(crate) fn get(&self, id: &str) -> Option<AssetRecord> {
        let index = self.lock();
        let record = index.records.get(id)?;
        if record.expires.is_some_and(|e| e <= SystemTime::now()) {
            return None;
        }
        Some(record.clone())
    }

    /// A live record over these bytes (the most recent), for a reference that names only a hash.
    pub(crate) fn find_by_hash(&self, hex: &str) -> Option<AssetRecord> {
        let index = self.lock();
        let now = SystemTime::now();
        index
            .records
            .values()
            .filter(|r| r.hash_hex == hex && r.expires.is_none_or(|e| e > now))
            .max_by_key(|r| r.created)
            .cloned()
    }

    /// Whether the store has these bytes (`HEAD /api/v2/assets/by-hash/{hash}`).
    pub(crate) fn has_blob(&self, hex: &str) -> bool {
        self.lock().blobs.contains_key(hex)
    }

    /// `DELETE /api/v2/assets/{id}`: an upload's record goes (its bytes too, unless something
    /// else uses them); a job's output stays as long as its job.
    pub(crate) fn delete(&self, id: &str) -> Result<(), DeleteRefused> {
        let mut index = self.lock();
        match index.records.get(id) {
            None => return Err(DeleteRefused::NotFound),
            Some(r) if r.expires.is_some_and(|e| e <= SystemTime::now()) => {
                return Err(DeleteRefused::NotFound)
            }
            Some(r) if r.job_id.is_some() => return Err(DeleteRefused::InUse),
            Some(_) => {}
        }
        let path = self.remove_record(&mut index, id);
        drop(index);
        if let Some(path) = path {
            remove_file(&path);
        }
        Ok(())
    }

    /// Holds a blob for a job; false when the store does not have it.
    pub(crate) fn pin(&self, hex: &str) -> bool {
        match self.lock().blobs.get_mut(hex) {
            Some(blob) => {
                blob.refs += 1;
                true
            }
            None => false,
        }
    }

    /// Lets go of blobs a job held.
    pub(crate) fn unpin(&self, hexes: &[String]) {
        let mut index = self.lock();
        let paths: Vec<PathBuf> = hexes
            .iter()
            .filter_map(|hex| self.unref(&mut index, hex))
            .collect();
        drop(index);
        for path in paths {
            remove_file(&path);
        }
    }

    /// Drops the outputs of jobs that are gone.
    pub(crate) fn forget_jobs(&self, job_ids: &[String]) {
        if job_ids.is_empty() {
            return;
        }
        let mut index = self.lock();
        let ids: Vec<String> = index
            .records
            .values()
            .filter(|r| r.job_id.as_ref().is_some_and(|j| job_ids.contains(j)))
            .map(|r| r.id.clone())
            .collect();
        let paths: Vec<PathBuf> = ids
            .iter()
            .filter_map(|id| self.remove_record(&mut index, id))
            .collect();
        drop(index);
        for path in paths {
            remove_file(&path);
        }
    }

    /// Removes a record; the path of its blob when nothing uses it any more.
    fn remove_record(&self, index: &mut Index, id: &str) -> Option<PathBuf> {
        let record = index.records.remove(id)?;
        self.unref(index, &record.hash_hex)
    }

    fn unref(&self, index: &mut Index, hex: &str) -> Option<PathBuf> {
        let blob = index.blobs.get_mut(hex)?;
        blob.refs = blob.refs.saturating_sub(1);
        if blob.refs == 0 {
            index.blobs.remove(hex);
            return Some(self.blob_path(hex));
        }
        None
    }

    /// Records and blobs held (for tests).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let index = self.lock();
        (index.records.len(), index.blobs.len())
    }
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(file = %path.display(), error = %e, "could not delete an asset file");
        }
    }
}

/// An upload's bytes being taken: written to a temporary file and hashed as they come.
pub(crate) struct Ingest {
    file: tokio::fs::File,
    path: PathBuf,
    hasher: blake3::Hasher,
    size: u64,
    max: u64,
}

/// An upload's bytes, taken: where they are, their hash and size.
#[derive(Debug)]
pub(crate) struct Ingested {
    path: PathBuf,
    pub(crate) hex: String,
    pub(crate) size: u64,
}

impl Ingest {
    /// Takes the next chunk; refuses one that brings the file past the limit.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), IngestError> {
        self.size += chunk.len() as u64;
        if self.size > self.max {
            return Err(IngestError::TooLarge(self.max));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await?;
        Ok(())
    }

    /// All bytes taken.
    pub(crate) async fn finish(mut self) -> Result<Ingested, IngestError> {
        self.file.flush().await?;
        self.file.sync_data().await.ok();
        let path = std::mem::take(&mut self.path);
        Ok(Ingested {
            path,
            hex: hex_of(&self.hasher.finalize()),
            size: self.size,
        })
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // Abandoned (or finished: then the path was taken and is empty).
        if !self.path.as_os_str().is_empty() {
            remove_file(&self.path);
        }
    }
}

impl Drop for Ingested {
    fn drop(&mut self) {
        // Renamed into the blobs, or removed as a duplicate; else (a failed rename) cleaned up.
        if self.path.exists() {
            remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn upload(store: &AssetStore, bytes: &[u8], path: &str) -> (AssetRecord, bool) {
        let mut ingest = store.ingest().await.unwrap();
        ingest.write(bytes).await.unwrap();
        let taken = ingest.finish().await.unwrap();
        store
            .add_upload(taken, "image/png".into(), Some(path.into()), None)
            .unwrap()
    }

    #[tokio::test]
    async fn uploads_dedup_by_content_and_blobs_go_with_their_last_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::create(Some(dir.path()), Duration::from_secs(60), 1000).unwrap();
        let (a, new) = upload(&store, b"hello", "a.png").await;
        assert!(new);
        assert_eq!(a.hash_hex, hex_of(&blake3::hash(b"hello")));
        assert_eq!(a.size, 5);
        let (again, new) = upload(&store, b"hello", "a.png").await;
        assert!(!new);
        assert_eq!(again.id, a.id, "same bytes, same path: the same record");
        let (b, new) = upload(&store, b"hello", "b.png").await;
        assert!(!new);
        assert_ne!(b.id, a.id);
        assert_eq!(store.counts(), (2, 1));
        assert!(store.has_blob(&a.hash_hex));
        // A job holds the bytes while both records go.
        assert!(store.pin(&a.hash_hex));
        store.delete(&a.id).unwrap();
        assert_eq!(store.delete(&a.id), Err(DeleteRefused::NotFound));
        store.delete(&b.id).unwrap();
        assert!(store.blob_path(&a.hash_hex).exists());
        store.unpin(std::slice::from_ref(&a.hash_hex));
        assert!(!store.blob_path(&a.hash_hex).exists());
        assert_eq!(store.counts(), (0, 0));
        // from-hash needs bytes the store has.
        assert!(store.mint_from_hash(&a.hash_hex, None, None).is_none());
    }

    #[tokio::test]
    async fn outputs_go_with_their_job_and_cannot_be_deleted_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::create(Some(dir.path()), Duration::from_secs(60), 1000).unwrap();
        let out = store
            .add_output("job-1", b"png", "image/png".into(), "x.png".into())
            .await
            .unwrap();
        assert_eq!(store.delete(&out.id), Err(DeleteRefused::InUse));
        let (minted, created) = store
            .mint_from_hash(&out.hash_hex, Some("again.png".into()), None)
            .unwrap();
        assert!(created);
        assert_eq!(minted.content_type, "image/png");
        store.forget_jobs(&["job-1".into()]);
        assert!(store.get(&out.id).is_none());
        assert!(
            store.get(&minted.id).is_some(),
            "the minted record keeps the bytes"
        );
        assert!(store.blob_path(&out.hash_hex).exists());
    }

    #[tokio::test]
    async fn an_upload_past_the_limit_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::create(Some(dir.path()), Duration::from_secs(60), 4).unwrap();
        let mut ingest = store.ingest().await.unwrap();
        ingest.write(b"abc").await.unwrap();
        assert!(matches!(
            ingest.write(b"de").await,
            Err(IngestError::TooLarge(4))
        ));
        drop(ingest);
        let root = dir
            .path()
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(root.join("tmp").read_dir().unwrap().count(), 0);
        drop(store);
        assert!(!root.exists(), "the store's directory goes with it");
    }

    #[test]
    fn hashes_are_blake3_hex() {
        let h = format!("blake3:{}", "A".repeat(64));
        assert_eq!(parse_hash(&h), Some("a".repeat(64)));
        assert_eq!(parse_hash("blake3:abc"), None);
        assert_eq!(parse_hash(&"a".repeat(64)), None);
    }
}
