//! Forwarding one request: route, pick an endpoint, send over a pooled
//! connection, retry on another endpoint when that is safe and the budget
//! allows, and build the response.

use halo_model::values::rules::MAX_RETRIES;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::body::{DownBody, ProxyBody};
use crate::client::ClientError;
use crate::endpoint::{Endpoint, InflightGuard};
use crate::error::ProxyError;
use crate::h1::UpgradeRequested;
use crate::headers;
use crate::metrics::{class_index, ListenerStats, UpstreamStats};
use crate::path::PathPolicy;
use crate::pool::{ConnectError, Pooled, Sender};
use crate::response::{RespBody, Source};
use crate::router::{self, Route};
use crate::shared::Shared;
use crate::tunnel::Upgraded;
use crate::upstream::Group;

/// How long a request body may take to arrive when it is buffered for replay.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra tries on the same endpoint when a pooled connection turns out dead.
const STALE_TRIES: usize = 3;
/// `auto` per-try timeouts: this many times the upstream's recent p99 to
/// the response head, at least `AUTO_FLOOR`; `AUTO_UNKNOWN` until there
/// are samples.
const AUTO_FACTOR: u32 = 4;
const AUTO_FLOOR: Duration = Duration::from_millis(250);
const AUTO_UNKNOWN: Duration = Duration::from_secs(1);
/// `auto` hedges: a second try after this many times the upstream's recent
/// p95 time to the response head, at least `HEDGE_FLOOR`.
const HEDGE_FACTOR: u32 = 2;
const HEDGE_FLOOR: Duration = Duration::from_millis(1);

/// Where a request came in (one per downstream connection).
pub struct Downstream {
    pub listener: Arc<str>,
    /// The listener's counters (tunnels count their bytes there).
    pub stats: Arc<ListenerStats>,
    pub client: SocketAddr,
    /// The client address as forwarding headers spell it, made once per
    /// connection, rather than per request.
    pub client_ip: headers::ClientIp,
    /// The listener's path rules.
    pub paths: PathPolicy,
    /// Holds the connection counted as open while anything serves it.
    pub _open: crate::open::Open,
}

/// A successful exchange with an endpoint.
struct Exchange {
    resp: Response<Source>,
    conn: Pooled,
    inflight: InflightGuard,
    /// The upstream's `max_in_flight` place, held until the body is done.
    admitted: Option<crate::overload::Admitted>,
    set_cookie: Option<(String, String)>,
}

/// What an attempt loop ended in, for logs and metrics.
struct Outcome {
    endpoint: Option<Arc<Endpoint>>,
    /// The upstream's counters, once a group was chosen.
    upstream_stats: Option<Arc<UpstreamStats>>,
    upstream: Option<Arc<str>>,
    tries: u32,
}

pub async fn handle(
    shared: Arc<Shared>,
    down: Arc<Downstream>,
    req: Request<DownBody>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let snap = shared.snapshot.load_full();
    let (mut parts, body) = req.into_parts();
    if let Err(e) = strict(&parts) {
        // What else the connection carries cannot be trusted: close it.
        let mut r = error_response(&e, None);
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(r);
    }
    // Routed by, and forwarded with, the path the upstream will resolve.
    match down.paths.apply(&parts.uri) {
        Ok(None) => {}
        Ok(Some(uri)) => parts.uri = uri,
        Err(why) => return Ok(error_response(&ProxyError::BadRequest(why), None)),
    }
    let found = {
        let host = router::host(&parts);
        snap.routes
            .iter()
            .find(|r| r.matches(&down.listener, &host, &parts))
            .ok_or_else(|| ProxyError::NoRoute { host: host.into_owned(), path: parts.uri.path().to_string() })
    };
    let route = match found {
        Ok(r) => r,
        Err(e) => return Ok(error_response(&e, None)),
    };
    let rid = headers::request_id(&mut parts.headers);
    // gRPC is HTTP/2 only: HTTP/1.1 requests skip the header lookup.
    let grpc = parts.version == http::Version::HTTP_2
        && parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // What the client asks to switch to, kept past the hop-by-hop strip.
    let upgrade = match parts.extensions.get::<UpgradeRequested>() {
        Some(_) => parts.headers.get(header::UPGRADE).cloned(),
        None => None,
    };
    let start_ms = crate::util::ms_at(start.into_std());

    let method = parts.method.clone();
    let path = if snap.config.access_log { parts.uri.path().to_string() } else { String::new() };
    let deadline = route.cfg.timeouts.request.map(|t| start + t);
    let mut out = Outcome { endpoint: None, upstream_stats: None, upstream: None, tries: 0 };
    let limited = match route.rt.rate.load().as_deref() {
        Some(rate) => rate.check(down.client.ip(), start_ms).err(),
        None => None,
    };
    let result = match limited {
        Some(wait) => {
            route.rt.stats.rate_limited.fetch_add(1, Relaxed);
            Err(ProxyError::RateLimited(wait))
        }
        None => match read_body(body, route.cfg.retry.body_cap).await {
            Ok(body) => {
                route.rt.budget.deposit(start_ms);
                prepare_upstream_request(&mut parts, &down);
                if let Some(protocol) = upgrade {
                    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(header::UPGRADE, protocol);
                }
                let attempts = attempts(route, &parts, body, down.client, start_ms, &mut out);
                match (deadline, route.cfg.timeouts.request) {
                    (Some(d), Some(t)) => {
                        tokio::time::timeout_at(d, attempts).await.unwrap_or(Err(ProxyError::RequestTimeout(t)))
                    }
                    _ => attempts.await,
                }
            }
            Err(e) => Err(e),
        },
    };

    let resp = match result {
        Ok(x) => {
            let status = x.resp.status();
            record(route, &out, class_index(status.as_u16()), start);
            respond(x, &rid, route, deadline, &shared, &down, grpc)
        }
        Err(e) => {
            tracing::debug!(route = %route.cfg.name, error = %e, "request failed");
            // A refusal of the client's is its class; the rest are errors
            // the proxy answered for.
            record(route, &out, if e.is_client_refusal() { class_index(e.status().as_u16()) } else { 5 }, start);
            if grpc {
                // What a gRPC client makes of a proxy error: UNAVAILABLE.
                route.rt.stats.grpc.count(Some(&HeaderValue::from_static("14")));
            }
            error_response(&e, Some(&rid))
        }
    };
    if snap.config.access_log {
        access_log(&down, &method, &router::host(&parts), &path, &resp, route, &out, &rid, start);
    }
    Ok(resp)
}

/// What RFC 9112 requires of a request before it may be forwarded, so that
/// it has one authority, the one it is routed by and the upstream
/// receives: at most one Host in every HTTP version, HTTP/1.1 needs one,
/// an absolute-form target's authority (or HTTP/2's `:authority`) must be
/// that Host when both are given, and CONNECT (a tunnel) is refused. (Framing errors, as a
/// body framed by both Transfer-Encoding and Content-Length, are refused
/// by the HTTP/1.1 codec before a request exists: `h1/head.rs`.)
fn strict(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::ConnectRefused);
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    match (host, parts.uri.authority()) {
        // HTTP/1.0 may omit Host; HTTP/2 carries :authority instead.
        (None, None) if parts.version == http::Version::HTTP_11 => {
            Err(ProxyError::BadRequest("an HTTP/1.1 request needs a Host header"))
        }
        (Some(host), Some(authority)) if !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes()) => {
            Err(ProxyError::BadRequest("the Host header differs from the request target's authority"))
        }
        _ => Ok(()),
    }
}

fn record(route: &Route, out: &Outcome, class: usize, start: Instant) {
    let took = start.elapsed();
    route.rt.stats.requests[class].fetch_add(1, Relaxed);
    route.rt.stats.latency.observe(took);
    if let Some(u) = &out.upstream_stats {
        u.requests[class].fetch_add(1, Relaxed);
        u.latency.observe(took);
    }
    if let Some(ep) = &out.endpoint {
        ep.stats.requests[class].fetch_add(1, Relaxed);
        ep.stats.latency.observe(took);
    }
}

/// Buffers small bodies so they can be replayed; streams the rest.
async fn read_body(body: DownBody, cap: usize) -> Result<ProxyBody, ProxyError> {
    use http_body::Body;
    if body.is_end_stream() {
        return Ok(ProxyBody::Empty);
    }
    match body.size_hint().upper() {
        Some(n) if n as usize <= cap => match tokio::time::timeout(BODY_READ_TIMEOUT, body.collect()).await {
            Ok(Ok(c)) => Ok(ProxyBody::Full(Some(c.to_bytes()))),
            Ok(Err(e)) => Err(ProxyError::RequestBody(e)),
            Err(_) => Err(ProxyError::RequestBodyTimeout(BODY_READ_TIMEOUT)),
        },
        _ => Ok(ProxyBody::Stream(body)),
    }
}

fn prepare_upstream_request(parts: &mut http::request::Parts, down: &Downstream) {
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts.uri.authority().and_then(|a| HeaderValue::try_from(a.as_str()).ok()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // `TE: trailers` is the one TE HTTP/2 allows, and gRPC needs it.
    let trailers = parts.version == http::Version::HTTP_2
        && parts.headers.get_all(header::TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers::strip_hop_by_hop(&mut parts.headers);
    if trailers {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let host = parts.headers.get(header::HOST).cloned();
    headers::add_forwarded(&mut parts.headers, &down.client_ip, host.as_ref());
    if let Some(pq) = parts.uri.path_and_query() {
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = Uri::from(pq.clone());
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

fn build(parts: &http::request::Parts, body: ProxyBody) -> Request<ProxyBody> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.headers_mut() = parts.headers.clone();
    r
}

async fn attempts(
    route: &Route,
    parts: &http::request::Parts,
    body: ProxyBody,
    client: SocketAddr,
    start_ms: u64,
    out: &mut Outcome,
) -> Result<Exchange, ProxyError> {
    let mut group = route.group(parts);
    if group.endpoints.is_empty() {
        if let Some(cold) = group.cfg.cold_start {
            group = cold_start(route, parts, group, cold).await?;
        }
    }
    out.upstream = group.endpoints.first().map(|e| e.upstream.clone());
    out.upstream_stats = Some(group.stats.clone());
    let admitted = crate::overload::admit(&group.stats.limiter, group.cfg.max_in_flight)
        .map_err(|full| ProxyError::Overloaded { upstream: group.cfg.name.clone(), limit: full.0 })?;
    let policy = &route.cfg.retry;
    let safe = idempotent(&parts.method) && !matches!(body, ProxyBody::Stream(_));
    let hedge = if hedgeable(&parts.method, &group) && safe && policy.attempts > 0 {
        delay(policy.hedge, &group, Delay::Hedge)
    } else {
        None
    };
    // A body that cannot be replayed is held here until first sent, and comes
    // back only if the connection provably did not take it.
    let mut pending = Some(body);
    // At most MAX_RETRIES + 1 tries (a hedge is one of them): no allocation
    // needed. Every try picks a new endpoint; tried[..n] are those taken.
    let mut tried = [usize::MAX; MAX_RETRIES as usize + 1];
    let mut n = 0;
    let mut last: Option<ProxyError> = None;
    let mut granted = false;
    let max = policy.attempts.min(MAX_RETRIES) as usize;
    while n <= max {
        let now = if n == 0 { start_ms } else { crate::util::now_ms() };
        let Some(pick) = group.pick(parts, client, &tried[..n], now) else { break };
        if n > 0 && !std::mem::take(&mut granted) && !retry_granted(route) {
            break;
        }
        tried[n] = pick.index;
        n += 1;
        let mut ep = group.endpoints[pick.index].clone();
        let Some(body) = pending.as_ref().and_then(ProxyBody::replay).or_else(|| pending.take()) else { break };
        // A try that may be abandoned: the request is safe to replay and a
        // retry is left (whether another endpoint can take it is asked only
        // if the timer fires: it walks the group).
        let result = match hedge.filter(|_| n == 1) {
            Some(after) => {
                let second = pending.as_ref().and_then(ProxyBody::replay).unwrap_or(ProxyBody::Empty);
                // Boxed: two tries' state, carried only by hedged requests
                // (inline it doubled every request's future, which HTTP/2
                // moves into a task per stream).
                let hedged =
                    Box::pin(hedged(route, &group, parts, client, (&ep, body), second, after, (&mut tried, &mut n)))
                        .await;
                // (No session cookie to set: a hedged group has none.)
                if let Some(winner) = hedged.0 {
                    ep = winner;
                }
                hedged.1
            }
            None => {
                let per_try = if safe && n <= max { delay(policy.try_timeout, &group, Delay::Try) } else { None };
                send(route, &ep, &group, parts, body, per_try, &tried[..n]).await
            }
        };
        out.endpoint = Some(ep.clone());
        out.tries = n as u32;
        let set_cookie = pick.set_cookie.then(|| (group.cfg.session_cookie.clone().unwrap_or_default(), ep.id.clone()));
        match result {
            Ok((resp, conn, inflight)) => {
                let status = resp.status().as_u16();
                let retry_status = policy.statuses.contains(&status);
                ep.passive_result(!(retry_status && status >= 500), status < 500, || group.may_eject());
                // Another try is only worth it when there is somewhere else to
                // go; otherwise the client gets this response as it is.
                let again = retry_status && safe && n <= max && has_other(&group, &tried[..n]);
                if !again || !retry_granted(route) {
                    return Ok(Exchange { resp, conn, inflight, admitted, set_cookie });
                }
                granted = true;
                tracing::debug!(endpoint = %ep.addr, tries = n, status, "retrying on a retried status");
            }
            Err((e, unsent)) => {
                // `send` abandoned the try only with a retry granted.
                granted = matches!(e, ProxyError::TryTimeout(_));
                failed_try(&ep, &group, &e);
                if unsent.is_some() {
                    pending = unsent;
                }
                let retry = pending.is_some() && e.retryable(safe);
                tracing::debug!(endpoint = %ep.addr, tries = n, error = %e, retry, "try failed");
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoEndpoint(group.cfg.name.clone())))
}

/// Counts a failed try against its endpoint's passive health.
/// Holds a request for an upstream with no endpoint until one comes (a
/// service at zero starting its first instance), at most `cold.timeout`
/// and `cold.queue` requests at once; the group to send it to.
async fn cold_start(
    route: &Route,
    parts: &http::request::Parts,
    group: Arc<Group>,
    cold: crate::config::ColdStart,
) -> Result<Arc<Group>, ProxyError> {
    let stats = group.stats.clone();
    let refuse = |why| ProxyError::ColdStart { upstream: group.cfg.name.clone(), why };
    if stats.waiting.fetch_add(1, Relaxed) >= u64::from(cold.queue) {
        stats.waiting.fetch_sub(1, Relaxed);
        return Err(refuse("its queue of held requests (cold_start_queue) is full"));
    }
    // Counted out however this ends (the request may be dropped).
    struct Held<'a>(&'a std::sync::atomic::AtomicU64);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }
    let _held = Held(&stats.waiting);
    stats.demand.notify_one();
    let deadline = tokio::time::Instant::now() + cold.timeout;
    loop {
        let changed = stats.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = route.group(parts);
        if !now.endpoints.is_empty() {
            return Ok(now);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(refuse("none started within its cold_start_timeout"));
        }
    }
}

fn failed_try(ep: &Endpoint, group: &Group, e: &ProxyError) {
    if e.is_endpoint_failure() && !matches!(e, ProxyError::Connect(ConnectError::PoolFull(_))) {
        ep.passive_result(false, false, || group.may_eject());
        group.judge_failure_rates(crate::util::now_ms());
        if matches!(e, ProxyError::Connect(_)) {
            ep.stats.connect_failures.fetch_add(1, Relaxed);
        }
    }
}

/// Whether a request may be hedged: a safe method (two concurrent
/// PUTs or DELETEs could race each other at the application), and no
/// session cookie (the endpoint then matters).
fn hedgeable(m: &Method, group: &Group) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS) && group.cfg.session_cookie.is_none()
}

/// The first try of a hedged request: past `after` without a response
/// head, a second try goes to another endpoint when the retry budget
/// grants it, both run, and the first head to arrive wins; the other try
/// is dropped (its connection closed). A try that fails leaves the other
/// to answer. Returns the endpoint that answered when it was the second.
#[allow(clippy::too_many_arguments)]
async fn hedged(
    route: &Route,
    group: &Group,
    parts: &http::request::Parts,
    client: SocketAddr,
    (first, body): (&Arc<Endpoint>, ProxyBody),
    second_body: ProxyBody,
    after: Duration,
    (tried, n): (&mut [usize], &mut usize),
) -> (Option<Arc<Endpoint>>, SendResult) {
    let a = send(route, first, group, parts, body, None, &[]);
    tokio::pin!(a);
    tokio::select! {
        r = &mut a => return (None, r),
        _ = tokio::time::sleep(after) => {}
    }
    let now = crate::util::now_ms();
    let Some(pick) = group.pick(parts, client, &tried[..*n], now) else { return (None, a.await) };
    if !retry_granted(route) {
        return (None, a.await);
    }
    route.rt.stats.hedges.fetch_add(1, Relaxed);
    tried[*n] = pick.index;
    *n += 1;
    let ep = &group.endpoints[pick.index];
    let b = send(route, ep, group, parts, second_body, None, &[]);
    tokio::pin!(b);
    tokio::select! {
        r = &mut a => match r {
            Ok(x) => (None, Ok(x)),
            Err((e, _)) => {
                failed_try(first, group, &e);
                (Some(ep.clone()), b.await)
            }
        },
        r = &mut b => match r {
            Ok(x) => {
                route.rt.stats.hedges_won.fetch_add(1, Relaxed);
                (Some(ep.clone()), Ok(x))
            }
            Err((e, _)) => {
                failed_try(ep, group, &e);
                (None, a.await)
            }
        },
    }
}

/// Which delay [`delay`] derives.
#[derive(Clone, Copy)]
enum Delay {
    /// A per-try timeout: `AUTO_FACTOR` x the recent p99 time to the
    /// response head, at least `AUTO_FLOOR`.
    Try,
    /// A hedge: `HEDGE_FACTOR` x the recent p95, at least `HEDGE_FLOOR`;
    /// none until there are samples.
    Hedge,
}

/// The delay `t` gives for `group` now.
fn delay(t: halo_model::values::Adaptive, group: &Group, kind: Delay) -> Option<Duration> {
    use halo_model::values::Adaptive;
    match (t, kind) {
        (Adaptive::Off, _) => None,
        (Adaptive::Fixed(d), _) => Some(d),
        (Adaptive::Auto, Delay::Try) => Some(
            group
                .stats
                .first_byte
                .p99(crate::util::now_ms())
                .map_or(AUTO_UNKNOWN, |p| (p * AUTO_FACTOR).max(AUTO_FLOOR)),
        ),
        (Adaptive::Auto, Delay::Hedge) => {
            group.stats.first_byte.p95(crate::util::now_ms()).map(|p| (p * HEDGE_FACTOR).max(HEDGE_FLOOR))
        }
    }
}

fn retry_granted(route: &Route) -> bool {
    let p = &route.cfg.retry;
    if route.rt.budget.withdraw(p.budget_ratio, p.budget_min_per_sec) {
        route.rt.stats.retries.fetch_add(1, Relaxed);
        true
    } else {
        route.rt.stats.retries_denied.fetch_add(1, Relaxed);
        false
    }
}

fn has_other(group: &Group, tried: &[usize]) -> bool {
    let now = crate::util::now_ms();
    group.endpoints.iter().enumerate().any(|(i, e)| !tried.contains(&i) && e.available(now))
}

type SendResult = Result<(Response<Source>, Pooled, InflightGuard), (ProxyError, Option<ProxyBody>)>;

/// One attempt on one endpoint, with stale pooled connections skipped.
/// Past `per_try` without a response head the try is abandoned, when an
/// endpoint not `tried` can take it and the retry budget grants it; else
/// it waits on to the first-byte timeout.
async fn send(
    route: &Route,
    ep: &Arc<Endpoint>,
    group: &Group,
    parts: &http::request::Parts,
    mut body: ProxyBody,
    per_try: Option<Duration>,
    tried: &[usize],
) -> SendResult {
    let t = &route.cfg.timeouts;
    let asks_upgrade = parts.extensions.get::<UpgradeRequested>().is_some();
    for _ in 0..STALE_TRIES {
        let mut conn = match ep.pool.get(t.connect).await {
            Ok(c) => c,
            Err(e) => return Err((e.into(), Some(body))),
        };
        let inflight = InflightGuard::new(ep.clone());
        let sent_at = Instant::now();
        // A reused connection the upstream closed as the request went out
        // (its keep-alive timeout, a reload: nginx closes idle connections)
        // says nothing of the endpoint's health: a replayable request goes
        // again on another connection, and no failure is counted.
        let mut spare = if conn.reused { body.replay() } else { None };
        let mut stale = false;
        let fut = async {
            match &mut conn.sender {
                Sender::H1(c) => match c.send(parts, body).await {
                    Ok(head) if head.status == http::StatusCode::SWITCHING_PROTOCOLS && !asks_upgrade => Err((
                        ProxyError::Upstream("it switched protocols (101) on a request that did not ask".into()),
                        None,
                    )),
                    Ok(head) => {
                        // The response leaves in the client's protocol (an
                        // HTTP/1.0 upstream's answer goes out as HTTP/1.1).
                        let mut r = Response::new(Source::H1 { decoder: head.decoder, keep_alive: head.keep_alive });
                        *r.status_mut() = head.status;
                        *r.headers_mut() = head.headers;
                        Ok(r)
                    }
                    Err((ClientError::NotSent(e), back)) => Err((ProxyError::NotSent(e.into()), back)),
                    Err((e, _)) => {
                        stale = match &e {
                            ClientError::Closed => true,
                            ClientError::Io(io) => io.kind() == std::io::ErrorKind::ConnectionReset,
                            _ => false,
                        };
                        Err((ProxyError::Upstream(e.into()), None))
                    }
                },
                Sender::H2(_) if asks_upgrade => Err((ProxyError::UpgradeNeedsHttp1(ep.upstream.to_string()), None)),
                Sender::H2(s) => {
                    let mut req = build(parts, body);
                    set_h2_uri(&mut req, ep.addr);
                    match s.try_send_request(req).await {
                        Ok(r) => Ok(r.map(Source::H2)),
                        Err(mut e) => match e.take_message() {
                            Some(req) => Err((ProxyError::NotSent(e.into_error().into()), Some(req.into_body()))),
                            None => Err((ProxyError::Upstream(e.into_error().into()), None)),
                        },
                    }
                }
            }
        };
        let res = {
            let first_byte = t.first_byte.map(|fb| sent_at + fb);
            tokio::pin!(fut);
            let mut early = None;
            if let Some(p) = per_try.filter(|p| t.first_byte.is_none_or(|fb| *p < fb)) {
                match tokio::time::timeout(p, &mut fut).await {
                    Ok(r) => early = Some(r),
                    Err(_) if has_other(group, tried) && retry_granted(route) => {
                        route.rt.stats.try_timeouts.fetch_add(1, Relaxed);
                        return Err((ProxyError::TryTimeout(p), None));
                    }
                    Err(_) => {}
                }
            }
            match (early, first_byte) {
                (Some(r), _) => r,
                (None, Some(at)) => match tokio::time::timeout_at(at, &mut fut).await {
                    Ok(r) => r,
                    Err(_) => return Err((ProxyError::FirstByteTimeout(at - sent_at), None)),
                },
                (None, None) => fut.await,
            }
        };
        match res {
            Ok(resp) => {
                let done = Instant::now();
                let now = crate::util::ms_at(done.into_std());
                ep.observe_rtt(done - sent_at, now);
                group.stats.first_byte.observe(done - sent_at, now);
                // Judged with the clock read for the try just answered: no
                // clock read of its own on the hot path.
                group.judge_failure_rates(now);
                return Ok((resp, conn, inflight));
            }
            // A pooled connection died before taking the request: try a
            // fresh one on the same endpoint.
            Err((ProxyError::NotSent(_), Some(b))) if conn.reused => {
                body = b;
                continue;
            }
            Err(_) if stale && spare.is_some() => {
                tracing::debug!(endpoint = %ep.addr, "a reused connection closed before answering; sending again");
                body = spare.take().unwrap_or(ProxyBody::Empty);
                continue;
            }
            Err((e, b)) => return Err((e, b)),
        }
    }
    Err((ProxyError::NoEndpoint(ep.upstream.to_string()), Some(body)))
}

fn set_h2_uri(req: &mut Request<ProxyBody>, addr: SocketAddr) {
    let authority =
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map_or_else(|| addr.to_string(), str::to_string);
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    if let Ok(u) = Uri::builder().scheme("http").authority(authority).path_and_query(pq).build() {
        *req.uri_mut() = u;
    }
    req.headers_mut().remove(header::HOST);
}

fn respond(
    x: Exchange,
    rid: &HeaderValue,
    route: &Route,
    deadline: Option<Instant>,
    shared: &Arc<Shared>,
    down: &Downstream,
    grpc: bool,
) -> Response<RespBody> {
    let (mut parts, source) = x.resp.into_parts();
    let switched = parts.status == http::StatusCode::SWITCHING_PROTOCOLS;
    let protocol = if switched { parts.headers.get(header::UPGRADE).cloned() } else { None };
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(headers::X_REQUEST_ID.clone(), rid.clone());
    if let Some((name, id)) = x.set_cookie {
        if let Ok(v) = HeaderValue::try_from(format!("{name}={id}; Path=/; HttpOnly")) {
            parts.headers.append(header::SET_COOKIE, v);
        }
    }
    if switched {
        // The connection is the client's now: a tunnel, not a pool member.
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = protocol {
            parts.headers.insert(header::UPGRADE, p);
        }
        if let Some(conn) = x.conn.into_h1() {
            let (upstream, early) = conn.into_io();
            let crate::tls::client::UpIo::Plain(upstream) = upstream else {
                let e = ProxyError::Upstream("a protocol switch over TLS to an upstream is not supported yet".into());
                return error_response(&e, Some(rid));
            };
            let u = Upgraded {
                upstream,
                early,
                busy: x.inflight,
                idle: route.cfg.timeouts.tunnel,
                grace: shared.snapshot.load().config.grace_period,
                stats: down.stats.clone(),
            };
            return Response::from_parts(parts, RespBody::upgrade(u));
        }
        return error_response(&ProxyError::Upstream("it switched protocols over h2".into()), Some(rid));
    }
    // A gRPC status comes in the trailers, or in the head of a
    // trailers-only answer.
    let grpc = match grpc.then(|| parts.headers.get("grpc-status")) {
        None => None,
        Some(Some(status)) => {
            route.rt.stats.grpc.count(Some(status));
            None
        }
        Some(None) => Some(route.rt.clone()),
    };
    let body = RespBody::upstream(source, x.conn, (x.inflight, x.admitted), route.cfg.timeouts.idle, deadline, grpc);
    Response::from_parts(parts, body)
}

pub fn error_response(e: &ProxyError, rid: Option<&HeaderValue>) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(Bytes::from(format!(
        "{} {}: {e}\n",
        e.status().as_u16(),
        e.status().canonical_reason().unwrap_or("")
    ))));
    *r.status_mut() = e.status();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(rid) = rid {
        h.insert(headers::X_REQUEST_ID.clone(), rid.clone());
    }
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    down: &Downstream,
    method: &Method,
    host: &str,
    path: &str,
    resp: &Response<RespBody>,
    route: &Route,
    out: &Outcome,
    rid: &HeaderValue,
    start: Instant,
) {
    let line = serde_json::json!({
        "ts": halo_model::clock::unix_secs_f64(),
        "client": down.client.to_string(),
        "listener": &*down.listener,
        "method": method.as_str(),
        "host": host,
        "path": path,
        "status": resp.status().as_u16(),
        "route": route.cfg.name,
        "upstream": out.upstream.as_deref(),
        "endpoint": out.endpoint.as_ref().map(|e| e.addr.to_string()),
        "tries": out.tries,
        "duration_ms": start.elapsed().as_secs_f64() * 1000.0,
        "request_id": rid.to_str().unwrap_or(""),
    });
    println!("{line}");
}
