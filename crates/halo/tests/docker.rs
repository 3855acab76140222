//! The docker driver through the real binary and a real Docker Engine:
//! an image of this halo binary (no registry), `halo up` with docker
//! services, `docker kill` under load, kill -9 of halo and adoption by
//! container id, a daemon restart, a rolling update between image tags
//! and scaling, limits in the container's cgroup, an OOM kill named in
//! status, hooks and exec probes inside the container, and the bad inputs. Every container, image and volume a test makes is removed
//! (the harness removes containers labelled with its data dir on drop).
//! Where no daemon answers, each test says so and skips (fails with
//! `HALO_REQUIRE_DOCKER=1`).

use std::time::{Duration, Instant};

use halo_testkit::{containers_labelled, docker, docker_available, eventually, Client, DemoImage, Halo, Load};

const BIN: &str = env!("CARGO_BIN_EXE_halo");

/// A tag unique to this test process.
fn tag(name: &str) -> String {
    format!("halo-test-{name}:{}", std::process::id())
}

/// A node file with one docker service `web` of `image`.
fn node(image: &str, replicas: u32, run_extra: &str) -> String {
    format!(
        r#"
[node]
api = "127.0.0.1:0"

[[listeners]]
name = "http"
listen = "127.0.0.1:0"

[[services]]
name = "web"
replicas = {replicas}

[services.run]
driver = "docker"
image = "{image}"
pull = "never"
port = 8080
args = ["demo-app", "--version", "v1", "--admin"]
{run_extra}

[services.readiness]
http = "/healthz"
interval = "200ms"

[services.restart]
backoff_initial = "100ms"
backoff_max = "2s"

[services.stop]
grace_period = "3s"

[[services.routes]]
path_prefix = "/"
"#
    )
}

fn instances(h: &Halo) -> Vec<serde_json::Value> {
    let s = h.status();
    let svc = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").cloned();
    svc.map(|s| s["instances"].as_array().unwrap().clone()).unwrap_or_default()
}

/// The containers of ready instances, sorted.
fn ready_containers(h: &Halo) -> Vec<String> {
    let mut ids: Vec<String> = instances(h)
        .iter()
        .filter(|i| i["ready"] == true && i["stopping"] == false)
        .filter_map(|i| i["container"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    ids
}

async fn all_ready(h: &Halo, n: usize) {
    eventually(Duration::from_secs(30), &format!("{n} ready docker instances"), || async {
        let all = instances(h);
        all.len() == n && all.iter().all(|i| i["ready"] == true && i["stopping"] == false && i["container"].is_string())
    })
    .await;
}

/// This halo's containers, running or not, as the daemon lists them.
fn containers_of(h: &Halo) -> Vec<String> {
    let mut ids = containers_labelled("halo.data_dir", &h.data_dir.as_ref().unwrap().display().to_string());
    ids.sort();
    ids
}

fn inspect(id: &str, format: &str) -> String {
    let (code, out, err) = docker(&["inspect", "--format", format, id]);
    assert_eq!(code, 0, "docker inspect {id}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_containers_serve_and_a_docker_kill_under_load_fails_no_request() {
    if !docker_available("docker kill under load") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("kill")]).unwrap();
    let h = Halo::up(BIN, &node(&image.tags[0], 3, "")).unwrap();
    all_ready(&h, 3).await;
    let url = h.url("http", "/");
    let c = Client::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..30 {
        let r = c.get(&url).await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with("demo-app v1 instance web-"), "{}", r.body);
        seen.insert(r.body);
    }
    assert_eq!(seen.len(), 3, "traffic did not reach all three containers");
    assert_eq!(containers_of(&h), ready_containers(&h), "one container per instance, no other");
    // Labels name the instance, service, revision and node.
    let first = instances(&h)[0].clone();
    let labels = inspect(first["container"].as_str().unwrap(), "{{json .Config.Labels}}");
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["halo.instance"], first["id"]);
    assert_eq!((labels["halo.service"].as_str(), labels["halo.node"].as_str()), (Some("web"), Some("local")));
    assert!(labels["halo.revision"].as_str().is_some_and(|r| !r.is_empty()), "{labels}");

    let load = Load::start(&url, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = ready_containers(&h)[0].clone();
    let killed = Instant::now();
    assert_eq!(docker(&["kill", &victim]).0, 0);
    eventually(Duration::from_secs(20), "the killed container replaced and ready", || async {
        let ids = ready_containers(&h);
        ids.len() == 3 && !ids.contains(&victim)
    })
    .await;
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    println!("docker kill: replaced and ready after {back:?}; {} ok, {} failed", report.ok, report.failed.len());
    assert!(report.failed.is_empty(), "{} failed, first: {:?}", report.failed.len(), report.failed.first());
    let restarted = instances(&h).into_iter().find(|i| i["restarts"] == 1).expect("one instance restarted");
    assert_eq!(restarted["last_exit"], "killed by SIGKILL");
    assert_eq!(containers_of(&h).len(), 3, "the killed container was not removed: {:?}", containers_of(&h));
    // Container output reaches `halo logs` like a process's.
    let (code, logs, err) = h.cli(&["logs", "web", "-n", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(logs.contains("listening on 0.0.0.0:8080"), "{logs}");
    // A stop removes every container.
    let dir = h.data_dir.clone().unwrap();
    assert_eq!(h.terminate(Duration::from_secs(20)).await, Some(0));
    assert_eq!(containers_labelled("halo.data_dir", &dir.display().to_string()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_halo_adopts_the_same_containers_and_removes_an_orphan() {
    if !docker_available("adoption after kill -9") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("adopt")]).unwrap();
    let mut h = Halo::up(BIN, &node(&image.tags[0], 2, "")).unwrap();
    all_ready(&h, 2).await;
    let before = ready_containers(&h);
    // A container with this halo's labels that no instance owns: left by
    // a halo killed between creating it and recording it.
    let data = h.data_dir.as_ref().unwrap().display().to_string();
    let (code, orphan, err) = docker(&[
        "run",
        "-d",
        "--label",
        &format!("halo.data_dir={data}"),
        "--label",
        "halo.instance=web-0-99",
        &image.tags[0],
        "demo-app",
    ]);
    assert_eq!(code, 0, "{err}");
    h.restart().unwrap();
    all_ready(&h, 2).await;
    assert_eq!(ready_containers(&h), before, "the running containers were replaced instead of adopted");
    eventually(Duration::from_secs(10), "the orphan removed", || async { !containers_of(&h).contains(&orphan) }).await;
    assert_eq!(containers_of(&h), before, "duplicates or leftovers");
    assert!(instances(&h).iter().all(|i| i["restarts"] == 0), "{:?}", instances(&h));
    // An adopted container that dies is seen (events) and replaced.
    assert_eq!(docker(&["kill", &before[0]]).0, 0);
    eventually(Duration::from_secs(20), "the adopted container replaced", || async {
        let ids = ready_containers(&h);
        ids.len() == 2 && !ids.contains(&before[0])
    })
    .await;
    assert_eq!(containers_of(&h).len(), 2);
}

/// Restarts the Docker daemon with the command line it runs with now.
fn restart_dockerd() {
    let pid = std::process::Command::new("pidof").arg("dockerd").output().unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    assert!(!pid.is_empty(), "no dockerd process to restart");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "dockerd did not stop within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::File::create("/tmp/halo-test-dockerd.log").unwrap();
    // setsid --fork: the daemon outlives this test, in a session of its own.
    let started = std::process::Command::new("setsid")
        .arg("--fork")
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(started.success(), "starting {argv:?} failed");
    while docker(&["info", "--format", "{{.ServerVersion}}"]).0 != 0 {
        assert!(Instant::now() < deadline, "dockerd did not come back within 60s (log: /tmp/halo-test-dockerd.log)");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_daemon_restart_is_recovered_without_duplicates() {
    if !docker_available("daemon restart") {
        return;
    }
    if std::env::var("HALO_TEST_RESTART_DOCKERD").as_deref() != Ok("1") {
        // Restarting the daemon ends every container on this machine.
        eprintln!("SKIPPED daemon restart: set HALO_TEST_RESTART_DOCKERD=1 where restarting dockerd is safe");
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("dockerd")]).unwrap();
    let h = Halo::up(BIN, &node(&image.tags[0], 2, "")).unwrap();
    all_ready(&h, 2).await;
    let before = ready_containers(&h);
    let restarted = Instant::now();
    tokio::task::spawn_blocking(restart_dockerd).await.unwrap();
    println!("dockerd restarted in {:?}", restarted.elapsed());
    eventually(Duration::from_secs(30), "both instances in new containers and ready", || async {
        let ids = ready_containers(&h);
        ids.len() == 2 && ids.iter().all(|id| !before.contains(id))
    })
    .await;
    println!("recovered {:?} after the restart began", restarted.elapsed());
    assert_eq!(containers_of(&h), ready_containers(&h), "duplicates or leftovers after the daemon restart");
    let r = Client::new().get(&h.url("http", "/")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_between_image_tags_under_load_fails_no_request() {
    if !docker_available("rolling update between tags") {
        return;
    }
    let (v1, v2) = (tag("roll-a"), tag("roll-b"));
    let _image = DemoImage::build(BIN, &[&v1, &v2]).unwrap();
    let h = Halo::up(BIN, &node(&v1, 2, "")).unwrap();
    all_ready(&h, 2).await;
    let before = ready_containers(&h);
    let load = Load::start(&h.url("http", "/"), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The same service on the other tag, as `halo apply` takes it.
    let file = node(&v2, 2, "");
    let svc = file[file.find("[[services]]").unwrap()..].replace("[[services]]", "").replace("services.", "");
    let f = h.dir.join("web-v2.toml");
    std::fs::write(&f, svc).unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(60), "both instances on the new tag", || async {
        let ids = ready_containers(&h);
        ids.len() == 2
            && ids.iter().all(|id| !before.contains(id))
            && ids.iter().all(|id| inspect(id, "{{.Config.Image}}") == v2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    println!("rolling update {v1} -> {v2}: {} ok, {} failed", report.ok, report.failed.len());
    assert!(report.failed.is_empty(), "{} failed, first: {:?}", report.failed.len(), report.failed.first());
    eventually(Duration::from_secs(10), "old containers removed", || async { containers_of(&h).len() == 2 }).await;
    // Scaling adds and drains containers like processes.
    assert_eq!(h.cli(&["scale", "web", "3"]).0, 0);
    all_ready(&h, 3).await;
    assert_eq!(h.cli(&["scale", "web", "1"]).0, 0);
    all_ready(&h, 1).await;
    eventually(Duration::from_secs(10), "scaled-away containers removed", || async {
        containers_of(&h) == ready_containers(&h)
    })
    .await;
}

/// The cgroup file `name` of the process `pid` (v1 or v2 hierarchy).
fn cgroup_file(pid: &str, v1_controller: &str, name_v1: &str, name_v2: &str) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if controllers.split(',').any(|c| c == v1_controller) {
            return std::fs::read_to_string(format!("/sys/fs/cgroup/{v1_controller}{path}/{name_v1}")).unwrap();
        }
        if controllers.is_empty() {
            return std::fs::read_to_string(format!("/sys/fs/cgroup{path}/{name_v2}")).unwrap();
        }
    }
    panic!("no {v1_controller} cgroup for {pid}: {cgroups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_reach_the_cgroup_and_an_oom_kill_is_named() {
    if !docker_available("limits") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("limits")]).unwrap();
    let h = Halo::up(BIN, &node(&image.tags[0], 1, "memory = \"48MiB\"\ncpus = 0.5")).unwrap();
    all_ready(&h, 1).await;
    let id = ready_containers(&h)[0].clone();
    let pid = inspect(&id, "{{.State.Pid}}");
    let memory = cgroup_file(&pid, "memory", "memory.limit_in_bytes", "memory.max");
    assert_eq!(memory.trim(), (48u64 << 20).to_string());
    let quota = cgroup_file(&pid, "cpu", "cpu.cfs_quota_us", "cpu.max");
    let period = cgroup_file(&pid, "cpu", "cpu.cfs_period_us", "cpu.max");
    let (quota, period): (f64, f64) = match quota.split_whitespace().collect::<Vec<_>>()[..] {
        [q, p] => (q.parse().unwrap(), p.parse().unwrap()),
        _ => (quota.trim().parse().unwrap(), period.trim().parse().unwrap()),
    };
    assert_eq!(quota / period, 0.5, "cpus = 0.5 in the cgroup");
    // Past the limit the kernel kills the app; status says why.
    let c = Client::new();
    let _ = c.get(&format!("http://127.0.0.1:{}/admin/hog?mib=200", instances(&h)[0]["port"])).await;
    eventually(Duration::from_secs(20), "the OOM kill named", || async {
        instances(&h).first().is_some_and(|i| i["last_exit"].as_str().is_some_and(|e| e.contains("out of memory")))
    })
    .await;
    let i = instances(&h)[0].clone();
    assert_eq!(i["last_exit"], "killed: out of memory (the 48MiB of run.memory)");
    all_ready(&h, 1).await;
    let (_, table, _) = h.cli(&["status"]);
    assert!(table.contains("out of memory"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_docker_input_is_named_and_nothing_else_stops() {
    if !docker_available("bad docker input") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("bad")]).unwrap();
    let h = Halo::up(BIN, &node(&image.tags[0], 1, "")).unwrap();
    all_ready(&h, 1).await;
    let running = ready_containers(&h);
    // A volume spec that does not parse: refused at apply, naming it.
    let bad = h.dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"other\"\n[run]\ndriver = \"docker\"\nimage = \"x:1\"\nport = 80\nvolumes = [\"data\"]\n",
    )
    .unwrap();
    let (code, _, err) = h.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("run.volumes[0]: 'data' does not parse"), "{err}");
    // An image that is not here with pull = "never": the instance says so.
    let missing = h.dir.join("missing.toml");
    std::fs::write(
        &missing,
        "name = \"ghost\"\n[run]\ndriver = \"docker\"\nimage = \"halo-test-no-such-image:1\"\npull = \"never\"\nport = 80\n",
    )
    .unwrap();
    let (code, out, err) = h.cli(&["apply", "-f", missing.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(10), "the missing image named", || async {
        let s = h.status();
        let ghost = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "ghost").cloned();
        ghost.and_then(|g| g["instances"][0]["last_exit"].as_str().map(str::to_string)).is_some_and(|e| {
            e.contains("image 'halo-test-no-such-image:1' is not on this node and run.pull = \"never\"")
        })
    })
    .await;
    assert_eq!(ready_containers(&h), running, "the running service was disturbed");
    assert_eq!(Client::new().get(&h.url("http", "/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_exec_probes_run_inside_the_container_and_a_volume_is_restored() {
    if !docker_available("backup hooks in containers") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("hooks")]).unwrap();
    let volume = halo_testkit::Volume(format!("halo-test-counter-{}", std::process::id()));
    // The app keeps its counter in a named volume; the hooks read and
    // write it with the image's busybox, inside the container.
    let svc = format!(
        r#"
volumes = ["{vol}:/data"]

[services.liveness]
exec = ["/bin/busybox", "test", "-d", "/data"]
interval = "300ms"

[services.backup]
command = ["/bin/busybox", "cat", "/data/count"]
restore = ["/bin/busybox", "sh", "-c", "cat > /data/count"]
timeout = "10s"
"#,
        vol = volume.0
    );
    let text =
        node(&image.tags[0], 1, &svc).replace("\"--admin\"]", "\"--admin\", \"--counter-file\", \"/data/count\"]");
    let h = Halo::up(BIN, &text).unwrap();
    all_ready(&h, 1).await;
    let c = Client::new();
    let count = |method: http::Method| {
        let req = http::Request::builder()
            .method(method)
            .uri(h.url("http", "/count"))
            .body(http_body_util::Full::default())
            .unwrap();
        c.send(req)
    };
    for _ in 0..4 {
        assert_eq!(count(http::Method::POST).await.unwrap().status, 200);
    }
    assert_eq!(count(http::Method::GET).await.unwrap().body.trim(), "4");
    // The exec liveness probe passes inside the container (it would fail
    // on the host, which has no /data).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let i = instances(&h)[0].clone();
    assert_eq!((i["restarts"].as_u64(), i["probe_failures"]["liveness"].as_u64()), (Some(0), Some(0)), "{i}");
    let dir = halo_testkit::TempDir::new("docker-hooks");
    let archive = dir.0.join("b.tar");
    let (code, out, err) = h.cli(&["backup", "create", "--out", archive.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");

    // The node, its containers and the volume are gone.
    assert_eq!(h.terminate(Duration::from_secs(20)).await, Some(0));
    let (code, _, err) = docker(&["volume", "rm", &volume.0]);
    assert_eq!(code, 0, "{err}");
    let restored = dir.0.join("restored");
    let status = std::process::Command::new(BIN)
        .args(["backup", "restore", archive.to_str().unwrap(), "--into", restored.to_str().unwrap()])
        .env("HALO_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = dir.write("halo.toml", &text);
    let h = Halo::start(BIN, &["up", "-c", cfg.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()], &dir.0)
        .unwrap();
    let count = || {
        let req = http::Request::get(h.url("http", "/count")).body(http_body_util::Full::default()).unwrap();
        c.send(req)
    };
    eventually(Duration::from_secs(30), "the counter restored into the new volume by the hook", || async {
        count().await.is_ok_and(|r| r.body.trim() == "4")
    })
    .await;
    let input = restored.join("restore/web.out");
    eventually(Duration::from_secs(5), "the restore hook's input removed once it ran", || async { !input.exists() })
        .await;
    drop(h);
    halo_testkit::remove_containers_of(&restored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_containers_data_stays_in_its_named_volume_when_it_is_replaced() {
    if !docker_available("stateful volumes") {
        return;
    }
    let image = DemoImage::build(BIN, &[&tag("stateful")]).unwrap();
    let text = node(&image.tags[0], 1, "").replace("\"--admin\"]", "\"--admin\", \"--counter-file\", \"/data/count\"]")
        + "\n[services.stateful]\nmount = \"/data\"\n";
    let dir = halo_testkit::TempDir::new("docker-stateful");
    let data = dir.0.join("data");
    // Removed after the containers (dropped after `h`), even on failure.
    let _volume =
        halo_testkit::Volume(format!("halo-web-0-{}", &halo_model::owner_mark(&data.display().to_string())[..8]));
    let cfg = dir.write("halo.toml", &text);
    let h =
        Halo::start(BIN, &["up", "-c", cfg.to_str().unwrap(), "--data-dir", data.to_str().unwrap()], &dir.0).unwrap();
    all_ready(&h, 1).await;
    assert_eq!(instances(&h)[0]["id"], "web-0", "a stable name");
    let c = Client::new();
    let post = || c.send(http::Request::post(h.url("http", "/count")).body(http_body_util::Full::default()).unwrap());
    for _ in 0..3 {
        assert_eq!(post().await.unwrap().status, 200);
    }
    let before = ready_containers(&h);
    // A restart replaces the container in place: same name, same volume.
    let (code, out, err) = h.cli(&["restart", "web", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually(Duration::from_secs(30), "a new container for web-0", || {
        let now = ready_containers(&h);
        std::future::ready(now.len() == 1 && now != before && instances(&h)[0]["id"] == "web-0")
    })
    .await;
    let get = c.send(http::Request::get(h.url("http", "/count")).body(http_body_util::Full::default()).unwrap());
    assert_eq!(get.await.unwrap().body.trim(), "3", "the count lived through the replacement");
    assert_eq!(inspect(&ready_containers(&h)[0], "{{range .Mounts}}{{.Name}}{{end}}").trim(), _volume.0);
    drop(h);
    halo_testkit::remove_containers_of(&data);
}
