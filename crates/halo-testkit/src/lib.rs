//! Test harness for halo: demo backends on real sockets, the real `halo`
//! binary as a child process, an HTTP client and polling helpers.
//!
//! Everything cleans up after itself on drop: backends stop their tasks,
//! child processes are killed and reaped.

mod backend;
mod browser;
mod client;
mod cluster;
mod docker;
mod echo;
mod etcd;
mod grpc;
mod load;
mod process;
mod rng;
mod tls;
mod ws;

use std::future::Future;
use std::time::Duration;

pub use backend::{canned_upstream, Backend, BackendStats};
pub use browser::{chromium, Browser, Page};
pub use client::{Client, Reply};
pub use cluster::{in_netns, web_service, Cluster, ClusterNode, Sample, Sampler};
pub use docker::{containers_labelled, docker, docker_at, docker_available, remove_containers_of, DemoImage, Volume};
pub use echo::EchoServer;
pub use etcd::Etcd;
pub use grpc::{grpc_call, ChanBody, GrpcReply, GrpcServer};
pub use load::{Load, Report, RetryLoad, RetryReport};
pub use process::{alive, processes_of, upgrade, Halo, Reaper};
pub use rng::Rng;
pub use tls::{https_get, https_h2_get, node_tls, HttpsReply, HttpsServer, Leaf, TestCa};
pub use ws::{WsClient, WsEcho};

/// The quickstart's node file (`examples/quickstart.toml`) on free ports,
/// with `replicas` instances of demo and quick readiness probes.
pub fn quickstart(replicas: u32) -> String {
    let q = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/quickstart.toml"))
        .expect("examples/quickstart.toml");
    q.replace("127.0.0.1:7070", "127.0.0.1:0")
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("replicas = 3", &format!("replicas = {replicas}"))
        .replace("interval = \"500ms\"", "interval = \"200ms\"")
}

/// The sum of the samples on `h`'s `/metrics` whose line starts with
/// `prefix` (a family name, or a name with labels).
pub async fn metric(c: &Client, h: &Halo, prefix: &str) -> f64 {
    let m = c.get(&h.admin_url("/metrics")).await.expect("metrics").body;
    m.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// Polls `check` until it returns true or `within` passes; panics with `what`
/// on timeout. Use instead of sleeping for a condition.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "halo-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// Writes `name` in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
