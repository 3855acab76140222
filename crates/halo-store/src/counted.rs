//! [`Counted`]: any [`Store`] with a count of the requests made through
//! it, by operation, for `/metrics` (`halo_store_requests_total`) and the
//! control-plane scale benchmark. A watch counts once when it is opened;
//! the events it delivers cost no request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{KeyValue, LeaseId, Listing, Revision, Store, StoreError, Txn, TxnResult, Watch};

/// The operations counted, in the order [`Counted::counts`] reports them.
pub const OPS: [&str; 8] = ["get", "list", "txn", "watch", "compact", "grant", "keep_alive", "revoke"];

pub struct Counted {
    inner: Arc<dyn Store>,
    counts: [AtomicU64; OPS.len()],
}

impl Counted {
    pub fn new(inner: Arc<dyn Store>) -> Counted {
        Counted { inner, counts: Default::default() }
    }

    fn count(&self, op: usize) {
        self.counts[op].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests so far, by operation name.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        OPS.iter().zip(&self.counts).map(|(op, c)| (*op, c.load(Ordering::Relaxed))).collect()
    }
}

#[async_trait]
impl Store for Counted {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.count(0);
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.count(1);
        self.inner.list(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.count(2);
        self.inner.txn(txn).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        self.count(3);
        self.inner.watch(prefix, from).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.count(4);
        self.inner.compact(revision).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.count(5);
        self.inner.grant(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.count(6);
        self.inner.keep_alive(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.count(7);
        self.inner.revoke(lease).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
