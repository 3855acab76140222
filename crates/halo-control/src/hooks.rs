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

/// Runs `service`'s backup hook in one of this node's ready instances.
pub(crate) async fn run_here(r: &Reconciler, service: &str) -> Result<Vec<u8>, String> {
    let st = r.view.current();
    let hook = st.services.get(service).and_then(|s| s.spec.backup.clone());
    let hook = hook.ok_or_else(|| format!("service '{service}' has no [backup] hook"))?;
    let h = host(r, service).ok_or_else(|| format!("no ready instance of '{service}' on this node"))?;
    run(r, &h, &hook.command, None, hook.timeout).await
}

/// Asks the nodes with a ready instance of `service` to run its hook
/// (`POST /v1/services/NAME/backup-hook` on their API), one after another
/// until one answers.
async fn from_peers(r: &Reconciler, service: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let st = r.view.current();
    let mut nodes: Vec<&str> = st
        .endpoints
        .values()
        .filter(|(s, e)| s == service && e.node != r.m.cfg.node)
        .map(|(_, e)| e.node.as_str())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut why = format!("no node has a ready instance of '{service}'");
    for node in nodes {
        let Some(api) = st.nodes.get(node).map(|n| n.api) else { continue };
        match post(api, &format!("/v1/services/{service}/backup-hook"), &r.api_token, timeout).await {
            Ok(out) => return Ok(out),
            Err(e) => why = format!("node {node} ({api}): {e}"),
        }
    }
    Err(why)
}

/// One POST to a node's API with the cluster's token; the answer's body.
async fn post(addr: std::net::SocketAddr, path: &str, token: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            return Err(v["error"].as_str().map_or_else(|| status.to_string(), str::to_string));
        }
        Ok(body.to_vec())
    };
    tokio::time::timeout(timeout + Duration::from_secs(5), call).await.map_err(|_| "no answer in time".to_string())?
}

/// Every service's backup hook, run here or by a node that has a ready
/// instance: (service, output) for those that succeeded, (service, why)
/// for the others, and whether a failure must fail the whole backup.
pub(crate) async fn backup_all(r: &Reconciler) -> (Vec<(String, Vec<u8>)>, Vec<(String, String, bool)>) {
    let st = r.view.current();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for (name, svc) in &st.services {
        let Some(hook) = &svc.spec.backup else { continue };
        let result = match host(r, name) {
            Some(h) => run(r, &h, &hook.command, None, hook.timeout).await,
            None => from_peers(r, name, hook.timeout).await,
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
