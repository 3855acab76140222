//! An upstream group as seen by one snapshot: its settings, its endpoints
//! (shared runtime state from the registry) and its balancer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http::request::Parts;

use crate::balance::{Balancer, Candidates};
use crate::config::{HashKey, UpstreamConfig};
use crate::endpoint::Endpoint;
use crate::headers::cookie;
use crate::metrics::UpstreamStats;
use crate::outlier::Tries;
use crate::util::{hash64, now_ms};

/// Where routes find an upstream's current group: swapped on its own when
/// only the upstream's endpoints change ([`crate::Proxy::set_endpoints`]),
/// so routes, other upstreams and in-flight requests are left as they are.
pub type Slot = arc_swap::ArcSwap<Group>;

pub struct Group {
    pub cfg: Arc<UpstreamConfig>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The upstream's counters (kept across reloads by the registry).
    pub stats: Arc<UpstreamStats>,
    balancer: Balancer,
}

/// The outcome of a pick.
pub struct Pick {
    pub index: usize,
    /// Set when the response should carry a new session cookie.
    pub set_cookie: bool,
}

impl Group {
    pub fn new(cfg: Arc<UpstreamConfig>, endpoints: Vec<Arc<Endpoint>>, stats: Arc<UpstreamStats>) -> Self {
        let balancer = Balancer::new(cfg.policy, &endpoints);
        Group { cfg, endpoints, stats, balancer }
    }

    /// Chooses an endpoint for a request, not in `tried`; `None` when no
    /// endpoint is available.
    pub fn pick(&self, parts: &Parts, client: SocketAddr, tried: &[usize], now: u64) -> Option<Pick> {
        let session = self.cfg.session_cookie.as_ref().and_then(|name| cookie(parts, name));
        let key = self.cfg.hash_key.as_ref().and_then(|k| hash_key(k, Some(parts), client));
        self.pick_by(session, key, tried, now)
    }

    /// Chooses an endpoint for a connection (no request to look at: only
    /// a `source_ip` hash key applies).
    pub fn pick_conn(&self, client: SocketAddr, tried: &[usize], now: u64) -> Option<usize> {
        let key = self.cfg.hash_key.as_ref().and_then(|k| hash_key(k, None, client));
        self.pick_by(None, key, tried, now).map(|p| p.index)
    }

    fn pick_by(&self, session: Option<&str>, key: Option<u64>, tried: &[usize], now: u64) -> Option<Pick> {
        let c = Candidates::new(&self.endpoints, tried, now, self.cfg.slow_start);
        if let Some(id) = session {
            if let Some(i) = (0..self.endpoints.len()).find(|&i| self.endpoints[i].id == id && c.contains(i)) {
                return Some(Pick { index: i, set_cookie: false });
            }
        }
        let index = self.balancer.pick(&c, key)?;
        Some(Pick { index, set_cookie: self.cfg.session_cookie.is_some() })
    }

    /// Whether ejecting one more endpoint keeps within `max_ejected_percent`.
    pub fn may_eject(&self) -> bool {
        let Some(o) = &self.cfg.outlier else { return false };
        let now = now_ms();
        let ejected = self.endpoints.iter().filter(|e| e.ejected(now)).count();
        (ejected + 1) * 100 <= self.endpoints.len() * o.max_ejected_percent as usize
    }

    /// Ejects the endpoints whose failure rate stands out from the rest
    /// of the group's ([`crate::outlier`]), once per interval: the first
    /// try to finish past it judges the tries since the last time, the
    /// worst first while the cap allows; `now` from [`crate::util::now_ms`]
    /// (the caller's clock read: otherwise this costs a comparison).
    pub fn judge_failure_rates(&self, now: u64) {
        let Some(o) = &self.cfg.outlier else { return };
        let Some(rate) = &o.failure_rate else { return };
        let last = self.stats.rates_judged_ms.load(Relaxed);
        if now < last + crate::util::ms(rate.interval)
            || self.stats.rates_judged_ms.compare_exchange(last, now, Relaxed, Relaxed).is_err()
        {
            return;
        }
        let tries: Vec<Tries> = self
            .endpoints
            .iter()
            .map(|e| {
                let (total, failed) = e.take_tries();
                Tries { total, failed }
            })
            .collect();
        if last == 0 {
            // The first interval starts now.
            return;
        }
        for found in crate::outlier::judge(&tries, rate) {
            let ep = &self.endpoints[found.index];
            if ep.ejected(now) || !self.may_eject() {
                continue;
            }
            ep.eject(
                o,
                now,
                format_args!(
                    "{:.1}% of its {} tries failed against {:.1}% for the rest of the group",
                    found.rate * 100.0,
                    tries[found.index].total,
                    found.rest * 100.0
                ),
            );
        }
    }
}

fn hash_key(k: &HashKey, parts: Option<&Parts>, client: SocketAddr) -> Option<u64> {
    match k {
        HashKey::SourceIp => Some(hash64(client.ip().to_string().as_bytes())),
        HashKey::Header(h) => parts?.headers.get(h).map(|v| hash64(v.as_bytes())),
        HashKey::Cookie(c) => cookie(parts?, c).map(|v| hash64(v.as_bytes())),
        HashKey::Path => Some(hash64(parts?.uri.path().as_bytes())),
    }
}
