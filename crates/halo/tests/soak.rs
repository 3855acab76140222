//! The chaos soak (`scripts/soak.sh [MINUTES]`, 3 minutes in the test
//! command): the three-node netns cluster running web x3 under steady load
//! from a client that knows every node and retries a failed attempt on
//! another, while faults drawn at random from the whole list hit it one
//! after the other: kill -9 of an instance, of an agent, of the leader's
//! agent, of a whole node; SIGSTOP of a node; its link down; one etcd
//! member down; 100 route reloads; apply, a canary rollout, scale and
//! restart; a backup.
//! Every fault kind runs at least once; then more, until the time is up.
//! Beside web, a stateful service: PostgreSQL (`examples/postgres.toml`,
//! synchronous) under a steady insert load from a client that reconnects
//! through any node, with three more faults of its own: its primary's node
//! frozen, its primary's postmaster killed (kill -9), and a switchover.
//!
//! Checked on the record: no failed request, fencing tokens never going
//! back in write order (one leader writing at a time), no instance id
//! running twice at once nor placed on two nodes, full capacity (every
//! replica ready, each instance once, where assigned) back after every
//! fault, and every acknowledged API write in the store at the end. For
//! PostgreSQL: one primary, with its two replicas following and a
//! synchronous standby recorded, back after every fault; no acknowledged
//! insert lost; and the fencing token each insert carries (the term of
//! the primary that took it, from `halo_term`) never lower than that of
//! an insert committed before it: never two primaries taking writes.
//! `HALO_SOAK_SEED` replays a run's choices.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use halo_control::keys::Role;
use halo_control::state::ClusterState;
use halo_store::EtcdStore;
use halo_testkit::{web_service, Cluster, ClusterNode, Rng, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillInstance,
    KillAgent,
    KillLeader,
    KillNode,
    Freeze,
    LinkDown,
    EtcdMemberDown,
    Reloads,
    Apply,
    Rollout,
    Scale,
    Restart,
    Backup,
    PrimaryFreeze,
    PrimaryKill,
    Switchover,
}

const FAULTS: [Fault; 16] = [
    Fault::KillInstance,
    Fault::KillAgent,
    Fault::KillLeader,
    Fault::KillNode,
    Fault::Freeze,
    Fault::LinkDown,
    Fault::EtcdMemberDown,
    Fault::Reloads,
    Fault::Apply,
    Fault::Rollout,
    Fault::Scale,
    Fault::Restart,
    Fault::Backup,
    Fault::PrimaryFreeze,
    Fault::PrimaryKill,
    Fault::Switchover,
];

/// Longest a fault may take to be fully undone: past it the soak fails.
const RESTORE_WITHIN: Duration = Duration::from_secs(45);

/// The soak's own view while it runs: instance processes sampled at every
/// wait, and the API writes the CLI acknowledged.
struct Record {
    /// Instance ids seen in two processes at once, with when.
    twice: Vec<String>,
    samples: u64,
    /// The web file's generation (`SOAK_GEN`) and replicas last acknowledged.
    web_gen: u32,
    web_replicas: u32,
    /// The aux service's route host last acknowledged.
    aux_host: Option<String>,
    /// Archives `halo backup create` acknowledged.
    backups: Vec<std::path::PathBuf>,
    reloads: u32,
}

impl Record {
    /// One look at every instance process of web (returned). PostgreSQL's
    /// are not counted: its hooks run in process groups of their own with
    /// the instance's environment; two primaries are looked for in what
    /// the inserts record instead.
    fn sample(&mut self, c: &Cluster) -> Vec<(String, i32)> {
        let mut procs = c.instance_processes();
        procs.retain(|(id, _)| !id.starts_with("pg-"));
        let mut seen = BTreeSet::new();
        for (id, pid) in &procs {
            if !seen.insert(id.clone()) {
                self.twice.push(format!("{id} (pid {pid} and another) at sample {}", self.samples));
            }
        }
        self.samples += 1;
        procs
    }
}

fn web_file(gen: u32, replicas: u32) -> String {
    web_service(replicas).replace("[run]\n", &format!("[run]\nenv = {{ SOAK_GEN = \"{gen}\" }}\n"))
}

fn aux_file(host: &str) -> String {
    format!(
        "name = \"aux\"\nreplicas = 0\n\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\"]\n\n[[routes]]\nhost = \"{host}\"\npath = \"/\"\n"
    )
}

/// Runs the CLI on node `i`, panicking with what it said unless it succeeded.
fn cli_ok(c: &Cluster, i: usize, args: &[&str]) -> String {
    let (code, out, err) = c.cli(i, args);
    assert_eq!(code, 0, "halo {} on {}: {out}{err}", args.join(" "), c.nodes[i].name);
    out
}

/// A node whose agent is up (every node is, between faults).
fn live_node(c: &Cluster, rng: &mut Rng) -> usize {
    let live: Vec<usize> = (0..c.nodes.len()).filter(|&i| c.nodes[i].agent.is_some()).collect();
    live[rng.below(live.len())]
}

/// Waits until the cluster has every node, a leader, and `replicas` ready
/// instances of web, each running once and only where assigned; samples
/// the instance processes all the while. Returns the time since `since`.
async fn full_capacity(c: &Cluster, store: &EtcdStore, rec: &mut Record, since: Instant, what: &str) -> Duration {
    let start = Instant::now();
    let replicas = rec.web_replicas as usize;
    loop {
        let procs = rec.sample(c);
        if let Some(st) = state(store).await {
            let ids: BTreeSet<&String> = procs.iter().map(|(id, _)| id).collect();
            let web: BTreeSet<&String> =
                st.assignments.iter().filter(|(_, a)| a.placement.service == "web").map(|(id, _)| id).collect();
            let ready = ready_elsewhere(&st, None);
            let pg = pg_settled(&st);
            if st.nodes.len() == c.nodes.len()
                && st.leader.is_some()
                && ids.len() == procs.len()
                && ids == web
                && web.len() == replicas
                && ready == replicas
                && pg.is_ok()
            {
                return since.elapsed();
            }
            if start.elapsed() >= RESTORE_WITHIN {
                let live = (0..c.nodes.len()).find(|&i| c.nodes[i].agent.is_some()).unwrap_or(0);
                eprintln!("--- events\n{}", c.cli(live, &["events", "--service", "pg", "-n", "150"]).1);
                for i in 0..c.nodes.len() {
                    eprintln!("--- status of {}\n{}", c.nodes[i].name, c.cli(i, &["status"]).1);
                }
            }
            assert!(
                start.elapsed() < RESTORE_WITHIN,
                "{what}: capacity not back after {RESTORE_WITHIN:?}: {} nodes, leader {:?}, processes {procs:?}, \
                 assigned {web:?}, {ready} of {replicas} ready, pg: {pg:?}",
                st.nodes.len(),
                st.leader
            );
        } else {
            assert!(start.elapsed() < RESTORE_WITHIN, "{what}: the store was unreadable for {RESTORE_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PostgreSQL at full capacity: one primary serving under its key, both
/// replicas following it, healthy, and its synchronous standby recorded;
/// else what is missing.
fn pg_settled(st: &ClusterState) -> Result<(), String> {
    let p = st.primaries.get("pg").ok_or("no primary key")?;
    let roles = st.roles.get("pg").ok_or("no roles published")?;
    let serving = roles.get(&p.record.instance).is_some_and(|r| r.role == Role::Primary && r.token == p.token);
    if !serving {
        return Err(format!("{} holds the key (token {}) and does not serve yet", p.record.instance, p.token));
    }
    let following = roles.values().filter(|r| r.role == Role::Replica && r.token == p.token && r.healthy).count();
    if following != 2 {
        return Err(format!("{following} of 2 replicas follow {}", p.record.instance));
    }
    match st.sync.get("pg") {
        Some((s, _)) if s.token == p.token && s.standbys.len() == 1 => Ok(()),
        s => Err(format!("the synchronous standby is not recorded: {s:?}")),
    }
}

/// The PostgreSQL listeners on every node.
fn pg_listeners(nd: &ClusterNode) -> String {
    format!(
        "[[listeners]]\nname = \"pg-primary\"\nlisten = \"{}:5432\"\nprotocol = \"tcp\"\nupstream = \"pg\"\nidle_timeout = \"0\"\n",
        nd.ip
    )
}

/// One acknowledged insert: its id, the fencing token of the primary that
/// took it, and the server's clock when it did (microseconds).
#[derive(Debug, Clone)]
struct PgAck {
    id: u64,
    token: i64,
    at_us: i64,
}

/// A client inserting one row per connection through one node's listener,
/// moving to the next node when one fails; it stops by itself after 3 h.
struct PgLoad {
    acks: Arc<Mutex<Vec<PgAck>>>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PgLoad {
    fn start(ns: String, targets: Vec<SocketAddr>) -> PgLoad {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, f, s) = (acks.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            let (mut next, mut at) = (1u64, 0usize);
            while !s.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(3 * 3600) {
                let sql = format!(
                    "insert into w(id) values ({next}) returning (select coalesce(max(token), 0) from halo_term), \
                     (extract(epoch from clock_timestamp()) * 1000000)::bigint"
                );
                let parsed = psql(Some(&ns), targets[at], &sql).ok().and_then(|out| {
                    let (token, us) = out.split_once('|')?;
                    Some(PgAck { id: next, token: token.parse().ok()?, at_us: us.parse().ok()? })
                });
                match parsed {
                    Some(ack) => a.lock().unwrap().push(ack),
                    None => {
                        f.fetch_add(1, Ordering::Relaxed);
                        at = (at + 1) % targets.len();
                    }
                }
                next += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PgLoad { acks, failed, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> (Vec<PgAck>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let acks = self.acks.lock().unwrap().clone();
        (acks, self.failed.load(Ordering::Relaxed))
    }
}

impl Drop for PgLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The node holding PostgreSQL's primary key, by index.
fn pg_primary_node(c: &Cluster, st: &ClusterState) -> Option<(usize, String)> {
    let p = st.primaries.get("pg")?;
    let i = c.nodes.iter().position(|n| n.name == p.record.node)?;
    Some((i, p.record.instance.clone()))
}

/// Sleeps `d` while sampling the instance processes.
async fn hold(c: &Cluster, rec: &mut Record, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let _ = rec.sample(c);
        tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now()))).await;
    }
}

/// Makes one fault and undoes it (the faults that heal by themselves are
/// left to heal); returns what it did, for the log.
async fn inject(
    f: Fault,
    c: &mut Cluster,
    store: &EtcdStore,
    rng: &mut Rng,
    rec: &mut Record,
    dir: &TempDir,
) -> String {
    let n = c.nodes.len();
    let v = rng.below(n);
    let name = c.nodes[v].name.clone();
    let short = rng.between(Duration::from_millis(500), Duration::from_secs(3));
    let long = rng.between(Duration::from_secs(2), Duration::from_secs(6));
    match f {
        Fault::KillInstance => {
            let procs = c.instance_processes();
            let (id, pid) = procs[rng.below(procs.len())].clone();
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            format!("kill -9 of instance {id}")
        }
        Fault::KillAgent => {
            c.kill_agent(v);
            hold(c, rec, short).await;
            c.start_agent(v);
            format!("kill -9 of {name}'s agent and instances, back after {short:?}")
        }
        Fault::KillLeader => {
            let st = state_now(store).await;
            let l = leader_index(c, &st);
            c.kill_agent(l);
            hold(c, rec, short).await;
            c.start_agent(l);
            format!("kill -9 of the leader {}'s agent, back after {short:?}", c.nodes[l].name)
        }
        Fault::KillNode => {
            c.kill_node(v);
            hold(c, rec, long).await;
            c.restart_etcd(v);
            c.wait_etcd(v);
            c.start_agent(v);
            format!("kill -9 of every process of {name}, back after {long:?}")
        }
        Fault::Freeze => {
            c.freeze(v, true);
            hold(c, rec, long).await;
            c.freeze(v, false);
            format!("SIGSTOP of {name} for {long:?}")
        }
        Fault::LinkDown => {
            c.cut(v, true);
            hold(c, rec, long).await;
            c.cut(v, false);
            format!("{name}'s link down for {long:?}")
        }
        Fault::EtcdMemberDown => {
            c.kill_etcd(v);
            hold(c, rec, long).await;
            c.restart_etcd(v);
            c.wait_etcd(v);
            format!("{name}'s etcd member down for {long:?}")
        }
        Fault::Reloads => {
            // Each apply changes every node's routing table: 100 reloads of
            // every proxy while web serves.
            for _ in 0..100 {
                rec.reloads += 1;
                let host = format!("aux{}.soak", rec.reloads);
                let f = dir.write("aux.toml", &aux_file(&host));
                cli_ok(c, live_node(c, rng), &["apply", "-f", &f.to_string_lossy()]);
                rec.aux_host = Some(host);
            }
            "100 route reloads (aux's host changed by apply)".into()
        }
        Fault::Apply => {
            let gen = rec.web_gen + 1;
            let f = dir.write("web.toml", &web_file(gen, rec.web_replicas));
            let i = live_node(c, rng);
            cli_ok(c, i, &["apply", "-f", &f.to_string_lossy(), "--wait", "--timeout", "60s"]);
            rec.web_gen = gen;
            format!("apply of web generation {gen} through {}", c.nodes[i].name)
        }
        Fault::Rollout => {
            // A canary in two steps with automatic analysis, promoted while
            // the load runs (later restarts and applies roll the same way).
            let gen = rec.web_gen + 1;
            let text = web_file(gen, rec.web_replicas)
                + "[release]\nstrategy = \"canary\"\nsteps = [{ weight = 34, pause = \"1s\" }, { weight = 67, pause = \"1s\" }]\n\
                   [release.analysis]\ninterval = \"1s\"\nmin_requests = 5\nfailure_limit = 3\n";
            let f = dir.write("web.toml", &text);
            let i = live_node(c, rng);
            cli_ok(c, i, &["apply", "-f", &f.to_string_lossy(), "--wait", "--timeout", "90s"]);
            rec.web_gen = gen;
            format!("canary rollout of web generation {gen} through {}", c.nodes[i].name)
        }
        Fault::Scale => {
            let up = 4 + rng.below(2) as u32;
            let i = live_node(c, rng);
            cli_ok(c, i, &["scale", "web", &up.to_string()]);
            rec.web_replicas = up;
            full_capacity(c, store, rec, Instant::now(), "scaled up").await;
            cli_ok(c, live_node(c, rng), &["scale", "web", "3"]);
            rec.web_replicas = 3;
            format!("scale of web to {up} through {}, then back to 3", c.nodes[i].name)
        }
        Fault::Restart => {
            let i = live_node(c, rng);
            cli_ok(c, i, &["restart", "web", "--wait", "--timeout", "60s"]);
            format!("rolling restart of web through {}", c.nodes[i].name)
        }
        Fault::Backup => {
            let i = live_node(c, rng);
            let out = dir.0.join(format!("backup-{}.tar", rec.backups.len()));
            cli_ok(c, i, &["backup", "create", "--out", &out.to_string_lossy()]);
            rec.backups.push(out);
            format!("backup through {}", c.nodes[i].name)
        }
        Fault::PrimaryFreeze => {
            let st = state_now(store).await;
            let (i, id) = pg_primary_node(c, &st).expect("pg has a primary between faults");
            c.freeze(i, true);
            hold(c, rec, long).await;
            c.freeze(i, false);
            format!("SIGSTOP of pg's primary {id}'s node {} for {long:?}", c.nodes[i].name)
        }
        Fault::PrimaryKill => {
            let st = state_now(store).await;
            let (_, id) = pg_primary_node(c, &st).expect("pg has a primary between faults");
            let pids: Vec<i32> = c
                .instance_processes()
                .into_iter()
                .filter(|(p, pid)| *p == id && *pid > 1)
                .map(|(_, pid)| pid)
                .collect();
            for pid in &pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
            }
            // Capacity is judged once it runs again (restarted in place).
            let began = Instant::now();
            while began.elapsed() < RESTORE_WITHIN
                && !c.instance_processes().iter().any(|(p, pid)| *p == id && !pids.contains(pid))
            {
                hold(c, rec, Duration::from_millis(100)).await;
            }
            format!(
                "kill -9 of pg's primary {id} ({} process groups), running again after {:.2?}",
                pids.len(),
                began.elapsed()
            )
        }
        Fault::Switchover => {
            let i = live_node(c, rng);
            cli_ok(c, i, &["switchover", "pg", "--wait", "--timeout", "60s"]);
            format!("switchover of pg through {}", c.nodes[i].name)
        }
    }
}

// Four workers: the CLI and the harness block one while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the chaos soak: scripts/soak.sh [MINUTES] runs it"]
async fn chaos_soak() {
    let minutes: f64 = std::env::var("HALO_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(3.0);
    let mut rng = Rng::from_env("HALO_SOAK_SEED");
    let dir = TempDir::new("soak");
    let (mut c, store) = cluster_with_web_and(3, pg_listeners).await;
    let recipe = Recipe::new();
    let pg = recipe.service_file(&[("synchronous", toml::Value::Boolean(true))]);
    cli_ok(&c, 0, &["apply", "-f", &pg.to_string_lossy()]);
    until(&store, Instant::now(), Duration::from_secs(120), "pg settled", |st| pg_settled(st).is_ok()).await;
    let ns = c.client_ns();
    let pg_targets: Vec<SocketAddr> = c.nodes.iter().map(|n| SocketAddr::new(n.ip.into(), 5432)).collect();
    psql(Some(&ns), pg_targets[0], "create table w(id bigint primary key)").expect("create the soak's table");
    let pg_load = PgLoad::start(ns.clone(), pg_targets.clone());
    let obs = Observer::start(&store).await;
    let mut rec = Record {
        twice: Vec::new(),
        samples: 0,
        web_gen: 0,
        web_replicas: 3,
        aux_host: None,
        backups: Vec::new(),
        reloads: 0,
    };
    let l = load(&c);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(minutes * 60.0);
    let mut restored: BTreeMap<Fault, Vec<Duration>> = BTreeMap::new();
    let mut round = 0;
    // Every kind once in a random order, then again in another order, until
    // the time is up (the first round runs whole).
    'soak: loop {
        let mut order = FAULTS;
        rng.shuffle(&mut order);
        for f in order {
            if round > 0 && Instant::now() >= deadline {
                break 'soak;
            }
            let t0 = Instant::now();
            let what = inject(f, &mut c, &store, &mut rng, &mut rec, &dir).await;
            let took = full_capacity(&c, &store, &mut rec, t0, &what).await;
            println!("[{:>6.1}s] {what}: full capacity after {took:.2?}", start.elapsed().as_secs_f64());
            restored.entry(f).or_default().push(took);
        }
        round += 1;
    }
    let ran = start.elapsed();
    let report = l.finish().await;
    let (pg_acks, pg_failed) = pg_load.finish();
    // Every acknowledged write is in the store.
    let web = cli_ok(&c, 0, &["get", "web"]);
    assert!(
        web.contains(&format!("replicas = {}", rec.web_replicas))
            && (rec.web_gen == 0 || web.contains(&format!("SOAK_GEN = \"{}\"", rec.web_gen))),
        "web as stored is not the last acknowledged write (generation {}, {} replicas):\n{web}",
        rec.web_gen,
        rec.web_replicas
    );
    if let Some(host) = &rec.aux_host {
        let aux = cli_ok(&c, 1, &["get", "aux"]);
        assert!(aux.contains(host), "aux as stored is not the last acknowledged write (host {host}):\n{aux}");
    }
    // Every archive taken under faults verifies (checksums, records, a
    // trial restore).
    for b in &rec.backups {
        let out = std::process::Command::new(BIN).args(["backup", "verify"]).arg(b).output().expect("run halo");
        assert!(
            out.status.success(),
            "halo backup verify {}: {}{}",
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "soak: {:.1} min, {} faults in {round} rounds, {} requests ({} retried on another node, {} failed attempts), \
         {} failed; {} process samples, {} reloads, {} backups",
        ran.as_secs_f64() / 60.0,
        restored.values().map(Vec::len).sum::<usize>(),
        report.ok_first + report.ok_retried + report.failed.len() as u64,
        report.ok_retried,
        report.failed_attempts,
        report.failed.len(),
        rec.samples,
        rec.reloads,
        rec.backups.len()
    );
    println!("{:<16} {:>5} {:>10} {:>10}", "fault", "count", "median", "max");
    for (f, times) in &mut restored {
        times.sort();
        let median = times[times.len() / 2];
        let max = times[times.len() - 1];
        println!(
            "{:<16} {:>5} {:>9.2}s {:>9.2}s",
            format!("{f:?}"),
            times.len(),
            median.as_secs_f64(),
            max.as_secs_f64()
        );
    }
    // PostgreSQL: every acknowledged insert is on the primary; in commit
    // order (the servers' clock, one machine's), the tokens never go back.
    let mut have = BTreeSet::new();
    let rows = (0..c.nodes.len())
        .find_map(|i| psql(Some(&ns), pg_targets[i], "select id from w").ok())
        .expect("read the rows through a node");
    have.extend(rows.lines().filter_map(|l| l.parse::<u64>().ok()));
    let lost: Vec<u64> = pg_acks.iter().map(|a| a.id).filter(|id| !have.contains(id)).collect();
    let mut ordered = pg_acks.clone();
    ordered.sort_by_key(|a| a.at_us);
    let back: Vec<(u64, i64, i64)> =
        ordered.windows(2).filter(|w| w[1].token < w[0].token).map(|w| (w[1].id, w[1].token, w[0].token)).collect();
    let terms: BTreeSet<i64> = pg_acks.iter().map(|a| a.token).collect();
    println!(
        "pg: {} inserts acknowledged under {} terms, {} attempts failed (refused while there was no primary), \
         {} acknowledged inserts lost, {} taken under a lower token than one committed before",
        pg_acks.len(),
        terms.len(),
        pg_failed,
        lost.len(),
        back.len()
    );
    assert!(lost.is_empty(), "acknowledged inserts lost: {:?}", &lost[..lost.len().min(10)]);
    assert!(back.is_empty(), "two primaries took writes (id, token, earlier token): {:?}", &back[..back.len().min(10)]);
    assert!(rec.twice.is_empty(), "an instance ran twice at once: {:?}", &rec.twice[..rec.twice.len().min(5)]);
    assert_no_failures("chaos soak", &report);
    obs.check();
}
