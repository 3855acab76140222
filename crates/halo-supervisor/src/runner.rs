//! Running a command where an instance's app runs: exec probes and backup
//! hooks. For a process that is the host, with the instance's environment
//! and working directory, in a process group of its own that is killed
//! whole when the command runs past its timeout or is given up; for a
//! container it is inside the container (`docker::ContainerRunner`).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::error::{IdentityError, RunError};

/// The most a command may write to stdout; past it the command fails.
pub const MAX_OUTPUT: usize = 1 << 30;

/// Runs commands in one run's environment.
#[async_trait]
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// Runs `argv` with `stdin` fed to it; its stdout when it exits with
    /// status 0 within `timeout`, else why not (stderr's last line
    /// included).
    async fn run(&self, argv: &[String], stdin: Option<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>, RunError> {
        self.run_with(argv, &BTreeMap::new(), stdin, timeout).await
    }

    /// As [`Runner::run`], with `env` set beside the run's own
    /// environment (a stateful hook's role and primary).
    async fn run_with(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RunError>;
}

/// Runs commands on the host with an instance's environment.
#[derive(Debug, Clone)]
pub struct HostRunner {
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// The instance's user (`None`: halo's own), or why it cannot be had.
    pub who: Result<Option<crate::identity::Identity>, IdentityError>,
}

#[async_trait]
impl Runner for HostRunner {
    async fn run_with(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RunError> {
        let (program, args) = argv.split_first().ok_or(RunError::NoCommand)?;
        let who = self.who.clone()?;
        let mut cmd = tokio::process::Command::new(program);
        if let Some(id) = who {
            cmd.uid(id.uid).gid(id.gid);
        }
        cmd.args(args)
            .envs(&self.env)
            .envs(env)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.workdir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().map_err(|e| RunError::Spawn { program: program.clone(), reason: e.to_string() })?;
        // Whatever ends this command (its timeout, a caller dropping this
        // future) ends its whole process group.
        let _group = KillGroup(child.id());
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            tokio::spawn(async move {
                let _ = pipe.write_all(&input).await;
            });
        }
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let run = async {
            // Read as it comes, never more than the limit (a runaway hook
            // is stopped, not buffered whole), and only stderr's tail.
            let (out, err) = tokio::join!(read_capped(stdout, MAX_OUTPUT + 1), read_tail(stderr, STDERR_TAIL));
            if out.len() > MAX_OUTPUT {
                return Err(RunError::TooMuchOutput { program: program.clone(), limit: MAX_OUTPUT });
            }
            let status =
                child.wait().await.map_err(|e| RunError::Spawn { program: program.clone(), reason: e.to_string() })?;
            finish(program, status.success(), &exit_status(status), out, &err)
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(RunError::Timeout { program: program.clone(), timeout }),
        }
    }
}

/// What of a command's stderr is kept (its last line is reported).
const STDERR_TAIL: usize = 64 << 10;

/// Up to `cap` bytes of `pipe`.
async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    if let Some(p) = pipe {
        let _ = p.take(cap as u64).read_to_end(&mut out).await;
    }
    out
}

/// All of `pipe` read, its last `keep` bytes kept.
async fn read_tail(pipe: Option<impl tokio::io::AsyncRead + Unpin>, keep: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut tail = Vec::new();
    let Some(mut p) = pipe else { return tail };
    let mut chunk = vec![0u8; 8192];
    while let Ok(n) = p.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > 2 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    tail
}

/// How a process ended, as messages say it: `status 3`, `signal 9`.
fn exit_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => status.to_string(),
    }
}

/// The result of a finished command, as [`Runner::run`] gives it.
pub(crate) fn finish(
    program: &str,
    success: bool,
    status: &str,
    stdout: Vec<u8>,
    stderr: &[u8],
) -> Result<Vec<u8>, RunError> {
    if !success {
        let stderr = String::from_utf8_lossy(stderr).into_owned();
        return Err(RunError::Exited { program: program.to_string(), status: status.to_string(), stderr });
    }
    if stdout.len() > MAX_OUTPUT {
        return Err(RunError::TooMuchOutput { program: program.to_string(), limit: MAX_OUTPUT });
    }
    Ok(stdout)
}

/// Kills a process group when dropped (a group already gone is fine).
struct KillGroup(Option<u32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_commands_get_the_env_stdin_and_a_timeout() {
        let r = HostRunner { env: [("GREETING".to_string(), "hi".to_string())].into(), workdir: None, who: Ok(None) };
        let sh = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
        let t = Duration::from_secs(5);
        assert_eq!(r.run(&sh("echo $GREETING; cat"), Some(b"in".to_vec()), t).await, Ok(b"hi\nin".to_vec()));
        let e = r.run(&sh("echo nope >&2; exit 3"), None, t).await.unwrap_err();
        assert!(matches!(&e, RunError::Exited { status, .. } if status == "status 3"), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("exited with status 3") && e.ends_with("nope"), "{e}");
        // Output that never ends is read up to the cap, not buffered whole:
        // `yes` writes forever.
        let mut yes = tokio::process::Command::new("yes").stdout(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
        let got = read_capped(yes.stdout.take(), 1 << 20).await;
        assert_eq!(got.len(), 1 << 20);
        let e = r.run(&sh("sleep 5"), None, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }) && e.to_string().contains("timeout and was killed"), "{e}");
        let e = r.run(&["/no/such/program".into()], None, t).await.unwrap_err();
        assert!(matches!(e, RunError::Spawn { .. }) && e.to_string().contains("cannot run"), "{e}");
    }
}
