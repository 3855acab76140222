//! The decisions of a stateful service, as pure functions of what the
//! view holds: who may campaign for primary, which instances each proxy
//! reaches. No store, clock or process (tests below).

use std::collections::{BTreeMap, BTreeSet};

use halo_model::stateful::StatefulSpec;
use halo_store::Revision;

use super::Role;
use crate::keys::{Handed, RoleRecord, SwitchoverRecord, SyncRecord};
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
/// - Synchronous (`sync` recorded by the last primary): only that primary
///   itself, or one of its standbys; the standbys must all be on live
///   nodes with a known position (any of them may hold the last
///   acknowledged write), and it is the furthest ahead of them. With no
///   standby recorded, only the last primary: no other instance is known
///   to have every write it acknowledged.
pub fn may_campaign(
    service: &str,
    me: &str,
    roles: &BTreeMap<String, RoleRecord>,
    live: &BTreeSet<String>,
    spec: &StatefulSpec,
    last_primary_position: Option<u64>,
    sync: Option<&SyncRecord>,
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
    if let Some(sync) = sync {
        if sync.primary == me {
            // It has every write it acknowledged, unless it was demoted
            // since (then it is made a replica first).
            return match mine.role {
                Role::Replica | Role::Waiting => Ok(()),
                _ => Err("the last primary, demoted: it follows the next one".into()),
            };
        }
        if sync.standbys.is_empty() {
            return Err(format!(
                "the last primary, {}, had no synchronous standby: only it has every acknowledged write",
                sync.primary
            ));
        }
        if !sync.standbys.iter().any(|s| s == me) {
            return Err(format!("it is not a synchronous standby of the last primary ({})", sync.standbys.join(", ")));
        }
        let missing: Vec<&str> = sync
            .standbys
            .iter()
            .filter(|s| !alive.iter().any(|(id, r)| id == s && r.position.is_some()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "synchronous standby {} is not reachable and may hold the last acknowledged write",
                missing.join(", ")
            ));
        }
        let best = alive.iter().filter(|(id, _)| sync.standbys.contains(id)).max_by_key(|(id, r)| key(id, r));
        return match best {
            Some((id, _)) if id.as_str() == me => Ok(()),
            Some((id, _)) => Err(format!("{id} is further ahead")),
            None => Err("no synchronous standby published".into()),
        };
    }
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

/// How long a switchover may take from the operator's order to the
/// handover, and from the handover to the target's taking the key: past
/// either, it is void (the primary stays, or the usual failover rules
/// choose the next).
pub const SWITCHOVER_TIMEOUT_MS: u64 = 30_000;
pub const HANDOVER_TIMEOUT_MS: u64 = 10_000;

/// Where a switchover stands, for the primary of `held` (`None`: the
/// service has no primary now).
#[derive(Debug, PartialEq, Eq)]
pub enum SwitchoverState<'a> {
    None,
    /// Asked of the primary; the target, if the operator named one.
    Asked {
        to: Option<&'a str>,
    },
    /// Handed over: the target may take the key.
    Handed(&'a Handed),
}

pub fn switchover_state(sw: Option<&SwitchoverRecord>, held: Option<Revision>, now_ms: u64) -> SwitchoverState<'_> {
    let Some(sw) = sw else { return SwitchoverState::None };
    match (held, &sw.handed) {
        (Some(token), None) if token == sw.token && now_ms.saturating_sub(sw.asked_ms) < SWITCHOVER_TIMEOUT_MS => {
            SwitchoverState::Asked { to: sw.to.as_deref() }
        }
        (None, Some(h)) if now_ms.saturating_sub(h.at_ms) < HANDOVER_TIMEOUT_MS => SwitchoverState::Handed(h),
        _ => SwitchoverState::None,
    }
}

/// Whether `me` takes the key a switchover handed to `handed.to`: only
/// that instance, healthy, once it is at the old primary's last position.
pub fn may_take_handover(me: &str, handed: &Handed, healthy: bool, position: Option<u64>) -> Result<(), String> {
    if handed.to != me {
        return Err(format!("a switchover hands the primary to {}", handed.to));
    }
    if !healthy {
        return Err("a switchover target whose check fails".into());
    }
    match (handed.position, position) {
        (Some(want), Some(have)) if have < want => {
            Err(format!("catching up: at {have}, the old primary ended at {want}"))
        }
        (Some(_), None) => Err("its position is not known yet".into()),
        _ => Ok(()),
    }
}

/// The synchronous standby the primary of `token` should have: `prefer`
/// (a switchover's target) or else `current` while eligible, else the
/// eligible replica furthest ahead (ties: the lowest ordinal). Eligible:
/// a healthy replica following `token`, on a live node, and (unless it is
/// `current` or `prefer`: two positions read at different moments may
/// cross; a diverged one is rewound by its node anyway) not
/// ahead of the primary's `position` (one that is has diverged: it cannot
/// stream from it). `None`: none is.
pub fn choose_standby(
    service: &str,
    token: Revision,
    roles: &BTreeMap<String, RoleRecord>,
    live: &BTreeSet<String>,
    current: Option<&str>,
    prefer: Option<&str>,
    position: Option<u64>,
) -> Option<String> {
    let eligible = |id: &str| {
        roles.get(id).is_some_and(|r| {
            r.role == Role::Replica
                && r.token == token
                && r.healthy
                && live.contains(&r.node)
                && (current == Some(id)
                    || prefer == Some(id)
                    || !matches!((r.position, position), (Some(a), Some(p)) if a > p))
        })
    };
    if let Some(p) = prefer.or(current).filter(|p| eligible(p)) {
        return Some(p.to_string());
    }
    roles
        .iter()
        .filter(|(id, _)| eligible(id))
        .max_by_key(|(id, r)| (r.position, std::cmp::Reverse(ordinal(service, id).unwrap_or(u32::MAX))))
        .map(|(id, _)| id.clone())
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
        assert_eq!(may_campaign("pg", "pg-0", &roles, &live(&["n1", "n2"]), &s, None, None), Ok(()));
        assert!(may_campaign("pg", "pg-1", &roles, &live(&["n1", "n2"]), &s, None, None).unwrap_err().contains("pg-0"));
        // pg-0's node is gone: pg-1 starts it.
        assert_eq!(may_campaign("pg", "pg-1", &roles, &live(&["n2"]), &s, None, None), Ok(()));
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
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &s, None, None), Ok(()));
        assert!(may_campaign("pg", "pg-2", &roles, &all, &s, None, None).unwrap_err().contains("pg-1"));
        assert!(may_campaign("pg", "pg-0", &roles, &all, &s, None, None).is_err());
        assert!(may_campaign("pg", "pg-3", &roles, &all, &s, None, None).unwrap_err().contains("check"));
        assert!(may_campaign("pg", "pg-4", &roles, &all, &s, None, None).unwrap_err().contains("no data"));
        // pg-1 on a node that is gone: pg-2 next.
        let without_n2 = live(&["n1", "n3", "n4", "n5"]);
        assert_eq!(may_campaign("pg", "pg-2", &roles, &without_n2, &s, None, None), Ok(()));
        // The last primary was at 1000: 700 behind is too far for a 500 limit.
        let strict = spec(Some(500));
        let e = may_campaign("pg", "pg-1", &roles, &all, &strict, Some(1000), None).unwrap_err();
        assert!(e.contains("max_lag_on_failover (500)"), "{e}");
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &strict, Some(700), None), Ok(()));
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
    #[test]
    fn a_synchronous_failover_promotes_only_the_last_primarys_standbys() {
        let roles: BTreeMap<String, RoleRecord> = [
            ("pg-0".to_string(), rec("n1", Role::Replica, Some(900), true, true)),
            ("pg-1".to_string(), rec("n2", Role::Replica, Some(300), true, true)),
            ("pg-2".to_string(), rec("n3", Role::Replica, Some(250), true, true)),
        ]
        .into();
        let all = live(&["n1", "n2", "n3"]);
        let s = spec(None);
        let sync = |primary: &str, standbys: &[&str]| SyncRecord {
            token: 7,
            primary: primary.into(),
            standbys: standbys.iter().map(|s| s.to_string()).collect(),
        };
        // pg-0 is furthest ahead but was not synchronous: pg-1 is the one.
        let one = sync("pg-9", &["pg-1"]);
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &s, None, Some(&one)), Ok(()));
        let e = may_campaign("pg", "pg-0", &roles, &all, &s, None, Some(&one)).unwrap_err();
        assert!(e.contains("not a synchronous standby"), "{e}");
        // The standby's node is gone: nobody (it may hold the last write).
        let e = may_campaign("pg", "pg-1", &roles, &live(&["n1", "n3"]), &s, None, Some(&one)).unwrap_err();
        assert!(e.contains("synchronous standby pg-1 is not reachable"), "{e}");
        // Two standbys while the primary changed its standby: both must be
        // there, and the furthest ahead of them takes it.
        let two = sync("pg-9", &["pg-1", "pg-2"]);
        assert_eq!(may_campaign("pg", "pg-1", &roles, &all, &s, None, Some(&two)), Ok(()));
        assert!(may_campaign("pg", "pg-2", &roles, &all, &s, None, Some(&two)).unwrap_err().contains("pg-1"));
        assert!(may_campaign("pg", "pg-1", &roles, &live(&["n1", "n2"]), &s, None, Some(&two)).is_err());
        // No standby recorded: only the last primary itself.
        let alone = sync("pg-2", &[]);
        assert!(may_campaign("pg", "pg-0", &roles, &all, &s, None, Some(&alone)).unwrap_err().contains("only it"));
        assert_eq!(may_campaign("pg", "pg-2", &roles, &all, &s, None, Some(&alone)), Ok(()));
    }

    #[test]
    fn a_switchover_target_takes_the_key_once_caught_up() {
        let h = Handed { to: "pg-1".into(), position: Some(500), at_ms: 0 };
        assert!(may_take_handover("pg-2", &h, true, Some(900)).unwrap_err().contains("hands the primary to pg-1"));
        assert!(may_take_handover("pg-1", &h, true, Some(400)).unwrap_err().contains("catching up"));
        assert!(may_take_handover("pg-1", &h, false, Some(500)).is_err());
        assert_eq!(may_take_handover("pg-1", &h, true, Some(500)), Ok(()));
    }

    #[test]
    fn the_synchronous_standby_stays_while_eligible_then_the_furthest_replica() {
        let mut roles: BTreeMap<String, RoleRecord> = [
            ("pg-0".to_string(), rec("n1", Role::Primary, Some(900), true, true)),
            ("pg-1".to_string(), rec("n2", Role::Replica, Some(300), true, true)),
            ("pg-2".to_string(), rec("n3", Role::Replica, Some(400), true, true)),
        ]
        .into();
        let all = live(&["n1", "n2", "n3"]);
        assert_eq!(choose_standby("pg", 7, &roles, &all, None, None, None).as_deref(), Some("pg-2"));
        assert_eq!(choose_standby("pg", 7, &roles, &all, Some("pg-1"), None, None).as_deref(), Some("pg-1"));
        assert_eq!(choose_standby("pg", 7, &roles, &all, Some("pg-1"), Some("pg-2"), None).as_deref(), Some("pg-2"));
        // pg-1's node silent: pg-2.
        assert_eq!(
            choose_standby("pg", 7, &roles, &live(&["n1", "n3"]), Some("pg-1"), None, None).as_deref(),
            Some("pg-2")
        );
        // pg-2 unhealthy, pg-1 follows an older token: none.
        roles.get_mut("pg-2").unwrap().healthy = false;
        roles.get_mut("pg-1").unwrap().token = 6;
        assert_eq!(choose_standby("pg", 7, &roles, &all, Some("pg-2"), None, None), None);
        // A replica ahead of the primary diverged: not the standby.
        roles.get_mut("pg-2").unwrap().healthy = true;
        assert_eq!(choose_standby("pg", 7, &roles, &all, None, None, Some(350)), None);
        assert_eq!(choose_standby("pg", 7, &roles, &all, None, None, Some(400)).as_deref(), Some("pg-2"));
    }
}
