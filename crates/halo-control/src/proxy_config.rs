//! What the control plane feeds the proxy: the node file's own proxy
//! config plus, per service, one upstream (its ready endpoints on every
//! node) and its routes. A new config only when services or their
//! templates change; endpoint changes are fed per upstream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use halo_proxy::config::{Config, EndpointConfig, PathMatch, RouteConfig, UpstreamConfig, UpstreamProtocol};
use halo_proxy::Proxy;

use crate::state::Svc;

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

    /// Feeds the proxy `services` with `endpoints` (by service): a new
    /// config when a service came, went or changed its template; otherwise
    /// only the endpoint sets that changed, one upstream at a time.
    pub fn publish(&self, services: &BTreeMap<String, Arc<Svc>>, mut endpoints: BTreeMap<String, Vec<SocketAddr>>) {
        let eps: BTreeMap<String, Vec<EndpointConfig>> = services
            .keys()
            .map(|name| {
                let mut list: Vec<EndpointConfig> = endpoints
                    .remove(name)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|addr| EndpointConfig { addr, weight: 1 })
                    .collect();
                list.sort_by_key(|e| e.addr);
                (name.clone(), list)
            })
            .collect();
        let layout: BTreeMap<String, String> = services.iter().map(|(n, s)| (n.clone(), s.template.clone())).collect();
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if published.layout.as_ref() != Some(&layout) {
            match self.proxy.reload(proxy_config(&self.base, services, eps.clone())) {
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
/// service. Service routes follow the file's own, most specific first.
fn proxy_config(
    base: &Config,
    services: &BTreeMap<String, Arc<Svc>>,
    mut endpoints: BTreeMap<String, Vec<EndpointConfig>>,
) -> Config {
    let mut cfg = base.clone();
    let mut routes = Vec::new();
    for (name, svc) in services {
        let b = &svc.spec.balance;
        cfg.upstreams.insert(
            name.clone(),
            UpstreamConfig {
                name: name.clone(),
                endpoints: endpoints.remove(name).unwrap_or_default(),
                policy: b.policy,
                hash_key: b.hash_key.clone(),
                session_cookie: b.session_cookie.clone(),
                slow_start: None,
                protocol: UpstreamProtocol::Http1,
                pool: Default::default(),
                // Readiness probes decide membership; passive outlier
                // detection still ejects an endpoint that fails requests.
                health: None,
                outlier: Some(Default::default()),
            },
        );
        for (i, r) in svc.spec.routes.iter().enumerate() {
            routes.push(RouteConfig {
                name: format!("{name}.{i}"),
                listeners: None,
                host: r.host.as_deref().map(|h| match h.strip_prefix('*') {
                    Some(suffix) => halo_proxy::config::HostMatch::Suffix(suffix.to_string()),
                    None => halo_proxy::config::HostMatch::Exact(h.to_string()),
                }),
                path: Some(match &r.path {
                    halo_model::PathRule::Prefix(p) => PathMatch::Prefix(p.clone()),
                    halo_model::PathRule::Exact(p) => PathMatch::Exact(p.clone()),
                }),
                methods: Vec::new(),
                headers: Vec::new(),
                split: vec![(name.clone(), 1)],
                overrides: Vec::new(),
                timeouts: b.timeouts.clone(),
                retry: b.retry.clone(),
            });
        }
    }
    routes.sort_by_key(|r| {
        let host = match &r.host {
            Some(halo_proxy::config::HostMatch::Exact(_)) => 0,
            Some(halo_proxy::config::HostMatch::Suffix(_)) => 1,
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
