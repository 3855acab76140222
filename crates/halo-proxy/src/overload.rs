//! Overload protection: what the proxy refuses so that what it admits is
//! served well.
//!
//! - [`ConnLimit`]: a listener's served connections at most
//!   (`max_connections`). At the limit each accept loop holds the one
//!   connection it took, unread, and accepts no more, so new connections
//!   wait in the kernel's accept queue rather than taking memory here, as
//!   with HAProxy's `maxconn`.
//! - [`admit`]: an upstream's requests in flight at most
//!   (`max_in_flight`), a circuit breaker: past it a request is answered
//!   503 at once instead of joining a queue without bound; the limit is a
//!   number, or [`Adaptive`] (`"auto"`), following the upstream's latency.
//! - [`ClientRate`]: requests per client address on a route (GCRA, by
//!   the `governor` crate), answered 429 with `Retry-After` past it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::Notify;

use crate::config::RateLimit;
use halo_model::lock::LockExt;
use halo_model::values::MaxInFlight;

/// A listener's connection slots, shared by every worker's accept loop.
#[derive(Default)]
pub struct ConnLimit {
    /// Open connections.
    pub active: AtomicU64,
    /// The limit; 0 for none. Set from the config on every snapshot.
    max: AtomicU64,
    /// Accept loops waiting for a slot; closes only wake them when one is.
    waiters: AtomicUsize,
    freed: Notify,
    /// Times an accept loop found the listener full and paused (once per
    /// connection it held, however often it was woken).
    pub paused: AtomicU64,
}

impl ConnLimit {
    pub fn set_max(&self, max: Option<u64>) {
        let old = self.max.swap(max.unwrap_or(0), SeqCst);
        if old != max.unwrap_or(0) {
            // A raised limit frees slots.
            self.freed.notify_waiters();
        }
    }

    /// Takes a slot for an accepted connection, or `false` when the
    /// listener is full.
    pub fn try_open(&self) -> bool {
        let max = self.max.load(SeqCst);
        if max == 0 {
            self.active.fetch_add(1, SeqCst);
            return true;
        }
        self.active.fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1)).is_ok()
    }

    /// Gives a slot back: its connection closed, or none came.
    pub fn close(&self) {
        self.active.fetch_sub(1, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Waits until a slot may be free (a connection closed, or the limit
    /// changed); the caller tries again.
    pub async fn wait(&self) {
        /// Counts this loop as waiting until it stops, even when the
        /// wait is dropped (the listener stopping).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        self.waiters.fetch_add(1, SeqCst);
        let _waiting = Waiting(&self.waiters);
        let freed = self.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let max = self.max.load(SeqCst);
        if max != 0 && self.active.load(SeqCst) >= max {
            freed.await;
        }
    }
}

/// A request admitted to an upstream with a `max_in_flight`: holds its
/// place until the response (its body included) is done; under an
/// adaptive limit its time is then a sample.
pub struct Admitted {
    limiter: Arc<Limiter>,
    since: Option<Instant>,
}

/// The upstream is at its `max_in_flight` (the limit then).
#[derive(Debug)]
pub struct Full(pub u64);

/// An upstream's `max_in_flight` state: requests in flight, those shed,
/// and the adaptive limit. Kept with the upstream's counters (across
/// reloads) and counted only when the upstream has a limit.
#[derive(Default)]
pub struct Limiter {
    /// Requests in flight (counted when the upstream has `max_in_flight`).
    pub in_flight: AtomicU64,
    /// Requests answered 503 at once because `max_in_flight` were in flight.
    pub shed: AtomicU64,
    /// The limit of `max_in_flight = "auto"`.
    pub adaptive: Adaptive,
}

/// Admits a request to the upstream of `stats` when fewer than its limit
/// are in flight (`None`: no limit, nothing held); refused and counted as
/// shed otherwise.
pub fn admit(stats: &Arc<Limiter>, max: Option<MaxInFlight>) -> Result<Option<Admitted>, Full> {
    let (limit, sampled) = match max {
        None => return Ok(None),
        Some(MaxInFlight::Fixed(n)) => (n, false),
        Some(MaxInFlight::Auto) => (stats.adaptive.limit(), true),
    };
    match stats.in_flight.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1)) {
        Ok(n) => {
            if sampled {
                stats.adaptive.peak.fetch_max(n + 1, Relaxed);
            }
            Ok(Some(Admitted { limiter: stats.clone(), since: sampled.then(Instant::now) }))
        }
        Err(_) => {
            stats.shed.fetch_add(1, Relaxed);
            Err(Full(limit))
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Relaxed);
        if let Some(t) = self.since {
            self.limiter.adaptive.sample(t.elapsed(), Instant::now());
        }
    }
}

/// The adaptive limit's bounds.
const MIN_LIMIT: f64 = 3.0;
const MAX_LIMIT: f64 = 1000.0;
/// How often the limit moves (given [`MIN_SAMPLES`] in the interval).
const INTERVAL: Duration = Duration::from_millis(100);
const MIN_SAMPLES: usize = 5;
/// Latency above the upstream's own that is accepted before the limit
/// comes down: a quarter.
const BUFFER: f64 = 0.25;
/// How often the upstream's own latency is measured again, and on how
/// many requests.
const MEASURE_EVERY: Duration = Duration::from_secs(30);
const MEASURE_SAMPLES: usize = 25;

/// `max_in_flight = "auto"`: a concurrency limit that follows the
/// upstream's latency, after Envoy's adaptive concurrency filter and
/// Netflix's gradient limiters. Every [`INTERVAL`] the p90 latency of the
/// requests that finished is compared with the upstream's own latency
/// (`min_rtt`): `limit = g * limit + sqrt(g * limit)` with
/// `g = min_rtt * (1 + BUFFER) / p90`, held to 0.5..2 (it grows only while
/// at least half of it is used). A queue building in
/// front of the upstream raises the p90 and brings the limit down to about
/// what the upstream serves at once, so past it requests are answered 503
/// at once and the admitted ones keep their latency. `min_rtt` is the
/// median of [`MEASURE_SAMPLES`] requests admitted at half the limit (3 at
/// first), taken at the first requests and every [`MEASURE_EVERY`]: at half
/// the limit the upstream's queue drains, so what is measured is its own
/// latency, not its queue's.
pub struct Adaptive {
    limit: AtomicU64,
    /// The most in flight at once since the limit last moved.
    peak: AtomicU64,
    state: std::sync::Mutex<Gradient>,
}

struct Gradient {
    limit: f64,
    min_rtt: Option<Duration>,
    /// Latencies (µs) of the interval, or of the measurement under way.
    samples: Vec<u64>,
    interval_start: Option<Instant>,
    /// A measurement of `min_rtt` is under way (the limit is held low)
    /// since then: only requests sent after it count.
    measuring: Option<Instant>,
    next_measure: Option<Instant>,
}

impl Default for Adaptive {
    fn default() -> Adaptive {
        Adaptive {
            limit: AtomicU64::new(MIN_LIMIT as u64),
            peak: AtomicU64::new(0),
            state: std::sync::Mutex::new(Gradient {
                limit: MIN_LIMIT,
                min_rtt: None,
                samples: Vec::new(),
                interval_start: None,
                measuring: Some(Instant::now()),
                next_measure: None,
            }),
        }
    }
}

impl Adaptive {
    /// Requests admitted at once now.
    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// The upstream's own latency, once measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.state.locked().min_rtt
    }

    /// A request admitted under this limit took `took`, finishing `now`.
    pub fn sample(&self, took: Duration, now: Instant) {
        let mut g = self.state.locked();
        // Sent before the limit was held low: its time says nothing of
        // the upstream's own latency.
        let before = g.measuring.is_some_and(|since| now.checked_sub(took).is_some_and(|sent| sent < since));
        if g.samples.len() < 10_000 && !before {
            g.samples.push(took.as_micros() as u64);
        }
        let start = *g.interval_start.get_or_insert(now);
        if g.measuring.is_some() {
            if g.samples.len() >= MEASURE_SAMPLES {
                let median = percentile(&mut g.samples, 0.5);
                g.min_rtt = Some(Duration::from_micros(median.max(1)));
                g.measuring = None;
                g.next_measure = Some(now + MEASURE_EVERY);
                g.samples.clear();
                g.interval_start = Some(now);
                // Back to where it was before the measurement held it low.
                let limit = if g.limit > MIN_LIMIT { g.limit } else { MIN_LIMIT * 2.0 };
                self.set(&mut g, limit);
            }
            return;
        }
        if now.duration_since(start) < INTERVAL || g.samples.len() < MIN_SAMPLES {
            return;
        }
        let min_rtt = g.min_rtt.expect("measured before intervals count").as_micros() as f64;
        let p90 = percentile(&mut g.samples, 0.9).max(1) as f64;
        let gradient = (min_rtt * (1.0 + BUFFER) / p90).clamp(0.5, 2.0);
        let peak = self.peak.swap(0, Relaxed) as f64;
        // A limit that nothing comes near says nothing about the upstream:
        // it grows only while used (else a light load would leave it at
        // the maximum, and the next burst would queue behind it).
        if gradient < 1.0 || peak >= g.limit / 2.0 {
            let next = gradient * g.limit;
            self.set(&mut g, next + next.sqrt());
        }
        g.samples.clear();
        g.interval_start = Some(now);
        if g.next_measure.is_some_and(|t| now >= t) {
            // Measure again at half the limit; the limit is restored after.
            g.measuring = Some(now);
            let held = (g.limit / 2.0).max(MIN_LIMIT);
            self.limit.store(held as u64, Relaxed);
        }
    }

    fn set(&self, g: &mut Gradient, limit: f64) {
        g.limit = limit.clamp(MIN_LIMIT, MAX_LIMIT);
        self.limit.store(g.limit as u64, Relaxed);
    }
}

/// The `p` quantile of `v` (sorted in place).
fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(0)
}

type Keyed = RateLimiter<IpAddr, DashMapStateStore<IpAddr>, DefaultClock>;

/// How often clients quiet long enough to be back at a full burst are
/// forgotten (their state is the same as none).
const PRUNE_EVERY_MS: u64 = 10_000;

/// A route's per-client request rate.
pub struct ClientRate {
    pub cfg: RateLimit,
    limiter: Keyed,
    clock: DefaultClock,
    pruned_ms: AtomicU64,
}

impl ClientRate {
    pub fn new(cfg: RateLimit) -> Self {
        let burst = NonZeroU32::new(cfg.burst).unwrap_or(NonZeroU32::MIN);
        let period = cfg.per / cfg.count.max(1);
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        ClientRate { cfg, limiter: RateLimiter::dashmap(quota), clock: DefaultClock::default(), pruned_ms: 0.into() }
    }

    /// `Ok` when `client` may send a request now; else how long until it may.
    pub fn check(&self, client: IpAddr, now_ms: u64) -> Result<(), Duration> {
        let last = self.pruned_ms.load(Relaxed);
        if now_ms.saturating_sub(last) >= PRUNE_EVERY_MS
            && self.pruned_ms.compare_exchange(last, now_ms, Relaxed, Relaxed).is_ok()
        {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that serves `capacity` requests at once in `base`; more
    /// wait their turn, so latency grows with what is in flight.
    fn latency(in_flight: u64, capacity: u64, base: Duration) -> Duration {
        base.mul_f64((in_flight as f64 / capacity as f64).max(1.0))
    }

    /// `offered` requests always waiting to be sent (4x the capacity, or a
    /// light load): runs 60 simulated seconds and returns the limits seen
    /// in the last 20.
    fn run(offered: u64, capacity: u64) -> Vec<u64> {
        let a = Adaptive::default();
        let base = Duration::from_millis(40);
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(60) {
            let admitted = offered.min(a.limit());
            let took = latency(admitted, capacity, base);
            a.peak.fetch_max(admitted, Relaxed);
            for _ in 0..admitted {
                a.sample(took, start + t + took);
            }
            t += took;
            if t > Duration::from_secs(40) {
                seen.push(a.limit());
            }
        }
        seen
    }

    #[test]
    fn at_4x_the_limit_settles_near_what_the_upstream_serves_at_once() {
        let limits = run(48, 12);
        let hi = *limits.iter().max().unwrap();
        let mean = limits.iter().sum::<u64>() as f64 / limits.len() as f64;
        // Never so high that requests queue for more than about twice the
        // upstream's own latency; about the capacity on average (it is
        // measured again at half the limit every 30 s).
        assert!(hi <= 30, "the limit rose to {hi}: {limits:?}");
        assert!((10.0..=24.0).contains(&mean), "the limit averaged {mean:.1} for a capacity of 12: {limits:?}");
    }

    #[test]
    fn a_light_load_is_not_limited() {
        // 4 at once where 12 could be served: the limit stays above them.
        let limits = run(4, 12);
        assert!(limits.iter().all(|&l| l > 4), "{limits:?}");
        // Nor grown far past what is used: a burst would queue behind it.
        assert!(limits.iter().all(|&l| l <= 16), "{limits:?}");
    }

    #[test]
    fn a_fixed_limit_and_auto_both_shed_past_their_limit() {
        let stats = Arc::new(Limiter::default());
        let held: Vec<_> = (0..3).map(|_| admit(&stats, Some(MaxInFlight::Auto)).unwrap()).collect();
        assert!(matches!(admit(&stats, Some(MaxInFlight::Auto)), Err(Full(3))), "auto starts measuring at 3");
        drop(held);
        let one = admit(&stats, Some(MaxInFlight::Fixed(1))).unwrap();
        assert!(admit(&stats, Some(MaxInFlight::Fixed(1))).is_err());
        drop(one);
        assert!(admit(&stats, None).unwrap().is_none());
        assert_eq!(stats.shed.load(Relaxed), 2);
    }
}
