//! Canary rollouts, driven by the leader (states and transitions in
//! `ROLLOUT.md` beside this file).
//!
//! A service whose record keeps a stable revision beside its current one
//! is rolling a canary: the scheduler places the canary's share of
//! instances beside the full stable set, every proxy splits the service's
//! routes by the step's weight once a canary instance is ready, and every
//! node publishes its proxy's counters of both upstreams. Each analysis
//! interval the leader sums the counters' growth over all nodes into a
//! window and judges it: too few canary requests holds the step, an error
//! rate above the limits fails the window. A step passes once its pause is
//! over and a window passed in it; the last step promotes. Failed windows
//! up to the limit, a canary never ready by the deadline, or an operator's
//! abort roll back: the stable revision becomes the service's spec again,
//! so the canary's weight is 0 on every proxy at once and its instances
//! drain. Every write is fenced by the leader's token; the step lives in
//! the store, so a new leader carries on where the old one was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use halo_model::clock::unix_ms;
use halo_store::{Compare, CompareOp, CompareTarget, Revision, StoreError, Txn, TxnOp};

use halo_model::release::Strategy;

use crate::events::{EventKind, Level};
use crate::keys::Verdict;
use crate::keys::{
    rollout_command_key, rollout_key, service_key, Counters, NodeStats, RolloutCommand, RolloutRecord, RolloutState,
    ServiceRecord, StableRecord, WindowRecord, LEADER,
};
use crate::membership::Membership;
use crate::proxy_config::canary_upstream;
use crate::state::{ClusterState, Svc};

/// Windows kept in a rollout record, newest last.
const KEEP_WINDOWS: usize = 10;

/// An open analysis window: when it opened and every node's counters then.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    opened: Instant,
    start: BTreeMap<String, NodeStats>,
}

/// One window's growth, summed over the nodes.
#[derive(Debug, Clone, Default)]
struct Counts {
    canary: Counters,
    stable: Counters,
}

impl Window {
    fn open(stats: &BTreeMap<String, NodeStats>, at: Instant) -> Window {
        Window { opened: at, start: stats.clone() }
    }

    /// What grew since the window opened, on every node that reported at
    /// both ends (a node's counters that went back restarted: not counted).
    fn counts(&self, stats: &BTreeMap<String, NodeStats>, service: &str) -> Counts {
        let canary = canary_upstream(service);
        let mut c = Counts::default();
        for (node, now) in stats {
            let Some(then) = self.start.get(node) else { continue };
            let grew = |up: &str| {
                let zero = Counters::default();
                let before = then.upstreams.get(up).unwrap_or(&zero);
                now.upstreams.get(up).map(|n| n.since(before)).unwrap_or_default()
            };
            c.canary.add(&grew(&canary));
            c.stable.add(&grew(service));
        }
        c
    }
}

/// The time of a pass: the wall clock for records, a monotonic instant
/// for analysis windows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub ms: u64,
    pub at: Instant,
}

/// What a pass knows of one canary: all a decision reads.
pub(crate) struct Canary<'a> {
    pub name: &'a str,
    pub svc: &'a Svc,
    /// The rollout record of this canary, if one is under way.
    pub record: Option<&'a RolloutRecord>,
    pub command: Option<RolloutCommand>,
    /// Ready instances of the canary's revision, on every node.
    pub ready: usize,
    /// Every node's proxy counters now.
    pub stats: &'a BTreeMap<String, NodeStats>,
    /// The leader's fencing token.
    pub token: Revision,
}

/// What one pass decides for one canary: a write, and events to tell.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub write: Write,
    pub events: Vec<(Level, EventKind, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Write {
    Nothing,
    /// The rollout record, and whether the operator's command is consumed.
    Record {
        next: RolloutRecord,
        consume_command: bool,
    },
    /// The end: the service's record (stable revision dropped, or made the
    /// spec again) with the rollout record, if the service is unchanged.
    Finish {
        next: RolloutRecord,
        service: ServiceRecord,
    },
}

impl Decision {
    fn write(write: Write) -> Decision {
        Decision { write, events: Vec::new() }
    }
}

/// How a rollout ends.
enum End {
    Promote(String),
    RollBack(RolloutState, String),
}

/// The leader's rollout state that is not in the store: open windows.
#[derive(Default)]
pub(crate) struct Controller {
    windows: BTreeMap<String, Window>,
}

impl Controller {
    /// One pass over every canary in `st`, as the leader with `token`.
    pub async fn tick(&mut self, m: &Membership, token: Revision, st: &ClusterState) {
        self.windows.retain(|name, _| st.services.get(name).is_some_and(|s| s.stable.is_some()));
        let now = Now { ms: unix_ms(), at: Instant::now() };
        for (name, svc) in &st.services {
            if svc.stable.is_none() {
                continue;
            }
            let canary = Canary {
                name,
                svc,
                record: st.rollouts.get(name),
                command: st.rollout_commands.get(name).copied(),
                ready: st.endpoints.values().filter(|(s, e)| s == name && e.template == svc.template).count(),
                stats: &st.stats,
                token,
            };
            let mut window = self.windows.remove(name);
            let decision = decide(&canary, &mut window, now);
            if let Some(w) = window {
                self.windows.insert(name.clone(), w);
            }
            if let Err(e) = carry_out(m, token, name, svc, decision).await {
                tracing::warn!(service = %name, error = %e, "updating the rollout failed; retrying");
            }
        }
    }
}

/// Tells a decision's events and writes it, fenced by `token`.
async fn carry_out(m: &Membership, token: Revision, name: &str, svc: &Svc, d: Decision) -> Result<(), StoreError> {
    for (level, kind, message) in d.events {
        m.events.emit(level, kind, Some(name), None, message);
    }
    match d.write {
        Write::Nothing => Ok(()),
        Write::Record { next, consume_command } => {
            let mut ops = vec![put_rollout(name, &next)];
            if consume_command {
                ops.push(TxnOp::Delete(rollout_command_key(name)));
            }
            write(m, token, None, ops).await
        }
        Write::Finish { next, service } => {
            let ops = vec![
                TxnOp::put(&service_key(name), serde_json::to_vec(&service).expect("encodes"), None),
                put_rollout(name, &next),
                TxnOp::Delete(rollout_command_key(name)),
            ];
            write(m, token, Some(Compare::mod_revision(&service_key(name), svc.revision)), ops).await
        }
    }
}

/// One step of a canary's rollout: a pure function of what the pass
/// knows (`c`), the open analysis window (opened, closed and judged here)
/// and the time. No store, no clock: the table and property tests drive it.
pub(crate) fn decide(c: &Canary, window: &mut Option<Window>, now: Now) -> Decision {
    let (name, svc) = (c.name, c.svc);
    let stable = svc.stable.as_ref().expect("a canary has a stable revision");
    let release = &svc.spec.release;
    let current = |r: &&RolloutRecord| r.canary_template == svc.template && r.state.active();
    let Some(rec) = c.record.filter(current) else {
        tracing::info!(service = %name, canary = %svc.template, stable = %stable.template, "canary rollout begins");
        *window = None;
        let rec = RolloutRecord {
            canary_template: svc.template.clone(),
            stable_template: stable.template.clone(),
            canary_spec: StableRecord {
                spec: svc.record.spec.clone(),
                restart_generation: svc.record.restart_generation,
            },
            stable_spec: svc.record.stable.clone().expect("a canary has a stable revision"),
            state: RolloutState::Progressing,
            step: 0,
            started_ms: now.ms,
            step_started_ms: now.ms,
            passed_windows: 0,
            failed_windows: 0,
            windows: Vec::new(),
            reason: "waiting for a canary instance to become ready".into(),
            token: c.token,
        };
        return Decision::write(Write::Record { next: rec, consume_command: false });
    };
    if let Some(cmd) = c.command {
        let end = match cmd {
            RolloutCommand::Promote => End::Promote("promoted by an operator".into()),
            RolloutCommand::Abort => End::RollBack(RolloutState::Aborted, "aborted by an operator".into()),
            RolloutCommand::Pause | RolloutCommand::Resume => {
                let paused = cmd == RolloutCommand::Pause;
                let mut next = rec.clone();
                next.token = c.token;
                next.state = if paused { RolloutState::Paused } else { RolloutState::Progressing };
                next.reason = if paused { "paused by an operator".into() } else { "resumed by an operator".into() };
                // The step's pause counts again from the resume.
                if !paused {
                    next.step_started_ms = now.ms;
                }
                *window = None;
                return Decision::write(Write::Record { next, consume_command: true });
            }
        };
        return finish(c, window, rec, Vec::new(), end);
    }
    if rec.state == RolloutState::Paused {
        return Decision::write(Write::Nothing);
    }
    if c.ready == 0 {
        *window = None;
        if now.ms.saturating_sub(rec.started_ms) > release.progress_deadline.as_millis() as u64 {
            let why =
                format!("no canary instance became ready within {:?} (progress_deadline)", release.progress_deadline);
            return finish(c, window, rec, Vec::new(), End::RollBack(RolloutState::RolledBack, why));
        }
        return Decision::write(Write::Nothing);
    }
    let mut events = Vec::new();
    let mut next = rec.clone();
    next.token = c.token;
    if let Some(w) = close_window(window, c.stats, name, &release.analysis, now) {
        let detail = w.detail.clone();
        tracing::info!(service = %name, step = rec.step, verdict = %w.verdict, %detail, "canary window");
        let verdict = w.verdict;
        next.windows.push(w);
        let excess = next.windows.len().saturating_sub(KEEP_WINDOWS);
        next.windows.drain(..excess);
        let limit = release.analysis.failure_limit;
        match verdict {
            Verdict::Fail => {
                events.push((Level::Warning, EventKind::Rollout, format!("canary window failed: {detail}")));
                next.failed_windows += 1;
                if next.failed_windows >= limit {
                    let why = format!("{} failed windows (failure_limit {limit}); last: {detail}", next.failed_windows);
                    return finish(c, window, &next, events, End::RollBack(RolloutState::RolledBack, why));
                }
                next.reason = format!("window failed ({detail}); {} of {limit} allowed", next.failed_windows);
            }
            Verdict::Hold => next.reason = format!("holding: {detail}"),
            Verdict::Pass => {
                next.passed_windows += 1;
                next.reason = format!("step {}: window passed ({detail})", rec.step + 1);
            }
        }
    }
    if next.windows.is_empty() && next.reason.starts_with("waiting for a canary instance") {
        next.reason = format!("a canary instance is ready; judging windows of {:?}", release.analysis.interval);
    }
    let since_step = Duration::from_millis(now.ms.saturating_sub(rec.step_started_ms));
    match release.strategy {
        Strategy::BlueGreen if rec.step == 0 => {
            let (green, want) = (c.ready, svc.spec.replicas as usize);
            // The whole new set ready, and its cohort's window passed
            // (if it has a cohort): every request goes to it at once.
            if green >= want && (release.cohort.is_none() || next.passed_windows > 0) {
                next.step = 1;
                next.step_started_ms = now.ms;
                next.passed_windows = 0;
                next.reason = format!(
                    "switched: every request to the new set; the old set stays {:?} (scale_down_delay)",
                    release.scale_down_delay
                );
                tracing::info!(service = %name, "blue/green switched");
            } else if green < want {
                next.reason = format!("waiting for the new set: {green} of {want} ready");
            }
        }
        Strategy::BlueGreen => {
            if since_step >= release.scale_down_delay {
                let why = format!("switched {since_step:?} ago; the old set goes");
                return finish(c, window, &next, events, End::Promote(why));
            }
        }
        _ => {
            let pause = release.steps.get(rec.step).map_or(Duration::ZERO, |s| s.pause);
            if next.passed_windows > 0 && since_step >= pause {
                if rec.step + 1 >= release.steps.len() {
                    let why = format!("promoted after {} steps", release.steps.len());
                    return finish(c, window, &next, events, End::Promote(why));
                }
                next.step += 1;
                next.step_started_ms = now.ms;
                next.passed_windows = 0;
                tracing::info!(service = %name, step = next.step, weight = release.steps[next.step].weight, "canary step");
            }
        }
    }
    if next == *rec {
        return Decision { write: Write::Nothing, events };
    }
    Decision { write: Write::Record { next, consume_command: false }, events }
}

/// The window of `service` that closed, judged, if its interval is over
/// (and the next one opened); the first call opens one.
fn close_window(
    window: &mut Option<Window>,
    stats: &BTreeMap<String, NodeStats>,
    service: &str,
    a: &halo_model::release::Analysis,
    now: Now,
) -> Option<WindowRecord> {
    let w = window.get_or_insert_with(|| Window::open(stats, now.at));
    if now.at.saturating_duration_since(w.opened) < a.interval {
        return None;
    }
    let c = w.counts(stats, service);
    *w = Window::open(stats, now.at);
    let (verdict, detail) = judge(&c, a);
    Some(WindowRecord {
        ended_ms: now.ms,
        canary_requests: c.canary.requests,
        canary_errors: c.canary.failed,
        stable_requests: c.stable.requests,
        stable_errors: c.stable.failed,
        verdict,
        detail,
    })
}

/// Ends a rollout: the service record loses its stable revision (kept as
/// the spec on a rollback), written with the rollout record.
fn finish(
    c: &Canary,
    window: &mut Option<Window>,
    rec: &RolloutRecord,
    mut events: Vec<(Level, EventKind, String)>,
    end: End,
) -> Decision {
    *window = None;
    let stable = c.svc.record.stable.clone().expect("a canary has a stable revision");
    let mut next = rec.clone();
    next.token = c.token;
    let service = match &end {
        End::Promote(why) => {
            tracing::info!(service = %c.name, why, "canary promoted");
            events.push((Level::Info, EventKind::Rollout, format!("canary promoted: {why}")));
            next.state = RolloutState::Promoted;
            next.reason = why.clone();
            ServiceRecord { stable: None, ..c.svc.record.clone() }
        }
        End::RollBack(state, why) => {
            tracing::warn!(service = %c.name, why, "canary rolled back");
            events.push((Level::Warning, EventKind::RolledBack, format!("canary rolled back: {why}")));
            next.state = *state;
            next.reason = why.clone();
            ServiceRecord { spec: stable.spec, restart_generation: stable.restart_generation, stable: None }
        }
    };
    Decision { write: Write::Finish { next, service }, events }
}

/// Latencies below this are not compared: the histogram's buckets are too
/// coarse there for a ratio to mean anything.
const LATENCY_FLOOR_S: f64 = 0.005;

/// The 99th percentile of a latency histogram, in seconds.
fn p99(latency: &[u64]) -> Option<f64> {
    halo_proxy::metrics::quantile(latency, 0.99)
}

/// The verdict of one window and what it saw.
fn judge(c: &Counts, a: &halo_model::release::Analysis) -> (Verdict, String) {
    let rate = |n: &Counters| if n.requests == 0 { 0.0 } else { n.failed as f64 / n.requests as f64 };
    let (cr, sr) = (rate(&c.canary), rate(&c.stable));
    let (cp, sp) = (p99(&c.canary.latency), p99(&c.stable.latency));
    let ms = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{:.1}ms", p * 1000.0));
    let seen = format!(
        "canary {} requests, {:.2}% failed, p99 {}; stable {} requests, {:.2}% failed, p99 {}",
        c.canary.requests,
        cr * 100.0,
        ms(cp),
        c.stable.requests,
        sr * 100.0,
        ms(sp)
    );
    if c.canary.requests < a.min_requests {
        return (Verdict::Hold, format!("{seen}; a window needs {} canary requests (min_requests)", a.min_requests));
    }
    if cr > a.max_error_rate {
        return (Verdict::Fail, format!("{seen}; above max_error_rate {:.2}%", a.max_error_rate * 100.0));
    }
    if let Some(ratio) = a.max_error_rate_vs_stable.filter(|_| sr > 0.0) {
        if cr > sr * ratio {
            return (Verdict::Fail, format!("{seen}; above {ratio}x stable's rate (max_error_rate_vs_stable)"));
        }
    }
    if let (Some(ratio), Some(cp), Some(sp)) = (a.max_p99_vs_stable, cp, sp) {
        if cp.max(LATENCY_FLOOR_S) > sp.max(LATENCY_FLOOR_S) * ratio {
            return (Verdict::Fail, format!("{seen}; p99 above {ratio}x stable's (max_p99_vs_stable)"));
        }
    }
    (Verdict::Pass, seen)
}

fn put_rollout(name: &str, rec: &RolloutRecord) -> TxnOp {
    TxnOp::put(&rollout_key(name), serde_json::to_vec(rec).expect("encodes"), None)
}

/// `ops` if this node still leads with `token` (and `also` holds). A
/// refused write is retried on the next pass; a lost leadership is the
/// election loop's to notice.
async fn write(m: &Membership, token: Revision, also: Option<Compare>, ops: Vec<TxnOp>) -> Result<(), StoreError> {
    let mut txn = Txn::new().when(Compare::new(LEADER, CompareOp::Equal, CompareTarget::CreateRevision(token)));
    txn.compares.extend(also);
    txn.success = ops;
    if !m.store.txn(txn).await?.succeeded {
        tracing::debug!("a rollout write was refused (the service changed, or leadership moved)");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
