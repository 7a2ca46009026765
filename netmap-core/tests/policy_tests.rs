//! `tests` and `sshTests` through the public API: a failing test rejects the policy and the
//! report says which entry failed and why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use netmap_core::{load_policy, run_tests, CoreError, Tailnet};

const STATE: &str = r#"{
  "users": [{"id": 1, "name": "odin", "email": "odin@example.com"},
            {"id": 2, "name": "thor", "email": "thor@example.org"}],
  "nodes": {
    "laptop": {"hostname": "laptop", "user": "thor", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1"},
    "db": {"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2"}
  },
  "tailnet": {"name": "odin@example.com"}
}"#;

fn policy(tests: &str) -> String {
    format!(
        r#"{{
  "tagOwners": {{"tag:db": ["odin@example.com"]}},
  "acls": [{{"action": "accept", "src": ["thor@example.org"], "dst": ["tag:db:5432"]}}],
  "ssh": [{{"action": "check", "src": ["thor@example.org"], "dst": ["tag:db"], "users": ["root"]}}],
  {tests}
}}"#
    )
}

#[test]
fn passing_tests_accept_the_policy() {
    let tailnet = Tailnet::from_state_json(STATE).unwrap();
    let text = policy(
        r#""tests": [{"src": "thor@example.org", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}],
           "sshTests": [{"src": "thor@example.org", "dst": ["tag:db"], "check": ["root"], "deny": ["ubuntu"]}]"#,
    );
    load_policy(&text, &tailnet).unwrap();
}

#[test]
fn failing_tests_reject_the_policy_with_an_actionable_report() {
    let tailnet = Tailnet::from_state_json(STATE).unwrap();
    let text = policy(
        r#""tests": [{"src": "thor@example.org", "deny": ["tag:db:5432"]},
                     {"src": "thor@example.org", "accept": ["tag:db:22"]}],
           "sshTests": [{"src": "thor@example.org", "dst": ["tag:db"], "accept": ["root"]}]"#,
    );
    let Err(CoreError::TestsFailed(report)) = load_policy(&text, &tailnet) else {
        panic!("the policy should be rejected");
    };
    assert_eq!(
        CoreError::TestsFailed(report.clone()).to_string(),
        "test(s) failed"
    );
    let failed: Vec<_> = report.outcomes.iter().filter(|o| !o.passed).collect();
    assert_eq!(failed.len(), 3);
    assert_eq!(failed[0].kind, "tests");
    assert_eq!(failed[0].rule.as_deref(), Some("acls[0]"));
    assert!(failed[0].reason.contains("laptop"));
    assert!(failed[1].reason.contains("no rule"), "{}", failed[1].reason);
    assert_eq!(failed[2].kind, "sshTests");
    assert_eq!(failed[2].rule.as_deref(), Some("ssh[0]"));
    assert!(failed[2].reason.contains("check"));
    // The same report is available without loading.
    let p = netmap_policy::parse_policy(&text).unwrap();
    assert_eq!(run_tests(&p, &tailnet), report);
}

#[test]
fn malformed_tests_are_rejected_before_any_tailnet_is_involved() {
    let text = policy(r#""tests": [{"src": "thor@example.org", "accept": ["tag:db:notaport"]}]"#);
    let e = netmap_policy::parse_policy(&text).unwrap_err();
    assert!(e.message().starts_with("test(s) failed"), "{e}");
    assert!(e.message().contains("notaport"), "{e}");
    assert_eq!(e.path(), "tests[0].accept[0]");
}

/// The engine skips a policy edit's tests when the edit changed nothing they read; these
/// edits change what they read, and must be rejected as a fresh check rejects them.
#[test]
fn policy_edits_run_the_tests_again_when_what_they_read_changed() {
    use netmap_core::{Change, Engine};
    let state = r#"{
      "users": [{"id": 1, "name": "odin", "email": "odin@example.com"},
                {"id": 2, "name": "thor", "email": "thor@example.org"},
                {"id": 3, "name": "loki", "email": "loki@example.org"}],
      "nodes": {
        "laptop": {"hostname": "laptop", "user": "thor", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1"},
        "phone": {"hostname": "phone", "user": "loki", "ipv4": "100.64.0.3", "ipv6": "fd7a:115c:a1e0::3"},
        "db": {"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2"}
      },
      "tailnet": {"name": "odin@example.com"}
    }"#;
    let with_admins = |admins: &str| {
        format!(
            r#"{{
  "groups": {{"group:admins": [{admins}]}},
  "tagOwners": {{"tag:db": ["odin@example.com"]}},
  "acls": [{{"action": "accept", "src": ["thor@example.org"], "dst": ["tag:db:5432"]}},
           {{"action": "accept", "src": ["group:admins"], "dst": ["*:*"]}}],
  "tests": [{{"src": "thor@example.org", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}}]
}}"#
        )
    };
    let tailnet = Tailnet::from_state_json(state).unwrap();
    let mut engine = Engine::new(&with_admins(r#""odin@example.com""#), tailnet).unwrap();
    let set = |e: &mut Engine, admins: &str| {
        e.apply(Change::SetPolicy {
            policy: with_admins(admins),
        })
    };
    // An edit the tests do not read (loki's devices are not theirs): taken.
    set(&mut engine, r#""odin@example.com", "loki@example.org""#).unwrap();
    // The test's source into the admins: it reaches tag:db on 22, so the test fails.
    assert!(matches!(
        set(
            &mut engine,
            r#""odin@example.com", "loki@example.org", "thor@example.org""#
        ),
        Err(CoreError::TestsFailed(_))
    ));
    set(&mut engine, r#""odin@example.com""#).unwrap();
    // The only tag:db device goes: the test's destination names no device any more, so the
    // next edit (one the tests would not read otherwise) fails them.
    engine
        .apply(Change::RemoveNode { node: "db".into() })
        .unwrap();
    assert!(matches!(
        set(&mut engine, r#""odin@example.com", "loki@example.org""#),
        Err(CoreError::TestsFailed(_))
    ));
}

/// Node changes keep the verdict of the last run of the tests only when they touch nothing
/// the tests read; these touch it (a new device a test names, a route a test's address lies in),
/// and the next edit, one the tests would not read otherwise, must be rejected as a fresh
/// check rejects it.
#[test]
fn node_changes_the_tests_read_make_the_next_edit_run_them() {
    use netmap_core::{Change, Engine};
    let state = r#"{
      "users": [{"id": 1, "name": "odin", "email": "odin@example.com"},
                {"id": 2, "name": "thor", "email": "thor@example.org"},
                {"id": 3, "name": "loki", "email": "loki@example.org"}],
      "nodes": {
        "laptop": {"hostname": "laptop", "user": "thor", "ipv4": "100.64.0.1"},
        "phone": {"hostname": "phone", "user": "loki", "ipv4": "100.64.0.3"},
        "db": {"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.2"},
        "router": {"hostname": "router", "tags": ["tag:router"], "ipv4": "100.64.0.4",
                   "routable_ips": ["10.1.0.0/16"], "approved_routes": ["10.1.0.0/16"]}
      },
      "tailnet": {"name": "odin@example.com"}
    }"#;
    let with_admins = |admins: &str| {
        format!(
            r#"{{
  "groups": {{"group:admins": [{admins}]}},
  "tagOwners": {{"tag:db": ["odin@example.com"], "tag:router": ["odin@example.com"]}},
  "acls": [{{"action": "accept", "src": ["thor@example.org"], "dst": ["tag:db:5432", "100.64.0.9:22"]}},
           {{"action": "accept", "src": ["*"], "dst": ["tag:db:80"]}},
           {{"action": "accept", "src": ["group:admins"], "dst": ["*:*"]}}],
  "tests": [{{"src": "thor@example.org", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}},
            {{"src": "10.1.2.3", "accept": ["tag:db:80"]}}]
}}"#
        )
    };
    let (odin, odin_loki) = (
        r#""odin@example.com""#,
        r#""odin@example.com", "loki@example.org""#,
    );
    let tailnet = Tailnet::from_state_json(state).unwrap();
    let mut engine = Engine::new(&with_admins(odin), tailnet).unwrap();
    let set = |e: &mut Engine, admins: &str| {
        e.apply(Change::SetPolicy {
            policy: with_admins(admins),
        })
    };
    let rejected =
        |r: Result<netmap_core::ChangeSet, CoreError>| matches!(r, Err(CoreError::TestsFailed(_)));
    let upsert = |e: &mut Engine, name: &str, json: &str| {
        let value = serde_json::from_str::<netmap_core::Node>(json).unwrap();
        e.apply(Change::UpsertNode {
            node: name.into(),
            value,
        })
        .unwrap();
    };
    let remove = |e: &mut Engine, name: &str| {
        e.apply(Change::RemoveNode { node: name.into() }).unwrap();
    };
    set(&mut engine, odin_loki).unwrap();
    // A device the tests neither name nor could name: the edits after it are taken.
    upsert(
        &mut engine,
        "cam",
        r#"{"hostname": "cam", "user": "loki", "ipv4": "100.64.0.20"}"#,
    );
    set(&mut engine, odin).unwrap();
    // The route the second test's source address lies in goes: `*` no longer covers it.
    engine
        .apply(Change::ApproveRoutes {
            node: "router".into(),
            routes: Vec::new(),
        })
        .unwrap();
    assert!(rejected(set(&mut engine, odin_loki)));
    engine
        .apply(Change::ApproveRoutes {
            node: "router".into(),
            routes: vec!["10.1.0.0/16".parse().unwrap()],
        })
        .unwrap();
    set(&mut engine, odin_loki).unwrap();
    // A new tag:db device at the address thor may reach on port 22: the deny fails.
    upsert(
        &mut engine,
        "db2",
        r#"{"hostname": "db2", "tags": ["tag:db"], "ipv4": "100.64.0.9"}"#,
    );
    assert!(rejected(set(&mut engine, odin)));
    // Gone again: the tests pass.
    remove(&mut engine, "db2");
    set(&mut engine, odin).unwrap();
    // A second tag:db device, judged by the next edit alone, then the first goes: the
    // tests still pass. When the second goes too, tag:db names no device.
    upsert(
        &mut engine,
        "db3",
        r#"{"hostname": "db3", "tags": ["tag:db"], "ipv4": "100.64.0.30"}"#,
    );
    set(&mut engine, odin_loki).unwrap();
    remove(&mut engine, "db");
    set(&mut engine, odin).unwrap();
    remove(&mut engine, "db3");
    assert!(rejected(set(&mut engine, odin_loki)));
    upsert(
        &mut engine,
        "db",
        r#"{"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.2"}"#,
    );
    set(&mut engine, odin_loki).unwrap();
    // thor's laptop (a device the tests named) becomes a tag:db device: thor has no device
    // left, and the first test's source names none.
    upsert(
        &mut engine,
        "laptop",
        r#"{"hostname": "laptop", "tags": ["tag:db"], "ipv4": "100.64.0.1"}"#,
    );
    assert!(rejected(set(&mut engine, odin_loki)));
}
