//! The control endpoints on the API listener: `GET /key` (the server's Noise key) and
//! `POST /ts2021` (HTTP/1.1 upgrade carrying the first Noise message in
//! `X-Tailscale-Handshake`), then HTTP/2 over the Noise stream with `/machine/register` and
//! `/machine/map`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ipnet::IpNet;
use netmap_control::keys::MachinePublic;
use netmap_control::noise;
use netmap_control::tailcfg::{
    KeyResponse, Login, MapRequest, RegisterRequest, RegisterResponse, User, GO_ZERO_TIME,
};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::mapper::{label, TAGGED_USER_ID};
use super::preauth;
use super::session;
use super::state::{Control, Machine, MachineData, Patch};
use crate::serve::keys::now_secs;
use crate::serve::tailnets::{now_rfc3339, NodeBody, NodePatch, TailnetHandle, WriteOp};

const UPGRADE: &str = "tailscale-control-protocol";
/// Largest register or map request body.
const MAX_REQUEST: usize = 1 << 20;

/// The routes, to merge into the API router.
pub fn router(ctl: Arc<Control>) -> Router {
    Router::new()
        .route("/key", get(server_key))
        .route("/ts2021", get(upgrade).post(upgrade))
        .with_state(ctl)
}

async fn server_key(State(ctl): State<Arc<Control>>) -> Response {
    Json(KeyResponse {
        legacy_public_key: ctl.key.public,
        public_key: ctl.key.public,
    })
    .into_response()
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = msg.into();
    m.push('\n');
    (status, m).into_response()
}

async fn upgrade(State(ctl): State<Arc<Control>>, mut req: Request) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE));
    if !wants {
        return text(
            StatusCode::BAD_REQUEST,
            format!("/ts2021 needs Upgrade: {UPGRADE}"),
        );
    }
    let init = req
        .headers()
        .get("x-tailscale-handshake")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        });
    let Some(init) = init else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing or invalid X-Tailscale-Handshake header",
        );
    };
    let (resp_msg, established) = match noise::accept(&init, &ctl.key) {
        Ok(x) => x,
        Err(r) => {
            tracing::debug!(error = %r.error, "noise handshake refused");
            return text(
                StatusCode::BAD_REQUEST,
                format!("noise handshake: {}", r.error),
            );
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        if io.write_all(&resp_msg).await.is_err() || io.flush().await.is_err() {
            return;
        }
        let peer = established.peer;
        let stream = established.into_stream(io);
        serve_h2(ctl, peer, stream).await;
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE));
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp
}

async fn serve_h2<S>(ctl: Arc<Control>, peer: MachinePublic, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let ctl = ctl.clone();
        async move { Ok::<_, Infallible>(handle(ctl, peer, req).await) }
    });
    let r = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
    if let Err(e) = r {
        tracing::debug!(machine = %peer, error = %e, "control connection ended");
    }
}

async fn handle(ctl: Arc<Control>, peer: MachinePublic, req: hyper::Request<Incoming>) -> Response {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    match path.as_str() {
        "/machine/register" => match serde_json::from_slice::<RegisterRequest>(&body) {
            Ok(r) => {
                let resp = register(&ctl, peer, r).await.unwrap_or_else(|error| {
                    tracing::info!(machine = %peer, %error, "registration refused");
                    RegisterResponse {
                        error,
                        ..RegisterResponse::default()
                    }
                });
                Json(resp).into_response()
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("RegisterRequest: {e}")),
        },
        "/machine/map" => match serde_json::from_slice::<MapRequest>(&body) {
            Ok(r) => map(ctl, peer, r).await,
            Err(e) => text(StatusCode::BAD_REQUEST, format!("MapRequest: {e}")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            format!("{path}: not supported by netmap serve"),
        ),
    }
}

/// The owner's user and login for a register response.
fn owner(h: &TailnetHandle, m: &Machine) -> (User, Login) {
    let p = h.current();
    let t = p.snapshot.tailnet();
    let u = t
        .nodes
        .get(&m.node)
        .filter(|n| n.tags.is_empty())
        .and_then(|n| n.user.as_ref())
        .and_then(|u| t.users.get(u));
    match u {
        Some(u) => {
            let id = i64::try_from(u.id).unwrap_or(0);
            (
                User {
                    id,
                    display_name: u.name.clone(),
                },
                Login {
                    id,
                    provider: "netmap".into(),
                    login_name: u.email.clone(),
                    display_name: u.name.clone(),
                },
            )
        }
        None => (
            User {
                id: TAGGED_USER_ID,
                display_name: "Tagged Devices".into(),
            },
            Login {
                id: TAGGED_USER_ID,
                provider: "netmap".into(),
                login_name: "tagged-devices".into(),
                display_name: "Tagged Devices".into(),
            },
        ),
    }
}

fn authorized(h: &TailnetHandle, m: &Machine) -> RegisterResponse {
    let (user, login) = owner(h, m);
    RegisterResponse {
        user,
        login,
        machine_authorized: true,
        ..RegisterResponse::default()
    }
}

fn is_logout(expiry: Option<&str>) -> bool {
    match expiry {
        None | Some("") | Some(GO_ZERO_TIME) => false,
        Some(t) => netmap_core::parse_rfc3339(t).is_some_and(|(s, _)| s < now_secs()),
    }
}

fn hostname_of(h: Option<&Value>) -> String {
    h.and_then(|h| h.get("Hostname"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("node")
        .to_string()
}

fn routes_of(h: Option<&Value>) -> Result<Vec<IpNet>, String> {
    let Some(list) = h
        .and_then(|h| h.get("RoutableIPs"))
        .filter(|v| !v.is_null())
    else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| "Hostinfo.RoutableIPs: expected a list of prefixes".to_string())?;
    list.iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| s.parse::<IpNet>().ok())
                .ok_or_else(|| format!("Hostinfo.RoutableIPs: {v} is not a prefix"))
        })
        .collect()
}

async fn register(
    ctl: &Arc<Control>,
    peer: MachinePublic,
    r: RegisterRequest,
) -> Result<RegisterResponse, String> {
    // A known node key of this machine: already registered (or logging out).
    if let Some(m) = ctl
        .by_node_key(&r.node_key)
        .filter(|m| m.machine_key == peer)
    {
        if let Some(h) = ctl.registry.get(&m.tailnet) {
            if m.is_current(&h.current().snapshot) {
                if is_logout(r.expiry.as_deref()) {
                    tracing::info!(tailnet = %m.tailnet, node = %m.node, "logout: removing node");
                    h.write(WriteOp::DeleteNode(m.node.clone()))
                        .await
                        .map_err(|e| e.to_string())?;
                    ctl.forget(&m.tailnet, &m.node).await;
                    return Ok(RegisterResponse::default());
                }
                return Ok(authorized(&h, &m));
            }
        }
        ctl.forget(&m.tailnet, &m.node).await;
    }
    // Key rotation: the old key is this machine's.
    if !r.old_node_key.is_zero() {
        if let Some(m) = ctl
            .by_node_key(&r.old_node_key)
            .filter(|m| m.machine_key == peer)
        {
            if let Some(h) = ctl.registry.get(&m.tailnet) {
                if m.is_current(&h.current().snapshot) {
                    let mut next = (*m).clone();
                    next.node_key = r.node_key;
                    let saved = ctl.save(next).await.map_err(|e| e.to_string())?;
                    ctl.emit(
                        &m.tailnet,
                        Patch {
                            node: m.node.clone(),
                            key: Some(r.node_key),
                            ..Patch::default()
                        },
                    );
                    return Ok(authorized(&h, &saved));
                }
            }
        }
    }
    let key = r
        .auth
        .as_ref()
        .map(|a| a.auth_key.trim().to_string())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            "netmap serve registers machines with pre-auth keys only: use tailscale up --authkey"
                .to_string()
        })?;
    let store_key = key.clone();
    let store = ctl.registry.store().clone();
    let row = tokio::task::spawn_blocking(move || preauth::lookup(&store, &store_key))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if let Some(why) = preauth::refusal(row.as_ref(), now_secs()) {
        return Err(why.to_string());
    }
    let Some(row) = row else {
        return Err("invalid pre-auth key".into());
    };
    let h = ctl
        .registry
        .get(&row.tailnet)
        .ok_or_else(|| format!("tailnet {:?} not found", row.tailnet))?;
    let hostname = hostname_of(r.hostinfo.as_ref());
    let routes = routes_of(r.hostinfo.as_ref())?;
    let snap = h.current().snapshot.clone();
    // The same machine registering again keeps its node (and name).
    let previous = ctl
        .by_machine_key(&peer)
        .filter(|m| m.tailnet == row.tailnet && m.is_current(&snap));
    let name = match &previous {
        Some(m) => m.node.clone(),
        None => {
            let base = label(&hostname);
            let mut name = base.clone();
            let mut i = 2;
            while snap.tailnet().nodes.contains_key(&name)
                || ctl.name_taken(&row.tailnet, &name, &peer)
            {
                name = format!("{base}-{i}");
                i += 1;
            }
            name
        }
    };
    let created = previous
        .as_ref()
        .map(|m| m.data.created.clone())
        .unwrap_or_else(now_rfc3339);
    let machine = Machine {
        tailnet: row.tailnet.clone(),
        node: name.clone(),
        machine_key: peer,
        node_key: r.node_key,
        data: MachineData {
            disco_key: previous
                .as_ref()
                .map(|m| m.data.disco_key)
                .unwrap_or_default(),
            endpoints: previous
                .as_ref()
                .map(|m| m.data.endpoints.clone())
                .unwrap_or_default(),
            hostinfo: r.hostinfo.clone().unwrap_or(Value::Null),
            ephemeral: row.ephemeral || r.ephemeral,
            created: created.clone(),
            cap: i64::from(r.version),
        },
    };
    // Keys first, so that peers told about the new node find them.
    let saved = ctl.save(machine).await.map_err(|e| e.to_string())?;
    let body = NodeBody {
        hostname: Some(hostname),
        user: row.user.clone(),
        tags: row.tags.clone(),
        ipv4: None,
        ipv6: None,
        routable_ips: routes,
        approved_routes: None,
        online: Some(false),
        created: Some(created),
        posture: None,
    };
    if let Err(e) = h.write(WriteOp::PutNode(name.clone(), body)).await {
        ctl.forget(&row.tailnet, &name).await;
        return Err(format!("registration rejected: {e}"));
    }
    let (store, id) = (ctl.registry.store().clone(), row.id.clone());
    let _ = tokio::task::spawn_blocking(move || store.use_preauth(&id)).await;
    tracing::info!(tailnet = %row.tailnet, node = %name, machine = %peer, "machine registered");
    Ok(authorized(&h, &saved))
}

async fn map(ctl: Arc<Control>, peer: MachinePublic, r: MapRequest) -> Response {
    let Some(m) = ctl
        .by_node_key(&r.node_key)
        .filter(|m| m.machine_key == peer)
    else {
        return text(StatusCode::UNAUTHORIZED, "node key not registered");
    };
    let Some(h) = ctl.registry.get(&m.tailnet) else {
        return text(StatusCode::UNAUTHORIZED, "tailnet not found");
    };
    if !m.is_current(&h.current().snapshot) {
        ctl.forget(&m.tailnet, &m.node).await;
        return text(StatusCode::UNAUTHORIZED, "node was removed; register again");
    }
    let m = if r.read_only {
        m
    } else {
        match update(&ctl, &h, &m, &r).await {
            Ok(m) => m,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    };
    let zstd = match r.compress.as_str() {
        "zstd" => true,
        "" => false,
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Compress {other:?}: only zstd is supported"),
            )
        }
    };
    if !r.stream {
        if r.omit_peers {
            return StatusCode::OK.into_response();
        }
        return match session::single(&ctl, &h, &m, zstd) {
            Some(b) => Body::from(b).into_response(),
            None => text(StatusCode::UNAUTHORIZED, "node was removed; register again"),
        };
    }
    let body = session::open(ctl, h, m, zstd);
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Records what a map request says about the machine (disco key, endpoints, hostinfo,
/// advertised routes) and tells peers.
async fn update(
    ctl: &Arc<Control>,
    h: &TailnetHandle,
    m: &Arc<Machine>,
    r: &MapRequest,
) -> Result<Arc<Machine>, String> {
    let mut next = (**m).clone();
    if !r.disco_key.is_zero() {
        next.data.disco_key = r.disco_key;
    }
    if !r.endpoints.is_empty() || r.stream {
        next.data.endpoints = r.endpoints.clone();
    }
    if let Some(hi) = &r.hostinfo {
        next.data.hostinfo = hi.clone();
    }
    next.data.cap = i64::from(r.version);
    if next == **m {
        return Ok(m.clone());
    }
    let routes_before = routes_of(Some(&m.data.hostinfo)).unwrap_or_default();
    let routes_after = routes_of(Some(&next.data.hostinfo)).map_err(|e| e.to_string())?;
    let saved = ctl.save(next).await.map_err(|e| e.to_string())?;
    let patch = Patch {
        node: m.node.clone(),
        endpoints: (saved.data.endpoints != m.data.endpoints).then(|| saved.data.endpoints.clone()),
        disco_key: (saved.data.disco_key != m.data.disco_key).then_some(saved.data.disco_key),
        ..Patch::default()
    };
    if patch.endpoints.is_some() || patch.disco_key.is_some() {
        ctl.emit(&m.tailnet, patch);
    }
    if routes_before != routes_after {
        let p = NodePatch {
            routable_ips: Some(routes_after),
            ..NodePatch::default()
        };
        h.write(WriteOp::PatchNode(m.node.clone(), p))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(saved)
}
