//! `halo events [-f]`: what happened in the cluster, newest last: exits,
//! restarts, crash loops, readiness, placements and reschedules,
//! elections, drains, API changes, rollouts, backups.

use std::io::Write;

use halo_control::events::{Event, Level};
use http::Method;

use crate::cli_cmd::{age, read, runtime, Target};
use crate::output::{render, table, Format, Output};
use halo_model::clock::unix_secs;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(short, long)]
    follow: bool,
    /// Only this service's events.
    #[arg(long)]
    service: Option<String>,
    /// How many of the newest events to show first.
    #[arg(short = 'n', long, default_value_t = 50)]
    lines: usize,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    out: Output,
}

pub fn run(a: EventsArgs) -> anyhow::Result<()> {
    let mut path = format!("/v1/events?limit={}", a.lines);
    if let Some(s) = &a.service {
        path.push_str(&format!("&service={s}"));
    }
    if !a.follow {
        let events: Vec<Event> = read(&a.target, &path)?;
        let now = unix_secs() * 1000;
        return a.out.print(&events, |wide| events_text(&events, now, wide));
    }
    // Following: one event a line as it comes, in fixed columns.
    let format = a.out.format();
    let wide = format == Format::Wide;
    let mut stdout = std::io::stdout();
    if matches!(format, Format::Table | Format::Wide) {
        let _ = stdout.write_all(line_header(wide).as_bytes());
    }
    let c = a.target.client()?;
    let mut pending = Vec::new();
    runtime()?.block_on(c.call(Method::GET, &format!("{path}&follow=true"), None, |chunk| {
        pending.extend_from_slice(chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = pending.drain(..=end).collect();
            let Ok(e) = serde_json::from_slice::<Event>(&l) else { continue };
            let text = match format {
                Format::Json => format!("{}\n", serde_json::to_string(&e).unwrap_or_default()),
                Format::Yaml => {
                    format!("---\n{}", crate::output::yaml(&serde_json::to_value(&e).unwrap_or_default()))
                }
                Format::Table | Format::Wide => event_line(&e, wide),
            };
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
    }))?;
    anyhow::bail!("the node ended the event stream (its store watch broke or it stopped); run `halo events -f` again")
}

fn level(l: Level) -> &'static str {
    match l {
        Level::Info => "info",
        Level::Warning => "warning",
    }
}

fn events_text(events: &[Event], now_ms: u64, wide: bool) -> String {
    if events.is_empty() {
        return "no events in the last hour\n".into();
    }
    let mut header = vec!["AGE", "TYPE", "NODE", "KIND", "SERVICE", "MESSAGE"];
    if wide {
        header[0] = "TIME";
        header.insert(5, "INSTANCE");
    }
    let mut t = table(&header);
    for e in events {
        let when = if wide {
            halo_control::cron::utc(e.time_ms / 1000)
        } else {
            format!("{} ago", age(now_ms.saturating_sub(e.time_ms) / 1000))
        };
        let mut row = vec![
            when,
            level(e.level).to_string(),
            e.node.clone(),
            e.kind.to_string(),
            e.service.clone().unwrap_or_else(|| "-".into()),
            e.message.clone(),
        ];
        if wide {
            row.insert(5, e.instance.clone().unwrap_or_else(|| "-".into()));
        }
        t.add_row(row);
    }
    render(t, 0)
}

fn line_header(wide: bool) -> String {
    let instance = if wide { format!("{:<16} ", "INSTANCE") } else { String::new() };
    format!("{:<23}  {:<8} {:<12} {:<12} {:<16} {instance}MESSAGE\n", "TIME", "TYPE", "NODE", "KIND", "SERVICE")
}

fn event_line(e: &Event, wide: bool) -> String {
    let instance = if wide { format!("{:<16} ", e.instance.as_deref().unwrap_or("-")) } else { String::new() };
    format!(
        "{:<23}  {:<8} {:<12} {:<12} {:<16} {instance}{}\n",
        halo_control::cron::utc(e.time_ms / 1000),
        level(e.level),
        e.node,
        e.kind,
        e.service.as_deref().unwrap_or("-"),
        e.message
    )
}
