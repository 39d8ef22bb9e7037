//! Where ComfyUI listens, as `COMFY_HOST` and `--comfy` give it: `HOST:PORT`, or an
//! `http(s)://[user:password@]HOST[:PORT][/prefix]` URL. Checked before anything connects, so a
//! typo is a usage error naming its source instead of a long wait on an address that cannot work.

use std::fmt;

/// The default address, shown the same way in every `--help`.
pub const DEFAULT_COMFY_ADDRESS: &str = "127.0.0.1:8188";

/// A checked ComfyUI address.
#[derive(Clone, PartialEq, Eq)]
pub struct ComfyAddress {
    /// `http` or `https`.
    scheme: &'static str,
    /// `user:password` from the URL, if any (never shown).
    userinfo: Option<String>,
    /// `host:port`, `[v6]:port` or a bare host of a URL (its port implied by the scheme).
    authority: String,
    /// A path prefix (`/comfy`), without a trailing slash; empty when none.
    prefix: String,
}

/// Why an address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty, or only spaces.
    #[error("it is empty; give HOST:PORT (e.g. {DEFAULT_COMFY_ADDRESS}) or an http(s):// URL")]
    Empty,
    /// A scheme other than http and https.
    #[error("'{0}://' is not supported; use HOST:PORT or an http:// or https:// URL")]
    Scheme(String),
    /// No host (`http://`, `:8188`, `http://user@`).
    #[error("it names no host; give HOST:PORT (e.g. {DEFAULT_COMFY_ADDRESS})")]
    NoHost,
    /// A bare host without its port (`localhost`): ComfyUI has no standard port to assume.
    #[error("'{0}' has no port; ComfyUI listens on 8188 by default, so write {0}:8188")]
    NoPort(String),
    /// A port that is not a number from 1 to 65535.
    #[error("'{0}' is not a port (a whole number from 1 to 65535)")]
    Port(String),
    /// Characters no host can hold (spaces, control characters, `?`, `#`).
    #[error("the host '{0}' holds characters no host name can")]
    Host(String),
}

impl ComfyAddress {
    /// Checks `text` (trimmed; a trailing `/` ignored).
    pub fn parse(text: &str) -> Result<ComfyAddress, AddressError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(AddressError::Empty);
        }
        let (scheme, rest, is_url) = match trimmed.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s.to_ascii_lowercase().as_str() {
                    "http" => "http",
                    "https" => "https",
                    _ => return Err(AddressError::Scheme(s.chars().take(16).collect())),
                };
                (scheme, rest.trim_end_matches('/'), true)
            }
            None => ("http", trimmed.trim_end_matches('/'), false),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, authority),
        };
        let (host, port) = split_port(hostport)?;
        if host.is_empty() {
            return Err(AddressError::NoHost);
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@' | '\\'))
        {
            return Err(AddressError::Host(shorten(host)));
        }
        match port {
            Some(p) => check_port(p)?,
            None if !is_url => return Err(AddressError::NoPort(shorten(host))),
            None => {}
        }
        Ok(ComfyAddress {
            scheme,
            userinfo,
            authority: hostport.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// `user:password` given in the URL, to hold as a secret.
    pub fn userinfo(&self) -> Option<&str> {
        self.userinfo.as_deref()
    }

    /// `http(s)://[user:password@]host:port[/prefix]`: the base of ComfyUI's HTTP API.
    pub fn base_url(&self) -> String {
        match &self.userinfo {
            Some(u) => format!("{}://{u}@{}{}", self.scheme, self.authority, self.prefix),
            None => format!("{}://{}{}", self.scheme, self.authority, self.prefix),
        }
    }

    /// `ws(s)://host:port[/prefix]` (never with credentials).
    pub fn ws_base(&self) -> String {
        let scheme = if self.scheme == "https" { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.authority, self.prefix)
    }

    /// `host:port[/prefix]`, for messages: no scheme, never credentials.
    pub fn shown(&self) -> String {
        format!("{}{}", self.authority, self.prefix)
    }
}

impl fmt::Display for ComfyAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl fmt::Debug for ComfyAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ComfyAddress({}://{})", self.scheme, self.shown())
    }
}

impl std::str::FromStr for ComfyAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ComfyAddress::parse(s)
    }
}

/// What the user typed, for a message: credentials before an `@` replaced by `…`, at most 64
/// characters.
pub fn without_credentials(text: &str) -> String {
    let text = text.trim();
    let (scheme, rest) = match text.split_once("://") {
        Some((s, rest)) => (format!("{s}://"), rest),
        None => (String::new(), text),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let shown = match rest[..authority_end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}…@{host}{}", &rest[authority_end..]),
        None => text.to_owned(),
    };
    shorten(&shown)
}

/// `host:port` → (`host`, `Some(port)`); `[v6]:port` and `[v6]` too; a bare host → (`host`, None).
fn split_port(hostport: &str) -> Result<(&str, Option<&str>), AddressError> {
    if let Some(v6) = hostport.strip_prefix('[') {
        let (inner, after) = v6
            .split_once(']')
            .ok_or_else(|| AddressError::Host(shorten(hostport)))?;
        if inner.is_empty()
            || !inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err(AddressError::Host(shorten(hostport)));
        }
        return match after {
            "" => Ok((hostport, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((&hostport[..inner.len() + 2], Some(port))),
                None => Err(AddressError::Host(shorten(hostport))),
            },
        };
    }
    match hostport.rsplit_once(':') {
        // A second colon without brackets: an IPv6 address that needs them.
        Some((host, _)) if host.contains(':') => Err(AddressError::Host(shorten(hostport))),
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((hostport, None)),
    }
}

fn check_port(port: &str) -> Result<(), AddressError> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.len() <= 5 => Ok(()),
        _ => Err(AddressError::Port(shorten(port))),
    }
}

/// At most 64 characters of what the user typed, for a message.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(63).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_users_write() {
        for (text, base, shown) in [
            ("127.0.0.1:8188", "http://127.0.0.1:8188", "127.0.0.1:8188"),
            (
                " localhost:8188/ ",
                "http://localhost:8188",
                "localhost:8188",
            ),
            ("http://comfy", "http://comfy", "comfy"),
            (
                "HTTPS://comfy.example:443/p/",
                "https://comfy.example:443/p",
                "comfy.example:443/p",
            ),
            ("[::1]:8188", "http://[::1]:8188", "[::1]:8188"),
            ("http://[::1]", "http://[::1]", "[::1]"),
            ("http://u:pw@h:1", "http://u:pw@h:1", "h:1"),
        ] {
            let a = ComfyAddress::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(a.base_url(), base, "{text}");
            assert_eq!(a.shown(), shown, "{text}");
        }
        let a = ComfyAddress::parse("https://u:pw@h:9/x").unwrap();
        assert_eq!(a.ws_base(), "wss://h:9/x");
        assert_eq!(a.userinfo(), Some("u:pw"));
        assert!(!format!("{a:?} {a}").contains("pw"));
    }

    #[test]
    fn refuses_what_cannot_work() {
        let err = |t: &str| ComfyAddress::parse(t).unwrap_err();
        assert_eq!(err("127.0.0.1:99999"), AddressError::Port("99999".into()));
        assert_eq!(err("h:0"), AddressError::Port("0".into()));
        assert_eq!(err("h:"), AddressError::Port("".into()));
        assert_eq!(err("h:80a"), AddressError::Port("80a".into()));
        assert_eq!(err("ftp://x:1"), AddressError::Scheme("ftp".into()));
        assert_eq!(err("http://"), AddressError::NoHost);
        assert_eq!(err("http://u:pw@"), AddressError::NoHost);
        assert_eq!(err(":8188"), AddressError::NoHost);
        assert_eq!(err("localhost"), AddressError::NoPort("localhost".into()));
        assert_eq!(err("   "), AddressError::Empty);
        assert!(matches!(err("::1:8188"), AddressError::Host(_)));
        assert!(matches!(err("a b:1"), AddressError::Host(_)));
        assert!(matches!(err("[zz]:1"), AddressError::Host(_)));
        assert_eq!(
            err("localhost").to_string(),
            "'localhost' has no port; ComfyUI listens on 8188 by default, so write localhost:8188"
        );
        assert!(!err("ftp://u:secret@x").to_string().contains("secret"));
        assert_eq!(
            without_credentials("http://u:secret@h:1/p"),
            "http://…@h:1/p"
        );
        assert_eq!(without_credentials("localhost"), "localhost");
    }
}
