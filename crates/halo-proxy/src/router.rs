//! Request routing: the compiled routes of one snapshot, matched in file
//! order. A route matches when every matcher it sets matches: listener, host
//! (exact, or `*.example.com` for any subdomain), path (exact or prefix),
//! method and headers. The first match wins; a route with no matchers is a
//! catch-all, so it belongs last.

use std::sync::Arc;

use http::request::Parts;

use crate::config::{OverrideMatch, PathMatch, RouteConfig};
use crate::headers::cookie;
use crate::metrics::RouteStats;
use crate::overload::ClientRate;
use crate::retry::RetryBudget;
use crate::upstream::{Group, Slot};
use crate::util::rand_below;

pub struct Route {
    pub cfg: RouteConfig,
    pub split: Vec<(Arc<Slot>, u32)>,
    pub total_weight: u64,
    pub overrides: Vec<(OverrideMatch, String, Arc<Slot>)>,
    pub rt: Arc<RouteRuntime>,
}

impl Route {
    pub fn matches(&self, listener: &str, host: &str, parts: &Parts) -> bool {
        let c = &self.cfg;
        if let Some(ls) = &c.listeners {
            if !ls.iter().any(|l| l == listener) {
                return false;
            }
        }
        if c.host.as_ref().is_some_and(|h| !h.matches(host)) {
            return false;
        }
        if let Some(p) = &c.path {
            let path = parts.uri.path();
            let ok = match p {
                PathMatch::Exact(e) => path == e,
                PathMatch::Prefix(pre) => path_has_prefix(path, pre),
            };
            if !ok {
                return false;
            }
        }
        if !c.methods.is_empty() && !c.methods.contains(&parts.method) {
            return false;
        }
        c.headers.iter().all(|(k, v)| parts.headers.get_all(k).iter().any(|x| x == v))
    }

    /// The upstream group for this request: an override when one matches,
    /// else a weighted pick over the split.
    pub fn group(&self, parts: &Parts) -> Arc<Group> {
        self.slot(parts).load_full()
    }

    fn slot(&self, parts: &Parts) -> &Arc<Slot> {
        for (m, value, g) in &self.overrides {
            let hit = match m {
                OverrideMatch::Header(h) => parts.headers.get_all(h).iter().any(|v| v.as_bytes() == value.as_bytes()),
                OverrideMatch::Cookie(name) => cookie(parts, name).is_some_and(|v| v == value),
            };
            if hit {
                return g;
            }
        }
        // A client pinned by its session cookie to an endpoint stays with
        // that endpoint's group (its version, during a canary).
        if self.split.len() > 1 {
            for (slot, _) in &self.split {
                let g = slot.load();
                let pinned = g.cfg.session_cookie.as_deref().and_then(|name| cookie(parts, name));
                if pinned.is_some_and(|id| g.endpoints.iter().any(|e| e.id == id)) {
                    return slot;
                }
            }
        }
        if self.split.len() == 1 {
            return &self.split[0].0;
        }
        let mut r = rand_below(self.total_weight.max(1));
        for (g, w) in &self.split {
            if r < u64::from(*w) {
                return g;
            }
            r -= u64::from(*w);
        }
        &self.split[0].0
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x` but not `/apix`; a prefix that
/// ends in `/` matches anything under it.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A route's state that outlives a reload (the registry keeps it by
/// route name): counters, retry budget, rate limiter.
#[derive(Default)]
pub struct RouteRuntime {
    pub stats: RouteStats,
    pub budget: RetryBudget,
    /// The per-client rate limit and its clients' state, kept across
    /// reloads while the limit is unchanged.
    pub rate: arc_swap::ArcSwapOption<ClientRate>,
}

impl RouteRuntime {
    pub(crate) fn set_rate(&self, cfg: Option<crate::config::RateLimit>) {
        if self.rate.load().as_ref().map(|r| r.cfg) != cfg {
            self.rate.store(cfg.map(|c| Arc::new(ClientRate::new(c))));
        }
    }
}

/// The request's host, lower-cased, without port: from `Host` (HTTP/1.1) or
/// the URI authority (HTTP/2).
pub fn host(parts: &Parts) -> std::borrow::Cow<'_, str> {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.host())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    let no_port = if raw.starts_with('[') {
        raw.split_once(']').map_or(raw, |(h, _)| h.trim_start_matches('['))
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    if no_port.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(no_port.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(no_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_respects_segments() {
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/v1", "/api"));
        assert!(!path_has_prefix("/apix", "/api"));
        assert!(path_has_prefix("/static/x", "/static/"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn host_strips_port_and_case() {
        let (p, _) =
            http::Request::builder().uri("/").header("host", "WWW.Example.com:8080").body(()).unwrap().into_parts();
        assert_eq!(host(&p), "www.example.com");
        let (p, _) = http::Request::builder().uri("http://[::1]:80/").body(()).unwrap().into_parts();
        assert_eq!(host(&p), "::1");
    }
}
