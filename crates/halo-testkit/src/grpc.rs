//! A gRPC server and client on the real wire protocol (HTTP/2,
//! length-prefixed messages, the status in trailers), for calls through
//! the proxy: `/halo.test.Echo/Unary`, `/halo.test.Echo/Stream` (every
//! message answered as it arrives), `/halo.test.Echo/Fail` (a
//! trailers-only NOT_FOUND), `/halo.test.Echo/FailLate` (a message, then
//! INTERNAL in the trailers) and `grpc.health.v1.Health/Check`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// A body fed through a channel, frame by frame.
pub struct ChanBody(pub mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// One length-prefixed message.
pub fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Takes whole messages off the front of `buf`.
fn messages(buf: &mut BytesMut) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).to_vec());
    }
    out
}

fn status_trailers(code: &str, message: Option<&str>, name: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_str(code).expect("code"));
    if let Some(m) = message {
        t.insert("grpc-message", HeaderValue::from_str(m).expect("message"));
    }
    t.insert("x-served-by", HeaderValue::from_str(name).expect("name"));
    t
}

pub struct GrpcServer {
    pub addr: SocketAddr,
    serving: Arc<AtomicBool>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl GrpcServer {
    pub async fn start(name: &str) -> GrpcServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC server");
        let addr = listener.local_addr().expect("addr");
        let serving = Arc::new(AtomicBool::new(true));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let name: Arc<str> = name.into();
        let accept = {
            let (serving, tasks) = (serving.clone(), tasks.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else { continue };
                    let (serving, name) = (serving.clone(), name.clone());
                    tasks.lock().expect("tasks").spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let (serving, name) = (serving.clone(), name.clone());
                            async move { Ok::<_, Infallible>(handle(req, &name, serving.load(SeqCst))) }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            })
        };
        GrpcServer { addr, serving, tasks, accept: Some(accept) }
    }

    /// What health checks hear: SERVING or NOT_SERVING.
    pub fn set_serving(&self, up: bool) {
        self.serving.store(up, SeqCst);
    }

    pub fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.tasks.lock().expect("tasks").abort_all();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn handle(req: Request<Incoming>, name: &str, serving: bool) -> Response<ChanBody> {
    let (tx, rx) = mpsc::channel(16);
    let path = req.uri().path().to_string();
    let name = name.to_string();
    let mut resp = Response::new(ChanBody(rx));
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    if path == "/halo.test.Echo/Fail" {
        // Trailers-only: the status in the head, no body.
        for (k, v) in &status_trailers("5", Some("not found here"), &name) {
            resp.headers_mut().insert(k, v.clone());
        }
        drop(tx);
        return resp;
    }
    tokio::spawn(async move {
        let mut body = req.into_body();
        let mut buf = BytesMut::new();
        while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            for m in messages(&mut buf) {
                let reply = match path.as_str() {
                    "/grpc.health.v1.Health/Check" => vec![0x08, if serving { 1 } else { 2 }],
                    _ => [name.as_bytes(), b":", &m].concat(),
                };
                if tx.send(Frame::data(message(&reply))).await.is_err() {
                    return;
                }
            }
        }
        let trailers = match path.as_str() {
            "/halo.test.Echo/FailLate" => status_trailers("13", Some("failed late"), &name),
            "/halo.test.Echo/Unary" | "/halo.test.Echo/Stream" | "/grpc.health.v1.Health/Check" => {
                status_trailers("0", None, &name)
            }
            _ => status_trailers("12", Some("unimplemented"), &name),
        };
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    resp
}

/// What a call got back.
#[derive(Debug)]
pub struct GrpcReply {
    pub status: u16,
    pub headers: HeaderMap,
    /// The messages, each with when it arrived.
    pub messages: Vec<(Vec<u8>, Instant)>,
    pub trailers: Option<HeaderMap>,
}

impl GrpcReply {
    /// The call's grpc-status: from the trailers, or the head of a
    /// trailers-only answer.
    pub fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }
}

/// Calls `path` over h2c (prior knowledge) on `to`, sending `payloads`
/// with `gap` between them; returns when the call ended, and when each
/// message was sent.
pub async fn grpc_call(
    to: SocketAddr,
    path: &str,
    payloads: &[&[u8]],
    gap: Duration,
) -> Result<(GrpcReply, Vec<Instant>), String> {
    let tcp = TcpStream::connect(to).await.map_err(|e| format!("connect: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(16);
    let req = Request::post(format!("http://grpc.test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(ChanBody(rx))
        .map_err(|e| e.to_string())?;
    let payloads: Vec<Bytes> = payloads.iter().map(|p| message(p)).collect();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::new();
        for (i, p) in payloads.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            sent.push(Instant::now());
            if tx.send(Frame::data(p)).await.is_err() {
                break;
            }
        }
        sent
    });
    let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let (parts, mut body) = resp.into_parts();
    let mut reply =
        GrpcReply { status: parts.status.as_u16(), headers: parts.headers, messages: Vec::new(), trailers: None };
    let mut buf = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        match frame.into_data() {
            Ok(d) => {
                buf.extend_from_slice(&d);
                let now = Instant::now();
                reply.messages.extend(messages(&mut buf).into_iter().map(|m| (m, now)));
            }
            Err(f) => reply.trailers = f.into_trailers().ok(),
        }
    }
    let sent = sender.await.map_err(|e| e.to_string())?;
    Ok((reply, sent))
}
