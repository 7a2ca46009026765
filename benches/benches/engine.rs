//! Criterion benchmarks of the engine: full builds at 1k / 10k / 50k nodes for the `ops`,
//! `allow-all` and `self` policies, each change type at 10k nodes (`ops`), and the cost of a
//! snapshot. Run with `cargo bench -p netmap-benches` (filter: `cargo bench -p netmap-benches
//! -- full_build/ops`).
//!
//! Change benchmarks keep one engine and time only the change under test; whatever restores
//! the tailnet afterwards (removing an added node, re-adding a removed one) is not timed.
// A broken engine must stop the benchmark, not be measured.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode};
use netmap_benches::{generate, Generator, PolicyKind};
use netmap_core::{load_policy, Change, Engine, Node, Tailnet};

const SEED: u64 = 1;
const CHANGE_NODES: usize = 10_000;

fn full_build(c: &mut Criterion) {
    for kind in PolicyKind::ALL {
        let mut group = c.benchmark_group(format!("full_build/{kind}"));
        group.sampling_mode(SamplingMode::Flat);
        for nodes in [1_000, 10_000, 50_000] {
            let g = generate(nodes, kind, 0, SEED);
            let (samples, secs) = match nodes {
                1_000 => (20, 5),
                10_000 => (10, 20),
                _ => (10, 60),
            };
            group.sample_size(samples);
            group.measurement_time(Duration::from_secs(secs));
            group.bench_with_input(BenchmarkId::from_parameter(nodes), &g, |b, g| {
                b.iter_batched(
                    || g.tailnet.clone(),
                    |t| Engine::new(&g.policy, t).expect("generated policy loads"),
                    BatchSize::LargeInput,
                )
            });
        }
        group.finish();
    }
}

/// Applies `steps(i)` for iterations `0..iters`: the first change of each step is timed, the
/// second (restoring the state) is not.
fn timed(
    engine: &mut Engine,
    iters: u64,
    mut steps: impl FnMut(u64) -> (Change, Option<Change>),
) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let (change, undo) = steps(i);
        let t = Instant::now();
        let cs = engine.apply(change).expect("change applies");
        total += t.elapsed();
        drop(black_box(cs));
        if let Some(u) = undo {
            engine.apply(u).expect("undo applies");
        }
    }
    total
}

/// Names of nodes matching `f`, in name order.
fn nodes_where(engine: &Engine, f: impl Fn(&Node) -> bool) -> Vec<(String, Node)> {
    engine
        .snapshot()
        .tailnet()
        .nodes
        .iter()
        .filter(|(_, n)| f(n))
        .map(|(k, n)| (k.clone(), (**n).clone()))
        .collect()
}

fn changes(c: &mut Criterion) {
    let g = generate(CHANGE_NODES, PolicyKind::Ops, 0, SEED);
    let mut engine = Engine::new(&g.policy, g.tailnet).expect("generated policy loads");
    let mut gen = g.generator;
    let servers = nodes_where(&engine, |n| {
        n.routable_ips.is_empty() && n.tags.len() == 2 && n.user.is_none()
    });
    let devices = nodes_where(&engine, |n| n.user.is_some());
    let routers = nodes_where(&engine, |n| n.tags == ["tag:router"]);
    let ordinary: Vec<(String, Node)> = servers.iter().chain(&devices).cloned().collect();
    let routes = gen.routes().to_vec();
    let cycle = |list: &[(String, Node)], i: u64| list[(i as usize) % list.len()].clone();

    let mut group = c.benchmark_group(format!("change/ops/{CHANGE_NODES}"));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));

    // A node disconnects, then reconnects (both timed): nothing reads an ordinary node's
    // presence.
    group.bench_function("set_online/ordinary", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let (node, _) = cycle(&ordinary, i / 2);
                (
                    Change::SetOnline {
                        node,
                        online: i % 2 == 1,
                    },
                    None,
                )
            })
        })
    });
    // A subnet router goes offline and back: primary election and failover.
    if !routers.is_empty() {
        group.bench_function("set_online/router", |b| {
            b.iter_custom(|iters| {
                timed(&mut engine, iters, |i| {
                    let (node, _) = cycle(&routers, i / 2);
                    (
                        Change::SetOnline {
                            node,
                            online: i % 2 == 1,
                        },
                        None,
                    )
                })
            })
        });
    }
    // A new node joins (timed) and leaves again (not timed).
    group.bench_function("upsert_node/new", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let node = format!("bench-new-{i}");
                let value = gen.new_node(&node);
                let undo = Change::RemoveNode { node: node.clone() };
                (Change::UpsertNode { node, value }, Some(undo))
            })
        })
    });
    // A node leaves (timed) and comes back (not timed).
    group.bench_function("remove_node", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let (node, value) = cycle(&ordinary, i);
                let undo = Change::UpsertNode {
                    node: node.clone(),
                    value,
                };
                (Change::RemoveNode { node }, Some(undo))
            })
        })
    });
    // A server is retagged (timed) and its tags restored (not timed).
    group.bench_function("upsert_node/retag", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let (node, value) = cycle(&servers, i);
                let retagged = Node {
                    tags: gen.server_tags(),
                    ..value.clone()
                };
                let undo = Change::UpsertNode {
                    node: node.clone(),
                    value,
                };
                (
                    Change::UpsertNode {
                        node,
                        value: retagged,
                    },
                    Some(undo),
                )
            })
        })
    });
    // A server advertises an approved subnet route (timed), then withdraws it (not timed).
    group.bench_function("upsert_node/routes", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let (node, value) = cycle(&servers, i);
                let route = routes[(i as usize) % routes.len()];
                let routed = Node {
                    routable_ips: vec![route],
                    approved_routes: vec![route],
                    ..value.clone()
                };
                let undo = Change::UpsertNode {
                    node: node.clone(),
                    value,
                };
                (
                    Change::UpsertNode {
                        node,
                        value: routed,
                    },
                    Some(undo),
                )
            })
        })
    });
    // A user signs up (timed) and is removed (not timed).
    group.bench_function("upsert_user", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |_| {
                let user = gen.new_user();
                let undo = Change::RemoveUser {
                    name: user.name.clone(),
                };
                (Change::UpsertUser { user }, Some(undo))
            })
        })
    });
    group.finish();

    // A group gains or loses a member: the policy is replaced (tailnet-wide).
    let mut group = c.benchmark_group(format!("change/ops/{CHANGE_NODES}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    let original = engine.snapshot().policy_text().to_string();
    let edited = group_edits(&gen, engine.snapshot().tailnet(), 16);
    if edited.is_empty() {
        eprintln!("no group edit passes the policy's tests; set_policy not measured");
        group.finish();
        return;
    }
    group.bench_function("set_policy/group_member", |b| {
        b.iter_custom(|iters| {
            timed(&mut engine, iters, |i| {
                let policy = edited[(i as usize) % edited.len()].clone();
                let undo = Change::SetPolicy {
                    policy: original.clone(),
                };
                (Change::SetPolicy { policy }, Some(undo))
            })
        })
    });
    // A rule is added at the end of `acls` (`group:qa` to `tag:dev:443`), and a host is
    // pointed at another node: one edit each, timed, then undone (not timed).
    let tailnet = engine.snapshot().tailnet().clone();
    let other = devices
        .get(1)
        .and_then(|(_, n)| n.ipv4)
        .map(|a| a.to_string());
    let edits = [
        (
            "set_policy/rule_added",
            gen.with_rule("group:qa", "tag:dev:443"),
        ),
        (
            "set_policy/host",
            other.and_then(|a| gen.with_host("ci-runner", &a)),
        ),
    ];
    for (name, policy) in edits {
        let Some(policy) = policy.filter(|p| load_policy(p, &tailnet).is_ok()) else {
            eprintln!("{name}: no such edit, or it fails the policy's tests; not measured");
            continue;
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(&mut engine, iters, |_| {
                    let undo = Change::SetPolicy {
                        policy: original.clone(),
                    };
                    (
                        Change::SetPolicy {
                            policy: policy.clone(),
                        },
                        Some(undo),
                    )
                })
            })
        });
    }
    group.finish();
}

/// Up to `n` policies that each differ from `base`'s by one group member and pass the
/// policy's tests.
fn group_edits(base: &Generator, tailnet: &Tailnet, n: usize) -> Vec<String> {
    let mut seeds = base.clone();
    let mut edits = Vec::new();
    for _ in 0..20 * n {
        if edits.len() == n {
            break;
        }
        let mut g = seeds.clone();
        seeds.rng().next_u64();
        if let Some(text) = g.toggle_group_member() {
            if load_policy(&text, tailnet).is_ok() {
                edits.push(text);
            }
        }
    }
    edits
}

fn snapshot(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot");
    for nodes in [CHANGE_NODES, 50_000] {
        let g = generate(nodes, PolicyKind::Ops, 0, SEED);
        let engine = Engine::new(&g.policy, g.tailnet).expect("generated policy loads");
        group.bench_with_input(BenchmarkId::new("ops", nodes), &engine, |b, e| {
            b.iter(|| e.snapshot())
        });
        let name = engine
            .snapshot()
            .node_names()
            .next()
            .map(str::to_string)
            .unwrap_or_default();
        group.bench_with_input(BenchmarkId::new("ops/view", nodes), &engine, |b, e| {
            b.iter(|| e.snapshot().view(&name).map(|v| v.peers.len()))
        });
    }
    group.finish();
}

criterion_group!(benches, full_build, changes, snapshot);
criterion_main!(benches);
