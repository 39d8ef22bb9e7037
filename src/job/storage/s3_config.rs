//! A job's `s3Config` (the platform's per-job bucket, `{accessId, accessSecret, endpointUrl,
//! bucketName?, region?}`): where it is found, and its fields checked.

use serde_json::Value;

use crate::config::BucketSettings;
use crate::secret::Secret;

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
pub(super) fn parse_s3_config(value: &Value) -> Result<BucketSettings, String> {
    const USAGE: &str =
        "expected {\"accessId\", \"accessSecret\", \"endpointUrl\", \"bucketName\"?}";
    let Value::Object(map) = value else {
        return Err(format!("Invalid s3Config: not an object; {USAGE}"));
    };
    let field = |key: &str, required: bool| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
            Some(Value::String(_)) if !required => Ok(None),
            _ => Err(format!(
                "Invalid s3Config: '{key}' must be a non-empty string; {USAGE}"
            )),
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
        assert!(err.contains("'accessSecret'"), "{err}");
        assert!(parse_s3_config(&serde_json::json!("x")).is_err());
    }
}
