//! ComfyUI's health as the operator sees it: `/system_stats` (version, Python and PyTorch,
//! devices with their VRAM) and `/queue` (prompts running and pending), read together within one
//! bound. Shared by `serve`'s `/health` and `comfy-worker health`.

use std::time::Duration;

use serde_json::{json, Value};

use super::client::ComfyClient;
use super::error::ComfyError;
use super::queue::QueueSnapshot;
use super::system_stats::SystemStats;

/// Why `/system_stats` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The call failed.
    #[error(transparent)]
    Comfy(#[from] ComfyError),
    /// No answer within the probe's bound.
    #[error("GET /system_stats did not answer within {} s", .after.as_secs_f64())]
    TimedOut {
        /// The bound.
        after: Duration,
    },
}

/// What one probe found.
#[derive(Debug)]
pub struct ComfyHealth {
    /// The address probed.
    pub host: String,
    /// `/system_stats`, or why it could not be read.
    pub stats: Result<SystemStats, ProbeError>,
    /// `/queue`, when it could be read.
    pub queue: Option<QueueSnapshot>,
}

/// Reads `/system_stats` and `/queue` at once; each is bounded by `timeout`.
pub async fn probe(client: &ComfyClient, timeout: Duration) -> ComfyHealth {
    let (stats, queue) = tokio::join!(
        tokio::time::timeout(timeout, client.system_stats()),
        tokio::time::timeout(timeout, client.queue()),
    );
    let stats = match stats {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ProbeError::Comfy(e)),
        Err(_) => Err(ProbeError::TimedOut { after: timeout }),
    };
    ComfyHealth {
        host: client.host().to_owned(),
        stats,
        queue: queue.ok().and_then(Result::ok),
    }
}

impl ComfyHealth {
    /// True when ComfyUI answered `/system_stats`.
    pub fn reachable(&self) -> bool {
        self.stats.is_ok()
    }

    /// The `comfyui` object of `/health`: `{"reachable", "host", "error"?, "version"?,
    /// "python_version"?, "pytorch_version"?, "devices"?: [{"name", "type", "vram_total",
    /// "vram_free"}], "queue"?: {"running", "pending"}}`.
    pub fn to_json(&self) -> Value {
        let mut out = json!({ "reachable": self.reachable(), "host": self.host });
        match &self.stats {
            Err(e) => out["error"] = json!(e.to_string()),
            Ok(stats) => {
                let system = &stats.system;
                for (key, value) in [
                    ("version", &system.comfyui_version),
                    ("python_version", &system.python_version),
                    ("pytorch_version", &system.pytorch_version),
                ] {
                    if let Some(v) = value {
                        out[key] = json!(v);
                    }
                }
                out["devices"] = stats
                    .devices
                    .iter()
                    .map(|d| {
                        json!({
                            "name": d.name,
                            "type": d.kind,
                            "vram_total": d.vram_total,
                            "vram_free": d.vram_free,
                        })
                    })
                    .collect();
            }
        }
        if let Some(q) = &self.queue {
            out["queue"] = json!({ "running": q.running.len(), "pending": q.pending.len() });
        }
        out
    }

    /// Readable lines for the terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.stats {
            Err(e) => lines.push(format!("ComfyUI at {}: unreachable ({e})", self.host)),
            Ok(stats) => {
                let system = &stats.system;
                lines.push(format!(
                    "ComfyUI at {}: reachable, version {}",
                    self.host,
                    system.comfyui_version.as_deref().unwrap_or("unknown")
                ));
                if let Some(p) = &system.python_version {
                    // `sys.version` carries the build on the same line; the number is enough.
                    let short = p.split_whitespace().next().unwrap_or(p);
                    lines.push(format!("  python {short}"));
                }
                if let Some(t) = &system.pytorch_version {
                    lines.push(format!("  pytorch {t}"));
                }
                for d in &stats.devices {
                    lines.push(format!(
                        "  device {} ({}): VRAM {} free of {}",
                        d.name,
                        d.kind,
                        gib(d.vram_free),
                        gib(d.vram_total)
                    ));
                }
            }
        }
        match &self.queue {
            Some(q) => lines.push(format!(
                "  queue: {} running, {} pending",
                q.running.len(),
                q.pending.len()
            )),
            None if self.reachable() => lines.push("  queue: unknown (GET /queue failed)".into()),
            None => {}
        }
        lines
    }
}

/// Bytes as GiB with one decimal.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::system_stats::{DeviceInfo, SystemInfo};

    #[test]
    fn json_and_lines() {
        let h = ComfyHealth {
            host: "127.0.0.1:8188".into(),
            stats: Ok(SystemStats {
                system: SystemInfo {
                    comfyui_version: Some("0.3.64".into()),
                    pytorch_version: Some("2.8.0+cu128".into()),
                    python_version: Some("3.12.3 (main) [GCC]".into()),
                },
                devices: vec![DeviceInfo {
                    name: "cuda:0 NVIDIA L4".into(),
                    kind: "cuda".into(),
                    vram_total: 24 << 30,
                    vram_free: 12 << 30,
                }],
            }),
            queue: Some(QueueSnapshot {
                running: vec!["a".into()],
                pending: vec!["b".into(), "c".into()],
            }),
        };
        let j = h.to_json();
        assert_eq!(j["reachable"], true);
        assert_eq!(j["version"], "0.3.64");
        assert_eq!(j["devices"][0]["type"], "cuda");
        assert_eq!(j["devices"][0]["vram_free"], 12u64 << 30);
        assert_eq!(j["queue"], json!({"running": 1, "pending": 2}));
        let text = h.lines().join("\n");
        assert!(text.contains("python 3.12.3\n"), "{text}");
        assert!(text.contains("VRAM 12.0 GiB free of 24.0 GiB"), "{text}");
        assert!(text.contains("queue: 1 running, 2 pending"), "{text}");

        let down = ComfyHealth {
            host: "h:1".into(),
            stats: Err(ProbeError::Comfy(ComfyError::Unreachable {
                host: "h:1".into(),
                what: "GET /system_stats".into(),
                detail: "connection refused".into(),
            })),
            queue: None,
        };
        let error = "ComfyUI at h:1 is not reachable (GET /system_stats): connection refused";
        assert_eq!(down.to_json()["reachable"], false);
        assert_eq!(down.to_json()["error"], error);
        assert_eq!(
            down.lines(),
            vec![format!("ComfyUI at h:1: unreachable ({error})")]
        );
        let slow = ComfyHealth {
            host: "h:1".into(),
            stats: Err(ProbeError::TimedOut {
                after: Duration::from_millis(1500),
            }),
            queue: None,
        };
        assert_eq!(
            slow.to_json()["error"],
            "GET /system_stats did not answer within 1.5 s"
        );
    }
}
