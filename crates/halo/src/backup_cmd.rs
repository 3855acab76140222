//! `halo backup`: archives of the cluster's state (`create`, through any
//! node's API) and their checks and restore (`verify`, `restore`, `list`,
//! on files, without a running halo).

use std::path::{Path, PathBuf};

use anyhow::Context;
use halo_control::backup;
use http::Method;

use crate::cli_cmd::{runtime, Target};

#[derive(clap::Subcommand)]
pub enum BackupCommand {
    /// Write an archive of the cluster's state now (one store revision).
    Create {
        /// Where to write it [default: ./halo-backup-UNIXTIME.tar].
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Check an archive: its checksums, every record, and a trial restore
    /// into a scratch store.
    Verify { file: PathBuf },
    /// Restore an archive: into a new data directory (`--into`, then `halo
    /// up` on it), into a fresh etcd cluster (`--store`, then start the
    /// agents), or into the running cluster (says what would change;
    /// `--force` changes it).
    Restore {
        file: PathBuf,
        /// A new data directory to create (it must hold no store yet).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["store", "force"])]
        into: Option<PathBuf>,
        /// A fresh etcd cluster: etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS).
        #[arg(long, value_name = "URL", conflicts_with = "force")]
        store: Option<String>,
        /// The agents' --namespace, with --store.
        #[arg(long, default_value = "", requires = "store")]
        namespace: String,
        #[command(flatten)]
        etcd: crate::etcd_args::EtcdArgs,
        /// Into the running cluster: make its services match the archive.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel the scheduled backup under way on the node (its hooks are killed).
    Cancel {
        #[command(flatten)]
        target: Target,
    },
    /// The archives in a directory, with their revision, time and size.
    List {
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        out: crate::output::Output,
    },
}

pub fn run(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Create { out, target } => create(&target, out),
        BackupCommand::Verify { file } => verify(&file),
        BackupCommand::Restore { file, into: Some(dir), .. } => restore(&file, &dir),
        BackupCommand::Restore { file, store: Some(url), namespace, etcd, .. } => {
            restore_etcd(&file, &url, &namespace, &etcd)
        }
        BackupCommand::Restore { file, force, target, .. } => restore_running(&target, &file, force),
        BackupCommand::List { dir, out } => list(&dir, &out),
        BackupCommand::Cancel { target } => {
            let c = target.client()?;
            runtime()?.block_on(c.call(Method::POST, "/v1/backup/cancel", None, |_| {}))?;
            println!("backup: cancelled");
            Ok(())
        }
    }
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn create(t: &Target, out: Option<PathBuf>) -> anyhow::Result<()> {
    let c = t.client()?;
    let bytes = runtime()?.block_on(c.call(Method::GET, "/v1/backup", None, |_| {}))?;
    let b = backup::open(&bytes).context("the node sent an archive that does not check out")?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("halo-backup-{}.tar", b.manifest.created)));
    backup::write_private(&out, &bytes)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    println!(
        "{}: {} keys at store revision {}, {} bytes",
        out.display(),
        b.manifest.keys,
        b.manifest.revision,
        bytes.len()
    );
    Ok(())
}

fn verify(file: &Path) -> anyhow::Result<()> {
    let bytes = read(file)?;
    let scratch = halo_proxy::run_dir::scratch_dir(&std::env::temp_dir(), "halo-verify")
        .context("a scratch directory for the trial restore")?;
    let result = runtime()?.block_on(backup::verify(&bytes, &scratch));
    let _ = std::fs::remove_dir_all(&scratch);
    let b = result.with_context(|| format!("{} does not verify", file.display()))?;
    let services = b.entries.iter().filter(|(k, _)| k.starts_with(halo_control::keys::SERVICES)).count();
    println!(
        "{}: ok (format {}, halo {}, store revision {}, {} keys, {} services; a trial restore read every key back)",
        file.display(),
        b.manifest.format,
        b.manifest.halo_version,
        b.manifest.revision,
        b.manifest.keys,
        services
    );
    Ok(())
}

fn restore(file: &Path, dir: &Path) -> anyhow::Result<()> {
    let b = backup::open(&read(file)?).with_context(|| format!("{} cannot be restored", file.display()))?;
    let floor = runtime()?.block_on(backup::restore(&b, dir))?;
    println!(
        "restored {} keys from store revision {} into {} (the store starts at revision {floor}); start it with \
         `halo up --data-dir {}`",
        b.manifest.keys,
        b.manifest.revision,
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn restore_running(t: &Target, file: &Path, force: bool) -> anyhow::Result<()> {
    let bytes = read(file)?;
    backup::open(&bytes).with_context(|| format!("{} cannot be restored", file.display()))?;
    let c = t.client()?;
    let path = format!("/v1/backup/restore?force={force}");
    let answer = runtime()?.block_on(c.call(Method::POST, &path, Some(bytes.into()), |_| {}))?;
    let plan: serde_json::Value = serde_json::from_slice(&answer)?;
    let list = |k: &str| plan[k].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "));
    let (create, change, delete) =
        (list("create").unwrap_or_default(), list("change").unwrap_or_default(), list("delete").unwrap_or_default());
    let verb = if force { "restored into the running cluster" } else { "would change" };
    println!("{}: {verb}:", file.display());
    for (what, keys) in [("create", create), ("change", change), ("delete", delete)] {
        println!("  {what}: {}", if keys.is_empty() { "-".to_string() } else { keys });
    }
    if !force {
        println!("nothing changed; run again with --force to do it");
    }
    Ok(())
}

fn restore_etcd(file: &Path, url: &str, namespace: &str, etcd: &crate::etcd_args::EtcdArgs) -> anyhow::Result<()> {
    let b = backup::open(&read(file)?).with_context(|| format!("{} cannot be restored", file.display()))?;
    let url = crate::etcd_args::parse_store(url)?;
    let endpoints = &url.endpoints;
    let revision = runtime()?.block_on(async {
        let store = etcd.connect(&url, namespace).await?;
        anyhow::Ok(backup::restore_to(&b, &store).await?)
    })?;
    println!(
        "restored {} keys from store revision {} into etcd at {} (now at revision {revision}); start the agents",
        b.manifest.keys,
        b.manifest.revision,
        endpoints.join(",")
    );
    Ok(())
}

/// One archive as `halo backup list` shows it.
#[derive(serde::Serialize)]
struct Archive {
    file: String,
    size: u64,
    revision: Option<i64>,
    /// Unix seconds.
    created: Option<u64>,
    keys: Option<usize>,
    /// Why it cannot be restored, if it cannot.
    error: Option<String>,
}

fn list(dir: &Path, out: &crate::output::Output) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "tar") {
            continue;
        }
        let size = e.metadata().map_or(0, |m| m.len());
        let file = path.display().to_string();
        rows.push(match std::fs::read(&path).map_err(anyhow::Error::from).and_then(|b| Ok(backup::open(&b)?)) {
            Ok(b) => Archive {
                file,
                size,
                revision: Some(b.manifest.revision),
                created: Some(b.manifest.created),
                keys: Some(b.manifest.keys),
                error: None,
            },
            Err(e) => Archive { file, size, revision: None, created: None, keys: None, error: Some(format!("{e:#}")) },
        });
    }
    rows.sort_by(|a, b| a.file.cmp(&b.file));
    out.print(&rows, |_| {
        if rows.is_empty() {
            return format!("no backups (*.tar) in {}\n", dir.display());
        }
        let mut t = crate::output::table(&["FILE", "REVISION", "CREATED", "KEYS", "SIZE", "USABLE"]);
        for r in &rows {
            let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            t.add_row(vec![
                r.file.clone(),
                show(r.revision.map(|v| v.to_string())),
                show(r.created.map(halo_control::cron::utc)),
                show(r.keys.map(|v| v.to_string())),
                r.size.to_string(),
                r.error.as_ref().map_or("yes".to_string(), |e| format!("NO: {e}")),
            ]);
        }
        crate::output::render(t, 0)
    })
}
