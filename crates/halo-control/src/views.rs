//! What `halo status`, `halo node list` and `/metrics` show of the
//! cluster, built from the node's view (no store read).

use halo_supervisor::Status;
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Freshness};

/// The cluster as `halo status` and `halo node list` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node answering.
    pub node: String,
    pub leader: Option<String>,
    /// The leader key's create revision.
    pub fencing_token: Option<i64>,
    pub nodes: Vec<NodeView>,
    pub services: Vec<ClusterServiceView>,
    pub placements: Vec<PlacementView>,
    /// How current this view is (it answers while the store is away).
    pub view: Freshness,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub addr: Option<std::net::IpAddr>,
    pub zone: Option<String>,
    pub capacity: Option<u32>,
    /// Holds a live lease.
    pub alive: bool,
    /// The lease it holds (hex, as etcdctl shows it).
    pub lease: Option<String>,
    pub draining: bool,
    pub leader: bool,
    pub placements: usize,
    pub ready: usize,
    /// The drivers that answer on it (`exec`, `docker`).
    pub drivers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterServiceView {
    pub name: String,
    pub replicas: u32,
    pub placed: usize,
    pub ready: usize,
    /// Replicas not placed yet or not ready yet.
    pub pending: usize,
    /// The revision (template) instances should run.
    #[serde(default)]
    pub template: String,
    /// Placements of `template` (the others wait to be replaced, or are a
    /// rollout's stable set).
    #[serde(default)]
    pub current: usize,
    /// Ready placements of `template`.
    #[serde(default)]
    pub current_ready: usize,
    /// A stateful service's primary: instance, node and fencing token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<(String, String, i64)>,
    /// The primary serves (promoted under its token; proxies reach it).
    #[serde(default)]
    pub primary_serving: bool,
    /// The fewest ready instances a drain or an update leaves (its
    /// `[budget]`; without one, every replica).
    #[serde(default)]
    pub min_ready: u32,
    /// How the replica count follows load, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleView>,
}

/// An autoscaled service: its bounds, targets, what was measured, and the
/// leader's last decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscaleView {
    pub min: u32,
    pub max: u32,
    /// Each target and the value per ready instance (p99 in ms).
    pub targets: Vec<crate::keys::Measured>,
    /// Why the count is what it is.
    pub reason: String,
    /// When the count last changed (unix ms; 0: not yet).
    pub changed_ms: u64,
    /// When the leader last measured (unix ms; 0: not yet).
    pub measured_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementView {
    pub id: String,
    pub service: String,
    pub node: String,
    pub ready: bool,
    pub endpoint: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub template: String,
}

impl ClusterView {
    pub fn new(node: &str, st: &ClusterState, view: Freshness) -> ClusterView {
        let leader = st.leader.as_ref().map(|(n, _)| n.clone());
        let mut names: std::collections::BTreeSet<&String> = st.nodes.keys().collect();
        names.extend(st.admin.keys());
        let nodes = names
            .into_iter()
            .map(|name| {
                let rec = st.nodes.get(name);
                let mine = st.assignments.values().filter(|a| &a.placement.node == name);
                let ids: Vec<&String> = mine.map(|a| &a.placement.id).collect();
                NodeView {
                    name: name.clone(),
                    addr: rec.map(|r| r.addr),
                    zone: rec.map(|r| r.zone.clone()),
                    capacity: rec.map(|r| r.capacity),
                    alive: rec.is_some(),
                    lease: st.leases.get(name).map(|l| format!("{l:x}")),
                    draining: st.admin.get(name).is_some_and(|a| a.draining),
                    leader: leader.as_ref() == Some(name),
                    placements: ids.len(),
                    ready: ids.iter().filter(|id| st.endpoints.contains_key(**id)).count(),
                    drivers: rec.map(|r| r.drivers.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let services = st
            .services
            .iter()
            .map(|(name, svc)| {
                let placed: Vec<&crate::scheduler::Placement> =
                    st.assignments.values().filter(|a| &a.placement.service == name).map(|a| &a.placement).collect();
                let is_ready = |p: &&&crate::scheduler::Placement| st.endpoints.contains_key(&p.id);
                let ready = placed.iter().filter(is_ready).count();
                let current: Vec<_> = placed.iter().filter(|p| p.template == svc.template).collect();
                ClusterServiceView {
                    name: name.clone(),
                    replicas: st.replicas(name),
                    placed: placed.len(),
                    ready,
                    pending: (st.replicas(name) as usize).saturating_sub(ready),
                    template: svc.template.clone(),
                    current: current.len(),
                    current_ready: current.iter().filter(|p| st.endpoints.contains_key(&p.id)).count(),
                    primary: st
                        .primaries
                        .get(name)
                        .map(|p| (p.record.instance.clone(), p.record.node.clone(), p.token)),
                    primary_serving: crate::stateful::Stateful::primary_addr(st, name).is_some(),
                    min_ready: svc.spec.floor(st.replicas(name)),
                    autoscale: svc.spec.autoscale.as_ref().map(|a| {
                        let rec = st.scales.get(name);
                        let targets = a.targets.iter().map(|t| crate::keys::Measured {
                            metric: t.name().to_string(),
                            target: t.value(),
                            value: None,
                        });
                        AutoscaleView {
                            min: a.min,
                            max: a.max,
                            targets: rec.map_or_else(|| targets.collect(), |r| r.measured.clone()),
                            reason: rec.map(|r| r.reason.clone()).unwrap_or_default(),
                            changed_ms: rec.map_or(0, |r| r.changed_ms),
                            measured_ms: rec.map_or(0, |r| r.at_ms),
                        }
                    }),
                }
            })
            .collect();
        let placements = st
            .assignments
            .values()
            .map(|a| PlacementView {
                id: a.placement.id.clone(),
                service: a.placement.service.clone(),
                node: a.placement.node.clone(),
                ready: st.endpoints.contains_key(&a.placement.id),
                endpoint: st.endpoints.get(&a.placement.id).map(|(_, e)| e.addr),
                template: a.placement.template.clone(),
            })
            .collect();
        ClusterView {
            node: node.to_string(),
            leader,
            fencing_token: st.leader.as_ref().map(|(_, t)| *t),
            nodes,
            services,
            placements,
            view,
        }
    }

    /// Cluster metrics in Prometheus text format.
    pub fn metrics(&self, w: &mut halo_proxy::metrics::Writer) {
        w.header("halo_cluster_nodes", "gauge", "Nodes by liveness.");
        let alive = self.nodes.iter().filter(|n| n.alive).count();
        w.labelled("halo_cluster_nodes", &[("state", "alive")], alive);
        w.labelled("halo_cluster_nodes", &[("state", "gone")], self.nodes.len() - alive);
        w.header("halo_cluster_leader", "gauge", "Which node leads (1).");
        if let Some(l) = &self.leader {
            w.labelled("halo_cluster_leader", &[("node", l)], 1);
        }
        w.header("halo_cluster_placements", "gauge", "Placements per service and node.");
        let mut counts = std::collections::BTreeMap::new();
        for p in &self.placements {
            *counts.entry((&p.service, &p.node)).or_insert(0) += 1;
        }
        for ((s, n), c) in counts {
            w.labelled("halo_cluster_placements", &[("service", s), ("node", n)], c);
        }
        w.header("halo_cluster_pending", "gauge", "Replicas of each service not ready yet.");
        for s in &self.services {
            w.labelled("halo_cluster_pending", &[("service", &s.name)], s.pending);
        }
        let revision_help = "Store revision this node's view is at.";
        w.single("halo_cluster_view_revision", "gauge", revision_help, self.view.revision);
        let stale_help = "How long this node's view has not followed the store (0: watching).";
        w.single(
            "halo_cluster_view_stale_seconds",
            "gauge",
            stale_help,
            format!("{:.3}", self.view.stale_ms as f64 / 1000.0),
        );
    }
}

/// A service's canary rollout as `halo rollout status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    pub service: String,
    /// `progressing`, `promoted`, `rolled_back`, `aborted`, or `none`.
    pub state: String,
    /// 1-based, of `steps`.
    pub step: usize,
    pub steps: Vec<StepView>,
    /// The canary's share of requests now, in percent (0 until a canary
    /// instance is ready).
    pub weight: u32,
    pub canary: RevisionView,
    pub stable: RevisionView,
    pub passed_windows: u32,
    pub failed_windows: u32,
    pub windows: Vec<crate::keys::WindowRecord>,
    /// What it waits for, or why it ended.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepView {
    pub weight: u32,
    pub pause_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevisionView {
    pub template: String,
    pub placed: usize,
    pub ready: usize,
}

impl RolloutView {
    /// The rollout of `service` in `st`, if it has or had one.
    pub fn new(st: &ClusterState, service: &str) -> Option<RolloutView> {
        let svc = st.services.get(service)?;
        let rec = st.rollouts.get(service);
        let active = st.canary(service);
        if rec.is_none() && active.is_none() {
            return None;
        }
        let revision = |template: &str| RevisionView {
            template: template.to_string(),
            placed: st
                .assignments
                .values()
                .filter(|a| a.placement.service == service && a.placement.template == template)
                .count(),
            ready: st.endpoints.values().filter(|(s, e)| s == service && e.template == template).count(),
        };
        let (canary_t, stable_t) = match (&active, rec) {
            (Some(c), _) => (c.canary_template.clone(), c.stable_template.clone()),
            (None, Some(r)) => (r.canary_template.clone(), r.stable_template.clone()),
            (None, None) => unreachable!("checked above"),
        };
        let canary = revision(&canary_t);
        let state = match (&active, rec) {
            (Some(c), Some(r)) if r.canary_template == c.canary_template && r.state.active() => {
                serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            }
            (Some(_), _) => "progressing".to_string(),
            (None, Some(r)) => {
                serde_json::to_value(r.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            }
            (None, None) => "none".into(),
        };
        let current = rec.filter(|r| r.canary_template == canary_t && (active.is_none() || r.state.active()));
        Some(RolloutView {
            service: service.to_string(),
            state,
            step: active.as_ref().map_or(current.map_or(0, |r| r.step), |c| c.step) + 1,
            steps: svc
                .spec
                .release
                .steps
                .iter()
                .map(|s| StepView { weight: s.weight, pause_ms: s.pause.as_millis() as u64 })
                .collect(),
            weight: active.as_ref().filter(|_| canary.ready > 0).map_or(0, |c| c.weight),
            canary,
            stable: revision(&stable_t),
            passed_windows: current.map_or(0, |r| r.passed_windows),
            failed_windows: current.map_or(0, |r| r.failed_windows),
            windows: current.map(|r| r.windows.clone()).unwrap_or_default(),
            reason: current.map_or_else(|| "waiting for the leader".into(), |r| r.reason.clone()),
        })
    }
}

/// `/v1/status`: this node's instances, the cluster as its view has it,
/// and scheduled backups (when this node runs them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub services: Vec<ServiceStatus>,
    pub cluster: ClusterView,
    pub backup: Option<crate::backup_schedule::BackupHealth>,
}

/// What a change through the API did: `{"name": "web", "outcome": "created"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub name: String,
    pub outcome: String,
}

impl Outcome {
    pub fn new(name: impl Into<String>, outcome: impl Into<String>) -> Outcome {
        Outcome { name: name.into(), outcome: outcome.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Updated,
    Unchanged,
}

impl std::fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Updated => "updated",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

/// What `apply` did, or would do: the stored file before and after.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub name: String,
    pub outcome: ApplyOutcome,
    pub before: Option<String>,
    pub after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub status: Status,
    /// Being drained and stopped.
    pub stopping: bool,
    /// Runs the current spec (false: waiting to be replaced).
    pub current: bool,
    /// A replicated stateful instance's role, as its node published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<RoleView>,
}

/// A stateful instance's role in `halo status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleView {
    pub role: crate::stateful::Role,
    /// The token it serves or follows.
    pub token: i64,
    pub position: Option<u64>,
    /// How far behind the primary's position (replicas).
    pub lag: Option<u64>,
    pub healthy: bool,
    /// A synchronous standby of the current primary (every write it
    /// acknowledges is on this instance, or another standby recorded).
    #[serde(default)]
    pub synchronous: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While the service has no primary: why this one does not take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidacy: Option<String>,
}

impl RoleView {
    /// `id`'s role in `service` as the view has it.
    pub fn of(st: &crate::state::ClusterState, service: &str, id: &str) -> Option<RoleView> {
        let roles = st.roles.get(service)?;
        let r = roles.get(id)?;
        let primary = st.primaries.get(service).and_then(|p| roles.get(&p.record.instance)).and_then(|p| p.position);
        let lag = match r.role {
            crate::stateful::Role::Replica => primary.zip(r.position).map(|(p, m)| p.saturating_sub(m)),
            _ => None,
        };
        Some(RoleView {
            role: r.role,
            token: r.token,
            position: r.position,
            lag,
            healthy: r.healthy,
            synchronous: st
                .sync
                .get(service)
                .is_some_and(|(s, _)| s.token == r.token && s.standbys.iter().any(|x| x == id)),
            reason: r.reason.clone(),
            candidacy: r.candidacy.clone(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub replicas: u32,
    pub ready: usize,
    pub instances: Vec<InstanceView>,
}
