//! Container exits from the daemon's event stream: one `GET /events`
//! per node, filtered to this halo's containers, fanned out to the
//! workloads waiting on them. A waiter subscribes before it inspects its
//! container, so no exit falls between the two; every (re)connect of the
//! stream wakes every waiter to inspect again, since exits while the
//! stream was down (a daemon restart) came with no event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::api::{escape, Client, Stream};
use halo_model::lock::LockExt;

#[derive(Debug)]
pub struct Events {
    api: Client,
    /// The label filter: `halo.data_dir=DIR`.
    label: String,
    died: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Bumped on every connect of the stream.
    epoch: watch::Sender<u64>,
    task: OnceLock<()>,
}

/// What wakes one waiter.
pub struct Subscription {
    pub died: watch::Receiver<u64>,
    pub epoch: watch::Receiver<u64>,
}

impl Subscription {
    /// Until the container may have changed: its die event, a reconnect
    /// of the stream, or `backstop` (a safety net against a lost event).
    pub async fn changed(&mut self, backstop: Duration) {
        tokio::select! {
            _ = self.died.changed() => {}
            _ = self.epoch.changed() => {}
            _ = tokio::time::sleep(backstop) => {}
        }
    }
}

impl Events {
    pub fn new(api: Client, label: String) -> Arc<Events> {
        Arc::new(Events {
            api,
            label,
            died: Mutex::new(HashMap::new()),
            epoch: watch::channel(0).0,
            task: OnceLock::new(),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.died.locked()
    }

    /// Wakes for `id`'s exits from now on. Starts the stream on first use.
    pub fn subscribe(self: &Arc<Self>, id: &str) -> Subscription {
        self.task.get_or_init(|| {
            tokio::spawn(follow(self.clone()));
        });
        let died = self.map().entry(id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe();
        Subscription { died, epoch: self.epoch.subscribe() }
    }

    /// `id` is no longer waited on.
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    fn died(&self, id: &str) {
        if let Some(tx) = self.map().get(id) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

async fn follow(events: Arc<Events>) {
    let filters = json!({"type": ["container"], "event": ["die"], "label": [events.label]});
    let path = format!("/events?filters={}", escape(&filters.to_string()));
    let mut warned = false;
    loop {
        match events.api.send(Method::GET, &path, None).await {
            Ok(resp) => {
                if warned {
                    tracing::info!("the Docker daemon answers again; following container events");
                    warned = false;
                }
                events.epoch.send_modify(|n| *n += 1);
                let mut stream = Stream::new(resp);
                loop {
                    match stream.next_json().await {
                        Ok(Some(ev)) => {
                            let id = ev.get("id").or_else(|| ev.pointer("/Actor/ID")).and_then(Value::as_str);
                            if let Some(id) = id {
                                events.died(id);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "the Docker event stream broke");
                            break;
                        }
                    }
                }
                // Whatever died while the stream was down is found by the
                // waiters' inspection on the next connect.
            }
            Err(e) if !warned => {
                tracing::warn!(error = %e, "cannot follow Docker events; retrying");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
