//! The values the [`Store`](crate::Store) trait speaks in, modelled on etcd v3.

use tokio::sync::mpsc;

use crate::StoreError;

/// A store-wide revision: every change bumps it by one; it never goes back.
pub type Revision = i64;

/// A lease handle. Keys attached to a lease are deleted when it ends.
pub type LeaseId = i64;

/// One key with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (0 in a delete event).
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// Puts since the key was created, starting at 1 (0 in a delete event).
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// The result of [`Store::list`](crate::Store::list).
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing was read at.
    pub revision: Revision,
}

/// What a compare looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version; 0 when the key does not exist.
    Version(i64),
    /// The key's create revision; 0 when the key does not exist.
    CreateRevision(Revision),
    /// The key's mod revision; 0 when the key does not exist.
    ModRevision(Revision),
    /// The key's value; a missing key never compares equal.
    Value(Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn new(key: &str, op: CompareOp, target: CompareTarget) -> Compare {
        Compare { key: key.to_string(), op, target }
    }

    /// The key exists.
    pub fn exists(key: &str) -> Compare {
        Compare::new(key, CompareOp::Greater, CompareTarget::Version(0))
    }

    /// The key does not exist.
    pub fn absent(key: &str) -> Compare {
        Compare::new(key, CompareOp::Equal, CompareTarget::Version(0))
    }

    /// The key was last changed at `rev` (0: it does not exist).
    pub fn mod_revision(key: &str, rev: Revision) -> Compare {
        Compare::new(key, CompareOp::Equal, CompareTarget::ModRevision(rev))
    }

    /// Whether the compare holds for `kv` (`None`: the key is absent).
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ord = match (&self.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(want), Some(kv)) => kv.value.as_slice().cmp(want.as_slice()),
            (CompareTarget::Version(want), kv) => kv.map_or(0, |k| k.version).cmp(want),
            (CompareTarget::CreateRevision(want), kv) => kv.map_or(0, |k| k.create_revision).cmp(want),
            (CompareTarget::ModRevision(want), kv) => kv.map_or(0, |k| k.mod_revision).cmp(want),
        };
        match self.op {
            CompareOp::Equal => ord == Ordering::Equal,
            CompareOp::NotEqual => ord != Ordering::Equal,
            CompareOp::Less => ord == Ordering::Less,
            CompareOp::Greater => ord == Ordering::Greater,
        }
    }
}

/// One change inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete(String),
    DeletePrefix(String),
}

impl TxnOp {
    pub fn put(key: &str, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> TxnOp {
        TxnOp::Put { key: key.to_string(), value: value.into(), lease }
    }
}

/// An atomic compare-and-swap: `success` ops if every compare holds, else
/// `failure` ops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }

    pub fn when(mut self, c: Compare) -> Txn {
        self.compares.push(c);
        self
    }

    pub fn and_then(mut self, op: TxnOp) -> Txn {
        self.success.push(op);
        self
    }

    pub fn or_else(mut self, op: TxnOp) -> Txn {
        self.failure.push(op);
        self
    }

    /// Whether applying it twice does what applying it once does: no op
    /// writes a key a compare reads (a fenced write checks the leader key
    /// and writes others; a compare-and-swap is not repeatable).
    pub fn repeatable(&self) -> bool {
        let writes = |key: &str| {
            self.success.iter().chain(&self.failure).any(|op| match op {
                TxnOp::Put { key: k, .. } | TxnOp::Delete(k) => k == key,
                TxnOp::DeletePrefix(p) => key.starts_with(p.as_str()),
            })
        };
        !self.compares.iter().any(|c| writes(&c.key))
    }

    /// Checks what every backend refuses alike, before anything is applied.
    pub fn validate(&self) -> Result<(), StoreError> {
        let keys = self.compares.iter().map(|c| &c.key);
        let op_keys = self.success.iter().chain(&self.failure).filter_map(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::Delete(key) => Some(key),
            TxnOp::DeletePrefix(_) => None,
        });
        if keys.chain(op_keys).any(|k| k.is_empty()) {
            return Err(StoreError::Invalid("empty key (keys are non-empty UTF-8 paths)".into()));
        }
        Ok(())
    }
}

/// The outcome of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (the `success` branch ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv` has the key and the
/// deletion's revision as `mod_revision`, and an empty value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A prefix watch: batches of events, one per revision, in order.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<Vec<Event>>,
}

impl Watch {
    /// A watch fed by `rx`; backends build it.
    pub fn from_channel(rx: mpsc::Receiver<Vec<Event>>) -> Watch {
        Watch { rx }
    }

    /// The next batch; `None` when the watch broke (resume from the last
    /// revision seen + 1).
    pub async fn next(&mut self) -> Option<Vec<Event>> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_repeatable_when_it_writes_no_key_it_compares() {
        let fenced = Txn::new()
            .when(Compare::new("/leader", CompareOp::Equal, CompareTarget::CreateRevision(6)))
            .and_then(TxnOp::put("/assignments/a", "x", None))
            .and_then(TxnOp::Delete("/assignments/b".into()));
        assert!(fenced.repeatable());
        assert!(Txn::new().and_then(TxnOp::put("/k", "v", None)).repeatable());
        let create = Txn::new().when(Compare::absent("/leader")).and_then(TxnOp::put("/leader", "n1", None));
        assert!(!create.repeatable());
        let delete = Txn::new().when(Compare::exists("/k")).and_then(TxnOp::Delete("/k".into()));
        assert!(!delete.repeatable());
        let wipe = Txn::new().when(Compare::absent("/a/b")).or_else(TxnOp::DeletePrefix("/a/".into()));
        assert!(!wipe.repeatable());
    }
}
