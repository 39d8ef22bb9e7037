//! The platform's HTTP endpoints: job-take, job-done (results and progress), ping, job-stop.
//! One persistent client for everything; `Authorization` is the raw API key, as the SDK sends it.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use reqwest::StatusCode;
use serde_json::Value;
use tracing::{debug, error, info, warn};

use super::job::{parse_jobs, short, PlatformJob};
use super::result_body::ResultBody;
use super::settings::RunPodSettings;
use crate::metrics::{Metrics, RetryReason};
use crate::redact::error_chain;

/// Why the platform client cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API key cannot be sent in a header.
    #[error("RUNPOD_AI_API_KEY is not a valid header value")]
    InvalidApiKey,
    /// reqwest could not build the client.
    #[error("cannot build the HTTP client: {}", error_chain(.0))]
    Build(reqwest::Error),
}

/// Why a job-take failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// No answer: the connection or the transfer failed.
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    /// The platform answered with an error status.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status (neither 2xx, 204, 400 nor 429).
        status: StatusCode,
        /// The start of the reply's body.
        body: String,
    },
}

/// Why a result was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The result cannot be serialised.
    #[error("cannot serialise the result: {0}")]
    Encode(serde_json::Error),
    /// The connection or the transfer failed.
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    /// The platform refused it.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the reply's body.
        body: String,
    },
    /// The platform received it and did not answer in time (it may have it: a post sent again
    /// after this is the same result, which the platform keeps once).
    #[error("no answer within {} s (RUNPOD_RESULT_TIMEOUT_S)", .0.as_secs_f64())]
    Unanswered(Duration),
    /// The result was refused as too large, and the short error posted instead was refused too.
    #[error("{result}; the short error was refused too: {short_error}")]
    ShortErrorRefused {
        /// Why the result was refused.
        result: Box<PostError>,
        /// Why the short error was.
        short_error: Box<PostError>,
    },
}

impl PostError {
    /// Whether the post may be tried again: connection problems, resets, timeouts, 5xx and 429.
    fn retryable(&self) -> bool {
        match self {
            PostError::Transport(_) | PostError::Unanswered(_) => true,
            PostError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            PostError::Encode(_) | PostError::ShortErrorRefused { .. } => false,
        }
    }
}

/// Why a progress update was not posted (it is not retried: the next one supersedes it).
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The update cannot be serialised.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// No answer: the connection or the transfer failed.
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    /// The platform refused it.
    #[error("HTTP {0}")]
    Status(StatusCode),
}

/// Why a job-stop poll gave no ids; [`StopPollError::retry_after`] says when to poll again.
#[derive(Debug, thiserror::Error)]
pub enum StopPollError {
    /// The stop channel is not configured.
    #[error("no job-stop URL")]
    NoUrl,
    /// No answer: the connection or the transfer failed.
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    /// HTTP 429.
    #[error("HTTP 429")]
    RateLimited,
    /// Another error status.
    #[error("HTTP {0}")]
    Status(StatusCode),
    /// The reply's body is not JSON.
    #[error("job-stop reply is not JSON: {}", error_chain(.0))]
    NotJson(reqwest::Error),
}

impl StopPollError {
    /// How long to wait before the next poll (`Duration::MAX`: never poll).
    pub fn retry_after(&self) -> Duration {
        match self {
            StopPollError::NoUrl => Duration::MAX,
            StopPollError::RateLimited => Duration::from_secs(5),
            StopPollError::Transport(_) | StopPollError::Status(_) | StopPollError::NotJson(_) => {
                Duration::from_secs(1)
            }
        }
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
    Failed(TakeError),
}

/// How a result post ended.
#[derive(Debug)]
pub enum Delivery {
    /// The platform accepted it.
    Delivered,
    /// The platform refused it or never answered; nothing more can be done.
    Lost(PostError),
}

/// The platform client.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    settings: RunPodSettings,
    /// Where retries of result posts are counted.
    metrics: Option<Metrics>,
}

/// The platform received the whole request and did not answer in time: sending it again could
/// deliver the result twice (a platform that is slow, not down, applies the first one too).
fn unanswered(e: &reqwest::Error) -> bool {
    e.is_timeout() && !e.is_connect()
}

/// Whether a reply's `Content-Type` can be read as JSON: `application/json`, `text/json` or any
/// `+json` type, in any case, with or without parameters; a reply without one is read too.
fn is_json_media_type(header: Option<&HeaderValue>) -> bool {
    let Some(value) = header else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(essence.as_str(), "application/json" | "text/json") || essence.ends_with("+json")
}

impl PlatformClient {
    /// A client for the platform in `settings`.
    pub fn new(settings: RunPodSettings) -> Result<PlatformClient, ClientError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &settings.api_key {
            let mut value =
                HeaderValue::from_str(key.expose()).map_err(|_| ClientError::InvalidApiKey)?;
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
            .map_err(ClientError::Build)?;
        Ok(PlatformClient {
            http,
            settings,
            metrics: None,
        })
    }

    /// The same client counting its retries in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> PlatformClient {
        self.metrics = Some(metrics);
        self
    }

    /// The settings.
    pub fn settings(&self) -> &RunPodSettings {
        &self.settings
    }

    /// One job-take long poll.
    pub async fn take(&self, job_in_progress: bool, batch: usize) -> Take {
        let url = self.settings.take_url(job_in_progress, batch);
        let resp = match self
            .http
            .get(&url)
            .timeout(self.settings.long_poll_timeout)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Take::NoJob,
            Err(e) => return Take::Failed(TakeError::Transport(e)),
        };
        match resp.status() {
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => return Take::NoJob,
            StatusCode::TOO_MANY_REQUESTS => return Take::RateLimited,
            status if !status.is_success() => {
                let body = resp.text().await.unwrap_or_default();
                return Take::Failed(TakeError::Status {
                    status,
                    body: short(&body),
                });
            }
            _ => {}
        }
        let is_json = is_json_media_type(resp.headers().get(CONTENT_TYPE));
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Take::Failed(TakeError::Transport(e)),
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
        let request = self
            .http
            .post(self.settings.result_url(job_id))
            // The SDK's headers, byte for byte: a form content type although the body is JSON.
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("charset", "utf-8");
        // An id no header can carry is answered without it (job.rs refuses to run such a job).
        match HeaderValue::from_str(job_id) {
            Ok(id) => request.header("X-Request-ID", id),
            Err(_) => request,
        }
        .body(body)
    }

    /// Posts one progress update (`{"status": "IN_PROGRESS", "output": ...}`); best effort.
    pub async fn post_progress(&self, job_id: &str, output: &Value) -> Result<(), ProgressError> {
        let body =
            serde_json::to_vec(&serde_json::json!({"status": "IN_PROGRESS", "output": output}))
                .map_err(ProgressError::Encode)?;
        let resp = self
            .job_done(job_id, body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(ProgressError::Transport)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ProgressError::Status(resp.status()))
        }
    }

    /// Posts a final result, retrying what the platform did not take (connection errors,
    /// resets, no answer within `RUNPOD_RESULT_TIMEOUT_S`, 5xx, 429) with capped exponential
    /// backoff for `RUNPOD_RESULT_RETRY_WINDOW_S`. A post sent again after an unanswered one is
    /// the same result, which the platform keeps once. A 400 for our own request (a body over
    /// 1 MiB, the platform's size limit) is answered with the smallest valid body instead, a
    /// short error, so the job ends. A result still not delivered is written to the spool
    /// (`RUNPOD_RESULT_SPOOL_DIR`) and posted again when the worker starts.
    pub async fn post_result(&self, job_id: &str, body: &Value) -> Delivery {
        match ResultBody::from_json(body) {
            Ok(body) => self.post_result_body(job_id, body).await,
            Err(e) => Delivery::Lost(PostError::Encode(e)),
        }
    }

    /// [`PlatformClient::post_result`] for a body already built: its files are sent from
    /// where they are, never copied, with its length up front.
    pub async fn post_result_body(&self, job_id: &str, body: ResultBody) -> Delivery {
        let delivery = match self.post_with_retries(job_id, &body).await {
            Err(
                why @ PostError::Status {
                    status: StatusCode::BAD_REQUEST,
                    ..
                },
            ) if body.len() > 1 << 20 => {
                let mb = body.len() as f64 / 1_048_576.0;
                warn!(
                    bytes = body.len(),
                    "the platform refused the result (too large); posting a short error instead"
                );
                let mut fallback = serde_json::json!({"error": format!(
                    "The job output is {mb:.1} MB, which the platform refused (HTTP 400; results are limited to about 20 MB). Return fewer or smaller outputs."
                )});
                if body.stops_pod() {
                    fallback["stopPod"] = Value::Bool(true);
                }
                let short =
                    ResultBody::from_bytes(serde_json::to_vec(&fallback).unwrap_or_default());
                match self.post_with_retries(job_id, &short).await {
                    Ok(()) => Delivery::Delivered,
                    Err(e) => Delivery::Lost(PostError::ShortErrorRefused {
                        result: Box::new(why),
                        short_error: Box::new(e),
                    }),
                }
            }
            Err(why) => Delivery::Lost(why),
            Ok(()) => Delivery::Delivered,
        };
        if let Delivery::Lost(why) = &delivery {
            if why.retryable() {
                match body.to_vec() {
                    Ok(bytes) => self.spool(job_id, &bytes),
                    Err(e) => {
                        error!(error = %e, "the result cannot be spooled for a later delivery: its outputs cannot be read")
                    }
                }
            }
        }
        delivery
    }

    async fn post_with_retries(&self, job_id: &str, body: &ResultBody) -> Result<(), PostError> {
        let attempts = self.settings.result_attempts;
        let window = self.settings.result_window;
        let mut delay = self.settings.result_retry_delay;
        let timeout = self.settings.result_timeout;
        let started = std::time::Instant::now();
        let mut attempt = 1;
        let mut unanswered_before = false;
        loop {
            // The length up front: a streamed body is not sent chunked.
            let sent = self
                .job_done(job_id, body.to_body())
                .header(reqwest::header::CONTENT_LENGTH, body.len())
                .timeout(timeout)
                .send()
                .await;
            let failed = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                // The platform refuses a result it already has: the unanswered post got there.
                Ok(resp) if unanswered_before && resp.status().is_client_error() => {
                    info!(status = %resp.status(), "the platform already has the result (an earlier post went unanswered)");
                    return Ok(());
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    PostError::Status {
                        status,
                        body: short(&text),
                    }
                }
                Err(e) if unanswered(&e) => PostError::Unanswered(timeout),
                Err(e) => PostError::Transport(e),
            };
            unanswered_before |= matches!(failed, PostError::Unanswered(_));
            let out_of_attempts = attempts.is_some_and(|n| attempt >= n);
            let out_of_time = started.elapsed() + delay >= window;
            if !failed.retryable() || out_of_attempts || out_of_time {
                return Err(failed);
            }
            warn!(attempt, error = %failed, retry_in_ms = delay.as_millis() as u64, "posting the result failed; retrying");
            if let Some(metrics) = &self.metrics {
                metrics.retry(RetryReason::ResultPost);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
            attempt += 1;
        }
    }

    /// Keeps a result that could not be delivered, to post it again when the worker starts.
    fn spool(&self, job_id: &str, body: &[u8]) {
        let Some(dir) = &self.settings.result_spool else {
            return;
        };
        match super::spool::write(dir, job_id, body) {
            Ok(path) => {
                warn!(path = %path.display(), "the result is kept in the spool; it is posted again when the worker starts")
            }
            Err(e) => error!(error = %e, "the result could not be kept in the spool either"),
        }
    }

    /// Posts the results kept in the spool (each with the same retries as a new one); a result
    /// delivered, or refused for good, leaves the spool.
    pub async fn redeliver_spooled(&self) {
        let Some(dir) = &self.settings.result_spool else {
            return;
        };
        for kept in super::spool::read_all(dir) {
            let delivered = match self
                .post_with_retries(&kept.job_id, &ResultBody::from_bytes(kept.body.clone()))
                .await
            {
                Ok(()) => {
                    info!(job_id = %kept.job_id, "a result kept in the spool was delivered");
                    true
                }
                Err(e) if e.retryable() => {
                    warn!(job_id = %kept.job_id, error = %e, "a result kept in the spool is still not delivered; kept");
                    false
                }
                Err(e) => {
                    warn!(job_id = %kept.job_id, error = %e, "the platform refuses a result kept in the spool; dropped");
                    true
                }
            };
            if delivered {
                super::spool::remove(&kept);
            }
        }
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

    /// One job-stop long poll: the ids to stop, or why not (which says how long to wait before
    /// the next).
    pub async fn stopped_jobs(&self) -> Result<Vec<String>, StopPollError> {
        let Some(url) = self.settings.stop_url() else {
            return Err(StopPollError::NoUrl);
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
            Err(e) => return Err(StopPollError::Transport(e)),
        };
        match resp.status() {
            StatusCode::NO_CONTENT => return Ok(Vec::new()),
            StatusCode::TOO_MANY_REQUESTS => return Err(StopPollError::RateLimited),
            s if !s.is_success() => return Err(StopPollError::Status(s)),
            _ => {}
        }
        let body: Value = resp.json().await.map_err(StopPollError::NotJson)?;
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

    #[test]
    fn error_texts() {
        let take = TakeError::Status {
            status: StatusCode::BAD_GATEWAY,
            body: "upstream".into(),
        };
        assert_eq!(take.to_string(), "HTTP 502 Bad Gateway: upstream");
        assert_eq!(
            ProgressError::Status(StatusCode::NOT_FOUND).to_string(),
            "HTTP 404 Not Found"
        );
        let refused = PostError::Status {
            status: StatusCode::BAD_REQUEST,
            body: "too big".into(),
        };
        assert!(!refused.retryable());
        assert_eq!(
            PostError::ShortErrorRefused {
                result: Box::new(refused),
                short_error: Box::new(PostError::Unanswered(Duration::from_millis(1500))),
            }
            .to_string(),
            "HTTP 400 Bad Request: too big; the short error was refused too: no answer within 1.5 s (RUNPOD_RESULT_TIMEOUT_S)"
        );
        for (status, retry) in [
            (StatusCode::INTERNAL_SERVER_ERROR, true),
            (StatusCode::TOO_MANY_REQUESTS, true),
            (StatusCode::UNAUTHORIZED, false),
        ] {
            let e = PostError::Status {
                status,
                body: String::new(),
            };
            assert_eq!(e.retryable(), retry, "{status}");
        }
        assert_eq!(
            ClientError::InvalidApiKey.to_string(),
            "RUNPOD_AI_API_KEY is not a valid header value"
        );
    }

    #[test]
    fn stop_poll_errors_say_when_to_poll_again() {
        assert_eq!(StopPollError::NoUrl.to_string(), "no job-stop URL");
        assert_eq!(StopPollError::NoUrl.retry_after(), Duration::MAX);
        assert_eq!(StopPollError::RateLimited.to_string(), "HTTP 429");
        assert_eq!(
            StopPollError::RateLimited.retry_after(),
            Duration::from_secs(5)
        );
        let status = StopPollError::Status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status.to_string(), "HTTP 503 Service Unavailable");
        assert_eq!(status.retry_after(), Duration::from_secs(1));
    }
}
