//! The client against a scripted upstream on a real socket.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::decode::Step;

/// An upstream that answers each request it reads with the next script entry
/// and returns what it received.
async fn upstream(script: Vec<&'static [u8]>) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut seen = Vec::new();
        for answer in script {
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                if n == 0 || seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            s.write_all(answer).await.unwrap();
        }
        seen
    });
    (addr, h)
}

async fn send(
    c: &mut H1Conn,
    (parts, body): (http::request::Parts, ProxyBody),
) -> Result<ResponseHead, (ClientError, Option<ProxyBody>)> {
    c.send(&parts, body).await
}

async fn conn(addr: std::net::SocketAddr) -> H1Conn {
    H1Conn::new(crate::tls::client::UpIo::Plain(TcpStream::connect(addr).await.unwrap()), Arc::new(AtomicUsize::new(0)))
}

async fn body(c: &mut H1Conn, mut d: Decoder) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        match d.step(&mut c.buf).unwrap() {
            Step::Data(b) => out.extend_from_slice(&b),
            Step::End => return out,
            Step::More => {
                let n = std::future::poll_fn(|cx| c.poll_fill(cx)).await.unwrap();
                if n == 0 {
                    assert_eq!(d, Decoder::UntilClose, "truncated body");
                    return out;
                }
            }
        }
    }
}

fn get(path: &str) -> (http::request::Parts, ProxyBody) {
    Request::get(path).header("host", "up").body(ProxyBody::Empty).unwrap().into_parts()
}

#[tokio::test]
async fn keep_alive_exchanges_on_one_connection() {
    let (addr, _) = upstream(vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nrest until close",
    ])
    .await;
    let mut c = conn(addr).await;
    let h = send(&mut c, get("/a")).await.map_err(|e| e.0).unwrap();
    assert_eq!((h.status, h.keep_alive), (StatusCode::OK, true));
    assert_eq!(h.headers["x-a"], "1");
    assert_eq!(body(&mut c, h.decoder).await, b"hello");
    assert!(c.is_usable());
    let h = send(&mut c, get("/b")).await.map_err(|e| e.0).unwrap();
    assert_eq!(h.status, StatusCode::CREATED, "the interim 100 is skipped");
    assert!(!h.headers.contains_key("content-length"), "chunked wins over a content-length");
    assert_eq!(body(&mut c, h.decoder).await, b"abc");
    let h = send(&mut c, get("/c")).await.map_err(|e| e.0).unwrap();
    assert!(!h.keep_alive);
    assert_eq!(body(&mut c, h.decoder).await, b"rest until close");
}

#[tokio::test]
async fn request_framing_on_the_wire() {
    let (addr, seen) = upstream(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
    let mut c = conn(addr).await;
    let req = Request::post("/p?q=1")
        .header("host", "up")
        .header("content-length", "999")
        .body(ProxyBody::Full(Some(Bytes::from_static(b"0123456789"))))
        .unwrap()
        .into_parts();
    let h = send(&mut c, req).await.map_err(|e| e.0).unwrap();
    assert!(h.decoder.is_done());
    drop(c);
    let wire = String::from_utf8(seen.await.unwrap()).unwrap();
    assert!(wire.starts_with("POST /p?q=1 HTTP/1.1\r\n"), "{wire}");
    assert!(wire.contains("content-length: 10\r\n") && !wire.contains("999"), "{wire}");
    assert!(wire.ends_with("\r\n\r\n0123456789"), "{wire}");
}

#[tokio::test]
async fn closed_and_garbage_responses_are_errors() {
    let (addr, _) = upstream(vec![b""]).await;
    let mut c = conn(addr).await;
    let e = send(&mut c, get("/")).await.err().unwrap().0;
    assert!(matches!(e, ClientError::Closed | ClientError::Io(_)), "{e}");
    let (addr, _) = upstream(vec![b"SMTP ready\r\n\r\n"]).await;
    let mut c = conn(addr).await;
    assert!(matches!(send(&mut c, get("/")).await.err().unwrap().0, ClientError::Parse(_)));
}

#[tokio::test]
async fn an_upstream_close_makes_an_idle_connection_unusable() {
    let (addr, server) = upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
    let mut c = conn(addr).await;
    let h = send(&mut c, get("/")).await.map_err(|e| e.0).unwrap();
    assert!(h.decoder.is_done());
    server.await.unwrap(); // the server task ends and closes its socket
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while c.is_usable() {
        assert!(tokio::time::Instant::now() < deadline, "close never noticed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_enter_the_map() {
    let (addr, _up) = upstream(vec![
        b"HTTP/1.1 200 OK\r\nConnection: X-Internal, keep-alive\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n\
          Transfer-Encoding: chunked\r\nContent-Length: 99\r\nX-Kept: yes\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    ])
    .await;
    let mut c = conn(addr).await;
    let head = send(&mut c, get("/")).await.map_err(|e| e.0).unwrap();
    let names: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-kept"], "hop-by-hop, Connection-named or overridden headers reached the map");
    assert!(head.keep_alive);
    assert_eq!(body(&mut c, head.decoder).await, b"ok");
    // HTTP/1.0 without keep-alive: the connection cannot be reused.
    let head = send(&mut c, get("/")).await.map_err(|e| e.0).unwrap();
    assert!(!head.keep_alive);
    assert_eq!(head.headers["content-length"], "2");
}
