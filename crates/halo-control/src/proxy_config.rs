//! What the control plane feeds the proxy: the node file's own proxy
//! config plus, per service, one upstream (its ready endpoints on every
//! node) and its routes. A new config only when services or their
//! templates change; endpoint changes are fed per upstream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use halo_model::PathRule;
use halo_proxy::config::{
    self, Config, EndpointConfig, EndpointEntry, Generated, HealthSection, HostMatch, OverrideSection, PathMatch,
    RateLimitSection, RetrySection, RouteSection, SplitSection, TimeoutSection, UpstreamSection,
};
use halo_proxy::Proxy;

use crate::state::{ActiveCanary, ClusterState, Svc};
use halo_model::lock::LockExt;

/// The proxy and what it was last given.
pub(crate) struct ProxyFeed {
    pub proxy: Arc<Proxy>,
    /// The node file's proxy config: listeners, static routes and upstreams.
    pub base: Config,
    published: Mutex<Published>,
}

#[derive(Default)]
struct Published {
    /// Each service's template: what its routes and upstream were built
    /// from (`None`: nothing installed yet, or the last install failed).
    layout: Option<BTreeMap<String, String>>,
    endpoints: BTreeMap<String, Vec<EndpointConfig>>,
}

impl ProxyFeed {
    pub fn new(proxy: Arc<Proxy>, base: Config) -> ProxyFeed {
        ProxyFeed { proxy, base, published: Mutex::default() }
    }

    /// Feeds the proxy every service of `st` with `endpoints` (service,
    /// template, address): a new config when a service came, went, changed
    /// its template or its canary weight; otherwise only the endpoint sets
    /// that changed, one upstream at a time. During a canary with a ready
    /// canary instance, the canary's endpoints form the upstream
    /// `NAME.canary` and the routes split by the step's weight.
    pub fn publish(&self, st: &ClusterState, endpoints: Vec<(String, String, SocketAddr)>) {
        let services = &st.services;
        let canaries: BTreeMap<&String, ActiveCanary> =
            services.keys().filter_map(|n| st.canary(n).map(|c| (n, c))).collect();
        let mut eps: BTreeMap<String, Vec<EndpointConfig>> = BTreeMap::new();
        for name in services.keys() {
            eps.insert(name.clone(), Vec::new());
            if canaries.contains_key(name) {
                eps.insert(canary_upstream(name), Vec::new());
            }
        }
        for (service, template, addr) in endpoints {
            let upstream = match canaries.get(&service) {
                Some(c) if c.canary_template == template => canary_upstream(&service),
                _ => service,
            };
            if let Some(list) = eps.get_mut(&upstream) {
                list.push(EndpointConfig { addr, weight: 1 });
            }
        }
        for list in eps.values_mut() {
            list.sort_by_key(|e| e.addr);
        }
        // The canary takes its share (or its cohort) only once it has a
        // ready instance.
        let weights: BTreeMap<String, u32> = canaries
            .iter()
            .filter(|(n, _)| eps.get(&canary_upstream(n)).is_some_and(|l| !l.is_empty()))
            .filter(|(n, c)| c.weight > 0 || services[**n].spec.release.cohort.is_some())
            .map(|(n, c)| ((*n).clone(), c.weight))
            .collect();
        let layout: BTreeMap<String, String> =
            services.iter().map(|(n, s)| (n.clone(), format!("{}@{:?}", s.template, weights.get(n)))).collect();
        let mut published = self.published.locked();
        if published.layout.as_ref() != Some(&layout) {
            match self.proxy.reload(proxy_config(&self.base, services, &eps, &weights)) {
                Ok(()) => *published = Published { layout: Some(layout), endpoints: eps },
                Err(e) => tracing::error!(error = %e, "updating the proxy failed"),
            }
            return;
        }
        for (name, list) in eps {
            if published.endpoints.get(&name) == Some(&list) {
                continue;
            }
            match self.proxy.set_endpoints(&name, list.clone()) {
                Ok(()) => {
                    published.endpoints.insert(name, list);
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "updating the proxy's endpoints failed");
                    published.layout = None;
                }
            }
        }
    }
}

/// The node file's proxy config plus one upstream and its routes per
/// service, each service checked by the proxy's own rules for files
/// (`halo_proxy::config::extend`); one that fails them is left out and
/// logged, the others go on. Service routes follow the file's own, most
/// specific first.
fn proxy_config(
    base: &Config,
    services: &BTreeMap<String, Arc<Svc>>,
    endpoints: &BTreeMap<String, Vec<EndpointConfig>>,
    canary_weights: &BTreeMap<String, u32>,
) -> Config {
    let mut cfg = base.clone();
    let mut routes = Vec::new();
    for (name, svc) in services {
        let generated = sections(name, svc, endpoints, canary_weights.get(name).copied());
        match config::extend(base, &format!("service {name}"), &generated) {
            Ok(mut one) => {
                routes.extend(one.routes.drain(base.routes.len()..));
                for (u, cfg_u) in std::mem::take(&mut one.upstreams) {
                    if generated.upstreams.contains_key(&u) {
                        cfg.upstreams.insert(u, cfg_u);
                    }
                }
            }
            Err(e) => {
                tracing::error!(service = %name, error = %e, "the service's routes are refused by the proxy; left out")
            }
        }
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

/// The release's cohort as a route override to the canary's upstream.
fn cohort(name: &str, release: &halo_model::release::ReleaseSpec) -> Option<Vec<OverrideSection>> {
    use halo_model::release::Cohort;
    let (header, cookie, value) = match release.cohort.clone()? {
        Cohort::Header { name, value } => (Some(name), None, value),
        Cohort::Cookie { name, value } => (None, Some(name), value),
    };
    Some(vec![OverrideSection { header, cookie, value, upstream: canary_upstream(name) }])
}

/// The upstream of a service's canary instances during a rollout.
pub(crate) fn canary_upstream(service: &str) -> String {
    format!("{service}.canary")
}

/// A service's upstream (and its canary's, when `canary` has its weight)
/// and routes in the proxy file's own terms: a weight above 0 splits the
/// routes, the cohort goes to the canary whatever the weight.
fn sections(
    name: &str,
    svc: &Svc,
    endpoints: &BTreeMap<String, Vec<EndpointConfig>>,
    canary: Option<u32>,
) -> Generated {
    let canary_weight = canary.unwrap_or(0);
    let b = svc.file.balance.clone().unwrap_or_default();
    let upstream = |name: &str| UpstreamSection {
        endpoints: endpoints.get(name).into_iter().flatten().map(|e| EndpointEntry::Addr(e.addr.to_string())).collect(),
        policy: b.policy.clone(),
        hash_key: b.hash_key.clone(),
        session_cookie: b.session_cookie.clone().filter(|c| !c.is_empty()),
        // Readiness probes decide membership; passive outlier detection
        // (on by default) still ejects an endpoint that fails requests.
        health: Some(HealthSection { enabled: Some(false), ..Default::default() }),
        max_in_flight: b.max_in_flight,
        ..Default::default()
    };
    let mut upstreams = BTreeMap::from([(name.to_string(), upstream(name))]);
    if canary.is_some() {
        upstreams.insert(canary_upstream(name), upstream(&canary_upstream(name)));
    }
    let split = if canary_weight > 0 {
        let mut split = vec![(canary_upstream(name), canary_weight)];
        if canary_weight < 100 {
            split.push((name.to_string(), 100 - canary_weight));
        }
        Some(split)
    } else {
        None
    };
    let routes = svc
        .spec
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (path_prefix, path_exact) = match &r.path {
                PathRule::Prefix(p) => (Some(p.clone()), None),
                PathRule::Exact(p) => (None, Some(p.clone())),
            };
            RouteSection {
                name: Some(format!("{name}.{i}")),
                host: r.host.clone(),
                path_prefix,
                path_exact,
                upstream: split.is_none().then(|| name.to_string()),
                overrides: canary.and_then(|_| cohort(name, &svc.spec.release)),
                split: split.as_ref().map(|s| {
                    s.iter()
                        .map(|(upstream, weight)| SplitSection { upstream: upstream.clone(), weight: *weight })
                        .collect()
                }),
                timeouts: Some(TimeoutSection {
                    connect: b.connect_timeout.clone(),
                    first_byte: b.first_byte_timeout.clone(),
                    request: b.request_timeout.clone(),
                    idle: b.idle_timeout.clone(),
                    tunnel: b.tunnel_timeout.clone(),
                }),
                // The service file caps retries at 10 as the proxy does.
                retry: Some(RetrySection {
                    attempts: b.retries.map(|n| n.min(10)),
                    statuses: b.retry_statuses.clone(),
                    ..Default::default()
                }),
                rate_limit: b.rate_limit.clone().map(|rate| RateLimitSection { rate, burst: b.rate_limit_burst }),
                ..Default::default()
            }
        })
        .collect();
    Generated { upstreams, routes }
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
    fn services_go_through_the_proxy_rules_and_a_refused_one_leaves_the_others() {
        let base = halo_proxy::config::parse("node", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let good = svc(
            "name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\nhost = \"WEB.example\"\n[balance]\nretries = 50\n",
        );
        // A stored service whose balance section no longer passes (written
        // by another version, say): only it is left out.
        let mut bad = svc("name = \"old\"\n[run]\ncommand = \"x\"\n[[routes]]\npath = \"/old\"\n");
        let mut file = bad.file.clone();
        file.balance = Some(halo_model::BalanceSection { policy: Some("fastest".into()), ..Default::default() });
        Arc::get_mut(&mut bad).unwrap().file = file;
        let services = BTreeMap::from([("web".to_string(), good), ("old".to_string(), bad)]);
        let eps =
            BTreeMap::from([("web".to_string(), vec![EndpointConfig { addr: ([127, 0, 0, 1], 9).into(), weight: 1 }])]);
        let cfg = proxy_config(&base, &services, &eps, &BTreeMap::new());
        assert!(cfg.upstreams.contains_key("web") && !cfg.upstreams.contains_key("old"), "{:?}", cfg.upstreams.keys());
        assert_eq!(cfg.upstreams["web"].endpoints.len(), 1);
        assert!(cfg.upstreams["web"].health.is_none() && cfg.upstreams["web"].outlier.is_some());
        let r = cfg.routes.iter().find(|r| r.name == "web.0").expect("web's route");
        // The proxy's own rules applied: hosts lowercased, retries capped.
        assert!(matches!(&r.host, Some(HostMatch::Exact(h)) if h == "web.example"), "{:?}", r.host);
        assert_eq!(r.retry.attempts, 10);
        assert!(!cfg.routes.iter().any(|r| r.name.starts_with("old.")));
    }

    #[test]
    fn a_services_limits_reach_its_upstream_and_routes() {
        let base = halo_proxy::config::parse("node", "[[listeners]]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let web = svc("name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\npath = \"/\"\n[balance]\n\
                       max_in_flight = 64\nrate_limit = \"100/s\"\nrate_limit_burst = 300\n");
        let services = BTreeMap::from([("web".to_string(), web)]);
        let cfg = proxy_config(&base, &services, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(cfg.upstreams["web"].max_in_flight, Some(halo_model::values::MaxInFlight::Fixed(64)));
        let r = cfg.routes.iter().find(|r| r.name == "web.0").expect("web's route");
        let limit = r.rate_limit.expect("the route's rate limit");
        assert_eq!((limit.count, limit.per, limit.burst), (100, std::time::Duration::from_secs(1), 300));
    }
}
