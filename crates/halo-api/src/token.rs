//! The API tokens, generated on a node's first start and kept in the data
//! directory readable by its owner only (0600): `token` may do anything,
//! `read-token` only read (status, metrics, logs, events, the dashboard).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The admin token's file in a data directory.
pub const ADMIN: &str = "token";
/// The read-only token's file.
pub const READ: &str = "read-token";

/// The token in `dir/name`, created if missing. A token file others can
/// read is refused rather than trusted.
pub fn load_or_create(dir: &Path, name: &str) -> std::io::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} is readable by others (mode {mode:o}); run chmod 600 on it",
                    path.display()
                )));
            }
            Ok(t.trim().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = random_token()?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            writeln!(f, "{token}")?;
            f.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// Replaces the token in `dir/name` (owner only), atomically: a cluster
/// node adopts the cluster's token.
pub fn store(dir: &Path, name: &str, token: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    writeln!(f, "{token}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Reads a token of the node whose data directory is `dir`.
pub fn read(dir: &Path, name: &str) -> std::io::Result<String> {
    std::fs::read_to_string(dir.join(name)).map(|t| t.trim().to_string())
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
