//! The from-scratch computation: policy + tailnet → every node's view. This is the reference
//! the incremental engine must always equal; it is kept simple and pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::PortRange;

use crate::addr::{self, fmt_net, host_prefix};
use crate::resolve::{Resolved, Resolver};
use crate::wire::{CapGrant, DstPort, FilterRule, Ports};

/// A network or application rule with its selectors resolved.
#[derive(Debug, Clone)]
pub(crate) struct NetRule {
    pub src: Resolved,
    pub dsts: Vec<(Resolved, Vec<PortRange>)>,
    pub protos: Vec<u8>,
    /// Application capabilities (a `CapGrant` rule) instead of ports.
    pub caps: Option<BTreeMap<String, serde_json::Value>>,
    /// Destinations are `autogroup:self`: sources are narrowed to the destination's owner.
    pub self_rule: bool,
    /// `via` tags: the destination prefixes are reached only through routers with these tags.
    pub via: Vec<String>,
}

fn default_allow_all() -> Vec<NetRule> {
    vec![NetRule {
        src: Resolved {
            wildcard: true,
            ..Resolved::default()
        },
        dsts: vec![(
            Resolved {
                wildcard: true,
                ..Resolved::default()
            },
            vec![PortRange::ALL],
        )],
        protos: Vec::new(),
        caps: None,
        self_rule: false,
        via: Vec::new(),
    }]
}

/// Splits resolved destinations into `autogroup:self` ones and the rest, making one rule each.
fn push_split(out: &mut Vec<NetRule>, base: NetRule) {
    let (selfs, others): (Vec<_>, Vec<_>) =
        base.dsts.iter().cloned().partition(|(d, _)| d.self_devices);
    if !others.is_empty() {
        out.push(NetRule {
            dsts: others,
            self_rule: false,
            ..base.clone()
        });
    }
    if !selfs.is_empty() {
        out.push(NetRule {
            dsts: selfs,
            self_rule: true,
            ..base
        });
    }
}

/// Resolves the policy's `acls` and `grants` into rules.
pub(crate) fn net_rules(r: &Resolver) -> Vec<NetRule> {
    let p = &*r.policy;
    if !p.has_rules {
        return default_allow_all();
    }
    let mut out = Vec::new();
    for acl in &p.acls {
        if acl.src.is_empty() {
            continue;
        }
        let src = r.with_postures(
            r.resolve_all(acl.src.iter().map(|s| &s.value)),
            p.rule_postures(&acl.src_posture),
        );
        let dsts = acl
            .dst
            .iter()
            .map(|d| (r.resolve(&d.value.0), d.value.1.clone()))
            .collect();
        push_split(
            &mut out,
            NetRule {
                src,
                dsts,
                protos: acl.protos.clone(),
                caps: None,
                self_rule: false,
                via: Vec::new(),
            },
        );
    }
    for g in &p.grants {
        if g.src.is_empty() {
            continue;
        }
        let src = r.with_postures(
            r.resolve_all(g.src.iter().map(|s| &s.value)),
            p.rule_postures(&g.src_posture),
        );
        let resolved: Vec<Resolved> = g.dst.iter().map(|d| r.resolve(&d.value)).collect();
        // One rule per distinct protocol set, ports of all `ip` entries with that set.
        let mut by_proto: Vec<(Vec<u8>, Vec<PortRange>)> = Vec::new();
        for spec in &g.ip {
            match by_proto.iter_mut().find(|(p, _)| *p == spec.protos) {
                Some((_, ports)) => ports.extend(spec.ports.iter().copied()),
                None => by_proto.push((spec.protos.clone(), spec.ports.clone())),
            }
        }
        for (protos, ports) in by_proto {
            push_split(
                &mut out,
                NetRule {
                    src: src.clone(),
                    dsts: resolved
                        .iter()
                        .map(|d| (d.clone(), ports.clone()))
                        .collect(),
                    protos,
                    caps: None,
                    self_rule: false,
                    via: g.via.clone(),
                },
            );
        }
        if !g.app.is_empty() {
            let caps: BTreeMap<String, serde_json::Value> = g
                .app
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::Array(v.clone())))
                .collect();
            // Some capabilities come with a companion the destination grants back to the
            // source (a relay's target, a drive's sharer).
            let companions: BTreeMap<String, serde_json::Value> = g
                .app
                .iter()
                .filter_map(|(k, _)| companion_cap(k))
                .map(|c| (c.to_string(), serde_json::Value::Null))
                .collect();
            if !companions.is_empty() {
                let mut back_src = Resolved::default();
                for d in &resolved {
                    back_src.union(d.clone());
                }
                out.push(NetRule {
                    src: back_src,
                    dsts: vec![(src.clone(), Vec::new())],
                    protos: Vec::new(),
                    caps: Some(companions),
                    self_rule: false,
                    via: Vec::new(),
                });
            }
            push_split(
                &mut out,
                NetRule {
                    src: src.clone(),
                    dsts: resolved.iter().map(|d| (d.clone(), Vec::new())).collect(),
                    protos: Vec::new(),
                    caps: Some(caps),
                    self_rule: false,
                    via: g.via.clone(),
                },
            );
        }
    }
    out
}

/// The capability a destination grants back to the source when granted `cap`.
fn companion_cap(cap: &str) -> Option<&'static str> {
    match cap {
        "tailscale.com/cap/drive" => Some("tailscale.com/cap/drive-sharer"),
        "tailscale.com/cap/relay" => Some("tailscale.com/cap/relay-target"),
        _ => None,
    }
}

/// The destination entries of `dst` that cover node `i` (narrowed to what it serves);
/// `by_route` says whether a prefix covers a router through the
/// subnet routes it serves (not only through its own addresses).
fn entries_covering(r: &Resolver, dst: &Resolved, i: usize, by_route: bool) -> Vec<String> {
    let n = &r.nodes[i];
    let mut out = Vec::new();
    if dst.wildcard {
        out.push("*".to_string());
    }
    if dst.internet && n.exit {
        out.extend(addr::INTERNET_RANGES.iter().map(|s| s.to_string()));
    }
    if dst.nodes.contains(&i) || (dst.self_devices && n.is_member()) {
        out.extend(n.addr_strings());
    }
    for net in &dst.nets {
        let covers = n.addrs.iter().any(|a| net.contains(a))
            || (by_route && n.routes.iter().any(|rt| addr::overlaps(net, rt)));
        if covers {
            out.push(fmt_net(net));
        }
    }
    out
}

impl NetRule {
    /// The entries of destination `dst` of this rule that node `i` receives. Capability
    /// grants reach nodes, not the subnets behind them; `via` rules reach subnets only
    /// through routers carrying a via tag.
    pub(crate) fn entries_for(&self, r: &Resolver, dst: &Resolved, i: usize) -> Vec<String> {
        let via_ok =
            self.via.is_empty() || r.nodes[i].node.tags.iter().any(|t| self.via.contains(t));
        entries_covering(r, dst, i, self.caps.is_none() && via_ok)
    }

    /// Whether any destination of this rule covers node `i` (for visibility).
    /// Capability grants to a subnet make its routers visible without filtering there.
    pub(crate) fn covers(&self, r: &Resolver, i: usize) -> bool {
        let via_ok =
            self.via.is_empty() || r.nodes[i].node.tags.iter().any(|t| self.via.contains(t));
        (!self.self_rule || r.nodes[i].is_member())
            && self
                .dsts
                .iter()
                .any(|(d, _)| !entries_covering(r, d, i, via_ok).is_empty())
    }
}

/// The packet filter of node `d`: every rule whose destinations cover it, narrowed to what
/// it serves; rules with the same sources and protocols merge.
/// Node `d`'s packet filter. An entry made of one non-self rule alone is bound to it
/// (`Some(rule index)`): its sources are that rule's current source list.
pub(crate) fn filter_for(plan: &crate::build::Plan, d: usize) -> Vec<(FilterRule, Option<usize>)> {
    let r = &plan.r;
    let mut out: Vec<(FilterRule, Option<usize>)> = Vec::new();
    for (ri, rule) in plan.rules.iter().enumerate() {
        if rule.self_rule && !r.nodes[d].is_member() {
            continue;
        }
        let mut dst_ports = Vec::new();
        let mut cap_dsts: Vec<String> = Vec::new();
        for (dst, ports) in &rule.dsts {
            let entries = rule.entries_for(r, dst, d);
            if entries.is_empty() {
                continue;
            }
            if rule.caps.is_some() {
                for a in &r.nodes[d].addrs {
                    let s = host_prefix(*a);
                    if !cap_dsts.contains(&s) {
                        cap_dsts.push(s);
                    }
                }
                continue;
            }
            for e in entries {
                for p in ports {
                    dst_ports.push(DstPort {
                        ip: e.clone(),
                        ports: Ports {
                            first: p.first,
                            last: p.last,
                        },
                    });
                }
            }
        }
        let src_ips = if rule.self_rule {
            match r.nodes[d]
                .email
                .as_ref()
                .and_then(|e| plan.self_src.get(&(ri, e.clone())))
            {
                Some(s) => s.clone(),
                None => continue,
            }
        } else {
            plan.src_strings[ri].clone()
        };
        if let Some(caps) = &rule.caps {
            if cap_dsts.is_empty() {
                continue;
            }
            out.push((
                FilterRule {
                    src_ips,
                    dst_ports: Arc::default(),
                    ip_proto: Vec::new(),
                    cap_grant: vec![CapGrant {
                        dsts: cap_dsts,
                        cap_map: caps.clone(),
                    }],
                },
                (!rule.self_rule).then_some(ri),
            ));
            continue;
        }
        if dst_ports.is_empty() || src_ips.is_empty() {
            continue;
        }
        // Rules with the same sources and protocols merge.
        if let Some((existing, bound)) = out.iter_mut().find(|(f, _)| {
            f.cap_grant.is_empty()
                && f.ip_proto == rule.protos
                && (Arc::ptr_eq(&f.src_ips, &src_ips) || f.src_ips == src_ips)
        }) {
            Arc::make_mut(&mut existing.dst_ports).extend(dst_ports);
            // Two rules in one entry: it follows neither alone.
            *bound = None;
        } else {
            out.push((
                FilterRule {
                    src_ips,
                    dst_ports: Arc::new(dst_ports),
                    ip_proto: rule.protos.clone(),
                    cap_grant: Vec::new(),
                },
                (!rule.self_rule).then_some(ri),
            ));
        }
    }
    out
}

/// Whether `rule` lets node `v` reach prefix `route`, or lets `route` reach `v`.
fn route_reachable(r: &Resolver, rule: &NetRule, v: usize, route: &IpNet) -> bool {
    let forward = r.src_contains(&rule.src, v)
        && rule
            .dsts
            .iter()
            .any(|(d, _)| d.wildcard || d.nets.iter().any(|n| addr::overlaps(n, route)));
    if forward {
        return true;
    }
    let src_overlaps = rule.src.wildcard
        || rule.src.all_nodes
        || rule.src.nets.iter().any(|n| addr::overlaps(n, route));
    src_overlaps && rule.covers(r, v)
}

/// Whether viewer `v` routes prefix `rt` through peer `x`. `via` grants steer the prefix to
/// the routers carrying a via tag (their primary: the global one if it qualifies, else the
/// oldest online); otherwise the prefix goes to its primary router, when `v` may reach it
/// (or is a standby router of the same prefix).
pub(crate) fn routed_through(
    r: &Resolver,
    rules: &[NetRule],
    primaries: &OrdMap<IpNet, String>,
    v: usize,
    x: usize,
    rt: &IpNet,
) -> bool {
    let mut via_tags: Vec<&String> = Vec::new();
    for rule in rules {
        if rule.via.is_empty() || !r.src_contains(&rule.src, v) {
            continue;
        }
        if rule
            .dsts
            .iter()
            .any(|(d, _)| d.nets.iter().any(|n| addr::overlaps(n, rt)))
        {
            via_tags.extend(rule.via.iter());
        }
    }
    let primary = primaries.get(rt).map(String::as_str);
    // Access to the prefix without `via` (or being a standby router of it) goes through the
    // prefix's primary router; `via` steering applies only otherwise.
    let direct = r.nodes[v].routes.contains(rt)
        || rules
            .iter()
            .filter(|rule| rule.via.is_empty())
            .any(|rule| route_reachable(r, rule, v, rt));
    if direct {
        return primary == Some(r.nodes[x].name.as_str());
    }
    if via_tags.is_empty() {
        return false;
    }
    let tagged = |i: usize| r.nodes[i].node.tags.iter().any(|t| via_tags.contains(&t));
    let chosen = match primary.and_then(|p| r.by_name.get(p).copied()) {
        Some(p) if tagged(p) => Some(p),
        _ => (0..r.nodes.len())
            .filter(|&i| tagged(i) && r.nodes[i].node.online && r.nodes[i].routes.contains(rt))
            .min_by_key(|&i| (r.nodes[i].node.created_key(), r.nodes[i].name.as_str())),
    };
    chosen == Some(x)
}

/// Whether node `v` may use exit nodes (some rule lets it reach the internet).
pub(crate) fn exit_usable(r: &Resolver, rules: &[NetRule], v: usize) -> bool {
    rules.iter().any(|rule| {
        rule.caps.is_none()
            && r.src_contains(&rule.src, v)
            && rule.dsts.iter().any(|(d, _)| d.internet || d.wildcard)
    })
}
