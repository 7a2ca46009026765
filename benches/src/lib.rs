//! Synthetic tailnets for the benchmarks: the shapes of `../shared/bench/gen_tailnet.py`
//! (users in six teams, tagged servers per environment and role, a few subnet routers and exit
//! nodes, user devices; the `ops`, `allow-all` and `self` policies; the same change mix),
//! built directly in Rust with a small deterministic PRNG. The same arguments give the same
//! tailnet; the numbers drawn differ from the Python generator's, the proportions do not.
//!
//! ```
//! use netmap_benches::{generate, PolicyKind};
//! let g = generate(100, PolicyKind::Ops, 20, 1);
//! assert_eq!(g.tailnet.nodes.len(), 100);
//! assert_eq!(g.changes.len(), 20);
//! assert!(netmap_core::Engine::new(&g.policy, g.tailnet.clone()).is_ok());
//! ```

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netmap_core::{Change, Node, Tailnet, User};
use serde_json::{json, Value};

const ENVS: [&str; 4] = ["prod", "staging", "testing", "dev"];
const ROLES: [&str; 8] = [
    "web",
    "api",
    "db",
    "cache",
    "mq",
    "k8s",
    "monitoring",
    "bastion",
];
const TEAMS: [&str; 6] = [
    "ops-admin",
    "ops-member",
    "dev-senior",
    "dev-junior",
    "qa",
    "dba",
];
/// 2026-01-01T00:00:00Z, the creation time of address index 0.
const EPOCH_2026: i64 = 1_767_225_600;

/// Which benchmark policy to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// A multi-environment operations layout: groups per team, tags per environment and role,
    /// bastion, databases, subnet routers, exit nodes, SSH rules and tests.
    Ops,
    /// One rule: everyone reaches everything.
    AllowAll,
    /// Members reach their own devices, and tagged servers on 22 and 443.
    SelfOnly,
}

impl PolicyKind {
    /// All three, in the order the reports list them.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Ops, PolicyKind::AllowAll, PolicyKind::SelfOnly];

    /// The name gen_tailnet.py uses (`ops`, `allow-all`, `self`).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Ops => "ops",
            PolicyKind::AllowAll => "allow-all",
            PolicyKind::SelfOnly => "self",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// SplitMix64: small, fast, deterministic; good enough to pick shapes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index in `0..n` (`n` > 0; returns 0 for `n` = 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// One element of a non-empty slice (`None` when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len()))
    }
}

/// A generated tailnet: the policy text, the tailnet and a change stream.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The policy (JSON, which HuJSON accepts).
    pub policy: String,
    /// The tailnet (users, nodes; MagicDNS names assigned in creation order).
    pub tailnet: Tailnet,
    /// Changes in the proportions of gen_tailnet.py.
    pub changes: Vec<Change>,
    /// The generator after the tailnet and the changes: nodes it makes next get fresh
    /// addresses, users fresh names, and its policy is the one after the changes.
    pub generator: Generator,
}

/// The generator's state; [`generate`] is the usual entry point, the methods let benchmarks
/// make more nodes and policies of the same shapes.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: Rng,
    kind: PolicyKind,
    users: Vec<User>,
    /// Indexes into `users`, per team (in `TEAMS` order).
    by_team: Vec<Vec<usize>>,
    routes: Vec<IpNet>,
    next_ip: u32,
    policy: Value,
}

impl Generator {
    /// Users and routes for a tailnet of `nodes` nodes (no nodes yet).
    pub fn new(nodes: usize, kind: PolicyKind, seed: u64) -> Generator {
        let n_users = TEAMS.len().max(nodes / 10);
        let mut by_team = vec![Vec::new(); TEAMS.len()];
        let users = (0..n_users)
            .map(|i| {
                by_team[i % TEAMS.len()].push(i);
                user(i)
            })
            .collect();
        let routes = (0..(nodes / 100).max(1))
            .map(|i| {
                let a = Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 0);
                IpNet::V4(Ipv4Net::new_assert(a, 24))
            })
            .collect();
        let mut g = Generator {
            rng: Rng::new(seed),
            kind,
            users,
            by_team,
            routes,
            next_ip: 3,
            policy: Value::Null,
        };
        g.policy = g.initial_policy(None);
        g
    }

    /// The random source.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// The subnet routes routers advertise.
    pub fn routes(&self) -> &[IpNet] {
        &self.routes
    }

    /// The current policy text.
    pub fn policy_text(&self) -> String {
        self.text_of(&self.policy)
    }

    /// `policy` as the text of one of this generator's policies.
    fn text_of(&self, policy: &Value) -> String {
        format!(
            "// synthetic benchmark policy ({})\n{policy:#}\n",
            self.kind
        )
    }

    /// A new node with the next free addresses: a user's device (25%), a subnet router (1%),
    /// an exit node (0.2%) or a server tagged with an environment and a role.
    pub fn new_node(&mut self, name: &str) -> Node {
        let i = self.next_ip;
        self.next_ip += 1;
        let mut node = Node {
            hostname: name.to_string(),
            ipv4: Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)),
            ipv6: Some(Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)) + u128::from(i),
            )),
            created: rfc3339(EPOCH_2026 + i64::from(i)),
            online: true,
            ..Node::default()
        };
        let r = self.rng.unit();
        if r < 0.25 {
            let u = self.rng.below(self.users.len());
            node.user = self.users.get(u).map(|u| u.name.clone());
        } else if r < 0.26 {
            node.tags = vec!["tag:router".into()];
            let route = self.routes[self.rng.below(self.routes.len())];
            node.routable_ips = vec![route];
            node.approved_routes = vec![route];
        } else if r < 0.262 {
            node.tags = vec!["tag:exit".into()];
            let exits = vec![
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
            ];
            node.routable_ips.clone_from(&exits);
            node.approved_routes = exits;
        } else {
            node.tags = self.server_tags();
        }
        node
    }

    /// An environment tag and a role tag.
    pub fn server_tags(&mut self) -> Vec<String> {
        let env = ENVS[self.rng.below(ENVS.len())];
        let role = ROLES[self.rng.below(ROLES.len())];
        vec![format!("tag:{env}"), format!("tag:{role}")]
    }

    /// Adds a user; returns it.
    pub fn new_user(&mut self) -> User {
        let u = user(self.users.len());
        self.users.push(u.clone());
        u
    }

    /// `ops` only: adds a random user to a random team's group, or removes them when already
    /// a member (and not the last one); returns the new policy text, `None` for other policies.
    pub fn toggle_group_member(&mut self) -> Option<String> {
        if self.kind != PolicyKind::Ops {
            return None;
        }
        let team = TEAMS[self.rng.below(TEAMS.len())];
        let email = Value::from(self.users[self.rng.below(self.users.len())].email.clone());
        let members = self
            .policy
            .get_mut("groups")
            .and_then(|g| g.get_mut(format!("group:{team}")))
            .and_then(Value::as_array_mut)?;
        match members.iter().position(|m| *m == email) {
            Some(i) if members.len() > 1 => {
                members.remove(i);
            }
            _ => members.push(email),
        }
        Some(self.policy_text())
    }

    /// `ops` only: the policy text with one more rule at the end of `acls`, accepting
    /// `src` to `dst` (one alias each); `None` for other policies.
    pub fn with_rule(&self, src: &str, dst: &str) -> Option<String> {
        self.edited(|p| {
            let rule = json!({"action": "accept", "src": [src], "dst": [dst]});
            p.get_mut("acls")?.as_array_mut()?.push(rule);
            Some(())
        })
    }

    /// `ops` only: the policy text with host `name` defined as `addr`; `None` for other
    /// policies.
    pub fn with_host(&self, name: &str, addr: &str) -> Option<String> {
        self.edited(|p| {
            let hosts = p.get_mut("hosts")?.as_object_mut()?;
            hosts.insert(name.to_string(), Value::from(addr));
            Some(())
        })
    }

    /// `ops` only: the text of a copy of the policy that `edit` changed (`None` when it
    /// finds nothing to change).
    fn edited(&self, edit: impl FnOnce(&mut Value) -> Option<()>) -> Option<String> {
        if self.kind != PolicyKind::Ops {
            return None;
        }
        let mut policy = self.policy.clone();
        edit(&mut policy)?;
        Some(self.text_of(&policy))
    }

    /// The policy. Its tests' sources are the first member of their team, or with
    /// `with_devices` the first member who owns a device (a test whose source matches no
    /// device is invalid; with no such member the test is left out, which only happens in
    /// tailnets of a few dozen nodes).
    fn initial_policy(&self, with_devices: Option<&HashSet<&str>>) -> Value {
        let owners: serde_json::Map<String, Value> = ENVS
            .iter()
            .chain(ROLES.iter())
            .chain(["router", "exit"].iter())
            .map(|t| {
                let owners = if self.kind == PolicyKind::Ops {
                    json!(["group:ops-admin"])
                } else {
                    json!([])
                };
                (format!("tag:{t}"), owners)
            })
            .collect();
        match self.kind {
            PolicyKind::AllowAll => {
                json!({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
            }
            PolicyKind::SelfOnly => json!({
                "acls": [
                    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
                    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:tagged:22,443"]},
                ],
                "tagOwners": owners,
            }),
            PolicyKind::Ops => {
                let groups: serde_json::Map<String, Value> = TEAMS
                    .iter()
                    .zip(&self.by_team)
                    .map(|(t, members)| {
                        let emails = members.iter().map(|&i| self.users[i].email.clone());
                        (format!("group:{t}"), Value::from_iter(emails))
                    })
                    .collect();
                let first = |team: usize| {
                    let members = &self.by_team[team];
                    match with_devices {
                        None => members.first(),
                        Some(d) => members
                            .iter()
                            .find(|&&i| d.contains(self.users[i].name.as_str())),
                    }
                    .map(|&i| self.users[i].email.clone())
                };
                let tests: Vec<Value> = [
                    first(3).map(|src| json!({"src": src, "accept": ["tag:dev:22"], "deny": ["tag:prod:22"]})),
                    first(0).map(|src| json!({"src": src, "accept": ["tag:prod:22", "tag:db:5432"]})),
                ]
                .into_iter()
                .flatten()
                .collect();
                let route_dsts: Vec<String> = self
                    .routes
                    .iter()
                    .take(4)
                    .map(|r| format!("{r}:*"))
                    .collect();
                json!({
                    "groups": groups,
                    "tagOwners": owners,
                    "hosts": {"dns-server": "100.64.0.1", "ci-runner": "100.64.0.2", "corp-net": "10.0.0.0/8"},
                    "acls": [
                        {"action": "accept", "src": ["*"], "dst": ["dns-server:53"], "proto": "udp"},
                        {"action": "accept", "src": ["*"], "dst": ["tag:monitoring:9090,9093,3000"]},
                        {"action": "accept", "src": ["group:ops-admin"], "dst": ["*:*"]},
                        {"action": "accept", "src": ["group:ops-member"], "dst": ["tag:staging:*", "tag:testing:*", "tag:dev:*"]},
                        {"action": "accept", "src": ["group:ops-member", "group:dba"], "dst": ["tag:bastion:22"]},
                        {"action": "accept", "src": ["group:dba"], "dst": ["tag:db:3306,5432,6379,27017"]},
                        {"action": "accept", "src": ["group:dev-senior"], "dst": ["tag:staging:*", "tag:testing:*", "tag:dev:*"]},
                        {"action": "accept", "src": ["group:dev-junior"], "dst": ["tag:dev:*"]},
                        {"action": "accept", "src": ["group:qa"], "dst": ["tag:testing:*", "tag:staging:80,443,8080"]},
                        {"action": "accept", "src": ["tag:web"], "dst": ["tag:api:8080,8443"]},
                        {"action": "accept", "src": ["tag:api"], "dst": ["tag:db:3306,5432", "tag:cache:6379", "tag:mq:5672,15672"]},
                        {"action": "accept", "src": ["tag:k8s"], "dst": ["tag:k8s:*"]},
                        {"action": "accept", "src": ["ci-runner"], "dst": ["tag:testing:22,80,443,8080"]},
                        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
                        {"action": "accept", "src": ["group:ops-admin", "group:dev-senior"], "dst": ["autogroup:internet:*"]},
                        {"action": "accept", "src": ["group:ops-admin"], "dst": route_dsts},
                    ],
                    "autoApprovers": {
                        "routes": {"10.0.0.0/8": ["tag:router"], "192.168.0.0/16": ["tag:router"]},
                        "exitNode": ["tag:exit"],
                    },
                    "ssh": [
                        {"action": "accept", "src": ["group:ops-admin"], "dst": ["tag:prod", "tag:staging"], "users": ["root", "ubuntu"]},
                        {"action": "check", "src": ["group:ops-member"], "dst": ["tag:staging", "tag:testing", "tag:dev"], "users": ["ubuntu"]},
                        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]},
                    ],
                    "tests": tests,
                })
            }
        }
    }
}

fn user(i: usize) -> User {
    User {
        id: i as u64 + 1,
        name: format!("user{i}"),
        email: format!("user{i}@example.com"),
        role: None,
    }
}

/// Formats seconds since the Unix epoch as RFC 3339 (UTC).
fn rfc3339(secs: i64) -> String {
    netmap_core::format_rfc3339(secs, 0)
}

/// The last value generated for a node; nodes created by the change stream are not
/// remembered (as in gen_tailnet.py), so editing one makes a fresh node of that name.
fn existing(g: &mut Generator, known: &HashMap<String, Node>, name: &str) -> Node {
    match known.get(name) {
        Some(n) => n.clone(),
        None => g.new_node(name),
    }
}

/// A tailnet of `nodes` nodes named `node0`… under `kind`, and `changes` changes mixed as
/// gen_tailnet.py mixes them: 40% set_online, 15% new node, 10% node removed, 10% retag,
/// 10% routes advertised (70% approved), 10% group edit (`ops` only) and the rest new users.
pub fn generate(nodes: usize, kind: PolicyKind, changes: usize, seed: u64) -> Generated {
    let mut g = Generator::new(nodes, kind, seed);
    let mut tailnet = Tailnet::default();
    for u in &g.users {
        tailnet.users.insert(u.name.clone(), u.clone());
    }
    let mut known: HashMap<String, Node> = HashMap::new();
    for i in 0..nodes {
        let name = format!("node{i}");
        let node = g.new_node(&name);
        tailnet.assign_dns_name(&name, &node.hostname);
        tailnet
            .nodes
            .insert(name.clone(), std::sync::Arc::new(node.clone()));
        known.insert(name, node);
    }
    let with_devices: HashSet<&str> = known.values().filter_map(|n| n.user.as_deref()).collect();
    g.policy = g.initial_policy(Some(&with_devices));
    let policy = g.policy_text();

    let mut live: Vec<String> = (0..nodes).map(|i| format!("node{i}")).collect();
    let mut next_name = nodes;
    let mut out = Vec::with_capacity(changes);
    for _ in 0..changes {
        let r = g.rng.unit();
        let pick = g.rng.below(live.len());
        let name = live.get(pick).cloned().unwrap_or_default();
        let change = if r < 0.40 {
            Change::SetOnline {
                node: name,
                online: g.rng.unit() < 0.5,
            }
        } else if r < 0.55 {
            let new = format!("node{next_name}");
            next_name += 1;
            live.push(new.clone());
            let value = g.new_node(&new);
            Change::UpsertNode { node: new, value }
        } else if r < 0.65 && live.len() > 2 {
            live.remove(pick);
            Change::RemoveNode { node: name }
        } else if r < 0.75 {
            let mut v = existing(&mut g, &known, &name);
            if !v.tags.is_empty() {
                v.tags = g.server_tags();
            }
            known.insert(name.clone(), v.clone());
            Change::UpsertNode {
                node: name,
                value: v,
            }
        } else if r < 0.85 {
            let mut v = existing(&mut g, &known, &name);
            let route = g.routes[g.rng.below(g.routes.len())];
            v.routable_ips = vec![route];
            v.approved_routes = if g.rng.unit() < 0.7 {
                vec![route]
            } else {
                Vec::new()
            };
            known.insert(name.clone(), v.clone());
            Change::UpsertNode {
                node: name,
                value: v,
            }
        } else if let Some(text) = (r < 0.95).then(|| g.toggle_group_member()).flatten() {
            Change::SetPolicy { policy: text }
        } else {
            Change::UpsertUser { user: g.new_user() }
        };
        out.push(change);
    }
    Generated {
        policy,
        tailnet,
        changes: out,
        generator: g,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(EPOCH_2026), "2026-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(EPOCH_2026 + 86_400 * 59 + 3_661),
            "2026-03-01T01:01:01Z"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn generation_is_deterministic_and_loads() {
        for kind in PolicyKind::ALL {
            let a = generate(200, kind, 100, 7);
            let b = generate(200, kind, 100, 7);
            assert_eq!(a.policy, b.policy);
            assert_eq!(a.changes, b.changes);
            assert_eq!(a.tailnet.nodes, b.tailnet.nodes);
            let mut engine = netmap_core::Engine::new(&a.policy, a.tailnet.clone()).unwrap();
            let applied = a
                .changes
                .into_iter()
                .filter(|c| engine.apply(c.clone()).is_ok())
                .count();
            // Only group edits can be rejected (a test of the policy stops passing).
            assert!(applied >= 85, "{kind}: {applied} of 100 applied");
        }
    }

    #[test]
    fn generated_policies_pass_their_tests() {
        for seed in 1..=3 {
            for nodes in [6, 60, 1_000, 10_000] {
                let g = generate(nodes, PolicyKind::Ops, 0, seed);
                let loaded = netmap_core::load_policy(&g.policy, &g.tailnet);
                assert!(loaded.is_ok(), "{nodes} nodes, seed {seed}: {loaded:?}");
            }
        }
    }

    #[test]
    fn shapes_match_the_python_generator() {
        let g = generate(10_000, PolicyKind::Ops, 0, 1);
        let nodes: Vec<&Node> = g.tailnet.nodes.values().map(|n| &**n).collect();
        let owned = nodes.iter().filter(|n| n.user.is_some()).count();
        let routers = nodes.iter().filter(|n| n.tags == ["tag:router"]).count();
        assert!((2_200..2_800).contains(&owned), "{owned} user devices");
        assert!((50..160).contains(&routers), "{routers} routers");
        assert_eq!(g.tailnet.users.len(), 1_000);
    }
}
