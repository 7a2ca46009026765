//! `netmap serve` over real HTTP on 127.0.0.1: auth and tenant isolation, policy validation
//! (the old policy stays in force), streams carrying exactly the engine's deltas, and clear 4xx
//! errors for bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::collections::BTreeMap;
use std::time::Duration;

use netmap_core::{Change, Engine, Node, Tailnet, User};
use serde_json::{json, Value};
use serve_common::*;

const POLICY: &str = r#"{
  // Engineers reach everything; bob reaches the web servers; web reaches the database.
  "groups": {"group:eng": ["alice@acme.example"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:db": ["group:eng"], "tag:router": ["group:eng"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["*:*"]},
    {"action": "accept", "src": ["bob@acme.example"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
  ],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
  "ssh": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web"], "users": ["root"]}],
  "tests": [{"src": "alice@acme.example", "accept": ["tag:db:5432"]}],
}"#;

fn node_body(user: Option<&str>, tags: &[&str], n: u32, routes: &[&str], created: &str) -> Value {
    json!({
        "hostname": format!("host-{n}"),
        "user": user,
        "tags": tags,
        "ipv4": format!("100.64.1.{n}"),
        "ipv6": format!("fd7a:115c:a1e0::1:{n}"),
        "routable_ips": routes,
        "approved_routes": [],
        "created": created,
    })
}

fn node_from(v: &Value) -> Node {
    Node {
        hostname: v["hostname"].as_str().unwrap().to_string(),
        user: v["user"].as_str().map(str::to_string),
        tags: serde_json::from_value(v["tags"].clone()).unwrap(),
        ipv4: v["ipv4"].as_str().map(|s| s.parse().unwrap()),
        ipv6: v["ipv6"].as_str().map(|s| s.parse().unwrap()),
        routable_ips: serde_json::from_value(v["routable_ips"].clone()).unwrap(),
        approved_routes: serde_json::from_value(v["approved_routes"].clone()).unwrap(),
        created: v["created"].as_str().unwrap().to_string(),
        online: v.get("online").and_then(Value::as_bool).unwrap_or(true),
        posture: v
            .get("posture")
            .map(|p| serde_json::from_value(p.clone()).unwrap())
            .unwrap_or_default(),
    }
}

/// Sets up tailnet `acme` with two users, four nodes and [`POLICY`]; returns the node bodies.
fn setup_acme(s: &Server, key: &str) -> BTreeMap<String, Value> {
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/acme",
            Some(key),
            Some(r#"{"domain":"acme.example"}"#)
        )
        .status,
        201
    );
    for (u, e) in [("alice", "alice@acme.example"), ("bob", "bob@acme.example")] {
        let body = json!({ "email": e }).to_string();
        let r = s.req(
            "PUT",
            &format!("/v1/tailnets/acme/users/{u}"),
            Some(key),
            Some(&body),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let mut nodes = BTreeMap::new();
    nodes.insert(
        "alice-1".to_string(),
        node_body(Some("alice"), &[], 1, &[], "2025-01-01T00:00:01Z"),
    );
    nodes.insert(
        "bob-1".to_string(),
        node_body(Some("bob"), &[], 2, &[], "2025-01-01T00:00:02Z"),
    );
    nodes.insert(
        "web-1".to_string(),
        node_body(None, &["tag:web"], 3, &[], "2025-01-01T00:00:03Z"),
    );
    nodes.insert(
        "db-1".to_string(),
        node_body(None, &["tag:db"], 4, &[], "2025-01-01T00:00:04Z"),
    );
    for (k, v) in &nodes {
        let r = s.req(
            "PUT",
            &format!("/v1/tailnets/acme/nodes/{k}"),
            Some(key),
            Some(&v.to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = s.req("PUT", "/v1/tailnets/acme/policy", Some(key), Some(POLICY));
    assert_eq!(r.status, 200, "{}", r.text());
    nodes
}

#[test]
fn auth_and_tenant_isolation() {
    let (s, dir, admin) = start_with_admin("auth", &[]);
    assert_eq!(s.req("GET", "/health", None, None).status, 200);
    for t in ["a", "b"] {
        let r = s.req("PUT", &format!("/v1/tailnets/{t}"), Some(&admin), None);
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // Creating again with the same settings is fine; with other settings it conflicts.
    assert_eq!(
        s.req("PUT", "/v1/tailnets/a", Some(&admin), None).status,
        200
    );
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/a",
            Some(&admin),
            Some(r#"{"ipv6_only":true}"#)
        )
        .status,
        409
    );
    let ka = create_key(&dir.0, Some("a"), Some("90d"));
    let kb = create_key(&dir.0, Some("b"), None);
    let expired = create_key(&dir.0, None, Some("0s"));

    // Missing, malformed, unknown and expired keys: 401 with a JSON error.
    let r = s.req("GET", "/v1/tailnets", None, None);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("missing"));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(s.req("GET", "/v1/tailnets", Some("nope"), None).status, 401);
    let forged = format!("nmk_{}", "0".repeat(64));
    assert_eq!(
        s.req("GET", "/v1/tailnets", Some(&forged), None).status,
        401
    );
    let r = s.req("GET", "/v1/tailnets", Some(&expired), None);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("expired"));

    // A scoped key sees and changes only its tailnet.
    let r = s.req("GET", "/v1/tailnets", Some(&ka), None);
    assert_eq!(r.status, 200);
    let names: Vec<String> = r.json()["tailnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a"]);
    let r = s.req("GET", "/v1/tailnets", Some(&admin), None);
    assert_eq!(r.json()["tailnets"].as_array().unwrap().len(), 2);
    let user = r#"{"email":"x@a.example"}"#;
    assert_eq!(
        s.req("PUT", "/v1/tailnets/a/users/x", Some(&ka), Some(user))
            .status,
        201
    );
    for (m, p, body) in [
        ("GET", "/v1/tailnets/b", None),
        ("GET", "/v1/tailnets/b/users", None),
        ("GET", "/v1/tailnets/b/nodes", None),
        ("GET", "/v1/tailnets/b/policy", None),
        ("PUT", "/v1/tailnets/b/policy", Some("{}")),
        ("PUT", "/v1/tailnets/b/users/x", Some(user)),
        ("DELETE", "/v1/tailnets/b", None),
        ("GET", "/v1/tailnets/b/nodes/n/netmap?stream=true", None),
        // Unknown tailnets are 403 too: a scoped key learns nothing about other tenants.
        ("GET", "/v1/tailnets/zzz", None),
        // Scoped keys may not create or delete tailnets, even their own.
        ("PUT", "/v1/tailnets/c", None),
        ("DELETE", "/v1/tailnets/a", None),
    ] {
        let r = s.req(m, p, Some(&ka), body);
        assert_eq!(r.status, 403, "{m} {p}: {}", r.text());
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(
        s.req("GET", "/v1/tailnets/b/users", Some(&kb), None).json()["users"],
        json!([])
    );
    assert_eq!(
        s.req("GET", "/v1/tailnets/zzz", Some(&admin), None).status,
        404
    );

    // Deleting a tailnet deletes the keys scoped to it (a new tailnet of the same name must not
    // be readable with them).
    assert_eq!(
        s.req("DELETE", "/v1/tailnets/b", Some(&admin), None).status,
        204
    );
    assert_eq!(
        s.req("GET", "/v1/tailnets/b", Some(&admin), None).status,
        404
    );
    assert_eq!(
        s.req("PUT", "/v1/tailnets/b", Some(&admin), None).status,
        201
    );
    assert_eq!(s.req("GET", "/v1/tailnets/b", Some(&kb), None).status, 401);
    assert_eq!(
        s.req("GET", "/v1/tailnets/a/users/x", Some(&ka), None)
            .status,
        200
    );
}

#[test]
fn invalid_policy_leaves_the_old_one_in_force() {
    let (s, _dir, admin) = start_with_admin("policy", &[]);
    setup_acme(&s, &admin);
    let k = Some(admin.as_str());
    let before_view = s.req("GET", "/v1/tailnets/acme/nodes/bob-1/netmap", k, None);
    assert_eq!(before_view.status, 200);
    let seq = before_view.seq();

    // Syntax error: line and column.
    let r = s.req(
        "PUT",
        "/v1/tailnets/acme/policy",
        k,
        Some("{\n  \"acls\": [\n    {,\n  ]\n}"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(3), Some(6)),
        "{e}"
    );
    // Validation error: line, column and path.
    let bad = "{\"acls\": [\n  {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:nope:22\"]}\n]}";
    let r = s.req("PUT", "/v1/tailnets/acme/policy", k, Some(bad));
    assert_eq!(r.status, 400);
    let e = r.json();
    assert_eq!(e["line"], 2, "{e}");
    assert!(e["column"].as_u64().unwrap() > 1);
    assert!(e["path"].as_str().unwrap().starts_with("acls[0]"), "{e}");
    // Failing tests: 400 naming the failing test and where it is.
    let failing = POLICY.replace(
        r#""tests": [{"src": "alice@acme.example""#,
        r#""tests": [{"src": "bob@acme.example""#,
    );
    let r = s.req("PUT", "/v1/tailnets/acme/policy", k, Some(&failing));
    assert_eq!(r.status, 400);
    let e = r.json();
    assert!(e["error"].as_str().unwrap().contains("tests failed"), "{e}");
    assert_eq!(e["line"], 12, "{e}");
    assert_eq!(e["tests"].as_array().unwrap().len(), 1);
    // A domain the tailnet does not own.
    let foreign =
        r#"{"acls": [{"action": "accept", "src": ["user:*@evil.example"], "dst": ["*:*"]}]}"#;
    assert_eq!(
        s.req("PUT", "/v1/tailnets/acme/policy", k, Some(foreign))
            .status,
        400
    );
    // Larger than 1 MiB: 413.
    let huge = format!("{{}}{}", " ".repeat(1024 * 1024));
    let r = s.req("PUT", "/v1/tailnets/acme/policy", k, Some(&huge));
    assert_eq!(r.status, 413);
    assert!(r.json()["error"].is_string());

    // Nothing changed.
    let r = s.req("GET", "/v1/tailnets/acme/policy", k, None);
    assert_eq!(r.text(), POLICY);
    let after = s.req("GET", "/v1/tailnets/acme/nodes/bob-1/netmap", k, None);
    assert_eq!(after.seq(), seq);
    assert_eq!(after.json(), before_view.json());

    // A policy close to 1 MiB (comments) is accepted.
    let big = format!("// {}\n{}", "x".repeat(900 * 1024), POLICY);
    let r = s.req("PUT", "/v1/tailnets/acme/policy", k, Some(&big));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.seq(), seq + 1);
}

/// The server's changes, replayed on a local engine, give the deltas each stream must carry.
struct Mirror {
    engine: Engine,
}

impl Mirror {
    fn apply(&mut self, c: Change) -> netmap_core::ChangeSet {
        self.engine.apply(c).unwrap()
    }
}

fn check_line(line: &Value, seq: u64, node: &str, cs: &netmap_core::ChangeSet, m: &Mirror) {
    let delta = cs.get(node).unwrap();
    assert_eq!(line["type"], "delta", "{line}");
    assert_eq!(line["seq"], seq, "{line}");
    assert_eq!(line["delta"], json!(delta), "{node}: {line}");
    let snap = m.engine.snapshot();
    let view = json!(snap.view(node).unwrap());
    if delta.filter_changed {
        assert_eq!(line["packet_filter"], view["packet_filter"]);
    } else {
        assert!(line.get("packet_filter").is_none());
    }
    if delta.ssh_changed {
        assert_eq!(line["ssh_rules"], view["ssh_rules"]);
    }
    let names: Vec<&std::sync::Arc<str>> = delta
        .peers_added
        .iter()
        .chain(delta.peers_changed.iter())
        .collect();
    let peers = line
        .get("peers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert_eq!(peers.len(), names.len(), "{line}");
    for p in peers {
        let want = view["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == p["name"])
            .unwrap();
        assert_eq!(&p, want);
    }
}

#[test]
fn streams_carry_exactly_the_deltas_of_writes_that_touch_their_node() {
    let (s, _dir, admin) = start_with_admin("stream", &[("NETMAP_STREAM_KEEPALIVE", "200ms")]);
    let k = Some(admin.as_str());
    let nodes = setup_acme(&s, &admin);

    // The mirror: same users, nodes (same addresses and join times) and policy.
    let mut t = Tailnet::default();
    t.settings.name = "acme.example".into();
    for (i, (u, e)) in [("alice", "alice@acme.example"), ("bob", "bob@acme.example")]
        .iter()
        .enumerate()
    {
        t.users.insert(
            u.to_string(),
            User {
                id: i as u64 + 1,
                name: u.to_string(),
                email: e.to_string(),
                role: None,
            },
        );
    }
    let mut m = Mirror {
        engine: Engine::new("{}", t).unwrap(),
    };
    for (k, v) in &nodes {
        m.apply(Change::UpsertNode {
            node: k.clone(),
            value: node_from(v),
        });
    }
    m.apply(Change::SetPolicy {
        policy: POLICY.to_string(),
    });

    let watched = ["bob-1", "db-1", "web-1"];
    let mut streams: Vec<Stream> = watched
        .iter()
        .map(|n| {
            Stream::open(
                s.addr,
                &format!("/v1/tailnets/acme/nodes/{n}/netmap?stream=true"),
                &admin,
            )
            .unwrap_or_else(|r| panic!("{}", r.text()))
        })
        .collect();
    let mut seq = 0;
    for (st, n) in streams.iter_mut().zip(watched) {
        let first = st.next().unwrap();
        assert_eq!(first["type"], "full");
        assert_eq!(
            first["view"],
            json!(m.engine.snapshot().view(n).unwrap()),
            "{n}"
        );
        seq = first["seq"].as_u64().unwrap();
    }
    // A keep-alive line arrives when nothing happens.
    assert_eq!(streams[0].next().unwrap()["type"], "keepalive");

    // Writes; each is replayed on the mirror. (method, path, body, change)
    let web2 = node_body(None, &["tag:web"], 5, &[], "2025-01-01T00:00:05Z");
    let router = node_body(
        None,
        &["tag:router"],
        6,
        &["10.1.0.0/16"],
        "2025-01-01T00:00:06Z",
    );
    let bob2 = node_body(Some("bob"), &[], 7, &[], "2025-01-01T00:00:07Z");
    let writes: Vec<(&str, String, Option<String>, Change)> = vec![
        (
            "PUT",
            "nodes/web-2".into(),
            Some(web2.to_string()),
            Change::UpsertNode {
                node: "web-2".into(),
                value: node_from(&web2),
            },
        ),
        (
            "PUT",
            "nodes/router-1".into(),
            Some(router.to_string()),
            Change::UpsertNode {
                node: "router-1".into(),
                value: node_from(&router),
            },
        ),
        (
            "PATCH",
            "nodes/alice-1".into(),
            Some(r#"{"online":false}"#.into()),
            Change::SetOnline {
                node: "alice-1".into(),
                online: false,
            },
        ),
        (
            "PUT",
            "nodes/bob-2".into(),
            Some(bob2.to_string()),
            Change::UpsertNode {
                node: "bob-2".into(),
                value: node_from(&bob2),
            },
        ),
        (
            "PATCH",
            "nodes/router-1".into(),
            Some(r#"{"approved_routes":["10.1.0.0/16"]}"#.into()),
            Change::ApproveRoutes {
                node: "router-1".into(),
                routes: vec!["10.1.0.0/16".parse().unwrap()],
            },
        ),
        (
            "DELETE",
            "nodes/web-2".into(),
            None,
            Change::RemoveNode {
                node: "web-2".into(),
            },
        ),
        (
            "PUT",
            "users/carol".into(),
            Some(r#"{"email":"carol@acme.example"}"#.into()),
            Change::UpsertUser {
                user: User {
                    id: 3,
                    name: "carol".into(),
                    email: "carol@acme.example".into(),
                    role: None,
                },
            },
        ),
        (
            "PUT",
            "policy".into(),
            Some(POLICY.replace("tag:web:80,443", "tag:web:443")),
            Change::SetPolicy {
                policy: POLICY.replace("tag:web:80,443", "tag:web:443"),
            },
        ),
    ];
    let mut expected: Vec<Vec<(u64, netmap_core::ChangeSet)>> = vec![Vec::new(); watched.len()];
    for (method, path, body, change) in writes {
        let r = s.req(
            method,
            &format!("/v1/tailnets/acme/{path}"),
            k,
            body.as_deref(),
        );
        assert!(r.status < 300, "{method} {path}: {} {}", r.status, r.text());
        seq += 1;
        assert_eq!(r.seq(), seq);
        let cs = m.apply(change);
        for (i, n) in watched.iter().enumerate() {
            if cs.contains(n) {
                expected[i].push((seq, cs.clone()));
            }
        }
        // Check each stream's lines as they come, against the mirror state of that write.
        for (i, n) in watched.iter().enumerate() {
            if let Some((s2, cs)) = expected[i].last().filter(|(s2, _)| *s2 == seq) {
                let line = streams[i].next_event().unwrap();
                check_line(&line, *s2, n, cs, &m);
            }
        }
    }
    assert!(
        expected.iter().all(|e| !e.is_empty()),
        "every watched node saw some write"
    );
    assert!(
        expected.iter().any(|e| e.len() < 8),
        "some writes touched only some nodes"
    );
    // Nothing else arrived in between: the next non-keepalive line is the next write's.
    let r = s.req("DELETE", "/v1/tailnets/acme/nodes/db-1", k, None);
    assert_eq!(r.status, 204);
    let last = streams[1].next_event().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["seq"].as_u64()),
        (Some("removed"), Some(seq + 1))
    );
    assert!(streams[1].next().is_none(), "stream of a removed node ends");
    let cs = m.apply(Change::RemoveNode {
        node: "db-1".into(),
    });
    for i in [0, 2] {
        if cs.contains(watched[i]) {
            check_line(
                &streams[i].next_event().unwrap(),
                seq + 1,
                watched[i],
                &cs,
                &m,
            );
        }
    }
    // Deleting the tailnet ends the remaining streams.
    assert_eq!(s.req("DELETE", "/v1/tailnets/acme", k, None).status, 204);
    streams[0].set_timeout(Duration::from_secs(5));
    assert_eq!(streams[0].next_event().unwrap()["type"], "deleted");
    assert!(streams[0].next().is_none());
}

#[test]
fn bad_requests_get_clear_4xx() {
    let (s, _dir, admin) = start_with_admin("bad", &[("NETMAP_MAX_BODY_BYTES", "4096")]);
    let k = Some(admin.as_str());
    setup_acme(&s, &admin);
    let node = r#"{"user":"bob","hostname":"h"}"#;
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some("{\"user\": \"bob\",\n \"tags\": [}".into()),
            400,
            "invalid JSON",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"user":"bob","colour":"red"}"#.into()),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"user":"nobody"}"#.into()),
            400,
            "no such user",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"hostname":"h"}"#.into()),
            400,
            "user or at least one tag",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"tags":["web"]}"#.into()),
            400,
            "tag:NAME",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"user":"bob","ipv4":"10.0.0.1"}"#.into()),
            400,
            "100.64.0.0/10",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"user":"bob","ipv4":"100.64.1.1"}"#.into()),
            409,
            "alice-1",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(r#"{"user":"bob","created":"yesterday"}"#.into()),
            400,
            "RFC 3339",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/x",
            Some(format!(
                "{{\"user\":\"bob\",\"hostname\":\"{}\"}}",
                "a".repeat(5000)
            )),
            413,
            "larger than 4096",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/nodes/bad%20name",
            Some(node.into()),
            400,
            "invalid node id",
        ),
        (
            "PUT",
            "/v1/tailnets/acme/users/y",
            Some(r#"{"email":"not-an-email"}"#.into()),
            400,
            "email",
        ),
        (
            "PATCH",
            "/v1/tailnets/acme/nodes/bob-1",
            Some("{}".into()),
            400,
            "empty patch",
        ),
        (
            "PATCH",
            "/v1/tailnets/acme/nodes/nope",
            Some(r#"{"online":true}"#.into()),
            404,
            "not found",
        ),
        (
            "DELETE",
            "/v1/tailnets/acme/nodes/nope",
            None,
            404,
            "not found",
        ),
        (
            "GET",
            "/v1/tailnets/acme/nodes/nope",
            None,
            404,
            "not found",
        ),
        (
            "GET",
            "/v1/tailnets/acme/nodes/nope/netmap",
            None,
            404,
            "not found",
        ),
        (
            "GET",
            "/v1/tailnets/acme/nodes/nope/netmap?stream=true",
            None,
            404,
            "not found",
        ),
        (
            "GET",
            "/v1/tailnets/acme/nodes/bob-1/netmap?stream=maybe",
            None,
            400,
            "stream",
        ),
        (
            "DELETE",
            "/v1/tailnets/acme/users/nope",
            None,
            404,
            "not found",
        ),
        (
            "GET",
            "/v1/tailnets/nope/nodes",
            None,
            404,
            "tailnet \"nope\" not found",
        ),
        (
            "PUT",
            "/v1/tailnets/nope/nodes/x",
            Some(node.into()),
            404,
            "tailnet \"nope\" not found",
        ),
        (
            "PUT",
            "/v1/tailnets/nope/policy",
            Some("{}".into()),
            404,
            "tailnet \"nope\" not found",
        ),
        ("GET", "/v1/nothing-here", None, 404, "no such route"),
        (
            "POST",
            "/v1/tailnets/acme/nodes/bob-1",
            Some("{}".into()),
            405,
            "method not allowed",
        ),
        (
            "PUT",
            "/v1/tailnets/bad%2Fname",
            None,
            400,
            "invalid tailnet name",
        ),
    ];
    for (m, p, body, status, needle) in cases {
        let r = s.req(m, p, k, body.as_deref());
        assert_eq!(r.status, status, "{m} {p}: {}", r.text());
        let e = r.json();
        let msg = e["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{m} {p}: {e}"));
        assert!(msg.contains(needle), "{m} {p}: {msg:?} lacks {needle:?}");
        if msg.contains("expected value") {
            assert_eq!(
                (e["line"].as_u64(), e["column"].as_u64()),
                (Some(2), Some(11)),
                "{e}"
            );
        }
    }

    // Address allocation: dual-stack by default, IPv6 only on an IPv6-only tailnet, `null` opts
    // out of one family; addresses and names show on GET.
    let r = s.req(
        "PUT",
        "/v1/tailnets/acme/nodes/auto",
        k,
        Some(r#"{"user":"bob","hostname":"Bob's Mac"}"#),
    );
    assert_eq!(r.status, 201);
    let n = r.json();
    assert!(n["ipv4"].as_str().unwrap().starts_with("100."), "{n}");
    assert!(
        n["ipv6"].as_str().unwrap().starts_with("fd7a:115c:a1e0:"),
        "{n}"
    );
    assert_eq!(n["dns_name"], "bob-s-mac");
    let r = s.req(
        "PUT",
        "/v1/tailnets/acme/nodes/v4only",
        k,
        Some(r#"{"user":"bob","ipv6":null}"#),
    );
    assert_eq!(r.json()["addresses"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.req("PUT", "/v1/tailnets/six", k, Some(r#"{"ipv6_only":true}"#))
            .status,
        201
    );
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/six/users/u",
            k,
            Some(r#"{"email":"u@six.example"}"#)
        )
        .status,
        201
    );
    let r = s.req(
        "PUT",
        "/v1/tailnets/six/nodes/n1",
        k,
        Some(r#"{"user":"u"}"#),
    );
    assert_eq!(r.status, 201);
    let n = r.json();
    assert!(n["ipv4"].is_null() && n["ipv6"].is_string(), "{n}");
    let r = s.req(
        "PUT",
        "/v1/tailnets/six/nodes/n2",
        k,
        Some(r#"{"user":"u","ipv4":"100.64.0.9"}"#),
    );
    assert_eq!(r.status, 400);
    let r = s.req("GET", "/v1/tailnets/six/nodes/n1/netmap", k, None);
    assert_eq!(r.status, 200);
    // Updating a node keeps its addresses and join time.
    let again = s.req(
        "PUT",
        "/v1/tailnets/six/nodes/n1",
        k,
        Some(r#"{"user":"u","hostname":"renamed"}"#),
    );
    assert_eq!(again.status, 200);
    let a = again.json();
    assert_eq!((&a["ipv6"], &a["created"]), (&n["ipv6"], &n["created"]));
    assert_eq!(a["dns_name"], "renamed");
}
