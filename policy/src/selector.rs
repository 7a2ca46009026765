//! Selectors (aliases), ports and protocols.

use std::fmt;

use ipnet::IpNet;

use crate::error::PolicyError;
use crate::model::{parse_prefix, Located, Policy};

/// A selector naming a set of nodes or addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alias {
    /// `*`: every node and every approved subnet route.
    Wildcard,
    /// A user by email.
    User(String),
    /// `user:*@domain`: every user of a domain.
    UserDomain(String),
    /// `group:name`.
    Group(String),
    /// `tag:name`.
    Tag(String),
    /// A `hosts` alias (name kept; prefix resolved through the policy).
    Host(String),
    /// An IP address or CIDR prefix.
    Prefix(IpNet),
    /// `ipset:name`.
    IpSet(String),
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
    /// Parses the part after `autogroup:`.
    pub fn from_name(name: &str) -> Option<AutoGroup> {
        Some(match name {
            "member" => AutoGroup::Member,
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
    /// `autoApprovers`
    Approver,
    /// `ipsets` members
    IpSet,
}

impl AliasContext {
    fn is_dst(self) -> bool {
        matches!(
            self,
            AliasContext::AclDst | AliasContext::GrantDst | AliasContext::SshDst
        )
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

/// Parses one selector as written in `ctx`.
pub fn parse_alias(s: &str, ctx: AliasContext, p: &Policy) -> Result<Alias, String> {
    if s == "*" {
        return Ok(Alias::Wildcard);
    }
    if let Some(name) = s.strip_prefix("autogroup:") {
        let Some(ag) = AutoGroup::from_name(name) else {
            return Err(format!("autogroup {s:?} is not valid"));
        };
        match ag {
            AutoGroup::SelfDevices | AutoGroup::Internet if !ctx.is_dst() => {
                if ag == AutoGroup::SelfDevices && ctx == AliasContext::NodeAttrTarget {
                    return Err(format!("{s:?} cannot be used as a nodeAttrs target"));
                }
                return Err(format!("{s:?} can only be used as a destination"));
            }
            AutoGroup::Internet if ctx == AliasContext::SshDst => {
                return Err(format!("invalid dst {s:?}"));
            }
            AutoGroup::DangerAll if ctx.is_dst() => {
                return Err("cannot use autogroup:danger-all as a dst".into());
            }
            AutoGroup::NonRoot => {
                return Err(format!("{s:?} can only be used in SSH users"));
            }
            _ => {}
        }
        return Ok(Alias::AutoGroup(ag));
    }
    if s.starts_with("group:") {
        if !p.groups.contains_key(s) {
            return Err(format!("group {s:?} not found"));
        }
        return Ok(Alias::Group(s.to_string()));
    }
    if s.starts_with("tag:") {
        if !p.tag_owners.contains_key(s) {
            return Err(tag_not_found(s, ctx));
        }
        return Ok(Alias::Tag(s.to_string()));
    }
    if s.starts_with("ipset:") {
        if ctx != AliasContext::IpSet && !p.ipsets.contains_key(s) {
            return Err(format!("ipset {s:?} not found"));
        }
        return Ok(Alias::IpSet(s.to_string()));
    }
    if let Some(dom) = s.strip_prefix("user:*@") {
        if dom.is_empty() {
            return Err(format!("{s:?}: invalid user"));
        }
        return Ok(Alias::UserDomain(dom.to_string()));
    }
    let user = s.strip_prefix("user:").unwrap_or(s);
    if user.contains('@') {
        return Ok(Alias::User(user.to_string()));
    }
    if let Some(net) = p.hosts.get(s) {
        if ctx == AliasContext::SshDst {
            return Err(format!("invalid dst {s:?}"));
        }
        let _ = net;
        return Ok(Alias::Host(s.to_string()));
    }
    if let Some(net) = parse_prefix(s) {
        if ctx == AliasContext::SshDst {
            return Err(format!("invalid dst {s:?}"));
        }
        return Ok(Alias::Prefix(net));
    }
    if ctx == AliasContext::SshDst {
        return Err(format!("invalid dst {s:?}"));
    }
    Err(format!("{s:?}: invalid address"))
}

/// Parses a port list: `*`, `22`, `80,443`, `1000-2000`.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, Some(b)),
            None => (part, None),
        };
        let first: u16 = a
            .parse()
            .map_err(|_| format!("port range {part:?}: invalid first integer"))?;
        let last: u16 = match b {
            Some(b) => b
                .parse()
                .map_err(|_| format!("port range {part:?}: invalid last integer"))?,
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
        out.push(PortRange { first, last });
    }
    Ok(out)
}

/// Splits an ACL destination `host:ports` (IPv6 as `[addr]:ports`) and parses both halves.
pub fn parse_dst_with_ports(s: &str, p: &Policy) -> Result<(Alias, Vec<PortRange>), String> {
    let (host, ports) = split_host_ports(s);
    let Some(ports) = ports else {
        // No colon: the whole thing is taken as the port list, as the hosted service does.
        let last = s.rsplit(':').next().unwrap_or(s);
        return Err(format!(
            "dst={s:?}: port range {:?}: invalid first integer",
            last.rsplit(':')
                .next()
                .unwrap_or(last)
                .trim_start_matches("autogroup:")
        ));
    };
    let ports = parse_ports(ports).map_err(|e| format!("dst={s:?}: {e}"))?;
    let alias = parse_alias(host, AliasContext::AclDst, p)?;
    Ok((alias, ports))
}

/// Splits `host:ports`; returns `(s, None)` when there is no port part.
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
            if host.is_empty() || host == "autogroup" || host == "tag" || host == "group" {
                return (s, None);
            }
            (host, Some(&s[i + 1..]))
        }
        None => (s, None),
    }
}

/// Parses an IP protocol name or number (1–255).
pub fn parse_proto(s: &str) -> Result<u8, String> {
    let n = match s.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "igmp" => 2,
        "ipv4" | "ip-in-ip" => 4,
        "tcp" => 6,
        "egp" => 8,
        "igp" => 9,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        other => match other.parse::<u16>() {
            Ok(n) if (1..=255).contains(&n) => n as u8,
            _ => return Err(format!("proto {s:?}: invalid protocol")),
        },
    };
    Ok(n)
}

/// Parses a grant `ip` entry: `*`, `tcp:443`, `443`, `80-90`, `icmp:*`, `udp:53,5353`.
pub fn parse_ip_spec(s: &str) -> Result<IpSpec, String> {
    if s == "*" {
        return Ok(IpSpec {
            protos: Vec::new(),
            ports: vec![PortRange::ALL],
        });
    }
    let (protos, ports) = match s.split_once(':') {
        Some((proto, ports)) => (vec![parse_proto(proto)?], ports),
        None => {
            // Either a bare protocol or bare ports.
            if s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
                (vec![parse_proto(s)?], "*")
            } else {
                (Vec::new(), s)
            }
        }
    };
    let ports = parse_ports(ports)?;
    if let [n] = protos[..] {
        if !matches!(n, 6 | 17 | 132) && ports != [PortRange::ALL] {
            return Err(format!(
                "ip {s:?}: ports are only allowed with tcp, udp and sctp"
            ));
        }
    }
    Ok(IpSpec { protos, ports })
}

/// Rejects rules whose destinations include `autogroup:self` while a source is not a user,
/// group, `autogroup:member` (or, for ACLs, `*`).
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
        let ok = matches!(
            s.value,
            Alias::User(_)
                | Alias::Group(_)
                | Alias::UserDomain(_)
                | Alias::AutoGroup(AutoGroup::Member)
        ) || (s.value == Alias::Wildcard && T::WILDCARD_OK);
        if !ok {
            return Err(PolicyError::Invalid {
                message:
                    "autogroup:self can only be used with users, groups, or supported autogroups"
                        .into(),
                path: d.path.clone(),
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
        assert!(parse_ports("0")
            .unwrap_err()
            .contains("first port must be >0"));
        assert!(parse_ports("ssh")
            .unwrap_err()
            .contains("invalid first integer"));
        assert!(parse_ports("99999").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_ports("tag:a:22"), ("tag:a", Some("22")));
        assert_eq!(split_host_ports("[fd7a::1]:22"), ("fd7a::1", Some("22")));
        assert_eq!(split_host_ports("autogroup:self"), ("autogroup:self", None));
        assert_eq!(split_host_ports("*:*"), ("*", Some("*")));
    }

    #[test]
    fn ip_specs() {
        assert_eq!(parse_ip_spec("tcp:443").unwrap().protos, vec![6]);
        assert!(parse_ip_spec("icmp:22").is_err());
        assert_eq!(parse_ip_spec("icmp:*").unwrap().protos, vec![1]);
        assert!(parse_ip_spec("80-90").unwrap().protos.is_empty());
    }
}
