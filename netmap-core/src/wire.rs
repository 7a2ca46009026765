//! Wire shapes of a node's view (tailcfg field names), as `netmap compute` prints them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A source list of a filter rule: shared between the nodes that receive the rule, its
/// addresses shared with the nodes they belong to.
pub type SrcList = Arc<Vec<Arc<str>>>;

/// An inclusive port range on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ports {
    /// First port.
    #[serde(rename = "First")]
    pub first: u16,
    /// Last port.
    #[serde(rename = "Last")]
    pub last: u16,
}

/// One destination of a filter rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DstPort {
    /// `*`, an IP, a prefix or a range.
    #[serde(rename = "IP")]
    pub ip: Arc<str>,
    /// Ports.
    #[serde(rename = "Ports")]
    pub ports: Ports,
}

/// Application capabilities granted towards some destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapGrant {
    /// Destination prefixes.
    #[serde(rename = "Dsts")]
    pub dsts: Vec<String>,
    /// Capability name → values (an array, or `null` for a capability without values).
    #[serde(rename = "CapMap")]
    pub cap_map: BTreeMap<String, serde_json::Value>,
}

fn is_empty_list<T>(v: &Arc<Vec<T>>) -> bool {
    v.is_empty()
}

/// A packet filter rule (tailcfg.FilterRule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source addresses (shared between the nodes that receive the rule).
    #[serde(rename = "SrcIPs")]
    pub src_ips: SrcList,
    /// Destinations (network rules).
    #[serde(rename = "DstPorts", default, skip_serializing_if = "is_empty_list")]
    pub dst_ports: Arc<Vec<DstPort>>,
    /// IP protocols; empty = TCP, UDP, ICMP, ICMPv6.
    #[serde(rename = "IPProto", default, skip_serializing_if = "Vec::is_empty")]
    pub ip_proto: Vec<u8>,
    /// Application capability grants.
    #[serde(rename = "CapGrant", default, skip_serializing_if = "Vec::is_empty")]
    pub cap_grant: Vec<CapGrant>,
}

/// A principal of an SSH rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SshPrincipal {
    /// The source node address.
    #[serde(rename = "nodeIP")]
    pub node_ip: Arc<str>,
}

/// The action of an SSH rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SshActionWire {
    /// Accept the session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept: bool,
    /// Hand the decision to the control plane (check mode).
    #[serde(
        rename = "holdAndDelegate",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hold_and_delegate: Option<String>,
    /// Agent forwarding allowed.
    #[serde(
        rename = "allowAgentForwarding",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_agent_forwarding: bool,
    /// Local port forwarding allowed.
    #[serde(
        rename = "allowLocalPortForwarding",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_local_port_forwarding: bool,
    /// Remote port forwarding allowed.
    #[serde(
        rename = "allowRemotePortForwarding",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_remote_port_forwarding: bool,
    /// Session duration in nanoseconds (check mode).
    #[serde(
        rename = "sessionDuration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub session_duration: Option<u64>,
    /// Session recorders (`ip:port`) the destination streams sessions to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorders: Vec<String>,
    /// What to do when recording fails (`enforceRecorder`); absent = carry on unrecorded.
    #[serde(
        rename = "onRecordingFailure",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub on_recording_failure: Option<SshRecorderFailureAction>,
}

/// What an SSH server does when it cannot record a session (tailcfg.SSHRecorderFailureAction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SshRecorderFailureAction {
    /// Refuse a session whose recording cannot start, with this message.
    #[serde(
        rename = "RejectSessionWithMessage",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub reject_session_with_message: String,
    /// End a session whose recording fails midway, with this message.
    #[serde(
        rename = "TerminateSessionWithMessage",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub terminate_session_with_message: String,
}

/// An SSH rule (tailcfg.SSHRule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRuleWire {
    /// Who may connect (shared between the nodes that receive the rule).
    pub principals: Arc<Vec<SshPrincipal>>,
    /// Requested user → local user (`""` denies, `"="` maps to the same name).
    #[serde(rename = "sshUsers")]
    pub ssh_users: BTreeMap<String, String>,
    /// What happens.
    pub action: SshActionWire,
    /// Environment variables the client may send.
    #[serde(rename = "acceptEnv", default, skip_serializing_if = "Vec::is_empty")]
    pub accept_env: Vec<String>,
}

/// A capability map: name → values (`null` when the capability has no values).
pub type CapMap = BTreeMap<String, Option<Vec<serde_json::Value>>>;

/// A peer as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's name.
    pub name: String,
    /// Its Tailscale addresses.
    pub addresses: Vec<String>,
    /// Addresses and routes the node may send to it.
    pub allowed_ips: Vec<String>,
    /// Subnet routes it is primary for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub primary_routes: Vec<String>,
    /// Its tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Its owner's email (untagged peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Everything one node receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Packet filter.
    pub packet_filter: Arc<Vec<FilterRule>>,
    /// Visible peers, sorted by name.
    pub peers: PeerList,
    /// SSH policy rules, in match order.
    pub ssh_rules: Arc<Vec<SshRuleWire>>,
    /// Node attributes and capabilities.
    pub cap_map: Arc<CapMap>,
}

/// A peer list shared by the nodes of a class, keyed by peer name: persistent, so inserting
/// or removing one peer is O(log n) and leaves older snapshots intact.
pub type SharedPeers = Arc<imbl::OrdMap<PeerKey, Arc<Peer>>>;

/// A peer's name as the key of a [`SharedPeers`] list. Lists name a node with one shared
/// allocation, so two keys are compared by address first: comparing two lists (a diff)
/// reads the strings only where their names differ, not at every entry. (Equality of
/// `Arc<str>` already looks at the address first; its order does not, hence `Ord` below.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKey(pub Arc<str>);

impl PartialOrd for PeerKey {
    fn partial_cmp(&self, other: &PeerKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PeerKey {
    fn cmp(&self, other: &PeerKey) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) {
            return std::cmp::Ordering::Equal;
        }
        self.0.cmp(&other.0)
    }
}

impl From<Arc<str>> for PeerKey {
    fn from(name: Arc<str>) -> PeerKey {
        PeerKey(name)
    }
}

impl std::borrow::Borrow<str> for PeerKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A node's peers, sorted by name. Nodes with the same reachability share one list (`shared`);
/// a node's own entry is skipped, and peers only it has or sees its own way (its own devices,
/// the other routers of a prefix it serves) are kept aside in `extra`, where they take the
/// place of the shared entry of the same name. Large tailnets thus do not hold one copy of
/// every peer per node.
#[derive(Debug, Clone, Default)]
pub struct PeerList {
    shared: SharedPeers,
    /// The viewer's own entry in `shared`, if it has one.
    skip: Option<PeerKey>,
    extra: Vec<Arc<Peer>>,
    /// How many names of `extra` the shared list also has.
    overlap: usize,
}

impl PeerList {
    /// A list from a shared sorted list, skipping the viewer's own entry, plus extra peers
    /// (sorted by name) that take the place of shared entries of the same name.
    pub fn new(shared: SharedPeers, own_name: &str, extra: Vec<Arc<Peer>>) -> PeerList {
        let skip = shared.get_key_value(own_name).map(|(k, _)| k.clone());
        let extra: Vec<Arc<Peer>> = extra.into_iter().filter(|p| p.name != own_name).collect();
        let overlap = extra
            .iter()
            .filter(|p| shared.contains_key(p.name.as_str()))
            .count();
        PeerList {
            shared,
            skip,
            extra,
            overlap,
        }
    }

    /// A list that owns its peers (sorted by name).
    pub fn from_vec(peers: Vec<Arc<Peer>>) -> PeerList {
        PeerList {
            shared: Arc::new(
                peers
                    .into_iter()
                    .map(|p| (Arc::from(p.name.as_str()), p))
                    .collect(),
            ),
            skip: None,
            extra: Vec::new(),
            overlap: 0,
        }
    }

    /// The shared part (for cheap comparisons between snapshots).
    pub fn shared(&self) -> &SharedPeers {
        &self.shared
    }

    /// Peers only this node has or sees its own way (they take the place of shared ones).
    pub fn extra(&self) -> &[Arc<Peer>] {
        &self.extra
    }

    /// The peer named `name`, if the list has it.
    pub fn get(&self, name: &str) -> Option<&Arc<Peer>> {
        if self.skip.as_ref().map(|k| &*k.0) == Some(name) {
            return None;
        }
        match self.extra.binary_search_by(|p| p.name.as_str().cmp(name)) {
            Ok(i) => self.extra.get(i),
            Err(_) => self.shared.get(name),
        }
    }

    /// The peers in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> + '_ {
        let mut a = self
            .shared
            .iter()
            .filter(move |(k, _)| Some(*k) != self.skip.as_ref())
            .map(|(_, p)| p)
            .peekable();
        let mut b = self.extra.iter().peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.name.cmp(&y.name) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => None,
        })
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.shared.len() - usize::from(self.skip.is_some()) + self.extra.len() - self.overlap
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for PeerList {
    fn eq(&self, other: &PeerList) -> bool {
        if Arc::ptr_eq(&self.shared, &other.shared)
            && self.skip == other.skip
            && self.extra == other.extra
        {
            return true;
        }
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl Eq for PeerList {}

impl Serialize for PeerList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for PeerList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PeerList, D::Error> {
        let v: Vec<Arc<Peer>> = Vec::deserialize(d)?;
        Ok(PeerList::from_vec(v))
    }
}
