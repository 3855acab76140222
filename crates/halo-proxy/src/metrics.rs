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

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations per bucket (the bounds in [`BUCKETS`], then +Inf).
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
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

/// Status classes counted: 1xx..5xx, plus responses the proxy made itself
/// because the upstream failed (`error`).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

pub fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

#[derive(Default)]
pub struct RouteStats {
    pub requests: [AtomicU64; 6],
    pub retries: AtomicU64,
    pub retries_denied: AtomicU64,
    pub latency: Histogram,
}

#[derive(Default)]
pub struct EndpointStats {
    pub requests: [AtomicU64; 6],
    pub ejections: AtomicU64,
    pub health_checks_failed: AtomicU64,
    pub latency: Histogram,
}

/// Per upstream, whatever endpoints it has had: what a canary analysis
/// compares between revisions.
#[derive(Default)]
pub struct UpstreamStats {
    pub requests: [AtomicU64; 6],
    pub latency: Histogram,
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
    pub active: AtomicU64,
}

/// Helpers that write Prometheus families; label values are escaped.
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

    pub fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
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
