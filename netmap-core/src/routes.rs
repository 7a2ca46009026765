//! Route approval (by hand and through `autoApprovers`) and primary router election.

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::{Alias, Policy};

use crate::addr::is_exit_route;
use crate::resolve::Resolver;
use crate::tailnet::Tailnet;

/// Whether approver aliases name node `i` (tags, users, groups, autogroups, addresses).
fn approver_matches(r: &Resolver<'_>, who: &[netmap_policy::Located<Alias>], i: usize) -> bool {
    who.iter()
        .any(|a| r.src_contains(&r.resolve(&a.value), i) && a.value != Alias::Wildcard)
        || who.iter().any(|a| a.value == Alias::Wildcard)
}

/// The routes node `i` serves: advertised and approved (by hand or automatically); exit
/// routes are reported as a flag. Approving either exit route approves both.
pub(crate) fn effective_routes(r: &Resolver<'_>, i: usize) -> (Vec<IpNet>, bool) {
    let node = r.nodes[i].node;
    let policy: &Policy = r.policy;
    let mut routes = Vec::new();
    let mut exit_advertised = false;
    let mut exit_approved = false;
    for rt in &node.routable_ips {
        let rt = rt.trunc();
        let by_hand = node.approved_routes.iter().any(|a| a.trunc() == rt);
        if is_exit_route(&rt) {
            exit_advertised = true;
            let auto = approver_matches(r, &policy.auto_approvers.exit_node, i)
                || policy
                    .auto_approvers
                    .routes
                    .iter()
                    .any(|(p, who)| is_exit_route(p) && approver_matches(r, who, i));
            exit_approved |= by_hand || auto;
            continue;
        }
        let auto =
            policy.auto_approvers.routes.iter().any(|(p, who)| {
                !is_exit_route(p) && p.contains(&rt) && approver_matches(r, who, i)
            });
        if (by_hand || auto) && !routes.contains(&rt) {
            routes.push(rt);
        }
    }
    routes.sort();
    (routes, exit_advertised && exit_approved)
}

/// Elects the primary router of every subnet prefix: the current primary stays while it is
/// online and still serves the prefix; otherwise the oldest online router wins.
pub(crate) fn elect(r: &Resolver<'_>, previous: &OrdMap<IpNet, String>) -> OrdMap<IpNet, String> {
    let mut out = OrdMap::new();
    let mut candidates: std::collections::BTreeMap<IpNet, Vec<usize>> = Default::default();
    for (i, n) in r.nodes.iter().enumerate() {
        if !n.node.online {
            continue;
        }
        for rt in &n.routes {
            candidates.entry(*rt).or_default().push(i);
        }
    }
    for (prefix, cands) in candidates {
        if let Some(prev) = previous.get(&prefix) {
            if cands.iter().any(|&i| r.nodes[i].name == prev) {
                out.insert(prefix, prev.clone());
                continue;
            }
        }
        if let Some(&best) = cands
            .iter()
            .min_by_key(|&&i| (r.nodes[i].node.created_key(), r.nodes[i].name))
        {
            out.insert(prefix, r.nodes[best].name.to_string());
        }
    }
    out
}

/// Elects primaries for a tailnet under a policy, starting from `previous` decisions.
pub fn elect_primaries(
    tailnet: &Tailnet,
    previous: &OrdMap<IpNet, String>,
    policy: Option<&Policy>,
) -> OrdMap<IpNet, String> {
    let empty = Policy::default();
    let r = Resolver::new(policy.unwrap_or(&empty), tailnet);
    elect(&r, previous)
}
