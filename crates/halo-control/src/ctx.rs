//! What every part of a node shares: the store, the watch-fed view,
//! membership (lease, fencing tokens, events), how to reach and judge the
//! other nodes, the environment instances run in, the data dir, and the
//! node's tasks. The reconciler, hooks, backups, the leader and the API
//! each take this, not one another.

use std::path::PathBuf;
use std::sync::Arc;

use halo_proxy::tasks::Tasks;
use halo_store::Store;
use halo_supervisor::Env;

use crate::dial::Dialer;
use crate::membership::Membership;
use crate::peers::Peers;
use crate::state::View;

pub(crate) struct NodeCtx {
    pub store: Arc<dyn Store>,
    pub view: Arc<View>,
    pub m: Arc<Membership>,
    /// How other nodes' APIs are reached, with the cluster's token.
    pub dial: Arc<Dialer>,
    /// Which other nodes answer this one: a silent node's endpoints are
    /// out of this node's proxy before its lease expires.
    pub peers: Arc<Peers>,
    pub env: Arc<Env>,
    pub data_dir: PathBuf,
    pub tasks: Tasks,
}

impl NodeCtx {
    pub fn new(
        store: Arc<dyn Store>,
        view: Arc<View>,
        m: Arc<Membership>,
        dial: Arc<Dialer>,
        env: Arc<Env>,
        data_dir: PathBuf,
    ) -> NodeCtx {
        let lease_of = m.clone();
        let own_lease = Box::new(move || lease_of.lease().is_some());
        let peers = Peers::new(&m.cfg.node, view.clone(), own_lease, dial.clone());
        NodeCtx { store, view, m, dial, peers, env, data_dir, tasks: Tasks::default() }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.m.cfg.node
    }
}
