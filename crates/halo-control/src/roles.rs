//! The role loop: every [`TICK`], for each stateful instance assigned to
//! this node (of a service with replicas), fence a primary that may no
//! longer serve, run its `check` and `position`, campaign for the key
//! when there is no primary and this instance is the one to take it,
//! promote after the guard, make a replica follow the current primary,
//! and publish the instance's role (`/halo/roles/SVC/ID`). What the
//! roles mean and why this never makes two primaries:
//! [`crate::stateful`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use halo_model::health::{Tally, Verdict};
use halo_model::stateful::parse_position;
use halo_model::ServiceSpec;
use halo_store::{Compare, CompareOp, CompareTarget, Revision, StoreError, Txn, TxnOp};
use halo_supervisor::Runner;

use crate::events::EventKind;
use crate::keys::{primary_key, role_key, PrimaryRecord, RoleRecord};
use crate::reconcile::Reconciler;
use crate::state::{ClusterState, HeldPrimary};
use crate::stateful::decide::may_campaign;
use crate::stateful::{
    data_dir, hook_env, read_marker, write_marker, Marker, Role, Stateful, CHECK_EVERY, GUARD, POSITION_EVERY, TICK,
};

/// One stateful instance of this node, as the loop keeps it.
struct Local {
    service: String,
    role: Role,
    /// The token it serves (primary) or follows (replica).
    token: Revision,
    following: Option<SocketAddr>,
    position: Option<u64>,
    tally: Tally,
    healthy: bool,
    reason: Option<String>,
    /// Why it does not campaign, while there is no primary.
    candidacy: Option<String>,
    /// The key taken (token, when): promoted after [`GUARD`].
    taken: Option<(Revision, Instant)>,
    /// A primary's process not running since.
    down_since: Option<Instant>,
    /// A primary frozen (its process group stopped) while its node's role
    /// lease is not fresh.
    frozen: bool,
    next_check: Instant,
    next_position: Instant,
    /// The furthest the current primary was seen at.
    last_primary_position: Option<u64>,
    published: Option<RoleRecord>,
}

impl Local {
    fn new(service: &str, marker: Option<Marker>) -> Local {
        let (role, token) = match marker {
            Some(m) => (m.role, m.token),
            None => (Role::Waiting, 0),
        };
        Local {
            service: service.to_string(),
            role,
            token,
            following: None,
            position: None,
            tally: Tally::default(),
            healthy: false,
            reason: None,
            candidacy: None,
            taken: None,
            down_since: None,
            frozen: false,
            next_check: Instant::now(),
            next_position: Instant::now(),
            last_primary_position: None,
            published: None,
        }
    }
}

/// What the loop needs of a running instance.
struct Running {
    runner: Option<Arc<dyn Runner>>,
    up: bool,
    ready: bool,
    pid: Option<i32>,
}

pub(crate) async fn run(r: Arc<Reconciler>, s: Arc<Stateful>) {
    let node = r.ctx.node().to_string();
    let st = r.ctx.view.current();
    if let Some(lease) = st.primaries.values().filter(|p| p.record.node == node).find_map(|p| p.lease) {
        s.lease.adopt(&*r.ctx.store, lease).await;
    }
    let renewing = s.clone();
    r.ctx.tasks.spawn(async move { renewing.lease.renew(&*renewing.ctx.store).await });
    let mut locals: BTreeMap<String, Local> = BTreeMap::new();
    loop {
        step(&r, &s, &mut locals).await;
        tokio::time::sleep(TICK).await;
    }
}

async fn step(r: &Arc<Reconciler>, s: &Arc<Stateful>, locals: &mut BTreeMap<String, Local>) {
    let st = r.ctx.view.current();
    let node = r.ctx.node();
    let mine: BTreeMap<String, Arc<ServiceSpec>> = st
        .assignments
        .values()
        .filter(|a| a.placement.node == node)
        .filter_map(|a| {
            let svc = st.services.get(&a.placement.service)?;
            let spec = svc.spec_for(&a.placement.template).unwrap_or(&svc.spec);
            spec.replicated().then(|| (a.placement.id.clone(), spec.clone()))
        })
        .collect();
    let gone: Vec<String> = locals.keys().filter(|id| !mine.contains_key(*id)).cloned().collect();
    for id in gone {
        let l = locals.remove(&id).expect("listed");
        if l.role == Role::Primary {
            release(r, &st, &l.service, &id, l.token).await;
        }
        let _ = r.ctx.store.delete(&role_key(&l.service, &id)).await;
    }
    for (id, spec) in mine {
        let dir = data_dir(&r.ctx.data_dir, &spec, &id);
        let running = {
            let instances = r.instances.lock();
            instances.get(&id).filter(|m| !m.stopping()).map(|m| {
                let status = m.status.borrow();
                Running {
                    runner: m.runner(),
                    up: status.state == halo_supervisor::State::Running,
                    ready: m.ready(),
                    pid: status.pid,
                }
            })
        };
        let l = locals.entry(id.clone()).or_insert_with(|| {
            // A former primary that does not run (halo restarted, its
            // process stopped) starts as a standby: it waits.
            let marker = read_marker(&dir);
            match marker {
                Some(m) if m.role == Role::Primary && running.is_none() => {
                    let mut l = Local::new(&spec.name, None);
                    l.token = m.token;
                    l
                }
                _ => Local::new(&spec.name, marker),
            }
        });
        One { r, s, st: &st, id: &id, spec: &spec, running }.step(l).await;
        publish(r, &id, l, &dir, &st).await;
    }
}

/// One instance's tick.
struct One<'a> {
    r: &'a Arc<Reconciler>,
    s: &'a Arc<Stateful>,
    st: &'a ClusterState,
    id: &'a str,
    spec: &'a Arc<ServiceSpec>,
    running: Option<Running>,
}

impl One<'_> {
    fn held(&self) -> Option<&HeldPrimary> {
        self.st.primaries.get(&self.spec.name)
    }

    /// Its process runs.
    fn up(&self) -> bool {
        self.running.as_ref().is_some_and(|r| r.up)
    }

    /// Its process runs and its readiness probe passes: hooks may talk to it.
    fn ready(&self) -> bool {
        self.running.as_ref().is_some_and(|r| r.up && r.ready)
    }

    async fn hook(&self, argv: &[String], role: Role, primary: Option<SocketAddr>) -> Result<Vec<u8>, String> {
        let runner = self.running.as_ref().and_then(|r| r.runner.clone()).ok_or("the instance is not running")?;
        let timeout = self.spec.stateful.as_ref().expect("stateful").hook_timeout;
        runner.run_with(argv, &hook_env(role, primary), None, timeout).await.map_err(|e| e.to_string())
    }

    async fn step(&self, l: &mut Local) {
        let s = self.spec.stateful.as_ref().expect("stateful");
        let id = self.id;
        // A demoted instance that stopped starts again as a standby (the
        // admission starts nothing else without the key): it waits, and may
        // be promoted, or is rewound when another is.
        if l.role == Role::Demoted && self.running.is_none() {
            l.role = Role::Waiting;
        }
        // 1. Fencing: a primary serves only under its own key, and only
        // while its node's role lease is fresh; in between (the store slow
        // or away: an etcd election, a cut) it is frozen, not stopped.
        if l.role == Role::Primary {
            let ours = self.held().is_some_and(|h| h.record.instance == id && h.token == l.token);
            let fresh = self.held().is_some_and(|h| h.lease.is_some() && h.lease == self.s.lease.fresh());
            if !ours {
                self.demote(l, "the primary key is gone or another's").await;
                return;
            }
            if !fresh {
                self.freeze(l, true);
                return;
            }
            self.freeze(l, false);
        }
        // 2. A primary whose process stays down hands over.
        if l.role == Role::Primary && !self.up() {
            let since = *l.down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= s.restart_grace {
                release(self.r, self.st, &self.spec.name, id, l.token).await;
                self.demote(l, &format!("its process has not run for {:?} (restart_grace)", s.restart_grace)).await;
                return;
            }
        } else {
            l.down_since = None;
        }
        // 3. Health and position.
        if !self.ready() {
            l.healthy = false;
            l.position = None;
            l.tally = Tally::default();
        } else {
            let now = Instant::now();
            if now >= l.next_check {
                l.next_check = now + CHECK_EVERY;
                let ok = match &s.hooks.check {
                    Some(argv) => self.hook(argv, l.role, l.following).await.map(drop),
                    None => Ok(()),
                };
                match l.tally.record(ok.is_ok(), 1, s.failure_threshold) {
                    Verdict::Passing => {
                        l.healthy = true;
                        l.reason = None;
                    }
                    Verdict::Failing => {
                        l.healthy = false;
                        l.reason = ok.err().map(|e| format!("check: {e}"));
                        if l.role == Role::Primary {
                            release(self.r, self.st, &self.spec.name, id, l.token).await;
                            let why = format!("its check failed {} times in a row", s.failure_threshold);
                            self.demote(l, &why).await;
                            return;
                        }
                    }
                    Verdict::Undecided => {}
                }
            }
            if now >= l.next_position {
                l.next_position = now + POSITION_EVERY;
                if let Some(argv) = &s.hooks.position {
                    match self.hook(argv, l.role, l.following).await {
                        Ok(out) => match parse_position(&String::from_utf8_lossy(&out)) {
                            Ok(p) => l.position = Some(p),
                            Err(e) => l.reason = Some(format!("position: {e}")),
                        },
                        Err(e) => tracing::debug!(instance = %id, error = %e, "position hook failed"),
                    }
                }
            }
        }
        if let Some(p) = self.held() {
            let pos =
                self.st.roles.get(&self.spec.name).and_then(|r| r.get(&p.record.instance)).and_then(|r| r.position);
            if let Some(pos) = pos {
                l.last_primary_position = Some(l.last_primary_position.map_or(pos, |x| x.max(pos)));
            }
        }
        // 4. No primary: campaign, when this instance is the one.
        match self.held() {
            None if l.taken.is_none() && l.role != Role::Primary => self.campaign(l).await,
            Some(h) if h.record.instance != id => {
                l.taken = None;
                l.candidacy = None;
                self.end_silent_term(h).await;
            }
            None => l.taken = None,
            Some(h) if l.role != Role::Primary && l.taken.is_none() => {
                // Ours from this node's last run (the role lease adopted):
                // the key never went, so no guard; promoted as it runs.
                if h.lease.is_some() && h.lease == self.s.lease.id() && h.record.node == self.r.ctx.node() {
                    l.taken = Some((h.token, Instant::now().checked_sub(GUARD).unwrap_or_else(Instant::now)));
                }
            }
            Some(_) => {}
        }
        // 5. Promotion after the guard.
        if let Some((token, at)) = l.taken {
            if at.elapsed() >= GUARD {
                l.taken = None;
                self.promote(l, token).await;
            }
        }
        // 6. Follow the current primary.
        if let Some((primary, token, addr)) = Stateful::primary_addr(self.st, &self.spec.name) {
            if primary != id && self.ready() {
                let dir = data_dir(&self.r.ctx.data_dir, self.spec, id);
                let former = read_marker(&dir).is_some_and(|m| m.role == Role::Primary && m.token != token);
                if former || l.role == Role::Demoted {
                    // Rewound (or cloned) before it serves again.
                    tracing::info!(instance = %id, primary = %primary, "a former primary: stopping it to rewind it");
                    l.role = Role::Demoted;
                    self.r.stop_instance(id);
                } else if l.token != token || l.following != Some(addr) {
                    let follow = s.hooks.follow.as_ref().expect("validated: a replicated service has follow");
                    match self.hook(follow, Role::Replica, Some(addr)).await {
                        Ok(_) => {
                            l.role = Role::Replica;
                            l.token = token;
                            l.following = Some(addr);
                            let _ = write_marker(&dir, Marker { role: Role::Replica, token });
                            tracing::info!(instance = %id, primary = %primary, %addr, token, "following the primary");
                        }
                        Err(e) => {
                            l.reason = Some(format!("follow: {e}"));
                            tracing::warn!(instance = %id, error = %e, "the follow hook failed");
                        }
                    }
                }
            }
        }
    }

    /// Freezes or thaws a primary's process group; while frozen, a restart
    /// would start it as a standby.
    fn freeze(&self, l: &mut Local, frozen: bool) {
        if l.frozen == frozen {
            return;
        }
        let dir = data_dir(&self.r.ctx.data_dir, self.spec, self.id);
        let start_as = if frozen { Role::Replica } else { Role::Primary };
        if let Err(e) = crate::stateful::write_role_file(&dir, start_as) {
            tracing::error!(instance = %self.id, error = %e, "cannot write the role file");
        }
        if let Some(pid) = self.running.as_ref().and_then(|r| r.pid) {
            if let Err(e) = halo_supervisor::freeze_group(pid, frozen) {
                tracing::warn!(instance = %self.id, pid, error = %e, "cannot signal the primary's process group");
            }
        }
        l.frozen = frozen;
        if frozen {
            tracing::warn!(instance = %self.id, window = ?crate::stateful::HOLD_WINDOW,
                "this node's role lease was not renewed in time: the primary is frozen until it is");
        } else {
            tracing::info!(instance = %self.id, "the role lease is fresh again: the primary runs on");
        }
    }

    /// Takes the key when this instance is the one to (its node's role
    /// lease fresh): the promotion follows after [`GUARD`].
    async fn campaign(&self, l: &mut Local) {
        let s = self.spec.stateful.as_ref().expect("stateful");
        let Some(roles) = self.st.roles.get(&self.spec.name) else { return };
        // Nodes with a lease that answer this one.
        let silent = self.r.ctx.peers.silent_nodes();
        let live: BTreeSet<String> = self.st.nodes.keys().filter(|n| !silent.contains(*n)).cloned().collect();
        if let Err(why) = may_campaign(&self.spec.name, self.id, roles, &live, s, l.last_primary_position) {
            if l.candidacy.as_ref() != Some(&why) {
                tracing::info!(instance = %self.id, why, "the service has no primary; this instance does not take the key");
                l.candidacy = Some(why);
            }
            return;
        }
        l.candidacy = None;
        // The lease it holds, fresh or not: the compare-and-swap reaches the
        // store or fails, and the promotion waits for a fresh lease.
        let Some(lease) = self.s.lease.id() else { return };
        let key = primary_key(&self.spec.name);
        let rec = PrimaryRecord {
            instance: self.id.to_string(),
            node: self.r.ctx.node().to_string(),
            since_ms: halo_model::clock::unix_ms(),
        };
        let txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::put(
            &key,
            serde_json::to_vec(&rec).expect("encodes"),
            Some(lease),
        ));
        match self.r.ctx.store.txn(txn).await {
            Ok(t) if t.succeeded => {
                tracing::info!(instance = %self.id, token = t.revision, "took the primary key; promoting after {GUARD:?}");
                l.taken = Some((t.revision, Instant::now()));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "campaigning for primary failed"),
        }
    }

    /// A primary on a node the peers find silent loses its role lease (its
    /// key goes at once), after a linearizable read that it still holds
    /// the same key. Only a node with a healthy replica of the service
    /// does this.
    async fn end_silent_term(&self, h: &HeldPrimary) {
        let Some(lease) = h.lease else { return };
        // Silent to this node, or out of the cluster already (evicted: its
        // node lease is gone, and the peers no longer probe it).
        let gone = !self.st.nodes.contains_key(&h.record.node);
        if (self.r.ctx.peers.silent(&h.record.node).is_none() && !gone) || !self.up() {
            return;
        }
        let key = primary_key(&self.spec.name);
        let now = tokio::time::timeout(crate::stateful::HOLD_WINDOW, self.r.ctx.store.get(&key)).await;
        if !matches!(now, Ok(Ok(Some(ref kv))) if kv.create_revision == h.token) {
            return;
        }
        tracing::warn!(service = %self.spec.name, primary = %h.record.instance, node = %h.record.node,
            "the primary's node does not answer; ending its term");
        match self.r.ctx.store.revoke(lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => tracing::debug!(error = %e, "revoking the primary's lease failed"),
        }
    }

    /// Makes this instance the primary of `token` (the key is ours and the
    /// guard has passed): `promote` on a running replica; a new service's
    /// first instance starts as primary.
    async fn promote(&self, l: &mut Local, token: Revision) {
        let ev = &self.r.ctx.m.events;
        let (svc, id) = (Some(self.spec.name.as_str()), self.id);
        let s = self.spec.stateful.as_ref().expect("stateful");
        let still = self.held().is_some_and(|h| h.token == token && h.record.instance == id);
        if !still || self.s.lease.fresh().is_none() {
            return;
        }
        let dir = data_dir(&self.r.ctx.data_dir, self.spec, id);
        if self.up() && !self.ready() {
            // Started, not answering yet: promoted once it does.
            l.taken = Some((token, Instant::now().checked_sub(GUARD).unwrap_or_else(Instant::now)));
            return;
        }
        if self.ready() {
            let argv = s.hooks.promote.as_ref().expect("validated: a replicated service has promote");
            if let Err(e) = self.hook(argv, Role::Primary, None).await {
                ev.warn(EventKind::Demoted, svc, Some(id), format!("promoting {id} failed: {e}; handing the key back"));
                release(self.r, self.st, &self.spec.name, id, token).await;
                return;
            }
        }
        if let Err(e) = write_marker(&dir, Marker { role: Role::Primary, token }) {
            tracing::error!(instance = %id, error = %e, "cannot record the primary role in the data directory");
        }
        l.role = Role::Primary;
        l.token = token;
        l.following = None;
        let how = if self.ready() { "promoted" } else { "starts as the first primary" };
        ev.info(EventKind::Promoted, svc, Some(id), format!("{id} {how} on {} (token {token})", self.r.ctx.node()));
    }

    /// Stops this primary serving writes: `demote`, or its process stopped.
    async fn demote(&self, l: &mut Local, why: &str) {
        let ev = &self.r.ctx.m.events;
        let (svc, id) = (Some(self.spec.name.as_str()), self.id);
        let s = self.spec.stateful.as_ref().expect("stateful");
        // A frozen primary is stopped (the stop thaws it first).
        let demoted = match (&s.hooks.demote, self.ready() && !l.frozen) {
            (Some(argv), true) => self
                .hook(argv, Role::Demoted, None)
                .await
                .map_err(|e| tracing::warn!(instance = %id, error = %e, "demote failed; stopping the instance"))
                .is_ok(),
            _ => false,
        };
        if !demoted {
            self.r.stop_instance(id);
        }
        l.role = Role::Demoted;
        l.healthy = false;
        l.taken = None;
        l.frozen = false;
        let how = if demoted { "demoted" } else { "stopped" };
        ev.warn(EventKind::Demoted, svc, Some(id), format!("{id} {how}: {why} (token {})", l.token));
    }
}

/// Deletes the key of `service` if it is still `id`'s term `token`.
async fn release(r: &Reconciler, st: &ClusterState, service: &str, id: &str, token: Revision) {
    if !st.primaries.get(service).is_some_and(|h| h.record.instance == id && h.token == token) {
        return;
    }
    let key = primary_key(service);
    let txn = Txn::new()
        .when(Compare::new(&key, CompareOp::Equal, CompareTarget::CreateRevision(token)))
        .and_then(TxnOp::Delete(key.clone()));
    if let Err(e) = r.ctx.store.txn(txn).await {
        tracing::warn!(service, error = %e, "handing the primary key back failed (it runs out with the role lease)");
    }
}

/// Writes the instance's role record when it changed (on the node lease).
async fn publish(r: &Reconciler, id: &str, l: &mut Local, dir: &std::path::Path, st: &ClusterState) {
    let port = r.instances.lock().get(id).map(|m| m.status.borrow().port);
    let rec = RoleRecord {
        node: r.ctx.node().to_string(),
        role: l.role,
        token: l.token,
        position: l.position,
        healthy: l.healthy,
        has_data: read_marker(dir).is_some(),
        addr: port.map(|p| (r.ctx.m.cfg.addr, p).into()),
        reason: l.reason.clone(),
        candidacy: l.candidacy.clone(),
    };
    let stored = st.roles.get(&l.service).and_then(|m| m.get(id));
    if l.published.as_ref() == Some(&rec) && stored == Some(&rec) {
        return;
    }
    let Some(lease) = r.ctx.m.lease() else { return };
    let v = serde_json::to_vec(&rec).expect("encodes");
    match r.ctx.store.put(&role_key(&l.service, id), v, Some(lease)).await {
        Ok(_) => l.published = Some(rec),
        Err(e) => tracing::debug!(instance = %id, error = %e, "publishing the role failed"),
    }
}
