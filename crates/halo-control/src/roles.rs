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
use halo_model::stateful::{parse_position, Synchronous};
use halo_model::ServiceSpec;
use halo_store::{Compare, CompareOp, CompareTarget, Revision, StoreError, Txn, TxnOp};
use halo_supervisor::Runner;

use crate::events::EventKind;
use crate::keys::{
    primary_key, role_key, switchover_key, sync_key, Handed, PrimaryRecord, RoleRecord, SwitchoverRecord, SyncRecord,
};
use crate::reconcile::Reconciler;
use crate::state::{ClusterState, HeldPrimary};
use crate::stateful::decide::{choose_standby, may_campaign, may_take_handover, switchover_state, SwitchoverState};
use crate::stateful::{
    data_dir, hook_env, read_marker, write_marker, Marker, Role, Stateful, CHECK_EVERY, GUARD, POSITION_EVERY,
    STALL_AFTER, SWITCHOVER_DRAIN, TICK,
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
    /// A replica's position while it differs from the primary's, and since
    /// when it has not moved.
    stalled: Option<(u64, Instant)>,
    /// A primary's synchronous standby, as it keeps it.
    sync: SyncState,
    /// A primary's planned handover, under way.
    handover: Option<Handover>,
    published: Option<RoleRecord>,
}

/// A synchronous primary's standby. The recorded standbys (the service's
/// [`SyncRecord`]) must always include one that has every write the
/// primary acknowledged: a new standby is added to the record before
/// `set_synchronous` names it, and the old one leaves the record only
/// once the new one has reached the primary's position of when it was
/// named.
#[derive(Default)]
struct SyncState {
    /// What `set_synchronous` last named in this term (`None`: nothing yet).
    applied: Option<Option<String>>,
    /// A standby named, and the primary's position it must reach before
    /// it is the only one recorded.
    pending: Option<(String, u64)>,
}

/// A primary's planned handover to `to` (`halo switchover`).
enum Handover {
    /// Synchronous: making the target the standby first.
    Syncing { to: String },
    /// No longer published as primary (proxies close its connections);
    /// stopped after [`SWITCHOVER_DRAIN`].
    Draining { to: String, since: Instant },
    /// Its process stopping cleanly (the replicas get its last writes),
    /// at `position` when it stopped taking them.
    Stopping { to: String, position: Option<u64> },
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
            stalled: None,
            sync: SyncState::default(),
            handover: None,
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
    // Renewed only while this node has an instance that may be primary
    // (each step says): no store request at all on other nodes.
    s.lease.want(false);
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
        .assigned_to(node)
        .filter_map(|(_, a)| {
            let svc = st.services.get(&a.placement.service)?;
            let spec = svc.spec_for(&a.placement.template).unwrap_or(&svc.spec);
            spec.replicated().then(|| (a.placement.id.clone(), spec.clone()))
        })
        .collect();
    let holds = st.primaries.values().any(|p| p.record.node == node);
    s.lease.want(holds || !mine.is_empty() || !locals.is_empty());
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

    async fn hook(
        &self,
        argv: &[String],
        role: Role,
        token: Revision,
        primary: Option<SocketAddr>,
    ) -> Result<Vec<u8>, String> {
        let runner = self.running.as_ref().and_then(|r| r.runner.clone()).ok_or("the instance is not running")?;
        let timeout = self.spec.stateful.as_ref().expect("stateful").hook_timeout;
        runner.run_with(argv, &hook_env(role, token, primary), None, timeout).await.map_err(|e| e.to_string())
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
        // A process started again is told whom to follow again.
        if self.running.is_none() {
            l.following = None;
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
            // A planned handover past its first phase owns the tick.
            if l.handover.as_ref().is_some_and(|h| !matches!(h, Handover::Syncing { .. })) {
                self.hand_over(l).await;
                return;
            }
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
                    Some(argv) => self.hook(argv, l.role, l.token, l.following).await.map(drop),
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
                    match self.hook(argv, l.role, l.token, l.following).await {
                        Ok(out) => match parse_position(&String::from_utf8_lossy(&out)) {
                            Ok(p) => l.position = Some(p),
                            Err(e) => l.reason = Some(format!("position: {e}")),
                        },
                        Err(e) => tracing::debug!(instance = %id, error = %e, "position hook failed"),
                    }
                }
            }
        }
        // A primary's planned handover, and its synchronous standby.
        if l.role == Role::Primary && self.ready() {
            self.hand_over(l).await;
            if l.role == Role::Primary && !matches!(l.handover, Some(Handover::Draining { .. })) {
                self.keep_synchronous(l).await;
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
                } else if l.role == Role::Replica && l.token == token && self.stalled(l, &primary, token) {
                    // It does not stream from the primary (it diverged: a
                    // synchronous standby promoted behind it; or its
                    // receiver fails): rewound, as a former primary is.
                    let msg = format!(
                        "{id} does not stream from {primary} (at {:?} for {STALL_AFTER:?}, away from the primary's position): rewinding it",
                        l.position
                    );
                    self.r.ctx.m.events.warn(EventKind::Cloned, Some(&self.spec.name), Some(id), msg);
                    let _ = write_marker(&dir, Marker { role: Role::Demoted, token });
                    l.role = Role::Demoted;
                    l.stalled = None;
                    self.r.stop_instance(id);
                } else if l.token != token || l.following != Some(addr) {
                    let follow = s.hooks.follow.as_ref().expect("validated: a replicated service has follow");
                    match self.hook(follow, Role::Replica, token, Some(addr)).await {
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

    /// Whether this replica's position has stayed put, away from the
    /// primary's, for [`STALL_AFTER`].
    fn stalled(&self, l: &mut Local, primary: &str, token: Revision) -> bool {
        let theirs = self.st.roles.get(&self.spec.name).and_then(|r| r.get(primary));
        let theirs = theirs.filter(|r| r.token == token).and_then(|r| r.position);
        match (l.position, theirs) {
            (Some(mine), Some(theirs)) if mine != theirs => match l.stalled {
                Some((at, since)) if at == mine => since.elapsed() >= STALL_AFTER,
                _ => {
                    l.stalled = Some((mine, Instant::now()));
                    false
                }
            },
            _ => {
                l.stalled = None;
                false
            }
        }
    }

    /// Nodes with a lease that answer this one.
    fn live(&self) -> BTreeSet<String> {
        let silent = self.r.ctx.peers.silent_nodes();
        self.st.nodes.keys().filter(|n| !silent.contains(*n)).cloned().collect()
    }

    /// The primary's side of a switchover: choose the target (make it the
    /// synchronous standby first), stop being reached, stop cleanly, then
    /// hand the key back with a record naming the target and this
    /// primary's last position; the target promotes without the guard.
    async fn hand_over(&self, l: &mut Local) {
        let s = self.spec.stateful.as_ref().expect("stateful");
        let (name, id) = (self.spec.name.as_str(), self.id);
        let ev = &self.r.ctx.m.events;
        let sw = self.st.switchovers.get(name);
        let asked = match switchover_state(sw, Some(l.token), halo_model::clock::unix_ms()) {
            SwitchoverState::Asked { to } => Some(to),
            _ => None,
        };
        let roles = self.st.roles.get(name).cloned().unwrap_or_default();
        // A drained node takes no new primary.
        let mut live = self.live();
        live.retain(|n| !self.st.admin.get(n).is_some_and(|a| a.draining));
        let eligible =
            |to: &str| choose_standby(name, l.token, &roles, &live, None, Some(to), l.position).as_deref() == Some(to);
        match l.handover.take() {
            None => {
                let Some(to) = asked else {
                    // Of an earlier term, or run out: nobody acts on it.
                    if let Some(sw) = sw.filter(|sw| sw.token <= l.token) {
                        if sw.token == l.token && sw.handed.is_none() {
                            ev.warn(EventKind::Switchover, Some(name), Some(id), "the switchover ran out".into());
                        }
                        let _ = self.r.ctx.store.delete(&switchover_key(name)).await;
                        return;
                    }
                    // A primary on a drained node hands over to a replica
                    // elsewhere (its instances stay: their data is there).
                    let node = self.r.ctx.node();
                    if self.st.admin.get(node).is_some_and(|a| a.draining) {
                        let current = l.sync.applied.clone().flatten();
                        let to = choose_standby(name, l.token, &roles, &live, current.as_deref(), None, l.position);
                        if let Some(to) = to {
                            let store = &*self.r.ctx.store;
                            if let Ok(Some(true)) =
                                crate::stateful::ask_switchover(store, name, l.token, Some(&to)).await
                            {
                                let msg = format!("{id}'s node {node} is drained: switching over to {to}");
                                ev.info(EventKind::Switchover, Some(name), Some(id), msg);
                            }
                        }
                    }
                    return;
                };
                let current = l.sync.applied.clone().flatten();
                let target = match to {
                    Some(t) => Some(t.to_string()),
                    None => choose_standby(name, l.token, &roles, &live, current.as_deref(), None, l.position),
                };
                match target {
                    Some(t) if eligible(&t) => {
                        ev.info(
                            EventKind::Switchover,
                            Some(name),
                            Some(id),
                            format!("switching over from {id} to {t}"),
                        );
                        l.handover = Some(if s.synchronous == Synchronous::Off {
                            Handover::Draining { to: t, since: Instant::now() }
                        } else {
                            Handover::Syncing { to: t }
                        });
                    }
                    t => {
                        let why = match t {
                            Some(t) => format!("{t} is not a healthy replica following {id}"),
                            None => format!("no healthy replica follows {id}"),
                        };
                        self.abandon(&why).await;
                    }
                }
            }
            Some(Handover::Syncing { to }) => {
                if asked.is_none() || !eligible(&to) {
                    self.abandon(&format!("{to} is no longer a healthy replica, or the switchover ran out")).await;
                    return;
                }
                let recorded = self.st.sync.get(name).filter(|(r, _)| r.token == l.token).map(|(r, _)| &r.standbys);
                let settled = l.sync.applied == Some(Some(to.clone()))
                    && l.sync.pending.is_none()
                    && recorded.is_some_and(|r| r == std::slice::from_ref(&to));
                l.handover = Some(if settled {
                    Handover::Draining { to, since: Instant::now() }
                } else {
                    Handover::Syncing { to }
                });
            }
            Some(Handover::Draining { to, since }) => {
                if since.elapsed() < SWITCHOVER_DRAIN {
                    l.handover = Some(Handover::Draining { to, since });
                    return;
                }
                // No proxy sends it anything now: its last position, then
                // a clean stop (the replicas get everything it wrote).
                let position = match &s.hooks.position {
                    Some(argv) => self.hook(argv, Role::Primary, l.token, None).await.ok(),
                    None => None,
                };
                let position = position.and_then(|out| parse_position(&String::from_utf8_lossy(&out)).ok());
                self.r.stop_drained(id);
                l.handover = Some(Handover::Stopping { to, position });
            }
            Some(Handover::Stopping { to, position }) => {
                if self.r.instances.lock().contains_key(id) {
                    l.handover = Some(Handover::Stopping { to, position });
                    return;
                }
                let key = primary_key(name);
                let now = halo_model::clock::unix_ms();
                let rec = SwitchoverRecord {
                    token: l.token,
                    to: Some(to.clone()),
                    asked_ms: sw.map_or(now, |sw| sw.asked_ms),
                    handed: Some(Handed { to: to.clone(), position, at_ms: now }),
                };
                let txn = Txn::new()
                    .when(Compare::new(&key, CompareOp::Equal, CompareTarget::CreateRevision(l.token)))
                    .and_then(TxnOp::Delete(key.clone()))
                    .and_then(TxnOp::put(&switchover_key(name), serde_json::to_vec(&rec).expect("encodes"), None));
                match self.r.ctx.store.txn(txn).await {
                    Ok(t) if t.succeeded => {
                        l.role = Role::Demoted;
                        l.healthy = false;
                        let msg =
                            format!("{id} stopped and handed the primary to {to} (switchover; token {})", l.token);
                        ev.info(EventKind::Switchover, Some(name), Some(id), msg);
                    }
                    Ok(_) => l.role = Role::Demoted,
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "handing the key over failed; trying again");
                        l.handover = Some(Handover::Stopping { to, position });
                    }
                }
            }
        }
    }

    /// Ends a switchover that cannot go on: the primary stays.
    async fn abandon(&self, why: &str) {
        let (name, id) = (self.spec.name.as_str(), self.id);
        let _ = self.r.ctx.store.delete(&switchover_key(name)).await;
        let msg = format!("switchover abandoned: {why}; {id} stays the primary");
        self.r.ctx.m.events.warn(EventKind::Switchover, Some(name), Some(id), msg);
    }

    /// A synchronous primary keeps one healthy replica as its standby
    /// (see [`SyncState`] for the order of the steps): each tick does at
    /// most one step.
    async fn keep_synchronous(&self, l: &mut Local) {
        let s = self.spec.stateful.as_ref().expect("stateful");
        if s.synchronous == Synchronous::Off || l.frozen {
            return;
        }
        let (name, id) = (self.spec.name.as_str(), self.id);
        let recorded = self.st.sync.get(name).filter(|(r, _)| r.token == l.token).map(|(r, _)| r.standbys.clone());
        let Some(recorded) = recorded else {
            // This term's record (promote wrote it; a restart of halo may not have).
            self.record_sync(id, l.token, Vec::new()).await;
            return;
        };
        let roles = self.st.roles.get(name).cloned().unwrap_or_default();
        let prefer = match &l.handover {
            Some(Handover::Syncing { to }) => Some(to.as_str()),
            _ => None,
        };
        let current = l.sync.applied.clone().flatten();
        let mut want = choose_standby(name, l.token, &roles, &self.live(), current.as_deref(), prefer, l.position);
        if want.is_none() && s.synchronous == Synchronous::Strict && l.sync.applied.is_some() {
            // Strict: writes wait for the standby named (or any) until one is back.
            want = current.clone();
        }
        if let Some((b, p0)) = l.sync.pending.clone() {
            if want.as_ref() == Some(&b) {
                let at = roles.get(&b).filter(|r| r.token == l.token).and_then(|r| r.position);
                if at.is_some_and(|p| p >= p0) && self.record_sync(id, l.token, vec![b.clone()]).await {
                    tracing::info!(instance = %id, standby = %b, "the synchronous standby is recorded");
                    l.sync.pending = None;
                }
                return;
            }
            l.sync.pending = None;
        }
        if l.sync.applied.as_ref() == Some(&want) {
            match &want {
                Some(b) if recorded != std::slice::from_ref(b) => self.catch_up(l, b.clone()).await,
                _ => {}
            }
            return;
        }
        // The record first: a new standby joins it before it is named
        // (until then the old one may hold the last write); with none, no
        // failover may pass over this primary.
        match &want {
            Some(b) if !recorded.is_empty() && !recorded.contains(b) => {
                let mut both = recorded.clone();
                both.push(b.clone());
                self.record_sync(id, l.token, both).await;
                return;
            }
            None if !recorded.is_empty() => {
                self.record_sync(id, l.token, Vec::new()).await;
                return;
            }
            _ => {}
        }
        let argv = s.hooks.set_synchronous.as_ref().expect("validated: synchronous has set_synchronous");
        let runner = self.running.as_ref().and_then(|r| r.runner.clone());
        let Some(runner) = runner else { return };
        let mut env = hook_env(Role::Primary, l.token, None);
        env.insert("HALO_SYNC_STANDBYS".into(), want.clone().unwrap_or_default());
        env.insert("HALO_SYNCHRONOUS".into(), s.synchronous.as_str().into());
        match runner.run_with(argv, &env, None, s.hook_timeout).await {
            Ok(_) => {
                let who = want.as_deref().unwrap_or(if s.synchronous == Synchronous::Strict { "any" } else { "none" });
                let msg = format!("{id}'s synchronous standby: {who}");
                self.r.ctx.m.events.info(EventKind::Synchronous, Some(name), Some(id), msg);
                l.sync.applied = Some(want.clone());
                if let Some(b) = want {
                    self.catch_up(l, b).await;
                }
            }
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "the set_synchronous hook failed");
                l.reason = Some(format!("set_synchronous: {e}"));
            }
        }
    }

    /// The standby just named must reach the primary's position of now
    /// before it is the only one recorded.
    async fn catch_up(&self, l: &mut Local, standby: String) {
        let s = self.spec.stateful.as_ref().expect("stateful");
        let Some(argv) = &s.hooks.position else { return };
        match self.hook(argv, Role::Primary, l.token, None).await {
            Ok(out) => match parse_position(&String::from_utf8_lossy(&out)) {
                Ok(p) => l.sync.pending = Some((standby, p)),
                Err(e) => l.reason = Some(format!("position: {e}")),
            },
            Err(e) => tracing::debug!(instance = %self.id, error = %e, "position hook failed"),
        }
    }

    /// Writes the service's synchronous standbys for the term `token`, if
    /// that term's key is still there.
    async fn record_sync(&self, id: &str, token: Revision, standbys: Vec<String>) -> bool {
        let name = &self.spec.name;
        let rec = SyncRecord { token, primary: id.to_string(), standbys };
        let key = primary_key(name);
        let txn = Txn::new()
            .when(Compare::new(&key, CompareOp::Equal, CompareTarget::CreateRevision(token)))
            .and_then(TxnOp::put(&sync_key(name), serde_json::to_vec(&rec).expect("encodes"), None));
        match self.r.ctx.store.txn(txn).await {
            Ok(t) => t.succeeded,
            Err(e) => {
                tracing::debug!(service = %name, error = %e, "recording the synchronous standbys failed");
                false
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
        let live = self.live();
        let sync = self.st.sync.get(&self.spec.name).filter(|_| s.synchronous != Synchronous::Off);
        let switchover = self.st.switchovers.get(&self.spec.name);
        let handed = match switchover_state(switchover, None, halo_model::clock::unix_ms()) {
            SwitchoverState::Handed(h) => Some(h),
            _ => None,
        };
        let allowed = match handed {
            Some(h) if h.to == self.id && switchover.is_some_and(|sw| sw.token != l.token) => {
                Err("a switchover target that does not follow the old primary".to_string())
            }
            Some(h) => may_take_handover(self.id, h, l.healthy, l.position),
            None => may_campaign(
                &self.spec.name,
                self.id,
                roles,
                &live,
                s,
                l.last_primary_position,
                sync.map(|(rec, _)| rec),
            ),
        };
        if let Err(why) = allowed {
            if handed.is_some_and(|h| h.to == self.id) {
                // Catching up: ask its position again at once.
                l.next_position = Instant::now();
            }
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
        let mut txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::put(
            &key,
            serde_json::to_vec(&rec).expect("encodes"),
            Some(lease),
        ));
        if s.synchronous != Synchronous::Off {
            // Decided on these standbys: only if they are still the ones.
            txn = txn.when(Compare::mod_revision(&sync_key(&self.spec.name), sync.map_or(0, |(_, rev)| *rev)));
        }
        match self.r.ctx.store.txn(txn).await {
            Ok(t) if t.succeeded && handed.is_some() => {
                // The old primary stopped before it handed the key over:
                // no guard to wait out.
                tracing::info!(instance = %self.id, token = t.revision, "took the primary key a switchover handed over");
                l.taken = Some((t.revision, Instant::now().checked_sub(GUARD).unwrap_or_else(Instant::now)));
            }
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
        if s.synchronous != Synchronous::Off && !self.record_sync(id, token, Vec::new()).await {
            // Before it takes a write: no failover may go past it.
            l.taken = Some((token, Instant::now().checked_sub(GUARD).unwrap_or_else(Instant::now)));
            return;
        }
        if self.ready() {
            let argv = s.hooks.promote.as_ref().expect("validated: a replicated service has promote");
            if let Err(e) = self.hook(argv, Role::Primary, token, None).await {
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
        l.sync = SyncState::default();
        l.handover = None;
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
                .hook(argv, Role::Demoted, l.token, None)
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
        l.handover = None;
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
    // A primary handing over is no longer reached.
    let handing = matches!(l.handover, Some(Handover::Draining { .. } | Handover::Stopping { .. }));
    let rec = RoleRecord {
        node: r.ctx.node().to_string(),
        role: if handing { Role::Demoted } else { l.role },
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
