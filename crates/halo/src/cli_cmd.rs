//! The CLI verbs that talk to a node's API: apply, status, scale, restart,
//! logs, delete, nodes, floating IPs, rollouts. They find the node and its
//! token in the data directory (`api.addr`, `token`), or through `--api` /
//! `HALO_API` and `HALO_TOKEN`. What they read is the API's own typed
//! views (`halo_control::StatusView`, ...), printed by [`crate::output`].

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use halo_api::ApiClient;
use halo_control::events::EventKind;
use halo_control::vip::VipStatus;
use halo_control::{Applied, ApplyOutcome, ClusterView, Outcome, RolloutView, StatusView};
use http::Method;

use crate::output::{render, table, Output};
use halo_model::clock::unix_secs;

/// The copy of `[node.tls] ca` a node keeps in its data directory, for
/// the CLI to check the API's certificate.
pub const API_CA: &str = "api-ca.pem";

#[derive(clap::Args, Clone)]
pub struct Target {
    /// The node's data directory, where its API address and token are.
    #[arg(long, global = true, default_value = "halo-data", env = "HALO_DATA_DIR")]
    data_dir: PathBuf,
    /// The node's API address, IP:PORT, or https://IP:PORT for an API with
    /// [node.tls] [default: read from the data directory].
    #[arg(long, global = true, env = "HALO_API")]
    api: Option<String>,
    /// The CA that signed an HTTPS API's certificate (PEM) [default: the
    /// data directory's api-ca.pem].
    #[arg(long, global = true, env = "HALO_API_CA")]
    api_ca: Option<PathBuf>,
}

impl Target {
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let (text, from) = match &self.api {
            Some(a) => (a.clone(), "--api".to_string()),
            None => {
                let f = self.data_dir.join("api.addr");
                let text = std::fs::read_to_string(&f).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read {}: {e} (is `halo up` running with this --data-dir? or pass --api)",
                        f.display()
                    )
                })?;
                (text.trim().to_string(), f.display().to_string())
            }
        };
        let (https, addr) = match text.split_once("://") {
            Some(("https", a)) => (true, a),
            Some(("http", a)) => (false, a),
            _ => (false, text.as_str()),
        };
        let addr: SocketAddr = addr.trim_end_matches('/').parse().map_err(|_| {
            anyhow::anyhow!("{from}: '{text}' is not accepted; use IP:PORT or https://IP:PORT, as in 127.0.0.1:7070")
        })?;
        let tls = if https {
            let ca = self.api_ca.clone().unwrap_or_else(|| self.data_dir.join(API_CA));
            if !ca.exists() {
                anyhow::bail!(
                    "the API at {addr} is HTTPS: give --api-ca FILE (or HALO_API_CA), the CA that signed its \
                     certificate ({} does not exist)",
                    ca.display()
                );
            }
            let tls = halo_proxy::config::UpstreamTls::new(Some(ca), true, None, false)
                .map_err(|e| anyhow::anyhow!("--api-ca: {e}"))?;
            Some(std::sync::Arc::new(tls))
        } else {
            None
        };
        // HALO_TOKEN, else the admin token, else (a user who may only
        // read) the read-only one.
        let token = match std::env::var("HALO_TOKEN") {
            Ok(t) => t,
            Err(_) => halo_api::token::read(&self.data_dir, halo_api::token::ADMIN)
                .or_else(|e| halo_api::token::read(&self.data_dir, halo_api::token::READ).map_err(|_| e))
                .map_err(|e| {
                    anyhow::anyhow!("cannot read the API token in {}: {e} (or set HALO_TOKEN)", self.data_dir.display())
                })?,
        };
        Ok(ApiClient { addr, token, tls })
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// GETs a typed view.
pub fn read<T: serde::de::DeserializeOwned>(t: &Target, path: &str) -> anyhow::Result<T> {
    let c = t.client()?;
    Ok(runtime()?.block_on(c.get(path))?)
}

/// Sends a change; prints what it did (`web: created`).
fn change(t: &Target, out: &Output, method: Method, path: &str, body: Option<String>) -> anyhow::Result<Outcome> {
    let c = t.client()?;
    let o = runtime()?.block_on(c.change(method, path, body.map(bytes::Bytes::from)))?;
    out.print(&o, |_| format!("{}: {}\n", o.name, o.outcome))?;
    Ok(o)
}

/// A duration as kubectl prints ages: `45s`, `3m10s`, `2h5m`, `4d3h`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The text of a service file: from FILE, or from standard input for `-`.
fn read_file(file: &Path) -> anyhow::Result<(String, String)> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read the service file from standard input")?;
        return Ok(("(stdin)".into(), text));
    }
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    Ok((file.display().to_string(), text))
}

pub fn apply(t: &Target, out: &Output, file: &Path, dry_run: bool, w: &WaitArgs) -> anyhow::Result<()> {
    let (name, text) = read_file(file)?;
    // Validate here too, so errors name the file the user wrote.
    let (file, _) = halo_model::parse_service(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !dry_run {
        let goal = w.wait.then(|| Goal::of_apply(t, &file)).transpose()?;
        change(t, out, Method::PUT, "/v1/services", Some(text))?;
        return goal.map_or(Ok(()), |g| wait(t, &g, w.timeout));
    }
    let c = t.client()?;
    let answer = runtime()?.block_on(c.call(Method::PUT, "/v1/services?dry_run=true", Some(text.into()), |_| {}))?;
    let plan: Applied = serde_json::from_slice(&answer).context("the node's answer to a dry run is not a plan")?;
    out.print(&plan, |_| plan_text(&plan))
}

/// What a dry run found: the change, as a diff of the stored file.
fn plan_text(p: &Applied) -> String {
    match (&p.before, p.outcome) {
        (_, ApplyOutcome::Unchanged) => format!("{}: unchanged (dry run)\n", p.name),
        (None, _) => {
            let mut s = format!("{}: would be created (dry run):\n", p.name);
            for l in p.after.lines() {
                s.push_str(&format!("+ {l}\n"));
            }
            s
        }
        (Some(before), _) => {
            let mut s = format!("{}: would be updated (dry run):\n", p.name);
            s.push_str(&diff(before, &p.after));
            s
        }
    }
}

/// A line diff (longest common subsequence): `- ` removed, `+ ` added,
/// two lines of context around each change, `  ...` for what is skipped.
pub fn diff(before: &str, after: &str) -> String {
    const CONTEXT: usize = 2;
    let (a, b): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', a[i]));
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', a[i]));
            i += 1;
        } else {
            lines.push(('+', b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|k| lines[*k].0 != ' ').collect();
    let near = |k: usize| changed.iter().any(|c| c.abs_diff(k) <= CONTEXT);
    let mut out = String::new();
    let mut skipped = false;
    for (k, (mark, line)) in lines.iter().enumerate() {
        if near(k) {
            if skipped {
                out.push_str("  ...\n");
                skipped = false;
            }
            out.push_str(&format!("{mark} {line}\n"));
        } else {
            skipped = true;
        }
    }
    out
}

/// Replica counts as `halo scale` takes them: 0 to the most a service may
/// ask for.
pub fn parse_replicas(s: &str) -> Result<u32, String> {
    let max = halo_model::MAX_REPLICAS;
    match s.parse::<i64>() {
        Ok(n) if (0..=i64::from(max)).contains(&n) => Ok(n as u32),
        Ok(n) if n < 0 => Err(format!("{n} replicas is not possible; accepted: 0 to {max}")),
        Ok(n) => Err(format!("{n} replicas is too many; accepted: 0 to {max}")),
        Err(_) => Err(format!("'{s}' is not a number of replicas; accepted: 0 to {max}")),
    }
}

pub fn scale(t: &Target, out: &Output, name: &str, replicas: u32) -> anyhow::Result<Outcome> {
    let body = serde_json::json!({ "replicas": replicas }).to_string();
    change(t, out, Method::POST, &format!("/v1/services/{name}/scale"), Some(body))
}

pub fn restart(t: &Target, out: &Output, name: &str) -> anyhow::Result<Outcome> {
    change(t, out, Method::POST, &format!("/v1/services/{name}/restart"), None)
}

pub fn switchover(t: &Target, out: &Output, name: &str, to: Option<&str>) -> anyhow::Result<Outcome> {
    let body = serde_json::json!({ "to": to }).to_string();
    change(t, out, Method::POST, &format!("/v1/services/{name}/switchover"), Some(body))
}

pub fn delete(t: &Target, out: &Output, name: &str) -> anyhow::Result<Outcome> {
    change(t, out, Method::DELETE, &format!("/v1/services/{name}"), None)
}

/// `halo rollout promote|abort|...`.
pub fn rollout_order(t: &Target, out: &Output, name: &str, order: &str) -> anyhow::Result<()> {
    change(t, out, Method::POST, &format!("/v1/services/{name}/rollout/{order}"), None).map(drop)
}

pub fn node_drain(t: &Target, out: &Output, name: &str, drain: bool) -> anyhow::Result<Outcome> {
    let verb = if drain { "drain" } else { "undrain" };
    change(t, out, Method::POST, &format!("/v1/nodes/{name}/{verb}"), None)
}

pub fn node_remove(t: &Target, out: &Output, name: &str) -> anyhow::Result<()> {
    change(t, out, Method::DELETE, &format!("/v1/nodes/{name}"), None).map(drop)
}

/// `halo rollout status`: one screen of the rollout, or one a second with
/// `--watch` until it ends.
pub fn rollout_status(t: &Target, out: &Output, name: &str, watch: bool) -> anyhow::Result<()> {
    loop {
        let v: RolloutView = read(t, &format!("/v1/services/{name}/rollout"))?;
        out.print(&v, |_| rollout_text(&v))?;
        if !watch || !(v.state == "progressing" || v.state == "paused") {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn rollout_text(v: &RolloutView) -> String {
    let steps: Vec<String> =
        v.steps.iter().map(|s| format!("{}% for {}s", s.weight, s.pause_ms as f64 / 1000.0)).collect();
    let mut out = format!(
        "{}: canary {} (step {} of {}: {}), canary weight now {}%\n",
        v.service,
        v.state,
        v.step,
        steps.len(),
        steps.join(", "),
        v.weight
    );
    let mut t = table(&["REVISION", "TEMPLATE", "PLACED", "READY"]);
    for (what, r) in [("canary", &v.canary), ("stable", &v.stable)] {
        t.add_row(vec![what.to_string(), r.template.clone(), r.placed.to_string(), r.ready.to_string()]);
    }
    out.push_str(&render(t, 2));
    out.push_str(&format!("  windows passed in this step {}, failed {}\n", v.passed_windows, v.failed_windows));
    for w in &v.windows {
        out.push_str(&format!("  window {}: {}\n", w.verdict, w.detail));
    }
    out.push_str(&format!("  {}\n", v.reason));
    out
}

/// Prints the service file as the node stores it (`-o json|yaml`: as data).
pub fn get(t: &Target, out: &Output, name: &str) -> anyhow::Result<()> {
    let c = t.client()?;
    let text = runtime()?.block_on(c.call(Method::GET, &format!("/v1/services/{name}"), None, |_| {}))?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let value: toml::Value = toml::from_str(&text).context("the stored service file is not TOML")?;
    out.print(&value, |_| text.clone())
}

pub fn logs(t: &Target, name: &str, follow: bool, instance: Option<&str>, lines: usize) -> anyhow::Result<()> {
    let c = t.client()?;
    let mut path = format!("/v1/services/{name}/logs?lines={lines}&follow={follow}");
    if let Some(i) = instance {
        path.push_str(&format!("&instance={i}"));
    }
    let mut out = std::io::stdout();
    runtime()?.block_on(c.call(Method::GET, &path, None, |chunk| {
        let _ = out.write_all(chunk);
        let _ = out.flush();
    }))?;
    Ok(())
}

pub fn node_list(t: &Target, out: &Output) -> anyhow::Result<()> {
    let v: ClusterView = read(t, "/v1/nodes")?;
    out.print(&v, |wide| nodes_text(&v, wide))
}

/// `halo vip list`.
pub fn vip_list(t: &Target, out: &Output) -> anyhow::Result<()> {
    let vips: Vec<VipStatus> = read(t, "/v1/vips")?;
    let now_ms = unix_secs() * 1000;
    out.print(&vips, |wide| vips_text(&vips, now_ms, wide))
}

fn vips_text(vips: &[VipStatus], now_ms: u64, wide: bool) -> String {
    if vips.is_empty() {
        return "no floating IPs (declare them with [[vip]] in node files)\n".into();
    }
    let mut header = vec!["ADDRESS", "HOLDER", "SINCE", "TOKEN", "NODES"];
    if wide {
        header.insert(2, "INTERFACE");
    }
    let mut t = table(&header);
    let mut reasons = Vec::new();
    for v in vips {
        let since = v.since_ms.map_or("-".to_string(), |s| format!("{} ago", age(now_ms.saturating_sub(s) / 1000)));
        let nodes: Vec<String> = v
            .nodes
            .iter()
            .map(|(n, c)| {
                if let Some(r) = &c.reason {
                    reasons.push(format!("  {} on {n}: {r}", v.address));
                }
                match (c.eligible, c.healthy) {
                    (true, true) => n.clone(),
                    (false, _) => format!("{n}(not eligible)"),
                    (true, false) => format!("{n}(check failing)"),
                }
            })
            .collect();
        let mut row = vec![
            v.address.clone(),
            v.holder.clone().unwrap_or_else(|| "(none)".into()),
            since,
            v.token.map_or("-".to_string(), |t| t.to_string()),
            nodes.join(" "),
        ];
        if wide {
            row.insert(2, v.interface.clone().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    let mut out = render(t, 0);
    if !reasons.is_empty() {
        out.push_str("why not:\n");
        out.push_str(&reasons.join("\n"));
        out.push('\n');
    }
    out
}

/// The cluster part of `halo status` and `halo node list`.
fn nodes_text(c: &ClusterView, wide: bool) -> String {
    let mut out = match (&c.leader, c.fencing_token) {
        (Some(l), Some(f)) => format!("leader {l} (fencing token {f}), asked from {}\n", c.node),
        _ => format!("no leader elected now, asked from {}\n", c.node),
    };
    let mut header = vec!["NODE", "ADDRESS", "ZONE", "ALIVE", "STATE", "LEADER", "PLACED", "READY", "DRIVERS"];
    if wide {
        header.extend(["CAPACITY", "LEASE"]);
    }
    let mut t = table(&header);
    for n in &c.nodes {
        // A node without a live lease is gone, drained or not; a drained
        // node that is alive says so.
        let state = match (n.alive, n.draining) {
            (false, _) => "gone",
            (true, true) => "draining",
            (true, false) => "active",
        };
        let mut row = vec![
            n.name.clone(),
            n.addr.map_or("-".to_string(), |a| a.to_string()),
            n.zone.clone().filter(|z| !z.is_empty()).unwrap_or_else(|| "-".into()),
            if n.alive { "yes" } else { "no" }.to_string(),
            state.to_string(),
            if n.leader { "yes" } else { "" }.to_string(),
            n.placements.to_string(),
            n.ready.to_string(),
            if n.drivers.is_empty() { "-".to_string() } else { n.drivers.join(",") },
        ];
        if wide {
            row.push(match n.capacity {
                Some(u32::MAX) => "unlimited".to_string(),
                Some(c) => c.to_string(),
                None => "-".to_string(),
            });
            row.push(n.lease.clone().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    out.push_str(&render(t, 2));
    out
}

pub fn status(t: &Target, out: &Output) -> anyhow::Result<()> {
    let v: StatusView = read(t, "/v1/status")?;
    out.print(&v, |wide| status_text(&v, unix_secs(), wide))
}

/// Each autoscaled service: its count and bounds, every target against
/// what was measured, and the leader's last decision.
fn autoscale_text(c: &ClusterView, now: u64) -> String {
    let mut out = String::new();
    for s in &c.services {
        let Some(a) = &s.autoscale else { continue };
        let targets: Vec<String> = a
            .targets
            .iter()
            .map(|m| {
                let unit = if m.metric == "p99" { "ms" } else { "" };
                match m.value {
                    Some(v) => format!("{} {v:.1}{unit} (target {}{unit})", m.metric, m.target),
                    None => format!("{} - (target {}{unit})", m.metric, m.target),
                }
            })
            .collect();
        out.push_str(&format!(
            "autoscaling {}: replicas {} ({} to {}), {} ready; per instance {}\n",
            s.name,
            s.replicas,
            a.min,
            a.max,
            s.ready,
            targets.join(", ")
        ));
        if !a.reason.is_empty() {
            let when = if a.changed_ms > 0 {
                format!(" ({} ago)", age(now.saturating_sub(a.changed_ms / 1000)))
            } else {
                String::new()
            };
            out.push_str(&format!("  {}{when}\n", a.reason));
        }
    }
    out
}

fn status_text(v: &StatusView, now: u64, wide: bool) -> String {
    let mut out = String::new();
    let c = &v.cluster;
    let stale = c.view.stale_ms as f64 / 1000.0;
    if !c.view.store_reachable {
        out.push_str(&format!(
            "the store has not answered for {stale:.1}s: this is the last state seen (revision {})\n",
            c.view.revision
        ));
    } else if !c.view.watching {
        out.push_str(&format!("the store's watch broke {stale:.1}s ago; resuming (revision {})\n", c.view.revision));
    }
    if let Some(b) = &v.backup {
        if let Some(e) = &b.last_error {
            out.push_str(&format!("the last scheduled backup failed: {e}\n"));
        } else if b.overdue {
            out.push_str("scheduled backups are overdue: none succeeded within two intervals\n");
        }
    }
    // A cluster of one (`halo up`) needs no node table.
    let clustered = c.nodes.len() > 1;
    if clustered {
        out.push_str(&nodes_text(c, wide));
        let primaries = c.services.iter().any(|s| s.primary.is_some());
        let mut header = vec!["SERVICE", "REPLICAS", "PLACED", "READY", "PENDING", "OUTDATED"];
        if primaries {
            header.push("PRIMARY (NODE, TOKEN)");
        }
        let mut t = table(&header);
        for s in &c.services {
            let mut row = vec![
                s.name.clone(),
                s.replicas.to_string(),
                s.placed.to_string(),
                s.ready.to_string(),
                s.pending.to_string(),
                s.placed.saturating_sub(s.current).to_string(),
            ];
            if primaries {
                row.push(s.primary.as_ref().map_or("-".into(), |(i, n, t)| format!("{i} ({n}, {t})")));
            }
            t.add_row(row);
        }
        out.push_str(&render(t, 2));
        out.push_str("instances on this node:\n");
    }
    out.push_str(&autoscale_text(c, now));
    if v.services.is_empty() {
        out.push_str("no services; declare one with `halo apply -f FILE`\n");
        return out;
    }
    if !clustered {
        let mut t = table(&["SERVICE", "READY", "INSTANCES", "RESTARTS"]);
        for s in &v.services {
            t.add_row(vec![
                s.name.clone(),
                format!("{}/{}", s.ready, s.replicas),
                s.instances.len().to_string(),
                s.instances.iter().map(|i| i.status.restarts).sum::<u32>().to_string(),
            ]);
        }
        out.push_str(&render(t, 0));
    }
    // Docker instances show their container (short id) beside the pid.
    let containers = v.services.iter().flat_map(|s| &s.instances).any(|i| i.status.container.is_some());
    let mut header = vec!["INSTANCE", "SERVICE", "STATE", "READY", "PID"];
    if containers {
        header.push("CONTAINER");
    }
    header.extend(["PORT", "RESTARTS", "LAST EXIT"]);
    // Stateful instances with replicas: their role, how far behind, the token.
    let roles = v.services.iter().flat_map(|s| &s.instances).any(|i| i.role.is_some());
    if roles {
        header.extend(["ROLE", "LAG", "TOKEN"]);
    }
    if wide {
        header.extend(["AGE", "PROBE FAILURES (S/R/L)"]);
    }
    let mut t = table(&header);
    let mut not_ready = Vec::new();
    for s in &v.services {
        for i in &s.instances {
            let st = &i.status;
            let mut state = st.state.as_str().to_string();
            if i.stopping {
                state = "draining".into();
            } else if !i.current {
                state.push_str(" (old)");
            }
            // A draining instance takes no new requests.
            let ready = st.ready && !i.stopping;
            if !ready && !i.stopping {
                if let Some(why) = &st.last_probe_error {
                    let f = &st.probe_failures;
                    not_ready.push(format!(
                        "  {}: {why} ({} failed checks)",
                        st.id,
                        f.startup + f.readiness + f.liveness
                    ));
                }
            }
            let mut row = vec![
                st.id.clone(),
                s.name.clone(),
                state,
                if ready { "yes" } else { "no" }.to_string(),
                st.pid.map_or("-".to_string(), |p| p.to_string()),
            ];
            if containers {
                row.push(st.container.as_deref().map_or("-".to_string(), |c| c[..c.len().min(12)].to_string()));
            }
            row.extend([
                st.port.to_string(),
                st.restarts.to_string(),
                st.last_exit.clone().unwrap_or_else(|| "-".into()),
            ]);
            if roles {
                match &i.role {
                    Some(r) => row.extend([
                        if r.synchronous { format!("{} (sync)", r.role.as_str()) } else { r.role.as_str().to_string() },
                        r.lag.map_or("-".to_string(), |l| l.to_string()),
                        r.token.to_string(),
                    ]),
                    None => row.extend(["-".to_string(), "-".to_string(), "-".to_string()]),
                }
            }
            if wide {
                let f = &st.probe_failures;
                row.push(age(now.saturating_sub(st.since)));
                row.push(format!("{}/{}/{}", f.startup, f.readiness, f.liveness));
            }
            t.add_row(row);
        }
    }
    out.push_str(&render(t, 0));
    if !not_ready.is_empty() {
        out.push_str("not ready, last failed check:\n");
        out.push_str(&not_ready.join("\n"));
        out.push('\n');
    }
    // A stateful service without a primary: why each instance does not
    // take over (too far behind, unhealthy, another further ahead).
    let waiting: Vec<String> = v
        .services
        .iter()
        .flat_map(|s| &s.instances)
        .filter_map(|i| Some(format!("  {}: {}", i.status.id, i.role.as_ref()?.candidacy.as_ref()?)))
        .collect();
    if !waiting.is_empty() {
        out.push_str("no primary; not taking over:\n");
        out.push_str(&waiting.join("\n"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_show_what_changes() {
        let d = diff("name = \"a\"\nreplicas = 1\n[run]\n", "name = \"a\"\nreplicas = 3\n[run]\n");
        assert_eq!(d, "  name = \"a\"\n- replicas = 1\n+ replicas = 3\n  [run]\n");
        let long: String = (0..20).map(|i| format!("k{i} = {i}\n")).collect();
        let d = diff(&long, &long.replace("k10 = 10", "k10 = 11"));
        assert_eq!(d, "  ...\n  k8 = 8\n  k9 = 9\n- k10 = 10\n+ k10 = 11\n  k11 = 11\n  k12 = 12\n");
    }

    #[test]
    fn replica_counts_name_the_real_limit() {
        assert_eq!(parse_replicas("3"), Ok(3));
        assert!(parse_replicas("-1").unwrap_err().contains("accepted: 0 to 1000"));
        assert!(parse_replicas("5000").unwrap_err().contains("too many"));
        assert!(parse_replicas("three").unwrap_err().contains("not a number of replicas"));
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(
            (age(5), age(190), age(7500), age(90000)),
            ("5s".into(), "3m10s".into(), "2h5m".into(), "1d1h".into())
        );
    }
}

/// `--wait` on a change: returns when it is done or failed, saying which.
#[derive(clap::Args, Clone, Debug)]
pub struct WaitArgs {
    /// Return only when the change is done (every replica of the new
    /// revision ready, nothing old left) or failed (a crash loop, a rolled
    /// back canary), printing progress.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits before it gives up.
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    halo_model::values::parse_duration(s)
}

/// What `--wait` waits for.
pub enum Goal {
    /// The service runs `replicas` ready instances of one revision: a new
    /// one when `new_template`, unlike `before`.
    Service { name: String, replicas: Option<u32>, new_template: bool, before: Option<String> },
    /// The service is gone, instances and all.
    Deleted(String),
    /// The node holds no placement.
    Drained(String),
    /// A primary of a later term than `token` serves (`to`, if named).
    Switchover { name: String, token: i64, to: Option<String> },
}

impl Goal {
    /// The goal of applying `text`, from what the node has now (read before the change).
    pub fn of_apply(t: &Target, file: &halo_model::ServiceFile) -> anyhow::Result<Goal> {
        let c = t.client()?;
        let stored = runtime()?.block_on(c.call(Method::GET, &format!("/v1/services/{}", file.name), None, |_| {}));
        // Only "no such service" means a new one; any other failure is said.
        let stored = match stored {
            Ok(b) => Some(b),
            Err(halo_api::ClientError::Api { code: halo_api::ErrorCode::NotFound, .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let old = stored.and_then(|b| halo_model::parse_service("(stored)", &String::from_utf8_lossy(&b)).ok());
        let template = |f: &halo_model::ServiceFile| halo_control::keys::ServiceRecord::template(f, 0);
        let new_template = old.as_ref().is_none_or(|(o, _)| template(o) != template(file));
        // An autoscaled service's count is the leader's to choose.
        let replicas = if file.autoscale.is_some() { None } else { file.replicas.or(Some(1)) };
        Goal::service(t, &file.name, replicas, new_template)
    }

    /// A goal for `name`, remembering its revision now.
    pub fn service(t: &Target, name: &str, replicas: Option<u32>, new_template: bool) -> anyhow::Result<Goal> {
        let v: ClusterView = read(t, "/v1/nodes")?;
        let before = v.services.iter().find(|s| s.name == name).map(|s| s.template.clone());
        Ok(Goal::Service { name: name.to_string(), replicas, new_template, before })
    }

    /// A switchover of `name`'s primary (of the term now) to `to`.
    pub fn switchover(t: &Target, name: &str, to: Option<&str>) -> anyhow::Result<Goal> {
        let v: ClusterView = read(t, "/v1/nodes")?;
        let token = v.services.iter().find(|s| s.name == name).and_then(|s| s.primary.as_ref()).map_or(0, |p| p.2);
        Ok(Goal::Switchover { name: name.to_string(), token, to: to.map(str::to_string) })
    }

    /// The service whose crash loops and rollbacks fail the wait.
    fn failing_service(&self) -> Option<&str> {
        match self {
            Goal::Service { name, .. } => Some(name),
            Goal::Deleted(_) | Goal::Drained(_) | Goal::Switchover { .. } => None,
        }
    }

    /// Done, and what to say now.
    fn check(&self, v: &ClusterView) -> (bool, String) {
        match self {
            Goal::Service { name, replicas, new_template, before } => {
                let Some(s) = v.services.iter().find(|s| &s.name == name) else {
                    return (false, format!("{name}: not in the cluster's view yet"));
                };
                let outdated = s.placed.saturating_sub(s.current);
                let revision_ok = !new_template || before.as_ref() != Some(&s.template);
                let done = revision_ok
                    && replicas.is_none_or(|r| r == s.replicas)
                    && outdated == 0
                    && s.current == s.replicas as usize
                    && s.current_ready == s.replicas as usize;
                let mut say = format!("{name}: {} of {} ready", s.current_ready, s.replicas);
                if outdated > 0 {
                    say.push_str(&format!(", {outdated} of the old revision to replace"));
                }
                if !revision_ok {
                    say.push_str(", the new revision not seen yet");
                }
                (done, say)
            }
            Goal::Deleted(name) => {
                let left = v.placements.iter().filter(|p| &p.service == name).count();
                let listed = v.services.iter().any(|s| &s.name == name);
                (!listed && left == 0, format!("{name}: {} left", count(left, "instance")))
            }
            Goal::Drained(node) => {
                let left: Vec<&halo_control::PlacementView> = v.placements.iter().filter(|p| &p.node == node).collect();
                let mut say = format!("node {node}: {} left to move", count(left.len(), "instance"));
                // What holds each service's last ones: its budget.
                let mut held: Vec<String> = Vec::new();
                for s in v.services.iter().filter(|s| left.iter().any(|p| p.service == s.name)) {
                    let ready_here = left.iter().filter(|p| p.service == s.name && p.ready).count();
                    if ready_here > 0 && s.ready <= s.min_ready as usize {
                        held.push(format!(
                            "{} waits for a replacement ({} ready, keeps {})",
                            s.name, s.ready, s.min_ready
                        ));
                    }
                }
                if !held.is_empty() {
                    say.push_str(&format!("; {}", held.join("; ")));
                }
                (left.is_empty(), say)
            }
            Goal::Switchover { name, token, to } => {
                let s = v.services.iter().find(|s| &s.name == name);
                match s.and_then(|s| s.primary.clone().map(|p| (p, s.primary_serving))) {
                    Some(((id, node, t), serving)) if t > *token => {
                        let done = serving && to.as_ref().is_none_or(|to| *to == id);
                        let state = if serving { "serves" } else { "is being promoted" };
                        (done, format!("{name}: {id} on {node} {state} (token {t})"))
                    }
                    Some(((id, _, _), _)) => (false, format!("{name}: {id} is handing over")),
                    None => (false, format!("{name}: no primary for a moment")),
                }
            }
        }
    }
}

/// `1 instance`, `2 instances`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Waits for `goal`, printing each new state of progress; fails on a
/// crash loop or a rolled back canary of the service, or after `timeout`.
pub fn wait(t: &Target, goal: &Goal, timeout: std::time::Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let since_ms = unix_secs().saturating_sub(1) * 1000;
    let mut said = String::new();
    loop {
        let v: ClusterView = read(t, "/v1/nodes")?;
        let (done, say) = goal.check(&v);
        if say != said {
            println!("{say}");
            said = say;
        }
        if done {
            println!("done after {:.1}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if let Some(name) = goal.failing_service() {
            let events: Vec<halo_control::events::Event> = read(t, &format!("/v1/events?service={name}&limit=200"))?;
            let failed = events
                .iter()
                .filter(|e| e.time_ms >= since_ms)
                .find(|e| matches!(e.kind, EventKind::CrashLoop | EventKind::RolledBack));
            if let Some(e) = failed {
                anyhow::bail!("failed: {} (on {}); `halo events --service {name}` has the story", e.message, e.node);
            }
        }
        if started.elapsed() >= timeout {
            anyhow::bail!("gave up after {}s (--timeout): {said}", timeout.as_secs());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
