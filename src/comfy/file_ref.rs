//! A file in one of ComfyUI's folders: name, subfolder and folder type (`input`, `output`,
//! `temp`), as `/view`, `/upload` and the history name it.

/// A file ComfyUI stored (`{filename, subfolder, type}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// File name.
    pub filename: String,
    /// Subfolder ("" = root).
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    pub folder_type: String,
}

impl FileRef {
    /// True for ComfyUI's `temp` folder (PreviewImage, PreviewAudio, VHS with `save_output` off).
    pub fn is_temp(&self) -> bool {
        self.folder_type == "temp"
    }
}
