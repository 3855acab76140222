//! Protocols beyond plain HTTP through the real binary: TCP (L4)
//! listeners and HTTP Upgrade tunnels (WebSocket).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use halo_testkit::{eventually, metric, Client, EchoServer, Halo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_halo");
const STEP: Duration = Duration::from_secs(5);

fn tcp_config(upstream: &str, echos: &[&EchoServer]) -> String {
    let eps: Vec<String> = echos.iter().map(|e| format!("\"{}\"", e.addr)).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"echo\"\nconnect_timeout = \"1s\"\n\
         [upstreams.echo]\nendpoints = [{}]\n{upstream}\n\
         [upstreams.echo.health]\ntype = \"tcp\"\ninterval = \"100ms\"\nfall = 2\njitter = \"0\"\n",
        eps.join(", ")
    )
}

/// Connects (from `source` when given), reads the echo server's greeting,
/// checks one echoed line; returns the greeting and the open connection.
async fn echo_once(to: SocketAddr, source: Option<&str>) -> Result<(String, BufReader<TcpStream>), String> {
    let s = match source {
        Some(ip) => {
            let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            sock.bind(format!("{ip}:0").parse().expect("source")).map_err(|e| format!("bind {ip}: {e}"))?;
            tokio::time::timeout(STEP, sock.connect(to)).await
        }
        None => tokio::time::timeout(STEP, TcpStream::connect(to)).await,
    };
    let s = s.map_err(|_| "connect timed out".to_string())?.map_err(|e| format!("connect: {e}"))?;
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    tokio::time::timeout(STEP, r.read_line(&mut greeting))
        .await
        .map_err(|_| "no greeting".to_string())?
        .map_err(|e| format!("greeting: {e}"))?;
    if greeting.is_empty() {
        return Err("closed before the greeting".into());
    }
    let name = greeting.trim().to_string();
    // A failure from here on is a connection the backend broke (it was
    // killed while serving it), named by the backend.
    let broken = |e: String| format!("broken by {name}: {e}");
    r.get_mut().write_all(b"ping 1\n").await.map_err(|e| broken(format!("write: {e}")))?;
    let mut echo = String::new();
    tokio::time::timeout(STEP, r.read_line(&mut echo))
        .await
        .map_err(|_| broken("no echo".into()))?
        .map_err(|e| broken(e.to_string()))?;
    if echo != "ping 1\n" {
        return Err(broken(format!("echo was {echo:?}")));
    }
    Ok((name, r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_balances_and_a_killed_backend_fails_no_connect() {
    let mut echos = [EchoServer::start("e0").await, EchoServer::start("e1").await, EchoServer::start("e2").await];
    let h = Halo::proxy(BIN, &tcp_config("", &echos.iter().collect::<Vec<_>>())).unwrap();
    let to = h.listeners["tcp"];
    // Round robin: thirty connections, ten each, and bytes come back whole.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..30 {
        let (name, _) = echo_once(to, None).await.unwrap();
        *seen.entry(name).or_default() += 1;
    }
    assert_eq!(seen.values().copied().collect::<Vec<_>>(), vec![10, 10, 10], "{seen:?}");
    // A larger transfer both ways, with a half-close passed on.
    let (_, mut r) = echo_once(to, None).await.unwrap();
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = r.get_mut().split();
    let send = async {
        wr.write_all(&blob).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut back));
    let (_, got) = tokio::join!(send, recv);
    got.expect("the echo ended after the half-close").unwrap();
    assert!(back == blob, "1 MB came back altered ({} bytes)", back.len());

    // Load: 8 clients opening connection after connection; one backend dies.
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (failures, done) = (failures.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..150 {
                match echo_once(to, None).await {
                    Ok(_) => {}
                    Err(e) => {
                        failures.fetch_add(1, SeqCst);
                        errors.push(e);
                    }
                }
                done.fetch_add(1, SeqCst);
            }
            errors
        }));
    }
    eventually(Duration::from_secs(30), "load under way", || async { done.load(SeqCst) >= 300 }).await;
    echos[1].kill();
    let killed_at = echos[1].connections();
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    // Connections the killed backend was serving break with it (at most
    // one per client); no connection made after may fail.
    let (cut, failed): (Vec<&String>, Vec<&String>) = errors.iter().partition(|e| e.starts_with("broken by e1:"));
    assert!(failed.is_empty(), "connections failed: {:?}", &failed[..failed.len().min(5)]);
    assert!(cut.len() <= 8, "{} connections cut", cut.len());
    assert_eq!(failures.load(SeqCst), cut.len() as u64);
    assert_eq!(echos[1].connections(), killed_at, "the killed backend accepted after its death");
    let c = Client::new();
    let label = format!("halo_endpoint_up{{upstream=\"echo\",endpoint=\"{}\"}}", echos[1].addr);
    eventually(Duration::from_secs(10), "the killed backend marked down", || async {
        metric(&c, &h, &label).await == 0.0
    })
    .await;
    assert!(metric(&c, &h, "halo_endpoint_tcp_connections_total").await >= 1231.0);
    assert_eq!(metric(&c, &h, "halo_listener_unserved_total").await, 0.0);
    assert!(metric(&c, &h, "halo_listener_tunnel_received_bytes_total").await >= 1_000_000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_policies_least_connections_and_source_ip_hash() {
    let echos = [EchoServer::start("e0").await, EchoServer::start("e1").await, EchoServer::start("e2").await];
    let all: Vec<&EchoServer> = echos.iter().collect();
    // Least connections: three held connections land on three backends.
    let h = Halo::proxy(BIN, &tcp_config("policy = \"least_request\"", &all)).unwrap();
    let mut held = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let (name, conn) = echo_once(h.listeners["tcp"], None).await.unwrap();
        names.insert(name);
        held.push(conn);
    }
    assert_eq!(names.len(), 3, "least connections spread held connections: {names:?}");
    let c = Client::new();
    assert_eq!(metric(&c, &h, "halo_listener_tunnels_active").await, 3.0);
    drop(held);
    eventually(Duration::from_secs(5), "tunnels closed", || async {
        metric(&c, &h, "halo_listener_tunnels_active").await == 0.0
    })
    .await;

    // Source-IP hashing: one source always lands on one backend; many
    // sources spread.
    let h = Halo::proxy(BIN, &tcp_config("policy = \"consistent_hash\"\nhash_key = \"source_ip\"", &all)).unwrap();
    let to = h.listeners["tcp"];
    let mut one = std::collections::BTreeSet::new();
    for _ in 0..10 {
        one.insert(echo_once(to, Some("127.0.0.1")).await.unwrap().0);
    }
    assert_eq!(one.len(), 1, "one source went to {one:?}");
    let mut many = std::collections::BTreeSet::new();
    for i in 2..40 {
        let ip = format!("127.0.0.{i}");
        let first = echo_once(to, Some(&ip)).await.unwrap().0;
        assert_eq!(echo_once(to, Some(&ip)).await.unwrap().0, first, "{ip} moved");
        many.insert(first);
    }
    assert!(many.len() >= 2, "38 sources all went to {many:?}");
}

#[test]
fn tcp_listener_mistakes_are_named() {
    let dir = halo_testkit::TempDir::new("tcp-check");
    let bad = dir.write(
        "bad.toml",
        "[[listeners]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         [[listeners]]\nname = \"u\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"web\"\nconnect_tries = 0\n\
         [[listeners]]\nname = \"h\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"5s\"\n\
         [[routes]]\nlisteners = [\"u\"]\nupstream = \"web\"\n\
         [upstreams.web]\nendpoints = [\"127.0.0.1:9\"]\nhash_key = \"header:x-user\"\npolicy = \"consistent_hash\"\n",
    );
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "listeners[0].upstream: a tcp listener needs upstream = \"NAME\"",
        "listeners[1].upstream: upstream 'web' hashes or pins by HTTP request fields",
        "listeners[1].connect_tries: accepted: 1 to 10",
        "listeners[2].idle_timeout: is for protocol = \"tcp\" listeners",
        "routes[0].listeners: no http listener named 'u'",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
