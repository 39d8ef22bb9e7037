//! ComfyUI's refusal of a prompt (`POST /prompt` answering 400): the error, and each node's
//! validation reasons.

use serde_json::Value;

/// ComfyUI's refusal of a prompt (HTTP 400).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRejection {
    /// `error.type`, e.g. `prompt_outputs_failed_validation`, `invalid_prompt`.
    pub error_type: Option<String>,
    /// `error.message`.
    pub message: String,
    /// `error.details`.
    pub details: String,
    /// Per-node reasons.
    pub node_errors: Vec<NodeErrors>,
    /// The body as received, for the rare case nothing above explains it.
    pub raw: String,
}

/// `node_errors[id]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeErrors {
    /// Node id.
    pub node_id: String,
    /// Its class type.
    pub class_type: Option<String>,
    /// The reasons.
    pub errors: Vec<ValidationReason>,
    /// Output nodes that depend on it.
    pub dependent_outputs: Vec<String>,
}

/// One validation reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReason {
    /// e.g. `value_not_in_list`.
    pub kind: String,
    /// Human message.
    pub message: String,
    /// Details (input name, values).
    pub details: String,
    /// `extra_info.input_name`.
    pub input_name: Option<String>,
}

impl PromptRejection {
    /// One line for logs and error chains.
    pub fn summary(&self) -> String {
        let nodes: Vec<&str> = self
            .node_errors
            .iter()
            .map(|n| n.node_id.as_str())
            .collect();
        if nodes.is_empty() {
            format!("{} {}", self.message, self.details)
                .trim()
                .to_string()
        } else {
            format!("{} (nodes {})", self.message, nodes.join(", "))
        }
    }

    pub(crate) fn parse(body: &str) -> Option<PromptRejection> {
        let v: Value = serde_json::from_str(body).ok()?;
        let obj = v.as_object()?;
        let err = obj.get("error")?;
        let (error_type, message, details) = match err {
            Value::Object(e) => (
                e.get("type").and_then(Value::as_str).map(str::to_owned),
                e.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                e.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            ),
            Value::String(s) => (None, s.clone(), String::new()),
            other => (None, other.to_string(), String::new()),
        };
        Some(PromptRejection {
            error_type,
            message,
            details,
            node_errors: parse_node_errors(obj.get("node_errors")),
            raw: body.to_owned(),
        })
    }
}

impl NodeErrors {
    /// The entry as ComfyUI writes it under `node_errors[id]`: `{"errors": [{"type",
    /// "message", "details", "extra_info": {"input_name"}}], "dependent_outputs", "class_type"}`.
    pub fn to_json(&self) -> Value {
        let errors: Vec<Value> = self
            .errors
            .iter()
            .map(|r| {
                let mut extra = serde_json::Map::new();
                if let Some(name) = &r.input_name {
                    extra.insert("input_name".into(), Value::String(name.clone()));
                }
                serde_json::json!({
                    "type": r.kind,
                    "message": r.message,
                    "details": r.details,
                    "extra_info": extra,
                })
            })
            .collect();
        serde_json::json!({
            "errors": errors,
            "dependent_outputs": self.dependent_outputs,
            "class_type": self.class_type,
        })
    }

    /// The same entry with `f` applied to its texts (the secret scrubber).
    pub fn map_text(self, f: &dyn Fn(&str) -> String) -> NodeErrors {
        NodeErrors {
            errors: self
                .errors
                .into_iter()
                .map(|r| ValidationReason {
                    kind: r.kind,
                    message: f(&r.message),
                    details: f(&r.details),
                    input_name: r.input_name,
                })
                .collect(),
            ..self
        }
    }
}

pub(crate) fn parse_node_errors(v: Option<&Value>) -> Vec<NodeErrors> {
    let Some(Value::Object(map)) = v else {
        return Vec::new();
    };
    map.iter()
        .map(|(id, entry)| NodeErrors {
            node_id: id.clone(),
            class_type: entry
                .get("class_type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            errors: entry
                .get("errors")
                .and_then(Value::as_array)
                .map(|list| list.iter().map(parse_reason).collect())
                .unwrap_or_default(),
            dependent_outputs: entry
                .get("dependent_outputs")
                .and_then(Value::as_array)
                .map(|l| l.iter().map(value_to_id).collect())
                .unwrap_or_default(),
        })
        .collect()
}

fn parse_reason(v: &Value) -> ValidationReason {
    let text = |k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    ValidationReason {
        kind: text("type"),
        message: text("message"),
        details: text("details"),
        input_name: v
            .get("extra_info")
            .and_then(|e| e.get("input_name"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

fn value_to_id(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_recorded_validation_failure() {
        let body = json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width",
                "extra_info": {"input_name": "width"}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}});
        let r = PromptRejection::parse(&body.to_string()).unwrap();
        assert_eq!(
            r.error_type.as_deref(),
            Some("prompt_outputs_failed_validation")
        );
        assert_eq!(r.node_errors[0].node_id, "1");
        assert_eq!(
            r.node_errors[0].errors[0].input_name.as_deref(),
            Some("width")
        );
        assert_eq!(r.node_errors[0].dependent_outputs, ["3"]);
        assert!(PromptRejection::parse("not json").is_none());
        let s = PromptRejection::parse(r#"{"error":"boom"}"#).unwrap();
        assert_eq!(s.message, "boom");
    }
}
