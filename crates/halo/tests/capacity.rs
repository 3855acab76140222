//! Disruption budgets and rolling node maintenance on three `halo agent`s
//! in network namespaces: two nodes drained at once never leave a service
//! below its `min_available` ready instances (sampled from the store every
//! 50 ms); a maintenance of every node, with a command that kills the
//! node's agent (which the test, as systemd would, starts again), drains
//! one node at a time within the budget, carries on under a new leader
//! when the leader's own node goes, and ends with every node undrained,
//! with no failed request for a client that retries on another node.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use halo_control::maintenance::{Phase, RunState};
use halo_store::EtcdStore;
use halo_testkit::Cluster;

/// Gives web a budget of `min_available` (not part of its template: no
/// instance is replaced).
fn budget(c: &Cluster, min_available: u32) {
    let dir = halo_testkit::TempDir::new("budget");
    let text = halo_testkit::web_service(3) + &format!("\n[budget]\nmin_available = {min_available}\n");
    let f = dir.write("web.toml", &text);
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Samples web's ready instances from the store every 50 ms until stopped;
/// the fewest seen, and how many samples.
struct ReadySampler {
    stop: Arc<AtomicBool>,
    fewest: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadySampler {
    fn start(store: &EtcdStore) -> ReadySampler {
        let (stop, fewest, samples) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(usize::MAX)), Arc::new(AtomicUsize::new(0)));
        let (s, f, n, store) = (stop.clone(), fewest.clone(), samples.clone(), store.clone());
        let task = tokio::spawn(async move {
            while !s.load(SeqCst) {
                if let Some(st) = state(&store).await {
                    f.fetch_min(ready_elsewhere(&st, None), SeqCst);
                    n.fetch_add(1, SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        ReadySampler { stop, fewest, samples, task }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, SeqCst);
        let _ = self.task.await;
        (self.fewest.load(SeqCst), self.samples.load(SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_drained_at_once_never_take_a_service_below_its_budget() {
    let (c, store) = cluster_with_web(3).await;
    budget(&c, 2);
    let l = load(&c);
    let sampler = ReadySampler::start(&store);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // n1 and n2 drained together, from two clients at once.
    let drains: Vec<_> = ["n1", "n2"]
        .into_iter()
        .map(|n| {
            let (bin, api, dir) = (BIN.to_string(), c.nodes[2].api().to_string(), c.nodes[2].data_dir.clone());
            std::thread::spawn(move || {
                std::process::Command::new(bin)
                    .args(["node", "drain", n, "--wait", "--timeout", "60s", "--data-dir"])
                    .arg(dir)
                    .env("HALO_API", api)
                    .output()
                    .expect("halo node drain")
            })
        })
        .collect();
    for d in drains {
        let out = d.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "drain --wait: {text}");
        assert!(text.contains("left to move") && text.contains("done after"), "{text}");
    }
    until(&store, Instant::now(), Duration::from_secs(30), "web all on n3, three ready", |st| {
        st.assignments.values().all(|a| a.placement.node == "n3") && ready_elsewhere(st, None) == 3
    })
    .await;
    // Traffic on the new placements for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fewest, samples) = sampler.finish().await;
    println!("{samples} samples, fewest ready {fewest}");
    assert!(samples >= 20, "the sampler barely ran: {samples}");
    assert!(fewest >= 2, "web went down to {fewest} ready with min_available = 2");
    let report = l.finish().await;
    assert_no_failures("two drains at once", &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_maintenance_restarting_each_agent_keeps_every_budget_and_fails_no_request() {
    let (mut c, store) = cluster_with_web(3).await;
    budget(&c, 2);
    let obs = Observer::start(&store).await;
    let l = load(&c);
    let sampler = ReadySampler::start(&store);
    // The command kills the node's agent; the test starts it again, as
    // systemd's Restart= would.
    let (bin, api, dir) = (BIN.to_string(), c.nodes[0].api().to_string(), c.nodes[0].data_dir.clone());
    let command = "echo patched; kill -9 $HALO_PID";
    let waiting = std::thread::spawn(move || {
        std::process::Command::new(bin)
            .args(["node", "maintain", "--all", "--command", command, "--wait", "--timeout", "120s", "--data-dir"])
            .arg(dir)
            .env("HALO_API", api)
            .output()
            .expect("halo node maintain")
    });
    until(&store, Instant::now(), Duration::from_secs(10), "a maintenance asked for", |st| st.maintenance.is_some())
        .await;
    let (code, _, err) = c.cli(1, &["node", "maintain", "n1", "--command", "true"]);
    assert!(code != 0 && err.contains("a maintenance is under way"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut restarted = 0;
    let mut most_under_way = 0;
    loop {
        for i in 0..c.nodes.len() {
            let exited = c.nodes[i].agent.as_mut().is_some_and(|a| a.wait(Duration::from_millis(1)).is_some());
            if exited {
                restarted += 1;
                tokio::task::block_in_place(|| c.start_agent(i));
            }
        }
        if let Some(st) = state(&store).await {
            if let Some((rec, _)) = &st.maintenance {
                let under_way =
                    rec.nodes.iter().filter(|s| matches!(s.phase, Phase::Draining | Phase::Running)).count();
                most_under_way = most_under_way.max(under_way);
                assert_ne!(rec.state, RunState::Failed, "{rec:?}");
                if rec.state == RunState::Done {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "maintenance not done after 120s: {:?}",
            state(&store).await.map(|s| s.maintenance)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(restarted, 3, "every node's agent was killed by its command and started again");
    // --wait told the story, through its own node's restart.
    let out = tokio::task::block_in_place(|| waiting.join().unwrap());
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "maintain --wait: {text}");
    assert!(text.contains("maintenance asked: n1, n2, n3 (1 at a time)"), "{text}");
    // (Phases shorter than its half-second poll may go unprinted.)
    for n in ["n1", "n2", "n3"] {
        assert!(text.contains(&format!("{n}: done (the command succeeded; the node is back)")), "{n}: {text}");
    }
    assert!(text.contains("done after"), "{text}");
    assert_eq!(most_under_way, 1, "more than one node under maintenance at once");
    // Every node back and undrained, web whole again.
    until(&store, Instant::now(), Duration::from_secs(30), "three nodes, none drained, web ready", |st| {
        st.nodes.len() == 3 && st.admin.values().all(|a| !a.draining) && ready_elsewhere(st, None) == 3
    })
    .await;
    let (fewest, samples) = sampler.finish().await;
    println!("{samples} samples, fewest ready {fewest}");
    assert!(fewest >= 2, "web went down to {fewest} ready with min_available = 2");
    let report = l.finish().await;
    assert_no_failures("rolling maintenance", &report);
    obs.check();
    let leaders = obs.history.lock().unwrap().leaders.len();
    assert!(
        leaders >= 2,
        "the leader's own node was maintained: another node must have carried on ({leaders} leaders)"
    );
    let (code, out, _) = c.cli(2, &["node", "maintenance"]);
    assert!(code == 0 && out.contains("maintenance done"), "{out}");
    for n in ["n1", "n2", "n3"] {
        let runs = c.nodes.iter().find(|x| x.name == n).unwrap().data_dir.join("maintenance");
        let log =
            std::fs::read_dir(&runs).unwrap().flatten().find(|e| e.path().extension().is_some_and(|x| x == "log"));
        let text = std::fs::read_to_string(log.expect("the command's output").path()).unwrap();
        assert!(text.contains("patched"), "{n}: {text}");
    }
}
