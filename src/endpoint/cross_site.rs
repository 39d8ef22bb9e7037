//! The guard that keeps web pages from driving a keyless endpoint. Without `SERVE_API_KEY`,
//! anyone who can reach the port may run jobs, which on loopback means any web page the user
//! opens: a form or a `fetch` with a "simple" content type needs no CORS preflight, and DNS
//! rebinding makes a page's own host name point at 127.0.0.1. So, without a key, a request to
//! the API must:
//!
//! * name this endpoint in `Host`: a loopback name or address, or the address it is bound to
//!   (an endpoint bound to every interface with `--insecure` takes any);
//! * come from no web origin, or from the endpoint's own (its page), or from one listed in
//!   `SERVE_CORS_ORIGINS` (a browser's `Sec-Fetch-Site: cross-site` counts as a foreign origin);
//! * send a JSON body as JSON (`application/json`, `text/json` or a `+json` type), on the
//!   routes that take one.
//!
//! With a key none of this applies: a cross-site page cannot send the `Authorization` header
//! without a preflight the endpoint does not grant (unless its origin is listed).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::local_endpoint::LocalEndpoint;

/// Refuses what a web page could send to a keyless endpoint (see the module docs).
pub(super) async fn refuse_cross_site(
    State(endpoint): State<LocalEndpoint>,
    request: Request,
    next: Next,
) -> Response {
    let options = endpoint.options();
    if options.api_key.is_some() {
        return next.run(request).await;
    }
    if let Err(refused) = check(
        request.method(),
        request.uri().path(),
        request.headers(),
        options.bound,
        &options.cors_origins,
    ) {
        return refused.into_response();
    }
    next.run(request).await
}

pub(super) fn check(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    bound: Option<SocketAddr>,
    allowed_origins: &[String],
) -> Result<(), ApiError> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or_default();
    if !host_is_this_endpoint(host, bound) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the Host header '{host}' does not name this endpoint (a loopback name or its address); without SERVE_API_KEY, requests must address it directly"),
        ));
    }
    let own_origin = format!("http://{host}");
    let listed = |origin: &str| allowed_origins.iter().any(|o| o == origin);
    match text(header::ORIGIN) {
        Some(origin) if origin == own_origin || listed(origin) => {}
        Some(origin) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("a request from the web origin '{origin}' is refused: without SERVE_API_KEY, only this endpoint's own page (or an origin in SERVE_CORS_ORIGINS) may call it"),
            ))
        }
        None if headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site")) =>
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "a cross-site request is refused: without SERVE_API_KEY, only this endpoint's own page (or an origin in SERVE_CORS_ORIGINS) may call it",
            ))
        }
        None => {}
    }
    let takes_json = *method == Method::POST
        && (path.ends_with("/run")
            || path.ends_with("/runsync")
            || path.ends_with("/jobs")
            || path.ends_with("/from-hash"));
    if takes_json && !is_json(text(header::CONTENT_TYPE)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request body as JSON, with 'Content-Type: application/json'",
        ));
    }
    Ok(())
}

/// `Host` names a loopback name or address, or the bound address (any, when bound to all).
fn host_is_this_endpoint(host: &str, bound: Option<SocketAddr>) -> bool {
    if bound.is_some_and(|b| b.ip().is_unspecified()) {
        return true;
    }
    let name = match host.rsplit_once(':') {
        // `[::1]:8000`, `127.0.0.1:8000`, `localhost:8000`.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let lower = name.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || bound.is_some_and(|b| b.ip() == ip),
        Err(_) => false,
    }
}

/// A JSON media type, in any case and with any parameters.
fn is_json(content_type: Option<&str>) -> bool {
    let essence = content_type
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(essence.as_str(), "application/json" | "text/json") || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_keyless_endpoint_takes_only_direct_json_requests() {
        let bound: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let ok = |h: &[(&str, &str)]| check(&Method::POST, "/run", &headers(h), Some(bound), &[]);
        let json = ("content-type", "application/json");
        assert!(ok(&[("host", "127.0.0.1:8000"), json]).is_ok());
        assert!(ok(&[
            ("host", "localhost:8000"),
            ("origin", "http://localhost:8000"),
            json
        ])
        .is_ok());
        assert!(ok(&[
            ("host", "[::1]:8000"),
            ("content-type", "Application/JSON; charset=utf-8")
        ])
        .is_ok());
        // A web page elsewhere, a rebound host name, a form.
        let refused = |h: &[(&str, &str)]| ok(h).unwrap_err().status;
        assert_eq!(
            refused(&[
                ("host", "127.0.0.1:8000"),
                ("origin", "https://evil.example"),
                json
            ]),
            403
        );
        assert_eq!(
            refused(&[("host", "127.0.0.1:8000"), ("origin", "null"), json]),
            403
        );
        assert_eq!(
            refused(&[
                ("host", "127.0.0.1:8000"),
                ("sec-fetch-site", "cross-site"),
                json
            ]),
            403
        );
        assert_eq!(refused(&[("host", "evil.example:8000"), json]), 403);
        assert_eq!(
            refused(&[("host", "127.0.0.1:8000"), ("content-type", "text/plain")]),
            415
        );
        assert_eq!(refused(&[("host", "127.0.0.1:8000")]), 415);
        // A listed origin may call.
        let listed = ["https://app.example".to_owned()];
        let h = headers(&[
            ("host", "127.0.0.1:8000"),
            ("origin", "https://app.example"),
            json,
        ]);
        assert!(check(&Method::POST, "/run", &h, Some(bound), &listed).is_ok());
        // Bound to every interface (--insecure): any Host; a GET needs no JSON.
        let all: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let h = headers(&[("host", "gpu-box.lan:8000")]);
        assert!(check(&Method::GET, "/status/x", &h, Some(all), &[]).is_ok());
        let h = headers(&[("host", "10.0.0.5:8000")]);
        let on_lan: SocketAddr = "10.0.0.5:8000".parse().unwrap();
        assert!(check(&Method::GET, "/health", &h, Some(on_lan), &[]).is_ok());
    }
}
