//! The validated configuration: what the rest of the proxy reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

pub use crate::path::{EncodedSlashes, PathNormalization, PathPolicy};
pub use crate::proxy_protocol::{Cidr, Version as ProxyProtocolVersion};
pub use crate::tls::client::UpstreamTls;
pub use crate::tls::{CertFiles, MinVersion, TlsListener};
pub use halo_model::values::{HashKey, HostMatch, PathMatch, Policy, RateLimit, RetryPolicy, Timeouts};

/// A token: compared in constant time, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(std::sync::Arc<str>);

impl Secret {
    pub fn new(s: &str) -> Secret {
        Secret(s.into())
    }

    /// Whether `given` is this secret, in time that does not depend on
    /// where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a token file: its first line, at least 16 characters, in a file
/// only its owner can read.
pub fn read_secret(path: &std::path::Path) -> Result<Secret, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("{} is readable by others (mode {mode:o}); run chmod 600 on it", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 {
        return Err(format!("{} holds no token of at least 16 characters", path.display()));
    }
    Ok(Secret::new(token))
}

/// A complete, validated proxy configuration (one immutable snapshot).
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads that serve connections.
    pub workers: usize,
    /// false (default): one single-threaded runtime per worker, each with its
    /// own `SO_REUSEPORT` listener socket (nginx's and Envoy's model); true:
    /// one work-stealing runtime shared by all workers.
    pub work_stealing: bool,
    pub grace_period: Duration,
    pub access_log: bool,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this; an HTTP/2 one
    /// that started no stream for this long is closed gracefully (GOAWAY).
    pub keepalive_idle: Duration,
    /// A client that takes none of a response for this long is closed,
    /// and its upstream connection released (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// A request body must arrive whole within this (besides the per-read
    /// idle limit).
    pub request_body_timeout: Duration,
    /// An HTTP/2 connection older than this is closed gracefully (GOAWAY:
    /// streams in flight finish), so no client holds one forever.
    pub max_connection_age: Duration,
    pub admin: Option<SocketAddr>,
    /// The token the admin listener wants (`admin.token_file`), read when
    /// the file is loaded or reloaded.
    pub admin_token: Option<Secret>,
    /// The admin listener speaks HTTPS with these certificates.
    pub admin_tls: Option<Arc<TlsListener>>,
    pub listeners: Vec<ListenerConfig>,
    /// Tried in file order; the first route that matches wins.
    pub routes: Vec<RouteConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub addr: SocketAddr,
    pub protocol: ListenerProtocol,
    /// Sources that must send a PROXY protocol header; empty: none.
    pub proxy_protocol_from: Vec<Cidr>,
    /// Open connections at most (across workers); at the limit the
    /// listener stops accepting until one closes, so new connections wait
    /// in the kernel's accept queue (HAProxy's `maxconn`). `None`: no limit.
    pub max_connections: Option<u64>,
    /// Bound with `IP_FREEBIND`: the address is a floating IP that this
    /// host may not have yet (set by the node file for its `[[vip]]`
    /// addresses, not by users).
    pub freebind: bool,
    /// How request paths are normalised before routing (http listeners).
    pub paths: PathPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port.
    Http,
    /// Bytes forwarded to an upstream group (L4).
    Tcp(TcpForward),
    /// TLS terminated, then HTTP/1.1 or HTTP/2 as ALPN says; routes as
    /// for `Http`.
    Https(Arc<TlsListener>),
}

impl ListenerProtocol {
    /// Whether routes serve this listener's traffic.
    pub fn is_http(&self) -> bool {
        matches!(self, ListenerProtocol::Http | ListenerProtocol::Https(_))
    }
}

/// How a TCP listener forwards its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpForward {
    /// Where connections go (those no `sni` entry takes, when there are some).
    pub upstream: Option<String>,
    /// TLS passthrough: by the server name of the ClientHello, first match.
    pub sni: Vec<(Vec<HostMatch>, String)>,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Endpoints tried (each a different one) before the client is closed.
    pub connect_tries: u32,
}

impl TcpForward {
    /// The upstream for a connection whose ClientHello named `name`.
    pub fn upstream_for(&self, name: Option<&str>) -> Option<&str> {
        let by_name = name.and_then(|n| self.sni.iter().find(|(hosts, _)| hosts.iter().any(|h| h.matches(n))));
        by_name.map(|(_, u)| u.as_str()).or(self.upstream.as_deref())
    }

    pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
    pub const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
    pub const DEFAULT_TRIES: u32 = 3;
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Listener names this route applies to; `None` for all.
    pub listeners: Option<Vec<String>>,
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    /// Empty means any method.
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Upstream names and weights; one entry when the route has one upstream.
    pub split: Vec<(String, u32)>,
    pub overrides: Vec<Override>,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    /// Requests per client address; past it, 429.
    pub rate_limit: Option<RateLimit>,
}

/// Sends matching requests to one upstream, whatever the split says.
#[derive(Debug, Clone)]
pub struct Override {
    pub matcher: OverrideMatch,
    pub value: String,
    pub upstream: String,
}

#[derive(Debug, Clone)]
pub enum OverrideMatch {
    Header(HeaderName),
    Cookie(String),
}

impl RouteConfig {
    /// A route to `split` (upstream names and weights) for any request,
    /// with the default timeouts and retries.
    pub fn new(name: String, split: Vec<(String, u32)>) -> RouteConfig {
        RouteConfig {
            name,
            listeners: None,
            host: None,
            path: None,
            methods: Vec::new(),
            headers: Vec::new(),
            split,
            overrides: Vec::new(),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            rate_limit: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub endpoints: Vec<EndpointConfig>,
    pub policy: Policy,
    pub hash_key: Option<HashKey>,
    /// Cookie name for session persistence; `None` turns it off.
    pub session_cookie: Option<String>,
    pub slow_start: Option<Duration>,
    pub protocol: UpstreamProtocol,
    /// A PROXY protocol header first on every connection (tcp listeners).
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// TLS to the endpoints.
    pub tls: Option<Arc<UpstreamTls>>,
    pub pool: PoolConfig,
    pub health: Option<HealthConfig>,
    pub outlier: Option<OutlierConfig>,
    /// Requests in flight at most (a circuit breaker): past it, 503 at
    /// once rather than a queue without bound; `Auto`, a limit adapted to
    /// the upstream's latency (`overload::Adaptive`). `None`: no limit.
    pub max_in_flight: Option<halo_model::values::MaxInFlight>,
    /// How long a connection (tcp, or an upgraded one) to an endpoint
    /// removed from the upstream lasts; `None`: the proxy's grace period.
    /// A stateful service's primary upstream has zero: a demoted primary
    /// loses its clients at once.
    pub removal_grace: Option<Duration>,
    /// Checked before each tcp connection to the endpoints: closed, the
    /// client is refused. A stateful primary is reached only while this
    /// node knows the cluster's state is current (set by the control
    /// plane, never by a file).
    pub gate: Option<Gate>,
    /// With no endpoint, hold a request (up to `queue` at once) this long
    /// for one to come: a service scaled to zero starting its first
    /// instance (set by the control plane, never by a file).
    pub cold_start: Option<ColdStart>,
}

/// How requests wait for an upstream with no endpoint ([`UpstreamConfig::cold_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdStart {
    pub timeout: Duration,
    pub queue: u32,
}

/// A condition a connection to an upstream must pass ([`UpstreamConfig::gate`]).
#[derive(Clone)]
pub struct Gate(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl Gate {
    pub fn open(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.open() { "Gate(open)" } else { "Gate(closed)" })
    }
}

impl UpstreamConfig {
    /// An upstream with no endpoints yet and every default a file would
    /// get: round robin over HTTP/1.1, the default pool, health checks and
    /// outlier detection.
    pub fn new(name: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_string(),
            endpoints: Vec::new(),
            policy: Policy::RoundRobin,
            hash_key: None,
            session_cookie: None,
            slow_start: None,
            protocol: UpstreamProtocol::Http1,
            send_proxy_protocol: None,
            tls: None,
            pool: PoolConfig::default(),
            health: Some(HealthConfig::default()),
            outlier: Some(OutlierConfig::default()),
            max_in_flight: None,
            removal_grace: None,
            gate: None,
            cold_start: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Connections (busy plus idle) per endpoint; requests beyond wait.
    pub max_per_endpoint: usize,
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { max_per_endpoint: 1024, idle_timeout: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down endpoint up.
    pub rise: u32,
    /// Consecutive failures that take an up endpoint down.
    pub fall: u32,
    /// Up to this much is added at random to each interval.
    pub jitter: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: HealthKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            jitter: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// GET `path`; healthy on `expect_status`, or any 2xx/3xx when unset.
    Http {
        path: String,
        expect_status: Option<u16>,
    },
    Tcp,
    /// `grpc.health.v1.Health/Check` over h2c; healthy when SERVING.
    Grpc {
        /// The service asked about; empty: the server as a whole.
        service: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
    /// Ejection of an endpoint whose failure rate stands out from the rest
    /// of its group's ([`crate::outlier`]); `None`: off.
    pub failure_rate: Option<FailureRate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRate {
    /// How often the rates are judged, each time over the tries since.
    pub interval: Duration,
    /// Tries an endpoint, and the rest of the group, need in an interval
    /// to be judged.
    pub min_requests: u64,
    /// Percentage points by which an endpoint's failure rate must exceed
    /// the rest of the group's (besides being significant).
    pub excess_percent: u32,
}

impl Default for FailureRate {
    fn default() -> Self {
        FailureRate { interval: Duration::from_secs(3), min_requests: 50, excess_percent: 5 }
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            failure_rate: Some(FailureRate::default()),
        }
    }
}
