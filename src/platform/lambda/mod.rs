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

use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use bytes::Bytes;
use lambda_runtime::streaming::{Body, Sender};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent, MetadataPrelude, StreamResponse};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

pub use settings::{LambdaConfigError, LambdaSettings, ResponseMode};

use crate::job::{
    codec, Completed, DeadlineSource, Job, JobFailure, JobOutput, JobRequest, Report,
};
use crate::progress::ProgressSnapshot;
use crate::runner::{Controls, Deadline, ProgressSink, Runner};

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
    /// A job's result as Lambda's response: the output, or the error response with its type.
    fn of(result: Result<Completed, JobFailure>) -> Finished {
        let error = result.as_ref().err().map(|failure| {
            diagnostic(
                error_type_of(failure),
                &failure.message(),
                failure.details(),
            )
        });
        Finished {
            output: JobOutput::from(result).into_json(),
            error,
        }
    }
}

/// The `errorType` of a failure.
fn error_type_of(failure: &JobFailure) -> &'static str {
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

/// Bytes as MB (MiB), one decimal.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
}

impl LambdaJob {
    /// The job as the runner takes it.
    pub fn request(&self, id: &str) -> JobRequest {
        JobRequest::new(id, self.input.clone()).with_s3_config(self.s3_config.clone())
    }
}

/// The Lambda front end: runs each invocation as one job on the runner.
#[derive(Debug, Clone)]
pub struct LambdaWorker {
    runner: Runner,
    settings: LambdaSettings,
}

impl LambdaWorker {
    /// A worker for `runner` (whose engine's inline limit the caller set for the response mode).
    pub fn new(runner: Runner, settings: LambdaSettings) -> LambdaWorker {
        LambdaWorker { runner, settings }
    }

    /// The settings.
    pub fn settings(&self) -> &LambdaSettings {
        &self.settings
    }

    /// Takes invocations from the Runtime API until `shutdown` (or a Runtime API failure, the
    /// `Err`). Expects the variables of [`settings::REQUIRED_VARS`] to be set.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), lambda_runtime::Error> {
        let storage = &self.runner.engine().settings().storage;
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
        let request = job.request(&context.request_id);
        let span = tracing::info_span!("invocation", job_id = %context.request_id);
        let controls = self.controls(deadline_of(context.deadline), request.timeout);
        let mut log = |s: &ProgressSnapshot| log_snapshot(s);
        let result = self
            .runner
            .run(&request, controls, &mut [&mut log])
            .instrument(span.clone())
            .await;
        let finished = self.check_size(Finished::of(result), 0);
        // FREE_MEMORY_AFTER_JOB: before the response, the only point the handler still runs.
        self.runner.after_job().instrument(span.clone()).await;
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
        let request = job.request(&id);
        let job = match Job::parse(&request) {
            Ok(job) => job,
            Err(failure) => {
                info!(error = %failure, "job input rejected");
                let e = diagnostic(
                    error_type_of(&failure),
                    &failure.message(),
                    failure.details(),
                );
                info!(error_type = %e.error_type, "Finished with an error response.");
                return Err(e);
            }
        };
        let (tx, body) = Body::channel();
        let worker = self.clone();
        let span = tracing::info_span!("invocation", job_id = %id);
        let controls = self.controls(deadline, request.timeout);
        tokio::spawn(async move { worker.stream_job(job, controls, tx).await }.instrument(span));
        Ok(ndjson(body))
    }

    /// Runs a streamed job: forwards its snapshots as lines while it runs, then the last line.
    async fn stream_job(&self, job: Job, controls: Controls, mut tx: Sender) {
        let cancel = controls.cancel.clone();
        let (lines, mut queued) = mpsc::unbounded_channel();
        let run = async {
            let mut progress = ProgressLines {
                lines,
                sent: 0,
                over_budget: false,
            };
            let result = self
                .runner
                .run_job(job, controls, &mut [&mut progress])
                .await;
            (result, progress.sent)
        };
        let forward = async {
            let mut open = true;
            while let Some(line) = queued.recv().await {
                if open && tx.send_data(line).await.is_err() {
                    warn!("the response stream closed; interrupting the job");
                    open = false;
                    cancel.cancel();
                }
            }
            open
        };
        let ((result, sent), open) = tokio::join!(run, forward);
        let finished = self.check_size(Finished::of(result), sent);
        report(&finished);
        if open && tx.send_data(output_line(&finished)).await.is_err() {
            error!("the response stream closed before the output line");
        }
        // The response ends here; FREE_MEMORY_AFTER_JOB's /free follows it.
        drop(tx);
        self.runner.after_job().await;
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
            self.runner
                .engine()
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
        Finished::of(Err(JobFailure::OutputTooLarge(Report::new(format!(
            "The job output is {} MB, over the {} MB a {} Lambda response may carry; set BUCKET_ENDPOINT_URL/BUCKET_ACCESS_KEY_ID/BUCKET_SECRET_ACCESS_KEY (or send s3Config) to return large outputs as URLs",
            mb(size),
            mb(limit),
            self.settings.response_mode.name()
        )))))
    }

    /// The job's controls: the invocation's deadline less the margin, and the input's
    /// `timeout_s`, whichever comes first.
    fn controls(&self, deadline: Option<SystemTime>, timeout: Option<Duration>) -> Controls {
        Controls {
            cancel: CancellationToken::new(),
            shutdown: None,
            deadlines: self.deadlines(deadline, timeout),
        }
    }

    /// The margin is at most a quarter of the time left, so a short function timeout (Lambda's
    /// default is 3 s) still leaves the job most of it. Past either deadline the job gets two
    /// thirds of the margin to wind down; then it is dropped (its prompt watcher interrupts the
    /// prompt) so the response still goes out before Lambda's deadline.
    fn deadlines(&self, deadline: Option<SystemTime>, timeout: Option<Duration>) -> Vec<Deadline> {
        let wind_down = |margin: Duration| Some((margin * 2 / 3).max(Duration::from_millis(100)));
        let by_deadline = deadline.map(|d| {
            let left = d
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let margin = self.settings.deadline_margin.min(left / 4);
            Deadline {
                after: left - margin,
                source: DeadlineSource::Lambda { left, margin },
                wind_down: wind_down(margin),
            }
        });
        let by_input = timeout.map(|after| Deadline {
            after,
            source: DeadlineSource::Input,
            wind_down: wind_down(self.settings.deadline_margin),
        });
        by_deadline.into_iter().chain(by_input).collect()
    }
}

/// A streamed job's progress as NDJSON lines, within their share of the response
/// ([`settings::PROGRESS_BUDGET`]); queued for the writer so the job never waits on the client.
struct ProgressLines {
    lines: mpsc::UnboundedSender<Bytes>,
    sent: u64,
    over_budget: bool,
}

impl ProgressSink for ProgressLines {
    fn snapshot(&mut self, s: &ProgressSnapshot) {
        let mut line = serde_json::to_vec(&json!({ "progress": s.to_json() })).unwrap_or_default();
        line.push(b'\n');
        if self.sent + line.len() as u64 > settings::PROGRESS_BUDGET {
            if !self.over_budget {
                warn!(
                    bytes = self.sent,
                    "progress lines reached their share of the streamed response; later snapshots are not streamed"
                );
                self.over_budget = true;
            }
            return;
        }
        self.sent += line.len() as u64;
        let _ = self.lines.send(Bytes::from(line));
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
    use crate::job::Engine;

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
        let f = Finished::of(Err(JobFailure::Rejected(Report::with_details(
            "Workflow validation failed",
            vec!["Node 1: x".into()],
        ))));
        let e = f.error.unwrap();
        assert_eq!(e.error_type, error_type::COMFYUI_ERROR);
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
            Runner::new(
                Engine::new(crate::config::Settings::default()).unwrap(),
                Duration::ZERO,
            ),
            settings,
        );
        let in_s = |s: u64| Some(SystemTime::now() + Duration::from_secs(s));
        // The runner takes the earliest; on a tie, the first (the invocation's deadline).
        let limit = |deadline, timeout| {
            worker
                .deadlines(deadline, timeout)
                .into_iter()
                .reduce(|a, b| if b.after < a.after { b } else { a })
        };
        let d = limit(in_s(60), None).unwrap();
        assert!(d.after <= Duration::from_secs(57) && d.after > Duration::from_secs(55));
        assert!(
            matches!(d.source, DeadlineSource::Lambda { margin, .. } if margin == Duration::from_secs(3))
        );
        assert_eq!(d.wind_down, Some(Duration::from_secs(2)));
        // Lambda's default 3 s timeout: a quarter of it as the margin, not all of it.
        let d = limit(in_s(4), None).unwrap();
        assert!(d.after > Duration::from_secs(2), "{:?}", d.after);
        assert!(
            matches!(d.source, DeadlineSource::Lambda { margin, .. } if margin < Duration::from_secs(1))
        );
        let d = limit(in_s(60), Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            (d.after, d.source),
            (Duration::from_secs(5), DeadlineSource::Input)
        );
        assert_eq!(limit(None, None), None);
    }

    #[test]
    fn responses_over_the_limit_fail_with_output_too_large() {
        let worker = |mode, user_limit: Option<u64>| {
            let mut settings = crate::config::Settings::default();
            settings.storage.max_inline_bytes = user_limit;
            LambdaWorker::new(
                Runner::new(Engine::new(settings).unwrap(), Duration::ZERO),
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
        assert_eq!(mb(3 * 1024 * 1024 / 2), "1.5");
    }
}
