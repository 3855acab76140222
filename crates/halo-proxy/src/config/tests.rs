use super::*;

const GOOD: &str = r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
upstream = "web"

[upstreams.web]
endpoints = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 3 }]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = parse("t.toml", GOOD).unwrap();
    assert_eq!(c.listeners[0].name, "listener0");
    assert_eq!(c.routes[0].split, vec![("web".to_string(), 1)]);
    let u = &c.upstreams["web"];
    assert_eq!(u.endpoints[1].weight, 3);
    assert_eq!(u.policy, Policy::RoundRobin);
    assert_eq!(c.routes[0].retry, RetryPolicy::default());
    assert!(u.health.is_some() && u.outlier.is_some());
}

#[test]
fn example_file_is_valid() {
    // Loaded by path: its TLS files are relative to it.
    load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/proxy.toml"))).unwrap();
}

#[test]
fn unknown_field_names_line() {
    let text = "[[listeners]]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n";
    let e = parse("t.toml", text).unwrap_err();
    assert_eq!(e.0[0].line, 3, "{e}");
    assert!(e.to_string().contains("lisen"), "{e}");
}

#[test]
fn bad_values_are_all_reported_with_field_and_accepted_values() {
    let text = r#"
[[listeners]]
listen = "localhost:80"

[[routes]]
upstream = "nope"

[upstreams.web]
policy = "fastest"
endpoints = ["127.0.0.1:1"]

[upstreams.web.health]
interval = "5 parsecs"
"#;
    let e = parse("t.toml", text).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("t.toml:3: listeners[0].listen"), "{s}");
    assert!(s.contains("no upstream named 'nope'"), "{s}");
    assert!(s.contains("t.toml:9: upstreams.web.policy") && s.contains("accepted: round_robin"), "{s}");
    assert!(s.contains("upstreams.web.health.interval"), "{s}");
    assert_eq!(e.0.len(), 4, "{s}");
}

#[test]
fn consistent_hash_needs_a_key() {
    let text = GOOD.replace("[upstreams.web]", "[upstreams.web]\npolicy = \"consistent_hash\"");
    let e = parse("t.toml", &text).unwrap_err();
    assert!(e.to_string().contains("hash_key"), "{e}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("10").unwrap_err().contains("no unit"));
    assert!(parse_duration("3d").unwrap_err().contains("accepted"));
}

#[test]
fn zero_turns_optional_timeouts_off() {
    let text =
        GOOD.replace("upstream = \"web\"", "upstream = \"web\"\ntimeouts = { first_byte = \"0\", request = \"5s\" }");
    let c = parse("t.toml", &text).unwrap();
    assert_eq!(c.routes[0].timeouts.first_byte, None);
    assert_eq!(c.routes[0].timeouts.request, Some(Duration::from_secs(5)));
}

/// A route setting means the same in a proxy file as in a service file's
/// `[balance]`: refused in one, refused in the other with the same words.
#[test]
fn service_files_and_proxy_files_share_one_set_of_route_rules() {
    let cases = [
        ("retries = 11", "retry = { attempts = 11 }"),
        ("retry_statuses = [404]", "retry = { statuses = [404] }"),
        ("connect_timeout = \"0\"", "timeouts = { connect = \"0\" }"),
        ("idle_timeout = \"soon\"", "timeouts = { idle = \"soon\" }"),
        ("max_in_flight = 0", "max_in_flight = 0"),
        ("policy = \"consistent_hash\"", "policy = \"consistent_hash\""),
    ];
    for (service, proxy) in cases {
        let svc = format!("name = \"web\"\n[run]\ncommand = \"x\"\n[balance]\n{service}\n");
        let svc_err = halo_model::parse_service("s.toml", &svc).unwrap_err();
        let file = if proxy.starts_with("retry") || proxy.starts_with("timeouts") {
            format!("[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"web\"\n{proxy}\n[upstreams.web]\nendpoints = [\"127.0.0.1:1\"]\n")
        } else {
            format!("[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"127.0.0.1:1\"]\n{proxy}\n")
        };
        let proxy_err = parse("p.toml", &file).unwrap_err();
        let (a, b) = (&svc_err.0[0].message, &proxy_err.0[0].message);
        assert_eq!(a, b, "{service} / {proxy}: {svc_err} / {proxy_err}");
    }
    // Accepted alike: the bounds themselves.
    let svc = "name = \"web\"\n[run]\ncommand = \"x\"\n[balance]\nretries = 10\nretry_statuses = [500, 599]\n";
    let spec = halo_model::parse_service("s.toml", svc).unwrap().1;
    let file = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"web\"\n\
                retry = { attempts = 10, statuses = [500, 599] }\n[upstreams.web]\nendpoints = [\"127.0.0.1:1\"]\n";
    let cfg = parse("p.toml", file).unwrap();
    assert_eq!(
        (spec.balance.retry.attempts, &spec.balance.retry.statuses),
        (cfg.routes[0].retry.attempts, &cfg.routes[0].retry.statuses)
    );
}

#[test]
fn hedges_and_failure_rates_are_checked() {
    let good = format!(
        "{GOOD}\n[upstreams.web.outlier]\nfailure_rate_interval = \"2s\"\nfailure_rate_min_requests = 10\n\
         failure_rate_excess_percent = 20\n"
    );
    let c = parse("t.toml", &good.replace("upstream = \"web\"", "upstream = \"web\"\nretry = { hedge = \"auto\" }"))
        .unwrap();
    assert_eq!(c.routes[0].retry.hedge, halo_model::values::Adaptive::Auto);
    let rate = c.upstreams["web"].outlier.as_ref().unwrap().failure_rate.clone().unwrap();
    assert_eq!((rate.interval, rate.min_requests, rate.excess_percent), (Duration::from_secs(2), 10, 20));
    let off = format!("{GOOD}\n[upstreams.web.outlier]\nfailure_rate_interval = \"off\"\n");
    assert_eq!(parse("t.toml", &off).unwrap().upstreams["web"].outlier.as_ref().unwrap().failure_rate, None);

    let bad = format!(
        "{GOOD}\n[upstreams.web.outlier]\nfailure_rate_interval = \"0s\"\nfailure_rate_min_requests = 0\n\
         failure_rate_excess_percent = 0\n"
    )
    .replace("upstream = \"web\"", "upstream = \"web\"\nretry = { hedge = \"soon\" }");
    let s = parse("t.toml", &bad).unwrap_err().to_string();
    assert!(s.contains("routes[0].retry.hedge") && s.contains("\"auto\""), "{s}");
    assert!(s.contains("upstreams.web.outlier.failure_rate_interval") && s.contains("\"off\""), "{s}");
    assert!(s.contains("upstreams.web.outlier.failure_rate_min_requests: must be at least 1"), "{s}");
    assert!(s.contains("failure_rate_excess_percent") && s.contains("1 to 100"), "{s}");
}
