//! halo's control plane. Today: the single node (`halo up`), which
//! converges the instances it runs to the services in the store and feeds
//! the proxy the ready ones. Membership, leader election and the scheduler
//! arrive with the multi-node work.

pub mod cluster;
mod config;
mod node;
mod ops;
pub mod records;
pub mod scheduler;

pub use cluster::ClusterConfig;
pub use config::{parse_node, NodeConfig, DEFAULT_API};
pub use ops::{ApplyOutcome, ClusterView, InstanceView, Node, NodeError, NodeView, ServiceStatus};
