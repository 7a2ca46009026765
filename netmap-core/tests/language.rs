//! What the policy language's features do to the computed netmap: postures narrowing rule
//! sources, ipsets, legacy field names, SSH session recorders, app connectors, and `tests`
//! with posture attributes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use netmap_core::{compute_all, load_policy, run_tests, Tailnet};
use serde_json::{json, Value};

const STATE: &str = r#"{
 "users": [{"id": 1, "name": "alice", "email": "alice@acme.example"},
           {"id": 2, "name": "bob", "email": "bob@acme.example"}],
 "nodes": {
  "alice-mac": {"hostname": "alice-mac", "user": "alice", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1",
                "created": "2026-01-01T00:00:01Z", "posture": {"node:os": "macos", "node:tsVersion": "1.62.0"}},
  "alice-old": {"hostname": "alice-old", "user": "alice", "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2",
                "created": "2026-01-01T00:00:02Z", "posture": {"node:os": "macos", "node:tsVersion": "1.50.0"}},
  "bob-linux": {"hostname": "bob-linux", "user": "bob", "ipv4": "100.64.0.3", "ipv6": "fd7a:115c:a1e0::3",
                "created": "2026-01-01T00:00:03Z", "posture": {"node:os": "linux", "node:tsVersion": "1.70.0"}},
  "db": {"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.10", "ipv6": "fd7a:115c:a1e0::a",
         "created": "2026-01-01T00:00:04Z"},
  "rec": {"hostname": "rec", "tags": ["tag:rec"], "ipv4": "100.64.0.11", "ipv6": "fd7a:115c:a1e0::b",
          "created": "2026-01-01T00:00:05Z"},
  "router": {"hostname": "router", "tags": ["tag:router"], "ipv4": "100.64.0.12", "ipv6": "fd7a:115c:a1e0::c",
             "routable_ips": ["10.1.0.0/16"], "approved_routes": ["10.1.0.0/16"], "created": "2026-01-01T00:00:06Z"}
 },
 "tailnet": {"name": "acme.example"}
}"#;

const HEAD: &str = r#""tagOwners": {"tag:db": [], "tag:rec": [], "tag:router": []},
  "postures": {"posture:mac": ["node:os == 'macos'"], "posture:recent": ["node:tsVersion >= '1.60'"]},"#;

/// Every node's view as JSON.
fn views(body: &str) -> Value {
    let tailnet = Tailnet::from_state_json(STATE).unwrap();
    let policy = load_policy(&format!("{{{HEAD}{body}}}"), &tailnet).unwrap();
    let c = compute_all(&policy, &tailnet);
    serde_json::to_value(&c.views).unwrap()
}

fn src_ips(v: &Value, node: &str) -> Vec<Vec<String>> {
    v[node]["packet_filter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_value(r["SrcIPs"].clone()).unwrap())
        .collect()
}

fn peers(v: &Value, node: &str) -> Vec<String> {
    v[node]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn postures_narrow_sources_to_matching_devices() {
    let v = views(
        r#""acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:5432"],
                     "srcPosture": ["posture:mac"]}]"#,
    );
    // Only alice's macs: bob's Linux machine fails the posture.
    assert_eq!(
        src_ips(&v, "db"),
        [[
            "100.64.0.1",
            "100.64.0.2",
            "fd7a:115c:a1e0::1",
            "fd7a:115c:a1e0::2"
        ]]
    );
    assert_eq!(peers(&v, "db"), ["alice-mac", "alice-old"]);
    assert!(peers(&v, "bob-linux").is_empty());
}

#[test]
fn wildcard_under_a_posture_keeps_routes_and_drops_failing_devices() {
    let v = views(
        r#""acls": [{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"],
                     "srcPosture": ["posture:recent"]}]"#,
    );
    assert_eq!(
        src_ips(&v, "db"),
        [[
            "10.1.0.0/16",
            "100.64.0.1",
            "100.64.0.3",
            "fd7a:115c:a1e0::1",
            "fd7a:115c:a1e0::3"
        ]]
    );
    // The router forwards its subnet's traffic, which posture does not filter.
    assert_eq!(peers(&v, "db"), ["alice-mac", "bob-linux", "router"]);
}

#[test]
fn default_posture_applies_unless_a_rule_has_its_own() {
    let v = views(
        r#""defaultSrcPosture": ["posture:recent"],
           "acls": [
             {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:5432"]},
             {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:22"], "srcPosture": ["posture:mac"]}
           ]"#,
    );
    let mut got = src_ips(&v, "db");
    got.sort();
    assert_eq!(
        got,
        [
            vec![
                "100.64.0.1",
                "100.64.0.2",
                "fd7a:115c:a1e0::1",
                "fd7a:115c:a1e0::2"
            ],
            vec![
                "100.64.0.1",
                "100.64.0.3",
                "fd7a:115c:a1e0::1",
                "fd7a:115c:a1e0::3"
            ],
        ]
    );
}

#[test]
fn ipsets_resolve_to_their_addresses() {
    let v = views(
        r#""ipsets": {"ipset:lan": ["add 10.1.0.0/16", "remove 10.1.128.0/17"],
                      "ipset:nets": ["ipset:lan", "192.0.2.0/24"]},
           "acls": [
             {"action": "accept", "src": ["bob@acme.example"], "dst": ["ipset:lan:22"]},
             {"action": "accept", "src": ["ipset:nets"], "dst": ["tag:db:5432"]}
           ]"#,
    );
    let f = &v["router"]["packet_filter"][0];
    assert_eq!(f["DstPorts"][0]["IP"], "10.1.0.0/17");
    assert_eq!(src_ips(&v, "db"), [["10.1.0.0/17", "192.0.2.0/24"]]);
    assert_eq!(peers(&v, "bob-linux"), ["router"]);
}

#[test]
fn legacy_and_capitalised_fields_compile_like_the_current_ones() {
    let old = views(
        r#""ACLs": [{"Action": "accept", "Users": ["alice@acme.example"], "Ports": ["tag:db:22"]}]"#,
    );
    let new = views(
        r#""acls": [{"action": "accept", "src": ["alice@acme.example"], "dst": ["tag:db:22"]}]"#,
    );
    assert_eq!(old, new);
    assert!(!src_ips(&new, "db").is_empty());
}

#[test]
fn ssh_rules_carry_their_recorders() {
    let v = views(
        r#""ssh": [
             {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db"], "users": ["root"],
              "recorder": ["tag:rec"], "enforceRecorder": true},
             {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:router"], "users": ["root"],
              "recorder": ["tag:rec"]}
           ]"#,
    );
    let a = &v["db"]["ssh_rules"][0]["action"];
    assert_eq!(
        a["recorders"],
        json!(["100.64.0.11:80", "[fd7a:115c:a1e0::b]:80"])
    );
    assert!(a["onRecordingFailure"]["RejectSessionWithMessage"].is_string());
    let b = &v["router"]["ssh_rules"][0]["action"];
    assert_eq!(b["recorders"], a["recorders"]);
    assert!(b.get("onRecordingFailure").is_none());
}

#[test]
fn ssh_posture_narrows_principals() {
    let v = views(
        r#""ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db"], "users": ["root"],
                    "srcPosture": ["posture:recent"]}]"#,
    );
    let ips: Vec<&str> = v["db"]["ssh_rules"][0]["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["nodeIP"].as_str().unwrap())
        .collect();
    assert_eq!(
        ips,
        [
            "100.64.0.1",
            "fd7a:115c:a1e0::1",
            "100.64.0.3",
            "fd7a:115c:a1e0::3"
        ]
    );
}

#[test]
fn app_connectors_reach_their_targets_capabilities() {
    let v = views(
        r#""nodeAttrs": [{"target": ["tag:router"], "app": {"tailscale.com/app-connectors": [
             {"name": "github", "connectors": ["tag:router"], "domains": ["github.com", "*.github.com"]}]}}],
           "acls": []"#,
    );
    let caps = &v["router"]["cap_map"]["tailscale.com/app-connectors"];
    assert_eq!(caps[0]["name"], "github");
    assert!(v["db"]["cap_map"]
        .get("tailscale.com/app-connectors")
        .is_none());
}

#[test]
fn tests_use_the_posture_they_give() {
    let tailnet = Tailnet::from_state_json(STATE).unwrap();
    let body = r#""acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:5432"],
                            "srcPosture": ["posture:mac"]}],
        "tests": [
          {"src": "bob@acme.example", "deny": ["tag:db:5432"]},
          {"src": "bob@acme.example", "srcPostureAttrs": {"node:os": "macos"}, "accept": ["tag:db:5432"]},
          {"src": "alice@acme.example", "srcPostureAttrs": {"node:os": "windows"}, "deny": ["tag:db:5432"]}
        ]"#;
    let p = netmap_policy::parse_policy(&format!("{{{HEAD}{body}}}")).unwrap();
    let report = run_tests(&p, &tailnet);
    assert!(report.passed(), "{report:#?}");
    // Without attributes, a device's own posture decides: alice's macs pass.
    let failing = r#""acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:5432"],
                               "srcPosture": ["posture:mac"]}],
        "tests": [{"src": "alice@acme.example", "deny": ["tag:db:5432"]}]"#;
    let p = netmap_policy::parse_policy(&format!("{{{HEAD}{failing}}}")).unwrap();
    assert!(!run_tests(&p, &tailnet).passed());
}
