//! One output file with its bytes, between collection (from `/view` or the socket) and delivery
//! (inline as base64, or to the job's bucket).

use bytes::Bytes;
use serde_json::Number;

use super::codec;
use super::output::{FileEntry, OutputKind};
use crate::media_type::content_type_for;

/// `folder_type` of images that came over the WebSocket (no ComfyUI folder holds them).
pub const WEBSOCKET_FOLDER: &str = "websocket";

/// One output file with its bytes, ready to be returned.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedFile {
    /// Where it goes in the output (`images`, `videos`, `audio` or another key).
    pub kind: OutputKind,
    /// File name (ComfyUI's, or generated for WebSocket images).
    pub filename: String,
    /// ComfyUI subfolder ("" = root, and for WebSocket images).
    pub subfolder: String,
    /// ComfyUI folder: `output`, `temp`, `input`, or [`WEBSOCKET_FOLDER`].
    pub folder_type: String,
    /// MIME type (see [`content_type_for`]).
    pub content_type: String,
    /// VideoHelperSuite's `format`, passed on to the entry.
    pub format: Option<String>,
    /// VideoHelperSuite's `frame_rate`, passed on to the entry.
    pub frame_rate: Option<Number>,
    /// The file's bytes.
    pub bytes: Bytes,
}

impl CollectedFile {
    /// A file in ComfyUI's `output` folder root, its content type from its name.
    pub fn new(kind: OutputKind, filename: impl Into<String>, bytes: Bytes) -> CollectedFile {
        let filename = filename.into();
        CollectedFile {
            kind,
            content_type: content_type_for(&filename, None),
            filename,
            subfolder: String::new(),
            folder_type: "output".into(),
            format: None,
            frame_rate: None,
            bytes,
        }
    }
}

/// A collected file as a base64 output entry.
pub fn base64_entry(file: CollectedFile) -> FileEntry {
    FileEntry {
        data: codec::encode(&file.bytes),
        filename: file.filename,
        kind: "base64".into(),
        content_type: file.content_type,
        format: file.format,
        frame_rate: file.frame_rate,
    }
}
