//! A short lease renewed often, for what must end fast and never be held
//! twice: a floating IP's holder key, a stateful service's primary key.
//! Its holder acts only while the lease is *fresh* (its last successful
//! renewal was sent less than the hold window ago): a node that cannot
//! renew stops acting before anyone else may start, who waits a guard
//! longer than the window after taking the key.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use halo_model::lock::LockExt;
use halo_store::{LeaseId, Store, StoreError};

/// The lease's TTL (etcd's smallest with its default election timeout).
pub const TTL: Duration = Duration::from_secs(2);
pub const RENEW_EVERY: Duration = Duration::from_millis(150);

/// One node's short lease for one purpose.
pub struct FastLease {
    /// What it is for, in log lines ("floating IP", "primary").
    what: &'static str,
    /// The lease and when its last successful renewal was sent.
    lease: Mutex<Option<(LeaseId, Instant)>>,
    /// Held fresh within this of the last renewal sent.
    window: Duration,
    stopped: AtomicBool,
    /// Whether anything needs the lease now: while not, no request is
    /// made (a node with nothing to hold costs the store nothing).
    wanted: AtomicBool,
}

impl FastLease {
    pub fn new(what: &'static str, window: Duration) -> FastLease {
        FastLease {
            what,
            lease: Mutex::new(None),
            window,
            stopped: AtomicBool::new(false),
            wanted: AtomicBool::new(true),
        }
    }

    /// Takes over `lease`, a previous process's of this node (a restart,
    /// a binary upgrade), if the store still has it.
    pub async fn adopt(&self, store: &dyn Store, lease: LeaseId) -> bool {
        let sent = Instant::now();
        if store.keep_alive(lease).await.is_ok() {
            tracing::info!(lease = format!("{lease:x}"), "continuing the {} lease of this node's last run", self.what);
            *self.lease.locked() = Some((lease, sent));
            return true;
        }
        false
    }

    /// The lease while its last renewal was sent within the window.
    pub fn fresh(&self) -> Option<LeaseId> {
        let l = *self.lease.locked();
        l.filter(|(_, at)| at.elapsed() < self.window).map(|(id, _)| id)
    }

    /// When the last successful renewal was sent.
    pub fn renewed(&self) -> Option<Instant> {
        self.lease.locked().map(|(_, at)| at)
    }

    /// Whether the last successful renewal was sent within `d`: the node
    /// reached the store that lately.
    pub fn renewed_within(&self, d: Duration) -> bool {
        self.renewed().is_some_and(|at| at.elapsed() < d)
    }

    pub fn id(&self) -> Option<LeaseId> {
        self.lease.locked().map(|(id, _)| id)
    }

    /// Says whether anything needs the lease: while not, it is not
    /// renewed (and runs out; a new one is granted when wanted again).
    pub fn want(&self, wanted: bool) {
        self.wanted.store(wanted, Relaxed);
    }

    /// Stops renewing (the lease runs out by itself).
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Relaxed)
    }

    /// Stops renewing and ends the lease (its keys go at once).
    pub async fn end(&self, store: &dyn Store) {
        self.stopped.store(true, Relaxed);
        let lease = self.lease.locked().take();
        if let Some((id, _)) = lease {
            let _ = store.revoke(id).await;
        }
    }

    /// Keeps the lease until [`FastLease::stop`]; a lease that is gone is
    /// replaced (its keys went with it).
    pub async fn renew(&self, store: &dyn Store) {
        while !self.stopped.load(Relaxed) {
            if !self.wanted.load(Relaxed) {
                // Left to run out: nothing is attached to it.
                *self.lease.locked() = None;
                tokio::time::sleep(RENEW_EVERY).await;
                continue;
            }
            match self.id() {
                None => match store.grant(TTL).await {
                    Ok(id) => {
                        tracing::debug!(lease = format!("{id:x}"), "{} lease granted", self.what);
                        *self.lease.locked() = Some((id, Instant::now()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot grant the {} lease; retrying", self.what);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                },
                Some(id) => {
                    let sent = Instant::now();
                    match store.keep_alive(id).await {
                        Ok(_) => {
                            let mut l = self.lease.locked();
                            if l.is_some_and(|(now, _)| now == id) {
                                *l = Some((id, sent));
                            }
                        }
                        Err(StoreError::LeaseNotFound(_)) => {
                            tracing::warn!(
                                lease = format!("{id:x}"),
                                "the {} lease is gone (expired or revoked)",
                                self.what
                            );
                            let mut l = self.lease.locked();
                            if l.is_some_and(|(now, _)| now == id) {
                                *l = None;
                            }
                            continue;
                        }
                        Err(e) => tracing::debug!(error = %e, "renewing the {} lease failed", self.what),
                    }
                }
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }
}
