//! Running one prompt to completion: the socket first, then `POST /prompt`, then events until
//! `executing{node: null}` for our prompt, with reconnects and a `/history` fallback so a
//! finished prompt is never missed, whatever happens to the socket.
//!
//! The prompt id is chosen here, before queueing, so events that arrive before the
//! `POST /prompt` reply are already ours. After a socket drop the new socket uses a **fresh**
//! client id: reusing the old id can leave the new socket silently unregistered (ComfyUI's
//! reconnect bug, protocol spec §1.6). A fresh socket only receives broadcasts, so from then on
//! completion is detected through `/history`, polled at every broadcast `status` and on a timer.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Level};

use super::capabilities::Capabilities;
use super::client::{ComfyClient, PromptRequest};
use super::describe::Describer;
use super::error::ComfyError;
use super::history::{ExecutionFailure, HistoryEntry, Interruption, NodeOutput, Outcome};
use super::messages::{BinaryFrame, WsEvent};
use super::rejection::NodeErrors;
use super::socket::{Incoming, WsConnection};
use super::workflow::Workflow;

/// Timing of the watch loop.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Bound for opening the socket.
    pub connect_timeout: Duration,
    /// Reconnects after a drop before relying on `/history` alone.
    pub reconnect_attempts: u32,
    /// Base reconnect delay; doubles per attempt, capped at 30 s. The first retry waits at most 250 ms.
    pub reconnect_delay: Duration,
    /// Without an event for our prompt for this long, poll `/history`.
    pub silence_timeout: Duration,
    /// `/history` poll interval while the socket is down or silent.
    pub poll_interval: Duration,
    /// After a cancel, how long to wait for ComfyUI to report the interrupt.
    pub cancel_grace: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            connect_timeout: Duration::from_secs(10),
            reconnect_attempts: 5,
            reconnect_delay: Duration::from_secs(3),
            silence_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            cancel_grace: Duration::from_secs(15),
        }
    }
}

/// Something that happened to our prompt, in ComfyUI-independent terms.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptEvent {
    /// Accepted and waiting; `position` = prompts ahead of it (0 = running).
    Queued {
        /// The prompt id.
        prompt_id: String,
        /// Prompts ahead (0 = running), when known.
        position: Option<usize>,
        /// Pending plus running prompts on the server, when known.
        queue_remaining: Option<u64>,
    },
    /// Execution began.
    Started,
    /// These nodes come from the cache and will not run.
    Cached {
        /// Node ids.
        nodes: Vec<String>,
    },
    /// A node started.
    Executing {
        /// Node id (the one the user sees: a node expanded at run time is reported as the
        /// prompt node it came from).
        node: String,
    },
    /// A node started loading models (today's ComfyUI reports it; 0.3.64 does not).
    Loading {
        /// Node id (the one the user sees).
        node: String,
    },
    /// A step of a node with a progress bar.
    Progress {
        /// Node id, when given.
        node: Option<String>,
        /// Steps done.
        value: f64,
        /// Steps in all.
        max: f64,
    },
    /// Cumulative node states (from `progress_state`).
    NodeStates {
        /// Every node started or finished so far.
        nodes: Vec<NodeState>,
    },
    /// A node produced output.
    Executed {
        /// Node id.
        node: String,
        /// Files it reported.
        files: usize,
        /// What it reported (its `ui` dict, typed; empty when the frame had none).
        output: Box<NodeOutput>,
    },
    /// A preview image.
    Preview {
        /// The node it belongs to, when known.
        node: Option<String>,
        /// MIME type.
        mime: &'static str,
        /// Encoded image.
        data: Bytes,
    },
    /// Text a node sent.
    Text {
        /// Node id.
        node: String,
        /// The text.
        text: String,
    },
    /// The prompt finished successfully.
    Succeeded,
    /// A node raised.
    Failed(ExecutionFailure),
    /// The prompt was interrupted.
    Interrupted(Interruption),
    /// The socket dropped; events may be missed until it is back.
    ConnectionLost {
        /// Why.
        reason: String,
    },
    /// A reconnect is being tried (the `attempt`-th since the prompt was queued).
    Reconnecting {
        /// 1 for the first.
        attempt: u32,
    },
    /// A new socket is open (it only receives broadcasts).
    Reconnected,
}

/// One node in a [`PromptEvent::NodeStates`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    /// Node id.
    pub node: String,
    /// Progress value.
    pub value: f64,
    /// Progress maximum.
    pub max: f64,
    /// True once the node finished.
    pub finished: bool,
}

/// The end of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptResult {
    /// Our prompt id.
    pub prompt_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Outputs from `/history`.
    pub outputs: Vec<NodeOutput>,
    /// Outputs ComfyUI dropped at queue time because their inputs failed validation.
    pub dropped_outputs: Vec<NodeErrors>,
    /// True when we cancelled it (interrupt or queue removal).
    pub cancelled: bool,
    /// Problems worth reporting that did not stop the prompt.
    pub warnings: Vec<String>,
}

/// Extra data sent with the prompt (`extra_data`).
pub type ExtraData = Map<String, Value>;

/// Bound of each call a cancel makes (queue delete, interrupt), so a dead or frozen ComfyUI
/// cannot hold it for the HTTP timeout.
const CANCEL_CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn new_client_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Receives every frame of a prompt's socket as it arrives (`watch --submit`), with the text of a
/// text frame as received.
type OnFrame<'a> = dyn FnMut(&Incoming, Option<&str>) + Send + 'a;

pub(crate) fn reconnect_delay(base: Duration, attempt: u32) -> Duration {
    if attempt == 0 {
        return base.min(Duration::from_millis(250));
    }
    let factor = 1u32 << (attempt - 1).min(16);
    base.saturating_mul(factor).min(Duration::from_secs(30))
}

/// Where the loop ended.
enum End {
    /// `executing{node: null}` arrived, or `/history` has the entry.
    Finished(Option<HistoryEntry>),
    /// Cancelled and ComfyUI confirmed nothing more will run.
    Cancelled(Option<HistoryEntry>),
}

struct Watch<'a> {
    client: &'a ComfyClient,
    opts: &'a WatchOptions,
    prompt_id: String,
    socket: Option<WsConnection>,
    /// True once the socket in use is not the one the prompt was queued with.
    blind: bool,
    started: bool,
    current_node: Option<String>,
    terminal: Option<Outcome>,
    reconnects: u32,
    next_reconnect: Option<Instant>,
    next_poll: Instant,
    cancel_requested: bool,
    cancel_deadline: Option<Instant>,
    last_socket_error: String,
    /// `/history` polls in a row that got no answer (a timeout or no connection), with no event
    /// for our prompt in between.
    unanswered_polls: u32,
    /// True once the socket the prompt was queued with was lost: ComfyUI may have restarted
    /// since, so an answer that knows nothing of the prompt means it was lost.
    lost_contact: bool,
    /// True once a cancel found ComfyUI gone (nothing to read back from it).
    comfy_gone: bool,
    /// True once the watch loop returned; dropped before that, the prompt is interrupted.
    settled: bool,
    /// Words the prompt's events for the debug log (used only when debug is on).
    describer: Describer,
    /// What this ComfyUI supports (the jobs API decides how to cancel and poll).
    caps: Capabilities,
    /// The node last reported loading models.
    loading: Option<String>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped mid-prompt (unwinding from a panic, or the caller's future was dropped): take
        // the prompt off the queue and interrupt it, on a task of its own since drop cannot wait.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let prompt_id = self.prompt_id.clone();
        let jobs_cancel = self.caps.jobs_cancel;
        warn!(prompt_id = %prompt_id, "the job stopped following its prompt; interrupting it in ComfyUI");
        runtime.spawn(async move {
            if jobs_cancel && client.cancel_job(&prompt_id).await.is_ok() {
                return;
            }
            let _ = client.delete_from_queue(&[&prompt_id]).await;
            if let Err(e) = client.interrupt(Some(&prompt_id)).await {
                warn!(prompt_id = %prompt_id, error = %e, "could not interrupt the abandoned prompt");
            }
        });
    }
}

impl ComfyClient {
    /// Queues `workflow` and follows it to the end, reporting events through `on_event`.
    ///
    /// Cancelling `cancel` interrupts the prompt in ComfyUI (or removes it from the queue if it
    /// has not started) and returns a result with `cancelled: true`.
    pub async fn run_prompt(
        &self,
        workflow: &Workflow,
        extra_data: Option<&ExtraData>,
        opts: &WatchOptions,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(PromptEvent) + Send),
    ) -> Result<PromptResult, ComfyError> {
        self.run_prompt_observed(workflow, extra_data, opts, cancel, on_event, &mut |_, _| {})
            .await
    }

    /// [`ComfyClient::run_prompt`], also handing every frame of the prompt's socket (its own
    /// events, broadcasts, binary frames; after a reconnect, the new socket's) to `on_frame`
    /// before it is processed, with a text frame's text as received.
    pub async fn run_prompt_observed(
        &self,
        workflow: &Workflow,
        extra_data: Option<&ExtraData>,
        opts: &WatchOptions,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(PromptEvent) + Send),
        on_frame: &mut OnFrame<'_>,
    ) -> Result<PromptResult, ComfyError> {
        let caps = self.capabilities().await;
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let client_id = new_client_id();
        let socket = match WsConnection::connect(
            &self.ws_url(&client_id),
            &client_id,
            opts.connect_timeout,
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(%prompt_id, error = %e, "WebSocket connect failed; following the prompt through /history");
                None
            }
        };
        let request = PromptRequest {
            prompt: workflow.as_json(),
            client_id: &client_id,
            prompt_id: &prompt_id,
            extra_data,
        };
        let queued = match self.queue_prompt(&request).await {
            Ok(q) => q,
            Err(e) => {
                if let Some(s) = socket {
                    s.close().await;
                }
                return Err(e);
            }
        };
        if queued.prompt_id != prompt_id {
            warn!(ours = %prompt_id, theirs = %queued.prompt_id, "ComfyUI replaced the prompt id");
        }
        info!(prompt_id = %queued.prompt_id, client_id = %client_id, "prompt queued");
        let now = Instant::now();
        // From here on the prompt is ComfyUI's: if this future is dropped before the watch has
        // settled (a panic in `on_event`, a front end giving up), the watch's drop guard
        // interrupts it, so no orphaned prompt keeps the GPU busy.
        let mut watch = Watch {
            client: self,
            opts,
            prompt_id: queued.prompt_id,
            blind: socket.is_none(),
            next_reconnect: socket
                .is_none()
                .then(|| now + reconnect_delay(opts.reconnect_delay, 0)),
            socket,
            started: false,
            current_node: None,
            terminal: None,
            reconnects: 0,
            next_poll: now + opts.silence_timeout,
            cancel_requested: false,
            cancel_deadline: None,
            last_socket_error: String::new(),
            unanswered_polls: 0,
            lost_contact: false,
            comfy_gone: false,
            settled: false,
            // The labels are only needed for the debug log.
            describer: if tracing::enabled!(Level::DEBUG) {
                Describer::for_workflow(workflow)
            } else {
                Describer::new()
            },
            caps,
            loading: None,
        };
        on_event(self.queued_event(&watch.prompt_id, None).await);
        let end = watch.run(cancel, on_event, on_frame).await;
        watch.settled = true;
        if let Some(socket) = watch.socket.take() {
            socket.close().await;
        }
        let end = end?;
        let (entry, cancelled) = match end {
            End::Finished(entry) => (entry, watch.cancel_requested),
            End::Cancelled(entry) => (entry, true),
        };
        let entry = match entry {
            Some(e) => Some(e),
            // Cancelled before it ran (taken off the queue), or with ComfyUI gone: no history
            // entry will ever come.
            None if cancelled && (!watch.started || watch.comfy_gone) => None,
            None => watch.fetch_history_after_end().await?,
        };
        let mut warnings = Vec::new();
        let (outcome, outputs) = match entry {
            Some(e) => (e.outcome, e.outputs),
            None => {
                let outcome = match watch.terminal.take() {
                    Some(o) => o,
                    None if cancelled => Outcome::Interrupted(Interruption {
                        node_id: String::new(),
                        node_type: String::new(),
                    }),
                    None => Outcome::Success,
                };
                if !cancelled {
                    warnings.push(format!(
                        "Prompt ID {} not found in history after execution.",
                        watch.prompt_id
                    ));
                }
                (outcome, Vec::new())
            }
        };
        Ok(PromptResult {
            prompt_id: std::mem::take(&mut watch.prompt_id),
            outcome,
            outputs,
            dropped_outputs: queued.node_errors,
            cancelled,
            warnings,
        })
    }
}

impl ComfyClient {
    /// A `Queued` event with the prompt's place in `/queue` (unknown if that call fails).
    async fn queued_event(&self, prompt_id: &str, queue_remaining: Option<u64>) -> PromptEvent {
        let position = self.queue().await.ok().and_then(|q| q.position(prompt_id));
        PromptEvent::Queued {
            prompt_id: prompt_id.to_owned(),
            position,
            queue_remaining,
        }
    }
}

impl Watch<'_> {
    async fn run(
        &mut self,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(PromptEvent) + Send),
        on_frame: &mut OnFrame<'_>,
    ) -> Result<End, ComfyError> {
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            let reconnect_at = self.next_reconnect.unwrap_or_else(far);
            let cancel_at = self.cancel_deadline.unwrap_or_else(far);
            let socket_open = self.socket.is_some();
            let frame = async {
                match self.socket.as_mut() {
                    Some(s) => s.next_with_text().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled(), if !self.cancel_requested => {
                    if let Some(end) = self.request_cancel().await {
                        return Ok(end);
                    }
                }
                frame = frame, if socket_open => {
                    match frame {
                        Some(Ok((incoming, text))) => {
                            on_frame(&incoming, text.as_ref().map(|t| t.as_str()));
                            if let Some(end) = self.on_frame(incoming, on_event).await {
                                return Ok(end);
                            }
                        }
                        Some(Err(e)) => self.socket_lost(e.to_string(), on_event),
                        None => self.socket_lost("closed by ComfyUI".into(), on_event),
                    }
                }
                _ = sleep_until(self.next_poll) => {
                    if let Some(end) = self.poll_history().await? {
                        return Ok(end);
                    }
                }
                _ = sleep_until(reconnect_at), if !socket_open && self.next_reconnect.is_some() => {
                    self.reconnect(on_event).await;
                }
                _ = sleep_until(cancel_at), if self.cancel_deadline.is_some() => {
                    warn!(prompt_id = %self.prompt_id, "ComfyUI did not confirm the interrupt in time");
                    return Ok(End::Cancelled(None));
                }
            }
        }
    }

    fn is_ours(&self, ev: &WsEvent) -> bool {
        ev.prompt_id() == Some(self.prompt_id.as_str())
    }

    async fn on_frame(
        &mut self,
        incoming: Incoming,
        on_event: &mut (dyn FnMut(PromptEvent) + Send),
    ) -> Option<End> {
        let ev = match incoming {
            Incoming::Event(ev) => ev,
            Incoming::Binary(frame) => {
                self.on_binary(frame, on_event);
                return None;
            }
            Incoming::Garbled(why) => {
                warn!(prompt_id = %self.prompt_id, reason = %why, "undecodable frame from ComfyUI");
                return None;
            }
        };
        if let WsEvent::Status(status) = &ev {
            let remaining = status.status.exec_info.queue_remaining;
            self.log_event(&ev);
            if self.blind {
                // A fresh socket gets no events for our prompt: every queue change may be its end.
                self.next_poll = Instant::now();
            } else if !self.started && status.sid.is_none() {
                on_event(
                    self.client
                        .queued_event(&self.prompt_id, Some(remaining))
                        .await,
                );
            }
            return None;
        }
        if !self.is_ours(&ev) {
            match &ev {
                WsEvent::Unknown { kind, .. } => debug!(kind = %kind, "unknown ComfyUI message"),
                WsEvent::Malformed { kind, error } => {
                    warn!(kind = %kind, error = %error, "malformed ComfyUI message")
                }
                other => debug!(kind = other.kind(), "event for another prompt"),
            }
            return None;
        }
        // Activity for our prompt: the socket works, no need to poll soon.
        self.next_poll = Instant::now() + self.opts.silence_timeout;
        self.unanswered_polls = 0;
        self.log_event(&ev);
        match ev {
            WsEvent::ExecutionStart(_) => {
                self.started = true;
                on_event(PromptEvent::Started);
            }
            WsEvent::ExecutionCached(c) => on_event(PromptEvent::Cached { nodes: c.nodes }),
            WsEvent::Executing(e) => match e.node {
                Some(node) => {
                    // A node expanded at run time is shown as the node the user sees.
                    let node = e.display_node.filter(|d| !d.is_empty()).unwrap_or(node);
                    self.started = true;
                    self.current_node = Some(node.clone());
                    on_event(PromptEvent::Executing { node });
                }
                None => return Some(End::Finished(None)),
            },
            WsEvent::Progress(p) => on_event(PromptEvent::Progress {
                node: p.node.or_else(|| self.current_node.clone()),
                value: p.value,
                max: p.max,
            }),
            WsEvent::ProgressState(s) => {
                let (nodes, loading) = shown_nodes(s.nodes);
                if loading.is_some() && loading != self.loading {
                    if let Some(node) = loading.clone() {
                        on_event(PromptEvent::Loading { node });
                    }
                }
                self.loading = loading;
                on_event(PromptEvent::NodeStates { nodes });
            }
            WsEvent::Executed(e) => {
                let output = match e.output {
                    Some(o) => super::history::parse_node_output(&e.node, &Value::Object(o)),
                    None => NodeOutput {
                        node_id: e.node.clone(),
                        ..NodeOutput::default()
                    },
                };
                on_event(PromptEvent::Executed {
                    node: e.display_node.filter(|d| !d.is_empty()).unwrap_or(e.node),
                    files: output.files.len(),
                    output: Box::new(output),
                });
            }
            WsEvent::ExecutionSuccess(_) => {
                self.terminal = Some(Outcome::Success);
                on_event(PromptEvent::Succeeded);
            }
            WsEvent::ExecutionError(e) if e.is_blocked_variant() => {
                debug!(node = ?e.node_id, "execution blocked for a branch; the prompt continues");
            }
            WsEvent::ExecutionError(e) => {
                let failure = ExecutionFailure::from(&e);
                self.terminal = Some(Outcome::Failed(failure.clone()));
                on_event(PromptEvent::Failed(failure));
                // The terminal `executing{null}` follows; if it is lost, /history settles it soon.
                self.next_poll = Instant::now() + self.opts.poll_interval;
            }
            WsEvent::ExecutionInterrupted(e) => {
                let interruption = Interruption {
                    node_id: e.node_id.unwrap_or_default(),
                    node_type: e.node_type.unwrap_or_default(),
                };
                self.terminal = Some(Outcome::Interrupted(interruption.clone()));
                on_event(PromptEvent::Interrupted(interruption));
                self.next_poll = Instant::now() + self.opts.poll_interval;
            }
            WsEvent::Status(_)
            | WsEvent::FeatureFlags(_)
            | WsEvent::Unknown { .. }
            | WsEvent::Malformed { .. } => {}
        }
        None
    }

    /// Logs one of our prompt's events as its readable line, at debug level; formatting (and
    /// the describer's step timing) is skipped entirely when debug is off.
    fn log_event(&mut self, ev: &WsEvent) {
        if tracing::enabled!(Level::DEBUG) {
            if let Some(line) = self.describer.event(ev, std::time::Instant::now()) {
                debug!(prompt_id = %self.prompt_id, event = %line, "comfy event");
            }
        }
    }

    fn log_binary(&self, frame: &BinaryFrame) {
        if tracing::enabled!(Level::DEBUG) {
            debug!(prompt_id = %self.prompt_id, event = %self.describer.binary(frame), "comfy event");
        }
    }

    fn on_binary(&mut self, frame: BinaryFrame, on_event: &mut (dyn FnMut(PromptEvent) + Send)) {
        let running = self.started && self.terminal.is_none();
        match &frame {
            BinaryFrame::PreviewWithMetadata { metadata, .. }
                if metadata.prompt_id.as_deref() == Some(self.prompt_id.as_str()) =>
            {
                self.log_binary(&frame)
            }
            BinaryFrame::Preview { .. } | BinaryFrame::Text { .. } if running => {
                self.log_binary(&frame)
            }
            _ => {}
        }
        match frame {
            BinaryFrame::PreviewWithMetadata { ref metadata, .. }
                if metadata.prompt_id.as_deref() == Some(self.prompt_id.as_str()) =>
            {
                let node = metadata.node_id.clone();
                let mime = frame.image_mime().unwrap_or("application/octet-stream");
                if let BinaryFrame::PreviewWithMetadata { data, .. } = frame {
                    on_event(PromptEvent::Preview { node, mime, data });
                }
            }
            BinaryFrame::Preview { mime, data } if running => {
                on_event(PromptEvent::Preview {
                    node: self.current_node.clone(),
                    mime,
                    data,
                });
            }
            BinaryFrame::Text { node_id, text } if running => {
                on_event(PromptEvent::Text {
                    node: node_id,
                    text,
                });
            }
            BinaryFrame::Unknown { event, len } => {
                debug!(event, len, "unknown binary frame from ComfyUI");
            }
            _ => {}
        }
    }

    fn socket_lost(&mut self, reason: String, on_event: &mut (dyn FnMut(PromptEvent) + Send)) {
        warn!(prompt_id = %self.prompt_id, reason = %reason, "ComfyUI WebSocket lost");
        self.socket = None;
        self.lost_contact = true;
        self.last_socket_error = reason.clone();
        on_event(PromptEvent::ConnectionLost { reason });
        let now = Instant::now();
        // The prompt may have finished while the socket was dying: look now.
        self.next_poll = now;
        self.next_reconnect = (self.reconnects < self.opts.reconnect_attempts)
            .then(|| now + reconnect_delay(self.opts.reconnect_delay, self.reconnects));
    }

    async fn reconnect(&mut self, on_event: &mut (dyn FnMut(PromptEvent) + Send)) {
        self.reconnects += 1;
        on_event(PromptEvent::Reconnecting {
            attempt: self.reconnects,
        });
        let client_id = new_client_id();
        match WsConnection::connect(
            &self.client.ws_url(&client_id),
            &client_id,
            self.opts.connect_timeout,
        )
        .await
        {
            Ok(socket) => {
                info!(prompt_id = %self.prompt_id, %client_id, attempt = self.reconnects, "ComfyUI WebSocket reconnected");
                self.socket = Some(socket);
                self.blind = true;
                self.next_reconnect = None;
                self.next_poll = Instant::now();
                on_event(PromptEvent::Reconnected);
            }
            Err(e) => {
                warn!(prompt_id = %self.prompt_id, attempt = self.reconnects, error = %e, "ComfyUI WebSocket reconnect failed");
                self.last_socket_error = e.to_string();
                self.next_reconnect = (self.reconnects < self.opts.reconnect_attempts).then(|| {
                    Instant::now() + reconnect_delay(self.opts.reconnect_delay, self.reconnects)
                });
            }
        }
    }

    async fn poll_history(&mut self) -> Result<Option<End>, ComfyError> {
        if let Some(end) = self.poll_job().await {
            return Ok(end);
        }
        let polled = self.client.history(&self.prompt_id).await;
        if polled.is_ok() {
            self.unanswered_polls = 0;
        }
        match polled {
            Ok(Some(entry)) => {
                debug!(prompt_id = %self.prompt_id, "prompt finished (seen in /history)");
                return Ok(Some(if self.cancel_requested {
                    End::Cancelled(Some(entry))
                } else {
                    End::Finished(Some(entry))
                }));
            }
            Ok(None) => {
                if self.cancel_requested && !self.started {
                    // Removed from the queue before it ran: nothing will ever finish.
                    if let Ok(q) = self.client.queue().await {
                        if q.position(&self.prompt_id).is_none() {
                            return Ok(Some(End::Cancelled(None)));
                        }
                    }
                } else if self.lost_contact {
                    if let Some(end) = self.check_still_known().await? {
                        return Ok(Some(end));
                    }
                }
            }
            Err(e) => {
                let socket_gone = self.socket.is_none() && self.next_reconnect.is_none();
                if socket_gone && e.is_retryable() {
                    return Err(ComfyError::Stopped(format!(
                        "the WebSocket closed and {} reconnect attempt(s) failed (last error: {}), and /history does not answer: {e}",
                        self.reconnects, self.last_socket_error
                    )));
                }
                // A socket that stays open but silent while /history gets no answer is a frozen
                // ComfyUI (a hung process keeps its connections): as many tries as reconnects.
                // (A closed socket is the reconnects' business, above.)
                if self.socket.is_some() && matches!(e, ComfyError::Unreachable { .. }) {
                    self.unanswered_polls += 1;
                    if self.unanswered_polls > self.opts.reconnect_attempts {
                        return Err(ComfyError::Stopped(format!(
                            "no event for the prompt on the WebSocket, and /history did not answer {} times in a row: {e}",
                            self.unanswered_polls
                        )));
                    }
                }
                warn!(prompt_id = %self.prompt_id, error = %e, "polling /history failed");
            }
        }
        self.next_poll = Instant::now() + self.opts.poll_interval;
        Ok(None)
    }

    /// With the jobs API, `GET /api/jobs/{id}` is the authoritative state: `Some(None)` while the
    /// prompt is queued or running (also between `execution_success` and the history write,
    /// where `/history` is still empty), `Some(Some(_))` for a pending prompt a cancel removed;
    /// `None` to read `/history` as before (finished, unknown, no jobs API, no answer).
    async fn poll_job(&mut self) -> Option<Option<End>> {
        if !self.caps.jobs_api {
            return None;
        }
        match self.client.job(&self.prompt_id).await {
            Ok(Some(job)) if job.status.is_active() => {
                self.unanswered_polls = 0;
                self.next_poll = Instant::now() + self.opts.poll_interval;
                Some(None)
            }
            Ok(None) if self.cancel_requested && !self.started => Some(Some(End::Cancelled(None))),
            _ => None,
        }
    }

    /// After the socket was lost, ComfyUI answers `/history` without our prompt: it is either
    /// still queued or running, or it finished between the two calls, or the ComfyUI now
    /// answering is not the one it was queued on (restarted on the same address) and the prompt
    /// is gone. A prompt leaves the queue only once its history entry is written, so "not
    /// queued, and still not in the history" means lost.
    async fn check_still_known(&mut self) -> Result<Option<End>, ComfyError> {
        let Ok(queue) = self.client.queue().await else {
            return Ok(None);
        };
        if queue.position(&self.prompt_id).is_some() {
            return Ok(None);
        }
        match self.client.history(&self.prompt_id).await {
            Ok(Some(entry)) => Ok(Some(End::Finished(Some(entry)))),
            Ok(None) => {
                warn!(prompt_id = %self.prompt_id, "ComfyUI answers again but knows nothing of the prompt: it restarted, the prompt was lost");
                Err(ComfyError::PromptLost)
            }
            Err(_) => Ok(None),
        }
    }

    /// Takes the prompt off the queue and interrupts it. `Some` when there is nothing left to
    /// wait for: the socket is gone and ComfyUI does not answer either call, so nothing of the
    /// prompt can run any more (a dead ComfyUI must not hold a cancel for the grace).
    async fn request_cancel(&mut self) -> Option<End> {
        self.cancel_requested = true;
        info!(prompt_id = %self.prompt_id, started = self.started, "cancelling the prompt in ComfyUI");
        let bound = CANCEL_CALL_TIMEOUT.min(self.opts.cancel_grace);
        if self.caps.jobs_cancel {
            // One atomic call: dequeued if pending, interrupted only if it is still the running
            // prompt (never a prompt that started in between).
            match tokio::time::timeout(bound, self.client.cancel_job(&self.prompt_id)).await {
                Ok(Ok(cancelled)) => {
                    debug!(prompt_id = %self.prompt_id, cancelled, "cancelled through the jobs API");
                    self.cancel_deadline = Some(Instant::now() + self.opts.cancel_grace);
                    self.next_poll =
                        Instant::now() + self.opts.poll_interval.min(Duration::from_millis(200));
                    return None;
                }
                Ok(Err(e)) => warn!(error = %e, "jobs API cancel failed; interrupting instead"),
                Err(_) => warn!("jobs API cancel timed out; interrupting instead"),
            }
        }
        let deleted =
            tokio::time::timeout(bound, self.client.delete_from_queue(&[&self.prompt_id])).await;
        if let Ok(Err(e)) = &deleted {
            warn!(error = %e, "could not remove the prompt from the queue");
        }
        // A prompt that has not started and is no longer queued was taken off the queue: nothing
        // of it runs, so nothing is interrupted. An `/interrupt` then could stop the prompt
        // running ahead of it (a ComfyUI that ignores `prompt_id` interrupts whatever runs).
        let off_the_queue = !self.started
            && matches!(deleted, Ok(Ok(())))
            && matches!(
                tokio::time::timeout(bound, self.client.queue()).await,
                Ok(Ok(q)) if q.position(&self.prompt_id).is_none_or(|at| at > 0)
            );
        let interrupted = if off_the_queue {
            debug!(prompt_id = %self.prompt_id, "taken off the queue before it ran; nothing to interrupt");
            Ok(Ok(()))
        } else {
            tokio::time::timeout(bound, self.client.interrupt(Some(&self.prompt_id))).await
        };
        if let Ok(Err(e)) = &interrupted {
            warn!(error = %e, "could not interrupt the prompt");
        }
        let unanswered = |r: &Result<Result<(), ComfyError>, _>| {
            matches!(r, Err(_) | Ok(Err(ComfyError::Unreachable { .. })))
        };
        if self.socket.is_none() && unanswered(&deleted) && unanswered(&interrupted) {
            warn!(prompt_id = %self.prompt_id, "ComfyUI does not answer: the cancel ends without its confirmation");
            self.comfy_gone = true;
            return Some(End::Cancelled(None));
        }
        self.cancel_deadline = Some(Instant::now() + self.opts.cancel_grace);
        self.next_poll = Instant::now() + self.opts.poll_interval.min(Duration::from_millis(200));
        None
    }

    /// After `executing{null}` the entry is stored; allow a few tries for proxies and races.
    /// With the jobs API an empty `/history` is never taken for "no outputs": while the job
    /// reads as queued or running the wait goes on (bounded), and a finished job's own record
    /// carries the outputs.
    async fn fetch_history_after_end(&mut self) -> Result<Option<HistoryEntry>, ComfyError> {
        let mut last_err: Option<ComfyError>;
        let mut attempt = 0u32;
        let active_until = Instant::now() + LATE_HISTORY_BOUND;
        loop {
            match self.client.history(&self.prompt_id).await {
                Ok(Some(entry)) => return Ok(Some(entry)),
                Ok(None) => last_err = None,
                Err(e) => last_err = Some(e),
            }
            if self.caps.jobs_api {
                match self.client.job(&self.prompt_id).await {
                    Ok(Some(job)) if job.status.is_active() && Instant::now() < active_until => {
                        debug!(prompt_id = %self.prompt_id, "the end came before the history write; waiting for it");
                        tokio::time::sleep(self.opts.poll_interval).await;
                        continue;
                    }
                    Ok(Some(job)) => {
                        if let Some(entry) = job.history_entry() {
                            debug!(prompt_id = %self.prompt_id, "outputs read from the jobs API");
                            return Ok(Some(entry));
                        }
                    }
                    _ => {}
                }
            }
            attempt += 1;
            if attempt >= 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
        }
        match last_err {
            Some(e) if self.terminal.is_none() => Err(e),
            _ => Ok(None),
        }
    }
}

/// How long a prompt whose end was seen may still read as running in the jobs API before its
/// history is given up on.
const LATE_HISTORY_BOUND: Duration = Duration::from_secs(120);

/// `progress_state`'s nodes under the ids the user sees, in id order, and the node loading
/// models, if any. Nodes expanded at run time share their prompt node's display id; such a node
/// is finished when all of its parts are, and shows the step of a part still running.
fn shown_nodes(
    nodes: std::collections::HashMap<String, super::messages::NodeProgress>,
) -> (Vec<NodeState>, Option<String>) {
    let mut shown: std::collections::BTreeMap<String, NodeState> = Default::default();
    let mut loading = None;
    for (id, n) in nodes {
        let node = n.display_node_id.filter(|d| !d.is_empty()).unwrap_or(id);
        if n.activity.as_deref() == Some("loading") {
            loading = Some(node.clone());
        }
        let state = NodeState {
            node: node.clone(),
            value: n.value,
            max: n.max,
            finished: n.state == "finished",
        };
        match shown.get_mut(&node) {
            None => {
                shown.insert(node, state);
            }
            Some(seen) => {
                if !state.finished {
                    *seen = NodeState {
                        finished: false,
                        ..state
                    };
                }
            }
        }
    }
    (shown.into_values().collect(), loading)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expanded_nodes_are_shown_as_their_display_node() {
        let frame = r#"{"type":"progress_state","data":{"prompt_id":"p","nodes":{
            "5":{"value":1,"max":1,"state":"finished","node_id":"5","display_node_id":"5","parent_node_id":null,"real_node_id":"5"},
            "5.0.0.1":{"value":3.0,"max":20.0,"state":"running","node_id":"5.0.0.1","display_node_id":"5","parent_node_id":"5","real_node_id":"5"},
            "12:3":{"value":0.0,"max":1.0,"state":"running","activity":"loading","node_id":"12:3","display_node_id":"12:3","parent_node_id":null,"real_node_id":"12:3","seconds":{"total":1.5}}}}}"#;
        let super::super::messages::WsEvent::ProgressState(state) =
            super::super::messages::WsEvent::parse(frame).unwrap()
        else {
            panic!("not a progress_state");
        };
        let (nodes, loading) = shown_nodes(state.nodes);
        assert_eq!(loading.as_deref(), Some("12:3"));
        let five = nodes.iter().find(|n| n.node == "5").unwrap();
        assert_eq!((five.value, five.max, five.finished), (3.0, 20.0, false));
        assert_eq!(nodes.len(), 2, "{nodes:?}");
    }

    #[test]
    fn reconnect_backoff_is_quick_first_then_doubles_and_caps() {
        let base = Duration::from_secs(3);
        assert_eq!(reconnect_delay(base, 0), Duration::from_millis(250));
        assert_eq!(reconnect_delay(base, 1), Duration::from_secs(3));
        assert_eq!(reconnect_delay(base, 2), Duration::from_secs(6));
        assert_eq!(reconnect_delay(base, 9), Duration::from_secs(30));
        assert_eq!(
            reconnect_delay(Duration::from_millis(10), 0),
            Duration::from_millis(10)
        );
    }
}
