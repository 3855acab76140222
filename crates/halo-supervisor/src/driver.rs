//! The driver boundary: how one run of an instance is started, adopted
//! after a halo restart, signalled, stopped and waited for, and where its
//! probes and hooks reach it. The instance task ([`crate::Instance`]:
//! probes, restarts, backoff, status) is the same for every driver;
//! [`crate::ExecDriver`] runs processes, [`crate::DockerDriver`]
//! containers. A service's `run.driver` picks one ([`Drivers::for_run`]).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use halo_model::RunDriver;
use nix::sys::signal::Signal;

use crate::error::StartError;
use crate::runner::Runner;
use crate::InstanceSpec;

/// What identifies a running workload across halo restarts: the host pid
/// of its main process and that process's start time (clock ticks since
/// boot), so a recycled pid is never mistaken for it; for a container,
/// its id (the pid is then only shown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub pid: i32,
    pub start_time: u64,
    pub container: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub success: bool,
    pub detail: String,
}

/// One run of an instance, as the driver started or adopted it.
#[async_trait]
pub trait Workload: Send {
    fn handle(&self) -> Handle;

    /// Where probes connect: the app itself (a container's own address,
    /// not the port forwarder in front of it, which accepts connections
    /// whether the app listens or not).
    fn probe_addr(&self) -> SocketAddr;

    /// Runs exec probes and backup hooks where the app runs.
    fn runner(&self) -> Arc<dyn Runner>;

    /// Waits for the run to end.
    async fn wait(&mut self) -> Exit;

    /// Sends `sig` to everything the run consists of; a run already gone
    /// is fine.
    async fn signal(&self, sig: Signal);

    /// Stops the run: `sig`, `grace` to end by itself, then killed; what
    /// it leaves behind goes with it. Returns how it ended.
    async fn stop(&mut self, sig: Signal, grace: Duration) -> Exit;
}

/// Waits `grace` for a run told to stop to end, then kills it (SIGKILL)
/// and waits for that.
pub(crate) async fn wait_or_kill<W: Workload + ?Sized>(w: &mut W, grace: Duration) -> Exit {
    match tokio::time::timeout(grace, w.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            w.signal(Signal::SIGKILL).await;
            let mut exit = w.wait().await;
            exit.detail = format!("killed after the {grace:?} grace period");
            exit
        }
    }
}

/// Starts and adopts workloads. One per kind of runtime, shared by every
/// instance of a node.
#[async_trait]
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    /// The name a service file chooses it by (`run.driver`).
    fn name(&self) -> &'static str;

    /// Starts one run of `inst`, its app told to listen on `host` and the
    /// instance's port, its output appended to `log`. The error says what
    /// is wrong in words an operator can act on.
    async fn start(&self, inst: &InstanceSpec, host: IpAddr, log: &Path) -> Result<Box<dyn Workload>, StartError>;

    /// Takes over the run `handle` names if it still runs and is `inst`'s.
    async fn adopt(&self, handle: &Handle, inst: &InstanceSpec, log: &Path) -> Option<Box<dyn Workload>>;

    /// Ends the run `handle` names at once (its service is gone); a run
    /// already gone is fine.
    async fn remove(&self, handle: &Handle);

    /// Whether the driver can run anything now (the docker daemon
    /// answers); the node advertises the ones that do, for placement.
    async fn available(&self) -> bool;

    /// Removes every run of this node's halo that none of `known` names
    /// (left by a halo that died before it recorded them).
    async fn sweep(&self, known: &[Handle]);

    /// Runs commands as `inst`'s hooks would run once it runs, while no
    /// run exists (a stateful instance's data is made before it starts);
    /// `None` where a hook can only run inside a run (a container).
    fn runner_for(&self, _inst: &InstanceSpec) -> Option<Arc<dyn Runner>> {
        None
    }
}

/// The drivers of a node.
#[derive(Debug, Clone)]
pub struct Drivers {
    pub exec: Arc<dyn Driver>,
    pub docker: Arc<dyn Driver>,
}

impl Drivers {
    /// The drivers of the node `node` with data dir `data_dir`: processes
    /// (`command = "halo"` runs `halo_exe`), and containers through the
    /// daemon `DOCKER_HOST` names (default `/var/run/docker.sock`).
    pub fn new(halo_exe: &Path, data_dir: &Path, node: &str) -> Drivers {
        let data_dir = data_dir.display().to_string();
        let docker = crate::DockerDriver::new(&crate::DockerDriver::socket_from_env(), node, &data_dir);
        Drivers { exec: Arc::new(crate::ExecDriver::new(halo_exe.into(), &data_dir)), docker: Arc::new(docker) }
    }

    pub fn for_run(&self, d: &RunDriver) -> &Arc<dyn Driver> {
        match d {
            RunDriver::Exec => &self.exec,
            RunDriver::Docker(_) => &self.docker,
        }
    }

    /// The driver that started the run `h` names.
    pub fn for_handle(&self, h: &Handle) -> &Arc<dyn Driver> {
        if h.container.is_some() {
            &self.docker
        } else {
            &self.exec
        }
    }

    pub fn all(&self) -> [&Arc<dyn Driver>; 2] {
        [&self.exec, &self.docker]
    }

    /// The names of the drivers that answer now.
    pub async fn available(&self) -> Vec<String> {
        let mut names = Vec::new();
        for d in self.all() {
            if d.available().await {
                names.push(d.name().to_string());
            }
        }
        names
    }
}
