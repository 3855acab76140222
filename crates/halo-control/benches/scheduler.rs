//! The scheduler at scale, on a simulated cluster: `cargo bench -p
//! halo-control --bench scheduler [-- NODES SERVICES REPLICAS]` (default
//! 1,000 nodes in 3 zones, 5,000 services, 10 replicas: 50,000 instances).
//! Prints the median of several runs of: a plan from scratch, and the
//! re-plan after one node is lost, with how many placements each moves.
//! A benchmark, not a test: nothing here asserts a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use halo_control::scheduler::{schedule, NodeInfo, Plan, ServiceWant, Snapshot};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, snap: &Snapshot) -> (Duration, Plan) {
    let mut times = Vec::new();
    let mut plan = Plan::default();
    for _ in 0..runs {
        let t = Instant::now();
        plan = schedule(snap);
        times.push(t.elapsed());
    }
    (median(times), plan)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (nodes, services, replicas) = match args[..] {
        [n, s, r] => (n, s, r as u32),
        _ => (1_000, 5_000, 10),
    };
    let mut snap = Snapshot {
        revision: 1,
        nodes: (0..nodes)
            .map(|i| {
                let info = NodeInfo {
                    zone: format!("z{}", i % 3),
                    capacity: 200,
                    draining: false,
                    drivers: vec!["exec".into()],
                };
                (format!("n{i:04}"), info)
            })
            .collect(),
        services: (0..services)
            .map(|i| {
                (
                    format!("svc{i:05}"),
                    ServiceWant {
                        replicas,
                        template: "t1".into(),
                        driver: "exec".into(),
                        canary: None,
                        stateful: None,
                        min_ready: None,
                    },
                )
            })
            .collect(),
        placements: BTreeMap::new(),
        ready: BTreeSet::new(),
        gone_for: BTreeMap::new(),
    };
    let (scratch, plan) = time(5, &snap);
    println!(
        "{nodes} nodes, {services} services x {replicas}: plan from scratch {scratch:?} ({} placements, {} unplaced)",
        plan.add.len(),
        plan.unplaced.values().sum::<u32>()
    );
    for p in plan.add {
        snap.ready.insert(p.id.clone());
        snap.placements.insert(p.id.clone(), p);
    }
    snap.revision = 2;
    let (steady, plan) = time(20, &snap);
    println!("re-plan with nothing to do {steady:?} ({} changes)", plan.add.len() + plan.remove.len());
    let lost = snap.nodes.keys().nth(nodes / 2).cloned().expect("a node");
    let on_lost = snap.placements.values().filter(|p| p.node == lost).count();
    snap.nodes.remove(&lost);
    let (replan, plan) = time(20, &snap);
    println!(
        "re-plan after losing {lost} ({on_lost} placements on it): {replan:?} ({} added, {} removed)",
        plan.add.len(),
        plan.remove.len()
    );
}
