//! Readable messages for ComfyUI's refusals and failures.

use crate::comfy::{ExecutionFailure, Interruption, NodeErrors, ObjectInfo, PromptRejection};

const MAX_DETAIL: usize = 400;

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_DETAIL {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX_DETAIL).collect::<String>())
    }
}

/// One line per reason: `Node 1 (EmptyImage): Value 0 smaller than min of 1: width`.
pub(crate) fn node_error_lines(node_errors: &[NodeErrors]) -> Vec<String> {
    let mut lines = Vec::new();
    for n in node_errors {
        let who = match &n.class_type {
            Some(c) => format!("Node {} ({c})", n.node_id),
            None => format!("Node {}", n.node_id),
        };
        for r in &n.errors {
            let message = if r.message.is_empty() {
                r.kind.as_str()
            } else {
                r.message.as_str()
            };
            let line = if r.details.is_empty() || r.details == r.message {
                format!("{who}: {message}")
            } else {
                format!("{who}: {message}: {}", clip(&r.details))
            };
            lines.push(line);
        }
        if n.errors.is_empty() {
            lines.push(format!("{who}: failed validation"));
        }
    }
    lines
}

pub(crate) fn model_label(input: &str) -> &'static str {
    match input {
        "ckpt_name" => "checkpoint models",
        "vae_name" => "VAE models",
        "lora_name" => "LoRA models",
        "unet_name" => "diffusion models",
        "control_net_name" => "ControlNet models",
        "upscale_model" | "model_name" => "models",
        n if n.starts_with("clip_name") => "CLIP / text encoder models",
        _ => "values",
    }
}

/// `(class_type, input)` pairs whose value was not in the allowed list and name a model (`*_name`).
pub(crate) fn model_hint_targets(r: &PromptRejection) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for n in &r.node_errors {
        let Some(class) = &n.class_type else { continue };
        for reason in &n.errors {
            let input = reason.input_name.clone().or_else(|| {
                reason
                    .details
                    .split(':')
                    .next()
                    .map(|s| s.trim().to_owned())
            });
            let Some(input) = input else { continue };
            let not_in_list =
                reason.kind == "value_not_in_list" || reason.details.contains("not in list");
            if not_in_list
                && (input.ends_with("_name") || input == "upscale_model")
                && !out.iter().any(|(c, i)| c == class && *i == input)
            {
                out.push((class.clone(), input));
            }
        }
    }
    out
}

/// The error and details for a refused workflow; `object_info` (when fetched) adds model hints.
pub(crate) fn rejection(
    r: &PromptRejection,
    object_info: Option<&ObjectInfo>,
) -> (String, Vec<String>) {
    let lines = node_error_lines(&r.node_errors);
    let mut hints = Vec::new();
    if let Some(info) = object_info {
        for (class, input) in model_hint_targets(r) {
            let label = model_label(&input);
            match info.choices(&class, &input) {
                Some(list) if !list.is_empty() => hints.push(format!(
                    "Available {label} for {class}.{input}: {}",
                    clip(&list.join(", "))
                )),
                _ => hints.push(format!(
                    "No {label} appear to be available for {class}.{input}. Please check your model installation (the image's models/ folder or the network volume)."
                )),
            }
        }
    }
    let headline = match r.error_type.as_deref() {
        Some("prompt_outputs_failed_validation") | Some("invalid_prompt") | None => {
            "Workflow validation failed"
        }
        Some("prompt_no_outputs") => "Workflow validation failed",
        Some(_) => "ComfyUI rejected the workflow",
    };
    if lines.is_empty() {
        let mut text = r.message.trim().to_owned();
        if text.is_empty() {
            text = clip(&r.raw);
        }
        if !r.details.trim().is_empty() && !text.contains(r.details.trim()) {
            text = format!("{text} ({})", r.details.trim());
        }
        if r.error_type.as_deref() == Some("prompt_no_outputs") {
            text.push_str(": the workflow needs at least one output node, such as SaveImage");
        }
        let message = format!("{headline}: {text}");
        return (message.clone(), vec![message]);
    }
    let mut message = format!(
        "{headline}:\n{}",
        lines
            .iter()
            .map(|l| format!("• {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if !hints.is_empty() {
        message.push_str("\n\n");
        message.push_str(&hints.join("\n"));
    }
    let mut details = lines;
    details.extend(hints);
    (message, details)
}

/// worker-comfyui's line for a node failure.
pub(crate) fn execution_error(f: &ExecutionFailure) -> String {
    format!(
        "Workflow execution error: Node Type: {}, Node ID: {}, Message: {}",
        f.node_type, f.node_id, f.message
    )
}

/// The line for an interrupt.
pub(crate) fn interrupted(i: &Interruption, cancelled: bool) -> String {
    let at = if i.node_id.is_empty() {
        String::new()
    } else {
        format!(" at node {} ({})", i.node_id, i.node_type)
    };
    if cancelled {
        format!("Job cancelled: the ComfyUI prompt was interrupted{at}")
    } else {
        format!(
            "Workflow execution interrupted{at}: ComfyUI received an interrupt (POST /interrupt)"
        )
    }
}

/// Lines for outputs ComfyUI skipped because their inputs failed validation.
pub(crate) fn dropped_outputs(node_errors: &[NodeErrors]) -> Vec<String> {
    node_error_lines(node_errors)
        .into_iter()
        .map(|l| format!("Output skipped by ComfyUI validation: {l}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::ValidationReason;
    use serde_json::json;

    fn ckpt_rejection() -> PromptRejection {
        PromptRejection {
            error_type: Some("prompt_outputs_failed_validation".into()),
            message: "Prompt outputs failed validation".into(),
            details: String::new(),
            node_errors: vec![NodeErrors {
                node_id: "4".into(),
                class_type: Some("CheckpointLoaderSimple".into()),
                errors: vec![ValidationReason {
                    kind: "value_not_in_list".into(),
                    message: "Value not in list".into(),
                    details: "ckpt_name: 'x.safetensors' not in ['a.safetensors']".into(),
                    input_name: Some("ckpt_name".into()),
                }],
                dependent_outputs: vec!["9".into()],
            }],
            raw: String::new(),
        }
    }

    #[test]
    fn lists_nodes_and_available_models() {
        let info = ObjectInfo::from_value(
            json!({"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}}}}),
        );
        let (msg, details) = rejection(&ckpt_rejection(), Some(&info));
        assert!(msg.starts_with("Workflow validation failed:\n• Node 4 (CheckpointLoaderSimple): Value not in list: ckpt_name: 'x.safetensors'"), "{msg}");
        assert!(msg.ends_with("Available checkpoint models for CheckpointLoaderSimple.ckpt_name: a.safetensors, b.safetensors"), "{msg}");
        assert_eq!(details.len(), 2);
        let empty = ObjectInfo::from_value(
            json!({"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [[], {}]}}}}),
        );
        let (msg, _) = rejection(&ckpt_rejection(), Some(&empty));
        assert!(
            msg.contains("No checkpoint models appear to be available"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_prompt_names_the_node() {
        let r = PromptRejection {
            error_type: Some("invalid_prompt".into()),
            message: "Cannot execute because node NoSuchNodeClass does not exist.".into(),
            details: "Node ID '#2'".into(),
            node_errors: vec![],
            raw: String::new(),
        };
        let (msg, _) = rejection(&r, None);
        assert_eq!(msg, "Workflow validation failed: Cannot execute because node NoSuchNodeClass does not exist. (Node ID '#2')");
    }
}
