//! Open downstream connections: counted from accept until the connection
//! is gone (whichever task, or the parking lot, holds it then), so that
//! shutdown can wait for them and the listener's gauge is right.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::metrics::ListenerStats;

/// Counts open downstream connections so shutdown can wait for them.
#[derive(Default)]
pub struct Drain {
    pub count: AtomicUsize,
    idle: Notify,
}

impl Drain {
    pub async fn wait(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn done(&self) {
        if self.count.fetch_sub(1, Relaxed) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// One open connection: made at accept, dropped with the connection.
pub struct Open {
    stats: Arc<ListenerStats>,
    drain: Arc<Drain>,
}

impl Open {
    pub fn new(stats: Arc<ListenerStats>, drain: Arc<Drain>) -> Open {
        stats.accepted.fetch_add(1, Relaxed);
        drain.count.fetch_add(1, Relaxed);
        Open { stats, drain }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats.conns.close();
        self.drain.done();
    }
}
