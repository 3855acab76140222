//! Files the operator names in flags (certificates, keys, passwords, the
//! cluster token): read once before anything starts, with errors that name
//! the flag; a secret that others can read is refused rather than trusted.

use std::path::Path;

use anyhow::Context;

/// A file a flag names; `secret`: it must not be readable by others.
pub fn read_flag_file(path: &Path, flag: &str, secret: bool) -> anyhow::Result<Vec<u8>> {
    if secret {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).with_context(|| format!("{flag}: cannot read {}", path.display()))?;
        if mode.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "{flag}: {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                mode.permissions().mode() & 0o777
            );
        }
    }
    std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}
