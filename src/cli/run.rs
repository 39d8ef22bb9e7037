//! `comfy-worker run`: one job from a test-input file, progress on stderr, output JSON on stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use super::json_file::{self, JsonFileError};
use super::view::{ProgressMode, ProgressView};
use super::RunArgs;
use crate::config::StorageSettings;
use crate::config::{ConfigError, Settings};
use crate::job::{codec, DeadlineSource, Engine, JobOutput, JobRequest};
use crate::progress::ProgressSnapshot;
use crate::runner::{job_span, Controls, Deadline, Runner};

/// The SDK's job id for local test runs.
const LOCAL_JOB_ID: &str = "local_test";

/// Why the job to run cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TestInputError {
    /// No file, no `--test_input`, and no `./test_input.json`.
    #[error(
        "test_input.json not found in the current directory; pass a file or --test_input '<json>'"
    )]
    NoDefaultFile,
    /// The file cannot be read, or the JSON parsed.
    #[error(transparent)]
    Unreadable(JsonFileError),
    /// JSON without an `input`; `origin` names the file or `--test_input`.
    #[error("{origin} must be a JSON object with an 'input' key, like {{\"input\": {{\"workflow\": {{...}}}}}}")]
    NoInput {
        /// Where the JSON came from.
        origin: String,
    },
}

/// Why the output files were not all written into `--output-dir`.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// The directory cannot be created.
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        /// `--output-dir`.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An output's name has no base name to write it under.
    #[error("output file name {0:?} is not usable")]
    BadName(String),
    /// An output's data is not base64.
    #[error("output {name} is not valid base64: {reason}")]
    NotBase64 {
        /// The output's file name.
        name: String,
        /// The decoder's reason.
        reason: codec::InvalidBase64,
    },
    /// A file cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads the job: `--test_input` JSON, else the file, else `./test_input.json`.
pub(crate) fn load_test_input(args: &RunArgs) -> Result<Value, TestInputError> {
    let (text, origin) = match (&args.test_input, &args.file) {
        (Some(json), _) => (json.clone(), "--test_input".to_owned()),
        (None, file) => {
            let path = file
                .clone()
                .unwrap_or_else(|| PathBuf::from("test_input.json"));
            let text = json_file::read(&path).map_err(|e| match e {
                JsonFileError::Read { source, .. }
                    if file.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
                {
                    TestInputError::NoDefaultFile
                }
                other => TestInputError::Unreadable(other),
            })?;
            (text, path.display().to_string())
        }
    };
    let job = json_file::parse(&text, &origin).map_err(TestInputError::Unreadable)?;
    match &job {
        Value::Object(o) if o.contains_key("input") => Ok(job),
        _ => Err(TestInputError::NoInput { origin }),
    }
}

fn print_output(output: &JobOutput) {
    match serde_json::to_string(output) {
        Ok(text) => println!("{text}"),
        Err(e) => println!("{{\"error\": \"could not serialise the output: {e}\"}}"),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("comfy-worker: {message}");
    print_output(&JobOutput::error(message));
    ExitCode::FAILURE
}

/// Writes the decoded output files (images, videos, audio, other keys) into `dir`, under
/// their base names.
fn write_outputs(dir: &Path, output: &JobOutput) -> Result<Vec<PathBuf>, WriteError> {
    let files = output.files();
    if files.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).map_err(|source| WriteError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for image in files.into_iter().filter(|i| i.kind == "base64") {
        let name = Path::new(&image.filename)
            .file_name()
            .map(|n| n.to_owned())
            .ok_or_else(|| WriteError::BadName(image.filename.clone()))?;
        let bytes = codec::decode_input(&image.data).map_err(|reason| WriteError::NotBase64 {
            name: image.filename.clone(),
            reason,
        })?;
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| WriteError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The settings for `run`: those of the environment, except that the inline output limit,
/// which stands for the platform's result limit, applies only when `MAX_INLINE_OUTPUT_BYTES` is
/// set (the output goes to stdout, which has no limit).
fn settings_for_run(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let mut settings = Settings::from_lookup(&lookup)?;
    if !StorageSettings::inline_limit_is_set(&lookup) {
        settings.storage.max_inline_bytes = None;
    }
    Ok(settings)
}

/// Runs the command.
pub(crate) async fn run(args: RunArgs) -> ExitCode {
    crate::telemetry::init(
        "comfy_worker=warn,comfy_sim=warn",
        crate::telemetry::json_requested(),
    );
    let job = match load_test_input(&args) {
        Ok(job) => job,
        Err(e) => return fail(e.to_string()),
    };
    let mut settings = match settings_for_run(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    if let Some(host) = &args.comfy_host {
        settings.comfy_host = host.clone();
    }
    let simulator = match args.sim.start(&mut settings).await {
        Ok(sim) => sim,
        Err(e) => return fail(e.to_string()),
    };
    let engine = match Engine::new(settings) {
        Ok(e) => e,
        Err(e) => return fail(e.to_string()),
    };
    let mode = ProgressMode::choose(args.quiet, args.json_progress);
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<ProgressSnapshot>();
    let view = tokio::spawn(ProgressView::new(mode).drive(receiver));
    let controls = Controls::default();
    let on_signal = controls.cancel.clone();
    let signals = tokio::spawn(async move {
        super::shutdown_signal().await;
        eprintln!("comfy-worker: interrupted, cancelling the job in ComfyUI");
        on_signal.cancel();
    });
    let job_id = job
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or(LOCAL_JOB_ID)
        .to_owned();
    let request = JobRequest::new(job_id, job.get("input").cloned())
        .with_s3_config(job.get("s3Config").cloned());
    let controls = Controls {
        deadlines: request
            .timeout
            .map(|t| Deadline::new(t, DeadlineSource::Input))
            .into_iter()
            .collect(),
        ..controls
    };
    let runner = Runner::new(engine, Duration::ZERO);
    let mut view_sink = |s: &ProgressSnapshot| {
        let _ = sender.send(s.clone());
    };
    let result = runner
        .run(&request, controls, &mut [&mut view_sink])
        .instrument(job_span(&request.id))
        .await;
    let output = JobOutput::from(result);
    drop(sender);
    let _ = view.await;
    signals.abort();
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    if let Some(dir) = &args.output_dir {
        match write_outputs(dir, &output) {
            Ok(paths) => {
                for p in paths {
                    if !args.quiet {
                        eprintln!("comfy-worker: wrote {}", p.display());
                    }
                }
            }
            Err(e) => eprintln!("comfy-worker: {e}"),
        }
    }
    print_output(&output);
    if output.is_error() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Completed, FileEntry, MoreOutputs};

    fn args() -> RunArgs {
        RunArgs {
            file: None,
            test_input: None,
            sim: crate::cli::SimulateArgs::default(),
            json_progress: false,
            quiet: true,
            output_dir: None,
            comfy_host: None,
        }
    }

    #[test]
    fn the_inline_limit_applies_only_when_set() {
        let no_env = |_: &str| None;
        assert_eq!(
            settings_for_run(no_env).unwrap().storage.max_inline_bytes,
            None
        );
        assert_eq!(
            Settings::from_lookup(no_env)
                .unwrap()
                .storage
                .max_inline_bytes,
            Some(crate::config::DEFAULT_MAX_INLINE_OUTPUT_BYTES),
            "worker and serve keep the default"
        );
        let set = |k: &str| (k == "MAX_INLINE_OUTPUT_BYTES").then(|| "1000".to_owned());
        assert_eq!(
            settings_for_run(set).unwrap().storage.max_inline_bytes,
            Some(1000)
        );
    }

    #[test]
    fn test_input_must_have_input() {
        let mut a = args();
        a.test_input = Some(r#"{"workflow": {}}"#.into());
        assert_eq!(
            load_test_input(&a).unwrap_err().to_string(),
            r#"--test_input must be a JSON object with an 'input' key, like {"input": {"workflow": {...}}}"#
        );
        a.test_input = Some("[".into());
        let e = load_test_input(&a).unwrap_err();
        assert!(
            matches!(e, TestInputError::Unreadable(JsonFileError::NotJson { .. })),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "--test_input is not valid JSON: EOF while parsing a list at line 1 column 1"
        );
        a.test_input = Some(r#"{"input": {"workflow": {}}}"#.into());
        assert!(load_test_input(&a).is_ok());
        let mut b = args();
        b.file = Some(PathBuf::from("/nonexistent/x.json"));
        assert_eq!(
            load_test_input(&b).unwrap_err().to_string(),
            "cannot read /nonexistent/x.json: No such file or directory (os error 2)"
        );
        assert_eq!(
            TestInputError::NoDefaultFile.to_string(),
            "test_input.json not found in the current directory; pass a file or --test_input '<json>'"
        );
    }

    #[test]
    fn writes_decoded_files_under_their_base_name() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, data: &[u8]| FileEntry {
            filename: name.into(),
            kind: "base64".into(),
            data: codec::encode(data),
            content_type: "application/octet-stream".into(),
            format: None,
            frame_rate: None,
        };
        let out = JobOutput::Completed(Completed::Images {
            images: vec![entry("sub/../a.png", b"png-bytes")],
            more: Box::new(MoreOutputs {
                videos: vec![entry("v.mp4", b"mp4-bytes")],
                ..MoreOutputs::default()
            }),
            errors: vec![],
        });
        let written = write_outputs(dir.path(), &out).unwrap();
        assert_eq!(
            written,
            [dir.path().join("a.png"), dir.path().join("v.mp4")]
        );
        assert_eq!(std::fs::read(&written[0]).unwrap(), b"png-bytes");
        assert_eq!(std::fs::read(&written[1]).unwrap(), b"mp4-bytes");
    }
}
