//! Feeds arbitrary text to the policy reader and validator. Neither may panic, whatever the
//! input; a policy that validates must also be well-formed HuJSON, and must compute and test
//! against a small tailnet without failing on its syntax (what `policy check` accepts never
//! fails later for reasons of form).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netmap_core::Tailnet;

const STATE: &str = r#"{
  "users": [{"id": 1, "name": "alice", "email": "alice@example.com"},
            {"id": 2, "name": "bob", "email": "bob@example.org", "role": "admin"}],
  "nodes": {
    "a": {"hostname": "a", "user": "alice", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1",
          "created": "2026-01-01T00:00:01Z", "posture": {"node:os": "macos", "node:tsVersion": "1.62.0"}},
    "b": {"hostname": "b", "user": "bob", "ipv4": "100.64.0.2", "created": "2026-01-01T00:00:02Z"},
    "s": {"hostname": "s", "tags": ["tag:server"], "ipv6": "fd7a:115c:a1e0::3", "created": "2026-01-01T00:00:03Z"},
    "r": {"hostname": "r", "tags": ["tag:router"], "ipv4": "100.64.0.4", "ipv6": "fd7a:115c:a1e0::4",
          "routable_ips": ["10.0.0.0/8", "0.0.0.0/0", "::/0"], "approved_routes": ["10.0.0.0/8", "0.0.0.0/0"],
          "created": "2026-01-01T00:00:04Z"}
  },
  "tailnet": {"name": "example.com"}
}"#;

fn tailnet() -> &'static Tailnet {
    static T: OnceLock<Tailnet> = OnceLock::new();
    T.get_or_init(|| Tailnet::from_state_json(STATE).expect("the fuzz tailnet is valid"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let syntax = netmap_policy::hujson::parse(text);
    if let Ok(node) = &syntax {
        // Converting the positioned tree to plain JSON must not panic either.
        let _ = node.to_json();
    }
    let Ok(policy) = netmap_policy::parse_policy(text) else {
        return;
    };
    // A valid policy is valid HuJSON: the reader and the validator must agree.
    assert!(
        syntax.is_ok(),
        "parse_policy accepted text that hujson::parse rejects"
    );
    // Computing every view and running the tests must not panic on any valid policy.
    let t = tailnet();
    let _ = netmap_core::compute_all(&policy, t);
    let _ = netmap_core::run_tests(&policy, t);
    let _ = netmap_core::check_policy_for_tailnet(&policy, t);
});
