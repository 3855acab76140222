//! Runtime state of one endpoint of one upstream: health (active and
//! passive), load (in-flight requests, peak-EWMA latency), its connection pool
//! and its counters.
//!
//! This state lives outside the config snapshot, in the [`crate::registry`],
//! so that it survives reloads: a reload that keeps an endpoint keeps its
//! health, its pooled connections and its statistics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::UpstreamConfig;
use crate::metrics::EndpointStats;
use crate::pool::Pool;
use crate::util::{hash64, ms, now_ms};
use halo_model::health::{Tally, Verdict};

/// Latency assumed for an endpoint with no sample yet.
const DEFAULT_RTT_NS: u64 = 1_000_000;
/// Decay time of the peak-EWMA latency estimate.
const EWMA_TAU_MS: f64 = 10_000.0;

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Stable id used as the session cookie value.
    pub id: String,
    pub upstream: Arc<str>,
    /// The upstream's current settings; swapped on reload.
    pub settings: ArcSwap<UpstreamConfig>,
    pub weight: AtomicU32,
    pub inflight: AtomicUsize,
    pub pool: Pool,
    pub stats: EndpointStats,
    health: Health,
    ewma_ns: AtomicU64,
    ewma_at_ms: AtomicU64,
    /// Set when a reload or an endpoint update removed the endpoint:
    /// requests in flight finish, tunnels close after the grace period.
    retired: AtomicBool,
    on_retire: tokio::sync::Notify,
}

#[derive(Default)]
struct Health {
    /// Result of active checks (true when checks are off).
    active_up: AtomicBool,
    /// When the endpoint last came up (ms, see `util::now_ms`); 0 = never went down.
    up_since_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Tries, and tries that failed (a 5xx or no answer), since the
    /// failure rates were last judged ([`crate::outlier`]).
    tries: AtomicU64,
    failed_tries: AtomicU64,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, weight: u32, settings: Arc<UpstreamConfig>) -> Self {
        let upstream: Arc<str> = settings.name.as_str().into();
        let pool = Pool::new(addr, &settings.pool, settings.protocol, settings.tls.clone());
        Endpoint {
            addr,
            id: format!("{:016x}", hash64(addr.to_string().as_bytes())),
            upstream,
            settings: ArcSwap::new(settings),
            weight: AtomicU32::new(weight),
            inflight: AtomicUsize::new(0),
            pool,
            stats: EndpointStats::default(),
            health: Health { active_up: AtomicBool::new(true), ..Health::default() },
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS),
            ewma_at_ms: AtomicU64::new(now_ms()),
            retired: AtomicBool::new(false),
            on_retire: tokio::sync::Notify::new(),
        }
    }

    /// Marks the endpoint removed from its upstream (see [`Endpoint::retired`]).
    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
        self.on_retire.notify_waiters();
    }

    /// Resolves once the endpoint has been removed from its upstream.
    pub async fn retired(&self) {
        loop {
            let notified = self.on_retire.notified();
            if self.retired.load(Relaxed) {
                return;
            }
            notified.await;
        }
    }

    /// Whether new requests may go here: up by active checks and not ejected.
    pub fn available(&self, now: u64) -> bool {
        self.health.active_up.load(Relaxed) && now >= self.health.ejected_until_ms.load(Relaxed)
    }

    pub fn active_up(&self) -> bool {
        self.health.active_up.load(Relaxed)
    }

    pub fn ejected(&self, now: u64) -> bool {
        now < self.health.ejected_until_ms.load(Relaxed)
    }

    /// Weight scaled by 100 and by the slow-start ramp after a recovery.
    pub fn effective_weight(&self, now: u64, slow_start: Option<Duration>) -> u64 {
        let w = u64::from(self.weight.load(Relaxed)) * 100;
        let Some(window) = slow_start.map(ms).filter(|w| *w > 0) else { return w };
        let since = self.health.up_since_ms.load(Relaxed).max(self.health.ejected_until_ms.load(Relaxed));
        if since == 0 || now >= since + window {
            return w;
        }
        // Start at 10% so a recovered endpoint gets some traffic at once.
        let share = (now.saturating_sub(since) as f64 / window as f64).clamp(0.1, 1.0);
        ((w as f64) * share).max(1.0) as u64
    }

    /// Records an active check result; returns the new state when it changed.
    pub fn active_result(&self, ok: bool, rise: u32, fall: u32, tally: &mut Tally) -> Option<bool> {
        let up = self.health.active_up.load(Relaxed);
        match tally.record(ok, rise, fall) {
            Verdict::Passing if !up => {
                self.health.up_since_ms.store(now_ms(), Relaxed);
                self.health.consecutive_failures.store(0, Relaxed);
                self.health.active_up.store(true, Relaxed);
                Some(true)
            }
            Verdict::Failing if up => {
                self.health.active_up.store(false, Relaxed);
                Some(false)
            }
            _ => None,
        }
    }

    /// Records a try's outcome for passive health: `ok` says whether it
    /// breaks a run of consecutive failures (a gateway error or no answer
    /// does not), `answered` whether it counts as a success for the failure
    /// rate (any answer below 500). `may_eject` tells whether one more
    /// ejection keeps within the upstream's cap; returns true when this call
    /// ejected the endpoint.
    pub fn passive_result(&self, ok: bool, answered: bool, may_eject: impl FnOnce() -> bool) -> bool {
        self.health.tries.fetch_add(1, Relaxed);
        if !answered {
            self.health.failed_tries.fetch_add(1, Relaxed);
        }
        if ok {
            if self.health.consecutive_failures.load(Relaxed) != 0 {
                self.health.consecutive_failures.store(0, Relaxed);
            }
            return false;
        }
        let Some(outlier) = self.settings.load().outlier.clone() else { return false };
        let n = self.health.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let now = now_ms();
        if n < outlier.consecutive_failures || self.ejected(now) || !may_eject() {
            return false;
        }
        self.eject(&outlier, now, format_args!("{n} consecutive failures"));
        true
    }

    /// Tries and failed tries since the last call.
    pub fn take_tries(&self) -> (u64, u64) {
        (self.health.tries.swap(0, Relaxed), self.health.failed_tries.swap(0, Relaxed))
    }

    /// Takes the endpoint out of its group for a time that doubles with
    /// each ejection in a row, up to the maximum.
    pub fn eject(&self, outlier: &crate::config::OutlierConfig, now: u64, why: std::fmt::Arguments) {
        let times = self.health.ejections.fetch_add(1, Relaxed).min(16);
        let span = (ms(outlier.base_ejection) << times).min(ms(outlier.max_ejection));
        self.health.ejected_until_ms.store(now + span, Relaxed);
        self.health.consecutive_failures.store(0, Relaxed);
        self.stats.ejections.fetch_add(1, Relaxed);
        tracing::warn!(upstream = %self.upstream, endpoint = %self.addr, ejected_ms = span, "endpoint ejected: {why}");
    }

    /// The health a new process should carry on with (binary upgrade).
    pub fn export(&self, now: u64) -> crate::handover::EndpointState {
        crate::handover::EndpointState {
            upstream: self.upstream.to_string(),
            addr: self.addr,
            active_up: self.active_up(),
            ejected_for_ms: self.health.ejected_until_ms.load(Relaxed).saturating_sub(now),
            ejections: self.ejection_count(),
        }
    }

    /// Takes on the health an old process had (binary upgrade).
    pub fn restore(&self, s: &crate::handover::EndpointState, now: u64) {
        self.health.active_up.store(s.active_up, Relaxed);
        if s.ejected_for_ms > 0 {
            self.health.ejected_until_ms.store(now + s.ejected_for_ms, Relaxed);
        }
        self.health.ejections.store(s.ejections, Relaxed);
    }

    /// Forgets past ejections once an endpoint has served well for a while,
    /// so that the next ejection starts from the base time again.
    pub fn reset_ejection_backoff(&self) {
        self.health.ejections.store(0, Relaxed);
    }

    pub fn ejection_count(&self) -> u32 {
        self.health.ejections.load(Relaxed)
    }

    /// Peak-EWMA latency: rises at once to a slow sample, decays towards fast ones.
    /// `now` from [`crate::util::now_ms`].
    pub fn observe_rtt(&self, rtt: Duration, now: u64) {
        let sample = rtt.as_nanos().min(u128::from(u64::MAX)) as u64;
        let prev = self.ewma_ns.load(Relaxed);
        let last = self.ewma_at_ms.swap(now, Relaxed);
        let next = if sample > prev {
            sample
        } else {
            let w = (-(now.saturating_sub(last) as f64) / EWMA_TAU_MS).exp();
            (prev as f64 * w + sample as f64 * (1.0 - w)) as u64
        };
        self.ewma_ns.store(next.max(1), Relaxed);
    }

    /// Cost for p2c_ewma: expected latency times the queue it would join.
    pub fn ewma_cost(&self) -> f64 {
        self.ewma_ns.load(Relaxed) as f64 * (self.inflight.load(Relaxed) + 1) as f64
    }
}

/// Keeps an endpoint's in-flight count up while a request is outstanding.
pub struct InflightGuard(pub Arc<Endpoint>);

impl InflightGuard {
    pub fn new(ep: Arc<Endpoint>) -> Self {
        ep.inflight.fetch_add(1, Relaxed);
        InflightGuard(ep)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}
