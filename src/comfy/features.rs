//! `GET /features`: what a ComfyUI says it supports. 0.3.64 sends two keys; today's sends six
//! (`supports_model_type_tags`, `extension`, `node_replacements`, `assets`); unknown keys are
//! ignored, absent ones read as unsupported.

use serde::{Deserialize, Serialize};

/// The flags of `/features` the worker reads.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
pub struct Features {
    /// Previews come as binary event 4, with a JSON header naming node and prompt.
    #[serde(default)]
    pub supports_preview_metadata: bool,
    /// `POST /upload/image`'s limit, in bytes.
    #[serde(default)]
    pub max_upload_size: Option<u64>,
    /// The assets system is on (its database at `<user dir>/comfyui.db`).
    #[serde(default)]
    pub assets: bool,
}
