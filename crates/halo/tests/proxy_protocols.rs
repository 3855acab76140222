//! Protocols beyond plain HTTP through the real binary: TLS termination
//! (SNI, ALPN, certificate reloads), TCP (L4) listeners, HTTP Upgrade
//! tunnels (WebSocket), gRPC (trailers, status metrics, health checks),
//! the PROXY protocol in and out. Certificates are
//! made by the test (rcgen).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halo_testkit::{
    eventually, grpc_call, https_get, https_h2_get, metric, Backend, Client, EchoServer, GrpcServer, Halo, HttpsServer,
    TempDir, TestCa, WsClient, WsEcho,
};
use http::Request;
use http_body_util::Full;
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
    // Exact unless an endpoint was out for a moment (a health check or a
    // connect that failed on a starved machine): then the proxy says so.
    if seen.values().copied().collect::<Vec<_>>() != vec![10, 10, 10] {
        let text = Client::new().get(&h.admin_url("/metrics")).await.expect("metrics").body;
        let outages: f64 = text
            .lines()
            .filter(|l| {
                ["halo_endpoint_health_check_failures_total{", "halo_endpoint_connect_failures_total{"]
                    .iter()
                    .any(|f| l.starts_with(f))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(outages > 0.0 && seen.len() == 3, "round robin uneven with every endpoint up: {seen:?}");
        println!("round robin {seen:?} around {outages} failed checks or connects");
    }
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
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            // Each failure with when its connection started.
            let mut errors = Vec::new();
            for _ in 0..150 {
                let started = std::time::Instant::now();
                if let Err(e) = echo_once(to, None).await {
                    errors.push((started, e));
                }
                done.fetch_add(1, SeqCst);
            }
            errors
        }));
    }
    eventually(Duration::from_secs(30), "load under way", || async { done.load(SeqCst) >= 300 }).await;
    echos[1].kill();
    let killed = std::time::Instant::now();
    let killed_at = echos[1].connections();
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    // Connections open when the backend died may die with it (the kernel
    // resets them, and a reset drops bytes not yet read); none started
    // after the kill may fail, and there are at most a few per client.
    let after: Vec<&String> = errors.iter().filter(|(t, _)| *t > killed).map(|(_, e)| e).collect();
    assert!(after.is_empty(), "connections made after the kill failed: {:?}", &after[..after.len().min(5)]);
    assert!(errors.len() <= 16, "{} connections cut: {errors:?}", errors.len());
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
         [upstreams.web]\nendpoints = [\"127.0.0.1:9\"]\nhash_key = \"header:x-user\"\npolicy = \"consistent_hash\"\n\
         [[routes]]\nupstream = \"pp\"\n[upstreams.pp]\nendpoints = [\"127.0.0.1:9\"]\nsend_proxy_protocol = \"v3\"\n\
         [[listeners]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\nproxy_protocol_from = [\"10.0.0.0/33\"]\n",
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
        "upstreams.pp.send_proxy_protocol: 'v3' is not accepted; accepted: v1 (text), v2 (binary)",
        "listeners[3].proxy_protocol_from: '10.0.0.0/33' is not accepted",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

fn ws_config(endpoints: &[SocketAddr], weight: u32) -> String {
    let mut eps: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    eps[0] = format!("{{ addr = \"{}\", weight = {weight} }}", endpoints[0]);
    format!(
        "[proxy]\ngrace_period = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"quiet\"\nhost = \"quiet.test\"\nupstream = \"ws\"\n[routes.timeouts]\ntunnel = \"300ms\"\n\
         [[routes]]\nname = \"ws\"\nupstream = \"ws\"\n\
         [upstreams.ws]\nendpoints = [{}]\n",
        eps.join(", ")
    )
}

async fn reload(c: &Client, h: &Halo) {
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::<Bytes>::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_survive_a_hundred_reloads_and_close_only_with_their_endpoint() {
    let (a, b) = (WsEcho::start("a").await, WsEcho::start("b").await);
    let h = Halo::proxy(BIN, &ws_config(&[a.addr, b.addr], 1)).unwrap();
    let to = h.listeners["main"];
    let c = Client::new();
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(WsClient::connect(to, "app.test", "/chat").await.unwrap());
    }
    assert_eq!(a.upgraded.load(SeqCst) + b.upgraded.load(SeqCst), 200);
    // The proxy counts a tunnel once its side of the upgrade is done, which
    // may be just after the client read the 101.
    let mut active = 0.0;
    for _ in 0..50 {
        active = metric(&c, &h, "halo_listener_tunnels_active").await;
        if active == 200.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active, 200.0);
    // Every socket talks (in order) while the config is reloaded 100 times.
    let reloading = Arc::new(AtomicU64::new(1));
    let mut talkers = Vec::new();
    for (id, mut ws) in clients.into_iter().enumerate() {
        let reloading = reloading.clone();
        talkers.push(tokio::spawn(async move {
            let mut k = 0u32;
            while reloading.load(SeqCst) == 1 || k < 20 {
                let msg = format!("{id}-{k}");
                ws.send_text(&msg).await.map_err(|e| format!("{id}: send {k}: {e}"))?;
                match tokio::time::timeout(STEP, ws.recv()).await {
                    Ok(Ok(Some(got))) if got == msg => {}
                    other => return Err(format!("{id}: message {k}: {other:?}")),
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>((ws, k))
        }));
    }
    for i in 0..100u32 {
        h.write_config(&ws_config(&[a.addr, b.addr], 1 + i % 3));
        reload(&c, &h).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reloading.store(0, SeqCst);
    let mut clients = Vec::new();
    let mut messages = 0;
    for t in talkers {
        let (ws, k) = t.await.unwrap().expect("a WebSocket was dropped or reordered across reloads");
        messages += k;
        clients.push(ws);
    }
    println!("200 WebSockets, 100 reloads, {messages} messages echoed in order");
    assert_eq!(metric(&c, &h, "halo_listener_tunnels_active").await, 200.0);

    // A reload that removes b: b's sockets close after the grace period
    // (1s), a's stay open.
    h.write_config(&ws_config(&[a.addr], 1));
    reload(&c, &h).await;
    let removed_at = std::time::Instant::now();
    let (mut on_a, mut on_b) = (0, 0);
    let mut waits = Vec::new();
    for mut ws in clients {
        let on = if ws.response_head.contains("x-backend: b") { "b" } else { "a" };
        waits.push(tokio::spawn(async move {
            let closed = tokio::time::timeout(Duration::from_secs(3), ws.recv()).await;
            (on, closed.is_ok(), ws)
        }));
    }
    let mut survivors = Vec::new();
    for w in waits {
        let (on, closed, ws) = w.await.unwrap();
        match on {
            "b" => {
                assert!(closed, "a tunnel to the removed endpoint stayed open");
                on_b += 1;
            }
            _ => {
                assert!(!closed, "a tunnel to a kept endpoint was closed");
                on_a += 1;
                survivors.push(ws);
            }
        }
    }
    assert!(removed_at.elapsed() >= Duration::from_millis(900), "closed before the grace period");
    assert!(on_a > 0 && on_b > 0, "a {on_a}, b {on_b}");
    let mut ws = survivors.pop().unwrap();
    ws.send_text("still here").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().as_deref(), Some("still here"));
    ws.close().await.unwrap();

    // A route's tunnel idle timeout closes a quiet socket.
    let mut quiet = WsClient::connect(to, "quiet.test", "/").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), quiet.recv()).await;
    assert!(matches!(closed, Ok(Ok(None)) | Ok(Err(_))), "quiet tunnel not closed: {closed:?}");
}

/// A browser's WebSocket through the proxy: Chromium checks the 101 as
/// RFC 6455 4.1 says (Upgrade, Connection, the accept key) and refuses a
/// handshake that lacks any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_websocket_opens_through_the_proxy_and_echoes() {
    let Some(program) = halo_testkit::chromium("the browser WebSocket test") else { return };
    let echo = WsEcho::start("a").await;
    let h = Halo::proxy(BIN, &ws_config(&[echo.addr], 1)).unwrap();
    let to = h.listeners["main"];
    let browser = halo_testkit::Browser::start(&program, 800, 600).unwrap();
    let mut page = browser.open("about:blank").await.unwrap();
    let js = format!(
        "new Promise(resolve => {{
            const ws = new WebSocket('ws://{to}/chat');
            ws.onopen = () => ws.send('hello from a browser');
            ws.onmessage = e => {{ resolve('echo: ' + e.data); ws.close(); }};
            ws.onclose = e => resolve('closed before a message, code ' + e.code);
            setTimeout(() => resolve('no answer within 20s'), 20000);
        }})"
    );
    let got = page.eval(&js).await.unwrap();
    assert_eq!(got.as_str(), Some("echo: hello from a browser"), "{got}");
    assert_eq!(echo.upgraded.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_refuses_is_an_ordinary_response() {
    // A plain HTTP backend answers the upgrade request normally; the
    // connection stays HTTP and serves the next request.
    let web = Backend::start("web").await;
    let cfg = format!(
        "[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"web\"\n\
         [upstreams.web]\nendpoints = [\"{}\"]\n",
        web.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let mut s = TcpStream::connect(h.listeners["main"]).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < 2 {
        let n = tokio::time::timeout(STEP, s.read(&mut buf)).await.expect("two answers").unwrap();
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // What the backend saw: no Upgrade header leaked into a non-101 answer.
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(!text.contains("upgrade"), "{text}");
}

/// An https listener over `web` with the given certificate entries
/// (`{ cert = ..., key = ... }`, paths relative to the config file).
fn https_config(web: &Backend, certificates: &[String]) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [listeners.tls]\ncertificates = [{}]\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\n",
        certificates.join(", "),
        web.addr
    )
}

fn cert_entry(stem: &str) -> String {
    format!("{{ cert = \"{stem}.crt\", key = \"{stem}.key\" }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_picks_the_certificate_by_sni_speaks_h2_by_alpn_and_refuses_a_bad_reload() {
    let ca = TestCa::new();
    let web = Backend::start("web").await;
    let (a, b, c, old) = (
        ca.issue(&["a.test", "127.0.0.1"]),
        ca.issue(&["*.b.test"]),
        ca.issue(&["c.test", "www.c.test"]),
        ca.issue_expired(&["old.test"]),
    );
    // The certificates live beside the config.
    let dir = TempDir::new("tls-sni");
    for (leaf, stem) in [(&a, "a"), (&b, "b"), (&c, "c"), (&old, "old")] {
        leaf.write(&dir, stem);
    }
    let entries: Vec<String> = ["a", "b", "c", "old"].iter().map(|s| cert_entry(s)).collect();
    let cfg_path = dir.write("proxy.toml", &https_config(&web, &entries));
    let mut h = Halo::start(BIN, &["proxy", "-c", &cfg_path.to_string_lossy()], &dir.0).unwrap();
    let to = h.listeners["tls"];
    let client = ca.client(&[b"http/1.1"]);
    for (sni, want, name) in [
        ("a.test", &a, "a"),
        ("x.b.test", &b, "b (wildcard)"),
        ("www.c.test", &c, "c"),
        ("c.test", &c, "c"),
        // An IP address sends no SNI: the first certificate is the default.
        ("127.0.0.1", &a, "a (the default)"),
    ] {
        let r = https_get(to, sni, "/", &client).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(r.status, 200, "{sni}: {r:?}");
        assert!(r.peer == want.der, "{sni} was not served {name}");
        assert!(r.body.contains("backend=web"), "{r:?}");
        assert_eq!(r.alpn.as_deref(), Some(&b"http/1.1"[..]));
    }
    // The client's scheme reaches the backend.
    let seen = web.last_headers().unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert!(seen["forwarded"].to_str().unwrap().contains("proto=https"));
    // h2 by ALPN.
    let (status, body) = https_h2_get(to, "a.test", "/", &ca.client(&[b"h2", b"http/1.1"])).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "backend=web"));
    // Days left per certificate: the expired one is negative.
    let c2 = Client::new();
    let days = |cert: &str| {
        format!("halo_tls_certificate_expiry_days{{listener=\"tls\",certificate=\"{}\"}}", dir.0.join(cert).display())
    };
    assert!(metric(&c2, &h, &days("a.crt")).await > 300.0);
    assert!(metric(&c2, &h, &days("old.crt")).await < 0.0);
    assert_eq!(metric(&c2, &h, "halo_tls_handshakes_total").await, 6.0);

    // A reload whose certificate has the wrong key is refused; the old
    // certificates keep serving.
    let wrong = ca.issue(&["*.b.test"]);
    dir.write("b2.crt", &wrong.cert_pem);
    dir.write("b2.key", &a.key_pem);
    let mut bad = entries.clone();
    bad[1] = cert_entry("b2");
    std::fs::write(&cfg_path, https_config(&web, &bad)).unwrap();
    let r = c2.send(Request::post(h.admin_url("/reload")).body(Full::<Bytes>::default()).unwrap()).await.unwrap();
    assert_ne!(r.status, 200);
    assert!(r.body.contains("does not match the certificate in") && r.body.contains("b2.crt"), "{}", r.body);
    let r = https_get(to, "y.b.test", "/", &client).await.unwrap();
    assert!(r.peer == b.der, "the refused reload changed the served certificate");
    // A missing file is named too, by `halo check` as by a reload.
    bad[1] = cert_entry("missing");
    std::fs::write(&cfg_path, https_config(&web, &bad)).unwrap();
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&cfg_path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("listeners[0].tls.certificates[1]: cannot read certificate file"),
        "{err}"
    );
    assert!(h.wait(Duration::from_millis(10)).is_none(), "the proxy died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_handshake() {
    let ca = TestCa::new();
    let web = Backend::start("web").await;
    let dir = TempDir::new("tls-rotate");
    let first = ca.issue(&["a.test"]);
    first.write(&dir, "a");
    let cfg_path = dir.write("proxy.toml", &https_config(&web, &[cert_entry("a")]));
    let h = Halo::start(BIN, &["proxy", "-c", &cfg_path.to_string_lossy()], &dir.0).unwrap();
    let to = h.listeners["tls"];
    let client = ca.client(&[b"http/1.1"]);
    let stop = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (client.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut peers) = (0u32, Vec::new(), std::collections::BTreeSet::new());
            // Bounded: at most 4000 handshakes per worker.
            for _ in 0..4000 {
                if stop.load(SeqCst) == 1 {
                    break;
                }
                match https_get(to, "a.test", "/", &client).await {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        peers.insert(r.peer);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed, peers)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Three rotations: new files written in place (the certificate, then
    // the key: a watcher may see a mismatched pair in between and must
    // keep serving the old one), and a config reload in between.
    let c = Client::new();
    let mut leaves = vec![first];
    for i in 0..3 {
        let next = ca.issue(&["a.test"]);
        next.write(&dir, "a");
        leaves.push(next);
        let served = leaves.last().unwrap().der.clone();
        eventually(Duration::from_secs(10), "the new certificate is served", || {
            let (client, served) = (client.clone(), served.clone());
            async move { https_get(to, "a.test", "/", &client).await.is_ok_and(|r| r.peer == served) }
        })
        .await;
        if i == 1 {
            let r =
                c.send(Request::post(h.admin_url("/reload")).body(Full::<Bytes>::default()).unwrap()).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(1, SeqCst);
    let (mut ok, mut failed, mut peers) = (0, Vec::new(), std::collections::BTreeSet::new());
    for w in workers {
        let (o, f, p) = w.await.unwrap();
        ok += o;
        failed.extend(f);
        peers.extend(p);
    }
    println!("{ok} HTTPS requests (a handshake each) across 3 rotations, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    assert!(ok >= 100, "load too light: {ok}");
    assert!(peers.len() >= 3, "the load saw {} certificates", peers.len());
    assert!(metric(&c, &h, "halo_tls_certificate_reloads_total").await >= 2.0);
    assert_eq!(metric(&c, &h, "halo_tls_handshake_failures_total").await, 0.0);
}

/// A server behind a `send_proxy_protocol` upstream: reads the PROXY
/// header (v1 or v2, parsed here independently of halo) and answers
/// with the source it names, then closes.
async fn proxy_header_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head[..6]).await.is_err() {
                    return; // a TCP health check
                }
                let answer = if &head[..6] == b"PROXY " {
                    let mut line = b"PROXY ".to_vec();
                    while !line.ends_with(b"\r\n") {
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        line.push(b[0]);
                    }
                    let line = String::from_utf8_lossy(&line).trim().to_string();
                    let f: Vec<&str> = line.split(' ').collect();
                    if f[1] == "UNKNOWN" {
                        "v1 local".to_string()
                    } else {
                        format!("v1 {}:{}", f[2], f[4])
                    }
                } else {
                    s.read_exact(&mut head[6..]).await.unwrap();
                    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
                    let mut body = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
                    s.read_exact(&mut body).await.unwrap();
                    match (head[12], head[13]) {
                        (0x21, 0x11) => format!(
                            "v2 {}.{}.{}.{}:{}",
                            body[0],
                            body[1],
                            body[2],
                            body[3],
                            u16::from_be_bytes([body[8], body[9]])
                        ),
                        (0x20, _) => "v2 local".to_string(),
                        other => format!("v2 unexpected {other:?}"),
                    }
                };
                let _ = s.write_all(format!("{answer}\n").as_bytes()).await;
            });
        }
    });
    addr
}

/// Connects from `source`, sends `first`, reads until the peer closes.
async fn exchange(to: SocketAddr, source: &str, first: &[u8]) -> String {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = tokio::time::timeout(STEP, sock.connect(to)).await.unwrap().unwrap();
    s.write_all(first).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await.expect("the connection ended");
    String::from_utf8_lossy(&out).into_owned()
}

fn v2_header(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_in_from_trusted_sources_and_out_to_upstreams() {
    let web = Backend::start("web").await;
    let behind = proxy_header_server().await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n\
         [[listeners]]\nname = \"tcp1\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"pp1\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\
         [[listeners]]\nname = \"tcp2\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"pp2\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\n\
         [upstreams.pp1]\nendpoints = [\"{behind}\"]\nsend_proxy_protocol = \"v1\"\n\
         [upstreams.pp2]\nendpoints = [\"{behind}\"]\nsend_proxy_protocol = \"v2\"\n\
         [upstreams.pp2.health]\ntype = \"http\"\npath = \"/\"\ninterval = \"100ms\"\n",
        web.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let main = h.listeners["main"];
    let get = b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    // In, v1 and v2, from a trusted source: the header's client is the client.
    let r = exchange(main, "127.0.0.1", &[&b"PROXY TCP4 203.0.113.7 127.0.0.1 4444 80\r\n"[..], get].concat()).await;
    assert!(r.contains("x-forwarded-for: 203.0.113.7\n"), "{r}");
    let r = exchange(main, "127.0.0.1", &[&v2_header([198, 51, 100, 9], 5555)[..], get].concat()).await;
    assert!(r.contains("x-forwarded-for: 198.51.100.9\n"), "{r}");
    // A trusted source without a header, and an untrusted one with a
    // header: closed unanswered. An untrusted one without: served as itself.
    assert_eq!(exchange(main, "127.0.0.1", get).await, "");
    let forged = [&b"PROXY TCP4 10.9.9.9 127.0.0.1 1 80\r\n"[..], get].concat();
    assert_eq!(exchange(main, "127.0.0.2", &forged).await, "");
    assert_eq!(exchange(main, "127.0.0.2", &[&v2_header([10, 9, 9, 9], 1)[..], get].concat()).await, "");
    let r = exchange(main, "127.0.0.2", get).await;
    assert!(r.contains("x-forwarded-for: 127.0.0.2\n"), "{r}");
    let c = Client::new();
    assert_eq!(metric(&c, &h, "halo_listener_proxy_protocol_refused_total{listener=\"main\"}").await, 3.0);

    // Out: v1 carries the address a trusted balancer named; v2 the
    // connection's own. Health checks send a LOCAL header (pp2 checks by HTTP).
    let r = exchange(h.listeners["tcp1"], "127.0.0.1", b"PROXY TCP4 192.0.2.5 127.0.0.1 5555 80\r\n").await;
    assert_eq!(r, "v1 192.0.2.5:5555\n");
    let r = exchange(h.listeners["tcp2"], "127.0.0.3", b"").await;
    assert!(r.starts_with("v2 127.0.0.3:"), "{r}");
    let up = format!("halo_endpoint_health_check_failures_total{{upstream=\"pp2\",endpoint=\"{behind}\"}}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The server answers a LOCAL header with text, not HTTP: the checks
    // fail, which shows they reached it with the header first.
    assert!(metric(&c, &h, &up).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_their_trailers_count_their_status_and_health_checks_speak_grpc() {
    let (g1, g2) = (GrpcServer::start("g1").await, GrpcServer::start("g2").await);
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"grpc\"\nupstream = \"grpc\"\n\
         [upstreams.grpc]\nendpoints = [\"{}\", \"{}\"]\nprotocol = \"h2\"\n\
         [upstreams.grpc.health]\ntype = \"grpc\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\njitter = \"0\"\n",
        g1.addr, g2.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let to = h.listeners["main"];
    let c = Client::new();
    // Unary: the answer and the trailers, as the server sent them.
    let (r, _) = grpc_call(to, "/halo.test.Echo/Unary", &[b"hello"], Duration::ZERO).await.unwrap();
    assert_eq!(r.status, 200);
    let served = r.trailers.as_ref().and_then(|t| t.get("x-served-by")).unwrap().to_str().unwrap().to_string();
    assert_eq!(
        r.messages.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
        vec![format!("{served}:hello").into_bytes()]
    );
    assert_eq!(r.grpc_status(), Some("0"));
    // Streaming both ways: every answer arrives while the client still sends.
    let sent_msgs: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];
    let (r, sent) = grpc_call(to, "/halo.test.Echo/Stream", &sent_msgs, Duration::from_millis(100)).await.unwrap();
    let got: Vec<String> = r.messages.iter().map(|(m, _)| String::from_utf8_lossy(m).into_owned()).collect();
    let who = r.trailers.as_ref().and_then(|t| t.get("x-served-by")).unwrap().to_str().unwrap().to_string();
    assert_eq!(got, (1..=5).map(|i| format!("{who}:{i}")).collect::<Vec<_>>());
    assert!(r.messages[0].1 < sent[4], "the first answer waited for the whole request: not streamed");
    assert_eq!(r.grpc_status(), Some("0"));
    // Errors: trailers-only, and after a message.
    let (r, _) = grpc_call(to, "/halo.test.Echo/Fail", &[b"x"], Duration::ZERO).await.unwrap();
    assert_eq!(
        (r.grpc_status(), r.headers.get("grpc-message").map(|v| v.to_str().unwrap())),
        (Some("5"), Some("not found here"))
    );
    let (r, _) = grpc_call(to, "/halo.test.Echo/FailLate", &[b"x"], Duration::ZERO).await.unwrap();
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.grpc_status(), Some("13"));
    let count = |code: &str| format!("halo_route_grpc_responses_total{{route=\"grpc\",grpc_status=\"{code}\"}}");
    assert_eq!(metric(&c, &h, &count("0")).await, 2.0);
    assert_eq!(metric(&c, &h, &count("5")).await, 1.0);
    assert_eq!(metric(&c, &h, &count("13")).await, 1.0);
    // gRPC health checks: NOT_SERVING takes g2 out, SERVING brings it back.
    g2.set_serving(false);
    let label = format!("halo_endpoint_up{{upstream=\"grpc\",endpoint=\"{}\"}}", g2.addr);
    eventually(Duration::from_secs(10), "g2 down by its gRPC health", || async { metric(&c, &h, &label).await == 0.0 })
        .await;
    for _ in 0..10 {
        let (r, _) = grpc_call(to, "/halo.test.Echo/Unary", &[b"x"], Duration::ZERO).await.unwrap();
        assert_eq!(r.trailers.unwrap()["x-served-by"], "g1");
    }
    g2.set_serving(true);
    eventually(Duration::from_secs(10), "g2 back up", || async { metric(&c, &h, &label).await == 1.0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_routes_by_server_name_without_terminating() {
    let ca = TestCa::new();
    let (a, b, other) = (ca.issue(&["a.test"]), ca.issue(&["x.b.test", "y.b.test"]), ca.issue(&["other.test"]));
    let (sa, sb, so) = (
        HttpsServer::start(&a, "server-a").await,
        HttpsServer::start(&b, "server-b").await,
        HttpsServer::start(&other, "server-other").await,
    );
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"pass\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"rest\"\n\
         sni = [{{ names = [\"a.test\"], upstream = \"a\" }}, {{ names = [\"*.b.test\"], upstream = \"b\" }}]\n\
         [[listeners]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
         sni = [{{ names = [\"a.test\"], upstream = \"a\" }}]\n\
         [upstreams.a]\nendpoints = [\"{}\"]\n[upstreams.b]\nendpoints = [\"{}\"]\n[upstreams.rest]\nendpoints = [\"{}\"]\n",
        sa.addr, sb.addr, so.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let client = ca.client(&[b"http/1.1"]);
    // The certificate is the backend's own: halo did not terminate TLS.
    for (sni, leaf, body) in
        [("a.test", &a, "server-a"), ("y.b.test", &b, "server-b"), ("other.test", &other, "server-other")]
    {
        let r = https_get(h.listeners["pass"], sni, "/", &client).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert!(r.peer == leaf.der, "{sni}: another certificate");
        assert_eq!((r.status, r.body.as_str()), (200, body));
    }
    // Without a default upstream, an unknown name is closed and counted.
    assert!(https_get(h.listeners["strict"], "other.test", "/", &client).await.is_err());
    let c = Client::new();
    assert_eq!(metric(&c, &h, "halo_listener_unserved_total{listener=\"strict\"}").await, 1.0);
    assert_eq!(https_get(h.listeners["strict"], "a.test", "/", &client).await.unwrap().body, "server-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_upstreams_verifies_their_certificates() {
    let (ca, other_ca) = (TestCa::new(), TestCa::new());
    let up = HttpsServer::start(&ca.issue(&["up.test", "127.0.0.1"]), "server-up").await;
    let dir = TempDir::new("up-tls");
    dir.write("ca.pem", &ca.ca_pem());
    dir.write("other-ca.pem", &other_ca.ca_pem());
    let route = |host: &str, up: &str| format!("[[routes]]\nhost = \"{host}\"\nupstream = \"{up}\"\n");
    let upstream = |name: &str, tls: &str| {
        // Checked over TLS too; wrong_ca's checks are off, so that a
        // request reaches its handshake (wrong_checked's take it down).
        let checks = if name == "wrong_ca" {
            "enabled = false"
        } else {
            "type = \"http\"\npath = \"/\"\ninterval = \"100ms\"\njitter = \"0\"\nfall = 1"
        };
        format!(
            "[upstreams.{name}]\nendpoints = [\"{}\"]\n[upstreams.{name}.tls]\n{tls}\n[upstreams.{name}.health]\n{checks}\n",
            up.addr
        )
    };
    let cfg = [
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n".to_string(),
        route("named.test", "named"),
        route("by-ip.test", "by_ip"),
        route("wrong.test", "wrong_ca"),
        route("blind.test", "blind"),
        upstream("named", "ca = \"ca.pem\"\nserver_name = \"up.test\""),
        upstream("by_ip", "ca = \"ca.pem\""),
        upstream("wrong_ca", "ca = \"other-ca.pem\""),
        upstream("wrong_checked", "ca = \"other-ca.pem\""),
        upstream("blind", "verify = false"),
    ]
    .concat();
    let path = dir.write("proxy.toml", &cfg);
    let h = Halo::start(BIN, &["proxy", "-c", &path.to_string_lossy()], &dir.0).unwrap();
    let c = Client::new();
    let get =
        |host: &str| Request::get(h.url("main", "/")).header("host", host).body(Full::<Bytes>::default()).unwrap();
    for host in ["named.test", "by-ip.test", "blind.test"] {
        let r = c.send(get(host)).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "server-up"), "{host}");
    }
    // A certificate from a CA the upstream's bundle does not hold: 502
    // saying so, and the health checks (over TLS too) take it down.
    let r = c.send(get("wrong.test")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("TLS handshake") && r.body.contains("certificate"), "{}", r.body);
    let down = format!("halo_endpoint_up{{upstream=\"wrong_checked\",endpoint=\"{}\"}}", up.addr);
    eventually(Duration::from_secs(10), "the unverifiable endpoint is down", || async {
        metric(&c, &h, &down).await == 0.0
    })
    .await;
    let ok = format!("halo_endpoint_up{{upstream=\"named\",endpoint=\"{}\"}}", up.addr);
    assert_eq!(metric(&c, &h, &ok).await, 1.0);
    // Verification without a CA bundle is refused, with what to do.
    let bad = dir.write(
        "bad.toml",
        &format!(
            "{}{}{}",
            cfg.split("[[routes]]").next().unwrap(),
            route("x.test", "u"),
            upstream("u", "server_name = \"x\"")
        ),
    );
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("upstreams.u.tls: verification needs ca = \"FILE\""), "{err}");
}

/// A keep-alive connection quiet after its exchange is parked (no task, no
/// buffer, no timer of its own) and resumed by its next request: curl
/// reuses one connection for requests a third of a second apart, over
/// plain HTTP and over TLS. A parked connection is closed at
/// keepalive_idle and counted as open until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_resume_and_expire() {
    let ca = TestCa::new();
    let web = Backend::start("web").await;
    let dir = TempDir::new("parked");
    ca.issue(&["127.0.0.1"]).write(&dir, "a");
    let ca_file = dir.write("ca.pem", &ca.ca_pem());
    let cfg = format!(
        "[proxy]\nkeepalive_idle = \"2s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [listeners.tls]\ncertificates = [{}]\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\n",
        cert_entry("a"),
        web.addr
    );
    let cfg_path = dir.write("proxy.toml", &cfg);
    let h = Halo::start(BIN, &["proxy", "-c", &cfg_path.to_string_lossy()], &dir.0).unwrap();
    for url in [format!("http://{}/", h.listeners["main"]), format!("https://{}/", h.listeners["tls"])] {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &ca_file.to_string_lossy(),
                "--rate",
                "3/s",
                "-w",
                "%{http_code} %{num_connects}\\n",
            ])
            .args(std::iter::repeat_n(["-o", "/dev/null", &url], 4).flatten())
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text, "200 1\n200 0\n200 0\n200 0\n", "{url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Silent after one exchange: closed by the proxy at keepalive_idle.
    let mut s = tokio::net::TcpStream::connect(h.listeners["main"]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a parked connection outlived keepalive_idle by 28 s");
    assert!(String::from_utf8_lossy(&seen).contains("backend=web"), "{}", String::from_utf8_lossy(&seen));
    let c = Client::new();
    eventually(Duration::from_secs(10), "no connection counted open", || async {
        metric(&c, &h, "halo_listener_connections_active").await == 0.0
    })
    .await;
}
