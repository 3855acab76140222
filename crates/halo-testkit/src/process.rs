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
    stdout: mpsc::Receiver<String>,
    pub dir: PathBuf,
    /// The config file, when started by [`Halo::proxy`].
    pub config: Option<PathBuf>,
    _scratch: Option<crate::TempDir>,
}

impl Halo {
    /// Starts `bin` with `args` and waits until it printed its listeners.
    pub fn start(bin: &str, args: &[&str], dir: &Path) -> anyhow::Result<Halo> {
        let mut child = Command::new(bin)
            .args(args)
            .current_dir(dir)
            .env("HALO_LOG", std::env::var("HALO_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut h = Halo {
            child: Some(child),
            listeners: HashMap::new(),
            admin: None,
            stdout: rx,
            dir: dir.to_path_buf(),
            config: None,
            _scratch: None,
        };
        h.wait_ready()?;
        Ok(h)
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
    }
}
