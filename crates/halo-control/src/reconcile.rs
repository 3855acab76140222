//! The node's reconciler: runs exactly the instances the leader assigned
//! to this node, publishes the ready ones as endpoints on the node lease,
//! and feeds the proxy every node's ready endpoints. The same on one node
//! (`halo up`) as on a cluster node (`halo agent`).
//!
//! A pass reads only the watch-fed [`View`]: it runs on every change the
//! view takes in, on every change of an instance's state, and once a
//! second. Nothing is stopped because the store is unreachable (static
//! stability): the view then stays as it last was.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_model::ServiceSpec;
use halo_supervisor::{Instance, InstanceSpec, Status, Workload};
use tokio::sync::{watch, Notify};

use crate::ctx::NodeCtx;
use crate::endpoints::{self, Ready};
use crate::events::EventKind;
use crate::keys::{endpoint_key, instance_key, instances_of, Assignment, InstanceRecord};
use crate::proxy_config::{Ep, ProxyFeed};
use crate::state::ClusterState;
use crate::stateful::{Admit, Stateful};
use halo_model::lock::LockExt;

/// Between taking an instance out of the proxies and signalling it.
const DRAIN_DELAY: Duration = Duration::from_millis(300);

pub(crate) struct Managed {
    pub record: InstanceRecord,
    pub status: watch::Receiver<Status>,
    /// `None` once a stop has begun.
    instance: Option<Instance>,
}

impl Managed {
    pub fn stopping(&self) -> bool {
        self.instance.is_none()
    }

    pub fn ready(&self) -> bool {
        !self.stopping() && self.status.borrow().ready
    }

    /// Runs commands where the instance's app runs (backup hooks).
    pub fn runner(&self) -> Option<std::sync::Arc<dyn halo_supervisor::Runner>> {
        self.instance.as_ref()?.runner()
    }
}

/// This node's instances, by id: the reconciler's, which hooks read to
/// find a ready one of a service.
#[derive(Default)]
pub(crate) struct Instances(Mutex<BTreeMap<String, Managed>>);

impl Instances {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Managed>> {
        self.0.locked()
    }

    /// One ready instance of `service` here that can run commands: its id
    /// and runner.
    /// A ready instance of `service` and its runner: one of `prefer` when
    /// one is ready, else any.
    pub fn ready_runner(&self, service: &str, prefer: &[String]) -> Option<(String, Arc<dyn halo_supervisor::Runner>)> {
        let instances = self.lock();
        let mut ready: Vec<_> = instances.values().filter(|m| m.record.service == service && m.ready()).collect();
        ready.sort_by_key(|m| !prefer.contains(&m.record.id));
        ready.into_iter().find_map(|m| Some((m.record.id.clone(), m.runner()?)))
    }

    /// Every instance's status now.
    pub fn statuses(&self) -> Vec<Status> {
        self.lock().values().map(|m| m.status.borrow().clone()).collect()
    }
}

pub(crate) struct Reconciler {
    pub ctx: Arc<NodeCtx>,
    pub feed: ProxyFeed,
    pub instances: Arc<Instances>,
    /// Instance state changes wake the loop through this.
    pub wake: Notify,
    /// Set by [`Reconciler::stop_all`] and [`Reconciler::detach_all`]:
    /// nothing is started any more.
    shutting_down: AtomicBool,
    /// Stateful instances: their data, made before they start.
    pub stateful: Arc<Stateful>,
    /// What the proxy was last fed from (the view's routing revision,
    /// this node's ready instances and the silent nodes), when, and when
    /// a feed held back is due.
    fed: Mutex<Option<Fed>>,
}

/// What the proxy was fed from.
#[derive(Debug, PartialEq, Eq)]
struct FedFrom {
    /// The view's routing revision (-1: the proxy has not all of it).
    routing: halo_store::Revision,
    layout: halo_store::Revision,
    /// This node's ready instances.
    local: Vec<Ep>,
    silent: BTreeSet<String>,
}

/// The last feed of the proxy: from what, when, and when the next is due
/// (one held back).
struct Fed {
    from: FedFrom,
    at: Instant,
    due: Option<Instant>,
    /// When a full feed is owed: services added go into the proxy's
    /// config at most every [`crate::proxy_config::RELOAD_EVERY`].
    full: Option<Instant>,
}

/// How often at most the rest of the cluster's changes reach the proxy.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

type Error = Box<dyn std::error::Error + Send + Sync>;

impl Reconciler {
    pub fn new(ctx: Arc<NodeCtx>, mut feed: ProxyFeed) -> Reconciler {
        let stateful = Stateful::new(ctx.clone());
        let s = Arc::downgrade(&stateful);
        let current = move || s.upgrade().is_some_and(|s| s.lease.renewed_within(crate::stateful::ROUTE_WINDOW));
        feed.primary_gate = Some(halo_proxy::config::Gate(Arc::new(current)));
        Reconciler {
            ctx,
            feed,
            instances: Arc::default(),
            wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            stateful,
            fed: Mutex::new(None),
        }
    }

    fn node(&self) -> &str {
        self.ctx.node()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Managed>> {
        self.instances.lock()
    }

    /// The assignments to this node that it obeys ([`obeyed`]), noting the
    /// tokens seen and the orders ignored.
    fn assigned(&self, st: &ClusterState) -> BTreeMap<String, Assignment> {
        let m = &self.ctx.m;
        let o = obeyed(st, self.node(), m.max_token.load(Ordering::SeqCst));
        for (id, token) in &o.ignored {
            m.counters.stale_orders_ignored.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(instance = %id, token, max = o.max_token, "ignoring an order of a deposed leader");
        }
        m.see_token(o.max_token);
        o.orders
    }

    /// One pass: stop what is no longer assigned here, start what is,
    /// publish endpoints, feed the proxy.
    pub async fn reconcile(self: &Arc<Self>) {
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let st = self.ctx.view.current();
        let assigned = self.assigned(&st);
        let c = {
            let instances = self.lock();
            let running = instances.iter().map(|(id, m)| (id.as_str(), m.record.template.as_str(), m.stopping()));
            changes(&st, &assigned, running)
        };
        for id in &c.stop {
            if self.switch_over_first(&st, &assigned, id).await {
                continue;
            }
            tracing::info!(instance = %id, "no longer assigned here; stopping");
            self.stop_instance(id);
        }
        for (a, spec) in c.start {
            let p = &a.placement;
            if let Admit::Wait(why) = self.stateful.admit(&st, spec, &p.id, &p.template) {
                tracing::debug!(instance = %p.id, why, "not starting yet");
                continue;
            }
            tracing::info!(instance = %a.placement.id, "assigned here; starting");
            if let Err(e) = self.start_new(spec, a).await {
                tracing::error!(instance = %a.placement.id, error = %e, "starting an instance failed");
            }
        }
        endpoints::sync(&*self.ctx.store, &self.ctx.m, &st, &self.ready(), &self.unjudged()).await;
        self.publish_from(&st);
    }

    /// A primary replaced in place (a new template: `halo restart`, a
    /// changed file) hands over first, when a healthy replica follows it:
    /// asks a switchover and is not stopped now (the handover stops it;
    /// it starts again as a replica, of the new template).
    async fn switch_over_first(&self, st: &ClusterState, assigned: &BTreeMap<String, Assignment>, id: &str) -> bool {
        let Some(a) = assigned.get(id) else { return false };
        let service = &a.placement.service;
        let Some(held) = st.primaries.get(service).filter(|h| h.record.instance == id) else { return false };
        let followed = st.roles.get(service).is_some_and(|roles| {
            roles.values().any(|r| r.role == crate::keys::Role::Replica && r.token == held.token && r.healthy)
        });
        if !followed || !st.services.get(service).is_some_and(|s| s.spec.replicated()) {
            return false;
        }
        match crate::stateful::ask_switchover(&*self.ctx.store, service, held.token, None).await {
            Ok(Some(true)) => {
                let msg = format!("{id} is the primary: it switches over before it restarts with the new template");
                self.ctx.m.events.info(crate::events::EventKind::Switchover, Some(service), Some(id), msg);
                true
            }
            // Under way already: the handover stops it.
            Ok(None) => true,
            Ok(Some(false)) => false,
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "asking a switchover failed; trying again");
                true
            }
        }
    }

    /// Endpoint keys of this node's instances that are up but whose
    /// readiness no probe has judged yet (adopted by a new halo process:
    /// their endpoints stay published until a probe says otherwise, so
    /// other nodes' proxies keep them across an upgrade).
    fn unjudged(&self) -> Vec<String> {
        let instances = self.lock();
        instances
            .values()
            .filter(|m| {
                let s = m.status.borrow();
                !m.stopping()
                    && !s.ready
                    && s.probe_failures.readiness == 0
                    && matches!(s.state, halo_supervisor::State::Starting | halo_supervisor::State::Running)
            })
            .map(|m| crate::keys::endpoint_key(&m.record.service, &m.record.id))
            .collect()
    }

    /// This node's ready instances.
    fn ready(&self) -> Vec<Ready> {
        let instances = self.lock();
        let ready = instances.values().filter(|m| m.ready());
        ready
            .map(|m| Ready {
                service: m.record.service.clone(),
                id: m.record.id.clone(),
                port: m.status.borrow().port,
                template: m.record.template.clone(),
            })
            .collect()
    }

    /// Feeds the proxy this node's ready instances (as they are now) and
    /// every other node's endpoints (as the view has them), but those of
    /// nodes that do not answer this one.
    pub fn publish(&self) {
        self.publish_from(&self.ctx.view.current());
    }

    fn publish_from(&self, st: &ClusterState) {
        let mut eps: Vec<Ep> = Vec::new();
        for r in self.ready() {
            eps.push(Ep {
                service: r.service,
                id: r.id,
                template: r.template,
                addr: (self.ctx.m.cfg.addr, r.port).into(),
            });
        }
        let silent = self.ctx.peers.silent_nodes();
        // Nothing the proxy is fed from changed: no work per change
        // elsewhere in the cluster.
        let key = FedFrom { routing: st.routing_revision, layout: st.layout_revision, local: eps, silent };
        let mut fed = self.fed.locked();
        let Some(last) = fed.as_mut() else { return self.feed_now(st, key, &mut fed) };
        let owed = last.full.is_some_and(|at| Instant::now() >= at);
        if last.from == key && !owed {
            return;
        }
        // This node's own instances and the silent nodes go in at once;
        // the rest of the cluster's changes at most every PUBLISH_EVERY
        // (a burst of placements costs each node a feed per period, not
        // one per change).
        let urgent = owed || (&last.from.local, &last.from.silent) != (&key.local, &key.silent);
        let due = last.at + PUBLISH_EVERY;
        if !urgent && Instant::now() < due {
            last.due = Some(last.full.map_or(due, |f| f.min(due)));
            return;
        }
        self.feed_now(st, key, &mut fed)
    }

    /// Feeds the proxy: the services whose routing changed since the last
    /// feed when the view can say which (their endpoints alone), else all.
    fn feed_now(&self, st: &ClusterState, key: FedFrom, fed: &mut Option<Fed>) {
        let me = self.node();
        let now = Instant::now();
        // A full feed is owed (services added wait for the next config).
        let owed = fed.as_ref().and_then(|f| f.full);
        let last = fed.as_ref().filter(|_| owed.is_none_or(|at| now < at)).map(|f| &f.from);
        let changed = last.filter(|l| l.routing >= 0 && l.silent == key.silent).and_then(|l| {
            let mut changed = st.routed_since(l.routing)?;
            // This node's own instances that came or went: their services.
            let moved = l.local.iter().filter(|e| !key.local.contains(e));
            changed.extend(moved.chain(key.local.iter().filter(|e| !l.local.contains(e))).map(|e| e.service.clone()));
            Some(changed)
        });
        let partial = changed.is_some();
        let some = changed.and_then(|changed| {
            let local: Vec<Ep> = key.local.iter().filter(|e| changed.contains(&e.service)).cloned().collect();
            let remote = changed.iter().flat_map(|s| st.endpoints_of_service(s)).filter(|(_, (_, e))| e.node != me);
            let mut eps = answering(remote, &key.silent, &local);
            eps.extend(local);
            self.feed.publish_some(st, &changed, eps)
        });
        let done = some.unwrap_or_else(|| {
            let remote = st.endpoints.iter().filter(|(_, (_, e))| e.node != me);
            let mut eps = answering(remote, &key.silent, &key.local);
            eps.extend(key.local.iter().cloned());
            self.feed.publish(st, eps)
        });
        // A partial feed leaves a full one owed as it was.
        let owed = owed.filter(|_| partial && some.is_some());
        *fed = match done {
            crate::proxy_config::Fed::Done => Some(Fed { from: key, at: now, due: owed, full: owed }),
            crate::proxy_config::Fed::Later(at) => {
                let at = owed.map_or(at, |o| o.min(at));
                Some(Fed { from: key, at: now, due: Some(at), full: Some(at) })
            }
            crate::proxy_config::Fed::Failed => None,
        };
    }

    /// When a feed held back by [`PUBLISH_EVERY`] is due.
    fn feed_due(&self) -> Option<Instant> {
        self.fed.locked().as_ref().and_then(|f| f.due)
    }

    /// Free port for a new instance, not one a live instance has.
    fn free_port(&self) -> std::io::Result<u16> {
        let taken: BTreeSet<u16> = self.lock().values().map(|m| m.status.borrow().port).collect();
        for _ in 0..20 {
            let port = std::net::TcpListener::bind((self.ctx.env.host, 0))?.local_addr()?.port();
            if !taken.contains(&port) {
                return Ok(port);
            }
        }
        Err(std::io::Error::other("no free port found"))
    }

    /// Starts the instance `a` names, under a new record written first: a
    /// halo killed in between finds the record, not an unknown process.
    async fn start_new(self: &Arc<Self>, spec: &Arc<ServiceSpec>, a: &Assignment) -> Result<(), Error> {
        let p = &a.placement;
        let port = self.free_port()?;
        let r = InstanceRecord {
            id: p.id.clone(),
            service: p.service.clone(),
            port,
            template: p.template.clone(),
            pid: None,
            start_time: None,
            container: None,
        };
        self.ctx.store.put(&instance_key(self.node(), &r.service, &r.id), serde_json::to_vec(&r)?, None).await?;
        let ispec = self.instance_spec(spec, &r);
        self.supervise(ispec, r, None)
    }

    /// What the supervisor runs for `record`, under `spec` (a stateful
    /// instance's with its data directory).
    fn instance_spec(&self, spec: &Arc<ServiceSpec>, record: &InstanceRecord) -> InstanceSpec {
        InstanceSpec {
            id: record.id.clone(),
            service: record.service.clone(),
            spec: crate::stateful::instance_spec(&self.ctx.data_dir, spec, &record.id),
            port: record.port,
            revision: record.template.clone(),
        }
    }

    /// Supervises `record`'s instance: `adopted`, the run a previous halo
    /// left, or a new one.
    fn supervise(
        self: &Arc<Self>,
        ispec: InstanceSpec,
        record: InstanceRecord,
        adopted: Option<Box<dyn Workload>>,
    ) -> Result<(), Error> {
        let instance = Instance::start(self.ctx.env.clone(), ispec, adopted)?;
        let status = instance.subscribe();
        self.lock().insert(
            record.id.clone(),
            Managed { record: record.clone(), status: status.clone(), instance: Some(instance) },
        );
        self.ctx.tasks.spawn(follow_status(self.clone(), record, status));
        Ok(())
    }

    /// Drain (out of every proxy first), stop, forget.
    pub fn stop_instance(self: &Arc<Self>, id: &str) {
        self.stop_after(id, DRAIN_DELAY)
    }

    /// Stops an instance no proxy reaches any more (a primary handing
    /// over): no delay for requests in flight.
    pub fn stop_drained(self: &Arc<Self>, id: &str) {
        self.stop_after(id, Duration::ZERO)
    }

    fn stop_after(self: &Arc<Self>, id: &str, drain: Duration) {
        let taken = {
            let mut instances = self.lock();
            instances.get_mut(id).and_then(|m| m.instance.take().map(|i| (i, m.record.clone())))
        };
        let Some((instance, record)) = taken else { return };
        self.publish();
        let me = self.clone();
        self.ctx.tasks.spawn_to_end(async move {
            // Other nodes' proxies stop sending once the endpoint is gone.
            if let Err(e) = me.ctx.store.delete(&endpoint_key(&record.service, &record.id)).await {
                tracing::debug!(instance = %record.id, error = %e, "withdrawing the endpoint failed");
            }
            // Requests the proxies sent before the removal finish first.
            tokio::time::sleep(drain).await;
            instance.stop().await;
            if let Err(e) = me.ctx.store.delete(&instance_key(me.node(), &record.service, &record.id)).await {
                tracing::warn!(instance = %record.id, error = %e, "removing the instance record failed");
            }
            me.lock().remove(&record.id);
            // Scaled away or replaced: its log goes with it (a stateful
            // instance's stays, as its data does).
            let st = me.ctx.view.current();
            if st.services.get(&record.service).is_none_or(|s| s.spec.stateful.is_none()) {
                halo_supervisor::LogFile::at(&me.ctx.env.logs_dir, &record.service, &record.id).remove();
            }
            me.wake.notify_one();
        });
    }

    /// Takes over the instances a previous halo on this node left: adopts
    /// the live ones of services that still exist (the next pass stops
    /// those no longer assigned here), forgets the dead ones (the next pass
    /// starts what is assigned, under a fresh record), stops those of
    /// deleted services. Then every driver removes what it runs for this
    /// data directory that no record names.
    pub async fn adopt(self: &Arc<Self>) -> Result<(), halo_store::StoreError> {
        let st = self.ctx.view.current();
        let listing = self.ctx.store.list(&instances_of(self.node())).await?;
        let mut known = Vec::new();
        let mut to_adopt = Vec::new();
        for kv in listing.kvs {
            let Ok(rec) = serde_json::from_slice::<InstanceRecord>(&kv.value) else {
                tracing::warn!(key = %kv.key, "unreadable instance record removed");
                self.ctx.store.delete(&kv.key).await?;
                continue;
            };
            let Some(handle) = rec.handle() else {
                self.ctx.store.delete(&kv.key).await?;
                continue;
            };
            let driver = self.ctx.env.drivers.for_handle(&handle);
            let Some(svc) = st.services.get(&rec.service) else {
                tracing::info!(instance = %rec.id, "stopping instance of a deleted service");
                driver.remove(&handle).await;
                self.ctx.store.delete(&kv.key).await?;
                continue;
            };
            let ispec = self.instance_spec(svc.spec_for(&rec.template).unwrap_or(&svc.spec), &rec);
            let log = halo_supervisor::LogFile::at(&self.ctx.env.logs_dir, &rec.service, &rec.id).path;
            let Some(run) = driver.adopt(&handle, &ispec, &log).await else {
                self.ctx.store.delete(&kv.key).await?;
                continue;
            };
            let container = handle.container.as_deref().unwrap_or("-");
            tracing::info!(instance = %rec.id, pid = handle.pid, container, "adopting running instance");
            known.push(handle);
            to_adopt.push((ispec, rec, run));
        }
        // Before anything new starts: what runs now and is in no record is
        // an orphan.
        for driver in self.ctx.env.drivers.all() {
            driver.sweep(&known).await;
        }
        for (ispec, rec, run) in to_adopt {
            let id = rec.id.clone();
            if let Err(e) = self.supervise(ispec, rec, Some(run)) {
                tracing::error!(instance = %id, error = %e, "adopting failed");
            }
        }
        Ok(())
    }

    /// Stops every instance (halo is shutting down): leaves the cluster so
    /// every proxy drops this node's endpoints, drains, then stops them
    /// all at once.
    pub async fn stop_all(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let all: Vec<Instance> = self.lock().values_mut().filter_map(|m| m.instance.take()).collect();
        self.publish();
        self.ctx.m.leave().await;
        // Primaries here hand over at once (their keys go with the role
        // lease): every proxy drops them now, and a replica elsewhere is
        // promoted after the guard, by which time these have their stop
        // signal.
        self.stateful.lease.end(&*self.ctx.store).await;
        tokio::time::sleep(DRAIN_DELAY).await;
        let stops: Vec<_> = all.into_iter().map(|i| tokio::spawn(i.stop())).collect();
        for s in stops {
            let _ = s.await;
        }
    }

    /// Stops supervising and leaves every instance running, for the next
    /// halo to adopt (an upgrade of halo itself).
    pub fn detach_all(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for m in self.lock().values_mut() {
            if let Some(i) = m.instance.take() {
                i.detach();
            }
        }
    }
}

/// The reconcile loop: on every change of the view, every instance state
/// change, when a held-back feed of the proxy is due, and once a second.
/// The orders a node obeys, and what it learned of the tokens.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Obeyed {
    pub orders: BTreeMap<String, Assignment>,
    /// Orders of a deposed leader: (instance, token).
    pub ignored: Vec<(String, halo_store::Revision)>,
    /// The highest fencing token seen.
    pub max_token: halo_store::Revision,
}

/// The assignments to `node` in `st` that it obeys, knowing tokens up to
/// `max_token`. Fencing as a node sees it: an order written after a newer
/// leader was elected (`assigned_at` past the newest token), by an older
/// one, is not obeyed. Tokens are learned in key order as they are met.
pub(crate) fn obeyed(st: &ClusterState, node: &str, max_token: halo_store::Revision) -> Obeyed {
    let mut o = Obeyed { max_token, ..Obeyed::default() };
    for (id, a) in st.assigned_to(node) {
        let at = st.assigned_at.get(id).copied().unwrap_or(0);
        if a.token < o.max_token && at > o.max_token {
            o.ignored.push((id.clone(), a.token));
            continue;
        }
        o.max_token = o.max_token.max(a.token);
        o.orders.insert(id.clone(), a.clone());
    }
    o
}

/// What a pass changes: instances to stop, assignments to start.
#[derive(Debug, Default)]
pub(crate) struct Changes<'a> {
    pub stop: Vec<String>,
    pub start: Vec<(&'a Assignment, &'a Arc<ServiceSpec>)>,
}

/// The diff of what is assigned here against what runs (`running`: id,
/// template and whether its stop has begun): every running instance not
/// assigned, or assigned with another template (a stateful instance
/// replaced in place), and not already stopping stops; every assignment
/// not running starts, with its revision's spec (one of a revision being
/// replaced, or of a service gone, does not).
pub(crate) fn changes<'a, 'r>(
    st: &'a ClusterState,
    assigned: &'a BTreeMap<String, Assignment>,
    running: impl Iterator<Item = (&'r str, &'r str, bool)>,
) -> Changes<'a> {
    let mut c = Changes::default();
    let mut present = BTreeSet::new();
    for (id, template, stopping) in running {
        present.insert(id.to_string());
        let current = assigned.get(id).is_some_and(|a| a.placement.template == template);
        if !stopping && !current {
            c.stop.push(id.to_string());
        }
    }
    for a in assigned.values().filter(|a| !present.contains(&a.placement.id)) {
        let Some(svc) = st.services.get(&a.placement.service) else { continue };
        let Some(spec) = svc.spec_for(&a.placement.template) else { continue };
        c.start.push((a, spec));
    }
    c
}

pub(crate) async fn run(r: Arc<Reconciler>) {
    let mut changed = r.ctx.view.subscribe();
    let mut silent = r.ctx.peers.subscribe();
    loop {
        r.reconcile().await;
        let due = r.feed_due().map_or(tokio::time::Instant::now() + Duration::from_secs(1), Into::into);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = changed.changed() => {}
            _ = silent.changed() => {}
            _ = r.wake.notified() => {}
            _ = r.stateful.wake.notified() => {}
        }
    }
}

/// Other nodes' endpoints (by instance id), without those of `silent`
/// nodes, unless that would leave a service with no endpoint at all
/// (with `local`, this node's own): then a silent node's may be wrong
/// about it, and its endpoints stay for the proxy's own health to judge.
fn answering<'a>(
    remote: impl Iterator<Item = (&'a String, &'a (String, crate::keys::EndpointRecord))>,
    silent: &BTreeSet<String>,
    local: &[Ep],
) -> Vec<Ep> {
    let remote: Vec<(Ep, bool)> = remote
        .map(|(id, (s, e))| {
            let ep = Ep { service: s.clone(), id: id.clone(), template: e.template.clone(), addr: e.addr };
            (ep, silent.contains(&e.node))
        })
        .collect();
    let served: BTreeSet<&String> =
        local.iter().map(|e| &e.service).chain(remote.iter().filter(|r| !r.1).map(|(e, _)| &e.service)).collect();
    remote.iter().filter(|(e, quiet)| !quiet || !served.contains(&e.service)).map(|(e, _)| e.clone()).collect()
}

/// Publishes this node's proxy counters of the upstreams in a rollout or
/// of autoscaled services (`/halo/stats/NODE`, on the node lease) while
/// they change: four times a second during a rollout (its windows may be
/// short), once a second for autoscaling alone (its window is 30 s, its
/// burst window at least 1 s: a store write per node and second is what a
/// large cluster can take), and at once when a request starts waiting for
/// a service at zero. Removes them when neither is left.
pub(crate) async fn publish_stats(r: Arc<Reconciler>) {
    let key = crate::keys::stats_key(r.node());
    let mut last: Option<(crate::keys::NodeStats, Option<halo_store::LeaseId>)> = None;
    let demand = r.feed.proxy.demand();
    let mut next = tokio::time::Instant::now();
    let mut put_at = tokio::time::Instant::now();
    loop {
        next += Duration::from_millis(250);
        let asked = tokio::select! {
            _ = tokio::time::sleep_until(next) => false,
            _ = demand.notified() => true,
        };
        next = next.max(tokio::time::Instant::now() - Duration::from_millis(250));
        let st = r.ctx.view.current();
        let rollout = st.services.keys().any(|n| st.canary(n).is_some());
        if !rollout && !asked && put_at.elapsed() < Duration::from_millis(990) {
            continue;
        }
        let names: BTreeSet<String> = st
            .services
            .iter()
            .flat_map(|(n, s)| {
                let canary = st.canary(n).is_some();
                let scaled = canary || s.spec.autoscale.is_some();
                let up = scaled.then(|| n.clone());
                up.into_iter().chain(canary.then(|| crate::proxy_config::canary_upstream(n)))
            })
            .collect();
        let upstreams = r.feed.proxy.upstream_totals().into_iter().filter(|u| names.contains(&u.name));
        let now = crate::keys::NodeStats {
            upstreams: upstreams
                .map(|u| {
                    let c = crate::keys::Counters {
                        requests: u.requests,
                        failed: u.failed,
                        latency: u.latency,
                        latency_sum_us: u.latency_sum_us,
                        waiting: u.waiting,
                    };
                    (u.name, c)
                })
                .collect(),
        };
        let Some(lease) = r.ctx.m.lease() else { continue };
        if last.as_ref().is_some_and(|(s, l)| *s == now && *l == Some(lease)) || (last.is_none() && names.is_empty()) {
            continue;
        }
        let done = if names.is_empty() {
            r.ctx.store.delete(&key).await.map(drop)
        } else {
            r.ctx.store.put(&key, serde_json::to_vec(&now).expect("encodes"), Some(lease)).await.map(drop)
        };
        put_at = tokio::time::Instant::now();
        match done {
            Ok(()) => last = (!names.is_empty()).then_some((now, Some(lease))),
            Err(e) => tracing::debug!(error = %e, "publishing proxy counters failed"),
        }
    }
}

/// Keeps the instance's record in step with its process, and wakes the
/// reconciler on every change it acts on.
async fn follow_status(r: Arc<Reconciler>, mut record: InstanceRecord, mut status: watch::Receiver<Status>) {
    let mut last = None;
    let mut seen: Option<Status> = None;
    loop {
        let s = status.borrow_and_update().clone();
        if let Some(before) = &seen {
            instance_events(&r.ctx.m.events, before, &s);
        }
        seen = Some(s.clone());
        // Counters (probe failures) change often; only a change of what the
        // node acts on is worth a pass.
        let key = (s.state, s.ready, s.pid, s.port);
        if last != Some(key) {
            last = Some(key);
            let now = (s.pid, s.start_time, &s.container, s.port);
            if s.pid.is_some() && now != (record.pid, record.start_time, &record.container, record.port) {
                record.pid = s.pid;
                record.start_time = s.start_time;
                record.container = s.container.clone();
                record.port = s.port;
                let key = instance_key(r.node(), &record.service, &record.id);
                let v = serde_json::to_vec(&record).expect("an instance record encodes");
                if let Err(e) = r.ctx.store.put(&key, v, None).await {
                    tracing::warn!(instance = %record.id, error = %e, "recording the instance's pid failed");
                }
            }
            r.publish();
            r.wake.notify_one();
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// The events an instance's status change makes (`halo events`).
fn instance_events(ev: &crate::events::Events, before: &Status, now: &Status) {
    use halo_supervisor::State;
    let (svc, id) = (Some(now.service.as_str()), Some(now.id.as_str()));
    let exit = now.last_exit.as_deref().unwrap_or("no exit status");
    if now.restarts > before.restarts {
        ev.warn(EventKind::Exited, svc, id, format!("{} ended ({exit}); restart {}", now.id, now.restarts));
    }
    if now.state != before.state {
        match now.state {
            State::CrashLoop => ev.warn(
                EventKind::CrashLoop,
                svc,
                id,
                format!("{} restarts too often ({exit}); waiting the longest backoff between tries", now.id),
            ),
            State::Stopped => ev.info(EventKind::Stopped, svc, id, format!("{} stopped ({exit})", now.id)),
            State::Completed => {
                ev.info(EventKind::Completed, svc, id, format!("{} ended and is not restarted ({exit})", now.id))
            }
            _ => {}
        }
    }
    if now.ready != before.ready && now.state == State::Running {
        if now.ready {
            ev.info(EventKind::Ready, svc, id, format!("{} is ready on port {}", now.id, now.port));
        } else {
            let why = now.last_probe_error.as_deref().unwrap_or("its readiness check fails");
            ev.warn(EventKind::NotReady, svc, id, format!("{} is not ready: {why}", now.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::EndpointRecord;
    use std::net::SocketAddr;

    fn ep(service: &str, node: &str, port: u16) -> (String, (String, EndpointRecord)) {
        let addr = SocketAddr::from(([10, 0, 0, node[1..].parse::<u8>().unwrap()], port));
        (
            format!("{service}-{port}"),
            (service.to_string(), EndpointRecord { node: node.into(), addr, template: "t".into() }),
        )
    }

    #[test]
    fn a_silent_nodes_endpoints_go_unless_they_are_a_services_last() {
        let remote = [ep("web", "n2", 1), ep("web", "n3", 2), ep("db", "n3", 3), ep("api", "n3", 4)];
        let silent = BTreeSet::from(["n3".to_string()]);
        let local = vec![Ep {
            service: "api".into(),
            id: "api-5".into(),
            template: "t".into(),
            addr: SocketAddr::from(([10, 0, 0, 1], 5)),
        }];
        let pairs = || remote.iter().map(|(id, e)| (id, e));
        let kept: Vec<u16> = answering(pairs(), &silent, &local).iter().map(|e| e.addr.port()).collect();
        // web keeps n2's, db has only n3's (kept for the proxy to judge),
        // api is served here.
        assert_eq!(kept, [1, 3]);
        let none = answering(pairs(), &BTreeSet::new(), &local);
        assert_eq!(none.len(), 4, "nothing silent: every endpoint stays");
    }

    fn order(id: &str, node: &str, template: &str, token: i64, at: i64) -> (String, Assignment, i64) {
        let placement = crate::scheduler::Placement {
            id: id.into(),
            service: "web".into(),
            template: template.into(),
            node: node.into(),
        };
        (id.to_string(), Assignment { placement, token }, at)
    }

    /// A state with the service web (template of `run`, and a stable one
    /// while `canary`) and `orders`.
    fn state(orders: &[(String, Assignment, i64)], canary: bool) -> (ClusterState, String, Option<String>) {
        let text = |cmd: &str| format!("name = \"web\"\n[run]\ncommand = \"{cmd}\"\n");
        let (f, spec) = halo_model::parse_service("t", &text("v2")).unwrap();
        let (sf, sspec) = halo_model::parse_service("t", &text("v1")).unwrap();
        let template = crate::keys::ServiceRecord::template(&f, 0);
        let stable_template = crate::keys::ServiceRecord::template(&sf, 0);
        let stable =
            canary.then(|| crate::state::Revisioned { template: stable_template.clone(), spec: Arc::new(sspec) });
        let record = crate::keys::ServiceRecord { spec: f.to_toml(), restart_generation: 0, stable: None };
        let svc = crate::state::Svc {
            revision: 1,
            record,
            file: f,
            spec: Arc::new(spec),
            template: template.clone(),
            stable,
        };
        let mut st = ClusterState::default();
        st.services.insert("web".into(), Arc::new(svc));
        for (_, a, at) in orders {
            st.assign(a.clone(), *at);
        }
        (st, template, canary.then_some(stable_template))
    }

    #[test]
    fn a_node_obeys_its_own_orders_but_not_a_deposed_leaders_written_after_the_new_one_won() {
        let (st, t, _) = state(
            &[
                order("web-1", "n1", "x", 10, 11),
                order("web-2", "n2", "x", 10, 12),
                // Token 8 written at revision 13, after token 10 won: deposed.
                order("web-3", "n1", "x", 8, 13),
                // Token 8 written at revision 9, before: still obeyed.
                order("web-0", "n1", "x", 8, 9),
            ],
            false,
        );
        let _ = t;
        let o = obeyed(&st, "n1", 0);
        assert_eq!(o.orders.keys().collect::<Vec<_>>(), ["web-0", "web-1"]);
        assert_eq!(o.ignored, vec![("web-3".to_string(), 8)]);
        assert_eq!(o.max_token, 10);
        // A node that already knew token 12: web-1 was written (at 11)
        // before token 12 existed, web-3 (at 13) after.
        let o = obeyed(&st, "n1", 12);
        assert_eq!(o.orders.keys().collect::<Vec<_>>(), ["web-0", "web-1"]);
        assert_eq!(o.ignored, vec![("web-3".to_string(), 8)]);
        assert_eq!(o.max_token, 12);
    }

    #[test]
    fn a_pass_stops_what_is_not_assigned_and_starts_what_is_with_its_revisions_spec() {
        let (mut st, t, stable) = state(&[], true);
        let stable = stable.unwrap();
        for (_, a, at) in [
            order("web-1", "n1", &t, 1, 2),
            order("web-2", "n1", &stable, 1, 2),
            order("web-3", "n1", "gone", 1, 2),
            order("web-4", "n1", &t, 1, 2),
        ] {
            st.assign(a, at);
        }
        let assigned = obeyed(&st, "n1", 0).orders;
        let running = [("web-4", t.as_str(), false), ("web-5", t.as_str(), false), ("web-6", t.as_str(), true)];
        let c = changes(&st, &assigned, running.into_iter());
        assert_eq!(c.stop, ["web-5"], "web-6 is stopping already");
        let start: Vec<(&str, &str)> = c
            .start
            .iter()
            .map(|(a, spec)| {
                (
                    a.placement.id.as_str(),
                    if Arc::ptr_eq(spec, &st.services["web"].spec) { "current" } else { "stable" },
                )
            })
            .collect();
        // web-3's revision is neither: being replaced, not started again.
        assert_eq!(start, [("web-1", "current"), ("web-2", "stable")]);
    }

    /// Whatever runs and whatever is assigned: after a pass's changes (the
    /// stops done, the starts running) what runs and is not stopping is
    /// exactly what is assigned with a known revision, and a second pass
    /// changes nothing.
    #[test]
    fn property_a_pass_converges_in_one_step() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for case in 0..500 {
            let (mut st, t, stable) = state(&[], next(2) == 0);
            let templates = [Some(t.clone()), stable.clone(), Some("old".to_string())];
            for i in 0..next(8) {
                let template = templates[next(3) as usize].clone().unwrap_or_else(|| t.clone());
                let (_, a, at) = order(&format!("web-{i}"), if next(3) == 0 { "n2" } else { "n1" }, &template, 1, 2);
                st.assign(a, at);
            }
            let mut running: BTreeMap<String, bool> =
                (0..next(8)).map(|i| (format!("web-{}", next(10).max(i)), next(4) == 0)).collect();
            let assigned = obeyed(&st, "n1", 0).orders;
            let template = |id: &str| assigned.get(id).map_or("x", |a| a.placement.template.as_str());
            let c = changes(&st, &assigned, running.iter().map(|(id, s)| (id.as_str(), template(id), *s)));
            for id in &c.stop {
                assert!(!assigned.contains_key(id), "case {case}: stopping assigned {id}");
                running.insert(id.clone(), true);
            }
            for (a, _) in &c.start {
                assert!(!running.contains_key(&a.placement.id), "case {case}: starting {} twice", a.placement.id);
                running.insert(a.placement.id.clone(), false);
            }
            let live: BTreeSet<&String> = running.iter().filter(|(_, s)| !**s).map(|(id, _)| id).collect();
            let wanted: BTreeSet<&String> = assigned
                .iter()
                .filter(|(_, a)| st.services["web"].spec_for(&a.placement.template).is_some())
                .map(|(id, _)| id)
                .collect();
            // An assigned instance still stopping starts again once its
            // stop is over (it leaves the instances then).
            let present: BTreeSet<&String> = running.keys().collect();
            assert!(present.is_superset(&wanted), "case {case}: {present:?} lacks some of {wanted:?}");
            assert!(live.iter().all(|id| assigned.contains_key(*id)), "case {case}: {live:?} runs unassigned");
            let again = changes(&st, &assigned, running.iter().map(|(id, s)| (id.as_str(), template(id), *s)));
            assert!(again.stop.is_empty() && again.start.is_empty(), "case {case}: a second pass changes {again:?}");
        }
    }
}
