//! The job output, exactly as worker-comfyui returns it:
//! `{"images": [{"filename", "type": "base64", "data"}], "errors"?: [...]}` (uploaded files:
//! `{"filename", "type": "s3_url", "data": <presigned URL>, "content_type"}`),
//! `{"status": "success_no_images", "images": []}`, or `{"error": "...", "details"?: [...]}`.

use serde::Serialize;
use serde_json::Value;

/// One returned image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputImage {
    /// The file name ComfyUI gave it.
    pub filename: String,
    /// `base64` (or `s3_url`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Base64 of the file (or a URL).
    pub data: String,
    /// The MIME type, for `s3_url` entries (absent on base64 ones, as in worker-comfyui).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// What a job returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum JobOutput {
    /// At least one image; `errors` lists non-fatal problems.
    Images {
        /// The images.
        images: Vec<OutputImage>,
        /// Warnings (omitted when empty).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        errors: Vec<String>,
    },
    /// Ran fine but produced no returnable image.
    NoImages {
        /// Always `success_no_images`.
        status: &'static str,
        /// Always empty.
        images: Vec<OutputImage>,
    },
    /// The job failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Details (omitted when absent).
        #[serde(skip_serializing_if = "Option::is_none")]
        details: Option<Vec<String>>,
    },
}

impl JobOutput {
    /// A failure without details.
    pub fn error(message: impl Into<String>) -> JobOutput {
        JobOutput::Failed {
            error: message.into(),
            details: None,
        }
    }

    /// A failure with details.
    pub fn error_with_details(message: impl Into<String>, details: Vec<String>) -> JobOutput {
        JobOutput::Failed {
            error: message.into(),
            details: Some(details),
        }
    }

    /// The result of a run, from its images and warnings (worker-comfyui's assembly rules).
    pub fn from_parts(images: Vec<OutputImage>, errors: Vec<String>) -> JobOutput {
        if !images.is_empty() {
            JobOutput::Images { images, errors }
        } else if errors.is_empty() {
            JobOutput::NoImages {
                status: "success_no_images",
                images: Vec::new(),
            }
        } else {
            JobOutput::error_with_details("Job processing failed", errors)
        }
    }

    /// True for a failure.
    pub fn is_error(&self) -> bool {
        matches!(self, JobOutput::Failed { .. })
    }

    /// The error message of a failure.
    pub fn error_message(&self) -> Option<&str> {
        match self {
            JobOutput::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_match_worker_comfyui() {
        let img = OutputImage {
            filename: "a.png".into(),
            kind: "base64".into(),
            data: "aGk=".into(),
            content_type: None,
        };
        assert_eq!(
            JobOutput::from_parts(vec![img.clone()], vec![]).to_json(),
            json!({"images": [{"filename": "a.png", "type": "base64", "data": "aGk="}]})
        );
        assert_eq!(
            JobOutput::from_parts(vec![img], vec!["w".into()]).to_json()["errors"],
            json!(["w"])
        );
        assert_eq!(
            JobOutput::from_parts(vec![], vec![]).to_json(),
            json!({"status": "success_no_images", "images": []})
        );
        assert_eq!(
            JobOutput::from_parts(vec![], vec!["x".into()]).to_json(),
            json!({"error": "Job processing failed", "details": ["x"]})
        );
        assert_eq!(JobOutput::error("e").to_json(), json!({"error": "e"}));
    }
}
