//! `halo up` through the real binary: the quickstart, recovery from
//! instance crashes, hangs and crash loops, scaling and rolling restarts
//! under load, kill -9 of halo itself, bad specs and the API token.

use std::time::{Duration, Instant};

use halo_testkit::{eventually, Client, Halo, Load, Report};
use http::Request;
use http_body_util::Full;

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// The quickstart's node file on free ports, with `replicas` instances and
/// quick probes.
fn node(replicas: u32) -> String {
    halo_testkit::quickstart(replicas)
}

fn instances(h: &Halo, service: &str) -> Vec<serde_json::Value> {
    let s = h.status();
    let svc = s["services"].as_array().unwrap().iter().find(|s| s["name"] == service).cloned();
    svc.map(|s| s["instances"].as_array().unwrap().clone()).unwrap_or_default()
}

fn ready_pids(h: &Halo, service: &str) -> Vec<i64> {
    let mut pids: Vec<i64> = instances(h, service)
        .iter()
        .filter(|i| i["ready"] == true && i["stopping"] == false)
        .filter_map(|i| i["pid"].as_i64())
        .collect();
    pids.sort();
    pids
}

async fn all_ready(h: &Halo, service: &str, n: usize) {
    eventually(Duration::from_secs(20), &format!("{n} ready instances of {service}"), || async {
        let all = instances(h, service);
        all.len() == n && all.iter().all(|i| i["ready"] == true && i["stopping"] == false)
    })
    .await;
}

fn kill(pid: i64, sig: &str) {
    std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_spreads_traffic_and_kill_9_of_an_instance_fails_no_request() {
    let h = Halo::up(BIN, &node(3)).unwrap();
    all_ready(&h, "demo", 3).await;
    let url = h.url("http", "/");
    let c = Client::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let r = c.get(&url).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with("demo-app v1 instance demo-"), "{}", r.body);
        seen.insert(r.body);
    }
    assert_eq!(seen.len(), 3, "traffic did not reach all three instances");

    let load = Load::start(&url, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = ready_pids(&h, "demo")[0];
    let killed = Instant::now();
    kill(victim, "KILL");
    eventually(Duration::from_secs(10), "the killed instance back and ready", || async {
        let pids = ready_pids(&h, "demo");
        pids.len() == 3 && !pids.contains(&victim)
    })
    .await;
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Report { ok, failed } = load.finish().await;
    println!("kill -9 of an instance: back and ready after {back:?}; {ok} requests ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), failed.first());
    let restarted = instances(&h, "demo").into_iter().find(|i| i["restarts"] == 1).expect("one instance restarted");
    assert_eq!(restarted["last_exit"], "killed by SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_instance_fails_liveness_and_is_restarted() {
    let text = node(2).replace("interval = \"1s\"\ntimeout = \"500ms\"", "interval = \"300ms\"\ntimeout = \"200ms\"");
    let h = Halo::up(BIN, &text).unwrap();
    all_ready(&h, "demo", 2).await;
    let victim = ready_pids(&h, "demo")[0];
    kill(victim, "STOP");
    let frozen = Instant::now();
    eventually(Duration::from_secs(15), "the frozen instance replaced", || async {
        let pids = ready_pids(&h, "demo");
        pids.len() == 2 && !pids.contains(&victim)
    })
    .await;
    println!("SIGSTOP of an instance: restarted and ready after {:?}", frozen.elapsed());
    let i = instances(&h, "demo").into_iter().find(|i| i["restarts"] == 1).expect("restarted instance");
    assert!(i["last_exit"].as_str().unwrap().contains("liveness"), "{}", i["last_exit"]);
    assert!(i["probe_failures"]["liveness"].as_u64().unwrap() >= 3, "{}", i["probe_failures"]);
    assert!(!std::path::Path::new(&format!("/proc/{victim}")).exists(), "the frozen process was left behind");
    let url = h.url("http", "/");
    for _ in 0..10 {
        assert_eq!(Client::new().get(&url).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_service_says_so_and_does_not_spin() {
    let h = Halo::up(BIN, &node(1)).unwrap();
    let app = "name = \"crashy\"\nreplicas = 1\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"echo dying; exit 7\"]\n\
               [restart]\nbackoff_initial = \"50ms\"\nbackoff_max = \"2s\"\ncrash_loop_restarts = 3\n";
    let f = h.dir.join("crashy.toml");
    std::fs::write(&f, app).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("crashy: created"), "{out}");
    eventually(Duration::from_secs(10), "crash-loop state", || async {
        instances(&h, "crashy").first().is_some_and(|i| i["state"] == "crash-loop")
    })
    .await;
    let before = instances(&h, "crashy")[0]["restarts"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let i = instances(&h, "crashy")[0].clone();
    assert!(i["restarts"].as_u64().unwrap() - before <= 2, "restarting faster than the longest backoff: {i}");
    assert_eq!(i["last_exit"], "exited with status 7");
    let (_, table, _) = h.cli(&["status"]);
    assert!(table.contains("crash-loop"), "{table}");
    let (code, logs, _) = h.cli(&["logs", "crashy", "-n", "1"]);
    assert_eq!(code, 0);
    assert!(logs.contains("| dying"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_and_a_rolling_restart_under_load_fail_no_request() {
    let h = Halo::up(BIN, &node(2)).unwrap();
    all_ready(&h, "demo", 2).await;
    let load = Load::start(&h.url("http", "/"), 2);
    let (code, _, err) = h.cli(&["scale", "demo", "4"]);
    assert_eq!(code, 0, "{err}");
    all_ready(&h, "demo", 4).await;
    let (code, _, err) = h.cli(&["scale", "demo", "2"]);
    assert_eq!(code, 0, "{err}");
    all_ready(&h, "demo", 2).await;
    let old: Vec<String> = instances(&h, "demo").iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    let started = Instant::now();
    let (code, _, err) = h.cli(&["restart", "demo"]);
    assert_eq!(code, 0, "{err}");
    eventually(Duration::from_secs(30), "every instance replaced", || async {
        let now = instances(&h, "demo");
        now.len() == 2
            && now.iter().all(|i| i["ready"] == true && !old.contains(&i["id"].as_str().unwrap().to_string()))
    })
    .await;
    println!("rolling restart of 2 instances took {:?}", started.elapsed());
    let Report { ok, failed } = load.finish().await;
    println!("scale 2->4->2 and rolling restart: {ok} requests ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), failed.first());
    assert_eq!(halo_testkit::processes_of(h.data_dir.as_ref().unwrap()).len(), 2, "stopped instances left processes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_halo_then_restart_adopts_without_duplicates_or_orphans() {
    let mut h = Halo::up(BIN, &node(3)).unwrap();
    all_ready(&h, "demo", 3).await;
    let data = h.data_dir.clone().unwrap();
    let mut before = halo_testkit::processes_of(&data);
    before.sort();
    assert_eq!(before.len(), 3);
    h.restart().unwrap();
    all_ready(&h, "demo", 3).await;
    let mut after = halo_testkit::processes_of(&data);
    after.sort();
    assert_eq!(before, after, "instances were restarted or duplicated instead of adopted");
    let pids: Vec<i64> = ready_pids(&h, "demo");
    assert_eq!(pids, before.iter().map(|p| *p as i64).collect::<Vec<_>>());
    // An adopted instance is still supervised: killed, it comes back.
    kill(pids[0], "KILL");
    eventually(Duration::from_secs(10), "adopted instance restarted", || async {
        let p = ready_pids(&h, "demo");
        p.len() == 3 && !p.contains(&pids[0])
    })
    .await;
    assert_eq!(halo_testkit::processes_of(&data).len(), 3);
    assert_eq!(Client::new().get(&h.url("http", "/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_and_change_nothing() {
    let h = Halo::up(BIN, &node(1)).unwrap();
    all_ready(&h, "demo", 1).await;
    let bad = h.dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"demo\"\nreplicas = 2\n[run]\ncommand = \"halo\"\n[restart]\npolicy = \"sometimes\"\n",
    )
    .unwrap();
    let (code, _, err) = h.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("restart.policy") && err.contains("always, on-failure, never"), "{err}");
    // The API refuses it the same way when the CLI is bypassed.
    let req = Request::put(h.api_url("/v1/services"))
        .header("authorization", format!("Bearer {}", h.token()))
        .body(Full::from(std::fs::read_to_string(&bad).unwrap()))
        .unwrap();
    let r = Client::new().send(req).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("restart.policy"), "{}", r.body);
    let (code, _, err) = h.cli(&["scale", "demo", "5000"]);
    assert_ne!(code, 0);
    assert!(err.contains("replicas"), "{err}");
    let (code, stored, _) = h.cli(&["get", "demo"]);
    assert_eq!(code, 0);
    assert!(stored.contains("replicas = 1") && stored.contains("demo-app"), "the stored spec changed: {stored}");
    let (code, _, err) = h.cli(&["scale", "nope", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("no service named 'nope'"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = instances(&h, "demo");
    assert_eq!(all.len(), 1, "a refused change changed the service");
    assert_eq!(all[0]["restarts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_token_and_keeps_it_private() {
    let h = Halo::up(BIN, &node(1)).unwrap();
    let c = Client::new();
    assert_eq!(c.get(&h.api_url("/healthz")).await.unwrap().status, 200);
    let r = c.get(&h.api_url("/v1/status")).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.body.contains("Authorization: Bearer"), "{}", r.body);
    let wrong =
        Request::get(h.api_url("/metrics")).header("authorization", "Bearer nope").body(Full::default()).unwrap();
    assert_eq!(c.send(wrong).await.unwrap().status, 401);
    let right = Request::get(h.api_url("/metrics"))
        .header("authorization", format!("Bearer {}", h.token()))
        .body(Full::default())
        .unwrap();
    let m = c.send(right).await.unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains("halo_instance_restarts_total") && m.body.contains("halo_route_requests_total"),
        "{}",
        m.body
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.data_dir.as_ref().unwrap().join("token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The read-only token reads, and nothing else.
    let read_file = h.data_dir.as_ref().unwrap().join("read-token");
    assert_eq!(std::fs::metadata(&read_file).unwrap().permissions().mode() & 0o777, 0o600);
    let read = std::fs::read_to_string(&read_file).unwrap().trim().to_string();
    assert_ne!(read, h.token());
    let with = |method: &str, path: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(h.api_url(path))
            .header("authorization", format!("Bearer {read}"))
            .body(Full::from(body.to_string()))
            .unwrap()
    };
    for path in ["/v1/status", "/metrics", "/v1/events", "/v1/traffic", "/v1/nodes"] {
        assert_eq!(c.send(with("GET", path, "")).await.unwrap().status, 200, "{path} with the read-only token");
    }
    let apply = c.send(with("PUT", "/v1/services", "name = \"x\"\n[run]\ncommand = \"true\"\n")).await.unwrap();
    assert_eq!(apply.status, 403);
    assert!(apply.body.contains("read-only") && apply.body.contains("admin token"), "{}", apply.body);
    assert_eq!(c.send(with("GET", "/v1/backup", "")).await.unwrap().status, 403, "the archive holds the tokens");
    assert_eq!(c.send(with("POST", "/v1/services/demo/restart", "")).await.unwrap().status, 403);
    let out = std::process::Command::new(BIN)
        .args(["scale", "demo", "2", "--data-dir"])
        .arg(h.data_dir.as_ref().unwrap())
        .env("HALO_TOKEN", &read)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("read-only"), "{err}");
    let mode = std::fs::metadata(h.data_dir.as_ref().unwrap()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data directory is readable by others");
}

#[test]
fn check_validates_node_and_service_files() {
    let dir = halo_testkit::TempDir::new("check-up");
    let run = |f: &std::path::Path| std::process::Command::new(BIN).args(["check", "-c"]).arg(f).output().unwrap();
    let svc = dir.write("svc.toml", "name = \"web\"\n[run]\ncommand = \"x\"\n[readiness]\ninterval = \"fast\"\n");
    let out = run(&svc);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("readiness.interval") && err.contains("unit"), "{err}");
    let bad_node = dir.write("node.toml", &node(1).replace("workers = 2", "workers = 0"));
    let out = run(&bad_node);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node.toml:11"), "{err}");
    let good = dir.write("good.toml", &node(2));
    let out = run(&good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 services"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_port_was_taken_moves_to_another() {
    // A long first backoff leaves time to take the port.
    let h = Halo::up(BIN, &node(1).replace("backoff_initial = \"200ms\"", "backoff_initial = \"1s\"")).unwrap();
    all_ready(&h, "demo", 1).await;
    let i = instances(&h, "demo")[0].clone();
    let (pid, port) = (i["pid"].as_i64().unwrap(), i["port"].as_u64().unwrap() as u16);
    kill(pid, "KILL");
    eventually(Duration::from_secs(5), "the port free again", || async {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
    .await;
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    eventually(Duration::from_secs(15), "the instance ready on another port", || async {
        let i = instances(&h, "demo")[0].clone();
        i["ready"] == true && i["port"].as_u64() != Some(port as u64)
    })
    .await;
    let r = Client::new().get(&h.url("http", "/")).await.unwrap();
    assert_eq!(r.status, 200, "the proxy did not follow the new port: {}", r.body);
    drop(squatter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_streams_and_delete_stops_everything() {
    let h = Halo::up(BIN, &node(1)).unwrap();
    let app = "name = \"ticker\"\nreplicas = 2\n[run]\ncommand = \"sh\"\n\
               args = [\"-c\", \"i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done\"]\n\
               [readiness]\nexec = [\"true\"]\n";
    let f = h.dir.join("ticker.toml");
    std::fs::write(&f, app).unwrap();
    assert_eq!(h.cli(&["apply", "-f", f.to_str().unwrap()]).0, 0);
    all_ready(&h, "ticker", 2).await;
    // `halo logs -f` keeps streaming: new lines arrive after it started.
    let data = h.data_dir.clone().unwrap();
    let mut follow = std::process::Command::new(BIN)
        .args(["logs", "ticker", "-f", "-n", "1", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out).lines().map_while(Result::ok).take(12).collect::<Vec<String>>()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let lines = reader.join().unwrap();
    assert_eq!(lines.len(), 12, "follow stopped streaming: {lines:?}");
    let ids: std::collections::HashSet<&str> = lines.iter().filter_map(|l| l.split(" | ").next()).collect();
    assert_eq!(ids.len(), 2, "lines from both instances, prefixed with their ids: {lines:?}");
    // Delete: instances drained and stopped, processes gone, routes gone.
    let (code, out, _) = h.cli(&["delete", "ticker"]);
    assert_eq!(code, 0);
    assert!(out.contains("ticker: deleted"), "{out}");
    eventually(Duration::from_secs(15), "ticker's processes gone", || async {
        instances(&h, "ticker").is_empty() && halo_testkit::processes_of(&data).len() == 1
    })
    .await;
    let (code, _, err) = h.cli(&["delete", "ticker"]);
    assert_ne!(code, 0);
    assert!(err.contains("no service named 'ticker'"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_leaves_instances_for_the_next_halo_and_sigterm_stops_them() {
    let h = Halo::up(BIN, &node(2)).unwrap();
    all_ready(&h, "demo", 2).await;
    let data = h.data_dir.clone().unwrap();
    let mut before = halo_testkit::processes_of(&data);
    before.sort();
    h.signal("QUIT");
    let (code, mut h) = tokio::task::spawn_blocking(move || {
        let mut h = h;
        (h.wait(Duration::from_secs(15)), h)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "halo did not exit cleanly on SIGQUIT");
    let mut after = halo_testkit::processes_of(&data);
    after.sort();
    assert_eq!(before, after, "SIGQUIT stopped or restarted instances");
    // The next halo adopts them.
    h.restart().unwrap();
    all_ready(&h, "demo", 2).await;
    let mut adopted = halo_testkit::processes_of(&data);
    adopted.sort();
    assert_eq!(before, adopted);
    // SIGTERM drains and stops every instance, then halo exits.
    let code = h.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0));
    assert!(halo_testkit::processes_of(&data).is_empty(), "SIGTERM left instances running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_rolls_out_under_load_and_a_broken_one_takes_no_capacity() {
    let h = Halo::up(BIN, &node(2)).unwrap();
    all_ready(&h, "demo", 2).await;
    let url = h.url("http", "/");
    let spec = |version: &str, readiness: &str| {
        format!(
            "name = \"demo\"\nreplicas = 2\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\", \"--version\", \"{version}\"]\n\
             [readiness]\n{readiness}\ninterval = \"200ms\"\n[[routes]]\npath_prefix = \"/\"\n"
        )
    };
    let load = Load::start(&url, 2);
    // v2: replaces v1 one instance at a time.
    let f = h.dir.join("v2.toml");
    std::fs::write(&f, spec("v2", "http = \"/healthz\"")).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("demo: updated"), "{out}");
    let c = Client::new();
    eventually(Duration::from_secs(30), "every answer from v2", || async {
        let all = instances(&h, "demo");
        let v2_only = all.len() == 2 && all.iter().all(|i| i["current"] == true && i["ready"] == true);
        v2_only && c.get(&url).await.is_ok_and(|r| r.body.starts_with("demo-app v2"))
    })
    .await;
    // v3 never becomes ready: one v3 instance is tried, both v2 stay.
    let f = h.dir.join("v3.toml");
    std::fs::write(&f, spec("v3", "exec = [\"false\"]")).unwrap();
    assert_eq!(h.cli(&["apply", "-f", f.to_str().unwrap()]).0, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = instances(&h, "demo");
    let old_ready = all.iter().filter(|i| i["current"] == false && i["ready"] == true).count();
    let new = all.iter().filter(|i| i["current"] == true).count();
    assert_eq!((old_ready, new), (2, 1), "a broken version took capacity: {all:?}");
    for _ in 0..10 {
        assert!(c.get(&url).await.unwrap().body.starts_with("demo-app v2"));
    }
    let Report { ok, failed } = load.finish().await;
    println!("rollout v1 -> v2 and a stuck v3: {ok} requests ok, {} failed", failed.len());
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), failed.first());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_without_a_file_flag_reads_halo_toml_in_the_working_directory() {
    let dir = halo_testkit::TempDir::new("up-default");
    dir.write("halo.toml", &node(1));
    let h = Halo::start(BIN, &["up", "--data-dir", "data"], &dir.0).unwrap();
    assert_eq!(h.data_dir.as_deref(), Some(dir.0.join("data").canonicalize().unwrap().as_path()));
    all_ready(&h, "demo", 1).await;
    assert_eq!(Client::new().get(&h.url("http", "/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_names_cannot_leave_the_log_directory() {
    let h = Halo::up(BIN, &node(1)).unwrap();
    all_ready(&h, "demo", 1).await;
    let get = |path: &str| {
        Request::get(h.api_url(path))
            .header("authorization", format!("Bearer {}", h.token()))
            .body(Full::default())
            .unwrap()
    };
    let c = Client::new();
    // `..%2F..` decodes to a path that would climb out of logs/.
    let r = c.send(get("/v1/services/..%2F..%2Fetc/logs")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("lowercase letters, digits and '-'"), "{}", r.body);
    let r = c.send(get("/v1/services/demo/logs?instance=..%2F..%2Ftoken")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not an instance id"), "{}", r.body);
    // Reading the logs of a service with none creates nothing.
    let r = c.send(get("/v1/services/nothing-here/logs")).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(!h.data_dir.as_ref().unwrap().join("logs/nothing-here").exists(), "a read created a directory");
    let r = c.send(get("/v1/services/demo/logs?lines=5")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_file_serves_a_service_over_https_and_over_a_tcp_listener() {
    let ca = halo_testkit::TestCa::new();
    let certs = halo_testkit::TempDir::new("up-tls");
    let (crt, key) = ca.issue(&["demo.test"]).write(&certs, "demo");
    let extra = format!(
        "[[listeners]]\nname = \"https\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [listeners.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\n\
         [[listeners]]\nname = \"tcp\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"demo\"\n\n",
        crt.display(),
        key.display()
    );
    // The listeners go before the services (TOML tables end at the next header).
    let text = node(2).replacen("[[services]]", &format!("{extra}[[services]]"), 1);
    let h = Halo::up(BIN, &text).unwrap();
    all_ready(&h, "demo", 2).await;
    // HTTPS: the service's route, behind the node file's certificate.
    let client = ca.client(&[b"http/1.1"]);
    let r = halo_testkit::https_get(h.listeners["https"], "demo.test", "/", &client).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("demo-app v1"), "{r:?}");
    // TCP: bytes to the service's instances, balanced over both.
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(h.listeners["tcp"]).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        pids.insert(out.split("instance ").nth(1).map(|p| p.trim().to_string()).unwrap_or_default());
    }
    assert_eq!(pids.len(), 2, "the tcp listener used {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrades_of_a_node_under_load_fail_nothing_and_keep_its_instances() {
    let h = Halo::up(BIN, &node(2)).unwrap();
    all_ready(&h, "demo", 2).await;
    let pids = ready_pids(&h, "demo");
    let data = h.data_dir.clone().unwrap();
    let mut reaper = halo_testkit::Reaper::default();
    let load = Load::start(&h.url("http", "/"), 16);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut serving = h.pid();
    for i in 0..3 {
        let pid = halo_testkit::upgrade(BIN, &["--data-dir".as_ref(), data.as_os_str()])
            .unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        reaper.0.push(pid);
        let old = serving;
        eventually(
            Duration::from_secs(20),
            "the old node drained and exited",
            || async move { !halo_testkit::alive(old) },
        )
        .await;
        serving = pid;
        // The new process adopted the instances: same processes, no restart
        // (a restart has new pids, and this never holds); its API (the same
        // socket) answers with the same token. Waited for, not sampled: on a
        // busy machine an adopted instance may miss a probe on the way.
        let what = format!("upgrade {i}: the same instances ready");
        eventually(Duration::from_secs(20), &what, || async { ready_pids(&h, "demo") == pids }).await;
    }
    let Report { ok, failed } = load.finish().await;
    println!("requests across 3 node upgrades: ok {ok}, failed {}", failed.len());
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    assert!(ok > 200, "load too light: {ok}");
    // The instances belong to the last process now: stop it for real.
    let _ = std::process::Command::new("kill").arg("-TERM").arg(serving.to_string()).status();
    eventually(Duration::from_secs(20), "the last node stopped its instances", || async {
        pids.iter().all(|p| !halo_testkit::alive(*p as i32))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_rate_limit_answers_429_through_the_node_proxy() {
    // The quickstart's last table is demo's route: [services.balance] joins demo.
    let h = Halo::up(BIN, &format!("{}\n[services.balance]\nrate_limit = \"3/m\"\n", node(1))).unwrap();
    all_ready(&h, "demo", 1).await;
    let c = Client::new();
    let url = h.url("http", "/");
    for _ in 0..3 {
        assert_eq!(c.get(&url).await.unwrap().status, 200);
    }
    let r = c.get(&url).await.unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    let bad = h.cli_with_input(
        &["apply", "-f", "-"],
        "name = \"demo\"\n[run]\ncommand = \"halo\"\n[balance]\nrate_limit = \"3 per minute\"\n",
    );
    assert_ne!(bad.0, 0);
    assert!(bad.2.contains("balance.rate_limit") && bad.2.contains("N/s, N/m or N/h"), "{}", bad.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_with_the_way_back_from_the_newest_backup() {
    let mut h = Halo::up(BIN, &node(1)).unwrap();
    all_ready(&h, "demo", 1).await;
    let data = h.data_dir.clone().unwrap();
    let file = h.config.clone().unwrap();
    let archive = data.join("backups").join("halo-backup-1700000000000-r1.tar");
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    let (code, _, err) = h.cli(&["backup", "create", "--out", &archive.to_string_lossy()]);
    assert_eq!(code, 0, "{err}");
    h.signal("TERM");
    assert!(h.wait(Duration::from_secs(20)).is_some(), "halo did not stop");
    // A torn write: the file ends early.
    let store = data.join("store.redb");
    let len = std::fs::metadata(&store).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&store).unwrap().set_len(len / 3).unwrap();
    let damaged = std::fs::read(&store).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["up", "-c", &file.to_string_lossy(), "--data-dir", &data.to_string_lossy()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is damaged") && err.contains("halo has not changed it"), "{err}");
    assert_eq!(std::fs::read(&store).unwrap(), damaged, "the damaged file was changed");
    // The message names the way back; following it brings the service back.
    let restored = data.with_file_name("data-restored");
    let restore = format!("halo backup restore {} --into {}", archive.display(), restored.display());
    assert!(err.contains(&restore), "{err}");
    let out = std::process::Command::new(BIN)
        .args(["backup", "restore", &archive.to_string_lossy(), "--into", &restored.to_string_lossy()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut back =
        Halo::start(BIN, &["up", "-c", &file.to_string_lossy(), "--data-dir", &restored.to_string_lossy()], &h.dir)
            .unwrap();
    back.data_dir = Some(restored);
    all_ready(&back, "demo", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_tls_answers_only_https_and_the_cli_checks_its_certificate() {
    use halo_testkit::{https_get, node_tls, TempDir, TestCa};
    let (ca, other) = (TestCa::new(), TestCa::new());
    let dir = TempDir::new("api-tls");
    let (cert, key) = ca.issue(&["127.0.0.1"]).write(&dir, "api");
    let ca_file = dir.write("ca.pem", &ca.ca_pem());
    let other_ca = dir.write("other-ca.pem", &other.ca_pem());
    let h = Halo::up(BIN, &(node(1) + &node_tls(&cert, &key, &ca_file))).unwrap();
    let api = h.api.unwrap();
    // HTTPS with the node's certificate; plain HTTP gets no answer.
    let trusted = ca.client(&[b"h2", b"http/1.1"]);
    let r = https_get(api, "127.0.0.1", "/healthz", &trusted).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.alpn.as_deref(), Some(&b"http/1.1"[..]), "the API speaks HTTP/1.1 only");
    assert!(Client::new().get(&format!("http://{api}/healthz")).await.is_err(), "plain HTTP answered");
    // A client trusting another CA is refused in the handshake.
    assert!(https_get(api, "127.0.0.1", "/healthz", &other.client(&[b"http/1.1"])).await.is_err());
    // The CLI finds https:// and the CA in the data directory...
    let (code, out, err) = h.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("demo"), "{out}");
    let data = h.data_dir.clone().unwrap();
    assert!(std::fs::read_to_string(data.join("api.addr")).unwrap().starts_with("https://"));
    // ...and says what is wrong with another CA, or none.
    let url = format!("https://{api}");
    let (code, _, err) = h.cli(&["status", "--api", &url, "--api-ca", &other_ca.to_string_lossy()]);
    assert!(code != 0 && err.contains("TLS with the halo API") && err.contains("--api-ca"), "{err}");
    let (code, _, err) = h.cli(&["status", "--api", &url, "--api-ca", "/nonexistent/ca.pem"]);
    assert!(code != 0 && err.contains("--api-ca FILE") && err.contains("/nonexistent/ca.pem"), "{err}");
    let (code, _, err) = h.cli(&["status", "--api", "ftp://x"]);
    assert!(code != 0 && err.contains("https://IP:PORT"), "{err}");
    // A self-signed certificate (openssl req -x509: it says it is a CA) is
    // its own `ca`: the CLI trusts exactly that certificate.
    let own = TestCa::self_signed(&["127.0.0.1"]);
    let (own_cert, own_key) = own.write(&dir, "own");
    let h2 = Halo::up(BIN, &(node(1) + &node_tls(&own_cert, &own_key, &own_cert))).unwrap();
    let (code, out, err) = h2.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    // A node file whose certificate cannot be read is refused, naming it.
    let bad = format!("{}\n[node.tls]\ncert = \"/nonexistent/api.crt\"\nkey = \"{}\"\n", node(1), key.display());
    let f = dir.write("bad.toml", &bad);
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("node.tls") && err.contains("/nonexistent/api.crt"), "{err}");
}
