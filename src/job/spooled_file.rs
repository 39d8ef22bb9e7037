//! Output files kept on the worker's disk between `/view` and the result, so a job's outputs are
//! never all held in memory: each is streamed from ComfyUI into a file of the engine's spool
//! folder, and read back in pieces as it is base64-encoded into the result body or uploaded to a
//! bucket. A file is removed when the last output entry holding it is dropped (after the result
//! was delivered); the folder when the engine is. Where no folder can be made (a read-only
//! disk), outputs stay in memory as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::warn;

use crate::scratch_dir::ScratchDir;

/// The engine's spool folder; files in it keep it alive.
#[derive(Debug)]
pub struct Spool {
    dir: ScratchDir,
}

impl Spool {
    /// A new folder under the system's temporary directory (`TMPDIR`),
    /// `comfy-worker-outputs-<pid>-<random>`.
    pub fn create() -> std::io::Result<Arc<Spool>> {
        let dir = ScratchDir::create(None, "comfy-worker-outputs")?;
        Ok(Arc::new(Spool { dir }))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path for a new file (not created yet).
    pub fn new_path(&self) -> PathBuf {
        self.dir()
            .join(format!("{}.out", uuid::Uuid::new_v4().simple()))
    }
}

/// One output's bytes in a file of the spool.
#[derive(Debug)]
pub struct SpooledFile {
    path: PathBuf,
    len: u64,
    _spool: Arc<Spool>,
}

impl SpooledFile {
    /// The file at `path` in `spool`, `len` bytes long, written already; removed when dropped.
    pub fn new(spool: Arc<Spool>, path: PathBuf, len: u64) -> SpooledFile {
        SpooledFile {
            path,
            len,
            _spool: spool,
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Up to `len` bytes from `start` (fewer at the end).
    pub async fn read_range(&self, start: u64, len: usize) -> std::io::Result<Bytes> {
        let mut file = tokio::fs::File::open(&self.path).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
        let want = (self.len.saturating_sub(start)).min(len as u64) as usize;
        let mut buf = vec![0u8; want];
        file.read_exact(&mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// All of it, read without blocking.
    pub async fn read_all(&self) -> std::io::Result<Bytes> {
        let bytes = tokio::fs::read(&self.path).await?;
        self.check(bytes.len())?;
        Ok(Bytes::from(bytes))
    }

    /// All of it, read on the calling thread (serialisation, which cannot wait).
    pub fn read_all_blocking(&self) -> std::io::Result<Vec<u8>> {
        let bytes = std::fs::read(&self.path)?;
        self.check(bytes.len())?;
        Ok(bytes)
    }

    fn check(&self, read: usize) -> std::io::Result<()> {
        if read as u64 == self.len {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the spooled output {} changed size ({} bytes, {read} now)",
                self.path.display(),
                self.len
            )))
        }
    }
}

impl Drop for SpooledFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(file = %self.path.display(), error = %e, "could not remove a spooled output");
            }
        }
    }
}
