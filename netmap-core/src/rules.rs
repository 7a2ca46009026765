//! The network rules in force under stable ids, and the comparison of a new policy's rules
//! with them.
//!
//! Views, bit sets and tables refer to a rule by id; an id stays with its rule while the
//! policy is edited around it, so an edit touches only what refers to the rules it changes.
//! A new policy's rules are matched with the rules in force by value (the aliases, ports,
//! protocols, capabilities and `via` tags they are compiled from): an equal rule keeps its id
//! and its resolved selector sets; a rule that differs only in ports, protocols or capability
//! values keeps its id and its sets; the rest are added and removed.

use std::collections::{BTreeSet, HashMap};

use netmap_policy::{Alias, Policy};

use crate::compute::NetRule;
use crate::resolve::Resolved;

/// The rules in force, by id, and their policy order.
#[derive(Debug, Clone, Default)]
pub(crate) struct RuleTable {
    slots: Vec<Option<NetRule>>,
    /// Per id, the rule's [`NetRule::spec_hash`] (made once, when the rule is stored).
    spec_hashes: Vec<u64>,
    order: Vec<usize>,
    free: BTreeSet<usize>,
}

impl RuleTable {
    /// A table holding `rules` in order under ids `0..n`.
    pub(crate) fn new(rules: Vec<NetRule>) -> RuleTable {
        let order = (0..rules.len()).collect();
        RuleTable {
            spec_hashes: rules.iter().map(NetRule::spec_hash).collect(),
            slots: rules.into_iter().map(Some).collect(),
            order,
            free: BTreeSet::new(),
        }
    }

    /// The rule with id `id`.
    pub(crate) fn get(&self, id: usize) -> Option<&NetRule> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    /// The rule with id `id`, to refresh its resolved sets.
    pub(crate) fn get_mut(&mut self, id: usize) -> Option<&mut NetRule> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    /// The rules with their ids, in policy order.
    pub(crate) fn ordered(&self) -> impl Iterator<Item = (usize, &NetRule)> + '_ {
        self.order
            .iter()
            .filter_map(|&id| self.get(id).map(|r| (id, r)))
    }

    /// The ids in policy order.
    pub(crate) fn order(&self) -> &[usize] {
        &self.order
    }

    /// One past the largest id in use or free.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Adds a rule (at the end of the order; see [`RuleTable::set_order`]); returns its id.
    fn insert(&mut self, rule: NetRule) -> usize {
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                self.spec_hashes.push(0);
                self.slots.len() - 1
            }
        };
        self.slots[id] = Some(rule);
        self.order.push(id);
        id
    }

    /// Removes a rule; its id becomes free.
    fn remove(&mut self, id: usize) -> Option<NetRule> {
        let rule = self.slots.get_mut(id)?.take()?;
        if let Some(k) = self.spec_hashes.get_mut(id) {
            *k = 0;
        }
        self.free.insert(id);
        self.order.retain(|&x| x != id);
        Some(rule)
    }
}

/// What changed between the rules in force and a new policy's rules.
#[derive(Debug, Default)]
pub(crate) struct RuleEdit {
    /// Ids of rules that are gone, with the rules.
    pub removed: Vec<(usize, NetRule)>,
    /// Ids of new rules (resolved when added).
    pub added: Vec<usize>,
    /// Ids of rules whose protocols or capability values changed (same selectors; their
    /// ports may have changed too).
    pub restated: Vec<usize>,
    /// Ids of network rules whose ports alone changed (same selectors and protocols).
    pub ports_only: Vec<usize>,
    /// Ids of kept rules that name a group, host or ipset whose definition changed, with the
    /// rule as it was (their sets are resolved again).
    pub redefined: Vec<(usize, NetRule)>,
    /// Whether kept rules changed their relative order.
    pub reordered: bool,
}

impl RuleEdit {
    /// Whether the rules are the same.
    pub(crate) fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.restated.is_empty()
            && self.ports_only.is_empty()
            && self.redefined.is_empty()
            && !self.reordered
    }
}

/// Whether alias `a` resolves differently under `new` than under `old` for the same tailnet:
/// it names a group, host or ipset whose definition changed.
pub(crate) fn redefined(old: &Policy, new: &Policy, a: &Alias) -> bool {
    match a {
        Alias::Group(g) => old.groups.get(g) != new.groups.get(g),
        Alias::Host(h) => old.hosts.get(h) != new.hosts.get(h),
        Alias::IpSet(name) => old.ipsets.get(name) != new.ipsets.get(name),
        Alias::Wildcard
        | Alias::User(_)
        | Alias::UserDomain(_)
        | Alias::Tag(_)
        | Alias::Prefix(_)
        | Alias::Service(_)
        | Alias::AutoGroup(_) => false,
    }
}

/// Whether the posture named `name` is defined differently under `new` than under `old`.
pub(crate) fn posture_redefined(old: &Policy, new: &Policy, name: &str) -> bool {
    old.postures.get(name) != new.postures.get(name)
}

/// Whether `rule` (kept from `old` into `new`) resolves differently under `new`: it names a
/// group, host, ipset or posture defined differently.
pub(crate) fn rule_redefined(old: &Policy, new: &Policy, rule: &NetRule) -> bool {
    rule.aliases().any(|a| redefined(old, new, a))
        || rule.posture_names().any(|p| posture_redefined(old, new, p))
}

/// Whether one selector set of a rule resolves differently under `new` than under `old`:
/// one of its aliases or of the postures narrowing it is defined differently.
pub(crate) fn set_redefined(
    old: &Policy,
    new: &Policy,
    set: &Resolved,
    postures: &[String],
) -> bool {
    set.aliases.iter().any(|a| redefined(old, new, a))
        || postures.iter().any(|p| posture_redefined(old, new, p))
}

impl RuleTable {
    /// Replaces the rules with `specs` (a new policy's rules, not resolved), keeping the ids
    /// and resolved sets of the rules that stay; `resolve` resolves a new rule's sets and
    /// `changed` says whether a kept rule resolves differently now.
    pub(crate) fn replace(
        &mut self,
        specs: Vec<NetRule>,
        mut resolve: impl FnMut(NetRule) -> NetRule,
        changed: impl Fn(&NetRule) -> bool,
    ) -> RuleEdit {
        let mut edit = RuleEdit::default();
        // Exact matches first, then rules with the same selectors.
        let mut by_spec: HashMap<u64, Vec<usize>> = HashMap::new();
        for &id in self.order.iter().rev() {
            if let Some(&key) = self.spec_hashes.get(id) {
                by_spec.entry(key).or_default().push(id);
            }
        }
        let new_keys: Vec<u64> = specs.iter().map(NetRule::spec_hash).collect();
        let mut taken: BTreeSet<usize> = BTreeSet::new();
        let mut matched: Vec<Option<usize>> = new_keys
            .iter()
            .zip(&specs)
            .map(|(key, spec)| {
                // The earliest kept rule written the same way (hashes may collide).
                let ids = by_spec.get_mut(key)?;
                let at = ids
                    .iter()
                    .rposition(|&id| self.get(id).is_some_and(|r| r.same_spec(spec)))?;
                let id = ids.remove(at);
                taken.insert(id);
                Some(id)
            })
            .collect();
        drop(by_spec);
        let mut by_members: HashMap<String, Vec<usize>> = HashMap::new();
        for &id in self.order.iter().rev() {
            if let (false, Some(rule)) = (taken.contains(&id), self.get(id)) {
                by_members
                    .entry(rule.membership_key())
                    .or_default()
                    .push(id);
            }
        }
        let mut restated_at: Vec<bool> = vec![false; specs.len()];
        for (i, spec) in specs.iter().enumerate() {
            if matched[i].is_some() {
                continue;
            }
            if let Some(id) = by_members
                .get_mut(&spec.membership_key())
                .and_then(Vec::pop)
            {
                taken.insert(id);
                matched[i] = Some(id);
                restated_at[i] = true;
            }
        }
        // Rules not matched are gone.
        let gone: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|id| !taken.contains(id))
            .collect();
        for id in gone {
            if let Some(rule) = self.remove(id) {
                edit.removed.push((id, rule));
            }
        }
        // Kept rules: whether their relative order changed.
        let old_pos: HashMap<usize, usize> = self
            .order
            .iter()
            .enumerate()
            .map(|(p, &id)| (id, p))
            .collect();
        let kept_positions: Vec<usize> = matched
            .iter()
            .flatten()
            .filter_map(|id| old_pos.get(id).copied())
            .collect();
        edit.reordered = kept_positions.windows(2).any(|w| w[0] > w[1]);
        let mut order = Vec::with_capacity(specs.len());
        for (((spec, id), restated), key) in specs
            .into_iter()
            .zip(matched)
            .zip(restated_at)
            .zip(new_keys)
        {
            let id = match id {
                Some(id) => {
                    if let Some(rule) = self.get_mut(id) {
                        if restated {
                            // Same selectors: keep the resolved sets, take the new ports,
                            // protocols and capabilities.
                            for ((d, ports), (_, new_ports)) in rule.dsts.iter_mut().zip(spec.dsts)
                            {
                                let _ = d;
                                *ports = new_ports;
                            }
                            let ports_only = rule.caps.is_none()
                                && spec.caps.is_none()
                                && rule.protos == spec.protos;
                            rule.protos = spec.protos;
                            rule.caps = spec.caps;
                            if ports_only {
                                edit.ports_only.push(id);
                            } else {
                                edit.restated.push(id);
                            }
                        }
                        if changed(rule) {
                            let before = rule.clone();
                            edit.redefined.push((id, before));
                        }
                    }
                    id
                }
                None => {
                    let id = self.insert(resolve(spec));
                    self.order.pop();
                    edit.added.push(id);
                    id
                }
            };
            order.push(id);
            if let Some(k) = self.spec_hashes.get_mut(id) {
                *k = key;
            }
        }
        self.order = order;
        debug_assert!(self
            .ordered()
            .all(|(id, rule)| self.spec_hashes.get(id) == Some(&rule.spec_hash())));
        edit
    }
}
