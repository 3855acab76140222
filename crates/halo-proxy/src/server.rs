//! The running proxy: listeners, the current snapshot, reloads, endpoint
//! updates and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::config::{self, Config, ConfigErrors, EndpointConfig};
use crate::forward::{self, Downstream};
use crate::metrics::ListenerStats;
use crate::registry::{Registry, Snapshot};

/// State shared by every connection of the proxy.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    /// The file reloads read, when the config came from a file.
    pub source: Option<PathBuf>,
    /// Serialises reloads and endpoint updates.
    update: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bind listener '{name}' on {addr}: {source}")]
    BindListener { name: String, addr: SocketAddr, source: std::io::Error },
    #[error("bind admin listener on {addr}: {source}")]
    BindAdmin { addr: SocketAddr, source: std::io::Error },
    #[error("start a worker thread: {source}")]
    StartWorker { source: std::io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from (the proxy was started from command-line flags)")]
    NoSource,
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("listeners or admin address changed ({0}); this needs a restart, the running config was kept")]
    ListenersChanged(String),
    #[error("no upstream named '{0}'")]
    UnknownUpstream(String),
    #[error("upstream '{0}' needs at least one endpoint")]
    NoEndpoints(String),
}

/// A running proxy. Dropping it does not stop it; call [`Proxy::shutdown`].
pub struct Proxy {
    shared: Arc<Shared>,
    /// Tells the workers to stop accepting and drain.
    stop: watch::Sender<bool>,
    /// Tells the workers to exit (after the grace period).
    halt: watch::Sender<bool>,
    drain: Arc<Drain>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    addrs: Vec<(String, SocketAddr)>,
    admin_addr: Option<SocketAddr>,
}

impl Proxy {
    /// Binds every listener (and the admin listener) and starts the worker
    /// threads. Must be called within a tokio runtime, which then runs the
    /// control tasks: admin listener and active health checks.
    pub async fn start(config: Config, source: Option<PathBuf>) -> Result<Arc<Proxy>, ProxyError> {
        let registry = Registry::default();
        registry.set_control(tokio::runtime::Handle::current());
        let config = Arc::new(config);
        let snapshot = registry.build(config.clone());
        let shared =
            Arc::new(Shared { snapshot: ArcSwap::from_pointee(snapshot), registry, source, update: Mutex::new(()) });
        let (stop, _) = watch::channel(false);
        let (halt, _) = watch::channel(false);
        let drain = Arc::new(Drain::default());
        // One socket per listener per worker in the per-core model (the kernel
        // spreads connections over them); one per listener when work-stealing.
        let sockets_per_listener = if config.work_stealing { 1 } else { config.workers.max(1) };
        let mut addrs = Vec::new();
        let mut per_worker: Vec<Vec<(Arc<str>, std::net::TcpListener)>> =
            (0..sockets_per_listener).map(|_| Vec::new()).collect();
        for l in &config.listeners {
            let err = |source| ProxyError::BindListener { name: l.name.clone(), addr: l.addr, source };
            let first = bind(l.addr, sockets_per_listener > 1).map_err(err)?;
            // Port 0 resolves on the first bind; the other workers join it.
            let local = first.local_addr().map_err(err)?;
            addrs.push((l.name.clone(), local));
            per_worker[0].push((l.name.as_str().into(), first));
            for w in per_worker.iter_mut().skip(1) {
                w.push((l.name.as_str().into(), bind(local, true).map_err(err)?));
            }
            tracing::info!(listener = %l.name, addr = %local, "listening");
        }
        let admin = match config.admin {
            Some(addr) => {
                let err = |source| ProxyError::BindAdmin { addr, source };
                Some(TcpListener::from_std(bind(addr, false).map_err(err)?).map_err(err)?)
            }
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let builder = Arc::new(http_builder(&config));
        let mut threads = Vec::new();
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let runtime = if config.work_stealing {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(config.workers.max(1));
                b
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            let w = Worker {
                listeners,
                shared: shared.clone(),
                builder: builder.clone(),
                drain: drain.clone(),
                stop: stop.subscribe(),
                halt: halt.subscribe(),
                per_core: !config.work_stealing,
            };
            threads.push(w.spawn(i, runtime).map_err(|source| ProxyError::StartWorker { source })?);
        }
        let proxy = Arc::new(Proxy { shared, stop, halt, drain, addrs, admin_addr, threads: Mutex::new(threads) });
        if let Some(l) = admin {
            tracing::info!(addr = ?admin_addr, "admin listening");
            tokio::spawn(crate::admin::serve(l, proxy.clone(), proxy.stop.subscribe()));
        }
        Ok(proxy)
    }

    /// Bound addresses of the listeners, by name.
    pub fn listener_addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.snapshot.load().config.clone()
    }

    /// Swaps in a new config. Health state, pooled connections and in-flight
    /// requests carry over; a config that changes listeners is refused.
    pub fn reload(&self, new: Config) -> Result<(), ReloadError> {
        let _g = self.shared.update.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config();
        let before: Vec<_> = old.listeners.iter().map(|l| (&l.name, l.addr)).collect();
        let after: Vec<_> = new.listeners.iter().map(|l| (&l.name, l.addr)).collect();
        if before != after || old.admin != new.admin {
            return Err(ReloadError::ListenersChanged(format!(
                "running {before:?} admin {:?}, file {after:?} admin {:?}",
                old.admin, new.admin
            )));
        }
        self.install(new);
        Ok(())
    }

    /// Re-reads the config file and reloads it.
    pub fn reload_from_source(&self) -> Result<(), ReloadError> {
        let path = self.shared.source.as_ref().ok_or(ReloadError::NoSource)?;
        let cfg = config::load(path)?;
        self.reload(cfg)?;
        tracing::info!(file = %path.display(), "config reloaded");
        Ok(())
    }

    /// Replaces the endpoints of one upstream: the stream of endpoint updates
    /// the cluster feeds the proxy with.
    pub fn set_endpoints(&self, upstream: &str, endpoints: Vec<EndpointConfig>) -> Result<(), ReloadError> {
        let _g = self.shared.update.lock().unwrap_or_else(|e| e.into_inner());
        let mut cfg = (*self.config()).clone();
        let u = cfg.upstreams.get_mut(upstream).ok_or_else(|| ReloadError::UnknownUpstream(upstream.into()))?;
        if endpoints.is_empty() {
            return Err(ReloadError::NoEndpoints(upstream.into()));
        }
        u.endpoints = endpoints;
        self.install(cfg);
        Ok(())
    }

    fn install(&self, cfg: Config) {
        let snap = self.shared.registry.build(Arc::new(cfg));
        self.shared.snapshot.store(Arc::new(snap));
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then
    /// returns. Idle keep-alive connections are closed at once.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stop.send(true);
        tracing::info!(connections = self.drain.count.load(Relaxed), grace = ?grace, "draining");
        if tokio::time::timeout(grace, self.drain.wait()).await.is_err() {
            tracing::warn!(left = self.drain.count.load(Relaxed), "grace period over; closing remaining connections");
        }
        let _ = self.halt.send(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Counts open downstream connections so shutdown can wait for them.
#[derive(Default)]
struct Drain {
    count: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

impl Drain {
    async fn wait(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn done(&self) {
        if self.count.fetch_sub(1, Relaxed) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// A non-blocking listening socket; `reuse_port` lets several workers bind
/// the same address.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    let std: std::net::TcpListener = socket.listen(4096)?.into_std()?;
    std.set_nonblocking(true)?;
    Ok(std)
}

/// One worker: a runtime on its own thread serving its listener sockets.
struct Worker {
    listeners: Vec<(Arc<str>, std::net::TcpListener)>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    drain: Arc<Drain>,
    stop: watch::Receiver<bool>,
    halt: watch::Receiver<bool>,
    /// Whether this worker is one single-threaded runtime (not work-stealing).
    per_core: bool,
}

impl Worker {
    fn spawn(self, index: usize, mut runtime: tokio::runtime::Builder) -> std::io::Result<std::thread::JoinHandle<()>> {
        let rt = runtime.enable_all().thread_name(format!("halo-worker-{index}")).build()?;
        std::thread::Builder::new().name(format!("halo-worker-{index}")).spawn(move || {
            let Worker { listeners, shared, builder, drain, stop, mut halt, per_core } = self;
            if per_core {
                crate::pool::set_worker(index);
            }
            rt.block_on(async move {
                for (name, l) in listeners {
                    let listener = match TcpListener::from_std(l) {
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
                        builder: builder.clone(),
                    };
                    tokio::spawn(accept_loop(listener, ctx, drain.clone(), stop.clone()));
                }
                let _ = halt.wait_for(|h| *h).await;
            });
        })
    }
}

fn http_builder(c: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(c.header_read_timeout.min(c.keepalive_idle))
        .max_buf_size(c.max_header_bytes)
        // One flattened write per response measured 2-3% less CPU per
        // request than writev on small messages (docs/benchmarks.md).
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(256));
    b
}

struct AcceptCtx {
    name: Arc<str>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stats: Arc<ListenerStats>,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptCtx, drain: Arc<Drain>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => serve(stream, peer, &ctx, drain.clone(), stop.clone()),
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    tracing::debug!(listener = %ctx.name, "stopped accepting");
}

fn serve(stream: TcpStream, peer: SocketAddr, ctx: &AcceptCtx, drain: Arc<Drain>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    ctx.stats.accepted.fetch_add(1, Relaxed);
    ctx.stats.active.fetch_add(1, Relaxed);
    drain.count.fetch_add(1, Relaxed);
    let stats = ctx.stats.clone();
    let builder = ctx.builder.clone();
    let shared = ctx.shared.clone();
    let span = tracing::debug_span!("conn", client.addr = %peer, listener = %ctx.name);
    let down = Arc::new(Downstream {
        listener: ctx.name.clone(),
        client: peer,
        client_ip: crate::headers::ClientIp::new(peer),
    });
    tokio::spawn(
        async move {
            let svc = service_fn(move |req| forward::handle(shared.clone(), down.clone(), req));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Finish the request in flight, then close (HTTP/2: GOAWAY).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with an error");
            }
            stats.active.fetch_sub(1, Relaxed);
            drain.done();
        }
        .instrument(span),
    );
}
