//! The scheduler in memory: unit cases and a property test.

use super::*;

fn node(zone: &str, capacity: u32) -> NodeInfo {
    NodeInfo { zone: zone.into(), capacity, draining: false, drivers: vec!["exec".into()] }
}

fn snap(nodes: &[(&str, &str, u32)], services: &[(&str, u32, &str)]) -> Snapshot {
    Snapshot {
        revision: 1,
        nodes: nodes.iter().map(|(n, z, c)| (n.to_string(), node(z, *c))).collect(),
        services: services
            .iter()
            .map(|(s, r, t)| {
                (
                    s.to_string(),
                    ServiceWant {
                        replicas: *r,
                        template: t.to_string(),
                        driver: "exec".into(),
                        canary: None,
                        stateful: None,
                        min_ready: None,
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

/// Applies `plan`, marks everything ready, bumps the revision.
fn apply(s: &mut Snapshot, plan: &Plan) {
    for id in &plan.remove {
        s.placements.remove(id);
        s.ready.remove(id);
    }
    for p in &plan.add {
        assert!(s.placements.insert(p.id.clone(), p.clone()).is_none(), "placement {} added twice", p.id);
        s.ready.insert(p.id.clone());
    }
    s.revision += 1;
}

/// Runs the scheduler until it has nothing left to do (at most 50 rounds).
fn converge(s: &mut Snapshot) {
    for _ in 0..50 {
        let plan = schedule(s);
        if plan.is_empty() {
            return;
        }
        apply(s, &plan);
    }
    panic!("no fixed point after 50 rounds: {s:?}");
}

fn per_node(s: &Snapshot, service: &str) -> BTreeMap<String, usize> {
    let mut m: BTreeMap<String, usize> = s.nodes.keys().map(|n| (n.clone(), 0)).collect();
    for p in s.placements.values().filter(|p| p.service == service) {
        *m.get_mut(&p.node).unwrap() += 1;
    }
    m
}

#[test]
fn spreads_across_zones_then_nodes() {
    let mut s = snap(&[("a1", "a", 10), ("a2", "a", 10), ("b1", "b", 10)], &[("web", 4, "t1")]);
    converge(&mut s);
    let m = per_node(&s, "web");
    // Zone b has one node, zone a two: two per zone.
    assert_eq!(m["b1"], 2, "{m:?}");
    assert_eq!((m["a1"], m["a2"]), (1, 1), "{m:?}");
}

#[test]
fn a_dead_node_is_rescheduled_and_nothing_else_moves() {
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10), ("n3", "z", 10)], &[("web", 3, "t1")]);
    converge(&mut s);
    let before = s.placements.clone();
    s.nodes.remove("n2");
    let plan = schedule(&s);
    let lost: Vec<&String> = before.iter().filter(|(_, p)| p.node == "n2").map(|(id, _)| id).collect();
    assert_eq!(plan.remove.iter().collect::<Vec<_>>(), lost);
    assert_eq!(plan.add.len(), 1);
    apply(&mut s, &plan);
    for (id, p) in &before {
        if p.node != "n2" {
            assert_eq!(s.placements.get(id), Some(p), "a healthy placement moved");
        }
    }
}

#[test]
fn a_service_goes_only_where_its_driver_answers_unless_none_does() {
    let mut s = snap(&[("a", "z", 10), ("b", "z", 10), ("c", "z", 10)], &[("web", 4, "t1")]);
    s.services.get_mut("web").unwrap().driver = "docker".into();
    // No node's docker answers: placed anyway, to say why they cannot start.
    converge(&mut s);
    assert_eq!(s.placements.len(), 4);
    for n in ["b", "c"] {
        s.nodes.get_mut(n).unwrap().drivers.push("docker".into());
    }
    // Once some node's does, the others' placements move there.
    converge(&mut s);
    let on = |s: &Snapshot, n: &str| s.placements.values().filter(|p| p.node == n).count();
    assert_eq!((on(&s, "a"), on(&s, "b"), on(&s, "c")), (0, 2, 2), "{:?}", s.placements);
    // A node whose daemon stops answering loses its placements to the rest.
    s.nodes.get_mut("b").unwrap().drivers.retain(|d| d == "exec");
    converge(&mut s);
    assert_eq!((on(&s, "a"), on(&s, "b"), on(&s, "c")), (0, 0, 4));
    // An exec service is not held to docker nodes.
    s.services.insert(
        "job".into(),
        ServiceWant {
            replicas: 3,
            template: "j".into(),
            driver: "exec".into(),
            canary: None,
            stateful: None,
            min_ready: None,
        },
    );
    converge(&mut s);
    let job_on_a = s.placements.values().filter(|p| p.service == "job" && p.node == "a").count();
    assert!(job_on_a >= 1, "{:?}", s.placements);
}

#[test]
fn a_canary_goes_beside_stable_only_where_allowed_and_leaves_with_its_want() {
    let mut s = snap(&[("n1", "a", 10), ("n2", "b", 10), ("n3", "b", 10)], &[("web", 3, "t1")]);
    converge(&mut s);
    let stable = s.placements.clone();
    let want = |nodes: &[&str], zone: Option<&str>, replicas| CanaryWant {
        template: "t2".into(),
        driver: "exec".into(),
        replicas,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        zone: zone.map(str::to_string),
    };
    s.services.get_mut("web").unwrap().canary = Some(want(&["n2"], None, 2));
    converge(&mut s);
    let canary: Vec<&Placement> = s.placements.values().filter(|p| p.template == "t2").collect();
    assert_eq!(canary.len(), 2);
    assert!(canary.iter().all(|p| p.node == "n2"), "{canary:?}");
    for (id, p) in &stable {
        assert_eq!(s.placements.get(id), Some(p), "stable lost capacity during the canary");
    }
    // By zone; none allowed anywhere: reported unplaced, nothing else moves.
    s.services.get_mut("web").unwrap().canary = Some(want(&[], Some("a"), 1));
    converge(&mut s);
    let canary: Vec<&Placement> = s.placements.values().filter(|p| p.template == "t2").collect();
    assert!(canary.len() == 1 && canary[0].node == "n1", "{canary:?}");
    s.services.get_mut("web").unwrap().canary = Some(want(&["n9"], None, 1));
    let plan = schedule(&s);
    assert_eq!(plan.unplaced.get("web"), Some(&1));
    assert!(plan.add.is_empty());
    // The canary's want gone (rolled back): its placements go.
    s.services.get_mut("web").unwrap().canary = None;
    converge(&mut s);
    assert_eq!(s.placements, stable);
}

#[test]
fn drain_starts_replacements_before_removing() {
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10), ("n3", "z", 10)], &[("web", 3, "t1")]);
    converge(&mut s);
    s.nodes.get_mut("n1").unwrap().draining = true;
    let plan = schedule(&s);
    assert_eq!(plan.add.len(), 1, "one replacement for the one placement on n1");
    assert!(plan.remove.is_empty(), "removed before its replacement was ready: {plan:?}");
    assert_ne!(plan.add[0].node, "n1");
    apply(&mut s, &plan);
    let plan = schedule(&s);
    assert_eq!(plan.remove.len(), 1, "the replacement is ready: the drained one goes");
    apply(&mut s, &plan);
    assert_eq!(per_node(&s, "web")["n1"], 0);
    assert!(schedule(&s).is_empty());
}

#[test]
fn a_budget_lets_a_drain_go_ahead_of_its_replacements_down_to_its_floor_and_no_further() {
    // n1 and n2 drained at once; web has one placement on each node and a
    // budget of 2 ready: one of the two may go at once, the other waits
    // for a replacement to be ready, and the reason says so.
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10), ("n3", "z", 10)], &[("web", 3, "t1")]);
    converge(&mut s);
    s.services.get_mut("web").unwrap().min_ready = Some(2);
    s.nodes.get_mut("n1").unwrap().draining = true;
    s.nodes.get_mut("n2").unwrap().draining = true;
    let plan = schedule(&s);
    assert_eq!(plan.add.len(), 2, "two replacements on n3: {plan:?}");
    assert_eq!(plan.remove.len(), 1, "one displaced goes at once, down to the floor: {plan:?}");
    let held = &plan.held["web"];
    assert!(held.ends_with("waits until a replacement is ready: 2 ready, its budget keeps 2 ready"), "{held}");
    // Replacements not ready yet: nothing more goes.
    for id in &plan.remove {
        s.placements.remove(id);
        s.ready.remove(id);
    }
    for p in &plan.add {
        s.placements.insert(p.id.clone(), p.clone());
    }
    let plan = schedule(&s);
    assert!(plan.remove.is_empty() && plan.add.is_empty(), "below the floor: {plan:?}");
    // One ready: the last displaced one goes.
    let new: Vec<String> =
        s.placements.values().filter(|p| p.node == "n3" && !s.ready.contains(&p.id)).map(|p| p.id.clone()).collect();
    assert_eq!(new.len(), 2);
    s.ready.insert(new[0].clone());
    let plan = schedule(&s);
    assert_eq!(plan.remove.len(), 1, "{plan:?}");
    assert!(plan.held.is_empty());
    // Without a budget, neither goes before its replacement is ready.
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10), ("n3", "z", 10)], &[("web", 3, "t1")]);
    converge(&mut s);
    s.nodes.get_mut("n1").unwrap().draining = true;
    s.nodes.get_mut("n2").unwrap().draining = true;
    let plan = schedule(&s);
    assert!(plan.remove.is_empty(), "{plan:?}");
    assert!(plan.held["web"].contains("without a [budget] every replica stays ready"), "{plan:?}");
}

#[test]
fn template_change_rolls_one_at_a_time_keeping_capacity() {
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10)], &[("web", 2, "t1")]);
    converge(&mut s);
    s.services.get_mut("web").unwrap().template = "t2".into();
    let mut rounds = 0;
    loop {
        let plan = schedule(&s);
        if plan.is_empty() {
            break;
        }
        assert!(plan.add.len() <= 1, "more than one new placement at once");
        // Simulate: new placements are not ready yet in this round.
        for id in &plan.remove {
            s.placements.remove(id);
            s.ready.remove(id);
        }
        for p in &plan.add {
            s.placements.insert(p.id.clone(), p.clone());
        }
        let ready = s.placements.keys().filter(|id| s.ready.contains(*id)).count();
        assert!(ready >= 2 || s.placements.values().all(|p| p.template == "t2"), "capacity lost: {s:?}");
        for p in &plan.add {
            s.ready.insert(p.id.clone());
        }
        s.revision += 1;
        rounds += 1;
        assert!(rounds < 20);
    }
    assert!(s.placements.values().all(|p| p.template == "t2"));
    assert_eq!(s.placements.len(), 2);
}

#[test]
fn capacity_is_respected_and_shortfall_reported() {
    let mut s = snap(&[("n1", "z", 1), ("n2", "z", 2)], &[("web", 5, "t1")]);
    let plan = schedule(&s);
    assert_eq!(plan.add.len(), 3);
    assert_eq!(plan.unplaced.get("web"), Some(&2));
    apply(&mut s, &plan);
    assert_eq!(per_node(&s, "web"), BTreeMap::from([("n1".into(), 1), ("n2".into(), 2)]));
}

#[test]
fn scale_down_takes_not_ready_then_crowded() {
    let mut s = snap(&[("n1", "z", 10), ("n2", "z", 10)], &[("web", 4, "t1")]);
    converge(&mut s);
    let not_ready = s.placements.keys().next().unwrap().clone();
    s.ready.remove(&not_ready);
    s.services.get_mut("web").unwrap().replicas = 3;
    let plan = schedule(&s);
    assert_eq!(plan.remove, vec![not_ready]);
    assert!(plan.add.is_empty());
}

/// A small deterministic generator for the property test.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn property_converges_spread_even_never_twice_deterministic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..500 {
        let n_nodes = 1 + rng.next(6) as usize;
        let zones = 1 + rng.next(3);
        let nodes: Vec<(String, String, u32)> =
            (0..n_nodes).map(|i| (format!("n{i}"), format!("z{}", rng.next(zones)), 1 + rng.next(12) as u32)).collect();
        let mut s = Snapshot { revision: 1, ..Default::default() };
        for (n, z, c) in &nodes {
            s.nodes.insert(n.clone(), node(z, *c));
        }
        for i in 0..1 + rng.next(4) {
            s.services.insert(
                format!("s{i}"),
                ServiceWant {
                    replicas: rng.next(8) as u32,
                    template: "t".into(),
                    driver: "exec".into(),
                    canary: None,
                    stateful: None,
                    min_ready: None,
                },
            );
        }
        // Some history: converge, then a random fault or change.
        converge(&mut s);
        match rng.next(4) {
            0 if s.nodes.len() > 1 => {
                let victim = format!("n{}", rng.next(n_nodes as u64));
                s.nodes.remove(&victim);
            }
            1 => {
                let victim = format!("n{}", rng.next(n_nodes as u64));
                if let Some(n) = s.nodes.get_mut(&victim) {
                    n.draining = true;
                }
            }
            2 => {
                for w in s.services.values_mut() {
                    w.replicas = rng.next(8) as u32;
                    w.template = "t2".into();
                }
            }
            _ => {}
        }
        assert_eq!(schedule(&s), schedule(&s), "case {case}: not deterministic");
        converge(&mut s);
        // Capacity respected; a draining node keeps placements only
        // while the others have no room for their replacements.
        let room: u32 = s.nodes.values().filter(|i| !i.draining).map(|i| i.capacity).sum();
        let asked: u32 = s.services.values().map(|w| w.replicas).sum();
        let mut on_draining = 0;
        for (n, info) in &s.nodes {
            let load = s.placements.values().filter(|p| &p.node == n).count() as u32;
            assert!(load <= info.capacity, "case {case}: {n} over capacity");
            if info.draining {
                on_draining += load;
            }
        }
        let placed = s.placements.len() as u32 - on_draining;
        assert_eq!(placed, asked.min(room), "case {case}: {placed} placed of {asked} asked, room {room}");
        if on_draining > 0 {
            assert!(!schedule(&s).unplaced.is_empty(), "case {case}: a drain stalled with room to spare");
        }
        // Spread: with room to spare everywhere (one zone), the least
        // and the most crowded node differ by at most one per service.
        let roomy = s.nodes.values().filter(|i| !i.draining).all(|i| i.capacity >= asked);
        if roomy && zones == 1 {
            for name in s.services.keys() {
                let counts: Vec<usize> =
                    per_node(&s, name).into_iter().filter(|(n, _)| !s.nodes[n].draining).map(|(_, c)| c).collect();
                if let (Some(lo), Some(hi)) = (counts.iter().min(), counts.iter().max()) {
                    assert!(hi - lo <= 1, "case {case}: {name} spread {counts:?}");
                }
            }
        }
    }
}

fn stateful(s: &mut Snapshot, service: &str, replace_after: Option<u64>) {
    let w = s.services.get_mut(service).unwrap();
    w.stateful = Some(StatefulWant { replace_after: replace_after.map(std::time::Duration::from_secs), primary: None });
}

/// Applies `plan` where a stateful placement may be added again (in
/// place, or moved), marking what it adds ready only when `ready`.
fn apply_stateful(s: &mut Snapshot, plan: &Plan, ready: bool) {
    for id in &plan.remove {
        s.placements.remove(id);
        s.ready.remove(id);
    }
    for p in &plan.add {
        s.placements.insert(p.id.clone(), p.clone());
        if ready {
            s.ready.insert(p.id.clone());
        } else {
            s.ready.remove(&p.id);
        }
    }
    s.revision += 1;
}

#[test]
fn a_stateful_service_is_placed_by_ordinal_and_stays_with_its_data() {
    let mut s = snap(&[("n1", "a", 10), ("n2", "b", 10), ("n3", "c", 10)], &[("pg", 3, "t1")]);
    stateful(&mut s, "pg", Some(300));
    let plan = schedule(&s);
    let mut ids: Vec<&str> = plan.add.iter().map(|p| p.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["pg-0", "pg-1", "pg-2"]);
    apply_stateful(&mut s, &plan, true);
    assert!(per_node(&s, "pg").values().all(|n| *n == 1), "one per node: {:?}", per_node(&s, "pg"));
    assert!(schedule(&s).is_empty(), "a placed set is left alone");
    let on_n2 = s.placements.values().find(|p| p.node == "n2").unwrap().id.clone();
    // n2 goes: its instance waits for it (its data is there) ...
    s.nodes.remove("n2");
    s.ready.remove(&on_n2);
    s.gone_for.insert("n2".into(), std::time::Duration::from_secs(299));
    assert!(schedule(&s).is_empty(), "replaced before replace_after: {:?}", schedule(&s));
    // ... until it has been gone replace_after: the same name elsewhere.
    s.gone_for.insert("n2".into(), std::time::Duration::from_secs(300));
    let plan = schedule(&s);
    assert_eq!(plan.remove, std::slice::from_ref(&on_n2));
    assert_eq!(plan.add.len(), 1);
    assert_eq!(plan.add[0].id, on_n2);
    assert_ne!(plan.add[0].node, "n2");
    // `never`: it waits for its node however long.
    stateful(&mut s, "pg", None);
    s.gone_for.insert("n2".into(), std::time::Duration::from_secs(86_400));
    assert!(schedule(&s).is_empty());
}

#[test]
fn a_stateful_template_change_replaces_in_place_one_at_a_time_primary_last() {
    let mut s = snap(&[("n1", "a", 10), ("n2", "a", 10), ("n3", "a", 10)], &[("pg", 3, "t1")]);
    stateful(&mut s, "pg", Some(300));
    let plan = schedule(&s);
    apply_stateful(&mut s, &plan, true);
    let before: BTreeMap<String, String> = s.placements.values().map(|p| (p.id.clone(), p.node.clone())).collect();
    s.services.get_mut("pg").unwrap().template = "t2".into();
    s.services.get_mut("pg").unwrap().stateful.as_mut().unwrap().primary = Some("pg-2".into());
    let mut order = Vec::new();
    for _ in 0..10 {
        let plan = schedule(&s);
        if plan.is_empty() {
            break;
        }
        assert!(plan.remove.is_empty(), "nothing removed: {plan:?}");
        assert_eq!(plan.add.len(), 1, "one at a time: {plan:?}");
        order.push(plan.add[0].id.clone());
        // Not ready yet: nothing else moves.
        apply_stateful(&mut s, &plan, false);
        assert!(schedule(&s).is_empty(), "the next waits for the last to be ready");
        let id = order.last().unwrap().clone();
        s.ready.insert(id);
    }
    assert_eq!(order, ["pg-1", "pg-0", "pg-2"], "highest ordinal first, the primary last");
    let after: BTreeMap<String, String> = s.placements.values().map(|p| (p.id.clone(), p.node.clone())).collect();
    assert_eq!(before, after, "every instance stays on its node");
    assert!(s.placements.values().all(|p| p.template == "t2"));
}

#[test]
fn a_stateful_scale_down_removes_the_highest_ordinals() {
    let mut s = snap(&[("n1", "a", 10), ("n2", "a", 10)], &[("pg", 4, "t1")]);
    stateful(&mut s, "pg", Some(300));
    let plan = schedule(&s);
    apply_stateful(&mut s, &plan, true);
    s.services.get_mut("pg").unwrap().replicas = 2;
    let mut removed = schedule(&s).remove;
    removed.sort();
    assert_eq!(removed, ["pg-2", "pg-3"]);
    assert_eq!(ordinal("pg", "pg-10"), Some(10));
    assert_eq!(ordinal("pg", "pg-01"), None);
    assert_eq!(ordinal("pg", "pg-x"), None);
    assert_eq!(ordinal("pg", "pgx-1"), None);
}
