//! A demo HTTP backend on a real socket.
//!
//! Paths: `/healthz` (200, or 503 once [`Backend::set_healthy`] is false),
//! `/status/NNN` (answers NNN), `/delay/MS` (answers after MS), `/echo`
//! (request line and headers as the body), `/bytes/N` (N bytes, with a
//! length), `/chunked/N` (N bytes in 16 KiB chunks, no length: chunked
//! encoding), anything else (`backend=NAME`).
//! Every response carries `x-backend: NAME`. [`Backend::set_status`] makes
//! every non-health path answer with a fixed status, [`Backend::set_fail_every`]
//! one request in N answer 500.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Default)]
pub struct BackendStats {
    pub requests: AtomicU64,
    pub health_checks: AtomicU64,
    pub connections: AtomicU64,
    /// Requests by method, counting only non-health paths.
    pub posts: AtomicU64,
}

struct State {
    name: String,
    healthy: AtomicBool,
    status: AtomicU16,
    delay_ms: AtomicU64,
    /// Every this many non-health requests, one answers 500 (0: none).
    fail_every: AtomicU64,
    stats: BackendStats,
    last_headers: Mutex<Option<http::HeaderMap>>,
}

pub struct Backend {
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend on a free loopback port.
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Like [`Backend::start`], with an owned name (for spawning).
    pub async fn start_owned(name: String) -> Backend {
        Self::start(&name).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let state = Arc::new(State {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            status: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
            fail_every: AtomicU64::new(0),
            stats: BackendStats::default(),
            last_headers: Mutex::new(None),
        });
        let mut b = Backend { addr, state, tasks: Arc::new(Mutex::new(JoinSet::new())), accept: None };
        b.listen(addr).await;
        b
    }

    async fn listen(&mut self, addr: SocketAddr) {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        self.addr = listener.local_addr().expect("addr");
        let state = self.state.clone();
        let tasks = self.tasks.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                state.stats.connections.fetch_add(1, SeqCst);
                let state = state.clone();
                tasks.lock().expect("tasks").spawn(async move {
                    let svc = service_fn(move |req| handle(state.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        }));
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn stats(&self) -> &BackendStats {
        &self.state.stats
    }

    /// Requests served, health checks excluded.
    pub fn requests(&self) -> u64 {
        self.state.stats.requests.load(SeqCst)
    }

    pub fn set_healthy(&self, up: bool) {
        self.state.healthy.store(up, SeqCst);
    }

    /// Every non-health request answers `status` (0 restores normal answers).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, SeqCst);
    }

    /// One non-health request in `n` answers 500, the others as usual (a
    /// gray failure; 0 stops it).
    pub fn set_fail_every(&self, n: u64) {
        self.state.fail_every.store(n, SeqCst);
    }

    /// Every non-health request waits this long first.
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, SeqCst);
    }

    /// Headers of the last non-health request.
    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.state.last_headers.lock().expect("headers").clone()
    }

    /// Stops listening and drops every open connection at once, like a
    /// crashed process.
    pub fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.tasks.lock().expect("tasks").abort_all();
    }

    /// Listens again on the same address after [`Backend::kill`].
    pub async fn restart(&mut self) {
        let addr = self.addr;
        for _ in 0..100 {
            if std::net::TcpListener::bind(addr).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.listen(addr).await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A body of `left` bytes in 16 KiB frames whose length is not announced.
struct Chunks {
    left: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let n = self.left.min(16 * 1024);
        self.left -= n;
        std::task::Poll::Ready((n > 0).then(|| Ok(http_body::Frame::data(Bytes::from(vec![b'c'; n])))))
    }
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let name = state.name.clone();
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|s| s.parse::<usize>().ok()) {
        state.stats.requests.fetch_add(1, SeqCst);
        let mut r = Response::new(Full::new(Bytes::from(vec![b'b'; n])).boxed_unsync());
        r.headers_mut().insert("x-backend", name.parse().expect("name"));
        return Ok(r);
    }
    if let Some(n) = path.strip_prefix("/chunked/").and_then(|s| s.parse::<usize>().ok()) {
        state.stats.requests.fetch_add(1, SeqCst);
        let mut r = Response::new(Chunks { left: n }.boxed_unsync());
        r.headers_mut().insert("x-backend", name.parse().expect("name"));
        return Ok(r);
    }
    let reply = |status: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert("x-backend", state.name.parse().expect("name"));
        Ok(r)
    };
    if path == "/healthz" {
        state.stats.health_checks.fetch_add(1, SeqCst);
        return if state.healthy.load(SeqCst) { reply(200, "ok".into()) } else { reply(503, "down".into()) };
    }
    let nth = state.stats.requests.fetch_add(1, SeqCst) + 1;
    let every = state.fail_every.load(SeqCst);
    if every > 0 && nth.is_multiple_of(every) {
        return reply(500, format!("backend={} failed one in {every}", state.name));
    }
    if req.method() == http::Method::POST {
        state.stats.posts.fetch_add(1, SeqCst);
    }
    *state.last_headers.lock().expect("headers") = Some(req.headers().clone());
    let delay = state.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fixed = state.status.load(SeqCst);
    if fixed != 0 {
        return reply(fixed, format!("backend={} status={fixed}", state.name));
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|s| s.parse().ok()) {
        return reply(code, format!("backend={}", state.name));
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|s| s.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return reply(200, format!("backend={}", state.name));
    }
    if path == "/echo" {
        let mut s = format!("{} {}\n", req.method(), req.uri());
        for (k, v) in req.headers() {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        s.push_str(&format!("body-bytes: {}\n", body.len()));
        return reply(200, s);
    }
    reply(200, format!("backend={}", state.name))
}

/// An upstream that answers every connection's first read with `reply`,
/// byte for byte, and closes: for answers no HTTP server would give.
pub async fn canned_upstream(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            });
        }
    });
    addr
}
