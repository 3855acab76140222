//! Stateful services (`[stateful]`): instances with stable names and a
//! data directory each, and with replicas, one fenced primary.
//!
//! **The key.** `/halo/primaries/SVC` names the primary instance; it lives
//! on its node's *role lease* (a [`FastLease`]) and its create revision
//! is the primary's fencing token. With the key absent, the instance a
//! [`decide::may_campaign`] allows (the furthest ahead healthy replica)
//! takes it in a compare-and-swap, waits [`GUARD`], then runs `promote`.
//! A silent primary node's role lease is revoked by the candidate (as a
//! floating IP's holder's is), so the key goes at once.
//!
//! **Never two primaries.** A primary acts only while its role lease is
//! fresh (last renewal sent within [`HOLD_WINDOW`]): past it its process
//! group is frozen until a renewal succeeds; once the key is gone or
//! another's, it is demoted (`demote`, or its process is stopped). The new
//! primary promotes no earlier than [`GUARD`] after it took the key,
//! longer than the window. Proxies reach only a primary whose
//! published role is primary *under the current token*: a frozen or cut
//! off old primary is never reached once a new one took the key.
//!
//! **Data.** The instance's data directory (`HALO_STATE_DIR`) outlives its
//! process and halo; halo keeps two files there: `halo-role` (`primary`
//! or `replica`: how the process must start) and `halo-state.json` (the
//! role and token it last served, which tells a former primary apart). A
//! replica with no data is made by `clone` before it first starts; a
//! former primary is made to follow by `rewind` (or, failing that, a new
//! `clone`) before it starts again. The role state machine is in
//! `docs/architecture.md`.

pub mod decide;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_model::lock::LockExt;
use halo_model::{ServiceSpec, Volume};
use halo_store::Revision;
use halo_supervisor::InstanceSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ctx::NodeCtx;
use crate::events::EventKind;
use crate::fast_lease::FastLease;
use crate::keys::{primary_key, switchover_key, SwitchoverRecord};
use crate::state::ClusterState;

/// A primary whose role lease's last renewal was sent longer ago stops
/// serving writes.
pub const HOLD_WINDOW: Duration = Duration::from_millis(400);
/// After taking the key, the new primary waits this long before it
/// promotes: longer than [`HOLD_WINDOW`] and a tick of the old one's loop
/// (100 ms to spare).
pub const GUARD: Duration = Duration::from_millis(550);
/// A node whose role lease was last renewed longer ago than this sends
/// no new connection to any primary: its view may be stale (it was
/// frozen, or cut off), and a primary it still names may have been
/// replaced.
pub const ROUTE_WINDOW: Duration = Duration::from_secs(1);
/// In a switchover, how long the old primary waits, once no longer
/// published as primary, for every node's proxy to stop reaching it
/// before it stops.
pub const SWITCHOVER_DRAIN: Duration = Duration::from_millis(150);
/// A replica whose position stays put, away from its primary's, this long
/// does not stream from it: it is rewound.
pub const STALL_AFTER: Duration = Duration::from_secs(5);
/// How often the role loop looks.
pub const TICK: Duration = Duration::from_millis(50);
/// How often each instance's `position` is asked.
pub const POSITION_EVERY: Duration = Duration::from_millis(250);
/// How often each instance's `check` runs.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

pub use crate::keys::Role;

/// What halo keeps in an instance's data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub role: Role,
    pub token: Revision,
}

const ROLE_FILE: &str = "halo-role";
const STATE_FILE: &str = "halo-state.json";

/// Where instance `id`'s data lives on this node: the service's `data`
/// template, else `DATA_DIR-volumes/ID` (beside the data directory, which
/// only halo may enter).
pub fn data_dir(node_data: &Path, spec: &ServiceSpec, id: &str) -> PathBuf {
    match spec.stateful.as_ref().and_then(|s| s.data.as_deref()) {
        Some(t) => PathBuf::from(t.replace("{instance}", id)),
        None => {
            let mut root = node_data.as_os_str().to_owned();
            root.push("-volumes");
            PathBuf::from(root).join(id)
        }
    }
}

/// The docker volume of instance `id` on the node whose data directory is
/// `node_data`: `halo-ID-` and 8 hex digits of the node's mark (two nodes
/// sharing a daemon keep their own).
pub fn volume_name(node_data: &Path, id: &str) -> String {
    let mark = halo_model::owner_mark(&node_data.display().to_string());
    format!("halo-{id}-{}", &mark[..8])
}

/// `spec` as instance `id` runs it: `HALO_STATE_DIR` set, and with docker a
/// named volume ([`volume_name`]) mounted there.
pub fn instance_spec(node_data: &Path, spec: &Arc<ServiceSpec>, id: &str) -> Arc<ServiceSpec> {
    let Some(s) = &spec.stateful else { return spec.clone() };
    let mut out = (**spec).clone();
    let dir = match &mut out.run.driver {
        halo_model::RunDriver::Docker(d) => {
            d.volumes.push(Volume { source: volume_name(node_data, id), target: s.mount.clone(), read_only: false });
            s.mount.clone()
        }
        halo_model::RunDriver::Exec => data_dir(node_data, spec, id).display().to_string(),
    };
    out.run.env.insert("HALO_STATE_DIR".into(), dir);
    Arc::new(out)
}

/// The data directory made, owned by the instance's user, mode 700 (its
/// parent, halo's, 711: entered, not listed).
fn make_data_dir(dir: &Path, spec: &ServiceSpec) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let why = |e: std::io::Error| format!("cannot make the data directory {}: {e}", dir.display());
    if let Some(parent) = dir.parent() {
        if !parent.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o711).create(parent).map_err(why)?;
        }
    }
    if !dir.exists() {
        std::fs::DirBuilder::new().mode(0o700).create(dir).map_err(why)?;
        let who = halo_supervisor::identity::resolve(spec.run.user.as_deref(), spec.run.group.as_deref())
            .map_err(|e| e.to_string())?;
        if let Some(id) = who {
            std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid)).map_err(why)?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(why)?;
    }
    Ok(())
}

pub fn read_marker(dir: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).ok()?).ok()
}

/// Records the role the instance serves, and how its process starts.
pub fn write_marker(dir: &Path, m: Marker) -> std::io::Result<()> {
    let start_as = if m.role == Role::Primary { "primary\n" } else { "replica\n" };
    write_file(dir, ROLE_FILE, start_as.as_bytes())?;
    write_file(dir, STATE_FILE, &serde_json::to_vec(&m).expect("encodes"))
}

/// Sets only how the process starts (the state stays).
pub fn write_role_file(dir: &Path, role: Role) -> std::io::Result<()> {
    write_file(dir, ROLE_FILE, if role == Role::Primary { b"primary\n" } else { b"replica\n" })
}

/// Written whole or not at all, readable by the instance's user.
fn write_file(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data)?;
    let meta = std::fs::metadata(dir)?;
    let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
    std::fs::rename(tmp, dir.join(name))
}

/// Whether the instance should start now.
#[derive(Debug)]
pub enum Admit {
    Start,
    /// Not yet: why (its data is being made, or it waits for a primary).
    Wait(String),
}

/// A data-making hook (clone, rewind) running or failed.
enum Prep {
    Running(&'static str),
    Failed { at: Instant, why: String },
}

/// This node's part in its stateful services: the role lease, and the
/// data being made for instances before they start.
pub struct Stateful {
    pub(crate) ctx: Arc<NodeCtx>,
    pub lease: FastLease,
    prep: Mutex<BTreeMap<String, Prep>>,
    /// A data-making hook ended: the reconciler may start its instance.
    pub wake: Notify,
}

/// How long a failed clone or rewind waits before it is tried again.
const RETRY_PREP: Duration = Duration::from_secs(5);

impl Stateful {
    pub(crate) fn new(ctx: Arc<NodeCtx>) -> Arc<Stateful> {
        Arc::new(Stateful {
            ctx,
            lease: FastLease::new("primary", HOLD_WINDOW),
            prep: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// The primary's address as its node published it, with its token.
    pub fn primary_addr(st: &ClusterState, service: &str) -> Option<(String, Revision, SocketAddr)> {
        let p = st.primaries.get(service)?;
        let r = st.roles.get(service)?.get(&p.record.instance)?;
        (r.role == Role::Primary && r.token == p.token).then_some((p.record.instance.clone(), p.token, r.addr?))
    }

    /// Whether instance `id` of `spec` may start now; its data directory
    /// is made first, and a replica's data by `clone` (a former primary's
    /// by `rewind`) in a task of its own, after which it may.
    pub fn admit(self: &Arc<Self>, st: &ClusterState, spec: &Arc<ServiceSpec>, id: &str, template: &str) -> Admit {
        if spec.stateful.is_none() {
            return Admit::Start;
        }
        let dir = data_dir(&self.ctx.data_dir, spec, id);
        if let Err(e) = make_data_dir(&dir, spec) {
            return Admit::Wait(e);
        }
        if !spec.replicated() {
            return match write_role_file(&dir, Role::Primary) {
                Ok(()) => Admit::Start,
                Err(e) => Admit::Wait(format!("cannot write {}: {e}", dir.join(ROLE_FILE).display())),
            };
        }
        match self.prep.locked().get(id) {
            Some(Prep::Running(what)) => return Admit::Wait(format!("{what} running")),
            Some(Prep::Failed { at, why }) if at.elapsed() < RETRY_PREP => return Admit::Wait(why.clone()),
            _ => {}
        }
        let marker = read_marker(&dir);
        let held = st.primaries.get(&spec.name);
        let mine = held.is_some_and(|h| h.record.instance == id && h.record.node == self.ctx.node());
        let start_as = |role: Role| match write_role_file(&dir, role) {
            Ok(()) => Admit::Start,
            Err(e) => Admit::Wait(format!("cannot write {}: {e}", dir.join(ROLE_FILE).display())),
        };
        let switchover = decide::switchover_state(
            st.switchovers.get(&spec.name),
            held.map(|h| h.token),
            halo_model::clock::unix_ms(),
        );
        match switchover {
            // The primary stopping to hand over stays stopped.
            decide::SwitchoverState::Asked { .. } if mine => {
                return Admit::Wait("a switchover: the primary hands over".into())
            }
            decide::SwitchoverState::Handed(h) if h.to != id => {
                return Admit::Wait(format!("a switchover: {} takes over", h.to))
            }
            _ => {}
        }
        if mine {
            // Ours (a new service's first instance, or a primary that
            // restarts while it holds the key).
            return start_as(Role::Primary);
        }
        let Some((primary, token, addr)) = Self::primary_addr(st, &spec.name) else {
            return match marker {
                // A former primary waits for the one that took the key to
                // be promoted, then rewinds from it.
                Some(m) if m.role == Role::Primary && held.is_some_and(|h| h.token != m.token) => {
                    Admit::Wait("a former primary waits for the new one".into())
                }
                // Read-only until one is promoted: it may be the one.
                Some(_) => start_as(Role::Replica),
                None => Admit::Wait("no data yet and no primary to clone from".into()),
            };
        };
        let hook = match marker {
            None => "clone",
            // A former primary, or a replica that could not follow.
            Some(m) if (m.role == Role::Primary && m.token != token) || m.role == Role::Demoted => "rewind",
            Some(_) => return start_as(Role::Replica),
        };
        self.prep.locked().insert(id.to_string(), Prep::Running(hook));
        let started = format!("{hook} from {primary} started");
        let me = self.clone();
        let (spec, id, template) = (spec.clone(), id.to_string(), template.to_string());
        self.ctx.tasks.spawn(async move {
            let done = me.make_data(&spec, &id, &template, hook, &primary, token, addr).await;
            match done {
                Ok(()) => {
                    me.prep.locked().remove(&id);
                }
                Err(why) => {
                    tracing::warn!(instance = %id, error = %why, "making the instance's data failed; trying again in {RETRY_PREP:?}");
                    me.prep.locked().insert(id.clone(), Prep::Failed { at: Instant::now(), why });
                }
            }
            me.wake.notify_one();
        });
        Admit::Wait(started)
    }

    /// Runs `clone` (or `rewind`, then `clone` if it fails or is not
    /// given) for instance `id`, following `primary` at `addr`.
    #[allow(clippy::too_many_arguments)]
    async fn make_data(
        &self,
        spec: &Arc<ServiceSpec>,
        id: &str,
        template: &str,
        hook: &'static str,
        primary: &str,
        token: Revision,
        addr: SocketAddr,
    ) -> Result<(), String> {
        let s = spec.stateful.as_ref().expect("stateful");
        let ispec = InstanceSpec {
            id: id.to_string(),
            service: spec.name.clone(),
            spec: instance_spec(&self.ctx.data_dir, spec, id),
            port: 0,
            revision: template.to_string(),
        };
        let driver = self.ctx.env.drivers.for_run(&spec.run.driver);
        let runner = driver.runner_for(&ispec).ok_or("hooks of this driver run only inside a running instance")?;
        let env = hook_env(Role::Replica, token, Some(addr));
        let dir = data_dir(&self.ctx.data_dir, spec, id);
        let ev = &self.ctx.m.events;
        let svc = Some(spec.name.as_str());
        if hook == "rewind" {
            if let Some(argv) = &s.hooks.rewind {
                match runner.run_with(argv, &env, None, s.clone_timeout).await {
                    Ok(_) => {
                        write_marker(&dir, Marker { role: Role::Replica, token }).map_err(|e| e.to_string())?;
                        ev.info(
                            EventKind::Cloned,
                            svc,
                            Some(id),
                            format!("{id} rewound to follow {primary} (token {token})"),
                        );
                        return Ok(());
                    }
                    Err(e) => ev.warn(
                        EventKind::Cloned,
                        svc,
                        Some(id),
                        format!("rewinding {id} failed ({e}); cloning it anew"),
                    ),
                }
            }
            set_aside(&dir).map_err(|e| format!("cannot set the old data aside: {e}"))?;
        }
        let argv = s.hooks.clone.as_ref().ok_or("no clone hook")?;
        runner.run_with(argv, &env, None, s.clone_timeout).await.map_err(|e| format!("clone: {e}"))?;
        write_marker(&dir, Marker { role: Role::Replica, token }).map_err(|e| e.to_string())?;
        ev.info(EventKind::Cloned, svc, Some(id), format!("{id} cloned from {primary} (token {token})"));
        Ok(())
    }
}

/// Moves everything in `dir` but halo's files into `dir/halo-old` (what
/// was there before goes), so `clone` finds an empty directory and the
/// old data is still there to look at.
fn set_aside(dir: &Path) -> std::io::Result<()> {
    let old = dir.join("halo-old");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    std::fs::create_dir(&old)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if name == "halo-old" || name == ROLE_FILE || name == STATE_FILE {
            continue;
        }
        std::fs::rename(e.path(), old.join(&name))?;
    }
    std::fs::remove_file(dir.join(STATE_FILE)).or_else(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(e)
        }
    })
}

/// Asks the primary of `token` to hand over to `to` (or the replica it
/// chooses): `None` when a switchover is under way already, `Some(false)`
/// when the primary changed meanwhile.
pub async fn ask_switchover(
    store: &dyn halo_store::Store,
    service: &str,
    token: Revision,
    to: Option<&str>,
) -> Result<Option<bool>, halo_store::StoreError> {
    use halo_store::{Compare, CompareOp, CompareTarget, Txn, TxnOp};
    let rec =
        SwitchoverRecord { token, to: to.map(str::to_string), asked_ms: halo_model::clock::unix_ms(), handed: None };
    let (pkey, skey) = (primary_key(service), switchover_key(service));
    // One at a time; a record of an earlier term, or run out, is replaced.
    let current = store.get(&skey).await?;
    let busy = current.as_ref().and_then(|kv| serde_json::from_slice::<SwitchoverRecord>(&kv.value).ok());
    if decide::switchover_state(busy.as_ref(), Some(token), rec.asked_ms) != decide::SwitchoverState::None {
        return Ok(None);
    }
    let txn = Txn::new()
        .when(Compare::new(&pkey, CompareOp::Equal, CompareTarget::CreateRevision(token)))
        .when(Compare::mod_revision(&skey, current.map_or(0, |kv| kv.mod_revision)))
        .and_then(TxnOp::put(&skey, serde_json::to_vec(&rec).expect("encodes"), None));
    Ok(Some(store.txn(txn).await?.succeeded))
}

/// What a hook gets beside the instance's environment: `HALO_ROLE`,
/// `HALO_TOKEN` (the fencing token of the term it serves or follows, 0
/// for none yet), and the primary's address.
pub fn hook_env(role: Role, token: Revision, primary: Option<SocketAddr>) -> BTreeMap<String, String> {
    let mut env = term_env(token, primary);
    env.insert("HALO_ROLE".to_string(), role.as_str().to_string());
    env
}

/// The term's part of a hook's environment: `HALO_TOKEN` and the
/// primary's address (a backup or restore hook gets only this).
pub fn term_env(token: Revision, primary: Option<SocketAddr>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("HALO_TOKEN".to_string(), token.to_string())]);
    if let Some(a) = primary {
        env.insert("HALO_PRIMARY_HOST".into(), a.ip().to_string());
        env.insert("HALO_PRIMARY_PORT".into(), a.port().to_string());
    }
    env
}
