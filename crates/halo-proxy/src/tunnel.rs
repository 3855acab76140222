//! Tunnels: bytes copied both ways between a client and an endpoint, for
//! TCP listeners and for HTTP Upgrade (WebSocket) after the 101.
//!
//! A half-close is passed on (one side's end of stream shuts the other
//! side's write half; the other direction goes on). A tunnel ends when
//! both directions ended, either side failed, nothing moved either way
//! for the idle limit, or its endpoint was removed from its upstream (by
//! a reload or an endpoint update) and the grace period after that is
//! over: a reload that keeps an endpoint keeps its tunnels open.
//!
//! Memory: each direction holds a buffer only while bytes flow; a quiet
//! tunnel gives them back.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::{Conn, OwnedRead, OwnedWrite};
use crate::endpoint::{Endpoint, InflightGuard};
use crate::metrics::ListenerStats;
use crate::util::now_ms;

/// Read size per direction while bytes flow.
const BUF: usize = 16 << 10;
/// A direction quiet this long gives its buffer back.
const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// Why a tunnel ended.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("both sides closed")]
    Closed,
    #[error("nothing moved for {0:?} (the idle timeout)")]
    Idle(Duration),
    #[error("the endpoint was removed from its upstream and the grace period is over")]
    Retired,
    #[error("{0}")]
    Failed(io::Error),
}

/// One tunnel: the client, bytes the client sent that are not yet
/// forwarded (after an Upgrade head), the endpoint's connection and bytes
/// it sent that the client has not seen.
pub struct Tunnel<'a> {
    pub client: Conn,
    pub client_early: &'a [u8],
    pub upstream: TcpStream,
    pub upstream_early: &'a [u8],
    pub idle: Option<Duration>,
    pub endpoint: &'a Endpoint,
}

impl Tunnel<'_> {
    /// Runs the tunnel to its end; counts its bytes in `stats`. Once its
    /// endpoint is retired it lasts `grace` at most.
    pub async fn run(self, grace: Duration, stats: &ListenerStats) -> End {
        let (mut cr, mut cw) = self.client.into_split();
        let (mut ur, mut uw) = Conn::Plain(self.upstream).into_split();
        let last = AtomicU64::new(now_ms());
        stats.tunnels.fetch_add(1, Relaxed);
        let both = async {
            tokio::try_join!(
                pump(&mut cr, &mut uw, self.client_early, &last, &stats.bytes_in),
                pump(&mut ur, &mut cw, self.upstream_early, &last, &stats.bytes_out),
            )
        };
        let retired = async {
            self.endpoint.retired().await;
            tokio::time::sleep(grace).await;
        };
        let end = tokio::select! {
            r = both => r.map_or_else(End::Failed, |_| End::Closed),
            d = idle(self.idle, &last) => End::Idle(d),
            _ = retired => End::Retired,
        };
        stats.tunnels.fetch_sub(1, Relaxed);
        end
    }
}

/// An upstream connection that switched protocols (101): what the
/// downstream codec needs to open the tunnel once the 101 is written.
pub struct Upgraded {
    pub upstream: TcpStream,
    /// Bytes the upstream sent after its 101 head.
    pub early: BytesMut,
    /// Keeps the endpoint counted as busy; its endpoint is the tunnel's.
    pub busy: InflightGuard,
    pub idle: Option<Duration>,
    /// The proxy's grace period when the request came.
    pub grace: Duration,
    pub stats: Arc<ListenerStats>,
}

impl Upgraded {
    /// Runs the tunnel with the client's connection and the bytes it sent
    /// after its request head.
    pub async fn run(self, client: Conn, client_early: &[u8]) -> End {
        let Upgraded { upstream, early, busy, idle, grace, stats } = self;
        let tunnel = Tunnel { client, client_early, upstream, upstream_early: &early, idle, endpoint: &busy.0 };
        tunnel.run(grace, &stats).await
    }
}

/// Copies `r` to `w` (after `early`) until `r` ends, then shuts `w`.
async fn pump(
    r: &mut OwnedRead,
    w: &mut OwnedWrite,
    early: &[u8],
    last: &AtomicU64,
    moved: &AtomicU64,
) -> io::Result<()> {
    if !early.is_empty() {
        w.write_all(early).await?;
        w.flush().await?;
        moved.fetch_add(early.len() as u64, Relaxed);
    }
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let n = r.read_some(&mut buf, BUF, IDLE_RELEASE).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf).await?;
        w.flush().await?;
        last.store(now_ms(), Relaxed);
        moved.fetch_add(n as u64, Relaxed);
    }
}

/// Resolves once nothing moved for `limit` (never without a limit).
async fn idle(limit: Option<Duration>, last: &AtomicU64) -> Duration {
    let Some(limit) = limit else { return std::future::pending().await };
    let limit_ms = limit.as_millis() as u64;
    loop {
        let quiet = now_ms().saturating_sub(last.load(Relaxed));
        if quiet >= limit_ms {
            return limit;
        }
        tokio::time::sleep(Duration::from_millis(limit_ms - quiet)).await;
    }
}
