//! Completion and progress webhooks, with a guard against server-side request forgery.
//!
//! A job may name a URL that the worker then calls. Without a guard, that lets anyone who can
//! submit a job make the worker call what only it can reach: the cloud metadata service
//! (`169.254.169.254`), ComfyUI on loopback, services on the private network. So, unless
//! `ALLOW_PRIVATE_WEBHOOKS=true`, the shared guard of [`crate::ssrf`] applies:
//! * [`Webhooks::validate`] refuses URLs that are not plain http(s), carry credentials, name a
//!   local host (`localhost`, `*.localhost`, `*.local`, `*.internal`), or whose host is or resolves
//!   to a loopback, private, link-local, CGNAT, unspecified, multicast, broadcast or reserved
//!   address (IPv4-mapped, -compatible, NAT64 and 6to4 IPv6 forms of those included);
//! * the HTTP client connects only to addresses that pass the same check, because its resolver
//!   filters every lookup (a name that resolved to a public address when validated and to a
//!   private one when called, DNS rebinding, gets no connection); it follows no redirects and uses
//!   no proxy. IP-literal hosts are not resolved by the client; [`Webhooks::validate`] checks them.
//!
//! Deliveries never block the caller: [`Webhooks::send_final`] posts on its own task with retries,
//! and a [`ProgressHook`] keeps an ordered queue drained by one task, one POST at a time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, USER_AGENT};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::EnvReader;
use crate::job::{Completed, JobFailure};
use crate::progress::{Num, ProgressKind, ProgressSnapshot};
use crate::redact::error_chain;
use crate::ssrf::{ClientBuildError, Guard, UrlError};

/// How webhooks are checked and delivered.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    /// `ALLOW_PRIVATE_WEBHOOKS=true`: allow private, loopback and link-local targets.
    pub allow_private: bool,
    /// `WEBHOOK_ATTEMPTS` (3).
    pub attempts: u32,
    /// `WEBHOOK_RETRY_DELAY_MS` (10000).
    pub retry_delay: Duration,
    /// Per-request timeout (10 s).
    pub timeout: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        WebhookPolicy {
            allow_private: false,
            attempts: 3,
            retry_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

impl WebhookPolicy {
    /// Reads `ALLOW_PRIVATE_WEBHOOKS`, `WEBHOOK_ATTEMPTS` and `WEBHOOK_RETRY_DELAY_MS` through
    /// `lookup` (the environment, or a map in tests); a bad value names its variable.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<WebhookPolicy, crate::config::ConfigError> {
        let env = EnvReader::new(lookup);
        let d = WebhookPolicy::default();
        let allow_private = env.flag("ALLOW_PRIVATE_WEBHOOKS", d.allow_private)?;
        let attempts = env
            .parse("WEBHOOK_ATTEMPTS", "a whole number, at least 1", |v| {
                v.parse::<u32>().ok().filter(|n| *n >= 1)
            })?
            .unwrap_or(d.attempts);
        let retry_delay = env
            .parse(
                "WEBHOOK_RETRY_DELAY_MS",
                "a whole number of milliseconds",
                |v| v.parse::<u64>().ok().map(Duration::from_millis),
            )?
            .unwrap_or(d.retry_delay);
        Ok(WebhookPolicy {
            allow_private,
            attempts,
            retry_delay,
            timeout: d.timeout,
        })
    }
}

/// A webhook URL that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub(crate) String);

impl WebhookUrl {
    /// The URL (normalised: what was checked is what is called).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its host, which is what logs show: the path or query may carry a token.
    fn host(&self) -> String {
        url::Url::parse(&self.0)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Why a webhook URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// Not a usable http(s) URL, or its host does not resolve.
    #[error("invalid webhook URL {url:?}: {reason}")]
    Invalid {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A well-formed URL the SSRF guard refuses.
    #[error("webhook URL {url:?} refused: {reason}")]
    Refused {
        /// The URL as given.
        url: String,
        /// Which address or name was refused and why.
        reason: String,
    },
}

/// Why a webhook POST failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The HTTP client could not be built, so nothing is delivered.
    #[error(transparent)]
    NoClient(ClientBuildError),
    /// The connection (the SSRF guard's refusals included) or the transfer failed.
    #[error("{}", error_chain(.0))]
    Transport(reqwest::Error),
    /// The target answered with a status other than 2xx.
    #[error("HTTP {0}")]
    Status(StatusCode),
}

/// Delivers webhooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    policy: WebhookPolicy,
    guard: Guard,
    /// `Err` when the HTTP client could not be built (then every delivery fails, logged).
    http: Result<reqwest::Client, ClientBuildError>,
}

/// How to ask for a refused target anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_WEBHOOKS=true to allow it)";

/// A webhook URL for messages: as given, unless it carries credentials (`user:pw@`), a query
/// (`?token=…`) or a fragment, which are dropped (see [`crate::redact::display_url`]).
fn shown_url(url: &str) -> String {
    match url::Url::parse(url.trim()) {
        Ok(u)
            if !u.username().is_empty()
                || u.password().is_some()
                || u.query().is_some()
                || u.fragment().is_some() =>
        {
            crate::redact::display_url(url)
        }
        Ok(_) => url.to_owned(),
        // Unparsable: without anything up to an `@` or after a `?` or `#`, cut short.
        Err(_) => {
            let (prefix, rest) = match url.rsplit_once('@') {
                Some((_, rest)) => ("…@", rest),
                None => ("", url),
            };
            let rest = rest.split(['?', '#']).next().unwrap_or("");
            format!("{prefix}{}", rest.chars().take(200).collect::<String>())
        }
    }
}

impl Webhooks {
    /// Webhooks delivered under `policy`.
    pub fn new(policy: WebhookPolicy) -> Webhooks {
        let mut headers = HeaderMap::new();
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("comfy-worker/", env!("CARGO_PKG_VERSION"))),
        );
        let guard = Guard::new(policy.allow_private, policy.timeout);
        let builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout);
        let builder = guard.client(builder, "webhook host");
        let http = builder.build().map_err(|e| {
            let e = ClientBuildError::new("webhook", e);
            error!(error = %e, "webhooks disabled");
            e
        });
        Webhooks {
            policy,
            guard,
            http,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &WebhookPolicy {
        &self.policy
    }

    /// Checks `url`: http or https, a host, no credentials and, unless private targets are
    /// allowed, a host that neither is nor resolves to a refused address (see the module docs).
    /// The lookup is bounded by the per-request timeout.
    pub async fn validate(&self, url: &str) -> Result<WebhookUrl, WebhookError> {
        let invalid = |reason: String| WebhookError::Invalid {
            url: shown_url(url),
            reason,
        };
        let refused = |reason: String| WebhookError::Refused {
            url: shown_url(url),
            reason: format!("{reason} {ALLOW_HINT}"),
        };
        match self.guard.check(url).await {
            Ok(parsed) => Ok(WebhookUrl(parsed.as_str().to_owned())),
            Err(UrlError::Invalid(reason)) => Err(invalid(reason)),
            Err(UrlError::Refused(reason)) => Err(refused(reason)),
        }
    }

    /// POSTs `body` as JSON to `url` on a task of its own, retrying connection errors and
    /// non-2xx answers up to `attempts` times, `retry_delay` apart. Returns at once; the outcome
    /// is logged (without the body).
    pub fn send_final(&self, url: WebhookUrl, body: Value) {
        tokio::spawn(self.final_delivery(url, body).in_current_span());
    }

    /// What [`Webhooks::send_final`] runs, for a caller that tracks the delivery itself (the
    /// local endpoint waits for it, bounded, before exiting).
    pub fn final_delivery(
        &self,
        url: WebhookUrl,
        body: Value,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let hooks = self.clone();
        async move {
            let host = url.host();
            match hooks.post_retrying(&url, &body).await {
                Ok(attempt) => info!(host = %host, attempt, "webhook delivered"),
                Err(e) => error!(
                    host = %host,
                    attempts = hooks.policy.attempts,
                    error = %e,
                    "webhook not delivered"
                ),
            }
        }
    }

    /// A progress webhook for the job `task_id`: events are queued and delivered in order, one
    /// POST at a time, on a task of its own (see [`ProgressHook`]).
    pub fn progress(&self, url: WebhookUrl, task_id: &str) -> ProgressHook {
        let queue = Arc::new(Queue::default());
        debug!(host = %url.host(), task_id, "progress webhook started");
        let task =
            tokio::spawn(deliver_progress(self.clone(), url, queue.clone()).in_current_span());
        ProgressHook {
            queue,
            task: Some(task),
            task_id: task_id.to_owned(),
            last: Mutex::new(LastProgress::default()),
            bound: self.policy.timeout,
            previews: false,
        }
    }

    /// One POST; `Err` says why it failed.
    async fn post(&self, url: &WebhookUrl, body: &Value) -> Result<(), DeliveryError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| DeliveryError::NoClient(e.clone()))?;
        let resp = http
            .post(url.as_str())
            .json(body)
            .send()
            .await
            .map_err(DeliveryError::Transport)?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(status))
        }
    }

    /// POSTs with the policy's retries; `Ok` carries the attempt that succeeded.
    async fn post_retrying(&self, url: &WebhookUrl, body: &Value) -> Result<u32, DeliveryError> {
        let attempts = self.policy.attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.post(url, body).await {
                Ok(()) => return Ok(attempt),
                Err(e) if attempt >= attempts => return Err(e),
                Err(e) => {
                    warn!(
                        host = %url.host(),
                        attempt,
                        error = %e,
                        retry_in_ms = self.policy.retry_delay.as_millis() as u64,
                        "webhook failed; retrying"
                    );
                    tokio::time::sleep(self.policy.retry_delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Unsent progress events kept while the target is slower than the job; beyond this the oldest
/// progress events are dropped (never the final one).
const MAX_PENDING: usize = 256;

/// One job's progress webhook: events are delivered in order, on their own task.
///
/// [`snapshot`](Self::snapshot), [`completed`](Self::completed) and [`failed`](Self::failed) only
/// queue an event and never block. Each progress event is posted once (the next one supersedes
/// it); the final event (`completed` or `error`, only the first counts) is retried like
/// [`Webhooks::send_final`]. Dropping the hook closes its queue; what is queued is still delivered.
#[derive(Debug)]
pub struct ProgressHook {
    queue: Arc<Queue>,
    task: Option<JoinHandle<()>>,
    task_id: String,
    /// The last snapshot's figures, for the final event.
    last: Mutex<LastProgress>,
    /// How long [`finish`](Self::finish) waits.
    bound: Duration,
    /// The job asked for previews (`input.previews`): [`preview`](Self::preview) sends them.
    previews: bool,
}

impl ProgressHook {
    /// Queues an `in-progress` event for `snapshot`.
    pub fn snapshot(&self, snapshot: &ProgressSnapshot) {
        let progress = LastProgress::of(snapshot);
        let event = progress_event(&self.task_id, "in-progress", &progress, now());
        *lock(&self.last) = progress;
        self.queue.push(event, false);
    }

    /// With `on` (the job's `input.previews`), live previews become events too.
    pub fn with_previews(mut self, on: bool) -> ProgressHook {
        self.previews = on;
        self
    }

    /// For a job that asked for previews: queues an `in-progress` event with the latest progress
    /// and `"preview": {"node", "mime", "data"}`. Like every progress event, the next one
    /// supersedes it while it waits.
    pub fn preview(&self, preview: Value) {
        if !self.previews {
            return;
        }
        let progress = lock(&self.last).clone();
        let mut event = progress_event(&self.task_id, "in-progress", &progress, now());
        event["preview"] = preview;
        self.queue.push(event, false);
    }

    /// Queues the final event for a job's result: `completed` with the output, or `error`.
    pub fn end(&self, result: &Result<Completed, JobFailure>) {
        match result {
            Ok(completed) => self.completed(serde_json::to_value(completed).unwrap_or(Value::Null)),
            Err(failure) => self.failed(&failure.message(), failure.details()),
        }
    }

    /// Queues the final `completed` event: percentage 100 and `result` = `output`.
    pub fn completed(&self, output: Value) {
        let progress = LastProgress {
            percentage: 100.0,
            step: "Completed".into(),
            value: 1.0,
            max: 1.0,
        };
        let mut event = progress_event(&self.task_id, "completed", &progress, now());
        event["result"] = output;
        self.queue.push(event, true);
    }

    /// Queues the final `error` event, with the progress where the job stopped.
    pub fn failed(&self, message: &str, details: Option<&[String]>) {
        let progress = lock(&self.last).clone();
        let mut event = progress_event(&self.task_id, "error", &progress, now());
        event["error"] = json!({"message": message, "details": details});
        self.queue.push(event, true);
    }

    /// Closes the queue and waits until what is queued was delivered, or for at most the
    /// per-request timeout; delivery then goes on in the background. Whether to await this is the
    /// caller's choice: the serverless worker spawns it so the job's result is never delayed.
    pub async fn finish(mut self) {
        self.queue.close();
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(self.bound, task).await.is_err() {
                debug!(task_id = %self.task_id, "progress webhook still delivering in the background");
            }
        }
    }
}

impl Drop for ProgressHook {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// What the last progress event said, repeated by an `error` event.
#[derive(Debug, Clone, PartialEq)]
struct LastProgress {
    percentage: f64,
    step: String,
    value: f64,
    max: f64,
}

impl Default for LastProgress {
    /// Before the first snapshot: the job has not started.
    fn default() -> Self {
        LastProgress {
            percentage: 0.0,
            step: kind_label(ProgressKind::Queued).to_owned(),
            value: 0.0,
            max: 1.0,
        }
    }
}

impl LastProgress {
    fn of(s: &ProgressSnapshot) -> LastProgress {
        let step = s
            .step
            .clone()
            .or_else(|| s.node_type.clone())
            .unwrap_or_else(|| kind_label(s.kind).to_owned());
        LastProgress {
            percentage: s.overall_percent,
            step,
            value: s.value.0,
            max: s.max.0,
        }
    }
}

/// `currentStep` for a snapshot that names no node (queued, started, finished).
fn kind_label(kind: ProgressKind) -> &'static str {
    match kind {
        ProgressKind::Waiting => "Waiting for ComfyUI",
        ProgressKind::Downloading => "Downloading model",
        ProgressKind::Queued => "Queued",
        ProgressKind::Started => "Started",
        ProgressKind::Cached => "Cached",
        ProgressKind::Executing => "Executing",
        ProgressKind::Loading => "Loading models",
        ProgressKind::Progress => "Progress",
        ProgressKind::Executed => "Executed",
        ProgressKind::Error => "Error",
        ProgressKind::Interrupted => "Interrupted",
        ProgressKind::Finished => "Finished",
    }
}

/// Now, as ISO-8601 UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The event body the web front ends consume.
fn progress_event(task_id: &str, status: &str, p: &LastProgress, timestamp: String) -> Value {
    json!({
        "taskId": task_id,
        "status": status,
        "progress": {
            "percentage": Num(p.percentage),
            "currentStep": p.step,
            "currentValue": Num(p.value),
            "maxValue": Num(p.max),
        },
        "timestamp": timestamp,
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A queued event; `last` marks the final one.
#[derive(Debug)]
struct Pending {
    body: Value,
    last: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    events: VecDeque<Pending>,
    /// No more events will come (after `finish`, or the hook was dropped).
    closed: bool,
    /// The final event was queued; later final events are ignored.
    ended: bool,
    /// Progress events dropped because the target fell behind.
    dropped: u64,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

impl Queue {
    fn push(&self, body: Value, last: bool) {
        {
            let mut st = lock(&self.state);
            if st.closed || st.ended {
                return;
            }
            if st.events.len() >= MAX_PENDING {
                if let Some(oldest) = st.events.iter().position(|e| !e.last) {
                    st.events.remove(oldest);
                    st.dropped += 1;
                }
            }
            st.ended = last;
            st.events.push_back(Pending { body, last });
        }
        self.wake.notify_one();
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_one();
    }

    /// The next event; `None` once the queue is closed and empty.
    async fn next(&self) -> Option<Pending> {
        loop {
            {
                let mut st = lock(&self.state);
                if let Some(event) = st.events.pop_front() {
                    return Some(event);
                }
                if st.closed {
                    return None;
                }
            }
            // `notify_one` keeps a permit when nobody waits, so a push between the check above
            // and this wait is not missed.
            self.wake.notified().await;
        }
    }
}

/// The delivery task of one progress hook.
async fn deliver_progress(hooks: Webhooks, url: WebhookUrl, queue: Arc<Queue>) {
    let host = url.host();
    let (mut delivered, mut failed) = (0u64, 0u64);
    while let Some(event) = queue.next().await {
        let sent = if event.last {
            hooks.post_retrying(&url, &event.body).await.map(|_| ())
        } else {
            hooks.post(&url, &event.body).await
        };
        match sent {
            Ok(()) => delivered += 1,
            Err(e) => {
                failed += 1;
                if event.last {
                    error!(host = %host, error = %e, "final progress webhook not delivered");
                } else {
                    debug!(host = %host, error = %e, "progress webhook failed");
                }
            }
        }
    }
    let dropped = lock(&queue.state).dropped;
    info!(
        host = %host,
        delivered,
        failed,
        dropped,
        "progress webhook finished"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn hooks(allow_private: bool) -> Webhooks {
        Webhooks::new(WebhookPolicy {
            allow_private,
            ..WebhookPolicy::default()
        })
    }

    #[tokio::test]
    async fn refusals_never_show_credentials_or_the_query() {
        let webhooks = Webhooks::new(WebhookPolicy::default());
        for url in [
            "http://user:hook-pw-secret@example.com/h",
            "https://127.0.0.1/h?token=hook-pw-secret",
            "ftp://user:hook-pw-secret@example.com/",
            "http://127.0.0.1/h#hook-pw-secret",
            "not a url hook-pw-secret@x",
        ] {
            let e = webhooks.validate(url).await.unwrap_err().to_string();
            assert!(!e.contains("hook-pw-secret"), "{e}");
        }
    }

    async fn refused(url: &str) -> String {
        hooks(false).validate(url).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn validation_messages() {
        assert_eq!(
            refused("http://127.0.0.1:9/x").await,
            r#"webhook URL "http://127.0.0.1:9/x" refused: 127.0.0.1 is a loopback address (set ALLOW_PRIVATE_WEBHOOKS=true to allow it)"#
        );
        assert_eq!(
            refused("http://169.254.169.254/latest").await,
            r#"webhook URL "http://169.254.169.254/latest" refused: 169.254.169.254 is a link-local address (the cloud metadata service) (set ALLOW_PRIVATE_WEBHOOKS=true to allow it)"#
        );
        assert_eq!(
            refused("http://[::ffff:7f00:1]/").await,
            r#"webhook URL "http://[::ffff:7f00:1]/" refused: ::ffff:127.0.0.1 is an IPv4-mapped form of 127.0.0.1, a loopback address (set ALLOW_PRIVATE_WEBHOOKS=true to allow it)"#
        );
        assert_eq!(
            refused("https://localhost:8443/hook").await,
            r#"webhook URL "https://localhost:8443/hook" refused: localhost is a local host name (set ALLOW_PRIVATE_WEBHOOKS=true to allow it)"#
        );
        // The URL parser's numeric forms of an address are what gets called, so they are checked.
        assert!(refused("http://2130706433/")
            .await
            .contains("127.0.0.1 is a loopback address"));
        assert!(refused("http://0x7f.1/")
            .await
            .contains("127.0.0.1 is a loopback address"));
        assert!(refused("http://10.1/")
            .await
            .contains("10.0.0.1 is a private address"));
        assert_eq!(
            refused("ftp://example.com/x").await,
            r#"invalid webhook URL "ftp://example.com/x": the scheme must be http or https, not "ftp""#
        );
        assert_eq!(
            refused("https://user:pw@example.com/").await,
            r#"invalid webhook URL "https://example.com/": credentials in the URL are not allowed"#
        );
        assert_eq!(
            refused("not a url").await,
            r#"invalid webhook URL "not a url": not a URL (relative URL without a base)"#
        );
        assert!(matches!(
            hooks(false).validate("file:///etc/passwd").await,
            Err(WebhookError::Invalid { .. })
        ));
        assert!(matches!(
            hooks(false).validate("http://127.0.0.1/").await,
            Err(WebhookError::Refused { .. })
        ));
    }

    #[tokio::test]
    async fn allowed_urls() {
        let open = hooks(true);
        for url in [
            "http://127.0.0.1:9/x",
            "http://localhost/",
            "http://169.254.169.254/latest",
            "http://[::1]:8080/",
        ] {
            assert!(open.validate(url).await.is_ok(), "{url}");
        }
        assert!(open.validate("ftp://127.0.0.1/").await.is_err());
        let guarded = hooks(false);
        assert_eq!(
            guarded.validate("https://1.1.1.1/hook?t=1").await,
            Ok(WebhookUrl("https://1.1.1.1/hook?t=1".into()))
        );
        assert!(guarded.validate("http://[2606:4700::1111]/").await.is_ok());
    }

    #[tokio::test]
    async fn the_client_never_connects_to_a_refused_address() {
        // What a name that passed `validate` and then re-resolved to loopback would reach.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = WebhookUrl(format!("http://localhost:{port}/hook"));
        let err = hooks(false).post(&url, &json!({})).await.unwrap_err();
        let DeliveryError::Transport(e) = &err else {
            panic!("{err:?}");
        };
        let refused = crate::ssrf::refused_host(e).expect("refused by the guard");
        assert_eq!(refused.why, "localhost is a local host name");
        assert!(
            err.to_string()
                .contains("webhook host refused: localhost is a local host name"),
            "{err}"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "a connection reached the listener");
        // The same target with private targets allowed does connect.
        let open = hooks(true);
        let post = tokio::spawn(async move { open.post(&url, &json!({})).await });
        let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        assert!(accepted.is_ok());
        post.abort();
    }

    fn snapshot(
        kind: ProgressKind,
        step: Option<&str>,
        value: f64,
        max: f64,
        overall: f64,
    ) -> ProgressSnapshot {
        ProgressSnapshot {
            kind,
            value: Num(value),
            max: Num(max),
            percent: 0.0,
            node: step.map(|_| "2".to_owned()),
            node_type: step.map(|_| "KSampler".to_owned()),
            step: step.map(str::to_owned),
            title: None,
            overall_percent: overall,
            nodes_done: 0,
            nodes_total: 3,
            nodes_cached: 0,
            eta_seconds: None,
            elapsed_seconds: 0.0,
            prompt_id: None,
            queue_remaining: None,
            queue_position: None,
            message: None,
        }
    }

    #[test]
    fn the_event_format() {
        let s = snapshot(ProgressKind::Progress, Some("Sampling"), 3.0, 20.0, 42.5);
        let event = progress_event(
            "job-1",
            "in-progress",
            &LastProgress::of(&s),
            "2025-01-31T12:00:00.123Z".into(),
        );
        assert_eq!(
            event,
            json!({
                "taskId": "job-1",
                "status": "in-progress",
                "progress": {"percentage": 42.5, "currentStep": "Sampling", "currentValue": 3, "maxValue": 20},
                "timestamp": "2025-01-31T12:00:00.123Z"
            })
        );
        let keys: Vec<&String> = event.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["taskId", "status", "progress", "timestamp"]);
        // A node without a human step name shows its class; no node, what the snapshot is.
        let mut s = snapshot(ProgressKind::Executing, None, 0.0, 1.0, 0.0);
        assert_eq!(LastProgress::of(&s).step, "Executing");
        s.node_type = Some("MyNode".into());
        assert_eq!(LastProgress::of(&s).step, "MyNode");
        let queued = snapshot(ProgressKind::Queued, None, 0.0, 1.0, 0.0);
        assert_eq!(LastProgress::of(&queued).step, "Queued");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = now();
        assert_eq!(t.len(), "2025-01-31T12:00:00.123Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
        assert!(humantime::parse_rfc3339(&t).is_ok());
    }

    /// A hook without a delivery task, so its queue can be inspected.
    fn idle_hook(task_id: &str) -> ProgressHook {
        ProgressHook {
            queue: Arc::new(Queue::default()),
            task: None,
            task_id: task_id.to_owned(),
            last: Mutex::new(LastProgress::default()),
            bound: Duration::from_secs(1),
            previews: false,
        }
    }

    fn queued(hook: &ProgressHook) -> Vec<Value> {
        lock(&hook.queue.state)
            .events
            .iter()
            .map(|e| e.body.clone())
            .collect()
    }

    #[test]
    fn final_events_carry_result_or_error() {
        let hook = idle_hook("job-2");
        hook.snapshot(&snapshot(
            ProgressKind::Progress,
            Some("Sampling"),
            5.0,
            10.0,
            60.0,
        ));
        hook.failed("Job timed out", Some(&["node 2".to_owned()]));
        hook.completed(json!({"images": []}));
        hook.snapshot(&snapshot(ProgressKind::Finished, None, 0.0, 1.0, 100.0));
        let events = queued(&hook);
        assert_eq!(
            events.len(),
            2,
            "nothing after the final event: {events:#?}"
        );
        assert_eq!(events[0]["status"], "in-progress");
        let error = &events[1];
        assert_eq!(error["status"], "error");
        assert_eq!(error["taskId"], "job-2");
        assert_eq!(
            error["error"],
            json!({"message": "Job timed out", "details": ["node 2"]})
        );
        assert_eq!(
            error["progress"],
            json!({"percentage": 60, "currentStep": "Sampling", "currentValue": 5, "maxValue": 10})
        );
        assert!(error.get("result").is_none());

        let hook = idle_hook("job-3");
        hook.failed("Boom", None);
        let failed = &queued(&hook)[0];
        assert_eq!(failed["error"], json!({"message": "Boom", "details": null}));
        assert_eq!(
            failed["progress"],
            json!({"percentage": 0, "currentStep": "Queued", "currentValue": 0, "maxValue": 1}),
            "failed before any progress"
        );

        let hook = idle_hook("job-4");
        hook.completed(json!({"images": [{"filename": "a.png"}]}));
        let done = &queued(&hook)[0];
        assert_eq!(done["status"], "completed");
        assert_eq!(
            done["progress"],
            json!({"percentage": 100, "currentStep": "Completed", "currentValue": 1, "maxValue": 1})
        );
        assert_eq!(done["result"], json!({"images": [{"filename": "a.png"}]}));
        let keys: Vec<&String> = done.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["taskId", "status", "progress", "timestamp", "result"]
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_progress_never_the_final_event() {
        let queue = Queue::default();
        for n in 0..MAX_PENDING + 10 {
            queue.push(json!(n), false);
        }
        queue.push(json!("final"), true);
        queue.push(json!("after"), false);
        let st = lock(&queue.state);
        assert_eq!(st.events.len(), MAX_PENDING);
        assert_eq!(st.dropped, 11);
        assert_eq!(st.events.front().unwrap().body, json!(11));
        assert_eq!(st.events.back().unwrap().body, json!("final"));
    }

    #[test]
    fn policy_from_the_environment() {
        let from = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            WebhookPolicy::from_lookup(|k| map.get(k).cloned())
        };
        let d = from(&[]).unwrap();
        assert!(!d.allow_private);
        assert_eq!(d.attempts, 3);
        assert_eq!(d.retry_delay, Duration::from_secs(10));
        assert_eq!(d.timeout, Duration::from_secs(10));
        let p = from(&[
            ("ALLOW_PRIVATE_WEBHOOKS", "TRUE"),
            ("WEBHOOK_ATTEMPTS", "5"),
            ("WEBHOOK_RETRY_DELAY_MS", "20"),
        ])
        .unwrap();
        assert!(p.allow_private);
        assert_eq!(p.attempts, 5);
        assert_eq!(p.retry_delay, Duration::from_millis(20));
        for (name, bad) in [
            ("ALLOW_PRIVATE_WEBHOOKS", "maybe"),
            ("WEBHOOK_ATTEMPTS", "0"),
            ("WEBHOOK_ATTEMPTS", "x"),
            ("WEBHOOK_RETRY_DELAY_MS", "1.5s"),
        ] {
            let err = from(&[(name, bad)]).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}
