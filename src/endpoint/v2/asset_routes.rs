//! The asset routes: `POST /api/v2/assets` (multipart, streamed to disk and blake3-hashed as
//! it comes, deduplicated by content), `POST /api/v2/assets/from-hash`,
//! `HEAD /api/v2/assets/by-hash/{hash}`, `GET`/`DELETE /api/v2/assets/{id}` and
//! `GET /api/v2/assets/{id}/content` (with `Range`).

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{info, warn};

use super::super::local_endpoint::LocalEndpoint;
use super::assets::{parse_hash, AssetRecord, AssetStore, DeleteRefused, IngestError};
use super::error::V2Error;
use super::job_view::{expires_at, Origin, URL_LIFETIME};
use super::range::{ranged, Ranged};
use super::request::{body_bytes, path_id, IdPath};
use super::stamp::rfc3339;

/// `expires_in` bounds (seconds), as the contract sets them.
const EXPIRES_IN: (u64, u64) = (60, 604_800);

fn store(endpoint: &LocalEndpoint) -> Result<Arc<AssetStore>, V2Error> {
    endpoint.v2().assets.clone().ok_or_else(|| {
        V2Error::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upstream_error",
            "The asset store is unavailable (see the endpoint's log: SERVE_ASSET_DIR).",
        )
    })
}

/// The contract's `Asset` object.
fn asset_object(
    endpoint: &LocalEndpoint,
    record: &AssetRecord,
    origin: &Origin,
    created_new: Option<bool>,
) -> Value {
    // A job's output lives as long as its job; an upload until its retention.
    let expires: Option<SystemTime> = match &record.job_id {
        Some(job_id) => {
            let state = endpoint.fresh_state();
            state.jobs.get(job_id).and_then(|job| {
                job.v2
                    .as_ref()
                    .map(|v2| expires_at(job, v2.created, Instant::now()))
            })
        }
        None => record.expires,
    };
    let url_expires = expires.unwrap_or_else(|| SystemTime::now() + URL_LIFETIME);
    let mut body = json!({
        "id": record.id,
        "hash": format!("blake3:{}", record.hash_hex),
        "size_bytes": record.size,
        "content_type": record.content_type,
        "file_path": record.file_path,
        "created_at": rfc3339(record.created),
        "url": format!("{}/api/v2/assets/{}/content", origin.0, record.id),
        "url_expires_at": rfc3339(url_expires),
        "expires_at": expires.map(rfc3339),
    });
    if let Some(job_id) = &record.job_id {
        body["job_id"] = json!(job_id);
    }
    if let Some(created_new) = created_new {
        body["created_new"] = json!(created_new);
    }
    body
}

/// A placement path: relative, no `..` or empty segments; one segment (a file for ComfyUI's
/// input folder) or under `input/`. Model placement is not offered.
fn check_file_path(path: &str) -> Result<(), V2Error> {
    let bad = |why: &str| V2Error::unprocessable(format!("'file_path' {why}."));
    if path.is_empty() || path.len() > 1024 {
        return Err(bad("must be 1 to 1024 bytes"));
    }
    if path.starts_with('/') || path.contains('\\') || path.chars().any(char::is_control) {
        return Err(bad("must be a relative path with '/' separators"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return Err(bad("must not have empty, '.' or '..' segments"));
    }
    if segments.len() > 1 && segments[0] != "input" {
        return Err(bad(
            "must be a file name or a path under 'input/' (this endpoint does not place models)",
        ));
    }
    Ok(())
}

fn multipart_error(e: impl std::fmt::Display, status: StatusCode) -> V2Error {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        V2Error::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "The upload is larger than this endpoint takes (SERVE_MAX_UPLOAD_MB).",
        )
    } else {
        V2Error::unprocessable(format!("Malformed multipart body: {e}"))
    }
}

/// `POST /api/v2/assets`.
pub(crate) async fn upload(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, V2Error> {
    let store = store(&endpoint)?;
    let mut multipart = multipart.map_err(|e| {
        V2Error::unprocessable(format!(
            "Send the asset as multipart/form-data with a 'file' part: {}",
            e.body_text()
        ))
    })?;
    let mut content_type: Option<String> = None;
    let mut file_path: Option<String> = None;
    let mut expected: Option<String> = None;
    let mut expires_in: Option<Duration> = None;
    let mut file: Option<(super::assets::Ingested, Option<String>, Option<String>)> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e.body_text(), e.status())),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let part_type = field.content_type().map(str::to_owned);
            let part_name = field.file_name().map(str::to_owned);
            let mut field = field;
            let mut ingest = store.ingest().await.map_err(|e| {
                warn!(error = %e, "cannot start storing an upload");
                V2Error::upstream()
            })?;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => ingest.write(&chunk).await.map_err(|e| match e {
                        IngestError::TooLarge(_) => {
                            multipart_error(&e, StatusCode::PAYLOAD_TOO_LARGE)
                        }
                        IngestError::Io(io) => {
                            warn!(error = %io, "cannot store an upload");
                            V2Error::upstream()
                        }
                    })?,
                    Ok(None) => break,
                    Err(e) => return Err(multipart_error(e.body_text(), e.status())),
                }
            }
            let taken = ingest.finish().await.map_err(|e| {
                warn!(error = %e, "cannot store an upload");
                V2Error::upstream()
            })?;
            file = Some((taken, part_type, part_name));
            continue;
        }
        let text = match field.text().await {
            Ok(t) => t,
            Err(e) => return Err(multipart_error(e.body_text(), e.status())),
        };
        match name.as_str() {
            "content_type" => content_type = Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
            "file_path" => file_path = Some(text),
            "expected_hash" => expected = Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
            "expires_in" => {
                let seconds = text
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (EXPIRES_IN.0..=EXPIRES_IN.1).contains(s))
                    .ok_or_else(|| {
                        V2Error::unprocessable(format!(
                            "'expires_in' must be a whole number of seconds from {} to {}.",
                            EXPIRES_IN.0, EXPIRES_IN.1
                        ))
                    })?;
                expires_in = Some(Duration::from_secs(seconds));
            }
            // `tags` and anything else: taken, not used.
            _ => {}
        }
    }
    let Some((taken, part_type, part_name)) = file else {
        return Err(V2Error::unprocessable("Missing 'file' part."));
    };
    let file_path = file_path
        .or(part_name)
        .ok_or_else(|| V2Error::unprocessable("Missing 'file_path' part."))?;
    check_file_path(&file_path)?;
    if let Some(expected) = &expected {
        let wanted = parse_hash(expected).ok_or_else(|| {
            V2Error::unprocessable("'expected_hash' must be 'blake3:<64 hex digits>'.")
        })?;
        if wanted != taken.hex {
            return Err(V2Error::new(
                StatusCode::CONFLICT,
                "hash_mismatch",
                format!(
                    "The bytes received hash to blake3:{}, not {}; nothing was stored.",
                    taken.hex, expected
                ),
            ));
        }
    }
    let content_type = content_type
        .or(part_type.filter(|t| t != "application/octet-stream"))
        .unwrap_or_else(|| crate::media_type::content_type_for(&file_path, None));
    let (record, new_blob) = store
        .add_upload(taken, content_type, Some(file_path), expires_in)
        .map_err(|e| {
            warn!(error = %e, "cannot store an upload");
            V2Error::upstream()
        })?;
    info!(asset_id = %record.id, bytes = record.size, new = new_blob, "asset uploaded");
    let status = if new_blob {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = asset_object(&endpoint, &record, &Origin::of(&headers), Some(new_blob));
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
struct FromHash {
    hash: Option<Value>,
    file_path: Option<String>,
    expires_in: Option<u64>,
}

/// `POST /api/v2/assets/from-hash`.
pub(crate) async fn from_hash(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, V2Error> {
    let store = store(&endpoint)?;
    let body = body_bytes(body)?;
    let request: FromHash = serde_json::from_slice(&body).map_err(|e| {
        V2Error::bad_request(format!("The request body is not a valid JSON object: {e}"))
    })?;
    let hash = match request.hash {
        Some(Value::String(h)) => h,
        _ => {
            return Err(V2Error::unprocessable(
                "'hash' (a 'blake3:<hex>' string) is required.",
            ))
        }
    };
    if let Some(path) = &request.file_path {
        check_file_path(path)?;
    }
    let expires_in = match request.expires_in {
        None => None,
        Some(s) if (EXPIRES_IN.0..=EXPIRES_IN.1).contains(&s) => Some(Duration::from_secs(s)),
        Some(_) => {
            return Err(V2Error::unprocessable(format!(
                "'expires_in' must be from {} to {} seconds.",
                EXPIRES_IN.0, EXPIRES_IN.1
            )))
        }
    };
    let minted =
        parse_hash(&hash).and_then(|hex| store.mint_from_hash(&hex, request.file_path, expires_in));
    let Some((record, created)) = minted else {
        return Err(V2Error::new(
            StatusCode::NOT_FOUND,
            "blob_not_found",
            "No stored bytes with this hash; upload them with POST /api/v2/assets.",
        ));
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = asset_object(&endpoint, &record, &Origin::of(&headers), Some(false));
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct HashPath {
    hash: String,
}

/// `HEAD /api/v2/assets/by-hash/{hash}`: 200 when the bytes are here, 404 otherwise; no body.
pub(crate) async fn by_hash(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<HashPath>, PathRejection>,
) -> StatusCode {
    let (Ok(Path(HashPath { hash })), Some(store)) = (path, endpoint.v2().assets.clone()) else {
        return StatusCode::NOT_FOUND;
    };
    match parse_hash(&hash) {
        Some(hex) if store.has_blob(&hex) => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

/// `GET /api/v2/assets/{id}`.
pub(crate) async fn get_asset(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Json<Value>, V2Error> {
    let id = path_id(path)?;
    let record = store(&endpoint)?
        .get(&id)
        .ok_or_else(|| V2Error::not_found("asset", &id))?;
    Ok(Json(asset_object(
        &endpoint,
        &record,
        &Origin::of(&headers),
        None,
    )))
}

/// `DELETE /api/v2/assets/{id}`: 204; 409 `asset_in_use` for a job's output (it goes with
/// its job).
pub(crate) async fn delete_asset(
    State(endpoint): State<LocalEndpoint>,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<StatusCode, V2Error> {
    let id = path_id(path)?;
    match store(&endpoint)?.delete(&id) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(DeleteRefused::NotFound) => Err(V2Error::not_found("asset", &id)),
        Err(DeleteRefused::InUse) => Err(V2Error::new(
            StatusCode::CONFLICT,
            "asset_in_use",
            "This asset cannot be deleted now.",
        )),
    }
}

/// `GET /api/v2/assets/{id}/content`: the bytes, whole (200) or one range (206).
pub(crate) async fn content(
    State(endpoint): State<LocalEndpoint>,
    headers: HeaderMap,
    path: Result<Path<IdPath>, PathRejection>,
) -> Result<Response, V2Error> {
    let id = path_id(path)?;
    let store = store(&endpoint)?;
    let record = store
        .get(&id)
        .ok_or_else(|| V2Error::not_found("asset", &id))?;
    let unavailable = || {
        V2Error::new(
            StatusCode::NOT_FOUND,
            "output_unavailable",
            "The asset's bytes are gone.",
        )
    };
    let mut file = tokio::fs::File::open(store.blob_path(&record.hash_hex))
        .await
        .map_err(|_| unavailable())?;
    let size = record.size;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, len) = match ranged(range, size) {
        Ranged::Whole => (StatusCode::OK, 0, size),
        Ranged::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Ranged::Unsatisfiable => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(response);
        }
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|_| unavailable())?;
    }
    let stream = tokio_util::io::ReaderStream::new(file.take(len));
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    let mut set = |name: header::HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(header::CONTENT_TYPE, record.content_type.clone());
    set(header::CONTENT_LENGTH, len.to_string());
    set(header::ACCEPT_RANGES, "bytes".into());
    set(header::ETAG, format!("\"{}\"", record.hash_hex));
    // Bytes a client uploaded, with the type it named: never run as a page of this origin.
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff".into());
    set(header::CONTENT_SECURITY_POLICY, "sandbox".into());
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if let Some(name) = record
        .file_path
        .as_deref()
        .and_then(|p| p.rsplit('/').next())
        .filter(|n| n.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
    {
        set(
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{name}\""),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_paths() {
        assert!(check_file_path("photo.png").is_ok());
        assert!(check_file_path("input/sub/photo.png").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x.png",
            "a//b",
            "models/checkpoints/x.safetensors",
            "a\\b",
            "sub/x.png",
        ] {
            assert!(check_file_path(bad).is_err(), "{bad}");
        }
    }
}
