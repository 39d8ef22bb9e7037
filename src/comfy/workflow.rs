//! An API-format workflow: `{node_id: {"class_type", "inputs", "_meta"?}}`.
//!
//! The graph itself is validated by ComfyUI; this type only rejects shapes that ComfyUI
//! answers with a bare HTTP 500 (non-object nodes or inputs). A job's workflow may also be a
//! UI-format export (the UI's plain "Save"): [`WorkflowInput`] tells the two apart, and the
//! engine converts the UI format with `/object_info` ([`super::ui_workflow`]).

use serde_json::{Map, Value};

use super::ui_workflow::{self, ConvertError, UiWorkflow};
use crate::json_type::json_type;

/// A workflow ready to be queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    graph: Map<String, Value>,
}

/// One node of a workflow, as far as progress reporting needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowNode<'a> {
    /// Node id (opaque string).
    pub id: &'a str,
    /// Class type, when the node has a string `class_type`.
    pub class_type: Option<&'a str>,
    /// `_meta.title`, when present.
    pub title: Option<&'a str>,
    /// A literal integer `steps` input (samplers), when present.
    pub steps: Option<u64>,
}

/// Why a value is not a usable API-format workflow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkflowError {
    /// The workflow is not a JSON object.
    #[error("'workflow' must be a JSON object in ComfyUI API format (node id -> {{\"class_type\", \"inputs\"}}), got {0}")]
    NotAnObject(&'static str),
    /// The object has no nodes.
    #[error("'workflow' is empty: it has no nodes")]
    Empty,
    /// The workflow was saved with the UI's plain "Save" (only [`Workflow::from_value`], which
    /// takes the API format alone, says so; [`WorkflowInput::from_value`] accepts it).
    #[error("'workflow' is in ComfyUI's UI format (it has 'nodes' and 'links'); convert it first (`comfy-worker convert`), or export it with \"Save (API Format)\"")]
    UiFormat,
    /// A UI-format workflow that cannot be read.
    #[error("{}", ui_message(.0))]
    Ui(ConvertError),
    /// A node is not an object.
    #[error(
        "invalid workflow: node '{0}' must be an object with 'class_type' and 'inputs', got {1}"
    )]
    NodeNotObject(String, &'static str),
    /// A node's `inputs` is not an object.
    #[error("invalid workflow: 'inputs' of node '{0}' must be an object, got {1}")]
    InputsNotObject(String, &'static str),
}

/// The message for a UI-format workflow that cannot be converted.
pub fn ui_message(e: &ConvertError) -> String {
    format!("cannot convert the UI-format workflow to API format: {e}")
}

/// A job's workflow: API format, or a UI-format export still to be converted.
#[derive(Debug, Clone)]
pub enum WorkflowInput {
    /// Ready to queue.
    Api(Workflow),
    /// Saved with the UI's plain "Save"; converted with `/object_info` before queueing.
    Ui(Box<UiWorkflow>),
}

impl WorkflowInput {
    /// Reads either format.
    pub fn from_value(value: Value) -> Result<WorkflowInput, WorkflowError> {
        if let Value::Object(map) = &value {
            if ui_workflow::is_ui_format(map) {
                return UiWorkflow::from_map(map)
                    .map(|ui| WorkflowInput::Ui(Box::new(ui)))
                    .map_err(WorkflowError::Ui);
            }
        }
        Workflow::from_value(value).map(WorkflowInput::Api)
    }

    /// Number of nodes (of the UI graph, before conversion).
    pub fn len(&self) -> usize {
        match self {
            WorkflowInput::Api(w) => w.len(),
            WorkflowInput::Ui(ui) => ui.len(),
        }
    }

    /// Always false (empty workflows are refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Workflow {
    /// Checks the shape and wraps the graph.
    pub fn from_value(value: Value) -> Result<Workflow, WorkflowError> {
        let graph = match value {
            Value::Object(map) => map,
            other => return Err(WorkflowError::NotAnObject(json_type(&other))),
        };
        if ui_workflow::is_ui_format(&graph) {
            return Err(WorkflowError::UiFormat);
        }
        if graph.is_empty() {
            return Err(WorkflowError::Empty);
        }
        for (id, node) in &graph {
            let node = node
                .as_object()
                .ok_or_else(|| WorkflowError::NodeNotObject(id.clone(), json_type(node)))?;
            if let Some(inputs) = node.get("inputs") {
                if !inputs.is_object() {
                    return Err(WorkflowError::InputsNotObject(
                        id.clone(),
                        json_type(inputs),
                    ));
                }
            }
        }
        Ok(Workflow { graph })
    }

    /// The nodes, in the order the client sent them.
    pub fn nodes(&self) -> impl Iterator<Item = WorkflowNode<'_>> {
        self.graph.iter().map(|(id, node)| WorkflowNode {
            id,
            class_type: node.get("class_type").and_then(Value::as_str),
            title: node
                .get("_meta")
                .and_then(|m| m.get("title"))
                .and_then(Value::as_str),
            steps: node
                .get("inputs")
                .and_then(|i| i.get("steps"))
                .and_then(Value::as_u64),
        })
    }

    /// A node's literal string inputs (links and other values left out), in its order.
    pub fn literal_strings(&self, id: &str) -> impl Iterator<Item = (&str, &str)> {
        self.graph
            .get(id)
            .and_then(|n| n.get("inputs"))
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(name, value)| Some((name.as_str(), value.as_str()?)))
    }

    /// Class type of a node.
    pub fn class_type(&self, id: &str) -> Option<&str> {
        self.graph.get(id)?.get("class_type")?.as_str()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.graph.len()
    }

    /// Always false for a constructed workflow (empty ones are rejected).
    pub fn is_empty(&self) -> bool {
        self.graph.is_empty()
    }

    /// Nodes whose images come back only as binary WebSocket frames, never as files
    /// (`SaveImageWebsocket`: a full-size PNG preview per image while it runs, nothing in
    /// `/history`; protocol spec §2). Their [`crate::comfy::PromptEvent::Preview`]s are outputs.
    pub fn websocket_image_nodes(&self) -> Vec<&str> {
        self.nodes()
            .filter(|n| n.class_type == Some(WEBSOCKET_IMAGE_CLASS))
            .map(|n| n.id)
            .collect()
    }

    /// The graph as sent to `POST /prompt`.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.graph
    }
}

/// The node class that returns images over the socket (`custom_nodes/websocket_image_save.py`).
const WEBSOCKET_IMAGE_CLASS: &str = "SaveImageWebsocket";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejects_wrong_shapes_with_a_reason() {
        assert_eq!(
            Workflow::from_value(json!([1])),
            Err(WorkflowError::NotAnObject("an array"))
        );
        assert_eq!(Workflow::from_value(json!({})), Err(WorkflowError::Empty));
        assert_eq!(
            Workflow::from_value(json!({"last_node_id": 9, "nodes": [], "links": []})),
            Err(WorkflowError::UiFormat)
        );
        assert_eq!(
            Workflow::from_value(json!({"1": 5})),
            Err(WorkflowError::NodeNotObject("1".into(), "a number"))
        );
        assert_eq!(
            Workflow::from_value(json!({"1": {"class_type": "X", "inputs": []}})),
            Err(WorkflowError::InputsNotObject("1".into(), "an array"))
        );
        let msg = WorkflowError::UiFormat.to_string();
        assert!(msg.contains("comfy-worker convert"), "{msg}");
        assert!(matches!(
            WorkflowInput::from_value(json!({"last_node_id": 9, "nodes": [], "links": []})),
            Err(WorkflowError::Ui(_))
        ));
        let ui = WorkflowInput::from_value(json!({
            "nodes": [{"id": 1, "type": "SaveImage"}], "links": [], "version": 0.4
        }))
        .unwrap();
        assert!(matches!(ui, WorkflowInput::Ui(_)));
        assert_eq!(ui.len(), 1);
        assert!(matches!(
            WorkflowInput::from_value(json!({"1": {"class_type": "X", "inputs": {}}})),
            Ok(WorkflowInput::Api(_))
        ));
    }

    #[test]
    fn keeps_node_order_and_reads_titles() {
        let wf = Workflow::from_value(json!({
            "10": {"class_type": "SaveImage", "inputs": {}, "_meta": {"title": "Save"}},
            "2": {"class_type": "EmptyImage", "inputs": {}}
        }))
        .unwrap();
        let ids: Vec<_> = wf.nodes().map(|n| n.id).collect();
        assert_eq!(ids, ["10", "2"]);
        assert_eq!(wf.nodes().next().unwrap().title, Some("Save"));
        assert_eq!(wf.class_type("2"), Some("EmptyImage"));
        assert!(wf.websocket_image_nodes().is_empty());
        let wf = Workflow::from_value(json!({
            "1": {"class_type": "SaveImageWebsocket", "inputs": {}},
            "2": {"class_type": "SaveImage", "inputs": {}},
            "3": {"class_type": "SaveImageWebsocket", "inputs": {}}
        }))
        .unwrap();
        assert_eq!(wf.websocket_image_nodes(), ["1", "3"]);
    }
}
