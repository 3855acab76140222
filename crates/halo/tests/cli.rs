//! The operator's side of halo through the real binary: errors in files
//! that say where and what, the read commands' output formats, dry runs,
//! standard input, logs that follow new instances, readiness reasons,
//! what the node logs, version, completions and manual pages.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use halo_testkit::{eventually, Halo, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn halo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Starts a following CLI verb (`logs -f`, `events -f`) against `h`; its
/// lines arrive on the receiver. Kill the child when done.
fn follow(h: &Halo, args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(h.data_dir.as_ref().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// Waits until the node's first service has `n` ready instances.
async fn ready(h: &Halo, n: u64) {
    eventually(Duration::from_secs(20), &format!("{n} ready instances"), || async {
        h.status()["services"][0]["ready"].as_u64() == Some(n)
    })
    .await;
}

#[test]
fn file_errors_are_all_reported_with_line_column_field_and_a_suggestion() {
    let dir = TempDir::new("cli-errors");
    let svc = dir.write(
        "svc.toml",
        "name = \"web\"\nreplicas = \"three\"\n[run]\ncommand = \"x\"\nagrs = [\"a\"]\n[readiness]\n  interval = \"fast\"\n",
    );
    let f = svc.to_string_lossy().to_string();
    for args in [vec!["check", "-c", &f], vec!["apply", "-f", &f]] {
        let (ok, _, err) = halo(&args);
        assert!(!ok);
        let lines: Vec<&str> = err.trim().lines().collect();
        assert_eq!(lines.len(), 3, "every error, one per line: {err}");
        assert!(lines[0].contains(&format!("{f}:2:12: replicas: expected a whole number")), "{err}");
        assert!(lines[0].contains("found string \"three\""), "{err}");
        assert!(lines[1].contains(&format!("{f}:5:1: run.agrs: unknown field 'agrs' (did you mean 'args'?)")), "{err}");
        assert!(lines[2].contains(&format!("{f}:7:3: readiness.interval: 'fast' is not a duration")), "{err}");
        assert!(!err.contains("Some(") && !err.contains("(syntax)"), "{err}");
    }
    // A file given to the wrong command is named for what it is.
    let node = dir.write("node.toml", &halo_testkit::quickstart(1));
    let (ok, _, err) = halo(&["apply", "-f", &node.to_string_lossy()]);
    assert!(!ok && err.contains("this is a node file") && err.contains("`halo up -c FILE`"), "{err}");
    let (ok, _, err) = halo(&["proxy", "-c", &node.to_string_lossy()]);
    assert!(!ok && err.contains("this is a node file"), "{err}");
    let (ok, _, err) = halo(&["up", "-c", &svc.to_string_lossy(), "--data-dir", &dir.0.join("d").to_string_lossy()]);
    assert!(!ok && err.contains("this is a service file") && err.contains("`halo apply -f FILE`"), "{err}");
    // A node file without listeners: no line 0.
    let empty = dir.write("empty.toml", "[node]\napi = \"127.0.0.1:0\"\n");
    let (ok, _, err) = halo(&["check", "-c", &empty.to_string_lossy()]);
    assert!(!ok && err.contains("empty.toml: listeners:") && !err.contains(":0:"), "{err}");
    // A replica count is checked against the real limit.
    let (ok, _, err) = halo(&["scale", "demo", "-1"]);
    assert!(!ok && err.contains("accepted: 0 to 1000"), "{err}");
    // An unreachable node is said once, with its cause once.
    let out = Command::new(BIN).args(["status", "--api", "127.0.0.1:1"]).env("HALO_TOKEN", "x").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.matches("Connection refused").count() == 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_commands_print_tables_wide_json_and_yaml_from_one_typed_view() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(2)).unwrap();
    ready(&h, 2).await;
    let (code, table, _) = h.cli(&["status"]);
    assert_eq!(code, 0);
    let head = table.lines().find(|l| l.starts_with("INSTANCE")).expect("an instance table");
    for col in ["SERVICE", "STATE", "READY", "PID", "PORT", "RESTARTS", "LAST EXIT"] {
        assert!(head.contains(col), "{table}");
    }
    assert!(!head.contains("AGE"), "{table}");
    // Aligned: every row's STATE starts where the header's does.
    let at = head.find("STATE").unwrap();
    for row in table.lines().filter(|l| l.starts_with("demo-")) {
        assert_eq!(&row[at..at + 7], "running", "{table}");
    }
    let (_, wide, _) = h.cli(&["status", "-o", "wide"]);
    assert!(wide.contains("AGE") && wide.contains("PROBE FAILURES"), "{wide}");
    let (_, json, _) = h.cli(&["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["services"][0]["instances"].as_array().unwrap().len(), 2);
    let (_, yaml, _) = h.cli(&["status", "-o", "yaml"]);
    assert!(yaml.starts_with("backup: null\ncluster:\n") && yaml.contains("\nservices:\n- instances:\n"), "{yaml}");
    let (_, nodes, _) = h.cli(&["node", "list"]);
    assert!(nodes.contains("LEADER") && nodes.lines().any(|l| l.contains("local") && l.contains("yes")), "{nodes}");
    assert!(!nodes.contains("LEASE"), "lease ids are for -o wide: {nodes}");
    let (_, nodes_wide, _) = h.cli(&["node", "list", "-o", "wide"]);
    assert!(nodes_wide.contains("LEASE") && nodes_wide.contains("CAPACITY"), "{nodes_wide}");
    let (_, got, _) = h.cli(&["get", "demo", "-o", "json"]);
    let g: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!((g["name"].as_str(), g["replicas"].as_u64()), (Some("demo"), Some(2)));
    let (_, vips, _) = h.cli(&["vip", "list", "-o", "yaml"]);
    assert_eq!(vips.trim(), "[]");
    let (code, _, err) = h.cli(&["status", "-o", "xml"]);
    assert!(code != 0 && err.contains("table") && err.contains("yaml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_takes_standard_input_and_a_dry_run_shows_the_diff_and_changes_nothing() {
    let h = Halo::up_logged(BIN, &halo_testkit::quickstart(1)).unwrap();
    let (_, stored, _) = h.cli(&["get", "demo"]);
    let (code, plan, err) =
        h.cli_with_input(&["apply", "-f", "-", "--dry-run"], &stored.replace("replicas = 1", "replicas = 2"));
    assert_eq!(code, 0, "{err}");
    assert!(plan.contains("demo: would be updated (dry run)"), "{plan}");
    assert!(plan.contains("- replicas = 1\n+ replicas = 2\n"), "{plan}");
    assert!(h.cli(&["get", "demo"]).1.contains("replicas = 1"), "a dry run changed the service");
    let (_, same, _) = h.cli_with_input(&["apply", "-f", "-", "--dry-run"], &stored);
    assert!(same.contains("demo: unchanged"), "{same}");
    let web =
        "name = \"web\"\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\"]\n[[routes]]\nhost = \"web.localhost\"\n";
    let (code, out, err) = h.cli_with_input(&["apply", "-f", "-"], web);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "web: created\n");
    // A second service on the same host and path would never get traffic.
    let (code, _, err) = h.cli_with_input(&["apply", "-f", "-"], &web.replace("name = \"web\"", "name = \"web2\""));
    assert!(code != 0 && err.contains("service 'web' already routes web.localhost"), "{err}");
    let (code, _, err) = h.cli(&["get", "web2"]);
    assert!(code != 0 && err.contains("no service named 'web2'"), "{err}");
    // Every change is logged with who asked.
    let log = h.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("api change") && l.contains("path=/v1/services") && l.contains("from=127.0.0.1:")),
        "{log}"
    );
    assert!(log.contains("api change refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_gets_ready_says_why_and_exits_are_logged_with_their_status() {
    let h = Halo::up_logged(BIN, &halo_testkit::quickstart(1)).unwrap();
    // Listens on a port of its own, not $PORT: its readiness never passes.
    let deaf = "name = \"deaf\"\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\", \"--port\", \"0\"]\n\
                [readiness]\ninterval = \"100ms\"\n[[routes]]\nhost = \"deaf.localhost\"\n";
    assert_eq!(h.cli_with_input(&["apply", "-f", "-"], deaf).0, 0);
    let crashy = "name = \"crashy\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"exit 3\"]\n\
                  [restart]\nbackoff_initial = \"100ms\"\n[[routes]]\nhost = \"crashy.localhost\"\n";
    assert_eq!(h.cli_with_input(&["apply", "-f", "-"], crashy).0, 0);
    eventually(Duration::from_secs(20), "the reason in halo status", || async {
        let t = h.cli(&["status"]).1;
        t.contains("not ready, last failed check:") && t.contains("readiness: connect:")
    })
    .await;
    eventually(Duration::from_secs(20), "a warning for the exit, the probe and the crash loop", || async {
        let log = h.log_text();
        let exit = log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("instance ended") && l.contains("exited with status 3"));
        let probe =
            log.lines().any(|l| l.contains("WARN") && l.contains("probe failing") && l.contains("instance=deaf-"));
        exit && probe && log.contains("crash loop")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_picks_up_instances_started_after_it_began() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    ready(&h, 1).await;
    let (mut follow, rx) = follow(&h, &["logs", "demo", "-f"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(h.cli(&["scale", "demo", "2"]).0, 0);
    ready(&h, 2).await;
    let ids: Vec<String> = h.status()["services"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while std::time::Instant::now() < deadline && !ids.iter().all(|id| seen.contains(&format!("{id} | "))) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&l);
            seen.push('\n');
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    for id in &ids {
        assert!(seen.contains(&format!("{id} | demo-app")), "{id} missing from the followed logs:\n{seen}");
    }
}

#[test]
fn version_completions_and_manual_pages() {
    let (ok, version, _) = halo(&["--version"]);
    assert!(ok && version.starts_with("halo ") && version.contains("(commit "), "{version}");
    let (ok, bash, _) = halo(&["completions", "bash"]);
    assert!(ok && bash.contains("_halo()") && bash.contains("rollout"), "{}", &bash[..bash.len().min(300)]);
    let (ok, zsh, _) = halo(&["completions", "zsh"]);
    assert!(ok && zsh.starts_with("#compdef halo"), "{}", &zsh[..zsh.len().min(300)]);
    let (ok, _, err) = halo(&["completions", "tcsh"]);
    assert!(!ok && err.contains("bash"), "{err}");
    let dir = TempDir::new("man");
    let (ok, _, err) = halo(&["man", "--dir", &dir.0.to_string_lossy()]);
    assert!(ok, "{err}");
    for page in ["halo.1", "halo-up.1", "halo-apply.1", "halo-rollout-status.1"] {
        let text = std::fs::read_to_string(dir.0.join(page)).unwrap_or_default();
        assert!(text.starts_with(".ie \\n(.g .ds Aq") || text.contains(".TH "), "{page}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_what_happened_and_follow_what_happens() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    ready(&h, 1).await;
    let (mut follow, rx) = follow(&h, &["events", "-f", "-o", "json"]);
    let pid = h.status()["services"][0]["instances"][0]["pid"].as_i64().unwrap();
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert_eq!(h.cli(&["scale", "demo", "2"]).0, 0);
    let mut kinds = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline
        && !(kinds.contains(&"exited".to_string()) && kinds.contains(&"scaled".to_string()))
    {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let e: serde_json::Value = serde_json::from_str(&l).expect("one JSON event a line");
            kinds.push(e["kind"].as_str().unwrap_or_default().to_string());
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(kinds.contains(&"elected".to_string()), "the recent events come first: {kinds:?}");
    assert!(kinds.contains(&"exited".to_string()) && kinds.contains(&"scaled".to_string()), "{kinds:?}");
    let (_, table, _) = h.cli(&["events"]);
    let exit = table.lines().find(|l| l.contains("exited")).unwrap_or_default();
    assert!(exit.contains("warning") && exit.contains("killed by SIGKILL"), "{table}");
    assert!(table.lines().next().unwrap_or_default().starts_with("AGE"), "{table}");
    let (_, only, _) = h.cli(&["events", "--service", "nope"]);
    assert_eq!(only, "no events in the last hour\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_when_a_change_is_done_or_says_how_it_failed() {
    let h = Halo::up(BIN, &halo_testkit::quickstart(1)).unwrap();
    let (code, out, err) = h.cli(&["scale", "demo", "2", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("demo: 2 of 2 ready") && out.contains("done after"), "{out}");
    let status = h.status();
    let ready = status["services"][0]["instances"].as_array().unwrap().iter().filter(|i| i["ready"] == true).count();
    assert_eq!(ready, 2, "--wait returned before both were ready");
    let ids = |s: &serde_json::Value| -> Vec<(String, bool, bool)> {
        let list = s["services"][0]["instances"].as_array().unwrap();
        list.iter()
            .filter(|i| i["stopping"] != true)
            .map(|i| (i["id"].as_str().unwrap().to_string(), i["ready"] == true, i["current"] == true))
            .collect()
    };
    let before = ids(&status);
    let (code, out, err) = h.cli(&["restart", "demo", "--wait"]);
    assert_eq!(code, 0, "{err}");
    // What it printed between polls depends on how fast the instances
    // start; what it waited for does not: two ready instances of the new
    // revision, none of the old left (but some may still be stopping).
    assert!(out.starts_with("demo: ") && out.contains("done after"), "{out}");
    let after = ids(&h.status());
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|(id, ready, current)| *ready && *current && !before.iter().any(|b| &b.0 == id)),
        "--wait returned before the restart replaced both: {before:?} then {after:?}"
    );
    let crashy = "name = \"crashy\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"exit 3\"]\n\
                  [restart]\nbackoff_initial = \"50ms\"\n[[routes]]\nhost = \"crashy.localhost\"\n";
    let (code, _, err) = h.cli_with_input(&["apply", "-f", "-", "--wait", "--timeout", "60s"], crashy);
    assert!(code != 0 && err.contains("failed: crashy-") && err.contains("restarts too often"), "{err}");
    let (code, out, err) = h.cli(&["delete", "crashy", "--wait"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("done after"), "{out}");
    let (code, _, err) = h.cli(&["scale", "demo", "3", "--wait", "--timeout", "1ms"]);
    assert!(code != 0 && err.contains("gave up after"), "{err}");
}

/// `halo demo-app --workers N` is a backend of fixed capacity (the
/// overload benchmark's): with one worker and 300 ms per answer, three
/// requests sent at once are answered one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_serves_at_most_its_workers_at_once() {
    let addr = halo_testkit::free_addr();
    let port = addr.port().to_string();
    let mut app = Command::new(BIN)
        .args(["demo-app", "--port", &port, "--workers", "1", "--delay-ms", "300"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = halo_testkit::Client::no_pool();
    let url = format!("http://{addr}/");
    let health = format!("http://{addr}/healthz");
    eventually(Duration::from_secs(10), "demo-app listening", || async { c.get(&health).await.is_ok() }).await;
    let start = std::time::Instant::now();
    let answers = (0..3).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let r = c.get(&url).await.unwrap();
            (r.status, start.elapsed())
        })
    });
    let mut times = Vec::new();
    for a in answers.collect::<Vec<_>>() {
        let (status, took) = a.await.unwrap();
        assert_eq!(status, 200);
        times.push(took);
    }
    times.sort();
    let _ = app.kill();
    let _ = app.wait();
    // One at a time: the k-th answer cannot come before k delays.
    for (k, t) in times.iter().enumerate() {
        assert!(*t >= Duration::from_millis(300 * (k as u64 + 1)), "answer {} after {t:?}: {times:?}", k + 1);
    }
    let (ok, _, err) = halo(&["demo-app", "--port", "1", "--workers", "0"]);
    assert!(!ok && err.contains("--workers"), "{err}");
}
