//! The exec driver: each run of an instance is one OS process in its own
//! process group with its output in a log file, recognised again after a
//! halo restart by pid plus start time from `/proc`; signals go to its
//! whole group.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use halo_model::{owner_mark, RunSpec, OWNER_VAR};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::driver::{Driver, Exit, Handle, Workload};
use crate::error::{IdentityError, StartError};
use crate::identity::{self, Identity};
use crate::runner::{HostRunner, Runner};
use crate::InstanceSpec;

/// Runs instances as processes, each as the user `identity` resolves
/// (applications are not trusted). `command = "halo"` runs `halo_exe`,
/// this halo binary. Every process carries [`OWNER_VAR`] in its
/// environment, a digest of the data directory: what marks it as this
/// halo's (the orphan sweep), without telling it where the data is.
#[derive(Debug, Clone)]
pub struct ExecDriver {
    halo_exe: PathBuf,
    /// This binary, held open: an instance's user may not be able to
    /// reach its path (a build under a home directory of mode 700), so a
    /// switched `command = "halo"` is started through the open file.
    halo_file: Option<Arc<std::fs::File>>,
    mark: String,
    /// How halo before the mark named its processes (`HALO_DATA_DIR=`
    /// the path): the sweep still knows them after an upgrade.
    legacy_mark: String,
}

impl ExecDriver {
    pub fn new(halo_exe: PathBuf, data_dir: &str) -> ExecDriver {
        let halo_file = std::fs::File::open(&halo_exe).ok().map(Arc::new);
        ExecDriver { halo_exe, halo_file, mark: owner_mark(data_dir), legacy_mark: format!("HALO_DATA_DIR={data_dir}") }
    }

    /// The environment `inst`'s process and its hooks get.
    fn env(&self, inst: &InstanceSpec, host: IpAddr) -> BTreeMap<String, String> {
        let mut env = inst.spec.run.env.clone();
        env.insert("HOST".into(), host.to_string());
        env.insert("PORT".into(), inst.port.to_string());
        env.insert("HALO_INSTANCE".into(), inst.id.clone());
        env.insert("HALO_SERVICE".into(), inst.spec.name.clone());
        env.insert(OWNER_VAR.into(), self.mark.clone());
        env
    }

    fn runner(&self, inst: &InstanceSpec, who: Result<Option<Identity>, IdentityError>) -> Arc<dyn Runner> {
        // Hooks and probes reach the app on loopback, as its user.
        Arc::new(HostRunner {
            env: self.env(inst, Ipv4Addr::LOCALHOST.into()),
            workdir: inst.spec.run.workdir.clone(),
            who,
        })
    }

    /// What to execute for `run`: the program, and the name it is given.
    fn program(&self, run: &RunSpec, who: Option<Identity>) -> (std::ffi::OsString, Option<&'static str>) {
        if run.command != "halo" {
            return (run.command.clone().into(), None);
        }
        match (&self.halo_file, who) {
            // The child's own view of the descriptor it inherited: no
            // search permission on the binary's directories is needed.
            (Some(f), Some(_)) => {
                use std::os::fd::AsRawFd;
                (format!("/proc/self/fd/{}", f.as_raw_fd()).into(), Some("halo"))
            }
            _ => (self.halo_exe.clone().into_os_string(), None),
        }
    }
}

#[async_trait]
impl Driver for ExecDriver {
    fn name(&self) -> &'static str {
        "exec"
    }

    async fn start(&self, inst: &InstanceSpec, host: IpAddr, log: &Path) -> Result<Box<dyn Workload>, StartError> {
        let run = &inst.spec.run;
        let who = identity::resolve(run.user.as_deref(), run.group.as_deref())?;
        let (program, arg0) = self.program(run, who);
        let mut p = Proc::spawn(run, &self.env(inst, host), log, &program, arg0, who)
            .map_err(|e| StartError::Spawn { command: run.command.clone(), reason: e.to_string() })?;
        p.port = inst.port;
        p.runner = Some(self.runner(inst, Ok(who)));
        Ok(Box::new(p))
    }

    async fn adopt(&self, handle: &Handle, inst: &InstanceSpec, _log: &Path) -> Option<Box<dyn Workload>> {
        let mut p = Proc::adopt(handle.pid, handle.start_time)?;
        p.port = inst.port;
        let run = &inst.spec.run;
        p.runner = Some(self.runner(inst, identity::resolve(run.user.as_deref(), run.group.as_deref())));
        Some(Box::new(p))
    }

    async fn available(&self) -> bool {
        true
    }

    fn runner_for(&self, inst: &InstanceSpec) -> Option<Arc<dyn Runner>> {
        let run = &inst.spec.run;
        Some(self.runner(inst, identity::resolve(run.user.as_deref(), run.group.as_deref())))
    }

    async fn remove(&self, handle: &Handle) {
        if alive(handle.pid, handle.start_time) {
            let _ = killpg(Pid::from_raw(handle.pid), Signal::SIGKILL);
        }
    }

    /// Kills every process group whose leader carries this data dir's
    /// mark and is not one of `known`.
    async fn sweep(&self, known: &[Handle]) {
        let needle = format!("{OWNER_VAR}={}", self.mark);
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
            let ours = |v: &[u8]| v == needle.as_bytes() || v == self.legacy_mark.as_bytes();
            if !environ.split(|b| *b == 0).any(ours) {
                continue;
            }
            let pgid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(2)?.parse::<i32>().ok());
            if let Some(pgid) = pgid.filter(|g| *g == pid && !known.iter().any(|h| h.pid == *g)) {
                tracing::warn!(pid, "killing an orphaned instance process group");
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

/// A running process we started, or one we adopted after a restart.
pub struct Proc {
    pub pid: i32,
    /// Clock ticks since boot when it started (`/proc/PID/stat` field 22):
    /// with the pid, what identifies this process and no later one.
    pub start_time: u64,
    child: Option<tokio::process::Child>,
    port: u16,
    runner: Option<Arc<dyn Runner>>,
}

impl Proc {
    /// Starts `program` with `run`'s arguments and `env`, as `who` when
    /// given, stdout and stderr appended to `log` (opened by halo: the
    /// instance's user needs no access to it).
    pub fn spawn(
        run: &RunSpec,
        env: &BTreeMap<String, String>,
        log: &Path,
        program: &std::ffi::OsStr,
        arg0: Option<&str>,
        who: Option<Identity>,
    ) -> std::io::Result<Proc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = tokio::process::Command::new(program);
        if let Some(name) = arg0 {
            cmd.arg0(name);
        }
        if let Some(id) = who {
            // Supplementary groups go too (std drops them when root).
            cmd.uid(id.uid).gid(id.gid);
        }
        cmd.args(&run.args)
            .envs(env)
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
        Ok(Proc { pid, start_time, child: Some(child), port: 0, runner: None })
    }

    /// Takes over a process a previous halo started, if it is still that
    /// process (same pid and start time, not a zombie).
    pub fn adopt(pid: i32, start_time: u64) -> Option<Proc> {
        alive(pid, start_time).then_some(Proc { pid, start_time, child: None, port: 0, runner: None })
    }
}

#[async_trait]
impl Workload for Proc {
    fn handle(&self) -> Handle {
        Handle { pid: self.pid, start_time: self.start_time, container: None }
    }

    fn probe_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    fn runner(&self) -> Arc<dyn Runner> {
        self.runner
            .clone()
            .unwrap_or_else(|| Arc::new(HostRunner { env: BTreeMap::new(), workdir: None, who: Ok(None) }))
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
    async fn signal(&self, sig: Signal) {
        match killpg(Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pid = self.pid, signal = ?sig, error = %e, "signalling process group failed"),
        }
    }

    /// Stop: `sig` (and SIGCONT, so a frozen process can act on it), then
    /// SIGKILL of the group after `grace` if the process is still there.
    async fn stop(&mut self, sig: Signal, grace: Duration) -> Exit {
        self.signal(sig).await;
        self.signal(Signal::SIGCONT).await;
        let exit = crate::driver::wait_or_kill(self, grace).await;
        // Whatever the process left behind in its group goes with it.
        self.signal(Signal::SIGKILL).await;
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

/// Freezes (SIGSTOP) or thaws (SIGCONT) the process group an instance's
/// process `pid` leads: a frozen server acknowledges nothing (a stateful
/// primary fenced while its node cannot reach the store).
pub fn freeze_group(pid: i32, frozen: bool) -> std::io::Result<()> {
    // killpg(0) is the caller's own group, killpg(1) every process.
    if pid <= 1 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no process group {pid}")));
    }
    let sig = if frozen { Signal::SIGSTOP } else { Signal::SIGCONT };
    killpg(Pid::from_raw(pid), sig).map_err(std::io::Error::from)
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
