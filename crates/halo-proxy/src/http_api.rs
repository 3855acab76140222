//! Serving an operator API over HTTP/1.1: `halo proxy`'s admin listener
//! and the node API of `halo up` and `halo agent` share this. What an
//! attacker needs none of is bounded: at most [`MAX_CONNECTIONS`] open
//! (past it new ones wait in the kernel's queue), a TLS handshake and
//! every request head within [`HEAD_TIMEOUT`], an accept error (out of
//! descriptors) waited out rather than spun on. A stop closes idle
//! connections at once and lets requests in flight finish.
//!
//! [`browser_guard`] keeps a web page from using an API through its
//! visitor's browser: a cross-origin request (CSRF) and a Host that is not
//! one of the API's own (DNS rebinding) are refused, token or not.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::TlsListener;

/// Connections an API serves at once.
pub const MAX_CONNECTIONS: usize = 512;
/// A TLS handshake, and each request head, must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// After an accept error, the wait before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `listener` until `stop` turns true: HTTPS with what `tls`
/// gives at each accept (a reload may change it), else HTTP. `service`
/// makes the service of one connection from its peer's address.
pub async fn serve<S, B, Fut>(
    listener: TcpListener,
    tls: impl Fn() -> Option<Arc<TlsListener>>,
    mut stop: watch::Receiver<bool>,
    service: impl Fn(SocketAddr) -> S,
) where
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        if *stop.borrow() {
            return;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => continue,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.changed() => continue,
        };
        let svc = service(peer);
        let tls = tls();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_conn(stream, svc, stop).await,
                Some(t) => match tokio::time::timeout(HEAD_TIMEOUT, t.acceptor_http1().accept(stream)).await {
                    Ok(Ok(s)) => serve_conn(s, svc, stop).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                },
            }
        });
    }
}

async fn serve_conn<IO, S, B, Fut>(io: IO, svc: S, mut stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(io), hyper::service::service_fn(svc));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        // Idle connections close now, long before this process exits, so
        // clients see it before they reuse them.
        _ = async { drop(stop.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Refuses what a browser sends on behalf of another site: an `Origin`
/// that is not the API's own (`scheme://Host`), or a `Host` that is not
/// an address of the API (an IP literal, `localhost`, or this machine's
/// name) when it speaks plain HTTP (over TLS the certificate binds the
/// name). Programs (the CLI, curl, scrapers) send neither. `/healthz`
/// says nothing and changes nothing: any health checker may ask it by
/// any name.
pub fn browser_guard<B>(req: &Request<B>, tls: bool) -> Result<(), &'static str> {
    if req.uri().path() == "/healthz" {
        return Ok(());
    }
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if !tls && !host.is_empty() && !own_host(host) {
        return Err("the Host header names no address of this API (a page rebinding its name to it is refused); \
                    reach it by IP address or localhost");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let scheme = if tls { "https://" } else { "http://" };
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix(scheme))
            .is_some_and(|authority| authority.eq_ignore_ascii_case(host));
        if !same {
            return Err("a request from another site's page (its Origin is not this API's) is refused");
        }
    }
    Ok(())
}

/// Whether `host` (`NAME[:PORT]`) is an IP literal, localhost or this
/// machine's name.
fn own_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    !me.trim().is_empty() && name.eq_ignore_ascii_case(me.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> Request<()> {
        let mut r = Request::post("/reload").header(header::HOST, host);
        if let Some(o) = origin {
            r = r.header(header::ORIGIN, o);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn programs_and_the_apis_own_pages_pass_other_sites_do_not() {
        assert!(browser_guard(&headers("127.0.0.1:7070", None), false).is_ok());
        assert!(browser_guard(&headers("[::1]:7070", None), false).is_ok());
        assert!(browser_guard(&headers("localhost:9901", None), false).is_ok());
        assert!(browser_guard(&headers("127.0.0.1:7070", Some("http://127.0.0.1:7070")), false).is_ok());
        assert!(browser_guard(&headers("127.0.0.1:7070", Some("http://evil.example")), false).is_err());
        assert!(browser_guard(&headers("127.0.0.1:7070", Some("null")), false).is_err());
        assert!(browser_guard(&headers("evil.example:7070", None), false).is_err());
        // Over TLS the certificate binds the name; the origin still counts.
        assert!(browser_guard(&headers("node1.example:7070", Some("https://node1.example:7070")), true).is_ok());
        assert!(browser_guard(&headers("node1.example:7070", Some("https://evil.example")), true).is_err());
        let health = Request::get("/healthz").header(header::HOST, "lb-check").body(()).unwrap();
        assert!(browser_guard(&health, false).is_ok());
    }
}
