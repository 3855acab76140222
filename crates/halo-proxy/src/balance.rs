//! Balancing policies over an upstream's endpoints.
//!
//! A [`Balancer`] is built with each snapshot from the upstream's endpoint list
//! and picks among the endpoints that are available (up by active checks, not
//! ejected) and not already tried by this request. Weights are scaled by the
//! slow-start ramp of recovered endpoints.

mod maglev;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Policy;
use crate::endpoint::Endpoint;
use crate::util::{rand_below, rand_u64};

pub use self::maglev::Maglev;
use halo_model::lock::LockExt;

pub enum Balancer {
    /// Smooth weighted round robin (nginx's): current weights per endpoint.
    RoundRobin(Mutex<Vec<i64>>),
    LeastRequest,
    P2cEwma,
    Random,
    ConsistentHash(Maglev),
}

/// What a pick may choose from: the endpoints that are available and not
/// yet tried, with their effective weights. A view, not a copy: picks
/// allocate nothing.
pub struct Candidates<'a> {
    eps: &'a [Arc<Endpoint>],
    tried: &'a [usize],
    now: u64,
    slow_start: Option<Duration>,
}

impl<'a> Candidates<'a> {
    pub fn new(eps: &'a [Arc<Endpoint>], tried: &'a [usize], now: u64, slow_start: Option<Duration>) -> Self {
        Candidates { eps, tried, now, slow_start }
    }

    pub fn contains(&self, i: usize) -> bool {
        !self.tried.contains(&i) && self.eps[i].available(self.now)
    }

    /// The effective weight of endpoint `i`, or `None` when it is not a candidate.
    pub fn weight(&self, i: usize) -> Option<u64> {
        self.contains(i).then(|| self.eps[i].effective_weight(self.now, self.slow_start))
    }

    fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.eps.len()).filter_map(|i| self.weight(i).map(|w| (i, w)))
    }

    /// The only candidate, the first one, and whether there is any.
    fn shape(&self) -> (usize, Option<usize>) {
        let mut n = 0;
        let mut first = None;
        for i in 0..self.eps.len() {
            if self.contains(i) {
                n += 1;
                first.get_or_insert(i);
            }
        }
        (n, first)
    }
}

impl Balancer {
    pub fn new(policy: Policy, eps: &[Arc<Endpoint>]) -> Self {
        match policy {
            Policy::RoundRobin => Balancer::RoundRobin(Mutex::new(vec![0; eps.len()])),
            Policy::LeastRequest => Balancer::LeastRequest,
            Policy::P2cEwma => Balancer::P2cEwma,
            Policy::Random => Balancer::Random,
            Policy::ConsistentHash => {
                let nodes: Vec<(String, u32)> =
                    eps.iter().map(|e| (e.addr.to_string(), e.weight.load(Relaxed))).collect();
                Balancer::ConsistentHash(Maglev::new(&nodes))
            }
        }
    }

    /// Picks an endpoint index among the candidates, `None` when there is
    /// none; `key` is the request's hash key for consistent hashing.
    pub fn pick(&self, c: &Candidates, key: Option<u64>) -> Option<usize> {
        let (n, first) = c.shape();
        if n <= 1 {
            return first;
        }
        Some(match self {
            Balancer::RoundRobin(state) => smooth_rr(&mut state.locked(), c),
            Balancer::LeastRequest => least_request(c, n),
            Balancer::P2cEwma => p2c(c, n),
            Balancer::Random => weighted_random(c),
            Balancer::ConsistentHash(m) => match key {
                Some(k) => m.lookup(k, |i| c.contains(i)).unwrap_or_else(|| weighted_random(c)),
                None => weighted_random(c),
            },
        })
    }
}

fn smooth_rr(current: &mut [i64], c: &Candidates) -> usize {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, w) in c.iter() {
        let w = w as i64;
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best.unwrap_or(0);
    current[b] -= total;
    b
}

/// The `k`-th candidate (0-based).
fn nth(c: &Candidates, k: usize) -> (usize, u64) {
    c.iter().nth(k).unwrap_or((0, 1))
}

fn least_request(c: &Candidates, n: usize) -> usize {
    // Start at a random offset so ties do not all land on the first endpoint.
    let start = rand_below(n as u64) as usize;
    let mut best = (f64::MAX, 0);
    for (i, w) in c.iter().skip(start).chain(c.iter().take(start)) {
        let load = (c.eps[i].inflight.load(Relaxed) + 1) as f64 / w.max(1) as f64;
        if load < best.0 {
            best = (load, i);
        }
    }
    best.1
}

fn p2c(c: &Candidates, n: usize) -> usize {
    let a = rand_below(n as u64) as usize;
    let b = (a + 1 + rand_below(n as u64 - 1) as usize) % n;
    let ((ia, wa), (ib, wb)) = (nth(c, a), nth(c, b));
    let cost = |i: usize, w: u64| c.eps[i].ewma_cost() / w.max(1) as f64;
    if cost(ia, wa) <= cost(ib, wb) {
        ia
    } else {
        ib
    }
}

pub fn weighted_random(c: &Candidates) -> usize {
    let total: u64 = c.iter().map(|(_, w)| w).sum();
    let mut r = rand_u64() % total.max(1);
    let mut last = 0;
    for (i, w) in c.iter() {
        if r < w {
            return i;
        }
        r -= w;
        last = i;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    fn eps(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        let cfg: Arc<UpstreamConfig> = Arc::new(
            crate::config::parse("t", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n")
                .unwrap()
                .upstreams["u"]
                .clone(),
        );
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Arc::new(Endpoint::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap(), *w, cfg.clone())))
            .collect()
    }

    #[test]
    fn smooth_rr_follows_weights_and_interleaves() {
        let e = eps(&[5, 1, 1]);
        let c = Candidates::new(&e, &[], crate::util::now_ms(), None);
        let mut cur = vec![0; 3];
        let seq: Vec<usize> = (0..7).map(|_| smooth_rr(&mut cur, &c)).collect();
        // nginx's smooth order: a a b a c a a, never five in a row.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_random_respects_weights_and_exclusions() {
        let e = eps(&[3, 1, 5]);
        let c = Candidates::new(&e, &[2], crate::util::now_ms(), None);
        let n = 40_000;
        let picks: Vec<usize> = (0..n).map(|_| weighted_random(&c)).collect();
        assert!(!picks.contains(&2));
        let share = picks.iter().filter(|&&i| i == 0).count() as f64 / n as f64;
        assert!((0.70..0.80).contains(&share), "share {share}");
    }
}
