//! What an invocation answers: the job's output, or Lambda's error response (`errorType`,
//! `errorMessage`; the types are in [`error_type`]); for a streamed one, the NDJSON body and
//! its last line.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use lambda_runtime::streaming::Body;
use lambda_runtime::{Diagnostic, MetadataPrelude, StreamResponse};

use crate::job::{Completed, JobFailure, JobOutput};

/// The `errorType`s of this adapter's error responses.
pub mod error_type {
    /// The event or its input cannot be used (the engine's input validation message).
    pub const INVALID_INPUT: &str = "InvalidInput";
    /// The job failed while running: inputs, ComfyUI (validation, execution, unreachable),
    /// output collection.
    pub const COMFYUI_ERROR: &str = "ComfyUIError";
    /// The output does not fit in a response and could not be uploaded.
    pub const OUTPUT_TOO_LARGE: &str = "OutputTooLarge";
    /// The invocation's deadline (or the input's `timeout_s`) came first.
    pub const TIMEOUT: &str = "Timeout";
    /// A bug in comfy-worker (a panic), reported instead of crashing the runtime.
    pub const INTERNAL: &str = "InternalError";
}

/// How an invocation ended: the job's output JSON, and the error response when it failed.
#[derive(Debug, Clone)]
pub struct Finished {
    /// worker-comfyui's output (`{"error", "details"?}` for a failure). Serialised once, into
    /// the response, with each spooled file encoded as it is written (never a JSON value first).
    pub output: JobOutput,
    /// Lambda's error response for a failure.
    pub error: Option<Diagnostic>,
}

impl Finished {
    /// A job's result as Lambda's response: the output, or the error response with its type.
    pub fn of(result: Result<Completed, JobFailure>) -> Finished {
        let error = result.as_ref().err().map(|failure| {
            diagnostic(
                error_type_of(failure),
                &failure.message(),
                failure.details(),
            )
        });
        Finished {
            output: JobOutput::from(result),
            error,
        }
    }
}

/// The `errorType` of a failure.
pub(super) fn error_type_of(failure: &JobFailure) -> &'static str {
    match failure {
        JobFailure::BadInput(_) => error_type::INVALID_INPUT,
        JobFailure::OutputTooLarge(_) => error_type::OUTPUT_TOO_LARGE,
        JobFailure::Deadline { .. } => error_type::TIMEOUT,
        JobFailure::Panic(_) => error_type::INTERNAL,
        _ => error_type::COMFYUI_ERROR,
    }
}

/// Lambda's error response: the job's `error`, followed by each of its `details` that the
/// message does not already show (validation errors list them in the message), one per line.
pub(super) fn diagnostic(
    error_type: &str,
    message: &str,
    details: Option<&[String]>,
) -> Diagnostic {
    let mut error_message = message.to_owned();
    for d in details.unwrap_or_default() {
        if !message.contains(d.as_str()) {
            error_message.push('\n');
            error_message.push_str(d);
        }
    }
    Diagnostic {
        error_type: error_type.to_owned(),
        error_message,
    }
}

/// Streams with an NDJSON content type (what a function URL passes to its client).
pub(super) fn ndjson(body: Body) -> StreamResponse<Body> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    StreamResponse {
        metadata_prelude: MetadataPrelude {
            status_code: StatusCode::OK,
            headers,
            cookies: Vec::new(),
        },
        stream: body,
    }
}

/// The last line of a streamed response.
pub(super) fn output_line(finished: &Finished) -> Bytes {
    /// `{"errorType"?, "errorMessage"?, "output"}`, serialised straight from the output.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Line<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        error_type: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error_message: Option<&'a str>,
        output: &'a JobOutput,
    }
    let line = Line {
        error_type: finished.error.as_ref().map(|e| e.error_type.as_ref()),
        error_message: finished.error.as_ref().map(|e| e.error_message.as_ref()),
        output: &finished.output,
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Serialized JSON size without building the text.
pub(super) fn json_len(value: &impl serde::Serialize) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}
