//! The [`Store`] on an etcd v3 cluster, through the `etcd-client` crate.
//!
//! Every key lives under the store's namespace (for example `/halo-prod`),
//! so several halo clusters can share one etcd and the empty prefix means
//! "everything of this cluster". Nothing of etcd leaks through the trait:
//! errors become [`StoreError`], keys come back without the namespace.
//!
//! Watches end (the stream closes) when etcd cancels them, when the
//! connection breaks or when the member loses its leader (`require_leader`):
//! callers resume from the last revision seen + 1, as the trait says. HTTP/2
//! pings (every 6 s, 3 s to answer) find a dead connection, so a watch
//! cannot hang silently on a peer that went away.
//!
//! Members: one connection per endpoint, and requests go to one of them
//! (the pinned one, as etcd's own Go client does). A request that could not
//! have been applied (connecting failed, the member has no leader) moves to
//! the next member and is retried there; other failures move the pin for
//! the next request. etcd-client's own balancing over several endpoints
//! sends requests to a dead member and fails them, hence this.
//!
//! Every member is asked its status every [`HEALTH_EVERY`]: the pin moves
//! past members that did not answer (with a leader) twice in a row, and off the pinned one
//! as soon as it stops. A request that is safe to send twice goes to the
//! next member when its own does not answer ([`Again`]): a frozen member,
//! or a follower holding a proposal for a leader that just died, would
//! otherwise hold it for the whole request timeout.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as etcd;
use tokio::sync::{mpsc, Notify};

use crate::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyValue, LeaseId, Listing, Revision, Store, StoreError, Txn,
    TxnOp, TxnResult, Watch,
};

/// How long one request may take before it fails (the cluster is
/// unreachable or has no leader).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one member may take to answer a request that is safe to send
/// again (a read, a put, a lease renewal or revocation) before the next
/// member is tried: a follower that forwarded a proposal to a leader that
/// just died holds it until the client gives up, and a frozen member holds
/// every request.
const ATTEMPT: Duration = Duration::from_millis(700);

/// How often every member is asked its status, and how long it may take
/// to answer: one that does not (dead, frozen, cut off from its peers, or
/// without a leader) is passed over when the pin moves.
const HEALTH_EVERY: Duration = Duration::from_millis(250);
/// Keys per page of a listing ([`EtcdStore::list`]).
const LIST_PAGE: i64 = 500;

/// The end of the key range that has `prefix` (its last byte that is not
/// 0xff, plus one; all keys from there on when there is none).
fn prefix_end(mut prefix: Vec<u8>) -> Vec<u8> {
    while let Some(b) = prefix.pop() {
        if b < 0xff {
            prefix.push(b + 1);
            return prefix;
        }
    }
    vec![0]
}
const HEALTH_WITHIN: Duration = Duration::from_millis(400);

/// A handle on an etcd cluster; cheap to clone, all clones share one
/// connection per endpoint.
#[derive(Clone)]
pub struct EtcdStore {
    /// The members and which one requests go to.
    members: Arc<Members>,
    namespace: String,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).field("namespace", &self.namespace).finish()
    }
}

/// How halo proves itself to etcd: TLS (the CA that signed etcd's
/// certificates, and a client certificate when etcd asks for one) and a
/// user. Read from files by the caller; held as PEM and text here.
#[derive(Clone, Default)]
pub struct EtcdAuth {
    /// TLS to every member, verified against this CA (PEM).
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key (PEM), for `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd's role-based authentication: user name and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the password.
        f.debug_struct("EtcdAuth")
            .field("tls", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port` or `http://host:port`); every
    /// key is kept under `namespace` (`""` for none; otherwise it must
    /// start with `/` and not end with one).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_with(endpoints, namespace, &EtcdAuth::default()).await
    }

    /// [`EtcdStore::connect`] over TLS and with a user, as `auth` says
    /// (TLS endpoints are `host:port` or `https://host:port`).
    pub async fn connect_with(endpoints: &[String], namespace: &str, auth: &EtcdAuth) -> Result<EtcdStore, StoreError> {
        let open = |message: String| StoreError::Open { path: endpoints.join(","), message };
        if endpoints.is_empty() {
            return Err(open("no etcd endpoint given (expected host:port[,host:port...])".into()));
        }
        if !namespace.is_empty() && (!namespace.starts_with('/') || namespace.ends_with('/')) {
            return Err(open(format!(
                "namespace '{namespace}' must start with '/' and not end with one (or be empty)"
            )));
        }
        let options = etcd::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            // etcd closes connections that ping more often than every 5 s
            // (--grpc-keepalive-min-time; "too many pings").
            .with_keep_alive(Duration::from_secs(6), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let options = match &auth.ca {
            Some(ca) => {
                let mut tls = etcd::TlsOptions::new().ca_certificate(etcd::Certificate::from_pem(ca));
                if let Some((cert, key)) = &auth.identity {
                    tls = tls.identity(etcd::Identity::from_pem(cert, key));
                }
                options.with_tls(tls)
            }
            None => options,
        };
        let options = match &auth.user {
            Some((user, password)) => options.with_user(user, password),
            None => options,
        };
        let mut clients = Vec::new();
        for ep in endpoints {
            let url = match (auth.ca.is_some(), ep.split_once("://")) {
                (true, None) => format!("https://{ep}"),
                (false, None) => format!("http://{ep}"),
                (_, Some(_)) => ep.clone(),
            };
            let c = etcd::Client::connect([&url], Some(options.clone()))
                .await
                .map_err(|e| open(format!("{url}: {}", describe(&e))))?;
            clients.push(c);
        }
        let members = Members {
            healthy: clients.iter().map(|_| AtomicBool::new(true)).collect(),
            clients,
            pinned: AtomicUsize::new(0),
            pin_moved: Notify::new(),
        };
        let store =
            EtcdStore { members: Arc::new(members), namespace: namespace.to_string(), endpoints: endpoints.to_vec() };
        if store.members.clients.len() > 1 {
            tokio::spawn(check_members(Arc::downgrade(&store.members)));
        }
        Ok(store)
    }

    /// Moves the pin off member `from` (unless another task did already)
    /// to the next member that answered its last status check, or simply
    /// the next one when none did.
    fn move_pin(&self, from: usize) {
        self.members.move_pin(from);
    }

    /// The member requests go to now.
    fn pinned(&self) -> usize {
        self.members.pinned()
    }

    /// Returns once requests no longer go to member `at`.
    async fn moved_off(&self, at: usize) {
        loop {
            let moved = self.members.pin_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.pinned() != at {
                return;
            }
            moved.await;
        }
    }

    /// Runs `f` on the pinned member; on a failure that left the request
    /// unapplied, moves to the next member and tries again (each member at
    /// most twice). `again` says when a request that may have been applied
    /// is sent to another member too.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        lease: Option<LeaseId>,
        again: Again,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let n = self.members.clients.len();
        let mut last = None;
        for _ in 0..2 * n {
            let at = self.pinned();
            let send = f(self.members.clients[at].clone());
            let answer = match again {
                Again::Never => Some(send.await),
                Again::OnPinMove => tokio::select! {
                    a = send => Some(a),
                    _ = self.moved_off(at) => None,
                },
                Again::Quick => tokio::select! {
                    a = send => Some(a),
                    _ = self.moved_off(at) => None,
                    _ = tokio::time::sleep(ATTEMPT) => None,
                },
            };
            let Some(answer) = answer else {
                tracing::debug!(endpoint = %self.endpoints[at], op, "etcd member did not answer in time; trying the next");
                self.move_pin(at);
                continue;
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let unapplied = not_applied(&e);
                    if unapplied || moves_pin(&e) {
                        // Another task may have moved it already.
                        self.move_pin(at);
                    }
                    if !unapplied {
                        return Err(map_err(op, e, lease));
                    }
                    tracing::debug!(endpoint = %self.endpoints[at], error = %e, "etcd member unavailable; trying the next");
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) => Err(map_err(op, e, lease)),
            None => Err(StoreError::Backend {
                op,
                message: format!("no etcd member answered within {ATTEMPT:?}"),
                maybe_applied: true,
            }),
        }
    }

    /// The endpoints this store was opened with.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn kv(&self, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
        let key = std::str::from_utf8(kv.key()).map_err(|_| backend("decode", "a key is not UTF-8".into()))?;
        let key = key.strip_prefix(&self.namespace).unwrap_or(key).to_string();
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }

    /// Whether `rev` can still be read; `Err(Compacted)` when it cannot.
    async fn check_not_compacted(&self, prefix: &str, rev: Revision) -> Result<(), StoreError> {
        let key = self.full(prefix);
        let opts = etcd::GetOptions::new().with_prefix().with_revision(rev).with_count_only();
        match self
            .call("watch", None, Again::OnPinMove, |c| {
                let key = key.clone();
                let opts = opts.clone();
                async move { c.kv_client().get(key, Some(opts)).await }
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match e {
                // A revision in the future is fine for a watch: it waits.
                StoreError::Invalid(m) if m.contains("future revision") => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// One connection per etcd member, and the member requests go to.
struct Members {
    clients: Vec<etcd::Client>,
    /// The index of the member requests go to.
    pinned: AtomicUsize,
    /// Woken when the pin moves.
    pin_moved: Notify,
    /// Whether each member answered its last status check with a leader.
    healthy: Vec<AtomicBool>,
}

impl Members {
    fn pinned(&self) -> usize {
        self.pinned.load(Ordering::Relaxed) % self.clients.len()
    }

    /// Moves the pin off member `from` (unless another task did already)
    /// to the next member that answered its last status check, or simply
    /// the next one when none did.
    fn move_pin(&self, from: usize) {
        let n = self.clients.len();
        let healthy = |i: &usize| self.healthy[*i].load(Ordering::Relaxed);
        let to = (1..n).map(|k| (from + k) % n).find(healthy).unwrap_or((from + 1) % n);
        if self.pinned.compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.pin_moved.notify_waiters();
        }
    }
}

/// When a request whose member did not answer is sent to another member.
#[derive(Debug, Clone, Copy)]
enum Again {
    /// Never: it may have been applied, and applying it twice differs
    /// (a transaction that is not [`Txn::repeatable`]).
    Never,
    /// Once its member lost the pin (failed its status check): a long
    /// request that is safe to repeat (a listing, a watch, a compaction).
    OnPinMove,
    /// Also when its member took longer than [`ATTEMPT`]: a point read or
    /// write that is safe to repeat (a get, a put, a fenced write, a lease
    /// revocation).
    Quick,
}

/// Asks every member its status every [`HEALTH_EVERY`] while the store is
/// in use, and moves the pin off a member that did not answer in time
/// (requests sent to a frozen member wait for their whole timeout).
async fn check_members(members: std::sync::Weak<Members>) {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut misses: Vec<u32> = Vec::new();
    loop {
        every.tick().await;
        let Some(m) = members.upgrade() else { return };
        misses.resize(m.clients.len(), 0);
        let asks: Vec<_> = m
            .clients
            .iter()
            .map(|c| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    let st = tokio::time::timeout(HEALTH_WITHIN, c.status()).await;
                    matches!(st, Ok(Ok(s)) if s.leader() != 0)
                })
            })
            .collect();
        for (i, a) in asks.into_iter().enumerate() {
            // Two misses in a row: one slow answer on a busy machine
            // moves nothing.
            misses[i] = if a.await.unwrap_or(false) { 0 } else { misses[i] + 1 };
        }
        let answers: Vec<bool> = misses.iter().map(|n| *n < 2).collect();
        for (h, ok) in m.healthy.iter().zip(&answers) {
            h.store(*ok, Ordering::Relaxed);
        }
        let at = m.pinned();
        if !answers[at] && answers.iter().any(|ok| *ok) {
            tracing::debug!(member = at, "the pinned etcd member did not answer its status check; moving the pin");
            m.move_pin(at);
        }
    }
}

/// The request never reached a member that could apply it.
fn not_applied(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::TransportError(_) => true,
        etcd::Error::GRpcStatus(s) => {
            let m = s.message();
            s.code() == tonic::Code::Unavailable
                && (m.contains("connect") || m.contains("no leader") || m.contains("refused"))
        }
        _ => false,
    }
}

/// The member looks unhealthy: use another for the next request.
fn moves_pin(e: &etcd::Error) -> bool {
    match e {
        etcd::Error::GRpcStatus(s) => {
            use tonic::Code;
            matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
        }
        etcd::Error::IoError(_) => true,
        _ => false,
    }
}

fn backend(op: &'static str, message: String) -> StoreError {
    StoreError::Backend { op, message, maybe_applied: false }
}

/// Maps an etcd-client error to the trait's; `lease` is the lease a
/// "lease not found" refers to.
fn map_err(op: &'static str, e: etcd::Error, lease: Option<LeaseId>) -> StoreError {
    match e {
        etcd::Error::GRpcStatus(status) => {
            let msg = status.message().to_string();
            if msg.contains("lease not found") {
                return StoreError::LeaseNotFound(lease.unwrap_or(0));
            }
            if msg.contains("required revision has been compacted") {
                return StoreError::Compacted { requested: 0, compacted: 0 };
            }
            use tonic::Code;
            match status.code() {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StoreError::Invalid(msg),
                // Refused before anything was sent to the leader.
                Code::Unavailable if msg.contains("no leader") => {
                    StoreError::Backend { op, message: msg, maybe_applied: false }
                }
                // A transport failure's cause (TLS refused, connection reset) is below it.
                code => StoreError::Backend {
                    op,
                    message: format!("{code:?}: {msg}{}", causes(&status, &msg)),
                    maybe_applied: true,
                },
            }
        }
        etcd::Error::InvalidArgs(m) => StoreError::Invalid(m),
        etcd::Error::LeaseKeepAliveError(m) if m.contains("not found") => StoreError::LeaseNotFound(lease.unwrap_or(0)),
        other => StoreError::Backend { op, message: other.to_string(), maybe_applied: true },
    }
}

fn compare_op(op: CompareOp) -> etcd::CompareOp {
    match op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Less => etcd::CompareOp::Less,
        CompareOp::Greater => etcd::CompareOp::Greater,
    }
}

impl EtcdStore {
    fn compare(&self, c: &Compare) -> etcd::Compare {
        let key = self.full(&c.key);
        let op = compare_op(c.op);
        match &c.target {
            CompareTarget::Version(v) => etcd::Compare::version(key, op, *v),
            CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(key, op, *r),
            CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(key, op, *r),
            CompareTarget::Value(v) => etcd::Compare::value(key, op, v.clone()),
        }
    }

    fn op(&self, op: &TxnOp) -> etcd::TxnOp {
        match op {
            TxnOp::Put { key, value, lease } => {
                let opts = lease.map(|l| etcd::PutOptions::new().with_lease(l));
                etcd::TxnOp::put(self.full(key), value.clone(), opts)
            }
            TxnOp::Delete(key) => etcd::TxnOp::delete(self.full(key), None),
            TxnOp::DeletePrefix(prefix) => {
                let key = self.full(prefix);
                etcd::TxnOp::delete(key, Some(etcd::DeleteOptions::new().with_prefix()))
            }
        }
    }
}

/// Splits a watch response's events into one batch per revision.
fn batches(events: Vec<Event>) -> Vec<Vec<Event>> {
    let mut out: Vec<Vec<Event>> = Vec::new();
    for e in events {
        match out.last_mut() {
            Some(b) if b[0].kv.mod_revision == e.kv.mod_revision => b.push(e),
            _ => out.push(vec![e]),
        }
    }
    out
}

/// Feeds `tx` from an etcd watch stream on member `at` until etcd cancels
/// it, the stream breaks, the [`Watch`] is dropped, or requests moved off
/// that member (it failed them): a watch on a member cut off from the
/// others can stay open and silent for as long as the keep-alive pings take
/// to notice, so it is ended and resumed on the member requests now use.
async fn pump(store: EtcdStore, at: usize, mut stream: etcd::WatchStream, tx: mpsc::Sender<Vec<Event>>) {
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return,
            _ = store.moved_off(at) => {
                tracing::debug!(endpoint = %store.endpoints[at], "requests moved off this member; moving the watch");
                return;
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "etcd watch broke");
                return;
            }
        };
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(kv) = store.kv(kv) else { continue };
            let kind = match ev.event_type() {
                etcd::EventType::Put => EventKind::Put,
                etcd::EventType::Delete => EventKind::Delete,
            };
            events.push(Event { kind, kv });
        }
        for b in batches(events) {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if resp.canceled() {
            tracing::debug!(reason = resp.cancel_reason(), compact = resp.compact_revision(), "etcd watch canceled");
            return;
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = self.full(key);
        let resp = self
            .call("get", None, Again::Quick, |c| {
                let key = key.clone();
                async move { c.kv_client().get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    /// In pages of [`LIST_PAGE`] keys, all read at the first page's
    /// revision: one answer for a large cluster's root would pass gRPC's
    /// 4 MiB message limit (the whole connection fails then).
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let end = prefix_end(self.full(prefix).into_bytes());
        let mut from = self.full(prefix).into_bytes();
        let (mut kvs, mut revision) = (Vec::new(), 0);
        loop {
            let mut opts = etcd::GetOptions::new()
                .with_range(end.clone())
                .with_sort(etcd::SortTarget::Key, etcd::SortOrder::Ascend)
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self
                .call("list", None, Again::OnPinMove, |c| {
                    let (key, opts) = (from.clone(), opts.clone());
                    async move { c.kv_client().get(key, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                kvs.push(self.kv(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(Listing { kvs, revision }),
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        txn.validate()?;
        let lease = txn.success.iter().chain(&txn.failure).find_map(|op| match op {
            TxnOp::Put { lease, .. } => *lease,
            _ => None,
        });
        let t = etcd::Txn::new()
            .when(txn.compares.iter().map(|c| self.compare(c)).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(|o| self.op(o)).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(|o| self.op(o)).collect::<Vec<_>>());
        let send = |c: etcd::Client| {
            let t = t.clone();
            async move { c.kv_client().txn(t).await }
        };
        let again = if txn.repeatable() { Again::Quick } else { Again::Never };
        let resp = self.call("txn", lease, again, send).await?;
        Ok(TxnResult { succeeded: resp.succeeded(), revision: resp.header().map_or(0, |h| h.revision()) })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let key = self.full(prefix);
        let mut opts = etcd::WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let compacted = match self.check_not_compacted(prefix, from.max(1)).await {
            Ok(()) => false,
            Err(StoreError::Compacted { .. }) => true,
            Err(e) => return Err(e),
        };
        let mut stream = self
            .call("watch", None, Again::OnPinMove, |c| {
                let key = key.clone();
                let opts = opts.clone();
                async move { c.watch_client().watch(key, Some(opts)).await }
            })
            .await?;
        if compacted {
            // etcd tells the compaction revision on the watch it cancels.
            let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
            loop {
                let msg = tokio::time::timeout_at(deadline, stream.message())
                    .await
                    .map_err(|_| backend("watch", "etcd did not report the compaction revision".into()))?;
                match msg.map_err(|e| map_err("watch", e, None))? {
                    Some(r) if r.compact_revision() > 0 => {
                        return Err(StoreError::Compacted { requested: from, compacted: r.compact_revision() })
                    }
                    Some(_) => continue,
                    None => return Err(backend("watch", "etcd closed the watch".into())),
                }
            }
        }
        // The first message confirms the watch exists: events from then on
        // are delivered.
        match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(r))) if r.created() && !r.canceled() => {}
            Ok(Ok(Some(r))) => {
                return Err(backend("watch", format!("etcd refused the watch: {}", r.cancel_reason())));
            }
            Ok(Ok(None)) => return Err(backend("watch", "etcd closed the watch".into())),
            Ok(Err(e)) => return Err(map_err("watch", e, None)),
            Err(_) => return Err(backend("watch", "etcd did not confirm the watch in time".into())),
        }
        let (tx, rx) = mpsc::channel(256);
        let at = self.pinned();
        tokio::spawn(pump(self.clone(), at, stream, tx));
        Ok(Watch::from_channel(rx))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let opts = etcd::CompactionOptions::new().with_physical();
        match self
            .call("compact", None, Again::OnPinMove, |c| {
                let opts = opts.clone();
                async move { c.kv_client().compact(revision, Some(opts)).await }
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(match e {
                StoreError::Compacted { .. } => {
                    StoreError::Invalid(format!("revision {revision} is already compacted"))
                }
                other => other,
            }),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be at least 1s".into()));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let resp = self
            .call("grant", None, Again::Quick, |c| async move { c.lease_client().grant(secs as i64, None).await })
            .await?;
        Ok(resp.id())
    }

    /// Renewals are idempotent and time-critical (a lease of a few
    /// seconds): each member gets a short attempt, and a member that does
    /// not answer in time loses the pin, so one dead member never costs a
    /// node its lease.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let n = self.members.clients.len();
        let mut last = None;
        for _ in 0..n {
            let at = self.pinned();
            let client = self.members.clients[at].clone();
            let attempt = async move {
                let (mut keeper, mut stream) = client.lease_client().keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            };
            let err = match tokio::time::timeout(ATTEMPT, attempt).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => return Ok(Duration::from_secs(r.ttl() as u64)),
                Ok(Ok(Some(_))) => return Err(StoreError::LeaseNotFound(lease)),
                Ok(Ok(None)) => backend("keep_alive", "etcd closed the keep-alive stream".into()),
                Ok(Err(e)) => match map_err("keep_alive", e, Some(lease)) {
                    StoreError::LeaseNotFound(l) => return Err(StoreError::LeaseNotFound(l)),
                    other => other,
                },
                Err(_) => StoreError::Backend {
                    op: "keep_alive",
                    message: format!("no answer from {} within {ATTEMPT:?}", self.endpoints[at]),
                    maybe_applied: true,
                },
            };
            self.move_pin(at);
            last = Some(err);
        }
        Err(last.expect("at least one member"))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.call("revoke", Some(lease), Again::Quick, |c| async move { c.lease_client().revoke(lease).await }).await?;
        Ok(())
    }
}

/// An etcd-client error with its causes (a TLS refusal is two levels
/// down, under "transport error").
fn describe(e: &etcd::Error) -> String {
    let text = e.to_string();
    format!("{text}{}", causes(e, &text))
}

/// The sources under `e`, each not already said in `said`, as ": a: b".
fn causes(e: &dyn std::error::Error, said: &str) -> String {
    let mut out = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !said.contains(&text) && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, rev: Revision) -> Event {
        let kv = KeyValue {
            key: key.into(),
            value: vec![],
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        };
        Event { kind: EventKind::Put, kv }
    }

    #[test]
    fn one_batch_per_revision() {
        let b = batches(vec![ev("/a", 5), ev("/b", 5), ev("/a", 6), ev("/c", 8)]);
        let revs: Vec<Vec<Revision>> = b.iter().map(|b| b.iter().map(|e| e.kv.mod_revision).collect()).collect();
        assert_eq!(revs, vec![vec![5, 5], vec![6], vec![8]]);
    }
}
