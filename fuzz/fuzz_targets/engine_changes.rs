//! Applies an arbitrary sequence of changes to a small tailnet and checks, after every step,
//! that every view equals the from-scratch computation of the same state and that the change
//! set names exactly the nodes whose view differs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netmap_core::{compute_all, Change, Engine, Node, Tailnet, User};

const POLICY: &str = r#"{
  "groups": {"group:eng": ["u0@example.com", "u1@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": []},
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:web:443", "tag:db:5432"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["*"], "dst": ["10.1.0.0/16:80"]},
    {"action": "accept", "src": ["u2@example.com"], "dst": ["*:22"]}
  ],
  "ssh": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}
  ]
}"#;

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
    for op in data.chunks(2) {
        let (a, b) = (op[0], op.get(1).copied().unwrap_or(0));
        let i = a % NODES;
        let name = format!("n{i}");
        let change = match (a / NODES) % 4 {
            0 => Change::UpsertNode {
                node: name,
                value: node(i, b),
            },
            1 => Change::RemoveNode { node: name },
            2 => Change::SetOnline {
                node: name,
                online: b % 2 == 0,
            },
            _ => Change::UpsertUser {
                user: user(b % USERS, b & 0x80 != 0),
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
                cs.nodes.contains_key(name),
                "change set entry of {name}"
            );
        }
    }
});
