//! What every part of a node shares: the store, the watch-fed view,
//! membership (lease, fencing tokens, events), how to reach and judge the
//! other nodes, the environment instances run in, the data dir, and the
//! node's tasks. The reconciler, hooks, backups, the leader and the API
//! each take this, not one another.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use halo_store::Store;
use halo_supervisor::Env;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Every task of a node: each one is spawned here, and [`Tasks::stop`]
/// cancels them all and waits until each has ended. Nothing a node starts
/// is detached.
#[derive(Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Runs `task` until it ends or the node stops, whichever is first
    /// (a stopped task is dropped at the point where it waits).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Runs `task` to its end even when the node stops (an instance being
    /// stopped is stopped whole); [`Tasks::stop`] waits for it.
    pub fn spawn_to_end(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Cancels every task and waits for all to end; one spawned later ends
    /// at once.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Tasks not yet ended.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_cancels_every_task_and_waits_for_them() {
        let tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(4);
        for _ in 0..3 {
            let tx = tx.clone();
            // Holds its sender until dropped: the channel closes only once
            // every task has ended.
            tasks.spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await
            });
        }
        drop(tx);
        assert_eq!(tasks.running(), 3);
        tasks.stop().await;
        assert_eq!(tasks.running(), 0);
        assert!(rx.recv().await.is_none(), "every task dropped what it held");
        // Spawned after the stop: ends at once.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        assert!(rx.await.is_err());
    }
}
