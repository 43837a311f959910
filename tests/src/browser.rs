//! Headless Chromium for tests, driven over the DevTools protocol: a child `chromium
//! --headless` with a temporary profile, and a small client of one page's DevTools websocket
//! (navigate, evaluate JavaScript, take a screenshot). The browser is killed on drop.
//!
//! The binary is `$SHOAL_CHROMIUM`, else `/usr/bin/chromium` (Debian's package `chromium`),
//! else `chromium` on the `PATH`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<Value>>;

/// A headless Chromium with one page.
pub struct Browser {
    child: Child,
    /// Removed after the browser is killed (fields drop after `drop`).
    _profile: tempfile::TempDir,
    commands: mpsc::UnboundedSender<(String, Value, Reply)>,
    task: tokio::task::JoinHandle<()>,
}

/// The Chromium binary, or a clear error saying how to install it.
pub fn chromium_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SHOAL_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let debian = PathBuf::from("/usr/bin/chromium");
    if debian.exists() {
        return Ok(debian);
    }
    if let Ok(path) = Command::new("sh").args(["-c", "command -v chromium"]).output()
        && path.status.success()
    {
        return Ok(PathBuf::from(String::from_utf8_lossy(&path.stdout).trim()));
    }
    bail!(
        "headless Chromium is needed for this test and was not found: install Debian's package `chromium` (apt-get install chromium) or set SHOAL_CHROMIUM"
    )
}

impl Browser {
    /// Starts Chromium headless (`width` × `height` window) and connects to its first page.
    pub async fn launch(width: u32, height: u32) -> Result<Browser> {
        let bin = chromium_bin()?;
        let profile = tempfile::tempdir()?;
        let log = std::fs::File::create(profile.path().join("chromium.log"))?;
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                // the tests run as root in containers, where Chromium's sandbox cannot start
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let port = match devtools_port(&mut child, profile.path()).await {
            Ok(port) => port,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.context(format!("Chromium's log: {}", log_tail(profile.path()))));
            }
        };
        let url = page_websocket(port).await?;
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.context("connect to the page's DevTools")?;
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(ws, rx));
        let browser = Browser { child, _profile: profile, commands, task };
        browser.call("Page.enable", json!({})).await?;
        browser.call("Runtime.enable", json!({})).await?;
        Ok(browser)
    }

    /// Sends one DevTools command to the page and waits for its result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((method.to_string(), params, tx))
            .map_err(|_| anyhow!("the DevTools connection is closed"))?;
        tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("{method}: no answer from Chromium in {COMMAND_TIMEOUT:?}"))?
            .map_err(|_| anyhow!("{method}: the DevTools connection closed"))?
            .with_context(|| method.to_string())
    }

    /// Loads `url` and waits until the document has loaded.
    pub async fn goto(&self, url: &str) -> Result<()> {
        let reply = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = reply.get("errorText").and_then(Value::as_str) {
            bail!("cannot load {url}: {error}");
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        while self.eval("document.readyState").await? != json!("complete") {
            if Instant::now() > deadline {
                bail!("{url} did not finish loading");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page (promises awaited) and returns its value
    /// as JSON; a thrown exception is an error.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let reply = self
            .call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))
            .await?;
        if let Some(exception) = reply.get("exceptionDetails") {
            let text = exception.pointer("/exception/description").or_else(|| exception.get("text"));
            bail!("JavaScript threw: {}", text.cloned().unwrap_or(Value::Null));
        }
        Ok(reply.pointer("/result/value").cloned().unwrap_or(Value::Null))
    }

    /// A PNG of the whole page (not only the window), written to `path` (folders created).
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let reply =
            self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true })).await?;
        let data = reply.get("data").and_then(Value::as_str).ok_or_else(|| anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data).context("decode the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(profile: &Path) -> String {
    let log = std::fs::read_to_string(profile.join("chromium.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Chromium writes the port it chose to `<profile>/DevToolsActivePort` once it listens.
async fn devtools_port(child: &mut Child, profile: &Path) -> Result<u16> {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok())
        {
            return Ok(port);
        }
        if let Some(status) = child.try_wait()? {
            bail!("Chromium exited before it listened ({status})");
        }
        if Instant::now() > deadline {
            bail!("Chromium did not open its DevTools port within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The DevTools websocket of the browser's first page (`/json/list`).
async fn page_websocket(port: u16) -> Result<String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let targets: Value = client
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
            .context("list Chromium's pages")?
            .json()
            .await?;
        let page = targets.as_array().into_iter().flatten().find(|t| t["type"] == "page");
        if let Some(url) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
            return Ok(url.to_string());
        }
        if Instant::now() > deadline {
            bail!("Chromium has no page to drive: {targets}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Owns the websocket: numbers and sends commands, routes each reply to its caller, drops
/// events (the tests poll the page instead).
async fn serve<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    mut commands: mpsc::UnboundedReceiver<(String, Value, Reply)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id = 1u64;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some((method, params, reply)) = command else { return };
                let id = next_id;
                next_id += 1;
                let text = json!({ "id": id, "method": method, "params": params }).to_string();
                if let Err(e) = sink.send(Message::text(text)).await {
                    let _ = reply.send(Err(anyhow!("send to Chromium: {e}")));
                    return;
                }
                pending.insert(id, reply);
            }
            message = stream.next() => {
                let Some(Ok(message)) = message else { return };
                let Ok(text) = message.to_text() else { continue };
                let Ok(value) = serde_json::from_str::<Value>(text) else { continue };
                let Some(reply) = value.get("id").and_then(Value::as_u64).and_then(|id| pending.remove(&id)) else {
                    continue;
                };
                let result = match value.get("error") {
                    Some(error) => Err(anyhow!("Chromium: {error}")),
                    None => Ok(value.get("result").cloned().unwrap_or(Value::Null)),
                };
                let _ = reply.send(result);
            }
        }
    }
}
