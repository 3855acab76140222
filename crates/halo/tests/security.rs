//! The boundaries of docs/security.md, through the real binary: an
//! application cannot read halo's secrets and runs unprivileged; the
//! read-only token never sees an environment value.

use std::time::Duration;

use halo_testkit::{eventually, Client, Halo};
use http::Request;
use http_body_util::Full;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn instances(h: &Halo, service: &str) -> Vec<serde_json::Value> {
    let s = h.status();
    let svc = s["services"].as_array().unwrap().iter().find(|s| s["name"] == service).cloned();
    svc.map(|s| s["instances"].as_array().unwrap().clone()).unwrap_or_default()
}

/// Applies the service file `text` as `name` and waits until its one
/// instance is ready.
async fn apply_ready(h: &Halo, name: &str, text: &str) {
    let f = h.dir.join(format!("{name}.toml"));
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(20), &format!("{name} ready"), || async {
        instances(h, name).first().is_some_and(|i| i["ready"] == true)
    })
    .await;
}

/// The uid of process `pid` (its real uid, from /proc).
fn uid_of(pid: i64) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// An instance that knows where the data directory is (an attacker can
/// guess it) tries every secret in it, says who it runs as and what halo
/// told it, then stays up. Its readiness and backup hook run as the same
/// user: the probe passes only when it is not root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_runs_unprivileged_and_cannot_read_halos_secrets() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let data = h.data_dir.clone().unwrap();
    let script = "for f in \"$DATA\"/token \"$DATA\"/read-token \"$DATA\"/store.redb \"$DATA\"/logs \"$DATA\"/*; do \
                  if cat \"$f\" >/dev/null 2>&1 || ls \"$f\" >/dev/null 2>&1; then echo \"READ $f\"; \
                  else echo \"DENIED $f\"; fi; done; \
                  echo \"uid=$(id -u)\"; env | grep '^HALO_' | sed 's/^/env /'; echo probed-all; exec sleep 1000";
    let app = format!(
        "name = \"nosy\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\n\
         env = {{ DATA = \"{}\" }}\n\
         [readiness]\nexec = [\"sh\", \"-c\", \"test $(id -u) -ne 0\"]\ninterval = \"200ms\"\n\
         [backup]\ncommand = [\"sh\", \"-c\", \"id -u\"]\n",
        data.display()
    );
    // Ready means its probe ran unprivileged.
    apply_ready(&h, "nosy", &app).await;
    let mut logs = String::new();
    eventually(Duration::from_secs(10), "the instance's report", || {
        logs = h.cli(&["logs", "nosy", "-n", "100"]).1;
        let done = logs.contains("probed-all");
        async move { done }
    })
    .await;
    assert!(!logs.contains("READ "), "an instance read a secret:\n{logs}");
    assert!(logs.contains("DENIED ") && logs.contains("/token"), "{logs}");
    assert!(!logs.contains("uid=0"), "the instance ran as root:\n{logs}");
    assert!(logs.contains("env HALO_INSTANCE=nosy-") && logs.contains("env HALO_SERVICE=nosy"), "{logs}");
    let data_text = data.display().to_string();
    assert!(
        !logs.lines().filter(|l| l.contains("env HALO_")).any(|l| l.contains(&data_text)),
        "the environment names the data directory:\n{logs}"
    );
    // The process itself, as the kernel sees it.
    let pid = instances(&h, "nosy")[0]["pid"].as_i64().unwrap();
    let uid = uid_of(pid);
    assert_ne!(uid, 0, "the instance runs as root");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("halo-app:") && l.split(':').nth(2) == Some(&uid.to_string())));
    // The backup hook too.
    let archive = h.dir.join("b.tar");
    let (code, out, err) = h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let tar = std::process::Command::new("tar").args(["-xOf"]).arg(&archive).arg("hooks/nosy.out").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&tar.stdout).trim(), uid.to_string(), "{tar:?}");
}

/// `run.user = "root"`, written, is the one way to run an instance as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_user_names_who_an_instance_runs_as() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let app = "name = \"rooted\"\n[run]\ncommand = \"sleep\"\nargs = [\"1000\"]\nuser = \"root\"\n\
               [readiness]\nexec = [\"true\"]\ninterval = \"200ms\"\n";
    apply_ready(&h, "rooted", app).await;
    let f = h.dir.join("rooted.toml");
    let pid = instances(&h, "rooted")[0]["pid"].as_i64().unwrap();
    let me = uid_of(std::process::id() as i64);
    assert_eq!(uid_of(pid), me);
    // A user that does not exist is named in the instance's last exit.
    let app = "name = \"ghost\"\n[run]\ncommand = \"sleep\"\nargs = [\"1000\"]\nuser = \"no-such-user-here\"\n";
    std::fs::write(&f, app).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(20), "ghost's start failure named", || async {
        let (_, table, _) = h.cli(&["status", "-o", "wide"]);
        table.contains("no such user")
    })
    .await;
    // A malformed one is refused where it is written.
    std::fs::write(&f, "name = \"bad\"\n[run]\ncommand = \"x\"\nuser = \"Root User\"\n").unwrap();
    let (code, _, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("run.user") && err.contains("a user or group name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_token_never_sees_an_environment_value() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let secret = "s3cret-db-password-42";
    let app = format!(
        "name = \"db\"\n[run]\ncommand = \"sleep\"\nargs = [\"1000\"]\n\n[run.env]\nDB_PASSWORD = \"{secret}\"\n\
         DB_USER = \"app\"\n"
    );
    let f = h.dir.join("db.toml");
    std::fs::write(&f, &app).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let read = std::fs::read_to_string(h.data_dir.as_ref().unwrap().join("read-token")).unwrap();
    let c = Client::new();
    let get = |path: &str, token: &str| {
        Request::get(h.api_url(path))
            .header("authorization", format!("Bearer {}", token.trim()))
            .body(Full::default())
            .unwrap()
    };
    let r = c.send(get("/v1/services/db", &read)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains(secret) && !r.body.contains("\"app\""), "{}", r.body);
    assert!(r.body.contains("DB_PASSWORD = \"(redacted)\"") && r.body.contains("DB_USER"), "{}", r.body);
    for path in ["/v1/status", "/v1/events", "/metrics", "/v1/nodes", "/v1/traffic"] {
        let r = c.send(get(path, &read)).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(!r.body.contains(secret), "{path} shows a secret to the read-only token");
    }
    // The CLI with the read token says the same; the admin token sees it.
    let (_, out, _) = h.cli_env(&["get", "db"], &[("HALO_TOKEN", read.trim())]);
    assert!(!out.contains(secret) && out.contains("(redacted)"), "{out}");
    let r = c.send(get("/v1/services/db", &h.token())).await.unwrap();
    assert!(r.body.contains(secret), "{}", r.body);
    // Refusals carry a stable code beside their message.
    let code = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["code"].clone();
    let r = c.send(get("/v1/services/nope", &h.token())).await.unwrap();
    assert_eq!((r.status.as_u16(), code(&r.body)), (404, serde_json::json!("not_found")), "{}", r.body);
    let scale = Request::post(h.api_url("/v1/services/db/scale"))
        .header("authorization", format!("Bearer {}", read.trim()))
        .body(Full::from(r#"{"replicas": 2}"#))
        .unwrap();
    let r = c.send(scale).await.unwrap();
    assert_eq!((r.status.as_u16(), code(&r.body)), (403, serde_json::json!("read_only")), "{}", r.body);
}

/// Writes a request head a byte a second; true once the server closed.
async fn dribble_until_closed(to: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.is_err() {
        return true;
    }
    let mut buf = [0u8; 512];
    for _ in 0..60 {
        if s.write_all(b"a").await.is_err() {
            return true;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}

fn proxy_with_admin() -> Halo {
    Halo::proxy(
        BIN,
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"main\"\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n",
    )
    .unwrap()
}

/// Both APIs close a connection whose head never ends (10 s), token or
/// not, and serve others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_never_ends_is_closed_on_both_apis() {
    let node = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let proxy = proxy_with_admin();
    let (a, b) = tokio::join!(dribble_until_closed(node.api.unwrap()), dribble_until_closed(proxy.admin.unwrap()));
    assert!(a, "the node API kept a head that never ends for a minute");
    assert!(b, "the proxy admin kept a head that never ends for a minute");
    let c = Client::new();
    assert_eq!(c.get(&node.api_url("/healthz")).await.unwrap().status, 200);
    assert_eq!(c.get(&proxy.admin_url("/healthz")).await.unwrap().status, 200);
}

/// A page on another site cannot use either API through its visitor's
/// browser: a cross-origin change is refused (token or not), and so is a
/// Host that is not the API's (DNS rebinding); the API's own page passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_origin_or_rebound_request_is_refused() {
    let proxy = proxy_with_admin();
    let c = Client::new();
    let admin = proxy.admin.unwrap();
    let req = |method: &str, path: &str, host: &str, origin: Option<&str>| {
        let mut r = Request::builder().method(method).uri(format!("http://{admin}{path}")).header("host", host);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.body(Full::default()).unwrap()
    };
    let own = admin.to_string();
    let r = c.send(req("POST", "/reload", &own, Some("http://evil.example"))).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(!r.body.contains("reloaded"), "{}", r.body);
    let r = c.send(req("GET", "/status", &format!("evil.example:{}", admin.port()), None)).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c.send(req("POST", "/reload", &own, Some(&format!("http://{own}")))).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    // The node API: refused even with the admin token.
    let node = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let api = node.api.unwrap();
    let r = c
        .send(
            Request::post(format!("http://{api}/v1/services/demo/restart"))
                .header("authorization", format!("Bearer {}", node.token()))
                .header("origin", "http://evil.example")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("\"code\":\"cross_origin\""), "{}", r.body);
    let r = c
        .send(
            Request::get(format!("http://{api}/v1/status"))
                .header("authorization", format!("Bearer {}", node.token()))
                .header("host", format!("rebound.example:{}", api.port()))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let (code, _, err) = node.cli(&["status"]);
    assert_eq!(code, 0, "the CLI is no browser: {err}");
}

/// Nothing halo writes lives where another user could prepare it: the
/// runtime directory must be a directory of halo's own user, closed to
/// others (a planted link or someone else's directory is refused, naming
/// it); claims in it are private; a trial restore's scratch directory is
/// fresh and removed; a restored data directory is the owner's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_paths_are_private_and_planted_ones_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = halo_testkit::TempDir::new("rundir");
    let cfg = dir.write(
        "proxy.toml",
        &format!("[[listeners]]\nlisten = \"{}\"\n[[routes]]\nupstream = \"u\"\n[upstreams.u]\nendpoints = [\"127.0.0.1:9\"]\n", halo_testkit::free_addr()),
    );
    let start = |run_dir: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["proxy", "-c", cfg.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // A link planted where the runtime directory goes.
    let victim = dir.0.join("victim");
    std::fs::create_dir(&victim).unwrap();
    let planted = dir.0.join("planted");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let out = start(&planted);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("planted") && err.contains("--run-dir"), "{err}");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "halo wrote through the planted link");
    // Someone else's directory.
    let foreign = dir.0.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let out = start(&foreign);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("owned by uid 65534"), "{err}");
    // A good one: made private, and the claim in it private too.
    let run = dir.0.join("run");
    let h =
        Halo::start(BIN, &["proxy", "-c", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap()], &dir.0).unwrap();
    assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o700);
    let claims: Vec<_> = std::fs::read_dir(run.join("listen")).unwrap().flatten().collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].metadata().unwrap().mode() & 0o077, 0);
    assert_eq!(std::fs::read_to_string(claims[0].path()).unwrap(), h.pid().to_string());
    drop(h);

    // Backups: a trial restore leaves nothing behind; a restore is private.
    let node = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let archive = node.dir.join("b.tar");
    assert_eq!(node.cli(&["backup", "create", "--out", archive.to_str().unwrap()]).0, 0);
    let scratch = dir.0.join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["backup", "verify", archive.to_str().unwrap()])
        .env("TMPDIR", &scratch)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "the trial restore left its scratch behind");
    let restored = dir.0.join("restored");
    let out = std::process::Command::new(BIN)
        .args(["backup", "restore", archive.to_str().unwrap(), "--into", restored.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777, 0o700);
    let mut files = vec![restored.clone()];
    while let Some(p) = files.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                files.push(e.path());
            } else {
                assert_eq!(m.mode() & 0o077, 0, "{} is open to others", e.path().display());
            }
        }
    }
}

/// The quickstart's demo-app does not take itself down for a visitor: its
/// fault-injection endpoints need `demo-app --admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_demo_app_has_no_public_crash_button() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    eventually(Duration::from_secs(20), "demo ready", || async {
        instances(&h, "demo").first().is_some_and(|i| i["ready"] == true)
    })
    .await;
    let pid = instances(&h, "demo")[0]["pid"].as_i64().unwrap();
    let c = Client::new();
    for path in ["/admin/crash", "/admin/hang", "/admin/hog?mib=65536"] {
        let r = c.get(&h.url("http", path)).await.unwrap();
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    assert_eq!(instances(&h, "demo")[0]["pid"].as_i64(), Some(pid));
    assert!(halo_testkit::alive(pid as i32));
}
