//! The job input schema of worker-comfyui: `workflow`, `images: [{name, image}]`,
//! `comfy_org_api_key`, with the same validation messages, plus checks it lacks
//! (workflow shape, image names that could escape ComfyUI's input folder, bad base64).

use bytes::Bytes;
use serde_json::Value;

use super::codec;
use super::output::JobOutput;
use crate::comfy::workflow::json_type;
use crate::comfy::Workflow;
use crate::config::Secret;

/// A validated job input.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// The API-format workflow.
    pub workflow: Workflow,
    /// Images to upload before queueing.
    pub images: Vec<InputImage>,
    /// Per-job Comfy.org API key (wins over `COMFY_ORG_API_KEY`).
    pub comfy_org_api_key: Option<Secret>,
}

/// One decoded input image.
#[derive(Debug, Clone)]
pub struct InputImage {
    /// File name in ComfyUI's input folder.
    pub name: String,
    /// Decoded bytes.
    pub data: Bytes,
}

const IMAGES_SHAPE: &str = "'images' must be a list of objects with 'name' and 'image' keys";

/// Checks a file name for ComfyUI's input folder; returns why it is refused.
pub fn check_image_name(name: &str) -> Result<(), String> {
    let why = if name.trim().is_empty() {
        Some("it is empty")
    } else if name.contains('/') || name.contains('\\') {
        Some("it contains a path separator ('/' or '\\')")
    } else if name == "." || name.contains("..") {
        Some("it contains '..'")
    } else if name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "Invalid image name {:?}: {why}; use a plain file name such as \"input.png\"",
            truncate_chars(name, 80)
        )),
        None => Ok(()),
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// Parses and validates `job["input"]`.
pub fn parse_input(input: Option<&Value>) -> Result<JobInput, JobOutput> {
    let parsed;
    let input = match input {
        None | Some(Value::Null) => return Err(JobOutput::error("Please provide input")),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|_| JobOutput::error("Invalid JSON format in input"))?;
            &parsed
        }
        Some(v) => v,
    };
    let obj = match input {
        Value::Object(o) => o,
        Value::Null => return Err(JobOutput::error("Please provide input")),
        other => {
            return Err(JobOutput::error(format!(
                "Invalid input: 'input' must be a JSON object with a 'workflow' key, got {}",
                json_type(other)
            )))
        }
    };
    let workflow = match obj.get("workflow") {
        None | Some(Value::Null) => return Err(JobOutput::error("Missing 'workflow' parameter")),
        Some(w) => w.clone(),
    };
    let raw_images: Vec<(&str, &str)> = match obj.get("images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|item| {
                let name = item.get("name").and_then(Value::as_str);
                let image = item.get("image").and_then(Value::as_str);
                match (item.is_object(), name, image) {
                    (true, Some(n), Some(i)) => Ok((n, i)),
                    _ => Err(JobOutput::error(IMAGES_SHAPE)),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(JobOutput::error(IMAGES_SHAPE)),
    };
    let comfy_org_api_key = match obj.get("comfy_org_api_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(Secret::new(s.trim())),
        Some(other) => {
            return Err(JobOutput::error(format!(
                "'comfy_org_api_key' must be a string, got {}",
                json_type(other)
            )))
        }
    };
    let workflow =
        Workflow::from_value(workflow).map_err(|e| JobOutput::error(capitalise(&e.to_string())))?;
    for (name, _) in &raw_images {
        check_image_name(name).map_err(JobOutput::error)?;
    }
    let mut images = Vec::with_capacity(raw_images.len());
    let mut problems = Vec::new();
    for (name, text) in raw_images {
        match codec::decode_input(text) {
            Ok(data) if data.is_empty() => problems.push(format!(
                "Error decoding base64 for {name}: the image is empty"
            )),
            Ok(data) => images.push(InputImage {
                name: name.to_owned(),
                data: Bytes::from(data),
            }),
            Err(e) => problems.push(format!("Error decoding base64 for {name}: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(JobOutput::error_with_details(
            "Failed to upload one or more input images",
            problems,
        ));
    }
    Ok(JobInput {
        workflow,
        images,
        comfy_org_api_key,
    })
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() => c.to_ascii_uppercase().to_string() + chars.as_str(),
        _ => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(input: Option<Value>) -> Value {
        match parse_input(input.as_ref()) {
            Ok(_) => panic!("accepted {input:?}"),
            Err(out) => out.to_json(),
        }
    }

    const WF: &str = r#"{"1": {"class_type": "EmptyImage", "inputs": {}}}"#;

    #[test]
    fn worker_comfyui_messages() {
        assert_eq!(err(None), json!({"error": "Please provide input"}));
        assert_eq!(
            err(Some(Value::Null)),
            json!({"error": "Please provide input"})
        );
        assert_eq!(
            err(Some(json!("{not json"))),
            json!({"error": "Invalid JSON format in input"})
        );
        assert_eq!(
            err(Some(json!({}))),
            json!({"error": "Missing 'workflow' parameter"})
        );
        assert_eq!(
            err(Some(json!({"workflow": null}))),
            json!({"error": "Missing 'workflow' parameter"})
        );
        let wf: Value = serde_json::from_str(WF).unwrap();
        for images in [
            json!("x"),
            json!([1]),
            json!([{"name": "a.png"}]),
            json!([{"name": 1, "image": "aGk="}]),
        ] {
            assert_eq!(
                err(Some(json!({"workflow": wf, "images": images}))),
                json!({"error": IMAGES_SHAPE})
            );
        }
    }

    #[test]
    fn string_input_is_parsed() {
        let input = json!(format!("{{\"workflow\": {WF}}}"));
        assert!(parse_input(Some(&input)).is_ok());
    }

    #[test]
    fn clear_errors_for_what_worker_comfyui_lets_through() {
        let e = err(Some(json!({"workflow": "text"})));
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{e}"
        );
        let e = err(Some(json!({"workflow": {"nodes": [], "links": []}})));
        assert!(
            e["error"].as_str().unwrap().contains("Save (API Format)"),
            "{e}"
        );
        let e = err(Some(json!([1, 2])));
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{e}"
        );
        let wf: Value = serde_json::from_str(WF).unwrap();
        for name in ["../x.png", "a/b.png", "..", "", "a\\b.png", "x\u{0}.png"] {
            let e = err(Some(
                json!({"workflow": wf, "images": [{"name": name, "image": "aGk="}]}),
            ));
            assert!(
                e["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("Invalid image name"),
                "{name}: {e}"
            );
        }
        let e = err(Some(
            json!({"workflow": wf, "images": [{"name": "a.png", "image": "!!!"}, {"name": "b.png", "image": ""}]}),
        ));
        assert_eq!(e["error"], "Failed to upload one or more input images");
        let details = e["details"].as_array().unwrap();
        assert!(details[0]
            .as_str()
            .unwrap()
            .starts_with("Error decoding base64 for a.png"));
        assert!(details[1].as_str().unwrap().contains("b.png"));
        let e = err(Some(json!({"workflow": wf, "comfy_org_api_key": 5})));
        assert!(e["error"].as_str().unwrap().contains("comfy_org_api_key"));
    }

    #[test]
    fn accepts_data_uris_and_keeps_the_key_secret() {
        let wf: Value = serde_json::from_str(WF).unwrap();
        let input = json!({"workflow": wf, "images": [{"name": "in.png", "image": "data:image/png;base64,aGk="}], "comfy_org_api_key": "k-123"});
        let parsed = parse_input(Some(&input)).unwrap();
        assert_eq!(&parsed.images[0].data[..], b"hi");
        assert!(!format!("{parsed:?}").contains("k-123"));
    }
}
