//! Leader election with fencing, and the leader loop that runs the
//! scheduler.
//!
//! A node with a fresh lease campaigns with `txn(if /halo/leader absent:
//! put it on my lease)`. The key's create revision is the **fencing
//! token**: every write the leader makes is a transaction that checks it,
//! so a deposed leader (paused, cut off) cannot write once another has
//! been elected. A leader that has not renewed its lease for two thirds of
//! the TTL, or finds the key not its own, steps down on its own. On one
//! node (`halo up`) the election is won at once, with the same token.
//!
//! The leader plans from the watch-fed [`View`], and only from a view that
//! has caught up with its election and its own last write: a plan is never
//! made from a state older than what the leader already changed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_store::{Compare, CompareOp, CompareTarget, Revision, Txn, TxnOp};

use crate::ctx::NodeCtx;
use crate::events::EventKind;
use crate::keys::{assignment_key, Assignment, LEADER};
use crate::membership::Membership;
use crate::scheduler;
use crate::state::{ClusterState, View};
use halo_model::lock::LockExt;

/// History the leader keeps when it compacts, and how often it does.
const KEEP_REVISIONS: Revision = 10_000;
const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// etcd refuses transactions of more than 128 operations.
const OPS_PER_TXN: usize = 100;

/// Campaigns for leadership and, while this node leads, runs the leader
/// loop. Whether the key is taken, and by whom, comes from the view: a
/// node campaigns only when [`campaign`] says so, so an idle cluster costs
/// the store no polling.
pub(crate) async fn run_election(ctx: Arc<NodeCtx>) {
    let (m, view) = (&ctx.m, &ctx.view);
    loop {
        let tick = tokio::time::sleep(Duration::from_millis(250));
        let watching = view.watching();
        let leader = view.current().leader.clone();
        if let Some(token) = m.leading() {
            // Renewed lately? A leader that is not renewing steps down
            // before its lease can expire and another be elected.
            let renewed = *m.last_renewed.locked();
            if renewed.is_none_or(|t| t.elapsed() > m.cfg.lease_ttl * 2 / 3) {
                m.step_down("lease not renewed in time");
            } else if watching && view.current().revision >= token && leader.is_none_or(|(_, t)| t != token) {
                m.step_down("the leader key changed");
            }
        } else if let Some(lease) = m.lease().filter(|_| campaign(watching, leader.as_ref(), &m.cfg.node)) {
            let me = m.cfg.node.as_bytes().to_vec();
            let txn = Txn::new().when(Compare::absent(LEADER)).and_then(TxnOp::put(LEADER, me.clone(), Some(lease)));
            match m.store.txn(txn).await {
                Ok(r) if r.succeeded => lead(&ctx, r.revision),
                Ok(_) => {
                    // Taken: remember its token; it may still be ours from
                    // before a transient step-down.
                    if let Ok(Some(kv)) = m.store.get(LEADER).await {
                        m.see_token(kv.create_revision);
                        if kv.value == me && kv.lease == Some(lease) {
                            lead(&ctx, kv.create_revision);
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "campaign failed"),
            }
        } else if let Some((_, token)) = &leader {
            m.see_token(*token);
        }
        tick.await;
    }
}

/// Whether to try for the key: it is free, or the view cannot say, or it
/// names this node (a leader that stepped down while its lease lived takes
/// it back under the same token, as the campaign's failure branch checks).
fn campaign(watching: bool, leader: Option<&(String, Revision)>, me: &str) -> bool {
    !watching || leader.is_none_or(|(name, _)| name == me)
}

fn lead(ctx: &NodeCtx, token: Revision) {
    let m = &ctx.m;
    m.see_token(token);
    if m.token.compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        m.counters.elections_won.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %m.cfg.node, token, "elected leader");
        m.events.info(EventKind::Elected, None, None, format!("{} leads (fencing token {token})", m.cfg.node));
        ctx.tasks.spawn(leader_loop(m.clone(), ctx.view.clone(), token));
    }
}

/// Runs the scheduler while this node leads with `token`, on every change
/// of the view and twice a second. Every write is fenced by the token.
async fn leader_loop(m: Arc<Membership>, view: Arc<View>, token: Revision) {
    let mut changed = view.subscribe();
    let mut compacted = Instant::now();
    let mut unplaced = BTreeMap::new();
    let mut rollouts = crate::rollout::Controller::default();
    let mut autoscaler = crate::autoscale::Controller::default();
    let mut held = BTreeMap::new();
    // When this leader first found each node that placements name gone.
    let mut gone_since: BTreeMap<String, Instant> = BTreeMap::new();
    // The view must have seen the election (and later our own writes).
    let mut seen_up_to = token;
    while m.leading() == Some(token) {
        let st = view.current();
        if st.revision >= seen_up_to {
            // etcd keeps every revision until compacted: the leader keeps
            // the last KEEP_REVISIONS, enough for a watch that broke for a
            // while to resume without listing again.
            if compacted.elapsed() > COMPACT_EVERY && st.revision > KEEP_REVISIONS {
                compacted = Instant::now();
                if let Err(e) = m.store.compact(st.revision - KEEP_REVISIONS).await {
                    tracing::debug!(error = %e, "compacting the store's history failed");
                }
            }
            let mut snap = st.snapshot();
            // The counts decided now go into this plan (the record follows
            // in the view).
            for (name, replicas) in autoscaler.tick(&m, token, &st, &mut seen_up_to).await {
                if let Some(w) = snap.services.get_mut(&name) {
                    w.replicas = replicas;
                    let budget = st.services.get(&name).and_then(|s| s.spec.budget);
                    w.min_ready = budget.map(|b| b.floor(replicas));
                }
            }
            if m.leading() != Some(token) {
                break;
            }
            let named: std::collections::BTreeSet<&String> =
                st.assignments.values().map(|a| &a.placement.node).filter(|n| !st.nodes.contains_key(*n)).collect();
            gone_since.retain(|n, _| named.contains(n));
            for n in named {
                snap.gone_for.insert(n.clone(), gone_since.entry(n.clone()).or_insert_with(Instant::now).elapsed());
            }
            let plan = scheduler::schedule(&snap);
            if plan.unplaced != unplaced {
                if !plan.unplaced.is_empty() {
                    tracing::warn!(unplaced = ?plan.unplaced, "replicas without a node with room (capacity, drains)");
                }
                unplaced = plan.unplaced.clone();
            }
            if plan.held != held {
                for (service, why) in &plan.held {
                    if held.get(service) != Some(why) {
                        tracing::info!(service = %service, why = %why, "a displacement waits for its budget");
                        m.events.info(EventKind::Rescheduled, Some(service), None, why.clone());
                    }
                }
                held = plan.held.clone();
            }
            if !plan.is_empty() {
                if let Err(e) = apply_plan(&m, token, &st, &plan, &mut seen_up_to).await {
                    tracing::warn!(error = %e, "applying the plan failed");
                }
            }
            rollouts.tick(&m, token, &st).await;
            crate::maintenance::tick(&m, token, &st, &mut seen_up_to).await;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!(token, "leader loop ended");
}

/// Writes `plan`, fenced by `token`, in transactions etcd accepts;
/// `written` follows the store revision after each one. A refused fence
/// makes this node step down.
async fn apply_plan(
    m: &Membership,
    token: Revision,
    st: &ClusterState,
    plan: &scheduler::Plan,
    written: &mut Revision,
) -> Result<(), halo_store::StoreError> {
    let mut ops = Vec::new();
    for id in &plan.remove {
        if let Some(a) = st.assignments.get(id) {
            tracing::info!(instance = %id, node = %a.placement.node, "unassigning");
            let (svc, node) = (Some(a.placement.service.as_str()), &a.placement.node);
            if !st.nodes.contains_key(node) {
                m.events.warn(EventKind::Rescheduled, svc, Some(id), format!("{id} leaves {node}: the node is gone"));
            } else if st.admin.get(node).is_some_and(|n| n.draining) {
                m.events.info(
                    EventKind::Rescheduled,
                    svc,
                    Some(id),
                    format!("{id} leaves {node}: the node is drained"),
                );
            }
            ops.push(TxnOp::Delete(assignment_key(&a.placement.node, id)));
        }
    }
    for p in &plan.add {
        tracing::info!(instance = %p.id, node = %p.node, "assigning");
        m.events.info(EventKind::Placed, Some(&p.service), Some(&p.id), format!("{} placed on {}", p.id, p.node));
        let a = Assignment { placement: p.clone(), token };
        ops.push(TxnOp::put(&assignment_key(&p.node, &p.id), serde_json::to_vec(&a).expect("encodes"), None));
    }
    for chunk in ops.chunks(OPS_PER_TXN) {
        let mut txn = Txn::new().when(Compare::new(LEADER, CompareOp::Equal, CompareTarget::CreateRevision(token)));
        txn.success = chunk.to_vec();
        let r = m.store.txn(txn).await?;
        if !r.succeeded {
            m.counters.fenced_writes.fetch_add(1, Ordering::Relaxed);
            m.step_down("a fenced write was refused: another leader holds the key");
            return Ok(());
        }
        *written = r.revision;
    }
    Ok(())
}
