//! [`Node`]: what the API and the binary drive. Service changes go to the
//! store as compare-and-swap transactions; the reconciler acts on them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halo_model::{ServiceFile, SpecErrors};
use halo_proxy::Proxy;
use halo_store::{Compare, Store, StoreError, Txn, TxnOp};
use halo_supervisor::{Env, LogFile, Status};
use serde::Serialize;

use crate::node::Inner;
use crate::records::{service_key, ServiceRecord, SERVICES};
use crate::NodeConfig;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid service:\n{0}")]
    Invalid(#[from] SpecErrors),
    #[error("{0}")]
    BadRequest(String),
    #[error("no service named '{0}'")]
    NotFound(String),
    #[error("the service changed while this request was applied; try again")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the node: {0}")]
    Start(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub status: Status,
    /// Being drained and stopped.
    pub stopping: bool,
    /// Runs the current spec (false: waiting to be replaced).
    pub current: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub replicas: u32,
    pub ready: usize,
    pub instances: Vec<InstanceView>,
}

/// A running single node: store, supervisor, proxy, reconciler.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Starts the proxy, takes over instances left by a previous run,
    /// creates the node file's services the store does not have, and runs
    /// the reconciler.
    pub async fn start(
        cfg: NodeConfig,
        data_dir: PathBuf,
        store: Arc<dyn Store>,
        halo_exe: PathBuf,
    ) -> Result<Node, NodeError> {
        let proxy = Proxy::start(cfg.proxy.clone(), None).await.map_err(|e| NodeError::Start(e.to_string()))?;
        let env =
            Arc::new(Env { logs_dir: data_dir.join("logs"), halo_exe, log_cap: 10 << 20, host: [127, 0, 0, 1].into() });
        let inner = Arc::new(Inner::new(store, proxy, cfg.proxy.clone(), env, data_dir));
        let node = Node { inner };
        for (file, _) in &cfg.services {
            let key = service_key(&file.name);
            let rec = ServiceRecord { spec: file.to_toml(), restart_generation: 0 };
            let txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::put(&key, json(&rec), None));
            if node.inner.store.txn(txn).await?.succeeded {
                tracing::info!(service = %file.name, "service created from the node file");
            }
        }
        node.inner.adopt().await?;
        tokio::spawn(run(node.inner.clone()));
        Ok(node)
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.inner.proxy
    }

    /// Creates or replaces a service from its file's text.
    pub async fn apply(&self, source: &str, text: &str) -> Result<(String, ApplyOutcome), NodeError> {
        let (file, _) = halo_model::parse_service(source, text)?;
        if self.inner.base.upstreams.contains_key(&file.name) {
            return Err(NodeError::BadRequest(format!(
                "name: '{}' is a static upstream of the node file; choose another service name",
                file.name
            )));
        }
        let key = service_key(&file.name);
        let current = self.inner.store.get(&key).await?;
        let (generation, outcome) = match &current {
            Some(kv) => {
                let old: ServiceRecord = decode(&kv.value)?;
                if old.spec == file.to_toml() {
                    return Ok((file.name, ApplyOutcome::Unchanged));
                }
                (old.restart_generation, ApplyOutcome::Updated)
            }
            None => (0, ApplyOutcome::Created),
        };
        let rec = ServiceRecord { spec: file.to_toml(), restart_generation: generation };
        self.put_if_unchanged(&key, current.map_or(0, |kv| kv.mod_revision), &rec).await?;
        Ok((file.name, outcome))
    }

    /// Sets the replica count.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<(), NodeError> {
        self.modify(name, |file, _| {
            file.replicas = Some(replicas);
            file.validate().map(drop).map_err(NodeError::from)
        })
        .await
    }

    /// Replaces every instance, one at a time, keeping capacity.
    pub async fn restart(&self, name: &str) -> Result<(), NodeError> {
        self.modify(name, |_, generation| {
            *generation += 1;
            Ok(())
        })
        .await
    }

    pub async fn delete(&self, name: &str) -> Result<(), NodeError> {
        match self.inner.store.delete(&service_key(name)).await? {
            Some(_) => {
                self.inner.wake.notify_one();
                Ok(())
            }
            None => Err(NodeError::NotFound(name.into())),
        }
    }

    /// The service file as stored.
    pub async fn get(&self, name: &str) -> Result<String, NodeError> {
        let kv = self.inner.store.get(&service_key(name)).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        Ok(decode::<ServiceRecord>(&kv.value)?.spec)
    }

    async fn modify(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServiceFile, &mut u64) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        let key = service_key(name);
        let kv = self.inner.store.get(&key).await?.ok_or_else(|| NodeError::NotFound(name.into()))?;
        let mut rec: ServiceRecord = decode(&kv.value)?;
        let (mut file, _) = halo_model::parse_service(&key, &rec.spec)?;
        f(&mut file, &mut rec.restart_generation)?;
        rec.spec = file.to_toml();
        self.put_if_unchanged(&key, kv.mod_revision, &rec).await
    }

    async fn put_if_unchanged(&self, key: &str, mod_revision: i64, rec: &ServiceRecord) -> Result<(), NodeError> {
        let txn = Txn::new().when(Compare::mod_revision(key, mod_revision)).and_then(TxnOp::put(key, json(rec), None));
        if !self.inner.store.txn(txn).await?.succeeded {
            return Err(NodeError::Conflict);
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Every service with its instances.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let specs = self.inner.service_specs();
        let statuses = self.inner.statuses();
        specs
            .into_iter()
            .map(|(name, (replicas, template))| {
                let instances: Vec<InstanceView> = statuses
                    .iter()
                    .filter(|(s, _)| s.service == name)
                    .map(|(s, stopping)| InstanceView {
                        status: s.clone(),
                        stopping: *stopping,
                        current: self.inner.instance_template(&s.id).as_deref() == Some(template.as_str()),
                    })
                    .collect();
                let ready = instances.iter().filter(|i| i.status.ready && !i.stopping).count();
                ServiceStatus { name, replicas, ready, instances }
            })
            .collect()
    }

    /// Log files of a service's instances (running or recently stopped),
    /// or of one instance.
    pub fn logs(&self, service: &str, instance: Option<&str>) -> Result<Vec<(String, LogFile)>, NodeError> {
        let dir = self.inner.env.logs_dir.join(service);
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|_| NodeError::NotFound(service.into()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(str::to_string))
            .collect();
        ids.sort();
        if let Some(want) = instance {
            ids.retain(|i| i == want);
            if ids.is_empty() {
                return Err(NodeError::BadRequest(format!("service '{service}' has no instance '{want}'")));
            }
        }
        let files =
            ids.into_iter().filter_map(|id| LogFile::new(&self.inner.env.logs_dir, service, &id).ok().map(|f| (id, f)));
        Ok(files.collect())
    }

    /// Supervisor metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP halo_instance_restarts_total Restarts of each instance.\n# TYPE halo_instance_restarts_total counter\n");
        let statuses = self.inner.statuses();
        for (s, _) in &statuses {
            out.push_str(&format!(
                "halo_instance_restarts_total{{service=\"{}\",instance=\"{}\"}} {}\n",
                s.service, s.id, s.restarts
            ));
        }
        out.push_str("# HELP halo_instance_ready Whether each instance passes readiness (1) or not (0).\n# TYPE halo_instance_ready gauge\n");
        for (s, _) in &statuses {
            out.push_str(&format!(
                "halo_instance_ready{{service=\"{}\",instance=\"{}\"}} {}\n",
                s.service,
                s.id,
                u8::from(s.ready)
            ));
        }
        out.push_str("# HELP halo_probe_failures_total Failed probe checks of each instance.\n# TYPE halo_probe_failures_total counter\n");
        for (s, _) in &statuses {
            let f = s.probe_failures;
            for (probe, n) in [("startup", f.startup), ("readiness", f.readiness), ("liveness", f.liveness)] {
                out.push_str(&format!(
                    "halo_probe_failures_total{{service=\"{}\",instance=\"{}\",probe=\"{probe}\"}} {n}\n",
                    s.service, s.id
                ));
            }
        }
        out.push_str("# HELP halo_instance_state Instances by service and state.\n# TYPE halo_instance_state gauge\n");
        let mut counts = std::collections::BTreeMap::new();
        for (s, _) in &statuses {
            let state =
                serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            *counts.entry((s.service.clone(), state)).or_insert(0) += 1;
        }
        for ((service, state), n) in counts {
            out.push_str(&format!("halo_instance_state{{service=\"{service}\",state=\"{state}\"}} {n}\n"));
        }
        out
    }

    /// Leaves every instance running and unsupervised, then drains the
    /// proxy: halo is being replaced and the next one adopts them.
    pub async fn detach(&self, grace: Duration) {
        self.inner.detach_all();
        self.inner.proxy.shutdown(grace).await;
    }

    /// Drains and stops every instance, then the proxy.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop_all().await;
        self.inner.proxy.shutdown(grace).await;
    }
}

fn json(rec: &ServiceRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("a record always encodes")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, NodeError> {
    serde_json::from_slice(bytes).map_err(|e| NodeError::BadRequest(format!("stored record unreadable: {e}")))
}

/// The reconcile loop: on store changes under the service and instance
/// prefixes, on instance status changes, and once a second.
async fn run(node: Arc<Inner>) {
    let mut watch = None;
    loop {
        if let Err(e) = node.reconcile().await {
            tracing::warn!(error = %e, "reconcile failed; retrying");
        }
        if watch.is_none() {
            watch = node.store.watch(SERVICES, 0).await.ok();
        }
        let changed = async {
            match watch.as_mut() {
                Some(w) => w.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            alive = changed => if !alive { watch = None },
            _ = node.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
