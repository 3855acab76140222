//! Balancing policies over an upstream's endpoints.
//!
//! A [`Balancer`] is built with each snapshot from the upstream's endpoint list
//! and picks among the endpoints that are available (up by active checks, not
//! ejected) and not already tried by this request. Weights are scaled by the
//! slow-start ramp of recovered endpoints.

mod maglev;

use std::sync::Mutex;
use std::time::Duration;

use crate::config::Policy;
use crate::endpoint::Endpoint;
use crate::util::{rand_below, rand_u64};

pub use self::maglev::Maglev;

pub enum Balancer {
    /// Smooth weighted round robin (nginx's): current weights per endpoint.
    RoundRobin(Mutex<Vec<i64>>),
    LeastRequest,
    P2cEwma,
    Random,
    ConsistentHash(Maglev),
}

/// What a pick may choose from: endpoint indexes, with effective weights.
pub struct Candidates {
    pub idx: Vec<usize>,
    pub weights: Vec<u64>,
}

impl Candidates {
    pub fn collect(eps: &[std::sync::Arc<Endpoint>], tried: &[usize], now: u64, slow_start: Option<Duration>) -> Self {
        let mut idx = Vec::with_capacity(eps.len());
        let mut weights = Vec::with_capacity(eps.len());
        for (i, e) in eps.iter().enumerate() {
            if !tried.contains(&i) && e.available(now) {
                idx.push(i);
                weights.push(e.effective_weight(now, slow_start));
            }
        }
        Candidates { idx, weights }
    }
}

impl Balancer {
    pub fn new(policy: Policy, eps: &[std::sync::Arc<Endpoint>]) -> Self {
        match policy {
            Policy::RoundRobin => Balancer::RoundRobin(Mutex::new(vec![0; eps.len()])),
            Policy::LeastRequest => Balancer::LeastRequest,
            Policy::P2cEwma => Balancer::P2cEwma,
            Policy::Random => Balancer::Random,
            Policy::ConsistentHash => {
                let nodes: Vec<(String, u32)> = eps
                    .iter()
                    .map(|e| (e.addr.to_string(), e.weight.load(std::sync::atomic::Ordering::Relaxed)))
                    .collect();
                Balancer::ConsistentHash(Maglev::new(&nodes))
            }
        }
    }

    /// Picks an endpoint index among `c` (non-empty); `key` is the request's
    /// hash key for consistent hashing.
    pub fn pick(&self, eps: &[std::sync::Arc<Endpoint>], c: &Candidates, key: Option<u64>) -> usize {
        debug_assert!(!c.idx.is_empty());
        if c.idx.len() == 1 {
            return c.idx[0];
        }
        match self {
            Balancer::RoundRobin(state) => smooth_rr(&mut state.lock().unwrap_or_else(|e| e.into_inner()), c),
            Balancer::LeastRequest => least_request(eps, c),
            Balancer::P2cEwma => p2c(eps, c),
            Balancer::Random => weighted_random(c),
            Balancer::ConsistentHash(m) => match key {
                Some(k) => m.lookup(k, |i| c.idx.contains(&i)).unwrap_or_else(|| weighted_random(c)),
                None => weighted_random(c),
            },
        }
    }
}

fn smooth_rr(current: &mut [i64], c: &Candidates) -> usize {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (&i, &w) in c.idx.iter().zip(&c.weights) {
        let w = w as i64;
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best.unwrap_or(c.idx[0]);
    current[b] -= total;
    b
}

fn least_request(eps: &[std::sync::Arc<Endpoint>], c: &Candidates) -> usize {
    // Start at a random offset so ties do not all land on the first endpoint.
    let n = c.idx.len();
    let start = rand_below(n as u64) as usize;
    let mut best = (f64::MAX, c.idx[start]);
    for k in 0..n {
        let j = (start + k) % n;
        let i = c.idx[j];
        let load = (eps[i].inflight.load(std::sync::atomic::Ordering::Relaxed) + 1) as f64 / c.weights[j].max(1) as f64;
        if load < best.0 {
            best = (load, i);
        }
    }
    best.1
}

fn p2c(eps: &[std::sync::Arc<Endpoint>], c: &Candidates) -> usize {
    let n = c.idx.len() as u64;
    let a = rand_below(n) as usize;
    let b = (a + 1 + rand_below(n - 1) as usize) % n as usize;
    let cost = |j: usize| eps[c.idx[j]].ewma_cost() / c.weights[j].max(1) as f64;
    if cost(a) <= cost(b) {
        c.idx[a]
    } else {
        c.idx[b]
    }
}

pub fn weighted_random(c: &Candidates) -> usize {
    let total: u64 = c.weights.iter().sum();
    if total == 0 {
        return c.idx[rand_below(c.idx.len() as u64) as usize];
    }
    let mut r = rand_u64() % total;
    for (&i, &w) in c.idx.iter().zip(&c.weights) {
        if r < w {
            return i;
        }
        r -= w;
    }
    c.idx[c.idx.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u64]) -> Candidates {
        Candidates { idx: (0..weights.len()).collect(), weights: weights.to_vec() }
    }

    #[test]
    fn smooth_rr_follows_weights_and_interleaves() {
        let c = cands(&[500, 100, 100]);
        let mut cur = vec![0; 3];
        let seq: Vec<usize> = (0..7).map(|_| smooth_rr(&mut cur, &c)).collect();
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 5);
        // nginx's smooth order: a a b a c a a, never five in a row.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_random_respects_weights() {
        let c = cands(&[300, 100]);
        let n = 40_000;
        let zero = (0..n).filter(|_| weighted_random(&c) == 0).count();
        let share = zero as f64 / n as f64;
        assert!((0.70..0.80).contains(&share), "share {share}");
    }
}
