//! A control-protocol client speaking the same stack as Tailscale's (`/key`, the `/ts2021`
//! upgrade, Noise, HTTP/2, register, zstd map stream). netmap uses it in tests and in the
//! fan-out benchmark; it has no data plane.

use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::codec::{decode_payload, split_frames};
use crate::keys::{DiscoPublic, MachineKeyPair, MachinePublic, NodePublic};
use crate::noise::{Initiator, RESPONSE_LEN};
use crate::tailcfg::{KeyResponse, MapRequest, MapResponse, RegisterRequest, RegisterResponse};
use crate::{ControlError, CAPABILITY_VERSION};

fn http(e: impl std::fmt::Display) -> ControlError {
    ControlError::Http(e.to_string())
}

/// 32 random bytes.
pub fn random_key() -> Result<[u8; 32], ControlError> {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).map_err(|e| ControlError::Handshake(format!("randomness: {e}")))?;
    Ok(k)
}

async fn http1_conn(addr: SocketAddr) -> Result<http1::SendRequest<Empty<Bytes>>, ControlError> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(http)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// `GET /key`: the server's Noise public key.
pub async fn fetch_server_key(addr: SocketAddr) -> Result<MachinePublic, ControlError> {
    let mut sender = http1_conn(addr).await?;
    let req = Request::get(format!("/key?v={CAPABILITY_VERSION}"))
        .header("host", addr.to_string())
        .body(Empty::new())
        .map_err(http)?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(http(format!("/key: status {}", resp.status())));
    }
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    let k: KeyResponse =
        serde_json::from_slice(&body).map_err(|e| ControlError::Codec(e.to_string()))?;
    Ok(k.public_key)
}

/// An established control connection (Noise + HTTP/2).
#[derive(Debug)]
pub struct Connection {
    sender: http2::SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Upgrades a new TCP connection to `addr` to ts2021 and starts HTTP/2 over it.
    pub async fn connect(
        addr: SocketAddr,
        machine: &MachineKeyPair,
        server: MachinePublic,
    ) -> Result<Connection, ControlError> {
        let (init, initiator) = Initiator::start(machine, server, CAPABILITY_VERSION)?;
        let mut sender = http1_conn(addr).await?;
        let req = Request::post("/ts2021")
            .header("host", addr.to_string())
            .header("upgrade", "tailscale-control-protocol")
            .header("connection", "upgrade")
            .header(
                "x-tailscale-handshake",
                base64::engine::general_purpose::STANDARD.encode(&init),
            )
            .body(Empty::new())
            .map_err(http)?;
        let resp = sender.send_request(req).await.map_err(http)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
            return Err(http(format!(
                "/ts2021: status {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(http)?;
        let mut io = TokioIo::new(upgraded);
        let mut head = [0u8; 3];
        io.read_exact(&mut head).await?;
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let mut msg = head.to_vec();
        if len + 3 > RESPONSE_LEN && head[0] != 3 {
            return Err(ControlError::Handshake(format!("response length {len}")));
        }
        let mut rest = vec![0u8; len];
        io.read_exact(&mut rest).await?;
        msg.extend_from_slice(&rest);
        let established = initiator.finish(&msg)?;
        let stream = established.into_stream(io);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender })
    }

    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<Incoming>, ControlError> {
        self.sender.ready().await.map_err(http)?;
        let req = Request::post(format!("https://control{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(http)?;
        self.sender.send_request(req).await.map_err(http)
    }

    /// `POST /machine/register`.
    pub async fn register(
        &mut self,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Codec(e.to_string()))?;
        let resp = self.post("/machine/register", body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        if status != StatusCode::OK {
            return Err(http(format!(
                "/machine/register: status {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| ControlError::Codec(e.to_string()))
    }

    /// `POST /machine/map`: the response stream.
    pub async fn map(&mut self, req: &MapRequest) -> Result<MapStream, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Codec(e.to_string()))?;
        let resp = self.post("/machine/map", body).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
            return Err(http(format!(
                "/machine/map: status {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        Ok(MapStream {
            body: resp.into_body(),
            buf: Vec::new(),
            pending: std::collections::VecDeque::new(),
            zstd: req.compress == "zstd",
        })
    }
}

/// The messages of a map response, in order.
#[derive(Debug)]
pub struct MapStream {
    body: Incoming,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Vec<u8>>,
    zstd: bool,
}

impl MapStream {
    /// The next message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<MapResponse>, ControlError> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return decode_payload(&p, self.zstd).map(Some);
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(http(e)),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                        self.pending.extend(split_frames(&mut self.buf)?);
                    }
                }
            }
        }
    }
}

/// A node's identity as the client holds it.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Machine key pair (the Noise static key).
    pub machine: MachineKeyPair,
    /// Node key (public half only: the test client has no WireGuard).
    pub node_key: NodePublic,
    /// Disco key (public half only).
    pub disco_key: DiscoPublic,
}

impl Identity {
    /// Fresh random keys.
    pub fn generate() -> Result<Identity, ControlError> {
        Ok(Identity {
            machine: MachineKeyPair::generate()?,
            node_key: NodePublic(random_key()?),
            disco_key: DiscoPublic(random_key()?),
        })
    }

    /// A register request with a pre-auth key and a hostname.
    pub fn register_request(&self, auth_key: &str, hostname: &str) -> RegisterRequest {
        RegisterRequest {
            version: u32::from(CAPABILITY_VERSION),
            node_key: self.node_key,
            auth: Some(crate::tailcfg::RegisterAuth {
                auth_key: auth_key.to_string(),
            }),
            hostinfo: Some(serde_json::json!({"Hostname": hostname, "OS": "linux"})),
            ..RegisterRequest::default()
        }
    }

    /// A streaming map request (zstd, keep-alives).
    pub fn map_request(&self, hostname: &str) -> MapRequest {
        MapRequest {
            version: u32::from(CAPABILITY_VERSION),
            compress: "zstd".into(),
            keep_alive: true,
            node_key: self.node_key,
            disco_key: self.disco_key,
            stream: true,
            hostinfo: Some(serde_json::json!({"Hostname": hostname, "OS": "linux"})),
            endpoints: vec!["192.0.2.1:41641".into()],
            ..MapRequest::default()
        }
    }
}
