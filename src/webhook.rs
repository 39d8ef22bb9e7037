//! Completion and progress webhooks, with a guard against server-side request forgery.
//!
//! A job may name a URL that the worker then calls. Without a guard, that lets anyone who can
//! submit a job make the worker call what only it can reach: the cloud metadata service
//! (`169.254.169.254`), ComfyUI on loopback, services on the private network. So, unless
//! `ALLOW_PRIVATE_WEBHOOKS=true`:
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, USER_AGENT};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::comfy::api::error_chain;
use crate::config::ConfigError;
use crate::progress::{Num, ProgressKind, ProgressSnapshot};

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
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let d = WebhookPolicy::default();
        let allow_private = match get("ALLOW_PRIVATE_WEBHOOKS") {
            None => d.allow_private,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(ConfigError {
                        name: "ALLOW_PRIVATE_WEBHOOKS",
                        value: v,
                        expected: "true or false",
                    })
                }
            },
        };
        let attempts = match get("WEBHOOK_ATTEMPTS") {
            None => d.attempts,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(ConfigError {
                        name: "WEBHOOK_ATTEMPTS",
                        value: v,
                        expected: "a whole number, at least 1",
                    })
                }
            },
        };
        let retry_delay = match get("WEBHOOK_RETRY_DELAY_MS") {
            None => d.retry_delay,
            Some(v) => v
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| ConfigError {
                    name: "WEBHOOK_RETRY_DELAY_MS",
                    value: v,
                    expected: "a whole number of milliseconds",
                })?,
        };
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

/// Delivers webhooks; cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhooks {
    policy: WebhookPolicy,
    /// `Err` when the HTTP client could not be built (then every delivery fails, logged).
    http: Result<reqwest::Client, String>,
}

/// How to ask for a refused target anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_WEBHOOKS=true to allow it)";

impl Webhooks {
    /// Webhooks delivered under `policy`.
    pub fn new(policy: WebhookPolicy) -> Webhooks {
        let mut headers = HeaderMap::new();
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("comfy-worker/", env!("CARGO_PKG_VERSION"))),
        );
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would make the connection on our behalf, out of the guard's sight.
            .no_proxy();
        if !policy.allow_private {
            builder = builder.dns_resolver(GuardedResolver {
                timeout: policy.timeout,
            });
        }
        let http = builder.build().map_err(|e| {
            let e = format!("cannot build the webhook HTTP client: {}", error_chain(&e));
            error!(error = %e, "webhooks disabled");
            e
        });
        Webhooks { policy, http }
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
            url: url.to_owned(),
            reason,
        };
        let refused = |reason: String| WebhookError::Refused {
            url: url.to_owned(),
            reason: format!("{reason} {ALLOW_HINT}"),
        };
        let parsed =
            url::Url::parse(url.trim()).map_err(|e| invalid(format!("not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "the scheme must be http or https, not {:?}",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid("credentials in the URL are not allowed".into()));
        }
        let host = match parsed.host() {
            None => return Err(invalid("the URL has no host".into())),
            Some(h) => h,
        };
        let checked = WebhookUrl(parsed.as_str().to_owned());
        if self.policy.allow_private {
            return Ok(checked);
        }
        let name = match host {
            url::Host::Ipv4(ip) => {
                return match refusal(IpAddr::V4(ip)) {
                    Some(why) => Err(refused(format!("{ip} is {why}"))),
                    None => Ok(checked),
                }
            }
            url::Host::Ipv6(ip) => {
                return match refusal(IpAddr::V6(ip)) {
                    Some(why) => Err(refused(format!("{ip} is {why}"))),
                    None => Ok(checked),
                }
            }
            url::Host::Domain(name) => name.to_owned(),
        };
        if let Some(why) = local_name(&name) {
            return Err(refused(format!("{name} is {why}")));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs = lookup(&name, port, self.policy.timeout)
            .await
            .map_err(|e| invalid(format!("cannot resolve {name}: {e}")))?;
        if addrs.is_empty() {
            return Err(invalid(format!("{name} resolves to no address")));
        }
        for addr in &addrs {
            if let Some(why) = refusal(addr.ip()) {
                return Err(refused(format!("{name} resolves to {}, {why}", addr.ip())));
            }
        }
        Ok(checked)
    }

    /// POSTs `body` as JSON to `url` on a task of its own, retrying connection errors and
    /// non-2xx answers up to `attempts` times, `retry_delay` apart. Returns at once; the outcome
    /// is logged (without the body).
    pub fn send_final(&self, url: WebhookUrl, body: Value) {
        let hooks = self.clone();
        let deliver = async move {
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
        };
        tokio::spawn(deliver.in_current_span());
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
        }
    }

    /// One POST; `Err` says why it failed.
    async fn post(&self, url: &WebhookUrl, body: &Value) -> Result<(), String> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let resp = http
            .post(url.as_str())
            .json(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }

    /// POSTs with the policy's retries; `Ok` carries the attempt that succeeded.
    async fn post_retrying(&self, url: &WebhookUrl, body: &Value) -> Result<u32, String> {
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
}

impl ProgressHook {
    /// Queues an `in-progress` event for `snapshot`.
    pub fn snapshot(&self, snapshot: &ProgressSnapshot) {
        let progress = LastProgress::of(snapshot);
        let event = progress_event(&self.task_id, "in-progress", &progress, now());
        *lock(&self.last) = progress;
        self.queue.push(event, false);
    }

    /// Queues the final `completed` event: percentage 100 and `result` = `output`.
    pub fn completed(&self, output: &Value) {
        let progress = LastProgress {
            percentage: 100.0,
            step: "Completed".into(),
            value: 1.0,
            max: 1.0,
        };
        let mut event = progress_event(&self.task_id, "completed", &progress, now());
        event["result"] = output.clone();
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
        ProgressKind::Queued => "Queued",
        ProgressKind::Started => "Started",
        ProgressKind::Cached => "Cached",
        ProgressKind::Executing => "Executing",
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

/// Resolves `name`, bounded by `timeout`.
async fn lookup(name: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => Ok(addrs.collect()),
    }
}

/// The HTTP client's resolver: only addresses that pass [`refusal`] are ever connected to.
struct GuardedResolver {
    timeout: Duration,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let timeout = self.timeout;
        Box::pin(async move {
            let name = name.as_str().to_owned();
            if let Some(why) = local_name(&name) {
                return Err(format!("webhook host refused: {name} is {why}").into());
            }
            let addrs = lookup(&name, 0, timeout).await?;
            let (allowed, refused) = split_allowed(addrs);
            if allowed.is_empty() {
                let why = match refused.first() {
                    Some((ip, why)) => format!("{name} resolves to {ip}, {why}"),
                    None => format!("{name} resolves to no address"),
                };
                return Err(format!("webhook host refused: {why}").into());
            }
            if !refused.is_empty() {
                debug!(host = %name, refused = refused.len(), "webhook host: refused addresses skipped");
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Splits resolved addresses into those that may be connected to and those refused (with why).
fn split_allowed(addrs: Vec<SocketAddr>) -> (Vec<SocketAddr>, Vec<(IpAddr, String)>) {
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for addr in addrs {
        match refusal(addr.ip()) {
            None => allowed.push(addr),
            Some(why) => refused.push((addr.ip(), why)),
        }
    }
    (allowed, refused)
}

/// Why `name` may not be a webhook host without resolving it, if it is a local name.
fn local_name(name: &str) -> Option<&'static str> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    if n == "localhost"
        || n.ends_with(".localhost")
        || n == "localhost.localdomain"
        || n == "ip6-localhost"
        || n == "ip6-loopback"
    {
        Some("a local host name")
    } else if n.ends_with(".local") || n == "local" {
        Some("a link-local (mDNS) name")
    } else if n.ends_with(".internal") || n == "internal" {
        Some("a private-use name (.internal)")
    } else {
        None
    }
}

/// Why `ip` may not receive webhooks (`"a loopback address"`, or for an IPv6 form of an IPv4
/// address `"an IPv4-mapped form of 127.0.0.1, a loopback address"`), or `None` when it may.
fn refusal(ip: IpAddr) -> Option<String> {
    if let IpAddr::V6(v6) = ip {
        if let Some((form, v4)) = embedded_v4(v6) {
            return v4_class(v4).map(|why| format!("{form} form of {v4}, {why}"));
        }
    }
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
    .map(str::to_owned)
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, d] = ip.octets();
    Some(match (a, b) {
        _ if ip.is_unspecified() => "an unspecified address",
        (0, _) => "a \"this network\" address (0.0.0.0/8)",
        (127, _) => "a loopback address",
        (10, _) => "a private address",
        (172, 16..=31) => "a private address",
        (192, 168) => "a private address",
        (100, 64..=127) => "a shared (CGNAT) address",
        (169, 254) if (c, d) == (169, 254) => "a link-local address (the cloud metadata service)",
        (169, 254) => "a link-local address",
        _ if ip.is_broadcast() => "the broadcast address",
        (224..=239, _) => "a multicast address",
        (240..=255, _) => "a reserved address",
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match first {
        _ if ip.is_unspecified() => "an unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        0xfc00..=0xfdff => "a private (unique local) address",
        0xfe80..=0xfebf => "a link-local address",
        0xfec0..=0xfeff => "a private (site-local) address",
        0xff00..=0xffff => "a multicast address",
        _ => return None,
    })
}

/// An IPv4 address carried inside an IPv6 one, with the name of the form: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) or 6to4
/// (`2002:aabb:ccdd::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<(&'static str, Ipv4Addr)> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(("an IPv4-mapped", low)),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(("an IPv4-compatible", low)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(("a NAT64", low)),
        [0x2002, hi, lo, ..] => Some((
            "a 6to4",
            Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refused_addresses_and_why() {
        for (addr, why) in [
            ("127.0.0.1", "a loopback address"),
            ("127.255.255.254", "a loopback address"),
            ("10.0.0.1", "a private address"),
            ("10.255.255.255", "a private address"),
            ("172.16.0.1", "a private address"),
            ("172.31.255.255", "a private address"),
            ("192.168.1.1", "a private address"),
            ("169.254.0.1", "a link-local address"),
            (
                "169.254.169.254",
                "a link-local address (the cloud metadata service)",
            ),
            ("0.0.0.0", "an unspecified address"),
            ("0.1.2.3", "a \"this network\" address (0.0.0.0/8)"),
            ("100.64.0.1", "a shared (CGNAT) address"),
            ("100.127.255.255", "a shared (CGNAT) address"),
            ("224.0.0.1", "a multicast address"),
            ("239.255.255.250", "a multicast address"),
            ("255.255.255.255", "the broadcast address"),
            ("240.0.0.1", "a reserved address"),
            ("::1", "a loopback address"),
            ("::", "an unspecified address"),
            ("fc00::1", "a private (unique local) address"),
            ("fd00:ec2::254", "a private (unique local) address"),
            ("fe80::1", "a link-local address"),
            ("febf::1", "a link-local address"),
            ("fec0::1", "a private (site-local) address"),
            ("ff02::1", "a multicast address"),
            (
                "::ffff:127.0.0.1",
                "an IPv4-mapped form of 127.0.0.1, a loopback address",
            ),
            (
                "::ffff:169.254.169.254",
                "an IPv4-mapped form of 169.254.169.254, a link-local address (the cloud metadata service)",
            ),
            (
                "::ffff:10.1.2.3",
                "an IPv4-mapped form of 10.1.2.3, a private address",
            ),
            (
                "::127.0.0.1",
                "an IPv4-compatible form of 127.0.0.1, a loopback address",
            ),
            (
                "::192.168.0.1",
                "an IPv4-compatible form of 192.168.0.1, a private address",
            ),
            (
                "64:ff9b::a9fe:a9fe",
                "a NAT64 form of 169.254.169.254, a link-local address (the cloud metadata service)",
            ),
            (
                "2002:7f00:1::",
                "a 6to4 form of 127.0.0.1, a loopback address",
            ),
        ] {
            assert_eq!(refusal(ip(addr)).as_deref(), Some(why), "{addr}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "169.255.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.255.255",
            "192.169.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:1.1.1.1",
            "::8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "fbff::1",
            "fe00::1",
        ] {
            assert_eq!(refusal(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let addrs: Vec<SocketAddr> = ["1.1.1.1:80", "127.0.0.1:80", "[::ffff:10.0.0.1]:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let (allowed, refused) = split_allowed(addrs);
        assert_eq!(allowed, ["1.1.1.1:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(
            refused,
            [
                (ip("127.0.0.1"), "a loopback address".to_owned()),
                (
                    ip("::ffff:10.0.0.1"),
                    "an IPv4-mapped form of 10.0.0.1, a private address".to_owned()
                )
            ]
        );
    }

    #[test]
    fn local_names() {
        for name in [
            "localhost",
            "LOCALHOST.",
            "app.localhost",
            "localhost.localdomain",
            "ip6-localhost",
            "printer.local",
            "metadata.google.internal",
        ] {
            assert!(local_name(name).is_some(), "{name}");
        }
        for name in [
            "example.com",
            "localhost.example.com",
            "internal.example.com",
        ] {
            assert_eq!(local_name(name), None, "{name}");
        }
    }

    fn hooks(allow_private: bool) -> Webhooks {
        Webhooks::new(WebhookPolicy {
            allow_private,
            ..WebhookPolicy::default()
        })
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
            r#"invalid webhook URL "https://user:pw@example.com/": credentials in the URL are not allowed"#
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
        assert!(err.contains("localhost is a local host name"), "{err}");
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
        hook.completed(&json!({"images": []}));
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
        hook.completed(&json!({"images": [{"filename": "a.png"}]}));
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
