//! URLs as messages and logs may show them: without credentials, query or fragment (a
//! presigned URL's signature, a token in a query string never reaches a message). The one
//! redaction of URLs: [`display_url`] for a URL, [`urls_in`] for text that may hold some, and
//! [`error_chain`] for an error and its causes (an HTTP client's error names the URL it failed
//! on, query and all).

use std::borrow::Cow;

/// A URL for messages and logs: scheme, host, port and path; a query or fragment (which may carry
/// a signature or token) shows as `?…`. A string that does not parse is cut at 200 characters.
pub fn display_url(url: &str) -> String {
    match url::Url::parse(url.trim()) {
        Ok(u) => display_parsed(&u),
        Err(_) => {
            let s: String = url.trim().chars().take(200).collect();
            if s.len() < url.trim().len() {
                format!("{s}…")
            } else {
                s
            }
        }
    }
}

/// [`display_url`] for a parsed URL.
pub fn display_parsed(u: &url::Url) -> String {
    let mut shown = u.clone();
    let hidden = u.query().is_some() || u.fragment().is_some();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    let mut s = shown.to_string();
    if hidden {
        s.push_str("?…");
    }
    s
}

/// `text` with every `http://`, `https://`, `ws://`, `wss://` or `s3://` URL in it shown as
/// [`display_url`] shows it.
pub fn urls_in(text: &str) -> Cow<'_, str> {
    const SCHEMES: [&str; 5] = ["https://", "http://", "wss://", "ws://", "s3://"];
    let starts = |at: usize| SCHEMES.iter().any(|s| text[at..].starts_with(s));
    let lower = text.to_ascii_lowercase();
    let found: Vec<usize> = lower
        .match_indices("://")
        .filter_map(|(at, _)| {
            let start = text[..at]
                .rfind(|c: char| !c.is_ascii_alphanumeric())
                .map_or(0, |b| b + 1);
            starts(start).then_some(start)
        })
        .collect();
    if found.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for start in found {
        if start < copied {
            continue;
        }
        let end = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | '<' | ','))
            .map_or(text.len(), |e| start + e);
        out.push_str(&text[copied..start]);
        out.push_str(&display_url(&text[start..end]));
        copied = end;
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// `e` and its sources on one line, so "connection refused" is not hidden behind "error sending
/// request", with every URL in them redacted ([`urls_in`]).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    urls_in(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(
            display_url("https://bucket.s3.amazonaws.com/a/b.png?X-Amz-Signature=abc"),
            "https://bucket.s3.amazonaws.com/a/b.png?…"
        );
        assert_eq!(
            display_url("http://u:p@10.0.0.5/x.png#frag"),
            "http://10.0.0.5/x.png?…"
        );
        assert_eq!(
            display_url("http://10.0.0.5/x.png"),
            "http://10.0.0.5/x.png"
        );
        assert_eq!(display_url("not a url"), "not a url");
        assert_eq!(
            urls_in(
                "error sending request for url (https://h.example/x.png?token=SECRET): refused"
            ),
            "error sending request for url (https://h.example/x.png?…): refused"
        );
        assert_eq!(
            urls_in("from \"http://u:pw@a/b?sig=1\" and s3://bucket/key?X-Amz-Signature=2, done"),
            "from \"http://a/b?…\" and s3://bucket/key?…, done"
        );
        assert!(matches!(urls_in("no url here"), Cow::Borrowed(_)));
        assert_eq!(display_url(&"x".repeat(300)).chars().count(), 201);
    }
}
