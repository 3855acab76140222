//! Upstream validation: endpoints, policy, pool, active and passive health.

use std::collections::HashSet;
use std::time::Duration;

use super::file::{self, HealthSection, OutlierSection, UpstreamSection};
use super::*;
use halo_model::values::rules;

impl Validator<'_> {
    pub(super) fn upstream(&mut self, name: &str, u: &UpstreamSection) -> UpstreamConfig {
        let line = self.loc.table(&format!("upstreams.{name}"));
        let f = |k: &str| format!("upstreams.{name}.{k}");
        if u.endpoints.is_empty() {
            self.err(line, f("endpoints"), "at least one endpoint is required, as in endpoints = [\"127.0.0.1:9000\"]");
        }
        let mut endpoints = Vec::new();
        let mut seen = HashSet::new();
        for (j, e) in u.endpoints.iter().enumerate() {
            let (addr, weight) = match e {
                file::EndpointEntry::Addr(a) => (a, 1),
                file::EndpointEntry::Full { addr, weight } => (addr, weight.unwrap_or(1)),
            };
            let eline = self.loc.key(line, "endpoints");
            if weight == 0 || weight > 1000 {
                self.err(eline, format!("{}[{j}].weight", f("endpoints")), "accepted: 1 to 1000");
            }
            if let Some(a) = self.addr(eline, &format!("{}[{j}]", f("endpoints")), addr) {
                if !seen.insert(a) {
                    self.err(eline, f("endpoints"), format!("endpoint {a} is listed twice"));
                }
                endpoints.push(EndpointConfig { addr: a, weight: weight.clamp(1, 1000) });
            }
        }
        let policy = u.policy.as_deref().unwrap_or("round_robin").parse().unwrap_or_else(|e: String| {
            self.err(self.loc.key(line, "policy"), f("policy"), e);
            Policy::RoundRobin
        });
        let hash_key = u.hash_key.as_deref().and_then(|k| {
            k.parse::<HashKey>().map_err(|e| self.err(self.loc.key(line, "hash_key"), f("hash_key"), e)).ok()
        });
        if u.hash_key.is_none() {
            let _ = rules::hash_key(policy, None).map_err(|e| self.err(self.loc.key(line, "policy"), f("hash_key"), e));
        }
        let sl = self.loc.key(line, "slow_start");
        let slow_start = u
            .slow_start
            .as_deref()
            .map(|s| self.duration(sl, &f("slow_start"), Some(s), Duration::ZERO))
            .filter(|d| !d.is_zero());
        let protocol = match u.protocol.as_deref().unwrap_or("http1") {
            "http1" => UpstreamProtocol::Http1,
            "h2" | "http2" => UpstreamProtocol::Http2,
            other => {
                self.err(
                    self.loc.key(line, "protocol"),
                    f("protocol"),
                    format!("unknown protocol '{other}'; accepted: http1, h2"),
                );
                UpstreamProtocol::Http1
            }
        };
        let send_proxy_protocol = match u.send_proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(ProxyProtocolVersion::V1),
            Some("v2") => Some(ProxyProtocolVersion::V2),
            Some(other) => {
                self.err(
                    self.loc.key(line, "send_proxy_protocol"),
                    f("send_proxy_protocol"),
                    format!("'{other}' is not accepted; accepted: v1 (text), v2 (binary)"),
                );
                None
            }
        };
        let tls = u.tls.as_ref().and_then(|t| {
            let base = std::path::Path::new(&self.file).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            let ca = t.ca.as_ref().map(|c| base.join(c));
            let verify = t.verify.unwrap_or(true);
            if !verify {
                tracing::warn!(upstream = name, "upstream TLS without certificate verification (verify = false)");
            }
            let h2 = protocol == UpstreamProtocol::Http2;
            UpstreamTls::new(ca, verify, t.server_name.clone(), h2)
                .map_err(|e| self.err(self.loc.table(&format!("upstreams.{name}.tls")), f("tls"), e))
                .ok()
                .map(std::sync::Arc::new)
        });
        let pool = self.pool(name, u);
        let health = self.health(name, u.health.as_ref());
        let outlier = self.outlier(name, u.outlier.as_ref());
        let max_in_flight = u.max_in_flight.and_then(|m| {
            rules::max_in_flight(m)
                .map_err(|e| self.err(self.loc.key(line, "max_in_flight"), f("max_in_flight"), e))
                .ok()
        });
        UpstreamConfig {
            name: name.to_string(),
            endpoints,
            policy,
            hash_key,
            session_cookie: u.session_cookie.clone(),
            slow_start,
            protocol,
            send_proxy_protocol,
            tls,
            pool,
            health,
            outlier,
            max_in_flight,
            removal_grace: None,
            gate: None,
            cold_start: None,
        }
    }

    fn pool(&mut self, name: &str, u: &UpstreamSection) -> PoolConfig {
        let d = PoolConfig::default();
        let Some(p) = &u.pool else { return d };
        let line = self.loc.table(&format!("upstreams.{name}.pool"));
        let max_per_endpoint = p.max_per_endpoint.unwrap_or(d.max_per_endpoint);
        if max_per_endpoint == 0 {
            self.err(line, format!("upstreams.{name}.pool.max_per_endpoint"), "must be at least 1");
        }
        let idle_line = self.loc.key(line, "idle_timeout");
        PoolConfig {
            max_per_endpoint: max_per_endpoint.max(1),
            idle_timeout: self.duration(
                idle_line,
                &format!("upstreams.{name}.pool.idle_timeout"),
                p.idle_timeout.as_deref(),
                d.idle_timeout,
            ),
        }
    }

    fn health(&mut self, name: &str, h: Option<&HealthSection>) -> Option<HealthConfig> {
        let d = HealthConfig::default();
        let Some(h) = h else { return Some(d) };
        if h.enabled == Some(false) {
            return None;
        }
        let line = self.loc.table(&format!("upstreams.{name}.health"));
        let f = |k: &str| format!("upstreams.{name}.health.{k}");
        let kind = match h.kind.as_deref().unwrap_or("http") {
            "http" => {
                HealthKind::Http { path: h.path.clone().unwrap_or_else(|| "/".into()), expect_status: h.expect_status }
            }
            "tcp" => HealthKind::Tcp,
            "grpc" => HealthKind::Grpc { service: h.service.clone().unwrap_or_default() },
            other => {
                self.err(
                    self.loc.key(line, "type"),
                    f("type"),
                    format!("unknown type '{other}'; accepted: http, tcp, grpc (grpc.health.v1 over h2c)"),
                );
                HealthKind::Tcp
            }
        };
        if h.service.is_some() && !matches!(kind, HealthKind::Grpc { .. }) {
            self.err(self.loc.key(line, "service"), f("service"), "is for type = \"grpc\" checks");
        }
        if let HealthKind::Http { path, .. } = &kind {
            if !path.starts_with('/') {
                self.err(self.loc.key(line, "path"), f("path"), "must start with '/'");
            }
        }
        let dur = |v: &mut Self, k: &str, val: &Option<String>, def: Duration| {
            let l = v.loc.key(line, k);
            v.duration(l, &f(k), val.as_deref(), def)
        };
        let interval = dur(self, "interval", &h.interval, d.interval);
        let timeout = dur(self, "timeout", &h.timeout, d.timeout);
        let jitter = dur(self, "jitter", &h.jitter, d.jitter);
        if interval < Duration::from_millis(10) {
            self.err(self.loc.key(line, "interval"), f("interval"), "must be at least 10ms");
        }
        if timeout.is_zero() {
            self.err(self.loc.key(line, "timeout"), f("timeout"), "must be above 0");
        }
        let (rise, fall) = (h.rise.unwrap_or(d.rise), h.fall.unwrap_or(d.fall));
        if rise == 0 || fall == 0 {
            self.err(line, f("rise"), "rise and fall must be at least 1");
        }
        Some(HealthConfig {
            kind,
            interval: interval.max(Duration::from_millis(10)),
            timeout,
            rise: rise.max(1),
            fall: fall.max(1),
            jitter,
        })
    }

    fn outlier(&mut self, name: &str, o: Option<&OutlierSection>) -> Option<OutlierConfig> {
        let d = OutlierConfig::default();
        let Some(o) = o else { return Some(d) };
        if o.enabled == Some(false) {
            return None;
        }
        let line = self.loc.table(&format!("upstreams.{name}.outlier"));
        let f = |k: &str| format!("upstreams.{name}.outlier.{k}");
        let consecutive_failures = o.consecutive_failures.unwrap_or(d.consecutive_failures);
        if consecutive_failures == 0 {
            self.err(line, f("consecutive_failures"), "must be at least 1");
        }
        let pct = o.max_ejected_percent.unwrap_or(d.max_ejected_percent);
        if pct > 100 {
            self.err(line, f("max_ejected_percent"), "accepted: 0 to 100");
        }
        let bl = self.loc.key(line, "base_ejection");
        let base_ejection = self.duration(bl, &f("base_ejection"), o.base_ejection.as_deref(), d.base_ejection);
        let ml = self.loc.key(line, "max_ejection");
        let max_ejection = self.duration(ml, &f("max_ejection"), o.max_ejection.as_deref(), d.max_ejection);
        let fd = FailureRate::default();
        let il = self.loc.key(line, "failure_rate_interval");
        let failure_rate = match o.failure_rate_interval.as_deref().map(str::trim) {
            Some("off") => None,
            v => {
                let interval = self.duration(il, &f("failure_rate_interval"), v, fd.interval);
                if interval.is_zero() {
                    self.err(il, f("failure_rate_interval"), "0 is not accepted; use \"off\" to turn it off");
                }
                let min_requests = o.failure_rate_min_requests.unwrap_or(fd.min_requests);
                if min_requests == 0 {
                    self.err(line, f("failure_rate_min_requests"), "must be at least 1");
                }
                let excess = o.failure_rate_excess_percent.unwrap_or(fd.excess_percent);
                if !(1..=100).contains(&excess) {
                    self.err(line, f("failure_rate_excess_percent"), "accepted: 1 to 100 (percentage points)");
                }
                Some(FailureRate { interval, min_requests: min_requests.max(1), excess_percent: excess.clamp(1, 100) })
            }
        };
        Some(OutlierConfig {
            consecutive_failures: consecutive_failures.max(1),
            base_ejection,
            max_ejection: max_ejection.max(base_ejection),
            max_ejected_percent: pct.min(100),
            failure_rate,
        })
    }
}
