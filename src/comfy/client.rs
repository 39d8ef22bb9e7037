//! ComfyUI's HTTP API: one method per endpoint, typed replies.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use super::capabilities::{Capabilities, ComfyVersion};
use super::error::ComfyError;
use super::features::Features;
use super::file_ref::FileRef;
use super::history::{truncate, HistoryEntry};
use super::job_record::JobRecord;
use super::object_info::ObjectInfo;
use super::queue::QueueSnapshot;
use super::rejection::{parse_node_errors, NodeErrors, PromptRejection};
use super::system_stats::SystemStats;
use super::upload::{Upload, UploadedFile};
use crate::comfy_address::ComfyAddress;
use crate::media_type::media_type_for_name;
use crate::redact::error_chain;
use crate::secret::Secret;

/// How long HTTP calls may take.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect bound.
    pub connect_timeout: Duration,
    /// Bound for ordinary calls (prompt, history, upload).
    pub request_timeout: Duration,
    /// Bound for `/view` downloads (videos can be large).
    pub view_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            view_timeout: Duration::from_secs(120),
        }
    }
}

/// A client for one ComfyUI server.
#[derive(Clone)]
pub struct ComfyClient {
    http: reqwest::Client,
    /// `http://host:port` without a trailing slash (with `user:password@` when `COMFY_HOST` has
    /// them: reqwest turns them into basic auth and keeps them out of its error messages).
    base: String,
    /// `ws://host:port` (never with credentials).
    ws_base: String,
    /// `host:port` for messages (never with credentials).
    host: String,
    options: ClientOptions,
    /// The `user:password` of `COMFY_HOST`, kept so logs scrub it.
    _credentials: Option<Secret>,
    /// What this ComfyUI supports, detected once (shared by the clones).
    capabilities: std::sync::Arc<tokio::sync::OnceCell<Capabilities>>,
}

/// Hand-written: `base` may carry credentials.
impl std::fmt::Debug for ComfyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyClient")
            .field("host", &self.host)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Body of `POST /prompt`.
#[derive(Debug, Serialize)]
pub struct PromptRequest<'a> {
    /// The API-format graph.
    pub prompt: &'a Map<String, Value>,
    /// Routing key for WebSocket events.
    pub client_id: &'a str,
    /// Chosen by us, so events arriving before the reply can be attributed.
    pub prompt_id: &'a str,
    /// `extra_data` (e.g. `api_key_comfy_org`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_data: Option<&'a Map<String, Value>>,
}

/// Reply of `POST /prompt` (HTTP 200).
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPrompt {
    /// The prompt id (ours, echoed).
    pub prompt_id: String,
    /// Queue number.
    pub number: Option<f64>,
    /// Outputs dropped because their inputs failed validation (the rest runs).
    pub node_errors: Vec<NodeErrors>,
}

fn mime_for(name: &str) -> &'static str {
    media_type_for_name(name).unwrap_or("application/octet-stream")
}

/// The most a `/view` download reserves up front from its `Content-Length`.
const VIEW_PREALLOCATE_MAX: u64 = 64 << 20;

/// A `/view` download under way: its chunks as they arrive.
pub struct ViewDownload<'a> {
    client: &'a ComfyClient,
    what: String,
    resp: reqwest::Response,
}

impl ViewDownload<'_> {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ComfyError> {
        self.resp
            .chunk()
            .await
            .map_err(|e| self.client.transport_error(&self.what, e))
    }
}

impl ComfyClient {
    /// A client for ComfyUI at `address`.
    pub fn new(address: &ComfyAddress, options: ClientOptions) -> Result<ComfyClient, ComfyError> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| ComfyError::Protocol {
                what: "HTTP client".into(),
                detail: e.to_string(),
            })?;
        Ok(ComfyClient {
            http,
            base: address.base_url(),
            ws_base: address.ws_base(),
            host: address.shown(),
            options,
            _credentials: address.userinfo().map(Secret::new),
            capabilities: std::sync::Arc::default(),
        })
    }

    /// A client for another ComfyUI with the same options, sharing this one's HTTP client.
    pub fn for_address(&self, address: &ComfyAddress) -> ComfyClient {
        ComfyClient {
            http: self.http.clone(),
            base: address.base_url(),
            ws_base: address.ws_base(),
            host: address.shown(),
            options: self.options.clone(),
            _credentials: address.userinfo().map(Secret::new),
            capabilities: std::sync::Arc::default(),
        }
    }

    /// `host:port`, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The WebSocket URL for a client id.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!("{}/ws?clientId={}", self.ws_base, client_id)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn transport_error(&self, what: &str, e: reqwest::Error) -> ComfyError {
        ComfyError::Unreachable {
            host: self.host.clone(),
            what: what.to_owned(),
            detail: error_chain(&e),
        }
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<reqwest::Response, ComfyError> {
        req.timeout(timeout)
            .send()
            .await
            .map_err(|e| self.transport_error(what, e))
    }

    async fn expect_ok(
        &self,
        what: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, ComfyError> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(ComfyError::Status {
            what: what.to_owned(),
            status,
            body: truncate(&body, 500),
        })
    }

    async fn get_json(&self, what: &str, path: &str) -> Result<Value, ComfyError> {
        let resp = self
            .send(
                what,
                self.http.get(self.url(path)),
                self.options.request_timeout,
            )
            .await?;
        let resp = self.expect_ok(what, resp).await?;
        resp.json::<Value>()
            .await
            .map_err(|e| ComfyError::Protocol {
                what: what.to_owned(),
                detail: error_chain(&e),
            })
    }

    async fn post_json(&self, what: &str, path: &str, body: &Value) -> Result<(), ComfyError> {
        let resp = self
            .send(
                what,
                self.http.post(self.url(path)).json(body),
                self.options.request_timeout,
            )
            .await?;
        self.expect_ok(what, resp).await.map(drop)
    }

    /// `GET /system_stats`: also the readiness probe.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let v = self.get_json("GET /system_stats", "/system_stats").await?;
        serde_json::from_value(v).map_err(|e| ComfyError::Protocol {
            what: "GET /system_stats".into(),
            detail: e.to_string(),
        })
    }

    /// What this ComfyUI supports, detected on the first call and kept. While ComfyUI does not
    /// answer, the 0.3.64 set (no jobs API), not kept.
    pub async fn capabilities(&self) -> Capabilities {
        match self
            .capabilities
            .get_or_try_init(|| self.detect_capabilities())
            .await
        {
            Ok(caps) => caps.clone(),
            Err(e) => {
                tracing::debug!(error = %e, "ComfyUI capabilities not detected yet");
                Capabilities::default()
            }
        }
    }

    /// Asks ComfyUI what it supports. Fails only when it does not answer at all.
    async fn detect_capabilities(&self) -> Result<Capabilities, ComfyError> {
        let stats = self.system_stats().await?;
        let version = stats
            .system
            .comfyui_version
            .as_deref()
            .and_then(ComfyVersion::parse);
        let features = self.features().await.unwrap_or_default();
        let jobs_api = self.probe_jobs_api().await?;
        let jobs_cancel = jobs_api && self.probe_jobs_cancel().await?;
        let caps = Capabilities {
            version,
            features,
            jobs_api,
            jobs_cancel,
        };
        tracing::info!(
            host = %self.host,
            version = %caps.version.map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
            jobs_api = caps.jobs_api,
            jobs_cancel = caps.jobs_cancel,
            assets = caps.features.assets,
            "ComfyUI capabilities"
        );
        Ok(caps)
    }

    /// `GET /features`.
    pub async fn features(&self) -> Result<Features, ComfyError> {
        let v = self.get_json("GET /features", "/features").await?;
        serde_json::from_value(v).map_err(|e| ComfyError::Protocol {
            what: "GET /features".into(),
            detail: e.to_string(),
        })
    }

    /// `GET /api/jobs?limit=1`: true when it answers the jobs list (0.3.64: 404 text/plain).
    pub(crate) async fn probe_jobs_api(&self) -> Result<bool, ComfyError> {
        const WHAT: &str = "GET /api/jobs";
        let req = self
            .http
            .get(self.url("/api/jobs"))
            .query(&[("limit", "1")]);
        let resp = self.send(WHAT, req, self.options.request_timeout).await?;
        if resp.status().is_server_error() {
            return self.expect_ok(WHAT, resp).await.map(|_| false);
        }
        if !resp.status().is_success() {
            return Ok(false);
        }
        let v: Value = resp.json().await.unwrap_or_default();
        Ok(v.get("jobs").is_some_and(Value::is_array))
    }

    /// `POST /api/jobs/{nil uuid}/cancel`: true when the route answers `{"cancelled": …}` (an
    /// unknown id cancels nothing).
    pub(crate) async fn probe_jobs_cancel(&self) -> Result<bool, ComfyError> {
        const PROBE: &str = "00000000-0000-4000-8000-000000000000";
        Ok(self.cancel_job(PROBE).await.is_ok())
    }

    /// `GET /api/jobs/{id}`: `None` when ComfyUI knows no such job (a pending job that was
    /// cancelled, or a ComfyUI that restarted).
    pub async fn job(&self, prompt_id: &str) -> Result<Option<JobRecord>, ComfyError> {
        const WHAT: &str = "GET /api/jobs/{id}";
        let req = self.http.get(self.url(&format!("/api/jobs/{prompt_id}")));
        let resp = self.send(WHAT, req, self.options.request_timeout).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect_ok(WHAT, resp).await?;
        resp.json::<JobRecord>()
            .await
            .map(Some)
            .map_err(|e| ComfyError::Protocol {
                what: WHAT.into(),
                detail: error_chain(&e),
            })
    }

    /// `POST /api/jobs/{id}/cancel`: dequeues a pending job or interrupts it if it is still the
    /// running one, atomically; a finished or unknown job is left alone. True when something
    /// was cancelled.
    pub async fn cancel_job(&self, prompt_id: &str) -> Result<bool, ComfyError> {
        const WHAT: &str = "POST /api/jobs/{id}/cancel";
        let req = self
            .http
            .post(self.url(&format!("/api/jobs/{prompt_id}/cancel")));
        let resp = self.send(WHAT, req, self.options.request_timeout).await?;
        let resp = self.expect_ok(WHAT, resp).await?;
        let v: Value = resp.json().await.map_err(|e| ComfyError::Protocol {
            what: WHAT.into(),
            detail: error_chain(&e),
        })?;
        v.get("cancelled")
            .and_then(Value::as_bool)
            .ok_or_else(|| ComfyError::Protocol {
                what: WHAT.into(),
                detail: format!("no 'cancelled' in {}", truncate(&v.to_string(), 200)),
            })
    }

    /// `POST /prompt`. HTTP 400 becomes [`ComfyError::Rejected`].
    pub async fn queue_prompt(&self, req: &PromptRequest<'_>) -> Result<QueuedPrompt, ComfyError> {
        const WHAT: &str = "POST /prompt";
        let resp = self
            .send(
                WHAT,
                self.http.post(self.url("/prompt")).json(req),
                self.options.request_timeout,
            )
            .await?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| self.transport_error(WHAT, e))?;
        if status == StatusCode::BAD_REQUEST {
            return Err(match PromptRejection::parse(&body) {
                Some(r) => ComfyError::Rejected(Box::new(r)),
                None => ComfyError::Protocol {
                    what: WHAT.into(),
                    detail: format!(
                        "ComfyUI validation failed (could not parse error response): {}",
                        truncate(&body, 1000)
                    ),
                },
            });
        }
        if !status.is_success() {
            return Err(ComfyError::Status {
                what: WHAT.into(),
                status: status.as_u16(),
                body: truncate(&body, 500),
            });
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| ComfyError::Protocol {
            what: WHAT.into(),
            detail: format!("{e}: {}", truncate(&body, 200)),
        })?;
        let prompt_id =
            v.get("prompt_id")
                .and_then(Value::as_str)
                .ok_or_else(|| ComfyError::Protocol {
                    what: WHAT.into(),
                    detail: format!(
                        "Missing 'prompt_id' in queue response: {}",
                        truncate(&body, 200)
                    ),
                })?;
        Ok(QueuedPrompt {
            prompt_id: prompt_id.to_owned(),
            number: v.get("number").and_then(Value::as_f64),
            node_errors: parse_node_errors(v.get("node_errors")),
        })
    }

    /// `GET /history/{id}`: `None` while the prompt is queued or running.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let v = self
            .get_json("GET /history", &format!("/history/{prompt_id}"))
            .await?;
        Ok(v.get(prompt_id).map(HistoryEntry::parse))
    }

    /// `GET /view`: the bytes of a stored file.
    pub async fn view(&self, file: &FileRef) -> Result<Bytes, ComfyError> {
        let mut download = self.view_download(file).await?;
        // Read into one buffer of the announced size (bounded, so a wrong length cannot make
        // it allocate much), not chunks copied into a second buffer at the end: a file is held
        // once while it downloads.
        let announced = download
            .resp
            .content_length()
            .unwrap_or(0)
            .min(VIEW_PREALLOCATE_MAX);
        let mut buf = bytes::BytesMut::with_capacity(announced as usize);
        while let Some(chunk) = download.chunk().await? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// `GET /view` as a download read chunk by chunk (see [`ViewDownload`]), for a caller that
    /// writes the file somewhere else than memory.
    pub async fn view_download(&self, file: &FileRef) -> Result<ViewDownload<'_>, ComfyError> {
        let what = format!("GET /view {}", file.filename);
        let req = self.http.get(self.url("/view")).query(&[
            ("filename", file.filename.as_str()),
            ("subfolder", file.subfolder.as_str()),
            ("type", file.folder_type.as_str()),
        ]);
        let resp = self.send(&what, req, self.options.view_timeout).await?;
        let resp = self.expect_ok(&what, resp).await?;
        Ok(ViewDownload {
            client: self,
            what,
            resp,
        })
    }

    /// `POST /upload/image` (multipart) of an input image with `overwrite=true`, like
    /// worker-comfyui.
    pub async fn upload_image(
        &self,
        name: &str,
        data: Bytes,
        subfolder: &str,
    ) -> Result<UploadedFile, ComfyError> {
        self.upload(&Upload {
            name: name.to_owned(),
            data,
            subfolder: subfolder.to_owned(),
            folder_type: "input".into(),
            content_type: None,
            original_ref: None,
        })
        .await
    }

    /// `POST /upload/image`, or `POST /upload/mask` when `upload.original_ref` is set (multipart,
    /// `overwrite=true`). ComfyUI stores any file sent to `/upload/image`, not only images.
    pub async fn upload(&self, upload: &Upload) -> Result<UploadedFile, ComfyError> {
        let path = if upload.original_ref.is_some() {
            "/upload/mask"
        } else {
            "/upload/image"
        };
        let name = &upload.name;
        let what = format!("POST {path} {name}");
        let content_type = upload
            .content_type
            .as_deref()
            .unwrap_or_else(|| mime_for(name));
        let part = reqwest::multipart::Part::stream_with_length(
            reqwest::Body::from(upload.data.clone()),
            upload.data.len() as u64,
        )
        .file_name(name.clone())
        .mime_str(content_type)
        .map_err(|e| ComfyError::Protocol {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let folder_type = if upload.folder_type.is_empty() {
            "input"
        } else {
            upload.folder_type.as_str()
        };
        let mut form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("overwrite", "true")
            .text("type", folder_type.to_owned());
        if !upload.subfolder.is_empty() {
            form = form.text("subfolder", upload.subfolder.clone());
        }
        if let Some(original) = &upload.original_ref {
            let original = serde_json::json!({
                "filename": original.filename,
                "subfolder": original.subfolder,
                "type": original.folder_type,
            });
            form = form.text("original_ref", original.to_string());
        }
        let resp = self
            .send(
                &what,
                self.http.post(self.url(path)).multipart(form),
                self.options.request_timeout,
            )
            .await?;
        let resp = self.expect_ok(&what, resp).await?;
        resp.json::<UploadedFile>()
            .await
            .map_err(|e| ComfyError::Protocol {
                what,
                detail: error_chain(&e),
            })
    }

    /// `GET /object_info`.
    pub async fn object_info(&self) -> Result<ObjectInfo, ComfyError> {
        self.get_json("GET /object_info", "/object_info")
            .await
            .map(ObjectInfo::from_value)
    }

    /// `POST /interrupt`: only `prompt_id` if given (no-op when it is not running), else whatever runs.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), ComfyError> {
        let body = match prompt_id {
            Some(id) => serde_json::json!({ "prompt_id": id }),
            None => serde_json::json!({}),
        };
        self.post_json("POST /interrupt", "/interrupt", &body).await
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<QueueSnapshot, ComfyError> {
        let v = self.get_json("GET /queue", "/queue").await?;
        Ok(QueueSnapshot::parse(&v))
    }

    /// The API-format workflow of a running or pending prompt, from `GET /queue` (each entry is
    /// `[number, prompt_id, prompt, extra_data, outputs]`); `None` when it is not queued.
    pub async fn queued_workflow(
        &self,
        prompt_id: &str,
    ) -> Result<Option<Map<String, Value>>, ComfyError> {
        let v = self.get_json("GET /queue", "/queue").await?;
        Ok(["queue_running", "queue_pending"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_array))
            .flatten()
            .find(|item| item.get(1).and_then(Value::as_str) == Some(prompt_id))
            .and_then(|item| item.get(2))
            .and_then(Value::as_object)
            .cloned())
    }

    /// `POST /queue {"delete": [...]}`: removes pending prompts (running ones are unaffected).
    pub async fn delete_from_queue(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_json(
            "POST /queue",
            "/queue",
            &serde_json::json!({ "delete": prompt_ids }),
        )
        .await
    }

    /// `POST /free` with the flags that are set (`{"unload_models": true, "free_memory": true}`,
    /// `{"free_memory": true}`, ...). ComfyUI applies them after the running prompt; a missing
    /// flag reads as false, but its prompt worker defaults `unload_models` to `free_memory`, so
    /// `free_memory` alone unloads the models too, and it also resets the output cache.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), ComfyError> {
        let mut body = serde_json::Map::new();
        if unload_models {
            body.insert("unload_models".into(), Value::Bool(true));
        }
        if free_memory {
            body.insert("free_memory".into(), Value::Bool(true));
        }
        self.post_json("POST /free", "/free", &Value::Object(body))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms() {
        let at = |t: &str| ComfyClient::new(&t.parse().unwrap(), ClientOptions::default()).unwrap();
        let c = at("127.0.0.1:8188");
        assert_eq!(c.ws_url("abc"), "ws://127.0.0.1:8188/ws?clientId=abc");
        let c = at("https://comfy.example/");
        assert_eq!(c.ws_url("x"), "wss://comfy.example/ws?clientId=x");
        let c = at("http://comfy:pw-host-secret@10.0.0.2:8188");
        assert_eq!(c.host(), "10.0.0.2:8188");
        assert_eq!(c.ws_url("x"), "ws://10.0.0.2:8188/ws?clientId=x");
        assert_eq!(
            c.url("/prompt"),
            "http://comfy:pw-host-secret@10.0.0.2:8188/prompt"
        );
        assert!(!format!("{c:?}").contains("pw-host-secret"));
    }
}
