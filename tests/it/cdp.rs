//! A small Chrome DevTools Protocol client for driving headless Chromium from tests.
//!
//! [`Browser::launch`] starts Chromium with a throwaway profile and remote debugging on a free
//! port (read back from `<profile>/DevToolsActivePort`); [`Browser::page`] attaches to its page
//! target over WebSocket. A [`Page`] sends raw commands with [`Page::call`] and has helpers for
//! what tests need: [`Page::navigate`], [`Page::eval`] (promises awaited, results by value),
//! [`Page::wait_for`] (resolves in the page when a condition holds, so tests never sleep),
//! [`Page::set_viewport`] and [`Page::screenshot`]. Chromium is killed when the [`Browser`] drops.
//!
//! Chromium is Debian's `chromium` (`apt-get install -y chromium`); `CHROMIUM_BIN` overrides the
//! binary. A missing binary is an error that says how to install it, never a skipped test.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where Debian's package puts Chromium.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";
/// How to get Chromium, for the error when it is missing.
const INSTALL_HINT: &str = "The page tests drive headless Chromium: install it with \
     `sudo apt-get install -y chromium` (Debian; Ubuntu: the chromium snap or Google Chrome), \
     or set CHROMIUM_BIN to a Chromium or Chrome binary.";
/// Bound for Chromium to start and for one CDP command to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

/// A headless Chromium process with its own temporary profile; killed on drop.
pub struct Browser {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium and waits until its DevTools endpoint is up.
    pub async fn launch() -> Result<Browser> {
        let binary = chromium_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("comfy-worker-chromium-")
            .tempdir()
            .context("creating Chromium's temporary directory")?;
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile)?;
        let log = File::create(dir.path().join("chromium.log"))?;
        let child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut browser = Browser {
            child,
            port: 0,
            dir,
        };
        browser.port = browser
            .wait_for_port(&profile.join("DevToolsActivePort"))
            .await?;
        Ok(browser)
    }

    /// Attaches to the browser's first page target (the `about:blank` tab it started with).
    pub async fn page(&self) -> Result<Page> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(COMMAND_TIMEOUT)
            .build()?;
        let list = format!("http://127.0.0.1:{}/json/list", self.port);
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let ws_url = loop {
            let targets: Vec<Value> = http.get(&list).send().await?.json().await?;
            let page = targets.iter().find(|t| t["type"] == "page");
            if let Some(url) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                break url.to_owned();
            }
            if Instant::now() > deadline {
                bail!("Chromium lists no page target: {targets:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Page::connect(&ws_url).await
    }

    /// Chromium's output so far (for failure messages).
    pub fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn wait_for_port(&mut self, file: &Path) -> Result<u16> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            // The file holds "<port>\n<browser target path>"; wait until both lines are written.
            if let Ok(text) = std::fs::read_to_string(file) {
                if let Some((port, _)) = text.split_once('\n') {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        return Ok(port);
                    }
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "Chromium exited ({status}) before opening its DevTools port. Its output:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Chromium did not write {} within {COMMAND_TIMEOUT:?}. Its output:\n{}",
                    file.display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Debian's wrapper script execs the browser, so this is the browser process; its renderer
        // and utility processes exit when it does.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Those helpers may still write into the profile for a moment, which makes a single
        // removal fail with "directory not empty"; retry briefly so no profile is left in /tmp.
        for _ in 0..40 {
            match std::fs::remove_dir_all(self.dir.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(25));
                }
                _ => break,
            }
        }
    }
}

/// The Chromium binary: `$CHROMIUM_BIN`, else `/usr/bin/chromium`, else `chromium` on `PATH`.
fn chromium_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CHROMIUM_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!(
            "CHROMIUM_BIN={} does not exist. {INSTALL_HINT}",
            bin.display()
        );
    }
    let default = PathBuf::from(DEFAULT_CHROMIUM);
    if default.is_file() {
        return Ok(default);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        anyhow!("Chromium is not installed ({DEFAULT_CHROMIUM} not found). {INSTALL_HINT}")
    })
}

/// A CDP event (a message with `method` and no `id`).
#[derive(Clone, Debug)]
pub struct Event {
    pub method: String,
    pub params: Value,
}

/// A WebSocket session with one page target.
pub struct Page {
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Page {
    async fn connect(ws_url: &str) -> Result<Page> {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(256 << 20);
        config.max_frame_size = Some(256 << 20);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(ws_url, Some(config), false)
            .await
            .with_context(|| format!("connecting to {ws_url}"))?;
        let (sink, mut stream) = ws.split();
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let reader = {
            let pending = pending.clone();
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = value["id"].as_u64() {
                        let waiter = pending.lock().unwrap().remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply(value));
                        }
                    } else if let Some(method) = value["method"].as_str() {
                        let _ = events.send(Event {
                            method: method.to_owned(),
                            params: value["params"].clone(),
                        });
                    }
                }
                // The socket is gone: fail every command still waiting.
                pending.lock().unwrap().clear();
            })
        };
        let page = Page {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            events,
            next_id: AtomicU64::new(1),
            reader,
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        Ok(page)
    }

    /// Sends a CDP command and returns its `result`; a protocol error becomes `Err`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        let sent = self.sink.lock().await.send(Message::text(message)).await;
        if let Err(e) = sent {
            self.pending.lock().unwrap().remove(&id);
            return Err(anyhow!("{method}: sending failed: {e}"));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.with_context(|| format!("CDP {method}")),
            Ok(Err(_)) => bail!("CDP {method}: the DevTools connection closed"),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                bail!("CDP {method}: no answer within {COMMAND_TIMEOUT:?}")
            }
        }
    }

    /// Events from now on (subscribe before the command that causes them).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Navigates and waits for the page's `load` event.
    pub async fn navigate(&self, url: &str) -> Result<()> {
        let mut events = self.events();
        let result = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = result["errorText"].as_str() {
            bail!("navigating to {url}: {error}");
        }
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event) if event.method == "Page.loadEventFired" => return Ok(()),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        bail!("the DevTools connection closed")
                    }
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("{url} did not finish loading within {COMMAND_TIMEOUT:?}"))?
    }

    /// Evaluates a JavaScript expression in the page, awaiting it if it is a promise, and returns
    /// its value as JSON (`undefined` becomes `null`). A thrown exception becomes `Err`.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            let text = details["exception"]["description"]
                .as_str()
                .or_else(|| details["exception"]["value"].as_str())
                .or_else(|| details["text"].as_str())
                .unwrap_or("exception");
            bail!("JavaScript threw: {text}\nwhile evaluating: {expression}");
        }
        Ok(result["result"]
            .get("value")
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Waits, inside the page, until the JavaScript expression `condition` is truthy and returns
    /// its value. It is re-checked on every DOM mutation and every 50 ms (for state that is not
    /// the DOM's, like an image finishing decoding); `timeout` bounds the wait.
    pub async fn wait_for(&self, condition: &str, timeout: Duration) -> Result<Value> {
        let ms = timeout.as_millis();
        let quoted = serde_json::to_string(condition)?;
        let script = format!(
            r#"new Promise((resolve, reject) => {{
  const check = () => ({condition});
  let observer, interval, timer;
  const done = () => {{ observer.disconnect(); clearInterval(interval); clearTimeout(timer); }};
  const test = () => {{
    let value;
    try {{ value = check(); }} catch (e) {{ done(); reject(e); return; }}
    if (value) {{ done(); resolve(value); }}
  }};
  observer = new MutationObserver(test);
  observer.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});
  interval = setInterval(test, 50);
  timer = setTimeout(() => {{ done(); reject(new Error('timed out after {ms} ms waiting for: ' + {quoted})); }}, {ms});
  test();
}})"#
        );
        self.eval(&script).await
    }

    /// Sets the viewport (CSS pixels, scale 1).
    pub async fn set_viewport(&self, width: u32, height: u32) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(())
    }

    /// A PNG screenshot of the whole page (beyond the viewport when the page is taller).
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let (width, height) = (
            size["width"].as_f64().unwrap_or(1280.0).ceil(),
            size["height"].as_f64().unwrap_or(900.0).ceil(),
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| anyhow!("captureScreenshot returned no data: {shot}"))?;
        comfy_worker::job::codec::decode_input(data)
            .map_err(|e| anyhow!("captureScreenshot returned bad base64: {e}"))
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A command reply's `result`, or its `error` as `Err`.
fn reply(value: Value) -> Result<Value> {
    if let Some(error) = value.get("error") {
        let message = error["message"].as_str().unwrap_or("error");
        return match error.get("data").and_then(Value::as_str) {
            Some(data) => Err(anyhow!("{message}: {data}")),
            None => Err(anyhow!("{message}")),
        };
    }
    Ok(value.get("result").cloned().unwrap_or(Value::Null))
}
