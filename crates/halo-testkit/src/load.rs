//! A bounded load client that records the outcome of every request.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

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
