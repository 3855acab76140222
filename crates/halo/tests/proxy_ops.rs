//! Operating the proxy: reloads under load, bad reloads, graceful shutdown,
//! header handling, malformed input, h2c, `halo check`, command-line mode,
//! metrics and the access log.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use halo_testkit::{alive, eventually, upgrade, Backend, Client, Halo, Load, Reaper, Report, TempDir};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn config(extra_top: &str, upstream_body: &str) -> String {
    format!(
        "{extra_top}\n[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"r\"\nupstream = \"web\"\n[upstreams.web]\n{upstream_body}\n"
    )
}

fn eps(bs: &[&Backend]) -> String {
    let v: Vec<String> = bs.iter().map(|b| format!("{{ addr = \"{}\", weight = 1 }}", b.addr)).collect();
    format!("endpoints = [{}]", v.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_load_fail_nothing_and_keep_health() {
    let (a, b, down) = (Backend::start("a").await, Backend::start("b").await, Backend::start("down").await);
    down.set_healthy(false);
    let health = "[upstreams.web.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nfall = 1\nrise = 1000\njitter = \"0\"";
    let cfg = |w: u32| {
        config(
            "",
            &format!(
                "endpoints = [{{ addr = \"{}\", weight = {w} }}, \"{}\", \"{}\"]\n{health}",
                a.addr, b.addr, down.addr
            ),
        )
    };
    let h = Halo::proxy(BIN, &cfg(1)).unwrap();
    let c = Client::new();
    let label = format!("halo_endpoint_up{{upstream=\"web\",endpoint=\"{}\"}} 0", down.addr);
    eventually(Duration::from_secs(10), "the failing endpoint is down", || async {
        c.get(&h.admin_url("/metrics")).await.unwrap().body.contains(&label)
    })
    .await;
    let load = Load::start(&h.url("main", "/"), 4);
    // Health checks open a connection each; count only proxied ones.
    let proxied_conns = || {
        [&a, &b].iter().map(|x| x.stats().connections.load(SeqCst) - x.stats().health_checks.load(SeqCst)).sum::<u64>()
    };
    let conns_before = proxied_conns();
    for i in 0..100u32 {
        h.write_config(&cfg(1 + i % 3));
        if i % 10 == 9 {
            // Some by signal, most through the admin API (which reports errors).
            h.signal("HUP");
        } else {
            let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Report { ok, failed } = load.finish().await;
    println!("requests during 100 reloads: ok {ok}, failed {}", failed.len());
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    assert!(ok > 200, "load was too light to mean anything: {ok}");
    // Health state survived: the down endpoint never came back (rise = 1000).
    assert_eq!(down.requests(), 0, "a reload reset the health of a down endpoint");
    // Pooled upstream connections survived: no reconnect storm.
    let conns_after = proxied_conns();
    assert!(conns_after - conns_before <= 16, "{} new upstream connections during reloads", conns_after - conns_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_drains_a_removed_endpoint_instead_of_cutting_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set_delay(Duration::from_millis(800));
    let h = Halo::proxy(BIN, &config("", &eps(&[&a, &b]))).unwrap();
    let url = h.url("main", "/");
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::no_pool().get(&url).await })
        })
        .collect();
    eventually(Duration::from_secs(5), "requests in flight on b", || async { b.requests() >= 1 }).await;
    h.write_config(&config("", &eps(&[&a])));
    let c = Client::new();
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let b_before = b.requests();
    for _ in 0..10 {
        assert_eq!(c.get(&url).await.unwrap().backend(), Some("a"), "a removed endpoint still gets new requests");
    }
    assert_eq!(b.requests(), b_before);
    for r in inflight {
        let r = r.await.unwrap().expect("an in-flight request was cut by the reload");
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_is_refused_and_traffic_continues() {
    let a = Backend::start("a").await;
    let good = config("", &eps(&[&a]));
    let h = Halo::proxy(BIN, &good).unwrap();
    let c = Client::new();
    let load = Load::start(&h.url("main", "/"), 2);
    h.write_config(&good.replace("[upstreams.web]", "[upstreams.web]\npolicy = \"fastest\""));
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("upstreams.web.policy") && r.body.contains("accepted: round_robin"), "{}", r.body);
    assert!(r.body.contains("proxy.toml:"), "the error names the file: {}", r.body);
    h.write_config("this is [not toml");
    h.signal("HUP");
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 400);
    // Moving the admin listener needs a restart, and says so.
    h.write_config(&good.replace("[admin]\nlisten = \"127.0.0.1:0\"", "[admin]\nlisten = \"127.0.0.1:1\""));
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("restart"), "{}", r.body);
    // A new listener on an address already taken: refused, nothing changes.
    let taken = h.admin.unwrap();
    h.write_config(
        &good.replace("[[routes]]", &format!("[[listeners]]\nname = \"clash\"\nlisten = \"{taken}\"\n[[routes]]")),
    );
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("bind new listener 'clash'"), "{}", r.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Report { ok, failed } = load.finish().await;
    assert!(failed.is_empty() && ok > 0, "ok {ok}, failed {:?}", failed.first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_listeners_live() {
    let a = Backend::start("a").await;
    let one = config("", &eps(&[&a]));
    let h = Halo::proxy(BIN, &one).unwrap();
    let main = h.listeners["main"];
    let extra = halo_testkit::free_addr();
    let two = one.replace("[[routes]]", &format!("[[listeners]]\nname = \"extra\"\nlisten = \"{extra}\"\n[[routes]]"));
    let c = Client::new();
    let reload = || async {
        let r = Client::new().send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    };
    h.write_config(&two);
    reload().await;
    assert_eq!(c.get(&format!("http://{extra}/")).await.unwrap().backend(), Some("a"));
    assert_eq!(c.get(&format!("http://{main}/")).await.unwrap().backend(), Some("a"));
    // Remove "main" while a request is in flight on it: the request finishes,
    // new connections to it are refused, "extra" keeps serving.
    a.set_delay(Duration::from_millis(500));
    let slow = tokio::spawn(async move { Client::no_pool().get(&format!("http://{main}/")).await });
    eventually(Duration::from_secs(5), "request in flight", || async { a.requests() >= 3 }).await;
    h.write_config(&two.replace("[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n", ""));
    reload().await;
    assert_eq!(slow.await.unwrap().unwrap().status, 200, "an in-flight request on a removed listener was cut");
    a.set_delay(Duration::ZERO);
    eventually(Duration::from_secs(5), "main stops accepting", || async {
        tokio::net::TcpStream::connect(main).await.is_err()
    })
    .await;
    assert_eq!(Client::no_pool().get(&format!("http://{extra}/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let a = Backend::start("a").await;
    let mut h = Halo::proxy(BIN, &config("[proxy]\ngrace_period = \"10s\"", &eps(&[&a]))).unwrap();
    let url = h.url("main", "/delay/800");
    let inflight: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Client::no_pool().get(&url).await })
        })
        .collect();
    eventually(Duration::from_secs(5), "requests reached the backend", || async { a.requests() == 3 }).await;
    h.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New connections are refused while the old ones finish.
    assert!(tokio::net::TcpStream::connect(h.listeners["main"]).await.is_err(), "still accepting after SIGTERM");
    for r in inflight {
        let r = r.await.unwrap().expect("in-flight request survived shutdown");
        assert_eq!(r.status, 200);
    }
    assert_eq!(tokio::task::spawn_blocking(move || h.wait(Duration::from_secs(10))).await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_request_ids() {
    let a = Backend::start("a").await;
    // Also runs the work-stealing runtime mode.
    let h = Halo::proxy(BIN, &config("[proxy]\nworkers = 2\nwork_stealing = true", &eps(&[&a]))).unwrap();
    let c = Client::new();
    let req = Request::get(h.url("main", "/echo"))
        .header("host", "shop.example.com")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "secret")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::default())
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    let up = a.last_headers().unwrap();
    assert_eq!(up["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(up["x-forwarded-proto"], "http");
    assert_eq!(up["x-forwarded-host"], "shop.example.com");
    assert_eq!(up["forwarded"], "for=127.0.0.1;proto=http;host=shop.example.com");
    assert_eq!(up["host"], "shop.example.com");
    assert!(!up.contains_key("x-drop-me"), "a header named in Connection was forwarded");
    let id = up["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(r.headers["x-request-id"], id.as_str(), "the response carries the generated id");
    let req = Request::get(h.url("main", "/echo")).header("x-request-id", "abc-123").body(Full::default()).unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(a.last_headers().unwrap()["x-request-id"], "abc-123");
    assert_eq!(r.headers["x-request-id"], "abc-123");
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    // The proxy must answer and close: read to EOF, bounded in time.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("connection was not closed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_chunked_and_bodiless_messages_stream_through() {
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("", &eps(&[&a]))).unwrap();
    let c = Client::new();
    // Large responses, with a length and chunked, several times on the same
    // pooled upstream connections.
    for _ in 0..3 {
        let r = c.get(&h.url("main", "/bytes/3000000")).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 3_000_000));
        assert!(r.body.bytes().all(|b| b == b'b'));
        let r = c.get(&h.url("main", "/chunked/2500000")).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 2_500_000));
        let r = c.get(&h.url("main", "/chunked/0")).await.unwrap();
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 0));
    }
    // A request body over the replay cap is streamed, not buffered.
    let big = Bytes::from(vec![b'u'; 1_500_000]);
    let r = c.send(Request::post(h.url("main", "/echo")).body(Full::new(big)).unwrap()).await.unwrap();
    assert!(r.body.contains("body-bytes: 1500000"), "{}", &r.body[r.body.len().saturating_sub(200)..]);
    // HEAD gets the headers and no body, and the connection stays usable.
    for _ in 0..3 {
        let r = c.send(Request::head(h.url("main", "/bytes/1000")).body(Full::default()).unwrap()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-length"], "1000");
        assert!(r.body.is_empty());
        assert_eq!(c.get(&h.url("main", "/status/204")).await.unwrap().status, 204);
        assert_eq!(c.get(&h.url("main", "/")).await.unwrap().body, "backend=a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests() {
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("[proxy]\nmax_header_bytes = 16384", &eps(&[&a]))).unwrap();
    let addr = h.listeners["main"];
    let r = raw(addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let r = raw(addr, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "x".repeat(64 * 1024));
    let r = raw(addr, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = raw(addr, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(a.requests(), 0, "no malformed request reached the backend");
    // And the proxy still serves.
    assert_eq!(Client::new().get(&h.url("main", "/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_downstream_and_h2_upstream() {
    let a = Backend::start("a").await;
    for protocol in ["http1", "h2"] {
        let h = Halo::proxy(BIN, &config("", &format!("{}\nprotocol = \"{protocol}\"", eps(&[&a])))).unwrap();
        let stream = tokio::net::TcpStream::connect(h.listeners["main"]).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for i in 0..5 {
            let req = Request::post(format!("http://test.local/echo?i={i}"))
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.headers()["x-backend"], "a");
            let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
            assert!(body.contains("body-bytes: 5"), "{protocol}: {body}");
            assert!(body.contains("host: test.local"), "{protocol}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_access_log() {
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("[proxy]\naccess_log = true", &eps(&[&a]))).unwrap();
    let c = Client::new();
    for _ in 0..3 {
        c.get(&h.url("main", "/")).await.unwrap();
    }
    c.get(&h.url("main", "/status/500")).await.unwrap();
    let m = c.get(&h.admin_url("/metrics")).await.unwrap().body;
    for want in [
        "halo_route_requests_total{route=\"r\",class=\"2xx\"} 3",
        "halo_route_requests_total{route=\"r\",class=\"5xx\"} 1",
        &format!("halo_endpoint_requests_total{{upstream=\"web\",endpoint=\"{}\",class=\"2xx\"}} 3", a.addr),
        "halo_route_request_duration_seconds_count{route=\"r\"} 4",
        "halo_listener_connections_active{listener=\"main\"}",
        &format!("halo_endpoint_up{{upstream=\"web\",endpoint=\"{}\"}} 1", a.addr),
        "halo_route_retries_total{route=\"r\"} 0",
        "halo_upstream_requests_total{upstream=\"web\",class=\"2xx\"} 3",
        "halo_upstream_requests_total{upstream=\"web\",class=\"5xx\"} 1",
        "halo_upstream_request_duration_seconds_count{upstream=\"web\"} 4",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    let mut lines = Vec::new();
    eventually(Duration::from_secs(5), "4 access log lines", || {
        lines.extend(h.stdout_lines());
        let n = lines.iter().filter(|l| l.starts_with('{')).count();
        async move { n >= 4 }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(lines.iter().find(|l| l.contains("/status/500")).unwrap()).unwrap();
    assert_eq!(v["status"], 500);
    assert_eq!(v["route"], "r");
    assert_eq!(v["upstream"], "web");
    assert_eq!(v["endpoint"], a.addr.to_string());
    assert_eq!(v["request_id"].as_str().unwrap().len(), 32);
}

#[test]
fn check_reports_errors_with_file_and_line() {
    let dir = TempDir::new("check");
    let bad = dir.write("bad.toml", "[[listeners]]\nlisten = \"127.0.0.1:80\"\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"nowhere\"]\n");
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:6: upstreams.web.endpoints[0]") && err.contains("expected IP:PORT"), "{err}");
    for example in ["proxy.toml", "tcp.toml", "tls.toml"] {
        let path = format!("{}/../../examples/{example}", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(BIN).args(["check", "-c", &path]).output().unwrap();
        assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_mode_balances_over_backends() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = TempDir::new("flags");
    let (aa, ba) = (a.addr.to_string(), b.addr.to_string());
    let args = [
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &aa,
        "--backend",
        &ba,
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
    ];
    let h = Halo::start(BIN, &args, &dir.0).unwrap();
    let c = Client::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(c.get(&h.url("main", "/")).await.unwrap().backend().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2);
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--backend", "localhost"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected IP:PORT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_an_error_naming_the_holder_not_a_silent_share() {
    let a = Backend::start("a").await;
    let port = halo_testkit::free_addr().port();
    let cfg = config("[proxy]\nworkers = 2", &eps(&[&a]))
        .replace("listen = \"127.0.0.1:0\"\n[[routes]]", &format!("listen = \"127.0.0.1:{port}\"\n[[routes]]"));
    let first = Halo::proxy(BIN, &cfg).unwrap();
    assert_eq!(first.listeners["main"].port(), port);
    // A second halo on the same address exits at once and says who has it.
    let dir = TempDir::new("second");
    let path = dir.write("proxy.toml", &cfg);
    let out = std::process::Command::new(BIN).args(["proxy", "-c", &path.to_string_lossy()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second proxy started: {err}");
    let want = format!("127.0.0.1:{port} is in use by pid {}", first.pid());
    assert!(err.contains(&want) && err.contains("halo proxy"), "{err}");
    // A program that is not halo holding the port is named the same way.
    drop(first);
    let other = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = std::process::Command::new(BIN).args(["proxy", "-c", &path.to_string_lossy()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port} is in use by pid {}", std::process::id())), "{err}");
    drop(other);
    // Every request reaches the one proxy that holds the port.
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let c = Client::new();
    for _ in 0..20 {
        assert_eq!(c.get(&h.url("main", "/")).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_break_rfc_9112_get_400_and_connect_is_refused() {
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("", &eps(&[&a]))).unwrap();
    let addr = h.listeners["main"];
    let cases: [(&[u8], &str, &str); 6] = [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400", "needs a Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400", "more than one Host header"),
        (
            b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
            "HTTP/1.1 400",
            "differs from the request target",
        ),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "HTTP/1.1 405", "does not open tunnels"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
            "both Transfer-Encoding and Content-Length",
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", "HTTP/1.1 400", "invalid Content-Length"),
    ];
    for (req, status, why) in cases {
        let r = raw(addr, req).await;
        assert!(r.starts_with(status) && r.contains(why), "{}:\n{r}", String::from_utf8_lossy(req));
    }
    assert_eq!(a.requests(), 0, "a request breaking RFC 9112 reached the backend");
    // HTTP/1.0 may omit Host; an absolute-form target whose authority is the Host is fine.
    let r = raw(addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(r.contains(" 200 ") && r.contains("backend=a"), "{r}");
    let r = raw(addr, b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // An HTTP/1.0 upstream's answer reaches an HTTP/1.1 client as HTTP/1.1.
    let old = halo_testkit::canned_upstream(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nold server\n").await;
    let h10 =
        Halo::proxy(BIN, &config("", &format!("endpoints = [\"{old}\"]\n[upstreams.web.health]\nenabled = false")))
            .unwrap();
    let r = raw(h10.listeners["main"], b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("old server\n"), "{r}");
}

/// Reads from `s` until `want` has arrived (bounded in time).
async fn read_until(s: &mut tokio::net::TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains(want) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("answer in time").unwrap();
        assert!(n > 0, "closed before {want:?}: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_codec_pipelines_in_order_continues_streams_and_keeps_connections() {
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("", &eps(&[&a]))).unwrap();
    let addr = h.listeners["main"];
    // Three pipelined requests in one write: answered in order.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let pipelined = "GET /bytes/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/22 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/333 HTTP/1.1\r\nHost: a\r\n\r\n";
    s.write_all(pipelined.as_bytes()).await.unwrap();
    let got = read_until(&mut s, "content-length: 333").await;
    let order: Vec<usize> = ["content-length: 1\r\n", "content-length: 22\r\n", "content-length: 333\r\n"]
        .iter()
        .map(|l| got.find(l).unwrap_or_else(|| panic!("{l:?} missing in {got}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order: {got}");
    // Expect: 100-continue gets its interim answer before the body is sent.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
    read_until(&mut s, "HTTP/1.1 100 Continue\r\n\r\n").await;
    s.write_all(b"hello").await.unwrap();
    read_until(&mut s, "body-bytes: 5").await;
    // A chunked body past the replay cap streams through, in pieces.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    for _ in 0..20 {
        s.write_all(format!("{:x}\r\n{}\r\n", 10_000, "y".repeat(10_000)).as_bytes()).await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    read_until(&mut s, "body-bytes: 200000").await;
    // A body nobody reads (no route for it) is drained; the connection goes on.
    let h2 = Halo::proxy(
        BIN,
        &config("", &eps(&[&a]))
            .replace("[[routes]]\nname = \"r\"", "[[routes]]\nname = \"r\"\nhost = \"only.example\""),
    )
    .unwrap();
    let mut s = tokio::net::TcpStream::connect(h2.listeners["main"]).await.unwrap();
    let body = "z".repeat(3000);
    s.write_all(format!("POST / HTTP/1.1\r\nHost: other\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    read_until(&mut s, "no route matches").await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: only.example\r\n\r\n").await.unwrap();
    read_until(&mut s, "backend=a").await;
    // HTTP/1.0 with keep-alive keeps the connection; the answers are HTTP/1.1.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
        let r = read_until(&mut s, "backend=a").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.to_ascii_lowercase().contains("connection: keep-alive"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_binary_upgrades_under_load_fail_nothing_and_keep_endpoint_health() {
    let (a, b, down) = (Backend::start("a").await, Backend::start("b").await, Backend::start("down").await);
    down.set_healthy(false);
    let health = "[upstreams.web.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nfall = 1\nrise = 1000\njitter = \"0\"";
    let cfg = config("[proxy]\ngrace_period = \"2s\"", &format!("{}\n{health}", eps(&[&a, &b, &down])));
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let path = h.config.clone().unwrap();
    let c = Client::new();
    let label = format!("halo_endpoint_up{{upstream=\"web\",endpoint=\"{}\"}} 0", down.addr);
    eventually(Duration::from_secs(10), "the failing endpoint is down", || async {
        c.get(&h.admin_url("/metrics")).await.unwrap().body.contains(&label)
    })
    .await;
    let mut reaper = Reaper::default();
    let load = Load::start(&h.url("main", "/"), 64);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut serving = h.pid();
    for i in 0..10 {
        let pid = upgrade(BIN, &["-c".as_ref(), path.as_os_str()]).unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        reaper.0.push(pid);
        assert_ne!(pid, serving);
        let old = serving;
        eventually(Duration::from_secs(15), "the old process drained and exited", || async move { !alive(old) }).await;
        serving = pid;
        // The health the old process had: the failing endpoint is still
        // down in the new one (rise = 1000: it could not have come back).
        assert!(c.get(&h.admin_url("/metrics")).await.unwrap().body.contains(&label), "upgrade {i} reset health");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Report { ok, failed } = load.finish().await;
    println!("requests across 10 binary upgrades (64 connections): ok {ok}, failed {}", failed.len());
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    assert!(ok > 1000, "load too light to mean anything: {ok}");
    assert_eq!(down.requests(), 0, "an upgrade sent traffic to a down endpoint");
    // An upgrade whose new process cannot start changes nothing.
    std::fs::write(&path, "[[listeners]]\nlisten = \"nope\"\n").unwrap();
    let out = std::process::Command::new(BIN).args(["upgrade", "-c"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("exited before taking over"), "{err}");
    assert!(alive(serving));
    assert_eq!(c.get(&h.url("main", "/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_manager_hears_ready_and_the_new_main_pid_after_an_upgrade() {
    // What systemd's $NOTIFY_SOCKET receives (this test's process only:
    // nextest runs each test alone in its process).
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &sock_path);
    let a = Backend::start("a").await;
    let h = Halo::proxy(BIN, &config("", &eps(&[&a]))).unwrap();
    let mut reaper = Reaper::default();
    let recv = |sock: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(&sock), "READY=1\n");
    let path = h.config.clone().unwrap();
    let pid = upgrade(BIN, &["-c".as_ref(), path.as_os_str()]).unwrap();
    reaper.0.push(pid);
    assert_eq!(recv(&sock), format!("MAINPID={pid}\nREADY=1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_recipe_serves_backends_that_have_no_healthz() {
    // The README puts `python3 -m http.server` behind examples/proxy.toml:
    // it answers / but not /healthz, and the example's checks must pass.
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.set_healthy(false);
    b.set_healthy(false);
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let cfg = std::fs::read_to_string(format!("{examples}/proxy.toml"))
        .unwrap()
        .replace("127.0.0.1:9001", &a.addr.to_string())
        .replace("127.0.0.1:9002", &b.addr.to_string())
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("\"certs/", &format!("\"{examples}/certs/"));
    let h = Halo::proxy(BIN, &cfg).unwrap();
    // fall = 3 checks 2 s apart: a failing check would have taken both
    // endpoints out (503) by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let c = Client::new();
    for _ in 0..10 {
        assert_eq!(c.get(&h.url("http", "/")).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_a_token_and_other_hosts_need_one() {
    use std::os::unix::fs::PermissionsExt;
    let a = Backend::start("a").await;
    let dir = TempDir::new("admin-token");
    let token_file = dir.write("admin.token", "0123456789abcdef0123\n");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = config("", &eps(&[&a])).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"", token_file.display()),
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let c = Client::new();
    assert_eq!(c.get(&h.admin_url("/healthz")).await.unwrap().status, 200, "health needs no token");
    let r = c.get(&h.admin_url("/metrics")).await.unwrap();
    assert!(r.status == 401 && r.body.contains("Authorization: Bearer"), "{} {}", r.status, r.body);
    let ask = |method: &str, path: &str, token: &str| {
        Request::builder()
            .method(method)
            .uri(h.admin_url(path))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    assert_eq!(c.send(ask("GET", "/metrics", "0123456789abcdef0123")).await.unwrap().status, 200);
    assert_eq!(c.send(ask("POST", "/reload", "wrong-token-wrong-token")).await.unwrap().status, 401);
    assert_eq!(c.send(ask("POST", "/reload", "0123456789abcdef0123")).await.unwrap().status, 200);
    // A token file others can read, and an admin API other hosts reach
    // without one, are refused naming why.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = dir.write("loose.toml", &cfg);
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&loose).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("admin.token_file") && err.contains("chmod 600"), "{err}");
    let open = dir.write(
        "open.toml",
        &config("", &eps(&[&a]))
            .replace("listen = \"127.0.0.1:0\"\n[[listeners]]", "listen = \"0.0.0.0:0\"\n[[listeners]]"),
    );
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&open).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("admin.listen") && err.contains("reachable from other hosts"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["proxy", "--listen", "127.0.0.1:0", "--backend", &a.addr.to_string(), "--admin", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("admin.token_file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_can_speak_https_only() {
    let a = Backend::start("a").await;
    let dir = TempDir::new("admin-tls");
    let ca = halo_testkit::TestCa::new();
    let (cert, key) = ca.issue(&["localhost"]).write(&dir, "admin");
    let tls = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[admin.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]",
        cert.display(),
        key.display()
    );
    let h = Halo::proxy(BIN, &config("", &eps(&[&a])).replace("[admin]\nlisten = \"127.0.0.1:0\"", &tls)).unwrap();
    let admin = h.admin.expect("the admin address");
    let client = ca.client(&[b"http/1.1"]);
    let r = halo_testkit::https_get(admin, "localhost", "/metrics", &client).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("halo_route_requests_total"), "{}", r.body);
    // Plain HTTP gets no admin answer.
    let plain = Client::new().get(&h.admin_url("/metrics")).await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 200), "{plain:?}");
    // A certificate file that does not exist is named.
    let bad = dir.write(
        "bad.toml",
        &config("", &eps(&[&a])).replace("[admin]\nlisten = \"127.0.0.1:0\"", &tls.replace("admin.crt", "missing.crt")),
    );
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("admin.tls.certificates[0]") && err.contains("missing.crt"), "{err}");
}
