//! Canary releases through the real binary on `halo up`: a good version
//! goes through every step under load and becomes stable; a failing one is
//! rolled back by the analysis; an operator's abort; bad `[release]` input.

use std::time::{Duration, Instant};

use halo_testkit::{eventually, Client, Halo, Load, Report};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// The quickstart on free ports with two instances and quick probes.
fn node() -> String {
    halo_testkit::quickstart(2)
}

/// demo at `version` (extra demo-app flags in `args`), released as a canary.
fn canary(version: &str, args: &str, steps: &str, analysis: &str) -> String {
    format!(
        "name = \"demo\"\nreplicas = 2\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\", \"--version\", \"{version}\"{args}]\n\
         [readiness]\nhttp = \"/healthz\"\ninterval = \"200ms\"\n[[routes]]\npath_prefix = \"/\"\n\
         [release]\nstrategy = \"canary\"\nsteps = {steps}\n[release.analysis]\n{analysis}\n"
    )
}

const QUICK: &str = "interval = \"500ms\"\nmin_requests = 10\nmax_error_rate = 0.01\nfailure_limit = 2";

fn apply(h: &Halo, name: &str, text: &str) -> (i32, String, String) {
    let f = h.dir.join(name);
    std::fs::write(&f, text).unwrap();
    h.cli(&["apply", "-f", f.to_str().unwrap()])
}

fn rollout(h: &Halo) -> serde_json::Value {
    let (code, out, err) = h.cli(&["rollout", "status", "demo", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn instances(h: &Halo) -> Vec<serde_json::Value> {
    let s = h.status();
    let svc = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "demo").cloned();
    svc.map(|s| s["instances"].as_array().unwrap().clone()).unwrap_or_default()
}

async fn all_ready(h: &Halo, n: usize) {
    eventually(Duration::from_secs(20), &format!("{n} ready instances"), || async {
        let all = instances(h);
        all.len() == n && all.iter().all(|i| i["ready"] == true && i["stopping"] == false && i["current"] == true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_canary_goes_through_every_step_under_load_and_becomes_stable() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let url = h.url("http", "/");
    let load = Load::start(&url, 2);
    let started = Instant::now();
    let text = canary("v2", "", "[{ weight = 20, pause = \"1s\" }, { weight = 50, pause = \"1s\" }]", QUICK);
    let (code, out, err) = apply(&h, "v2.toml", &text);
    assert_eq!(code, 0, "{out}{err}");
    // Both versions answer while the canary takes its share.
    let c = Client::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut steps = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = rollout(&h);
        steps.insert(v["step"].as_u64().unwrap_or(0));
        if let Ok(r) = c.get(&url).await {
            seen.insert(r.body.split(' ').nth(1).unwrap_or("").to_string());
        }
        if v["state"] == "promoted" {
            break;
        }
        assert!(Instant::now() < deadline, "not promoted after 40s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_ready(&h, 2).await;
    eventually(Duration::from_secs(10), "only v2 answering", || async {
        c.get(&url).await.is_ok_and(|r| r.body.starts_with("demo-app v2"))
    })
    .await;
    let Report { ok, failed } = load.finish().await;
    let v = rollout(&h);
    println!(
        "canary v1 -> v2 promoted after {:?}: {ok} requests ok, {} failed; {}",
        started.elapsed(),
        failed.len(),
        v["reason"]
    );
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), failed.first());
    assert!(seen.contains("v1") && seen.contains("v2"), "both versions should have answered mid-rollout: {seen:?}");
    assert!(steps.contains(&2), "the second step was never reached: {steps:?}");
    assert!(v["windows"].as_array().unwrap().iter().any(|w| w["verdict"] == "pass"), "{v}");
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(stored.contains("\"v2\""), "{stored}");
    assert_eq!(halo_testkit::processes_of(h.data_dir.as_ref().unwrap()).len(), 2, "old instances left running");
    let req = http::Request::get(h.api_url("/metrics"))
        .header("authorization", format!("Bearer {}", h.token()))
        .body(http_body_util::Full::default())
        .unwrap();
    let m = c.send(req).await.unwrap().body;
    for want in
        ["halo_rollout_state{service=\"demo\",state=\"promoted\"} 1", "halo_upstream_requests_total{upstream=\"demo\""]
    {
        assert!(m.contains(want), "metrics lack {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_requests_is_rolled_back_by_the_analysis() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let url = h.url("http", "/");
    let load = Load::start(&url, 2);
    let text = canary("v2", ", \"--fail-rate\", \"0.05\"", "[{ weight = 20, pause = \"30s\" }]", QUICK);
    assert_eq!(apply(&h, "bad.toml", &text).0, 0);
    // From the canary's first answer to its weight going to 0.
    let c = Client::new();
    eventually(Duration::from_secs(20), "the canary answering", || async {
        c.get(&url).await.is_ok_and(|r| r.body.contains("v2"))
    })
    .await;
    let first = Instant::now();
    eventually(Duration::from_secs(30), "the canary rolled back", || async { rollout(&h)["state"] == "rolled_back" })
        .await;
    let detected = first.elapsed();
    let v = rollout(&h);
    assert_eq!(v["weight"], 0, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("max_error_rate"), "{v}");
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(
        stored.contains("\"v1\"") && !stored.contains("fail-rate"),
        "the stable revision is not the spec again: {stored}"
    );
    all_ready(&h, 2).await;
    for _ in 0..20 {
        assert!(c.get(&url).await.unwrap().body.starts_with("demo-app v1"));
    }
    let Report { ok, failed } = load.finish().await;
    println!(
        "5% failing canary: rolled back {detected:?} after its first answer; {ok} requests ok, {} failed ({:.2}%)",
        failed.len(),
        failed.len() as f64 * 100.0 / (ok as f64 + failed.len() as f64)
    );
    // Only the canary's share of the requests could fail, and only while it had one.
    assert!(failed.iter().all(|f| f.starts_with("500")), "{:?}", failed.iter().find(|f| !f.starts_with("500")));
    assert!((failed.len() as f64) < (ok as f64) * 0.2 * 0.05 * 3.0 + 5.0, "{} failed of {ok}", failed.len());
    assert_eq!(halo_testkit::processes_of(h.data_dir.as_ref().unwrap()).len(), 2, "canary instances left running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_traffic_holds_and_an_abort_rolls_back() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let text = canary("v2", "", "[{ weight = 50, pause = \"0s\" }]", QUICK);
    assert_eq!(apply(&h, "v2.toml", &text).0, 0);
    // No traffic: windows hold, the step never passes.
    eventually(Duration::from_secs(20), "a window holding for traffic", || async {
        let v = rollout(&h);
        v["reason"].as_str().is_some_and(|r| r.contains("min_requests")) && v["canary"]["ready"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = rollout(&h);
    assert_eq!(v["state"], "progressing", "{v}");
    assert!(v["windows"].as_array().unwrap().iter().all(|w| w["verdict"] == "hold"), "{v}");
    let (code, table, _) = h.cli(&["rollout", "status", "demo"]);
    assert!(code == 0 && table.contains("holding") && table.contains("step 1 of 1"), "{table}");
    let (code, out, err) = h.cli(&["rollout", "abort", "demo"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("aborting"), "{out}");
    eventually(Duration::from_secs(10), "the abort done", || async { rollout(&h)["state"] == "aborted" }).await;
    all_ready(&h, 2).await;
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(stored.contains("\"v1\""), "{stored}");
    let (code, _, err) = h.cli(&["rollout", "promote", "demo"]);
    assert!(code != 0 && err.contains("no canary in progress"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_release_input_names_the_field_and_changes_nothing() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let cases = [
        ("[{ weight = 50 }, { weight = 20 }]", QUICK, "release.steps[1].weight", "must increase"),
        ("[{ weight = 150 }]", QUICK, "release.steps[0].weight", "1 to 100"),
        ("[{ weight = 10, pause = \"-1s\" }]", QUICK, "release.steps[0].pause", "not a duration"),
        ("[{ weight = 10 }]", "max_p99 = 2.0", "max_p99", "unknown field"),
        ("[{ weight = 10 }]", "max_error_rate = 3.0", "release.analysis.max_error_rate", "0.0 to 1.0"),
    ];
    for (steps, analysis, field, says) in cases {
        let (code, _, err) = apply(&h, "bad.toml", &canary("v2", "", steps, analysis));
        assert_ne!(code, 0, "{steps} {analysis} was accepted");
        assert!(err.contains(field) && err.contains(says), "{steps} {analysis}: {err}");
    }
    let text = canary("v2", "", "[{ weight = 10 }]", QUICK).replace("\"canary\"", "\"blue-green\"");
    let (code, _, err) = apply(&h, "bad.toml", &text);
    assert!(code != 0 && err.contains("release.strategy") && err.contains("rolling, canary"), "{err}");
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(stored.contains("\"v1\"") && !stored.contains("release"), "{stored}");
    assert!(instances(&h).iter().all(|i| i["restarts"] == 0 && i["current"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_clients_keep_their_version_and_the_cohort_sees_the_canary() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let pinned = "[balance]\nsession_cookie = \"halo-s\"\n";
    let v2 = canary("v2", "", "[{ weight = 50, pause = \"1m\" }]", QUICK)
        .replace("[release]", &format!("{pinned}[release]"))
        .replace("[release.analysis]", "cohort = { header = \"x-canary\", value = \"1\" }\n[release.analysis]");
    // v1 with the session cookie first (rolled out one at a time), so that
    // both versions set it.
    let v1 = v2.split("[release]").next().unwrap().replace("\"v2\"", "\"v1\"");
    assert_eq!(apply(&h, "v1.toml", &v1).0, 0);
    eventually(Duration::from_secs(20), "v1 with the session cookie", || async {
        instances(&h).iter().all(|i| i["current"] == true && i["ready"] == true) && instances(&h).len() == 2
    })
    .await;
    assert_eq!(apply(&h, "v2.toml", &v2).0, 0);
    eventually(Duration::from_secs(20), "the canary taking its share", || async { rollout(&h)["weight"] == 50 }).await;
    let url = h.url("http", "/");
    let c = Client::new();
    let get = |cookie: Option<String>, header: bool| {
        let mut req = http::Request::get(&url);
        if let Some(k) = cookie {
            req = req.header("cookie", k);
        }
        if header {
            req = req.header("x-canary", "1");
        }
        c.send(req.body(http_body_util::Full::default()).unwrap())
    };
    let mut versions = std::collections::BTreeSet::new();
    for _ in 0..12 {
        // A new client: its first answer pins it; 20 more stay on that version.
        let first = get(None, false).await.unwrap();
        let set = first.headers.get("set-cookie").expect("a session cookie").to_str().unwrap().to_string();
        let cookie = set.split(';').next().unwrap().to_string();
        let version = first.body.split(' ').nth(1).unwrap().to_string();
        for _ in 0..20 {
            let r = get(Some(cookie.clone()), false).await.unwrap();
            assert_eq!(r.body.split(' ').nth(1).unwrap(), version, "a pinned client changed version mid-rollout");
        }
        versions.insert(version);
    }
    assert_eq!(versions.len(), 2, "new clients should land on both versions at weight 50: {versions:?}");
    for _ in 0..30 {
        let r = get(None, true).await.unwrap();
        assert!(r.body.starts_with("demo-app v2"), "a cohort client saw {}", r.body);
    }
    assert_eq!(rollout(&h)["state"], "progressing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_is_rolled_back_by_the_latency_guard() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let load = Load::start(&h.url("http", "/"), 2);
    let analysis = format!("{QUICK}\nmax_p99_vs_stable = 1.5");
    let text = canary("v2", ", \"--delay-ms\", \"30\"", "[{ weight = 20, pause = \"30s\" }]", &analysis);
    assert_eq!(apply(&h, "slow.toml", &text).0, 0);
    let t0 = Instant::now();
    eventually(Duration::from_secs(30), "the slow canary rolled back", || async {
        rollout(&h)["state"] == "rolled_back"
    })
    .await;
    let v = rollout(&h);
    println!("30 ms slower canary: rolled back {:?} after the apply; {}", t0.elapsed(), v["reason"]);
    assert!(v["reason"].as_str().unwrap().contains("max_p99_vs_stable"), "{v}");
    let Report { failed, .. } = load.finish().await;
    assert!(failed.is_empty(), "a slow canary fails no request: {:?}", failed.first());
    all_ready(&h, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_promote_undo_abort_and_retry_through_the_cli() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let load = Load::start(&h.url("http", "/"), 1);
    let text = canary("v2", "", "[{ weight = 50, pause = \"1m\" }]", QUICK);
    assert_eq!(apply(&h, "v2.toml", &text).0, 0);
    eventually(Duration::from_secs(20), "the canary taking its share", || async { rollout(&h)["weight"] == 50 }).await;
    let order = |verb: &str, says: &str| {
        let (code, out, err) = h.cli(&["rollout", verb, "demo"]);
        assert!(code == 0 && out.contains(says), "{verb}: {out}{err}");
    };
    let state = |want: &'static str| {
        let h = &h;
        async move { eventually(Duration::from_secs(10), want, || async { rollout(h)["state"] == want }).await }
    };
    // Paused: the weight stays, no window is judged.
    order("pause", "pausing");
    state("paused").await;
    let windows = rollout(&h)["windows"].as_array().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = rollout(&h);
    assert_eq!((v["windows"].as_array().unwrap().len(), v["weight"].as_u64()), (windows, Some(50)), "{v}");
    order("resume", "resuming");
    state("progressing").await;
    // Promote now, whatever the step; then undo: back to v1, rolling.
    order("promote", "promoting");
    state("promoted").await;
    all_ready(&h, 2).await;
    order("undo", "undoing");
    eventually(Duration::from_secs(20), "v1 again", || async {
        let (_, stored, _) = h.cli(&["get", "demo"]);
        stored.contains("\"v1\"") && instances(&h).len() == 2 && instances(&h).iter().all(|i| i["current"] == true)
    })
    .await;
    // Abort, then the same canary again: by retry, and by applying it.
    assert_eq!(apply(&h, "v2.toml", &text).0, 0);
    state("progressing").await;
    order("abort", "aborting");
    state("aborted").await;
    order("retry", "retrying");
    state("progressing").await;
    order("abort", "aborting");
    state("aborted").await;
    assert_eq!(apply(&h, "v2.toml", &text).0, 0);
    state("progressing").await;
    let (code, _, err) = h.cli(&["rollout", "undo", "demo"]);
    assert!(code != 0 && err.contains("canary in progress"), "{err}");
    let Report { failed, .. } = load.finish().await;
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_at_once_and_rolls_back_instantly_under_load() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let url = h.url("http", "/");
    let load = Load::start(&url, 2);
    let bg = |version: &str, delay: &str| {
        canary(version, "", "[]", QUICK)
            .replace("steps = []\n", &format!("scale_down_delay = \"{delay}\"\n"))
            .replace("\"canary\"", "\"blue_green\"")
    };
    let c = Client::new();
    let answers = |want: &'static str| {
        let (c, url) = (&c, &url);
        async move {
            for _ in 0..10 {
                if !c.get(url).await.is_ok_and(|r| r.body.starts_with(want)) {
                    return false;
                }
            }
            true
        }
    };
    // v2: the whole set beside v1, then every request at once; v1 kept a while.
    assert_eq!(apply(&h, "v2.toml", &bg("v2", "3s")).0, 0);
    eventually(Duration::from_secs(20), "every answer from v2", || answers("demo-app v2")).await;
    let v = rollout(&h);
    assert_eq!((v["state"].as_str(), v["weight"].as_u64()), (Some("progressing"), Some(100)), "{v}");
    assert_eq!((v["stable"]["ready"].as_u64(), v["canary"]["ready"].as_u64()), (Some(2), Some(2)), "{v}");
    eventually(Duration::from_secs(20), "v2 promoted and v1 gone", || async {
        rollout(&h)["state"] == "promoted" && instances(&h).len() == 2
    })
    .await;
    // v3 switched, then rolled back inside scale_down_delay: v2 answers again at once.
    assert_eq!(apply(&h, "v3.toml", &bg("v3", "1m")).0, 0);
    eventually(Duration::from_secs(20), "every answer from v3", || answers("demo-app v3")).await;
    let (code, out, err) = h.cli(&["rollout", "abort", "demo"]);
    assert_eq!(code, 0, "{out}{err}");
    let t = Instant::now();
    eventually(Duration::from_secs(10), "every answer from v2 again", || answers("demo-app v2")).await;
    println!("blue/green rollback inside scale_down_delay: v2 answering again after {:?}", t.elapsed());
    all_ready(&h, 2).await;
    let Report { ok, failed } = load.finish().await;
    println!("blue/green switch, promotion, switch and rollback: {ok} requests ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_that_never_becomes_ready_is_rolled_back_at_its_deadline() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let text = canary("v2", "", "[{ weight = 50 }]", QUICK)
        .replace("http = \"/healthz\"", "exec = [\"false\"]")
        .replace("[release.analysis]", "progress_deadline = \"2s\"\n[release.analysis]");
    assert_eq!(apply(&h, "stuck.toml", &text).0, 0);
    eventually(Duration::from_secs(20), "the stuck canary rolled back", || async {
        rollout(&h)["state"] == "rolled_back"
    })
    .await;
    let v = rollout(&h);
    assert!(v["reason"].as_str().unwrap().contains("progress_deadline"), "{v}");
    all_ready(&h, 2).await;
    assert!(Client::new().get(&h.url("http", "/")).await.unwrap().body.starts_with("demo-app v1"));
}

/// `apply --wait` of a canary that its analysis rolls back fails, saying
/// so: the CLI knows by the event's kind (`rolled-back`), not its words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_fails_when_the_canary_is_rolled_back() {
    let h = Halo::up(BIN, &node()).unwrap();
    all_ready(&h, 2).await;
    let load = Load::start(&h.url("http", "/"), 2);
    let text = canary("v2", ", \"--fail-rate\", \"0.5\"", "[{ weight = 50, pause = \"30s\" }]", QUICK);
    let f = h.dir.join("bad.toml");
    std::fs::write(&f, text).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap(), "--wait", "--timeout", "120s"]);
    let _ = load.finish().await;
    assert!(code != 0 && err.contains("failed: canary rolled back"), "{out}{err}");
    let (_, events, _) = h.cli(&["events", "--service", "demo"]);
    assert!(events.lines().any(|l| l.contains("rolled-back") && l.contains("canary rolled back")), "{events}");
}
