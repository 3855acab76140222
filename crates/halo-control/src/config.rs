//! The node file (`halo up -c halo.toml`): the proxy's own sections
//! (`[proxy]`, `[admin]`, `[[listeners]]`, static `[[routes]]` and
//! `[upstreams.*]`, validated by `halo_proxy::config`), plus `[node]` (data
//! directory, API address), `[[services]]` (service files, applied when
//! the store does not have them yet), `[backup]` (scheduled backups) and
//! `[[vip]]` (floating IPs this node may hold).
//!
//! The proxy parser sees the file with the node's sections blanked out line
//! for line, so its errors keep their line numbers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use halo_model::diag::Locator;
use halo_model::{Diagnostic, Diagnostics, FileKind, ServiceFile, ServiceSpec};
use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `[node] data_dir`; the command line's `--data-dir` wins over it.
    pub data_dir: Option<PathBuf>,
    /// Where the admin API listens.
    pub api: SocketAddr,
    /// Listeners, proxy settings and static routes; services add theirs.
    pub proxy: halo_proxy::config::Config,
    /// Services to create if the store does not have them.
    pub services: Vec<(ServiceFile, ServiceSpec)>,
    /// `[backup]`: scheduled backups, run by the leader.
    pub backup: Option<BackupSchedule>,
    /// `[[vip]]`: floating IPs this node may hold.
    pub vips: Vec<crate::vip::VipSpec>,
    /// `[node.tls]`: the API over HTTPS only.
    pub api_tls: Option<ApiTls>,
}

/// The node API's TLS (`[node.tls]`).
#[derive(Clone)]
pub struct ApiTls {
    /// The certificate and key it serves.
    pub server: Arc<halo_proxy::config::TlsListener>,
    /// The CA that signed every node's API certificate (`ca`): how this
    /// node checks the other nodes it asks (peers' health, backup hooks).
    pub peers: Option<Arc<halo_proxy::config::UpstreamTls>>,
    /// That CA's file.
    pub ca: Option<PathBuf>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").field("server", &self.server).field("peers", &self.peers).finish()
    }
}

/// Scheduled backups of the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    pub when: When,
    /// Where archives go [default: DATA_DIR/backups].
    pub dir: Option<PathBuf>,
    /// Archives kept; older ones are removed after each new one verified.
    pub keep_last: usize,
    /// Also kept: the newest archive of each of the last this many days
    /// (UTC) that have one.
    pub keep_daily: usize,
    /// And of each of the last this many weeks.
    pub keep_weekly: usize,
}

impl BackupSchedule {
    /// Where the archives of a node with `data_dir` go.
    pub fn archive_dir(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("backups"))
    }
}

/// When scheduled backups run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    Every(std::time::Duration),
    Cron(crate::cron::Cron),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupSection {
    every: Option<String>,
    cron: Option<String>,
    dir: Option<PathBuf>,
    keep_last: Option<usize>,
    keep_daily: Option<usize>,
    keep_weekly: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    data_dir: Option<PathBuf>,
    api: Option<String>,
    tls: Option<NodeTlsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeTlsSection {
    cert: String,
    key: String,
    ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct NodeParts {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    services: Vec<ServiceFile>,
    backup: Option<BackupSection>,
    #[serde(default)]
    vip: Vec<VipSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipSection {
    address: String,
    interface: String,
    #[serde(default)]
    prefer: Vec<String>,
    track: Option<TrackSection>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TrackSection {
    Word(String),
    Exec { exec: Vec<String> },
}

/// Default admin API address.
pub const DEFAULT_API: &str = "127.0.0.1:7070";

/// `[node.tls]`, its files read now (relative paths are the node file's)
/// so that a bad one is reported with the file.
fn api_tls(file: &str, t: &NodeTlsSection, errors: &mut Errors<'_>) -> Option<ApiTls> {
    use halo_proxy::config::{CertFiles, MinVersion, TlsListener, UpstreamTls};
    let base = Path::new(file).parent().map(Path::to_path_buf).unwrap_or_default();
    let files = vec![CertFiles { cert: base.join(&t.cert), key: base.join(&t.key), names: Vec::new() }];
    let server = TlsListener::new(files, MinVersion::Tls12)
        .map_err(|es| es.into_iter().for_each(|(_, e)| errors.push("node.tls", e)))
        .ok();
    let ca = t.ca.as_ref().map(|ca| base.join(ca));
    let peers = ca.as_ref().and_then(|ca| {
        UpstreamTls::new(Some(ca.clone()), true, None, false).map_err(|e| errors.push("node.tls.ca", e)).ok()
    });
    Some(ApiTls { server: Arc::new(server?), peers: peers.map(Arc::new), ca })
}

/// Parses and validates a node file; every problem is reported, each with
/// the file, and the line or field.
pub fn parse_node(file: &str, text: &str) -> Result<NodeConfig, Diagnostics> {
    if let Some(message) =
        FileKind::misfiled(text, FileKind::Node).filter(|_| FileKind::of(text) == Some(FileKind::Service))
    {
        return Err(Diagnostics::of_file(file, message));
    }
    let loc = Locator::new(text);
    let mut errors = Errors { file, loc: &loc, list: Vec::new() };
    let proxy = halo_proxy::config::parse_with_services(file, &blank_sections(text, true));
    // The span is into the blanked text, which keeps every line (and so
    // every line number) of the original but not its byte offsets.
    let node_text = blank_sections(text, false);
    let parts: NodeParts = halo_model::diag::deserialize(file, &node_text).unwrap_or_else(|e| {
        errors.list.extend(e.0);
        NodeParts::default()
    });
    let api = parts.node.api.as_deref().unwrap_or(DEFAULT_API);
    let api = api
        .parse::<SocketAddr>()
        .map_err(|_| errors.push("node.api", format!("'{api}' is not accepted; use IP:PORT, as in \"{DEFAULT_API}\"")));
    let api_tls = parts.node.tls.as_ref().and_then(|t| api_tls(file, t, &mut errors));
    let backup = parts.backup.as_ref().and_then(|b| {
        let when = match (&b.every, &b.cron) {
            (Some(every), None) => {
                let d = halo_model::values::parse_duration(every).map_err(|e| errors.push("backup.every", e)).ok()?;
                if d < std::time::Duration::from_secs(1) {
                    errors.push("backup.every", format!("'{every}' is too often; at least 1s"));
                }
                When::Every(d)
            }
            (None, Some(cron)) => {
                When::Cron(crate::cron::Cron::parse(cron).map_err(|e| errors.push("backup.cron", e)).ok()?)
            }
            _ => {
                errors.push("backup", "give every = \"15m\" or cron = \"0 3 * * *\" (one of them)");
                return None;
            }
        };
        let keep_last = b.keep_last.unwrap_or(10);
        if keep_last == 0 {
            errors.push("backup.keep_last", "0 would remove every archive; at least 1");
        }
        let (keep_daily, keep_weekly) = (b.keep_daily.unwrap_or(0), b.keep_weekly.unwrap_or(0));
        Some(BackupSchedule { when, dir: b.dir.clone(), keep_last, keep_daily, keep_weekly })
    });
    let vips = vips(&parts.vip, &mut errors);
    let mut services = Vec::new();
    for (i, s) in parts.services.into_iter().enumerate() {
        match s.validate() {
            Ok(spec) => {
                if services.iter().any(|(f, _): &(ServiceFile, ServiceSpec)| f.name == s.name) {
                    errors.push(&format!("services[{i}].name"), format!("'{}' is declared twice", s.name));
                }
                if proxy.as_ref().is_ok_and(|p| p.upstreams.contains_key(&s.name)) {
                    errors.push(
                        &format!("services[{i}].name"),
                        format!("'{}' is also a static upstream; rename one", s.name),
                    );
                }
                services.push((s, spec));
            }
            Err(es) => errors.list.extend(es.locate(file, text, &format!("services[{i}].")).0),
        }
    }
    if let Ok(p) = &proxy {
        for l in &p.listeners {
            let halo_proxy::config::ListenerProtocol::Tcp(t) = &l.protocol else { continue };
            for name in t.upstream.iter().chain(t.sni.iter().map(|(_, u)| u)) {
                // A service's name, or a replicated service's replicas.
                let known = p.upstreams.contains_key(name)
                    || services.iter().any(|(f, spec)| {
                        f.name == *name
                            || (spec.replicated() && *name == crate::proxy_config::replica_upstream(&f.name, None))
                    });
                if !known {
                    tracing::warn!(
                        "{file}: listener '{}' forwards to '{name}', which is neither an upstream nor a service of this \
                         file; those connections are closed until a service of that name exists",
                        l.name
                    );
                }
            }
        }
    }
    match proxy {
        Ok(mut proxy) if errors.list.is_empty() => {
            // A listener on a floating IP binds it before this node holds it.
            for l in &mut proxy.listeners {
                l.freebind = vips.iter().any(|v| v.address == l.addr.ip());
            }
            let api = api.expect("checked");
            Ok(NodeConfig { data_dir: parts.node.data_dir, api, proxy, services, backup, vips, api_tls })
        }
        Ok(_) => Err(errors.done()),
        Err(e) => {
            errors.list.extend(e.0);
            Err(errors.done())
        }
    }
}

/// A node file's errors as they are found, each placed by its field.
struct Errors<'a> {
    file: &'a str,
    loc: &'a Locator<'a>,
    list: Vec<Diagnostic>,
}

impl Errors<'_> {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(self.loc.diag(self.file, field, message));
    }

    fn done(self) -> Diagnostics {
        let mut d = Diagnostics(self.list);
        d.sort();
        d
    }
}

/// The `[[vip]]` sections, checked: every address parses and is declared
/// once, the interface is a possible name, `prefer` names no node twice.
/// Whether the interface exists is a property of the node, decided at run
/// time (a node without it is not eligible and says so).
fn vips(sections: &[VipSection], errors: &mut Errors<'_>) -> Vec<crate::vip::VipSpec> {
    use crate::vip::{Track, VipSpec};
    let mut out: Vec<VipSpec> = Vec::new();
    for (i, v) in sections.iter().enumerate() {
        let at = format!("vip[{i}]");
        let Some((address, prefix)) = crate::vip::parse_cidr(&v.address) else {
            errors.push(
                &format!("{at}.address"),
                format!("'{}' is not accepted; use IP/PREFIX, as in \"10.0.0.100/24\" or \"fd00::100/64\"", v.address),
            );
            continue;
        };
        if out.iter().any(|o| o.address == address) {
            errors.push(&format!("{at}.address"), format!("{address} is declared twice; one [[vip]] per address"));
        }
        let iface_ok = !v.interface.is_empty()
            && v.interface.len() < 16
            && !v.interface.contains(|c: char| c == '/' || c.is_whitespace() || c == ':');
        if !iface_ok {
            errors.push(
                &format!("{at}.interface"),
                format!(
                    "'{}' is not an interface name (1 to 15 characters, no '/', ':' or spaces), as in \"eth0\"",
                    v.interface
                ),
            );
        }
        for (j, n) in v.prefer.iter().enumerate() {
            if v.prefer[..j].contains(n) {
                errors.push(&format!("{at}.prefer"), format!("'{n}' is listed twice"));
            }
        }
        let track = match &v.track {
            None => Track::Proxy,
            Some(TrackSection::Word(w)) if w == "proxy" => Track::Proxy,
            Some(TrackSection::Word(w)) if w == "none" => Track::None,
            Some(TrackSection::Exec { exec }) if !exec.is_empty() && !exec[0].is_empty() => Track::Exec(exec.clone()),
            Some(other) => {
                let shown = match other {
                    TrackSection::Word(w) => format!("'{w}'"),
                    TrackSection::Exec { .. } => "an empty exec".to_string(),
                };
                errors.push(
                    &format!("{at}.track"),
                    format!(
                        "{shown} is not accepted; use \"proxy\" (the default: this node's listeners answer), \
                         \"none\", or {{ exec = [\"/path/to/check\", \"arg\"] }} (exit status 0 = healthy)"
                    ),
                );
                continue;
            }
        };
        out.push(VipSpec { address, prefix, interface: v.interface.clone(), prefer: v.prefer.clone(), track });
    }
    out
}

/// The text with either the node's own sections (`[node]`, `[[services]]`,
/// `[backup]`, `[[vip]]` and their subtables) or everything else replaced by empty lines.
fn blank_sections(text: &str, node_sections: bool) -> String {
    let mut in_node = false;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            let name = t.trim_start_matches('[').trim_start();
            in_node = ["node", "services", "backup", "vip"]
                .iter()
                .any(|s| name.strip_prefix(s).is_some_and(|rest| rest.trim_start().starts_with([']', '.'])));
        }
        if in_node != node_sections {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = r#"
[node]
api = "127.0.0.1:7071"

[proxy]
workers = 1

[[listeners]]
name = "http"
listen = "127.0.0.1:0"

[[services]]
name = "web"
replicas = 2
[services.run]
command = "halo"
args = ["demo-app"]
[[services.routes]]
path_prefix = "/"
"#;

    #[test]
    fn node_proxy_and_services_parse_together() {
        let n = parse_node("q.toml", NODE).unwrap();
        assert_eq!(n.api.port(), 7071);
        assert_eq!(n.proxy.listeners.len(), 1);
        assert_eq!(n.services[0].1.replicas, 2);
    }

    #[test]
    fn errors_keep_lines_and_fields() {
        let bad = NODE.replace("workers = 1", "workers = \"many\"").replace("replicas = 2", "replicas = 99999");
        let errs = parse_node("q.toml", &bad).unwrap_err().to_string();
        assert!(errs.contains("q.toml:6"), "proxy error lost its line: {errs}");
        assert!(errs.contains("services[0].replicas"), "{errs}");
    }

    #[test]
    fn a_node_section_error_names_its_own_line_after_multibyte_text() {
        // The proxy's sections come first and are blanked for the node
        // parser; a CJK comment there must neither shift nor break the line.
        let text = "# 代理配置：监听器和上游\n[proxy]\nworkers = 1 # 工作线程\n\n[node]\napi = = \"x\"\n";
        let errs = parse_node("n.toml", text).unwrap_err().to_string();
        assert!(errs.contains("n.toml:6:"), "wrong line: {errs}");
    }

    #[test]
    fn vips_parse_and_bad_ones_are_named() {
        let good = format!(
            "{NODE}\n[[listeners]]\nname = \"v\"\nlisten = \"10.0.0.100:80\"\n\n[[vip]]\naddress = \"10.0.0.100/24\"\n\
             interface = \"eth0\"\nprefer = [\"n1\"]\n\n[[vip]]\naddress = \"fd00::5\"\ninterface = \"eth1\"\n\
             track = {{ exec = [\"true\"] }}\n"
        );
        let n = parse_node("q.toml", &good).unwrap();
        assert_eq!(n.vips.len(), 2);
        assert_eq!((n.vips[0].prefix, n.vips[1].prefix), (24, 128));
        assert_eq!(n.vips[1].track, crate::vip::Track::Exec(vec!["true".into()]));
        let freebind: Vec<bool> = n.proxy.listeners.iter().map(|l| l.freebind).collect();
        assert_eq!(freebind, [false, true], "only the listener on the VIP binds it before holding it");
        let bad = format!(
            "{NODE}\n[[vip]]\naddress = \"10.0.0.300/24\"\ninterface = \"eth0\"\n\n[[vip]]\naddress = \"10.0.0.9/33\"\n\
             interface = \"a/b\"\ntrack = \"ping\"\n\n[[vip]]\naddress = \"10.0.0.8\"\ninterface = \"e\"\n\n\
             [[vip]]\naddress = \"10.0.0.8/32\"\ninterface = \"e\"\nprefer = [\"a\", \"a\"]\n"
        );
        let errs = parse_node("q.toml", &bad).unwrap_err().to_string();
        for want in [
            "vip[0].address: '10.0.0.300/24' is not accepted; use IP/PREFIX",
            "vip[1].address: '10.0.0.9/33'",
            "vip[3].address: 10.0.0.8 is declared twice",
            "vip[3].prefer: 'a' is listed twice",
        ] {
            assert!(errs.contains(want), "missing {want:?} in {errs}");
        }
        let bad = format!("{NODE}\n[[vip]]\naddress = \"10.0.0.9/32\"\ninterface = \"a/b\"\ntrack = \"ping\"\n");
        let errs = parse_node("q.toml", &bad).unwrap_err().to_string();
        assert!(errs.contains("vip[0].interface: 'a/b' is not an interface name"), "{errs}");
        assert!(errs.contains("vip[0].track: 'ping' is not accepted; use \"proxy\""), "{errs}");
    }

    #[test]
    fn a_service_may_not_take_a_static_upstream_name() {
        let clash = format!("{NODE}\n[[routes]]\nupstream = \"web\"\n[upstreams.web]\nendpoints = [\"127.0.0.1:9\"]\n");
        let errs = parse_node("q.toml", &clash).unwrap_err().to_string();
        assert!(errs.contains("services[0].name: 'web' is also a static upstream"), "{errs}");
    }
}
