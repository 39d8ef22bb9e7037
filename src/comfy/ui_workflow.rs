//! UI-format workflows (the frontend's plain "Save": `nodes`, `links`, `widgets_values`) and
//! their conversion to the API format with ComfyUI's `/object_info`.
//!
//! The conversion follows what the frontend's `graphToPrompt` (ComfyUI_frontend
//! `src/utils/executionUtil.ts`) sends when you press Queue:
//!
//! * **Widgets** are laid out from the class's `/object_info` inputs, required then optional, in
//!   their declared order: `INT`, `FLOAT`, `BOOLEAN`, `STRING`, combos (and the simple
//!   `MARKDOWN`, `TEXTAREA`, `COLOR`) get a widget unless `forceInput` is set; the frontend's
//!   pseudo-widgets take a `widgets_values` slot but are never sent: `control_after_generate`
//!   after an `INT` named `seed`/`noise_seed` or flagged `control_after_generate` (a flagged combo
//!   also gets `control_filter_list`), two slots after a combo with a remote refresh button,
//!   `audioUI` on the audio nodes, and `upload` after the required inputs of a media loader
//!   (`image_upload`, `video_upload`, `animated_image_upload`, `audio_upload`). Array values are
//!   sent wrapped as `{"__value__": [...]}`; `STRING` widgets with `dynamicPrompts` get their
//!   comments stripped and one option of each `{a|b}` picked, like the frontend does.
//! * **Links** become `[origin_id, origin_slot]`, followed through `Reroute`s (virtual) and
//!   bypassed nodes (mode 4: the bypassed node's input of a matching type, the frontend's
//!   `ExecutableNodeDTO.resolveOutput`); inputs linked from muted nodes (mode 2) are dropped, as
//!   are the muted and bypassed nodes themselves.
//! * **`PrimitiveNode`s** write their value into every widget they feed; `Note` and
//!   `MarkdownNote` are skipped.
//!
//! What cannot be converted faithfully is an error that names the node ([`ConvertError`]):
//! an unknown class, a `widgets_values` count that does not fit the class, a dangling link,
//! subgraphs and group nodes, widgets only the frontend can fill in. Nothing here panics on
//! any input.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::object_info::ObjectInfo;
use crate::json_type::json_type;

/// The frontend's reroute node (virtual: links pass through it).
const REROUTE: &str = "Reroute";
/// The frontend's primitive node (virtual: its value is written into the widgets it feeds).
const PRIMITIVE: &str = "PrimitiveNode";
/// Frontend-only nodes that are never sent and carry nothing: the core notes and rgthree's
/// virtual helpers (their bypass and mute toggles only change the saved modes).
const NOTES: [&str; 8] = [
    "Note",
    "MarkdownNote",
    "Label (rgthree)",
    "Bookmark (rgthree)",
    "Fast Groups Bypasser (rgthree)",
    "Fast Groups Muter (rgthree)",
    "Fast Bypasser (rgthree)",
    "Fast Muter (rgthree)",
];
/// Virtual reroutes of custom node packs: links pass through like [`REROUTE`].
const OTHER_REROUTES: [&str; 1] = ["Reroute (rgthree)"];
/// KJNodes' `SetNode` (virtual: stores its input under the name in its first widget) and
/// `GetNode` (virtual: its output is the input of the `SetNode` of the same name).
const SET_NODE: &str = "SetNode";
const GET_NODE: &str = "GetNode";
/// Class-name prefixes of cg-use-everywhere, whose connections the frontend adds while queueing.
const EVERYWHERE_PREFIXES: [&str; 3] = [
    "Anything Everywhere",
    "Prompts Everywhere",
    "Seed Everywhere",
];
/// `LGraphEventMode.NEVER`: muted.
const MODE_NEVER: i64 = 2;
/// `LGraphEventMode.BYPASS`.
const MODE_BYPASS: i64 = 4;
/// Deepest `{...}` nesting of a dynamic prompt that is expanded (the frontend recurses per level).
const MAX_PROMPT_NESTING: usize = 100;

/// Widget types the frontend fills in from its own state (canvas, camera, recorder, 3D view...):
/// their values cannot be reproduced without it.
const FRONTEND_ONLY_WIDGETS: [&str; 23] = [
    "IMAGEUPLOAD",
    "AUDIOUPLOAD",
    "AUDIO_UI",
    "AUDIO_RECORD",
    "WEBCAM",
    "LOAD_3D",
    "LOAD_3D_ANIMATION",
    "PREVIEW_3D",
    "PREVIEW_3D_ANIMATION",
    "IMAGECOMPARE",
    "BOUNDING_BOX",
    "BOUNDING_BOXES",
    "CHART",
    "GALLERIA",
    "PAINTER",
    "COMPOSITOR",
    "CURVE",
    "RANGE",
    "VIDEO_EDIT",
    "RESOLUTION_PREVIEW",
    "COLORS",
    "COMFY_DYNAMICCOMBO_V3",
    "COMFY_AUTOGROW_V3",
];

/// Classes the frontend gives an `audioUI` player widget (`uploadAudio.ts`).
const AUDIO_UI_CLASSES: [&str; 6] = [
    "LoadAudio",
    "SaveAudio",
    "PreviewAudio",
    "SaveAudioMP3",
    "SaveAudioOpus",
    "SaveAudioAdvanced",
];

/// Media loaders that get an upload button even without the flag (`uploadImage.ts`).
const KNOWN_MEDIA_LOADERS: [(&str, &str); 4] = [
    ("LoadImage", "image"),
    ("LoadImageMask", "image"),
    ("LoadVideo", "file"),
    ("LoadAudio", "audio"),
];

/// Why a UI-format workflow cannot be converted; names the node when one is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    /// `Node 12 (KSampler "My sampler")`, when a node is at fault.
    pub node: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The node's class is not in `/object_info` (a fresh `/object_info` may know it).
    pub unknown_class: bool,
}

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node {
            Some(node) => write!(f, "{node}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConvertError {}

impl ConvertError {
    fn graph(message: impl Into<String>) -> ConvertError {
        ConvertError {
            node: None,
            message: message.into(),
            unknown_class: false,
        }
    }
}

/// Why an entry of `links` cannot be read.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// An array entry without the six fields.
    #[error("expected [id, origin_id, origin_slot, target_id, target_slot, type]")]
    ArrayShape,
    /// An object entry without the fields (serde's message).
    #[error("{0}")]
    ObjectShape(serde_json::Error),
    /// An object entry whose ends are not node ids.
    #[error("origin_id and target_id must be node ids")]
    NodeIds,
    /// Neither an array nor an object.
    #[error("expected an array or an object, got {0}")]
    NotALink(&'static str),
}

/// Why a node cannot be converted, as the node's [`ConvertError`] says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NodeProblem {
    /// An input only the frontend can fill in.
    #[error("input '{name}' is a {kind} widget, which only the ComfyUI frontend can fill in; export the workflow with \"Save (API Format)\"")]
    FrontendOnlyWidget { name: String, kind: String },
    /// `widgets_values` of another JSON type.
    #[error("'widgets_values' must be a list or an object, got {0}")]
    WidgetValuesType(&'static str),
    /// A `widgets_values` count the class does not take.
    #[error(
        "has {count} widget values, but {class} takes {} ({}); was it saved with a different version of the node? Re-save it in this ComfyUI, or export with \"Save (API Format)\"",
        count_range(*.min, *.max),
        if .slots.is_empty() { "none".to_owned() } else { .slots.join(", ") }
    )]
    WidgetCount {
        count: usize,
        class: String,
        min: usize,
        max: usize,
        /// The class's slot names, in order.
        slots: Vec<String>,
    },
    /// A dynamic prompt the frontend would not expand.
    #[error("widget '{widget}': {error}")]
    DynamicPrompt {
        widget: String,
        error: PromptTooDeep,
    },
    /// A `GetNode` without a name.
    #[error("is a GetNode without a constant name")]
    UnnamedGetNode,
    /// A `GetNode` whose name no `SetNode` sets.
    #[error("is a GetNode for '{0}', but no SetNode sets '{0}'")]
    NoSetNode(String),
}

fn count_range(min: usize, max: usize) -> String {
    if min == max {
        max.to_string()
    } else {
        format!("{min} to {max}")
    }
}

/// A dynamic prompt nested deeper than [`MAX_PROMPT_NESTING`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "dynamic-prompt braces nested {depth} deep (at most {})",
    MAX_PROMPT_NESTING
)]
struct PromptTooDeep {
    depth: usize,
}

/// Options of a conversion.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Seed for the dynamic-prompt choices (`{a|b}`); random when unset, as in the frontend.
    pub seed: Option<u64>,
}

/// A parsed UI-format workflow, ready to be converted with an `/object_info`.
#[derive(Debug, Clone)]
pub struct UiWorkflow {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    links: HashMap<i64, Link>,
    /// Ids of the subgraph definitions (`definitions.subgraphs[].id`): node types that are
    /// subgraph instances.
    subgraphs: HashSet<String>,
    /// Names of legacy group nodes (`extra.groupNodes`).
    group_nodes: HashSet<String>,
}

#[derive(Debug, Clone)]
struct Node {
    id: String,
    class: String,
    mode: i64,
    title: Option<String>,
    inputs: Vec<Input>,
    outputs: Vec<Output>,
    widgets_values: Value,
    replace_values: bool,
}

#[derive(Debug, Clone)]
struct Input {
    name: String,
    ty: String,
    link: Option<i64>,
    widget: Option<String>,
}

#[derive(Debug, Clone)]
struct Output {
    ty: String,
    links: Vec<i64>,
}

#[derive(Debug, Clone)]
struct Link {
    origin: String,
    origin_slot: usize,
    target: String,
    target_slot: usize,
}

// The wire shapes, lenient: unknown fields are ignored, missing ones default.

#[derive(Debug, Deserialize)]
struct RawNode {
    #[serde(default)]
    id: Value,
    #[serde(rename = "type", default)]
    class: Value,
    #[serde(default)]
    mode: Value,
    #[serde(default)]
    title: Value,
    #[serde(default)]
    inputs: Option<Vec<RawInput>>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
    #[serde(default)]
    widgets_values: Value,
    #[serde(default)]
    properties: Value,
}

#[derive(Debug, Deserialize)]
struct RawInput {
    name: String,
    #[serde(rename = "type", default)]
    ty: Value,
    #[serde(default)]
    link: Option<i64>,
    #[serde(default)]
    widget: Option<RawWidgetRef>,
}

#[derive(Debug, Deserialize)]
struct RawWidgetRef {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawOutput {
    #[serde(rename = "type", default)]
    ty: Value,
    #[serde(default)]
    links: Option<Vec<i64>>,
}

/// `{"id", "origin_id", "origin_slot", "target_id", "target_slot", "type"}` (schema 1 exports).
#[derive(Debug, Deserialize)]
struct RawLinkObject {
    id: i64,
    origin_id: Value,
    origin_slot: usize,
    target_id: Value,
    target_slot: usize,
}

/// A node id as text: numbers as integers, strings as they are.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(|i| i.to_string())
            .or_else(|| n.as_u64().map(|u| u.to_string())),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A slot type as text (`""` for anything unusual, which connects to anything).
fn type_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

/// JavaScript truthiness of a JSON value.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// Whether a map looks like a UI-format export: `nodes` (array) with `links`, `last_node_id`,
/// `last_link_id`, `version` or `groups`.
pub fn is_ui_format(graph: &Map<String, Value>) -> bool {
    let nodes_array = graph.get("nodes").is_some_and(Value::is_array);
    let ui_keys = ["links", "last_node_id", "last_link_id", "version", "groups"]
        .iter()
        .any(|k| graph.contains_key(*k));
    nodes_array && ui_keys
}

fn parse_link(entry: &Value) -> Result<Option<(i64, Link)>, LinkError> {
    match entry {
        Value::Null => Ok(None),
        Value::Array(a) => {
            let int = |i: usize| a.get(i).and_then(Value::as_i64);
            let slot = |i: usize| a.get(i).and_then(Value::as_u64).map(|s| s as usize);
            match (
                int(0),
                a.get(1).and_then(id_text),
                slot(2),
                a.get(3).and_then(id_text),
                slot(4),
            ) {
                (Some(id), Some(origin), Some(origin_slot), Some(target), Some(target_slot)) => {
                    Ok(Some((
                        id,
                        Link {
                            origin,
                            origin_slot,
                            target,
                            target_slot,
                        },
                    )))
                }
                _ => Err(LinkError::ArrayShape),
            }
        }
        Value::Object(_) => {
            let raw: RawLinkObject =
                serde_json::from_value(entry.clone()).map_err(LinkError::ObjectShape)?;
            match (id_text(&raw.origin_id), id_text(&raw.target_id)) {
                (Some(origin), Some(target)) => Ok(Some((
                    raw.id,
                    Link {
                        origin,
                        origin_slot: raw.origin_slot,
                        target,
                        target_slot: raw.target_slot,
                    },
                ))),
                _ => Err(LinkError::NodeIds),
            }
        }
        other => Err(LinkError::NotALink(json_type(other))),
    }
}

impl UiWorkflow {
    /// Reads a UI-format export (see [`is_ui_format`]). Errors are about the file's structure;
    /// what depends on the node classes is checked by [`UiWorkflow::convert`].
    pub fn from_map(graph: &Map<String, Value>) -> Result<UiWorkflow, ConvertError> {
        let raw_nodes = match graph.get("nodes") {
            Some(Value::Array(nodes)) => nodes,
            Some(other) => {
                return Err(ConvertError::graph(format!(
                    "'nodes' must be a list, got {}",
                    json_type(other)
                )))
            }
            None => return Err(ConvertError::graph("the workflow has no 'nodes' list")),
        };
        let mut nodes = Vec::with_capacity(raw_nodes.len());
        let mut index = HashMap::new();
        for (i, raw) in raw_nodes.iter().enumerate() {
            let named = id_text(raw.get("id").unwrap_or(&Value::Null));
            let where_ = || match &named {
                Some(id) => format!("Node {id}"),
                None => format!("Node #{} of 'nodes'", i + 1),
            };
            let bad = |message: String| ConvertError {
                node: Some(where_()),
                message,
                unknown_class: false,
            };
            if !raw.is_object() {
                return Err(bad(format!("must be an object, got {}", json_type(raw))));
            }
            let node: RawNode = serde_json::from_value(raw.clone())
                .map_err(|e| bad(format!("is not a valid UI node: {e}")))?;
            let id = id_text(&node.id).ok_or_else(|| bad("has no valid 'id'".into()))?;
            let class = match &node.class {
                Value::String(s) if !s.is_empty() => s.clone(),
                _ => return Err(bad("has no 'type' (its node class)".into())),
            };
            let mode = match &node.mode {
                Value::Null => 0,
                Value::Number(n) => n.as_i64().unwrap_or(0),
                other => {
                    return Err(bad(format!(
                        "'mode' must be a number, got {}",
                        json_type(other)
                    )))
                }
            };
            let replace_values = node
                .properties
                .get("Run widget replace on values")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if index.insert(id.clone(), nodes.len()).is_some() {
                return Err(bad("appears twice in 'nodes'".into()));
            }
            nodes.push(Node {
                id,
                class,
                mode,
                title: node.title.as_str().map(str::to_owned),
                inputs: node
                    .inputs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| Input {
                        name: i.name,
                        ty: type_text(&i.ty),
                        link: i.link,
                        widget: i.widget.and_then(|w| w.name),
                    })
                    .collect(),
                outputs: node
                    .outputs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|o| Output {
                        ty: type_text(&o.ty),
                        links: o.links.unwrap_or_default(),
                    })
                    .collect(),
                widgets_values: node.widgets_values,
                replace_values,
            });
        }
        if nodes.is_empty() {
            return Err(ConvertError::graph("the workflow has no nodes"));
        }
        let mut links = HashMap::new();
        match graph.get("links") {
            None | Some(Value::Null) => {}
            Some(Value::Array(entries)) => {
                for (i, entry) in entries.iter().enumerate() {
                    let parsed = parse_link(entry).map_err(|e| {
                        ConvertError::graph(format!("link #{} of 'links' is malformed: {e}", i + 1))
                    })?;
                    if let Some((id, link)) = parsed {
                        links.insert(id, link);
                    }
                }
            }
            Some(other) => {
                return Err(ConvertError::graph(format!(
                    "'links' must be a list, got {}",
                    json_type(other)
                )))
            }
        }
        let subgraphs = graph
            .get("definitions")
            .and_then(|d| d.get("subgraphs"))
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let group_nodes = graph
            .get("extra")
            .and_then(|e| e.get("groupNodes"))
            .and_then(Value::as_object)
            .map(|g| g.keys().cloned().collect())
            .unwrap_or_default();
        Ok(UiWorkflow {
            nodes,
            index,
            links,
            subgraphs,
            group_nodes,
        })
    }

    /// Number of nodes (virtual ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false (a workflow without nodes is refused).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Converts to the API format (`{id: {"inputs", "class_type", "_meta": {"title"}}}`), with
    /// random dynamic-prompt choices.
    pub fn convert(&self, info: &ObjectInfo) -> Result<Map<String, Value>, ConvertError> {
        self.convert_with(info, &ConvertOptions::default())
    }

    /// [`UiWorkflow::convert`] with options.
    pub fn convert_with(
        &self,
        info: &ObjectInfo,
        options: &ConvertOptions,
    ) -> Result<Map<String, Value>, ConvertError> {
        let mut rng = Rng::new(options.seed.unwrap_or_else(random_seed));
        let primitives = self.primitive_values(info)?;
        let mut output: Vec<(String, Map<String, Value>)> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if self.subgraphs.contains(&node.class) {
                return Err(self.error(node, info, "is a subgraph, and subgraphs cannot be converted here: unpack it in ComfyUI (right-click > Unpack Subgraph) or export the workflow with \"Save (API Format)\""));
            }
            if self.is_group_node(&node.class) {
                return Err(self.error(node, info, "is a group node, and group nodes cannot be converted here: convert it back to nodes in ComfyUI or export the workflow with \"Save (API Format)\""));
            }
            if is_virtual(&node.class) || node.mode == MODE_NEVER || node.mode == MODE_BYPASS {
                continue;
            }
            if EVERYWHERE_PREFIXES
                .iter()
                .any(|p| node.class.starts_with(p))
            {
                return Err(self.error(node, info, "broadcasts its inputs to other nodes while the ComfyUI frontend queues the workflow (cg-use-everywhere), which cannot be reproduced here: connect the inputs with links, or export the workflow with \"Save (API Format)\""));
            }
            let Some(def) = info.class(&node.class) else {
                if uuid::Uuid::parse_str(&node.class).is_ok() {
                    return Err(self.error(node, info, "is a subgraph instance (its type is a subgraph id) without a definition in the workflow; subgraphs cannot be converted here: unpack it in ComfyUI or export the workflow with \"Save (API Format)\""));
                }
                return Err(ConvertError {
                    unknown_class: true,
                    ..self.error(
                        node,
                        info,
                        format!(
                            "unknown node class '{}': this ComfyUI does not have it (is its custom node installed?)",
                            node.class
                        ),
                    )
                });
            };
            let layout = layout(def, &node.class).map_err(|p| self.problem(node, info, p))?;
            let mut inputs = self
                .widget_inputs(node, &layout, def, &primitives, &mut rng)
                .map_err(|p| self.problem(node, info, p))?;
            for (slot, input) in node.inputs.iter().enumerate() {
                let mut visited = HashSet::new();
                if let Some((origin, origin_slot)) =
                    self.resolve_input(i, slot, None, &mut visited, info)?
                {
                    inputs.insert(
                        input.name.clone(),
                        Value::Array(vec![Value::String(origin), Value::from(origin_slot)]),
                    );
                }
            }
            let mut meta = Map::new();
            meta.insert("title".into(), Value::String(self.title(node, info)));
            let mut api = Map::new();
            api.insert("inputs".into(), Value::Object(inputs));
            api.insert("class_type".into(), Value::String(node.class.clone()));
            api.insert("_meta".into(), Value::Object(meta));
            output.push((node.id.clone(), api));
        }
        // Inputs linked to nodes that are not sent (muted) are dropped, as the frontend does.
        let sent: HashSet<String> = output.iter().map(|(id, _)| id.clone()).collect();
        for (_, api) in &mut output {
            if let Some(Value::Object(inputs)) = api.get_mut("inputs") {
                inputs.retain(|_, v| match v {
                    Value::Array(link) if link.len() == 2 => {
                        link[0].as_str().is_some_and(|id| sent.contains(id))
                    }
                    _ => true,
                });
            }
        }
        if output.is_empty() {
            return Err(ConvertError::graph(
                "nothing to run: every node is muted, bypassed or frontend-only (notes, reroutes, primitives)",
            ));
        }
        output.sort_by(|(a, _), (b, _)| compare_ids(a, b));
        Ok(output
            .into_iter()
            .map(|(id, api)| (id, Value::Object(api)))
            .collect())
    }

    fn is_group_node(&self, class: &str) -> bool {
        let name = class
            .strip_prefix("workflow>")
            .or_else(|| class.strip_prefix("workflow/"));
        name.is_some_and(|n| self.group_nodes.contains(n))
    }

    /// What the node is called in messages and `_meta.title`: its title, else the class's
    /// display name, else the class.
    fn title(&self, node: &Node, info: &ObjectInfo) -> String {
        node.title
            .clone()
            .or_else(|| {
                info.class(&node.class)
                    .and_then(|d| d.get("display_name"))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| node.class.clone())
    }

    fn label(&self, node: &Node, info: &ObjectInfo) -> String {
        let title = self.title(node, info);
        if title == node.class {
            format!("Node {} ({})", node.id, node.class)
        } else {
            format!("Node {} ({} {:?})", node.id, node.class, title)
        }
    }

    fn error(&self, node: &Node, info: &ObjectInfo, message: impl Into<String>) -> ConvertError {
        ConvertError {
            node: Some(self.label(node, info)),
            message: message.into(),
            unknown_class: false,
        }
    }

    /// The node's error for a [`NodeProblem`].
    fn problem(&self, node: &Node, info: &ObjectInfo, problem: NodeProblem) -> ConvertError {
        self.error(node, info, problem.to_string())
    }

    /// The value each `PrimitiveNode` writes into the widgets it feeds (`applyToGraph`), by
    /// (target node id, widget name). Reroutes between them are followed.
    fn primitive_values(
        &self,
        info: &ObjectInfo,
    ) -> Result<HashMap<(String, String), Value>, ConvertError> {
        let mut values = HashMap::new();
        for node in self.nodes.iter().filter(|n| n.class == PRIMITIVE) {
            let Some(output) = node.outputs.first() else {
                continue;
            };
            if output.links.is_empty() {
                continue;
            }
            let value = match &node.widgets_values {
                Value::Array(list) if !list.is_empty() => list[0].clone(),
                _ => {
                    return Err(self.error(
                        node,
                        info,
                        "is connected but has no value ('widgets_values' is empty)",
                    ))
                }
            };
            if node.replace_values && value.as_str().is_some_and(|s| s.contains('%')) {
                return Err(self.error(node, info, "uses \"Run widget replace on values\" with a %...% pattern, which only the ComfyUI frontend can fill in"));
            }
            let mut pending: Vec<i64> = output.links.clone();
            let mut seen = HashSet::new();
            while let Some(link_id) = pending.pop() {
                if !seen.insert(link_id) {
                    continue;
                }
                // A link the graph no longer has is skipped (stale output lists are common).
                let Some(link) = self.links.get(&link_id) else {
                    continue;
                };
                let Some(&target_idx) = self.index.get(&link.target) else {
                    continue;
                };
                let target = &self.nodes[target_idx];
                if target.class == REROUTE {
                    for out in &target.outputs {
                        pending.extend(out.links.iter().copied());
                    }
                    continue;
                }
                let Some(input) = target.inputs.get(link.target_slot) else {
                    continue;
                };
                let widget = input.widget.clone().unwrap_or_else(|| input.name.clone());
                values.insert((target.id.clone(), widget), value.clone());
            }
        }
        Ok(values)
    }

    /// The widget values of a node, by input name, in widget order.
    fn widget_inputs(
        &self,
        node: &Node,
        layout: &[Slot],
        def: &Map<String, Value>,
        primitives: &HashMap<(String, String), Value>,
        rng: &mut Rng,
    ) -> Result<Map<String, Value>, NodeProblem> {
        enum Saved<'a> {
            Missing,
            Positional(&'a [Value]),
            Named(&'a Map<String, Value>),
        }
        let saved = match &node.widgets_values {
            Value::Null => Saved::Missing,
            Value::Array(list) => Saved::Positional(list),
            Value::Object(map) => Saved::Named(map),
            other => return Err(NodeProblem::WidgetValuesType(json_type(other))),
        };
        if let Saved::Positional(list) = saved {
            // Trailing optional widgets (added to the class after the workflow was saved) and
            // trailing pseudo-widgets may be missing; the frontend keeps their defaults.
            let min = layout
                .iter()
                .rposition(|s| matches!(s, Slot::Widget(w) if !w.optional))
                .map_or(0, |i| i + 1);
            let max = layout.len();
            if list.len() < min || list.len() > max {
                return Err(NodeProblem::WidgetCount {
                    count: list.len(),
                    class: node.class.clone(),
                    min,
                    max,
                    slots: layout.iter().map(|s| s.name().to_owned()).collect(),
                });
            }
        }
        let mut inputs = Map::new();
        for (i, slot) in layout.iter().enumerate() {
            let Slot::Widget(w) = slot else {
                continue;
            };
            let value = primitives
                .get(&(node.id.clone(), w.name.clone()))
                .cloned()
                .or_else(|| match saved {
                    Saved::Missing => None,
                    Saved::Positional(list) => list.get(i).cloned(),
                    Saved::Named(map) => map.get(&w.name).cloned(),
                })
                .or_else(|| w.default.clone());
            let Some(mut value) = value else {
                continue;
            };
            if w.dynamic_prompts {
                if let Value::String(text) = &value {
                    value = Value::String(dynamic_prompt(text, rng).map_err(|error| {
                        NodeProblem::DynamicPrompt {
                            widget: w.name.clone(),
                            error,
                        }
                    })?);
                }
            }
            inputs.insert(w.name.clone(), wrap(value));
        }
        if let Saved::Named(map) = saved {
            // Object-shaped values (VideoHelperSuite) also carry widgets the node's frontend
            // code adds (format options such as `pix_fmt`, `crf`); the preview state is not sent.
            let declared = |name: &str| {
                ["required", "optional"].iter().any(|s| {
                    def.get("input")
                        .and_then(|i| i.get(*s))
                        .and_then(|s| s.get(name))
                        .is_some()
                })
            };
            for (key, value) in map {
                let in_layout = layout.iter().any(|s| s.name() == key);
                let ui_only = matches!(key.as_str(), "videopreview" | "preview")
                    || value.is_object()
                    || value.is_array();
                if !in_layout && !declared(key) && !ui_only {
                    inputs.insert(key.clone(), value.clone());
                }
            }
        }
        Ok(inputs)
    }

    /// `resolveInput`: where input `slot` of node `idx` really comes from, or `None` when it
    /// is not connected (or the frontend would not send it).
    fn resolve_input(
        &self,
        idx: usize,
        slot: usize,
        ty: Option<&str>,
        visited: &mut HashSet<(usize, bool, usize)>,
        info: &ObjectInfo,
    ) -> Result<Option<(String, usize)>, ConvertError> {
        let node = &self.nodes[idx];
        if !visited.insert((idx, true, slot)) {
            return Err(self.error(
                node,
                info,
                format!("input slot {slot} is part of a loop of links through reroutes or bypassed nodes"),
            ));
        }
        let Some(input) = node.inputs.get(slot) else {
            return Err(self.error(
                node,
                info,
                format!("has no input slot {slot}, but a bypassed or reroute link needs it"),
            ));
        };
        let Some(link_id) = input.link else {
            return Ok(None);
        };
        let Some(link) = self.links.get(&link_id) else {
            return Err(self.error(
                node,
                info,
                format!(
                    "input '{}' uses link {link_id}, which is not in the workflow's 'links' (a dangling link)",
                    input.name
                ),
            ));
        };
        let Some(&origin) = self.index.get(&link.origin) else {
            return Err(self.error(
                node,
                info,
                format!(
                    "input '{}' is linked (link {link_id}) to node {}, which is not in the workflow (a dangling link)",
                    input.name, link.origin
                ),
            ));
        };
        let ty = ty.unwrap_or(&input.ty).to_owned();
        self.resolve_output(origin, link.origin_slot, &ty, visited, info)
    }

    /// `resolveOutput`: bypassed nodes pass the first input of a matching type through,
    /// virtual nodes (reroutes) the input of the same index; other nodes are the origin.
    fn resolve_output(
        &self,
        idx: usize,
        slot: usize,
        ty: &str,
        visited: &mut HashSet<(usize, bool, usize)>,
        info: &ObjectInfo,
    ) -> Result<Option<(String, usize)>, ConvertError> {
        let node = &self.nodes[idx];
        if !visited.insert((idx, false, slot)) {
            return Err(self.error(
                node,
                info,
                format!("output slot {slot} is part of a loop of links through reroutes or bypassed nodes"),
            ));
        }
        if node.mode == MODE_BYPASS {
            return match self.bypass_slot(node, slot, ty, info)? {
                Some(input) => self.resolve_input(idx, input, None, visited, info),
                None => Ok(None),
            };
        }
        if self.subgraphs.contains(&node.class) || self.is_group_node(&node.class) {
            return Err(self.error(
                node,
                info,
                "is a subgraph or group node, and links through it cannot be converted",
            ));
        }
        if node.class == GET_NODE {
            let setter = self
                .setter_for(node)
                .map_err(|p| self.problem(node, info, p))?;
            return self.resolve_input(setter, slot, Some(ty), visited, info);
        }
        if is_virtual(&node.class) {
            if node.inputs.get(slot).is_some() {
                return self.resolve_input(idx, slot, Some(ty), visited, info);
            }
            return Ok(None);
        }
        Ok(Some((node.id.clone(), slot)))
    }

    /// The `SetNode` a `GetNode` reads: the first one whose name (first widget) is the same.
    fn setter_for(&self, getter: &Node) -> Result<usize, NodeProblem> {
        let name_of = |n: &Node| {
            n.widgets_values
                .get(0)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let Some(name) = name_of(getter) else {
            return Err(NodeProblem::UnnamedGetNode);
        };
        self.nodes
            .iter()
            .position(|n| n.class == SET_NODE && name_of(n).as_deref() == Some(name.as_str()))
            .ok_or(NodeProblem::NoSetNode(name))
    }

    /// `getBypassSlotIndex`: which input a bypassed node passes to output `slot`.
    fn bypass_slot(
        &self,
        node: &Node,
        slot: usize,
        ty: &str,
        info: &ObjectInfo,
    ) -> Result<Option<usize>, ConvertError> {
        let Some(output) = node.outputs.get(slot) else {
            return Err(self.error(
                node,
                info,
                format!(
                    "is bypassed and linked from its output slot {slot}, which it does not have"
                ),
            ));
        };
        if ty.is_empty() || ty == "*" {
            return Ok(Some(if node.inputs.len() > slot { slot } else { 0 }));
        }
        if let Some(opposite) = node.inputs.get(slot) {
            if valid_connection(&opposite.ty, &output.ty) && valid_connection(&opposite.ty, ty) {
                return Ok(Some(slot));
            }
        }
        if let Some(exact) = node.inputs.iter().position(|i| i.ty == ty) {
            return Ok(Some(exact));
        }
        Ok(node
            .inputs
            .iter()
            .position(|i| valid_connection(&i.ty, &output.ty) && valid_connection(&i.ty, ty)))
    }
}

/// Node ids in numeric order, then the others by text.
fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

fn is_virtual(class: &str) -> bool {
    class == REROUTE
        || class == PRIMITIVE
        || class == SET_NODE
        || class == GET_NODE
        || NOTES.contains(&class)
        || OTHER_REROUTES.contains(&class)
}

/// `LiteGraph.isValidConnection`: equal types, a wildcard, or comma-separated lists that share
/// a type (case-insensitive).
fn valid_connection(a: &str, b: &str) -> bool {
    let any = |t: &str| t.is_empty() || t == "*";
    if any(a) || any(b) || a == b {
        return true;
    }
    let (a, b) = (a.to_lowercase(), b.to_lowercase());
    if !a.contains(',') && !b.contains(',') {
        return a == b;
    }
    a.split(',')
        .any(|x| b.split(',').any(|y| valid_connection(x, y)))
}

/// Arrays are reserved for links; the frontend sends array values as `{"__value__": [...]}`.
fn wrap(value: Value) -> Value {
    match value {
        Value::Array(list) => {
            let mut boxed = Map::new();
            boxed.insert("__value__".into(), Value::Array(list));
            Value::Object(boxed)
        }
        other => other,
    }
}

/// One `widgets_values` slot of a class.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// A widget whose value is sent as the input of the same name.
    Widget(WidgetSpec),
    /// A frontend pseudo-widget (control_after_generate, upload, ...): a slot, never sent.
    Pseudo(&'static str),
}

impl Slot {
    fn name(&self) -> &str {
        match self {
            Slot::Widget(w) => &w.name,
            Slot::Pseudo(name) => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct WidgetSpec {
    name: String,
    /// What the frontend starts the widget with (kept when the workflow has no value for it).
    default: Option<Value>,
    /// A `STRING` with `dynamicPrompts`: `{a|b}` choices and comments are processed.
    dynamic_prompts: bool,
    /// An optional input.
    optional: bool,
}

/// The `widgets_values` layout of a class, as the frontend builds its widgets.
fn layout(def: &Map<String, Value>, class: &str) -> Result<Vec<Slot>, NodeProblem> {
    let input = def.get("input").and_then(Value::as_object);
    let section = |name: &str| input.and_then(|i| i.get(name)).and_then(Value::as_object);
    let mut slots = Vec::new();
    if let Some(required) = section("required") {
        for (name, spec) in required {
            push_input(&mut slots, name, spec, false)?;
        }
        // `required.audioUI` and `required.upload` are appended by frontend extensions.
        if AUDIO_UI_CLASSES.contains(&class) {
            slots.push(Slot::Pseudo("audioUI"));
        }
        let media_combo = required.values().any(|spec| {
            is_combo(spec)
                && ["image_upload", "video_upload", "animated_image_upload"]
                    .iter()
                    .any(|flag| spec.get(1).and_then(|o| o.get(*flag)) == Some(&Value::Bool(true)))
        });
        let known_loader = KNOWN_MEDIA_LOADERS
            .iter()
            .any(|(c, i)| *c == class && required.get(*i).is_some_and(is_combo));
        let audio_upload = required
            .get("audio")
            .and_then(|s| s.get(1))
            .and_then(|o| o.get("audio_upload"))
            == Some(&Value::Bool(true));
        if media_combo || known_loader || audio_upload {
            slots.push(Slot::Pseudo("upload"));
        }
    }
    if let Some(optional) = section("optional") {
        for (name, spec) in optional {
            push_input(&mut slots, name, spec, true)?;
        }
    }
    Ok(slots)
}

fn is_combo(spec: &Value) -> bool {
    match spec.get(0) {
        Some(Value::Array(_)) => true,
        Some(Value::String(s)) => s == "COMBO",
        _ => false,
    }
}

fn push_input(
    slots: &mut Vec<Slot>,
    name: &str,
    spec: &Value,
    optional: bool,
) -> Result<(), NodeProblem> {
    let Some(spec) = spec.as_array() else {
        return Ok(());
    };
    let opts = spec.get(1).and_then(Value::as_object);
    let opt = |key: &str| opts.and_then(|o| o.get(key));
    if truthy(opt("forceInput")) {
        return Ok(());
    }
    let kind = match (opt("widgetType").and_then(Value::as_str), spec.first()) {
        (Some(widget), _) => widget.to_owned(),
        (None, Some(Value::Array(_))) => "COMBO".to_owned(),
        (None, Some(Value::String(ty))) => ty.clone(),
        _ => return Ok(()),
    };
    if FRONTEND_ONLY_WIDGETS.contains(&kind.as_str()) {
        return Err(NodeProblem::FrontendOnlyWidget {
            name: name.to_owned(),
            kind,
        });
    }
    let default = opt("default").filter(|v| !v.is_null()).cloned();
    let default = match kind.as_str() {
        "INT" | "FLOAT" => default.or(Some(Value::from(0))),
        "BOOLEAN" => default.or(Some(Value::Bool(false))),
        "STRING" | "MARKDOWN" | "TEXTAREA" => default.or(Some(Value::String(String::new()))),
        "COLOR" => default,
        "COMBO" => {
            let options = match spec.first() {
                Some(Value::Array(list)) => Some(list),
                _ => opt("options").and_then(Value::as_array),
            };
            // `if (inputSpec.default) return inputSpec.default` (truthy), else the first option.
            default
                .filter(|d| truthy(Some(d)))
                .or_else(|| options.and_then(|o| o.first()).cloned())
        }
        _ => return Ok(()),
    };
    slots.push(Slot::Widget(WidgetSpec {
        name: name.to_owned(),
        default,
        dynamic_prompts: kind == "STRING" && truthy(opt("dynamicPrompts")),
        optional,
    }));
    match kind.as_str() {
        "INT" => {
            // `control_after_generate ?? ['seed', 'noise_seed'].includes(name)`
            let control = match opt("control_after_generate") {
                None | Some(Value::Null) => name == "seed" || name == "noise_seed",
                some => truthy(some),
            };
            if control {
                slots.push(Slot::Pseudo("control_after_generate"));
            }
        }
        "COMBO" => {
            if truthy(opt("remote").and_then(|r| r.get("refresh_button"))) {
                slots.push(Slot::Pseudo("auto-refresh"));
                slots.push(Slot::Pseudo("refresh"));
            }
            if truthy(opt("control_after_generate")) {
                slots.push(Slot::Pseudo("control_after_generate"));
                if !truthy(opt("multi_select")) && !truthy(opt("multiselect")) {
                    slots.push(Slot::Pseudo("control_filter_list"));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A small xorshift generator for the dynamic-prompt choices (the frontend uses Math.random).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n.max(1) as u64) as usize
    }
}

fn random_seed() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// Strips C-style comments like the frontend's `/\/\*[\s\S]*?\*\/|\/\/.*/g`.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('/') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(body) = tail.strip_prefix("/*") {
            if let Some(end) = body.find("*/") {
                rest = &body[end + 2..];
                continue;
            }
        }
        if tail.starts_with("//") {
            // `.` does not match line terminators.
            let end = tail
                .find(['\n', '\r', '\u{2028}', '\u{2029}'])
                .unwrap_or(tail.len());
            rest = &tail[end..];
            continue;
        }
        out.push('/');
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

/// The frontend's `processDynamicPrompt`: comments stripped, one option of each `{a|b|...}`
/// picked (nested groups too), `\{`, `\}` and `\|` unescaped.
fn dynamic_prompt(text: &str, rng: &mut Rng) -> Result<String, PromptTooDeep> {
    let mut depth = 0usize;
    let mut max = 0usize;
    for c in text.chars() {
        match c {
            '{' => {
                depth += 1;
                max = max.max(depth);
            }
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if max > MAX_PROMPT_NESTING {
        return Err(PromptTooDeep { depth: max });
    }
    Ok(process_prompt(text, rng))
}

fn process_prompt(text: &str, rng: &mut Rng) -> String {
    let chars: Vec<char> = strip_comments(text).chars().collect();
    let mut i = 0;
    let mut result = String::new();
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '\\' => escape(&chars, &mut i, &mut result),
            '{' => {
                let choice = choice_block(&chars, &mut i, rng);
                result.push_str(&choice);
            }
            c => result.push(c),
        }
    }
    unescape(&result)
}

/// `'\\' + input[i++]`; past the end JavaScript reads `undefined`.
fn escape(chars: &[char], i: &mut usize, out: &mut String) {
    out.push('\\');
    match chars.get(*i) {
        Some(c) => out.push(*c),
        None => out.push_str("undefined"),
    }
    *i += 1;
}

fn choice_block(chars: &[char], i: &mut usize, rng: &mut Rng) -> String {
    let mut options = Vec::new();
    let mut choice = String::new();
    let mut depth = 0usize;
    while *i < chars.len() {
        let c = chars[*i];
        *i += 1;
        match c {
            '\\' => {
                escape(chars, i, &mut choice);
                continue;
            }
            '{' => depth += 1,
            '}' => {
                if depth == 0 {
                    break;
                }
                depth -= 1;
            }
            '|' if depth == 0 => {
                options.push(std::mem::take(&mut choice));
                continue;
            }
            _ => {}
        }
        choice.push(c);
    }
    options.push(choice);
    let pick = rng.below(options.len());
    process_prompt(&options[pick], rng)
}

/// `.replace(/\\([{}|])/g, '$1')`
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&next) = chars.peek() {
                if matches!(next, '{' | '}' | '|') {
                    out.push(next);
                    chars.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;
