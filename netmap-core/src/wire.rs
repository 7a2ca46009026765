//! Wire shapes of a node's view (tailcfg field names), as `netmap compute` prints them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

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
    pub ip: String,
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

/// A packet filter rule (tailcfg.FilterRule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Source addresses.
    #[serde(rename = "SrcIPs")]
    pub src_ips: Vec<String>,
    /// Destinations (network rules).
    #[serde(rename = "DstPorts", default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<DstPort>,
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
    pub node_ip: String,
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
}

/// An SSH rule (tailcfg.SSHRule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshRuleWire {
    /// Who may connect.
    pub principals: Vec<SshPrincipal>,
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
    pub peers: Vec<Arc<Peer>>,
    /// SSH policy rules, in match order.
    pub ssh_rules: Arc<Vec<SshRuleWire>>,
    /// Node attributes and capabilities.
    pub cap_map: Arc<CapMap>,
}
