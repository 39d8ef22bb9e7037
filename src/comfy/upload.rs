//! An input file to upload (`/upload/image`, `/upload/mask`) and what ComfyUI stored.

use bytes::Bytes;
use serde::Deserialize;

use super::file_ref::FileRef;

/// Reply of `POST /upload/image`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UploadedFile {
    /// Stored name (may differ from the requested one when renamed).
    pub name: String,
    /// Subfolder.
    #[serde(default)]
    pub subfolder: String,
    /// Folder type.
    #[serde(rename = "type", default)]
    pub folder_type: String,
}

/// One file for `POST /upload/image`, or `POST /upload/mask` when it has an `original_ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// File name (ComfyUI keeps it with `overwrite=true`).
    pub name: String,
    /// The bytes.
    pub data: Bytes,
    /// Subfolder of the target folder ("" = its root).
    pub subfolder: String,
    /// Target folder: `input`, `temp` or `output`.
    pub folder_type: String,
    /// The part's media type; from the name when `None`.
    pub content_type: Option<String>,
    /// For a mask: the image whose alpha channel it replaces (`/upload/mask`).
    pub original_ref: Option<FileRef>,
}
