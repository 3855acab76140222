//! Zero-downtime binary upgrade, the process side: every serving halo
//! listens on an upgrade socket (a Unix socket named after its config
//! file or data directory). `halo upgrade` (or SIGUSR2 to the process)
//! asks it to start the binary now on disk with the same arguments; the
//! new process connects back ("takeover"), receives the listening sockets
//! and endpoint health ([`halo_proxy::handover`]), starts serving on them
//! and says "ready"; then the old one stops accepting, drains for its
//! grace period and exits. A new process that fails before "ready" (a
//! bad config, a crash) changes nothing: the old one keeps serving and
//! `halo upgrade` says why.
//!
//! Lines on the socket: `upgrade` (answered `ok PID` or `error WHY`),
//! `takeover` (answered by the handover, then `released` once the old
//! process let go of what only one process may hold, the node's store;
//! then it awaits `ready`).

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use halo_proxy::handover::{self, Inherited, Manifest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};

/// Set in a new process's environment: the old one's upgrade socket.
pub const FROM_ENV: &str = "HALO_UPGRADE_FROM";
/// How long a new process may take from start to "ready".
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The upgrade socket of `halo proxy -c FILE`: in the private runtime
/// directory (`--run-dir`), named after the file.
pub fn proxy_socket(config: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let h = halo_model::fnv::fnv64(abs.to_string_lossy().as_bytes());
    let dir = halo_proxy::run_dir::sub("upgrade").context("the runtime directory for the upgrade socket")?;
    Ok(dir.join(format!("proxy-{h:016x}.sock")))
}

/// The upgrade socket of `halo up` and `halo agent`.
pub fn node_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("upgrade.sock")
}

/// In a process started by an upgrade: takes the old process's sockets.
/// `None` when this is not an upgrade.
pub fn take_over() -> anyhow::Result<Option<(Inherited, Ready)>> {
    let Some(path) = std::env::var_os(FROM_ENV) else { return Ok(None) };
    // Not passed on to what this process starts.
    std::env::remove_var(FROM_ENV);
    let path = PathBuf::from(path);
    let stream = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connect to the old process at {}", path.display()))?;
    {
        use std::io::Write;
        (&stream).write_all(b"takeover\n")?;
    }
    let (manifest, fds) = handover::recv(&stream).context("receive the old process's sockets")?;
    let inherited = Inherited::new(manifest, fds)?;
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(&stream).read_line(&mut line)?;
        if line.trim() != "released" {
            bail!("the old process did not let go of its state (it said {line:?})");
        }
    }
    tracing::info!(from = inherited.from_pid, "took over the listening sockets of the old process");
    Ok(Some((inherited, Ready { stream, path })))
}

/// Tells the old process that this one serves.
pub struct Ready {
    stream: std::os::unix::net::UnixStream,
    path: PathBuf,
}

impl Ready {
    pub fn confirm(self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        (&self.stream).write_all(b"ready\n").context("tell the old process")?;
        Ok(self.path)
    }
}

/// What the serving process gives a new one.
pub type Give = Arc<dyn Fn() -> std::io::Result<(Manifest, Vec<std::os::fd::OwnedFd>)> + Send + Sync>;
/// What it lets go of once the sockets are sent (a node's store); a
/// proxy has nothing to.
pub type Release = Arc<dyn Fn() -> futures_boxed::BoxFuture + Send + Sync>;

/// A boxed future, without a crate for one.
pub mod futures_boxed {
    pub type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// The old side: the upgrade socket and what it needs to start a new
/// process.
pub struct Upgrades {
    path: PathBuf,
    exe: PathBuf,
    args: Vec<OsString>,
    give: Give,
    release: Option<Release>,
    /// Serialises upgrades; holds the waiter of the one under way.
    pending: Mutex<Option<mpsc::Sender<Result<u32, String>>>>,
    /// Receives the new process's pid once it is ready.
    done: mpsc::Sender<u32>,
}

impl Upgrades {
    /// Binds the upgrade socket at `path` (replacing a stale one; an old
    /// process that handed over still has its own, unlinked). `done`
    /// gets the new pid when an upgrade completed: time to drain and exit.
    /// `took_over`: this process replaced the one still bound there.
    pub fn bind(
        path: PathBuf,
        took_over: bool,
        give: Give,
        release: Option<Release>,
        done: mpsc::Sender<u32>,
    ) -> anyhow::Result<(Arc<Upgrades>, UnixListener)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        if !took_over && std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!(
                "another halo serves this already (its upgrade socket {} answers); to replace it by this binary run `halo upgrade`",
                path.display()
            );
        }
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("bind the upgrade socket {}", path.display()))?;
        // The binary on disk now: after a package upgrade, the new one.
        let exe = std::env::current_exe().context("find this binary")?;
        let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
        let args = std::env::args_os().skip(1).collect();
        let u = Arc::new(Upgrades { path, exe, args, give, release, pending: Mutex::new(None), done });
        Ok((u, listener))
    }

    /// Removes the upgrade socket when this process stops for good (not
    /// after an upgrade: the new process has bound its own there).
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.connection(stream).await {
                    tracing::warn!(error = %e, "upgrade socket");
                }
            });
        }
    }

    async fn connection(self: Arc<Self>, stream: UnixStream) -> anyhow::Result<()> {
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        match line.trim() {
            "upgrade" => {
                let result = self.start_upgrade().await;
                let answer = match &result {
                    Ok(pid) => format!("ok {pid}\n"),
                    Err(e) => format!("error {e}\n"),
                };
                // Answered before this process starts to drain and exit.
                let _ = stream.get_mut().write_all(answer.as_bytes()).await;
                let _ = stream.get_mut().shutdown().await;
                if let Ok(pid) = result {
                    let _ = self.done.send(pid).await;
                }
            }
            "takeover" => self.hand_over(stream).await?,
            other => bail!("unknown request {other:?}"),
        }
        Ok(())
    }

    /// Starts the binary on disk and waits until it took over or failed;
    /// then, if it took over, this process drains and exits.
    pub async fn upgrade(&self) -> Result<u32, String> {
        let result = self.start_upgrade().await;
        if let Ok(pid) = result {
            let _ = self.done.send(pid).await;
        }
        result
    }

    async fn start_upgrade(&self) -> Result<u32, String> {
        let mut pending = self.pending.lock().await;
        if pending.is_some() {
            return Err("an upgrade is already under way".into());
        }
        let (tx, mut rx) = mpsc::channel(1);
        *pending = Some(tx);
        drop(pending);
        let result = self.start_new(&mut rx).await;
        *self.pending.lock().await = None;
        result
    }

    async fn start_new(&self, rx: &mut mpsc::Receiver<Result<u32, String>>) -> Result<u32, String> {
        tracing::info!(exe = %self.exe.display(), "upgrade: starting the binary on disk");
        let mut child = tokio::process::Command::new(&self.exe)
            .args(&self.args)
            .env(FROM_ENV, &self.path)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let outcome = tokio::select! {
            r = rx.recv() => r.unwrap_or_else(|| Err("the upgrade was abandoned".into())),
            status = child.wait() => Err(format!(
                "the new process (pid {pid}) exited before taking over: {}; its log is this one's",
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            )),
            _ = tokio::time::sleep(READY_WITHIN) => {
                let _ = child.start_kill();
                Err(format!("the new process (pid {pid}) was not ready within {READY_WITHIN:?}; it was stopped"))
            }
        };
        match &outcome {
            // The new process lives on without us: reap it if it ever ends
            // while this one drains.
            Ok(_) => drop(tokio::spawn(async move { child.wait().await })),
            Err(e) => tracing::error!(error = %e, "upgrade failed; this process keeps serving"),
        }
        outcome
    }

    /// Gives a new process the sockets and waits for its "ready".
    async fn hand_over(&self, mut stream: BufReader<UnixStream>) -> anyhow::Result<()> {
        let waiter = self.pending.lock().await.clone();
        let Some(waiter) = waiter else { bail!("a takeover nobody asked for (run `halo upgrade`)") };
        let (manifest, fds) = (self.give)()?;
        let std = stream.get_mut();
        let peer_pid = std.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0) as u32;
        {
            // Blocking sendmsg on a duplicate of the stream.
            // (The blocking flag is the shared file's: set back after.)
            let dup = std.as_fd().try_clone_to_owned()?;
            let s = std::os::unix::net::UnixStream::from(dup);
            tokio::task::spawn_blocking(move || {
                s.set_nonblocking(false)?;
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                let sent = handover::send(&s, &manifest, &borrowed);
                s.set_nonblocking(true)?;
                sent
            })
            .await??;
        }
        // From here the new process runs the control plane: this one
        // only drains its connections.
        if let Some(release) = &self.release {
            release().await;
        }
        stream.get_mut().write_all(b"released\n").await?;
        let mut line = String::new();
        let got = tokio::time::timeout(READY_WITHIN, stream.read_line(&mut line)).await;
        let result = match got {
            Ok(Ok(_)) if line.trim() == "ready" => Ok(peer_pid),
            _ => Err("the new process took the sockets but failed before it was ready".to_string()),
        };
        let _ = waiter.send(result).await;
        Ok(())
    }
}

/// `halo upgrade`: asks the halo behind `socket` to replace itself.
pub fn request(socket: &Path) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!("no halo answers on {} (is it running, with this config or data directory?)", socket.display())
    })?;
    (&stream).write_all(b"upgrade\n")?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    match line.trim().split_once(' ') {
        Some(("ok", pid)) => {
            println!("upgraded: pid {pid} serves now; the previous process drains and exits");
            Ok(())
        }
        Some(("error", why)) => bail!("upgrade failed, the running halo keeps serving: {why}"),
        _ => bail!("unexpected answer {line:?}"),
    }
}
