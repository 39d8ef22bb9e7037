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
    pub unreadable: Option<Unreadable>,
}

/// Why a job whose id could be read cannot be run; its text is the job's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// Nested deeper than serde_json's recursion limit.
    #[error("The job's JSON is nested more than 128 levels deep, so it was not run ({0})")]
    TooDeep(String),
    /// Invalid UTF-8 or a lone surrogate in a string, or a number out of range.
    #[error("The job's JSON cannot be read, so it was not run ({0})")]
    Invalid(String),
    /// An id that cannot be sent in an HTTP header (it holds a control character).
    #[error("The job's id cannot be sent in an HTTP header (it holds a control character or a byte HTTP does not allow there), so the job was not run")]
    Id,
}

/// Why a job-take reply gave no job (it is ignored and the next job-take follows).
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// Not JSON, and not even the shape of a job whose id can be read.
    #[error("job-take reply is not JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but neither a job nor a batch of jobs.
    #[error("job-take reply is not a job: {0}")]
    NotAJob(String),
}

impl PlatformJob {
    /// A job that is only an id, to be answered with `why`.
    fn unreadable(id: String, why: Unreadable) -> PlatformJob {
        PlatformJob {
            id,
            input: None,
            progress_webhook: None,
            s3_config: None,
            unreadable: Some(why),
        }
    }

    /// The job as the runner takes it.
    pub fn request(&self) -> JobRequest {
        JobRequest::new(self.id.clone(), self.input.clone())
            .with_s3_config(self.s3_config.clone())
            .with_progress_webhook(self.progress_webhook.clone())
    }
}

/// Parses a job-take reply body.
pub(crate) fn parse_jobs(body: &[u8]) -> Result<Vec<PlatformJob>, ReplyError> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return unreadable_jobs(body, e),
    };
    let items = match value {
        Value::Array(items) => items,
        Value::Object(_) => vec![value],
        other => return Err(ReplyError::NotAJob(short(&other.to_string()))),
    };
    // Numbers as the platform wrote them: `1e3` or a 25-digit id is not re-rendered as a float
    // (when every item is a job object, so the text's jobs line up with the items).
    let written = ids_in_text(body);
    let written = if written.len() == items.len() {
        written
    } else {
        Vec::new()
    };
    let mut jobs = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let id = match item.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => written
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| n.to_string()),
            _ => {
                // The job may carry secrets (`comfy_org_api_key`, ...): logged redacted.
                let shown = crate::secret::redact_json(&item).to_string();
                warn!(job = %short(&shown), "Job has missing field(s): id or input. Skipped");
                continue;
            }
        };
        if !usable_in_header(&id) {
            jobs.push(PlatformJob::unreadable(id, Unreadable::Id));
            continue;
        }
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
fn unreadable_jobs(body: &[u8], error: serde_json::Error) -> Result<Vec<PlatformJob>, ReplyError> {
    let why = if hit_depth_limit(body, &error) {
        Unreadable::TooDeep(error.to_string())
    } else {
        Unreadable::Invalid(error.to_string())
    };
    let jobs: Vec<PlatformJob> = ids_in_text(body)
        .into_iter()
        .flatten()
        .filter(|id| !id.is_empty())
        .map(|id| PlatformJob::unreadable(id, why.clone()))
        .collect();
    if jobs.is_empty() {
        return Err(ReplyError::NotJson(error));
    }
    warn!(jobs = jobs.len(), error = %error, "job-take reply cannot be read; answering its jobs with an error");
    Ok(jobs)
}

/// Whether an id can be sent as it is in the `X-Request-ID` header of its result post (no
/// control characters, no bytes outside visible ASCII and spaces... as `http` allows).
fn usable_in_header(id: &str) -> bool {
    reqwest::header::HeaderValue::from_str(id).is_ok()
}

/// Each job's `id` in a job-take reply, read from the text itself, so a reply serde_json
/// refuses (a `NaN`, a byte-order mark, bytes after the job, a second job object, a body cut
/// short after the id, nesting past the limit) still names the jobs to answer: the reply's
/// first value (a job object, or an array of them), and in each job object the value of its
/// own top-level `"id"` key, a string (unescaped) or a number exactly as written. `None` for a
/// job without a readable id.
fn ids_in_text(body: &[u8]) -> Vec<Option<String>> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let (job_depth, mut i) = match start.map(|s| (body[s], s)) {
        Some((b'{', s)) => (1, s),
        Some((b'[', s)) => (2, s),
        _ => return Vec::new(),
    };
    let mut ids: Vec<Option<String>> = Vec::new();
    let mut depth = 0usize;
    // At the job's own depth: whether the next string is a key.
    let mut expect_key = false;
    let mut last_key_is_id = false;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i);
                let token = &body[i..end.min(body.len())];
                if depth == job_depth {
                    if expect_key {
                        last_key_is_id = token == b"\"id\"";
                        expect_key = false;
                    } else if last_key_is_id {
                        if let (Some(slot), Ok(text)) = (ids.last_mut(), std::str::from_utf8(token))
                        {
                            *slot = serde_json::from_str::<String>(text).ok();
                        }
                        last_key_is_id = false;
                    }
                }
                i = end;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == job_depth && body[i] == b'{' {
                    ids.push(None);
                    expect_key = true;
                }
            }
            b'}' | b']' => {
                if depth == job_depth && job_depth == 1 {
                    break;
                }
                if depth == 1 && job_depth == 2 && body[i] == b']' {
                    break;
                }
                depth = depth.saturating_sub(1);
            }
            b',' if depth == job_depth => {
                expect_key = true;
                last_key_is_id = false;
            }
            b'-' | b'0'..=b'9' if depth == job_depth && last_key_is_id => {
                let end = body[i..]
                    .iter()
                    .position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .map_or(body.len(), |n| i + n);
                if let (Some(slot), Ok(text)) = (ids.last_mut(), std::str::from_utf8(&body[i..end]))
                {
                    *slot = Some(text.to_owned());
                }
                last_key_is_id = false;
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    ids
}

/// The offset just after the string that starts at `start` (a `"`), escapes skipped; the end of
/// `body` when it is cut short.
fn string_end(body: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    body.len()
}

/// The nesting serde_json refuses: its recursion limit lets it open 127 nested arrays or
/// objects, not a 128th.
const SERDE_JSON_DEPTH_LIMIT: usize = 128;

/// Whether serde_json refused `body` for its recursion limit. serde_json has no public error
/// code, so this is told from where the error is, not from its message: the limit is reported
/// at the bracket that opens the 128th level, and in a reply whose structure is valid (it was
/// read shallowly) no other error can be reported there: the others are inside a string or a
/// number.
fn hit_depth_limit(body: &[u8], error: &serde_json::Error) -> bool {
    match (
        too_deep_at(body),
        offset_of(body, error.line(), error.column()),
    ) {
        (Some(limit), Some(at)) => limit == at,
        _ => false,
    }
}

/// The offset of the bracket that opens the 128th nested level (counted outside strings), if
/// `body` has one.
fn too_deep_at(body: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == SERDE_JSON_DEPTH_LIMIT {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The offset of the byte at serde_json's `line` and `column` (both from 1; a byte's column is
/// its offset in the line plus one).
fn offset_of(body: &[u8], line: usize, column: usize) -> Option<usize> {
    let line_start = match line.checked_sub(2) {
        None => 0,
        Some(newlines) => {
            body.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .nth(newlines)?
                .0
                + 1
        }
    };
    (line_start + column).checked_sub(1)
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
        let why = jobs[0].unreadable.as_ref().unwrap();
        assert!(matches!(why, Unreadable::TooDeep(_)), "{why:?}");
        assert_eq!(
            why.to_string(),
            "The job's JSON is nested more than 128 levels deep, so it was not run (recursion limit exceeded at line 1 column 156)"
        );

        let batch = br#"[{"id": "a", "input": {"s": "\udc80"}}, {"id": 7}, {"input": 1}]"#;
        let jobs = parse_jobs(batch).unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a", "7"]);
        let why = jobs[0].unreadable.as_ref().unwrap();
        assert!(matches!(why, Unreadable::Invalid(_)), "{why:?}");
        assert_eq!(
            why.to_string(),
            "The job's JSON cannot be read, so it was not run (lone leading surrogate in hex escape at line 1 column 35)"
        );

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

    /// The recursion limit is told from where serde_json reports it; its message (read here
    /// only) says the same, wherever the deep part is and whatever comes before it.
    #[test]
    fn the_depth_limit_is_told_without_reading_the_message() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let cases = [
            // The job's object is a level of its own: 1 + 127 levels is too deep.
            (format!(r#"{{"id": "a", "input": {}}}"#, nested(127)), true),
            (
                format!("{{\n\"id\": \"a\",\r\n \"input\":\n{}}}", nested(200)),
                true,
            ),
            // Brackets and escaped quotes in strings are not levels.
            (
                format!(
                    r#"{{"id": "[[{{", "s": "\"[[[", "input": {}}}"#,
                    nested(127)
                ),
                true,
            ),
            // An invalid string before the deep part is what serde_json reports.
            (
                format!(r#"{{"id": "a", "s": "\udc80", "input": {}}}"#, nested(300)),
                false,
            ),
            (
                format!(
                    r#"[{{"id": "a", "input": {}}}, {{"id": "\udc80"}}]"#,
                    nested(126)
                ),
                true,
            ),
        ];
        for (body, deep) in cases {
            let error = serde_json::from_slice::<Value>(body.as_bytes()).unwrap_err();
            let said = error.to_string().starts_with("recursion limit exceeded");
            assert_eq!(said, deep, "{error}");
            assert_eq!(hit_depth_limit(body.as_bytes(), &error), deep, "{error}");
        }
        let ok = format!(r#"{{"id": "a", "input": {}}}"#, nested(126));
        assert!(serde_json::from_str::<Value>(&ok).is_ok());
        assert_eq!(offset_of(b"ab\ncd\nef", 3, 2), Some(7));
        assert_eq!(offset_of(b"ab", 1, 1), Some(0));
        assert_eq!(offset_of(b"ab", 2, 1), None);
    }

    #[test]
    fn reply_errors() {
        let e = parse_jobs(b"42").unwrap_err();
        assert!(matches!(e, ReplyError::NotAJob(_)), "{e:?}");
        assert_eq!(e.to_string(), "job-take reply is not a job: 42");
        let e = parse_jobs(b"{not json").unwrap_err();
        assert!(matches!(e, ReplyError::NotJson(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "job-take reply is not JSON: key must be a string at line 1 column 2"
        );
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
