use std::time::Duration;

use super::*;

const FULL: &str = r#"
name = "web"
replicas = 3
[run]
command = "halo"
args = ["demo-app", "--version", "v1"]
env = { GREETING = "hello" }
[readiness]
http = "/healthz"
interval = "500ms"
[liveness]
http = "/healthz"
failure_threshold = 2
[restart]
policy = "on-failure"
backoff_initial = "100ms"
backoff_max = "5s"
[stop]
signal = "SIGINT"
grace_period = "3s"
[[routes]]
host = "*.example.com"
path_prefix = "/api"
[balance]
policy = "consistent_hash"
hash_key = "header:x-user"
retries = 1
connect_timeout = "500ms"
"#;

#[test]
fn a_full_file_validates() {
    let (file, spec) = parse_service("app.toml", FULL).unwrap();
    assert_eq!((spec.name.as_str(), spec.replicas), ("web", 3));
    assert_eq!(spec.readiness.check, Check::Http("/healthz".into()));
    assert_eq!(spec.readiness.interval, Duration::from_millis(500));
    assert_eq!(spec.liveness.as_ref().unwrap().failure_threshold, 2);
    assert_eq!(spec.restart.policy, RestartPolicy::OnFailure);
    assert_eq!(spec.stop, StopSpec { signal: StopSignal::Int, grace_period: Duration::from_secs(3) });
    assert_eq!(spec.routes[0].path, PathMatch::Prefix("/api".into()));
    assert_eq!(spec.balance.policy, Policy::ConsistentHash);
    assert_eq!(spec.balance.timeouts.connect, Duration::from_millis(500));
    // What the store keeps reads back to the same spec.
    let (again, spec2) = parse_service("stored", &file.to_toml()).unwrap();
    assert_eq!((again, spec2), (file, spec));
}

#[test]
fn defaults_are_safe() {
    let (_, spec) = parse_service("min.toml", "name = \"api\"\n[run]\ncommand = \"/bin/app\"\n").unwrap();
    assert_eq!(spec.replicas, 1);
    assert_eq!(spec.readiness.check, Check::Tcp);
    assert!(spec.liveness.is_none());
    assert_eq!(spec.restart.policy, RestartPolicy::Always);
    assert_eq!(spec.stop.signal, StopSignal::Term);
    assert_eq!(spec.routes.len(), 0);
}

#[test]
fn every_bad_field_is_named_with_what_is_accepted() {
    let bad = r#"
name = "Web_1"
replicas = 5000
[run]
command = ""
env = { PORT = "1" }
[readiness]
http = "healthz"
tcp = true
[restart]
policy = "sometimes"
backoff_initial = "5"
[stop]
signal = "KILL"
[[routes]]
path = "x"
[balance]
policy = "fastest"
retry_statuses = [404]
"#;
    let errs = parse_service("bad.toml", bad).unwrap_err().0;
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    for want in [
        "name",
        "replicas",
        "run.command",
        "run.env.PORT",
        "readiness",
        "restart.policy",
        "restart.backoff_initial",
        "stop.signal",
        "routes[0].path",
        "balance.policy",
        "balance.retry_statuses",
    ] {
        assert!(fields.contains(&want), "no error for {want}: {errs:?}");
    }
    let policy = errs.iter().find(|e| e.field == "restart.policy").unwrap();
    assert!(policy.message.contains("always, on-failure, never"), "{}", policy.message);
}

#[test]
fn unknown_fields_and_syntax_errors_say_where() {
    let e = parse_service("typo.toml", "name = \"a\"\nreplica = 2\n[run]\ncommand = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("typo.toml:2") && e.to_string().contains("replica"), "{e}");
    let e = parse_service("syntax.toml", "name = \n").unwrap_err();
    assert!(e.to_string().contains("syntax.toml:1"), "{e}");
}

#[test]
fn try_timeouts_parse() {
    use values::Adaptive;
    assert_eq!(Adaptive::parse("auto"), Ok(Adaptive::Auto));
    assert_eq!(Adaptive::parse("300ms"), Ok(Adaptive::Fixed(Duration::from_millis(300))));
    assert_eq!(Adaptive::parse("off"), Ok(Adaptive::Off));
    assert!(Adaptive::parse("0").unwrap_err().contains("\"off\""));
    let text = "name = \"web\"\n[run]\ncommand = \"/bin/app\"\n[balance]\ntry_timeout = \"soon\"\n";
    let e = parse_service("x.toml", text).unwrap_err().to_string();
    assert!(e.contains("balance.try_timeout") && e.contains("\"auto\""), "{e}");
}

#[test]
fn a_docker_service_validates_and_reads_back() {
    let text = r#"
name = "web"
[run]
driver = "docker"
image = "myapp:1.4"
pull = "never"
port = 8080
env = { RUST_LOG = "info" }
volumes = ["data:/var/lib/app", "/etc/app:/etc/app:ro"]
cpus = 0.5
memory = "256MiB"
"#;
    let (file, spec) = parse_service("docker.toml", text).unwrap();
    let RunDriver::Docker(d) = &spec.run.driver else { panic!("docker expected: {:?}", spec.run.driver) };
    assert_eq!((d.image.as_str(), d.pull, d.port), ("myapp:1.4", Pull::Never, 8080));
    assert_eq!((d.nano_cpus, d.memory), (Some(500_000_000), Some(256 << 20)));
    assert_eq!(d.volumes[1].bind(), "/etc/app:/etc/app:ro");
    assert_eq!(spec.run.command, "", "the image's own command");
    let (again, spec2) = parse_service("stored", &file.to_toml()).unwrap();
    assert_eq!((again, spec2), (file, spec));
}

#[test]
fn docker_mistakes_are_named() {
    let text = "name = \"web\"\n[run]\ndriver = \"docker\"\nvolumes = [\"data\"]\ncpus = 0\nmemory = \"1MiB\"\npull = \"sometimes\"\n";
    let e = parse_service("bad.toml", text).unwrap_err().to_string();
    for want in [
        "run.image: is required",
        "run.port: is required",
        "run.volumes[0]: 'data' does not parse",
        "run.cpus: 0 is not accepted",
        "run.memory: 1048576 bytes is below",
        "run.pull: 'sometimes' is not accepted; accepted: never, if_missing, always",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    let e = parse_service("x.toml", "name = \"web\"\n[run]\ncommand = \"/bin/app\"\nimage = \"app:1\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("run.image: only applies with driver = \"docker\""), "{e}");
    let e = parse_service("x.toml", "name = \"web\"\n[run]\ndriver = \"podman\"\n").unwrap_err().to_string();
    assert!(e.contains("run.driver: 'podman' is not accepted; accepted: exec, docker"), "{e}");
    let e = parse_service("x.toml", "name = \"web\"\n[run]\nargs = []\n").unwrap_err().to_string();
    assert!(e.contains("run.command: is required"), "{e}");
}

#[test]
fn every_error_of_a_file_is_reported_at_once_with_line_and_column() {
    let text = "name = \"web\"\nreplicas = \"three\"\n[run]\ncommand = \"x\"\nagrs = [\"a\"]\n[readiness]\n  interval = \"fast\"\n[restart]\npolicy = \"sometimes\"\n";
    let errs = parse_service("svc.toml", text).unwrap_err();
    let s = errs.to_string();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 4, "{s}");
    assert!(lines[0].starts_with("svc.toml:2:12: replicas: expected a whole number"), "{s}");
    assert!(lines[1].starts_with("svc.toml:5:1: run.agrs: unknown field 'agrs' (did you mean 'args'?)"), "{s}");
    assert!(lines[2].starts_with("svc.toml:7:3: readiness.interval:"), "{s}");
    assert!(lines[3].starts_with("svc.toml:9:1: restart.policy: unknown policy 'sometimes'"), "{s}");
}

#[test]
fn a_node_or_proxy_file_is_named_for_what_it_is() {
    let e = parse_service("n.toml", "[node]\napi = \"127.0.0.1:7070\"\n").unwrap_err().to_string();
    assert!(e.contains("this is a node file") && e.contains("halo up -c FILE"), "{e}");
    let e = parse_service("p.toml", "[[listeners]]\nlisten = \"127.0.0.1:1\"\n").unwrap_err().to_string();
    assert!(e.contains("this is a proxy file") && e.contains("halo proxy -c FILE"), "{e}");
}

#[test]
fn a_stored_file_with_more_retries_than_accepted_still_reads_and_runs_with_the_cap() {
    let text = "name = \"web\"\n[run]\ncommand = \"x\"\n[balance]\nretries = 50\n";
    let e = parse_service("new.toml", text).unwrap_err();
    assert!(e.to_string().contains("accepted: 0 to 10 retries"), "{e}");
    let (file, spec) = crate::parse_stored_service("/halo/services/web", text).unwrap();
    assert_eq!(file.balance.unwrap().retries, Some(50), "the file stays as stored");
    assert_eq!(spec.balance.retry.attempts, 10);
    assert!(crate::parse_stored_service(
        "k",
        "name = \"web\"\n[run]\ncommand = \"x\"\n[balance]\nretries = 5\npolicy = \"x\"\n"
    )
    .is_err());
}

#[test]
fn a_stateful_service_needs_its_hooks_only_with_replicas_and_every_bad_field_is_named() {
    let base = "name = \"pg\"\n[run]\ncommand = \"x\"\n";
    // One instance: stable name and data, no hooks needed.
    let (_, spec) = parse_service("s.toml", &format!("{base}[stateful]\n")).unwrap();
    let s = spec.stateful.as_ref().unwrap();
    assert!(!spec.replicated());
    assert_eq!(s.replace_after, Some(std::time::Duration::from_secs(300)));
    assert_eq!(s.failure_threshold, 3);
    // Three: a primary and replicas, which need promote, follow, position, clone.
    let e = parse_service("s.toml", "name = \"pg\"\nreplicas = 3\n[run]\ncommand = \"x\"\n[stateful]\n")
        .unwrap_err()
        .to_string();
    for hook in ["promote", "follow", "position", "clone"] {
        assert!(e.contains(&format!("stateful.{hook}: is needed with 3 replicas")), "{e}");
    }
    let hooks = "promote = [\"p\"]\nfollow = [\"f\"]\nposition = [\"q\"]\nclone = [\"c\"]\n";
    let ok =
        format!("name = \"pg\"\nreplicas = 3\n[run]\ncommand = \"x\"\n[stateful]\n{hooks}replace_after = \"never\"\n");
    let (_, spec) = parse_service("s.toml", &ok).unwrap();
    assert!(spec.replicated());
    assert_eq!(spec.stateful.unwrap().replace_after, None);
    for (extra, field, words) in [
        ("replace_after = \"soon\"\n", "stateful.replace_after", "or \"never\""),
        ("replace_after = \"10ms\"\n", "stateful.replace_after", "too short"),
        ("data = \"relative/{instance}\"\n", "stateful.data", "absolute path with {instance}"),
        ("data = \"/srv/pg\"\n", "stateful.data", "absolute path with {instance}"),
        ("rewind = []\n", "stateful.rewind", "give the program"),
        ("failure_threshold = 0\n", "stateful.failure_threshold", "at least 1"),
        ("hook_timeout = \"x\"\n", "stateful.hook_timeout", "not a duration"),
    ] {
        let text = format!("name = \"pg\"\nreplicas = 3\n[run]\ncommand = \"x\"\n[stateful]\n{hooks}{extra}");
        let e = parse_service("s.toml", &text).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{extra}: {e}");
    }
}

#[test]
fn a_replicated_stateful_service_runs_on_the_exec_driver() {
    let hooks = "promote = [\"p\"]\nfollow = [\"f\"]\nposition = [\"q\"]\nclone = [\"c\"]\n";
    let text = format!(
        "name = \"pg\"\nreplicas = 2\n[run]\ndriver = \"docker\"\nimage = \"pg\"\nport = 5432\n[stateful]\n{hooks}"
    );
    let e = parse_service("s.toml", &text).unwrap_err().to_string();
    assert!(e.contains("run.driver: a stateful service with replicas") && e.contains("accepted: exec"), "{e}");
    // One instance with no replication hooks: a named volume, no primary.
    let one = text.replace("replicas = 2", "replicas = 1").replace(hooks, "");
    assert!(parse_service("s.toml", &one).is_ok());
    // Replication hooks make a primary, even of one instance.
    let e = parse_service("s.toml", &text.replace("replicas = 2", "replicas = 1")).unwrap_err().to_string();
    assert!(e.contains("run.driver"), "{e}");
    let e = parse_service("s.toml", "name = \"pg\"\n[run]\ncommand = \"x\"\n[stateful]\npromote = [\"p\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("stateful.follow: is needed with the other replication hooks"), "{e}");
}

#[test]
fn a_route_role_is_for_stateful_services_and_max_lag_for_replica_routes() {
    let e = parse_service("s.toml", "name = \"web\"\n[run]\ncommand = \"x\"\n[[routes]]\nrole = \"replica\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("routes[0].role: is for a stateful service"), "{e}");
    let stateful = "name = \"pg\"\n[run]\ncommand = \"x\"\n[stateful]\n";
    let e = parse_service("s.toml", &format!("{stateful}[[routes]]\nrole = \"leader\"\n")).unwrap_err().to_string();
    assert!(e.contains("routes[0].role: 'leader' is not a role; accepted: primary, replica"), "{e}");
    let e = parse_service("s.toml", &format!("{stateful}[[routes]]\nmax_lag = 5\n")).unwrap_err().to_string();
    assert!(e.contains("routes[0].max_lag: is for role = \"replica\" routes"), "{e}");
    let (_, spec) =
        parse_service("s.toml", &format!("{stateful}[[routes]]\nrole = \"replica\"\nmax_lag = 5\n")).unwrap();
    assert_eq!(spec.routes[0].role, crate::RouteRole::Replica { max_lag: Some(5) });
}
