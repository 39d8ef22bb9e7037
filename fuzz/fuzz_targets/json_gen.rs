//! Structured JSON for the fuzz targets: arbitrary values whose keys and strings lean towards
//! what the parsers look for (the job-input schema, ComfyUI's `/history` and WebSocket shapes,
//! hostile file names), so the fuzzer reaches deep paths instead of failing at the first key.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// Keys the parsers read.
const KEYS: &[&str] = &[
    "workflow",
    "images",
    "files",
    "name",
    "image",
    "subfolder",
    "type",
    "kind",
    "original_ref",
    "filename",
    "comfy_org_api_key",
    "output",
    "include_temp",
    "kinds",
    "timeout_s",
    "progress_webhook",
    "class_type",
    "inputs",
    "nodes",
    "links",
    "1",
    "2",
    "3",
    "9",
    "s3Config",
    "status",
    "status_str",
    "completed",
    "messages",
    "outputs",
    "gifs",
    "videos",
    "audio",
    "text",
    "animated",
    "format",
    "frame_rate",
    "latents",
    "data",
    "prompt_id",
    "node",
    "node_id",
    "display_node",
    "value",
    "max",
    "exception_message",
    "exception_type",
    "traceback",
    "node_type",
    "executed",
    "current_inputs",
    "current_outputs",
    "sid",
    "exec_info",
    "queue_remaining",
    "output_node",
    "timestamp",
    "errors",
    "details",
];

/// Strings worth trying: hostile names and paths, sources, option values.
const STRINGS: &[&str] = &[
    "", ".", "..", "...", "../x.png", "a/../b", "/etc/passwd", "C:\\x", "C:x", "a\\b", "x\0y",
    "．．", "．．/x", "‥", "…", "a／b", "a＼b", "%2e%2e", "%2e%2e%2fx", "..%2f", "\u{202e}gnp.exe",
    "con", "NUL", "a:b", "image.png", "mask.png", "sub/dir", "sub//dir/", " ", "\t", "\u{0}",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYAAAAAUAAeImBZsAAAAASUVORK5CYII=",
    "iVBORw0KGgo=", "data:;base64,", "data:image/png,xx", "https://example.com/a.png",
    "https://u:p@example.com/x%2e%2e", "http://127.0.0.1/x", "s3://bucket/key", "s3://", "s3://b",
    "ftp://x/y", "file:///etc/passwd", "javascript:alert(1)", "mask", "image", "input", "temp",
    "output", "images", "videos", "audio", "text", "latents", "success", "error",
    "execution_error", "execution_interrupted", "execution_success", "executing", "progress",
    "SaveImage", "SaveImageWebsocket", "KSampler", "LoadImage", "PreviewAny",
    "video/h264-mp4", "image/gif", "ComfyUI_00001_.png",
];

fn string(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 | 2 => (*u.choose(STRINGS)?).to_owned(),
        3 => {
            // Pieces glued together: `sub/..`, `x．．y`, long names.
            let n = u.int_in_range(1..=6usize)?;
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(u.choose(STRINGS)?);
                if u.arbitrary()? {
                    s.push(*u.choose(&['/', '\\', '.', ':', '%', '\u{ff0e}', '\u{0}'])?);
                }
            }
            s
        }
        4 => {
            let c: char = u.arbitrary()?;
            c.to_string().repeat(u.int_in_range(1..=300usize)?)
        }
        _ => u.arbitrary()?,
    })
}

fn key(u: &mut Unstructured) -> Result<String> {
    if u.ratio(7u8, 8u8)? {
        Ok((*u.choose(KEYS)?).to_owned())
    } else {
        string(u)
    }
}

fn number(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => Value::from(u.int_in_range(-2i64..=600)?),
        1 => Value::from(u.arbitrary::<i64>()?),
        2 => Value::from(u.arbitrary::<u64>()?),
        _ => Number::from_f64(u.arbitrary::<f64>()?).map_or(Value::Null, Value::Number),
    })
}

/// A value at most `depth` levels deep.
pub fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let leaf_only = depth == 0;
    let choice = u.int_in_range(0..=if leaf_only { 3u8 } else { 5 })?;
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 => Value::String(string(u)?),
        4 => {
            let n = u.int_in_range(0..=4usize)?;
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(value(u, depth - 1)?);
            }
            Value::Array(list)
        }
        _ => {
            let n = u.int_in_range(0..=5usize)?;
            let mut map = Map::new();
            for _ in 0..n {
                let k = key(u)?;
                let v = value(u, depth - 1)?;
                map.insert(k, v);
            }
            Value::Object(map)
        }
    })
}
