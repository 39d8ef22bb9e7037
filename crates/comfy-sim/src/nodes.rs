//! What the simulated node classes do. Images travel through the graph as [`ImageInfo`] (size, batch,
//! fill) rather than pixels, videos and sounds as [`VideoInfo`] / [`AudioInfo`]; a handful of classes
//! have real behaviour (EmptyImage, the latent makers, ImageScale/ImageScaleBy/ImageInvert, LoadImage,
//! GetImageSize, PreviewAny, SaveImage, PreviewImage, SaveImageWebsocket, RaiseError, the primitives, and
//! for the other output kinds CreateVideo, GetVideoComponents, EmptyAudio, EmptyLatentAudio,
//! VAEDecodeAudio, SaveVideo, SaveWEBM, SaveAnimatedWEBP/PNG, SaveAudio/MP3/Opus, PreviewAudio,
//! SaveLatent and VideoHelperSuite's VHS_VideoCombine), every node with an INT `steps` input runs a
//! sampler-like progress loop, and everything else passes its first image (video, audio) through, or
//! makes a 512×512 one.

use serde_json::{json, Map, Value};

use super::catalog::NodeClass;
use super::image::{self, ImageInfo};
use super::media::{self, AudioInfo, VideoInfo};
use super::prompt_run::{Failure, Preview, PromptRun};
use super::store::{path, Files, Folder, Store};
use super::ws::TEXT;
use super::{lock, pyfmt};

/// A value on a node output.
#[derive(Clone, Debug)]
pub(crate) enum OutValue {
    /// IMAGE, LATENT or MASK.
    Image(ImageInfo),
    /// VIDEO.
    Video(VideoInfo),
    /// AUDIO.
    Audio(AudioInfo),
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
            OutValue::Video(_) => Value::String(
                "<comfy_api.latest._input_impl.video_types.VideoFromComponents object>".into(),
            ),
            OutValue::Audio(audio) => Value::String(audio.python_str()),
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
        let previewing = node.class_type == "SlowSteps" && node.flag("send_preview");
        let source = node.first_image().unwrap_or_else(default_image);
        let (w, h) = image::contain(source.width, source.height, 64);
        run.model_loading(node.id);
        for step in 1..=steps {
            // As a sampler's latent previews do, the image converges on the result: from grey
            // noise at the first step to the image's own colour at the last.
            let preview = previewing.then(|| Preview {
                bytes: image::encode_jpeg_solid(
                    w as u16,
                    h as u16,
                    converging(source.average(), step, steps),
                ),
                format: 1,
                mime: "image/jpeg",
            });
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
                lock(&run.shared.log)
                    .websocket_images
                    .push((node.id.to_owned(), preview.bytes.clone()));
            }
            NodeOutput {
                outputs: Vec::new(),
                ui: None,
            }
        }
        "CreateVideo" => NodeOutput {
            outputs: vec![OutValue::Video(VideoInfo {
                frames: passthrough(),
                fps: node.float("fps").unwrap_or(30.0),
                audio: node.first_audio(),
            })],
            ui: None,
        },
        "GetVideoComponents" => {
            let video = node.first_video().unwrap_or_else(|| default_video(None));
            NodeOutput {
                outputs: vec![
                    OutValue::Image(video.frames),
                    video
                        .audio
                        .map_or(OutValue::Json(Value::Null), OutValue::Audio),
                    OutValue::Json(json!(video.fps)),
                ],
                ui: None,
            }
        }
        "EmptyAudio" => {
            let sample_rate = node.int("sample_rate").unwrap_or(44_100).clamp(1, 768_000) as u32;
            let duration = node.float("duration").unwrap_or(60.0).clamp(0.0, 86_400.0);
            NodeOutput {
                outputs: vec![OutValue::Audio(AudioInfo {
                    batch: 1,
                    channels: node.int("channels").unwrap_or(2).clamp(1, 2) as u32,
                    samples: (duration * f64::from(sample_rate)).round() as u64,
                    sample_rate,
                })],
                ui: None,
            }
        }
        "EmptyLatentAudio" => {
            // `length = round((seconds * 44100 / 2048) / 2) * 2`, the latent being [batch, 64, length].
            let seconds = node.float("seconds").unwrap_or(47.6);
            let length = ((seconds * 44_100.0 / 2048.0 / 2.0).round_ties_even() * 2.0) as i64;
            let latent = ImageInfo::gradient(clamp_dim(length), 1, node.dim("batch_size"));
            node.outputs(Some(latent), None)
        }
        "VAEDecodeAudio" => {
            let latent = passthrough();
            NodeOutput {
                outputs: vec![OutValue::Audio(AudioInfo {
                    batch: latent.batch,
                    channels: 2,
                    samples: u64::from(latent.width) * 2048,
                    sample_rate: 44_100,
                })],
                ui: None,
            }
        }
        "SaveVideo" => {
            let video = node.first_video().unwrap_or_else(|| default_video(None));
            let prefix = node
                .string("filename_prefix")
                .unwrap_or_else(|| "video/ComfyUI".into());
            let dir = SaveDir::new(
                Folder::Output,
                &prefix,
                video.frames.width,
                video.frames.height,
            )?;
            let bytes = media::mp4(&video, &pyfmt::to_json(node.prompt));
            let mut store = lock(&run.shared.store);
            let counter = dir.counter(&store);
            let entry = dir.put(
                &mut store,
                &format!("{}_{counter:05}_.mp4", dir.filename),
                bytes,
            );
            animated_ui(vec![entry], true)
        }
        "SaveWEBM" => {
            let frames = passthrough();
            let prefix = node
                .string("filename_prefix")
                .unwrap_or_else(|| "ComfyUI".into());
            let dir = SaveDir::new(Folder::Output, &prefix, frames.width, frames.height)?;
            let fps = node.float("fps").unwrap_or(24.0);
            let bytes = media::webm(&frames, fps, &pyfmt::to_json(node.prompt));
            let mut store = lock(&run.shared.store);
            let counter = dir.counter(&store);
            let entry = dir.put(
                &mut store,
                &format!("{}_{counter:05}_.webm", dir.filename),
                bytes,
            );
            animated_ui(vec![entry], true)
        }
        "SaveAnimatedWEBP" | "SaveAnimatedPNG" => {
            let frames = passthrough();
            let prefix = node
                .string("filename_prefix")
                .unwrap_or_else(|| "ComfyUI".into());
            let dir = SaveDir::new(Folder::Output, &prefix, frames.width, frames.height)?;
            let fps = node.float("fps").unwrap_or(6.0);
            let (bytes, ext, animated) = if node.class_type == "SaveAnimatedWEBP" {
                (
                    media::animated_webp(&frames, fps, 0),
                    "webp",
                    frames.batch != 1,
                )
            } else {
                let first = ImageInfo {
                    batch: 1,
                    ..frames.clone()
                };
                (encode(&first, Vec::new()).await?, "png", true)
            };
            let mut store = lock(&run.shared.store);
            let counter = dir.counter(&store);
            let entry = dir.put(
                &mut store,
                &format!("{}_{counter:05}_.{ext}", dir.filename),
                bytes,
            );
            animated_ui(vec![entry], animated)
        }
        "SaveAudio" | "SaveAudioMP3" | "SaveAudioOpus" | "PreviewAudio" => {
            let audio = node.first_audio().unwrap_or_else(default_audio);
            let (folder, prefix) = if node.class_type == "PreviewAudio" {
                let suffix = object
                    .temp_suffix
                    .get_or_insert_with(random_temp_suffix)
                    .clone();
                (Folder::Temp, format!("ComfyUI{suffix}"))
            } else {
                let prefix = node
                    .string("filename_prefix")
                    .unwrap_or_else(|| "audio/ComfyUI".into());
                (Folder::Output, prefix)
            };
            let dir = SaveDir::new(folder, &prefix, 0, 0)?;
            let (ext, encode): (&str, AudioEncoder) = match node.class_type {
                "SaveAudioMP3" => ("mp3", media::mp3),
                "SaveAudioOpus" => ("opus", media::opus),
                _ => ("flac", media::flac),
            };
            let mut store = lock(&run.shared.store);
            let first = dir.counter(&store);
            let results = (0..audio.batch.max(1))
                .zip(first..)
                .map(|(batch_number, counter)| {
                    let stem = dir
                        .filename
                        .replace("%batch_num%", &batch_number.to_string());
                    let name = format!("{stem}_{counter:05}_.{ext}");
                    dir.put(&mut store, &name, encode(&audio, batch_number))
                })
                .collect();
            ui_with("audio", results)
        }
        "SaveLatent" => {
            let samples = passthrough();
            let prefix = node
                .string("filename_prefix")
                .unwrap_or_else(|| "latents/ComfyUI".into());
            let dir = SaveDir::new(Folder::Output, &prefix, 0, 0)?;
            let bytes = media::latent(&samples, &pyfmt::to_json(node.prompt));
            let mut store = lock(&run.shared.store);
            let counter = dir.counter(&store);
            let entry = dir.put(
                &mut store,
                &format!("{}_{counter:05}_.latent", dir.filename),
                bytes,
            );
            ui_with("latents", vec![entry])
        }
        "VHS_VideoCombine" => video_combine(run, node, &passthrough()).await?,
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

/// A second of silence, for AUDIO outputs of nodes the simulator does not model (LoadAudio, ...).
fn default_audio() -> AudioInfo {
    AudioInfo {
        batch: 1,
        channels: 2,
        samples: 44_100,
        sample_rate: 44_100,
    }
}

/// A one-frame 24 fps video of `frames` (or a 512×512 image).
fn default_video(frames: Option<ImageInfo>) -> VideoInfo {
    VideoInfo {
        frames: frames.unwrap_or_else(default_image),
        fps: 24.0,
        audio: None,
    }
}

/// Makes the file of one batch item of a sound.
type AudioEncoder = fn(&AudioInfo, u32) -> Vec<u8>;

/// `{key: entries}` as a node's `ui`.
fn ui_with(key: &str, entries: Vec<Value>) -> NodeOutput {
    let mut ui = Map::new();
    ui.insert(key.into(), Value::Array(entries));
    NodeOutput {
        outputs: Vec::new(),
        ui: Some(ui),
    }
}

/// `ui.PreviewVideo` / SaveAnimatedWEBP's ui: the files under `images`, and `animated: [flag]`.
fn animated_ui(entries: Vec<Value>, animated: bool) -> NodeOutput {
    let mut out = ui_with("images", entries);
    if let Some(ui) = out.ui.as_mut() {
        ui.insert("animated".into(), json!([animated]));
    }
    out
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

    /// The first VIDEO input that holds a video.
    fn first_video(&self) -> Option<VideoInfo> {
        self.class
            .inputs()
            .into_iter()
            .filter(|def| def.kind_str() == Some("VIDEO"))
            .find_map(|def| match self.value(def.name) {
                Some(OutValue::Video(info)) => Some(info.clone()),
                _ => None,
            })
    }

    /// The first AUDIO input that holds a sound, else the audio of the first video input.
    fn first_audio(&self) -> Option<AudioInfo> {
        self.class
            .inputs()
            .into_iter()
            .filter(|def| def.kind_str() == Some("AUDIO"))
            .find_map(|def| match self.value(def.name) {
                Some(OutValue::Audio(info)) => Some(info.clone()),
                _ => None,
            })
            .or_else(|| self.first_video().and_then(|v| v.audio))
    }

    /// Fill every declared output: images (as latent or pixels by type), videos and sounds passed
    /// through from the inputs, primitives, opaque objects.
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
                (Some("VIDEO"), _, _) => OutValue::Video(
                    self.first_video()
                        .unwrap_or_else(|| default_video(image.clone())),
                ),
                (Some("AUDIO"), _, _) => {
                    OutValue::Audio(self.first_audio().unwrap_or_else(default_audio))
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

/// `folder_paths.get_save_image_path` up to the counter: where files for a prefix go.
struct SaveDir {
    folder: Folder,
    /// Directory relative to the folder.
    rel_folder: String,
    /// The `subfolder` reported in the ui.
    subfolder: String,
    /// The file name stem (the prefix's base name).
    filename: String,
    /// The prefix after `%…%` substitution.
    prefix: String,
}

impl SaveDir {
    /// Resolves `prefix` under `folder`; a prefix leaving the folder fails like the real server.
    fn new(folder: Folder, prefix: &str, width: u32, height: u32) -> Result<SaveDir, Failure> {
        let output_dir = folder.root();
        let prefix = if prefix.contains('%') {
            compute_vars(prefix, width, height)
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
        Ok(SaveDir {
            folder,
            rel_folder,
            subfolder,
            filename,
            prefix,
        })
    }

    /// The first free counter (`get_save_image_path`'s).
    fn counter(&self, store: &Store) -> u64 {
        next_counter(
            &store.files.list_dir(self.folder, &self.rel_folder),
            &self.prefix,
            &self.filename,
        )
    }

    /// Stores a file in the directory and returns its ui entry `{filename, subfolder, type}`.
    fn put(&self, store: &mut Store, name: &str, bytes: impl Into<bytes::Bytes>) -> Value {
        store.files.put(
            self.folder,
            &path::join(&self.rel_folder, name),
            bytes.into(),
        );
        json!({"filename": name, "subfolder": self.subfolder, "type": self.folder.as_str()})
    }

    /// The absolute (virtual) path of a file in the directory.
    fn full_path(&self, name: &str) -> String {
        path::join(&path::join(&self.folder.root(), &self.rel_folder), name)
    }
}

/// `SaveImage.save_images`: `folder_paths.get_save_image_path`, then one PNG per batch image.
async fn save_images(
    run: &PromptRun,
    node: &NodeCtx<'_>,
    images: &ImageInfo,
    folder: Folder,
    prefix: &str,
) -> Result<NodeOutput, Failure> {
    let dir = SaveDir::new(folder, prefix, images.width, images.height)?;
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
    let first = dir.counter(&store);
    let mut results = Vec::new();
    for (batch_number, counter) in (0..images.batch).zip(first..) {
        let name = format!(
            "{}_{counter:05}_.png",
            dir.filename
                .replace("%batch_num%", &batch_number.to_string())
        );
        results.push(dir.put(&mut store, &name, png.clone()));
    }
    Ok(ui_with("images", results))
}

/// VideoHelperSuite's `VideoCombine.combine_video`: a first-frame PNG (`<name>_<counter>.png`, named
/// in `workflow`), then the animation or video (`<name>_<counter>.<ext>`, or `…-audio.<ext>` when an
/// audio input is muxed into a video format), in `output` or, with `save_output` off, `temp`. The
/// counter follows VHS's own rule (highest `<name>_<digits>…` in the folder, plus one). Progress goes
/// 1..=frames, as its `ProgressBar(num_frames).update(1)`.
async fn video_combine(
    run: &mut PromptRun,
    node: &NodeCtx<'_>,
    images: &ImageInfo,
) -> Result<NodeOutput, Failure> {
    let frames = u64::from(images.batch.max(1));
    for done in 1..=frames {
        run.report_progress(node.id, done, frames, None)?;
    }
    let save_output = node.json("save_output").is_none_or(pyfmt::truthy);
    let folder = if save_output {
        Folder::Output
    } else {
        Folder::Temp
    };
    let prefix = node
        .string("filename_prefix")
        .unwrap_or_else(|| "AnimateDiff".into());
    let dir = SaveDir::new(folder, &prefix, 0, 0)?;
    let format = node.string("format").unwrap_or_else(|| "image/gif".into());
    let fps = node.float("frame_rate").unwrap_or(8.0);
    let loops = node.int("loop_count").unwrap_or(0).clamp(0, 65_535) as u16;
    let pingpong = node.flag("pingpong");
    let played = ImageInfo {
        batch: if pingpong && images.batch > 2 {
            images.batch * 2 - 2
        } else {
            images.batch
        },
        ..images.clone()
    };
    let first_frame = ImageInfo {
        batch: 1,
        ..images.clone()
    };
    let metadata = pyfmt::to_json(node.prompt);
    let png = encode(&first_frame, vec![("prompt".to_owned(), metadata.clone())]).await?;
    let video = VideoInfo {
        frames: played.clone(),
        fps,
        audio: None,
    };
    let (ext, bytes) = match format.as_str() {
        "image/gif" | "video/ffmpeg-gif" => ("gif", media::gif(&played, loops)),
        "image/webp" => ("webp", media::animated_webp(&played, fps, loops)),
        "video/webm" => ("webm", media::webm(&played, fps, &metadata)),
        _ => ("mp4", media::mp4(&video, &metadata)),
    };
    let audio = node.first_audio().filter(|_| format.starts_with("video/"));

    let mut store = lock(&run.shared.store);
    let counter = vhs_counter(
        &store.files.list_dir(dir.folder, &dir.rel_folder),
        &dir.filename,
    );
    let workflow = format!("{}_{counter:05}.png", dir.filename);
    dir.put(&mut store, &workflow, png);
    let mut file = format!("{}_{counter:05}.{ext}", dir.filename);
    dir.put(&mut store, &file, bytes);
    if let Some(audio) = audio {
        file = format!("{}_{counter:05}-audio.{ext}", dir.filename);
        let with_audio = VideoInfo {
            audio: Some(audio),
            ..video
        };
        dir.put(&mut store, &file, media::mp4(&with_audio, &metadata));
    }
    let frame_rate = node.json("frame_rate").cloned().unwrap_or(json!(8));
    let preview = json!({
        "filename": file,
        "subfolder": dir.subfolder,
        "type": folder.as_str(),
        "format": format,
        "frame_rate": frame_rate,
        "workflow": workflow,
        "fullpath": dir.full_path(&file),
    });
    let mut out = ui_with("gifs", vec![preview]);
    out.outputs = vec![OutValue::Opaque("VHS_FILENAMES".into())];
    Ok(out)
}

/// VHS's counter: one more than the highest `N` of the files matching `<filename>_(\d+)\D*\..+`.
fn vhs_counter(existing: &[String], filename: &str) -> u64 {
    let prefix = format!("{}_", filename.to_lowercase());
    existing
        .iter()
        .filter_map(|name| {
            let lower = name.to_lowercase();
            let rest = lower.strip_prefix(&prefix)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let tail = &rest[digits.len()..];
            let before_digit = tail
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(tail.len());
            let dot = tail.find('.')?;
            (!digits.is_empty() && dot < before_digit && dot + 1 < tail.len())
                .then(|| digits.parse::<u64>().ok())
                .flatten()
        })
        .max()
        .map_or(1, |m| m + 1)
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
    let secs = super::prompt_run::now_ms() / 1000;
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

/// The colour of step `step` of `steps` of a preview converging from mid grey to `target`.
fn converging(target: [u8; 3], step: u64, steps: u64) -> [u8; 3] {
    let t = step as f64 / steps.max(1) as f64;
    target.map(|c| (128.0 + (f64::from(c) - 128.0) * t).round() as u8)
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
    fn vhs_counter_follows_its_regex() {
        let files = vec![
            "AnimateDiff_00001.png".to_owned(),
            "AnimateDiff_00001.mp4".to_owned(),
            "AnimateDiff_00004-audio.mp4".to_owned(),
            "AnimateDiff_00009".to_owned(),
            "Other_00020.gif".to_owned(),
        ];
        assert_eq!(vhs_counter(&files, "AnimateDiff"), 5);
        assert_eq!(vhs_counter(&files, "animatediff"), 5);
        assert_eq!(vhs_counter(&files, "New"), 1);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
