//! Request heads in, response heads out (RFC 9112): parsing with
//! `httparse` into stack storage, the framing and keep-alive decisions,
//! and encoding a response head into the connection's write buffer.

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};

use crate::decode::{digits, Chunk, Decoder};

/// Most header lines a request may have (past it: 431).
pub const MAX_HEADERS: usize = 100;

/// A parsed request head and what it says about the exchange.
pub struct Head {
    pub request: Request<()>,
    /// How its body is framed.
    pub body: Decoder,
    /// The client wants the connection kept after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` with a body to come.
    pub expects_continue: bool,
}

/// Marks a request that asks to switch protocols (in its extensions):
/// the forwarding code keeps its Upgrade headers and, on a 101, hands the
/// upstream connection back for a tunnel.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRequested;

/// Why a head was refused; the status the client gets.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub why: &'static str,
}

fn bad(why: &'static str) -> Refused {
    Refused { status: StatusCode::BAD_REQUEST, why }
}

/// Whether `buf` holds a whole head, scanning from `scanned` (what an
/// earlier call already looked at) and moving it on. Lines must end in
/// CRLF: a bare LF is refused (RFC 9112 2.2 lets a server refuse it, and a
/// proxy that accepts what its upstream frames otherwise invites request
/// smuggling). A head longer than `max` is refused with 431.
pub fn ends(buf: &[u8], scanned: &mut usize, max: usize) -> Result<bool, Refused> {
    // Empty lines before the request line are allowed (RFC 9112 2.2).
    let lead = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    let from = (*scanned).max(lead);
    for i in from..buf.len() {
        if buf[i] == b'\n' {
            if buf[i - 1] != b'\r' {
                return Err(bad("a bare LF in the request head (lines end in CRLF)"));
            }
            if i >= 3 && buf[i - 3..i - 1] == *b"\r\n" {
                return Ok(true);
            }
        }
    }
    *scanned = buf.len();
    if buf.len() > max {
        return Err(Refused { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why: "request head too large" });
    }
    Ok(false)
}

/// Parses a head off the front of `buf`: `Ok(None)` while incomplete.
/// On success the head's bytes are taken off `buf`.
pub fn parse(buf: &mut BytesMut, max_bytes: usize) -> Result<Option<Head>, Refused> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => {
            return Err(Refused { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why: "request head too large" })
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why: "too many header lines" })
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    if len > max_bytes {
        return Err(Refused { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why: "request head too large" });
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| bad("invalid method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let uri: Uri = req.path.unwrap_or("").parse().map_err(|_| bad("invalid request target"))?;
    let mut map = HeaderMap::with_capacity(req.headers.len());
    let (mut te, mut cl): (Option<&[u8]>, Option<u64>) = (None, None);
    let (mut close, mut keep, mut expect) = (false, false, false);
    let (mut upgrade_option, mut upgrade_header) = (false, false);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("invalid header value"))?;
        if name == header::TRANSFER_ENCODING {
            te = Some(h.value);
        } else if name == header::CONTENT_LENGTH {
            let n = digits(h.value.trim_ascii(), 10).ok_or_else(|| bad("invalid Content-Length"))?;
            if cl.is_some_and(|c| c != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            cl = Some(n);
        } else if name == header::CONNECTION {
            for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
                upgrade_option |= token.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::UPGRADE {
            // h2c is not tunnelled: the client gets HTTP/1.1 and may
            // speak h2c with prior knowledge.
            upgrade_header = !h.value.trim_ascii().eq_ignore_ascii_case(b"h2c");
        } else if name == header::EXPECT {
            expect = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        map.append(name, value);
    }
    let body = match (te, cl) {
        (Some(_), Some(_)) => return Err(bad("both Transfer-Encoding and Content-Length frame the body")),
        (Some(_), None) if version == Version::HTTP_10 => return Err(bad("Transfer-Encoding in an HTTP/1.0 request")),
        (Some(te), None) => {
            let last = te.rsplit(|b| *b == b',').next().map(<[u8]>::trim_ascii).unwrap_or_default();
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err(bad("a request's Transfer-Encoding must end in chunked"));
            }
            Decoder::Chunked(Chunk::Size)
        }
        (None, Some(0)) | (None, None) => Decoder::Done,
        (None, Some(n)) => Decoder::Length(n),
    };
    let keep_alive = if version == Version::HTTP_10 { keep && !close } else { !close };
    let expects_continue = expect && version == Version::HTTP_11 && !body.is_done();
    let _ = buf.split_to(len);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    // An Upgrade (WebSocket) needs both `Connection: upgrade` and the
    // `Upgrade` header, HTTP/1.1, and no body (RFC 9110 7.8).
    if upgrade_option && upgrade_header && version == Version::HTTP_11 && body.is_done() {
        request.extensions_mut().insert(UpgradeRequested);
    }
    Ok(Some(Head { request, body, keep_alive, expects_continue }))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body bytes (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes the head of `resp` into `out` and says how its body is framed.
/// Responses always leave as HTTP/1.1.
pub fn encode<B>(
    resp: &mut Response<B>,
    exact: Option<u64>,
    head_only: bool,
    client: Version,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> Framing {
    let status = resp.status();
    let headers = resp.headers_mut();
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if head_only || bodiless {
        Framing::None
    } else if let Some(n) = exact {
        Framing::Length(n)
    } else if client == Version::HTTP_10 {
        Framing::Close
    } else {
        Framing::Chunked
    };
    match framing {
        Framing::Length(n) => {
            headers.remove(header::TRANSFER_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Chunked => {
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        Framing::Close => {
            headers.remove(header::CONTENT_LENGTH);
            headers.remove(header::TRANSFER_ENCODING);
        }
        // A HEAD answer keeps the length the GET would have.
        Framing::None if bodiless => {
            headers.remove(header::TRANSFER_ENCODING);
            if status == StatusCode::NO_CONTENT || status.is_informational() {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
        Framing::None => {}
    }
    if !keep_alive || framing == Framing::Close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if client == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// The whole answer to a refused head: status, reason, closed.
pub fn refusal(r: &Refused) -> Bytes {
    let body = format!("{} {}: {}\n", r.status.as_u16(), r.status.canonical_reason().unwrap_or(""), r.why);
    Bytes::from(format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or(""),
        body.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    /// A head as the connection reads it: whole first, then parsed.
    fn head(raw: &str) -> Result<Option<Head>, Refused> {
        let mut buf = BytesMut::from(raw);
        if !ends(&buf, &mut 0, 16 << 10)? {
            return Ok(None);
        }
        parse(&mut buf, 16 << 10)
    }

    #[test]
    fn an_upgrade_needs_the_option_the_header_http_1_1_and_no_body() {
        let asks = |raw: &str| head(raw).unwrap().unwrap().request.extensions().get::<UpgradeRequested>().is_some();
        assert!(asks("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!asks("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"), "no Connection option");
        assert!(!asks("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n"), "no Upgrade header");
        assert!(!asks("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"), "HTTP/1.0");
        assert!(!asks("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"), "h2c");
        assert!(
            !asks("POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\nContent-Length: 2\r\n\r\nhi"),
            "with a body"
        );
    }

    #[test]
    fn framing_and_keep_alive_follow_rfc_9112() {
        let h = head("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello").unwrap().unwrap();
        assert_eq!((h.body, h.keep_alive, h.expects_continue), (Decoder::Length(5), true, false));
        let h = head("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.body, h.expects_continue), (Decoder::Chunked(Chunk::Size), true));
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive && h.request.version() == Version::HTTP_10);
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none(), "incomplete");
    }

    #[test]
    fn bad_framing_is_refused() {
        for (raw, why) in [
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", "both"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "conflicting"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", "invalid Content-Length"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", "must end in chunked"),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            ("NOT HTTP\r\n\r\n", "malformed"),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: 1\n\r\n", "bare LF"),
            ("GET / HTTP/1.1\r\nHost: a\n\n", "bare LF"),
        ] {
            let e = head(raw).err().unwrap_or_else(|| panic!("accepted: {raw:?}"));
            assert!(e.why.contains(why) && e.status == StatusCode::BAD_REQUEST, "{raw:?}: {}", e.why);
        }
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "x".repeat(20 << 10));
        assert_eq!(head(&big).err().map(|e| e.status), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }

    #[test]
    fn property_any_split_of_a_valid_head_parses_to_it_and_damage_never_panics() {
        let mut rng = Rng(0x5851f42d4c957f2d);
        let methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
        for round in 0..3_000 {
            let method = methods[rng.next(methods.len() as u64) as usize];
            let path = format!("/p{}?q={}", rng.next(1000), rng.next(1000));
            let n = rng.next(12);
            let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: h{round}.example\r\n");
            for i in 0..n {
                raw.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(rng.next(40) as usize)));
            }
            raw.push_str("\r\nNEXT");
            // Fed in random pieces: incomplete until the blank line, then whole.
            let mut buf = BytesMut::new();
            let bytes = raw.as_bytes();
            let (mut fed, mut scanned) = (0, 0);
            let head = loop {
                if ends(&buf, &mut scanned, 16 << 10).unwrap() {
                    break parse(&mut buf, 16 << 10).unwrap().expect("a whole head parses");
                }
                assert!(fed < bytes.len(), "complete head not recognised: {raw:?}");
                let end = (fed + 1 + rng.next(30) as usize).min(bytes.len());
                buf.extend_from_slice(&bytes[fed..end]);
                fed = end;
            };
            assert_eq!((head.request.method().as_str(), head.request.uri().to_string()), (method, path));
            assert_eq!(head.request.headers().len(), 1 + n as usize);
            buf.extend_from_slice(&bytes[fed..]);
            assert_eq!(&buf[..], b"NEXT", "bytes after the head were eaten");
            // Damaged copies: an answer or a refusal, never a panic.
            let mut bad = raw.clone().into_bytes();
            for _ in 0..1 + rng.next(4) {
                let i = rng.next(bad.len() as u64) as usize;
                bad[i] = rng.next(256) as u8;
            }
            if ends(&bad, &mut 0, 16 << 10).is_ok_and(|whole| whole) {
                let _ = parse(&mut BytesMut::from(&bad[..]), 16 << 10);
            }
        }
    }

    #[test]
    fn responses_leave_as_http_1_1_with_their_framing() {
        let mut out = Vec::new();
        let mut r = Response::new(());
        r.headers_mut().insert("x-a", HeaderValue::from_static("1"));
        assert_eq!(encode(&mut r, Some(3), false, Version::HTTP_11, true, &mut out), Framing::Length(3));
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 3\r\n\r\n");
        let mut out = Vec::new();
        assert_eq!(encode(&mut Response::new(()), None, false, Version::HTTP_10, true, &mut out), Framing::Close);
        assert!(String::from_utf8(out).unwrap().contains("connection: close"));
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::NO_CONTENT;
        assert_eq!(encode(&mut r, Some(0), false, Version::HTTP_11, true, &mut Vec::new()), Framing::None);
    }
}
