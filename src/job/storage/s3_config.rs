//! A job's `s3Config` (the platform's per-job bucket, `{accessId, accessSecret, endpointUrl,
//! bucketName?, region?}`): where it is found, and its fields checked.

use serde_json::Value;

use super::bucket::BucketError;
use crate::config::{BucketSettings, JOB_NAMES};
use crate::secret::Secret;
use crate::ssrf::UrlError;

/// What an `s3Config` looks like, for its messages.
const USAGE: &str = "expected {\"accessId\", \"accessSecret\", \"endpointUrl\", \"bucketName\"?}";

/// How to allow a job's private endpoint anyway.
const ALLOW_HINT: &str = "(set ALLOW_PRIVATE_S3_ENDPOINTS=true to allow it)";

/// Why a job's `s3Config` cannot be used (the job fails with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ConfigError {
    /// `s3Config` is not a JSON object.
    #[error("Invalid s3Config: not an object; {}", USAGE)]
    NotAnObject,
    /// A field is missing or not a non-empty string.
    #[error("Invalid s3Config: '{key}' must be a non-empty string; {}", USAGE)]
    Field {
        /// The field (`accessId`, `endpointUrl`, ...).
        key: &'static str,
    },
    /// The bucket's location or client cannot be made from it.
    #[error("Invalid s3Config: {0}")]
    Bucket(#[from] BucketError),
    /// The SSRF guard refuses `endpointUrl`, or it is not a usable URL.
    #[error("Invalid s3Config: {}", endpoint_problem(.0))]
    Endpoint(UrlError),
}

fn endpoint_problem(e: &UrlError) -> String {
    match e {
        UrlError::Refused(why) => format!("{} refused: {why} {ALLOW_HINT}", JOB_NAMES.endpoint),
        UrlError::Invalid(why) => format!("{}: {why}", JOB_NAMES.endpoint),
    }
}

/// A job's `s3Config`: top level on the job (`top`) first, then inside `input` (an object, or a
/// JSON string holding one). `null` counts as absent.
pub fn job_s3_config(top: Option<&Value>, input: Option<&Value>) -> Option<Value> {
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    if let Some(v) = present(top) {
        return Some(v);
    }
    match input {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .and_then(|i| present(i.get("s3Config"))),
        Some(i) => present(i.get("s3Config")),
        None => None,
    }
}

/// Parses `{accessId, accessSecret, bucketName?, endpointUrl, region?}`.
pub(super) fn parse_s3_config(value: &Value) -> Result<BucketSettings, S3ConfigError> {
    let Value::Object(map) = value else {
        return Err(S3ConfigError::NotAnObject);
    };
    let field = |key: &'static str, required: bool| -> Result<Option<String>, S3ConfigError> {
        match map.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Some(Value::String(_)) if !required => Ok(None),
            _ => Err(S3ConfigError::Field { key }),
        }
    };
    Ok(BucketSettings {
        endpoint_url: field("endpointUrl", true)?.unwrap_or_default(),
        access_key_id: field("accessId", true)?.unwrap_or_default(),
        secret_access_key: Secret::new(field("accessSecret", true)?.unwrap_or_default()),
        bucket_name: field("bucketName", false)?,
        region: field("region", false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_config_top_level_or_in_input() {
        let cfg =
            serde_json::json!({"accessId": "a", "accessSecret": "s", "endpointUrl": "http://h/b"});
        let other = serde_json::json!({"accessId": "x"});
        assert_eq!(
            job_s3_config(Some(&cfg), Some(&serde_json::json!({"s3Config": other}))),
            Some(cfg.clone())
        );
        assert_eq!(
            job_s3_config(None, Some(&serde_json::json!({"s3Config": cfg}))),
            Some(cfg.clone())
        );
        let text = serde_json::json!({"s3Config": cfg}).to_string();
        assert_eq!(
            job_s3_config(None, Some(&Value::String(text))),
            Some(cfg.clone())
        );
        assert_eq!(
            job_s3_config(Some(&Value::Null), Some(&serde_json::json!({}))),
            None
        );

        let parsed = parse_s3_config(&cfg).unwrap();
        assert_eq!(parsed.endpoint_url, "http://h/b");
        assert_eq!(parsed.bucket_name, None);
        let err =
            parse_s3_config(&serde_json::json!({"accessId": "a", "endpointUrl": "http://h/b"}))
                .unwrap_err();
        assert_eq!(
            err,
            S3ConfigError::Field {
                key: "accessSecret"
            }
        );
        assert!(err.to_string().contains("'accessSecret'"), "{err}");
        assert_eq!(
            parse_s3_config(&serde_json::json!("x")).unwrap_err(),
            S3ConfigError::NotAnObject
        );
    }
}
