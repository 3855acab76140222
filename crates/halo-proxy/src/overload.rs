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
//!   503 at once instead of joining a queue without bound.
//! - [`ClientRate`]: requests per client address on a route (GCRA, by
//!   the `governor` crate), answered 429 with `Retry-After` past it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::Notify;

use crate::config::RateLimit;
use crate::metrics::UpstreamStats;

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
/// place until the response (its body included) is done.
pub struct Admitted(Arc<UpstreamStats>);

/// The upstream is at its `max_in_flight`.
#[derive(Debug)]
pub struct Full(pub u64);

/// Admits a request to the upstream of `stats` when fewer than `max` are
/// in flight (`None`: no limit, nothing held); refused and counted as
/// shed otherwise.
pub fn admit(stats: &Arc<UpstreamStats>, max: Option<u64>) -> Result<Option<Admitted>, Full> {
    let Some(max) = max else { return Ok(None) };
    match stats.in_flight.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1)) {
        Ok(_) => Ok(Some(Admitted(stats.clone()))),
        Err(_) => {
            stats.shed.fetch_add(1, Relaxed);
            Err(Full(max))
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
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
