//! The engine: holds a policy and a tailnet, applies changes, and reports per-node deltas.
//! Snapshots are persistent (O(1) to take) and answer `view(node)` while the engine goes on.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use netmap_policy::Policy;
use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::tailnet::{Node, Tailnet, User};
use crate::wire::NodeView;

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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeDelta {
    /// The node is new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
    /// The node was removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// Peers that appeared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_added: Vec<String>,
    /// Peers that disappeared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<String>,
    /// Peers whose addresses, routes or identity changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_changed: Vec<String>,
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

impl NodeDelta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == NodeDelta::default()
    }
}

/// The nodes a change affected, with what changed for each.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangeSet {
    /// Per affected node.
    pub nodes: BTreeMap<String, NodeDelta>,
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
                let mut a = o.peers.iter().peekable();
                let mut b = n.peers.iter().peekable();
                loop {
                    match (a.peek(), b.peek()) {
                        (Some(x), Some(y)) if x.name == y.name => {
                            if x != y {
                                d.peers_changed.push(y.name.clone());
                            }
                            a.next();
                            b.next();
                        }
                        (Some(x), Some(y)) if x.name < y.name => {
                            d.peers_removed.push(x.name.clone());
                            a.next();
                        }
                        (Some(x), None) => {
                            d.peers_removed.push(x.name.clone());
                            a.next();
                        }
                        (_, Some(y)) => {
                            d.peers_added.push(y.name.clone());
                            b.next();
                        }
                        (None, None) => break,
                    }
                }
            }
            d
        }
    }
}

/// An immutable, cheaply cloned state: policy, tailnet and every node's view.
#[derive(Debug, Clone)]
pub struct Snapshot {
    policy_text: Arc<str>,
    policy: Arc<Policy>,
    tailnet: Tailnet,
    views: OrdMap<String, NodeView>,
}

impl Snapshot {
    /// A node's view.
    pub fn view(&self, node: &str) -> Option<&NodeView> {
        self.views.get(node)
    }

    /// Every view, by node name.
    pub fn views(&self) -> &OrdMap<String, NodeView> {
        &self.views
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
    let policy = netmap_policy::parse_policy(text)?;
    crate::tests_eval::check_policy_for_tailnet(&policy, tailnet)?;
    let report = crate::tests_eval::run_tests(&policy, tailnet);
    if !report.passed() {
        return Err(CoreError::TestsFailed(report));
    }
    Ok(policy)
}

/// The engine. `apply` changes state and returns what changed for whom.
#[derive(Debug, Clone)]
pub struct Engine {
    current: Snapshot,
}

impl Engine {
    /// Builds an engine from a policy text and a tailnet; a rejected policy is an error.
    pub fn new(policy_text: &str, tailnet: Tailnet) -> Result<Engine, CoreError> {
        let policy = load_policy(policy_text, &tailnet)?;
        let mut tailnet = tailnet;
        let computed = crate::build::compute_all(&policy, &tailnet);
        tailnet.primaries = computed.primaries;
        Ok(Engine {
            current: Snapshot {
                policy_text: Arc::from(policy_text),
                policy: Arc::new(policy),
                tailnet,
                views: computed.views.into_iter().collect(),
            },
        })
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
        match change {
            Change::UpsertNode { node, value } => {
                tailnet.assign_dns_name(&node, &value.hostname);
                tailnet.nodes.insert(node, value);
            }
            Change::RemoveNode { node } => {
                if tailnet.nodes.remove(&node).is_none() {
                    return Err(CoreError::NotFound(format!("node {node:?} not found")));
                }
                tailnet.release_dns_name(&node);
            }
            Change::SetOnline { node, online } => match tailnet.nodes.get_mut(&node) {
                Some(n) => n.online = online,
                None => return Err(CoreError::NotFound(format!("node {node:?} not found"))),
            },
            Change::UpsertUser { user } => {
                tailnet.users.insert(user.name.clone(), user);
            }
            Change::RemoveUser { name } => {
                if tailnet.users.remove(&name).is_none() {
                    return Err(CoreError::NotFound(format!("user {name:?} not found")));
                }
            }
            Change::SetPolicy { policy: text } => {
                policy = Arc::new(load_policy(&text, &tailnet)?);
                policy_text = Arc::from(text.as_str());
            }
            Change::ApproveRoutes { node, routes } => match tailnet.nodes.get_mut(&node) {
                Some(n) => n.approved_routes = routes,
                None => return Err(CoreError::NotFound(format!("node {node:?} not found"))),
            },
        }
        let computed = crate::build::compute_all(&policy, &tailnet);
        tailnet.primaries = computed.primaries;
        let views: OrdMap<String, NodeView> = computed.views.into_iter().collect();
        let mut cs = ChangeSet::default();
        for (name, old) in self.current.views.iter() {
            let d = diff_views(Some(old), views.get(name));
            if !d.is_empty() {
                cs.nodes.insert(name.clone(), d);
            }
        }
        for (name, new) in views.iter() {
            if !self.current.views.contains_key(name) {
                cs.nodes.insert(name.clone(), diff_views(None, Some(new)));
            }
        }
        self.current = Snapshot {
            policy_text,
            policy,
            tailnet,
            views,
        };
        Ok(cs)
    }
}
