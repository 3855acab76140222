//! Services' backup hooks, run where a ready instance of the service runs
//! on this node (its driver's runner: for a process, the service's env and
//! working directory with the instance's `HOST`, `PORT`, `HALO_INSTANCE`
//! and `HALO_SERVICE`, as the instance's user, in a process group killed
//! whole past the timeout; for a container, `docker exec` inside it). A backup runs `command` and
//! keeps its stdout; a restore runs `restore` with that output on stdin,
//! once an instance is ready after the restore.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use halo_model::BackupHook;
use halo_supervisor::{RunError, Runner};

use crate::ctx::NodeCtx;
use crate::dial::SendError;
use crate::keys::{NodeRecord, Role};
use crate::reconcile::Instances;
use crate::stateful::Stateful;

/// Where hook outputs wait after `halo backup restore`, in the data dir.
pub const RESTORE_DIR: &str = "restore";

/// Why a hook did not run, or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    #[error("service '{0}' has no [backup] hook")]
    NoHook(String),
    #[error("no ready instance of '{0}' on this node")]
    NotHere(String),
    #[error("no node has a ready instance of '{0}'")]
    Nowhere(String),
    #[error(transparent)]
    Run(#[from] RunError),
    /// The last node asked did not run it.
    #[error("node {node} ({api}): {why}")]
    Peer { node: String, api: std::net::SocketAddr, why: PeerError },
}

/// Where hooks run: this node's instances, or another node's through
/// its API.
pub(crate) struct Hooks {
    pub ctx: Arc<NodeCtx>,
    pub local: Arc<Instances>,
}

/// One ready local instance of a service.
struct Host {
    id: String,
    runner: Arc<dyn Runner>,
}

/// A ready local instance to run `service`'s hook beside: of a stateful
/// service, a healthy replica when there is one (a backup reads there,
/// not on the primary).
fn host(r: &Hooks, service: &str) -> Option<Host> {
    let st = r.ctx.view.current();
    let replicas: Vec<String> = st
        .roles
        .get(service)
        .map(|roles| {
            roles.iter().filter(|(_, x)| x.role == Role::Replica && x.healthy).map(|(id, _)| id.clone()).collect()
        })
        .unwrap_or_default();
    r.local.ready_runner(service, &replicas).map(|(id, runner)| Host { id, runner })
}

/// What a backup or restore hook gets beside its instance's environment:
/// for a service with a primary, where the primary serves
/// (`HALO_PRIMARY_HOST`, `HALO_PRIMARY_PORT`) and its `HALO_TOKEN`.
fn hook_env(st: &crate::state::ClusterState, service: &str) -> BTreeMap<String, String> {
    match Stateful::primary_addr(st, service) {
        Some((_, token, addr)) => crate::stateful::term_env(token, Some(addr)),
        None => BTreeMap::new(),
    }
}

/// Runs `service`'s backup hook in one of this node's ready instances.
pub(crate) async fn run_here(r: &Hooks, service: &str) -> Result<Vec<u8>, HookError> {
    let st = r.ctx.view.current();
    let hook = st.services.get(service).and_then(|s| s.spec.backup.clone());
    let hook = hook.ok_or_else(|| HookError::NoHook(service.into()))?;
    let h = host(r, service).ok_or_else(|| HookError::NotHere(service.into()))?;
    Ok(h.runner.run_with(&hook.command, &hook_env(&st, service), None, hook.timeout).await?)
}

/// Asks the nodes with a ready instance of `service` to run its hook
/// (`POST /v1/services/NAME/backup-hook` on their API), one after another
/// until one answers.
async fn from_peers(r: &Hooks, service: &str, timeout: Duration) -> Result<Vec<u8>, HookError> {
    let st = r.ctx.view.current();
    let mut nodes: Vec<&str> = st
        .endpoints
        .values()
        .filter(|(s, e)| s == service && e.node != r.ctx.m.cfg.node)
        .map(|(_, e)| e.node.as_str())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    // Of a stateful service, the nodes with a healthy replica first.
    let replica_on = |n: &str| {
        st.roles
            .get(service)
            .is_some_and(|roles| roles.values().any(|x| x.node == n && x.role == Role::Replica && x.healthy))
    };
    nodes.sort_by_key(|n| !replica_on(n));
    let mut why = HookError::Nowhere(service.into());
    for node in nodes {
        let Some(rec) = st.nodes.get(node) else { continue };
        match post(r, rec, &format!("/v1/services/{service}/backup-hook"), timeout).await {
            Ok(out) => return Ok(out),
            Err(e) => why = HookError::Peer { node: node.into(), api: rec.api, why: e },
        }
    }
    Err(why)
}

/// Why another node did not run a hook for this one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error(transparent)]
    Dial(#[from] SendError),
    #[error("no answer in time")]
    Timeout,
    /// Its API answered with an error (its words).
    #[error("{0}")]
    Refused(String),
}

/// One POST to a node's API with the cluster's token; the answer's body.
async fn post(r: &Hooks, node: &NodeRecord, path: &str, timeout: Duration) -> Result<Vec<u8>, PeerError> {
    let req = http::Request::post(path)
        .header(http::header::HOST, node.api.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {}", r.ctx.dial.token))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("a valid request");
    let call = r.ctx.dial.send(node.api, node.api_tls, req);
    let (status, body) =
        tokio::time::timeout(timeout + Duration::from_secs(5), call).await.map_err(|_| PeerError::Timeout)??;
    if !status.is_success() {
        return Err(PeerError::Refused(crate::dial::error_message(status, &body)));
    }
    Ok(body)
}

/// Every service's backup hook, run here or by a node that has a ready
/// instance: (service, output) for those that succeeded, (service, why)
/// for the others, and whether a failure must fail the whole backup.
pub(crate) async fn backup_all(r: &Hooks) -> (Vec<(String, Vec<u8>)>, Vec<(String, String, bool)>) {
    let st = r.ctx.view.current();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for (name, svc) in &st.services {
        let Some(hook) = &svc.spec.backup else { continue };
        let result = match host(r, name) {
            Some(h) => h
                .runner
                .run_with(&hook.command, &hook_env(&st, name), None, hook.timeout)
                .await
                .map_err(HookError::from),
            None => from_peers(r, name, hook.timeout).await,
        };
        match result {
            Ok(out) => done.push((name.clone(), out)),
            Err(why) => {
                tracing::warn!(service = %name, %why, "backup hook failed");
                failed.push((name.clone(), why.to_string(), hook.fail_backup));
            }
        }
    }
    (done, failed)
}

/// Runs the restore hooks whose outputs wait in the data dir, each once an
/// instance of its service is ready here; a done one is removed, a failed
/// one kept as `NAME.out.failed` with the reason logged.
pub(crate) async fn restore_pending(r: Arc<Hooks>) {
    let dir = r.ctx.data_dir.join(RESTORE_DIR);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "out")) {
            let Some(service) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
            let hook: Option<BackupHook> =
                r.ctx.view.current().services.get(&service).and_then(|s| s.spec.backup.clone());
            let Some(restore) = hook.as_ref().and_then(|h| h.restore.clone()) else {
                set_aside(&path, "the service has no [backup] restore command");
                continue;
            };
            let Some(h) = host(&r, &service) else { continue };
            // A service with a primary is restored into it: once one serves.
            let st = r.ctx.view.current();
            let replicated = st.services.get(&service).is_some_and(|s| s.spec.replicated());
            if replicated && Stateful::primary_addr(&st, &service).is_none() {
                continue;
            }
            let input = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    set_aside(&path, &e.to_string());
                    continue;
                }
            };
            let timeout = hook.map_or(Duration::from_secs(600), |h| h.timeout);
            match h.runner.run_with(&restore, &hook_env(&st, &service), Some(input), timeout).await {
                Ok(_) => {
                    tracing::info!(service, instance = %h.id, "restore hook done");
                    let _ = std::fs::remove_file(&path);
                }
                Err(why) => set_aside(&path, &why.to_string()),
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
