//! `/object_info`: every node class's inputs and outputs.

use serde_json::{Map, Value};

/// `/object_info`: node class → definition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectInfo {
    classes: Map<String, Value>,
}

impl ObjectInfo {
    /// Wraps a parsed `/object_info` reply.
    pub fn from_value(v: Value) -> ObjectInfo {
        ObjectInfo {
            classes: match v {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    /// The allowed values of a combo input (V1 `[[..], {..}]` or V3 `["COMBO", {"options": [..]}]`).
    pub fn choices(&self, class_type: &str, input: &str) -> Option<Vec<String>> {
        let inputs = self.classes.get(class_type)?.get("input")?;
        let spec = ["required", "optional"]
            .iter()
            .find_map(|section| inputs.get(*section)?.get(input))?;
        let list = match spec.get(0)? {
            Value::Array(list) => list,
            Value::String(s) if s == "COMBO" => spec.get(1)?.get("options")?.as_array()?,
            _ => return None,
        };
        Some(
            list.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        )
    }

    /// Whether the class exists.
    pub fn has_class(&self, class_type: &str) -> bool {
        self.classes.contains_key(class_type)
    }

    /// A class's definition (`input`, `input_order`, `output`, `display_name`, ...), when it is
    /// an object.
    pub fn class(&self, class_type: &str) -> Option<&Map<String, Value>> {
        self.classes.get(class_type)?.as_object()
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether no class is known.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn combo_choices_in_both_formats() {
        let info = ObjectInfo::from_value(json!({
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}},
            "SaveVideo": {"input": {"required": {"format": ["COMBO", {"options": ["auto", "mp4"]}]}}}
        }));
        assert_eq!(
            info.choices("CheckpointLoaderSimple", "ckpt_name").unwrap(),
            ["a.safetensors", "b.safetensors"]
        );
        assert_eq!(
            info.choices("SaveVideo", "format").unwrap(),
            ["auto", "mp4"]
        );
        assert_eq!(info.choices("SaveVideo", "nope"), None);
    }
}
