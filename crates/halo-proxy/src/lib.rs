//! halo's data plane.
//!
//! The proxy takes an immutable, validated [`config::Config`] snapshot plus
//! endpoint updates ([`Proxy::set_endpoints`]) and knows nothing of stores or
//! supervisors. A request flows listener -> router -> traffic split ->
//! balancing policy over the available endpoints -> pooled upstream
//! connection -> response; failures that are safe to retry go to another
//! endpoint within a retry budget, and every outcome feeds passive health.
//!
//! Module map: `config` (file format and validation), `server` (listeners,
//! reload, shutdown), `forward` (one request), `router`, `upstream` +
//! `balance` (groups and policies), `endpoint` + `health` (endpoint state,
//! passive and active health), `pool` (upstream connections), `retry`
//! (budget), `overload` (connection, in-flight and rate limits),
//! `headers`, `body`, `metrics`, `admin`, `registry` (state kept across
//! reloads), `tcp` (L4 listeners), `tunnel` (bytes both ways, for
//! TCP and HTTP Upgrade).

mod balance;
mod bind;
mod body;
mod client;
pub mod config;
mod conn;
mod decode;
mod endpoint;
mod error;
mod forward;
mod h1;
pub mod handover;
mod headers;
mod health;
pub mod history;
pub mod http_api;
mod listener;
pub mod metrics;
mod open;
mod outlier;
mod overload;
mod park;
pub mod path;
mod pool;
mod proxy_protocol;
mod registry;
mod response;
mod retry;
mod router;
pub mod run_dir;
mod server;
mod shared;
mod sni;
pub mod tasks;
mod tcp;
mod tls;
mod tunnel;
mod upstream;
mod util;

pub use error::ProxyError as RequestError;
pub use server::admin::{bearer as admin_bearer, render_metrics};
pub use server::{Proxy, ProxyError, ReloadError, UpstreamTotals};
