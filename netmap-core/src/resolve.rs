//! Resolution of selectors against a tailnet.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use netmap_policy::{Alias, AutoGroup, IpSetItem, Policy};

use crate::addr::{self, fmt_net};
use crate::tailnet::{Node, Tailnet};

/// A node prepared for resolution: its addresses, owner and effective routes.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo<'a> {
    pub name: &'a str,
    pub node: &'a Node,
    pub addrs: Vec<IpAddr>,
    /// The owner's email, for untagged nodes.
    pub email: Option<&'a str>,
    /// The owner's role, for untagged nodes.
    pub role: Option<&'a str>,
    /// Approved (by hand or automatically) and advertised subnet routes, exit routes excluded.
    pub routes: Vec<IpNet>,
    /// Whether the node is an approved exit node.
    pub exit: bool,
    /// The `disable-ipv4` attribute applies: the node has no IPv4 address in the tailnet
    /// and does not use its peers' IPv4 addresses.
    pub no_ipv4: bool,
}

impl NodeInfo<'_> {
    /// Whether the node is untagged and owned by a user.
    pub fn is_member(&self) -> bool {
        !self.node.is_tagged() && self.email.is_some()
    }

    /// The node's addresses as bare strings (filter form).
    pub fn addr_strings(&self) -> impl Iterator<Item = String> + '_ {
        self.addrs.iter().map(|a| a.to_string())
    }
}

/// A user's role: as recorded, else `owner` for the user the tailnet is named after and
/// `admin` for everyone else (users of a tailnet without role data are its administrators).
fn effective_role<'a>(u: &'a crate::tailnet::User, tailnet: &Tailnet) -> &'a str {
    match u.role.as_deref() {
        Some(r) => r,
        None if !u.email.is_empty() && u.email == tailnet.settings.name => "owner",
        None => "admin",
    }
}

/// What a selector resolves to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// `*` (or `autogroup:danger-all`).
    pub wildcard: bool,
    /// `autogroup:danger-all`.
    pub danger_all: bool,
    /// `autogroup:self`.
    pub self_devices: bool,
    /// `autogroup:internet`.
    pub internet: bool,
    /// Nodes named by identity (user, group, tag, autogroup), by index.
    pub nodes: BTreeSet<usize>,
    /// Literal prefixes (IPs, CIDRs, hosts, ipsets).
    pub nets: Vec<IpNet>,
}

impl Resolved {
    pub fn union(&mut self, o: Resolved) {
        self.wildcard |= o.wildcard;
        self.danger_all |= o.danger_all;
        self.self_devices |= o.self_devices;
        self.internet |= o.internet;
        self.nodes.extend(o.nodes);
        for n in o.nets {
            if !self.nets.contains(&n) {
                self.nets.push(n);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.wildcard
            && !self.self_devices
            && !self.internet
            && self.nodes.is_empty()
            && self.nets.is_empty()
    }
}

/// Resolution context: the policy, the tailnet and prepared nodes.
pub(crate) struct Resolver<'a> {
    pub policy: &'a Policy,
    pub tailnet: &'a Tailnet,
    pub nodes: Vec<NodeInfo<'a>>,
    /// Untagged nodes by owner email.
    pub by_email: HashMap<&'a str, Vec<usize>>,
    /// Node index by name.
    pub by_name: HashMap<&'a str, usize>,
}

impl<'a> Resolver<'a> {
    pub fn new(policy: &'a Policy, tailnet: &'a Tailnet) -> Resolver<'a> {
        let mut nodes = Vec::with_capacity(tailnet.nodes.len());
        for (name, node) in tailnet.nodes.iter() {
            let (email, role) = if node.is_tagged() {
                (None, None)
            } else {
                match node.user.as_ref().and_then(|u| tailnet.users.get(u)) {
                    Some(u) => (Some(u.email.as_str()), Some(effective_role(u, tailnet))),
                    None => (None, None),
                }
            };
            nodes.push(NodeInfo {
                name,
                node,
                addrs: node.addrs().collect(),
                email,
                role,
                routes: Vec::new(),
                exit: false,
                no_ipv4: false,
            });
        }
        let mut by_email: HashMap<&'a str, Vec<usize>> = HashMap::new();
        let mut by_name = HashMap::with_capacity(nodes.len());
        for (i, n) in nodes.iter().enumerate() {
            by_name.insert(n.name, i);
            if let (false, Some(e)) = (n.node.is_tagged(), n.email) {
                by_email.entry(e).or_default().push(i);
            }
        }
        let mut r = Resolver {
            policy,
            tailnet,
            nodes,
            by_email,
            by_name,
        };
        let v4_off_targets: Vec<Resolved> = policy
            .node_attrs
            .iter()
            .filter(|na| na.attr.iter().any(|a| a == "disable-ipv4"))
            .map(|na| r.resolve_all(na.target.iter().map(|t| &t.value)))
            .collect();
        let no_v4: Vec<bool> = (0..r.nodes.len())
            .map(|i| policy.disable_ipv4 || v4_off_targets.iter().any(|t| r.src_contains(t, i)))
            .collect();
        for (i, off) in no_v4.into_iter().enumerate() {
            if off {
                r.nodes[i].no_ipv4 = true;
                r.nodes[i].addrs.retain(IpAddr::is_ipv6);
            }
        }
        let approvers = crate::routes::Approvers::new(&r);
        for i in 0..r.nodes.len() {
            let (routes, exit) = crate::routes::effective_routes(&r, &approvers, i);
            r.nodes[i].routes = routes;
            r.nodes[i].exit = exit;
        }
        r
    }

    fn users_nodes(&self, pred: impl Fn(&str) -> bool) -> BTreeSet<usize> {
        self.by_email
            .iter()
            .filter(|(e, _)| pred(e))
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|&i| self.nodes[i].is_member())
            .collect()
    }

    /// Resolves one alias.
    pub fn resolve(&self, a: &Alias) -> Resolved {
        let mut r = Resolved::default();
        match a {
            Alias::Wildcard => r.wildcard = true,
            Alias::User(email) => {
                r.nodes = self
                    .by_email
                    .get(email.as_str())
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&i| self.nodes[i].is_member())
                    .collect()
            }
            Alias::UserDomain(d) => {
                r.nodes = self.users_nodes(|e| e.rsplit_once('@').is_some_and(|(_, ed)| ed == d))
            }
            Alias::Group(g) => {
                for m in self.policy.groups.get(g).into_iter().flatten() {
                    r.nodes.extend(
                        self.by_email
                            .get(m.as_str())
                            .into_iter()
                            .flatten()
                            .copied()
                            .filter(|&i| self.nodes[i].is_member()),
                    );
                }
            }
            Alias::Tag(t) => {
                r.nodes = self
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.node.tags.iter().any(|x| x == t))
                    .map(|(i, _)| i)
                    .collect()
            }
            Alias::Host(h) => {
                if let Some(n) = self.policy.hosts.get(h) {
                    r.nets.push(*n);
                }
            }
            Alias::Prefix(p) => r.nets.push(*p),
            Alias::IpSet(name) => {
                let mut add = Resolved::default();
                let mut remove = Resolved::default();
                for item in self
                    .policy
                    .ipsets
                    .get(name)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    match item {
                        IpSetItem::Add(a) => add.union(self.resolve(a)),
                        IpSetItem::Remove(a) => remove.union(self.resolve(a)),
                    }
                }
                add.nodes.retain(|n| !remove.nodes.contains(n));
                add.nets.retain(|n| !remove.nets.contains(n));
                r = add;
            }
            Alias::AutoGroup(g) => match g {
                AutoGroup::Member => {
                    r.nodes = (0..self.nodes.len())
                        .filter(|&i| self.nodes[i].is_member())
                        .collect()
                }
                AutoGroup::Tagged => {
                    r.nodes = (0..self.nodes.len())
                        .filter(|&i| self.nodes[i].node.is_tagged())
                        .collect()
                }
                AutoGroup::SelfDevices => r.self_devices = true,
                AutoGroup::Internet => r.internet = true,
                AutoGroup::DangerAll => {
                    r.wildcard = true;
                    r.danger_all = true;
                }
                AutoGroup::NonRoot | AutoGroup::Shared => {}
                role => {
                    let want = role.name();
                    r.nodes = (0..self.nodes.len())
                        .filter(|&i| {
                            let n = &self.nodes[i];
                            n.is_member()
                                && match n.role {
                                    Some(x) => x == want || (want == "admin" && x == "owner"),
                                    None => false,
                                }
                        })
                        .collect()
                }
            },
        }
        r
    }

    /// Resolves a list of aliases into one set.
    pub fn resolve_all<'x>(&self, aliases: impl IntoIterator<Item = &'x Alias>) -> Resolved {
        let mut r = Resolved::default();
        for a in aliases {
            r.union(self.resolve(a));
        }
        r
    }

    /// Whether a node is in a resolved source set (by identity, address, or a route it serves).
    pub fn src_contains(&self, r: &Resolved, i: usize) -> bool {
        if r.wildcard || r.nodes.contains(&i) {
            return true;
        }
        let n = &self.nodes[i];
        r.nets.iter().any(|net| {
            n.addrs.iter().any(|a| addr::contains_ip(net, a))
                || n.routes.iter().any(|rt| addr::overlaps(net, rt))
        })
    }

    /// Every approved subnet route in the tailnet (deduplicated, sorted).
    pub fn all_routes(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self
            .nodes
            .iter()
            .flat_map(|n| n.routes.iter().copied())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The `SrcIPs` strings of a resolved source set.
    pub fn src_strings(&self, r: &Resolved) -> Vec<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        if r.danger_all {
            out.insert("*".into());
        } else if r.wildcard {
            for s in addr::TAILNET_V4_RANGES {
                out.insert(s.to_string());
            }
            out.insert(addr::TAILNET_V6.to_string());
            for rt in self.all_routes() {
                out.insert(rt.to_string());
            }
        }
        if !r.danger_all {
            for &i in &r.nodes {
                out.extend(self.nodes[i].addr_strings());
            }
            for n in &r.nets {
                out.insert(fmt_net(n));
            }
        }
        out.into_iter().collect()
    }
}
