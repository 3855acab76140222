//! The cluster as this node sees it: a typed view of every key under
//! [`ROOT`](crate::keys::ROOT), built from one listing and then kept
//! current by one watch of the same prefix (resumed from the last revision
//! seen + 1 when it breaks, listed again when that revision was compacted).
//!
//! One watch over the root rather than one per prefix: the view is then
//! consistent at every revision (a node record and the leader key it
//! precedes never arrive out of order), and a change costs only its own
//! event: no store read at all. A service is parsed once per revision.
//!
//! The leader plans from this view, every node reconciles from it, and the
//! API answers `halo status` and `/metrics` from it, also while the store is
//! unreachable ([`Freshness`] says how stale it is then).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_model::release::Strategy;
use halo_model::{ServiceFile, ServiceSpec};
use halo_store::{Event, EventKind, KeyValue, LeaseId, Listing, Revision, Store, StoreError};
use serde::Serialize;
use tokio::sync::watch;

use crate::keys::{
    Assignment, EndpointRecord, NodeAdmin, NodeRecord, NodeStats, PrimaryRecord, RoleRecord, RolloutCommand,
    RolloutRecord, ServiceRecord, VipCandidate, VipHolder, ASSIGNMENTS, ENDPOINTS, LEADER, NODES, NODE_ADMIN,
    PRIMARIES, ROLES, ROLLOUTS, ROLLOUT_COMMANDS, ROOT, SERVICES, SILENT, STATS, SWITCHOVERS, SYNC, UPGRADING, VIPS,
    VIP_NODES,
};
use crate::keys::{ScaleRecord, SwitchoverRecord, SyncRecord, MAINTENANCE, MAINTENANCE_RESULTS, SCALES};
use crate::scheduler::{CanaryWant, NodeInfo, ServiceWant, Snapshot, StatefulWant};
use halo_model::lock::LockExt;

/// The view's maps: persistent (a copy shares all but what changes), so
/// taking a revision's events costs what they change, not what the
/// cluster holds, while readers keep the revision they took.
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// A stored service, parsed and validated.
#[derive(Debug)]
pub struct Svc {
    /// The mod revision of the service key it was parsed from.
    pub revision: Revision,
    /// As stored.
    pub record: ServiceRecord,
    pub file: ServiceFile,
    pub spec: Arc<ServiceSpec>,
    /// What makes its instances interchangeable ([`ServiceRecord::template`]).
    pub template: String,
    /// While a canary rolls: the revision the stable instances run.
    pub stable: Option<Revisioned>,
}

/// One revision of a service: its template and spec.
#[derive(Debug, Clone)]
pub struct Revisioned {
    pub template: String,
    pub spec: Arc<ServiceSpec>,
}

impl Svc {
    /// The spec instances of `template` run: the current one, or the
    /// stable one during a canary; `None` for any other (being replaced).
    pub fn spec_for(&self, template: &str) -> Option<&Arc<ServiceSpec>> {
        if template == self.template {
            return Some(&self.spec);
        }
        self.stable.as_ref().filter(|s| s.template == template).map(|s| &s.spec)
    }
}

/// A canary in progress, as every node derives it from the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCanary {
    pub canary_template: String,
    pub stable_template: String,
    pub step: usize,
    /// The step's share of requests, in percent.
    pub weight: u32,
    /// Canary instances wanted: the weight's share of the replicas, at least one.
    pub replicas: u32,
}

/// Everything under the root at one revision, typed.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub revision: Revision,
    /// The revision the set of live nodes last changed at (what follows
    /// the node set recomputes only then: [`crate::peers`]' ring).
    pub nodes_revision: Revision,
    /// The revision a node's silence report last changed at.
    pub silent_revision: Revision,
    /// Live nodes (holding a lease), by name.
    pub nodes: Map<String, NodeRecord>,
    /// Each live node's lease.
    pub leases: Map<String, LeaseId>,
    /// Admin records: every node ever registered and not removed.
    pub admin: Map<String, NodeAdmin>,
    /// The leader's name and fencing token.
    pub leader: Option<(String, Revision)>,
    /// Valid services; a stored one that does not validate is logged and left out.
    pub services: Map<String, Arc<Svc>>,
    /// Placements by instance id.
    pub assignments: Map<String, Assignment>,
    /// The mod revision of each assignment (fencing as agents see it).
    pub assigned_at: Map<String, Revision>,
    /// The instance ids assigned to each node: what a node acts on costs
    /// what it runs, not what the cluster runs ([`ClusterState::assigned_to`]).
    by_node: Index,
    /// Ready instances by id: (service, endpoint).
    pub endpoints: Map<String, (String, EndpointRecord)>,
    /// The lease each endpoint is attached to.
    pub endpoint_leases: Map<String, Option<LeaseId>>,
    /// The endpoint ids of each node's instances.
    endpoints_on: Index,
    /// The revision anything the proxies are fed from last changed at
    /// (services, endpoints, rollouts, primaries, roles): a node feeds its
    /// proxy again only when it moved (or its own instances or silent
    /// nodes changed).
    pub routing_revision: Revision,
    /// The revision a service or rollout record last changed at (what a
    /// proxy's routes and upstreams are built from).
    pub layout_revision: Revision,
    /// The endpoint ids of each service.
    endpoints_by_service: Index,
    /// The last [`ROUTING_LOG`] routing changes: (revision, service).
    routing_log: imbl::OrdSet<(Revision, String)>,
    /// Changes at or before this revision may be missing from the log.
    routing_log_floor: Revision,
    /// Canary rollouts by service.
    pub rollouts: BTreeMap<String, RolloutRecord>,
    /// Operators' orders waiting for the leader, by service.
    pub rollout_commands: BTreeMap<String, RolloutCommand>,
    /// Each node's proxy counters of the upstreams in a rollout or of
    /// autoscaled services.
    pub stats: BTreeMap<String, NodeStats>,
    /// Autoscaled services' replica counts as the leader decided them.
    pub scales: BTreeMap<String, ScaleRecord>,
    /// The rolling maintenance, if one was asked for, with its revision.
    pub maintenance: Option<(crate::keys::MaintenanceRecord, Revision)>,
    /// Each node's last maintenance command result.
    pub maintenance_results: BTreeMap<String, crate::keys::MaintenanceResult>,
    /// The nodes each node finds silent, by reporting node.
    pub silent: BTreeMap<String, BTreeSet<String>>,
    /// Nodes handing over to a new process (binary upgrade).
    pub upgrading: BTreeSet<String>,
    /// Floating IPs held, by address: the holder and its fencing token.
    pub vips: BTreeMap<String, HeldVip>,
    /// Each floating IP's candidate nodes, by address then node.
    pub vip_candidates: BTreeMap<String, BTreeMap<String, VipCandidate>>,
    /// Each stateful service's primary, by service.
    pub primaries: BTreeMap<String, HeldPrimary>,
    /// Each stateful instance's role as its node published it, by service
    /// then instance.
    pub roles: Map<String, BTreeMap<String, RoleRecord>>,
    /// Each synchronous service's standbys, with the key's mod revision.
    pub sync: BTreeMap<String, (SyncRecord, Revision)>,
    /// Switchovers asked for, by service.
    pub switchovers: BTreeMap<String, SwitchoverRecord>,
}

/// A stateful service's primary as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPrimary {
    pub record: PrimaryRecord,
    /// The key's create revision: the primary's fencing token.
    pub token: Revision,
    pub lease: Option<LeaseId>,
}

/// A floating IP's holder as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldVip {
    pub holder: VipHolder,
    /// The key's create revision.
    pub token: Revision,
    pub lease: Option<LeaseId>,
}

/// Ids by what they belong to (a node, a service).
type Index = Map<String, imbl::OrdSet<String>>;

fn index(ix: &mut Index, key: &str, id: &str) {
    ix.entry(key.to_string()).or_default().insert(id.to_string());
}

fn unindex(ix: &mut Index, key: &str, id: &str) {
    if let Some(ids) = ix.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            ix.remove(key);
        }
    }
}

/// The entries of `map` that `ix` files under `key`.
fn indexed<'a, V: Clone>(
    ix: &'a Index,
    key: &str,
    map: &'a Map<String, V>,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    ix.get(key).into_iter().flatten().filter_map(|id| map.get_key_value(id))
}

/// How many routing changes the view remembers ([`ClusterState::routed_since`]).
const ROUTING_LOG: usize = 4096;

/// The service a key routes (its record, endpoints, rollout, primary or
/// roles), if it is one of those.
fn routed_service(key: &str) -> Option<&str> {
    let rest = [SERVICES, ENDPOINTS, ROLLOUTS, PRIMARIES, ROLES].iter().find_map(|p| key.strip_prefix(p))?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The last path segment: the name or id a key is for.
fn last(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

impl ClusterState {
    /// The state of a listing of the root; services unchanged since `prev`
    /// are not parsed again.
    pub fn from_listing(listing: &Listing, prev: Option<&ClusterState>) -> ClusterState {
        let mut st = ClusterState::default();
        for kv in &listing.kvs {
            st.put(kv, prev);
        }
        st.revision = listing.revision;
        st.nodes_revision = listing.revision;
        st.silent_revision = listing.revision;
        st.routing_revision = listing.revision;
        st.layout_revision = listing.revision;
        st.routing_log_floor = listing.revision;
        st
    }

    /// Applies one revision's events, in order.
    pub fn apply(&mut self, batch: &[Event]) {
        for e in batch {
            match e.kind {
                EventKind::Put => self.put(&e.kv, None),
                EventKind::Delete => self.delete(&e.kv.key),
            }
            let key = e.kv.key.as_str();
            if key.starts_with(NODES) {
                self.nodes_revision = e.kv.mod_revision;
            }
            if key.starts_with(SILENT) {
                self.silent_revision = e.kv.mod_revision;
            }
            if let Some(service) = routed_service(key) {
                self.routing_revision = e.kv.mod_revision;
                self.routing_log.insert((e.kv.mod_revision, service.to_string()));
                if self.routing_log.len() > ROUTING_LOG {
                    if let Some((rev, _)) = self.routing_log.remove_min() {
                        self.routing_log_floor = self.routing_log_floor.max(rev);
                    }
                }
            }
            if key.starts_with(SERVICES) || key.starts_with(ROLLOUTS) {
                self.layout_revision = e.kv.mod_revision;
            }
            self.revision = self.revision.max(e.kv.mod_revision);
        }
    }

    fn put(&mut self, kv: &KeyValue, prev: Option<&ClusterState>) {
        let key = kv.key.as_str();
        if let Some(name) = key.strip_prefix(NODES) {
            if let Ok(r) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                match kv.lease {
                    Some(l) => self.leases.insert(name.to_string(), l),
                    None => self.leases.remove(name),
                };
                self.nodes.insert(name.to_string(), r);
            }
        } else if let Some(name) = key.strip_prefix(NODE_ADMIN) {
            if let Ok(a) = serde_json::from_slice::<NodeAdmin>(&kv.value) {
                self.admin.insert(name.to_string(), a);
            }
        } else if key == LEADER {
            self.leader = Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.create_revision));
        } else if let Some(name) = key.strip_prefix(SERVICES) {
            let cached = prev.and_then(|p| p.services.get(name)).filter(|s| s.revision == kv.mod_revision);
            match cached.cloned().map(Ok).unwrap_or_else(|| parse_service(kv)) {
                Ok(svc) => {
                    self.services.insert(name.to_string(), svc);
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "stored service is not valid; ignored");
                    self.services.remove(name);
                }
            }
        } else if key.starts_with(ASSIGNMENTS) {
            if let Ok(a) = serde_json::from_slice::<Assignment>(&kv.value) {
                self.assign(a, kv.mod_revision);
            }
        } else if let Some(rest) = key.strip_prefix(ENDPOINTS) {
            let Some((service, id)) = rest.split_once('/') else { return };
            if let Ok(e) = serde_json::from_slice::<EndpointRecord>(&kv.value) {
                self.remove_endpoint(id);
                self.endpoint_leases.insert(id.to_string(), kv.lease);
                index(&mut self.endpoints_on, &e.node, id);
                index(&mut self.endpoints_by_service, service, id);
                self.endpoints.insert(id.to_string(), (service.to_string(), e));
            }
        } else if let Some(name) = key.strip_prefix(ROLLOUTS) {
            if let Ok(r) = serde_json::from_slice::<RolloutRecord>(&kv.value) {
                self.rollouts.insert(name.to_string(), r);
            }
        } else if let Some(name) = key.strip_prefix(ROLLOUT_COMMANDS) {
            if let Ok(c) = serde_json::from_slice::<RolloutCommand>(&kv.value) {
                self.rollout_commands.insert(name.to_string(), c);
            }
        } else if let Some(node) = key.strip_prefix(STATS) {
            if let Ok(n) = serde_json::from_slice::<NodeStats>(&kv.value) {
                self.stats.insert(node.to_string(), n);
            }
        } else if let Some(service) = key.strip_prefix(SCALES) {
            if let Ok(r) = serde_json::from_slice::<ScaleRecord>(&kv.value) {
                self.scales.insert(service.to_string(), r);
            }
        } else if key == MAINTENANCE {
            if let Ok(r) = serde_json::from_slice(&kv.value) {
                self.maintenance = Some((r, kv.mod_revision));
            }
        } else if let Some(node) = key.strip_prefix(MAINTENANCE_RESULTS) {
            if let Ok(r) = serde_json::from_slice(&kv.value) {
                self.maintenance_results.insert(node.to_string(), r);
            }
        } else if let Some(node) = key.strip_prefix(UPGRADING) {
            self.upgrading.insert(node.to_string());
        } else if let Some(node) = key.strip_prefix(SILENT) {
            if let Ok(s) = serde_json::from_slice::<BTreeSet<String>>(&kv.value) {
                self.silent.insert(node.to_string(), s);
            }
        } else if let Some(ip) = key.strip_prefix(VIPS) {
            if let Ok(holder) = serde_json::from_slice::<VipHolder>(&kv.value) {
                self.vips.insert(ip.to_string(), HeldVip { holder, token: kv.create_revision, lease: kv.lease });
            }
        } else if let Some((ip, node)) = key.strip_prefix(VIP_NODES).and_then(|r| r.split_once('/')) {
            if let Ok(c) = serde_json::from_slice::<VipCandidate>(&kv.value) {
                self.vip_candidates.entry(ip.to_string()).or_default().insert(node.to_string(), c);
            }
        } else if let Some(service) = key.strip_prefix(PRIMARIES) {
            if let Ok(record) = serde_json::from_slice::<PrimaryRecord>(&kv.value) {
                let held = HeldPrimary { record, token: kv.create_revision, lease: kv.lease };
                self.primaries.insert(service.to_string(), held);
            }
        } else if let Some((service, id)) = key.strip_prefix(ROLES).and_then(|r| r.split_once('/')) {
            if let Ok(r) = serde_json::from_slice::<RoleRecord>(&kv.value) {
                self.roles.entry(service.to_string()).or_default().insert(id.to_string(), r);
            }
        } else if let Some(service) = key.strip_prefix(SYNC) {
            if let Ok(r) = serde_json::from_slice::<SyncRecord>(&kv.value) {
                self.sync.insert(service.to_string(), (r, kv.mod_revision));
            }
        } else if let Some(service) = key.strip_prefix(SWITCHOVERS) {
            if let Ok(r) = serde_json::from_slice::<SwitchoverRecord>(&kv.value) {
                self.switchovers.insert(service.to_string(), r);
            }
        }
    }

    fn delete(&mut self, key: &str) {
        let id = last(key);
        if key.starts_with(NODES) {
            self.nodes.remove(id);
            self.leases.remove(id);
        } else if key.starts_with(NODE_ADMIN) {
            self.admin.remove(id);
        } else if key == LEADER {
            self.leader = None;
        } else if key.starts_with(SERVICES) {
            self.services.remove(id);
        } else if key.starts_with(ASSIGNMENTS) {
            self.unassign(id);
        } else if key.starts_with(ENDPOINTS) {
            self.remove_endpoint(id);
        } else if key.starts_with(ROLLOUTS) {
            self.rollouts.remove(id);
        } else if key.starts_with(ROLLOUT_COMMANDS) {
            self.rollout_commands.remove(id);
        } else if key.starts_with(STATS) {
            self.stats.remove(id);
        } else if let Some(service) = key.strip_prefix(SCALES) {
            self.scales.remove(service);
        } else if key == MAINTENANCE {
            self.maintenance = None;
        } else if let Some(node) = key.strip_prefix(MAINTENANCE_RESULTS) {
            self.maintenance_results.remove(node);
        } else if key.starts_with(SILENT) {
            self.silent.remove(id);
        } else if key.starts_with(UPGRADING) {
            self.upgrading.remove(id);
        } else if let Some(ip) = key.strip_prefix(VIPS) {
            self.vips.remove(ip);
        } else if let Some((ip, node)) = key.strip_prefix(VIP_NODES).and_then(|r| r.split_once('/')) {
            if let Some(c) = self.vip_candidates.get_mut(ip) {
                c.remove(node);
                if c.is_empty() {
                    self.vip_candidates.remove(ip);
                }
            }
        } else if let Some(service) = key.strip_prefix(PRIMARIES) {
            self.primaries.remove(service);
        } else if let Some(service) = key.strip_prefix(SYNC) {
            self.sync.remove(service);
        } else if let Some(service) = key.strip_prefix(SWITCHOVERS) {
            self.switchovers.remove(service);
        } else if let Some((service, id)) = key.strip_prefix(ROLES).and_then(|r| r.split_once('/')) {
            if let Some(r) = self.roles.get_mut(service) {
                r.remove(id);
                if r.is_empty() {
                    self.roles.remove(service);
                }
            }
        }
    }

    /// Records assignment `a`, written at revision `at`.
    pub fn assign(&mut self, a: Assignment, at: Revision) {
        let id = a.placement.id.clone();
        self.unassign(&id);
        index(&mut self.by_node, &a.placement.node, &id);
        self.assigned_at.insert(id.clone(), at);
        self.assignments.insert(id, a);
    }

    fn unassign(&mut self, id: &str) {
        self.assigned_at.remove(id);
        let Some(old) = self.assignments.remove(id) else { return };
        unindex(&mut self.by_node, &old.placement.node, id);
    }

    fn remove_endpoint(&mut self, id: &str) {
        self.endpoint_leases.remove(id);
        let Some((service, old)) = self.endpoints.remove(id) else { return };
        unindex(&mut self.endpoints_on, &old.node, id);
        unindex(&mut self.endpoints_by_service, &service, id);
    }

    /// The endpoints of `service`'s instances: (id, (service, record)).
    pub fn endpoints_of_service<'a>(
        &'a self,
        service: &str,
    ) -> impl Iterator<Item = (&'a String, &'a (String, EndpointRecord))> + 'a {
        indexed(&self.endpoints_by_service, service, &self.endpoints)
    }

    /// The services whose routing changed after revision `since`; `None`
    /// when the log does not reach back that far.
    pub fn routed_since(&self, since: Revision) -> Option<BTreeSet<String>> {
        if since < self.routing_log_floor {
            return None;
        }
        let from = (since + 1, String::new());
        Some(self.routing_log.range(from..).map(|(_, s)| s.clone()).collect())
    }

    /// The endpoints of `node`'s instances: (id, (service, record)).
    pub fn endpoints_of<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = (&'a String, &'a (String, EndpointRecord))> + 'a {
        indexed(&self.endpoints_on, node, &self.endpoints)
    }

    /// The assignments to `node`, by instance id.
    pub fn assigned_to<'a>(&'a self, node: &str) -> impl Iterator<Item = (&'a String, &'a Assignment)> + 'a {
        indexed(&self.by_node, node, &self.assignments)
    }

    /// The canary of `service` in progress, if any: the service has a
    /// stable revision beside its current one (the leader may not have
    /// written its rollout record yet: then it is at its first step).
    pub fn canary(&self, service: &str) -> Option<ActiveCanary> {
        let svc = self.services.get(service)?;
        let stable = svc.stable.as_ref()?;
        let steps = &svc.spec.release.steps;
        // An ended record cleared `stable` in the same write: a stable
        // revision beside an ended record is a new rollout, at its start.
        let rec = self.rollouts.get(service).filter(|r| r.canary_template == svc.template && r.state.active());
        let step = rec.map_or(0, |r| r.step);
        let (weight, replicas) = if svc.spec.release.strategy == Strategy::BlueGreen {
            // The whole new set from the start; every request once switched (step 1).
            (if step >= 1 { 100 } else { 0 }, svc.spec.replicas)
        } else {
            let step = step.min(steps.len().saturating_sub(1));
            let weight = steps.get(step).map_or(100, |s| s.weight);
            (weight, (u64::from(svc.spec.replicas) * u64::from(weight)).div_ceil(100).max(1) as u32)
        };
        Some(ActiveCanary {
            canary_template: svc.template.clone(),
            stable_template: stable.template.clone(),
            step,
            weight,
            replicas,
        })
    }

    /// What the scheduler decides from.
    /// The replicas `name` asks for now: its file's, or, autoscaled, the
    /// leader's last decision within the file's bounds.
    pub fn replicas(&self, name: &str) -> u32 {
        let Some(s) = self.services.get(name) else { return 0 };
        match &s.spec.autoscale {
            Some(a) => self.scales.get(name).map_or(s.spec.replicas, |r| r.replicas).clamp(a.min, a.max),
            None => s.spec.replicas,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            nodes: self
                .nodes
                .values()
                .map(|n| {
                    let draining = self.admin.get(&n.name).is_some_and(|a| a.draining);
                    let info =
                        NodeInfo { zone: n.zone.clone(), capacity: n.capacity, draining, drivers: n.drivers.clone() };
                    (n.name.clone(), info)
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|(n, s)| {
                    let driver = |t: &str| s.spec_for(t).unwrap_or(&s.spec).run.driver.name().to_string();
                    let stateful = s.spec.stateful.as_ref().map(|x| StatefulWant {
                        replace_after: x.replace_after,
                        primary: self.primaries.get(n).map(|p| p.record.instance.clone()),
                    });
                    let replicas = self.replicas(n);
                    let min_ready = s.spec.budget.map(|b| b.floor(replicas));
                    let want = match self.canary(n).filter(|_| stateful.is_none()) {
                        Some(c) => ServiceWant {
                            replicas,
                            driver: driver(&c.stable_template),
                            template: c.stable_template,
                            canary: Some(CanaryWant {
                                driver: driver(&c.canary_template),
                                template: c.canary_template,
                                replicas: c.replicas,
                                nodes: s.spec.release.canary_nodes.clone(),
                                zone: s.spec.release.canary_zone.clone(),
                            }),
                            stateful: None,
                            min_ready,
                        },
                        None => ServiceWant {
                            replicas,
                            template: s.template.clone(),
                            driver: driver(&s.template),
                            canary: None,
                            stateful,
                            min_ready,
                        },
                    };
                    (n.clone(), want)
                })
                .collect(),
            placements: self.assignments.iter().map(|(id, a)| (id.clone(), a.placement.clone())).collect(),
            ready: self.endpoints.keys().filter(|id| self.assignments.contains_key(*id)).cloned().collect(),
            gone_for: BTreeMap::new(),
        }
    }
}

fn parse_service(kv: &KeyValue) -> Result<Arc<Svc>, String> {
    let record = serde_json::from_slice::<ServiceRecord>(&kv.value).map_err(|e| e.to_string())?;
    let (file, spec) = halo_model::parse_stored_service(&kv.key, &record.spec).map_err(|e| e.to_string())?;
    let template = ServiceRecord::template(&file, record.restart_generation);
    let stable = match &record.stable {
        Some(st) => {
            let (f, s) =
                halo_model::parse_stored_service(&kv.key, &st.spec).map_err(|e| format!("stable revision: {e}"))?;
            Some(Revisioned { template: ServiceRecord::template(&f, st.restart_generation), spec: Arc::new(s) })
        }
        None => None,
    };
    Ok(Arc::new(Svc { revision: kv.mod_revision, record, file, spec: Arc::new(spec), template, stable }))
}

/// The whole state in one listing (tests and tools; nodes use [`View`]).
pub async fn read_state(store: &dyn Store) -> Result<ClusterState, StoreError> {
    Ok(ClusterState::from_listing(&store.list(ROOT).await?, None))
}

/// How current the view is.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Freshness {
    /// The store revision the view is at.
    pub revision: Revision,
    /// The watch is up: the view follows every change as it happens.
    pub watching: bool,
    /// The store answered lately (this node's lease renewals succeed). A
    /// watch can stay open and silent on a member that lost its cluster.
    pub store_reachable: bool,
    /// Milliseconds the view may have missed changes for: since the watch
    /// broke or the store last answered, whichever is earlier (0 while
    /// both are fine).
    pub stale_ms: u64,
}

struct Health {
    watching: bool,
    since: Instant,
}

/// The shared, watch-fed view of the cluster.
pub struct View {
    state: Mutex<Arc<ClusterState>>,
    changed: watch::Sender<Revision>,
    health: Mutex<Health>,
    /// Watches resumed after breaking.
    pub watch_restarts: AtomicU64,
    /// The task that follows the store.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl View {
    /// Stops following the store (the node is handed over).
    pub fn stop(&self) {
        if let Some(t) = self.follower.locked().take() {
            t.abort();
        }
    }

    /// Lists the root once (so the view is complete when this returns),
    /// then follows it in a task of its own.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<View>, StoreError> {
        let listing = store.list(ROOT).await?;
        let st = ClusterState::from_listing(&listing, None);
        let view = Arc::new(View {
            changed: watch::channel(st.revision).0,
            state: Mutex::new(Arc::new(st)),
            health: Mutex::new(Health { watching: true, since: Instant::now() }),
            watch_restarts: AtomicU64::new(0),
            follower: Mutex::new(None),
        });
        let v = view.clone();
        let task = tokio::spawn(follow(store, ROOT, listing.revision + 1, move |feed| v.feed(feed)));
        *view.follower.locked() = Some(task);
        Ok(view)
    }

    /// The state now (a snapshot: later changes do not show in it).
    pub fn current(&self) -> Arc<ClusterState> {
        self.state.locked().clone()
    }

    /// Changes on every revision the view takes in.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.changed.subscribe()
    }

    /// How current the view is; `answered` is when the store last
    /// answered this node and `patience` how long a silence is normal.
    pub fn freshness(&self, answered: Option<Instant>, patience: Duration) -> Freshness {
        let revision = self.current().revision;
        let h = self.health.locked();
        let silent = answered.map_or(Duration::MAX, |t| t.elapsed());
        let store_reachable = silent <= patience;
        let stale = match (h.watching, store_reachable) {
            (true, true) => Duration::ZERO,
            (true, false) => silent,
            (false, true) => h.since.elapsed(),
            (false, false) => h.since.elapsed().max(silent),
        };
        Freshness {
            revision,
            watching: h.watching,
            store_reachable,
            stale_ms: stale.as_millis().min(u64::MAX as u128) as u64,
        }
    }

    /// Whether the watch is up.
    pub fn watching(&self) -> bool {
        self.health.locked().watching
    }

    fn set_watching(&self, watching: bool) {
        let mut h = self.health.locked();
        if h.watching != watching || watching {
            *h = Health { watching, since: Instant::now() };
        }
    }

    fn feed(&self, feed: Feed<'_>) {
        let revision = {
            let mut guard = self.state.locked();
            match feed {
                Feed::Listing(l) => *guard = Arc::new(ClusterState::from_listing(l, Some(&guard))),
                // Events change nothing the control plane acts on: no copy
                // of the state, no wake-up of everything that follows it.
                Feed::Events(batch) if batch.iter().all(|e| e.kv.key.starts_with(crate::keys::EVENTS)) => return,
                Feed::Events(batch) => Arc::make_mut(&mut guard).apply(batch),
                Feed::Watching => {
                    drop(guard);
                    return self.set_watching(true);
                }
                Feed::Broken => {
                    drop(guard);
                    self.watch_restarts.fetch_add(1, Ordering::Relaxed);
                    return self.set_watching(false);
                }
            }
            guard.revision
        };
        self.set_watching(true);
        self.changed.send_replace(revision);
    }
}

/// What [`follow`] hands its callback.
pub enum Feed<'a> {
    /// A full listing of the prefix (at the start, and after compaction).
    Listing(&'a Listing),
    /// One revision's events.
    Events(&'a [Event]),
    /// The watch is (again) established: the view is current.
    Watching,
    /// The watch broke; it is being resumed.
    Broken,
}

/// Follows `prefix` from revision `from` (0: list it first). A broken
/// watch resumes from the last revision seen + 1; when that revision was
/// compacted, it lists again and watches from the listing's revision + 1.
pub async fn follow(store: Arc<dyn Store>, prefix: &'static str, from: Revision, mut on: impl FnMut(Feed<'_>) + Send) {
    let mut next: Revision = from;
    loop {
        if next == 0 {
            match store.list(prefix).await {
                Ok(l) => {
                    next = l.revision + 1;
                    on(Feed::Listing(&l));
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
        }
        match store.watch(prefix, next).await {
            Ok(mut w) => {
                on(Feed::Watching);
                while let Some(batch) = w.next().await {
                    if let Some(e) = batch.first() {
                        next = e.kv.mod_revision + 1;
                    }
                    on(Feed::Events(&batch));
                }
                tracing::debug!(prefix, next, "watch ended; resuming");
            }
            Err(StoreError::Compacted { .. }) => {
                tracing::info!(prefix, next, "watch revision compacted; listing again");
                next = 0;
            }
            Err(e) => {
                tracing::debug!(prefix, error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        on(Feed::Broken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{assignment_key, endpoint_key};
    use crate::scheduler::Placement;

    fn put(key: String, value: Vec<u8>, rev: Revision) -> Event {
        let kv = KeyValue { key, value, create_revision: rev, mod_revision: rev, version: 1, lease: None };
        Event { kind: EventKind::Put, kv }
    }

    fn del(key: String, rev: Revision) -> Event {
        let kv = KeyValue { key, value: Vec::new(), create_revision: 0, mod_revision: rev, version: 0, lease: None };
        Event { kind: EventKind::Delete, kv }
    }

    fn assignment(id: &str, node: &str) -> Vec<u8> {
        let placement = Placement { id: id.into(), service: "web".into(), template: "t".into(), node: node.into() };
        serde_json::to_vec(&Assignment { placement, token: 1 }).unwrap()
    }

    fn endpoint(node: &str) -> Vec<u8> {
        let e = EndpointRecord { node: node.into(), addr: "127.0.0.1:1".parse().unwrap(), template: "t".into() };
        serde_json::to_vec(&e).unwrap()
    }

    #[test]
    fn what_each_node_runs_is_indexed_as_it_changes() {
        let mut st = ClusterState::default();
        st.apply(&[put(assignment_key("n1", "web-1"), assignment("web-1", "n1"), 2)]);
        st.apply(&[put(assignment_key("n1", "web-2"), assignment("web-2", "n1"), 3)]);
        st.apply(&[put(endpoint_key("web", "web-1"), endpoint("n1"), 4)]);
        let on = |st: &ClusterState, n: &str| st.assigned_to(n).map(|(id, _)| id.clone()).collect::<Vec<_>>();
        assert_eq!(on(&st, "n1"), ["web-1", "web-2"]);
        assert_eq!(st.endpoints_of("n1").count(), 1);
        assert_eq!(st.routing_revision, 4);
        // Written again for another node, then deleted.
        st.apply(&[put(assignment_key("n2", "web-2"), assignment("web-2", "n2"), 5)]);
        assert_eq!((on(&st, "n1"), on(&st, "n2")), (vec!["web-1".to_string()], vec!["web-2".to_string()]));
        st.apply(&[del(assignment_key("n1", "web-1"), 6), del(endpoint_key("web", "web-1"), 6)]);
        assert!(on(&st, "n1").is_empty() && st.endpoints_of("n1").count() == 0);
        assert_eq!(st.assigned_at.len(), 1);
        assert_eq!(st.routing_revision, 6, "an endpoint went");
    }
}
