//! The from-scratch computation, organised for large tailnets: rules are resolved once,
//! nodes with the same reachability share one peer list, and shared parts of filters and SSH
//! rules are reference-counted instead of copied per node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::Policy;
use rayon::prelude::*;

use crate::addr::host_prefix;
use crate::compute::{exit_usable, filter_for, net_rules, routed_through, NetRule};
use crate::resolve::{Resolved, Resolver};
use crate::ssh::SshPlan;
use crate::tailnet::Tailnet;
use crate::wire::{CapMap, NodeView, Peer, PeerList};

/// All views of a tailnet under a policy, computed from scratch.
pub struct Computed {
    /// Views by node name.
    pub views: BTreeMap<String, NodeView>,
    /// Primary routers decided for this state.
    pub primaries: OrdMap<IpNet, String>,
}

/// Computes every node's view from scratch. This is the reference the engine must equal.
pub fn compute_all(policy: &Policy, tailnet: &Tailnet) -> Computed {
    let r = Resolver::new(policy, tailnet);
    let primaries = crate::routes::elect(&r, &tailnet.primaries);
    let plan = Plan::new(&r, &primaries);
    let views: Vec<(String, NodeView)> = (0..r.nodes.len())
        .into_par_iter()
        .map(|v| (r.nodes[v].name.to_string(), plan.view(v)))
        .collect();
    Computed {
        views: views.into_iter().collect(),
        primaries,
    }
}

type Bits = Vec<u64>;

fn bit(b: &[u64], i: usize) -> bool {
    b[i / 64] & (1 << (i % 64)) != 0
}

fn intersects(a: &[u64], b: &[u64], mask: &[u64]) -> bool {
    a.iter().zip(b).zip(mask).any(|((x, y), m)| x & y & m != 0)
}

/// Resolved rules and shared structures for one tailnet state.
pub(crate) struct Plan<'r, 'a> {
    pub r: &'r Resolver<'a>,
    pub rules: Vec<NetRule>,
    pub primaries: &'r OrdMap<IpNet, String>,
    /// Per node: which rules have it among their sources.
    src_bits: Vec<Bits>,
    /// Per node: which rules' destinations cover it.
    dst_bits: Vec<Bits>,
    /// Rules that are not `autogroup:self` rules.
    plain_mask: Bits,
    pub src_strings: Vec<Arc<Vec<String>>>,
    /// Sources of `autogroup:self` rules, per (rule, owner email).
    pub self_src: HashMap<(usize, &'a str), Arc<Vec<String>>>,
    class_of: Vec<usize>,
    class_peers: Vec<Arc<Vec<Arc<Peer>>>>,
    /// Per node, the peer entry of a node without routes: [viewer uses IPv4, viewer does not].
    base_peer: Vec<[Arc<Peer>; 2]>,
    ssh: SshPlan,
    attr_targets: Vec<Resolved>,
}

impl<'r, 'a> Plan<'r, 'a> {
    pub(crate) fn new(r: &'r Resolver<'a>, primaries: &'r OrdMap<IpNet, String>) -> Plan<'r, 'a> {
        let rules = net_rules(r);
        let n = r.nodes.len();
        let words = rules.len().div_ceil(64).max(1);
        let (src_bits, dst_bits): (Vec<Bits>, Vec<Bits>) = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut s = vec![0u64; words];
                let mut d = vec![0u64; words];
                for (ri, rule) in rules.iter().enumerate() {
                    if r.src_contains(&rule.src, i) {
                        s[ri / 64] |= 1 << (ri % 64);
                    }
                    if rule.covers(r, i) {
                        d[ri / 64] |= 1 << (ri % 64);
                    }
                }
                (s, d)
            })
            .unzip();
        let mut plain_mask = vec![0u64; words];
        for (ri, rule) in rules.iter().enumerate() {
            if !rule.self_rule {
                plain_mask[ri / 64] |= 1 << (ri % 64);
            }
        }
        let src_strings: Vec<Arc<Vec<String>>> = rules
            .iter()
            .map(|rule| Arc::new(r.src_strings(&rule.src)))
            .collect();
        let mut self_src = HashMap::new();
        for (ri, rule) in rules.iter().enumerate() {
            if !rule.self_rule {
                continue;
            }
            for (email, owned) in &r.by_email {
                let mut ips: Vec<String> = owned
                    .iter()
                    .filter(|&&j| r.nodes[j].is_member() && bit(&src_bits[j], ri))
                    .flat_map(|&j| r.nodes[j].addr_strings())
                    .collect();
                ips.sort();
                ips.dedup();
                self_src.insert((ri, *email), Arc::new(ips));
            }
        }
        let base_peer = r
            .nodes
            .iter()
            .map(|xn| {
                let mk = |v4: bool| {
                    let addresses: Vec<String> = xn
                        .addrs
                        .iter()
                        .filter(|a| v4 || a.is_ipv6())
                        .map(|a| host_prefix(*a))
                        .collect();
                    Arc::new(Peer {
                        name: xn.name.to_string(),
                        allowed_ips: addresses.clone(),
                        addresses,
                        primary_routes: Vec::new(),
                        tags: xn.node.tags.clone(),
                        user: xn.email.map(str::to_string),
                    })
                };
                [mk(true), mk(false)]
            })
            .collect();
        let attr_targets = r
            .policy
            .node_attrs
            .iter()
            .map(|na| r.resolve_all(na.target.iter().map(|t| &t.value)))
            .collect();
        let mut plan = Plan {
            r,
            rules,
            primaries,
            src_bits,
            dst_bits,
            plain_mask,
            src_strings,
            self_src,
            class_of: Vec::new(),
            class_peers: Vec::new(),
            base_peer,
            ssh: SshPlan::new(r),
            attr_targets,
        };
        plan.build_classes();
        plan
    }

    /// Groups nodes by what decides their peers (rule membership, own routes, IPv4 use) and
    /// computes one peer list per group.
    fn build_classes(&mut self) {
        let n = self.r.nodes.len();
        let mut ids: HashMap<(&Bits, &Bits, &Vec<IpNet>, bool), usize> = HashMap::new();
        let mut reps = Vec::new();
        let mut class_of = Vec::with_capacity(n);
        for v in 0..n {
            let key = (
                &self.src_bits[v],
                &self.dst_bits[v],
                &self.r.nodes[v].routes,
                self.r.nodes[v].no_ipv4,
            );
            let next = reps.len();
            let id = *ids.entry(key).or_insert(next);
            if id == next {
                reps.push(v);
            }
            class_of.push(id);
        }
        let class_peers: Vec<Arc<Vec<Arc<Peer>>>> = reps
            .par_iter()
            .map(|&v| {
                let sv = &self.src_bits[v];
                let dv = &self.dst_bits[v];
                let list: Vec<Arc<Peer>> = (0..n)
                    .filter(|&x| {
                        intersects(sv, &self.dst_bits[x], &self.plain_mask)
                            || intersects(dv, &self.src_bits[x], &self.plain_mask)
                    })
                    .map(|x| self.peer_entry(v, x))
                    .collect();
                Arc::new(list)
            })
            .collect();
        drop(ids);
        self.class_of = class_of;
        self.class_peers = class_peers;
    }

    /// How viewer `v` sees peer `x`.
    fn peer_entry(&self, v: usize, x: usize) -> Arc<Peer> {
        let r = self.r;
        let xn = &r.nodes[x];
        let v4 = !r.nodes[v].no_ipv4;
        let base = &self.base_peer[x][usize::from(!v4)];
        if xn.routes.is_empty() && !xn.exit {
            return base.clone();
        }
        let mut allowed_ips = base.addresses.clone();
        let mut primary_routes = Vec::new();
        for rt in &xn.routes {
            if routed_through(r, &self.rules, self.primaries, v, x, rt) {
                allowed_ips.push(rt.to_string());
                primary_routes.push(rt.to_string());
            }
        }
        if xn.exit && exit_usable(r, &self.rules, v) {
            allowed_ips.push("0.0.0.0/0".into());
            allowed_ips.push("::/0".into());
        }
        if primary_routes.is_empty() && allowed_ips.len() == base.allowed_ips.len() {
            return base.clone();
        }
        Arc::new(Peer {
            allowed_ips,
            primary_routes,
            ..(**base).clone()
        })
    }

    /// Peers that node `v` has through `autogroup:self` rules (its owner's other devices).
    fn self_peers(&self, v: usize) -> Vec<Arc<Peer>> {
        let r = self.r;
        let Some(email) = r.nodes[v].email.filter(|_| r.nodes[v].is_member()) else {
            return Vec::new();
        };
        let self_rules: Vec<usize> = (0..self.rules.len())
            .filter(|&ri| self.rules[ri].self_rule)
            .collect();
        if self_rules.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &y in r.by_email.get(email).map(Vec::as_slice).unwrap_or(&[]) {
            if y == v || !r.nodes[y].is_member() {
                continue;
            }
            let linked = self_rules.iter().any(|&ri| {
                (bit(&self.src_bits[v], ri) && bit(&self.dst_bits[y], ri))
                    || (bit(&self.src_bits[y], ri) && bit(&self.dst_bits[v], ri))
            });
            if linked {
                out.push(self.peer_entry(v, y));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Node attributes (`nodeAttrs`) and tailnet-wide switches for node `v`.
    fn caps_for(&self, v: usize) -> CapMap {
        let mut m = CapMap::new();
        for (na, target) in self.r.policy.node_attrs.iter().zip(&self.attr_targets) {
            if !self.r.src_contains(target, v) {
                continue;
            }
            for a in &na.attr {
                m.entry(a.clone()).or_insert(None);
                if a == "funnel" {
                    // Funnel comes with its default ports and the HTTPS warning capability.
                    for extra in [
                        "https://tailscale.com/cap/funnel-ports?ports=443,8443,10000",
                        "https://tailscale.com/cap/warn-funnel-no-https",
                    ] {
                        m.entry(extra.to_string()).or_insert(None);
                    }
                }
            }
            for (name, values) in &na.app {
                let e = m.entry(name.clone()).or_insert(None);
                e.get_or_insert_with(Vec::new)
                    .extend(values.iter().cloned());
            }
        }
        if self.r.policy.randomize_client_port {
            m.entry("randomize-client-port".into()).or_insert(None);
        }
        m
    }

    /// The complete view of node `v`.
    pub(crate) fn view(&self, v: usize) -> NodeView {
        let r = self.r;
        let shared = self.class_peers[self.class_of[v]].clone();
        NodeView {
            packet_filter: Arc::new(filter_for(self, v)),
            peers: PeerList::new(shared, r.nodes[v].name, self.self_peers(v)),
            ssh_rules: Arc::new(self.ssh.rules_for(r, v)),
            cap_map: Arc::new(self.caps_for(v)),
        }
    }
}
