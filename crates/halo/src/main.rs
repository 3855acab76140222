//! The `halo` binary: parses arguments and dispatches to a role.

mod proxy_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "halo", version, about = "Load balancing, multi-node deployment and fault recovery in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data plane alone, in front of static upstreams.
    Proxy(proxy_cmd::ProxyArgs),
    /// Validate a proxy config file without running it.
    Check {
        /// The config file to check.
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy(args) => proxy_cmd::run(args),
        Command::Check { config } => proxy_cmd::check(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
