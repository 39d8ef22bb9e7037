//! Every output kind, end to end through the simulator, twice: with the engine in-process and with
//! the real binary in serverless mode (fake platform). Each returned file is decoded and compared
//! byte for byte with what the simulator stored (fetched through its `/view`), or, for
//! SaveImageWebsocket, with the frames it sent.

use std::collections::HashMap;

use comfy_sim::Simulator;
use comfy_worker::job::codec;
use serde_json::{json, Value};

use crate::fake_platform::{FakePlatform, PlatformOptions};
use crate::harness::{self, run_job};
use crate::worker_process::{final_of, simulator, WorkerProcess};

/// How a job is run.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `Engine::run` in-process.
    Engine,
    /// The real binary's job loop, the job taken from a fake RunPod platform.
    Serverless,
}

/// A file the simulator's history lists for the prompt, with its bytes from `/view`.
#[derive(Debug, Clone)]
struct Stored {
    key: String,
    filename: String,
    folder_type: String,
    bytes: Vec<u8>,
}

/// Runs `input` in `mode` on a fresh simulator; returns the output JSON and what the simulator
/// stored for the (single) prompt, in history order.
async fn run(mode: Mode, input: Value) -> (Value, Vec<Stored>, Simulator) {
    harness::init_logs();
    let sim = simulator(1).await;
    let output = match mode {
        Mode::Engine => run_job(&harness::engine(&sim.host()), input)
            .await
            .0
            .to_json(),
        Mode::Serverless => {
            let platform = FakePlatform::start(PlatformOptions::default()).await;
            let _worker = WorkerProcess::start(&platform, &sim, &[]);
            platform.push_job("kinds", input);
            let body = final_of(&platform, "kinds").await;
            assert!(
                platform.violations().is_empty(),
                "{:?}",
                platform.violations()
            );
            // A failure's body is `{"error", "output"?}`; a success's output is under `output`.
            if body.get("error").is_some() {
                body
            } else {
                body["output"].clone()
            }
        }
    };
    let stored = match sim.prompts().last() {
        Some(prompt) => stored(&sim, prompt["prompt_id"].as_str().unwrap()).await,
        None => Vec::new(),
    };
    (output, stored, sim)
}

async fn stored(sim: &Simulator, prompt_id: &str) -> Vec<Stored> {
    let http = reqwest::Client::new();
    let history: Value = http
        .get(format!("http://{}/history/{prompt_id}", sim.host()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Vec::new();
    let outputs = history[prompt_id]["outputs"].as_object().cloned().unwrap();
    for ui in outputs.values() {
        for (key, items) in ui.as_object().unwrap() {
            for item in items.as_array().unwrap() {
                let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                    continue;
                };
                let subfolder = item["subfolder"].as_str().unwrap_or("");
                let folder_type = item["type"].as_str().unwrap_or("output");
                let response = http
                    .get(format!("http://{}/view", sim.host()))
                    .query(&[
                        ("filename", filename),
                        ("subfolder", subfolder),
                        ("type", folder_type),
                    ])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200, "/view {filename}");
                out.push(Stored {
                    key: key.clone(),
                    filename: filename.to_owned(),
                    folder_type: folder_type.to_owned(),
                    bytes: response.bytes().await.unwrap().to_vec(),
                });
            }
        }
    }
    out
}

/// The entries under `key`, checked: base64, the stored bytes (by file name), the content type
/// from the extension; returns their file names in order.
fn files(output: &Value, key: &str, stored: &[Stored]) -> Vec<String> {
    let by_name: HashMap<&str, &Stored> = stored.iter().map(|s| (s.filename.as_str(), s)).collect();
    let entries = output[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {}", brief(output)));
    entries
        .iter()
        .map(|e| {
            let name = e["filename"].as_str().unwrap();
            assert_eq!(e["type"], "base64", "{name}");
            let bytes = codec::decode_input(e["data"].as_str().unwrap()).unwrap();
            let stored = by_name
                .get(name)
                .unwrap_or_else(|| panic!("{name} is not a stored file"));
            assert!(bytes == stored.bytes, "{name}: the bytes differ from /view");
            assert_eq!(e["content_type"], content_type(name), "{name}");
            name.to_owned()
        })
        .collect()
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap() {
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "flac" => "audio/flac",
        "mp3" => "audio/mpeg",
        "opus" => "audio/ogg",
        _ => "application/octet-stream",
    }
}

/// The stored files under a ComfyUI key, not temp, in history order.
fn stored_names(stored: &[Stored], key: &str, with_temp: bool) -> Vec<String> {
    stored
        .iter()
        .filter(|s| s.key == key && (with_temp || s.folder_type != "temp"))
        .map(|s| s.filename.clone())
        .collect()
}

/// The output without the base64, for messages.
fn brief(output: &Value) -> String {
    let mut v = output.clone();
    if let Some(obj) = v.as_object_mut() {
        for entries in obj.values_mut().filter_map(Value::as_array_mut) {
            for e in entries {
                if let Some(data) = e.get_mut("data") {
                    *data = json!("…");
                }
            }
        }
    }
    v.to_string()
}

fn keys(output: &Value) -> Vec<String> {
    output.as_object().unwrap().keys().cloned().collect()
}

/// `EmptyImage` 64×48 with `batch` frames.
fn frames(batch: u32) -> Value {
    json!({"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": batch, "color": 3368601}})
}

// ---------------------------------------------------------------------------------------------
// The cases.

async fn images_include_animations_and_videos(mode: Mode) {
    let input = json!({"workflow": {
        "1": frames(2),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "still"}},
        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6, "lossless": true, "quality": 80, "method": "default"}},
        "4": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 12}},
        "5": {"class_type": "SaveVideo", "inputs": {"video": ["4", 0], "filename_prefix": "video/clip", "format": "auto", "codec": "auto"}},
        "6": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "webm", "codec": "vp9", "fps": 24, "crf": 32}},
    }});
    let (output, stored, _sim) = run(mode, input).await;
    let names = files(&output, "images", &stored);
    assert_eq!(
        names,
        stored_names(&stored, "images", false),
        "history order"
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "anim_00001_.webp",
            "clip_00001_.mp4",
            "still_00001_.png",
            "still_00002_.png",
            "webm_00001_.webm"
        ]
    );
    assert_eq!(keys(&output), ["images"], "{}", brief(&output));
}

async fn vhs_gifs_are_videos_with_format_and_frame_rate(mode: Mode) {
    let input = json!({"workflow": {
        "1": frames(4),
        "2": {"class_type": "EmptyAudio", "inputs": {"duration": 0.5, "sample_rate": 16000, "channels": 1}},
        "3": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0,
              "filename_prefix": "vhs/clip", "format": "video/h264-mp4", "pingpong": false, "save_output": true,
              "audio": ["2", 0], "pix_fmt": "yuv420p", "crf": 19, "save_metadata": true}},
        "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 12.5, "loop_count": 0,
              "filename_prefix": "loop", "format": "video/webm", "pingpong": true, "save_output": true}},
        "5": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0,
              "filename_prefix": "draft", "format": "image/gif", "pingpong": false, "save_output": false}},
    }});
    let (output, stored, _sim) = run(mode, input).await;
    let names = files(&output, "videos", &stored);
    assert_eq!(names, stored_names(&stored, "gifs", false));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["clip_00001-audio.mp4", "loop_00001.webm"]);
    for video in output["videos"].as_array().unwrap() {
        let (format, rate) = if video["filename"] == "loop_00001.webm" {
            ("video/webm", 12.5)
        } else {
            ("video/h264-mp4", 8.0)
        };
        assert_eq!(video["format"], format);
        assert_eq!(video["frame_rate"], rate);
    }
    assert_eq!(output["status"], "success_no_images");
    assert_eq!(output["images"], json!([]));
    assert_eq!(keys(&output), ["status", "images", "videos"]);
}

async fn audio_is_returned(mode: Mode) {
    let input = json!({"workflow": {
        "1": {"class_type": "EmptyAudio", "inputs": {"duration": 0.5, "sample_rate": 16000, "channels": 1}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/tone"}},
        "3": {"class_type": "SaveAudioMP3", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/tone", "quality": "V0"}},
        "4": {"class_type": "SaveAudioOpus", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/tone", "quality": "128k"}},
        "5": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}},
    }});
    let (output, stored, _sim) = run(mode, input).await;
    let names = files(&output, "audio", &stored);
    assert_eq!(names, stored_names(&stored, "audio", false));
    let mut exts: Vec<&str> = names
        .iter()
        .map(|n| n.rsplit('.').next().unwrap())
        .collect();
    exts.sort();
    assert_eq!(exts, ["flac", "mp3", "opus"], "{names:?}");
    assert_eq!(keys(&output), ["status", "images", "audio"]);
}

async fn text_is_returned(mode: Mode) {
    let input = json!({"workflow": {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "a prompt, with words"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "3": frames(1),
        "4": {"class_type": "GetImageSize", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }});
    let (output, _, _sim) = run(mode, input).await;
    let text = output["text"].as_array().unwrap().clone();
    let mut sorted: Vec<&str> = text.iter().map(|t| t.as_str().unwrap()).collect();
    sorted.sort();
    assert_eq!(sorted, ["48", "a prompt, with words"]);
    assert_eq!(
        output,
        json!({"status": "success_no_images", "images": [], "text": text})
    );
}

async fn unknown_file_keys_keep_their_name(mode: Mode) {
    let input = json!({"workflow": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/l"}},
    }});
    let (output, stored, _sim) = run(mode, input).await;
    assert_eq!(files(&output, "latents", &stored), ["l_00001_.latent"]);
    assert_eq!(keys(&output), ["status", "images", "latents"]);
}

async fn websocket_images_are_images(mode: Mode) {
    let input = json!({"workflow": {
        "1": frames(3),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "saved"}},
        "9": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": 3, "seconds_per_step": 0.1, "send_preview": true}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }});
    let (output, stored, sim) = run(mode, input).await;
    let images = output["images"].as_array().unwrap();
    let saved = stored_names(&stored, "images", false);
    assert_eq!(saved.len(), 3);
    // The saved files first, exactly as before, then the frames SaveImageWebsocket sent.
    let names: Vec<&str> = images
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            saved[0].as_str(),
            &saved[1],
            &saved[2],
            "ComfyUI_ws_9_00001.png",
            "ComfyUI_ws_9_00002.png",
            "ComfyUI_ws_9_00003.png"
        ]
    );
    let (saved_entries, ws_entries) = images.split_at(3);
    files(&json!({ "images": saved_entries }), "images", &stored);
    let sent = sim.websocket_images();
    assert_eq!(sent.len(), 3, "the sampler's previews are not outputs");
    for (entry, (node, png)) in ws_entries.iter().zip(&sent) {
        assert_eq!(node, "9");
        assert_eq!(entry["type"], "base64");
        assert_eq!(entry["content_type"], "image/png");
        let bytes = codec::decode_input(entry["data"].as_str().unwrap()).unwrap();
        assert!(
            &bytes == png,
            "a WebSocket image differs from the frame sent"
        );
        assert_eq!(harness::png_size(entry["data"].as_str().unwrap()), (64, 48));
    }
    assert_eq!(keys(&output), ["images"]);
}

#[tokio::test]
async fn websocket_images_lost_with_the_socket_are_reported() {
    let sim = simulator(1).await;
    sim.pause_after_step(1);
    let input = json!({"workflow": {
        "1": frames(2),
        "2": {"class_type": "SlowSteps", "inputs": {"image": ["1", 0], "steps": 3, "seconds_per_step": 0.1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "kept"}},
        "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
    }});
    let job = crate::harness::spawn_job(&harness::engine(&sim.host()), input);
    tokio::time::timeout(harness::LIMIT, sim.paused())
        .await
        .unwrap();
    sim.drop_websockets();
    sim.resume();
    let (output, _) = job.finish().await;
    let output = output.to_json();
    let names: Vec<&str> = output["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kept_00001_.png", "kept_00002_.png"]);
    assert_eq!(
        sim.websocket_images().len(),
        2,
        "the frames went to the dropped socket"
    );
    let errors = output["errors"].to_string();
    assert!(
        errors.contains(
            "SaveImageWebsocket node(s) 4 finished: images sent while it was down are missing"
        ),
        "{errors}"
    );
}

/// One workflow with every kind, temp files included.
fn mixed_workflow() -> Value {
    json!({
        "1": frames(2),
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "mixed"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0,
              "filename_prefix": "mixed", "format": "video/h264-mp4", "pingpong": false, "save_output": true}},
        "5": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0,
              "filename_prefix": "draft", "format": "image/gif", "pingpong": false, "save_output": false}},
        "6": {"class_type": "EmptyAudio", "inputs": {"duration": 0.25, "sample_rate": 8000, "channels": 2}},
        "7": {"class_type": "SaveAudio", "inputs": {"audio": ["6", 0], "filename_prefix": "audio/mixed"}},
        "8": {"class_type": "PreviewAudio", "inputs": {"audio": ["6", 0]}},
        "9": {"class_type": "PrimitiveString", "inputs": {"value": "caption"}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "latents/mixed"}},
        "13": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    })
}

async fn kinds_choose_what_comes_back(mode: Mode) {
    let input = json!({"workflow": mixed_workflow(), "output": {"kinds": ["videos", "text"]}});
    let (output, stored, _sim) = run(mode, input).await;
    assert_eq!(
        files(&output, "videos", &stored),
        stored_names(&stored, "gifs", false)
    );
    assert_eq!(output["text"], json!(["caption"]));
    assert_eq!(keys(&output), ["status", "images", "videos", "text"]);

    let input = json!({"workflow": mixed_workflow(), "output": {"kinds": ["images", "latents"]}});
    let (output, stored, _sim) = run(mode, input).await;
    let images = output["images"].as_array().unwrap();
    assert_eq!(images.len(), 4, "two saved, two from the socket");
    files(&json!({ "images": images[..2] }), "images", &stored);
    assert_eq!(files(&output, "latents", &stored), ["mixed_00001_.latent"]);
    assert_eq!(keys(&output), ["images", "latents"]);

    // By default: everything but temp files.
    let (output, stored, _sim) = run(mode, json!({"workflow": mixed_workflow()})).await;
    assert_eq!(
        keys(&output),
        ["images", "videos", "audio", "text", "latents"],
        "{}",
        brief(&output)
    );
    assert_eq!(
        files(&output, "audio", &stored),
        stored_names(&stored, "audio", false)
    );
    assert_eq!(output["images"].as_array().unwrap().len(), 4);
}

async fn include_temp_returns_preview_files(mode: Mode) {
    let input = json!({"workflow": mixed_workflow(), "output": {"include_temp": true}});
    let (output, stored, _sim) = run(mode, input).await;
    let images: Vec<String> = files(
        &json!({"images": output["images"].as_array().unwrap()[..4]}),
        "images",
        &stored,
    );
    assert_eq!(images, stored_names(&stored, "images", true));
    let temp: Vec<&String> = images
        .iter()
        .filter(|n| n.starts_with("ComfyUI_temp_"))
        .collect();
    assert_eq!(temp.len(), 2, "PreviewImage's files: {images:?}");
    let videos = files(&output, "videos", &stored);
    assert_eq!(videos, stored_names(&stored, "gifs", true));
    assert!(videos.contains(&"draft_00001.gif".to_owned()), "{videos:?}");
    let audio = files(&output, "audio", &stored);
    assert_eq!(audio, stored_names(&stored, "audio", true));
    assert_eq!(audio.len(), 2, "SaveAudio and PreviewAudio: {audio:?}");
}

/// The images of the workflows that worked before are exactly worker-comfyui's: the saved files in
/// history order, base64, plus a content type, and nothing else in the output.
async fn images_are_unchanged_for_existing_workflows(mode: Mode) {
    for input in [
        json!({"workflow": harness::workflow("ok")}),
        harness::test_input()["input"].clone(),
        json!({"workflow": harness::workflow("preview")}),
    ] {
        let (output, stored, _sim) = run(mode, input).await;
        let expected: Vec<Value> = stored
            .iter()
            .filter(|s| s.key == "images" && s.folder_type != "temp")
            .map(|s| {
                json!({"filename": s.filename, "type": "base64", "data": codec::encode(&s.bytes),
                       "content_type": "image/png"})
            })
            .collect();
        if expected.is_empty() {
            assert_eq!(output, json!({"status": "success_no_images", "images": []}));
        } else {
            assert_eq!(output, json!({ "images": expected }), "{}", brief(&output));
        }
    }
}

async fn bad_output_options_are_refused(mode: Mode) {
    let (output, _, sim) = run(
        mode,
        json!({"workflow": harness::workflow("ok"), "output": {"kinds": "images"}}),
    )
    .await;
    assert!(
        output.to_string().contains("'output.kinds' must be a list"),
        "{output}"
    );
    assert!(sim.prompts().is_empty(), "nothing was queued");
}

macro_rules! both_modes {
    ($($case:ident => $engine:ident, $serverless:ident;)*) => {$(
        #[tokio::test]
        async fn $engine() {
            $case(Mode::Engine).await;
        }

        #[tokio::test]
        async fn $serverless() {
            $case(Mode::Serverless).await;
        }
    )*};
}

both_modes! {
    images_include_animations_and_videos => engine_images_include_animations_and_videos, serverless_images_include_animations_and_videos;
    vhs_gifs_are_videos_with_format_and_frame_rate => engine_vhs_gifs_are_videos, serverless_vhs_gifs_are_videos;
    audio_is_returned => engine_audio, serverless_audio;
    text_is_returned => engine_text, serverless_text;
    unknown_file_keys_keep_their_name => engine_unknown_file_keys, serverless_unknown_file_keys;
    websocket_images_are_images => engine_websocket_images, serverless_websocket_images;
    kinds_choose_what_comes_back => engine_kinds_filter, serverless_kinds_filter;
    include_temp_returns_preview_files => engine_include_temp, serverless_include_temp;
    images_are_unchanged_for_existing_workflows => engine_existing_images_unchanged, serverless_existing_images_unchanged;
    bad_output_options_are_refused => engine_bad_output_options, serverless_bad_output_options;
}
