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
