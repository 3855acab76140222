//! A headless Chromium driven over the DevTools protocol, for the
//! dashboard test: open a page, evaluate JavaScript in it, take a
//! screenshot. Chromium and everything it starts run in their own session
//! and process group, killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ws::WsClient;

/// A running headless Chromium.
pub struct Browser {
    child: Child,
    devtools: SocketAddr,
    _profile: crate::TempDir,
}

/// Whether Chromium is installed. Where it is not, the dashboard test
/// skips with a message, unless `HALO_REQUIRE_CHROMIUM=1` (the project's
/// test script sets it after installing Chromium): then it fails.
pub fn chromium(test: &str) -> Option<String> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if found.is_ok_and(|s| s.success()) {
            return Some(name.to_string());
        }
    }
    if std::env::var("HALO_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("{test}: no chromium installed and HALO_REQUIRE_CHROMIUM=1");
    }
    eprintln!("SKIPPED {test}: no chromium installed (scripts/install-test-deps.sh installs it)");
    None
}

impl Browser {
    /// Starts `program` headless with a fresh profile and a window of
    /// `width` x `height`.
    pub fn start(program: &str, width: u32, height: u32) -> anyhow::Result<Browser> {
        let profile = crate::TempDir::new("chromium");
        // A session of its own (setsid(1) execs it in place): no terminal
        // to touch, and a process group that takes every helper with it.
        let mut child = Command::new("setsid")
            .arg(program)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.0.display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // It says where DevTools listens on stderr.
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let mut b = Browser { child, devtools: "127.0.0.1:0".parse()?, _profile: profile };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow::anyhow!("chromium printed no DevTools address"))?;
        b.devtools = addr.parse()?;
        Ok(b)
    }

    /// Opens `url` in a new tab.
    pub async fn open(&self, url: &str) -> anyhow::Result<Page> {
        let answer = http(self.devtools, "PUT", &format!("/json/new?{url}"))?;
        let v: serde_json::Value = serde_json::from_str(&answer)?;
        let ws = v["webSocketDebuggerUrl"].as_str().ok_or_else(|| anyhow::anyhow!("no page socket in {answer}"))?;
        let path =
            ws.split_once("://").and_then(|(_, r)| r.split_once('/')).map(|(_, p)| format!("/{p}")).unwrap_or_default();
        let ws = WsClient::connect(self.devtools, &self.devtools.to_string(), &path)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(Page { ws, id: 0 })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Its own group (setsid): every helper process goes with it. Never
        // a group that is not its own.
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let pgrp =
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(2)).and_then(|g| g.parse::<u32>().ok());
        if pgrp == Some(pid) {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to DevTools; the body of the answer (it keeps
/// the connection open: read as far as Content-Length says).
fn http(to: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned());
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            anyhow::bail!("DevTools closed the connection: {}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A tab.
pub struct Page {
    ws: WsClient,
    id: u64,
}

impl Page {
    /// Sends one DevTools command; its result.
    pub async fn call(&mut self, method: &str, params: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.id += 1;
        let msg = serde_json::json!({ "id": self.id, "method": method, "params": params });
        self.ws.send_text(&msg.to_string()).await?;
        loop {
            let text = tokio::time::timeout(Duration::from_secs(30), self.ws.recv())
                .await
                .map_err(|_| anyhow::anyhow!("{method}: no answer within 30s"))??
                .ok_or_else(|| anyhow::anyhow!("{method}: the page closed"))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if v["id"].as_u64() == Some(self.id) {
                if let Some(e) = v.get("error") {
                    anyhow::bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<serde_json::Value> {
        let params = serde_json::json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let r = self.call("Runtime.evaluate", params).await?;
        if let Some(e) = r.get("exceptionDetails") {
            anyhow::bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self) -> anyhow::Result<Vec<u8>> {
        let r = self
            .call("Page.captureScreenshot", serde_json::json!({ "format": "png", "captureBeyondViewport": true }))
            .await?;
        let data = r["data"].as_str().ok_or_else(|| anyhow::anyhow!("no screenshot data"))?;
        Ok(base64_decode(data))
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bits: Vec<u8> = s.bytes().filter_map(val).collect();
    let mut out = Vec::with_capacity(bits.len() * 3 / 4);
    for c in bits.chunks(4) {
        let n = c.iter().enumerate().fold(0u32, |acc, (i, v)| acc | (u32::from(*v) << (18 - 6 * i)));
        out.push((n >> 16) as u8);
        if c.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if c.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGFsbw=="), b"halo");
        assert_eq!(super::base64_decode("aGFsb3M="), b"halos");
        assert_eq!(super::base64_decode("aGFsb3Mh"), b"halos!");
    }
}
