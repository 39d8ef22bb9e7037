//! A folder of the worker's own for files it keeps for a while (outputs between ComfyUI and the
//! client, `serve`'s large results, the Comfy API v2 assets): `<base>/<prefix>-<pid>-<random>`,
//! removed with its handle. Folders of the same kind left by a worker process that is gone (a
//! SIGKILL, an OOM kill: no `Drop` ran) are removed when the next one is made, so a container
//! whose worker restarts does not fill its disk.

use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

/// The folder; removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new folder `<base>/<prefix>-<pid>-<random>` (`base`: the system's temporary directory
    /// when `None`), after removing the `<prefix>-<pid>-*` folders there whose process is gone.
    pub fn create(base: Option<&Path>, prefix: &str) -> std::io::Result<ScratchDir> {
        let base = base.map_or_else(std::env::temp_dir, Path::to_path_buf);
        remove_orphans(&base, prefix);
        let path = base.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path)?;
        debug!(dir = %path.display(), "scratch folder created");
        Ok(ScratchDir { path })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %self.path.display(), error = %e, "could not remove a scratch folder");
            }
        }
    }
}

/// The pid in a `<prefix>-<pid>-<random>` name, when the name is one.
fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, random) = rest.split_once('-')?;
    (!random.is_empty() && random.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether process `pid` still runs (Linux: its `/proc` entry; elsewhere every folder is
/// assumed to be in use).
fn alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

fn remove_orphans(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = owner(&name.to_string_lossy(), prefix) else {
            continue;
        };
        if alive(pid) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                info!(dir = %entry.path().display(), pid, "removed a folder left by a worker process that is gone")
            }
            Err(e) => {
                debug!(dir = %entry.path().display(), error = %e, "could not remove a left-over folder")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_of_gone_processes_are_removed_and_the_own_one_goes_on_drop() {
        let base =
            std::env::temp_dir().join(format!("scratch-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&base).unwrap();
        // A pid above the kernel's limit (4194304) never runs.
        let gone = base.join("cw-test-4294967-0123abcd");
        let other_kind = base.join("cw-other-4294967-0123abcd");
        let not_ours = base.join("cw-test-notapid-0123abcd");
        let running = base.join(format!("cw-test-{}-0123abcd", std::process::id()));
        for dir in [&gone, &other_kind, &not_ours, &running] {
            std::fs::create_dir_all(dir.join("inner")).unwrap();
        }
        let made = ScratchDir::create(Some(&base), "cw-test").unwrap();
        assert!(made.path().is_dir());
        assert_eq!(
            owner(
                &made.path().file_name().unwrap().to_string_lossy(),
                "cw-test"
            ),
            Some(std::process::id())
        );
        if Path::new("/proc/self").exists() {
            assert!(!gone.exists(), "a gone process's folder is removed");
        }
        assert!(other_kind.exists() && not_ours.exists() && running.exists());
        let path = made.path().to_owned();
        drop(made);
        assert!(!path.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
