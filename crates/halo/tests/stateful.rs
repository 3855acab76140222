//! Stateful services with real PostgreSQL (`examples/postgres.toml` and
//! its hooks) and psql as the client: a primary and streaming replicas on
//! one node, kept across kill -9 of halo; on the three-node harness, the
//! faults of the primary's node (kill -9, SIGSTOP, a link cut) under a
//! write load that records every acknowledged insert and which server
//! took it; a lost node's replica cloned elsewhere; bad input refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::{psql, Recipe};
use halo_testkit::{eventually, Cluster, Halo};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// One acknowledged insert.
#[derive(Debug, Clone)]
struct Ack {
    id: u64,
    at: Instant,
    /// The server that took it (`addr:port` as it saw the connection).
    server: String,
}

/// Clients inserting rows, one per target listener (a listener that
/// hangs delays only its own), each insert a new connection, recording
/// every acknowledged insert and the server that took it. Ids are unique
/// across clients. They stop by themselves after 5 minutes.
struct Writes {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writes {
    fn start(ns: Option<String>, targets: Vec<SocketAddr>) -> Writes {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let threads = targets
            .into_iter()
            .map(|target| {
                let (a, s, next, ns) = (acks.clone(), stop.clone(), next.clone(), ns.clone());
                std::thread::spawn(move || {
                    let began = Instant::now();
                    while !s.load(Ordering::Relaxed) && began.elapsed() < Duration::from_secs(300) {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        let sql = format!(
                            "insert into w(id) values ({id}) returning host(inet_server_addr()) || ':' || inet_server_port()"
                        );
                        if let Ok(server) = psql(ns.as_deref(), target, &sql) {
                            a.lock().unwrap().push(Ack { id, at: Instant::now(), server });
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Writes { acks, stop, threads }
    }

    fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap().clone()
    }

    fn finish(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut acks = self.acks();
        acks.sort_by_key(|a| a.at);
        acks
    }
}

impl Drop for Writes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One psql session kept open (statements on its stdin, one line of
/// output each); killed on drop.
struct Session {
    child: std::process::Child,
    out: std::sync::mpsc::Receiver<String>,
}

impl Session {
    fn open(ns: &str, addr: SocketAddr) -> Session {
        use std::io::BufRead;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "psql", "-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("psql");
        let stdout = child.stdout.take().unwrap();
        let (tx, out) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Session { child, out }
    }

    /// The statement's one line of output, or `None` when the session
    /// ended (or gave nothing within 10 s).
    fn query(&mut self, sql: &str) -> Option<String> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut()?;
        writeln!(stdin, "{sql}").ok()?;
        stdin.flush().ok()?;
        self.out.recv_timeout(Duration::from_secs(10)).ok()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stateful instance as `halo status` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Inst {
    node: usize,
    id: String,
    role: String,
    token: i64,
    ready: bool,
    pid: i64,
    port: u16,
    /// A synchronous standby of the current primary.
    sync: bool,
}

fn insts(status: &serde_json::Value, node: usize) -> Vec<Inst> {
    insts_of(status, node, "pg")
}

fn insts_of(status: &serde_json::Value, node: usize, service: &str) -> Vec<Inst> {
    let Some(services) = status["services"].as_array() else { return Vec::new() };
    let pg = services.iter().find(|s| s["name"] == service);
    let list = pg.and_then(|s| s["instances"].as_array()).cloned().unwrap_or_default();
    list.iter()
        .filter(|i| i["stopping"] == false)
        .map(|i| Inst {
            node,
            id: i["id"].as_str().unwrap_or("").to_string(),
            role: i["role"]["role"].as_str().unwrap_or("-").to_string(),
            token: i["role"]["token"].as_i64().unwrap_or(0),
            ready: i["ready"] == true,
            pid: i["pid"].as_i64().unwrap_or(0),
            port: i["port"].as_u64().unwrap_or(0) as u16,
            sync: i["role"]["synchronous"] == true,
        })
        .collect()
}

/// Exactly one ready primary and `replicas` ready replicas following its
/// token.
fn settled(all: &[Inst], replicas: usize) -> Option<Inst> {
    let primaries: Vec<&Inst> = all.iter().filter(|i| i.role == "primary" && i.ready).collect();
    let [p] = primaries[..] else { return None };
    let following = all.iter().filter(|i| i.role == "replica" && i.ready && i.token == p.token).count();
    (following == replicas && all.len() == replicas + 1).then(|| p.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_serves_a_primary_and_two_streaming_replicas_kept_across_restarts_and_upgrades_of_halo() {
    let recipe = Recipe::new();
    let mut h = Halo::up_logged(BIN, &recipe.node_file()).expect("halo up");
    let (w, r) = (h.listeners["pg-primary"], h.listeners["pg-replicas"]);
    let mut before = Vec::new();
    eventually(Duration::from_secs(60), "a primary and two replicas following it", || {
        before = insts(&h.status(), 0);
        std::future::ready(settled(&before, 2).is_some())
    })
    .await;
    let primary = settled(&before, 2).unwrap();
    println!("roles: {before:?}");
    psql(None, w, "create table t(id int primary key)").expect("create through the primary's listener");
    psql(None, w, "insert into t select generate_series(1, 100)").expect("insert");
    eventually(Duration::from_secs(20), "the replicas' listener reads the rows", || {
        std::future::ready(psql(None, r, "select count(*) from t").as_deref() == Ok("100"))
    })
    .await;
    assert_eq!(psql(None, r, "select pg_is_in_recovery()").as_deref(), Ok("t"), "5433 reaches a replica");
    let refused = psql(None, r, "insert into t values (1000)").unwrap_err();
    assert!(refused.contains("read-only"), "a replica refuses writes: {refused}");
    // The data lives in each instance's own directory, beside halo's.
    let volumes = PathBuf::from(format!("{}-volumes", h.data_dir.as_ref().unwrap().display()));
    for i in &before {
        assert!(volumes.join(&i.id).join("pgdata/PG_VERSION").exists(), "{}'s data under {}", i.id, volumes.display());
    }

    // kill -9 of halo: the same postmasters are adopted, roles kept.
    h.restart().expect("halo again");
    let mut after = Vec::new();
    eventually(Duration::from_secs(30), "the instances adopted with their roles", || {
        after = insts(&h.status(), 0);
        std::future::ready(settled(&after, 2).is_some())
    })
    .await;
    let key = |v: &[Inst]| -> Vec<(String, String, i64, i64)> {
        let mut k: Vec<_> = v.iter().map(|i| (i.id.clone(), i.role.clone(), i.token, i.pid)).collect();
        k.sort();
        k
    };
    assert_eq!(key(&before), key(&after), "same processes, same roles, same token after kill -9 of halo");
    let w = h.listeners["pg-primary"];
    psql(None, w, "insert into t values (101)").expect("a write after the restart");
    let r = h.listeners["pg-replicas"];
    eventually(Duration::from_secs(20), "the replicas have it", || {
        std::future::ready(psql(None, r, "select count(*) from t").as_deref() == Ok("101"))
    })
    .await;

    // A graceful stop (every instance stopped) and a start: the same
    // primary, writable again, with its data.
    h.signal("TERM");
    assert_eq!(h.wait(Duration::from_secs(60)), Some(0), "halo stops");
    h.restart().expect("halo again");
    let mut again = Vec::new();
    eventually(Duration::from_secs(60), "the same primary after a restart", || {
        again = insts(&h.status(), 0);
        std::future::ready(settled(&again, 2).is_some_and(|p| p.id == primary.id))
    })
    .await;
    let w = h.listeners["pg-primary"];
    psql(None, w, "insert into t values (102)").expect("a write after a graceful restart");
    assert_eq!(psql(None, w, "select count(*) from t").as_deref(), Ok("102"), "nothing lost");
    let after = again;

    // Bad input is refused, naming the field; nothing running changes.
    let bad = [
        ("name = \"db\"\nreplicas = 2\n[run]\ncommand = \"x\"\n[stateful]\n", "stateful.promote"),
        ("name = \"db\"\n[run]\ncommand = \"x\"\n[stateful]\nreplace_after = \"soon\"\n", "stateful.replace_after"),
        ("name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\nrole = \"replica\"\n", "routes[0].role"),
        (
            "name = \"db\"\nreplicas = 2\n[run]\ncommand = \"x\"\n[stateful]\npromote = [\"p\"]\nfollow = [\"f\"]\nposition = [\"q\"]\nclone = [\"c\"]\nsynchronous = true\n",
            "stateful.set_synchronous",
        ),
        ("name = \"db\"\n[run]\ncommand = \"x\"\n[stateful]\nsynchronous = \"always\"\n", "stateful.synchronous"),
        (
            "name = \"db\"\n[run]\ncommand = \"x\"\n[stateful]\n[release]\nstrategy = \"canary\"\nsteps = [{ weight = 10, pause = \"1m\" }]\n",
            "release.strategy",
        ),
    ];
    for (text, field) in bad {
        let file = recipe.dir.write("bad.toml", text);
        let (code, _, err) = h.cli(&["apply", "-f", &file.to_string_lossy()]);
        assert_ne!(code, 0, "{text} was accepted");
        assert!(err.contains(field), "the error names {field}: {err}");
    }
    assert_eq!(key(&insts(&h.status(), 0)), key(&after), "nothing running changed");

    // A binary upgrade: the new process adopts the same postmasters and
    // serves the same primary under the same token.
    let data = h.data_dir.clone().unwrap();
    let mut reaper = halo_testkit::Reaper::default();
    let old = h.pid();
    let pid = halo_testkit::upgrade(BIN, &["--data-dir".as_ref(), data.as_os_str()]).expect("halo upgrade");
    reaper.0.push(pid);
    eventually(Duration::from_secs(30), "the old process handed over and exited", || {
        std::future::ready(!halo_testkit::alive(old))
    })
    .await;
    let mut upgraded = Vec::new();
    eventually(Duration::from_secs(30), "the roles after the upgrade", || {
        upgraded = insts(&h.status(), 0);
        std::future::ready(settled(&upgraded, 2).is_some())
    })
    .await;
    assert_eq!(key(&upgraded), key(&after), "same processes, roles and token after a binary upgrade");
    psql(None, h.listeners["pg-primary"], "insert into t values (103)").expect("a write after the upgrade");
    println!("primary {} (token {}) kept across kill -9 of halo and an upgrade", primary.id, primary.token);
}

/// The tokens of `pg`'s promotions in the order the cluster's events have
/// them (as node `i` reads them).
fn promotions(c: &Cluster, i: usize) -> Vec<i64> {
    let (code, out, err) = c.cli(i, &["events", "--service", "pg", "-n", "500", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&out).expect("events as json");
    let mut promoted: Vec<(u64, i64)> = events
        .iter()
        .filter(|e| e["kind"] == "promoted")
        .filter_map(|e| {
            let m = e["message"].as_str()?;
            let token = m.rsplit("(token ").next()?.trim_end_matches(')').parse().ok()?;
            Some((e["time_ms"].as_u64()?, token))
        })
        .collect();
    promoted.sort_by_key(|(t, _)| *t);
    promoted.into_iter().map(|(_, token)| token).collect()
}

/// A process's state letter (`R`, `S`, `T` for stopped...).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The three-node harness with the recipe's listeners on every node.
fn pg_cluster(recipe: &Recipe, set: &[(&str, toml::Value)]) -> Cluster {
    let c = Cluster::start_with(BIN, 3, &|nd| {
        format!(
            "[[listeners]]\nname = \"pg-primary\"\nlisten = \"{ip}:5432\"\nprotocol = \"tcp\"\nupstream = \"pg\"\nidle_timeout = \"0\"\n\n\
             [[listeners]]\nname = \"pg-replicas\"\nlisten = \"{ip}:5433\"\nprotocol = \"tcp\"\nupstream = \"pg.replica\"\nidle_timeout = \"0\"\n",
            ip = nd.ip
        )
    });
    let file = recipe.service_file(set);
    let (code, out, err) = c.cli(0, &["apply", "-f", &file.to_string_lossy()]);
    assert_eq!(code, 0, "apply: {out}{err}");
    c
}

fn cluster_insts(c: &Cluster, skip: Option<usize>) -> Vec<Inst> {
    (0..c.nodes.len())
        .filter(|i| Some(*i) != skip)
        .flat_map(|i| c.status(i).map(|s| insts(&s, i)).unwrap_or_default())
        .collect()
}

async fn wait_settled(c: &Cluster, skip: Option<usize>, replicas: usize, within: Duration, what: &str) -> Inst {
    let mut all = Vec::new();
    eventually(within, what, || {
        all = cluster_insts(c, skip);
        std::future::ready(settled(&all, replicas).is_some())
    })
    .await;
    settled(&all, replicas).unwrap()
}

fn pg_addr(c: &Cluster, node: usize, port: u16) -> SocketAddr {
    SocketAddr::new(c.nodes[node].ip.into(), port)
}

/// The rows the primary reachable at `addr` has, by id.
fn ids(ns: &str, addr: SocketAddr) -> std::collections::BTreeSet<u64> {
    let out = psql(Some(ns), addr, "select id from w order by id").expect("read the rows");
    out.lines().filter_map(|l| l.parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_primarys_node_promotes_a_replica_that_every_other_node_reaches() {
    killed_primary_node(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_promotes_the_standby_and_loses_no_acknowledged_write_when_the_primarys_node_is_killed() {
    killed_primary_node(true).await;
}

/// kill -9 of the primary's node under writes through the other nodes'
/// listeners: a replica (with `sync`, the synchronous standby, and then
/// no acknowledged write is lost) is promoted and every other node reaches it.
async fn killed_primary_node(sync: bool) {
    let recipe = Recipe::new();
    let mut c = pg_cluster(&recipe, &[("synchronous", toml::Value::Boolean(sync))]);
    let ns = c.client_ns();
    let (p, s) = if sync {
        wait_standby(&c, None, 2, "a primary with a synchronous standby on three nodes").await
    } else {
        let p = wait_settled(&c, None, 2, Duration::from_secs(90), "a primary and two replicas on three nodes").await;
        (p.clone(), p)
    };
    psql(Some(&ns), pg_addr(&c, 0, 5432), "create table w(id bigint primary key)").expect("create");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != p.node).collect();
    let writes = Writes::start(Some(ns.clone()), survivors.iter().map(|i| pg_addr(&c, *i, 5432)).collect());
    eventually(Duration::from_secs(20), "writes acknowledged", || std::future::ready(writes.acks().len() >= 20)).await;
    let killed = Instant::now();
    c.kill_node(p.node);
    eventually(Duration::from_secs(30), "a write acknowledged after the kill", || {
        std::future::ready(writes.acks().iter().any(|a| a.at > killed))
    })
    .await;
    let first = writes.acks().iter().find(|a| a.at > killed).map(|a| a.at - killed).unwrap();
    println!("kill -9 of the primary's node {}: first acknowledged write after {first:?}", c.nodes[p.node].name);
    let q = wait_settled(&c, Some(p.node), 1, Duration::from_secs(30), "a new primary and one replica").await;
    assert_ne!(q.node, p.node);
    assert!(q.token > p.token, "the new token {} is above the old {}", q.token, p.token);
    if sync {
        assert_eq!(q.id, s.id, "the synchronous standby was promoted, not the other replica");
        let (r, t) = wait_standby(&c, Some(p.node), 1, "the new primary with the last replica as its standby").await;
        assert_eq!(r.id, q.id);
        assert_ne!(t.id, q.id);
    }
    let (_, text, _) = c.cli(q.node, &["status"]);
    let shown = format!("{} ({}, {})", q.id, c.nodes[q.node].name, q.token);
    assert!(text.contains("PRIMARY (NODE, TOKEN)") && text.contains(&shown), "{text}");
    for i in &survivors {
        let r =
            psql(Some(&ns), pg_addr(&c, *i, 5432), "insert into w(id) values (-1 - inet_server_port()) returning 1");
        assert!(r.is_ok() || r.as_ref().unwrap_err().contains("duplicate"), "node {i}'s listener writes: {r:?}");
        let _ = psql(Some(&ns), pg_addr(&c, *i, 5432), "delete from w where id < 0");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acks = writes.finish();
    let have = ids(&ns, pg_addr(&c, survivors[0], 5432));
    let after: Vec<&Ack> = acks.iter().filter(|a| a.at > killed).collect();
    let missing_after: Vec<u64> = after.iter().map(|a| a.id).filter(|id| !have.contains(id)).collect();
    assert!(missing_after.is_empty(), "writes acknowledged by the new primary are all there: {missing_after:?}");
    let lost: Vec<u64> = acks.iter().filter(|a| a.at <= killed && !have.contains(&a.id)).map(|a| a.id).collect();
    println!(
        "{} writes acknowledged ({} after the kill); {} acknowledged by the old primary are not on the new one ({})",
        acks.len(),
        after.len(),
        lost.len(),
        if sync { "synchronous" } else { "asynchronous replication" }
    );
    if sync {
        assert!(lost.is_empty(), "acknowledged writes lost in synchronous mode: {lost:?}");
    }
}

/// Faults that leave the old primary's node alive: SIGSTOP for 15 s, or
/// its link cut. A replica elsewhere is promoted; the old primary never
/// takes a write through any listener after the new one took its first;
/// it comes back a replica of the new primary; the token only grows.
async fn isolated_primary(freeze: bool, sync: bool) {
    let recipe = Recipe::new();
    let mut c = pg_cluster(&recipe, &[("synchronous", toml::Value::Boolean(sync))]);
    let ns = c.client_ns();
    let p = wait_settled(&c, None, 2, Duration::from_secs(90), "a primary and two replicas on three nodes").await;
    psql(Some(&ns), pg_addr(&c, 0, 5432), "create table w(id bigint primary key)").expect("create");
    let old_server = format!("{}:{}", c.nodes[p.node].ip, p.port);
    let writes = Writes::start(Some(ns.clone()), (0..3).map(|i| pg_addr(&c, i, 5432)).collect());
    eventually(Duration::from_secs(20), "writes acknowledged", || std::future::ready(writes.acks().len() >= 20)).await;
    // A session open through another node's listener to the old primary.
    let other = (0..3).find(|i| *i != p.node).unwrap();
    let mut session = Session::open(&ns, pg_addr(&c, other, 5432));
    assert_eq!(
        session.query("select host(inet_server_addr()) || ':' || inet_server_port();"),
        Some(format!("{}:{}", c.nodes[p.node].ip, p.port))
    );
    let what = if freeze { "SIGSTOP" } else { "a link cut" };
    let began = Instant::now();
    if freeze {
        c.freeze(p.node, true);
    } else {
        c.cut(p.node, true);
    }
    let q = wait_settled(&c, Some(p.node), 1, Duration::from_secs(30), "a primary elsewhere").await;
    assert_ne!(q.node, p.node);
    // That session was closed when the primary changed: its next write
    // fails, and never reaches the old primary.
    assert_eq!(
        session.query("insert into w(id) values (-7) returning id;"),
        None,
        "a session to the old primary lives on"
    );
    println!("{what} of the primary's node: {} promoted (token {}) after {:?}", q.id, q.token, began.elapsed());
    if !freeze {
        // Cut off, its node stops the primary taking writes by itself: the
        // process is frozen (or gone).
        // (Its postmaster, not a hook that was talking to it.)
        eventually(Duration::from_secs(20), "the cut-off primary frozen or stopped", || {
            std::future::ready(process_state(p.pid as i32).is_none_or(|s| s == 'T' || s == 'Z'))
        })
        .await;
    }
    let held = Duration::from_secs(15).saturating_sub(began.elapsed());
    tokio::time::sleep(held).await;
    if freeze {
        c.freeze(p.node, false);
    } else {
        c.cut(p.node, false);
    }
    // The old primary comes back as a replica of the new one.
    let mut back = Vec::new();
    eventually(Duration::from_secs(90), "the old primary rewound and following", || {
        back = cluster_insts(&c, None);
        std::future::ready(settled(&back, 2).is_some_and(|n| n.id == q.id))
    })
    .await;
    let old = back.iter().find(|i| i.id == p.id).expect("the old primary's instance").clone();
    assert_eq!((old.role.as_str(), old.token), ("replica", q.token), "{back:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acks = writes.finish();
    let first_new = acks
        .iter()
        .find(|a| a.server != old_server && a.at > began)
        .map(|a| a.at)
        .expect("the new primary took writes");
    let late: Vec<&Ack> = acks.iter().filter(|a| a.server == old_server && a.at >= first_new).collect();
    assert!(late.is_empty(), "the old primary took writes after the new one's first: {late:?}");
    // Every promotion, in the order the cluster recorded them, under a
    // greater token than the one before.
    let tokens = promotions(&c, q.node);
    assert!(tokens.len() >= 2 && tokens.windows(2).all(|w| w[0] < w[1]), "the token only grows: {tokens:?}");
    // It follows: a row written now reaches it.
    psql(Some(&ns), pg_addr(&c, q.node, 5432), "insert into w(id) values (999999999)").expect("a write");
    let direct = pg_addr(&c, old.node, old.port);
    eventually(Duration::from_secs(20), "the old primary has the new row", || {
        std::future::ready(psql(Some(&ns), direct, "select count(*) from w where id = 999999999").as_deref() == Ok("1"))
    })
    .await;
    let stray = psql(Some(&ns), pg_addr(&c, q.node, 5432), "select count(*) from w where id = -7");
    assert_eq!(stray.as_deref(), Ok("0"), "the closed session's write went nowhere");
    if sync {
        let have = ids(&ns, pg_addr(&c, q.node, 5432));
        let lost: Vec<u64> = acks.iter().map(|a| a.id).filter(|id| !have.contains(id)).collect();
        assert!(lost.is_empty(), "acknowledged writes lost in synchronous mode: {lost:?}");
        let story = ClusterStory(&c);
        let (r, s) = wait_standby(&c, None, 2, "the new primary with a synchronous standby").await;
        assert_eq!(r.id, q.id);
        println!("{} is the synchronous standby of {}", s.id, r.id);
        drop(story);
    }
    println!(
        "{what}: {} writes acknowledged; none by the old primary after the new one's first; tokens {tokens:?}",
        acks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_a_synchronous_primarys_node_promotes_elsewhere_loses_nothing_and_the_old_one_is_rewound() {
    isolated_primary(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_primary_stops_itself_and_comes_back_a_replica() {
    isolated_primary(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_replica_is_cloned_elsewhere_after_replace_after() {
    let recipe = Recipe::new();
    let mut c = pg_cluster(&recipe, &[("replace_after", toml::Value::String("3s".into()))]);
    let ns = c.client_ns();
    let p = wait_settled(&c, None, 2, Duration::from_secs(90), "a primary and two replicas on three nodes").await;
    psql(Some(&ns), pg_addr(&c, p.node, 5432), "create table w(id bigint primary key)").expect("create");
    psql(Some(&ns), pg_addr(&c, p.node, 5432), "insert into w select generate_series(1, 1000)").expect("rows");
    let all = cluster_insts(&c, None);
    let victim = all.iter().find(|i| i.role == "replica").expect("a replica").clone();
    c.kill_node(victim.node);
    let mut now: BTreeMap<String, Inst> = BTreeMap::new();
    eventually(Duration::from_secs(90), "the lost replica recreated on another node", || {
        let all = cluster_insts(&c, Some(victim.node));
        now = all.iter().map(|i| (i.id.clone(), i.clone())).collect();
        let back = now.get(&victim.id);
        std::future::ready(settled(&all, 2).is_some() && back.is_some_and(|b| b.node != victim.node))
    })
    .await;
    let moved = &now[&victim.id];
    let direct = pg_addr(&c, moved.node, moved.port);
    assert_eq!(psql(Some(&ns), direct, "select count(*) from w").as_deref(), Ok("1000"), "cloned with the data");
    let (_, events, _) = c.cli(p.node, &["events"]);
    assert!(events.contains(&format!("{} cloned from", victim.id)), "{events}");
    println!("{} moved from {} to {}", victim.id, c.nodes[victim.node].name, c.nodes[moved.node].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_further_behind_than_max_lag_on_failover_is_not_promoted() {
    let recipe = Recipe::new();
    let node = recipe
        .node_file()
        .replace("replicas = 3", "replicas = 2")
        .replace("max_lag_on_failover = 16777216", "max_lag_on_failover = 1048576")
        .replace("[services.stop]", "[services.restart]\nbackoff_max = \"1s\"\n\n[services.stop]");
    let h = Halo::up_logged(BIN, &node).expect("halo up");
    let w = h.listeners["pg-primary"];
    let mut all = Vec::new();
    eventually(Duration::from_secs(60), "a primary and a replica", || {
        all = insts(&h.status(), 0);
        std::future::ready(settled(&all, 1).is_some())
    })
    .await;
    let p = settled(&all, 1).unwrap();
    let r = all.iter().find(|i| i.role == "replica").unwrap().clone();
    let direct = |i: &Inst| SocketAddr::from(([127, 0, 0, 1], i.port));
    psql(None, w, "create table big(x text)").expect("create");
    // The replica stops streaming; 4 MB more reach the primary only.
    psql(None, direct(&r), "alter system set primary_conninfo = ''").expect("detach the replica");
    psql(None, direct(&r), "select pg_reload_conf()").expect("reload");
    eventually(Duration::from_secs(20), "the replica's WAL receiver stopped", || {
        std::future::ready(psql(None, direct(&r), "select count(*) from pg_stat_wal_receiver").as_deref() == Ok("0"))
    })
    .await;
    psql(None, w, "insert into big select repeat('x', 1000) from generate_series(1, 4000)").expect("4 MB");
    eventually(Duration::from_secs(20), "the replica's lag past 1 MB", || {
        let s = h.status();
        let lag = s["services"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == r.id.as_str())
            .and_then(|i| i["role"]["lag"].as_u64());
        std::future::ready(lag.is_some_and(|l| l > 1 << 20))
    })
    .await;
    // The primary's data becomes unreadable and its process dies: it
    // cannot come back, and after restart_grace it hands over.
    let pgdata =
        PathBuf::from(format!("{}-volumes", h.data_dir.as_ref().unwrap().display())).join(&p.id).join("pgdata");
    chmod(&pgdata, 0o000);
    // Its postmaster only, checked to be one (its backends end with it).
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).unwrap_or_default();
    assert!(p.pid > 1 && comm.trim() == "postgres", "the primary's pid {} is not a postmaster: {comm:?}", p.pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 of the postmaster");
    let mut why = String::new();
    eventually(Duration::from_secs(60), "the replica refusing to take over, too far behind", || {
        let s = h.status();
        let list = s["services"][0]["instances"].as_array().cloned().unwrap_or_default();
        let primary = list.iter().any(|i| i["role"]["role"] == "primary");
        let me = list.iter().find(|i| i["id"] == r.id.as_str());
        why = me.and_then(|i| i["role"]["candidacy"].as_str()).unwrap_or("").to_string();
        std::future::ready(!primary && why.contains("max_lag_on_failover"))
    })
    .await;
    println!("{} does not take over: {why}", r.id);
    let (_, text, _) = h.cli(&["status"]);
    assert!(text.contains("no primary; not taking over:") && text.contains("max_lag_on_failover"), "{text}");
    // The old primary's data comes back: it starts as a standby, is the
    // furthest ahead, and is promoted again with the next token; nothing lost.
    chmod(&pgdata, 0o700);
    eventually(Duration::from_secs(60), "the old primary promoted again", || {
        all = insts(&h.status(), 0);
        std::future::ready(settled(&all, 1).is_some_and(|q| q.id == p.id && q.token > p.token))
    })
    .await;
    assert_eq!(psql(None, h.listeners["pg-primary"], "select count(*) from big").as_deref(), Ok("4000"));
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The benchmark's settings from the environment: `HALO_BENCH_RUNS`
/// (default 10), `HALO_BENCH_FAULT` (kill, stop, cut or switchover of the
/// primary's node) and `HALO_BENCH_SYNC` (1: synchronous replication).
fn bench_settings() -> (usize, String, bool) {
    let runs = std::env::var("HALO_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let fault = std::env::var("HALO_BENCH_FAULT").unwrap_or_else(|_| "kill".into());
    assert!(
        ["kill", "stop", "cut", "switchover"].contains(&fault.as_str()),
        "HALO_BENCH_FAULT={fault}: accepted: kill, stop, cut, switchover"
    );
    let sync = std::env::var("HALO_BENCH_SYNC").is_ok_and(|v| v == "1");
    (runs, fault, sync)
}

/// One benchmark run's fault on the primary's node `node` (a switchover
/// by `switch`), under writes through `targets`; then the record: the
/// time from the fault to the first write a new primary acknowledged,
/// the longest gap between two acknowledged writes around it, writes the
/// old primary (`old_server`) acknowledged after the new one's first, and
/// acknowledged writes not on the new primary (read through `read`).
#[allow(clippy::too_many_arguments)]
async fn bench_run(
    c: &mut Cluster,
    ns: &str,
    node: usize,
    old_server: &str,
    targets: Vec<SocketAddr>,
    fault: &str,
    within: Duration,
    switch: &dyn Fn(&Cluster),
) -> String {
    let writes = Writes::start(Some(ns.to_string()), targets);
    eventually(Duration::from_secs(20), "writes", || std::future::ready(writes.acks().len() >= 10)).await;
    let at = Instant::now();
    match fault {
        "kill" => c.kill_node(node),
        "stop" => c.freeze(node, true),
        "cut" => c.cut(node, true),
        _ => switch(c),
    }
    eventually(within, "a write acknowledged by a new primary after the fault", || {
        std::future::ready(writes.acks().iter().any(|a| a.at > at && a.server != old_server))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acks = writes.finish();
    let first = acks.iter().find(|a| a.at > at && a.server != old_server).map(|a| a.at).unwrap();
    let late = acks.iter().filter(|a| a.server == old_server && a.at >= first).count();
    let gap = acks
        .windows(2)
        .filter(|w| w[1].at >= at && w[0].at <= first)
        .map(|w| w[1].at.saturating_duration_since(w[0].at.max(at)))
        .max()
        .unwrap_or_default();
    let reader = (0..c.nodes.len()).filter(|i| *i != node).map(|i| pg_addr(c, i, 5432)).collect::<Vec<_>>();
    let mut have = None;
    for _ in 0..50 {
        have = reader.iter().find_map(|a| psql(Some(ns), *a, "select id from w").ok());
        if have.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let have: std::collections::BTreeSet<u64> =
        have.expect("the new primary answers").lines().filter_map(|l| l.parse().ok()).collect();
    let lost = acks.iter().filter(|a| !have.contains(&a.id)).count();
    if fault == "stop" {
        c.freeze(node, false);
    }
    if fault == "cut" {
        c.cut(node, false);
    }
    format!(
        "first_write_ms={} gap_ms={} old_primary_writes_after={late} lost={lost} acked={}",
        (first - at).as_millis(),
        gap.as_millis(),
        acks.len()
    )
}

/// `bench/stateful.sh`: faults of the primary's node (or a switchover),
/// each on a fresh three-node cluster under the write load: [`bench_run`]'s
/// record. One `RESULT` line per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/stateful.sh runs it"]
async fn bench_failover() {
    let (runs, fault, sync) = bench_settings();
    let recipe = Recipe::new();
    let set = [("synchronous", toml::Value::Boolean(sync))];
    for run in 0..runs {
        let mut c = pg_cluster(&recipe, &set);
        let ns = c.client_ns();
        let (p, _) = if sync {
            wait_standby(&c, None, 2, "a primary with a synchronous standby").await
        } else {
            let p = wait_settled(&c, None, 2, Duration::from_secs(90), "a primary and two replicas").await;
            (p.clone(), p)
        };
        psql(Some(&ns), pg_addr(&c, 0, 5432), "create table w(id bigint primary key)").expect("create");
        let old_server = format!("{}:{}", c.nodes[p.node].ip, p.port);
        // HALO_BENCH_ETCD_LEADER=with|apart: etcd's raft leader moved onto
        // the primary's node, or off it, before the fault (else as it is).
        let want = std::env::var("HALO_BENCH_ETCD_LEADER").unwrap_or_default();
        if let Some(now) = c.etcd_leader().await {
            let to = match want.as_str() {
                "with" => Some(p.node),
                "apart" => Some((p.node + 1) % 3),
                _ => None,
            };
            if let Some(to) = to.filter(|t| *t != now) {
                c.move_etcd_leader(now, to).await;
                eventually(Duration::from_secs(10), "etcd's leader moved", || async {
                    c.etcd_leader().await == Some(to)
                })
                .await;
            }
        }
        let etcd_leader = c.etcd_leader().await == Some(p.node);
        // A frozen or cut-off node's own listener too: the one that could
        // still reach the old primary.
        let targets = (0..3).filter(|i| *i != p.node || fault != "kill").map(|i| pg_addr(&c, i, 5432)).collect();
        let other = (p.node + 1) % 3;
        let switch = |c: &Cluster| {
            let (code, out, err) = c.cli(other, &["switchover", "pg"]);
            assert_eq!(code, 0, "halo switchover: {out}{err}");
        };
        let rec = bench_run(&mut c, &ns, p.node, &old_server, targets, &fault, Duration::from_secs(30), &switch).await;
        println!("RESULT system=halo sync={sync} fault={fault} run={run} {rec} etcd_leader_on_it={etcd_leader}");
    }
}

/// Patroni 3 (Debian's) on the same three-node harness and the same
/// 3-member etcd, with HAProxy on every node routing port 5432 to the
/// member whose REST API answers `/primary`, as Patroni's documentation
/// sets it up; `HALO_BENCH_PATRONI=defaults|tight` (ttl 30, loop_wait 10,
/// retry_timeout 10, or the least its documentation allows: 20, 1, 3).
/// The halo agents run too, idle (no service). One `RESULT` line per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/stateful.sh runs it"]
async fn bench_patroni() {
    let (runs, fault, sync) = bench_settings();
    let tight = std::env::var("HALO_BENCH_PATRONI").is_ok_and(|v| v == "tight");
    let (ttl, loop_wait, retry) = if tight { (20, 1, 3) } else { (30, 10, 10) };
    for run in 0..runs {
        let mut c = Cluster::start(BIN, 3);
        let ns = c.client_ns();
        let dir = halo_testkit::TempDir::new("patroni");
        chmod(&dir.0, 0o755);
        let _logs = KeepLogs(dir.0.clone());
        let mut children = Children(Vec::new());
        let hosts: Vec<String> = c.nodes.iter().map(|n| format!("{}:2379", n.ip)).collect();
        let servers: String = c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("    server pg{i} {}:5433 maxconn 100 check port 8008\n", n.ip))
            .collect();
        for (i, n) in c.nodes.iter().enumerate() {
            let home = dir.0.join(format!("pg{i}"));
            std::fs::create_dir(&home).expect("mkdir");
            let yml = format!(
                "scope: bench\nname: pg{i}\nrestapi:\n  listen: {ip}:8008\n  connect_address: {ip}:8008\n\
                 etcd3:\n  hosts: {hosts}\n\
                 bootstrap:\n  dcs:\n    ttl: {ttl}\n    loop_wait: {loop_wait}\n    retry_timeout: {retry}\n\
                 \x20   maximum_lag_on_failover: 16777216\n    synchronous_mode: {sync}\n\
                 \x20   postgresql:\n      use_pg_rewind: true\n      parameters:\n        wal_level: replica\n\
                 \x20       hot_standby: 'on'\n        wal_log_hints: 'on'\n        max_wal_senders: 10\n\
                 \x20       max_replication_slots: 10\n        wal_keep_size: 512MB\n\
                 \x20 initdb:\n  - auth: trust\n\
                 \x20 pg_hba:\n  - host replication replicator 0.0.0.0/0 trust\n  - host all all 0.0.0.0/0 trust\n\
                 postgresql:\n  listen: {ip}:5433\n  connect_address: {ip}:5433\n  data_dir: {home}/data\n\
                 \x20 bin_dir: {bin}\n  pgpass: {home}/pgpass\n\
                 \x20 authentication:\n    superuser:\n      username: postgres\n      password: bench\n\
                 \x20   replication:\n      username: replicator\n      password: bench\n\
                 \x20 parameters:\n    unix_socket_directories: '{home}'\n",
                ip = n.ip,
                hosts = hosts.join(","),
                home = home.display(),
                bin = pg_bin(),
            );
            let cfg = home.join("patroni.yml");
            std::fs::write(&cfg, yml).expect("patroni.yml");
            let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&home).status().expect("chown");
            assert!(chown.success());
            let log = std::fs::File::create(home.join("patroni.log")).expect("log");
            let patroni = Command::new("ip")
                .args(["netns", "exec", &n.ns, "runuser", "-u", "postgres", "--", "patroni"])
                .arg(&cfg)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("patroni");
            children.0.push(patroni);
            let haproxy = format!(
                "global\n    maxconn 300\ndefaults\n    mode tcp\n    retries 2\n    timeout client 30m\n\
                 \x20   timeout connect 4s\n    timeout server 30m\n    timeout check 5s\n\
                 listen primary\n    bind {ip}:5432\n    option httpchk OPTIONS /primary\n\
                 \x20   http-check expect status 200\n\
                 \x20   default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions\n{servers}",
                ip = n.ip
            );
            let hcfg = home.join("haproxy.cfg");
            std::fs::write(&hcfg, haproxy).expect("haproxy.cfg");
            let haproxy = Command::new("ip")
                .args(["netns", "exec", &n.ns, "haproxy", "-db", "-f"])
                .arg(&hcfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("haproxy");
            children.0.push(haproxy);
        }
        // Settled: a leader and two streaming replicas (one a synchronous
        // standby in synchronous mode), and HAProxy routing to the leader.
        let mut leader = None;
        eventually(Duration::from_secs(120), "Patroni: a leader and two streaming replicas", || {
            leader = patroni_settled(&c, &ns, sync);
            std::future::ready(leader.is_some())
        })
        .await;
        let p = leader.unwrap();
        eventually(Duration::from_secs(30), "HAProxy reaches the leader", || {
            std::future::ready(psql(Some(&ns), pg_addr(&c, 0, 5432), "select 1").is_ok())
        })
        .await;
        psql(Some(&ns), pg_addr(&c, 0, 5432), "create table w(id bigint primary key)").expect("create");
        let old_server = format!("{}:5433", c.nodes[p].ip);
        let targets = (0..3).filter(|i| *i != p || fault != "kill").map(|i| pg_addr(&c, i, 5432)).collect();
        let switch = |c: &Cluster| {
            let url = format!("http://{}:8008/switchover", c.nodes[p].ip);
            let body = format!("{{\"leader\": \"pg{p}\"}}");
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "curl", "-s", "-m", "60", "-XPOST", &url, "-d", &body])
                .output()
                .expect("curl");
            assert!(out.status.success(), "patroni switchover: {}", String::from_utf8_lossy(&out.stdout));
        };
        let within = Duration::from_secs(if tight { 60 } else { 90 });
        let rec = bench_run(&mut c, &ns, p, &old_server, targets, &fault, within, &switch).await;
        let how = if tight { "tight" } else { "defaults" };
        println!("RESULT system=patroni-{how} sync={sync} fault={fault} run={run} {rec}");
    }
}

/// On a failure, Patroni's logs are copied to `target/patroni-logs/`.
struct KeepLogs(PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let to = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/patroni-logs"));
        let _ = std::fs::create_dir_all(&to);
        for i in 0..3 {
            let _ = std::fs::copy(self.0.join(format!("pg{i}/patroni.log")), to.join(format!("pg{i}.log")));
        }
        eprintln!("Patroni's logs: {}", to.display());
    }
}

/// Processes killed and reaped on drop (the harness's teardown kills what
/// they started in the namespaces).
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// PostgreSQL's bin directory (the newest installed).
fn pg_bin() -> String {
    let mut v: Vec<_> = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL").flatten().collect();
    v.sort_by_key(|e| e.file_name());
    v.last().expect("a PostgreSQL version").path().join("bin").display().to_string()
}

/// The node of Patroni's leader once it runs with two streaming replicas
/// (in synchronous mode, one of them its synchronous standby).
fn patroni_settled(c: &Cluster, ns: &str, sync: bool) -> Option<usize> {
    let url = format!("http://{}:8008/cluster", c.nodes[0].ip);
    let out = Command::new("ip").args(["netns", "exec", ns, "curl", "-s", "-m", "2", &url]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let members = v["members"].as_array()?;
    let leader = members.iter().find(|m| m["role"] == "leader" && m["state"] == "running")?;
    let streaming = members
        .iter()
        .filter(|m| m["role"] != "leader" && (m["state"] == "running" || m["state"] == "streaming"))
        .count();
    let standby = members.iter().any(|m| m["role"] == "sync_standby");
    let name = leader["name"].as_str()?;
    (streaming == 2 && (!sync || standby)).then(|| name.trim_start_matches("pg").parse().ok()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failing_its_check_hands_over_and_is_rewound() {
    let recipe = Recipe::new();
    let h = Halo::up_logged(BIN, &recipe.node_file()).expect("halo up");
    let mut all = Vec::new();
    eventually(Duration::from_secs(60), "a primary and two replicas", || {
        all = insts(&h.status(), 0);
        std::future::ready(settled(&all, 2).is_some())
    })
    .await;
    let p = settled(&all, 2).unwrap();
    // The primary takes no writes any more (what a full disk or an
    // operator's mistake does): its check fails, it hands over.
    let direct = SocketAddr::from(([127, 0, 0, 1], p.port));
    psql(None, direct, "alter system set default_transaction_read_only = on").expect("alter system");
    psql(None, direct, "select pg_reload_conf()").expect("reload");
    eventually(Duration::from_secs(60), "another primary, the old one rewound and following", || {
        all = insts(&h.status(), 0);
        std::future::ready(settled(&all, 2).is_some_and(|q| q.id != p.id && q.token > p.token))
    })
    .await;
    let (_, events, _) = h.cli(&["events"]);
    assert!(events.contains(&format!("{} stopped: its check failed 3 times in a row", p.id)), "{events}");
    assert!(events.contains(&format!("{} rewound to follow", p.id)), "{events}");
    psql(None, h.listeners["pg-primary"], "create table after_check(id int)").expect("the new primary writes");
}

/// The replica of `all` recorded as the primary's synchronous standby.
fn standby(all: &[Inst], primary: &Inst) -> Option<Inst> {
    all.iter().find(|i| i.role == "replica" && i.sync && i.token == primary.token).cloned()
}

async fn wait_standby(c: &Cluster, skip: Option<usize>, replicas: usize, what: &str) -> (Inst, Inst) {
    let mut all = Vec::new();
    eventually(Duration::from_secs(60), what, || {
        all = cluster_insts(c, skip);
        std::future::ready(settled(&all, replicas).and_then(|p| standby(&all, &p)).is_some())
    })
    .await;
    let p = settled(&all, replicas).unwrap();
    let s = standby(&all, &p).unwrap();
    (p, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_mode_names_another_standby_when_the_standbys_node_is_killed_and_a_drain_switches_over() {
    let recipe = Recipe::new();
    let mut c = pg_cluster(&recipe, &[("synchronous", toml::Value::Boolean(true))]);
    let ns = c.client_ns();
    let (p, s) = wait_standby(&c, None, 2, "a primary with a synchronous standby on three nodes").await;
    psql(Some(&ns), pg_addr(&c, p.node, 5432), "create table w(id bigint primary key)").expect("create");
    let writes = Writes::start(Some(ns.clone()), vec![pg_addr(&c, p.node, 5432)]);
    eventually(Duration::from_secs(20), "writes acknowledged", || std::future::ready(writes.acks().len() >= 20)).await;
    let killed = Instant::now();
    c.kill_node(s.node);
    // Commits wait on the lost standby until the primary names the other.
    eventually(Duration::from_secs(60), "writes acknowledged again after the standby's node was killed", || {
        std::future::ready(writes.acks().iter().filter(|a| a.at > killed).count() >= 5)
    })
    .await;
    let first = writes.acks().iter().find(|a| a.at > killed).map(|a| a.at - killed).unwrap();
    println!("kill -9 of the standby's node: first acknowledged write after {first:?}");
    let (q, t) = wait_standby(&c, Some(s.node), 1, "the other replica recorded as the standby").await;
    assert_eq!(q.id, p.id, "the primary stays");
    assert_ne!(t.id, s.id);
    let acks = writes.finish();
    let have = ids(&ns, pg_addr(&c, p.node, 5432));
    assert!(acks.iter().all(|a| have.contains(&a.id)), "every acknowledged write is on the primary");
    // The new standby has every write the primary acknowledged.
    let standby = SocketAddr::new(c.nodes[t.node].ip.into(), t.port);
    let last = acks.last().unwrap().id;
    eventually(Duration::from_secs(20), "the standby has the last acknowledged write", || {
        std::future::ready(
            psql(Some(&ns), standby, &format!("select count(*) from w where id = {last}")).as_deref() == Ok("1"),
        )
    })
    .await;

    // Draining the primary's node hands the primary to the replica
    // elsewhere; the instance stays on its node, a replica now.
    let name = c.nodes[p.node].name.clone();
    let (code, out, err) = c.cli(t.node, &["node", "drain", &name]);
    assert_eq!(code, 0, "drain: {out}{err}");
    let mut after = Vec::new();
    eventually(Duration::from_secs(60), "the primary moved off the drained node", || {
        after = cluster_insts(&c, Some(s.node));
        std::future::ready(settled(&after, 1).is_some_and(|q| q.node == t.node && q.token > p.token))
    })
    .await;
    let old = after.iter().find(|i| i.id == p.id).expect("the old primary's instance stays");
    assert_eq!((old.node, old.role.as_str()), (p.node, "replica"), "{after:?}");
    let r = psql(Some(&ns), pg_addr(&c, t.node, 5432), "insert into w(id) values (-5) returning id");
    assert_eq!(r.as_deref(), Ok("-5"), "a write after the drain's switchover");
}

/// The longest time between two acknowledged writes in `acks` (sorted).
fn max_gap(acks: &[Ack]) -> Duration {
    acks.windows(2).map(|w| w[1].at - w[0].at).max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_moves_the_primary_with_writes_running_and_loses_nothing() {
    let recipe = Recipe::new();
    let text = recipe.node_file().replace("synchronous = false", "synchronous = true");
    let h = Halo::up_logged(BIN, &text).expect("halo up");
    let _story = Story(&h);
    let w = h.listeners["pg-primary"];
    let mut all = Vec::new();
    eventually(Duration::from_secs(90), "a primary with a synchronous standby", || {
        all = insts(&h.status(), 0);
        std::future::ready(settled(&all, 2).and_then(|p| standby(&all, &p)).is_some())
    })
    .await;
    let p = settled(&all, 2).unwrap();
    let s = standby(&all, &p).unwrap();
    let other = all.iter().find(|i| i.id != p.id && i.id != s.id).unwrap().clone();
    psql(None, w, "create table w(id bigint primary key)").expect("create");

    // Bad input: refused, naming what is accepted; nothing changes.
    let (code, _, err) = h.cli(&["switchover", "pg", "--to", "pg-9"]);
    assert_ne!(code, 0);
    assert!(err.contains("pg-9 is not a healthy replica") && err.contains("accepted:"), "{err}");
    let (code, _, err) = h.cli(&["switchover", "pg", "--to", &p.id]);
    assert!(code != 0 && err.contains("is the primary already"), "{err}");
    let (code, _, err) = h.cli(&["switchover", "nosuch"]);
    assert!(code != 0 && err.contains("nosuch"), "{err}");

    // To the replica that is not the standby: it is made the standby first.
    let writes = Writes::start(None, vec![w]);
    eventually(Duration::from_secs(20), "writes acknowledged", || std::future::ready(writes.acks().len() >= 20)).await;
    let asked = Instant::now();
    let (code, out, err) = h.cli(&["switchover", "pg", "--to", &other.id, "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "switchover: {out}{err}");
    println!("{out}");
    let mut after = Vec::new();
    eventually(Duration::from_secs(60), "the old primary back as a replica of the new one", || {
        after = insts(&h.status(), 0);
        std::future::ready(settled(&after, 2).is_some_and(|q| q.id == other.id && q.token > p.token))
    })
    .await;
    eventually(Duration::from_secs(20), "writes acknowledged by the new primary", || {
        std::future::ready(writes.acks().iter().filter(|a| a.at > asked).count() >= 20)
    })
    .await;
    let acks = writes.finish();
    let have = ids_local(w);
    let lost: Vec<u64> = acks.iter().map(|a| a.id).filter(|id| !have.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost in the switchover: {lost:?}");
    let old = format!("127.0.0.1:{}", p.port);
    let new_first = acks.iter().position(|a| a.server != old).expect("a write on the new primary");
    assert!(
        acks[new_first..].iter().all(|a| a.server != old),
        "the old primary took a write after the new one's first"
    );
    println!(
        "switchover {} -> {}: {} writes, none lost; the longest gap between acknowledged writes {:?}",
        p.id,
        other.id,
        acks.len(),
        max_gap(&acks)
    );
    let q = settled(&after, 2).unwrap();
    let events = h.cli(&["events", "--service", "pg", "-n", "200"]).1;
    assert!(events.contains(&format!("{} stopped and handed the primary to {}", p.id, other.id)), "{events}");

    // Without --to: the standby it chose is promoted.
    // The new primary's standby recorded first: the one a switchover
    // without --to must promote.
    let mut now = Vec::new();
    eventually(Duration::from_secs(60), "the new primary with a synchronous standby", || {
        now = insts(&h.status(), 0);
        std::future::ready(settled(&now, 2).is_some_and(|x| x.id == q.id) && standby(&now, &q).is_some())
    })
    .await;
    let (p2, s2) = (q.clone(), standby(&now, &q).unwrap());
    let (code, out, err) = h.cli(&["switchover", "pg", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "switchover: {out}{err}");
    println!("{out}");
    let mut again = Vec::new();
    eventually(Duration::from_secs(60), "settled after the second switchover", || {
        again = insts(&h.status(), 0);
        std::future::ready(settled(&again, 2).is_some_and(|q| q.id != p2.id && q.token > p2.token))
    })
    .await;
    assert_eq!(settled(&again, 2).unwrap().id, s2.id, "the synchronous standby took over");
    psql(None, h.listeners["pg-primary"], "insert into w(id) values (-1)").expect("a write after both switchovers");
}

/// On a failure, what halo said: its events and its log's last lines.
struct Story<'a>(&'a Halo);

impl Drop for Story<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        eprintln!("--- events\n{}", self.0.cli(&["events", "-n", "100"]).1);
        eprintln!("--- status\n{}", self.0.cli(&["status"]).1);
        for i in 0..3 {
            eprintln!("--- pg-{i}\n{}", self.0.cli(&["logs", "pg", "--instance", &format!("pg-{i}"), "-n", "25"]).1);
        }
        if let Some(log) = &self.0.log {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- log (last 150 lines)\n{}", lines[lines.len().saturating_sub(150)..].join("\n"));
        }
    }
}

/// On a failure, what the cluster said of pg: its events.
struct ClusterStory<'a>(&'a Cluster);

impl Drop for ClusterStory<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- events\n{}", self.0.cli(0, &["events", "--service", "pg", "-n", "120"]).1);
        }
    }
}

/// The rows the primary at `addr` (this machine) has, by id.
fn ids_local(addr: SocketAddr) -> std::collections::BTreeSet<u64> {
    let out = psql(None, addr, "select id from w order by id").expect("read the rows");
    out.lines().filter_map(|l| l.parse().ok()).collect()
}

/// redis-cli against `addr`: its output, or why it failed.
fn redis(addr: SocketAddr, args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["-k", "1", "5", "redis-cli", "-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.starts_with("ERR") && !text.starts_with("READONLY") && !text.is_empty() {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_runs_with_the_same_hooks_contract_fails_over_and_switches_over() {
    let recipe = Recipe::of("redis");
    let h = Halo::up_logged(BIN, &recipe.node_file()).expect("halo up");
    let _story = Story(&h);
    let (w, r) = (h.listeners["redis-primary"], h.listeners["redis-replicas"]);
    let status = |h: &Halo| insts_of(&h.status(), 0, "redis");
    let mut all = Vec::new();
    eventually(Duration::from_secs(60), "a Redis primary with a synchronous standby", || {
        all = status(&h);
        std::future::ready(settled(&all, 2).and_then(|p| standby(&all, &p)).is_some())
    })
    .await;
    let p = settled(&all, 2).unwrap();
    assert_eq!(redis(w, &["set", "k", "1"]).as_deref(), Ok("OK"), "a write through the primary's listener");
    // WAIT: the write is on a replica before the client goes on.
    assert_eq!(redis(w, &["wait", "1", "5000"]).as_deref(), Ok("2"), "both replicas acknowledge");
    eventually(Duration::from_secs(10), "the replicas' listener reads it", || {
        std::future::ready(redis(r, &["get", "k"]).as_deref() == Ok("1"))
    })
    .await;
    let refused = redis(r, &["set", "k", "2"]).unwrap_err();
    assert!(refused.contains("READONLY"), "a replica refuses writes: {refused}");

    let (code, out, err) = h.cli(&["switchover", "redis", "--wait", "--timeout", "60s"]);
    assert_eq!(code, 0, "switchover: {out}{err}");
    let mut after = Vec::new();
    eventually(Duration::from_secs(60), "the old primary back as a replica of the new one", || {
        after = status(&h);
        std::future::ready(settled(&after, 2).is_some_and(|q| q.id != p.id && q.token > p.token))
    })
    .await;
    assert_eq!(redis(w, &["get", "k"]).as_deref(), Ok("1"), "the write is on the new primary");
    assert_eq!(redis(w, &["set", "k", "3"]).as_deref(), Ok("OK"), "the new primary takes writes");

    // The primary turned into a replica behind halo's back: its check
    // fails, it hands over, the standby is promoted with the write.
    let q = settled(&after, 2).unwrap();
    redis(w, &["wait", "2", "5000"]).expect("the replicas have the write");
    let direct = SocketAddr::from(([127, 0, 0, 1], q.port));
    redis(direct, &["replicaof", "127.0.0.1", "1"]).expect("replicaof");
    let mut again = Vec::new();
    eventually(Duration::from_secs(60), "another primary after the old one failed its check", || {
        again = status(&h);
        std::future::ready(again.iter().any(|i| i.role == "primary" && i.ready && i.id != q.id && i.token > q.token))
    })
    .await;
    eventually(Duration::from_secs(20), "the write read through the primary's listener", || {
        std::future::ready(redis(w, &["get", "k"]).as_deref() == Ok("3"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_backup_is_restored_into_the_primary_and_reaches_the_replicas() {
    let recipe = Recipe::new();
    let h = Halo::up_logged(BIN, &recipe.node_file()).expect("halo up");
    let _story = Story(&h);
    let (w, r) = (h.listeners["pg-primary"], h.listeners["pg-replicas"]);
    eventually(Duration::from_secs(60), "a primary and two replicas", || {
        std::future::ready(settled(&insts(&h.status(), 0), 2).is_some())
    })
    .await;
    psql(None, w, "create table t(id int primary key)").expect("create");
    psql(None, w, "insert into t select generate_series(1, 100)").expect("insert");
    let archive = recipe.dir.0.join("pg-backup.tar");
    let (code, out, err) = h.cli(&["backup", "create", "--out", &archive.to_string_lossy()]);
    assert_eq!(code, 0, "backup: {out}{err}");
    // After the backup: rows deleted, a table dropped.
    psql(None, w, "delete from t where id > 10").expect("delete");
    psql(None, w, "create table later(x int)").expect("create later");
    let (code, out, err) = h.cli(&["backup", "restore", &archive.to_string_lossy(), "--force"]);
    assert_eq!(code, 0, "restore: {out}{err}");
    eventually(Duration::from_secs(60), "the primary has the rows of the backup", || {
        std::future::ready(psql(None, w, "select count(*) from t").as_deref() == Ok("100"))
    })
    .await;
    eventually(Duration::from_secs(20), "the replicas have them too", || {
        std::future::ready(psql(None, r, "select count(*) from t").as_deref() == Ok("100"))
    })
    .await;
    // The hook's input is gone once it ran (a failed one would stay, .failed).
    let restore_dir = h.data_dir.as_ref().unwrap().join("restore");
    eventually(Duration::from_secs(10), "the restore input removed", || {
        std::future::ready(std::fs::read_dir(&restore_dir).map_or(true, |mut d| d.next().is_none()))
    })
    .await;
    psql(None, w, "insert into t values (101)").expect("a write after the restore");
}
