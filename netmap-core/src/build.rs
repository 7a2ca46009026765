//! The computation of views, organised for large tailnets and for incremental updates:
//! rules are resolved once, nodes with the same reachability share one peer list (a
//! "class"), and shared parts of filters and SSH rules are reference-counted.
//!
//! [`compute_all`] builds a [`Plan`] from scratch and derives every view; the engine keeps a
//! `Plan` and brings it up to date with [`Plan::update_node`] when one node changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::Policy;
use rayon::prelude::*;

use crate::addr::host_prefix;
use crate::compute::{exit_usable, filter_for, net_rules, routed_through, NetRule};
use crate::resolve::{Resolved, Resolver};
use crate::ssh::{BoundSshRule, SshPlan};
use crate::tailnet::{Node, Tailnet};
use crate::wire::{CapMap, FilterRule, NodeView, Peer, PeerList, SharedPeers, SshPrincipal};

/// All views of a tailnet under a policy, computed from scratch.
pub struct Computed {
    /// Views by node name.
    pub views: BTreeMap<String, NodeView>,
    /// Primary routers decided for this state.
    pub primaries: OrdMap<IpNet, String>,
}

/// Computes every node's view from scratch. This is the reference the engine must equal.
pub fn compute_all(policy: &Policy, tailnet: &Tailnet) -> Computed {
    let plan = Plan::build(Arc::new(policy.clone()), tailnet);
    let views = plan.all_views();
    Computed {
        views: views.into_iter().collect(),
        primaries: plan.primaries.clone(),
    }
}

type Bits = Vec<u64>;

fn bit(b: &[u64], i: usize) -> bool {
    b[i / 64] & (1 << (i % 64)) != 0
}

fn intersects(a: &[u64], b: &[u64], mask: &[u64]) -> bool {
    a.iter().zip(b).zip(mask).any(|((x, y), m)| x & y & m != 0)
}

/// What decides a node's peers: rule membership, its own routes, its use of IPv4.
type ClassKey = (Bits, Bits, Vec<IpNet>, bool);

#[derive(Debug)]
struct Class {
    rep: usize,
    members: BTreeSet<usize>,
}

/// The parts of a plan that many stored views read instead of holding copies: each class's
/// peer list, each rule's source list, each SSH rule's identity principals. Persistent, so a
/// snapshot takes them in O(1).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tables {
    class_peers: imbl::Vector<SharedPeers>,
    rule_src: imbl::Vector<Arc<Vec<String>>>,
    ssh_principals: imbl::Vector<Arc<Vec<SshPrincipal>>>,
}

/// A node's view as the engine keeps it: its own parts, and references into [`Tables`] for
/// the parts it shares with other nodes. A change to a shared part is made once, in the
/// tables, and every view that reads it follows without being touched.
#[derive(Debug, Clone)]
pub(crate) struct StoredView {
    class: usize,
    filter: Arc<Vec<(FilterRule, Option<usize>)>>,
    /// Peers only this node has (its owner's other devices through `autogroup:self`).
    extra: Arc<Vec<Arc<Peer>>>,
    ssh: Arc<Vec<BoundSshRule>>,
    cap_map: Arc<CapMap>,
}

impl StoredView {
    /// The full view of node `name`, reading shared parts from `tables`.
    pub(crate) fn materialize(&self, tables: &Tables, name: &str) -> NodeView {
        let shared = tables
            .class_peers
            .get(self.class)
            .cloned()
            .unwrap_or_default();
        let packet_filter = self
            .filter
            .iter()
            .map(
                |(f, bound)| match bound.and_then(|ri| tables.rule_src.get(ri)) {
                    Some(src) => FilterRule {
                        src_ips: src.clone(),
                        ..f.clone()
                    },
                    None => f.clone(),
                },
            )
            .collect();
        let ssh_rules = self
            .ssh
            .iter()
            .map(
                |(rule, bound)| match bound.and_then(|k| tables.ssh_principals.get(k)) {
                    Some(p) => crate::wire::SshRuleWire {
                        principals: p.clone(),
                        ..rule.clone()
                    },
                    None => rule.clone(),
                },
            )
            .collect();
        NodeView {
            packet_filter: Arc::new(packet_filter),
            peers: PeerList::new(shared, name, self.extra.as_ref().clone()),
            ssh_rules: Arc::new(ssh_rules),
            cap_map: self.cap_map.clone(),
        }
    }
}

/// Resolved rules and shared structures for one tailnet state.
pub(crate) struct Plan {
    pub r: Resolver,
    pub rules: Vec<NetRule>,
    pub primaries: OrdMap<IpNet, String>,
    words: usize,
    /// Per slot: which rules have it among their sources.
    src_bits: Vec<Bits>,
    /// Per slot: which rules' destinations cover it.
    dst_bits: Vec<Bits>,
    /// Rules that are not `autogroup:self` rules.
    plain_mask: Bits,
    pub src_strings: imbl::Vector<Arc<Vec<String>>>,
    /// Sources of `autogroup:self` rules, per (rule, owner email).
    pub self_src: HashMap<(usize, String), Arc<Vec<String>>>,
    classes: Vec<Option<Class>>,
    /// Per class id, its peer list (stale for classes that emptied).
    class_peers: imbl::Vector<SharedPeers>,
    class_ids: HashMap<ClassKey, usize>,
    class_of: Vec<usize>,
    /// Per slot, the peer entry of a node without routes: [viewer uses IPv4, viewer does not].
    base_peer: Vec<[Arc<Peer>; 2]>,
    ssh: SshPlan,
    attr_targets: Vec<Resolved>,
    /// What bound entries carry in place of the lists they read from the tables.
    unbound_src: Arc<Vec<String>>,
    unbound_principals: Arc<Vec<SshPrincipal>>,
    /// Every slot (dead ones too), in node name order.
    name_order: Vec<usize>,
}

/// What an update did to one slot's view (bit flags).
pub(crate) mod touch {
    /// The stored view must be recomputed.
    pub const RECOMPUTE: u8 = 1;
    /// Its class's peer list changed (see `Affected::class_change`).
    pub const PEERS: u8 = 2;
    /// A source list its filter reads from the tables changed.
    pub const FILTER: u8 = 4;
    /// Principals its SSH rules read from the tables changed.
    pub const SSH: u8 = 8;
}

/// The slots whose views an update may have changed.
#[derive(Debug, Default)]
pub(crate) struct Affected {
    /// Live slots touched, in name order, with [`touch`] flags. Slots without `RECOMPUTE` keep their
    /// stored view: what changed for them is known from the flags.
    pub slots: Vec<(usize, u8)>,
    /// By class id: how the changed node's entry in the class's peer list changed (`None`:
    /// no change; classes created by the update are past the end).
    class_change: Vec<Option<PeerChange>>,
}

impl Affected {
    /// How the changed node's entry in class `class`'s peer list changed (`None`: no change).
    pub(crate) fn class_change(&self, class: usize) -> Option<PeerChange> {
        self.class_change.get(class).copied().flatten()
    }
}

/// How a node's entry in a peer list changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerChange {
    Added,
    Removed,
    Changed,
}

impl Plan {
    /// Builds the plan of a tailnet state from scratch.
    pub(crate) fn build(policy: Arc<Policy>, tailnet: &Tailnet) -> Plan {
        let r = Resolver::new(policy, tailnet);
        let primaries = crate::routes::elect(&r, &tailnet.primaries);
        let rules = net_rules(&r);
        let words = rules.len().div_ceil(64).max(1);
        let mut plain_mask = vec![0u64; words];
        for (ri, rule) in rules.iter().enumerate() {
            if !rule.self_rule {
                plain_mask[ri / 64] |= 1 << (ri % 64);
            }
        }
        let attr_targets = r
            .policy
            .node_attrs
            .iter()
            .map(|na| r.resolve_all(na.target.iter().map(|t| &t.value)))
            .collect();
        let ssh = SshPlan::new(&r);
        let mut plan = Plan {
            r,
            rules,
            primaries,
            words,
            src_bits: Vec::new(),
            dst_bits: Vec::new(),
            plain_mask,
            src_strings: imbl::Vector::new(),
            self_src: HashMap::new(),
            classes: Vec::new(),
            class_peers: imbl::Vector::new(),
            class_ids: HashMap::new(),
            class_of: Vec::new(),
            base_peer: Vec::new(),
            ssh,
            attr_targets,
            unbound_src: Arc::default(),
            unbound_principals: Arc::default(),
            name_order: Vec::new(),
        };
        let n = plan.r.nodes.len();
        let (src_bits, dst_bits): (Vec<Bits>, Vec<Bits>) =
            (0..n).into_par_iter().map(|i| plan.bits_of(i)).unzip();
        plan.src_bits = src_bits;
        plan.dst_bits = dst_bits;
        plan.src_strings = (0..plan.rules.len())
            .map(|ri| Arc::new(plan.r.src_strings(&plan.rules[ri].src)))
            .collect();
        let owners: Vec<String> = plan.r.by_email.keys().cloned().collect();
        for email in owners {
            plan.refresh_self_src(&email);
        }
        plan.base_peer = (0..n).map(|i| plan.base_peers_of(i)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| plan.r.nodes[a].name.cmp(&plan.r.nodes[b].name));
        plan.name_order = order;
        plan.build_classes();
        // Room for the nodes that will join before the next rebuild: growing these vectors
        // copies every slot, and a rebuild (a policy change) would leave none spare.
        let spare = n / 8 + 16;
        plan.r.nodes.reserve(spare);
        plan.src_bits.reserve(spare);
        plan.dst_bits.reserve(spare);
        plan.class_of.reserve(spare);
        plan.base_peer.reserve(spare);
        plan.name_order.reserve(spare);
        plan
    }

    /// Every live node's view, in name order.
    pub(crate) fn all_views(&self) -> Vec<(String, NodeView)> {
        let tables = self.tables();
        let mut out: Vec<(String, NodeView)> = self
            .all_stored_views()
            .into_par_iter()
            .map(|(name, sv)| {
                let view = sv.materialize(&tables, &name);
                (name, view)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every live node's stored view, in name order.
    pub(crate) fn all_stored_views(&self) -> Vec<(String, StoredView)> {
        let live: Vec<usize> = self.live().collect();
        let mut out: Vec<(String, StoredView)> = live
            .par_iter()
            .map(|&v| (self.r.nodes[v].name.clone(), self.stored_view(v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The shared parts views read (O(1): persistent vectors).
    pub(crate) fn tables(&self) -> Tables {
        Tables {
            class_peers: self.class_peers.clone(),
            rule_src: self.src_strings.clone(),
            ssh_principals: self.ssh.principals.clone(),
        }
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.r.nodes.len()).filter(|&i| self.r.nodes[i].alive)
    }

    fn bits_of(&self, i: usize) -> (Bits, Bits) {
        let mut s = vec![0u64; self.words];
        let mut d = vec![0u64; self.words];
        if self.r.nodes[i].alive {
            for (ri, rule) in self.rules.iter().enumerate() {
                if self.r.src_contains(&rule.src, i) {
                    s[ri / 64] |= 1 << (ri % 64);
                }
                if rule.covers(&self.r, i) {
                    d[ri / 64] |= 1 << (ri % 64);
                }
            }
        }
        (s, d)
    }

    fn refresh_self_src(&mut self, email: &str) {
        for ri in 0..self.rules.len() {
            if !self.rules[ri].self_rule {
                continue;
            }
            let owned = self.r.by_email.get(email).cloned().unwrap_or_default();
            let mut ips: Vec<String> = owned
                .iter()
                .filter(|&&j| self.r.nodes[j].is_member() && bit(&self.src_bits[j], ri))
                .flat_map(|&j| self.r.nodes[j].addr_strings())
                .collect();
            ips.sort();
            ips.dedup();
            self.self_src.insert((ri, email.to_string()), Arc::new(ips));
        }
    }

    fn base_peers_of(&self, i: usize) -> [Arc<Peer>; 2] {
        let xn = &self.r.nodes[i];
        let mk = |v4: bool| {
            let addresses: Vec<String> = xn
                .addrs
                .iter()
                .filter(|a| v4 || a.is_ipv6())
                .map(|a| host_prefix(*a))
                .collect();
            Arc::new(Peer {
                name: xn.name.clone(),
                allowed_ips: addresses.clone(),
                addresses,
                primary_routes: Vec::new(),
                tags: xn.node.tags.clone(),
                user: xn.email.clone(),
            })
        };
        [mk(true), mk(false)]
    }

    fn class_key(&self, v: usize) -> ClassKey {
        (
            self.src_bits[v].clone(),
            self.dst_bits[v].clone(),
            self.r.nodes[v].routes.clone(),
            self.r.nodes[v].no_ipv4,
        )
    }

    /// Whether nodes of class represented by `v` see node `x` (through non-self rules).
    fn sees(&self, v: usize, x: usize) -> bool {
        self.r.nodes[x].alive
            && (intersects(&self.src_bits[v], &self.dst_bits[x], &self.plain_mask)
                || intersects(&self.dst_bits[v], &self.src_bits[x], &self.plain_mask))
    }

    fn class_peer_list(&self, rep: usize) -> SharedPeers {
        Arc::new(
            self.live()
                .filter(|&x| self.sees(rep, x))
                .map(|x| (self.r.nodes[x].key.clone(), self.peer_entry(rep, x)))
                .collect(),
        )
    }

    /// Groups nodes by class and computes one peer list per class.
    fn build_classes(&mut self) {
        let n = self.r.nodes.len();
        let mut class_of = vec![usize::MAX; n];
        let mut reps: Vec<usize> = Vec::new();
        let mut members: Vec<BTreeSet<usize>> = Vec::new();
        let mut ids: HashMap<ClassKey, usize> = HashMap::new();
        for v in self.live().collect::<Vec<_>>() {
            let key = self.class_key(v);
            let next = reps.len();
            let id = *ids.entry(key).or_insert(next);
            if id == next {
                reps.push(v);
                members.push(BTreeSet::new());
            }
            members[id].insert(v);
            class_of[v] = id;
        }
        let lists: Vec<SharedPeers> = reps
            .par_iter()
            .map(|&rep| self.class_peer_list(rep))
            .collect();
        self.class_peers = lists.into_iter().collect();
        self.classes = reps
            .into_iter()
            .zip(members)
            .map(|(rep, members)| Some(Class { rep, members }))
            .collect();
        self.class_ids = ids;
        self.class_of = class_of;
    }

    /// How viewer `v` sees peer `x`.
    fn peer_entry(&self, v: usize, x: usize) -> Arc<Peer> {
        let r = &self.r;
        let xn = &r.nodes[x];
        let v4 = !r.nodes[v].no_ipv4;
        let base = &self.base_peer[x][usize::from(!v4)];
        if xn.routes.is_empty() && !xn.exit {
            return base.clone();
        }
        let mut allowed_ips = base.addresses.clone();
        let mut primary_routes = Vec::new();
        for rt in &xn.routes {
            if routed_through(r, &self.rules, &self.primaries, v, x, rt) {
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

    fn self_rule_ids(&self) -> Vec<usize> {
        (0..self.rules.len())
            .filter(|&ri| self.rules[ri].self_rule)
            .collect()
    }

    /// Peers that node `v` has through `autogroup:self` rules (its owner's other devices).
    fn self_peers(&self, v: usize) -> Vec<Arc<Peer>> {
        let r = &self.r;
        let Some(email) = r.nodes[v].email.as_ref().filter(|_| r.nodes[v].is_member()) else {
            return Vec::new();
        };
        let self_rules = self.self_rule_ids();
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

    /// The slot of a live node.
    pub(crate) fn slot(&self, name: &str) -> Option<usize> {
        self.r
            .by_name
            .get(name)
            .copied()
            .filter(|&i| self.r.nodes[i].alive)
    }

    /// The class of a live slot.
    pub(crate) fn class_id(&self, slot: usize) -> usize {
        self.class_of[slot]
    }

    /// Records a live node's presence, which no view reads unless the node serves routes.
    pub(crate) fn set_presence(&mut self, name: &str, online: bool) {
        if let Some(s) = self.slot(name) {
            self.r.nodes[s].node.online = online;
        }
    }

    /// The name of a slot's node, shared.
    pub(crate) fn key(&self, slot: usize) -> &Arc<str> {
        &self.r.nodes[slot].key
    }

    /// The name of a slot's node.
    pub(crate) fn name(&self, slot: usize) -> &str {
        &self.r.nodes[slot].name
    }

    /// The complete view of node `v`.
    #[allow(dead_code)]
    pub(crate) fn view(&self, v: usize) -> NodeView {
        self.stored_view(v)
            .materialize(&self.tables(), &self.r.nodes[v].name)
    }

    /// Node `v`'s view as the engine stores it.
    pub(crate) fn stored_view(&self, v: usize) -> StoredView {
        let filter = filter_for(self, v)
            .into_iter()
            .map(|(f, bound)| match bound {
                Some(_) => (
                    FilterRule {
                        src_ips: self.unbound_src.clone(),
                        ..f
                    },
                    bound,
                ),
                None => (f, None),
            })
            .collect();
        StoredView {
            class: self.class_of[v],
            filter: Arc::new(filter),
            extra: Arc::new(self.self_peers(v)),
            ssh: Arc::new(self.ssh.rules_for(&self.r, v, &self.unbound_principals)),
            cap_map: Arc::new(self.caps_for(v)),
        }
    }

    /// Brings the plan up to date after node `name` was upserted (`node` = Some) or removed,
    /// when neither its old nor its new state serves routes. Returns `None` when the change
    /// needs a rebuild instead (routes involved, or nothing to update incrementally).
    pub(crate) fn update_node(
        &mut self,
        tailnet: &Tailnet,
        name: &str,
        node: Option<&Node>,
    ) -> Option<Affected> {
        use touch::{FILTER, PEERS, RECOMPUTE, SSH};
        let old_slot = self.slot(name);
        if let Some(s) = old_slot {
            if !self.r.nodes[s].node.routable_ips.is_empty() {
                return None;
            }
        }
        if node.is_some_and(|n| !n.routable_ips.is_empty()) {
            return None;
        }
        // A session recorder's addresses are written into SSH actions: rebuild.
        let recorder = |n: &Node| n.tags.iter().any(|t| self.ssh.recorder_tags.contains(t));
        if old_slot.is_some_and(|s| recorder(&self.r.nodes[s].node)) || node.is_some_and(recorder) {
            return None;
        }
        let mut affected = Affected {
            slots: Vec::new(),
            class_change: vec![None; self.classes.len()],
        };
        let (old_src, old_dst) = match old_slot {
            Some(s) => (self.src_bits[s].clone(), self.dst_bits[s].clone()),
            None => (vec![0; self.words], vec![0; self.words]),
        };
        let old_info = old_slot.map(|s| self.r.nodes[s].clone());
        let x = self.r.set_slot(tailnet, name, node);
        self.r.tailnet = tailnet.clone();
        if x >= self.src_bits.len() {
            self.src_bits.push(vec![0; self.words]);
            self.dst_bits.push(vec![0; self.words]);
            self.class_of.push(usize::MAX);
            let bp = self.base_peers_of(x);
            self.base_peer.push(bp);
            let at = self
                .name_order
                .partition_point(|&s| self.r.nodes[s].name.as_str() < name);
            self.name_order.insert(at, x);
        }
        let mut flags = vec![0u8; self.r.nodes.len()];
        let alive = self.r.nodes[x].alive;
        let addrs_changed = old_info.as_ref().map(|o| &o.addrs) != Some(&self.r.nodes[x].addrs);
        let ident_changed = old_info.as_ref().is_none_or(|o| {
            o.addrs != self.r.nodes[x].addrs
                || o.node.tags != self.r.nodes[x].node.tags
                || o.email != self.r.nodes[x].email
                || o.no_ipv4 != self.r.nodes[x].no_ipv4
        }) || !alive;

        // Identity sets of every selector.
        let mut src_set_changed = vec![false; self.rules.len()];
        for (ri, rule) in self.rules.iter_mut().enumerate() {
            // A source list names x's addresses when x is in the identity set (even when a
            // wildcard already makes x a source).
            let was_named = rule.src.nodes.contains(&x);
            src_set_changed[ri] = self.r.refresh(&mut rule.src, x)
                || (was_named && rule.src.nodes.contains(&x) && addrs_changed);
            for (d, _) in &mut rule.dsts {
                self.r.refresh(d, x);
            }
        }
        for t in &mut self.attr_targets {
            self.r.refresh(t, x);
        }
        let ssh_changed = self.ssh.refresh_node(&self.r, x, ident_changed);
        (self.src_bits[x], self.dst_bits[x]) = self.bits_of(x);
        self.base_peer[x] = self.base_peers_of(x);

        // Rules whose sources changed: their SrcIPs, hence the filters of what they cover.
        let owners: BTreeSet<String> = old_info
            .iter()
            .filter_map(|o| o.email.clone())
            .chain(self.r.nodes[x].email.clone())
            .collect();
        // First every changed list, then the filters: whether an entry may follow its rule's
        // list depends on the other rules' lists before and after.
        let mut changed_rules: Vec<(usize, Arc<Vec<String>>)> = Vec::new();
        // A list prints the addresses of the nodes its identity set names, its literal
        // prefixes and (for `*`) the tailnet ranges and routes: it changes only when x joins
        // or leaves the identity set or changes addresses while named (routes rebuild).
        for (ri, set_changed) in src_set_changed.into_iter().enumerate() {
            if !set_changed {
                continue;
            }
            if self.rules[ri].self_rule {
                continue;
            }
            let old = self.src_strings[ri].clone();
            let new = Arc::new(self.r.src_strings(&self.rules[ri].src));
            self.src_strings.set(ri, new);
            changed_rules.push((ri, old));
        }
        // What each changed rule does to the filters that cover it, then one pass over the
        // nodes those rules cover.
        let mut covered = vec![0u64; self.words];
        let mut effects = Vec::with_capacity(changed_rules.len());
        for (ri, old) in &changed_rules {
            let ri = *ri;
            let new = self.src_strings[ri].clone();
            // Filters whose entry for this rule is bound to it follow the new list without
            // being recomputed, unless the entry is (or becomes) merged with another rule's
            // or appears or disappears.
            let non_empty = !old.is_empty() && !new.is_empty();
            let (plain, emails) = self.merge_partners(ri, old, &new, &changed_rules);
            let content = if **old != *new { FILTER } else { 0 };
            covered[ri / 64] |= 1 << (ri % 64);
            effects.push((ri, non_empty, plain, emails, content));
        }
        if !effects.is_empty() {
            for v in self.live() {
                let dst = &self.dst_bits[v];
                if !dst.iter().zip(&covered).any(|(d, c)| d & c != 0) {
                    continue;
                }
                for (ri, non_empty, plain, emails, content) in &effects {
                    if !bit(dst, *ri) {
                        continue;
                    }
                    let merged = plain.iter().any(|&rj| bit(dst, rj))
                        || (self.r.nodes[v].is_member()
                            && self.r.nodes[v]
                                .email
                                .as_ref()
                                .is_some_and(|e| emails.contains(e)));
                    flags[v] |= if *non_empty && !merged {
                        *content
                    } else {
                        RECOMPUTE
                    };
                }
            }
        }
        // Self rules, self peers: the owner's devices.
        for email in &owners {
            self.refresh_self_src(email);
            for &y in self.r.by_email.get(email).map(Vec::as_slice).unwrap_or(&[]) {
                flags[y] |= RECOMPUTE;
            }
        }
        if let Some(o) = &old_info {
            // The old owner's devices (by_email no longer lists x under a changed owner).
            if let Some(e) = &o.email {
                for &y in self.r.by_email.get(e).map(Vec::as_slice).unwrap_or(&[]) {
                    flags[y] |= RECOMPUTE;
                }
            }
        }
        // SSH rules whose principals changed: the nodes they apply to. Entries bound to the
        // rule's principals follow them while the rule keeps some (it stays in their list).
        for (k, before, after) in ssh_changed {
            let (all, dsts) = self.ssh.identity_dsts(k);
            let flag = if !self.ssh.binds(k) || before.is_empty() || after.is_empty() {
                RECOMPUTE
            } else if before != after {
                SSH
            } else {
                0
            };
            if flag == 0 {
                continue;
            }
            if all {
                for v in self.live().collect::<Vec<_>>() {
                    flags[v] |= flag;
                }
            } else {
                for v in dsts {
                    flags[v] |= flag;
                }
            }
        }

        // Classes: move x, then update every class's view of x.
        if let Some(c) = self.class_of.get(x).copied().filter(|&c| c != usize::MAX) {
            if let Some(class) = self.classes[c].as_mut() {
                class.members.remove(&x);
                if class.members.is_empty() {
                    self.classes[c] = None;
                    self.class_ids.retain(|_, id| *id != c);
                } else if class.rep == x {
                    class.rep = *class.members.iter().next().unwrap_or(&x);
                }
            }
            self.class_of[x] = usize::MAX;
        }
        let old_sees = |plan: &Plan, rep: usize| {
            old_info.as_ref().is_some_and(|o| o.alive)
                && (intersects(&plan.src_bits[rep], &old_dst, &plan.plain_mask)
                    || intersects(&plan.dst_bits[rep], &old_src, &plan.plain_mask))
        };
        for c in 0..self.classes.len() {
            let Some(class) = self.classes[c].as_ref() else {
                continue;
            };
            let rep = class.rep;
            let was = old_sees(self, rep);
            let now = self.sees(rep, x);
            if !was && !now {
                continue;
            }
            if was && now && !ident_changed {
                continue;
            }
            let entry = now.then(|| self.peer_entry(rep, x));
            let Some(current) = self.class_peers.get(c) else {
                continue;
            };
            // Edit a copy (sharing all but one path) and keep it only if the entry changed.
            let mut list = current.as_ref().clone();
            let before = match &entry {
                Some(e) => list.insert(self.r.nodes[x].key.clone(), e.clone()),
                None => list.remove(name),
            };
            let kind = match (before, &entry) {
                (Some(old), Some(e)) => (*old != **e).then_some(PeerChange::Changed),
                (Some(_), None) => Some(PeerChange::Removed),
                (None, Some(_)) => Some(PeerChange::Added),
                (None, None) => None,
            };
            if let Some(kind) = kind {
                self.class_peers.set(c, Arc::new(list));
                affected.class_change[c] = Some(kind);
                for &m in &class.members {
                    flags[m] |= PEERS;
                }
            }
        }
        if alive {
            let key = self.class_key(x);
            let id = match self.class_ids.get(&key) {
                Some(&id) => id,
                None => {
                    let peers = self.class_peer_list(x);
                    self.classes.push(Some(Class {
                        rep: x,
                        members: BTreeSet::new(),
                    }));
                    self.class_peers.push_back(peers);
                    let id = self.classes.len() - 1;
                    self.class_ids.insert(key, id);
                    id
                }
            };
            if let Some(class) = self.classes[id].as_mut() {
                class.members.insert(x);
            }
            self.class_of[x] = id;
            flags[x] |= RECOMPUTE;
        }
        affected.slots = self
            .name_order
            .iter()
            .map(|&s| (s, flags[s]))
            .filter(|&(s, f)| f != 0 && self.r.nodes[s].alive)
            .collect();
        Some(affected)
    }

    /// The rules whose filter entries may merge with rule `ri`'s before (`old` sources) or
    /// after (`new`): network rules with the same protocols and equal sources, then or now.
    /// Plain rules are returned by index (a filter merges them where both cover it);
    /// `autogroup:self` rules have per-owner sources, so for them the owners whose list
    /// equals `old` or `new` are returned. `changed` holds the rules whose sources this
    /// change replaced, with their previous lists.
    fn merge_partners(
        &self,
        ri: usize,
        old: &Arc<Vec<String>>,
        new: &Arc<Vec<String>>,
        changed: &[(usize, Arc<Vec<String>>)],
    ) -> (Vec<usize>, HashSet<String>) {
        let rule = &self.rules[ri];
        let mut plain = Vec::new();
        let mut emails = HashSet::new();
        if rule.caps.is_some() {
            return (plain, emails);
        }
        let same = |a: &Arc<Vec<String>>, b: &Arc<Vec<String>>| Arc::ptr_eq(a, b) || a == b;
        for (rj, o) in self.rules.iter().enumerate() {
            if rj == ri || o.caps.is_some() || o.protos != rule.protos {
                continue;
            }
            if o.self_rule {
                for ((rk, email), list) in &self.self_src {
                    if *rk == rj && (same(list, old) || same(list, new)) {
                        emails.insert(email.clone());
                    }
                }
                continue;
            }
            let now = &self.src_strings[rj];
            let before = changed
                .iter()
                .find(|(c, _)| *c == rj)
                .map_or(now, |(_, b)| b);
            if same(before, old) || same(now, new) {
                plain.push(rj);
            }
        }
        (plain, emails)
    }
}
