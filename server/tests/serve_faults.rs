//! Issue 11, faults: one server per data directory (finding 2), a tenant with an unreadable
//! row or policy is isolated and repairable through the API (4), and a deleted or truncated
//! WAL is detected instead of silently losing acknowledged writes; `netmap backup` copies the
//! database online (10).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use serve_common::*;

fn put(s: &Server, key: &str, path: &str, body: &str) -> Resp {
    s.req("PUT", path, Some(key), Some(body))
}

/// A tailnet with a user and `nodes` nodes.
fn fill(s: &Server, key: &str, t: &str, nodes: usize) {
    assert_eq!(
        s.req("PUT", &format!("/v1/tailnets/{t}"), Some(key), None)
            .status,
        201
    );
    let r = put(
        s,
        key,
        &format!("/v1/tailnets/{t}/users/u"),
        r#"{"email":"u@x.example"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    for i in 0..nodes {
        let r = put(
            s,
            key,
            &format!("/v1/tailnets/{t}/nodes/n{i}"),
            r#"{"user":"u"}"#,
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let (s, dir, admin) = start_with_admin("lock", &[]);
    fill(&s, &admin, "t", 1);
    let (code, err) = serve_expecting_exit(&dir.0, &[], Duration::from_secs(30))
        .expect("a second server started on the same data directory");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("in use by another netmap server"), "{err}");
    assert!(err.contains(&format!("pid {}", s.child.id())), "{err}");
    // The first one goes on.
    assert_eq!(s.req("GET", "/health", None, None).status, 200);
    let r = put(&s, &admin, "/v1/tailnets/t/nodes/n9", r#"{"user":"u"}"#);
    assert_eq!(r.status, 201);
}

/// Runs SQL on a stopped server's database.
fn sql(dir: &TempDir, stmt: &str) {
    let c = rusqlite::Connection::open(dir.0.join("netmap.db")).unwrap();
    let n = c.execute(stmt, []).unwrap();
    assert_eq!(n, 1, "{stmt}");
}

#[test]
fn a_tenant_with_unreadable_state_is_isolated_and_repairable() {
    let (mut s, dir, admin) = start_with_admin("broken", &[]);
    fill(&s, &admin, "good", 2);
    fill(&s, &admin, "rows", 2);
    fill(&s, &admin, "pol", 2);
    let rows_key = create_key(&dir.0, Some("rows"), None);
    assert!(s.terminate(Duration::from_secs(10)).unwrap().success());
    sql(
        &dir,
        "UPDATE nodes SET data = '{\"hostname\":' WHERE tailnet = 'rows' AND name = 'n1'",
    );
    sql(
        &dir,
        "UPDATE tailnets SET policy = '{\"acls\": 3}' WHERE name = 'pol'",
    );

    let s = Server::start(&dir.0, &[]);
    let k = Some(admin.as_str());
    assert_eq!(s.req("GET", "/health", None, None).status, 200);
    assert_eq!(s.req("GET", "/v1/tailnets/good/nodes", k, None).status, 200);
    for (t, needle) in [("rows", "\"n1\" of table nodes"), ("pol", "policy")] {
        let r = s.req("GET", &format!("/v1/tailnets/{t}/nodes"), k, None);
        assert_eq!(r.status, 503, "{}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.contains(needle) && e.contains("PUT /v1/tailnets/"), "{e}");
    }
    let list = s.req("GET", "/v1/tailnets", k, None).json();
    let broken: Vec<_> = list["tailnets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["broken"].is_string())
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(broken, ["pol", "rows"]);
    let m = s.req("GET", "/metrics", None, None).text();
    assert!(m.contains("netmap_tailnets_broken 2"), "{m}");
    // Creating it again is refused; a write to it is refused.
    assert_eq!(s.req("PUT", "/v1/tailnets/rows", k, None).status, 409);
    assert_eq!(
        put(&s, &admin, "/v1/tailnets/rows/nodes/x", r#"{"user":"u"}"#).status,
        503
    );

    // Repair: the tenant's own key replaces its state; a new policy repairs the other.
    let state = json!({
        "users": [{"id": 1, "name": "u", "email": "u@x.example"}],
        "nodes": {"n0": {"user": "u", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1",
                          "created": "2025-01-06T09:00:00Z"}},
        "policy": "{\"acls\": []}",
    })
    .to_string();
    let r = put(&s, &rows_key, "/v1/tailnets/rows/state", &state);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["repaired"], true);
    let r = put(&s, &admin, "/v1/tailnets/pol/policy", "{\"acls\": []}");
    assert_eq!(r.status, 200, "{}", r.text());
    for t in ["rows", "pol"] {
        let r = s.req("GET", &format!("/v1/tailnets/{t}/nodes"), k, None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = s.req("GET", "/metrics", None, None).text();
    assert!(m.contains("netmap_tailnets_broken 0"), "{m}");
    // Repaired state survives a restart.
    drop(s);
    let s = Server::start(&dir.0, &[]);
    let nodes = s.req("GET", "/v1/tailnets/rows/nodes", k, None).json();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.req("GET", "/v1/tailnets/pol/nodes", k, None).json()["nodes"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

fn backup(dir: &TempDir, out: &std::path::Path) -> String {
    let o = Command::new(bin())
        .args(["backup", "--data"])
        .arg(&dir.0)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn lost_wal_is_detected_and_backups_restore() {
    let (mut s, dir, admin) = start_with_admin("wal", &[]);
    fill(&s, &admin, "t", 3);
    // An online backup while the server runs.
    let copy = dir.0.join("copy.db");
    let said = backup(&dir, &copy);
    assert!(
        said.contains("1 tailnets") && said.contains("integrity ok"),
        "{said}"
    );
    // Acknowledged writes after the backup, then a crash: they live in the WAL.
    for i in 3..6 {
        let r = put(
            &s,
            &admin,
            &format!("/v1/tailnets/t/nodes/n{i}"),
            r#"{"user":"u"}"#,
        );
        assert_eq!(r.status, 201);
    }
    s.kill9();
    let wal = dir.0.join("netmap.db-wal");
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len > 0);

    // A truncated WAL: refused, naming what is missing.
    let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let (code, err) = serve_expecting_exit(&dir.0, &[], Duration::from_secs(30))
        .expect("started without the acknowledged writes");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("were acknowledged") && err.contains("truncated"),
        "{err}"
    );

    // A deleted WAL: the same.
    std::fs::remove_file(&wal).unwrap();
    let _ = std::fs::remove_file(dir.0.join("netmap.db-shm"));
    let (code, err) = serve_expecting_exit(&dir.0, &[], Duration::from_secs(30))
        .expect("started without the acknowledged writes");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist (deleted?)"), "{err}");

    // Restoring the backup and accepting what it holds.
    std::fs::copy(&copy, dir.0.join("netmap.db")).unwrap();
    let s = Server::start_with_args(&dir.0, &[], &["--accept-data-loss"]);
    let nodes = s
        .req("GET", "/v1/tailnets/t/nodes", Some(&admin), None)
        .json();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    // From then on it starts normally.
    drop(s);
    let s = Server::start(&dir.0, &[]);
    assert_eq!(s.req("GET", "/health", None, None).status, 200);
}
