//! State that outlives config snapshots, and the building of snapshots.
//!
//! The registry keeps endpoint state (health, pools, statistics), route
//! statistics and retry budgets by name. Building a snapshot from a new
//! [`Config`] reuses every piece of state whose name is unchanged, so a reload
//! keeps health and pooled connections; an endpoint that leaves the config is
//! dropped from the registry and finishes its in-flight requests through the
//! references those requests hold (drained, not cut).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::config::{Config, UpstreamConfig};
use crate::endpoint::Endpoint;
use crate::health;
use crate::metrics::{ListenerStats, UpstreamStats};
use crate::router::{Route, RouteRuntime};
use crate::upstream::{Group, Slot};
use halo_model::lock::LockExt;

type EndpointMap = HashMap<(String, SocketAddr), Arc<Endpoint>>;

#[derive(Default)]
pub struct Registry {
    endpoints: Mutex<EndpointMap>,
    routes: Mutex<HashMap<String, Arc<RouteRuntime>>>,
    upstreams: Mutex<HashMap<String, Arc<UpstreamStats>>>,
    pub listeners: Mutex<HashMap<String, Arc<ListenerStats>>>,
    /// The runtime that runs health checks (the control runtime).
    control: std::sync::OnceLock<tokio::runtime::Handle>,
    /// The background tasks: active checks, certificate watching, the
    /// admin API; stopped with the proxy.
    tasks: crate::tasks::Tasks,
    /// Health an old process handed over (binary upgrade), given to each
    /// endpoint when it is created: at start, or when its upstream's
    /// endpoints are fed later.
    restores: Mutex<HashMap<(String, SocketAddr), crate::handover::EndpointState>>,
    /// Notified when a request starts waiting for an upstream's first
    /// endpoint (every upstream's [`UpstreamStats::demand`]).
    pub demand: Arc<tokio::sync::Notify>,
}

/// One immutable routing snapshot.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: Vec<Route>,
    pub groups: HashMap<String, Arc<Slot>>,
}

impl Registry {
    pub fn set_restores(&self, states: Vec<crate::handover::EndpointState>) {
        let mut r = self.restores.locked();
        r.extend(states.into_iter().map(|s| ((s.upstream.clone(), s.addr), s)));
    }

    pub fn set_control(&self, rt: tokio::runtime::Handle) {
        let _ = self.control.set(rt);
    }

    /// Runs a background task (health checks, certificate watching) on
    /// the control runtime, or the current one when none was set.
    pub fn spawn_control(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        match self.control.get().cloned().or_else(|| tokio::runtime::Handle::try_current().ok()) {
            Some(rt) => self.tasks.spawn_on(task, &rt),
            None => tracing::error!("no runtime for background tasks"),
        }
    }

    /// Cancels the background tasks and waits until each has ended.
    pub async fn stop_tasks(&self) {
        self.tasks.stop().await;
    }

    /// Builds the snapshot for `config`, creating state for new endpoints and
    /// routes and forgetting state for the ones that left.
    pub fn build(&self, config: Arc<Config>) -> Snapshot {
        let groups: HashMap<String, Arc<Slot>> = {
            let mut eps = self.endpoints.locked();
            let mut keep = HashMap::new();
            let groups = config
                .upstreams
                .values()
                .map(|u| {
                    let group = self.group(&mut eps, &mut keep, Arc::new(u.clone()));
                    (u.name.clone(), Arc::new(Slot::from_pointee(group)))
                })
                .collect();
            for ((up, addr), ep) in eps.drain() {
                tracing::info!(upstream = %up, endpoint = %addr, "endpoint removed; draining its in-flight requests");
                ep.retire();
            }
            *eps = keep;
            groups
        };
        self.upstreams.locked().retain(|name, _| groups.contains_key(name));
        let mut rts = self.routes.locked();
        let mut keep_rts = HashMap::new();
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let rt: Arc<RouteRuntime> = rts.remove(&r.name).unwrap_or_default();
                rt.set_rate(r.rate_limit);
                keep_rts.insert(r.name.clone(), rt.clone());
                let split: Vec<(Arc<Slot>, u32)> = r.split.iter().map(|(u, w)| (groups[u].clone(), *w)).collect();
                Route {
                    total_weight: split.iter().map(|(_, w)| u64::from(*w)).sum(),
                    split,
                    overrides: r
                        .overrides
                        .iter()
                        .map(|o| (o.matcher.clone(), o.value.clone(), groups[&o.upstream].clone()))
                        .collect(),
                    cfg: r.clone(),
                    rt,
                }
            })
            .collect();
        *rts = keep_rts;
        drop(rts);
        for l in &config.listeners {
            self.listener(&l.name).conns.set_max(l.max_connections);
        }
        Snapshot { config, routes, groups }
    }

    /// The group of one upstream whose endpoints changed, keeping the
    /// state of the endpoints it still has.
    pub fn regroup(&self, u: Arc<UpstreamConfig>) -> Group {
        let mut eps = self.endpoints.locked();
        let mut keep = HashMap::new();
        let group = self.group(&mut eps, &mut keep, u.clone());
        eps.retain(|(up, addr), ep| {
            let gone = *up == u.name;
            if gone {
                tracing::info!(upstream = %up, endpoint = %addr, "endpoint removed; draining its in-flight requests");
                ep.retire();
            }
            !gone
        });
        eps.extend(keep);
        group
    }

    /// `u`'s group: endpoints taken from `eps` (state kept) or created,
    /// and put in `keep`.
    fn group(&self, eps: &mut EndpointMap, keep: &mut EndpointMap, u: Arc<UpstreamConfig>) -> Group {
        let list = u
            .endpoints
            .iter()
            .map(|e| {
                let key = (u.name.clone(), e.addr);
                // A protocol change needs a new pool, so a new endpoint.
                let kept = match eps.remove(&key) {
                    // A protocol or TLS change needs a new pool, so a new endpoint.
                    Some(ep) if ep.settings.load().protocol == u.protocol && ep.settings.load().tls == u.tls => {
                        Some(ep)
                    }
                    Some(old) => {
                        old.retire();
                        None
                    }
                    None => None,
                };
                let ep = match kept {
                    Some(ep) => {
                        update_endpoint(&ep, &u, e.weight);
                        ep
                    }
                    None => {
                        let ep = Arc::new(Endpoint::new(e.addr, e.weight, u.clone()));
                        let restore = self.restores.locked().remove(&key);
                        if let Some(s) = restore {
                            ep.restore(&s, crate::util::now_ms());
                        }
                        self.spawn_control(health::checker(Arc::downgrade(&ep)));
                        ep
                    }
                };
                keep.insert(key, ep.clone());
                ep
            })
            .collect();
        let stats = self.upstreams.locked().entry(u.name.clone()).or_insert_with(|| self.new_stats()).clone();
        Group::new(u, list, stats)
    }

    fn new_stats(&self) -> Arc<UpstreamStats> {
        Arc::new(UpstreamStats { demand: self.demand.clone(), ..UpstreamStats::default() })
    }

    /// Every upstream's counters, by name, sorted.
    pub fn upstream_stats(&self) -> Vec<(String, Arc<UpstreamStats>)> {
        let mut v: Vec<_> = self.upstreams.locked().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn route_stats(&self) -> Vec<(String, Arc<RouteRuntime>)> {
        let mut v: Vec<_> = self.routes.locked().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        let mut v: Vec<_> = self.endpoints.locked().values().cloned().collect();
        v.sort_by(|a, b| (&*a.upstream, a.addr).cmp(&(&*b.upstream, b.addr)));
        v
    }

    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        self.listeners.locked().entry(name.to_string()).or_default().clone()
    }
}

fn update_endpoint(ep: &Endpoint, u: &Arc<UpstreamConfig>, weight: u32) {
    ep.weight.store(weight, Relaxed);
    if ep.settings.load().pool != u.pool {
        ep.pool.reconfigure(&u.pool);
    }
    ep.settings.store(u.clone());
}
