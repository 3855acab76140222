//! The `halo` binary: parses arguments and dispatches to a role.

mod agent_cmd;
mod backup_cmd;
mod check_cmd;
mod cli_cmd;
mod demo_app;
mod etcd_args;
mod events_cmd;
mod flag_file;
mod maintain_cmd;
mod notify;
mod output;
mod proxy_cmd;
mod up_cmd;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use output::Output;

/// The version and the commit it was built from (`build.rs`).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("HALO_COMMIT"), ")");

#[derive(Parser)]
#[command(name = "halo", version = VERSION, about = "Load balancing, multi-node deployment and fault recovery in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// halo's private runtime directory (listen-address claims, the proxy's
    /// upgrade socket) [default: $RUNTIME_DIRECTORY, /run/halo as root,
    /// $XDG_RUNTIME_DIR/halo, else /tmp/halo-UID; owner-only, checked].
    #[arg(long, global = true, env = "HALO_RUN_DIR")]
    run_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node on the embedded store: store, supervisor, proxy and API.
    Up(up_cmd::UpArgs),
    /// Run a node of a cluster on etcd (every node runs the same roles).
    Agent(agent_cmd::AgentArgs),
    /// The cluster's nodes: list, drain, undrain.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        target: cli_cmd::Target,
    },
    /// Floating IPs (`[[vip]]` in node files): who holds each, and which nodes may.
    Vip {
        #[command(subcommand)]
        command: VipCommand,
        #[command(flatten)]
        target: cli_cmd::Target,
    },
    /// A service's canary rollout: status, promote, abort, pause, resume, retry, undo.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        #[command(flatten)]
        target: cli_cmd::Target,
    },
    /// Backups of the cluster's state: create, verify, restore, list.
    Backup {
        #[command(subcommand)]
        command: backup_cmd::BackupCommand,
    },
    /// Create or change a service from its file.
    Apply {
        /// The service file; `-` reads it from standard input.
        #[arg(short, long)]
        file: PathBuf,
        /// Show what would change (a diff of the stored file) and change nothing.
        #[arg(long, conflicts_with = "wait")]
        dry_run: bool,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// Services, instances, health and restarts.
    Status {
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// Set a service's replica count.
    Scale {
        service: String,
        /// 0 to 1000.
        #[arg(value_parser = cli_cmd::parse_replicas, allow_hyphen_values = true)]
        replicas: u32,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// Replace every instance of a service, one at a time, keeping capacity.
    Restart {
        service: String,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// Move a stateful service's primary to a replica: the primary stops
    /// taking writes (halo closes its connections), the replica catches up
    /// to it and is promoted, the old primary follows it.
    Switchover {
        service: String,
        /// The replica to promote (default: the synchronous standby, else
        /// the healthy replica furthest ahead).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// What happened in the cluster (exits, restarts, reschedules,
    /// elections, drains, API changes, rollouts, backups); -f follows.
    Events(events_cmd::EventsArgs),
    /// Show (or follow) a service's instance logs.
    Logs {
        service: String,
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Lines from the end of each instance's log.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        #[command(flatten)]
        target: cli_cmd::Target,
    },
    /// Print a service's file as stored (what `halo apply` last set, with
    /// `halo scale` applied).
    Get {
        service: String,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// Stop and remove a service.
    Delete {
        service: String,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        target: cli_cmd::Target,
        #[command(flatten)]
        out: Output,
    },
    /// A small HTTP app for the quickstart and tests.
    DemoApp(demo_app::DemoArgs),
    /// Run the data plane alone, in front of static upstreams.
    Proxy(proxy_cmd::ProxyArgs),
    /// Replace a running `halo proxy -c FILE` (or `halo up`/`agent` with
    /// --data-dir) by the binary now on disk, without dropping a
    /// connection: the new process takes over the listening sockets and
    /// endpoint health, the old one drains and exits. SIGUSR2 does the same.
    Upgrade {
        /// The running proxy's config file.
        #[arg(short, long, conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// The running node's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a proxy, node or service file without running it.
    Check {
        /// The config file to check.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print a shell completion script: `halo completions bash >
    /// /etc/bash_completion.d/halo` (zsh, fish, elvish, powershell too).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (halo.1, halo-up.1, ...) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Nodes, their liveness, zone, placements and the leader.
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Move a node's instances elsewhere (replacements start first) and
    /// place nothing new on it.
    Drain {
        name: String,
        #[command(flatten)]
        wait: cli_cmd::WaitArgs,
        #[command(flatten)]
        out: Output,
    },
    /// Let a drained node take instances again.
    Undrain {
        name: String,
        #[command(flatten)]
        out: Output,
    },
    /// Forget a node that is gone (it stays listed as not alive until then).
    Remove {
        name: String,
        #[command(flatten)]
        out: Output,
    },
    /// Rolling maintenance: drain one node at a time (within every
    /// service's budget), run a command on it, wait for it to be back,
    /// undrain it, go on. Carried on by whichever node leads.
    Maintain(maintain_cmd::MaintainArgs),
    /// The maintenance under way or the last one; --cancel stops it.
    Maintenance(maintain_cmd::MaintenanceArgs),
}

#[derive(Subcommand)]
enum VipCommand {
    /// Each floating IP: its holder, since when, its fencing token, and
    /// every node that declares it (and why it may not hold it).
    List {
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Step, weights, canary and stable counts per window, the verdicts,
    /// what it waits for.
    Status {
        service: String,
        /// Print it again every second until the rollout ends.
        #[arg(short, long)]
        watch: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Make the canary stable now, skipping the steps left.
    Promote(RolloutOrder),
    /// Roll the canary back now: the stable revision takes all traffic.
    Abort(RolloutOrder),
    /// Hold the canary at its step (weight kept, no window judged).
    Pause(RolloutOrder),
    /// Go on from the step it was paused at.
    Resume(RolloutOrder),
    /// Start the last rolled back or aborted canary again.
    Retry(RolloutOrder),
    /// Go back to the revision the last promoted canary replaced (rolling).
    Undo(RolloutOrder),
}

#[derive(clap::Args)]
struct RolloutOrder {
    service: String,
    #[command(flatten)]
    out: Output,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log what they do; a CLI verb prints its answer, and only
    // warnings beside it.
    let serving = matches!(cli.command, Command::Up(_) | Command::Agent(_) | Command::Proxy(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(dir) = cli.run_dir {
        halo_proxy::run_dir::set(dir);
    }
    exit(run(cli.command))
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up_cmd::run(args),
        Command::Agent(args) => agent_cmd::run(args),
        Command::Node { command, target } => match command {
            NodeCommand::List { out } => cli_cmd::node_list(&target, &out),
            NodeCommand::Drain { name, wait, out } => {
                cli_cmd::node_drain(&target, &out, &name, true)?;
                if wait.wait {
                    cli_cmd::wait(&target, &cli_cmd::Goal::Drained(name), wait.timeout)?;
                }
                Ok(())
            }
            NodeCommand::Undrain { name, out } => cli_cmd::node_drain(&target, &out, &name, false).map(drop),
            NodeCommand::Remove { name, out } => cli_cmd::node_remove(&target, &out, &name),
            NodeCommand::Maintain(a) => maintain_cmd::maintain(&target, a),
            NodeCommand::Maintenance(a) => maintain_cmd::maintenance(&target, a),
        },
        Command::Vip { command: VipCommand::List { out }, target } => cli_cmd::vip_list(&target, &out),
        Command::Rollout { command, target } => {
            let (order, o) = match command {
                RolloutCommand::Status { service, watch, out } => {
                    return cli_cmd::rollout_status(&target, &out, &service, watch)
                }
                RolloutCommand::Promote(o) => ("promote", o),
                RolloutCommand::Abort(o) => ("abort", o),
                RolloutCommand::Pause(o) => ("pause", o),
                RolloutCommand::Resume(o) => ("resume", o),
                RolloutCommand::Retry(o) => ("retry", o),
                RolloutCommand::Undo(o) => ("undo", o),
            };
            cli_cmd::rollout_order(&target, &o.out, &o.service, order)
        }
        Command::Backup { command } => backup_cmd::run(command),
        Command::Apply { file, dry_run, wait, target, out } => cli_cmd::apply(&target, &out, &file, dry_run, &wait),
        Command::Status { target, out } => cli_cmd::status(&target, &out),
        Command::Scale { service, replicas, wait, target, out } => {
            let goal =
                wait.wait.then(|| cli_cmd::Goal::service(&target, &service, Some(replicas), false)).transpose()?;
            cli_cmd::scale(&target, &out, &service, replicas)?;
            goal.map_or(Ok(()), |g| cli_cmd::wait(&target, &g, wait.timeout))
        }
        Command::Restart { service, wait, target, out } => {
            let goal = wait.wait.then(|| cli_cmd::Goal::service(&target, &service, None, true)).transpose()?;
            cli_cmd::restart(&target, &out, &service)?;
            goal.map_or(Ok(()), |g| cli_cmd::wait(&target, &g, wait.timeout))
        }
        Command::Switchover { service, to, wait, target, out } => {
            let goal = cli_cmd::Goal::switchover(&target, &service, to.as_deref())?;
            cli_cmd::switchover(&target, &out, &service, to.as_deref())?;
            if wait.wait {
                cli_cmd::wait(&target, &goal, wait.timeout)?;
            }
            Ok(())
        }
        Command::Logs { service, follow, instance, lines, target } => {
            cli_cmd::logs(&target, &service, follow, instance.as_deref(), lines)
        }
        Command::Delete { service, wait, target, out } => {
            cli_cmd::delete(&target, &out, &service)?;
            let goal = cli_cmd::Goal::Deleted(service);
            if wait.wait {
                cli_cmd::wait(&target, &goal, wait.timeout)?;
            }
            Ok(())
        }
        Command::Get { service, target, out } => cli_cmd::get(&target, &out, &service),
        Command::Events(args) => events_cmd::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "halo", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man(&dir),
        Command::DemoApp(args) => demo_app::run(args),
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Check { config } => check_cmd::check(&config),
        Command::Upgrade { config, data_dir } => match (config, data_dir) {
            (Some(c), _) => upgrade::request(&upgrade::proxy_socket(&c)?),
            (None, Some(d)) => upgrade::request(&upgrade::node_socket(&d)),
            (None, None) => Err(anyhow::anyhow!(
                "say which halo: -c FILE for `halo proxy -c FILE`, --data-dir DIR for `halo up` or `halo agent`"
            )),
        },
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `halo man --dir DIR`: one page per command.
fn man(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| anyhow::anyhow!("cannot write the manual pages into {}: {e}", dir.display()))?;
    println!("manual pages written to {}", dir.display());
    Ok(())
}
