//! Secrets: the [`Secret`] type, the registry of the secret values alive in the process, and
//! the scrubber that removes them from text ([`scrub`]) and JSON ([`redact_json`]).
//!
//! While any `Secret` holding a value is alive, [`scrub`] replaces that value (and its
//! JSON-escaped form) with `[redacted]`; so do the values of environment variables whose names
//! look secret (`*_API_KEY`, `*SECRET*`, `*TOKEN*`, ...), once [`remember_env_secrets`] ran. Every
//! log line, job error message, API error body and panic report passes through it: the safety
//! net behind the rule that the code never formats a secret.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use serde_json::Value;

/// A value that must never appear in logs or error messages. `Debug` hides it, and while any
/// `Secret` holding a value is alive, [`scrub`] removes that value from every
/// log line (and the job output's error messages), wherever it came from.
#[derive(PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        remember_secret(&value);
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret::new(self.0.clone())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        forget_secret(&self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Shortest value treated as a secret: shorter ones would scrub ordinary words from logs.
const MIN_SECRET_LEN: usize = 6;

/// Live secret values and how many [`Secret`]s hold each.
fn registry() -> &'static RwLock<HashMap<String, usize>> {
    static REGISTRY: OnceLock<RwLock<HashMap<String, usize>>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(HashMap::new()))
}

/// The forms a secret can take in a log line: as it is, and escaped inside a JSON string (the
/// JSON log format escapes `"`, `\\` and control characters).
fn secret_forms(value: &str) -> Vec<String> {
    let mut forms = vec![value.to_owned()];
    if let Ok(json) = serde_json::to_string(value) {
        let escaped = &json[1..json.len() - 1];
        if escaped != value {
            forms.push(escaped.to_owned());
        }
    }
    forms
}

/// Adds a secret value to what [`scrub`] removes (until [`forget_secret`] is called as often).
fn remember_secret(value: &str) {
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let mut map = registry().write().unwrap_or_else(|p| p.into_inner());
    for form in secret_forms(value) {
        *map.entry(form).or_insert(0) += 1;
    }
}

/// Undoes one [`remember_secret`].
fn forget_secret(value: &str) {
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let mut map = registry().write().unwrap_or_else(|p| p.into_inner());
    for form in secret_forms(value) {
        if let Some(n) = map.get_mut(&form) {
            *n -= 1;
            if *n == 0 {
                map.remove(&form);
            }
        }
    }
}

/// True for a key or variable name that holds a secret: `*_API_KEY`, `api_key_comfy_org`,
/// `accessSecret`, `*_SECRET_ACCESS_KEY`, `*TOKEN*`, `*PASSWORD*`, `Authorization`, ...
pub fn is_secret_name(name: &str) -> bool {
    let folded: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    [
        "secret",
        "password",
        "passwd",
        "token",
        "apikey",
        "accesskey",
        "privatekey",
        "credential",
        "authorization",
        "signature",
    ]
    .iter()
    .any(|word| folded.contains(word))
}

/// Remembers the values of the environment variables whose names look secret, for the life of
/// the process.
pub fn remember_env_secrets() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for (name, value) in std::env::vars_os() {
            if let (Some(name), Some(value)) = (name.to_str(), value.to_str()) {
                if is_secret_name(name) {
                    remember_secret(value.trim());
                }
            }
        }
    });
}

/// `text` with every live secret value replaced by `[redacted]`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let map = registry().read().unwrap_or_else(|p| p.into_inner());
    if !map.keys().any(|secret| text.contains(secret.as_str())) {
        return Cow::Borrowed(text);
    }
    // Longest first, so a secret that contains another is replaced whole.
    let mut secrets: Vec<&String> = map.keys().collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "[redacted]");
        }
    }
    Cow::Owned(out)
}

/// A copy of `value` with the values under secret-looking keys (see [`is_secret_name`])
/// replaced by `"[redacted]"`, at any depth: for logging untrusted JSON such as a malformed job.
pub fn redact_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_secret_name(k) && !v.is_null() {
                        Value::String("[redacted]".into())
                    } else {
                        redact_json(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact_json).collect()),
        Value::String(s) => Value::String(scrub(s).into_owned()),
        other => other.clone(),
    }
}

/// Every string under a secret-looking key in `value`, at any depth (a job's
/// `comfy_org_api_key`, `s3Config.accessSecret`, an API node's key in the workflow, ...).
pub fn secret_values(value: &Value) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        Value::String(s) if is_secret_name(k) => out.push(s.trim().to_owned()),
                        other => walk(other, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut out);
    out.retain(|s| s.len() >= MIN_SECRET_LEN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_while_alive() {
        let text = "key=zz-live-secret-77 other=zz-live-secret-7";
        assert_eq!(scrub(text), text);
        let long = crate::secret::Secret::new("zz-live-secret-77");
        let short = crate::secret::Secret::new("zz-live-secret-7");
        assert_eq!(scrub(text), "key=[redacted] other=[redacted]");
        let copy = long.clone();
        drop(long);
        assert_eq!(
            scrub("zz-live-secret-77"),
            "[redacted]",
            "the clone keeps it"
        );
        drop((copy, short));
        assert_eq!(scrub(text), text, "forgotten once no Secret holds it");
        let quoted = crate::secret::Secret::new("zz\"quoted\\secret");
        assert_eq!(
            scrub(r#"{"k":"zz\"quoted\\secret"}"#),
            r#"{"k":"[redacted]"}"#,
            "the JSON-escaped form too"
        );
        drop(quoted);
        let tiny = crate::secret::Secret::new("k");
        assert_eq!(scrub("a key"), "a key", "too short to scrub");
        drop(tiny);
    }

    #[test]
    fn secret_names_and_json_redaction() {
        for name in [
            "RUNPOD_AI_API_KEY",
            "SERVE_API_KEY",
            "COMFY_ORG_API_KEY",
            "comfy_org_api_key",
            "api_key_comfy_org",
            "BUCKET_SECRET_ACCESS_KEY",
            "accessSecret",
            "HF_TOKEN",
            "Authorization",
            "db_password",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "COMFY_HOST",
            "images",
            "workflow",
            "accessId",
            "name",
            "keys",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
        let job = serde_json::json!({"input": {"workflow": {"1": {"inputs": {"api_key": "node-secret-1"}}},
            "comfy_org_api_key": "job-secret-2", "s3Config": {"accessId": "id", "accessSecret": "s3-secret-3"}}});
        let shown = redact_json(&job).to_string();
        for secret in ["node-secret-1", "job-secret-2", "s3-secret-3"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("\"accessId\":\"id\""), "{shown}");
        let mut found = secret_values(&job);
        found.sort();
        assert_eq!(found, ["job-secret-2", "node-secret-1", "s3-secret-3"]);
    }
}
