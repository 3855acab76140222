//! Probes: one check of an instance (HTTP GET, TCP connect or a command),
//! and the thresholds that turn check results into pass or fail.

use std::time::Duration;

use halo_model::{Check, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs `check` against the instance on `port` once, within `timeout`.
pub async fn check_once(check: &Check, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run(check, port)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn run(check: &Check, port: u16) -> Result<(), String> {
    match check {
        Check::Tcp => TcpStream::connect(("127.0.0.1", port)).await.map(drop).map_err(|e| format!("connect: {e}")),
        Check::Http(path) => {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: halo-probe\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
            // The status line is all we need.
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 12 {
                match s.read(&mut buf[n..]).await {
                    Ok(0) => return Err("connection closed before a status line".into()),
                    Ok(k) => n += k,
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let status: u16 = line.get(9..12).and_then(|s| s.parse().ok()).ok_or("not an HTTP response")?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        Check::Exec(argv) => {
            let out = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("PORT", port.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
            if out.success() {
                Ok(())
            } else {
                Err(format!("{} {out}", argv[0]))
            }
        }
    }
}

/// Consecutive results against a probe's thresholds.
#[derive(Debug, Default)]
pub struct Tally {
    passes: u32,
    failures: u32,
}

/// What one result changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reached `success_threshold` passes in a row.
    Passing,
    /// Reached `failure_threshold` failures in a row.
    Failing,
    Undecided,
}

impl Tally {
    pub fn record(&mut self, probe: &Probe, ok: bool) -> Verdict {
        if ok {
            self.passes += 1;
            self.failures = 0;
            if self.passes >= probe.success_threshold {
                return Verdict::Passing;
            }
        } else {
            self.failures += 1;
            self.passes = 0;
            if self.failures >= probe.failure_threshold {
                return Verdict::Failing;
            }
        }
        Verdict::Undecided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_need_results_in_a_row() {
        let p = Probe {
            check: Check::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut t = Tally::default();
        assert_eq!(t.record(&p, true), Verdict::Undecided);
        assert_eq!(t.record(&p, false), Verdict::Undecided);
        assert_eq!(t.record(&p, true), Verdict::Undecided, "a failure resets the passes");
        assert_eq!(t.record(&p, true), Verdict::Passing);
        assert_eq!(t.record(&p, false), Verdict::Undecided);
        assert_eq!(t.record(&p, false), Verdict::Undecided);
        assert_eq!(t.record(&p, false), Verdict::Failing);
    }

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
        assert_eq!(check_once(&Check::Tcp, port, t).await, Ok(()));
        assert_eq!(check_once(&Check::Http("/ok".into()), port, t).await, Ok(()));
        let e = check_once(&Check::Http("/bad".into()), port, t).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = halo_testkit::free_addr().port();
        assert!(check_once(&Check::Tcp, closed, t).await.is_err());
        assert_eq!(check_once(&Check::Exec(vec!["true".into()]), port, t).await, Ok(()));
        assert!(check_once(&Check::Exec(vec!["false".into()]), port, t).await.is_err());
    }
}
