//! A `POST /api/v2/jobs` body, checked in the contract's order: JSON, the reserved fields,
//! `workflow`, the UI format, `metadata`, `extra_data`, then every `core/ASSET` reference
//! (resolved to the file name the job's input gets in ComfyUI's input folder, its bytes held
//! for the job). What reaches ComfyUI's own validation is checked when the job runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::assets::{parse_hash, AssetRecord, AssetStore};
use super::error::V2Error;
use super::job_record::WorkflowFormat;
use crate::job::input::sanitize_file_name;
use crate::job::LocalFile;

/// Labels at most, and their sizes (the labels contract of the Comfy SDK).
const MAX_LABELS: usize = 16;
const MAX_LABEL_KEY: usize = 40;
const MAX_LABEL_VALUE_BYTES: usize = 256;
/// A `metadata` string (comfy-api-proxy's form) at most.
const MAX_METADATA_STRING_BYTES: usize = 1024;

/// A checked submission.
#[derive(Debug)]
pub(crate) struct V2Submission {
    /// The graph to run, asset references replaced by file names.
    pub(crate) workflow: Value,
    pub(crate) format: WorkflowFormat,
    /// `extra_data.api_key_comfy_org`: forwarded to ComfyUI, never stored or echoed.
    pub(crate) api_key: Option<String>,
    pub(crate) metadata: Option<Value>,
    /// The referenced assets' bytes, for ComfyUI's input folder.
    pub(crate) local_files: Vec<LocalFile>,
    /// The referenced blobs, held until the job has run.
    pub(crate) pins: Pins,
}

/// Blobs held for a submission; let go when dropped unless handed to a job.
#[derive(Debug)]
pub(crate) struct Pins {
    store: Arc<AssetStore>,
    hexes: Vec<String>,
}

impl Pins {
    /// The hashes held.
    pub(crate) fn hexes(&self) -> &[String] {
        &self.hexes
    }

    /// The hashes, now the job's to let go.
    pub(crate) fn hand_over(mut self) -> Vec<String> {
        std::mem::take(&mut self.hexes)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if !self.hexes.is_empty() {
            self.store.unpin(&self.hexes);
        }
    }
}

/// True for a UI-format export: `nodes` is a list and `links` is a key (the server-side check
/// of the contract, looser than the SDK's local one).
pub(crate) fn is_ui_format(workflow: &Map<String, Value>) -> bool {
    workflow.get("nodes").is_some_and(Value::is_array) && workflow.contains_key("links")
}

impl V2Submission {
    /// Checks a body (see the module docs).
    pub(crate) fn parse(
        body: &[u8],
        assets: &Arc<AssetStore>,
        convert_ui: bool,
    ) -> Result<V2Submission, V2Error> {
        let body: Value = serde_json::from_slice(body).map_err(|e| {
            V2Error::bad_request(format!("The request body is not valid JSON: {e}"))
        })?;
        let Value::Object(mut body) = body else {
            return Err(V2Error::bad_request(
                "The request body must be a JSON object like {\"workflow\": {...}}.",
            ));
        };
        for reserved in ["webhook_url", "inputs"] {
            if body.get(reserved).is_some_and(|v| !v.is_null()) {
                return Err(V2Error::invalid_workflow(format!(
                    "'{reserved}' is reserved and not accepted yet."
                )));
            }
        }
        let workflow = match body.remove("workflow") {
            Some(Value::Object(w)) => w,
            Some(_) => return Err(V2Error::invalid_workflow("'workflow' must be an object.")),
            None => return Err(V2Error::invalid_workflow("'workflow' is missing.")),
        };
        let format = if is_ui_format(&workflow) {
            if !convert_ui {
                return Err(V2Error::new(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "workflow_format_ui",
                    "This is a UI-format workflow (the export with 'nodes' and 'links'); submit the API format (ComfyUI: Workflow > Export (API)).",
                ));
            }
            WorkflowFormat::Save
        } else {
            WorkflowFormat::Api
        };
        if workflow.is_empty() {
            return Err(V2Error::invalid_workflow("'workflow' has no nodes."));
        }
        let metadata = match body.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(m) => Some(check_metadata(m)?),
        };
        let api_key = match body.get("extra_data") {
            None | Some(Value::Null) => None,
            Some(Value::Object(extra)) => {
                if let Some(other) = extra.keys().find(|k| *k != "api_key_comfy_org") {
                    return Err(V2Error::bad_request(format!(
                        "'extra_data' takes only 'api_key_comfy_org', not '{}'.",
                        other.escape_debug()
                    )));
                }
                match extra.get("api_key_comfy_org") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(k)) if k.trim().is_empty() => None,
                    Some(Value::String(k)) => Some(k.clone()),
                    Some(_) => {
                        return Err(V2Error::bad_request(
                            "'extra_data.api_key_comfy_org' must be a string.",
                        ))
                    }
                }
            }
            Some(_) => return Err(V2Error::bad_request("'extra_data' must be an object.")),
        };
        let mut resolver = Resolver {
            store: assets,
            files: BTreeMap::new(),
            pins: Pins {
                store: assets.clone(),
                hexes: Vec::new(),
            },
            missing: Vec::new(),
        };
        let mut workflow = Value::Object(workflow);
        resolver.walk(&mut workflow, 0);
        if !resolver.missing.is_empty() {
            let shown = resolver.missing.join(", ");
            return Err(V2Error::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "missing_asset",
                format!("Unresolvable core/ASSET reference(s): {shown}"),
            )
            .with_details(json!({ "missing_ids": resolver.missing })));
        }
        Ok(V2Submission {
            workflow,
            format,
            api_key,
            metadata,
            local_files: resolver.files.into_values().collect(),
            pins: resolver.pins,
        })
    }
}

/// Labels: at most 16; keys 1–40 of `A-Z a-z 0-9 _ . -`; values strings of at most 256 bytes
/// without control or bidirectional-override characters. A plain string (comfy-api-proxy's
/// form) of at most 1 KiB is kept as it is.
fn check_metadata(m: Value) -> Result<Value, V2Error> {
    let invalid = |why: String| {
        V2Error::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "metadata_invalid",
            why,
        )
    };
    match &m {
        Value::String(s) if s.len() <= MAX_METADATA_STRING_BYTES => Ok(m),
        Value::String(_) => Err(invalid(format!(
            "'metadata' as a string is at most {MAX_METADATA_STRING_BYTES} bytes."
        ))),
        Value::Object(labels) => {
            if labels.len() > MAX_LABELS {
                return Err(invalid(format!(
                    "'metadata' has more than {MAX_LABELS} labels."
                )));
            }
            for (key, value) in labels {
                let key_ok = !key.is_empty()
                    && key.len() <= MAX_LABEL_KEY
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                if !key_ok {
                    return Err(invalid(format!(
                        "label key '{}' must be 1 to {MAX_LABEL_KEY} of A-Z, a-z, 0-9, '_', '.', '-'.",
                        key.escape_debug()
                    )));
                }
                let Value::String(value) = value else {
                    return Err(invalid(format!("label '{key}' must be a string.")));
                };
                if value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(forbidden_char) {
                    return Err(invalid(format!(
                        "label '{key}' must be at most {MAX_LABEL_VALUE_BYTES} bytes, without control or bidirectional-override characters."
                    )));
                }
            }
            Ok(m)
        }
        _ => Err(invalid(
            "'metadata' must be an object of string labels.".into(),
        )),
    }
}

fn forbidden_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Deeper than this, a workflow's JSON is not walked (a graph is a few levels deep).
const MAX_DEPTH: usize = 64;

struct Resolver<'a> {
    store: &'a AssetStore,
    /// By name (one upload per name).
    files: BTreeMap<String, LocalFile>,
    pins: Pins,
    missing: Vec<String>,
}

impl Resolver<'_> {
    fn walk(&mut self, value: &mut Value, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        match value {
            Value::Object(map)
                if map.get("__type").and_then(Value::as_str) == Some("core/ASSET") =>
            {
                match self.resolve(map) {
                    Ok(name) => *value = Value::String(name),
                    Err(Missing(label)) => self.missing.push(label),
                }
            }
            Value::Object(map) => map.values_mut().for_each(|v| self.walk(v, depth + 1)),
            Value::Array(items) => items.iter_mut().for_each(|v| self.walk(v, depth + 1)),
            _ => {}
        }
    }

    /// The file name the reference becomes, or what to list as missing.
    fn resolve(&mut self, reference: &Map<String, Value>) -> Result<String, Missing> {
        let Some(Value::Object(info)) = reference.get("info") else {
            return Err(Missing("<malformed core/ASSET: missing info>".into()));
        };
        let id = info.get("id").and_then(Value::as_str);
        let by_id = id.and_then(|id| self.store.get(id));
        let record = match by_id {
            Some(r) => r,
            None => {
                let by_hash = info
                    .get("hash")
                    .and_then(Value::as_str)
                    .and_then(parse_hash)
                    .and_then(|hex| self.store.find_by_hash(&hex));
                match by_hash {
                    Some(r) => r,
                    None => {
                        return Err(Missing(id.unwrap_or("<no id>").chars().take(100).collect()))
                    }
                }
            }
        };
        let name = input_name(&record);
        if !self.files.contains_key(&name) {
            if !self.store.pin(&record.hash_hex) {
                return Err(Missing(record.id));
            }
            self.pins.hexes.push(record.hash_hex.clone());
            self.files.insert(
                name.clone(),
                LocalFile {
                    name: name.clone(),
                    path: self.store.blob_path(&record.hash_hex),
                },
            );
        }
        Ok(name)
    }
}

/// The name an asset gets in ComfyUI's input folder: its hash's first 16 hex digits and its
/// file name made safe (`3f2a…-photo.png`), so two different files never share a name.
fn input_name(record: &AssetRecord) -> String {
    let base = record
        .file_path
        .as_deref()
        .and_then(|p| p.rsplit(['/', '\\']).next())
        .filter(|b| !b.is_empty())
        .unwrap_or("asset");
    let mut name = sanitize_file_name(base);
    if !name.contains('.') {
        if let Some(ext) = crate::media_type::extension_for(&record.content_type) {
            name = format!("{name}.{ext}");
        }
    }
    format!("{}-{name}", &record.hash_hex[..16])
}

/// An asset reference that names no stored asset: how the refusal lists it (its id, or what
/// was wrong with the reference).
struct Missing(String);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store() -> (tempfile::TempDir, Arc<AssetStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::create(Some(dir.path()), Duration::from_secs(60), 1 << 20).unwrap();
        (dir, Arc::new(store))
    }

    fn parse(body: Value, assets: &Arc<AssetStore>) -> Result<V2Submission, V2Error> {
        V2Submission::parse(body.to_string().as_bytes(), assets, false)
    }

    #[test]
    fn bodies_are_checked_in_the_contracts_order() {
        let (_d, assets) = store();
        let code = |body: Value| parse(body, &assets).map(|_| ()).unwrap_err();
        let e = V2Submission::parse(b"{", &assets, false).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_request"));
        let e = code(json!({"workflow": {"1": {}}, "webhook_url": "http://x"}));
        assert_eq!((e.status.as_u16(), e.code), (422, "invalid_workflow"));
        let e = code(json!({"workflow": []}));
        assert_eq!(e.code, "invalid_workflow");
        let e = code(json!({"workflow": {"nodes": [], "links": []}}));
        assert_eq!((e.status.as_u16(), e.code), (422, "workflow_format_ui"));
        let e = code(json!({"workflow": {"1": {}}, "metadata": {"bad key": "v"}}));
        assert_eq!(e.code, "metadata_invalid");
        let e = code(json!({"workflow": {"1": {}}, "metadata": {"k": "a\u{202e}b"}}));
        assert_eq!(e.code, "metadata_invalid");
        let e = code(json!({"workflow": {"1": {}}, "extra_data": {"other": 1}}));
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_request"));
        let e = code(
            json!({"workflow": {"1": {"inputs": {"image": {"__type": "core/ASSET", "info": {"id": "nope"}}}}}}),
        );
        assert_eq!((e.status.as_u16(), e.code), (422, "missing_asset"));
        assert_eq!(
            e.details.as_deref(),
            Some(&json!({"missing_ids": ["nope"]}))
        );
        let e = code(json!({"workflow": {"1": {"inputs": {"image": {"__type": "core/ASSET"}}}}}));
        assert_eq!(
            e.details.as_deref(),
            Some(&json!({"missing_ids": ["<malformed core/ASSET: missing info>"]}))
        );
        let ok = parse(
            json!({"workflow": {"1": {}}, "metadata": {"team": "a"}, "extra_data": {"api_key_comfy_org": "k"}}),
            &assets,
        )
        .unwrap();
        assert_eq!(ok.api_key.as_deref(), Some("k"));
        assert_eq!(ok.format, WorkflowFormat::Api);
        let ui = V2Submission::parse(
            json!({"workflow": {"nodes": [], "links": []}})
                .to_string()
                .as_bytes(),
            &assets,
            true,
        )
        .unwrap();
        assert_eq!(ui.format, WorkflowFormat::Save);
    }

    #[tokio::test]
    async fn asset_references_become_input_files_held_for_the_job() {
        let (_d, assets) = store();
        let mut ingest = assets.ingest().await.unwrap();
        ingest.write(b"png bytes").await.unwrap();
        let (record, _) = assets
            .add_upload(
                ingest.finish().await.unwrap(),
                "image/png".into(),
                Some("dir/my photo.png".into()),
                None,
            )
            .unwrap();
        let reference =
            json!({"__type": "core/ASSET", "info": {"id": record.id, "file_path": "ignored.png"}});
        let by_hash = json!({"__type": "core/ASSET", "info": {"id": "stale", "hash": format!("blake3:{}", record.hash_hex)}});
        let sub = parse(
            json!({"workflow": {
                "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
                "2": {"class_type": "LoadImage", "inputs": {"image": by_hash}}
            }}),
            &assets,
        )
        .unwrap();
        let name = format!("{}-my_photo.png", &record.hash_hex[..16]);
        assert_eq!(sub.workflow["1"]["inputs"]["image"], json!(name));
        assert_eq!(sub.workflow["2"]["inputs"]["image"], json!(name));
        assert_eq!(sub.local_files.len(), 1);
        assert_eq!(sub.local_files[0].name, name);
        // The bytes outlive the record while the submission holds them.
        assets.delete(&record.id).unwrap();
        assert!(sub.local_files[0].path.exists());
        drop(sub);
        assert!(!assets.blob_path(&record.hash_hex).exists());
    }
}
