//! halo's control plane: one pipeline for `halo up` (a cluster of one on
//! the embedded store) and `halo agent` (a node of a cluster on etcd).
//!
//! apply -> store -> [`state`] (the watch-fed view) -> [`leader`] runs the
//! [`scheduler`] -> fenced assignments -> [`reconcile`] (the supervisor) ->
//! [`endpoints`] on the node lease -> every node's view -> `proxy_config`.
//! [`keys`] owns every key the pipeline writes; [`membership`] the node's
//! lease; [`migrate`] brings older stores to the current layout.

mod autoscale;
pub mod backup;
mod backup_schedule;
mod config;
pub mod cron;
mod ctx;
pub mod dial;
mod endpoints;
pub mod events;
mod evict;
mod fast_lease;
use halo_model::fnv;
mod hooks;
pub mod keys;
pub mod leader;
pub mod maintenance;
pub mod membership;
mod metrics;
pub mod migrate;
mod node;
pub mod peers;
mod proxy_config;
mod reconcile;
mod roles;
pub mod rollout;
pub mod scheduler;
pub mod state;
pub mod stateful;
pub mod token;
mod views;
pub mod vip;

pub use backup_schedule::{newest_archive, BackupHealth};
pub use config::{parse_node, ApiTls, BackupSchedule, NodeConfig, When, DEFAULT_API};
pub use keys::RolloutCommand;
pub use membership::ClusterConfig;
pub use node::{Node, NodeError, NodeOptions};
pub use views::{
    Applied, ApplyOutcome, AutoscaleView, ClusterServiceView, ClusterView, InstanceView, NodeView, Outcome,
    PlacementView, RolloutView, ServiceStatus, StatusView,
};
