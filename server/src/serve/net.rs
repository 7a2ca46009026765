//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout (slowloris
//! cut-off, also bounding the wait between kept-alive requests), an idle timeout, caps on open
//! connections (server-wide and per client IP), and graceful draining on shutdown. Request
//! bodies are not read here: the API reads them with a deadline and a minimum rate before a
//! request takes a concurrency slot (see `api`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::config::Limits;
use super::limits::{CapGuard, Caps};
use super::metrics::{Limited, Metrics};

/// Per-connection facts handed to handlers (as a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    active: Arc<AtomicUsize>,
}

impl ConnInfo {
    /// Marks the connection busy until the guard is dropped (used by streams).
    pub fn busy(&self) -> ActiveGuard {
        ActiveGuard::new(self.active.clone())
    }
}

/// Keeps a connection counted as busy (not idle) while alive.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    fn new(a: Arc<AtomicUsize>) -> ActiveGuard {
        a.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(a)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A TCP stream that records when bytes last moved.
struct Tracked {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Tracked {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Admission of new connections: the server-wide cap and the per-client-IP cap.
struct Admission {
    all: Arc<Semaphore>,
    per_ip: Caps<std::net::IpAddr>,
}

/// What an admitted connection holds until it closes.
struct Admitted {
    _all: tokio::sync::OwnedSemaphorePermit,
    _ip: CapGuard<std::net::IpAddr>,
}

impl Admission {
    fn new(limits: &Limits) -> Admission {
        Admission {
            all: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: Caps::new(limits.max_connections_per_ip),
        }
    }

    /// Admits a connection from `peer`, or says which cap refused it.
    fn admit(&self, peer: &SocketAddr) -> Result<Admitted, &'static str> {
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| "max_connections")?;
        let ip = self
            .per_ip
            .try_take(&peer.ip())
            .ok_or("max_connections_per_ip")?;
        Ok(Admitted { _all: all, _ip: ip })
    }
}

/// Accepts and serves connections until `shutdown` turns true, then drains them (at most
/// `limits.drain_timeout`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = Admission::new(&limits);
    let limits = Arc::new(limits);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match admission.admit(&peer) {
                    Ok(p) => p,
                    Err(cap) => {
                        metrics.connections_refused.inc();
                        if cap == "max_connections_per_ip" {
                            metrics.limited(Limited::IpConnections);
                        }
                        tracing::debug!(%peer, cap, "connection refused");
                        drop(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (router, limits, metrics, shutdown) =
                    (router.clone(), limits.clone(), metrics.clone(), shutdown.clone());
                tasks.spawn(async move {
                    serve_conn(stream, peer, router, &limits, &metrics, shutdown).await;
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tracing::info!(connections = tasks.len(), "draining");
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            "drain timeout; closing remaining connections"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    metrics: &Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    metrics.connections.inc();
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let active = Arc::new(AtomicUsize::new(0));
    let io = TokioIo::new(Tracked {
        inner: stream,
        last: last.clone(),
        epoch,
    });
    let info = ConnInfo {
        peer,
        active: active.clone(),
    };
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let guard = info.busy();
        let router = router.clone();
        async move {
            let resp = router.oneshot(req.map(Body::new)).await;
            drop(guard);
            Ok::<_, Infallible>(match resp {
                Ok(r) => r,
                Err(e) => match e {},
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(256 * 1024);
    // with_upgrades: `/ts2021` (the Tailscale control protocol) upgrades the connection.
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let check = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut tick = tokio::time::interval(check);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        metrics.timeouts.inc();
                        tracing::debug!(%peer, "header read timeout; connection closed");
                    } else {
                        tracing::debug!(%peer, error = %e, "connection error");
                    }
                }
                break;
            }
            _ = shutdown.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick(), if !closing => {
                let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                if active.load(Ordering::Acquire) == 0
                    && now.saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms
                {
                    metrics.timeouts.inc();
                    tracing::debug!(%peer, "idle timeout; connection closed");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    metrics.connections.dec();
}
