//! What the multi-node tests (`cluster.rs`) and the chaos soak (`soak.rs`)
//! share: a three-node cluster running web, a watch on the store that
//! records every assignment write and leader change and checks the
//! history, waits on the cluster state, and the load client's verdict;
//! with the stateful tests (`stateful.rs`), the database recipes and psql.
#![allow(dead_code)] // each test file uses its own part

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_control::keys::{Assignment, ASSIGNMENTS, LEADER, ROLLOUTS, UPGRADING};
use halo_control::state::{read_state, ClusterState};
use halo_store::{EtcdStore, EventKind, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use halo_testkit::{web_service as service, Cluster, RetryLoad, RetryReport, TempDir};

pub const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// Every assignment write and leader change, as the store saw them.
#[derive(Default)]
pub struct History {
    /// (mod revision, token, id, node) of every assignment put.
    pub assignments: Vec<(i64, i64, String, String)>,
    /// (create revision, node) of every leader key put.
    pub leaders: Vec<(i64, String)>,
    /// (key, value) of every put of a rollout record or an upgrade mark.
    pub marks: Vec<(String, Vec<u8>)>,
}

/// Watches the whole cluster prefix for the test's lifetime.
pub struct Observer {
    pub history: Arc<Mutex<History>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub async fn start(store: &EtcdStore) -> Observer {
        let history = Arc::new(Mutex::new(History::default()));
        let (s, h) = (store.clone(), history.clone());
        let mut w = s.watch("/halo/", 1).await.expect("watch the cluster");
        let task = tokio::spawn(async move {
            let mut next = 0;
            loop {
                while let Some(batch) = w.next().await {
                    let mut h = h.lock().unwrap();
                    for e in batch {
                        next = e.kv.mod_revision + 1;
                        if e.kind != EventKind::Put {
                            continue;
                        }
                        if e.kv.key.starts_with(ASSIGNMENTS) {
                            let a: Assignment = serde_json::from_slice(&e.kv.value).unwrap();
                            h.assignments.push((e.kv.mod_revision, a.token, a.placement.id, a.placement.node));
                        } else if e.kv.key == LEADER {
                            h.leaders.push((e.kv.create_revision, String::from_utf8_lossy(&e.kv.value).into()));
                        } else if e.kv.key.starts_with(ROLLOUTS) || e.kv.key.starts_with(UPGRADING) {
                            h.marks.push((e.kv.key.clone(), e.kv.value.clone()));
                        }
                    }
                }
                // The watched member may be the one a fault took: resume.
                loop {
                    if let Ok(nw) = s.watch("/halo/", next).await {
                        w = nw;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Observer { history, task }
    }

    /// Fencing tokens never go back in write order, and no instance id was
    /// ever placed on two nodes.
    pub fn check(&self) {
        let h = self.history.lock().unwrap();
        let mut max = 0;
        let mut placed: BTreeMap<&str, &str> = BTreeMap::new();
        for (rev, token, id, node) in &h.assignments {
            assert!(*token >= max, "revision {rev}: an assignment with token {token} after one with token {max}");
            max = *token;
            let first = placed.entry(id).or_insert(node);
            assert_eq!(*first, node.as_str(), "instance {id} placed on {first} and on {node}");
        }
        assert!(!h.assignments.is_empty(), "the observer saw no assignment at all");
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn state(store: &EtcdStore) -> Option<ClusterState> {
    read_state(store).await.ok()
}

/// The state, retrying for up to 10 s (a request may land on a member a
/// fault took).
pub async fn state_now(store: &EtcdStore) -> ClusterState {
    for _ in 0..50 {
        if let Some(st) = state(store).await {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the cluster state was unreadable for 10s");
}

/// Ready placements of web on live nodes other than `except`.
pub fn ready_elsewhere(st: &ClusterState, except: Option<&str>) -> usize {
    st.assignments
        .values()
        .filter(|a| a.placement.service == "web")
        .filter(|a| Some(a.placement.node.as_str()) != except && st.nodes.contains_key(&a.placement.node))
        .filter(|a| st.endpoints.contains_key(&a.placement.id))
        .count()
}

/// Polls the store every 50 ms until `done` holds; returns the time since
/// `since` (the fault).
pub async fn until(
    store: &EtcdStore,
    since: Instant,
    within: Duration,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Some(st) = state(store).await {
            if done(&st) {
                return since.elapsed();
            }
        }
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A three-node cluster running web with `replicas`, all ready, and a
/// store handle on its etcd.
pub async fn cluster_with_web(replicas: u32) -> (Cluster, EtcdStore) {
    cluster_with_web_in(replicas, &["default"; 3]).await
}

pub async fn cluster_with_web_in(replicas: u32, zones: &'static [&'static str]) -> (Cluster, EtcdStore) {
    let c = tokio::task::spawn_blocking(|| Cluster::start_zoned(BIN, zones)).await.unwrap();
    web_on(c, replicas).await
}

/// Three nodes whose node files end with `extra`'s text, running web.
pub async fn cluster_with_web_and(
    replicas: u32,
    extra: fn(&halo_testkit::ClusterNode) -> String,
) -> (Cluster, EtcdStore) {
    let c = tokio::task::spawn_blocking(move || Cluster::start_with(BIN, 3, &extra)).await.unwrap();
    web_on(c, replicas).await
}

async fn web_on(c: Cluster, replicas: u32) -> (Cluster, EtcdStore) {
    let store = EtcdStore::connect(&c.etcd_endpoints(), "").await.unwrap();
    until(&store, Instant::now(), Duration::from_secs(15), "three nodes and a leader", |st| {
        st.nodes.len() == 3 && st.leader.is_some()
    })
    .await;
    let dir = halo_testkit::TempDir::new("svc");
    let f = dir.write("web.toml", &service(replicas));
    let (code, out, err) = c.cli(0, &["apply", "-f", &f.to_string_lossy()]);
    assert_eq!(code, 0, "apply: {out}{err}");
    until(&store, Instant::now(), Duration::from_secs(30), "web ready", |st| {
        ready_elsewhere(st, None) == replicas as usize
    })
    .await;
    // One API token for the whole cluster: the first node's, adopted by all.
    let tokens: BTreeSet<String> =
        c.nodes.iter().map(|n| std::fs::read_to_string(n.data_dir.join("token")).unwrap()).collect();
    assert_eq!(tokens.len(), 1, "the nodes do not share one API token");
    (c, store)
}

pub fn load(c: &Cluster) -> RetryLoad {
    let urls = c.nodes.iter().map(|n| format!("http://{}/", n.proxy())).collect();
    RetryLoad::start(urls, 2, Duration::from_millis(1000), Duration::from_secs(30))
}

pub fn assert_no_failures(what: &str, r: &RetryReport) {
    println!(
        "{what}: {} ok at the first node, {} ok after a retry on another node, {} failed attempts, {} failed requests",
        r.ok_first,
        r.ok_retried,
        r.failed_attempts,
        r.failed.len()
    );
    assert!(r.ok_first > 100, "{what}: too little traffic to mean anything: {r:?}");
    assert!(r.failed.is_empty(), "{what}: failed requests: {:?}", &r.failed[..r.failed.len().min(5)]);
}

pub fn leader_index(c: &Cluster, st: &ClusterState) -> usize {
    let (name, _) = st.leader.clone().expect("a leader");
    c.nodes.iter().position(|n| n.name == name).expect("leader is a node")
}

/// After convergence: every instance process runs once, and only where it
/// is assigned.
pub async fn assert_converged(c: &Cluster, store: &EtcdStore, replicas: usize) {
    let start = Instant::now();
    loop {
        // A request may land on a member a fault took: try again.
        let Some(st) = state(store).await else {
            assert!(start.elapsed() < Duration::from_secs(30), "the store was unreadable for 30s");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let procs = c.instance_processes();
        let ids: Vec<&String> = procs.iter().map(|(id, _)| id).collect();
        let unique: BTreeSet<&String> = ids.iter().copied().collect();
        let assigned: BTreeSet<&String> = st.assignments.keys().collect();
        let ready = ready_elsewhere(&st, None);
        if unique.len() == ids.len() && unique == assigned && ready == replicas && assigned.len() == replicas {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not converged after 30s: processes {ids:?}, assigned {assigned:?}, ready {ready}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The PostgreSQL recipe, its scripts copied where the `postgres` user can
/// read them (a checkout under a private home cannot be).
pub struct Recipe {
    pub dir: TempDir,
    /// `postgres` or `redis`: `examples/NAME.toml` and `examples/NAME/`.
    pub name: &'static str,
}

impl Recipe {
    pub fn new() -> Recipe {
        Recipe::of("postgres")
    }

    pub fn of(name: &'static str) -> Recipe {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("pg-recipe");
        let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples")).join(name);
        for e in std::fs::read_dir(&src).expect("the recipe's scripts") {
            let e = e.expect("entry");
            let to = dir.0.join(e.file_name());
            std::fs::copy(e.path(), &to).expect("copy a hook");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Recipe { dir, name }
    }

    /// `examples/NAME.toml` on free loopback ports, with the hooks here.
    pub fn node_file(&self) -> String {
        let examples = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples"));
        let text = std::fs::read_to_string(examples.join(format!("{}.toml", self.name))).expect("the recipe's file");
        text.replace(&format!("examples/{}/", self.name), &format!("{}/", self.dir.0.display()))
            .replace("127.0.0.1:7070", "127.0.0.1:0")
            .replace("127.0.0.1:5432", "127.0.0.1:0")
            .replace("127.0.0.1:5433", "127.0.0.1:0")
            .replace("127.0.0.1:6380", "127.0.0.1:0")
            .replace("127.0.0.1:6381", "127.0.0.1:0")
    }

    /// The recipe's service as a file of its own (`halo apply -f`), with
    /// `set` lines added to its `[stateful]`.
    pub fn service_file(&self, set: &[(&str, toml::Value)]) -> PathBuf {
        let node: toml::Value = toml::from_str(&self.node_file()).expect("the node file reads");
        let mut svc = node["services"][0].clone();
        let stateful = svc.get_mut("stateful").and_then(|s| s.as_table_mut()).expect("[stateful]");
        for (k, v) in set {
            stateful.insert(k.to_string(), v.clone());
        }
        self.dir.write("pg.toml", &toml::to_string(&svc).expect("serialises"))
    }
}

/// psql against `addr` (from namespace `ns` when given): the output, or
/// why it failed. Every call is a new connection; none lasts past 6 s.
pub fn psql(ns: Option<&str>, addr: SocketAddr, sql: &str) -> Result<String, String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "timeout", "-k", "1", "5", "psql"]);
            c
        }
        None => {
            let mut c = Command::new("timeout");
            c.args(["-k", "1", "5", "psql"]);
            c
        }
    };
    let out = cmd
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-XAtqv", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
