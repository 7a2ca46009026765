//! The typed policy model, read from the positioned HuJSON tree with strict validation.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::PolicyError;
use crate::hujson::{self, Key, Node, Pos, Value};
use crate::selector::{
    parse_alias, parse_dst_with_ports, parse_ip_spec, parse_proto, AliasContext, IpSpec, PortRange,
};
pub use crate::selector::{Alias, AutoGroup};

/// A validated policy file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// `groups`: group name (with `group:` prefix) → member emails (groups may not nest).
    pub groups: BTreeMap<String, Vec<String>>,
    /// `tagOwners`: tag → owners (users, groups, tags, autogroups).
    pub tag_owners: BTreeMap<String, Vec<String>>,
    /// `hosts`: alias → prefix.
    pub hosts: BTreeMap<String, IpNet>,
    /// `ipsets`: name (with `ipset:` prefix) → resolved prefixes (adds minus removes).
    pub ipsets: BTreeMap<String, Vec<IpSetItem>>,
    /// `postures`: name (with `posture:` prefix) → conditions, kept as written.
    pub postures: BTreeMap<String, Vec<String>>,
    /// `acls`, in order.
    pub acls: Vec<Acl>,
    /// `grants`, in order.
    pub grants: Vec<Grant>,
    /// `ssh`, in order.
    pub ssh: Vec<SshRule>,
    /// `tests`.
    pub tests: Vec<AclTest>,
    /// `sshTests`.
    pub ssh_tests: Vec<SshTest>,
    /// `autoApprovers`.
    pub auto_approvers: AutoApprovers,
    /// `nodeAttrs`, in order.
    pub node_attrs: Vec<NodeAttr>,
    /// `randomizeClientPort`.
    pub randomize_client_port: bool,
    /// `disableIPv4`.
    pub disable_ipv4: bool,
    /// `OneCGNATRoute`, as written.
    pub one_cgnat_route: Option<String>,
    /// `derpMap`, kept as JSON.
    pub derp_map: Option<serde_json::Value>,
    /// Whether the file had an `acls` key or a `grants` key at all (absent both = allow all).
    pub has_rules: bool,
}

/// One element of an `ipsets` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum IpSetItem {
    /// Adds an alias.
    Add(Alias),
    /// Removes an alias (`remove:` prefix).
    Remove(Alias),
}

/// An alias as written, with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    /// The parsed value.
    pub value: T,
    /// The text as written (trimmed).
    pub text: String,
    /// JSON path.
    pub path: String,
    /// Position in the source.
    pub pos: Pos,
}

/// An `acls` entry (action is always `accept`).
#[derive(Debug, Clone, PartialEq)]
pub struct Acl {
    /// Sources.
    pub src: Vec<Located<Alias>>,
    /// Destinations with their ports.
    pub dst: Vec<Located<(Alias, Vec<PortRange>)>>,
    /// IP protocol numbers; empty means the default (TCP, UDP, ICMP, ICMPv6).
    pub protos: Vec<u8>,
}

/// A `grants` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Sources.
    pub src: Vec<Located<Alias>>,
    /// Destinations.
    pub dst: Vec<Located<Alias>>,
    /// `ip`: network capabilities.
    pub ip: Vec<IpSpec>,
    /// `app`: application capabilities, name → values, in source order.
    pub app: Vec<(String, Vec<serde_json::Value>)>,
    /// `via`: tags of routers the destination must be reached through.
    pub via: Vec<String>,
    /// `srcPosture`: posture names.
    pub src_posture: Vec<String>,
}

/// SSH rule action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshAction {
    /// Allow.
    Accept,
    /// Allow after a recent check (re-authentication).
    Check,
}

/// A local user an SSH rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshUser {
    /// `root`.
    Root,
    /// `autogroup:nonroot`: any user but root.
    NonRoot,
    /// `localpart:*@domain`: the local part of the source user's email, when in that domain.
    LocalPart(String),
    /// A literal local user name.
    Named(String),
}

/// An `ssh` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SshRule {
    /// `accept` or `check`.
    pub action: SshAction,
    /// Sources.
    pub src: Vec<Located<Alias>>,
    /// Destinations.
    pub dst: Vec<Located<Alias>>,
    /// Local users.
    pub users: Vec<SshUser>,
    /// `checkPeriod` in seconds (check rules only); `None` = default (12h).
    pub check_period_secs: Option<u64>,
    /// `acceptEnv` patterns.
    pub accept_env: Vec<String>,
}

/// A `tests` entry; kept as written because malformed tests fail rather than reject the file.
#[derive(Debug, Clone, PartialEq)]
pub struct AclTest {
    /// `src` as written.
    pub src: String,
    /// `proto` as written.
    pub proto: Option<String>,
    /// `accept` destinations (`host:port`).
    pub accept: Vec<String>,
    /// `deny` destinations.
    pub deny: Vec<String>,
    /// Where the entry is.
    pub pos: Pos,
}

/// An `sshTests` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SshTest {
    /// `src` as written.
    pub src: String,
    /// `dst` as written.
    pub dst: Vec<String>,
    /// Users that must be accepted.
    pub accept: Vec<String>,
    /// Users that must be allowed after a check.
    pub check: Vec<String>,
    /// Users that must be denied.
    pub deny: Vec<String>,
    /// Where the entry is.
    pub pos: Pos,
}

/// `autoApprovers`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AutoApprovers {
    /// Route prefix → who may have it (or a narrower prefix) approved automatically.
    pub routes: Vec<(IpNet, Vec<Located<Alias>>)>,
    /// Who may be approved as an exit node.
    pub exit_node: Vec<Located<Alias>>,
}

/// A `nodeAttrs` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAttr {
    /// Which nodes.
    pub target: Vec<Located<Alias>>,
    /// Attribute names.
    pub attr: Vec<String>,
    /// Application capabilities (`app`), name → values.
    pub app: Vec<(String, Vec<serde_json::Value>)>,
    /// `ipPool`.
    pub ip_pool: Vec<IpNet>,
}

const TOP_KEYS: &[&str] = &[
    "acls",
    "grants",
    "groups",
    "tagOwners",
    "hosts",
    "ipsets",
    "postures",
    "defaultSrcPosture",
    "ssh",
    "tests",
    "sshTests",
    "autoApprovers",
    "nodeAttrs",
    "randomizeClientPort",
    "disableIPv4",
    "derpMap",
    "OneCGNATRoute",
];

struct Ctx<'a> {
    path: String,
    node: &'a Node,
}

fn invalid(message: impl Into<String>, path: &str, pos: Pos) -> PolicyError {
    PolicyError::Invalid {
        message: message.into(),
        path: if path.is_empty() {
            "$".into()
        } else {
            path.into()
        },
        pos,
    }
}

impl<'a> Ctx<'a> {
    fn err(&self, message: impl Into<String>) -> PolicyError {
        invalid(message, &self.path, self.node.pos)
    }

    fn child_key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    fn object(&self, what: &str) -> Result<Vec<(&'a Key, Ctx<'a>)>, PolicyError> {
        match &self.node.value {
            Value::Object(m) => Ok(m
                .iter()
                .map(|(k, v)| {
                    let path = if k.name.starts_with(|c: char| c.is_ascii_alphabetic())
                        && k.name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        self.child_key(&k.name)
                    } else {
                        format!("{}[{:?}]", self.path, k.name)
                    };
                    (k, Ctx { path, node: v })
                })
                .collect()),
            other => Err(self.err(format!("{what} must be an object, not {}", other.kind()))),
        }
    }

    fn array(&self, what: &str) -> Result<Vec<Ctx<'a>>, PolicyError> {
        match &self.node.value {
            Value::Array(a) => Ok(a
                .iter()
                .enumerate()
                .map(|(i, v)| Ctx {
                    path: format!("{}[{i}]", self.path),
                    node: v,
                })
                .collect()),
            Value::Null => Ok(Vec::new()),
            other => Err(self.err(format!("{what} must be an array, not {}", other.kind()))),
        }
    }

    fn string(&self, what: &str) -> Result<&'a str, PolicyError> {
        match &self.node.value {
            Value::String(s) => Ok(s),
            other => Err(self.err(format!("{what} must be a string, not {}", other.kind()))),
        }
    }

    fn strings(&self, what: &str) -> Result<Vec<(String, Ctx<'a>)>, PolicyError> {
        self.array(what)?
            .into_iter()
            .map(|c| Ok((c.string(what)?.to_string(), c)))
            .collect()
    }

    fn bool(&self, what: &str) -> Result<bool, PolicyError> {
        match &self.node.value {
            Value::Bool(b) => Ok(*b),
            Value::Null => Ok(false),
            other => Err(self.err(format!("{what} must be a bool, not {}", other.kind()))),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.node.value, Value::Null)
    }
}

fn unknown_key(k: &Key, path: &str) -> PolicyError {
    invalid(format!("unknown field {:?}", k.name), path, k.pos)
}

/// Parses and validates a policy file.
pub fn parse_policy(text: &str) -> Result<Policy, PolicyError> {
    let root = hujson::parse(text)?;
    let top = Ctx {
        path: String::new(),
        node: &root,
    };
    let members = top.object("the policy")?;
    let mut p = Policy::default();
    let get = |name: &str| members.iter().find(|(k, _)| k.name == name).map(|(_, c)| c);
    for (k, _) in &members {
        if !TOP_KEYS.contains(&k.name.as_str()) {
            return Err(unknown_key(k, &k.name));
        }
    }
    // Groups, tags and hosts first: rules refer to them.
    if let Some(c) = get("groups") {
        read_groups(c, &mut p)?;
    }
    if let Some(c) = get("tagOwners") {
        read_tag_owners(c, &mut p)?;
    }
    if let Some(c) = get("hosts") {
        read_hosts(c, &mut p)?;
    }
    if let Some(c) = get("postures") {
        for (k, pc) in c.object("postures")? {
            let conds = pc.strings("posture")?.into_iter().map(|(s, _)| s).collect();
            p.postures.insert(k.name.clone(), conds);
        }
    }
    if let Some(c) = get("ipsets") {
        read_ipsets(c, &mut p)?;
    }
    if let Some(c) = get("acls") {
        p.has_rules = true;
        for a in c.array("acls")? {
            let acl = read_acl(&a, &p)?;
            p.acls.push(acl);
        }
    }
    if let Some(c) = get("grants") {
        p.has_rules = true;
        for g in c.array("grants")? {
            let grant = read_grant(&g, &p)?;
            p.grants.push(grant);
        }
    }
    if let Some(c) = get("ssh") {
        for s in c.array("ssh")? {
            let rule = read_ssh(&s, &p)?;
            p.ssh.push(rule);
        }
    }
    if let Some(c) = get("autoApprovers") {
        read_auto_approvers(c, &mut p)?;
    }
    if let Some(c) = get("nodeAttrs") {
        for n in c.array("nodeAttrs")? {
            let na = read_node_attr(&n, &p)?;
            p.node_attrs.push(na);
        }
    }
    if let Some(c) = get("tests") {
        for t in c.array("tests")? {
            p.tests.push(read_test(&t)?);
        }
    }
    if let Some(c) = get("sshTests") {
        for t in c.array("sshTests")? {
            p.ssh_tests.push(read_ssh_test(&t)?);
        }
    }
    if let Some(c) = get("randomizeClientPort") {
        p.randomize_client_port = c.bool("randomizeClientPort")?;
    }
    if let Some(c) = get("disableIPv4") {
        p.disable_ipv4 = c.bool("disableIPv4")?;
    }
    if let Some(c) = get("OneCGNATRoute") {
        if !c.is_null() {
            p.one_cgnat_route = Some(c.string("OneCGNATRoute")?.to_string());
        }
    }
    if let Some(c) = get("derpMap") {
        p.derp_map = Some(c.node.to_json());
    }
    Ok(p)
}

fn read_groups(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    let members = c.object("groups")?;
    // The hosted service reports the last group (in name order) that nests another.
    let mut nested: Option<PolicyError> = None;
    let mut sorted: Vec<&(&Key, Ctx<'_>)> = members.iter().collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (k, gc) in sorted {
        if !k.name.starts_with("group:") {
            return Err(invalid(
                format!("group {:?} must start with \"group:\"", k.name),
                &gc.path,
                k.pos,
            ));
        }
        let mut list = Vec::new();
        for (m, mc) in gc.strings("group members")? {
            let m = m.trim().to_string();
            if m.starts_with("group:") {
                if nested.as_ref().is_none_or(|e| e.path() < mc.path.as_str()) {
                    nested = Some(invalid(
                        format!(
                            "groups[{:?}]: {:?}: group members cannot be recursive",
                            k.name, m
                        ),
                        &mc.path,
                        mc.node.pos,
                    ));
                }
                continue;
            }
            if m.starts_with("tag:") || m.starts_with("autogroup:") {
                return Err(invalid(
                    format!("groups[{:?}]: {:?}: group members must be users", k.name, m),
                    &mc.path,
                    mc.node.pos,
                ));
            }
            list.push(m);
        }
        p.groups.insert(k.name.clone(), list);
    }
    match nested {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn valid_tag_name(tag: &str) -> bool {
    let Some(name) = tag.strip_prefix("tag:") else {
        return false;
    };
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn read_tag_owners(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    for (k, tc) in c.object("tagOwners")? {
        if !k.name.starts_with("tag:") {
            return Err(invalid(
                format!("tagOwners[{:?}]: tags must start with \"tag:\"", k.name),
                &tc.path,
                k.pos,
            ));
        }
        if !valid_tag_name(&k.name) {
            return Err(invalid(
                format!(
                    "tagOwners[{:?}]: tag names must start with a letter, after 'tag:'",
                    k.name
                ),
                &tc.path,
                k.pos,
            ));
        }
        let owners = tc
            .strings("tag owners")?
            .into_iter()
            .map(|(s, _)| s.trim().to_string())
            .collect();
        p.tag_owners.insert(k.name.clone(), owners);
    }
    Ok(())
}

fn read_hosts(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    for (k, hc) in c.object("hosts")? {
        let s = hc.string("host address")?.trim();
        let net = parse_prefix(s).ok_or_else(|| {
            invalid(
                format!("hosts[{:?}]: {s:?}: invalid IP address or prefix", k.name),
                &hc.path,
                hc.node.pos,
            )
        })?;
        if k.name.contains(':') || k.name.contains('@') || k.name.is_empty() {
            return Err(invalid(
                format!("hosts[{:?}]: invalid host name", k.name),
                &hc.path,
                k.pos,
            ));
        }
        p.hosts.insert(k.name.clone(), net);
    }
    Ok(())
}

/// Parses an IP address (as a host prefix) or a CIDR prefix; host bits must be zero.
pub fn parse_prefix(s: &str) -> Option<IpNet> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    let net: IpNet = s.parse().ok()?;
    if net.trunc() != net {
        // Tailscale masks host bits silently for hosts/ACLs; keep the masked prefix.
        return Some(net.trunc());
    }
    Some(net)
}

fn read_ipsets(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    for (k, ic) in c.object("ipsets")? {
        if !k.name.starts_with("ipset:") {
            return Err(invalid(
                format!(
                    "ipsets[{:?}]: ipset names must start with \"ipset:\"",
                    k.name
                ),
                &ic.path,
                k.pos,
            ));
        }
        let mut items = Vec::new();
        for (s, sc) in ic.strings("ipset members")? {
            let s = s.trim();
            let (remove, text) = match s.strip_prefix("remove:") {
                Some(rest) => (true, rest.trim()),
                None => (false, s.strip_prefix("add:").unwrap_or(s).trim()),
            };
            let alias = parse_alias(text, AliasContext::IpSet, p)
                .map_err(|m| invalid(m, &sc.path, sc.node.pos))?;
            items.push(if remove {
                IpSetItem::Remove(alias)
            } else {
                IpSetItem::Add(alias)
            });
        }
        p.ipsets.insert(k.name.clone(), items);
    }
    Ok(())
}

fn located<T>(value: T, text: &str, c: &Ctx<'_>) -> Located<T> {
    Located {
        value,
        text: text.to_string(),
        path: c.path.clone(),
        pos: c.node.pos,
    }
}

fn read_aliases(
    c: &Ctx<'_>,
    what: &str,
    ctx: AliasContext,
    p: &Policy,
) -> Result<Vec<Located<Alias>>, PolicyError> {
    let mut out = Vec::new();
    for (s, sc) in c.strings(what)? {
        let t = s.trim();
        let a = parse_alias(t, ctx, p).map_err(|m| invalid(m, &sc.path, sc.node.pos))?;
        out.push(located(a, t, &sc));
    }
    Ok(out)
}

fn check_keys(members: &[(&Key, Ctx<'_>)], allowed: &[&str]) -> Result<(), PolicyError> {
    for (k, kc) in members {
        if !allowed.contains(&k.name.as_str()) && !k.name.starts_with('#') {
            return Err(unknown_key(k, &kc.path));
        }
    }
    Ok(())
}

fn field<'a, 'b>(members: &'b [(&'a Key, Ctx<'a>)], name: &str) -> Option<&'b Ctx<'a>> {
    members.iter().find(|(k, _)| k.name == name).map(|(_, c)| c)
}

fn read_acl(c: &Ctx<'_>, p: &Policy) -> Result<Acl, PolicyError> {
    let m = c.object("an ACL")?;
    check_keys(&m, &["action", "src", "dst", "proto", "users", "ports"])?;
    match field(&m, "action")
        .map(|a| a.string("action"))
        .transpose()?
    {
        Some("accept") => {}
        Some(other) => {
            return Err(c.err(format!(
                "action={other:?} is not supported; only \"accept\" is"
            )))
        }
        None => return Err(c.err("action must be specified")),
    }
    let src = match field(&m, "src") {
        Some(sc) => read_aliases(sc, "src", AliasContext::AclSrc, p)?,
        None => return Err(c.err("src must be specified")),
    };
    let mut dst = Vec::new();
    let Some(dc) = field(&m, "dst") else {
        return Err(c.err("dst must be specified"));
    };
    for (s, sc) in dc.strings("dst")? {
        let t = s.trim();
        let d = parse_dst_with_ports(t, p).map_err(|e| invalid(e, &sc.path, sc.node.pos))?;
        dst.push(located(d, t, &sc));
    }
    let protos = match field(&m, "proto") {
        Some(pc) if !pc.is_null() => {
            let s = pc.string("proto")?.trim();
            if s.is_empty() {
                Vec::new()
            } else {
                let n = parse_proto(s).map_err(|e| pc.err(e))?;
                // Ports are meaningless for protocols without ports.
                if !matches!(n, 6 | 17 | 132)
                    && dst
                        .iter()
                        .any(|d| !(d.value.1.len() == 1 && d.value.1[0] == PortRange::ALL))
                {
                    return Err(pc.err(format!(
                        "proto {s:?}: ports are only allowed with tcp, udp and sctp; use \"*\""
                    )));
                }
                vec![n]
            }
        }
        _ => Vec::new(),
    };
    crate::selector::check_self_sources(&src, &dst)?;
    Ok(Acl { src, dst, protos })
}

fn read_app(c: &Ctx<'_>) -> Result<Vec<(String, Vec<serde_json::Value>)>, PolicyError> {
    let mut out = Vec::new();
    for (k, vc) in c.object("app")? {
        let name = k.name.trim();
        validate_cap_name(name).map_err(|e| invalid(e, &vc.path, k.pos))?;
        let values = match &vc.node.value {
            Value::Array(a) => a.iter().map(Node::to_json).collect(),
            Value::Null => Vec::new(),
            other => {
                return Err(vc.err(format!(
                    "capability values must be an array of objects, not {}",
                    other.kind()
                )))
            }
        };
        out.push((name.to_string(), values));
    }
    Ok(out)
}

/// Checks an application capability name: `{domain}/{path}`, not in tailscale.com unless allowed.
fn validate_cap_name(name: &str) -> Result<(), String> {
    let Some((domain, path)) = name
        .strip_prefix("https://")
        .unwrap_or(name)
        .split_once('/')
    else {
        return Err("capability name must have the form {domain}/{path}".into());
    };
    if domain.is_empty() || path.is_empty() || !domain.contains('.') {
        return Err("capability name must have the form {domain}/{path}".into());
    }
    if name.starts_with("https://") {
        return Err("capability name must have the form {domain}/{path}".into());
    }
    const ALLOWED_TS: &[&str] = &[
        "tailscale.com/cap/kubernetes",
        "tailscale.com/cap/drive",
        "tailscale.com/cap/webui",
        "tailscale.com/cap/relay",
        "tailscale.com/cap/tsidp",
        "tailscale.com/cap/golink",
        "tailscale.com/cap/funnel-ports",
    ];
    if (domain == "tailscale.com" || domain.ends_with(".tailscale.com"))
        && !ALLOWED_TS.contains(&name)
    {
        return Err("capability name must not be in the tailscale.com domain".into());
    }
    Ok(())
}

fn read_grant(c: &Ctx<'_>, p: &Policy) -> Result<Grant, PolicyError> {
    let m = c.object("a grant")?;
    check_keys(&m, &["src", "dst", "ip", "app", "via", "srcPosture"])?;
    let Some(sc) = field(&m, "src") else {
        return Err(c.err("src must be specified"));
    };
    let src = read_aliases(sc, "src", AliasContext::GrantSrc, p)?;
    let Some(dc) = field(&m, "dst") else {
        return Err(c.err("dst must be specified"));
    };
    let dst = read_aliases(dc, "dst", AliasContext::GrantDst, p)?;
    let mut ip = Vec::new();
    if let Some(ic) = field(&m, "ip") {
        for (s, sc) in ic.strings("ip")? {
            ip.push(parse_ip_spec(s.trim()).map_err(|e| sc.err(e))?);
        }
    }
    let app = match field(&m, "app") {
        Some(ac) if !ac.is_null() => read_app(ac)?,
        _ => Vec::new(),
    };
    if ip.is_empty() && app.is_empty() {
        return Err(c.err("ip and app can not both be empty"));
    }
    let mut via = Vec::new();
    if let Some(vc) = field(&m, "via") {
        for (s, sc) in vc.strings("via")? {
            let t = s.trim();
            if !t.starts_with("tag:") {
                return Err(sc.err(format!("via {t:?}: via must be a tag")));
            }
            if !p.tag_owners.contains_key(t) {
                return Err(sc.err(format!("tag {t:?} not found")));
            }
            via.push(t.to_string());
        }
    }
    let mut src_posture = Vec::new();
    if let Some(pc) = field(&m, "srcPosture") {
        for (s, sc) in pc.strings("srcPosture")? {
            if !p.postures.contains_key(s.trim()) {
                return Err(sc.err(format!("posture {:?} not found", s.trim())));
            }
            src_posture.push(s.trim().to_string());
        }
    }
    for d in &dst {
        if let Alias::Prefix(n) = d.value {
            if n.prefix_len() == 0 {
                return Err(invalid(
                    format!(
                        "dst {:?}: to allow all IP addresses, use \"*\" or \"autogroup:internet\"",
                        d.text
                    ),
                    &d.path,
                    d.pos,
                ));
            }
        }
        if d.value == Alias::AutoGroup(AutoGroup::Internet) && !app.is_empty() {
            return Err(invalid(
                "cannot use app grants with autogroup:internet",
                &d.path,
                d.pos,
            ));
        }
    }
    crate::selector::check_self_sources(&src, &dst)?;
    Ok(Grant {
        src,
        dst,
        ip,
        app,
        via,
        src_posture,
    })
}

fn parse_duration_secs(s: &str) -> Result<i64, String> {
    // Go's time.ParseDuration, restricted to the units policies use.
    let bad = || format!("time: invalid duration {s:?}");
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(0);
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    let secs = total.round() as i64;
    Ok(if neg { -secs } else { secs })
}

/// Formats seconds the way Go prints a `time.Duration` (e.g. `1h0m0s`, `-1m0s`).
pub fn go_duration(secs: i64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let neg = secs < 0;
    let s = secs.unsigned_abs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let body = if h > 0 {
        format!("{h}h{m}m{sec}s")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

fn read_ssh(c: &Ctx<'_>, p: &Policy) -> Result<SshRule, PolicyError> {
    let m = c.object("an SSH rule")?;
    check_keys(
        &m,
        &["action", "src", "dst", "users", "checkPeriod", "acceptEnv"],
    )?;
    let action = match field(&m, "action") {
        None => return Err(c.err("action must be specified")),
        Some(ac) => match ac.string("action")?.trim() {
            "accept" => SshAction::Accept,
            "check" => SshAction::Check,
            "" => return Err(ac.err("action must be specified")),
            other => return Err(ac.err(format!("{other:?} is not a valid action"))),
        },
    };
    let Some(sc) = field(&m, "src") else {
        return Err(c.err("src must be specified"));
    };
    let src = read_aliases(sc, "src", AliasContext::SshSrc, p)?;
    let Some(dc) = field(&m, "dst") else {
        return Err(c.err("dst must be specified"));
    };
    let dst = read_aliases(dc, "dst", AliasContext::SshDst, p)?;
    let mut users = Vec::new();
    let uc = field(&m, "users");
    let user_list = match uc {
        Some(uc) => uc.strings("users")?,
        None => Vec::new(),
    };
    if user_list.is_empty() {
        return Err(uc.unwrap_or(c).err("users must be specified"));
    }
    for (u, ucx) in user_list {
        let t = u.trim();
        let user = if t == "root" {
            SshUser::Root
        } else if t == "autogroup:nonroot" {
            SshUser::NonRoot
        } else if let Some(rest) = t.strip_prefix("localpart:*@").filter(|r| !r.is_empty()) {
            if rest.contains('*') || rest.contains('@') {
                return Err(ucx.err(format!(
                    "{} is not associated with this Tailnet and cannot be used in user:*@<domain> expressions",
                    if rest.contains('*') { "*" } else { rest }
                )));
            }
            SshUser::LocalPart(rest.to_string())
        } else if t.is_empty() || t == "*" || t.contains(char::is_whitespace) {
            return Err(ucx.err(format!("user {t:?} is not valid")));
        } else {
            SshUser::Named(t.to_string())
        };
        users.push(user);
    }
    let check_period_secs = match field(&m, "checkPeriod") {
        Some(cc) if !cc.is_null() => {
            let s = cc.string("checkPeriod")?;
            if action != SshAction::Check {
                None
            } else if s == "always" {
                Some(0)
            } else {
                let secs = parse_duration_secs(s).map_err(|e| cc.err(e))?;
                if secs <= 0 {
                    return Err(cc.err(format!(
                        "checkPeriod {} must be a positive duration",
                        go_duration(secs)
                    )));
                }
                Some(secs as u64)
            }
        }
        _ => None,
    };
    let mut accept_env = Vec::new();
    if let Some(ec) = field(&m, "acceptEnv") {
        for (s, sc) in ec.strings("acceptEnv")? {
            if s.trim().is_empty() {
                return Err(sc.err("acceptEnv values cannot be empty"));
            }
            accept_env.push(s);
        }
    }
    crate::selector::check_self_sources(&src, &dst)?;
    Ok(SshRule {
        action,
        src,
        dst,
        users,
        check_period_secs,
        accept_env,
    })
}

fn read_auto_approvers(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    let m = c.object("autoApprovers")?;
    check_keys(&m, &["routes", "exitNode", "services"])?;
    let mut aa = AutoApprovers::default();
    if let Some(rc) = field(&m, "routes") {
        for (k, vc) in rc.object("routes")? {
            let net: IpNet = k.name.trim().parse().map_err(|_| {
                invalid(
                    format!("autoApprovers.routes: {:?}: invalid prefix", k.name),
                    &vc.path,
                    k.pos,
                )
            })?;
            let who = read_aliases(&vc, "approvers", AliasContext::Approver, p)?;
            aa.routes.push((net.trunc(), who));
        }
    }
    if let Some(ec) = field(&m, "exitNode") {
        aa.exit_node = read_aliases(ec, "exitNode", AliasContext::Approver, p)?;
    }
    p.auto_approvers = aa;
    Ok(())
}

fn read_node_attr(c: &Ctx<'_>, p: &Policy) -> Result<NodeAttr, PolicyError> {
    let m = c.object("a nodeAttrs entry")?;
    check_keys(&m, &["target", "attr", "app", "ipPool"])?;
    let target = match field(&m, "target") {
        Some(tc) => read_aliases(tc, "target", AliasContext::NodeAttrTarget, p)?,
        None => return Err(c.err("target must be specified")),
    };
    let attr = match field(&m, "attr") {
        Some(ac) => ac.strings("attr")?.into_iter().map(|(s, _)| s).collect(),
        None => Vec::new(),
    };
    let app = match field(&m, "app") {
        Some(ac) if !ac.is_null() => read_app(ac)?,
        _ => Vec::new(),
    };
    let mut ip_pool = Vec::new();
    if let Some(ic) = field(&m, "ipPool") {
        for (s, sc) in ic.strings("ipPool")? {
            let net: IpNet = s
                .trim()
                .parse()
                .map_err(|_| sc.err(format!("{s:?}: invalid prefix")))?;
            let cgnat: IpNet = "100.64.0.0/10".parse().map_err(|_| sc.err("internal"))?;
            let reserved: IpNet = "100.100.0.0/16".parse().map_err(|_| sc.err("internal"))?;
            if !cgnat.contains(&net) || reserved.contains(&net) || net.contains(&reserved) {
                return Err(sc.err(format!("IPPool({net}): network within reserved range")));
            }
            ip_pool.push(net);
        }
    }
    Ok(NodeAttr {
        target,
        attr,
        app,
        ip_pool,
    })
}

fn opt_string(m: &[(&Key, Ctx<'_>)], name: &str) -> Result<Option<String>, PolicyError> {
    match field(m, name) {
        Some(c) if !c.is_null() => Ok(Some(c.string(name)?.to_string())),
        _ => Ok(None),
    }
}

fn string_list(m: &[(&Key, Ctx<'_>)], name: &str) -> Result<Vec<String>, PolicyError> {
    match field(m, name) {
        Some(c) => Ok(c.strings(name)?.into_iter().map(|(s, _)| s).collect()),
        None => Ok(Vec::new()),
    }
}

fn read_test(c: &Ctx<'_>) -> Result<AclTest, PolicyError> {
    let m = c.object("a test")?;
    check_keys(&m, &["src", "srcPostureAttrs", "proto", "accept", "deny"])?;
    Ok(AclTest {
        src: opt_string(&m, "src")?.unwrap_or_default(),
        proto: opt_string(&m, "proto")?,
        accept: string_list(&m, "accept")?,
        deny: string_list(&m, "deny")?,
        pos: c.node.pos,
    })
}

fn read_ssh_test(c: &Ctx<'_>) -> Result<SshTest, PolicyError> {
    let m = c.object("an SSH test")?;
    check_keys(
        &m,
        &["src", "srcPostureAttrs", "dst", "accept", "check", "deny"],
    )?;
    let dst = string_list(&m, "dst")?;
    if let Some(dc) = field(&m, "dst") {
        for (d, dcx) in dc.strings("dst")? {
            let t = d.trim();
            let disallowed = t == "autogroup:internet"
                || t.contains('/')
                || t == "*"
                || t.starts_with("autogroup:danger-all");
            if disallowed {
                return Err(dcx.err(format!("SSH tests dst contains disallowed element {t:?}")));
            }
        }
    }
    Ok(SshTest {
        src: opt_string(&m, "src")?.unwrap_or_default(),
        dst,
        accept: string_list(&m, "accept")?,
        check: string_list(&m, "check")?,
        deny: string_list(&m, "deny")?,
        pos: c.node.pos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("1h").unwrap(), 3600);
        assert_eq!(parse_duration_secs("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration_secs("-1m").unwrap(), -60);
        assert!(parse_duration_secs("abc").is_err());
        assert_eq!(go_duration(-60), "-1m0s");
        assert_eq!(go_duration(3600), "1h0m0s");
    }

    #[test]
    fn unknown_top_level_key_is_rejected_with_position() {
        let e = parse_policy("{\n  \"acl\": []\n}").unwrap_err();
        assert_eq!(e.pos().line, 2);
        assert!(e.message().contains("unknown field"));
    }

    #[test]
    fn comment_keys_are_allowed_in_rules() {
        let p = parse_policy(
            r##"{"acls": [{"#note": "x", "action": "accept", "src": ["*"], "dst": ["*:*"]}]}"##,
        )
        .unwrap();
        assert_eq!(p.acls.len(), 1);
    }

    #[test]
    fn cap_names() {
        assert!(validate_cap_name("example.com/cap/x").is_ok());
        assert!(validate_cap_name("tailscale.com/cap/relay-target").is_err());
        assert!(validate_cap_name("https://tailscale.com/cap/ingress").is_err());
        assert!(validate_cap_name("nodomain").is_err());
    }
}
