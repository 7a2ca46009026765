//! The JSON shapes of the control protocol's messages (Go's `tailcfg` field names), limited to
//! the fields netmap sends or reads. Unknown fields are ignored when reading; Go's `null` for
//! an empty list reads as empty.

use std::collections::BTreeMap;
use std::sync::Arc;

use netmap_core::wire::{FilterRule, SshRuleWire};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::keys::{DiscoPublic, MachinePublic, NodePublic};

/// Reads `null` as the default value (Go marshals nil slices and maps as `null`).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// Go's zero `time.Time`, which marks an absent time.
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `GET /key?v=N`: the server's Noise public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyResponse {
    /// The pre-Noise ("nacl box") key; netmap has none and sends the Noise key again.
    #[serde(rename = "legacyPublicKey")]
    pub legacy_public_key: MachinePublic,
    /// The Noise key.
    #[serde(rename = "publicKey")]
    pub public_key: MachinePublic,
}

/// `RegisterRequest.Auth`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAuth {
    /// A pre-auth key.
    #[serde(rename = "AuthKey", default, skip_serializing_if = "String::is_empty")]
    pub auth_key: String,
}

/// `POST /machine/register` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The client's capability version.
    #[serde(rename = "Version", default)]
    pub version: u32,
    /// The node key to register.
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    /// The key being rotated away from (zero when new).
    #[serde(rename = "OldNodeKey", default)]
    pub old_node_key: NodePublic,
    /// Credentials.
    #[serde(rename = "Auth", default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegisterAuth>,
    /// Requested expiry; a time in the past means log out.
    #[serde(rename = "Expiry", default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
    /// Follow-up of an interactive login (unsupported).
    #[serde(rename = "Followup", default, skip_serializing_if = "String::is_empty")]
    pub followup: String,
    /// What the client says about itself (`Hostname`, `OS`, `RoutableIPs`, `RequestTags`…).
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Value>,
    /// The client asked to be ephemeral.
    #[serde(rename = "Ephemeral", default, skip_serializing_if = "is_false")]
    pub ephemeral: bool,
}

/// `RegisterResponse.User`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user's id.
    #[serde(rename = "ID", default)]
    pub id: i64,
    /// Display name.
    #[serde(rename = "DisplayName", default)]
    pub display_name: String,
}

/// `RegisterResponse.Login`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// The login's id.
    #[serde(rename = "ID", default)]
    pub id: i64,
    /// Identity provider.
    #[serde(rename = "Provider", default)]
    pub provider: String,
    /// Login name (an email).
    #[serde(rename = "LoginName", default)]
    pub login_name: String,
    /// Display name.
    #[serde(rename = "DisplayName", default)]
    pub display_name: String,
}

/// `POST /machine/register` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The owner.
    #[serde(rename = "User", default)]
    pub user: User,
    /// The owner's login.
    #[serde(rename = "Login", default)]
    pub login: Login,
    /// The node key must be replaced.
    #[serde(rename = "NodeKeyExpired", default)]
    pub node_key_expired: bool,
    /// The machine may use the tailnet.
    #[serde(rename = "MachineAuthorized", default)]
    pub machine_authorized: bool,
    /// Interactive login URL (netmap never sends one).
    #[serde(rename = "AuthURL", default)]
    pub auth_url: String,
    /// Why registration failed (shown to the user by `tailscale up`).
    #[serde(rename = "Error", default)]
    pub error: String,
}

/// `POST /machine/map` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapRequest {
    /// The client's capability version.
    #[serde(rename = "Version", default)]
    pub version: u32,
    /// `"zstd"` or empty.
    #[serde(rename = "Compress", default, skip_serializing_if = "String::is_empty")]
    pub compress: String,
    /// The client wants keep-alive messages.
    #[serde(rename = "KeepAlive", default, skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    /// Who is asking.
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    /// The node's disco key.
    #[serde(rename = "DiscoKey", default)]
    pub disco_key: DiscoPublic,
    /// Keep the response open and stream updates.
    #[serde(rename = "Stream", default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// What the client says about itself.
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Value>,
    /// The node's UDP endpoints (`ip:port`).
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoints: Vec<String>,
    /// Only an update of endpoints/hostinfo: no map wanted back.
    #[serde(rename = "OmitPeers", default, skip_serializing_if = "is_false")]
    pub omit_peers: bool,
    /// Do not update anything on the server.
    #[serde(rename = "ReadOnly", default, skip_serializing_if = "is_false")]
    pub read_only: bool,
}

/// A node (self or peer) in a MapResponse.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Numeric id (unique in the tailnet).
    #[serde(rename = "ID", default)]
    pub id: i64,
    /// Stable id (netmap: the node's name in the tailnet).
    #[serde(rename = "StableID", default)]
    pub stable_id: String,
    /// MagicDNS FQDN with a trailing dot.
    #[serde(rename = "Name", default)]
    pub name: String,
    /// Owner's user id (the tagged-devices user for tagged nodes).
    #[serde(rename = "User", default)]
    pub user: i64,
    /// WireGuard public key.
    #[serde(rename = "Key", default)]
    pub key: NodePublic,
    /// Machine key.
    #[serde(
        rename = "Machine",
        default,
        skip_serializing_if = "MachinePublic::is_zero"
    )]
    pub machine: MachinePublic,
    /// Disco key.
    #[serde(
        rename = "DiscoKey",
        default,
        skip_serializing_if = "DiscoPublic::is_zero"
    )]
    pub disco_key: DiscoPublic,
    /// Tailscale addresses as prefixes (`100.64.0.1/32`).
    #[serde(rename = "Addresses", default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    /// Prefixes routed to the node.
    #[serde(rename = "AllowedIPs", default, deserialize_with = "nullable")]
    pub allowed_ips: Vec<String>,
    /// UDP endpoints.
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoints: Vec<String>,
    /// Home DERP region (0: none).
    #[serde(rename = "HomeDERP", default, skip_serializing_if = "is_zero_i64")]
    pub home_derp: i64,
    /// What the node says about itself (netmap passes `Hostname` and `OS`).
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Value::is_null")]
    pub hostinfo: Value,
    /// Join time (RFC 3339).
    #[serde(rename = "Created", default, skip_serializing_if = "String::is_empty")]
    pub created: String,
    /// The node's capability version.
    #[serde(rename = "Cap", default, skip_serializing_if = "is_zero_i64")]
    pub cap: i64,
    /// ACL tags.
    #[serde(
        rename = "Tags",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tags: Vec<String>,
    /// Subnet routes the node is primary for.
    #[serde(
        rename = "PrimaryRoutes",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub primary_routes: Vec<String>,
    /// Connected to the control server.
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// The machine is authorized.
    #[serde(
        rename = "MachineAuthorized",
        default,
        skip_serializing_if = "is_false"
    )]
    pub machine_authorized: bool,
    /// Node attributes and capabilities.
    #[serde(rename = "CapMap", default, skip_serializing_if = "Option::is_none")]
    pub cap_map: Option<BTreeMap<String, Option<Vec<Value>>>>,
    /// MagicDNS base name.
    #[serde(
        rename = "ComputedName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub computed_name: String,
    /// `ComputedName`, with the hostname when it differs.
    #[serde(
        rename = "ComputedNameWithHost",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub computed_name_with_host: String,
}

/// A patch of one peer (`PeersChangedPatch`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerChange {
    /// The peer.
    #[serde(rename = "NodeID")]
    pub node_id: i64,
    /// New endpoints.
    #[serde(
        rename = "Endpoints",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoints: Vec<String>,
    /// New node key.
    #[serde(rename = "Key", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<NodePublic>,
    /// New disco key.
    #[serde(rename = "DiscoKey", default, skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<DiscoPublic>,
    /// New online state.
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
}

/// A user profile (`UserProfiles`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    /// The user's id.
    #[serde(rename = "ID")]
    pub id: i64,
    /// Login name (an email).
    #[serde(rename = "LoginName", default)]
    pub login_name: String,
    /// Display name.
    #[serde(rename = "DisplayName", default)]
    pub display_name: String,
}

/// DNS settings (`DNSConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Search domains (the MagicDNS suffix).
    #[serde(
        rename = "Domains",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub domains: Vec<String>,
    /// MagicDNS is on.
    #[serde(rename = "Proxied", default, skip_serializing_if = "is_false")]
    pub proxied: bool,
}

/// SSH policy (`SSHPolicy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshPolicy {
    /// Rules in match order.
    #[serde(rename = "rules", default, deserialize_with = "nullable")]
    pub rules: Arc<Vec<SshRuleWire>>,
}

/// One message of a map stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapResponse {
    /// Only a keep-alive.
    #[serde(rename = "KeepAlive", default, skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    /// The node itself (full; present in the first message and when it changed).
    #[serde(rename = "Node", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    /// DERP map (netmap runs no DERP servers: an empty map, first message only).
    #[serde(rename = "DERPMap", default, skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<Value>,
    /// The whole peer list, replacing the previous one (`Some(empty)` clears it; absent =
    /// unchanged).
    #[serde(rename = "Peers", default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<Node>>,
    /// Peers added or changed (full records).
    #[serde(
        rename = "PeersChanged",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed: Vec<Node>,
    /// Peers removed (ids).
    #[serde(
        rename = "PeersRemoved",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_removed: Vec<i64>,
    /// Small per-peer changes (endpoints, keys, online).
    #[serde(
        rename = "PeersChangedPatch",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed_patch: Vec<PeerChange>,
    /// DNS settings.
    #[serde(rename = "DNSConfig", default, skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<DnsConfig>,
    /// The tailnet's name.
    #[serde(rename = "Domain", default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// The packet filter. Absent = unchanged; an empty list clears it.
    #[serde(
        rename = "PacketFilter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub packet_filter: Option<Arc<Vec<FilterRule>>>,
    /// Profiles of the users of the node and its peers.
    #[serde(
        rename = "UserProfiles",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub user_profiles: Vec<UserProfile>,
    /// SSH policy. Absent = unchanged.
    #[serde(rename = "SSHPolicy", default, skip_serializing_if = "Option::is_none")]
    pub ssh_policy: Option<SshPolicy>,
    /// The server's clock (RFC 3339).
    #[serde(
        rename = "ControlTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub control_time: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_go_nulls_and_writes_explicit_empty_filter() {
        let r: MapRequest = serde_json::from_str(
            r#"{"Version":142,"Compress":"zstd","KeepAlive":true,"NodeKey":"nodekey:0000000000000000000000000000000000000000000000000000000000000001","DiscoKey":"discokey:0000000000000000000000000000000000000000000000000000000000000000","Endpoints":null,"Stream":true,"Hostinfo":{"Hostname":"a"},"Extra":1}"#,
        )
        .unwrap();
        assert!(r.stream && r.endpoints.is_empty() && r.disco_key.is_zero());
        let m = MapResponse {
            packet_filter: Some(Arc::new(Vec::new())),
            ..MapResponse::default()
        };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"PacketFilter":[]}"#);
        let unchanged = MapResponse::default();
        assert_eq!(serde_json::to_string(&unchanged).unwrap(), "{}");
    }
}
