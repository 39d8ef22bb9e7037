//! An invocation's event: the job payload (`{"input": {...}, "s3Config"?: {...}}` or the bare
//! input), or a function-URL / API Gateway event carrying it in its `body`; and the
//! invocation's deadline from `Lambda-Runtime-Deadline-Ms`.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::job::{codec, JobRequest};

/// One invocation's job: what the event carried.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LambdaJob {
    /// The job's `input` (`None` when the event had none).
    pub input: Option<Value>,
    /// The job's top-level `s3Config`.
    pub s3_config: Option<Value>,
}

impl LambdaJob {
    /// The job as the runner takes it.
    pub fn request(&self, id: &str) -> JobRequest {
        JobRequest::new(id, self.input.clone()).with_s3_config(self.s3_config.clone())
    }
}

/// Why an invocation event cannot be read: its text is an `InvalidInput` message.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// An HTTP event's `body` is marked base64 and is not.
    #[error("The request body is not valid base64: {0}")]
    NotBase64(codec::InvalidBase64),
    /// An HTTP event's `body` is not JSON.
    #[error("The request body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
}

/// Reads an invocation event: `{"input": ...}`, the bare input, or an HTTP event (function URL,
/// API Gateway) whose `body` holds either.
pub fn decode_event(event: Value) -> Result<LambdaJob, EventError> {
    let event = match http_body(&event) {
        Some(body) => body?,
        None => event,
    };
    match event {
        Value::Null => Ok(LambdaJob::default()),
        Value::Object(mut map) if map.contains_key("input") => Ok(LambdaJob {
            input: map.remove("input").filter(|v| !v.is_null()),
            s3_config: map.remove("s3Config").filter(|v| !v.is_null()),
        }),
        other => Ok(LambdaJob {
            input: Some(other),
            s3_config: None,
        }),
    }
}

/// The JSON body of an HTTP event (`requestContext` plus a string `body`), if it is one.
fn http_body(event: &Value) -> Option<Result<Value, EventError>> {
    let obj = event.as_object()?;
    if !obj.contains_key("requestContext") {
        return None;
    }
    let body = match obj.get("body") {
        None | Some(Value::Null) => return Some(Ok(Value::Null)),
        Some(Value::String(s)) => s,
        Some(_) => return None,
    };
    let bytes = if obj.get("isBase64Encoded") == Some(&Value::Bool(true)) {
        match codec::decode_input(body) {
            Ok(b) => b,
            Err(e) => return Some(Err(EventError::NotBase64(e))),
        }
    } else {
        body.as_bytes().to_vec()
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(Ok(Value::Null));
    }
    Some(serde_json::from_slice(&bytes).map_err(EventError::NotJson))
}

/// Values of `Lambda-Runtime-Deadline-Ms` below this are durations, not instants (2001-09-09).
const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;

/// The invocation's deadline from `Lambda-Runtime-Deadline-Ms`: Unix time in milliseconds, as
/// the Runtime API specifies. `cargo lambda watch` sends the function's timeout instead
/// (`600000`), so a value too small to be a date is read as milliseconds from now; 0 is none.
pub(super) fn deadline_of(ms: u64) -> Option<SystemTime> {
    match ms {
        0 => None,
        ms if ms < EPOCH_MS_FLOOR => Some(SystemTime::now() + Duration::from_millis(ms)),
        ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
    }
}
