//! Floating IPs (`[[vip]]` in the node file): an address that one node of
//! the cluster at a time has on its interface, moved to another healthy
//! node when its holder fails.
//!
//! **Who holds it** is decided in the store: the holder's key
//! `/halo/vips/IP` lives on the holder's *VIP lease* (its own, renewed
//! every [`RENEW_EVERY`]); the key's create revision is the fencing token.
//! Each node that declares the VIP keeps a candidacy record on the same
//! lease saying whether it may hold it (interface present, tracked check
//! passing). With the key absent, the best candidate (first in `prefer`,
//! then by a hash of address and node, which spreads several VIPs)
//! campaigns at once and the others after [`FALLBACK`].
//!
//! **Never on two nodes**, whatever fails:
//! - The holder keeps the address only while its last successful renewal
//!   was sent less than [`HOLD_WINDOW`] ago; past that it removes the
//!   address itself, before anyone could take it.
//! - The kernel removes the address [`netlink::LIFETIME_SECS`] after the
//!   last refresh, which only a renewing holder does: a frozen or dead
//!   holder cannot keep it.
//! - A node that takes the key waits [`GUARD`] (longer than both) before
//!   adding the address, and for IPv4 first asks the network (an ARP
//!   probe) whether anyone still answers for it.
//!
//! **Moving fast**: a holder that [`Peers`] finds silent (its node API has
//! not answered for [`crate::peers::SUSPECT_AFTER`]: dead, frozen, cut off) has its VIP
//! lease revoked by a candidate, which removes its key at once instead of
//! after the lease's TTL. A holder whose check fails, or
//! that sees a node earlier in `prefer` healthy for [`PREEMPT_AFTER`],
//! removes the address and then its key.

mod announce;
pub(crate) mod netlink;
mod track;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_proxy::Proxy;
use halo_store::{Compare, CompareOp, CompareTarget, LeaseId, Revision, Store, StoreError, Txn, TxnOp};
use serde::Serialize;

use crate::fast_lease::FastLease;
use crate::fnv::fnv64;
use crate::keys::{vip_key, vip_node_key, VipCandidate, VipHolder};
use crate::peers::Peers;
use crate::state::{ClusterState, HeldVip, View};
use halo_model::lock::LockExt;
use netlink::{IfAddr, Interface};

pub use crate::fast_lease::{RENEW_EVERY, TTL as VIP_LEASE_TTL};
/// A holder whose last successful renewal was sent longer ago removes
/// the address.
pub const HOLD_WINDOW: Duration = Duration::from_millis(500);
/// A new holder waits this long after taking the key before adding the
/// address: longer than [`HOLD_WINDOW`] (and a tick) for a live old holder.
pub const GUARD: Duration = Duration::from_millis(800);
/// IPv6 has no probe: the wait also covers the kernel's lifetime of a dead
/// or frozen holder's address ([`crate::peers::SUSPECT_AFTER`] + this > 1.25 s).
pub const GUARD_V6: Duration = Duration::from_millis(1000);
/// The best candidate campaigns at once, the others after this.
pub const FALLBACK: Duration = Duration::from_secs(1);
/// A node earlier in `prefer` takes the address back once it has been
/// healthy this long.
pub const PREEMPT_AFTER: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(50);
/// Announcements: a burst when the address is added, another a second later.
const BURST: usize = 3;
const SECOND_BURST_AFTER: Duration = Duration::from_secs(1);
/// How long an IPv4 takeover listens for an answer to its probe.
const PROBE_LISTEN: Duration = Duration::from_millis(100);

/// One `[[vip]]` of the node file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSpec {
    pub address: IpAddr,
    pub prefix: u8,
    pub interface: String,
    /// Nodes in order of preference; should be the same on every node.
    pub prefer: Vec<String>,
    pub track: Track,
}

/// What a node must pass to hold the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Track {
    /// This node's proxy: every listener accepts connections.
    Proxy,
    /// A command; exit status 0 is healthy.
    Exec(Vec<String>),
    None,
}

impl std::fmt::Display for Track {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Track::Proxy => f.write_str("proxy"),
            Track::Exec(argv) => write!(f, "exec `{}`", argv.join(" ")),
            Track::None => f.write_str("none"),
        }
    }
}

/// `IP/PREFIX` or a bare IP (a host address: /32 or /128).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip.trim().parse::<IpAddr>().ok()?, Some(p.trim().parse::<u8>().ok()?)),
        None => (s.trim().parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max && !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast()).then_some((ip, prefix))
}

/// A floating IP as `halo vip list` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VipStatus {
    pub address: String,
    pub holder: Option<String>,
    pub since_ms: Option<u64>,
    pub token: Option<Revision>,
    pub interface: Option<String>,
    /// Every node that declares it, and whether it may hold it.
    pub nodes: BTreeMap<String, VipCandidate>,
}

/// The cluster's floating IPs from a view.
pub fn list(st: &ClusterState) -> Vec<VipStatus> {
    let mut addrs: Vec<&String> = st.vips.keys().chain(st.vip_candidates.keys()).collect();
    addrs.sort();
    addrs.dedup();
    addrs
        .into_iter()
        .map(|a| {
            let held = st.vips.get(a);
            VipStatus {
                address: a.clone(),
                holder: held.map(|h| h.holder.node.clone()),
                since_ms: held.map(|h| h.holder.since_ms),
                token: held.map(|h| h.token),
                interface: held.map(|h| h.holder.interface.clone()),
                nodes: st.vip_candidates.get(a).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

/// This node's floating IPs: its VIP lease and one task per address.
pub struct Vips {
    node: String,
    store: Arc<dyn Store>,
    view: Arc<View>,
    /// The VIP lease.
    lease: FastLease,
    local: Vec<Arc<Local>>,
    /// What this node hears from the others.
    peers: Arc<Peers>,
}

/// One floating IP on this node.
struct Local {
    spec: VipSpec,
    key: String,
    /// The verdict of its tracked check (shared by the VIPs with the same one).
    health: Arc<track::Health>,
    /// What the task does with it now; `Phase::Up` is the address being on
    /// the interface.
    held: Mutex<Option<Held>>,
    /// Taken by each tick of the task and by [`Vips::release_all`], so a
    /// tick in progress cannot add the address back after it was released.
    turn: tokio::sync::Mutex<()>,
    acquired: AtomicU64,
    released: AtomicU64,
    conflicts: AtomicU64,
    /// Time held up to the last removal (the current stretch is added on read).
    held_ms: AtomicU64,
}

#[derive(Debug, Clone)]
struct Held {
    token: Revision,
    lease: LeaseId,
    iface: Interface,
    phase: Phase,
    since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The key is ours; the address is added once this passes.
    Guard(Instant),
    /// The address is on the interface (since `added`), refreshed with
    /// each renewal.
    Up { refreshed: Instant, added: Instant, second_burst: bool },
    /// The key is ours but renewals are late: the address is off until
    /// one succeeds again.
    Down,
    /// Someone else answers for the address; asked again at `retry`.
    /// `reported`: logged as an error (it lasted past a takeover's wait).
    Conflict { retry: Instant, reported: bool },
}

impl Vips {
    /// Starts the VIP lease and one task per floating IP of the node file.
    pub(crate) async fn start(
        node: &str,
        specs: &[VipSpec],
        store: Arc<dyn Store>,
        view: Arc<View>,
        proxy: Arc<Proxy>,
        peers: Arc<Peers>,
        tasks: &halo_proxy::tasks::Tasks,
    ) -> Arc<Vips> {
        // One check per distinct `track`: the proxy's verdict is the same
        // for every floating IP.
        let mut checks: Vec<(Track, Arc<track::Health>)> = Vec::new();
        for s in specs {
            if !checks.iter().any(|(t, _)| *t == s.track) {
                checks.push((s.track.clone(), track::Health::new()));
            }
        }
        let local = specs
            .iter()
            .map(|s| {
                let health = checks.iter().find(|(t, _)| *t == s.track).expect("one per track").1.clone();
                Arc::new(Local {
                    key: vip_key(&s.address),
                    spec: s.clone(),
                    health,
                    held: Mutex::new(None),
                    turn: tokio::sync::Mutex::new(()),
                    acquired: AtomicU64::new(0),
                    released: AtomicU64::new(0),
                    conflicts: AtomicU64::new(0),
                    held_ms: AtomicU64::new(0),
                })
            })
            .collect();
        let v = Arc::new(Vips {
            node: node.to_string(),
            store,
            view,
            lease: FastLease::new("floating IP", HOLD_WINDOW),
            local,
            peers,
        });
        v.adopt().await;
        let renewing = v.clone();
        tasks.spawn(async move { renewing.lease.renew(&*renewing.store).await });
        for (track, health) in checks {
            let floating = {
                let v = Arc::downgrade(&v);
                move |ip: IpAddr| {
                    let v = v.upgrade()?;
                    v.local.iter().find(|o| o.spec.address == ip).map(|o| o.is_up())
                }
            };
            tasks.spawn(track::run(track, proxy.clone(), floating, health));
        }
        for l in &v.local {
            tasks.spawn(v.clone().run_one(l.clone()));
        }
        v
    }

    /// A previous process of this node (before a restart or a binary
    /// upgrade) may still hold addresses on a live lease: that lease is
    /// this process's from now on, and so are its keys.
    async fn adopt(&self) {
        let st = self.view.current();
        let Some(lease) = st.vips.values().filter(|h| h.holder.node == self.node).find_map(|h| h.lease) else {
            return;
        };
        self.lease.adopt(&*self.store, lease).await;
    }

    /// The VIP lease while its last renewal was sent within [`HOLD_WINDOW`].
    fn fresh(&self) -> Option<LeaseId> {
        self.lease.fresh()
    }

    fn lease_id(&self) -> Option<LeaseId> {
        self.lease.id()
    }

    /// The loop of one floating IP.
    async fn run_one(self: Arc<Self>, l: Arc<Local>) {
        let mut t = TaskState::default();
        loop {
            {
                let _turn = l.turn.lock().await;
                if self.lease.stopped() {
                    return;
                }
                self.step(&l, &mut t).await;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn step(&self, l: &Local, t: &mut TaskState) {
        if t.iface_checked.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
            t.iface = Some(netlink::interface(&l.spec.interface));
            t.iface_checked = Some(Instant::now());
        }
        let iface = t.iface.clone().expect("just looked up");
        let health = l.health.get();
        let me = VipCandidate {
            eligible: iface.is_ok(),
            healthy: health.is_ok(),
            reason: iface.as_ref().err().or(health.as_ref().err()).cloned(),
        };
        if let Some(lease) = self.lease_id() {
            if t.written.as_ref() != Some(&(lease, me.clone())) {
                let key = vip_node_key(&l.spec.address, &self.node);
                let v = serde_json::to_vec(&me).expect("encodes");
                match self.store.put(&key, v, Some(lease)).await {
                    Ok(_) => t.written = Some((lease, me.clone())),
                    Err(e) => tracing::debug!(error = %e, "writing the floating IP candidacy failed"),
                }
            }
        }
        if t.logged.as_ref() != Some(&me) {
            match &me.reason {
                Some(why) => {
                    tracing::warn!(node = %self.node, vip = %l.spec.address, reason = %why, "this node may not hold the floating IP")
                }
                None if t.logged.is_some() => {
                    tracing::info!(node = %self.node, vip = %l.spec.address, "this node may hold the floating IP again")
                }
                None => {}
            }
            t.logged = Some(me.clone());
        }
        let st = self.view.current();
        let ip = l.spec.address.to_string();
        let holder = st.vips.get(&ip).cloned();
        let held = l.held.locked().clone();
        match held {
            Some(h) => self.hold(l, h, &st, holder.as_ref(), &me, t).await,
            None => match (holder, iface) {
                (Some(h), Ok(iface))
                    if h.holder.node == self.node && h.lease.is_some() && h.lease == self.lease_id() =>
                {
                    // Ours (a previous run's, adopted): serve it again.
                    let h = Held {
                        token: h.token,
                        lease: h.lease.expect("checked"),
                        iface,
                        phase: Phase::Down,
                        since: Instant::now(),
                    };
                    self.set_held(l, Some(h));
                }
                (Some(h), _) if h.holder.node == self.node => {
                    // An older run's lease, not ours: end it so the key goes.
                    if let Some(lease) = h.lease {
                        let _ = self.store.revoke(lease).await;
                    }
                }
                (Some(h), _) => {
                    t.absent_since = None;
                    // A holder handing over to a new process (binary
                    // upgrade) is silent for a moment; its VIP lease's TTL
                    // still bounds how long a dead one keeps the key.
                    if me.eligible && me.healthy && !st.upgrading.contains(&h.holder.node) {
                        self.watch_holder(l, &h, t).await;
                    }
                }
                (None, Ok(iface)) if me.eligible && me.healthy => {
                    let absent = *t.absent_since.get_or_insert_with(Instant::now);
                    let best = self.best(l, &st).is_none_or(|b| b == self.node);
                    if best || absent.elapsed() >= FALLBACK {
                        self.campaign(l, iface).await;
                    }
                }
                (None, _) => t.absent_since = None,
            },
        }
    }

    /// The healthy candidate that should hold the address: first in
    /// `prefer`, then by the hash of address and node.
    fn best(&self, l: &Local, st: &ClusterState) -> Option<String> {
        let ip = l.spec.address.to_string();
        let cands = st.vip_candidates.get(&ip)?;
        cands.iter().filter(|(_, c)| c.eligible && c.healthy).map(|(n, _)| n).min_by_key(|n| rank(&l.spec, n)).cloned()
    }

    async fn campaign(&self, l: &Local, iface: Interface) {
        let Some(lease) = self.fresh() else { return };
        let since_ms = halo_model::clock::unix_ms();
        let rec = VipHolder { node: self.node.clone(), since_ms, interface: l.spec.interface.clone() };
        let txn = Txn::new().when(Compare::absent(&l.key)).and_then(TxnOp::put(
            &l.key,
            serde_json::to_vec(&rec).expect("encodes"),
            Some(lease),
        ));
        match self.store.txn(txn).await {
            Ok(r) if r.succeeded => {
                let guard = if l.spec.address.is_ipv4() { GUARD } else { GUARD_V6 };
                tracing::info!(node = %self.node, vip = %l.spec.address, token = r.revision, "took the floating IP's key; adding the address after {guard:?}");
                let h = Held {
                    token: r.revision,
                    lease,
                    iface,
                    phase: Phase::Guard(Instant::now() + guard),
                    since: Instant::now(),
                };
                self.set_held(l, Some(h));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "campaigning for the floating IP failed"),
        }
    }

    /// A holder that [`Peers`] finds silent loses its VIP lease (its keys
    /// go at once).
    async fn watch_holder(&self, l: &Local, h: &HeldVip, t: &mut TaskState) {
        if t.revoked == Some(h.token) || self.fresh().is_none() {
            return;
        }
        let silent = self.peers.silent(&h.holder.node);
        let (Some(silent), Some(lease)) = (silent, h.lease) else { return };
        // The store, asked now (a linearizable read: not answered by a
        // member cut off with this node), must still have that holder.
        let now = tokio::time::timeout(HOLD_WINDOW, self.store.get(&l.key)).await;
        if !matches!(now, Ok(Ok(Some(ref kv))) if kv.create_revision == h.token) {
            return;
        }
        tracing::warn!(node = %self.node, vip = %l.spec.address, holder = %h.holder.node, silent_ms = silent.as_millis() as u64,
            "the floating IP's holder does not answer; ending its hold");
        match self.store.revoke(lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => t.revoked = Some(h.token),
            Err(e) => tracing::debug!(error = %e, "revoking the holder's lease failed"),
        }
    }

    /// One tick of a held floating IP.
    async fn hold(
        &self,
        l: &Local,
        mut h: Held,
        st: &ClusterState,
        key: Option<&HeldVip>,
        me: &VipCandidate,
        t: &mut TaskState,
    ) {
        let fresh = self.fresh() == Some(h.lease);
        let ours = key.is_some_and(|k| k.token == h.token);
        let lost = self.lease_id() != Some(h.lease) || (st.revision >= h.token && !ours);
        if lost {
            self.drop_address(l, &h, "the hold was lost (its lease expired or was revoked)");
            tracing::warn!(node = %self.node, vip = %l.spec.address, token = h.token, "no longer the floating IP's holder");
            self.set_held(l, None);
            return;
        }
        if !fresh {
            self.drop_address(l, &h, "the hold could not be renewed in time");
            if !matches!(h.phase, Phase::Guard(_)) {
                h.phase = Phase::Down;
            }
            self.set_held(l, Some(h));
            return;
        }
        if !me.eligible || !me.healthy {
            let why = me.reason.clone().unwrap_or_default();
            self.release(l, &h, &format!("this node may not hold it: {why}")).await;
            return;
        }
        match self.preferred_over_me(l, st) {
            Some(better) => {
                let since = match &t.better {
                    Some((n, at)) if *n == better => *at,
                    _ => t.better.insert((better.clone(), Instant::now())).1,
                };
                if since.elapsed() >= PREEMPT_AFTER {
                    t.better = None;
                    self.release(l, &h, &format!("{better} is preferred and healthy")).await;
                    return;
                }
            }
            None => t.better = None,
        }
        let now = Instant::now();
        match h.phase {
            Phase::Guard(until) | Phase::Conflict { retry: until, .. } if now >= until => {
                if let IpAddr::V4(v4) = l.spec.address {
                    let iface = h.iface;
                    let answered = tokio::task::spawn_blocking(move || announce::probe(&iface, v4, PROBE_LISTEN))
                        .await
                        .unwrap_or(Ok(None));
                    match answered {
                        Ok(Some(mac)) => {
                            let reported = match h.phase {
                                Phase::Conflict { reported, .. } => reported,
                                _ => {
                                    l.conflicts.fetch_add(1, Relaxed);
                                    false
                                }
                            };
                            // Right after a takeover the old holder's kernel may
                            // answer until its lifetime runs out; longer is a
                            // host with the address configured.
                            let report = !reported && h.since.elapsed() > Duration::from_secs(3);
                            if report {
                                tracing::error!(node = %self.node, vip = %l.spec.address, mac = %announce::mac_text(&mac),
                                    "another host answers for the floating IP although this node holds it; not adding it");
                            }
                            let retry = Instant::now() + Duration::from_millis(200);
                            h.phase = Phase::Conflict { retry, reported: reported || report };
                            self.set_held(l, Some(h));
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(error = %e, "probing for the floating IP failed; adding it"),
                    }
                }
                if self.still_ours(l, &h).await && self.add_address(l, &h) {
                    h.phase = Phase::Up { refreshed: Instant::now(), added: Instant::now(), second_burst: false };
                    l.acquired.fetch_add(1, Relaxed);
                    tracing::info!(node = %self.node, vip = %l.spec.address, interface = %l.spec.interface, token = h.token, "holding the floating IP");
                }
            }
            Phase::Down if self.still_ours(l, &h).await && self.add_address(l, &h) => {
                tracing::info!(node = %self.node, vip = %l.spec.address, "renewing again: the floating IP is back on the interface");
                h.phase = Phase::Up { refreshed: Instant::now(), added: Instant::now(), second_burst: false };
            }
            Phase::Up { refreshed, added, second_burst } => {
                let confirmed = self.lease.renewed();
                if confirmed.is_some_and(|c| c > refreshed) && self.fresh() == Some(h.lease) {
                    if let Err(e) = netlink::put(&l.addr(&h)) {
                        tracing::warn!(node = %self.node, vip = %l.spec.address, error = %e, "refreshing the floating IP failed");
                    }
                    h.phase = Phase::Up { refreshed: Instant::now(), added, second_burst };
                }
                if !second_burst && added.elapsed() >= SECOND_BURST_AFTER {
                    let (iface, ip) = (h.iface, l.spec.address);
                    tokio::task::spawn_blocking(move || announce::announce(&iface, ip, BURST));
                    if let Phase::Up { second_burst, .. } = &mut h.phase {
                        *second_burst = true;
                    }
                }
            }
            _ => {}
        }
        self.set_held(l, Some(h));
    }

    /// A healthy candidate earlier in `prefer` than this node.
    fn preferred_over_me(&self, l: &Local, st: &ClusterState) -> Option<String> {
        let mine = rank(&l.spec, &self.node).0;
        let cands = st.vip_candidates.get(&l.spec.address.to_string())?;
        cands
            .iter()
            .filter(|(n, c)| c.eligible && c.healthy && rank(&l.spec, n).0 < mine)
            .min_by_key(|(n, _)| rank(&l.spec, n))
            .map(|(n, _)| n.clone())
    }

    /// Whether the store, asked now, still has the key under this hold's
    /// token and lease. A read is linearizable: an etcd member that lost
    /// its quorum cannot answer it, although as a stale leader it may still
    /// answer renewals for a while; so an address is added, or added again
    /// after renewals were late, only on this answer.
    async fn still_ours(&self, l: &Local, h: &Held) -> bool {
        match tokio::time::timeout(HOLD_WINDOW, self.store.get(&l.key)).await {
            Ok(Ok(Some(kv))) => kv.create_revision == h.token && kv.lease == Some(h.lease),
            _ => false,
        }
    }

    /// Adds the address (if the hold is still fresh) and announces it.
    fn add_address(&self, l: &Local, h: &Held) -> bool {
        if self.fresh() != Some(h.lease) {
            return false;
        }
        if let Err(e) = netlink::put(&l.addr(h)) {
            tracing::warn!(node = %self.node, vip = %l.spec.address, interface = %l.spec.interface, error = %e, "cannot add the floating IP");
            return false;
        }
        let (iface, ip) = (h.iface, l.spec.address);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = announce::announce(&iface, ip, BURST) {
                tracing::warn!(vip = %ip, error = %e, "announcing the floating IP failed");
            }
        });
        true
    }

    /// Removes the address if this hold has it up; the caller moves the
    /// hold out of `Phase::Up`.
    fn drop_address(&self, l: &Local, h: &Held, why: &str) {
        if let Phase::Up { added, .. } = h.phase {
            l.held_ms.fetch_add(added.elapsed().as_millis() as u64, Relaxed);
            match netlink::remove(&l.addr(h)) {
                Ok(()) => {
                    tracing::warn!(node = %self.node, vip = %l.spec.address, why, "removed the floating IP from the interface")
                }
                Err(e) => {
                    tracing::error!(node = %self.node, vip = %l.spec.address, error = %e, "cannot remove the floating IP")
                }
            }
        }
    }

    /// Lets go: the address first, then the key (fenced by its token), so
    /// the next holder can start at once.
    async fn release(&self, l: &Local, h: &Held, why: &str) {
        self.drop_address(l, h, why);
        tracing::info!(node = %self.node, vip = %l.spec.address, why, "handing the floating IP over");
        let txn = Txn::new()
            .when(Compare::new(&l.key, CompareOp::Equal, CompareTarget::CreateRevision(h.token)))
            .and_then(TxnOp::Delete(l.key.clone()));
        if let Err(e) = self.store.txn(txn).await {
            tracing::debug!(error = %e, "deleting the floating IP's key failed; it goes with the lease");
        }
        l.released.fetch_add(1, Relaxed);
        self.set_held(l, None);
    }

    fn set_held(&self, l: &Local, h: Option<Held>) {
        *l.held.locked() = h;
    }

    /// Halo is stopping for good: every address is removed and handed over.
    pub async fn release_all(&self) {
        self.lease.stop();
        for l in &self.local {
            let _turn = l.turn.lock().await;
            let h = l.held.locked().clone();
            if let Some(h) = h {
                self.release(l, &h, "halo is stopping").await;
            }
        }
        self.lease.end(&*self.store).await;
    }

    /// This node's floating IP metrics.
    pub fn metrics(&self, w: &mut halo_proxy::metrics::Writer) {
        let families = [
            ("halo_vip_held", "gauge", "Whether this node has the floating IP on its interface."),
            (
                "halo_vip_healthy",
                "gauge",
                "Whether this node may hold the floating IP (interface there, check passing).",
            ),
            ("halo_vip_acquired_total", "counter", "Times this node added the floating IP."),
            ("halo_vip_released_total", "counter", "Times this node handed the floating IP over."),
            ("halo_vip_conflicts_total", "counter", "Takeovers delayed because another host answered for the address."),
            ("halo_vip_held_seconds_total", "counter", "Time this node has held the floating IP."),
        ];
        for (name, kind, help) in families {
            w.header(name, kind, help);
            for l in &self.local {
                let v = match name {
                    "halo_vip_held" => u64::from(l.is_up()).to_string(),
                    "halo_vip_healthy" => u64::from(l.health.get().is_ok()).to_string(),
                    "halo_vip_acquired_total" => l.acquired.load(Relaxed).to_string(),
                    "halo_vip_released_total" => l.released.load(Relaxed).to_string(),
                    "halo_vip_conflicts_total" => l.conflicts.load(Relaxed).to_string(),
                    _ => format!("{:.3}", l.held_time().as_secs_f64()),
                };
                w.labelled(name, &[("address", &l.spec.address.to_string())], v);
            }
        }
    }
}

impl Local {
    fn addr(&self, h: &Held) -> IfAddr {
        IfAddr { index: h.iface.index, ip: self.spec.address, prefix: self.spec.prefix }
    }

    /// Since when the address has been on the interface, if it is.
    fn up_since(&self) -> Option<Instant> {
        match self.held.locked().as_ref()?.phase {
            Phase::Up { added, .. } => Some(added),
            _ => None,
        }
    }

    fn is_up(&self) -> bool {
        self.up_since().is_some()
    }

    /// Time held in all, the current stretch included.
    fn held_time(&self) -> Duration {
        Duration::from_millis(self.held_ms.load(Relaxed)) + self.up_since().map_or(Duration::ZERO, |a| a.elapsed())
    }
}

/// What one floating IP's task remembers between ticks.
#[derive(Default)]
struct TaskState {
    iface: Option<Result<Interface, String>>,
    iface_checked: Option<Instant>,
    /// The candidacy record last written, and on which lease.
    written: Option<(LeaseId, VipCandidate)>,
    /// Since when no one has held the key (as the view says).
    absent_since: Option<Instant>,
    /// The holder token whose lease this task revoked.
    revoked: Option<Revision>,
    /// A node earlier in `prefer` that is healthy, and since when.
    better: Option<(String, Instant)>,
    /// The standing last logged.
    logged: Option<VipCandidate>,
}

/// Order of candidates: position in `prefer` (others after), then a hash
/// of address and node, which spreads several addresses over the nodes.
fn rank(spec: &VipSpec, node: &str) -> (usize, u64) {
    let at = spec.prefer.iter().position(|p| p == node).unwrap_or(spec.prefer.len());
    (at, fnv64(format!("{}/{node}", spec.address).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_or_without_a_prefix() {
        assert_eq!(parse_cidr("10.0.0.100/24"), Some(("10.0.0.100".parse().unwrap(), 24)));
        assert_eq!(parse_cidr("10.0.0.100"), Some(("10.0.0.100".parse().unwrap(), 32)));
        assert_eq!(parse_cidr("fd00::1/64"), Some(("fd00::1".parse().unwrap(), 64)));
        for bad in ["10.0.0.300/24", "10.0.0.1/33", "fd00::1/129", "0.0.0.0", "127.0.0.5/8", "x", "10.0.0.1/"] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefer_comes_first_and_the_rest_spread_by_address() {
        let mut spec = VipSpec {
            address: "10.0.0.100".parse().unwrap(),
            prefix: 24,
            interface: "eth0".into(),
            prefer: vec!["n3".into()],
            track: Track::None,
        };
        let nodes = ["n1", "n2", "n3"];
        let best = |s: &VipSpec| nodes.iter().min_by_key(|n| rank(s, n)).copied().unwrap();
        assert_eq!(best(&spec), "n3");
        spec.prefer.clear();
        let mut firsts = std::collections::BTreeSet::new();
        for i in 1..40u8 {
            spec.address = IpAddr::from([10, 0, 0, i]);
            firsts.insert(best(&spec));
        }
        assert_eq!(firsts.len(), 3, "addresses without prefer spread over every node");
    }

    #[test]
    fn the_waits_keep_one_holder() {
        // A live old holder drops by HOLD_WINDOW (+ a tick) after its last
        // renewal; the new one adds no earlier than GUARD after the key went.
        assert!(GUARD > HOLD_WINDOW + TICK * 4);
        // A frozen holder's address lives LIFETIME_SECS (+ the kernel's
        // quarter second) after its last refresh; IPv6 has no probe.
        let kernel = Duration::from_secs(u64::from(netlink::LIFETIME_SECS)) + Duration::from_millis(250);
        assert!(crate::peers::SUSPECT_AFTER + GUARD_V6 > kernel);
        assert!(VIP_LEASE_TTL > HOLD_WINDOW * 2);
    }
}
