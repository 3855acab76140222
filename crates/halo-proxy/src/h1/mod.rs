//! The downstream HTTP/1.1 side, our own (as the upstream client is): one
//! task per connection reads a head (`head.rs`), hands the request to the
//! forwarding code, and writes the response as it streams, one exchange
//! after another (pipelined requests are answered in order).
//!
//! A request body is read by the connection task itself, concurrently
//! with the exchange, and passed to the request's [`crate::body::RequestBody`] through
//! a small channel (backpressure: the client is read only as fast as the
//! upstream takes it). What the forwarding code does not read is drained,
//! up to a limit, so the connection can be kept.
//!
//! Memory: an idle keep-alive connection holds no buffer. The read buffer
//! is allocated when bytes arrive and released when the exchange is over
//! and nothing pipelined is left; the write buffer likewise; the
//! per-request work lives in a box of its own only while the request runs.

mod head;

use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::body::{DownBody, RequestBody};
use crate::conn::{Conn, ReadHalf, WriteHalf};
use crate::decode::{Decoder, Step};
use crate::park::{Lot, Wake};
use crate::response::RespBody;
use crate::tunnel::Upgraded;
pub use head::UpgradeRequested;
use head::{Framing, Head};

/// What every connection of a listener shares.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// A head must arrive whole within this, counted from the end of the
    /// previous exchange (so it is also the keep-alive idle limit).
    pub head_timeout: Duration,
    pub max_header_bytes: usize,
    /// A client that takes none of a response for this long is closed
    /// (its upstream connection and in-flight place go with the response).
    pub send_timeout: Duration,
    /// A request body must arrive whole within this.
    pub body_timeout: Duration,
}

/// Longest wait for more of a request body.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// Most of an unread request body drained to keep the connection.
const DRAIN_MAX: u64 = 256 << 10;
/// Read buffer size while bytes arrive.
const READ_CHUNK: usize = 4096;
/// Past this much pending output, the write buffer is flushed.
const WRITE_HIGH: usize = 64 << 10;
/// Longest wait for a clean close (a TLS close_notify to a peer that
/// does not read).
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// While draining, an idle connection is closed after this long without
/// a request.
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// A connection quiet this long gives its buffers back (a busy one keeps
/// them: no allocation per request).
const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// Serves one connection until it closes or fails; once `stop` flips, the
/// next response closes it, or [`DRAIN_IDLE`] without a request does. The
/// close is a clean one (TLS sends close_notify, which strict clients
/// require), or the connection becomes a tunnel after a 101. With a `lot`,
/// a connection quiet after an exchange is parked there and this task
/// ends; the lot starts another (`woke` says why) when it has work.
pub async fn serve<H, F>(
    mut stream: Conn,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
    handler: H,
    lot: Option<Arc<Lot>>,
    woke: Wake,
) where
    H: Fn(Request<DownBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let mut buf = BytesMut::new();
    let ended = match woke {
        Wake::Expired => Ended::Close,
        Wake::Readable | Wake::Stop => {
            exchanges(&mut stream, &mut buf, settings, &mut stop, &handler, lot.is_some()).await
        }
    };
    match ended {
        Ended::Tunnel(upgraded) => {
            // Boxed: a tunnel's state is carried only by tunnels.
            let end = Box::pin(upgraded.run(stream, &buf)).await;
            tracing::debug!(%end, "tunnel closed");
        }
        Ended::Close => {
            let _ = tokio::time::timeout(CLOSE_WITHIN, stream.shutdown()).await;
        }
        Ended::Idle => {
            let Some(lot) = lot else { return };
            let again = lot.clone();
            let idle = settings.head_timeout.saturating_sub(IDLE_RELEASE);
            lot.park(stream, idle, Box::new(move |conn, woke| resume(conn, settings, stop, handler, again, woke)));
        }
    }
}

/// Serves a connection the lot hands back, in a task of its own.
fn resume<H, F>(conn: Conn, settings: Settings, stop: watch::Receiver<bool>, handler: H, lot: Arc<Lot>, woke: Wake)
where
    H: Fn(Request<DownBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    tokio::spawn(serve(conn, settings, stop, handler, Some(lot), woke));
}

/// How a connection's exchanges ended.
enum Ended {
    Close,
    /// A 101 made it a tunnel.
    Tunnel(Box<Upgraded>),
    /// Quiet after an exchange, its buffers given back: to be parked.
    Idle,
}

/// The exchanges of one connection, until it closes, becomes a tunnel, or
/// (with `park`) goes quiet.
async fn exchanges<H, F>(
    stream: &mut Conn,
    buf: &mut BytesMut,
    settings: Settings,
    stop: &mut watch::Receiver<bool>,
    handler: &H,
    park: bool,
) -> Ended
where
    H: Fn(Request<DownBody>) -> F,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    let mut out: Vec<u8> = Vec::new();
    loop {
        let idle = buf.is_empty();
        // Draining (shutdown, binary upgrade): an idle connection waits a
        // little for its next request, answered with `connection: close`;
        // closing it at once would race a request already on its way.
        let draining = *stop.borrow();
        let limit = if draining { settings.head_timeout.min(DRAIN_IDLE) } else { settings.head_timeout };
        let head = tokio::select! {
            r = tokio::time::timeout(limit, read_head(stream, buf, settings.max_header_bytes)) => r,
            _ = stop.wait_for(|s| *s), if idle && !draining => continue,
        };
        let head = match head {
            Ok(Ok(Some(h))) => h,
            Ok(Err(Some(refused))) => {
                let refusal = head::refusal(&refused);
                Box::pin(async {
                    if stream.write_all(&refusal).await.is_ok() {
                        let _ = stream.flush().await;
                    }
                })
                .await;
                return Ended::Close;
            }
            // Closed, failed, or silent past the head timeout.
            Ok(Ok(None)) | Ok(Err(None)) | Err(_) => return Ended::Close,
        };
        let keep = head.keep_alive && !*stop.borrow();
        // Not boxed: an idle connection leaves its task for the lot, so the
        // exchange's state inline costs nothing while idle, where a box cost
        // an allocation and a 2 KB copy per request (2.7% of the CPU).
        let head = Head { keep_alive: keep, ..head };
        let next = exchange(stream, buf, &mut out, handler, head, settings).await;
        match next {
            // Also when draining: the response said keep-alive, so the
            // client may send another request, which is answered with
            // `connection: close`.
            Next::Request => {}
            Next::Close => return Ended::Close,
            Next::Tunnel(upgraded) => return Ended::Tunnel(upgraded),
        }
        if out.capacity() > WRITE_HIGH {
            out = Vec::new();
        }
        if buf.is_empty() && !busy_within(stream, IDLE_RELEASE).await {
            // Nothing pipelined and nothing coming: hold no buffer while
            // idle, nor a task when there is a lot to park in.
            *buf = BytesMut::new();
            out = Vec::new();
            if park && !*stop.borrow() {
                return Ended::Idle;
            }
        }
    }
}

/// What a connection does after an exchange.
enum Next {
    /// Reads the next request.
    Request,
    Close,
    /// Becomes a tunnel (the response was a 101).
    Tunnel(Box<Upgraded>),
}

/// One request and its response; what the connection does next.
async fn exchange<H, F>(
    stream: &mut Conn,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    handler: &H,
    head: Head,
    settings: Settings,
) -> Next
where
    H: Fn(Request<DownBody>) -> F,
    F: Future<Output = Response<RespBody>> + Send + 'static,
{
    // `keep_alive` here is what this side decided: the client's wish, unless draining.
    let Head { request, body: decoder, keep_alive: keep, expects_continue } = head;
    if expects_continue {
        let sent = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        if sent.is_err() || stream.flush().await.is_err() {
            return Next::Close;
        }
    }
    let head_only = request.method() == Method::HEAD;
    let version = request.version();
    let (body, pump) = RequestBody::channel(&decoder);
    let fut = handler(request.map(|()| DownBody::H1(body)));
    let (mut rd, mut wr) = stream.split();
    let respond = async {
        let resp = fut.await;
        write_response(&mut wr, out, resp, head_only, version, keep, settings.send_timeout).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "response not delivered; closing the connection");
            Next::Close
        })
    };
    let read_body = async {
        match pump {
            Some(tx) => pump_body(&mut rd, buf, decoder, tx, settings.body_timeout).await,
            None => true,
        }
    };
    match tokio::join!(respond, read_body) {
        (next, true) => next,
        (_, false) => Next::Close,
    }
}

/// Whether bytes arrive on `stream` within `wait` (the next request of a
/// busy connection).
async fn busy_within(stream: &mut Conn, wait: Duration) -> bool {
    matches!(tokio::time::timeout(wait, stream.readable()).await, Ok(Ok(())))
}

/// Reads until a whole head is in `buf`. `Ok(None)`: closed before any
/// byte of a head; `Err(None)`: closed or failed mid-head.
async fn read_head(stream: &mut Conn, buf: &mut BytesMut, max: usize) -> Result<Option<Head>, Option<head::Refused>> {
    // How far the bytes are known to hold no end of head: each read scans
    // only what it added, and the head is parsed once, when it is whole
    // (a head sent a byte at a time costs no more than one sent at once).
    let mut scanned = 0;
    loop {
        if head::ends(buf, &mut scanned, max).map_err(Some)? {
            if let Some(h) = head::parse(buf, max).map_err(Some)? {
                return Ok(Some(h));
            }
        }
        if buf.capacity() == 0 {
            // Idle: wait for bytes before taking memory for them.
            stream.readable().await.map_err(|_| None)?;
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_CHUNK);
        }
        match stream.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Reads a request body off the connection into `tx`; once the request
/// no longer wants it, drains what is left (up to [`DRAIN_MAX`]). Returns
/// whether the connection can carry another request.
async fn pump_body(
    rd: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    mut decoder: Decoder,
    tx: mpsc::Sender<io::Result<Bytes>>,
    total: Duration,
) -> bool {
    // Each read waits at most BODY_IDLE, and the whole body `total`: a
    // client that sends a byte now and then cannot hold the request open.
    let deadline = tokio::time::Instant::now() + total;
    let mut wanted = true;
    let mut drained = 0u64;
    loop {
        match decoder.step(buf) {
            Err(e) => {
                if wanted {
                    let _ = tx.send(Err(io::Error::new(io::ErrorKind::InvalidData, e))).await;
                }
                return false;
            }
            Ok(Step::End) => return true,
            Ok(Step::Data(b)) => {
                let n = b.len() as u64;
                if wanted && tx.send(Ok(b)).await.is_err() {
                    wanted = false;
                }
                if !wanted {
                    drained += n;
                    if drained > DRAIN_MAX {
                        return false;
                    }
                }
            }
            Ok(Step::More) => {
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(READ_CHUNK * 2);
                }
                let by = deadline.min(tokio::time::Instant::now() + BODY_IDLE);
                let read = tokio::time::timeout_at(by, rd.read_buf(buf)).await;
                if !matches!(read, Ok(Ok(n)) if n > 0) {
                    if wanted {
                        let why = io::Error::new(io::ErrorKind::UnexpectedEof, "the client stopped sending the body");
                        let _ = tx.send(Err(why)).await;
                    }
                    return false;
                }
            }
        }
    }
}

/// Writes `resp`, frames ready at once going out with the head in one
/// write. Returns what the connection does next: a 101 carrying an
/// upstream connection becomes a tunnel.
async fn write_response(
    wr: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    mut resp: Response<RespBody>,
    head_only: bool,
    version: Version,
    keep_alive: bool,
    within: Duration,
) -> io::Result<Next> {
    let upgraded = resp.body_mut().take_upgrade();
    let exact = resp.body().size_hint().exact();
    // The proxy's own answer may ask to close (a refused request).
    let closing =
        resp.headers().get(http::header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let keep_alive = keep_alive && !closing;
    out.clear();
    let framing = head::encode(&mut resp, exact, head_only, version, keep_alive, out);
    let mut body = resp.into_body();
    if framing == Framing::None {
        send(wr, out, within).await?;
        flush(wr, within).await?;
        return Ok(match upgraded {
            Some(u) => Next::Tunnel(u),
            None => next(keep_alive),
        });
    }
    let mut sent = 0u64;
    loop {
        let frame = match poll_ready(&mut body) {
            Some(f) => f,
            None => {
                // Everything so far goes out before waiting on the upstream.
                if !out.is_empty() {
                    send(wr, out, within).await?;
                    out.clear();
                }
                flush(wr, within).await?;
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                // The client cannot be told; the connection ends short.
                tracing::debug!(error = %e, "response body failed; closing the connection");
                send(wr, out, within).await?;
                flush(wr, within).await?;
                return Ok(Next::Close);
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if framing == Framing::Chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if data.len() > WRITE_HIGH {
                    send(wr, out, within).await?;
                    out.clear();
                    send(wr, &data, within).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() > WRITE_HIGH {
                    send(wr, out, within).await?;
                    out.clear();
                }
            }
        }
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    send(wr, out, within).await?;
    flush(wr, within).await?;
    let complete = match framing {
        Framing::Length(n) => sent == n,
        _ => true,
    };
    Ok(next(keep_alive && complete && framing != Framing::Close))
}

/// Writes `bytes`, or fails once the client has taken none of them for
/// `within` (it stopped reading): the response, and the upstream
/// connection it holds, are let go.
async fn send(wr: &mut WriteHalf<'_>, bytes: &[u8], within: Duration) -> io::Result<()> {
    within_send_timeout(wr.write_all(bytes), within).await
}

async fn flush(wr: &mut WriteHalf<'_>, within: Duration) -> io::Result<()> {
    within_send_timeout(wr.flush(), within).await
}

/// `io`, given `within` to finish once it has to wait. Most writes finish
/// at once (the socket has room): they read no clock and arm no timer. The
/// timer, when one is needed, lives in a box: a connection's futures are
/// moved whole per request, and a timer inline would make each larger.
async fn within_send_timeout(io: impl Future<Output = io::Result<()>>, within: Duration) -> io::Result<()> {
    let mut io = std::pin::pin!(io);
    let first = io.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop()));
    if let Poll::Ready(r) = first {
        return r;
    }
    let mut timer = Box::pin(tokio::time::sleep(within));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = io.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn next(reusable: bool) -> Next {
    if reusable {
        Next::Request
    } else {
        Next::Close
    }
}

/// The next frame if it is ready now; `None` when it is not.
fn poll_ready(body: &mut RespBody) -> Option<Option<Result<Frame<Bytes>, crate::response::BodyError>>> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(f) => Some(f),
        Poll::Pending => None,
    }
}
