//! A job as the platform hands it out, read from a job-take reply (one job, or a batch); a job
//! whose JSON cannot be read but whose id can is kept by id, to be answered with an error.

use serde_json::Value;
use tracing::warn;

use crate::job::JobRequest;

/// A job as the platform hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformJob {
    /// Job id.
    pub id: String,
    /// `input` (absent when the platform sent none).
    pub input: Option<Value>,
    /// `progress_webhook`: top-level on the job (the platform passes unknown keys through) or
    /// inside `input`; not yet checked.
    pub progress_webhook: Option<String>,
    /// `s3Config` (`{accessId, accessSecret, bucketName, endpointUrl}`): the platform's per-job
    /// bucket, passed to the engine as it is (it holds a secret: never logged).
    pub s3_config: Option<Value>,
    /// Why the job cannot be run although its id could be read (its JSON is nested too deeply or
    /// holds invalid strings): the job is answered with this error instead of being lost.
    pub unreadable: Option<String>,
}

impl PlatformJob {
    /// The job as the runner takes it.
    pub fn request(&self) -> JobRequest {
        JobRequest::new(self.id.clone(), self.input.clone())
            .with_s3_config(self.s3_config.clone())
            .with_progress_webhook(self.progress_webhook.clone())
    }
}

/// Parses a job-take reply body.
pub(crate) fn parse_jobs(body: &[u8]) -> Result<Vec<PlatformJob>, String> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return unreadable_jobs(body, &e),
    };
    let items = match value {
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        other => {
            return Err(format!(
                "job-take reply is not a job: {}",
                short(&other.to_string())
            ))
        }
    };
    let mut jobs = Vec::new();
    for item in items {
        let id = match item.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                // The job may carry secrets (`comfy_org_api_key`, ...): logged redacted.
                let shown = crate::secret::redact_json(&item).to_string();
                warn!(job = %short(&shown), "Job has missing field(s): id or input. Skipped");
                continue;
            }
        };
        let input = item.get("input").cloned();
        let progress_webhook = progress_webhook(&item, input.as_ref());
        let s3_config = item.get("s3Config").filter(|v| !v.is_null()).cloned();
        jobs.push(PlatformJob {
            id,
            input,
            progress_webhook,
            s3_config,
            unreadable: None,
        });
    }
    Ok(jobs)
}

/// A job-take reply that is not a JSON value serde_json can read: nested deeper than its
/// recursion limit (128 levels, which keeps a hostile job from overflowing the stack), or with
/// invalid UTF-8 or a lone surrogate in a string. If the reply still has the shape of a job (or
/// a batch) whose `id` can be read, skipping everything else without recursion, each such job is
/// answered with an error rather than lost (in a batch, all of them: which one is bad is not
/// known); otherwise the reply is refused as a whole.
fn unreadable_jobs(body: &[u8], error: &serde_json::Error) -> Result<Vec<PlatformJob>, String> {
    #[derive(serde::Deserialize)]
    struct Shallow {
        #[serde(default)]
        id: Option<Value>,
    }
    let not_json = || format!("job-take reply is not JSON: {error}");
    if error.classify() != serde_json::error::Category::Syntax {
        return Err(not_json());
    }
    // serde_json skips the fields not named here without recursion (`ignore_value`).
    let items = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<Shallow>(body).map(|one| vec![one]),
        Some(b'[') => serde_json::from_slice::<Vec<Shallow>>(body),
        _ => return Err(not_json()),
    };
    let Ok(items) = items else {
        return Err(not_json());
    };
    let why = if error.to_string().starts_with("recursion limit exceeded") {
        format!("The job's JSON is nested more than 128 levels deep, so it was not run ({error})")
    } else {
        format!("The job's JSON cannot be read, so it was not run ({error})")
    };
    let jobs: Vec<PlatformJob> = items
        .into_iter()
        .filter_map(|item| match item.id {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .map(|id| PlatformJob {
            id,
            input: None,
            progress_webhook: None,
            s3_config: None,
            unreadable: Some(why.clone()),
        })
        .collect();
    if jobs.is_empty() {
        return Err(not_json());
    }
    warn!(jobs = jobs.len(), error = %error, "job-take reply cannot be read; answering its jobs with an error");
    Ok(jobs)
}

/// The job's `progress_webhook`, top-level first, then in `input` (an object, or a JSON string as
/// the input may be). A value that is not a string is reported and ignored.
fn progress_webhook(job: &Value, input: Option<&Value>) -> Option<String> {
    let parsed;
    let input = match input {
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s).ok();
            parsed.as_ref()
        }
        other => other,
    };
    let found = job
        .get("progress_webhook")
        .or_else(|| input.and_then(|i| i.get("progress_webhook")));
    match found {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) if url.trim().is_empty() => None,
        Some(Value::String(url)) => Some(url.trim().to_owned()),
        Some(_) => {
            warn!("progress_webhook is not a string; the job runs without it");
            None
        }
    }
}

pub(super) fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn take_replies() {
        let jobs = parse_jobs(br#"{"id": "a", "input": {"x": 1}}"#).unwrap();
        assert_eq!(
            jobs,
            [PlatformJob {
                id: "a".into(),
                input: Some(json!({"x": 1})),
                progress_webhook: None,
                s3_config: None,
                unreadable: None,
            }]
        );
        let batch =
            parse_jobs(br#"[{"id": "a", "input": {}}, {"input": {}}, {"id": "c"}]"#).unwrap();
        assert_eq!(
            batch.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(batch[1].input, None);
        assert!(parse_jobs(b"garbage").is_err());
        assert!(parse_jobs(b"42").is_err());
    }

    #[test]
    fn unreadable_jobs_keep_their_id() {
        let deep = format!(
            r#"{{"id": "deep", "input": {{"x": {}1{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let jobs = parse_jobs(deep.as_bytes()).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].id.as_str(), &jobs[0].input), ("deep", &None));
        let why = jobs[0].unreadable.as_deref().unwrap();
        assert!(why.contains("nested more than 128 levels"), "{why}");

        let batch = br#"[{"id": "a", "input": {"s": "\udc80"}}, {"id": 7}, {"input": 1}]"#;
        let jobs = parse_jobs(batch).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a", "7"]);
        assert!(jobs[0]
            .unreadable
            .as_deref()
            .unwrap()
            .contains("cannot be read"));

        let mut raw = br#"{"id": "u", "input": {"image": ""#.to_vec();
        raw.extend_from_slice(&[0xff, 0xfe]);
        raw.extend_from_slice(br#""}}"#);
        assert_eq!(parse_jobs(&raw).unwrap()[0].id, "u");

        for garbage in [
            &b"{not json"[..],
            b"[[[[",
            br#"{"input": "\udc80"}"#,
            br#""\udc80""#,
        ] {
            assert!(parse_jobs(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn progress_webhook_top_level_or_in_input() {
        let hook = |body: &str| {
            parse_jobs(body.as_bytes()).unwrap()[0]
                .progress_webhook
                .clone()
        };
        let url = Some("https://example.com/hook".to_owned());
        assert_eq!(
            hook(r#"{"id": "a", "input": {}, "progress_webhook": "https://example.com/hook"}"#),
            url
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": " https://example.com/hook "}}"#),
            url
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": "{\"progress_webhook\": \"https://example.com/hook\"}"}"#),
            url
        );
        assert_eq!(
            hook(
                r#"{"id": "a", "progress_webhook": "https://example.com/hook", "input": {"progress_webhook": "https://other.example/"}}"#
            ),
            url,
            "the top-level one wins"
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": 7}}"#),
            None
        );
        assert_eq!(
            hook(r#"{"id": "a", "input": {"progress_webhook": ""}}"#),
            None
        );
        assert_eq!(hook(r#"{"id": "a"}"#), None);
    }
}
