//! The scheduler: a pure function from a state snapshot to a placement
//! plan. No I/O, no clock, no randomness: the same snapshot always gives
//! the same plan, which makes it testable in memory (see the tests below)
//! and safe to rerun after a failed write.
//!
//! Rules, per service:
//! - placements on nodes that left the cluster, and of deleted services,
//!   are removed (a node that comes back stops them itself);
//! - a placement on a draining node, or with an older template, is
//!   *displaced*: its replacement starts first, and it is removed only
//!   while enough other ready placements remain (or once it is not ready);
//!   template changes roll one new placement at a time, drains start every
//!   replacement at once;
//! - new placements go where the service has the fewest placements in the
//!   zone, then on the node, then where the node has the fewest in all,
//!   then by node name; a node at capacity or draining takes none, nor
//!   one whose driver for the service (`run.driver`) does not answer,
//!   unless no live node's does (then the instances say why they cannot
//!   start); a placement on a node whose driver stopped answering is
//!   displaced while another node's answers;
//! - scaling down removes the not-ready first, then from the most crowded
//!   node; nothing healthy is moved otherwise (a returning node is not
//!   rebalanced onto).
//!
//! A stateful service ([`StatefulWant`]) is placed by ordinal instead:
//! `NAME-0` .. `NAME-(replicas-1)`, each once. Its data is where it runs,
//! so a placement stays on its node, also while the node is gone, until
//! the node has been gone `replace_after` (then the same name is placed
//! elsewhere and starts from a copy); a new template replaces placements
//! in place (same name, same node), one at a time once all are ready,
//! the primary last; scaling down removes the highest ordinals.

use std::collections::{BTreeMap, BTreeSet};

use crate::fnv::{FnvMap as HashMap, FnvSet as HashSet};

use serde::{Deserialize, Serialize};

/// A live member of the cluster, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub zone: String,
    /// Most placements the node takes, over all services.
    pub capacity: u32,
    pub draining: bool,
    /// The drivers that answer on the node.
    pub drivers: Vec<String>,
}

/// What a service asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceWant {
    pub replicas: u32,
    /// Placements with another template are replaced.
    pub template: String,
    /// The driver the template runs on (`run.driver`).
    pub driver: String,
    /// During a canary: this many placements of the canary's template
    /// besides `replicas` of `template` (the stable one keeps its capacity).
    pub canary: Option<CanaryWant>,
    /// Placed by ordinal, kept where their data is.
    pub stateful: Option<StatefulWant>,
    /// The fewest ready placements a displacement (drain, new template,
    /// driver gone) may leave: the service's disruption budget. `None`:
    /// `replicas` (every replacement ready before what it replaces goes).
    pub min_ready: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatefulWant {
    /// A placement whose node has been gone this long is placed elsewhere;
    /// `None`: never.
    pub replace_after: Option<std::time::Duration>,
    /// The primary's instance: replaced last when the template changes.
    pub primary: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CanaryWant {
    pub template: String,
    pub driver: String,
    pub replicas: u32,
    /// Only these nodes take canary placements (empty: any).
    pub nodes: Vec<String>,
    /// Only nodes of this zone take canary placements.
    pub zone: Option<String>,
}

/// One instance placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub id: String,
    pub service: String,
    pub template: String,
    pub node: String,
}

/// Everything the scheduler decides from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Store revision the snapshot was read at; names new placements.
    pub revision: i64,
    /// Live nodes only.
    pub nodes: BTreeMap<String, NodeInfo>,
    pub services: BTreeMap<String, ServiceWant>,
    /// Current placements by id.
    pub placements: BTreeMap<String, Placement>,
    /// Ids of placements whose instance is ready (has an endpoint).
    pub ready: BTreeSet<String>,
    /// How long each node that placements name but that is not live has
    /// been gone (as the leader measured it).
    pub gone_for: BTreeMap<String, std::time::Duration>,
}

/// What to change: placements to add and ids to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<Placement>,
    pub remove: Vec<String>,
    /// Replicas that could not be placed (no node with room).
    pub unplaced: BTreeMap<String, u32>,
    /// Displaced placements kept for now by their service's budget, by
    /// service: why (what a drain waits for).
    pub held: BTreeMap<String, String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Computes the plan for `snap`. Placements are grouped by service once
/// and eligible nodes are kept ordered by load per zone, so a plan costs
/// about O(placements + added x zones x replicas), not O(services x
/// placements) (see `benches/scheduler.rs`).
pub fn schedule(snap: &Snapshot) -> Plan {
    let mut plan = Plan::default();
    let nodes: HashMap<&str, &NodeInfo> = snap.nodes.iter().map(|(n, i)| (n.as_str(), i)).collect();
    let services: HashSet<&str> = snap.services.keys().map(String::as_str).collect();
    let mut load: HashMap<&str, u32> = nodes.keys().map(|n| (*n, 0)).collect();
    let mut by_service: HashMap<&str, Vec<&Placement>> =
        HashMap::with_capacity_and_hasher(services.len(), Default::default());
    for (id, p) in &snap.placements {
        match load.get_mut(p.node.as_str()) {
            Some(l) if services.contains(p.service.as_str()) => {
                *l += 1;
                by_service.entry(p.service.as_str()).or_default().push(p);
            }
            // Data stays with its node while it may come back.
            None if waits_for_its_node(snap, p) => by_service.entry(p.service.as_str()).or_default().push(p),
            _ => plan.remove.push(id.clone()),
        }
    }
    let any_draining = nodes.values().any(|n| n.draining);
    let answering: BTreeSet<&str> = nodes.values().flat_map(|n| n.drivers.iter().map(String::as_str)).collect();
    let mut fleet = Fleet::new(nodes, load);
    let mut seq = 0u32;
    for (name, want) in &snap.services {
        let mut mine = by_service.remove(name.as_str()).unwrap_or_default();
        if let Some(s) = &want.stateful {
            let strict = answering.contains(want.driver.as_str());
            StatefulPass { snap, name, want, stateful: s, strict }.plan(mine, &mut fleet, &mut plan);
            continue;
        }
        if let Some(c) = &want.canary {
            let canary: Vec<&Placement>;
            (canary, mine) = mine.into_iter().partition(|p| p.template == c.template);
            let ctx = CanaryPass { snap, name, want: c, others: &mine, strict: answering.contains(c.driver.as_str()) };
            ctx.plan(canary, &mut fleet, &mut plan, &mut seq);
        }
        // Nodes whose driver answers, when any does.
        let strict = answering.contains(want.driver.as_str());
        let runs = |fleet: &Fleet, node: &str| !strict || fleet.nodes[node].drivers.contains(&want.driver);
        let displaced = |p: &Placement| {
            p.template != want.template
                || (any_draining && fleet.nodes[p.node.as_str()].draining)
                || !runs(&fleet, &p.node)
        };
        let (old, mut keep): (Vec<&Placement>, Vec<&Placement>) = mine.into_iter().partition(|p| displaced(p));
        let target = want.replicas as usize;
        let is_ready = |p: &Placement| snap.ready.contains(&p.id);
        // Scale down among the current placements: not ready first, then
        // the most crowded node (by this service), then the newest id.
        if keep.len() > target {
            let mut crowd: BTreeMap<&str, usize> = BTreeMap::new();
            for p in &keep {
                *crowd.entry(p.node.as_str()).or_default() += 1;
            }
            keep.sort_by_key(|p| {
                (is_ready(p), std::cmp::Reverse(crowd[p.node.as_str()]), std::cmp::Reverse(p.id.clone()))
            });
            for p in keep.drain(..keep.len() - target) {
                plan.remove.push(p.id.clone());
                fleet.add(&p.node, -1);
            }
        }
        // Add: everything missing, except that a template change rolls
        // one at a time (the next once the previous is ready).
        let rolling = old.iter().any(|p| p.template != want.template);
        let missing = target.saturating_sub(keep.len());
        let adds = if rolling { usize::from(missing > 0 && keep.iter().all(|p| is_ready(p))) } else { missing };
        let mut placed_here: Vec<Placement> = Vec::new();
        for _ in 0..adds {
            let counted = keep.iter().copied().chain(placed_here.iter());
            let Some(node) = fleet.pick_where(counted, |n| runs(&fleet, n)) else {
                *plan.unplaced.entry(name.clone()).or_insert(0) += (missing - placed_here.len()) as u32;
                break;
            };
            fleet.add(node, 1);
            placed_here.push(Placement {
                id: format!("{name}-{:x}-{seq:x}", snap.revision),
                service: name.clone(),
                template: want.template.clone(),
                node: node.to_string(),
            });
            seq += 1;
        }
        // Remove displaced placements while capacity allows: a not-ready
        // one carries no traffic; a ready one goes only if enough others
        // are ready.
        if old.is_empty() {
            plan.add.extend(placed_here);
            continue;
        }
        let mut ready_total = keep.iter().chain(&old).filter(|p| is_ready(p)).count();
        let floor = want.min_ready.map_or(target, |m| (m as usize).min(target));
        let mut old_sorted = old.clone();
        old_sorted.sort_by_key(|p| (is_ready(p), p.id.clone()));
        let mut held = Vec::new();
        for p in old_sorted {
            if !is_ready(p) {
                plan.remove.push(p.id.clone());
            } else if ready_total > floor {
                plan.remove.push(p.id.clone());
                ready_total -= 1;
            } else {
                held.push(format!("{} on {}", p.id, p.node));
            }
        }
        if !held.is_empty() {
            let budget = match want.min_ready {
                Some(_) => format!("its budget keeps {floor} ready"),
                None => "without a [budget] every replica stays ready".to_string(),
            };
            plan.held.insert(
                name.clone(),
                format!(
                    "{} {} until a replacement is ready: {ready_total} ready, {budget}",
                    held.join(", "),
                    if held.len() == 1 { "waits" } else { "wait" }
                ),
            );
        }
        plan.add.extend(placed_here);
    }
    plan
}

/// Whether `p`, on a node that is not live, stays: its service is
/// stateful and the node has not been gone its `replace_after`.
fn waits_for_its_node(snap: &Snapshot, p: &Placement) -> bool {
    let Some(s) = snap.services.get(&p.service).and_then(|w| w.stateful.as_ref()) else { return false };
    let gone = snap.gone_for.get(&p.node).copied().unwrap_or_default();
    s.replace_after.is_none_or(|after| gone < after)
}

/// The ordinal of a stateful instance id `NAME-K`.
pub fn ordinal(service: &str, id: &str) -> Option<u32> {
    let k = id.strip_prefix(service)?.strip_prefix('-')?;
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) && (k == "0" || !k.starts_with('0')))
        .then(|| k.parse().ok())
        .flatten()
}

/// The placements of one stateful service: one per ordinal below
/// `replicas`, each where it is.
struct StatefulPass<'s> {
    snap: &'s Snapshot,
    name: &'s str,
    want: &'s ServiceWant,
    stateful: &'s StatefulWant,
    /// Only nodes whose driver answers (some node's does).
    strict: bool,
}

impl StatefulPass<'_> {
    fn plan<'a>(&self, mine: Vec<&'a Placement>, fleet: &mut Fleet<'a>, plan: &mut Plan) {
        let target = self.want.replicas;
        let mut kept: BTreeMap<u32, &Placement> = BTreeMap::new();
        for p in mine {
            match ordinal(self.name, &p.id) {
                Some(k) if k < target && !kept.contains_key(&k) => {
                    kept.insert(k, p);
                }
                _ => {
                    plan.remove.push(p.id.clone());
                    if self.snap.nodes.contains_key(&p.node) {
                        fleet.add(&p.node, -1);
                    }
                }
            }
        }
        let is_ready = |p: &Placement| self.snap.ready.contains(&p.id);
        let live = |p: &Placement| self.snap.nodes.contains_key(&p.node);
        // A new template: in place, one at a time, once every other is
        // ready; the primary last.
        let all_ready = kept.values().all(|p| is_ready(p));
        let mut outdated: Vec<&&Placement> =
            kept.values().filter(|p| p.template != self.want.template && live(p)).collect();
        outdated.sort_by_key(|p| (self.stateful.primary.as_deref() == Some(p.id.as_str()), std::cmp::Reverse(&p.id)));
        if all_ready {
            if let Some(p) = outdated.first() {
                plan.add.push(Placement { template: self.want.template.clone(), ..(**p).clone() });
            }
        }
        let mut placed: Vec<Placement> = Vec::new();
        for k in 0..target {
            if kept.contains_key(&k) {
                continue;
            }
            let counted = kept.values().copied().chain(placed.iter());
            let runs = |n: &str| !self.strict || fleet.nodes[n].drivers.contains(&self.want.driver);
            let Some(node) = fleet.pick_where(counted, runs) else {
                *plan.unplaced.entry(self.name.to_string()).or_insert(0) += 1;
                continue;
            };
            fleet.add(node, 1);
            placed.push(Placement {
                id: format!("{}-{k}", self.name),
                service: self.name.to_string(),
                template: self.want.template.clone(),
                node: node.to_string(),
            });
        }
        plan.add.extend(placed);
    }
}

/// The canary placements of one service: exactly `target` of `template`,
/// spread like any placement (counting the service's other placements),
/// the not-ready removed first when there are too many.
struct CanaryPass<'s> {
    snap: &'s Snapshot,
    name: &'s str,
    want: &'s CanaryWant,
    others: &'s [&'s Placement],
    /// Only nodes whose driver for the canary answers (some node's does).
    strict: bool,
}

impl CanaryPass<'_> {
    /// Whether `node` may take a canary placement.
    fn allowed(&self, node: &str) -> bool {
        let w = self.want;
        let info = self.snap.nodes.get(node);
        (w.nodes.is_empty() || w.nodes.iter().any(|n| n == node))
            && w.zone.as_ref().is_none_or(|z| info.is_some_and(|i| &i.zone == z))
            && (!self.strict || info.is_some_and(|i| i.drivers.contains(&w.driver)))
    }

    fn plan<'a>(&self, mut keep: Vec<&'a Placement>, fleet: &mut Fleet<'a>, plan: &mut Plan, seq: &mut u32) {
        let is_ready = |p: &Placement| self.snap.ready.contains(&p.id);
        let target = self.want.replicas as usize;
        // A canary on a draining node, or on one the release does not
        // allow (any more), goes; its replacement comes below.
        let (gone, kept): (Vec<&Placement>, Vec<&Placement>) =
            keep.drain(..).partition(|p| self.snap.nodes[&p.node].draining || !self.allowed(&p.node));
        keep = kept;
        for p in gone {
            plan.remove.push(p.id.clone());
            fleet.add(&p.node, -1);
        }
        if keep.len() > target {
            keep.sort_by_key(|p| (is_ready(p), std::cmp::Reverse(p.id.clone())));
            for p in keep.drain(..keep.len() - target) {
                plan.remove.push(p.id.clone());
                fleet.add(&p.node, -1);
            }
        }
        let mut added: Vec<Placement> = Vec::new();
        for _ in keep.len()..target {
            let counted = self.others.iter().copied().chain(keep.iter().copied()).chain(added.iter());
            let Some(node) = fleet.pick_where(counted, |n| self.allowed(n)) else {
                *plan.unplaced.entry(self.name.to_string()).or_insert(0) += (target - keep.len() - added.len()) as u32;
                break;
            };
            fleet.add(node, 1);
            added.push(Placement {
                id: format!("{}-{:x}-{:x}", self.name, self.snap.revision, *seq),
                service: self.name.to_string(),
                template: self.want.template.clone(),
                node: node.to_string(),
            });
            *seq += 1;
        }
        plan.add.extend(added);
    }
}

/// Live nodes with their load as the plan changes it, and the ones that
/// take more placements (not draining, below capacity) ordered by (load,
/// name) in each zone.
struct Fleet<'a> {
    nodes: HashMap<&'a str, &'a NodeInfo>,
    load: HashMap<&'a str, u32>,
    open: BTreeMap<&'a str, BTreeSet<(u32, &'a str)>>,
}

impl<'a> Fleet<'a> {
    fn new(nodes: HashMap<&'a str, &'a NodeInfo>, load: HashMap<&'a str, u32>) -> Fleet<'a> {
        let mut open: BTreeMap<&str, BTreeSet<(u32, &str)>> = BTreeMap::new();
        for (name, info) in &nodes {
            let zone = open.entry(info.zone.as_str()).or_default();
            if !info.draining && load[name] < info.capacity {
                zone.insert((load[name], name));
            }
        }
        Fleet { nodes, load, open }
    }

    /// Changes `node`'s load by `delta` (a live node).
    fn add(&mut self, node: &str, delta: i32) {
        let (&name, info) = self.nodes.get_key_value(node).expect("live node");
        let load = self.load.get_mut(node).expect("live node");
        let zone = self.open.get_mut(info.zone.as_str()).expect("zone of a live node");
        zone.remove(&(*load, name));
        *load = load.saturating_add_signed(delta);
        if !info.draining && *load < info.capacity {
            zone.insert((*load, name));
        }
    }

    /// The node for one more placement of a service whose placements are
    /// `counted`, among the nodes `allowed` accepts: fewest of the service
    /// in the zone, then on the node, then the least loaded node, then by
    /// name. `None` when every such node is full or draining.
    fn pick_where<'p>(
        &self,
        counted: impl Iterator<Item = &'p Placement>,
        allowed: impl Fn(&str) -> bool,
    ) -> Option<&'a str> {
        let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
        let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
        for p in counted {
            *per_node.entry(p.node.as_str()).or_default() += 1;
            *per_zone.entry(self.nodes[p.node.as_str()].zone.as_str()).or_default() += 1;
        }
        let mut best: Option<(u32, u32, u32, &'a str)> = None;
        for (zone, open) in &self.open {
            let zc = per_zone.get(zone).copied().unwrap_or(0);
            if best.is_some_and(|b| zc > b.0) {
                continue;
            }
            // The least loaded open node without the service: at most as
            // many skipped as the service has nodes.
            let mut cand =
                open.iter().find(|(_, n)| !per_node.contains_key(n) && allowed(n)).map(|&(l, n)| (zc, 0, l, n));
            if cand.is_none() {
                // Every open node of the zone has the service: fewest first.
                cand = open.iter().filter(|(_, n)| allowed(n)).map(|&(l, n)| (zc, per_node[n], l, n)).min();
            }
            best = match (best, cand) {
                (Some(b), Some(c)) => Some(b.min(c)),
                (b, c) => b.or(c),
            };
        }
        best.map(|b| b.3)
    }
}

#[cfg(test)]
mod tests;
