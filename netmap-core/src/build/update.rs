//! Bringing a [`Plan`] up to date after a change, by propagation through its derived values.
//!
//! A change is a [`Batch`]: nodes whose record changed (an upsert, a removal, a route
//! approval, a router going on/offline, or a user their node names) and maybe a new policy.
//! [`Plan::update`] recomputes, in dependency order, only the derived values that read what
//! changed, and stops wherever a recomputed value equals the old one:
//!
//! 1. policy parts: the rules are matched with the rules in force by value ([`RuleTable::
//!    replace`]); `disableIPv4` targets and `autoApprovers` that changed make the nodes they
//!    concern changed nodes;
//! 2. node facts (addresses, owner, tags, effective routes) of the changed nodes, and the route
//!    indexes;
//! 3. selector sets: every rule's sets for the changed nodes; the sets of new rules and of
//!    rules naming a redefined group, host or ipset;
//! 4. bit rows: the changed nodes' rows, and the columns of added, removed and redefined rules;
//! 5. primaries of the prefixes whose routers changed;
//! 6. source lists of rules whose identity set (or, for `*`, the set of routes) changed;
//! 7. classes: nodes whose rows changed move; every class's list is edited only for the nodes
//!    whose visibility or entry may have changed (decided once per group of such nodes with
//!    the same rows before and after); a new class derives its list from the live class
//!    nearest to it (the one whose differing rules link the fewest nodes), edited only for
//!    the nodes those rules link;
//! 8. which views read what changed ([`touch`] flags).

use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use netmap_policy::Policy;

use super::{bit, ClassKey, Plan};
use crate::compute::rule_specs;
use crate::resolve::{NodeInfo, Resolved};
use crate::routes::Approvers;
use crate::rules::redefined;
use crate::slot_hash::SlotMap;
use crate::ssh::{SshEdit, SshPlan};
use crate::tailnet::Tailnet;
use crate::wire::{Peer, PeerKey, SharedPeers, SrcList};

/// What an update did to one slot's view (bit flags).
pub(crate) mod touch {
    /// The stored view must be recomputed.
    pub const RECOMPUTE: u8 = 1;
    /// Its class's peer list changed (see [`super::Affected::class_delta`]).
    pub const PEERS: u8 = 2;
    /// A source list its filter reads from the tables changed.
    pub const FILTER: u8 = 4;
    /// Principals its SSH rules read from the tables changed.
    pub const SSH: u8 = 8;
    /// It moved to another class (its stored view takes the new class).
    pub const CLASS: u8 = 16;
    /// Rules in [`super::Affected::patch`] that cover it (or did) changed: its filter
    /// entries bound to them are derived again in place (see [`super::FilterPatch`]).
    pub const PATCH: u8 = 32;
}

/// A change to apply to a plan.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Nodes whose record changed or whose user changed; their records are read from the
    /// tailnet (absent = removed).
    pub nodes: Vec<String>,
    /// The new policy, if it changed.
    pub policy: Option<Arc<Policy>>,
}

/// How a class's peer list changed: the names added, removed and changed (each in name
/// order), and the slots they name (sorted), to tell cheaply whether a viewer's own entry or
/// the peers it has aside are among them.
#[derive(Debug, Default)]
pub(crate) struct ListDelta {
    pub added: Arc<[Arc<str>]>,
    pub removed: Arc<[Arc<str>]>,
    pub changed: Arc<[Arc<str>]>,
    pub slots: Vec<usize>,
}

/// The slots whose views an update may have changed.
#[derive(Debug, Default)]
pub(crate) struct Affected {
    /// Live slots touched, in name order, with [`touch`] flags. Slots without `RECOMPUTE`
    /// keep their stored view (with their new class under `CLASS`): what changed for them is
    /// known from the flags.
    pub slots: Vec<(usize, u8)>,
    /// How the peer list of each class that existed before and changed changed.
    pub class_delta: SlotMap<usize, Arc<ListDelta>>,
    /// Nodes that were live and are gone.
    pub removed: Vec<Arc<str>>,
    /// The parts of every view that the update left as they were.
    pub keeps: Keeps,
    /// The rules whose filter entries views under `PATCH` derive again.
    pub patch: FilterPatch,
    /// When the update changed no node's facts and changed rules only in which nodes their
    /// sets hold, or in their ports: the nodes that moved, and the sources of the rules whose
    /// ports changed (a rule's verdict for any other pair of nodes is as it was). `None`
    /// otherwise.
    pub rule_nodes_moved: Option<Vec<usize>>,
}

/// Rules whose filter entries a view may derive again instead of its whole filter: rules
/// added or removed, rules whose ports alone changed, and rules whose destinations were
/// redefined (a group's members, a host's address). A view's entry for such a rule is its
/// alone (bound to it) unless it merged with another rule's; the patch replaces, removes or
/// inserts (in policy order) bound entries, and gives up (the whole view is recomputed)
/// wherever a merge was or would be involved.
#[derive(Debug, Default)]
pub(crate) struct FilterPatch {
    /// The rule ids (no repeats).
    pub rules: Vec<usize>,
    /// Ids (sorted) that belonged to a rule removed by this update: an entry bound to one is
    /// the removed rule's, whatever rule holds the id now.
    pub dropped: Vec<usize>,
    /// Per rule id, its position in the policy order (`usize::MAX` for free ids).
    pub rank: Vec<usize>,
    /// Destination rows before the update of the patched slots whose rows changed (the
    /// others' rows are as they were).
    pub old_dst: SlotMap<usize, Vec<u64>>,
    /// Per patched rule (sorted), whether each rule id's source list (as `src_strings`
    /// holds it) is the same as that rule's: what the merge check asks of every view.
    same_src: Vec<(usize, Vec<bool>)>,
}

impl FilterPatch {
    /// Whether rule id `rj`'s source list is patched rule `ri`'s (`None`: not recorded).
    pub(crate) fn same_sources(&self, ri: usize, rj: usize) -> Option<bool> {
        let at = self.same_src.binary_search_by_key(&ri, |(r, _)| *r).ok()?;
        self.same_src.get(at)?.1.get(rj).copied()
    }
}

/// Parts of the views an update cannot have changed, so that a view recomputed for another
/// reason may keep them: SSH rules when no node's facts changed and the SSH policy compiles
/// the same (the SSH plan was not touched); capabilities when no node's facts changed and
/// `nodeAttrs` give the same capabilities to the same nodes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Keeps {
    pub ssh: bool,
    pub caps: bool,
}

/// A node whose facts changed, with its record before.
struct ChangedNode {
    slot: usize,
    before: Option<NodeInfo>,
    /// Its addresses, tags, owner or IPv4 use changed (or it appeared or went).
    ident_changed: bool,
    addrs_changed: bool,
}

/// A candidate's rows and liveness before and after an update.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CandRows {
    old_src: Vec<u64>,
    old_dst: Vec<u64>,
    was_alive: bool,
    new_src: Vec<u64>,
    new_dst: Vec<u64>,
    alive: bool,
    /// Its peer entry may have changed.
    entry_may_change: bool,
}

/// Candidates (positions in the name-ordered candidate list) with the same [`CandRows`].
#[derive(Debug)]
struct CandGroup {
    rows: CandRows,
    members: Vec<usize>,
}

/// How a changed source list reaches the views of one destination row (see
/// `Plan::filter_effects`).
struct ListHit<'a> {
    /// The rule whose list changed.
    ri: usize,
    /// The flags of a view whose filter has an entry bound to the list, and of one
    /// without.
    flags: (u8, u8),
    /// Owners whose devices' entries merge with an `autogroup:self` rule's (recomputed).
    merged_for: Option<&'a HashSet<String>>,
}

/// What the new policy changes besides the rules.
#[derive(Debug, Default)]
struct PolicyParts {
    ssh: SshEdit,
    attrs: bool,
}

/// The working state of one update.
struct Work {
    flags: Vec<u8>,
    /// Slots whose rows may have changed: rows and liveness before.
    old_rows: SlotMap<usize, (Vec<u64>, Vec<u64>, bool)>,
    old_plain: Vec<u64>,
    changed: Vec<ChangedNode>,
    /// Slots whose peer entries may have changed though their facts did not.
    entry_changed: BTreeSet<usize>,
    /// Owners whose `autogroup:self` sources and devices' views are refreshed.
    owners: BTreeSet<String>,
    /// Prefixes whose routers or their presence changed.
    prefixes: BTreeSet<IpNet>,
    /// Rules whose source identity set may have changed.
    src_dirty: BTreeSet<usize>,
    /// Per rule, the changed nodes that were or are named by its source identity set:
    /// (slot, named before, named now).
    src_moves: SlotMap<usize, Vec<(usize, bool, bool)>>,
    /// Rules whose source list changed, with the list before.
    changed_lists: Vec<(usize, SrcList)>,
    /// Changed rules decide routing: all prefixes (`None`) or these prefixes' routers.
    route_rules: Option<Option<Vec<IpNet>>>,
    /// Changed rules decide exit node use.
    exit_rules: bool,
    self_rules_changed: bool,
    routes_set_changed: bool,
    recompute_all: bool,
    /// Rules whose filter entries views derive again (see [`FilterPatch`]).
    patched: Vec<usize>,
    /// Ids of removed rules among them.
    dropped: Vec<usize>,
    /// The same rules as a bit mask over rule ids: a destination row that changed only in
    /// these columns leaves the view to the patch.
    patch_cols: Vec<u64>,
    /// See [`Affected::rule_nodes_moved`].
    rule_nodes_moved: Option<Vec<usize>>,
    /// The pairs of class lists nodes moved between (see [`Plan::update`]).
    move_pairs: Vec<ListPair>,
}

/// A pair of shared class lists (old, new), keyed by [`list_pair`].
pub(crate) type ListPair = ((usize, usize), (SharedPeers, SharedPeers));

/// Whether two edits of one list made the same list: they add, remove and change the same
/// names, with equal entries.
fn edited_alike((a, da): (&SharedPeers, &ListDelta), (b, db): (&SharedPeers, &ListDelta)) -> bool {
    da.added == db.added
        && da.removed == db.removed
        && da.changed == db.changed
        && da
            .added
            .iter()
            .chain(da.changed.iter())
            .all(|name| a.get(&**name) == b.get(&**name))
}

/// The key of a pair of shared peer lists (old, new): their addresses.
pub(crate) fn list_pair(old: &SharedPeers, new: &SharedPeers) -> (usize, usize) {
    (Arc::as_ptr(old) as usize, Arc::as_ptr(new) as usize)
}

impl Work {
    fn mark(&mut self, slot: usize, flag: u8) {
        if let Some(f) = self.flags.get_mut(slot) {
            *f |= flag;
        }
    }

    /// Rule `ri`'s filter entries are derived again in the views marked `PATCH`.
    fn patch_rule(&mut self, ri: usize) {
        if self.patch_cols.len() <= ri / 64 {
            self.patch_cols.resize(ri / 64 + 1, 0);
        }
        self.patch_cols[ri / 64] |= 1 << (ri % 64);
        self.patched.push(ri);
    }

    /// Whether destination rows `old` and `new` differ outside the patched columns.
    fn dst_changed_unpatched(&self, old: &[u64], new: &[u64]) -> bool {
        old.iter()
            .zip(new)
            .enumerate()
            .any(|(i, (a, b))| (a ^ b) & !self.patch_cols.get(i).copied().unwrap_or(0) != 0)
    }

    fn route_rule_changed(&mut self, rule: &crate::compute::NetRule) {
        if rule.route_relevant() {
            let nets = rule.route_nets();
            self.route_rules = match (self.route_rules.take(), nets) {
                (None, nets) => Some(nets),
                (Some(None), _) | (_, None) => Some(None),
                (Some(Some(mut a)), Some(b)) => {
                    a.extend(b);
                    Some(Some(a))
                }
            };
        }
        if rule.exit_relevant() {
            self.exit_rules = true;
        }
    }
}

/// The nodes a redefined rule's sets gained or lost, when nothing else about them changed
/// (the source's prefixes aside).
struct MovedNodes {
    /// (slot, was a source, is a source). With `src_nets` changed, it also holds every
    /// live node those prefixes could hold, whether its membership changed or not.
    src: Vec<(usize, bool, bool)>,
    /// Slots that joined or left a destination set.
    dst: Vec<usize>,
    /// The source's prefixes changed (a host, an IP or an ipset redefined): the rule's
    /// source list is built again, and its prefixes may decide routing.
    src_nets: bool,
}

/// How rule `before` became `after` when only the nodes of its sets, and the prefixes of
/// its source, changed (`None` otherwise). `holders` gives the live slots that prefixes
/// can hold (see [`Plan::net_holders`]).
fn moved_nodes(
    before: &crate::compute::NetRule,
    after: &crate::compute::NetRule,
    holders: impl FnOnce(&[IpNet]) -> Vec<usize>,
    r: &crate::resolve::Resolver,
) -> Option<MovedNodes> {
    let (a, b) = (&before.src, &after.src);
    let src_nets = a.nets != b.nets;
    if !a.same_but_nodes_and_nets(b)
        || before.dsts.len() != after.dsts.len()
        || before
            .dsts
            .iter()
            .zip(&after.dsts)
            .any(|((a, _), (b, _))| !a.same_but_nodes(b))
    {
        return None;
    }
    let mut src: Vec<(usize, bool, bool)> = before
        .src
        .nodes
        .symmetric_difference(&after.src.nodes)
        .map(|&x| {
            (
                x,
                before.src.nodes.contains(&x),
                after.src.nodes.contains(&x),
            )
        })
        .collect();
    if src_nets {
        // A node holding an address of the prefixes that left or came (or a router of a
        // subnet that overlaps one).
        let changed: Vec<IpNet> = a
            .nets
            .iter()
            .filter(|n| !b.nets.contains(n))
            .chain(b.nets.iter().filter(|n| !a.nets.contains(n)))
            .copied()
            .collect();
        // The identity moves are in slot order, the holders without repeats: each holder
        // is looked up among the former (a /8 prefix can hold every node).
        let identity = src.len();
        for x in holders(&changed) {
            if src[..identity]
                .binary_search_by_key(&x, |&(y, _, _)| y)
                .is_err()
            {
                src.push((x, r.src_contains(a, x), r.src_contains(b, x)));
            }
        }
    }
    let mut dst: Vec<usize> = before
        .dsts
        .iter()
        .zip(&after.dsts)
        .flat_map(|((a, _), (b, _))| a.nodes.symmetric_difference(&b.nodes).copied())
        .collect();
    dst.sort_unstable();
    dst.dedup();
    Some(MovedNodes { src, dst, src_nets })
}

/// Whether a rule with ports `old` per destination (now `new`) lets port `port` through at
/// one destination and not at the same destination after (or the other way round).
fn ports_turn(old: &[Vec<crate::wire::Ports>], new: &[Vec<crate::wire::Ports>], port: u16) -> bool {
    let holds = |ports: Option<&Vec<crate::wire::Ports>>| {
        ports.is_some_and(|ps| ps.iter().any(|r| r.first <= port && port <= r.last))
    };
    (0..old.len().max(new.len())).any(|d| holds(old.get(d)) != holds(new.get(d)))
}

/// Whether a test of `policy` has a prefix for its source (an address, a range, a host).
fn tests_read_nets(r: &crate::resolve::Resolver, policy: &Policy) -> bool {
    policy
        .tests
        .iter()
        .any(|t| !r.resolve_shape(&t.src.value).nets.is_empty())
}

/// A resolved set's content (without the aliases it came from).
fn same_set(a: &Resolved, b: &Resolved) -> bool {
    a.same_but_nodes(b) && a.nodes == b.nodes
}

/// What decides which capabilities `nodeAttrs` (and tailnet-wide switches that become
/// capabilities) give to which selectors: two policies with equal keys give the same.
type AttrsKey<'a> = (
    Vec<(
        Vec<&'a netmap_policy::Alias>,
        &'a [String],
        &'a [(String, Vec<serde_json::Value>)],
        &'a [IpNet],
    )>,
    bool,
);

fn attrs_key(p: &Policy) -> AttrsKey<'_> {
    (
        p.node_attrs
            .iter()
            .map(|na| {
                (
                    na.target.iter().map(|t| &t.value).collect(),
                    na.attr.as_slice(),
                    na.app.as_slice(),
                    na.ip_pool.as_slice(),
                )
            })
            .collect(),
        p.randomize_client_port,
    )
}

/// What decides which nodes lose IPv4.
fn v4_key(p: &Policy) -> (bool, Vec<Vec<&netmap_policy::Alias>>) {
    (
        p.disable_ipv4,
        p.node_attrs
            .iter()
            .filter(|na| na.attr.iter().any(|a| a == "disable-ipv4"))
            .map(|na| na.target.iter().map(|t| &t.value).collect())
            .collect(),
    )
}

/// What decides which routes and exit nodes are approved automatically.
type ApproversKey<'a> = (
    Vec<(&'a IpNet, Vec<&'a netmap_policy::Alias>)>,
    Vec<&'a netmap_policy::Alias>,
);

fn approvers_key(p: &Policy) -> ApproversKey<'_> {
    (
        p.auto_approvers
            .routes
            .iter()
            .map(|(n, who)| (n, who.iter().map(|a| &a.value).collect()))
            .collect(),
        p.auto_approvers
            .exit_node
            .iter()
            .map(|a| &a.value)
            .collect(),
    )
}

/// The targets of `disable-ipv4` node attributes.
fn v4_targets(p: &Policy) -> Vec<netmap_policy::Alias> {
    p.node_attrs
        .iter()
        .filter(|na| na.attr.iter().any(|a| a == "disable-ipv4"))
        .flat_map(|na| na.target.iter().map(|t| t.value.clone()))
        .collect()
}

/// Every alias `autoApprovers` names (routes and exit nodes).
fn approver_aliases(p: &Policy) -> Vec<netmap_policy::Alias> {
    p.auto_approvers
        .routes
        .iter()
        .flat_map(|(_, who)| who.iter())
        .chain(p.auto_approvers.exit_node.iter())
        .map(|a| a.value.clone())
        .collect()
}

impl Plan {
    /// Brings the plan up to date with `tailnet` (whose records the batch names changed)
    /// and the batch's policy, and says which views that may have changed and how.
    /// `on_moves` is handed, as soon as the classes are settled, the pairs of class lists
    /// (the list of the class a node left, as it was before, and that of the class it
    /// joined) that nodes moved between, each once; the update goes on meanwhile.
    pub(crate) fn update(
        &mut self,
        tailnet: &Tailnet,
        batch: Batch,
        on_moves: &mut dyn FnMut(Vec<ListPair>),
    ) -> Affected {
        use super::touch::{CLASS, PATCH, PEERS, RECOMPUTE};
        self.r.tailnet = tailnet.clone();
        let mut w = Work {
            flags: vec![0; self.r.nodes.len()],
            old_rows: SlotMap::default(),
            old_plain: self.plain_mask.clone(),
            changed: Vec::new(),
            entry_changed: BTreeSet::new(),
            owners: BTreeSet::new(),
            prefixes: BTreeSet::new(),
            src_dirty: BTreeSet::new(),
            src_moves: SlotMap::default(),
            changed_lists: Vec::new(),
            route_rules: None,
            exit_rules: false,
            self_rules_changed: false,
            routes_set_changed: false,
            recompute_all: false,
            patched: Vec::new(),
            dropped: Vec::new(),
            patch_cols: Vec::new(),
            rule_nodes_moved: Some(Vec::new()),
            move_pairs: Vec::new(),
        };
        let mut names: BTreeSet<String> = batch.nodes.into_iter().collect();

        // 1. Policy parts that make nodes change: IPv4 use and auto-approval.
        let mut old_policy = None;
        let mut parts = PolicyParts::default();
        if let Some(new) = batch.policy {
            let old = std::mem::replace(&mut self.r.policy, new);
            let new = self.r.policy.clone();
            let aliases_redefined = |aliases: &mut dyn Iterator<Item = &netmap_policy::Alias>| {
                let mut any = false;
                for a in aliases {
                    any |= redefined(&old, &new, a);
                }
                any
            };
            if v4_key(&old) != v4_key(&new) || aliases_redefined(&mut v4_targets(&new).iter()) {
                self.r.refresh_v4_targets();
                for s in self.live().collect::<Vec<_>>() {
                    if self.r.ipv4_disabled(&self.r.nodes[s]) != self.r.nodes[s].no_ipv4 {
                        names.insert(self.r.nodes[s].name.clone());
                    }
                }
            }
            if approvers_key(&old) != approvers_key(&new)
                || aliases_redefined(&mut approver_aliases(&new).iter())
            {
                self.approvers = Approvers::new(&self.r);
                for s in self.live().collect::<Vec<_>>() {
                    if !self.r.nodes[s].node.routable_ips.is_empty() {
                        names.insert(self.r.nodes[s].name.clone());
                    }
                }
            }
            parts.attrs = attrs_key(&old) != attrs_key(&new)
                || new
                    .node_attrs
                    .iter()
                    .any(|na| aliases_redefined(&mut na.target.iter().map(|t| &t.value)));
            parts.ssh = SshPlan::edit(&old, &new);
            old_policy = Some(old);
        }

        // 2. Node facts.
        for name in &names {
            self.update_facts(tailnet, name, &mut w);
        }
        w.flags.resize(self.r.nodes.len(), 0);

        // 3. Selector sets and 4. bit columns of the rules the policy changed.
        if let Some(old) = &old_policy {
            self.apply_rule_edit(old, &mut w);
        }
        let changed_slots: Vec<(usize, bool)> = w
            .changed
            .iter()
            .map(|c| (c.slot, c.addrs_changed))
            .collect();
        for &(x, addrs_changed) in &changed_slots {
            let order: Vec<usize> = self.rules.order().to_vec();
            for ri in order {
                let Some(rule) = self.rules.get_mut(ri) else {
                    continue;
                };
                // A source list names x's addresses when x is in the identity set (even
                // when a wildcard already makes x a source).
                let was_named = rule.src.nodes.contains(&x);
                let set_changed = self.r.refresh(&mut rule.src, x)
                    || (was_named && rule.src.nodes.contains(&x) && addrs_changed);
                for (d, _) in &mut rule.dsts {
                    self.r.refresh(d, x);
                }
                if set_changed {
                    w.src_dirty.insert(ri);
                    w.src_moves.entry(ri).or_default().push((
                        x,
                        was_named,
                        rule.src.nodes.contains(&x),
                    ));
                }
            }
            for t in &mut self.attr_targets {
                self.r.refresh(t, x);
            }
        }
        // 4. Rows of the changed nodes.
        for &(x, _) in &changed_slots {
            let (s, d) = self.bits_of(x);
            self.set_row(x, &s, &d, &mut w);
        }

        // 5. Primaries of the prefixes whose routers changed, and who else routes them.
        for p in std::mem::take(&mut w.prefixes) {
            let previous = self.primaries.get(&p).cloned();
            self.elect(p, previous.as_deref());
            w.entry_changed
                .extend(self.routers.get(&p).into_iter().flatten().copied());
        }
        match &w.route_rules {
            Some(None) => w
                .entry_changed
                .extend(self.routers.values().flatten().copied()),
            Some(Some(nets)) => {
                for (p, set) in &self.routers {
                    if nets.iter().any(|n| crate::addr::overlaps(n, p)) {
                        w.entry_changed.extend(set.iter().copied());
                    }
                }
            }
            None => {}
        }
        if w.exit_rules {
            w.entry_changed.extend(self.exits.iter().copied());
        }

        // 6. Source lists.
        if w.routes_set_changed {
            for (ri, rule) in self.rules.ordered() {
                if rule.src.wildcard || rule.src.all_nodes {
                    w.src_dirty.insert(ri);
                }
            }
        }
        for ri in std::mem::take(&mut w.src_dirty) {
            if self.rules.get(ri).is_none_or(|r| r.self_rule) {
                continue;
            }
            if w.changed_lists.iter().any(|(c, _)| *c == ri) {
                continue;
            }
            let Some(old) = self.src_strings.get(ri).cloned() else {
                continue;
            };
            let routes_part = w.routes_set_changed
                && self
                    .rules
                    .get(ri)
                    .is_some_and(|r| r.src.wildcard || r.src.all_nodes);
            let new = match (routes_part, w.src_moves.get(&ri)) {
                (false, Some(moves)) => self
                    .edit_src_list(ri, &old, moves, &w)
                    .unwrap_or_else(|| self.src_list(ri)),
                _ => self.src_list(ri),
            };
            if *old != *new {
                self.src_strings.set(ri, new);
                w.changed_lists.push((ri, old));
            }
        }
        self.filter_effects(&mut w);

        // Nodes whose facts changed, nodes whose rows changed.
        for c in &w.changed {
            if self.r.nodes[c.slot].alive {
                w.flags[c.slot] |= RECOMPUTE;
            }
            for e in c
                .before
                .iter()
                .filter_map(|b| b.email.clone())
                .chain(self.r.nodes[c.slot].email.clone())
            {
                w.owners.insert(e);
            }
        }
        let moved: Vec<usize> = self.moved_slots(&w);
        let self_mask: Vec<u64> = self.plain_mask.iter().map(|m| !m).collect();
        let has_self_rules = self.rules.ordered().any(|(_, r)| r.self_rule);
        for &s in &moved {
            let Some((os, od, _)) = w.old_rows.get(&s) else {
                continue;
            };
            if !self.r.nodes[s].alive {
                continue;
            }
            let (ns, nd) = (self.src_bits.row(s), self.dst_bits.row(s));
            // Columns of patched rules are the patch's to follow.
            let dst_changed = w.dst_changed_unpatched(od, nd);
            let patch = !dst_changed && od.as_slice() != nd;
            let self_changed = os
                .iter()
                .zip(ns)
                .chain(od.iter().zip(nd))
                .zip(self_mask.iter().chain(self_mask.iter()))
                .any(|((a, b), m)| (a ^ b) & m != 0);
            let n = &self.r.nodes[s];
            // Its filter, or the peers it has aside: its own devices (linked by self rules;
            // routers' and exit nodes' entries depend on the viewer's rules) and, for a
            // router, the other routers of its prefixes.
            let own_routes = || {
                n.email
                    .as_ref()
                    .and_then(|e| self.r.by_email.get(e))
                    .into_iter()
                    .flatten()
                    .any(|&y| !self.r.nodes[y].routes.is_empty() || self.r.nodes[y].exit)
            };
            if dst_changed
                || !n.routes.is_empty()
                || n.exit
                || (n.is_member() && has_self_rules && (self_changed || own_routes()))
            {
                w.flags[s] |= RECOMPUTE;
            } else if patch {
                w.flags[s] |= PATCH;
            }
            if self_changed {
                if let Some(e) = n.email.clone() {
                    w.owners.insert(e);
                }
            }
        }
        for &x in &w.entry_changed {
            if let Some(e) = self.r.nodes[x].email.clone() {
                w.owners.insert(e);
            }
        }
        if w.self_rules_changed {
            w.owners.extend(self.r.by_email.keys().cloned());
        }
        for email in std::mem::take(&mut w.owners) {
            self.refresh_self_src(&email);
            for &y in self
                .r
                .by_email
                .get(&email)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                w.flags[y] |= RECOMPUTE;
            }
        }

        // SSH rules and capabilities.
        let ssh_swaps = match &parts.ssh {
            SshEdit::Same => Vec::new(),
            SshEdit::Rebuild => {
                self.ssh = SshPlan::new(&self.r);
                w.recompute_all = true;
                Vec::new()
            }
            SshEdit::Redefined(ks) => {
                let mut swaps = Vec::new();
                for &k in ks {
                    let (swap, recompute) = self.ssh.redefine(&self.r, old_policy.as_deref(), k);
                    swaps.extend(swap);
                    match recompute {
                        Some(nodes) => {
                            for d in nodes {
                                w.mark(d, RECOMPUTE);
                            }
                        }
                        None => w.recompute_all = true,
                    }
                }
                swaps
            }
        };
        // Session recorders' addresses are part of the actions of the rules that list them.
        let recorders_changed = parts.ssh != SshEdit::Rebuild
            && w.changed.iter().any(|c| {
                c.before
                    .as_ref()
                    .is_some_and(|b| self.ssh.is_recorder(&b.node))
                    || self.ssh.is_recorder(&self.r.nodes[c.slot].node)
            });
        if recorders_changed {
            for k in self.ssh.refresh_recorders(&self.r) {
                match self.ssh.receivers(k) {
                    Some(nodes) => {
                        for d in nodes {
                            w.mark(d, RECOMPUTE);
                        }
                    }
                    None => w.recompute_all = true,
                }
            }
        }
        let mut swaps = ssh_swaps;
        for c in &w.changed {
            swaps.extend(self.ssh.refresh_node(&self.r, c.slot, c.ident_changed));
        }
        self.ssh_effects(swaps, &mut w);
        if parts.attrs {
            self.attr_targets = self
                .r
                .policy
                .node_attrs
                .iter()
                .map(|na| self.r.resolve_all(na.target.iter().map(|t| &t.value)))
                .collect();
            w.recompute_all = true;
        }

        // 7. Classes.
        let class_delta = self.update_classes(&moved, &mut w);
        on_moves(std::mem::take(&mut w.move_pairs));

        // Routers see the other routers of their prefixes their own way: through their
        // rows, the prefixes' primaries, the rules that decide routing and the routers'
        // entries. A rule edit that names prefixes changed the entries of the routers of
        // those (`entry_changed`, step 5), as an edit of exit rules did the exit nodes';
        // only the routers sharing a prefix with one of those see them otherwise.
        let mut router_slots: BTreeSet<usize> = BTreeSet::new();
        if matches!(w.route_rules, Some(None)) {
            router_slots.extend(self.routers.values().flatten().copied());
        } else {
            let touched = w
                .changed
                .iter()
                .map(|c| c.slot)
                .chain(moved.iter().copied())
                .chain(w.entry_changed.iter().copied());
            let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
            for x in touched {
                prefixes.extend(self.r.nodes[x].routes.iter().copied());
            }
            for c in &w.changed {
                if let Some(b) = &c.before {
                    prefixes.extend(b.routes.iter().copied());
                }
            }
            for p in prefixes {
                router_slots.extend(self.routers.get(&p).into_iter().flatten().copied());
            }
        }
        for s in router_slots {
            w.flags[s] |= RECOMPUTE;
        }

        if w.recompute_all {
            for s in self.live().collect::<Vec<_>>() {
                w.flags[s] |= RECOMPUTE;
            }
        }
        // Members of classes whose lists changed.
        for (&c, _) in class_delta.iter() {
            for &m in &self.classes.members[c] {
                if self.class_of[m] == c {
                    w.flags[m] |= PEERS;
                }
            }
        }
        let removed = w
            .changed
            .iter()
            .filter(|c| c.before.as_ref().is_some_and(|b| b.alive) && !self.r.nodes[c.slot].alive)
            .map(|c| self.r.nodes[c.slot].key.clone())
            .collect();
        let _ = CLASS;
        let keeps = Keeps {
            ssh: w.changed.is_empty() && parts.ssh == SshEdit::Same,
            caps: w.changed.is_empty() && !parts.attrs,
        };
        let patch = self.filter_patch(&mut w);
        let rule_nodes_moved = w.rule_nodes_moved.take().filter(|_| w.changed.is_empty());
        // Counted first: a policy edit touches thousands of views.
        let touched = w.flags.iter().filter(|&&f| f != 0).count();
        let mut slots = Vec::with_capacity(touched);
        slots.extend(
            self.name_order
                .iter()
                .map(|&s| (s, w.flags[s]))
                .filter(|&(s, f)| f != 0 && self.r.is_alive(s)),
        );
        Affected {
            rule_nodes_moved,
            keeps,
            patch,
            slots,
            class_delta,
            removed,
        }
    }

    /// Sets slot `x`'s rows, remembering the rows before.
    fn set_row(&mut self, x: usize, s: &[u64], d: &[u64], w: &mut Work) {
        if self.src_bits.row(x) == s && self.dst_bits.row(x) == d {
            return;
        }
        self.remember_row(x, w);
        self.src_bits.row_mut(x).copy_from_slice(s);
        self.dst_bits.row_mut(x).copy_from_slice(d);
    }

    fn remember_row(&self, x: usize, w: &mut Work) {
        if !w.old_rows.contains_key(&x) {
            let alive = self.alive_before(x, w);
            w.old_rows.insert(
                x,
                (
                    self.src_bits.row(x).to_vec(),
                    self.dst_bits.row(x).to_vec(),
                    alive,
                ),
            );
        }
    }

    /// Whether slot `x` held a live node before this update.
    fn alive_before(&self, x: usize, w: &Work) -> bool {
        w.changed
            .iter()
            .find(|c| c.slot == x)
            .map_or(self.r.nodes[x].alive, |c| {
                c.before.as_ref().is_some_and(|b| b.alive)
            })
    }

    /// Slots whose rows or liveness changed, in name order.
    fn moved_slots(&self, w: &Work) -> Vec<usize> {
        let mut out: Vec<usize> = w
            .old_rows
            .iter()
            .filter(|(&s, (os, od, alive))| {
                *alive != self.r.nodes[s].alive
                    || os.as_slice() != self.src_bits.row(s)
                    || od.as_slice() != self.dst_bits.row(s)
            })
            .map(|(&s, _)| s)
            .collect();
        out.sort_by(|&a, &b| self.r.nodes[a].name.cmp(&self.r.nodes[b].name));
        out
    }

    /// Recomputes node `name`'s facts from its record in `tailnet` (absent = removed).
    fn update_facts(&mut self, tailnet: &Tailnet, name: &str, w: &mut Work) {
        let old_slot = self.slot(name);
        let record = tailnet.nodes.get(name).cloned();
        if old_slot.is_none() && record.is_none() {
            return;
        }
        let before = old_slot.map(|s| self.r.nodes[s].clone());
        if let Some(s) = old_slot {
            let routes = self.r.nodes[s].routes.clone();
            let had = self.routers.len();
            self.unindex_routes(s, &routes);
            if self.routers.len() != had {
                w.routes_set_changed = true;
            }
            self.index_user(s, false);
        }
        if let (Some(b), Some(s)) = (&before, old_slot) {
            self.addrs.index(s, b, false);
        }
        let x = self.r.set_slot(tailnet, name, record.as_ref());
        if self.r.nodes[x].alive {
            self.addrs.index(x, &self.r.nodes[x], true);
        }
        if x >= self.base_peer.len() {
            self.src_bits.push_row();
            self.dst_bits.push_row();
            self.class_of.push(usize::MAX);
            let placeholder = self.base_peer_of(x);
            self.base_peer.push(placeholder);
            let at = self
                .name_order
                .partition_point(|&s| self.r.nodes[s].name.as_str() < name);
            self.name_order.insert(at, x);
            w.flags.resize(self.r.nodes.len(), 0);
        }
        if self.r.nodes[x].alive {
            self.approvers.refresh(&self.r, x);
            let (routes, exit) = crate::routes::effective_routes(&self.r, &self.approvers, x);
            self.r.nodes[x].routes = routes;
            self.r.nodes[x].exit = exit;
        }
        let had = self.routers.len();
        self.index_routes(x);
        if self.routers.len() != had {
            w.routes_set_changed = true;
        }
        self.index_user(x, true);
        let now = &self.r.nodes[x];
        let uid = |n: &NodeInfo| {
            n.node
                .user
                .as_ref()
                .and_then(|u| tailnet.users.get(u))
                .map(|u| u.id)
        };
        // The same record and facts, presence aside: only routers' presence matters.
        let same = before.as_ref().is_some_and(|b| {
            b.alive
                && now.alive
                && crate::tailnet::Node {
                    online: now.node.online,
                    ..(*b.node).clone()
                } == *now.node
                && b.addrs == now.addrs
                && b.email == now.email
                && b.role == now.role
                && b.routes == now.routes
                && b.exit == now.exit
                && b.no_ipv4 == now.no_ipv4
                && uid(b) == uid(now)
        });
        if same {
            if before
                .as_ref()
                .is_some_and(|b| b.node.online != now.node.online)
            {
                w.prefixes.extend(now.routes.iter().copied());
            }
            return;
        }
        w.prefixes.extend(now.routes.iter().copied());
        if let Some(b) = &before {
            w.prefixes.extend(b.routes.iter().copied());
        }
        self.base_peer[x] = self.base_peer_of(x);
        let addrs_changed = before.as_ref().map(|o| &o.addrs) != Some(&now.addrs);
        let ident_changed = !now.alive
            || before.as_ref().is_none_or(|o| {
                o.addrs != now.addrs
                    || o.node.tags != now.node.tags
                    || o.email != now.email
                    || o.no_ipv4 != now.no_ipv4
                    || uid(o) != uid(now)
                    || o.node.created != now.node.created
            });
        w.changed.push(ChangedNode {
            slot: x,
            before,
            ident_changed,
            addrs_changed,
        });
    }

    /// Applies the new policy's rules: matches them with the rules in force, resolves the new
    /// and redefined ones, and updates the bit columns of every rule that changed.
    fn apply_rule_edit(&mut self, old: &Policy, w: &mut Work) {
        use super::touch::{FILTER, PATCH, RECOMPUTE};
        let new = self.r.policy.clone();
        let specs = rule_specs(&new);
        let r = &self.r;
        let edit = self.rules.replace(
            specs,
            |spec| spec.resolved(r),
            |rule| crate::rules::rule_redefined(old, &new, rule),
        );
        if edit.is_empty() {
            return;
        }
        if !(edit.removed.is_empty()
            && edit.added.is_empty()
            && edit.restated.is_empty()
            && !edit.reordered)
        {
            w.rule_nodes_moved = None;
        }
        let words = self.rules.capacity().div_ceil(64).max(1);
        if words > self.src_bits.words {
            self.widen(words, w);
        }
        while self.src_strings.len() < self.rules.capacity() {
            self.src_strings.push_back(Arc::default());
        }
        // The live slots, listed once an edit that visits every view needs them (a
        // redefinition that only moved nodes visits those).
        let live: std::cell::OnceCell<Vec<usize>> = std::cell::OnceCell::new();
        // Views a rule covers (or covered) derive its entries again where the entries are
        // the rule's alone; `autogroup:self` rules (per-owner sources) and capability
        // grants recompute them.
        let flag_for = |rule: &crate::compute::NetRule| {
            if rule.self_rule || rule.caps.is_some() {
                RECOMPUTE
            } else {
                PATCH
            }
        };
        for (id, rule) in &edit.removed {
            let live = live.get_or_init(|| self.live().collect());
            let flag = flag_for(rule);
            if flag == PATCH {
                w.patch_rule(*id);
                w.dropped.push(*id);
            }
            // Marked while its columns still say whom it covered.
            self.mark_covered(*id, live, flag, w);
            for &v in live {
                self.set_bits(v, *id, false, false, w);
            }
            self.src_strings.set(*id, Arc::default());
            self.refresh_ports(*id);
            self.self_src.retain(|(ri, _), _| ri != id);
            w.self_rules_changed |= rule.self_rule;
            w.route_rule_changed(rule);
        }
        for &id in &edit.added {
            let live = live.get_or_init(|| self.live().collect());
            self.set_column(id, live, w);
            let flag = self.rules.get(id).map_or(RECOMPUTE, flag_for);
            if flag == PATCH {
                w.patch_rule(id);
            }
            self.mark_covered(id, live, flag, w);
            let list = self.src_list(id);
            self.src_strings.set(id, list);
            self.refresh_ports(id);
            if let Some(rule) = self.rules.get(id).cloned() {
                w.self_rules_changed |= rule.self_rule;
                w.route_rule_changed(&rule);
            }
        }
        for &id in &edit.restated {
            let live = live.get_or_init(|| self.live().collect());
            self.refresh_ports(id);
            self.mark_covered(id, live, RECOMPUTE, w);
        }
        // A test's verdict for a source reads a rule's ports only where the rule's sources
        // hold that source, and only at the test's port: the sources of a rule whose ports
        // changed at a port a test names (or a test with no port) are judged again (as
        // nodes that moved), unless a test's source is a prefix (read at the rules'
        // prefixes, not at a node's row).
        let test_ports: Option<Vec<u16>> = new
            .tests
            .iter()
            .flat_map(|t| t.accept.iter().chain(&t.deny))
            .map(|d| d.value.port)
            .collect();
        let mut nets_read: Option<bool> = None;
        for &id in &edit.ports_only {
            let live = live.get_or_init(|| self.live().collect());
            let before = self.table_ports(id).cloned();
            self.refresh_ports(id);
            let turned = match (&test_ports, &before, self.table_ports(id)) {
                (Some(ports), Some(b), Some(n)) => ports.iter().any(|&p| ports_turn(b, n, p)),
                _ => true,
            };
            if turned && w.rule_nodes_moved.is_some() {
                if *nets_read.get_or_insert_with(|| tests_read_nets(&self.r, &new)) {
                    w.rule_nodes_moved = None;
                } else if let Some(all) = &mut w.rule_nodes_moved {
                    all.extend(live.iter().copied().filter(|&v| self.src_bits.bit(v, id)));
                }
            }
            // Entries bound to the rule are compact: they show the ports in the tables, so
            // the views holding one only learn that their filter changed, if a destination
            // whose ports changed gives them entries. The others (an entry merged with
            // another rule's, or none) are patched.
            let changed = match (before, self.table_ports(id), self.rules.get(id)) {
                (Some(b), Some(n), Some(rule))
                    if !rule.self_rule
                        && rule.caps.is_none()
                        && b.len() == n.len()
                        && b.iter().chain(n.iter()).all(|p| !p.is_empty()) =>
                {
                    let changed: Vec<usize> =
                        (0..n.len()).filter(|&d| b.get(d) != n.get(d)).collect();
                    Some((changed, rule))
                }
                _ => None,
            };
            let Some((changed, rule)) = changed else {
                self.mark_covered(id, live, PATCH, w);
                w.patch_rule(id);
                continue;
            };
            let mut patched = false;
            for &v in live {
                if !self.covered_by(v, id) {
                    continue;
                }
                if !self.binds_rule(v, id) {
                    w.flags[v] |= PATCH;
                    patched = true;
                } else if changed.iter().any(|&d| rule.dst_gives(&self.r, d, v)) {
                    w.flags[v] |= FILTER;
                }
            }
            if patched {
                w.patch_rule(id);
            }
        }
        // Sets of aliases the redefined rules share are resolved once.
        let mut memo = HashMap::new();
        for (id, before) in &edit.redefined {
            let Some(rule) = self.rules.get_mut(*id) else {
                continue;
            };
            // Only the sets that name what the edit redefined resolve differently.
            rule.resolve_stale(&self.r, Some(old), Some(&mut memo), |set, postures| {
                crate::rules::set_redefined(old, &new, set, postures)
            });
            let after = rule.clone();
            let src_changed = !same_set(&before.src, &after.src);
            let dst_changed = before
                .dsts
                .iter()
                .zip(&after.dsts)
                .any(|((a, _), (b, _))| !same_set(a, b));
            if !src_changed && !dst_changed {
                continue;
            }
            // Sets that differ in their nodes only change the column, the filters and the
            // source list at those nodes.
            let moved = moved_nodes(before, &after, |nets| self.net_holders(nets), &self.r);
            // A test whose source is a prefix reads the rule's source prefixes at it, not
            // a node's row: its verdicts may change with no node moved.
            let nets_read =
                moved.as_ref().is_some_and(|m| m.src_nets) && tests_read_nets(&self.r, &new);
            match (&moved, &mut w.rule_nodes_moved) {
                _ if nets_read => w.rule_nodes_moved = None,
                (Some(m), Some(all)) => {
                    all.extend(
                        m.src
                            .iter()
                            .map(|&(x, _, _)| x)
                            .chain(m.dst.iter().copied()),
                    );
                }
                _ => w.rule_nodes_moved = None,
            }
            let flag = flag_for(&after);
            if dst_changed && flag == PATCH {
                w.patch_rule(*id);
            }
            match &moved {
                Some(m) => {
                    let slots: Vec<usize> = m
                        .src
                        .iter()
                        .map(|&(x, _, _)| x)
                        .chain(m.dst.iter().copied())
                        .filter(|&x| self.r.is_alive(x))
                        .collect();
                    self.set_column(*id, &slots, w);
                    for &x in &m.dst {
                        if self.r.is_alive(x) {
                            w.flags[x] |= flag;
                        }
                    }
                }
                None => {
                    let live = live.get_or_init(|| self.live().collect());
                    if dst_changed {
                        // Views it stops covering are marked with the rows that changed.
                        self.set_column(*id, live, w);
                        self.mark_covered(*id, live, flag, w);
                    } else {
                        self.set_src_column(*id, live, w);
                    }
                }
            }
            if src_changed {
                w.self_rules_changed |= after.self_rule;
                if let (false, Some(old)) = (after.self_rule, self.src_strings.get(*id).cloned()) {
                    // Edited for the nodes that moved, unless nodes changed their facts
                    // too (an address dropped by `disable-ipv4`): the sources they stay
                    // among show their addresses as they are now, and the list is not
                    // visited again for them (step 6 takes the changed lists as done).
                    let list = moved
                        .as_ref()
                        .filter(|m| !m.src_nets && w.changed.is_empty())
                        .and_then(|m| self.edit_src_list(*id, &old, &m.src, w))
                        .unwrap_or_else(|| self.src_list(*id));
                    if *old != *list {
                        self.src_strings.set(*id, list);
                        w.changed_lists.push((*id, old));
                    }
                }
            }
            // Which prefixes and exit nodes a viewer may use depends on the rules' flags and
            // prefixes, and on the viewer's rows: with only nodes moved, on the rows of the
            // nodes that moved, which are recomputed anyway. Source prefixes that changed
            // decide routing to the subnets they overlap (`route_reachable`).
            if moved.as_ref().is_none_or(|m| m.src_nets) {
                w.route_rule_changed(before);
                w.route_rule_changed(&after);
            }
        }
        if edit.reordered {
            w.recompute_all = true;
        }
        self.refresh_masks();
    }

    /// Marks with `flag` the views among `live` that rule `ri` covers.
    fn mark_covered(&self, ri: usize, live: &[usize], flag: u8, w: &mut Work) {
        for &v in live {
            if self.covered_by(v, ri) {
                w.flags[v] |= flag;
            }
        }
    }

    /// The patch views under `PATCH` apply (taking the old destination rows it needs).
    fn filter_patch(&self, w: &mut Work) -> FilterPatch {
        use super::touch::{PATCH, RECOMPUTE};
        if w.patched.is_empty() {
            return FilterPatch::default();
        }
        let mut rules = std::mem::take(&mut w.patched);
        rules.sort_unstable();
        rules.dedup();
        let mut dropped = std::mem::take(&mut w.dropped);
        dropped.sort_unstable();
        dropped.dedup();
        let mut rank = vec![usize::MAX; self.rules.capacity()];
        for (pos, &id) in self.rules.order().iter().enumerate() {
            if let Some(r) = rank.get_mut(id) {
                *r = pos;
            }
        }
        let old_dst = w
            .old_rows
            .iter()
            .filter(|(&s, _)| {
                w.flags
                    .get(s)
                    .is_some_and(|f| f & (PATCH | RECOMPUTE) == PATCH)
            })
            .map(|(&s, (_, d, _))| (s, d.clone()))
            .collect();
        let same_src = rules
            .iter()
            .filter_map(|&ri| {
                let own = self.src_strings.get(ri)?;
                let same = self
                    .src_strings
                    .iter()
                    .map(|src| Arc::ptr_eq(src, own) || src == own)
                    .collect();
                Some((ri, same))
            })
            .collect();
        FilterPatch {
            rules,
            dropped,
            rank,
            old_dst,
            same_src,
        }
    }

    /// Widens every row (and class key) to `words` words.
    fn widen(&mut self, words: usize, w: &mut Work) {
        self.src_bits = self.src_bits.widened(words);
        self.dst_bits = self.dst_bits.widened(words);
        self.bound_bits = self.bound_bits.widened(words);
        for (s, d, _) in w.old_rows.values_mut() {
            s.resize(words, 0);
            d.resize(words, 0);
        }
        w.old_plain.resize(words, 0);
        self.plain_mask.resize(words, 0);
        self.route_mask.resize(words, 0);
        self.exit_mask.resize(words, 0);
        self.classes.widen(words);
    }

    /// Sets rule `ri`'s bits of slot `v`.
    fn set_bits(&mut self, v: usize, ri: usize, src: bool, dst: bool, w: &mut Work) {
        if bit(self.src_bits.row(v), ri) == src && bit(self.dst_bits.row(v), ri) == dst {
            return;
        }
        self.remember_row(v, w);
        self.src_bits.set(v, ri, src);
        self.dst_bits.set(v, ri, dst);
    }

    /// Recomputes rule `ri`'s column for the live slots.
    fn set_column(&mut self, ri: usize, live: &[usize], w: &mut Work) {
        let Some(rule) = self.rules.get(ri) else {
            return;
        };
        let bits: Vec<(usize, bool, bool)> = live
            .iter()
            .map(|&v| {
                (
                    v,
                    self.r.src_contains(&rule.src, v),
                    rule.covers(&self.r, v),
                )
            })
            .collect();
        for (v, s, d) in bits {
            self.set_bits(v, ri, s, d, w);
        }
    }

    /// Recomputes the source bits of rule `ri`'s column for the live slots (its
    /// destinations are as they were).
    fn set_src_column(&mut self, ri: usize, live: &[usize], w: &mut Work) {
        let Some(rule) = self.rules.get(ri) else {
            return;
        };
        let bits: Vec<(usize, bool)> = live
            .iter()
            .map(|&v| (v, self.r.src_contains(&rule.src, v)))
            .filter(|&(v, s)| s != bit(self.src_bits.row(v), ri))
            .collect();
        for (v, s) in bits {
            let d = bit(self.dst_bits.row(v), ri);
            self.set_bits(v, ri, s, d, w);
        }
    }

    /// Rule `ri`'s source list after the identity changes `moves`, edited from `old` (sorted)
    /// instead of rebuilt: the addresses of nodes leaving are removed, those of nodes joining
    /// inserted. `None` when an address may also come from elsewhere (another node with the
    /// same address, one of the rule's prefixes), where only a rebuild is sure.
    fn edit_src_list(
        &self,
        ri: usize,
        old: &SrcList,
        moves: &[(usize, bool, bool)],
        w: &Work,
    ) -> Option<SrcList> {
        let rule = self.rules.get(ri)?;
        if rule.src.danger_all {
            return Some(old.clone());
        }
        if moves.len() > 16 {
            return None;
        }
        let nets: Vec<String> = rule.src.nets.iter().map(crate::addr::fmt_net).collect();
        // Whether each address the moves name is in the list afterwards (the last move
        // naming it decides), in list order.
        let mut present: BTreeMap<&Arc<str>, bool> = BTreeMap::new();
        for &(x, was, now) in moves {
            // A node this update did not change holds the addresses it held.
            let before: &[Arc<str>] = if was {
                match w.changed.iter().find(|c| c.slot == x) {
                    Some(c) => c.before.as_ref().map_or(&[], |b| b.addr_texts()),
                    None => self.r.nodes[x].addr_texts(),
                }
            } else {
                &[]
            };
            let after: &[Arc<str>] = if now {
                self.r.nodes[x].addr_texts()
            } else {
                &[]
            };
            let xn = &self.r.nodes[x];
            for a in before.iter().chain(after) {
                // Shared with another node or one of the rule's prefixes: rebuild.
                let holds = xn.alive && xn.addr_texts().contains(a);
                if self.addrs.holding(a) > u32::from(holds) || nets.iter().any(|n| **n == **a) {
                    return None;
                }
            }
            for a in before {
                if !after.contains(a) {
                    present.insert(a, false);
                }
            }
            for a in after {
                present.insert(a, true);
            }
        }
        // One pass over the list (a group's list holds thousands of addresses): the runs
        // between the addresses named are copied whole.
        let mut list: Vec<Arc<str>> = Vec::with_capacity(old.len() + present.len());
        let mut from = 0;
        let mut edited = false;
        for (a, keep) in present {
            let rest = old.get(from..).unwrap_or_default();
            let at = from + rest.partition_point(|x| **x < **a);
            list.extend_from_slice(old.get(from..at).unwrap_or_default());
            from = at;
            let listed = old.get(at).is_some_and(|x| **x == **a);
            if listed {
                from += 1;
            }
            if keep {
                list.push(a.clone());
            }
            edited |= listed != keep;
        }
        if !edited {
            return Some(old.clone());
        }
        list.extend_from_slice(old.get(from..).unwrap_or_default());
        Some(Arc::new(list))
    }

    /// Marks the filters that read a changed source list: entries bound to the rule follow
    /// the table unless they are (or become) merged with another rule's or appear or go.
    fn filter_effects(&self, w: &mut Work) {
        use super::touch::{FILTER, RECOMPUTE};
        let words = self.src_bits.words;
        let mut covered = vec![0u64; words];
        let mut effects = Vec::with_capacity(w.changed_lists.len());
        for (ri, old) in &w.changed_lists {
            let ri = *ri;
            let Some(new) = self.src_strings.get(ri).cloned() else {
                continue;
            };
            let non_empty = !old.is_empty() && !new.is_empty();
            let (plain, emails) = self.merge_partners(ri, old, &new, &w.changed_lists);
            let content = if **old != *new { FILTER } else { 0 };
            covered[ri / 64] |= 1 << (ri % 64);
            effects.push((ri, non_empty, plain, emails, content));
        }
        if effects.is_empty() {
            return;
        }
        // A view is judged by its destination row: which changed lists its filter reads,
        // and whether a plain rule merged with one covers it too. A class's members share
        // their rows, so that is judged once per class (a group edit changes the lists of
        // rules covering thousands of views); slots whose rows this update changed, or
        // whose facts it did, are judged by their own rows.
        let covers = |dst: &[u64]| dst.iter().zip(&covered).any(|(d, c)| d & c != 0);
        let hits_of = |dst: &[u64]| -> Vec<ListHit<'_>> {
            effects
                .iter()
                .filter(|e| bit(dst, e.0))
                .map(|(ri, non_empty, plain, emails, content)| {
                    let merged = plain.iter().any(|&rj| bit(dst, rj));
                    ListHit {
                        ri: *ri,
                        // The filter shows the new list where an entry is bound to it
                        // (covering a node's addresses or routes does not always give it
                        // an entry, e.g. a route it does not serve).
                        flags: if *non_empty && !merged {
                            (*content, 0)
                        } else {
                            (RECOMPUTE, RECOMPUTE)
                        },
                        merged_for: (*non_empty && !merged && !emails.is_empty()).then_some(emails),
                    }
                })
                .collect()
        };
        let flag_of = |v: usize, hits: &[ListHit<'_>]| -> u8 {
            let mut flag = 0;
            for h in hits {
                let owner_merged = h.merged_for.is_some_and(|emails| {
                    let n = &self.r.nodes[v];
                    n.is_member() && n.email.as_ref().is_some_and(|e| emails.contains(e))
                });
                flag |= if owner_merged {
                    RECOMPUTE
                } else if self.binds_rule(v, h.ri) {
                    h.flags.0
                } else {
                    h.flags.1
                };
            }
            flag
        };
        let mut own_rows: Vec<usize> = w
            .old_rows
            .keys()
            .copied()
            .chain(w.changed.iter().map(|c| c.slot))
            .collect();
        own_rows.sort_unstable();
        own_rows.dedup();
        let mut by_own_rows = vec![0u64; self.r.nodes.len().div_ceil(64)];
        for &v in &own_rows {
            crate::bits::set_bit(&mut by_own_rows, v);
        }
        for c in self.classes.live() {
            let Some(key) = self.classes.key(c) else {
                continue;
            };
            if !covers(&key.1) {
                continue;
            }
            let hits = hits_of(&key.1);
            for &v in &self.classes.members[c] {
                if bit(&by_own_rows, v) || self.class_of.get(v) != Some(&c) || !self.r.is_alive(v) {
                    continue;
                }
                if let Some(f) = w.flags.get_mut(v) {
                    *f |= flag_of(v, &hits);
                }
            }
        }
        for v in own_rows {
            let dst = self.dst_bits.row(v);
            if !self.r.is_alive(v) || !covers(dst) {
                continue;
            }
            let f = flag_of(v, &hits_of(dst));
            if let Some(x) = w.flags.get_mut(v) {
                *x |= f;
            }
        }
    }

    /// The rules whose filter entries may merge with rule `ri`'s before (`old` sources) or
    /// after (`new`): network rules with the same protocols and equal sources, then or now.
    /// Plain rules are returned by id (a filter merges them where both cover it);
    /// `autogroup:self` rules have per-owner sources, so for them the owners whose list
    /// equals `old` or `new` are returned. `changed` holds the rules whose sources this
    /// change replaced, with their previous lists.
    fn merge_partners(
        &self,
        ri: usize,
        old: &SrcList,
        new: &SrcList,
        changed: &[(usize, SrcList)],
    ) -> (Vec<usize>, HashSet<String>) {
        let mut plain = Vec::new();
        let mut emails = HashSet::new();
        let Some(rule) = self.rules.get(ri) else {
            return (plain, emails);
        };
        if rule.caps.is_some() {
            return (plain, emails);
        }
        let same = |a: &SrcList, b: &SrcList| Arc::ptr_eq(a, b) || a == b;
        for (rj, o) in self.rules.ordered() {
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
            let Some(now) = self.src_strings.get(rj) else {
                continue;
            };
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

    /// Marks the views that read SSH rules whose principals changed: entries bound to the
    /// rule's principals follow them while the rule keeps some (it stays in their list).
    /// A rule's principals may be swapped several times in one update (once per changed
    /// node, after a redefinition): its views see the first list before and the last after.
    fn ssh_effects(&self, swaps: Vec<crate::ssh::PrincipalsSwap>, w: &mut Work) {
        use super::touch::{RECOMPUTE, SSH};
        let mut net: Vec<crate::ssh::PrincipalsSwap> = Vec::with_capacity(swaps.len());
        for (k, before, after) in swaps {
            match net.iter_mut().find(|(j, _, _)| *j == k) {
                Some(swap) => swap.2 = after,
                None => net.push((k, before, after)),
            }
        }
        for (k, before, after) in net {
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
                    w.flags[v] |= flag;
                }
            } else {
                for v in dsts {
                    w.mark(v, flag);
                }
            }
        }
    }

    /// Moves the slots whose rows changed between classes and edits every class's peer
    /// list where it may have changed. Returns how the lists of classes that existed before
    /// changed.
    fn update_classes(&mut self, moved: &[usize], w: &mut Work) -> SlotMap<usize, Arc<ListDelta>> {
        use super::touch::CLASS;
        // Nodes whose visibility or entry may have changed, in name order.
        let mut candidates: BTreeSet<usize> = moved.iter().copied().collect();
        candidates.extend(w.changed.iter().map(|c| c.slot));
        candidates.extend(w.entry_changed.iter().copied());
        let mut cands: Vec<usize> = candidates.into_iter().collect();
        cands.sort_by(|&a, &b| self.r.nodes[a].name.cmp(&self.r.nodes[b].name));
        let entry_may_change: HashSet<usize> = w
            .changed
            .iter()
            .map(|c| c.slot)
            .chain(w.entry_changed.iter().copied())
            .collect();
        let groups = self.candidate_groups(&cands, &entry_may_change, w);
        // Leave the old classes.
        let mut movers: Vec<usize> = moved.to_vec();
        for c in &w.changed {
            if !movers.contains(&c.slot) {
                movers.push(c.slot);
            }
        }
        let mut left: SlotMap<usize, usize> = SlotMap::default();
        // The lists of the classes left, as they were.
        let mut left_lists: SlotMap<usize, SharedPeers> = SlotMap::default();
        for &s in &movers {
            let c = self.class_of[s];
            if c != usize::MAX {
                self.classes.members[c].remove(&s);
                left.insert(s, c);
                if let Some(l) = self.classes.lists.get(c) {
                    left_lists.entry(c).or_insert_with(|| l.clone());
                }
            }
            self.class_of[s] = usize::MAX;
        }
        // Edit every class's list for the candidates.
        let mut deltas: SlotMap<usize, Arc<ListDelta>> = SlotMap::default();
        let class_ids: Vec<usize> = self.classes.live().collect();
        let old_plain = w.old_plain.clone();
        let edit = |&c: &usize| {
            let key = self.classes.key(c)?;
            let list = self.classes.lists.get(c)?;
            self.edit_list(key, list, &cands, &groups, &old_plain)
                .map(|(l, d)| (c, l, d))
        };
        // A node change edits each list at a node or two: not worth waking the pool for.
        let edited: Vec<(usize, SharedPeers, ListDelta)> =
            if cands.len().saturating_mul(class_ids.len()) > 4096 {
                class_ids.par_iter().filter_map(edit).collect()
            } else {
                class_ids.iter().filter_map(edit).collect()
            };
        // Classes that shared one list (see `share_equal_lists`) and were edited alike share
        // the edited list too, so that a view moving between them costs no diff. By the
        // address of the list before: that list (kept alive while its address is a key), the
        // first edit of it, and that edit's delta.
        type Edit = (SharedPeers, SharedPeers, Arc<ListDelta>);
        let mut firsts: HashMap<usize, Edit> = HashMap::new();
        for (c, list, delta) in edited {
            let Some(before) = self.classes.lists.get(c).cloned() else {
                continue;
            };
            let at = Arc::as_ptr(&before) as usize;
            let (list, delta) = match firsts.get(&at) {
                Some((_, l, d)) if edited_alike((l, d), (&list, &delta)) => (l.clone(), d.clone()),
                _ => {
                    let d = Arc::new(delta);
                    firsts
                        .entry(at)
                        .or_insert((before, list.clone(), d.clone()));
                    (list, d)
                }
            };
            self.classes.lists.set(c, list);
            deltas.insert(c, delta);
        }
        // Join the new classes.
        let mut counts: Option<Vec<usize>> = None;
        for &s in &movers {
            if !self.r.nodes[s].alive {
                continue;
            }
            let key = self.class_key(s);
            let id = match self.classes.ids.get(&key) {
                Some(&id) => id,
                None => {
                    let counts = counts.get_or_insert_with(|| self.linked_counts(&movers));
                    let list = match self.nearest_class(&key, counts, left.get(&s).copied()) {
                        Some(parent) => self.derive_list(parent, &key),
                        None => self.class_list(&key),
                    };
                    self.classes.add(key, list)
                }
            };
            self.classes.members[id].insert(s);
            self.class_of[s] = id;
            if left.get(&s) != Some(&id) {
                w.flags[s] |= CLASS;
                let from = left.get(&s).and_then(|c| left_lists.get(c));
                if let (Some(a), Some(b)) = (from, self.classes.lists.get(id)) {
                    let key = list_pair(a, b);
                    if !Arc::ptr_eq(a, b) && !w.move_pairs.iter().any(|(k, _)| *k == key) {
                        w.move_pairs.push((key, (a.clone(), b.clone())));
                    }
                }
            }
        }
        // Drop the classes nobody is left in.
        for c in class_ids {
            if self.classes.members[c].is_empty() {
                self.classes.drop_class(c);
                deltas.remove(&c);
            }
        }
        deltas
    }

    /// Groups the candidates (`cands`, in name order) by their rows and liveness before
    /// and after: a class sees every member of a group alike, so it decides once per group.
    fn candidate_groups(
        &self,
        cands: &[usize],
        entry_may_change: &HashSet<usize>,
        w: &Work,
    ) -> Vec<CandGroup> {
        let mut index: HashMap<CandRows, usize> = HashMap::new();
        let mut groups: Vec<CandGroup> = Vec::new();
        for (i, &x) in cands.iter().enumerate() {
            let (old_src, old_dst, was_alive) = match w.old_rows.get(&x) {
                Some((os, od, alive)) => (os.clone(), od.clone(), *alive),
                None => (
                    self.src_bits.row(x).to_vec(),
                    self.dst_bits.row(x).to_vec(),
                    self.alive_before(x, w),
                ),
            };
            let rows = CandRows {
                old_src,
                old_dst,
                was_alive,
                new_src: self.src_bits.row(x).to_vec(),
                new_dst: self.dst_bits.row(x).to_vec(),
                alive: self.r.nodes[x].alive,
                entry_may_change: entry_may_change.contains(&x),
            };
            let g = *index.entry(rows).or_insert_with_key(|rows| {
                groups.push(CandGroup {
                    rows: rows.clone(),
                    members: Vec::new(),
                });
                groups.len() - 1
            });
            groups[g].members.push(i);
        }
        groups
    }

    /// Edits the list of the class with `key` for `cands` (grouped in `groups`); `None`
    /// when nothing changed.
    fn edit_list(
        &self,
        key: &ClassKey,
        list: &SharedPeers,
        cands: &[usize],
        groups: &[CandGroup],
        old_plain: &[u64],
    ) -> Option<(SharedPeers, ListDelta)> {
        let viewer = Plan::key_viewer(key);
        // (position in `cands`, seen before, seen now, its entry may have changed)
        let mut hits: Vec<(usize, bool, bool, bool)> = Vec::new();
        for g in groups {
            let r = &g.rows;
            let was = r.was_alive && viewer.links(&r.old_src, &r.old_dst, old_plain);
            let now = r.alive && viewer.links(&r.new_src, &r.new_dst, &self.plain_mask);
            if was != now || (was && r.entry_may_change) {
                hits.extend(g.members.iter().map(|&i| (i, was, now, r.entry_may_change)));
            }
        }
        if hits.is_empty() {
            return None;
        }
        hits.sort_unstable_by_key(|h| h.0);
        let mut out: Option<imbl::OrdMap<PeerKey, Arc<Peer>>> = None;
        let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        let mut slots = Vec::new();
        for (i, was, now, entry_may_change) in hits {
            let x = cands[i];
            let name = &self.r.nodes[x].key;
            match (was, now) {
                (false, false) => {}
                (true, false) => {
                    out.get_or_insert_with(|| (**list).clone()).remove(&**name);
                    removed.push(name.clone());
                    slots.push(x);
                }
                (false, true) => {
                    let e = self.peer_entry(viewer, x);
                    out.get_or_insert_with(|| (**list).clone())
                        .insert(PeerKey(name.clone()), e);
                    added.push(name.clone());
                    slots.push(x);
                }
                (true, true) => {
                    if !entry_may_change {
                        continue;
                    }
                    let e = self.peer_entry(viewer, x);
                    let current = out
                        .as_ref()
                        .map_or_else(|| list.get(&**name), |l| l.get(&**name));
                    if current.is_some_and(|c| Arc::ptr_eq(c, &e) || **c == *e) {
                        continue;
                    }
                    out.get_or_insert_with(|| (**list).clone())
                        .insert(PeerKey(name.clone()), e);
                    changed.push(name.clone());
                    slots.push(x);
                }
            }
        }
        slots.sort_unstable();
        out.map(|l| {
            (
                Arc::new(l),
                ListDelta {
                    added: added.into(),
                    removed: removed.into(),
                    changed: changed.into(),
                    slots,
                },
            )
        })
    }

    /// The class whose (up to date) list the list of a new class with `key` is derived from
    /// at least cost (see [`Plan::derive_cost`]), if any can be: not only the class its first
    /// member `left`, as a class that sees the same peers makes the new one share its list.
    fn nearest_class(
        &self,
        key: &ClassKey,
        counts: &[usize],
        left: Option<usize>,
    ) -> Option<usize> {
        self.classes
            .live()
            .filter_map(|c| {
                let cost = self.derive_cost(self.classes.key(c)?, key, counts);
                // At equal cost, the class the node left.
                (cost != usize::MAX).then_some((cost, Some(c) != left, c))
            })
            .min()
            .map(|(_, _, c)| c)
    }

    /// The list of a new class with `key`, derived from class `parent`'s (up to date) list.
    fn derive_list(&self, parent: usize, key: &ClassKey) -> SharedPeers {
        match (self.classes.key(parent), self.classes.lists.get(parent)) {
            (Some(pkey), Some(plist)) => self.derive_from(pkey, plist, key),
            _ => self.class_list(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::entry;

    fn edit(base: &SharedPeers, add: (&str, &str)) -> (SharedPeers, ListDelta) {
        let mut l = (**base).clone();
        let (k, v) = entry(add.0, &[add.1], None);
        l.insert(k, v);
        let names: Arc<[Arc<str>]> = vec![Arc::from(add.0)].into();
        let delta = ListDelta {
            added: names,
            ..ListDelta::default()
        };
        (Arc::new(l), delta)
    }

    #[test]
    fn ports_turn_only_where_a_destination_lets_the_port_through_otherwise() {
        use crate::wire::Ports;
        let ports = |ranges: &[(u16, u16)]| -> Vec<Ports> {
            ranges
                .iter()
                .map(|&(first, last)| Ports { first, last })
                .collect()
        };
        let old = vec![ports(&[(80, 80), (443, 443)]), ports(&[(22, 22)])];
        let new = vec![ports(&[(443, 443)]), ports(&[(22, 22)])];
        assert!(ports_turn(&old, &new, 80));
        assert!(!ports_turn(&old, &new, 443));
        assert!(!ports_turn(&old, &new, 22));
        assert!(!ports_turn(&old, &new, 8080));
        // At another destination than the one that held it.
        let moved = vec![ports(&[(443, 443)]), ports(&[(22, 22), (80, 80)])];
        assert!(ports_turn(&old, &moved, 80));
        let all = vec![ports(&[(0, 65535)]), ports(&[(22, 22)])];
        assert!(ports_turn(&old, &all, 8080));
        assert!(!ports_turn(&old, &all, 443));
    }

    #[test]
    fn edits_alike_only_with_the_same_names_and_entries() {
        let base: SharedPeers = Arc::new([entry("a", &["tag:x"], None)].into_iter().collect());
        let (l1, d1) = edit(&base, ("b", "tag:x"));
        let (l2, d2) = edit(&base, ("b", "tag:x"));
        let (l3, d3) = edit(&base, ("b", "tag:y"));
        let (l4, d4) = edit(&base, ("c", "tag:x"));
        assert!(edited_alike((&l1, &d1), (&l2, &d2)));
        assert!(!edited_alike((&l1, &d1), (&l3, &d3)));
        assert!(!edited_alike((&l1, &d1), (&l4, &d4)));
    }
}
