//! One output file with its bytes, between collection (from `/view` or the socket) and delivery
//! (inline as base64, or to the job's bucket).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Number;

use super::codec;
use super::output::{FileData, FileEntry, OutputKind};
use super::spooled_file::SpooledFile;
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
    pub bytes: FileBytes,
}

/// An output's bytes: in memory (a WebSocket image, or no spool folder), or in a file of the
/// engine's spool.
#[derive(Debug, Clone)]
pub enum FileBytes {
    /// Held here.
    Memory(Bytes),
    /// In the spool.
    Spooled(Arc<SpooledFile>),
}

impl FileBytes {
    /// The length in bytes.
    pub fn len(&self) -> usize {
        match self {
            FileBytes::Memory(b) => b.len(),
            FileBytes::Spooled(f) => f.len() as usize,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `len` bytes from `start` (a slice, or a read of that piece of the file).
    pub async fn range(&self, start: usize, len: usize) -> std::io::Result<Bytes> {
        match self {
            FileBytes::Memory(b) => Ok(b.slice(start.min(b.len())..(start + len).min(b.len()))),
            FileBytes::Spooled(f) => f.read_range(start as u64, len).await,
        }
    }

    /// All of it.
    pub async fn all(&self) -> std::io::Result<Bytes> {
        match self {
            FileBytes::Memory(b) => Ok(b.clone()),
            FileBytes::Spooled(f) => f.read_all().await,
        }
    }
}

impl PartialEq for FileBytes {
    fn eq(&self, other: &FileBytes) -> bool {
        match (self, other) {
            (FileBytes::Memory(a), FileBytes::Memory(b)) => a == b,
            (FileBytes::Spooled(a), FileBytes::Spooled(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
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
            bytes: FileBytes::Memory(bytes),
        }
    }
}

/// A collected file as a base64 output entry: encoded now when in memory; a spooled one is
/// encoded only as it is written out.
pub fn base64_entry(file: CollectedFile) -> FileEntry {
    FileEntry {
        data: match file.bytes {
            FileBytes::Memory(bytes) => FileData::Text(codec::encode(&bytes)),
            FileBytes::Spooled(spooled) => FileData::Base64Of(spooled),
        },
        filename: file.filename,
        kind: "base64".into(),
        content_type: file.content_type,
        format: file.format,
        frame_rate: file.frame_rate,
    }
}
