//! The Lambda front end: runs each invocation as one job on the runner, buffered or streamed.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lambda_runtime::streaming::{Body, Sender};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent, StreamResponse};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::event::{deadline_of, decode_event};
use super::response::{
    diagnostic, error_type, error_type_of, json_len, ndjson, output_line, Finished,
};
use super::settings::{self, LambdaSettings, ResponseMode};
use crate::job::{DeadlineSource, Job, JobFailure, JobOutput, JobRequest, Report};
use crate::progress::ProgressSnapshot;
use crate::runner::{Controls, Deadline, ProgressSink, Runner};

/// Bytes as MB (MiB), one decimal.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1_048_576.0)
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
    pub async fn buffered(&self, event: LambdaEvent<Value>) -> Result<JobOutput, Diagnostic> {
        let (request, deadline) = read_event(event)?;
        let span = tracing::info_span!("invocation", job_id = %request.id);
        let controls = self.controls(deadline, request.timeout);
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
        let (request, deadline) = read_event(event)?;
        let id = request.id.clone();
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

/// An invocation's job and deadline; an event that cannot be read is an `InvalidInput` error
/// response.
fn read_event(event: LambdaEvent<Value>) -> Result<(JobRequest, Option<SystemTime>), Diagnostic> {
    let (payload, context) = event.into_parts();
    match decode_event(payload) {
        Ok(job) => Ok((
            job.request(&context.request_id),
            deadline_of(context.deadline),
        )),
        Err(e) => {
            info!(error = %e, "the event cannot be read");
            Err(diagnostic(error_type::INVALID_INPUT, &e.to_string(), None))
        }
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
    use super::super::event::*;
    use super::super::response::*;
    use super::*;
    use crate::job::codec;
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
        assert!(matches!(bad, EventError::NotJson(_)), "{bad:?}");
        assert_eq!(
            bad.to_string(),
            "The request body is not valid JSON: key must be a string at line 1 column 2"
        );
        let bad = decode_event(
            json!({"requestContext": {}, "body": "not base64!", "isBase64Encoded": true}),
        )
        .unwrap_err();
        assert!(matches!(bad, EventError::NotBase64(_)), "{bad:?}");
        assert!(
            bad.to_string()
                .starts_with("The request body is not valid base64: "),
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
        let f = Finished::of(Err(JobFailure::Rejected(
            Report::with_details("Workflow validation failed", vec!["Node 1: x".into()]),
            Vec::new(),
        )));
        let e = f.error.clone().unwrap();
        assert_eq!(e.error_type, error_type::COMFYUI_ERROR);
        assert_eq!(e.error_message, "Workflow validation failed\nNode 1: x");
        let shown = diagnostic(
            "ComfyUIError",
            "Failed:\n• Node 1: x",
            Some(&["Node 1: x".into(), "y".into()]),
        );
        assert_eq!(shown.error_message, "Failed:\n• Node 1: x\ny");
        assert_eq!(f.output.to_json()["details"], json!(["Node 1: x"]));
        let line = output_line(&Finished {
            output: JobOutput::error("boom"),
            error: None,
        });
        assert_eq!(&line[..], b"{\"output\":{\"error\":\"boom\"}}\n");
        let line = output_line(&f);
        let parsed: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["errorType"], e.error_type.as_str());
        assert_eq!(parsed["errorMessage"], e.error_message.as_str());
        assert_eq!(parsed["output"], f.output.to_json());
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
            output: JobOutput::from(
                crate::job::Completed::from_parts(
                    vec![crate::job::FileEntry {
                        filename: "a.png".into(),
                        kind: "base64".into(),
                        data: "A".repeat(bytes).into(),
                        content_type: "image/png".into(),
                        format: None,
                        frame_rate: None,
                    }],
                    vec![],
                )
                .unwrap(),
            ),
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
        assert_eq!(refused.output.to_json()["error"], json!(e.error_message));
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
