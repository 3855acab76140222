//! `halo check -c FILE`: validates any of halo's files without running
//! it. The kind is told by its top-level keys: `[run]` is a service file,
//! `[node]`, `[[services]]` or `[[vip]]` a node file (`halo up`), anything else a
//! proxy file (`halo proxy`).

use std::path::Path;

use anyhow::Context;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
    let keys: Vec<String> = text.parse::<toml::Table>().map(|t| t.keys().cloned().collect()).unwrap_or_default();
    let has = |k: &str| keys.iter().any(|x| x == k);
    if has("run") {
        let (_, spec) = halo_model::parse_service(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("{name}: ok (service '{}', {} replicas, {} routes)", spec.name, spec.replicas, spec.routes.len());
    } else if has("node") || has("services") || has("vip") {
        let n = halo_control::parse_node(&name, &text).map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?;
        println!(
            "{name}: ok (node file: API {}, {} listeners, {} services, {} floating IPs)",
            n.api,
            n.proxy.listeners.len(),
            n.services.len(),
            n.vips.len()
        );
    } else {
        let c = halo_proxy::config::parse(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "{name}: ok (proxy file: {} listeners, {} routes, {} upstreams, {} endpoints)",
            c.listeners.len(),
            c.routes.len(),
            c.upstreams.len(),
            c.upstreams.values().map(|u| u.endpoints.len()).sum::<usize>()
        );
    }
    Ok(())
}
