//! The computation of views, organised for large tailnets and for incremental updates.
//!
//! What a view is made of is kept as a dependency graph with explicit derived values:
//! - inputs: the nodes (slots of the [`Resolver`]), the users, the policy's rules (under
//!   stable ids, [`RuleTable`]), SSH rules, node attributes and auto-approvers;
//! - derived sets: each rule's resolved sources and destinations, and per node two bit rows
//!   (which rules have it among their sources, which rules' destinations cover it); each
//!   rule's source list; per subnet prefix the routers serving it and the primary;
//! - reachability classes: nodes with the same bit rows (and IPv4 use) see the same peers
//!   the same way, so they share one persistent peer list;
//! - views: per node its filter, its class, the peers only it has (its own devices through
//!   `autogroup:self`, routers of the prefixes it serves itself), SSH rules and capabilities,
//!   with the shared parts read from [`Tables`].
//!
//! [`compute_all`] builds a [`Plan`] from scratch and derives every view; the engine keeps a
//! `Plan` and brings it up to date with [`Plan::update`], which recomputes a derived value
//! only when one it reads changed and stops where a recomputed value equals the old one.

mod update;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::Policy;
use rayon::prelude::*;

use crate::addr::{self, host_prefix};
use crate::compute::{filter_for, net_rules, route_reachable, EntryFrom};
use crate::resolve::{NodeInfo, Resolved, Resolver};
use crate::routes::Approvers;
use crate::rules::RuleTable;
use crate::ssh::{BoundSshRule, SshPlan};
use crate::tailnet::Tailnet;
use crate::wire::{
    CapMap, DstPort, FilterRule, NodeView, Peer, PeerKey, PeerList, Ports, SharedPeers, SrcList,
    SshPrincipal,
};

use crate::bits::{bit, intersects};
pub(crate) use update::{list_pair, touch, Batch, Keeps, ListDelta, ListPair};

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

/// One row of bits per node slot, one bit per rule id, in one allocation.
#[derive(Debug, Clone, Default)]
struct BitRows {
    words: usize,
    data: Vec<u64>,
}

impl BitRows {
    fn new(words: usize, rows: usize) -> BitRows {
        BitRows {
            words,
            data: vec![0; words * rows],
        }
    }

    fn row(&self, i: usize) -> &[u64] {
        &self.data[i * self.words..(i + 1) * self.words]
    }

    fn row_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.data[i * self.words..(i + 1) * self.words]
    }

    fn push_row(&mut self) {
        self.data.extend(std::iter::repeat_n(0, self.words));
    }

    /// Whether row `i` has bit `b` (false past the rows or the words).
    fn bit(&self, i: usize, b: usize) -> bool {
        self.data
            .get(i * self.words..(i + 1) * self.words)
            .is_some_and(|row| bit(row, b))
    }

    fn rows(&self) -> usize {
        self.data.len() / self.words.max(1)
    }

    fn set(&mut self, i: usize, b: usize, on: bool) {
        let w = &mut self.data[i * self.words + b / 64];
        if on {
            *w |= 1 << (b % 64);
        } else {
            *w &= !(1 << (b % 64));
        }
    }

    /// The same rows with room for `words` words each (never fewer than they have).
    fn widened(&self, words: usize) -> BitRows {
        let words = words.max(self.words);
        let mut out = BitRows::new(words, self.rows());
        for i in 0..self.rows() {
            out.row_mut(i)[..self.words].copy_from_slice(self.row(i));
        }
        out
    }

    fn reserve(&mut self, rows: usize) {
        self.data.reserve(rows * self.words);
    }
}

/// What decides how a node sees its peers through the shared list: its bit rows (sources,
/// destinations) and whether it uses IPv4.
type ClassKey = (Vec<u64>, Vec<u64>, bool);

/// The reachability classes: their keys, members and shared peer lists, by class id.
#[derive(Debug, Clone, Default)]
struct ClassTable {
    ids: HashMap<ClassKey, usize>,
    keys: Vec<Option<ClassKey>>,
    members: Vec<BTreeSet<usize>>,
    lists: imbl::Vector<SharedPeers>,
    free: Vec<usize>,
}

impl ClassTable {
    fn key(&self, id: usize) -> Option<&ClassKey> {
        self.keys.get(id).and_then(Option::as_ref)
    }

    /// Adds a class with its list; returns its id.
    fn add(&mut self, key: ClassKey, list: SharedPeers) -> usize {
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id] = Some(key.clone());
                self.members[id].clear();
                self.lists.set(id, list);
                id
            }
            None => {
                self.keys.push(Some(key.clone()));
                self.members.push(BTreeSet::new());
                self.lists.push_back(list);
                self.keys.len() - 1
            }
        };
        self.ids.insert(key, id);
        id
    }

    /// Drops an empty class.
    fn drop_class(&mut self, id: usize) {
        if let Some(key) = self.keys.get_mut(id).and_then(Option::take) {
            self.ids.remove(&key);
            self.lists.set(id, SharedPeers::default());
            self.free.push(id);
        }
    }

    /// Ids of the classes in use.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.keys.len()).filter(|&c| self.keys[c].is_some())
    }

    /// Widens every key to `words` words per row.
    fn widen(&mut self, words: usize) {
        let widen = |v: &Vec<u64>| {
            let mut w = v.clone();
            w.resize(words, 0);
            w
        };
        self.ids.clear();
        for (id, key) in self.keys.iter_mut().enumerate() {
            if let Some(k) = key {
                *k = (widen(&k.0), widen(&k.1), k.2);
                self.ids.insert(k.clone(), id);
            }
        }
    }
}

/// The parts of a plan that many stored views read instead of holding copies: each class's
/// peer list, each rule's source list, each SSH rule's identity principals. Persistent, so a
/// snapshot takes them in O(1).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tables {
    class_peers: imbl::Vector<SharedPeers>,
    rule_src: imbl::Vector<SrcList>,
    rule_ports: imbl::Vector<RulePorts>,
    ssh_principals: imbl::Vector<Arc<Vec<SshPrincipal>>>,
}

impl Tables {
    /// Class `class`'s peer list.
    pub(crate) fn class_list(&self, class: usize) -> Option<&SharedPeers> {
        self.class_peers.get(class)
    }
}

impl StoredView {
    /// The source list of filter entry `f` (bound ones read it from `tables`).
    pub(crate) fn entry_src<'a>(
        tables: &'a Tables,
        (f, from): &'a (FilterRule, EntryFrom),
    ) -> &'a SrcList {
        from.bound()
            .and_then(|ri| tables.rule_src.get(ri))
            .unwrap_or(&f.src_ips)
    }

    /// The destinations of filter entry `f` with their ports (bound ones hold them compact,
    /// their ports are in `tables`).
    pub(crate) fn entry_dst<'a>(
        tables: &Tables,
        (f, from): &'a (FilterRule, EntryFrom),
    ) -> std::borrow::Cow<'a, Arc<Vec<DstPort>>> {
        match from {
            EntryFrom::Rule(ri) => {
                let ports = tables.rule_ports.get(*ri).map_or(&[][..], |p| p.as_slice());
                std::borrow::Cow::Owned(Arc::new(crate::compute::expand_dst(&f.dst_ports, ports)))
            }
            EntryFrom::OwnRule(_) | EntryFrom::Merged => std::borrow::Cow::Borrowed(&f.dst_ports),
        }
    }

    /// Whether entries `a` (read with tables `at`) and `b` (with `bt`) have the same
    /// destinations and ports; compact ones are compared without expanding them when
    /// their rules' ports are the same.
    pub(crate) fn same_dst(
        at: &Tables,
        a: &(FilterRule, EntryFrom),
        bt: &Tables,
        b: &(FilterRule, EntryFrom),
    ) -> bool {
        let same_list = |x: &Arc<Vec<DstPort>>, y: &Arc<Vec<DstPort>>| Arc::ptr_eq(x, y) || x == y;
        match (a.1, b.1) {
            (EntryFrom::Rule(x), EntryFrom::Rule(y))
                if same_list(&a.0.dst_ports, &b.0.dst_ports)
                    && match (at.rule_ports.get(x), bt.rule_ports.get(y)) {
                        (Some(p), Some(q)) => Arc::ptr_eq(p, q) || p == q,
                        _ => false,
                    } =>
            {
                true
            }
            // Compact entries that differ can still show the same (destinations with the
            // same ports).
            (EntryFrom::Rule(_), _) | (_, EntryFrom::Rule(_)) => {
                Self::entry_dst(at, a) == Self::entry_dst(bt, b)
            }
            _ => same_list(&a.0.dst_ports, &b.0.dst_ports),
        }
    }

    /// The principals of SSH rule `r` (bound ones read them from `tables`).
    pub(crate) fn rule_principals<'a>(
        tables: &'a Tables,
        (rule, bound): &'a BoundSshRule,
    ) -> &'a Arc<Vec<SshPrincipal>> {
        bound
            .and_then(|k| tables.ssh_principals.get(k))
            .unwrap_or(&rule.principals)
    }
}

/// A node's view as the engine keeps it: its own parts, and references into [`Tables`] for
/// the parts it shares with other nodes. A change to a shared part is made once, in the
/// tables, and every view that reads it follows without being touched.
#[derive(Debug, Clone)]
pub(crate) struct StoredView {
    pub(crate) class: usize,
    pub(crate) filter: Arc<Vec<(FilterRule, EntryFrom)>>,
    /// Peers only this node has, or sees its own way (they take the place of the shared
    /// list's entries of the same name): its owner's other devices through
    /// `autogroup:self`, and routers of the subnet prefixes it serves itself.
    pub(crate) extra: Arc<Vec<Arc<Peer>>>,
    pub(crate) ssh: Arc<Vec<BoundSshRule>>,
    pub(crate) cap_map: Arc<CapMap>,
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
            .map(|entry| match entry.1 {
                EntryFrom::Rule(ri) => FilterRule {
                    src_ips: tables.rule_src.get(ri).cloned().unwrap_or_default(),
                    dst_ports: StoredView::entry_dst(tables, entry).into_owned(),
                    ..entry.0.clone()
                },
                EntryFrom::OwnRule(_) | EntryFrom::Merged => entry.0.clone(),
            })
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

/// A rule's ports per destination, as filters show them ([`NetRule::dst_port_lists`]).
pub(crate) type RulePorts = Arc<Vec<Vec<Ports>>>;

/// The peers a view has aside, with the slots they name (sorted).
type ExtraPeers = (Arc<Vec<Arc<Peer>>>, Vec<usize>);

/// Who looks at a peer: what its peer entries depend on.
#[derive(Debug, Clone, Copy)]
struct Viewer<'a> {
    src: &'a [u64],
    dst: &'a [u64],
    no_ipv4: bool,
    /// The subnet prefixes the viewer serves itself (empty for a class's shared list).
    routes: &'a [IpNet],
}

impl Viewer<'_> {
    /// Whether a node with rule rows `src_row` and `dst_row` is linked to the viewer by a
    /// rule in `mask`: one of the viewer's rules reaches it, or one of its reaches the viewer.
    fn links(&self, src_row: &[u64], dst_row: &[u64], mask: &[u64]) -> bool {
        intersects(self.src, dst_row, mask) || intersects(self.dst, src_row, mask)
    }
}

/// The addresses of live nodes, kept as nodes come, change and go.
#[derive(Default)]
struct AddrIndex {
    /// How many live nodes hold each address (filter form).
    count: HashMap<Arc<str>, u32>,
    /// Each address with the slot holding it, in address order (the nodes a prefix holds
    /// are a range).
    slots: BTreeSet<(IpAddr, usize)>,
}

impl AddrIndex {
    /// Indexes (or drops) the addresses of `node`, the live node in slot `slot`.
    fn index(&mut self, slot: usize, node: &NodeInfo, add: bool) {
        for &a in &node.addrs {
            if add {
                self.slots.insert((a, slot));
            } else {
                self.slots.remove(&(a, slot));
            }
        }
        for a in node.addr_texts() {
            if add {
                *self.count.entry(a.clone()).or_default() += 1;
            } else if let Some(c) = self.count.get_mut(a) {
                *c -= 1;
                if *c == 0 {
                    self.count.remove(a);
                }
            }
        }
    }

    /// How many live nodes hold address `a` (filter form).
    fn holding(&self, a: &str) -> u32 {
        self.count.get(a).copied().unwrap_or(0)
    }
}

/// Resolved rules and shared structures for one tailnet state.
pub(crate) struct Plan {
    pub r: Resolver,
    pub rules: RuleTable,
    approvers: Approvers,
    pub primaries: OrdMap<IpNet, String>,
    /// Live slots serving each subnet prefix.
    routers: BTreeMap<IpNet, BTreeSet<usize>>,
    /// Live approved exit nodes.
    exits: BTreeSet<usize>,
    /// Per slot: which rules have it among their sources.
    src_bits: BitRows,
    /// Per slot: which rules' destinations cover it.
    dst_bits: BitRows,
    /// Rules that are not `autogroup:self` rules.
    plain_mask: Vec<u64>,
    /// Rules that can decide how a viewer routes a prefix (see `NetRule::route_relevant`).
    route_mask: Vec<u64>,
    /// Rules that can let a viewer use exit nodes.
    exit_mask: Vec<u64>,
    /// Per rule id, its source list (empty for ids not in use).
    pub src_strings: imbl::Vector<SrcList>,
    /// Per rule id, its ports per destination (empty for ids not in use): what the compact
    /// entries bound to it stand for.
    rule_ports: imbl::Vector<RulePorts>,
    /// Sources of `autogroup:self` rules, per (rule id, owner email).
    pub self_src: HashMap<(usize, String), SrcList>,
    classes: ClassTable,
    /// Per slot, its class (`usize::MAX` for dead slots).
    class_of: Vec<usize>,
    /// Per slot, the peer entry of the node when it serves no routes (IPv4 included).
    base_peer: Vec<Arc<Peer>>,
    ssh: SshPlan,
    attr_targets: Vec<Resolved>,
    /// Live slots by the user name their node names (tagged nodes too).
    by_user: HashMap<String, Vec<usize>>,
    /// The addresses of live nodes.
    addrs: AddrIndex,
    /// What bound entries carry in place of the lists they read from the tables.
    unbound_src: SrcList,
    unbound_principals: Arc<Vec<SshPrincipal>>,
    /// The peers a slot's stored view has aside (kept by the engine), with their slots,
    /// for the slots that have some.
    extra_of: Vec<Option<ExtraPeers>>,
    /// Per slot, the rules its stored view's filter has entries bound to (a bit per rule
    /// id, like the rows above: a scan over every view reads them in one block).
    bound_bits: BitRows,
    /// Shared empty parts of views.
    no_extra: Arc<Vec<Arc<Peer>>>,
    no_ssh: Arc<Vec<BoundSshRule>>,
    no_caps: Arc<CapMap>,
    /// Every slot (dead ones too), in node name order.
    name_order: Vec<usize>,
}

/// Per rule bit (of `words` words), the sum of `n` over the rows `(src, dst, n)` where the
/// source or the destination row has it: how many nodes each rule links, given rows that
/// stand for `n` nodes each.
fn count_linked<'a>(
    words: usize,
    rows: impl Iterator<Item = (&'a [u64], &'a [u64], usize)>,
) -> Vec<usize> {
    let mut counts = vec![0usize; words * 64];
    for (src, dst, n) in rows {
        for (w, (s, d)) in src.iter().zip(dst).enumerate() {
            let mut m = s | d;
            while m != 0 {
                let b = m.trailing_zeros() as usize;
                m &= m - 1;
                if let Some(c) = counts.get_mut(w * 64 + b) {
                    *c += n;
                }
            }
        }
    }
    counts
}

/// Makes classes whose lists hold the same peers share one list: a view moving between two
/// such classes then costs no diff, and edits keep them shared while they edit them alike
/// (lists equal in length are compared, each with at most `SHARE_CANDIDATES` others: many
/// classes of one length cost no quadratic build; a comparison skips the parts they share).
fn share_equal_lists(lists: &mut [SharedPeers]) {
    const SHARE_CANDIDATES: usize = 16;
    let mut by_len: HashMap<usize, Vec<usize>> = HashMap::new();
    for k in 0..lists.len() {
        let firsts = by_len.entry(lists[k].len()).or_default();
        match firsts
            .iter()
            .take(SHARE_CANDIDATES)
            .find(|&&f| lists[f] == lists[k])
        {
            Some(&f) => lists[k] = lists[f].clone(),
            None => firsts.push(k),
        }
    }
}

impl Plan {
    /// Builds the plan of a tailnet state from scratch.
    pub(crate) fn build(policy: Arc<Policy>, tailnet: &Tailnet) -> Plan {
        let r = Resolver::new(policy, tailnet);
        let approvers = Approvers::new(&r);
        let rules = RuleTable::new(net_rules(&r));
        let attr_targets = r
            .policy
            .node_attrs
            .iter()
            .map(|na| r.resolve_all(na.target.iter().map(|t| &t.value)))
            .collect();
        let ssh = SshPlan::new(&r);
        let words = rules.capacity().div_ceil(64).max(1);
        let n = r.nodes.len();
        let mut plan = Plan {
            r,
            rules,
            approvers,
            primaries: OrdMap::new(),
            routers: BTreeMap::new(),
            exits: BTreeSet::new(),
            src_bits: BitRows::new(words, 0),
            dst_bits: BitRows::new(words, 0),
            plain_mask: Vec::new(),
            route_mask: Vec::new(),
            exit_mask: Vec::new(),
            src_strings: imbl::Vector::new(),
            rule_ports: imbl::Vector::new(),
            self_src: HashMap::new(),
            classes: ClassTable::default(),
            class_of: vec![usize::MAX; n],
            base_peer: Vec::new(),
            ssh,
            attr_targets,
            by_user: HashMap::new(),
            addrs: AddrIndex::default(),
            unbound_src: Arc::default(),
            unbound_principals: Arc::default(),
            extra_of: Vec::new(),
            bound_bits: BitRows::new(words, 0),
            no_extra: Arc::default(),
            no_ssh: Arc::default(),
            no_caps: Arc::default(),
            name_order: Vec::new(),
        };
        for i in 0..n {
            plan.index_routes(i);
            plan.index_user(i, true);
            if plan.r.nodes[i].alive {
                plan.addrs.index(i, &plan.r.nodes[i], true);
            }
        }
        let prefixes: Vec<IpNet> = plan.routers.keys().copied().collect();
        for p in prefixes {
            plan.elect(p, tailnet.primaries.get(&p).map(String::as_str));
        }
        let rows: Vec<(Vec<u64>, Vec<u64>)> =
            (0..n).into_par_iter().map(|i| plan.bits_of(i)).collect();
        plan.src_bits = BitRows::new(words, n);
        plan.dst_bits = BitRows::new(words, n);
        for (i, (s, d)) in rows.into_iter().enumerate() {
            plan.src_bits.row_mut(i).copy_from_slice(&s);
            plan.dst_bits.row_mut(i).copy_from_slice(&d);
        }
        plan.refresh_masks();
        plan.src_strings = (0..plan.rules.capacity())
            .map(|ri| plan.src_list(ri))
            .collect();
        plan.rule_ports = (0..plan.rules.capacity())
            .map(|ri| plan.ports_of(ri))
            .collect();
        let owners: Vec<String> = plan.r.by_email.keys().cloned().collect();
        for email in owners {
            plan.refresh_self_src(&email);
        }
        plan.base_peer = (0..n).map(|i| plan.base_peer_of(i)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| plan.r.nodes[a].name.cmp(&plan.r.nodes[b].name));
        plan.name_order = order;
        plan.build_classes();
        // Room for the nodes that will join: growing these vectors copies every slot.
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
        self.all_stored_views()
            .into_par_iter()
            .map(|(s, sv)| {
                let name = self.r.nodes[s].name.clone();
                let view = sv.materialize(&tables, &name);
                (name, view)
            })
            .collect()
    }

    /// Every live node's stored view with its slot, in name order.
    pub(crate) fn all_stored_views(&self) -> Vec<(usize, StoredView)> {
        let live: Vec<usize> = self
            .name_order
            .iter()
            .copied()
            .filter(|&i| self.r.is_alive(i))
            .collect();
        live.par_iter().map(|&v| (v, self.stored_view(v))).collect()
    }

    /// Records what the engine's stored view of slot `s` holds that updates read: the peers
    /// it has aside and the rules its filter entries are bound to.
    pub(crate) fn record_view(&mut self, s: usize, view: &StoredView) {
        while self.bound_bits.rows() <= s {
            self.bound_bits.push_row();
        }
        self.bound_bits.row_mut(s).fill(0);
        for ri in view.filter.iter().filter_map(|(_, b)| b.bound()) {
            if ri / 64 >= self.bound_bits.words {
                self.bound_bits = self.bound_bits.widened(ri / 64 + 1);
            }
            self.bound_bits.set(s, ri, true);
        }
        self.record_extra(s, &view.extra);
    }

    /// Whether slot `s`'s stored filter has an entry bound to rule `ri`'s source list.
    pub(crate) fn binds_rule(&self, s: usize, ri: usize) -> bool {
        self.bound_bits.bit(s, ri)
    }

    /// Records the peers slot `s`'s stored view has aside (see [`StoredView::extra`]), which
    /// say what a change to its class's list means for it.
    fn record_extra(&mut self, s: usize, extra: &Arc<Vec<Arc<Peer>>>) {
        if self.extra_of.len() <= s {
            if extra.is_empty() {
                return;
            }
            self.extra_of.resize(s + 1, None);
        }
        self.extra_of[s] = if extra.is_empty() {
            None
        } else {
            let mut slots: Vec<usize> = extra
                .iter()
                .filter_map(|p| self.r.by_name.get(&p.name).copied())
                .collect();
            slots.sort_unstable();
            Some((extra.clone(), slots))
        };
    }

    /// Whether a class list change (`delta`) reaches slot `s`'s view unchanged: it names
    /// neither the node itself nor a peer it has aside.
    pub(crate) fn delta_applies_whole(&self, s: usize, delta: &ListDelta) -> bool {
        let hit = |x: &usize| delta.slots.binary_search(x).is_ok();
        if hit(&s) {
            return false;
        }
        match self.extra_of.get(s) {
            Some(Some((_, slots))) => !slots.iter().any(hit),
            _ => true,
        }
    }

    /// The peers slot `s`'s stored view has aside.
    pub(crate) fn extra_of(&self, s: usize) -> &[Arc<Peer>] {
        match self.extra_of.get(s) {
            Some(Some((e, _))) => e.as_slice(),
            _ => &[],
        }
    }

    /// The shared parts views read (O(1): persistent vectors).
    pub(crate) fn tables(&self) -> Tables {
        Tables {
            class_peers: self.classes.lists.clone(),
            rule_src: self.src_strings.clone(),
            rule_ports: self.rule_ports.clone(),
            ssh_principals: self.ssh.principals.clone(),
        }
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        self.r.live_slots()
    }

    /// Whether rule `ri`'s destinations cover slot `v`.
    pub(crate) fn covered_by(&self, v: usize, ri: usize) -> bool {
        bit(self.dst_bits.row(v), ri)
    }

    /// Slot `i`'s bit rows computed from the rules.
    fn bits_of(&self, i: usize) -> (Vec<u64>, Vec<u64>) {
        let words = self.src_bits.words;
        let mut s = vec![0u64; words];
        let mut d = vec![0u64; words];
        if self.r.nodes[i].alive {
            for (ri, rule) in self.rules.ordered() {
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

    /// Recomputes the rule masks from the rules in force.
    fn refresh_masks(&mut self) {
        let words = self.src_bits.words;
        let (mut plain, mut route, mut exit) =
            (vec![0u64; words], vec![0u64; words], vec![0u64; words]);
        for (ri, rule) in self.rules.ordered() {
            let b = 1 << (ri % 64);
            if !rule.self_rule {
                plain[ri / 64] |= b;
            }
            if rule.route_relevant() {
                route[ri / 64] |= b;
            }
            if rule.exit_relevant() {
                exit[ri / 64] |= b;
            }
        }
        (self.plain_mask, self.route_mask, self.exit_mask) = (plain, route, exit);
    }

    /// Rule `ri`'s ports per destination (empty for an unused id).
    fn ports_of(&self, ri: usize) -> RulePorts {
        Arc::new(
            self.rules
                .get(ri)
                .map(crate::compute::NetRule::dst_port_lists)
                .unwrap_or_default(),
        )
    }

    /// Sets rule `ri`'s entry in `rule_ports` to its ports in force (growing the table).
    pub(crate) fn refresh_ports(&mut self, ri: usize) {
        while self.rule_ports.len() <= ri {
            self.rule_ports.push_back(Arc::default());
        }
        let ports = self.ports_of(ri);
        if self.rule_ports.get(ri).is_none_or(|p| *p != ports) {
            self.rule_ports.set(ri, ports);
        }
    }

    /// Rule `ri`'s ports per destination as the tables hold them.
    pub(crate) fn table_ports(&self, ri: usize) -> Option<&RulePorts> {
        self.rule_ports.get(ri)
    }

    /// Rule `ri`'s source list (empty for an `autogroup:self` rule or an unused id).
    fn src_list(&self, ri: usize) -> SrcList {
        match self.rules.get(ri) {
            Some(rule) if !rule.self_rule => Arc::new(self.r.src_strings(&rule.src)),
            _ => Arc::default(),
        }
    }

    /// Recomputes the sources of `autogroup:self` rules for one owner.
    fn refresh_self_src(&mut self, email: &str) {
        let owned = self.r.by_email.get(email).cloned().unwrap_or_default();
        let self_rules: Vec<usize> = self
            .rules
            .ordered()
            .filter(|(_, r)| r.self_rule)
            .map(|(id, _)| id)
            .collect();
        for ri in self_rules {
            let mut ips: Vec<Arc<str>> = owned
                .iter()
                .filter(|&&j| self.r.nodes[j].is_member() && bit(self.src_bits.row(j), ri))
                .flat_map(|&j| self.r.nodes[j].addr_texts().iter().cloned())
                .collect();
            ips.sort();
            ips.dedup();
            self.self_src.insert((ri, email.to_string()), Arc::new(ips));
        }
    }

    fn base_peer_of(&self, i: usize) -> Arc<Peer> {
        let xn = &self.r.nodes[i];
        let addresses: Vec<String> = xn.addrs.iter().map(|a| host_prefix(*a)).collect();
        Arc::new(Peer {
            name: xn.name.clone(),
            allowed_ips: addresses.clone(),
            addresses,
            primary_routes: Vec::new(),
            tags: xn.node.tags.clone(),
            user: xn.email.clone(),
        })
    }

    /// Node `x`'s entry without routes, for a viewer that does (not) use IPv4.
    fn base_for(&self, x: usize, no_ipv4: bool) -> Arc<Peer> {
        let base = &self.base_peer[x];
        if !no_ipv4 || self.r.nodes[x].addrs.iter().all(|a| a.is_ipv6()) {
            return base.clone();
        }
        let addresses: Vec<String> = self.r.nodes[x]
            .addrs
            .iter()
            .filter(|a| a.is_ipv6())
            .map(|a| host_prefix(*a))
            .collect();
        Arc::new(Peer {
            allowed_ips: addresses.clone(),
            addresses,
            ..(**base).clone()
        })
    }

    /// Adds slot `i`'s routes to the route indexes.
    fn index_routes(&mut self, i: usize) {
        let n = &self.r.nodes[i];
        if !n.alive {
            return;
        }
        for rt in &n.routes {
            self.routers.entry(*rt).or_default().insert(i);
        }
        if n.exit {
            self.exits.insert(i);
        }
    }

    /// Removes slot `i` from the route indexes (with the routes it had).
    fn unindex_routes(&mut self, i: usize, routes: &[IpNet]) {
        for rt in routes {
            if let Some(set) = self.routers.get_mut(rt) {
                set.remove(&i);
                if set.is_empty() {
                    self.routers.remove(rt);
                }
            }
        }
        self.exits.remove(&i);
    }

    /// The live slots a source set's prefixes `nets` can hold (see
    /// [`Resolver::src_contains`]): nodes with an address in one of them, and routers of a
    /// subnet prefix that overlaps one. Sorted, without repeats.
    pub(crate) fn net_holders(&self, nets: &[IpNet]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for net in nets {
            let (lo, hi) = (net.network(), net.broadcast());
            out.extend(
                self.addrs
                    .slots
                    .range((lo, 0)..=(hi, usize::MAX))
                    .map(|&(_, s)| s),
            );
            for (p, routers) in &self.routers {
                if addr::overlaps(net, p) {
                    out.extend(routers.iter().copied());
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Adds (or removes) slot `i` to the index by user name.
    fn index_user(&mut self, i: usize, add: bool) {
        let n = &self.r.nodes[i];
        let Some(user) = n.node.user.clone() else {
            return;
        };
        let slots = self.by_user.entry(user.clone()).or_default();
        slots.retain(|&j| j != i);
        if add && n.alive {
            slots.push(i);
        }
        if slots.is_empty() {
            self.by_user.remove(&user);
        }
    }

    /// Elects the primary router of `prefix`: the current one (`previous`) while it is online
    /// and serves the prefix, otherwise the oldest online router. Returns whether it changed.
    fn elect(&mut self, prefix: IpNet, previous: Option<&str>) -> bool {
        let nodes = &self.r.nodes;
        let cands: Vec<usize> = self
            .routers
            .get(&prefix)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&i| nodes[i].alive && nodes[i].node.online)
            .collect();
        let keep = previous.filter(|p| cands.iter().any(|&i| nodes[i].name == *p));
        let chosen = match keep {
            Some(p) => Some(p.to_string()),
            None => cands
                .iter()
                .min_by_key(|&&i| (nodes[i].node.created_key(), nodes[i].name.as_str()))
                .map(|&i| nodes[i].name.clone()),
        };
        let before = self.primaries.get(&prefix).cloned();
        match &chosen {
            Some(c) => {
                self.primaries.insert(prefix, c.clone());
            }
            None => {
                self.primaries.remove(&prefix);
            }
        }
        before != chosen
    }

    fn viewer_of(&self, v: usize) -> Viewer<'_> {
        Viewer {
            src: self.src_bits.row(v),
            dst: self.dst_bits.row(v),
            no_ipv4: self.r.nodes[v].no_ipv4,
            routes: &self.r.nodes[v].routes,
        }
    }

    fn key_viewer(key: &ClassKey) -> Viewer<'_> {
        Viewer {
            src: &key.0,
            dst: &key.1,
            no_ipv4: key.2,
            routes: &[],
        }
    }

    fn class_key(&self, v: usize) -> ClassKey {
        (
            self.src_bits.row(v).to_vec(),
            self.dst_bits.row(v).to_vec(),
            self.r.nodes[v].no_ipv4,
        )
    }

    /// Whether `viewer` sees node `x` (through non-self rules).
    fn sees(&self, viewer: Viewer<'_>, x: usize) -> bool {
        self.r.is_alive(x)
            && viewer.links(self.src_bits.row(x), self.dst_bits.row(x), &self.plain_mask)
    }

    /// The peer list of the class with key `key`, from scratch.
    fn class_list(&self, key: &ClassKey) -> SharedPeers {
        let viewer = Plan::key_viewer(key);
        Arc::new(
            self.name_order
                .iter()
                .copied()
                .filter(|&x| self.sees(viewer, x))
                .map(|x| (self.r.nodes[x].key.clone(), self.peer_entry(viewer, x)))
                .collect(),
        )
    }

    /// The list of the class with `key`, derived from the (up to date) list of the class
    /// with `pkey`: only nodes that the rules where the keys differ link can be seen
    /// differently (and routers and exit nodes when those rules decide routing).
    fn derive_from(&self, pkey: &ClassKey, plist: &SharedPeers, key: &ClassKey) -> SharedPeers {
        if pkey.2 != key.2 {
            return self.class_list(key);
        }
        let diff: Vec<u64> = pkey
            .0
            .iter()
            .zip(&key.0)
            .zip(pkey.1.iter().zip(&key.1))
            .map(|((a, b), (c, d))| (a ^ b) | (c ^ d))
            .collect();
        let plain_diff: Vec<u64> = diff
            .iter()
            .zip(&self.plain_mask)
            .map(|(d, m)| d & m)
            .collect();
        let routing = diff.iter().zip(&self.route_mask).any(|(d, m)| d & m != 0);
        let exiting = diff.iter().zip(&self.exit_mask).any(|(d, m)| d & m != 0);
        // The prefixes whose routing the differing rules decide (`None`: any).
        let route_nets: Option<Vec<IpNet>> = self
            .rules
            .ordered()
            .filter(|&(ri, _)| bit(&diff, ri) && bit(&self.route_mask, ri))
            .map(|(_, rule)| rule.route_nets())
            .collect::<Option<Vec<Vec<IpNet>>>>()
            .map(|nets| nets.concat());
        let routes_decided = |routes: &[IpNet]| match &route_nets {
            None => !routes.is_empty(),
            Some(nets) => routes
                .iter()
                .any(|rt| nets.iter().any(|n| addr::overlaps(n, rt))),
        };
        let (pviewer, viewer) = (Plan::key_viewer(pkey), Plan::key_viewer(key));
        // Cloned at the first difference: a class that sees what its parent sees shares the
        // parent's list itself, so moving between the two costs no diff.
        let mut list: Option<OrdMap<PeerKey, Arc<Peer>>> = None;
        for &x in &self.name_order {
            // The rows first: they are at hand, the node's record is not.
            let linked = self
                .src_bits
                .row(x)
                .iter()
                .zip(self.dst_bits.row(x))
                .zip(&plain_diff)
                .any(|((s, d), m)| (s | d) & m != 0);
            if !(linked || routing || exiting) || !self.r.is_alive(x) {
                continue;
            }
            let xn = &self.r.nodes[x];
            let entry_differs = (routing && routes_decided(&xn.routes)) || (exiting && xn.exit);
            if !linked && !entry_differs {
                continue;
            }
            let (was, now) = (self.sees(pviewer, x), self.sees(viewer, x));
            let name = &xn.key;
            match (was, now) {
                (false, false) => {}
                (true, false) => {
                    list.get_or_insert_with(|| (**plist).clone())
                        .remove(&**name);
                }
                (_, true) => {
                    if was && !entry_differs {
                        continue;
                    }
                    let e = self.peer_entry(viewer, x);
                    if was && list.as_ref().unwrap_or(plist).get(&**name) == Some(&e) {
                        continue;
                    }
                    list.get_or_insert_with(|| (**plist).clone())
                        .insert(PeerKey(name.clone()), e);
                }
            }
        }
        list.map_or_else(|| plist.clone(), Arc::new)
    }

    /// An estimate of how many nodes deriving the list of `key` from the list of `pkey`
    /// looks at (`usize::MAX` when it cannot be derived).
    fn derive_cost(&self, pkey: &ClassKey, key: &ClassKey, counts: &[usize]) -> usize {
        if pkey.2 != key.2 {
            return usize::MAX;
        }
        let mut cost = 0usize;
        for (w, ((a, b), (c, d))) in pkey
            .0
            .iter()
            .zip(&key.0)
            .zip(pkey.1.iter().zip(&key.1))
            .enumerate()
        {
            let mut diff = (a ^ b) | (c ^ d);
            if diff & self.route_mask.get(w).copied().unwrap_or(0) != 0 {
                cost = cost.saturating_add(self.routers.values().map(BTreeSet::len).sum());
            }
            if diff & self.exit_mask.get(w).copied().unwrap_or(0) != 0 {
                cost = cost.saturating_add(self.exits.len());
            }
            while diff != 0 {
                let b = diff.trailing_zeros() as usize;
                diff &= diff - 1;
                cost = cost.saturating_add(counts.get(w * 64 + b).copied().unwrap_or(0));
            }
        }
        cost
    }

    /// Per rule bit, how many live nodes the rule links (in its sources or destinations):
    /// what [`Plan::derive_cost`] weighs a differing bit by. Counted by class (a class's
    /// key is its members' rows), and row by row for the live nodes among `moving` that are
    /// in no class (between the class they left and the one they join); a pass over the
    /// classes and those nodes, not over every node.
    fn linked_counts(&self, moving: &[usize]) -> Vec<usize> {
        let by_class = self.classes.live().filter_map(|c| {
            let key = self.classes.key(c)?;
            let members = self.classes.members.get(c)?;
            Some((key.0.as_slice(), key.1.as_slice(), members.len()))
        });
        let unclassed = moving
            .iter()
            .copied()
            .filter(|&x| {
                self.r.is_alive(x) && self.class_of.get(x).is_none_or(|&c| c == usize::MAX)
            })
            .map(|x| (self.src_bits.row(x), self.dst_bits.row(x), 1));
        count_linked(self.src_bits.words, by_class.chain(unclassed))
    }

    /// Groups nodes by class and computes one peer list per class.
    fn build_classes(&mut self) {
        let mut table = ClassTable::default();
        let mut class_of = vec![usize::MAX; self.r.nodes.len()];
        let mut keys: Vec<ClassKey> = Vec::new();
        let mut members: Vec<BTreeSet<usize>> = Vec::new();
        for v in self.live().collect::<Vec<_>>() {
            let key = self.class_key(v);
            let next = keys.len();
            let id = *table.ids.entry(key.clone()).or_insert(next);
            if id == next {
                keys.push(key);
                members.push(BTreeSet::new());
            }
            members[id].insert(v);
            class_of[v] = id;
        }
        // A class's list is derived from an earlier class's when few nodes can be seen
        // differently (sharing its structure), else computed from scratch.
        let n = self.live().count();
        let counts = count_linked(
            self.src_bits.words,
            keys.iter()
                .zip(&members)
                .map(|(key, m)| (key.0.as_slice(), key.1.as_slice(), m.len())),
        );
        let mut parent: Vec<Option<usize>> = vec![None; keys.len()];
        let mut depth: Vec<usize> = vec![0; keys.len()];
        for k in 1..keys.len() {
            let best = (0..k)
                .map(|p| (self.derive_cost(&keys[p], &keys[k], &counts), p))
                .min();
            if let Some((cost, p)) = best {
                if cost < 2 * n {
                    parent[k] = Some(p);
                    depth[k] = depth[p] + 1;
                }
            }
        }
        let mut lists: Vec<Option<SharedPeers>> = vec![None; keys.len()];
        let max_depth = depth.iter().copied().max().unwrap_or(0);
        for level in 0..=max_depth {
            let at: Vec<usize> = (0..keys.len()).filter(|&k| depth[k] == level).collect();
            let built: Vec<(usize, SharedPeers)> = at
                .par_iter()
                .map(|&k| {
                    let list = match parent[k].and_then(|p| lists[p].as_ref().map(|l| (p, l))) {
                        Some((p, plist)) => self.derive_from(&keys[p], plist, &keys[k]),
                        None => self.class_list(&keys[k]),
                    };
                    (k, list)
                })
                .collect();
            for (k, l) in built {
                lists[k] = Some(l);
            }
        }
        let mut lists: Vec<SharedPeers> =
            lists.into_iter().map(Option::unwrap_or_default).collect();
        share_equal_lists(&mut lists);
        table.lists = lists.into_iter().collect();
        table.keys = keys.into_iter().map(Some).collect();
        table.members = members;
        self.classes = table;
        self.class_of = class_of;
    }

    /// How `viewer` sees peer `x`.
    fn peer_entry(&self, viewer: Viewer<'_>, x: usize) -> Arc<Peer> {
        let xn = &self.r.nodes[x];
        let base = self.base_for(x, viewer.no_ipv4);
        if xn.routes.is_empty() && !xn.exit {
            return base;
        }
        let mut allowed_ips = base.addresses.clone();
        let mut primary_routes = Vec::new();
        for rt in &xn.routes {
            if self.routed_through(viewer, x, rt) {
                allowed_ips.push(rt.to_string());
                primary_routes.push(rt.to_string());
            }
        }
        if xn.exit && self.exit_usable(viewer) {
            allowed_ips.push("0.0.0.0/0".into());
            allowed_ips.push("::/0".into());
        }
        if primary_routes.is_empty() && allowed_ips.len() == base.allowed_ips.len() {
            return base;
        }
        Arc::new(Peer {
            allowed_ips,
            primary_routes,
            ..(*base).clone()
        })
    }

    /// Whether `viewer` routes prefix `rt` through peer `x`. `via` grants steer the prefix
    /// to the routers carrying a via tag (their primary: the global one if it qualifies,
    /// else the oldest online); otherwise the prefix goes to its primary router, when the
    /// viewer may reach it (or is a standby router of the same prefix).
    fn routed_through(&self, viewer: Viewer<'_>, x: usize, rt: &IpNet) -> bool {
        let r = &self.r;
        let mut via_tags: Vec<&String> = Vec::new();
        for (ri, rule) in self.rules.ordered() {
            if rule.via.is_empty() || !bit(viewer.src, ri) {
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
        let primary = self.primaries.get(rt).map(String::as_str);
        // Access to the prefix without `via` (or being a standby router of it) goes through
        // the prefix's primary router; `via` steering applies only otherwise.
        let direct = viewer.routes.contains(rt)
            || self.rules.ordered().any(|(ri, rule)| {
                rule.via.is_empty()
                    && route_reachable(rule, bit(viewer.src, ri), bit(viewer.dst, ri), rt)
            });
        if direct {
            return primary == Some(r.nodes[x].name.as_str());
        }
        if via_tags.is_empty() {
            return false;
        }
        let tagged = |i: usize| r.nodes[i].node.tags.iter().any(|t| via_tags.contains(&t));
        let chosen = match primary.and_then(|p| r.by_name.get(p).copied()) {
            Some(p) if tagged(p) => Some(p),
            _ => self
                .routers
                .get(rt)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| tagged(i) && r.nodes[i].node.online)
                .min_by_key(|&i| (r.nodes[i].node.created_key(), r.nodes[i].name.as_str())),
        };
        chosen == Some(x)
    }

    /// Whether `viewer` may use exit nodes (some rule lets it reach the internet).
    fn exit_usable(&self, viewer: Viewer<'_>) -> bool {
        self.rules.ordered().any(|(ri, rule)| {
            rule.caps.is_none()
                && bit(viewer.src, ri)
                && rule.dsts.iter().any(|(d, _)| d.internet || d.wildcard)
        })
    }

    fn self_rule_ids(&self) -> Vec<usize> {
        self.rules
            .ordered()
            .filter(|(_, r)| r.self_rule)
            .map(|(id, _)| id)
            .collect()
    }

    /// Peers node `v` has or sees its own way: its owner's other devices through
    /// `autogroup:self` rules, and the other routers of the prefixes it serves (a standby
    /// router routes the prefix through the primary).
    fn extra_peers(&self, v: usize) -> Vec<Arc<Peer>> {
        let r = &self.r;
        let viewer = self.viewer_of(v);
        let mut out: Vec<(usize, Arc<Peer>)> = Vec::new();
        if let Some(email) = r.nodes[v].email.as_ref().filter(|_| r.nodes[v].is_member()) {
            let self_rules = self.self_rule_ids();
            if !self_rules.is_empty() {
                for &y in r.by_email.get(email).map(Vec::as_slice).unwrap_or(&[]) {
                    if y == v || !r.nodes[y].is_member() {
                        continue;
                    }
                    let (vs, vd) = (self.src_bits.row(v), self.dst_bits.row(v));
                    let (ys, yd) = (self.src_bits.row(y), self.dst_bits.row(y));
                    let linked = self_rules
                        .iter()
                        .any(|&ri| (bit(vs, ri) && bit(yd, ri)) || (bit(ys, ri) && bit(vd, ri)));
                    if linked {
                        out.push((y, self.peer_entry(viewer, y)));
                    }
                }
            }
        }
        for rt in &r.nodes[v].routes {
            for &x in self.routers.get(rt).into_iter().flatten() {
                if x != v && self.sees(viewer, x) && !out.iter().any(|(y, _)| *y == x) {
                    out.push((x, self.peer_entry(viewer, x)));
                }
            }
        }
        let mut peers: Vec<Arc<Peer>> = out.into_iter().map(|(_, p)| p).collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        peers
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
            .filter(|&i| self.r.is_alive(i))
    }

    /// Whether a live node's presence decides anything (it serves subnet routes).
    pub(crate) fn presence_matters(&self, name: &str) -> bool {
        self.slot(name)
            .is_some_and(|s| !self.r.nodes[s].routes.is_empty())
    }

    /// Records a live node's new record when only its presence changed, which no view
    /// reads unless the node serves routes.
    pub(crate) fn set_presence(&mut self, name: &str, node: Arc<crate::tailnet::Node>) {
        if let Some(s) = self.slot(name) {
            self.r.nodes[s].node = node;
        }
    }

    /// The live nodes whose record names user `name`.
    pub(crate) fn user_nodes(&self, name: &str) -> Vec<String> {
        self.by_user
            .get(name)
            .into_iter()
            .flatten()
            .map(|&s| self.r.nodes[s].name.clone())
            .collect()
    }

    /// The class of a live slot.
    pub(crate) fn class_id(&self, slot: usize) -> usize {
        self.class_of[slot]
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
        self.stored_view_keeping(v, None)
    }

    /// Node `v`'s stored view after an update that, as far as its filter goes, changed only
    /// the rules of `patch`: `old` (its stored view before) with its entries for those rules
    /// derived again, and its current class. An entry bound to a rule is replaced in place
    /// (removed when the rule gives none now, or when its id was a removed rule's); a rule
    /// with no entry before that gives one now has it inserted in policy order. `None` (the
    /// whole view is recomputed) where an entry is not its rule's alone: the rule's entry may
    /// have merged with another's before (a merged entry is there), would merge now (same
    /// sources and protocols), or is an `autogroup:self` or capability entry; and where an
    /// insertion's place is unknown (a merged entry is there).
    pub(crate) fn patched_view(
        &self,
        v: usize,
        old: &StoredView,
        patch: &update::FilterPatch,
    ) -> Option<StoredView> {
        let mut filter: Option<Vec<(FilterRule, EntryFrom)>> = None;
        let merged_before = old.filter.iter().any(|(_, b)| *b == EntryFrom::Merged);
        let old_dst = patch.old_dst.get(&v);
        for &ri in &patch.rules {
            let now = self.covered_by(v, ri);
            let before = old_dst.map_or(now, |row| bit(row, ri));
            if !before && !now {
                continue;
            }
            // The entries of removed rules go first: their ids may name other rules now,
            // and where they stood would mislead the insertions below.
            let f = filter.get_or_insert_with(|| {
                let mut f = (*old.filter).clone();
                f.retain(|(_, b)| {
                    !matches!(b, EntryFrom::Rule(id) if patch.dropped.binary_search(id).is_ok())
                });
                f
            });
            let mut at = f
                .iter()
                .enumerate()
                .filter(|(_, (_, b))| b.rule() == Some(ri))
                .map(|(i, _)| i);
            let (at, None) = (at.next(), at.next()) else {
                return None;
            };
            // An `autogroup:self` rule's entry (the id's rule before, if it was removed).
            if at.is_some_and(|i| f.get(i).is_none_or(|(_, b)| *b != EntryFrom::Rule(ri))) {
                return None;
            }
            // No entry of its own: it gave none, or merged into another rule's.
            if before && at.is_none() && merged_before {
                return None;
            }
            let entry = match self.rules.get(ri) {
                Some(rule) if now => {
                    if rule.self_rule || rule.caps.is_some() {
                        return None;
                    }
                    crate::compute::rule_entry(self, v, ri, rule, true)
                }
                _ => None,
            };
            let in_place = patch.dropped.binary_search(&ri).is_err();
            let at = match at {
                Some(i) if in_place && entry.is_some() => Some(i),
                Some(i) => {
                    f.remove(i);
                    None
                }
                None => None,
            };
            let Some(entry) = entry else {
                continue;
            };
            if !entry.cap_grant.is_empty() || self.merges(f, at, (ri, &entry), patch) {
                return None;
            }
            let entry = (
                FilterRule {
                    src_ips: self.unbound_src.clone(),
                    ..entry
                },
                EntryFrom::Rule(ri),
            );
            match at {
                Some(i) => *f.get_mut(i)? = entry,
                None => {
                    // Entries are in the order of their rules; a merged entry's is unknown.
                    let rank = |id: usize| patch.rank.get(id).copied().unwrap_or(usize::MAX);
                    let mut pos = f.len();
                    for (i, (_, b)) in f.iter().enumerate() {
                        let b = b.rule()?;
                        if rank(b) > rank(ri) {
                            pos = pos.min(i);
                        }
                    }
                    f.insert(pos, entry);
                }
            }
        }
        Some(StoredView {
            class: self.class_of[v],
            filter: filter.map_or_else(|| old.filter.clone(), Arc::new),
            ..old.clone()
        })
    }

    /// Whether `entry` (rule `ri`'s alone) would merge with an entry of `filter` other than
    /// the one at `skip` ([`crate::compute::merges_into`]; bound entries' sources are in the
    /// tables, and one whose list is missing counts as merging). Whether a bound entry's
    /// rule has `ri`'s sources is known from `patch` (asked once per update, not per view).
    fn merges(
        &self,
        filter: &[(FilterRule, EntryFrom)],
        skip: Option<usize>,
        (ri, entry): (usize, &FilterRule),
        patch: &update::FilterPatch,
    ) -> bool {
        filter.iter().enumerate().any(|(i, (f, b))| {
            if Some(i) == skip {
                return false;
            }
            match b.bound() {
                Some(rj) => {
                    self.src_strings
                        .get(rj)
                        .is_none_or(|src| match patch.same_sources(ri, rj) {
                            Some(same) => crate::compute::merges_given(f, entry, || same),
                            None => crate::compute::merges_into(f, src, entry),
                        })
                }
                None => crate::compute::merges_into(f, &f.src_ips, entry),
            }
        })
    }

    /// Node `v`'s stored view, taking its SSH rules and capabilities from `kept` (its
    /// stored view before an update that, by its `keeps`, left them as they were)
    /// instead of computing them again.
    pub(crate) fn stored_view_keeping(
        &self,
        v: usize,
        kept: Option<(&StoredView, Keeps)>,
    ) -> StoredView {
        let filter = filter_for(self, v)
            .into_iter()
            .map(|(f, from)| match from {
                EntryFrom::Rule(_) => (
                    FilterRule {
                        src_ips: self.unbound_src.clone(),
                        ..f
                    },
                    from,
                ),
                EntryFrom::OwnRule(_) | EntryFrom::Merged => (f, from),
            })
            .collect();
        let extra = self.extra_peers(v);
        let ssh = match kept {
            Some((old, k)) if k.ssh => old.ssh.clone(),
            _ => {
                let ssh = self.ssh.rules_for(&self.r, v, &self.unbound_principals);
                if ssh.is_empty() {
                    self.no_ssh.clone()
                } else {
                    Arc::new(ssh)
                }
            }
        };
        let cap_map = match kept {
            Some((old, k)) if k.caps => old.cap_map.clone(),
            _ => {
                let caps = self.caps_for(v);
                if caps.is_empty() {
                    self.no_caps.clone()
                } else {
                    Arc::new(caps)
                }
            }
        };
        StoredView {
            class: self.class_of[v],
            filter: Arc::new(filter),
            extra: if extra.is_empty() {
                self.no_extra.clone()
            } else {
                Arc::new(extra)
            },
            ssh,
            cap_map,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A class list entry for tests: peer `name` with `tags` and owner `user`, no addresses.
    pub(crate) fn entry(name: &str, tags: &[&str], user: Option<&str>) -> (PeerKey, Arc<Peer>) {
        let peer = Peer {
            name: name.to_string(),
            addresses: Vec::new(),
            allowed_ips: Vec::new(),
            primary_routes: Vec::new(),
            tags: tags.iter().map(|t| (*t).to_string()).collect(),
            user: user.map(str::to_string),
        };
        (PeerKey(Arc::from(name)), Arc::new(peer))
    }

    fn list(names: &[&str], user: Option<&str>) -> SharedPeers {
        Arc::new(names.iter().map(|n| entry(n, &[], user)).collect())
    }

    /// [`Plan::linked_counts`] counted row by row over the live nodes.
    fn counts_by_row(plan: &Plan) -> Vec<usize> {
        let rows = plan
            .live()
            .map(|x| (plan.src_bits.row(x), plan.dst_bits.row(x), 1));
        count_linked(plan.src_bits.words, rows)
    }

    #[test]
    fn linked_counts_by_class_equal_the_count_by_row() {
        let state = r#"{
          "users": [{"id": 1, "name": "a", "email": "a@example.com"},
                    {"id": 2, "name": "b", "email": "b@example.com"}],
          "nodes": {
            "a1": {"hostname": "a1", "user": "a", "ipv4": "100.64.0.1", "created": "2024-01-01T00:00:00Z"},
            "a2": {"hostname": "a2", "user": "a", "ipv4": "100.64.0.2", "created": "2024-01-01T00:00:01Z"},
            "b1": {"hostname": "b1", "user": "b", "ipv4": "100.64.0.3", "created": "2024-01-01T00:00:02Z"},
            "web": {"hostname": "web", "tags": ["tag:web"], "ipv4": "100.64.0.10", "created": "2024-01-01T00:00:03Z"},
            "db": {"hostname": "db", "tags": ["tag:db"], "ipv4": "100.64.0.11", "created": "2024-01-01T00:00:04Z"}
          },
          "tailnet": {"name": "example.com"}
        }"#;
        let policy = r#"{
          "groups": {"group:dev": ["a@example.com"]},
          "tagOwners": {"tag:web": ["a@example.com"], "tag:db": ["a@example.com"]},
          "acls": [
            {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:443"]},
            {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
            {"action": "accept", "src": ["b@example.com"], "dst": ["tag:db:*", "a@example.com:22"]}
          ]
        }"#;
        let policy = Arc::new(netmap_policy::parse_policy(policy).unwrap());
        let mut tailnet = Tailnet::from_state_json(state).unwrap();
        let mut plan = Plan::build(policy, &tailnet);
        let counts = plan.linked_counts(&[]);
        assert_eq!(counts, counts_by_row(&plan));
        assert!(counts.iter().any(|&c| c > 1), "{counts:?}");
        // A node moved to other rules (tagged like `db`), and one removed.
        if let Some(n) = tailnet.nodes.get_mut("a2") {
            Arc::make_mut(n).tags = vec!["tag:db".to_string()];
        }
        tailnet.nodes.remove("b1");
        let batch = update::Batch {
            nodes: vec!["a2".to_string(), "b1".to_string()],
            policy: None,
        };
        plan.update(&tailnet, batch, &mut |_| {});
        assert_eq!(plan.linked_counts(&[]), counts_by_row(&plan));
        assert_ne!(plan.linked_counts(&[]), counts);
        // While a node is between classes (out of its old one, in no new one yet), it is
        // counted by its row.
        let x = plan.slot("a1").unwrap();
        let c = plan.class_of[x];
        plan.classes.members[c].remove(&x);
        plan.class_of[x] = usize::MAX;
        assert_eq!(plan.linked_counts(&[x]), counts_by_row(&plan));
    }

    #[test]
    fn lists_with_the_same_peers_are_shared_and_others_are_not() {
        let mut lists = vec![
            list(&["a", "b"], None),
            list(&["a", "c"], None),
            list(&["a", "b"], None),
            list(&["a", "b"], Some("u@example.com")),
            list(&["a", "c"], None),
        ];
        share_equal_lists(&mut lists);
        assert!(Arc::ptr_eq(&lists[0], &lists[2]));
        assert!(Arc::ptr_eq(&lists[1], &lists[4]));
        // Equal names, other entries: not the same list.
        assert!(!Arc::ptr_eq(&lists[0], &lists[3]));
        assert!(!Arc::ptr_eq(&lists[0], &lists[1]));
    }
}
