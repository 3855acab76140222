//! What the control plane feeds the proxy: the node file's own proxy
//! config plus, per service, one upstream (its ready endpoints on every
//! node) and its routes. A new config only when services or their
//! templates change; endpoint changes are fed per upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_proxy::config::{
    Config, EndpointConfig, HostMatch, Override, OverrideMatch, PathMatch, RouteConfig, UpstreamConfig,
};
use halo_proxy::Proxy;

use crate::state::{ActiveCanary, ClusterState, Svc};
use crate::stateful::decide::routable;
use halo_model::lock::LockExt;

/// One ready instance as the proxy is fed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ep {
    pub service: String,
    pub id: String,
    pub template: String,
    pub addr: SocketAddr,
}

/// The upstream of a stateful service's replicas, those further behind
/// than `max_lag` left out (`None`: every replica that follows).
pub(crate) fn replica_upstream(service: &str, max_lag: Option<u64>) -> String {
    match max_lag {
        None => format!("{service}.replica"),
        Some(n) => format!("{service}.replica.lag{n}"),
    }
}

/// A replicated service's replica upstreams: `NAME.replica` always (a
/// node file's listener may name it), one more per `max_lag` its routes ask.
fn replica_lags(svc: &Svc) -> Vec<Option<u64>> {
    let mut lags = vec![None];
    for r in &svc.spec.routes {
        if let halo_model::RouteRole::Replica { max_lag: Some(n) } = r.role {
            if !lags.contains(&Some(n)) {
                lags.push(Some(n));
            }
        }
    }
    lags
}

/// The proxy and what it was last given.
pub(crate) struct ProxyFeed {
    pub proxy: Arc<Proxy>,
    /// The node file's proxy config: listeners, static routes and upstreams.
    pub base: Config,
    published: Mutex<Published>,
    /// What a stateful service's primary upstream passes before each
    /// connection (this node's role lease renewed lately).
    pub primary_gate: Option<halo_proxy::config::Gate>,
}

#[derive(Default)]
struct Published {
    /// Each service's template: what its routes and upstream were built
    /// from (`None`: nothing installed yet, or the last install failed).
    layout: Option<BTreeMap<String, String>>,
    endpoints: BTreeMap<String, Vec<EndpointConfig>>,
    /// When the last new config went in.
    reloaded: Option<Instant>,
}

/// How often at most a new config goes in for services added that have
/// nothing to route to yet: a thousand services applied at once cost each
/// node a few configs, not a thousand. A service changed or gone (a
/// rollout's step, a switch), or one with a ready instance, goes in at once.
pub(crate) const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// What a feed of the proxy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fed {
    /// The proxy has all of it.
    Done,
    /// Its endpoints went in but a new config waits until then
    /// ([`RELOAD_EVERY`]): feed it again at that time.
    Later(Instant),
    /// The proxy refused some of it (logged); feed it again.
    Failed,
}

impl ProxyFeed {
    pub fn new(proxy: Arc<Proxy>, base: Config) -> ProxyFeed {
        ProxyFeed { proxy, base, published: Mutex::default(), primary_gate: None }
    }

    /// Feeds the proxy every service of `st` with `endpoints` (service,
    /// template, address): a new config when a service came, went, changed
    /// its template or its canary weight; otherwise only the endpoint sets
    /// that changed, one upstream at a time. During a canary with a ready
    /// canary instance, the canary's endpoints form the upstream
    /// `NAME.canary` and the routes split by the step's weight.
    ///
    /// A stateful service with replicas: its upstream reaches the primary
    /// only (once promoted under the current token), `NAME.replica` the
    /// replicas that follow it ([`crate::stateful::decide::routable`]).
    pub fn publish(&self, st: &ClusterState, endpoints: Vec<Ep>) -> Fed {
        let services = &st.services;
        let canaries: BTreeMap<&String, ActiveCanary> =
            services.keys().filter_map(|n| st.canary(n).map(|c| (n, c))).collect();
        let eps = upstream_endpoints(st, &canaries, endpoints);
        // The canary takes its share (or its cohort) only once it has a
        // ready instance.
        let weights: BTreeMap<String, u32> = canaries
            .iter()
            .filter(|(n, _)| eps.get(&canary_upstream(n)).is_some_and(|l| !l.is_empty()))
            .filter(|(n, c)| c.weight > 0 || services[**n].spec.release.cohort.is_some())
            .map(|(n, c)| ((*n).clone(), c.weight))
            .collect();
        let layout: BTreeMap<String, String> =
            services.iter().map(|(n, s)| (n.clone(), layout_entry(s, weights.get(n)))).collect();
        let mut published = self.published.locked();
        let mut fed = Fed::Done;
        if published.layout.as_ref() != Some(&layout) {
            // Only services added with nothing to route to yet (none
            // changed or gone: a rollout's switch goes in at once, and a
            // service ready is routed) may wait for the next config.
            let only_added = published.layout.as_ref().is_some_and(|old| {
                old.iter().all(|(n, t)| layout.get(n) == Some(t))
                    && layout.keys().filter(|n| !old.contains_key(*n)).all(|n| eps.get(n).is_none_or(Vec::is_empty))
            });
            let due = published.reloaded.map(|at| at + RELOAD_EVERY).filter(|due| *due > Instant::now());
            match due {
                Some(due) if only_added => fed = Fed::Later(due),
                _ => {
                    let cfg = proxy_config(&self.base, services, &eps, &weights, self.primary_gate.as_ref());
                    let reloaded = Some(Instant::now());
                    match self.proxy.reload(cfg) {
                        Ok(()) => *published = Published { layout: Some(layout), endpoints: eps, reloaded },
                        Err(e) => {
                            tracing::error!(error = %e, "updating the proxy failed");
                            published.reloaded = reloaded;
                            return Fed::Failed;
                        }
                    }
                    return Fed::Done;
                }
            }
        }
        match self.set_lists(&mut published, eps) {
            Fed::Done => fed,
            other => other,
        }
    }

    /// Feeds the proxy the endpoints of the `changed` services alone, from
    /// `endpoints` (theirs): a change costs what it changed. `None` when
    /// that is not enough (a service new to the proxy or gone, or in a
    /// canary): [`ProxyFeed::publish`] then.
    pub fn publish_some(&self, st: &ClusterState, changed: &BTreeSet<String>, endpoints: Vec<Ep>) -> Option<Fed> {
        let mut published = self.published.locked();
        let layout = published.layout.as_ref()?;
        let mut by_service: BTreeMap<String, Vec<Ep>> = BTreeMap::new();
        for e in endpoints {
            by_service.entry(e.service.clone()).or_default().push(e);
        }
        let mut lists = BTreeMap::new();
        let mut added = false;
        for name in changed {
            // Gone, or in a canary: a new config now.
            let svc = st.services.get(name)?;
            if st.canary(name).is_some() {
                return None;
            }
            match layout.get(name) {
                // New and ready: into the config now (ready means
                // routed). New with nothing to route to: it may wait.
                None if by_service.get(name).is_some_and(|e| !e.is_empty()) => return None,
                None => added = true,
                Some(entry) if *entry != layout_entry(svc, None) => return None,
                Some(_) => {
                    let eps = by_service.remove(name).unwrap_or_default();
                    lists.extend(service_upstreams(st, name, svc, None, eps));
                }
            }
        }
        let fed = self.set_lists(&mut published, lists);
        if added && fed == Fed::Done {
            return Some(Fed::Later(published.reloaded.map_or_else(Instant::now, |at| at + RELOAD_EVERY)));
        }
        Some(fed)
    }

    /// Sets each upstream's endpoints that changed.
    fn set_lists(&self, published: &mut Published, lists: BTreeMap<String, Vec<EndpointConfig>>) -> Fed {
        let mut fed = Fed::Done;
        for (name, list) in lists {
            // An upstream of the config to come waits for it.
            if published.endpoints.get(&name).is_none_or(|l| *l == list) {
                continue;
            }
            match self.proxy.set_endpoints(&name, list.clone()) {
                Ok(()) => {
                    published.endpoints.insert(name, list);
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "updating the proxy's endpoints failed");
                    published.layout = None;
                    fed = Fed::Failed;
                }
            }
        }
        fed
    }
}

/// What a service's routes and upstreams are built from: its template,
/// its canary's weight, and how long a request waits for a first instance
/// (a service that scales to zero).
fn layout_entry(svc: &Svc, weight: Option<&u32>) -> String {
    format!("{}@{weight:?}@{:?}", svc.template, cold_start(svc))
}

/// How requests wait while a service at zero starts its first instance.
fn cold_start(svc: &Svc) -> Option<halo_proxy::config::ColdStart> {
    let a = svc.spec.autoscale.as_ref().filter(|a| a.scales_to_zero())?;
    Some(halo_proxy::config::ColdStart { timeout: a.cold_start_timeout, queue: a.cold_start_queue })
}

/// Each service upstream's endpoints: a service's ready instances, the
/// canary's in `NAME.canary`; a replicated stateful service's primary
/// alone in `NAME`, its replicas in `NAME.replica` (and in each
/// `NAME.replica.lagN` while at most N behind).
fn upstream_endpoints(
    st: &ClusterState,
    canaries: &BTreeMap<&String, ActiveCanary>,
    endpoints: Vec<Ep>,
) -> BTreeMap<String, Vec<EndpointConfig>> {
    let mut by_service: BTreeMap<String, Vec<Ep>> = BTreeMap::new();
    for e in endpoints {
        by_service.entry(e.service.clone()).or_default().push(e);
    }
    let mut eps = BTreeMap::new();
    for (name, svc) in &st.services {
        let mine = by_service.remove(name).unwrap_or_default();
        eps.extend(service_upstreams(st, name, svc, canaries.get(name), mine));
    }
    eps
}

/// [`upstream_endpoints`] of one service, from its endpoints.
fn service_upstreams(
    st: &ClusterState,
    name: &str,
    svc: &Svc,
    canary: Option<&ActiveCanary>,
    endpoints: Vec<Ep>,
) -> BTreeMap<String, Vec<EndpointConfig>> {
    let mut eps: BTreeMap<String, Vec<EndpointConfig>> = BTreeMap::new();
    eps.insert(name.to_string(), Vec::new());
    if canary.is_some() {
        eps.insert(canary_upstream(name), Vec::new());
    }
    let roles = svc.spec.replicated().then(|| {
        for lag in replica_lags(svc) {
            eps.insert(replica_upstream(name, lag), Vec::new());
        }
        routable(st.primaries.get(name), st.roles.get(name))
    });
    for e in endpoints {
        let ep = EndpointConfig { addr: e.addr, weight: 1 };
        if let Some(r) = &roles {
            if r.primary.as_ref() == Some(&e.id) {
                eps.entry(name.to_string()).or_default().push(ep);
            } else if let Some((_, lag)) = r.replicas.iter().find(|(id, _)| *id == e.id) {
                for max in replica_lags(svc) {
                    if max.is_none_or(|m| lag.is_some_and(|l| l <= m)) {
                        eps.entry(replica_upstream(name, max)).or_default().push(ep);
                    }
                }
            }
            continue;
        }
        let upstream = match canary {
            Some(c) if c.canary_template == e.template => canary_upstream(name),
            _ => name.to_string(),
        };
        if let Some(list) = eps.get_mut(&upstream) {
            list.push(ep);
        }
    }
    for list in eps.values_mut() {
        list.sort_by_key(|e| e.addr);
    }
    eps
}

/// The node file's proxy config plus one upstream and its routes per
/// service, built from the service's validated spec (the rules are
/// `halo_model::values::rules`, the proxy file's too). A service named
/// like one of the node file's upstreams is left out and logged; the
/// others go on. Service routes follow the file's own, most specific first.
fn proxy_config(
    base: &Config,
    services: &crate::state::Map<String, Arc<Svc>>,
    endpoints: &BTreeMap<String, Vec<EndpointConfig>>,
    canary_weights: &BTreeMap<String, u32>,
    primary_gate: Option<&halo_proxy::config::Gate>,
) -> Config {
    let mut cfg = base.clone();
    let mut routes = Vec::new();
    for (name, svc) in services {
        let canary = canary_weights.get(name).copied();
        let upstreams = upstreams(name, svc, endpoints, canary, primary_gate);
        if let Some(taken) = upstreams.iter().find(|u| base.upstreams.contains_key(&u.name)) {
            tracing::error!(
                service = %name,
                upstream = %taken.name,
                "the service's upstream is already an upstream of the node file; its routes are left out"
            );
            continue;
        }
        cfg.upstreams.extend(upstreams.into_iter().map(|u| (u.name.clone(), u)));
        routes.extend(service_routes(name, svc, canary));
    }
    routes.sort_by_key(|r| {
        let host = match &r.host {
            Some(HostMatch::Exact(_)) => 0,
            Some(HostMatch::Suffix(_)) => 1,
            None => 2,
        };
        let path = match &r.path {
            Some(PathMatch::Exact(p)) => (0, std::cmp::Reverse(p.len())),
            Some(PathMatch::Prefix(p)) => (1, std::cmp::Reverse(p.len())),
            None => (2, std::cmp::Reverse(0)),
        };
        (host, path)
    });
    cfg.routes.extend(routes);
    cfg
}

/// The upstream of a service's canary instances during a rollout.
pub(crate) fn canary_upstream(service: &str) -> String {
    format!("{service}.canary")
}

/// A service's upstream, and its canary's while a rollout has one.
fn upstreams(
    name: &str,
    svc: &Svc,
    endpoints: &BTreeMap<String, Vec<EndpointConfig>>,
    canary: Option<u32>,
    primary_gate: Option<&halo_proxy::config::Gate>,
) -> Vec<UpstreamConfig> {
    let b = &svc.spec.balance;
    let upstream = |name: String| {
        let mut u = UpstreamConfig::new(&name);
        u.endpoints = endpoints.get(&name).cloned().unwrap_or_default();
        u.policy = b.policy;
        u.hash_key = b.hash_key.clone();
        u.session_cookie = b.session_cookie.clone();
        // Readiness probes decide membership; passive outlier detection
        // (on by default) still ejects an endpoint that fails requests.
        u.health = None;
        u.max_in_flight = b.max_in_flight;
        u
    };
    let mut out = vec![upstream(name.to_string())];
    out[0].cold_start = cold_start(svc);
    if canary.is_some() {
        out.push(upstream(canary_upstream(name)));
    }
    if svc.spec.replicated() {
        // A demoted primary loses its clients at once.
        out[0].removal_grace = Some(std::time::Duration::ZERO);
        out[0].gate = primary_gate.cloned();
        out.extend(replica_lags(svc).into_iter().map(|lag| upstream(replica_upstream(name, lag))));
    }
    out
}

/// A service's routes: a canary weight above 0 splits them, and the
/// release's cohort goes to the canary whatever the weight.
fn service_routes(name: &str, svc: &Svc, canary: Option<u32>) -> Vec<RouteConfig> {
    let canary_weight = canary.unwrap_or(0);
    let split = match canary_weight {
        0 => vec![(name.to_string(), 1)],
        w if w >= 100 => vec![(canary_upstream(name), 100)],
        w => vec![(canary_upstream(name), w), (name.to_string(), 100 - w)],
    };
    let overrides: Vec<Override> = canary.and_then(|_| cohort(name, &svc.spec.release)).into_iter().collect();
    let b = &svc.spec.balance;
    svc.spec
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let split = match r.role {
                halo_model::RouteRole::Replica { max_lag } if svc.spec.replicated() => {
                    vec![(replica_upstream(name, max_lag), 1)]
                }
                _ => split.clone(),
            };
            let mut route = RouteConfig::new(format!("{name}.{i}"), split);
            route.host = r.host.clone();
            route.path = Some(r.path.clone());
            route.overrides = overrides.clone();
            route.timeouts = b.timeouts.clone();
            route.retry = b.retry.clone();
            route.rate_limit = b.rate_limit;
            route
        })
        .collect()
}

/// The release's cohort as a route override to the canary's upstream.
fn cohort(name: &str, release: &halo_model::release::ReleaseSpec) -> Option<Override> {
    use halo_model::release::Cohort;
    let (matcher, value) = match release.cohort.clone()? {
        Cohort::Header { name, value } => (OverrideMatch::Header(name), value),
        Cohort::Cookie { name, value } => (OverrideMatch::Cookie(name), value),
    };
    Some(Override { matcher, value, upstream: canary_upstream(name) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(text: &str) -> Arc<Svc> {
        let (file, spec) = halo_model::parse_service("t", text).unwrap();
        let record = crate::keys::ServiceRecord { spec: file.to_toml(), restart_generation: 0, stable: None };
        Arc::new(Svc { revision: 1, record, file, spec: Arc::new(spec), template: "t".into(), stable: None })
    }

    #[test]
    fn a_services_spec_becomes_its_upstream_and_routes_and_a_clash_leaves_the_others() {
        let base = halo_proxy::config::parse_with_services(
            "node",
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[upstreams.old]\nendpoints = [\"127.0.0.1:1\"]\n",
        )
        .unwrap();
        let good = svc("name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\nhost = \"WEB.example\"\n[balance]\n\
                        retries = 10\nretry_statuses = [503]\ntry_timeout = \"250ms\"\nconnect_timeout = \"2s\"\n\
                        idle_timeout = \"0\"\n");
        // A stored service named like a static upstream (the node file
        // changed after it was applied): only it is left out.
        let clash = svc("name = \"old\"\n[run]\ncommand = \"x\"\n[[routes]]\npath = \"/old\"\n");
        let services = crate::state::Map::from_iter([("web".to_string(), good), ("old".to_string(), clash)]);
        let eps =
            BTreeMap::from([("web".to_string(), vec![EndpointConfig { addr: ([127, 0, 0, 1], 9).into(), weight: 1 }])]);
        let cfg = proxy_config(&base, &services, &eps, &BTreeMap::new(), None);
        assert!(cfg.upstreams.contains_key("web"), "{:?}", cfg.upstreams.keys());
        assert_eq!(
            cfg.upstreams["old"].endpoints[0].addr,
            ([127, 0, 0, 1], 1).into(),
            "the node file's upstream stays"
        );
        assert_eq!(cfg.upstreams["web"].endpoints.len(), 1);
        assert!(cfg.upstreams["web"].health.is_none() && cfg.upstreams["web"].outlier.is_some());
        let r = cfg.routes.iter().find(|r| r.name == "web.0").expect("web's route");
        assert!(matches!(&r.host, Some(HostMatch::Exact(h)) if h == "web.example"), "{:?}", r.host);
        assert_eq!((r.retry.attempts, r.retry.statuses.as_slice()), (10, &[503][..]));
        assert_eq!(r.retry.try_timeout, halo_model::values::Adaptive::Fixed(std::time::Duration::from_millis(250)));
        assert_eq!((r.timeouts.connect, r.timeouts.idle), (std::time::Duration::from_secs(2), None));
        assert!(!cfg.routes.iter().any(|r| r.name.starts_with("old.")));
    }

    #[test]
    fn a_canary_splits_the_routes_and_its_cohort_overrides_them() {
        let base = halo_proxy::config::parse("node", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let web = svc("name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\npath = \"/\"\n[release]\n\
                       strategy = \"canary\"\nsteps = [{ weight = 10, pause = \"1m\" }]\ncohort = { header = \"X-Canary\", value = \"1\" }\n");
        let services = crate::state::Map::from_iter([("web".to_string(), web)]);
        for (weight, split) in
            [(0, vec![("web", 1)]), (25, vec![("web.canary", 25), ("web", 75)]), (100, vec![("web.canary", 100)])]
        {
            let cfg =
                proxy_config(&base, &services, &BTreeMap::new(), &BTreeMap::from([("web".to_string(), weight)]), None);
            assert!(cfg.upstreams.contains_key("web.canary"));
            let r = cfg.routes.iter().find(|r| r.name == "web.0").expect("web's route");
            let got: Vec<(&str, u32)> = r.split.iter().map(|(u, w)| (u.as_str(), *w)).collect();
            assert_eq!(got, split, "weight {weight}");
            assert!(matches!(&r.overrides[..], [o] if o.upstream == "web.canary" && o.value == "1"
                && matches!(&o.matcher, OverrideMatch::Header(h) if h == "x-canary")));
        }
    }

    #[test]
    fn a_services_limits_reach_its_upstream_and_routes() {
        let base = halo_proxy::config::parse("node", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let web = svc("name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\npath = \"/\"\n[balance]\n\
                       max_in_flight = 64\nrate_limit = \"100/s\"\nrate_limit_burst = 300\n");
        let services = crate::state::Map::from_iter([("web".to_string(), web)]);
        let cfg = proxy_config(&base, &services, &BTreeMap::new(), &BTreeMap::new(), None);
        assert_eq!(cfg.upstreams["web"].max_in_flight, Some(halo_model::values::MaxInFlight::Fixed(64)));
        let r = cfg.routes.iter().find(|r| r.name == "web.0").expect("web's route");
        let limit = r.rate_limit.expect("the route's rate limit");
        assert_eq!((limit.count, limit.per, limit.burst), (100, std::time::Duration::from_secs(1), 300));
    }

    #[test]
    fn a_replicated_service_reaches_its_promoted_primary_and_its_replicas_by_lag() {
        use crate::keys::{PrimaryRecord, RoleRecord};
        use crate::stateful::Role;
        let base = halo_proxy::config::parse("node", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let pg = svc("name = \"pg\"\nreplicas = 3\n[run]\ncommand = \"x\"\n[stateful]\npromote = [\"p\"]\n\
                      follow = [\"f\"]\nposition = [\"q\"]\nclone = [\"c\"]\n[[routes]]\npath = \"/w\"\n\
                      [[routes]]\npath = \"/r\"\nrole = \"replica\"\n[[routes]]\npath = \"/fresh\"\nrole = \"replica\"\nmax_lag = 100\n");
        let mut st = ClusterState::default();
        st.services.insert("pg".into(), pg);
        let role = |role: Role, position: u64| RoleRecord {
            node: "n1".into(),
            role,
            token: 9,
            position: Some(position),
            healthy: true,
            has_data: true,
            addr: None,
            reason: None,
            candidacy: None,
        };
        st.primaries.insert(
            "pg".into(),
            crate::state::HeldPrimary {
                record: PrimaryRecord { instance: "pg-1".into(), node: "n1".into(), since_ms: 0 },
                token: 9,
                lease: None,
            },
        );
        st.roles.insert(
            "pg".into(),
            BTreeMap::from([
                ("pg-0".to_string(), role(Role::Replica, 950)),
                ("pg-1".to_string(), role(Role::Primary, 1000)),
                ("pg-2".to_string(), role(Role::Replica, 500)),
            ]),
        );
        let ep = |id: &str, port: u16| Ep {
            service: "pg".into(),
            id: id.into(),
            template: "t".into(),
            addr: ([127, 0, 0, 1], port).into(),
        };
        let eps = upstream_endpoints(&st, &BTreeMap::new(), vec![ep("pg-0", 1), ep("pg-1", 2), ep("pg-2", 3)]);
        let ports = |u: &str| eps[u].iter().map(|e| e.addr.port()).collect::<Vec<_>>();
        assert_eq!(ports("pg"), [2], "the primary alone");
        assert_eq!(ports("pg.replica"), [1, 3], "every replica that follows");
        assert_eq!(ports("pg.replica.lag100"), [1], "50 behind is in, 500 is not");
        // The key taken but the primary not promoted yet: nothing.
        st.roles.get_mut("pg").unwrap().get_mut("pg-1").unwrap().role = Role::Replica;
        let eps = upstream_endpoints(&st, &BTreeMap::new(), vec![ep("pg-0", 1), ep("pg-1", 2), ep("pg-2", 3)]);
        assert!(eps["pg"].is_empty() && eps["pg.replica"].is_empty());
        // Routes: role = "replica" to the replicas' upstream; the primary's
        // upstream loses a demoted primary's connections at once.
        let services = st.services.clone();
        let gate = halo_proxy::config::Gate(Arc::new(|| false));
        let cfg = proxy_config(&base, &services, &BTreeMap::new(), &BTreeMap::new(), Some(&gate));
        let split = |name: &str| cfg.routes.iter().find(|r| r.name == name).unwrap().split[0].0.clone();
        assert_eq!(
            (split("pg.0"), split("pg.1"), split("pg.2")),
            ("pg".into(), "pg.replica".into(), "pg.replica.lag100".into())
        );
        assert_eq!(cfg.upstreams["pg"].removal_grace, Some(std::time::Duration::ZERO));
        assert!(cfg.upstreams["pg"].gate.as_ref().is_some_and(|g| !g.open()));
        assert!(cfg.upstreams["pg.replica"].gate.is_none());
    }
}
