//! Our HTTP/1.1 upstream client.
//!
//! hyper's client connection runs in a task of its own and talks to the
//! requesting task through channels: two extra task wake-ups per request, the
//! largest cost the profile showed after the kernel. This client does the
//! upstream I/O in the task that serves the downstream connection (as pingora
//! does): the request head is written, the response head parsed with
//! `httparse`, and the body decoded on demand as the downstream side polls
//! for it ([`Decoder`]). A connection goes back to the pool only after its
//! body ended cleanly and neither side asked to close it.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::body::ProxyBody;
use crate::tls::client::UpIo;

pub use crate::decode::Decoder;
use crate::decode::Framing;

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Request bodies up to this size are written with the head in one call.
const INLINE_BODY: usize = 16 * 1024;

/// One upstream HTTP/1.1 connection.
pub struct H1Conn {
    io: UpIo,
    /// Bytes read but not consumed yet.
    pub buf: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    out: Vec<u8>,
    _open: OpenGuard,
}

/// Counts open connections for metrics.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing of the request left the proxy; the request is handed back.
    #[error("upstream connection failed before the request was written: {0}")]
    NotSent(io::Error),
    /// The request may have reached the upstream.
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before responding")]
    Closed,
    #[error("invalid response from upstream: {0}")]
    Parse(String),
    #[error("reading the request body: {0}")]
    RequestBody(crate::error::BoxError),
}

/// A parsed response head, and how to read the body that follows.
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub decoder: Decoder,
    /// Whether the connection can serve another request after this body.
    pub keep_alive: bool,
}

impl H1Conn {
    /// The socket and the bytes read past the last response head: what
    /// a tunnel takes over after a 101.
    pub fn into_io(self) -> (UpIo, BytesMut) {
        (self.io, self.buf)
    }

    pub fn new(io: UpIo, open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Relaxed);
        H1Conn { io, buf: BytesMut::with_capacity(8 * 1024), out: Vec::with_capacity(1024), _open: OpenGuard(open) }
    }

    /// Gives the buffers back while the connection idles in its pool (they
    /// are taken again by the next exchange's first read and write).
    pub fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = Vec::new();
    }

    /// Whether an idle connection can be reused: the upstream has not closed
    /// it and sent nothing unasked. Costs a syscall only when the reactor saw
    /// the socket readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = self.io.tcp();
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Over TLS, bytes on an idle connection are a close_notify or
            // an alert: not reused.
            Poll::Ready(Ok(())) if matches!(self.io, UpIo::Tls(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes a request (head from `parts`, which is only read) and reads
    /// the response head. On [`ClientError::NotSent`] the body comes back in
    /// the second tuple field.
    pub async fn send(
        &mut self,
        parts: &http::request::Parts,
        body: ProxyBody,
    ) -> Result<ResponseHead, (ClientError, Option<ProxyBody>)> {
        let head_only = parts.method == Method::HEAD;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        encode_head(parts, &body, &mut out);
        let inlined = match &body {
            ProxyBody::Full(Some(b)) if b.len() <= INLINE_BODY => {
                out.extend_from_slice(b);
                true
            }
            _ => false,
        };
        // A failed first write means nothing reached the upstream: the body
        // goes back whole for another try.
        let written = self.io.write_all(&out).await;
        self.out = out;
        if let Err(e) = written {
            return Err((ClientError::NotSent(e), Some(body)));
        }
        if !inlined {
            self.write_body(body).await.map_err(|e| (e, None))?;
        }
        // TLS holds writes until flushed (a no-op on plain TCP).
        self.io.flush().await.map_err(|e| (ClientError::Io(e), None))?;
        self.read_head(head_only).await.map_err(|e| (e, None))
    }

    async fn write_body(&mut self, body: ProxyBody) -> Result<(), ClientError> {
        match body {
            ProxyBody::Empty | ProxyBody::Full(None) => Ok(()),
            ProxyBody::Full(Some(b)) => Ok(self.io.write_all(&b).await?),
            ProxyBody::Stream(mut s) => {
                let chunked = s.size_hint().exact().is_none();
                while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut s).poll_frame(cx)).await {
                    let frame = frame.map_err(ClientError::RequestBody)?;
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        self.io.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
                        self.io.write_all(&data).await?;
                        self.io.write_all(b"\r\n").await?;
                    } else {
                        self.io.write_all(&data).await?;
                    }
                }
                if chunked {
                    self.io.write_all(b"0\r\n\r\n").await?;
                }
                Ok(())
            }
        }
    }

    async fn read_head(&mut self, head_only: bool) -> Result<ResponseHead, ClientError> {
        loop {
            if let Some(head) = self.parse_head(head_only)? {
                // 1xx answers are interim: skip them and wait for the final one.
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(ClientError::Parse(format!("response head larger than {MAX_HEAD} bytes")));
            }
            self.buf.reserve(4096);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Parses a complete head from the buffer, or `None` when more is needed.
    fn parse_head(&mut self, head_only: bool) -> Result<Option<ResponseHead>, ClientError> {
        let mut slots = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, &self.buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ClientError::Parse(e.to_string())),
        };
        let code = resp.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| ClientError::Parse(format!("status {code}")))?;
        let version = if resp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        // Framing and the connection's fate come from the raw lines; the
        // hop-by-hop ones (and those `Connection` names) never enter the
        // header map, so nothing has to be looked up or removed later.
        let mut framing = Framing::default();
        let (mut close, mut keep) = (false, false);
        let mut named: Vec<&[u8]> = Vec::new();
        for h in resp.headers.iter() {
            framing.note(h.name.as_bytes(), h.value);
            if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep = true;
                    } else if !token.is_empty() {
                        named.push(token);
                    }
                }
            }
        }
        let (decoder, framed) =
            Decoder::for_response(status, head_only, &framing).map_err(|e| ClientError::Parse(e.to_string()))?;
        // After a 101 the connection speaks another protocol: never reused.
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let keep_alive = framed && !switching && if version == Version::HTTP_10 { keep } else { !close };
        // Transfer-Encoding overrides Content-Length (RFC 9112 6.3): a stale
        // length must not reach the client, which gets the body re-framed.
        let drop_length = framing.transfer_encoding.is_some();
        let skip = |name: &str| {
            // A 101 says what it switched to: its `Upgrade` stays, though
            // hop-by-hop and named by its `Connection: Upgrade` (RFC 6455
            // 4.1: a client refuses a handshake without it).
            if switching && name.eq_ignore_ascii_case("upgrade") {
                return false;
            }
            is_hop_by_hop(name)
                || (drop_length && name.eq_ignore_ascii_case("content-length"))
                || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        };
        // Header values share the read buffer's memory instead of copying it.
        let base = self.buf.as_ptr() as usize;
        let ranges: Vec<(usize, usize, usize, usize)> = resp
            .headers
            .iter()
            .filter(|h| !skip(h.name))
            .map(|h| (h.name.as_ptr() as usize - base, h.name.len(), h.value.as_ptr() as usize - base, h.value.len()))
            .collect();
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(ranges.len());
        for &(n, nl, v, vl) in &ranges {
            let name = HeaderName::from_bytes(&head[n..n + nl]).map_err(|e| ClientError::Parse(e.to_string()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
                .map_err(|e| ClientError::Parse(format!("header {name}: {e}")))?;
            headers.append(name, value);
        }
        Ok(Some(ResponseHead { status, headers, decoder, keep_alive }))
    }

    /// Reads more bytes into the buffer for the body decoder.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(8 * 1024);
        let tcp = match &mut self.io {
            UpIo::Plain(tcp) => tcp,
            UpIo::Tls(tls) => {
                // Through the TLS layer (decrypted bytes may wait there).
                let mut chunk = [0u8; 8 * 1024];
                let mut rb = tokio::io::ReadBuf::new(&mut chunk);
                std::task::ready!(std::pin::Pin::new(tls).poll_read(cx, &mut rb))?;
                self.buf.extend_from_slice(rb.filled());
                return Poll::Ready(Ok(rb.filled().len()));
            }
        };
        loop {
            std::task::ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read_buf(&mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Hop-by-hop header names (RFC 9110 7.6.1), matched on raw bytes.
fn is_hop_by_hop(name: &str) -> bool {
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Writes the request line and headers, with framing for the body.
fn encode_head(parts: &http::request::Parts, body: &ProxyBody, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (k, v) in &parts.headers {
        if k == header::CONTENT_LENGTH || k == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        ProxyBody::Empty => {
            // Keep an explicit zero length (a bodiless POST needs it).
            if parts.headers.contains_key(header::CONTENT_LENGTH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
        }
        ProxyBody::Full(b) => {
            let n = b.as_ref().map_or(0, Bytes::len);
            let _ = write!(out, "content-length: {n}\r\n");
        }
        ProxyBody::Stream(s) => match s.size_hint().exact() {
            Some(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        },
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
