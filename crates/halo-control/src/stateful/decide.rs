//! The decisions of a stateful service, as pure functions of what the
//! view holds: who may campaign for primary, which instances each proxy
//! reaches. No store, clock or process (tests below).

use std::collections::{BTreeMap, BTreeSet};

use halo_model::stateful::StatefulSpec;
use halo_store::Revision;

use super::Role;
use crate::keys::RoleRecord;
use crate::scheduler::ordinal;
use crate::state::HeldPrimary;

/// Why `me` may not campaign for its service's primary now, or `Ok`.
///
/// - With data somewhere: only a healthy instance with data and a known
///   position, the furthest ahead of those on live nodes (ties: the
///   lowest ordinal), and not further behind the last primary position
///   seen than `max_lag_on_failover`.
/// - With no data anywhere (a new service): the lowest ordinal on a live
///   node starts it.
pub fn may_campaign(
    service: &str,
    me: &str,
    roles: &BTreeMap<String, RoleRecord>,
    live: &BTreeSet<String>,
    spec: &StatefulSpec,
    last_primary_position: Option<u64>,
) -> Result<(), String> {
    let alive: Vec<(&String, &RoleRecord)> = roles.iter().filter(|(_, r)| live.contains(&r.node)).collect();
    let Some(mine) = roles.get(me) else { return Err("its role is not published yet".into()) };
    if !alive.iter().any(|(_, r)| r.has_data) {
        let first = alive.iter().map(|(id, _)| *id).min_by_key(|id| ordinal(service, id).unwrap_or(u32::MAX));
        return match first {
            Some(id) if id == me => Ok(()),
            Some(id) => Err(format!("a new service starts on its first instance, {id}")),
            None => Err("no instance published".into()),
        };
    }
    if !mine.has_data {
        return Err("it has no data yet (a replica is cloned from a primary)".into());
    }
    if !mine.healthy {
        return Err(mine.reason.clone().unwrap_or_else(|| "its check fails".into()));
    }
    let Some(pos) = mine.position else { return Err("its position is not known yet".into()) };
    let key = |id: &str, r: &RoleRecord| (r.position, std::cmp::Reverse(ordinal(service, id).unwrap_or(u32::MAX)));
    let best = alive
        .iter()
        .filter(|(_, r)| r.has_data && r.healthy && r.position.is_some())
        // A primary's record outlives its key for a moment; it is no candidate.
        .filter(|(_, r)| matches!(r.role, Role::Replica | Role::Waiting))
        .max_by_key(|(id, r)| key(id, r))
        .map(|(id, _)| id.as_str());
    if best != Some(me) {
        return Err(format!("{} is further ahead", best.unwrap_or("another instance")));
    }
    if let (Some(max), Some(last)) = (spec.max_lag_on_failover, last_primary_position) {
        let lag = last.saturating_sub(pos);
        if lag > max {
            return Err(format!(
                "it is {lag} behind the last primary position seen, more than max_lag_on_failover ({max})"
            ));
        }
    }
    Ok(())
}

/// The instances a proxy reaches for a stateful service: its primary,
/// once promoted under the current token, and its replicas following that
/// token (with their lag behind the primary's last position).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routable {
    pub primary: Option<String>,
    /// (instance, lag), lag `None` while a position is unknown.
    pub replicas: Vec<(String, Option<u64>)>,
}

pub fn routable(primary: Option<&HeldPrimary>, roles: Option<&BTreeMap<String, RoleRecord>>) -> Routable {
    let (Some(p), Some(roles)) = (primary, roles) else { return Routable::default() };
    let token: Revision = p.token;
    let promoted = roles.get(&p.record.instance).filter(|r| r.role == Role::Primary && r.token == token);
    let Some(prim) = promoted else { return Routable::default() };
    let replicas = roles
        .iter()
        .filter(|(_, r)| r.role == Role::Replica && r.token == token && r.healthy)
        .map(|(id, r)| (id.clone(), prim.position.zip(r.position).map(|(a, b)| a.saturating_sub(b))))
        .collect();
    Routable { primary: Some(p.record.instance.clone()), replicas }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrimaryRecord;

    fn rec(node: &str, role: Role, position: Option<u64>, healthy: bool, has_data: bool) -> RoleRecord {
        RoleRecord {
            node: node.into(),
            role,
            token: 7,
            position,
            healthy,
            has_data,
            addr: None,
            reason: None,
            candidacy: None,
        }
    }

    fn spec(max_lag: Option<u64>) -> StatefulSpec {
        let text = "name = \"pg\"\nreplicas = 3\n[run]\ncommand = \"x\"\n[stateful]\npromote = [\"p\"]\nfollow = [\"f\"]\nposition = [\"q\"]\nclone = [\"c\"]\n";
        let (_, mut s) = halo_model::parse_service("t", text).unwrap();
        let mut st = s.stateful.take().unwrap();
        st.max_lag_on_failover = max_lag;
        st
    }

    fn live(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_new_service_starts_on_its_first_live_instance() {
        let roles: BTreeMap<String, RoleRecord> = [
            ("pg-0".to_string(), rec("n1", Role::Waiting, None, false, false)),
            ("pg-1".to_string(), rec("n2", Role::Waiting, None, false, false)),
        ]
        .into();
        let s = spec(None);
        assert_eq!(may_campaign("pg", "pg-0", &roles, &live(&["n1", "n2"]), &s, None), Ok(()));
        assert!(may_campaign("pg", "pg-1", &roles, &live(&["n1", "n2"]), &s, None).unwrap_err().contains("pg-0"));
        // pg-0's node is gone: pg-1 starts it.
        assert_eq!(may_campaign("pg", "pg-1", &roles, &live(&["n2"]), &s, None), Ok(()));
    }

    #[test]
    fn the_furthest_healthy_replica_campaigns_within_the_lag_limit() {
        let roles: BTreeMap<String, RoleRecord> = [
            ("pg-0".to_string(), rec("n1", Role::Replica, Some(100), true, true)),
            ("pg-1".to_string(), rec("n2", Role::Replica, Some(300), true, true)),
            ("pg-2".to_string(), rec("n3", Role::Replica, Some(300), true, true)),
            ("pg-3".to_string(), rec("n4", Role::Replica, Some(900), false, true)),
            ("pg-4".to_string(), rec("n5", Role::Waiting, None, false, false)),
        ]
        .into();
        let all = live(&["n1", "n2", "n3", "n4", "n5"]);
        let s = spec(None);
        // pg-3 is furthest but unhealthy; pg-1 and pg-2 tie: the lower ordinal.
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &s, None), Ok(()));
        assert!(may_campaign("pg", "pg-2", &roles, &all, &s, None).unwrap_err().contains("pg-1"));
        assert!(may_campaign("pg", "pg-0", &roles, &all, &s, None).is_err());
        assert!(may_campaign("pg", "pg-3", &roles, &all, &s, None).unwrap_err().contains("check"));
        assert!(may_campaign("pg", "pg-4", &roles, &all, &s, None).unwrap_err().contains("no data"));
        // pg-1 on a node that is gone: pg-2 next.
        let without_n2 = live(&["n1", "n3", "n4", "n5"]);
        assert_eq!(may_campaign("pg", "pg-2", &roles, &without_n2, &s, None), Ok(()));
        // The last primary was at 1000: 700 behind is too far for a 500 limit.
        let strict = spec(Some(500));
        let e = may_campaign("pg", "pg-1", &roles, &all, &strict, Some(1000)).unwrap_err();
        assert!(e.contains("max_lag_on_failover (500)"), "{e}");
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &strict, Some(700)), Ok(()));
    }

    #[test]
    fn proxies_reach_a_promoted_primary_and_the_replicas_following_it() {
        let held = HeldPrimary {
            record: PrimaryRecord { instance: "pg-1".into(), node: "n2".into(), since_ms: 0 },
            token: 7,
            lease: None,
        };
        let mut roles: BTreeMap<String, RoleRecord> = [
            ("pg-0".to_string(), rec("n1", Role::Replica, Some(100), true, true)),
            ("pg-1".to_string(), rec("n2", Role::Replica, Some(300), true, true)),
            ("pg-2".to_string(), rec("n3", Role::Replica, Some(250), false, true)),
        ]
        .into();
        // Key taken, not promoted yet: nothing is reached.
        assert_eq!(routable(Some(&held), Some(&roles)), Routable::default());
        roles.get_mut("pg-1").unwrap().role = Role::Primary;
        let r = routable(Some(&held), Some(&roles));
        assert_eq!(r.primary.as_deref(), Some("pg-1"));
        assert_eq!(r.replicas, [("pg-0".to_string(), Some(200))], "pg-2 is unhealthy");
        // A primary of an older token (a stale record) is not reached.
        roles.get_mut("pg-1").unwrap().token = 6;
        assert_eq!(routable(Some(&held), Some(&roles)), Routable::default());
        assert_eq!(routable(None, Some(&roles)), Routable::default());
    }
}
