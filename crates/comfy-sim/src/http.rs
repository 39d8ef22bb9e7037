//! The HTTP side of the simulated server (`server.py` routes), every route also served under `/api`. Handlers
//! parse bodies themselves so that they fail like aiohttp does (malformed JSON → 500 text/plain), answer
//! JSON in Python's `json.dumps` form, and never panic on client input. A middleware reproduces the
//! Origin check (403) and the blanket `OPTIONS` answer; bodies above 100 MB get 413.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Multipart, Path, RawQuery, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE, HOST, ORIGIN};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::catalog::{CHECKPOINTS, VAES};
use super::graph::{self, Validation};
use super::pyfmt::{py_eq, py_get, py_str, truthy};
use super::reply::{json_response, ok_json, query_get, query_pairs};
use super::store::{path, strip_annotation, Folder, QueueItem};
use super::{jobs, lock, ws, Shared};

/// `--max-upload-size` default: 100 MB.
const MAX_BODY: usize = 100 * 1024 * 1024;

/// All routes, under `/` and `/api`.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let routes: Router<Arc<Shared>> = Router::new()
        .route("/", get(index))
        .route("/ws", get(ws::ws_route))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_entry))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/upload/mask", post(upload_mask))
        .route("/object_info", get(object_info))
        .route("/object_info/{node_class}", get(object_info_class))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/embeddings", get(empty_list))
        .route("/extensions", get(empty_list))
        .route("/models", get(models))
        .route("/models/{folder}", get(models_in));
    let mut router = Router::new().merge(routes.clone()).nest("/api", routes);
    if shared.config.profile.has_jobs_api() {
        // Declared as `/api/jobs…` in server.py: there is no `/jobs` without the prefix.
        router = router
            .route("/api/jobs", get(jobs::list))
            .route(
                "/api/jobs/cancel",
                post(jobs::cancel_many).get(jobs_named_cancel),
            )
            .route("/api/jobs/{job_id}", get(jobs::get))
            .route("/api/jobs/{job_id}/cancel", post(jobs::cancel));
    }
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(origin_check))
        .with_state(shared)
}

/// aiohttp's answer when a handler raises.
fn server_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        "404: Not Found",
    )
        .into_response()
}

/// `await request.json()`: `None` for anything that is not JSON.
fn parse_json(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

async fn index() -> Response {
    (
        StatusCode::OK,
        [(CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!DOCTYPE html>\n<html><head><title>ComfyUI</title></head>\n<body><p>Simulated ComfyUI 0.3.64 (comfy-worker). \
         The API is at /prompt, /history, /view and /ws.</p></body></html>\n",
    )
        .into_response()
}

async fn get_prompt(State(shared): State<Arc<Shared>>) -> Response {
    ok_json(&shared.queue_info())
}

async fn post_prompt(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.reached(super::DropPoint::BeforeQueue);
    let Some(request) = parse_json(&body) else {
        return server_error();
    };
    lock(&shared.log).prompts.push(request.clone());

    let number = match py_get(&request, "number") {
        Err(()) => return server_error(),
        Ok(Some(n)) => match graph::py_float(n) {
            Ok(v @ Value::Number(_)) => v,
            _ => return server_error(),
        },
        Ok(None) => {
            let front = match py_get(&request, "front") {
                Err(()) => return server_error(),
                Ok(front) => front.is_some_and(truthy),
            };
            lock(&shared.store).queue.next_number(front)
        }
    };
    let prompt = match py_get(&request, "prompt") {
        Err(()) => return server_error(),
        Ok(None) => {
            let error = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": error, "node_errors": {}}),
            );
        }
        Ok(Some(prompt)) => prompt.clone(),
    };
    let Some(request) = request.as_object() else {
        return server_error();
    };
    let current = shared.config.profile == super::Profile::Current;
    let prompt_id = match request.get("prompt_id") {
        // Today's ComfyUI takes a client id only in canonical lowercase hyphenated form.
        Some(id) if current && !id.is_null() && !id.as_str().is_some_and(jobs::canonical_uuid) => {
            let error = json!({"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID", "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one", "extra_info": {}});
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": error, "node_errors": {}}),
            );
        }
        Some(id) if !(current && id.is_null()) => py_str(id),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let partial = request.get("partial_execution_targets").cloned();
    let (validation, prompt) = graph::validate(shared.clone(), prompt, partial).await;

    let mut extra_data = match request.get("extra_data") {
        None => Map::new(),
        Some(Value::Object(extra)) => extra.clone(),
        Some(_) => return server_error(),
    };
    if let Some(client_id) = request.get("client_id") {
        extra_data.insert("client_id".into(), client_id.clone());
    }
    if current {
        extra_data.insert("create_time".into(), json!(super::exec::now_ms()));
    }
    match validation {
        Validation::Valid {
            outputs,
            node_errors,
        } => {
            let Value::Object(prompt) = prompt else {
                return server_error();
            };
            let item = QueueItem {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt,
                extra_data,
                outputs,
            };
            {
                let mut store = lock(&shared.store);
                store.queue.put(item);
                shared.announce_queue(&store);
            }
            shared.control.wake.notify_one();
            tracing::debug!(%prompt_id, %number, "prompt queued");
            ok_json(&json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}))
        }
        Validation::Rejected { error, node_errors } => {
            tracing::debug!(error_type = %error["type"], "invalid prompt");
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": error, "node_errors": node_errors}),
            )
        }
        Validation::Internal => server_error(),
    }
}

async fn get_queue(State(shared): State<Arc<Shared>>) -> Response {
    let show = if shared.config.profile == super::Profile::Current {
        QueueItem::to_public_json
    } else {
        QueueItem::to_json
    };
    let store = lock(&shared.store);
    let running: Vec<Value> = store.queue.running().map(show).into_iter().collect();
    let pending: Vec<Value> = store.queue.pending_sorted().into_iter().map(show).collect();
    ok_json(&json!({"queue_running": running, "queue_pending": pending}))
}

/// Python's `for x in value` over a JSON value (`None`: not iterable).
fn py_iter(value: &Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items.clone()),
        Value::Object(map) => Some(map.keys().cloned().map(Value::String).collect()),
        Value::String(s) => Some(s.chars().map(|c| Value::String(c.to_string())).collect()),
        _ => None,
    }
}

async fn post_queue(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(request) = parse_json(&body) else {
        return server_error();
    };
    let (Ok(clear), Ok(delete)) = (py_get(&request, "clear"), py_get(&request, "delete")) else {
        return server_error();
    };
    let mut store = lock(&shared.store);
    if clear.is_some_and(truthy) {
        store.queue.wipe();
        shared.announce_queue(&store);
    }
    if let Some(delete) = delete {
        let Some(ids) = py_iter(delete) else {
            return server_error();
        };
        for id in ids {
            if let Some(was_single) = store.queue.delete_pending(&id) {
                if was_single {
                    shared.announce_queue(&store);
                }
                shared.announce_queue(&store);
            }
        }
    }
    StatusCode::OK.into_response()
}

async fn post_interrupt(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let parsed = parse_json(&body);
    lock(&shared.log).interrupts.push(parsed.clone());
    let request = parsed.unwrap_or_else(|| json!({}));
    let Some(request) = request.as_object() else {
        return server_error();
    };
    let interrupt = match request.get("prompt_id").filter(|id| truthy(id)) {
        Some(prompt_id) => {
            let store = lock(&shared.store);
            store
                .queue
                .running()
                .is_some_and(|item| py_eq(&Value::String(item.prompt_id.clone()), prompt_id))
        }
        None => true,
    };
    if interrupt {
        shared.control.interrupt.store(true, Ordering::SeqCst);
    }
    // After the flag: a test that saw the count go up knows the interrupt is in effect.
    shared.control.interrupts_handled.send_modify(|n| *n += 1);
    StatusCode::OK.into_response()
}

async fn post_free(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(Value::Object(request)) = parse_json(&body) else {
        return server_error();
    };
    lock(&shared.log).frees.push(super::FreeMark {
        body: Value::Object(request.clone()),
        at: std::time::Instant::now(),
    });
    if request.get("free_memory").is_some_and(truthy) {
        shared.control.free_memory.store(true, Ordering::SeqCst);
        shared.control.wake.notify_one();
    }
    StatusCode::OK.into_response()
}

async fn get_history(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    shared.reached(super::DropPoint::OnHistory);
    let pairs = query_pairs(query.as_deref());
    let parse = |key: &str| query_get(&pairs, key).map(|v| v.trim().parse::<i64>());
    let max_items = match parse("max_items") {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return server_error(),
    };
    let offset = match parse("offset") {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => return server_error(),
    };
    let page = lock(&shared.store).queue.history_page(max_items, offset);
    ok_json(&Value::Object(page))
}

async fn get_history_entry(
    State(shared): State<Arc<Shared>>,
    Path(prompt_id): Path<String>,
) -> Response {
    shared.reached(super::DropPoint::OnHistory);
    let store = lock(&shared.store);
    let mut out = Map::new();
    if let Some(entry) = store.queue.history_entry(&prompt_id) {
        out.insert(prompt_id, entry.clone());
    }
    ok_json(&Value::Object(out))
}

async fn post_history(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Some(request) = parse_json(&body) else {
        return server_error();
    };
    let (Ok(clear), Ok(delete)) = (py_get(&request, "clear"), py_get(&request, "delete")) else {
        return server_error();
    };
    let mut store = lock(&shared.store);
    if clear.is_some_and(truthy) {
        store.queue.wipe_history();
    }
    if let Some(delete) = delete {
        let Some(ids) = py_iter(delete) else {
            return server_error();
        };
        for id in ids {
            match id {
                Value::String(id) => store.queue.delete_history(&id),
                Value::Array(_) | Value::Object(_) => return server_error(),
                _ => {}
            }
        }
    }
    StatusCode::OK.into_response()
}

/// `GET /view`: the file rules of `server.py view_image`.
async fn view(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let pairs = query_pairs(query.as_deref());
    let Some(filename) = query_get(&pairs, "filename") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (name, annotated) = strip_annotation(filename);
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let folder = match annotated {
        Some(folder) => folder,
        None => match Folder::from_type(query_get(&pairs, "type").unwrap_or("output")) {
            Some(folder) => folder,
            None => return StatusCode::BAD_REQUEST.into_response(),
        },
    };
    let mut dir = folder.root();
    if let Some(subfolder) = query_get(&pairs, "subfolder") {
        let full = path::join(&dir, subfolder);
        if folder.relative(&full).is_none() {
            return StatusCode::FORBIDDEN.into_response();
        }
        dir = full;
    }
    let base = path::basename(name);
    let Some(rel) = folder.relative(&path::join(&dir, base)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(data) = lock(&shared.store).files.get(folder, &rel).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let disposition = format!("filename=\"{base}\"");
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, content_type(base).to_owned()),
            (CONTENT_DISPOSITION, disposition),
        ],
        data,
    )
        .into_response()
}

/// `mimetypes.guess_type` for the extensions ComfyUI serves; page content types are forced to download.
fn content_type(name: &str) -> &'static str {
    let ext = path::splitext(name).1.to_ascii_lowercase();
    match ext.as_str() {
        ".png" => "image/png",
        ".jpg" | ".jpeg" | ".jpe" => "image/jpeg",
        ".webp" => "image/webp",
        ".gif" => "image/gif",
        ".bmp" => "image/bmp",
        ".tif" | ".tiff" => "image/tiff",
        ".svg" => "image/svg+xml",
        ".mp4" => "video/mp4",
        ".webm" => "video/webm",
        ".mov" => "video/quicktime",
        ".mp3" => "audio/mpeg",
        ".wav" => "audio/x-wav",
        ".flac" => "audio/flac",
        ".ogg" | ".opus" => "audio/ogg",
        ".json" => "application/json",
        ".txt" => "text/plain",
        ".glb" => "model/gltf-binary",
        _ => "application/octet-stream",
    }
}

/// `POST /upload/image`: `image_upload` in server.py.
async fn upload_image(State(shared): State<Arc<Shared>>, multipart: Multipart) -> Response {
    upload(&shared, multipart, "/upload/image").await
}

/// `POST /upload/mask`, simplified: stored like `/upload/image` (the original's pixels are not
/// merged), its `original_ref` recorded.
async fn upload_mask(State(shared): State<Arc<Shared>>, multipart: Multipart) -> Response {
    upload(&shared, multipart, "/upload/mask").await
}

async fn upload(shared: &Shared, mut multipart: Multipart, endpoint: &'static str) -> Response {
    let mut image: Option<(Option<String>, Option<String>, Bytes)> = None;
    let mut fields: Vec<(String, String)> = Vec::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_owned();
                let file_name = field.file_name().map(str::to_owned);
                let content_type = field.content_type().map(str::to_owned);
                let data = match field.bytes().await {
                    Ok(data) => data,
                    Err(error) => return error.status().into_response(),
                };
                if name == "image" {
                    if image.is_none() {
                        image = Some((file_name, content_type, data));
                    }
                } else {
                    fields.push((name, String::from_utf8_lossy(&data).into_owned()));
                }
            }
            Ok(None) => break,
            Err(error) => return error.status().into_response(),
        }
    }
    let field = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let upload_type = field("type").unwrap_or("input").to_owned();
    let Some(folder) = Folder::from_type(&upload_type) else {
        return server_error();
    };
    let Some((Some(mut filename), content_type, data)) = image else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if filename.is_empty() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let subfolder = field("subfolder").unwrap_or_default().to_owned();
    let full_output_folder = path::join(&folder.root(), &path::normpath(&subfolder));
    let (Some(rel_dir), Some(mut rel_file)) = (
        folder.relative(&full_output_folder),
        folder.relative(&path::join(&full_output_folder, &filename)),
    ) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let overwrite = matches!(field("overwrite"), Some("true" | "1"));

    let mut store = lock(&shared.store);
    store.files.mkdirs(folder, &rel_dir);
    if !store.files.dir_exists(folder, &path::dirname(&rel_file)) {
        // `open()` of a file in a directory that does not exist raises.
        return server_error();
    }
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = path::splitext(&filename);
        let (stem, ext) = (stem.to_owned(), ext.to_owned());
        let mut i = 1;
        while store.files.exists(folder, &rel_file) {
            if store.files.get(folder, &rel_file) == Some(&data) {
                duplicate = true;
                break;
            }
            filename = format!("{stem} ({i}){ext}");
            let Some(next) = folder.relative(&path::join(&full_output_folder, &filename)) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            rel_file = next;
            i += 1;
        }
    }
    if !duplicate {
        store.files.put(folder, &rel_file, data);
    }
    drop(store);
    lock(&shared.log).uploads.push(super::UploadMark {
        endpoint,
        name: filename.clone(),
        subfolder: subfolder.clone(),
        folder_type: upload_type.clone(),
        content_type,
        original_ref: field("original_ref").map(str::to_owned),
    });
    ok_json(&json!({"name": filename, "subfolder": subfolder, "type": upload_type}))
}

/// Top-level image files of the input folder, as LoadImage lists them.
fn input_images(shared: &Shared) -> Vec<String> {
    let mut files: Vec<String> = lock(&shared.store)
        .files
        .list_dir(Folder::Input, "")
        .into_iter()
        .filter(|name| content_type(name).starts_with("image/"))
        .collect();
    files.sort();
    files
}

async fn object_info(State(shared): State<Arc<Shared>>) -> Response {
    super::lock(&shared.log).object_info_requests += 1;
    let mut info = shared.catalog.object_info(&input_images(&shared));
    add_disk_models(&shared, &mut info);
    ok_json(&info)
}

/// Adds the model files of [`super::SimConfig::models_dir`] to the loaders' lists.
fn add_disk_models(shared: &Shared, info: &mut Value) {
    if shared.config.models_dir.is_none() {
        return;
    }
    let Some(classes) = info.as_object_mut() else {
        return;
    };
    for class in classes.values_mut() {
        for category in ["required", "optional"] {
            let Some(inputs) = class
                .get_mut("input")
                .and_then(|i| i.get_mut(category))
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            for (name, spec) in inputs.iter_mut() {
                let on_disk = shared.models_on_disk(name);
                let Some(options) = spec.get_mut(0).and_then(Value::as_array_mut) else {
                    continue;
                };
                for file in on_disk {
                    if !options.iter().any(|o| o.as_str() == Some(file.as_str())) {
                        options.push(Value::String(file));
                    }
                }
            }
        }
    }
}

async fn object_info_class(
    State(shared): State<Arc<Shared>>,
    Path(node_class): Path<String>,
) -> Response {
    ok_json(
        &shared
            .catalog
            .object_info_for(&node_class, &input_images(&shared)),
    )
}

/// `GET /api/jobs/cancel` reaches the `{job_id}` route in aiohttp.
async fn jobs_named_cancel(State(shared): State<Arc<Shared>>) -> Response {
    jobs::get(State(shared), Path("cancel".to_owned())).await
}

async fn system_stats(State(shared): State<Arc<Shared>>) -> Response {
    ok_json(&shared.config.profile.system_stats())
}

async fn features(State(shared): State<Arc<Shared>>) -> Response {
    ok_json(&shared.config.profile.server_features())
}

async fn empty_list() -> Response {
    ok_json(&json!([]))
}

/// Model folder names of `GET /models`.
const MODEL_FOLDERS: [&str; 12] = [
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "controlnet",
    "upscale_models",
    "vae_approx",
];

async fn models() -> Response {
    ok_json(&json!(MODEL_FOLDERS))
}

async fn models_in(Path(folder): Path<String>) -> Response {
    match folder.as_str() {
        "checkpoints" => ok_json(&json!(CHECKPOINTS)),
        "vae" => ok_json(&json!(VAES)),
        f if MODEL_FOLDERS.contains(&f) => ok_json(&json!([])),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `create_origin_only_middleware` plus the blanket `OPTIONS` answer.
async fn origin_check(request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let (Some(host), Some(origin)) = (headers.get(HOST), headers.get(ORIGIN)) {
        let host = String::from_utf8_lossy(host.as_bytes());
        let origin = String::from_utf8_lossy(origin.as_bytes());
        if origin_mismatch(&host, &origin) {
            return StatusCode::FORBIDDEN.into_response();
        }
    }
    if request.method() == Method::OPTIONS {
        return StatusCode::OK.into_response();
    }
    next.run(request).await
}

/// Whether a loopback `Host` and an `Origin` disagree (ports compared only when both sides have one).
fn origin_mismatch(host: &str, origin: &str) -> bool {
    let host_domain = host.to_lowercase();
    let origin_netloc = origin
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
        .unwrap_or_default()
        .to_lowercase();
    let (host_name, host_port) = split_netloc(&host_domain);
    let (origin_name, origin_port) = split_netloc(&origin_netloc);
    let loopback = host_name.as_deref().is_some_and(is_loopback);
    let host_cmp = if origin_port.is_none() {
        host_name
    } else {
        Some(host_domain.clone())
    };
    let origin_cmp = if host_port.is_none() {
        origin_name
    } else {
        Some(origin_netloc.clone())
    };
    match (host_cmp, origin_cmp) {
        (Some(h), Some(o)) => loopback && !h.is_empty() && !o.is_empty() && h != o,
        _ => false,
    }
}

/// `urlsplit(...).hostname` and `.port`.
fn split_netloc(netloc: &str) -> (Option<String>, Option<u16>) {
    let hostport = netloc.rsplit_once('@').map_or(netloc, |(_, h)| h);
    let (name, port) = if let Some(rest) = hostport.strip_prefix('[') {
        match rest.split_once(']') {
            Some((name, tail)) => (name, tail.strip_prefix(':')),
            None => (rest, None),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (hostport, None),
        }
    };
    let name = (!name.is_empty()).then(|| name.to_owned());
    (name, port.and_then(|p| p.parse().ok()))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn origin_rules() {
        assert!(!origin_mismatch("127.0.0.1:8188", "http://127.0.0.1:8188"));
        assert!(origin_mismatch("127.0.0.1:8188", "http://evil.example"));
        assert!(origin_mismatch("127.0.0.1:8188", "http://127.0.0.1:9999"));
        assert!(!origin_mismatch("127.0.0.1:8188", "http://127.0.0.1"));
        assert!(!origin_mismatch("127.0.0.1:8188", "null"));
        assert!(!origin_mismatch(
            "comfy.example:8188",
            "http://evil.example"
        ));
        assert!(origin_mismatch("localhost:8188", "http://127.0.0.1:8188"));
    }
}
