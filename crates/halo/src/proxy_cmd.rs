//! `halo proxy` and `halo check`: wiring the proxy engine to a config file or
//! command-line flags, a runtime and signals.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use halo_proxy::config::{self, Config};
use halo_proxy::Proxy;
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Config file (see examples/proxy.toml). Without it, --listen and
    /// --backend describe one listener balancing over the given backends.
    #[arg(short, long, conflicts_with_all = ["listen", "backend"])]
    config: Option<PathBuf>,
    /// Address to accept HTTP on, as IP:PORT.
    #[arg(long, requires = "backend")]
    listen: Option<String>,
    /// A backend address, IP:PORT; repeat for more.
    #[arg(long)]
    backend: Vec<String>,
    /// Balancing policy: round_robin, least_request, p2c_ewma, random.
    #[arg(long, default_value = "round_robin")]
    policy: String,
    /// Worker threads (default: one per core, or the file's proxy.workers).
    #[arg(long)]
    workers: Option<usize>,
    /// Admin listener (metrics, status, reload) with --listen, as IP:PORT.
    #[arg(long)]
    admin: Option<String>,
    /// A file holding the token the admin listener wants (mode 600);
    /// required when --admin is not on loopback.
    #[arg(long, requires = "admin")]
    admin_token_file: Option<std::path::PathBuf>,
}

/// Builds the config the flags describe by writing it in the file format,
/// so flags and files share one validation path.
fn config_from_flags(a: &ProxyArgs) -> anyhow::Result<Config> {
    let Some(listen) = &a.listen else {
        bail!("give a config file with -c FILE, or --listen IP:PORT with at least one --backend IP:PORT");
    };
    let quote = |s: &str| format!("{s:?}");
    let mut text = format!("[[listeners]]\nname = \"main\"\nlisten = {}\n\n", quote(listen));
    if let Some(admin) = &a.admin {
        text.push_str(&format!("[admin]\nlisten = {}\n", quote(admin)));
        if let Some(f) = &a.admin_token_file {
            // Absolute: the flags' "file" has no directory of its own.
            let f = std::path::absolute(f).unwrap_or_else(|_| f.clone());
            text.push_str(&format!("token_file = {}\n", quote(&f.to_string_lossy())));
        }
        text.push('\n');
    }
    let backends: Vec<String> = a.backend.iter().map(|b| quote(b)).collect();
    text.push_str(&format!(
        "[[routes]]\nname = \"default\"\nupstream = \"backends\"\n\n[upstreams.backends]\npolicy = {}\nendpoints = [{}]\n",
        quote(&a.policy),
        backends.join(", ")
    ));
    config::parse("(command line)", &text).map_err(|e| anyhow::anyhow!("invalid flags:\n{e}"))
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(path) => config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => config_from_flags(&args)?,
    };
    if let Some(w) = args.workers {
        if w == 0 {
            bail!("--workers must be at least 1");
        }
        cfg.workers = w;
    }
    // This runtime runs signals, the admin listener and health checks; the
    // proxy starts its own worker threads for traffic.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_name("halo-control")
        .enable_all()
        .build()
        .context("start the control runtime")?;
    runtime.block_on(serve(cfg, args.config))
}

async fn serve(cfg: Config, source: Option<PathBuf>) -> anyhow::Result<()> {
    let grace = cfg.grace_period;
    let workers = cfg.workers;
    let taken = crate::upgrade::take_over()?;
    let (mut inherited, ready) = taken.map_or((None, None), |(i, r)| (Some(i), Some(r)));
    let proxy = Proxy::start_inherited(cfg, source.clone(), inherited.as_mut(), false).await?;
    drop(inherited);
    for (name, addr) in proxy.listener_addrs() {
        // A machine-readable line, used by scripts and tests to find ports.
        println!("listening {name} {addr}");
    }
    if let Some(a) = proxy.admin_addr() {
        println!("admin {a}");
    }
    // Binary upgrades: for a proxy run from a config file.
    let (done_tx, mut upgraded) = tokio::sync::mpsc::channel(1);
    let took_over = ready.is_some();
    if let Some(r) = ready {
        r.confirm()?;
    }
    let upgrades = match &source {
        Some(path) => {
            let p = proxy.clone();
            let give: crate::upgrade::Give = Arc::new(move || p.handover(&[]));
            let socket = crate::upgrade::proxy_socket(path)?;
            let (u, l) = crate::upgrade::Upgrades::bind(socket, took_over, give, None, done_tx)?;
            tokio::spawn(u.clone().serve(l));
            Some(u)
        }
        None => None,
    };
    // Ready once everything is: a service manager may run `halo upgrade`
    // (systemd's ExecReload) the moment it hears it.
    println!("ready");
    tracing::info!(workers, "halo proxy running");
    crate::notify::ready(took_over);
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match proxy.reload_from_source() {
                Ok(()) => {}
                Err(e) => tracing::error!(error = %e, "reload refused; the running config is kept"),
            },
            _ = term.recv() => {
                tracing::info!("SIGTERM: graceful shutdown");
                proxy.shutdown(grace).await;
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: fast shutdown");
                proxy.shutdown(Duration::ZERO).await;
                break;
            }
            _ = usr2.recv() => match &upgrades {
                Some(u) => drop(tokio::spawn({
                    let u = u.clone();
                    async move { u.upgrade().await }
                })),
                None => tracing::warn!("SIGUSR2: binary upgrades need a config file (-c FILE)"),
            },
            Some(pid) = upgraded.recv() => {
                tracing::info!(new_pid = pid, grace = ?grace, "upgraded: this process stops accepting and drains");
                proxy.shutdown(grace).await;
                return Ok(());
            }
        }
    }
    if let Some(u) = &upgrades {
        u.remove_socket();
    }
    Ok(())
}
