//! A `/run` or `/runsync` body, checked: `{"input", "webhook"?, "progress_webhook"?,
//! "policy"?: {"executionTimeout"?, "ttl"?}, "s3Config"?}`.

use std::time::Duration;

use serde_json::Value;

use super::error::ApiError;
use crate::job::request::MAX_JOB_TIMEOUT;

/// The longest `policy.executionTimeout` / `policy.ttl` accepted (the cloud's 7 days).
const MAX_POLICY: Duration = MAX_JOB_TIMEOUT;

/// A `/run` or `/runsync` body, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Submission {
    pub(crate) input: Value,
    pub(crate) webhook: Option<String>,
    pub(crate) progress_webhook: Option<String>,
    pub(crate) execution_timeout: Option<Duration>,
    pub(crate) ttl: Option<Duration>,
    /// `s3Config` on the job (the engine also reads `input.s3Config`).
    pub(crate) s3_config: Option<Value>,
}

impl Submission {
    /// Checks `{"input": …, "webhook"?, "progress_webhook"?, "policy"?: {"executionTimeout"?, "ttl"?}}`;
    /// `progress_webhook` may also sit inside `input`.
    pub(crate) fn parse(body: Value) -> Result<Submission, ApiError> {
        let Value::Object(mut body) = body else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object like {\"input\": {...}}",
            ));
        };
        let input = match body.remove("input") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad_request(
                    "missing 'input': the request body must look like {\"input\": {...}}",
                ))
            }
            Some(v) => v,
        };
        let webhook = url_field(body.get("webhook"), "webhook")?;
        let progress_webhook = match url_field(body.get("progress_webhook"), "progress_webhook")? {
            Some(url) => Some(url),
            None => url_field(input.get("progress_webhook"), "input.progress_webhook")?,
        };
        let (execution_timeout, ttl) = match body.get("policy") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(policy)) => (
                millis_field(policy.get("executionTimeout"), "policy.executionTimeout")?,
                millis_field(policy.get("ttl"), "policy.ttl")?,
            ),
            Some(_) => return Err(ApiError::bad_request("'policy' must be an object")),
        };
        let s3_config = body.remove("s3Config").filter(|v| !v.is_null());
        Ok(Submission {
            input,
            webhook,
            progress_webhook,
            execution_timeout,
            ttl,
            s3_config,
        })
    }
}

fn url_field(value: Option<&Value>, name: &str) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
        Some(_) => Err(ApiError::bad_request(format!(
            "'{name}' must be a URL string"
        ))),
    }
}

fn millis_field(value: Option<&Value>, name: &str) -> Result<Option<Duration>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                // Clamped before the conversion, which panics beyond `u64::MAX` seconds.
                let secs = (ms / 1000.0).min(MAX_POLICY.as_secs_f64());
                Ok(Some(Duration::from_secs_f64(secs)))
            }
            _ => Err(ApiError::bad_request(format!(
                "'{name}' must be a positive number of milliseconds"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn submissions_are_checked() {
        let sub = Submission::parse(json!({
            "input": {"workflow": {}, "progress_webhook": "http://inner"},
            "webhook": "http://final",
            "policy": {"executionTimeout": 1500, "ttl": 60000}
        }))
        .unwrap();
        assert_eq!(sub.webhook.as_deref(), Some("http://final"));
        assert_eq!(sub.progress_webhook.as_deref(), Some("http://inner"));
        assert_eq!(sub.execution_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(sub.ttl, Some(Duration::from_secs(60)));
        let top = Submission::parse(json!({
            "input": {"progress_webhook": "http://inner"},
            "progress_webhook": "http://top"
        }))
        .unwrap();
        assert_eq!(top.progress_webhook.as_deref(), Some("http://top"));
        let huge = Submission::parse(json!({
            "input": {}, "policy": {"executionTimeout": 1e300, "ttl": 1e30}
        }))
        .unwrap();
        assert_eq!(huge.execution_timeout, Some(MAX_POLICY));
        assert_eq!(huge.ttl, Some(MAX_POLICY));

        for (body, wanted) in [
            (json!([1]), "JSON object"),
            (json!({}), "missing 'input'"),
            (json!({"input": null}), "missing 'input'"),
            (json!({"input": {}, "webhook": 3}), "'webhook' must be"),
            (json!({"input": {}, "policy": 5}), "'policy' must be"),
            (
                json!({"input": {}, "policy": {"executionTimeout": -1}}),
                "policy.executionTimeout",
            ),
            (json!({"input": {}, "policy": {"ttl": "x"}}), "policy.ttl"),
        ] {
            let err = Submission::parse(body).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
            assert!(err.message.contains(wanted), "{}", err.message);
        }
    }
}
