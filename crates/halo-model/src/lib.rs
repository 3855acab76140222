//! The service spec users write, and its validation.
//!
//! `&str` -> [`ServiceFile`] (serde, unknown fields refused) ->
//! [`ServiceFile::validate`] -> [`ServiceSpec`]. Only the validated spec
//! drives the supervisor and the proxy; every error names the field and
//! what is accepted. The value types the data plane shares ([`values`]:
//! policy, hash key, timeouts, retry policy, durations) live here and the
//! proxy's config reuses them, so a policy name means the same in a service
//! file as in a proxy file. No I/O here.

pub mod autoscale;
pub mod clock;
pub mod diag;
mod file;
pub mod fnv;
pub mod health;
mod kind;
pub mod lock;
mod redact;
pub mod release;
pub mod run;
pub mod stateful;
pub mod values;

use std::time::Duration;

use values::{parse_duration, rules, HashKey, Policy, RetryPolicy, Timeouts};
pub use values::{HostMatch, PathMatch};

pub use diag::{Diagnostic, Diagnostics};
pub use file::{
    BackupSection, BalanceSection, ProbeSection, RestartSection, RouteSection, RunSection, ServiceFile, StopSection,
};
pub use kind::FileKind;
pub use redact::redact_env;
pub use run::{owner_mark, DockerRun, Pull, RunDriver, RunSpec, Volume, OWNER_VAR};

/// One problem in a service file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the field, as in `readiness.interval`.
    pub field: String,
    pub message: String,
}

/// Every problem found in one service file, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    /// The errors of the service written at `prefix` (empty for a file of
    /// its own, `services[2].` in a node file), placed in `text`.
    pub fn locate(&self, file: &str, text: &str, prefix: &str) -> Diagnostics {
        let loc = diag::Locator::new(text);
        Diagnostics(self.0.iter().map(|e| loc.diag(file, &format!("{prefix}{}", e.field), e.message.clone())).collect())
    }
}

/// A validated service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub replicas: u32,
    pub run: RunSpec,
    /// Must pass before readiness and liveness are checked.
    pub startup: Option<Probe>,
    /// Must pass before the instance receives traffic (default: TCP connect).
    pub readiness: Probe,
    /// Failing it restarts the instance.
    pub liveness: Option<Probe>,
    pub restart: RestartSpec,
    pub stop: StopSpec,
    pub routes: Vec<RouteSpec>,
    pub balance: BalanceSpec,
    /// How a new template reaches the instances.
    pub release: release::ReleaseSpec,
    /// The service's own backup hook.
    pub backup: Option<BackupHook>,
    /// Instances with stable names and data of their own; with replicas, a
    /// primary.
    pub stateful: Option<stateful::StatefulSpec>,
    /// The replica count follows load between bounds (`replicas` is where
    /// it starts).
    pub autoscale: Option<autoscale::AutoscaleSpec>,
    /// The fewest ready instances a drain, an update or maintenance may
    /// leave; `None`: every replica stays ready (replacements first).
    pub budget: Option<autoscale::Budget>,
}

impl ServiceSpec {
    /// Whether the service has a primary (and replicas): more than one
    /// instance, or the replication hooks given (a service scaled to one
    /// keeps its primary, and scales out again from it).
    pub fn replicated(&self) -> bool {
        self.stateful.as_ref().is_some_and(|s| s.replicated(self.replicas))
    }

    /// The fewest ready instances a voluntary disruption may leave when
    /// the service asks for `replicas` (its budget, or all of them).
    pub fn floor(&self, replicas: u32) -> u32 {
        self.budget.map_or(replicas, |b| b.floor(replicas))
    }
}

/// A service's backup hook: `command` writes its data to stdout inside a
/// ready instance's environment; `restore` reads it back on stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHook {
    pub command: Vec<String>,
    pub restore: Option<Vec<String>>,
    pub timeout: Duration,
    /// A failed hook fails the whole backup (`fail`) or is left out of it.
    pub fail_backup: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// GET this path on the instance's port; 2xx or 3xx passes.
    Http(String),
    /// A TCP connect to the instance's port.
    Tcp,
    /// Run this command; exit status 0 passes. `PORT` is set.
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub check: Check,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make it pass.
    pub success_threshold: u32,
    /// Consecutive failures that make it fail.
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// First restart delay; doubles per consecutive failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// This many restarts within `crash_loop_window` is a crash loop.
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
}

/// Signals a stop may start with (POSIX numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
    Quit,
    Hup,
    Usr1,
    Usr2,
}

impl StopSignal {
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Hup => 1,
            StopSignal::Int => 2,
            StopSignal::Quit => 3,
            StopSignal::Usr1 => 10,
            StopSignal::Usr2 => 12,
            StopSignal::Term => 15,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSpec {
    pub signal: StopSignal,
    /// After the signal, this long before SIGKILL of the process group.
    pub grace_period: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Exact host or `*.example.com`; `None` matches any host.
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    /// Which instances of a stateful service the route reaches.
    pub role: RouteRole,
}

/// Which instances of a stateful service a route reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouteRole {
    /// The primary only (every route of a stateless service: all).
    #[default]
    Primary,
    /// The replicas that follow the primary, those further behind than
    /// `max_lag` left out.
    Replica { max_lag: Option<u64> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSpec {
    pub policy: Policy,
    pub hash_key: Option<HashKey>,
    pub session_cookie: Option<String>,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    pub max_in_flight: Option<values::MaxInFlight>,
    pub rate_limit: Option<values::RateLimit>,
}

/// Parses and validates a service file; `file` names it in errors, which
/// are all reported at once, each with its line, column and field.
pub fn parse_service(file: &str, text: &str) -> Result<(ServiceFile, ServiceSpec), Diagnostics> {
    let read = diag::read::<ServiceFile>(file, text);
    // Only a file that does not read as a service may be another kind.
    if !read.errors.is_empty() {
        if let Some(message) = FileKind::misfiled(text, FileKind::Service) {
            return Err(Diagnostics::of_file(file, message));
        }
    }
    let Some(raw) = &read.value else { return Err(read.errors) };
    match raw.validate() {
        Ok(spec) if read.errors.is_empty() => Ok((read.value.expect("checked"), spec)),
        Ok(_) => Err(read.errors),
        Err(e) => {
            // What was set aside holds a default now: its checks would
            // repeat the error already reported.
            let later = e.locate(file, text, "").0.into_iter().filter(|d| !read.follows(&d.field));
            let mut all = read.errors.clone();
            all.0.extend(later);
            all.sort();
            Err(all)
        }
    }
}

/// Reads back a stored service file: as [`parse_service`], except that a
/// `balance.retries` above [`values::rules::MAX_RETRIES`], which an older
/// halo stored and ran as that many, still runs so rather than leaving a
/// running service unreadable. The file comes back as stored (its
/// template, and so its instances, stay).
pub fn parse_stored_service(key: &str, text: &str) -> Result<(ServiceFile, ServiceSpec), Diagnostics> {
    let max = rules::MAX_RETRIES;
    let Ok(stored) = toml::from_str::<ServiceFile>(text) else { return parse_service(key, text) };
    if stored.balance.as_ref().is_none_or(|b| b.retries.is_none_or(|n| n <= max)) {
        return parse_service(key, text);
    }
    let mut capped = stored.clone();
    capped.balance.as_mut().expect("checked").retries = Some(max);
    let (_, spec) = parse_service(key, &capped.to_toml())?;
    Ok((stored, spec))
}

/// Service names: what a DNS label accepts.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name; use 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'"
        ))
    }
}

/// The most replicas one service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

struct Checker<'a> {
    errors: &'a mut Vec<SpecError>,
}

impl Checker<'_> {
    fn err(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(SpecError { field: field.into(), message: message.into() });
    }

    fn duration(&mut self, field: &str, v: Option<&str>, default: Duration, min: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v) {
            Ok(d) if d < min => {
                self.err(field, format!("'{v}' is too short; at least {min:?}"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(field, e);
                default
            }
        }
    }

    fn probe(&mut self, field: &str, p: &ProbeSection, defaults: (Duration, u32, u32)) -> Probe {
        let kinds = [p.http.is_some(), p.tcp == Some(true), p.exec.is_some()].iter().filter(|k| **k).count();
        let check = match (&p.http, &p.exec) {
            _ if kinds > 1 => {
                self.err(field, "set one of http, tcp or exec, not several");
                Check::Tcp
            }
            (Some(path), _) if !path.starts_with('/') => {
                self.err(&format!("{field}.http"), format!("'{path}' must be a path starting with '/'"));
                Check::Tcp
            }
            (Some(path), _) => Check::Http(path.clone()),
            (_, Some(argv)) if argv.is_empty() || argv[0].is_empty() => {
                self.err(&format!("{field}.exec"), "needs a command, as in exec = [\"pg_isready\", \"-q\"]");
                Check::Tcp
            }
            (_, Some(argv)) => Check::Exec(argv.clone()),
            _ => Check::Tcp,
        };
        let interval =
            self.duration(&format!("{field}.interval"), p.interval.as_deref(), defaults.0, Duration::from_millis(50));
        let timeout = self.duration(
            &format!("{field}.timeout"),
            p.timeout.as_deref(),
            Duration::from_secs(1),
            Duration::from_millis(10),
        );
        let mut threshold = |name: &str, v: Option<u32>, default: u32| match v {
            Some(0) => {
                self.err(&format!("{field}.{name}"), "must be at least 1");
                default
            }
            Some(n) => n,
            None => default,
        };
        let success_threshold = threshold("success_threshold", p.success_threshold, defaults.1);
        let failure_threshold = threshold("failure_threshold", p.failure_threshold, defaults.2);
        Probe { check, interval, timeout, success_threshold, failure_threshold }
    }
}

impl ServiceFile {
    /// Checks every field; on success the spec the rest of halo reads.
    pub fn validate(&self) -> Result<ServiceSpec, SpecErrors> {
        let mut errors = Vec::new();
        let mut c = Checker { errors: &mut errors };
        if let Err(e) = check_name(&self.name) {
            c.err("name", e);
        }
        let autoscale = self.autoscale.as_ref().map(|a| autoscale::validate(a, self.replicas, MAX_REPLICAS, c.errors));
        let replicas = match self.replicas {
            Some(n) if n > MAX_REPLICAS => {
                c.err("replicas", format!("{n} is too many; accepted: 0 to {MAX_REPLICAS}"));
                1
            }
            Some(n) => n,
            None => autoscale.as_ref().map_or(1, |a| a.min),
        };
        let fewest = autoscale.as_ref().map_or(replicas, |a| a.min);
        let budget =
            self.budget.as_ref().and_then(|b| autoscale::validate_budget(b, fewest, autoscale.is_some(), c.errors));
        let run = run::validate(&self.run, c.errors);
        let startup = self.startup.as_ref().map(|p| c.probe("startup", p, (Duration::from_millis(500), 1, 60)));
        let readiness = c.probe(
            "readiness",
            self.readiness.as_ref().unwrap_or(&ProbeSection::default()),
            (Duration::from_secs(1), 1, 3),
        );
        let liveness = self.liveness.as_ref().map(|p| c.probe("liveness", p, (Duration::from_secs(2), 1, 3)));
        let restart = c.restart(self.restart.as_ref().unwrap_or(&RestartSection::default()));
        let stop = c.stop(self.stop.as_ref().unwrap_or(&StopSection::default()));
        let routes = self.routes.iter().enumerate().map(|(i, r)| c.route(i, r)).collect();
        let balance = c.balance(self.balance.as_ref().unwrap_or(&BalanceSection::default()));
        let release = release::validate(self.release.as_ref().unwrap_or(&Default::default()), c.errors);
        let backup = self.backup.as_ref().map(|b| c.backup(b));
        let stateful = self.stateful.as_ref().map(|s| stateful::validate(s, replicas, c.errors));
        if stateful.as_ref().is_some_and(|s| s.replicated(replicas)) && matches!(run.driver, RunDriver::Docker(_)) {
            c.err(
                "run.driver",
                "a stateful service with replicas runs its clone and rewind hooks on the host before the instance starts; accepted: exec (docker takes one replica, with a named volume)",
            );
        }
        if stateful.is_some() && release.strategy != release::Strategy::Rolling {
            c.err(
                "release.strategy",
                "a stateful service is replaced in place, one instance at a time (its data stays with it); accepted: rolling",
            );
        }
        if stateful.is_some() && budget.is_some() {
            c.err(
                "budget",
                "a stateful service's instances stay with their data (never drained elsewhere) and are updated one at a time; a budget is for stateless services",
            );
        }
        if stateful.is_some() && autoscale.is_some() {
            c.err(
                "autoscale",
                "a stateful service's instances hold data of their own; it is scaled by hand (replicas), not by load",
            );
        }
        if stateful.is_none() {
            for (i, r) in self.routes.iter().enumerate() {
                if r.role.is_some() || r.max_lag.is_some() {
                    let field = if r.role.is_some() { "role" } else { "max_lag" };
                    c.err(
                        &format!("routes[{i}].{field}"),
                        "is for a stateful service (one with [stateful]); a stateless service's routes reach every instance",
                    );
                }
            }
        }
        if errors.is_empty() {
            Ok(ServiceSpec {
                name: self.name.clone(),
                replicas,
                run,
                startup,
                readiness,
                liveness,
                restart,
                stop,
                routes,
                balance,
                release,
                backup,
                stateful,
                autoscale,
                budget,
            })
        } else {
            Err(SpecErrors(errors))
        }
    }

    /// The file as TOML (what the store keeps).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a service file always serialises")
    }
}

impl Checker<'_> {
    fn backup(&mut self, b: &BackupSection) -> BackupHook {
        if b.command.first().is_none_or(|c| c.trim().is_empty()) {
            self.err(
                "backup.command",
                "give the program and its arguments, as in command = [\"pg_dump\", \"-Fc\", \"app\"]",
            );
        }
        if b.restore.as_ref().is_some_and(|r| r.first().is_none_or(|c| c.trim().is_empty())) {
            self.err(
                "backup.restore",
                "give the program that reads the backup on stdin, as in restore = [\"pg_restore\", \"-d\", \"app\"]",
            );
        }
        let timeout =
            self.duration("backup.timeout", b.timeout.as_deref(), Duration::from_secs(600), Duration::from_millis(100));
        let fail_backup = match b.on_error.as_deref().unwrap_or("fail") {
            "fail" => true,
            "continue" => false,
            other => {
                self.err("backup.on_error", format!("'{other}' is not accepted; accepted: fail, continue"));
                true
            }
        };
        BackupHook { command: b.command.clone(), restore: b.restore.clone(), timeout, fail_backup }
    }

    fn restart(&mut self, r: &RestartSection) -> RestartSpec {
        let policy = match r.policy.as_deref().unwrap_or("always") {
            "always" => RestartPolicy::Always,
            "on-failure" => RestartPolicy::OnFailure,
            "never" => RestartPolicy::Never,
            other => {
                self.err("restart.policy", format!("unknown policy '{other}'; accepted: always, on-failure, never"));
                RestartPolicy::Always
            }
        };
        let ms = Duration::from_millis;
        let backoff_initial = self.duration("restart.backoff_initial", r.backoff_initial.as_deref(), ms(200), ms(10));
        let backoff_max =
            self.duration("restart.backoff_max", r.backoff_max.as_deref(), Duration::from_secs(30), ms(10));
        if backoff_max < backoff_initial {
            self.err("restart.backoff_max", "must not be shorter than restart.backoff_initial");
        }
        let crash_loop_restarts = r.crash_loop_restarts.unwrap_or(5).max(1);
        let crash_loop_window = self.duration(
            "restart.crash_loop_window",
            r.crash_loop_window.as_deref(),
            Duration::from_secs(60),
            ms(100),
        );
        RestartSpec { policy, backoff_initial, backoff_max, crash_loop_restarts, crash_loop_window }
    }

    fn stop(&mut self, s: &StopSection) -> StopSpec {
        let signal = match s.signal.as_deref().unwrap_or("TERM").trim_start_matches("SIG") {
            "TERM" => StopSignal::Term,
            "INT" => StopSignal::Int,
            "QUIT" => StopSignal::Quit,
            "HUP" => StopSignal::Hup,
            "USR1" => StopSignal::Usr1,
            "USR2" => StopSignal::Usr2,
            other => {
                self.err(
                    "stop.signal",
                    format!("unknown signal '{other}'; accepted: TERM, INT, QUIT, HUP, USR1, USR2"),
                );
                StopSignal::Term
            }
        };
        let grace_period =
            self.duration("stop.grace_period", s.grace_period.as_deref(), Duration::from_secs(10), Duration::ZERO);
        StopSpec { signal, grace_period }
    }

    fn route(&mut self, i: usize, r: &RouteSection) -> RouteSpec {
        let f = |name: &str| format!("routes[{i}].{name}");
        let host = r.host.as_deref().and_then(|h| HostMatch::parse(h).map_err(|e| self.err(&f("host"), e)).ok());
        let path = match (&r.path_prefix, &r.path) {
            (Some(_), Some(_)) => {
                self.err(&f("path"), "set path_prefix or path, not both");
                PathMatch::Prefix("/".into())
            }
            (Some(p), None) | (None, Some(p)) if rules::path(p).is_err() => {
                let e = rules::path(p).unwrap_err();
                self.err(&f(if r.path.is_some() { "path" } else { "path_prefix" }), e);
                PathMatch::Prefix("/".into())
            }
            (None, Some(p)) => PathMatch::Exact(p.clone()),
            (Some(p), None) => PathMatch::Prefix(p.clone()),
            (None, None) => PathMatch::Prefix("/".into()),
        };
        let role = match (r.role.as_deref(), r.max_lag) {
            (None | Some("primary"), None) => RouteRole::Primary,
            (Some("replica"), max_lag) => RouteRole::Replica { max_lag },
            (None | Some("primary"), Some(_)) => {
                self.err(&f("max_lag"), "is for role = \"replica\" routes (the primary is never behind)");
                RouteRole::Primary
            }
            (Some(other), _) => {
                self.err(&f("role"), format!("'{other}' is not a role; accepted: primary, replica"));
                RouteRole::Primary
            }
        };
        RouteSpec { host, path, role }
    }

    fn balance(&mut self, b: &BalanceSection) -> BalanceSpec {
        let policy = b.policy.as_deref().unwrap_or("round_robin").parse().unwrap_or_else(|e: String| {
            self.err("balance.policy", e);
            Policy::RoundRobin
        });
        let hash_key =
            b.hash_key.as_deref().and_then(|k| k.parse().map_err(|e: String| self.err("balance.hash_key", e)).ok());
        if b.hash_key.is_none() {
            let _ = rules::hash_key(policy, None).map_err(|e| self.err("balance.hash_key", e));
        }
        let mut retry = RetryPolicy::default();
        if let Some(n) = b.retries {
            retry.attempts =
                rules::retries(n).map_err(|e| self.err("balance.retries", e)).unwrap_or(rules::MAX_RETRIES);
        }
        if let Some(t) = &b.try_timeout {
            match values::Adaptive::parse(t) {
                Ok(t) => retry.try_timeout = t,
                Err(e) => self.err("balance.try_timeout", e),
            }
        }
        if let Some(t) = &b.hedge {
            match values::Adaptive::parse(t) {
                Ok(t) => retry.hedge = t,
                Err(e) => self.err("balance.hedge", e),
            }
        }
        if let Some(st) = &b.retry_statuses {
            let _ = rules::retry_statuses(st).map_err(|e| self.err("balance.retry_statuses", e));
            retry.statuses = st.clone();
        }
        let d = Timeouts::default();
        let connect = b.connect_timeout.as_deref().map_or(d.connect, |v| {
            rules::connect_timeout(v).map_err(|e| self.err("balance.connect_timeout", e)).unwrap_or(d.connect)
        });
        let opt = |c: &mut Self, name: &str, v: Option<&str>, default: Option<Duration>| match v {
            None => default,
            Some(v) => rules::optional_timeout(v).map_err(|e| c.err(&format!("balance.{name}"), e)).unwrap_or(default),
        };
        let first_byte = opt(self, "first_byte_timeout", b.first_byte_timeout.as_deref(), d.first_byte);
        let request = opt(self, "request_timeout", b.request_timeout.as_deref(), d.request);
        let idle = opt(self, "idle_timeout", b.idle_timeout.as_deref(), d.idle);
        let tunnel = opt(self, "tunnel_timeout", b.tunnel_timeout.as_deref(), d.tunnel);
        let max_in_flight = b
            .max_in_flight
            .and_then(|m| rules::max_in_flight(m).map_err(|e| self.err("balance.max_in_flight", e)).ok());
        let rate_limit = match (&b.rate_limit, b.rate_limit_burst) {
            (Some(r), burst) => values::RateLimit::parse(r, burst).map_err(|e| self.err("balance.rate_limit", e)).ok(),
            (None, Some(_)) => {
                self.err("balance.rate_limit_burst", "is for a rate_limit; set rate_limit = \"N/s\" too");
                None
            }
            (None, None) => None,
        };
        BalanceSpec {
            policy,
            hash_key,
            session_cookie: b.session_cookie.clone().filter(|c| !c.is_empty()),
            retry,
            timeouts: Timeouts { connect, first_byte, request, idle, tunnel },
            max_in_flight,
            rate_limit,
        }
    }
}

#[cfg(test)]
mod tests;
