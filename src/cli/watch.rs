//! `comfy-worker watch`: ComfyUI's WebSocket events, one readable line each (or raw NDJSON).
//!
//! ComfyUI sends a prompt's events only to the socket of the client that queued it. So without
//! `--submit` this shows what ComfyUI broadcasts (queue status, prompts queued without a client
//! id, previews, node text) and says so; with `--submit FILE` it queues that workflow through the
//! prompt watcher (`ComfyClient::run_prompt_observed`: socket first, reconnects, `/history`
//! fallback) and shows the whole stream of its socket. The wording of every line is
//! `comfy::describe`'s, the same the worker logs at debug level for its own prompts.
//!
//! Exit codes: 0 when the submitted prompt succeeded (or, without `--submit`, on Ctrl+C); 1 when
//! it failed, was interrupted or refused; 2 on usage errors; 130 when Ctrl+C stopped a submitted
//! prompt (the prompt is interrupted in ComfyUI first; a second Ctrl+C quits at once).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::comfy_arg::ComfyArg;
use super::exit_code::{exit, FAILED, INTERRUPTED, SUCCESS, USAGE};
use super::json_file::{self, JsonFileError};
use super::terminal::{self, out};
use crate::comfy::describe::{binary_summary, clock, Describer, Line};
use crate::comfy::prompt_watcher::reconnect_delay;
use crate::comfy::socket::{Incoming, WsConnection};
use crate::comfy::workflow::WorkflowError;
use crate::comfy::{
    ClientOptions, ComfyClient, ComfyError, ConvertError, Outcome, PromptEvent, WatchOptions,
    Workflow, WorkflowInput,
};
use crate::config::{Settings, RUN_READY_TIMEOUT};
use crate::job::report;

/// Bound for reading a broadcast prompt's workflow from `/queue`.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// `--comfy ADDR`.
    #[command(flatten)]
    pub comfy: ComfyArg,
    /// Print the raw events as NDJSON (text frames as received; binary frames as a summary).
    #[arg(long)]
    pub json: bool,
    /// Queue this workflow (a test-input file `{"input": {"workflow": …}}` or an API-format
    /// workflow), show its whole stream, exit 0 on success and 1 on failure.
    #[arg(long, value_name = "FILE")]
    pub submit: Option<PathBuf>,
}

/// Prints events: readable lines with a timestamp, or NDJSON.
struct Printer {
    json: bool,
    describer: Describer,
}

impl Printer {
    fn line(&self, line: &Line) {
        let prefix = format!("{}  ", clock(SystemTime::now()));
        for l in line.to_lines(&prefix) {
            out(&l);
        }
    }

    /// A line about the watch itself (connections, the result): stdout in readable mode,
    /// stderr with `--json` so stdout stays NDJSON.
    fn note(&self, kind: &'static str, text: String) {
        let line = Line {
            kind,
            text,
            detail: Vec::new(),
        };
        if self.json {
            terminal::error("watch", &line.text);
        } else {
            self.line(&line);
        }
    }

    fn note_with(&self, kind: &'static str, text: String, detail: Vec<String>) {
        let line = Line { kind, text, detail };
        if self.json {
            terminal::error("watch", &line.text);
            for d in &line.detail {
                terminal::err(&format!("  {d}"));
            }
        } else {
            self.line(&line);
        }
    }

    fn frame(&mut self, incoming: &Incoming, text: Option<&str>) {
        if self.json {
            match (incoming, text) {
                // ComfyUI's frames are one line of JSON; anything else is re-encoded compactly.
                (_, Some(t)) if !t.contains('\n') => out(t),
                (_, Some(t)) => match serde_json::from_str::<Value>(t) {
                    Ok(v) => out(&v.to_string()),
                    Err(e) => out(&serde_json::json!({"garbled": e.to_string()}).to_string()),
                },
                (Incoming::Binary(frame), None) => out(&binary_summary(frame).to_string()),
                (Incoming::Garbled(why), None) => {
                    out(&serde_json::json!({"garbled": why}).to_string())
                }
                (Incoming::Event(_), None) => {}
            }
            return;
        }
        let line = match incoming {
            Incoming::Event(ev) => self.describer.event(ev, Instant::now()),
            Incoming::Binary(frame) => Some(self.describer.binary(frame)),
            Incoming::Garbled(why) => Some(Line {
                kind: "garbled",
                text: why.clone(),
                detail: Vec::new(),
            }),
        };
        if let Some(line) = line {
            self.line(&line);
        }
    }
}

/// Runs the command.
pub(crate) async fn run(args: WatchArgs) -> ExitCode {
    crate::telemetry::init("comfy_worker=warn", crate::telemetry::json_requested());
    let mut settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            terminal::error("watch", &e);
            return exit(USAGE);
        }
    };
    args.comfy.apply(&mut settings);
    let client = match ComfyClient::new(
        &settings.comfy_host,
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: settings.http_timeout,
            view_timeout: settings.view_timeout,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            terminal::error("watch", &e);
            return exit(FAILED);
        }
    };
    let opts = WatchOptions {
        reconnect_attempts: settings.ws_reconnect_attempts,
        reconnect_delay: settings.ws_reconnect_delay,
        silence_timeout: settings.ws_silence_timeout,
        poll_interval: settings.history_poll_interval,
        ..WatchOptions::default()
    };
    match &args.submit {
        Some(file) => {
            let workflow = match load_workflow(file) {
                Ok((w, 0)) => w,
                Ok((w, images)) => {
                    terminal::error(
                        "watch",
                        &format!(
                            "{} has {images} input image(s); --submit sends the workflow only (upload them first, or use `comfy-worker run`)",
                            file.display()
                        ),
                    );
                    w
                }
                Err(e) => {
                    terminal::error("watch", &e);
                    return exit(USAGE);
                }
            };
            let workflow = match to_api(&client, workflow).await {
                Ok(w) => w,
                Err(e) => {
                    terminal::error("watch", &e);
                    return exit(FAILED);
                }
            };
            submit(&client, workflow, file, &opts, args.json).await
        }
        None => {
            broadcasts(
                &client,
                &opts,
                args.json,
                settings.ready_timeout.unwrap_or(RUN_READY_TIMEOUT),
            )
            .await
        }
    }
}

/// Why `--submit` has no workflow to queue.
#[derive(Debug, thiserror::Error)]
enum SubmitError {
    /// The file cannot be read as JSON.
    #[error(transparent)]
    File(#[from] JsonFileError),
    /// A test input without a workflow.
    #[error("{} has an 'input' without a 'workflow'", .0.display())]
    NoWorkflow(PathBuf),
    /// The file's workflow is neither API nor UI format.
    #[error("{}: {source}", path.display())]
    NotAWorkflow {
        /// `--submit`.
        path: PathBuf,
        /// Why.
        source: WorkflowError,
    },
    /// ComfyUI's `/object_info`, which the UI format's conversion needs, could not be had.
    #[error("cannot convert the UI-format workflow: GET /object_info failed: {0}")]
    ObjectInfo(ComfyError),
    /// The UI-format workflow cannot be converted.
    #[error("cannot convert the UI-format workflow: {0}")]
    Conversion(ConvertError),
    /// The converted workflow is not a usable API-format workflow.
    #[error(transparent)]
    Converted(WorkflowError),
}

/// The workflow of a test-input file (`{"input": {"workflow": …}}`) or a bare workflow (API or
/// UI format), and how many input images the file has (they are not uploaded).
fn load_workflow(path: &Path) -> Result<(WorkflowInput, usize), SubmitError> {
    let text = json_file::read(path)?;
    let value = json_file::parse(&text, &path.display().to_string())?;
    let images = value
        .get("input")
        .and_then(|i| i.get("images"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let graph = match value.get("input") {
        Some(input) => input
            .get("workflow")
            .cloned()
            .ok_or_else(|| SubmitError::NoWorkflow(path.to_owned()))?,
        None => value,
    };
    let workflow =
        WorkflowInput::from_value(graph).map_err(|source| SubmitError::NotAWorkflow {
            path: path.to_owned(),
            source,
        })?;
    Ok((workflow, images))
}

/// An API-format workflow as it is; a UI-format one converted with ComfyUI's `/object_info`, as
/// a job's would be.
async fn to_api(client: &ComfyClient, workflow: WorkflowInput) -> Result<Workflow, SubmitError> {
    let ui = match workflow {
        WorkflowInput::Api(w) => return Ok(w),
        WorkflowInput::Ui(ui) => ui,
    };
    let info = client
        .object_info()
        .await
        .map_err(SubmitError::ObjectInfo)?;
    let graph = ui.convert(&info).map_err(SubmitError::Conversion)?;
    Workflow::from_value(Value::Object(graph)).map_err(SubmitError::Converted)
}

/// `--submit`: queue the workflow on our own socket and show its whole stream.
async fn submit(
    client: &ComfyClient,
    workflow: Workflow,
    file: &Path,
    opts: &WatchOptions,
    json: bool,
) -> ExitCode {
    let mut printer = Printer {
        json,
        describer: Describer::for_workflow(&workflow),
    };
    printer.note(
        "watch",
        format!(
            "submitting {} ({} node(s)) to ComfyUI at {}",
            file.display(),
            workflow.len(),
            client.host()
        ),
    );
    let cancel = CancellationToken::new();
    let mut on_event = |event: PromptEvent| match event {
        PromptEvent::Queued {
            prompt_id,
            position: Some(p),
            ..
        } if p > 0 => note_stderr_or_out(json, "queued", format!("prompt {prompt_id}: {p} ahead")),
        PromptEvent::ConnectionLost { reason } => note_stderr_or_out(
            json,
            "watch",
            format!("connection lost ({reason}); reconnecting with a fresh client id"),
        ),
        PromptEvent::Reconnected => note_stderr_or_out(
            json,
            "watch",
            "reconnected; the new socket only gets broadcasts, the end comes from /history"
                .to_owned(),
        ),
        _ => {}
    };
    let result = {
        let mut on_frame = |incoming: &Incoming, text: Option<&str>| printer.frame(incoming, text);
        let run = client.run_prompt_observed(
            &workflow,
            None,
            opts,
            &cancel,
            &mut on_event,
            &mut on_frame,
        );
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = super::shutdown_signal() => {
                note_stderr_or_out(json, "watch", "Ctrl+C: interrupting the prompt in ComfyUI (Ctrl+C again to quit at once)".to_owned());
                cancel.cancel();
                tokio::select! {
                    r = &mut run => r,
                    _ = super::shutdown_signal() => return exit(INTERRUPTED),
                }
            }
        }
    };
    match result {
        Ok(r) => {
            let code = if r.cancelled {
                exit(INTERRUPTED)
            } else if matches!(r.outcome, Outcome::Success) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
            let text = match &r.outcome {
                Outcome::Success => {
                    let files: usize = r.outputs.iter().map(|o| o.files.len()).sum();
                    format!(
                        "success: prompt {}, {files} output file(s) in /history",
                        r.prompt_id
                    )
                }
                Outcome::Failed(f) => format!(
                    "failed: {}",
                    report::execution_error(f)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Outcome::Interrupted(i) => report::interrupted(i, r.cancelled),
            };
            let mut detail = report::dropped_outputs(&r.dropped_outputs);
            detail.extend(r.warnings);
            printer.note_with("result", text, detail);
            code
        }
        Err(ComfyError::Rejected(rejection)) => {
            let (message, _) = report::rejection(&rejection, None);
            let mut lines = message.lines().map(str::to_owned);
            let head = lines.next().unwrap_or_default();
            printer.note_with("refused", head, lines.collect());
            ExitCode::FAILURE
        }
        Err(e) => {
            printer.note("result", format!("failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn note_stderr_or_out(json: bool, kind: &'static str, text: String) {
    Printer {
        json,
        describer: Describer::new(),
    }
    .note(kind, text);
}

/// Without `--submit`: every broadcast, reconnecting on its own, until Ctrl+C. A ComfyUI that
/// never answered within `first_contact` (`COMFY_READY_TIMEOUT_S`) ends the watch with 1: the
/// address is probably wrong. Once connected, it reconnects for as long as it runs (ComfyUI
/// restarts are what one watches for).
async fn broadcasts(
    client: &ComfyClient,
    opts: &WatchOptions,
    json: bool,
    first_contact: Duration,
) -> ExitCode {
    let started = Instant::now();
    let mut ever_connected = false;
    let mut printer = Printer {
        json,
        describer: Describer::new(),
    };
    printer.note(
        "watch",
        "ComfyUI sends a prompt's events only to the client that queued it, so this shows only \
         broadcasts: queue status, the progress and previews of prompts queued without a client \
         id, node text (use --submit FILE to follow a prompt of your own)"
            .to_owned(),
    );
    let signal = super::shutdown_signal();
    tokio::pin!(signal);
    let mut attempt = 0u32;
    // The prompt whose workflow was looked up in /queue (found or not), so it is asked once.
    let mut looked_up: Option<String> = None;
    loop {
        let client_id = uuid::Uuid::new_v4().simple().to_string();
        let url = client.ws_url(&client_id);
        let connect = WsConnection::connect(&url, &client_id, opts.connect_timeout);
        let socket = tokio::select! {
            s = connect => s,
            _ = &mut signal => return exit(SUCCESS),
        };
        match socket {
            Ok(mut socket) => {
                attempt = 0;
                ever_connected = true;
                printer.note(
                    "watch",
                    format!(
                        "connected to ComfyUI at {} as client {client_id}",
                        client.host()
                    ),
                );
                loop {
                    let frame = tokio::select! {
                        f = socket.next_with_text() => f,
                        _ = &mut signal => {
                            socket.close().await;
                            return exit(SUCCESS);
                        }
                    };
                    match frame {
                        Some(Ok((incoming, text))) => {
                            if !json {
                                learn_workflow(client, &mut printer, &incoming, &mut looked_up)
                                    .await;
                            }
                            printer.frame(&incoming, text.as_ref().map(|t| t.as_str()));
                        }
                        Some(Err(e)) => {
                            printer.note("watch", format!("connection lost: {e}"));
                            break;
                        }
                        None => {
                            printer.note("watch", "connection closed by ComfyUI".to_owned());
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                printer.note("watch", format!("cannot connect: {e}"));
                if !ever_connected && started.elapsed() >= first_contact {
                    printer.note(
                        "watch",
                        format!(
                            "no ComfyUI answered at {} within {:.0} s (COMFY_READY_TIMEOUT_S); check the address (--comfy or COMFY_HOST)",
                            client.host(),
                            first_contact.as_secs_f64()
                        ),
                    );
                    return exit(FAILED);
                }
            }
        }
        let mut delay = reconnect_delay(opts.reconnect_delay, attempt);
        if !ever_connected {
            // The last try comes when the first-contact bound ends, not after it.
            delay = delay.min(first_contact.saturating_sub(started.elapsed()));
        }
        attempt = attempt.saturating_add(1);
        printer.note(
            "watch",
            format!(
                "reconnecting in {:.2}s with a fresh client id",
                delay.as_secs_f64()
            ),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut signal => return exit(SUCCESS),
        }
    }
}

/// When a broadcast prompt starts, reads its workflow from `/queue` so its nodes get their class
/// types and titles.
async fn learn_workflow(
    client: &ComfyClient,
    printer: &mut Printer,
    incoming: &Incoming,
    looked_up: &mut Option<String>,
) {
    let Incoming::Event(ev) = incoming else {
        return;
    };
    let Some(prompt_id) = ev.prompt_id() else {
        return;
    };
    if looked_up.as_deref() == Some(prompt_id) || printer.describer.knows(prompt_id) {
        return;
    }
    *looked_up = Some(prompt_id.to_owned());
    // Bounded tighter than other calls: the stream waits for it.
    let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, client.queued_workflow(prompt_id));
    if let Ok(Ok(Some(graph))) = lookup.await {
        printer.describer.learn(&graph, Some(prompt_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_test_inputs_and_bare_workflows() {
        let dir = tempfile::tempdir().unwrap();
        let wf = serde_json::json!({"1": {"class_type": "EmptyImage", "inputs": {}}});
        let bare = dir.path().join("bare.json");
        std::fs::write(&bare, wf.to_string()).unwrap();
        let wrapped = dir.path().join("job.json");
        std::fs::write(
            &wrapped,
            serde_json::json!({"input": {"workflow": wf}}).to_string(),
        )
        .unwrap();
        assert_eq!(load_workflow(&bare).unwrap().0.len(), 1);
        assert_eq!(load_workflow(&wrapped).unwrap().0.len(), 1);
        let no_wf = dir.path().join("no.json");
        std::fs::write(&no_wf, r#"{"input": {"images": []}}"#).unwrap();
        assert_eq!(
            load_workflow(&no_wf).unwrap_err().to_string(),
            format!("{} has an 'input' without a 'workflow'", no_wf.display())
        );
        let missing = dir.path().join("missing.json");
        let e = load_workflow(&missing).unwrap_err();
        assert!(
            matches!(e, SubmitError::File(JsonFileError::Read { .. })),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "cannot read {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let list = dir.path().join("list.json");
        std::fs::write(&list, "[1]").unwrap();
        assert_eq!(
            load_workflow(&list).unwrap_err().to_string(),
            format!(
                "{}: 'workflow' must be a JSON object in ComfyUI API format (node id -> {{\"class_type\", \"inputs\"}}), got an array",
                list.display()
            )
        );
    }
}
