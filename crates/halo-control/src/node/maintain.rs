//! The maintenance verbs of [`Node`]: ask for a rolling maintenance, read
//! it, cancel it. The leader carries it out ([`crate::maintenance`]).

use halo_model::clock::unix_ms;
use halo_store::{Compare, Txn, TxnOp};

use super::{Node, NodeError};
use crate::events::EventKind;
use crate::keys::MAINTENANCE;
use crate::maintenance::{MaintenanceRecord, NodeStep, Phase, RunState};

impl Node {
    /// Starts a rolling maintenance of `nodes` (every live node with
    /// `all`): each is drained, runs `command`, comes back and is undrained,
    /// `max_unavailable` at a time. Refused while another runs.
    pub async fn maintain(
        &self,
        nodes: &[String],
        all: bool,
        command: &str,
        max_unavailable: u32,
    ) -> Result<MaintenanceRecord, NodeError> {
        let st = self.ctx.view.current();
        if command.trim().is_empty() {
            return Err(NodeError::BadRequest(
                "give the command each node runs, as in --command 'apt-get -y upgrade && reboot'".into(),
            ));
        }
        if max_unavailable == 0 {
            return Err(NodeError::BadRequest("max_unavailable must be at least 1".into()));
        }
        let names: Vec<String> = match (all, nodes.is_empty()) {
            (true, true) => st.nodes.keys().cloned().collect(),
            (false, false) => nodes.to_vec(),
            (true, false) => return Err(NodeError::BadRequest("name nodes or give --all, not both".into())),
            (false, true) => return Err(NodeError::BadRequest("name the nodes to maintain, or give --all".into())),
        };
        for (i, n) in names.iter().enumerate() {
            if !st.nodes.contains_key(n) {
                let known: Vec<&str> = st.nodes.keys().map(String::as_str).collect();
                return Err(NodeError::BadRequest(format!(
                    "node '{n}' is not up (live nodes: {}); a node is maintained while it runs halo",
                    known.join(", ")
                )));
            }
            if names[..i].contains(n) {
                return Err(NodeError::BadRequest(format!("node '{n}' is named twice")));
            }
        }
        let rev = match &st.maintenance {
            Some((rec, _)) if rec.state == RunState::Running => {
                let at: Vec<String> =
                    rec.nodes.iter().filter(|s| s.phase != Phase::Done).map(|s| s.node.clone()).collect();
                return Err(NodeError::BadRequest(format!(
                    "a maintenance is under way (nodes left: {}); wait for it, or cancel it with \
                     `halo node maintenance --cancel`",
                    at.join(", ")
                )));
            }
            Some((_, rev)) => *rev,
            None => 0,
        };
        let rec = MaintenanceRecord {
            id: unix_ms(),
            command: command.to_string(),
            max_unavailable,
            nodes: names
                .iter()
                .map(|n| NodeStep {
                    node: n.clone(),
                    phase: Phase::Pending,
                    detail: "waiting its turn".into(),
                    was_draining: false,
                })
                .collect(),
            state: RunState::Running,
            reason: String::new(),
            token: 0,
        };
        let v = serde_json::to_vec(&rec).expect("encodes");
        let txn = Txn::new().when(Compare::mod_revision(MAINTENANCE, rev)).and_then(TxnOp::put(MAINTENANCE, v, None));
        if !self.ctx.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        self.ctx.m.events.info(
            EventKind::Maintenance,
            None,
            None,
            format!("maintenance of {} asked: `{command}`, {max_unavailable} at a time", names.join(", ")),
        );
        Ok(rec)
    }

    /// The maintenance under way, or the last one.
    pub fn maintenance(&self) -> Option<MaintenanceRecord> {
        self.ctx.view.current().maintenance.as_ref().map(|(r, _)| r.clone())
    }

    /// Stops the maintenance under way: no other node starts; the nodes it
    /// drained stay drained (`halo node undrain` puts them back).
    pub async fn cancel_maintenance(&self) -> Result<MaintenanceRecord, NodeError> {
        let st = self.ctx.view.current();
        let Some((rec, rev)) = st.maintenance.clone().filter(|(r, _)| r.state == RunState::Running) else {
            return Err(NodeError::BadRequest("no maintenance is under way".into()));
        };
        let drained: Vec<String> = rec
            .nodes
            .iter()
            .filter(|s| matches!(s.phase, Phase::Draining | Phase::Running))
            .map(|s| s.node.clone())
            .collect();
        let mut next = rec;
        next.state = RunState::Cancelled;
        next.reason = if drained.is_empty() {
            "cancelled by an operator".into()
        } else {
            format!("cancelled by an operator; {} stay drained (`halo node undrain`)", drained.join(", "))
        };
        let v = serde_json::to_vec(&next).expect("encodes");
        let txn = Txn::new().when(Compare::mod_revision(MAINTENANCE, rev)).and_then(TxnOp::put(MAINTENANCE, v, None));
        if !self.ctx.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        self.ctx.m.events.info(EventKind::Maintenance, None, None, next.reason.clone());
        Ok(next)
    }
}
