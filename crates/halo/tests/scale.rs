//! The control plane at scale: many simulated nodes in this one process,
//! each the real [`Node`] (membership and its lease, the watch-fed view,
//! election, the leader's scheduler, the reconciler and supervisor, peers
//! and eviction, endpoints, the proxy and what feeds it) against one real
//! etcd. Only two things are simulated: the driver (an instance "runs" at
//! once and passes its probes; no process), and each node's link, which
//! a fault freezes (every store call and the node API's answers wait) or
//! cuts (store calls fail, the API answers no one).
//!
//! The test runs 50 nodes in the test command and checks what must hold
//! whatever the timing: every instance placed once, a killed node's
//! instances replaced, nothing placed twice, the killed node's endpoints
//! out of every proxy. `bench_scale` (ignored here; `bench/scale.sh N...`)
//! measures the figures of `docs/benchmarks.md` at N nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use halo_control::state::{read_state, ClusterState};
use halo_control::{ClusterConfig, Node, NodeOptions};
use halo_store::{EtcdStore, LeaseId, Listing, Revision, Store, StoreError, Txn, TxnResult, Watch};
use halo_supervisor::{Driver, Drivers, Exit, Handle, InstanceSpec, RunError, Runner, StartError, Workload};
use halo_testkit::Etcd;
use halo_testkit::TempDir;
use nix::sys::signal::Signal;
use tokio::sync::watch;

/// A simulated node's link to the store and to the other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Up,
    /// Everything waits (a SIGSTOP): store calls, watch events, answers.
    Frozen,
    /// Store calls fail and the API answers no one (dead, or cut off).
    Cut,
}

struct Link(watch::Sender<LinkState>);

impl Link {
    fn new() -> Arc<Link> {
        Arc::new(Link(watch::Sender::new(LinkState::Up)))
    }

    fn set(&self, s: LinkState) {
        self.0.send_replace(s);
    }

    /// Waits while frozen; an error when cut.
    async fn pass(&self) -> Result<(), StoreError> {
        let mut rx = self.0.subscribe();
        let s = *rx.wait_for(|s| *s != LinkState::Frozen).await.expect("the link lives");
        match s {
            LinkState::Cut => Err(StoreError::Backend { op: "sim", message: "cut off".into(), maybe_applied: false }),
            _ => Ok(()),
        }
    }

    /// Waits until the link is up (an answer from a frozen or cut node).
    async fn up(&self) {
        let _ = self.0.subscribe().wait_for(|s| *s == LinkState::Up).await;
    }
}

/// The shared etcd client as one node reaches it: through its link.
struct LinkedStore {
    inner: Arc<dyn Store>,
    link: Arc<Link>,
}

#[async_trait]
impl Store for LinkedStore {
    async fn get(&self, key: &str) -> Result<Option<halo_store::KeyValue>, StoreError> {
        self.link.pass().await?;
        let r = self.inner.get(key).await;
        self.link.pass().await?;
        r
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.link.pass().await?;
        let r = self.inner.list(prefix).await;
        self.link.pass().await?;
        r
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.link.pass().await?;
        let r = self.inner.txn(txn).await;
        self.link.pass().await?;
        r
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.link.pass().await?;
        let mut w = self.inner.watch(prefix, from).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let link = self.link.clone();
        tokio::spawn(async move {
            while let Some(batch) = w.next().await {
                if link.pass().await.is_err() || tx.send(batch).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watch::from_channel(rx))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.link.pass().await?;
        self.inner.compact(revision).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.link.pass().await?;
        let r = self.inner.grant(ttl).await;
        self.link.pass().await?;
        r
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.link.pass().await?;
        let r = self.inner.keep_alive(lease).await;
        self.link.pass().await?;
        r
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.link.pass().await?;
        self.inner.revoke(lease).await
    }

    /// The client is every node's: one node letting go closes nothing.
    async fn close(&self) {}
}

/// Instances that run at once and pass every probe: no process.
#[derive(Debug)]
struct SimDriver {
    name: &'static str,
    available: bool,
}

/// Pids no process has (above Linux's largest), so no signal reaches one.
static NEXT_PID: AtomicU64 = AtomicU64::new(0);

#[async_trait]
impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn start(&self, inst: &InstanceSpec, host: IpAddr, _log: &Path) -> Result<Box<dyn Workload>, StartError> {
        if !self.available {
            return Err(StartError::Runtime("the simulation runs no containers".into()));
        }
        let pid = 1_000_000_000 + NEXT_PID.fetch_add(1, Relaxed) as i32;
        let (end, _) = watch::channel(None);
        Ok(Box::new(SimRun { pid, addr: SocketAddr::new(host, inst.port), end }))
    }

    async fn adopt(&self, _: &Handle, _: &InstanceSpec, _: &Path) -> Option<Box<dyn Workload>> {
        None
    }

    async fn remove(&self, _: &Handle) {}

    async fn available(&self) -> bool {
        self.available
    }

    async fn sweep(&self, _: &[Handle]) {}
}

struct SimRun {
    pid: i32,
    addr: SocketAddr,
    end: watch::Sender<Option<Exit>>,
}

#[derive(Debug)]
struct SimRunner;

#[async_trait]
impl Runner for SimRunner {
    async fn run_with(
        &self,
        _: &[String],
        _: &BTreeMap<String, String>,
        _: Option<Vec<u8>>,
        _: Duration,
    ) -> Result<Vec<u8>, RunError> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl Workload for SimRun {
    fn handle(&self) -> Handle {
        Handle { pid: self.pid, start_time: 1, container: None }
    }

    fn probe_addr(&self) -> SocketAddr {
        self.addr
    }

    fn runner(&self) -> Arc<dyn Runner> {
        Arc::new(SimRunner)
    }

    async fn wait(&mut self) -> Exit {
        let mut rx = self.end.subscribe();
        let exit = rx.wait_for(Option::is_some).await.expect("the run lives");
        exit.clone().expect("ended")
    }

    async fn signal(&self, sig: Signal) {
        if matches!(sig, Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT) {
            self.end.send_replace(Some(Exit { success: sig != Signal::SIGKILL, detail: format!("{sig}") }));
        }
    }

    async fn stop(&mut self, _: Signal, _: Duration) -> Exit {
        let exit = Exit { success: true, detail: "stopped".into() };
        self.end.send_replace(Some(exit.clone()));
        exit
    }
}

/// One simulated node.
struct SimNode {
    name: String,
    node: Node,
    link: Arc<Link>,
    api: tokio::task::JoinHandle<()>,
}

/// The simulated cluster.
struct Sim {
    etcd: Etcd,
    store: Arc<dyn Store>,
    nodes: Vec<SimNode>,
    /// `/healthz` answers, every node's.
    probes: Arc<AtomicU64>,
    _dir: TempDir,
}

const SIM_NODE: &str =
    "[node]\napi = \"127.0.0.1:7070\"\n\n[proxy]\nworkers = 1\n\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n";

impl Sim {
    async fn start(n: usize) -> Sim {
        let etcd = Etcd::start();
        let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[etcd.endpoint()], "").await.expect("connect"));
        let dir = TempDir::new("sim");
        let mut sim = Sim { etcd, store, nodes: Vec::new(), probes: Arc::new(AtomicU64::new(0)), _dir: dir };
        // A few at a time: each registers, lists the root and starts its loops.
        let mut started = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
            let mut starting = Vec::new();
            for &i in chunk {
                starting.push(sim.start_node(i));
            }
            started.extend(futures_join(starting).await);
        }
        sim.nodes = started;
        sim
    }

    fn start_node(&self, i: usize) -> impl std::future::Future<Output = SimNode> + 'static {
        let name = format!("n{i:04}");
        let link = Link::new();
        let store: Arc<dyn Store> = Arc::new(LinkedStore { inner: self.store.clone(), link: link.clone() });
        let data_dir = self._dir.0.join(&name);
        let probes = self.probes.clone();
        async move {
            std::fs::create_dir_all(&data_dir).expect("data dir");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the API");
            let addr = listener.local_addr().expect("address");
            let cfg = halo_control::parse_node("sim.toml", SIM_NODE).expect("a valid node file");
            let opts = NodeOptions {
                cluster: ClusterConfig {
                    node: name.clone(),
                    addr: [127, 0, 0, 1].into(),
                    zone: format!("z{}", i % 3),
                    capacity: 1000,
                    lease_ttl: Duration::from_secs(3),
                },
                api: addr,
                data_dir,
                halo_exe: "/bin/true".into(),
                bind: [127, 0, 0, 1].into(),
                exclusive_store: false,
                api_token: String::new(),
                drivers: Some(Drivers {
                    exec: Arc::new(SimDriver { name: "exec", available: true }),
                    docker: Arc::new(SimDriver { name: "docker", available: false }),
                }),
            };
            let node = Node::start(cfg, opts, store).await.expect("the node starts");
            let api = tokio::spawn(serve_healthz(listener, link.clone(), probes));
            SimNode { name, node, link, api }
        }
    }

    fn node(&self, name: &str) -> &SimNode {
        self.nodes.iter().find(|n| n.name == name).expect("a node of the simulation")
    }

    /// The store's state, read now.
    async fn state(&self) -> ClusterState {
        read_state(&*self.store).await.expect("read the state")
    }

    /// Waits (at most `within`) for `cond` on the store's state.
    async fn until(&self, what: &str, within: Duration, cond: impl Fn(&ClusterState) -> bool) -> ClusterState {
        let start = Instant::now();
        loop {
            let st = self.state().await;
            if cond(&st) {
                return st;
            }
            assert!(start.elapsed() < within, "{what}: not within {within:?}\n{}", summary(&st));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Applies `services` services of `replicas` instances, 32 at a time.
    async fn apply(&self, services: usize, replicas: u32) {
        let mut pending = Vec::new();
        for s in 0..services {
            let (node, text) = (self.nodes[0].node.clone(), sim_service(s, replicas));
            pending.push(async move { node.apply("sim", &text, false).await.expect("apply") });
            if pending.len() == 32 {
                futures_join(std::mem::take(&mut pending)).await;
            }
        }
        futures_join(pending).await;
    }

    /// Stops every node (cut first: nothing of them reaches the store).
    async fn stop(self) {
        for n in &self.nodes {
            n.link.set(LinkState::Cut);
            n.api.abort();
        }
        for n in &self.nodes {
            n.node.release().await;
            n.node.detach(Duration::ZERO).await;
        }
        drop(self.etcd);
    }
}

fn sim_service(i: usize, replicas: u32) -> String {
    format!(
        "name = \"s{i:05}\"\nreplicas = {replicas}\n\n[run]\ncommand = \"sim\"\n\n[readiness]\nexec = [\"true\"]\n\
         interval = \"10s\"\n"
    )
}

/// Answers `/healthz` as the node API does, while the link is up.
async fn serve_healthz(listener: tokio::net::TcpListener, link: Arc<Link>, probes: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (link, probes) = (link.clone(), probes.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let (link, probes) = (link.clone(), probes.clone());
                async move {
                    link.up().await;
                    probes.fetch_add(1, Relaxed);
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok\n"),
                    )))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

async fn futures_join<T: Send + 'static>(fs: Vec<impl std::future::Future<Output = T> + Send + 'static>) -> Vec<T> {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// Instances by service: how many are placed and how many ready.
fn counts(st: &ClusterState) -> BTreeMap<String, (usize, usize)> {
    let mut c: BTreeMap<String, (usize, usize)> = st.services.keys().map(|s| (s.clone(), (0, 0))).collect();
    for a in st.assignments.values() {
        c.entry(a.placement.service.clone()).or_default().0 += 1;
    }
    for (id, (service, _)) in &st.endpoints {
        if st.assignments.contains_key(id) {
            c.entry(service.clone()).or_default().1 += 1;
        }
    }
    c
}

/// Every service has exactly its replicas placed and ready, none on `off`.
fn settled(st: &ClusterState, replicas: usize, off: &BTreeSet<String>) -> bool {
    let on_off = st.assignments.values().any(|a| off.contains(&a.placement.node));
    !on_off && !st.services.is_empty() && counts(st).values().all(|(p, r)| *p == replicas && *r == replicas)
}

fn summary(st: &ClusterState) -> String {
    let c = counts(st);
    let off: Vec<_> = c.iter().filter(|(_, (p, r))| p != r).take(5).collect();
    format!(
        "{} nodes, {} services, {} placed, {} endpoints, leader {:?}; unsettled: {off:?}",
        st.nodes.len(),
        st.services.len(),
        st.assignments.len(),
        st.endpoints.len(),
        st.leader
    )
}

/// The endpoint addresses of `node`'s instances.
fn endpoints_of(st: &ClusterState, node: &str) -> BTreeMap<String, BTreeSet<SocketAddr>> {
    let mut out: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
    for (service, e) in st.endpoints.values() {
        if e.node == node {
            out.entry(service.clone()).or_default().insert(e.addr);
        }
    }
    out
}

/// Whether `n`'s proxy sends to none of `gone`.
fn proxy_clear_of(n: &SimNode, gone: &BTreeMap<String, BTreeSet<SocketAddr>>) -> bool {
    gone.iter().all(|(service, addrs)| {
        n.node.proxy().endpoints(service).is_none_or(|eps| eps.iter().all(|a| !addrs.contains(a)))
    })
}

/// Kills `victim` (its link cut for good) and returns, for every other
/// node, when its proxy stopped sending to the victim's instances.
async fn kill_and_watch_proxies(sim: &Sim, victim: &str, st: &ClusterState, within: Duration) -> Vec<Duration> {
    let gone = endpoints_of(st, victim);
    let start = Instant::now();
    sim.node(victim).link.set(LinkState::Cut);
    let mut out: BTreeMap<String, Duration> = BTreeMap::new();
    let others: Vec<&SimNode> =
        sim.nodes.iter().filter(|n| n.name != victim && n.link.0.borrow().eq(&LinkState::Up)).collect();
    while out.len() < others.len() {
        for n in &others {
            if !out.contains_key(&n.name) && proxy_clear_of(n, &gone) {
                out.insert(n.name.clone(), start.elapsed());
            }
        }
        assert!(
            start.elapsed() < within,
            "{} of {} proxies still send to {victim} after {within:?}",
            others.len() - out.len(),
            others.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out.into_values().collect()
}

/// A node with instances that does not lead.
fn busy_follower(st: &ClusterState) -> String {
    let leader = st.leader.as_ref().map(|(n, _)| n.clone()).unwrap_or_default();
    let mut per: BTreeMap<&String, usize> = BTreeMap::new();
    for a in st.assignments.values() {
        *per.entry(&a.placement.node).or_default() += 1;
    }
    per.into_iter()
        .filter(|(n, _)| **n != leader)
        .max_by_key(|(_, c)| *c)
        .map(|(n, _)| n.clone())
        .expect("a node with instances")
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_simulated_nodes_place_every_instance_once_and_replace_a_killed_nodes() {
    let sim = Sim::start(50).await;
    let long = Duration::from_secs(120);
    sim.until("every node registered and a leader", long, |st| st.nodes.len() == 50 && st.leader.is_some()).await;
    sim.apply(40, 3).await;
    let st = sim.until("every instance placed once and ready", long, |st| settled(st, 3, &BTreeSet::new())).await;
    assert_eq!(st.assignments.len(), 120);

    // A node with instances dies: out of every other proxy, its instances
    // replaced, nothing placed twice.
    let victim = busy_follower(&st);
    let times = kill_and_watch_proxies(&sim, &victim, &st, long).await;
    eprintln!("{victim} out of {} proxies after {:?}", times.len(), times.iter().max());
    let off = BTreeSet::from([victim.clone()]);
    let st = sim.until("the killed node's instances replaced", long, |st| settled(st, 3, &off)).await;
    assert!(!st.nodes.contains_key(&victim), "the killed node left the cluster");

    // Then the leader freezes, and thaws: another leads, nothing is
    // placed twice, and the frozen one serves again.
    let (leader, _) = st.leader.clone().expect("a leader");
    sim.node(&leader).link.set(LinkState::Frozen);
    sim.until("another node leads", long, |st| st.leader.as_ref().is_some_and(|(n, _)| *n != leader)).await;
    sim.node(&leader).link.set(LinkState::Up);
    sim.until("the thawed node back, everything placed once", long, |st| {
        st.nodes.contains_key(&leader) && settled(st, 3, &off)
    })
    .await;
    sim.stop().await;
}
