//! `halo up`: one node on the embedded store: store, supervisor, proxy and
//! admin API in one process. SIGTERM and SIGINT drain and stop every
//! instance; SIGQUIT leaves them running for the next halo to adopt (to
//! upgrade or restart halo without restarting the application).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use halo_control::{parse_node, Node, NodeOptions};
use halo_model::lock::LockExt;
use halo_store::{EmbeddedStore, Store};
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args)]
pub struct UpArgs {
    /// The node file (listeners, API address, services to create)
    /// [default: ./halo.toml if present, else a proxy on 127.0.0.1:8080 and
    /// the API on 127.0.0.1:7070 with no services].
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Where the store, the token, logs and instance records live
    /// [default: the file's [node] data_dir, else ./halo-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// `halo up` without a file: the proxy and the API on loopback, no services.
const DEFAULT_NODE: &str = "[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n";

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let path = args.config.clone().or_else(|| Some(PathBuf::from("halo.toml")).filter(|p| p.exists()));
    let (name, text) = match &path {
        Some(p) => {
            let name = p.display().to_string();
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {name}"))?;
            (name, text)
        }
        None => ("(built-in default)".to_string(), DEFAULT_NODE.to_string()),
    };
    let cfg = parse_node(&name, &text).map_err(|e| anyhow::anyhow!("invalid node file:\n{e}"))?;
    let data_dir = prepare_data_dir(args.data_dir.clone().or_else(|| cfg.data_dir.clone()))?;
    control_runtime()?.block_on(serve(cfg, data_dir, Role::Single))
}

/// How the node keeps its state.
pub enum Role {
    /// `halo up`: the embedded store in the data directory.
    Single,
    /// `halo agent`: a cluster node on etcd.
    /// `token`: the cluster's API token as `--token-file` gave it, and
    /// where it came from.
    Cluster { store: halo_store::EtcdStore, cluster: halo_control::ClusterConfig, token: Option<(String, String)> },
}

/// Creates the data directory (default `./halo-data`) and makes it private.
pub fn prepare_data_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let data_dir = dir.unwrap_or_else(|| PathBuf::from("halo-data"));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    // Specs (their env may hold secrets), the token and logs: owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (mode 700)", data_dir.display()))?;
    Ok(data_dir)
}

pub fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("halo-control")
        .enable_all()
        .build()
        .context("start the control runtime")
}

/// Runs a node (its store, API, supervisor and proxy) until a signal.
pub async fn serve(cfg: halo_control::NodeConfig, data_dir: PathBuf, role: Role) -> anyhow::Result<()> {
    let grace = cfg.proxy.grace_period;
    // A binary upgrade: the old process's sockets, once it let go of the
    // store (it serves on until this one is ready).
    let taken = crate::upgrade::take_over()?;
    let (mut inherited, ready) = taken.map_or((None, None), |(i, r)| (Some(i), Some(r)));
    let kept = halo_api::token::load_or_create(&data_dir, halo_api::token::ADMIN).context("API token")?;
    let (local_token, source) = match &role {
        Role::Cluster { token: Some((t, from)), .. } => (t.clone(), from.clone()),
        _ => (kept.clone(), data_dir.join(halo_api::token::ADMIN).display().to_string()),
    };
    // The embedded store is this node's alone.
    let exclusive = matches!(role, Role::Single);
    let api_std = match inherited.as_mut().and_then(|i| i.extra.remove("api")) {
        Some(l) => l,
        None => {
            let l =
                std::net::TcpListener::bind(cfg.api).with_context(|| format!("cannot bind the API on {}", cfg.api))?;
            l.set_nonblocking(true)?;
            l
        }
    };
    let api_dup = api_std.try_clone()?;
    let api = tokio::net::TcpListener::from_std(api_std)?;
    let api_addr = api.local_addr()?;
    let exe = std::env::current_exe().context("locating the halo binary")?;
    let (store, mut opts): (Arc<dyn Store>, NodeOptions) = match role {
        Role::Single => {
            let store = EmbeddedStore::open(&data_dir).await.map_err(|e| damaged_store(e, &cfg, &data_dir))?;
            (Arc::new(store), NodeOptions::single(api_addr, data_dir.clone(), exe))
        }
        Role::Cluster { store, cluster, .. } => {
            let opts = NodeOptions {
                cluster,
                api: api_addr,
                data_dir: data_dir.clone(),
                halo_exe: exe,
                // Other nodes' proxies reach the instances.
                bind: [0, 0, 0, 0].into(),
                exclusive_store: false,
                api_token: String::new(),
                drivers: None,
            };
            (Arc::new(store), opts)
        }
    };
    // One token for every node of the cluster, the first node's; the
    // store keeps its digest. The read-only token is derived from it.
    let token = halo_control::token::join(&*store, &local_token, &source, exclusive).await?;
    if token != kept {
        halo_api::token::store(&data_dir, halo_api::token::ADMIN, &token).context("keeping the cluster's API token")?;
        tracing::info!("keeping the cluster's API token in the data directory");
    }
    let read = halo_control::token::read_token(&token);
    if halo_api::token::read(&data_dir, halo_api::token::READ).ok().as_deref() != Some(read.as_str()) {
        halo_api::token::store(&data_dir, halo_api::token::READ, &read).context("keeping the read-only API token")?;
    }
    opts.api_token = token.clone();
    let wanted: Vec<String> = inherited.as_ref().map(upstreams_with_endpoints).unwrap_or_default();
    let cfg_tls = cfg.api_tls.clone();
    let node = Node::start_inherited(cfg, opts, store, inherited.as_mut()).await?;
    drop(inherited);
    // Where the CLI finds this node: the address (https:// when TLS) and
    // the CA that signed the API's certificate.
    let api_tls = cfg_tls.as_ref().map(|t| t.server.clone());
    let scheme = if api_tls.is_some() { "https://" } else { "" };
    std::fs::write(data_dir.join("api.addr"), format!("{scheme}{api_addr}\n"))?;
    let ca_copy = data_dir.join(crate::cli_cmd::API_CA);
    match cfg_tls.as_ref().and_then(|t| t.ca.as_ref()) {
        Some(ca) => {
            std::fs::copy(ca, &ca_copy)
                .with_context(|| format!("copying {} to {}", ca.display(), ca_copy.display()))?;
        }
        None => {
            let _ = std::fs::remove_file(&ca_copy);
        }
    }
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let stop_api = Arc::new(std::sync::Mutex::new(Some(stop_api)));
    let tokens = halo_api::Tokens { admin: token, read };
    let server = tokio::spawn(halo_api::serve(api, node.clone(), tokens, api_tls, async {
        let _ = api_stopped.await;
    }));
    if ready.is_some() {
        // The API answers meanwhile: the other nodes hear this node (an
        // API silent for a second gets a node evicted). The proxy accepts
        // once every service that had endpoints has them again (the
        // adopted instances pass their readiness probes).
        let proxy = node.proxy().clone();
        let all_back = async {
            while !wanted.iter().all(|u| proxy.has_available_endpoint(u)) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(std::time::Duration::from_secs(30), all_back).await.is_err() {
            let missing: Vec<&String> = wanted.iter().filter(|u| !proxy.has_available_endpoint(u)).collect();
            tracing::warn!(?missing, "upgrade: not every service's endpoints are back after 30 s; serving anyway");
        }
        node.proxy().resume();
    }
    for (name, addr) in node.proxy().listener_addrs() {
        println!("listening {name} {addr}");
    }
    println!("api {api_addr}");
    println!("data {}", data_dir.display());
    let took_over = ready.is_some();
    if let Some(r) = ready {
        r.confirm()?;
    }
    // Binary upgrades: the sockets (proxy listeners, admin, API) go to the
    // new process; then this one stops its API and control plane and
    // closes the store, and drains.
    let (done_tx, mut upgraded) = tokio::sync::mpsc::channel(1);
    let give: crate::upgrade::Give = {
        let proxy = node.proxy().clone();
        Arc::new(move || proxy.handover(&[("api".to_string(), &api_dup)]))
    };
    let release: crate::upgrade::Release = {
        let (node, stop_api) = (node.clone(), stop_api.clone());
        Arc::new(move || {
            let (node, stop_api) = (node.clone(), stop_api.clone());
            Box::pin(async move {
                if let Some(s) = stop_api.locked().take() {
                    let _ = s.send(());
                }
                node.release().await;
            })
        })
    };
    let socket = crate::upgrade::node_socket(&data_dir);
    let (upgrades, l) = crate::upgrade::Upgrades::bind(socket, took_over, give, Some(release), done_tx)?;
    tokio::spawn(upgrades.clone().serve(l));
    // Ready once everything is, the upgrade socket too: a service manager
    // may run `halo upgrade` (systemd's ExecReload) the moment it hears it.
    println!("ready");
    tracing::info!(api = %api_addr, data_dir = %data_dir.display(), "halo up");
    crate::notify::ready(took_over);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut server = server;
    let mut api_ended = false;
    let stop_instances = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining and stopping instances"); break true }
            _ = int.recv() => { tracing::info!("SIGINT: draining and stopping instances"); break true }
            _ = quit.recv() => { tracing::info!("SIGQUIT: leaving instances running for the next halo"); break false }
            _ = usr2.recv() => drop(tokio::spawn({
                let u = upgrades.clone();
                async move { u.upgrade().await }
            })),
            Some(pid) = upgraded.recv() => {
                tracing::info!(new_pid = pid, grace = ?grace, "upgraded: this process drains and exits");
                node.proxy().shutdown(grace).await;
                return Ok(());
            }
            r = &mut server, if !api_ended => {
                api_ended = true;
                // Stopped by a handover (its stop sender taken): fine.
                if stop_api.locked().is_some() {
                    anyhow::bail!("the API server stopped: {r:?}");
                }
            }
        }
    };
    if let Some(s) = stop_api.locked().take() {
        let _ = s.send(());
    }
    upgrades.remove_socket();
    if stop_instances {
        node.shutdown(grace).await;
    } else {
        node.detach(grace).await;
    }
    Ok(())
}

/// The upstreams an old process had endpoints for: the new one waits for
/// them before it accepts.
/// A damaged store's error, with the way back: the newest backup restored
/// into a new data directory, or starting afresh.
fn damaged_store(e: halo_store::StoreError, cfg: &halo_control::NodeConfig, data_dir: &Path) -> anyhow::Error {
    let halo_store::StoreError::Damaged { path, .. } = &e else { return e.into() };
    let archives = cfg.backup.as_ref().map_or_else(|| data_dir.join("backups"), |b| b.archive_dir(data_dir));
    let new_dir = data_dir.with_file_name(format!(
        "{}-restored",
        data_dir.file_name().map_or("halo-data".into(), |n| n.to_string_lossy())
    ));
    let way_back = match halo_control::newest_archive(&archives) {
        Some(a) => format!(
            "To recover from the newest backup ({}):\n  halo backup restore {} --into {}\n  halo up --data-dir {}              (with the same node file)",
            a.display(),
            a.display(),
            new_dir.display(),
            new_dir.display()
        ),
        None => format!(
            "There is no backup in {}. Restore one you keep elsewhere with `halo backup restore FILE --into DIR`, \
             or move {path} aside to start with an empty store (the node file's services are created again).",
            archives.display()
        ),
    };
    anyhow::anyhow!("{e}\nhalo has not changed it. {way_back}")
}

fn upstreams_with_endpoints(i: &halo_proxy::handover::Inherited) -> Vec<String> {
    let mut v: Vec<String> = i.endpoints.iter().filter(|e| e.active_up).map(|e| e.upstream.clone()).collect();
    v.sort();
    v.dedup();
    v
}
