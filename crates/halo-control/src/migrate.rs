//! Brings a store written by an older halo to the current key schema
//! ([`SCHEMA_VERSION`]) before anything else reads it.
//!
//! Version 1 (no `/halo/schema` key): `halo up` kept its instance records
//! at `/halo/instances/SERVICE/ID` and no assignments: the node decided by
//! itself. Each such record moves under this node's name and gets an
//! assignment (token 0, older than any election) with the record's own
//! template, so the instance is adopted, not replaced: same id, same pid.
//! Cluster stores of version 1 already had the current layout.

use halo_store::{Compare, Store, StoreError, Txn, TxnOp};

use crate::keys::{assignment_key, instance_key, Assignment, InstanceRecord, INSTANCES, SCHEMA, SCHEMA_VERSION};
use crate::scheduler::Placement;

/// etcd refuses transactions of more than 128 operations.
const OPS_PER_TXN: usize = 90;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the store was written by a newer halo (key schema {found}; this halo knows up to {SCHEMA_VERSION}); \
         run that version or newer"
    )]
    Newer { found: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Migrates the store, as `node`, to the current layout; a no-op on a
/// current one. Safe to rerun after a crash half-way: every step is an
/// idempotent put or delete, and the version is written last.
pub async fn migrate(store: &dyn Store, node: &str) -> Result<(), MigrateError> {
    if let Some(kv) = store.get(SCHEMA).await? {
        let found = String::from_utf8_lossy(&kv.value).trim().to_string();
        return match found.parse::<u32>() {
            Ok(v) if v <= SCHEMA_VERSION => Ok(()),
            _ => Err(MigrateError::Newer { found }),
        };
    }
    let mut ops = Vec::new();
    for kv in store.list(INSTANCES).await?.kvs {
        // SERVICE/ID: two segments. NODE/SERVICE/ID is already current.
        if kv.key[INSTANCES.len()..].split('/').count() != 2 {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<InstanceRecord>(&kv.value) else { continue };
        tracing::info!(instance = %rec.id, node, "moving an instance record to the cluster layout");
        let a = Assignment {
            placement: Placement {
                id: rec.id.clone(),
                service: rec.service.clone(),
                template: rec.template.clone(),
                node: node.to_string(),
            },
            token: 0,
        };
        ops.push(TxnOp::put(&instance_key(node, &rec.service, &rec.id), kv.value.clone(), None));
        ops.push(TxnOp::put(&assignment_key(node, &rec.id), serde_json::to_vec(&a).expect("encodes"), None));
        ops.push(TxnOp::Delete(kv.key.clone()));
    }
    for chunk in ops.chunks(OPS_PER_TXN) {
        let mut txn = Txn::new();
        txn.success = chunk.to_vec();
        store.txn(txn).await?;
    }
    let version = SCHEMA_VERSION.to_string().into_bytes();
    store.txn(Txn::new().when(Compare::absent(SCHEMA)).and_then(TxnOp::put(SCHEMA, version, None))).await?;
    Ok(())
}
