//! Issue 11 figures, measured on loopback with real processes (ignored by default; bounded in
//! time and connection count):
//!
//! ```sh
//! cargo test --release -p netmap-server --test serve_attack_bench -- --ignored --nocapture --test-threads 1
//! python3 ../shared/bench/gen_tailnet.py /tmp/t60k --nodes 60000
//! NETMAP_BENCH_TAILNET=/tmp/t60k cargo test --release -p netmap-server --test serve_attack_bench \
//!     -- --ignored --nocapture import_peak_rss
//! ```
//!
//! - `slow_body_attack`: N connections (`NETMAP_BENCH_CONNS`, 530) of one tenant key from
//!   127.0.0.2, opened `NETMAP_BENCH_PACE_MS` (8) apart so that they stay under the key's rate
//!   limit, each sending a request head with `Content-Length: 1000` and one byte; meanwhile
//!   the latency of `/health` and of another tenant's `GET` from 127.0.0.1, against the same
//!   without the attack.
//! - `bad_key_flood`: client threads from 127.0.0.2 sending unknown keys as fast as they can;
//!   meanwhile the p50 of other clients' requests (127.0.0.1, a valid key), against the same
//!   without the flood.
//! - `import_peak_rss`: the server's peak RSS (VmHWM) after a bulk import of a generated
//!   tailnet, with the default policy and with the generated one.
//!
//! `NETMAP_TEST_BIN=path/to/netmap` measures another build (e.g. one without the fixes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::io::{BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

/// Sequential requests for `secs`: latencies and status counts.
fn sample(
    addr: std::net::SocketAddr,
    path: &str,
    key: Option<&str>,
    secs: f64,
) -> (Vec<Duration>, std::collections::BTreeMap<u16, usize>) {
    let mut lat = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        let status = try_request(addr, "GET", path, key, None).map_or(0, |r| r.status);
        lat.push(t.elapsed());
        *statuses.entry(status).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort();
    (lat, statuses)
}

fn report(what: &str, (lat, statuses): &(Vec<Duration>, std::collections::BTreeMap<u16, usize>)) {
    eprintln!(
        "  {what}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms statuses={statuses:?}",
        lat.len(),
        ms(pct(lat, 0.5)),
        ms(pct(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    );
}

fn tenants(s: &Server, dir: &TempDir, admin: &str) -> (String, String) {
    let k = Some(admin);
    for t in ["a", "b"] {
        s.req("PUT", &format!("/v1/tailnets/{t}"), k, None);
    }
    s.req(
        "PUT",
        "/v1/tailnets/b/users/bob",
        k,
        Some(r#"{"email":"bob@b.example"}"#),
    );
    (
        create_key(&dir.0, Some("a"), None),
        create_key(&dir.0, Some("b"), None),
    )
}

#[test]
#[ignore = "load measurement; run explicitly with --release"]
fn slow_body_attack() {
    let conns = env_or("NETMAP_BENCH_CONNS", 530);
    let pace = Duration::from_millis(env_or("NETMAP_BENCH_PACE_MS", 8) as u64);
    let secs = env_or("NETMAP_BENCH_SECS", 8) as f64;
    let (s, dir, admin) = start_with_admin("bench-slowbody", &[]);
    let (key_a, key_b) = tenants(&s, &dir, &admin);
    eprintln!("slow-body attack, {conns} connections, {secs} s windows");
    eprintln!(" without the attack:");
    report("/health", &sample(s.addr, "/health", None, secs / 2.0));
    let other = "/v1/tailnets/b/users";
    report(
        "tenant b GET",
        &sample(s.addr, other, Some(&key_b), secs / 2.0),
    );
    let mut attackers = Vec::new();
    let mut refused = 0;
    for i in 0..conns {
        let Ok(mut c) = connect_from("127.0.0.2", s.addr) else {
            refused += 1;
            continue;
        };
        let head = format!(
            "PUT /v1/tailnets/a/users/u{i} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key_a}\r\nContent-Length: 1000\r\n\r\n{{"
        );
        if c.write_all(head.as_bytes()).is_err() {
            refused += 1;
            continue;
        }
        attackers.push(c);
        std::thread::sleep(pace);
    }
    eprintln!(
        " during the attack ({} connections open, {refused} refused):",
        attackers.len()
    );
    let (h, b) = std::thread::scope(|sc| {
        let h = sc.spawn(|| sample(s.addr, "/health", None, secs));
        let b = sc.spawn(|| sample(s.addr, other, Some(&key_b), secs));
        (h.join().unwrap(), b.join().unwrap())
    });
    report("/health", &h);
    report("tenant b GET", &b);
    // What the attacker's requests got.
    let mut got = std::collections::BTreeMap::new();
    for c in attackers {
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut r = BufReader::new(c);
        let st = read_head(&mut r).map_or(0, |(st, _)| st);
        *got.entry(st).or_insert(0) += 1;
    }
    eprintln!("  attacker's requests answered: {got:?} (0 = no answer yet)");
}

#[test]
#[ignore = "load measurement; run explicitly with --release"]
fn bad_key_flood() {
    let threads = env_or("NETMAP_BENCH_FLOODERS", 4);
    let secs = env_or("NETMAP_BENCH_SECS", 8) as f64;
    let (s, dir, admin) = start_with_admin("bench-badkeys", &[]);
    let (_, key_b) = tenants(&s, &dir, &admin);
    let other = "/v1/tailnets/b/users";
    eprintln!("bad-key flood, {threads} flooding threads from 127.0.0.2, {secs} s windows");
    let quiet = sample(s.addr, other, Some(&key_b), secs / 2.0);
    report("tenant b GET without the flood", &quiet);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, sent, limited, addr) = (stop.clone(), sent.clone(), limited.clone(), s.addr);
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("nmk_{t:08}{i:056}");
                    i += 1;
                    if let Ok(r) =
                        request_from("127.0.0.2", addr, "GET", "/v1/tailnets", Some(&key), None)
                    {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if r.status == 429 {
                            limited.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let busy = sample(s.addr, other, Some(&key_b), secs);
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.join().unwrap();
    }
    report("tenant b GET during the flood", &busy);
    let n = sent.load(Ordering::Relaxed);
    eprintln!(
        "  flood: {:.0} requests/s, {} answered 429 (not looked up), {} 401",
        n as f64 / el,
        limited.load(Ordering::Relaxed),
        n - limited.load(Ordering::Relaxed)
    );
    eprintln!(
        "  p50 ratio during/without: {:.2}",
        ms(pct(&busy.0, 0.5)) / ms(pct(&quiet.0, 0.5))
    );
}

#[test]
#[ignore = "load measurement; run explicitly with --release"]
fn import_peak_rss() {
    let Ok(src) = std::env::var("NETMAP_BENCH_TAILNET") else {
        eprintln!("set NETMAP_BENCH_TAILNET to a gen_tailnet.py output directory");
        return;
    };
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{src}/state.json")).unwrap())
            .unwrap();
    let policy = std::fs::read_to_string(format!("{src}/policy.hujson")).unwrap();
    let nodes = state["nodes"].as_object().map_or(0, |m| m.len());
    for with_policy in [false, true] {
        let (s, _dir, admin) = start_with_admin("bench-import", &[]);
        let k = Some(admin.as_str());
        s.req("PUT", "/v1/tailnets/big", k, None);
        let mut doc =
            json!({"users": state["users"], "nodes": state["nodes"], "tailnet": state["tailnet"]});
        if with_policy {
            doc["policy"] = json!(policy);
        }
        let body = doc.to_string();
        let before = peak_rss_kib(s.child.id()).unwrap_or(0);
        let t0 = Instant::now();
        let r = s.req("PUT", "/v1/tailnets/big/state", k, Some(&body));
        let took = t0.elapsed();
        let after = peak_rss_kib(s.child.id()).unwrap_or(0);
        eprintln!(
            "import of {nodes} nodes ({} MB body, {} policy): status {} in {:.1} s; server peak RSS {} MiB (before the import {} MiB)",
            body.len() / 1_000_000,
            if with_policy { "the generated" } else { "the default" },
            r.status,
            took.as_secs_f64(),
            after / 1024,
            before / 1024
        );
    }
}
