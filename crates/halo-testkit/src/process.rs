//! The real `halo` binary as a child process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `halo` process; killed and reaped on drop.
pub struct Halo {
    child: Option<Child>,
    /// Listener addresses by name, from the process's `listening` lines.
    pub listeners: HashMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The node API of `halo up`.
    pub api: Option<SocketAddr>,
    /// The data directory of `halo up`; instance processes carry its
    /// mark and are killed with the harness.
    pub data_dir: Option<PathBuf>,
    bin: String,
    args: Vec<String>,
    stdout: mpsc::Receiver<String>,
    pub dir: PathBuf,
    /// The config file, when started by [`Halo::proxy`].
    pub config: Option<PathBuf>,
    /// Where its log (stderr, at info) goes, when started by [`Halo::up_logged`].
    pub log: Option<PathBuf>,
    _scratch: Option<crate::TempDir>,
}

impl Halo {
    /// Starts `bin` with `args` and waits until it printed its listeners.
    pub fn start(bin: &str, args: &[&str], dir: &Path) -> anyhow::Result<Halo> {
        Halo::start_logging(bin, args, dir, None)
    }

    fn start_logging(bin: &str, args: &[&str], dir: &Path, log: Option<PathBuf>) -> anyhow::Result<Halo> {
        let (child, rx) = Halo::spawn(bin, args, dir, log.as_deref())?;
        let mut h = Halo {
            child: Some(child),
            listeners: HashMap::new(),
            admin: None,
            api: None,
            data_dir: None,
            bin: bin.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdout: rx,
            dir: dir.to_path_buf(),
            config: None,
            log,
            _scratch: None,
        };
        h.wait_ready()?;
        Ok(h)
    }

    fn spawn(
        bin: &str,
        args: &[&str],
        dir: &Path,
        log: Option<&Path>,
    ) -> anyhow::Result<(Child, mpsc::Receiver<String>)> {
        let mut cmd = Command::new(bin);
        cmd.args(args).current_dir(dir).stdin(Stdio::null()).stdout(Stdio::piped());
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.env("HALO_LOG", "info").stderr(f)
            }
            None => cmd
                .env("HALO_LOG", std::env::var("HALO_LOG").unwrap_or_else(|_| "warn".into()))
                .stderr(Stdio::inherit()),
        };
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((child, rx))
    }

    /// Runs `halo up -c FILE --data-dir DIR/data` on a node file written
    /// from `toml` into a scratch directory owned by the returned value.
    pub fn up(bin: &str, toml: &str) -> anyhow::Result<Halo> {
        Halo::up_with_log(bin, toml, false)
    }

    /// [`Halo::up`] with its log at info written to a file ([`Halo::log_text`]).
    pub fn up_logged(bin: &str, toml: &str) -> anyhow::Result<Halo> {
        Halo::up_with_log(bin, toml, true)
    }

    fn up_with_log(bin: &str, toml: &str, logged: bool) -> anyhow::Result<Halo> {
        let dir = crate::TempDir::new("up");
        let path = dir.write("halo.toml", toml);
        let data = dir.0.join("data");
        let args = ["up", "-c", &path.to_string_lossy(), "--data-dir", &data.to_string_lossy()].map(str::to_string);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = logged.then(|| dir.0.join("halo.log"));
        let mut h = Halo::start_logging(bin, &args, &dir.0, log)?;
        h.config = Some(path);
        h._scratch = Some(dir);
        Ok(h)
    }

    /// kill -9 of halo itself if it still runs (its instances live on),
    /// then the same command again, in the same directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (child, rx) = Halo::spawn(&self.bin, &args, &self.dir, self.log.as_deref())?;
        self.child = Some(child);
        self.stdout = rx;
        self.listeners.clear();
        self.wait_ready()
    }

    /// Runs a CLI verb (`status`, `apply -f F`, ...) against this node;
    /// returns the exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_env(args, &[])
    }

    /// [`Halo::cli`] with `env` set (as `HALO_TOKEN`).
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let data = self.data_dir.as_ref().expect("started by Halo::up");
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .output()
            .expect("run the halo CLI");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }

    /// [`Halo::cli`] with `input` on standard input.
    pub fn cli_with_input(&self, args: &[&str], input: &str) -> (i32, String, String) {
        use std::io::Write;
        let data = self.data_dir.as_ref().expect("started by Halo::up");
        let mut child = Command::new(&self.bin)
            .args(args)
            .arg("--data-dir")
            .arg(data)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the halo CLI");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
        let out = child.wait_with_output().expect("run the halo CLI");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }

    /// What the process logged so far (started by [`Halo::up_logged`]).
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The node's `/v1/status` as JSON, through the CLI.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["status", "-o", "json"]);
        assert_eq!(code, 0, "halo status failed: {err}");
        serde_json::from_str(&out).expect("status is JSON")
    }

    /// The API token of this node.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.as_ref().expect("halo up").join("token"))
            .expect("token")
            .trim()
            .to_string()
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api.expect("node API"))
    }

    /// Runs `halo proxy -c FILE` on a config written from `toml` into a
    /// scratch directory owned by the returned value.
    pub fn proxy(bin: &str, toml: &str) -> anyhow::Result<Halo> {
        let dir = crate::TempDir::new("proxy");
        let path = dir.write("proxy.toml", toml);
        let mut h = Halo::start(bin, &["proxy", "-c", &path.to_string_lossy()], &dir.0)?;
        h.config = Some(path);
        h._scratch = Some(dir);
        Ok(h)
    }

    /// Replaces the config file (reload it with SIGHUP or POST /reload).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(self.config.as_ref().expect("started by Halo::proxy"), toml).expect("write config");
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.stdout.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => l,
                Err(_) => {
                    let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    anyhow::bail!("halo did not become ready (exit status: {status:?})");
                }
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["listening", name, addr] => {
                    self.listeners.insert(name.to_string(), addr.parse()?);
                }
                ["admin", addr] => self.admin = Some(addr.parse()?),
                ["api", addr] => self.api = Some(addr.parse()?),
                ["data", dir] => self.data_dir = Some(PathBuf::from(dir)),
                ["ready"] => return Ok(()),
                _ => {}
            }
        }
    }

    /// Lines printed on stdout since the last call (access log lines and such).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn url(&self, listener: &str, path: &str) -> String {
        format!("http://{}{path}", self.listeners[listener])
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("admin listener"))
    }

    /// Sends a signal by name (`HUP`, `TERM`, `KILL`, `STOP`, ...).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        if pid > 0 {
            // kill(1) keeps this crate free of unsafe code.
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
        }
    }

    /// SIGTERM, then waits (off the async runtime) up to `within` for halo
    /// to exit; its exit code. The harness is gone afterwards.
    pub async fn terminate(self, within: Duration) -> Option<i32> {
        self.signal("TERM");
        tokio::task::spawn_blocking(move || {
            let mut h = self;
            h.wait(within)
        })
        .await
        .expect("the waiting task")
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status.code().unwrap_or(-1));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Halo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Instances outlive a killed halo by design: the harness ends them.
        if let Some(dir) = &self.data_dir {
            for pid in processes_of(dir) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            if Path::new("/var/run/docker.sock").exists() {
                crate::docker::remove_containers_of(dir);
            }
        }
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Kills the processes a chain of binary upgrades left (each new halo is
/// the old one's child, not the test's), whatever the test's outcome.
#[derive(Default)]
pub struct Reaper(pub Vec<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs `halo upgrade ARGS`; the new process's pid, or what it said.
pub fn upgrade(bin: &str, args: &[&std::ffi::OsStr]) -> Result<i32, String> {
    let out = Command::new(bin).arg("upgrade").args(args).output().map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(said);
    }
    said.split_whitespace().nth(2).and_then(|p| p.parse().ok()).ok_or(said)
}

/// Live processes started for the node whose data directory is `dir`
/// (their environment carries that node's mark, or the data directory as
/// halo before the mark set it).
pub fn processes_of(dir: &Path) -> Vec<i32> {
    let needle = format!("{}={}", halo_model::OWNER_VAR, halo_model::owner_mark(&dir.display().to_string()));
    let legacy = format!("HALO_DATA_DIR={}", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true);
        let ours = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes() || v == legacy.as_bytes()))
            .unwrap_or(false);
        if ours && !zombie {
            pids.push(pid);
        }
    }
    pids
}
