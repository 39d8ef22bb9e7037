//! UI-format workflows in jobs: converted to the API format with ComfyUI's `/object_info`,
//! fetched once per engine and kept (it can be several MB), fetched again once when a workflow
//! names a class the kept copy lacks (a custom node installed since).

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tracing::info;

use super::failure::{JobFailure, Report};
use super::input::capitalise;
use crate::comfy::workflow::ui_message;
use crate::comfy::{ComfyClient, ComfyError, ObjectInfo, Workflow, WorkflowInput};

/// The engine's copy of `/object_info`, shared by its clones.
#[derive(Clone, Default)]
pub(crate) struct ObjectInfoCache(Arc<tokio::sync::Mutex<Option<Arc<ObjectInfo>>>>);

impl std::fmt::Debug for ObjectInfoCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectInfoCache")
    }
}

impl ObjectInfoCache {
    /// The kept copy, or a fresh one (then kept) when there is none or `refresh` is set; the
    /// flag says whether it was fetched now. Jobs asking at once share one fetch.
    pub(crate) async fn get(
        &self,
        comfy: &ComfyClient,
        refresh: bool,
    ) -> Result<(Arc<ObjectInfo>, bool), ComfyError> {
        let mut slot = self.0.lock().await;
        if let (Some(info), false) = (slot.as_ref(), refresh) {
            return Ok((info.clone(), false));
        }
        let started = Instant::now();
        let info = Arc::new(comfy.object_info().await?);
        info!(
            classes = info.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "fetched /object_info for UI-format workflows"
        );
        *slot = Some(info.clone());
        Ok((info, true))
    }
}

/// The workflow to queue: an API-format one as it is, a UI-format one converted.
pub(crate) async fn resolve(
    comfy: &ComfyClient,
    cache: &ObjectInfoCache,
    workflow: WorkflowInput,
) -> Result<Workflow, JobFailure> {
    let ui = match workflow {
        WorkflowInput::Api(w) => return Ok(w),
        WorkflowInput::Ui(ui) => ui,
    };
    let fetch_failed = |e: ComfyError| {
        conversion(format!(
            "Cannot convert the UI-format workflow to API format: GET /object_info failed: {e}"
        ))
    };
    let (info, fresh) = cache.get(comfy, false).await.map_err(fetch_failed)?;
    let converted = match ui.convert(&info) {
        Err(e) if e.unknown_class && !fresh => {
            let (info, _) = cache.get(comfy, true).await.map_err(fetch_failed)?;
            ui.convert(&info)
        }
        other => other,
    };
    match converted {
        Ok(graph) => {
            let sent = graph.len();
            let workflow = Workflow::from_value(Value::Object(graph))
                .map_err(|e| conversion(capitalise(&e.to_string())))?;
            info!(
                ui_nodes = ui.len(),
                api_nodes = sent,
                "UI-format workflow converted"
            );
            Ok(workflow)
        }
        Err(e) => {
            info!(error = %e, "UI-format workflow not convertible");
            Err(conversion(capitalise(&ui_message(&e))))
        }
    }
}

fn conversion(message: impl Into<String>) -> JobFailure {
    JobFailure::Conversion(Report::new(message))
}
