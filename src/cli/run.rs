//! `comfy-worker run`: one job with live progress on stderr. The job is a test input
//! (`{"input": {...}}`), or a workflow saved in API or UI format. On a terminal the outputs are
//! written to `./outputs/<job id>/` and one summary line is printed; piped (or with `--json`),
//! stdout is the job output JSON, as the RunPod SDK prints it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::Instrument;

use super::exit_code::{exit, FAILED, INTERRUPTED, SUCCESS, USAGE};
use super::json_file::{self, JsonFileError};
use super::terminal::{self, out};
use super::view::{ProgressMode, ProgressView};
use super::RunArgs;
use crate::comfy::ui_workflow::is_ui_format;
use crate::comfy::WorkflowInput;
use crate::config::{ConfigError, Settings, StorageSettings, RUN_READY_TIMEOUT};
use crate::job::{codec, DeadlineSource, Engine, FileData, JobOutput, JobRequest};
use crate::progress::ProgressSnapshot;
use crate::runner::{job_span, Controls, Deadline, Runner};

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
    /// Neither a test input nor a workflow; `origin` names the file or `--test_input`.
    #[error("{origin} is neither a test input like {{\"input\": {{\"workflow\": {{...}}}}}} nor a workflow saved from ComfyUI (API or UI format): {reason}")]
    NotAJob {
        /// Where the JSON came from.
        origin: String,
        /// Why it is not a workflow either.
        reason: String,
    },
}

/// Why the output files were not all written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// The directory cannot be created.
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        /// The folder.
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

/// Reads the job: `--test_input` JSON, else the file, else `./test_input.json`. A bare workflow
/// (API or UI format) becomes `{"input": {"workflow": …}}`.
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
        Value::Object(o) if o.contains_key("input") && !is_node(&o["input"]) => Ok(job),
        Value::Object(o) if !o.is_empty() && (is_ui_format(o) || o.values().all(is_node)) => {
            match WorkflowInput::from_value(job.clone()) {
                Ok(_) => Ok(json!({ "input": { "workflow": job } })),
                Err(e) => Err(TestInputError::NotAJob {
                    origin,
                    reason: e.to_string(),
                }),
            }
        }
        Value::Object(_) => Err(TestInputError::NotAJob {
            origin,
            reason: "it has no 'input', and not every entry is a node with a 'class_type'".into(),
        }),
        other => Err(TestInputError::NotAJob {
            origin,
            reason: format!(
                "it is {}, not an object",
                crate::json_type::json_type(other)
            ),
        }),
    }
}

/// An API-format node (`{"class_type": …, "inputs": …}`), so a workflow with a node whose id is
/// `input` is not read as a test input.
fn is_node(value: &Value) -> bool {
    value.get("class_type").is_some_and(Value::is_string)
}

/// A job id for a local run: `run-20261204-153012-3fa1` (UTC; sorts by time, names the
/// outputs folder).
fn new_job_id() -> String {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!(
        "run-{date}-{time}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..4]
    )
}

/// A folder name for a job id: letters, digits, `.`, `_` and `-`; anything else becomes `_`.
fn folder_name(job_id: &str) -> String {
    let name: String = job_id
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.trim_matches('.').is_empty() {
        "job".to_owned()
    } else {
        name
    }
}

/// Writes the decoded output files (images, videos, audio, other keys) into `dir`, under
/// their base names.
fn write_outputs(dir: &Path, output: &JobOutput) -> Result<Vec<PathBuf>, WriteError> {
    let files = output.files();
    if files.iter().all(|f| f.kind != "base64") {
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
        let path = dir.join(name);
        let written_out = match &image.data {
            // An output the engine kept on disk: copied as it is, never through base64.
            FileData::Base64Of(spooled) => std::fs::copy(spooled.path(), &path).map(|_| ()),
            FileData::Text(text) => {
                let bytes = codec::decode_input(text).map_err(|reason| WriteError::NotBase64 {
                    name: image.filename.clone(),
                    reason,
                })?;
                std::fs::write(&path, bytes)
            }
        };
        written_out.map_err(|source| WriteError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// Checks that `dir` can hold the outputs before the job runs: it is created (with its
/// parents) and a probe file written and removed.
fn check_writable(dir: &Path) -> Result<(), WriteError> {
    std::fs::create_dir_all(dir).map_err(|source| WriteError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    let probe = dir.join(format!(".comfy-worker-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|source| WriteError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The settings for `run`: those of the environment, except that the inline output limit,
/// which stands for the platform's result limit, applies only when `MAX_INLINE_OUTPUT_BYTES` is
/// set (the output goes to stdout, which has no limit), and that ComfyUI is waited for
/// [`RUN_READY_TIMEOUT`] unless `COMFY_READY_TIMEOUT_S` says otherwise.
fn settings_for_run(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let mut settings = Settings::from_lookup(&lookup)?;
    if !StorageSettings::inline_limit_is_set(&lookup) {
        settings.storage.max_inline_bytes = None;
    }
    settings.ready_timeout.get_or_insert(RUN_READY_TIMEOUT);
    Ok(settings)
}

/// `1.2 s`, `2 min 05 s`.
fn took(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

/// The one summary line of a completed job, on a terminal.
fn summary(
    output: &JobOutput,
    written: &[PathBuf],
    dir: Option<&Path>,
    elapsed: Duration,
) -> String {
    let files = output.files();
    let urls = files.iter().filter(|f| f.kind != "base64").count();
    let mut line = format!("completed in {}", took(elapsed));
    match (written, dir) {
        ([], _) if urls == 0 => line.push_str(": no output files"),
        ([], _) => {}
        ([one], _) => line.push_str(&format!(": {}", one.display())),
        (many, Some(dir)) => line.push_str(&format!(
            ": {} files in {}/ ({})",
            many.len(),
            dir.display(),
            many.iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (many, None) => line.push_str(&format!(": {} files", many.len())),
    }
    if urls > 0 {
        line.push_str(&format!(
            "; {urls} uploaded (URLs in the output JSON: run with --json)"
        ));
    }
    line
}

/// Runs the command.
pub(crate) async fn run(args: RunArgs) -> ExitCode {
    // The job's own failure is printed once, below; log lines only for what is worse.
    crate::telemetry::init(
        "comfy_worker=error,comfy_sim=error",
        crate::telemetry::json_requested(),
    );
    let json_out = args.json || !std::io::stdout().is_terminal();
    let usage = |message: &dyn std::fmt::Display| {
        terminal::error("run", message);
        if json_out {
            print_output(&JobOutput::error(message.to_string()));
        }
        exit(USAGE)
    };
    let job = match load_test_input(&args) {
        Ok(job) => job,
        Err(e) => return usage(&e),
    };
    let mut settings = match settings_for_run(|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => return usage(&e),
    };
    args.comfy.apply(&mut settings);
    let job_id = job
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(new_job_id);
    // Where the files go: --output-dir, else on a terminal ./outputs/<job id>/. Checked before
    // the job runs, so its outputs are not made for nothing.
    let output_dir = match &args.output_dir {
        Some(dir) => Some(dir.clone()),
        None if !json_out => Some(Path::new("outputs").join(folder_name(&job_id))),
        None => None,
    };
    if let Some(dir) = &output_dir {
        let check = if args.output_dir.is_some() {
            dir.clone()
        } else {
            PathBuf::from("outputs")
        };
        if let Err(e) = check_writable(&check) {
            return usage(&format!("--output-dir: {e}"));
        }
    }
    let simulator = match args.sim.start(&mut settings).await {
        Ok(sim) => sim,
        Err(e) => {
            terminal::error("run", &e);
            return exit(FAILED);
        }
    };
    let engine = match Engine::new(settings) {
        Ok(e) => e,
        Err(e) => return usage(&e),
    };
    let mode = ProgressMode::choose(args.quiet, args.json_progress);
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<ProgressSnapshot>();
    let view = tokio::spawn(ProgressView::new(mode).drive(receiver));
    let controls = Controls::default();
    let on_signal = controls.cancel.clone();
    let signals = tokio::spawn(async move {
        super::shutdown_signal().await;
        terminal::error("run", &"interrupted, cancelling the job in ComfyUI");
        on_signal.cancel();
    });
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
    let interrupted = controls.cancel.clone();
    let started = Instant::now();
    let runner = Runner::new(engine, Duration::ZERO);
    let mut view_sink = |s: &ProgressSnapshot| {
        let _ = sender.send(s.clone());
    };
    let result = runner
        .run(&request, controls, &mut [&mut view_sink])
        .instrument(job_span(&request.id))
        .await;
    let elapsed = started.elapsed();
    let output = JobOutput::from(result);
    drop(sender);
    let _ = view.await;
    signals.abort();
    if let Some(sim) = simulator {
        sim.shutdown().await;
    }
    let written: Vec<PathBuf> = match &output_dir {
        Some(dir) => match write_outputs(dir, &output) {
            Ok(paths) => paths,
            Err(e) => {
                // Nothing produced is lost: the output JSON goes to stdout after all.
                terminal::error("run", &format!("{e}; the output JSON follows on stdout"));
                print_output(&output);
                return exit(FAILED);
            }
        },
        None => Vec::new(),
    };
    let code = if interrupted.is_cancelled() {
        INTERRUPTED
    } else if output.is_error() {
        FAILED
    } else {
        SUCCESS
    };
    if json_out {
        print_output(&output);
        if args.output_dir.is_some() && !args.quiet {
            for p in &written {
                terminal::error("run", &format!("wrote {}", p.display()));
            }
        }
        if let JobOutput::Failed { error, .. } = &output {
            // The JSON holds it; say it on stderr only when that is where a person looks.
            if !std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
                terminal::error("run", &format!("failed after {}: {error}", took(elapsed)));
            }
        }
    } else {
        match &output {
            JobOutput::Failed { error, details } => {
                terminal::error("run", &format!("failed after {}: {error}", took(elapsed)));
                for d in details
                    .iter()
                    .flatten()
                    .filter(|d| !error.contains(d.as_str()))
                {
                    terminal::err(&format!("  {d}"));
                }
            }
            JobOutput::Completed(c) => {
                out(&summary(&output, &written, output_dir.as_deref(), elapsed));
                for w in c.warnings() {
                    terminal::error("run", &format!("warning: {w}"));
                }
            }
        }
    }
    exit(code)
}

fn print_output(output: &JobOutput) {
    match serde_json::to_string(output) {
        Ok(text) => out(&text),
        Err(e) => {
            out(&json!({ "error": format!("could not serialise the output: {e}") }).to_string())
        }
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
            json: false,
            comfy: crate::cli::ComfyArg::default(),
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
            r#"--test_input is neither a test input like {"input": {"workflow": {...}}} nor a workflow saved from ComfyUI (API or UI format): it has no 'input', and not every entry is a node with a 'class_type'"#
        );
        // What "Save (API Format)" writes, bare; a node may even be called "input".
        let api = r#"{"3": {"class_type": "KSampler", "inputs": {}}, "input": {"class_type": "LoadImage", "inputs": {}}}"#;
        a.test_input = Some(api.into());
        let job = load_test_input(&a).unwrap();
        assert_eq!(job["input"]["workflow"]["3"]["class_type"], "KSampler");
        // What the plain "Save" writes.
        let ui = r#"{"nodes": [{"id": 1, "type": "SaveImage", "inputs": [], "widgets_values": ["x"]}], "links": [], "version": 0.4}"#;
        a.test_input = Some(ui.into());
        assert!(load_test_input(&a).unwrap()["input"]["workflow"]["nodes"].is_array());
        a.test_input = Some("42".into());
        assert!(load_test_input(&a)
            .unwrap_err()
            .to_string()
            .ends_with("it is a number, not an object"));
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
            data: codec::encode(data).into(),
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
