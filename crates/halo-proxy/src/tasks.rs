//! Tasks that belong to something and end with it: nothing halo starts
//! is detached.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A set of tasks spawned together and stopped together: [`Tasks::stop`]
/// cancels them all and waits until each has ended. A node's tasks (the
/// control plane's `NodeCtx`) and the proxy's background tasks (active
/// checks, certificate watching, the admin API) are each one set.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Runs `task` until it ends or the node stops, whichever is first
    /// (a stopped task is dropped at the point where it waits).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(self.cancellable(task));
    }

    /// [`Tasks::spawn`] on the runtime `rt`.
    pub fn spawn_on(&self, task: impl Future<Output = ()> + Send + 'static, rt: &tokio::runtime::Handle) {
        self.tracker.spawn_on(self.cancellable(task), rt);
    }

    fn cancellable(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let cancel = self.cancel.clone();
        async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        }
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
