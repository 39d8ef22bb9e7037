//! What the simulated node classes do. Images travel through the graph as [`ImageInfo`] (size, batch,
//! fill) rather than pixels; a handful of classes have real behaviour (EmptyImage, the latent makers,
//! ImageScale/ImageScaleBy/ImageInvert, LoadImage, GetImageSize, PreviewAny, SaveImage, PreviewImage,
//! SaveImageWebsocket, RaiseError, the primitives), every node with an INT `steps` input runs a sampler-like
//! progress loop, and everything else passes its first image through (or makes a 512×512 one).

use serde_json::{json, Map, Value};

use super::catalog::NodeClass;
use super::exec::{Failure, Preview, PromptRun};
use super::image::{self, ImageInfo};
use super::store::{path, Files, Folder};
use super::ws::TEXT;
use super::{lock, pyfmt};

/// A value on a node output.
#[derive(Clone, Debug)]
pub(crate) enum OutValue {
    /// IMAGE, LATENT or MASK.
    Image(ImageInfo),
    /// INT, FLOAT, STRING, BOOLEAN, or a literal input value.
    Json(Value),
    /// Anything the simulator does not model (MODEL, CLIP, CONDITIONING, ...), by type name.
    Opaque(String),
}

impl OutValue {
    /// `execution.format_value`: primitives as they are, everything else as `str(x)`.
    pub(crate) fn format_value(&self) -> Value {
        match self {
            OutValue::Json(
                v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)),
            ) => v.clone(),
            OutValue::Json(other) => Value::String(pyfmt::py_str(other)),
            OutValue::Image(info) => Value::String(info.python_str()),
            OutValue::Opaque(kind) => Value::String(format!("<{kind} object>")),
        }
    }
}

/// Per-node instance state kept across prompts (`caches.objects`).
#[derive(Default)]
pub(crate) struct NodeObject {
    /// PreviewImage's `"_temp_" + 5 random letters`.
    temp_suffix: Option<String>,
}

/// The node being executed.
pub(crate) struct NodeCtx<'a> {
    pub(crate) id: &'a str,
    pub(crate) class_type: &'a str,
    pub(crate) class: NodeClass<'a>,
    /// Declared inputs present in the prompt, in prompt order (`None`: a link to a missing result).
    pub(crate) inputs: &'a [(String, Option<OutValue>)],
    pub(crate) prompt: &'a Map<String, Value>,
    pub(crate) extra_data: &'a Map<String, Value>,
}

/// What a node returns: its outputs and its `ui` dict.
pub(crate) struct NodeOutput {
    pub(crate) outputs: Vec<OutValue>,
    pub(crate) ui: Option<Map<String, Value>>,
}

/// Execute one node.
pub(crate) async fn run(
    node: &NodeCtx<'_>,
    run: &mut PromptRun,
    object: &mut NodeObject,
) -> Result<NodeOutput, Failure> {
    if let Some(steps) = node.steps() {
        let preview = (node.class_type == "SlowSteps" && node.flag("send_preview")).then(|| {
            let source = node.first_image().unwrap_or_else(default_image);
            let (w, h) = image::contain(source.width, source.height, 64);
            Preview {
                bytes: image::encode_jpeg_solid(w as u16, h as u16, source.average()),
                format: 1,
                mime: "image/jpeg",
            }
        });
        for step in 1..=steps {
            run.step(node.id, step, steps, preview.as_ref()).await?;
        }
    }

    let passthrough = || node.first_image().unwrap_or_else(default_image);
    let result = match node.class_type {
        "EmptyImage" => {
            let color = node.int("color").unwrap_or(0);
            let rgb = [(color >> 16) as u8, (color >> 8) as u8, color as u8];
            node.outputs(
                Some(ImageInfo::solid(
                    node.dim("width"),
                    node.dim("height"),
                    node.dim("batch_size"),
                    rgb,
                )),
                None,
            )
        }
        "ImageScale" => {
            let src = passthrough();
            let (w, h) = (
                node.int("width").unwrap_or(0),
                node.int("height").unwrap_or(0),
            );
            let scaled = match (w, h) {
                (0, 0) => src,
                (0, h) => src.resized(
                    py_round(src.width as f64 * h as f64 / src.height as f64),
                    clamp_dim(h),
                ),
                (w, 0) => src.resized(
                    clamp_dim(w),
                    py_round(src.height as f64 * w as f64 / src.width as f64),
                ),
                (w, h) => src.resized(clamp_dim(w), clamp_dim(h)),
            };
            node.outputs(Some(scaled), None)
        }
        "ImageScaleBy" => {
            let src = passthrough();
            let by = node.float("scale_by").unwrap_or(1.0);
            let scaled = src.resized(
                py_round(src.width as f64 * by),
                py_round(src.height as f64 * by),
            );
            node.outputs(Some(scaled), None)
        }
        "ImageInvert" => node.outputs(Some(passthrough().inverted()), None),
        "LoadImage" | "LoadImageMask" => node.outputs(Some(load_image(run, node)), None),
        "GetImageSize" => {
            let src = passthrough();
            let text = format!(
                "width: {}, height: {}\n batch size: {}",
                src.width, src.height, src.batch
            );
            let mut payload = (node.id.len() as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(node.id.as_bytes());
            payload.extend_from_slice(text.as_bytes());
            run.shared.hub.send_binary(TEXT, &payload, None);
            NodeOutput {
                outputs: vec![
                    OutValue::Json(json!(src.width)),
                    OutValue::Json(json!(src.height)),
                    OutValue::Json(json!(src.batch)),
                ],
                ui: None,
            }
        }
        "PreviewAny" => {
            let text = match node.value("source") {
                None | Some(OutValue::Json(Value::Null)) => "None".to_owned(),
                Some(OutValue::Json(
                    v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)),
                )) => pyfmt::py_str(v),
                Some(OutValue::Json(v)) => pyfmt::to_json(v),
                Some(other) => pyfmt::py_str(&other.format_value()),
            };
            let mut ui = Map::new();
            ui.insert("text".into(), json!([text]));
            NodeOutput {
                outputs: Vec::new(),
                ui: Some(ui),
            }
        }
        "SaveImage" => {
            let prefix = node
                .string("filename_prefix")
                .unwrap_or_else(|| "ComfyUI".into());
            save_images(run, node, &passthrough(), Folder::Output, &prefix).await?
        }
        "PreviewImage" => {
            let suffix = object
                .temp_suffix
                .get_or_insert_with(random_temp_suffix)
                .clone();
            save_images(
                run,
                node,
                &passthrough(),
                Folder::Temp,
                &format!("ComfyUI{suffix}"),
            )
            .await?
        }
        "SaveImageWebsocket" => {
            let images = passthrough();
            let info = ImageInfo {
                batch: 1,
                ..images.clone()
            };
            let png = encode(&info, Vec::new()).await?;
            let preview = Preview {
                bytes: png,
                format: 2,
                mime: "image/png",
            };
            let total = u64::from(images.batch);
            for step in 0..total {
                run.report_progress(node.id, step, total, Some(&preview))?;
            }
            NodeOutput {
                outputs: Vec::new(),
                ui: None,
            }
        }
        "RaiseError" => {
            return Err(Failure::Error {
                exception_type: "RuntimeError".into(),
                message: node.string("message").unwrap_or_default(),
                traceback: traceback(frame(
                    "/comfyui/custom_nodes/test_progress/__init__.py",
                    72,
                    "run",
                    "raise RuntimeError(message)",
                    None,
                )),
            });
        }
        "PrimitiveInt"
        | "PrimitiveFloat"
        | "PrimitiveString"
        | "PrimitiveStringMultiline"
        | "PrimitiveBoolean" => {
            node.outputs(None, node.value("value").and_then(OutValue::json).cloned())
        }
        class if class.starts_with("Empty") && class.contains("Latent") => {
            let latent = ImageInfo::gradient(
                node.dim("width"),
                node.dim("height"),
                node.dim("batch_size"),
            );
            node.outputs(Some(latent), None)
        }
        _ => node.outputs(Some(passthrough()), None),
    };
    Ok(result)
}

fn default_image() -> ImageInfo {
    ImageInfo::gradient(512, 512, 1)
}

/// Python's `round()` to a pixel count of at least 1.
fn py_round(v: f64) -> u32 {
    clamp_dim(v.round_ties_even() as i64)
}

/// ComfyUI's `MAX_RESOLUTION`: no simulated image gets bigger than this per side.
const MAX_RESOLUTION: i64 = 16_384;

fn clamp_dim(v: i64) -> u32 {
    v.clamp(1, MAX_RESOLUTION) as u32
}

impl NodeCtx<'_> {
    fn value(&self, name: &str) -> Option<&OutValue> {
        self.inputs
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
    }

    fn json(&self, name: &str) -> Option<&Value> {
        self.value(name).and_then(OutValue::json)
    }

    fn int(&self, name: &str) -> Option<i64> {
        let n = self.json(name)?;
        n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))
    }

    fn float(&self, name: &str) -> Option<f64> {
        self.json(name)?.as_f64()
    }

    fn string(&self, name: &str) -> Option<String> {
        self.json(name).map(pyfmt::py_str)
    }

    fn flag(&self, name: &str) -> bool {
        self.json(name).is_some_and(pyfmt::truthy)
    }

    /// A size input, kept within what the simulator is willing to render.
    fn dim(&self, name: &str) -> u32 {
        clamp_dim(self.int(name).unwrap_or(1))
    }

    /// Steps of a sampler-like node: any literal (or linked) INT `steps` input.
    fn steps(&self) -> Option<u64> {
        let def = self.class.input("steps")?;
        if def.kind_str() != Some("INT") {
            return None;
        }
        u64::try_from(self.int("steps")?).ok().filter(|s| *s > 0)
    }

    /// The first image-carrying input that holds an image.
    fn first_image(&self) -> Option<ImageInfo> {
        self.class
            .inputs()
            .into_iter()
            .filter(|def| def.carries_image())
            .find_map(|def| match self.value(def.name) {
                Some(OutValue::Image(info)) => Some(info.clone()),
                _ => None,
            })
    }

    /// Fill every declared output: images (as latent or pixels by type), primitives, opaque objects.
    fn outputs(&self, image: Option<ImageInfo>, primitive: Option<Value>) -> NodeOutput {
        let outputs = self
            .class
            .return_types()
            .iter()
            .map(|kind| match (kind.as_str(), &image, &primitive) {
                (Some(t @ ("IMAGE" | "LATENT" | "MASK")), Some(info), _) => {
                    OutValue::Image(ImageInfo {
                        latent: t == "LATENT",
                        ..info.clone()
                    })
                }
                (Some("INT" | "FLOAT" | "STRING" | "BOOLEAN"), _, Some(v)) => {
                    OutValue::Json(v.clone())
                }
                (Some(t), _, _) => OutValue::Opaque(t.to_owned()),
                (None, _, _) => OutValue::Opaque(pyfmt::py_str(kind)),
            })
            .collect();
        NodeOutput { outputs, ui: None }
    }
}

impl OutValue {
    fn json(&self) -> Option<&Value> {
        match self {
            OutValue::Json(v) => Some(v),
            _ => None,
        }
    }
}

/// LoadImage: the size of the uploaded file when its header says so, else 512×512.
fn load_image(run: &PromptRun, node: &NodeCtx<'_>) -> ImageInfo {
    let size = node.string("image").and_then(|name| {
        let (folder, rel) = Files::resolve_annotated(&name)?;
        let store = lock(&run.shared.store);
        image::image_size(store.files.get(folder, &rel)?)
    });
    let (w, h) = size.unwrap_or((512, 512));
    ImageInfo::gradient(w.max(1), h.max(1), 1)
}

/// `"_temp_" + 5 letters` from PreviewImage's alphabet (which really has no `w` and two `p`s).
fn random_temp_suffix() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstupvxyz";
    let random = uuid::Uuid::new_v4();
    let letters: String = random.as_bytes()[..5]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("_temp_{letters}")
}

/// `SaveImage.save_images`: `folder_paths.get_save_image_path`, then one PNG per batch image.
async fn save_images(
    run: &PromptRun,
    node: &NodeCtx<'_>,
    images: &ImageInfo,
    folder: Folder,
    prefix: &str,
) -> Result<NodeOutput, Failure> {
    let output_dir = folder.root();
    let prefix = if prefix.contains('%') {
        compute_vars(prefix, images.width, images.height)
    } else {
        prefix.to_owned()
    };
    let normalized = path::normpath(&prefix);
    let subfolder = path::dirname(&normalized);
    let filename = path::basename(&normalized).to_owned();
    let full_output_folder = path::normpath(&path::join(&output_dir, &subfolder));
    let Some(rel_folder) = folder.relative(&full_output_folder) else {
        let message = format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {full_output_folder}\n         output_dir: {output_dir}\n         commonpath: {}",
            path::commonpath(&output_dir, &full_output_folder)
        );
        let mut frames = frame(
            "/comfyui/nodes.py",
            1590,
            "save_images",
            "full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])",
            Some((72, 106)),
        );
        frames.extend(frame(
            "/comfyui/folder_paths.py",
            397,
            "get_save_image_path",
            "raise Exception(err)",
            None,
        ));
        return Err(Failure::Error {
            exception_type: "Exception".into(),
            message,
            traceback: traceback(frames),
        });
    };

    let mut texts = vec![("prompt".to_owned(), pyfmt::to_json(node.prompt))];
    if let Some(Value::Object(extra)) = node.extra_data.get("extra_pnginfo") {
        texts.extend(extra.iter().map(|(k, v)| (k.clone(), pyfmt::to_json(v))));
    }
    let mut frame_info = ImageInfo {
        batch: 1,
        ..images.clone()
    };
    if run.shared.config.noise_images {
        frame_info.fill = image::Fill::Noise;
    }
    let png: bytes::Bytes = encode(&frame_info, texts).await?.into();

    let mut store = lock(&run.shared.store);
    let first = next_counter(
        &store.files.list_dir(folder, &rel_folder),
        &prefix,
        &filename,
    );
    let mut results = Vec::new();
    for (batch_number, counter) in (0..images.batch).zip(first..) {
        let name = format!(
            "{}_{counter:05}_.png",
            filename.replace("%batch_num%", &batch_number.to_string())
        );
        store
            .files
            .put(folder, &path::join(&rel_folder, &name), png.clone());
        results.push(json!({"filename": name, "subfolder": subfolder, "type": folder.as_str()}));
    }
    let mut ui = Map::new();
    ui.insert("images".into(), Value::Array(results));
    Ok(NodeOutput {
        outputs: Vec::new(),
        ui: Some(ui),
    })
}

/// Encode a PNG off the async threads.
async fn encode(info: &ImageInfo, texts: Vec<(String, String)>) -> Result<Vec<u8>, Failure> {
    let info = info.clone();
    let encoded = tokio::task::spawn_blocking(move || image::encode_png(&info, &texts)).await;
    match encoded {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => Err(Failure::Error {
            exception_type: "OSError".into(),
            message: error.to_string(),
            traceback: Vec::new(),
        }),
        Err(error) => Err(Failure::Error {
            exception_type: "RuntimeError".into(),
            message: error.to_string(),
            traceback: Vec::new(),
        }),
    }
}

/// The counter part of `get_save_image_path`: one more than the highest `<filename>_NNNNN` in the folder.
fn next_counter(existing: &[String], prefix: &str, filename: &str) -> u64 {
    let prefix_len = path::basename(prefix).chars().count();
    existing
        .iter()
        .filter_map(|name| {
            let chars: Vec<char> = name.chars().collect();
            let head: String = chars.iter().take(prefix_len + 1).collect();
            let rest: String = chars.iter().skip(prefix_len + 1).collect();
            let stem = head.strip_suffix('_')?;
            if stem != filename {
                return None;
            }
            Some(rest.split('_').next()?.trim().parse::<u64>().unwrap_or(0))
        })
        .max()
        .map_or(1, |m| m + 1)
}

/// `folder_paths.get_save_image_path`'s `compute_vars` (UTC stands in for local time).
fn compute_vars(input: &str, width: u32, height: u32) -> String {
    let secs = super::exec::now_ms() / 1000;
    let days = (secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let rem = secs % 86_400;
    input
        .replace("%width%", &width.to_string())
        .replace("%height%", &height.to_string())
        .replace("%year%", &year.to_string())
        .replace("%month%", &format!("{month:02}"))
        .replace("%day%", &format!("{day:02}"))
        .replace("%hour%", &format!("{:02}", rem / 3600))
        .replace("%minute%", &format!("{:02}", rem % 3600 / 60))
        .replace("%second%", &format!("{:02}", rem % 60))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One traceback entry as `traceback.format_tb` prints it, with an optional caret line.
fn frame(
    file: &str,
    line: u32,
    function: &str,
    code: &str,
    caret: Option<(usize, usize)>,
) -> Vec<String> {
    let mut text = format!("  File \"{file}\", line {line}, in {function}\n    {code}\n");
    if let Some((start, len)) = caret {
        text.push_str(&" ".repeat(start));
        text.push_str(&"^".repeat(len));
        text.push('\n');
    }
    vec![text]
}

/// The executor frames every node error goes through, then the node's own frames.
fn traceback(node_frames: Vec<String>) -> Vec<String> {
    let mut frames = frame(
        "/comfyui/execution.py",
        496,
        "execute",
        "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)",
        Some((62, 163)),
    );
    frames.extend(frame(
        "/comfyui/execution.py",
        315,
        "get_output_data",
        "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)",
        Some((20, 209)),
    ));
    frames.extend(frame(
        "/comfyui/execution.py",
        289,
        "_async_map_node_over_list",
        "await process_inputs(input_dict, i)",
        None,
    ));
    frames.extend(frame(
        "/comfyui/execution.py",
        277,
        "process_inputs",
        "result = f(**inputs)",
        Some((13, 11)),
    ));
    frames.extend(node_frames);
    frames
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn save_counter_follows_existing_files() {
        let files = vec![
            "wf1_00001_.png".to_owned(),
            "wf1_00007_.png".to_owned(),
            "wf10_00020_.png".to_owned(),
        ];
        assert_eq!(next_counter(&files, "probe/wf1", "wf1"), 8);
        assert_eq!(next_counter(&files, "other", "other"), 1);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
