//! Multi-node: three `halo agent`s, each in its own network namespace with
//! its own etcd member, under faults made by real means (kill -9, SIGSTOP,
//! link down, a dead etcd member, a lost etcd quorum). A load client that
//! knows every node's address sends idempotent GETs throughout and retries
//! a failed attempt on another node; the record must show zero failed
//! requests. A watch on the store checks that only one leader wrote at a
//! time (fencing tokens never go back) and that no instance was placed on
//! two nodes. Recovery times are printed (`--no-capture` to see them). One
//! test gives each node its own Docker daemon (in the node's namespace)
//! and moves a docker service off a killed node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use halo_control::keys::{assignment_key, Assignment, LEADER};
use halo_control::state::ClusterState;
use halo_store::{EtcdStore, Store};
use halo_testkit::{web_service as service, Cluster};

/// Which node a fault hits.
enum Victim {
    Leader,
    /// A node that does not lead (leader loss has tests of its own).
    Follower,
    /// The node whose etcd member leads etcd's raft, and not halo.
    EtcdLeader,
}

/// One fault on one node of a fresh cluster running web x3 under load:
/// measures, from the fault, when the node's endpoints are gone, when a new
/// leader is elected (if it led) and when capacity is back on the others;
/// then `undo` (if any) and convergence (every instance once, where
/// assigned); then checks the load record and the store's history.
async fn under_fault(
    what: &str,
    victim: Victim,
    fault: impl FnOnce(&mut Cluster, usize),
    undo: Option<fn(&mut Cluster, usize)>,
) {
    let (mut c, store) = cluster_with_web(3).await;
    let obs = Observer::start(&store).await;
    let st = state_now(&store).await;
    let leader = leader_index(&c, &st);
    let v = match victim {
        Victim::Leader => leader,
        Victim::Follower => (leader + 1) % 3,
        Victim::EtcdLeader => {
            let raft = c.etcd_leader().await.expect("an etcd member leads");
            if raft == leader {
                // etcd's leadership moves off halo's leader first: this test
                // is about etcd's.
                c.move_etcd_leader(raft, (raft + 1) % 3).await;
            }
            let raft = c.etcd_leader().await.expect("an etcd member leads");
            assert_ne!(raft, leader, "etcd's raft leader is still on halo's leader");
            raft
        }
    };
    let name = c.nodes[v].name.clone();
    let (_, old_token) = st.leader.clone().expect("a leader");
    let l = load(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    fault(&mut c, v);
    let gone = until(&store, t0, Duration::from_secs(20), "the node's endpoints gone", |st| {
        !st.endpoints.values().any(|(_, e)| e.node == name)
    });
    let (out, gone) = tokio::join!(out_of_proxies(&c, v, t0), gone);
    let mut line = format!("{what} of {name}: out of every other proxy after {out:?}, endpoints gone after {gone:?}");
    if matches!(victim, Victim::Leader) {
        let failover = until(&store, t0, Duration::from_secs(20), "a new leader", |st| {
            st.leader.as_ref().is_some_and(|(n, t)| *n != name && *t > old_token)
        })
        .await;
        line.push_str(&format!(", new leader after {failover:?}"));
    }
    let restored = until(&store, t0, Duration::from_secs(20), "capacity restored on the other nodes", |st| {
        ready_elsewhere(st, Some(&name)) == 3
    })
    .await;
    println!("{line}, capacity restored after {restored:?}");
    // `halo events` on another node tells the story.
    let other = (v + 1) % 3;
    let events = |c: &Cluster| -> Vec<serde_json::Value> {
        let (_, out, _) = c.cli(other, &["events", "-o", "json", "-n", "1000"]);
        serde_json::from_str(&out).unwrap_or_default()
    };
    if matches!(victim, Victim::Leader) {
        let ev = events(&c);
        let elected = ev.iter().any(|e| e["kind"] == "elected" && e["node"] != name.as_str());
        assert!(elected, "no election event from a node other than {name}: {ev:?}");
    }
    match undo {
        // Back: the node must not fight the new placements.
        Some(undo) => {
            undo(&mut c, v);
            assert_converged(&c, &store, 3).await;
        }
        None => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let st = state_now(&store).await;
            assert!(st.assignments.values().all(|a| a.placement.node != name), "placements left on {name}");
            let ev = events(&c);
            let moved = ev.iter().filter(|e| {
                e["kind"] == "rescheduled"
                    && e["message"].as_str().is_some_and(|m| m.contains(&format!("leaves {name}: the node is gone")))
            });
            assert!(moved.count() >= 1, "no reschedule event for {name}: {ev:?}");
            // The others ended its lease rather than wait for it (evict.rs).
            let evicted = ev.iter().any(|e| {
                e["kind"] == "evicted" && e["message"].as_str().is_some_and(|m| m.starts_with(&format!("{name} ended")))
            });
            assert!(evicted, "no eviction event for {name}: {ev:?}");
            // Listed as gone until removed; a live node cannot be removed.
            let (_, out, _) = c.cli(other, &["node", "list"]);
            let row = out.lines().find(|l| l.trim_start().starts_with(&name)).unwrap_or_default().to_string();
            assert!(row.split_whitespace().nth(3) == Some("no"), "{name} not listed as gone:\n{out}");
            let (code, _, err) = c.cli(other, &["node", "remove", &c.nodes[other].name]);
            assert!(code != 0 && err.contains("is alive"), "removing a live node: {err}");
            let (code, out, err) = c.cli(other, &["node", "remove", &name]);
            assert_eq!(code, 0, "{out}{err}");
            let (_, out, _) = c.cli(other, &["node", "list"]);
            assert!(!out.contains(&format!(" {name} ")), "{name} still listed after remove:\n{out}");
        }
    }
    let report = l.finish().await;
    assert_no_failures(what, &report);
    obs.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_is_rescheduled_without_failed_requests() {
    under_fault(
        "kill -9 of every process (etcd member, agent, instances)",
        Victim::Follower,
        |c, i| c.kill_node(i),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_leading_etcd_killed_is_rescheduled_without_failed_requests() {
    under_fault("kill -9 of every process of etcd's raft leader", Victim::EtcdLeader, |c, i| c.kill_node(i), None)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_cut_off_fails_over_and_rejoins_without_fighting() {
    under_fault("link down", Victim::Leader, |c, i| c.cut(i, true), Some(|c, i| c.cut(i, false))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_is_replaced_and_stops_its_instances_when_thawed() {
    under_fault(
        "SIGSTOP of every process",
        Victim::Follower,
        |c, i| c.freeze(i, true),
        Some(|c, i| c.freeze(i, false)),
    )
    .await;
}

/// Faults that follow each other, on the node that leads each time: a
/// 15 s SIGSTOP of every process of the leader's node (its etcd member
/// included), the thaw; then, once converged, kill -9 of the next
/// leader's node. Each time the node is out of every other proxy and
/// capacity comes back on the others, no request fails, one leader writes
/// at a time; the recovery times are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_that_follow_each_other_are_recovered_from_each_time() {
    let (mut c, store) = cluster_with_web(3).await;
    let obs = Observer::start(&store).await;
    let l = load(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (round, what) in ["SIGSTOP for 15 s", "then kill -9"].iter().enumerate() {
        let st = state_now(&store).await;
        let v = leader_index(&c, &st);
        let name = c.nodes[v].name.clone();
        let (_, old_token) = st.leader.clone().expect("a leader");
        let t0 = Instant::now();
        if round == 0 {
            c.freeze(v, true);
        } else {
            c.kill_node(v);
        }
        let out = out_of_proxies(&c, v, t0).await;
        let failover = until(&store, t0, Duration::from_secs(20), "a new leader", |st| {
            st.leader.as_ref().is_some_and(|(n, t)| *n != name && *t > old_token)
        })
        .await;
        let restored = until(&store, t0, Duration::from_secs(20), "capacity restored on the other nodes", |st| {
            ready_elsewhere(st, Some(&name)) == 3
        })
        .await;
        println!(
            "{what} of the leader {name}: out of every other proxy after {out:?}, new leader after {failover:?}, \
             capacity restored after {restored:?}"
        );
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(15).saturating_sub(t0.elapsed())).await;
            c.freeze(v, false);
            assert_converged(&c, &store, 3).await;
        }
    }
    let report = l.finish().await;
    assert_no_failures("faults that follow each other", &report);
    obs.check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_and_restarted() {
    under_fault(
        "kill -9 of the agent and its instances",
        Victim::Leader,
        |c, i| c.kill_agent(i),
        Some(|c, i| c.start_agent(i)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_trouble_keeps_traffic_flowing_then_drain_and_scale() {
    let (mut c, store) = cluster_with_web(3).await;
    let obs = Observer::start(&store).await;
    let l = load(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One member down: the cluster still has quorum and keeps working.
    c.kill_etcd(2);
    // Quorum lost: nothing is stopped, every node keeps routing.
    c.kill_etcd(1);
    let before: BTreeSet<(String, i32)> = c.instance_processes().into_iter().collect();
    assert_eq!(before.len(), 3, "{before:?}");
    let lost = Instant::now();
    // Every node still answers from its view, and says it may be stale.
    for i in 0..3 {
        halo_testkit::eventually(Duration::from_secs(6), "status saying the store is away", || async {
            c.status(i).is_some_and(|s| {
                let view = &s["cluster"]["view"];
                let placed = s["cluster"]["placements"].as_array().map_or(0, Vec::len);
                view["store_reachable"] == false && view["stale_ms"].as_u64() > Some(0) && placed == 3
            })
        })
        .await;
    }
    let (code, table, _) = c.cli(0, &["status"]);
    assert!(code == 0 && table.contains("the store has not answered"), "{table}");
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(lost.elapsed())).await;
    let during: BTreeSet<(String, i32)> = c.instance_processes().into_iter().collect();
    assert_eq!(before, during, "instances changed while etcd had no quorum");
    c.restart_etcd(1);
    c.restart_etcd(2);
    let store = EtcdStore::connect(&c.etcd_endpoints(), "").await.unwrap();
    until(&store, Instant::now(), Duration::from_secs(30), "three nodes back after quorum returned", |st| {
        st.nodes.len() == 3
    })
    .await;
    assert_converged(&c, &store, 3).await;
    // Drain n1 through n3's API: replacements first, then n1 is empty.
    let (code, out, err) = c.cli(2, &["node", "drain", "n1"]);
    assert_eq!(code, 0, "drain: {out}{err}");
    until(&store, Instant::now(), Duration::from_secs(20), "n1 drained", |st| {
        st.assignments.values().all(|a| a.placement.node != "n1") && ready_elsewhere(st, None) == 3
    })
    .await;
    let (code, out, _) = c.cli(1, &["node", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("draining"), "node list does not show the drain:\n{out}");
    let (code, _, err) = c.cli(1, &["node", "drain", "n9"]);
    assert!(code != 0 && err.contains("no node named 'n9'") && err.contains("n1"), "{err}");
    c.cli(0, &["node", "undrain", "n1"]);
    let (code, out, err) = c.cli(1, &["scale", "web", "5"]);
    assert_eq!(code, 0, "scale: {out}{err}");
    until(&store, Instant::now(), Duration::from_secs(20), "five ready, n1 used again", |st| {
        ready_elsewhere(st, None) == 5 && st.assignments.values().any(|a| a.placement.node == "n1")
    })
    .await;
    let report = l.finish().await;
    assert_no_failures("etcd member loss, quorum loss, drain, scale", &report);
    obs.check();
    let metrics = metrics(&c, 0).await;
    assert!(metrics.contains("halo_cluster_leader{node="), "{metrics}");
    assert!(metrics.contains("halo_cluster_placements{service=\"web\""), "{metrics}");
}

/// Waits until no other node's proxy sends to node `v`'s endpoints (none
/// of them listed up in its `/metrics`) and each says `v` does not answer
/// it (`halo_cluster_peer_answering` 0, or no longer listed: `v` was
/// evicted, a check that came late must not wait for ever); the time
/// since `t0`, the fault.
async fn out_of_proxies(c: &Cluster, v: usize, t0: Instant) -> Duration {
    let victim = format!("endpoint=\"{}:", c.nodes[v].ip);
    let others: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != v).collect();
    loop {
        let mut serving = Vec::new();
        for &i in &others {
            let m = metrics(c, i).await;
            let probed = format!("halo_cluster_peer_answering{{node=\"{}\"}}", c.nodes[v].name);
            let sends =
                m.lines().any(|l| l.starts_with("halo_endpoint_up{") && l.contains(&victim) && l.ends_with(" 1"));
            // Out of the proxy because this node found it silent, or out of
            // the cluster already (evicted: no longer probed at all).
            let answers = m.lines().any(|l| l.starts_with(&probed) && !l.ends_with(" 0"));
            if m.is_empty() || sends || answers {
                serving.push(c.nodes[i].name.clone());
            }
        }
        if serving.is_empty() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{serving:?} still send to {}'s endpoints", c.nodes[v].name);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Node `i`'s /metrics, with its API token.
async fn metrics(c: &Cluster, i: usize) -> String {
    let token = std::fs::read_to_string(c.nodes[i].data_dir.join("token")).unwrap();
    let req = http::Request::get(format!("http://{}/metrics", c.nodes[i].api()))
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(http_body_util::Full::default())
        .unwrap();
    halo_testkit::Client::new().send(req).await.unwrap().body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_spread_across_zones_first() {
    // Zone a has one node, zone b two: 4 replicas go 2 and 2 by zone.
    let (c, store) = cluster_with_web_in(4, &["a", "b", "b"]).await;
    let st = state_now(&store).await;
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for a in st.assignments.values() {
        *per_node.entry(a.placement.node.as_str()).or_default() += 1;
    }
    assert_eq!(per_node.get("n1"), Some(&2), "zone a (n1 alone) should hold half: {per_node:?}");
    assert_eq!((per_node.get("n2"), per_node.get("n3")), (Some(&1), Some(&1)), "{per_node:?}");
    let (code, out, _) = c.cli(1, &["node", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(" a ") && out.contains(" b "), "zones missing from node list:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_of_a_deposed_leader_are_not_obeyed() {
    let (c, store) = cluster_with_web(3).await;
    let st = state_now(&store).await;
    let leader = leader_index(&c, &st);
    let (_, token) = st.leader.clone().unwrap();
    let target = (leader + 1) % 3;
    // The leader's agent frozen (its etcd member lives on), so nothing
    // cleans up the forged order below before the target has seen it.
    c.nodes[leader].agent.as_ref().unwrap().signal("STOP");
    // An order as a deposed leader (an older token) would write it if the
    // store's fencing failed: written after the current leader's election.
    let mut forged = st.assignments.values().next().unwrap().clone();
    forged.placement.id = "web-forged".into();
    forged.placement.node = c.nodes[target].name.clone();
    forged.token = token - 1;
    let key = assignment_key(&forged.placement.node, &forged.placement.id);
    store.put(&key, serde_json::to_vec(&forged).unwrap(), None).await.unwrap();
    // The target reconciles on the change and every second: while the
    // frozen leader still holds the key (about a second and a half, until
    // the others evict it; at most two), time to obey it, if it would. An
    // order from before a newer election is no longer stale.
    let start = Instant::now();
    let still_leading =
        || async { store.get(LEADER).await.ok().flatten().is_some_and(|kv| kv.create_revision == token) };
    while start.elapsed() < Duration::from_secs(2) && still_leading().await {
        let started = c.instance_processes().into_iter().any(|(id, _)| id == "web-forged");
        assert!(!started, "the target started an instance ordered with a stale token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&c, target).await;
    let ignored: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("halo_cluster_stale_orders_ignored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    c.nodes[leader].agent.as_ref().unwrap().signal("CONT");
    assert!(ignored >= 1, "the stale order was not counted as ignored:\n{m}");
}

#[test]
fn agent_refuses_bad_flags_naming_what_is_accepted() {
    let cases: [(&[&str], &str); 5] = [
        (&["--store", "redis://10.0.0.1:6379", "--node", "n1", "--advertise", "10.0.0.1"], "use etcd://HOST:PORT"),
        (&["--store", "etcd://10.0.0.1", "--node", "n1", "--advertise", "10.0.0.1"], "is not HOST:PORT"),
        (&["--store", "10.0.0.1:2379", "--node", "n 1", "--advertise", "10.0.0.1"], "letters, digits"),
        (&["--store", "10.0.0.1:2379", "--node", "n1", "--advertise", "0.0.0.0"], "give this node's own IP"),
        (&["--store", "10.0.0.1:2379", "--node", "n1", "--advertise", "10.0.0.1", "--lease-ttl", "1s"], "at least 2s"),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(BIN).arg("agent").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "halo agent {args:?}: {err}");
    }
    // An HTTPS API without the CA to check the other nodes by.
    let dir = halo_testkit::TempDir::new("agent-tls");
    let (cert, key) = halo_testkit::TestCa::new().issue(&["10.0.0.1"]).write(&dir, "api");
    let text = format!(
        "[[listeners]]\nname = \"http\"\nlisten = \"10.0.0.1:8080\"\n\n[node.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let file = dir.write("node.toml", &text);
    let args = ["agent", "--store", "127.0.0.1:1", "--node", "n1", "--advertise", "10.0.0.1", "-c"];
    let out = std::process::Command::new(BIN).args(args).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node.tls.ca") && err.contains("ca = \"FILE\""), "{err}");
}

/// web at v2 as a canary on `node` only, in two steps.
fn canary_on(node: &str) -> String {
    service(3).replace("args = [\"demo-app\"]", "args = [\"demo-app\", \"--version\", \"v2\"]")
        + &format!(
            "[release]\nstrategy = \"canary\"\ncanary_nodes = [\"{node}\"]\n\
             steps = [{{ weight = 34, pause = \"4s\" }}, {{ weight = 67, pause = \"4s\" }}]\n\
             [release.analysis]\ninterval = \"1s\"\nmin_requests = 5\nfailure_limit = 3\n"
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_runs_only_on_its_node_and_survives_the_leader() {
    let (mut c, store) = cluster_with_web(3).await;
    let st = state_now(&store).await;
    let leader = leader_index(&c, &st);
    let canary_node = c.nodes[(leader + 1) % 3].name.clone();
    // Every write of the rollout record, in order (the observer resumes
    // its watch when the member it watched moves).
    let obs = Observer::start(&store).await;
    let l = load(&c);
    let dir = halo_testkit::TempDir::new("canary");
    let f = dir.write("web.toml", &canary_on(&canary_node));
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "apply: {out}{err}");
    // Into the second step, then the leader goes.
    let start = Instant::now();
    loop {
        let st = state_now(&store).await;
        if let Some(r) = st.rollouts.get("web") {
            let canary: Vec<&Assignment> =
                st.assignments.values().filter(|a| a.placement.template == r.canary_template).collect();
            assert!(canary.iter().all(|a| a.placement.node == canary_node), "a canary off {canary_node}: {canary:?}");
            if r.step == 1 {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(40), "the canary never reached its second step");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.kill_agent(leader);
    let promoted = until(&store, Instant::now(), Duration::from_secs(40), "the canary promoted", |st| {
        st.rollouts.get("web").is_some_and(|r| r.state == halo_control::keys::RolloutState::Promoted)
    })
    .await;
    println!("canary on {canary_node}: promoted {promoted:?} after the leader's agent was killed mid-step");
    c.start_agent(leader);
    let report = l.finish().await;
    assert_no_failures("canary across a leader failover", &report);
    // (step, state, token) of every write of web's rollout record.
    let h: Vec<(usize, String, i64)> = obs
        .history
        .lock()
        .unwrap()
        .marks
        .iter()
        .filter(|(k, _)| k == "/halo/rollouts/web")
        .map(|(_, v)| {
            let r: halo_control::keys::RolloutRecord = serde_json::from_slice(v).unwrap();
            (r.step, serde_json::to_value(r.state).unwrap().as_str().unwrap().to_string(), r.token)
        })
        .collect();
    let steps: Vec<usize> = h.iter().map(|(s, _, _)| *s).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "a step went back: {h:?}");
    assert!(steps.contains(&0) && steps.contains(&1), "a step was skipped: {h:?}");
    let tokens: BTreeSet<i64> = h.iter().map(|(_, _, t)| *t).collect();
    assert!(tokens.len() >= 2, "no new leader wrote the rollout: {h:?}");
    assert_eq!(h.last().map(|(_, s, _)| s.as_str()), Some("promoted"), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_on_every_node() {
    let (c, store) = cluster_with_web(3).await;
    let l = load(&c);
    let bad = service(3)
        .replace("args = [\"demo-app\"]", "args = [\"demo-app\", \"--version\", \"v2\", \"--fail-rate\", \"0.05\"]")
        + "[release]\nstrategy = \"canary\"\nsteps = [{ weight = 34, pause = \"1m\" }]\n\
           [release.analysis]\ninterval = \"1s\"\nmin_requests = 10\nmax_error_rate = 0.01\nfailure_limit = 2\n";
    let dir = halo_testkit::TempDir::new("bad-canary");
    let f = dir.write("web.toml", &bad);
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "apply: {out}{err}");
    // The canary's first answer, through any node.
    let client = halo_testkit::Client::new();
    let start = Instant::now();
    let first = loop {
        let mut hit = false;
        for n in &c.nodes {
            if client.get(&format!("http://{}/", n.proxy())).await.is_ok_and(|r| r.body.contains("v2")) {
                hit = true;
            }
        }
        if hit {
            break Instant::now();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the canary never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Rolled back, and its weight 0 on every node's proxy.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut zero = 0;
        for i in 0..3 {
            let m = metrics(&c, i).await;
            if m.contains("halo_rollout_state{service=\"web\",state=\"rolled_back\"} 1")
                && m.contains("halo_rollout_canary_weight_percent{service=\"web\"} 0")
            {
                zero += 1;
            }
        }
        if zero == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "not rolled back on every node after 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = first.elapsed();
    let st = state_now(&store).await;
    let reason = st.rollouts["web"].reason.clone();
    let report = l.finish().await;
    println!(
        "5% failing canary on 3 nodes: weight 0 on every node {took:?} after its first answer ({reason}); \
         {} failed attempts, {} failed requests",
        report.failed_attempts,
        report.failed.len()
    );
    assert!(reason.contains("max_error_rate"), "{reason}");
    // Retried on another node, the canary's failures cost no request.
    assert_no_failures("a failing canary rolled back", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_fresh_etcd_and_time_moves_forward() {
    let (mut c, store) = cluster_with_web(3).await;
    let st = state_now(&store).await;
    let (_, leader_token) = st.leader.clone().unwrap();
    let max_before = st.assignments.values().map(|a| a.token).chain([leader_token]).max().unwrap();
    let dir = halo_testkit::TempDir::new("cluster-backup");
    let archive = dir.0.join("b.tar");
    let (code, out, err) = c.cli(1, &["backup", "create", "--out", &archive.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    drop(store);
    // Every etcd member's data gone; the agents with it.
    c.fresh_etcd();
    let out = std::process::Command::new(BIN)
        .args(["backup", "restore", &archive.to_string_lossy(), "--store", &c.store_url()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("restored"), "{said}");
    // Not twice: the store holds halo's state now.
    let again = std::process::Command::new(BIN)
        .args(["backup", "restore", &archive.to_string_lossy(), "--store", &c.store_url()])
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds"));
    let restart = tokio::task::spawn_blocking(move || {
        for i in 0..3 {
            c.start_agent(i);
        }
        c
    });
    let c = restart.await.unwrap();
    let store = EtcdStore::connect(&c.etcd_endpoints(), "").await.unwrap();
    until(&store, Instant::now(), Duration::from_secs(40), "web ready again after the restore", |st| {
        st.nodes.len() == 3 && ready_elsewhere(st, None) == 3
    })
    .await;
    let st = state_now(&store).await;
    let (_, token) = st.leader.clone().unwrap();
    println!("restored into a fresh etcd: fencing token {token}, every token before at most {max_before}");
    assert!(token > max_before, "the new fencing token {token} is not above {max_before}");
    assert!(st.assignments.values().all(|a| a.token <= token), "an assignment carries a token from the future");
    let (code, out, _) = c.cli(2, &["get", "web"]);
    assert!(code == 0 && out.contains("replicas = 3"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_anywhere_runs_each_hook_where_an_instance_is_ready() {
    let (c, store) = cluster_with_web(3).await;
    let solo = "name = \"solo\"\nreplicas = 1\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 1000\"]\n\
                [readiness]\nexec = [\"true\"]\ninterval = \"200ms\"\n\
                [backup]\ncommand = [\"sh\", \"-c\", \"echo backed up by $HALO_INSTANCE\"]\n";
    let dir = halo_testkit::TempDir::new("cluster-hooks");
    let f = dir.write("solo.toml", solo);
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    until(&store, Instant::now(), Duration::from_secs(20), "solo ready", |st| {
        st.endpoints.values().any(|(s, _)| s == "solo")
    })
    .await;
    let st = state_now(&store).await;
    let runs_on = st.assignments.values().find(|a| a.placement.service == "solo").unwrap().placement.node.clone();
    let ask = c.nodes.iter().position(|n| n.name != runs_on).unwrap();
    let archive = dir.0.join("b.tar");
    let (code, out, err) = c.cli(ask, &["backup", "create", "--out", &archive.to_string_lossy()]);
    assert_eq!(code, 0, "backup through {}: {out}{err}", c.nodes[ask].name);
    let bytes = std::fs::read(&archive).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("backed up by solo-"),
        "the hook's output is not in the archive taken on {}",
        c.nodes[ask].name
    );
    println!("backup taken on {} ran solo's hook on {runs_on}", c.nodes[ask].name);
}

/// A docker service on three nodes, each with its own Docker daemon in its
/// namespace: a node killed (its containers, daemon, agent and etcd member
/// with it) has its instances rescheduled onto the others' daemons, and
/// the load sees no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_service_is_rescheduled_off_a_killed_node() {
    if !halo_testkit::docker_available("docker service on the cluster") {
        return;
    }
    let image = halo_testkit::DemoImage::build(BIN, &[&format!("halo-test-cluster:{}", std::process::id())]).unwrap();
    let tag = image.tags[0].clone();
    let mut c = tokio::task::spawn_blocking(move || Cluster::start_docker(BIN, 3, &tag)).await.unwrap();
    let store = EtcdStore::connect(&c.etcd_endpoints(), "").await.unwrap();
    until(&store, Instant::now(), Duration::from_secs(15), "three nodes and a leader", |st| {
        st.nodes.len() == 3 && st.leader.is_some()
    })
    .await;
    let (_, out, _) = c.cli(0, &["node", "list"]);
    assert_eq!(out.lines().filter(|l| l.trim_end().ends_with(" exec,docker")).count(), 3, "drivers per node:\n{out}");
    let svc = service(3).replace(
        "command = \"halo\"\nargs = [\"demo-app\"]",
        &format!(
            "driver = \"docker\"\nimage = \"{}\"\npull = \"never\"\nport = 8080\nargs = [\"demo-app\"]",
            image.tags[0]
        ),
    );
    let dir = halo_testkit::TempDir::new("svc");
    let f = dir.write("web.toml", &svc);
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "apply: {out}{err}");
    until(&store, Instant::now(), Duration::from_secs(60), "web ready in containers", |st| {
        ready_elsewhere(st, None) == 3
    })
    .await;
    // Each node's daemon runs exactly the instances assigned to the node.
    let containers_on = |c: &Cluster, i: usize| {
        let (_, out, _) =
            halo_testkit::docker_at(c.nodes[i].docker.as_deref(), &["ps", "--format", "{{.Label \"halo.instance\"}}"]);
        let mut ids: Vec<String> = out.lines().map(str::to_string).collect();
        ids.sort();
        ids
    };
    let assigned_to = |st: &ClusterState, node: &str| {
        let mut ids: Vec<String> =
            st.assignments.values().filter(|a| a.placement.node == node).map(|a| a.placement.id.clone()).collect();
        ids.sort();
        ids
    };
    let st = state_now(&store).await;
    for i in 0..3 {
        assert_eq!(containers_on(&c, i), assigned_to(&st, &c.nodes[i].name), "node {i}'s containers");
    }
    let v = (leader_index(&c, &st) + 1) % 3;
    let name = c.nodes[v].name.clone();
    let l = load(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    c.kill_node(v);
    let moved =
        until(&store, t0, Duration::from_secs(60), "the killed node's instances in containers elsewhere", |st| {
            !st.endpoints.values().any(|(_, e)| e.node == name) && ready_elsewhere(st, Some(&name)) == 3
        })
        .await;
    println!("docker node killed: 3 instances ready elsewhere after {moved:?}");
    let report = l.finish().await;
    assert_no_failures("kill -9 of a docker node", &report);
    let st = state_now(&store).await;
    for i in (0..3).filter(|i| *i != v) {
        assert_eq!(containers_on(&c, i), assigned_to(&st, &c.nodes[i].name), "node {i}'s containers after the move");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_upgraded_in_place_fails_no_request_and_keeps_its_instances() {
    let (c, store) = cluster_with_web(3).await;
    let leader = leader_index(&c, &state_now(&store).await);
    // The leader: its upgrade also hands over the election.
    let v = leader;
    let name = c.nodes[v].name.clone();
    let old = c.nodes[v].agent.as_ref().unwrap().pid();
    let instances = c.instance_processes();
    let l = load(&c);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The old process marks the node as upgrading while it hands over.
    let obs = Observer::start(&store).await;
    let data = c.nodes[v].data_dir.clone();
    let pid = halo_testkit::upgrade(BIN, &["--data-dir".as_ref(), data.as_os_str()]).expect("halo upgrade");
    assert_ne!(pid, old);
    halo_testkit::eventually(Duration::from_secs(20), "the old agent drained and exited", || async move {
        !halo_testkit::alive(old)
    })
    .await;
    // The new process is the node: alive in the cluster, and a leader
    // exists (its own or another's once the old lease ran out).
    until(&store, Instant::now(), Duration::from_secs(30), "the node alive and a leader", |st| {
        st.nodes.contains_key(&name) && st.leader.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = l.finish().await;
    // No request fails (the client retries a failed attempt on another
    // node, as the cluster tests' clients do); the failed attempts are
    // printed: an in-place upgrade still costs a few (see the note in
    // docs/architecture.md).
    assert_no_failures("an agent upgraded in place", &report);
    assert_eq!(c.instance_processes(), instances, "the upgrade restarted instances");
    // Its API was silent while the new process started: the others spared it.
    let (_, out, _) = c.cli((v + 1) % 3, &["events", "-o", "json", "-n", "1000"]);
    let ev: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    let evicted = ev.iter().any(|e| e["kind"] == "evicted");
    assert!(!evicted, "the upgraded node was evicted: {ev:?}");
    let st = state_now(&store).await;
    assert!(st.upgrading.is_empty(), "an upgrade mark was left: {:?}", st.upgrading);
    let mark = halo_control::keys::upgrading_key(&name);
    let marks = obs.history.lock().unwrap().marks.clone();
    assert!(marks.iter().any(|(k, _)| *k == mark), "no upgrade mark for {name}: {marks:?}");
}

/// Every node's API over HTTPS (`[node.tls]`, certificates of one CA):
/// the CLI reaches any node with the CA, and the nodes probe each other
/// over TLS, so a node killed is still found silent and evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_https_apis_hear_each_other_and_evict_a_dead_one() {
    let ca = halo_testkit::TestCa::new();
    let ca_pem = ca.ca_pem();
    let tls = |nd: &halo_testkit::ClusterNode| {
        let dir = nd.data_dir.parent().expect("node dir");
        let leaf = ca.issue(&[&nd.ip.to_string()]);
        let (cert, key, ca_file) = (dir.join("api.crt"), dir.join("api.key"), dir.join("ca.pem"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        std::fs::write(&ca_file, &ca_pem).unwrap();
        halo_testkit::node_tls(&cert, &key, &ca_file)
    };
    let mut c = Cluster::start_with(BIN, 3, &tls);
    let cli = |c: &Cluster, i: usize, args: &[&str]| {
        let nd = &c.nodes[i];
        let out = std::process::Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(&nd.data_dir)
            .env("HALO_API", format!("https://{}", nd.api()))
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = cli(&c, 1, &["node", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(["n1", "n2", "n3"].iter().all(|n| out.contains(n)), "{out}");
    // Plain HTTP to a node's API gets no answer.
    assert!(halo_testkit::Client::new().get(&format!("http://{}/healthz", c.nodes[0].api())).await.is_err());
    // Long enough for every node to have heard every other over TLS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill_node(2);
    let evicted = |c: &Cluster| {
        let (_, out, _) = cli(c, 0, &["events", "-o", "json", "-n", "1000"]);
        let ev: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        ev.iter().any(|e| e["kind"] == "evicted" && e["message"].as_str().is_some_and(|m| m.starts_with("n3 ended")))
    };
    let start = Instant::now();
    while !evicted(&c) {
        assert!(start.elapsed() < Duration::from_secs(20), "n3 was not evicted over TLS probes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
