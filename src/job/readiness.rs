//! Waiting for ComfyUI to answer before a job's prompt is queued. How long: while the ComfyUI
//! process of the start script's PID file (`COMFY_PID_FILE`) lives, without limit; once it is
//! gone, not at all; without one, `COMFY_READY_TIMEOUT_S`. From the first failed call on, the
//! wait is reported ([`Waiting`]) so nobody stares at a silent screen.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::comfy::{ComfyClient, ComfyError};
use crate::config::Settings;

/// How long the last call of a wait may run past its deadline.
const LAST_TRY: Duration = Duration::from_secs(2);

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
    /// Without a live ComfyUI process: no answer within the readiness timeout.
    #[error("ComfyUI server ({host}) not reachable after {} (COMFY_READY_TIMEOUT_S). Last error: {last_error}", seconds(*.waited))]
    GaveUp {
        /// `host:port`.
        host: String,
        /// How long it was tried.
        waited: Duration,
        /// The last call's error.
        last_error: String,
    },
    /// The job was cancelled while waiting.
    #[error("Job cancelled while waiting for ComfyUI")]
    Cancelled,
}

/// `10 s`, `2.5 s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// A wait in progress, as users are told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// `host:port`.
    pub host: String,
    /// Why the last call failed, shortly (`connection refused`).
    pub reason: String,
    /// How long the wait may last.
    pub limit: WaitLimit,
}

/// How long a wait for ComfyUI may last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitLimit {
    /// As long as this ComfyUI process lives (it is probably still loading).
    WhileProcessLives(u32),
    /// This long in all.
    For(Duration),
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "waiting for ComfyUI at {} ({}; ", self.host, self.reason)?;
        match &self.limit {
            WaitLimit::WhileProcessLives(pid) => write!(f, "its process {pid} is starting)"),
            WaitLimit::For(d) => write!(f, "up to {})", seconds(*d)),
        }
    }
}

/// Waits until ComfyUI answers `/system_stats`; `on_wait` hears of the wait at the first failed
/// call and whenever its reason changes.
pub async fn wait_until_ready(
    comfy: &ComfyClient,
    settings: &Settings,
    cancel: &CancellationToken,
    on_wait: &mut (dyn FnMut(&Waiting) + Send),
) -> Result<(), NotReady> {
    let host = comfy.host().to_owned();
    let started = Instant::now();
    let timeout = settings.ready_timeout();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_log = Instant::now();
    let mut told: Option<Waiting> = None;
    loop {
        // The last try may outlive the deadline a little, so a refused or failed call is
        // reported with its own reason rather than as a cut-off one.
        let bound = deadline.max(tokio::time::Instant::now() + LAST_TRY);
        let call = tokio::time::timeout_at(bound, comfy.system_stats());
        let err = tokio::select! {
            _ = cancel.cancelled() => return Err(NotReady::Cancelled),
            answer = call => match answer {
                Ok(Ok(_)) => {
                    if told.is_some() {
                        info!(host = %host, waited_ms = started.elapsed().as_millis() as u64, "ComfyUI is ready");
                    }
                    return Ok(());
                }
                Ok(Err(e)) => short_reason(&e),
                Err(_) => "no answer".to_owned(),
            },
        };
        let process = settings
            .comfy_pid_file
            .as_deref()
            .map_or(ProcessState::NoPidFile, comfy_process_state);
        let limit = match process {
            ProcessState::Dead(pid) => {
                return Err(NotReady::ProcessExited {
                    host,
                    pid,
                    pid_file: settings
                        .comfy_pid_file
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                })
            }
            ProcessState::Alive(pid) => WaitLimit::WhileProcessLives(pid),
            ProcessState::NoPidFile => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(NotReady::GaveUp {
                        host,
                        waited: timeout,
                        last_error: err,
                    });
                }
                WaitLimit::For(timeout)
            }
        };
        let waiting = Waiting {
            host: host.clone(),
            reason: err,
            limit,
        };
        if told.as_ref() != Some(&waiting) {
            if told.is_none() {
                info!(host = %host, reason = %waiting.reason, "waiting for ComfyUI");
            }
            on_wait(&waiting);
            told = Some(waiting);
        } else if last_log.elapsed() >= Duration::from_secs(10) {
            info!(host = %host, waited_s = started.elapsed().as_secs(), reason = %waiting.reason, "still waiting for ComfyUI");
            last_log = Instant::now();
        }
        let pause = tokio::time::sleep(settings.api_available_interval);
        tokio::select! {
            _ = cancel.cancelled() => return Err(NotReady::Cancelled),
            _ = pause => {}
        }
    }
}

/// The gist of a failed call: its innermost cause, without the OS error number
/// (`connection refused`), or the HTTP status.
fn short_reason(e: &ComfyError) -> String {
    match e {
        ComfyError::Unreachable { detail, .. } => {
            let last = detail.rsplit(": ").next().unwrap_or(detail);
            let last = match last.find(" (os error") {
                Some(i) => &last[..i],
                None => last,
            };
            let mut chars = last.trim().chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => "no answer".to_owned(),
            }
        }
        other => other.to_string(),
    }
}

/// The ComfyUI process a job's prompt runs in, per the start script's PID file: watched
/// during the prompt, so a ComfyUI that exits or is replaced ends the job at once instead of
/// after the reconnect window.
#[derive(Debug, Clone)]
pub struct ProcessWatch {
    pid_file: PathBuf,
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
    /// The process the PID file names now (none without a PID file or a readable one: nothing
    /// to watch).
    pub fn start(pid_file: Option<&Path>) -> ProcessWatch {
        ProcessWatch {
            pid_file: pid_file.map(Path::to_owned).unwrap_or_default(),
            pid: pid_file.and_then(read_pid),
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
    Alive(u32),
    Dead(u32),
}

/// Reads the start script's PID file and checks the process (Linux `/proc`; zombies count as dead).
fn comfy_process_state(pid_file: &Path) -> ProcessState {
    match read_pid(pid_file) {
        None => ProcessState::NoPidFile,
        Some(pid) if process_alive(pid) => ProcessState::Alive(pid),
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
        assert!(matches!(comfy_process_state(&file), ProcessState::Alive(_)));
        std::fs::write(&file, "999999999").unwrap();
        assert!(matches!(
            comfy_process_state(&file),
            ProcessState::Dead(999999999)
        ));
    }
}
