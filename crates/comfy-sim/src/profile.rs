//! Which ComfyUI the simulator plays: the recorded 0.3.64 (the default), or `current`, today's
//! ComfyUI as read from its source (≈ v0.38): the six-key `/features`, a newer `/system_stats`
//! with several devices, the jobs API (`/api/jobs`, `/api/jobs/{id}`, cancel), `create_time` in
//! `extra_data`, the canonical-UUID check on a client `prompt_id`, and the `activity: "loading"`
//! phase of a sampler in `progress_state`. Everything else is the same in both.

use serde_json::{json, Value};

/// The ComfyUI version the simulator reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// ComfyUI 0.3.64, as recorded in `tests/fixtures/comfyui`.
    #[default]
    V0_3_64,
    /// Today's ComfyUI (≈ 0.38), from its source.
    Current,
}

/// `--comfy-version` names neither profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownProfile(pub String);

impl std::fmt::Display for UnknownProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown ComfyUI version {:?}: expected 0.3.64 or current",
            self.0
        )
    }
}

impl std::error::Error for UnknownProfile {}

impl std::str::FromStr for Profile {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Profile, UnknownProfile> {
        match s.trim() {
            "0.3.64" => Ok(Profile::V0_3_64),
            "current" => Ok(Profile::Current),
            other => Err(UnknownProfile(other.to_owned())),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::V0_3_64 => "0.3.64",
            Profile::Current => "current",
        })
    }
}

/// The version `current` reports in `/system_stats` (the newest seen in the source).
pub const CURRENT_VERSION: &str = "0.38.1";

impl Profile {
    /// Whether the jobs API (`/api/jobs…`) exists.
    pub fn has_jobs_api(self) -> bool {
        self == Profile::Current
    }

    /// `feature_flags.get_server_features()` (also the WebSocket `feature_flags` reply).
    pub(crate) fn server_features(self) -> Value {
        match self {
            Profile::V0_3_64 => {
                json!({"supports_preview_metadata": true, "max_upload_size": 104_857_600})
            }
            Profile::Current => json!({
                "supports_preview_metadata": true,
                "supports_model_type_tags": true,
                "max_upload_size": 104_857_600,
                "extension": {"manager": {"supports_v4": true}},
                "node_replacements": true,
                "assets": true,
            }),
        }
    }

    /// `GET /system_stats`.
    pub(crate) fn system_stats(self) -> Value {
        const RAM_TOTAL: u64 = 25_276_502_016;
        const RAM_FREE: u64 = 24_167_591_936;
        match self {
            Profile::V0_3_64 => json!({
                "system": {
                    "os": "posix",
                    "ram_total": RAM_TOTAL,
                    "ram_free": RAM_FREE,
                    "comfyui_version": "0.3.64",
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]",
                    "pytorch_version": "2.11.0+cu130",
                    "embedded_python": false,
                    "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"],
                },
                "devices": [{
                    "name": "cpu",
                    "type": "cpu",
                    "index": null,
                    "vram_total": RAM_TOTAL,
                    "vram_free": RAM_FREE,
                    "torch_vram_total": RAM_TOTAL,
                    "torch_vram_free": RAM_FREE,
                }],
            }),
            Profile::Current => {
                const VRAM: u64 = 25_757_220_864;
                let device = |index: u32, free: u64| {
                    json!({
                        "name": format!("cuda:{index} NVIDIA GeForce RTX 4090 : cudaMallocAsync"),
                        "type": "cuda",
                        "index": index,
                        "vram_total": VRAM,
                        "vram_free": free,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    })
                };
                json!({
                    "system": {
                        "os": "linux",
                        "ram_total": RAM_TOTAL,
                        "ram_free": RAM_FREE,
                        "comfyui_version": CURRENT_VERSION,
                        "required_frontend_version": "1.41.3",
                        "installed_templates_version": "0.3.52",
                        "required_templates_version": "0.3.52",
                        "comfy_package_versions": {"comfyui-frontend-package": "1.41.3", "comfyui-workflow-templates": "0.3.52", "comfyui-embedded-docs": "0.3.9"},
                        "python_version": "3.12.11 (main, Sep  9 2026, 07:35:25) [GCC 12.2.0]",
                        "pytorch_version": "2.11.0+cu130",
                        "embedded_python": false,
                        "deploy_environment": "local-git",
                        "argv": ["main.py", "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"],
                    },
                    // The primary device first, "so clients reading devices[0] keep working".
                    "devices": [device(0, 24_112_398_336), device(1, 25_500_000_000)],
                })
            }
        }
    }
}
