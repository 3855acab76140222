//! The proxy's file format (`proxy.toml`) as written by users.
//!
//! These structs mirror the TOML one to one and reject unknown fields; nothing
//! outside `config` sees them. `super::validate` turns them into the checked
//! [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub proxy: ProxySection,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub workers: Option<usize>,
    pub work_stealing: Option<bool>,
    pub grace_period: Option<String>,
    pub access_log: Option<bool>,
    pub max_header_bytes: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub keepalive_idle: Option<String>,
    pub send_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    pub max_connection_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: String,
    /// A file holding the token every request but /healthz must bear.
    pub token_file: Option<String>,
    /// HTTPS instead of HTTP, with these certificates.
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: Option<String>,
    pub listen: String,
    pub protocol: Option<String>,
    /// `protocol = "tcp"`: the upstream connections go to.
    pub upstream: Option<String>,
    pub idle_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub connect_tries: Option<u32>,
    /// `protocol = "tcp"`: TLS passthrough routes by server name.
    pub sni: Option<Vec<SniSection>>,
    /// `protocol = "https"`: the certificates.
    pub tls: Option<TlsSection>,
    /// Sources that send a PROXY protocol header first.
    pub proxy_protocol_from: Option<Vec<String>>,
    /// Open connections at most; at the limit, new ones wait in the
    /// kernel's accept queue.
    pub max_connections: Option<u64>,
    /// standard (default), merge_slashes or off.
    pub path_normalization: Option<String>,
    /// keep (default), refuse or decode.
    pub encoded_slashes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniSection {
    pub names: Vec<String>,
    pub upstream: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    #[serde(default)]
    pub certificates: Vec<CertificateSection>,
    pub min_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    pub cert: String,
    pub key: String,
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: Option<String>,
    pub listeners: Option<Vec<String>>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, String>>,
    pub upstream: Option<String>,
    pub split: Option<Vec<SplitSection>>,
    pub overrides: Option<Vec<OverrideSection>>,
    pub timeouts: Option<TimeoutSection>,
    pub retry: Option<RetrySection>,
    pub rate_limit: Option<RateLimitSection>,
}

/// Requests per client address on a route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// `N/s`, `N/m` or `N/h`.
    pub rate: String,
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSection {
    pub upstream: String,
    pub weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideSection {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub value: String,
    pub upstream: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSection {
    pub connect: Option<String>,
    pub first_byte: Option<String>,
    pub request: Option<String>,
    pub idle: Option<String>,
    pub tunnel: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    pub attempts: Option<u32>,
    pub statuses: Option<Vec<u16>>,
    pub budget_ratio: Option<f64>,
    pub budget_min_per_sec: Option<u32>,
    pub body_cap: Option<usize>,
    pub try_timeout: Option<String>,
    pub hedge: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EndpointEntry {
    Addr(String),
    Full { addr: String, weight: Option<u32> },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    #[serde(default)]
    pub endpoints: Vec<EndpointEntry>,
    pub policy: Option<String>,
    pub hash_key: Option<String>,
    pub session_cookie: Option<String>,
    pub slow_start: Option<String>,
    pub protocol: Option<String>,
    pub send_proxy_protocol: Option<String>,
    pub tls: Option<UpstreamTlsSection>,
    pub pool: Option<PoolSection>,
    pub health: Option<HealthSection>,
    pub outlier: Option<OutlierSection>,
    /// Requests in flight at most; past it, 503 at once.
    pub max_in_flight: Option<halo_model::values::MaxInFlight>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    pub ca: Option<String>,
    pub verify: Option<bool>,
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub max_per_endpoint: Option<usize>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub enabled: Option<bool>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub expect_status: Option<u16>,
    /// `type = "grpc"`: the service name asked about.
    pub service: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub jitter: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub max_ejected_percent: Option<u32>,
    pub failure_rate_interval: Option<String>,
    pub failure_rate_min_requests: Option<u64>,
    pub failure_rate_excess_percent: Option<u32>,
}
