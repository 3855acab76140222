//! The running proxy: listeners, the current snapshot, reloads, endpoint
//! updates and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use std::os::fd::OwnedFd;

use crate::bind::{bind, bind_set, BoundSet, Claim};
use crate::config::{self, Config, ConfigErrors, EndpointConfig, ListenerConfig, ListenerProtocol};
use crate::handover::{Inherited, InheritedListener, ListenerFds, Manifest};
use crate::listener::{protocols, Command, Worker};
use crate::open::Drain;
use crate::registry::Registry;
use crate::shared::Shared;
use halo_model::lock::LockExt;

pub(crate) mod admin;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    // The io error is in the message (not a `source`), so it is printed
    // once however the error is shown.
    #[error("bind listener '{name}' on {addr}: {error}")]
    BindListener { name: String, addr: SocketAddr, error: std::io::Error },
    #[error("bind admin listener on {addr}: {error}")]
    BindAdmin { addr: SocketAddr, error: std::io::Error },
    #[error("start a worker thread: {error}")]
    StartWorker { error: std::io::Error },
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from (the proxy was started from command-line flags)")]
    NoSource,
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("the admin address changed ({0}); this needs a restart, the running config was kept")]
    AdminChanged(String),
    #[error("bind new listener '{name}' on {addr}: {error}; the running config was kept")]
    BindListener { name: String, addr: SocketAddr, error: std::io::Error },
    #[error("no upstream named '{0}'")]
    UnknownUpstream(String),
}

/// A running proxy. Dropping it does not stop it; call [`Proxy::shutdown`].
/// One upstream's counters ([`Proxy::upstream_totals`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTotals {
    pub name: String,
    pub requests: u64,
    /// 5xx, or an error the proxy answered for.
    pub failed: u64,
    /// Requests per bucket of [`crate::metrics::BUCKETS`], then +Inf.
    pub latency: Vec<u64>,
    /// The sum of their latencies, in microseconds.
    pub latency_sum_us: u64,
    /// Requests held now for a first endpoint.
    pub waiting: u64,
}

pub struct Proxy {
    shared: Arc<Shared>,
    /// Tells the workers' connections to finish and close.
    stop: watch::Sender<bool>,
    /// Tells the workers to exit (after the grace period).
    halt: watch::Sender<bool>,
    drain: Arc<Drain>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    workers: Vec<mpsc::UnboundedSender<Command>>,
    listeners: Mutex<Vec<ListenerHandle>>,
    admin_addr: Option<SocketAddr>,
    /// The admin socket (a duplicate of the one served), to hand over.
    admin_socket: Option<std::net::TcpListener>,
    /// While paused: listeners bound but not served yet ([`Proxy::resume`]).
    paused: Mutex<Option<Vec<(ListenerConfig, BoundSet)>>>,
}

/// A listener being served: its configured and bound addresses and the
/// switch that stops its accept loops.
struct ListenerHandle {
    name: String,
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    /// The hold on the address, released with the listener.
    claim: Option<Claim>,
    /// Duplicates of the workers' sockets, to hand over.
    sockets: Vec<std::net::TcpListener>,
}

impl Proxy {
    /// Binds every listener (and the admin listener) and starts the worker
    /// threads. Must be called within a tokio runtime, which then runs the
    /// control tasks: admin listener and active health checks.
    pub async fn start(config: Config, source: Option<PathBuf>) -> Result<Arc<Proxy>, ProxyError> {
        Self::start_inherited(config, source, None, false).await
    }

    /// [`Proxy::start`] on the sockets an old process handed over
    /// (binary upgrade): a listener whose name and address it had takes
    /// its sockets and address claim (more are bound if this process has
    /// more workers); the admin address likewise; endpoints it knew start
    /// with the health it had (also those fed later). `paused`: the
    /// listeners accept only after [`Proxy::resume`] (the old process
    /// serves until then).
    pub async fn start_inherited(
        config: Config,
        source: Option<PathBuf>,
        mut inherited: Option<&mut Inherited>,
        paused: bool,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let registry = Registry::default();
        if let Some(i) = inherited.as_deref_mut() {
            registry.set_restores(std::mem::take(&mut i.endpoints));
        }
        registry.set_control(tokio::runtime::Handle::current());
        let config = Arc::new(config);
        let snapshot = registry.build(config.clone());
        let certificates = config.clone();
        let shared =
            Arc::new(Shared { snapshot: ArcSwap::from_pointee(snapshot), registry, source, update: Mutex::new(()) });
        watch_certificates(&shared, &certificates);
        // Bind everything before starting anything, so a failed bind leaves
        // nothing half-started.
        let n = sockets_per_listener(&config);
        let mut bound = Vec::new();
        for l in &config.listeners {
            let err = |error| ProxyError::BindListener { name: l.name.clone(), addr: l.addr, error };
            let old = inherited.as_deref_mut().and_then(|i| i.listeners.remove(&(l.name.clone(), l.addr)));
            let set = match old {
                Some(old) => take_over(old, n, l.freebind).map_err(err)?,
                None => bind_set(l.addr, n, l.freebind).map_err(err)?,
            };
            bound.push((l, set));
        }
        let (admin, admin_socket) = match config.admin {
            Some(addr) => {
                let err = |error| ProxyError::BindAdmin { addr, error };
                let old = inherited.and_then(|i| i.admin.take()).filter(|(a, _)| *a == addr);
                let std = match old {
                    Some((_, s)) => s,
                    None => bind(addr, false, false).map_err(err)?,
                };
                let dup = std.try_clone().map_err(err)?;
                (Some(TcpListener::from_std(std).map_err(err)?), Some(dup))
            }
            None => (None, None),
        };

        let (stop, _) = watch::channel(false);
        let (halt, _) = watch::channel(false);
        let drain = Arc::new(Drain::default());
        let protocols = Arc::new(protocols(&config));
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        for i in 0..n {
            let runtime = if config.work_stealing {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(config.workers.max(1));
                b
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let w = Worker {
                commands: rx,
                shared: shared.clone(),
                protocols: protocols.clone(),
                drain: drain.clone(),
                stop: stop.subscribe(),
                halt: halt.subscribe(),
                per_core: !config.work_stealing,
            };
            threads.push(w.spawn(i, runtime).map_err(|error| ProxyError::StartWorker { error })?);
            workers.push(tx);
        }
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let proxy = Arc::new(Proxy {
            shared,
            stop,
            halt,
            drain,
            threads: Mutex::new(threads),
            workers,
            listeners: Mutex::new(Vec::new()),
            admin_addr,
            admin_socket,
            paused: Mutex::new(paused.then(Vec::new)),
        });
        for (l, set) in bound {
            proxy.serve_or_hold(l, set);
        }
        if let Some(l) = admin {
            if let Some(addr) = admin_addr {
                tracing::info!(%addr, "admin listening");
            }
            proxy.shared.registry.spawn_control(admin::serve(l, proxy.clone(), proxy.stop.subscribe()));
        }
        Ok(proxy)
    }

    /// Hands one socket of a listener to each worker.
    fn serve_listener(&self, l: &ListenerConfig, set: BoundSet) {
        let BoundSet { local: bound, sockets, claim } = set;
        let (stop, _) = watch::channel(false);
        let name: Arc<str> = l.name.as_str().into();
        let mut dups = Vec::new();
        for (tx, socket) in self.workers.iter().zip(sockets) {
            match socket.try_clone() {
                Ok(d) => dups.push(d),
                Err(e) => tracing::warn!(listener = %l.name, error = %e, "cannot keep a socket for a binary upgrade"),
            }
            let _ = tx.send(Command::Listen { name: name.clone(), socket, stop: stop.subscribe() });
        }
        tracing::info!(listener = %l.name, addr = %bound, "listening");
        let handle = ListenerHandle { name: l.name.clone(), configured: l.addr, bound, stop, claim, sockets: dups };
        self.listeners.locked().push(handle);
    }

    /// What a new process needs to take over (binary upgrade): the
    /// listening sockets, address claims and admin socket (duplicated
    /// descriptors, in the manifest's order) and the endpoints' health.
    /// `extra` sockets (the node API) go last, by name.
    pub fn handover(&self, extra: &[(String, &std::net::TcpListener)]) -> std::io::Result<(Manifest, Vec<OwnedFd>)> {
        let mut m = Manifest { pid: std::process::id(), ..Manifest::default() };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for l in self.listeners.locked().iter() {
            for s in &l.sockets {
                fds.push(s.try_clone()?.into());
            }
            if let Some(c) = &l.claim {
                fds.push(c.file().try_clone()?.into());
            }
            m.listeners.push(ListenerFds {
                name: l.name.clone(),
                addr: l.configured,
                bound: l.bound,
                sockets: l.sockets.len(),
                claim: l.claim.is_some(),
            });
        }
        if let (Some(a), Some(s)) = (self.admin_addr, &self.admin_socket) {
            m.admin = Some(self.config().admin.unwrap_or(a));
            fds.push(s.try_clone()?.into());
        }
        for (name, s) in extra {
            m.extra.push((name.clone(), s.local_addr()?));
            fds.push(s.try_clone()?.into());
        }
        let now = crate::util::now_ms();
        m.endpoints = self.shared.registry.endpoints().iter().map(|e| e.export(now)).collect();
        Ok((m, fds))
    }

    /// Starts accepting on the listeners of a paused start.
    pub fn resume(&self) {
        let paused = self.paused.locked().take();
        for (l, set) in paused.into_iter().flatten() {
            self.serve_listener(&l, set);
        }
    }

    /// Serves a bound listener, or holds it until [`Proxy::resume`] while
    /// paused.
    fn serve_or_hold(&self, l: &ListenerConfig, set: BoundSet) {
        let mut paused = self.paused.locked();
        match paused.as_mut() {
            Some(held) => held.push((l.clone(), set)),
            None => {
                drop(paused);
                self.serve_listener(l, set);
            }
        }
    }

    /// Whether `upstream` has an endpoint that takes traffic now.
    pub fn has_available_endpoint(&self, upstream: &str) -> bool {
        let snap = self.shared.snapshot.load();
        let now = crate::util::now_ms();
        snap.groups.get(upstream).is_some_and(|g| g.load().endpoints.iter().any(|e| e.available(now)))
    }

    /// Bound addresses of the listeners, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        let ls = self.listeners.locked();
        ls.iter().map(|l| (l.name.clone(), l.bound)).collect()
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
    /// requests carry over. Listeners that appear are bound first (a failed
    /// bind refuses the whole reload); listeners that disappear stop
    /// accepting while their open connections finish.
    pub fn reload(&self, new: Config) -> Result<(), ReloadError> {
        let _g = self.shared.update.locked();
        let old = self.config();
        if old.admin != new.admin {
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
            return Err(ReloadError::AdminChanged(format!("running {}, file {}", show(old.admin), show(new.admin))));
        }
        let n = sockets_per_listener(&old);
        // Served, and (during a paused start) bound and held.
        let running: Vec<(String, SocketAddr)> = {
            let ls = self.listeners.locked();
            let held = self.paused.locked();
            let held = held.iter().flatten().map(|(l, _)| (l.name.clone(), l.addr));
            ls.iter().map(|l| (l.name.clone(), l.configured)).chain(held).collect()
        };
        let mut added = Vec::new();
        for l in new.listeners.iter().filter(|l| !running.contains(&(l.name.clone(), l.addr))) {
            let set = bind_set(l.addr, n, l.freebind).map_err(|error| ReloadError::BindListener {
                name: l.name.clone(),
                addr: l.addr,
                error,
            })?;
            added.push((l.clone(), set));
        }
        self.install(new.clone());
        {
            let mut ls = self.listeners.locked();
            ls.retain(|h| {
                let keep = new.listeners.iter().any(|l| l.name == h.name && l.addr == h.configured);
                if !keep {
                    tracing::info!(listener = %h.name, addr = %h.bound, "listener removed; its connections finish");
                    let _ = h.stop.send(true);
                }
                keep
            });
            let mut held = self.paused.locked();
            if let Some(held) = held.as_mut() {
                held.retain(|(h, _)| new.listeners.iter().any(|l| l.name == h.name && l.addr == h.addr));
            }
        }
        for (l, set) in added {
            self.serve_or_hold(&l, set);
        }
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
    /// the cluster feeds the proxy with. Only that upstream's group is
    /// swapped (routes and every other upstream stay as they are), endpoint
    /// state (health, pools) is kept for the addresses that stay, and an
    /// empty set is valid: its routes answer 503 naming the upstream.
    /// [`Proxy::config`] keeps the endpoints of the last reload.
    pub fn set_endpoints(&self, upstream: &str, endpoints: Vec<EndpointConfig>) -> Result<(), ReloadError> {
        let _g = self.shared.update.locked();
        let snap = self.shared.snapshot.load();
        let slot = snap.groups.get(upstream).ok_or_else(|| ReloadError::UnknownUpstream(upstream.into()))?;
        let mut u = (*slot.load().cfg).clone();
        u.endpoints = endpoints;
        let group = Arc::new(self.shared.registry.regroup(Arc::new(u)));
        slot.store(group.clone());
        group.stats.changed.notify_waiters();
        Ok(())
    }

    /// Notified when a request starts waiting for an upstream with no
    /// endpoint to get one ([`UpstreamConfig::cold_start`]).
    pub fn demand(&self) -> Arc<tokio::sync::Notify> {
        self.shared.registry.demand.clone()
    }

    /// The endpoints `upstream` sends to now (`None`: no such upstream).
    pub fn endpoints(&self, upstream: &str) -> Option<Vec<SocketAddr>> {
        let snap = self.shared.snapshot.load();
        let slot = snap.groups.get(upstream)?;
        let eps = slot.load().cfg.endpoints.iter().map(|e| e.addr).collect();
        Some(eps)
    }

    /// Each upstream's counters so far, whatever endpoints it had.
    pub fn upstream_totals(&self) -> Vec<UpstreamTotals> {
        let stats = self.shared.registry.upstream_stats();
        stats
            .into_iter()
            .map(|(name, s)| {
                let (requests, failed) = s.totals();
                UpstreamTotals {
                    name,
                    requests,
                    failed,
                    latency: s.latency.counts(),
                    latency_sum_us: s.latency.sum_us(),
                    waiting: s.waiting.load(Relaxed),
                }
            })
            .collect()
    }

    /// [`Proxy::upstream_totals`] for each route.
    pub fn route_totals(&self) -> Vec<(String, u64, u64, Vec<u64>)> {
        let routes = self.shared.registry.route_stats();
        routes
            .into_iter()
            .map(|(name, r)| {
                let n: Vec<u64> =
                    r.stats.requests.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect();
                (name, n.iter().sum(), n[4] + n[5], r.stats.latency.counts())
            })
            .collect()
    }

    fn install(&self, cfg: Config) {
        let snap = self.shared.registry.build(Arc::new(cfg));
        watch_certificates(&self.shared, &snap.config);
        self.shared.snapshot.store(Arc::new(snap));
        for (_, s) in self.shared.registry.upstream_stats() {
            s.changed.notify_waiters();
        }
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then
    /// returns. A keep-alive connection's next response says
    /// `connection: close`; one idle for a second is closed.
    pub async fn shutdown(&self, grace: Duration) {
        for l in self.listeners.locked().iter_mut() {
            let _ = l.stop.send(true);
            // Closed here too (a new process after an upgrade has its own).
            l.sockets.clear();
        }
        let _ = self.stop.send(true);
        tracing::info!(connections = self.drain.count.load(Relaxed), grace = ?grace, "draining");
        if tokio::time::timeout(grace, self.drain.wait()).await.is_err() {
            tracing::warn!(left = self.drain.count.load(Relaxed), "grace period over; closing remaining connections");
        }
        let _ = self.halt.send(true);
        let threads = std::mem::take(&mut *self.threads.locked());
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        self.shared.registry.stop_tasks().await;
    }
}

/// An inherited listener's sockets, one per worker: the old process's,
/// and more bound beside them when this process has more workers.
fn take_over(old: InheritedListener, n: usize, freebind: bool) -> std::io::Result<BoundSet> {
    let InheritedListener { bound, mut sockets, claim } = old;
    sockets.truncate(n);
    while sockets.len() < n {
        sockets.push(bind(bound, true, freebind)?);
    }
    Ok(BoundSet { local: bound, sockets, claim: claim.map(Claim::inherited) })
}

/// How often certificate files are looked at for changes.
const CERT_POLL: Duration = Duration::from_secs(2);

/// Starts, for each https listener of `cfg`, the task that re-reads its
/// certificate files when they change; it ends with the config.
fn watch_certificates(shared: &Shared, cfg: &Config) {
    for l in &cfg.listeners {
        let ListenerProtocol::Https(t) = &l.protocol else { continue };
        let (tls, name) = (Arc::downgrade(t), l.name.clone());
        let stats = shared.registry.listener(&l.name);
        shared.registry.spawn_control(async move {
            loop {
                tokio::time::sleep(CERT_POLL).await;
                let Some(tls) = tls.upgrade() else { return };
                match tls.refresh() {
                    Ok(false) => {}
                    Ok(true) => {
                        stats.tls_reloads.fetch_add(1, Relaxed);
                        tracing::info!(listener = %name, "certificate files changed; new handshakes use them");
                    }
                    Err(e) => {
                        stats.tls_reload_failures.fetch_add(1, Relaxed);
                        tracing::error!(listener = %name, error = %e, "changed certificate files refused; the previous certificates keep serving");
                    }
                }
            }
        });
    }
}

/// One socket per listener per worker in the per-core model (the kernel
/// spreads connections over them); one per listener when work-stealing.
fn sockets_per_listener(c: &Config) -> usize {
    if c.work_stealing {
        1
    } else {
        c.workers.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reload during a paused start (a binary upgrade waiting for its
    /// endpoints) keeps the held listeners held: it neither binds them
    /// again (the address is this process's already) nor serves them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_while_paused_keeps_the_held_listeners() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = format!(
            "[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:{port}\"\n\n[[routes]]\nupstream = \"u\"\n\n\
             [upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n"
        );
        let cfg = crate::config::parse("test.toml", &text).unwrap();
        let proxy = Proxy::start_inherited(cfg.clone(), None, None, true).await.unwrap();
        proxy.reload(cfg).expect("a reload while paused");
        let ask = || async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 12];
            let n = s.read(&mut buf).await.unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let early = tokio::time::timeout(Duration::from_millis(300), ask()).await;
        assert!(early.is_err(), "a paused listener answered: {early:?}");
        proxy.resume();
        let answer = tokio::time::timeout(Duration::from_secs(10), ask()).await.expect("an answer after resume");
        assert!(answer.starts_with("HTTP/1.1 5"), "{answer}");
        proxy.shutdown(Duration::from_millis(100)).await;
    }
}
