//! Membership: this node's record on a lease it keeps renewing. A node
//! whose lease expires is gone from the cluster: its record, its endpoints
//! and (if it led) the leader key go with the lease.
//!
//! The lease is renewed every third of its TTL in a task of its own, so a
//! busy node does not lose it; an expired lease is replaced by a new one
//! and the node registers again.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use halo_store::{Compare, LeaseId, Revision, Store, StoreError, Txn, TxnOp};

use crate::keys::{node_admin_key, node_key, NodeAdmin, NodeRecord};
use halo_model::lock::LockExt;

/// How this node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node: String,
    /// Where other nodes reach this node's instances.
    pub addr: IpAddr,
    pub zone: String,
    pub capacity: u32,
    /// The node lease's TTL; it is renewed every third of it.
    pub lease_ttl: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub lease_renew_failures: AtomicU64,
    pub leases_granted: AtomicU64,
    pub elections_won: AtomicU64,
    pub step_downs: AtomicU64,
    pub fenced_writes: AtomicU64,
    pub stale_orders_ignored: AtomicU64,
    /// Leases of silent nodes this node revoked ([`crate::evict`]).
    pub evictions: AtomicU64,
}

/// This node's membership: its lease, and its leadership if it has it.
pub struct Membership {
    pub cfg: ClusterConfig,
    pub api: SocketAddr,
    /// The API is HTTPS only.
    pub api_tls: bool,
    pub(crate) store: std::sync::Arc<dyn Store>,
    lease: Mutex<Option<LeaseId>>,
    pub(crate) last_renewed: Mutex<Option<Instant>>,
    /// The fencing token while this node leads; 0 otherwise.
    pub(crate) token: AtomicI64,
    /// The highest fencing token this node has seen.
    pub max_token: AtomicI64,
    pub counters: ClusterCounters,
    /// Set by [`Membership::leave`]: no lease is renewed or granted again.
    leaving: std::sync::atomic::AtomicBool,
    /// The drivers that answer here, as the node record says.
    drivers: Mutex<Vec<String>>,
    /// What this node saw, for `halo events`.
    pub events: crate::events::Events,
}

impl Membership {
    pub fn new(cfg: ClusterConfig, api: SocketAddr, api_tls: bool, store: std::sync::Arc<dyn Store>) -> Membership {
        let events = crate::events::Events::start(store.clone(), &cfg.node);
        Membership {
            cfg,
            api,
            api_tls,
            store,
            lease: Mutex::new(None),
            last_renewed: Mutex::new(None),
            token: AtomicI64::new(0),
            max_token: AtomicI64::new(0),
            counters: ClusterCounters::default(),
            leaving: Default::default(),
            drivers: Mutex::new(vec!["exec".into()]),
            events,
        }
    }

    /// Keeps the node record's drivers in step with what answers (a
    /// Docker daemon stopped or started), every few seconds.
    pub async fn follow_drivers(self: std::sync::Arc<Self>, drivers: halo_supervisor::Drivers) {
        while !self.leaving.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.set_drivers(drivers.available().await).await;
        }
    }

    /// Records which drivers answer here; a change rewrites the node
    /// record (under the node lease, when there is one).
    pub async fn set_drivers(&self, drivers: Vec<String>) {
        {
            let mut now = self.drivers.locked();
            if *now == drivers {
                return;
            }
            tracing::info!(node = %self.cfg.node, ?drivers, "drivers answering on this node");
            *now = drivers;
        }
        let Some(lease) = *self.lease.locked() else { return };
        if let Err(e) = self.store.put(&node_key(&self.cfg.node), self.record(), Some(lease)).await {
            tracing::warn!(error = %e, "updating the node record's drivers failed");
        }
    }

    /// The node's lease, if it holds one that was renewed within its TTL.
    pub fn lease(&self) -> Option<LeaseId> {
        let fresh = self.last_renewed.locked().is_some_and(|t| t.elapsed() < self.cfg.lease_ttl);
        let leaving = self.leaving.load(Ordering::SeqCst);
        (*self.lease.locked()).filter(|_| fresh && !leaving)
    }

    /// Leaves the cluster for good (halo is stopping its instances): ends
    /// the lease, so this node's endpoints vanish from every proxy at once
    /// and, if it led, another node can be elected without waiting.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        if self.token.swap(0, Ordering::SeqCst) > 0 {
            tracing::info!("no longer leading: leaving the cluster");
        }
        let lease = self.lease.locked().take();
        if let Some(lease) = lease {
            if let Err(e) = self.store.revoke(lease).await {
                tracing::debug!(error = %e, "ending the node lease failed; it expires by itself");
            }
        }
    }

    /// The fencing token while this node leads.
    pub fn leading(&self) -> Option<Revision> {
        Some(self.token.load(Ordering::SeqCst)).filter(|t| *t > 0)
    }

    pub fn see_token(&self, token: Revision) {
        self.max_token.fetch_max(token, Ordering::SeqCst);
    }

    fn record(&self) -> Vec<u8> {
        let r = NodeRecord {
            name: self.cfg.node.clone(),
            addr: self.cfg.addr,
            zone: self.cfg.zone.clone(),
            capacity: self.cfg.capacity,
            api: self.api,
            api_tls: self.api_tls,
            drivers: self.drivers.locked().clone(),
        };
        serde_json::to_vec(&r).expect("a node record encodes")
    }

    /// Ends the lease a previous run of this node left in the store, with
    /// everything on it (its endpoints, the leader key). Only for a store
    /// this process holds alone (the embedded one): there the previous run
    /// is certainly dead, and waiting out its lease would only delay the
    /// election.
    pub async fn reclaim(&self) -> Result<(), StoreError> {
        if let Some(lease) = self.store.get(&node_key(&self.cfg.node)).await?.and_then(|kv| kv.lease) {
            match self.store.revoke(lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => return Err(e),
            }
            tracing::info!(lease = format!("{lease:x}"), "ended the lease of this node's previous run");
        }
        Ok(())
    }

    /// Grants a lease and registers the node on it.
    pub async fn register(&self) -> Result<LeaseId, StoreError> {
        let lease = self.store.grant(self.cfg.lease_ttl).await?;
        self.store.put(&node_key(&self.cfg.node), self.record(), Some(lease)).await?;
        // A lease-less record too, so a node that dies stays listed (as
        // gone) until `halo node remove`.
        let admin = node_admin_key(&self.cfg.node);
        let v = serde_json::to_vec(&NodeAdmin::default()).expect("encodes");
        self.store.txn(Txn::new().when(Compare::absent(&admin)).and_then(TxnOp::put(&admin, v, None))).await?;
        *self.last_renewed.locked() = Some(Instant::now());
        *self.lease.locked() = Some(lease);
        self.counters.leases_granted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %self.cfg.node, lease = format!("{lease:x}"), "registered in the cluster");
        Ok(lease)
    }

    /// Keeps the node's lease alive; registers again (new lease) if it
    /// expired.
    pub async fn run_lease(self: std::sync::Arc<Self>) {
        let every = self.cfg.lease_ttl / 3;
        while !self.leaving.load(Ordering::SeqCst) {
            let current = *self.lease.locked();
            match current {
                None => {
                    if let Err(e) = self.register().await {
                        tracing::warn!(error = %e, "cannot register in the cluster; retrying");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                }
                Some(lease) => match self.store.keep_alive(lease).await {
                    Ok(_) => {
                        *self.last_renewed.locked() = Some(Instant::now());
                    }
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!(lease = format!("{lease:x}"), "the node lease expired; registering again");
                        self.counters.lease_renew_failures.fetch_add(1, Ordering::Relaxed);
                        *self.lease.locked() = None;
                        self.step_down("lease expired");
                        continue;
                    }
                    Err(e) => {
                        self.counters.lease_renew_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "renewing the node lease failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            }
            tokio::time::sleep(every).await;
        }
    }

    pub(crate) fn step_down(&self, why: &str) {
        let old = self.token.swap(0, Ordering::SeqCst);
        if old > 0 {
            self.counters.step_downs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(token = old, why, "stepping down as leader");
        }
    }
}
