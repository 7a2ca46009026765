//! `netmap serve`: a durable, multi-tailnet HTTP server over the engine.
//!
//! - [`store`]: SQLite (WAL) in the data directory: tailnets, policies, users, nodes, MagicDNS
//!   names and primary routers, API keys (hashed).
//! - [`tailnets`]: one engine per tailnet behind a writer thread; a write is answered only once it
//!   is applied and committed; readers use snapshots and never wait for the writer.
//! - [`api`]: routes, bearer auth with tenant scoping, per-key rate limit, concurrency limit.
//! - [`stream`]: NDJSON netmap streams fed by a bounded broadcast of committed writes.
//! - [`net`]: the accept loop (header-read and idle timeouts, connection caps, draining).
//! - [`limits`]: per-key/per-IP caps and request-body reading with a deadline and minimum rate.
//!
//! The API is described in `docs/api.md`.

pub mod api;
pub mod config;
pub mod error;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod store;
pub mod stream;
pub mod tailnets;

use std::io::Write;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use config::{Config, LogFormat};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Stored tailnets could not be loaded.
    #[error(transparent)]
    Load(#[from] tailnets::LoadError),
    /// Listening or the runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The log filter is invalid.
    #[error("invalid log level: {0}")]
    Log(String),
    /// A background task failed.
    #[error("task failed: {0}")]
    Task(String),
}

/// Sets up logging to stderr.
pub fn init_logging(level: &str, format: LogFormat) -> Result<(), ServeError> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| ServeError::Log(format!("{level:?}: {e}")))?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let r = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
    r.map_err(|e| ServeError::Log(e.to_string()))
}

/// Runs the server until SIGTERM/SIGINT.
pub fn run(cfg: Config) -> Result<(), ServeError> {
    init_logging(&cfg.log_level, cfg.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("netmap-serve")
        .build()?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> Result<(), ServeError> {
    let t0 = Instant::now();
    // One server per data directory: a second one would hand out the same addresses and
    // interleave its writes with ours.
    let lock = store::DirLock::acquire(&cfg.data)?;
    // Before opening the store for writing (which would fold what is left of the WAL into the
    // database): are all acknowledged commits there?
    let accepted_loss = match store::Store::check_commits(&cfg.data) {
        Ok(()) => false,
        Err(e @ store::StoreError::LostCommits { .. }) if cfg.accept_data_loss => {
            tracing::error!(error = %e, "starting anyway (--accept-data-loss)");
            true
        }
        Err(e) => return Err(e.into()),
    };
    let store = Arc::new(store::Store::open(&cfg.data)?);
    if accepted_loss {
        store.reset_marker()?;
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = {
        let (store, metrics) = (store.clone(), metrics.clone());
        let limits = tailnets::RegistryLimits {
            stream_buffer: cfg.limits.stream_buffer,
            write_queue: cfg.limits.write_queue,
            max_nodes: cfg.limits.max_nodes_per_tailnet,
        };
        tokio::task::spawn_blocking(move || tailnets::Registry::load(store, metrics, limits))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??
    };
    let registry = Arc::new(registry);
    tracing::info!(
        db = %store.path().display(),
        tailnets = registry.list().len(),
        broken = registry.list_broken().len(),
        lock = %lock.path().display(),
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "state loaded"
    );
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    // A plain line on stdout for scripts and tests (the port may have been chosen by the OS).
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "netmap serve: listening on {addr}");
        let _ = out.flush();
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop_tx.send(true);
        // Keep the sender alive so receivers see `true`, not a closed channel.
        std::future::pending::<()>().await;
    });
    let l = &cfg.limits;
    let auth = Arc::new(keys::Authenticator::new(
        store.clone(),
        Some((l.auth_rate_per_ip, l.auth_burst_per_ip)),
    ));
    let poller = tokio::spawn(poll_keys(auth.clone(), stop_rx.clone()));
    let app = api::App::new(api::AppInner {
        registry: registry.clone(),
        auth,
        rate: keys::RateLimiter::new(l.rate_per_sec, l.rate_burst),
        metrics: metrics.clone(),
        limits: l.clone(),
        concurrency: Arc::new(Semaphore::new(l.max_concurrency)),
        streams: Arc::new(AtomicUsize::new(0)),
        key_requests: limits::Caps::new(l.max_requests_per_key),
        key_streams: limits::Caps::new(l.max_streams_per_key),
        ip_streams: limits::Caps::new(l.max_streams_per_ip),
        shutdown: stop_rx.clone(),
    });
    let control = {
        let (store, registry, stop) = (store.clone(), registry.clone(), stop_rx.clone());
        let keepalive = cfg.limits.stream_keepalive;
        tokio::task::spawn_blocking(move || {
            crate::control::Control::load(store, registry, keepalive, stop)
        })
        .await
        .map_err(|e| ServeError::Task(e.to_string()))?
        .map_err(|e| ServeError::Task(format!("control state: {e}")))?
    };
    let control = Arc::new(control);
    control.mark_all_offline().await;
    tracing::info!(machines = control.machine_count(), key = %control.key.public, "control protocol ready");
    let router = api::router(app).merge(crate::control::router(control));
    net::serve(listener, router, cfg.limits.clone(), metrics, stop_rx).await;
    poller.abort();
    // Fold the WAL into the database file: a clean stop leaves nothing that depends on it.
    let checkpoint = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.checkpoint()).await
    };
    match checkpoint {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "final checkpoint failed"),
        Err(e) => tracing::warn!(error = %e, "final checkpoint task failed"),
    }
    tracing::info!("stopped");
    drop(lock);
    Ok(())
}

/// Every second: revoked or expired keys leave the auth cache and their open streams end.
async fn poll_keys(auth: Arc<keys::Authenticator>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let a = auth.clone();
        match tokio::task::spawn_blocking(move || a.poll()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "API key poll failed"),
            Err(e) => tracing::warn!(error = %e, "API key poll task failed"),
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
