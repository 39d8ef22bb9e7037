//! Model names checked before a prompt is queued: every literal input that names a model file
//! (`ckpt_name: "x.safetensors"`, a LoRA, a VAE, …) must be one of the values ComfyUI's
//! `/object_info` lists for that input. A missing model fails the job at once, naming the node,
//! the input and the closest names ComfyUI has, instead of after uploads and a queue round trip.
//! The engine's kept `/object_info` is fetched again once before a model is called missing (it
//! may have been installed since); a ComfyUI whose `/object_info` does not answer is left to
//! validate the prompt itself.

use tracing::{debug, info};

use super::convert::ObjectInfoCache;
use super::failure::{JobFailure, Report};
use crate::comfy::{ComfyClient, NodeErrors, ObjectInfo, ValidationReason, Workflow};

/// File extensions of model weights.
const MODEL_EXTENSIONS: [&str; 10] = [
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".sft",
    ".onnx",
    ".pt2",
    ".pkl",
];

/// Closest names shown for a missing model.
const CLOSEST: usize = 3;

/// A literal input value that names a model file.
#[derive(Debug, Clone, PartialEq)]
struct ModelInput {
    node: String,
    class_type: String,
    input: String,
    value: String,
}

/// Whether `value` looks like a model file name.
fn is_model_file(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

fn model_inputs(workflow: &Workflow) -> Vec<ModelInput> {
    let mut out = Vec::new();
    for node in workflow.nodes() {
        let Some(class_type) = node.class_type else {
            continue;
        };
        for (input, value) in workflow.literal_strings(node.id) {
            if is_model_file(value) {
                out.push(ModelInput {
                    node: node.id.to_owned(),
                    class_type: class_type.to_owned(),
                    input: input.to_owned(),
                    value: value.to_owned(),
                });
            }
        }
    }
    out
}

/// Levenshtein distance over characters, case-insensitive.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The names of `choices` closest to `wanted`, nearest first.
fn closest<'a>(wanted: &str, choices: &'a [String]) -> Vec<&'a str> {
    let mut ranked: Vec<(usize, &str)> = choices
        .iter()
        .map(|c| (distance(wanted, c), c.as_str()))
        .collect();
    ranked.sort();
    ranked.into_iter().take(CLOSEST).map(|(_, c)| c).collect()
}

/// The inputs whose model `info` does not list (inputs that are not lists are not judged).
fn missing<'a>(inputs: &'a [ModelInput], info: &ObjectInfo) -> Vec<(&'a ModelInput, Vec<String>)> {
    inputs
        .iter()
        .filter_map(|m| {
            let choices = info.choices(&m.class_type, &m.input)?;
            (!choices.contains(&m.value)).then_some((m, choices))
        })
        .collect()
}

/// Fails the job when an input names a model ComfyUI does not have. `refresh` fetches
/// `/object_info` anew first (models were just installed).
pub(crate) async fn check(
    comfy: &ComfyClient,
    cache: &ObjectInfoCache,
    workflow: &Workflow,
    refresh: bool,
) -> Result<(), JobFailure> {
    let inputs = model_inputs(workflow);
    if inputs.is_empty() {
        return Ok(());
    }
    let Ok((info, fresh)) = cache.get(comfy, refresh).await else {
        debug!("no /object_info to check model names against; ComfyUI will validate them");
        return Ok(());
    };
    let mut absent = missing(&inputs, &info);
    let refreshed;
    if !absent.is_empty() && !fresh {
        let Ok((info, _)) = cache.get(comfy, true).await else {
            return Ok(());
        };
        refreshed = info;
        absent = missing(&inputs, &refreshed);
    }
    if absent.is_empty() {
        return Ok(());
    }
    let mut lines = Vec::new();
    for (m, choices) in &absent {
        let near = closest(&m.value, choices);
        let hint = if near.is_empty() {
            format!("ComfyUI lists no models for {}.{}", m.class_type, m.input)
        } else {
            format!("closest: {}", near.join(", "))
        };
        lines.push(format!(
            "Node {} ({}): model not found: {}: '{}' is not among ComfyUI's models ({hint})",
            m.node, m.class_type, m.input, m.value
        ));
    }
    let mut details = lines.clone();
    for (m, choices) in &absent {
        if !choices.is_empty() {
            details.push(format!(
                "Available {} for {}.{}: {}",
                super::report::model_label(&m.input),
                m.class_type,
                m.input,
                choices.join(", ")
            ));
        }
    }
    info!(
        missing = absent.len(),
        "workflow names models ComfyUI does not have"
    );
    let message = format!(
        "Workflow validation failed:\n{}",
        details
            .iter()
            .map(|l| format!("• {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // As ComfyUI's own validation reports them (the Comfy API v2 answers 422 with these).
    let nodes = absent
        .iter()
        .map(|(m, _)| NodeErrors {
            node_id: m.node.clone(),
            class_type: Some(m.class_type.clone()),
            errors: vec![ValidationReason {
                kind: "value_not_in_list".into(),
                message: "Value not in list".into(),
                details: format!("{}: '{}' not in list", m.input, m.value),
                input_name: Some(m.input.clone()),
            }],
            dependent_outputs: Vec::new(),
        })
        .collect();
    Err(JobFailure::Rejected(
        Report::with_details(message, details),
        nodes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_models_are_found_with_their_closest_names() {
        let wf = Workflow::from_value(json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.1.safetensors"}},
            "5": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors", "model": ["4", 0]}},
            "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x.ckpt.out"}},
        }))
        .unwrap();
        let inputs = model_inputs(&wf);
        assert_eq!(inputs.len(), 2, "{inputs:?}");
        let info = ObjectInfo::from_value(json!({
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["flux1-dev-fp8.safetensors", "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"], {}]}}},
            "LoraLoader": {"input": {"required": {"lora_name": [["detail.safetensors"], {}]}}}
        }));
        let absent = missing(&inputs, &info);
        assert_eq!(absent.len(), 1);
        assert_eq!(
            closest(&absent[0].0.value, &absent[0].1),
            [
                "sd_xl_base_1.0.safetensors",
                "sd_xl_refiner_1.0.safetensors",
                "flux1-dev-fp8.safetensors"
            ]
        );
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
