//! The last minutes of the proxy's own counters, per route and per
//! upstream, in memory: requests per second, the share that failed (5xx
//! or answered by the proxy for a failed upstream), and p50/p99 latency of
//! each interval, from the deltas of the counters `/metrics` shows. The
//! dashboard draws these without a Prometheus.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::quantile;
use crate::Proxy;
use halo_model::lock::LockExt;

/// One sample this often...
pub const EVERY: Duration = Duration::from_secs(2);
/// ...and this many kept (15 minutes).
pub const KEEP: usize = 450;

/// One interval of one route or upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Unix milliseconds at the end of the interval.
    pub at_ms: u64,
    pub requests_per_s: f64,
    /// Failed requests over all requests of the interval (0 without any).
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The points of one route or upstream, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// `route` or `upstream`.
    pub kind: String,
    pub name: String,
    pub points: Vec<Point>,
}

#[derive(Clone)]
struct Totals {
    requests: u64,
    failed: u64,
    latency: Vec<u64>,
}

#[derive(Default)]
struct State {
    last: BTreeMap<(String, String), Totals>,
    last_ms: u64,
    rings: BTreeMap<(String, String), VecDeque<Point>>,
}

/// The ring of samples.
#[derive(Default)]
pub struct History {
    state: Mutex<State>,
}

impl History {
    /// Takes a sample of `totals` (kind, name, requests, failed, latency
    /// counts) at `now_ms`: a point per name seen before, from the change
    /// since then.
    pub fn record(&self, now_ms: u64, totals: Vec<(&str, String, u64, u64, Vec<u64>)>) {
        let mut st = self.state.locked();
        let secs = now_ms.saturating_sub(st.last_ms) as f64 / 1000.0;
        let mut seen = BTreeMap::new();
        for (kind, name, requests, failed, latency) in totals {
            let key = (kind.to_string(), name);
            let now = Totals { requests, failed, latency };
            if let Some(before) = st.last.get(&key).filter(|_| secs > 0.0) {
                // Counters only grow; a smaller one was reset (a new
                // upstream under an old name): count from zero.
                let before = if now.requests < before.requests { None } else { Some(before) };
                let d = |a: u64, b: Option<u64>| a.saturating_sub(b.unwrap_or(0));
                let requests = d(now.requests, before.map(|b| b.requests));
                let failed = d(now.failed, before.map(|b| b.failed));
                let latency: Vec<u64> = now
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(i, n)| d(*n, before.and_then(|b| b.latency.get(i).copied())))
                    .collect();
                let point = Point {
                    at_ms: now_ms,
                    requests_per_s: requests as f64 / secs,
                    error_rate: if requests == 0 { 0.0 } else { failed as f64 / requests as f64 },
                    p50_ms: quantile(&latency, 0.5).map(|s| s * 1000.0),
                    p99_ms: quantile(&latency, 0.99).map(|s| s * 1000.0),
                };
                let ring = st.rings.entry(key.clone()).or_default();
                ring.push_back(point);
                while ring.len() > KEEP {
                    ring.pop_front();
                }
            }
            seen.insert(key, now);
        }
        // What is gone (a removed route) leaves with its ring.
        st.rings.retain(|k, _| seen.contains_key(k));
        st.last = seen;
        st.last_ms = now_ms;
    }

    /// Every route's and upstream's points, oldest first.
    pub fn series(&self) -> Vec<Series> {
        let st = self.state.locked();
        st.rings
            .iter()
            .map(|((kind, name), ring)| Series {
                kind: kind.clone(),
                name: name.clone(),
                points: ring.iter().cloned().collect(),
            })
            .collect()
    }

    /// Samples `proxy` every [`EVERY`] until the proxy is dropped.
    pub async fn run(self: Arc<Self>, proxy: std::sync::Weak<Proxy>) {
        loop {
            let Some(p) = proxy.upgrade() else { return };
            let mut totals: Vec<(&str, String, u64, u64, Vec<u64>)> = Vec::new();
            for (name, n, failed, latency) in p.route_totals() {
                totals.push(("route", name, n, failed, latency));
            }
            for u in p.upstream_totals() {
                totals.push(("upstream", u.name, u.requests, u.failed, u.latency));
            }
            drop(p);
            let now_ms = halo_model::clock::unix_ms();
            self.record(now_ms, totals);
            tokio::time::sleep(EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_rates_error_shares_and_quantiles_of_each_interval() {
        let h = History::default();
        let lat = |fast: u64, slow: u64| {
            let mut v = vec![0u64; crate::metrics::BUCKETS.len() + 1];
            v[1] = fast; // <= 1 ms
            v[8] = slow; // <= 250 ms
            v
        };
        h.record(1_000, vec![("route", "web".into(), 100, 0, lat(100, 0))]);
        assert!(h.series().is_empty(), "one sample is no interval");
        h.record(6_000, vec![("route", "web".into(), 600, 50, lat(590, 10))]);
        h.record(11_000, vec![("route", "web".into(), 600, 50, lat(590, 10))]);
        let s = h.series();
        assert_eq!((s.len(), s[0].points.len()), (1, 2));
        let p = &s[0].points[0];
        assert_eq!((p.at_ms, p.requests_per_s, p.error_rate), (6_000, 100.0, 0.1));
        assert!(p.p50_ms.unwrap() <= 1.0 && p.p99_ms.unwrap() > 100.0, "{p:?}");
        let idle = &s[0].points[1];
        assert_eq!((idle.requests_per_s, idle.error_rate, idle.p99_ms), (0.0, 0.0, None));
        // A route that goes takes its points with it.
        h.record(16_000, vec![("upstream", "web".into(), 1, 0, lat(1, 0))]);
        assert!(h.series().is_empty());
    }
}
