//! AWS Lambda's Runtime API (container images on Lambda, or anything speaking the same
//! protocol): the `lambda_runtime` crate takes invocations and posts responses; this adapter
//! turns each invocation into one job on the [`Engine`], like the other front ends.
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

pub mod settings;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use futures_util::FutureExt;
use lambda_runtime::streaming::{Body, Sender};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent, MetadataPrelude, StreamResponse};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

pub use settings::{LambdaConfigError, LambdaSettings, ResponseMode};

use crate::job::{codec, storage, Engine, JobOptions, JobOutput, OutputOptions};
use crate::progress::{self, ProgressSender, ProgressSnapshot};

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

/// One invocation's job: what the event carried.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LambdaJob {
    /// The job's `input` (`None` when the event had none).
    pub input: Option<Value>,
    /// The job's top-level `s3Config`.
    pub s3_config: Option<Value>,
}

/// Reads an invocation event: `{"input": ...}`, the bare input, or an HTTP event (function URL,
/// API Gateway) whose `body` holds either. `Err` is an `InvalidInput` message.
pub fn decode_event(event: Value) -> Result<LambdaJob, String> {
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
fn http_body(event: &Value) -> Option<Result<Value, String>> {
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
            Err(e) => return Some(Err(format!("The request body is not valid base64: {e}"))),
        }
    } else {
        body.as_bytes().to_vec()
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(Ok(Value::Null));
    }
    Some(
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("The request body is not valid JSON: {e}")),
    )
}

/// How an invocation ended: the job's output JSON, and the error response when it failed.
#[derive(Debug, Clone)]
pub struct Finished {
    /// worker-comfyui's output (`{"error", "details"?}` for a failure).
    pub output: Value,
    /// Lambda's error response for a failure.
    pub error: Option<Diagnostic>,
}

impl Finished {
    fn failed(error_type: &str, output: JobOutput) -> Finished {
        let (message, details) = match &output {
            JobOutput::Failed { error, details } => (error.clone(), details.clone()),
            _ => (String::new(), None),
        };
        Finished {
            error: Some(diagnostic(error_type, &message, details.as_deref())),
            output: output.into_json(),
        }
    }
}

/// Lambda's error response: the job's `error`, followed by each of its `details` that the
/// message does not already show (validation errors list them in the message), one per line.
fn diagnostic(error_type: &str, message: &str, details: Option<&[String]>) -> Diagnostic {
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

/// Whether the engine would accept `input` (the classification of its failures).
fn input_is_valid(input: Option<&Value>) -> bool {
    crate::job::parse_input(input).is_ok() && OutputOptions::parse(input).is_ok()
}

/// Serialized JSON size without building the text.
fn json_len(value: &Value) -> u64 {
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

/// `2.5`, `30`: seconds without noise.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 && s.fract() != 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.0}")
    }
}

/// Bytes as MB (MiB), one decimal.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
}

/// The Lambda front end: runs each invocation as one job on the engine.
#[derive(Debug, Clone)]
pub struct LambdaWorker {
    engine: Engine,
    settings: LambdaSettings,
}

/// What bounds a job's run time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Limit {
    /// The invocation's deadline less the margin.
    Deadline { left: Duration, margin: Duration },
    /// The input's `timeout_s`.
    TimeoutS,
}

impl LambdaWorker {
    /// A worker for `engine` (whose inline limit the caller set for the response mode).
    pub fn new(engine: Engine, settings: LambdaSettings) -> LambdaWorker {
        LambdaWorker { engine, settings }
    }

    /// The settings.
    pub fn settings(&self) -> &LambdaSettings {
        &self.settings
    }

    /// Takes invocations from the Runtime API until `shutdown` (or a Runtime API failure, the
    /// `Err`). Expects the variables of [`settings::REQUIRED_VARS`] to be set.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), lambda_runtime::Error> {
        let storage = &self.engine.settings().storage;
        info!(
            runtime_api = %self.settings.runtime_api,
            response_mode = self.settings.response_mode.name(),
            deadline_margin_s = self.settings.deadline_margin.as_secs_f64(),
            max_inline_bytes = ?storage.max_inline_bytes,
            bucket = storage.bucket.is_some(),
            "Lambda runtime started"
        );
        let run = async {
            match self.settings.response_mode {
                ResponseMode::Buffered => {
                    let worker = &self;
                    lambda_runtime::run(service_fn(move |event| worker.buffered(event))).await
                }
                ResponseMode::Streaming => {
                    let worker = &self;
                    lambda_runtime::run(service_fn(move |event| worker.streaming(event))).await
                }
            }
        };
        tokio::select! {
            r = run => r,
            _ = shutdown.cancelled() => {
                info!("Lambda runtime stopped");
                Ok(())
            }
        }
    }

    /// A buffered invocation: the output, or Lambda's error response.
    pub async fn buffered(&self, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
        let (payload, context) = event.into_parts();
        let job = match decode_event(payload) {
            Ok(job) => job,
            Err(message) => {
                info!(error = %message, "the event cannot be read");
                return Err(diagnostic(error_type::INVALID_INPUT, &message, None));
            }
        };
        let span = tracing::info_span!("invocation", job_id = %context.request_id);
        let (sender, mut snapshots) = progress::channel();
        let cancel = CancellationToken::new();
        let run = async {
            let finished = self
                .invoke(
                    &context.request_id,
                    &job,
                    deadline_of(context.deadline),
                    &sender,
                    &cancel,
                )
                .await;
            drop(sender);
            finished
        };
        let log = async {
            while let Some(s) = snapshots.recv().await {
                log_snapshot(&s);
            }
        };
        let (finished, ()) = async { tokio::join!(run, log) }
            .instrument(span.clone())
            .await;
        let finished = self.check_size(finished, 0);
        // FREE_MEMORY_AFTER_JOB: before the response, the only point the handler still runs.
        crate::ops::after_job(&self.engine)
            .instrument(span.clone())
            .await;
        let _entered = span.enter();
        report(&finished);
        match finished.error {
            Some(e) => Err(e),
            None => Ok(finished.output),
        }
    }

    /// A streaming invocation: NDJSON progress lines, then the output line. An event or input
    /// the engine refuses is an error response, before anything is streamed.
    pub async fn streaming(
        &self,
        event: LambdaEvent<Value>,
    ) -> Result<StreamResponse<Body>, Diagnostic> {
        let (payload, context) = event.into_parts();
        let job = match decode_event(payload) {
            Ok(job) => job,
            Err(message) => {
                info!(error = %message, "the event cannot be read");
                return Err(diagnostic(error_type::INVALID_INPUT, &message, None));
            }
        };
        let deadline = deadline_of(context.deadline);
        let id = context.request_id;
        if !input_is_valid(job.input.as_ref()) {
            // The engine refuses it at once, with its own (secret-scrubbed) message.
            let finished = self
                .invoke(
                    &id,
                    &job,
                    deadline,
                    &ProgressSender::none(),
                    &CancellationToken::new(),
                )
                .await;
            report(&finished);
            if let Some(e) = finished.error {
                return Err(e);
            }
            // Accepted after all (the checks disagree): stream its output alone.
            let (mut tx, body) = Body::channel();
            let line = output_line(&finished);
            tokio::spawn(async move {
                let _ = tx.send_data(line).await;
            });
            return Ok(ndjson(body));
        }
        let (tx, body) = Body::channel();
        let worker = self.clone();
        let span = tracing::info_span!("invocation", job_id = %id);
        tokio::spawn(
            async move { worker.stream_job(&id, job, deadline, tx).await }.instrument(span),
        );
        Ok(ndjson(body))
    }

    /// Runs a streamed job: forwards its snapshots as lines while it runs, then the last line.
    async fn stream_job(
        &self,
        id: &str,
        job: LambdaJob,
        deadline: Option<SystemTime>,
        mut tx: Sender,
    ) {
        let (sender, mut snapshots) = progress::channel();
        let cancel = CancellationToken::new();
        let run = async {
            let finished = self.invoke(id, &job, deadline, &sender, &cancel).await;
            drop(sender);
            finished
        };
        let forward = async {
            let mut sent: u64 = 0;
            let mut open = true;
            let mut over_budget = false;
            while let Some(s) = snapshots.recv().await {
                if !open {
                    continue;
                }
                let mut line =
                    serde_json::to_vec(&json!({ "progress": s.to_json() })).unwrap_or_default();
                line.push(b'\n');
                if sent + line.len() as u64 > settings::PROGRESS_BUDGET {
                    if !over_budget {
                        warn!(
                            bytes = sent,
                            "progress lines reached their share of the streamed response; later snapshots are not streamed"
                        );
                        over_budget = true;
                    }
                    continue;
                }
                sent += line.len() as u64;
                if tx.send_data(Bytes::from(line)).await.is_err() {
                    warn!("the response stream closed; interrupting the job");
                    open = false;
                    cancel.cancel();
                }
            }
            (sent, open)
        };
        let (finished, (sent, open)) = tokio::join!(run, forward);
        let finished = self.check_size(finished, sent);
        report(&finished);
        if open && tx.send_data(output_line(&finished)).await.is_err() {
            error!("the response stream closed before the output line");
        }
        // The response ends here; FREE_MEMORY_AFTER_JOB's /free follows it.
        drop(tx);
        crate::ops::after_job(&self.engine).await;
    }

    /// Fails a result that is over what the response can carry (after `progress_bytes` of
    /// streamed progress), instead of letting the Runtime API refuse it.
    fn check_size(&self, finished: Finished, progress_bytes: u64) -> Finished {
        let platform = match self.settings.response_mode {
            ResponseMode::Buffered => settings::BUFFERED_LIMIT,
            ResponseMode::Streaming => settings::STREAMED_LIMIT.saturating_sub(progress_bytes),
        };
        // An operator who raised MAX_INLINE_OUTPUT_BYTES (a raised quota) is trusted.
        let limit = platform.max(
            self.engine
                .settings()
                .storage
                .max_inline_bytes
                .unwrap_or_default(),
        );
        let size = json_len(&finished.output);
        if size <= limit {
            return finished;
        }
        warn!(bytes = size, limit, "the response is too large for Lambda");
        Finished::failed(
            error_type::OUTPUT_TOO_LARGE,
            JobOutput::error(format!(
                "The job output is {} MB, over the {} MB a {} Lambda response may carry; set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config) to return large outputs as URLs",
                mb(size),
                mb(limit),
                self.settings.response_mode.name()
            )),
        )
    }

    /// Runs one job within the invocation's deadline (less the margin) and the input's
    /// `timeout_s`, with panics caught, and classifies a failure.
    pub async fn invoke(
        &self,
        job_id: &str,
        job: &LambdaJob,
        deadline: Option<SystemTime>,
        progress: &ProgressSender,
        cancel: &CancellationToken,
    ) -> Finished {
        let limit = self.limit(deadline, job.input.as_ref());
        let options = JobOptions {
            s3_config: job.s3_config.clone(),
        };
        let run = AssertUnwindSafe(self.engine.run_with(
            job_id,
            job.input.as_ref(),
            &options,
            progress,
            cancel,
        ))
        .catch_unwind();
        tokio::pin!(run);
        let (result, timed_out) = match limit {
            None => (Some(run.await), None),
            Some((budget, why)) => tokio::select! {
                out = &mut run => (Some(out), None),
                _ = tokio::time::sleep(budget) => {
                    info!(budget_s = budget.as_secs_f64(), "time is up: interrupting the job");
                    cancel.cancel();
                    // Two thirds of the margin to wind down; then the job is dropped (its
                    // prompt watcher interrupts the prompt) so the response still goes out.
                    let margin = match why {
                        Limit::Deadline { margin, .. } => margin,
                        Limit::TimeoutS => self.settings.deadline_margin,
                    };
                    let wind_down = (margin * 2 / 3).max(Duration::from_millis(100));
                    let out = tokio::time::timeout(wind_down, &mut run).await.ok();
                    (out, Some((budget, why)))
                }
            },
        };
        let output = match result {
            Some(Ok(output)) => output,
            Some(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                error!(panic = %what, "the job panicked");
                return Finished::failed(
                    error_type::INTERNAL,
                    JobOutput::error(format!(
                        "Internal error in comfy-worker: {}",
                        crate::telemetry::scrub(&what)
                    )),
                );
            }
            None => JobOutput::error(String::new()),
        };
        if let Some((budget, why)) = timed_out {
            // Unless it completed just as time ran out: then its output stands.
            if output.is_error() {
                let message = match why {
                    Limit::Deadline { left, margin } => format!(
                        "Invocation timed out: the Lambda deadline was {} s away, so the ComfyUI prompt was interrupted after {} s, {} s before it (LAMBDA_DEADLINE_MARGIN_S; raise the function's timeout)",
                        seconds(left),
                        seconds(budget),
                        seconds(margin)
                    ),
                    Limit::TimeoutS => format!(
                        "Job timed out after {} s (input.timeout_s); the ComfyUI prompt was interrupted",
                        seconds(budget)
                    ),
                };
                return Finished::failed(error_type::TIMEOUT, JobOutput::error(message));
            }
        }
        self.classify(job, output)
    }

    fn classify(&self, job: &LambdaJob, output: JobOutput) -> Finished {
        let JobOutput::Failed { error, .. } = &output else {
            return Finished {
                output: output.into_json(),
                error: None,
            };
        };
        let kind = if !input_is_valid(job.input.as_ref()) {
            error_type::INVALID_INPUT
        } else if storage::is_over_limit_error(error) {
            error_type::OUTPUT_TOO_LARGE
        } else {
            error_type::COMFYUI_ERROR
        };
        Finished::failed(kind, output)
    }

    /// How long the job may run: until the margin before the deadline, or the input's
    /// `timeout_s` when shorter. The margin is at most a quarter of the time left, so a short
    /// function timeout (Lambda's default is 3 s) still leaves the job most of it.
    fn limit(
        &self,
        deadline: Option<SystemTime>,
        input: Option<&Value>,
    ) -> Option<(Duration, Limit)> {
        let by_deadline = deadline.map(|d| {
            let left = d
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let margin = self.settings.deadline_margin.min(left / 4);
            (left - margin, Limit::Deadline { left, margin })
        });
        let requested = input
            .and_then(|i| i.get("timeout_s"))
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| {
                (
                    Duration::from_secs_f64(s.min(7.0 * 86_400.0)),
                    Limit::TimeoutS,
                )
            });
        match (by_deadline, requested) {
            (Some(d), Some(r)) => Some(if r.0 < d.0 { r } else { d }),
            (d, r) => d.or(r),
        }
    }
}

/// Values of `Lambda-Runtime-Deadline-Ms` below this are durations, not instants (2001-09-09).
const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;

/// The invocation's deadline from `Lambda-Runtime-Deadline-Ms`: Unix time in milliseconds, as
/// the Runtime API specifies. `cargo lambda watch` sends the function's timeout instead
/// (`600000`), so a value too small to be a date is read as milliseconds from now; 0 is none.
fn deadline_of(ms: u64) -> Option<SystemTime> {
    match ms {
        0 => None,
        ms if ms < EPOCH_MS_FLOOR => Some(SystemTime::now() + Duration::from_millis(ms)),
        ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
    }
}

/// Streams with an NDJSON content type (what a function URL passes to its client).
fn ndjson(body: Body) -> StreamResponse<Body> {
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
fn output_line(finished: &Finished) -> Bytes {
    let line = match &finished.error {
        None => json!({ "output": finished.output }),
        Some(e) => json!({
            "errorType": e.error_type,
            "errorMessage": e.error_message,
            "output": finished.output,
        }),
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A snapshot as one structured log line (the buffered mode's progress).
fn log_snapshot(s: &ProgressSnapshot) {
    info!(
        kind = ?s.kind,
        node = s.node.as_deref().unwrap_or(""),
        step = s.step.as_deref().unwrap_or(""),
        value = s.value.0,
        max = s.max.0,
        percent = s.percent,
        overall_percent = s.overall_percent,
        nodes_done = s.nodes_done as u64,
        nodes_total = s.nodes_total as u64,
        "progress"
    );
}

/// Logs how an invocation ended.
fn report(finished: &Finished) {
    match &finished.error {
        None => info!("Finished."),
        Some(e) => info!(error_type = %e.error_type, "Finished with an error response."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_in_every_shape() {
        let wf = json!({"workflow": {"1": {}}});
        assert_eq!(
            decode_event(json!({"input": wf, "s3Config": {"bucketName": "b"}})).unwrap(),
            LambdaJob {
                input: Some(wf.clone()),
                s3_config: Some(json!({"bucketName": "b"}))
            }
        );
        assert_eq!(
            decode_event(wf.clone()).unwrap(),
            LambdaJob {
                input: Some(wf.clone()),
                s3_config: None
            }
        );
        assert_eq!(decode_event(Value::Null).unwrap(), LambdaJob::default());
        assert_eq!(
            decode_event(json!({"input": null})).unwrap(),
            LambdaJob::default()
        );
        let body = json!({"input": wf}).to_string();
        let url_event = json!({"version": "2.0", "requestContext": {"http": {"method": "POST"}}, "body": body, "isBase64Encoded": false});
        assert_eq!(decode_event(url_event).unwrap().input, Some(wf.clone()));
        let b64 = codec::encode(body.as_bytes());
        let url_event = json!({"requestContext": {}, "body": b64, "isBase64Encoded": true});
        assert_eq!(decode_event(url_event).unwrap().input, Some(wf.clone()));
        assert_eq!(
            decode_event(json!({"requestContext": {}, "body": " "})).unwrap(),
            LambdaJob::default()
        );
        let bad = decode_event(json!({"requestContext": {}, "body": "{nope"})).unwrap_err();
        assert!(
            bad.starts_with("The request body is not valid JSON"),
            "{bad}"
        );
    }

    #[test]
    fn error_responses_keep_the_message_and_append_details() {
        let d = diagnostic("InvalidInput", "Missing 'workflow' parameter", None);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"errorType": "InvalidInput", "errorMessage": "Missing 'workflow' parameter"})
        );
        let f = Finished::failed(
            error_type::COMFYUI_ERROR,
            JobOutput::error_with_details("Workflow validation failed", vec!["Node 1: x".into()]),
        );
        let e = f.error.unwrap();
        assert_eq!(e.error_message, "Workflow validation failed\nNode 1: x");
        let shown = diagnostic(
            "ComfyUIError",
            "Failed:\n• Node 1: x",
            Some(&["Node 1: x".into(), "y".into()]),
        );
        assert_eq!(shown.error_message, "Failed:\n• Node 1: x\ny");
        assert_eq!(f.output["details"], json!(["Node 1: x"]));
        let line = output_line(&Finished {
            output: json!({"images": []}),
            error: None,
        });
        assert_eq!(&line[..], b"{\"output\":{\"images\":[]}}\n");
    }

    #[test]
    fn deadlines_and_margins() {
        assert_eq!(deadline_of(0), None);
        let epoch = 1_795_000_000_000;
        assert_eq!(
            deadline_of(epoch),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(epoch))
        );
        let relative = deadline_of(600_000).unwrap();
        let left = relative.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(590) && left <= Duration::from_secs(600));

        let settings = LambdaSettings {
            runtime_api: String::new(),
            response_mode: ResponseMode::Buffered,
            deadline_margin: Duration::from_secs(3),
        };
        let worker = LambdaWorker::new(
            Engine::new(crate::config::Settings::default()).unwrap(),
            settings,
        );
        let in_s = |s: u64| Some(SystemTime::now() + Duration::from_secs(s));
        let (budget, why) = worker.limit(in_s(60), None).unwrap();
        assert!(budget <= Duration::from_secs(57) && budget > Duration::from_secs(55));
        assert!(matches!(why, Limit::Deadline { margin, .. } if margin == Duration::from_secs(3)));
        // Lambda's default 3 s timeout: a quarter of it as the margin, not all of it.
        let (budget, why) = worker.limit(in_s(4), None).unwrap();
        assert!(budget > Duration::from_secs(2), "{budget:?}");
        assert!(matches!(why, Limit::Deadline { margin, .. } if margin < Duration::from_secs(1)));
        let (budget, why) = worker
            .limit(in_s(60), Some(&json!({"timeout_s": 5})))
            .unwrap();
        assert_eq!((budget, why), (Duration::from_secs(5), Limit::TimeoutS));
        assert_eq!(worker.limit(None, None), None);
    }

    #[test]
    fn responses_over_the_limit_fail_with_output_too_large() {
        let worker = |mode, user_limit: Option<u64>| {
            let mut settings = crate::config::Settings::default();
            settings.storage.max_inline_bytes = user_limit;
            LambdaWorker::new(
                Engine::new(settings).unwrap(),
                LambdaSettings {
                    runtime_api: String::new(),
                    response_mode: mode,
                    deadline_margin: Duration::from_secs(3),
                },
            )
        };
        let output = |bytes: usize| Finished {
            output: json!({"images": [{"data": "A".repeat(bytes)}]}),
            error: None,
        };
        let b = worker(ResponseMode::Buffered, Some(1000));
        assert!(b.check_size(output(5 << 20), 0).error.is_none());
        let refused = b.check_size(output(7 << 20), 0);
        let e = refused.error.unwrap();
        assert_eq!(e.error_type, "OutputTooLarge");
        assert!(
            e.error_message.starts_with(
                "The job output is 7.0 MB, over the 6.0 MB a buffered Lambda response"
            ),
            "{}",
            e.error_message
        );
        assert_eq!(refused.output["error"], json!(e.error_message));
        // A raised limit (a raised quota) is trusted; streamed progress counts against 20 MB.
        let raised = worker(ResponseMode::Buffered, Some(10 << 20));
        assert!(raised.check_size(output(7 << 20), 0).error.is_none());
        let s = worker(ResponseMode::Streaming, Some(1000));
        assert!(s.check_size(output(19 << 20), 0).error.is_none());
        assert!(s.check_size(output(19 << 20), 2 << 20).error.is_some());
    }

    #[test]
    fn sizes_and_seconds() {
        let v = json!({"a": "xyz", "b": [1, 2]});
        assert_eq!(json_len(&v), v.to_string().len() as u64);
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5");
        assert_eq!(seconds(Duration::from_secs(30)), "30");
        assert_eq!(mb(3 * 1024 * 1024 / 2), "1.5");
    }
}
