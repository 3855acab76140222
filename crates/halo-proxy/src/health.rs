//! Active health checks: one task per endpoint, probing by HTTP GET or TCP
//! connect every interval (plus jitter), moving the endpoint down after
//! `fall` failures in a row and up after `rise` successes. The task holds
//! only a weak reference, so it ends by itself once a reload removed the
//! endpoint and its last in-flight request finished.
//!
//! Passive health (outlier ejection) is in [`crate::endpoint`]: it is fed by
//! every proxied request.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;

use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{HealthConfig, HealthKind, ProxyProtocolVersion, UpstreamTls};
use crate::endpoint::Endpoint;
use crate::tls::client::UpIo;
use crate::util::rand_below;

/// The checker of an endpoint, for as long as the endpoint lives.
pub async fn checker(weak: Weak<Endpoint>) {
    let mut tally = halo_model::health::Tally::default();
    let mut good_since_ejection = 0u32;
    let mut ejections_seen = 0u64;
    loop {
        let Some(ep) = weak.upgrade() else { return };
        ep.pool.reap_idle();
        let settings = ep.settings.load_full();
        let Some(cfg) = settings.health.as_ref() else {
            drop(ep);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let result = probe(ep.addr, cfg, settings.send_proxy_protocol, settings.tls.as_deref()).await;
        let ok = result.is_ok();
        if !ok {
            ep.stats.health_checks_failed.fetch_add(1, Relaxed);
        }
        match (ep.active_result(ok, cfg.rise, cfg.fall, &mut tally), &result) {
            (Some(false), Err(why)) => {
                tracing::warn!(upstream = %ep.upstream, endpoint = %ep.addr, reason = %why, "endpoint down: active health checks fail")
            }
            (Some(_), _) => {
                tracing::info!(upstream = %ep.upstream, endpoint = %ep.addr, "endpoint up: active health checks pass")
            }
            (None, _) => {}
        }
        // An endpoint that keeps passing checks after an ejection, back in
        // service and not ejected again meanwhile, has its ejection backoff
        // forgiven (checks passed while it is out prove nothing of the
        // requests it failed).
        let ejections = ep.stats.ejections.load(Relaxed);
        if ejections != ejections_seen {
            ejections_seen = ejections;
            good_since_ejection = 0;
        }
        if !ok {
            good_since_ejection = 0;
        } else if !ep.ejected(crate::util::now_ms()) {
            good_since_ejection += 1;
        }
        if good_since_ejection >= 30 && ep.ejection_count() > 0 {
            ep.reset_ejection_backoff();
        }
        let jitter = Duration::from_millis(rand_below(cfg.jitter.as_millis() as u64 + 1));
        let wait = cfg.interval + jitter;
        drop(ep);
        tokio::time::sleep(wait).await;
    }
}

/// Why an active check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("sending the PROXY header: {0}")]
    ProxyHeader(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The HTTP or HTTP/2 exchange broke.
    #[error("{what}: {source}")]
    Exchange { what: String, source: hyper::Error },
    #[error("GET {path} answered {status}, expected {expected}")]
    Status { path: String, status: u16, expected: String },
    #[error("grpc health check answered HTTP {0}")]
    GrpcHttp(u16),
    #[error("grpc health check answered grpc-status {0}")]
    GrpcStatus(String),
    #[error("service '{0}' is not SERVING")]
    NotServing(String),
}

/// One probe; `Ok` when the endpoint answered as expected in time, else
/// what went wrong (`GET /healthz answered 503`). An upstream that takes
/// PROXY protocol headers gets a LOCAL one first; an upstream behind TLS is
/// checked over TLS (HTTP and gRPC checks).
pub async fn probe(
    addr: SocketAddr,
    cfg: &HealthConfig,
    proxy: Option<ProxyProtocolVersion>,
    tls: Option<&UpstreamTls>,
) -> Result<(), CheckError> {
    match tokio::time::timeout(cfg.timeout, probe_inner(addr, &cfg.kind, proxy, tls)).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(cfg.timeout)),
    }
}

async fn probe_inner(
    addr: SocketAddr,
    kind: &HealthKind,
    proxy: Option<ProxyProtocolVersion>,
    tls: Option<&UpstreamTls>,
) -> Result<(), CheckError> {
    let mut stream = TcpStream::connect(addr).await.map_err(CheckError::Connect)?;
    if let Some(v) = proxy {
        let local = crate::proxy_protocol::encode_local(v);
        stream.write_all(&local).await.map_err(CheckError::ProxyHeader)?;
    }
    if *kind == HealthKind::Tcp {
        return Ok(());
    }
    let stream = match tls {
        Some(t) => t.connect(stream, addr).await.map_err(CheckError::Tls)?,
        None => UpIo::Plain(stream),
    };
    let (path, expect_status) = match kind {
        HealthKind::Tcp => return Ok(()),
        HealthKind::Grpc { service } => return grpc_check(stream, addr, service).await,
        HealthKind::Http { path, expect_status } => (path, expect_status),
    };
    let (mut sender, conn) = http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|source| CheckError::Exchange { what: "HTTP handshake".into(), source })?;
    tokio::spawn(conn);
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "halo-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .expect("a checked path makes a valid request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| CheckError::Exchange { what: format!("GET {path}"), source })?;
    let status = resp.status();
    let good = match expect_status {
        Some(s) => status.as_u16() == *s,
        None => status.is_success() || status.is_redirection(),
    };
    let expected = match expect_status {
        Some(want) => want.to_string(),
        None => "2xx or 3xx".to_string(),
    };
    match good {
        true => Ok(()),
        false => Err(CheckError::Status { path: path.clone(), status: status.as_u16(), expected }),
    }
}

/// `grpc.health.v1.Health/Check` for `service`: `Ok` when the answer is
/// SERVING with grpc-status 0.
async fn grpc_check(stream: UpIo, addr: SocketAddr, service: &str) -> Result<(), CheckError> {
    let grpc = |source| CheckError::Exchange { what: "grpc health check".into(), source };
    use http_body_util::{BodyExt, Full};
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|source| CheckError::Exchange { what: "HTTP/2 handshake".into(), source })?;
    tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in one length-prefixed message.
    let mut msg = vec![0x0a];
    push_varint(&mut msg, service.len() as u64);
    msg.extend_from_slice(service.as_bytes());
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "halo-health-check")
        .body(Full::new(bytes::Bytes::from(body)))
        .expect("a valid request");
    let resp = sender.send_request(req).await.map_err(grpc)?;
    if !resp.status().is_success() {
        return Err(CheckError::GrpcHttp(resp.status().as_u16()));
    }
    let head_status = resp.headers().get("grpc-status").cloned();
    let collected = resp.into_body().collect().await.map_err(grpc)?;
    let status = collected.trailers().and_then(|t| t.get("grpc-status").cloned()).or(head_status);
    if status.as_ref().map(|s| s.as_bytes()) != Some(b"0") {
        let shown = status.as_ref().and_then(|s| s.to_str().ok()).unwrap_or("none");
        return Err(CheckError::GrpcStatus(shown.to_string()));
    }
    // HealthCheckResponse { ServingStatus status = 1; }, SERVING = 1.
    let data = collected.to_bytes();
    if data.len() >= 5 && data[5..] == [0x08, 0x01] {
        Ok(())
    } else {
        Err(CheckError::NotServing(service.to_string()))
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
