//! The engine equals the from-scratch computation on the conformance corpus topologies under
//! random change sequences. The corpus is read from `../shared/conformance/cases` (or
//! `NETMAP_CONFORMANCE_DIR`); without it the test fails under CI and is skipped elsewhere.

use std::path::PathBuf;
use std::sync::OnceLock;

use netmap_core::{compute_all, diff_views, Change, Engine, Tailnet};
use proptest::prelude::*;

struct Topology {
    id: String,
    policy: String,
    tailnet: Tailnet,
}

fn corpus_dir() -> PathBuf {
    match std::env::var("NETMAP_CONFORMANCE_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/cases"),
    }
}

fn topologies() -> &'static Vec<Topology> {
    static T: OnceLock<Vec<Topology>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(corpus_dir()) else {
            return out;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            let Ok(case) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if !case["expect"]["error"].is_null() {
                continue;
            }
            let state = serde_json::json!({
                "users": case["users"], "nodes": case["nodes"], "tailnet": case["tailnet"],
            });
            let Ok(tailnet) = Tailnet::from_state_json(&state.to_string()) else {
                continue;
            };
            out.push(Topology {
                id: case["id"].as_str().unwrap_or("?").to_string(),
                policy: case["policy"].as_str().unwrap_or("{}").to_string(),
                tailnet,
            });
        }
        out
    })
}

#[derive(Debug, Clone)]
enum Op {
    Remove(usize),
    Restore(usize),
    Online(usize, bool),
    CopyTags(usize, usize),
    CopyOwner(usize, usize),
    Unapprove(usize),
    /// Approves the routes the node had approved originally.
    Reapprove(usize),
    /// The node advertises (and has approved) the routes another node advertised.
    CopyRoutes(usize, usize),
    /// A user's role changes (admin, member, none) or their email moves to another domain.
    EditUser(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..32).prop_map(Op::Remove),
        (0usize..32).prop_map(Op::Restore),
        (0usize..32, any::<bool>()).prop_map(|(i, o)| Op::Online(i, o)),
        (0usize..32, 0usize..32).prop_map(|(i, j)| Op::CopyTags(i, j)),
        (0usize..32, 0usize..32).prop_map(|(i, j)| Op::CopyOwner(i, j)),
        (0usize..32).prop_map(Op::Unapprove),
        (0usize..32).prop_map(Op::Reapprove),
        (0usize..32, 0usize..32).prop_map(|(i, j)| Op::CopyRoutes(i, j)),
        (0usize..8, 0usize..4).prop_map(|(u, k)| Op::EditUser(u, k)),
    ]
}

#[test]
fn corpus_is_present_or_skipped() {
    if topologies().is_empty() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "conformance corpus not found at {}",
            corpus_dir().display()
        );
        eprintln!("notice: conformance corpus not found; engine_on_corpus_topologies skipped");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_on_corpus_topologies(pick in any::<prop::sample::Index>(), ops in prop::collection::vec(op(), 1..16)) {
        let tops = topologies();
        if tops.is_empty() {
            return Ok(());
        }
        let top = &tops[pick.index(tops.len())];
        let original = top.tailnet.clone();
        let names: Vec<String> = original.nodes.keys().cloned().collect();
        let Ok(mut engine) = Engine::new(&top.policy, top.tailnet.clone()) else { return Ok(()) };
        for (step, op) in ops.iter().enumerate() {
            let snap = engine.snapshot();
            let snap_before = snap.clone();
            let name = |i: &usize| names[i % names.len()].clone();
            let current = |i: &usize| snap.tailnet().nodes.get(&name(i)).map(|n| (**n).clone());
            let change = match op {
                Op::Remove(i) => current(i).map(|_| Change::RemoveNode { node: name(i) }),
                Op::Restore(i) => original.nodes.get(&name(i)).map(|n| Change::UpsertNode { node: name(i), value: (**n).clone() }),
                Op::Online(i, o) => current(i).map(|_| Change::SetOnline { node: name(i), online: *o }),
                Op::CopyTags(i, j) => current(i).zip(original.nodes.get(&name(j))).map(|(mut n, m)| {
                    n.tags = m.tags.clone();
                    n.user = m.user.clone();
                    Change::UpsertNode { node: name(i), value: n }
                }),
                Op::CopyOwner(i, j) => current(i).zip(original.nodes.get(&name(j))).map(|(mut n, m)| {
                    n.user = m.user.clone().or(n.user);
                    if m.user.is_some() { n.tags.clear(); }
                    Change::UpsertNode { node: name(i), value: n }
                }),
                Op::Unapprove(i) => current(i).map(|_| Change::ApproveRoutes { node: name(i), routes: Vec::new() }),
                Op::Reapprove(i) => current(i).zip(original.nodes.get(&name(i))).map(|(_, m)| {
                    Change::ApproveRoutes { node: name(i), routes: m.approved_routes.clone() }
                }),
                Op::CopyRoutes(i, j) => current(i).zip(original.nodes.get(&name(j))).map(|(mut n, m)| {
                    n.routable_ips = m.routable_ips.clone();
                    n.approved_routes = m.routable_ips.clone();
                    Change::UpsertNode { node: name(i), value: n }
                }),
                Op::EditUser(u, k) => snap.tailnet().users.values().nth(*u).map(|user| {
                    let mut user = user.clone();
                    match k {
                        0 => user.role = Some("admin".into()),
                        1 => user.role = Some("member".into()),
                        2 => user.role = None,
                        _ => {
                            let local = user.email.split('@').next().unwrap_or("x").to_string();
                            user.email = format!("{local}@elsewhere.example");
                        }
                    }
                    Change::UpsertUser { user }
                }),
            };
            let Some(change) = change else { continue };
            let Ok(cs) = engine.apply(change) else {
                continue;
            };
            let snap = engine.snapshot();
            // The change set names exactly the nodes whose view changed.
            let before = &snap_before;
            for n in before.node_names().chain(snap.node_names()) {
                let (old, new) = (before.view(n), snap.view(n));
                prop_assert_eq!(
                    cs.get(n).cloned().unwrap_or_default(),
                    diff_views(old.as_ref(), new.as_ref()),
                    "{}: step {}: delta of {}", top.id, step, n
                );
            }
            let reference = compute_all(snap.policy(), snap.tailnet());
            prop_assert_eq!(reference.views.len(), snap.node_count());
            for (n, want) in &reference.views {
                prop_assert!(
                    snap.view(n).as_ref() == Some(want),
                    "{}: step {}: view of {} differs:\n engine {}\n scratch {}",
                    top.id, step, n,
                    serde_json::to_string(&snap.view(n)).unwrap_or_default(),
                    serde_json::to_string(want).unwrap_or_default()
                );
            }
        }
    }
}
