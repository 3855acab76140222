//! A multi-node cluster on one machine with real separation: each node in
//! its own Linux network namespace (a veth pair onto a bridge, its own
//! address), a real etcd member per node (a 3-member etcd cluster for 3
//! nodes), and the real `halo agent` in each namespace.
//!
//! The test process stays in the root namespace and reaches every node
//! over the bridge (it has the subnet's first address). Faults are real:
//! kill -9 of every process of a node, SIGSTOP/SIGCONT of them, the node's
//! link set down, one etcd member killed.
//!
//! Everything is removed on drop (processes, namespaces, the bridge); a
//! harness whose test process died before it could clean up is swept by
//! the next one to start (its owner pid is recorded beside it).
//! Needs root (CI and the sandbox are) and iproute2.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Halo, TempDir};

/// 64 random bits from the kernel.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("open /dev/urandom"), &mut b)
        .expect("read /dev/urandom");
    u64::from_le_bytes(b)
}

/// Runs a command, panicking with its stderr if it fails.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
}

fn quiet(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Pids of every process inside network namespace `ns`.
fn netns_pids(ns: &str) -> Vec<i32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn signal_all(pids: &[i32], sig: nix::sys::signal::Signal) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), sig);
    }
}

fn lock_file(k: u8) -> PathBuf {
    std::env::temp_dir().join(format!("halo-cluster-{k}.lock"))
}

/// Most nodes a harness has; teardown looks for all of them, so a harness
/// that failed half-way through its setup is removed as well.
const MAX_NODES: usize = 9;

/// Removes harness `k`: its processes, veth pairs, namespaces and bridge.
fn teardown(k: u8) {
    for i in 1..=MAX_NODES {
        let ns = format!("halo{k}n{i}");
        // Thawed too, so a frozen process can die.
        let pids = netns_pids(&ns);
        signal_all(&pids, nix::sys::signal::Signal::SIGKILL);
        signal_all(&pids, nix::sys::signal::Signal::SIGCONT);
        // Deleting our end removes the pair at once, even while the
        // namespace lingers until its last process is reaped.
        quiet("ip", &["link", "del", &format!("hv{k}n{i}")]);
        quiet("ip", &["netns", "del", &ns]);
    }
    let client = format!("halo{k}c");
    signal_all(&netns_pids(&client), nix::sys::signal::Signal::SIGKILL);
    quiet("ip", &["link", "del", &format!("hv{k}c")]);
    quiet("ip", &["netns", "del", &client]);
    quiet("ip", &["link", "del", &format!("hb{k}")]);
    for dir in ["-i", "-o"] {
        while quiet("iptables", &["-D", "FORWARD", dir, &format!("hb{k}"), "-j", "ACCEPT"]) {}
    }
}

/// Claims a free harness number: a lock on its lock file, held for the
/// harness's life (the kernel drops it when the owner dies, whatever way).
/// Whatever a dead owner of that number left (namespaces, links, rules) is
/// removed before the number is used: with the lock held, nothing else can
/// be using them.
fn claim() -> (u8, std::fs::File) {
    for k in 1..=250u8 {
        let Ok(f) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock_file(k)) else {
            continue;
        };
        if f.try_lock().is_err() {
            continue;
        }
        teardown(k);
        if quiet("ip", &["link", "add", &format!("hb{k}"), "type", "bridge"]) {
            return (k, f);
        }
    }
    panic!("no free harness number (locks halo-cluster-1..250 all held, or bridges hb1..hb250 not removable)");
}

/// One node of the harness.
pub struct ClusterNode {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The root-namespace end of its veth pair (down = cut off).
    veth: String,
    etcd: Option<Child>,
    pub agent: Option<Halo>,
    pub data_dir: PathBuf,
    pub zone: String,
    node_file: PathBuf,
    etcd_dir: PathBuf,
    /// The socket of the node's own Docker daemon, when the harness runs
    /// one per node ([`Cluster::start_docker`]).
    pub docker: Option<PathBuf>,
}

impl ClusterNode {
    /// The node's proxy.
    pub fn proxy(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 8080)
    }

    /// The node's API.
    pub fn api(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 7070)
    }

    pub fn etcd_client(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 2379)
    }

    /// Address `host` of the nodes' subnet (its /24), as for a floating IP.
    pub fn subnet(&self, host: u8) -> Ipv4Addr {
        let o = self.ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], host)
    }

    fn etcd_peer(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 2380)
    }
}

/// A cluster of `halo agent`s with a real etcd, in network namespaces.
pub struct Cluster {
    k: u8,
    /// Held while the harness lives: its number is ours.
    _claim: std::fs::File,
    pub nodes: Vec<ClusterNode>,
    bin: String,
    lease_ttl: String,
    /// The cluster's API token, given to every agent (`--token-file`).
    token_file: PathBuf,
    /// Whether the client namespace ([`Cluster::client_ns`]) exists.
    client: bool,
    _dir: TempDir,
}

impl Cluster {
    /// Starts `n` nodes (namespaces, etcd members, agents) and waits until
    /// every agent is ready. `bin` is the halo binary.
    pub fn start(bin: &str, n: usize) -> Cluster {
        Cluster::start_zoned(bin, &vec!["default"; n])
    }

    /// Starts one node per entry of `zones`, node `i` in zone `zones[i]`.
    pub fn start_zoned(bin: &str, zones: &[&str]) -> Cluster {
        Cluster::start_inner(bin, zones, None, &|_| String::new())
    }

    /// Starts `n` nodes, each node file ending with what `extra` returns
    /// for that node (`[[vip]]`, more listeners...).
    pub fn start_with(bin: &str, n: usize, extra: &dyn Fn(&ClusterNode) -> String) -> Cluster {
        Cluster::start_inner(bin, &vec!["default"; n], None, extra)
    }

    /// Starts `n` nodes, each with a Docker daemon of its own in its
    /// namespace (its containers publish on the node's address), `image`
    /// (a tag of the host daemon) loaded into each, and the agents pointed
    /// at their node's daemon (`DOCKER_HOST`).
    pub fn start_docker(bin: &str, n: usize, image: &str) -> Cluster {
        Cluster::start_inner(bin, &vec!["default"; n], Some(image), &|_| String::new())
    }

    fn start_inner(
        bin: &str,
        zones: &[&str],
        docker_image: Option<&str>,
        extra: &dyn Fn(&ClusterNode) -> String,
    ) -> Cluster {
        let n = zones.len();
        assert!(n <= MAX_NODES, "at most {MAX_NODES} nodes");
        assert!(nix::unistd::geteuid().is_root(), "the cluster harness needs root (network namespaces)");
        let (k, claim) = claim();
        let dir = TempDir::new("cluster");
        let token_file = dir.0.join("cluster-token");
        let token: String = (0..3).map(|_| format!("{:016x}", random_u64())).collect();
        std::fs::write(&token_file, token).expect("write the cluster token");
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("make the cluster token owner-only");
        let mut c = Cluster {
            token_file,
            k,
            _claim: claim,
            nodes: Vec::new(),
            bin: bin.to_string(),
            lease_ttl: "3s".into(),
            client: false,
            _dir: dir,
        };
        let bridge = format!("hb{k}");
        run("ip", &["addr", "add", &format!("10.213.{k}.1/24"), "dev", &bridge]);
        run("ip", &["link", "set", &bridge, "up"]);
        // Docker (and others) set the FORWARD policy to DROP, and with
        // br_netfilter loaded bridged packets pass through it: let ours by.
        for dir in ["-i", "-o"] {
            quiet("iptables", &["-I", "FORWARD", dir, &bridge, "-j", "ACCEPT"]);
        }
        for i in 1..=n {
            let ns = format!("halo{k}n{i}");
            let ip = Ipv4Addr::new(10, 213, k, 10 + i as u8);
            let (veth, peer) = (format!("hv{k}n{i}"), format!("hp{k}n{i}"));
            run("ip", &["netns", "add", &ns]);
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            run("ip", &["link", "set", &veth, "master", &bridge]);
            run("ip", &["link", "set", &veth, "up"]);
            run("ip", &["link", "set", &peer, "netns", &ns]);
            let inside = |args: &[&str]| {
                let mut a = vec!["netns", "exec", &ns, "ip"];
                a.extend_from_slice(args);
                run("ip", &a);
            };
            inside(&["link", "set", &peer, "name", "eth0"]);
            inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
            inside(&["link", "set", "lo", "up"]);
            inside(&["route", "add", "default", "via", &format!("10.213.{k}.1")]);
            let base = c._dir.0.join(format!("n{i}"));
            std::fs::create_dir_all(&base).expect("node dir");
            let node_file = base.join("node.toml");
            c.nodes.push(ClusterNode {
                name: format!("n{i}"),
                ns,
                ip,
                veth,
                etcd: None,
                agent: None,
                data_dir: base.join("data"),
                zone: zones[i - 1].to_string(),
                node_file,
                etcd_dir: base.join("etcd"),
                docker: None,
            });
            let nd = c.nodes.last().expect("just pushed");
            std::fs::write(
                &nd.node_file,
                format!(
                    "[node]\napi = \"{ip}:7070\"\n\n[[listeners]]\nname = \"http\"\nlisten = \"{ip}:8080\"\n\n{}",
                    extra(nd)
                ),
            )
            .expect("write node file");
        }
        let initial: Vec<String> = c.nodes.iter().map(|nd| format!("{}=http://{}", nd.name, nd.etcd_peer())).collect();
        let initial = initial.join(",");
        for nd in &mut c.nodes {
            std::fs::create_dir_all(&nd.etcd_dir).expect("etcd dir");
            nd.etcd = Some(crate::etcd::spawn_member(
                &nd.name,
                &nd.etcd_dir,
                nd.etcd_client(),
                nd.etcd_peer(),
                &initial,
                Some(&nd.ns),
                None,
            ));
        }
        for i in 0..n {
            c.wait_etcd(i);
        }
        if let Some(image) = docker_image {
            let tar = c._dir.0.join("image.tar");
            let (code, _, err) = crate::docker(&["save", "-o", &tar.to_string_lossy(), image]);
            assert_eq!(code, 0, "docker save {image}: {err}");
            for nd in &mut c.nodes {
                let base = nd.node_file.parent().expect("node dir").to_path_buf();
                let socket = crate::docker::start_daemon(&nd.ns, &base.join("docker"));
                let (code, _, err) = crate::docker::docker_at(Some(&socket), &["load", "-i", &tar.to_string_lossy()]);
                assert_eq!(code, 0, "loading {image} into {}'s daemon: {err}", nd.name);
                nd.docker = Some(socket);
            }
        }
        for i in 0..n {
            c.start_agent(i);
        }
        c
    }

    /// `etcd://IP:2379,...` of every member.
    pub fn store_url(&self) -> String {
        let eps: Vec<String> = self.nodes.iter().map(|n| n.etcd_client().to_string()).collect();
        format!("etcd://{}", eps.join(","))
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.etcd_client().to_string()).collect()
    }

    /// Starts (or restarts) node `i`'s agent and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) {
        let store = self.store_url();
        let nd = &mut self.nodes[i];
        nd.agent = None;
        let ip = nd.ip.to_string();
        let docker_host =
            format!("DOCKER_HOST=unix://{}", nd.docker.as_ref().map_or(String::new(), |s| s.display().to_string()));
        // Each node its own temporary and runtime directories, as separate
        // hosts have: the address claims of listeners live in the runtime
        // one, and nodes may listen on the same floating address.
        let tmp = nd.node_file.parent().expect("node dir").join("tmp");
        std::fs::create_dir_all(&tmp).expect("node tmp dir");
        let tmpdir = format!("TMPDIR={}", tmp.display());
        let run_dir = format!("HALO_RUN_DIR={}", nd.node_file.parent().expect("node dir").join("run").display());
        let mut args = vec!["netns", "exec", &nd.ns, "env", &tmpdir, &run_dir];
        if nd.docker.is_some() {
            args.push(&docker_host);
        }
        let rest = [
            &self.bin,
            "agent",
            "--store",
            &store,
            "--node",
            &nd.name,
            "--advertise",
            &ip,
            "--lease-ttl",
            &self.lease_ttl,
            "--zone",
            &nd.zone,
            "-c",
            &nd.node_file.to_string_lossy(),
            "--data-dir",
            &nd.data_dir.to_string_lossy(),
            "--token-file",
            &self.token_file.to_string_lossy(),
        ]
        .map(str::to_string);
        args.extend(rest.iter().map(String::as_str));
        let dir = nd.node_file.parent().expect("node dir").to_path_buf();
        let h = Halo::start("ip", &args, &dir).unwrap_or_else(|e| panic!("agent {} did not start: {e}", nd.name));
        nd.agent = Some(h);
    }

    /// Runs the halo CLI against node `i`'s API; returns (exit code, stdout, stderr).
    pub fn cli(&self, i: usize, args: &[&str]) -> (i32, String, String) {
        let nd = &self.nodes[i];
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--data-dir")
            .arg(&nd.data_dir)
            .env("HALO_API", nd.api().to_string())
            .output()
            .expect("run the halo CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `halo status --json` from node `i`.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let (code, out, _) = self.cli(i, &["status", "--json"]);
        if code != 0 {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// kill -9 of every process of node `i`: etcd member, agent, instances
    /// (and its containers and Docker daemon, when it has one).
    pub fn kill_node(&mut self, i: usize) {
        let nd = &mut self.nodes[i];
        let mut pids = nd.docker.as_deref().map(crate::docker::container_pids).unwrap_or_default();
        pids.extend(netns_pids(&nd.ns));
        signal_all(&pids, nix::sys::signal::Signal::SIGKILL);
        if let Some(mut e) = nd.etcd.take() {
            let _ = e.wait();
        }
        if let Some(mut a) = nd.agent.take() {
            a.wait(Duration::from_secs(5));
        }
    }

    /// kill -9 of node `i`'s agent and its instances; its etcd member lives on.
    pub fn kill_agent(&mut self, i: usize) {
        let nd = &mut self.nodes[i];
        if let Some(a) = &nd.agent {
            a.signal("KILL");
        }
        for p in crate::processes_of(&nd.data_dir) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(mut a) = nd.agent.take() {
            a.wait(Duration::from_secs(5));
        }
    }

    /// kill -9 of node `i`'s etcd member only.
    pub fn kill_etcd(&mut self, i: usize) {
        if let Some(mut e) = self.nodes[i].etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }

    /// Starts node `i`'s etcd member again on its data (it rejoins).
    pub fn restart_etcd(&mut self, i: usize) {
        self.kill_etcd(i);
        let initial: Vec<String> =
            self.nodes.iter().map(|nd| format!("{}=http://{}", nd.name, nd.etcd_peer())).collect();
        let nd = &mut self.nodes[i];
        nd.etcd = Some(crate::etcd::spawn_member(
            &nd.name,
            &nd.etcd_dir,
            nd.etcd_client(),
            nd.etcd_peer(),
            &initial.join(","),
            Some(&nd.ns),
            None,
        ));
    }

    /// Waits until node `i`'s etcd member answers healthy (it has rejoined
    /// and the cluster has quorum); panics with its log after 20 s.
    pub fn wait_etcd(&mut self, i: usize) {
        let nd = &mut self.nodes[i];
        let client = nd.etcd_client();
        crate::etcd::wait_healthy(nd.etcd.as_mut().expect("node's etcd member runs"), client, &nd.etcd_dir);
    }

    /// Every agent killed (with its instances) and every etcd member's data
    /// destroyed, then a fresh etcd cluster started on the same addresses
    /// (agents are not started again).
    pub fn fresh_etcd(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
            self.kill_etcd(i);
        }
        for nd in &self.nodes {
            let _ = std::fs::remove_dir_all(&nd.etcd_dir);
            std::fs::create_dir_all(&nd.etcd_dir).expect("etcd dir");
        }
        for i in 0..self.nodes.len() {
            self.restart_etcd(i);
        }
        for i in 0..self.nodes.len() {
            self.wait_etcd(i);
        }
    }

    /// The node whose etcd member leads etcd's raft now, as the members
    /// that answer say.
    pub async fn etcd_leader(&self) -> Option<usize> {
        for (i, nd) in self.nodes.iter().enumerate() {
            let Ok(mut c) = etcd_client::Client::connect([nd.etcd_client().to_string()], None).await else { continue };
            let Ok(st) = c.status().await else { continue };
            if st.header().is_some_and(|h| h.member_id() == st.leader()) {
                return Some(i);
            }
        }
        None
    }

    /// Hands etcd's raft leadership from node `from`'s member (the leader)
    /// to node `to`'s.
    pub async fn move_etcd_leader(&self, from: usize, to: usize) {
        let connect = |i: usize| etcd_client::Client::connect([self.nodes[i].etcd_client().to_string()], None);
        let mut target = connect(to).await.expect("connect to the target member");
        let st = target.status().await.expect("the target member's status");
        let id = st.header().expect("a response header").member_id();
        let mut leader = connect(from).await.expect("connect to the leading member");
        leader.move_leader(id).await.expect("move etcd's leadership");
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of every process of node `i`.
    pub fn freeze(&self, i: usize, frozen: bool) {
        let sig = if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        signal_all(&netns_pids(&self.nodes[i].ns), sig);
    }

    /// Cuts node `i` off the network (`true`) or reconnects it.
    pub fn cut(&self, i: usize, cut: bool) {
        run("ip", &["link", "set", &self.nodes[i].veth, if cut { "down" } else { "up" }]);
    }

    /// A client host on the nodes' bridge (its own namespace, address .250),
    /// made on first use; its namespace's name.
    pub fn client_ns(&mut self) -> String {
        let ns = format!("halo{}c", self.k);
        if !self.client {
            let (veth, peer) = (format!("hv{}c", self.k), format!("hp{}c", self.k));
            run("ip", &["netns", "add", &ns]);
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            run("ip", &["link", "set", &veth, "master", &format!("hb{}", self.k)]);
            run("ip", &["link", "set", &veth, "up"]);
            run("ip", &["link", "set", &peer, "netns", &ns]);
            let ip = format!("10.213.{}.250/24", self.k);
            for args in [
                vec!["link", "set", peer.as_str(), "name", "eth0"],
                vec!["addr", "add", ip.as_str(), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["link", "set", "lo", "up"],
            ] {
                let mut a = vec!["-n", ns.as_str()];
                a.extend(args);
                run("ip", &a);
            }
            self.client = true;
        }
        ns
    }

    /// Indexes of the nodes that have `ip` on their interface now (`ip addr`
    /// in each node's namespace).
    pub fn nodes_with_address(&self, ip: impl Into<IpAddr>) -> Vec<usize> {
        let ip = ip.into();
        let ns: Vec<String> = self.nodes.iter().map(|n| n.ns.clone()).collect();
        holding(&ns, ip)
    }

    /// Samples which nodes have each of `ips` every `every` (the addresses
    /// `ip addr` lists in every node's namespace) until [`Sampler::stop`].
    pub fn sample_addresses(&self, ips: &[IpAddr], every: Duration) -> Sampler {
        let ns: Vec<String> = self.nodes.iter().map(|n| n.ns.clone()).collect();
        let ips = ips.to_vec();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let files: Vec<std::fs::File> = ns.iter().map(|n| netns_file(n)).collect();
        // One thread that enters each node's namespace in turn: a sample
        // of three nodes takes microseconds, and starts no process.
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            // Bounded: at most ten minutes of samples.
            let start = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < Duration::from_secs(600) {
                let at = std::time::Instant::now();
                let holders =
                    ips.iter().map(|ip| (0..files.len()).filter(|&i| has_address(&files[i], *ip)).collect()).collect();
                samples.push(Sample { at, holders });
                std::thread::sleep(every.saturating_sub(at.elapsed()));
            }
            samples
        });
        Sampler { stop, thread: Some(thread) }
    }

    /// Blocks (`true`) or lets through TCP to `port` inside node `i` (an
    /// iptables rule in its namespace: connections are refused).
    pub fn refuse_port(&self, i: usize, port: u16, refuse: bool) {
        let p = port.to_string();
        let rule = ["-p", "tcp", "--dport", p.as_str(), "-j", "REJECT", "--reject-with", "tcp-reset"];
        let mut args =
            vec!["netns", "exec", self.nodes[i].ns.as_str(), "iptables", if refuse { "-I" } else { "-D" }, "INPUT"];
        args.extend(rule);
        run("ip", &args);
    }

    /// Processes of every node carrying `HALO_INSTANCE`, as (instance, pid).
    pub fn instance_processes(&self) -> Vec<(String, i32)> {
        let mut out = Vec::new();
        for nd in &self.nodes {
            for pid in netns_pids(&nd.ns) {
                let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
                // Only process group leaders: an instance's children share it.
                let leader = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s[s.rfind(')')? + 2..].split(' ').nth(2)?.parse::<i32>().ok())
                    == Some(pid);
                if !leader {
                    continue;
                }
                for v in env.split(|b| *b == 0) {
                    if let Some(id) = v.strip_prefix(b"HALO_INSTANCE=") {
                        out.push((String::from_utf8_lossy(id).into_owned(), pid));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for nd in &mut self.nodes {
            nd.agent = None;
        }
        for socket in self.nodes.iter().filter_map(|nd| nd.docker.as_deref()) {
            signal_all(&crate::docker::container_pids(socket), nix::sys::signal::Signal::SIGKILL);
        }
        teardown(self.k);
        // What the nodes' daemons mounted (image layers) goes before the
        // scratch directory does.
        crate::docker::unmount_under(&self._dir.0);
        for nd in &mut self.nodes {
            if let Some(mut e) = nd.etcd.take() {
                let _ = e.kill();
                let _ = e.wait();
            }
        }
    }
}

/// Which of the namespaces `ns` have `ip` on an interface (what `ip addr`
/// lists there), asked from a short-lived thread that enters each one.
fn holding(ns: &[String], ip: IpAddr) -> Vec<usize> {
    let ns = ns.to_vec();
    let files = ns.iter().map(|n| netns_file(n)).collect::<Vec<_>>();
    std::thread::spawn(move || (0..files.len()).filter(|&i| has_address(&files[i], ip)).collect())
        .join()
        .expect("address lookup thread")
}

fn netns_file(ns: &str) -> std::fs::File {
    let path = format!("/run/netns/{ns}");
    std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"))
}

/// Moves this thread into the namespace `ns` and says whether `ip` is on
/// one of its interfaces. Only for threads of their own.
fn has_address(ns: &std::fs::File, ip: IpAddr) -> bool {
    if nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
        return false;
    }
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            let Some(s) = a.address.as_ref() else { return false };
            s.as_sockaddr_in().map(|v| IpAddr::V4(v.ip())).or_else(|| s.as_sockaddr_in6().map(|v| IpAddr::V6(v.ip())))
                == Some(ip)
        })
    })
}

/// One look at every node: for each address sampled, the nodes that had it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: std::time::Instant,
    pub holders: Vec<Vec<usize>>,
}

/// A running [`Cluster::sample_addresses`].
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    /// Every sample taken so far, in order; the sampling stops.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("sampler thread")).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A service file for the harness: `web`, `replicas` instances of the demo
/// app (`halo demo-app`), ready on `/healthz`, routed at `/`.
pub fn web_service(replicas: u32) -> String {
    format!(
        r#"name = "web"
replicas = {replicas}

[run]
command = "halo"
args = ["demo-app"]

[readiness]
http = "/healthz"
interval = "200ms"

[[routes]]
path = "/"
"#
    )
}

/// Runs `f` on a thread of its own inside network namespace `ns`: every
/// socket it makes is that namespace's (a client on the nodes' bridge).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
}
