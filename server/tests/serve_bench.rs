//! Load measurements of `netmap serve` on loopback (ignored by default; bounded in time and
//! request count). Run on a generated tailnet:
//!
//! ```sh
//! python3 ../shared/bench/gen_tailnet.py /tmp/t10k --nodes 10000 --policy ops
//! NETMAP_BENCH_TAILNET=/tmp/t10k cargo test --release -p netmap-server --test serve_bench \
//!     -- --ignored --nocapture
//! ```
//!
//! Prints: bulk import time, `GET .../netmap` median/p90/p99 latency and requests/s with
//! keep-alive client threads, the time from a `PUT node` to its delta arriving on N open
//! streams, restart time until a full view is served, and the server's peak RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

/// A keep-alive connection.
struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn new(addr: std::net::SocketAddr) -> Conn {
        let w = TcpStream::connect(addr).unwrap();
        w.set_nodelay(true).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = BufReader::with_capacity(1 << 20, w.try_clone().unwrap());
        Conn { w, r }
    }

    fn get(&mut self, path: &str, key: &str) -> (u16, usize) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n");
        self.w.write_all(req.as_bytes()).unwrap();
        let (status, headers) = read_head(&mut self.r).unwrap();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        (status, len)
    }
}

#[test]
#[ignore = "load measurement; run explicitly with --release"]
fn bench_10k() {
    let Ok(src) = std::env::var("NETMAP_BENCH_TAILNET") else {
        eprintln!("set NETMAP_BENCH_TAILNET to a gen_tailnet.py output directory");
        return;
    };
    let readers = env_or("NETMAP_BENCH_CLIENTS", 2);
    let secs = env_or("NETMAP_BENCH_SECS", 10);
    let n_streams = env_or("NETMAP_BENCH_STREAMS", 1000);
    let policy = std::fs::read_to_string(format!("{src}/policy.hujson")).unwrap();
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{src}/state.json")).unwrap())
            .unwrap();
    let names: Vec<String> = state["nodes"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    state["policy"] = json!(policy);
    let import = state.to_string();

    let dir = TempDir::new("bench");
    let key = create_key(&dir.0, None, None);
    let env = [
        ("NETMAP_RATE_PER_SEC", "1000000000"),
        ("NETMAP_RATE_BURST", "1000000000"),
        ("NETMAP_MAX_STREAMS", "100000"),
        ("NETMAP_MAX_CONNECTIONS", "100000"),
        ("NETMAP_STREAM_KEEPALIVE", "30s"),
    ];
    let mut s = Server::start(&dir.0, &env);
    assert_eq!(
        s.req("PUT", "/v1/tailnets/bench", Some(&key), None).status,
        201
    );
    let t0 = Instant::now();
    let r = s.req("PUT", "/v1/tailnets/bench/state", Some(&key), Some(&import));
    assert_eq!(r.status, 200, "{}", r.text());
    println!(
        "import: {} nodes, {:.2} MB body, {:.0} ms (parse + engine build + one SQLite commit)",
        names.len(),
        import.len() as f64 / 1e6,
        ms(t0.elapsed())
    );

    // GET netmap under load: keep-alive clients, random nodes.
    let lat = Arc::new(Mutex::new(Vec::new()));
    let bytes = Arc::new(Mutex::new(0usize));
    let deadline = Instant::now() + Duration::from_secs(secs as u64);
    let threads: Vec<_> = (0..readers)
        .map(|t| {
            let (lat, bytes, names, key) = (lat.clone(), bytes.clone(), names.clone(), key.clone());
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut c = Conn::new(addr);
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ t as u64;
                let (mut l, mut b) = (Vec::new(), 0);
                while Instant::now() < deadline && l.len() < 200_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = &names[(x % names.len() as u64) as usize];
                    let t = Instant::now();
                    let (st, len) = c.get(&format!("/v1/tailnets/bench/nodes/{n}/netmap"), &key);
                    l.push(t.elapsed());
                    assert_eq!(st, 200);
                    b += len;
                }
                lat.lock().unwrap().extend(l);
                *bytes.lock().unwrap() += b;
            })
        })
        .collect();
    let start = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    let wall = start.elapsed();
    let mut l = lat.lock().unwrap().clone();
    l.sort();
    println!(
        "GET netmap ({readers} keep-alive clients, {secs} s, random nodes): {} requests, {:.0} req/s, \
         median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, mean body {:.0} KB",
        l.len(),
        l.len() as f64 / wall.as_secs_f64(),
        ms(pct(&l, 0.5)),
        ms(pct(&l, 0.9)),
        ms(pct(&l, 0.99)),
        *bytes.lock().unwrap() as f64 / l.len() as f64 / 1000.0
    );

    // N open streams, then one PUT that touches every node.
    let ready = Arc::new(Barrier::new(n_streams + 1));
    let go = Arc::new(Barrier::new(n_streams + 1));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let t_open = Instant::now();
    let readers: Vec<_> = names
        .iter()
        .take(n_streams)
        .map(|n| {
            let (ready, go, arrivals, key) =
                (ready.clone(), go.clone(), arrivals.clone(), key.clone());
            let path = format!("/v1/tailnets/bench/nodes/{n}/netmap?stream=true");
            let addr = s.addr;
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut st =
                        Stream::open(addr, &path, &key).unwrap_or_else(|r| panic!("{}", r.status));
                    st.set_timeout(Duration::from_secs(120));
                    assert_eq!(st.next().unwrap()["type"], "full");
                    ready.wait();
                    go.wait();
                    let line = st.next_event().unwrap();
                    let at = Instant::now();
                    assert_eq!(line["type"], "delta", "{line}");
                    arrivals
                        .lock()
                        .unwrap()
                        .push((at, line["seq"].as_u64().unwrap()));
                })
                .unwrap()
        })
        .collect();
    ready.wait();
    println!(
        "{n_streams} streams open (full views sent) in {:.0} ms",
        ms(t_open.elapsed())
    );
    go.wait();
    let body = json!({"hostname": "mon-new", "tags": ["tag:monitoring", "tag:prod"]}).to_string();
    let t_put = Instant::now();
    let r = s.req(
        "PUT",
        "/v1/tailnets/bench/nodes/mon-new",
        Some(&key),
        Some(&body),
    );
    let put_ms = ms(t_put.elapsed());
    assert_eq!(r.status, 201, "{}", r.text());
    let seq = r.seq();
    for t in readers {
        t.join().unwrap();
    }
    let mut d: Vec<Duration> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(at, sq)| {
            assert_eq!(*sq, seq);
            at.duration_since(t_put)
        })
        .collect();
    d.sort();
    println!(
        "PUT node touching every node: acknowledged in {put_ms:.0} ms; delta on {} streams: \
         first {:.0} ms, median {:.0} ms, last {:.0} ms after the PUT was sent",
        d.len(),
        ms(d[0]),
        ms(pct(&d, 0.5)),
        ms(d[d.len() - 1])
    );
    let m = s.req("GET", "/metrics", None, None).text();
    for l in m.lines().filter(|l| {
        l.starts_with("netmap_change_apply_seconds_sum")
            || l.starts_with("netmap_change_apply_seconds_count")
            || l.starts_with("netmap_store_commit_seconds_sum")
            || l.starts_with("netmap_store_commit_seconds_count")
    }) {
        println!("  {l}");
    }
    if let Some(kib) = peak_rss_kib(s.child.id()) {
        println!("server peak RSS: {:.0} MiB", kib as f64 / 1024.0);
    }

    // Restart: SIGTERM, then time a fresh start until it serves a full view.
    let st = s.terminate(Duration::from_secs(30)).unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let s2 = Server::start(&dir.0, &env);
    let listening = t0.elapsed();
    let r = s2.req(
        "GET",
        &format!("/v1/tailnets/bench/nodes/{}/netmap", names[0]),
        Some(&key),
        None,
    );
    assert_eq!(r.status, 200);
    println!(
        "restart with {} nodes: listening after {:.0} ms, first full view served after {:.0} ms",
        names.len() + 1,
        ms(listening),
        ms(t0.elapsed())
    );
}
