//! The exec driver: each run of an instance is one OS process in its own
//! process group with its output in a log file, recognised again after a
//! halo restart by pid plus start time from `/proc`; signals go to its
//! whole group.

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use halo_model::RunSpec;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::driver::{Driver, Exit, Handle, Workload};

/// Runs instances as processes. `command = "halo"` runs `halo_exe`, this
/// halo binary.
#[derive(Debug, Clone)]
pub struct ExecDriver {
    pub halo_exe: PathBuf,
}

impl Driver for ExecDriver {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn start(
        &self,
        run: &RunSpec,
        addr: (IpAddr, u16),
        log: &Path,
        instance: &str,
    ) -> std::io::Result<Box<dyn Workload>> {
        Ok(Box::new(Proc::spawn(run, addr, log, &self.halo_exe, instance)?))
    }

    fn adopt(&self, handle: Handle) -> Option<Box<dyn Workload>> {
        Proc::adopt(handle.pid, handle.start_time).map(|p| Box::new(p) as Box<dyn Workload>)
    }
}

/// A running process we started, or one we adopted after a restart.
pub struct Proc {
    pub pid: i32,
    /// Clock ticks since boot when it started (`/proc/PID/stat` field 22):
    /// with the pid, what identifies this process and no later one.
    pub start_time: u64,
    child: Option<tokio::process::Child>,
}

impl Proc {
    /// Starts `run` with `HOST` and `PORT` set to `addr`, stdout and stderr
    /// appended to `log`. `command = "halo"` runs `halo_exe`, this halo binary.
    pub fn spawn(
        run: &RunSpec,
        addr: (std::net::IpAddr, u16),
        log: &Path,
        halo_exe: &Path,
        instance: &str,
    ) -> std::io::Result<Proc> {
        let (host, port) = addr;
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let program = if run.command == "halo" { halo_exe.as_os_str() } else { run.command.as_ref() };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&run.args)
            .envs(&run.env)
            .env("HOST", host.to_string())
            .env("PORT", port.to_string())
            .env("HALO_INSTANCE", instance)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .process_group(0)
            .kill_on_drop(false);
        if let Some(dir) = &run.workdir {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn()?;
        let pid = child.id().map(|p| p as i32).ok_or_else(|| std::io::Error::other("process exited at once"))?;
        let start_time = start_time(pid).ok_or_else(|| std::io::Error::other("process exited at once"))?;
        Ok(Proc { pid, start_time, child: Some(child) })
    }

    /// Takes over a process a previous halo started, if it is still that
    /// process (same pid and start time, not a zombie).
    pub fn adopt(pid: i32, start_time: u64) -> Option<Proc> {
        alive(pid, start_time).then_some(Proc { pid, start_time, child: None })
    }
}

#[async_trait]
impl Workload for Proc {
    fn handle(&self) -> Handle {
        Handle { pid: self.pid, start_time: self.start_time }
    }

    /// Waits for the process to end. An adopted process is not our child:
    /// it is polled through `/proc`.
    async fn wait(&mut self) -> Exit {
        match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => Exit { success: status.success(), detail: describe(status) },
                Err(e) => Exit { success: false, detail: format!("wait failed: {e}") },
            },
            None => {
                while alive(self.pid, self.start_time) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Exit { success: false, detail: "exited (adopted process; status unknown)".into() }
            }
        }
    }

    /// Sends `sig` to the whole process group. A group already gone is fine.
    fn signal(&self, sig: Signal) {
        match killpg(Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid = self.pid, signal = ?sig, error = %e, "signalling process group failed"),
        }
    }

    /// Stop: `sig` (and SIGCONT, so a frozen process can act on it), then
    /// SIGKILL of the group after `grace` if the process is still there.
    async fn stop(&mut self, sig: Signal, grace: Duration) -> Exit {
        self.signal(sig);
        self.signal(Signal::SIGCONT);
        let exit = match tokio::time::timeout(grace, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                self.signal(Signal::SIGKILL);
                let mut exit = self.wait().await;
                exit.detail = format!("killed after the {grace:?} grace period");
                exit
            }
        };
        // Whatever the process left behind in its group goes with it.
        self.signal(Signal::SIGKILL);
        exit
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| sig.to_string());
            format!("killed by {name}")
        }
        _ => "exited".into(),
    }
}

/// The start time of `pid` from `/proc/PID/stat`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start_time` and
/// has not exited (a zombie has).
pub fn alive(pid: i32, start_time: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = stat.rfind(')') else { return false };
    let mut fields = stat[close + 2..].split(' ');
    let state = fields.next();
    let started = fields.nth(18).and_then(|s| s.parse::<u64>().ok());
    state != Some("Z") && state != Some("X") && started == Some(start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_identifies_this_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("our own /proc entry");
        assert!(alive(me, t));
        assert!(!alive(me, t + 1), "a different start time is a different process");
        assert!(!alive(i32::MAX, t));
    }
}
