//! The platform's HTTP endpoints: job-take, job-done (results and progress), ping, job-stop.
//! One persistent client for everything; `Authorization` is the raw API key, as the SDK sends it.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::StatusCode;
use serde_json::Value;
use tracing::{debug, warn};

use super::settings::RunPodSettings;
use crate::error_chain::error_chain;
use crate::job::JobRequest;

/// A job as the platform hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformJob {
    /// Job id.
    pub id: String,
    /// `input` (absent when the platform sent none).
    pub input: Option<Value>,
    /// `progress_webhook`: top-level on the job (the platform passes unknown keys through) or
    /// inside `input`; not yet checked.
    pub progress_webhook: Option<String>,
    /// `s3Config` (`{accessId, accessSecret, bucketName, endpointUrl}`): the platform's per-job
    /// bucket, passed to the engine as it is (it holds a secret: never logged).
    pub s3_config: Option<Value>,
    /// Why the job cannot be run although its id could be read (its JSON is nested too deeply or
    /// holds invalid strings): the job is answered with this error instead of being lost.
    pub unreadable: Option<String>,
}

impl PlatformJob {
    /// The job as the runner takes it.
    pub fn request(&self) -> JobRequest {
        JobRequest::new(self.id.clone(), self.input.clone())
            .with_s3_config(self.s3_config.clone())
            .with_progress_webhook(self.progress_webhook.clone())
    }
}

/// What one job-take poll gave.
#[derive(Debug)]
pub enum Take {
    /// Jobs to run (one, or several from a batch reply).
    Jobs(Vec<PlatformJob>),
    /// Nothing to do now.
    NoJob,
    /// HTTP 429: wait before polling again.
    RateLimited,
    /// Anything else; retried with backoff.
    Failed(String),
}

/// How a result post ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The platform accepted it.
    Delivered,
    /// The platform refused it or never answered; nothing more can be done.
    Lost(String),
}

/// The platform client.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    settings: RunPodSettings,
}

/// Errors a post may be retried after: connection problems, 5xx and 429.
fn retryable(status: Option<StatusCode>) -> bool {
    match status {
        None => true,
        Some(s) => s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS,
    }
}

/// The platform received the whole request and did not answer in time: sending it again could
/// deliver the result twice (a platform that is slow, not down, applies the first one too).
fn unanswered(e: &reqwest::Error) -> bool {
    e.is_timeout() && !e.is_connect()
}

/// Parses a job-take reply body.
pub(crate) fn parse_jobs(body: &[u8]) -> Result<Vec<PlatformJob>, String> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return unreadable_jobs(body, &e),
    };
    let items = match value {
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        other => {
            return Err(format!(
                "job-take reply is not a job: {}",
                short(&other.to_string())
            ))
        }
    };
    let mut jobs = Vec::new();
    for item in items {
        let id = match item.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                // The job may carry secrets (`comfy_org_api_key`, ...): logged redacted.
                let shown = crate::secret::redact_json(&item).to_string();
                warn!(job = %short(&shown), "Job has missing field(s): id or input. Skipped");
                continue;
            }
        };
        let input = item.get("input").cloned();
        let progress_webhook = progress_webhook(&item, input.as_ref());
        let s3_config = item.get("s3Config").filter(|v| !v.is_null()).cloned();
        jobs.push(PlatformJob {
            id,
            input,
            progress_webhook,
            s3_config,
            unreadable: None,
        });
    }
    Ok(jobs)
}

/// A job-take reply that is not a JSON value serde_json can read: nested deeper than its
/// recursion limit (128 levels, which keeps a hostile job from overflowing the stack), or with
/// invalid UTF-8 or a lone surrogate in a string. If the reply still has the shape of a job (or
/// a batch) whose `id` can be read, skipping everything else without recursion, each such job is
/// answered with an error rather than lost (in a batch, all of them: which one is bad is not
/// known); otherwise the reply is refused as a whole.
fn unreadable_jobs(body: &[u8], error: &serde_json::Error) -> Result<Vec<PlatformJob>, String> {
    #[derive(serde::Deserialize)]
    struct Shallow {
        #[serde(default)]
        id: Option<Value>,
    }
    let not_json = || format!("job-take reply is not JSON: {error}");
    if error.classify() != serde_json::error::Category::Syntax {
        return Err(not_json());
    }
    // serde_json skips the fields not named here without recursion (`ignore_value`).
    let items = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<Shallow>(body).map(|one| vec![one]),
        Some(b'[') => serde_json::from_slice::<Vec<Shallow>>(body),
        _ => return Err(not_json()),
    };
    let Ok(items) = items else {
        return Err(not_json());
    };
    let why = if error.to_string().starts_with("recursion limit exceeded") {
        format!("The job's JSON is nested more than 128 levels deep, so it was not run ({error})")
    } else {
        format!("The job's JSON cannot be read, so it was not run ({error})")
    };
    let jobs: Vec<PlatformJob> = items
        .into_iter()
        .filter_map(|item| match item.id {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .map(|id| PlatformJob {
            id,
            input: None,
            progress_webhook: None,
            s3_config: None,
            unreadable: Some(why.clone()),
        })
        .collect();
    if jobs.is_empty() {
        return Err(not_json());
    }
    warn!(jobs = jobs.len(), error = %error, "job-take reply cannot be read; answering its jobs with an error");
    Ok(jobs)
}

/// The job's `progress_webhook`, top-level first, then in `input` (an object, or a JSON string as
/// the input may be). A value that is not a string is reported and ignored.
fn progress_webhook(job: &Value, input: Option<&Value>) -> Option<String> {
    let parsed;
    let input = match input {
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s).ok();
            parsed.as_ref()
        }
        other => other,
    };
    let found = job
        .get("progress_webhook")
        .or_else(|| input.and_then(|i| i.get("progress_webhook")));
    match found {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.trim().is_empty() => None,
        Some(Value::String(url)) => Some(url.trim().to_owned()),
        Some(_) => {
            warn!("progress_webhook is not a string; the job runs without it");
            None
        }
    }
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

impl PlatformClient {
    /// A client for the platform in `settings`.
    pub fn new(settings: RunPodSettings) -> Result<PlatformClient, String> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            let mut value = HeaderValue::from_str(key.expose())
                .map_err(|_| "RUNPOD_AI_API_KEY is not a valid header value".to_owned())?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("comfy-worker/", env!("CARGO_PKG_VERSION"))),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(PlatformClient { http, settings })
    }

    /// The settings.
    pub fn settings(&self) -> &RunPodSettings {
        &self.settings
    }

    /// One job-take long poll.
    pub async fn take(&self, job_in_progress: bool) -> Take {
        let url = self.settings.take_url(job_in_progress);
        let resp = match self
            .http
            .get(&url)
            .timeout(self.settings.long_poll_timeout)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Take::NoJob,
            Err(e) => return Take::Failed(error_chain(&e)),
        };
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => return Take::NoJob,
            StatusCode::TOO_MANY_REQUESTS => return Take::RateLimited,
            s if !s.is_success() => {
                let body = resp.text().await.unwrap_or_default();
                return Take::Failed(format!("HTTP {s}: {}", short(&body)));
            }
            _ => {}
        }
        let is_json = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Take::Failed(error_chain(&e)),
        };
        if !is_json || body.is_empty() {
            return Take::NoJob;
        }
        match parse_jobs(&body) {
            Ok(jobs) if jobs.is_empty() => Take::NoJob,
            Ok(jobs) => Take::Jobs(jobs),
            // The platform answered, with nothing usable: poll again (after the loop's floor for
            // quick answers), as the SDK does, rather than back off as for an outage.
            Err(e) => {
                warn!(error = %e, "job-take reply ignored");
                Take::NoJob
            }
        }
    }

    fn job_done(&self, job_id: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.http
            .post(self.settings.result_url(job_id))
            // The SDK's headers, byte for byte: a form content type although the body is JSON.
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .header("X-Request-ID", job_id)
            .body(body)
    }

    /// Posts one progress update (`{"status": "IN_PROGRESS", "output": ...}`); best effort.
    pub async fn post_progress(&self, job_id: &str, output: &Value) -> Result<(), String> {
        let body =
            serde_json::to_vec(&serde_json::json!({"status": "IN_PROGRESS", "output": output}))
                .map_err(|e| e.to_string())?;
        let resp = self
            .job_done(job_id, body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status()))
        }
    }

    /// Posts a final result, retrying connection errors, 5xx and 429 with backoff. A post the
    /// platform received but did not answer within `RUNPOD_RESULT_TIMEOUT_S` is not sent again, so
    /// a result is never delivered twice. A 400 for a body over 1 MiB (the platform's size limit)
    /// is replaced by a short error so the job ends.
    pub async fn post_result(&self, job_id: &str, body: &Value) -> Delivery {
        let bytes = match serde_json::to_vec(body) {
            Ok(b) => b,
            Err(e) => return Delivery::Lost(format!("cannot serialise the result: {e}")),
        };
        // `Bytes`: a retry re-sends the same buffer instead of copying it.
        let bytes = bytes::Bytes::from(bytes);
        match self.post_with_retries(job_id, bytes.clone()).await {
            Err((Some(StatusCode::BAD_REQUEST), why)) if bytes.len() > 1 << 20 => {
                let mb = bytes.len() as f64 / 1_048_576.0;
                warn!(
                    bytes = bytes.len(),
                    "the platform refused the result (too large); posting a short error instead"
                );
                let mut fallback = serde_json::json!({"error": format!(
                    "The job output is {mb:.1} MB, which the platform refused (HTTP 400; results are limited to about 20 MB). Return fewer or smaller outputs."
                )});
                if body.get("stopPod") == Some(&Value::Bool(true)) {
                    fallback["stopPod"] = Value::Bool(true);
                }
                let bytes = serde_json::to_vec(&fallback).unwrap_or_default();
                match self.post_with_retries(job_id, bytes.into()).await {
                    Ok(()) => Delivery::Delivered,
                    Err((_, e)) => {
                        Delivery::Lost(format!("{why}; the short error was refused too: {e}"))
                    }
                }
            }
            Err((_, why)) => Delivery::Lost(why),
            Ok(()) => Delivery::Delivered,
        }
    }

    async fn post_with_retries(
        &self,
        job_id: &str,
        bytes: bytes::Bytes,
    ) -> Result<(), (Option<StatusCode>, String)> {
        let attempts = self.settings.result_attempts.max(1);
        let mut delay = self.settings.result_retry_delay;
        let timeout = self.settings.result_timeout;
        let mut last = (None, String::new());
        for attempt in 1..=attempts {
            let sent = self
                .job_done(job_id, bytes.clone())
                .timeout(timeout)
                .send()
                .await;
            last = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    (Some(status), format!("HTTP {status}: {}", short(&text)))
                }
                Err(e) if unanswered(&e) => {
                    return Err((None, format!(
                        "no answer within {} s (RUNPOD_RESULT_TIMEOUT_S); the platform may have the result, so it is not sent again",
                        timeout.as_secs_f64()
                    )))
                }
                Err(e) => (None, error_chain(&e)),
            };
            if !retryable(last.0) || attempt == attempts {
                break;
            }
            warn!(attempt, error = %last.1, retry_in_ms = delay.as_millis() as u64, "posting the result failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        Err(last)
    }

    /// One heartbeat; the reply is ignored.
    pub async fn ping(&self, job_ids: &[String]) {
        let Some(url) = self.settings.ping_url_for(job_ids) else {
            return;
        };
        let timeout = self.settings.ping_interval * 2;
        match self.http.get(&url).timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => debug!(jobs = job_ids.len(), "ping"),
            Ok(r) => warn!(status = %r.status(), "ping refused"),
            Err(e) => warn!(error = %error_chain(&e), "ping failed"),
        }
    }

    /// The SDK's fitness-check failure report: one best-effort
    /// `GET <ping URL>&status=unhealthy&check=<check>&reason=<at most 256 chars>` (2 s timeout),
    /// sent when the heartbeat is configured.
    pub async fn report_unhealthy(&self, check: &str, reason: &str) {
        let Some(url) = self.settings.ping_url_for(&[]) else {
            return;
        };
        let Ok(mut url) = reqwest::Url::parse(&url) else {
            return;
        };
        let reason = crate::secret::scrub(reason);
        let reason: String = reason.chars().take(256).collect();
        url.query_pairs_mut()
            .append_pair("status", "unhealthy")
            .append_pair("check", check)
            .append_pair("reason", &reason);
        match self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) => debug!(status = %r.status(), "unhealthy report sent"),
            Err(e) => warn!(error = %error_chain(&e), "unhealthy report failed"),
        }
    }

    /// One job-stop long poll: the ids to stop, or why not (and how long to wait before the next).
    pub async fn stopped_jobs(&self) -> Result<Vec<String>, (String, Duration)> {
        let Some(url) = self.settings.stop_url() else {
            return Err(("no job-stop URL".into(), Duration::MAX));
        };
        let resp = match self
            .http
            .get(&url)
            .timeout(self.settings.long_poll_timeout)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Ok(Vec::new()),
            Err(e) => return Err((error_chain(&e), Duration::from_secs(1))),
        };
        match resp.status() {
            StatusCode::NO_CONTENT => return Ok(Vec::new()),
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(("HTTP 429".into(), Duration::from_secs(5)))
            }
            s if !s.is_success() => return Err((format!("HTTP {s}"), Duration::from_secs(1))),
            _ => {}
        }
        let body: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => {
                return Err((
                    format!("job-stop reply is not JSON: {e}"),
                    Duration::from_secs(1),
                ))
            }
        };
        Ok(body
            .get("jobsToStop")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn take_replies() {
        let jobs = parse_jobs(br#"{"id": "a", "input": {"x": 1}}"#).unwrap();
        assert_eq!(
            jobs,
            [PlatformJob {
                id: "a".into(),
                input: Some(json!({"x": 1})),
                progress_webhook: None,
                s3_config: None,
                unreadable: None,
            }]
        );
        let batch =
            parse_jobs(br#"[{"id": "a", "input": {}}, {"input": {}}, {"id": "c"}]"#).unwrap();
        assert_eq!(
            batch.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(batch[1].input, None);
        assert!(parse_jobs(b"garbage").is_err());
        assert!(parse_jobs(b"42").is_err());
    }

    #[test]
    fn unreadable_jobs_keep_their_id() {
        let deep = format!(
            r#"{{"id": "deep", "input": {{"x": {}1{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let jobs = parse_jobs(deep.as_bytes()).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].id.as_str(), &jobs[0].input), ("deep", &None));
        let why = jobs[0].unreadable.as_deref().unwrap();
        assert!(why.contains("nested more than 128 levels"), "{why}");

        let batch = br#"[{"id": "a", "input": {"s": "\udc80"}}, {"id": 7}, {"input": 1}]"#;
        let jobs = parse_jobs(batch).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a", "7"]);
        assert!(jobs[0]
            .unreadable
            .as_deref()
            .unwrap()
            .contains("cannot be read"));

        let mut raw = br#"{"id": "u", "input": {"image": ""#.to_vec();
        raw.extend_from_slice(&[0xff, 0xfe]);
        raw.extend_from_slice(br#""}}"#);
        assert_eq!(parse_jobs(&raw).unwrap()[0].id, "u");

        for garbage in [
            &b"{not json"[..],
            b"[[[[",
            br#"{"input": "\udc80"}"#,
            br#""\udc80""#,
        ] {
            assert!(parse_jobs(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn progress_webhook_top_level_or_in_input() {
        let hook = |body: &str| {
            parse_jobs(body.as_bytes()).unwrap()[0]
                .progress_webhook
                .clone()
        };
        let url = Some("https://example.com/hook".to_owned());
        assert_eq!(
            hook(r#"{"id": "a", "input": {}, "progress_webhook": "https://example.com/hook"}"#),
            url
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": " https://example.com/hook "}}"#),
            url
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": "{\"progress_webhook\": \"https://example.com/hook\"}"}"#),
            url
        );
        assert_eq!(
            hook(
                r#"{"id": "a", "progress_webhook": "https://example.com/hook", "input": {"progress_webhook": "https://other.example/"}}"#
            ),
            url,
            "the top-level one wins"
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": 7}}"#),
            None
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": ""}}"#),
            None
        );
        assert_eq!(hook(r#"{"id": "a"}"#), None);
    }
}
