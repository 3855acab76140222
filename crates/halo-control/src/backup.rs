//! Backups of halo's own state, and their verified restore.
//!
//! An archive is a plain tar file (readable with `tar -tf`) holding:
//! - `store.jsonl`: every durable key (one without a lease: services,
//!   rollouts, assignments, instance records, node admin records, the
//!   schema version and the API token) of one consistent listing of
//!   [`ROOT`], one JSON object a line: `{"v": 1, "key": K, "value": V}`
//!   with `v` the record version and `V` the value as text, or
//!   `{"hex": ...}` when it is not UTF-8. Keys on leases
//!   (nodes, endpoints, the leader, counters) describe live processes, not
//!   state, and are left out.
//! - `hooks/NAME.out`: what each service's backup hook wrote (its
//!   `[backup] command`, run in a ready instance's environment).
//! - `manifest.json` (last): the format version, halo's version, the
//!   creation time, the store revision the listing was read at, the number
//!   of keys, each hook's outcome, and the size and SHA-256 of every other
//!   member.
//!
//! Opening an archive checks all of it before anything is used: a member
//! whose checksum differs is named, a newer format is refused. A restore
//! writes the keys into a new embedded store and moves its revision
//! [`RESTORE_GAP`] above the backup's, so every revision, fencing token and
//! instance id handed out afterwards is above every one the backed-up
//! store had handed out by then (time only moves forward).

use std::io::Read;
use std::path::Path;

use halo_store::{EmbeddedStore, Revision, Store, StoreError, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{
    Assignment, InstanceRecord, NodeAdmin, RolloutRecord, ServiceRecord, API_TOKEN, ASSIGNMENTS, INSTANCES, NODE_ADMIN,
    ROLLOUTS, ROOT, SCHEMA, SERVICES,
};

/// The archive format this halo writes and the newest it reads.
pub const FORMAT: u32 = 1;

/// How far above the backup's revision a restored store starts.
pub const RESTORE_GAP: Revision = 1_000_000;

const MANIFEST: &str = "manifest.json";
const STORE: &str = "store.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a halo backup: {0}")]
    NotABackup(String),
    #[error("backup format {found} is newer than this halo reads (up to {FORMAT}); use a newer halo")]
    NewerFormat { found: u32 },
    #[error("member {member} is damaged: {detail}")]
    Damaged { member: String, detail: String },
    #[error("key {key} in {STORE} cannot be restored: {detail}")]
    BadRecord { key: String, detail: String },
    #[error("cannot restore into {dir}: {why}")]
    Target { dir: String, why: String },
    #[error("the backup hook of service '{service}' failed: {why} (on_error = \"continue\" leaves it out instead)")]
    Hook { service: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub halo_version: String,
    /// Unix seconds.
    pub created: u64,
    /// The store revision the state was read at.
    pub revision: Revision,
    pub keys: usize,
    /// Each service hook: its member, or why it is not there.
    #[serde(default)]
    pub hooks: Vec<HookEntry>,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookEntry {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The record version this halo writes and the newest it reads.
const RECORD_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Line {
    /// The record's version, so a later halo reads an older archive.
    v: u8,
    key: String,
    value: Value,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Value {
    Text(String),
    Bytes { hex: String },
}

/// An archive that opened and passed every check.
#[derive(Debug)]
pub struct Backup {
    pub manifest: Manifest,
    pub entries: Vec<(String, Vec<u8>)>,
    /// (service, hook output).
    pub hooks: Vec<(String, Vec<u8>)>,
}

fn hook_member(service: &str) -> String {
    format!("hooks/{service}.out")
}

/// A backup of the cluster as this node sees it now: every service's hook
/// this node can run (one failing with `on_error = "fail"` fails it all),
/// then the store.
pub(crate) async fn take(r: &crate::hooks::Hooks) -> Result<Vec<u8>, BackupError> {
    let (done, failed) = crate::hooks::backup_all(r).await;
    if let Some((service, why, _)) = failed.iter().find(|(_, _, fatal)| *fatal) {
        return Err(BackupError::Hook { service: service.clone(), why: why.clone() });
    }
    let skipped = failed.into_iter().map(|(s, why, _)| (s, why)).collect();
    create(&*r.ctx.store, done, skipped).await
}

/// SHA-256 of `bytes` as lowercase hex (archives, the API token's digest).
pub(crate) fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A backup of `store` now (one listing, so one revision's state) with
/// `hooks` outputs, and the hooks `skipped` with why.
pub async fn create(
    store: &dyn Store,
    hooks: Vec<(String, Vec<u8>)>,
    skipped: Vec<(String, String)>,
) -> Result<Vec<u8>, BackupError> {
    let listing = store.list(ROOT).await?;
    let mut lines = Vec::new();
    let mut keys = 0;
    for kv in listing.kvs.iter().filter(|kv| kv.lease.is_none()) {
        let value = match String::from_utf8(kv.value.clone()) {
            Ok(t) => Value::Text(t),
            Err(_) => Value::Bytes { hex: kv.value.iter().map(|b| format!("{b:02x}")).collect() },
        };
        serde_json::to_writer(&mut lines, &Line { v: RECORD_VERSION, key: kv.key.clone(), value })
            .expect("a line encodes");
        lines.push(b'\n');
        keys += 1;
    }
    let created = halo_model::clock::unix_secs();
    let mut members = vec![Member { name: STORE.into(), size: lines.len() as u64, sha256: sha256(&lines) }];
    let mut entries: Vec<HookEntry> =
        skipped.into_iter().map(|(service, why)| HookEntry { service, member: None, error: Some(why) }).collect();
    for (service, out) in &hooks {
        members.push(Member { name: hook_member(service), size: out.len() as u64, sha256: sha256(out) });
        entries.push(HookEntry { service: service.clone(), member: Some(hook_member(service)), error: None });
    }
    let manifest = Manifest {
        format: FORMAT,
        halo_version: env!("CARGO_PKG_VERSION").into(),
        created,
        revision: listing.revision,
        keys,
        hooks: entries,
        members,
    };
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, STORE, &lines, created)?;
    for (service, out) in &hooks {
        append(&mut tar, &hook_member(service), out, created)?;
    }
    append(&mut tar, MANIFEST, &serde_json::to_vec_pretty(&manifest).expect("encodes"), created)?;
    Ok(tar.into_inner()?)
}

fn append(tar: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8], mtime: u64) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o600);
    h.set_mtime(mtime);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
}

/// Opens an archive and checks it whole: the manifest, every member's size
/// and checksum, every line and every record's type.
pub fn open(bytes: &[u8]) -> Result<Backup, BackupError> {
    let not = |why: &str| BackupError::NotABackup(why.to_string());
    let mut members = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().map_err(|e| not(&format!("not a tar archive ({e})")))? {
        let mut entry = entry.map_err(|e| not(&format!("not a tar archive ({e})")))?;
        let name = entry.path().map_err(|e| not(&e.to_string()))?.display().to_string();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| BackupError::Damaged { member: name.clone(), detail: e.to_string() })?;
        members.insert(name, data);
    }
    let raw = members.get(MANIFEST).ok_or_else(|| not(&format!("it has no {MANIFEST}")))?;
    let probe: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| BackupError::Damaged { member: MANIFEST.into(), detail: e.to_string() })?;
    let found = probe["format"].as_u64().ok_or_else(|| not(&format!("{MANIFEST} has no format version")))?;
    if found > u64::from(FORMAT) {
        return Err(BackupError::NewerFormat { found: found as u32 });
    }
    let manifest: Manifest = serde_json::from_value(probe)
        .map_err(|e| BackupError::Damaged { member: MANIFEST.into(), detail: e.to_string() })?;
    for m in &manifest.members {
        let data = members
            .get(&m.name)
            .ok_or_else(|| BackupError::Damaged { member: m.name.clone(), detail: "missing".into() })?;
        if data.len() as u64 != m.size || sha256(data) != m.sha256 {
            return Err(BackupError::Damaged {
                member: m.name.clone(),
                detail: format!("its SHA-256 is {}, the manifest says {}", sha256(data), m.sha256),
            });
        }
    }
    let store =
        members.get(STORE).ok_or_else(|| BackupError::Damaged { member: STORE.into(), detail: "missing".into() })?;
    let mut entries = Vec::new();
    for (i, line) in store.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let bad =
            |detail: String| BackupError::Damaged { member: STORE.into(), detail: format!("line {}: {detail}", i + 1) };
        let l: Line = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        if l.v > RECORD_VERSION {
            return Err(bad(format!("record version {} is newer than this halo reads ({RECORD_VERSION})", l.v)));
        }
        let value = match l.value {
            Value::Text(t) => t.into_bytes(),
            Value::Bytes { hex } => (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(hex.get(j..j + 2).unwrap_or("zz"), 16))
                .collect::<Result<_, _>>()
                .map_err(|_| bad("a value is not hex".into()))?,
        };
        check_record(&l.key, &value)?;
        entries.push((l.key, value));
    }
    if entries.len() != manifest.keys {
        return Err(BackupError::Damaged {
            member: STORE.into(),
            detail: format!("{} keys, the manifest says {}", entries.len(), manifest.keys),
        });
    }
    let hooks = manifest
        .hooks
        .iter()
        .filter_map(|h| Some((h.service.clone(), members.get(h.member.as_ref()?)?.clone())))
        .collect();
    Ok(Backup { manifest, entries, hooks })
}

/// Every record decodes as the key schema says (and a service validates).
fn check_record(key: &str, value: &[u8]) -> Result<(), BackupError> {
    let bad = |detail: String| BackupError::BadRecord { key: key.to_string(), detail };
    let json = |r: Result<(), serde_json::Error>| r.map_err(|e| bad(e.to_string()));
    if key.starts_with(SERVICES) {
        let rec: ServiceRecord = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
        halo_model::parse_stored_service(key, &rec.spec).map_err(|e| bad(e.to_string()))?;
    } else if key.starts_with(ASSIGNMENTS) {
        json(serde_json::from_slice::<Assignment>(value).map(drop))?;
    } else if key.starts_with(INSTANCES) {
        json(serde_json::from_slice::<InstanceRecord>(value).map(drop))?;
    } else if key.starts_with(NODE_ADMIN) {
        json(serde_json::from_slice::<NodeAdmin>(value).map(drop))?;
    } else if key.starts_with(ROLLOUTS) {
        json(serde_json::from_slice::<RolloutRecord>(value).map(drop))?;
    } else if key.starts_with(crate::keys::SCALES) {
        json(serde_json::from_slice::<crate::keys::ScaleRecord>(value).map(drop))?;
    } else if key == crate::keys::MAINTENANCE {
        json(serde_json::from_slice::<crate::keys::MaintenanceRecord>(value).map(drop))?;
    } else if key == SCHEMA || key == API_TOKEN {
        std::str::from_utf8(value).map_err(|_| bad("not text".into()))?;
    }
    Ok(())
}

/// Writes `backup` into a new embedded store in `dir` (which must hold
/// none yet), its revision moved [`RESTORE_GAP`] above the backup's.
pub async fn restore(backup: &Backup, dir: &Path) -> Result<Revision, BackupError> {
    let target = |why: String| BackupError::Target { dir: dir.display().to_string(), why };
    if dir.join("store.redb").exists() {
        return Err(target("it already holds a store; restore into a new data directory".into()));
    }
    // A data directory: its store and hook outputs hold secrets, so it is
    // the owner's alone (700, files 600), as `halo up` keeps its own.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| target(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| target(e.to_string()))?;
    }
    let store = EmbeddedStore::open(dir).await?;
    for chunk in backup.entries.chunks(1000) {
        let mut txn = Txn::new();
        txn.success = chunk.iter().map(|(k, v)| TxnOp::put(k, v.clone(), None)).collect();
        store.txn(txn).await?;
    }
    let floor = backup.manifest.revision + RESTORE_GAP;
    store.advance_revision(floor).await?;
    // Hook outputs wait for the node to run each service's restore hook
    // once an instance is ready.
    if !backup.hooks.is_empty() {
        let pending = dir.join(crate::hooks::RESTORE_DIR);
        std::fs::create_dir_all(&pending).map_err(|e| target(e.to_string()))?;
        for (service, out) in &backup.hooks {
            halo_model::check_name(service)
                .map_err(|e| BackupError::BadRecord { key: hook_member(service), detail: e })?;
            write_private(&pending.join(format!("{service}.out")), out).map_err(|e| target(e.to_string()))?;
        }
    }
    Ok(floor)
}

/// Writes `backup` into `store` (an etcd cluster, fresh: it must hold no
/// key under the root), after moving its revision above the backup's with
/// single puts (etcd has no other way up), so the fencing tokens and ids
/// handed out afterwards are above the backed-up ones. Returns the
/// revision the store ends at. Start the agents afterwards: they list it.
pub async fn restore_to(backup: &Backup, store: &dyn Store) -> Result<Revision, BackupError> {
    let listing = store.list(ROOT).await?;
    if let Some(kv) = listing.kvs.first() {
        return Err(BackupError::Target {
            dir: "the store".into(),
            why: format!("it already holds halo's state ({} and more); restore into a fresh one", kv.key),
        });
    }
    let mut revision = listing.revision;
    let floor = backup.manifest.revision + 1;
    while revision < floor {
        revision = store.put(RESTORE_FLOOR, floor.to_string().into_bytes(), None).await?;
    }
    for chunk in backup.entries.chunks(100) {
        let mut txn = Txn::new();
        txn.success = chunk.iter().map(|(k, v)| TxnOp::put(k, v.clone(), None)).collect();
        revision = store.txn(txn).await?.revision;
    }
    Ok(revision)
}

/// Writes an archive to a new file only its owner reads (archives hold the
/// API token and services' environments), synced to disk.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// What a restore into a running cluster changes: services (and nodes'
/// drain marks) created, changed or deleted to match the backup. Runtime
/// state (assignments, instance records, rollouts) is not restored there:
/// the running cluster derives it again from the services.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestorePlan {
    pub create: Vec<String>,
    pub change: Vec<String>,
    pub delete: Vec<String>,
    /// Whether it was carried out (`--force`), or only said.
    pub applied: bool,
}

/// The prefixes a running restore puts back.
const DESIRED: [&str; 2] = [SERVICES, NODE_ADMIN];

/// Compares `backup` with `store`'s desired state and, when `force`,
/// makes the store match it (puts and deletes, 100 to a transaction). Hook
/// outputs go to `restore_dir` for this node to run the restore hooks.
pub async fn restore_running(
    backup: &Backup,
    store: &dyn Store,
    restore_dir: &Path,
    force: bool,
) -> Result<RestorePlan, BackupError> {
    let mut plan = RestorePlan::default();
    let mut ops = Vec::new();
    let want: std::collections::BTreeMap<&str, &[u8]> = backup
        .entries
        .iter()
        .filter(|(k, _)| DESIRED.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut have = std::collections::BTreeMap::new();
    for prefix in DESIRED {
        for kv in store.list(prefix).await?.kvs {
            have.insert(kv.key.clone(), kv.value);
        }
    }
    for (key, value) in &want {
        match have.get(*key) {
            None => plan.create.push(key.to_string()),
            Some(v) if v.as_slice() != *value => plan.change.push(key.to_string()),
            Some(_) => continue,
        }
        ops.push(TxnOp::put(key, value.to_vec(), None));
    }
    for key in have.keys().filter(|k| !want.contains_key(k.as_str())) {
        plan.delete.push(key.clone());
        ops.push(TxnOp::Delete(key.clone()));
    }
    if !force {
        return Ok(plan);
    }
    for chunk in ops.chunks(100) {
        let mut txn = Txn::new();
        txn.success = chunk.to_vec();
        store.txn(txn).await?;
    }
    write_hooks(backup, restore_dir)?;
    plan.applied = true;
    Ok(plan)
}

fn write_hooks(backup: &Backup, pending: &Path) -> Result<(), BackupError> {
    if backup.hooks.is_empty() {
        return Ok(());
    }
    let target = |why: String| BackupError::Target { dir: pending.display().to_string(), why };
    std::fs::create_dir_all(pending).map_err(|e| target(e.to_string()))?;
    for (service, out) in &backup.hooks {
        halo_model::check_name(service).map_err(|e| BackupError::BadRecord { key: hook_member(service), detail: e })?;
        std::fs::write(pending.join(format!("{service}.out")), out).map_err(|e| target(e.to_string()))?;
    }
    Ok(())
}

/// The key a restore into etcd moves the revision up with.
const RESTORE_FLOOR: &str = "/halo/restore-floor";

/// Opens `bytes` and restores it into a scratch store under `scratch`, then
/// reads every key back: a backup that cannot be restored is not fine.
pub async fn verify(bytes: &[u8], scratch: &Path) -> Result<Backup, BackupError> {
    let backup = open(bytes)?;
    restore(&backup, scratch).await?;
    let store = EmbeddedStore::open(scratch).await?;
    let back = store.list(ROOT).await?;
    let want: std::collections::BTreeMap<&str, &[u8]> =
        backup.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let got: std::collections::BTreeMap<&str, &[u8]> =
        back.kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())).collect();
    if want != got {
        return Err(BackupError::Damaged {
            member: STORE.into(),
            detail: format!("a trial restore read back {} keys of {}", got.len(), want.len()),
        });
    }
    Ok(backup)
}
