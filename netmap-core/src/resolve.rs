//! Resolution of selectors against a tailnet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netmap_policy::{Alias, AutoGroup, Policy, Posture};

use crate::addr::{self, fmt_net};
use crate::tailnet::{Node, Tailnet};

/// A node prepared for resolution: its addresses, owner and effective routes.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub name: String,
    /// The name again, shared: the key of the node's entry in shared peer lists.
    pub key: Arc<str>,
    pub node: Arc<Node>,
    /// Whether the slot holds a node (the engine keeps slots of removed nodes).
    pub alive: bool,
    pub addrs: Vec<IpAddr>,
    /// `addrs` formatted (filter form), formatted once.
    addr_text: Vec<Arc<str>>,
    /// The owner's email, for untagged nodes.
    pub email: Option<String>,
    /// The owner's role, for untagged nodes.
    pub role: Option<String>,
    /// Approved (by hand or automatically) and advertised subnet routes, exit routes excluded.
    pub routes: Vec<IpNet>,
    /// Whether the node is an approved exit node.
    pub exit: bool,
    /// The `disable-ipv4` attribute applies: the node has no IPv4 address in the tailnet
    /// and does not use its peers' IPv4 addresses.
    pub no_ipv4: bool,
}

impl NodeInfo {
    /// Whether the node is untagged and owned by a user.
    pub fn is_member(&self) -> bool {
        // `email` is set for untagged nodes only ([`node_info`]): no need to read the record.
        self.alive && self.email.is_some()
    }

    /// The node's addresses as bare strings (filter form).
    #[cfg(test)]
    pub fn addr_strings(&self) -> impl Iterator<Item = String> + '_ {
        self.addr_text.iter().map(|a| a.to_string())
    }

    /// The node's addresses as shared strings (filter form).
    pub fn addr_texts(&self) -> &[Arc<str>] {
        &self.addr_text
    }

    /// Applies `disable-ipv4`: the node keeps its IPv6 address only.
    pub fn drop_ipv4(&mut self) {
        self.no_ipv4 = true;
        self.addrs.retain(IpAddr::is_ipv6);
        self.addr_text = self
            .addrs
            .iter()
            .map(|a| Arc::from(a.to_string()))
            .collect();
    }
}

/// A user's role: as recorded, else `owner` for the user the tailnet is named after and
/// `admin` for everyone else (users of a tailnet without role data are its administrators).
fn effective_role<'a>(u: &'a crate::tailnet::User, tailnet: &Tailnet) -> &'a str {
    match u.role.as_deref() {
        Some(r) => r,
        None if !u.email.is_empty() && u.email == tailnet.settings.name => "owner",
        None => "admin",
    }
}

/// Builds the resolution record of one node (routes and IPv4 use are filled in later).
pub(crate) fn node_info(tailnet: &Tailnet, name: &str, node: &Arc<Node>) -> NodeInfo {
    let (email, role) = if node.is_tagged() {
        (None, None)
    } else {
        match node.user.as_ref().and_then(|u| tailnet.users.get(u)) {
            Some(u) => (
                Some(u.email.clone()),
                Some(effective_role(u, tailnet).to_string()),
            ),
            None => (None, None),
        }
    };
    NodeInfo {
        name: name.to_string(),
        key: Arc::from(name),
        node: Arc::clone(node),
        alive: true,
        addr_text: node.addrs().map(|a| Arc::from(a.to_string())).collect(),
        addrs: node.addrs().collect(),
        email,
        role,
        routes: Vec::new(),
        exit: false,
        no_ipv4: false,
    }
}

fn role_matches(role: Option<&str>, want: &str) -> bool {
    match role {
        Some(x) => x == want || (want == "admin" && x == "owner"),
        None => false,
    }
}

/// What a selector resolves to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// `*` (or `autogroup:danger-all`).
    pub wildcard: bool,
    /// `autogroup:danger-all`.
    pub danger_all: bool,
    /// `autogroup:self`.
    pub self_devices: bool,
    /// `autogroup:internet`.
    pub internet: bool,
    /// Nodes named by identity (user, group, tag, autogroup), by index.
    pub nodes: crate::node_set::NodeSet,
    /// Literal prefixes (IPs, CIDRs, hosts, ipsets).
    pub nets: Vec<IpNet>,
    /// The aliases this set was resolved from (to re-evaluate one node after a change).
    pub aliases: Vec<Alias>,
    /// Nodes must satisfy one of these device postures to be in the set (`srcPosture`);
    /// empty: no posture applies. Addresses and routes are not narrowed by posture.
    pub postures: Arc<[Posture]>,
    /// `*` under a posture: every node that satisfies it, plus every approved subnet route.
    pub all_nodes: bool,
}

impl Resolved {
    /// Whether a node with these posture attributes satisfies the set's posture.
    pub fn posture_ok(&self, attrs: &netmap_policy::PostureAttrs) -> bool {
        self.postures.is_empty() || self.postures.iter().any(|p| p.matches(attrs))
    }

    /// Whether two sets are alike but for their nodes.
    pub fn same_but_nodes(&self, o: &Resolved) -> bool {
        self.same_but_nodes_and_nets(o) && self.nets == o.nets
    }

    /// Whether two sets are alike but for their nodes and their prefixes.
    pub fn same_but_nodes_and_nets(&self, o: &Resolved) -> bool {
        self.wildcard == o.wildcard
            && self.danger_all == o.danger_all
            && self.self_devices == o.self_devices
            && self.internet == o.internet
            && self.all_nodes == o.all_nodes
            && self.postures == o.postures
    }

    pub fn union(&mut self, o: Resolved) {
        self.wildcard |= o.wildcard;
        self.danger_all |= o.danger_all;
        self.self_devices |= o.self_devices;
        self.internet |= o.internet;
        // Merged in bulk (`extend` would insert node by node).
        let mut nodes = o.nodes;
        if self.nodes.is_empty() {
            self.nodes = nodes;
        } else {
            self.nodes.append(&mut nodes);
        }
        self.aliases.extend(o.aliases);
        for n in o.nets {
            if !self.nets.contains(&n) {
                self.nets.push(n);
            }
        }
    }
}

/// Resolution context: the policy, the tailnet and prepared nodes.
pub(crate) struct Resolver {
    pub policy: Arc<Policy>,
    pub tailnet: Tailnet,
    pub nodes: Vec<NodeInfo>,
    /// Untagged live nodes by owner email (the members of a user's devices: a live slot
    /// with an owner and no tags).
    pub by_email: HashMap<String, Vec<usize>>,
    /// Node index by name.
    pub by_name: HashMap<String, usize>,
    /// Targets of `disable-ipv4` node attributes.
    pub v4_off: Vec<Resolved>,
    /// Slots by tag (sorted; dead slots are dropped when their node goes).
    by_tag: HashMap<String, Vec<usize>>,
    /// Per slot, whether it holds a live node (`nodes[i].alive`, kept apart so that scans
    /// over every slot do not read every node record).
    alive: Vec<bool>,
}

impl Resolver {
    pub fn new(policy: Arc<Policy>, tailnet: &Tailnet) -> Resolver {
        let mut nodes = Vec::with_capacity(tailnet.nodes.len());
        for (name, node) in tailnet.nodes.iter() {
            nodes.push(node_info(tailnet, name, node));
        }
        let mut by_email: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_name = HashMap::with_capacity(nodes.len());
        let mut by_tag: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            by_name.insert(n.name.clone(), i);
            for t in &n.node.tags {
                by_tag.entry(t.clone()).or_default().push(i);
            }
            if let (false, Some(e)) = (n.node.is_tagged(), &n.email) {
                by_email.entry(e.clone()).or_default().push(i);
            }
        }
        let alive = nodes.iter().map(|n| n.alive).collect();
        let mut r = Resolver {
            policy,
            tailnet: tailnet.clone(),
            alive,
            nodes,
            by_email,
            by_name,
            v4_off: Vec::new(),
            by_tag,
        };
        r.refresh_v4_targets();
        for i in 0..r.nodes.len() {
            if r.ipv4_disabled(&r.nodes[i]) {
                r.nodes[i].drop_ipv4();
            }
        }
        let approvers = crate::routes::Approvers::new(&r);
        for i in 0..r.nodes.len() {
            let (routes, exit) = crate::routes::effective_routes(&r, &approvers, i);
            r.nodes[i].routes = routes;
            r.nodes[i].exit = exit;
        }
        r
    }

    /// Whether slot `i` holds a live node.
    pub fn is_alive(&self, i: usize) -> bool {
        self.alive.get(i).copied().unwrap_or(false)
    }

    /// The live slots, in slot order.
    pub fn live_slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.alive
            .iter()
            .enumerate()
            .filter(|(_, &a)| a)
            .map(|(i, _)| i)
    }

    /// Resolves one alias.
    pub fn resolve(&self, a: &Alias) -> Resolved {
        let mut nodes = Vec::new();
        let mut r = self.resolve_with(a, &mut |i| {
            if self.is_alive(i) {
                nodes.push(i);
            }
        });
        r.nodes = nodes.into_iter().collect();
        r.aliases = vec![a.clone()];
        r
    }

    /// Whether alias `a` names node `i` by identity (user, group, tag, autogroup), evaluated
    /// for that node alone.
    pub fn alias_names(&self, a: &Alias, i: usize) -> bool {
        self.alias_names_info(a, &self.nodes[i])
    }

    /// [`Resolver::alias_names`] for a node record that need not be in a slot yet.
    fn alias_names_info(&self, a: &Alias, n: &NodeInfo) -> bool {
        if !n.alive {
            return false;
        }
        match a {
            Alias::User(email) => n.is_member() && n.email.as_deref() == Some(email.as_str()),
            Alias::UserDomain(d) => {
                n.is_member()
                    && n.email
                        .as_deref()
                        .and_then(|e| e.rsplit_once('@'))
                        .is_some_and(|(_, ed)| ed == d)
            }
            Alias::Group(g) => {
                n.is_member()
                    && self
                        .policy
                        .groups
                        .get(g)
                        .is_some_and(|m| m.iter().any(|x| Some(x.as_str()) == n.email.as_deref()))
            }
            Alias::Tag(t) => n.node.tags.iter().any(|x| x == t),
            Alias::AutoGroup(g) => match g {
                AutoGroup::Member => n.is_member(),
                AutoGroup::Tagged => n.node.is_tagged(),
                AutoGroup::SelfDevices
                | AutoGroup::Internet
                | AutoGroup::DangerAll
                | AutoGroup::NonRoot
                | AutoGroup::Shared => false,
                role => n.is_member() && role_matches(n.role.as_deref(), role.name()),
            },
            Alias::Wildcard
            | Alias::Host(_)
            | Alias::Prefix(_)
            | Alias::IpSet(_)
            | Alias::Service(_) => false,
        }
    }

    /// Resolves the targets of `disable-ipv4` node attributes (again).
    pub fn refresh_v4_targets(&mut self) {
        let policy = self.policy.clone();
        self.v4_off = policy
            .node_attrs
            .iter()
            .filter(|na| na.attr.iter().any(|a| a == "disable-ipv4"))
            .map(|na| self.resolve_all(na.target.iter().map(|t| &t.value)))
            .collect();
    }

    /// Whether `disableIPv4` or a `disable-ipv4` node attribute applies to a node, judged by
    /// its record (its addresses as assigned).
    pub fn ipv4_disabled(&self, n: &NodeInfo) -> bool {
        self.policy.disable_ipv4
            || (n.alive
                && self.v4_off.iter().any(|t| {
                    t.wildcard
                        || t.aliases.iter().any(|a| self.alias_names_info(a, n))
                        || t.nets
                            .iter()
                            .any(|net| n.node.addrs().any(|a| net.contains(&a)))
                }))
    }

    /// Re-evaluates node `i`'s identity membership in `set`; returns whether it changed.
    pub fn refresh(&self, set: &mut Resolved, i: usize) -> bool {
        let n = &self.nodes[i];
        let named =
            n.alive && (set.all_nodes || set.aliases.iter().any(|a| self.alias_names(a, i)));
        let now = named && set.posture_ok(&n.node.posture);
        if now {
            set.nodes.insert(i)
        } else {
            set.nodes.remove(&i)
        }
    }

    /// Puts a node (new or changed) into its slot, or marks the slot dead (`node` = None).
    /// Routes are not computed here; callers only use this for nodes without routes.
    /// Returns the slot.
    pub fn set_slot(&mut self, tailnet: &Tailnet, name: &str, node: Option<&Arc<Node>>) -> usize {
        let slot = match self.by_name.get(name) {
            Some(&s) => s,
            None => {
                self.nodes.push(NodeInfo {
                    alive: false,
                    ..node_info(tailnet, name, &Arc::default())
                });
                self.by_name.insert(name.to_string(), self.nodes.len() - 1);
                self.alive.push(false);
                self.nodes.len() - 1
            }
        };
        if let Some(e) = self.nodes[slot].email.clone() {
            if let Some(v) = self.by_email.get_mut(&e) {
                v.retain(|&j| j != slot);
            }
        }
        for t in &self.nodes[slot].node.tags {
            if let Some(v) = self.by_tag.get_mut(t) {
                v.retain(|&j| j != slot);
            }
        }
        self.tailnet = tailnet.clone();
        match node {
            Some(node) => {
                let mut info = node_info(tailnet, name, node);
                if self.ipv4_disabled(&info) {
                    info.drop_ipv4();
                }
                if let (false, Some(e)) = (info.node.is_tagged(), &info.email) {
                    self.by_email.entry(e.clone()).or_default().push(slot);
                }
                for t in &info.node.tags {
                    let v = self.by_tag.entry(t.clone()).or_default();
                    let at = v.partition_point(|&j| j < slot);
                    v.insert(at, slot);
                }
                self.nodes[slot] = info;
                self.alive[slot] = true;
            }
            None => {
                self.nodes[slot].alive = false;
                self.alive[slot] = false;
                self.nodes[slot].routes.clear();
                self.nodes[slot].exit = false;
                self.by_name.remove(name);
            }
        }
        slot
    }

    /// Resolves one alias with its live nodes as a bitmap over slots (`words` long); the
    /// returned set's `nodes` stays empty.
    pub fn resolve_bits(&self, a: &Alias, words: usize) -> (Resolved, Vec<u64>) {
        let mut bits = vec![0u64; words];
        let mut r = self.resolve_with(a, &mut |i| {
            if self.is_alive(i) {
                crate::bits::set_bit(&mut bits, i);
            }
        });
        r.aliases = vec![a.clone()];
        (r, bits)
    }

    /// What one alias resolves to but its nodes (`nodes` stays empty): its flags and
    /// prefixes, without visiting a node.
    pub fn resolve_shape(&self, a: &Alias) -> Resolved {
        // Aliases that name nodes and nothing else resolve to an empty shape.
        let nodes_only = match a {
            Alias::User(_) | Alias::UserDomain(_) | Alias::Group(_) | Alias::Tag(_) => true,
            Alias::AutoGroup(g) => !matches!(
                g,
                AutoGroup::SelfDevices
                    | AutoGroup::Internet
                    | AutoGroup::DangerAll
                    | AutoGroup::NonRoot
                    | AutoGroup::Shared
            ),
            _ => false,
        };
        let mut r = if nodes_only {
            Resolved::default()
        } else {
            self.resolve_with(a, &mut |_| {})
        };
        r.aliases = vec![a.clone()];
        r
    }

    /// Resolves one alias, handing each node it names by identity to `node` (dead slots
    /// included; `nodes` of the result stays empty).
    fn resolve_with(&self, a: &Alias, node: &mut dyn FnMut(usize)) -> Resolved {
        let mut r = Resolved::default();
        let mut all = |pred: &dyn Fn(&NodeInfo) -> bool| {
            for (i, n) in self.nodes.iter().enumerate() {
                if pred(n) {
                    node(i);
                }
            }
        };
        match a {
            Alias::Wildcard => r.wildcard = true,
            Alias::User(email) => {
                for &i in self.by_email.get(email.as_str()).into_iter().flatten() {
                    if self.is_alive(i) {
                        node(i);
                    }
                }
            }
            Alias::UserDomain(d) => {
                for (e, v) in &self.by_email {
                    if e.rsplit_once('@').is_some_and(|(_, ed)| ed == d) {
                        for &i in v {
                            if self.is_alive(i) {
                                node(i);
                            }
                        }
                    }
                }
            }
            Alias::Group(g) => {
                for m in self.policy.groups.get(g).into_iter().flat_map(|m| m.iter()) {
                    for &i in self.by_email.get(m.as_str()).into_iter().flatten() {
                        if self.is_alive(i) {
                            node(i);
                        }
                    }
                }
            }
            Alias::Tag(t) => self
                .by_tag
                .get(t)
                .into_iter()
                .flatten()
                .for_each(|&i| node(i)),
            Alias::Host(h) => {
                if let Some(n) = self.policy.hosts.get(h) {
                    r.nets.push(*n);
                }
            }
            Alias::Prefix(p) => r.nets.push(*p),
            Alias::IpSet(name) => {
                r.nets = self.policy.ipsets.get(name).cloned().unwrap_or_default();
            }
            // Services are not part of the tailnet model: they name no node.
            Alias::Service(_) => {}
            Alias::AutoGroup(g) => match g {
                AutoGroup::Member => all(&|n| n.is_member()),
                AutoGroup::Tagged => all(&|n| n.node.is_tagged()),
                AutoGroup::SelfDevices => r.self_devices = true,
                AutoGroup::Internet => r.internet = true,
                AutoGroup::DangerAll => {
                    r.wildcard = true;
                    r.danger_all = true;
                }
                AutoGroup::NonRoot | AutoGroup::Shared => {}
                role => {
                    let want = role.name();
                    all(&|n| n.is_member() && role_matches(n.role.as_deref(), want))
                }
            },
        }
        r
    }

    /// Resolves a list of aliases into one set.
    pub fn resolve_all<'x>(&self, aliases: impl IntoIterator<Item = &'x Alias>) -> Resolved {
        self.resolve_all_memo(aliases, None)
    }

    /// [`Resolver::resolve_all`], taking each alias's set from `memo` (when given) if it
    /// was resolved before, and keeping the ones it resolves there (the rules one policy
    /// edit redefines name the same groups and tags over and over).
    pub fn resolve_all_memo<'x>(
        &self,
        aliases: impl IntoIterator<Item = &'x Alias>,
        mut memo: Option<&mut HashMap<Alias, Resolved>>,
    ) -> Resolved {
        let mut r = Resolved::default();
        for a in aliases {
            let one = match memo.as_deref_mut() {
                None => self.resolve(a),
                Some(memo) => match memo.get(a) {
                    Some(one) => one.clone(),
                    None => {
                        let one = self.resolve(a);
                        memo.insert(a.clone(), one.clone());
                        one
                    }
                },
            };
            r.union(one);
        }
        r
    }

    /// `set`, resolved under `old`, as this resolver's policy resolves it, when the only
    /// aliases of the set the two policies define differently are groups (a member added or
    /// dropped): the devices of the members that differ between a group's two lists are
    /// judged again, and the other nodes kept. `None` when anything else the set names is
    /// defined differently, or the set is narrowed by postures (then it is resolved whole).
    pub fn regroup<'a>(&'a self, set: &Resolved, old: &'a Policy) -> Option<Resolved> {
        if !set.postures.is_empty() {
            return None;
        }
        let new = &*self.policy;
        // Members of the redefined groups that may have joined or left them: between the
        // parts the two lists start and end with alike.
        let mut members: Vec<&str> = Vec::new();
        for a in &set.aliases {
            if !crate::rules::redefined(old, new, a) {
                continue;
            }
            let Alias::Group(g) = a else {
                return None;
            };
            let list = |p: &'a Policy| p.groups.get(g).map_or(&[][..], |v| v.as_slice());
            let (o, n) = (list(old), list(new));
            let same_start = o.iter().zip(n).take_while(|(x, y)| x == y).count();
            let room = o.len().min(n.len()) - same_start;
            let same_end = o
                .iter()
                .rev()
                .zip(n.iter().rev())
                .take(room)
                .take_while(|(x, y)| x == y)
                .count();
            for l in [o, n] {
                let differing = l.get(same_start..l.len() - same_end).unwrap_or_default();
                members.extend(differing.iter().map(String::as_str));
            }
        }
        let mut out = set.clone();
        for m in members {
            for &x in self.by_email.get(m).into_iter().flatten() {
                if self.is_alive(x) && set.aliases.iter().any(|a| self.alias_names(a, x)) {
                    out.nodes.insert(x);
                } else {
                    out.nodes.remove(&x);
                }
            }
        }
        Some(out)
    }

    /// `set` (narrowed by the postures named `postures`) resolved again under this
    /// resolver's policy: patched by [`Resolver::regroup`] from the policy it was resolved
    /// under (`old`, when given) where that can be done, else resolved whole from its
    /// aliases (taking the ones resolved before from `memo`, when given; see
    /// [`Resolver::resolve_all_memo`]).
    pub fn resolve_again(
        &self,
        set: &Resolved,
        postures: &[String],
        old: Option<&Policy>,
        memo: Option<&mut HashMap<Alias, Resolved>>,
    ) -> Resolved {
        let patched = old
            .filter(|_| postures.is_empty())
            .and_then(|o| self.regroup(set, o));
        patched.unwrap_or_else(|| {
            self.with_postures(self.resolve_all_memo(&set.aliases, memo), postures)
        })
    }

    /// Narrows a rule's source set to the nodes satisfying one of the named postures (`*`
    /// becomes those nodes plus every approved route); addresses are not narrowed.
    pub fn with_postures(&self, mut r: Resolved, names: &[String]) -> Resolved {
        let postures: Vec<Posture> = names
            .iter()
            .filter_map(|n| self.policy.postures.get(n).cloned())
            .collect();
        if postures.is_empty() {
            return r;
        }
        r.postures = Arc::from(postures);
        if r.wildcard && !r.danger_all {
            r.wildcard = false;
            r.all_nodes = true;
            r.nodes = self.live_slots().collect();
        }
        let nodes = std::mem::take(&mut r.nodes);
        r.nodes = nodes
            .into_iter()
            .filter(|&i| r.posture_ok(&self.nodes[i].node.posture))
            .collect();
        r
    }

    /// Whether a node is in a resolved source set (by identity, address, or a route it serves).
    pub fn src_contains(&self, r: &Resolved, i: usize) -> bool {
        let n = &self.nodes[i];
        if !n.alive {
            return false;
        }
        if r.wildcard || r.nodes.contains(&i) || (r.all_nodes && !n.routes.is_empty()) {
            return true;
        }
        r.nets.iter().any(|net| {
            n.addrs.iter().any(|a| addr::contains_ip(net, a))
                || n.routes.iter().any(|rt| addr::overlaps(net, rt))
        })
    }

    /// Every approved subnet route in the tailnet (deduplicated, sorted).
    pub fn all_routes(&self) -> Vec<IpNet> {
        let mut v: Vec<IpNet> = self
            .nodes
            .iter()
            .flat_map(|n| n.routes.iter().copied())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The `SrcIPs` strings of a resolved source set.
    pub fn src_strings(&self, r: &Resolved) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        if r.danger_all {
            out.push(Arc::from("*"));
        } else if r.wildcard {
            for s in addr::TAILNET_V4_RANGES {
                out.push(Arc::from(s));
            }
            out.push(Arc::from(addr::TAILNET_V6));
            for rt in self.all_routes() {
                out.push(Arc::from(rt.to_string()));
            }
        } else if r.all_nodes {
            for rt in self.all_routes() {
                out.push(Arc::from(rt.to_string()));
            }
        }
        if !r.danger_all {
            for &i in &r.nodes {
                out.extend(self.nodes[i].addr_text.iter().cloned());
            }
            for n in &r.nets {
                out.push(Arc::from(fmt_net(n)));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
