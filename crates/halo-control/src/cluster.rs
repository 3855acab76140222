//! The cluster: membership, leader election with fencing, and the leader
//! loop that runs the scheduler.
//!
//! Keys (under the store's namespace):
//! - `/halo/nodes/NODE`: a [`NodeRecord`], on the node's lease: a node
//!   whose lease expires is gone from the cluster.
//! - `/halo/node-admin/NODE`: `{"draining": true}` (`halo node drain`).
//! - `/halo/leader`: the leader's name, on its node lease. The key's create
//!   revision is the **fencing token**: every write the leader makes is a
//!   transaction that checks it, so a deposed leader (paused, cut off)
//!   cannot write once another has been elected.
//! - `/halo/assignments/NODE/ID`: an [`Assignment`], written only by the
//!   leader, carrying its token.
//! - `/halo/endpoints/SERVICE/ID`: an [`EndpointRecord`], on the lease of
//!   the node running the instance, present while the instance is ready.
//!   Every node's proxy routes to all of them.
//!
//! A leader that has not renewed its lease for two thirds of the TTL steps
//! down on its own, before the lease can expire and another be elected.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_store::{Compare, CompareOp, CompareTarget, LeaseId, Revision, Store, StoreError, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::records::{ServiceRecord, SERVICES};
use crate::scheduler::{self, NodeInfo, Placement, ServiceWant, Snapshot};

pub const NODES: &str = "/halo/nodes/";
pub const NODE_ADMIN: &str = "/halo/node-admin/";
pub const LEADER: &str = "/halo/leader";
pub const ASSIGNMENTS: &str = "/halo/assignments/";
pub const ENDPOINTS: &str = "/halo/endpoints/";

pub fn assignment_key(node: &str, id: &str) -> String {
    format!("{ASSIGNMENTS}{node}/{id}")
}

pub fn endpoint_key(service: &str, id: &str) -> String {
    format!("{ENDPOINTS}{service}/{id}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where other nodes reach this node's instances.
    pub addr: IpAddr,
    pub zone: String,
    pub capacity: u32,
    /// The node's admin API.
    pub api: SocketAddr,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdmin {
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    #[serde(flatten)]
    pub placement: Placement,
    /// The fencing token of the leader that wrote it.
    pub token: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub node: String,
    pub addr: SocketAddr,
}

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node: String,
    pub addr: IpAddr,
    pub zone: String,
    pub capacity: u32,
    /// The node lease's TTL; it is renewed every third of it.
    pub lease_ttl: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub lease_renew_failures: AtomicU64,
    pub leases_granted: AtomicU64,
    pub watch_restarts: AtomicU64,
    pub elections_won: AtomicU64,
    pub step_downs: AtomicU64,
    pub fenced_writes: AtomicU64,
    pub stale_orders_ignored: AtomicU64,
}

/// This node's membership: its lease, and its leadership if it has it.
pub struct Membership {
    pub cfg: ClusterConfig,
    pub api: SocketAddr,
    store: Arc<dyn Store>,
    lease: Mutex<Option<LeaseId>>,
    last_renewed: Mutex<Option<Instant>>,
    /// The fencing token while this node leads; 0 otherwise.
    token: AtomicI64,
    /// The highest fencing token this node has seen.
    pub max_token: AtomicI64,
    pub counters: ClusterCounters,
    /// Service specs parsed for the API's cluster views (status, metrics).
    pub(crate) views: tokio::sync::Mutex<SpecCache>,
}

impl Membership {
    pub fn new(cfg: ClusterConfig, api: SocketAddr, store: Arc<dyn Store>) -> Arc<Membership> {
        Arc::new(Membership {
            cfg,
            api,
            store,
            lease: Mutex::new(None),
            last_renewed: Mutex::new(None),
            token: AtomicI64::new(0),
            max_token: AtomicI64::new(0),
            counters: ClusterCounters::default(),
            views: Default::default(),
        })
    }

    /// The node's lease, if it holds one that was renewed within its TTL.
    pub fn lease(&self) -> Option<LeaseId> {
        let fresh = self
            .last_renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < self.cfg.lease_ttl);
        (*self.lease.lock().unwrap_or_else(|e| e.into_inner())).filter(|_| fresh)
    }

    /// The fencing token while this node leads.
    pub fn leading(&self) -> Option<Revision> {
        Some(self.token.load(Ordering::SeqCst)).filter(|t| *t > 0)
    }

    pub fn see_token(&self, token: Revision) {
        self.max_token.fetch_max(token, Ordering::SeqCst);
    }

    fn record(&self) -> Vec<u8> {
        let r = NodeRecord {
            name: self.cfg.node.clone(),
            addr: self.cfg.addr,
            zone: self.cfg.zone.clone(),
            capacity: self.cfg.capacity,
            api: self.api,
        };
        serde_json::to_vec(&r).expect("a node record encodes")
    }

    /// Grants a lease and registers the node on it.
    async fn register(&self) -> Result<LeaseId, StoreError> {
        let lease = self.store.grant(self.cfg.lease_ttl).await?;
        self.store.put(&format!("{NODES}{}", self.cfg.node), self.record(), Some(lease)).await?;
        // A lease-less record too, so a node that dies stays listed (as
        // gone) until `halo node remove`.
        let admin = format!("{NODE_ADMIN}{}", self.cfg.node);
        let v = serde_json::to_vec(&NodeAdmin::default()).expect("encodes");
        self.store.txn(Txn::new().when(Compare::absent(&admin)).and_then(TxnOp::put(&admin, v, None))).await?;
        *self.last_renewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
        self.counters.leases_granted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %self.cfg.node, lease = format!("{lease:x}"), "registered in the cluster");
        Ok(lease)
    }

    /// Keeps the node's lease alive, in its own task so a busy node does
    /// not lose it; registers again (new lease) if it expired.
    pub async fn run_lease(self: Arc<Self>) {
        let every = self.cfg.lease_ttl / 3;
        loop {
            let current = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
            match current {
                None => {
                    if let Err(e) = self.register().await {
                        tracing::warn!(error = %e, "cannot register in the cluster; retrying");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                }
                Some(lease) => match self.store.keep_alive(lease).await {
                    Ok(_) => {
                        *self.last_renewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    }
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!(lease = format!("{lease:x}"), "the node lease expired; registering again");
                        self.counters.lease_renew_failures.fetch_add(1, Ordering::Relaxed);
                        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        self.step_down("lease expired");
                        continue;
                    }
                    Err(e) => {
                        self.counters.lease_renew_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "renewing the node lease failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            }
            tokio::time::sleep(every).await;
        }
    }

    fn step_down(&self, why: &str) {
        let old = self.token.swap(0, Ordering::SeqCst);
        if old > 0 {
            self.counters.step_downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(token = old, why, "stepping down as leader");
        }
    }

    /// Campaigns for leadership and, while this node leads, runs the
    /// leader loop; follows the leader key otherwise.
    pub async fn run_election(self: Arc<Self>, wake: Arc<Notify>) {
        loop {
            let tick = tokio::time::sleep(Duration::from_millis(250));
            if let Some(token) = self.leading() {
                // Renewed lately? A leader that is not renewing steps down
                // before its lease can expire and another be elected.
                let renewed = *self.last_renewed.lock().unwrap_or_else(|e| e.into_inner());
                if renewed.is_none_or(|t| t.elapsed() > self.cfg.lease_ttl * 2 / 3) {
                    self.step_down("lease not renewed in time");
                } else if let Ok(kv) = self.store.get(LEADER).await {
                    if kv.is_none_or(|kv| kv.create_revision != token) {
                        self.step_down("the leader key changed");
                    }
                }
            } else if let Some(lease) = self.lease() {
                let me = self.cfg.node.as_bytes().to_vec();
                let txn =
                    Txn::new().when(Compare::absent(LEADER)).and_then(TxnOp::put(LEADER, me.clone(), Some(lease)));
                match self.store.txn(txn).await {
                    Ok(r) if r.succeeded => self.lead(r.revision, &wake),
                    Ok(_) => {
                        // Taken: remember its token; it may still be ours
                        // from before a transient step-down.
                        if let Ok(Some(kv)) = self.store.get(LEADER).await {
                            self.see_token(kv.create_revision);
                            if kv.value == me && kv.lease == Some(lease) {
                                self.lead(kv.create_revision, &wake);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "campaign failed"),
                }
            }
            tick.await;
        }
    }

    fn lead(self: &Arc<Self>, token: Revision, wake: &Arc<Notify>) {
        self.see_token(token);
        if self.token.compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            self.counters.elections_won.fetch_add(1, Ordering::Relaxed);
            tracing::info!(node = %self.cfg.node, token, "elected leader");
            tokio::spawn(leader_loop(self.clone(), token, wake.clone()));
        }
    }
}

/// The cluster as the store has it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterState {
    pub revision: Revision,
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Each live node's lease.
    pub leases: BTreeMap<String, LeaseId>,
    pub admin: BTreeMap<String, NodeAdmin>,
    pub leader: Option<(String, Revision)>,
    pub services: BTreeMap<String, ServiceWant>,
    pub assignments: BTreeMap<String, Assignment>,
    pub endpoints: BTreeMap<String, (String, EndpointRecord)>,
}

/// Service specs parsed once per stored revision.
#[derive(Default)]
pub struct SpecCache(BTreeMap<String, (Revision, ServiceWant)>);

/// Reads the whole cluster state (several listings; each is consistent,
/// and the leader's writes are fenced, so a torn read only delays).
pub async fn read_state(store: &dyn Store, cache: &mut SpecCache) -> Result<ClusterState, StoreError> {
    let mut st = ClusterState::default();
    let nodes = store.list(NODES).await?;
    st.revision = nodes.revision;
    for kv in nodes.kvs {
        if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
            if let Some(l) = kv.lease {
                st.leases.insert(r.name.clone(), l);
            }
            st.nodes.insert(r.name.clone(), r);
        }
    }
    for kv in store.list(NODE_ADMIN).await?.kvs {
        if let Ok(a) = serde_json::from_slice::<NodeAdmin>(&kv.value) {
            st.admin.insert(kv.key.trim_start_matches(NODE_ADMIN).to_string(), a);
        }
    }
    if let Some(kv) = store.get(LEADER).await? {
        st.leader = Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.create_revision));
    }
    let mut seen = BTreeSet::new();
    for kv in store.list(SERVICES).await?.kvs {
        let name = kv.key.trim_start_matches(SERVICES).to_string();
        seen.insert(name.clone());
        if let Some((rev, want)) = cache.0.get(&name) {
            if *rev == kv.mod_revision {
                st.services.insert(name, want.clone());
                continue;
            }
        }
        let parsed = serde_json::from_slice::<ServiceRecord>(&kv.value).ok().and_then(|r| {
            let (file, spec) = halo_model::parse_service(&kv.key, &r.spec).ok()?;
            Some(ServiceWant {
                replicas: spec.replicas,
                template: ServiceRecord::template(&file, r.restart_generation),
            })
        });
        match parsed {
            Some(want) => {
                cache.0.insert(name.clone(), (kv.mod_revision, want.clone()));
                st.services.insert(name, want);
            }
            None => tracing::error!(service = %name, "stored service is not valid; not scheduled"),
        }
    }
    cache.0.retain(|n, _| seen.contains(n));
    for kv in store.list(ASSIGNMENTS).await?.kvs {
        if let Ok(a) = serde_json::from_slice::<Assignment>(&kv.value) {
            st.assignments.insert(a.placement.id.clone(), a);
        }
    }
    for kv in store.list(ENDPOINTS).await?.kvs {
        let rest = kv.key.trim_start_matches(ENDPOINTS);
        let Some((service, id)) = rest.split_once('/') else { continue };
        if let Ok(e) = serde_json::from_slice::<EndpointRecord>(&kv.value) {
            st.endpoints.insert(id.to_string(), (service.to_string(), e));
        }
    }
    Ok(st)
}

impl ClusterState {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            nodes: self
                .nodes
                .values()
                .map(|n| {
                    let draining = self.admin.get(&n.name).is_some_and(|a| a.draining);
                    (n.name.clone(), NodeInfo { zone: n.zone.clone(), capacity: n.capacity, draining })
                })
                .collect(),
            services: self.services.clone(),
            placements: self.assignments.iter().map(|(id, a)| (id.clone(), a.placement.clone())).collect(),
            ready: self.endpoints.keys().filter(|id| self.assignments.contains_key(*id)).cloned().collect(),
        }
    }
}

/// Runs the scheduler while this node leads with `token`, on every change
/// in the store and twice a second. Every write is fenced by the token.
async fn leader_loop(m: Arc<Membership>, token: Revision, wake: Arc<Notify>) {
    let mut cache = SpecCache::default();
    let mut compacted = Instant::now();
    let mut unplaced = BTreeMap::new();
    while m.leading() == Some(token) {
        match read_state(&*m.store, &mut cache).await {
            Ok(st) => {
                // etcd keeps every revision until compacted: the leader
                // keeps the last KEEP_REVISIONS, enough for any watch that
                // broke for a while to resume without listing again.
                if compacted.elapsed() > COMPACT_EVERY && st.revision > KEEP_REVISIONS {
                    compacted = Instant::now();
                    if let Err(e) = m.store.compact(st.revision - KEEP_REVISIONS).await {
                        tracing::debug!(error = %e, "compacting the store's history failed");
                    }
                }
                let plan = scheduler::schedule(&st.snapshot());
                if plan.unplaced != unplaced {
                    if !plan.unplaced.is_empty() {
                        tracing::warn!(unplaced = ?plan.unplaced, "replicas without a node with room (capacity, drains)");
                    }
                    unplaced = plan.unplaced.clone();
                }
                if !plan.is_empty() {
                    if let Err(e) = apply_plan(&m, token, &st, &plan).await {
                        tracing::warn!(error = %e, "applying the plan failed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the cluster state failed"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!(token, "leader loop ended");
}

/// History the leader keeps when it compacts, and how often it does.
const KEEP_REVISIONS: Revision = 10_000;
const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// etcd refuses transactions of more than 128 operations.
const OPS_PER_TXN: usize = 100;

async fn apply_plan(
    m: &Membership,
    token: Revision,
    st: &ClusterState,
    plan: &scheduler::Plan,
) -> Result<(), StoreError> {
    let mut ops = Vec::new();
    for id in &plan.remove {
        if let Some(a) = st.assignments.get(id) {
            tracing::info!(instance = %id, node = %a.placement.node, "unassigning");
            ops.push(TxnOp::Delete(assignment_key(&a.placement.node, id)));
        }
    }
    for p in &plan.add {
        tracing::info!(instance = %p.id, node = %p.node, "assigning");
        let a = Assignment { placement: p.clone(), token };
        ops.push(TxnOp::put(&assignment_key(&p.node, &p.id), serde_json::to_vec(&a).expect("encodes"), None));
    }
    for chunk in ops.chunks(OPS_PER_TXN) {
        let mut txn = Txn::new().when(Compare::new(LEADER, CompareOp::Equal, CompareTarget::CreateRevision(token)));
        txn.success = chunk.to_vec();
        if !m.store.txn(txn).await?.succeeded {
            m.counters.fenced_writes.fetch_add(1, Ordering::Relaxed);
            m.step_down("a fenced write was refused: another leader holds the key");
            return Ok(());
        }
    }
    Ok(())
}

/// Follows `prefix` and wakes `wake` on every change. A broken watch
/// resumes from the last revision seen + 1; when that revision was
/// compacted, it lists again (wakes) and watches from the listing's.
pub async fn follow(
    store: Arc<dyn Store>,
    prefix: &'static str,
    wake: impl Fn() + Send,
    restarts: Option<Arc<Membership>>,
) {
    let mut next: Revision = 0;
    loop {
        if next == 0 {
            match store.list(prefix).await {
                Ok(l) => {
                    next = l.revision + 1;
                    wake();
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
        }
        match store.watch(prefix, next).await {
            Ok(mut w) => {
                while let Some(batch) = w.next().await {
                    if let Some(e) = batch.first() {
                        next = e.kv.mod_revision + 1;
                    }
                    wake();
                }
                tracing::debug!(prefix, next, "watch ended; resuming");
            }
            Err(StoreError::Compacted { .. }) => {
                tracing::info!(prefix, next, "watch revision compacted; listing again");
                next = 0;
            }
            Err(e) => {
                tracing::debug!(prefix, error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        if let Some(m) = &restarts {
            m.counters.watch_restarts.fetch_add(1, Ordering::Relaxed);
        }
        // Anything may have changed while the watch was down.
        wake();
    }
}
