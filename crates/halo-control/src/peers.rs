//! Peers: how this node hears the other nodes directly, without waiting for
//! the store. Every [`PROBE_EVERY`] each other live node's API is asked
//! `/healthz` (each probe on its own, so a slow answer delays no other); a
//! node that answered before and has not answered for [`SUSPECT_AFTER`]
//! (three probes in a row) is *silent*: dead, frozen or cut off from here.
//!
//! Two things act on it: this node's proxy stops sending to a silent
//! node's endpoints (about 0.6 s after the fault, where the node's lease
//! takes its TTL to expire; only here, and never the last endpoints of a
//! service), and a floating IP whose holder is silent is taken over.
//! One node's silence decides nothing for the cluster: a node that most
//! nodes find silent loses its lease ([`crate::evict`]), and placements
//! move once the lease is gone.
//!
//! A node that hears from none of two or more others (or, with one other,
//! cannot renew its own lease either) is the one cut off, and one whose
//! probe rounds stalled was frozen itself: either forgets what it heard,
//! and judges a node again only once that node has answered since.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dial::Dialer;
use crate::state::View;
use halo_model::lock::LockExt;

pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A busy node answering in 300 ms is alive: only silence counts.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// A node whose API has not answered for this long (and three probes in a
/// row) is silent.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(500);

/// What this node heard from every other live node.
pub struct Peers {
    node: String,
    view: Arc<View>,
    /// Whether this node's own lease is fresh (it reaches the store).
    own_lease: Box<dyn Fn() -> bool + Send + Sync>,
    heard: Mutex<BTreeMap<String, Peer>>,
    /// The silent nodes, as of the last round.
    silent: tokio::sync::watch::Sender<BTreeSet<String>>,
    dial: Arc<Dialer>,
}

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
            silent: tokio::sync::watch::Sender::new(BTreeSet::new()),
            dial,
        })
    }

    /// How long `node` has been silent, if it is.
    pub fn silent(&self, node: &str) -> Option<Duration> {
        self.heard.locked().get(node).and_then(Peer::silent)
    }

    /// The silent nodes; changes as they go silent and answer again.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.silent.subscribe()
    }

    /// The silent nodes now.
    pub fn silent_nodes(&self) -> BTreeSet<String> {
        self.silent.borrow().clone()
    }

    /// Every other live node with whether it answers (`false`: silent).
    pub fn answering(&self) -> BTreeMap<String, bool> {
        let heard = self.heard.locked();
        heard.iter().map(|(n, p)| (n.clone(), p.silent().is_none())).collect()
    }

    /// Probes every other live node every [`PROBE_EVERY`] (the node's
    /// task list aborts it).
    pub async fn run(self: Arc<Self>) {
        let mut last_round = Instant::now();
        // Probes in flight: they end with this loop (dropping the set
        // aborts them), never on their own after it.
        let mut probes = tokio::task::JoinSet::new();
        loop {
            while probes.try_join_next().is_some() {}
            let st = self.view.current();
            let now = Instant::now();
            // A round far later than due: this process was frozen or
            // starved, and what it heard before says nothing of now.
            let stalled = now.duration_since(last_round) > SUSPECT_AFTER;
            last_round = now;
            let silent: BTreeSet<String> = {
                let mut heard = self.heard.locked();
                heard.retain(|n, _| st.nodes.contains_key(n));
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
                heard.iter().filter(|(_, p)| p.silent().is_some()).map(|(n, _)| n.clone()).collect()
            };
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
            for (name, rec) in st.nodes.iter().filter(|(n, _)| **n != self.node) {
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
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
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
