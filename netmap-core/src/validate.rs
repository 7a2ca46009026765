//! The one validator of tailnet state. Every entry point — state files read by the CLI, the
//! server's node/user `PUT` and `PATCH`, and its bulk import — goes through [`StateIndex`], so
//! they all accept exactly the same things. Errors name the node or user, the field and the
//! value ([`StateError`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use imbl::OrdMap;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::tailnet::{
    dns_label, parse_rfc3339, Node, PostureValue, Tailnet, TailnetSettings, User,
};

/// What a [`StateError`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A node, by its name (key).
    Node(String),
    /// A user, by name.
    User(String),
    /// The tailnet's settings or the document as a whole.
    Tailnet,
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Node(n) => write!(f, "node {}", quoted(n)),
            Subject::User(u) => write!(f, "user {}", quoted(u)),
            Subject::Tailnet => f.write_str("tailnet"),
        }
    }
}

/// How a [`StateError`] is best answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateErrorKind {
    /// The value is invalid on its own.
    Invalid,
    /// The value collides with another node or user (an address, a user id or email in use).
    Conflict,
    /// A size limit (nodes per tailnet, routes or tags per node) is exceeded.
    Limit,
}

/// Why a piece of tailnet state was rejected: the node or user, the field, the value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct StateError {
    /// The node, user or tailnet.
    pub subject: Subject,
    /// The field (`ipv4`, `tags[1]`, `routable_ips[0]`, ...).
    pub field: String,
    /// The offending value as JSON (shortened when long); empty when the field is missing.
    pub value: String,
    /// Why it is rejected.
    pub reason: String,
    /// Invalid, conflicting or over a limit.
    pub kind: StateErrorKind,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}: {}", self.subject, self.field, self.reason)
        } else {
            write!(
                f,
                "{}: {} {}: {}",
                self.subject, self.field, self.value, self.reason
            )
        }
    }
}

/// A string as a JSON string literal (control characters escaped), at most ~100 characters.
fn quoted(s: &str) -> String {
    const MAX: usize = 100;
    if s.len() <= MAX {
        return serde_json::to_string(s).unwrap_or_default();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let short = serde_json::to_string(&s[..end]).unwrap_or_default();
    format!("{short}… ({} bytes)", s.len())
}

fn shown(v: impl fmt::Display) -> String {
    quoted(&v.to_string())
}

/// Most tags one node may carry.
pub const MAX_TAGS: usize = 256;
/// Most routes in one node's `routable_ips` or `approved_routes`.
pub const MAX_ROUTES: usize = 4096;
/// Most posture attributes one node may carry.
pub const MAX_POSTURE: usize = 256;

/// The roles a user may have.
pub const ROLES: [&str; 7] = [
    "owner",
    "admin",
    "network-admin",
    "it-admin",
    "billing-admin",
    "auditor",
    "member",
];

/// Whether a tailnet, node or user name is acceptable (in URL paths, the store and state files):
/// 1–128 of `A-Z a-z 0-9 - _ . @ +`, and not `.` or `..`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'))
}

/// What a valid name looks like, for error messages.
pub const NAME_RULE: &str = "use 1-128 characters of A-Z a-z 0-9 - _ . @ + (not \".\" or \"..\")";

/// `tag:` then a letter, then letters, digits, `-` or `_` (the policy language's rule).
fn valid_tag(tag: &str) -> bool {
    let Some(name) = tag.strip_prefix("tag:") else {
        return false;
    };
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether an email is acceptable: empty (unknown), or `local@domain` with both parts non-empty,
/// at most 320 bytes, without whitespace or control characters.
fn email_problem(email: &str) -> Option<&'static str> {
    if email.is_empty() {
        return None;
    }
    if email.len() > 320 {
        return Some("longer than 320 bytes");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains whitespace or control characters");
    }
    match email.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => None,
        _ => Some("is not an email address (LOCAL@DOMAIN)"),
    }
}

/// A domain as tailnet settings name it: empty (none), or at most 253 bytes without whitespace
/// or control characters, and not `.` / `..`.
fn domain_problem(d: &str) -> Option<&'static str> {
    if d.is_empty() {
        return None;
    }
    if d.len() > 253 {
        return Some("longer than 253 bytes");
    }
    if d.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains whitespace or control characters");
    }
    if d.trim_matches('.').is_empty() || d.starts_with('@') || d.ends_with('@') {
        return Some("is not a domain");
    }
    None
}

fn v4net(a: [u8; 4], len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(a), len).unwrap_or_default()
}

fn v6net(a: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = a;
    Ipv6Net::new(Ipv6Addr::new(a, b, c, d, e, f, g, h), len).unwrap_or_default()
}

/// The tailnet's IPv4 range.
fn cgnat() -> Ipv4Net {
    v4net([100, 64, 0, 0], 10)
}

/// The tailnet's IPv6 range.
fn ula() -> Ipv6Net {
    v6net([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0], 48)
}

/// 4via6 subnet routes live here, inside the tailnet's IPv6 range.
fn via6() -> Ipv6Net {
    v6net([0xfd7a, 0x115c, 0xa1e0, 0xb1a, 0, 0, 0, 0], 64)
}

fn ipv4_problem(a: Ipv4Addr) -> Option<&'static str> {
    let cg = cgnat();
    if !cg.contains(&a) {
        return Some("not in the tailnet range 100.64.0.0/10");
    }
    if a == cg.network() || a == cg.broadcast() {
        return Some("the network or broadcast address of 100.64.0.0/10");
    }
    if v4net([100, 100, 100, 0], 24).contains(&a) {
        return Some("reserved for Tailscale's own services (100.100.100.0/24)");
    }
    if v4net([100, 115, 92, 0], 23).contains(&a) {
        return Some("reserved (100.115.92.0/23 is not part of the tailnet range)");
    }
    None
}

fn ipv6_problem(a: Ipv6Addr) -> Option<&'static str> {
    let u = ula();
    if !u.contains(&a) {
        return Some("not in the tailnet range fd7a:115c:a1e0::/48");
    }
    if a == u.network() {
        return Some("the network address of fd7a:115c:a1e0::/48");
    }
    if via6().contains(&a) {
        return Some("inside the 4via6 range fd7a:115c:a1e0:b1a::/64");
    }
    None
}

fn route_problem(r: &IpNet) -> Option<String> {
    if r.trunc() != *r {
        return Some(format!("has host bits set (did you mean {}?)", r.trunc()));
    }
    if r.prefix_len() == 0 {
        return None; // an exit route
    }
    match r {
        IpNet::V4(n) => {
            let cg = cgnat();
            (cg.contains(n) || n.contains(&cg))
                .then(|| "overlaps the tailnet range 100.64.0.0/10".to_string())
        }
        IpNet::V6(n) => {
            let u = ula();
            let overlaps = u.contains(n) || n.contains(&u);
            (overlaps && !via6().contains(n)).then(|| {
                "overlaps the tailnet range fd7a:115c:a1e0::/48 (only 4via6 routes in \
                 fd7a:115c:a1e0:b1a::/64 may)"
                    .to_string()
            })
        }
    }
}

/// `namespace:key` with a letter-only namespace and a key of letters, digits, `_ . -`.
fn posture_key_ok(k: &str) -> bool {
    let Some((ns, key)) = k.split_once(':') else {
        return false;
    };
    k.len() <= 128
        && !ns.is_empty()
        && ns.chars().all(|c| c.is_ascii_alphabetic())
        && !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Builds errors about one subject.
struct Reporter(Subject);

impl Reporter {
    fn err(
        &self,
        kind: StateErrorKind,
        field: &str,
        value: String,
        reason: impl Into<String>,
    ) -> StateError {
        StateError {
            subject: self.0.clone(),
            field: field.to_string(),
            value,
            reason: reason.into(),
            kind,
        }
    }

    fn invalid(&self, field: &str, value: String, reason: impl Into<String>) -> StateError {
        self.err(StateErrorKind::Invalid, field, value, reason)
    }
}

/// Checks a node on its own (without looking at other nodes or users).
fn check_node_alone(name: &str, n: &Node, ipv6_only: bool) -> Result<(), StateError> {
    let r = Reporter(Subject::Node(name.to_string()));
    if !valid_name(name) {
        return Err(r.invalid("name", quoted(name), NAME_RULE));
    }
    if n.hostname.len() > 255 {
        return Err(r.invalid("hostname", quoted(&n.hostname), "longer than 255 bytes"));
    }
    if n.hostname.chars().any(char::is_control) {
        return Err(r.invalid(
            "hostname",
            quoted(&n.hostname),
            "contains control characters",
        ));
    }
    match (&n.user, n.tags.is_empty()) {
        (Some(u), false) => {
            return Err(r.invalid(
                "user",
                quoted(u),
                "a tagged node has no user: give either user or tags",
            ))
        }
        (None, true) => {
            return Err(r.invalid(
                "user",
                String::new(),
                "a node needs a user or at least one tag",
            ))
        }
        (Some(u), true) if u.is_empty() => {
            return Err(r.invalid("user", quoted(u), "empty user name"))
        }
        _ => {}
    }
    if n.tags.len() > MAX_TAGS {
        return Err(r.err(
            StateErrorKind::Limit,
            "tags",
            format!("({} tags)", n.tags.len()),
            format!("at most {MAX_TAGS} tags"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, t) in n.tags.iter().enumerate() {
        if !valid_tag(t) {
            return Err(r.invalid(
                &format!("tags[{i}]"),
                quoted(t),
                "must look like \"tag:NAME\" (a letter, then letters, digits, - or _)",
            ));
        }
        if !seen.insert(t.as_str()) {
            return Err(r.invalid(&format!("tags[{i}]"), quoted(t), "listed twice"));
        }
    }
    if n.ipv4.is_none() && n.ipv6.is_none() {
        return Err(r.invalid(
            "ipv4/ipv6",
            String::new(),
            "a node needs at least one address",
        ));
    }
    if let Some(a) = n.ipv4 {
        if ipv6_only {
            return Err(r.invalid("ipv4", shown(a), "this tailnet is IPv6-only"));
        }
        if let Some(why) = ipv4_problem(a) {
            return Err(r.invalid("ipv4", shown(a), why));
        }
    }
    if let Some(a) = n.ipv6 {
        if let Some(why) = ipv6_problem(a) {
            return Err(r.invalid("ipv6", shown(a), why));
        }
    }
    for (field, routes) in [
        ("routable_ips", &n.routable_ips),
        ("approved_routes", &n.approved_routes),
    ] {
        if routes.len() > MAX_ROUTES {
            return Err(r.err(
                StateErrorKind::Limit,
                field,
                format!("({} routes)", routes.len()),
                format!("at most {MAX_ROUTES} routes"),
            ));
        }
        for (i, route) in routes.iter().enumerate() {
            if let Some(why) = route_problem(route) {
                return Err(r.invalid(&format!("{field}[{i}]"), shown(route), why));
            }
        }
    }
    if !n.created.is_empty() && parse_rfc3339(&n.created).is_none() {
        return Err(r.invalid(
            "created",
            quoted(&n.created),
            "not an RFC 3339 time (like 2025-01-06T09:00:00Z)",
        ));
    }
    if n.posture.len() > MAX_POSTURE {
        return Err(r.err(
            StateErrorKind::Limit,
            "posture",
            format!("({} attributes)", n.posture.len()),
            format!("at most {MAX_POSTURE} attributes"),
        ));
    }
    for (k, v) in &n.posture {
        if !posture_key_ok(k) {
            return Err(r.invalid(
                "posture",
                quoted(k),
                "attribute names look like namespace:key (node:os, custom:tier)",
            ));
        }
        if let PostureValue::String(s) = v {
            if s.len() > 256 || s.chars().any(char::is_control) {
                return Err(r.invalid(
                    &format!("posture[{}]", quoted(k)),
                    quoted(s),
                    "string values are at most 256 bytes without control characters",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a user on its own.
fn check_user_alone(u: &User) -> Result<(), StateError> {
    let r = Reporter(Subject::User(u.name.clone()));
    if !valid_name(&u.name) {
        return Err(r.invalid("name", quoted(&u.name), NAME_RULE));
    }
    if let Some(why) = email_problem(&u.email) {
        return Err(r.invalid("email", quoted(&u.email), why));
    }
    if let Some(role) = &u.role {
        if !ROLES.contains(&role.as_str()) {
            return Err(r.invalid(
                "role",
                quoted(role),
                format!("unknown role; one of {}", ROLES.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Checks tailnet settings: the domain (`name`) and `ipv6_only`.
pub fn check_settings(s: &TailnetSettings) -> Result<(), StateError> {
    let r = Reporter(Subject::Tailnet);
    if let Some(why) = domain_problem(&s.name) {
        return Err(r.invalid("name", quoted(&s.name), why));
    }
    if let Some(v) = s.extra.get("ipv6_only") {
        if !v.is_boolean() {
            return Err(r.invalid("ipv6_only", quoted(&v.to_string()), "must be true or false"));
        }
    }
    Ok(())
}

/// Whether settings make a tailnet IPv6-only.
pub fn is_ipv6_only(s: &TailnetSettings) -> bool {
    s.extra.get("ipv6_only") == Some(&serde_json::Value::Bool(true))
}

/// What is in use in a tailnet — addresses, user ids and emails, which users own nodes — so
/// that one node or user can be checked against the rest without a scan. The server keeps one
/// per tailnet in step with its writes; [`validate_tailnet`] builds one while it checks a whole
/// state.
#[derive(Debug, Clone, Default)]
pub struct StateIndex {
    v4: HashMap<Ipv4Addr, String>,
    v6: HashMap<Ipv6Addr, String>,
    user_ids: HashMap<u64, String>,
    emails: HashMap<String, String>,
    owned: HashMap<String, usize>,
    ipv6_only: bool,
}

impl StateIndex {
    /// Indexes a tailnet whose state was accepted before (nothing is checked).
    pub fn new(t: &Tailnet) -> StateIndex {
        let mut ix = StateIndex {
            ipv6_only: is_ipv6_only(&t.settings),
            ..StateIndex::default()
        };
        for u in t.users.values() {
            ix.insert_user(u, None);
        }
        for (k, n) in t.nodes.iter() {
            ix.insert_node(k, n);
        }
        ix
    }

    /// The node holding an IPv4 address.
    pub fn v4_holder(&self, a: Ipv4Addr) -> Option<&str> {
        self.v4.get(&a).map(String::as_str)
    }

    /// The node holding an IPv6 address.
    pub fn v6_holder(&self, a: Ipv6Addr) -> Option<&str> {
        self.v6.get(&a).map(String::as_str)
    }

    /// Number of addresses of each family in use.
    pub fn address_counts(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    /// Checks node `name` as it would be after an upsert: on its own, its user exists in
    /// `users`, and its addresses are not another node's.
    pub fn check_node(
        &self,
        name: &str,
        n: &Node,
        users: &OrdMap<String, User>,
    ) -> Result<(), StateError> {
        check_node_alone(name, n, self.ipv6_only)?;
        let r = Reporter(Subject::Node(name.to_string()));
        if let Some(u) = &n.user {
            if !users.contains_key(u) {
                return Err(r.invalid("user", quoted(u), "no such user; create it first"));
            }
        }
        if let Some(a) = n.ipv4 {
            if let Some(other) = self.v4.get(&a).filter(|k| k.as_str() != name) {
                return Err(r.err(
                    StateErrorKind::Conflict,
                    "ipv4",
                    shown(a),
                    format!("already used by node {}", quoted(other)),
                ));
            }
        }
        if let Some(a) = n.ipv6 {
            if let Some(other) = self.v6.get(&a).filter(|k| k.as_str() != name) {
                return Err(r.err(
                    StateErrorKind::Conflict,
                    "ipv6",
                    shown(a),
                    format!("already used by node {}", quoted(other)),
                ));
            }
        }
        Ok(())
    }

    /// Checks user `u` as it would be after an upsert: on its own, and its id and email are not
    /// another user's.
    pub fn check_user(&self, u: &User) -> Result<(), StateError> {
        check_user_alone(u)?;
        let r = Reporter(Subject::User(u.name.clone()));
        if let Some(other) = self.user_ids.get(&u.id).filter(|o| **o != u.name) {
            return Err(r.err(
                StateErrorKind::Conflict,
                "id",
                u.id.to_string(),
                format!("already used by user {}", quoted(other)),
            ));
        }
        if let Some(other) = self.emails.get(&u.email).filter(|o| **o != u.name) {
            return Err(r.err(
                StateErrorKind::Conflict,
                "email",
                quoted(&u.email),
                format!("already used by user {}", quoted(other)),
            ));
        }
        Ok(())
    }

    /// Checks that user `name` may be removed: no node belongs to it.
    pub fn check_remove_user(&self, name: &str) -> Result<(), StateError> {
        match self.owned.get(name) {
            Some(&n) if n > 0 => Err(Reporter(Subject::User(name.to_string())).err(
                StateErrorKind::Conflict,
                "nodes",
                String::new(),
                format!("owns {n} node(s); delete them or give them tags first"),
            )),
            _ => Ok(()),
        }
    }

    /// Records an upserted node (call [`remove_node`](Self::remove_node) for its old value first).
    pub fn insert_node(&mut self, name: &str, n: &Node) {
        if let Some(a) = n.ipv4 {
            self.v4.insert(a, name.to_string());
        }
        if let Some(a) = n.ipv6 {
            self.v6.insert(a, name.to_string());
        }
        if let Some(u) = &n.user {
            *self.owned.entry(u.clone()).or_default() += 1;
        }
    }

    /// Forgets a node's old value.
    pub fn remove_node(&mut self, name: &str, n: &Node) {
        if let Some(a) = n.ipv4 {
            if self.v4.get(&a).is_some_and(|k| k == name) {
                self.v4.remove(&a);
            }
        }
        if let Some(a) = n.ipv6 {
            if self.v6.get(&a).is_some_and(|k| k == name) {
                self.v6.remove(&a);
            }
        }
        if let Some(u) = &n.user {
            if let Some(c) = self.owned.get_mut(u) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.owned.remove(u);
                }
            }
        }
    }

    /// Records an upserted user, replacing `old` (its previous value) when given.
    pub fn insert_user(&mut self, u: &User, old: Option<&User>) {
        if let Some(o) = old {
            self.remove_user(o);
        }
        self.user_ids.insert(u.id, u.name.clone());
        if !u.email.is_empty() {
            self.emails.insert(u.email.clone(), u.name.clone());
        }
    }

    /// Forgets a user.
    pub fn remove_user(&mut self, u: &User) {
        if self.user_ids.get(&u.id).is_some_and(|n| *n == u.name) {
            self.user_ids.remove(&u.id);
        }
        if self.emails.get(&u.email).is_some_and(|n| *n == u.name) {
            self.emails.remove(&u.email);
        }
    }
}

/// Checks a whole tailnet: its settings, every user and node, what ties them together (users
/// exist, ids, emails and addresses unique) and the recorded history (MagicDNS names, primary
/// routers). This is the check a state file and a bulk import pass.
pub fn validate_tailnet(t: &Tailnet) -> Result<(), StateError> {
    check_settings(&t.settings)?;
    let mut ix = StateIndex {
        ipv6_only: is_ipv6_only(&t.settings),
        ..StateIndex::default()
    };
    for (key, u) in t.users.iter() {
        if *key != u.name {
            return Err(Reporter(Subject::User(key.clone())).invalid(
                "name",
                quoted(&u.name),
                "differs from the key it is stored under",
            ));
        }
        ix.check_user(u)?;
        ix.insert_user(u, None);
    }
    for (name, n) in t.nodes.iter() {
        ix.check_node(name, n, &t.users)?;
        ix.insert_node(name, n);
    }
    let mut labels: HashMap<&str, &str> = HashMap::new();
    for (node, label) in t.dns_names.iter() {
        let r = Reporter(Subject::Node(node.clone()));
        if !t.nodes.contains_key(node) {
            return Err(r.invalid("dns_names", quoted(label), "no such node"));
        }
        if label.is_empty() || dns_label(label) != *label {
            return Err(r.invalid(
                "dns_names",
                quoted(label),
                "not a DNS label (a-z, 0-9 and -, at most 63)",
            ));
        }
        if let Some(other) = labels.insert(label, node) {
            return Err(r.err(
                StateErrorKind::Conflict,
                "dns_names",
                quoted(label),
                format!("already the name of node {}", quoted(other)),
            ));
        }
    }
    for (prefix, node) in t.primaries.iter() {
        let r = Reporter(Subject::Node(node.clone()));
        if !t.nodes.contains_key(node) {
            return Err(r.invalid("primaries", shown(prefix), "no such node"));
        }
        if let Some(why) = route_problem(prefix) {
            return Err(r.invalid("primaries", shown(prefix), why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    fn users() -> OrdMap<String, User> {
        let mut m = OrdMap::new();
        m.insert(
            "alice".to_string(),
            User {
                id: 1,
                name: "alice".into(),
                email: "alice@x.example".into(),
                role: None,
            },
        );
        m
    }

    fn field_of(r: Result<(), StateError>) -> String {
        let e = r.unwrap_err();
        assert!(e.to_string().contains(&e.field), "{e}");
        e.field
    }

    #[test]
    fn nodes_are_checked_field_by_field() {
        let ix = StateIndex::default();
        let us = users();
        let ok = serde_json::json!({"user": "alice", "ipv4": "100.64.0.7", "ipv6": "fd7a:115c:a1e0::7",
            "routable_ips": ["10.0.0.0/8", "0.0.0.0/0", "fd7a:115c:a1e0:b1a:0:13:ad2:7300/120"],
            "created": "2025-01-06T09:00:00Z", "posture": {"node:os": "linux", "custom:tier": 3}});
        ix.check_node("n", &node(ok.clone()), &us).unwrap();
        let bad = |patch: serde_json::Value| {
            let mut v = ok.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            field_of(ix.check_node("n", &node(v), &us))
        };
        assert_eq!(bad(serde_json::json!({"user": "nobody"})), "user");
        assert_eq!(bad(serde_json::json!({"tags": ["tag:a"]})), "user");
        assert_eq!(
            bad(serde_json::json!({"user": null, "tags": ["nottag"]})),
            "tags[0]"
        );
        assert_eq!(
            bad(serde_json::json!({"user": null, "tags": ["tag:a", "tag:a"]})),
            "tags[1]"
        );
        assert_eq!(bad(serde_json::json!({"user": null, "tags": []})), "user");
        for a in [
            "8.8.8.8",
            "100.100.100.100",
            "100.64.0.0",
            "100.127.255.255",
            "100.115.92.9",
        ] {
            assert_eq!(bad(serde_json::json!({"ipv4": a})), "ipv4", "{a}");
        }
        for a in [
            "::1",
            "fe80::1",
            "::ffff:100.64.0.1",
            "fd7a:115c:a1e0::",
            "fd7a:115c:a1e0:b1a::5",
        ] {
            assert_eq!(bad(serde_json::json!({"ipv6": a})), "ipv6", "{a}");
        }
        assert_eq!(
            bad(serde_json::json!({"ipv4": null, "ipv6": null})),
            "ipv4/ipv6"
        );
        for r in [
            "10.0.0.1/8",
            "100.64.0.0/10",
            "100.0.0.0/8",
            "100.100.100.100/32",
            "fd7a:115c:a1e0::/64",
            "fd00::/8",
        ] {
            assert!(
                bad(serde_json::json!({"routable_ips": [r]})).starts_with("routable_ips["),
                "{r}"
            );
        }
        assert_eq!(
            bad(serde_json::json!({"approved_routes": ["10.0.0.1/8"]})),
            "approved_routes[0]"
        );
        for c in [
            "garbage",
            "yesterday",
            "9999-99-99T99:99:99Z",
            "2025-02-30T00:00:00Z",
            "2025-01-06T09:00:00",
        ] {
            assert_eq!(bad(serde_json::json!({"created": c})), "created", "{c}");
        }
        assert_eq!(
            bad(serde_json::json!({"posture": {"os": "linux"}})),
            "posture"
        );
        assert_eq!(bad(serde_json::json!({"hostname": "a\u{7}b"})), "hostname");
        let e = ix.check_node("../x", &node(ok.clone()), &us).unwrap_err();
        assert_eq!(e.field, "name");
        let e = ix
            .check_node(
                "n",
                &node(serde_json::json!({"user": "alice", "ipv4": "8.8.8.8"})),
                &us,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "node \"n\": ipv4 \"8.8.8.8\": not in the tailnet range 100.64.0.0/10"
        );
    }

    #[test]
    fn conflicts_and_users() {
        let mut t = Tailnet {
            users: users(),
            ..Tailnet::default()
        };
        let a = node(serde_json::json!({"user": "alice", "ipv4": "100.64.0.7"}));
        t.nodes.insert("a".into(), std::sync::Arc::new(a.clone()));
        validate_tailnet(&t).unwrap();
        let ix = StateIndex::new(&t);
        ix.check_node("a", &a, &t.users).unwrap();
        let e = ix.check_node("b", &a, &t.users).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (StateErrorKind::Conflict, "ipv4")
        );
        t.nodes.insert("b".into(), std::sync::Arc::new(a));
        assert_eq!(
            validate_tailnet(&t).unwrap_err().kind,
            StateErrorKind::Conflict
        );
        assert!(ix.check_remove_user("alice").is_err());
        assert!(ix.check_remove_user("bob").is_ok());
        let u = |id, name: &str, email: &str| User {
            id,
            name: name.into(),
            email: email.into(),
            role: None,
        };
        assert_eq!(ix.check_user(&u(1, "bob", "b@x")).unwrap_err().field, "id");
        assert_eq!(
            ix.check_user(&u(2, "bob", "alice@x.example"))
                .unwrap_err()
                .field,
            "email"
        );
        assert_eq!(ix.check_user(&u(2, "bob", "@")).unwrap_err().field, "email");
        ix.check_user(&u(2, "bob", "")).unwrap();
        ix.check_user(&u(1, "alice", "new@x.example")).unwrap();
        let mut r = u(3, "carol", "c@x");
        r.role = Some("wizard".into());
        assert_eq!(ix.check_user(&r).unwrap_err().field, "role");
    }

    #[test]
    fn settings_and_names() {
        for bad in [".", "..", "a b", "x\u{0}", &"d".repeat(300)] {
            let s = TailnetSettings {
                name: bad.to_string(),
                ..TailnetSettings::default()
            };
            assert!(check_settings(&s).is_err(), "{bad:?}");
        }
        for ok in ["", "acme.example", "odin@example.com"] {
            let s = TailnetSettings {
                name: ok.to_string(),
                ..TailnetSettings::default()
            };
            check_settings(&s).unwrap();
        }
        assert!(!valid_name(".") && !valid_name("..") && !valid_name("") && !valid_name("a/b"));
        assert!(valid_name("a.b") && valid_name("alice@x.example"));
        let long = "x".repeat(500);
        let e = check_user_alone(&User {
            id: 0,
            name: long,
            email: String::new(),
            role: None,
        })
        .unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
    }
}
