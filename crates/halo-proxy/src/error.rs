//! Errors a proxied request can end in, each with the status the client gets
//! and whether another attempt on another endpoint is safe.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches host '{host}' and path '{path}'")]
    NoRoute { host: String, path: String },
    /// The request breaks HTTP/1.1's rules (RFC 9112); never forwarded.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("CONNECT is not supported here: this proxy forwards HTTP requests, it does not open tunnels")]
    ConnectRefused,
    #[error("upstream '{0}' speaks h2, and a protocol switch (Upgrade, WebSocket) needs an http1 upstream")]
    UpgradeNeedsHttp1(String),
    #[error("no healthy endpoint in upstream '{0}'")]
    NoEndpoint(String),
    /// A service at zero instances did not get one within its
    /// `cold_start_timeout`, or its queue of held requests was full.
    #[error("upstream '{upstream}' has no instance yet: {why}")]
    ColdStart { upstream: String, why: &'static str },
    /// The upstream's circuit breaker: `limit` requests were in flight.
    #[error("upstream '{upstream}' has its limit of {limit} requests in flight (max_in_flight)")]
    Overloaded { upstream: String, limit: u64 },
    /// The client is over the route's rate limit; it may send again after this.
    #[error("too many requests from this client (the route's rate_limit); retry in {} s", retry_secs(*.0))]
    RateLimited(Duration),
    /// The request never left the proxy.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request was handed to a connection that failed before taking it.
    #[error("upstream connection closed before the request was sent: {0}")]
    NotSent(BoxError),
    /// The request may have reached the upstream.
    #[error("upstream failed before responding: {0}")]
    Upstream(BoxError),
    #[error("upstream sent no response within {0:?}")]
    FirstByteTimeout(Duration),
    /// One try of an idempotent request gave up at its per-try timeout.
    #[error("upstream sent no response within the per-try timeout of {0:?}")]
    TryTimeout(Duration),
    #[error("request exceeded its timeout of {0:?}")]
    RequestTimeout(Duration),
    #[error("reading the request body: {0}")]
    RequestBody(BoxError),
    #[error("the request body did not arrive within {0:?}")]
    RequestBodyTimeout(Duration),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ConnectRefused => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoEndpoint(_) | ProxyError::Overloaded { .. } | ProxyError::ColdStart { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpgradeNeedsHttp1(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Connect(ConnectError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            // Queued for longer than the connect timeout: overloaded, as HAProxy says.
            ProxyError::Connect(ConnectError::PoolFull(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::NotSent(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::FirstByteTimeout(_) | ProxyError::TryTimeout(_) | ProxyError::RequestTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Whether trying another endpoint is safe: always when the request
    /// provably never reached an upstream, otherwise only for idempotent
    /// requests whose body can be replayed.
    pub fn retryable(&self, idempotent_and_replayable: bool) -> bool {
        match self {
            ProxyError::Connect(_) | ProxyError::NotSent(_) => true,
            ProxyError::Upstream(_) | ProxyError::FirstByteTimeout(_) | ProxyError::TryTimeout(_) => {
                idempotent_and_replayable
            }
            _ => false,
        }
    }

    /// Whether the proxy refused the client's request for the client's own
    /// doing (counted in its status class, not as an upstream error).
    pub fn is_client_refusal(&self) -> bool {
        matches!(
            self,
            ProxyError::NoRoute { .. }
                | ProxyError::BadRequest(_)
                | ProxyError::ConnectRefused
                | ProxyError::RateLimited(_)
                | ProxyError::RequestBody(_)
                | ProxyError::RequestBodyTimeout(_)
        )
    }

    /// Seconds a client should wait before trying again (`Retry-After`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::RateLimited(d) => Some(retry_secs(*d)),
            ProxyError::Overloaded { .. } | ProxyError::ColdStart { .. } => Some(1),
            _ => None,
        }
    }

    /// Whether this counts against the endpoint's passive health.
    pub fn is_endpoint_failure(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect(_)
                | ProxyError::Upstream(_)
                | ProxyError::FirstByteTimeout(_)
                | ProxyError::TryTimeout(_)
        )
    }
}

/// Whole seconds to wait, at least 1 (what `Retry-After` can say).
fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Why no connection could be had; none of these reached the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("no free connection to {0} within the connect timeout (pool full)")]
    PoolFull(SocketAddr),
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
}
