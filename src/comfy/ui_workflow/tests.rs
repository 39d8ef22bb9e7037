use super::*;
use serde_json::json;

/// A small `/object_info` with the shapes the rules care about.
fn info() -> ObjectInfo {
    ObjectInfo::from_value(json!({
        "Src": {
            "input": {"required": {}},
            "output": ["IMAGE", "MASK"],
            "display_name": "Source"
        },
        "Sink": {
            "input": {
                "required": {
                    "images": ["IMAGE"],
                    "prefix": ["STRING", {"default": "x"}]
                },
                "optional": {"extra": ["BOOLEAN", {"default": true}]}
            },
            "output": [],
            "display_name": "Sink"
        },
        "Widgets": {
            "input": {
                "required": {
                    "seed": ["INT", {"default": 5}],
                    "count": ["INT", {"default": 1, "control_after_generate": true}],
                    "plain": ["INT", {"control_after_generate": false}],
                    "choice": [["a", "b"], {"control_after_generate": true}],
                    "remote": ["COMBO", {"options": ["r1"], "remote": {"route": "/x", "refresh_button": true}}],
                    "forced": ["FLOAT", {"forceInput": true}],
                    "text": ["STRING", {"multiline": true, "dynamicPrompts": true}],
                    "list": ["STRING", {"default": ""}]
                }
            },
            "output": ["INT"]
        },
        "Loader": {
            "input": {"required": {"audio": [["a.wav"], {"audio_upload": true}]}},
            "output": ["AUDIO"]
        },
        "LoadAudio": {
            "input": {"required": {"audio": [["a.wav"], {"audio_upload": true}]}},
            "output": ["AUDIO"]
        },
        "Webcam": {
            "input": {"required": {"image": ["WEBCAM", {}], "width": ["INT", {"default": 0}]}},
            "output": ["IMAGE"]
        },
        "Pass": {
            "input": {"required": {"mask": ["MASK"], "image": ["IMAGE"]}},
            "output": ["IMAGE"]
        }
    }))
}

fn convert(graph: Value) -> Result<Map<String, Value>, ConvertError> {
    let ui = UiWorkflow::from_map(graph.as_object().unwrap())?;
    ui.convert_with(&info(), &ConvertOptions { seed: Some(3) })
}

fn node(id: u64, class: &str, widgets: Value) -> Value {
    json!({"id": id, "type": class, "mode": 0, "inputs": [], "outputs": [], "widgets_values": widgets})
}

#[test]
fn layout_follows_the_frontends_widgets_and_pseudo_widgets() {
    let def = info().class("Widgets").unwrap().clone();
    let names: Vec<String> = layout(&def, "Widgets")
        .unwrap()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "seed",
            "control_after_generate",
            "count",
            "control_after_generate",
            "plain",
            "choice",
            "control_after_generate",
            "control_filter_list",
            "remote",
            "auto-refresh",
            "refresh",
            "text",
            "list"
        ]
    );
    let loader = info().class("Loader").unwrap().clone();
    let names: Vec<String> = layout(&loader, "Loader")
        .unwrap()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    assert_eq!(names, ["audio", "upload"]);
    let audio = info().class("LoadAudio").unwrap().clone();
    let names: Vec<String> = layout(&audio, "LoadAudio")
        .unwrap()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    assert_eq!(names, ["audio", "audioUI", "upload"]);
    let webcam = info().class("Webcam").unwrap().clone();
    let err = layout(&webcam, "Webcam").unwrap_err();
    assert!(
        matches!(&err, NodeProblem::FrontendOnlyWidget { kind, .. } if kind == "WEBCAM"),
        "{err}"
    );
    let err = err.to_string();
    assert!(err.contains("'image' is a WEBCAM widget"), "{err}");
}

#[test]
fn pseudo_widget_values_are_skipped_and_arrays_are_boxed() {
    let out = convert(json!({
        "nodes": [node(1, "Widgets", json!([
            9, "randomize", 2, "fixed", 3, "b", "fixed", "", "r1", true, null,
            "plain text", ["x", "y"]
        ]))],
        "links": []
    }))
    .unwrap();
    assert_eq!(
        out["1"]["inputs"],
        json!({"seed": 9, "count": 2, "plain": 3, "choice": "b", "remote": "r1",
               "text": "plain text", "list": {"__value__": ["x", "y"]}})
    );
    assert_eq!(out["1"]["_meta"]["title"], "Widgets");
}

#[test]
fn widget_counts_must_fit_but_trailing_optional_widgets_may_be_missing() {
    let sink = |widgets: Value| json!({"nodes": [{"id": 4, "type": "Sink", "title": "Out", "widgets_values": widgets}], "links": []});
    // The optional widget is missing: the frontend keeps its default.
    let out = convert(sink(json!(["p"]))).unwrap();
    assert_eq!(out["4"]["inputs"], json!({"prefix": "p", "extra": true}));
    let out = convert(sink(json!(["p", false]))).unwrap();
    assert_eq!(out["4"]["inputs"], json!({"prefix": "p", "extra": false}));
    // No widgets_values at all: every widget keeps its default, as in the frontend.
    let out = convert(sink(Value::Null)).unwrap();
    assert_eq!(out["4"]["inputs"], json!({"prefix": "x", "extra": true}));
    for bad in [json!([]), json!(["p", false, 1])] {
        let err = convert(sink(bad)).unwrap_err();
        assert_eq!(err.node.as_deref(), Some("Node 4 (Sink \"Out\")"));
        assert!(
            err.message
                .contains("but Sink takes 1 to 2 (prefix, extra)"),
            "{err}"
        );
    }
    let err = convert(sink(json!("text"))).unwrap_err();
    assert!(err.message.contains("must be a list or an object"), "{err}");
}

#[test]
fn object_shaped_widget_values_map_by_name() {
    let out = convert(json!({
        "nodes": [{"id": 1, "type": "Sink", "widgets_values": {
            "prefix": "vid", "extra": false, "crf": 19, "pix_fmt": "yuv420p",
            "videopreview": {"hidden": false, "params": {"filename": "a.mp4"}},
            "images": "not a widget"
        }}],
        "links": []
    }))
    .unwrap();
    assert_eq!(
        out["1"]["inputs"],
        json!({"prefix": "vid", "extra": false, "crf": 19, "pix_fmt": "yuv420p"})
    );
}

#[test]
fn links_follow_reroutes_and_bypassed_nodes_by_type() {
    let graph = json!({
        "nodes": [
            {"id": 1, "type": "Src", "outputs": [{"type": "IMAGE", "links": [1]}, {"type": "MASK", "links": [2]}]},
            // Bypassed with a MASK input first: an IMAGE consumer gets the IMAGE input (slot 1).
            {"id": 2, "type": "Pass", "mode": 4,
             "inputs": [{"name": "mask", "type": "MASK", "link": 2}, {"name": "image", "type": "IMAGE", "link": 1}],
             "outputs": [{"type": "IMAGE", "links": [3]}]},
            {"id": 3, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 3}],
             "outputs": [{"type": "IMAGE", "links": [4]}]},
            {"id": 5, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 4}],
             "widgets_values": ["p", true]}
        ],
        "links": [[1, 1, 0, 2, 1, "IMAGE"], [2, 1, 1, 2, 0, "MASK"], [3, 2, 0, 3, 0, "IMAGE"],
                  {"id": 4, "origin_id": 3, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "IMAGE"}]
    });
    let out = convert(graph).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["1", "5"]);
    assert_eq!(out["5"]["inputs"]["images"], json!(["1", 0]));
}

#[test]
fn kjnodes_get_nodes_read_their_set_node_and_rgthree_helpers_are_virtual() {
    let graph = json!({
        "nodes": [
            {"id": 1, "type": "Src", "outputs": [{"type": "IMAGE", "links": [1]}, {"type": "MASK", "links": null}]},
            {"id": 2, "type": "SetNode", "inputs": [{"name": "IMAGE", "type": "IMAGE", "link": 1}],
             "outputs": [{"type": "IMAGE", "links": null}], "widgets_values": ["pic"]},
            {"id": 3, "type": "GetNode", "outputs": [{"type": "IMAGE", "links": [2]}], "widgets_values": ["pic"]},
            {"id": 4, "type": "Reroute (rgthree)", "inputs": [{"name": "", "type": "*", "link": 2}],
             "outputs": [{"type": "IMAGE", "links": [3]}]},
            {"id": 5, "type": "Label (rgthree)", "widgets_values": []},
            {"id": 6, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
             "widgets_values": ["p"]}
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 3, 0, 4, 0, "IMAGE"], [3, 4, 0, 6, 0, "IMAGE"]]
    });
    let out = convert(graph.clone()).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["1", "6"]);
    assert_eq!(out["6"]["inputs"]["images"], json!(["1", 0]));
    let mut orphan = graph;
    orphan["nodes"][2]["widgets_values"] = json!(["other"]);
    let err = convert(orphan).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 3 (GetNode): is a GetNode for 'other', but no SetNode sets 'other'"
    );
    let everywhere = json!({"nodes": [node(1, "Anything Everywhere3", json!([]))], "links": []});
    let err = convert(everywhere).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Node 1 (Anything Everywhere3): broadcasts"),
        "{err}"
    );
}

#[test]
fn loops_and_dangling_links_are_errors_naming_the_node() {
    let looped = json!({
        "nodes": [
            {"id": 1, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 2}],
             "outputs": [{"type": "*", "links": [1]}]},
            {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"type": "*", "links": [2, 3]}]},
            {"id": 3, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
             "widgets_values": ["p"]}
        ],
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 2, 0, 3, 0, "IMAGE"]]
    });
    let err = convert(looped).unwrap_err();
    assert!(err.to_string().contains("loop of links"), "{err}");
    let dangling = json!({
        "nodes": [{"id": 3, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
                   "widgets_values": ["p"]}],
        "links": [[9, 77, 0, 3, 0, "IMAGE"]]
    });
    let err = convert(dangling).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 3 (Sink): input 'images' is linked (link 9) to node 77, which is not in the workflow (a dangling link)"
    );
}

#[test]
fn primitives_reach_widgets_through_reroutes_and_muted_links_are_dropped() {
    let graph = json!({
        "nodes": [
            {"id": 1, "type": "PrimitiveNode", "outputs": [{"type": "STRING", "links": [1], "widget": {"name": "prefix"}}],
             "widgets_values": ["from primitive"]},
            {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"type": "STRING", "links": [2]}]},
            {"id": 3, "type": "Src", "mode": 2, "outputs": [{"type": "IMAGE", "links": [3]}]},
            {"id": 4, "type": "Sink", "inputs": [
                {"name": "images", "type": "IMAGE", "link": 3},
                {"name": "prefix", "type": "STRING", "widget": {"name": "prefix"}, "link": 2}],
             "widgets_values": ["stale", true]}
        ],
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 4, 1, "STRING"], [3, 3, 0, 4, 0, "IMAGE"]]
    });
    let out = convert(graph).unwrap();
    assert_eq!(out.keys().collect::<Vec<_>>(), ["4"]);
    assert_eq!(
        out["4"]["inputs"],
        json!({"prefix": "from primitive", "extra": true})
    );
}

#[test]
fn structural_problems_are_clear_errors() {
    let cases = [
        (
            json!({"nodes": [], "links": []}),
            "the workflow has no nodes",
        ),
        (
            json!({"nodes": [5], "links": []}),
            "Node #1 of 'nodes': must be an object, got a number",
        ),
        (
            json!({"nodes": [{"id": 1}], "links": []}),
            "Node 1: has no 'type' (its node class)",
        ),
        (
            json!({"nodes": [{"type": "Sink"}], "links": []}),
            "Node #1 of 'nodes': has no valid 'id'",
        ),
        (
            json!({"nodes": [{"id": 1, "type": "Sink", "inputs": "x"}], "links": []}),
            "Node 1: is not a valid UI node: invalid type: string \"x\"",
        ),
        (
            json!({"nodes": [node(1, "Sink", json!(["p"])), node(1, "Sink", json!(["p"]))], "links": []}),
            "Node 1: appears twice in 'nodes'",
        ),
        (
            json!({"nodes": [node(1, "Sink", json!(["p"]))], "links": [[1, 2]]}),
            "link #1 of 'links' is malformed",
        ),
        (
            json!({"nodes": [node(1, "Sink", json!(["p"]))], "links": 3}),
            "'links' must be a list",
        ),
        (
            json!({"nodes": [node(1, "Note", json!(["hi"]))], "links": []}),
            "nothing to run",
        ),
        (
            json!({"nodes": [node(1, "workflow>mine", json!([]))], "links": [], "extra": {"groupNodes": {"mine": {}}}}),
            "Node 1 (workflow>mine): is a group node",
        ),
        (
            json!({"nodes": [node(1, "a3f1c2d4-7b8e-4f60-9c1d-2e3f4a5b6c7d", json!([]))], "links": []}),
            "Node 1 (a3f1c2d4-7b8e-4f60-9c1d-2e3f4a5b6c7d): is a subgraph instance",
        ),
        (
            json!({"nodes": [{"id": 1, "type": "PrimitiveNode", "outputs": [{"type": "INT", "links": [1]}], "widgets_values": []}], "links": []}),
            "Node 1 (PrimitiveNode): is connected but has no value",
        ),
    ];
    for (graph, want) in cases {
        let err = convert(graph.clone()).unwrap_err();
        assert!(err.to_string().starts_with(want), "{graph}: {err}");
    }
    // Null links (deleted ones in old exports) are skipped.
    assert!(convert(json!({"nodes": [node(1, "Sink", json!(["p"]))], "links": [null]})).is_ok());
}

#[test]
fn valid_connection_is_litegraphs() {
    assert!(valid_connection("IMAGE", "IMAGE"));
    assert!(valid_connection("*", "LATENT"));
    assert!(valid_connection("", "LATENT"));
    assert!(valid_connection("image", "IMAGE"));
    assert!(valid_connection("MASK,IMAGE", "IMAGE"));
    assert!(!valid_connection("MASK", "IMAGE"));
    assert!(!valid_connection("MASK,LATENT", "IMAGE,VAE"));
}

#[test]
fn dynamic_prompts_strip_comments_and_pick_options_like_the_frontend() {
    let mut rng = Rng::new(1);
    let p = |s: &str, rng: &mut Rng| dynamic_prompt(s, rng).unwrap();
    assert_eq!(p("a // comment\nb /* c */d", &mut rng), "a \nb d");
    assert_eq!(p("http://example.com/x", &mut rng), "http:");
    assert_eq!(p("/* open", &mut rng), "/* open");
    assert_eq!(p("{same|same|same}", &mut rng), "same");
    assert_eq!(p("x {{a|a}|{a|a}} y", &mut rng), "x a y");
    assert_eq!(
        p(r"keep \{braces\} and \| bars", &mut rng),
        "keep {braces} and | bars"
    );
    assert_eq!(p("trailing \\", &mut rng), "trailing \\undefined");
    // Every option can come out, and only options do.
    let mut seen = HashSet::new();
    for seed in 0..200 {
        seen.insert(p("{red|green|blue} car", &mut Rng::new(seed)));
    }
    assert_eq!(
        seen,
        ["red car", "green car", "blue car"]
            .map(String::from)
            .into()
    );
    let deep = format!("{}x{}", "{".repeat(500), "}".repeat(500));
    let err = dynamic_prompt(&deep, &mut rng).unwrap_err();
    assert_eq!(err, PromptTooDeep { depth: 500 });
    assert!(err.to_string().contains("nested 500 deep"));
    let unbalanced = "}}}{{{".repeat(1000);
    let _ = dynamic_prompt(&unbalanced, &mut rng);
}

#[test]
fn never_panics_on_odd_shapes() {
    let odd = [
        json!({"nodes": [{"id": 1, "type": "Sink", "inputs": [{"name": "images", "link": 1}]}],
               "links": [[1, 1, 0, 1, 0]]}),
        json!({"nodes": [{"id": 1, "type": "Pass", "mode": 4, "inputs": [], "outputs": [{"type": "IMAGE", "links": [1]}]},
                         {"id": 2, "type": "Sink", "inputs": [{"name": "images", "type": "*", "link": 1}], "widgets_values": ["p"]}],
               "links": [[1, 1, 0, 2, 0, "*"]]}),
        json!({"nodes": [{"id": 1, "type": "Pass", "mode": 4, "outputs": []},
                         {"id": 2, "type": "Sink", "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "widgets_values": ["p"]}],
               "links": [[1, 1, 5, 2, 0, "IMAGE"]]}),
        json!({"nodes": [{"id": "a", "type": "Sink", "mode": 1.5, "widgets_values": [null]}], "links": []}),
        json!({"nodes": [{"id": 1, "type": "Sink", "widgets_values": ["p"]}], "links": [{"id": 1}]}),
        json!({"nodes": [{"id": -1, "type": "Sink", "widgets_values": ["p"], "outputs": null, "inputs": null}], "links": null}),
    ];
    for graph in odd {
        let _ = convert(graph);
    }
}
