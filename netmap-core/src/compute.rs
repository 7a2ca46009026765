//! The from-scratch computation: policy + tailnet → every node's view. This is the reference
//! the incremental engine must always equal; it is kept simple and pure.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ipnet::IpNet;
use netmap_policy::{Alias, AutoGroup, Policy, PortRange};

use crate::addr::{self, fmt_net, host_prefix};
use crate::resolve::{Resolved, Resolver};
use crate::wire::{CapGrant, DstPort, FilterRule, Ports, SrcList};

/// A network or application rule with its selectors resolved.
///
/// A rule is also its own compiled form: the aliases each [`Resolved`] was resolved from,
/// the ports, protocols, capabilities and `via` tags. [`rule_specs`] makes rules whose sets
/// are not resolved yet; the engine compares those with the rules in force by value and
/// resolves only the ones that differ.
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
    /// The postures sources must satisfy (`srcPosture`, else `defaultSrcPosture`), by name.
    pub src_posture: Vec<String>,
    /// The postures destinations must satisfy (a companion capability goes back to a
    /// grant's sources, posture included).
    pub dst_posture: Vec<String>,
}

/// A selector set not resolved yet: only the aliases it names.
fn unresolved<'a>(aliases: impl IntoIterator<Item = &'a Alias>) -> Resolved {
    Resolved {
        aliases: aliases.into_iter().cloned().collect(),
        ..Resolved::default()
    }
}

fn default_allow_all() -> Vec<NetRule> {
    vec![NetRule {
        src: unresolved([&Alias::Wildcard]),
        dsts: vec![(unresolved([&Alias::Wildcard]), vec![PortRange::ALL])],
        protos: Vec::new(),
        caps: None,
        self_rule: false,
        via: Vec::new(),
        src_posture: Vec::new(),
        dst_posture: Vec::new(),
    }]
}

fn is_self_dst(d: &Resolved) -> bool {
    d.aliases
        .contains(&Alias::AutoGroup(AutoGroup::SelfDevices))
}

/// Splits destinations into `autogroup:self` ones and the rest, making one rule each.
fn push_split(out: &mut Vec<NetRule>, base: NetRule) {
    let (selfs, others): (Vec<_>, Vec<_>) =
        base.dsts.iter().cloned().partition(|(d, _)| is_self_dst(d));
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

/// The policy's `acls` and `grants` as rules, in order, their selectors not resolved yet.
pub(crate) fn rule_specs(p: &Policy) -> Vec<NetRule> {
    if !p.has_rules {
        return default_allow_all();
    }
    let mut out = Vec::new();
    for acl in &p.acls {
        if acl.src.is_empty() {
            continue;
        }
        let src = unresolved(acl.src.iter().map(|s| &s.value));
        let dsts = acl
            .dst
            .iter()
            .map(|d| (unresolved([&d.value.0]), d.value.1.clone()))
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
                src_posture: p.rule_postures(&acl.src_posture).to_vec(),
                dst_posture: Vec::new(),
            },
        );
    }
    for g in &p.grants {
        if g.src.is_empty() {
            continue;
        }
        let src = unresolved(g.src.iter().map(|s| &s.value));
        let dst_sets: Vec<Resolved> = g.dst.iter().map(|d| unresolved([&d.value])).collect();
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
                    dsts: dst_sets
                        .iter()
                        .map(|d| (d.clone(), ports.clone()))
                        .collect(),
                    protos,
                    caps: None,
                    self_rule: false,
                    via: g.via.clone(),
                    src_posture: p.rule_postures(&g.src_posture).to_vec(),
                    dst_posture: Vec::new(),
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
                out.push(NetRule {
                    src: unresolved(g.dst.iter().map(|d| &d.value)),
                    dsts: vec![(src.clone(), Vec::new())],
                    protos: Vec::new(),
                    caps: Some(companions),
                    self_rule: false,
                    via: Vec::new(),
                    src_posture: Vec::new(),
                    dst_posture: p.rule_postures(&g.src_posture).to_vec(),
                });
            }
            push_split(
                &mut out,
                NetRule {
                    src: src.clone(),
                    dsts: dst_sets.iter().map(|d| (d.clone(), Vec::new())).collect(),
                    protos: Vec::new(),
                    caps: Some(caps),
                    self_rule: false,
                    via: g.via.clone(),
                    src_posture: p.rule_postures(&g.src_posture).to_vec(),
                    dst_posture: Vec::new(),
                },
            );
        }
    }
    out
}

/// Resolves the policy's `acls` and `grants` into rules.
pub(crate) fn net_rules(r: &Resolver) -> Vec<NetRule> {
    rule_specs(&r.policy)
        .into_iter()
        .map(|spec| spec.resolved(r))
        .collect()
}

impl NetRule {
    /// This rule with its selector sets resolved against `r`.
    pub(crate) fn resolved(mut self, r: &Resolver) -> NetRule {
        self.resolve_in_place(r);
        self
    }

    /// Resolves (again) every selector set of this rule against `r`.
    pub(crate) fn resolve_in_place(&mut self, r: &Resolver) {
        self.resolve_stale(r, None, None, |_, _| true);
    }

    /// Resolves again the selector sets of this rule that `stale` picks (given a set and
    /// the postures that narrow it); the others are kept as they are. A stale set without
    /// postures that [`Resolver::regroup`] can patch from the policy it was resolved under
    /// (`old`, when given) is patched; aliases resolved before are taken from `memo`, when
    /// given (see [`Resolver::resolve_all_memo`]).
    pub(crate) fn resolve_stale(
        &mut self,
        r: &Resolver,
        old: Option<&netmap_policy::Policy>,
        mut memo: Option<&mut HashMap<Alias, Resolved>>,
        stale: impl Fn(&Resolved, &[String]) -> bool,
    ) {
        let mut again = |set: &mut Resolved, postures: &[String]| {
            if stale(set, postures) {
                *set = r.resolve_again(set, postures, old, memo.as_deref_mut());
            }
        };
        again(&mut self.src, &self.src_posture);
        for (d, _) in &mut self.dsts {
            again(d, &self.dst_posture);
        }
    }

    /// Every posture the rule names.
    pub(crate) fn posture_names(&self) -> impl Iterator<Item = &String> + '_ {
        self.src_posture.iter().chain(self.dst_posture.iter())
    }

    /// Every alias the rule names.
    pub(crate) fn aliases(&self) -> impl Iterator<Item = &Alias> + '_ {
        self.src
            .aliases
            .iter()
            .chain(self.dsts.iter().flat_map(|(d, _)| d.aliases.iter()))
    }

    /// The rule as written, hashed: equal rules as written ([`NetRule::same_spec`]) hash
    /// alike, and compile to equal rules (given equal definitions of the groups, hosts and
    /// ipsets they name).
    pub(crate) fn spec_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.src.aliases.hash(&mut h);
        for (d, ports) in &self.dsts {
            d.aliases.hash(&mut h);
            ports.hash(&mut h);
        }
        self.protos.hash(&mut h);
        // Capability values are JSON (not hashable): their names stand for them here.
        self.caps
            .as_ref()
            .map(|c| c.keys().collect::<Vec<_>>())
            .hash(&mut h);
        self.self_rule.hash(&mut h);
        self.via.hash(&mut h);
        self.src_posture.hash(&mut h);
        self.dst_posture.hash(&mut h);
        h.finish()
    }

    /// Whether two rules are the same as written (selectors, ports, protocols,
    /// capabilities, postures), whatever their sets resolve to.
    pub(crate) fn same_spec(&self, o: &NetRule) -> bool {
        // Every field, so that a new one cannot be left out of the comparison.
        let NetRule {
            src,
            dsts,
            protos,
            caps,
            self_rule,
            via,
            src_posture,
            dst_posture,
        } = self;
        src.aliases == o.src.aliases
            && dsts.len() == o.dsts.len()
            && dsts
                .iter()
                .zip(&o.dsts)
                .all(|((a, pa), (b, pb))| a.aliases == b.aliases && pa == pb)
            && *protos == o.protos
            && *caps == o.caps
            && *self_rule == o.self_rule
            && *via == o.via
            && *src_posture == o.src_posture
            && *dst_posture == o.dst_posture
    }

    /// What decides which nodes the rule links (its sources and destinations), as a key;
    /// rules with equal keys differ at most in ports, protocols or capability values.
    pub(crate) fn membership_key(&self) -> String {
        format!(
            "{:?}",
            (
                &self.src.aliases,
                self.dsts
                    .iter()
                    .map(|(d, _)| &d.aliases)
                    .collect::<Vec<_>>(),
                self.caps.is_some(),
                self.self_rule,
                &self.via,
                &self.src_posture,
                &self.dst_posture,
            )
        )
    }

    /// Whether the rule can decide how a viewer routes a subnet prefix (it names `*` or
    /// prefixes, or steers through `via` routers).
    pub(crate) fn route_relevant(&self) -> bool {
        !self.via.is_empty()
            || self.src.wildcard
            || self.src.all_nodes
            || !self.src.nets.is_empty()
            || self
                .dsts
                .iter()
                .any(|(d, _)| d.wildcard || !d.nets.is_empty())
    }

    /// The prefixes whose routing the rule can decide, if it is route relevant: those its
    /// source and destinations name (a router's entry for a prefix reads only rules whose
    /// sets overlap it, see `route_reachable`); `None` for any prefix (it names `*` or all
    /// nodes, or steers through `via` routers).
    pub(crate) fn route_nets(&self) -> Option<Vec<IpNet>> {
        if self.src.wildcard
            || self.src.all_nodes
            || self.dsts.iter().any(|(d, _)| d.wildcard || d.all_nodes)
            || !self.via.is_empty()
        {
            return None;
        }
        Some(
            self.src
                .nets
                .iter()
                .chain(self.dsts.iter().flat_map(|(d, _)| d.nets.iter()))
                .copied()
                .collect(),
        )
    }

    /// Whether the rule can let a viewer use exit nodes.
    pub(crate) fn exit_relevant(&self) -> bool {
        self.caps.is_none() && self.dsts.iter().any(|(d, _)| d.internet || d.wildcard)
    }

    /// Whether node `i` passes the rule's `via` restriction.
    fn via_ok(&self, r: &Resolver, i: usize) -> bool {
        self.via.is_empty() || r.nodes[i].node.tags.iter().any(|t| self.via.contains(t))
    }
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
fn entries_covering(r: &Resolver, dst: &Resolved, i: usize, by_route: bool) -> Vec<Arc<str>> {
    let n = &r.nodes[i];
    let mut out: Vec<Arc<str>> = Vec::new();
    if dst.wildcard {
        out.push(Arc::from("*"));
    }
    if dst.internet && n.exit {
        out.extend(addr::INTERNET_RANGES.iter().map(|s| Arc::from(*s)));
    }
    if dst.nodes.contains(&i) || (dst.self_devices && n.is_member()) {
        out.extend(n.addr_texts().iter().cloned());
    }
    for net in &dst.nets {
        let covers = n.addrs.iter().any(|a| net.contains(a))
            || (by_route && n.routes.iter().any(|rt| addr::overlaps(net, rt)));
        if covers {
            out.push(Arc::from(fmt_net(net)));
        }
    }
    out
}

/// Whether [`entries_covering`] would return anything, without building the entries.
fn dst_covers(r: &Resolver, dst: &Resolved, i: usize, by_route: bool) -> bool {
    let n = &r.nodes[i];
    dst.wildcard
        || (dst.internet && n.exit)
        || ((dst.nodes.contains(&i) || (dst.self_devices && n.is_member())) && !n.addrs.is_empty())
        || dst.nets.iter().any(|net| {
            n.addrs.iter().any(|a| net.contains(a))
                || (by_route && n.routes.iter().any(|rt| addr::overlaps(net, rt)))
        })
}

impl NetRule {
    /// The entries of destination `dst` of this rule that node `i` receives. Capability
    /// grants reach nodes, not the subnets behind them; `via` rules reach subnets only
    /// through routers carrying a via tag.
    pub(crate) fn entries_for(&self, r: &Resolver, dst: &Resolved, i: usize) -> Vec<Arc<str>> {
        entries_covering(r, dst, i, self.caps.is_none() && self.via_ok(r, i))
    }

    /// The ports of each destination, in the filter's form.
    pub(crate) fn dst_port_lists(&self) -> Vec<Vec<Ports>> {
        self.dsts
            .iter()
            .map(|(_, ports)| {
                ports
                    .iter()
                    .map(|p| Ports {
                        first: p.first,
                        last: p.last,
                    })
                    .collect()
            })
            .collect()
    }

    /// Whether node `i` receives entries from destination `index` of this rule (given it is
    /// among the nodes the rule covers).
    pub(crate) fn dst_gives(&self, r: &Resolver, index: usize, i: usize) -> bool {
        self.dsts
            .get(index)
            .is_some_and(|(dst, _)| dst_covers(r, dst, i, self.caps.is_none() && self.via_ok(r, i)))
    }

    /// Whether any destination of this rule covers node `i` (for visibility).
    /// Capability grants to a subnet make its routers visible without filtering there.
    pub(crate) fn covers(&self, r: &Resolver, i: usize) -> bool {
        let via_ok = self.via_ok(r, i);
        (!self.self_rule || r.nodes[i].is_member())
            && self.dsts.iter().any(|(d, _)| dst_covers(r, d, i, via_ok))
    }
}

/// Which rules a filter entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryFrom {
    /// One rule alone: the entry is bound to it, its sources are that rule's current source
    /// list and its ports the rule's current ports (which views read from the tables). Its
    /// destinations are held compact (see [`compact_dst`]).
    Rule(usize),
    /// One `autogroup:self` rule alone: its sources are the viewer's owner's devices, held
    /// in the entry.
    OwnRule(usize),
    /// Several rules merged (same sources and protocols): the sources are held in the entry.
    Merged,
}

impl EntryFrom {
    /// The rule an entry is bound to (whose source list it reads from the tables).
    pub(crate) fn bound(self) -> Option<usize> {
        match self {
            EntryFrom::Rule(ri) => Some(ri),
            EntryFrom::OwnRule(_) | EntryFrom::Merged => None,
        }
    }

    /// The one rule an entry comes from.
    pub(crate) fn rule(self) -> Option<usize> {
        match self {
            EntryFrom::Rule(ri) | EntryFrom::OwnRule(ri) => Some(ri),
            EntryFrom::Merged => None,
        }
    }
}

/// Node `d`'s packet filter: every rule whose destinations cover it, narrowed to what it
/// serves, in policy order; rules with the same sources and protocols merge. Each entry
/// says which rules it comes from ([`EntryFrom`]).
pub(crate) fn filter_for(plan: &crate::build::Plan, d: usize) -> Vec<(FilterRule, EntryFrom)> {
    let mut out: Vec<(FilterRule, EntryFrom)> = Vec::new();
    for (ri, rule) in plan.rules.ordered() {
        // An entry bound to its rule holds its destinations compact.
        let Some(entry) = rule_entry(plan, d, ri, rule, !rule.self_rule) else {
            continue;
        };
        let bound = if rule.self_rule {
            EntryFrom::OwnRule(ri)
        } else {
            EntryFrom::Rule(ri)
        };
        if !entry.cap_grant.is_empty() {
            out.push((entry, bound));
            continue;
        }
        // Rules with the same sources and protocols merge.
        if let Some((existing, bound_before)) = out
            .iter_mut()
            .find(|(f, _)| merges_into(f, &f.src_ips, &entry))
        {
            // Compact entries take their rules' ports from the plan's table.
            let ports = |id: usize| plan.table_ports(id).map_or(&[][..], |p| p.as_slice());
            if let EntryFrom::Rule(rj) = *bound_before {
                existing.dst_ports = Arc::new(expand_dst(&existing.dst_ports, ports(rj)));
            }
            let more = match bound {
                EntryFrom::Rule(_) => expand_dst(&entry.dst_ports, ports(ri)),
                _ => Arc::try_unwrap(entry.dst_ports).unwrap_or_else(|a| (*a).clone()),
            };
            Arc::make_mut(&mut existing.dst_ports).extend(more);
            // Two rules in one entry: it follows neither alone.
            *bound_before = EntryFrom::Merged;
        } else {
            out.push((entry, bound));
        }
    }
    out
}

/// A destination of a compact entry: the address, with the index of the rule's destination
/// it comes from in place of the ports (high and low halves), which are the rule's current
/// ports for that destination (a ports-only edit changes no compact entry).
fn compact_port(ip: Arc<str>, index: usize) -> DstPort {
    DstPort {
        ip,
        ports: Ports {
            first: (index >> 16) as u16,
            last: (index & 0xffff) as u16,
        },
    }
}

/// The destination index a compact destination holds.
fn compact_index(p: &DstPort) -> usize {
    (usize::from(p.ports.first) << 16) | usize::from(p.ports.last)
}

/// The destinations of a compact entry with the ports they stand for (`ports`: the rule's
/// ports per destination, [`NetRule::dst_port_lists`]): each address with each port range
/// of its destination, in the order [`rule_entry`] gives them.
pub(crate) fn expand_dst(compact: &[DstPort], ports: &[Vec<Ports>]) -> Vec<DstPort> {
    let mut out = Vec::with_capacity(compact.len());
    for c in compact {
        for p in ports.get(compact_index(c)).into_iter().flatten() {
            out.push(DstPort {
                ip: c.ip.clone(),
                ports: *p,
            });
        }
    }
    out
}

/// Whether filter entry `entry` (of a network rule) merges into `existing`, whose sources
/// are `existing_src`: no capability grant, the same protocols and the same sources.
pub(crate) fn merges_into(
    existing: &FilterRule,
    existing_src: &SrcList,
    entry: &FilterRule,
) -> bool {
    merges_given(existing, entry, || {
        Arc::ptr_eq(existing_src, &entry.src_ips) || *existing_src == entry.src_ips
    })
}

/// [`merges_into`], with whether the two entries' sources are the same answered by
/// `same_sources` (asked last).
pub(crate) fn merges_given(
    existing: &FilterRule,
    entry: &FilterRule,
    same_sources: impl FnOnce() -> bool,
) -> bool {
    existing.cap_grant.is_empty() && existing.ip_proto == entry.ip_proto && same_sources()
}

/// The filter entry rule `rule` (id `ri`) alone gives node `d`, before entries of rules
/// with the same sources and protocols merge; `None` when it gives none. With `compact`,
/// its destinations are compact: one per address and destination of the rule, the ports
/// left out ([`expand_dst`] puts them in).
pub(crate) fn rule_entry(
    plan: &crate::build::Plan,
    d: usize,
    ri: usize,
    rule: &NetRule,
    compact: bool,
) -> Option<FilterRule> {
    let r = &plan.r;
    // Only rules that cover the node can give it entries.
    if !plan.covered_by(d, ri) || (rule.self_rule && !r.nodes[d].is_member()) {
        return None;
    }
    let mut dst_ports = Vec::new();
    let mut cap_dsts: Vec<String> = Vec::new();
    for (index, (dst, ports)) in rule.dsts.iter().enumerate() {
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
        if compact {
            if !ports.is_empty() {
                dst_ports.extend(entries.into_iter().map(|e| compact_port(e, index)));
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
        r.nodes[d]
            .email
            .as_ref()
            .and_then(|e| plan.self_src.get(&(ri, e.clone())))?
            .clone()
    } else {
        plan.src_strings.get(ri)?.clone()
    };
    if let Some(caps) = &rule.caps {
        if cap_dsts.is_empty() {
            return None;
        }
        return Some(FilterRule {
            src_ips,
            dst_ports: Arc::default(),
            ip_proto: Vec::new(),
            cap_grant: vec![CapGrant {
                dsts: cap_dsts,
                cap_map: caps.clone(),
            }],
        });
    }
    if dst_ports.is_empty() || src_ips.is_empty() {
        return None;
    }
    Some(FilterRule {
        src_ips,
        dst_ports: Arc::new(dst_ports),
        ip_proto: rule.protos.clone(),
        cap_grant: Vec::new(),
    })
}

/// Whether `rule` (id `ri`) lets a viewer reach prefix `route`, or lets `route` reach it:
/// the viewer is among the sources and a destination is `*` or overlaps the prefix, or the
/// sources are `*` or overlap the prefix and the rule covers the viewer.
pub(crate) fn route_reachable(rule: &NetRule, src: bool, dst: bool, route: &IpNet) -> bool {
    let forward = src
        && rule
            .dsts
            .iter()
            .any(|(d, _)| d.wildcard || d.nets.iter().any(|n| addr::overlaps(n, route)));
    if forward {
        return true;
    }
    dst && (rule.src.wildcard
        || rule.src.all_nodes
        || rule.src.nets.iter().any(|n| addr::overlaps(n, route)))
}
