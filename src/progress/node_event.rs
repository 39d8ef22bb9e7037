//! What ComfyUI produced on the way, as a job runs, beside its progress snapshots: a node's
//! outputs the moment it finished, previews, node text and a node's failure. Front ends that
//! show results as they land (the local endpoint's Comfy API v2 surface) take these; the others
//! ignore them.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::comfy::{ExecutionFailure, NodeOutput};

/// Something a node produced or reported while the job ran.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// A node finished with these outputs (from its `executed` frame, or from `/history` for a
    /// node whose frame was missed). Sent once per node, before the job's result.
    Output(NodeOutput),
    /// A preview image a node sent while running.
    Preview {
        /// The node, when known.
        node: Option<String>,
        /// Its media type (`image/jpeg`, `image/png`).
        mime: &'static str,
        /// The encoded image.
        data: Bytes,
        /// Its width and height, read once by the runner's gate (`None` until then).
        size: Option<(u32, u32)>,
    },
    /// Text a node sent while running.
    Text {
        /// The node.
        node: String,
        /// The text.
        text: String,
    },
    /// A node raised: the prompt failed there.
    Failed(ExecutionFailure),
}

/// A live preview as every front end sends it: `{"node", "mime", "data"}`, `data` the image in
/// base64 (`node` null when neither the frame nor the progress names it).
pub fn preview_body(node: Option<&str>, mime: &str, data: &[u8]) -> Value {
    json!({
        "node": node,
        "mime": mime,
        "data": base64::engine::general_purpose::STANDARD.encode(data),
    })
}
