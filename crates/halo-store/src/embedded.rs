//! The embedded store: the [`Store`] trait on one machine, on redb.
//!
//! Every write is one redb write transaction committed with
//! `Durability::Immediate` (fsync) before the call returns, so an
//! acknowledged write survives kill -9 at any moment. Writes are serialised
//! by one mutex that also guards the in-memory state: the revision, the
//! watchers and the lease deadlines. Reads use redb read transactions and
//! take no lock. Each revision's events are kept in a history table for
//! watches; history older than [`HISTORY`] revisions is compacted away.
//!
//! Leases: their TTLs are durable, their deadlines are not. When the store
//! opens, every lease gets a full TTL from then (etcd does the same when a
//! new leader takes over), so a restart never expires a lease early.

mod codec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable, TableDefinition,
};
use tokio::sync::mpsc;

use crate::{Event, EventKind, KeyValue, LeaseId, Listing, Revision, Store, StoreError, Txn, TxnOp, TxnResult, Watch};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const HISTORY_TABLE: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Lease id -> TTL in milliseconds.
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &str> = MultimapTableDefinition::new("lease_keys");

/// Revisions of history kept for watches.
pub const HISTORY: i64 = 10_000;
/// Batches a watcher may fall behind before its watch is broken.
const WATCH_BUFFER: usize = 4096;
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// The single-machine [`Store`], in one redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once closed ([`EmbeddedStore::close`]: the file is free for
    /// another process).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    revision: Revision,
    /// Watches from below this revision fail with `Compacted`.
    compact_revision: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Vec<Event>>,
}

fn backend(op: &'static str) -> impl Fn(redb::Error) -> StoreError {
    move |e| StoreError::Backend { op, message: e.to_string(), maybe_applied: false }
}

macro_rules! db {
    ($op:literal, $e:expr) => {
        $e.map_err(|e| backend($op)(e.into()))?
    };
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir/store.redb`. Must be called
    /// inside a tokio runtime: it starts the lease expiry task.
    pub async fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let path = dir.join("store.redb");
        let p = path.clone();
        let inner = tokio::task::spawn_blocking(move || Inner::open(p))
            .await
            .map_err(|e| StoreError::Open { path: path.display().to_string(), message: e.to_string() })??;
        let inner = Arc::new(inner);
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Moves the store's revision up to `to` (nothing below it is kept in
    /// the history: a watch from before fails with `Compacted`), so that
    /// every revision, and so every fencing token and id derived from one,
    /// handed out from now on is above `to`. A restore does this: time
    /// only moves forward.
    pub async fn advance_revision(&self, to: Revision) -> Result<(), StoreError> {
        self.blocking(move |i| i.advance(to)).await
    }

    /// Closes the file now, whoever still holds this store: every call
    /// after fails with [`StoreError::Closed`], and another process may
    /// open the data directory (a binary upgrade hands it over).
    pub async fn close(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let db = inner.db.write().unwrap_or_else(|p| p.into_inner()).take();
            drop(db);
        })
        .await;
        tracing::info!(path = %self.inner.path.display(), "store closed");
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|_| StoreError::Closed)?
    }
}

impl Inner {
    fn open(path: PathBuf) -> Result<Inner, StoreError> {
        let open_err = |message: String| StoreError::Open { path: path.display().to_string(), message };
        // Past the file's header, an error reading it is damage.
        let damaged = |message: String| StoreError::Damaged { path: path.display().to_string(), message };
        // The store holds every service's environment: owner only, from
        // its first byte (and closed again if an older halo left it open).
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
                .map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                open_err("already open by another process (is another halo running on this data dir?)".into())
            }
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => damaged(m),
            redb::DatabaseError::Storage(redb::StorageError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                damaged(e.to_string())
            }
            e => open_err(e.to_string()),
        })?;
        let open_err = damaged;
        let w = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        let (mut revision, mut compact_revision, mut next_lease) = (0, 0, 1);
        let mut leases = HashMap::new();
        {
            let meta = w.open_table(META).map_err(|e| open_err(e.to_string()))?;
            let get = |k: &str| meta.get(k).map(|v| v.map(|g| g.value()));
            revision = get("revision").map_err(|e| open_err(e.to_string()))?.unwrap_or(revision);
            compact_revision =
                get("compact_revision").map_err(|e| open_err(e.to_string()))?.unwrap_or(compact_revision);
            next_lease = get("next_lease").map_err(|e| open_err(e.to_string()))?.unwrap_or(next_lease);
            let now = Instant::now();
            let table = w.open_table(LEASES).map_err(|e| open_err(e.to_string()))?;
            for item in table.iter().map_err(|e| open_err(e.to_string()))? {
                let (id, ttl) = item.map_err(|e| open_err(e.to_string()))?;
                let ttl = Duration::from_millis(ttl.value());
                leases.insert(id.value(), Lease { ttl, deadline: now + ttl });
            }
            w.open_table(KV).map_err(|e| open_err(e.to_string()))?;
            w.open_table(HISTORY_TABLE).map_err(|e| open_err(e.to_string()))?;
            w.open_multimap_table(LEASE_KEYS).map_err(|e| open_err(e.to_string()))?;
        }
        w.commit().map_err(|e| open_err(e.to_string()))?;
        tracing::info!(path = %path.display(), revision, leases = leases.len(), "store opened");
        let state = State { revision, compact_revision, next_lease, leases, watchers: Vec::new() };
        Ok(Inner { db: std::sync::RwLock::new(Some(db)), path, state: Mutex::new(state) })
    }

    fn read(&self, op: &'static str) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or(StoreError::Closed)?;
        db.begin_read().map_err(|e| backend(op)(e.into()))
    }

    fn write(&self, op: &'static str) -> Result<redb::WriteTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = db.as_ref().ok_or(StoreError::Closed)?;
        db.begin_write().map_err(|e| backend(op)(e.into()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.read("get")?;
        let kv = db!("get", r.open_table(KV));
        let found = db!("get", kv.get(key));
        found.map(|v| decode(key, v.value())).transpose()
    }

    fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let r = self.read("list")?;
        let revision = db!("list", db!("list", r.open_table(META)).get("revision")).map_or(0, |g| g.value());
        let kv = db!("list", r.open_table(KV));
        let mut kvs = Vec::new();
        for item in db!("list", kv.range(prefix..)) {
            let (k, v) = db!("list", item);
            if !k.value().starts_with(prefix) {
                break;
            }
            kvs.push(decode(k.value(), v.value())?);
        }
        Ok(Listing { kvs, revision })
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResult, StoreError> {
        let mut st = self.lock();
        let w = self.write("txn")?;
        let rev = st.revision + 1;
        let (succeeded, events) = {
            let mut kv = db!("txn", w.open_table(KV));
            let mut lease_keys = db!("txn", w.open_multimap_table(LEASE_KEYS));
            let mut succeeded = true;
            for c in &txn.compares {
                let cur = db!("txn", kv.get(c.key.as_str())).map(|v| decode(&c.key, v.value())).transpose()?;
                succeeded &= c.holds(cur.as_ref());
            }
            let ops = if succeeded { &txn.success } else { &txn.failure };
            let mut events = Vec::new();
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => {
                        if let Some(l) = lease.filter(|l| !st.leases.contains_key(l)) {
                            return Err(StoreError::LeaseNotFound(l));
                        }
                        let prev = db!("txn", kv.get(key.as_str())).map(|v| decode(key, v.value())).transpose()?;
                        if let Some(old) = prev.as_ref().and_then(|p| p.lease) {
                            db!("txn", lease_keys.remove(old, key.as_str()));
                        }
                        let new = KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                            mod_revision: rev,
                            version: prev.as_ref().map_or(1, |p| p.version + 1),
                            lease: *lease,
                        };
                        db!("txn", kv.insert(key.as_str(), codec::encode_record(&new).as_slice()));
                        if let Some(l) = lease {
                            db!("txn", lease_keys.insert(*l, key.as_str()));
                        }
                        events.push(Event { kind: EventKind::Put, kv: new });
                    }
                    TxnOp::Delete(key) => events.extend(delete_key(&mut kv, &mut lease_keys, key, rev)?),
                    TxnOp::DeletePrefix(prefix) => {
                        let mut keys = Vec::new();
                        for item in db!("txn", kv.range(prefix.as_str()..)) {
                            let (k, _) = db!("txn", item);
                            if !k.value().starts_with(prefix.as_str()) {
                                break;
                            }
                            keys.push(k.value().to_string());
                        }
                        for key in keys {
                            events.extend(delete_key(&mut kv, &mut lease_keys, &key, rev)?);
                        }
                    }
                }
            }
            (succeeded, events)
        };
        if events.is_empty() {
            db!("txn", w.abort());
            return Ok(TxnResult { succeeded, revision: st.revision });
        }
        let compact_revision = self.record(&w, &st, rev, &events)?;
        db!("txn", w.commit());
        st.revision = rev;
        st.compact_revision = compact_revision;
        notify(&mut st, &events);
        Ok(TxnResult { succeeded, revision: rev })
    }

    /// Writes `rev`'s history entry and the new revision; compacts old
    /// history. Returns the compact revision after this write.
    fn record(
        &self,
        w: &redb::WriteTransaction,
        st: &State,
        rev: Revision,
        events: &[Event],
    ) -> Result<Revision, StoreError> {
        let mut history = db!("txn", w.open_table(HISTORY_TABLE));
        db!("txn", history.insert(rev, codec::encode_events(events).as_slice()));
        let mut meta = db!("txn", w.open_table(META));
        db!("txn", meta.insert("revision", rev));
        // Compact in steps of a tenth of the history, not on every write.
        let mut compact_revision = st.compact_revision;
        if rev - compact_revision > HISTORY + HISTORY / 10 {
            compact_revision = rev - HISTORY;
            db!("txn", history.retain_in(..compact_revision, |_, _| false));
            db!("txn", meta.insert("compact_revision", compact_revision));
        }
        Ok(compact_revision)
    }

    fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let mut st = self.lock();
        let from = if from <= 0 { st.revision + 1 } else { from };
        if from < st.compact_revision {
            return Err(StoreError::Compacted { requested: from, compacted: st.compact_revision });
        }
        let mut backlog = Vec::new();
        let r = self.read("watch")?;
        let history = db!("watch", r.open_table(HISTORY_TABLE));
        for item in db!("watch", history.range(from..)) {
            let (rev, bytes) = db!("watch", item);
            let events =
                codec::decode_events(bytes.value()).ok_or_else(|| corrupt("history", &rev.value().to_string()))?;
            let events: Vec<Event> = events.into_iter().filter(|e| e.kv.key.starts_with(prefix)).collect();
            if !events.is_empty() {
                backlog.push(events);
            }
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER + backlog.len());
        for batch in backlog {
            tx.try_send(batch).expect("the channel has room for the backlog");
        }
        st.watchers.push(Watcher { prefix: prefix.to_string(), tx });
        Ok(Watch::from_channel(rx))
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut st = self.lock();
        if revision > st.revision {
            return Err(StoreError::Invalid(format!(
                "cannot compact to revision {revision}: the store is at revision {}",
                st.revision
            )));
        }
        if revision <= st.compact_revision {
            return Ok(());
        }
        let w = self.write("compact")?;
        {
            let mut history = db!("compact", w.open_table(HISTORY_TABLE));
            db!("compact", history.retain_in(..revision, |_, _| false));
            db!("compact", db!("compact", w.open_table(META)).insert("compact_revision", revision));
        }
        db!("compact", w.commit());
        st.compact_revision = revision;
        Ok(())
    }

    fn advance(&self, to: Revision) -> Result<(), StoreError> {
        let mut st = self.lock();
        if to <= st.revision {
            return Ok(());
        }
        let w = self.write("advance")?;
        {
            let mut meta = db!("advance", w.open_table(META));
            db!("advance", meta.insert("revision", to));
            db!("advance", meta.insert("compact_revision", to));
            let mut history = db!("advance", w.open_table(HISTORY_TABLE));
            db!("advance", history.retain_in(..to, |_, _| false));
        }
        db!("advance", w.commit());
        st.revision = to;
        st.compact_revision = to;
        Ok(())
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl < Duration::from_millis(100) {
            return Err(StoreError::Invalid(format!("lease TTL {ttl:?} is too short (at least 100ms)")));
        }
        let mut st = self.lock();
        let id = st.next_lease;
        let w = self.write("grant")?;
        {
            db!("grant", db!("grant", w.open_table(LEASES)).insert(id, ttl.as_millis() as u64));
            db!("grant", db!("grant", w.open_table(META)).insert("next_lease", id + 1));
        }
        db!("grant", w.commit());
        st.next_lease = id + 1;
        st.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl });
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut st = self.lock();
        let l = st.leases.get_mut(&lease).ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut st = self.lock();
        if !st.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let rev = st.revision + 1;
        let w = self.write("revoke")?;
        let events = {
            let mut kv = db!("revoke", w.open_table(KV));
            let mut lease_keys = db!("revoke", w.open_multimap_table(LEASE_KEYS));
            let mut keys: Vec<String> = Vec::new();
            for k in db!("revoke", lease_keys.get(lease)) {
                keys.push(db!("revoke", k).value().to_string());
            }
            let mut events = Vec::new();
            for key in keys {
                events.extend(delete_key(&mut kv, &mut lease_keys, &key, rev)?);
            }
            db!("revoke", db!("revoke", w.open_table(LEASES)).remove(lease));
            events
        };
        let compact_revision =
            if events.is_empty() { st.compact_revision } else { self.record(&w, &st, rev, &events)? };
        db!("revoke", w.commit());
        st.leases.remove(&lease);
        if !events.is_empty() {
            st.revision = rev;
            st.compact_revision = compact_revision;
            notify(&mut st, &events);
        }
        Ok(())
    }
}

fn delete_key(
    kv: &mut redb::Table<&str, &[u8]>,
    lease_keys: &mut redb::MultimapTable<i64, &str>,
    key: &str,
    rev: Revision,
) -> Result<Option<Event>, StoreError> {
    let Some(prev) = db!("delete", kv.remove(key)).map(|v| decode(key, v.value())).transpose()? else {
        return Ok(None);
    };
    if let Some(l) = prev.lease {
        db!("delete", lease_keys.remove(l, key));
    }
    let kv = KeyValue {
        key: key.to_string(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: rev,
        version: 0,
        lease: None,
    };
    Ok(Some(Event { kind: EventKind::Delete, kv }))
}

fn decode(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    codec::decode_record(key, bytes).ok_or_else(|| corrupt("key", key))
}

fn corrupt(what: &str, name: &str) -> StoreError {
    StoreError::Backend { op: "read", message: format!("corrupt {what} record {name}"), maybe_applied: false }
}

/// Hands `events` to every watcher of their prefixes. A watcher that is
/// gone or too far behind is dropped: its stream ends and it resumes.
fn notify(st: &mut State, events: &[Event]) {
    st.watchers.retain(|w| {
        let batch: Vec<Event> = events.iter().filter(|e| e.kv.key.starts_with(&w.prefix)).cloned().collect();
        if batch.is_empty() {
            return !w.tx.is_closed();
        }
        match w.tx.try_send(batch) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(prefix = %w.prefix, "watcher fell behind; its watch is broken and must resume");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

async fn expire_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(EXPIRY_TICK).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> =
            inner.lock().leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        if expired.is_empty() {
            continue;
        }
        let result = tokio::task::spawn_blocking(move || {
            for id in expired {
                match inner.revoke(id) {
                    Ok(()) => tracing::info!(lease = format_args!("{id:x}"), "lease expired"),
                    Err(StoreError::LeaseNotFound(_)) => {}
                    Err(e) => tracing::warn!(lease = format_args!("{id:x}"), error = %e, "expiring lease failed"),
                }
            }
        })
        .await;
        if result.is_err() {
            return;
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |i| i.get(&key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.list(&prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        txn.validate()?;
        self.blocking(move |i| i.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |i| i.watch(&prefix, from)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |i| i.compact(revision)).await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner.keep_alive(lease)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease)).await
    }

    async fn close(&self) {
        EmbeddedStore::close(self).await
    }
}
