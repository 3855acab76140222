//! Cluster events, as `halo events` and the dashboard show them: instance
//! exits, restarts, crash loops and readiness changes, placements and
//! reschedules, elections, drains, API changes, rollouts and backups.
//!
//! Every node writes the events it sees under `/halo/events/` (key:
//! unix milliseconds, node, sequence, so a listing reads in time order)
//! on an events lease of an hour that is never renewed: each event goes
//! by itself after 50 to 60 minutes (a new lease every 10), and backups,
//! which keep no leased key, leave them out. Writing is best effort and
//! never waits: events queue for a writer task, and when the store is
//! away or the queue is full they are counted as dropped. The view skips
//! them (an event changes nothing the control plane acts on).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_store::{LeaseId, Store};

use crate::keys::EVENTS;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How long an event is kept at least.
const KEEP: Duration = Duration::from_secs(3600);
/// A new events lease this often (so an event lives 50 to 60 minutes).
const ROTATE: Duration = Duration::from_secs(600);
/// Events waiting for the writer; more are dropped.
const QUEUE: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The node that saw it.
    pub node: String,
    /// `warning` for what needs a look, else `info`.
    pub level: Level,
    /// What happened (one word on the wire: `exited`, `crash-loop`, ...).
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub message: String,
}

/// What an event says happened: the contract the CLI (`--wait`), the
/// dashboard and scripts match on, never the wording of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// An instance's process or container ended.
    Exited,
    /// An instance restarts too often and waits the longest backoff.
    CrashLoop,
    Ready,
    NotReady,
    Stopped,
    /// Ended and, by its restart policy, not started again.
    Completed,
    Placed,
    Rescheduled,
    Elected,
    /// A node a majority found silent lost its lease.
    Evicted,
    Applied,
    Scaled,
    Restarted,
    Deleted,
    Drained,
    Undrained,
    /// A node forgotten by an operator.
    Removed,
    /// A rollout's step, window verdict or operator order.
    Rollout,
    /// A canary rolled back (by its analysis, a deadline or an operator).
    RolledBack,
    Backup,
    /// A stateful instance became its service's primary.
    Promoted,
    /// A primary stopped serving writes (fenced, failed, handed over).
    Demoted,
    /// A stateful instance's data was made from the primary (clone, rewind).
    Cloned,
    /// A planned handover of a primary (`halo switchover`).
    Switchover,
    /// A synchronous primary named its standby.
    Synchronous,
    /// A step of a rolling node maintenance (`halo node maintain`).
    Maintenance,
    /// A kind written by another version of halo.
    #[serde(other)]
    Other,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Exited => "exited",
            EventKind::CrashLoop => "crash-loop",
            EventKind::Ready => "ready",
            EventKind::NotReady => "not-ready",
            EventKind::Stopped => "stopped",
            EventKind::Completed => "completed",
            EventKind::Placed => "placed",
            EventKind::Rescheduled => "rescheduled",
            EventKind::Elected => "elected",
            EventKind::Evicted => "evicted",
            EventKind::Applied => "applied",
            EventKind::Scaled => "scaled",
            EventKind::Restarted => "restarted",
            EventKind::Deleted => "deleted",
            EventKind::Drained => "drained",
            EventKind::Undrained => "undrained",
            EventKind::Removed => "removed",
            EventKind::Rollout => "rollout",
            EventKind::RolledBack => "rolled-back",
            EventKind::Backup => "backup",
            EventKind::Promoted => "promoted",
            EventKind::Demoted => "demoted",
            EventKind::Cloned => "cloned",
            EventKind::Switchover => "switchover",
            EventKind::Synchronous => "synchronous",
            EventKind::Maintenance => "maintenance",
            EventKind::Other => "other",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Padded as a column asks (`{:<12}`).
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
}

/// A node's event writer.
pub struct Events {
    node: String,
    tx: Option<mpsc::Sender<Event>>,
    pub dropped: Arc<AtomicU64>,
}

impl Events {
    /// Starts the writer for `node` (on the current runtime; without one,
    /// events are only counted as dropped).
    pub fn start(store: Arc<dyn Store>, node: &str) -> Events {
        let dropped = Arc::new(AtomicU64::new(0));
        let tx = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (tx, rx) = mpsc::channel(QUEUE);
            rt.spawn(write(store, node.to_string(), rx, dropped.clone()));
            tx
        });
        Events { node: node.to_string(), tx, dropped }
    }

    /// Records an event; never waits.
    pub fn emit(&self, level: Level, kind: EventKind, service: Option<&str>, instance: Option<&str>, message: String) {
        let e = Event {
            time_ms: halo_model::clock::unix_ms(),
            node: self.node.clone(),
            level,
            kind,
            service: service.map(str::to_string),
            instance: instance.map(str::to_string),
            message,
        };
        if self.tx.as_ref().is_none_or(|tx| tx.try_send(e).is_err()) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn info(&self, kind: EventKind, service: Option<&str>, instance: Option<&str>, message: String) {
        self.emit(Level::Info, kind, service, instance, message);
    }

    pub fn warn(&self, kind: EventKind, service: Option<&str>, instance: Option<&str>, message: String) {
        self.emit(Level::Warning, kind, service, instance, message);
    }
}

/// The key of an event: time first, so keys sort in time order.
pub fn event_key(e: &Event, seq: u64) -> String {
    format!("{EVENTS}{:013}-{}-{seq:06}", e.time_ms, e.node)
}

async fn write(store: Arc<dyn Store>, node: String, mut rx: mpsc::Receiver<Event>, dropped: Arc<AtomicU64>) {
    let mut lease: Option<(LeaseId, Instant)> = None;
    let mut seq = 0u64;
    while let Some(e) = rx.recv().await {
        if lease.is_none_or(|(_, at)| at.elapsed() >= ROTATE) {
            match store.grant(KEEP).await {
                Ok(id) => lease = Some((id, Instant::now())),
                Err(err) => {
                    tracing::debug!(node = %node, error = %err, "no lease for events; dropping one");
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        seq += 1;
        let value = serde_json::to_vec(&e).expect("an event encodes");
        if let Err(err) = store.put(&event_key(&e, seq), value, lease.map(|(id, _)| id)).await {
            tracing::debug!(node = %node, error = %err, "writing an event failed; dropping it");
            dropped.fetch_add(1, Ordering::Relaxed);
            // The lease may be gone (a restored or reset store): a new one next time.
            lease = None;
        }
    }
}

/// What `/v1/events` lists: the newest `limit` events, oldest first, of
/// `service` if given, and the store revision the listing is at (to
/// follow from).
pub async fn list(
    store: &dyn Store,
    service: Option<&str>,
    limit: usize,
) -> Result<(Vec<Event>, halo_store::Revision), halo_store::StoreError> {
    let listing = store.list(EVENTS).await?;
    let mut events: Vec<Event> = listing
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Event>(&kv.value).ok())
        .filter(|e| service.is_none_or(|s| e.service.as_deref() == Some(s)))
        .collect();
    events.sort_by_key(|e| e.time_ms);
    let skip = events.len().saturating_sub(limit);
    Ok((events.split_off(skip), listing.revision))
}

/// Events from a watch batch (puts only), of `service` if given.
pub fn from_batch(batch: &[halo_store::Event], service: Option<&str>) -> Vec<Event> {
    batch
        .iter()
        .filter(|e| e.kind == halo_store::EventKind::Put)
        .filter_map(|e| serde_json::from_slice::<Event>(&e.kv.value).ok())
        .filter(|e| service.is_none_or(|s| e.service.as_deref() == Some(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_written_on_a_lease_and_listed_in_time_order() {
        let dir = std::env::temp_dir().join(format!("halo-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(halo_store::EmbeddedStore::open(&dir).await.unwrap());
        let ev = Events::start(store.clone(), "n1");
        ev.info(EventKind::Applied, Some("web"), None, "web created".into());
        ev.warn(EventKind::Exited, Some("web"), Some("web-1-0"), "exited with status 3".into());
        ev.info(EventKind::Elected, None, None, "n1 elected".into());
        let mut got = Vec::new();
        for _ in 0..100 {
            got = list(&*store, None, 100).await.unwrap().0;
            if got.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kinds: Vec<&str> = got.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["applied", "exited", "elected"]);
        // The wire spelling is the kind's name; one from another version reads as Other.
        assert_eq!(serde_json::to_string(&EventKind::CrashLoop).unwrap(), "\"crash-loop\"");
        assert_eq!(serde_json::from_str::<EventKind>("\"rolled-back\"").unwrap(), EventKind::RolledBack);
        assert_eq!(serde_json::from_str::<EventKind>("\"some-new-kind\"").unwrap(), EventKind::Other);
        let listing = store.list(EVENTS).await.unwrap();
        assert!(listing.kvs.iter().all(|kv| kv.lease.is_some()), "events live on a lease");
        let web = list(&*store, Some("web"), 1).await.unwrap().0;
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].level, Level::Warning);
        let _ = std::fs::remove_dir_all(dir);
    }
}
