//! A bounded load client that records the outcome of every request.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::Client;

/// Most requests one worker sends, whatever happens: loops stop by themselves.
const MAX_PER_WORKER: usize = 200_000;

/// Workers sending GETs back to back until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Report>>,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    /// One line per failed request: status and body, or the client error.
    pub failed: Vec<String>,
}

impl Load {
    /// Starts `workers` clients, each with its own keep-alive connection.
    pub fn start(url: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let (url, stop) = (url.to_string(), stop.clone());
                tokio::spawn(async move {
                    let c = Client::new();
                    let mut r = Report::default();
                    for _ in 0..MAX_PER_WORKER {
                        if stop.load(SeqCst) {
                            break;
                        }
                        match c.get(&url).await {
                            Ok(resp) if resp.status == 200 => r.ok += 1,
                            Ok(resp) => r.failed.push(format!("{} {}", resp.status, resp.body)),
                            Err(e) => r.failed.push(e),
                        }
                    }
                    r
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the workers and adds up what they saw.
    pub async fn finish(mut self) -> Report {
        self.stop.store(true, SeqCst);
        let mut total = Report::default();
        for w in std::mem::take(&mut self.workers) {
            if let Ok(r) = w.await {
                total.ok += r.ok;
                total.failed.extend(r.failed);
            }
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// What a [`RetryLoad`] saw: every request's outcome.
#[derive(Debug, Default)]
pub struct RetryReport {
    /// Answered 200 at the first address tried.
    pub ok_first: u64,
    /// Answered 200 after trying another node's address.
    pub ok_retried: u64,
    /// Failed at every address until the request's deadline: what the last
    /// attempt saw.
    pub failed: Vec<String>,
    /// Attempts that failed (and were retried elsewhere).
    pub failed_attempts: u64,
}

/// Workers sending idempotent GETs through several nodes, as a client
/// that knows every node's address does: an attempt that errors, times
/// out or answers 5xx is retried on the next address, until the request's
/// deadline. Paced, and bounded in count and time.
pub struct RetryLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<RetryReport>>,
}

impl RetryLoad {
    /// `urls`: one per node. Each attempt may take `attempt`; a request
    /// fails after `deadline` of failed attempts.
    pub fn start(urls: Vec<String>, workers: usize, attempt: Duration, deadline: Duration) -> RetryLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|w| {
                let (urls, stop) = (urls.clone(), stop.clone());
                tokio::spawn(async move {
                    let c = Client::new();
                    let mut r = RetryReport::default();
                    for n in 0..MAX_PER_WORKER {
                        if stop.load(SeqCst) {
                            break;
                        }
                        let started = tokio::time::Instant::now();
                        let mut at = (w + n) % urls.len();
                        let mut tries = 0u32;
                        let outcome = loop {
                            let last = match tokio::time::timeout(attempt, c.get(&urls[at])).await {
                                Ok(Ok(resp)) if resp.status == 200 => break Ok(tries),
                                Ok(Ok(resp)) => format!("{} {} via {}", resp.status, resp.body.trim(), urls[at]),
                                Ok(Err(e)) => format!("{e} via {}", urls[at]),
                                Err(_) => format!("no answer within {attempt:?} via {}", urls[at]),
                            };
                            r.failed_attempts += 1;
                            tries += 1;
                            if started.elapsed() > deadline {
                                break Err(last);
                            }
                            at = (at + 1) % urls.len();
                            // Every address failed once: a short pause.
                            if (tries as usize).is_multiple_of(urls.len()) {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        };
                        match outcome {
                            Ok(0) => r.ok_first += 1,
                            Ok(_) => r.ok_retried += 1,
                            Err(e) => r.failed.push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    r
                })
            })
            .collect();
        RetryLoad { stop, workers }
    }

    /// Stops the workers (each finishes its request) and adds up.
    pub async fn finish(mut self) -> RetryReport {
        self.stop.store(true, SeqCst);
        let mut total = RetryReport::default();
        for w in std::mem::take(&mut self.workers) {
            if let Ok(r) = w.await {
                total.ok_first += r.ok_first;
                total.ok_retried += r.ok_retried;
                total.failed_attempts += r.failed_attempts;
                total.failed.extend(r.failed);
            }
        }
        total
    }
}

impl Drop for RetryLoad {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}
