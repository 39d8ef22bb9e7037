//! Outbound HTTP to URLs a job names: the guard against server-side request forgery shared by
//! webhooks and URL inputs, and a bounded, guarded download.
//!
//! A job may name a URL that the worker then calls. Without a guard, that lets anyone who can
//! submit a job make the worker call what only it can reach: the cloud metadata service
//! (`169.254.169.254`), ComfyUI on loopback, services on the private network. So, unless private
//! targets are allowed:
//! * [`Guard::check`] refuses URLs that are not plain http(s), carry credentials, name a local
//!   host (`localhost`, `*.localhost`, `*.local`, `*.internal`), or whose host is or resolves to a
//!   loopback, private, link-local, CGNAT, unspecified, multicast, broadcast or reserved address
//!   (IPv4-mapped, -compatible, NAT64 and 6to4 IPv6 forms of those included);
//! * an HTTP client set up by [`Guard::client`] connects only to addresses that pass the same
//!   check, because its resolver ([`GuardedResolver`]) filters every lookup (a name that resolved
//!   to a public address when checked and to a private one when called, DNS rebinding, gets no
//!   connection); it follows no redirects and uses no proxy. IP-literal hosts are not resolved by
//!   the client, so every URL it is given must have passed [`Guard::check`];
//! * [`Downloader`] follows redirects itself, checking each target with [`Guard::check`], and
//!   bounds the size and the time of a download.
//!
//! Hosts listed in the guard's allow-list (`INPUT_URL_ALLOW_HOSTS` for inputs) skip the address
//! checks, for a known internal server without opening the whole private network.

#[cfg(test)]
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use tracing::debug;

use crate::redact::error_chain;
use crate::redact::{display_parsed, display_url};

/// Why a URL cannot be called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// Not a usable http(s) URL, or its host does not resolve.
    Invalid(String),
    /// A well-formed URL the guard refuses: which address or name and why (no hint on how to
    /// allow it: the caller knows its variable).
    Refused(String),
}

/// Why a name lookup gave no addresses.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No answer within the lookup timeout.
    #[error("no answer within {} s", .0.as_secs_f64())]
    TimedOut(Duration),
    /// The resolver failed (no such name, no DNS server).
    #[error("{0}")]
    Failed(std::io::Error),
}

/// An HTTP client that could not be built; every request meant for it fails with this.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot build the {purpose} HTTP client: {}", error_chain(.source.as_ref()))]
pub struct ClientBuildError {
    /// What the client is for (`"webhook"`, `"download"`).
    purpose: &'static str,
    /// reqwest's error, shared by the clones.
    source: Arc<reqwest::Error>,
}

impl ClientBuildError {
    /// The client `purpose` is for could not be built: `error`.
    pub fn new(purpose: &'static str, error: reqwest::Error) -> ClientBuildError {
        ClientBuildError {
            purpose,
            source: Arc::new(error),
        }
    }
}

/// How addresses are looked up: the system resolver, or a fixed table (unit tests).
#[derive(Debug, Clone)]
enum Lookup {
    System,
    #[cfg(test)]
    Fixed(Arc<HashMap<String, Vec<IpAddr>>>),
}

/// A host exempt from the address checks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowedHost {
    Name(String),
    Ip(IpAddr),
}

/// The SSRF guard: which URLs may be called, and an HTTP client that keeps to them.
#[derive(Debug, Clone)]
pub struct Guard {
    allow_private: bool,
    /// Bound for one name lookup.
    lookup_timeout: Duration,
    allowed: Arc<Vec<AllowedHost>>,
    lookup: Lookup,
}

impl Guard {
    /// A guard; `allow_private` turns the address checks off (the scheme, host and credentials
    /// checks stay). Lookups are bounded by `lookup_timeout`.
    pub fn new(allow_private: bool, lookup_timeout: Duration) -> Guard {
        Guard {
            allow_private,
            lookup_timeout,
            allowed: Arc::new(Vec::new()),
            lookup: Lookup::System,
        }
    }

    /// Exempts these hosts (names, compared without case and a trailing dot, or IP addresses)
    /// from the address checks.
    pub fn with_allowed_hosts<S: AsRef<str>>(
        mut self,
        hosts: impl IntoIterator<Item = S>,
    ) -> Guard {
        let allowed = hosts
            .into_iter()
            .filter_map(|h| {
                let h = h.as_ref().trim();
                let bare = h.trim_start_matches('[').trim_end_matches(']');
                if let Ok(ip) = bare.parse::<IpAddr>() {
                    Some(AllowedHost::Ip(ip))
                } else if h.is_empty() {
                    None
                } else {
                    Some(AllowedHost::Name(normalise_name(h)))
                }
            })
            .collect();
        self.allowed = Arc::new(allowed);
        self
    }

    #[cfg(test)]
    pub(crate) fn with_fixed_lookup(mut self, table: &[(&str, &[&str])]) -> Guard {
        let table = table
            .iter()
            .map(|(name, ips)| {
                let ips = ips.iter().map(|ip| ip.parse().expect("an IP")).collect();
                (normalise_name(name), ips)
            })
            .collect();
        self.lookup = Lookup::Fixed(Arc::new(table));
        self
    }

    /// Whether the address checks are off.
    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    fn allows_host(&self, host: &url::Host<&str>) -> bool {
        self.allowed.iter().any(|a| match (a, host) {
            (AllowedHost::Name(n), url::Host::Domain(d)) => *n == normalise_name(d),
            (AllowedHost::Ip(ip), url::Host::Ipv4(v4)) => *ip == IpAddr::V4(*v4),
            (AllowedHost::Ip(ip), url::Host::Ipv6(v6)) => *ip == IpAddr::V6(*v6),
            _ => false,
        })
    }

    fn allows_name(&self, name: &str) -> bool {
        let name = normalise_name(name);
        self.allowed
            .iter()
            .any(|a| matches!(a, AllowedHost::Name(n) if *n == name))
    }

    /// Checks `url`: http or https, a host, no credentials and, unless private targets are
    /// allowed or the host is in the allow-list, a host that neither is nor resolves to a refused
    /// address (see the module docs). Returns the parsed URL, which is what must be called (the
    /// parser normalises numeric host spellings such as `http://2130706433/`).
    pub async fn check(&self, url: &str) -> Result<url::Url, UrlError> {
        let parsed = url::Url::parse(url.trim())
            .map_err(|e| UrlError::Invalid(format!("not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UrlError::Invalid(format!(
                "the scheme must be http or https, not {:?}",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlError::Invalid(
                "credentials in the URL are not allowed".into(),
            ));
        }
        let host = match parsed.host() {
            None => return Err(UrlError::Invalid("the URL has no host".into())),
            Some(h) => h,
        };
        if self.allow_private || self.allows_host(&host) {
            return Ok(parsed);
        }
        let refused = |why: String| Err(UrlError::Refused(why));
        let name = match host {
            url::Host::Ipv4(ip) => {
                return match refusal(IpAddr::V4(ip)) {
                    Some(why) => refused(format!("{ip} is {why}")),
                    None => Ok(parsed),
                }
            }
            url::Host::Ipv6(ip) => {
                return match refusal(IpAddr::V6(ip)) {
                    Some(why) => refused(format!("{ip} is {why}")),
                    None => Ok(parsed),
                }
            }
            url::Host::Domain(name) => name.to_owned(),
        };
        if let Some(why) = local_name(&name) {
            return refused(format!("{name} is {why}"));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs = self
            .resolve(&name, port)
            .await
            .map_err(|e| UrlError::Invalid(format!("cannot resolve {name}: {e}")))?;
        if addrs.is_empty() {
            return Err(UrlError::Invalid(format!("{name} resolves to no address")));
        }
        for addr in &addrs {
            if let Some(why) = refusal(addr.ip()) {
                return refused(format!("{name} resolves to {}, {why}", addr.ip()));
            }
        }
        Ok(parsed)
    }

    /// Resolves `name`, bounded by the lookup timeout.
    async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, LookupError> {
        match &self.lookup {
            Lookup::System => lookup(name, port, self.lookup_timeout).await,
            #[cfg(test)]
            Lookup::Fixed(table) => table
                .get(&normalise_name(name))
                .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
                .ok_or_else(|| {
                    LookupError::Failed(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such host (fixed lookup)",
                    ))
                }),
        }
    }

    /// The resolver an HTTP client of this guard uses; `label` names what is refused in its
    /// errors (`"webhook host"` gives `webhook host refused: …`).
    pub fn resolver(&self, label: &'static str) -> GuardedResolver {
        GuardedResolver {
            guard: self.clone(),
            label,
        }
    }

    /// Sets `builder` up to keep to the guard: no redirects (a caller that follows them checks
    /// each target), no proxy (it would connect out of the guard's sight) and, unless private
    /// targets are allowed, the [`GuardedResolver`].
    pub fn client(
        &self,
        builder: reqwest::ClientBuilder,
        label: &'static str,
    ) -> reqwest::ClientBuilder {
        let builder = builder
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if self.allow_private {
            builder
        } else {
            builder.dns_resolver(self.resolver(label))
        }
    }
}

/// `name` lower-cased, without a trailing dot.
fn normalise_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Resolves `name` with the system resolver, bounded by `timeout`.
async fn lookup(name: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, LookupError> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
        Err(_) => Err(LookupError::TimedOut(timeout)),
        Ok(Err(e)) => Err(LookupError::Failed(e)),
        Ok(Ok(addrs)) => Ok(addrs.collect()),
    }
}

/// A connection the resolver refused; found in a request error's sources by [`refused_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRefused {
    label: &'static str,
    /// Which name or address was refused and why.
    pub why: String,
}

impl fmt::Display for HostRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} refused: {}", self.label, self.why)
    }
}

impl std::error::Error for HostRefused {}

/// The [`HostRefused`] among `e`'s sources, if the request failed because the guard refused it.
pub fn refused_host<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a HostRefused> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(refused) = err.downcast_ref::<HostRefused>() {
            return Some(refused);
        }
        current = err.source();
    }
    None
}

/// An HTTP client's resolver: only addresses that pass [`refusal`] are ever connected to (all
/// addresses of a name in the guard's allow-list).
#[derive(Debug)]
pub struct GuardedResolver {
    guard: Guard,
    label: &'static str,
}

/// Why the resolver gives no address.
#[derive(Debug)]
enum ResolveError {
    /// The guard refused the name or every address it has.
    Refused(HostRefused),
    /// The lookup itself failed.
    Lookup(LookupError),
}

impl GuardedResolver {
    /// The addresses `name` may be connected at, or why none may.
    async fn filtered(&self, name: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let refused = |why: String| {
            ResolveError::Refused(HostRefused {
                label: self.label,
                why,
            })
        };
        let allowed = self.guard.allow_private || self.guard.allows_name(name);
        if !allowed {
            if let Some(why) = local_name(name) {
                return Err(refused(format!("{name} is {why}")));
            }
        }
        let addrs = self
            .guard
            .resolve(name, 0)
            .await
            .map_err(ResolveError::Lookup)?;
        if allowed {
            return Ok(addrs);
        }
        let (ok, bad) = split_allowed(addrs);
        if ok.is_empty() {
            return Err(refused(match bad.first() {
                Some((ip, why)) => format!("{name} resolves to {ip}, {why}"),
                None => format!("{name} resolves to no address"),
            }));
        }
        if !bad.is_empty() {
            debug!(host = %name, refused = bad.len(), "{}: refused addresses skipped", self.label);
        }
        Ok(ok)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = GuardedResolver {
            guard: self.guard.clone(),
            label: self.label,
        };
        Box::pin(async move {
            match this.filtered(name.as_str()).await {
                Ok(addrs) => {
                    let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
                    Ok(addrs)
                }
                Err(ResolveError::Refused(refused)) => Err(refused.into()),
                Err(ResolveError::Lookup(e)) => Err(e.into()),
            }
        })
    }
}

/// Splits resolved addresses into those that may be connected to and those refused (with why).
pub fn split_allowed(addrs: Vec<SocketAddr>) -> (Vec<SocketAddr>, Vec<(IpAddr, String)>) {
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

/// Why `name` may not be called without resolving it, if it is a local name.
pub fn local_name(name: &str) -> Option<&'static str> {
    let n = normalise_name(name);
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

/// Why `ip` may not be called (`"a loopback address"`, or for an IPv6 form of an IPv4 address
/// `"an IPv4-mapped form of 127.0.0.1, a loopback address"`), or `None` when it may.
pub fn refusal(ip: IpAddr) -> Option<String> {
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

/// Bounds of one download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Bound for the whole download: lookups, redirects, headers and body.
    pub timeout: Duration,
    /// Redirects followed at most.
    pub max_redirects: usize,
}

/// Why a download failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The URL (or a redirect's target, then named) is not usable.
    Invalid {
        /// The redirect target, when it is the one at fault.
        redirect: Option<String>,
        /// Why.
        reason: String,
    },
    /// The guard refused the URL (or a redirect's target, then named).
    Refused {
        /// The redirect target, when it is the one refused.
        redirect: Option<String>,
        /// Which address or name and why.
        reason: String,
    },
    /// The body is larger than the limit; `announced` is the `Content-Length` when that said so.
    TooLarge {
        /// The announced length, when the server announced more than the limit.
        announced: Option<u64>,
    },
    /// The whole download took longer than the limit.
    TimedOut,
    /// More redirects than the limit.
    TooManyRedirects,
    /// A status other than 2xx or a followed redirect.
    Status(String),
    /// The connection or the transfer failed.
    Transport(String),
}

/// Receives a streamed body's chunks with the length the server announced; an error stops the
/// download.
pub type OnChunk<'a> = dyn FnMut(Option<u64>, &[u8]) -> std::io::Result<()> + Send + 'a;

/// A downloaded body.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The bytes.
    pub data: Bytes,
    /// The `Content-Type` the server sent.
    pub content_type: Option<String>,
    /// Redirects followed.
    pub redirects: usize,
}

/// Downloads URLs a job names, through a [`Guard`], within [`Limits`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Downloader {
    guard: Guard,
    limits: Limits,
    /// `Err` when the HTTP client could not be built (then every download fails).
    http: Result<reqwest::Client, ClientBuildError>,
}

impl Downloader {
    /// A downloader; `label` names refused hosts in connection errors.
    pub fn new(guard: Guard, limits: Limits, label: &'static str) -> Downloader {
        let builder = reqwest::Client::builder()
            .user_agent(concat!("comfy-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(limits.timeout);
        let http = guard
            .client(builder, label)
            .build()
            .map_err(|e| ClientBuildError::new("download", e));
        Downloader {
            guard,
            limits,
            http,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Downloads `url`: checks it, follows at most `max_redirects` redirects (each target checked
    /// again), refuses a body larger than `max_bytes` (by its `Content-Length` before reading,
    /// and by counting while reading), all within `timeout`.
    pub async fn get(&self, url: &str) -> Result<Fetched, FetchError> {
        match tokio::time::timeout(self.limits.timeout, self.get_unbounded(url)).await {
            Err(_) => Err(FetchError::TimedOut),
            Ok(result) => result,
        }
    }

    async fn get_unbounded(&self, url: &str) -> Result<Fetched, FetchError> {
        let (resp, announced, redirects) = self.open(url).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let data = self.read_body(resp, announced).await?;
        Ok(Fetched {
            data,
            content_type,
            redirects,
        })
    }

    /// Streams `url`'s body to `on_chunk` as it arrives (for files too large to hold, such as
    /// models), with the same checks, redirects and limits as [`Downloader::get`], each chunk
    /// with the length the server announced (first an empty one, before the body). Returns the
    /// bytes read.
    pub async fn stream(&self, url: &str, on_chunk: &mut OnChunk<'_>) -> Result<u64, FetchError> {
        let streamed = async {
            let (mut resp, announced, _) = self.open(url).await?;
            on_chunk(announced, &[]).map_err(|e| FetchError::Transport(e.to_string()))?;
            let mut read = 0u64;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| FetchError::Transport(error_chain(&e)))?
            {
                read += chunk.len() as u64;
                if read > self.limits.max_bytes {
                    return Err(FetchError::TooLarge { announced: None });
                }
                on_chunk(announced, &chunk).map_err(|e| FetchError::Transport(e.to_string()))?;
            }
            Ok(read)
        };
        match tokio::time::timeout(self.limits.timeout, streamed).await {
            Err(_) => Err(FetchError::TimedOut),
            Ok(result) => result,
        }
    }

    /// Checks `url`, follows the redirects, and returns the 2xx response with its announced
    /// length (within the limit) and the redirects followed.
    async fn open(&self, url: &str) -> Result<(reqwest::Response, Option<u64>, usize), FetchError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        let mut current = self.guard.check(url).await.map_err(|e| match e {
            UrlError::Invalid(reason) => FetchError::Invalid {
                redirect: None,
                reason,
            },
            UrlError::Refused(reason) => FetchError::Refused {
                redirect: None,
                reason,
            },
        })?;
        let mut redirects = 0;
        loop {
            let resp =
                http.get(current.clone())
                    .send()
                    .await
                    .map_err(|e| match refused_host(&e) {
                        Some(refused) => FetchError::Refused {
                            redirect: (redirects > 0).then(|| display_parsed(&current)),
                            reason: refused.why.clone(),
                        },
                        None => FetchError::Transport(error_chain(&e)),
                    })?;
            let status = resp.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                let location = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        FetchError::Status(format!("HTTP {status} without a Location"))
                    })?;
                let next = current.join(location).map_err(|e| FetchError::Invalid {
                    redirect: Some(display_url(location)),
                    reason: format!("not a URL ({e})"),
                })?;
                redirects += 1;
                if redirects > self.limits.max_redirects {
                    return Err(FetchError::TooManyRedirects);
                }
                let shown = display_parsed(&next);
                debug!(to = %shown, redirects, "following a redirect");
                current = self.guard.check(next.as_str()).await.map_err(|e| match e {
                    UrlError::Invalid(reason) => FetchError::Invalid {
                        redirect: Some(shown.clone()),
                        reason,
                    },
                    UrlError::Refused(reason) => FetchError::Refused {
                        redirect: Some(shown.clone()),
                        reason,
                    },
                })?;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status(format!("HTTP {status}")));
            }
            let announced = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .or_else(|| resp.content_length());
            if let Some(len) = announced {
                if len > self.limits.max_bytes {
                    return Err(FetchError::TooLarge {
                        announced: Some(len),
                    });
                }
            }
            return Ok((resp, announced, redirects));
        }
    }

    /// Reads the body, counting bytes against the limit.
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        announced: Option<u64>,
    ) -> Result<Bytes, FetchError> {
        // Reserved up front only up to 8 MiB: an announced length is a claim, not bytes.
        let capacity = announced
            .unwrap_or(0)
            .min(self.limits.max_bytes)
            .min(8 * 1024 * 1024) as usize;
        let mut buf = BytesMut::with_capacity(capacity);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| FetchError::Transport(error_chain(&e)))?
        {
            if (buf.len() + chunk.len()) as u64 > self.limits.max_bytes {
                return Err(FetchError::TooLarge { announced: None });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("100.64.0.1", "a shared (CGNAT) address"),
            ("100.127.255.255", "a shared (CGNAT) address"),
            (
                "169.254.169.254",
                "a link-local address (the cloud metadata service)",
            ),
            ("169.254.1.1", "a link-local address"),
            ("0.0.0.0", "an unspecified address"),
            ("0.1.2.3", "a \"this network\" address (0.0.0.0/8)"),
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

    /// A guard whose lookups answer from a table: names that resolve to refused addresses.
    fn faked(allow_private: bool) -> Guard {
        Guard::new(allow_private, Duration::from_secs(1)).with_fixed_lookup(&[
            ("public.example", &["93.184.215.14"]),
            ("loopback.example", &["127.0.0.1"]),
            ("metadata.example", &["169.254.169.254"]),
            ("private.example", &["10.0.0.1"]),
            ("mixed.example", &["10.0.0.1", "93.184.215.14", "::1"]),
            ("mapped.example", &["::ffff:127.0.0.1"]),
        ])
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let guard = faked(false);
        let why = |url: &'static str| {
            let guard = guard.clone();
            async move { guard.check(url).await.unwrap_err() }
        };
        assert!(guard.check("https://public.example/x.png").await.is_ok());
        assert_eq!(
            why("http://loopback.example/").await,
            UrlError::Refused("loopback.example resolves to 127.0.0.1, a loopback address".into())
        );
        assert_eq!(
            why("http://metadata.example/latest").await,
            UrlError::Refused(
                "metadata.example resolves to 169.254.169.254, a link-local address (the cloud metadata service)"
                    .into()
            )
        );
        assert_eq!(
            why("http://private.example/").await,
            UrlError::Refused("private.example resolves to 10.0.0.1, a private address".into())
        );
        // One refused address among public ones refuses the name at check time.
        assert!(matches!(
            why("http://mixed.example/").await,
            UrlError::Refused(r) if r.contains("10.0.0.1")
        ));
        assert!(matches!(
            why("http://mapped.example/").await,
            UrlError::Refused(r) if r.contains("IPv4-mapped form of 127.0.0.1")
        ));
        assert!(matches!(
            why("http://unknown.example/").await,
            UrlError::Invalid(r) if r.starts_with("cannot resolve unknown.example")
        ));
        // Allowed private targets are not even resolved.
        assert!(faked(true).check("http://loopback.example/").await.is_ok());
        assert!(faked(true).check("http://unknown.example/").await.is_ok());
    }

    #[tokio::test]
    async fn lookup_failures() {
        assert_eq!(
            LookupError::TimedOut(Duration::from_millis(1500)).to_string(),
            "no answer within 1.5 s"
        );
        assert!(matches!(
            faked(false).resolve("unknown.example", 80).await,
            Err(LookupError::Failed(e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
        assert_eq!(
            faked(false).check("http://unknown.example/").await,
            Err(UrlError::Invalid(
                "cannot resolve unknown.example: no such host (fixed lookup)".into()
            ))
        );
    }

    #[tokio::test]
    async fn the_resolver_keeps_only_allowed_addresses() {
        let resolver = faked(false).resolver("input URL host");
        assert_eq!(
            resolver.filtered("public.example").await.unwrap(),
            ["93.184.215.14:0".parse::<SocketAddr>().unwrap()]
        );
        // At connect time a name with some refused addresses keeps only the others.
        assert_eq!(
            resolver.filtered("mixed.example").await.unwrap(),
            ["93.184.215.14:0".parse::<SocketAddr>().unwrap()]
        );
        let Err(ResolveError::Refused(err)) = resolver.filtered("metadata.example").await else {
            panic!("not refused");
        };
        assert_eq!(
            err.to_string(),
            "input URL host refused: metadata.example resolves to 169.254.169.254, a link-local address (the cloud metadata service)"
        );
        let Err(ResolveError::Refused(err)) = resolver.filtered("localhost").await else {
            panic!("not refused");
        };
        assert_eq!(err.why, "localhost is a local host name");
        assert!(matches!(
            resolver.filtered("unknown.example").await,
            Err(ResolveError::Lookup(_))
        ));
        // Through the trait, the refusal is found again in the error's sources.
        let err = reqwest::dns::Resolve::resolve(&resolver, "loopback.example".parse().unwrap())
            .await
            .err()
            .unwrap();
        let found = refused_host(err.as_ref()).unwrap();
        assert_eq!(
            found.why,
            "loopback.example resolves to 127.0.0.1, a loopback address"
        );
    }

    #[tokio::test]
    async fn allowed_hosts_skip_the_address_checks() {
        let guard = faked(false).with_allowed_hosts(["Loopback.Example.", "10.0.0.1", "[::1]"]);
        assert!(guard.check("http://loopback.example:8080/").await.is_ok());
        assert!(guard.check("http://10.0.0.1/").await.is_ok());
        assert!(guard.check("http://[::1]/").await.is_ok());
        assert!(guard.check("http://10.0.0.2/").await.is_err());
        assert!(guard.check("http://private.example/").await.is_err());
        let resolver = guard.resolver("input URL host");
        assert_eq!(
            resolver.filtered("loopback.example").await.unwrap(),
            ["127.0.0.1:0".parse::<SocketAddr>().unwrap()]
        );
        assert!(resolver.filtered("metadata.example").await.is_err());
        // The scheme and credential checks stay.
        assert!(matches!(
            guard.check("ftp://10.0.0.1/").await,
            Err(UrlError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn a_refusal_at_connect_time_is_found_in_the_request_error() {
        // What a name that passed `check` and then re-resolved to loopback would reach.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let guard = faked(false);
        let client = guard
            .client(reqwest::Client::builder(), "input URL host")
            .build()
            .unwrap();
        let err = client
            .get(format!("http://loopback.example:{port}/"))
            .send()
            .await
            .unwrap_err();
        let refused = refused_host(&err).expect("a HostRefused among the sources");
        assert_eq!(
            refused.why,
            "loopback.example resolves to 127.0.0.1, a loopback address"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "a connection reached the listener");
    }
}
