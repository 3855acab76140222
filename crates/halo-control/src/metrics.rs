//! This node's metrics in Prometheus text format: membership and election
//! counters, the view's watch, and the instances it supervises, written
//! with the proxy's one writer (`halo_proxy::metrics::Writer`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use halo_proxy::metrics::Writer;
use halo_supervisor::Status;

use crate::membership::Membership;
use crate::state::View;

/// Membership, election and watch counters of this node.
pub(crate) fn node(w: &mut Writer, m: &Membership, view: &View) {
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
        w.single(&format!("halo_cluster_{name}"), "counter", help, v);
    }
    let gauges = [
        ("is_leader", "Whether this node leads.", i64::from(m.leading().is_some())),
        ("lease_held", "Whether this node holds a fresh lease.", i64::from(m.lease().is_some())),
        ("max_fencing_token", "Highest leader token this node has seen.", m.max_token.load(Relaxed)),
    ];
    for (name, help, v) in gauges {
        w.single(&format!("halo_cluster_{name}"), "gauge", help, v);
    }
}

/// Which other nodes answer this one (a silent node's endpoints are out of
/// this node's proxy).
pub(crate) fn peers(w: &mut Writer, p: &crate::peers::Peers) {
    w.header("halo_cluster_peer_answering", "gauge", "Whether another node's API answers this node.");
    for (node, answering) in p.answering() {
        w.labelled("halo_cluster_peer_answering", &[("node", &node)], i64::from(answering));
    }
}

/// The instances this node supervises.
pub(crate) fn instances(w: &mut Writer, statuses: &[Status]) {
    w.header("halo_instance_restarts_total", "counter", "Restarts of each instance.");
    for s in statuses {
        w.labelled("halo_instance_restarts_total", &[("service", &s.service), ("instance", &s.id)], s.restarts);
    }
    w.header("halo_instance_ready", "gauge", "Whether each instance passes readiness (1) or not (0).");
    for s in statuses {
        w.labelled("halo_instance_ready", &[("service", &s.service), ("instance", &s.id)], u8::from(s.ready));
    }
    w.header("halo_probe_failures_total", "counter", "Failed probe checks of each instance.");
    for s in statuses {
        let f = s.probe_failures;
        for (probe, n) in [("startup", f.startup), ("readiness", f.readiness), ("liveness", f.liveness)] {
            let labels = [("service", s.service.as_str()), ("instance", &s.id), ("probe", probe)];
            w.labelled("halo_probe_failures_total", &labels, n);
        }
    }
    w.header("halo_instance_state", "gauge", "Instances by service and state.");
    let mut counts = BTreeMap::new();
    for s in statuses {
        let state = serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        *counts.entry((s.service.clone(), state)).or_insert(0) += 1;
    }
    for ((service, state), n) in counts {
        w.labelled("halo_instance_state", &[("service", &service), ("state", &state)], n);
    }
}

/// Store requests this node made, by operation.
pub(crate) fn store_requests(w: &mut Writer, counts: &[(&str, u64)]) {
    w.header("halo_store_requests_total", "counter", "Requests this node made to the store, by operation.");
    for (op, n) in counts {
        w.labelled("halo_store_requests_total", &[("op", op)], n);
    }
}

/// Every service's rollout as this node's view has it.
pub(crate) fn rollouts(w: &mut Writer, st: &crate::state::ClusterState) {
    let views: Vec<crate::views::RolloutView> =
        st.services.keys().filter_map(|n| crate::views::RolloutView::new(st, n)).collect();
    w.header("halo_rollout_state", "gauge", "Each service's last rollout by state (1 for its state).");
    for v in &views {
        w.labelled("halo_rollout_state", &[("service", &v.service), ("state", &v.state)], 1);
    }
    w.header("halo_rollout_step", "gauge", "The step a rollout is at (1-based).");
    for v in &views {
        w.labelled("halo_rollout_step", &[("service", &v.service)], v.step);
    }
    w.header("halo_rollout_canary_weight_percent", "gauge", "The canary's share of requests now.");
    for v in &views {
        w.labelled("halo_rollout_canary_weight_percent", &[("service", &v.service)], v.weight);
    }
    w.header("halo_rollout_failed_windows", "gauge", "Analysis windows the rollout failed so far.");
    for v in &views {
        w.labelled("halo_rollout_failed_windows", &[("service", &v.service)], v.failed_windows);
    }
}

/// Scheduled backups on this node.
pub(crate) fn backups(w: &mut Writer, h: &crate::backup_schedule::BackupHealth) {
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
        w.single(name, "gauge", help, v);
    }
    w.single("halo_backup_failures_total", "counter", "Scheduled backups that failed.", h.failures);
}
