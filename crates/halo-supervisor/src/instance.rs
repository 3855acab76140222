//! One instance's life: a task that runs its process, probes it, restarts
//! it with backoff and stops it gracefully. States and transitions are in
//! `LIFECYCLE.md` beside this file.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_model::clock::unix_secs;

use halo_model::{Probe, RestartPolicy, ServiceSpec};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::driver::{Exit, Workload};
use crate::error::ProbeError;
use crate::logs::LogFile;
use crate::probe::check_once;
use crate::runner::Runner;
use crate::Env;
use halo_model::health::{Tally, Verdict};
use halo_model::lock::LockExt;

/// What the node asks the supervisor to run.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub id: String,
    pub service: String,
    pub spec: Arc<ServiceSpec>,
    /// The host port the instance is reached on.
    pub port: u16,
    /// The service template it runs (labels a container).
    pub revision: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Process started; startup probe (if any) not passed yet.
    Starting,
    /// Started; `ready` says whether it takes traffic.
    Running,
    /// Waiting before a restart.
    Backoff,
    /// Restarting too often: waiting the longest backoff between tries.
    CrashLoop,
    Stopping,
    Stopped,
    /// Ended and the restart policy says to leave it.
    Completed,
}

impl State {
    /// The state as `halo status` and the API name it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::CrashLoop => "crash-loop",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Completed => "completed",
        }
    }
}

/// What the node sees of an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub service: String,
    pub port: u16,
    pub state: State,
    pub ready: bool,
    pub pid: Option<i32>,
    /// With `pid`, identifies the process across halo restarts.
    pub start_time: Option<u64>,
    /// The container id, for a docker instance.
    pub container: Option<String>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Failed checks so far, by probe (startup, readiness, liveness).
    pub probe_failures: ProbeFailures,
    /// Why the last failed check failed (`readiness: GET /healthz
    /// answered 404`); cleared when the instance becomes ready.
    #[serde(default)]
    pub last_probe_error: Option<String>,
    /// Unix seconds when the current state began.
    pub since: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProbeFailures {
    pub startup: u64,
    pub readiness: u64,
    pub liveness: u64,
}

/// A supervised instance. Dropping the handle leaves the process running
/// (halo killed or restarting); [`Instance::stop`] stops it.
pub struct Instance {
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub log: LogFile,
    runner: RunnerSlot,
}

/// The current run's runner, while there is a run.
type RunnerSlot = Arc<Mutex<Option<Arc<dyn Runner>>>>;

impl Instance {
    /// Starts supervising: `adopted` (a run a previous halo started) if
    /// given, else a new run.
    pub fn start(env: Arc<Env>, spec: InstanceSpec, adopted: Option<Box<dyn Workload>>) -> std::io::Result<Instance> {
        let log = LogFile::new(&env.logs_dir, &spec.service, &spec.id)?;
        let status = Status {
            id: spec.id.clone(),
            service: spec.service.clone(),
            port: spec.port,
            state: State::Starting,
            ready: false,
            pid: None,
            start_time: None,
            container: None,
            restarts: 0,
            last_exit: None,
            probe_failures: ProbeFailures::default(),
            last_probe_error: None,
            since: unix_secs(),
        };
        let (status_tx, status_rx) = watch::channel(status);
        let (stop_tx, stop_rx) = watch::channel(false);
        let runner = RunnerSlot::default();
        let run = Run { env, spec, log: log.clone(), status: status_tx, stop: stop_rx, runner: runner.clone() };
        let task = tokio::spawn(run.main(adopted));
        Ok(Instance { status: status_rx, stop: stop_tx, task, log, runner })
    }

    /// Runs commands where the current run's app runs (backup hooks);
    /// `None` between runs.
    pub fn runner(&self) -> Option<Arc<dyn Runner>> {
        self.runner.locked().clone()
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Status changes, for the node to publish endpoints and records.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Drains and stops the instance (stop signal, grace period, SIGKILL
    /// of its group) and waits until it is gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Leaves the process running and stops supervising it (halo is going
    /// away and will adopt it when it comes back).
    pub fn detach(self) {
        self.task.abort();
    }
}

struct Run {
    env: Arc<Env>,
    spec: InstanceSpec,
    log: LogFile,
    status: watch::Sender<Status>,
    stop: watch::Receiver<bool>,
    runner: RunnerSlot,
}

enum Outcome {
    Exited(Exit),
    Unhealthy(String),
    Stop,
}

impl Run {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(|s| {
            let before = (s.state, s.ready);
            f(s);
            if (s.state, s.ready) != before {
                s.since = unix_secs();
                tracing::info!(service = %s.service, instance = %s.id, state = s.state.as_str(), ready = s.ready, "instance");
            }
        });
    }

    fn set_runner(&self, r: Option<Arc<dyn Runner>>) {
        *self.runner.locked() = r;
    }

    async fn main(mut self, mut adopted: Option<Box<dyn Workload>>) {
        let spec = self.spec.spec.clone();
        let mut recent: VecDeque<Instant> = VecDeque::new();
        let mut failures_in_a_row: u32 = 0;
        loop {
            let driver = self.env.drivers.for_run(&spec.run.driver).clone();
            let proc = match adopted.take() {
                Some(p) => Ok(p),
                None => {
                    self.ensure_port_free();
                    let start = driver.start(&self.spec, self.env.host, &self.log.path);
                    // A stop asked while the start waits (an image pull)
                    // is not held up by it.
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        started = start => started,
                        _ = stop.wait_for(|s| *s) => {
                            self.set(|s| s.state = State::Stopped);
                            return;
                        }
                    }
                }
            };
            let started = Instant::now();
            let outcome = match proc {
                Ok(mut proc) => {
                    let h = proc.handle();
                    self.set(|s| {
                        s.state = State::Starting;
                        s.pid = Some(h.pid);
                        s.start_time = Some(h.start_time);
                        s.container = h.container.clone();
                    });
                    self.set_runner(Some(proc.runner()));
                    let outcome = self.watch(&mut proc).await;
                    self.set(|s| s.ready = false);
                    self.set_runner(None);
                    match &outcome {
                        Outcome::Stop => {
                            self.set(|s| s.state = State::Stopping);
                            let exit = proc.stop(stop_signal(&spec), spec.stop.grace_period).await;
                            self.set(|s| {
                                s.state = State::Stopped;
                                s.last_exit = Some(exit.detail);
                                s.pid = None;
                                s.container = None;
                            });
                            return;
                        }
                        Outcome::Unhealthy(why) => {
                            tracing::warn!(instance = %self.spec.id, reason = %why, "restarting unhealthy instance");
                            proc.stop(stop_signal(&spec), spec.stop.grace_period.min(Duration::from_secs(5))).await;
                        }
                        Outcome::Exited(_) => proc.signal(Signal::SIGKILL).await,
                    }
                    outcome
                }
                Err(e) => {
                    tracing::warn!(instance = %self.spec.id, error = %e, "starting the instance failed");
                    Outcome::Exited(Exit { success: false, detail: e.to_string() })
                }
            };
            let (success, detail) = match outcome {
                Outcome::Exited(e) => (e.success, e.detail),
                Outcome::Unhealthy(why) => (false, why),
                Outcome::Stop => unreachable!("handled above"),
            };
            let restarts = self.status.borrow().restarts;
            tracing::warn!(
                service = %self.spec.service,
                instance = %self.spec.id,
                exit = %detail,
                ran_for = ?started.elapsed(),
                restarts,
                "instance ended"
            );
            self.set(|s| {
                s.last_exit = Some(detail);
                s.pid = None;
                s.container = None;
            });
            let restart = match spec.restart.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Never => false,
            };
            if !restart {
                self.set(|s| s.state = State::Completed);
                let _ = self.stop.wait_for(|s| *s).await;
                self.set(|s| s.state = State::Stopped);
                return;
            }
            // Backoff doubles per failure in a row; a run longer than the
            // crash-loop window starts the count again.
            let r = &spec.restart;
            if started.elapsed() > r.crash_loop_window {
                failures_in_a_row = 0;
            }
            failures_in_a_row += 1;
            let now = Instant::now();
            recent.push_back(now);
            while recent.front().is_some_and(|t| now.duration_since(*t) > r.crash_loop_window) {
                recent.pop_front();
            }
            let looping = recent.len() as u32 >= r.crash_loop_restarts;
            let delay = if looping {
                r.backoff_max
            } else {
                r.backoff_initial.saturating_mul(1 << (failures_in_a_row - 1).min(20)).min(r.backoff_max)
            };
            if looping && self.status.borrow().state != State::CrashLoop {
                tracing::warn!(
                    service = %self.spec.service,
                    instance = %self.spec.id,
                    restarts = recent.len(),
                    within = ?r.crash_loop_window,
                    next_try_in = ?delay,
                    "crash loop: restarting too often; waiting the longest backoff between tries"
                );
            }
            self.set(|s| {
                s.state = if looping { State::CrashLoop } else { State::Backoff };
                s.restarts += 1;
            });
            let mut stop = self.stop.clone();
            let stopped = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopped {
                self.set(|s| s.state = State::Stopped);
                return;
            }
        }
    }

    /// An instance keeps its port across restarts, unless another program
    /// took it meanwhile: then it moves to a free one (the node follows
    /// `Status::port`).
    fn ensure_port_free(&mut self) {
        if std::net::TcpListener::bind(("127.0.0.1", self.spec.port)).is_ok() {
            return;
        }
        match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => {
                tracing::warn!(instance = %self.spec.id, taken = self.spec.port, port = addr.port(), "port taken; moving the instance");
                self.spec.port = addr.port();
                self.set(|s| s.port = addr.port());
            }
            Err(e) => tracing::warn!(instance = %self.spec.id, error = %e, "no free port to move to"),
        }
    }

    /// Runs until the process exits, fails its probes, or a stop is asked.
    async fn watch(&mut self, proc: &mut Box<dyn Workload>) -> Outcome {
        let spec = self.spec.spec.clone();
        let (addr, runner) = (proc.probe_addr(), proc.runner());
        let rotate = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = self.log.rotate_if_over(self.env.log_cap) {
                    tracing::warn!(error = %e, "rotating an instance log failed");
                }
            }
        };
        let mut stop = self.stop.clone();
        tokio::select! {
            exit = proc.wait() => Outcome::Exited(exit),
            why = probes(&spec, addr, &*runner, &self.status) => Outcome::Unhealthy(why),
            _ = stop.wait_for(|s| *s) => Outcome::Stop,
            _ = rotate => unreachable!("rotation never ends"),
        }
    }
}

fn stop_signal(spec: &ServiceSpec) -> Signal {
    Signal::try_from(spec.stop.signal.number()).unwrap_or(Signal::SIGTERM)
}

/// Startup, then readiness and liveness. Returns only when the instance is
/// unhealthy, with the reason.
async fn probes(spec: &ServiceSpec, addr: SocketAddr, runner: &dyn Runner, status: &watch::Sender<Status>) -> String {
    let mut failed = FailureLog::default();
    if let Some(p) = &spec.startup {
        let mut tally = Tally::default();
        loop {
            let r = check_once(&p.check, addr, runner, p.timeout).await;
            failed.note("startup", p.failure_threshold, &r, status, |f| f.startup += 1);
            match tally.record(r.is_ok(), p.success_threshold, p.failure_threshold) {
                Verdict::Passing => break,
                Verdict::Failing => {
                    return format!("startup probe failed: {}", r.err().map(|e| e.to_string()).unwrap_or_default())
                }
                Verdict::Undecided => tokio::time::sleep(p.interval).await,
            }
        }
    }
    status.send_modify(|s| {
        s.state = State::Running;
        s.since = unix_secs();
    });
    let readiness = async {
        let p = &spec.readiness;
        let mut tally = Tally::default();
        let mut failed = FailureLog::default();
        loop {
            let r = check_once(&p.check, addr, runner, p.timeout).await;
            failed.note("readiness", p.failure_threshold, &r, status, |f| f.readiness += 1);
            let ready = match tally.record(r.is_ok(), p.success_threshold, p.failure_threshold) {
                Verdict::Passing => true,
                Verdict::Failing => false,
                Verdict::Undecided => status.borrow().ready,
            };
            if ready != status.borrow().ready {
                status.send_modify(|s| {
                    s.ready = ready;
                    s.since = unix_secs();
                    if ready {
                        s.last_probe_error = None;
                    }
                });
                tracing::info!(instance = %status.borrow().id, ready, "readiness changed");
            }
            tokio::time::sleep(p.interval).await;
        }
    };
    let liveness = async {
        let Some(p) = &spec.liveness else { return std::future::pending::<String>().await };
        liveness(p, addr, runner, status).await
    };
    tokio::select! {
        why = liveness => why,
        _ = readiness => unreachable!("readiness probing never ends"),
    }
}

/// Counts a probe's failures, keeps the last reason in the status, and
/// logs a warning once they are as many in a row as the probe's
/// `failure_threshold` (one failure while an app starts is no news), then
/// at most every 30 s while they go on (a probe every 100 ms must not flood
/// the log).
#[derive(Default)]
struct FailureLog {
    in_a_row: u64,
    warned: Option<Instant>,
}

impl FailureLog {
    fn note(
        &mut self,
        probe: &str,
        threshold: u32,
        r: &Result<(), ProbeError>,
        status: &watch::Sender<Status>,
        count: impl FnOnce(&mut ProbeFailures),
    ) {
        let Err(e) = r else {
            if self.warned.is_some() {
                tracing::info!(instance = %status.borrow().id, probe, after = self.in_a_row, "probe passing again");
            }
            self.in_a_row = 0;
            self.warned = None;
            return;
        };
        self.in_a_row += 1;
        status.send_modify(|s| {
            count(&mut s.probe_failures);
            s.last_probe_error = Some(format!("{probe}: {e}"));
        });
        let due = self.warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        if self.in_a_row >= u64::from(threshold) && due {
            self.warned = Some(Instant::now());
            let (service, id) = {
                let s = status.borrow();
                (s.service.clone(), s.id.clone())
            };
            tracing::warn!(service = %service, instance = %id, probe, error = %e, failures_in_a_row = self.in_a_row, "probe failing");
        }
    }
}

async fn liveness(p: &Probe, addr: SocketAddr, runner: &dyn Runner, status: &watch::Sender<Status>) -> String {
    let mut tally = Tally::default();
    let mut failed = FailureLog::default();
    loop {
        tokio::time::sleep(p.interval).await;
        let r = check_once(&p.check, addr, runner, p.timeout).await;
        failed.note("liveness", p.failure_threshold, &r, status, |f| f.liveness += 1);
        if tally.record(r.is_ok(), p.success_threshold, p.failure_threshold) == Verdict::Failing {
            return format!("liveness probe failed: {}", r.err().map(|e| e.to_string()).unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::State;

    #[test]
    fn state_names_are_the_apis() {
        use State::*;
        for s in [Starting, Running, Backoff, CrashLoop, Stopping, Stopped, Completed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
