//! The key schema: every key the control plane writes, its value type
//! (JSON unless said otherwise) and the lease it lives on. `halo up` and
//! `halo agent` use the same keys; an etcd namespace (`--namespace`) is a
//! prefix the store adds in front of all of them.
//!
//! | key | value | lease | written by |
//! | --- | --- | --- | --- |
//! | `/halo/schema` | layout version, decimal text | none | the first node of a new layout ([`crate::migrate`]) |
//! | `/halo/api-token` | the API token's digest, `sha256:HEX` (never the token; `token.rs`) | none | the first node (create-if-absent) |
//! | `/halo/services/NAME` | [`ServiceRecord`] | none | the API (compare-and-swap on mod revision) |
//! | `/halo/nodes/NODE` | [`NodeRecord`] | the node's | the node, on (re-)registration |
//! | `/halo/node-admin/NODE` | [`NodeAdmin`] | none | the node (created absent), `halo node drain/undrain/remove` |
//! | `/halo/leader` | the leader's node name, text | the leader's node lease | the leader (create-if-absent); its create revision is the **fencing token** |
//! | `/halo/assignments/NODE/ID` | [`Assignment`] | none | the leader only, fenced by its token |
//! | `/halo/endpoints/SERVICE/ID` | [`EndpointRecord`] | the node's | the node running ID, while it is ready |
//! | `/halo/instances/NODE/SERVICE/ID` | [`InstanceRecord`] | none | the node running ID, before it starts it; read only by that node |
//! | `/halo/rollouts/NAME` | [`RolloutRecord`] | none | the leader only, fenced by its token |
//! | `/halo/rollout-commands/NAME` | [`RolloutCommand`] | none | the API (`halo rollout promote/abort`); the leader deletes it when it acts |
//! | `/halo/silent/NODE` | the nodes NODE finds silent, a JSON list of names | the node's | each node, while any is silent ([`crate::evict`]) |
//! | `/halo/upgrading/NODE` | the pid of the process handing over, text | none | a node's old process during a binary upgrade; the node deletes it at every start ([`crate::evict`] spares the node meanwhile) |
//! | `/halo/stats/NODE` | [`NodeStats`] | the node's | each node, while a rollout is in progress or a service autoscales |
//! | `/halo/maintenance` | [`MaintenanceRecord`] | none | the API creates it (`halo node maintain`); the leader advances it, fenced |
//! | `/halo/maintenance-results/NODE` | [`MaintenanceResult`] | none | the node, when its maintenance command ended |
//! | `/halo/scale/NAME` | [`ScaleRecord`] | none | the leader only, fenced by its token: an autoscaled service's replica count |
//! | `/halo/vips/IP` | [`VipHolder`] | the holder's VIP lease | the node taking the floating IP (create-if-absent); its create revision is the VIP's **fencing token** |
//! | `/halo/vip-nodes/IP/NODE` | [`VipCandidate`] | the node's VIP lease | each node that declares the VIP: whether it may hold it, and why not |
//! | `/halo/events/MS-NODE-SEQ` | [`crate::events::Event`] | the node's events lease (an hour, not renewed) | each node, for what it saw ([`crate::events`]); the view skips them |

use std::net::{IpAddr, SocketAddr};

use halo_model::ServiceFile;
use halo_store::Revision;
use serde::{Deserialize, Serialize};

use crate::fnv::fnv64;
use crate::scheduler::Placement;

/// Everything the control plane keeps is under this prefix.
pub const ROOT: &str = "/halo/";
pub const SCHEMA: &str = "/halo/schema";
/// The layout described above. 1 (no `/halo/schema` key): `halo up` kept
/// `/halo/instances/SERVICE/ID` and no assignments.
pub const SCHEMA_VERSION: u32 = 2;
pub const API_TOKEN: &str = "/halo/api-token";
pub const SERVICES: &str = "/halo/services/";
pub const NODES: &str = "/halo/nodes/";
pub const NODE_ADMIN: &str = "/halo/node-admin/";
pub const LEADER: &str = "/halo/leader";
pub const ASSIGNMENTS: &str = "/halo/assignments/";
pub const ENDPOINTS: &str = "/halo/endpoints/";
pub const INSTANCES: &str = "/halo/instances/";
pub const ROLLOUTS: &str = "/halo/rollouts/";
pub const ROLLOUT_COMMANDS: &str = "/halo/rollout-commands/";
pub const STATS: &str = "/halo/stats/";
pub const SCALES: &str = "/halo/scale/";
pub const MAINTENANCE: &str = "/halo/maintenance";
pub const MAINTENANCE_RESULTS: &str = "/halo/maintenance-results/";
pub const SILENT: &str = "/halo/silent/";
pub const UPGRADING: &str = "/halo/upgrading/";
pub const VIPS: &str = "/halo/vips/";
pub const VIP_NODES: &str = "/halo/vip-nodes/";
pub const EVENTS: &str = "/halo/events/";
pub const PRIMARIES: &str = "/halo/primaries/";
pub const ROLES: &str = "/halo/roles/";
pub const SYNC: &str = "/halo/sync/";
pub const SWITCHOVERS: &str = "/halo/switchovers/";

/// The key naming a stateful service's primary: on the primary node's
/// role lease; its create revision is the primary's fencing token.
pub fn primary_key(service: &str) -> String {
    format!("{PRIMARIES}{service}")
}

/// Where a node publishes one stateful instance's role and position.
pub fn role_key(service: &str, id: &str) -> String {
    format!("{ROLES}{service}/{id}")
}

/// A synchronous service's standbys: written by its primary (no lease:
/// it must outlive the primary), read by the candidates of a failover.
pub fn sync_key(service: &str) -> String {
    format!("{SYNC}{service}")
}

/// A planned switchover of a stateful service, asked for by an operator.
pub fn switchover_key(service: &str) -> String {
    format!("{SWITCHOVERS}{service}")
}

/// Which instances may hold every write the primary of `token`
/// acknowledged: each such write is on `primary` and on at least one of
/// `standbys`. Empty: on the primary only (no failover may promote
/// another). Changed only by that primary, under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub token: Revision,
    pub primary: String,
    pub standbys: Vec<String>,
}

/// An operator's switchover, then the old primary's handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRecord {
    /// The primary's term it moves away from.
    pub token: Revision,
    /// The instance to promote; `None`: the primary chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub asked_ms: u64,
    /// Set by the old primary once it has stopped taking writes, and
    /// with the key handed back: its last position and the chosen target
    /// (which promotes without waiting out the guard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed: Option<Handed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub to: String,
    pub position: Option<u64>,
    pub at_ms: u64,
}

/// A stateful instance's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves writes under the current token.
    Primary,
    /// Follows the primary of its token.
    Replica,
    /// Was primary and was fenced: not reached, rewound before it serves.
    Demoted,
    /// Not running: its data is being made, or it waits for a primary.
    Waiting,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Demoted => "demoted",
            Role::Waiting => "waiting",
        }
    }
}

/// Which instance of a stateful service is its primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRecord {
    pub instance: String,
    pub node: String,
    /// When it took the key, Unix milliseconds (its node's clock).
    pub since_ms: u64,
}

/// A stateful instance as its node sees it (on the node's lease, written
/// when it changes and with each new position, at most 4 times a second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub node: String,
    pub role: Role,
    /// The token of the primary it is (role primary) or follows (replica).
    #[serde(default)]
    pub token: Revision,
    /// What its `position` hook last printed, read as a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Its `check` passes (and its process runs).
    pub healthy: bool,
    /// Whether its data directory holds data (an empty one is cloned).
    pub has_data: bool,
    /// Where it listens (host:port as other nodes reach it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    /// Why it is not serving its role, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While the service has no primary: why this instance does not take
    /// the key (`None`: it may).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidacy: Option<String>,
}

pub fn vip_key(ip: &IpAddr) -> String {
    format!("{VIPS}{ip}")
}

pub fn vip_node_key(ip: &IpAddr, node: &str) -> String {
    format!("{VIP_NODES}{ip}/{node}")
}

/// Who holds a floating IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipHolder {
    pub node: String,
    /// When it took the key, Unix milliseconds (its own clock).
    pub since_ms: u64,
    pub interface: String,
}

/// A node's standing for a floating IP it declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipCandidate {
    /// The interface exists there.
    pub eligible: bool,
    /// Its tracked check passes.
    pub healthy: bool,
    /// Why not, when it may not hold the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub fn rollout_key(service: &str) -> String {
    format!("{ROLLOUTS}{service}")
}

pub fn rollout_command_key(service: &str) -> String {
    format!("{ROLLOUT_COMMANDS}{service}")
}

pub fn silent_key(node: &str) -> String {
    format!("{SILENT}{node}")
}

pub fn upgrading_key(node: &str) -> String {
    format!("{UPGRADING}{node}")
}

pub fn stats_key(node: &str) -> String {
    format!("{STATS}{node}")
}

pub fn maintenance_result_key(node: &str) -> String {
    format!("{MAINTENANCE_RESULTS}{node}")
}

pub fn scale_key(service: &str) -> String {
    format!("{SCALES}{service}")
}

pub fn service_key(name: &str) -> String {
    format!("{SERVICES}{name}")
}

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}

pub fn node_admin_key(node: &str) -> String {
    format!("{NODE_ADMIN}{node}")
}

pub fn assignment_key(node: &str, id: &str) -> String {
    format!("{ASSIGNMENTS}{node}/{id}")
}

pub fn endpoint_key(service: &str, id: &str) -> String {
    format!("{ENDPOINTS}{service}/{id}")
}

/// Where `node` keeps the records of the instances it runs.
pub fn instances_of(node: &str) -> String {
    format!("{INSTANCES}{node}/")
}

pub fn instance_key(node: &str, service: &str, id: &str) -> String {
    format!("{INSTANCES}{node}/{service}/{id}")
}

/// A service as the API stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service file, as TOML.
    pub spec: String,
    /// Bumped by `halo restart`: instances of an older generation are
    /// replaced, one at a time.
    #[serde(default)]
    pub restart_generation: u64,
    /// While a canary rolls: the revision the stable instances run (`spec`
    /// above is the canary's). Cleared when the canary is promoted; put
    /// back as `spec` when it is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<StableRecord>,
}

/// The stable revision of a service during a canary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StableRecord {
    pub spec: String,
    pub restart_generation: u64,
}

impl ServiceRecord {
    /// What makes instances interchangeable: the file without `replicas`
    /// (scaling replaces nothing) and without `[release]` and `[backup]`
    /// (how a change rolls out, or how the data is saved, is not a change of
    /// the instances), plus the restart
    /// generation.
    pub fn template(file: &ServiceFile, generation: u64) -> String {
        let mut f = file.clone();
        f.replicas = None;
        f.release = None;
        f.backup = None;
        f.autoscale = None;
        f.budget = None;
        format!("{:016x}", fnv64(format!("{}\n#{generation}", f.to_toml()).as_bytes()))
    }
}

/// A node of the cluster, present while its lease lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where other nodes reach this node's instances.
    pub addr: IpAddr,
    pub zone: String,
    pub capacity: u32,
    /// The node's admin API.
    pub api: SocketAddr,
    /// The API is HTTPS only (`[node.tls]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_tls: bool,
    /// The drivers that answer on the node (`exec`, `docker`), checked
    /// every few seconds. A record without them is of a node that runs
    /// only processes.
    #[serde(default = "exec_only")]
    pub drivers: Vec<String>,
}

fn exec_only() -> Vec<String> {
    vec!["exec".into()]
}

/// What operators set on a node; outlives the node's lease, so a node that
/// died stays listed (as gone) until `halo node remove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdmin {
    #[serde(default)]
    pub draining: bool,
}

/// An instance the leader placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    #[serde(flatten)]
    pub placement: Placement,
    /// The fencing token of the leader that wrote it.
    pub token: Revision,
}

/// A ready instance, reachable at `addr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub node: String,
    pub addr: SocketAddr,
    /// The instance's template: which revision it serves (stable or canary).
    #[serde(default)]
    pub template: String,
}

/// Where a canary rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Progressing,
    /// Held at its step by an operator: weight kept, no window judged.
    Paused,
    Promoted,
    RolledBack,
    Aborted,
}

/// One analysis window, as the leader judged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Unix milliseconds when the window closed.
    pub ended_ms: u64,
    pub canary_requests: u64,
    pub canary_errors: u64,
    pub stable_requests: u64,
    pub stable_errors: u64,
    pub verdict: Verdict,
    pub detail: String,
}

/// What the leader made of one analysis window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// Too few canary requests to judge.
    Hold,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Hold => "hold",
        })
    }
}

impl RolloutState {
    /// Whether the rollout is still going (its canary runs).
    pub fn active(self) -> bool {
        matches!(self, RolloutState::Progressing | RolloutState::Paused)
    }
}

/// A canary rollout of a service, written by the leader only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub canary_template: String,
    pub stable_template: String,
    /// Both revisions as they were when it began: for `halo rollout retry`
    /// (the canary again) and `undo` (the stable one again).
    pub canary_spec: StableRecord,
    pub stable_spec: StableRecord,
    pub state: RolloutState,
    /// Index into the release's steps.
    pub step: usize,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub step_started_ms: u64,
    /// Windows passed in the current step.
    pub passed_windows: u32,
    /// Windows failed in the whole rollout.
    pub failed_windows: u32,
    #[serde(default)]
    pub windows: Vec<WindowRecord>,
    /// Why it ended (rolled back, aborted) or what it waits for.
    #[serde(default)]
    pub reason: String,
    /// The fencing token of the leader that wrote it.
    pub token: Revision,
}

/// An operator's order for a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutCommand {
    Promote,
    Abort,
    Pause,
    Resume,
}

/// A node's cumulative proxy counters of the upstreams in a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub upstreams: std::collections::BTreeMap<String, Counters>,
}

/// One upstream's counters on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    /// 5xx and errors the proxy answered for.
    pub failed: u64,
    /// Requests per latency bucket (the proxy's bounds, then +Inf).
    #[serde(default)]
    pub latency: Vec<u64>,
    /// The sum of those latencies, in microseconds: over a window, divided
    /// by its length, the mean number of requests in flight.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub latency_sum_us: u64,
    /// Requests the proxy holds now for an instance to start (a gauge,
    /// not a counter: scale from zero).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waiting: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Counters {
    /// What grew from `then` to `self` (a counter that went back, as after
    /// a proxy restart, counts nothing).
    pub fn since(&self, then: &Counters) -> Counters {
        let latency =
            self.latency.iter().enumerate().map(|(i, n)| n.saturating_sub(then.latency.get(i).copied().unwrap_or(0)));
        Counters {
            requests: self.requests.saturating_sub(then.requests),
            failed: self.failed.saturating_sub(then.failed),
            latency: latency.collect(),
            latency_sum_us: self.latency_sum_us.saturating_sub(then.latency_sum_us),
            waiting: self.waiting,
        }
    }

    /// Adds `o`'s counts (and its waiting requests) to these.
    pub fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.failed += o.failed;
        self.latency_sum_us += o.latency_sum_us;
        self.waiting += o.waiting;
        if self.latency.len() < o.latency.len() {
            self.latency.resize(o.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            *a += b;
        }
    }
}

/// A rolling maintenance over some nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRecord {
    /// Unix ms when asked for: names each node's run.
    pub id: u64,
    /// Run with `sh -c` on each node.
    pub command: String,
    /// Nodes under maintenance at once.
    pub max_unavailable: u32,
    /// In the order they go.
    pub nodes: Vec<NodeStep>,
    pub state: RunState,
    /// Why it ended, when it did not succeed.
    #[serde(default)]
    pub reason: String,
    /// The fencing token of the leader that last wrote it (0: the API).
    #[serde(default)]
    pub token: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// One node's way through the maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStep {
    pub node: String,
    pub phase: Phase,
    /// What it waits for, or how it ended.
    #[serde(default)]
    pub detail: String,
    /// Drained before the maintenance drained it: left drained after.
    #[serde(default)]
    pub was_draining: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    /// Drained; its instances move elsewhere within their budgets.
    Draining,
    /// Empty: the node runs the command.
    Running,
    Done,
    Failed,
}

impl Phase {
    /// Draining or running: the node is out of service for the maintenance.
    pub fn under_way(self) -> bool {
        matches!(self, Phase::Draining | Phase::Running)
    }
}

/// What a node reports when its command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceResult {
    /// [`crate::maintenance::run_id`] of the run.
    pub run: String,
    /// The exit status (`None`: ended by a signal).
    pub status: Option<i32>,
    /// The last lines of its output.
    pub output: String,
}

/// An autoscaled service's replica count, as the leader last decided it,
/// and what it measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScaleRecord {
    pub replicas: u32,
    /// Ready instances when it was written.
    #[serde(default)]
    pub ready: u32,
    /// Each target and the value measured per ready instance.
    #[serde(default)]
    pub measured: Vec<Measured>,
    /// Why the count is what it is (the last change), or what holds it.
    #[serde(default)]
    pub reason: String,
    /// When the count last changed (unix ms).
    #[serde(default)]
    pub changed_ms: u64,
    /// When this was written (unix ms).
    #[serde(default)]
    pub at_ms: u64,
    /// The fencing token of the leader that wrote it.
    pub token: Revision,
}

/// One autoscaling target and what was measured against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// `in_flight`, `rps` or `p99` (ms).
    pub metric: String,
    pub target: f64,
    /// Per ready instance (`None`: nothing to measure yet).
    pub value: Option<f64>,
}

/// What a node writes before it starts an instance and updates with its
/// pid, so a restarted halo finds every process it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub service: String,
    pub port: u16,
    pub template: String,
    pub pid: Option<i32>,
    pub start_time: Option<u64>,
    /// The container id of a docker instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl InstanceRecord {
    /// What a restarted halo adopts the run by, once it was recorded.
    pub fn handle(&self) -> Option<halo_supervisor::Handle> {
        let (pid, start_time) = (self.pid?, self.start_time?);
        Some(halo_supervisor::Handle { pid, start_time, container: self.container.clone() })
    }
}
