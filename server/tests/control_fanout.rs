//! Fan-out benchmark (ignored by default; run with
//! `cargo test --release -p netmap-server --test control_fanout -- --ignored --nocapture`):
//! N in-process protocol clients (netmap-control's client: Noise, HTTP/2, zstd map frames)
//! register with one `netmap serve` and hold map streams; then a policy edit and a node
//! change must reach every one of them. Prints the time until the last client saw each
//! change, and the server's RSS per connected client. `NETMAP_FANOUT_CLIENTS` sets N
//! (default 1000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netmap_control::client::{fetch_server_key, Connection, Identity};
use serve_common::{create_key, Server, TempDir};
use tokio::sync::Semaphore;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

const POLICY_A: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
const POLICY_B: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22,443"]}]}"#;

#[test]
#[ignore = "benchmark: 1,000 protocol clients; run explicitly"]
fn fanout_to_many_protocol_clients() {
    let n: usize = std::env::var("NETMAP_FANOUT_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let tmp = TempDir::new("fanout");
    let data = tmp.0.join("data");
    let key = create_key(&data, None, None);
    let server = Server::start(&data, &[("NETMAP_LOG_LEVEL", "error")]);
    let k = Some(key.as_str());
    assert_eq!(server.req("PUT", "/v1/tailnets/big", k, None).status, 201);
    assert_eq!(
        server
            .req(
                "PUT",
                "/v1/tailnets/big/users/u",
                k,
                Some(r#"{"email":"u@big.example"}"#)
            )
            .status,
        201
    );
    assert_eq!(
        server
            .req("PUT", "/v1/tailnets/big/policy", k, Some(POLICY_A))
            .status,
        200
    );
    let r = server.req(
        "POST",
        "/v1/tailnets/big/preauthkeys",
        k,
        Some(r#"{"user":"u","reusable":true}"#),
    );
    let auth = r.json()["key"].as_str().unwrap().to_string();
    let pid = server.child.id();
    let rss0 = rss_kib(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = server.addr;
    let ready = Arc::new(AtomicUsize::new(0));
    let saw_filter = Arc::new(AtomicUsize::new(0));
    let saw_probe = Arc::new(AtomicUsize::new(0));
    let (last_filter, last_probe) = (
        Arc::new(std::sync::Mutex::new(None::<Instant>)),
        Arc::new(std::sync::Mutex::new(None::<Instant>)),
    );
    let t_connect = Instant::now();
    rt.block_on(async {
        let server_key = fetch_server_key(addr).await.unwrap();
        let gate = Arc::new(Semaphore::new(32));
        for i in 0..n {
            let permit = gate.clone().acquire_owned().await.unwrap();
            let (auth, ready, saw_filter, saw_probe, lf, lp) = (
                auth.clone(),
                ready.clone(),
                saw_filter.clone(),
                saw_probe.clone(),
                last_filter.clone(),
                last_probe.clone(),
            );
            tokio::spawn(async move {
                let id = Identity::generate().unwrap();
                let host = format!("c{i}");
                let mut conn = Connection::connect(addr, &id.machine, server_key)
                    .await
                    .unwrap();
                let r = conn
                    .register(&id.register_request(&auth, &host))
                    .await
                    .unwrap();
                assert!(r.machine_authorized, "{}", r.error);
                let mut stream = conn.map(&id.map_request(&host)).await.unwrap();
                let first = stream.next().await.unwrap().unwrap();
                assert!(first.node.is_some() && first.packet_filter.is_some());
                ready.fetch_add(1, Ordering::SeqCst);
                drop(permit);
                while let Ok(Some(m)) = stream.next().await {
                    if m.packet_filter.as_ref().is_some_and(|f| {
                        f.iter()
                            .any(|r| r.dst_ports.iter().any(|d| d.ports.first == 22))
                    }) {
                        saw_filter.fetch_add(1, Ordering::SeqCst);
                        *lf.lock().unwrap() = Some(Instant::now());
                    }
                    if m.peers_changed.iter().any(|p| p.stable_id == "probe") {
                        saw_probe.fetch_add(1, Ordering::SeqCst);
                        *lp.lock().unwrap() = Some(Instant::now());
                    }
                }
            });
        }
        while ready.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let connect_s = t_connect.elapsed().as_secs_f64();
    // Let registrations' deltas drain before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let rss1 = rss_kib(pid);
    let wait_all =
        |count: &AtomicUsize, last: &std::sync::Mutex<Option<Instant>>, t0: Instant| -> Duration {
            let deadline = t0 + Duration::from_secs(60);
            while count.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {n} clients saw the change",
                    count.load(Ordering::SeqCst)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            last.lock().unwrap().map(|t| t - t0).unwrap_or_default()
        };
    let t0 = Instant::now();
    assert_eq!(
        server
            .req("PUT", "/v1/tailnets/big/policy", k, Some(POLICY_B))
            .status,
        200
    );
    let policy = wait_all(&saw_filter, &last_filter, t0);
    let t1 = Instant::now();
    assert_eq!(
        server
            .req(
                "PUT",
                "/v1/tailnets/big/nodes/probe",
                k,
                Some(r#"{"user":"u"}"#)
            )
            .status,
        201
    );
    let node = wait_all(&saw_probe, &last_probe, t1);
    let rss2 = rss_kib(pid);
    eprintln!(
        "control_fanout: {n} clients connected in {connect_s:.1} s; policy edit at all {n} in {} ms; node change at all {n} in {} ms; server RSS {} MiB idle → {} MiB with {n} streams ({:.1} KiB per client; {} MiB after the changes)",
        policy.as_millis(),
        node.as_millis(),
        rss0 / 1024,
        rss1 / 1024,
        (rss1.saturating_sub(rss0)) as f64 / n as f64,
        rss2 / 1024,
    );
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(server);
}
