//! Scheduled backups (`[backup] every` in the node file): the leader writes
//! an archive every interval into the backup directory, verifies it (a
//! trial restore), then removes the oldest past `keep_last`. Only the
//! leader runs them; a slow or failing one delays only the next, never the
//! scheduler or a rollout (it runs in a task of its own). `/metrics` and
//! `halo status` show the last success, size, duration and failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::membership::Membership;
use crate::reconcile::Reconciler;
use crate::BackupSchedule;

/// How scheduled backups are doing, for `/metrics` and `halo status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupHealth {
    /// Unix seconds of the last backup written and verified.
    pub last_success: Option<u64>,
    pub last_size: u64,
    pub last_duration_ms: u64,
    pub last_file: Option<String>,
    pub failures: u64,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// No success within two intervals while this node leads.
    pub overdue: bool,
}

const PREFIX: &str = "halo-backup-";

/// Runs the schedule for as long as the node runs.
pub(crate) async fn run(
    sched: BackupSchedule,
    dir: PathBuf,
    r: Arc<Reconciler>,
    m: Arc<Membership>,
    health: Arc<Mutex<BackupHealth>>,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(sched.every).await;
        if m.leading().is_none() {
            last_ok = Instant::now();
            health.lock().unwrap_or_else(|e| e.into_inner()).overdue = false;
            continue;
        }
        let started = Instant::now();
        let result = once(&r, &dir, sched.keep_last).await;
        let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((file, size)) => {
                last_ok = Instant::now();
                h.last_success = Some(crate::rollout::now_ms() / 1000);
                h.last_size = size;
                h.last_duration_ms = started.elapsed().as_millis() as u64;
                h.last_file = Some(file.display().to_string());
                h.last_error = None;
                tracing::info!(file = %file.display(), size, "scheduled backup written and verified");
            }
            Err(e) => {
                h.failures += 1;
                h.last_error = Some(e.clone());
                tracing::error!(error = %e, "scheduled backup failed");
            }
        }
        h.overdue = last_ok.elapsed() > sched.every * 2;
    }
}

/// One backup: written, verified, then the oldest past `keep` removed.
async fn once(r: &Reconciler, dir: &Path, keep: usize) -> Result<(PathBuf, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let bytes = crate::backup::take(r).await.map_err(|e| e.to_string())?;
    let b = crate::backup::open(&bytes).map_err(|e| e.to_string())?;
    let name = format!("{PREFIX}{}-r{}.tar", crate::rollout::now_ms(), b.manifest.revision);
    let file = dir.join(&name);
    // Written under a hidden name, verified from the disk, then the oldest
    // pruned, then named: never more than `keep`, never an unverified one.
    let tmp = dir.join(format!(".{name}.tmp"));
    crate::backup::write_private(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let scratch = std::env::temp_dir().join(format!("halo-backup-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let written = std::fs::read(&tmp).map_err(|e| format!("cannot read back {}: {e}", tmp.display()))?;
    let verified = crate::backup::verify(&written, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(e) = verified {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("the new archive did not verify: {e}"));
    }
    prune(dir, keep.saturating_sub(1));
    std::fs::rename(&tmp, &file).map_err(|e| format!("cannot name {}: {e}", file.display()))?;
    Ok((file, bytes.len() as u64))
}

/// Removes the oldest scheduled archives past `keep` (names sort by time).
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut ours: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(".tar"))
        })
        .collect();
    ours.sort();
    let excess = ours.len().saturating_sub(keep);
    for old in &ours[..excess] {
        if let Err(e) = std::fs::remove_file(old) {
            tracing::warn!(file = %old.display(), error = %e, "removing an old backup failed");
        }
    }
}
