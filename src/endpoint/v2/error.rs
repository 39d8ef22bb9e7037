//! The Comfy API v2 error envelope: `{"error": {"code", "message", "details"}}`, with the
//! contract's codes and statuses (and `Retry-After` where the contract asks for one). Messages
//! pass the secret scrubber, as every body of the endpoint does.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A refused v2 request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct V2Error {
    pub(crate) status: StatusCode,
    /// The contract's machine-readable code (`invalid_workflow`, `not_found`, ...).
    pub(crate) code: &'static str,
    pub(crate) message: String,
    /// An object, or none (`null` on the wire).
    pub(crate) details: Option<Box<Value>>,
    /// Seconds for `Retry-After`.
    pub(crate) retry_after: Option<u64>,
}

impl V2Error {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        V2Error {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub(crate) fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400 `invalid_request`: the request itself is malformed.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        V2Error::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 422 `invalid_request`: a well-formed request with a value the contract does not take.
    pub(crate) fn unprocessable(message: impl Into<String>) -> Self {
        V2Error::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 422 `invalid_workflow`.
    pub(crate) fn invalid_workflow(message: impl Into<String>) -> Self {
        V2Error::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_workflow",
            message,
        )
    }

    /// 404 `not_found`, for a job or an asset this endpoint does not know (never made, or
    /// past its retention).
    pub(crate) fn not_found(what: &str, id: &str) -> Self {
        let shown: String = id.chars().take(100).collect();
        V2Error::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {} not found", shown.escape_debug()),
        )
    }

    /// 401 `unauthorized`.
    pub(crate) fn unauthorized() -> Self {
        V2Error::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        )
    }

    /// 500 `upstream_error`, with a generic message (the detail goes to the log).
    pub(crate) fn upstream() -> Self {
        V2Error::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upstream_error",
            "The request could not be completed; see the endpoint's log.",
        )
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let message = crate::secret::scrub(&self.message).into_owned();
        let body = json!({"error": {
            "code": self.code,
            "message": message,
            "details": self.details.map_or(Value::Null, |d| *d),
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_envelope_has_code_message_details_and_retry_after() {
        let e = V2Error::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", "full").retry_after(5);
        let response = e.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": "queue_full", "message": "full", "details": null}})
        );
    }
}
