//! Health (active and passive), slow start, retries, the retry budget and
//! timeouts, with faults made by real means: killed listeners, failing
//! health endpoints, a server that drops requests it already read.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use halo_testkit::{eventually, metric, Backend, Client, Halo, Load, Report};
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncReadExt;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn config(route_extra: &str, upstream_body: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"r\"\nupstream = \"web\"\n{route_extra}\n[upstreams.web]\n{upstream_body}\n"
    )
}

fn eps(bs: &[&Backend]) -> String {
    let v: Vec<String> = bs.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!("endpoints = [{}]", v.join(", "))
}

async fn status_json(c: &Client, h: &Halo) -> serde_json::Value {
    serde_json::from_str(&c.get(&h.admin_url("/status")).await.expect("status").body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_endpoint_down_and_back_up() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let up = format!(
        "{}\n[upstreams.web.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"50ms\"\nrise = 2\nfall = 2\njitter = \"10ms\"",
        eps(&[&a, &b])
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    b.set_healthy(false);
    let label = format!("halo_endpoint_up{{upstream=\"web\",endpoint=\"{}\"}}", b.addr);
    eventually(Duration::from_secs(10), "b marked down", || async { metric(&c, &h, &label).await == 0.0 }).await;
    let before = b.requests();
    for _ in 0..50 {
        assert_eq!(c.get(&url).await.unwrap().backend(), Some("a"));
    }
    assert_eq!(b.requests(), before, "a down endpoint got traffic");
    assert!(metric(&c, &h, "halo_endpoint_health_check_failures_total").await >= 2.0);
    b.set_healthy(true);
    eventually(Duration::from_secs(10), "b back up", || async { metric(&c, &h, &label).await == 1.0 }).await;
    eventually(Duration::from_secs(5), "b serves again", || async {
        c.get(&url).await.unwrap().backend() == Some("b")
    })
    .await;
    // TCP checks: a killed listener goes down.
    let (mut x, y) = (Backend::start("x").await, Backend::start("y").await);
    let up = format!(
        "{}\n[upstreams.web.health]\ntype = \"tcp\"\ninterval = \"50ms\"\nfall = 1\njitter = \"0\"",
        eps(&[&x, &y])
    );
    let h2 = Halo::proxy(BIN, &config("", &up)).unwrap();
    x.kill();
    let label = format!("halo_endpoint_up{{upstream=\"web\",endpoint=\"{}\"}}", x.addr);
    eventually(Duration::from_secs(10), "x marked down by tcp check", || async {
        metric(&c, &h2, &label).await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_then_503_when_everything_is_down() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set_status(502);
    let up = format!(
        "{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nconsecutive_failures = 3\nbase_ejection = \"30s\"\nmax_ejected_percent = 50",
        eps(&[&a, &b])
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    // b fails with 502: GETs are retried on a, so clients see no failure.
    for _ in 0..40 {
        let r = c.get(&url).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(metric(&c, &h, "halo_endpoint_ejections_total").await >= 1.0);
    let b_seen = b.requests();
    assert!(b_seen <= 4, "b got {b_seen} requests; it should have been ejected after 3 failures");
    let s = status_json(&c, &h).await;
    let ejected: Vec<bool> =
        s["endpoints"].as_array().unwrap().iter().map(|e| e["ejected"].as_bool().unwrap()).collect();
    assert_eq!(ejected.iter().filter(|e| **e).count(), 1, "{s}");

    // Everything down: a clear 503, no hang.
    let (mut x, mut y) = (Backend::start("x").await, Backend::start("y").await);
    let up = format!(
        "{}\n[upstreams.web.health]\ntype = \"tcp\"\ninterval = \"50ms\"\nfall = 1\njitter = \"0\"",
        eps(&[&x, &y])
    );
    let h2 = Halo::proxy(BIN, &config("", &up)).unwrap();
    x.kill();
    y.kill();
    let url = h2.url("main", "/");
    eventually(Duration::from_secs(10), "503 when no endpoint is up", || async {
        let r = c.get(&url).await.unwrap();
        r.status == 503 && r.body.contains("no healthy endpoint in upstream 'web'")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_recovered_endpoint() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let up = format!(
        "{}\nslow_start = \"3s\"\n[upstreams.web.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"50ms\"\nrise = 1\nfall = 1\njitter = \"0\"",
        eps(&[&a, &b])
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let weight_of_b = |s: serde_json::Value| {
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["addr"] == b.addr.to_string())
            .map(|e| (e["available"].as_bool().unwrap(), e["effective_weight"].as_f64().unwrap()))
            .unwrap()
    };
    assert_eq!(weight_of_b(status_json(&c, &h).await), (true, 1.0), "a fresh endpoint starts at full weight");
    b.set_healthy(false);
    eventually(Duration::from_secs(10), "b down", || async { !weight_of_b(status_json(&c, &h).await).0 }).await;
    b.set_healthy(true);
    eventually(Duration::from_secs(10), "b up", || async { weight_of_b(status_json(&c, &h).await).0 }).await;
    let (_, w) = weight_of_b(status_json(&c, &h).await);
    assert!(w < 0.9, "right after recovery b should be ramping, weight {w}");
    // Traffic share during the ramp is below a's.
    let mut hits_b = 0;
    for _ in 0..100 {
        if c.get(&h.url("main", "/")).await.unwrap().backend() == Some("b") {
            hits_b += 1;
        }
    }
    assert!(hits_b < 50, "b got {hits_b} of 100 while ramping");
    eventually(Duration::from_secs(10), "b at full weight", || async {
        weight_of_b(status_json(&c, &h).await).1 == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_load_fails_no_get() {
    let (a, mut b, c3) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    // Active checks are slow on purpose: retries alone must hide the crash.
    let up = format!("{}\n[upstreams.web.health]\ninterval = \"30s\"", eps(&[&a, &b, &c3]));
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let url = h.url("main", "/");
    let load = Load::start(&url, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let Report { ok, failed } = load.finish().await;
    println!("requests ok: {ok}, failed: {}", failed.len());
    assert!(failed.is_empty(), "{} failed GETs, first: {:?}", failed.len(), failed.first());
    assert!(ok > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_stops_a_storm() {
    let bs = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    for b in &bs {
        b.set_status(503);
    }
    let up = format!(
        "{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nenabled = false",
        eps(&[&bs[0], &bs[1], &bs[2]])
    );
    let route = "retry = { attempts = 2, budget_ratio = 0.1, budget_min_per_sec = 1 }";
    let h = Halo::proxy(BIN, &config(route, &up)).unwrap();
    let c = Client::new();
    let n = 300;
    for _ in 0..n {
        assert_eq!(c.get(&h.url("main", "/")).await.unwrap().status, 503);
    }
    let upstream_requests: u64 = bs.iter().map(Backend::requests).sum();
    // Without a budget this would be 3 x 300 = 900; the budget allows 10% of
    // requests plus 1/s over the 10 s window.
    assert!(upstream_requests <= n + n / 10 + 10 + 2, "upstreams saw {upstream_requests} requests for {n}");
    assert!(metric(&c, &h, "halo_route_retries_denied_total").await > 0.0);
    assert!(metric(&c, &h, "halo_route_retries_total").await >= 10.0);
}

/// A server that reads a request and closes the connection without answering.
async fn black_hole() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                if let Ok(n) = s.read(&mut buf).await {
                    if n > 0 {
                        seen.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_replayed_once_it_reached_an_upstream() {
    let good = Backend::start("good").await;
    let (hole, hole_seen) = black_hole().await;
    let up = format!(
        "endpoints = [\"{hole}\", \"{}\"]\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nenabled = false",
        good.addr
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let (mut ok, mut bad) = (0, 0);
    for i in 0..20 {
        let req = Request::post(h.url("main", "/echo")).body(Full::new(Bytes::from(format!("order {i}")))).unwrap();
        match c.send(req).await.unwrap().status.as_u16() {
            200 => ok += 1,
            502 => bad += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(good.stats().posts.load(SeqCst), ok, "a POST that reached the black hole was replayed");
    assert_eq!(hole_seen.load(SeqCst), bad);
    assert!(bad > 0 && ok > 0, "ok {ok} bad {bad}");
    // GETs are idempotent: the same failure is retried on the good endpoint.
    for _ in 0..20 {
        assert_eq!(c.get(&h.url("main", "/")).await.unwrap().status, 200);
    }
    // A POST that provably never left (connection refused) is retried.
    let dead = halo_testkit::free_addr();
    let up = format!("endpoints = [\"{dead}\", \"{}\"]\n[upstreams.web.health]\nenabled = false", good.addr);
    let h2 = Halo::proxy(BIN, &config("", &up)).unwrap();
    for i in 0..10 {
        let req = Request::post(h2.url("main", "/echo")).body(Full::new(Bytes::from(format!("order {i}")))).unwrap();
        assert_eq!(c.send(req).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504() {
    let a = Backend::start("a").await;
    let up =
        format!("{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nenabled = false", eps(&[&a]));
    let h = Halo::proxy(BIN, &config("timeouts = { first_byte = \"200ms\" }", &up)).unwrap();
    let c = Client::new();
    let r = c.get(&h.url("main", "/delay/2000")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("no response within"), "{}", r.body);
    assert_eq!(c.get(&h.url("main", "/delay/10")).await.unwrap().status, 200);
    let h2 = Halo::proxy(BIN, &config("timeouts = { first_byte = \"0\", request = \"300ms\" }", &up)).unwrap();
    let r = c.get(&h2.url("main", "/delay/2000")).await.unwrap();
    assert_eq!(r.status, 504);
    assert!(r.body.contains("exceeded its timeout"), "{}", r.body);
}

/// A keep-alive upstream that closes every connection 100 ms after answering
/// on it, silently (as a server with a short keep-alive timeout does).
async fn closes_idle_connections() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let served = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read one request (head plus a content-length body).
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                served.fetch_add(1, SeqCst);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    (addr, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connections_are_not_used_even_for_post() {
    let (addr, served) = closes_idle_connections().await;
    let up = format!("endpoints = [\"{addr}\"]\n[upstreams.web.health]\nenabled = false");
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    for i in 0..5 {
        let req = Request::post(h.url("main", "/order")).body(Full::new(Bytes::from(format!("order {i}")))).unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200, "POST {i} failed: {}", r.body);
        // Long enough for the upstream to close the pooled connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(served.load(SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_caps_connections_per_endpoint_and_closes_idle_ones() {
    let a = Backend::start("a").await;
    a.set_delay(Duration::from_millis(200));
    let up = format!(
        "{}\n[upstreams.web.pool]\nmax_per_endpoint = 2\nidle_timeout = \"300ms\"\n[upstreams.web.health]\ntype = \"tcp\"\ninterval = \"100ms\"",
        eps(&[&a])
    );
    let h = Halo::proxy(BIN, &config("timeouts = { connect = \"5s\" }", &up)).unwrap();
    let url = h.url("main", "/");
    let reqs: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::no_pool().get(&url).await })
        })
        .collect();
    let c = Client::new();
    let open = |s: serde_json::Value| s["endpoints"][0]["open_connections"].as_u64().unwrap();
    eventually(Duration::from_secs(5), "requests in flight", || async { a.requests() >= 1 }).await;
    assert_eq!(open(status_json(&c, &h).await), 2, "the pool should be at its cap of 2 with 6 requests waiting");
    for r in reqs {
        assert_eq!(r.await.unwrap().unwrap().status, 200, "requests over the cap wait, they do not fail");
    }
    assert_eq!(a.requests(), 6);
    eventually(Duration::from_secs(5), "idle connections closed after idle_timeout", || async {
        open(status_json(&c, &h).await) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_answering_upstream_gets_a_clear_502() {
    let addr = halo_testkit::canned_upstream(b"220 mail.example.com ESMTP ready\r\n\r\n").await;
    let up = format!("endpoints = [\"{addr}\"]\n[upstreams.web.health]\nenabled = false");
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let r = Client::new().get(&h.url("main", "/")).await.unwrap();
    assert_eq!(r.status, 502);
    assert!(r.body.contains("invalid response from upstream"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_idle_timeouts() {
    use tokio::io::AsyncWriteExt;
    // A listener that never accepts, with its one-slot backlog taken: further
    // connection attempts get no answer at all.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = sock.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap();
    let _fillers: Vec<_> = futures_fill(full_addr).await;
    let up = format!("endpoints = [\"{full_addr}\"]\n[upstreams.web.health]\nenabled = false");
    let h = Halo::proxy(BIN, &config("timeouts = { connect = \"300ms\" }", &up)).unwrap();
    let r = Client::new().get(&h.url("main", "/")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("timed out"), "{}", r.body);

    // An upstream that sends a head and part of the body, then goes silent.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stall = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial").await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let up = format!("endpoints = [\"{stall}\"]\n[upstreams.web.health]\nenabled = false");
    let h2 = Halo::proxy(BIN, &config("timeouts = { idle = \"300ms\" }", &up)).unwrap();
    let e = Client::new().get(&h2.url("main", "/")).await.unwrap_err();
    // The proxy cut the stalled body (the client saw it end early), long
    // before the client's own 20 s limit.
    assert!(e.starts_with("body"), "{e}");
    drop(full);
}

/// Opens connections until the listener's accept queue is full.
async fn futures_fill(addr: std::net::SocketAddr) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => v.push(s),
            _ => break,
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_replay_cap_are_never_retried() {
    let good = Backend::start("good").await;
    let (hole, hole_seen) = black_hole().await;
    let up = format!(
        "endpoints = [\"{hole}\", \"{}\"]\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nenabled = false",
        good.addr
    );
    let h = Halo::proxy(BIN, &config("retry = { body_cap = 1024 }", &up)).unwrap();
    let c = Client::new();
    // PUT is idempotent: with a small body it is retried on the good endpoint.
    for _ in 0..10 {
        let req = Request::put(h.url("main", "/echo")).body(Full::new(Bytes::from(vec![b's'; 100]))).unwrap();
        assert_eq!(c.send(req).await.unwrap().status, 200);
    }
    // Over the cap the body is streamed, so it cannot be replayed.
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..10 {
        let req = Request::put(h.url("main", "/echo")).body(Full::new(Bytes::from(vec![b'L'; 4096]))).unwrap();
        match c.send(req).await.unwrap().status.as_u16() {
            200 => ok += 1,
            502 => bad += 1,
            s => panic!("status {s}"),
        }
    }
    assert!(bad > 0 && ok > 0, "ok {ok} bad {bad}");
    assert!(hole_seen.load(SeqCst) >= bad);
}

/// `halo demo-app` as a process of its own (so it can be frozen with
/// SIGSTOP); thawed and killed on drop.
struct App {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl App {
    fn start() -> App {
        let addr = halo_testkit::free_addr();
        let child = std::process::Command::new(BIN)
            .args(["demo-app", "--port", &addr.port().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        App { child, addr }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend frozen under load (SIGSTOP: its kernel still accepts
/// connections, nothing answers). With `try_timeout = "off"` this test
/// fails: requests held by the frozen app wait out the client's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_backend_fails_no_get_its_tries_move_elsewhere_and_it_is_ejected() {
    let apps = [App::start(), App::start(), App::start()];
    let list: Vec<String> = apps.iter().map(|a| format!("\"{}\"", a.addr)).collect();
    // No active checks: only the per-try timeout and passive ejection act.
    let up = format!(
        "endpoints = [{}]\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nconsecutive_failures = 3\nbase_ejection = \"30s\"",
        list.join(", ")
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    eventually(Duration::from_secs(10), "every app answering", || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..12 {
            if let Ok(r) = c.get(&url).await {
                seen.insert(r.body);
            }
        }
        seen.len() == 3
    })
    .await;
    let load = Load::start(&url, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    apps[0].signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Still frozen: every GET must have been answered by the others.
    let Report { ok, failed } = load.finish().await;
    apps[0].signal(nix::sys::signal::Signal::SIGCONT);
    println!("frozen backend: {ok} ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    assert!(metric(&c, &h, "halo_route_try_timeouts_total").await >= 1.0, "no try was abandoned");
    let s = status_json(&c, &h).await;
    let frozen = s["endpoints"].as_array().unwrap().iter().find(|e| e["addr"] == apps[0].addr.to_string()).cloned();
    assert_eq!(frozen.as_ref().map(|e| e["ejected"].clone()), Some(serde_json::json!(true)), "{s}");
    // A POST is never abandoned and replayed: it waits for its endpoint.
    let r = c.send(Request::post(&url).body(Full::new(Bytes::from_static(b"x"))).unwrap()).await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_is_answered_by_the_faster_endpoint_and_a_post_is_never_hedged() {
    let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
    slow.set_delay(Duration::from_secs(2));
    let up = format!(
        "{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nenabled = false",
        eps(&[&fast, &slow])
    );
    let h = Halo::proxy(BIN, &config("retry = { hedge = \"100ms\", try_timeout = \"off\" }", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    // Round robin sends every other first try to the slow endpoint; its
    // hedge goes to the fast one, which answers first.
    for _ in 0..4 {
        let r = c.get(&url).await.unwrap();
        assert_eq!((r.status.as_u16(), r.backend()), (200, Some("fast")), "{}", r.body);
    }
    assert!(slow.requests() >= 1, "no first try went to the slow endpoint");
    assert!(metric(&c, &h, "halo_route_hedges_won_total{route=\"r\"}").await >= 1.0);
    // A POST is not hedged: the one sent to the slow endpoint waits for it.
    let hedges = metric(&c, &h, "halo_route_hedges_total{route=\"r\"}").await;
    let mut answered_by = Vec::new();
    for _ in 0..2 {
        let req = Request::post(&url).body(Full::new(Bytes::from_static(b"x"))).unwrap();
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        answered_by.push(r.backend().unwrap_or_default().to_string());
    }
    answered_by.sort();
    assert_eq!(answered_by, ["fast", "slow"]);
    assert_eq!(metric(&c, &h, "halo_route_hedges_total{route=\"r\"}").await, hedges);
}

/// Ejected endpoints of `web` as the admin API lists them.
async fn ejected(c: &Client, h: &Halo) -> Vec<String> {
    let s = status_json(c, h).await;
    let eps = s["endpoints"].as_array().cloned().unwrap_or_default();
    eps.iter().filter(|e| e["ejected"] == true).map(|e| e["addr"].as_str().unwrap_or("?").to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_more_often_than_the_rest_is_ejected_and_comes_back() {
    let (a, b, x) = (Backend::start("a").await, Backend::start("b").await, Backend::start("x").await);
    // One request in ten: never five in a row, and no health check sees it.
    b.set_fail_every(10);
    let up = format!(
        "{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nconsecutive_failures = 1000\n\
         base_ejection = \"2s\"\nfailure_rate_interval = \"500ms\"\nfailure_rate_min_requests = 20",
        eps(&[&a, &b, &x])
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    let b_ejections = format!("halo_endpoint_ejections_total{{upstream=\"web\",endpoint=\"{}\"}}", b.addr);
    eventually(Duration::from_secs(30), "b ejected for its failure rate", || async {
        for _ in 0..20 {
            c.get(&url).await.unwrap();
        }
        metric(&c, &h, &b_ejections).await >= 1.0
    })
    .await;
    assert_eq!(metric(&c, &h, "halo_endpoint_ejections_total").await, metric(&c, &h, &b_ejections).await);
    // Healed, it serves again once its ejection ends.
    b.set_fail_every(0);
    let before = b.requests();
    eventually(Duration::from_secs(30), "b serves again", || async {
        for _ in 0..10 {
            c.get(&url).await.unwrap();
        }
        b.requests() > before && ejected(&c, &h).await.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_rate_ejections_never_take_more_than_the_share_allowed() {
    let (a, b, x) = (Backend::start("a").await, Backend::start("b").await, Backend::start("x").await);
    b.set_fail_every(2);
    x.set_fail_every(2);
    let up = format!(
        "{}\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nconsecutive_failures = 1000\n\
         base_ejection = \"300ms\"\nmax_ejection = \"300ms\"\nmax_ejected_percent = 50\n\
         failure_rate_interval = \"1s\"\nfailure_rate_min_requests = 20",
        eps(&[&a, &b, &x])
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    // Both failing endpoints stand out (each judged against the rest of the
    // group, the other failing one included: hence a 1 s interval, enough
    // tries for the difference to be significant), but 50% of three allows
    // one out at a time: every sample holds at most one, while ejections go
    // on.
    eventually(Duration::from_secs(60), "both failing endpoints ejected in turn", || async {
        for _ in 0..20 {
            c.get(&url).await.unwrap();
        }
        let out = ejected(&c, &h).await;
        assert!(out.len() <= 1, "more than the allowed share ejected: {out:?}");
        let of = |addr| format!("halo_endpoint_ejections_total{{upstream=\"web\",endpoint=\"{addr}\"}}");
        metric(&c, &h, &of(b.addr)).await >= 1.0 && metric(&c, &h, &of(x.addr)).await >= 1.0
    })
    .await;
    let a_label = format!("halo_endpoint_ejections_total{{upstream=\"web\",endpoint=\"{}\"}}", a.addr);
    assert_eq!(metric(&c, &h, &a_label).await, 0.0);
}

/// A server that answers the first request of each connection with
/// keep-alive, then closes the connection when the second arrives,
/// unanswered: the race of a server closing an idle connection (its
/// keep-alive timeout, a reload) as a request goes out on it.
async fn closes_reused_connections() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answered in [true, false] {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    if answered {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_by_the_upstream_is_sent_again_and_not_a_failure() {
    let (addr, server) = closes_reused_connections().await;
    let up = format!(
        "endpoints = [\"{addr}\"]\n[upstreams.web.health]\nenabled = false\n[upstreams.web.outlier]\nconsecutive_failures = 1"
    );
    let h = Halo::proxy(BIN, &config("", &up)).unwrap();
    let c = Client::new();
    for _ in 0..10 {
        let r = c.get(&h.url("main", "/")).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    }
    assert_eq!(metric(&c, &h, "halo_endpoint_ejections_total").await, 0.0);
    server.abort();
}
