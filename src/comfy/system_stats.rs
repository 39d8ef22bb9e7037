//! `/system_stats`: ComfyUI's version, Python, devices and memory.

use serde::{Deserialize, Serialize};

/// A subset of `/system_stats`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct SystemStats {
    /// `system` block.
    #[serde(default)]
    pub system: SystemInfo,
    /// Compute devices.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// `system_stats.system`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct SystemInfo {
    /// ComfyUI version.
    #[serde(default)]
    pub comfyui_version: Option<String>,
    /// PyTorch version.
    #[serde(default)]
    pub pytorch_version: Option<String>,
    /// Python version (`sys.version`, with its build line).
    #[serde(default)]
    pub python_version: Option<String>,
}

/// `system_stats.devices[]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
pub struct DeviceInfo {
    /// Device name.
    #[serde(default)]
    pub name: String,
    /// `cuda`, `cpu`, ...
    #[serde(default, rename = "type")]
    pub kind: String,
    /// VRAM bytes.
    #[serde(default)]
    pub vram_total: u64,
    /// Free VRAM bytes.
    #[serde(default)]
    pub vram_free: u64,
}
