//! The engine: holds a policy and a tailnet, applies changes, and reports per-node deltas.
//! Snapshots are persistent (O(1) to take) and answer `view(node)` while the engine goes on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::{GroupSpans, Policy};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::slot_hash::SlotMap;
use crate::tailnet::{Node, Tailnet, User};
use crate::tests_eval::TestsRead;
use rayon::prelude::*;

use crate::build::{list_pair, touch, Batch, ListDelta, ListPair, Plan, StoredView, Tables};
use crate::wire::{NodeView, Peer, SharedPeers};

/// A change to the tailnet or its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Adds or replaces a node.
    UpsertNode {
        /// The node's name (key).
        node: String,
        /// The node.
        value: Node,
    },
    /// Removes a node.
    RemoveNode {
        /// The node's name.
        node: String,
    },
    /// Marks a node online or offline.
    SetOnline {
        /// The node's name.
        node: String,
        /// Whether it is connected.
        online: bool,
    },
    /// Adds or replaces a user.
    UpsertUser {
        /// The user.
        user: User,
    },
    /// Removes a user (its nodes stay, without an owner).
    RemoveUser {
        /// The user's name.
        name: String,
    },
    /// Replaces the policy (HuJSON text); rejected policies leave everything as it was.
    SetPolicy {
        /// The policy text.
        policy: String,
    },
    /// Sets the routes approved by hand for a node.
    ApproveRoutes {
        /// The node's name.
        node: String,
        /// The approved routes.
        routes: Vec<IpNet>,
    },
}

impl Change {
    /// The operation name (`upsert_node`, `set_online`, ...).
    pub fn op(&self) -> &'static str {
        match self {
            Change::UpsertNode { .. } => "upsert_node",
            Change::RemoveNode { .. } => "remove_node",
            Change::SetOnline { .. } => "set_online",
            Change::UpsertUser { .. } => "upsert_user",
            Change::RemoveUser { .. } => "remove_user",
            Change::SetPolicy { .. } => "set_policy",
            Change::ApproveRoutes { .. } => "approve_routes",
        }
    }
}

/// What changed for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDelta {
    /// The node is new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
    /// The node was removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// Peers that appeared.
    #[serde(default = "no_peers", skip_serializing_if = "no_names")]
    pub peers_added: PeerNames,
    /// Peers that disappeared.
    #[serde(default = "no_peers", skip_serializing_if = "no_names")]
    pub peers_removed: PeerNames,
    /// Peers whose addresses, routes or identity changed.
    #[serde(default = "no_peers", skip_serializing_if = "no_names")]
    pub peers_changed: PeerNames,
    /// The packet filter changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub filter_changed: bool,
    /// The SSH rules changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh_changed: bool,
    /// The node's own view (capabilities) changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_changed: bool,
}

/// Peer names in a delta, in order. Shared: the many nodes one change affects alike hold
/// the same list.
pub type PeerNames = Arc<[Arc<str>]>;

fn no_names(names: &PeerNames) -> bool {
    names.is_empty()
}

/// An empty name list: the one of [`empty_names`].
fn no_peers() -> PeerNames {
    empty_names().clone()
}

/// The empty name list, one for the process: an empty `Arc<[_]>` of its own is an
/// allocation, and most deltas have two or three empty lists.
fn empty_names() -> &'static PeerNames {
    static EMPTY: std::sync::OnceLock<PeerNames> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(Vec::new()))
}

/// `names` as a shared list (the shared empty list when there are none).
fn peer_names(names: Vec<Arc<str>>) -> PeerNames {
    if names.is_empty() {
        no_peers()
    } else {
        names.into()
    }
}

impl Default for NodeDelta {
    /// Nothing changed.
    fn default() -> NodeDelta {
        NodeDelta {
            added: false,
            removed: false,
            peers_added: no_peers(),
            peers_removed: no_peers(),
            peers_changed: no_peers(),
            filter_changed: false,
            ssh_changed: false,
            self_changed: false,
        }
    }
}

impl NodeDelta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        let NodeDelta {
            added,
            removed,
            peers_added,
            peers_removed,
            peers_changed,
            filter_changed,
            ssh_changed,
            self_changed,
        } = self;
        !(*added || *removed || *filter_changed || *ssh_changed || *self_changed)
            && peers_added.is_empty()
            && peers_removed.is_empty()
            && peers_changed.is_empty()
    }
}

/// The nodes' names by the engine's slot (`None` where that node is gone).
type SlotNames = imbl::Vector<Option<Arc<str>>>;

/// Where a change set finds a node's name.
#[derive(Debug, Clone, Copy)]
enum NameAt {
    /// In the engine's names by slot, as they are after the change.
    Slot(usize),
    /// In the change set's own names (nodes removed, or deltas inserted by hand).
    Own(usize),
}

/// The nodes a change affected, with what changed for each, in name order.
///
/// Built for a change that affects thousands of nodes alike (a rule's destinations all see
/// its new sources): each node is kept as its slot in the engine's names (shared with the
/// snapshot, not copied) with the index of its delta in a table of distinct deltas, so
/// adding a node to the set touches nothing of the node itself. Serialized as a map from
/// node name to delta.
#[derive(Clone, Default)]
pub struct ChangeSet {
    entries: Vec<(NameAt, usize)>,
    slots: SlotNames,
    names: Vec<Arc<str>>,
    deltas: Vec<NodeDelta>,
}

impl ChangeSet {
    /// What changed for `node`, if the change affected it.
    pub fn get(&self, node: &str) -> Option<&NodeDelta> {
        let i = self.position(node).ok()?;
        self.entries.get(i).and_then(|e| self.deltas.get(e.1))
    }

    /// Whether the change affected `node`.
    pub fn contains(&self, node: &str) -> bool {
        self.position(node).is_ok()
    }

    /// The number of affected nodes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no node was affected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The affected nodes with their deltas, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &NodeDelta)> + '_ {
        self.entries
            .iter()
            .filter_map(|&(n, d)| Some((self.name(n)?, self.deltas.get(d)?)))
    }

    /// Adds or replaces the delta of `node` (a replaced delta stays in the table: other
    /// nodes may share it).
    pub fn insert(&mut self, node: Arc<str>, delta: NodeDelta) {
        let d = self.deltas.len();
        self.deltas.push(delta);
        match self.position(&node) {
            Ok(i) => {
                if let Some(e) = self.entries.get_mut(i) {
                    e.1 = d;
                }
            }
            Err(i) => {
                self.entries.insert(i, (NameAt::Own(self.names.len()), d));
                self.names.push(node);
            }
        }
    }

    /// Removes `node`'s delta, returning it.
    pub fn remove(&mut self, node: &str) -> Option<NodeDelta> {
        let i = self.position(node).ok()?;
        let (_, d) = self.entries.remove(i);
        self.deltas.get(d).cloned()
    }

    fn name(&self, at: NameAt) -> Option<&Arc<str>> {
        match at {
            NameAt::Slot(s) => self.slots.get(s).and_then(Option::as_ref),
            NameAt::Own(i) => self.names.get(i),
        }
    }

    fn name_str(&self, at: NameAt) -> &str {
        self.name(at).map_or("", |n| n)
    }

    fn position(&self, node: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|&(n, _)| self.name_str(n).cmp(node))
    }
}

impl PartialEq for ChangeSet {
    fn eq(&self, other: &ChangeSet) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for ChangeSet {}

impl std::fmt::Debug for ChangeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(Arc<str>, NodeDelta)> for ChangeSet {
    /// Collects deltas in any order; a node named twice keeps its last delta.
    fn from_iter<I: IntoIterator<Item = (Arc<str>, NodeDelta)>>(iter: I) -> ChangeSet {
        let map: BTreeMap<Arc<str>, NodeDelta> = iter.into_iter().collect();
        let mut cs = ChangeSet::default();
        for (i, (n, d)) in map.into_iter().enumerate() {
            cs.entries.push((NameAt::Own(i), i));
            cs.names.push(n);
            cs.deltas.push(d);
        }
        cs
    }
}

impl IntoIterator for ChangeSet {
    type Item = (Arc<str>, NodeDelta);
    type IntoIter = std::vec::IntoIter<(Arc<str>, NodeDelta)>;
    /// Each node with a delta of its own: a shared delta is copied for all but the last
    /// node holding it, which takes it.
    fn into_iter(mut self) -> Self::IntoIter {
        let mut holders = vec![0usize; self.deltas.len()];
        for (_, d) in &self.entries {
            if let Some(h) = holders.get_mut(*d) {
                *h += 1;
            }
        }
        let entries = std::mem::take(&mut self.entries);
        let owned: Vec<(Arc<str>, NodeDelta)> = entries
            .into_iter()
            .filter_map(|(n, d)| {
                let name = self.name(n)?.clone();
                let h = holders.get_mut(d)?;
                *h -= 1;
                let delta = if *h == 0 {
                    std::mem::take(self.deltas.get_mut(d)?)
                } else {
                    self.deltas.get(d)?.clone()
                };
                Some((name, delta))
            })
            .collect();
        owned.into_iter()
    }
}

impl Serialize for ChangeSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter().map(|(n, d)| (&**n, d)))
    }
}

impl<'de> Deserialize<'de> for ChangeSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ChangeSet, D::Error> {
        let map = BTreeMap::<Arc<str>, NodeDelta>::deserialize(deserializer)?;
        Ok(map.into_iter().collect())
    }
}

/// A change set as the engine builds it: nodes pushed by slot, in name order; a delta made
/// only of shared lists is stored once for all the nodes that have it.
struct ChangeSetBuilder {
    entries: Vec<(NameAt, usize)>,
    deltas: Vec<NodeDelta>,
    /// The shared deltas stored, by their flags and the addresses of their lists (which
    /// the stored deltas hold, so no address is reused while the set is built).
    shared: SlotMap<(u8, [usize; 3]), usize>,
    /// The last shared delta stored (consecutive nodes mostly have the same).
    last: Option<((u8, [usize; 3]), usize)>,
    /// The shared deltas that name no peer, by their flags (see
    /// [`ChangeSetBuilder::push_flags`]).
    flags_only: [Option<usize>; 4],
}

impl ChangeSetBuilder {
    fn with_capacity(nodes: usize) -> ChangeSetBuilder {
        ChangeSetBuilder {
            entries: Vec::with_capacity(nodes),
            deltas: Vec::new(),
            shared: SlotMap::default(),
            last: None,
            flags_only: [None; 4],
        }
    }

    /// Adds the node in slot `s` with a delta of these flags and no peer named (what most
    /// views a policy edit touches get: thousands of them), unless it is empty.
    fn push_flags(&mut self, s: usize, filter: bool, ssh: bool) {
        let k = usize::from(filter) | (usize::from(ssh) << 1);
        if k == 0 {
            return;
        }
        let d = match self.flags_only.get(k).copied().flatten() {
            Some(d) => d,
            None => {
                let d = self.deltas.len();
                self.deltas.push(NodeDelta {
                    filter_changed: filter,
                    ssh_changed: ssh,
                    ..NodeDelta::default()
                });
                if let Some(at) = self.flags_only.get_mut(k) {
                    *at = Some(d);
                }
                d
            }
        };
        self.entries.push((NameAt::Slot(s), d));
    }

    /// Adds the node in slot `s` (after every node added before) with a delta of its own;
    /// returns where the delta is kept, for [`ChangeSetBuilder::delta_mut`].
    fn push_own(&mut self, s: usize, delta: NodeDelta) -> usize {
        let d = self.deltas.len();
        self.deltas.push(delta);
        self.entries.push((NameAt::Slot(s), d));
        d
    }

    /// Adds the node in slot `s` with the delta of these flags and peer names, unless it
    /// is empty.
    fn push_shared(&mut self, s: usize, filter: bool, ssh: bool, names: [&PeerNames; 3]) {
        if names.iter().all(|n| n.is_empty()) {
            self.push_flags(s, filter, ssh);
            return;
        }
        let key = (
            u8::from(filter) | (u8::from(ssh) << 1),
            names.map(|n| Arc::as_ptr(n).cast::<u8>() as usize),
        );
        // Compared field by field: a whole-key compare reads the key back wider than it was
        // written, which stalls the store forwarding (measured: most of this function).
        let same = |k: &(u8, [usize; 3])| {
            k.0 == key.0 && k.1[0] == key.1[0] && k.1[1] == key.1[1] && k.1[2] == key.1[2]
        };
        let d = match self.last {
            Some((k, d)) if same(&k) => d,
            _ => {
                let d = match self.shared.get(&key) {
                    Some(&d) => d,
                    None => {
                        let [peers_added, peers_removed, peers_changed] = names.map(Arc::clone);
                        let d = self.deltas.len();
                        self.deltas.push(NodeDelta {
                            peers_added,
                            peers_removed,
                            peers_changed,
                            filter_changed: filter,
                            ssh_changed: ssh,
                            ..NodeDelta::default()
                        });
                        self.shared.insert(key, d);
                        d
                    }
                };
                self.last = Some((key, d));
                d
            }
        };
        self.entries.push((NameAt::Slot(s), d));
    }

    /// The delta kept at `d` (see [`ChangeSetBuilder::push_own`]).
    fn delta_mut(&mut self, d: usize) -> Option<&mut NodeDelta> {
        self.deltas.get_mut(d)
    }

    /// Drops the nodes whose delta turned out empty.
    fn drop_empty(&mut self) {
        let deltas = &self.deltas;
        self.entries
            .retain(|(_, d)| deltas.get(*d).is_some_and(|d| !d.is_empty()));
    }

    /// The change set naming nodes by `slots` (the names after the change), with
    /// `removed` (sorted, none of them pushed) merged in.
    fn finish(self, slots: &SlotNames, removed: Vec<Arc<str>>) -> ChangeSet {
        let mut cs = ChangeSet {
            entries: self.entries,
            slots: slots.clone(),
            names: Vec::new(),
            deltas: self.deltas,
        };
        debug_assert!(cs
            .entries
            .windows(2)
            .all(|w| cs.name_str(w[0].0) < cs.name_str(w[1].0)));
        if removed.is_empty() {
            return cs;
        }
        let d = cs.deltas.len();
        cs.deltas.push(NodeDelta {
            removed: true,
            ..NodeDelta::default()
        });
        let gone: Vec<(NameAt, usize)> = (0..removed.len()).map(|i| (NameAt::Own(i), d)).collect();
        cs.names = removed;
        let entries = std::mem::take(&mut cs.entries);
        cs.entries = merge_sorted(entries, gone, |a, b| cs.name_str(*a) < cs.name_str(*b));
        cs
    }
}

/// Computes the delta between two views of one node.
pub fn diff_views(old: Option<&NodeView>, new: Option<&NodeView>) -> NodeDelta {
    match (old, new) {
        (None, None) => NodeDelta::default(),
        (None, Some(_)) => NodeDelta {
            added: true,
            ..NodeDelta::default()
        },
        (Some(_), None) => NodeDelta {
            removed: true,
            ..NodeDelta::default()
        },
        (Some(o), Some(n)) => {
            let mut d = NodeDelta {
                filter_changed: o.packet_filter != n.packet_filter,
                ssh_changed: o.ssh_rules != n.ssh_rules,
                self_changed: o.cap_map != n.cap_map,
                ..NodeDelta::default()
            };
            if o.peers != n.peers {
                (d.peers_added, d.peers_removed, d.peers_changed) =
                    merge_diff(o.peers.iter(), n.peers.iter());
            }
            d
        }
    }
}

/// An immutable, cheaply cloned state: policy, tailnet and every node's view.
///
/// Views are kept in a compact form that shares peer lists, source lists and SSH principals
/// between nodes; [`Snapshot::view`] assembles one node's full view on demand.
#[derive(Debug, Clone)]
pub struct Snapshot {
    policy_text: Arc<str>,
    policy: Arc<Policy>,
    /// Where the groups lie in `policy_text` (the next policy text takes the groups it
    /// leaves alone from `policy`).
    group_spans: Arc<GroupSpans>,
    tailnet: Tailnet,
    /// The nodes' names, in order, with their slots in `views`.
    names: OrdMap<Arc<str>, usize>,
    /// The nodes' names by slot (what change sets name nodes by).
    slot_names: SlotNames,
    /// Stored views by the engine's slot (a slot holds one node for its lifetime; `None`
    /// where that node is gone): a change finds and replaces views without comparing names.
    /// Each behind its own `Arc`: replacing a view copies the vector's leaf around it, and
    /// a leaf of single pointers costs a quarter of the reference counts to copy.
    views: imbl::Vector<Option<Arc<StoredView>>>,
    tables: Tables,
}

impl Snapshot {
    /// The stored view in slot `s`.
    fn stored(&self, s: usize) -> Option<&StoredView> {
        self.views.get(s).and_then(Option::as_deref)
    }

    /// A node's view.
    pub fn view(&self, node: &str) -> Option<NodeView> {
        self.names
            .get(node)
            .and_then(|&s| self.stored(s))
            .map(|v| v.materialize(&self.tables, node))
    }

    /// Whether the node has a view (it exists).
    pub fn contains(&self, node: &str) -> bool {
        self.names.contains_key(node)
    }

    /// The number of nodes (views).
    pub fn node_count(&self) -> usize {
        self.names.len()
    }

    /// The nodes' names, in order.
    pub fn node_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.names.keys().map(|n| &**n)
    }

    /// Every node's view, in name order (each assembled as it is reached).
    pub fn views(&self) -> impl Iterator<Item = (&str, NodeView)> + '_ {
        self.names.iter().filter_map(|(n, &s)| {
            self.stored(s)
                .map(|v| (&**n, v.materialize(&self.tables, n)))
        })
    }

    /// The tailnet state (including recorded primary routers).
    pub fn tailnet(&self) -> &Tailnet {
        &self.tailnet
    }

    /// A node's MagicDNS name (unique in the tailnet).
    pub fn dns_name(&self, node: &str) -> Option<&str> {
        self.tailnet.dns_names.get(node).map(String::as_str)
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy text in force.
    pub fn policy_text(&self) -> &str {
        &self.policy_text
    }
}

/// Parses and checks a policy for a tailnet: validation, domain checks, tests.
pub fn load_policy(text: &str, tailnet: &Tailnet) -> Result<Policy, CoreError> {
    Ok(load_policy_spans(text, tailnet)?.0)
}

/// [`load_policy`], also telling where the text's groups lie.
fn load_policy_spans(text: &str, tailnet: &Tailnet) -> Result<(Policy, GroupSpans), CoreError> {
    let (policy, spans) = netmap_policy::parse_policy_spans(text)?;
    crate::tests_eval::check_policy_for_tailnet(&policy, tailnet)?;
    let report = crate::tests_eval::run_tests(&policy, tailnet);
    if !report.passed() {
        return Err(CoreError::TestsFailed(report));
    }
    Ok((policy, spans))
}

/// The report of `policy`'s tests on `tailnet`, run on `plan`, which holds that policy (and
/// is prepared for it). A failing report is made again as [`crate::run_tests`] makes it (a
/// fresh preparation of the nodes, in name order), which is also the reference for the
/// verdict. The devices the `tests` named come with it (see
/// [`crate::tests_eval::run_tests_naming`]).
fn policy_tests_naming(
    plan: &Plan,
    policy: &Policy,
    tailnet: &Tailnet,
) -> (crate::tests_eval::TestReport, TestsRead) {
    let (report, named) = crate::tests_eval::run_tests_naming(&plan.r);
    if report.passed() {
        return (report, named);
    }
    (crate::tests_eval::run_tests(policy, tailnet), named)
}

/// [`policy_tests_naming`], judging only the pairs toward the devices `only` when `memo`
/// gives them with what the last passing run read (see
/// [`crate::tests_eval::run_tests_toward`]): what they read then is that run's, but for
/// those devices, which are read again. A failing verdict is made again in whole.
fn policy_tests_toward(
    plan: &Plan,
    policy: &Policy,
    tailnet: &Tailnet,
    memo: Option<(&TestsRead, &[u64])>,
) -> (crate::tests_eval::TestReport, TestsRead) {
    if let Some((read, only)) = memo {
        let (report, run) = crate::tests_eval::run_tests_toward(&plan.r, Some(only));
        if report.passed() {
            let word = |b: &[u64], i: usize| b.get(i).copied().unwrap_or(0);
            let words = read.devices.len().max(run.devices.len());
            let devices = (0..words)
                .map(|i| (word(&read.devices, i) & !word(only, i)) | word(&run.devices, i))
                .collect();
            let read = TestsRead {
                devices,
                routes: read.routes || run.routes,
            };
            return (report, read);
        }
    }
    policy_tests_naming(plan, policy, tailnet)
}

/// What the engine keeps of the last run of the policy's `tests` that passed: what it read,
/// and the devices changed since (a bitmap over slots), whose pairs the next run judges.
struct TestsMemo {
    read: TestsRead,
    dirty: Vec<u64>,
}

impl TestsMemo {
    fn new(read: TestsRead) -> TestsMemo {
        TestsMemo {
            read,
            dirty: Vec::new(),
        }
    }
}

/// Whether policy `new`'s tests judge every pair of a source and a destination as `old`'s
/// did, on the same tailnet, except pairs with a node of `moved`: the two policies have the
/// same `tests` (positions aside), nothing those read is redefined (postures, the groups,
/// hosts and ipsets they name), there are no `sshTests`, and the update between them
/// changed rules only in which nodes their sets hold, or in the ports of rules whose
/// sources are among `moved` (the update's `rule_nodes_moved`). A rule's verdict for a
/// source and a destination depends on the rule's sets only at those two, and on its ports
/// only if it holds the source.
fn tests_judge_alike(old: &Policy, new: &Policy, moved: Option<&[usize]>) -> bool {
    if moved.is_none() {
        return false;
    }
    let same_dst = |a: &[netmap_policy::Located<netmap_policy::TestDst>],
                    b: &[netmap_policy::Located<netmap_policy::TestDst>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.value == y.value)
    };
    let same_tests = old.tests.len() == new.tests.len()
        && old.tests.iter().zip(&new.tests).all(|(a, b)| {
            a.src.value == b.src.value
                && a.proto == b.proto
                && same_dst(&a.accept, &b.accept)
                && same_dst(&a.deny, &b.deny)
                && a.src_posture_attrs == b.src_posture_attrs
        });
    let redefined = new.tests.iter().any(|t| {
        std::iter::once(&t.src.value)
            .chain(t.accept.iter().chain(&t.deny).map(|d| &d.value.host))
            .any(|a| crate::rules::redefined(old, new, a))
    });
    same_tests
        && !redefined
        && new.ssh_tests.is_empty()
        && old.ssh_tests.is_empty()
        && old.has_rules == new.has_rules
        && old.postures == new.postures
        && old.default_src_posture == new.default_src_posture
}

/// Which of the nodes `nodes` (by name), as `plan` holds them, a passing run of the `tests`
/// read (`read`): a device the run named, or (`after` a change) one the tests could name
/// now. The verdicts read a device's record and the rules' sets only at the devices the run
/// named, and the rules' sets at a node follow from its own record: a change of other nodes
/// leaves the verdict of every pair as it was. `None` when the change must run the tests in
/// whole: the run read the subnet routes and one of the nodes is a router, or there are
/// `sshTests` (never kept across node changes).
fn tests_touched_by(
    read: &TestsRead,
    plan: &Plan,
    nodes: &[String],
    after: bool,
) -> Option<Vec<usize>> {
    let r = &plan.r;
    if !r.policy.ssh_tests.is_empty() {
        return None;
    }
    let mut touched = Vec::new();
    for s in nodes.iter().filter_map(|n| plan.slot(n)) {
        if read.routes && r.nodes.get(s).is_some_and(|n| !n.routes.is_empty()) {
            return None;
        }
        if crate::bits::bit(&read.devices, s) || (after && crate::tests_eval::tests_may_name(r, s))
        {
            touched.push(s);
        }
    }
    Some(touched)
}

/// The names that differ between two peer lists: (added, removed, changed).
type PeerDelta = (PeerNames, PeerNames, PeerNames);

fn merge_diff<'a>(
    old: impl Iterator<Item = &'a Arc<Peer>>,
    new: impl Iterator<Item = &'a Arc<Peer>>,
) -> PeerDelta {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    let mut a = old.peekable();
    let mut b = new.peekable();
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.name == y.name => {
                if !Arc::ptr_eq(x, y) && x != y {
                    changed.push(Arc::from(y.name.as_str()));
                }
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x.name < y.name => {
                removed.push(Arc::from(x.name.as_str()));
                a.next();
            }
            (Some(x), None) => {
                removed.push(Arc::from(x.name.as_str()));
                a.next();
            }
            (_, Some(y)) => {
                added.push(Arc::from(y.name.as_str()));
                b.next();
            }
            (None, None) => break,
        }
    }
    (peer_names(added), peer_names(removed), peer_names(changed))
}

/// The names that differ between two shared peer lists, skipping the subtrees they share
/// (a change to one entry leaves all but one path of the tree shared).
fn shared_diff(old: &SharedPeers, new: &SharedPeers) -> PeerDelta {
    let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for item in old.diff(new) {
        match item {
            DiffItem::Add(name, _) => added.push(name.0.clone()),
            DiffItem::Remove(name, _) => removed.push(name.0.clone()),
            DiffItem::Update { new: (name, _), .. } => changed.push(name.0.clone()),
        }
    }
    (peer_names(added), peer_names(removed), peer_names(changed))
}

/// `names` (sorted) without the viewer's own name and the names `extra` peers stand for
/// (they take the place of shared entries); `names` itself when nothing is left out.
/// Costs a lookup per hidden name, not per name.
fn masked<'a>(names: &'a PeerNames, own: &str, extra: &[Arc<Peer>]) -> Cow<'a, PeerNames> {
    // Where the hidden names are; the runs between them are copied whole.
    let mut hidden: Vec<usize> = std::iter::once(own)
        .chain(extra.iter().map(|p| p.name.as_str()))
        .filter_map(|h| names.binary_search_by(|n| (**n).cmp(h)).ok())
        .collect();
    if hidden.is_empty() {
        return Cow::Borrowed(names);
    }
    hidden.sort_unstable();
    hidden.dedup();
    let mut kept: Vec<Arc<str>> = Vec::with_capacity(names.len() - hidden.len());
    let mut from = 0;
    for at in hidden {
        kept.extend_from_slice(names.get(from..at).unwrap_or_default());
        from = at + 1;
    }
    kept.extend_from_slice(names.get(from..).unwrap_or_default());
    Cow::Owned(peer_names(kept))
}

/// A class list delta's lists as the view in slot `s` shows them: without its own name
/// and the names its extra peers stand for.
fn seen_by<'a>(plan: &Plan, s: usize, pd: [&'a PeerNames; 3]) -> [Cow<'a, PeerNames>; 3] {
    let (n, extra) = (plan.name(s), plan.extra_of(s));
    pd.map(|v| masked(v, n, extra))
}

/// The lists a delta shows when no peer changed: the shared empty list, thrice.
fn no_names_shown() -> [Cow<'static, PeerNames>; 3] {
    [empty_names(); 3].map(Cow::Borrowed)
}

/// The lists of a delta, by reference.
fn lists(pd: &PeerDelta) -> [&PeerNames; 3] {
    [&pd.0, &pd.1, &pd.2]
}

/// The lists of a class's delta, by reference.
fn class_lists(cd: &ListDelta) -> [&PeerNames; 3] {
    [&cd.added, &cd.removed, &cd.changed]
}

/// The distinct pairs of class lists the views in `slots` move between (the list of their
/// class in `prev`, and the list of their class in `plan`, whose tables are `new_tables`),
/// but pairs of one list and the pairs `skip` holds.
fn class_moves(
    slots: impl Iterator<Item = usize>,
    prev: &Snapshot,
    plan: &Plan,
    new_tables: &Tables,
    skip: impl Fn(&(usize, usize)) -> bool,
) -> Vec<ListPair> {
    let mut pairs: SlotMap<(usize, usize), (SharedPeers, SharedPeers)> = SlotMap::default();
    for s in slots {
        let Some(old) = prev.stored(s) else {
            continue;
        };
        if let (Some(a), Some(b)) = (
            prev.tables.class_list(old.class),
            new_tables.class_list(plan.class_id(s)),
        ) {
            let key = list_pair(a, b);
            if !Arc::ptr_eq(a, b) && !skip(&key) {
                pairs.entry(key).or_insert_with(|| (a.clone(), b.clone()));
            }
        }
    }
    pairs.into_iter().collect()
}

/// Class list pairs being diffed on the pool: the receiver of their deltas, and the pairs
/// (to diff here should the job fail).
type PendingDiffs = (
    std::sync::mpsc::Receiver<Vec<((usize, usize), Arc<PeerDelta>)>>,
    Vec<ListPair>,
);

/// Starts diffing `pairs` on the pool.
fn diff_on_pool(pairs: Vec<ListPair>) -> PendingDiffs {
    let (tx, rx) = std::sync::mpsc::channel();
    let job = pairs.clone();
    rayon::spawn(move || {
        let diffs: Vec<_> = job.into_iter().map(diff_pair).collect();
        // The receiver waits for it (gone if the tests failed, or the loop below panicked).
        let _ = tx.send(diffs);
    });
    (rx, pairs)
}

/// The delta of a pair of class lists, with its key.
fn diff_pair((key, (a, b)): ListPair) -> ((usize, usize), Arc<PeerDelta>) {
    (key, Arc::new(shared_diff(&a, &b)))
}

/// Two name-ordered lists of change set entries (naming different nodes) merged into one;
/// `before` orders two names.
fn merge_sorted(
    mut a: Vec<(NameAt, usize)>,
    b: Vec<(NameAt, usize)>,
    before: impl Fn(&NameAt, &NameAt) -> bool,
) -> Vec<(NameAt, usize)> {
    // A few entries (a node removed) are inserted where they belong, found by bisection.
    if b.len() <= 8 {
        for y in b {
            let at = a.partition_point(|x| before(&x.0, &y.0));
            a.insert(at, y);
        }
        return a;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.into_iter().peekable();
    for x in a {
        while let Some(y) = b.next_if(|y| before(&y.0, &x.0)) {
            out.push(y);
        }
        out.push(x);
    }
    out.extend(b);
    out
}

/// Peer list deltas by (old list, new list) address, computed before views are diffed.
type KnownDeltas = SlotMap<(usize, usize), Arc<PeerDelta>>;

/// Diffs views, comparing shared parts (peer lists, source lists) once per pair.
struct Differ<'a> {
    /// Deltas of the class list pairs the recomputed views move between (shared by the
    /// threads diffing them, so each pair is diffed once, not once per thread).
    known: &'a KnownDeltas,
    peers: KnownDeltas,
    lists: SlotMap<(usize, usize), bool>,
}

impl<'a> Differ<'a> {
    fn new(known: &'a KnownDeltas) -> Differ<'a> {
        Differ {
            known,
            peers: SlotMap::default(),
            lists: SlotMap::default(),
        }
    }

    fn same_list<T: PartialEq>(&mut self, a: &Arc<Vec<T>>, b: &Arc<Vec<T>>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let key = (Arc::as_ptr(a) as usize, Arc::as_ptr(b) as usize);
        *self.lists.entry(key).or_insert_with(|| a == b)
    }

    /// Whether the delta of two shared peer lists is known without diffing them.
    fn knows(&self, old: &SharedPeers, new: &SharedPeers) -> bool {
        let key = list_pair(old, new);
        self.known.contains_key(&key) || self.peers.contains_key(&key)
    }

    /// The names that differ between two shared peer lists, compared once per pair.
    fn list_delta(&mut self, old: &SharedPeers, new: &SharedPeers) -> Arc<PeerDelta> {
        let key = list_pair(old, new);
        if let Some(d) = self.known.get(&key) {
            return d.clone();
        }
        self.peers
            .entry(key)
            .or_insert_with(|| Arc::new(shared_diff(old, new)))
            .clone()
    }

    /// The delta between two stored views of node `own`, each read with its tables, without
    /// assembling either view.
    fn diff_stored(
        &mut self,
        own: &str,
        (o, ot): (&StoredView, &Tables),
        (n, nt): (&StoredView, &Tables),
    ) -> NodeDelta {
        // Entries and SSH rules bound to a rule read their lists from the tables, which may
        // have changed under the same entries: no shortcut for a view that kept its parts.
        let filter_changed = o.filter.len() != n.filter.len()
            || o.filter.iter().zip(n.filter.iter()).any(|(a, b)| {
                !(StoredView::same_dst(ot, a, nt, b)
                    && a.0.ip_proto == b.0.ip_proto
                    && a.0.cap_grant == b.0.cap_grant
                    && self.same_list(StoredView::entry_src(ot, a), StoredView::entry_src(nt, b)))
            });
        let ssh_changed = o.ssh.len() != n.ssh.len()
            || o.ssh.iter().zip(n.ssh.iter()).any(|(a, b)| {
                !(a.0.ssh_users == b.0.ssh_users
                    && a.0.action == b.0.action
                    && a.0.accept_env == b.0.accept_env
                    && self.same_list(
                        StoredView::rule_principals(ot, a),
                        StoredView::rule_principals(nt, b),
                    ))
            });
        let mut d = NodeDelta {
            filter_changed,
            ssh_changed,
            self_changed: !Arc::ptr_eq(&o.cap_map, &n.cap_map) && o.cap_map != n.cap_map,
            ..NodeDelta::default()
        };
        let empty = SharedPeers::default();
        let os = ot.class_list(o.class).unwrap_or(&empty);
        let ns = nt.class_list(n.class).unwrap_or(&empty);
        if !Arc::ptr_eq(os, ns) {
            let sd = self.list_delta(os, ns);
            let hide =
                |v: &PeerNames| masked(&masked(v, own, &o.extra), own, &n.extra).into_owned();
            (d.peers_added, d.peers_removed, d.peers_changed) =
                (hide(&sd.0), hide(&sd.1), hide(&sd.2));
        }
        if o.extra.is_empty() && n.extra.is_empty() {
            return d;
        }
        // The names extra peers stand for: compare what each view shows there.
        let shows = |sv: &StoredView, shared: &SharedPeers, name: &str| -> Option<Arc<Peer>> {
            match sv.extra.binary_search_by(|p| p.name.as_str().cmp(name)) {
                Ok(i) => sv.extra.get(i).cloned(),
                Err(_) => shared.get(name).cloned(),
            }
        };
        let mut names: Vec<&str> = o
            .extra
            .iter()
            .chain(n.extra.iter())
            .map(|p| p.name.as_str())
            .filter(|&name| name != own)
            .collect();
        names.sort_unstable();
        names.dedup();
        let (mut added, mut removed, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        for c in names {
            match (shows(o, os, c), shows(n, ns, c)) {
                (None, Some(_)) => added.push(Arc::from(c)),
                (Some(_), None) => removed.push(Arc::from(c)),
                (Some(a), Some(b)) if !Arc::ptr_eq(&a, &b) && a != b => changed.push(Arc::from(c)),
                _ => {}
            }
        }
        let merge = |a: &PeerNames, b: Vec<Arc<str>>| -> PeerNames {
            if b.is_empty() {
                return a.clone();
            }
            let mut all: Vec<Arc<str>> = a.iter().cloned().chain(b).collect();
            all.sort_unstable();
            all.into()
        };
        d.peers_added = merge(&d.peers_added, added);
        d.peers_removed = merge(&d.peers_removed, removed);
        d.peers_changed = merge(&d.peers_changed, changed);
        d
    }
}

/// Puts `view` in slot `s` of `views` (grown with empty slots to reach it): a stored view,
/// or a name.
fn set_slot<T: Clone>(views: &mut imbl::Vector<Option<T>>, s: usize, view: Option<T>) {
    while views.len() <= s {
        views.push_back(None);
    }
    if let Some(v) = views.get_mut(s) {
        *v = view;
    }
}

/// The engine. `apply` changes state and returns what changed for whom.
pub struct Engine {
    current: Snapshot,
    plan: Plan,
    /// What the policy's `tests` read of the tailnet when they last ran and passed, and the
    /// devices changed since: a policy edit that leaves the tests as they were judges only
    /// the pairs with a changed device (see [`tests_judge_alike`]), or none. Every change
    /// that updates the plan takes it. A policy edit whose tests passed puts it back, and so
    /// does a change of nodes, marking those the tests named or could name now (see
    /// [`tests_touched_by`]); changes that leave the plan alone (a non-router's presence, a
    /// user no node names) change nothing the tests read.
    tests_passed: Option<TestsMemo>,
}

/// Frees a replaced snapshot off the path of a change: what only the snapshot before a
/// change held (the views and list nodes the change replaced) is no part of the answer, and
/// freeing it was about a tenth of a change. One thread for the process (a server holds an
/// engine per tailnet), not the rayon pool: a thread waiting in a parallel loop runs pool
/// jobs, so the next change would do the freeing after all. If that thread cannot be
/// started, snapshots are freed in place.
fn reclaim(snapshot: Snapshot) {
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Snapshot>>> =
        std::sync::OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Snapshot>();
        std::thread::Builder::new()
            .name("netmap-reclaim".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(q) = queue {
        // Fails only if the thread is gone; the snapshot is then freed here.
        let _ = q.send(snapshot);
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("nodes", &self.current.node_count())
            .finish()
    }
}

impl Engine {
    /// Builds an engine from a policy text and a tailnet; a rejected policy is an error.
    pub fn new(policy_text: &str, tailnet: Tailnet) -> Result<Engine, CoreError> {
        let (policy, spans) = load_policy_spans(policy_text, &tailnet)?;
        Ok(Engine::with_policy(
            policy_text,
            (Arc::new(policy), Arc::new(spans)),
            tailnet,
        ))
    }

    /// Rebuilds an engine from state that was accepted before (a server restarting): the
    /// policy must still parse, but its `tests` and the tailnet checks gated the change that
    /// set it, not this restart.
    pub fn restore(policy_text: &str, tailnet: Tailnet) -> Result<Engine, CoreError> {
        let (policy, spans) = netmap_policy::parse_policy_spans(policy_text)?;
        Ok(Engine::with_policy(
            policy_text,
            (Arc::new(policy), Arc::new(spans)),
            tailnet,
        ))
    }

    fn with_policy(
        policy_text: &str,
        (policy, spans): (Arc<Policy>, Arc<GroupSpans>),
        tailnet: Tailnet,
    ) -> Engine {
        let mut tailnet = tailnet;
        // Nodes loaded without a recorded name get one now, oldest first.
        let mut unnamed: Vec<(String, String, (i64, u32))> = tailnet
            .nodes
            .iter()
            .filter(|(k, _)| !tailnet.dns_names.contains_key(*k))
            .map(|(k, n)| (k.clone(), n.hostname.clone(), n.created_key()))
            .collect();
        unnamed.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        for (k, h, _) in unnamed {
            tailnet.assign_dns_name(&k, &h);
        }
        let mut plan = Plan::build(policy.clone(), &tailnet);
        tailnet.primaries = plan.primaries.clone();
        let sv = plan.all_stored_views();
        for (s, v) in &sv {
            plan.record_view(*s, v);
        }
        let names: OrdMap<Arc<str>, usize> =
            sv.iter().map(|(s, _)| (plan.key(*s).clone(), *s)).collect();
        let mut slots: Vec<Option<Arc<StoredView>>> = Vec::new();
        let mut slot_names: Vec<Option<Arc<str>>> = Vec::new();
        for (s, v) in sv {
            if slots.len() <= s {
                slots.resize(s + 1, None);
                slot_names.resize(s + 1, None);
            }
            slots[s] = Some(Arc::new(v));
            slot_names[s] = Some(plan.key(s).clone());
        }
        Engine {
            current: Snapshot {
                policy_text: Arc::from(policy_text),
                policy,
                group_spans: spans,
                tailnet,
                names,
                slot_names: slot_names.into_iter().collect(),
                views: slots.into_iter().collect(),
                tables: plan.tables(),
            },
            plan,
            tests_passed: None,
        }
    }

    /// An O(1) snapshot of the current state.
    pub fn snapshot(&self) -> Snapshot {
        self.current.clone()
    }

    /// Applies one change. On error nothing changes.
    pub fn apply(&mut self, change: Change) -> Result<ChangeSet, CoreError> {
        let mut tailnet = self.current.tailnet.clone();
        let mut policy = self.current.policy.clone();
        let mut policy_text = self.current.policy_text.clone();
        let mut group_spans = self.current.group_spans.clone();
        let not_found =
            |what: &str, name: &str| CoreError::NotFound(format!("{what} {name:?} not found"));
        let mut batch = Batch::default();
        let mut test_new_policy = false;
        match change {
            Change::UpsertNode { node, value } => {
                // The same node again, its presence aside (which only routers' peers read).
                let same = tailnet.nodes.get(&node).is_some_and(|old| {
                    (old.online == value.online || !self.plan.presence_matters(&node))
                        && Node {
                            online: value.online,
                            ..(**old).clone()
                        } == value
                });
                let value = Arc::new(value);
                if same {
                    self.plan.set_presence(&node, value.clone());
                } else {
                    tailnet.assign_dns_name(&node, &value.hostname);
                    batch.nodes.push(node.clone());
                }
                tailnet.nodes.insert(node, value);
            }
            Change::RemoveNode { node } => {
                if tailnet.nodes.remove(&node).is_none() {
                    return Err(not_found("node", &node));
                }
                tailnet.release_dns_name(&node);
                batch.nodes.push(node);
            }
            Change::SetOnline { node, online } => {
                let Some(n) = tailnet.nodes.get_mut(&node) else {
                    return Err(not_found("node", &node));
                };
                if n.online != online {
                    Arc::make_mut(n).online = online;
                    // Only routers' presence matters (primary election); nothing else reads it.
                    if self.plan.presence_matters(&node) {
                        batch.nodes.push(node);
                    } else {
                        self.plan.set_presence(&node, n.clone());
                    }
                }
            }
            Change::UpsertUser { user } => {
                if tailnet.users.get(&user.name) != Some(&user) {
                    batch.nodes = self.plan.user_nodes(&user.name);
                    tailnet.users.insert(user.name.clone(), user);
                }
            }
            Change::RemoveUser { name } => {
                if tailnet.users.remove(&name).is_none() {
                    return Err(not_found("user", &name));
                }
                batch.nodes = self.plan.user_nodes(&name);
            }
            Change::SetPolicy { policy: text } => {
                let (new, spans) =
                    netmap_policy::reparse_policy(&text, &policy_text, &policy, &group_spans)?;
                crate::tests_eval::check_policy_for_tailnet(&new, &tailnet)?;
                if new != *policy {
                    // Tested once the plan holds it (below).
                    test_new_policy = !(new.tests.is_empty() && new.ssh_tests.is_empty());
                    policy = Arc::new(new);
                    batch.policy = Some(policy.clone());
                } else {
                    // The same policy (its tests too), but the tailnet may have changed
                    // since they last ran.
                    let memo = self.tests_passed.as_ref();
                    if memo.is_none_or(|m| m.dirty.iter().any(|&w| w != 0)) {
                        let base = memo.map(|m| (&m.read, m.dirty.as_slice()));
                        let (report, read) =
                            policy_tests_toward(&self.plan, &policy, &tailnet, base);
                        if !report.passed() {
                            return Err(CoreError::TestsFailed(report));
                        }
                        self.tests_passed = Some(TestsMemo::new(read));
                    }
                }
                policy_text = Arc::from(text.as_str());
                group_spans = Arc::new(spans);
            }
            Change::ApproveRoutes { node, routes } => match tailnet.nodes.get_mut(&node) {
                Some(n) => {
                    if n.approved_routes != routes {
                        Arc::make_mut(n).approved_routes = routes;
                        batch.nodes.push(node);
                    }
                }
                None => return Err(not_found("node", &node)),
            },
        }
        if batch.nodes.is_empty() && batch.policy.is_none() {
            self.plan.r.tailnet = tailnet.clone();
            self.current = Snapshot {
                tailnet,
                policy,
                policy_text,
                group_spans,
                ..self.current.clone()
            };
            return Ok(ChangeSet::default());
        }
        // A change of nodes alone marks the devices the tests read among them, before and
        // after (see `tests_touched_by`).
        let nodes_touched = match &self.tests_passed {
            Some(m) if batch.policy.is_none() => {
                tests_touched_by(&m.read, &self.plan, &batch.nodes, false)
                    .map(|before| (before, batch.nodes.clone()))
            }
            _ => None,
        };
        let prev = &self.current;
        let old_tables = &prev.tables;
        // The class list pairs nodes moved between are diffed on the pool from the moment
        // the plan knows them, beside the rest of the update, the tests and the views (a
        // group edit moves a user's devices between two large lists, and the diff is a few
        // thousand names); the deltas of the views that keep their stored form are filled
        // in after the loop.
        let mut early: Option<PendingDiffs> = None;
        let affected = self.plan.update(&tailnet, batch, &mut |pairs| {
            if !pairs.is_empty() {
                early = Some(diff_on_pool(pairs));
            }
        });
        let new_tables = self.plan.tables();
        // Views computed again: in whole, or patched (see `touch::PATCH`).
        let fresh_flags = touch::RECOMPUTE | touch::PATCH;
        let recompute: Vec<(usize, u8)> = affected
            .slots
            .iter()
            .filter(|(_, f)| f & fresh_flags != 0)
            .copied()
            .collect();
        let plan = &self.plan;
        let keeps = affected.keeps;
        let patch = &affected.patch;
        // The class list pairs recomputed views move between (diffed once each, below).
        let known_pairs = {
            // Only views that moved to another class read another list.
            let moved = recompute
                .iter()
                .filter(|(_, f)| f & touch::CLASS != 0)
                .map(|&(s, _)| s);
            class_moves(moved, prev, plan, &new_tables, |_| false)
        };
        // Those kept views move between: the plan's, or (should it have named none of them)
        // diffed on the pool from here on. A pair neither names is diffed after the loop.
        let pending = early.or_else(|| {
            let kept = affected
                .slots
                .iter()
                .filter(|(_, f)| f & touch::CLASS != 0 && f & fresh_flags == 0)
                .map(|&(s, _)| s);
            let pairs = class_moves(kept, prev, plan, &new_tables, |key| {
                known_pairs.iter().any(|(k, _)| k == key)
            });
            (!pairs.is_empty()).then(|| diff_on_pool(pairs))
        });
        // A new policy's tests run on the plan that now holds it (prepared for it, which a
        // fresh resolver would have to do again); if one fails, the engine is built again
        // from the state it had, so the change is undone. (Running them beside the views,
        // on another thread, was measured no faster: the views' allocations then came from
        // pool threads' heaps and kept faulting in fresh pages.)
        let memo = self.tests_passed.take();
        if test_new_policy {
            let moved = affected.rule_nodes_moved.as_deref();
            // The devices whose pairs the edit may judge otherwise: those changed since the
            // tests last passed, and those the edit moved in rules' sets that they name.
            let only = memo
                .as_ref()
                .filter(|_| tests_judge_alike(&self.current.policy, &policy, moved))
                .map(|m| {
                    let mut only = m.dirty.clone();
                    for &x in moved.unwrap_or_default() {
                        if crate::bits::bit(&m.read.devices, x) {
                            crate::bits::set_bit_growing(&mut only, x);
                        }
                    }
                    only
                });
            let (report, read) = match (memo, only) {
                (Some(m), Some(only)) if only.iter().all(|&w| w == 0) => {
                    (crate::tests_eval::TestReport::default(), m.read)
                }
                (memo, only) => {
                    let base = memo.as_ref().map(|m| &m.read).zip(only.as_deref());
                    policy_tests_toward(plan, &policy, &tailnet, base)
                }
            };
            self.tests_passed = Some(TestsMemo::new(read));
            if !report.passed() {
                let cur = &self.current;
                let before = Engine::with_policy(
                    &cur.policy_text,
                    (cur.policy.clone(), cur.group_spans.clone()),
                    cur.tailnet.clone(),
                );
                *self = before;
                return Err(CoreError::TestsFailed(report));
            }
        } else if let (Some(mut m), Some((before, nodes))) = (memo, nodes_touched) {
            if let Some(after) = tests_touched_by(&m.read, plan, &nodes, true) {
                for s in before.into_iter().chain(after) {
                    crate::bits::set_bit_growing(&mut m.dirty, s);
                }
                self.tests_passed = Some(m);
            }
        }
        // Pairs the pool is diffing already (a view the plan moved to another class, and
        // computes again too) are taken from it, not diffed a second time: the pool's
        // diffs are awaited here, and every view reads them from `known`.
        let mut pending = pending;
        let mut taken: Vec<((usize, usize), Arc<PeerDelta>)> = Vec::new();
        let overlaps = |pairs: &[ListPair]| {
            known_pairs
                .iter()
                .any(|(k, _)| pairs.iter().any(|(p, _)| p == k))
        };
        if pending.as_ref().is_some_and(|(_, pairs)| overlaps(pairs)) {
            if let Some((rx, pairs)) = pending.take() {
                taken = match rx.recv() {
                    Ok(d) => d,
                    Err(_) => pairs.into_iter().map(diff_pair).collect(),
                };
            }
        }
        let known_pairs: Vec<ListPair> = known_pairs
            .into_iter()
            .filter(|(k, _)| !taken.iter().any(|(t, _)| t == k))
            .collect();
        // The class list pairs recomputed views move between, each diffed once (in
        // parallel: a policy edit moves thousands of views between a few large lists).
        let mut known: KnownDeltas = if known_pairs.len() > 1 {
            known_pairs
                .into_par_iter()
                .map(diff_pair)
                .collect::<Vec<_>>()
                .into_iter()
                .collect()
        } else {
            known_pairs.into_iter().map(diff_pair).collect()
        };
        known.extend(taken);
        // Each recomputed view with its delta (diffed where it is computed).
        let fresh_view = |differ: &mut Differ, (s, f): (usize, u8)| {
            let n = plan.name(s);
            let old = prev.stored(s);
            let sv = match old {
                Some(o) if f & touch::RECOMPUTE == 0 => plan.patched_view(s, o, patch),
                _ => None,
            }
            .unwrap_or_else(|| plan.stored_view_keeping(s, old.map(|o| (o, keeps))));
            let d = match old {
                Some(o) => differ.diff_stored(n, (o, old_tables), (&sv, &new_tables)),
                None => NodeDelta {
                    added: true,
                    ..NodeDelta::default()
                },
            };
            (sv, d)
        };
        // A handful of views is not worth handing to the thread pool.
        let fresh: Vec<(StoredView, NodeDelta)> = if recompute.len() < 64 {
            let mut differ = Differ::new(&known);
            recompute
                .into_iter()
                .map(|s| fresh_view(&mut differ, s))
                .collect()
        } else {
            recompute
                .into_par_iter()
                .map_init(|| Differ::new(&known), |differ, s| fresh_view(differ, s))
                .collect()
        };
        // Kept views whose delta waits for a pending diff: (where the delta is kept, slot,
        // the lists it moves between).
        let mut waiting: Vec<(usize, usize, SharedPeers, SharedPeers)> = Vec::new();
        let mut differ = Differ::new(&known);
        let mut views = prev.views.clone();
        let mut names = prev.names.clone();
        let mut slot_names = prev.slot_names.clone();
        let mut recorded: Vec<(usize, Arc<StoredView>)> = Vec::new();
        // Deltas are produced in name order (the touched slots are), so the change set is
        // built by pushing; the removed nodes are merged in at the end.
        let mut deltas = ChangeSetBuilder::with_capacity(affected.slots.len());
        let mut fresh = fresh.into_iter();
        for &(s, f) in &affected.slots {
            if f & fresh_flags != 0 {
                let Some((sv, d)) = fresh.next() else {
                    continue;
                };
                let sv = Arc::new(sv);
                recorded.push((s, sv.clone()));
                if prev.stored(s).is_none() {
                    names.insert(plan.key(s).clone(), s);
                    set_slot(&mut slot_names, s, Some(plan.key(s).clone()));
                }
                set_slot(&mut views, s, Some(sv));
                if !d.is_empty() {
                    deltas.push_own(s, d);
                }
                continue;
            }
            // The other touched views keep their stored form (with their new class): they
            // read what changed from the tables, and their delta is known from how they were
            // touched.
            let filter_changed = f & touch::FILTER != 0;
            let ssh_changed = f & touch::SSH != 0;
            if f & (touch::CLASS | touch::PEERS) == 0 {
                // No peer changed (most views a policy edit touches).
                deltas.push_flags(s, filter_changed, ssh_changed);
                continue;
            }
            // The names the view's delta shows (its class's delta itself when that names
            // neither the node nor a peer it has aside), or `None` while they wait for a
            // pending diff.
            let class_delta;
            let shown: Option<[Cow<'_, PeerNames>; 3]> = if f & touch::CLASS != 0 {
                let Some(old) = prev.stored(s) else {
                    continue;
                };
                let class = plan.class_id(s);
                let delta = match (
                    old_tables.class_list(old.class),
                    new_tables.class_list(class),
                ) {
                    (Some(a), Some(b))
                        if pending.is_some() && !Arc::ptr_eq(a, b) && !differ.knows(a, b) =>
                    {
                        let at = deltas.push_own(
                            s,
                            NodeDelta {
                                filter_changed,
                                ssh_changed,
                                ..NodeDelta::default()
                            },
                        );
                        waiting.push((at, s, a.clone(), b.clone()));
                        None
                    }
                    (Some(a), Some(b)) => {
                        class_delta = differ.list_delta(a, b);
                        Some(seen_by(plan, s, lists(&class_delta)))
                    }
                    _ => Some(no_names_shown()),
                };
                set_slot(
                    &mut views,
                    s,
                    Some(Arc::new(StoredView {
                        class,
                        ..old.clone()
                    })),
                );
                delta
            } else {
                // Its class's list changed (`touch::PEERS`).
                Some(match affected.class_delta.get(&plan.class_id(s)) {
                    Some(cd) if plan.delta_applies_whole(s, cd) => {
                        class_lists(cd).map(Cow::Borrowed)
                    }
                    Some(cd) => seen_by(plan, s, class_lists(cd)),
                    None => no_names_shown(),
                })
            };
            if let Some([a, r, c]) = &shown {
                deltas.push_shared(
                    s,
                    filter_changed,
                    ssh_changed,
                    [a.as_ref(), r.as_ref(), c.as_ref()],
                );
            }
        }
        if let Some((rx, pairs)) = pending {
            // The pool's diffs (or, should that job have failed, the same diffs here).
            let diffs: KnownDeltas = match rx.recv() {
                Ok(d) => d.into_iter().collect(),
                Err(_) => pairs.into_iter().map(diff_pair).collect(),
            };
            let mut emptied = false;
            for (at, s, a, b) in waiting {
                let pd = match diffs.get(&list_pair(&a, &b)) {
                    Some(pd) => pd.clone(),
                    None => differ.list_delta(&a, &b),
                };
                let Some(d) = deltas.delta_mut(at) else {
                    continue;
                };
                let [a, r, c] = seen_by(plan, s, lists(&pd));
                (d.peers_added, d.peers_removed, d.peers_changed) =
                    (a.into_owned(), r.into_owned(), c.into_owned());
                emptied |= d.is_empty();
            }
            if emptied {
                deltas.drop_empty();
            }
        }
        let mut removed = affected.removed;
        for name in &removed {
            if let Some(s) = names.remove(&**name) {
                set_slot(&mut views, s, None);
                set_slot(&mut slot_names, s, None);
            }
        }
        removed.sort_unstable();
        let cs = deltas.finish(&slot_names, removed);
        for (s, v) in &recorded {
            self.plan.record_view(*s, v);
        }
        tailnet.primaries = self.plan.primaries.clone();
        let before = std::mem::replace(
            &mut self.current,
            Snapshot {
                policy_text,
                policy,
                group_spans,
                tailnet,
                names,
                slot_names,
                views,
                tables: new_tables,
            },
        );
        reclaim(before);
        Ok(cs)
    }

    /// The policy as it would be set by [`Change::SetPolicy`] (parsed, checked and its tests
    /// run), without changing anything.
    pub fn check_policy(&self, text: &str) -> Result<Policy, CoreError> {
        load_policy(text, &self.current.tailnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> PeerNames {
        v.iter().map(|&n| Arc::from(n)).collect::<Vec<_>>().into()
    }

    fn filter_only() -> NodeDelta {
        NodeDelta {
            filter_changed: true,
            ..NodeDelta::default()
        }
    }

    #[test]
    fn a_delta_is_shown_without_the_viewer_and_the_peers_it_has_aside() {
        let peer = |n: &str| {
            Arc::new(Peer {
                name: n.to_string(),
                addresses: Vec::new(),
                allowed_ips: Vec::new(),
                primary_routes: Vec::new(),
                tags: Vec::new(),
                user: None,
            })
        };
        let list = names(&["a", "b", "c", "d", "e"]);
        // The viewer first and last, an extra peer between, one extra not in the list.
        let shown = masked(&list, "a", &[peer("c"), peer("e"), peer("x")]);
        assert_eq!(*shown, names(&["b", "d"]));
        // Named twice (own name and an extra peer): left out once.
        assert_eq!(
            *masked(&list, "b", &[peer("b")]),
            names(&["a", "c", "d", "e"])
        );
        // Nothing to leave out: the list itself, not a copy.
        assert!(matches!(masked(&list, "z", &[peer("y")]), Cow::Borrowed(_)));
        // Everything left out.
        assert!(masked(&names(&["a"]), "a", &[]).is_empty());
    }

    #[test]
    fn a_change_set_built_by_slot_reads_as_a_map_of_names() {
        // Slots as the engine numbers them; pushed in name order: a, b, d, e, f.
        let slots: SlotNames = ["b", "d", "a", "e", "f"]
            .iter()
            .map(|&n| Some(Arc::from(n)))
            .collect();
        let (x, empty) = (names(&["x"]), no_peers());
        let mut b = ChangeSetBuilder::with_capacity(5);
        b.push_shared(2, true, false, [&empty, &empty, &empty]);
        b.push_shared(0, false, false, [&x, &empty, &empty]);
        b.push_shared(1, true, false, [&empty, &empty, &empty]);
        // Nothing changed for e: not in the set.
        b.push_shared(3, false, false, [&empty, &empty, &empty]);
        // f waited for a delta that turned out empty.
        let waited = b.push_own(4, NodeDelta::default());
        if let Some(d) = b.delta_mut(waited) {
            d.peers_added = no_peers();
        }
        b.drop_empty();
        let cs = b.finish(&slots, vec![Arc::from("c")]);

        let b_delta = NodeDelta {
            peers_added: x.clone(),
            ..NodeDelta::default()
        };
        let removed = NodeDelta {
            removed: true,
            ..NodeDelta::default()
        };
        let expected: ChangeSet = [
            (Arc::from("d"), filter_only()),
            (Arc::from("a"), filter_only()),
            (Arc::from("c"), removed.clone()),
            (Arc::from("b"), b_delta.clone()),
        ]
        .into_iter()
        .collect();
        assert_eq!(cs, expected);
        // a and d share one delta.
        assert_eq!(
            cs.entries.first().map(|e| e.1),
            cs.entries.get(3).map(|e| e.1)
        );
        let order: Vec<&str> = cs.iter().map(|(n, _)| &**n).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert_eq!(cs.get("d"), Some(&filter_only()));
        assert_eq!(cs.get("c"), Some(&removed));
        assert!(!cs.contains("e") && !cs.contains("f"));
        let json = serde_json::to_string(&cs).unwrap_or_default();
        assert_eq!(
            serde_json::from_str::<ChangeSet>(&json).ok().as_ref(),
            Some(&cs)
        );

        // Taken apart, each node has its delta.
        let owned: Vec<(Arc<str>, NodeDelta)> = cs.clone().into_iter().collect();
        assert_eq!(
            owned,
            vec![
                (Arc::from("a"), filter_only()),
                (Arc::from("b"), b_delta),
                (Arc::from("c"), removed),
                (Arc::from("d"), filter_only()),
            ]
        );

        // Edited by hand: replacing one node's delta leaves the node sharing it alone.
        let mut edited = cs;
        edited.insert(Arc::from("a"), NodeDelta::default());
        edited.insert(Arc::from("aa"), filter_only());
        assert_eq!(edited.get("a"), Some(&NodeDelta::default()));
        assert_eq!(edited.get("d"), Some(&filter_only()));
        assert_eq!(edited.remove("aa"), Some(filter_only()));
        assert_eq!(edited.remove("aa"), None);
        let order: Vec<&str> = edited.iter().map(|(n, _)| &**n).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
    }
}
