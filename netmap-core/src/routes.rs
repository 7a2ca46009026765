//! Route approval (by hand and through `autoApprovers`) and primary router election.

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::{Alias, Policy};

use crate::addr::is_exit_route;
use crate::resolve::{Resolved, Resolver};
use crate::tailnet::Tailnet;

/// `autoApprovers` with their selectors resolved once.
pub(crate) struct Approvers {
    routes: Vec<(IpNet, Resolved)>,
    exit_node: Resolved,
}

impl Approvers {
    pub(crate) fn new(r: &Resolver) -> Approvers {
        let resolve =
            |who: &[netmap_policy::Located<Alias>]| r.resolve_all(who.iter().map(|a| &a.value));
        Approvers {
            routes: r
                .policy
                .auto_approvers
                .routes
                .iter()
                .map(|(p, who)| (*p, resolve(who)))
                .collect(),
            exit_node: resolve(&r.policy.auto_approvers.exit_node),
        }
    }
}

impl Approvers {
    /// Re-evaluates node `x`'s membership in every approver set (after it changed).
    pub(crate) fn refresh(&mut self, r: &Resolver, x: usize) {
        for (_, who) in &mut self.routes {
            r.refresh(who, x);
        }
        r.refresh(&mut self.exit_node, x);
    }
}

/// The routes node `i` serves: advertised and approved, by hand or by `autoApprovers`
/// (subnet routes through `routes`, exit routes through `exitNode`); exit routes are reported
/// as a flag. Approving either exit route approves both.
pub(crate) fn effective_routes(r: &Resolver, a: &Approvers, i: usize) -> (Vec<IpNet>, bool) {
    let node = &r.nodes[i].node;
    if node.routable_ips.is_empty() {
        return (Vec::new(), false);
    }
    let auto = auto_approved(r, a, i, &node.routable_ips);
    let mut routes = Vec::new();
    let mut exit_advertised = false;
    let mut exit_approved = false;
    for rt in &node.routable_ips {
        let rt = rt.trunc();
        let approved = node.approved_routes.iter().any(|x| x.trunc() == rt) || auto.contains(&rt);
        if is_exit_route(&rt) {
            exit_advertised = true;
            exit_approved |= approved;
        } else if approved && !routes.contains(&rt) {
            routes.push(rt);
        }
    }
    routes.sort();
    (routes, exit_advertised && exit_approved)
}

/// The routes among `routes` that `autoApprovers` approve for node `i`: subnet routes inside
/// a `routes` prefix whose approvers name the node, exit routes when `exitNode` names it.
fn auto_approved(r: &Resolver, a: &Approvers, i: usize, routes: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for rt in routes {
        let rt = rt.trunc();
        let ok = if is_exit_route(&rt) {
            r.src_contains(&a.exit_node, i)
        } else {
            a.routes
                .iter()
                .any(|(p, who)| !is_exit_route(p) && p.contains(&rt) && r.src_contains(who, i))
        };
        if ok && !out.contains(&rt) {
            out.push(rt);
        }
    }
    out
}

/// The routes `autoApprovers` approve for node `key` among `routes` it advertises.
pub fn auto_approve(policy: &Policy, tailnet: &Tailnet, key: &str, routes: &[IpNet]) -> Vec<IpNet> {
    let r = Resolver::new(std::sync::Arc::new(policy.clone()), tailnet);
    let a = Approvers::new(&r);
    match r.by_name.get(key) {
        Some(&i) => auto_approved(&r, &a, i, routes),
        None => Vec::new(),
    }
}

/// Elects the primary router of every subnet prefix: the current primary stays while it is
/// online and still serves the prefix; otherwise the oldest online router wins.
pub(crate) fn elect(r: &Resolver, previous: &OrdMap<IpNet, String>) -> OrdMap<IpNet, String> {
    let mut out = OrdMap::new();
    let mut candidates: std::collections::BTreeMap<IpNet, Vec<usize>> = Default::default();
    for (i, n) in r.nodes.iter().enumerate() {
        if !n.alive || !n.node.online {
            continue;
        }
        for rt in &n.routes {
            candidates.entry(*rt).or_default().push(i);
        }
    }
    for (prefix, cands) in candidates {
        if let Some(prev) = previous.get(&prefix) {
            if cands
                .iter()
                .any(|&i| r.nodes[i].alive && &r.nodes[i].name == prev)
            {
                out.insert(prefix, prev.clone());
                continue;
            }
        }
        if let Some(&best) = cands
            .iter()
            .min_by_key(|&&i| (r.nodes[i].node.created_key(), r.nodes[i].name.as_str()))
        {
            out.insert(prefix, r.nodes[best].name.clone());
        }
    }
    out
}

/// Elects primaries for a tailnet under a policy, starting from `previous` decisions.
pub fn elect_primaries(
    tailnet: &Tailnet,
    previous: &OrdMap<IpNet, String>,
    policy: &Policy,
) -> OrdMap<IpNet, String> {
    let r = Resolver::new(std::sync::Arc::new(policy.clone()), tailnet);
    elect(&r, previous)
}
