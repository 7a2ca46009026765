//! HTTP routes, middleware and handlers.
//!
//! Every `/v1` request goes, in order, through: bearer auth (an unknown key costs a store
//! look-up, rate limited per client IP), the key's rate limit and its cap on requests in
//! progress, reading the body (size limit, deadline and minimum rate — no concurrency slot is
//! held meanwhile, so a client that trickles a body delays nobody else), then the server-wide
//! concurrency limit, then the handler. `/health` and `/metrics` skip all of that.

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, MatchedPath, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use netmap_core::{Tailnet, TailnetSettings};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use super::config::Limits;
use super::error::ApiError;
use super::keys::{AuthFailure, Authenticator, Caller, RateLimiter};
use super::limits::{self, BodyLimits, Caps};
use super::metrics::{Gauges, Limited, Metrics};
use super::net::ConnInfo;
use super::stream::{self, StreamSlot};
use super::tailnets::{
    self, node_json, Lookup, NodeBody, NodePatch, Registry, TailnetHandle, UserBody, WriteOp,
};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct App(Arc<AppInner>);

/// What [`App`] holds.
pub struct AppInner {
    /// The tailnets.
    pub registry: Arc<Registry>,
    /// API key checks.
    pub auth: Arc<Authenticator>,
    /// Per-key rate limit.
    pub rate: RateLimiter<String>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Limits.
    pub limits: Limits,
    /// Global concurrency limit.
    pub concurrency: Arc<Semaphore>,
    /// Open streams.
    pub streams: Arc<AtomicUsize>,
    /// Requests in progress per API key.
    pub key_requests: Caps<String>,
    /// Open streams per API key.
    pub key_streams: Caps<String>,
    /// Open streams per client IP.
    pub ip_streams: Caps<IpAddr>,
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

/// `Path` whose rejections (invalid percent-encoding, ...) are JSON errors like every other.
struct P<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(P(t)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "invalid path: {}",
                e.body_text()
            ))),
        }
    }
}

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
        // Innermost last: auth, then the body, then a concurrency slot.
        .route_layer(middleware::from_fn_with_state(app.clone(), limit))
        .route_layer(middleware::from_fn_with_state(app.clone(), read_body_first))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("handler panicked".into()).into_response()
            },
        ))
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

/// Global concurrency limit: wait up to the queue timeout for a slot, else 503. Taken only
/// once the body is in memory.
async fn limit(State(app): State<App>, req: Request, next: Next) -> Response {
    let sem = app.0.concurrency.clone();
    let permit = match tokio::time::timeout(app.0.limits.queue_timeout, sem.acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            app.0.metrics.limited(Limited::Busy);
            return ApiError::Unavailable("server busy; retry later".into()).into_response();
        }
    };
    let resp = next.run(req).await;
    drop(permit);
    resp
}

/// The body limit of a route.
fn body_limit(l: &Limits, method: &Method, route: &str) -> usize {
    match (method, route) {
        (&Method::PUT, "/v1/tailnets/{t}/state") => l.max_import_bytes,
        (&Method::PUT, "/v1/tailnets/{t}/policy") => l.max_policy_bytes,
        _ => l.max_body_bytes,
    }
}

/// Reads the whole body (size limit, deadline, minimum rate) before the request may take a
/// concurrency slot; handlers then get it from memory.
async fn read_body_first(State(app): State<App>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let body = if declared.unwrap_or(0) == 0 && !chunked {
        Body::empty()
    } else {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str())
            .unwrap_or("");
        let l = &app.0.limits;
        let bl = BodyLimits {
            max_bytes: body_limit(l, &parts.method, route),
            timeout: l.body_read_timeout,
            min_rate: l.body_min_rate,
        };
        match limits::read_body(body, bl, declared).await {
            Ok(b) => Body::from(b),
            Err(e) => {
                if matches!(e, ApiError::BodyTimeout(_)) {
                    app.0.metrics.body_timeouts.inc();
                }
                return e.into_response();
            }
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

/// Bearer auth, the per-key rate limit and the per-key cap on requests in progress.
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
        app.0.metrics.auth_failures.inc();
        return ApiError::Unauthorized("missing API key: send Authorization: Bearer KEY".into())
            .into_response();
    };
    let client = req.extensions().get::<ConnInfo>().map(|c| c.peer.ip());
    let caller = match app.0.auth.check(&token, client) {
        Ok(Ok(c)) => c,
        Ok(Err(f)) => {
            app.0.metrics.auth_failures.inc();
            return match f {
                AuthFailure::Unknown => ApiError::Unauthorized("invalid API key".into()),
                AuthFailure::Expired => ApiError::Unauthorized("API key expired".into()),
                AuthFailure::Limited(wait) => {
                    app.0.metrics.limited(Limited::BadKeys);
                    ApiError::TooMany(
                        "too many unknown API keys from this address; retry later".into(),
                        wait,
                    )
                }
            }
            .into_response();
        }
        Err(e) => return ApiError::Internal(format!("key lookup: {e}")).into_response(),
    };
    if let Err(wait) = app.0.rate.take(&caller.key_id) {
        app.0.metrics.limited(Limited::KeyRate);
        return ApiError::RateLimited(wait).into_response();
    }
    let Some(_in_progress) = app.0.key_requests.try_take(&caller.key_id) else {
        app.0.metrics.limited(Limited::KeyRequests);
        return ApiError::TooMany(
            format!(
                "this API key has {} requests in progress (max_requests_per_key); retry later",
                app.0.key_requests.cap()
            ),
            Duration::from_secs(1),
        )
        .into_response();
    };
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
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        app.0.metrics.render(g),
    )
        .into_response()
}

/// The body, read by [`read_body_first`] within the route's limit.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge(limit))
        }
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
    match lookup(app, caller, t)? {
        Lookup::Ready(h) => Ok(h),
        Lookup::Broken(b) => Err(broken(t, &b.reason)),
        Lookup::Missing => Err(ApiError::NotFound(format!("tailnet {t:?} not found"))),
    }
}

/// The tailnet `t` as the registry knows it (broken ones included), if the caller may use it.
fn lookup(app: &App, caller: &Caller, t: &str) -> Result<Lookup, ApiError> {
    if !caller.can_access(t) {
        return Err(ApiError::Forbidden(format!(
            "this API key may not access tailnet {t:?}"
        )));
    }
    Ok(app.0.registry.lookup(t))
}

fn broken(t: &str, reason: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "tailnet {t:?} is unavailable: its stored state cannot be read ({reason}); replace it \
         with PUT /v1/tailnets/{t}/state (or PUT .../policy if only the policy is bad), or \
         delete it"
    ))
}

fn check_name(what: &str, s: &str) -> Result<(), ApiError> {
    if tailnets::valid_name(s) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {what} {s:?}: {}",
            netmap_core::NAME_RULE
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
    let mut list: Vec<Value> = app
        .0
        .registry
        .list()
        .iter()
        .filter(|h| caller.can_access(h.name()))
        .map(|h| summary(h))
        .collect();
    for (name, b) in app.0.registry.list_broken() {
        if caller.can_access(&name) {
            list.push(json!({"name": name, "broken": b.reason}));
        }
    }
    Ok(Json(json!({ "tailnets": list })).into_response())
}

async fn get_tailnet(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    P(t): P<String>,
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
    P(t): P<String>,
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
    if b.domain.as_deref() == Some("") {
        return Err(ApiError::BadRequest(
            "domain: empty; omit it to use the tailnet name".into(),
        ));
    }
    let mut settings = TailnetSettings {
        name: b.domain.unwrap_or_else(|| t.clone()),
        ..TailnetSettings::default()
    };
    if b.ipv6_only {
        settings.extra.insert("ipv6_only".into(), Value::Bool(true));
    }
    netmap_core::check_settings(&settings)?;
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
    P(t): P<String>,
) -> ApiResult {
    if !caller.is_admin() {
        return Err(ApiError::Forbidden(
            "only an admin API key may delete tailnets".into(),
        ));
    }
    let _guard = app.0.registry.lifecycle.lock().await;
    match lookup(&app, &caller, &t)? {
        Lookup::Ready(h) => {
            h.write(WriteOp::DeleteTailnet).await?;
            app.0.registry.remove(&t);
        }
        Lookup::Broken(_) => {
            let reg = app.0.registry.clone();
            let name = t.clone();
            tokio::task::spawn_blocking(move || reg.delete_broken(&name))
                .await
                .map_err(|e| ApiError::Internal(format!("delete task: {e}")))??;
        }
        Lookup::Missing => return Err(ApiError::NotFound(format!("tailnet {t:?} not found"))),
    }
    app.0.auth.clear_cache();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_policy(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    P(t): P<String>,
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
    P(t): P<String>,
    body: Body,
) -> ApiResult {
    let found = lookup(&app, &caller, &t)?;
    let bytes = read_body(body, app.0.limits.max_policy_bytes).await?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::BadRequest("policy is not valid UTF-8".into()))?;
    let h = match found {
        Lookup::Ready(h) => h,
        Lookup::Broken(_) => {
            let h = repair(&app, &t, Some(text), None).await?;
            let seq = h.current().seq;
            return Ok(with_seq(
                Json(json!({"status": "ok", "seq": seq, "repaired": true})).into_response(),
                seq,
            ));
        }
        Lookup::Missing => return Err(ApiError::NotFound(format!("tailnet {t:?} not found"))),
    };
    let out = h.write(WriteOp::SetPolicy(text)).await?;
    let seq = out.published.seq;
    Ok(with_seq(
        Json(json!({"status": "ok", "seq": seq})).into_response(),
        seq,
    ))
}

/// Repairs a broken tailnet (see [`Registry::repair`]).
async fn repair(
    app: &App,
    t: &str,
    policy: Option<String>,
    tailnet: Option<Tailnet>,
) -> Result<Arc<TailnetHandle>, ApiError> {
    let _guard = app.0.registry.lifecycle.lock().await;
    let reg = app.0.registry.clone();
    let name = t.to_string();
    tokio::task::spawn_blocking(move || reg.repair(&name, policy, tailnet))
        .await
        .map_err(|e| ApiError::Internal(format!("repair task: {e}")))?
}

async fn get_state(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    P(t): P<String>,
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
    P(t): P<String>,
    body: Body,
) -> ApiResult {
    let found = lookup(&app, &caller, &t)?;
    let current = match &found {
        Lookup::Ready(h) => Some(h.current().snapshot.tailnet().settings.clone()),
        Lookup::Broken(b) => b.tailnet.as_ref().map(|x| x.settings.clone()),
        Lookup::Missing => return Err(ApiError::NotFound(format!("tailnet {t:?} not found"))),
    };
    let bytes = read_body(body, app.0.limits.max_import_bytes).await?;
    let max_nodes = app.0.limits.max_nodes_per_tailnet;
    let name = t.clone();
    // Read straight into the model (no intermediate JSON tree) and check it with the same
    // validator as node and user writes.
    let (policy, tailnet) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::BadRequest("state is not valid UTF-8".into()))?;
        let doc = netmap_core::read_state(
            text,
            netmap_core::StateOptions {
                extra_keys: &["policy", "seq"],
                max_nodes: Some(max_nodes),
            },
        )?;
        drop(bytes);
        let policy = match doc.extra.get("policy") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(p.clone()),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "policy: must be a string (the HuJSON text)".into(),
                ))
            }
        };
        if doc.extra.get("seq").is_some_and(|v| !v.is_u64()) {
            return Err(ApiError::BadRequest(
                "seq: must be a number (it is ignored)".into(),
            ));
        }
        let mut tailnet = doc.tailnet;
        let defaults = TailnetSettings::default();
        match current {
            // No settings in the document: keep the tailnet's.
            Some(cur) if tailnet.settings == defaults => tailnet.settings = cur,
            Some(cur) if tailnets::ipv6_only(&cur) => {
                tailnet
                    .settings
                    .extra
                    .insert("ipv6_only".into(), Value::Bool(true));
            }
            None if tailnet.settings == defaults => tailnet.settings.name = name,
            _ => {}
        }
        // A document that contradicts itself is a bad request (400), whatever the kind.
        netmap_core::validate_tailnet(&tailnet).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok((policy, tailnet))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("import task: {e}")))??;
    let h = match found {
        Lookup::Ready(h) => h,
        _ => {
            let h = repair(&app, &t, policy, Some(tailnet)).await?;
            let p = h.current();
            let tn = p.snapshot.tailnet();
            return Ok(with_seq(
                Json(json!({"status": "ok", "seq": p.seq, "users": tn.users.len(), "nodes": tn.nodes.len(), "repaired": true}))
                    .into_response(),
                p.seq,
            ));
        }
    };
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
    P(t): P<String>,
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
    P((t, name)): P<(String, String)>,
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
    P((t, name)): P<(String, String)>,
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
    P((t, name)): P<(String, String)>,
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
    P(t): P<String>,
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
    P((t, id)): P<(String, String)>,
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
    P((t, id)): P<(String, String)>,
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
    P((t, id)): P<(String, String)>,
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
    P((t, id)): P<(String, String)>,
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
    P((t, id)): P<(String, String)>,
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
        let per_key = app.0.key_streams.try_take(&caller.key_id).ok_or_else(|| {
            app.0.metrics.limited(Limited::KeyStreams);
            ApiError::TooMany(
                format!(
                    "this API key has {} open streams (max_streams_per_key)",
                    app.0.key_streams.cap()
                ),
                Duration::from_secs(5),
            )
        })?;
        let per_ip = match conn.as_ref().map(|Extension(c)| c.peer.ip()) {
            Some(ip) => Some(app.0.ip_streams.try_take(&ip).ok_or_else(|| {
                app.0.metrics.limited(Limited::IpStreams);
                ApiError::TooMany(
                    format!(
                        "{ip} has {} open streams (max_streams_per_ip)",
                        app.0.ip_streams.cap()
                    ),
                    Duration::from_secs(5),
                )
            })?),
            None => None,
        };
        return stream::open(stream::Open {
            handle: h,
            node: id,
            slot,
            per_key: Some(per_key),
            per_ip,
            key_end: Some(app.0.auth.watch(&caller.key_id)),
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
    P(t): P<String>,
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
