//! Listening sockets and the worker threads that serve them.
//!
//! Each worker runs its own runtime on its own thread and takes commands
//! (start accepting on a socket) over a channel, so listeners can be added
//! by a reload while traffic flows; a listener's accept loops stop when its
//! own stop signal flips, while its open connections finish normally.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::body::{DownBody, H2Body};
use crate::config::{Cidr, Config, ListenerProtocol};
use crate::conn::Conn;
use crate::forward::{self, Downstream};
use crate::h1;
use crate::metrics::ListenerStats;
use crate::open::Drain;
use crate::open::Open;
use crate::park::{Lot, Wake};
use crate::path::PathPolicy;
use crate::shared::Shared;
use halo_model::lock::LockExt;

/// What a worker is told to do.
pub enum Command {
    /// Accept on this socket until `stop` flips.
    Listen { name: Arc<str>, socket: std::net::TcpListener, stop: watch::Receiver<bool> },
}

/// One worker: a runtime on its own thread serving the sockets it is given.
pub struct Worker {
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub shared: Arc<Shared>,
    pub protocols: Arc<Protocols>,
    pub drain: Arc<Drain>,
    /// Flips on shutdown: connections finish their request and close.
    pub stop: watch::Receiver<bool>,
    /// Flips when the grace period is over: the worker exits.
    pub halt: watch::Receiver<bool>,
    /// Whether this worker is one single-threaded runtime (not work-stealing).
    pub per_core: bool,
}

impl Worker {
    pub fn spawn(
        self,
        index: usize,
        mut runtime: tokio::runtime::Builder,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let rt = runtime.enable_all().thread_name(format!("halo-worker-{index}")).build()?;
        std::thread::Builder::new().name(format!("halo-worker-{index}")).spawn(move || {
            let Worker { mut commands, shared, protocols, drain, stop, mut halt, per_core } = self;
            if per_core {
                crate::pool::set_worker(index);
            }
            rt.block_on(async move {
                let lot = Lot::start(stop.clone());
                loop {
                    tokio::select! {
                        cmd = commands.recv() => match cmd {
                            Some(Command::Listen { name, socket, stop: listener_stop }) => {
                                let listener = match TcpListener::from_std(socket) {
                                    Ok(l) => l,
                                    Err(e) => {
                                        tracing::error!(listener = %name, error = %e, "cannot register listener");
                                        continue;
                                    }
                                };
                                let ctx = AcceptCtx {
                                    stats: shared.registry.listener(&name),
                                    name,
                                    shared: shared.clone(),
                                    protocols: protocols.clone(),
                                    drain: drain.clone(),
                                    stop: stop.clone(),
                                    lot: lot.clone(),
                                };
                                tokio::spawn(accept_loop(listener, ctx, listener_stop));
                            }
                            // The proxy is gone: nothing more will come; wait for the halt signal.
                            None => break,
                        },
                        _ = halt.wait_for(|h| *h) => return,
                    }
                }
                let _ = halt.wait_for(|h| *h).await;
            });
        })
    }
}

/// How downstream connections are served: HTTP/1.1 by our codec
/// (`h1`), HTTP/2 (prior knowledge, h2c) by hyper.
pub struct Protocols {
    pub h1: h1::Settings,
    pub h2: http2::Builder<TokioExecutor>,
    /// An HTTP/2 connection that started no stream for this long, or is
    /// older than `h2_max_age`, is closed gracefully.
    pub h2_idle: Duration,
    pub h2_max_age: Duration,
}

pub fn protocols(c: &Config) -> Protocols {
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20))).max_concurrent_streams(Some(256));
    let h1 = h1::Settings {
        head_timeout: c.header_read_timeout.min(c.keepalive_idle),
        max_header_bytes: c.max_header_bytes,
        send_timeout: c.send_timeout,
        body_timeout: c.request_body_timeout,
    };
    Protocols { h1, h2, h2_idle: c.keepalive_idle, h2_max_age: c.max_connection_age }
}

/// Whether the client opens with the HTTP/2 connection preface (looked at
/// without reading it, so either protocol gets the stream whole).
async fn is_h2(stream: &TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut b = [0u8; 24];
    loop {
        let n = stream.peek(&mut b).await?;
        if n == 0 || b[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of a preface so far: wait for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct AcceptCtx {
    name: Arc<str>,
    shared: Arc<Shared>,
    protocols: Arc<Protocols>,
    stats: Arc<ListenerStats>,
    drain: Arc<Drain>,
    stop: watch::Receiver<bool>,
    /// The worker's idle keep-alive connections.
    lot: Arc<Lot>,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptCtx, mut listener_stop: watch::Receiver<bool>) {
    let mut stop = ctx.stop.clone();
    let conns = &ctx.stats.conns;
    'accept: loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // A slot (max_connections) before it is served. At the
                    // limit this loop holds the one connection, unread, and
                    // accepts no more: the rest wait in the kernel's queue.
                    let mut paused = false;
                    while !conns.try_open() {
                        if !std::mem::replace(&mut paused, true) {
                            conns.paused.fetch_add(1, Relaxed);
                        }
                        tokio::select! {
                            _ = conns.wait() => {}
                            _ = async { let _ = stop.wait_for(|s| *s).await; } => break 'accept,
                            _ = async { let _ = listener_stop.wait_for(|s| *s).await; } => break 'accept,
                        }
                    }
                    serve(stream, peer, &ctx)
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            _ = async { let _ = listener_stop.wait_for(|s| *s).await; } => break,
        }
    }
    tracing::debug!(listener = %ctx.name, "stopped accepting");
}

/// Serves an accepted connection, which holds the slot taken for it.
fn serve(stream: TcpStream, peer: SocketAddr, ctx: &AcceptCtx) {
    let stop = ctx.stop.clone();
    let _ = stream.set_nodelay(true);
    // Counted until the connection is gone, whichever task (or the lot)
    // holds it then.
    let open = Open::new(ctx.stats.clone(), ctx.drain.clone());
    let stats = ctx.stats.clone();
    let protocols = ctx.protocols.clone();
    let shared = ctx.shared.clone();
    // The listener's current settings: a reload may change them.
    let (protocol, proxy_from, paths) =
        match shared.snapshot.load().config.listeners.iter().find(|l| *l.name == *ctx.name) {
            Some(l) => (l.protocol.clone(), l.proxy_protocol_from.clone(), l.paths),
            None => (ListenerProtocol::Http, Vec::new(), PathPolicy::default()),
        };
    let span = tracing::debug_span!("conn", client.addr = %peer, listener = %ctx.name);
    let conn =
        Accepted { stream, peer, listener: ctx.name.clone(), protocol, proxy_from, paths, open, lot: ctx.lot.clone() };
    tokio::spawn(async move { conn.serve(&shared, &stats, &protocols, stop).await }.instrument(span));
}

/// An accepted connection and the settings of its listener.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    protocol: ListenerProtocol,
    proxy_from: Vec<Cidr>,
    paths: PathPolicy,
    open: Open,
    lot: Arc<Lot>,
}

impl Accepted {
    async fn serve(
        self,
        shared: &Arc<Shared>,
        stats: &Arc<ListenerStats>,
        protocols: &Protocols,
        stop: watch::Receiver<bool>,
    ) {
        let Accepted { mut stream, peer, listener, protocol, proxy_from, paths, open, lot } = self;
        let Some(client) = proxy_header(&mut stream, peer, &protocol, &proxy_from, protocols, stats).await else {
            return;
        };
        let tls = matches!(protocol, ListenerProtocol::Https(_));
        let down = || {
            Arc::new(Downstream {
                listener,
                stats: stats.clone(),
                client,
                client_ip: crate::headers::ClientIp::new(client, tls),
                paths,
                _open: open,
            })
        };
        match protocol {
            ListenerProtocol::Tcp(fwd) => {
                let down = down();
                Box::pin(crate::tcp::serve(stream, client, shared, &fwd, stats)).await;
                drop(down);
            }
            // Boxed, as everything after the accept: the task holds only
            // the state of the protocol in use, for as long as it is used.
            ListenerProtocol::Http => {
                Box::pin(serve_http(Conn::Plain(stream), down(), shared.clone(), protocols, stop, lot)).await
            }
            ListenerProtocol::Https(t) => {
                // Boxed, and gone once done: a TLS handshake's state (and
                // its result, until boxed) is over a kilobyte, which every
                // connection's task would otherwise hold for its whole life.
                let conn = Box::pin(tls_handshake(stream, &t, protocols.h1.head_timeout, stats)).await;
                drop(t);
                if let Some(conn) = conn {
                    Box::pin(serve_http(conn, down(), shared.clone(), protocols, stop, lot)).await
                }
            }
        }
    }
}

/// The TLS connection, once its handshake is done within `within`.
async fn tls_handshake(
    stream: TcpStream,
    t: &crate::config::TlsListener,
    within: Duration,
    stats: &ListenerStats,
) -> Option<Conn> {
    match tokio::time::timeout(within, t.acceptor().accept(stream)).await {
        Ok(Ok(s)) => {
            stats.tls_handshakes.fetch_add(1, Relaxed);
            Some(Conn::Tls(Box::new(s)))
        }
        Ok(Err(e)) => {
            stats.tls_handshake_failures.fetch_add(1, Relaxed);
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            stats.tls_handshake_failures.fetch_add(1, Relaxed);
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The client's address: the connection's own, or what a trusted
/// source's PROXY protocol header says; `None` when the connection is
/// refused (a header missing from a trusted source, malformed, or sent
/// by an untrusted one). A tcp listener does not look at untrusted
/// connections (the server may speak first); an upstream that wants the
/// client address gets halo's own header first, so a forged one is data.
async fn proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    protocol: &ListenerProtocol,
    from: &[Cidr],
    protocols: &Protocols,
    stats: &ListenerStats,
) -> Option<SocketAddr> {
    if from.is_empty() {
        return Some(peer);
    }
    let trusted = from.iter().any(|c| c.contains(peer.ip()));
    if !trusted && matches!(protocol, ListenerProtocol::Tcp(_)) {
        return Some(peer);
    }
    // Boxed as the TLS handshake: only while the header is read.
    let read =
        Box::pin(tokio::time::timeout(protocols.h1.head_timeout, crate::proxy_protocol::accept(stream, peer, trusted)));
    match read.await {
        Ok(Ok(client)) => Some(client.unwrap_or(peer)),
        Ok(Err(e)) => {
            stats.proxy_protocol_refused.fetch_add(1, Relaxed);
            tracing::warn!(client.addr = %peer, error = %e, "connection refused");
            None
        }
        Err(_) => {
            stats.proxy_protocol_refused.fetch_add(1, Relaxed);
            tracing::debug!(client.addr = %peer, "no PROXY protocol header in time");
            None
        }
    }
}

/// One HTTP connection: HTTP/1.1 by our codec, or HTTP/2 when the client
/// opens with the preface (plain) or chose `h2` by ALPN (TLS).
async fn serve_http(
    stream: Conn,
    down: Arc<Downstream>,
    shared: Arc<Shared>,
    protocols: &Protocols,
    mut stop: watch::Receiver<bool>,
    lot: Arc<Lot>,
) {
    let peer = down.client;
    let h2 = match &stream {
        Conn::Plain(s) => tokio::time::timeout(protocols.h1.head_timeout, is_h2(s)).await,
        Conn::Tls(s) => Ok(Ok(s.get_ref().1.alpn_protocol() == Some(b"h2"))),
    };
    match h2 {
        Ok(Ok(false)) => {
            let handler = move |req| {
                let (shared, down) = (shared.clone(), down.clone());
                async move {
                    match forward::handle(shared, down, req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    }
                }
            };
            // Boxed, as the HTTP/2 side: the task holds only the
            // protocol in use.
            Box::pin(h1::serve(stream, protocols.h1, stop, handler, Some(lot), Wake::Readable)).await;
        }
        Ok(Ok(true)) => {
            let born = tokio::time::Instant::now();
            let last = Arc::new(std::sync::Mutex::new(born));
            let seen = last.clone();
            let body_within = protocols.h1.body_timeout;
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                *seen.locked() = tokio::time::Instant::now();
                forward::handle(shared.clone(), down.clone(), req.map(|b| DownBody::H2(H2Body::new(b, body_within))))
            });
            let mut conn = Box::pin(protocols.h2.serve_connection(TokioIo::new(stream), svc));
            // Idle (no new stream) or old enough: retired like a stop.
            let (idle, max_age) = (protocols.h2_idle, protocols.h2_max_age);
            let retire = async {
                loop {
                    let quiet_since = *last.locked();
                    let at = (quiet_since + idle).min(born + max_age);
                    if tokio::time::Instant::now() >= at {
                        return;
                    }
                    tokio::time::sleep_until(at).await;
                }
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish the streams in flight, then close (GOAWAY).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = retire => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with an error");
            }
        }
        // Closed, failed or silent before saying which protocol.
        _ => {}
    }
}
