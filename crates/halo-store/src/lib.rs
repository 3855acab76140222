//! halo's cluster state.
//!
//! [`Store`] is the one interface the control plane uses: keys and values
//! with etcd's revision model (every change bumps one store-wide revision;
//! each key keeps its create and mod revision and a version), compare-and-swap
//! transactions on those revisions, prefix watches that start from any
//! revision still in the history, and leases whose expiry deletes the keys
//! attached to them. [`EmbeddedStore`] implements it on one machine with
//! redb, [`EtcdStore`] on an etcd v3 cluster. Both must
//! pass the conformance suite in [`conformance`] (feature `conformance`).

mod counted;
mod embedded;
mod etcd;
mod types;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::time::Duration;

use async_trait::async_trait;

pub use counted::Counted;
pub use embedded::EmbeddedStore;
pub use etcd::{EtcdAuth, EtcdStore};
pub use types::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Listing, Revision, Txn, TxnOp, TxnResult,
    Watch,
};

/// What a store operation can fail with. Nothing here is backend-specific.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease does not exist: never granted, revoked, or expired.
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A watch asked for history that compaction already removed. List the
    /// prefix and watch from the listing's revision + 1 instead.
    #[error("revision {requested} was compacted (history starts after {compacted})")]
    Compacted { requested: Revision, compacted: Revision },
    /// A request the store refuses as malformed (empty key, zero TTL...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store could not be opened (already in use, unreadable...).
    #[error("cannot open store at {path}: {message}")]
    Open { path: String, message: String },
    /// The store's file is torn or corrupt (not a store, truncated, a page
    /// that fails its checksum); it was not changed.
    #[error("the store file {path} is damaged: {message}")]
    Damaged { path: String, message: String },
    /// The backend failed; the operation may or may not have been applied
    /// when `maybe_applied` is true (a timeout after sending, for example).
    #[error("store {op} failed: {message}")]
    Backend { op: &'static str, message: String, maybe_applied: bool },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
}

/// Cluster state: keys, compare-and-swap transactions, watches, leases.
///
/// Keys are UTF-8 paths such as `/halo/services/web`; values are bytes.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Every key under `prefix`, sorted by key, and the revision the
    /// listing was read at (watch from `revision + 1` to follow it).
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;

    /// Runs `txn` atomically: if every compare holds, the `success` ops,
    /// else the `failure` ops. The revision moves only if something changed.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;

    /// Events under `prefix` from revision `from` on (0: from now), in
    /// revision order, one batch per revision. The stream ending means the
    /// watch broke: resume from the last revision seen + 1.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError>;

    /// Drops history up to and including `revision`; watches from there on
    /// fail with [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError>;

    /// Renews `lease`; returns its TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;

    /// Ends `lease` now, deleting every key attached to it.
    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError>;

    /// Lets go of the backend (the embedded store's file) before this
    /// process ends: what a binary upgrade does before the new process
    /// opens it. Every call after fails with [`StoreError::Closed`].
    async fn close(&self) {}

    /// Sets `key` (attached to `lease` if given); returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        let r = self.txn(Txn::new().and_then(TxnOp::put(key, value, lease))).await?;
        Ok(r.revision)
    }

    /// Deletes `key`; returns the deletion's revision, or `None` if there
    /// was no such key.
    async fn delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        let txn = Txn::new().when(Compare::exists(key)).and_then(TxnOp::Delete(key.to_string()));
        let r = self.txn(txn).await?;
        Ok(r.succeeded.then_some(r.revision))
    }
}
