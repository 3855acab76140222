//! The admin API a node serves, for the CLI and for people.
//!
//! Every route but `/healthz` and the dashboard's files needs
//! `Authorization: Bearer TOKEN`: the admin token for anything, the
//! read-only token for reads (status, metrics, logs, events, traffic; not
//! the backup archive, which holds the tokens). Errors are JSON
//! `{"error": "...", "code": "..."}`: a message a person can act on, and
//! a stable code (`code.rs`) programs match on.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use halo_control::{Node, NodeError, Outcome, RolloutCommand, StatusView};
use halo_proxy::config::Secret;

use crate::code::ErrorCode;
use serde::Deserialize;

/// Where a request came from, for the change log.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub std::net::SocketAddr);

#[derive(Clone)]
struct Api {
    node: Node,
    admin: Secret,
    read: Secret,
}

/// The node API's tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// May do anything.
    pub admin: String,
    /// May only read.
    pub read: String,
}

/// An error as the API answers it: its stable code (which gives the
/// status) and a message a person can act on.
pub struct ApiError(ErrorCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0.status(), Json(serde_json::json!({ "error": self.1, "code": self.0 }))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> ApiError {
        let code = match &e {
            NodeError::Invalid(_) => ErrorCode::InvalidService,
            NodeError::BadRequest(_) => ErrorCode::BadRequest,
            NodeError::NotFound(_) => ErrorCode::NotFound,
            NodeError::NoSuchNode { .. } => ErrorCode::NoSuchNode,
            NodeError::Conflict => ErrorCode::Conflict,
            NodeError::Store(_)
            | NodeError::Start(_)
            | NodeError::Corrupt { .. }
            | NodeError::Migrate(_)
            | NodeError::Backup(_) => ErrorCode::Internal,
        };
        ApiError(code, e.to_string())
    }
}

/// The API's routes, for `node`, guarded by `tokens`.
pub fn router(node: Node, tokens: Tokens) -> Router {
    let api = Api { node, admin: Secret::new(&tokens.admin), read: Secret::new(&tokens.read) };
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/services", put(apply))
        .route("/v1/services/{name}", get(get_service).delete(delete_service))
        .route("/v1/services/{name}/scale", post(scale))
        .route("/v1/services/{name}/restart", post(restart))
        .route("/v1/services/{name}/switchover", post(switchover))
        .route("/v1/services/{name}/logs", get(logs))
        .route("/v1/services/{name}/backup-hook", post(backup_hook))
        .route("/v1/services/{name}/rollout", get(rollout))
        .route("/v1/services/{name}/rollout/{order}", post(rollout_order))
        .route("/v1/backup", get(backup))
        .route("/v1/backup/cancel", post(cancel_backup))
        .route("/v1/backup/restore", post(restore).layer(axum::extract::DefaultBodyLimit::max(2 << 30)))
        .route("/v1/events", get(events))
        .route("/v1/traffic", get(traffic))
        .route("/v1/nodes", get(nodes))
        .route("/v1/vips", get(vips))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/nodes/{name}/undrain", post(undrain))
        .route("/v1/maintenance", get(maintenance).post(maintain).delete(cancel_maintenance))
        .route_layer(middleware::from_fn_with_state(api.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ui", get(|| async { asset("text/html; charset=utf-8", include_str!("ui/index.html")) }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", include_str!("ui/index.html")) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", include_str!("ui/app.js")) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", include_str!("ui/app.css")) }))
        .merge(guarded)
        .fallback(not_found)
        .with_state(api)
}

/// A dashboard file (built into the binary): no data in it, so no token
/// needed; the page asks the API with the token the person gives it.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// Serves the API on `listener` until `shutdown` resolves: HTTPS only
/// with `tls`, else plain HTTP; with the limits and deadlines of
/// `halo_proxy::http_api`, and a browser's request from another site
/// refused before anything else (no CSRF, no DNS rebinding).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    tokens: Tokens,
    tls: Option<Arc<halo_proxy::config::TlsListener>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tower_service::Service;
    let app = router(node, tokens);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let secure = tls.is_some();
    halo_proxy::http_api::serve(
        listener,
        move || tls.clone(),
        stop,
        move |peer| {
            let app = app.clone();
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                let mut app = app.clone();
                async move {
                    if let Err(why) = halo_proxy::http_api::browser_guard(&req, secure) {
                        return Ok::<_, Infallible>(ApiError(ErrorCode::CrossOrigin, why.into()).into_response());
                    }
                    req.extensions_mut().insert(axum::extract::ConnectInfo(Remote(peer)));
                    app.call(req).await
                }
            }
        },
    )
    .await;
    Ok(())
}

async fn auth(State(api): State<Api>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = halo_proxy::admin_bearer(&headers);
    let change = req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD;
    match given {
        // The archive holds the tokens and every service's environment.
        Some(t) if api.read.matches(t) && (change || req.uri().path() == "/v1/backup") => ApiError(
            ErrorCode::ReadOnly,
            "this token is read-only: it may read status, metrics, logs, events and the dashboard; changes and \
             backups need the admin token (file 'token' in the node's data directory)"
                .into(),
        )
        .into_response(),
        Some(t) if api.read.matches(t) => {
            let mut req = req;
            req.extensions_mut().insert(ReadOnly);
            next.run(req).await
        }
        Some(t) if api.admin.matches(t) => {
            if !change {
                return next.run(req).await;
            }
            // Every change is logged: who asked, what, and how it ended.
            let from = req
                .extensions()
                .get::<axum::extract::ConnectInfo<Remote>>()
                .map_or_else(|| "-".to_string(), |c| c.0 .0.to_string());
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let resp = next.run(req).await;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                tracing::info!(%from, %method, %path, status, "api change");
            } else {
                tracing::warn!(%from, %method, %path, status, "api change refused");
            }
            resp
        }
        Some(_) => ApiError(ErrorCode::Unauthorized, "wrong token".into()).into_response(),
        None => ApiError(
            ErrorCode::Unauthorized,
            "missing 'Authorization: Bearer TOKEN'; the token is in the node's data directory (file 'token')".into(),
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError(ErrorCode::NoSuchEndpoint, "no such endpoint; see /ui (the dashboard), /v1/status, /v1/services/NAME, /v1/nodes, /v1/events, /v1/traffic, /metrics".into())
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let mut text = halo_proxy::render_metrics(api.node.proxy());
    // From the node's view: answers at once, also while the store is away.
    text.push_str(&api.node.metrics());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn status(State(api): State<Api>) -> Json<StatusView> {
    Json(StatusView { services: api.node.status(), cluster: api.node.cluster(), backup: api.node.backup_health() })
}

/// The last minutes of this node's proxy: requests/s, error rate, p50/p99
/// per route and upstream.
async fn traffic(State(api): State<Api>) -> impl IntoResponse {
    Json(api.node.traffic())
}

async fn nodes(State(api): State<Api>) -> impl IntoResponse {
    Json(api.node.cluster())
}

async fn vips(State(api): State<Api>) -> impl IntoResponse {
    Json(api.node.vips())
}

async fn drain(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    api.node.set_draining(&name, true).await?;
    Ok(Json(Outcome::new(name, "draining")))
}

async fn remove_node(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    api.node.remove_node(&name).await?;
    Ok(Json(Outcome::new(name, "removed")))
}

#[derive(Deserialize)]
struct MaintainBody {
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    all: bool,
    command: String,
    #[serde(default = "one")]
    max_unavailable: u32,
}

fn one() -> u32 {
    1
}

async fn maintain(State(api): State<Api>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let b: MaintainBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            ErrorCode::BadRequest,
            format!(
                "expected {{\"nodes\": [NAME...] or \"all\": true, \"command\": CMD, \"max_unavailable\": N}}: {e}"
            ),
        )
    })?;
    Ok(Json(api.node.maintain(&b.nodes, b.all, &b.command, b.max_unavailable).await?))
}

async fn maintenance(State(api): State<Api>) -> Result<impl IntoResponse, ApiError> {
    let rec = api.node.maintenance().ok_or_else(|| {
        ApiError(ErrorCode::NotFound, "no maintenance has been asked for (`halo node maintain`)".into())
    })?;
    Ok(Json(rec))
}

async fn cancel_maintenance(State(api): State<Api>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(api.node.cancel_maintenance().await?))
}

async fn undrain(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    api.node.set_draining(&name, false).await?;
    Ok(Json(Outcome::new(name, "undrained")))
}

#[derive(Deserialize)]
struct ApplyQuery {
    dry_run: Option<bool>,
}

/// Applies a service file; `?dry_run=true` answers what would change
/// ([`halo_control::Applied`]) and changes nothing.
async fn apply(State(api): State<Api>, Query(q): Query<ApplyQuery>, body: Bytes) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError(ErrorCode::BadRequest, "the body must be UTF-8 TOML".into()))?;
    let dry_run = q.dry_run.unwrap_or(false);
    let applied = api.node.apply("request", text, dry_run).await?;
    if dry_run {
        return Ok(Json(applied).into_response());
    }
    Ok(Json(Outcome::new(applied.name, applied.outcome.to_string())).into_response())
}

/// Marks a request made with the read-only token: secrets in what it
/// reads are redacted.
#[derive(Debug, Clone, Copy)]
struct ReadOnly;

/// The service file as stored; for the read-only token with every
/// environment value redacted (names kept).
async fn get_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    read_only: Option<axum::Extension<ReadOnly>>,
) -> Result<impl IntoResponse, ApiError> {
    let text = api.node.get(&name).await?;
    let text = if read_only.is_some() { halo_model::redact_env(&text) } else { text };
    Ok(([(header::CONTENT_TYPE, "application/toml")], text))
}

async fn delete_service(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    api.node.delete(&name).await?;
    Ok(Json(Outcome::new(name, "deleted")))
}

#[derive(Deserialize)]
struct ScaleBody {
    replicas: u32,
}

async fn scale(State(api): State<Api>, Path(name): Path<String>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let b: ScaleBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError(ErrorCode::BadRequest, format!("expected {{\"replicas\": N}} with N from 0 to 1000: {e}"))
    })?;
    api.node.scale(&name, b.replicas).await?;
    Ok(Json(Outcome::new(name, format!("scaled to {}", b.replicas))))
}

async fn restart(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    api.node.restart(&name).await?;
    Ok(Json(Outcome::new(name, "restarting")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    #[serde(default)]
    to: Option<String>,
}

async fn switchover(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let b: SwitchoverBody = if body.is_empty() {
        SwitchoverBody { to: None }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(ErrorCode::BadRequest, format!("expected {{}} or {{\"to\": \"INSTANCE\"}}: {e}")))?
    };
    let token = api.node.switchover(&name, b.to.as_deref()).await?;
    Ok(Json(Outcome::new(name, format!("switching over from the primary of token {token}"))))
}

async fn backup(State(api): State<Api>) -> Result<impl IntoResponse, ApiError> {
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], api.node.backup().await?))
}

async fn backup_hook(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let out = api.node.backup_hook(&name).await.map_err(|e| ApiError(ErrorCode::Conflict, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out))
}

async fn cancel_backup(State(api): State<Api>) -> Result<impl IntoResponse, ApiError> {
    api.node.cancel_backup()?;
    Ok(Json(Outcome::new("backup", "cancelled")))
}

#[derive(Deserialize)]
struct RestoreQuery {
    force: Option<bool>,
}

async fn restore(
    State(api): State<Api>,
    Query(q): Query<RestoreQuery>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let plan = api.node.restore(&body, q.force.unwrap_or(false)).await.map_err(|e| match e {
        NodeError::Backup(b) => ApiError(ErrorCode::BadRequest, b.to_string()),
        other => ApiError::from(other),
    })?;
    Ok(Json(plan))
}

async fn rollout(State(api): State<Api>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(api.node.rollout(&name)?))
}

async fn rollout_order(
    State(api): State<Api>,
    Path((name, order)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let (cmd, outcome) = match order.as_str() {
        "promote" => (Some(RolloutCommand::Promote), "promoting"),
        "abort" => (Some(RolloutCommand::Abort), "aborting"),
        "pause" => (Some(RolloutCommand::Pause), "pausing"),
        "resume" => (Some(RolloutCommand::Resume), "resuming"),
        "retry" => (None, "retrying"),
        "undo" => (None, "undoing"),
        other => {
            return Err(ApiError(
                ErrorCode::NoSuchEndpoint,
                format!("no rollout order '{other}'; accepted: promote, abort, pause, resume, retry, undo"),
            ))
        }
    };
    match (cmd, order.as_str()) {
        (Some(cmd), _) => api.node.rollout_command(&name, cmd).await?,
        (None, "retry") => api.node.rollout_retry(&name).await?,
        (None, _) => api.node.rollout_undo(&name).await?,
    }
    Ok(Json(Outcome::new(name, outcome)))
}

#[derive(Deserialize)]
struct EventQuery {
    service: Option<String>,
    limit: Option<usize>,
    follow: Option<bool>,
}

/// The cluster's recent events: a JSON array, or with `follow=true` one
/// JSON object a line, the recent ones first, then each new one as it is
/// written (until the client hangs up or a day passed).
async fn events(State(api): State<Api>, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let (recent, revision) = api.node.events(q.service.as_deref(), limit).await?;
    if !q.follow.unwrap_or(false) {
        return Ok(Json(recent).into_response());
    }
    let mut watch = api.node.watch_events(revision + 1).await?;
    let line = |e: &halo_control::events::Event| {
        let mut l = serde_json::to_vec(e).expect("an event encodes");
        l.push(b'\n');
        Bytes::from(l)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for e in &recent {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        loop {
            let batch = tokio::select! {
                b = watch.next() => b,
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
            };
            // A broken watch ends the stream; `halo events -f` says so.
            let Some(batch) = batch else { return };
            for e in halo_control::events::from_batch(&batch, q.service.as_deref()) {
                if tx.send(line(&e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::new(ChannelBody(rx))).into_response())
}

#[derive(Deserialize)]
struct LogQuery {
    instance: Option<String>,
    lines: Option<usize>,
    follow: Option<bool>,
}

/// The last lines of each instance's log, prefixed with the instance id;
/// with `follow=true` the response stays open and streams new lines.
async fn logs(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let files = api.node.logs(&name, q.instance.as_deref())?;
    let lines = q.lines.unwrap_or(100).min(10_000);
    let mut head = String::new();
    for (id, f) in &files {
        for l in f.tail(lines) {
            head.push_str(&format!("{id} | {l}\n"));
        }
    }
    if !q.follow.unwrap_or(false) {
        return Ok(([(header::CONTENT_TYPE, "text/plain")], head).into_response());
    }
    let mut files: Vec<(String, _, u64)> = files
        .into_iter()
        .map(|(id, f)| {
            let size = f.size();
            (id, f, size)
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        // Bounded: a follower is dropped after a day, or when it hangs up.
        for tick in 0..(24 * 3600 * 4u64) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Instances started since the follow began join it, from
            // their first line.
            if tick % 4 == 3 {
                for (id, f) in api.node.logs(&name, q.instance.as_deref()).unwrap_or_default() {
                    if !files.iter().any(|(known, _, _)| *known == id) {
                        files.push((id, f, 0));
                    }
                }
            }
            let mut chunk = String::new();
            for (id, f, off) in files.iter_mut() {
                let (text, next) = f.read_from(*off);
                *off = next;
                for l in text.lines() {
                    chunk.push_str(&format!("{id} | {l}\n"));
                }
            }
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    let body = Body::new(ChannelBody(rx));
    Ok(([(header::CONTENT_TYPE, "text/plain")], body).into_response())
}

/// A response body fed by a channel, one frame per message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(http_body::Frame::data(b))))
    }
}
