//! [`Node`]: what the API and the binary drive. Service changes go to the
//! store as compare-and-swap transactions; the reconciler acts on them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halo_model::{ServiceFile, SpecErrors};
use halo_proxy::Proxy;
use halo_store::{Compare, Store, StoreError, Txn, TxnOp};
use halo_supervisor::{Env, LogFile, Status};
use serde::Serialize;

use crate::cluster::{self, ClusterConfig, ClusterState, Membership, NodeAdmin, NODE_ADMIN};
use crate::node::Inner;
use crate::records::{service_key, ServiceRecord, SERVICES};
use crate::NodeConfig;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid service:\n{0}")]
    Invalid(#[from] SpecErrors),
    #[error("{0}")]
    BadRequest(String),
    #[error("no service named '{0}'")]
    NotFound(String),
    #[error("no node named '{name}' (known nodes: {known})")]
    NoSuchNode { name: String, known: String },
    #[error("the service changed while this request was applied; try again")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the node: {0}")]
    Start(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub status: Status,
    /// Being drained and stopped.
    pub stopping: bool,
    /// Runs the current spec (false: waiting to be replaced).
    pub current: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub replicas: u32,
    pub ready: usize,
    pub instances: Vec<InstanceView>,
}

/// A running single node: store, supervisor, proxy, reconciler.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Starts the proxy, takes over instances left by a previous run,
    /// creates the node file's services the store does not have, and runs
    /// the reconciler.
    pub async fn start(
        cfg: NodeConfig,
        data_dir: PathBuf,
        store: Arc<dyn Store>,
        halo_exe: PathBuf,
    ) -> Result<Node, NodeError> {
        let node = Node::build(&cfg, data_dir, store, halo_exe, None).await?;
        node.create_file_services(&cfg).await?;
        node.inner.adopt().await?;
        let inner = node.inner.clone();
        tokio::spawn(cluster::follow(node.inner.store.clone(), SERVICES, move || inner.wake.notify_one(), None));
        tokio::spawn(run(node.inner.clone()));
        Ok(node)
    }

    /// Starts a cluster node (`halo agent`): registers it under a lease,
    /// campaigns for leadership (the leader runs the scheduler), adopts
    /// the instances this node left running, and runs what is assigned
    /// to it. `api` is the address its API is reached on.
    pub async fn start_agent(
        cfg: NodeConfig,
        cluster_cfg: ClusterConfig,
        api: std::net::SocketAddr,
        data_dir: PathBuf,
        store: Arc<dyn Store>,
        halo_exe: PathBuf,
    ) -> Result<Node, NodeError> {
        let m = Membership::new(cluster_cfg, api, store.clone());
        let node = Node::build(&cfg, data_dir, store, halo_exe, Some(m.clone())).await?;
        node.create_file_services(&cfg).await?;
        node.inner.adopt().await?;
        let leader_wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(m.clone().run_lease());
        tokio::spawn(m.clone().run_election(leader_wake.clone()));
        let inner = node.inner.clone();
        let wake = move || {
            inner.wake.notify_one();
            leader_wake.notify_one();
        };
        tokio::spawn(cluster::follow(node.inner.store.clone(), "/halo/", wake, Some(m)));
        tokio::spawn(run(node.inner.clone()));
        Ok(node)
    }

    async fn build(
        cfg: &NodeConfig,
        data_dir: PathBuf,
        store: Arc<dyn Store>,
        halo_exe: PathBuf,
        cluster: Option<Arc<Membership>>,
    ) -> Result<Node, NodeError> {
        let proxy = Proxy::start(cfg.proxy.clone(), None).await.map_err(|e| NodeError::Start(e.to_string()))?;
        // On a cluster node, other nodes' proxies reach the instances.
        let host = if cluster.is_some() { [0, 0, 0, 0].into() } else { [127, 0, 0, 1].into() };
        let env = Arc::new(Env { logs_dir: data_dir.join("logs"), halo_exe, log_cap: 10 << 20, host });
        let inner = Arc::new(Inner::new(store, proxy, cfg.proxy.clone(), env, data_dir, cluster));
        Ok(Node { inner })
    }

    /// Creates the node file's services the store does not have yet.
    async fn create_file_services(&self, cfg: &NodeConfig) -> Result<(), NodeError> {
        for (file, _) in &cfg.services {
            let key = service_key(&file.name);
            let rec = ServiceRecord { spec: file.to_toml(), restart_generation: 0 };
            let txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::put(&key, json(&rec), None));
            if self.inner.store.txn(txn).await?.succeeded {
                tracing::info!(service = %file.name, "service created from the node file");
            }
        }
        Ok(())
    }

    /// The cluster as the store has it (`None` on a single node).
    pub async fn cluster(&self) -> Result<Option<ClusterView>, NodeError> {
        let Some(m) = &self.inner.cluster else { return Ok(None) };
        let st = cluster::read_state(&*self.inner.store, &mut *m.views.lock().await).await?;
        Ok(Some(ClusterView::new(m, &st)))
    }

    /// Marks a node as draining (its instances move elsewhere, replacements
    /// first) or not.
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<(), NodeError> {
        let st = self.known_node(name).await?;
        let key = format!("{NODE_ADMIN}{name}");
        let v = serde_json::to_vec(&NodeAdmin { draining }).expect("encodes");
        // Only if unchanged since read: a concurrent remove is not undone.
        let rev = st.1;
        let txn = Txn::new().when(Compare::mod_revision(&key, rev)).and_then(TxnOp::put(&key, v, None));
        if !self.inner.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        Ok(())
    }

    /// Forgets a node that is gone (holds no lease): it no longer shows in
    /// `halo node list`. A live node is refused.
    pub async fn remove_node(&self, name: &str) -> Result<(), NodeError> {
        let (st, _) = self.known_node(name).await?;
        if st.nodes.contains_key(name) {
            return Err(NodeError::BadRequest(format!(
                "node '{name}' is alive (it holds a lease); stop its agent first (drain it to move its instances)"
            )));
        }
        self.inner.store.delete(&format!("{NODE_ADMIN}{name}")).await?;
        Ok(())
    }

    /// The cluster state, if `name` is a node it knows (live or gone), with
    /// the mod revision of the node's admin record (0: none).
    async fn known_node(&self, name: &str) -> Result<(ClusterState, i64), NodeError> {
        let Some(m) = &self.inner.cluster else {
            return Err(NodeError::BadRequest(
                "this is a single node (halo up); nodes are managed on cluster nodes (halo agent)".into(),
            ));
        };
        let st = cluster::read_state(&*self.inner.store, &mut *m.views.lock().await).await?;
        if !st.nodes.contains_key(name) && !st.admin.contains_key(name) {
            let mut known: Vec<&str> = st.nodes.keys().chain(st.admin.keys()).map(String::as_str).collect();
            known.sort();
            known.dedup();
            return Err(NodeError::NoSuchNode { name: name.to_string(), known: known.join(", ") });
        }
        let rev = self.inner.store.get(&format!("{NODE_ADMIN}{name}")).await?.map_or(0, |kv| kv.mod_revision);
        Ok((st, rev))
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.inner.proxy
    }

    /// Creates or replaces a service from its file's text.
    pub async fn apply(&self, source: &str, text: &str) -> Result<(String, ApplyOutcome), NodeError> {
        let (file, _) = halo_model::parse_service(source, text)?;
        if self.inner.base.upstreams.contains_key(&file.name) {
            return Err(NodeError::BadRequest(format!(
                "name: '{}' is a static upstream of the node file; choose another service name",
                file.name
            )));
        }
        let key = service_key(&file.name);
        let current = self.inner.store.get(&key).await?;
        let (generation, outcome) = match &current {
            Some(kv) => {
                let old: ServiceRecord = decode(&kv.value)?;
                if old.spec == file.to_toml() {
                    return Ok((file.name, ApplyOutcome::Unchanged));
                }
                (old.restart_generation, ApplyOutcome::Updated)
            }
            None => (0, ApplyOutcome::Created),
        };
        let rec = ServiceRecord { spec: file.to_toml(), restart_generation: generation };
        self.put_if_unchanged(&key, current.map_or(0, |kv| kv.mod_revision), &rec).await?;
        Ok((file.name, outcome))
    }

    /// Sets the replica count.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<(), NodeError> {
        self.modify(name, |file, _| {
            file.replicas = Some(replicas);
            file.validate().map(drop).map_err(NodeError::from)
        })
        .await
    }

    /// Replaces every instance, one at a time, keeping capacity.
    pub async fn restart(&self, name: &str) -> Result<(), NodeError> {
        self.modify(name, |_, generation| {
            *generation += 1;
            Ok(())
        })
        .await
    }

    pub async fn delete(&self, name: &str) -> Result<(), NodeError> {
        match self.inner.store.delete(&service_key(name)).await? {
            Some(_) => {
                self.inner.wake.notify_one();
                Ok(())
            }
            None => Err(NodeError::NotFound(name.into())),
        }
    }

    /// The service file as stored.
    pub async fn get(&self, name: &str) -> Result<String, NodeError> {
        let kv = self.inner.store.get(&service_key(name)).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        Ok(decode::<ServiceRecord>(&kv.value)?.spec)
    }

    async fn modify(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServiceFile, &mut u64) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        let key = service_key(name);
        let kv = self.inner.store.get(&key).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        let mut rec: ServiceRecord = decode(&kv.value)?;
        let (mut file, _) = halo_model::parse_service(&key, &rec.spec)?;
        f(&mut file, &mut rec.restart_generation)?;
        rec.spec = file.to_toml();
        self.put_if_unchanged(&key, kv.mod_revision, &rec).await
    }

    async fn put_if_unchanged(&self, key: &str, mod_revision: i64, rec: &ServiceRecord) -> Result<(), NodeError> {
        let txn = Txn::new().when(Compare::mod_revision(key, mod_revision)).and_then(TxnOp::put(key, json(rec), None));
        if !self.inner.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Every service with its instances.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let specs = self.inner.service_specs();
        let statuses = self.inner.statuses();
        specs
            .into_iter()
            .map(|(name, (replicas, template))| {
                let instances: Vec<InstanceView> = statuses
                    .iter()
                    .filter(|(s, _)| s.service == name)
                    .map(|(s, stopping)| InstanceView {
                        status: s.clone(),
                        stopping: *stopping,
                        current: self.inner.instance_template(&s.id).as_deref() == Some(template.as_str()),
                    })
                    .collect();
                let ready = instances.iter().filter(|i| i.status.ready && !i.stopping).count();
                ServiceStatus { name, replicas, ready, instances }
            })
            .collect()
    }

    /// Log files of a service's instances (running or recently stopped),
    /// or of one instance.
    pub fn logs(&self, service: &str, instance: Option<&str>) -> Result<Vec<(String, LogFile)>, NodeError> {
        let dir = self.inner.env.logs_dir.join(service);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|_| NodeError::NotFound(service.into()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(str::to_string))
            .collect();
        ids.sort();
        if let Some(want) = instance {
            ids.retain(|i| i == want);
            if ids.is_empty() {
                return Err(NodeError::BadRequest(format!("service '{service}' has no instance '{want}'")));
            }
        }
        let files =
            ids.into_iter().filter_map(|id| LogFile::new(&self.inner.env.logs_dir, service, &id).ok().map(|f| (id, f)));
        Ok(files.collect())
    }

    /// Supervisor metrics (and this node's cluster counters) in Prometheus
    /// text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.inner.cluster {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &m.counters;
            let counters = [
                ("lease_renew_failures_total", "Failed renewals of this node's lease.", &c.lease_renew_failures),
                ("leases_granted_total", "Leases this node registered under.", &c.leases_granted),
                ("watch_restarts_total", "Store watches resumed after breaking.", &c.watch_restarts),
                ("elections_won_total", "Times this node became leader.", &c.elections_won),
                ("step_downs_total", "Times this node stopped leading.", &c.step_downs),
                ("fenced_writes_total", "Leader writes refused by the fencing check.", &c.fenced_writes),
                ("stale_orders_ignored_total", "Assignments of a deposed leader not obeyed.", &c.stale_orders_ignored),
            ];
            for (name, help, v) in counters {
                out.push_str(&format!(
                    "# HELP halo_cluster_{name} {help}\n# TYPE halo_cluster_{name} counter\nhalo_cluster_{name} {}\n",
                    v.load(Relaxed)
                ));
            }
            out.push_str(
                "# HELP halo_cluster_is_leader Whether this node leads.\n# TYPE halo_cluster_is_leader gauge\n",
            );
            out.push_str(&format!("halo_cluster_is_leader {}\n", u8::from(m.leading().is_some())));
            out.push_str("# HELP halo_cluster_lease_held Whether this node holds a fresh lease.\n# TYPE halo_cluster_lease_held gauge\n");
            out.push_str(&format!("halo_cluster_lease_held {}\n", u8::from(m.lease().is_some())));
            out.push_str("# HELP halo_cluster_max_fencing_token Highest leader token this node has seen.\n# TYPE halo_cluster_max_fencing_token gauge\n");
            out.push_str(&format!("halo_cluster_max_fencing_token {}\n", m.max_token.load(Relaxed)));
        }
        out.push_str("# HELP halo_instance_restarts_total Restarts of each instance.\n# TYPE halo_instance_restarts_total counter\n");
        let statuses = self.inner.statuses();
        for (s, _) in &statuses {
            out.push_str(&format!(
                "halo_instance_restarts_total{{service=\"{}\",instance=\"{}\"}} {}\n",
                s.service, s.id, s.restarts
            ));
        }
        out.push_str("# HELP halo_instance_ready Whether each instance passes readiness (1) or not (0).\n# TYPE halo_instance_ready gauge\n");
        for (s, _) in &statuses {
            out.push_str(&format!(
                "halo_instance_ready{{service=\"{}\",instance=\"{}\"}} {}\n",
                s.service,
                s.id,
                u8::from(s.ready)
            ));
        }
        out.push_str("# HELP halo_probe_failures_total Failed probe checks of each instance.\n# TYPE halo_probe_failures_total counter\n");
        for (s, _) in &statuses {
            let f = s.probe_failures;
            for (probe, n) in [("startup", f.startup), ("readiness", f.readiness), ("liveness", f.liveness)] {
                out.push_str(&format!(
                    "halo_probe_failures_total{{service=\"{}\",instance=\"{}\",probe=\"{probe}\"}} {n}\n",
                    s.service, s.id
                ));
            }
        }
        out.push_str("# HELP halo_instance_state Instances by service and state.\n# TYPE halo_instance_state gauge\n");
        let mut counts = std::collections::BTreeMap::new();
        for (s, _) in &statuses {
            let state =
                serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            *counts.entry((s.service.clone(), state)).or_insert(0) += 1;
        }
        for ((service, state), n) in counts {
            out.push_str(&format!("halo_instance_state{{service=\"{service}\",state=\"{state}\"}} {n}\n"));
        }
        out
    }

    /// Leaves every instance running and unsupervised, then drains the
    /// proxy: halo is being replaced and the next one adopts them.
    pub async fn detach(&self, grace: Duration) {
        self.inner.detach_all();
        self.inner.proxy.shutdown(grace).await;
    }

    /// Drains and stops every instance, then the proxy.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop_all().await;
        self.inner.proxy.shutdown(grace).await;
    }
}

fn json(rec: &ServiceRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a record always encodes")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(bytes).map_err(|e| NodeError::BadRequest(format!("stored record unreadable: {e}")))
}

/// The reconcile loop: when woken (store changes, instance status
/// changes) and once a second.
async fn run(node: Arc<Inner>) {
    loop {
        if let Err(e) = node.reconcile().await {
            tracing::warn!(error = %e, "reconcile failed; retrying");
        }
        tokio::select! {
            _ = node.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The cluster as `halo status` and `halo node list` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// The node answering.
    pub node: String,
    pub leader: Option<String>,
    /// The leader key's create revision.
    pub fencing_token: Option<i64>,
    pub nodes: Vec<NodeView>,
    pub services: Vec<ClusterServiceView>,
    pub placements: Vec<PlacementView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub name: String,
    pub addr: Option<std::net::IpAddr>,
    pub zone: Option<String>,
    pub capacity: Option<u32>,
    /// Holds a live lease.
    pub alive: bool,
    /// The lease it holds (hex, as etcdctl shows it).
    pub lease: Option<String>,
    pub draining: bool,
    pub leader: bool,
    pub placements: usize,
    pub ready: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterServiceView {
    pub name: String,
    pub replicas: u32,
    pub placed: usize,
    pub ready: usize,
    /// Replicas not placed yet or not ready yet.
    pub pending: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlacementView {
    pub id: String,
    pub service: String,
    pub node: String,
    pub ready: bool,
    pub endpoint: Option<std::net::SocketAddr>,
}

impl ClusterView {
    fn new(m: &Membership, st: &ClusterState) -> ClusterView {
        let leader = st.leader.as_ref().map(|(n, _)| n.clone());
        let mut names: std::collections::BTreeSet<&String> = st.nodes.keys().collect();
        names.extend(st.admin.keys());
        let nodes = names
            .into_iter()
            .map(|name| {
                let rec = st.nodes.get(name);
                let mine = st.assignments.values().filter(|a| &a.placement.node == name);
                let ids: Vec<&String> = mine.map(|a| &a.placement.id).collect();
                NodeView {
                    name: name.clone(),
                    addr: rec.map(|r| r.addr),
                    zone: rec.map(|r| r.zone.clone()),
                    capacity: rec.map(|r| r.capacity),
                    alive: rec.is_some(),
                    lease: st.leases.get(name).map(|l| format!("{l:x}")),
                    draining: st.admin.get(name).is_some_and(|a| a.draining),
                    leader: leader.as_ref() == Some(name),
                    placements: ids.len(),
                    ready: ids.iter().filter(|id| st.endpoints.contains_key(**id)).count(),
                }
            })
            .collect();
        let services = st
            .services
            .iter()
            .map(|(name, want)| {
                let placed: Vec<&String> =
                    st.assignments.values().filter(|a| &a.placement.service == name).map(|a| &a.placement.id).collect();
                let ready = placed.iter().filter(|id| st.endpoints.contains_key(**id)).count();
                ClusterServiceView {
                    name: name.clone(),
                    replicas: want.replicas,
                    placed: placed.len(),
                    ready,
                    pending: (want.replicas as usize).saturating_sub(ready),
                }
            })
            .collect();
        let placements = st
            .assignments
            .values()
            .map(|a| PlacementView {
                id: a.placement.id.clone(),
                service: a.placement.service.clone(),
                node: a.placement.node.clone(),
                ready: st.endpoints.contains_key(&a.placement.id),
                endpoint: st.endpoints.get(&a.placement.id).map(|(_, e)| e.addr),
            })
            .collect();
        ClusterView {
            node: m.cfg.node.clone(),
            leader,
            fencing_token: st.leader.as_ref().map(|(_, t)| *t),
            nodes,
            services,
            placements,
        }
    }

    /// Cluster metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP halo_cluster_nodes Nodes by liveness.\n# TYPE halo_cluster_nodes gauge\n");
        let alive = self.nodes.iter().filter(|n| n.alive).count();
        out.push_str(&format!("halo_cluster_nodes{{state=\"alive\"}} {alive}\n"));
        out.push_str(&format!("halo_cluster_nodes{{state=\"gone\"}} {}\n", self.nodes.len() - alive));
        out.push_str("# HELP halo_cluster_leader Which node leads (1).\n# TYPE halo_cluster_leader gauge\n");
        if let Some(l) = &self.leader {
            out.push_str(&format!("halo_cluster_leader{{node=\"{l}\"}} 1\n"));
        }
        out.push_str(
            "# HELP halo_cluster_placements Placements per service and node.\n# TYPE halo_cluster_placements gauge\n",
        );
        let mut counts = std::collections::BTreeMap::new();
        for p in &self.placements {
            *counts.entry((&p.service, &p.node)).or_insert(0) += 1;
        }
        for ((s, n), c) in counts {
            out.push_str(&format!("halo_cluster_placements{{service=\"{s}\",node=\"{n}\"}} {c}\n"));
        }
        out.push_str(
            "# HELP halo_cluster_pending Replicas of each service not ready yet.\n# TYPE halo_cluster_pending gauge\n",
        );
        for s in &self.services {
            out.push_str(&format!("halo_cluster_pending{{service=\"{}\"}} {}\n", s.name, s.pending));
        }
        out
    }
}
