//! Probes: one check of an instance (HTTP GET, TCP connect or a command).
//! The thresholds that turn results into pass or fail are
//! `halo_model::health::Tally`, as every health check's.

use std::net::SocketAddr;
use std::time::Duration;

use halo_model::Check;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ProbeError;
use crate::runner::Runner;

/// Runs `check` once within `timeout`: HTTP and TCP against the app at
/// `addr`, a command through `runner` (where the app runs).
pub async fn check_once(
    check: &Check,
    addr: SocketAddr,
    runner: &dyn Runner,
    timeout: Duration,
) -> Result<(), ProbeError> {
    if let Check::Exec(argv) = check {
        return Ok(runner.run(argv, None, timeout).await.map(drop)?);
    }
    match tokio::time::timeout(timeout, connect(check, addr)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn connect(check: &Check, addr: SocketAddr) -> Result<(), ProbeError> {
    let exchange = |what: &str, e: std::io::Error| ProbeError::Exchange(format!("{what}: {e}"));
    match check {
        Check::Tcp => TcpStream::connect(addr).await.map(drop).map_err(|e| ProbeError::Connect(e.to_string())),
        Check::Http(path) => {
            let mut s = TcpStream::connect(addr).await.map_err(|e| ProbeError::Connect(e.to_string()))?;
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: halo-probe\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.map_err(|e| exchange("send", e))?;
            // The status line is all we need.
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                match s.read(&mut buf[n..]).await {
                    Ok(0) => return Err(ProbeError::Exchange("connection closed before a status line".into())),
                    Ok(k) => n += k,
                    Err(e) => return Err(exchange("read", e)),
                }
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let status: u16 = line
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ProbeError::Exchange("not an HTTP response".into()))?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(ProbeError::Status { path: path.clone(), status })
            }
        }
        Check::Exec(_) => unreachable!("commands run through the runner"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_against_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let status = if ok { "200 OK" } else { "503 Service Unavailable" };
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let t = Duration::from_secs(2);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let host = crate::runner::HostRunner { env: Default::default(), workdir: None, who: Ok(None) };
        assert_eq!(check_once(&Check::Tcp, addr, &host, t).await, Ok(()));
        assert_eq!(check_once(&Check::Http("/ok".into()), addr, &host, t).await, Ok(()));
        let e = check_once(&Check::Http("/bad".into()), addr, &host, t).await.unwrap_err();
        assert!(matches!(&e, ProbeError::Status { status: 503, .. }), "{e}");
        assert!(e.to_string().contains("503"), "{e}");
        let closed = halo_testkit::free_addr();
        assert!(check_once(&Check::Tcp, closed, &host, t).await.is_err());
        assert_eq!(check_once(&Check::Exec(vec!["true".into()]), addr, &host, t).await, Ok(()));
        assert!(check_once(&Check::Exec(vec!["false".into()]), addr, &host, t).await.is_err());
    }
}
