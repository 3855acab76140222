//! Rolling node maintenance (`halo node maintain`): one node at a time (or
//! `max_unavailable`), drain it within every service's budget, run the
//! operator's command on it (a reboot, an OS upgrade: halo itself may go
//! away and come back), wait for it to be back, undrain it, go on.
//!
//! The whole run is one record (`/halo/maintenance`): the API creates it,
//! the leader advances it ([`advance`], pure: the record and what the view
//! shows in, the next record and the drains to write out), fenced by its
//! token, so a new leader carries on where the last one was, also when the
//! node under maintenance was the leader. The node named in a running step
//! runs the command itself ([`run_here`]): detached from halo, in a session
//! of its own, with its exit status written to a file in the data dir, so
//! a command that restarts halo is seen through by the next process, which
//! reports the status (`/halo/maintenance-results/NODE`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::ctx::NodeCtx;
use crate::events::EventKind;
use crate::keys::{maintenance_result_key, node_admin_key, NodeAdmin, LEADER, MAINTENANCE};
pub use crate::keys::{MaintenanceRecord, MaintenanceResult, NodeStep, Phase, RunState};
use crate::membership::Membership;
use crate::state::ClusterState;
use halo_store::{Compare, CompareOp, CompareTarget, Revision, Txn, TxnOp};

/// The name of `node`'s run in maintenance `id`.
pub fn run_id(id: u64, node: &str) -> String {
    format!("{id}-{node}")
}

/// What [`advance`] reads of the cluster.
pub(crate) struct Facts<'a> {
    /// Live nodes (holding a lease).
    pub live: &'a BTreeSet<String>,
    /// Nodes drained now.
    pub draining: &'a BTreeSet<String>,
    /// Instances placed on each node that a drain moves (stateless).
    pub movable: &'a BTreeMap<String, usize>,
    /// Each node's last reported command result.
    pub results: &'a BTreeMap<String, MaintenanceResult>,
}

/// The next state of `rec`, and the drain marks to set (node, draining);
/// `None` when nothing changes.
pub(crate) fn advance(rec: &MaintenanceRecord, f: &Facts) -> Option<(MaintenanceRecord, Vec<(String, bool)>)> {
    if rec.state != RunState::Running {
        return None;
    }
    let mut next = rec.clone();
    let mut marks = Vec::new();
    for step in &mut next.nodes {
        let run = run_id(rec.id, &step.node);
        match step.phase {
            Phase::Draining => {
                if !f.draining.contains(&step.node) {
                    marks.push((step.node.clone(), true));
                }
                let left = f.movable.get(&step.node).copied().unwrap_or(0);
                if left == 0 && f.live.contains(&step.node) {
                    step.phase = Phase::Running;
                    step.detail = "running the command".into();
                } else if left > 0 {
                    step.detail = format!("{left} instance{} left to move", if left == 1 { "" } else { "s" });
                } else {
                    step.detail = "drained; waiting for the node to be up".into();
                }
            }
            Phase::Running => match f.results.get(&step.node).filter(|r| r.run == run) {
                Some(r) if r.status == Some(0) && f.live.contains(&step.node) => {
                    if !step.was_draining {
                        marks.push((step.node.clone(), false));
                    }
                    step.phase = Phase::Done;
                    step.detail = "the command succeeded; the node is back".into();
                }
                Some(r) if r.status == Some(0) => step.detail = "the command succeeded; waiting for the node".into(),
                Some(r) => {
                    let how =
                        r.status.map_or("was killed by a signal".to_string(), |s| format!("exited with status {s}"));
                    let last = r.output.lines().last().unwrap_or("").trim();
                    step.phase = Phase::Failed;
                    step.detail = if last.is_empty() {
                        format!("the command {how}")
                    } else {
                        format!("the command {how}: {last}")
                    };
                    next.state = RunState::Failed;
                    next.reason = format!("{}: {}; the node stays drained", step.node, step.detail);
                }
                None if !f.live.contains(&step.node) => {
                    step.detail = "the node is away (its command may restart it)".into()
                }
                None => step.detail = "running the command".into(),
            },
            Phase::Pending | Phase::Done | Phase::Failed => {}
        }
    }
    if next.state == RunState::Running {
        let mut under_way = next.nodes.iter().filter(|s| s.phase.under_way()).count() as u32;
        for step in &mut next.nodes {
            if under_way >= rec.max_unavailable {
                break;
            }
            if step.phase == Phase::Pending {
                step.was_draining = f.draining.contains(&step.node);
                step.phase = Phase::Draining;
                step.detail = "draining".into();
                if !step.was_draining {
                    marks.push((step.node.clone(), true));
                }
                under_way += 1;
            }
        }
        if next.nodes.iter().all(|s| s.phase == Phase::Done) {
            next.state = RunState::Done;
        }
    }
    marks.sort();
    marks.dedup();
    (next != *rec || !marks.is_empty()).then_some((next, marks))
}

/// The leader's pass: advances the maintenance under way, if any, writing
/// it and the drain marks in one transaction fenced by `token` (and by
/// the record's revision, so a cancel in between is not overwritten).
pub(crate) async fn tick(m: &Membership, token: Revision, st: &ClusterState, written: &mut Revision) {
    let Some((rec, rev)) = &st.maintenance else { return };
    let live: BTreeSet<String> = st.nodes.keys().cloned().collect();
    let draining: BTreeSet<String> = st.admin.iter().filter(|(_, a)| a.draining).map(|(n, _)| n.clone()).collect();
    let mut movable: BTreeMap<String, usize> = BTreeMap::new();
    for a in st.assignments.values() {
        let stateful = st.services.get(&a.placement.service).is_some_and(|s| s.spec.stateful.is_some());
        if !stateful {
            *movable.entry(a.placement.node.clone()).or_default() += 1;
        }
    }
    let facts = Facts { live: &live, draining: &draining, movable: &movable, results: &st.maintenance_results };
    let Some((mut next, marks)) = advance(rec, &facts) else { return };
    next.token = token;
    let mut txn = Txn::new()
        .when(Compare::new(LEADER, CompareOp::Equal, CompareTarget::CreateRevision(token)))
        .when(Compare::mod_revision(MAINTENANCE, *rev));
    txn.success.push(TxnOp::put(MAINTENANCE, serde_json::to_vec(&next).expect("encodes"), None));
    for (node, draining) in &marks {
        let v = serde_json::to_vec(&NodeAdmin { draining: *draining }).expect("encodes");
        txn.success.push(TxnOp::put(&node_admin_key(node), v, None));
    }
    match m.store.txn(txn).await {
        Ok(r) if r.succeeded => {
            *written = (*written).max(r.revision);
            for (before, after) in rec.nodes.iter().zip(&next.nodes) {
                if before.phase != after.phase {
                    let what = format!("maintenance of {}: {:?}: {}", after.node, after.phase, after.detail);
                    let failed = after.phase == Phase::Failed;
                    if failed {
                        m.events.warn(EventKind::Maintenance, None, None, what.to_lowercase());
                    } else {
                        m.events.info(EventKind::Maintenance, None, None, what.to_lowercase());
                    }
                }
            }
            if next.state == RunState::Done {
                m.events.info(EventKind::Maintenance, None, None, "maintenance done on every node".into());
            }
        }
        Ok(_) => tracing::debug!("a maintenance write was refused (cancelled, or leadership moved)"),
        Err(e) => tracing::warn!(error = %e, "advancing the maintenance failed"),
    }
}

/// Where a node keeps its maintenance runs' output and exit status.
fn runs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("maintenance")
}

/// Runs this node's maintenance command when its step is `running`, and
/// reports how it ended (also from a later process, if the command
/// restarted halo): every half second and on every view change.
pub(crate) async fn run_here(ctx: Arc<NodeCtx>) {
    let mut changed = ctx.view.subscribe();
    let me = ctx.m.cfg.node.clone();
    let dir = runs_dir(&ctx.data_dir);
    loop {
        let st = ctx.view.current();
        if let Some((rec, _)) = &st.maintenance {
            let mine = rec.nodes.iter().find(|s| s.node == me && s.phase == Phase::Running);
            if let (Some(_), RunState::Running) = (mine, rec.state) {
                let run = run_id(rec.id, &me);
                let reported = st.maintenance_results.get(&me).is_some_and(|r| r.run == run);
                if !reported {
                    if let Err(e) = step(&ctx, &dir, &run, &rec.command).await {
                        tracing::warn!(run = %run, error = %e, "the maintenance command could not be run or reported");
                    }
                }
            }
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Starts `run` (once), or reports its end.
async fn step(ctx: &NodeCtx, dir: &Path, run: &str, command: &str) -> std::io::Result<()> {
    let started = dir.join(format!("{run}.started"));
    let rc = dir.join(format!("{run}.rc"));
    let log = dir.join(format!("{run}.log"));
    if let Ok(text) = std::fs::read_to_string(&rc) {
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = output.lines().rev().take(5).collect();
        let status = text.trim().parse::<i32>().ok().filter(|s| *s < 128);
        let result = MaintenanceResult {
            run: run.to_string(),
            status,
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        };
        let v = serde_json::to_vec(&result).expect("encodes");
        ctx.store.put(&maintenance_result_key(&ctx.m.cfg.node), v, None).await.map_err(std::io::Error::other)?;
        tracing::info!(run, status = ?result.status, "maintenance command ended");
        return Ok(());
    }
    if started.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(&started, b"")?;
    tracing::info!(run, command, "running the maintenance command");
    ctx.m.events.info(
        EventKind::Maintenance,
        None,
        None,
        format!("maintenance of {}: running `{command}`", ctx.m.cfg.node),
    );
    // A shell in a session of its own runs the command and writes its exit
    // status; the first shell exits at once, so nothing of halo's waits
    // for it and a halo that goes away leaves it running.
    let script = "(setsid sh -c \"$0\" >\"$1\" 2>&1 </dev/null; echo $? >\"$2.tmp\"; mv \"$2.tmp\" \"$2\") \
                  </dev/null >/dev/null 2>&1 &";
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(script).arg(command).arg(&log).arg(&rc);
    cmd.env("HALO_NODE", &ctx.m.cfg.node).env("HALO_PID", std::process::id().to_string());
    cmd.env_remove(halo_model::OWNER_VAR).stdin(std::process::Stdio::null());
    let status = cmd.status().await?;
    if !status.success() {
        return Err(std::io::Error::other(format!("the shell starting it ended with {status}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(nodes: &[&str], max: u32) -> MaintenanceRecord {
        MaintenanceRecord {
            id: 7,
            command: "reboot".into(),
            max_unavailable: max,
            nodes: nodes
                .iter()
                .map(|n| NodeStep {
                    node: n.to_string(),
                    phase: Phase::Pending,
                    detail: String::new(),
                    was_draining: false,
                })
                .collect(),
            state: RunState::Running,
            reason: String::new(),
            token: 0,
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_node_at_a_time_drained_run_back_and_undrained() {
        let live = set(&["a", "b", "c"]);
        let mut draining = set(&[]);
        let mut movable = BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        let mut results = BTreeMap::new();
        let mut r = rec(&["a", "b", "c"], 1);
        let pass = |r: &MaintenanceRecord,
                    d: &BTreeSet<String>,
                    m: &BTreeMap<String, usize>,
                    res: &BTreeMap<String, MaintenanceResult>| {
            advance(r, &Facts { live: &live, draining: d, movable: m, results: res })
        };
        let (next, marks) = pass(&r, &draining, &movable, &results).unwrap();
        assert_eq!(marks, vec![("a".to_string(), true)], "only the first node is drained");
        assert_eq!(
            next.nodes.iter().map(|s| s.phase).collect::<Vec<_>>(),
            [Phase::Draining, Phase::Pending, Phase::Pending]
        );
        r = next;
        draining.insert("a".into());
        let (next, marks) = pass(&r, &draining, &movable, &results).unwrap();
        assert!(marks.is_empty());
        assert_eq!(next.nodes[0].detail, "2 instances left to move");
        r = next;
        assert!(pass(&r, &draining, &movable, &results).is_none(), "nothing changed");
        movable.remove("a");
        let (next, _) = pass(&r, &draining, &movable, &results).unwrap();
        assert_eq!(next.nodes[0].phase, Phase::Running);
        r = next;
        // Another run's result is not this one's.
        results
            .insert("a".to_string(), MaintenanceResult { run: "6-a".into(), status: Some(0), output: String::new() });
        assert!(pass(&r, &draining, &movable, &results).is_none());
        results
            .insert("a".to_string(), MaintenanceResult { run: "7-a".into(), status: Some(0), output: String::new() });
        let (next, marks) = pass(&r, &draining, &movable, &results).unwrap();
        assert_eq!(marks, vec![("a".to_string(), false), ("b".to_string(), true)], "a undrained, b drained");
        assert_eq!(
            next.nodes.iter().map(|s| s.phase).collect::<Vec<_>>(),
            [Phase::Done, Phase::Draining, Phase::Pending]
        );
    }

    #[test]
    fn a_failed_command_stops_the_run_and_leaves_the_node_drained() {
        let live = set(&["a", "b"]);
        let draining = set(&["a"]);
        let movable = BTreeMap::new();
        let mut r = rec(&["a", "b"], 1);
        r.nodes[0].phase = Phase::Running;
        let results = BTreeMap::from([(
            "a".to_string(),
            MaintenanceResult { run: "7-a".into(), status: Some(3), output: "apt: no space left".into() },
        )]);
        let (next, marks) =
            advance(&r, &Facts { live: &live, draining: &draining, movable: &movable, results: &results }).unwrap();
        assert!(marks.is_empty(), "{marks:?}");
        assert_eq!(next.state, RunState::Failed);
        assert_eq!(next.nodes[0].detail, "the command exited with status 3: apt: no space left");
        assert_eq!(next.nodes[1].phase, Phase::Pending);
        assert!(next.reason.ends_with("the node stays drained"), "{}", next.reason);
    }

    #[test]
    fn up_to_max_unavailable_at_once_and_an_operators_drain_is_kept() {
        let live = set(&["a", "b", "c"]);
        let draining = set(&["b"]);
        let movable = BTreeMap::new();
        let results = BTreeMap::new();
        let r = rec(&["a", "b", "c"], 2);
        let (next, marks) =
            advance(&r, &Facts { live: &live, draining: &draining, movable: &movable, results: &results }).unwrap();
        assert_eq!(marks, vec![("a".to_string(), true)]);
        assert!(next.nodes[1].was_draining);
        assert_eq!(next.nodes[2].phase, Phase::Pending);
        let mut r = next;
        r.nodes[1].phase = Phase::Running;
        let results = BTreeMap::from([(
            "b".to_string(),
            MaintenanceResult { run: "7-b".into(), status: Some(0), output: String::new() },
        )]);
        let (_, marks) =
            advance(&r, &Facts { live: &live, draining: &draining, movable: &movable, results: &results }).unwrap();
        assert!(!marks.contains(&("b".to_string(), false)), "b was drained before: it stays drained: {marks:?}");
    }
}
