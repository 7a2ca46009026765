//! Issue 11, one validator: `PUT .../state` (import) checks exactly what node and user writes
//! and the CLI's state loader check (findings 6, 9), node/user/tailnet writes close the gaps
//! of finding 7, and the per-tailnet node limit bounds imports (5). A rejected write changes
//! nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::process::{Command, Stdio};

use serde_json::{json, Value};
use serve_common::*;

fn base_state() -> Value {
    json!({
        "users": [
            {"id": 1, "name": "alice", "email": "alice@acme.example"},
            {"id": 2, "name": "bob", "email": "bob@acme.example"}
        ],
        "nodes": {
            "a1": {"hostname": "a1", "user": "alice", "tags": [], "ipv4": "100.64.0.1",
                   "ipv6": "fd7a:115c:a1e0::1", "routable_ips": [], "approved_routes": [],
                   "created": "2025-01-06T09:00:00Z"},
            "web": {"hostname": "web", "tags": ["tag:web"], "ipv4": "100.64.0.2",
                    "ipv6": "fd7a:115c:a1e0::2", "routable_ips": ["10.1.0.0/16"],
                    "approved_routes": [], "created": "2025-01-06T10:00:00Z"}
        },
        "tailnet": {"name": "acme.example"}
    })
}

/// The state documents of finding 6 (and 9), each with what the error must name.
fn bad_states() -> Vec<(&'static str, Value, &'static [&'static str])> {
    let mut out: Vec<(&'static str, Value, &'static [&'static str])> = Vec::new();
    let mut with =
        |what: &'static str, f: &dyn Fn(&mut Value), needles: &'static [&'static str]| {
            let mut s = base_state();
            f(&mut s);
            out.push((what, s, needles));
        };
    with(
        "duplicate IPv4",
        &|s| s["nodes"]["web"]["ipv4"] = json!("100.64.0.1"),
        &["ipv4", "100.64.0.1", "already used by node"],
    );
    with(
        "node of a missing user",
        &|s| s["nodes"]["a1"]["user"] = json!("carol"),
        &["node \"a1\"", "user", "carol", "no such user"],
    );
    with(
        "public IPv4",
        &|s| s["nodes"]["a1"]["ipv4"] = json!("8.8.8.8"),
        &["node \"a1\"", "ipv4", "8.8.8.8"],
    );
    with(
        "bad tag",
        &|s| s["nodes"]["web"]["tags"] = json!(["nottag"]),
        &["node \"web\"", "tags[0]", "nottag"],
    );
    with(
        "duplicate user ids",
        &|s| s["users"][1]["id"] = json!(1),
        &["user \"", "id", "already used by user"],
    );
    with(
        "garbage created",
        &|s| s["nodes"]["a1"]["created"] = json!("garbage"),
        &["node \"a1\"", "created", "garbage", "RFC 3339"],
    );
    with(
        "created yesterday",
        &|s| s["nodes"]["a1"]["created"] = json!("yesterday"),
        &["node \"a1\"", "created", "yesterday"],
    );
    with(
        "unknown top-level field",
        &|s| s["colour"] = json!("red"),
        &["unknown top-level field", "colour"],
    );
    with(
        "unknown node field",
        &|s| s["nodes"]["a1"]["colour"] = json!("red"),
        &["node \"a1\"", "colour"],
    );
    with(
        "tagged node with a user",
        &|s| s["nodes"]["web"]["user"] = json!("bob"),
        &["node \"web\"", "a tagged node has no user"],
    );
    with(
        "route with host bits",
        &|s| s["nodes"]["web"]["routable_ips"] = json!(["10.1.0.1/16"]),
        &["node \"web\"", "routable_ips[0]", "host bits"],
    );
    with(
        "bad address syntax",
        &|s| s["nodes"]["a1"]["ipv4"] = json!("100.64.0.300"),
        &["node \"a1\"", "line"],
    );
    out
}

#[test]
fn import_and_the_cli_reject_exactly_the_same_states() {
    let (s, dir, admin) = start_with_admin("import", &[]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/acme", k, None).status, 201);
    let good = base_state().to_string();
    let r = s.req("PUT", "/v1/tailnets/acme/state", k, Some(&good));
    assert_eq!(r.status, 200, "{}", r.text());
    let before = s.req("GET", "/v1/tailnets/acme/state", k, None).json();
    let policy = dir.0.join("p.hujson");
    std::fs::write(&policy, "{\"acls\": []}").unwrap();
    let file = dir.0.join("state.json");
    for (what, doc, needles) in bad_states() {
        let r = s.req("PUT", "/v1/tailnets/acme/state", k, Some(&doc.to_string()));
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        for n in needles {
            assert!(e.contains(n), "{what}: server error {e:?} lacks {n:?}");
        }
        // The CLI says the same about the same file.
        std::fs::write(&file, doc.to_string()).unwrap();
        for args in [
            &["compute", "--policy"][..],
            &["policy", "test", "--state"][..],
        ] {
            let mut cmd = Command::new(bin());
            if args[0] == "compute" {
                cmd.args(args).arg(&policy).arg("--state").arg(&file);
            } else {
                cmd.args(["policy", "test"])
                    .arg(&policy)
                    .arg("--state")
                    .arg(&file);
            }
            let out = cmd.stdin(Stdio::null()).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what}: {args:?}: {err}");
            for n in needles {
                assert!(err.contains(n), "{what}: CLI error {err:?} lacks {n:?}");
            }
        }
    }
    // Nothing changed.
    let after = s.req("GET", "/v1/tailnets/acme/state", k, None).json();
    assert_eq!(before, after);
}

#[test]
fn node_user_and_tailnet_writes_close_the_gaps() {
    let (s, _dir, admin) = start_with_admin("gaps", &[]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/acme", k, None).status, 201);
    let r = s.req(
        "PUT",
        "/v1/tailnets/acme/users/alice",
        k,
        Some(r#"{"email":"alice@acme.example"}"#),
    );
    assert_eq!(r.status, 201);
    let r = s.req(
        "PUT",
        "/v1/tailnets/acme/nodes/a1",
        k,
        Some(r#"{"user":"alice"}"#),
    );
    assert_eq!(r.status, 201);
    let a1_v4 = r.json()["ipv4"].as_str().unwrap().to_string();
    let seq = s.req("GET", "/v1/tailnets/acme", k, None).json()["seq"].clone();
    let node = |extra: &str| format!("{{\"user\":\"alice\",{extra}}}");
    let v4_mapped = format!("\"ipv6\":\"::ffff:{a1_v4}\"");
    let huge_route_list: Vec<String> = (0..5000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let too_many_routes = format!("\"routable_ips\":{}", json!(huge_route_list));
    let cases: Vec<(String, &str)> = vec![
        (node("\"ipv6\":\"::1\""), "ipv6"),
        (node("\"ipv6\":\"fe80::1\""), "ipv6"),
        (node(&v4_mapped), "ipv6"),
        (node("\"ipv6\":\"fd7a:115c:a1e0:b1a::1\""), "ipv6"),
        (node("\"ipv4\":\"100.100.100.100\""), "ipv4"),
        (node("\"ipv4\":\"100.64.0.0\""), "ipv4"),
        (node("\"created\":\"9999-99-99T99:99:99Z\""), "created"),
        (node("\"routable_ips\":[\"10.0.0.1/8\"]"), "routable_ips[0]"),
        (
            node("\"routable_ips\":[\"100.64.0.0/10\"]"),
            "routable_ips[0]",
        ),
        (
            node("\"routable_ips\":[\"100.0.0.0/8\"]"),
            "routable_ips[0]",
        ),
        (
            node("\"routable_ips\":[\"fd7a:115c:a1e0::/64\"]"),
            "routable_ips[0]",
        ),
        (
            node("\"approved_routes\":[\"192.168.1.1/24\"]"),
            "approved_routes[0]",
        ),
        (node("\"hostname\":\"a\\u0007b\""), "hostname"),
        (node("\"tags\":[\"tag:x\"]"), "a tagged node has no user"),
        (node("\"posture\":{\"os\":\"linux\"}"), "posture"),
        (node(&too_many_routes), "413"),
    ];
    for (body, needle) in &cases {
        let r = s.req("PUT", "/v1/tailnets/acme/nodes/x", k, Some(body));
        if *needle == "413" {
            assert_eq!(r.status, 413, "{}", r.text());
            continue;
        }
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            e.contains("node \"x\"") && e.contains(needle),
            "{body}: {e}"
        );
    }
    // PATCH goes through the same checks.
    for (body, needle) in [
        (r#"{"routable_ips":["10.0.0.1/8"]}"#, "routable_ips[0]"),
        (
            r#"{"approved_routes":["100.64.0.0/24"]}"#,
            "approved_routes[0]",
        ),
        (r#"{"tags":["nottag"]}"#, "tags[0]"),
        (r#"{"posture":{"node:os":"a\u0001"}}"#, "posture"),
    ] {
        let r = s.req("PATCH", "/v1/tailnets/acme/nodes/a1", k, Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            e.contains("node \"a1\"") && e.contains(needle),
            "{body}: {e}"
        );
    }
    // Users, tailnets.
    for (path, body, status, needle) in [
        (
            "/v1/tailnets/acme/users/bob",
            r#"{"email":"@"}"#,
            400,
            "email",
        ),
        (
            "/v1/tailnets/acme/users/bob",
            r#"{"email":"bob @x"}"#,
            400,
            "email",
        ),
        (
            "/v1/tailnets/acme/users/bob",
            r#"{"email":"alice@acme.example"}"#,
            409,
            "already used by user",
        ),
        (
            "/v1/tailnets/acme/users/bob",
            r#"{"email":"b@x","role":"wizard"}"#,
            400,
            "role",
        ),
        ("/v1/tailnets/other", r#"{"domain":""}"#, 400, "domain"),
        (
            "/v1/tailnets/other",
            r#"{"domain":"a\u0000b"}"#,
            400,
            "control",
        ),
        (
            "/v1/tailnets/other",
            r#"{"domain":"."}"#,
            400,
            "not a domain",
        ),
        ("/v1/tailnets/.", "", 400, "invalid tailnet name"),
        ("/v1/tailnets/..", "", 400, "invalid tailnet name"),
    ] {
        let r = s.req("PUT", path, k, Some(body));
        assert_eq!(r.status, status, "{path} {body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(needle), "{path} {body}: {e}");
    }
    let huge = format!("{{\"domain\":\"{}\"}}", "d".repeat(300));
    let r = s.req("PUT", "/v1/tailnets/other", k, Some(&huge));
    assert_eq!(r.status, 400, "{}", r.text());
    // A user with nodes cannot be deleted (the nodes would point nowhere).
    let r = s.req("DELETE", "/v1/tailnets/acme/users/alice", k, None);
    assert_eq!(r.status, 409, "{}", r.text());
    // Nothing changed.
    assert_eq!(
        s.req("GET", "/v1/tailnets/acme", k, None).json()["seq"],
        seq
    );
    // Tagging a user's node makes it a tagged node (no user), as in Tailscale.
    let r = s.req(
        "PATCH",
        "/v1/tailnets/acme/nodes/a1",
        k,
        Some(r#"{"tags":["tag:x"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"], Value::Null);
    assert_eq!(
        s.req("DELETE", "/v1/tailnets/acme/users/alice", k, None)
            .status,
        204
    );
}

#[test]
fn the_node_limit_bounds_writes_and_imports() {
    let (s, _dir, admin) = start_with_admin("limit", &[("NETMAP_MAX_NODES_PER_TAILNET", "2")]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("PUT", "/v1/tailnets/acme", k, None).status, 201);
    for (i, status) in [(0, 201), (1, 201), (2, 409)] {
        let r = s.req(
            "PUT",
            &format!("/v1/tailnets/acme/nodes/n{i}"),
            k,
            Some(r#"{"tags":["tag:x"]}"#),
        );
        assert_eq!(r.status, status, "{}", r.text());
    }
    let mut st = base_state();
    st["nodes"]["n3"] = json!({"tags": ["tag:x"], "ipv4": "100.64.0.9"});
    let r = s.req("PUT", "/v1/tailnets/acme/state", k, Some(&st.to_string()));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("more than 2 nodes"));
}
