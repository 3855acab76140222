//! Counters and histograms on atomics, and their Prometheus text rendering.
//!
//! Statistics are kept per route, per endpoint and per listener in the
//! [`crate::registry`], outside the config snapshot, so reloads never reset
//! them.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

/// The bucket `d` falls in: the first bound it does not exceed, or +Inf.
fn bucket(d: Duration) -> usize {
    let s = d.as_secs_f64();
    BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len())
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.counts[bucket(d)].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations per bucket (the bounds in [`BUCKETS`], then +Inf).
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// The sum of every observation, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}");
    }
}

/// The `q` quantile (0 to 1) of a latency histogram's per-bucket counts
/// ([`BUCKETS`], then +Inf), in seconds, interpolated inside its bucket;
/// `None` without observations.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64 * q).ceil() as u64).max(1);
    let mut cum = 0;
    for (i, n) in counts.iter().enumerate() {
        if cum + n >= want {
            let lo = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            let hi = BUCKETS.get(i).copied().unwrap_or(BUCKETS[BUCKETS.len() - 1] * 2.0);
            let into = (want - cum) as f64 / (*n).max(1) as f64;
            return Some(lo + (hi - lo) * into);
        }
        cum += n;
    }
    None
}

/// Status classes counted: 1xx..5xx, plus responses the proxy made itself
/// because the upstream failed (`error`).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

pub fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// Latencies of the last ten seconds in [`BUCKETS`], one slot per second,
/// and their 95th and 99th percentiles, recomputed at most four times a
/// second from at least [`MIN_SAMPLES`] (with fewer, the last figures
/// stand).
#[derive(Default)]
pub struct RecentLatency {
    slots: [RecentSlot; 10],
    /// The last p99 (the bound of its bucket) and p95 (interpolated in its
    /// bucket) in microseconds plus one (0: not enough samples).
    p99_us: AtomicU64,
    p95_us: AtomicU64,
    computed_ms: AtomicU64,
}

#[derive(Default)]
struct RecentSlot {
    second: AtomicU64,
    counts: [AtomicU64; BUCKETS.len() + 1],
}

/// Fewer samples than this in ten seconds give no percentile.
const MIN_SAMPLES: u64 = 20;

impl RecentLatency {
    pub fn observe(&self, d: Duration, now_ms: u64) {
        let now_s = now_ms / 1000;
        let slot = &self.slots[(now_s % 10) as usize];
        let seen = slot.second.load(Relaxed);
        if seen != now_s && slot.second.compare_exchange(seen, now_s, Relaxed, Relaxed).is_ok() {
            for c in &slot.counts {
                c.store(0, Relaxed);
            }
        }
        slot.counts[bucket(d)].fetch_add(1, Relaxed);
    }

    /// The upper bound of the bucket holding the 99th percentile of the
    /// last ten seconds, if there were enough samples (a timeout's view:
    /// never below the real figure).
    pub fn p99(&self, now_ms: u64) -> Option<Duration> {
        self.refresh(now_ms);
        stored(&self.p99_us)
    }

    /// The 95th percentile of the last ten seconds, interpolated in its
    /// bucket, if there were enough samples (a hedge's view: the latency
    /// most requests stay under).
    pub fn p95(&self, now_ms: u64) -> Option<Duration> {
        self.refresh(now_ms);
        stored(&self.p95_us)
    }

    fn refresh(&self, now_ms: u64) {
        if now_ms.saturating_sub(self.computed_ms.load(Relaxed)) < 250 {
            return;
        }
        self.computed_ms.store(now_ms, Relaxed);
        let now_s = now_ms / 1000;
        let mut counts = [0u64; BUCKETS.len() + 1];
        for slot in &self.slots {
            let sec = slot.second.load(Relaxed);
            if sec + 10 > now_s && sec <= now_s {
                for (sum, c) in counts.iter_mut().zip(&slot.counts) {
                    *sum += c.load(Relaxed);
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total < MIN_SAMPLES {
            // A quiet spell keeps the last figures: traffic that comes back
            // after one is timed (and hedged) as before, not from nothing.
            return;
        }
        let mut cum = 0;
        for (i, c) in counts.iter().enumerate() {
            cum += c;
            if cum * 100 >= total * 99 {
                let bound = BUCKETS.get(i).copied().unwrap_or(BUCKETS[BUCKETS.len() - 1] * 2.0);
                self.p99_us.store((bound * 1e6) as u64 + 1, Relaxed);
                break;
            }
        }
        if let Some(s) = quantile(&counts, 0.95) {
            self.p95_us.store((s * 1e6) as u64 + 1, Relaxed);
        }
    }
}

fn stored(us: &AtomicU64) -> Option<Duration> {
    match us.load(Relaxed) {
        0 => None,
        us => Some(Duration::from_micros(us - 1)),
    }
}

#[derive(Default)]
pub struct RouteStats {
    pub requests: [AtomicU64; 6],
    pub retries: AtomicU64,
    pub retries_denied: AtomicU64,
    /// Tries abandoned at their per-try timeout (and retried elsewhere).
    pub try_timeouts: AtomicU64,
    /// Second tries sent while the first was still waiting (hedges), and
    /// how many of them answered first.
    pub hedges: AtomicU64,
    pub hedges_won: AtomicU64,
    /// Requests answered 429: their client was over the route's rate limit.
    pub rate_limited: AtomicU64,
    pub latency: Histogram,
    pub grpc: GrpcStatuses,
}

/// gRPC calls by the `grpc-status` they ended with (0 to 16; anything
/// else, or none, counted as 2, UNKNOWN, as gRPC clients read it).
#[derive(Default)]
pub struct GrpcStatuses(pub [AtomicU64; 17]);

impl GrpcStatuses {
    /// Counts the status a header or trailer value says.
    pub fn count(&self, value: Option<&http::HeaderValue>) {
        let code = value
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|c| *c < self.0.len())
            .unwrap_or(2);
        self.0[code].fetch_add(1, Relaxed);
    }

    pub fn any(&self) -> bool {
        self.0.iter().any(|c| c.load(Relaxed) > 0)
    }
}

#[derive(Default)]
pub struct EndpointStats {
    pub requests: [AtomicU64; 6],
    /// Connections a TCP listener opened here.
    pub tcp_connections: AtomicU64,
    /// Connects that failed or timed out (TCP listeners and upstream pools).
    pub connect_failures: AtomicU64,
    pub ejections: AtomicU64,
    pub health_checks_failed: AtomicU64,
    pub latency: Histogram,
}

impl EndpointStats {
    /// Whether anything was ever counted here (an idle endpoint's series
    /// would all be zero: `/metrics` leaves them out).
    pub fn any(&self) -> bool {
        self.requests.iter().any(|c| c.load(Relaxed) > 0)
            || [&self.tcp_connections, &self.connect_failures, &self.ejections, &self.health_checks_failed]
                .iter()
                .any(|c| c.load(Relaxed) > 0)
    }
}

/// Per upstream, whatever endpoints it has had: what a canary analysis
/// compares between revisions.
#[derive(Default)]
pub struct UpstreamStats {
    pub requests: [AtomicU64; 6],
    pub latency: Histogram,
    /// Time to the response head of recent tries: what `auto` per-try
    /// timeouts derive from.
    pub first_byte: RecentLatency,
    /// The upstream's `max_in_flight` state.
    pub limiter: std::sync::Arc<crate::overload::Limiter>,
    /// When its endpoints' failure rates were last judged (ms, see
    /// `util::now_ms`; 0: never).
    pub rates_judged_ms: AtomicU64,
    /// Requests held now for a first endpoint (`cold_start`).
    pub waiting: AtomicU64,
    /// Notified when the upstream's endpoints or config change.
    pub changed: tokio::sync::Notify,
    /// Notified when a request starts waiting: the proxy's one signal of
    /// demand for an upstream at zero, shared by every upstream.
    pub demand: std::sync::Arc<tokio::sync::Notify>,
}

impl UpstreamStats {
    /// Requests so far, and how many of them failed (5xx or an error the
    /// proxy answered for).
    pub fn totals(&self) -> (u64, u64) {
        let n: Vec<u64> = self.requests.iter().map(|c| c.load(Relaxed)).collect();
        (n.iter().sum(), n[4] + n[5])
    }
}

#[derive(Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    /// Open connections and the `max_connections` slots.
    pub conns: crate::overload::ConnLimit,
    /// Open tunnels: TCP connections, and HTTP connections after an Upgrade.
    pub tunnels: AtomicU64,
    /// Tunnel bytes from clients, and to clients.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// TCP connections closed because no endpoint took them.
    pub unserved: AtomicU64,
    /// Connections closed over their PROXY protocol header.
    pub proxy_protocol_refused: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// Certificate files re-read after a change, and changes refused.
    pub tls_reloads: AtomicU64,
    pub tls_reload_failures: AtomicU64,
}

/// Helpers that write Prometheus families; label values are escaped.
/// Prometheus text exposition: the one writer of every `/metrics` halo
/// serves (the proxy's admin API and the node API).
#[derive(Default)]
pub struct Writer {
    pub out: String,
}

pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Writer {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; `labels` already written (`a="x",b="y"`), or empty.
    pub fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }

    /// One sample with its labels' values escaped.
    pub fn labelled(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let labels: Vec<String> = labels.iter().map(|(k, val)| format!("{k}=\"{}\"", escape(val))).collect();
        self.sample(name, &labels.join(","), v);
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.header(name, kind, help);
        self.sample(name, "", v);
    }

    pub fn classes(&mut self, name: &str, labels: &str, counts: &[AtomicU64; 6]) {
        for (c, n) in CLASSES.iter().zip(counts) {
            let _ = writeln!(self.out, "{name}{{{labels},class=\"{c}\"}} {}", n.load(Relaxed));
        }
    }

    pub fn histogram(&mut self, name: &str, labels: &str, h: &Histogram) {
        h.render(&mut self.out, name, labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_percentiles_need_samples_keep_through_a_quiet_spell_and_forget_old_seconds() {
        let r = RecentLatency::default();
        for _ in 0..10 {
            r.observe(Duration::from_millis(2), 5_000);
        }
        assert_eq!(r.p99(5_000), None, "too few samples");
        for _ in 0..990 {
            r.observe(Duration::from_millis(2), 5_000);
        }
        for _ in 0..5 {
            r.observe(Duration::from_millis(400), 5_000);
        }
        assert_eq!(r.p99(5_300), Some(Duration::from_micros(2_500)));
        // p95 is interpolated in its bucket (1 ms to 2.5 ms).
        let p95 = r.p95(5_300).unwrap();
        assert!(p95 > Duration::from_millis(1) && p95 < Duration::from_micros(2_500), "{p95:?}");
        // Ten seconds later none of it counts, but with nothing newer the
        // last figures stand.
        assert_eq!(r.p99(16_000), Some(Duration::from_micros(2_500)));
        for _ in 0..100 {
            r.observe(Duration::from_millis(40), 16_500);
        }
        assert_eq!(r.p99(16_500), Some(Duration::from_millis(50)));
    }
}
