//! Services' backup hooks, run in a ready instance's environment on this
//! node: the service's env and working directory, with the instance's
//! `HOST`, `PORT`, `HALO_INSTANCE` and `HALO_DATA_DIR`, in a process group
//! of its own that is killed whole when the hook runs past its timeout.
//! A backup runs `command` and keeps its stdout; a restore runs `restore`
//! with that output on stdin, once an instance is ready after the restore.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use halo_model::{BackupHook, ServiceSpec};
use tokio::io::AsyncWriteExt;

use crate::reconcile::Reconciler;

/// Where hook outputs wait after `halo backup restore`, in the data dir.
pub const RESTORE_DIR: &str = "restore";

/// The most a hook may write; past it the hook fails.
const MAX_OUTPUT: usize = 1 << 30;

/// One ready local instance of a service, with the spec it runs.
struct Host {
    spec: Arc<ServiceSpec>,
    id: String,
    port: u16,
}

fn host(r: &Reconciler, service: &str) -> Option<Host> {
    let st = r.view.current();
    let svc = st.services.get(service)?;
    let instances = r.instances.lock().unwrap_or_else(|e| e.into_inner());
    let m = instances.values().find(|m| m.record.service == service && m.ready())?;
    let spec = svc.spec_for(&m.record.template).unwrap_or(&svc.spec).clone();
    let host = Host { spec, id: m.record.id.clone(), port: m.status.borrow().port };
    Some(host)
}

/// Runs `argv` as the instance `h` would be, feeding `stdin`; its stdout.
async fn run(
    r: &Reconciler,
    h: &Host,
    argv: &[String],
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let (program, args) = argv.split_first().ok_or("the hook has no command")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(&h.spec.run.env)
        .env("HOST", "127.0.0.1")
        .env("PORT", h.port.to_string())
        .env("HALO_INSTANCE", &h.id)
        .env("HALO_DATA_DIR", r.data_dir.display().to_string())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &h.spec.run.workdir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id();
    // Whatever ends this hook (its timeout, a cancelled backup dropping
    // this future) ends its whole process group.
    let _group = KillGroup(pid);
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
        });
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() && out.stdout.len() <= MAX_OUTPUT => Ok(out.stdout),
        Ok(Ok(out)) if out.status.success() => Err(format!("{program} wrote more than {MAX_OUTPUT} bytes")),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(format!("{program} failed ({}): {}", out.status, err.trim().lines().last().unwrap_or("")))
        }
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ =
                    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
            Err(format!("{program} ran past its {timeout:?} timeout and was killed"))
        }
    }
}

/// Kills a hook's process group when dropped (a group already gone is fine).
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Every service's backup hook that this node can run: (service, output)
/// for those that succeeded, (service, why) for the others, and whether a
/// failure must fail the whole backup.
pub(crate) async fn backup_all(r: &Reconciler) -> (Vec<(String, Vec<u8>)>, Vec<(String, String, bool)>) {
    let st = r.view.current();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for (name, svc) in &st.services {
        let Some(hook) = &svc.spec.backup else { continue };
        let result = match host(r, name) {
            Some(h) => run(r, &h, &hook.command, None, hook.timeout).await,
            None => {
                let nodes: Vec<&str> =
                    st.endpoints.values().filter(|(s, _)| s == name).map(|(_, e)| e.node.as_str()).collect();
                Err(format!(
                    "no ready instance of '{name}' on this node (ready on: [{}]); ask one of those",
                    nodes.join(", ")
                ))
            }
        };
        match result {
            Ok(out) => done.push((name.clone(), out)),
            Err(why) => {
                tracing::warn!(service = %name, why, "backup hook failed");
                failed.push((name.clone(), why, hook.fail_backup));
            }
        }
    }
    (done, failed)
}

/// Runs the restore hooks whose outputs wait in the data dir, each once an
/// instance of its service is ready here; a done one is removed, a failed
/// one kept as `NAME.out.failed` with the reason logged.
pub(crate) async fn restore_pending(r: Arc<Reconciler>) {
    let dir = r.data_dir.join(RESTORE_DIR);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "out")) {
            let Some(service) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
            let hook: Option<BackupHook> = r.view.current().services.get(&service).and_then(|s| s.spec.backup.clone());
            let Some(restore) = hook.as_ref().and_then(|h| h.restore.clone()) else {
                set_aside(&path, "the service has no [backup] restore command");
                continue;
            };
            let Some(h) = host(&r, &service) else { continue };
            let input = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    set_aside(&path, &e.to_string());
                    continue;
                }
            };
            let timeout = hook.map_or(Duration::from_secs(600), |h| h.timeout);
            match run(&r, &h, &restore, Some(input), timeout).await {
                Ok(_) => {
                    tracing::info!(service, instance = %h.id, "restore hook done");
                    let _ = std::fs::remove_file(&path);
                }
                Err(why) => set_aside(&path, &why),
            }
        }
    }
}

fn set_aside(path: &Path, why: &str) {
    tracing::error!(file = %path.display(), why, "restore hook not run; the file is kept as .failed");
    let mut failed = PathBuf::from(path);
    failed.set_extension("out.failed");
    let _ = std::fs::rename(path, failed);
}
