//! Reading the state document (`{"users": [...], "nodes": {name: {...}}, "tailnet": {...}}`,
//! optionally with the history `"dns_names"` and `"primaries"` that `GET .../state` writes):
//! strict about unknown and repeated keys, and naming the node or user whose value is bad.
//! What the values mean is checked afterwards by [`crate::validate_tailnet`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use crate::error::CoreError;
use crate::tailnet::{Node, Tailnet, TailnetSettings, User};

/// How to read a state document.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateOptions<'a> {
    /// Further top-level keys the caller accepts (returned as JSON in
    /// [`StateDocument::extra`]), e.g. the server's `"policy"`.
    pub extra_keys: &'a [&'a str],
    /// Reject documents with more nodes than this, while reading (bounds memory).
    pub max_nodes: Option<usize>,
}

/// A state document as read, before its values are checked.
#[derive(Debug, Clone)]
pub struct StateDocument {
    /// Users, nodes, settings, and MagicDNS names and primaries when the document had them.
    pub tailnet: Tailnet,
    /// The values of [`StateOptions::extra_keys`] that were present.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The top-level keys of a state document.
const KEYS: &str = "users, nodes, tailnet, dns_names, primaries";

/// Strips serde_json's " at line L column C" from an inner error: the outer error gets the
/// position again.
fn bare(e: &impl fmt::Display) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) if s[i..].contains(" column ") => s[..i].to_string(),
        _ => s,
    }
}

struct Users;

impl<'de> Visitor<'de> for Users {
    type Value = Vec<User>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of users")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<User>, A::Error> {
        let mut out: Vec<User> = Vec::new();
        let mut names = HashSet::new();
        loop {
            let i = out.len();
            let u = match seq.next_element::<User>() {
                Ok(Some(u)) => u,
                Ok(None) => break,
                Err(e) => return Err(de::Error::custom(format!("users[{i}]: {}", bare(&e)))),
            };
            if !names.insert(u.name.clone()) {
                return Err(de::Error::custom(format!(
                    "user {:?}: listed twice (users[{i}])",
                    u.name
                )));
            }
            out.push(u);
        }
        Ok(out)
    }
}

struct Nodes {
    max: Option<usize>,
}

impl<'de> Visitor<'de> for Nodes {
    type Value = Vec<(String, Node)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of nodes by name")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        while let Some(name) = m.next_key::<String>()? {
            if self.max.is_some_and(|max| out.len() >= max) {
                return Err(de::Error::custom(format!(
                    "more than {} nodes (the limit per tailnet)",
                    self.max.unwrap_or_default()
                )));
            }
            let node: Node = m
                .next_value()
                .map_err(|e| de::Error::custom(format!("node {name:?}: {}", bare(&e))))?;
            if !names.insert(name.clone()) {
                return Err(de::Error::custom(format!("node {name:?}: listed twice")));
            }
            out.push((name, node));
        }
        Ok(out)
    }
}

impl<'de> DeserializeSeed<'de> for Users {
    type Value = Vec<User>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> DeserializeSeed<'de> for Nodes {
    type Value = Vec<(String, Node)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

#[derive(Default)]
struct Raw {
    users: Vec<User>,
    nodes: Vec<(String, Node)>,
    tailnet: TailnetSettings,
    dns_names: BTreeMap<String, String>,
    primaries: BTreeMap<IpNet, String>,
    extra: serde_json::Map<String, serde_json::Value>,
}

struct Document<'a>(StateOptions<'a>);

impl<'de> Visitor<'de> for Document<'_> {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a state object with users, nodes and tailnet")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Raw, A::Error> {
        let mut raw = Raw::default();
        let mut seen = HashSet::new();
        while let Some(key) = m.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("{key:?} appears twice")));
            }
            let named = |e: A::Error| de::Error::custom(format!("{key}: {}", bare(&e)));
            match key.as_str() {
                "users" => raw.users = m.next_value_seed(Users)?,
                "nodes" => {
                    raw.nodes = m.next_value_seed(Nodes {
                        max: self.0.max_nodes,
                    })?
                }
                "tailnet" => raw.tailnet = m.next_value().map_err(named)?,
                "dns_names" => raw.dns_names = m.next_value().map_err(named)?,
                "primaries" => raw.primaries = m.next_value().map_err(named)?,
                k if self.0.extra_keys.contains(&k) => {
                    let v = m.next_value()?;
                    raw.extra.insert(key, v);
                }
                k => {
                    let mut expected = KEYS.to_string();
                    for e in self.0.extra_keys {
                        expected.push_str(", ");
                        expected.push_str(e);
                    }
                    return Err(de::Error::custom(format!(
                        "unknown top-level field {k:?} (expected {expected})"
                    )));
                }
            }
        }
        Ok(raw)
    }
}

/// Reads a state document (not yet checked: see [`crate::validate_tailnet`]). Users are keyed
/// by name; nodes without a recorded MagicDNS name get one, oldest first.
pub fn read_state(text: &str, opts: StateOptions<'_>) -> Result<StateDocument, CoreError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = de
        .deserialize_map(Document(opts))
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| CoreError::State(e.to_string()))?;
    let mut t = Tailnet {
        settings: raw.tailnet,
        ..Tailnet::default()
    };
    for u in raw.users {
        t.users.insert(u.name.clone(), u);
    }
    for (node, label) in raw.dns_names {
        t.dns_holders.insert(label.clone(), node.clone());
        t.dns_names.insert(node, label);
    }
    for (prefix, node) in raw.primaries {
        t.primaries.insert(prefix, node);
    }
    let mut order = raw.nodes;
    order.sort_by(|(a, x), (b, y)| (x.created_key(), a).cmp(&(y.created_key(), b)));
    for (name, n) in order {
        if !t.dns_names.contains_key(&name) {
            t.assign_dns_name(&name, &n.hostname);
        }
        t.nodes.insert(name, Arc::new(n));
    }
    Ok(StateDocument {
        tailnet: t,
        extra: raw.extra,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn err(text: &str) -> String {
        read_state(text, StateOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn strict_and_named() {
        let e = err(r#"{"nodes": {"web-1": {"tags": ["tag:a"], "ipv4": "8.8.8.888"}}}"#);
        assert!(e.contains("node \"web-1\"") && e.contains("line 1"), "{e}");
        let e = err(r#"{"nodes": {"a": {"tags": ["tag:a"], "colour": "red"}}}"#);
        assert!(e.contains("node \"a\"") && e.contains("colour"), "{e}");
        let e = err(r#"{"users": [{"name": "a"}, {"name": "b", "mail": 1}]}"#);
        assert!(e.contains("users[1]") && e.contains("mail"), "{e}");
        let e = err(r#"{"users": [{"name": "a"}, {"name": "a"}]}"#);
        assert!(e.contains("user \"a\": listed twice"), "{e}");
        let e = err(r#"{"nodes": {"a": {}, "a": {}}}"#);
        assert!(e.contains("node \"a\": listed twice"), "{e}");
        let e = err(r#"{"users": [], "extra": 1}"#);
        assert!(e.contains("unknown top-level field \"extra\""), "{e}");
        let e = err(r#"{"users": [], "users": []}"#);
        assert!(e.contains("appears twice"), "{e}");
        let e = read_state(
            r#"{"nodes": {"a": {}, "b": {}, "c": {}}}"#,
            StateOptions {
                max_nodes: Some(2),
                ..StateOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("more than 2 nodes"), "{e}");
        let d = read_state(
            r#"{"policy": "{}", "nodes": {"a": {"hostname": "x"}}, "dns_names": {"a": "kept"}}"#,
            StateOptions {
                extra_keys: &["policy"],
                ..StateOptions::default()
            },
        )
        .unwrap();
        assert_eq!(d.extra["policy"], "{}");
        assert_eq!(
            d.tailnet.dns_names.get("a").map(String::as_str),
            Some("kept")
        );
    }
}
