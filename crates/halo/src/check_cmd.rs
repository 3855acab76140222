//! `halo check -c FILE`: validates any of halo's files without running
//! it. The kind is told by its top-level keys ([`halo_model::FileKind`]):
//! `name`/`[run]` is a service file, `[node]`, `[[services]]`, `[[vip]]` or
//! `[backup]` a node file (`halo up`), anything else a proxy file.

use std::path::Path;

use anyhow::Context;
use halo_model::FileKind;

pub fn check(path: &Path) -> anyhow::Result<()> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
    match FileKind::of(&text) {
        Some(FileKind::Service) => {
            let (_, spec) = halo_model::parse_service(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{name}: ok (service '{}', {} replicas, {} routes)", spec.name, spec.replicas, spec.routes.len());
        }
        Some(FileKind::Node) => {
            let n = halo_control::parse_node(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{name}: ok (node file: API {}, {} listeners, {} services, {} floating IPs)",
                n.api,
                n.proxy.listeners.len(),
                n.services.len(),
                n.vips.len()
            );
        }
        Some(FileKind::Proxy) | None => {
            let c = halo_proxy::config::parse(&name, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{name}: ok (proxy file: {} listeners, {} routes, {} upstreams, {} endpoints)",
                c.listeners.len(),
                c.routes.len(),
                c.upstreams.len(),
                c.upstreams.values().map(|u| u.endpoints.len()).sum::<usize>()
            );
        }
    }
    Ok(())
}
