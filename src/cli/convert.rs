//! `convert FILE [--comfy HOST | --object-info FILE]`: a UI-format workflow (the UI's plain
//! "Save") converted to the API format, printed on stdout. An API-format file is printed as it
//! is. The node classes come from a running ComfyUI's `/object_info` (`--comfy`, default
//! `COMFY_HOST`) or from a saved copy of it (`--object-info`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::comfy::workflow::ui_message;
use crate::comfy::{ClientOptions, ComfyClient, ObjectInfo, WorkflowInput};

/// Options of `convert`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// The workflow file (`-` for stdin): a UI-format export, or a test input with it under
    /// `input.workflow`.
    pub file: PathBuf,
    /// ComfyUI address whose /object_info describes the nodes [default: COMFY_HOST, else
    /// 127.0.0.1:8188].
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "object_info")]
    pub comfy: Option<String>,
    /// A saved /object_info reply (JSON) instead of asking a ComfyUI.
    #[arg(long, value_name = "FILE")]
    pub object_info: Option<PathBuf>,
    /// Seed for dynamic-prompt choices (`{a|b}` in prompts), for a reproducible output.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

fn read_input(path: &Path) -> Result<String, String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }
}

fn parse_json(text: &str, what: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{what} is not valid JSON: {e}"))
}

async fn object_info(args: &ConvertArgs) -> Result<ObjectInfo, String> {
    if let Some(path) = &args.object_info {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value = parse_json(&text, &path.display().to_string())?;
        if !value.is_object() {
            return Err(format!(
                "{} is not an /object_info reply (a JSON object of node classes)",
                path.display()
            ));
        }
        return Ok(ObjectInfo::from_value(value));
    }
    let host = args
        .comfy
        .clone()
        .or_else(|| {
            std::env::var("COMFY_HOST")
                .ok()
                .filter(|h| !h.trim().is_empty())
        })
        .unwrap_or_else(|| "127.0.0.1:8188".to_owned());
    let client = ComfyClient::new(
        &host,
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    client
        .object_info()
        .await
        .map_err(|e| format!("cannot get /object_info from ComfyUI at {host}: {e} (start ComfyUI, or pass --object-info FILE)"))
}

/// Runs `convert`: 0 with the API JSON on stdout, 1 with the reason on stderr.
pub async fn run(args: ConvertArgs) -> ExitCode {
    match convert(&args).await {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("comfy-worker convert: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn convert(args: &ConvertArgs) -> Result<String, String> {
    let text = read_input(&args.file)?;
    let mut value = parse_json(&text, "the workflow")?;
    // A test input (`{"input": {"workflow": ...}}`) works too.
    if let Some(inner) = value.pointer("/input/workflow") {
        value = inner.clone();
    }
    let ui = match WorkflowInput::from_value(value).map_err(|e| e.to_string())? {
        WorkflowInput::Api(workflow) => {
            eprintln!("comfy-worker convert: already in API format; printed as it is");
            return serde_json::to_string_pretty(workflow.as_json()).map_err(|e| e.to_string());
        }
        WorkflowInput::Ui(ui) => ui,
    };
    let info = object_info(args).await?;
    let options = crate::comfy::ConvertOptions { seed: args.seed };
    let graph = ui
        .convert_with(&info, &options)
        .map_err(|e| ui_message(&e))?;
    serde_json::to_string_pretty(&graph).map_err(|e| e.to_string())
}
