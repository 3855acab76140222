//! Eviction: a node that a majority of its probers finds silent loses its
//! lease at once, instead of when the lease runs out.
//!
//! Each node publishes the targets it finds silent itself
//! ([`Peers::found_silent`]) under `/halo/silent/NODE`, on its own lease.
//! A prober of X that has itself found X silent for [`EVICT_AFTER`], and
//! counts a majority of X's probers reporting it ([`peers::reporters`],
//! [`peers::is_majority`]: the rule that takes X out of every proxy),
//! revokes X's node lease: X's record, endpoints and (if it led) the leader key go, the
//! leader places X's instances elsewhere, and another node can be elected.
//!
//! This is what keeps a lost node's capacity coming back in seconds when
//! that node also held the store's raft leadership: a new etcd leader
//! gives every lease its full TTL again, so waiting for the lease would
//! add the whole TTL after the store's own election.
//!
//! A false suspicion costs a node its placements, never its safety: a node
//! whose lease is revoked finds out on its next renewal, stops leading,
//! registers again, and its instances were already replaced under new ids.
//! A report counts only from a node that no one reports silent, so a
//! frozen node's stale report is never counted; a node cut off from the
//! others cannot reach a majority of the store to revoke anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_store::{LeaseId, StoreError};

use crate::events::EventKind;
use crate::keys::{node_key, silent_key};
use crate::membership::Membership;
use crate::peers::{self, Peers};
use crate::state::{ClusterState, View};

/// How long a failed write of the report or a revocation waits to retry,
/// and how often a node waiting for [`EVICT_AFTER`] looks again.
const RETRY: Duration = Duration::from_millis(100);

/// How long this node must have found a node silent before it ends that
/// node's lease: twice what takes it out of the proxy, so a node starved
/// for a moment (a busy machine) only loses traffic for that moment.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// How long a node marked as upgrading (`/halo/upgrading/NODE`, from when
/// this node first saw the mark) is spared: its API is silent while the
/// new process starts. A handover that takes longer, or one whose
/// processes died, is judged like any other silence, and a node whose
/// processes died loses its lease anyway.
pub const UPGRADE_GRACE: Duration = Duration::from_secs(10);

/// Publishes this node's silent set and revokes the leases of nodes a
/// majority finds silent (the node's task list aborts it).
pub async fn run(m: Arc<Membership>, view: Arc<View>, peers: Arc<Peers>) {
    let mut silent = peers.subscribe();
    let mut changed = view.subscribe();
    // What this node's report says, and on which lease.
    let mut published: Option<(LeaseId, BTreeSet<String>)> = None;
    let mut revoked: BTreeSet<LeaseId> = BTreeSet::new();
    let mut upgrading: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let mine = peers.found_silent();
        let mut retry = false;
        if let Some(lease) = m.lease() {
            if published.as_ref().is_none_or(|(l, s)| *l != lease || *s != mine) {
                match publish(&m, lease, &mine).await {
                    Ok(()) => published = Some((lease, mine.clone())),
                    Err(e) => {
                        tracing::debug!(error = %e, "publishing the silent nodes failed; retrying");
                        retry = true;
                    }
                }
            }
            let st = view.current();
            upgrading.retain(|n, _| st.upgrading.contains(n));
            for n in &st.upgrading {
                upgrading.entry(n.clone()).or_insert_with(Instant::now);
            }
            let spared = |n: &str| upgrading.get(n).is_some_and(|t| t.elapsed() < UPGRADE_GRACE);
            let long = silent_long(&mine, |n| peers.silent_here(n), spared);
            retry |= !mine.is_empty();
            let ring = peers.ring(&st);
            for (node, lease) in evictable(&st, &ring, &m.cfg.node, &mine, &long) {
                if revoked.contains(&lease) {
                    continue;
                }
                match evict(&m, &node, lease, &st, &ring, &mine).await {
                    Ok(()) => {
                        revoked.insert(lease);
                    }
                    Err(e) => {
                        tracing::debug!(node = %node, error = %e, "revoking a silent node's lease failed; retrying");
                        retry = true;
                    }
                }
            }
            revoked.retain(|l| st.leases.values().any(|x| x == l));
        }
        let wait = if retry || m.lease().is_none() { RETRY } else { Duration::from_secs(1) };
        tokio::select! {
            r = silent.changed() => if r.is_err() { return },
            _ = changed.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Writes this node's report, or removes it when nothing is silent.
async fn publish(m: &Membership, lease: LeaseId, silent: &BTreeSet<String>) -> Result<(), StoreError> {
    let key = silent_key(&m.cfg.node);
    if silent.is_empty() {
        return m.store.delete(&key).await.map(|_| ());
    }
    let v = serde_json::to_vec(silent).expect("a set of names encodes");
    m.store.put(&key, v, Some(lease)).await.map(|_| ())
}

/// Revokes `node`'s lease if the store (asked now, a linearizable read)
/// still has the node on it.
async fn evict(
    m: &Membership,
    node: &str,
    lease: LeaseId,
    st: &ClusterState,
    ring: &peers::Ring,
    mine: &BTreeSet<String>,
) -> Result<(), StoreError> {
    let now = m.store.get(&node_key(node)).await?;
    if now.and_then(|kv| kv.lease) != Some(lease) {
        return Ok(());
    }
    let reporters = peers::reporters(ring, &st.silent, &m.cfg.node, mine, node);
    tracing::warn!(node = %m.cfg.node, silent = %node, ?reporters, "a majority of its probers finds the node silent: ending its lease");
    match m.store.revoke(lease).await {
        Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    m.counters.evictions.fetch_add(1, Relaxed);
    let probers = ring.probers(node, peers::PROBERS).len();
    let why = format!("{node} ended: {} of its {probers} probers found it silent", reporters.len());
    m.events.warn(EventKind::Evicted, None, None, why);
    Ok(())
}

/// The nodes of `mine` silent for [`EVICT_AFTER`] by `silent_for`, but
/// those `spared` (upgrading).
fn silent_long(
    mine: &BTreeSet<String>,
    silent_for: impl Fn(&str) -> Option<Duration>,
    spared: impl Fn(&str) -> bool,
) -> BTreeSet<String> {
    mine.iter().filter(|n| !spared(n) && silent_for(n).is_some_and(|d| d >= EVICT_AFTER)).cloned().collect()
}

/// The nodes `me` has found silent for [`EVICT_AFTER`] (`long`, among
/// `mine`, all it finds silent) that a majority of their probers finds
/// silent too, with their leases.
fn evictable(
    st: &ClusterState,
    ring: &peers::Ring,
    me: &str,
    mine: &BTreeSet<String>,
    long: &BTreeSet<String>,
) -> Vec<(String, LeaseId)> {
    long.iter()
        .filter(|n| st.nodes.contains_key(*n))
        .filter(|n| peers::is_majority(ring.len(), peers::reporters(ring, &st.silent, me, mine, n).len()))
        .filter_map(|n| Some((n.clone(), *st.leases.get(n)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeRecord;

    fn state(nodes: &[&str], reports: &[(&str, &[&str])]) -> ClusterState {
        let mut st = ClusterState::default();
        for (i, n) in nodes.iter().enumerate() {
            let rec = NodeRecord {
                name: n.to_string(),
                addr: "127.0.0.1".parse().unwrap(),
                zone: "z".into(),
                capacity: 10,
                api: "127.0.0.1:7070".parse().unwrap(),
                api_tls: false,
                drivers: vec!["exec".into()],
            };
            st.nodes.insert(n.to_string(), rec);
            st.leases.insert(n.to_string(), 100 + i as LeaseId);
        }
        for (r, s) in reports {
            st.silent.insert(r.to_string(), s.iter().map(|x| x.to_string()).collect());
        }
        st
    }

    fn ev(st: &ClusterState, me: &str, mine: &BTreeSet<String>, long: &BTreeSet<String>) -> Vec<(String, LeaseId)> {
        let ring = peers::Ring::new(st.nodes.keys());
        evictable(st, &ring, me, mine, long)
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_node_most_of_the_cluster_finds_silent_is_evicted() {
        let st = state(&["n1", "n2", "n3"], &[("n1", &["n3"]), ("n2", &["n3"])]);
        assert_eq!(ev(&st, "n1", &set(&["n3"]), &set(&["n3"])), vec![("n3".to_string(), 102)]);
    }

    #[test]
    fn one_node_alone_evicts_no_one() {
        // n2 hears n3: n1's silence is its own link's fault, or n3's
        // answers are slow only to it.
        let st = state(&["n1", "n2", "n3"], &[("n1", &["n3"])]);
        assert!(ev(&st, "n1", &set(&["n3"]), &set(&["n3"])).is_empty());
        // Two of four is no majority.
        let st = state(&["n1", "n2", "n3", "n4"], &[("n1", &["n4"]), ("n2", &["n4"])]);
        assert!(ev(&st, "n1", &set(&["n4"]), &set(&["n4"])).is_empty());
    }

    #[test]
    fn a_silent_nodes_report_does_not_count() {
        // n2 is silent to n1: its report (naming n3) may be from before it froze.
        let st = state(&["n1", "n2", "n3"], &[("n1", &["n2", "n3"]), ("n2", &["n3"])]);
        assert!(ev(&st, "n1", &set(&["n2", "n3"]), &set(&["n2", "n3"])).is_empty());
        // Nor does a node's report on itself, or one from a node gone.
        let st = state(&["n1", "n2", "n3"], &[("n3", &["n3"]), ("n9", &["n3"])]);
        assert!(ev(&st, "n1", &set(&["n3"]), &set(&["n3"])).is_empty());
    }

    #[test]
    fn a_node_silent_for_a_moment_keeps_its_lease() {
        let st = state(&["n1", "n2", "n3"], &[("n1", &["n3"]), ("n2", &["n3"])]);
        assert!(ev(&st, "n1", &set(&["n3"]), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn an_upgrading_node_is_spared_and_a_moment_of_silence_is_not_enough() {
        let mine = set(&["n2", "n3"]);
        let silent_for = |n: &str| Some(Duration::from_millis(if n == "n2" { 1500 } else { 600 }));
        assert_eq!(silent_long(&mine, silent_for, |_| false), set(&["n2"]));
        assert!(silent_long(&mine, silent_for, |n| n == "n2").is_empty());
    }

    #[test]
    fn what_this_node_hears_comes_first() {
        // The others' reports alone evict nothing from here.
        let st = state(&["n1", "n2", "n3"], &[("n2", &["n3"]), ("n3", &["n2"])]);
        assert!(ev(&st, "n1", &BTreeSet::new(), &BTreeSet::new()).is_empty());
    }
}
