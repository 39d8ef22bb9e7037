//! `input.models`: model files a job brings, `[{"url", "folder", "name", "sha256"?}]`. Each is
//! downloaded into ComfyUI's model folder before the prompt is queued (see
//! `job::model_store`). Checked here without touching the network: an `http(s)` URL or
//! `s3://bucket/key` (read from the job's bucket, as `s3://` inputs are), a folder
//! that is one plain name (`checkpoints`, `loras`, …), a file name that cannot leave it, and a
//! sha256 of 64 hex digits.

use serde_json::Value;

use super::file_name::check_image_name;
use crate::redact::display_url;

/// One model a job brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Where it is downloaded from (`http` or `https`).
    pub url: String,
    /// ComfyUI's model folder it goes in (`checkpoints`, `loras`, `vae`, …).
    pub folder: String,
    /// Its file name there, as the workflow names it.
    pub name: String,
    /// Its sha256 in lowercase hex, when the job gave one (the file is checked against it).
    pub sha256: Option<String>,
}

impl ModelSpec {
    /// Whether the model is an object of the job's bucket (`s3://bucket/key`).
    pub fn is_s3(&self) -> bool {
        self.s3_location().is_some()
    }

    /// The bucket and key of an `s3://bucket/key` model.
    pub fn s3_location(&self) -> Option<(&str, &str)> {
        s3_parts(&self.url)
    }
}

/// `s3://bucket/key` split, for any URL with that scheme.
fn s3_parts(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

/// The `models` list, or every problem with it (one line each).
pub(crate) fn parse_models(value: Option<&Value>) -> Result<Vec<ModelSpec>, Vec<String>> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(vec![
                "'models' must be a list of objects with 'url', 'folder' and 'name' keys".into(),
            ])
        }
    };
    let mut models = Vec::new();
    let mut problems = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let field = |key: &str| item.get(key).and_then(Value::as_str).map(str::trim);
        let (Some(url), Some(folder), Some(name)) = (field("url"), field("folder"), field("name"))
        else {
            problems.push(format!(
                "models[{i}] must be an object with 'url', 'folder' and 'name' strings"
            ));
            continue;
        };
        let who = format!("models[{i}] ({name})");
        let scheme_ok = match s3_parts(url) {
            Some((bucket, key)) => !bucket.is_empty() && !key.is_empty(),
            None => url::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()),
        };
        if !scheme_ok {
            problems.push(format!(
                "{who}: 'url' must be an http or https URL or s3://bucket/key, got {}",
                display_url(url)
            ));
        }
        let folder_ok = !folder.is_empty()
            && folder.len() <= 64
            && folder
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !folder_ok {
            problems.push(format!(
                "{who}: 'folder' must be one of ComfyUI's model folder names (letters, digits, '_' and '-'), got {folder:?}"
            ));
        }
        if let Err(e) = check_image_name(name) {
            problems.push(format!("{who}: invalid 'name': {e}"));
        }
        let sha256 = match item.get("sha256") {
            None | Some(Value::Null) => None,
            Some(Value::String(h)) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(_) => {
                problems.push(format!("{who}: 'sha256' must be 64 hexadecimal digits"));
                None
            }
        };
        models.push(ModelSpec {
            url: url.to_owned(),
            folder: folder.to_owned(),
            name: name.to_owned(),
            sha256,
        });
    }
    if problems.is_empty() {
        Ok(models)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn models_are_checked_without_the_network() {
        let ok = parse_models(Some(&json!([{
            "url": "https://example.com/m.safetensors?token=x", "folder": "loras",
            "name": "m.safetensors", "sha256": "AB".repeat(32)
        }])))
        .unwrap();
        assert_eq!(ok[0].sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(parse_models(None).unwrap(), []);
        let bad = parse_models(Some(&json!([
            {"url": "file:///etc/passwd", "folder": "../x", "name": "../m", "sha256": "12"},
            {"url": "https://e.com/m"}
        ])))
        .unwrap_err();
        assert_eq!(bad.len(), 5, "{bad:?}");
        assert!(bad[0].contains("http or https"), "{bad:?}");
        assert!(parse_models(Some(&json!("x"))).is_err());
    }
}
