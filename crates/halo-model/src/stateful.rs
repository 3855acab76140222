//! `[stateful]`: a service whose instances keep data. Each instance has a
//! stable name (`NAME-0`, `NAME-1`, ...) and a data directory of its own
//! that outlives its process, halo and re-placement; with more than one
//! replica, one instance is the *primary* and the others replicas, moved
//! between roles by the service's hooks. Validation lives here, beside the
//! types it produces; what the hooks must do is in `docs/stateful.md`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::parse_duration;
use crate::SpecError;

/// `[stateful]` as users write it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatefulSection {
    /// Where an instance's data lives (exec): a path with `{instance}`;
    /// default `DATA_DIR/volumes/{instance}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// docker: where the instance's named volume is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demote: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_synchronous: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SyncSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_grace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_on_failover: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

/// `synchronous` as written: `true`, `false` or `"strict"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SyncSetting {
    Flag(bool),
    Mode(String),
}

/// A validated `[stateful]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatefulSpec {
    /// The data directory's path template (`{instance}` replaced); `None`:
    /// under halo's data directory.
    pub data: Option<String>,
    /// docker: the mount point of the instance's volume.
    pub mount: String,
    pub hooks: Hooks,
    /// Each hook's limit but `clone` and `rewind`'s.
    pub hook_timeout: Duration,
    /// `clone` and `rewind`'s limit (they copy data).
    pub clone_timeout: Duration,
    /// A lost node's instance is recreated elsewhere after this; `None`:
    /// never (it waits for its node).
    pub replace_after: Option<Duration>,
    /// A primary whose process is down this long hands over.
    pub restart_grace: Duration,
    /// A replica further behind than this (in `position` units) is never
    /// promoted; `None`: any.
    pub max_lag_on_failover: Option<u64>,
    /// `check` failures in a row that end a primary's term, or take a
    /// replica out of rotation.
    pub failure_threshold: u32,
    pub synchronous: Synchronous,
}

/// Whether a write is acknowledged only once a replica has it too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Asynchronous replication: a failover may lose the writes the new
    /// primary had not received.
    #[default]
    Off,
    /// One healthy replica is the synchronous standby (`set_synchronous`);
    /// with none healthy the primary goes on alone (and a failover waits
    /// for it: no other instance has every acknowledged write).
    On,
    /// As `On`, but writes wait while no replica can be the standby.
    Strict,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Off => "off",
            Synchronous::On => "on",
            Synchronous::Strict => "strict",
        }
    }
}

/// The hooks: each a program and its arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub promote: Option<Vec<String>>,
    pub demote: Option<Vec<String>>,
    pub follow: Option<Vec<String>>,
    pub position: Option<Vec<String>>,
    pub clone: Option<Vec<String>>,
    pub rewind: Option<Vec<String>>,
    pub check: Option<Vec<String>>,
    pub set_synchronous: Option<Vec<String>>,
}

impl StatefulSpec {
    /// Whether the service has a primary: more than one instance, or the
    /// replication hooks given.
    pub fn replicated(&self, replicas: u32) -> bool {
        replicas > 1 || self.hooks.promote.is_some()
    }
}

/// The hooks a replicated service cannot do without.
const NEEDED: [&str; 4] = ["promote", "follow", "position", "clone"];

pub(crate) fn validate(s: &StatefulSection, replicas: u32, errors: &mut Vec<SpecError>) -> StatefulSpec {
    let mut err = |field: &str, message: String| errors.push(SpecError { field: format!("stateful.{field}"), message });
    let hook = |name: &str, v: &Option<Vec<String>>, err: &mut dyn FnMut(&str, String)| -> Option<Vec<String>> {
        let argv = v.as_ref()?;
        if argv.first().is_none_or(|c| c.trim().is_empty()) {
            err(name, format!("give the program and its arguments, as in {name} = [\"scripts/{name}.sh\"]"));
            return None;
        }
        Some(argv.clone())
    };
    let hooks = Hooks {
        promote: hook("promote", &s.promote, &mut err),
        demote: hook("demote", &s.demote, &mut err),
        follow: hook("follow", &s.follow, &mut err),
        position: hook("position", &s.position, &mut err),
        clone: hook("clone", &s.clone, &mut err),
        rewind: hook("rewind", &s.rewind, &mut err),
        check: hook("check", &s.check, &mut err),
        set_synchronous: hook("set_synchronous", &s.set_synchronous, &mut err),
    };
    let synchronous = match &s.synchronous {
        None | Some(SyncSetting::Flag(false)) => Synchronous::Off,
        Some(SyncSetting::Flag(true)) => Synchronous::On,
        Some(SyncSetting::Mode(v)) if v == "strict" => Synchronous::Strict,
        Some(SyncSetting::Mode(v)) => {
            err("synchronous", format!("'{v}' is not a mode; give true, false or \"strict\""));
            Synchronous::Off
        }
    };
    if synchronous != Synchronous::Off {
        if hooks.set_synchronous.is_none() {
            err(
                "set_synchronous",
                "is needed with synchronous replication; give the hook that names the synchronous standby, as in set_synchronous = [\"scripts/set_synchronous.sh\"]".into(),
            );
        }
        if replicas < 2 && s.promote.is_none() {
            err("synchronous", "needs a primary and replicas (replicas = 2 or more)".into());
        }
    }
    let given = [&s.promote, &s.follow, &s.position, &s.clone];
    if replicas > 1 || given.iter().any(|h| h.is_some()) {
        for (name, v) in NEEDED.iter().zip(given) {
            if v.is_none() {
                let why = if replicas > 1 {
                    format!("is needed with {replicas} replicas (a primary and replicas)")
                } else {
                    format!("is needed with the other replication hooks ({})", NEEDED.join(", "))
                };
                err(
                    name,
                    format!(
                        "{why}; give the hook, as in {name} = [\"scripts/{name}.sh\"], or run 1 replica without them"
                    ),
                );
            }
        }
    }
    let mut duration = |field: &str, v: Option<&str>, default: Duration, min: Duration| match v.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= min => d,
        Some(Ok(_)) => {
            err(field, format!("'{}' is too short; at least {min:?}", v.unwrap_or_default()));
            default
        }
        Some(Err(e)) => {
            err(field, e);
            default
        }
    };
    let ms = Duration::from_millis;
    let hook_timeout = duration("hook_timeout", s.hook_timeout.as_deref(), Duration::from_secs(30), ms(100));
    let clone_timeout = duration("clone_timeout", s.clone_timeout.as_deref(), Duration::from_secs(3600), ms(100));
    let restart_grace = duration("restart_grace", s.restart_grace.as_deref(), Duration::from_secs(5), Duration::ZERO);
    let replace_after = match s.replace_after.as_deref() {
        Some("never") => None,
        Some(v) if parse_duration(v).is_err() => {
            let e = parse_duration(v).unwrap_err();
            err("replace_after", format!("{e}; or \"never\" (a lost node's instance waits for it)"));
            None
        }
        v => Some(duration("replace_after", v, Duration::from_secs(300), Duration::from_secs(1))),
    };
    if let Some(d) = &s.data {
        if !d.starts_with('/') || !d.contains("{instance}") {
            err(
                "data",
                format!("'{d}' must be an absolute path with {{instance}} in it, as in \"/srv/pg/{{instance}}\""),
            );
        }
    }
    let mount = s.mount.clone().unwrap_or_else(|| "/var/lib/halo/data".into());
    if !mount.starts_with('/') {
        err("mount", format!("'{mount}' must be an absolute path inside the container"));
    }
    let failure_threshold = match s.failure_threshold {
        Some(0) => {
            err("failure_threshold", "must be at least 1".into());
            3
        }
        Some(n) => n,
        None => 3,
    };
    StatefulSpec {
        data: s.data.clone(),
        mount,
        hooks,
        hook_timeout,
        clone_timeout,
        replace_after,
        restart_grace,
        max_lag_on_failover: s.max_lag_on_failover,
        failure_threshold,
        synchronous,
    }
}

/// A replication position as the `position` hook prints it: a number, or
/// PostgreSQL's LSN `X/Y` (two hex numbers); comparable, and the
/// difference of two is how far one is behind.
pub fn parse_position(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some((hi, lo)) = t.split_once('/') {
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("'{t}' is not an LSN (X/Y in hex)"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("'{t}' is not an LSN (X/Y in hex)"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("'{t}' is not an LSN (two 32-bit hex numbers)"));
        }
        return Ok(hi << 32 | lo);
    }
    t.parse::<u64>().map_err(|_| format!("'{t}' is not a position; print a number or an LSN such as 0/3000060"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_numbers_or_lsns() {
        assert_eq!(parse_position("0/3000060\n"), Ok(0x3000060));
        assert_eq!(parse_position("1/0"), Ok(1 << 32));
        assert_eq!(parse_position(" 42 "), Ok(42));
        assert!(parse_position("x/1").unwrap_err().contains("LSN"));
        assert!(parse_position("").unwrap_err().contains("position"));
    }
}
