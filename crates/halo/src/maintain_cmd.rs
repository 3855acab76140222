//! `halo node maintain` and `halo node maintenance`: a rolling maintenance
//! of nodes (drain within every budget, run a command, wait for the node,
//! undrain, next), carried out by the leader.

use bytes::Bytes;
use halo_control::maintenance::{MaintenanceRecord, Phase, RunState};
use http::Method;

use crate::cli_cmd::{runtime, Target};
use crate::output::{render, table, Output};

#[derive(clap::Args)]
pub struct MaintainArgs {
    /// The nodes, in the order they go.
    nodes: Vec<String>,
    /// Every live node.
    #[arg(long)]
    all: bool,
    /// What each node runs once drained (`sh -c`): a reboot, an OS
    /// upgrade; halo may go away and come back meanwhile.
    #[arg(long)]
    command: String,
    /// Nodes drained at once.
    #[arg(long, default_value_t = 1)]
    max_unavailable: u32,
    #[command(flatten)]
    wait: crate::cli_cmd::WaitArgs,
    #[command(flatten)]
    out: Output,
}

#[derive(clap::Args)]
pub struct MaintenanceArgs {
    /// Stop the maintenance under way (the nodes it drained stay drained).
    #[arg(long)]
    cancel: bool,
    #[command(flatten)]
    out: Output,
}

fn call(t: &Target, method: Method, body: Option<String>) -> anyhow::Result<MaintenanceRecord> {
    let c = t.client()?;
    let b = runtime()?.block_on(c.call(method, "/v1/maintenance", body.map(Bytes::from), |_| {}))?;
    Ok(serde_json::from_slice(&b)?)
}

pub fn maintain(t: &Target, a: MaintainArgs) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "nodes": a.nodes, "all": a.all, "command": a.command, "max_unavailable": a.max_unavailable,
    });
    let rec = call(t, Method::POST, Some(body.to_string()))?;
    let names: Vec<&str> = rec.nodes.iter().map(|s| s.node.as_str()).collect();
    a.out.print(&rec, |_| format!("maintenance asked: {} ({} at a time)\n", names.join(", "), rec.max_unavailable))?;
    if !a.wait.wait {
        return Ok(());
    }
    follow(t, rec.id, a.wait.timeout)
}

/// Prints each node's progress until the maintenance `id` ends. The node
/// asked may be one under maintenance: while its API does not answer, the
/// wait goes on (until `timeout`).
fn follow(t: &Target, id: u64, timeout: std::time::Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut said: Vec<String> = Vec::new();
    let mut away = false;
    loop {
        let rec = match call(t, Method::GET, None) {
            Ok(rec) => {
                away = false;
                rec
            }
            Err(e) if started.elapsed() < timeout => {
                if !away {
                    println!("(the node's API does not answer, it may be under maintenance: {e}; still waiting)");
                    away = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e),
        };
        anyhow::ensure!(rec.id == id, "another maintenance replaced this one");
        for s in &rec.nodes {
            let line = format!("{}: {} ({})", s.node, phase(s.phase), s.detail);
            if !said.contains(&line) {
                println!("{line}");
                said.push(line);
            }
        }
        match rec.state {
            RunState::Done => {
                println!("done after {:.1}s", started.elapsed().as_secs_f64());
                return Ok(());
            }
            RunState::Failed | RunState::Cancelled => anyhow::bail!("maintenance ended: {}", rec.reason),
            RunState::Running => {}
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "still under way after {timeout:?} (--timeout); it goes on: `halo node maintenance` shows where it is"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "pending",
        Phase::Draining => "draining",
        Phase::Running => "running",
        Phase::Done => "done",
        Phase::Failed => "failed",
    }
}

pub fn maintenance(t: &Target, a: MaintenanceArgs) -> anyhow::Result<()> {
    let rec = if a.cancel { call(t, Method::DELETE, None)? } else { call(t, Method::GET, None)? };
    a.out.print(&rec, |_| {
        let state = match rec.state {
            RunState::Running => "under way",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        };
        let mut out = format!("maintenance {state}: `{}`, {} at a time\n", rec.command, rec.max_unavailable);
        let mut tb = table(&["NODE", "PHASE", "DETAIL"]);
        for s in &rec.nodes {
            tb.add_row(vec![s.node.clone(), phase(s.phase).to_string(), s.detail.clone()]);
        }
        out.push_str(&render(tb, 2));
        if !rec.reason.is_empty() {
            out.push_str(&format!("  {}\n", rec.reason));
        }
        out
    })
}
