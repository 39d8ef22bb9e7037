//! A job as every front end hands it over ([`JobRequest`]: an id, the raw `input` and what the
//! platform carries beside it), and the same job read once into typed parts ([`Job`]): the
//! input, the output options, the deadline it asks for, its bucket and its secrets.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::failure::JobFailure;
use super::input::{parse_input, InputFile, JobInput, Source};
use super::output::OutputOptions;
use crate::secret::Secret;

/// The longest `input.timeout_s` taken (the cloud's 7-day limit).
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

/// A job, as a front end received it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobRequest {
    /// The platform's job id (the request id on Lambda, `local_test` for `run`).
    pub id: String,
    /// `input`, unread (`None` when the job had none).
    pub input: Option<Value>,
    /// The job's top-level `s3Config` (the platform's field); `input.s3Config` is read too.
    pub s3_config: Option<Value>,
    /// The job's progress webhook, when its front end takes one (not yet checked).
    pub progress_webhook: Option<String>,
    /// `input.timeout_s`: the deadline the job asks for (read here, once, for every front end).
    pub timeout: Option<Duration>,
    /// `input.previews: true`: the job asks for its live previews where they are opt-in (the
    /// RunPod progress posts).
    pub previews: bool,
    /// Files the front end holds on disk (uploaded assets), uploaded to ComfyUI's input folder
    /// with the input's `images`. Never read from a job's JSON: only a front end names a path.
    pub local_files: Vec<LocalFile>,
}

/// A file a front end holds on disk, for ComfyUI's input folder.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalFile {
    /// The name it gets in ComfyUI's input folder (a safe file name, chosen by the front end).
    pub name: String,
    /// Where its bytes are.
    pub path: PathBuf,
}

impl JobRequest {
    /// A job with its id and input; `timeout` is read from `input.timeout_s`.
    pub fn new(id: impl Into<String>, input: Option<Value>) -> JobRequest {
        let timeout = input.as_ref().and_then(timeout_s);
        let previews = input
            .as_ref()
            .and_then(|i| i.get("previews"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        JobRequest {
            id: id.into(),
            input,
            timeout,
            previews,
            ..JobRequest::default()
        }
    }

    /// With the job's top-level `s3Config`.
    pub fn with_s3_config(mut self, s3_config: Option<Value>) -> JobRequest {
        self.s3_config = s3_config.filter(|v| !v.is_null());
        self
    }

    /// With files the front end holds (see [`JobRequest::local_files`]).
    pub fn with_local_files(mut self, files: Vec<LocalFile>) -> JobRequest {
        self.local_files = files;
        self
    }

    /// With the job's progress webhook.
    pub fn with_progress_webhook(mut self, url: Option<String>) -> JobRequest {
        self.progress_webhook = url;
        self
    }
}

/// `input.timeout_s`: a positive number of seconds (at most [`MAX_JOB_TIMEOUT`]); anything else
/// is no deadline.
fn timeout_s(input: &Value) -> Option<Duration> {
    input
        .get("timeout_s")
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_JOB_TIMEOUT.as_secs_f64())))
}

/// A job read into its typed parts, ready for the engine.
#[derive(Debug)]
pub struct Job {
    /// The job id.
    pub id: String,
    /// The checked input: workflow, files, API key.
    pub input: JobInput,
    /// `input.output`.
    pub output: OutputOptions,
    /// The bucket settings the job brings: its top-level `s3Config`, else `input.s3Config`.
    pub s3_config: Option<Value>,
    /// The job's own secrets (`comfy_org_api_key`, `s3Config.accessSecret`, ...): while the
    /// job lives they are scrubbed from every log line, and from its messages at the end.
    _secrets: Vec<Secret>,
}

impl Job {
    /// Reads a request. `Err` is the input's validation failure (worker-comfyui's messages),
    /// with the job's secrets already scrubbed from it.
    pub fn parse(request: &JobRequest) -> Result<Job, JobFailure> {
        // First, so the secrets are scrubbed from whatever the checks below log.
        let secrets = request
            .input
            .iter()
            .chain(&request.s3_config)
            .flat_map(crate::secret::secret_values)
            .map(Secret::new)
            .collect();
        let raw = request.input.as_ref();
        let scrub = |f: JobFailure| f.map_text(|t| crate::secret::scrub(t).into_owned());
        let mut input = parse_input(raw).map_err(scrub)?;
        input
            .files
            .extend(request.local_files.iter().map(|f| InputFile {
                name: f.name.clone(),
                name_derived: false,
                source: Source::Local(f.path.clone()),
                subfolder: String::new(),
                folder_type: "input".into(),
                original_ref: None,
            }));
        let output = OutputOptions::parse(raw).map_err(scrub)?;
        let s3_config = crate::job::storage::job_s3_config(request.s3_config.as_ref(), raw);
        Ok(Job {
            id: request.id.clone(),
            input,
            output,
            s3_config,
            _secrets: secrets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timeout_s_is_read_once_and_bounded() {
        let t = |v: Value| JobRequest::new("j", Some(v)).timeout;
        assert_eq!(t(json!({"timeout_s": 5})), Some(Duration::from_secs(5)));
        assert_eq!(t(json!({"timeout_s": 1e300})), Some(MAX_JOB_TIMEOUT));
        assert_eq!(t(json!({"timeout_s": "x"})), None);
        assert_eq!(t(json!({"timeout_s": -1})), None);
        assert_eq!(JobRequest::new("j", None).timeout, None);
    }

    #[test]
    fn a_bad_input_is_a_bad_input_failure() {
        let err = Job::parse(&JobRequest::new("j", None)).unwrap_err();
        assert_eq!(err.message(), "Please provide input");
        assert!(matches!(err, JobFailure::BadInput(_)));
        let bad_output = json!({"workflow": {"1": {"class_type": "X", "inputs": {}}}, "output": 3});
        let err = Job::parse(&JobRequest::new("j", Some(bad_output))).unwrap_err();
        assert!(matches!(err, JobFailure::BadInput(_)), "{err}");
    }
}
