//! HTTP routes, middleware (metrics, concurrency limit, bearer auth, per-key rate limit) and
//! handlers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use netmap_core::{Tailnet, TailnetSettings};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use super::config::Limits;
use super::error::ApiError;
use super::keys::{AuthFailure, Authenticator, Caller, RateLimiter};
use super::metrics::{Gauges, Metrics};
use super::net::ConnInfo;
use super::stream::{self, StreamSlot};
use super::tailnets::{
    self, node_json, NodeBody, NodePatch, Registry, TailnetHandle, UserBody, WriteOp,
};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct App(Arc<AppInner>);

/// What [`App`] holds.
pub struct AppInner {
    /// The tailnets.
    pub registry: Arc<Registry>,
    /// API key checks.
    pub auth: Authenticator,
    /// Per-key rate limit.
    pub rate: RateLimiter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: Limits,
    /// Global concurrency limit.
    pub concurrency: Arc<Semaphore>,
    /// Open streams.
    pub streams: Arc<AtomicUsize>,
    /// Turns true on SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

impl App {
    /// Wraps the shared state.
    pub fn new(inner: AppInner) -> App {
        App(Arc::new(inner))
    }
}

type ApiResult = Result<Response, ApiError>;

/// The router with every route and middleware.
pub fn router(app: App) -> Router {
    let v1 = Router::new()
        .route("/v1/tailnets", get(list_tailnets))
        .route(
            "/v1/tailnets/{t}",
            get(get_tailnet).put(put_tailnet).delete(delete_tailnet),
        )
        .route("/v1/tailnets/{t}/policy", get(get_policy).put(put_policy))
        .route("/v1/tailnets/{t}/state", get(get_state).put(put_state))
        .route("/v1/tailnets/{t}/users", get(list_users))
        .route(
            "/v1/tailnets/{t}/users/{name}",
            get(get_user).put(put_user).delete(delete_user),
        )
        .route("/v1/tailnets/{t}/nodes", get(list_nodes))
        .route(
            "/v1/tailnets/{t}/nodes/{id}",
            get(get_node)
                .put(put_node)
                .patch(patch_node)
                .delete(delete_node),
        )
        .route("/v1/tailnets/{t}/nodes/{id}/netmap", get(get_netmap))
        .route(
            "/v1/tailnets/{t}/preauthkeys",
            axum::routing::post(create_preauthkey),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), limit))
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Outermost: metrics and the access log.
async fn track(State(app): State<App>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let path = req.uri().path().to_string();
    let peer = req
        .extensions()
        .get::<ConnInfo>()
        .map(|c| c.peer.to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let status = resp.status();
    let d = t0.elapsed();
    app.0
        .metrics
        .observe_request(method.as_str(), &route, status.as_u16(), d);
    if status.is_server_error() {
        tracing::warn!(%peer, %method, %path, status = status.as_u16(), elapsed_us = d.as_micros() as u64, "request");
    } else {
        tracing::debug!(%peer, %method, %path, status = status.as_u16(), elapsed_us = d.as_micros() as u64, "request");
    }
    resp
}

/// Global concurrency limit: wait up to the queue timeout for a slot, else 503.
async fn limit(State(app): State<App>, req: Request, next: Next) -> Response {
    let sem = app.0.concurrency.clone();
    let permit = match tokio::time::timeout(app.0.limits.queue_timeout, sem.acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => return ApiError::Unavailable("server busy; retry later".into()).into_response(),
    };
    let resp = next.run(req).await;
    drop(permit);
    resp
}

/// Bearer auth and the per-key rate limit for `/v1`.
async fn authenticate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, tok) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| tok.trim())
        })
        .map(str::to_string);
    let Some(token) = token else {
        return ApiError::Unauthorized("missing API key: send Authorization: Bearer KEY".into())
            .into_response();
    };
    let caller = match app.0.auth.check(&token) {
        Ok(Ok(c)) => c,
        Ok(Err(AuthFailure::Unknown)) => {
            return ApiError::Unauthorized("invalid API key".into()).into_response()
        }
        Ok(Err(AuthFailure::Expired)) => {
            return ApiError::Unauthorized("API key expired".into()).into_response()
        }
        Err(e) => return ApiError::Internal(format!("key lookup: {e}")).into_response(),
    };
    if let Err(wait) = app.0.rate.take(&caller.key_id) {
        app.0.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return ApiError::RateLimited(wait).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn health(State(app): State<App>) -> Response {
    if *app.0.shutdown.borrow() {
        return ApiError::Unavailable("draining".into()).into_response();
    }
    Json(json!({"status": "ok", "tailnets": app.0.registry.list().len()})).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let list = app.0.registry.list();
    let g = Gauges {
        tailnets: list.len(),
        nodes: list
            .iter()
            .map(|h| h.current().snapshot.tailnet().nodes.len())
            .sum(),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.0.metrics.render(g),
    )
        .into_response()
}

/// Reads a body up to `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::BadRequest(format!(
            "could not read request body: {e}"
        ))),
    }
}

async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = read_body(body, limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::from_json(&e))
}

/// The tailnet `t`, if the caller may use it: 403 before 404, so that a scoped key learns
/// nothing about other tailnets.
fn tailnet(app: &App, caller: &Caller, t: &str) -> Result<Arc<TailnetHandle>, ApiError> {
    if !caller.can_access(t) {
        return Err(ApiError::Forbidden(format!(
            "this API key may not access tailnet {t:?}"
        )));
    }
    app.0
        .registry
        .get(t)
        .ok_or_else(|| ApiError::NotFound(format!("tailnet {t:?} not found")))
}

fn check_name(what: &str, s: &str) -> Result<(), ApiError> {
    if tailnets::valid_name(s) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {what} {s:?}: use 1-128 characters of A-Z a-z 0-9 - _ . @ +"
        )))
    }
}

fn with_seq(mut resp: Response, seq: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&seq.to_string()) {
        resp.headers_mut().insert("x-netmap-seq", v);
    }
    resp
}

fn created_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

fn summary(h: &TailnetHandle) -> Value {
    let p = h.current();
    let t = p.snapshot.tailnet();
    json!({
        "name": h.name(),
        "domain": t.settings.name,
        "ipv6_only": tailnets::ipv6_only(&t.settings),
        "seq": p.seq,
        "users": t.users.len(),
        "nodes": t.nodes.len(),
    })
}

async fn list_tailnets(State(app): State<App>, Extension(caller): Extension<Caller>) -> ApiResult {
    let list: Vec<Value> = app
        .0
        .registry
        .list()
        .iter()
        .filter(|h| caller.can_access(h.name()))
        .map(|h| summary(h))
        .collect();
    Ok(Json(json!({ "tailnets": list })).into_response())
}

async fn get_tailnet(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    Ok(Json(summary(&h)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TailnetBody {
    /// The tailnet's domain / name as policies see it (`user:*@DOMAIN`); defaults to the id.
    #[serde(default)]
    domain: Option<String>,
    /// Nodes get IPv6 addresses only.
    #[serde(default)]
    ipv6_only: bool,
}

async fn put_tailnet(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> ApiResult {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "only an admin API key may create tailnets".into(),
        ));
    }
    check_name("tailnet name", &t)?;
    let bytes = read_body(body, app.0.limits.max_body_bytes).await?;
    let b: TailnetBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        TailnetBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::from_json(&e))?
    };
    let mut settings = TailnetSettings {
        name: b.domain.unwrap_or_else(|| t.clone()),
        ..TailnetSettings::default()
    };
    if b.ipv6_only {
        settings.extra.insert("ipv6_only".into(), Value::Bool(true));
    }
    let _guard = app.0.registry.lifecycle.lock().await;
    let reg = app.0.registry.clone();
    let name = t.clone();
    let created = tokio::task::spawn_blocking(move || reg.create(&name, settings))
        .await
        .map_err(|e| ApiError::Internal(format!("create task: {e}")))??;
    let h = tailnet(&app, &caller, &t)?;
    Ok((created_status(created), Json(summary(&h))).into_response())
}

async fn delete_tailnet(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "only an admin API key may delete tailnets".into(),
        ));
    }
    let _guard = app.0.registry.lifecycle.lock().await;
    let h = tailnet(&app, &caller, &t)?;
    h.write(WriteOp::DeleteTailnet).await?;
    app.0.registry.remove(&t);
    app.0.auth.clear_cache();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_policy(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/hujson"),
        )],
        p.policy_text.to_string(),
    )
        .into_response();
    Ok(with_seq(resp, p.seq))
}

async fn put_policy(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let bytes = read_body(body, app.0.limits.max_policy_bytes).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::BadRequest("policy is not valid UTF-8".into()))?;
    let out = h.write(WriteOp::SetPolicy(text)).await?;
    let seq = out.published.seq;
    Ok(with_seq(
        Json(json!({"status": "ok", "seq": seq})).into_response(),
        seq,
    ))
}

/// Body of `PUT .../state`: the corpus state shape plus an optional policy.
#[derive(Debug, Deserialize)]
struct ImportBody {
    #[serde(default)]
    policy: Option<String>,
    #[serde(flatten)]
    state: Value,
}

async fn get_state(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let tn = p.snapshot.tailnet();
    let doc = json!({
        "seq": p.seq,
        "policy": &*p.policy_text,
        "tailnet": tn.settings,
        "users": tn.users.values().collect::<Vec<_>>(),
        "nodes": tn.nodes.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "dns_names": tn.dns_names.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "primaries": tn.primaries.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    Ok(with_seq(Json(doc).into_response(), p.seq))
}

async fn put_state(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let bytes = read_body(body, app.0.limits.max_import_bytes).await?;
    let (policy, tailnet) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let b: ImportBody = serde_json::from_slice(&bytes).map_err(|e| ApiError::from_json(&e))?;
        let text =
            serde_json::to_string(&b.state).map_err(|e| ApiError::Internal(e.to_string()))?;
        let tailnet = Tailnet::from_state_json(&text)?;
        for (k, _) in tailnet.nodes.iter() {
            if !tailnets::valid_name(k) {
                return Err(ApiError::BadRequest(format!("invalid node name {k:?}")));
            }
        }
        Ok((b.policy, tailnet))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("import task: {e}")))??;
    let mut tailnet = tailnet;
    let cur = h.current();
    let cur_settings = &cur.snapshot.tailnet().settings;
    if tailnet.settings == TailnetSettings::default() {
        tailnet.settings = cur_settings.clone();
    } else if tailnets::ipv6_only(cur_settings) {
        tailnet
            .settings
            .extra
            .insert("ipv6_only".into(), Value::Bool(true));
    }
    let out = h
        .write(WriteOp::Import {
            policy,
            tailnet: Box::new(tailnet),
        })
        .await?;
    let seq = out.published.seq;
    Ok(with_seq(
        Json(json!({
            "status": "ok",
            "seq": seq,
            "users": out.published.snapshot.tailnet().users.len(),
            "nodes": out.published.snapshot.tailnet().nodes.len(),
        }))
        .into_response(),
        seq,
    ))
}

async fn list_users(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let users: Vec<_> = p.snapshot.tailnet().users.values().cloned().collect();
    Ok(with_seq(
        Json(json!({ "users": users })).into_response(),
        p.seq,
    ))
}

async fn get_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, name)): Path<(String, String)>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let u = p
        .snapshot
        .tailnet()
        .users
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("user {name:?} not found")))?;
    Ok(with_seq(Json(u).into_response(), p.seq))
}

async fn put_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    check_name("user name", &name)?;
    let b: UserBody = read_json(body, app.0.limits.max_body_bytes).await?;
    let out = h.write(WriteOp::PutUser(name.clone(), b)).await?;
    let p = &out.published;
    let u = p.snapshot.tailnet().users.get(&name).cloned();
    Ok(with_seq(
        (created_status(out.created), Json(json!(u))).into_response(),
        p.seq,
    ))
}

async fn delete_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, name)): Path<(String, String)>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let out = h.write(WriteOp::DeleteUser(name)).await?;
    Ok(with_seq(
        StatusCode::NO_CONTENT.into_response(),
        out.published.seq,
    ))
}

async fn list_nodes(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let nodes: Vec<Value> = p
        .snapshot
        .tailnet()
        .nodes
        .keys()
        .filter_map(|k| node_json(&p.snapshot, k))
        .collect();
    Ok(with_seq(
        Json(json!({ "nodes": nodes })).into_response(),
        p.seq,
    ))
}

async fn get_node(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let p = h.current();
    let n = node_json(&p.snapshot, &id)
        .ok_or_else(|| ApiError::NotFound(format!("node {id:?} not found")))?;
    Ok(with_seq(Json(n).into_response(), p.seq))
}

async fn put_node(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, id)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    check_name("node id", &id)?;
    let b: NodeBody = read_json(body, app.0.limits.max_body_bytes).await?;
    let out = h.write(WriteOp::PutNode(id.clone(), b)).await?;
    let p = &out.published;
    let n = node_json(&p.snapshot, &id);
    Ok(with_seq(
        (created_status(out.created), Json(json!(n))).into_response(),
        p.seq,
    ))
}

async fn patch_node(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, id)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let b: NodePatch = read_json(body, app.0.limits.max_body_bytes).await?;
    let out = h.write(WriteOp::PatchNode(id.clone(), b)).await?;
    let p = &out.published;
    let n = node_json(&p.snapshot, &id);
    Ok(with_seq(Json(json!(n)).into_response(), p.seq))
}

async fn delete_node(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path((t, id)): Path<(String, String)>,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    let out = h.write(WriteOp::DeleteNode(id)).await?;
    Ok(with_seq(
        StatusCode::NO_CONTENT.into_response(),
        out.published.seq,
    ))
}

fn wants_stream(q: Option<&str>) -> Result<bool, ApiError> {
    for pair in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k == "stream" {
            return match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::BadRequest(format!(
                    "stream={v:?}: expected true or false"
                ))),
            };
        }
    }
    Ok(false)
}

async fn get_netmap(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnInfo>>,
    Path((t, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    method: Method,
) -> ApiResult {
    let h = tailnet(&app, &caller, &t)?;
    if wants_stream(q.as_deref())? && method == Method::GET {
        if *app.0.shutdown.borrow() {
            return Err(ApiError::Unavailable("server is shutting down".into()));
        }
        let slot = StreamSlot::take(&app.0.streams, app.0.limits.max_streams, &app.0.metrics)
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "too many open streams (limit {})",
                    app.0.limits.max_streams
                ))
            })?;
        return stream::open(stream::Open {
            handle: h,
            node: id,
            slot,
            active: conn.map(|Extension(c)| c.busy()),
            keepalive: app.0.limits.stream_keepalive,
            shutdown: app.0.shutdown.clone(),
            metrics: app.0.metrics.clone(),
        });
    }
    let p = h.current();
    let view = p
        .snapshot
        .view(&id)
        .ok_or_else(|| ApiError::NotFound(format!("node {id:?} not found")))?;
    let bytes = serde_json::to_vec(&view).map_err(|e| ApiError::Internal(e.to_string()))?;
    let resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response();
    Ok(with_seq(resp, p.seq))
}

/// `POST /v1/tailnets/{t}/preauthkeys`: a pre-auth key for Tailscale clients (shown once).
async fn create_preauthkey(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(t): Path<String>,
    body: Body,
) -> ApiResult {
    use crate::control::preauth::{self, PreauthError, PreauthSpec};
    tailnet(&app, &caller, &t)?;
    let spec: PreauthSpec = read_json(body, app.0.limits.max_body_bytes).await?;
    let store = app.0.registry.store().clone();
    let (key, row) = tokio::task::spawn_blocking(move || preauth::create(&store, &t, &spec))
        .await
        .map_err(|e| ApiError::Internal(format!("preauth task: {e}")))?
        .map_err(|e| match e {
            PreauthError::Invalid(m) => ApiError::BadRequest(m),
            PreauthError::NotFound(m) => ApiError::NotFound(m),
            other => ApiError::Internal(other.to_string()),
        })?;
    let mut out = preauth::row_json(&row);
    out["key"] = Value::String(key);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}
