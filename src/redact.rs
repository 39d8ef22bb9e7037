//! URLs as messages and logs may show them: without credentials, query or fragment (a
//! presigned URL's signature, a token in a query string never reaches a message).

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
        assert_eq!(display_url(&"x".repeat(300)).chars().count(), 201);
    }
}
