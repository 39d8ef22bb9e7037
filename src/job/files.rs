//! The files one job left in ComfyUI's folders, recorded by the engine for `CLEANUP_FILES`.

use crate::comfy::FileRef;

/// The files one job left in ComfyUI's folders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFiles {
    /// Inputs as ComfyUI stored them (the name it returned from `/upload/image`, which may differ
    /// from the requested one).
    pub inputs: Vec<FileRef>,
    /// Output files from the prompt's history (`output` and `temp`; `input`-typed references are
    /// not the job's to delete and are skipped).
    pub outputs: Vec<FileRef>,
}

impl JobFiles {
    /// True when the job left nothing.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }
}
