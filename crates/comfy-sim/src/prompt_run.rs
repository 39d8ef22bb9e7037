//! The running prompt as the executor and the nodes share it: how it ended early
//! ([`Failure`]), its messages and progress bookkeeping ([`PromptRun`]), and the previews nodes
//! attach to progress.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::ws::{PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA};
use super::{lock, pyfmt, Pause, Shared};

/// How a prompt ended early.
pub(crate) enum Failure {
    Interrupted,
    Error {
        /// `full_type_name`, e.g. `RuntimeError`.
        exception_type: String,
        /// `str(ex)` (the server appends `"\n"`).
        message: String,
        traceback: Vec<String>,
    },
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A preview image attached to a progress update.
pub(crate) struct Preview {
    pub(crate) bytes: Vec<u8>,
    /// Event-1 format code: 1 JPEG, 2 PNG.
    pub(crate) format: u32,
    pub(crate) mime: &'static str,
}

/// Message emission and progress bookkeeping for the running prompt.
pub(crate) struct PromptRun {
    pub(crate) shared: Arc<Shared>,
    pub(crate) prompt_id: String,
    /// `server.client_id`: the routing key of the prompt's messages.
    pub(crate) client_id: Option<String>,
    /// `status_messages`: what history's `status.messages` lists.
    pub(crate) messages: Vec<Value>,
    /// The progress registry: every started node, in start order, as sent in `progress_state`.
    progress: Map<String, Value>,
}

impl PromptRun {
    /// A prompt starting: no message sent, no node started.
    pub(crate) fn new(shared: Arc<Shared>, prompt_id: String, client_id: Option<String>) -> Self {
        PromptRun {
            shared,
            prompt_id,
            client_id,
            messages: Vec::new(),
            progress: Map::new(),
        }
    }

    /// Messages routed to the prompt's client, or broadcast when it has none.
    pub(crate) fn to_client(&self, event: &str, data: Value) {
        self.shared
            .hub
            .send_json(event, data, self.client_id.as_deref());
    }

    /// Messages guarded by `if server.client_id is not None`.
    pub(crate) fn to_client_only(&self, event: &str, data: Value) {
        if self.client_id.is_some() {
            self.to_client(event, data);
        }
    }

    /// `PromptExecutor.add_message`.
    pub(crate) fn add_message(&mut self, event: &str, mut data: Value, broadcast: bool) {
        if let Value::Object(map) = &mut data {
            map.insert("timestamp".into(), json!(now_ms()));
        }
        self.messages.push(json!([event, data]));
        if self.client_id.is_some() || broadcast {
            self.to_client(event, data);
        }
    }

    fn progress_entry(&self, id: &str, value: Value, max: Value, state: &str) -> Value {
        json!({
            "value": value,
            "max": max,
            "state": state,
            "node_id": id,
            "prompt_id": self.prompt_id,
            "display_node_id": id,
            "parent_node_id": null,
            "real_node_id": id,
        })
    }

    /// `current` only: what today's ComfyUI adds to every output file entry, in `executed` and
    /// history alike: the media `metadata` of images (`{kind, width, height}`) and, with the
    /// assets system on, an asset `id` (new for every run, cached ones too) and `preview_id`.
    pub(crate) fn enrich(&self, mut ui: Map<String, Value>) -> Map<String, Value> {
        if self.shared.config.profile != super::Profile::Current {
            return ui;
        }
        let store = lock(&self.shared.store);
        for items in ui.values_mut().filter_map(Value::as_array_mut) {
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                let (Some(name), Some(kind)) = (
                    item.get("filename").and_then(Value::as_str),
                    item.get("type").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let subfolder = item.get("subfolder").and_then(Value::as_str).unwrap_or("");
                let rel = if subfolder.is_empty() {
                    name.to_owned()
                } else {
                    format!("{subfolder}/{name}")
                };
                let Some(bytes) = super::store::Folder::from_type(kind)
                    .and_then(|folder| store.files.get(folder, &rel))
                else {
                    continue;
                };
                if let Some((width, height)) = super::image::image_size(bytes) {
                    item.insert(
                        "metadata".into(),
                        json!({"kind": "image", "width": width, "height": height}),
                    );
                    let id = uuid::Uuid::new_v4().to_string();
                    item.insert("id".into(), json!(id));
                    item.insert("preview_id".into(), json!(id));
                } else {
                    item.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
                }
            }
        }
        ui
    }

    /// `current` only: the node loads its models before its first step, shown as
    /// `activity: "loading"` on its `progress_state` entry, then cleared (ComfyUI PR #16202).
    pub(crate) fn model_loading(&mut self, id: &str) {
        if self.shared.config.profile != super::Profile::Current {
            return;
        }
        let mut entry = self.progress_entry(id, json!(0.0), json!(1.0), "running");
        if let Value::Object(map) = &mut entry {
            map.insert("activity".into(), json!("loading"));
        }
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
        let entry = self.progress_entry(id, json!(0.0), json!(1.0), "running");
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
    }

    fn send_progress_state(&self) {
        self.to_client(
            "progress_state",
            json!({"prompt_id": self.prompt_id, "nodes": self.progress}),
        );
    }

    pub(crate) fn progress_start(&mut self, id: &str) {
        let entry = self.progress_entry(id, json!(0.0), json!(1.0), "running");
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
    }

    pub(crate) fn progress_finish(&mut self, id: &str) {
        let max = self
            .progress
            .get(id)
            .and_then(|e| e.get("max"))
            .cloned()
            .unwrap_or(json!(1.0));
        let entry = self.progress_entry(id, max.clone(), max, "finished");
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
    }

    /// A cached node enters the registry as pending (ints 0/1) and is finished at once.
    pub(crate) fn progress_cached(&mut self, id: &str) {
        let entry = self.progress_entry(id, json!(1), json!(1), "finished");
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
    }

    /// `ProgressBar.update_absolute(value, max, preview)` through `main.py`'s hook: the interrupt check,
    /// `progress_state` (+ event 4 for metadata clients), `progress` (+ event 1 for the others).
    pub(crate) fn report_progress(
        &mut self,
        id: &str,
        value: u64,
        max: u64,
        preview: Option<&Preview>,
    ) -> Result<(), Failure> {
        if self.shared.interrupted() {
            return Err(Failure::Interrupted);
        }
        let entry = self.progress_entry(id, json!(value), json!(max), "running");
        self.progress.insert(id.to_owned(), entry);
        self.send_progress_state();
        let hub = &self.shared.hub;
        let sid = self.client_id.as_deref();
        let metadata = hub.supports_preview_metadata(sid);
        if let (Some(preview), true) = (preview, metadata) {
            let header = pyfmt::to_json(&json!({
                "node_id": id,
                "prompt_id": self.prompt_id,
                "display_node_id": id,
                "parent_node_id": null,
                "real_node_id": id,
                "image_type": preview.mime,
            }));
            let mut payload = (header.len() as u32).to_be_bytes().to_vec();
            payload.extend_from_slice(header.as_bytes());
            payload.extend_from_slice(&preview.bytes);
            hub.send_binary(PREVIEW_IMAGE_WITH_METADATA, &payload, sid);
        }
        self.to_client(
            "progress",
            json!({"value": value, "max": max, "prompt_id": self.prompt_id, "node": id}),
        );
        lock(&self.shared.log).steps.push(super::StepMark {
            prompt_id: self.prompt_id.clone(),
            node: id.to_owned(),
            step: value,
            at: std::time::Instant::now(),
        });
        if let (Some(preview), false) = (preview, metadata) {
            let mut payload = preview.format.to_be_bytes().to_vec();
            payload.extend_from_slice(&preview.bytes);
            hub.send_binary(PREVIEW_IMAGE, &payload, sid);
        }
        Ok(())
    }

    /// One sampler step: wait `step_delay`, report progress, then stop at an armed breakpoint.
    pub(crate) async fn step(
        &mut self,
        id: &str,
        step: u64,
        steps: u64,
        preview: Option<&Preview>,
    ) -> Result<(), Failure> {
        tokio::time::sleep(self.shared.config.step_delay).await;
        self.report_progress(id, step, steps, preview)?;
        if let Ok(step) = u32::try_from(step) {
            self.shared.reached(super::DropPoint::AfterStep(step));
        }
        let pause = &self.shared.control.pause;
        let breakpoint = u32::try_from(step).ok().map(Pause::Armed);
        let stopped = pause.send_if_modified(|p| {
            if Some(*p) == breakpoint {
                *p = Pause::Paused;
                true
            } else {
                false
            }
        });
        if stopped {
            let mut rx = pause.subscribe();
            let _ = rx.wait_for(|p| *p != Pause::Paused).await;
        }
        Ok(())
    }
}
