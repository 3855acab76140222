//! `halo agent`: one node of a cluster on etcd. Every node runs the same
//! roles: its proxy routes to every node's instances, its supervisor runs
//! what the leader assigned to it, its API takes `halo apply` and the
//! other verbs; one of them, elected, runs the scheduler.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use halo_control::{parse_node, ClusterConfig};

use crate::up_cmd::{control_runtime, prepare_data_dir, serve, Role};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The etcd cluster: etcd://HOST:PORT[,HOST:PORT...] (or without the
    /// scheme), or etcds:// for TLS (with --etcd-ca).
    #[arg(long, value_name = "URL")]
    store: String,
    #[command(flatten)]
    etcd: crate::etcd_args::EtcdArgs,
    /// Keep every key under this prefix, to share an etcd between clusters
    /// (starts with '/', as in /prod).
    #[arg(long, default_value = "")]
    namespace: String,
    /// This node's name, unique in the cluster (letters, digits, '-', '_').
    #[arg(long)]
    node: String,
    /// The address other nodes reach this node's instances on.
    #[arg(long)]
    advertise: IpAddr,
    /// Failure domain: replicas of a service are spread across zones first.
    #[arg(long, default_value = "default")]
    zone: String,
    /// Most instances this node runs, over all services.
    #[arg(long, default_value_t = 100)]
    capacity: u32,
    /// The node lease's TTL: a node silent for this long is gone from the
    /// cluster and its instances are started elsewhere.
    #[arg(long, default_value = "3s", value_parser = parse_ttl)]
    lease_ttl: Duration,
    /// The node file (listeners, API address, services to create)
    /// [default: a proxy on ADVERTISE:8080 and the API on 127.0.0.1:7070].
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Where the token, logs and this node's files live [default: the
    /// file's [node] data_dir, else ./halo-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The cluster's API token: the file `token` in the first node's data
    /// directory (owner-only). Every other node needs it to join; the store
    /// keeps only its digest [default: this node's own, from an earlier
    /// run, else a new one: right for the first node only].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = halo_proxy::config::parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err(format!("'{s}' is too short; the lease TTL is at least 2s (etcd renews in whole seconds)"));
    }
    Ok(d)
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let url = crate::etcd_args::parse_store(&args.store)?;
    // The files are read (and a missing one reported) before anything starts.
    let auth = args.etcd.auth(&url)?;
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if args.node.is_empty() || args.node.len() > 63 || !args.node.chars().all(valid) {
        anyhow::bail!("--node: '{}' is not accepted; use 1 to 63 letters, digits, '-' or '_'", args.node);
    }
    if args.advertise.is_unspecified() {
        anyhow::bail!(
            "--advertise: {} is not an address other nodes can reach; give this node's own IP",
            args.advertise
        );
    }
    if args.capacity == 0 {
        anyhow::bail!("--capacity: 0 is not accepted; a node takes at least 1 instance");
    }
    let (name, text) = match &args.config {
        Some(p) => {
            let name = p.display().to_string();
            (name.clone(), std::fs::read_to_string(p).with_context(|| format!("cannot read {name}"))?)
        }
        None => {
            let listen = SocketAddr::new(args.advertise, 8080);
            ("(built-in default)".to_string(), format!("[[listeners]]\nname = \"http\"\nlisten = \"{listen}\"\n"))
        }
    };
    let token = match &args.token_file {
        Some(f) => {
            let text = crate::flag_file::read_flag_file(f, "--token-file", true)?;
            Some((String::from_utf8_lossy(&text).trim().to_string(), format!("--token-file {}", f.display())))
        }
        None => None,
    };
    let cfg = parse_node(&name, &text).map_err(|e| anyhow::anyhow!("invalid node file:\n{e}"))?;
    if cfg.api_tls.as_ref().is_some_and(|t| t.peers.is_none()) {
        anyhow::bail!(
            "invalid node file:\n{name}: node.tls.ca: a cluster node with an HTTPS API needs ca = \"FILE\", the CA \
             that signed every node's API certificate (to check the other nodes it asks)"
        );
    }
    let data_dir = prepare_data_dir(args.data_dir.clone().or_else(|| cfg.data_dir.clone()))?;
    let cluster = ClusterConfig {
        node: args.node.clone(),
        addr: args.advertise,
        zone: args.zone.clone(),
        capacity: args.capacity,
        lease_ttl: args.lease_ttl,
    };
    control_runtime()?.block_on(async move {
        let store = crate::etcd_args::connect(&url, &args.namespace, &auth).await?;
        serve(cfg, data_dir, Role::Cluster { store, cluster, token }).await
    })
}
