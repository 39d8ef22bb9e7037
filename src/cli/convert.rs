//! `convert FILE [--comfy HOST | --object-info FILE]`: a UI-format workflow (the UI's plain
//! "Save") converted to the API format, printed on stdout. An API-format file is printed as it
//! is. The node classes come from a running ComfyUI's `/object_info` (`--comfy`, default
//! `COMFY_HOST`) or from a saved copy of it (`--object-info`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::comfy_arg::ComfyArg;
use super::exit_code::{exit, FAILED, SUCCESS, USAGE};
use super::json_file::{self, JsonFileError};
use super::terminal;
use crate::comfy::workflow::{ui_message, WorkflowError};
use crate::comfy::{
    ClientOptions, ComfyClient, ComfyError, ConvertError, ObjectInfo, WorkflowInput,
};
use crate::config::Settings;

/// Options of `convert`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// The workflow file (`-` for stdin): a UI-format export, or a test input with it under
    /// `input.workflow`.
    pub file: PathBuf,
    /// `--comfy ADDR`: the ComfyUI whose /object_info describes the nodes.
    #[command(flatten)]
    pub comfy: ComfyArg,
    /// A saved /object_info reply (JSON) instead of asking a ComfyUI.
    #[arg(long, value_name = "FILE", conflicts_with = "comfy")]
    pub object_info: Option<PathBuf>,
    /// Seed for dynamic-prompt choices (`{a|b}` in prompts), for a reproducible output.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// Why `convert` printed no workflow.
#[derive(Debug, thiserror::Error)]
enum ConvertCommandError {
    /// The workflow or the `--object-info` file cannot be read as JSON.
    #[error(transparent)]
    Input(#[from] JsonFileError),
    /// `--object-info` is JSON, but not an object.
    #[error("{} is not an /object_info reply (a JSON object of node classes)", .0.display())]
    NotObjectInfo(PathBuf),
    /// A setting (`COMFY_HOST`) that cannot work.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The HTTP client cannot be built.
    #[error(transparent)]
    Client(ComfyError),
    /// ComfyUI's `/object_info` could not be had.
    #[error("cannot get /object_info from ComfyUI at {host}: {source} (start ComfyUI, or pass --object-info FILE)")]
    ObjectInfo {
        /// The ComfyUI asked.
        host: String,
        /// Why it gave none.
        source: ComfyError,
    },
    /// The workflow is neither API nor UI format.
    #[error(transparent)]
    Workflow(WorkflowError),
    /// The UI-format workflow cannot be converted.
    #[error("{}", ui_message(.0))]
    Conversion(ConvertError),
    /// The result cannot be serialised.
    #[error("{0}")]
    Print(serde_json::Error),
}

fn read_input(path: &Path) -> Result<String, JsonFileError> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| JsonFileError::Read {
                what: "stdin".into(),
                source,
            })?;
        Ok(text)
    } else {
        json_file::read(path)
    }
}

async fn object_info(args: &ConvertArgs) -> Result<ObjectInfo, ConvertCommandError> {
    if let Some(path) = &args.object_info {
        let text = json_file::read(path)?;
        let value = json_file::parse(&text, &path.display().to_string())?;
        if !value.is_object() {
            return Err(ConvertCommandError::NotObjectInfo(path.clone()));
        }
        return Ok(ObjectInfo::from_value(value));
    }
    let mut settings = Settings::from_env()?;
    args.comfy.apply(&mut settings);
    let host = settings.comfy_host.shown();
    let client = ComfyClient::new(
        &settings.comfy_host,
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )
    .map_err(ConvertCommandError::Client)?;
    client
        .object_info()
        .await
        .map_err(|source| ConvertCommandError::ObjectInfo { host, source })
}

/// Runs `convert`: 0 with the API JSON on stdout; else the reason on stderr, 2 when the input
/// or a setting is unusable, 1 when the conversion itself failed.
pub async fn run(args: ConvertArgs) -> ExitCode {
    match convert(&args).await {
        Ok(text) => {
            terminal::out(&text);
            exit(SUCCESS)
        }
        Err(e) => {
            terminal::error("convert", &e);
            exit(match e {
                ConvertCommandError::Input(_)
                | ConvertCommandError::NotObjectInfo(_)
                | ConvertCommandError::Config(_)
                | ConvertCommandError::Workflow(_) => USAGE,
                ConvertCommandError::Client(_)
                | ConvertCommandError::ObjectInfo { .. }
                | ConvertCommandError::Conversion(_)
                | ConvertCommandError::Print(_) => FAILED,
            })
        }
    }
}

async fn convert(args: &ConvertArgs) -> Result<String, ConvertCommandError> {
    let text = read_input(&args.file)?;
    let mut value = json_file::parse(&text, "the workflow")?;
    // A test input (`{"input": {"workflow": ...}}`) works too.
    if let Some(inner) = value.pointer("/input/workflow") {
        value = inner.clone();
    }
    let ui = match WorkflowInput::from_value(value).map_err(ConvertCommandError::Workflow)? {
        WorkflowInput::Api(workflow) => {
            terminal::error("convert", &"already in API format; printed as it is");
            return serde_json::to_string_pretty(workflow.as_json())
                .map_err(ConvertCommandError::Print);
        }
        WorkflowInput::Ui(ui) => ui,
    };
    let info = object_info(args).await?;
    let options = crate::comfy::ConvertOptions { seed: args.seed };
    let graph = ui
        .convert_with(&info, &options)
        .map_err(ConvertCommandError::Conversion)?;
    serde_json::to_string_pretty(&graph).map_err(ConvertCommandError::Print)
}
