//! What ships beside the binary: the Debian package (`scripts/package.sh`)
//! with its systemd units, completions and manual pages, and the Grafana
//! dashboard, whose every query must use metrics a real node serves.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use halo_testkit::{eventually, Client, Halo, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_halo");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_has_the_binary_units_defaults_completions_and_man_pages_and_its_units_verify() {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        assert!(
            std::env::var("HALO_REQUIRE_CHROMIUM").is_err(),
            "dpkg-deb is missing where the test deps were installed"
        );
        eprintln!("SKIPPED the package test: no dpkg-deb");
        return;
    }
    let dir = TempDir::new("deb");
    let deb =
        run(Command::new(format!("{ROOT}/scripts/package.sh")).args(["--bin", BIN, "--fast", "--out"]).arg(&dir.0));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb") && Path::new(deb).exists(), "{deb}");
    let field = |f: &str| run(Command::new("dpkg-deb").args(["-f", deb, f])).trim().to_string();
    assert_eq!(field("Package"), "halo");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").contains("adduser"));
    let listing = run(Command::new("dpkg-deb").args(["-c", deb]));
    for path in [
        "./usr/bin/halo",
        "./lib/systemd/system/halo-up.service",
        "./lib/systemd/system/halo-agent.service",
        "./lib/systemd/system/halo-proxy.service",
        "./etc/halo/halo.toml",
        "./etc/halo/agent.toml",
        "./etc/halo/proxy.toml",
        "./etc/default/halo-agent",
        "./usr/share/bash-completion/completions/halo",
        "./usr/share/zsh/vendor-completions/_halo",
        "./usr/share/man/man1/halo.1.gz",
        "./usr/share/man/man1/halo-up.1.gz",
        "./usr/share/doc/halo/copyright",
        "./usr/share/doc/halo/grafana-dashboard.json",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "{path} missing from the package:\n{listing}");
    }
    assert!(listing.lines().all(|l| l.contains("root/root")), "files not owned by root:\n{listing}");
    let root = dir.0.join("root");
    run(Command::new("dpkg-deb").args(["-x", deb]).arg(&root));
    let control = dir.0.join("control");
    run(Command::new("dpkg-deb").args(["-e", deb]).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(conffiles.contains("/etc/halo/halo.toml") && conffiles.contains("/etc/default/halo-agent"), "{conffiles}");
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group") && postinst.contains("/var/lib/halo"), "{postinst}");
    // The packaged binary runs, and the packaged defaults validate.
    let version = run(Command::new(root.join("usr/bin/halo")).arg("--version"));
    assert!(version.starts_with("halo "), "{version}");
    for f in ["halo.toml", "agent.toml", "proxy.toml"] {
        run(Command::new(root.join("usr/bin/halo")).args(["check", "-c"]).arg(root.join("etc/halo").join(f)));
    }
    // The units, as systemd reads them (with the unpacked binary in place
    // of /usr/bin/halo, where it is not installed).
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED systemd-analyze verify: not installed");
        return;
    }
    let units = dir.0.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let bin = root.join("usr/bin/halo");
    for unit in ["halo-up.service", "halo-agent.service", "halo-proxy.service"] {
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        assert!(
            text.contains("NoNewPrivileges=yes") && text.contains("ProtectSystem=strict"),
            "{unit} is not hardened"
        );
        assert!(text.contains("Type=notify") && text.contains("User=halo"), "{unit}");
        std::fs::write(units.join(unit), text.replace("/usr/bin/halo", &bin.to_string_lossy())).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(["halo-up.service", "halo-agent.service", "halo-proxy.service"].map(|u| units.join(u)))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Only what concerns our units: verify also reads the host's units.
    let ours: Vec<&str> = said.lines().filter(|l| l.contains("halo-")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{said}");
}

/// Metric names in a PromQL expression (`halo_...`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("halo_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Labels an expression groups by (`by (route, le)`).
fn grouped_by(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .filter_map(|s| s.split_once(')'))
        .flat_map(|(labels, _)| labels.split(',').map(|l| l.trim().to_string()).collect::<Vec<_>>())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_query_uses_metrics_and_labels_a_node_serves() {
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/grafana/halo.json")).unwrap()).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // A node with scheduled backups and traffic, so every family has samples.
    let dir = TempDir::new("grafana");
    let node = format!("{}\n[backup]\nevery = \"1s\"\ndir = \"{}\"\n", halo_testkit::quickstart(2), dir.0.display());
    let h = Halo::up(BIN, &node).unwrap();
    let c = Client::new();
    eventually(Duration::from_secs(20), "answered requests and a backup in /metrics", || async {
        let answered = c.get(&h.url("http", "/")).await.is_ok_and(|r| r.status == 200);
        let m = metrics(&c, &h).await;
        answered && m.contains("halo_endpoint_up{") && m.contains("halo_backup_last_success_timestamp_seconds ")
    })
    .await;
    // And a canary under way, for the rollout families.
    let canary = format!("{ROOT}/examples/canary.toml");
    let (code, _, err) = h.cli(&["apply", "-f", &canary]);
    assert_eq!(code, 0, "{err}");
    eventually(Duration::from_secs(20), "a rollout in /metrics", || async {
        metrics(&c, &h).await.contains("halo_rollout_canary_weight_percent{")
    })
    .await;
    let m = metrics(&c, &h).await;
    let samples: Vec<&str> = m.lines().filter(|l| !l.starts_with('#')).collect();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "no halo metric in {e}");
        for n in &names {
            let has = |l: &&str| l.starts_with(&format!("{n}{{")) || l.starts_with(&format!("{n} "));
            assert!(samples.iter().any(has), "{n} (in {e}) is not in /metrics:\n{m}");
        }
        // `instance` and `job` are the scrape target's, added by Prometheus.
        for label in grouped_by(e).iter().filter(|l| !["le", "instance", "job"].contains(&l.as_str())) {
            let labelled = samples
                .iter()
                .any(|l| names.iter().any(|n| l.starts_with(&format!("{n}{{"))) && l.contains(&format!("{label}=\"")));
            assert!(labelled, "no sample of {names:?} has the label {label} (in {e})");
        }
    }
}

async fn metrics(c: &Client, h: &Halo) -> String {
    let req = http::Request::get(h.api_url("/metrics"))
        .header("authorization", format!("Bearer {}", h.token()))
        .body(http_body_util::Full::default())
        .unwrap();
    c.send(req).await.map(|r| r.body).unwrap_or_default()
}
