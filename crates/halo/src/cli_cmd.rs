//! The CLI verbs that talk to a node's API: apply, status, scale, restart,
//! logs, delete. They find the node and its token in the data directory
//! (`api.addr`, `token`), or through `--api` / `HALO_API` and `HALO_TOKEN`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use halo_api::ApiClient;
use http::Method;

#[derive(clap::Args, Clone)]
pub struct Target {
    /// The node's data directory, where its API address and token are.
    #[arg(long, global = true, default_value = "halo-data", env = "HALO_DATA_DIR")]
    data_dir: PathBuf,
    /// The node's API address [default: read from the data directory].
    #[arg(long, global = true, env = "HALO_API")]
    api: Option<SocketAddr>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

impl Target {
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let addr = match self.api {
            Some(a) => a,
            None => {
                let f = self.data_dir.join("api.addr");
                let text = std::fs::read_to_string(&f).with_context(|| {
                    format!("cannot read {} (is `halo up` running with this --data-dir? or pass --api)", f.display())
                })?;
                text.trim().parse().with_context(|| format!("{} does not hold an address", f.display()))?
            }
        };
        let token = match std::env::var("HALO_TOKEN") {
            Ok(t) => t,
            Err(_) => halo_api::token::read(&self.data_dir).with_context(|| {
                format!("cannot read the API token in {} (or set HALO_TOKEN)", self.data_dir.display())
            })?,
        };
        Ok(ApiClient { addr, token })
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn call(t: &Target, method: Method, path: &str, body: Option<String>) -> anyhow::Result<serde_json::Value> {
    let c = t.client()?;
    let bytes = runtime()?.block_on(c.call(method, path, body.map(bytes::Bytes::from), |_| {}))?;
    Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

fn print_outcome(t: &Target, v: &serde_json::Value) {
    if t.json {
        println!("{v}");
    } else {
        let name = v["name"].as_str().unwrap_or("?");
        let what = v["outcome"]
            .as_str()
            .map(str::to_string)
            .or_else(|| v["replicas"].as_u64().map(|r| format!("scaled to {r}")));
        println!("{name}: {}", what.unwrap_or_default());
    }
}

pub fn apply(t: &Target, file: &PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Validate here too, so errors name the file the user wrote.
    halo_model::parse_service(&file.display().to_string(), &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    print_outcome(t, &call(t, Method::PUT, "/v1/services", Some(text))?);
    Ok(())
}

pub fn scale(t: &Target, name: &str, replicas: u32) -> anyhow::Result<()> {
    let body = serde_json::json!({ "replicas": replicas }).to_string();
    print_outcome(t, &call(t, Method::POST, &format!("/v1/services/{name}/scale"), Some(body))?);
    Ok(())
}

pub fn restart(t: &Target, name: &str) -> anyhow::Result<()> {
    print_outcome(t, &call(t, Method::POST, &format!("/v1/services/{name}/restart"), None)?);
    Ok(())
}

/// `halo rollout status`: one screen of the rollout, or one a second with
/// `--watch` until it ends.
pub fn rollout_status(t: &Target, name: &str, watch: bool) -> anyhow::Result<()> {
    loop {
        let v = call(t, Method::GET, &format!("/v1/services/{name}/rollout"), None)?;
        let out = if t.json { format!("{v}\n") } else { rollout_text(&v) };
        let _ = std::io::stdout().write_all(out.as_bytes());
        if !watch || !(v["state"] == "progressing" || v["state"] == "paused") {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn rollout_text(v: &serde_json::Value) -> String {
    let steps: Vec<String> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}% for {}s", s["weight"], s["pause_ms"].as_u64().unwrap_or(0) as f64 / 1000.0))
        .collect();
    let mut out = format!(
        "{}: canary {} (step {} of {}: {}), canary weight now {}%\n",
        v["service"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["step"],
        steps.len(),
        steps.join(", "),
        v["weight"]
    );
    for (what, r) in [("canary", &v["canary"]), ("stable", &v["stable"])] {
        out.push_str(&format!(
            "  {what:<7} {}  placed {} ready {}\n",
            r["template"].as_str().unwrap_or("?"),
            r["placed"],
            r["ready"]
        ));
    }
    out.push_str(&format!("  windows passed in this step {}, failed {}\n", v["passed_windows"], v["failed_windows"]));
    for w in v["windows"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  window {}: {}\n",
            w["verdict"].as_str().unwrap_or("?"),
            w["detail"].as_str().unwrap_or("")
        ));
    }
    out.push_str(&format!("  {}\n", v["reason"].as_str().unwrap_or("")));
    out
}

/// `halo rollout promote|abort`.
pub fn rollout_order(t: &Target, name: &str, order: &str) -> anyhow::Result<()> {
    print_outcome(t, &call(t, Method::POST, &format!("/v1/services/{name}/rollout/{order}"), None)?);
    Ok(())
}

pub fn delete(t: &Target, name: &str) -> anyhow::Result<()> {
    print_outcome(t, &call(t, Method::DELETE, &format!("/v1/services/{name}"), None)?);
    Ok(())
}

/// Prints the service file as the node stores it.
pub fn get(t: &Target, name: &str) -> anyhow::Result<()> {
    let c = t.client()?;
    let text = runtime()?.block_on(c.call(Method::GET, &format!("/v1/services/{name}"), None, |_| {}))?;
    let _ = std::io::stdout().write_all(&text);
    Ok(())
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

pub fn node_list(t: &Target) -> anyhow::Result<()> {
    let v = call(t, Method::GET, "/v1/nodes", None)?;
    if t.json {
        let _ = writeln!(std::io::stdout(), "{v}");
        return Ok(());
    }
    let _ = std::io::stdout().write_all(nodes_table(&v).as_bytes());
    Ok(())
}

/// `halo vip list`.
pub fn vip_list(t: &Target) -> anyhow::Result<()> {
    let v = call(t, Method::GET, "/v1/vips", None)?;
    if t.json {
        let _ = writeln!(std::io::stdout(), "{v}");
        return Ok(());
    }
    let vips: Vec<halo_control::vip::VipStatus> =
        serde_json::from_value(v).context("the node's answer to /v1/vips is not a list of floating IPs")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let _ = std::io::stdout().write_all(vips_table(&vips, now).as_bytes());
    Ok(())
}

fn vips_table(vips: &[halo_control::vip::VipStatus], now_ms: u64) -> String {
    if vips.is_empty() {
        return "no floating IPs (declare them with [[vip]] in node files)\n".into();
    }
    let mut out = format!("{:<26} {:<10} {:<12} {:<8} NODES\n", "ADDRESS", "HOLDER", "SINCE", "TOKEN");
    let mut reasons = Vec::new();
    for v in vips {
        let since = v.since_ms.map_or("-".to_string(), |s| format!("{}s ago", now_ms.saturating_sub(s) / 1000));
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
        out.push_str(&format!(
            "{:<26} {:<10} {:<12} {:<8} {}\n",
            v.address,
            v.holder.as_deref().unwrap_or("(none)"),
            since,
            v.token.map_or("-".to_string(), |t| t.to_string()),
            nodes.join(" ")
        ));
    }
    if !reasons.is_empty() {
        out.push_str("why not:\n");
        out.push_str(&reasons.join("\n"));
        out.push('\n');
    }
    out
}

pub fn node_drain(t: &Target, name: &str, drain: bool) -> anyhow::Result<()> {
    let verb = if drain { "drain" } else { "undrain" };
    print_outcome(t, &call(t, Method::POST, &format!("/v1/nodes/{name}/{verb}"), None)?);
    Ok(())
}

pub fn node_remove(t: &Target, name: &str) -> anyhow::Result<()> {
    print_outcome(t, &call(t, Method::DELETE, &format!("/v1/nodes/{name}"), None)?);
    Ok(())
}

/// The cluster part of `halo status` and `halo node list`.
fn nodes_table(c: &serde_json::Value) -> String {
    let mut out = format!(
        "leader {} (fencing token {}), asked from {}\n",
        c["leader"].as_str().unwrap_or("(none)"),
        c["fencing_token"],
        c["node"].as_str().unwrap_or("?")
    );
    out.push_str(&format!(
        "  {:<12} {:<16} {:<8} {:<6} {:<10} {:<7} {:<6} {:<18} DRIVERS\n",
        "NODE", "ADDRESS", "ZONE", "ALIVE", "STATE", "PLACED", "READY", "LEASE"
    ));
    for n in c["nodes"].as_array().cloned().unwrap_or_default() {
        let mut state = if n["draining"].as_bool() == Some(true) { "draining" } else { "active" }.to_string();
        if n["leader"].as_bool() == Some(true) {
            state.push('*');
        }
        let drivers: Vec<&str> = n["drivers"].as_array().into_iter().flatten().filter_map(|d| d.as_str()).collect();
        out.push_str(&format!(
            "  {:<12} {:<16} {:<8} {:<6} {:<10} {:<7} {:<6} {:<18} {}\n",
            n["name"].as_str().unwrap_or("?"),
            n["addr"].as_str().unwrap_or("-"),
            n["zone"].as_str().unwrap_or("-"),
            if n["alive"].as_bool() == Some(true) { "yes" } else { "no" },
            state,
            n["placements"].to_string(),
            n["ready"].to_string(),
            n["lease"].as_str().unwrap_or("-"),
            if drivers.is_empty() { "-".to_string() } else { drivers.join(",") }
        ));
    }
    out
}

pub fn status(t: &Target) -> anyhow::Result<()> {
    let v = call(t, Method::GET, "/v1/status", None)?;
    if t.json {
        let _ = writeln!(std::io::stdout(), "{v}");
        return Ok(());
    }
    let services = v["services"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let c = &v["cluster"];
    let stale = c["view"]["stale_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    if c["view"]["store_reachable"].as_bool() == Some(false) {
        out.push_str(&format!(
            "the store has not answered for {stale:.1}s: this is the last state seen (revision {})\n",
            c["view"]["revision"]
        ));
    } else if c["view"]["watching"].as_bool() == Some(false) {
        out.push_str(&format!(
            "the store's watch broke {stale:.1}s ago; resuming (revision {})\n",
            c["view"]["revision"]
        ));
    }
    let b = &v["backup"];
    if let Some(e) = b["last_error"].as_str() {
        out.push_str(&format!("the last scheduled backup failed: {e}\n"));
    } else if b["overdue"].as_bool() == Some(true) {
        out.push_str("scheduled backups are overdue: none succeeded within two intervals\n");
    }
    // A cluster of one (`halo up`) needs no node table.
    let clustered = c["nodes"].as_array().is_some_and(|n| n.len() > 1);
    if clustered {
        out.push_str(&nodes_table(c));
        out.push_str(&format!("  {:<16} {:<9} {:<7} {:<6} PENDING\n", "SERVICE", "REPLICAS", "PLACED", "READY"));
        for s in c["services"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "  {:<16} {:<9} {:<7} {:<6} {}\n",
                s["name"].as_str().unwrap_or("?"),
                s["replicas"].to_string(),
                s["placed"].to_string(),
                s["ready"].to_string(),
                s["pending"]
            ));
        }
        out.push_str("instances on this node:\n");
    }
    if services.is_empty() {
        out.push_str("no services; declare one with `halo apply -f FILE`\n");
    }
    for s in services {
        let name = s["name"].as_str().unwrap_or("?");
        if clustered {
            out.push_str(&format!("{name}  ready here {}\n", s["ready"]));
        } else {
            out.push_str(&format!("{name}  ready {}/{}\n", s["ready"], s["replicas"]));
        }
        let instances = s["instances"].as_array().cloned().unwrap_or_default();
        // Docker instances show their container (short id) beside the pid.
        let containers = instances.iter().any(|i| i["container"].is_string());
        out.push_str(&format!(
            "  {:<16} {:<10} {:<6} {:<8} {}{:<6} {:<9} LAST EXIT\n",
            "INSTANCE",
            "STATE",
            "READY",
            "PID",
            if containers { "CONTAINER    " } else { "" },
            "PORT",
            "RESTARTS"
        ));
        for i in instances {
            let mut state = i["state"].as_str().unwrap_or("?").to_string();
            if i["stopping"].as_bool() == Some(true) {
                state = "draining".into();
            } else if i["current"].as_bool() == Some(false) {
                state.push_str("(old)");
            }
            let pid = i["pid"].as_i64().map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let container = match i["container"].as_str() {
                Some(c) => format!("{:<13}", &c[..c.len().min(12)]),
                None if containers => format!("{:<13}", "-"),
                None => String::new(),
            };
            out.push_str(&format!(
                "  {:<16} {:<10} {:<6} {:<8} {}{:<6} {:<9} {}\n",
                i["id"].as_str().unwrap_or("?"),
                state,
                if i["ready"].as_bool() == Some(true) { "yes" } else { "no" },
                pid,
                container,
                i["port"].to_string(),
                i["restarts"].to_string(),
                i["last_exit"].as_str().unwrap_or("-")
            ));
        }
    }
    // A closed pipe (`halo status | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
