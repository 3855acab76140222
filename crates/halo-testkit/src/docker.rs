//! Docker for tests: the `docker` CLI against the local daemon, and an
//! image of the `halo` binary under test (`docker import` of a tarball
//! with the stripped binary, the shared libraries `ldd` lists and a static
//! busybox at `/bin/busybox`), so a
//! container runs `halo demo-app` with no registry. Images, containers and
//! volumes a test makes are removed on drop.

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `docker ARGS` against the host's daemon; exit code, stdout, stderr.
pub fn docker(args: &[&str]) -> (i32, String, String) {
    docker_at(None, args)
}

/// Runs `docker ARGS` against the daemon at `socket` (default: the host's).
pub fn docker_at(socket: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("docker");
    if let Some(s) = socket {
        cmd.arg("-H").arg(format!("unix://{}", s.display()));
    }
    match cmd.args(args).stdin(Stdio::null()).output() {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ),
        Err(e) => (-1, String::new(), format!("cannot run docker: {e}")),
    }
}

/// Whether a Docker daemon answers. Where none does, docker tests skip
/// with a message, unless `HALO_REQUIRE_DOCKER=1` (the project's test
/// script sets it where a daemon runs): then they fail.
pub fn docker_available(test: &str) -> bool {
    let (code, _, err) = docker(&["info", "--format", "{{.ServerVersion}}"]);
    if code == 0 {
        return true;
    }
    if std::env::var("HALO_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("{test}: no Docker daemon answers and HALO_REQUIRE_DOCKER=1: {err}");
    }
    eprintln!("SKIPPED {test}: no Docker daemon answers ({err})");
    false
}

/// Ids of the containers with label `key=value`, running or not.
pub fn containers_labelled(key: &str, value: &str) -> Vec<String> {
    let filter = format!("label={key}={value}");
    let (_, out, _) = docker(&["ps", "-aq", "--no-trunc", "--filter", &filter]);
    out.lines().map(str::to_string).collect()
}

/// Removes every container of the halo whose data dir is `dir`.
pub fn remove_containers_of(dir: &Path) {
    let ids = containers_labelled("halo.data_dir", &dir.display().to_string());
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        docker(&args);
    }
}

/// Starts a Docker daemon inside the network namespace `ns` (entered with
/// nsenter, which keeps the host's mounts: the daemon needs the cgroup
/// tree) with its state under `dir`; its socket once it answers.
pub fn start_daemon(ns: &str, dir: &Path) -> std::path::PathBuf {
    for sub in ["root", "exec"] {
        std::fs::create_dir_all(dir.join(sub)).expect("docker dir");
    }
    let socket = dir.join("docker.sock");
    let config = dir.join("daemon.json");
    // The host daemon's storage driver (fuse-overlayfs here), so layers work where it works.
    let (_, driver, _) = docker(&["info", "--format", "{{.Driver}}"]);
    std::fs::write(&config, format!("{{\"storage-driver\": \"{driver}\", \"log-driver\": \"json-file\"}}"))
        .expect("daemon.json");
    let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
    let ok = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .args(["setsid", "--fork", "dockerd", "--config-file"])
        .arg(&config)
        .arg("--data-root")
        .arg(dir.join("root"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "starting dockerd in {ns} failed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while docker_at(Some(&socket), &["info", "--format", "{{.ServerVersion}}"]).0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "dockerd in {ns} did not answer within 30s; see {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    socket
}

/// Host pids of the main processes of the daemon's running containers.
pub fn container_pids(socket: &Path) -> Vec<i32> {
    let (_, ids, _) = docker_at(Some(socket), &["ps", "-q"]);
    let ids: Vec<&str> = ids.lines().collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let mut args = vec!["inspect", "--format", "{{.State.Pid}}"];
    args.extend(ids);
    let (_, pids, _) = docker_at(Some(socket), &args);
    pids.lines().filter_map(|p| p.trim().parse().ok()).filter(|p| *p > 0).collect()
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> =
        mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|p| p.starts_with(&prefix)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
}

/// Images of the halo binary under test, one per tag; removed on drop.
pub struct DemoImage {
    pub tags: Vec<String>,
}

impl DemoImage {
    /// Builds the image (`scripts/demo-image.sh`) and tags it with each of
    /// `tags` (different tags, same content: a new template for a rollout).
    pub fn build(bin: &str, tags: &[&str]) -> anyhow::Result<DemoImage> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/demo-image.sh");
        let image = DemoImage { tags: tags.iter().map(|t| t.to_string()).collect() };
        let (first, rest) = tags.split_first().ok_or_else(|| anyhow::anyhow!("no tag given"))?;
        let out = Command::new(script).args([bin, first]).stdin(Stdio::null()).output()?;
        anyhow::ensure!(out.status.success(), "{script} {bin} {first}: {}", String::from_utf8_lossy(&out.stderr));
        for tag in rest {
            let (code, _, err) = docker(&["tag", first, tag]);
            anyhow::ensure!(code == 0, "docker tag {first} {tag}: {err}");
        }
        Ok(image)
    }
}

impl Drop for DemoImage {
    fn drop(&mut self) {
        let mut args = vec!["rmi", "-f"];
        args.extend(self.tags.iter().map(String::as_str));
        docker(&args);
    }
}

/// A named volume removed on drop.
pub struct Volume(pub String);

impl Drop for Volume {
    fn drop(&mut self) {
        docker(&["volume", "rm", "-f", &self.0]);
    }
}
