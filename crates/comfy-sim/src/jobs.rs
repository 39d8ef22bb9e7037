//! The jobs API of today's ComfyUI (`comfy_execution/jobs.py`, `server.py`), served by the
//! `current` profile only: `GET /api/jobs` (filters, sorting, pagination), `GET /api/jobs/{id}`
//! (history first, then running, then pending), `POST /api/jobs/{id}/cancel` (atomic under the
//! queue lock, idempotent, always `200 {"cancelled": bool}`) and `POST /api/jobs/cancel`. Keys
//! whose value is `null` are left out (`prune_dict`). Under 0.3.64 these paths fall through to
//! the static route: `404` text/plain.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::reply::{json_response, ok_json, query_get, query_pairs};
use super::store::QueueItem;
use super::{lock, Shared};

const STATUSES: [&str; 5] = ["pending", "in_progress", "completed", "failed", "cancelled"];

fn bad_request(message: &str) -> Response {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": message }))
}

/// `prune_dict`: drop the keys whose value is `None`.
fn prune(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter().filter(|(_, v)| !v.is_null()).collect()
}

/// `create_time` and `workflow_id` of an `extra_data`.
fn metadata(extra: &Value) -> (Value, Value) {
    let create_time = extra.get("create_time").cloned().unwrap_or(Value::Null);
    let workflow_id = extra
        .get("extra_pnginfo")
        .and_then(|p| p.get("workflow"))
        .and_then(|w| w.get("id"))
        .cloned()
        .unwrap_or(Value::Null);
    (create_time, workflow_id)
}

/// `normalize_queue_item`.
fn queue_job(item: &QueueItem, status: &str, include_workflow: bool) -> Map<String, Value> {
    let extra = Value::Object(item.public_extra_data());
    let (create_time, workflow_id) = metadata(&extra);
    let mut job = prune(
        json!({
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    if include_workflow {
        job.insert(
            "workflow".into(),
            json!({"prompt": item.prompt, "extra_data": extra}),
        );
    }
    job
}

/// `is_previewable` for file entries.
fn previewable(media_type: &str, item: &Map<String, Value>) -> bool {
    if ["images", "video", "audio", "3d", "text"].contains(&media_type) {
        return true;
    }
    let format = item.get("format").and_then(Value::as_str).unwrap_or("");
    let name = item
        .get("filename")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase();
    format.starts_with("video/")
        || format.starts_with("audio/")
        || [
            ".obj", ".fbx", ".gltf", ".glb", ".usdz", ".txt", ".md", ".json",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// `get_outputs_summary` + `count_previewable_outputs`, for dict items (the simulator's nodes
/// report no 3D filename strings).
fn outputs_summary(outputs: &Map<String, Value>) -> (usize, usize, Value) {
    let (mut count, mut previewable_count) = (0, 0);
    let (mut first_output, mut fallback) = (None, None);
    for (node_id, node_outputs) in outputs {
        let Some(node_outputs) = node_outputs.as_object() else {
            continue;
        };
        for (media_type, items) in node_outputs {
            let Some(items) = items.as_array().filter(|_| media_type != "animated") else {
                continue;
            };
            for item in items.iter().filter_map(Value::as_object) {
                count += 1;
                if !previewable(media_type, item) {
                    continue;
                }
                previewable_count += 1;
                let mut enriched = item.clone();
                enriched.insert("nodeId".into(), json!(node_id));
                enriched
                    .entry("mediaType")
                    .or_insert_with(|| json!(media_type));
                if item.get("type").and_then(Value::as_str) == Some("output") {
                    first_output.get_or_insert(enriched);
                } else {
                    fallback.get_or_insert(enriched);
                }
            }
        }
    }
    let preview = first_output.or(fallback).map_or(Value::Null, Value::Object);
    (count, previewable_count, preview)
}

/// `normalize_history_item`.
fn history_job(prompt_id: &str, entry: &Value, include_outputs: bool) -> Map<String, Value> {
    let tuple = entry.get("prompt").cloned().unwrap_or(Value::Null);
    let priority = tuple.get(0).cloned().unwrap_or(Value::Null);
    let extra = tuple.get(3).cloned().unwrap_or(Value::Null);
    let (create_time, workflow_id) = metadata(&extra);
    let status_info = entry.get("status").cloned().unwrap_or(Value::Null);
    let outputs = entry
        .get("outputs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let (outputs_count, previewable_count, preview) = outputs_summary(&outputs);
    let (mut start, mut end, mut error, mut interrupted) =
        (Value::Null, Value::Null, Value::Null, false);
    let messages = status_info
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for message in &messages {
        let (Some(name), Some(data)) = (
            message.get(0).and_then(Value::as_str),
            message.get(1).filter(|d| d.is_object()),
        ) else {
            continue;
        };
        let timestamp = data.get("timestamp").cloned().unwrap_or(Value::Null);
        match name {
            "execution_start" => start = timestamp,
            "execution_success" => end = timestamp,
            "execution_error" => {
                end = timestamp;
                error = data.clone();
            }
            "execution_interrupted" => {
                end = timestamp;
                interrupted = true;
            }
            _ => {}
        }
    }
    let status = match status_info.get("status_str").and_then(Value::as_str) {
        Some("error") if interrupted => "cancelled",
        Some("error") => "failed",
        _ => "completed",
    };
    let mut job = prune(
        json!({
            "id": prompt_id,
            "status": status,
            "priority": priority,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": outputs_count,
            "previewable_outputs_count": previewable_count,
            "preview_output": preview,
            "workflow_id": workflow_id,
        })
        .as_object()
        .cloned()
        .unwrap_or_default(),
    );
    if include_outputs {
        job.insert("outputs".into(), Value::Object(outputs));
        job.insert("execution_status".into(), status_info);
        job.insert(
            "workflow".into(),
            json!({"prompt": tuple.get(2).cloned().unwrap_or(Value::Null), "extra_data": extra}),
        );
    }
    job
}

/// `GET /api/jobs`.
pub(crate) async fn list(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let pairs = query_pairs(query.as_deref());
    let statuses: Vec<String> = match query_get(&pairs, "status") {
        None => STATUSES.iter().map(|s| (*s).to_owned()).collect(),
        Some(list) => {
            let wanted: Vec<String> = list
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            let invalid: Vec<&str> = wanted
                .iter()
                .map(String::as_str)
                .filter(|s| !STATUSES.contains(s))
                .collect();
            if !invalid.is_empty() {
                return bad_request(&format!(
                    "Invalid status value(s): {}. Valid values: {}",
                    invalid.join(", "),
                    STATUSES.join(", ")
                ));
            }
            wanted
        }
    };
    let sort_by = query_get(&pairs, "sort_by").unwrap_or("created_at");
    if !["created_at", "execution_duration"].contains(&sort_by) {
        return bad_request("sort_by must be 'created_at' or 'execution_duration'");
    }
    let sort_order = query_get(&pairs, "sort_order").unwrap_or("desc");
    if !["asc", "desc"].contains(&sort_order) {
        return bad_request("sort_order must be 'asc' or 'desc'");
    }
    let limit = match query_get(&pairs, "limit") {
        None => None,
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) if n > 0 => Some(n as usize),
            Ok(_) => return bad_request("limit must be a positive integer"),
            Err(_) => return bad_request("limit must be an integer"),
        },
    };
    let offset = match query_get(&pairs, "offset") {
        None => 0,
        Some(v) => match v.trim().parse::<i64>() {
            Ok(n) => n.max(0) as usize,
            Err(_) => return bad_request("offset must be an integer"),
        },
    };
    let workflow_id = query_get(&pairs, "workflow_id");

    let mut jobs: Vec<Map<String, Value>> = Vec::new();
    {
        let store = lock(&shared.store);
        if statuses.iter().any(|s| s == "in_progress") {
            jobs.extend(
                store
                    .queue
                    .running()
                    .map(|item| queue_job(item, "in_progress", false)),
            );
        }
        if statuses.iter().any(|s| s == "pending") {
            jobs.extend(
                store
                    .queue
                    .pending_sorted()
                    .into_iter()
                    .map(|item| queue_job(item, "pending", false)),
            );
        }
        for (id, entry) in store.queue.history_page(None, None) {
            let job = history_job(&id, &entry, false);
            let status = job.get("status").and_then(Value::as_str).unwrap_or("");
            if statuses.iter().any(|s| s == status) {
                jobs.push(job);
            }
        }
    }
    if let Some(workflow_id) = workflow_id {
        jobs.retain(|job| job.get("workflow_id").and_then(Value::as_str) == Some(workflow_id));
    }
    let key = |job: &Map<String, Value>| -> f64 {
        let number = |k: &str| job.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        if sort_by == "execution_duration" {
            let (start, end) = (number("execution_start_time"), number("execution_end_time"));
            if start != 0.0 && end != 0.0 {
                end - start
            } else {
                0.0
            }
        } else {
            number("create_time")
        }
    };
    jobs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    if sort_order == "desc" {
        jobs.reverse();
    }
    let total = jobs.len();
    let page: Vec<Value> = jobs
        .into_iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .map(Value::Object)
        .collect();
    let has_more = limit.is_some_and(|l| offset + l < total);
    ok_json(&json!({
        "jobs": page,
        "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": has_more},
    }))
}

/// `GET /api/jobs/{id}`: history first, then running, then pending; else 404.
pub(crate) async fn get(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    lock(&shared.log).job_lookups += 1;
    let store = lock(&shared.store);
    let job = if let Some(entry) = store.queue.history_entry(&id) {
        Some(history_job(&id, entry, true))
    } else if let Some(item) = store.queue.running().filter(|i| i.prompt_id == id) {
        Some(queue_job(item, "in_progress", true))
    } else {
        store
            .queue
            .pending_sorted()
            .into_iter()
            .find(|i| i.prompt_id == id)
            .map(|item| queue_job(item, "pending", true))
    };
    match job {
        Some(job) => ok_json(&Value::Object(job)),
        None => json_response(StatusCode::NOT_FOUND, &json!({"error": "Job not found"})),
    }
}

/// `cancel_job`: under the queue lock, a running job is interrupted (the flag is reset when
/// the next prompt starts, so it can never hit a later job), a pending one dequeued; a finished
/// or unknown one is left alone. Returns whether anything was cancelled.
fn cancel_one(shared: &Shared, id: &str) -> bool {
    let mut store = lock(&shared.store);
    if store.queue.running().is_some_and(|i| i.prompt_id == id) {
        shared.control.interrupt.store(true, Ordering::SeqCst);
        shared.control.wake.notify_one();
        return true;
    }
    if let Some(was_single) = store.queue.delete_pending(&json!(id)) {
        if was_single {
            shared.announce_queue(&store);
        }
        shared.announce_queue(&store);
        return true;
    }
    false
}

/// `POST /api/jobs/{id}/cancel`.
pub(crate) async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if id.is_empty() {
        return bad_request("job_id is required");
    }
    let cancelled = cancel_one(&shared, &id);
    lock(&shared.log).job_cancels.push(id);
    shared.control.interrupts_handled.send_modify(|n| *n += 1);
    ok_json(&json!({ "cancelled": cancelled }))
}

/// Whether `id` is a UUID in canonical lowercase hyphenated form (`validate_job_id`).
pub(crate) fn canonical_uuid(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// `POST /api/jobs/cancel` `{"job_ids": [...]}`: all ids checked first, then best effort.
pub(crate) async fn cancel_many(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("Request body must be valid JSON");
    };
    let Some(ids) = request.get("job_ids").and_then(Value::as_array) else {
        return bad_request("job_ids must be a list");
    };
    let invalid: Vec<Value> = ids
        .iter()
        .filter(|id| !id.as_str().is_some_and(canonical_uuid))
        .cloned()
        .collect();
    if !invalid.is_empty() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}),
        );
    }
    let mut any = false;
    for id in ids.iter().filter_map(Value::as_str) {
        any |= cancel_one(&shared, id);
        lock(&shared.log).job_cancels.push(id.to_owned());
    }
    ok_json(&json!({ "cancelled": any }))
}
