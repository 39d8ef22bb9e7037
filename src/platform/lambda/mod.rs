//! AWS Lambda's Runtime API (container images on Lambda, or anything speaking the same
//! protocol): the `lambda_runtime` crate takes invocations and posts responses; this adapter
//! turns each invocation into one job on the [`crate::runner::Runner`], like the other front ends.
//!
//! * **Event**: the job payload, `{"input": {...}, "s3Config"?: {...}}` or the bare input; a
//!   function-URL / API Gateway event (`requestContext` and a `body` string) carries it in its
//!   body. The request id is the job id.
//! * **Response** ([`ResponseMode`], `LAMBDA_RESPONSE_MODE`): `buffered` returns the output JSON
//!   (worker-comfyui's schema) and logs each progress snapshot as a structured line; `streaming`
//!   sends NDJSON: `{"progress": snapshot}` lines, then one last line, `{"output": {...}}`, or
//!   `{"errorType", "errorMessage", "output": {"error", ...}}` for a job that failed after the
//!   stream began.
//! * **Errors**: a failed job is Lambda's error response (`errorType`, `errorMessage`); the
//!   types are in [`error_type`]. Partial outputs (`images` next to `errors`) are a success, as
//!   in worker-comfyui.
//! * **Deadline**: the prompt is interrupted `LAMBDA_DEADLINE_MARGIN_S` before the invocation's
//!   deadline (or the input's `timeout_s`, when shorter) and a `Timeout` error is returned.
//! * **Size**: the inline output limit defaults to 6 MB buffered and 19 MB streamed (20 MB less
//!   1 MB for the progress lines); what does not fit goes to the bucket when `BUCKET_*` is set
//!   (see [`crate::job::storage`]), else the job fails with `OutputTooLarge`.

pub mod event;
pub mod response;
pub mod settings;
mod worker;

pub use event::{decode_event, EventError, LambdaJob};
pub use response::{error_type, Finished};
pub use settings::{LambdaConfigError, LambdaSettings, ResponseMode};
pub use worker::LambdaWorker;
