//! `netmap serve` limits over real HTTP on 127.0.0.1: slowloris cut off by the header-read
//! timeout while normal requests succeed, idle keep-alive connections closed, per-key rate limit
//! (429), the open-stream cap, and SIGTERM draining.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serve_common::*;

/// Trickles a request head one header line every 100 ms; returns how long until the server
/// closed the connection (None if it was still open after `limit`).
fn slowloris(addr: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n");
    let mut buf = [0u8; 512];
    while t0.elapsed() < limit {
        if s.write_all(b"X-Slow: a\r\n").is_err() {
            return Some(t0.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {} // response bytes (a 408, say): read on until EOF
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

#[test]
fn slowloris_is_cut_off_while_normal_requests_succeed() {
    let (s, _dir, _admin) = start_with_admin("slowloris", &[("NETMAP_HEADER_READ_TIMEOUT", "1s")]);
    let addr = s.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let normal = {
        let (stop, ok) = (stop.clone(), ok.clone());
        std::thread::spawn(move || {
            let mut failures = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = request(addr, "GET", "/health", None, None);
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            failures
        })
    };
    let attackers: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || slowloris(addr, Duration::from_secs(6))))
        .collect();
    for a in attackers {
        let cut = a.join().unwrap().expect("slow client was not disconnected");
        assert!(cut >= Duration::from_millis(900), "cut too early: {cut:?}");
        assert!(cut <= Duration::from_millis(2500), "cut too late: {cut:?}");
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(normal.join().unwrap(), 0, "a normal request failed");
    assert!(ok.load(Ordering::SeqCst) >= 10);
    let m = request(addr, "GET", "/metrics", None, None).text();
    assert!(m.contains("netmap_connection_timeouts_total"));
}

#[test]
fn idle_keepalive_connections_are_closed() {
    let (s, _dir, _admin) = start_with_admin(
        "idle",
        &[
            ("NETMAP_IDLE_TIMEOUT", "300ms"),
            ("NETMAP_HEADER_READ_TIMEOUT", "10s"),
        ],
    );
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let (status, headers) = read_head(&mut r).unwrap();
    assert_eq!(status, 200);
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .unwrap()
        .1
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    // Kept alive, then idle: closed after ~300 ms (well before the 10 s header timeout).
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0);
    let idle = t0.elapsed();
    assert!(
        idle < Duration::from_secs(3),
        "idle connection kept {idle:?}"
    );
}

#[test]
fn rate_limit_stream_cap_and_sigterm() {
    let (mut s, dir, admin) = start_with_admin(
        "limits",
        &[
            ("NETMAP_RATE_PER_SEC", "2"),
            ("NETMAP_RATE_BURST", "10"),
            ("NETMAP_MAX_STREAMS", "2"),
        ],
    );
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/t", k, None).status, 201);
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/t/users/u",
            k,
            Some(r#"{"email":"u@t.example"}"#)
        )
        .status,
        201
    );
    assert_eq!(
        s.req("PUT", "/v1/tailnets/t/nodes/n", k, Some(r#"{"user":"u"}"#))
            .status,
        201
    );
    let other = create_key(&dir.0, Some("t"), None);

    // Streams: two may be open; the third gets 503; closing one frees its slot.
    let path = "/v1/tailnets/t/nodes/n/netmap?stream=true";
    let mut a = Stream::open(s.addr, path, &other).unwrap();
    assert_eq!(a.next().unwrap()["type"], "full");
    let mut b = Stream::open(s.addr, path, &other).unwrap();
    assert_eq!(b.next().unwrap()["type"], "full");
    let r = Stream::open(s.addr, path, &other).err().unwrap();
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("too many open streams"));
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = loop {
        match Stream::open(s.addr, path, &other) {
            Ok(c) => break c,
            Err(r) if r.status == 503 && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(r) => panic!("stream slot not freed: {}", r.status),
        }
    };
    assert_eq!(c.next().unwrap()["type"], "full");

    // Rate limit: the admin key's burst of 10 runs out (429 with Retry-After); the other key is
    // unaffected.
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(s.req("GET", "/v1/tailnets", k, None));
    }
    let limited: Vec<_> = statuses.iter().filter(|r| r.status == 429).collect();
    assert!(
        limited.len() >= 5,
        "expected 429s, got {:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(limited[0].header("retry-after").is_some());
    assert!(limited[0].json()["error"]
        .as_str()
        .unwrap()
        .contains("rate limit"));
    assert_eq!(
        s.req("GET", "/v1/tailnets/t", Some(&other), None).status,
        200
    );

    // SIGTERM: open streams end, the server drains and exits 0.
    let st = s
        .terminate(Duration::from_secs(10))
        .expect("server did not exit on SIGTERM");
    assert!(st.success(), "{st:?}");
    b.set_timeout(Duration::from_secs(5));
    while b.next().is_some() {}
    while c.next().is_some() {}
}
