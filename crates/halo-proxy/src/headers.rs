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

/// The hop-by-hop headers every message loses (RFC 9110 7.6.1), besides
/// those its `Connection` header names. `Connection` is first.
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Headers a message keeps even when its `Connection` header names them:
/// what routes and frames it (Host, Content-Length) and what halo itself
/// sets (the request id). Naming Host in `Connection` would otherwise send
/// the upstream a request without one.
fn protected() -> [&'static HeaderName; 3] {
    [&header::HOST, &header::CONTENT_LENGTH, &X_REQUEST_ID]
}

/// Removes hop-by-hop headers, including those the `Connection` header
/// names (but never the [`protected`] ones).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) names, noting which hop-by-hop ones are there:
    // most messages carry none or only `Connection: keep-alive`, and every
    // `remove` hashes its name, so only what is present is removed.
    let hop = hop_by_hop();
    let mut present = [false; 7];
    for k in h.keys() {
        if let Some(i) = hop.iter().position(|n| *n == k) {
            present[i] = true;
        }
    }
    if present[0] {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()) {
            for token in v.split(',').map(str::trim) {
                // `close` and `keep-alive` are options, not header names (a
                // `Keep-Alive` header is removed as hop-by-hop anyway).
                if token.is_empty() || token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                if let Ok(n) = HeaderName::try_from(token) {
                    if !protected().contains(&&n) {
                        named.push(n);
                    }
                }
            }
        }
        for n in named {
            h.remove(n);
        }
    }
    for (n, _) in hop.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(*n);
    }
}

/// A client address in the two spellings forwarding headers use, and
/// the scheme it came in by.
#[derive(Clone)]
pub struct ClientIp {
    /// `127.0.0.1` or `::1`, for X-Forwarded-For.
    plain: HeaderValue,
    /// `for=127.0.0.1` or `for="[::1]"`, for Forwarded.
    for_: String,
    tls: bool,
}

impl ClientIp {
    pub fn new(client: SocketAddr, tls: bool) -> Self {
        let ip = client.ip().to_string();
        let for_ = if client.is_ipv6() { format!("for=\"[{ip}]\"") } else { format!("for={ip}") };
        ClientIp { plain: HeaderValue::try_from(ip).unwrap_or(HeaderValue::from_static("unknown")), for_, tls }
    }

    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
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
    h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(client.proto()));
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    let mut fwd = String::with_capacity(64);
    if let Some(prev) = h.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    fwd.push_str(&client.for_);
    fwd.push_str(";proto=");
    fwd.push_str(client.proto());
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

/// The value of cookie `name` in the request, if present.
pub fn cookie<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
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
        // Several Connection values, mixed case, and a named header that is
        // itself hop-by-hop.
        let mut h = HeaderMap::new();
        h.append("connection", "Close, X-A".parse().unwrap());
        h.append("connection", "upgrade".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-b"]);
        // What routes, frames and identifies the request stays.
        let mut h = HeaderMap::new();
        h.insert("connection", "close, host, Content-Length, x-request-id, x-gone".parse().unwrap());
        for n in ["host", "content-length", "x-request-id", "x-gone"] {
            h.insert(HeaderName::from_static(n), "1".parse().unwrap());
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "host", "x-request-id"]);
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        let host = HeaderValue::from_static("example.com");
        add_forwarded(&mut h, &ClientIp::new("127.0.0.2:5000".parse().unwrap(), false), Some(&host));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["forwarded"], "for=127.0.0.2;proto=http;host=example.com");
    }

    #[test]
    fn cookie_lookup() {
        let (p, _) =
            http::Request::builder().uri("/").header("cookie", "a=1; halo-track=beta").body(()).unwrap().into_parts();
        assert_eq!(cookie(&p, "halo-track"), Some("beta"));
        assert_eq!(cookie(&p, "b"), None);
    }
}
