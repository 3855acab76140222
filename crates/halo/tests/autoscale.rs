//! Autoscaling through the real binary on `halo up`: a step of load raises
//! the replica count within seconds and its end lowers it only after the
//! scale-down window; a load that swings around the target scales once; a
//! service at zero answers its first request after a cold start (curl),
//! goes back to zero when idle, and answers 503 with Retry-After when no
//! instance comes in time; bad `[autoscale]` input is refused, naming it.

use std::time::{Duration, Instant};

use halo_testkit::{eventually, Halo, Load};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// `halo up` on free ports with no service of its own.
fn node() -> Halo {
    let toml = "[node]\napi = \"127.0.0.1:0\"\n[proxy]\nworkers = 2\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n";
    Halo::up(BIN, toml).unwrap()
}

/// demo-app (with the flags in `app`), autoscaled by `autoscale` (TOML
/// lines); its route takes every request (`demo`) or those for
/// `NAME.localhost`.
fn service(name: &str, replicas: Option<u32>, autoscale: &str, app: &str) -> String {
    let replicas = replicas.map_or(String::new(), |r| format!("replicas = {r}\n"));
    let host = if name == "demo" { String::new() } else { format!("host = \"{name}.localhost\"\n") };
    format!(
        "name = \"{name}\"\n{replicas}[run]\ncommand = \"halo\"\nargs = [\"demo-app\"{app}]\n\
         [readiness]\nhttp = \"/healthz\"\ninterval = \"50ms\"\n[[routes]]\n{host}path_prefix = \"/\"\n\
         [autoscale]\n{autoscale}\n"
    )
}

fn apply(h: &Halo, name: &str, text: &str) -> (i32, String, String) {
    let f = h.dir.join(format!("{name}.toml"));
    std::fs::write(&f, text).unwrap();
    h.cli(&["apply", "-f", f.to_str().unwrap()])
}

/// The service's entry in the cluster view.
fn cluster_service(h: &Halo, name: &str) -> serde_json::Value {
    let s = h.status();
    s["cluster"]["services"].as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap_or_default()
}

/// (replicas asked for, ready) of `name`.
fn counts(h: &Halo, name: &str) -> (u64, u64) {
    let s = cluster_service(h, name);
    (s["replicas"].as_u64().unwrap_or(0), s["ready"].as_u64().unwrap_or(0))
}

/// The "scaled ..." events of `name`, oldest first: (unix ms, message).
fn scaled(h: &Halo, name: &str) -> Vec<(u64, String)> {
    let (code, out, err) = h.cli(&["events", "--service", name, "-n", "1000", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut v: Vec<(u64, String)> = all
        .iter()
        .filter(|e| e["kind"] == "scaled")
        .map(|e| (e["time_ms"].as_u64().unwrap_or(0), e["message"].as_str().unwrap_or("").to_string()))
        .collect();
    v.sort();
    v
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_load_scales_up_within_seconds_and_its_end_scales_down_after_the_window() {
    let h = node();
    let text = service(
        "demo",
        None,
        "min = 1\nmax = 6\nin_flight = 4\nwindow = \"5s\"\nscale_down_window = \"6s\"",
        ", \"--delay-ms\", \"50\"",
    );
    let (code, out, err) = apply(&h, "demo", &text);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(20), "one ready instance", || async { counts(&h, "demo") == (1, 1) }).await;
    let url = h.url("http", "/");
    // 12 requests at once, each 50 ms: 3 instances' worth at 4 each.
    let load = Load::start(&url, 12);
    eventually(Duration::from_secs(30), "3 replicas, all ready", || async { counts(&h, "demo") == (3, 3) }).await;
    let ups = scaled(&h, "demo");
    assert!(!ups.is_empty() && ups[0].1.starts_with("scaled demo 1 -> 2: in_flight "), "{ups:?}");
    assert!(ups[0].1.contains("per instance > 4"), "{ups:?}");
    // Status shows the bounds, the target and what was measured.
    let (code, table, _) = h.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(table.contains("autoscaling demo: replicas 3 (1 to 6)") && table.contains("(target 4)"), "{table}");
    let report = load.finish().await;
    let stopped = unix_ms();
    assert!(
        report.failed.is_empty(),
        "failed requests while scaling up: {:?}",
        &report.failed[..5.min(report.failed.len())]
    );
    eventually(Duration::from_secs(40), "back to 1 replica", || async { counts(&h, "demo").0 == 1 }).await;
    let all = scaled(&h, "demo");
    let downs: Vec<&(u64, String)> = all.iter().filter(|(_, m)| m.contains("scale_down_window")).collect();
    assert!(!downs.is_empty(), "{all:?}");
    // Nothing went down before the window had passed since the load ended
    // (a lower bound: a slow machine only makes it later).
    let first_down = downs[0].0;
    assert!(
        first_down >= stopped + 5_000,
        "scaled down {} ms after the load ended: {all:?}",
        first_down as i64 - stopped as i64
    );
    // `halo scale` is refused: the count is the autoscaler's.
    let (code, _, err) = h.cli(&["scale", "demo", "5"]);
    assert!(code != 0 && err.contains("autoscaled between 1 and 6"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_swinging_twenty_percent_around_its_target_scales_once() {
    let h = node();
    // Two instances at 5 in flight each: 10, swinging between 8 and 12.
    let text = service(
        "demo",
        Some(2),
        "min = 1\nmax = 8\nin_flight = 5\nwindow = \"10s\"\nscale_down_window = \"60s\"",
        ", \"--delay-ms\", \"50\"",
    );
    let (code, out, err) = apply(&h, "demo", &text);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(20), "two ready instances", || async { counts(&h, "demo") == (2, 2) }).await;
    let url = h.url("http", "/");
    let base = Load::start(&url, 8);
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let peak = Load::start(&url, 4);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let r = peak.finish().await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let r = base.finish().await;
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let changes = scaled(&h, "demo");
    assert!(changes.len() <= 1, "the count flapped: {changes:?}");
    assert!(changes.iter().all(|(_, m)| m.starts_with("scaled demo 2 -> 3")), "{changes:?}");
}

/// curl's status code and the time it took, for one GET of `url` with
/// `host`.
fn curl(url: &str, host: &str) -> (String, Duration, String) {
    let t = Instant::now();
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-m",
            "30",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
            url,
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.lines().last().unwrap_or("").to_string();
    (code, t.elapsed(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_at_zero_answers_its_first_request_after_a_cold_start_and_goes_back_to_zero() {
    let h = node();
    let text = service(
        "zero",
        None,
        "min = 0\nmax = 2\nin_flight = 4\nscale_to_zero_after = \"3s\"\ncold_start_timeout = \"20s\"",
        "",
    );
    let (code, out, err) = apply(&h, "zero", &text);
    assert_eq!(code, 0, "{out}{err}");
    // No instance, and none started without a request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = cluster_service(&h, "zero");
    assert_eq!((s["replicas"].as_u64(), s["placed"].as_u64()), (Some(0), Some(0)), "{s}");
    let url = h.url("http", "/");
    let (code, took, head) = curl(&url, "zero.localhost");
    assert_eq!(code, "200", "first request after the cold start: {head}");
    let events = scaled(&h, "zero");
    assert!(
        events.iter().any(|(_, m)| m == "scaled zero 0 -> 1: 1 request waiting for a first instance"),
        "{events:?} (first answer after {took:?})"
    );
    // Idle for scale_to_zero_after: back to zero, instance stopped.
    eventually(Duration::from_secs(30), "zero again, no instance", || async {
        let s = cluster_service(&h, "zero");
        s["replicas"] == 0 && s["placed"] == 0
    })
    .await;
    let events = scaled(&h, "zero");
    assert!(events.iter().any(|(_, m)| m.starts_with("scaled zero 1 -> 0: no request for ")), "{events:?}");
    // And from zero again.
    let (code, _, head) = curl(&url, "zero.localhost");
    assert_eq!(code, "200", "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_past_its_timeout_answers_503_with_retry_after() {
    let h = node();
    // Its instances never become ready (a readiness check that fails).
    let text = service("never", None, "min = 0\nmax = 1\nrps = 10\ncold_start_timeout = \"500ms\"", "")
        .replace("http = \"/healthz\"", "exec = [\"false\"]");
    let (code, out, err) = apply(&h, "never", &text);
    assert_eq!(code, 0, "{out}{err}");
    let url = h.url("http", "/");
    // A new service is routed within a second (404 until then).
    let mut answer = curl(&url, "never.localhost");
    let deadline = Instant::now() + Duration::from_secs(20);
    while answer.0 == "404" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = curl(&url, "never.localhost");
    }
    let (code, took, head) = answer;
    assert_eq!(code, "503", "{head}");
    assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
    assert!(took >= Duration::from_millis(500), "held {took:?}, less than its cold_start_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_autoscale_and_budget_sections_are_refused_naming_the_field() {
    let h = node();
    let cases = [
        ("min = 3\nmax = 2\nin_flight = 4", "autoscale.min: 3 is above max (2)"),
        ("max = 4", "autoscale: needs a target per ready instance"),
        ("max = 4\nrps = -1", "autoscale.rps: -1 is not accepted"),
        ("max = 4\nin_flight = 4\ncold_start_timeout = \"5s\"", "are for min = 0"),
        ("max = 4\np99 = \"fast\"", "autoscale.p99"),
    ];
    for (section, want) in cases {
        let (code, out, err) = apply(&h, "bad", &service("bad", None, section, ""));
        assert!(code != 0 && err.contains(want), "[autoscale] {section:?}: {out}{err}");
    }
    let budget = service("bad", None, "min = 1\nmax = 4\nin_flight = 4", "") + "[budget]\nmin_available = 2\n";
    let (code, _, err) = apply(&h, "bad", &budget);
    assert!(code != 0 && err.contains("budget.min_available: 2 is above [autoscale] min (1)"), "{err}");
    let (code, _, err) = h.cli(&["get", "bad"]);
    assert!(code != 0, "a refused service was stored: {err}");
}
