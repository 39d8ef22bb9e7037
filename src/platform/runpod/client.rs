//! The platform's HTTP endpoints: job-take, job-done (results and progress), ping, job-stop.
//! One persistent client for everything; `Authorization` is the raw API key, as the SDK sends it.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::StatusCode;
use serde_json::Value;
use tracing::{debug, warn};

use super::job::{parse_jobs, short, PlatformJob};
use super::settings::RunPodSettings;
use crate::error_chain::error_chain;

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
