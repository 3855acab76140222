//! Endpoint publication: this node's ready instances, as
//! [`EndpointRecord`]s on its lease, so every node's proxy routes to them
//! and they vanish with the node.

use std::collections::BTreeMap;

use halo_store::Store;

use crate::keys::{endpoint_key, EndpointRecord};
use crate::membership::Membership;
use crate::state::ClusterState;

/// One of this node's ready instances.
#[derive(Debug, Clone)]
pub(crate) struct Ready {
    pub service: String,
    pub id: String,
    pub port: u16,
    pub template: String,
}

/// Makes this node's endpoints in the store (as `st` has them) match its
/// `ready` instances, on the current lease; the `unjudged` keys (an
/// instance no readiness probe has judged yet) are left as they are.
/// Without a fresh lease nothing is written: the node may be cut off.
pub(crate) async fn sync(store: &dyn Store, m: &Membership, st: &ClusterState, ready: &[Ready], unjudged: &[String]) {
    let Some(lease) = m.lease() else { return };
    let want: BTreeMap<String, EndpointRecord> = ready
        .iter()
        .map(|r| {
            let e = EndpointRecord {
                node: m.cfg.node.clone(),
                addr: (m.cfg.addr, r.port).into(),
                template: r.template.clone(),
            };
            (endpoint_key(&r.service, &r.id), e)
        })
        .collect();
    let stored: BTreeMap<String, (&EndpointRecord, Option<i64>)> = st
        .endpoints_of(&m.cfg.node)
        .map(|(id, (service, e))| (endpoint_key(service, id), (e, st.endpoint_leases.get(id).copied().flatten())))
        .collect();
    for (key, e) in &want {
        if stored.get(key).is_some_and(|(s, l)| *s == e && *l == Some(lease)) {
            continue;
        }
        let v = serde_json::to_vec(e).expect("an endpoint record encodes");
        if let Err(err) = store.put(key, v, Some(lease)).await {
            tracing::warn!(endpoint = %key, error = %err, "publishing an endpoint failed");
        }
    }
    // An unjudged endpoint moves to this lease (the old process's lease
    // would take it with it when it runs out).
    for (key, (e, l)) in stored.iter().filter(|(k, _)| !want.contains_key(*k) && unjudged.contains(*k)) {
        if *l != Some(lease) {
            let v = serde_json::to_vec(e).expect("an endpoint record encodes");
            if let Err(err) = store.put(key, v, Some(lease)).await {
                tracing::warn!(endpoint = %key, error = %err, "keeping an endpoint failed");
            }
        }
    }
    for key in stored.keys().filter(|k| !want.contains_key(*k) && !unjudged.contains(*k)) {
        if let Err(err) = store.delete(key).await {
            tracing::warn!(endpoint = %key, error = %err, "withdrawing an endpoint failed");
        }
    }
}
