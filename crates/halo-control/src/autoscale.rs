//! The autoscaler, run by the leader: each pass it sums the proxies'
//! counters of every autoscaled service over all nodes, measures its
//! targets over the last `window`, and decides its replica count.
//!
//! [`recommend`] and [`decide`] are pure (no store, clock or process): a
//! service's measurements and what was recommended before in, a count and
//! its reason out; `tests` run recorded series through them. The
//! [`Controller`] keeps what they need between passes (the counters' sums
//! over time, past recommendations) and writes each decision as the
//! service's [`ScaleRecord`], fenced by the leader's token, with an event.
//!
//! The rules, as Kubernetes' HPA has them where it has them:
//! - each target asks for `ceil(total / target)` instances (`p99`:
//!   `ceil(ready x measured / target)`) over `window` (default 30 s), and
//!   the highest ask wins; within 10% of the target nothing changes;
//! - over the last tenth of the window (at least a second), a burst that
//!   asks for twice the count or more is acted on at once (Knative's panic
//!   mode): a step of load is followed within seconds, and a stall of a
//!   few hundred milliseconds is averaged away;
//! - up at once, at most doubling per pass;
//! - down only to the highest count asked for over `scale_down_window`
//!   (a new leader first measures that long), so a load that swings around
//!   a target scales once, for its peaks;
//! - `min = 0`: to zero after `scale_to_zero_after` without a request, and
//!   from zero as soon as a proxy holds a request for it;
//! - during a canary rollout the count holds (the rollout places its
//!   canary's share of the count it started with).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use halo_model::autoscale::{AutoscaleSpec, Target};
use halo_model::clock::unix_ms;
use halo_store::{Compare, CompareOp, CompareTarget, Revision, Txn, TxnOp};

use crate::events::EventKind;
use crate::keys::{scale_key, Counters, Measured, ScaleRecord, LEADER};
use crate::membership::Membership;
use crate::state::ClusterState;

/// Within this share of a target, the count stays.
const TOLERANCE: f64 = 0.1;

/// A measurement holding no change is written at most this often (what
/// `halo status` shows).
const REFRESH: Duration = Duration::from_secs(2);

/// Nodes publish their counters about once a second while they change: no
/// change for this long is no traffic.
const QUIET: Duration = Duration::from_millis(1500);

/// What the proxies measured of one service over a window, all nodes and
/// instances together.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Load {
    /// Mean requests in flight (the latencies' sum over the window's length).
    pub in_flight: f64,
    pub rps: f64,
    /// 99th percentile latency, seconds (`None`: no request).
    pub p99: Option<f64>,
}

/// What one pass knows of one service.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Signals {
    /// Ready instances now.
    pub ready: u32,
    /// Over `window`: what the count follows.
    pub load: Load,
    /// Over the last tenth of it (at least a second): a burst that asks
    /// for twice the count or more is acted on at once.
    pub burst: Load,
    /// A burst was acted on within the last window: the burst's ask
    /// counts whatever its size, until the window has seen it.
    pub bursting: bool,
    /// Requests held by the proxies for a first instance, now.
    pub waiting: u64,
    /// Since the last request (or held request).
    pub idle_for: Duration,
}

/// A count and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recommendation {
    pub replicas: u32,
    pub reason: String,
    pub measured: Vec<Measured>,
    /// The burst window asked for twice the count or more.
    pub burst: bool,
}

/// Each target against `load` per ready instance.
fn measure(spec: &AutoscaleSpec, ready: u32, load: &Load) -> Vec<Measured> {
    let per = |total: f64| if ready == 0 { None } else { Some(total / f64::from(ready)) };
    spec.targets
        .iter()
        .map(|t| {
            let value = match t {
                Target::InFlight(_) => per(load.in_flight),
                Target::Rps(_) => per(load.rps),
                Target::P99(_) => load.p99.map(|p| p * 1000.0).filter(|_| ready > 0),
            };
            Measured { metric: t.name().to_string(), target: t.value(), value }
        })
        .collect()
}

/// The count `load` asks for (the highest of its targets'), and the words
/// for the target that asked it; `None` when nothing was measured.
fn ask(spec: &AutoscaleSpec, current: u32, ready: u32, load: &Load) -> Option<(u32, String)> {
    let mut best: Option<(u32, String)> = None;
    for (t, m) in spec.targets.iter().zip(measure(spec, ready, load)) {
        let Some(value) = m.value else { continue };
        let ratio = value / m.target;
        let want = if (ratio - 1.0).abs() <= TOLERANCE {
            current
        } else {
            let total = match t {
                Target::InFlight(_) => load.in_flight,
                Target::Rps(_) => load.rps,
                Target::P99(_) => f64::from(ready) * ratio * m.target,
            };
            (total / m.target - 1e-9).ceil().max(0.0) as u32
        };
        let unit = if matches!(t, Target::P99(_)) { "ms" } else { "" };
        let cmp = if ratio > 1.0 + TOLERANCE {
            ">"
        } else if ratio < 1.0 - TOLERANCE {
            "<"
        } else {
            "~"
        };
        let why = format!("{} {:.1}{unit} per instance {cmp} {}{unit}", m.metric, value, m.target);
        if best.as_ref().is_none_or(|(w, _)| want > *w) {
            best = Some((want, why));
        }
    }
    best
}

/// The count `s` asks for when the service asks for `current` now.
pub(crate) fn recommend(spec: &AutoscaleSpec, current: u32, s: &Signals) -> Recommendation {
    let measured = measure(spec, s.ready, &s.load);
    // At zero a service stays there until a request comes; above it, it
    // keeps one until idle for scale_to_zero_after.
    let demand = s.waiting > 0 || s.burst.rps > 0.0;
    let at_least = match spec.min {
        0 if current == 0 => u32::from(demand),
        0 => u32::from(demand || s.idle_for < spec.scale_to_zero_after),
        min => min,
    };
    let done = |replicas: u32, reason: String| {
        let replicas = replicas.clamp(at_least, spec.max);
        let reason = if replicas == 0 && current > 0 {
            format!("no request for {} (scale_to_zero_after)", secs(s.idle_for))
        } else {
            reason
        };
        Recommendation { replicas, reason, measured: measured.clone(), burst: false }
    };
    if at_least == 0 && current > 0 {
        // Idle for scale_to_zero_after: what the window still holds of the
        // last requests asks for nothing.
        return done(0, String::new());
    }
    if current == 0 || s.ready == 0 {
        if s.waiting > 0 {
            return done(current.max(1), format!("{} waiting for a first instance", plural(s.waiting, "request")));
        }
        if current == 0 && at_least == 0 {
            return done(0, format!("no request for {}", secs(s.idle_for)));
        }
        return done(current, "no ready instance to measure yet".into());
    }
    let steady = ask(spec, current, s.ready, &s.load);
    // A burst of twice the count's worth or more: at once, not averaged
    // away over the window; and what the burst window asks for counts
    // until the window has seen it.
    let burst = ask(spec, current, s.ready, &s.burst);
    let big = burst.as_ref().is_some_and(|(want, _)| *want >= current.saturating_mul(2));
    let burst = burst.filter(|_| big || s.bursting);
    let mut rec = match (steady, burst) {
        (Some((w, _)), Some((b, why))) if b > w => done(b, format!("{why} (a burst)")),
        (Some((w, why)), _) => done(w, why),
        (None, Some((b, why))) => done(b, format!("{why} (a burst)")),
        (None, None) => done(current, "nothing measured yet".into()),
    };
    rec.burst = big;
    rec
}

/// A change of count, and the event's words.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Change {
    pub to: u32,
    pub reason: String,
}

/// What one pass does with `rec`: `past` are the recommendations of the
/// last `scale_down_window` (oldest first, with how long ago each was
/// made), `measured_for` how long this leader has measured the service.
pub(crate) fn decide(
    spec: &AutoscaleSpec,
    current: u32,
    rec: &Recommendation,
    past: &[(Duration, u32)],
    measured_for: Duration,
) -> Option<Change> {
    let bounded = current.clamp(spec.min, spec.max);
    if bounded != current {
        return Some(Change { to: bounded, reason: format!("bounds are {} to {}", spec.min, spec.max) });
    }
    let want = rec.replicas;
    if want > current {
        let to = if current == 0 { want } else { want.min(current.saturating_mul(2)) };
        return Some(Change { to, reason: rec.reason.clone() });
    }
    if want == current {
        return None;
    }
    if want == 0 {
        // Idle for scale_to_zero_after: its own window.
        return Some(Change { to: 0, reason: rec.reason.clone() });
    }
    if measured_for < spec.scale_down_window {
        return None;
    }
    let window = spec.scale_down_window;
    let highest = past.iter().filter(|(ago, _)| *ago <= window).map(|(_, n)| *n).max().unwrap_or(0).max(want);
    (highest < current)
        .then(|| Change { to: highest, reason: format!("{} for {} (scale_down_window)", rec.reason, secs(window)) })
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 120.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{s:.0}s")
    }
}

/// One service's counters summed over every node, kept growing through
/// node restarts (a node's counters that went back count from zero).
#[derive(Default)]
struct Tally {
    last: BTreeMap<String, Counters>,
    total: Counters,
}

impl Tally {
    fn update(&mut self, now: &BTreeMap<String, Counters>) {
        self.total.waiting = 0;
        for (node, c) in now {
            let before = self.last.get(node);
            let went_back = before.is_some_and(|b| c.requests < b.requests);
            let grew = match before {
                Some(b) if !went_back => c.since(b),
                _ => Counters { waiting: c.waiting, ..c.clone() },
            };
            let waiting = grew.waiting;
            self.total.add(&Counters { waiting: 0, ..grew });
            self.total.waiting += waiting;
        }
        self.last = now.clone();
    }
}

/// What the leader keeps of one autoscaled service between passes.
struct Follow {
    since: Instant,
    tally: Tally,
    /// The tally's totals over the last window, oldest first.
    samples: VecDeque<(Instant, Counters)>,
    /// Recommendations of the last scale_down_window, oldest first.
    past: VecDeque<(Instant, u32)>,
    last_request: Instant,
    /// When a burst last asked for twice the count.
    last_burst: Option<Instant>,
    written: Option<(Instant, ScaleRecord)>,
}

impl Follow {
    fn new(now: Instant) -> Follow {
        Follow {
            since: now,
            tally: Tally::default(),
            samples: VecDeque::new(),
            past: VecDeque::new(),
            last_request: now,
            last_burst: None,
            written: None,
        }
    }

    /// The signals over `window` (and its last tenth) ending now.
    ///
    /// Samples are the totals as they changed, timed when the change was
    /// seen: nodes publish about once a second, so a rate taken between two
    /// leader passes would count one publication too many or too few (twice
    /// the load, over a second). A rate ends at the last change while
    /// publications come, and at now once they stop (no traffic: it decays).
    fn signals(&mut self, window: Duration, ready: u32, now: Instant) -> Signals {
        let total = self.tally.total.clone();
        if total.waiting > 0 || self.samples.back().is_some_and(|(_, c)| c.requests < total.requests) {
            self.last_request = now;
        }
        if self.samples.back().is_none_or(|(_, c)| *c != total) {
            self.samples.push_back((now, total.clone()));
        }
        // Keep the newest sample a window older than now, and none older.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= window + QUIET {
            self.samples.pop_front();
        }
        let (last_at, _) = *self.samples.back().expect("one at least");
        let end = if now.duration_since(last_at) < QUIET { last_at } else { now };
        let over = |span: Duration| {
            // The newest sample at least `span` before the end (else the oldest).
            let (then, first) = self
                .samples
                .iter()
                .rev()
                .find(|(at, _)| end.saturating_duration_since(*at) >= span)
                .or(self.samples.front())
                .cloned()
                .expect("one at least");
            let grew = total.since(&first);
            let secs = end.saturating_duration_since(then).as_secs_f64();
            if secs <= 0.0 {
                return Load::default();
            }
            Load {
                in_flight: grew.latency_sum_us as f64 / 1e6 / secs,
                rps: grew.requests as f64 / secs,
                p99: halo_proxy::metrics::quantile(&grew.latency, 0.99),
            }
        };
        Signals {
            ready,
            load: over(window),
            burst: over(burst_window(window)),
            bursting: self.last_burst.is_some_and(|at| now.duration_since(at) < window),
            waiting: total.waiting,
            idle_for: now.duration_since(self.last_request),
        }
    }
}

/// The window a burst is measured over: a tenth of `window`, at least a
/// second (at most `window`).
pub(crate) fn burst_window(window: Duration) -> Duration {
    (window / 10).max(Duration::from_secs(1)).min(window)
}

/// The leader's autoscaling state.
#[derive(Default)]
pub(crate) struct Controller {
    follows: BTreeMap<String, Follow>,
}

impl Controller {
    /// One pass over every autoscaled service; the counts decided now
    /// (written, fenced by `token`), by service.
    pub(crate) async fn tick(
        &mut self,
        m: &Membership,
        token: Revision,
        st: &ClusterState,
        written: &mut Revision,
    ) -> BTreeMap<String, u32> {
        let now = Instant::now();
        let mut decided = BTreeMap::new();
        let mut events = Vec::new();
        let mut ops = Vec::new();
        // Records of services gone, or no longer autoscaled.
        for name in st.scales.keys() {
            if st.services.get(name).is_none_or(|s| s.spec.autoscale.is_none()) {
                ops.push(TxnOp::Delete(scale_key(name)));
            }
        }
        self.follows.retain(|n, _| st.services.get(n).is_some_and(|s| s.spec.autoscale.is_some()));
        for (name, svc) in &st.services {
            let Some(spec) = &svc.spec.autoscale else { continue };
            let f = self.follows.entry(name.clone()).or_insert_with(|| Follow::new(now));
            let per_node: BTreeMap<String, Counters> = st
                .stats
                .iter()
                .filter_map(|(node, s)| s.upstreams.get(name).map(|c| (node.clone(), c.clone())))
                .collect();
            f.tally.update(&per_node);
            let ready = st.endpoints_of_service(name).filter(|(id, _)| st.assignments.contains_key(*id)).count() as u32;
            let signals = f.signals(spec.window, ready, now);
            let stored = st.scales.get(name);
            let current = stored.map_or(svc.spec.replicas, |r| r.replicas);
            let rec = recommend(spec, current, &signals);
            if rec.burst {
                f.last_burst = Some(now);
            }
            f.past.retain(|(at, _)| now.duration_since(*at) <= spec.scale_down_window);
            let past: Vec<(Duration, u32)> = f.past.iter().map(|(at, n)| (now.duration_since(*at), *n)).collect();
            let change = if st.canary(name).is_some() {
                None
            } else {
                decide(spec, current, &rec, &past, now.duration_since(f.since))
            };
            f.past.push_back((now, rec.replicas));
            let mut next = ScaleRecord {
                replicas: current,
                ready,
                measured: rec.measured.clone(),
                reason: stored.map(|r| r.reason.clone()).unwrap_or_default(),
                changed_ms: stored.map_or(0, |r| r.changed_ms),
                at_ms: unix_ms(),
                token,
            };
            if let Some(c) = &change {
                tracing::info!(service = %name, from = current, to = c.to, reason = %c.reason, "autoscaled");
                events.push((name.clone(), format!("scaled {name} {current} -> {}: {}", c.to, c.reason)));
                next.replicas = c.to;
                next.reason = c.reason.clone();
                next.changed_ms = next.at_ms;
                decided.insert(name.clone(), c.to);
            } else if st.canary(name).is_some() {
                next.reason = "holds while a canary rollout is in progress".into();
            }
            let stale = f.written.as_ref().is_none_or(|(at, w)| {
                let same = w.replicas == next.replicas && w.reason == next.reason && w.ready == next.ready;
                !same || (w.measured != next.measured && now.duration_since(*at) >= REFRESH)
            });
            if change.is_some() || stale || stored.is_none_or(|r| r.token != token) {
                ops.push(TxnOp::put(&scale_key(name), serde_json::to_vec(&next).expect("encodes"), None));
                f.written = Some((now, next));
            }
        }
        if ops.is_empty() {
            return decided;
        }
        let mut txn = Txn::new().when(Compare::new(LEADER, CompareOp::Equal, CompareTarget::CreateRevision(token)));
        txn.success = ops;
        match m.store.txn(txn).await {
            Ok(r) if r.succeeded => {
                *written = (*written).max(r.revision);
                for (name, what) in events {
                    m.events.info(EventKind::Scaled, Some(&name), None, what);
                }
            }
            Ok(_) => {
                tracing::debug!("an autoscaling write was refused (leadership moved)");
                return BTreeMap::new();
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing autoscaling decisions failed");
                for f in self.follows.values_mut() {
                    f.written = None;
                }
                return BTreeMap::new();
            }
        }
        decided
    }
}

#[cfg(test)]
mod tests;
