//! Live-preview settings: how many previews a job relays, and how large they may be
//! (`PREVIEW_MAX_PER_S`, `PREVIEW_MAX_BYTES`, `PREVIEW_MAX_SIDE`, `RUNPOD_PREVIEWS`).

use super::env::{ConfigError, EnvReader};

/// What previews ComfyUI sends are relayed, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewPolicy {
    /// `PREVIEW_MAX_PER_S` (2): at most this many previews a second per job; `0` relays none.
    pub max_per_second: f64,
    /// `PREVIEW_MAX_BYTES` (131072): a larger preview is not relayed.
    pub max_bytes: usize,
    /// `PREVIEW_MAX_SIDE` (512, ComfyUI's own default preview size): a preview whose longer side
    /// is larger is not relayed.
    pub max_side: u32,
    /// `RUNPOD_PREVIEWS` (false): every job's RunPod progress posts carry its latest preview
    /// (otherwise only a job asking with `input.previews: true` gets them: `/status` bodies are
    /// meant to be small).
    pub runpod: bool,
}

impl Default for PreviewPolicy {
    fn default() -> Self {
        PreviewPolicy {
            max_per_second: 2.0,
            max_bytes: 128 * 1024,
            max_side: 512,
            runpod: false,
        }
    }
}

impl PreviewPolicy {
    pub(crate) fn read<F: Fn(&str) -> Option<String>>(
        r: &EnvReader<F>,
    ) -> Result<PreviewPolicy, ConfigError> {
        let d = PreviewPolicy::default();
        Ok(PreviewPolicy {
            max_per_second: r.number("PREVIEW_MAX_PER_S", d.max_per_second)?,
            max_bytes: r.count("PREVIEW_MAX_BYTES", d.max_bytes as u32)? as usize,
            max_side: r.count("PREVIEW_MAX_SIDE", d.max_side)?,
            runpod: r.flag("RUNPOD_PREVIEWS", d.runpod)?,
        })
    }
}
