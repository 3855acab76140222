//! A real etcd (Debian's `etcd-server`, installed by
//! `scripts/install-test-deps.sh`) for tests: one member on loopback with
//! its own data directory, killed and removed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// A real etcd on loopback: one member or a cluster, each member with its
/// own data directory; every member is killed (SIGKILL) and reaped on drop.
pub struct Etcd {
    members: Vec<(Child, SocketAddr)>,
    _dir: TempDir,
}

impl Etcd {
    /// A single-member cluster, once it answers `/health` (at most 20 s).
    pub fn start() -> Etcd {
        Etcd::cluster(1)
    }

    /// `n` members on free loopback ports, once all are healthy.
    pub fn cluster(n: usize) -> Etcd {
        let dir = TempDir::new("etcd");
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..n).map(|_| (crate::free_addr(), crate::free_addr())).collect();
        let initial: Vec<String> = addrs.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://{p}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in addrs.iter().enumerate() {
            let d = dir.0.join(format!("m{i}"));
            std::fs::create_dir_all(&d).expect("member dir");
            members.push((spawn_member(&format!("m{i}"), &d, *client, *peer, &initial.join(","), None, None), *client));
        }
        for (i, (child, client)) in members.iter_mut().enumerate() {
            wait_healthy(child, *client, &dir.0.join(format!("m{i}")));
        }
        Etcd { members, _dir: dir }
    }

    /// One member serving clients over TLS only, with `leaf` (issued for
    /// 127.0.0.1), and only to clients with a certificate `ca` signed
    /// (`--client-cert-auth`). Its health is asked on a plain metrics
    /// listener. The files live in the etcd's own directory.
    pub fn start_tls(ca: &crate::TestCa, leaf: &crate::Leaf) -> Etcd {
        let dir = TempDir::new("etcd-tls");
        let (client, peer, metrics) = (crate::free_addr(), crate::free_addr(), crate::free_addr());
        let (cert, key) = leaf.write(&dir, "etcd");
        let tls = MemberTls { ca: dir.write("ca.crt", &ca.ca_pem()), cert, key, metrics };
        let d = dir.0.join("m0");
        std::fs::create_dir_all(&d).expect("member dir");
        let mut child = spawn_member("m0", &d, client, peer, &format!("m0=http://{peer}"), None, Some(&tls));
        wait_healthy(&mut child, metrics, &d);
        Etcd { members: vec![(child, client)], _dir: dir }
    }

    /// The first member's client address, as halo takes it.
    pub fn endpoint(&self) -> String {
        self.members[0].1.to_string()
    }

    /// Every member's process id (to read its CPU time and memory).
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|(c, _)| c.id()).collect()
    }

    /// Every member's client address.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|(_, a)| a.to_string()).collect()
    }

    /// Turns on etcd's role-based authentication with one user, `root`
    /// (etcd's all-powerful role) and `password`: from then on a client
    /// without the user reads and writes nothing. Plain-text members only.
    pub async fn enable_auth(&self, password: &str) {
        let mut c = etcd_client::Client::connect([self.endpoint()], None).await.expect("connect to etcd");
        c.role_add("root").await.expect("add the root role");
        c.user_add("root", password, None).await.expect("add the root user");
        c.user_grant_role("root", "root").await.expect("grant root");
        c.auth_enable().await.expect("enable auth");
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        let _ = self.members[i].0.kill();
        let _ = self.members[i].0.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A member's client TLS: its certificate, the CA its clients' come
/// from, and a plain listener for `/health`.
pub(crate) struct MemberTls {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    metrics: SocketAddr,
}

/// Starts one etcd member. `netns`: run it inside that network namespace;
/// `tls`: clients over TLS with certificates only.
pub(crate) fn spawn_member(
    name: &str,
    dir: &Path,
    client: SocketAddr,
    peer: SocketAddr,
    initial_cluster: &str,
    netns: Option<&str>,
    tls: Option<&MemberTls>,
) -> Child {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log")).expect("open etcd.log");
    let bin = which_etcd();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, &bin]);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args([
        "--name",
        name,
        "--data-dir",
        &dir.join("data").to_string_lossy(),
        "--listen-client-urls",
        &format!("{scheme}://{client}"),
        "--advertise-client-urls",
        &format!("{scheme}://{client}"),
        "--listen-peer-urls",
        &format!("http://{peer}"),
        "--initial-advertise-peer-urls",
        &format!("http://{peer}"),
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        // The default from etcd 3.5 on (Debian has 3.4): a member that was
        // cut off does not depose the leader when it returns.
        "--pre-vote=true",
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ])
    .stdin(Stdio::null());
    if let Some(t) = tls {
        cmd.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
        cmd.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
        cmd.arg("--listen-metrics-urls").arg(format!("http://{}", t.metrics));
    }
    cmd.stdout(log.try_clone().expect("clone log")).stderr(log);
    cmd.spawn().unwrap_or_else(|e| panic!("cannot start etcd ({bin}): {e}; run scripts/install-test-deps.sh"))
}

fn which_etcd() -> String {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("etcd not found (Debian's etcd-server); run scripts/install-test-deps.sh")
}

/// Whether the member at `client` reports itself healthy (has a leader).
pub(crate) fn healthy(client: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&client, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

pub(crate) fn wait_healthy(child: &mut Child, client: SocketAddr, dir: &Path) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if healthy(client) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
            panic!("etcd exited ({status}) before becoming healthy:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
    panic!("etcd at {client} not healthy after 20s:\n{log}");
}
