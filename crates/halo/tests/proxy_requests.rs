//! Requests shaped to make the proxy and its upstream disagree, through
//! the real binary: every request has one authority (the one it is routed
//! by is the one the upstream receives) in HTTP/1.0, HTTP/1.1 and h2; a
//! path is routed as the upstream will resolve it (dot segments and their
//! escapes); headers a client names in `Connection` never take Host or
//! the request id away; heads with a bare LF are refused.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use halo_testkit::{Backend, Halo};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// Routes: host a.example to `a`, `/public` to `public`, the rest to
/// `rest`; listener `main` normalises paths, `raw` does not, `strict`
/// refuses encoded slashes.
fn config(a: &Backend, public: &Backend, rest: &Backend) -> String {
    format!(
        "[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"raw\"\nlisten = \"127.0.0.1:0\"\npath_normalization = \"off\"\n\
         [[listeners]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\npath_normalization = \"merge_slashes\"\n\
         encoded_slashes = \"refuse\"\n\
         [[routes]]\nname = \"a\"\nhost = \"a.example\"\nupstream = \"a\"\n\
         [[routes]]\nname = \"public\"\npath_prefix = \"/public\"\nupstream = \"public\"\n\
         [[routes]]\nname = \"rest\"\nupstream = \"rest\"\n\
         [upstreams.a]\nendpoints = [\"{}\"]\n[upstreams.public]\nendpoints = [\"{}\"]\n\
         [upstreams.rest]\nendpoints = [\"{}\"]\n",
        a.addr, public.addr, rest.addr
    )
}

/// The three backends of [`config`] and the proxy in front of them.
async fn routed() -> ([Backend; 3], Halo) {
    let (a, public, rest) = (Backend::start("a").await, Backend::start("public").await, Backend::start("rest").await);
    let h = Halo::proxy(BIN, &config(&a, &public, &rest)).unwrap();
    ([a, public, rest], h)
}

/// Sends `raw` and reads the answer until the proxy closes the connection.
async fn exchange(to: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no close within 10s after {raw:?}: {}", String::from_utf8_lossy(&out)))
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// One h2 (prior knowledge) request with `uri` and extra headers; the
/// status and body.
async fn h2(to: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(to).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn status(answer: &str) -> &str {
    answer.split(' ').nth(1).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_per_request_in_every_http_version() {
    let ([a, _public, rest], h) = routed().await;
    let to = h.listeners["main"];

    // An absolute-form target naming another host than Host: refused in
    // HTTP/1.0 as in HTTP/1.1 (it was routed by one and forwarded with the
    // other).
    for version in ["1.0", "1.1"] {
        let r = exchange(to, &format!("GET http://a.example/echo HTTP/{version}\r\nHost: b.example\r\n\r\n")).await;
        assert_eq!(status(&r), "400", "HTTP/{version}: {r}");
        assert!(r.contains("differs"), "{r}");
        let r = exchange(to, &format!("GET /echo HTTP/{version}\r\nHost: a.example\r\nHost: b.example\r\n\r\n")).await;
        assert_eq!(status(&r), "400", "two Hosts, HTTP/{version}: {r}");
    }
    assert_eq!(a.requests() + rest.requests(), 0, "a refused request reached an upstream");

    // HTTP/1.0 with the authority only in the target: routed by it, and the
    // upstream gets it as Host.
    let r = exchange(to, "GET http://a.example/echo HTTP/1.0\r\n\r\n").await;
    assert!(r.contains("200 OK") && r.contains("host: a.example\n"), "{r}");

    // Host, and the request id, stay when the client names them in
    // Connection; a header it names that is its own goes.
    let r = exchange(
        to,
        "GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close, host, x-request-id, x-mine\r\n\
         X-Request-Id: rid-1\r\nX-Mine: 1\r\n\r\n",
    )
    .await;
    assert!(r.contains("200 OK"), "{r}");
    assert!(r.contains("host: a.example\n") && r.contains("x-request-id: rid-1\n"), "{r}");
    assert!(!r.contains("x-mine"), "a header named in Connection was forwarded: {r}");

    // h2: a Host beside :authority must agree with it.
    let (code, body) = h2(to, "http://a.example/echo", &[("host", "b.example")]).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = h2(to, "http://a.example/echo", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("host: a.example\n") || body.contains("http://a.example/echo"), "{body}");
    assert_eq!(a.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_routed_and_forwarded_as_the_upstream_resolves_them() {
    let ([_a, public, _rest], h) = routed().await;
    let to = h.listeners["main"];

    // A dot segment, plain or escaped in either case, never matches the
    // /public route: the request is for /echo, and /echo is what is sent.
    for path in ["/public/../echo", "/public/%2e%2e/echo", "/public/%2E%2E/echo", "/public/.%2e/echo"] {
        for version in ["1.0", "1.1"] {
            let r = exchange(to, &format!("GET {path} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n")).await;
            assert!(r.contains("200 OK") && r.contains("x-backend: rest"), "{path} HTTP/{version}: {r}");
            assert!(r.contains("GET /echo\n"), "{path} HTTP/{version} was not forwarded as /echo: {r}");
        }
        let (code, body) = h2(to, &format!("http://x{path}"), &[]).await;
        assert_eq!(code, 200, "{path} h2: {body}");
        assert!(body.starts_with("GET http://x/echo\n") || body.starts_with("GET /echo\n"), "{path} h2: {body}");
    }
    assert_eq!(public.requests(), 0, "a dot segment reached the /public upstream");
    // Escaped unreserved characters are decoded; the query is left alone.
    let r = exchange(to, "GET /%65cho?q=%2e%2e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.contains("GET /echo?q=%2e%2e/x\n"), "{r}");
    // A malformed escape is a client error.
    let r = exchange(to, "GET /public/%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&r), "400", "{r}");

    // path_normalization = "off": matched and forwarded as sent.
    let r = exchange(h.listeners["raw"], "GET /public/../echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.contains("x-backend: public"), "{r}");
    assert_eq!(public.requests(), 1);
    // encoded_slashes = "refuse" and merged slashes.
    let strict = h.listeners["strict"];
    let r = exchange(strict, "GET /public%2F..%2Fecho HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&r), "400", "{r}");
    assert!(r.contains("%2F"), "{r}");
    let r = exchange(strict, "GET //public//..//echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(r.contains("GET /echo\n"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_and_chunk_lines_end_in_crlf() {
    let (_backends, h) = routed().await;
    let to = h.listeners["main"];
    for raw in ["GET /echo HTTP/1.1\nHost: x\n\n", "GET /echo HTTP/1.1\r\nHost: x\nX: 1\r\n\r\n"] {
        let r = exchange(to, raw).await;
        assert_eq!(status(&r), "400", "{raw:?}: {r}");
        assert!(r.contains("bare LF"), "{r}");
    }
    // A LF inside a chunk extension: the body is refused where the line is
    // read (the head may have gone ahead, streamed) and the connection closed.
    let r = exchange(
        to,
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5;ext\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(!r.contains("200 OK") && !r.contains("body-bytes: 5"), "a chunk line with a bare LF was accepted: {r}");
}

/// A client that stops reading a large response is closed after the send
/// timeout, and what it held upstream (a connection, the upstream's only
/// in-flight place) is released for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_releases_its_upstream() {
    let web = Backend::start("web").await;
    let cfg = format!(
        "[proxy]\nsend_timeout = \"2s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\nmax_in_flight = 1\n",
        web.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let to = h.listeners["main"];
    // 64 MiB: far more than the socket buffers hold, and never read.
    let mut stuck = TcpStream::connect(to).await.unwrap();
    stuck.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let c = halo_testkit::Client::new();
    // It reached the upstream (a count that only grows), then its place
    // was given back: nothing else is in flight.
    halo_testkit::eventually(Duration::from_secs(30), "the stuck request at the upstream", || async {
        web.requests() >= 1
    })
    .await;
    halo_testkit::eventually(Duration::from_secs(30), "the stuck client's place released", || async {
        halo_testkit::metric(&c, &h, "halo_upstream_in_flight").await == 0.0
    })
    .await;
    assert_eq!(c.get(&h.url("main", "/")).await.unwrap().status, 200);
    // It was cut: what is left to read is what the socket buffers held,
    // then the end, never the whole body.
    let (mut got, mut buf) = (0usize, vec![0u8; 1 << 16]);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stuck.read(&mut buf))
            .await
            .expect("the stuck client's connection is still open")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 64 << 20, "the whole body was delivered: the connection was never cut");
}

/// A request body must arrive whole within request_body_timeout, however
/// steadily its bytes trickle in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_cut_at_the_total_timeout() {
    let web = Backend::start("web").await;
    let cfg = format!(
        "[proxy]\nrequest_body_timeout = \"2s\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\n",
        web.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let mut s = TcpStream::connect(h.listeners["main"]).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    // A byte every 200 ms would take 5.5 hours; the proxy must give up.
    let trickle = async {
        for _ in 0..600 {
            if s.write_all(b"x").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    let cut = tokio::time::timeout(Duration::from_secs(60), trickle).await;
    assert!(matches!(cut, Ok(true)), "the trickled body was never cut");

    // The same over HTTP/2: the stream gets an error answer or a reset.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(h.listeners["main"]).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let feed = tokio::spawn(async move {
        for _ in 0..600 {
            if tx.send(hyper::body::Frame::data(Bytes::from_static(b"x"))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let req = http::Request::post("http://x/echo").body(halo_testkit::ChanBody(rx)).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), send.send_request(req)).await;
    feed.abort();
    match answer {
        Ok(Ok(r)) => assert!(!r.status().is_success(), "a trickled h2 body was accepted: {}", r.status()),
        Ok(Err(_)) => {}
        Err(_) => panic!("the trickled h2 body was never cut"),
    }
}

/// An HTTP/2 connection that starts no stream for keepalive_idle is closed
/// (GOAWAY), though its client answers every ping; one kept busy is
/// retired at max_connection_age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_idle_out_and_age_out() {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let web = Backend::start("web").await;
    let cfg = format!(
        "[proxy]\nkeepalive_idle = \"1s\"\nmax_connection_age = \"3s\"\n\
         [[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"{}\"]\n",
        web.addr
    );
    let h = Halo::proxy(BIN, &cfg).unwrap();
    let to = h.listeners["main"];
    let connect = || async move {
        let io = TokioIo::new(TcpStream::connect(to).await.unwrap());
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .unwrap();
        (send, tokio::spawn(conn))
    };
    let get = || http::Request::get("http://x/").body(Empty::<Bytes>::new()).unwrap();

    let (mut send, ended) = connect().await;
    assert_eq!(send.send_request(get()).await.unwrap().status(), 200);
    let closed = tokio::time::timeout(Duration::from_secs(30), ended).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection stayed open for 30 s");

    let (mut send, _ended) = connect().await;
    let busy = async {
        for _ in 0..150 {
            if send.ready().await.is_err() || send.send_request(get()).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    let retired = tokio::time::timeout(Duration::from_secs(40), busy).await;
    assert!(matches!(retired, Ok(true)), "a busy HTTP/2 connection was never retired");
}
