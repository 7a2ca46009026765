//! The incremental engine must equal the from-scratch computation after every change, and its
//! change set must name exactly the nodes whose view changed.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netmap_core::{
    compute_all, diff_views, Change, Engine, Node, PostureValue, Snapshot, Tailnet, User,
};
use proptest::prelude::*;

const POLICIES: &[&str] = &[
    // ops-like: groups, tags, hosts, ssh, routes, exit, self.
    r#"{
      "groups": {"group:admins": ["u0@example.com"], "group:devs": ["u1@example.com", "u2@example.com"]},
      "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": [], "tag:exit": []},
      "hosts": {"dns": "100.64.0.1", "corp": "10.0.0.0/8"},
      "acls": [
        {"action": "accept", "src": ["*"], "dst": ["dns:53"], "proto": "udp"},
        {"action": "accept", "src": ["group:admins"], "dst": ["*:*"]},
        {"action": "accept", "src": ["group:devs"], "dst": ["tag:web:80,443", "corp:22"]},
        {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "src": ["group:devs"], "dst": ["autogroup:internet:*"]}
      ],
      "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]},
      "ssh": [
        {"action": "accept", "src": ["group:admins"], "dst": ["tag:web", "tag:db"], "users": ["root"]},
        {"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}
      ],
      "nodeAttrs": [{"target": ["tag:web"], "attr": ["funnel"]}, {"target": ["group:devs"], "attr": ["disable-ipv4"]}]
    }"#,
    r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    r#"{
      "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": [], "tag:exit": []},
      "grants": [
        {"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]},
        {"src": ["autogroup:member"], "dst": ["autogroup:tagged"], "ip": ["tcp:22", "443"]},
        {"src": ["tag:web"], "dst": ["10.1.0.0/16"], "ip": ["*"], "via": ["tag:router"]},
        {"src": ["*"], "dst": ["tag:db"], "app": {"example.com/cap/x": [{"a": 1}]}}
      ],
      "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:web"], "users": ["localpart:*@example.com", "root"]}]
    }"#,
    // Postures (own and default), ipsets, SSH recorders.
    r#"{
      "groups": {"group:devs": ["u1@example.com", "u2@example.com"]},
      "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": [], "tag:exit": []},
      "ipsets": {"ipset:lan": ["add 10.1.0.0/16", "add 192.168.0.0/24", "remove 10.1.128.0/17"]},
      "postures": {"posture:mac": ["node:os == 'macos'"], "posture:recent": ["node:tsVersion >= '1.60'"]},
      "defaultSrcPosture": ["posture:recent"],
      "acls": [
        {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
        {"action": "accept", "src": ["group:devs"], "dst": ["ipset:lan:*", "tag:db:5432"], "srcPosture": ["posture:mac"]},
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}
      ],
      "grants": [{"src": ["*"], "dst": ["tag:db"], "ip": ["tcp:22"], "srcPosture": ["posture:mac", "posture:recent"]}],
      "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]},
      "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:web"], "users": ["root"],
               "srcPosture": ["posture:mac"], "recorder": ["tag:db"], "enforceRecorder": true}]
    }"#,
];

/// Device postures a node may report: none, an old and a new macOS client, a Linux client.
const POSTURES: &[&[(&str, &str)]] = &[
    &[],
    &[("node:os", "macos"), ("node:tsVersion", "1.58.2")],
    &[("node:os", "macos"), ("node:tsVersion", "1.62.0")],
    &[("node:os", "linux"), ("node:tsVersion", "1.70.1")],
];

const TAGS: &[&str] = &["tag:web", "tag:db", "tag:router", "tag:exit"];
const ROUTES: &[&str] = &[
    "10.1.0.0/16",
    "10.2.0.0/16",
    "0.0.0.0/0",
    "::/0",
    "192.168.0.0/24",
];

#[derive(Debug, Clone)]
struct NodeSpec {
    owner: Option<usize>,
    tags: Vec<usize>,
    v4: bool,
    v6: bool,
    routes: Vec<usize>,
    approved: Vec<usize>,
    online: bool,
    host: u8,
    posture: usize,
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        prop::option::of(0usize..4),
        prop::collection::vec(0usize..TAGS.len(), 0..3),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(0usize..ROUTES.len(), 0..3),
        prop::collection::vec(0usize..ROUTES.len(), 0..3),
        any::<bool>(),
        0u8..6,
        0usize..POSTURES.len(),
    )
        .prop_map(
            |(owner, tags, v4, v6, routes, approved, online, host, posture)| NodeSpec {
                tags: if owner.is_some() { Vec::new() } else { tags },
                owner,
                v4: v4 || !v6,
                v6,
                routes,
                approved,
                online,
                host,
                posture,
            },
        )
}

fn build_node(id: u32, s: &NodeSpec) -> Node {
    let mut tags: Vec<String> = s.tags.iter().map(|&t| TAGS[t].to_string()).collect();
    tags.sort();
    tags.dedup();
    let owner = if tags.is_empty() {
        Some(s.owner.unwrap_or(0))
    } else {
        None
    };
    let route = |i: &usize| ROUTES[*i].parse::<IpNet>().ok();
    Node {
        hostname: format!("host{}", s.host),
        user: owner.map(|u| format!("u{u}")),
        tags,
        ipv4: s
            .v4
            .then(|| Ipv4Addr::new(100, 64, (id / 250) as u8, (id % 250) as u8 + 1)),
        ipv6: s
            .v6
            .then(|| Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, id as u16 + 1)),
        routable_ips: s.routes.iter().filter_map(route).collect(),
        approved_routes: s.approved.iter().filter_map(route).collect(),
        created: format!("2026-01-01T00:{:02}:{:02}Z", id / 60 % 60, id % 60),
        online: s.online,
        posture: POSTURES[s.posture]
            .iter()
            .map(|(k, v)| (k.to_string(), PostureValue::String(v.to_string())))
            .collect(),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Upsert(u32, NodeSpec),
    Remove(u32),
    Online(u32, bool),
    User(usize, bool),
    RemoveUser(usize),
    Policy(usize),
    Approve(u32, Vec<usize>),
    /// A small edit of the editable policy ([`EDITABLE`]): which edit, and a choice for it.
    Edit(usize, usize),
    /// Several such edits committed at once (a reviewed change often holds a few).
    Edits(Vec<(usize, usize)>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..14, node_spec()).prop_map(|(i, s)| Op::Upsert(i, s)),
        2 => (0u32..14).prop_map(Op::Remove),
        3 => (0u32..14, any::<bool>()).prop_map(|(i, o)| Op::Online(i, o)),
        1 => (0usize..6, any::<bool>()).prop_map(|(u, d)| Op::User(u, d)),
        1 => (0usize..6).prop_map(Op::RemoveUser),
        1 => (0usize..POLICIES.len()).prop_map(Op::Policy),
        1 => (0u32..14, prop::collection::vec(0usize..ROUTES.len(), 0..3)).prop_map(|(i, r)| Op::Approve(i, r)),
    ]
}

/// Changes mixed with small policy edits of every kind.
fn edit_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..14, node_spec()).prop_map(|(i, s)| Op::Upsert(i, s)),
        1 => (0u32..14).prop_map(Op::Remove),
        2 => (0u32..14, any::<bool>()).prop_map(|(i, o)| Op::Online(i, o)),
        1 => (0usize..6, any::<bool>()).prop_map(|(u, d)| Op::User(u, d)),
        1 => (0u32..14, prop::collection::vec(0usize..ROUTES.len(), 0..3)).prop_map(|(i, r)| Op::Approve(i, r)),
        6 => (0usize..EDITS, 0usize..8).prop_map(|(k, c)| Op::Edit(k, c)),
        1 => (0usize..3).prop_map(|c| Op::Edit(TEST_EDIT, c)),
        // u1 (the test's source) into or out of a group: the test's verdict changes.
        1 => (2usize..4).prop_map(|c| Op::Edit(0, c)),
        // The ports of a rule whose sources (`*`) hold u1: with u1 in no group, the test's
        // verdict changes with them; or of the rule whose source is the host `ci`, which an
        // address test's verdict reads while `ci` names that address.
        1 => (0usize..5).prop_map(|c| Op::Edit(1, c)),
        1 => (8usize..10).prop_map(|c| Op::Edit(1, c)),
        2 => prop::collection::vec((0usize..EDITS, 0usize..8), 2..4).prop_map(Op::Edits),
    ]
}

/// A policy exercising every part an edit can touch: groups, hosts, ipsets, postures,
/// rules of every kind, SSH, node attributes and auto-approvers.
const EDITABLE: &str = r#"{
  "groups": {"group:admins": ["u0@example.com"], "group:devs": ["u1@example.com", "u2@example.com"]},
  "tagOwners": {"tag:web": [], "tag:db": [], "tag:router": [], "tag:exit": []},
  "hosts": {"dns": "100.64.0.1", "corp": "10.0.0.0/8", "ci": "100.64.0.3"},
  "ipsets": {"ipset:lan": ["add 10.1.0.0/16", "add 192.168.0.0/24"]},
  "postures": {"posture:mac": ["node:os == 'macos'"], "posture:recent": ["node:tsVersion >= '1.60'"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["dns:53"], "proto": "udp"},
    {"action": "accept", "src": ["*"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["group:admins"], "dst": ["*:*"]},
    {"action": "accept", "src": ["group:devs"], "dst": ["tag:web:80,443", "corp:22", "ipset:lan:22"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["group:devs"], "dst": ["autogroup:internet:*"]},
    {"action": "accept", "src": ["group:devs"], "dst": ["tag:web:8080"]},
    {"action": "accept", "src": ["dns", "ipset:lan"], "dst": ["tag:web:22"]},
    {"action": "accept", "src": ["ci"], "dst": ["tag:web:2222"]}
  ],
  "grants": [
    {"src": ["*"], "dst": ["tag:db"], "app": {"example.com/cap/x": [{"a": 1}]}},
    {"src": ["tag:web"], "dst": ["10.1.0.0/16"], "ip": ["*"], "via": ["tag:router"]}
  ],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}, "exitNode": ["tag:exit"]},
  "ssh": [
    {"action": "accept", "src": ["group:admins"], "dst": ["tag:web", "tag:db"], "users": ["root"]},
    {"action": "check", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}
  ],
  "nodeAttrs": [{"target": ["tag:web"], "attr": ["funnel"]}]
}"#;

/// How many kinds of edit [`edit_policy`] makes that any tailnet accepts.
const EDITS: usize = 16;

/// The edit that adds or drops a policy test whose verdict depends on the tailnet and on the
/// other edits (u1 reaches a `tag:web` device but no `tag:db` device on port 22; or an
/// address in a subnet route reaches a `tag:web` device): while it is in the policy, every edit
/// runs it (unless nothing it reads changed), and one that makes it fail is rejected.
const TEST_EDIT: usize = EDITS;

fn toggle(list: &mut serde_json::Value, item: serde_json::Value) {
    if let Some(v) = list.as_array_mut() {
        match v.iter().position(|x| *x == item) {
            Some(i) => {
                v.remove(i);
            }
            None => v.push(item),
        }
    }
}

/// Applies edit `kind` (with choice `c`) to the editable policy: the kinds an operator commits
/// (a group member, one rule's ports, a rule added or dropped, a host, a tag owner) and every
/// other part the engine compares (ipsets, postures, SSH, node attributes, auto-approvers,
/// rule order, protocols, tailnet-wide switches, `via`), plus an edit that changes nothing
/// but the text.
fn edit_policy(p: &mut serde_json::Value, kind: usize, c: usize) {
    use serde_json::json;
    let users = [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
        "u3@example.org",
    ];
    match kind {
        0 => {
            let g = ["group:admins", "group:devs"][c % 2];
            toggle(&mut p["groups"][g], json!(users[c / 2 % users.len()]));
        }
        1 if c >= 8 => {
            // The ports of the rule whose source is `ci` (a prefix).
            let ports = ["tag:web:2222", "tag:web:2223"][c % 2];
            p["acls"][9]["dst"] = json!([ports]);
        }
        1 if c >= 5 => {
            // One destination's ports, of a rule with several (on `tag:web` devices its
            // entry merges with the last rule's).
            let (a, b) = [
                ("tag:web:80,443", "tag:web:443"),
                ("corp:22", "corp:22-23"),
                ("ipset:lan:22", "ipset:lan:*"),
            ][(c - 5) % 3];
            let rule = p["acls"].as_array_mut().and_then(|acls| {
                acls.iter_mut()
                    .find(|r| r["dst"].as_array().is_some_and(|d| d.len() == 3))
            });
            if let Some(dst) = rule.and_then(|r| r["dst"].get_mut((c - 5) % 3)) {
                *dst = json!(if *dst == json!(a) { b } else { a });
            }
        }
        1 => {
            let ports = ["80,443", "443", "80,443,8080", "*", "1000-2000"][c % 5];
            p["acls"][1]["dst"] = json!([format!("tag:web:{ports}")]);
        }
        2 => {
            let extra = json!({"action": "accept", "src": ["group:admins", "tag:db"], "dst": ["tag:db:443"]});
            let acls = p["acls"]
                .as_array_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            let had = acls.contains(&extra);
            let mut acls: Vec<serde_json::Value> =
                acls.into_iter().filter(|r| *r != extra).collect();
            if !had {
                acls.insert(c % (acls.len() + 1), extra);
            }
            p["acls"] = json!(acls);
        }
        // `ci` is a source only: its edits move nodes in one rule's sources, nothing else.
        3 if c >= 6 => p["hosts"]["ci"] = json!(["100.64.0.3", "10.9.9.9"][c % 2]),
        3 => p["hosts"]["dns"] = json!(format!("100.64.0.{}", 1 + c % 6)),
        4 => toggle(&mut p["tagOwners"]["tag:web"], json!("group:admins")),
        5 => toggle(
            &mut p["ipsets"]["ipset:lan"],
            json!(["add 10.2.0.0/16", "remove 10.1.128.0/17"][c % 2]),
        ),
        6 => {
            p["postures"]["posture:recent"] =
                json!([format!("node:tsVersion >= '1.{}'", [55, 60, 65][c % 3])]);
        }
        7 => {
            if p.get("defaultSrcPosture").is_some() {
                p.as_object_mut().map(|o| o.remove("defaultSrcPosture"));
            } else {
                p["defaultSrcPosture"] = json!(["posture:recent"]);
            }
        }
        8 => {
            let rule = &mut p["acls"][3];
            if rule.get("srcPosture").is_some() {
                rule.as_object_mut().map(|o| o.remove("srcPosture"));
            } else {
                rule["srcPosture"] = json!(["posture:mac"]);
            }
        }
        9 => toggle(&mut p["ssh"][0]["users"], json!(["ubuntu", "admin"][c % 2])),
        10 if c % 4 == 3 => {
            // An attribute alone, for the same nodes.
            toggle(&mut p["nodeAttrs"][0]["attr"], json!("drive:share"));
        }
        10 => {
            let targets = [json!(["tag:web"]), json!(["tag:db"]), json!(["group:devs"])];
            p["nodeAttrs"][0]["target"] = targets[c % 3].clone();
            if c % 2 == 1 {
                toggle(&mut p["nodeAttrs"][0]["attr"], json!("disable-ipv4"));
            }
        }
        11 => {
            toggle(
                &mut p["autoApprovers"]["routes"]["10.0.0.0/8"],
                json!("group:devs"),
            );
            if c % 2 == 1 {
                toggle(&mut p["autoApprovers"]["exitNode"], json!("tag:exit"));
            }
        }
        12 => {
            if let Some(acls) = p["acls"].as_array_mut() {
                let n = acls.len();
                if n > 1 {
                    acls.swap(c % n, (c + 1) % n);
                }
            }
        }
        13 => p["acls"][0]["proto"] = json!(["udp", "tcp"][c % 2]),
        14 => {
            p["randomizeClientPort"] = json!([true, false][c % 2]);
            p["disableIPv4"] = json!([true, false, false][c % 3]);
        }
        TEST_EDIT => {
            if p.get("tests").is_none() {
                p["tests"] = json!([]);
            }
            let test = match c % 3 {
                0 => {
                    json!({"src": "u1@example.com", "accept": ["tag:web:80"], "deny": ["tag:db:22"]})
                }
                // An address outside the tailnet as the source: `*` covers it only through an
                // approved route.
                1 => json!({"src": "10.1.2.3", "accept": ["tag:web:80"]}),
                // One that the last rule's sources hold while `ci` names it (edit 3): a
                // host edit turns its verdict.
                _ => json!({"src": "10.9.9.9", "deny": ["tag:web:2222"]}),
            };
            toggle(&mut p["tests"], test);
        }
        _ => toggle(&mut p["grants"][1]["via"], json!("tag:db")),
    }
}

fn user(u: usize, other_domain: bool) -> User {
    User {
        id: u as u64 + 1,
        name: format!("u{u}"),
        email: format!(
            "u{u}@{}",
            if other_domain {
                "example.org"
            } else {
                "example.com"
            }
        ),
        role: None,
    }
}

fn initial(nodes: &[NodeSpec]) -> Tailnet {
    let mut t = Tailnet::default();
    t.settings.name = "u0@example.com".into();
    for u in 0..4 {
        let user = user(u, u == 3);
        t.users.insert(user.name.clone(), user);
    }
    for (i, s) in nodes.iter().enumerate() {
        let name = format!("n{i}");
        t.assign_dns_name(&name, &format!("host{}", s.host));
        t.nodes
            .insert(name, std::sync::Arc::new(build_node(i as u32, s)));
    }
    t
}

fn change_for(op: &Op, snap: &Snapshot) -> Option<Change> {
    let name = |i: &u32| format!("n{i}");
    Some(match op {
        Op::Upsert(i, s) => Change::UpsertNode {
            node: name(i),
            value: build_node(*i, s),
        },
        Op::Remove(i) => {
            snap.tailnet().nodes.get(&name(i))?;
            Change::RemoveNode { node: name(i) }
        }
        Op::Online(i, o) => {
            snap.tailnet().nodes.get(&name(i))?;
            Change::SetOnline {
                node: name(i),
                online: *o,
            }
        }
        Op::User(u, d) => Change::UpsertUser { user: user(*u, *d) },
        Op::RemoveUser(u) => {
            snap.tailnet().users.get(&format!("u{u}"))?;
            Change::RemoveUser {
                name: format!("u{u}"),
            }
        }
        Op::Policy(p) => Change::SetPolicy {
            policy: POLICIES[*p].to_string(),
        },
        Op::Approve(i, r) => {
            snap.tailnet().nodes.get(&name(i))?;
            Change::ApproveRoutes {
                node: name(i),
                routes: r.iter().filter_map(|x| ROUTES[*x].parse().ok()).collect(),
            }
        }
        // Made by the test from the policy under edit.
        Op::Edit(..) | Op::Edits(..) => return None,
    })
}

fn check_equal(step: usize, snap: &Snapshot) -> Result<(), TestCaseError> {
    let reference = compute_all(snap.policy(), snap.tailnet());
    prop_assert_eq!(
        reference.views.len(),
        snap.node_count(),
        "step {}: node count differs",
        step
    );
    for (name, want) in &reference.views {
        let got = snap.view(name);
        prop_assert!(
            got.as_ref() == Some(want),
            "step {step}: view of {name} differs from scratch:\n engine {}\n scratch {}",
            serde_json::to_string(&got).unwrap_or_default(),
            serde_json::to_string(want).unwrap_or_default()
        );
    }
    Ok(())
}

proptest! {
    // Sized for CI; raise with PROPTEST_CASES for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_equals_from_scratch(
        nodes in prop::collection::vec(node_spec(), 1..10),
        policy in 0usize..POLICIES.len(),
        ops in prop::collection::vec(op(), 1..25),
    ) {
        run_case(POLICIES[policy], &nodes, &ops)?;
    }

    /// Small policy edits of every kind, between node, route, presence and user changes.
    #[test]
    fn engine_follows_policy_edits(
        nodes in prop::collection::vec(node_spec(), 1..10),
        ops in prop::collection::vec(edit_op(), 1..25),
    ) {
        run_case(EDITABLE, &nodes, &ops)?;
    }
}

/// Builds an engine on `policy` and `nodes`, applies `ops`, and checks after every step that
/// the engine equals the from-scratch computation and that its change set names exactly the
/// nodes whose view changed, each with what changed.
fn run_case(policy: &str, nodes: &[NodeSpec], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut engine = Engine::new(policy, initial(nodes))
        .map_err(|e| TestCaseError::fail(format!("engine: {e}")))?;
    check_equal(0, &engine.snapshot())?;
    let mut editable: serde_json::Value =
        serde_json::from_str(EDITABLE).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (step, op) in ops.iter().enumerate() {
        let before = engine.snapshot();
        let mut edited = None;
        let change = match op {
            Op::Edit(kind, c) => edit_change(&editable, &[(*kind, *c)], &mut edited),
            Op::Edits(edits) => edit_change(&editable, edits, &mut edited),
            _ => match change_for(op, &before) {
                Some(c) => c,
                None => continue,
            },
        };
        let result = engine.apply(change.clone());
        if let Change::SetPolicy { policy } = &change {
            // The engine takes a policy exactly when it passes checks and tests from scratch.
            let verdict = netmap_core::load_policy(policy, before.tailnet());
            prop_assert_eq!(
                result.is_ok(),
                verdict.is_ok(),
                "step {}: engine and scratch disagree on accepting {:?}: {:?} / {:?}",
                step + 1,
                op,
                result.as_ref().err(),
                verdict.as_ref().err()
            );
        }
        let cs = match result {
            Ok(cs) => cs,
            Err(_) => {
                // A rejected change leaves everything as it was.
                let after = engine.snapshot();
                prop_assert!(
                    after.views().eq(before.views()),
                    "rejected change altered views"
                );
                prop_assert_eq!(after.policy_text(), before.policy_text());
                continue;
            }
        };
        if let Some(p) = edited {
            editable = p;
        }
        let after = engine.snapshot();
        check_equal(step + 1, &after)?;
        let names: BTreeSet<&str> = before.node_names().chain(after.node_names()).collect();
        for n in names {
            let (old, new) = (before.view(n), after.view(n));
            prop_assert_eq!(
                old != new,
                cs.contains(n),
                "step {}: change set and views disagree for {} after {:?}",
                step + 1,
                n,
                op
            );
            let want = diff_views(old.as_ref(), new.as_ref());
            prop_assert_eq!(
                cs.get(n).cloned().unwrap_or_default(),
                want,
                "step {}: delta of {} after {:?}",
                step + 1,
                n,
                op
            );
        }
    }
    Ok(())
}

/// The change setting the editable policy `editable` with `edits` made (the edited policy
/// is kept in `edited`, taken if the engine accepts it).
fn edit_change(
    editable: &serde_json::Value,
    edits: &[(usize, usize)],
    edited: &mut Option<serde_json::Value>,
) -> Change {
    let mut p = editable.clone();
    for &(kind, c) in edits {
        edit_policy(&mut p, kind, c);
    }
    let text = serde_json::to_string_pretty(&p).unwrap_or_default();
    *edited = Some(p);
    Change::SetPolicy { policy: text }
}

/// Every edit the property test makes yields a policy the engine accepts (so the edits are
/// exercised, not rejected).
#[test]
fn policy_edits_are_valid() {
    let tailnet = initial(&[]);
    let base: serde_json::Value = serde_json::from_str(EDITABLE).unwrap();
    for kind in 0..EDITS {
        for c in 0..8 {
            let mut p = base.clone();
            edit_policy(&mut p, kind, c);
            let text = serde_json::to_string(&p).unwrap();
            assert!(
                netmap_core::load_policy(&text, &tailnet).is_ok(),
                "edit {kind}/{c}: {:?}",
                netmap_core::load_policy(&text, &tailnet).err()
            );
            edit_policy(&mut p, kind, c + 1);
            let text = serde_json::to_string(&p).unwrap();
            assert!(
                netmap_core::load_policy(&text, &tailnet).is_ok(),
                "edit {kind}/{c} twice"
            );
        }
    }
}
