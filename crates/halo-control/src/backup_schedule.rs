//! Scheduled backups (`[backup] every` or `cron` in the node file): the
//! leader writes an archive every interval (or at each cron time) into the backup directory, verifies it (a
//! trial restore), then removes the oldest past `keep_last`. Only the
//! leader runs them; a slow or failing one delays only the next, never the
//! scheduler or a rollout (it runs in a task of its own). `/metrics` and
//! `halo status` show the last success, size, duration and failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::events::EventKind;
use crate::hooks::Hooks;
use crate::BackupSchedule;
use halo_model::lock::LockExt;

/// How scheduled backups are doing, for `/metrics` and `halo status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
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
    /// Unix seconds when the backup under way began.
    pub running_since: Option<u64>,
}

/// The schedule's state shared with the API: health, and a way to cancel
/// the backup under way.
#[derive(Debug, Default)]
pub struct Schedule {
    pub health: Mutex<BackupHealth>,
    cancel: tokio::sync::Notify,
}

impl Schedule {
    fn health(&self) -> std::sync::MutexGuard<'_, BackupHealth> {
        self.health.locked()
    }

    /// Cancels the backup under way (its hooks are killed); false when none is.
    pub fn cancel(&self) -> bool {
        let running = self.health().running_since.is_some();
        if running {
            self.cancel.notify_one();
        }
        running
    }
}

const PREFIX: &str = "halo-backup-";

/// Runs the schedule for as long as the node runs.
pub(crate) async fn run(sched: BackupSchedule, dir: PathBuf, r: Arc<Hooks>, ctl: Arc<Schedule>) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(wait(&sched.when)).await;
        if r.ctx.m.leading().is_none() {
            last_ok = Instant::now();
            ctl.health().overdue = false;
            continue;
        }
        let started = Instant::now();
        ctl.health().running_since = Some(halo_model::clock::unix_ms() / 1000);
        let result = tokio::select! {
            r = once(&r, &dir, &sched) => r,
            _ = ctl.cancel.notified() => Err("cancelled by an operator (halo backup cancel)".to_string()),
        };
        let mut h = ctl.health();
        h.running_since = None;
        match result {
            Ok((file, size)) => {
                last_ok = Instant::now();
                h.last_success = Some(halo_model::clock::unix_ms() / 1000);
                h.last_size = size;
                h.last_duration_ms = started.elapsed().as_millis() as u64;
                h.last_file = Some(file.display().to_string());
                h.last_error = None;
                tracing::info!(file = %file.display(), size, "scheduled backup written and verified");
                r.ctx.m.events.info(
                    EventKind::Backup,
                    None,
                    None,
                    format!("{} written and verified ({size} bytes)", file.display()),
                );
            }
            Err(e) => {
                h.failures += 1;
                h.last_error = Some(e.clone());
                tracing::error!(error = %e, "scheduled backup failed");
                r.ctx.m.events.warn(EventKind::Backup, None, None, format!("scheduled backup failed: {e}"));
            }
        }
        h.overdue = match &sched.when {
            crate::When::Every(every) => last_ok.elapsed() > *every * 2,
            // A fire time passed without a backup.
            crate::When::Cron(_) => h.last_error.is_some(),
        };
    }
}

/// How long until the next backup is due.
fn wait(when: &crate::When) -> std::time::Duration {
    match when {
        crate::When::Every(every) => *every,
        crate::When::Cron(cron) => {
            let now_ms = halo_model::clock::unix_ms();
            match cron.next_after(now_ms / 1000) {
                Some(next) => std::time::Duration::from_millis((next * 1000).saturating_sub(now_ms)),
                None => {
                    tracing::error!("the backup cron expression matches no time in the next 5 years");
                    std::time::Duration::from_secs(86_400)
                }
            }
        }
    }
}

/// One backup: written, verified, then the oldest past `keep` removed.
async fn once(r: &Hooks, dir: &Path, sched: &BackupSchedule) -> Result<(PathBuf, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let bytes = crate::backup::take(r).await.map_err(|e| e.to_string())?;
    let b = crate::backup::open(&bytes).map_err(|e| e.to_string())?;
    let ms = halo_model::clock::unix_ms();
    let name = format!("{PREFIX}{ms}-r{}.tar", b.manifest.revision);
    let file = dir.join(&name);
    // Written under a hidden name, verified from the disk, then the oldest
    // pruned, then named: never more than `keep`, never an unverified one.
    let tmp = dir.join(format!(".{name}.tmp"));
    crate::backup::write_private(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    let scratch = halo_proxy::run_dir::scratch_dir(&std::env::temp_dir(), "halo-backup-verify")
        .map_err(|e| format!("cannot make a scratch directory for the trial restore: {e}"))?;
    let written = std::fs::read(&tmp).map_err(|e| format!("cannot read back {}: {e}", tmp.display()))?;
    let verified = crate::backup::verify(&written, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(e) = verified {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("the new archive did not verify: {e}"));
    }
    prune(dir, sched, ms);
    std::fs::rename(&tmp, &file).map_err(|e| format!("cannot name {}: {e}", file.display()))?;
    Ok((file, bytes.len() as u64))
}

/// The scheduled archives in `dir` and when each was made (ms), oldest
/// first.
fn archives(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut ours: Vec<(PathBuf, u64)> = entries
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let ms = p.file_name()?.to_str()?.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()?;
            p.extension().is_some_and(|x| x == "tar").then_some((p, ms))
        })
        .collect();
    ours.sort_by_key(|(_, ms)| *ms);
    ours
}

/// The newest scheduled archive in `dir`: what to restore from when the
/// store is lost.
pub fn newest_archive(dir: &Path) -> Option<PathBuf> {
    archives(dir).pop().map(|(p, _)| p)
}

/// Removes the scheduled archives the retention does not keep, counting
/// the one about to be named (made at `incoming` ms) as already there.
fn prune(dir: &Path, sched: &BackupSchedule, incoming: u64) {
    let ours = archives(dir);
    let mut times: Vec<u64> = ours.iter().map(|(_, ms)| *ms).collect();
    times.push(incoming);
    let keep = kept(&times, sched);
    for (path, ms) in ours {
        if !keep.contains(&ms) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "removing an old backup failed");
            }
        }
    }
}

/// Which archive times (unix ms) the retention keeps: the newest
/// `keep_last`, and the newest of each of the last `keep_daily` days and
/// `keep_weekly` weeks that have one.
fn kept(times: &[u64], sched: &BackupSchedule) -> std::collections::BTreeSet<u64> {
    const DAY: u64 = 86_400_000;
    let mut newest_first = times.to_vec();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    newest_first.dedup();
    let mut keep: std::collections::BTreeSet<u64> = newest_first.iter().take(sched.keep_last).copied().collect();
    for (period, count) in [(DAY, sched.keep_daily), (7 * DAY, sched.keep_weekly)] {
        let mut seen = std::collections::BTreeSet::new();
        for t in &newest_first {
            if seen.len() >= count {
                break;
            }
            if seen.insert(t / period) {
                keep.insert(*t);
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_last_and_the_newest_of_each_day_and_week() {
        const H: u64 = 3_600_000;
        let day = 24 * H;
        // Four a day for 20 days, newest last.
        let times: Vec<u64> = (0..80u64).map(|i| (i / 4) * day + (i % 4) * H).collect();
        let sched = |last, daily, weekly| BackupSchedule {
            when: crate::When::Every(std::time::Duration::from_secs(3600)),
            dir: None,
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
        };
        let k = kept(&times, &sched(3, 0, 0));
        assert_eq!(k.into_iter().collect::<Vec<_>>(), vec![19 * day + H, 19 * day + 2 * H, 19 * day + 3 * H]);
        let k = kept(&times, &sched(1, 5, 0));
        // The newest overall, then the newest of days 19 (the same), 18, 17, 16, 15.
        assert_eq!(k.len(), 5);
        assert!((15..=19).all(|d| k.contains(&(d * day + 3 * H))), "{k:?}");
        let k = kept(&times, &sched(1, 0, 3));
        // Weeks (since the epoch) 2, 1 and 0: their newest.
        let weeks: Vec<u64> = k.iter().map(|t| t / (7 * day)).collect();
        assert_eq!(weeks, vec![0, 1, 2], "{k:?}");
        assert!(k.contains(&(6 * day + 3 * H)) && k.contains(&(13 * day + 3 * H)) && k.contains(&(19 * day + 3 * H)));
    }
}
