//! Running a node's instances.
//!
//! Each instance is a workload of a [`Driver`] (the [`ExecDriver`]: a
//! process in its own process group; the [`DockerDriver`]: a container),
//! chosen by the service's `run.driver`, with its output in a size-capped
//! log file, supervised by one task ([`Instance`]): startup,
//! readiness and liveness probes; restart with exponential backoff and a
//! crash-loop state; a stop that drains, signals, waits the grace period
//! and kills the whole group. The supervisor knows nothing of other nodes
//! or of the store: the node tells it what to run and watches [`Status`].
//! A process or container outlives halo (kill -9 of halo leaves it
//! running) and is adopted back ([`Driver::adopt`]: pid plus start time,
//! or container id), then handed to [`Instance::start`].

pub mod docker;
mod driver;
mod error;
pub mod identity;
mod instance;
mod logs;
mod probe;
mod process;
mod runner;

use std::path::PathBuf;

pub use docker::DockerDriver;
pub use driver::{Driver, Drivers, Exit, Handle, Workload};
pub use error::{IdentityError, ProbeError, RunError, StartError};
pub use instance::{Instance, InstanceSpec, ProbeFailures, State, Status};
pub use logs::LogFile;
pub use probe::check_once;
pub use process::{alive, freeze_group, start_time, ExecDriver};
pub use runner::{HostRunner, Runner};

/// What every instance of a node shares.
#[derive(Debug, Clone)]
pub struct Env {
    /// Instance logs go to `logs_dir/SERVICE/INSTANCE.log`.
    pub logs_dir: PathBuf,
    /// What runs the instances, by `run.driver`.
    pub drivers: Drivers,
    /// A log file past this many bytes is rotated.
    pub log_cap: u64,
    /// The address instances are told to listen on (`HOST`, with `PORT`):
    /// loopback on a single node, every address on a cluster node (other
    /// nodes' proxies reach them). Probes always use loopback.
    pub host: std::net::IpAddr,
}
