//! The driver boundary: how one run of an instance is started, adopted
//! after a halo restart, signalled, stopped and waited for. The instance
//! task ([`crate::Instance`]: probes, restarts, backoff, status) is the
//! same for every driver; [`crate::exec::ExecDriver`] runs processes, and
//! a container driver slots in beside it by implementing these two traits.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use halo_model::RunSpec;
use nix::sys::signal::Signal;

/// What identifies a running workload across halo restarts: the host pid
/// of its main process and that process's start time (clock ticks since
/// boot), so a recycled pid is never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    pub pid: i32,
    pub start_time: u64,
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

    /// Waits for the run to end.
    async fn wait(&mut self) -> Exit;

    /// Sends `sig` to everything the run consists of; a run already gone
    /// is fine.
    fn signal(&self, sig: Signal);

    /// Stops the run: `sig`, `grace` to end by itself, then killed. Returns
    /// how it ended.
    async fn stop(&mut self, sig: Signal, grace: Duration) -> Exit;
}

/// Starts and adopts workloads. One per kind of runtime, shared by every
/// instance of a node.
pub trait Driver: Send + Sync + std::fmt::Debug + 'static {
    /// The name a service file would choose it by (`exec`).
    fn name(&self) -> &'static str;

    /// Starts one run of `run` for `instance`, told to listen on `addr`
    /// (`HOST`, `PORT`), with its output appended to `log`.
    fn start(
        &self,
        run: &RunSpec,
        addr: (IpAddr, u16),
        log: &Path,
        instance: &str,
    ) -> std::io::Result<Box<dyn Workload>>;

    /// Takes over the run `handle` names if it still runs.
    fn adopt(&self, handle: Handle) -> Option<Box<dyn Workload>>;
}
