//! Waiting for ComfyUI to answer before a job's prompt is queued, with the start script's PID
//! file deciding how long: while the ComfyUI process lives, without limit; once it is gone, not
//! at all.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::comfy::ComfyClient;
use crate::config::Settings;

/// Why ComfyUI never became ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The process named by the PID file has exited.
    #[error("ComfyUI server ({host}) not reachable: the ComfyUI process (pid {pid} from {pid_file}) has exited; see its log")]
    ProcessExited {
        /// `host:port`.
        host: String,
        /// The PID the file named.
        pid: u32,
        /// The PID file.
        pid_file: String,
    },
    /// Without a PID file: every retry failed.
    #[error(
        "ComfyUI server ({host}) not reachable after multiple retries. Last error: {last_error}"
    )]
    GaveUp {
        /// `host:port`.
        host: String,
        /// The last call's error.
        last_error: String,
    },
    /// The job was cancelled while waiting.
    #[error("Job cancelled while waiting for ComfyUI")]
    Cancelled,
}

/// Waits until ComfyUI answers `/system_stats`.
///
/// With a PID file (written by the start script) it waits as long as that process lives
/// and fails at once when it dies; without one it tries `COMFY_API_AVAILABLE_MAX_RETRIES`
/// times (500 when 0), every `COMFY_API_AVAILABLE_INTERVAL_MS`.
pub async fn wait_until_ready(
    comfy: &ComfyClient,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<(), NotReady> {
    let host = comfy.host().to_owned();
    let started = Instant::now();
    let mut last_log = Instant::now();
    let mut attempts: u32 = 0;
    loop {
        let err = match comfy.system_stats().await {
            Ok(_) => {
                if attempts > 0 {
                    info!(host = %host, waited_ms = started.elapsed().as_millis() as u64, "ComfyUI is ready");
                }
                return Ok(());
            }
            Err(e) => e,
        };
        attempts += 1;
        match comfy_process_state(&settings.comfy_pid_file) {
            ProcessState::Dead(pid) => {
                return Err(NotReady::ProcessExited {
                    host,
                    pid,
                    pid_file: settings.comfy_pid_file.display().to_string(),
                })
            }
            ProcessState::Alive => {}
            ProcessState::NoPidFile => {
                if attempts >= settings.readiness_attempts() {
                    return Err(NotReady::GaveUp {
                        host,
                        last_error: err.to_string(),
                    });
                }
            }
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            info!(host = %host, waited_s = started.elapsed().as_secs(), error = %err, "still waiting for ComfyUI");
            last_log = Instant::now();
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(NotReady::Cancelled),
            _ = tokio::time::sleep(settings.api_available_interval) => {}
        }
    }
}

enum ProcessState {
    NoPidFile,
    Alive,
    Dead(u32),
}

/// Reads the start script's PID file and checks the process (Linux `/proc`; zombies count as dead).
fn comfy_process_state(pid_file: &Path) -> ProcessState {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return ProcessState::NoPidFile;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return ProcessState::NoPidFile;
    };
    if !Path::new("/proc").exists() {
        return ProcessState::Alive;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => ProcessState::Dead(pid),
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if matches!(state, Some('Z') | Some('X')) {
                ProcessState::Dead(pid)
            } else {
                ProcessState::Alive
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_states() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("comfyui.pid");
        assert!(matches!(
            comfy_process_state(&file),
            ProcessState::NoPidFile
        ));
        std::fs::write(&file, std::process::id().to_string()).unwrap();
        assert!(matches!(comfy_process_state(&file), ProcessState::Alive));
        std::fs::write(&file, "999999999").unwrap();
        assert!(matches!(
            comfy_process_state(&file),
            ProcessState::Dead(999999999)
        ));
    }
}
