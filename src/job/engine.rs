//! The engine: runs one parsed [`Job`] against ComfyUI — its bucket, input files, readiness
//! wait, uploads, the prompt with live progress, and the outputs in worker-comfyui's schema
//! (files inline or in a bucket, see [`super::storage`]). It sees ComfyUI only through
//! [`crate::comfy`]'s typed API, never its JSON. Deadlines, cancellation, panics and
//! housekeeping are the runner's ([`crate::runner`]), not its.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::collect::WebSocketImages;
use super::failure::{JobFailure, Report};
use super::files::JobFiles;
use super::input::ModelSpec;
use super::model_store::ModelStore;
use super::output::{Completed, OutputKind, OutputOptions};
use super::readiness::{self, NotReady, ProcessWatch};
use super::request::Job;
use super::spooled_file::Spool;
use super::storage::{JobStorage, Storage};
use super::{collect, convert, input, model_check, report};
use crate::comfy::{
    ClientOptions, ComfyClient, ComfyError, ExtraData, Outcome, PromptEvent, PromptResult,
    WatchOptions,
};
use crate::comfy::{FileRef, Upload};
use crate::config::Settings;
use crate::metrics::RetryReason;
use crate::progress::{NodeEvent, ProgressSender, ProgressSnapshot, ProgressTracker};

/// What one run of the engine gave: the job's result, and the files it left in ComfyUI's
/// folders (for `CLEANUP_FILES`).
#[derive(Debug)]
pub struct Ran {
    /// The job's result.
    pub result: Result<Completed, JobFailure>,
    /// The files the job left behind.
    pub files: JobFiles,
}

/// The test hook that makes a job panic (see [`Engine::with_test_hooks_from_env`]).
pub const TEST_PANIC_ENV: &str = "COMFY_WORKER_TEST_PANIC_NODE";

/// Runs jobs against one ComfyUI.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(super) comfy: ComfyClient,
    pub(super) settings: Settings,
    pub(super) inputs: input::Fetcher,
    pub(super) storage: Storage,
    /// `/object_info`, fetched when the first UI-format workflow comes.
    object_info: convert::ObjectInfoCache,
    /// The models jobs bring, downloaded once.
    models: ModelStore,
    /// Where outputs wait between `/view` and the result (`None`: in memory).
    pub(super) spool: Option<Arc<Spool>>,
    /// Test hook: panic when a node of this class starts (never set in production).
    panic_on_class: Option<String>,
}

impl Engine {
    /// An engine for the ComfyUI in `settings`.
    pub fn new(settings: Settings) -> Result<Engine, ComfyError> {
        let comfy = ComfyClient::new(
            &settings.comfy_host,
            ClientOptions {
                connect_timeout: Duration::from_secs(5),
                request_timeout: settings.http_timeout,
                view_timeout: settings.view_timeout,
            },
        )?;
        let inputs = input::Fetcher::new(&settings.inputs);
        let storage = Storage::new(settings.storage.clone());
        let models = ModelStore::new(&settings.models, &settings.inputs);
        let spool = Spool::create()
            .map_err(|e| {
                warn!(error = %e, "cannot make an output spool folder in TMPDIR; outputs are held in memory until delivered")
            })
            .ok();
        Ok(Engine {
            spool,
            models,
            comfy,
            settings,
            inputs,
            storage,
            object_info: convert::ObjectInfoCache::default(),
            panic_on_class: None,
        })
    }

    /// **Test hook**, for proving that a panic inside a job fails that job only: when
    /// `COMFY_WORKER_TEST_PANIC_NODE` names a node class, a job panics as soon as a node of that
    /// class starts executing in ComfyUI (so mid-prompt, with the prompt queued and running).
    /// Unset, as in production, this does nothing. Nothing a job sends can arm it; only the
    /// process environment can. The front ends (`worker`, `serve`) call this at start.
    #[doc(hidden)]
    pub fn with_test_hooks_from_env(mut self) -> Engine {
        self.panic_on_class = std::env::var(TEST_PANIC_ENV)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty());
        if let Some(class) = &self.panic_on_class {
            warn!(
                class = %class,
                "test hook {TEST_PANIC_ENV} is set: a job panics when a node of this class starts"
            );
        }
        self
    }

    /// One engine per ComfyUI its settings name (`COMFY_HOST=a,b`), this one's first: each
    /// with its own client, PID file and temp folder, all sharing the input fetcher, the bucket,
    /// the model cache (a model two jobs bring downloads once) and the test hooks.
    pub fn instances(&self) -> Vec<Engine> {
        self.settings
            .per_instance()
            .into_iter()
            .enumerate()
            .map(|(i, settings)| Engine {
                comfy: if i == 0 {
                    self.comfy.clone()
                } else {
                    self.comfy.for_address(&settings.comfy_host)
                },
                settings,
                inputs: self.inputs.clone(),
                storage: self.storage.clone(),
                object_info: if i == 0 {
                    self.object_info.clone()
                } else {
                    convert::ObjectInfoCache::default()
                },
                models: self.models.clone(),
                spool: self.spool.clone(),
                panic_on_class: self.panic_on_class.clone(),
            })
            .collect()
    }

    /// The folder outputs wait in between `/view` and the result (`None`: they are held in
    /// memory).
    pub fn spool_dir(&self) -> Option<&std::path::Path> {
        self.spool.as_deref().map(Spool::dir)
    }

    /// The ComfyUI client.
    pub fn comfy(&self) -> &ComfyClient {
        &self.comfy
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn watch_options(&self) -> WatchOptions {
        WatchOptions {
            connect_timeout: Duration::from_secs(10),
            reconnect_attempts: self.settings.ws_reconnect_attempts,
            reconnect_delay: self.settings.ws_reconnect_delay,
            silence_timeout: self.settings.ws_silence_timeout,
            poll_interval: self.settings.history_poll_interval,
            cancel_grace: Duration::from_secs(15),
        }
    }

    /// Runs one job to its result, recording the files it leaves in ComfyUI's folders. Never
    /// panics on bad input; every failure is a [`JobFailure`].
    pub async fn run(
        &self,
        job: &Job,
        progress: &ProgressSender,
        cancel: &CancellationToken,
    ) -> Ran {
        let mut files = JobFiles::default();
        let result = self.run_inner(job, progress, cancel, &mut files).await;
        Ran { result, files }
    }

    async fn run_inner(
        &self,
        job: &Job,
        progress: &ProgressSender,
        cancel: &CancellationToken,
        files: &mut JobFiles,
    ) -> Result<Completed, JobFailure> {
        let started = Instant::now();
        let input = &job.input;
        info!(
            nodes = input.workflow.len(),
            files = input.files.len(),
            "job started"
        );
        // The job's bucket (its s3Config, checked by the SSRF guard, else the worker's): where
        // `s3://` inputs come from and outputs may go. An unusable s3Config fails the job here.
        let storage = match self.storage.for_job(&job.id, job.s3_config.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                info!(error = %e, "job s3Config rejected");
                return Err(JobFailure::Storage(Report::new(e.to_string())));
            }
        };
        // Input files are downloaded while ComfyUI may still be starting; a bad URL fails the
        // job before anything is uploaded.
        let fetch = self.inputs.fetch_all(&input.files, &storage, cancel);
        let ready = async {
            let mut on_wait = |w: &readiness::Waiting| {
                progress.send(ProgressSnapshot::waiting(w.to_string(), started.elapsed()))
            };
            readiness::wait_until_ready(&self.comfy, &self.settings, cancel, &mut on_wait)
                .await
                .map_err(|e| match e {
                    NotReady::Cancelled => JobFailure::Cancelled(Report::new(e.to_string())),
                    other => JobFailure::ComfyUnreachable(Report::new(other.to_string())),
                })
        };
        let uploads = match tokio::try_join!(fetch, ready) {
            Ok((uploads, ())) => uploads,
            Err(failure) => {
                info!(error = %failure, "job stopped before queueing");
                return Err(failure);
            }
        };
        // A UI-format workflow is converted before anything is uploaded.
        let workflow =
            convert::resolve(&self.comfy, &self.object_info, input.workflow.clone()).await?;
        self.install_models(&input.models, &storage, progress, started, cancel)
            .await?;
        // A model the workflow names that ComfyUI lacks fails the job here, in milliseconds.
        model_check::check(
            &self.comfy,
            &self.object_info,
            &workflow,
            !input.models.is_empty(),
        )
        .await?;
        self.upload_files(&uploads, &mut files.inputs).await?;
        let mut extra = ExtraData::new();
        let key = input
            .comfy_org_api_key
            .as_ref()
            .or(self.settings.comfy_org_api_key.as_ref());
        if let Some(key) = key {
            extra.insert(
                "api_key_comfy_org".into(),
                Value::String(key.expose().into()),
            );
        }
        if input.previews {
            // Today's ComfyUI takes the method per prompt; 0.3.64 ignores it and previews only
            // with --preview-method (COMFY_PREVIEW_METHOD in the start script).
            extra.insert("preview_method".into(), Value::String("auto".into()));
        }
        let mut tracker = ProgressTracker::new(&workflow, started);
        let mut ws_images = WebSocketImages::new(
            workflow
                .websocket_image_nodes()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        );
        let process = ProcessWatch::start(self.settings.comfy_pid_file.as_deref());
        let watch_options = self.watch_options();
        // Nodes whose outputs went out as they finished (the others go out from `/history`).
        let mut outputs_sent: HashSet<String> = HashSet::new();
        let mut on_event = |event: PromptEvent| {
            if let (Some(class), PromptEvent::Executing { node }) = (&self.panic_on_class, &event) {
                if workflow.class_type(node) == Some(class.as_str()) {
                    panic!("test hook {TEST_PANIC_ENV}: node {node} ({class}) started");
                }
            }
            ws_images.observe(&event);
            if let Some(snapshot) = tracker.apply(&event, Instant::now()) {
                progress.send(snapshot);
            }
            match event {
                PromptEvent::Executed { output, .. }
                    if !output.files.is_empty() || !output.texts.is_empty() =>
                {
                    outputs_sent.insert(output.node_id.clone());
                    progress.node_event(NodeEvent::Output(*output));
                }
                PromptEvent::Preview { node, mime, data } => {
                    progress.node_event(NodeEvent::Preview {
                        node,
                        mime,
                        data,
                        size: None,
                    })
                }
                PromptEvent::Text { node, text } => {
                    progress.node_event(NodeEvent::Text { node, text })
                }
                PromptEvent::Failed(failure) => progress.node_event(NodeEvent::Failed(failure)),
                PromptEvent::Reconnecting { .. } => progress.retry(RetryReason::WebSocket),
                _ => {}
            }
        };
        let run = self.comfy.run_prompt(
            &workflow,
            (!extra.is_empty()).then_some(&extra),
            &watch_options,
            cancel,
            &mut on_event,
        );
        // A ComfyUI process that exits or is replaced mid-prompt ends the job at once (the
        // dropped watch interrupts what it can).
        let result = tokio::select! {
            result = run => result,
            ended = process.ended(self.settings.history_poll_interval) => {
                warn!(error = %ended, "the ComfyUI process went away during the job");
                return Err(JobFailure::Comfy(Report::new(ended.to_string())));
            }
        };
        let result = match result {
            Ok(r) => r,
            Err(ComfyError::Rejected(r)) => {
                let info = if report::model_hint_targets(&r).is_empty() {
                    None
                } else {
                    self.comfy.object_info().await.ok()
                };
                let (message, details) = report::rejection(&r, info.as_ref());
                info!(
                    nodes = r.node_errors.len(),
                    "workflow rejected by ComfyUI validation"
                );
                return Err(JobFailure::Rejected(
                    Report::with_details(message, details),
                    r.node_errors,
                ));
            }
            Err(e) => {
                warn!(error = %e, "job failed talking to ComfyUI");
                return Err(JobFailure::Comfy(Report::new(e.to_string())));
            }
        };
        // Outputs whose `executed` frame was missed (a lost socket) go out now, before the result.
        for node in &result.outputs {
            let has_any = !node.files.is_empty() || !node.texts.is_empty();
            if has_any && !outputs_sent.contains(&node.node_id) {
                progress.node_event(NodeEvent::Output(node.clone()));
            }
        }
        if matches!(result.outcome, Outcome::Success) && !result.cancelled {
            progress.send(tracker.finished(Instant::now()));
        }
        files.outputs.extend(
            result
                .outputs
                .iter()
                .flat_map(|node| node.files.iter().map(|f| f.file.clone())),
        );
        let output = self.collect(result, ws_images, &job.output, &storage).await;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = output.is_ok(),
            "job finished"
        );
        output
    }

    /// Makes the job's models available in ComfyUI's model folder (downloading those it lacks),
    /// one after the other, their progress as `downloading` snapshots.
    async fn install_models(
        &self,
        models: &[ModelSpec],
        storage: &JobStorage,
        progress: &ProgressSender,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), JobFailure> {
        for spec in models {
            let mut reported: Option<(u64, Instant)> = None;
            let mut on_bytes = |done: u64, total: Option<u64>| {
                // At the start, every percent (or 16 MB when the size is unknown), and the end.
                let step = total.map_or(16 << 20, |t| (t / 100).max(1));
                let due = match reported {
                    None => true,
                    Some((last, _)) => done >= last + step || Some(done) == total,
                };
                if due {
                    reported = Some((done, Instant::now()));
                    progress.send(ProgressSnapshot::downloading(
                        &spec.name,
                        done,
                        total,
                        started.elapsed(),
                    ));
                }
            };
            let ensured = tokio::select! {
                ensured = self.models.ensure(spec, storage, &mut on_bytes) => ensured,
                _ = cancel.cancelled() => {
                    return Err(JobFailure::Cancelled(Report::new("Job cancelled while downloading models")));
                }
            };
            match ensured {
                Ok(downloaded) => {
                    info!(model = %spec.name, folder = %spec.folder, downloaded, "model ready")
                }
                Err(e) => {
                    info!(error = %e, "model not available");
                    return Err(JobFailure::InputFiles(Report::new(e.to_string())));
                }
            }
        }
        Ok(())
    }

    /// Uploads the input files in order (a mask after the image it refers to, when listed so):
    /// masks to `/upload/mask`, everything else to `/upload/image`.
    /// Each file ComfyUI stored is added to `stored`, under the name ComfyUI gave it.
    async fn upload_files(
        &self,
        uploads: &[Upload],
        stored_files: &mut Vec<FileRef>,
    ) -> Result<(), JobFailure> {
        let mut problems = Vec::new();
        for upload in uploads {
            match self.comfy.upload(upload).await {
                Ok(stored) => {
                    if stored.name != upload.name {
                        warn!(requested = %upload.name, stored = %stored.name, "ComfyUI stored the input under another name");
                    }
                    stored_files.push(FileRef {
                        filename: stored.name,
                        // ComfyUI echoes both; fall back to what was asked for if it did not.
                        subfolder: if stored.subfolder.is_empty() {
                            upload.subfolder.clone()
                        } else {
                            stored.subfolder
                        },
                        folder_type: if stored.folder_type.is_empty() {
                            upload.folder_type.clone()
                        } else {
                            stored.folder_type
                        },
                    });
                }
                Err(e) => problems.push(format!("Error uploading {}: {e}", upload.name)),
            }
        }
        if problems.is_empty() {
            if !uploads.is_empty() {
                info!(count = uploads.len(), "input files uploaded");
            }
            Ok(())
        } else {
            Err(JobFailure::Upload(Report::with_details(
                "Failed to upload one or more input images",
                problems,
            )))
        }
    }

    /// Fetches the returnable outputs, delivers them (inline or to the job's bucket) and applies
    /// worker-comfyui's assembly rules (see [`collect`] for the steps).
    async fn collect(
        &self,
        result: PromptResult,
        ws_images: WebSocketImages,
        options: &OutputOptions,
        storage: &JobStorage,
    ) -> Result<Completed, JobFailure> {
        let mut errors = Vec::new();
        match &result.outcome {
            Outcome::Success => {}
            Outcome::Failed(f) => errors.push(report::execution_error(f)),
            Outcome::Interrupted(i) => {
                let line = report::interrupted(i, result.cancelled);
                if result.cancelled {
                    return Err(JobFailure::Cancelled(Report::new(line)));
                }
                errors.push(line);
            }
        }
        errors.extend(report::dropped_outputs(&result.dropped_outputs));
        errors.extend(result.warnings.iter().cloned());
        if result.outputs.is_empty() && ws_images.is_empty() && errors.is_empty() {
            errors.push(format!(
                "No outputs found in history for prompt {}.",
                result.prompt_id
            ));
        }
        for node in &result.outputs {
            errors.extend(node.problems.iter().cloned());
        }
        let selection = collect::select(&result.outputs, options);
        let mut files = self.fetch_files(selection.files, &mut errors).await;
        let (ws_files, ws_warning) = ws_images.finish();
        if options.wants(OutputKind::Images.name()) {
            files.extend(ws_files);
            errors.extend(ws_warning);
        }
        let outputs = match self
            .deliver_files(storage, files, selection.texts, &mut errors)
            .await
        {
            Ok(outputs) => outputs,
            // Over the inline limit with nowhere to upload to: the platform would refuse it.
            Err(too_large) => {
                return Err(JobFailure::OutputTooLarge(Report::with_details_if_any(
                    too_large.to_string(),
                    errors,
                )))
            }
        };
        info!(
            images = outputs.images.len(),
            videos = outputs.more.videos.len(),
            audio = outputs.more.audio.len(),
            texts = outputs.more.text.len(),
            other = outputs.more.other.values().map(Vec::len).sum::<usize>(),
            warnings = errors.len(),
            "outputs collected"
        );
        if outputs.is_empty() {
            // Lead with what stopped the prompt, not worker-comfyui's generic "Job processing failed".
            match &result.outcome {
                Outcome::Failed(f) => {
                    let headline = report::execution_error(f);
                    return Err(JobFailure::NodeError(Report::with_details(
                        headline, errors,
                    )));
                }
                Outcome::Interrupted(i) => {
                    let headline = report::interrupted(i, false);
                    return Err(JobFailure::Interrupted(Report::with_details(
                        headline, errors,
                    )));
                }
                Outcome::Success => {}
            }
        }
        Completed::assemble(outputs, errors)
    }
}
