//! Issue 11 over real HTTP on loopback: slow request bodies starve nobody (finding 1), revoked
//! and expired keys end their streams (3), every error is JSON, unknown keys are rate limited
//! per client IP, streams are capped per key and per IP, and `max_streams` stays below
//! `max_connections` (8). Client IPs are told apart by binding to 127.0.0.2, 127.0.0.3, ...
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::*;

/// Two tenants, `a` (the attacker's) and `b`, with a scoped key each; `b` has a user.
fn two_tenants(s: &Server, dir: &TempDir, admin: &str) -> (String, String) {
    let k = Some(admin);
    assert_eq!(s.req("PUT", "/v1/tailnets/a", k, None).status, 201);
    assert_eq!(s.req("PUT", "/v1/tailnets/b", k, None).status, 201);
    let r = s.req(
        "PUT",
        "/v1/tailnets/b/users/bob",
        k,
        Some(r#"{"email":"bob@b.example"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    (
        create_key(&dir.0, Some("a"), None),
        create_key(&dir.0, Some("b"), None),
    )
}

#[test]
fn slow_request_bodies_from_one_key_starve_nobody() {
    let (s, dir, admin) = start_with_admin(
        "slowbody",
        &[
            ("NETMAP_MAX_CONCURRENCY", "8"),
            ("NETMAP_QUEUE_TIMEOUT", "1s"),
            ("NETMAP_BODY_READ_TIMEOUT", "2s"),
            ("NETMAP_MAX_REQUESTS_PER_KEY", "16"),
        ],
    );
    let (key_a, key_b) = two_tenants(&s, &dir, &admin);
    // 60 connections from one key (and IP 127.0.0.2): headers, `Content-Length: 1000`, then
    // one byte, then nothing.
    let mut attackers = Vec::new();
    for i in 0..60 {
        let mut c = connect_from("127.0.0.2", s.addr).unwrap();
        let head = format!(
            "PUT /v1/tailnets/a/users/u{i} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key_a}\r\nContent-Length: 1000\r\n\r\n{{"
        );
        c.write_all(head.as_bytes()).unwrap();
        attackers.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile /health, /metrics and the other tenant are answered, and answered at once.
    for _ in 0..10 {
        let h = request(s.addr, "GET", "/health", None, None);
        assert_eq!(h.status, 200, "{}", h.text());
        let m = request(s.addr, "GET", "/metrics", None, None);
        assert_eq!(m.status, 200);
        let b = request(s.addr, "GET", "/v1/tailnets/b/users", Some(&key_b), None);
        assert_eq!(b.status, 200, "{}", b.text());
        let w = request(
            s.addr,
            "PUT",
            "/v1/tailnets/b/users/carol",
            Some(&key_b),
            Some(br#"{"email":"carol@b.example"}"#),
        );
        assert!(matches!(w.status, 200 | 201), "{}", w.text());
    }
    // Every trickling request is answered: 408 once its body is overdue, or 429 at once for
    // those beyond the key's 16 requests in progress; none is left hanging.
    let mut statuses = Vec::new();
    for c in attackers {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(c);
        let (status, headers) = read_head(&mut r).expect("slow request got no answer");
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].is_string(), "{v}");
        statuses.push(status);
    }
    let timed_out = statuses.iter().filter(|&&x| x == 408).count();
    let capped = statuses.iter().filter(|&&x| x == 429).count();
    assert_eq!(timed_out + capped, 60, "{statuses:?}");
    assert!((1..=16).contains(&timed_out), "{statuses:?}");
    let m = request(s.addr, "GET", "/metrics", None, None).text();
    assert!(m.contains("netmap_body_timeouts_total"), "{m}");
    assert!(
        m.contains("netmap_limited_total{reason=\"key_requests\"}"),
        "{m}"
    );
}

#[test]
fn unknown_keys_are_rate_limited_per_client_ip() {
    let (s, dir, admin) = start_with_admin(
        "badkeys",
        &[
            ("NETMAP_AUTH_RATE_PER_IP", "2"),
            ("NETMAP_AUTH_BURST_PER_IP", "5"),
        ],
    );
    let (_, key_b) = two_tenants(&s, &dir, &admin);
    let mut statuses = Vec::new();
    for i in 0..40 {
        let bad = format!("nmk_{i:064}");
        let r = request_from("127.0.0.2", s.addr, "GET", "/v1/tailnets", Some(&bad), None).unwrap();
        assert!(r.json()["error"].is_string());
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
        }
        statuses.push(r.status);
    }
    let limited = statuses.iter().filter(|&&x| x == 429).count();
    assert!(limited >= 30, "unknown keys were not limited: {statuses:?}");
    assert!(
        statuses.iter().all(|&x| x == 401 || x == 429),
        "{statuses:?}"
    );
    // Other clients (another IP; a known key from the same IP) are not affected.
    let r = request(s.addr, "GET", "/v1/tailnets/b", Some(&key_b), None);
    assert_eq!(r.status, 200);
    let r = request_from(
        "127.0.0.2",
        s.addr,
        "GET",
        "/v1/tailnets/b",
        Some(&key_b),
        None,
    )
    .unwrap();
    assert!(matches!(r.status, 200 | 429), "{}", r.text());
    let m = request(s.addr, "GET", "/metrics", None, None).text();
    assert!(
        m.contains("netmap_limited_total{reason=\"bad_keys\"}"),
        "{m}"
    );
}

/// Opens a stream from loopback address `from`; the status and, on 200, the open connection.
fn open_stream(
    from: &str,
    addr: std::net::SocketAddr,
    path: &str,
    key: &str,
) -> (u16, Option<BufReader<std::net::TcpStream>>) {
    let mut c = connect_from(from, addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_request(&mut c, "GET", path, Some(key), None, false).unwrap();
    let mut r = BufReader::new(c);
    let (status, _) = read_head(&mut r).unwrap();
    (status, (status == 200).then_some(r))
}

#[test]
fn streams_are_capped_per_key_and_per_ip() {
    let (s, dir, admin) = start_with_admin(
        "streamcaps",
        &[
            ("NETMAP_MAX_STREAMS_PER_KEY", "2"),
            ("NETMAP_MAX_STREAMS_PER_IP", "3"),
        ],
    );
    let (_, key_b) = two_tenants(&s, &dir, &admin);
    let k = Some(admin.as_str());
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/b/nodes/n",
            k,
            Some(r#"{"user":"bob"}"#)
        )
        .status,
        201
    );
    let key_b2 = create_key(&dir.0, Some("b"), None);
    let path = "/v1/tailnets/b/nodes/n/netmap?stream=true";
    let (_, a1) = open_stream("127.0.0.2", s.addr, path, &key_b);
    let (_, a2) = open_stream("127.0.0.2", s.addr, path, &key_b);
    assert!(a1.is_some() && a2.is_some());
    // A third stream of the same key: 429, whatever the IP.
    assert_eq!(open_stream("127.0.0.3", s.addr, path, &key_b).0, 429);
    // Another key from the same IP: one more fits (3 per IP), then 429.
    let (st, a3) = open_stream("127.0.0.2", s.addr, path, &key_b2);
    assert_eq!(st, 200);
    assert_eq!(open_stream("127.0.0.2", s.addr, path, &key_b2).0, 429);
    // From another IP the second key still has room.
    let (st, _b1) = open_stream("127.0.0.3", s.addr, path, &key_b2);
    assert_eq!(st, 200);
    drop((a1, a2, a3));
}

#[test]
fn max_streams_must_stay_below_max_connections() {
    let dir = TempDir::new("streamsconf");
    let (code, err) = serve_expecting_exit_env(
        &dir.0,
        &[("NETMAP_MAX_STREAMS", "5000")],
        Duration::from_secs(30),
    )
    .expect("the server started with max_streams above max_connections");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("max_streams") && err.contains("max_connections"),
        "{err}"
    );
}

#[test]
fn every_error_is_json() {
    let (s, _dir, admin) = start_with_admin("jsonerrors", &[("NETMAP_MAX_BODY_BYTES", "100")]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/a", k, None).status, 201);
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a [u8]>, u16);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/tailnets/%FF", k, None, 400),
        ("GET", "/v1/tailnets/a/nodes/%FF%FE", k, None, 400),
        ("GET", "/v1/tailnets/a/users/%C3%28", k, None, 400),
        ("PUT", "/v1/tailnets/..", k, None, 400),
        ("GET", "/v1/tailnets", None, None, 401),
        ("GET", "/v1/tailnets", Some("Basic abc"), None, 401),
        ("GET", "/nope", None, None, 404),
        ("DELETE", "/health", None, None, 405),
        ("PUT", "/v1/tailnets/a/users/x", k, Some(b"{"), 400),
        ("PUT", "/v1/tailnets/a/users/x", k, Some(&[b'x'; 200]), 413),
        ("PUT", "/v1/tailnets/a/policy", k, Some(&[0xff, 0xfe]), 400),
    ];
    for (m, p, key, body, status) in cases {
        let r = request(s.addr, m, p, key, body);
        assert_eq!(r.status, status, "{m} {p}: {}", r.text());
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{m} {p}: content-type {:?}: {}",
            r.header("content-type"),
            r.text()
        );
        assert!(r.json()["error"].is_string(), "{m} {p}");
    }
}

#[test]
fn revoked_and_expired_keys_end_their_streams() {
    let (s, dir, admin) = start_with_admin("revoke", &[]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/t", k, None).status, 201);
    let r = s.req(
        "PUT",
        "/v1/tailnets/t/users/u",
        k,
        Some(r#"{"email":"u@t.example"}"#),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        s.req("PUT", "/v1/tailnets/t/nodes/n", k, Some(r#"{"user":"u"}"#))
            .status,
        201
    );
    let path = "/v1/tailnets/t/nodes/n/netmap?stream=true";
    let doomed = create_key(&dir.0, Some("t"), None);
    let mut revoked = Stream::open(s.addr, path, &doomed).unwrap();
    assert_eq!(revoked.next().unwrap()["type"], "full");
    let short = create_key(&dir.0, Some("t"), Some("3s"));
    let mut expiring = Stream::open(s.addr, path, &short).unwrap();
    assert_eq!(expiring.next().unwrap()["type"], "full");

    revoke_key(&dir.0, &doomed);
    let t0 = Instant::now();
    // A write after the revocation must not reach the revoked stream.
    let w = s.req("PUT", "/v1/tailnets/t/nodes/m", k, Some(r#"{"user":"u"}"#));
    assert_eq!(w.status, 201);
    revoked.set_timeout(Duration::from_secs(8));
    let mut lines = Vec::new();
    while let Some(v) = revoked.next() {
        lines.push(v);
    }
    let ended_after = t0.elapsed();
    let last = lines.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "unauthorized", "{lines:?}");
    assert_eq!(last["error"], "API key revoked");
    assert!(
        ended_after < Duration::from_secs(5),
        "ended after {ended_after:?}"
    );
    assert_eq!(
        s.req("GET", "/v1/tailnets/t", Some(&doomed), None).status,
        401
    );

    expiring.set_timeout(Duration::from_secs(10));
    let mut last = Value::Null;
    while let Some(v) = expiring.next() {
        last = v;
    }
    assert_eq!(last["type"], "unauthorized", "{last}");
    assert_eq!(last["error"], "API key expired");
    let m = request(s.addr, "GET", "/metrics", None, None).text();
    assert!(m.contains("netmap_streams_revoked_total 2"), "{m}");
}
