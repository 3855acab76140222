//! TCP (L4) listeners: each connection goes to one endpoint of the
//! listener's upstream, picked by the upstream's policy among its
//! available endpoints (active and passive health apply as for HTTP).
//! A failed connect counts against the endpoint and the connection tries
//! another one, up to `connect_tries` (so does a connection the endpoint
//! closes before any byte moved); then bytes are spliced both ways
//! ([`crate::tunnel`]). With `sni` entries the listener is TLS
//! passthrough: the ClientHello's server name (peeked, not consumed)
//! picks the upstream. The endpoint counts the connection as in flight
//! for its whole life, so `least_request` is least connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::TcpForward;
use crate::conn::Conn;
use crate::endpoint::{Endpoint, InflightGuard};
use crate::metrics::ListenerStats;
use crate::proxy_protocol;
use crate::shared::Shared;
use crate::sni::{self, Hello};
use crate::tunnel::{End, Tunnel};
use crate::util::now_ms;

/// How long a passthrough listener waits for the ClientHello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);

pub async fn serve(client: TcpStream, peer: SocketAddr, shared: &Shared, fwd: &TcpForward, stats: &ListenerStats) {
    let name = if fwd.sni.is_empty() {
        None
    } else {
        match tokio::time::timeout(HELLO_WITHIN, sni::peek(&client)).await {
            Ok(Ok(Hello::Name(n))) => Some(n),
            Ok(Ok(Hello::NoName)) => None,
            Ok(Err(_)) | Err(_) => return,
        }
    };
    let Some(upstream) = fwd.upstream_for(name.as_deref()) else {
        stats.unserved.fetch_add(1, Relaxed);
        tracing::debug!(client.addr = %peer, server_name = ?name, "no sni entry and no upstream for it; closing");
        return;
    };
    let Some(group) = shared.snapshot.load().groups.get(upstream).map(|s| s.load_full()) else {
        // A service's upstream that does not exist (yet).
        stats.unserved.fetch_add(1, Relaxed);
        tracing::warn!(client.addr = %peer, upstream, "no such upstream (yet); closing the connection");
        return;
    };
    let closed = || group.cfg.gate.as_ref().is_some_and(|g| !g.open());
    if closed() {
        stats.unserved.fetch_add(1, Relaxed);
        tracing::warn!(client.addr = %peer, upstream, "the upstream's gate is closed (this node's view of the cluster may be stale); closing the connection");
        return;
    }
    let mut tried = [usize::MAX; 10];
    for attempt in 0..fwd.connect_tries as usize {
        let Some(i) = group.pick_conn(peer, &tried[..attempt], now_ms()) else { break };
        tried[attempt] = i;
        let ep = &group.endpoints[i];
        let failure = match tokio::time::timeout(fwd.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(mut upstream)) => {
                if let Some(v) = group.cfg.send_proxy_protocol {
                    let here = client.local_addr().unwrap_or(peer);
                    if let Err(e) = upstream.write_all(&proxy_protocol::encode(v, peer, here)).await {
                        tracing::debug!(endpoint = %ep.addr, error = %e, "sending the PROXY header failed");
                        return;
                    }
                }
                if first_sign(&client, &upstream, fwd.idle_timeout).await {
                    if closed() {
                        stats.unserved.fetch_add(1, Relaxed);
                        return;
                    }
                    ep.passive_result(true, true, || false);
                    splice(client, upstream, ep, shared, fwd, stats, peer).await;
                    return;
                }
                "closed before anything moved".to_string()
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", fwd.connect_timeout),
        };
        ep.stats.connect_failures.fetch_add(1, Relaxed);
        ep.passive_result(false, false, || group.may_eject());
        group.judge_failure_rates(crate::util::now_ms());
        tracing::debug!(endpoint = %ep.addr, attempt, error = %failure, "tcp connect failed");
    }
    stats.unserved.fetch_add(1, Relaxed);
    tracing::warn!(client.addr = %peer, upstream, "no endpoint took the connection; closing it");
}

/// Whether a new upstream connection lives: it sent a byte, or the
/// client did first (or nothing moved for the idle limit). `false`: it
/// was closed or reset before any byte either way (a dying server's
/// backlog, a listener being closed), so another endpoint may take the
/// client as if this one had refused the connect.
async fn first_sign(client: &TcpStream, upstream: &TcpStream, idle: Option<Duration>) -> bool {
    let sign = async {
        tokio::select! {
            biased;
            // The client speaks first (HTTP, TLS): no wait at all.
            _ = client.readable() => true,
            r = upstream.readable() => {
                let mut b = [0u8; 1];
                r.is_ok() && matches!(upstream.peek(&mut b).await, Ok(n) if n > 0)
            }
        }
    };
    match idle {
        Some(d) => tokio::time::timeout(d, sign).await.unwrap_or(true),
        None => sign.await,
    }
}

async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    ep: &Arc<Endpoint>,
    shared: &Shared,
    fwd: &TcpForward,
    stats: &ListenerStats,
    peer: SocketAddr,
) {
    ep.stats.tcp_connections.fetch_add(1, Relaxed);
    let _busy = InflightGuard::new(ep.clone());
    let _ = upstream.set_nodelay(true);
    let tunnel = Tunnel {
        client: Conn::Plain(client),
        client_early: &[],
        upstream,
        upstream_early: &[],
        idle: fwd.idle_timeout,
        endpoint: ep,
    };
    let grace = ep.settings.load().removal_grace.unwrap_or(shared.snapshot.load().config.grace_period);
    match tunnel.run(grace, stats).await {
        End::Closed => {}
        end => tracing::debug!(client.addr = %peer, endpoint = %ep.addr, %end, "tcp connection closed"),
    }
}
