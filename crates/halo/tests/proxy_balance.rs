//! Balancing policies, session persistence, consistent hashing, routing and
//! traffic split, through the real binary and real sockets.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use halo_testkit::{Backend, Client, Halo};
use http::Request;
use http_body_util::Full;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn endpoints(bs: &[&Backend]) -> String {
    let v: Vec<String> = bs.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    v.join(", ")
}

fn config(upstream_body: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"web\"\n[upstreams.web]\n{upstream_body}\n"
    )
}

async fn tally(c: &Client, url: &str, n: usize, headers: &[(&str, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        let r = c.send(b.body(Full::<Bytes>::default()).unwrap()).await.expect("request");
        assert_eq!(r.status, 200, "{}", r.body);
        *m.entry(r.backend().unwrap_or("?").to_string()).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let (a, b, c) = (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let up = format!(
        "policy = \"round_robin\"\nendpoints = [\"{}\", \"{}\", {{ addr = \"{}\", weight = 2 }}]",
        a.addr, b.addr, c.addr
    );
    let h = Halo::proxy(BIN, &config(&up)).unwrap();
    let m = tally(&Client::new(), &h.url("main", "/"), 400, &[]).await;
    assert_eq!((m["a"], m["b"], m["c"]), (100, 100, 200), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_over_all() {
    let bs = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let up = format!("policy = \"random\"\nendpoints = [{}]", endpoints(&[&bs[0], &bs[1], &bs[2]]));
    let h = Halo::proxy(BIN, &config(&up)).unwrap();
    let m = tally(&Client::new(), &h.url("main", "/"), 600, &[]).await;
    for name in ["a", "b", "c"] {
        let n = m.get(name).copied().unwrap_or(0);
        assert!((120..=280).contains(&n), "{name}: {n} of 600 ({m:?})");
    }
}

/// `conc` workers each send `n / conc` requests back to back; returns
/// per-backend counts.
async fn concurrent(url: &str, n: usize, conc: usize) -> HashMap<String, usize> {
    let c = Client::new();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_string());
            async move {
                let mut seen = Vec::new();
                for _ in 0..n / conc {
                    let r = c.get(&url).await.expect("request");
                    assert_eq!(r.status, 200);
                    seen.push(r.backend().unwrap_or("?").to_string());
                }
                seen
            }
        })
        .collect();
    let mut m = HashMap::new();
    for seen in futures_join(workers).await {
        for b in seen {
            *m.entry(b).or_default() += 1;
        }
    }
    m
}

async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let hs: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in hs {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_and_p2c_ewma_avoid_a_slow_endpoint() {
    for policy in ["least_request", "p2c_ewma"] {
        let (slow, f1, f2) = (Backend::start("slow").await, Backend::start("f1").await, Backend::start("f2").await);
        slow.set_delay(Duration::from_millis(150));
        let up = format!("policy = \"{policy}\"\nendpoints = [{}]", endpoints(&[&slow, &f1, &f2]));
        let h = Halo::proxy(BIN, &config(&up)).unwrap();
        let m = concurrent(&h.url("main", "/"), 240, 8).await;
        let share = m.get("slow").copied().unwrap_or(0) as f64 / 240.0;
        // Round robin would send a third; a load-aware policy far less.
        assert!(share < 0.2, "{policy}: slow endpoint got {share:.2} of requests ({m:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_sticks_and_remaps_minimally() {
    let bs: Vec<Backend> = futures_join((0..5).map(|i| Backend::start_owned(format!("b{i}"))).collect()).await;
    let refs: Vec<&Backend> = bs.iter().collect();
    let up = |eps: &[&Backend]| {
        format!("policy = \"consistent_hash\"\nhash_key = \"header:x-user\"\nendpoints = [{}]", endpoints(eps))
    };
    let h = Halo::proxy(BIN, &config(&up(&refs))).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    let users = 200;
    let mut before = Vec::new();
    for u in 0..users {
        let who = tally(&c, &url, 3, &[("x-user", format!("user-{u}"))]).await;
        assert_eq!(who.len(), 1, "user-{u} was not sticky: {who:?}");
        before.push(who.into_keys().next().unwrap());
    }
    let spread: std::collections::HashSet<_> = before.iter().collect();
    assert_eq!(spread.len(), 5, "keys should use every endpoint");
    // Remove b4 by reload: only its users may move.
    h.write_config(&config(&up(&refs[..4])));
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut moved = 0;
    for (u, was) in before.iter().enumerate() {
        let now = tally(&c, &url, 1, &[("x-user", format!("user-{u}"))]).await.into_keys().next().unwrap();
        assert_ne!(now, "b4");
        if was != "b4" && *was != now {
            moved += 1;
        }
    }
    assert!(moved <= users / 20, "{moved} users of surviving endpoints moved");

    // Keyed by path: one path, one endpoint.
    let by_path = up(&refs).replace("header:x-user", "path");
    h.write_config(&config(&by_path));
    let r = c.send(Request::post(h.admin_url("/reload")).body(Full::default()).unwrap()).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut spread = std::collections::HashSet::new();
    for p in 0..40 {
        let who = tally(&c, &h.url("main", &format!("/item/{p}")), 3, &[]).await;
        assert_eq!(who.len(), 1, "path /item/{p} was not sticky: {who:?}");
        spread.extend(who.into_keys());
    }
    assert!(spread.len() >= 4, "paths should spread over endpoints: {spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_pins_and_repins_when_endpoint_goes_down() {
    let bs = [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let up = format!(
        "endpoints = [{}]\nsession_cookie = \"halo-session\"\n[upstreams.web.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"50ms\"\nrise = 1\nfall = 1\njitter = \"0\"",
        endpoints(&[&bs[0], &bs[1], &bs[2]])
    );
    let h = Halo::proxy(BIN, &config(&up)).unwrap();
    let c = Client::new();
    let url = h.url("main", "/");
    let first = c.get(&url).await.unwrap();
    let set = first.headers.get("set-cookie").expect("a session cookie").to_str().unwrap().to_string();
    let cookie = set.split(';').next().unwrap().to_string();
    let pinned = first.backend().unwrap().to_string();
    let m = tally(&c, &url, 30, &[("cookie", cookie.clone())]).await;
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[&pinned], 30);
    // Its endpoint fails health checks: the client is re-pinned elsewhere.
    let idx = ["a", "b", "c"].iter().position(|n| *n == pinned).unwrap();
    bs[idx].set_healthy(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let repinned = loop {
        let r = c.send(Request::get(&url).header("cookie", &cookie).body(Full::default()).unwrap()).await.unwrap();
        if r.backend() != Some(pinned.as_str()) {
            break Some(r);
        }
        assert!(tokio::time::Instant::now() < deadline, "never re-pinned after its endpoint went down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = repinned.unwrap();
    let new_cookie = r.headers.get("set-cookie").expect("a new cookie on re-pin").to_str().unwrap();
    assert_ne!(new_cookie.split(';').next().unwrap(), cookie);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_split_and_overrides() {
    let (web, canary, api) = (Backend::start("web").await, Backend::start("canary").await, Backend::start("api").await);
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[[listeners]]
name = "main"
listen = "127.0.0.1:0"

[[listeners]]
name = "internal"
listen = "127.0.0.1:0"

[[routes]]
name = "internal-only"
listeners = ["internal"]
upstream = "api"

[[routes]]
name = "api"
host = "*.example.com"
path_prefix = "/api"
methods = ["GET"]
upstream = "api"

[[routes]]
name = "exact-admin-header"
path_exact = "/only"
headers = {{ "x-team" = "blue" }}
upstream = "api"

[[routes]]
name = "gray"
path_prefix = "/app"
split = [{{ upstream = "web", weight = 75 }}, {{ upstream = "canary", weight = 25 }}]
overrides = [
  {{ header = "x-canary", value = "1", upstream = "canary" }},
  {{ cookie = "halo-track", value = "beta", upstream = "canary" }},
]

[upstreams.web]
endpoints = ["{}"]
[upstreams.canary]
endpoints = ["{}"]
[upstreams.api]
endpoints = ["{}"]
"#,
        web.addr, canary.addr, api.addr
    );
    let h = Halo::proxy(BIN, &text).unwrap();
    let c = Client::new();
    // A second listener with a route of its own, tried before the others.
    assert_eq!(c.get(&h.url("internal", "/anything")).await.unwrap().backend(), Some("api"));
    assert_eq!(c.get(&h.url("main", "/anything")).await.unwrap().status, 404);
    let send = |path: &str, hs: &[(&str, &str)]| {
        let mut b = Request::get(h.url("main", path));
        for (k, v) in hs {
            b = b.header(*k, *v);
        }
        c.send(b.body(Full::default()).unwrap())
    };
    assert_eq!(send("/api/users", &[("host", "shop.example.com")]).await.unwrap().backend(), Some("api"));
    // The host wildcard needs a subdomain; without a match there is no route.
    let r = send("/api/users", &[("host", "example.com")]).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no route"), "{}", r.body);
    assert_eq!(send("/apix", &[("host", "a.example.com")]).await.unwrap().status, 404);
    let post =
        c.send(Request::post(h.url("main", "/api/x")).header("host", "a.example.com").body(Full::default()).unwrap());
    assert_eq!(post.await.unwrap().status, 404, "POST is not in the api route's methods");
    assert_eq!(send("/only", &[("x-team", "blue")]).await.unwrap().backend(), Some("api"));
    assert_eq!(send("/only/not", &[("x-team", "blue")]).await.unwrap().status, 404);
    assert_eq!(send("/only", &[("x-team", "red")]).await.unwrap().status, 404);
    for _ in 0..20 {
        assert_eq!(send("/app", &[("x-canary", "1")]).await.unwrap().backend(), Some("canary"));
        assert_eq!(send("/app", &[("cookie", "a=b; halo-track=beta")]).await.unwrap().backend(), Some("canary"));
    }
    let mut canary_hits = 0;
    for _ in 0..400 {
        if send("/app/page", &[]).await.unwrap().backend() == Some("canary") {
            canary_hits += 1;
        }
    }
    assert!((60..=140).contains(&canary_hits), "canary got {canary_hits} of 400 at weight 25%");
}
