//! The supervisor's typed errors: why a run did not start, why a command
//! run where an instance runs failed, why a probe failed, why an identity
//! cannot be had. Each says, in words an operator can act on, what is
//! wrong; callers match on the kind, never on the words.

use std::time::Duration;

/// `run.user`/`run.group` cannot be had on this node (the message says
/// what would work).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(pub String);

/// Why a driver did not start a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The program could not be spawned.
    #[error("cannot start {command}: {reason}")]
    Spawn { command: String, reason: String },
    /// The image is not on this node and may not, or could not, be pulled.
    #[error("{0}")]
    Image(String),
    /// The container runtime refused or failed.
    #[error("{0}")]
    Runtime(String),
    /// This driver does not run this service.
    #[error("{0}")]
    WrongDriver(String),
}

/// Why a command run where an instance runs (an exec probe, a backup
/// hook) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("no command given")]
    NoCommand,
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot run {program}: {reason}")]
    Spawn { program: String, reason: String },
    /// It ended unsuccessfully: `status 3`, `signal 9`; with the last line
    /// of its stderr.
    #[error("{program} exited with {status}{}", said(.stderr))]
    Exited { program: String, status: String, stderr: String },
    #[error("{program} ran past its {timeout:?} timeout and was killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} wrote more than {limit} bytes and was killed")]
    TooMuchOutput { program: String, limit: usize },
    /// The container runtime failed to run it.
    #[error("{0}")]
    Runtime(String),
}

fn said(stderr: &str) -> String {
    match stderr.trim().lines().last() {
        Some(line) if !line.trim().is_empty() => format!(": {line}"),
        _ => String::new(),
    }
}

/// Why one probe check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(String),
    /// The exchange broke: sending, reading, or not HTTP.
    #[error("{0}")]
    Exchange(String),
    #[error("GET {path} answered {status}")]
    Status { path: String, status: u16 },
    #[error(transparent)]
    Run(#[from] RunError),
}
