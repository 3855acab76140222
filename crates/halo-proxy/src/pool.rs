//! Per-endpoint upstream connection pool.
//!
//! HTTP/1.1 connections (our own client, [`crate::client`]) are reused LIFO (the warmest first), capped per
//! endpoint (busy plus idle), closed after an idle timeout, and checked before
//! reuse so that a connection the upstream closed is never handed out. With
//! HTTP/2 upstreams one multiplexed connection per endpoint is shared.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::client::H1Conn;
use crate::config::{PoolConfig, UpstreamProtocol, UpstreamTls};
pub use crate::error::ConnectError;
use crate::tls::client::UpIo;
use halo_model::lock::LockExt;

/// Idle lists per endpoint; workers beyond this share lists.
const IDLE_SLOTS: usize = 16;
/// A pooled connection idle this long gives its buffers back.
const BUFFERS_KEPT: Duration = Duration::from_secs(1);

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `index` (per-core mode only: with
/// work stealing, tasks move between threads and all share list 0).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index % IDLE_SLOTS));
}

fn worker_slot() -> usize {
    WORKER.with(|w| w.get())
}

pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    tls: Option<Arc<UpstreamTls>>,
    /// Idle connections by worker: a connection is registered with the
    /// reactor of the worker that opened it, so it is reused there; other
    /// workers take it only when the pool is at its cap.
    idle: Box<[Mutex<Vec<Idle>>]>,
    idle_timeout: Mutex<Duration>,
    permits: Arc<Semaphore>,
    cap: AtomicUsize,
    released: Notify,
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// Open upstream connections (for metrics).
    open: Arc<AtomicUsize>,
}

struct Idle {
    conn: H1Conn,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// A connection checked out of the pool.
pub struct Pooled {
    pub sender: Sender,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Inner>,
    /// Whether this connection served a request before (a stale-connection
    /// failure on a reused connection is worth one more try).
    pub reused: bool,
}

pub enum Sender {
    H1(H1Conn),
    H2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    pub fn new(addr: SocketAddr, cfg: &PoolConfig, protocol: UpstreamProtocol, tls: Option<Arc<UpstreamTls>>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                addr,
                protocol,
                tls,
                idle: (0..IDLE_SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
                idle_timeout: Mutex::new(cfg.idle_timeout),
                permits: Arc::new(Semaphore::new(cfg.max_per_endpoint)),
                cap: AtomicUsize::new(cfg.max_per_endpoint),
                released: Notify::new(),
                h2: Mutex::new(None),
                open: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Applies new settings from a reload without dropping connections.
    pub fn reconfigure(&self, cfg: &PoolConfig) {
        *self.inner.idle_timeout.locked() = cfg.idle_timeout;
        let old = self.inner.cap.swap(cfg.max_per_endpoint, Relaxed);
        if cfg.max_per_endpoint > old {
            self.inner.permits.add_permits(cfg.max_per_endpoint - old);
        } else {
            // Permits in use come back later; forget what can be forgotten now
            // and the rest as connections close.
            let n = self.inner.permits.forget_permits(old - cfg.max_per_endpoint);
            for _ in n..old - cfg.max_per_endpoint {
                let permits = self.inner.permits.clone();
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_owned().await {
                        p.forget();
                    }
                });
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.inner.idle.iter().map(|l| l.lock().map_or(0, |v| v.len())).sum()
    }

    /// A ready connection: an idle one when there is one, else a new one.
    pub async fn get(&self, connect_timeout: Duration) -> Result<Pooled, ConnectError> {
        if self.inner.protocol == UpstreamProtocol::Http2 {
            return self.get_h2(connect_timeout).await;
        }
        let deadline = Instant::now() + connect_timeout;
        loop {
            if let Some(p) = self.take_idle(false) {
                return Ok(p);
            }
            let permit = match self.inner.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the cap: an idle connection of another worker
                    // beats waiting.
                    if let Some(p) = self.take_idle(true) {
                        return Ok(p);
                    }
                    let notified = self.inner.released.notified();
                    tokio::select! {
                        p = self.inner.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return Err(ConnectError::PoolFull(self.inner.addr)),
                        },
                        _ = notified => continue,
                        _ = tokio::time::sleep_until(deadline) => return Err(ConnectError::PoolFull(self.inner.addr)),
                    }
                }
            };
            let stream = self.connect(deadline).await?;
            return Ok(Pooled {
                sender: Sender::H1(H1Conn::new(stream, self.inner.open.clone())),
                permit: Some(permit),
                pool: self.inner.clone(),
                reused: false,
            });
        }
    }

    fn spawn_conn<F>(&self, conn: F)
    where
        F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let open = self.inner.open.clone();
        open.fetch_add(1, Relaxed);
        let addr = self.inner.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with an error");
            }
            open.fetch_sub(1, Relaxed);
        });
    }

    async fn connect(&self, deadline: Instant) -> Result<UpIo, ConnectError> {
        let addr = self.inner.addr;
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(source)) => return Err(ConnectError::Connect { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.inner.tls else { return Ok(UpIo::Plain(tcp)) };
        match tokio::time::timeout_at(deadline, tls.connect(tcp, addr)).await {
            Err(_) => Err(ConnectError::Timeout(addr)),
            Ok(Err(source)) => Err(ConnectError::Tls { addr, source }),
            Ok(Ok(io)) => Ok(io),
        }
    }

    /// Closes idle connections older than the idle timeout, and has those
    /// idle for [`BUFFERS_KEPT`] give their buffers back (called about once
    /// a second, so an idle pool holds neither sockets forever nor memory
    /// while it waits; a busy one keeps its buffers).
    pub fn reap_idle(&self) {
        let timeout = *self.inner.idle_timeout.locked();
        for list in self.inner.idle.iter() {
            list.locked().retain_mut(|c| {
                let idle = c.since.elapsed();
                if idle >= BUFFERS_KEPT {
                    c.conn.release_buffers();
                }
                idle <= timeout
            });
        }
    }

    /// An idle connection of this worker, or of any worker with `steal`.
    fn take_idle(&self, steal: bool) -> Option<Pooled> {
        let own = worker_slot();
        let others = (0..IDLE_SLOTS).filter(|i| *i != own).take(if steal { IDLE_SLOTS } else { 0 });
        std::iter::once(own).chain(others).find_map(|i| self.take_idle_from(i))
    }

    fn take_idle_from(&self, slot: usize) -> Option<Pooled> {
        let timeout = *self.inner.idle_timeout.locked();
        let mut idle = self.inner.idle[slot].locked();
        while let Some(mut c) = idle.pop() {
            if c.since.elapsed() > timeout || !c.conn.is_usable() {
                continue;
            }
            return Some(Pooled {
                sender: Sender::H1(c.conn),
                permit: Some(c.permit),
                pool: self.inner.clone(),
                reused: true,
            });
        }
        None
    }

    async fn get_h2(&self, connect_timeout: Duration) -> Result<Pooled, ConnectError> {
        let existing = self.inner.h2.locked().clone();
        if let Some(s) = existing.filter(|s| !s.is_closed()) {
            return Ok(Pooled { sender: Sender::H2(s), permit: None, pool: self.inner.clone(), reused: true });
        }
        let stream = self.connect(Instant::now() + connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Handshake { addr: self.inner.addr, source })?;
        self.spawn_conn(conn);
        *self.inner.h2.locked() = Some(sender.clone());
        Ok(Pooled { sender: Sender::H2(sender), permit: None, pool: self.inner.clone(), reused: false })
    }
}

impl Pooled {
    /// The HTTP/1.1 connection, when this is one.
    pub fn h1(&mut self) -> Option<&mut H1Conn> {
        match &mut self.sender {
            Sender::H1(c) => Some(c),
            Sender::H2(_) => None,
        }
    }

    /// The HTTP/1.1 connection itself, leaving the pool for good (a
    /// tunnel after a 101).
    pub fn into_h1(self) -> Option<H1Conn> {
        match self.sender {
            Sender::H1(c) => Some(c),
            Sender::H2(_) => None,
        }
    }

    /// Gives a connection whose exchange completed cleanly back for reuse.
    pub fn release(self) {
        let Pooled { sender, permit, pool, .. } = self;
        let (Sender::H1(conn), Some(permit)) = (sender, permit) else { return };
        let timeout = *pool.idle_timeout.locked();
        {
            let mut idle = pool.idle[worker_slot()].locked();
            // Drop the coldest connections once they outlived the idle timeout.
            while idle.first().is_some_and(|c| c.since.elapsed() > timeout) {
                idle.remove(0);
            }
            idle.push(Idle { conn, permit, since: Instant::now() });
        }
        pool.released.notify_one();
    }
}
