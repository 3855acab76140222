//! Header rewriting between downstream and upstream: hop-by-hop headers
//! removed both ways (RFC 9110 7.6.1), X-Forwarded-* and `Forwarded` added,
//! `x-request-id` kept or generated.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) names first: most messages carry none, and a
    // scan is cheaper than seven hashed look-ups.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::try_from(n.trim()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    for n in
        [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING, &header::UPGRADE]
    {
        h.remove(n);
    }
}

/// A client address in the two spellings forwarding headers use.
#[derive(Clone)]
pub struct ClientIp {
    /// `127.0.0.1` or `::1`, for X-Forwarded-For.
    plain: HeaderValue,
    /// `for=127.0.0.1` or `for="[::1]"`, for Forwarded.
    for_: String,
}

impl ClientIp {
    pub fn new(client: SocketAddr) -> Self {
        let ip = client.ip().to_string();
        let for_ = if client.is_ipv6() { format!("for=\"[{ip}]\"") } else { format!("for={ip}") };
        ClientIp { plain: HeaderValue::try_from(ip).unwrap_or(HeaderValue::from_static("unknown")), for_ }
    }
}

/// Adds the forwarding headers for a request from `client` for `host`.
pub fn add_forwarded(h: &mut HeaderMap, client: &ClientIp, host: Option<&HeaderValue>) {
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::try_from(format!("{prev}, {}", client.plain.to_str().unwrap_or(""))).ok(),
        None => Some(client.plain.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let mut fwd = String::with_capacity(64);
    if let Some(prev) = h.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    fwd.push_str(&client.for_);
    fwd.push_str(";proto=http");
    if let Some(host) = host.and_then(|v| v.to_str().ok()) {
        if host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
            fwd.push_str(";host=");
            fwd.push_str(host);
        }
    }
    if let Ok(v) = HeaderValue::try_from(fwd) {
        h.insert(FORWARDED.clone(), v);
    }
}

/// The request id: the client's when it sent a usable one, else a new one
/// (also written into the request headers).
pub fn request_id(h: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = h.get(&X_REQUEST_ID).filter(|v| !v.is_empty() && v.len() <= 200) {
        return v.clone();
    }
    let v = HeaderValue::from_bytes(&crate::util::request_id()).unwrap_or(HeaderValue::from_static("0"));
    h.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let host = HeaderValue::from_static("example.com");
        add_forwarded(&mut h, &ClientIp::new("127.0.0.2:5000".parse().unwrap()), Some(&host));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["forwarded"], "for=127.0.0.2;proto=http;host=example.com");
    }
}
