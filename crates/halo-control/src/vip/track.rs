//! The check a node must pass to hold a floating IP: by default its own
//! proxy answers (every listener accepts a connection, from inside the
//! node), or a command of the operator's exits 0. Two failures in a row
//! make the node unhealthy, three passes healthy again, so one slow
//! answer moves nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halo_model::health::{Tally, Verdict};
use halo_proxy::Proxy;
use halo_supervisor::{HostRunner, Runner};

use super::Track;
use halo_model::lock::LockExt;

const EVERY: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const EXEC_EVERY: Duration = Duration::from_secs(1);
const EXEC_TIMEOUT: Duration = Duration::from_secs(2);
const FAILS_TO_DOWN: u32 = 2;
const PASSES_TO_UP: u32 = 3;

/// The check's verdict: `Ok` while healthy, the last failure's reason
/// otherwise.
#[derive(Debug)]
pub struct Health(Mutex<Result<(), String>>);

impl Health {
    /// Healthy until the first checks say otherwise.
    pub fn new() -> Arc<Health> {
        Arc::new(Health(Mutex::new(Ok(()))))
    }

    pub fn get(&self) -> Result<(), String> {
        self.0.locked().clone()
    }
}

/// Runs `track` until the task is cancelled.
/// `floating(ip)` says whether `ip` is one of this node's floating IPs and
/// if so whether it is on the interface now: a listener bound to a
/// floating address can only be reached from here while this node holds it.
pub async fn run(track: Track, proxy: Arc<Proxy>, floating: impl Fn(IpAddr) -> Option<bool>, health: Arc<Health>) {
    let mut tally = Tally::default();
    // A command runs as halo, in a process group killed whole past its
    // timeout, as instances' exec probes do.
    let runner = HostRunner { env: Default::default(), workdir: None, who: Ok(None) };
    loop {
        let verdict = match &track {
            Track::None => Ok(()),
            Track::Proxy => listeners_answer(&proxy, &floating).await,
            Track::Exec(argv) => {
                runner.run(argv, None, EXEC_TIMEOUT).await.map(drop).map_err(|e| format!("check: {e}"))
            }
        };
        let now = health.get();
        match (tally.record(verdict.is_ok(), PASSES_TO_UP, FAILS_TO_DOWN), verdict) {
            (Verdict::Passing, _) if now.is_err() => {
                tracing::info!(check = %track, "tracked check passes again: this node may hold its floating IPs");
                *health.0.locked() = Ok(());
            }
            (Verdict::Failing, Err(why)) if now.as_ref().err() != Some(&why) => {
                if now.is_ok() {
                    tracing::warn!(check = %track, reason = %why, "tracked check fails: this node may not hold its floating IPs");
                }
                *health.0.locked() = Err(why);
            }
            _ => {}
        }
        tokio::time::sleep(if matches!(track, Track::Exec(_)) { EXEC_EVERY } else { EVERY }).await;
    }
}

/// Every listener of the proxy accepts a TCP connection; a wildcard
/// address is tried on loopback, one on a floating IP not held here is
/// skipped.
async fn listeners_answer(proxy: &Proxy, floating: &impl Fn(IpAddr) -> Option<bool>) -> Result<(), String> {
    let listeners = proxy.listener_addrs();
    if listeners.is_empty() {
        return Err("this node's proxy has no listeners".into());
    }
    for (name, addr) in listeners {
        let target = match addr.ip() {
            ip if floating(ip) == Some(false) => continue,
            IpAddr::V4(v4) if v4.is_unspecified() => SocketAddr::new([127, 0, 0, 1].into(), addr.port()),
            IpAddr::V6(v6) if v6.is_unspecified() => SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port()),
            _ => addr,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("listener {name} ({target}) refuses connections: {e}")),
            Err(_) => return Err(format!("listener {name} ({target}) does not accept within {CONNECT_TIMEOUT:?}")),
        }
    }
    Ok(())
}
