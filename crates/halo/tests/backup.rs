//! Backups through the real binary: an archive of a running `halo up`,
//! verified, restored into a new data directory after the old one is gone,
//! and the node converging to the same services; damaged and foreign
//! archives refused, naming what is wrong.

use std::time::Duration;

use halo_testkit::{eventually, Halo, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

fn node() -> String {
    halo_testkit::quickstart(2)
}

fn ready(h: &Halo) -> std::collections::BTreeMap<String, (u64, u64)> {
    let s = h.status();
    s["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["name"].as_str().unwrap().to_string(), (s["ready"].as_u64().unwrap(), s["replicas"].as_u64().unwrap()))
        })
        .collect()
}

/// SIGTERM: every instance drained and stopped, then halo exits cleanly.
async fn stop(h: Halo) {
    assert_eq!(h.terminate(Duration::from_secs(20)).await, Some(0));
}

fn halo(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_new_data_dir_and_the_node_converges() {
    let dir = TempDir::new("backup");
    let file = dir.write("halo.toml", &node());
    let data = dir.0.join("data");
    let up = |data: &std::path::Path| {
        Halo::start(BIN, &["up", "-c", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &dir.0).unwrap()
    };
    let h = up(&data);
    let ticker = dir.write(
        "ticker.toml",
        "name = \"ticker\"\nreplicas = 2\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"while true; do sleep 1; done\"]\n\
         [readiness]\nexec = [\"true\"]\ninterval = \"200ms\"\n",
    );
    assert_eq!(h.cli(&["apply", "-f", ticker.to_str().unwrap()]).0, 0);
    assert_eq!(h.cli(&["scale", "demo", "3"]).0, 0);
    let want: std::collections::BTreeMap<String, (u64, u64)> =
        [("demo".to_string(), (3, 3)), ("ticker".to_string(), (2, 2))].into();
    eventually(Duration::from_secs(20), "demo x3 and ticker x2 ready", || async { ready(&h) == want }).await;

    let archive = dir.0.join("b.tar");
    let (code, out, err) = h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("keys at store revision"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777, 0o600, "archives hold the token");
    let (ok, out, err) = halo(&["backup", "verify", archive.to_str().unwrap()]);
    assert!(ok && out.contains("ok") && out.contains("2 services"), "{out}{err}");
    let (ok, out, _) = halo(&["backup", "list", dir.0.to_str().unwrap()]);
    assert!(ok && out.contains("b.tar") && out.starts_with("FILE") && out.contains("yes"), "{out}");
    let (_, json, _) = halo(&["backup", "list", dir.0.to_str().unwrap(), "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let revision = listed[0]["revision"].as_i64().unwrap();

    // The node and its data are gone.
    stop(h).await;
    std::fs::remove_dir_all(&data).unwrap();

    let restored = dir.0.join("restored");
    let (ok, out, err) = halo(&["backup", "restore", archive.to_str().unwrap(), "--into", restored.to_str().unwrap()]);
    assert!(ok && out.contains("restored"), "{out}{err}");
    let (ok, _, err) = halo(&["backup", "restore", archive.to_str().unwrap(), "--into", restored.to_str().unwrap()]);
    assert!(!ok && err.contains("already holds a store"), "a restore over a store: {err}");
    let h = up(&restored);
    eventually(Duration::from_secs(30), "the same services and replicas after the restore", || async {
        ready(&h) == want
    })
    .await;
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(stored.contains("replicas = 3"), "{stored}");
    // Time only moves forward: the new leader's token is above the backup's revision.
    let token = h.status()["cluster"]["fencing_token"].as_i64().unwrap();
    assert!(token > revision, "fencing token {token} is not above the backed-up revision {revision}");
    // The restored API token still opens the API (it came with the archive).
    assert_eq!(h.cli(&["status"]).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_and_foreign_archives_are_refused_naming_what_is_wrong() {
    let dir = TempDir::new("backup-bad");
    let h = Halo::up(BIN, &node()).unwrap();
    eventually(Duration::from_secs(20), "demo ready", || async { ready(&h).get("demo") == Some(&(2, 2)) }).await;
    let archive = dir.0.join("good.tar");
    assert_eq!(h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]).0, 0);
    let good = std::fs::read(&archive).unwrap();
    let check = |name: &str, bytes: &[u8], says: &str| {
        let f = dir.write(name, "");
        std::fs::write(&f, bytes).unwrap();
        let (ok, out, err) = halo(&["backup", "verify", f.to_str().unwrap()]);
        assert!(!ok && err.contains(says), "verify {name}: {out}{err}");
        let target = dir.0.join(format!("{name}.restored"));
        let (ok, _, err) = halo(&["backup", "restore", f.to_str().unwrap(), "--into", target.to_str().unwrap()]);
        assert!(!ok && err.contains(says), "restore {name}: {err}");
        assert!(!target.exists(), "a refused restore created {}", target.display());
    };
    // One byte of the store member changed.
    let at = good.windows(8).position(|w| w == b"demo-app").expect("the service in the archive");
    let mut damaged = good.clone();
    damaged[at] ^= 0x20;
    check("damaged.tar", &damaged, "member store.jsonl is damaged");
    // A newer format.
    let at = good.windows(11).position(|w| w == b"\"format\": 1").expect("the manifest's format");
    let mut newer = good.clone();
    newer[at + 10] = b'9';
    check("newer.tar", &newer, "format 9 is newer");
    check("foreign.tar", b"this is no archive at all, just some text", "not a halo backup");
    // Nothing of the running node changed.
    assert_eq!(ready(&h).get("demo"), Some(&(2, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_are_verified_pruned_and_a_failure_shows() {
    let dir = TempDir::new("backup-sched");
    let archives = dir.0.join("archives");
    let text = format!("{}\n[backup]\nevery = \"1s\"\nkeep_last = 2\ndir = \"{}\"\n", node(), archives.display());
    let h = Halo::up(BIN, &text).unwrap();
    let metric = |name: &str| {
        let (_, out, _) = h.cli(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["backup"][name].clone()
    };
    eventually(Duration::from_secs(20), "two scheduled archives kept", || async {
        let ours = std::fs::read_dir(&archives)
            .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "tar")).count())
            .unwrap_or(0);
        ours == 2 && metric("last_success").as_u64().is_some() && metric("failures") == 0 && {
            tokio::time::sleep(Duration::from_secs(3)).await;
            true
        }
    })
    .await;
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&archives)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    assert_eq!(files.len(), 2, "retention keeps keep_last archives: {files:?}");
    // The schedule goes on meanwhile: check copies (an archive pruned since
    // the listing is skipped; at least one is left).
    let copies = dir.0.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    let mut checked = 0;
    for f in &files {
        let copy = copies.join(f.file_name().unwrap());
        if std::fs::copy(f, &copy).is_err() {
            continue;
        }
        let (ok, out, err) = halo(&["backup", "verify", copy.to_str().unwrap()]);
        assert!(ok, "{out}{err}");
        checked += 1;
    }
    assert!(checked >= 1, "no archive left to check");
    let token = std::fs::read_to_string(h.data_dir.as_ref().unwrap().join("token")).unwrap();
    let req = http::Request::get(h.api_url("/metrics"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(http_body_util::Full::default())
        .unwrap();
    let m = halo_testkit::Client::new().send(req).await.unwrap().body;
    assert!(
        m.contains("halo_backup_last_success_timestamp_seconds") && m.contains("halo_backup_failures_total 0"),
        "{m}"
    );
    drop(h);

    // A directory that cannot be made: failures, in status and metrics.
    let blocked = dir.write("a-file", "");
    let text = format!("{}\n[backup]\nevery = \"1s\"\ndir = \"{}/backups\"\n", node(), blocked.display());
    let h = Halo::up(BIN, &text).unwrap();
    eventually(Duration::from_secs(10), "a failed scheduled backup", || async {
        h.cli(&["status"]).1.contains("the last scheduled backup failed")
    })
    .await;
    let (_, table, _) = h.cli(&["status"]);
    assert!(table.contains("cannot create"), "{table}");
    drop(h);

    // A failing hook fails the scheduled backup too, and says which.
    let ok_dir = dir.0.join("ok");
    let text = format!("{}\n[backup]\nevery = \"1s\"\ndir = \"{}\"\n", node(), ok_dir.display());
    let h = Halo::up(BIN, &text).unwrap();
    let broken = dir.write(
        "broken.toml",
        "name = \"broken\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 1000\"]\n[readiness]\nexec = [\"true\"]\n\
         interval = \"200ms\"\n[backup]\ncommand = [\"no-such-dump-tool\"]\n",
    );
    assert_eq!(h.cli(&["apply", "-f", broken.to_str().unwrap()]).0, 0);
    eventually(Duration::from_secs(15), "the scheduled backup failing on the hook", || async {
        let t = h.cli(&["status"]).1;
        t.contains("service 'broken' failed") && t.contains("cannot run no-such-dump-tool")
    })
    .await;
    let req = http::Request::get(h.api_url("/metrics"))
        .header("authorization", format!("Bearer {}", h.token()))
        .body(http_body_util::Full::default())
        .unwrap();
    let m = halo_testkit::Client::new().send(req).await.unwrap().body;
    let failures: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("halo_backup_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("halo_backup_failures_total in /metrics");
    assert!(failures >= 1, "a failed scheduled backup is not counted: {failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_hooks_back_up_and_restore_the_applications_data() {
    let dir = TempDir::new("backup-hooks");
    let file = dir.write("halo.toml", &node());
    let data = dir.0.join("data");
    let up = |data: &std::path::Path| {
        Halo::start(BIN, &["up", "-c", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &dir.0).unwrap()
    };
    // The application's data, where its (unprivileged) user may write.
    let app_dir = dir.0.join("app");
    std::fs::create_dir(&app_dir).unwrap();
    let open = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777);
    std::fs::set_permissions(&app_dir, open).unwrap();
    let counter = app_dir.join("counter");
    let svc = |on_error: &str| {
        format!(
            "name = \"counter\"\n[run]\ncommand = \"halo\"\nargs = [\"demo-app\", \"--counter-file\", \"{c}\"]\n\
             env = {{ COUNTER = \"{c}\" }}\n[readiness]\nhttp = \"/healthz\"\ninterval = \"200ms\"\n\
             [[routes]]\nhost = \"counter.local\"\n\
             [backup]\ncommand = [\"sh\", \"-c\", \"cat \\\"$COUNTER\\\"\"]\nrestore = [\"sh\", \"-c\", \"cat > \\\"$COUNTER\\\"\"]\n\
             timeout = \"10s\"\non_error = \"{on_error}\"\n",
            c = counter.display()
        )
    };
    let h = up(&data);
    let f = dir.write("counter.toml", &svc("fail"));
    assert_eq!(h.cli(&["apply", "-f", f.to_str().unwrap()]).0, 0);
    eventually(Duration::from_secs(20), "counter ready", || async { ready(&h).get("counter") == Some(&(1, 1)) }).await;
    let c = halo_testkit::Client::new();
    let count = |method: http::Method| {
        let req = http::Request::builder()
            .method(method)
            .uri(h.url("http", "/count"))
            .header("host", "counter.local")
            .body(http_body_util::Full::default())
            .unwrap();
        c.send(req)
    };
    for _ in 0..5 {
        assert_eq!(count(http::Method::POST).await.unwrap().status, 200);
    }
    assert_eq!(count(http::Method::GET).await.unwrap().body.trim(), "5");
    // A hook that fails fails the backup, naming the service.
    let broken = dir.write(
        "broken.toml",
        "name = \"broken\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 1000\"]\n[readiness]\nexec = [\"true\"]\n\
         interval = \"200ms\"\n[backup]\ncommand = [\"sh\", \"-c\", \"echo disk full >&2; exit 3\"]\n",
    );
    assert_eq!(h.cli(&["apply", "-f", broken.to_str().unwrap()]).0, 0);
    eventually(Duration::from_secs(20), "broken ready", || async { ready(&h).get("broken") == Some(&(1, 1)) }).await;
    let archive = dir.0.join("b.tar");
    let (code, _, err) = h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert!(code != 0 && err.contains("service 'broken' failed") && err.contains("disk full"), "{err}");
    assert!(!archive.exists());
    assert_eq!(h.cli(&["delete", "broken"]).0, 0);
    let (code, out, err) = h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    // The node, its data and the application's data are gone.
    stop(h).await;
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_file(&counter).unwrap();

    let restored = dir.0.join("restored");
    let (ok, out, err) = halo(&["backup", "restore", archive.to_str().unwrap(), "--into", restored.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let h = up(&restored);
    eventually(Duration::from_secs(30), "the counter restored by its hook", || async {
        std::fs::read_to_string(&counter).is_ok_and(|s| s.trim() == "5")
    })
    .await;
    let c = halo_testkit::Client::new();
    let req = http::Request::get(h.url("http", "/count"))
        .header("host", "counter.local")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().body.trim(), "5");
    let input = restored.join("restore/counter.out");
    eventually(Duration::from_secs(5), "the restore hook's input removed once it ran", || async { !input.exists() })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_the_running_node_says_what_changes_then_does_it_with_force() {
    let dir = TempDir::new("backup-running");
    let h = Halo::up(BIN, &node()).unwrap();
    eventually(Duration::from_secs(20), "demo ready", || async { ready(&h).get("demo") == Some(&(2, 2)) }).await;
    let archive = dir.0.join("b.tar");
    assert_eq!(h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]).0, 0);
    // Changes after the backup: demo scaled down, a new service.
    assert_eq!(h.cli(&["scale", "demo", "1"]).0, 0);
    let extra = dir.write(
        "extra.toml",
        "name = \"extra\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 1000\"]\n[readiness]\nexec = [\"true\"]\n",
    );
    assert_eq!(h.cli(&["apply", "-f", extra.to_str().unwrap()]).0, 0);
    let (code, out, err) = h.cli(&["backup", "restore", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("would change")
            && out.contains("change: /halo/services/demo")
            && out.contains("delete: /halo/services/extra"),
        "{out}"
    );
    assert!(out.contains("--force"), "{out}");
    let (_, stored, _) = h.cli(&["get", "demo"]);
    assert!(stored.contains("replicas = 1"), "a restore without --force changed the service: {stored}");
    let (code, out, err) = h.cli(&["backup", "restore", archive.to_str().unwrap(), "--force"]);
    assert!(code == 0 && out.contains("restored into the running cluster"), "{out}{err}");
    eventually(Duration::from_secs(20), "demo x2 again, extra gone", || async {
        let r = ready(&h);
        r.get("demo") == Some(&(2, 2)) && !r.contains_key("extra")
    })
    .await;
    // A damaged archive changes nothing.
    let mut bad = std::fs::read(&archive).unwrap();
    let at = bad.windows(8).position(|w| w == b"demo-app").unwrap();
    bad[at] ^= 0x20;
    let f = dir.write("bad.tar", "");
    std::fs::write(&f, &bad).unwrap();
    let (code, _, err) = h.cli(&["backup", "restore", f.to_str().unwrap(), "--force"]);
    assert!(code != 0 && err.contains("damaged"), "{err}");
}

/// Processes whose command line holds `needle`.
fn processes_with(needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).replace('\0', " ").contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_scheduled_backup_is_cancelled_and_its_hook_killed() {
    let dir = TempDir::new("backup-cancel");
    let text = format!("{}\n[backup]\nevery = \"2s\"\ndir = \"{}\"\n", node(), dir.0.join("archives").display());
    let h = Halo::up(BIN, &text).unwrap();
    let slow = dir.write(
        "slow.toml",
        "name = \"slowdump\"\n[run]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 1000\"]\n[readiness]\nexec = [\"true\"]\n\
         interval = \"200ms\"\n[backup]\ncommand = [\"sh\", \"-c\", \"sleep 31.5; echo late\"]\ntimeout = \"60s\"\n",
    );
    assert_eq!(h.cli(&["apply", "-f", slow.to_str().unwrap()]).0, 0);
    let backup = |h: &Halo| {
        let (_, out, _) = h.cli(&["status", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["backup"].clone()
    };
    eventually(Duration::from_secs(20), "a backup stuck in its hook", || async {
        backup(&h)["running_since"].is_u64() && processes_with("sleep 31.5") > 0
    })
    .await;
    let (code, out, err) = h.cli(&["backup", "cancel"]);
    assert!(code == 0 && out.contains("cancelled"), "{out}{err}");
    assert_eq!(h.cli(&["delete", "slowdump"]).0, 0);
    eventually(Duration::from_secs(10), "the cancel reported and the hook gone", || async {
        backup(&h)["last_error"].as_str().is_some_and(|e| e.contains("cancelled")) && processes_with("sleep 31.5") == 0
    })
    .await;
    // With nothing under way (a backup now takes milliseconds), cancel says so.
    eventually(Duration::from_secs(10), "cancel saying none is running", || async {
        let (code, _, err) = h.cli(&["backup", "cancel"]);
        code != 0 && err.contains("no scheduled backup is running")
    })
    .await;
}

#[test]
fn the_backup_schedule_in_a_node_file_is_checked() {
    let dir = TempDir::new("backup-check");
    let check = |backup: &str| {
        let f = dir.write("node.toml", &format!("{}\n[backup]\n{backup}\n", node()));
        halo(&["check", "-c", f.to_str().unwrap()])
    };
    assert!(check("cron = \"0 3 * * *\"\nkeep_daily = 7").0);
    assert!(check("every = \"15m\"\nkeep_weekly = 4").0);
    let (ok, _, err) = check("cron = \"0 25 * * *\"");
    assert!(!ok && err.contains("backup.cron") && err.contains("hour") && err.contains("0-23"), "{err}");
    let (ok, _, err) = check("every = \"1h\"\ncron = \"0 3 * * *\"");
    assert!(!ok && err.contains("one of them"), "{err}");
    let (ok, _, err) = check("every = \"100ms\"");
    assert!(!ok && err.contains("at least 1s"), "{err}");
}
