//! TCP (L4) listeners: each connection goes to one endpoint of the
//! listener's upstream, picked by the upstream's policy among its
//! available endpoints (active and passive health apply as for HTTP).
//! A failed connect counts against the endpoint and the connection tries
//! another one, up to `connect_tries`; then bytes are spliced both ways
//! ([`crate::tunnel`]). The endpoint counts the connection as in flight
//! for its whole life, so `least_request` is least connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::TcpForward;
use crate::conn::Conn;
use crate::endpoint::InflightGuard;
use crate::metrics::ListenerStats;
use crate::proxy_protocol;
use crate::server::Shared;
use crate::tunnel::{End, Tunnel};
use crate::util::now_ms;

pub async fn serve(client: TcpStream, peer: SocketAddr, shared: &Shared, fwd: &TcpForward, stats: &ListenerStats) {
    let Some(group) = shared.snapshot.load().groups.get(&fwd.upstream).map(|s| s.load_full()) else {
        // A service's upstream that does not exist (yet).
        stats.unserved.fetch_add(1, Relaxed);
        tracing::warn!(client.addr = %peer, upstream = %fwd.upstream, "no such upstream (yet); closing the connection");
        return;
    };
    let mut tried = [usize::MAX; 10];
    for attempt in 0..fwd.connect_tries as usize {
        let Some(i) = group.pick_conn(peer, &tried[..attempt], now_ms()) else { break };
        tried[attempt] = i;
        let ep = &group.endpoints[i];
        let failure = match tokio::time::timeout(fwd.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(mut upstream)) => {
                ep.passive_result(true, || false);
                if let Some(v) = group.cfg.send_proxy_protocol {
                    let here = client.local_addr().unwrap_or(peer);
                    if let Err(e) = upstream.write_all(&proxy_protocol::encode(v, peer, here)).await {
                        tracing::debug!(endpoint = %ep.addr, error = %e, "sending the PROXY header failed");
                        return;
                    }
                }
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
                match tunnel.run(shared, stats).await {
                    End::Closed => {}
                    end => tracing::debug!(client.addr = %peer, endpoint = %ep.addr, %end, "tcp connection closed"),
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", fwd.connect_timeout),
        };
        ep.stats.connect_failures.fetch_add(1, Relaxed);
        ep.passive_result(false, || group.may_eject());
        tracing::debug!(endpoint = %ep.addr, attempt, error = %failure, "tcp connect failed");
    }
    stats.unserved.fetch_add(1, Relaxed);
    tracing::warn!(client.addr = %peer, upstream = %fwd.upstream, "no endpoint took the connection; closing it");
}
