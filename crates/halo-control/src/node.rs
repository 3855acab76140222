//! [`Node`]: what the API and the binary drive. One pipeline for `halo up`
//! (a cluster of one on the embedded store) and `halo agent` (a node of a
//! cluster on etcd): membership, election, the leader's scheduler, fenced
//! assignments, the reconciler, endpoints on the node lease, the proxy fed
//! from endpoints. Service changes go to the store as compare-and-swap
//! transactions; everything else follows from the store's events.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halo_model::{Diagnostics, ServiceFile};
use halo_proxy::Proxy;
use halo_store::{Compare, Counted, Store, StoreError, Txn, TxnOp};
use halo_supervisor::{Drivers, Env, LogFile, Status};

use crate::ctx::NodeCtx;
use crate::dial::Dialer;
use crate::keys::{node_admin_key, service_key, NodeAdmin, ServiceRecord};
use crate::membership::{ClusterConfig, Membership};
use crate::migrate::{migrate, MigrateError};
use crate::proxy_config::ProxyFeed;
use crate::reconcile::{self, Reconciler};
use crate::state::View;
use crate::views::{Applied, ApplyOutcome, ClusterView, InstanceView, ServiceStatus};
use crate::NodeConfig;
use halo_model::lock::LockExt;

mod maintain;
mod rollouts;
use crate::events::EventKind;
use rollouts::stable_for;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid service:\n{0}")]
    Invalid(#[from] Diagnostics),
    #[error("{0}")]
    BadRequest(String),
    #[error("no service named '{0}'")]
    NotFound(String),
    #[error("no node named '{name}' (known nodes: {known})")]
    NoSuchNode { name: String, known: String },
    #[error("the service changed while this request was applied; try again")]
    Conflict,
    /// A stored record does not decode: the store holds something this
    /// halo cannot read (not the caller's fault).
    #[error("stored record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error("cannot start the node: {0}")]
    Start(String),
}

/// How a node runs, beyond its node file.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub cluster: ClusterConfig,
    /// Where the node's API is reached (in its node record).
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    /// The halo binary (for `command = "halo"` in service files).
    pub halo_exe: PathBuf,
    /// The address instances listen on (`HOST`).
    pub bind: IpAddr,
    /// The store is this process's alone (the embedded one): a lease left
    /// by a previous run of this node is ended at start instead of waited out.
    pub exclusive_store: bool,
    /// The cluster's API token, to ask other nodes' APIs (backup hooks).
    pub api_token: String,
    /// What runs the instances; `None`: processes and containers
    /// ([`Drivers::new`]). A simulation of many nodes in one process
    /// gives its own.
    pub drivers: Option<Drivers>,
}

impl NodeOptions {
    /// `halo up`: a cluster of one named `local` on loopback, with no
    /// capacity limit.
    pub fn single(api: SocketAddr, data_dir: PathBuf, halo_exe: PathBuf) -> NodeOptions {
        NodeOptions {
            cluster: ClusterConfig {
                node: "local".into(),
                addr: [127, 0, 0, 1].into(),
                zone: "default".into(),
                capacity: u32::MAX,
                lease_ttl: Duration::from_secs(3),
            },
            api,
            data_dir,
            halo_exe,
            bind: [127, 0, 0, 1].into(),
            exclusive_store: true,
            api_token: String::new(),
            drivers: None,
        }
    }
}

/// A running node: supervisor, proxy, reconciler, membership and election.
#[derive(Clone)]
pub struct Node {
    ctx: Arc<NodeCtx>,
    r: Arc<Reconciler>,
    hooks: Arc<crate::hooks::Hooks>,
    /// Scheduled backups' health (when the node file has `[backup]`).
    backups: Option<Arc<crate::backup_schedule::Schedule>>,
    /// Every store request this node makes, counted.
    requests: Arc<Counted>,
    /// The node file's floating IPs, when it has `[[vip]]`.
    vips: Option<Arc<crate::vip::Vips>>,
    /// The proxy's counters of the last minutes, for the dashboard.
    history: Arc<halo_proxy::history::History>,
}

impl Node {
    /// Brings the store to the current layout, starts the proxy, registers
    /// the node under a lease, follows the store, adopts the instances a
    /// previous run left, creates the node file's services the store does
    /// not have, then campaigns (the leader runs the scheduler) and runs
    /// what is assigned to this node.
    pub async fn start(cfg: NodeConfig, opts: NodeOptions, store: Arc<dyn Store>) -> Result<Node, NodeError> {
        Self::start_inherited(cfg, opts, store, None).await
    }

    /// [`Node::start`] with the proxy on the sockets an old process
    /// handed over (binary upgrade); its listeners accept only once
    /// [`Proxy::resume`] is called, when the endpoints are known again.
    pub async fn start_inherited(
        cfg: NodeConfig,
        opts: NodeOptions,
        store: Arc<dyn Store>,
        inherited: Option<&mut halo_proxy::handover::Inherited>,
    ) -> Result<Node, NodeError> {
        let requests = Arc::new(Counted::new(store));
        let store: Arc<dyn Store> = requests.clone();
        migrate(&*store, &opts.cluster.node).await?;
        let paused = inherited.is_some();
        let proxy = Proxy::start_inherited(cfg.proxy.clone(), None, inherited, paused)
            .await
            .map_err(|e| NodeError::Start(e.to_string()))?;
        let m = Arc::new(Membership::new(opts.cluster.clone(), opts.api, cfg.api_tls.is_some(), store.clone()));
        if opts.exclusive_store {
            m.reclaim().await?;
        }
        let drivers = match &opts.drivers {
            Some(d) => d.clone(),
            None => Drivers::new(&opts.halo_exe, &opts.data_dir, &opts.cluster.node),
        };
        m.set_drivers(drivers.available().await).await;
        m.register().await?;
        let view = View::start(store.clone()).await?;
        let env = Arc::new(Env {
            logs_dir: opts.data_dir.join("logs"),
            drivers: drivers.clone(),
            log_cap: 10 << 20,
            host: opts.bind,
        });
        let feed = ProxyFeed::new(proxy, cfg.proxy.clone());
        let dial = Arc::new(Dialer::new(opts.api_token.clone(), cfg.api_tls.as_ref().and_then(|t| t.peers.clone())));
        let ctx = Arc::new(NodeCtx::new(store.clone(), view.clone(), m.clone(), dial, env, opts.data_dir.clone()));
        let r = Arc::new(Reconciler::new(ctx.clone(), feed));
        let hooks = Arc::new(crate::hooks::Hooks { ctx: ctx.clone(), local: r.instances.clone() });
        let tasks = &ctx.tasks;
        tasks.spawn(ctx.peers.clone().run());
        let backups = cfg.backup.clone().map(|sched| {
            let ctl = Arc::new(crate::backup_schedule::Schedule::default());
            let dir = sched.archive_dir(&opts.data_dir);
            tasks.spawn(crate::backup_schedule::run(sched, dir, hooks.clone(), ctl.clone()));
            ctl
        });
        let vips = if cfg.vips.is_empty() {
            None
        } else {
            let proxy = r.feed.proxy.clone();
            let peers = ctx.peers.clone();
            Some(
                crate::vip::Vips::start(
                    &opts.cluster.node,
                    &cfg.vips,
                    store.clone(),
                    view.clone(),
                    proxy,
                    peers,
                    tasks,
                )
                .await,
            )
        };
        let history = Arc::new(halo_proxy::history::History::default());
        tasks.spawn(history.clone().run(Arc::downgrade(&r.feed.proxy)));
        let node = Node { ctx: ctx.clone(), r, hooks, requests, backups, vips, history };
        node.create_file_services(&cfg).await?;
        node.r.adopt().await?;
        // A handover (or one that died half way) is over: this process
        // serves the node's API from now on.
        if let Err(e) = store.delete(&crate::keys::upgrading_key(&opts.cluster.node)).await {
            tracing::warn!(error = %e, "could not clear this node's upgrade mark");
        }
        tasks.spawn(m.clone().run_lease());
        tasks.spawn(m.clone().follow_drivers(drivers));
        tasks.spawn(crate::evict::run(m.clone(), view.clone(), ctx.peers.clone()));
        tasks.spawn(crate::leader::run_election(ctx.clone()));
        tasks.spawn(reconcile::run(node.r.clone()));
        tasks.spawn(reconcile::publish_stats(node.r.clone()));
        tasks.spawn(crate::maintenance::run_here(ctx.clone()));
        tasks.spawn(crate::roles::run(node.r.clone(), node.r.stateful.clone()));
        tasks.spawn(crate::hooks::restore_pending(node.hooks.clone()));
        Ok(node)
    }

    /// Creates the node file's services the store does not have yet.
    async fn create_file_services(&self, cfg: &NodeConfig) -> Result<(), NodeError> {
        for (file, _) in &cfg.services {
            let key = service_key(&file.name);
            let rec = ServiceRecord { spec: file.to_toml(), restart_generation: 0, stable: None };
            let txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::put(&key, json(&rec), None));
            if self.ctx.store.txn(txn).await?.succeeded {
                tracing::info!(service = %file.name, "service created from the node file");
            }
        }
        Ok(())
    }

    /// The cluster as this node's view has it, now (also while the store
    /// is unreachable; [`ClusterView::view`] says how stale).
    pub fn cluster(&self) -> ClusterView {
        let m = &self.ctx.m;
        let answered = *m.last_renewed.locked();
        // Renewals come every third of the TTL: two missed is a silence.
        let freshness = self.ctx.view.freshness(answered, m.cfg.lease_ttl * 2 / 3);
        ClusterView::new(&m.cfg.node, &self.ctx.view.current(), freshness)
    }

    /// Restores the archive `bytes` into this running cluster: says what
    /// would change, and changes it when `force`.
    pub async fn restore(&self, bytes: &[u8], force: bool) -> Result<crate::backup::RestorePlan, NodeError> {
        let b = crate::backup::open(bytes)?;
        let pending = self.ctx.data_dir.join(crate::hooks::RESTORE_DIR);
        Ok(crate::backup::restore_running(&b, &*self.ctx.store, &pending, force).await?)
    }

    /// Runs `service`'s backup hook in one of this node's ready instances
    /// (another node taking a backup asks this way); its output.
    pub async fn backup_hook(&self, service: &str) -> Result<Vec<u8>, NodeError> {
        crate::hooks::run_here(&self.hooks, service).await.map_err(|e| NodeError::BadRequest(e.to_string()))
    }

    /// How scheduled backups are doing (`None` without `[backup]`).
    pub fn backup_health(&self) -> Option<crate::backup_schedule::BackupHealth> {
        self.backups.as_ref().map(|s| s.health.locked().clone())
    }

    /// Cancels the scheduled backup under way, killing its hooks.
    pub fn cancel_backup(&self) -> Result<(), NodeError> {
        match &self.backups {
            Some(s) if s.cancel() => Ok(()),
            Some(_) => Err(NodeError::BadRequest("no scheduled backup is running on this node".into())),
            None => {
                Err(NodeError::BadRequest("this node schedules no backups ([backup] every in its node file)".into()))
            }
        }
    }

    /// A backup archive of the cluster's state now ([`crate::backup`]).
    pub async fn backup(&self) -> Result<Vec<u8>, NodeError> {
        Ok(crate::backup::take(&self.hooks).await?)
    }

    /// Marks a node as draining (its instances move elsewhere, replacements
    /// first) or not.
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<(), NodeError> {
        let rev = self.known_node(name).await?;
        let key = node_admin_key(name);
        let v = serde_json::to_vec(&NodeAdmin { draining }).expect("encodes");
        // Only if unchanged since read: a concurrent remove is not undone.
        let txn = Txn::new().when(Compare::mod_revision(&key, rev)).and_then(TxnOp::put(&key, v, None));
        if !self.ctx.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        let (kind, what) = if draining {
            (EventKind::Drained, "drained: its instances move to other nodes, replacements first")
        } else {
            (EventKind::Undrained, "undrained: it takes instances again")
        };
        self.ctx.m.events.info(kind, None, None, format!("node {name} {what}"));
        Ok(())
    }

    /// Forgets a node that is gone (holds no lease): it no longer shows in
    /// `halo node list`. A live node is refused.
    pub async fn remove_node(&self, name: &str) -> Result<(), NodeError> {
        let rev = self.known_node(name).await?;
        if self.ctx.view.current().nodes.contains_key(name) {
            return Err(NodeError::BadRequest(format!(
                "node '{name}' is alive (it holds a lease); stop its agent first (drain it to move its instances)"
            )));
        }
        let key = node_admin_key(name);
        self.ctx.store.txn(Txn::new().when(Compare::mod_revision(&key, rev)).and_then(TxnOp::Delete(key))).await?;
        self.ctx.m.events.info(EventKind::Removed, None, None, format!("node {name} forgotten"));
        Ok(())
    }

    /// The mod revision of `name`'s admin record (0: none), if it is a node
    /// the view knows (live or gone).
    async fn known_node(&self, name: &str) -> Result<i64, NodeError> {
        let st = self.ctx.view.current();
        if !st.nodes.contains_key(name) && !st.admin.contains_key(name) {
            let mut known: Vec<&str> = st.nodes.keys().chain(st.admin.keys()).map(String::as_str).collect();
            known.sort();
            known.dedup();
            return Err(NodeError::NoSuchNode { name: name.to_string(), known: known.join(", ") });
        }
        Ok(self.ctx.store.get(&node_admin_key(name)).await?.map_or(0, |kv| kv.mod_revision))
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.r.feed.proxy
    }

    /// Creates or replaces a service from its file's text; with `dry_run`
    /// only says what it would do.
    pub async fn apply(&self, source: &str, text: &str, dry_run: bool) -> Result<Applied, NodeError> {
        let (file, spec) = halo_model::parse_service(source, text)?;
        if self.r.feed.base.upstreams.contains_key(&file.name) {
            return Err(NodeError::BadRequest(format!(
                "name: '{}' is a static upstream of the node file; choose another service name",
                file.name
            )));
        }
        self.check_routes_free(&file.name, &spec)?;
        let key = service_key(&file.name);
        let current = self.ctx.store.get(&key).await?;
        let after = file.to_toml();
        let before = match &current {
            Some(kv) => Some(decode::<ServiceRecord>(&key, &kv.value)?.spec),
            None => None,
        };
        let applied =
            |outcome| Applied { name: file.name.clone(), outcome, before: before.clone(), after: after.clone() };
        let outcome = match &before {
            Some(b) if *b == after => ApplyOutcome::Unchanged,
            Some(_) => ApplyOutcome::Updated,
            None => ApplyOutcome::Created,
        };
        if dry_run || outcome == ApplyOutcome::Unchanged {
            return Ok(applied(outcome));
        }
        let rec = match &current {
            Some(kv) => {
                let old: ServiceRecord = decode(&key, &kv.value)?;
                let seen = self.seen(&file.name, kv.mod_revision);
                let stable = stable_for(&key, &old, seen.as_deref(), &file, &spec)?;
                ServiceRecord { spec: file.to_toml(), restart_generation: old.restart_generation, stable }
            }
            None => ServiceRecord { spec: file.to_toml(), restart_generation: 0, stable: None },
        };
        self.put_if_unchanged(&key, current.map_or(0, |kv| kv.mod_revision), &rec).await?;
        self.ctx.m.events.info(EventKind::Applied, Some(&file.name), None, format!("{} {outcome} by apply", file.name));
        Ok(applied(outcome))
    }

    /// A route another service has already would take no traffic (the
    /// first service keeps it): refused, naming that service.
    fn check_routes_free(&self, name: &str, spec: &halo_model::ServiceSpec) -> Result<(), NodeError> {
        let st = self.ctx.view.current();
        for (i, r) in spec.routes.iter().enumerate() {
            let taken = st.services.iter().find(|(other, svc)| *other != name && svc.spec.routes.contains(r));
            if let Some((other, _)) = taken {
                let host = r.host.as_ref().map_or_else(|| "any host".to_string(), |h| h.to_string());
                let path = match &r.path {
                    halo_model::PathMatch::Prefix(p) => format!("path_prefix {p}"),
                    halo_model::PathMatch::Exact(p) => format!("path_exact {p}"),
                };
                return Err(NodeError::BadRequest(format!(
                    "routes[{i}]: service '{other}' already routes {host}, {path}; give this one another host or \
                     path, or change '{other}' first"
                )));
            }
        }
        Ok(())
    }

    /// Sets the replica count.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<(), NodeError> {
        self.modify(name, |file, _| {
            if let Some(a) = &file.autoscale {
                return Err(NodeError::BadRequest(format!(
                    "{name} is autoscaled between {} and {} ([autoscale] in its file); change min and max there \
                     (halo apply), or remove [autoscale] to set replicas by hand",
                    a.min.unwrap_or(1),
                    a.max
                )));
            }
            file.replicas = Some(replicas);
            file.validate().map(drop).map_err(|e| NodeError::BadRequest(e.to_string()))
        })
        .await?;
        self.ctx.m.events.info(EventKind::Scaled, Some(name), None, format!("{name} scaled to {replicas}"));
        Ok(())
    }

    /// Replaces every instance, one at a time, keeping capacity.
    pub async fn restart(&self, name: &str) -> Result<(), NodeError> {
        self.modify(name, |_, generation| {
            *generation += 1;
            Ok(())
        })
        .await?;
        self.ctx.m.events.info(EventKind::Restarted, Some(name), None, format!("{name}: rolling restart asked"));
        Ok(())
    }

    /// `halo switchover`: asks `name`'s primary to hand over to `to` (or
    /// the replica it chooses). Returns the token of the primary asked.
    pub async fn switchover(&self, name: &str, to: Option<&str>) -> Result<i64, NodeError> {
        let st = self.ctx.view.current();
        let svc = st.services.get(name).ok_or_else(|| NodeError::NotFound(name.into()))?;
        if !svc.spec.replicated() {
            return Err(NodeError::BadRequest(format!(
                "{name} has no primary to switch over (a stateful service with 2 or more replicas has)"
            )));
        }
        let Some(held) = st.primaries.get(name) else {
            return Err(NodeError::BadRequest(format!("{name} has no primary now; a failover is under way")));
        };
        let roles = st.roles.get(name).cloned().unwrap_or_default();
        let eligible: Vec<&String> = roles
            .iter()
            .filter(|(_, r)| r.role == crate::keys::Role::Replica && r.token == held.token && r.healthy)
            .map(|(id, _)| id)
            .collect();
        if let Some(to) = to {
            if to == held.record.instance {
                return Err(NodeError::BadRequest(format!("{to} is the primary already")));
            }
            if !eligible.iter().any(|e| *e == to) {
                let list: Vec<&str> = eligible.iter().map(|s| s.as_str()).collect();
                return Err(NodeError::BadRequest(format!(
                    "{to} is not a healthy replica following the primary; accepted: {}",
                    if list.is_empty() { "none now".to_string() } else { list.join(", ") }
                )));
            }
        } else if eligible.is_empty() {
            return Err(NodeError::BadRequest(format!(
                "no healthy replica follows {}: nothing to switch over to",
                held.record.instance
            )));
        }
        match crate::stateful::ask_switchover(&*self.ctx.store, name, held.token, to).await? {
            Some(true) => {}
            Some(false) => return Err(NodeError::Conflict),
            None => return Err(NodeError::BadRequest(format!("a switchover of {name} is under way already"))),
        }
        let whom = to.map_or("the replica it chooses".to_string(), str::to_string);
        let msg = format!("switchover asked: {} hands over to {whom}", held.record.instance);
        self.ctx.m.events.info(EventKind::Switchover, Some(name), None, msg);
        Ok(held.token)
    }

    pub async fn delete(&self, name: &str) -> Result<(), NodeError> {
        // With it, what its primary kept about it (a stateful service).
        let key = service_key(name);
        let txn = Txn::new()
            .when(Compare::exists(&key))
            .and_then(TxnOp::Delete(key))
            .and_then(TxnOp::Delete(crate::keys::sync_key(name)));
        let txn = txn.and_then(TxnOp::Delete(crate::keys::switchover_key(name)));
        if !self.ctx.store.txn(txn).await?.succeeded {
            return Err(NodeError::NotFound(name.into()));
        }
        self.ctx.m.events.info(EventKind::Deleted, Some(name), None, format!("{name} deleted"));
        Ok(())
    }

    /// The service file as stored.
    pub async fn get(&self, name: &str) -> Result<String, NodeError> {
        let key = service_key(name);
        let kv = self.ctx.store.get(&key).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        Ok(decode::<ServiceRecord>(&key, &kv.value)?.spec)
    }

    async fn modify(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServiceFile, &mut u64) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        let key = service_key(name);
        let kv = self.ctx.store.get(&key).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        let mut rec: ServiceRecord = decode(&key, &kv.value)?;
        let mut file = match self.seen(name, kv.mod_revision) {
            Some(svc) => svc.file.clone(),
            None => halo_model::parse_stored_service(&key, &rec.spec)?.0,
        };
        f(&mut file, &mut rec.restart_generation)?;
        rec.spec = file.to_toml();
        self.put_if_unchanged(&key, kv.mod_revision, &rec).await
    }

    /// The view's reading of service `name` if the view has the stored
    /// revision `mod_revision` (a stored file is parsed once, by the view).
    fn seen(&self, name: &str, mod_revision: i64) -> Option<Arc<crate::state::Svc>> {
        self.ctx.view.current().services.get(name).filter(|s| s.revision == mod_revision).cloned()
    }

    async fn put_if_unchanged(&self, key: &str, mod_revision: i64, rec: &ServiceRecord) -> Result<(), NodeError> {
        let txn = Txn::new().when(Compare::mod_revision(key, mod_revision)).and_then(TxnOp::put(key, json(rec), None));
        if !self.ctx.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        Ok(())
    }

    /// Every service with this node's instances of it.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let st = self.ctx.view.current();
        let instances = self.r.instances.lock();
        st.services
            .iter()
            .map(|(name, svc)| {
                let mut instances: Vec<InstanceView> = instances
                    .values()
                    .filter(|m| &m.record.service == name)
                    .map(|m| InstanceView {
                        status: m.status.borrow().clone(),
                        stopping: m.stopping(),
                        current: m.record.template == svc.template,
                        role: crate::views::RoleView::of(&st, name, &m.record.id),
                    })
                    .collect();
                instances.sort_by_cached_key(|i| id_order(name, &i.status.id));
                let ready = instances.iter().filter(|i| i.status.ready && !i.stopping).count();
                ServiceStatus { name: name.clone(), replicas: st.replicas(name), ready, instances }
            })
            .collect()
    }

    /// Log files of a service's instances on this node (running or
    /// recently stopped), or of one instance.
    pub fn logs(&self, service: &str, instance: Option<&str>) -> Result<Vec<(String, LogFile)>, NodeError> {
        // Both names become path components: only what names can be.
        halo_model::check_name(service).map_err(|e| NodeError::BadRequest(format!("service: {e}")))?;
        if let Some(id) = instance.filter(|id| !valid_id(id)) {
            return Err(NodeError::BadRequest(format!(
                "instance: '{id}' is not an instance id (lowercase letters, digits and '-', as `halo status` shows)"
            )));
        }
        let dir = self.ctx.env.logs_dir.join(service);
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
        Ok(ids.into_iter().map(|id| (id.clone(), LogFile::at(&self.ctx.env.logs_dir, service, &id))).collect())
    }

    /// This node's metrics (membership, election, instances) and the
    /// cluster's as its view has them, in Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut w = halo_proxy::metrics::Writer::default();
        crate::metrics::node(&mut w, &self.ctx.m, &self.ctx.view);
        crate::metrics::peers(&mut w, &self.ctx.peers);
        crate::metrics::instances(&mut w, &self.statuses());
        crate::metrics::store_requests(&mut w, &self.requests.counts());
        self.cluster().metrics(&mut w);
        crate::metrics::rollouts(&mut w, &self.ctx.view.current());
        if let Some(h) = self.backup_health() {
            crate::metrics::backups(&mut w, &h);
        }
        if let Some(v) = &self.vips {
            v.metrics(&mut w);
        }
        let dropped = self.ctx.m.events.dropped.load(std::sync::atomic::Ordering::Relaxed);
        let help = "Events this node could not record (store away, queue full).";
        w.single("halo_events_dropped_total", "counter", help, dropped);
        w.out
    }

    /// The last minutes of this node's proxy, per route and upstream.
    pub fn traffic(&self) -> Vec<halo_proxy::history::Series> {
        self.history.series()
    }

    /// The newest `limit` events of the cluster (of `service` if given),
    /// oldest first, and the revision to follow them from.
    pub async fn events(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<crate::events::Event>, halo_store::Revision), NodeError> {
        Ok(crate::events::list(&*self.ctx.store, service, limit).await?)
    }

    /// A watch of the events written after `from`.
    pub async fn watch_events(&self, from: halo_store::Revision) -> Result<halo_store::Watch, NodeError> {
        Ok(self.ctx.store.watch(crate::keys::EVENTS, from).await?)
    }

    /// The cluster's floating IPs: holders, and every node's standing.
    pub fn vips(&self) -> Vec<crate::vip::VipStatus> {
        crate::vip::list(&self.ctx.view.current())
    }

    fn statuses(&self) -> Vec<Status> {
        self.r.instances.statuses()
    }

    /// Hands the node over to a new process (binary upgrade): leaves every
    /// instance running and unsupervised, stops the node's loops and the
    /// view, and closes the store, so the new process can open it and
    /// adopt the instances. The proxy serves on until [`Node::detach`].
    pub async fn release(&self) {
        // The other nodes spare this one while its API is silent.
        let key = crate::keys::upgrading_key(&self.ctx.m.cfg.node);
        let pid = std::process::id().to_string();
        if let Err(e) = self.ctx.store.put(&key, pid.into_bytes(), None).await {
            tracing::warn!(error = %e, "could not tell the cluster this node is upgrading");
        }
        self.r.detach_all();
        // No leader loop of this process ticks on: the next one campaigns.
        self.ctx.m.step_down("handing the node over to a new process");
        self.ctx.tasks.stop().await;
        self.ctx.view.stop();
        self.ctx.store.close().await;
    }

    /// Leaves every instance running and unsupervised, then drains the
    /// proxy: halo is being replaced and the next one adopts them (and
    /// the floating IPs, whose lease it continues).
    pub async fn detach(&self, grace: Duration) {
        self.r.detach_all();
        self.r.feed.proxy.shutdown(grace).await;
    }

    /// Hands the floating IPs over, drains and stops every instance, then
    /// the proxy.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(v) = &self.vips {
            v.release_all().await;
        }
        self.r.stop_all().await;
        self.ctx.m.step_down("shutting down");
        self.ctx.tasks.stop().await;
        self.r.feed.proxy.shutdown(grace).await;
    }
}

/// The order instances are shown in: ids are `SERVICE-REV-SEQ` in hex, so
/// by those numbers (oldest first), not as text (`web-1c-0` after `web-6-0`).
fn id_order(service: &str, id: &str) -> (Vec<u64>, String) {
    let rest = id.strip_prefix(service).and_then(|r| r.strip_prefix('-')).unwrap_or(id);
    (rest.split('-').map(|p| u64::from_str_radix(p, 16).unwrap_or(u64::MAX)).collect(), id.to_string())
}

/// Instance ids: a service name, '-' and lowercase hex parts.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn json(rec: &ServiceRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a record always encodes")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(bytes).map_err(|e| NodeError::Corrupt { key: key.to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    #[test]
    fn instances_are_shown_by_revision_then_sequence() {
        let mut ids = vec!["web-1c-0", "web-6-1", "web-6-0", "web-a-0", "web-legacy"];
        ids.sort_by_cached_key(|id| super::id_order("web", id));
        assert_eq!(ids, ["web-6-0", "web-6-1", "web-a-0", "web-1c-0", "web-legacy"]);
    }
}
