//! This node's metrics in Prometheus text format: membership and election
//! counters, the view's watch, and the instances it supervises.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use halo_supervisor::Status;

use crate::membership::Membership;
use crate::state::View;

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Membership, election and watch counters of this node.
pub(crate) fn node(m: &Membership, view: &View) -> String {
    let mut out = String::new();
    let c = &m.counters;
    let watch_restarts = view.watch_restarts.load(Relaxed);
    let counters = [
        ("lease_renew_failures_total", "Failed renewals of this node's lease.", c.lease_renew_failures.load(Relaxed)),
        ("leases_granted_total", "Leases this node registered under.", c.leases_granted.load(Relaxed)),
        ("watch_restarts_total", "Store watches resumed after breaking.", watch_restarts),
        ("elections_won_total", "Times this node became leader.", c.elections_won.load(Relaxed)),
        ("step_downs_total", "Times this node stopped leading.", c.step_downs.load(Relaxed)),
        ("fenced_writes_total", "Leader writes refused by the fencing check.", c.fenced_writes.load(Relaxed)),
        (
            "stale_orders_ignored_total",
            "Assignments of a deposed leader not obeyed.",
            c.stale_orders_ignored.load(Relaxed),
        ),
        ("evictions_total", "Silent nodes' leases this node revoked.", c.evictions.load(Relaxed)),
    ];
    for (name, help, v) in counters {
        metric(&mut out, &format!("halo_cluster_{name}"), "counter", help);
        let _ = writeln!(out, "halo_cluster_{name} {v}");
    }
    let gauges = [
        ("is_leader", "Whether this node leads.", i64::from(m.leading().is_some())),
        ("lease_held", "Whether this node holds a fresh lease.", i64::from(m.lease().is_some())),
        ("max_fencing_token", "Highest leader token this node has seen.", m.max_token.load(Relaxed)),
    ];
    for (name, help, v) in gauges {
        metric(&mut out, &format!("halo_cluster_{name}"), "gauge", help);
        let _ = writeln!(out, "halo_cluster_{name} {v}");
    }
    out
}

/// Which other nodes answer this one (a silent node's endpoints are out of
/// this node's proxy).
pub(crate) fn peers(p: &crate::peers::Peers) -> String {
    let mut out = String::new();
    metric(&mut out, "halo_cluster_peer_answering", "gauge", "Whether another node's API answers this node.");
    for (node, answering) in p.answering() {
        let _ = writeln!(out, "halo_cluster_peer_answering{{node=\"{node}\"}} {}", i64::from(answering));
    }
    out
}

/// The instances this node supervises.
pub(crate) fn instances(statuses: &[Status]) -> String {
    let mut out = String::new();
    metric(&mut out, "halo_instance_restarts_total", "counter", "Restarts of each instance.");
    for s in statuses {
        let _ = writeln!(
            out,
            "halo_instance_restarts_total{{service=\"{}\",instance=\"{}\"}} {}",
            s.service, s.id, s.restarts
        );
    }
    metric(&mut out, "halo_instance_ready", "gauge", "Whether each instance passes readiness (1) or not (0).");
    for s in statuses {
        let _ = writeln!(
            out,
            "halo_instance_ready{{service=\"{}\",instance=\"{}\"}} {}",
            s.service,
            s.id,
            u8::from(s.ready)
        );
    }
    metric(&mut out, "halo_probe_failures_total", "counter", "Failed probe checks of each instance.");
    for s in statuses {
        let f = s.probe_failures;
        for (probe, n) in [("startup", f.startup), ("readiness", f.readiness), ("liveness", f.liveness)] {
            let _ = writeln!(
                out,
                "halo_probe_failures_total{{service=\"{}\",instance=\"{}\",probe=\"{probe}\"}} {n}",
                s.service, s.id
            );
        }
    }
    metric(&mut out, "halo_instance_state", "gauge", "Instances by service and state.");
    let mut counts = BTreeMap::new();
    for s in statuses {
        let state = serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        *counts.entry((s.service.clone(), state)).or_insert(0) += 1;
    }
    for ((service, state), n) in counts {
        let _ = writeln!(out, "halo_instance_state{{service=\"{service}\",state=\"{state}\"}} {n}");
    }
    out
}

/// Store requests this node made, by operation.
pub(crate) fn store_requests(counts: &[(&str, u64)]) -> String {
    let mut out = String::new();
    metric(&mut out, "halo_store_requests_total", "counter", "Requests this node made to the store, by operation.");
    for (op, n) in counts {
        let _ = writeln!(out, "halo_store_requests_total{{op=\"{op}\"}} {n}");
    }
    out
}

/// Every service's rollout as this node's view has it.
pub(crate) fn rollouts(st: &crate::state::ClusterState) -> String {
    let mut out = String::new();
    let views: Vec<crate::views::RolloutView> =
        st.services.keys().filter_map(|n| crate::views::RolloutView::new(st, n)).collect();
    metric(&mut out, "halo_rollout_state", "gauge", "Each service's last rollout by state (1 for its state).");
    for v in &views {
        let _ = writeln!(out, "halo_rollout_state{{service=\"{}\",state=\"{}\"}} 1", v.service, v.state);
    }
    metric(&mut out, "halo_rollout_step", "gauge", "The step a rollout is at (1-based).");
    for v in &views {
        let _ = writeln!(out, "halo_rollout_step{{service=\"{}\"}} {}", v.service, v.step);
    }
    metric(&mut out, "halo_rollout_canary_weight_percent", "gauge", "The canary's share of requests now.");
    for v in &views {
        let _ = writeln!(out, "halo_rollout_canary_weight_percent{{service=\"{}\"}} {}", v.service, v.weight);
    }
    metric(&mut out, "halo_rollout_failed_windows", "gauge", "Analysis windows the rollout failed so far.");
    for v in &views {
        let _ = writeln!(out, "halo_rollout_failed_windows{{service=\"{}\"}} {}", v.service, v.failed_windows);
    }
    out
}

/// Scheduled backups on this node.
pub(crate) fn backups(h: &crate::backup_schedule::BackupHealth) -> String {
    let mut out = String::new();
    let gauges = [
        (
            "halo_backup_last_success_timestamp_seconds",
            "When the last scheduled backup was written and verified.",
            h.last_success.unwrap_or(0),
        ),
        ("halo_backup_last_size_bytes", "Size of the last scheduled backup.", h.last_size),
        (
            "halo_backup_last_duration_milliseconds",
            "How long the last scheduled backup took, verification included.",
            h.last_duration_ms,
        ),
        (
            "halo_backup_overdue",
            "No scheduled backup succeeded within two intervals while this node leads.",
            u64::from(h.overdue),
        ),
    ];
    for (name, help, v) in gauges {
        metric(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    metric(&mut out, "halo_backup_failures_total", "counter", "Scheduled backups that failed.");
    let _ = writeln!(out, "halo_backup_failures_total {}", h.failures);
    out
}
