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

#[derive(Deserialize)]
struct StateFile {
    #[serde(default)]
    users: Vec<User>,
    #[serde(default)]
    nodes: BTreeMap<String, Node>,
    #[serde(default)]
    tailnet: TailnetSettings,
}

impl Tailnet {
    /// Reads the corpus state shape `{"users": [...], "nodes": {name: {...}}, "tailnet": {...}}`.
    pub fn from_state_json(text: &str) -> Result<Tailnet, CoreError> {
        let st: StateFile =
            serde_json::from_str(text).map_err(|e| CoreError::State(e.to_string()))?;
        let mut t = Tailnet {
            settings: st.tailnet,
            ..Tailnet::default()
        };
        for u in st.users {
            t.users.insert(u.name.clone(), u);
        }
        let mut order: Vec<(String, Node)> = st.nodes.into_iter().collect();
        order.sort_by_key(|(name, n)| (n.created_key(), name.clone()));
        for (name, n) in order {
            t.assign_dns_name(&name, &n.hostname);
            t.nodes.insert(name, Arc::new(n));
        }
        Ok(t)
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
/// [`parse_rfc3339`]. Nanoseconds are written only when non-zero.
pub fn format_rfc3339(secs: i64, nanos: u32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3_600, rem / 60 % 60, rem % 60);
    if nanos == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
    }
}

/// Parses an RFC 3339 timestamp into (seconds since epoch, nanoseconds).
pub fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = s.get(start..i)?;
        let padded: String = frac.chars().chain("000000000".chars()).take(9).collect();
        nanos = padded.parse().ok()?;
    }
    let offset = match s.get(i..)? {
        "Z" | "z" | "" => 0,
        tz => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let oh: i64 = tz.get(1..3)?.parse().ok()?;
            let om: i64 = tz.get(4..6)?.parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset, nanos))
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
        for (secs, nanos) in [(0, 0), (1_776_000_000, 464_877_073), (951_782_400, 0)] {
            assert_eq!(
                parse_rfc3339(&format_rfc3339(secs, nanos)),
                Some((secs, nanos))
            );
        }
        assert_eq!(format_rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
    }
}
