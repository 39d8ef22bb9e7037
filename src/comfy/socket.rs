//! The `/ws` connection: connect (no `Origin` header), announce feature flags, decode frames.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::error::ComfyError;
use super::messages::{BinaryFrame, WsEvent};

/// The first frame we send: ask for previews with a JSON header (event 4), which name their node and prompt.
const FEATURE_FLAGS: &str = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#;

/// Largest frame accepted: SaveImageWebsocket sends full-size PNGs.
const MAX_FRAME: usize = 256 << 20;

/// One frame from ComfyUI, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A text frame.
    Event(WsEvent),
    /// A binary frame.
    Binary(BinaryFrame),
    /// A frame that could not be decoded (kept for logs; never fatal).
    Garbled(String),
}

/// An open socket registered under `client_id`.
pub struct WsConnection {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    client_id: String,
}

impl std::fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnection")
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl WsConnection {
    /// Connects to `url` (which carries `clientId`) and sends the feature-flags frame first.
    pub async fn connect(
        url: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<WsConnection, ComfyError> {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME);
        config.max_frame_size = Some(MAX_FRAME);
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), false);
        let (mut stream, _resp) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ComfyError::WebSocket(format!("connecting to {url} timed out")))?
            .map_err(|e| ComfyError::WebSocket(format!("connecting to {url}: {e}")))?;
        stream
            .send(Message::text(FEATURE_FLAGS))
            .await
            .map_err(|e| ComfyError::WebSocket(format!("sending feature flags: {e}")))?;
        Ok(WsConnection {
            stream,
            client_id: client_id.to_owned(),
        })
    }

    /// The id this socket is registered under.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The next frame; `None` once the socket is closed. Pings are answered by the library.
    pub async fn next(&mut self) -> Option<Result<Incoming, ComfyError>> {
        Some(self.next_with_text().await?.map(|(incoming, _)| incoming))
    }

    /// The next frame with, for a text frame, the text as received (for `watch --json`).
    pub async fn next_with_text(
        &mut self,
    ) -> Option<Result<(Incoming, Option<Utf8Bytes>), ComfyError>> {
        loop {
            let msg = match self.stream.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(ComfyError::WebSocket(e.to_string()))),
            };
            return Some(Ok(match msg {
                Message::Text(text) => match WsEvent::parse(text.as_str()) {
                    Ok(ev) => (Incoming::Event(ev), Some(text)),
                    Err(e) => (
                        Incoming::Garbled(format!("text frame is not an envelope: {e}")),
                        Some(text),
                    ),
                },
                Message::Binary(data) => match BinaryFrame::parse(&data) {
                    Ok(frame) => (Incoming::Binary(frame), None),
                    Err(e) => (Incoming::Garbled(e.to_string()), None),
                },
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }));
        }
    }

    /// Completes the close handshake (bounded), so ComfyUI unregisters the id cleanly.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.close(None)).await;
    }
}
