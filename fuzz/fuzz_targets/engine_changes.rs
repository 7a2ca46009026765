//! Applies an arbitrary sequence of changes (every kind: nodes, presence, users, route
//! approvals and policy edits of the kinds operators commit) to a small tailnet and checks,
//! after every step, that every view equals the from-scratch computation of the same state and
//! that the change set names exactly the nodes whose view differs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netmap_core::{compute_all, Change, Engine, Node, Tailnet, User};

const POLICY: &str = r#"{
  "groups": {"group:eng": ["u0@example.com", "u1@example.com"]},
  "hosts": {"lan": "10.1.0.0/16"},
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": []},
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443", "tag:db:5432"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["*"], "dst": ["lan:80"]},
    {"action": "accept", "src": ["u2@example.com"], "dst": ["*:22"]}
  ],
  "ssh": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}
  ]
}"#;

/// Edits of [`POLICY`]: a group member, one rule's ports, a rule dropped or added, a host,
/// auto-approvers, SSH check, a posture, IPv4 turned off for a tag, a grant.
const EDITS: &[(&str, &str)] = &[
    (
        r#"["u0@example.com", "u1@example.com"]"#,
        r#"["u0@example.com", "u2@example.com"]"#,
    ),
    ("tag:web:443", "tag:web:443,8443"),
    (
        r#"{"action": "accept", "src": ["*"], "dst": ["lan:80"]},"#,
        "",
    ),
    (
        r#""acls": ["#,
        r#""acls": [{"action": "accept", "src": ["tag:db"], "dst": ["tag:web:80"]},"#,
    ),
    (r#""lan": "10.1.0.0/16""#, r#""lan": "10.1.2.0/24""#),
    (
        r#""10.0.0.0/8": ["tag:router"]"#,
        r#""10.0.0.0/8": ["tag:web"]"#,
    ),
    (
        r#""ssh": ["#,
        r#""ssh": [{"action": "check", "src": ["group:eng"], "dst": ["tag:web"], "users": ["ubuntu"]},"#,
    ),
    (
        r#""acls": ["#,
        r#""postures": {"posture:mac": ["node:os == 'macos'"]}, "acls": [{"action": "accept", "src": ["*"], "srcPosture": ["posture:mac"], "dst": ["tag:db:22"]},"#,
    ),
    (
        r#""acls": ["#,
        r#""nodeAttrs": [{"target": ["tag:db"], "attr": ["disable-ipv4"]}], "acls": ["#,
    ),
    (
        r#""acls": ["#,
        r#""grants": [{"src": ["tag:router"], "dst": ["group:eng"], "ip": ["tcp:8080"]}], "acls": ["#,
    ),
];

/// The policy with the edits whose bits are set in `mask`.
fn edited(mask: u16) -> String {
    let mut p = POLICY.to_string();
    for (i, (from, to)) in EDITS.iter().enumerate() {
        if mask & (1 << i) != 0 {
            p = p.replacen(from, to, 1);
        }
    }
    p
}

const NODES: u8 = 6;
const USERS: u8 = 4;

fn node(i: u8, variant: u8) -> Node {
    let mut n = Node {
        hostname: format!("host{}", variant % 3),
        ipv4: Some(std::net::Ipv4Addr::new(100, 64, 0, 1 + i)),
        ipv6: format!("fd7a:115c:a1e0::{}", 1 + i).parse().ok(),
        created: format!("2026-01-01T00:00:0{i}Z"),
        ..Node::default()
    };
    match variant % 5 {
        0 | 1 => n.user = Some(format!("u{}", variant % USERS)),
        2 => n.tags = vec!["tag:web".into()],
        3 => n.tags = vec!["tag:db".into(), "tag:web".into()],
        _ => {
            n.tags = vec!["tag:router".into()];
            n.routable_ips = vec!["10.1.0.0/16".parse().expect("literal prefix")];
        }
    }
    n.online = variant % 2 == 0;
    if variant % 7 == 6 {
        n.posture.insert(
            "node:os".into(),
            netmap_core::PostureValue::String("macos".into()),
        );
    }
    n
}

fn user(i: u8, admin: bool) -> User {
    User {
        id: u64::from(i) + 1,
        name: format!("u{i}"),
        email: format!("u{i}@example.com"),
        role: admin.then(|| "admin".to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tailnet = Tailnet::default();
    for i in 0..USERS {
        tailnet.users.insert(format!("u{i}"), user(i, false));
    }
    let Ok(mut engine) = Engine::new(POLICY, tailnet) else {
        return;
    };
    for op in data.chunks(3) {
        let (a, b) = (op[0], op.get(1).copied().unwrap_or(0));
        let c = op.get(2).copied().unwrap_or(0);
        let i = a % NODES;
        let name = format!("n{i}");
        let change = match (a / NODES) % 7 {
            0 => Change::UpsertNode {
                node: name,
                value: node(i, b),
            },
            1 => Change::RemoveNode { node: name },
            2 => Change::SetOnline {
                node: name,
                online: b % 2 == 0,
            },
            3 => Change::UpsertUser {
                user: user(b % USERS, b & 0x80 != 0),
            },
            4 => Change::ApproveRoutes {
                node: name,
                routes: if b % 2 == 0 {
                    vec!["10.1.0.0/16".parse().expect("literal prefix")]
                } else {
                    Vec::new()
                },
            },
            5 => Change::RemoveUser {
                name: format!("u{}", b % USERS),
            },
            _ => Change::SetPolicy {
                policy: edited(u16::from_le_bytes([b, c])),
            },
        };
        let before = engine.snapshot();
        let Ok(cs) = engine.apply(change) else {
            continue;
        };
        let now = engine.snapshot();
        let reference = compute_all(now.policy(), now.tailnet());
        let names: Vec<&str> = now.node_names().collect();
        assert_eq!(names.len(), reference.views.len(), "node count");
        for (name, want) in &reference.views {
            let got = now.view(name);
            assert_eq!(got.as_ref(), Some(want), "view of {name}");
        }
        for name in before.node_names().chain(now.node_names()) {
            let differs = before.view(name) != now.view(name);
            assert_eq!(
                differs,
                cs.contains(name),
                "change set entry of {name}"
            );
        }
    }
});
