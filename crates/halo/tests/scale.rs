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

/// The shared etcd client as one node reaches it: through its link,
/// counting its requests.
struct LinkedStore {
    inner: Arc<dyn Store>,
    link: Arc<Link>,
    counts: Arc<Requests>,
}

/// One node's store requests, by kind.
#[derive(Default)]
struct Requests {
    /// get, list
    reads: AtomicU64,
    /// txn (put, delete), compact, revoke
    writes: AtomicU64,
    /// grant, keep-alive
    leases: AtomicU64,
    watches: AtomicU64,
}

impl LinkedStore {
    /// Counts the request, which waits while the link is frozen and fails
    /// while it is cut (its answer too: a node frozen meanwhile gets it
    /// once thawed).
    async fn through<T>(
        &self,
        count: &AtomicU64,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        count.fetch_add(1, Relaxed);
        self.link.pass().await?;
        let r = call.await;
        self.link.pass().await?;
        r
    }
}

#[async_trait]
impl Store for LinkedStore {
    async fn get(&self, key: &str) -> Result<Option<halo_store::KeyValue>, StoreError> {
        self.through(&self.counts.reads, self.inner.get(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.through(&self.counts.reads, self.inner.list(prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.through(&self.counts.writes, self.inner.txn(txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.counts.watches.fetch_add(1, Relaxed);
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
        self.through(&self.counts.writes, self.inner.compact(revision)).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.through(&self.counts.leases, self.inner.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.through(&self.counts.leases, self.inner.keep_alive(lease)).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.through(&self.counts.writes, self.inner.revoke(lease)).await
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
    requests: Arc<Requests>,
    api: tokio::task::JoinHandle<()>,
}

/// The simulated cluster.
struct Sim {
    etcd: Etcd,
    /// The harness's own client (to read the state).
    store: Arc<dyn Store>,
    /// The nodes' clients, one per [`NODES_PER_CLIENT`] nodes: one HTTP/2
    /// connection carrying hundreds of nodes' watches is refused by the
    /// h2 crate's guard ("too_many_data_frames"), where real nodes each
    /// have their own.
    clients: Vec<Arc<dyn Store>>,
    nodes: Vec<SimNode>,
    /// `/healthz` answers, every node's.
    probes: Arc<AtomicU64>,
    _dir: TempDir,
}

const NODES_PER_CLIENT: usize = 20;

const SIM_NODE: &str =
    "[node]\napi = \"127.0.0.1:7070\"\n\n[proxy]\nworkers = 1\n\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n";

impl Sim {
    async fn start(n: usize) -> Sim {
        let etcd = Etcd::start();
        let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[etcd.endpoint()], "").await.expect("connect"));
        let dir = TempDir::new("sim");
        let mut clients = Vec::new();
        for _ in 0..n.div_ceil(NODES_PER_CLIENT) {
            let c: Arc<dyn Store> = Arc::new(EtcdStore::connect(&[etcd.endpoint()], "").await.expect("connect"));
            clients.push(c);
        }
        let probes = Arc::new(AtomicU64::new(0));
        let mut sim = Sim { etcd, store, clients, nodes: Vec::new(), probes, _dir: dir };
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
        let requests = Arc::new(Requests::default());
        let counts = requests.clone();
        let inner = self.clients[i / NODES_PER_CLIENT].clone();
        let store: Arc<dyn Store> = Arc::new(LinkedStore { inner, link: link.clone(), counts });
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
            SimNode { name, node, link, requests, api }
        }
    }

    fn node(&self, name: &str) -> &SimNode {
        self.nodes.iter().find(|n| n.name == name).expect("a node of the simulation")
    }

    /// The store's state, read now (a store too busy to answer is asked
    /// again, for at most a minute).
    async fn state(&self) -> ClusterState {
        let start = Instant::now();
        loop {
            match read_state(&*self.store).await {
                Ok(st) => return st,
                Err(e) if start.elapsed() < Duration::from_secs(60) => {
                    eprintln!("reading the state failed ({e}); again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("reading the state failed for a minute: {e}"),
            }
        }
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
            pending.push(async move {
                // As an operator would: a store busy for a moment is asked again.
                for _ in 0..20 {
                    match node.apply("sim", &text, false).await {
                        Ok(_) => return,
                        Err(e) => tracing_free_wait(&e).await,
                    }
                }
                panic!("applying {text} failed 20 times");
            });
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

async fn tracing_free_wait(e: &halo_control::NodeError) {
    eprintln!("apply failed ({e}); again");
    tokio::time::sleep(Duration::from_millis(500)).await;
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

/// CPU seconds `pid` has used (user and system).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // utime and stime are the 14th and 15th fields (11 and 12 after the name).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Resident memory of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// etcd's own counters: gRPC messages received, and bytes in and out.
fn etcd_counters(endpoint: &str) -> (f64, f64) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(endpoint).expect("etcd answers");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n").expect("ask etcd");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("etcd's metrics");
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let bytes = sum("etcd_network_client_grpc_received_bytes_total") + sum("etcd_network_client_grpc_sent_bytes_total");
    (sum("grpc_server_msg_received_total"), bytes)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64()
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What an idle window of `secs` costs: probes per node per second, etcd
/// messages and bytes per second, CPU of this process per node (percent
/// of a core) and of etcd (percent), store reads per node per second.
async fn idle_window(sim: &Sim, secs: u64) -> serde_json::Value {
    let me = std::process::id();
    let etcd = sim.etcd.pids()[0];
    let n = sim.nodes.len() as f64;
    let sum =
        |f: fn(&Requests) -> &AtomicU64| sim.nodes.iter().map(|x| f(&x.requests).load(Relaxed)).sum::<u64>() as f64;
    let reqs = || [sum(|r| &r.reads), sum(|r| &r.writes), sum(|r| &r.leases), sum(|r| &r.watches)];
    let (p0, (m0, b0), c0, e0, r0) =
        (sim.probes.load(Relaxed), etcd_counters(&sim.etcd.endpoint()), cpu_secs(me), cpu_secs(etcd), reqs());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (p1, (m1, b1), c1, e1, r1) =
        (sim.probes.load(Relaxed), etcd_counters(&sim.etcd.endpoint()), cpu_secs(me), cpu_secs(etcd), reqs());
    let per = |i: usize| (r1[i] - r0[i]) / n / secs as f64;
    let s = secs as f64;
    serde_json::json!({
        "probes_per_node_s": (p1 - p0) as f64 / n / s,
        "etcd_msgs_s": (m1 - m0) / s,
        "etcd_kib_s": (b1 - b0) / 1024.0 / s,
        "cpu_per_node_pct": (c1 - c0) / s / n * 100.0,
        "etcd_cpu_pct": (e1 - e0) / s * 100.0,
        "reads_per_node_s": per(0),
        "writes_per_node_s": per(1),
        "leases_per_node_s": per(2),
        "watches_per_node_s": per(3),
    })
}

/// The figures of `docs/benchmarks.md` at HALO_SCALE_NODES simulated
/// nodes with HALO_SCALE_SERVICES services of HALO_SCALE_REPLICAS: one
/// JSON line on stdout (`bench/scale.sh` runs it).
#[test]
#[ignore = "a benchmark: bench/scale.sh runs it"]
fn bench_scale() {
    let n = env_or("HALO_SCALE_NODES", 100);
    let services = env_or("HALO_SCALE_SERVICES", 500);
    let replicas = env_or("HALO_SCALE_REPLICAS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let out = rt.block_on(async {
        let long = Duration::from_secs(900);
        let me = std::process::id();
        let rss0 = rss_mib(me);
        let t = Instant::now();
        let sim = Sim::start(n).await;
        sim.until("every node registered and a leader", long, |st| st.nodes.len() == n && st.leader.is_some()).await;
        let start_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mem_empty = (rss_mib(me) - rss0) / n as f64;
        let idle_empty = idle_window(&sim, 10).await;

        let t = Instant::now();
        sim.apply(services, replicas as u32).await;
        let applied_s = t.elapsed().as_secs_f64();
        let none = BTreeSet::new();
        sim.until("every instance placed once and ready", long, |st| settled(st, replicas, &none)).await;
        let place_s = t.elapsed().as_secs_f64();
        let mem_full = (rss_mib(me) - rss0) / n as f64;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_full = idle_window(&sim, 10).await;

        // One `halo scale` of one service: what it costs the nodes that
        // do not host it, and etcd, over the idle rate.
        let st = sim.state().await;
        let hosts = |st: &ClusterState| -> BTreeSet<String> {
            st.assignments
                .values()
                .filter(|a| a.placement.service == "s00000")
                .map(|a| a.placement.node.clone())
                .collect()
        };
        let before: Vec<u64> = sim.nodes.iter().map(|x| x.requests.reads.load(Relaxed)).collect();
        let (m0, b0) = etcd_counters(&sim.etcd.endpoint());
        let t = Instant::now();
        sim.nodes[0].node.scale("s00000", replicas as u32 + 1).await.expect("scale");
        // Waits on the service's endpoints alone: a listing of everything
        // would weigh in what is measured.
        let prefix = format!("{}s00000/", halo_control::keys::ENDPOINTS);
        while sim.store.list(&prefix).await.map_or(0, |l| l.kvs.len()) < replicas + 1 {
            assert!(t.elapsed() < long, "the scaled service not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let scale_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dt = t.elapsed().as_secs_f64();
        let (m1, b1) = etcd_counters(&sim.etcd.endpoint());
        let st2 = sim.state().await;
        let hosting: BTreeSet<String> = hosts(&st).union(&hosts(&st2)).cloned().collect();
        let others: Vec<f64> = sim
            .nodes
            .iter()
            .zip(&before)
            .filter(|(x, _)| !hosting.contains(&x.name))
            .map(|(x, b)| (x.requests.reads.load(Relaxed) - b) as f64)
            .collect();
        let idle_msgs = idle_full["etcd_msgs_s"].as_f64().unwrap_or(0.0);
        let idle_kib = idle_full["etcd_kib_s"].as_f64().unwrap_or(0.0);
        let scale = serde_json::json!({
            "ready_s": scale_s,
            "etcd_msgs_over_idle": (m1 - m0) - idle_msgs * dt,
            "etcd_kib_over_idle": (b1 - b0) / 1024.0 - idle_kib * dt,
            "reads_per_other_node": others.iter().sum::<f64>() / others.len().max(1) as f64,
            "reads_per_other_node_max": others.iter().cloned().fold(0.0, f64::max),
        });

        // A node with instances dies.
        let st = sim.state().await;
        let victim = busy_follower(&st);
        let t = Instant::now();
        let mut times = kill_and_watch_proxies(&sim, &victim, &st, long).await;
        times.sort();
        let off = BTreeSet::from([victim.clone()]);
        let want = |st: &ClusterState| {
            let c = counts(st);
            let scaled = c.get("s00000") == Some(&(replicas + 1, replicas + 1));
            scaled
                && c.iter().filter(|(s, _)| *s != "s00000").all(|(_, (p, r))| *p == replicas && *r == replicas)
                && !st.assignments.values().any(|a| off.contains(&a.placement.node))
        };
        sim.until("the killed node's instances replaced", long, want).await;
        let kill = serde_json::json!({
            "out_of_proxies_p50_s": percentile(&times, 0.5),
            "out_of_proxies_p99_s": percentile(&times, 0.99),
            "out_of_proxies_max_s": percentile(&times, 1.0),
            "replaced_s": t.elapsed().as_secs_f64(),
        });

        // The leader freezes.
        let st = sim.state().await;
        let (leader, _) = st.leader.clone().expect("a leader");
        let t = Instant::now();
        sim.node(&leader).link.set(LinkState::Frozen);
        sim.until("another node leads", long, |st| st.leader.as_ref().is_some_and(|(n, _)| *n != leader)).await;
        let new_leader_s = t.elapsed().as_secs_f64();
        let off2 = BTreeSet::from([victim.clone(), leader.clone()]);
        let want2 = |st: &ClusterState| want(st) && !st.assignments.values().any(|a| off2.contains(&a.placement.node));
        sim.until("the frozen leader's instances replaced", long, want2).await;
        let leader_replaced_s = t.elapsed().as_secs_f64();
        sim.node(&leader).link.set(LinkState::Up);

        let out = serde_json::json!({
            "nodes": n, "services": services, "replicas": replicas,
            "start_s": start_s,
            "mem_per_node_mib_empty": mem_empty,
            "mem_per_node_mib_full": mem_full,
            "idle_empty": idle_empty,
            "idle_full": idle_full,
            "apply_s": applied_s,
            "place_s": place_s,
            "instances_per_s": (services * replicas) as f64 / place_s,
            "scale": scale,
            "kill": kill,
            "freeze_leader": { "new_leader_s": new_leader_s, "replaced_s": leader_replaced_s },
        });
        sim.stop().await;
        out
    });
    println!("SCALE {out}");
}
