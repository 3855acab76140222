//! The rollout verbs of [`Node`]: status, orders for the leader, retry and
//! undo, and the stable revision `halo apply` keeps for a canary.

use std::sync::Arc;

use halo_model::ServiceFile;

use super::{Node, NodeError};
use crate::events::EventKind;
use crate::keys::{rollout_command_key, service_key, RolloutCommand, RolloutState, ServiceRecord, StableRecord};
use crate::views::RolloutView;

impl Node {
    /// The canary rollout of `service`: in progress, or the last one.
    pub fn rollout(&self, service: &str) -> Result<RolloutView, NodeError> {
        let st = self.ctx.view.current();
        if !st.services.contains_key(service) {
            return Err(NodeError::NotFound(service.into()));
        }
        RolloutView::new(&st, service).ok_or_else(|| {
            NodeError::BadRequest(format!(
                "service '{service}' has had no canary rollout; a change rolls out as a canary with \
                 [release] strategy = \"canary\" and steps in its file"
            ))
        })
    }

    /// Asks the leader to promote or abort the canary of `service` now.
    pub async fn rollout_command(&self, service: &str, cmd: RolloutCommand) -> Result<(), NodeError> {
        let st = self.ctx.view.current();
        if !st.services.contains_key(service) {
            return Err(NodeError::NotFound(service.into()));
        }
        if st.canary(service).is_none() {
            return Err(NodeError::BadRequest(format!(
                "service '{service}' has no canary in progress (`halo rollout status {service}` shows the last one)"
            )));
        }
        let v = serde_json::to_vec(&cmd).expect("encodes");
        self.ctx.store.put(&rollout_command_key(service), v, None).await?;
        self.ctx.m.events.info(
            EventKind::Rollout,
            Some(service),
            None,
            format!("{cmd:?} asked by an operator").to_lowercase(),
        );
        Ok(())
    }

    /// Starts the last canary of `service` again (after a rollback or an
    /// abort), against the same stable revision.
    pub async fn rollout_retry(&self, service: &str) -> Result<(), NodeError> {
        let (svc, rec) = self.ended_rollout(service, &[RolloutState::RolledBack, RolloutState::Aborted], "retry")?;
        if svc.template != rec.stable_template {
            return Err(NodeError::BadRequest(format!(
                "service '{service}' changed since its canary ended; apply the canary's file again instead"
            )));
        }
        let current = StableRecord { spec: svc.record.spec.clone(), restart_generation: svc.record.restart_generation };
        let next = ServiceRecord {
            spec: rec.canary_spec.spec.clone(),
            restart_generation: rec.canary_spec.restart_generation,
            stable: Some(current),
        };
        self.put_if_unchanged(&service_key(service), svc.revision, &next).await
    }

    /// Goes straight back to the revision a promoted canary replaced, one
    /// instance at a time, without a canary phase.
    pub async fn rollout_undo(&self, service: &str) -> Result<(), NodeError> {
        let (svc, rec) = self.ended_rollout(service, &[RolloutState::Promoted], "undo")?;
        if svc.template != rec.canary_template {
            return Err(NodeError::BadRequest(format!(
                "service '{service}' changed since its canary was promoted; apply the file you want instead"
            )));
        }
        let next = ServiceRecord {
            spec: rec.stable_spec.spec.clone(),
            restart_generation: rec.stable_spec.restart_generation,
            stable: None,
        };
        self.put_if_unchanged(&service_key(service), svc.revision, &next).await
    }

    /// The service and its last rollout, if that ended in one of `states`
    /// and no canary runs now.
    fn ended_rollout(
        &self,
        service: &str,
        states: &[RolloutState],
        verb: &str,
    ) -> Result<(Arc<crate::state::Svc>, crate::keys::RolloutRecord), NodeError> {
        let st = self.ctx.view.current();
        let svc = st.services.get(service).ok_or_else(|| NodeError::NotFound(service.into()))?.clone();
        if st.canary(service).is_some() {
            return Err(NodeError::BadRequest(format!(
                "service '{service}' has a canary in progress; promote or abort it first"
            )));
        }
        let rec = st.rollouts.get(service).filter(|r| states.contains(&r.state)).cloned().ok_or_else(|| {
            let was = st.rollouts.get(service).map(|r| format!("{:?}", r.state).to_lowercase());
            NodeError::BadRequest(format!(
                "nothing to {verb} for service '{service}' (last rollout: {})",
                was.unwrap_or_else(|| "none".into())
            ))
        })?;
        Ok((svc, rec))
    }
}

/// The stable revision to keep when `old` becomes `file`: a template
/// change under `strategy = "canary"` (or `blue_green`) keeps the revision stable instances
/// run (the one already kept, during a canary) so the new one rolls out as
/// a canary; going back to that revision, or any other strategy, keeps none.
/// `seen` is the view's reading of `old` when the view has its revision:
/// then its templates are known and nothing is parsed again.
pub(super) fn stable_for(
    key: &str,
    old: &ServiceRecord,
    seen: Option<&crate::state::Svc>,
    file: &ServiceFile,
    spec: &halo_model::ServiceSpec,
) -> Result<Option<StableRecord>, NodeError> {
    if spec.release.strategy == halo_model::release::Strategy::Rolling {
        return Ok(None);
    }
    let stable = old
        .stable
        .clone()
        .unwrap_or(StableRecord { spec: old.spec.clone(), restart_generation: old.restart_generation });
    let stable_template = match seen {
        Some(svc) => svc.stable.as_ref().map_or_else(|| svc.template.clone(), |s| s.template.clone()),
        None => {
            let (stable_file, _) = halo_model::parse_stored_service(key, &stable.spec)?;
            ServiceRecord::template(&stable_file, stable.restart_generation)
        }
    };
    let new_template = ServiceRecord::template(file, old.restart_generation);
    Ok((stable_template != new_template).then_some(stable))
}
