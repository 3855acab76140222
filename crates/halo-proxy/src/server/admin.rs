//! The proxy's admin listener: `GET /metrics` (Prometheus text), `GET /healthz`,
//! `GET /status` (endpoints and their health as JSON) and `POST /reload`
//! (re-read the config file; a bad file is refused and the old config kept).

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{escape, ListenerStats, Writer};
use crate::server::Proxy;
use crate::util::now_ms;
use halo_model::lock::LockExt;

/// Serves the admin API (limits and deadlines: `http_api`) until `stop`;
/// HTTPS when the current config says so (a reload may change it).
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, stop: watch::Receiver<bool>) {
    let tls = {
        let proxy = proxy.clone();
        move || proxy.config().admin_tls.clone()
    };
    crate::http_api::serve(listener, tls, stop, move |_| {
        let proxy = proxy.clone();
        move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(handle(&proxy, req)) }
        }
    })
    .await
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    r
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

fn handle(proxy: &Proxy, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let tls = proxy.config().admin_tls.is_some();
    if let Err(why) = crate::http_api::browser_guard(&req, tls) {
        return reply(StatusCode::FORBIDDEN, "text/plain", format!("{why}\n"));
    }
    if req.uri().path() != "/healthz" {
        if let Some(want) = &proxy.config().admin_token {
            match bearer(req.headers()) {
                Some(given) if want.matches(given) => {}
                Some(_) => return reply(StatusCode::UNAUTHORIZED, "text/plain", "wrong token\n"),
                None => {
                    let say =
                        "missing 'Authorization: Bearer TOKEN'; the token is in the file admin.token_file names\n";
                    return reply(StatusCode::UNAUTHORIZED, "text/plain", say);
                }
            }
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", render_metrics(proxy)),
        (&Method::GET, "/status") => reply(StatusCode::OK, "application/json", status_json(proxy).to_string()),
        (&Method::POST, "/reload") => match proxy.reload_from_source() {
            Ok(()) => reply(StatusCode::OK, "application/json", r#"{"reloaded":true}"#),
            Err(e) => {
                tracing::warn!(error = %e, "reload refused");
                let body = serde_json::json!({ "reloaded": false, "error": e.to_string() });
                reply(StatusCode::BAD_REQUEST, "application/json", body.to_string())
            }
        },
        (_, "/healthz" | "/metrics" | "/status" | "/reload") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET for /healthz, /metrics, /status and POST for /reload\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found; try /metrics, /status, /healthz or POST /reload\n"),
    }
}

fn status_json(proxy: &Proxy) -> serde_json::Value {
    let now = now_ms();
    let eps: Vec<_> = proxy
        .shared()
        .registry
        .endpoints()
        .iter()
        .map(|e| {
            serde_json::json!({
                "upstream": &*e.upstream,
                "addr": e.addr.to_string(),
                "weight": e.weight.load(Relaxed),
                "effective_weight": e.effective_weight(now, e.settings.load().slow_start) as f64 / 100.0,
                "active_up": e.active_up(),
                "ejected": e.ejected(now),
                "available": e.available(now),
                "inflight": e.inflight.load(Relaxed),
                "open_connections": e.pool.open_connections(),
                "idle_connections": e.pool.idle_connections(),
            })
        })
        .collect();
    serde_json::json!({ "endpoints": eps })
}

/// A family rendered from one counter per item: name, type, help, value.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// Renders every metric family in the Prometheus text format.
pub fn render_metrics(proxy: &Proxy) -> String {
    let reg = &proxy.shared().registry;
    let mut w = Writer { out: String::with_capacity(16 * 1024) };
    let routes = reg.route_stats();
    w.header(
        "halo_route_requests_total",
        "counter",
        "Requests by route and status class (error: the proxy answered for a failed upstream).",
    );
    for (name, rt) in &routes {
        w.classes("halo_route_requests_total", &format!("route=\"{}\"", escape(name)), &rt.stats.requests);
    }
    let per_route: [Family<crate::metrics::RouteStats>; 6] = [
        ("halo_route_retries_total", "counter", "Retries made, by route.", |s| s.retries.load(Relaxed)),
        ("halo_route_retries_denied_total", "counter", "Retries refused by the retry budget, by route.", |s| {
            s.retries_denied.load(Relaxed)
        }),
        (
            "halo_route_try_timeouts_total",
            "counter",
            "Tries abandoned at their per-try timeout and retried on another endpoint, by route.",
            |s| s.try_timeouts.load(Relaxed),
        ),
        (
            "halo_route_hedges_total",
            "counter",
            "Second tries sent to another endpoint while the first still waited for its answer (hedges), by route.",
            |s| s.hedges.load(Relaxed),
        ),
        ("halo_route_hedges_won_total", "counter", "Hedges that answered before the first try, by route.", |s| {
            s.hedges_won.load(Relaxed)
        }),
        (
            "halo_route_rate_limited_total",
            "counter",
            "Requests answered 429 because their client was over the route's rate limit, by route.",
            |s| s.rate_limited.load(Relaxed),
        ),
    ];
    for (family, kind, help, value) in per_route {
        w.header(family, kind, help);
        for (name, rt) in &routes {
            w.sample(family, &format!("route=\"{}\"", escape(name)), value(&rt.stats));
        }
    }
    w.header(
        "halo_route_grpc_responses_total",
        "counter",
        "gRPC calls by route and the grpc-status they ended with (a proxy error counts as 14, UNAVAILABLE).",
    );
    for (name, rt) in routes.iter().filter(|(_, rt)| rt.stats.grpc.any()) {
        for (code, n) in rt.stats.grpc.0.iter().enumerate() {
            let labels = format!("route=\"{}\",grpc_status=\"{code}\"", escape(name));
            w.sample("halo_route_grpc_responses_total", &labels, n.load(Relaxed));
        }
    }
    w.header("halo_route_request_duration_seconds", "histogram", "Time to the response head, by route.");
    for (name, rt) in &routes {
        w.histogram("halo_route_request_duration_seconds", &format!("route=\"{}\"", escape(name)), &rt.stats.latency);
    }
    let ups = reg.upstream_stats();
    w.header("halo_upstream_requests_total", "counter", "Requests by upstream and status class.");
    for (name, u) in &ups {
        w.classes("halo_upstream_requests_total", &format!("upstream=\"{}\"", escape(name)), &u.requests);
    }
    w.header("halo_upstream_request_duration_seconds", "histogram", "Time to the response head, by upstream.");
    for (name, u) in &ups {
        w.histogram("halo_upstream_request_duration_seconds", &format!("upstream=\"{}\"", escape(name)), &u.latency);
    }
    w.header(
        "halo_upstream_in_flight",
        "gauge",
        "Requests in flight, by upstream (counted for upstreams with max_in_flight).",
    );
    for (name, u) in &ups {
        w.sample(
            "halo_upstream_in_flight",
            &format!("upstream=\"{}\"", escape(name)),
            u.limiter.in_flight.load(Relaxed),
        );
    }
    w.header(
        "halo_upstream_shed_total",
        "counter",
        "Requests answered 503 at once because max_in_flight requests were in flight, by upstream.",
    );
    for (name, u) in &ups {
        w.sample("halo_upstream_shed_total", &format!("upstream=\"{}\"", escape(name)), u.limiter.shed.load(Relaxed));
    }
    w.header(
        "halo_upstream_concurrency_limit",
        "gauge",
        "The adaptive limit of requests in flight (max_in_flight = \"auto\"), by upstream, once measured.",
    );
    for (name, u) in ups.iter().filter(|(_, u)| u.limiter.adaptive.min_rtt().is_some()) {
        w.sample(
            "halo_upstream_concurrency_limit",
            &format!("upstream=\"{}\"", escape(name)),
            u.limiter.adaptive.limit(),
        );
    }
    let all = reg.endpoints();
    let label = |e: &crate::endpoint::Endpoint| format!("upstream=\"{}\",endpoint=\"{}\"", escape(&e.upstream), e.addr);
    // Every endpoint's `halo_endpoint_up`; its other series only once
    // something happened there: thousands of idle endpoints (a large
    // cluster's) cost one series each, not thirty of zeros.
    let eps: Vec<_> = all
        .iter()
        .filter(|e| e.stats.any() || e.inflight.load(Relaxed) > 0 || e.pool.open_connections() > 0)
        .cloned()
        .collect();
    w.header("halo_endpoint_requests_total", "counter", "Requests by upstream, endpoint and status class.");
    for e in &eps {
        w.classes("halo_endpoint_requests_total", &label(e), &e.stats.requests);
    }
    w.header("halo_endpoint_request_duration_seconds", "histogram", "Time to the response head, by endpoint.");
    for e in &eps {
        w.histogram("halo_endpoint_request_duration_seconds", &label(e), &e.stats.latency);
    }
    let now = now_ms();
    w.header("halo_endpoint_up", "gauge", "1 when the endpoint takes traffic (up by active checks and not ejected).");
    for e in &all {
        w.sample("halo_endpoint_up", &label(e), u8::from(e.available(now)));
    }
    let per_endpoint: [Family<crate::endpoint::Endpoint>; 6] = [
        ("halo_endpoint_ejections_total", "counter", "Passive-health ejections, by endpoint.", |e| {
            e.stats.ejections.load(Relaxed)
        }),
        ("halo_endpoint_health_check_failures_total", "counter", "Failed active health checks, by endpoint.", |e| {
            e.stats.health_checks_failed.load(Relaxed)
        }),
        ("halo_endpoint_connect_failures_total", "counter", "Failed or timed-out connects, by endpoint.", |e| {
            e.stats.connect_failures.load(Relaxed)
        }),
        ("halo_endpoint_tcp_connections_total", "counter", "Connections TCP listeners opened, by endpoint.", |e| {
            e.stats.tcp_connections.load(Relaxed)
        }),
        ("halo_endpoint_inflight", "gauge", "Requests and tunnels in flight, by endpoint.", |e| {
            e.inflight.load(Relaxed) as u64
        }),
        ("halo_endpoint_connections", "gauge", "Open upstream connections, by endpoint.", |e| {
            e.pool.open_connections() as u64
        }),
    ];
    for (family, kind, help, value) in per_endpoint {
        w.header(family, kind, help);
        for e in &eps {
            w.sample(family, &label(e), value(e));
        }
    }
    let mut ls: Vec<_> = reg.listeners.locked().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    ls.sort_by(|a, b| a.0.cmp(&b.0));
    let families: [Family<ListenerStats>; 8] = [
        ("halo_listener_connections_active", "gauge", "Open downstream connections, by listener.", |s| {
            s.conns.active.load(Relaxed)
        }),
        ("halo_listener_connections_total", "counter", "Accepted downstream connections, by listener.", |s| {
            s.accepted.load(Relaxed)
        }),
        (
            "halo_listener_limit_pauses_total",
            "counter",
            "Times the listener stopped accepting at its max_connections (new connections waited in the kernel's \
             accept queue), by listener.",
            |s| s.conns.paused.load(Relaxed),
        ),
        (
            "halo_listener_proxy_protocol_refused_total",
            "counter",
            "Connections closed over their PROXY protocol header (missing, malformed or untrusted), by listener.",
            |s| s.proxy_protocol_refused.load(Relaxed),
        ),
        (
            "halo_listener_tunnels_active",
            "gauge",
            "Open tunnels (TCP connections, upgraded HTTP connections), by listener.",
            |s| s.tunnels.load(Relaxed),
        ),
        (
            "halo_listener_tunnel_received_bytes_total",
            "counter",
            "Tunnel bytes received from clients, by listener.",
            |s| s.bytes_in.load(Relaxed),
        ),
        ("halo_listener_tunnel_sent_bytes_total", "counter", "Tunnel bytes sent to clients, by listener.", |s| {
            s.bytes_out.load(Relaxed)
        }),
        (
            "halo_listener_unserved_total",
            "counter",
            "TCP connections closed because no endpoint took them, by listener.",
            |s| s.unserved.load(Relaxed),
        ),
    ];
    let tls: [Family<ListenerStats>; 4] = [
        ("halo_tls_handshakes_total", "counter", "Completed TLS handshakes, by listener.", |s| {
            s.tls_handshakes.load(Relaxed)
        }),
        ("halo_tls_handshake_failures_total", "counter", "Failed or timed-out TLS handshakes, by listener.", |s| {
            s.tls_handshake_failures.load(Relaxed)
        }),
        (
            "halo_tls_certificate_reloads_total",
            "counter",
            "Certificate files re-read after a change, by listener.",
            |s| s.tls_reloads.load(Relaxed),
        ),
        (
            "halo_tls_certificate_reload_failures_total",
            "counter",
            "Changed certificate files refused (the previous ones kept serving), by listener.",
            |s| s.tls_reload_failures.load(Relaxed),
        ),
    ];
    for (family, kind, help, value) in families.into_iter().chain(tls) {
        w.header(family, kind, help);
        for (name, s) in &ls {
            w.sample(family, &format!("listener=\"{}\"", escape(name)), value(s));
        }
    }
    w.header(
        "halo_tls_certificate_expiry_days",
        "gauge",
        "Days until the certificate expires (negative: expired), by listener and certificate file.",
    );
    let now = crate::tls::unix_now();
    for l in &proxy.config().listeners {
        let crate::config::ListenerProtocol::Https(t) = &l.protocol else { continue };
        for c in &t.certificates().info {
            if let Some(at) = c.not_after {
                let labels = format!("listener=\"{}\",certificate=\"{}\"", escape(&l.name), escape(&c.path));
                w.sample("halo_tls_certificate_expiry_days", &labels, format!("{:.2}", (at - now) as f64 / 86_400.0));
            }
        }
    }
    w.out
}
