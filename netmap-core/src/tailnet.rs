//! The tailnet model: users, nodes, routes, and the history-dependent decisions
//! (primary routers) carried with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::CoreError;
pub use netmap_policy::PostureValue;

/// A user of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Numeric id.
    #[serde(default)]
    pub id: u64,
    /// Login name (what nodes refer to).
    pub name: String,
    /// Email (what policies refer to).
    #[serde(default)]
    pub email: String,
    /// Role in the tailnet (`owner`, `admin`, `network-admin`, `it-admin`, `billing-admin`,
    /// `auditor`, `member`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A node (device) of the tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Hostname the device reported.
    #[serde(default)]
    pub hostname: String,
    /// Owning user's name; `None` for tagged nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// ACL tags.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// Tailscale IPv4 address.
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    /// Tailscale IPv6 address.
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// Routes the node advertises.
    #[serde(default, deserialize_with = "null_as_default")]
    pub routable_ips: Vec<IpNet>,
    /// Routes approved by hand.
    #[serde(default, deserialize_with = "null_as_default")]
    pub approved_routes: Vec<IpNet>,
    /// When the node joined (RFC 3339).
    #[serde(default, deserialize_with = "null_as_default")]
    pub created: String,
    /// Whether the node is connected.
    #[serde(default = "default_true")]
    pub online: bool,
    /// Device posture attributes (`node:os`, `node:osVersion`, `node:tsVersion`,
    /// `node:tsReleaseTrack`, `node:tsAutoUpdate`, `custom:…`, …), which the policy's
    /// `postures` test. An attribute the node lacks fails every posture condition on it but
    /// `NOT SET`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub posture: BTreeMap<String, PostureValue>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn default_true() -> bool {
    true
}

impl Node {
    /// The node's Tailscale addresses (IPv4 first).
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }

    /// Whether the node carries ACL tags (tagged nodes have no user identity).
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }

    /// `created` as (seconds, nanoseconds) since the epoch, for ordering; unparsable sorts last.
    pub fn created_key(&self) -> (i64, u32) {
        parse_rfc3339(&self.created).unwrap_or((i64::MAX, 0))
    }
}

/// Tailnet-wide settings from the state file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TailnetSettings {
    /// The tailnet's name; its domain is the one `user:*@domain` may name.
    #[serde(default)]
    pub name: String,
    /// Everything else, kept as written.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl TailnetSettings {
    /// The tailnet's email domain (from its name), if any.
    pub fn domain(&self) -> Option<&str> {
        match self.name.rsplit_once('@') {
            Some((_, d)) => Some(d),
            None if self.name.contains('.') => Some(&self.name),
            None => None,
        }
    }
}

/// The state of a tailnet: users and nodes in persistent maps (cloning is O(1)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tailnet {
    /// Users by name.
    pub users: OrdMap<String, User>,
    /// Nodes by their (unique) name.
    pub nodes: OrdMap<String, Arc<Node>>,
    /// Settings.
    pub settings: TailnetSettings,
    /// Current primary router per subnet prefix (history: kept while healthy).
    pub primaries: OrdMap<IpNet, String>,
    /// MagicDNS name per node (history: a `-N` suffix stays with the node that got it).
    pub dns_names: OrdMap<String, String>,
    /// The reverse of `dns_names`: which node holds a name.
    pub dns_holders: OrdMap<String, String>,
}

impl Tailnet {
    /// Reads the corpus state shape `{"users": [...], "nodes": {name: {...}}, "tailnet": {...}}`
    /// (optionally with the `dns_names` and `primaries` history) and checks it with
    /// [`crate::validate_tailnet`]: a bad value is an error naming the node or user, the field
    /// and the value.
    pub fn from_state_json(text: &str) -> Result<Tailnet, CoreError> {
        let doc = crate::state_file::read_state(text, crate::StateOptions::default())?;
        crate::validate::validate_tailnet(&doc.tailnet)?;
        Ok(doc.tailnet)
    }

    /// Gives node `key` a unique MagicDNS label derived from `hostname`; keeps its current name
    /// when that is still derived from the same hostname. Returns the name.
    pub fn assign_dns_name(&mut self, key: &str, hostname: &str) -> String {
        let base = dns_label(if hostname.is_empty() { key } else { hostname });
        if let Some(cur) = self.dns_names.get(key) {
            if cur == &base
                || cur
                    .strip_prefix(&format!("{base}-"))
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            {
                return cur.clone();
            }
        }
        let taken = |n: &str| self.dns_holders.get(n).is_some_and(|k| k != key);
        let mut name = base.clone();
        let mut i = 1;
        while taken(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        if let Some(old) = self.dns_names.insert(key.to_string(), name.clone()) {
            self.dns_holders.remove(&old);
        }
        self.dns_holders.insert(name.clone(), key.to_string());
        name
    }

    /// Forgets a removed node's name (it becomes free for others; holders keep theirs).
    pub fn release_dns_name(&mut self, key: &str) {
        if let Some(old) = self.dns_names.remove(key) {
            self.dns_holders.remove(&old);
        }
    }

    /// Finds a user by email.
    pub fn user_by_email(&self, email: &str) -> Option<&User> {
        self.users.values().find(|u| u.email == email)
    }
}

/// Cleans a hostname into a DNS label: lower case, `[a-z0-9-]`, at most 63 characters.
pub fn dns_label(hostname: &str) -> String {
    let mut out = String::new();
    for c in hostname.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 63 {
            break;
        }
    }
    let trimmed = out.trim_matches('-').to_string();
    if trimmed.is_empty() {
        "node".to_string()
    } else {
        trimmed
    }
}

/// Formats seconds (and nanoseconds) since the Unix epoch as RFC 3339 in UTC; the inverse of
/// [`parse_rfc3339`]. Nanoseconds are written (9 digits) only when non-zero. Times outside the
/// years -9999..=9999 are clamped to that range.
pub fn format_rfc3339(secs: i64, nanos: u32) -> String {
    use time::OffsetDateTime;
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(if secs < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    });
    let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
    let (h, m, s) = (t.hour(), t.minute(), t.second());
    let nanos = nanos.min(999_999_999);
    if nanos == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
    }
}

/// Parses an RFC 3339 timestamp (`2025-01-06T09:00:00Z`, `...09:00:00.5+01:00`) into (seconds
/// since the epoch, nanoseconds); `None` when it is not one (no offset, impossible dates or
/// times such as `9999-99-99T99:99:99Z`).
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp(), t.nanosecond()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_are_unique_and_stable() {
        let mut t = Tailnet::default();
        assert_eq!(t.assign_dns_name("a", "My Laptop"), "my-laptop");
        assert_eq!(t.assign_dns_name("b", "my-laptop"), "my-laptop-1");
        assert_eq!(t.assign_dns_name("c", "my laptop"), "my-laptop-2");
        t.release_dns_name("a");
        // b keeps its -1 when a goes away.
        assert_eq!(t.assign_dns_name("b", "my-laptop"), "my-laptop-1");
        assert_eq!(t.assign_dns_name("d", "my-laptop"), "my-laptop");
        // Renaming c's host gives it a fresh name.
        assert_eq!(t.assign_dns_name("c", "server"), "server");
        assert_eq!(dns_label("--x__y--"), "x-y");
    }

    #[test]
    fn rfc3339_orders() {
        let a = parse_rfc3339("2026-04-10T15:15:53.464877073Z").unwrap();
        let b = parse_rfc3339("2026-04-10T15:15:53.5Z").unwrap();
        assert!(a < b);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some((0, 0)));
        assert!(parse_rfc3339("nope").is_none());
        for bad in [
            "9999-99-99T99:99:99Z",
            "2025-02-30T00:00:00Z",
            "2025-01-06T24:00:00Z",
            "2025-01-06T09:00:00",
            "yesterday",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
        assert_eq!(format_rfc3339(i64::MAX, 0), "9999-12-31T23:59:59Z");
        for (secs, nanos) in [(0, 0), (1_776_000_000, 464_877_073), (951_782_400, 0)] {
            assert_eq!(
                parse_rfc3339(&format_rfc3339(secs, nanos)),
                Some((secs, nanos))
            );
        }
        assert_eq!(format_rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
    }
}
