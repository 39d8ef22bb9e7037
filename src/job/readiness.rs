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

/// The ComfyUI process a job's prompt runs in, per the start script's PID file: watched
/// during the prompt, so a ComfyUI that exits or is replaced ends the job at once instead of
/// after the reconnect window.
#[derive(Debug, Clone)]
pub struct ProcessWatch {
    pid_file: std::path::PathBuf,
    pid: Option<u32>,
}

/// How the watched ComfyUI process went away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessEnded {
    /// The process exited (or is a zombie).
    #[error("ComfyUI stopped responding: the ComfyUI process (pid {pid} from {pid_file}) exited during the job; see its log")]
    Exited {
        /// Its PID.
        pid: u32,
        /// The PID file.
        pid_file: String,
    },
    /// Another process took its place (ComfyUI was restarted): the prompt went with the old one.
    #[error("ComfyUI restarted during the job (pid {old} became {new} in {pid_file}); the prompt was lost; submit the job again")]
    Replaced {
        /// The PID the job started with.
        old: u32,
        /// The PID the file names now.
        new: u32,
        /// The PID file.
        pid_file: String,
    },
}

impl ProcessWatch {
    /// The process the PID file names now (none without a readable PID file: nothing to watch).
    pub fn start(pid_file: &Path) -> ProcessWatch {
        ProcessWatch {
            pid_file: pid_file.to_owned(),
            pid: read_pid(pid_file),
        }
    }

    /// Resolves once the process exited or the PID file names another one; checked `every`
    /// interval. Never resolves when there was nothing to watch.
    pub async fn ended(&self, every: Duration) -> ProcessEnded {
        let Some(pid) = self.pid else {
            return std::future::pending().await;
        };
        let pid_file = || self.pid_file.display().to_string();
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match read_pid(&self.pid_file) {
                Some(new) if new != pid && process_alive(new) => {
                    return ProcessEnded::Replaced {
                        old: pid,
                        new,
                        pid_file: pid_file(),
                    }
                }
                _ if !process_alive(pid) => {
                    return ProcessEnded::Exited {
                        pid,
                        pid_file: pid_file(),
                    }
                }
                _ => {}
            }
        }
    }
}

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

enum ProcessState {
    NoPidFile,
    Alive,
    Dead(u32),
}

/// Reads the start script's PID file and checks the process (Linux `/proc`; zombies count as dead).
fn comfy_process_state(pid_file: &Path) -> ProcessState {
    match read_pid(pid_file) {
        None => ProcessState::NoPidFile,
        Some(pid) if process_alive(pid) => ProcessState::Alive,
        Some(pid) => ProcessState::Dead(pid),
    }
}

/// Whether a process lives (Linux `/proc`; zombies count as dead; elsewhere, assumed alive).
fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
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
