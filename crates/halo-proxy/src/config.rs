//! Proxy configuration: the file format and the validated snapshot.
//!
//! The chain is `&str` -> [`file::FileConfig`] (serde, unknown fields rejected)
//! -> [`validate`] -> [`Config`]. Only [`Config`] leaves this module, so the
//! rest of the proxy never sees an unchecked value. Every error names the file,
//! the line where it can be found, the field and what is accepted.

mod file;
mod listener;
mod locate;
mod types;
mod upstream;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use self::file::FileConfig;
pub use self::file::{
    EndpointEntry, HealthSection, OutlierSection, OverrideSection, RateLimitSection, RetrySection, RouteSection,
    SplitSection, TimeoutSection, UpstreamSection,
};
use self::locate::Locator;
pub use self::types::*;
pub use halo_model::values::parse_duration;
use halo_model::values::rules;

/// One problem found in a config file: file, line (0 when it is not
/// tied to one), field and message, as every file halo reads reports them.
pub type ConfigError = halo_model::Diagnostic;

/// All problems found in one config file, reported together.
pub type ConfigErrors = halo_model::Diagnostics;

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        halo_model::Diagnostics(vec![ConfigError {
            file: name.clone(),
            line: 0,
            col: 0,
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    parse(&name, &text)
}

/// Parses and validates config text; `file` is only used in error messages.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_as(file, text, false)
}

/// [`parse`] for a node file: a tcp listener may name an upstream the
/// file does not have, a service's (the control plane adds it later); until
/// it exists, the listener's connections are closed.
pub fn parse_with_services(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    parse_as(file, text, true)
}

fn parse_as(file: &str, text: &str, services_later: bool) -> Result<Config, ConfigErrors> {
    let misfiled = (!services_later).then(|| halo_model::FileKind::misfiled(text, halo_model::FileKind::Proxy));
    if let Some(message) = misfiled.flatten() {
        return Err(halo_model::Diagnostics::of_file(file, message));
    }
    let raw: FileConfig = halo_model::diag::deserialize(file, text)?;
    let mut v = Validator { loc: Locator::new(text), file: file.into(), errors: Vec::new(), services_later };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        let mut errors = halo_model::Diagnostics(v.errors);
        errors.sort();
        Err(errors)
    }
}

/// The names routes may name: the http listeners'.
fn http_listeners(ls: &[ListenerConfig]) -> HashSet<&str> {
    ls.iter().filter(|l| l.protocol.is_http()).map(|l| l.name.as_str()).collect()
}

struct Validator<'a> {
    loc: Locator<'a>,
    file: String,
    errors: Vec<ConfigError>,
    /// A tcp listener may name an upstream that comes later (a service's).
    services_later: bool,
}

impl Validator<'_> {
    fn err(&mut self, line: usize, field: impl Into<String>, message: impl Into<String>) {
        // The validator knows the line of a key, not its column.
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            col: 0,
            field: field.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, line: usize, field: &str, v: Option<&str>, default: Duration) -> Duration {
        match v.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(m)) => {
                self.err(line, field, m);
                default
            }
        }
    }

    fn addr(&mut self, line: usize, field: &str, v: &str) -> Option<SocketAddr> {
        match v.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(line, field, format!("'{v}' is not an address; expected IP:PORT such as 127.0.0.1:8080"));
                None
            }
        }
    }

    fn config(&mut self, raw: FileConfig) -> Config {
        let p = &raw.proxy;
        let pl = self.loc.table("proxy");
        let workers = match p.workers {
            Some(0) => {
                self.err(self.loc.key(pl, "workers"), "proxy.workers", "must be at least 1 (omit it for one per core)");
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let grace_line = self.loc.key(pl, "grace_period");
        let grace_period =
            self.duration(grace_line, "proxy.grace_period", p.grace_period.as_deref(), Duration::from_secs(10));
        let hrt_line = self.loc.key(pl, "header_read_timeout");
        let header_read_timeout = self.duration(
            hrt_line,
            "proxy.header_read_timeout",
            p.header_read_timeout.as_deref(),
            Duration::from_secs(30),
        );
        let ka_line = self.loc.key(pl, "keepalive_idle");
        let keepalive_idle =
            self.duration(ka_line, "proxy.keepalive_idle", p.keepalive_idle.as_deref(), Duration::from_secs(60));
        let mut within = |key: &str, default: u64| {
            let line = self.loc.key(pl, key);
            let value = match key {
                "send_timeout" => p.send_timeout.as_deref(),
                "request_body_timeout" => p.request_body_timeout.as_deref(),
                _ => p.max_connection_age.as_deref(),
            };
            self.duration(line, &format!("proxy.{key}"), value, Duration::from_secs(default))
        };
        let send_timeout = within("send_timeout", 60);
        let request_body_timeout = within("request_body_timeout", 300);
        let max_connection_age = within("max_connection_age", 3600);
        let max_header_bytes = p.max_header_bytes.unwrap_or(64 * 1024);
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            self.err(self.loc.key(pl, "max_header_bytes"), "proxy.max_header_bytes", "accepted: 8192 to 1048576");
        }
        let admin = raw.admin.as_ref().and_then(|a| {
            let line = self.loc.key(self.loc.table("admin"), "listen");
            self.addr(line, "admin.listen", &a.listen)
        });
        let admin_token = raw.admin.as_ref().and_then(|a| a.token_file.as_ref()).and_then(|f| {
            let line = self.loc.key(self.loc.table("admin"), "token_file");
            let base = Path::new(&self.file).parent().map(Path::to_path_buf).unwrap_or_default();
            read_secret(&base.join(f)).map_err(|e| self.err(line, "admin.token_file", e)).ok()
        });
        let admin_tls = raw.admin.as_ref().and_then(|a| a.tls.as_ref()).and_then(|t| {
            let line = self.loc.key(self.loc.table("admin"), "tls");
            self.tls_section(line, "admin.tls", t)
        });
        // Reload, metrics and status to anyone who can reach it: only on
        // this host, unless it takes a token.
        let token_set = raw.admin.as_ref().is_some_and(|a| a.token_file.is_some());
        if let Some(addr) = admin.filter(|a| !a.ip().is_loopback() && !token_set) {
            let line = self.loc.key(self.loc.table("admin"), "listen");
            self.err(
                line,
                "admin.listen",
                format!(
                    "{addr} is reachable from other hosts and the admin API reloads the config: set \
                     admin.token_file (a file holding a token, mode 600) or listen on 127.0.0.1"
                ),
            );
        }

        let upstreams: BTreeMap<String, UpstreamConfig> =
            raw.upstreams.iter().map(|(name, u)| (name.clone(), self.upstream(name, u))).collect();
        let listeners = self.listeners(&raw, &upstreams);
        let names = http_listeners(&listeners);
        let routes = raw.routes.iter().enumerate().map(|(i, r)| self.route(i, r, &upstreams, &names)).collect();
        Config {
            workers,
            work_stealing: p.work_stealing.unwrap_or(false),
            grace_period,
            access_log: p.access_log.unwrap_or(false),
            max_header_bytes: max_header_bytes.clamp(8192, 1 << 20),
            header_read_timeout,
            keepalive_idle,
            send_timeout,
            request_body_timeout,
            max_connection_age,
            admin,
            admin_token,
            admin_tls,
            listeners,
            routes,
            upstreams,
        }
    }

    fn route(
        &mut self,
        i: usize,
        r: &RouteSection,
        ups: &BTreeMap<String, UpstreamConfig>,
        listeners: &HashSet<&str>,
    ) -> RouteConfig {
        let line = self.loc.array_item("routes", i);
        let name = r.name.clone().unwrap_or_else(|| format!("route{i}"));
        let f = |k: &str| format!("routes[{i}].{k}");
        let host = r.host.as_deref().map(|h| {
            HostMatch::parse(h).unwrap_or_else(|e| {
                self.err(self.loc.key(line, "host"), f("host"), e);
                HostMatch::Exact(h.to_ascii_lowercase())
            })
        });
        let path = match (&r.path_prefix, &r.path_exact) {
            (Some(_), Some(_)) => {
                self.err(self.loc.key(line, "path_exact"), f("path_exact"), "set path_prefix or path_exact, not both");
                None
            }
            (Some(p), None) => Some(PathMatch::Prefix(p.clone())),
            (None, Some(p)) => Some(PathMatch::Exact(p.clone())),
            (None, None) => None,
        };
        if let Some(PathMatch::Prefix(p) | PathMatch::Exact(p)) = &path {
            let _ = rules::path(p).map_err(|e| self.err(line, f("path"), e));
        }
        let methods = r
            .methods
            .iter()
            .flatten()
            .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    self.err(self.loc.key(line, "methods"), f("methods"), format!("'{m}' is not an HTTP method"));
                    None
                }
            })
            .collect();
        let headers = r
            .headers
            .iter()
            .flatten()
            .filter_map(|(k, v)| match (HeaderName::try_from(k.as_str()), HeaderValue::try_from(v.as_str())) {
                (Ok(k), Ok(v)) => Some((k, v)),
                _ => {
                    self.err(
                        self.loc.key(line, "headers"),
                        f("headers"),
                        format!("'{k}: {v}' is not a valid header name and value"),
                    );
                    None
                }
            })
            .collect();
        if let Some(ls) = &r.listeners {
            for l in ls.iter().filter(|l| !listeners.contains(l.as_str())) {
                self.err(self.loc.key(line, "listeners"), f("listeners"), format!("no http listener named '{l}'"));
            }
        }
        let split = self.split(i, line, r, ups);
        let overrides = self.overrides(i, line, r, ups);
        let timeouts = self.timeouts(i, line, r);
        let retry = self.retry(i, line, r);
        let rate_limit = r.rate_limit.as_ref().and_then(|rl| {
            RateLimit::parse(&rl.rate, rl.burst)
                .map_err(|e| self.err(self.loc.key(line, "rate_limit"), f("rate_limit"), e))
                .ok()
        });
        RouteConfig {
            name,
            listeners: r.listeners.clone(),
            host,
            path,
            methods,
            headers,
            split,
            overrides,
            timeouts,
            retry,
            rate_limit,
        }
    }

    /// A route's upstream: it exists, and can be shared among clients.
    fn check_upstream(&mut self, line: usize, field: String, name: &str, ups: &BTreeMap<String, UpstreamConfig>) {
        match ups.get(name) {
            None => {
                let known: Vec<&str> = ups.keys().map(String::as_str).collect();
                self.err(line, field, format!("no upstream named '{name}'; defined: [{}]", known.join(", ")));
            }
            Some(u) if u.send_proxy_protocol.is_some() => self.err(
                line,
                field,
                format!(
                    "upstream '{name}' sends a PROXY protocol header, which only a tcp listener's upstream can: \
                     HTTP routes share upstream connections among clients (X-Forwarded-For and Forwarded carry \
                     the client address)"
                ),
            ),
            Some(_) => {}
        }
    }

    fn split(
        &mut self,
        i: usize,
        line: usize,
        r: &RouteSection,
        ups: &BTreeMap<String, UpstreamConfig>,
    ) -> Vec<(String, u32)> {
        let split: Vec<(String, u32)> = match (&r.upstream, &r.split) {
            (Some(u), None) => vec![(u.clone(), 1)],
            (None, Some(s)) if !s.is_empty() => s.iter().map(|s| (s.upstream.clone(), s.weight)).collect(),
            (Some(_), Some(_)) => {
                self.err(line, format!("routes[{i}].split"), "set upstream or split, not both");
                Vec::new()
            }
            _ => {
                self.err(
                    line,
                    format!("routes[{i}].upstream"),
                    "a route needs upstream = \"NAME\" or a non-empty split",
                );
                Vec::new()
            }
        };
        for (u, _) in &split {
            self.check_upstream(self.loc.key(line, "upstream"), format!("routes[{i}].upstream"), u, ups);
        }
        if !split.is_empty() && split.iter().all(|(_, w)| *w == 0) {
            self.err(line, format!("routes[{i}].split"), "at least one split weight must be above 0");
        }
        split
    }

    fn overrides(
        &mut self,
        i: usize,
        line: usize,
        r: &RouteSection,
        ups: &BTreeMap<String, UpstreamConfig>,
    ) -> Vec<Override> {
        let mut out = Vec::new();
        for (j, o) in r.overrides.iter().flatten().enumerate() {
            let field = format!("routes[{i}].overrides[{j}]");
            self.check_upstream(line, format!("{field}.upstream"), &o.upstream, ups);
            let matcher = match (&o.header, &o.cookie) {
                (Some(h), None) => match HeaderName::try_from(h.as_str()) {
                    Ok(h) => OverrideMatch::Header(h),
                    Err(_) => {
                        self.err(line, format!("{field}.header"), format!("'{h}' is not a header name"));
                        continue;
                    }
                },
                (None, Some(c)) => OverrideMatch::Cookie(c.clone()),
                _ => {
                    self.err(line, field, "set exactly one of header or cookie");
                    continue;
                }
            };
            out.push(Override { matcher, value: o.value.clone(), upstream: o.upstream.clone() });
        }
        out
    }

    fn timeouts(&mut self, i: usize, line: usize, r: &RouteSection) -> Timeouts {
        let d = Timeouts::default();
        let Some(t) = &r.timeouts else { return d };
        let tl = self.loc.key(line, "timeouts");
        // A given "0" turns an optional timeout off.
        let field = |key: &str| format!("routes[{i}].timeouts.{key}");
        let opt = |v: &mut Self, key: &str, val: &Option<String>, def: Option<Duration>| match val {
            None => def,
            Some(s) => rules::optional_timeout(s).map_err(|e| v.err(tl, field(key), e)).unwrap_or(def),
        };
        let connect = t.connect.as_deref().map_or(d.connect, |s| {
            rules::connect_timeout(s).map_err(|e| self.err(tl, field("connect"), e)).unwrap_or(d.connect)
        });
        Timeouts {
            connect,
            first_byte: opt(self, "first_byte", &t.first_byte, d.first_byte),
            request: opt(self, "request", &t.request, d.request),
            idle: opt(self, "idle", &t.idle, d.idle),
            tunnel: opt(self, "tunnel", &t.tunnel, d.tunnel),
        }
    }

    fn retry(&mut self, i: usize, line: usize, r: &RouteSection) -> RetryPolicy {
        let d = RetryPolicy::default();
        let Some(rs) = &r.retry else { return d };
        let field = |k: &str| format!("routes[{i}].retry.{k}");
        let statuses = rs.statuses.clone().unwrap_or(d.statuses.clone());
        let _ = rules::retry_statuses(&statuses).map_err(|e| self.err(line, field("statuses"), e));
        let budget_ratio = rs.budget_ratio.unwrap_or(d.budget_ratio);
        if !(0.0..=1.0).contains(&budget_ratio) {
            self.err(
                line,
                field("budget_ratio"),
                "accepted: 0.0 to 1.0 (share of recent requests that may be retried)",
            );
        }
        let attempts = rs.attempts.map_or(d.attempts, |n| {
            rules::retries(n).map_err(|e| self.err(line, field("attempts"), e)).unwrap_or(rules::MAX_RETRIES)
        });
        let mut adaptive = |key: &str, v: Option<&str>, default| match v.map(halo_model::values::Adaptive::parse) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                self.err(line, field(key), e);
                default
            }
            None => default,
        };
        let try_timeout = adaptive("try_timeout", rs.try_timeout.as_deref(), d.try_timeout);
        let hedge = adaptive("hedge", rs.hedge.as_deref(), d.hedge);
        RetryPolicy {
            try_timeout,
            hedge,
            attempts,
            statuses,
            budget_ratio: budget_ratio.clamp(0.0, 1.0),
            budget_min_per_sec: rs.budget_min_per_sec.unwrap_or(d.budget_min_per_sec),
            body_cap: rs.body_cap.unwrap_or(d.body_cap),
        }
    }
}

#[cfg(test)]
mod tests;
