//! halo's private runtime directory: where a process keeps what other
//! halo processes on the host must find (listen-address claims, the
//! upgrade socket of `halo proxy`), never in a shared directory another
//! user could prepare. It is `--run-dir` (or `HALO_RUN_DIR`), else
//! systemd's `$RUNTIME_DIRECTORY`, else `/run/halo` for root,
//! `$XDG_RUNTIME_DIR/halo`, or `/tmp/halo-UID` (as tmux does). Whatever it
//! is, it must be a directory (not a link) owned by this user and closed
//! to others; halo makes it so when it makes it, and refuses one that is
//! not, naming it. Files in it are opened without following links.
//!
//! Scratch directories (a backup's trial restore) are made apart, with
//! an unpredictable name and mode 700, created exclusively: nothing
//! planted beforehand is ever followed.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Error, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static EXPLICIT: OnceLock<PathBuf> = OnceLock::new();
static RESOLVED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Names the runtime directory (`--run-dir`); call before [`get`]. The
/// first call wins.
pub fn set(dir: PathBuf) {
    let _ = EXPLICIT.set(dir);
}

/// The runtime directory, made and checked on first use.
pub fn get() -> std::io::Result<&'static Path> {
    let r = RESOLVED.get_or_init(|| {
        let dir = EXPLICIT.get().cloned().unwrap_or_else(default_dir);
        ensure_private(&dir).map(|()| dir)
    });
    match r {
        Ok(p) => Ok(p.as_path()),
        Err(e) => Err(Error::new(ErrorKind::PermissionDenied, e.clone())),
    }
}

/// A subdirectory of the runtime directory, made and checked.
pub fn sub(name: &str) -> std::io::Result<PathBuf> {
    let dir = get()?.join(name);
    ensure_private(&dir).map_err(|e| Error::new(ErrorKind::PermissionDenied, e))?;
    Ok(dir)
}

fn default_dir() -> PathBuf {
    let uid = nix::unistd::Uid::effective();
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd lists several, separated by ':'.
        let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if uid.is_root() {
        return PathBuf::from("/run/halo");
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("halo");
    }
    std::env::temp_dir().join(format!("halo-{uid}"))
}

/// Makes `dir` (mode 700) if it is missing, then checks that it is a
/// directory, not a link, owned by this user and closed to others. A
/// directory of ours that others may enter is closed; anything else is
/// refused with what to do.
pub fn ensure_private(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    match DirBuilder::new().recursive(false).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot make the runtime directory {shown}: {e}"))?;
        }
        Err(e) => return Err(format!("cannot make the runtime directory {shown}: {e} (name another with --run-dir)")),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(format!(
            "{shown} is not a directory but a link or a file (someone may have planted it); remove it, or name \
             another runtime directory with --run-dir"
        ));
    }
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{shown} is owned by uid {}, not by this user (uid {me}); remove it, or name another runtime directory \
             with --run-dir",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot close {shown} to other users (chmod 700): {e}"))?;
    }
    Ok(())
}

/// Opens (creating, mode 600) a file for reading and writing, refusing
/// to follow a link in its place.
pub fn open_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// A new, empty directory under `parent` named `PREFIX-RANDOM`, mode
/// 700, made exclusively (an existing path of that name, link or not, is
/// never used). The caller removes it.
pub fn scratch_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    for _ in 0..16 {
        let dir = parent.join(format!("{prefix}-{:016x}", random_u64()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(ErrorKind::AlreadyExists, format!("no free scratch name under {}", parent.display())))
}

/// 64 bits from the kernel's random source.
fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        // No /dev/urandom (a bare chroot): still unique per call.
        return crate::util::rand_below(u64::MAX) ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("halo-rundir-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_planted_link_or_an_open_directory_is_never_used_as_is() {
        let base = tmp("plant");
        std::fs::create_dir_all(&base).unwrap();
        let target = base.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = base.join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure_private(&link).unwrap_err();
        assert!(e.contains("link") && e.contains("--run-dir"), "{e}");
        // A directory of ours left open is closed.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o700);
        // A file planted as a link is not followed.
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, open.join("x.lock")).unwrap();
        assert!(open_private(&open.join("x.lock")).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        // Scratch directories: private, fresh, never a planted one.
        let s = scratch_dir(&base, "verify").unwrap();
        assert_eq!(std::fs::metadata(&s).unwrap().mode() & 0o777, 0o700);
        assert_ne!(s, scratch_dir(&base, "verify").unwrap());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
