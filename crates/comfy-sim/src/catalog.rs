//! The node catalogue: the real server's recorded `GET /object_info` (498 classes), extended with a few
//! model file names so realistic SDXL/Flux jobs validate and with one popular third-party class
//! (VideoHelperSuite's `VHS_VideoCombine`, see [`VHS_VIDEO_COMBINE`]), plus typed accessors for the parts
//! validation and execution need (input specs in `input_order`, return types, `output_node`, hidden inputs).

use serde_json::{Map, Value};

/// The real ComfyUI 0.3.64 `/object_info` reply. It lives in this crate (`assets/`) so the crate
/// is self-contained (`cargo package` keeps only files under the crate's directory); the root
/// package's tests and the fuzz targets read it from here as a real server's `/object_info`.
const OBJECT_INFO: &str = include_str!("../assets/object_info.json");

/// Checkpoint names offered in every `ckpt_name` combo (the recording had no model files).
pub(crate) const CHECKPOINTS: [&str; 2] =
    ["flux1-dev-fp8.safetensors", "sd_xl_base_1.0.safetensors"];
/// VAE names offered in every `vae_name` combo, before the recorded entries (`pixel_space`).
pub(crate) const VAES: [&str; 2] = ["sdxl-vae-fp16-fix.safetensors", "sdxl_vae.safetensors"];
/// VideoHelperSuite's `Video Combine` (Kosinkadink/ComfyUI-VideoHelperSuite `videohelpersuite/nodes.py`
/// `VideoCombine.INPUT_TYPES`), as its `/object_info` entry reads with the usual formats installed. It is
/// a custom node, so the recording does not have it; it is here because it is how most video workflows
/// save (`ui.gifs`). Format-specific widgets (`pix_fmt`, `crf`, ...) are extra inputs ComfyUI ignores.
pub(crate) const VHS_VIDEO_COMBINE: &str = r#"{
  "input": {
    "required": {
      "images": ["IMAGE"],
      "frame_rate": ["FLOAT", {"default": 8, "min": 1, "step": 1}],
      "loop_count": ["INT", {"default": 0, "min": 0, "max": 100, "step": 1}],
      "filename_prefix": ["STRING", {"default": "AnimateDiff"}],
      "format": [["image/gif", "image/webp", "video/ffmpeg-gif", "video/h264-mp4", "video/h265-mp4", "video/webm"], {}],
      "pingpong": ["BOOLEAN", {"default": false}],
      "save_output": ["BOOLEAN", {"default": true}]
    },
    "optional": {"audio": ["AUDIO"], "meta_batch": ["VHS_BatchManager"], "vae": ["VAE"]},
    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}
  },
  "input_order": {
    "required": ["images", "frame_rate", "loop_count", "filename_prefix", "format", "pingpong", "save_output"],
    "optional": ["audio", "meta_batch", "vae"],
    "hidden": ["prompt", "extra_pnginfo", "unique_id"]
  },
  "output": ["VHS_FILENAMES"],
  "output_is_list": [false],
  "output_name": ["Filenames"],
  "name": "VHS_VideoCombine",
  "display_name": "Video Combine 🎥🅥🅗🅢",
  "description": "",
  "python_module": "custom_nodes.ComfyUI-VideoHelperSuite",
  "category": "Video Helper Suite 🎥🅥🅗🅢",
  "output_node": true
}"#;

/// Classes whose `image` combo lists the top-level files of the input folder.
const INPUT_IMAGE_LOADERS: [&str; 2] = ["LoadImage", "LoadImageMask"];

/// All node classes the simulated server knows.
pub(crate) struct Catalog {
    classes: Map<String, Value>,
}

impl Catalog {
    /// Parse the embedded object_info and add the simulated model files.
    pub(crate) fn load() -> Result<Catalog, serde_json::Error> {
        let mut classes: Map<String, Value> = serde_json::from_str(OBJECT_INFO)?;
        classes.insert(
            "VHS_VideoCombine".to_owned(),
            serde_json::from_str(VHS_VIDEO_COMBINE)?,
        );
        for info in classes.values_mut() {
            for category in ["required", "optional"] {
                let Some(inputs) = info
                    .get_mut("input")
                    .and_then(|i| i.get_mut(category))
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                for (name, spec) in inputs.iter_mut() {
                    let names: &[&str] = match name.as_str() {
                        "ckpt_name" => &CHECKPOINTS,
                        "vae_name" => &VAES,
                        _ => continue,
                    };
                    if let Some(options) = combo_options_mut(spec) {
                        for (i, n) in names.iter().enumerate() {
                            if !options.iter().any(|o| o.as_str() == Some(n)) {
                                options.insert(i, Value::String((*n).to_owned()));
                            }
                        }
                    }
                }
            }
        }
        Ok(Catalog { classes })
    }

    pub(crate) fn class(&self, name: &str) -> Option<NodeClass<'_>> {
        let info = self.classes.get(name)?.as_object()?;
        Some(NodeClass { info })
    }

    /// `GET /object_info`, with the loaders' file lists filled from the input folder.
    pub(crate) fn object_info(&self, input_files: &[String]) -> Value {
        let mut all = self.classes.clone();
        for class in INPUT_IMAGE_LOADERS {
            if let Some(info) = all.get_mut(class) {
                set_input_file_list(info, input_files);
            }
        }
        Value::Object(all)
    }

    /// `GET /object_info/{class}`: `{class: info}` or `{}`.
    pub(crate) fn object_info_for(&self, class: &str, input_files: &[String]) -> Value {
        let mut out = Map::new();
        if let Some(info) = self.classes.get(class) {
            let mut info = info.clone();
            if INPUT_IMAGE_LOADERS.contains(&class) {
                set_input_file_list(&mut info, input_files);
            }
            out.insert(class.to_owned(), info);
        }
        Value::Object(out)
    }
}

fn set_input_file_list(info: &mut Value, files: &[String]) {
    if let Some(options) = info
        .get_mut("input")
        .and_then(|i| i.get_mut("required"))
        .and_then(|r| r.get_mut("image"))
        .and_then(combo_options_mut)
    {
        *options = files.iter().cloned().map(Value::String).collect();
    }
}

/// The option list of a combo spec: V1 `[[..], {..}]` or V3 `["COMBO", {"options": [..]}]`.
fn combo_options_mut(spec: &mut Value) -> Option<&mut Vec<Value>> {
    let spec = spec.as_array_mut()?;
    if spec.first().is_some_and(Value::is_array) {
        return spec.first_mut()?.as_array_mut();
    }
    if spec.first().and_then(Value::as_str) == Some("COMBO") {
        return spec.get_mut(1)?.get_mut("options")?.as_array_mut();
    }
    None
}

/// One node class's object_info entry.
#[derive(Clone, Copy)]
pub(crate) struct NodeClass<'a> {
    info: &'a Map<String, Value>,
}

/// One declared (required or optional) input.
#[derive(Clone, Copy)]
pub(crate) struct InputDef<'a> {
    pub(crate) name: &'a str,
    pub(crate) required: bool,
    /// `"INT"`, `"IMAGE"`, `"COMBO"`, or the option list of a V1 combo.
    pub(crate) kind: &'a Value,
    /// The options dict (`{"min": .., "max": ..}`); `None` when the spec has none.
    pub(crate) extra: Option<&'a Map<String, Value>>,
}

impl<'a> InputDef<'a> {
    pub(crate) fn kind_str(&self) -> Option<&'a str> {
        self.kind.as_str()
    }

    pub(crate) fn extra_get(&self, key: &str) -> Option<&'a Value> {
        self.extra.and_then(|e| e.get(key))
    }

    /// `input_config` of validation errors: `[type, extra_info]`.
    pub(crate) fn config_json(&self) -> Value {
        Value::Array(vec![
            self.kind.clone(),
            Value::Object(self.extra.cloned().unwrap_or_default()),
        ])
    }

    /// The options of a combo input, `None` for other inputs.
    pub(crate) fn combo_options(&self) -> Option<&'a [Value]> {
        match self.kind {
            Value::Array(options) => Some(options),
            Value::String(s) if s == "COMBO" => Some(
                self.extra_get("options")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice),
            ),
            _ => None,
        }
    }

    /// IMAGE / LATENT / MASK inputs carry images through the simulated graph.
    pub(crate) fn carries_image(&self) -> bool {
        matches!(self.kind_str(), Some("IMAGE" | "LATENT" | "MASK"))
    }
}

impl<'a> NodeClass<'a> {
    pub(crate) fn is_output(&self) -> bool {
        self.info.get("output_node").and_then(Value::as_bool) == Some(true)
    }

    /// `RETURN_TYPES`.
    pub(crate) fn return_types(&self) -> &'a [Value] {
        self.info
            .get("output")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Required inputs, then optional ones, each in `input_order`.
    pub(crate) fn inputs(&self) -> Vec<InputDef<'a>> {
        let mut out = Vec::new();
        for (category, required) in [("required", true), ("optional", false)] {
            let Some(specs) = self
                .info
                .get("input")
                .and_then(|i| i.get(category))
                .and_then(Value::as_object)
            else {
                continue;
            };
            let order: Vec<&str> = self
                .info
                .get("input_order")
                .and_then(|o| o.get(category))
                .and_then(Value::as_array)
                .map(|names| names.iter().filter_map(Value::as_str).collect())
                .unwrap_or_else(|| specs.keys().map(String::as_str).collect());
            for name in order {
                let Some((name, spec)) = specs.get_key_value(name) else {
                    continue;
                };
                let spec = spec.as_array().map_or(&[][..], Vec::as_slice);
                let Some(kind) = spec.first() else {
                    continue;
                };
                out.push(InputDef {
                    name,
                    required,
                    kind,
                    extra: spec.get(1).and_then(Value::as_object),
                });
            }
        }
        out
    }

    pub(crate) fn input(&self, name: &str) -> Option<InputDef<'a>> {
        self.inputs().into_iter().find(|i| i.name == name)
    }

    /// Hidden inputs as `(name, kind)`, e.g. `("prompt", "PROMPT")` (V1 `"PROMPT"`, V3 `["PROMPT"]`).
    pub(crate) fn hidden(&self) -> Vec<(&'a str, &'a str)> {
        let Some(hidden) = self
            .info
            .get("input")
            .and_then(|i| i.get("hidden"))
            .and_then(Value::as_object)
        else {
            return Vec::new();
        };
        hidden
            .iter()
            .filter_map(|(name, spec)| {
                let kind = spec
                    .as_str()
                    .or_else(|| spec.as_array()?.first()?.as_str())?;
                Some((name.as_str(), kind))
            })
            .collect()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn model_names_are_added_to_v1_and_v3_combos() {
        let catalog = Catalog::load().expect("object_info parses");
        let ckpt = catalog.class("CheckpointLoaderSimple").expect("class");
        let options = ckpt
            .input("ckpt_name")
            .and_then(|i| i.combo_options())
            .expect("combo");
        assert_eq!(options, &CHECKPOINTS.map(Value::from)[..]);
        let vae = catalog.class("VAELoader").expect("class");
        let options = vae
            .input("vae_name")
            .and_then(|i| i.combo_options())
            .expect("combo");
        assert_eq!(options.last().and_then(Value::as_str), Some("pixel_space"));
        assert_eq!(options.len(), 3);
        assert!(catalog.class("SaveImage").expect("class").is_output());
        let save_video = catalog.class("SaveVideo").expect("class");
        assert_eq!(
            save_video.hidden(),
            vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")]
        );
        assert!(save_video
            .input("format")
            .and_then(|i| i.combo_options())
            .is_some());
    }
}
