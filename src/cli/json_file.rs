//! A JSON document a command reads (a file, stdin or an option's value), and why it cannot be
//! read.

use std::path::Path;

use serde_json::Value;

/// Why a command's JSON input cannot be read; `what` names it (a path, `stdin`,
/// `--test_input`, `the workflow`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum JsonFileError {
    /// The file cannot be read.
    #[error("cannot read {what}: {source}")]
    Read {
        /// The input's name.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not JSON.
    #[error("{what} is not valid JSON: {source}")]
    NotJson {
        /// The input's name.
        what: String,
        /// Where and why.
        source: serde_json::Error,
    },
}

/// The text of the file at `path`.
pub(crate) fn read(path: &Path) -> Result<String, JsonFileError> {
    std::fs::read_to_string(path).map_err(|source| JsonFileError::Read {
        what: path.display().to_string(),
        source,
    })
}

/// `text` parsed; `what` names it in the error.
pub(crate) fn parse(text: &str, what: &str) -> Result<Value, JsonFileError> {
    serde_json::from_str(text).map_err(|source| JsonFileError::NotJson {
        what: what.to_owned(),
        source,
    })
}
