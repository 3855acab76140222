//! The node's reconciler: converges the instances this node runs to what
//! it should run, and feeds the proxy the ready endpoints.
//!
//! One loop: list the services, compare with the instances, start or stop
//! what differs, publish endpoints. It runs on every store change, every
//! instance status change and once a second.
//!
//! What "should run" depends on the mode. On a single node (`halo up`) the
//! node decides itself from each service's replicas; rolling replacement
//! keeps capacity (at most one extra instance, none fewer ready than asked):
//! a new instance starts, becomes ready, then an old one is drained and
//! stopped. On a cluster node (`halo agent`) the leader decides: the node
//! runs exactly the assignments under its name, publishes its ready
//! instances as endpoints on its lease, and routes to every node's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use halo_model::{ServiceFile, ServiceSpec};
use halo_proxy::config::{Config, EndpointConfig, PathMatch, RouteConfig, UpstreamConfig, UpstreamProtocol};
use halo_proxy::Proxy;
use halo_store::{Store, StoreError};
use halo_supervisor::{Env, Instance, InstanceSpec, Status};
use tokio::sync::{watch, Notify};

use crate::cluster::{endpoint_key, Assignment, EndpointRecord, Membership, ASSIGNMENTS, ENDPOINTS};
use crate::records::{InstanceRecord, ServiceRecord, INSTANCES, SERVICES};

/// Between taking an instance out of the proxy and signalling it.
const DRAIN_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// A service as the node runs it.
#[derive(Clone)]
struct Svc {
    /// The store's mod revision of the service key this was parsed from.
    revision: i64,
    file: ServiceFile,
    spec: Arc<ServiceSpec>,
    template: String,
}

struct Managed {
    record: InstanceRecord,
    status: watch::Receiver<Status>,
    /// `None` once a stop has begun.
    instance: Option<Instance>,
}

impl Managed {
    fn stopping(&self) -> bool {
        self.instance.is_none()
    }

    fn ready(&self) -> bool {
        !self.stopping() && self.status.borrow().ready
    }
}

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub proxy: Arc<Proxy>,
    pub base: Config,
    pub env: Arc<Env>,
    pub data_dir: PathBuf,
    instances: Mutex<BTreeMap<String, Managed>>,
    services: Mutex<BTreeMap<String, Svc>>,
    published: Mutex<Option<BTreeMap<String, Vec<EndpointConfig>>>>,
    pub wake: Notify,
    /// Where this node's instance records live (per node in a cluster).
    records: String,
    /// Set on a cluster node.
    pub cluster: Option<Arc<Membership>>,
    /// Ready endpoints of every other node, by service, from the store.
    remote: Mutex<BTreeMap<String, Vec<std::net::SocketAddr>>>,
    /// Set by [`Inner::stop_all`]: nothing is started any more.
    shutting_down: std::sync::atomic::AtomicBool,
}

/// Decisions of one reconcile pass.
#[derive(Default)]
struct Plan {
    start: Vec<String>,
    stop: Vec<String>,
}

impl Inner {
    pub fn new(
        store: Arc<dyn Store>,
        proxy: Arc<Proxy>,
        base: Config,
        env: Arc<Env>,
        data_dir: PathBuf,
        cluster: Option<Arc<Membership>>,
    ) -> Inner {
        let records = match &cluster {
            Some(m) => format!("{INSTANCES}{}/", m.cfg.node),
            None => INSTANCES.to_string(),
        };
        Inner {
            records,
            cluster,
            remote: Mutex::new(BTreeMap::new()),
            store,
            proxy,
            base,
            env,
            data_dir,
            instances: Mutex::new(BTreeMap::new()),
            services: Mutex::new(BTreeMap::new()),
            published: Mutex::new(None),
            wake: Notify::new(),
            shutting_down: Default::default(),
        }
    }

    fn record_key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.records)
    }

    /// Reads the services from the store. A record that no longer
    /// validates (written by another version) is skipped with an error.
    async fn load_services(&self) -> Result<BTreeMap<String, Svc>, StoreError> {
        let listing = self.store.list(SERVICES).await?;
        let cached = self.services.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = BTreeMap::new();
        for kv in listing.kvs {
            let name = kv.key.trim_start_matches(SERVICES).to_string();
            // Unchanged since the last pass: no need to parse it again.
            if let Some(svc) = cached.get(&name).filter(|s| s.revision == kv.mod_revision) {
                out.insert(name, svc.clone());
                continue;
            }
            let parsed = serde_json::from_slice::<ServiceRecord>(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|r| halo_model::parse_service(&kv.key, &r.spec).map(|x| (r, x)).map_err(|e| e.to_string()));
            match parsed {
                Ok((rec, (file, mut spec))) => {
                    let template = ServiceRecord::template(&file, rec.restart_generation);
                    let dir = self.data_dir.display().to_string();
                    spec.run.env.insert("HALO_DATA_DIR".into(), dir);
                    out.insert(name, Svc { revision: kv.mod_revision, file, spec: Arc::new(spec), template });
                }
                Err(e) => tracing::error!(service = %name, error = %e, "stored service is not valid; ignored"),
            }
        }
        Ok(out)
    }

    fn plan(&self, services: &BTreeMap<String, Svc>) -> Plan {
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        let mut plan = Plan::default();
        for (id, m) in instances.iter() {
            if !m.stopping() && !services.contains_key(&m.record.service) {
                plan.stop.push(id.clone());
            }
        }
        for (name, svc) in services {
            let mine: Vec<(&String, &Managed)> =
                instances.iter().filter(|(_, m)| &m.record.service == name && !m.stopping()).collect();
            let (new, old): (Vec<_>, Vec<_>) = mine.into_iter().partition(|(_, m)| m.record.template == svc.template);
            let want = svc.spec.replicas as usize;
            let new_ready = new.iter().filter(|(_, m)| m.ready()).count();
            let old_ready = old.iter().filter(|(_, m)| m.ready()).count();
            if old.is_empty() {
                for _ in new.len()..want {
                    plan.start.push(name.clone());
                }
                // Scale down: the not-ready first, then the newest.
                let mut extra: Vec<_> = new.iter().collect();
                extra.sort_by_key(|(_, m)| (m.ready(), std::cmp::Reverse(m.status.borrow().since)));
                plan.stop.extend(extra.iter().take(new.len().saturating_sub(want)).map(|(id, _)| (*id).clone()));
                continue;
            }
            // Rolling: one new instance at a time, each once the previous is
            // ready; an old one goes only while enough others are ready.
            if new.len() < want && new_ready == new.len() {
                plan.start.push(name.clone());
            }
            let mut old_sorted: Vec<_> = old.iter().collect();
            old_sorted.sort_by_key(|(_, m)| m.ready());
            if let Some((id, m)) = old_sorted.first() {
                // A not-ready instance carries no traffic: it can go at once.
                if !m.ready() || new_ready + old_ready > want {
                    plan.stop.push((*id).clone());
                }
            }
        }
        plan
    }

    /// Free port on loopback for a new instance, not one a live instance has.
    fn free_port(&self) -> std::io::Result<u16> {
        let taken: BTreeSet<u16> =
            self.instances.lock().unwrap_or_else(|e| e.into_inner()).values().map(|m| m.status.borrow().port).collect();
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            if !taken.contains(&port) {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no free port found"))
    }

    /// Starts an instance of `svc`: adopts `adopt`'s process if it is
    /// alive, or starts a new one (named `assigned`'s id and template on a
    /// cluster node).
    async fn start_instance(
        self: &Arc<Self>,
        svc: &Svc,
        adopt: Option<InstanceRecord>,
        assigned: Option<&Assignment>,
    ) -> anyhow_lite::Result<()> {
        let record = match adopt {
            Some(r) => r,
            None => {
                let (id, template) = match assigned {
                    Some(a) => (a.placement.id.clone(), a.placement.template.clone()),
                    None => (format!("{}-{}", svc.file.name, short_id()), svc.template.clone()),
                };
                let port = self.free_port()?;
                let r =
                    InstanceRecord { id, service: svc.file.name.clone(), port, template, pid: None, start_time: None };
                // The record exists before the process does: a halo killed
                // in between finds the record, not an unknown process.
                self.store.put(&self.record_key(&r.service, &r.id), serde_json::to_vec(&r)?, None).await?;
                r
            }
        };
        let spec = InstanceSpec {
            id: record.id.clone(),
            service: record.service.clone(),
            spec: svc.spec.clone(),
            port: record.port,
        };
        let adopt = record.pid.zip(record.start_time);
        let instance = Instance::start(self.env.clone(), spec, adopt)?;
        let status = instance.subscribe();
        self.instances.lock().unwrap_or_else(|e| e.into_inner()).insert(
            record.id.clone(),
            Managed { record: record.clone(), status: status.clone(), instance: Some(instance) },
        );
        tokio::spawn(follow_status(self.clone(), record, status));
        Ok(())
    }

    /// Drain (out of the proxy first), stop, forget.
    fn stop_instance(self: &Arc<Self>, id: &str) {
        let taken = {
            let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            instances.get_mut(id).and_then(|m| m.instance.take().map(|i| (i, m.record.clone())))
        };
        let Some((instance, record)) = taken else { return };
        self.publish();
        let me = self.clone();
        tokio::spawn(async move {
            // Other nodes' proxies stop sending once the endpoint is gone.
            if me.cluster.is_some() {
                if let Err(e) = me.store.delete(&endpoint_key(&record.service, &record.id)).await {
                    tracing::debug!(instance = %record.id, error = %e, "withdrawing the endpoint failed");
                }
            }
            // Requests the proxies sent before the removal finish first.
            tokio::time::sleep(DRAIN_DELAY).await;
            instance.stop().await;
            if let Err(e) = me.store.delete(&me.record_key(&record.service, &record.id)).await {
                tracing::warn!(instance = %record.id, error = %e, "removing the instance record failed");
            }
            me.instances.lock().unwrap_or_else(|e| e.into_inner()).remove(&record.id);
            // Scaled away or replaced: its log goes with it.
            if let Ok(log) = halo_supervisor::LogFile::new(&me.env.logs_dir, &record.service, &record.id) {
                log.remove();
            }
            me.wake.notify_one();
        });
    }

    /// One reconcile pass.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), StoreError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let services = self.load_services().await?;
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = services.clone();
        if let Some(m) = self.cluster.clone() {
            return self.reconcile_assigned(&m, &services).await;
        }
        let plan = self.plan(&services);
        for id in &plan.stop {
            tracing::info!(instance = %id, "stopping instance");
            self.stop_instance(id);
        }
        for name in &plan.start {
            if let Err(e) = self.start_instance(&services[name], None, None).await {
                tracing::error!(service = %name, error = %e, "starting an instance failed");
            }
        }
        self.publish();
        Ok(())
    }

    /// A cluster node's pass: run exactly the assignments under this
    /// node's name, publish the ready ones as endpoints on the node lease,
    /// and route to every node's endpoints. Nothing is stopped when the
    /// store cannot be read (static stability): this acts only on listings
    /// that succeeded.
    async fn reconcile_assigned(
        self: &Arc<Self>,
        m: &Arc<Membership>,
        services: &BTreeMap<String, Svc>,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let node = &m.cfg.node;
        let listing = self.store.list(&format!("{ASSIGNMENTS}{node}/")).await?;
        let endpoints = self.store.list(ENDPOINTS).await?;
        let mut assigned: BTreeMap<String, Assignment> = BTreeMap::new();
        for kv in listing.kvs {
            let Ok(a) = serde_json::from_slice::<Assignment>(&kv.value) else { continue };
            // Fencing as the agent sees it: an order written after a newer
            // leader was elected, by an older one, is not obeyed.
            let max = m.max_token.load(Ordering::SeqCst);
            if a.token < max && kv.mod_revision > max {
                m.counters.stale_orders_ignored.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(instance = %a.placement.id, token = a.token, max, "ignoring an order of a deposed leader");
                continue;
            }
            m.see_token(a.token);
            assigned.insert(a.placement.id.clone(), a);
        }
        let (stop, start) = {
            let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            let stop: Vec<String> = instances
                .iter()
                .filter(|(id, mi)| !mi.stopping() && !assigned.contains_key(*id))
                .map(|(id, _)| id.clone())
                .collect();
            let start: Vec<Assignment> =
                assigned.values().filter(|a| !instances.contains_key(&a.placement.id)).cloned().collect();
            (stop, start)
        };
        for id in &stop {
            tracing::info!(instance = %id, "no longer assigned here; stopping");
            self.stop_instance(id);
        }
        for a in &start {
            let Some(svc) = services.get(&a.placement.service) else { continue };
            tracing::info!(instance = %a.placement.id, "assigned here; starting");
            if let Err(e) = self.start_instance(svc, None, Some(a)).await {
                tracing::error!(instance = %a.placement.id, error = %e, "starting an instance failed");
            }
        }
        // Every other node's endpoints, for the proxy; ours come from what
        // this node knows, and are re-published from it.
        let mut remote: BTreeMap<String, Vec<std::net::SocketAddr>> = BTreeMap::new();
        let mut ours: BTreeMap<String, (EndpointRecord, Option<i64>)> = BTreeMap::new();
        for kv in endpoints.kvs {
            let rest = kv.key.trim_start_matches(ENDPOINTS);
            let Some((service, _)) = rest.split_once('/') else { continue };
            let Ok(e) = serde_json::from_slice::<EndpointRecord>(&kv.value) else { continue };
            if &e.node == node {
                ours.insert(kv.key.clone(), (e, kv.lease));
            } else {
                remote.entry(service.to_string()).or_default().push(e.addr);
            }
        }
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = remote;
        self.sync_endpoints(m, ours).await;
        self.publish();
        Ok(())
    }

    /// Makes this node's endpoints in the store match its ready instances,
    /// on the current lease.
    async fn sync_endpoints(&self, m: &Membership, stored: BTreeMap<String, (EndpointRecord, Option<i64>)>) {
        let Some(lease) = m.lease() else { return };
        let want: BTreeMap<String, EndpointRecord> = {
            let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            instances
                .values()
                .filter(|mi| mi.ready())
                .map(|mi| {
                    let port = mi.status.borrow().port;
                    let e = EndpointRecord { node: m.cfg.node.clone(), addr: (m.cfg.addr, port).into() };
                    (endpoint_key(&mi.record.service, &mi.record.id), e)
                })
                .collect()
        };
        for (key, e) in &want {
            if stored.get(key).is_some_and(|(s, l)| s == e && *l == Some(lease)) {
                continue;
            }
            let v = serde_json::to_vec(e).expect("an endpoint record encodes");
            if let Err(err) = self.store.put(key, v, Some(lease)).await {
                tracing::warn!(endpoint = %key, error = %err, "publishing an endpoint failed");
            }
        }
        for key in stored.keys().filter(|k| !want.contains_key(*k)) {
            if let Err(err) = self.store.delete(key).await {
                tracing::warn!(endpoint = %key, error = %err, "withdrawing an endpoint failed");
            }
        }
    }

    /// Takes over the instances a previous halo left: adopts live ones,
    /// restarts dead ones under the same record, stops those of deleted
    /// services. Then kills any process of this data dir nobody knows.
    pub async fn adopt(self: &Arc<Self>) -> Result<(), StoreError> {
        let services = self.load_services().await?;
        let listing = self.store.list(&self.records).await?;
        let mut known_groups = BTreeSet::new();
        let mut to_start = Vec::new();
        for kv in listing.kvs {
            let Ok(rec) = serde_json::from_slice::<InstanceRecord>(&kv.value) else {
                tracing::warn!(key = %kv.key, "unreadable instance record removed");
                self.store.delete(&kv.key).await?;
                continue;
            };
            let live = rec.pid.zip(rec.start_time).filter(|(p, t)| halo_supervisor::alive(*p, *t));
            match (services.get(&rec.service), live) {
                (Some(svc), Some((pid, _))) => {
                    known_groups.insert(pid);
                    tracing::info!(instance = %rec.id, pid, "adopting running instance");
                    to_start.push((svc, rec));
                }
                // A cluster node starts only what is assigned to it now:
                // the reconcile pass decides, under a fresh record.
                (Some(_), None) if self.cluster.is_some() => {
                    self.store.delete(&kv.key).await?;
                }
                (Some(svc), None) => to_start.push((svc, rec)),
                (None, Some((pid, _))) => {
                    tracing::info!(instance = %rec.id, pid, "stopping instance of a deleted service");
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    self.store.delete(&kv.key).await?;
                }
                (None, None) => {
                    self.store.delete(&kv.key).await?;
                }
            }
        }
        // Before anything new starts: what runs now and is in no record is
        // an orphan.
        sweep_orphans(&self.data_dir.display().to_string(), &known_groups);
        for (svc, rec) in to_start {
            if let Err(e) = self.start_instance(svc, Some(rec.clone()), None).await {
                tracing::error!(instance = %rec.id, error = %e, "adopting failed");
            }
        }
        Ok(())
    }

    /// Builds the proxy config from the node file plus every service's
    /// routes and ready endpoints, and installs it if endpoints or services
    /// changed.
    pub fn publish(&self) {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut endpoints: BTreeMap<String, Vec<EndpointConfig>> =
            services.keys().map(|n| (n.clone(), Vec::new())).collect();
        // Our own instances at the address they are reached on.
        let host = self.cluster.as_ref().map_or([127, 0, 0, 1].into(), |m| m.cfg.addr);
        for m in self.instances.lock().unwrap_or_else(|e| e.into_inner()).values() {
            if m.ready() {
                if let Some(eps) = endpoints.get_mut(&m.record.service) {
                    let port = m.status.borrow().port;
                    eps.push(EndpointConfig { addr: (host, port).into(), weight: 1 });
                }
            }
        }
        for (service, list) in self.remote.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(eps) = endpoints.get_mut(service) {
                eps.extend(list.iter().map(|addr| EndpointConfig { addr: *addr, weight: 1 }));
            }
        }
        for eps in endpoints.values_mut() {
            eps.sort_by_key(|e| e.addr);
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let key: BTreeMap<String, Vec<EndpointConfig>> =
            endpoints.iter().map(|(k, v)| (format!("{k}@{}", services[k].template), v.clone())).collect();
        if published.as_ref() == Some(&key) {
            return;
        }
        let cfg = proxy_config(&self.base, &services, endpoints);
        match self.proxy.reload(cfg) {
            Ok(()) => *published = Some(key),
            Err(e) => tracing::error!(error = %e, "updating the proxy failed"),
        }
    }

    /// Instances of `service` (all services when `None`), as statuses.
    pub fn statuses(&self) -> Vec<(Status, bool)> {
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances.values().map(|m| (m.status.borrow().clone(), m.stopping())).collect()
    }

    pub fn service_specs(&self) -> BTreeMap<String, (u32, String)> {
        let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        services.iter().map(|(n, s)| (n.clone(), (s.spec.replicas, s.template.clone()))).collect()
    }

    pub fn instance_template(&self, id: &str) -> Option<String> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|m| m.record.template.clone())
    }

    /// Stops every instance (halo is shutting down), draining each first.
    pub async fn stop_all(self: &Arc<Self>) {
        self.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<(Instance, InstanceRecord)> = {
            let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
            instances.values_mut().filter_map(|m| m.instance.take().map(|i| (i, m.record.clone()))).collect()
        };
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.publish();
        tokio::time::sleep(DRAIN_DELAY).await;
        let stops: Vec<_> = all.into_iter().map(|(i, _)| tokio::spawn(i.stop())).collect();
        for s in stops {
            let _ = s.await;
        }
    }

    /// Stops supervising and leaves every instance running, for the next
    /// halo to adopt (an upgrade of halo itself).
    pub fn detach_all(&self) {
        self.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        for m in instances.values_mut() {
            if let Some(i) = m.instance.take() {
                i.detach();
            }
        }
    }
}

/// Keeps the instance's record in step with its process, and wakes the
/// reconciler on every change.
async fn follow_status(node: Arc<Inner>, mut record: InstanceRecord, mut status: watch::Receiver<Status>) {
    let mut last = None;
    loop {
        let s = status.borrow_and_update().clone();
        // Counters (probe failures) change often; only a change of what the
        // node acts on is worth a reconcile pass.
        let key = (s.state, s.ready, s.pid, s.port);
        if last == Some(key) {
            if status.changed().await.is_err() {
                return;
            }
            continue;
        }
        last = Some(key);
        if s.pid.is_some() && (s.pid, s.start_time, s.port) != (record.pid, record.start_time, record.port) {
            record.pid = s.pid;
            record.start_time = s.start_time;
            record.port = s.port;
            let key = node.record_key(&record.service, &record.id);
            match serde_json::to_vec(&record) {
                Ok(v) => {
                    if let Err(e) = node.store.put(&key, v, None).await {
                        tracing::warn!(instance = %record.id, error = %e, "recording the instance's pid failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "encoding an instance record failed"),
            }
        }
        node.publish();
        node.wake.notify_one();
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Kills every process group whose leader carries `HALO_DATA_DIR=dir` in
/// its environment and is not one of `known` (started by a halo that died
/// before it could record the pid).
fn sweep_orphans(dir: &str, known: &BTreeSet<i32>) {
    let needle = format!("HALO_DATA_DIR={dir}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let pgid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(2)?.parse::<i32>().ok());
        if let Some(pgid) = pgid.filter(|g| !known.contains(g) && *g == pid) {
            tracing::warn!(pid, "killing an orphaned instance process group");
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn short_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// The node file's proxy config plus one upstream and its routes per
/// service. Service routes follow the file's own, most specific first.
fn proxy_config(
    base: &Config,
    services: &BTreeMap<String, Svc>,
    mut endpoints: BTreeMap<String, Vec<EndpointConfig>>,
) -> Config {
    let mut cfg = base.clone();
    let mut routes = Vec::new();
    for (name, svc) in services {
        let b = &svc.spec.balance;
        cfg.upstreams.insert(
            name.clone(),
            UpstreamConfig {
                name: name.clone(),
                endpoints: endpoints.remove(name).unwrap_or_default(),
                policy: b.policy,
                hash_key: b.hash_key.clone(),
                session_cookie: b.session_cookie.clone(),
                slow_start: None,
                protocol: UpstreamProtocol::Http1,
                pool: Default::default(),
                // Readiness probes decide membership; passive outlier
                // detection still ejects an endpoint that fails requests.
                health: None,
                outlier: Some(Default::default()),
            },
        );
        for (i, r) in svc.spec.routes.iter().enumerate() {
            routes.push(RouteConfig {
                name: format!("{name}.{i}"),
                listeners: None,
                host: r.host.as_deref().map(|h| match h.strip_prefix('*') {
                    Some(suffix) => halo_proxy::config::HostMatch::Suffix(suffix.to_string()),
                    None => halo_proxy::config::HostMatch::Exact(h.to_string()),
                }),
                path: Some(match &r.path {
                    halo_model::PathRule::Prefix(p) => PathMatch::Prefix(p.clone()),
                    halo_model::PathRule::Exact(p) => PathMatch::Exact(p.clone()),
                }),
                methods: Vec::new(),
                headers: Vec::new(),
                split: vec![(name.clone(), 1)],
                overrides: Vec::new(),
                timeouts: b.timeouts.clone(),
                retry: b.retry.clone(),
            });
        }
    }
    routes.sort_by_key(|r| {
        let host = match &r.host {
            Some(halo_proxy::config::HostMatch::Exact(_)) => 0,
            Some(halo_proxy::config::HostMatch::Suffix(_)) => 1,
            None => 2,
        };
        let path = match &r.path {
            Some(PathMatch::Exact(p)) => (0, std::cmp::Reverse(p.len())),
            Some(PathMatch::Prefix(p)) => (1, std::cmp::Reverse(p.len())),
            None => (2, std::cmp::Reverse(0)),
        };
        (host, path)
    });
    cfg.routes.extend(routes);
    cfg
}

/// The small error type of this module: store, I/O and encoding failures.
mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}
