//! A client of the Docker Engine API on its local socket: the calls the
//! docker driver makes, one HTTP/1.1 connection per call (a unix socket
//! connect is cheap), JSON in and out, and the two stream formats the
//! daemon uses (newline-separated JSON for events, 8-byte framed stdout
//! and stderr for logs and exec output).

use std::path::PathBuf;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

/// The API version halo speaks (Docker Engine 20.10 and later).
const VERSION: &str = "v1.41";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the Docker daemon at {socket}: {source}; is dockerd running?")]
    Unreachable { socket: String, source: std::io::Error },
    #[error("the Docker daemon answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("talking to the Docker daemon failed: {0}")]
    Protocol(String),
}

impl ApiError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

fn protocol(e: impl std::fmt::Display) -> ApiError {
    ApiError::Protocol(e.to_string())
}

/// The daemon at one socket.
#[derive(Debug, Clone)]
pub struct Client {
    pub socket: PathBuf,
}

/// `s` escaped for a URL query or path segment.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiError::Unreachable { socket: self.socket.display().to_string(), source })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(protocol)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(send)
    }

    fn build(method: Method, path: &str, body: Option<&Value>) -> Request<Full<Bytes>> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON encodes"))).unwrap_or_default();
        Request::builder()
            .method(method)
            .uri(format!("/{VERSION}{path}"))
            .header(http::header::HOST, "docker")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request")
    }

    /// Sends one request; the response with its head checked (2xx, 304).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let mut send = self.connect().await?;
        let resp = send.send_request(Self::build(method, path, body)).await.map_err(protocol)?;
        check(resp).await
    }

    /// One call whose answer is read whole: JSON, or `Null` for none.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let resp = self.send(method, path, body).await?;
        let bytes = resp.into_body().collect().await.map_err(protocol)?.to_bytes();
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).or_else(|_| Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }

    /// A call that takes the connection over (`Upgrade: tcp`), as exec
    /// start does to carry stdin: the raw stream after the answer.
    pub async fn hijack(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<impl AsyncRead + AsyncWrite + Unpin + Send + use<>, ApiError> {
        let mut send = self.connect().await?;
        let mut req = Self::build(Method::POST, path, Some(body));
        req.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("Upgrade"));
        req.headers_mut().insert(http::header::UPGRADE, http::HeaderValue::from_static("tcp"));
        let resp = send.send_request(req).await.map_err(protocol)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            check(resp).await?;
            return Err(protocol("the daemon did not switch protocols for an exec"));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(protocol)?;
        Ok(TokioIo::new(upgraded))
    }
}

async fn check(resp: hyper::Response<Incoming>) -> Result<hyper::Response<Incoming>, ApiError> {
    let status = resp.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED || status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp);
    }
    let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
    Err(ApiError::Status { status, message })
}

/// Reads a response body as it arrives.
pub struct Stream {
    body: Incoming,
    buf: BytesMut,
}

impl Stream {
    pub fn new(resp: hyper::Response<Incoming>) -> Stream {
        Stream { body: resp.into_body(), buf: BytesMut::new() }
    }

    /// More bytes; `None` at the end of the body.
    async fn fill(&mut self) -> Result<bool, ApiError> {
        loop {
            match self.body.frame().await {
                None => return Ok(false),
                Some(Err(e)) => return Err(protocol(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// The next JSON value of a newline-separated stream (events, pull
    /// progress); `None` at the end.
    pub async fn next_json(&mut self) -> Result<Option<Value>, ApiError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(nl + 1);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map(Some).map_err(protocol);
            }
            if !self.fill().await? {
                let rest = self.buf.split();
                if rest.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                return serde_json::from_slice(&rest).map(Some).map_err(protocol);
            }
        }
    }

    /// The next frame of a multiplexed stdout/stderr stream: (stream
    /// number: 1 stdout, 2 stderr; payload). `None` at the end.
    pub async fn next_frame(&mut self) -> Result<Option<(u8, Bytes)>, ApiError> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf) {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// Takes one whole frame (`[stream, 0, 0, 0, size: u32 BE]` + payload) off
/// the front of `buf`, if it holds one.
pub fn split_frame(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    if buf.len() < 8 {
        return None;
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if buf.len() < 8 + len {
        return None;
    }
    let stream = buf[0];
    buf.advance(8);
    Some((stream, buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_only_when_whole() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 3, b'a', b'b']);
        assert_eq!(split_frame(&mut buf), None);
        buf.extend_from_slice(&[b'c', 2, 0, 0, 0, 0, 0, 0, 1, b'!']);
        assert_eq!(split_frame(&mut buf), Some((1, Bytes::from_static(b"abc"))));
        assert_eq!(split_frame(&mut buf), Some((2, Bytes::from_static(b"!"))));
        assert!(buf.is_empty());
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(escape("{\"label\":[\"a=b\"]}"), "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D");
        assert_eq!(escape("app:1.4"), "app%3A1.4");
    }
}
