//! The job engine: validates a job's input, uploads its images, runs the workflow on ComfyUI
//! with live progress, and assembles worker-comfyui's output (files inline or in a bucket, see
//! [`storage`]). It sees ComfyUI only through [`crate::comfy`]'s typed API, never its JSON.

pub mod codec;
pub mod collect;
mod convert;
pub mod input;
pub mod output;
pub(crate) mod report;
pub mod storage;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::comfy::api::{FileRef, Upload};
use crate::comfy::{
    ClientOptions, ComfyClient, ComfyError, ExtraData, Outcome, PromptEvent, PromptResult,
    WatchOptions,
};
use crate::config::{Secret, Settings};
use crate::ops::cleanup::JobFiles;
use crate::progress::{ProgressSender, ProgressTracker};

pub use collect::{CollectedFile, WebSocketImages};
pub use input::{parse_input, JobInput};
pub use output::{
    FileEntry, JobOutput, MoreOutputs, OutputImage, OutputKind, OutputOptions, Outputs,
};
pub use storage::{JobStorage, Storage, StorageSettings, UploadMode};

/// The test hook that makes a job panic (see [`Engine::with_test_hooks_from_env`]).
pub const TEST_PANIC_ENV: &str = "COMFY_WORKER_TEST_PANIC_NODE";

/// Runs jobs against one ComfyUI.
#[derive(Debug, Clone)]
pub struct Engine {
    comfy: ComfyClient,
    settings: Settings,
    inputs: input::Fetcher,
    storage: Storage,
    /// `/object_info`, fetched when the first UI-format workflow comes.
    object_info: convert::ObjectInfoCache,
    /// Test hook: panic when a node of this class starts (never set in production).
    panic_on_class: Option<String>,
}

/// What a job carries beside `input` that the engine uses.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// The job's top-level `s3Config` (the platform's field); `input.s3Config` is read too.
    pub s3_config: Option<Value>,
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
        Ok(Engine {
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

    /// Waits until ComfyUI answers `/system_stats`.
    ///
    /// With a PID file (written by the start script) it waits as long as that process lives
    /// and fails at once when it dies; without one it tries `COMFY_API_AVAILABLE_MAX_RETRIES`
    /// times (500 when 0), every `COMFY_API_AVAILABLE_INTERVAL_MS`.
    pub async fn wait_until_ready(&self, cancel: &CancellationToken) -> Result<(), String> {
        let host = self.comfy.host().to_owned();
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            let err = match self.comfy.system_stats().await {
                Ok(_) => {
                    if attempts > 0 {
                        info!(host = %host, waited_ms = started.elapsed().as_millis() as u64, "ComfyUI is ready");
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            attempts += 1;
            match comfy_process_state(&self.settings.comfy_pid_file) {
                ProcessState::Dead(pid) => {
                    return Err(format!(
                        "ComfyUI server ({host}) not reachable: the ComfyUI process (pid {pid} from {}) has exited; see its log",
                        self.settings.comfy_pid_file.display()
                    ))
                }
                ProcessState::Alive => {}
                ProcessState::NoPidFile => {
                    if attempts >= self.settings.readiness_attempts() {
                        return Err(format!(
                            "ComfyUI server ({host}) not reachable after multiple retries. Last error: {err}"
                        ));
                    }
                }
            }
            if last_log.elapsed() >= Duration::from_secs(10) {
                info!(host = %host, waited_s = started.elapsed().as_secs(), error = %err, "still waiting for ComfyUI");
                last_log = Instant::now();
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err("Job cancelled while waiting for ComfyUI".into()),
                _ = tokio::time::sleep(self.settings.api_available_interval) => {}
            }
        }
    }

    /// Runs one job to its output. Never panics on bad input; every failure is an `error` output.
    pub async fn run(
        &self,
        job_id: &str,
        input: Option<&Value>,
        progress: &ProgressSender,
        cancel: &CancellationToken,
    ) -> JobOutput {
        self.run_with(job_id, input, &JobOptions::default(), progress, cancel)
            .await
    }

    /// [`Engine::run`] with what the job carries beside `input` (its `s3Config`).
    pub async fn run_with(
        &self,
        job_id: &str,
        input: Option<&Value>,
        job: &JobOptions,
        progress: &ProgressSender,
        cancel: &CancellationToken,
    ) -> JobOutput {
        let span = tracing::info_span!("job", job_id = %job_id);
        // The job's own secrets (`comfy_org_api_key`, `s3Config.accessSecret`, ...) are scrubbed
        // from logs while it runs, and from its error messages.
        let _secrets: Vec<Secret> = input
            .into_iter()
            .chain(job.s3_config.as_ref())
            .flat_map(crate::telemetry::secret_values)
            .map(Secret::new)
            .collect();
        let mut files = JobFiles::default();
        let output = self
            .run_inner(job_id, input, job, progress, cancel, &mut files)
            .instrument(span.clone())
            .await;
        if self.settings.housekeeping.cleanup_files {
            self.clean_up(files).instrument(span).await;
        }
        scrub_messages(output)
    }

    /// `CLEANUP_FILES`: deletes what the job left in ComfyUI's folders (its outputs are already
    /// collected and delivered by now) and logs the counts.
    async fn clean_up(&self, files: JobFiles) {
        if files.is_empty() {
            return;
        }
        let dirs = self.settings.housekeeping.clone();
        let done = tokio::task::spawn_blocking(move || {
            crate::ops::cleanup::delete_job_files(&dirs, &files)
        })
        .await;
        match done {
            Ok(report) => info!(
                deleted = report.deleted,
                missing = report.missing,
                refused = report.refused,
                failed = report.failed,
                "job files cleaned up"
            ),
            Err(e) => warn!(error = %e, "the clean-up task failed"),
        }
    }

    async fn run_inner(
        &self,
        job_id: &str,
        raw_input: Option<&Value>,
        job: &JobOptions,
        progress: &ProgressSender,
        cancel: &CancellationToken,
        files: &mut JobFiles,
    ) -> JobOutput {
        let started = Instant::now();
        let parsed = input::parse_input(raw_input)
            .and_then(|i| OutputOptions::parse(raw_input).map(|options| (i, options)));
        let (input, options) = match parsed {
            Ok(parsed) => parsed,
            Err(out) => {
                info!(
                    error = out.error_message().unwrap_or(""),
                    "job input rejected"
                );
                return out;
            }
        };
        info!(
            nodes = input.workflow.len(),
            files = input.files.len(),
            "job started"
        );
        // The job's bucket (its s3Config, checked by the SSRF guard, else the worker's): where
        // `s3://` inputs come from and outputs may go. An unusable s3Config fails the job here.
        let s3_config = storage::job_s3_config(job.s3_config.as_ref(), raw_input);
        let storage = match self.storage.for_job(job_id, s3_config.as_ref()).await {
            Ok(s) => s,
            Err(message) => {
                info!(error = %message, "job s3Config rejected");
                return JobOutput::error(message);
            }
        };
        // Input files are downloaded while ComfyUI may still be starting; a bad URL fails the
        // job before anything is uploaded.
        let fetch = self.inputs.fetch_all(&input.files, &storage, cancel);
        let ready = async {
            self.wait_until_ready(cancel)
                .await
                .map_err(JobOutput::error)
        };
        let uploads = match tokio::try_join!(fetch, ready) {
            Ok((uploads, ())) => uploads,
            Err(out) => {
                info!(
                    error = out.error_message().unwrap_or(""),
                    "job stopped before queueing"
                );
                return out;
            }
        };
        // A UI-format workflow is converted before anything is uploaded.
        let workflow = match convert::resolve(&self.comfy, &self.object_info, input.workflow).await
        {
            Ok(w) => w,
            Err(out) => return out,
        };
        if let Err(out) = self.upload_files(&uploads, &mut files.inputs).await {
            return out;
        }
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
        let mut tracker = ProgressTracker::new(&workflow, started);
        let mut ws_images = WebSocketImages::new(
            workflow
                .websocket_image_nodes()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        );
        let result = self
            .comfy
            .run_prompt(
                &workflow,
                (!extra.is_empty()).then_some(&extra),
                &self.watch_options(),
                cancel,
                &mut |event| {
                    if let (Some(class), PromptEvent::Executing { node }) =
                        (&self.panic_on_class, &event)
                    {
                        if workflow.class_type(node) == Some(class.as_str()) {
                            panic!("test hook {TEST_PANIC_ENV}: node {node} ({class}) started");
                        }
                    }
                    ws_images.observe(&event);
                    if let Some(snapshot) = tracker.apply(&event, Instant::now()) {
                        progress.send(snapshot);
                    }
                },
            )
            .await;
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
                return JobOutput::error_with_details(message, details);
            }
            Err(e) => {
                warn!(error = %e, "job failed talking to ComfyUI");
                return JobOutput::error(e.to_string());
            }
        };
        if matches!(result.outcome, Outcome::Success) && !result.cancelled {
            progress.send(tracker.finished(Instant::now()));
        }
        files.outputs.extend(
            result
                .outputs
                .iter()
                .flat_map(|node| node.files.iter().map(|f| f.file.clone())),
        );
        let output = self.collect(result, ws_images, &options, &storage).await;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = !output.is_error(),
            "job finished"
        );
        output
    }

    /// Uploads the input files in order (a mask after the image it refers to, when listed so):
    /// masks to `/upload/mask`, everything else to `/upload/image`.
    /// Each file ComfyUI stored is added to `stored`, under the name ComfyUI gave it.
    async fn upload_files(
        &self,
        uploads: &[Upload],
        stored_files: &mut Vec<FileRef>,
    ) -> Result<(), JobOutput> {
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
            Err(JobOutput::error_with_details(
                "Failed to upload one or more input images",
                problems,
            ))
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
    ) -> JobOutput {
        let mut errors = Vec::new();
        match &result.outcome {
            Outcome::Success => {}
            Outcome::Failed(f) => errors.push(report::execution_error(f)),
            Outcome::Interrupted(i) => {
                let line = report::interrupted(i, result.cancelled);
                if result.cancelled {
                    return JobOutput::error(line);
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
            Err(too_large) if errors.is_empty() => return JobOutput::error(too_large),
            Err(too_large) => return JobOutput::error_with_details(too_large, errors),
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
            let headline = match &result.outcome {
                Outcome::Failed(f) => Some(report::execution_error(f)),
                Outcome::Interrupted(i) => Some(report::interrupted(i, false)),
                Outcome::Success => None,
            };
            if let Some(headline) = headline {
                return JobOutput::error_with_details(headline, errors);
            }
        }
        JobOutput::from_outputs(outputs, errors)
    }
}

/// A job output with every live secret removed from its error and warning messages (files and
/// texts are the workflow's own results and are left alone).
fn scrub_messages(output: JobOutput) -> JobOutput {
    use crate::telemetry::scrub;
    let clean = |list: Vec<String>| -> Vec<String> {
        list.into_iter().map(|m| scrub(&m).into_owned()).collect()
    };
    match output {
        JobOutput::Failed { error, details } => JobOutput::Failed {
            error: scrub(&error).into_owned(),
            details: details.map(clean),
        },
        JobOutput::Images {
            images,
            more,
            errors,
        } => JobOutput::Images {
            images,
            more,
            errors: clean(errors),
        },
        JobOutput::NoImages {
            status,
            images,
            more,
            errors,
        } => JobOutput::NoImages {
            status,
            images,
            more,
            errors: clean(errors),
        },
    }
}

enum ProcessState {
    NoPidFile,
    Alive,
    Dead(u32),
}

/// Reads the start script's PID file and checks the process (Linux `/proc`; zombies count as dead).
fn comfy_process_state(pid_file: &Path) -> ProcessState {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return ProcessState::NoPidFile;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return ProcessState::NoPidFile;
    };
    if !Path::new("/proc").exists() {
        return ProcessState::Alive;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => ProcessState::Dead(pid),
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if matches!(state, Some('Z') | Some('X')) {
                ProcessState::Dead(pid)
            } else {
                ProcessState::Alive
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_states() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("comfyui.pid");
        assert!(matches!(
            comfy_process_state(&file),
            ProcessState::NoPidFile
        ));
        std::fs::write(&file, std::process::id().to_string()).unwrap();
        assert!(matches!(comfy_process_state(&file), ProcessState::Alive));
        std::fs::write(&file, "999999999").unwrap();
        assert!(matches!(
            comfy_process_state(&file),
            ProcessState::Dead(999999999)
        ));
    }
}
