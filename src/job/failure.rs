//! How a job fails: one typed value from the engine and the runner to every front end, which
//! turns it into its own wire format at the edge (worker-comfyui's `{"error", "details"?}`,
//! Lambda's `errorType`, the local endpoint's status). Nothing downstream reads a message to
//! learn what kind of failure it is: the variant says so.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::comfy::NodeErrors;

/// What a failure says: worker-comfyui's `error` and `details`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The `error` text.
    pub message: String,
    /// The `details` list (omitted from the output when `None`).
    pub details: Option<Vec<String>>,
}

impl Report {
    /// A message without details.
    pub fn new(message: impl Into<String>) -> Report {
        Report {
            message: message.into(),
            details: None,
        }
    }

    /// A message with details.
    pub fn with_details(message: impl Into<String>, details: Vec<String>) -> Report {
        Report {
            message: message.into(),
            details: Some(details),
        }
    }

    /// A message with details when there are any (`None` for an empty list).
    pub fn with_details_if_any(message: impl Into<String>, details: Vec<String>) -> Report {
        if details.is_empty() {
            Report::new(message)
        } else {
            Report::with_details(message, details)
        }
    }

    fn map_text(self, f: impl Fn(&str) -> String) -> Report {
        Report {
            message: f(&self.message),
            details: self.details.map(|list| list.iter().map(|d| f(d)).collect()),
        }
    }
}

/// Which limit a deadline stands for; it names the setting in the message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeadlineSource {
    /// The serverless worker's `JOB_TIMEOUT_S`, or the input's `timeout_s` when shorter.
    WorkerOrInput,
    /// The input's `timeout_s`.
    Input,
    /// The local endpoint's `policy.executionTimeout`.
    Policy,
    /// A Lambda invocation's deadline, `left` away when the job started, less `margin`.
    Lambda {
        /// Time to the deadline when the job started.
        left: Duration,
        /// `LAMBDA_DEADLINE_MARGIN_S` (at most a quarter of `left`).
        margin: Duration,
    },
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq)]
pub enum JobFailure {
    /// The job's input cannot be used: worker-comfyui's validation messages (`input`,
    /// `workflow`, `images`/`files`, `output`).
    BadInput(Report),
    /// An input file could not be fetched (a URL or an `s3://` object).
    InputFiles(Report),
    /// The job's bucket (`s3Config`) cannot be used.
    Storage(Report),
    /// ComfyUI could not be reached before the prompt was queued.
    ComfyUnreachable(Report),
    /// A UI-format workflow could not be converted to the API format.
    Conversion(Report),
    /// ComfyUI did not take the input files.
    Upload(Report),
    /// ComfyUI's validation refused the workflow (`node_errors` in the details, as lines; and
    /// typed, per node).
    Rejected(Report, Vec<NodeErrors>),
    /// Talking to ComfyUI failed during the prompt (HTTP, socket, ComfyUI stopped responding).
    Comfy(Report),
    /// A node raised an error and nothing was returned.
    NodeError(Report),
    /// The prompt was interrupted from outside the job and nothing was returned.
    Interrupted(Report),
    /// The prompt ran but nothing could be returned (`Job processing failed`).
    NoOutput(Report),
    /// The result is over what the platform accepts and there is nowhere to upload it.
    OutputTooLarge(Report),
    /// The job was cancelled (by the platform, the client, or Ctrl-C).
    Cancelled(Report),
    /// A deadline passed; the prompt was interrupted.
    Deadline {
        /// How long the job was given.
        after: Duration,
        /// Which limit it was.
        source: DeadlineSource,
    },
    /// The worker shut down and the job outlived the shutdown grace.
    Shutdown {
        /// `SHUTDOWN_GRACE_S`.
        grace: Duration,
    },
    /// A bug in comfy-worker: the job panicked (the message is the panic's).
    Panic(String),
}

impl JobFailure {
    /// The `error` text.
    pub fn message(&self) -> Cow<'_, str> {
        match self.report() {
            Some(r) => Cow::Borrowed(&r.message),
            None => Cow::Owned(self.generated_message().unwrap_or_default()),
        }
    }

    /// The `details` list, when there is one.
    pub fn details(&self) -> Option<&[String]> {
        self.report().and_then(|r| r.details.as_deref())
    }

    /// The failure as worker-comfyui's error output.
    pub fn into_report(mut self) -> Report {
        match self.report_mut() {
            Some(report) => std::mem::take(report),
            None => Report::new(self.generated_message().unwrap_or_default()),
        }
    }

    /// The same failure with `f` applied to its texts (the secret scrubber).
    pub fn map_text(mut self, f: impl Fn(&str) -> String) -> JobFailure {
        if let JobFailure::Rejected(_, nodes) = &mut self {
            *nodes = std::mem::take(nodes)
                .into_iter()
                .map(|n| n.map_text(&f))
                .collect();
        }
        if let Some(report) = self.report_mut() {
            *report = std::mem::take(report).map_text(f);
        } else if let JobFailure::Panic(what) = &mut self {
            *what = f(what);
        }
        self
    }

    fn report(&self) -> Option<&Report> {
        match self {
            JobFailure::BadInput(r)
            | JobFailure::InputFiles(r)
            | JobFailure::Storage(r)
            | JobFailure::ComfyUnreachable(r)
            | JobFailure::Conversion(r)
            | JobFailure::Upload(r)
            | JobFailure::Rejected(r, _)
            | JobFailure::Comfy(r)
            | JobFailure::NodeError(r)
            | JobFailure::Interrupted(r)
            | JobFailure::NoOutput(r)
            | JobFailure::OutputTooLarge(r)
            | JobFailure::Cancelled(r) => Some(r),
            JobFailure::Deadline { .. } | JobFailure::Shutdown { .. } | JobFailure::Panic(_) => {
                None
            }
        }
    }

    fn report_mut(&mut self) -> Option<&mut Report> {
        match self {
            JobFailure::BadInput(r)
            | JobFailure::InputFiles(r)
            | JobFailure::Storage(r)
            | JobFailure::ComfyUnreachable(r)
            | JobFailure::Conversion(r)
            | JobFailure::Upload(r)
            | JobFailure::Rejected(r, _)
            | JobFailure::Comfy(r)
            | JobFailure::NodeError(r)
            | JobFailure::Interrupted(r)
            | JobFailure::NoOutput(r)
            | JobFailure::OutputTooLarge(r)
            | JobFailure::Cancelled(r) => Some(r),
            JobFailure::Deadline { .. } | JobFailure::Shutdown { .. } | JobFailure::Panic(_) => {
                None
            }
        }
    }

    /// The text of the failures the runner makes (`None` for the engine's reports).
    fn generated_message(&self) -> Option<String> {
        Some(match self {
            JobFailure::Deadline { after, source } => match source {
                DeadlineSource::WorkerOrInput => timed_out(*after, "JOB_TIMEOUT_S or input.timeout_s"),
                DeadlineSource::Input => timed_out(*after, "input.timeout_s"),
                DeadlineSource::Policy => timed_out(*after, "policy.executionTimeout"),
                DeadlineSource::Lambda { left, margin } => format!(
                    "Invocation timed out: the Lambda deadline was {} s away, so the ComfyUI prompt was interrupted after {} s, {} s before it (LAMBDA_DEADLINE_MARGIN_S; raise the function's timeout)",
                    seconds(*left),
                    seconds(*after),
                    seconds(*margin)
                ),
            },
            JobFailure::Shutdown { grace } => format!(
                "Worker shutting down: the job did not finish within the {} s shutdown grace (SHUTDOWN_GRACE_S), so its ComfyUI prompt was interrupted",
                seconds(*grace)
            ),
            JobFailure::Panic(what) => format!("Internal error in comfy-worker: {what}"),
            _ => return None,
        })
    }
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for JobFailure {}

fn timed_out(after: Duration, setting: &str) -> String {
    format!(
        "Job timed out after {} s ({setting}); the ComfyUI prompt was interrupted",
        seconds(after)
    )
}

/// `2.5`, `30`, `600`: seconds as people write them (one decimal below 10 s when not whole).
pub fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 && s.fract() != 0.0 {
        format!("{s:.1}")
    } else {
        format!("{s:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_limit() {
        let s = Duration::from_millis;
        let cases = [
            (
                JobFailure::Deadline {
                    after: s(2500),
                    source: DeadlineSource::WorkerOrInput,
                },
                "Job timed out after 2.5 s (JOB_TIMEOUT_S or input.timeout_s); the ComfyUI prompt was interrupted",
            ),
            (
                JobFailure::Deadline {
                    after: s(30_000),
                    source: DeadlineSource::Policy,
                },
                "Job timed out after 30 s (policy.executionTimeout); the ComfyUI prompt was interrupted",
            ),
            (
                JobFailure::Deadline {
                    after: s(57_000),
                    source: DeadlineSource::Lambda {
                        left: s(60_000),
                        margin: s(3000),
                    },
                },
                "Invocation timed out: the Lambda deadline was 60 s away, so the ComfyUI prompt was interrupted after 57 s, 3 s before it (LAMBDA_DEADLINE_MARGIN_S; raise the function's timeout)",
            ),
            (
                JobFailure::Shutdown { grace: s(600) },
                "Worker shutting down: the job did not finish within the 0.6 s shutdown grace (SHUTDOWN_GRACE_S), so its ComfyUI prompt was interrupted",
            ),
            (
                JobFailure::Panic("boom".into()),
                "Internal error in comfy-worker: boom",
            ),
        ];
        for (failure, text) in cases {
            assert_eq!(failure.message(), text);
            assert_eq!(failure.details(), None);
            assert_eq!(failure.into_report(), Report::new(text));
        }
    }

    #[test]
    fn reports_keep_their_details_and_can_be_scrubbed() {
        let f = JobFailure::Rejected(
            Report::with_details("bad", vec!["key=s3cr3t".into()]),
            Vec::new(),
        );
        assert_eq!(f.message(), "bad");
        assert_eq!(f.details(), Some(&["key=s3cr3t".to_owned()][..]));
        let clean = f.map_text(|t| t.replace("s3cr3t", "[redacted]"));
        assert_eq!(clean.details(), Some(&["key=[redacted]".to_owned()][..]));
        assert!(matches!(clean, JobFailure::Rejected(..)));
        assert_eq!(Report::with_details_if_any("m", vec![]), Report::new("m"));
    }
}
