//! Who an instance's processes (the app, its exec probes and backup
//! hooks) run as. Applications are not trusted: where halo may switch
//! users (it runs as root, or holds CAP_SETUID and CAP_SETGID, as the
//! package's units give it), an instance runs as `run.user`/`run.group`,
//! or else as the dedicated unprivileged user [`DEFAULT_USER`], made on
//! first use; never as root unless `run.user = "root"` is written. Halo's
//! data directory is owner-only, so such an instance cannot read the
//! tokens or the store. Where halo may not switch, instances run as halo's
//! own user (documented in docs/security.md) and a `run.user` other than
//! that user is refused with what to do.

use std::sync::Mutex;

use halo_model::lock::LockExt;
use nix::unistd::{Group, Uid, User};

use crate::error::IdentityError;

/// The user instances run as when none is named and halo may switch.
pub const DEFAULT_USER: &str = "halo-app";

/// A user and group to switch to before the program starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `user`/`group` (names or numbers) into the identity to run
/// as: `None` runs as halo's own user. The error says what is wrong and
/// what would work.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, IdentityError> {
    let may_switch = may_switch();
    let me = Uid::effective().as_raw();
    let (uid, primary) = match user {
        Some(u) => lookup_user(u)?.ok_or_else(|| {
            IdentityError(format!(
                "run.user = '{u}': no such user on this node; create it (useradd --system {u}) or name another"
            ))
        })?,
        None if may_switch => default_user()?,
        None => return Ok(None),
    };
    let gid = match group {
        Some(g) => lookup_group(g)?.ok_or_else(|| {
            IdentityError(format!("run.group = '{g}': no such group on this node; create it or name another"))
        })?,
        None => primary,
    };
    if !may_switch {
        if uid == me && group.is_none() {
            return Ok(None);
        }
        return Err(IdentityError(format!(
            "run.user = '{}': halo runs as uid {me} without CAP_SETUID and CAP_SETGID, so it can start instances only \
             as itself; run halo as root (or give it those two capabilities), or remove run.user",
            user.unwrap_or_default()
        )));
    }
    Ok(Some(Identity { uid, gid }))
}

/// Whether this process may change its user and group: root, or the two
/// capabilities in its effective set.
pub fn may_switch() -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << CAP_SETUID) != 0 && eff & (1 << CAP_SETGID) != 0
}

fn lookup_user(u: &str) -> Result<Option<(u32, u32)>, IdentityError> {
    let found = match u.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(u),
    };
    match found {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        // A uid with no entry is still a uid; its group is its number.
        Ok(None) => Ok(u.parse::<u32>().ok().map(|n| (n, n))),
        Err(e) => Err(IdentityError(format!("run.user = '{u}': cannot read the user database: {e}"))),
    }
}

fn lookup_group(g: &str) -> Result<Option<u32>, IdentityError> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(Some(n));
    }
    match Group::from_name(g) {
        Ok(found) => Ok(found.map(|gr| gr.gid.as_raw())),
        Err(e) => Err(IdentityError(format!("run.group = '{g}': cannot read the group database: {e}"))),
    }
}

/// The default user, made (a system user with its own group, no home,
/// no shell) the first time it is needed. Several halo processes on one
/// host may race to make it: whoever loses finds it made.
fn default_user() -> Result<(u32, u32), IdentityError> {
    static MADE: Mutex<()> = Mutex::new(());
    let _one = MADE.locked();
    if let Some(found) = lookup_user(DEFAULT_USER)? {
        return Ok(found);
    }
    let out = std::process::Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"])
        .args(["--shell", "/usr/sbin/nologin", "--comment", "halo instances", DEFAULT_USER])
        .output();
    if let Some(found) = lookup_user(DEFAULT_USER)? {
        tracing::info!(user = DEFAULT_USER, uid = found.0, "made the unprivileged user instances run as");
        return Ok(found);
    }
    let why = match out {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => e.to_string(),
    };
    Err(IdentityError(format!(
        "instances run as the unprivileged user '{DEFAULT_USER}', which does not exist and could not be made \
         (useradd: {why}); make it (useradd --system --user-group {DEFAULT_USER}), or name one with run.user"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_and_number_and_unknown_ones_are_named() {
        let root = resolve(Some("root"), None);
        if may_switch() {
            assert_eq!(root, Ok(Some(Identity { uid: 0, gid: 0 })));
            assert_eq!(resolve(Some("0"), Some("0")), Ok(Some(Identity { uid: 0, gid: 0 })));
        }
        let e = resolve(Some("no-such-user-here"), None).unwrap_err().0;
        assert!(e.contains("no such user") && e.contains("useradd"), "{e}");
        let e = resolve(Some("root"), Some("no-such-group-here")).unwrap_err().0;
        assert!(e.contains("no such group"), "{e}");
    }
}
