//! Overload protection through `halo proxy`: a listener's max_connections,
//! an upstream's max_in_flight (503 at once) and a route's per-client rate
//! limit (429 with Retry-After), their metrics, reloads and bad values.

use std::net::SocketAddr;
use std::time::Duration;

use halo_testkit::{eventually, metric, Backend, Client, Halo, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn config(listener: &str, route: &str, upstream: &str, b: &Backend) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n{listener}\n\
         [[routes]]\nname = \"r\"\nupstream = \"web\"\n{route}\n[upstreams.web]\nendpoints = [\"{}\"]\n{upstream}\n",
        b.addr
    )
}

/// One keep-alive GET on `s`: its response, or `None` without one within
/// `within`.
async fn get_on(s: &mut TcpStream, within: Duration) -> Option<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.ok()?;
    read_response(s, within).await
}

/// The next response on `s` (head and a Content-Length body) as text, or
/// `None` when none came within `within`.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return Some(text.into_owned());
                }
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_stops_accepting_until_a_connection_closes_or_a_reload_raises_the_limit() {
    let b = Backend::start("b").await;
    let h = Halo::proxy(BIN, &config("max_connections = 2", "", "", &b)).unwrap();
    let addr = h.listeners["main"];
    let c = Client::new();
    let ten = Duration::from_secs(10);
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for s in [&mut first, &mut second] {
        let r = get_on(s, ten).await.expect("an answer on a connection within the limit");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    // The third connection is taken by the kernel's accept queue, not by
    // halo: its request waits.
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_on(&mut third, Duration::from_millis(500)).await, None, "served past max_connections");
    assert!(metric(&c, &h, "halo_listener_limit_pauses_total{listener=\"main\"}").await >= 1.0);
    assert_eq!(metric(&c, &h, "halo_listener_connections_active{listener=\"main\"}").await, 2.0);
    // One closes: the waiting one is accepted and its request answered.
    drop(first);
    let r = read_response(&mut third, ten).await.expect("an answer once a connection closed");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Full again (second and third open); a reload to 3 lets the next in.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    assert_eq!(get_on(&mut fourth, Duration::from_millis(500)).await, None, "served past max_connections");
    h.write_config(&config("max_connections = 3", "", "", &b));
    h.signal("HUP");
    let r = read_response(&mut fourth, ten).await.expect("an answer once the limit was raised");
    assert!(r.starts_with("HTTP/1.1 200"), "after the reload raised the limit: {r}");
    drop((second, third, fourth));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_at_max_in_flight_answers_503_at_once_and_admits_again_when_one_finishes() {
    let b = Backend::start("b").await;
    b.set_delay(Duration::from_millis(1500));
    let h = Halo::proxy(BIN, &config("", "", "max_in_flight = 2", &b)).unwrap();
    let c = Client::no_pool();
    let url = h.url("main", "/");
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.get(&url).await })
        })
        .collect();
    // Admitted by halo and arrived at the backend (which counts on arrival).
    eventually(Duration::from_secs(10), "two requests in flight", || async {
        metric(&c, &h, "halo_upstream_in_flight{upstream=\"web\"}").await == 2.0 && b.requests() == 2
    })
    .await;
    let before = b.requests();
    let shed = c.get(&url).await.unwrap();
    assert_eq!(shed.status, 503, "{}", shed.body);
    assert!(shed.body.contains("max_in_flight") && shed.body.contains("limit of 2"), "{}", shed.body);
    assert_eq!(shed.headers["retry-after"], "1");
    assert_eq!(b.requests(), before, "a shed request reached the backend");
    for t in slow {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "an admitted request: {}", r.body);
    }
    assert_eq!(metric(&c, &h, "halo_upstream_shed_total{upstream=\"web\"}").await, 1.0);
    eventually(Duration::from_secs(5), "nothing in flight once the bodies are done", || async {
        metric(&c, &h, "halo_upstream_in_flight{upstream=\"web\"}").await == 0.0
    })
    .await;
    b.set_delay(Duration::ZERO);
    assert_eq!(c.get(&url).await.unwrap().status, 200, "admitted again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_the_rate_limit_gets_429_and_others_do_not() {
    let b = Backend::start("b").await;
    let limit = "[routes.rate_limit]\nrate = \"6/m\"\nburst = 3";
    let h = Halo::proxy(BIN, &config("", limit, "", &b)).unwrap();
    let addr = h.listeners["main"];
    let c = Client::new();
    let ten = Duration::from_secs(10);
    let mut s = connect_from("127.0.0.1", addr).await;
    for i in 0..3 {
        let r = get_on(&mut s, ten).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "request {i} of the burst: {r}");
    }
    let r = get_on(&mut s, ten).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.contains("rate_limit"), "{r}");
    // 6 a minute: the next one in 10 s.
    let retry: u64 = r
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().parse().unwrap()))
        .expect("a Retry-After header");
    assert!((1..=10).contains(&retry), "{r}");
    // Another client address has its own allowance.
    let mut other = connect_from("127.0.0.2", addr).await;
    assert!(get_on(&mut other, ten).await.unwrap().starts_with("HTTP/1.1 200"));
    // A reload that keeps the limit keeps what clients used; one that
    // changes it starts afresh.
    let reload = |text: String| {
        let (c, url) = (c.clone(), h.admin_url("/reload"));
        h.write_config(&text);
        async move {
            let r = c.send(http::Request::post(url).body(Default::default()).unwrap()).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    reload(config("", limit, "", &b)).await;
    let mut again = connect_from("127.0.0.1", addr).await;
    assert!(get_on(&mut again, ten).await.unwrap().starts_with("HTTP/1.1 429"), "a reload reset the limit");
    assert_eq!(metric(&c, &h, "halo_route_rate_limited_total{route=\"r\"}").await, 2.0);
    assert_eq!(metric(&c, &h, "halo_route_requests_total{route=\"r\",class=\"4xx\"}").await, 2.0);
    assert_eq!(b.requests(), 4, "limited requests reached the backend");
    reload(config("", "[routes.rate_limit]\nrate = \"600/m\"", "", &b)).await;
    assert!(get_on(&mut again, ten).await.unwrap().starts_with("HTTP/1.1 200"), "the new limit");
}

#[test]
fn bad_limits_are_refused_naming_the_field_and_what_is_accepted() {
    let dir = TempDir::new("overload-check");
    let text = "[[listeners]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 0\n\
                [[routes]]\nupstream = \"web\"\n[routes.rate_limit]\nrate = \"lots\"\n\
                [upstreams.web]\nendpoints = [\"127.0.0.1:9\"]\nmax_in_flight = 0\n";
    let path = dir.write("proxy.toml", text);
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "listeners[0].max_connections: accepted: 1 to",
        "routes[0].rate_limit: 'lots' is not a rate; accepted: N/s, N/m or N/h",
        "upstreams.web.max_in_flight: accepted: 1 to",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

/// `max_in_flight = "auto"` in front of a backend that serves 2 requests
/// at once (`halo demo-app --workers 2`): under 24 clients at once part of
/// the requests are answered 503 at once and the others 200, and the limit
/// the proxy adapted is in its metrics. A word other than "auto" is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_sheds_what_a_slow_backend_cannot_take() {
    let addr = halo_testkit::free_addr();
    let mut app = std::process::Command::new(BIN)
        .args(["demo-app", "--port", &addr.port().to_string(), "--workers", "2", "--delay-ms", "20"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{addr}\"]\nmax_in_flight = \"auto\"\n"
    );
    let h = Halo::proxy(BIN, &text).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    eventually(Duration::from_secs(10), "the demo app answering", || async {
        c.get(&format!("http://{addr}/healthz")).await.is_ok()
    })
    .await;
    // Until 60 are served (the limit measures the backend's own latency on
    // its first 25), not a fixed count: the shed ones come back at once, so
    // how many a fixed count serves depends on the machine's speed.
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (c, url, served) = (c.clone(), url.clone(), served.clone());
            tokio::spawn(async move {
                let (mut ok, mut shed) = (0u32, 0u32);
                while served.load(std::sync::atomic::Ordering::Relaxed) < 60 && std::time::Instant::now() < deadline {
                    match c.get(&url).await.map(|r| (r.status.as_u16(), r.body)) {
                        Ok((200, _)) => {
                            ok += 1;
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok((503, body)) if body.contains("max_in_flight") => shed += 1,
                        other => panic!("neither served nor shed: {other:?}"),
                    }
                }
                (ok, shed)
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in clients {
        let (o, s) = t.await.unwrap();
        ok += o;
        shed += s;
    }
    let _ = app.kill();
    let _ = app.wait();
    println!("adaptive limit: {ok} served, {shed} shed");
    assert!(ok > 0 && shed > 0, "{ok} served, {shed} shed");
    assert_eq!(metric(&c, &h, "halo_upstream_shed_total{upstream=\"web\"}").await, f64::from(shed));
    let limit = metric(&c, &h, "halo_upstream_concurrency_limit{upstream=\"web\"}").await;
    assert!((3.0..=1000.0).contains(&limit), "the adapted limit: {limit}");

    let dir = TempDir::new("overload-auto");
    let path = dir.write("proxy.toml", &text.replace("\"auto\"", "\"fast\""));
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("max_in_flight") && err.contains("\"auto\""), "{err}");
}
