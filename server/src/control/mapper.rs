//! A node's view in tailcfg form: the self node, peers with keys and endpoints, the packet
//! filter, SSH policy, user profiles and DNS settings.
//!
//! Node ids are derived from the tailnet and node name (the first 52 bits of a SHA-256, so
//! they survive restarts without a table and fit a JSON number). Nodes created through the
//! JSON API have no WireGuard key: they get a placeholder key derived the same way, so that
//! clients list them (they cannot reach them).

use std::collections::BTreeMap;
use std::sync::Arc;

use netmap_control::keys::NodePublic;
use netmap_control::tailcfg::{self, DnsConfig, MapResponse, SshPolicy, UserProfile};
use netmap_core::wire::{NodeView, Peer};
use netmap_core::Snapshot;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::state::{Control, Machine};

/// User id of tagged nodes (Tailscale's "tagged-devices" pseudo-user).
pub const TAGGED_USER_ID: i64 = (1 << 52) + 1;

fn digest(kind: &str, tailnet: &str, node: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(tailnet.as_bytes());
    h.update([0]);
    h.update(node.as_bytes());
    h.finalize().into()
}

/// The numeric id of a node (stable across restarts; never 0).
pub fn node_id(tailnet: &str, node: &str) -> i64 {
    let d = digest("netmap node id", tailnet, node);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    let v = u64::from_be_bytes(b) & ((1 << 52) - 1);
    i64::try_from(v).unwrap_or(0) + 1
}

/// The placeholder key of a node that no client registered.
pub fn placeholder_key(tailnet: &str, node: &str) -> NodePublic {
    NodePublic(digest("netmap placeholder node key", tailnet, node))
}

/// Lower case `[a-z0-9-]`, like a DNS label.
pub fn label(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= 63 {
            break;
        }
    }
    let t = out.trim_matches('-');
    if t.is_empty() {
        "node".into()
    } else {
        t.to_string()
    }
}

/// The MagicDNS suffix of a tailnet: `TAILNET.netmap.internal`.
pub fn dns_suffix(tailnet: &str) -> String {
    format!("{}.netmap.internal", label(tailnet))
}

/// What building a map needs.
pub struct MapCtx<'a> {
    /// Control state (keys, endpoints).
    pub ctl: &'a Control,
    /// The tailnet's name.
    pub tailnet: &'a str,
    /// The state to read.
    pub snap: &'a Snapshot,
}

impl MapCtx<'_> {
    fn base_node(
        &self,
        name: &str,
        addresses: &[String],
        allowed: &[String],
    ) -> Option<tailcfg::Node> {
        let t = self.snap.tailnet();
        let n = t.nodes.get(name)?;
        let m: Option<Arc<Machine>> = self.ctl.machine_of(self.tailnet, name, self.snap);
        let user = match &n.user {
            Some(u) if n.tags.is_empty() => t
                .users
                .get(u)
                .map_or(0, |u| i64::try_from(u.id).unwrap_or(0)),
            _ => TAGGED_USER_ID,
        };
        let dns = self
            .snap
            .dns_name(name)
            .map_or_else(|| label(&n.hostname), str::to_string);
        let suffix = dns_suffix(self.tailnet);
        let mut hostinfo = json!({"Hostname": n.hostname});
        if let Some(os) = m
            .as_ref()
            .and_then(|m| m.data.hostinfo.get("OS"))
            .filter(|v| v.is_string())
        {
            hostinfo["OS"] = os.clone();
        }
        Some(tailcfg::Node {
            id: node_id(self.tailnet, name),
            stable_id: name.to_string(),
            name: format!("{dns}.{suffix}."),
            user,
            key: m
                .as_ref()
                .map_or_else(|| placeholder_key(self.tailnet, name), |m| m.node_key),
            machine: m.as_ref().map(|m| m.machine_key).unwrap_or_default(),
            disco_key: m.as_ref().map(|m| m.data.disco_key).unwrap_or_default(),
            addresses: addresses.iter().map(|a| host_prefix(a)).collect(),
            allowed_ips: allowed.iter().map(|a| host_prefix(a)).collect(),
            endpoints: m
                .as_ref()
                .map(|m| m.data.endpoints.clone())
                .unwrap_or_default(),
            home_derp: 0,
            hostinfo,
            created: n.created.clone(),
            cap: m.as_ref().map_or(0, |m| m.data.cap),
            tags: n.tags.clone(),
            primary_routes: Vec::new(),
            online: Some(n.online),
            machine_authorized: true,
            cap_map: None,
            computed_name: dns.clone(),
            computed_name_with_host: if dns == n.hostname {
                dns
            } else {
                format!("{dns} ({})", n.hostname)
            },
        })
    }

    /// A peer as the viewer sees it.
    pub fn peer(&self, p: &Peer) -> Option<tailcfg::Node> {
        let mut node = self.base_node(&p.name, &p.addresses, &p.allowed_ips)?;
        node.primary_routes = p.primary_routes.clone();
        Some(node)
    }

    /// The viewer itself.
    pub fn self_node(&self, name: &str, view: &NodeView) -> Option<tailcfg::Node> {
        let n = self.snap.tailnet().nodes.get(name)?;
        let addrs: Vec<String> = n.addrs().map(|a| a.to_string()).collect();
        let mut node = self.base_node(name, &addrs, &addrs)?;
        node.primary_routes = self
            .snap
            .tailnet()
            .primaries
            .iter()
            .filter(|(_, k)| k.as_str() == name)
            .map(|(p, _)| p.to_string())
            .collect();
        node.allowed_ips.extend(node.primary_routes.iter().cloned());
        node.cap_map = Some(
            view.cap_map
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<String, Option<Vec<Value>>>>(),
        );
        Some(node)
    }

    /// Profiles of the given nodes' owners (and the tagged-devices user when one is tagged).
    pub fn profiles<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<UserProfile> {
        let t = self.snap.tailnet();
        let mut out: BTreeMap<i64, UserProfile> = BTreeMap::new();
        for name in names {
            let Some(n) = t.nodes.get(name) else { continue };
            match n.user.as_ref().and_then(|u| t.users.get(u)) {
                Some(u) if n.tags.is_empty() => {
                    let id = i64::try_from(u.id).unwrap_or(0);
                    out.entry(id).or_insert_with(|| UserProfile {
                        id,
                        login_name: u.email.clone(),
                        display_name: u.name.clone(),
                    });
                }
                _ => {
                    out.entry(TAGGED_USER_ID).or_insert_with(|| UserProfile {
                        id: TAGGED_USER_ID,
                        login_name: "tagged-devices".into(),
                        display_name: "Tagged Devices".into(),
                    });
                }
            }
        }
        out.into_values().collect()
    }

    /// The whole map of node `name` (first message of a stream, and after a resync).
    pub fn full(&self, name: &str, view: &NodeView, first: bool) -> Option<MapResponse> {
        let self_node = self.self_node(name, view)?;
        let peers: Vec<tailcfg::Node> = view.peers.iter().filter_map(|p| self.peer(p)).collect();
        let profiles =
            self.profiles(std::iter::once(name).chain(view.peers.iter().map(|p| p.name.as_str())));
        Some(MapResponse {
            node: Some(self_node),
            derp_map: first.then(|| json!({"Regions": {}})),
            peers: Some(peers),
            dns_config: Some(DnsConfig {
                domains: vec![dns_suffix(self.tailnet)],
                proxied: true,
            }),
            domain: self.snap.tailnet().settings.name.clone(),
            packet_filter: Some(view.packet_filter.clone()),
            user_profiles: profiles,
            ssh_policy: Some(SshPolicy {
                rules: view.ssh_rules.clone(),
            }),
            control_time: Some(crate::serve::tailnets::now_rfc3339()),
            ..MapResponse::default()
        })
    }
}

/// `100.64.0.1` → `100.64.0.1/32`; prefixes stay as they are.
fn host_prefix(a: &str) -> String {
    if a.contains('/') {
        a.to_string()
    } else if a.contains(':') {
        format!("{a}/128")
    } else {
        format!("{a}/32")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_distinct_and_json_safe() {
        let a = node_id("t", "a");
        assert_eq!(a, node_id("t", "a"));
        assert_ne!(a, node_id("t", "b"));
        assert_ne!(a, node_id("u", "a"));
        assert!(a > 0 && a <= (1 << 52));
        assert_ne!(placeholder_key("t", "a"), placeholder_key("t", "b"));
        assert_eq!(label("Bob's MacBook_Pro"), "bob-s-macbook-pro");
        assert_eq!(label("--"), "node");
        assert_eq!(dns_suffix("acme"), "acme.netmap.internal");
        assert_eq!(host_prefix("fd7a::1"), "fd7a::1/128");
        assert_eq!(host_prefix("10.0.0.0/8"), "10.0.0.0/8");
    }
}
