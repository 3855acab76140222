//! Value types shared by the service spec and the data plane (the
//! proxy's own config reuses them), so a policy name or a duration means
//! the same in a service file as in a proxy file. No I/O, no proxy.

use std::time::Duration;

use http::HeaderName;

/// Parses a duration such as `250ms`, `5s`, `2m`, `1h`; `0` means zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("'{s}' has no unit; use ms, s, m or h, as in \"500ms\" or \"5s\""))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration; use a number and a unit, as in \"5s\""))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit '{unit}' in '{s}'; accepted: ms, s, m, h")),
    };
    if !(0.0..=86400.0 * 365.0).contains(&secs) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Requests per client address: `count` every `per` on average, up to
/// `burst` at once (a client quiet for a while may send `burst` together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// The largest count and burst accepted.
    pub const MAX: u32 = 1_000_000;

    /// `rate` as `N/s`, `N/m` or `N/h`; `burst` defaults to the rate's
    /// count (at least 1), so `"100/s"` lets 100 through at once.
    pub fn parse(rate: &str, burst: Option<u32>) -> Result<RateLimit, String> {
        let accepted = "accepted: N/s, N/m or N/h with N from 1 to 1000000, as in \"100/s\"";
        let (n, unit) = rate.trim().split_once('/').ok_or_else(|| format!("'{rate}' is not a rate; {accepted}"))?;
        let count: u32 = n.trim().parse().map_err(|_| format!("'{rate}' is not a rate; {accepted}"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            u => return Err(format!("unknown unit '{u}' in '{rate}'; {accepted}")),
        };
        if !(1..=Self::MAX).contains(&count) {
            return Err(format!("'{rate}' is out of range; {accepted}"));
        }
        let burst = burst.unwrap_or(count);
        if !(1..=Self::MAX).contains(&burst) {
            return Err(format!("a burst of {burst} is not accepted; accepted: 1 to {}", Self::MAX));
        }
        Ok(RateLimit { count, per, burst })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// From the request being sent to the response head arriving.
    pub first_byte: Option<Duration>,
    /// The whole exchange, response body included.
    pub request: Option<Duration>,
    /// Longest silence while the response body streams.
    pub idle: Option<Duration>,
    /// Longest silence, both ways, of a tunnel after an Upgrade (WebSocket).
    pub tunnel: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            first_byte: Some(Duration::from_secs(30)),
            request: None,
            idle: Some(Duration::from_secs(60)),
            tunnel: Some(Duration::from_secs(3600)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (0 turns retries off).
    pub attempts: u32,
    /// Response statuses retried for idempotent methods.
    pub statuses: Vec<u16>,
    /// Share of recent requests that may be retries.
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio.
    pub budget_min_per_sec: u32,
    /// Request bodies up to this size are kept for replay.
    pub body_cap: usize,
    /// How long one try of an idempotent, replayable request waits for the
    /// response head before it is abandoned and retried elsewhere.
    pub try_timeout: Adaptive,
    /// How long a safe request (GET, HEAD, OPTIONS) waits for its first
    /// response head before a second try goes to another endpoint, both
    /// running and the first head winning; off unless set.
    pub hedge: Adaptive,
}

/// A per-try timeout or a hedge delay: derived from the upstream's recent
/// latency (`auto`), fixed, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adaptive {
    Auto,
    Fixed(Duration),
    Off,
}

impl Adaptive {
    pub fn parse(s: &str) -> Result<Adaptive, String> {
        match s.trim() {
            "auto" => Ok(Adaptive::Auto),
            "off" => Ok(Adaptive::Off),
            d => match parse_duration(d) {
                Ok(d) if d.is_zero() => Err("0 is not accepted; use \"off\" to turn it off".into()),
                Ok(d) => Ok(Adaptive::Fixed(d)),
                Err(e) => Err(format!("{e}; or \"auto\" (from the upstream's recent latency) or \"off\"")),
            },
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            statuses: vec![502, 503, 504],
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            body_cap: 64 * 1024,
            try_timeout: Adaptive::Auto,
            hedge: Adaptive::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    P2cEwma,
    Random,
    ConsistentHash,
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        Ok(match s {
            "round_robin" => Policy::RoundRobin,
            "least_request" => Policy::LeastRequest,
            "p2c_ewma" => Policy::P2cEwma,
            "random" => Policy::Random,
            "consistent_hash" => Policy::ConsistentHash,
            other => {
                return Err(format!(
                    "unknown policy '{other}'; accepted: round_robin, least_request, p2c_ewma, random, consistent_hash"
                ))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
    Path,
}

impl std::str::FromStr for HashKey {
    type Err = String;

    fn from_str(k: &str) -> Result<HashKey, String> {
        let parsed = match k.split_once(':') {
            Some(("header", h)) => HeaderName::try_from(h).ok().map(HashKey::Header),
            Some(("cookie", c)) if !c.is_empty() => Some(HashKey::Cookie(c.to_string())),
            None if k == "source_ip" => Some(HashKey::SourceIp),
            None if k == "path" => Some(HashKey::Path),
            _ => None,
        };
        parsed.ok_or_else(|| format!("'{k}' is not accepted; use header:NAME, cookie:NAME, source_ip or path"))
    }
}

/// `max_in_flight`: requests in flight at most, a number or `"auto"` (a
/// limit the proxy adapts to the upstream's latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxInFlight {
    Fixed(u64),
    Auto,
}

impl serde::Serialize for MaxInFlight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxInFlight::Fixed(n) => s.serialize_u64(*n),
            MaxInFlight::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for MaxInFlight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MaxInFlight;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of requests (1 to 10000000) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MaxInFlight, E> {
                Ok(MaxInFlight::Fixed(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MaxInFlight, E> {
                u64::try_from(n).map(MaxInFlight::Fixed).map_err(|_| E::custom(format!("{n} is negative; {ACCEPTED}")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<MaxInFlight, E> {
                match s {
                    "auto" => Ok(MaxInFlight::Auto),
                    _ => Err(E::custom(format!("'{s}' is not a limit; {ACCEPTED}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

const ACCEPTED: &str = "accepted: a number of requests (1 to 10000000), or \"auto\" for a limit adapted to the latency";

/// The rules a route's settings follow wherever they are written, a
/// service file's `[balance]` or a proxy file's route: one set, so a
/// setting accepted in one is accepted, with the same meaning, in the
/// other.
pub mod rules {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    use super::{parse_duration, HashKey, MaxInFlight, Policy};

    /// Retries after the first try, at most.
    pub const MAX_RETRIES: u32 = 10;
    /// Response statuses a request may be retried on: server errors.
    pub const RETRY_STATUSES: RangeInclusive<u16> = 500..=599;
    /// The largest `max_in_flight` accepted.
    pub const MAX_IN_FLIGHT: u64 = 10_000_000;

    pub fn retries(n: u32) -> Result<u32, String> {
        if n > MAX_RETRIES {
            return Err(format!("{n} is not accepted; accepted: 0 to {MAX_RETRIES} retries"));
        }
        Ok(n)
    }

    pub fn retry_statuses(statuses: &[u16]) -> Result<(), String> {
        match statuses.iter().find(|s| !RETRY_STATUSES.contains(*s)) {
            Some(bad) => Err(format!(
                "{bad} is not accepted; retry statuses are {} to {} (server errors)",
                RETRY_STATUSES.start(),
                RETRY_STATUSES.end()
            )),
            None => Ok(()),
        }
    }

    /// A consistent hash needs a key to hash.
    pub fn hash_key(policy: Policy, key: Option<&HashKey>) -> Result<(), String> {
        if policy == Policy::ConsistentHash && key.is_none() {
            return Err("consistent_hash needs hash_key (header:NAME, cookie:NAME, source_ip or path)".into());
        }
        Ok(())
    }

    pub fn max_in_flight(m: MaxInFlight) -> Result<MaxInFlight, String> {
        match m {
            MaxInFlight::Fixed(n) if !(1..=MAX_IN_FLIGHT).contains(&n) => {
                Err(format!("accepted: 1 to {MAX_IN_FLIGHT}, or \"auto\" (omit it for no limit)"))
            }
            m => Ok(m),
        }
    }

    /// The connect timeout: above 0.
    pub fn connect_timeout(given: &str) -> Result<Duration, String> {
        match parse_duration(given)? {
            d if d.is_zero() => Err("must be above 0".into()),
            d => Ok(d),
        }
    }

    /// An optional timeout: `"0"` turns it off.
    pub fn optional_timeout(given: &str) -> Result<Option<Duration>, String> {
        parse_duration(given).map(|d| (!d.is_zero()).then_some(d))
    }

    /// A route's path: absolute.
    pub fn path(p: &str) -> Result<(), String> {
        if !p.starts_with('/') {
            return Err(format!("'{p}' must start with '/'"));
        }
        Ok(())
    }
}

/// A route's (or an SNI certificate's) host: exact, or `*.example.com`
/// for any subdomain; lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl HostMatch {
    /// `example.com` or `*.example.com`, any case; the error says what is
    /// accepted.
    pub fn parse(h: &str) -> Result<HostMatch, String> {
        let lower = h.to_ascii_lowercase();
        let bad = || format!("'{h}' is not accepted; use a host name or *.example.com");
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        if bare.is_empty() || bare.contains(['*', '/', ' ', ':']) {
            return Err(bad());
        }
        Ok(match lower.strip_prefix("*.") {
            Some(rest) => HostMatch::Suffix(format!(".{rest}")),
            None => HostMatch::Exact(lower),
        })
    }

    /// Whether `host` (lower-case) matches: a wildcard matches any
    /// subdomain, not the parent itself.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(e) => host == e,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// A route's path: a prefix (whole segments) or one exact path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}
