//! `[run]`: what runs an instance. The exec driver runs `command` as a
//! process; the docker driver runs a container of `image`, its `port`
//! published on a host port halo picks. Validation of the section lives
//! here, beside the types it produces.

use std::collections::BTreeMap;

use crate::file::RunSection;
use crate::SpecError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// exec: the program (`halo` runs this same halo binary, as the
    /// quickstart's `halo demo-app`). docker: the container's command,
    /// empty for the image's own.
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Who the instance runs as (a user name or uid); `None`: the
    /// default, an unprivileged user of halo's choosing where halo may
    /// switch users (`halo-app` for processes, the image's own user for
    /// containers).
    pub user: Option<String>,
    /// Its group (a name or gid); `None`: the user's own.
    pub group: Option<String>,
    pub driver: RunDriver,
}

/// The variable that marks a node's instance processes (what the orphan
/// sweep and the test harness look for): a digest of the node's data
/// directory, never its path (instances must not learn where halo keeps
/// its secrets).
pub const OWNER_VAR: &str = "HALO_OWNER";

/// The value of [`OWNER_VAR`] for the node whose data directory is
/// `data_dir`.
pub fn owner_mark(data_dir: &str) -> String {
    format!("{:016x}", crate::fnv::fnv64(data_dir.as_bytes()))
}

/// Whether `s` names a user or group as `run.user`/`run.group` take it: a
/// number, or a POSIX-portable name.
fn account_name(s: &str) -> bool {
    let portable = s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
    portable || (!s.is_empty() && s.len() <= 10 && s.chars().all(|c| c.is_ascii_digit()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunDriver {
    /// A process in its own process group.
    Exec,
    /// A container through the local Docker Engine.
    Docker(DockerRun),
}

impl RunDriver {
    pub fn name(&self) -> &'static str {
        match self {
            RunDriver::Exec => "exec",
            RunDriver::Docker(_) => "docker",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerRun {
    pub image: String,
    pub pull: Pull,
    /// The port the app listens on inside the container.
    pub port: u16,
    pub volumes: Vec<Volume>,
    /// CPU limit in billionths of a CPU (Docker's `NanoCpus`).
    pub nano_cpus: Option<u64>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
}

/// When the image is pulled from its registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Only a local image is used; a missing one is an error.
    Never,
    IfMissing,
    /// Before every container start.
    Always,
}

/// `SOURCE:TARGET[:ro|rw]`: a named volume or an absolute host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Volume {
    /// As Docker's `HostConfig.Binds` takes it.
    pub fn bind(&self) -> String {
        format!("{}:{}:{}", self.source, self.target, if self.read_only { "ro" } else { "rw" })
    }
}

/// The smallest memory limit Docker accepts.
const MIN_MEMORY: u64 = 6 << 20;

/// Parses `256MiB`, `1GiB`, `512MB`, `64m` (Docker's: binary), or bytes.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size; use a number and a unit, as in \"256MiB\""))?;
    let mult: f64 = match unit.trim() {
        "" | "B" | "b" => 1.0,
        "KiB" | "k" | "K" => 1024.0,
        "MiB" | "m" | "M" => 1024.0 * 1024.0,
        "GiB" | "g" | "G" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => return Err(format!("unknown unit '{other}' in '{s}'; accepted: B, KiB, MiB, GiB, KB, MB, GB")),
    };
    let bytes = n * mult;
    if !(0.0..=(1u64 << 50) as f64).contains(&bytes) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses one `volumes` entry.
pub fn parse_volume(s: &str) -> Result<Volume, String> {
    let accepted = "use SOURCE:TARGET or SOURCE:TARGET:ro, where SOURCE is a volume name or an absolute host path \
                    and TARGET an absolute path in the container";
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, read_only) = match parts[..] {
        [src, dst] => (src, dst, false),
        [src, dst, "ro"] => (src, dst, true),
        [src, dst, "rw"] => (src, dst, false),
        [_, _, mode] => return Err(format!("'{s}': unknown mode '{mode}'; accepted: ro, rw")),
        _ => return Err(format!("'{s}' does not parse; {accepted}")),
    };
    let named = source.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && source.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !(named || (source.starts_with('/') && source.len() > 1)) {
        return Err(format!("'{s}': source '{source}' is neither a volume name nor an absolute path; {accepted}"));
    }
    if !target.starts_with('/') || target == "/" {
        return Err(format!("'{s}': target '{target}' must be an absolute path other than /; {accepted}"));
    }
    Ok(Volume { source: source.into(), target: target.into(), read_only })
}

/// Image references: `[registry[:port]/]name[:tag][@digest]`, lowercase
/// repository.
fn check_image(image: &str) -> Result<(), String> {
    let (name, _digest) = image.split_once('@').unwrap_or((image, ""));
    let repo = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    let ok = !repo.is_empty()
        && repo.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c))
        && !repo.starts_with(['.', '-', '/'])
        && !image.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{image}' is not an image reference; use NAME[:TAG], as in \"myapp:1.4\" or \"registry.local/team/app:2\""
        ))
    }
}

/// Checks `[run]`, adding every problem to `errors`.
pub(crate) fn validate(r: &RunSection, errors: &mut Vec<SpecError>) -> RunSpec {
    let mut err = |field: &str, message: String| errors.push(SpecError { field: field.into(), message });
    let driver = match r.driver.as_deref().unwrap_or("exec") {
        "exec" => RunDriver::Exec,
        "docker" => RunDriver::Docker(docker(r, &mut err)),
        other => {
            err("run.driver", format!("'{other}' is not accepted; accepted: exec, docker"));
            RunDriver::Exec
        }
    };
    if driver == RunDriver::Exec {
        if r.command.as_deref().is_none_or(|c| c.trim().is_empty()) {
            err("run.command", "is required: the program to run, as in command = \"/usr/bin/myapp\"".into());
        }
        let docker_only = [
            ("image", r.image.is_some()),
            ("pull", r.pull.is_some()),
            ("port", r.port.is_some()),
            ("volumes", r.volumes.is_some()),
            ("cpus", r.cpus.is_some()),
            ("memory", r.memory.is_some()),
        ];
        for (name, _) in docker_only.iter().filter(|(_, set)| *set) {
            err(&format!("run.{name}"), "only applies with driver = \"docker\"".into());
        }
    }
    for k in r.env.keys() {
        if k.is_empty() || k.contains('=') || k == "PORT" {
            err(
                &format!("run.env.{k}"),
                "not accepted: names must be non-empty, without '=', and PORT is set by halo".into(),
            );
        }
    }
    for (field, value) in [("run.user", &r.user), ("run.group", &r.group)] {
        if value.as_deref().is_some_and(|v| !account_name(v)) {
            err(field, "not accepted: a user or group name (as in \"www-data\") or a number".into());
        }
    }
    if r.group.is_some() && r.user.is_none() {
        err("run.group", "needs run.user: the group is the one the named user runs with".into());
    }
    RunSpec {
        command: r.command.clone().unwrap_or_default(),
        args: r.args.clone(),
        env: r.env.clone(),
        workdir: r.workdir.clone(),
        user: r.user.clone(),
        group: r.group.clone(),
        driver,
    }
}

fn docker(r: &RunSection, err: &mut impl FnMut(&str, String)) -> DockerRun {
    let image = r.image.clone().unwrap_or_default();
    if image.is_empty() {
        err("run.image", "is required with driver = \"docker\": the image to run, as in image = \"myapp:1.4\"".into());
    } else if let Err(e) = check_image(&image) {
        err("run.image", e);
    }
    let pull = match r.pull.as_deref().unwrap_or("if_missing") {
        "never" => Pull::Never,
        "if_missing" => Pull::IfMissing,
        "always" => Pull::Always,
        other => {
            err("run.pull", format!("'{other}' is not accepted; accepted: never, if_missing, always"));
            Pull::IfMissing
        }
    };
    let port = match r.port {
        Some(p @ 1..=65535) => p as u16,
        Some(p) => {
            err("run.port", format!("{p} is not a port; accepted: 1 to 65535"));
            0
        }
        None => {
            err(
                "run.port",
                "is required with driver = \"docker\": the port the app listens on in the container".into(),
            );
            0
        }
    };
    let volumes = r
        .volumes
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, v)| parse_volume(v).map_err(|e| err(&format!("run.volumes[{i}]"), e)).ok())
        .collect();
    let nano_cpus = match r.cpus {
        Some(c) if c.is_finite() && (0.01..=1024.0).contains(&c) => Some((c * 1e9).round() as u64),
        Some(c) => {
            err("run.cpus", format!("{c} is not accepted; accepted: 0.01 to 1024 CPUs, as in cpus = 0.5"));
            None
        }
        None => None,
    };
    let memory = match r.memory.as_deref().map(parse_memory) {
        Some(Ok(m)) if m < MIN_MEMORY => {
            err("run.memory", format!("{m} bytes is below Docker's least, 6MiB"));
            None
        }
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            err("run.memory", e);
            None
        }
        None => None,
    };
    DockerRun { image, pull, port, volumes, nano_cpus, memory }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_memory("256MiB"), Ok(256 << 20));
        assert_eq!(parse_memory("64m"), Ok(64 << 20));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("512MB"), Ok(512_000_000));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("lots").unwrap_err().contains("not a size"));
        assert!(parse_memory("3 parsecs").unwrap_err().contains("accepted: B, KiB"));
    }

    #[test]
    fn volumes_parse_or_say_what_is_accepted() {
        assert_eq!(
            parse_volume("data:/var/lib/app"),
            Ok(Volume { source: "data".into(), target: "/var/lib/app".into(), read_only: false })
        );
        assert_eq!(parse_volume("/etc/app:/etc/app:ro").map(|v| v.bind()), Ok("/etc/app:/etc/app:ro".into()));
        assert!(parse_volume("data").unwrap_err().contains("SOURCE:TARGET"));
        assert!(parse_volume("data:/x:rx").unwrap_err().contains("accepted: ro, rw"));
        assert!(parse_volume("../up:/x").unwrap_err().contains("neither a volume name nor an absolute path"));
        assert!(parse_volume("data:relative").unwrap_err().contains("absolute path"));
    }

    #[test]
    fn image_references() {
        for ok in ["myapp:1.4", "registry.local:5000/team/app:2", "app@sha256:abc", "halo-demo"] {
            assert_eq!(check_image(ok), Ok(()), "{ok}");
        }
        for bad in ["MyApp", "my app", ":1.4", "-x"] {
            assert!(check_image(bad).is_err(), "{bad}");
        }
    }
}
