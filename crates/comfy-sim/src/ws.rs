//! The `/ws` endpoint and the socket registry ("hub"). Like `PromptServer.sockets`, sockets are registered by
//! client id, messages are routed by that id at send time (`None` = broadcast, unknown id = dropped), and each
//! socket gets its frames through one ordered queue so JSON and binary frames keep their order. The
//! reconnect bug of the real server is kept on purpose: a new socket with a registered id replaces the old
//! one, and whichever socket closes first unregisters the id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use super::{lock, pyfmt, Shared};

/// A frame waiting in a socket's outgoing queue.
#[derive(Clone, Debug)]
pub(crate) enum Frame {
    Text(String),
    Binary(Bytes),
}

impl From<Frame> for Message {
    fn from(frame: Frame) -> Message {
        match frame {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(data) => Message::Binary(data),
        }
    }
}

/// Binary event types (`protocol.BinaryEventTypes`).
pub(crate) const PREVIEW_IMAGE: u32 = 1;
pub(crate) const TEXT: u32 = 3;
pub(crate) const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// The registered sockets and the test switches that act on all of them.
pub(crate) struct Hub {
    sockets: Mutex<HashMap<String, Registered>>,
    /// While set, nothing is delivered to any socket (frames are dropped when sent, not delayed).
    silent: AtomicBool,
    /// Bumped by `drop_websockets`; every socket task ends without a close handshake when it changes.
    drop_epoch: watch::Sender<u64>,
}

struct Registered {
    tx: mpsc::UnboundedSender<Frame>,
    /// The client's `feature_flags` data (`sockets_metadata[sid]["feature_flags"]`).
    flags: Value,
}

impl Hub {
    pub(crate) fn new() -> Hub {
        Hub {
            sockets: Mutex::new(HashMap::new()),
            silent: AtomicBool::new(false),
            drop_epoch: watch::Sender::new(0),
        }
    }

    pub(crate) fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    fn is_silent(&self) -> bool {
        self.silent.load(Ordering::SeqCst)
    }

    pub(crate) fn drop_all(&self) {
        self.drop_epoch.send_modify(|epoch| *epoch += 1);
    }

    /// `send_sync(event, data, sid)` for JSON messages.
    pub(crate) fn send_json(&self, event: &str, data: Value, sid: Option<&str>) {
        let text = pyfmt::to_json(&json!({"type": event, "data": data}));
        self.deliver(Frame::Text(text), sid);
    }

    /// `send_sync(event_type, payload, sid)` for binary messages: a big-endian event type, then the payload.
    pub(crate) fn send_binary(&self, event: u32, payload: &[u8], sid: Option<&str>) {
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&event.to_be_bytes());
        frame.extend_from_slice(payload);
        self.deliver(Frame::Binary(frame.into()), sid);
    }

    fn deliver(&self, frame: Frame, sid: Option<&str>) {
        if self.is_silent() {
            return;
        }
        let sockets = lock(&self.sockets);
        match sid {
            None => {
                for socket in sockets.values() {
                    let _ = socket.tx.send(frame.clone());
                }
            }
            Some(sid) => {
                if let Some(socket) = sockets.get(sid) {
                    let _ = socket.tx.send(frame);
                }
            }
        }
    }

    /// `feature_flags.supports_feature(sockets_metadata, sid, "supports_preview_metadata")`.
    pub(crate) fn supports_preview_metadata(&self, sid: Option<&str>) -> bool {
        let Some(sid) = sid else {
            return false;
        };
        lock(&self.sockets)
            .get(sid)
            .and_then(|s| s.flags.get("supports_preview_metadata"))
            == Some(&Value::Bool(true))
    }

    fn register(&self, sid: &str) -> mpsc::UnboundedReceiver<Frame> {
        let (tx, rx) = mpsc::unbounded_channel();
        let flags = Value::Object(Map::new());
        // Replaces (without closing) a socket already registered under this id, like the real server.
        lock(&self.sockets).insert(sid.to_owned(), Registered { tx, flags });
        rx
    }

    /// `finally: self.sockets.pop(sid)`: removes whatever is registered under the id, even a newer socket.
    fn unregister(&self, sid: &str) {
        lock(&self.sockets).remove(sid);
    }

    fn set_flags(&self, sid: &str, flags: Value) {
        if let Some(socket) = lock(&self.sockets).get_mut(sid) {
            socket.flags = flags;
        }
    }
}

/// `GET /ws?clientId=...`.
pub(crate) async fn ws_route(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = query
        .as_deref()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "clientId"))
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    upgrade.on_upgrade(move |socket| run_socket(shared, socket, client_id))
}

/// Why a socket task ended.
enum End {
    /// The client sent a close frame: answer it.
    ClientClosed,
    /// The connection failed, or the simulator dropped it on purpose: just let the TCP stream go.
    Abrupt,
}

async fn run_socket(shared: Arc<Shared>, mut socket: WebSocket, client_id: String) {
    let sid = if client_id.is_empty() {
        uuid::Uuid::new_v4().simple().to_string()
    } else {
        client_id
    };
    let hub = &shared.hub;
    let mut dropped = hub.drop_epoch.subscribe();
    dropped.mark_unchanged();
    let mut rx = hub.register(&sid);
    lock(&shared.log).ws_client_ids.push(sid.clone());

    // Connect-time messages go straight to this socket, ahead of anything queued for it.
    let mut greeting =
        vec![json!({"type": "status", "data": {"status": shared.queue_info(), "sid": sid}})];
    {
        let current = lock(&shared.control.current);
        if current.client_id.as_deref() == Some(sid.as_str()) {
            if let Some(node) = &current.last_node {
                greeting.push(json!({"type": "executing", "data": {"node": node}}));
            }
        }
    }
    for message in greeting {
        if !hub.is_silent()
            && socket
                .send(Message::Text(pyfmt::to_json(&message).into()))
                .await
                .is_err()
        {
            hub.unregister(&sid);
            return;
        }
    }

    let mut first_message = true;
    let mut queue_open = true;
    let end = loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break End::Abrupt,
            _ = dropped.changed() => break End::Abrupt,
            frame = rx.recv(), if queue_open => match frame {
                Some(frame) => {
                    // A client that stops reading must not keep the drop and shutdown switches from working.
                    tokio::select! {
                        sent = socket.send(frame.into()) => if sent.is_err() {
                            break End::Abrupt;
                        },
                        _ = dropped.changed() => break End::Abrupt,
                        _ = shared.shutdown.cancelled() => break End::Abrupt,
                    }
                }
                // Replaced by a newer socket with the same id: stay open, receive nothing.
                None => queue_open = false,
            },
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if first_message && handle_first_text(&shared, &sid, text.as_str()) {
                        first_message = false;
                    }
                }
                Some(Ok(Message::Close(_))) => break End::ClientClosed,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break End::Abrupt,
            },
        }
    };
    hub.unregister(&sid);
    if let End::ClientClosed = end {
        // Reading once more lets tungstenite flush its reply to the client's close frame.
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.recv()).await;
    }
}

/// Feature-flag negotiation. Returns whether this message counts as the client's first message: like the
/// real handler, text that is not a JSON object raises before the flag is cleared and so does not count.
fn handle_first_text(shared: &Shared, sid: &str, text: &str) -> bool {
    let Ok(Value::Object(message)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    if message.get("type").and_then(Value::as_str) == Some("feature_flags") {
        let flags = message.get("data").cloned().unwrap_or_else(|| json!({}));
        shared.hub.set_flags(sid, flags);
        shared.hub.send_json(
            "feature_flags",
            shared.config.profile.server_features(),
            Some(sid),
        );
    }
    true
}
