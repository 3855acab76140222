//! The supervisor on real processes (`sh` and `sleep`).

use std::sync::Arc;
use std::time::Duration;

use halo_supervisor::{Drivers, Env, Handle, Instance, InstanceSpec, State};
use halo_testkit::{eventually, TempDir};

fn env(dir: &TempDir) -> Arc<Env> {
    Arc::new(Env {
        logs_dir: dir.0.join("logs"),
        drivers: Drivers::new("/bin/false".as_ref(), &dir.0, "test"),
        log_cap: 1 << 20,
        host: [127, 0, 0, 1].into(),
    })
}

fn spec(script: &str, extra: &str) -> InstanceSpec {
    let text = format!(
        "name = \"t\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n[readiness]\nexec = [\"true\"]\ninterval = \"100ms\"\n{extra}"
    );
    let (_, spec) = halo_model::parse_service("test", &text).unwrap();
    InstanceSpec { id: "t-1".into(), service: "t".into(), spec: Arc::new(spec), port: 1, revision: "r".into() }
}

fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

#[tokio::test]
async fn a_crash_loop_is_named_and_backs_off() {
    let dir = TempDir::new("sup-crash");
    let restart = "[restart]\nbackoff_initial = \"50ms\"\nbackoff_max = \"1s\"\ncrash_loop_restarts = 3\ncrash_loop_window = \"30s\"";
    let i = Instance::start(env(&dir), spec("echo boom; exit 3", restart), None).unwrap();
    eventually(Duration::from_secs(10), "crash loop", || async { i.status().state == State::CrashLoop }).await;
    let s = i.status();
    assert_eq!(s.last_exit.as_deref(), Some("exited with status 3"));
    assert!(i.log.tail(1) == ["boom"], "output reaches the log: {:?}", i.log.tail(1));
    // In the loop, tries are a backoff_max apart: no CPU burnt.
    let before = s.restarts;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = i.status().restarts;
    assert!(after - before <= 2, "{} restarts in 1.5s while crash-looping", after - before);
    i.stop().await;
}

#[tokio::test]
async fn stop_kills_the_whole_group_after_the_grace_period() {
    let dir = TempDir::new("sup-stop");
    // Ignores SIGTERM and has children of its own.
    let i = Instance::start(
        env(&dir),
        spec("trap '' TERM; sleep 300 & sleep 300 & wait", "[stop]\ngrace_period = \"300ms\""),
        None,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "ready", || async { i.status().ready }).await;
    let pid = i.status().pid.unwrap();
    assert!(group_alive(pid));
    let mut status = i.subscribe();
    i.stop().await;
    let s = status.borrow_and_update().clone();
    assert_eq!(s.state, State::Stopped);
    assert_eq!(s.last_exit.as_deref(), Some("killed after the 300ms grace period"));
    // Killed children are reaped by init, not by us: give it a moment.
    eventually(Duration::from_secs(5), "no process left in the instance's group", || async { !group_alive(pid) }).await;
}

#[tokio::test]
async fn a_detached_instance_is_adopted_not_duplicated() {
    let dir = TempDir::new("sup-adopt");
    let i = Instance::start(env(&dir), spec("exec sleep 300", ""), None).unwrap();
    eventually(Duration::from_secs(10), "ready", || async { i.status().ready }).await;
    let (pid, t) = (i.status().pid.unwrap(), i.status().start_time.unwrap());
    i.detach();
    assert!(halo_supervisor::alive(pid, t), "detaching stopped the process");
    let (env, spec) = (env(&dir), spec("exec sleep 300", ""));
    let handle = Handle { pid, start_time: t, container: None };
    let adopted = env.drivers.exec.adopt(&handle, &spec, &dir.0.join("log")).await;
    assert!(adopted.is_some(), "the live process was not adopted");
    let again = Instance::start(env, spec, adopted).unwrap();
    eventually(Duration::from_secs(10), "ready again", || async { again.status().ready }).await;
    assert_eq!(again.status().pid, Some(pid), "a live process was started again instead of adopted");
    // A process that exits while adopted is noticed and restarted.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(10), "restarted", || async {
        again.status().pid.is_some_and(|p| p != pid) && again.status().restarts == 1
    })
    .await;
    again.stop().await;
    assert!(!halo_supervisor::alive(pid, t));
}

#[tokio::test]
async fn a_docker_instance_without_a_daemon_says_so_and_backs_off() {
    let dir = TempDir::new("sup-nodocker");
    let mut drivers = Drivers::new("/bin/false".as_ref(), &dir.0, "test");
    let socket = dir.0.join("no-daemon.sock");
    drivers.docker = Arc::new(halo_supervisor::DockerDriver::new(&socket.display().to_string(), "test", "/x"));
    let env = Arc::new(Env { logs_dir: dir.0.join("logs"), drivers, log_cap: 1 << 20, host: [127, 0, 0, 1].into() });
    let text = "name = \"t\"\n[run]\ndriver = \"docker\"\nimage = \"app:1\"\nport = 80\n[restart]\nbackoff_initial = \"50ms\"\n";
    let (_, spec) = halo_model::parse_service("test", text).unwrap();
    let spec =
        InstanceSpec { id: "t-1".into(), service: "t".into(), spec: Arc::new(spec), port: 1, revision: "r".into() };
    let i = Instance::start(env, spec, None).unwrap();
    eventually(Duration::from_secs(10), "the missing daemon named", || async {
        let s = i.status();
        s.restarts >= 1
            && s.last_exit
                .is_some_and(|e| e.contains("cannot reach the Docker daemon") && e.contains("is dockerd running?"))
    })
    .await;
    i.stop().await;
}
