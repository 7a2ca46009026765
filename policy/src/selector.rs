//! Selectors (aliases) and where each kind may be written, ports and protocols.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::error::PolicyError;
use crate::model::{parse_prefix, Located, Policy};

/// A selector naming a set of nodes or addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alias {
    /// `*`: every node and every approved subnet route.
    Wildcard,
    /// A user by login (`alice@example.com`, `bob@github`).
    User(String),
    /// `user:*@domain`: every user of a domain.
    UserDomain(String),
    /// `group:name` (or a synced `group:name@domain`).
    Group(String),
    /// `tag:name` (lower case).
    Tag(String),
    /// A `hosts` alias (name kept; prefix resolved through the policy).
    Host(String),
    /// An IP address or CIDR prefix.
    Prefix(IpNet),
    /// `ipset:name`.
    IpSet(String),
    /// `svc:name`: a Tailscale Service (no nodes of the tailnet model).
    Service(String),
    /// `autogroup:…`.
    AutoGroup(AutoGroup),
}

/// The autogroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AutoGroup {
    /// Nodes of users who are members of the tailnet (untagged nodes).
    Member,
    /// Tagged nodes.
    Tagged,
    /// The source user's own untagged nodes (destinations only).
    SelfDevices,
    /// The public internet through exit nodes (destinations only).
    Internet,
    /// Every address, including outside the tailnet (sources only).
    DangerAll,
    /// Any SSH user but root.
    NonRoot,
    /// Admins of the tailnet.
    Admin,
    /// The tailnet owner.
    Owner,
    /// Users with the network admin role.
    NetworkAdmin,
    /// Users with the IT admin role.
    ItAdmin,
    /// Users with the billing admin role.
    BillingAdmin,
    /// Users with the auditor role.
    Auditor,
    /// Users who have nodes shared to them.
    Shared,
}

impl AutoGroup {
    /// Parses the part after `autogroup:` (`members` is the legacy name of `member`).
    pub fn from_name(name: &str) -> Option<AutoGroup> {
        Some(match name {
            "member" | "members" => AutoGroup::Member,
            "tagged" => AutoGroup::Tagged,
            "self" => AutoGroup::SelfDevices,
            "internet" => AutoGroup::Internet,
            "danger-all" => AutoGroup::DangerAll,
            "nonroot" => AutoGroup::NonRoot,
            "admin" => AutoGroup::Admin,
            "owner" => AutoGroup::Owner,
            "network-admin" => AutoGroup::NetworkAdmin,
            "it-admin" => AutoGroup::ItAdmin,
            "billing-admin" => AutoGroup::BillingAdmin,
            "auditor" => AutoGroup::Auditor,
            "shared" => AutoGroup::Shared,
            _ => return None,
        })
    }

    /// The name after `autogroup:`.
    pub fn name(self) -> &'static str {
        match self {
            AutoGroup::Member => "member",
            AutoGroup::Tagged => "tagged",
            AutoGroup::SelfDevices => "self",
            AutoGroup::Internet => "internet",
            AutoGroup::DangerAll => "danger-all",
            AutoGroup::NonRoot => "nonroot",
            AutoGroup::Admin => "admin",
            AutoGroup::Owner => "owner",
            AutoGroup::NetworkAdmin => "network-admin",
            AutoGroup::ItAdmin => "it-admin",
            AutoGroup::BillingAdmin => "billing-admin",
            AutoGroup::Auditor => "auditor",
            AutoGroup::Shared => "shared",
        }
    }

    /// Whether this autogroup names users by role (resolved to those users' untagged nodes).
    pub fn is_role(self) -> bool {
        matches!(
            self,
            AutoGroup::Admin
                | AutoGroup::Owner
                | AutoGroup::NetworkAdmin
                | AutoGroup::ItAdmin
                | AutoGroup::BillingAdmin
                | AutoGroup::Auditor
        )
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alias::Wildcard => write!(f, "*"),
            Alias::User(u) => write!(f, "{u}"),
            Alias::UserDomain(d) => write!(f, "user:*@{d}"),
            Alias::Group(g) | Alias::Tag(g) | Alias::Host(g) | Alias::IpSet(g) => write!(f, "{g}"),
            Alias::Service(s) => write!(f, "{s}"),
            Alias::Prefix(p) => write!(f, "{p}"),
            Alias::AutoGroup(a) => write!(f, "autogroup:{}", a.name()),
        }
    }
}

/// Where an alias is written; decides which forms are allowed and how errors are worded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasContext {
    /// `acls[].src`
    AclSrc,
    /// `acls[].dst` (host part)
    AclDst,
    /// `grants[].src`
    GrantSrc,
    /// `grants[].dst`
    GrantDst,
    /// `ssh[].src`
    SshSrc,
    /// `ssh[].dst`
    SshDst,
    /// `nodeAttrs[].target`
    NodeAttrTarget,
    /// `autoApprovers` approvers
    Approver,
    /// `tagOwners` owners
    TagOwner,
    /// `tests[].src`
    TestSrc,
    /// `tests[].accept` / `deny` (host part)
    TestDst,
    /// `sshTests[].src`
    SshTestSrc,
    /// `sshTests[].dst`
    SshTestDst,
}

impl AliasContext {
    fn is_dst(self) -> bool {
        matches!(
            self,
            AliasContext::AclDst
                | AliasContext::GrantDst
                | AliasContext::SshDst
                | AliasContext::TestDst
                | AliasContext::SshTestDst
        )
    }

    fn is_network_rule(self) -> bool {
        matches!(
            self,
            AliasContext::AclSrc
                | AliasContext::AclDst
                | AliasContext::GrantSrc
                | AliasContext::GrantDst
        )
    }

    fn is_test(self) -> bool {
        matches!(
            self,
            AliasContext::TestSrc
                | AliasContext::TestDst
                | AliasContext::SshTestSrc
                | AliasContext::SshTestDst
        )
    }

    /// What the location is called in messages.
    fn place(self) -> &'static str {
        match self {
            AliasContext::AclSrc | AliasContext::GrantSrc => "a source",
            AliasContext::AclDst | AliasContext::GrantDst => "a destination",
            AliasContext::SshSrc => "an SSH source",
            AliasContext::SshDst => "an SSH destination",
            AliasContext::NodeAttrTarget => "a nodeAttrs target",
            AliasContext::Approver => "an autoApprovers approver",
            AliasContext::TagOwner => "a tag owner",
            AliasContext::TestSrc => "a tests src",
            AliasContext::TestDst => "a tests destination",
            AliasContext::SshTestSrc => "an sshTests src",
            AliasContext::SshTestDst => "an sshTests destination",
        }
    }

    /// Whether autogroup `ag` may be written here (Tailscale's table of autogroups by
    /// location).
    fn allows_autogroup(self, ag: AutoGroup) -> bool {
        use AliasContext as C;
        use AutoGroup as A;
        match ag {
            A::Member | A::Tagged => !matches!(self, C::SshDst) || ag == A::Tagged,
            role if role.is_role() => self != C::SshDst,
            A::Shared => matches!(self, C::AclSrc | C::GrantSrc),
            A::SelfDevices => matches!(
                self,
                C::AclDst | C::GrantDst | C::SshDst | C::TestDst | C::SshTestDst
            ),
            A::Internet => matches!(self, C::AclDst | C::GrantDst | C::TestDst),
            A::DangerAll => matches!(self, C::AclSrc | C::GrantSrc),
            _ => false,
        }
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: 65535,
    };

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// One `ip` entry of a grant: protocols and ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpSpec {
    /// Protocol numbers; empty = the default set (TCP, UDP, ICMP, ICMPv6).
    pub protos: Vec<u8>,
    /// Port ranges.
    pub ports: Vec<PortRange>,
}

fn tag_not_found(tag: &str, ctx: AliasContext) -> String {
    match ctx {
        AliasContext::AclSrc => format!("src=tag not found: {tag:?}"),
        AliasContext::AclDst => format!("dst={tag:?}: tag not found: {tag:?}"),
        AliasContext::GrantSrc | AliasContext::GrantDst => format!("tag {tag:?} not found"),
        _ => format!("tag not found: {tag:?}"),
    }
}

/// Checks a tag name: `tag:` then a letter, then letters, digits, `-` and `_`.
pub fn valid_tag_name(tag: &str) -> bool {
    let Some(name) = tag.strip_prefix("tag:") else {
        return false;
    };
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `s` is written like a user login (`local@domain`, no wildcard).
pub fn is_login(s: &str) -> bool {
    // One pass over the bytes (these are ASCII; other characters are allowed).
    let mut at = None;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'@' if at.is_none() => at = Some(i),
            b'@' | b'*' | b' ' | b',' | b':' | b'/' => return false,
            _ => {}
        }
    }
    at.is_some_and(|i| i > 0 && i + 1 < s.len())
}

/// Why an unrecognised selector is invalid: the service's words, then what it could have meant.
fn invalid_address(s: &str, p: &Policy) -> String {
    let mut hints = Vec::new();
    if !s.contains(['@', ':', '/']) && !s.is_empty() {
        if !p.hosts.is_empty() || s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            hints.push(format!("no host {s:?} is defined in \"hosts\""));
        }
        hints.push(format!(
            "users are named by their login, e.g. \"{s}@example.com\""
        ));
    }
    if hints.is_empty() {
        format!("{s:?}: invalid address")
    } else {
        format!("{s:?}: invalid address ({})", hints.join("; "))
    }
}

fn not_here(s: &str, ctx: AliasContext) -> String {
    match ctx {
        AliasContext::SshDst => format!("invalid dst {s:?}: not allowed as an SSH destination"),
        AliasContext::SshTestDst => format!("SSH tests dst contains disallowed element {s:?}"),
        _ => format!("{s:?} cannot be used as {}", ctx.place()),
    }
}

/// Parses one selector as written in `ctx`.
pub fn parse_alias(s: &str, ctx: AliasContext, p: &Policy) -> Result<Alias, String> {
    use AliasContext as C;
    if s == "*" {
        return match ctx {
            C::AclSrc | C::AclDst | C::GrantSrc | C::GrantDst | C::NodeAttrTarget => {
                Ok(Alias::Wildcard)
            }
            C::SshSrc => Err("invalid src \"*\": SSH sources name users, groups, tags or autogroups"
                .into()),
            C::SshDst => Err(
                "invalid dst \"*\": SSH destinations are tags, autogroup:tagged, autogroup:self or the source user"
                    .into(),
            ),
            C::TestSrc | C::TestDst | C::SshTestSrc => Err(format!(
                "\"*\" cannot be used as {}: tests name one user, group, tag, host or IP",
                ctx.place()
            )),
            _ => Err(not_here(s, ctx)),
        };
    }
    if let Some(name) = s.strip_prefix("autogroup:") {
        let Some(ag) = AutoGroup::from_name(name) else {
            return Err(format!("autogroup {s:?} is not valid"));
        };
        if ctx.allows_autogroup(ag) {
            return Ok(Alias::AutoGroup(ag));
        }
        return Err(match ag {
            AutoGroup::DangerAll if ctx.is_dst() => {
                "cannot use autogroup:danger-all as a dst".to_string()
            }
            AutoGroup::SelfDevices if ctx == C::NodeAttrTarget => {
                format!("{s:?} cannot be used as a nodeAttrs target")
            }
            AutoGroup::SelfDevices | AutoGroup::Internet if ctx.is_network_rule() => {
                format!("{s:?} can only be used as a destination")
            }
            AutoGroup::NonRoot => format!("{s:?} can only be used in SSH users"),
            _ => not_here(s, ctx),
        });
    }
    if let Some(name) = s.strip_prefix("group:") {
        if ctx == C::SshDst {
            return Err(format!(
                "invalid dst {s:?}: SSH to users' devices is written autogroup:self (or the source user)"
            ));
        }
        // Groups synced from an identity provider (`group:name@domain`) are not defined in
        // the file.
        let synced = name.contains('@') && !name.starts_with('@');
        if !synced && !p.groups.contains_key(s) {
            return Err(format!("group {s:?} not found"));
        }
        return Ok(Alias::Group(s.to_string()));
    }
    if s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("tag:")) {
        let tag = s.to_ascii_lowercase();
        if !p.tag_owners.contains_key(&tag) {
            return Err(tag_not_found(s, ctx));
        }
        return Ok(Alias::Tag(tag));
    }
    if s.starts_with("ipset:") {
        if !ctx.is_network_rule() {
            return Err(not_here(s, ctx));
        }
        if !p.ipsets.contains_key(s) {
            return Err(format!("ipset {s:?} not found"));
        }
        return Ok(Alias::IpSet(s.to_string()));
    }
    if let Some(name) = s.strip_prefix("svc:") {
        if !matches!(ctx, C::GrantDst | C::TestDst) {
            return Err(format!(
                "{s:?} cannot be used as {}: services are grant destinations",
                ctx.place()
            ));
        }
        if name.is_empty() {
            return Err(format!("{s:?}: invalid service name"));
        }
        return Ok(Alias::Service(s.to_string()));
    }
    if s.starts_with("posture:") {
        return Err(format!(
            "{s:?} cannot be used as {}: postures go in srcPosture",
            ctx.place()
        ));
    }
    if s.starts_with("localpart:") {
        return Err(format!("{s:?}: localpart: can only be used in SSH users"));
    }
    if let Some(dom) = s.strip_prefix("user:*@") {
        if dom.is_empty() || dom.contains(['*', '@']) {
            return Err(format!("{s:?}: invalid user"));
        }
        if matches!(
            ctx,
            C::SshDst | C::TestDst | C::SshTestDst | C::TestSrc | C::SshTestSrc
        ) {
            return Err(not_here(s, ctx));
        }
        return Ok(Alias::UserDomain(dom.to_ascii_lowercase()));
    }
    if let Some(name) = s.strip_prefix("host:") {
        return host_alias(name, s, ctx, p);
    }
    let user = s.strip_prefix("user:").unwrap_or(s);
    if user.contains('@') {
        if !is_login(user) {
            return Err(format!(
                "{s:?}: invalid user: a user is named by their login, e.g. \"alice@example.com\""
            ));
        }
        return Ok(Alias::User(user.to_string()));
    }
    if p.hosts.contains_key(s) {
        return host_alias(s, s, ctx, p);
    }
    if let Some(net) = parse_prefix(s) {
        return match ctx {
            C::SshSrc | C::SshDst | C::TagOwner | C::Approver => Err(match ctx {
                C::SshDst => format!("invalid dst {s:?}"),
                _ => not_here(s, ctx),
            }),
            C::TestSrc | C::TestDst if net.prefix_len() != net.max_prefix_len() => Err(format!(
                "{s:?} is a range: {} must be a single address",
                ctx.place()
            )),
            C::SshTestDst | C::SshTestSrc if net.prefix_len() != net.max_prefix_len() => {
                Err(format!("SSH tests dst contains disallowed element {s:?}"))
            }
            _ => Ok(Alias::Prefix(net)),
        };
    }
    if crate::ipset::parse_range(s).is_some() {
        return Err(format!("{s:?}: IP ranges can only be used in ipsets"));
    }
    if ctx == C::SshDst {
        return Err(format!("invalid dst {s:?}"));
    }
    Err(invalid_address(s, p))
}

fn host_alias(name: &str, written: &str, ctx: AliasContext, p: &Policy) -> Result<Alias, String> {
    use AliasContext as C;
    let Some(net) = p.hosts.get(name) else {
        return Err(format!(
            "{written:?}: host {name:?} is not defined in \"hosts\""
        ));
    };
    match ctx {
        C::SshSrc | C::SshDst => Err(format!(
            "invalid {} {written:?}: SSH rules name users, groups, tags and autogroups, not hosts",
            if ctx == C::SshSrc { "src" } else { "dst" }
        )),
        C::TagOwner | C::Approver => Err(not_here(written, ctx)),
        _ if ctx.is_test() && net.prefix_len() != net.max_prefix_len() => Err(format!(
            "{written:?} is the range {net}: {} must be a single address",
            ctx.place()
        )),
        _ => Ok(Alias::Host(name.to_string())),
    }
}

/// Parses an ACL port list: `*`, `22`, `80,443`, `1000-2000`, `22,8000-8100`.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        out.push(parse_port_range(part.trim())?);
    }
    Ok(out)
}

/// Parses one port or range `a-b` (1–65535).
fn parse_port_range(part: &str) -> Result<PortRange, String> {
    if part == "*" {
        return Ok(PortRange::ALL);
    }
    if part.is_empty() {
        return Err(format!("invalid port list: {part:?}"));
    }
    if part.matches('-').count() > 1 {
        return Err(format!("port range {part:?}: too many dashes(-)"));
    }
    let (a, b) = match part.split_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (part, None),
    };
    let digits = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_digit());
    let first: u16 = a
        .parse()
        .ok()
        .filter(|_| digits(a))
        .ok_or_else(|| format!("port range {part:?}: invalid first integer"))?;
    let last: u16 = match b {
        Some(b) => b
            .parse()
            .ok()
            .filter(|_| digits(b))
            .ok_or_else(|| format!("port range {part:?}: invalid last integer"))?,
        None => first,
    };
    if first == 0 {
        return Err(format!(
            "port range {part:?}: first port must be >0, or use '*' for wildcard"
        ));
    }
    if last < first {
        return Err(format!(
            "port range {part:?}: last port must be >= first port"
        ));
    }
    Ok(PortRange { first, last })
}

/// Splits `host:ports` at the last colon (IPv6 may be written `[addr]:ports`); returns
/// `(s, None)` when there is no port part.
pub fn split_host_ports(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            return (h, tail.strip_prefix(':'));
        }
    }
    match s.rfind(':') {
        Some(i) => {
            let host = &s[..i];
            // `autogroup:self` alone has a colon but no port.
            if host.is_empty()
                || ["autogroup", "tag", "group", "ipset", "host", "svc", "user"]
                    .iter()
                    .any(|p| host.eq_ignore_ascii_case(p))
            {
                return (s, None);
            }
            (host, Some(&s[i + 1..]))
        }
        None => (s, None),
    }
}

/// Parses an ACL destination `host:ports` and its host.
pub(crate) fn parse_dst_with_ports(s: &str, p: &Policy) -> Result<(Alias, Vec<PortRange>), String> {
    let (host, ports) = split_host_ports(s);
    let Some(ports) = ports else {
        // No port: the service reads the last word as the port list; say what is missing.
        let last = s.rsplit(':').next().unwrap_or(s);
        let example = if parse_alias(s, AliasContext::AclDst, p).is_ok() {
            format!("\"{s}:*\" or \"{s}:22\"")
        } else {
            "\"tag:server:22\" or \"10.0.0.0/8:*\"".to_string()
        };
        return Err(format!(
            "dst={s:?}: port range {last:?}: invalid first integer (a destination is host:ports, e.g. {example})"
        ));
    };
    if host.contains(',') {
        return Err(format!(
            "dst={s:?}: host cannot contain a comma (\",\"); list each destination separately"
        ));
    }
    let ports = parse_ports(ports).map_err(|e| format!("dst={s:?}: {e}"))?;
    let alias = parse_alias(host, AliasContext::AclDst, p)?;
    Ok((alias, ports))
}

/// The IP protocol names Tailscale knows, with their numbers.
const PROTO_NAMES: &[(&str, u8)] = &[
    ("icmp", 1),
    ("icmpv4", 1),
    ("igmp", 2),
    ("ipv4", 4),
    ("ip-in-ip", 4),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("icmpv6", 58),
    ("tsmp", 99),
    ("sctp", 132),
];

/// Parses an IP protocol name (any case) or number (1–255).
pub fn parse_proto(s: &str) -> Result<u8, String> {
    let t = s.trim();
    if let Some((_, n)) = PROTO_NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(t)) {
        return Ok(*n);
    }
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return match t.parse::<u16>() {
            Ok(n @ 1..=255) => Ok(n as u8),
            Ok(0) => Err(
                "proto \"0\" is not an IP protocol; leave proto out for TCP, UDP and ICMP".into(),
            ),
            _ => Err(format!("proto {t:?}: protocol numbers go from 1 to 255")),
        };
    }
    Err(format!(
        "proto name {t:?} not known; use protocol number 0-255 (or tcp, udp, icmp, sctp, gre, esp, ah, igmp, ipv6-icmp ...)"
    ))
}

/// Whether a protocol carries ports.
pub fn proto_has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// Parses a grant `ip` entry: `*`, `443`, `80-90`, `tcp:443`, `udp:*`, `icmp:*`, `6:22`,
/// `*:443` (protocol, then one port or range).
pub fn parse_ip_spec(s: &str) -> Result<IpSpec, String> {
    let t = s.trim().to_ascii_lowercase();
    if t.is_empty() {
        return Err("ip entry is empty: use \"*\", a port, or proto:port".into());
    }
    if t == "*" {
        return Ok(IpSpec {
            protos: Vec::new(),
            ports: vec![PortRange::ALL],
        });
    }
    let (proto, ports) = match t.rfind(':') {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => ("*", t.as_str()),
    };
    if proto.is_empty() {
        return Err(format!("ip {s:?}: no protocol specified"));
    }
    let ports = match parse_port_range(ports) {
        Ok(r) => vec![r],
        Err(e) => {
            let hint = if PROTO_NAMES.iter().any(|(n, _)| *n == ports) {
                format!(" (for every {ports} port write \"{ports}:*\")")
            } else if ports.contains(',') {
                " (one port or range per entry: write [\"80\", \"443\"])".to_string()
            } else {
                String::new()
            };
            return Err(format!("{e}{hint}"));
        }
    };
    let protos = if proto == "*" {
        Vec::new()
    } else {
        vec![parse_proto(proto)?]
    };
    if let [n] = protos[..] {
        if !proto_has_ports(n) && ports != [PortRange::ALL] {
            return Err(format!(
                "ip {s:?}: ports are only allowed with tcp, udp and sctp; write \"{proto}:*\""
            ));
        }
    }
    Ok(IpSpec { protos, ports })
}

/// Whether `s` is an IP address, bracketed or not.
pub(crate) fn bare_ip(s: &str) -> Option<IpAddr> {
    s.strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s)
        .parse()
        .ok()
}

/// Rejects rules whose destinations include `autogroup:self` while a source is not a user,
/// group, `autogroup:member` or a role (or, for ACLs, `*`).
pub(crate) fn check_self_sources<T>(
    src: &[Located<Alias>],
    dst: &[Located<T>],
) -> Result<(), PolicyError>
where
    T: SelfCheck,
{
    let Some(d) = dst.iter().find(|d| d.value.is_self()) else {
        return Ok(());
    };
    for s in src {
        let ok = match &s.value {
            Alias::User(_) | Alias::Group(_) | Alias::UserDomain(_) => true,
            Alias::AutoGroup(AutoGroup::Member) => true,
            Alias::AutoGroup(a) => a.is_role(),
            Alias::Wildcard => T::WILDCARD_OK,
            _ => false,
        };
        if !ok {
            return Err(PolicyError::Invalid {
                message: format!(
                    "autogroup:self can only be used with users, groups, or supported autogroups (src {:?} is not one)",
                    s.text
                ),
                path: d.path.to_string(),
                pos: d.pos,
            });
        }
    }
    Ok(())
}

/// Destinations that may be `autogroup:self`.
pub(crate) trait SelfCheck {
    /// Whether `*` is an allowed source alongside `autogroup:self`.
    const WILDCARD_OK: bool;
    /// Whether this destination is `autogroup:self`.
    fn is_self(&self) -> bool;
}

impl SelfCheck for Alias {
    const WILDCARD_OK: bool = false;
    fn is_self(&self) -> bool {
        *self == Alias::AutoGroup(AutoGroup::SelfDevices)
    }
}

impl SelfCheck for (Alias, Vec<PortRange>) {
    const WILDCARD_OK: bool = true;
    fn is_self(&self) -> bool {
        self.0 == Alias::AutoGroup(AutoGroup::SelfDevices)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_ports("*").unwrap(), vec![PortRange::ALL]);
        assert_eq!(
            parse_ports("80,443").unwrap(),
            vec![
                PortRange {
                    first: 80,
                    last: 80
                },
                PortRange {
                    first: 443,
                    last: 443
                }
            ]
        );
        assert_eq!(parse_ports("22,8000-8100").unwrap().len(), 2);
        assert!(parse_ports("0")
            .unwrap_err()
            .contains("first port must be >0"));
        assert!(parse_ports("ssh")
            .unwrap_err()
            .contains("invalid first integer"));
        assert!(parse_ports("1-2-3")
            .unwrap_err()
            .contains("too many dashes"));
        assert!(parse_ports("+22").is_err());
        assert!(parse_ports("99999").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_ports("tag:a:22"), ("tag:a", Some("22")));
        assert_eq!(split_host_ports("[fd7a::1]:22"), ("fd7a::1", Some("22")));
        assert_eq!(split_host_ports("fd7a::/48:*"), ("fd7a::/48", Some("*")));
        assert_eq!(split_host_ports("autogroup:self"), ("autogroup:self", None));
        assert_eq!(split_host_ports("*:*"), ("*", Some("*")));
    }

    #[test]
    fn ip_specs() {
        assert_eq!(parse_ip_spec("tcp:443").unwrap().protos, vec![6]);
        assert_eq!(parse_ip_spec("TCP:80-443").unwrap().ports[0].last, 443);
        assert_eq!(parse_ip_spec("6:22").unwrap().protos, vec![6]);
        assert!(parse_ip_spec("*:443").unwrap().protos.is_empty());
        assert!(parse_ip_spec("icmp:22").is_err());
        assert_eq!(parse_ip_spec("icmp:*").unwrap().protos, vec![1]);
        assert_eq!(parse_ip_spec("47:*").unwrap().protos, vec![47]);
        assert!(parse_ip_spec("80-90").unwrap().protos.is_empty());
        // A bare protocol name is read as a port list, as the service does.
        assert!(parse_ip_spec("icmp")
            .unwrap_err()
            .contains("port range \"icmp\": invalid first integer"));
        assert!(parse_ip_spec("tcp:80,443").is_err());
        assert!(parse_ip_spec("").is_err());
        assert!(parse_ip_spec(":22").is_err());
        assert!(parse_ip_spec("bogus:22").unwrap_err().contains("not known"));
    }

    #[test]
    fn protos() {
        assert_eq!(parse_proto("ICMP").unwrap(), 1);
        assert_eq!(parse_proto("ipv6-icmp").unwrap(), 58);
        assert_eq!(parse_proto("16").unwrap(), 16);
        assert!(parse_proto("0").is_err());
        assert!(parse_proto("256").is_err());
        assert!(parse_proto("ssh").is_err());
    }

    #[test]
    fn multibyte_text_is_an_error_not_a_panic() {
        let p = Policy::default();
        for s in ["taĂ:x", "tĂ", "Ă", "autogroup:Ă", "Ăgroup:x", "tag:Ă"] {
            assert!(parse_alias(s, AliasContext::AclSrc, &p).is_err(), "{s}");
        }
    }

    #[test]
    fn logins() {
        assert!(is_login("alice@example.com"));
        assert!(is_login("bob@github"));
        assert!(!is_login("alice"));
        assert!(!is_login("@example.com"));
        assert!(!is_login("a@"));
        assert!(!is_login("*@example.com"));
        assert!(!is_login("a@b@c"));
        assert!(!is_login("a b@c"));
        assert!(!is_login("a@b:c"));
        assert!(!is_login("a@b/c"));
        assert!(!is_login("a,b@c"));
        assert!(is_login("é@ü"));
    }
}
