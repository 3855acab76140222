//! Peers: how this node hears the other nodes directly, without waiting for
//! the store, at a cost per node that does not grow with the cluster.
//!
//! The live nodes stand on a ring, ordered by a stable hash of their names.
//! Every [`PROBE_EVERY`] each node asks the API (`/healthz`) of the
//! [`PROBERS`] nodes after it on the ring, its *targets* (each probe on its
//! own, so a slow answer delays no other): 30 probes a second whatever the
//! cluster's size, and every node is probed by the [`PROBERS`] before it.
//! In a cluster of [`PROBERS`] + 1 nodes or fewer that is every other node.
//! A target that answered before and has not answered for
//! [`SUSPECT_AFTER`] (three probes in a row) is *silent* here: dead, frozen
//! or cut off from here. Each node publishes what it finds silent
//! ([`crate::evict`], `/halo/silent/NODE`).
//!
//! A node is *silent to the cluster* once a majority of its probers report
//! it ([`confirmed`]): a report counts only from one of its probers that
//! no one reports silent itself (a frozen node's old report counts for
//! nothing) and that does not find this node silent. Every node hears of
//! it through the watch.
//!
//! Three things act on silence (this node's own, or the cluster's): this
//! node's proxy stops sending to a silent node's endpoints (about 0.6 s
//! after the fault, where the node's lease takes its TTL to expire; never
//! the last endpoints of a service), a floating IP whose holder is silent
//! is taken over, and a primary whose node is silent loses its term. One
//! prober's silence decides nothing for the cluster: the lease of a node
//! silent to the cluster for [`crate::evict::EVICT_AFTER`] is ended by its
//! probers, and placements move once it is gone.
//!
//! A node that hears from none of two or more targets (or, with one,
//! cannot renew its own lease either) is the one cut off, and one whose
//! probe rounds stalled was frozen itself: either forgets what it heard,
//! and judges a node again only once that node has answered since.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_store::Revision;

use crate::dial::Dialer;
use crate::state::{ClusterState, View};
use halo_model::lock::LockExt;

pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A busy node answering in 300 ms is alive: only silence counts.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// A node whose API has not answered for this long (and three probes in a
/// row) is silent.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(500);
/// How many nodes probe each node (and how many each node probes).
pub const PROBERS: usize = 3;

/// What this node heard from its targets, and what the cluster reports.
pub struct Peers {
    node: String,
    view: Arc<View>,
    /// Whether this node's own lease is fresh (it reaches the store).
    own_lease: Box<dyn Fn() -> bool + Send + Sync>,
    heard: Mutex<BTreeMap<String, Peer>>,
    /// The live nodes in ring order, as of the node set's revision.
    ring: Mutex<(Revision, Arc<Ring>)>,
    /// Nodes silent to the cluster, since when this node knows it.
    confirmed: Mutex<BTreeMap<String, Instant>>,
    /// The silent nodes (this node's own findings and the cluster's), as
    /// of the last round or view change.
    silent: tokio::sync::watch::Sender<BTreeSet<String>>,
    dial: Arc<Dialer>,
}

/// What the cluster's verdict was counted from: the reports' and the
/// ring's revisions, and this node's own findings.
type CountedFrom = (Revision, Revision, BTreeSet<String>);

/// What this node heard from another node's API.
struct Peer {
    /// When the last answered probe was sent.
    last_ok: Instant,
    /// Unanswered probes since then.
    fails: u32,
    /// It answered since this node last heard from no one (or ever).
    answered: bool,
}

impl Peer {
    /// How long it has been silent, when that makes it suspect.
    fn silent(&self) -> Option<Duration> {
        let silent = self.last_ok.elapsed();
        (self.answered && self.fails >= 3 && silent >= SUSPECT_AFTER).then_some(silent)
    }
}

impl Peers {
    pub fn new(
        node: &str,
        view: Arc<View>,
        own_lease: Box<dyn Fn() -> bool + Send + Sync>,
        dial: Arc<Dialer>,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            node: node.to_string(),
            view,
            own_lease,
            heard: Mutex::new(BTreeMap::new()),
            ring: Mutex::new((-1, Arc::new(Ring::default()))),
            confirmed: Mutex::new(BTreeMap::new()),
            silent: tokio::sync::watch::Sender::new(BTreeSet::new()),
            dial,
        })
    }

    /// How long `node` has been silent, to this node or (since this node
    /// learnt it) to the cluster.
    pub fn silent(&self, node: &str) -> Option<Duration> {
        self.silent_here(node).or_else(|| self.confirmed.locked().get(node).map(Instant::elapsed))
    }

    /// How long `node`, one of this node's targets, has not answered it.
    pub fn silent_here(&self, node: &str) -> Option<Duration> {
        self.heard.locked().get(node).and_then(Peer::silent)
    }

    /// The targets this node finds silent itself (what it reports).
    pub fn found_silent(&self) -> BTreeSet<String> {
        self.heard.locked().iter().filter(|(_, p)| p.silent().is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// The silent nodes; changes as they go silent and answer again.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.silent.subscribe()
    }

    /// The silent nodes now: this node's findings and the cluster's.
    pub fn silent_nodes(&self) -> BTreeSet<String> {
        self.silent.borrow().clone()
    }

    /// Each target with whether it answers (`false`: silent).
    pub fn answering(&self) -> BTreeMap<String, bool> {
        let heard = self.heard.locked();
        heard.iter().map(|(n, p)| (n.clone(), p.silent().is_none())).collect()
    }

    /// The live nodes in ring order (recomputed only when the node set
    /// changed).
    pub fn ring(&self, st: &ClusterState) -> Arc<Ring> {
        let mut ring = self.ring.locked();
        if ring.0 != st.nodes_revision {
            *ring = (st.nodes_revision, Arc::new(Ring::new(st.nodes.keys())));
        }
        ring.1.clone()
    }

    /// Probes this node's targets every [`PROBE_EVERY`], and follows the
    /// cluster's reports as they change (the node's task list aborts it).
    pub async fn run(self: Arc<Self>) {
        let mut last_round = Instant::now();
        let mut next_round = tokio::time::Instant::now();
        let mut changed = self.view.subscribe();
        // Probes in flight: they end with this loop (dropping the set
        // aborts them), never on their own after it.
        let mut probes = tokio::task::JoinSet::new();
        // The cluster's verdict, and what it was counted from (the reports'
        // and the ring's revisions, this node's findings): counted again
        // only when one of them moved.
        let mut counted: Option<(CountedFrom, BTreeSet<String>)> = None;
        loop {
            let round = tokio::select! {
                _ = tokio::time::sleep_until(next_round) => true,
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    false
                }
            };
            let st = self.view.current();
            let ring = self.ring(&st);
            let targets = ring.targets(&self.node, PROBERS);
            if round {
                while probes.try_join_next().is_some() {}
                let now = Instant::now();
                // A round far later than due: this process was frozen or
                // starved, and what it heard before says nothing of now.
                let stalled = now.duration_since(last_round) > SUSPECT_AFTER;
                last_round = now;
                next_round = tokio::time::Instant::now() + PROBE_EVERY;
                let mut heard = self.heard.locked();
                heard.retain(|n, _| targets.contains(n));
                let any = heard.values().any(|p| p.last_ok.elapsed() < SUSPECT_AFTER && p.answered);
                // Hearing none of several nodes, this one is the one cut
                // off (its own lease may not have run out yet: judging the
                // others by what it heard before would, once back, take
                // their floating IPs). With one other node, only its own
                // lease can tell.
                let alone = !any && (heard.len() > 1 || !(self.own_lease)());
                if stalled || alone {
                    heard.values_mut().for_each(|p| p.answered = false);
                }
                drop(heard);
                for name in &targets {
                    let Some(rec) = st.nodes.get(name) else { continue };
                    let (me, name, api, https) = (self.clone(), name.clone(), rec.api, rec.api_tls);
                    probes.spawn(async move {
                        let ok = healthz(&me.dial, api, https).await;
                        let mut heard = me.heard.locked();
                        let p = heard.entry(name).or_insert(Peer { last_ok: now, fails: 0, answered: false });
                        if ok {
                            p.last_ok = p.last_ok.max(now);
                            p.fails = 0;
                            p.answered = true;
                        } else {
                            p.fails += 1;
                        }
                    });
                }
            }
            let mine = self.found_silent();
            let from = (st.silent_revision, st.nodes_revision, mine.clone());
            let cluster = match &counted {
                Some((f, c)) if *f == from => c.clone(),
                _ => {
                    let c = confirmed(&ring, &st.silent, &self.node, &mine);
                    counted = Some((from, c.clone()));
                    c
                }
            };
            {
                let mut c = self.confirmed.locked();
                c.retain(|n, _| cluster.contains(n));
                for n in &cluster {
                    c.entry(n.clone()).or_insert_with(Instant::now);
                }
            }
            let silent: BTreeSet<String> = mine.union(&cluster).cloned().collect();
            self.silent.send_if_modified(|was| {
                if *was == silent {
                    return false;
                }
                for n in silent.difference(was) {
                    tracing::warn!(node = %n, "node does not answer: its endpoints are out of this node's proxy until it does");
                }
                for n in was.difference(&silent) {
                    tracing::info!(node = %n, "node answers again");
                }
                *was = silent.clone();
                true
            });
        }
    }
}

/// The live nodes on a ring, ordered by a stable hash of their names (so
/// a node's neighbours do not follow from how it was named), ties by name.
#[derive(Debug, Default)]
pub struct Ring {
    order: Vec<String>,
    at: BTreeMap<String, usize>,
}

impl Ring {
    pub fn new<'a>(nodes: impl Iterator<Item = &'a String>) -> Ring {
        let mut order: Vec<String> = nodes.cloned().collect();
        order.sort_by_cached_key(|n| (halo_model::fnv::fnv64(n.as_bytes()), n.clone()));
        let at = order.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Ring { order, at }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, node: &str) -> bool {
        self.at.contains_key(node)
    }

    /// The `k` nodes after `me` (every other node when there are no more
    /// than `k`); none when `me` is not on the ring.
    pub fn targets(&self, me: &str, k: usize) -> Vec<String> {
        let Some(&at) = self.at.get(me) else { return Vec::new() };
        let n = self.order.len();
        (1..n).take(k).map(|i| self.order[(at + i) % n].clone()).collect()
    }

    /// The `k` nodes before `node`: the ones that probe it.
    pub fn probers(&self, node: &str, k: usize) -> Vec<String> {
        let Some(&at) = self.at.get(node) else { return Vec::new() };
        let n = self.order.len();
        (1..n).take(k).map(|i| self.order[(at + n - i) % n].clone()).collect()
    }
}

/// Who finds `node` silent, as `me` (which finds `mine` silent itself)
/// counts: its probers that report it (`me` by what it found), but one
/// that `me` finds silent or that another live node reports silent (its
/// report may be from before it froze).
pub fn reporters(
    ring: &Ring,
    reports: &BTreeMap<String, BTreeSet<String>>,
    me: &str,
    mine: &BTreeSet<String>,
    node: &str,
) -> Vec<String> {
    counted(ring, reports, &accused(ring, reports), me, mine, node)
}

/// The nodes a live node other than themselves reports silent.
fn accused<'a>(ring: &Ring, reports: &'a BTreeMap<String, BTreeSet<String>>) -> BTreeSet<&'a String> {
    let live = reports.iter().filter(|(by, _)| ring.contains(by));
    live.flat_map(|(by, s)| s.iter().filter(move |n| *n != by)).collect()
}

/// [`reporters`] with the accused nodes known.
fn counted(
    ring: &Ring,
    reports: &BTreeMap<String, BTreeSet<String>>,
    accused: &BTreeSet<&String>,
    me: &str,
    mine: &BTreeSet<String>,
    node: &str,
) -> Vec<String> {
    ring.probers(node, PROBERS)
        .into_iter()
        .filter(|r| {
            if r == me {
                mine.contains(node)
            } else {
                !mine.contains(r) && !accused.contains(r) && reports.get(r).is_some_and(|s| s.contains(node))
            }
        })
        .collect()
}

/// Whether `reporters` of a node make a majority: of its probers, or, in
/// a cluster where every other node probes it, of the live nodes (the
/// node included: two nodes alone never judge each other).
pub fn is_majority(ring_len: usize, reporters: usize) -> bool {
    let probers = ring_len.saturating_sub(1).min(PROBERS);
    if probers + 1 == ring_len {
        reporters * 2 > ring_len
    } else {
        reporters * 2 > probers
    }
}

/// The nodes silent to the cluster, as `me` counts the reports.
pub fn confirmed(
    ring: &Ring,
    reports: &BTreeMap<String, BTreeSet<String>>,
    me: &str,
    mine: &BTreeSet<String>,
) -> BTreeSet<String> {
    let accused = accused(ring, reports);
    let named: BTreeSet<&String> = reports.values().flatten().chain(mine).collect();
    named
        .into_iter()
        .filter(|n| *n != me && ring.contains(n))
        .filter(|n| is_majority(ring.len(), counted(ring, reports, &accused, me, mine, n).len()))
        .cloned()
        .collect()
}

/// Whether the node API at `api` answers `/healthz` within [`PROBE_TIMEOUT`].
async fn healthz(dial: &Dialer, api: SocketAddr, https: bool) -> bool {
    let req = http::Request::get("/healthz")
        .header(http::header::HOST, api.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("a valid request");
    let answer = tokio::time::timeout(PROBE_TIMEOUT, dial.send(api, https, req)).await;
    matches!(answer, Ok(Ok((status, _))) if status == http::StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn each_node_probes_a_few_and_is_probed_by_as_many() {
        let ring = Ring::new(names(1000).iter());
        let mut probed: BTreeMap<String, usize> = BTreeMap::new();
        for n in &ring.order {
            let t = ring.targets(n, PROBERS);
            assert_eq!(t.len(), PROBERS);
            assert!(!t.contains(n));
            for x in t {
                *probed.entry(x.clone()).or_default() += 1;
                assert!(ring.probers(&x, PROBERS).contains(n), "{n} probes {x}, so it is one of its probers");
            }
        }
        assert!(probed.values().all(|c| *c == PROBERS));
    }

    #[test]
    fn a_small_cluster_probes_everyone() {
        let ring = Ring::new(names(3).iter());
        assert_eq!(ring.targets("n1", PROBERS).len(), 2);
        assert_eq!(ring.probers("n1", PROBERS).len(), 2);
        assert!(ring.targets("n9", PROBERS).is_empty());
    }

    #[test]
    fn three_nodes_need_both_others_and_two_never_judge_each_other() {
        let ring = Ring::new(names(3).iter());
        let reports = BTreeMap::from([("n2".to_string(), set(&["n3"]))]);
        assert_eq!(confirmed(&ring, &reports, "n1", &set(&["n3"])), set(&["n3"]));
        assert!(confirmed(&ring, &reports, "n1", &BTreeSet::new()).is_empty());
        let ring = Ring::new(names(2).iter());
        assert!(confirmed(&ring, &BTreeMap::new(), "n1", &set(&["n2"])).is_empty());
    }

    #[test]
    fn a_large_cluster_needs_a_majority_of_the_probers() {
        let ring = Ring::new(names(100).iter());
        let x = ring.order[50].clone();
        let p = ring.probers(&x, PROBERS);
        let one = BTreeMap::from([(p[0].clone(), set(&[&x]))]);
        // A node that probes none of them learns it from the reports.
        let me = ring.order[10].clone();
        assert!(confirmed(&ring, &one, &me, &BTreeSet::new()).is_empty());
        let two = BTreeMap::from([(p[0].clone(), set(&[&x])), (p[1].clone(), set(&[&x]))]);
        assert_eq!(confirmed(&ring, &two, &me, &BTreeSet::new()), set(&[&x]));
        // A report from a node that does not probe it does not count.
        let other = BTreeMap::from([(p[0].clone(), set(&[&x])), (ring.order[10].clone(), set(&[&x]))]);
        assert!(confirmed(&ring, &other, &ring.order[20], &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_report_from_a_node_reported_silent_does_not_count() {
        let ring = Ring::new(names(100).iter());
        let x = ring.order[50].clone();
        let p = ring.probers(&x, PROBERS);
        // p[0] froze with its old report on x; its own prober reports it.
        let accuser = ring.probers(&p[0], PROBERS)[0].clone();
        let reports =
            BTreeMap::from([(p[0].clone(), set(&[&x])), (p[1].clone(), set(&[&x])), (accuser.clone(), set(&[&p[0]]))]);
        assert!(!confirmed(&ring, &reports, &ring.order[10], &BTreeSet::new()).contains(&x));
        // Nor one from a node this node finds silent.
        let reports = BTreeMap::from([(p[0].clone(), set(&[&x])), (p[1].clone(), set(&[&x]))]);
        assert!(confirmed(&ring, &reports, &p[2], &set(&[&p[0]])).is_empty());
    }
}
