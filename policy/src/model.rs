//! The typed policy model, read from the positioned HuJSON tree with strict validation.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::decode::{each_string, invalid, Ctx, Fields};
use crate::error::PolicyError;
use crate::hujson::{self, Pos, Value};
use crate::ipset::AddrSet;
use crate::posture::{parse_condition, Posture, PostureAttrs, PostureValue};
use crate::selector::{
    bare_ip, is_login, parse_alias, parse_dst_with_ports, parse_ip_spec, parse_proto,
    proto_has_ports, split_host_ports, valid_tag_name, AliasContext, IpSpec, PortRange,
};
pub use crate::selector::{Alias, AutoGroup};

/// A validated policy file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// `groups`: group name (with `group:` prefix) → member logins (groups may not nest);
    /// shared with the policy an edit was read against where the edit left the group alone.
    pub groups: BTreeMap<String, Arc<Vec<String>>>,
    /// `tagOwners`: tag (lower case) → owners (users, groups, tags, autogroups).
    pub tag_owners: BTreeMap<String, Vec<Located<Alias>>>,
    /// `hosts`: alias → prefix.
    pub hosts: BTreeMap<String, IpNet>,
    /// `ipsets`: name (with `ipset:` prefix) → the set's addresses as prefixes (after every
    /// `add` and `remove`, nested sets and host aliases expanded).
    pub ipsets: BTreeMap<String, Vec<IpNet>>,
    /// `postures`: name (with `posture:` prefix) → its conditions.
    pub postures: BTreeMap<String, Posture>,
    /// `defaultSrcPosture`: postures for every `acls`/`grants` rule without its own.
    pub default_src_posture: Vec<String>,
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
    /// `OneCGNATRoute` (`""`, `"mac-always"`, `"mac-never"`).
    pub one_cgnat_route: Option<String>,
    /// `derpMap`, kept as JSON (validated for shape).
    pub derp_map: Option<serde_json::Value>,
    /// `attrConfig`, kept as JSON (validated for shape).
    pub attr_config: Option<serde_json::Value>,
    /// Whether the file had an `acls` key or a `grants` key at all (absent both = allow all).
    pub has_rules: bool,
    /// Things that are accepted but probably not what was meant.
    pub warnings: Vec<PolicyWarning>,
}

impl Policy {
    /// The postures a rule's sources must satisfy: its own `srcPosture`, else
    /// `defaultSrcPosture` (`ssh` rules use only their own).
    pub fn rule_postures<'a>(&'a self, own: &'a [String]) -> &'a [String] {
        if own.is_empty() {
            &self.default_src_posture
        } else {
            own
        }
    }
}

/// A point of a valid policy worth telling its author about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    /// What is odd.
    pub message: String,
    /// JSON path.
    pub path: String,
    /// Position in the source.
    pub pos: Pos,
}

/// An alias as written, with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    /// The parsed value.
    pub value: T,
    /// The text as written (trimmed).
    pub text: Arc<str>,
    /// JSON path.
    pub path: Arc<str>,
    /// Position in the source.
    pub pos: Pos,
}

/// An `acls` entry (action is always `accept`).
#[derive(Debug, Clone, PartialEq)]
pub struct Acl {
    /// Sources (`src`, or the legacy `users`).
    pub src: Vec<Located<Alias>>,
    /// Destinations with their ports (`dst`, or the legacy `ports`).
    pub dst: Vec<Located<(Alias, Vec<PortRange>)>>,
    /// IP protocol numbers; empty means the default (TCP, UDP, ICMP, ICMPv6).
    pub protos: Vec<u8>,
    /// `srcPosture`: posture names (any may match).
    pub src_posture: Vec<String>,
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
    /// `srcPosture`: posture names (any may match).
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
    /// `checkPeriod` in seconds (check rules only; `Some(0)` = `always`); `None` = default
    /// (12h).
    pub check_period_secs: Option<u64>,
    /// `acceptEnv` patterns.
    pub accept_env: Vec<String>,
    /// `srcPosture`: posture names (any may match).
    pub src_posture: Vec<String>,
    /// `recorder`: tags of the session recorder nodes.
    pub recorder: Vec<String>,
    /// `enforceRecorder`: refuse sessions that cannot be recorded.
    pub enforce_recorder: bool,
}

/// A `tests` destination: one host and one port, or a bare host (any port).
#[derive(Debug, Clone, PartialEq)]
pub struct TestDst {
    /// The host.
    pub host: Alias,
    /// The port (0 only for port-less protocols such as ICMP); `None` for a bare host, as in
    /// Tailscale's default policy (`"accept": ["tag:example"]`): reachable on some port.
    pub port: Option<u16>,
}

/// A `tests` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AclTest {
    /// `src` (or the legacy `user`).
    pub src: Located<Alias>,
    /// `proto`, when given.
    pub proto: Option<u8>,
    /// `accept` (or the legacy `allow`) destinations.
    pub accept: Vec<Located<TestDst>>,
    /// `deny` destinations.
    pub deny: Vec<Located<TestDst>>,
    /// `srcPostureAttrs`: the posture the source is tested with.
    pub src_posture_attrs: PostureAttrs,
    /// Where the entry is.
    pub pos: Pos,
}

/// An `sshTests` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SshTest {
    /// `src`.
    pub src: Located<Alias>,
    /// `dst`.
    pub dst: Vec<Located<Alias>>,
    /// Users that must be accepted.
    pub accept: Vec<String>,
    /// Users that must be allowed after a check.
    pub check: Vec<String>,
    /// Users that must be denied.
    pub deny: Vec<String>,
    /// `srcPostureAttrs`: the posture the source is tested with.
    pub src_posture_attrs: PostureAttrs,
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
    /// `services`: a service (`svc:`) or the services of a tag → who may host it.
    pub services: Vec<(String, Vec<Located<Alias>>)>,
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
    "attrConfig",
];

/// Parses and validates a policy file: everything Tailscale's service checks when a policy
/// is saved that needs no tailnet (`tests` are checked for form here and run against a
/// tailnet by netmap-core).
pub fn parse_policy(text: &str) -> Result<Policy, PolicyError> {
    Ok(parse_policy_spans(text)?.0)
}

/// Where the members of the top-level object, and of its `groups`, lie in the text a policy
/// was read from: what lets [`reparse_policy`] take the groups and sections that an edit
/// leaves alone from the policy before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSpans {
    groups: Vec<hujson::MemberSpan>,
    top: Vec<hujson::MemberSpan>,
}

/// [`parse_policy`], also telling where the text's groups lie (for [`reparse_policy`]).
pub fn parse_policy_spans(text: &str) -> Result<(Policy, GroupSpans), PolicyError> {
    let read = hujson::parse_groups_reusing(text, &mut |_, _, _, _| None)?;
    let spans = GroupSpans {
        groups: read.groups,
        top: read.top,
    };
    Ok((read_policy(&read.root, &HashMap::new(), None)?, spans))
}

/// The top-level sections [`reparse_policy`] may take from the policy before an edit (as
/// written: other spellings are read). What they read of the rest of the policy is the
/// names it defines (groups, tags, hosts, ipsets, postures); the groups, hosts, tag owners,
/// ipsets and postures are read each time.
const TAKEN_SECTIONS: &[&str] = &[
    "tagOwners",
    "acls",
    "grants",
    "ssh",
    "autoApprovers",
    "nodeAttrs",
    "tests",
    "sshTests",
];

/// The sections of [`TAKEN_SECTIONS`] that read the hosts' values, not only their names (a
/// test's host must be a single address): read again when the hosts are edited.
const HOSTS_READ_BY: &[&str] = &["tests", "sshTests"];

/// How an edit moves the positions after it: a position on the line the edit ends on moves
/// along that line, one on a later line moves by the lines the edit added or removed.
#[derive(Debug, Clone, Copy)]
struct Shift {
    /// Where the edit ends in the old text, and in the new.
    old: Pos,
    new: Pos,
}

impl Shift {
    fn apply(&self, p: Pos) -> Pos {
        let moved = |x: u32, from: u32, to: u32| {
            u32::try_from(i64::from(x) - i64::from(from) + i64::from(to)).unwrap_or(x)
        };
        if p.line == self.old.line {
            Pos {
                line: self.new.line,
                column: moved(p.column, self.old.column, self.new.column),
            }
        } else {
            Pos {
                line: moved(p.line, self.old.line, self.new.line),
                column: p.column,
            }
        }
    }
}

/// Moves the positions a part of a policy holds.
trait ShiftPositions {
    fn shift(&mut self, by: &Shift);
}

impl<T> ShiftPositions for Located<T> {
    fn shift(&mut self, by: &Shift) {
        self.pos = by.apply(self.pos);
    }
}

impl<T: ShiftPositions> ShiftPositions for Vec<T> {
    fn shift(&mut self, by: &Shift) {
        self.iter_mut().for_each(|x| x.shift(by));
    }
}

impl<K, T: ShiftPositions> ShiftPositions for (K, T) {
    fn shift(&mut self, by: &Shift) {
        self.1.shift(by);
    }
}

impl<K, T: ShiftPositions> ShiftPositions for BTreeMap<K, T> {
    fn shift(&mut self, by: &Shift) {
        self.values_mut().for_each(|x| x.shift(by));
    }
}

impl ShiftPositions for Acl {
    fn shift(&mut self, by: &Shift) {
        self.src.shift(by);
        self.dst.shift(by);
    }
}

impl ShiftPositions for Grant {
    fn shift(&mut self, by: &Shift) {
        self.src.shift(by);
        self.dst.shift(by);
    }
}

impl ShiftPositions for SshRule {
    fn shift(&mut self, by: &Shift) {
        self.src.shift(by);
        self.dst.shift(by);
    }
}

impl ShiftPositions for AclTest {
    fn shift(&mut self, by: &Shift) {
        self.src.shift(by);
        self.accept.shift(by);
        self.deny.shift(by);
        self.pos = by.apply(self.pos);
    }
}

impl ShiftPositions for SshTest {
    fn shift(&mut self, by: &Shift) {
        self.src.shift(by);
        self.dst.shift(by);
        self.pos = by.apply(self.pos);
    }
}

impl ShiftPositions for AutoApprovers {
    fn shift(&mut self, by: &Shift) {
        self.routes.shift(by);
        self.exit_node.shift(by);
        self.services.shift(by);
    }
}

impl ShiftPositions for NodeAttr {
    fn shift(&mut self, by: &Shift) {
        self.target.shift(by);
    }
}

/// The top-level sections [`reparse_policy`] takes from the policy before an edit: that
/// policy, and each section taken with whether it lies after the edit (its positions moved).
struct Taken<'a> {
    old: &'a Policy,
    sections: HashMap<String, bool>,
    shift: Shift,
}

impl Taken<'_> {
    /// Section `name` (read at `c`) as taken, if it was.
    fn section<T: Clone + ShiftPositions>(
        &self,
        name: &str,
        c: &Ctx<'_>,
        part: impl Fn(&Policy) -> &T,
    ) -> Option<T> {
        let after = *self.sections.get(name).filter(|_| c.is_null())?;
        let mut v = part(self.old).clone();
        if after {
            v.shift(&self.shift);
        }
        Some(v)
    }
}

/// Whether two policies define the same names that the taken sections read (and the same
/// hosts, unless `hosts_reread`: the sections that read the hosts' values were read again).
fn same_names(a: &Policy, b: &Policy, hosts_reread: bool) -> bool {
    a.groups.keys().eq(b.groups.keys())
        && a.tag_owners.keys().eq(b.tag_owners.keys())
        && (a.hosts == b.hosts || (hosts_reread && a.hosts.keys().eq(b.hosts.keys())))
        && a.ipsets.keys().eq(b.ipsets.keys())
        && a.postures.keys().eq(b.postures.keys())
}

/// [`parse_policy_spans`] of `text`, an edit of `old_text` (which was read into `old`, its
/// groups and sections lying at `old_spans`): a group whose text lies wholly in the part the
/// two texts start with, or in the part they end with, is not read again but taken from
/// `old` (a group's members carry no position, and those bytes passed every check before);
/// so is a section of [`TAKEN_SECTIONS`] (its positions moved by the edit when it follows
/// it), unless `old` had warnings (a taken section adds none) or uses
/// `autogroup:members` (checked across sections), and if the edit changed the names the
/// sections read, the text is read whole. The result is the same as
/// [`parse_policy_spans`]'s, errors included (an error is reported by reading the whole
/// text).
pub fn reparse_policy(
    text: &str,
    old_text: &str,
    old: &Policy,
    old_spans: &GroupSpans,
) -> Result<(Policy, GroupSpans), PolicyError> {
    let (a, b) = (old_text.as_bytes(), text.as_bytes());
    let prefix = common_prefix(a, b);
    let room = a.len().min(b.len()) - prefix;
    let suffix = common_suffix(a, b).min(room);
    // Old offsets in the common tail move by `shift` (new = old + shift).
    let tail_new = b.len() - suffix;
    let tail_old = a.len() - suffix;
    let by_key: HashMap<usize, &hujson::MemberSpan> =
        old_spans.groups.iter().map(|m| (m.key, m)).collect();
    let top_by_key: HashMap<usize, &hujson::MemberSpan> =
        old_spans.top.iter().map(|m| (m.key, m)).collect();
    // An edit of the hosts changes what the tests read (whether a host they name is a
    // single address): they are read again. The other sections read the hosts' names
    // alone, which are compared after reading.
    let edits_hosts = old_spans
        .top
        .iter()
        .any(|m| m.name.eq_ignore_ascii_case("hosts") && m.key <= tail_old && prefix <= m.end);
    let sections_ok = old.warnings.is_empty() && !old_text.contains("autogroup:members");
    // Sections offered for taking, with whether they lie after the edit.
    let mut offered: HashMap<String, bool> = HashMap::new();
    let mut reuse = |top: bool, name: &str, key: usize, value: usize| -> Option<usize> {
        if top
            && !(sections_ok
                && TAKEN_SECTIONS.contains(&name)
                && !(edits_hosts && HOSTS_READ_BY.contains(&name)))
        {
            return None;
        }
        let index = if top { &top_by_key } else { &by_key };
        let (m, shift) = if key >= tail_new {
            let old_key = key - tail_new + tail_old;
            (*index.get(&old_key)?, b.len() as isize - a.len() as isize)
        } else {
            let m = *index.get(&key)?;
            if m.end > prefix {
                return None;
            }
            (m, 0)
        };
        let moved = |x: usize| usize::try_from(x as isize + shift).ok();
        if m.name != name || moved(m.value)? != value || !(top || old.groups.contains_key(name)) {
            return None;
        }
        if top {
            offered.insert(name.to_string(), key >= tail_new);
        }
        moved(m.end)
    };
    let read = hujson::parse_groups_reusing(text, &mut reuse)
        .map_err(PolicyError::from)
        .and_then(|read| {
            let from_old: HashMap<&str, &Arc<Vec<String>>> = read
                .reused
                .iter()
                .filter_map(|&i| read.groups.get(i))
                .filter_map(|m| old.groups.get_key_value(&m.name))
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            // A section offered is taken where the tree holds `null` for it (see
            // `Taken::section`): where the parser stepped over it.
            let taken = (!offered.is_empty()).then(|| Taken {
                old,
                sections: offered,
                shift: Shift {
                    old: hujson::pos_at(old_text, tail_old),
                    new: hujson::pos_at(text, tail_new),
                },
            });
            let policy = read_policy(&read.root, &from_old, taken.as_ref())?;
            if taken.is_some() && !same_names(old, &policy, edits_hosts) {
                // The taken sections would read other names: read them again.
                return parse_policy_spans(text);
            }
            let spans = GroupSpans {
                groups: read.groups,
                top: read.top,
            };
            Ok((policy, spans))
        });
    // An error is reported as reading the whole text reports it.
    read.or_else(|_| parse_policy_spans(text))
}

/// How many bytes `a` and `b` start with alike (compared a block at a time).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let blocks = a
        .chunks_exact(64)
        .zip(b.chunks_exact(64))
        .take_while(|(x, y)| x == y)
        .count()
        * 64;
    blocks + common_len(a[blocks..].iter(), b[blocks..].iter())
}

/// How many bytes `a` and `b` end with alike (compared a block at a time).
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let blocks = a
        .rchunks_exact(64)
        .zip(b.rchunks_exact(64))
        .take_while(|(x, y)| x == y)
        .count()
        * 64;
    let rest = n - blocks;
    blocks + common_len(a[..rest].iter().rev(), b[..rest].iter().rev())
}

fn common_len<'a>(a: impl Iterator<Item = &'a u8>, b: impl Iterator<Item = &'a u8>) -> usize {
    a.zip(b).take_while(|(x, y)| x == y).count()
}

/// Reads a policy from its tree; `groups` members whose values are `from_old`'s were not
/// read (their values in the tree are `null`).
fn read_policy(
    root: &hujson::Node,
    from_old: &HashMap<&str, &Arc<Vec<String>>>,
    taken: Option<&Taken<'_>>,
) -> Result<Policy, PolicyError> {
    let top = Ctx::root(root);
    if !matches!(root.value, Value::Object(_)) {
        return Err(top.err(format!(
            "the policy must be a JSON object, not {}",
            root.value.kind()
        )));
    }
    let f = top.fields("the policy", TOP_KEYS, false)?;
    check_member_spellings(root)?;
    let mut p = Policy::default();
    // Groups, tags, hosts, ipsets and postures first: rules refer to them.
    if let Some(c) = f.get("groups") {
        read_groups(c, &mut p, from_old)?;
    }
    if let Some(c) = f.get("hosts") {
        read_hosts(c, &mut p)?;
    }
    if let Some(c) = f.get("tagOwners") {
        match taken.and_then(|t| t.section("tagOwners", c, |o| &o.tag_owners)) {
            Some(owners) => p.tag_owners = owners,
            None => read_tag_owners(c, &mut p)?,
        }
    }
    if let Some(c) = f.get("ipsets") {
        read_ipsets(c, &mut p)?;
    }
    if let Some(c) = f.get("postures") {
        for (k, pc) in c.map("postures")? {
            if !k.name.starts_with("posture:") || k.name.len() == "posture:".len() {
                return Err(invalid(
                    format!(
                        "postures[{:?}]: posture names must start with \"posture:\"",
                        k.name
                    ),
                    &pc.path(),
                    k.pos,
                ));
            }
            let mut conditions = Vec::new();
            for (s, sc) in pc.strings("a posture condition")? {
                conditions.push(parse_condition(s.trim()).map_err(|e| sc.err(e))?);
            }
            p.postures.insert(k.name.clone(), Posture { conditions });
        }
    }
    if let Some(c) = f.get("defaultSrcPosture") {
        p.default_src_posture = read_posture_refs(c, "defaultSrcPosture", &p)?;
    }
    if let Some(c) = f.get("acls") {
        p.has_rules = true;
        match taken.and_then(|t| t.section("acls", c, |o| &o.acls)) {
            Some(v) => p.acls = v,
            None => {
                for a in c.array("acls")? {
                    let acl = read_acl(&a, &mut p)?;
                    p.acls.push(acl);
                }
            }
        }
    }
    if let Some(c) = f.get("grants") {
        p.has_rules = true;
        match taken.and_then(|t| t.section("grants", c, |o| &o.grants)) {
            Some(v) => p.grants = v,
            None => {
                for g in c.array("grants")? {
                    let grant = read_grant(&g, &mut p)?;
                    p.grants.push(grant);
                }
            }
        }
    }
    if let Some(c) = f.get("ssh") {
        match taken.and_then(|t| t.section("ssh", c, |o| &o.ssh)) {
            Some(v) => p.ssh = v,
            None => {
                for s in c.array("ssh")? {
                    let rule = read_ssh(&s, &mut p)?;
                    p.ssh.push(rule);
                }
            }
        }
    }
    if let Some(c) = f.get("autoApprovers") {
        match taken.and_then(|t| t.section("autoApprovers", c, |o| &o.auto_approvers)) {
            Some(v) => p.auto_approvers = v,
            None => read_auto_approvers(c, &mut p)?,
        }
    }
    if let Some(c) = f.get("nodeAttrs") {
        match taken.and_then(|t| t.section("nodeAttrs", c, |o| &o.node_attrs)) {
            Some(v) => p.node_attrs = v,
            None => {
                for n in c.array("nodeAttrs")? {
                    let na = read_node_attr(&n, &mut p)?;
                    p.node_attrs.push(na);
                }
            }
        }
    }
    if let Some(c) = f.get("tests") {
        match taken.and_then(|t| t.section("tests", c, |o| &o.tests)) {
            Some(v) => p.tests = v,
            None => {
                for t in c.array("tests")? {
                    let test = read_test(&t, &p).map_err(malformed_test)?;
                    p.tests.push(test);
                }
            }
        }
    }
    if let Some(c) = f.get("sshTests") {
        match taken.and_then(|t| t.section("sshTests", c, |o| &o.ssh_tests)) {
            Some(v) => p.ssh_tests = v,
            None => {
                for t in c.array("sshTests")? {
                    let test = read_ssh_test(&t, &p).map_err(malformed_test)?;
                    p.ssh_tests.push(test);
                }
            }
        }
    }
    if let Some(c) = f.get("randomizeClientPort") {
        p.randomize_client_port = c.bool("randomizeClientPort")?;
    }
    if let Some(c) = f.get("disableIPv4") {
        p.disable_ipv4 = c.bool("disableIPv4")?;
    }
    if let Some(c) = f.present("OneCGNATRoute") {
        let v = c.string("OneCGNATRoute")?;
        if !matches!(v, "" | "mac-always" | "mac-never") {
            return Err(c.err(format!(
                "OneCGNATRoute {v:?} is not valid: use \"\", \"mac-always\" or \"mac-never\""
            )));
        }
        p.one_cgnat_route = Some(v.to_string());
    }
    if let Some(c) = f.present("derpMap") {
        check_derp_map(c)?;
        p.derp_map = Some(c.node.to_json());
    }
    if let Some(c) = f.present("attrConfig") {
        check_attr_config(c)?;
        p.attr_config = Some(c.node.to_json());
    }
    Ok(p)
}

/// A malformed `tests`/`sshTests` entry: the service reports it as a failing test.
fn malformed_test(e: PolicyError) -> PolicyError {
    match e {
        PolicyError::Invalid { message, path, pos } if !message.starts_with("SSH tests dst") => {
            PolicyError::Invalid {
                message: format!("test(s) failed: malformed test: {message}"),
                path,
                pos,
            }
        }
        other => other,
    }
}

/// `autogroup:member` and its legacy name `autogroup:members` may not both be used.
fn check_member_spellings(root: &hujson::Node) -> Result<(), PolicyError> {
    let is = |s: &str, name: &str| {
        s.trim()
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
    };
    // Whether the new name is used, and where the old one is first.
    let (mut new, mut old) = (false, None);
    each_string(root, &mut |s, pos| {
        if s.trim_start().starts_with("autogroup:member") {
            new |= is(s, "autogroup:member");
            if old.is_none() && is(s, "autogroup:members") {
                old = Some(pos);
            }
        }
    });
    if let (true, Some(pos)) = (new, old) {
        return Err(invalid(
            "autogroup:member and autogroup:members (its old name) cannot both be used; write autogroup:member everywhere",
            "$",
            pos,
        ));
    }
    Ok(())
}

fn read_groups(
    c: &Ctx<'_>,
    p: &mut Policy,
    from_old: &HashMap<&str, &Arc<Vec<String>>>,
) -> Result<(), PolicyError> {
    let members = c.map("groups")?;
    // The hosted service reports the last group (in name order) that nests another.
    let mut nested: Option<PolicyError> = None;
    let mut sorted: Vec<&(&hujson::Key, Ctx<'_>)> = members.iter().collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (k, gc) in sorted {
        let name = k.name.as_str();
        if !name.starts_with("group:") || name.len() == "group:".len() {
            return Err(invalid(
                format!("group {name:?} must start with \"group:\""),
                &gc.path(),
                k.pos,
            ));
        }
        if name.contains('@') {
            return Err(invalid(
                format!(
                    "groups[{name:?}]: group:NAME@DOMAIN names a group synced from the identity provider; it cannot be defined in the policy file"
                ),
                &gc.path(),
                k.pos,
            ));
        }
        if let Some(members) = from_old.get(name) {
            p.groups.insert(name.to_string(), Arc::clone(members));
            continue;
        }
        let mut list = Vec::new();
        for (m, mc) in gc.strings("group members")? {
            let m = m.trim();
            if m.starts_with("group:") {
                if nested.as_ref().is_none_or(|e| e.path() < &*mc.path()) {
                    nested = Some(invalid(
                        format!("groups[{name:?}]: {m:?}: group members cannot be recursive"),
                        &mc.path(),
                        mc.node.pos,
                    ));
                }
                continue;
            }
            if m.starts_with("tag:") || m.starts_with("autogroup:") {
                return Err(invalid(
                    format!("groups[{name:?}]: {m:?}: group members must be users"),
                    &mc.path(),
                    mc.node.pos,
                ));
            }
            let login = m.strip_prefix("user:").unwrap_or(m);
            if !is_login(login) {
                let hint = if login.contains('@') {
                    String::new()
                } else {
                    format!(", e.g. \"{login}@example.com\"")
                };
                return Err(invalid(
                    format!(
                        "groups[{name:?}]: {m:?}: group members must be users, named by their login{hint}"
                    ),
                    &mc.path(),
                    mc.node.pos,
                ));
            }
            list.push(login.to_string());
        }
        p.groups.insert(name.to_string(), Arc::new(list));
    }
    match nested {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn read_tag_owners(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    let members = c.map("tagOwners")?;
    // Every tag first: owners may be tags (the tag itself included).
    for (k, tc) in &members {
        if !k.name.to_ascii_lowercase().starts_with("tag:") {
            return Err(invalid(
                format!("tagOwners[{:?}]: tags must start with \"tag:\"", k.name),
                &tc.path(),
                k.pos,
            ));
        }
        if !valid_tag_name(&k.name) {
            return Err(invalid(
                format!(
                    "tagOwners[{:?}]: tag names must start with a letter, after 'tag:'",
                    k.name
                ),
                &tc.path(),
                k.pos,
            ));
        }
        // Tag names are case-insensitive: Tailscale reads them in lower case.
        let tag = k.name.to_ascii_lowercase();
        if p.tag_owners.insert(tag.clone(), Vec::new()).is_some() {
            return Err(invalid(
                format!("tagOwners[{:?}]: tag {tag:?} is defined twice", k.name),
                &tc.path(),
                k.pos,
            ));
        }
    }
    for (k, tc) in &members {
        let owners = read_aliases(tc, "tag owners", AliasContext::TagOwner, p)?;
        p.tag_owners.insert(k.name.to_ascii_lowercase(), owners);
    }
    Ok(())
}

fn read_hosts(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    for (k, hc) in c.map("hosts")? {
        let name = k.name.as_str();
        if name.is_empty()
            || name.contains(['@', ':', ' ', ',', '/'])
            || name == "*"
            || parse_prefix(name).is_some()
        {
            return Err(invalid(
                format!(
                    "hosts[{name:?}]: invalid host name (no \"@\", \":\", \"/\", spaces or IP addresses)"
                ),
                &hc.path(),
                k.pos,
            ));
        }
        let s = hc.string("host address")?.trim();
        let net = parse_prefix(s).ok_or_else(|| {
            invalid(
                format!("hosts[{name:?}]: {s:?}: invalid IP address or prefix"),
                &hc.path(),
                hc.node.pos,
            )
        })?;
        p.hosts.insert(name.to_string(), net);
    }
    Ok(())
}

/// Parses an IP address (as a host prefix) or a CIDR prefix; host bits are masked.
pub fn parse_prefix(s: &str) -> Option<IpNet> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    let net: IpNet = s.parse().ok()?;
    // Tailscale masks host bits silently for hosts/ACLs; keep the masked prefix.
    Some(net.trunc())
}

/// One operation of an `ipsets` entry.
enum IpSetOp {
    Net(IpNet),
    Range(IpAddr, IpAddr),
    Set(String),
    Internet,
}

fn parse_ipset_target(t: &str, p: &Policy) -> Result<IpSetOp, String> {
    if t == "autogroup:internet" {
        return Ok(IpSetOp::Internet);
    }
    if t.starts_with("ipset:") {
        return Ok(IpSetOp::Set(t.to_string()));
    }
    if let Some(name) = t.strip_prefix("host:") {
        return p
            .hosts
            .get(name)
            .map(|n| IpSetOp::Net(*n))
            .ok_or_else(|| format!("{t:?}: host {name:?} is not defined in \"hosts\""));
    }
    if let Some(r) = crate::ipset::parse_range(t) {
        let (a, b) = r?;
        return Ok(IpSetOp::Range(a, b));
    }
    if let Some(net) = parse_prefix(t) {
        return Ok(IpSetOp::Net(net));
    }
    if let Some(n) = p.hosts.get(t) {
        return Ok(IpSetOp::Net(*n));
    }
    let kind = if t.starts_with("tag:") {
        Some("tags")
    } else if t.starts_with("group:") {
        Some("groups")
    } else if t.starts_with("autogroup:") {
        Some("autogroups other than autogroup:internet")
    } else if t.contains('@') {
        Some("users")
    } else if t == "*" {
        Some("\"*\"")
    } else {
        None
    };
    Err(match kind {
        Some(k) => format!(
            "{t:?}: ipsets hold addresses (IPs, CIDRs, ranges, host:NAME, ipset:NAME, autogroup:internet), not {k}"
        ),
        None => format!("{t:?}: invalid address"),
    })
}

fn read_ipsets(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    let mut parsed: BTreeMap<String, Vec<(bool, IpSetOp, Ctx<'_>)>> = BTreeMap::new();
    for (k, ic) in c.map("ipsets")? {
        if !k.name.starts_with("ipset:") || k.name.len() == "ipset:".len() {
            return Err(invalid(
                format!(
                    "ipsets[{:?}]: ipset names must start with \"ipset:\"",
                    k.name
                ),
                &ic.path(),
                k.pos,
            ));
        }
        let entries = ic.strings("ipset entries")?;
        let has_remove = entries
            .iter()
            .any(|(s, _)| s.trim_start().starts_with("remove "));
        let mut ops = Vec::new();
        for (s, sc) in entries {
            let s = s.trim();
            let (keyword, target) = match s.split_once(char::is_whitespace) {
                Some((kw @ ("add" | "remove"), rest)) => (Some(kw), rest.trim()),
                _ => (None, s),
            };
            if keyword.is_none() && has_remove {
                return Err(sc.err(format!(
                    "ipsets[{:?}]: {s:?}: write \"add {s}\": bare entries are allowed only in sets without remove",
                    k.name
                )));
            }
            let op = parse_ipset_target(target, p)
                .map_err(|e| sc.err(format!("ipsets[{:?}]: {e}", k.name)))?;
            ops.push((keyword == Some("remove"), op, sc));
        }
        parsed.insert(k.name.clone(), ops);
    }
    // Resolve in dependency order, refusing cycles.
    fn resolve(
        name: &str,
        parsed: &BTreeMap<String, Vec<(bool, IpSetOp, Ctx<'_>)>>,
        done: &mut BTreeMap<String, AddrSet>,
        stack: &mut Vec<String>,
    ) -> Result<AddrSet, PolicyError> {
        if let Some(s) = done.get(name) {
            return Ok(s.clone());
        }
        stack.push(name.to_string());
        let mut set = AddrSet::default();
        for (remove, op, sc) in parsed.get(name).map(Vec::as_slice).unwrap_or(&[]) {
            let mut part = AddrSet::default();
            match op {
                IpSetOp::Net(n) => part.add_net(n),
                IpSetOp::Range(a, b) => part.add_range(*a, *b),
                IpSetOp::Internet => {
                    for r in crate::INTERNET_PREFIXES {
                        if let Ok(n) = r.parse::<IpNet>() {
                            part.add_net(&n);
                        }
                    }
                    for r in crate::NON_INTERNET_PREFIXES {
                        if let Ok(n) = r.parse::<IpNet>() {
                            part.remove_net(&n);
                        }
                    }
                }
                IpSetOp::Set(other) => {
                    if stack.iter().any(|s| s == other) {
                        return Err(sc.err(format!(
                            "ipsets: {} refer to each other in a cycle",
                            stack
                                .iter()
                                .chain(std::iter::once(other))
                                .map(|s| format!("{s:?}"))
                                .collect::<Vec<_>>()
                                .join(" → ")
                        )));
                    }
                    if !parsed.contains_key(other) {
                        return Err(sc.err(format!("ipset {other:?} not found")));
                    }
                    part = resolve(other, parsed, done, stack)?;
                }
            }
            if *remove {
                set.remove_set(&part);
            } else {
                set.add_set(&part);
            }
        }
        stack.pop();
        done.insert(name.to_string(), set.clone());
        Ok(set)
    }
    let mut done = BTreeMap::new();
    for (name, ops) in &parsed {
        let set = resolve(name, &parsed, &mut done, &mut Vec::new())?;
        if set.is_empty() {
            let (path, pos) = ops
                .first()
                .map_or((c.path().into_owned(), c.node.pos), |(_, _, sc)| {
                    (sc.path().into_owned(), sc.node.pos)
                });
            p.warnings.push(PolicyWarning {
                message: format!("ipset {name:?} is empty: it matches no address"),
                path,
                pos,
            });
        }
        p.ipsets.insert(name.clone(), set.to_prefixes());
    }
    Ok(())
}

fn located<T>(value: T, text: &str, c: &Ctx<'_>) -> Located<T> {
    Located {
        value,
        text: Arc::from(text),
        path: Arc::from(&*c.path()),
        pos: c.node.pos,
    }
}

fn read_aliases(
    c: &Ctx<'_>,
    what: &str,
    ctx: AliasContext,
    p: &mut Policy,
) -> Result<Vec<Located<Alias>>, PolicyError> {
    let mut out = Vec::new();
    for (s, sc) in c.strings(what)? {
        let t = s.trim();
        let a = parse_alias(t, ctx, p).map_err(|m| sc.err(m))?;
        if let Alias::Group(g) = &a {
            if !p.groups.contains_key(g) {
                p.warnings.push(PolicyWarning {
                    message: format!(
                        "{g:?} is not defined here: it names a group synced from the identity provider, and matches nobody until it syncs"
                    ),
                    path: sc.path().into_owned(),
                    pos: sc.node.pos,
                });
            }
        }
        out.push(located(a, t, &sc));
    }
    Ok(out)
}

fn read_posture_refs(c: &Ctx<'_>, what: &str, p: &Policy) -> Result<Vec<String>, PolicyError> {
    let mut out = Vec::new();
    for (s, sc) in c.strings(what)? {
        let t = s.trim();
        if !t.starts_with("posture:") {
            return Err(sc.err(format!(
                "{what}: {t:?} is not a posture: postures are named \"posture:NAME\""
            )));
        }
        if !p.postures.contains_key(t) {
            return Err(sc.err(format!("posture {t:?} not found")));
        }
        out.push(t.to_string());
    }
    Ok(out)
}

/// The sources of a rule, from `src` or the legacy `users` (not both).
fn rule_sources<'a>(f: &'a Fields<'a>) -> Result<Option<&'a Ctx<'a>>, PolicyError> {
    match (f.get("src"), f.get("users")) {
        (Some(_), Some(u)) => {
            Err(u.err("src and users (its old name) cannot both be given; use src"))
        }
        (s, u) => Ok(s.or(u)),
    }
}

fn read_acl(c: &Ctx<'_>, p: &mut Policy) -> Result<Acl, PolicyError> {
    let f = c.fields(
        "an ACL",
        &[
            "action",
            "src",
            "dst",
            "proto",
            "srcPosture",
            "users",
            "ports",
        ],
        true,
    )?;
    match f
        .present("action")
        .map(|a| a.string("action"))
        .transpose()?
    {
        Some(a) if a.trim() == "accept" => {}
        Some(other) if !other.trim().is_empty() => {
            return Err(f.get("action").unwrap_or(c).err(format!(
                "action={other:?} is not supported; only \"accept\" is"
            )))
        }
        _ => return Err(c.err("action must be specified")),
    }
    // The old names `users`/`ports` still work, but not mixed with `src`/`dst`.
    let old = f.get("users").or(f.get("ports"));
    let new = f.get("src").or(f.get("dst"));
    if let (Some(o), Some(_)) = (old, new) {
        return Err(
            o.err("an ACL uses src/dst or the old names users/ports, not both; use src and dst")
        );
    }
    let src = match rule_sources(&f)? {
        Some(sc) => read_aliases(sc, "src", AliasContext::AclSrc, p)?,
        None => Vec::new(),
    };
    let mut dst = Vec::new();
    if let Some(dc) = f.get("dst").or(f.get("ports")) {
        for (s, sc) in dc.strings("dst")? {
            let t = s.trim();
            let d = parse_dst_with_ports(t, p).map_err(|e| sc.err(e))?;
            dst.push(located(d, t, &sc));
        }
    }
    if src.is_empty() || dst.is_empty() {
        p.warnings.push(PolicyWarning {
            message: format!(
                "this ACL has no {}: it allows nothing",
                if src.is_empty() { "src" } else { "dst" }
            ),
            path: c.path().into_owned(),
            pos: c.node.pos,
        });
    }
    let protos = match f.present("proto") {
        Some(pc) => {
            let s = pc.string("proto")?.trim();
            if s.is_empty() {
                Vec::new()
            } else {
                let n = parse_proto(s).map_err(|e| pc.err(e))?;
                // Ports are meaningless for protocols without ports.
                if !proto_has_ports(n)
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
        None => Vec::new(),
    };
    let src_posture = match f.get("srcPosture") {
        Some(pc) => read_posture_refs(pc, "srcPosture", p)?,
        None => Vec::new(),
    };
    crate::selector::check_self_sources(&src, &dst)?;
    Ok(Acl {
        src,
        dst,
        protos,
        src_posture,
    })
}

/// Capability names under tailscale.com that policies may grant (`app` in grants).
const GRANTABLE_TS_CAPS: &[&str] = &[
    "tailscale.com/cap/kubernetes",
    "tailscale.com/cap/drive",
    "tailscale.com/cap/webui",
    "tailscale.com/cap/relay",
    "tailscale.com/cap/tsidp",
    "tailscale.com/cap/golink",
    "tailscale.com/cap/tailsql",
    "tailscale.com/cap/secrets",
    "tailscale.com/cap/funnel-ports",
];

/// Node capabilities under tailscale.com that `nodeAttrs` may set through `app`.
const NODE_TS_CAPS: &[&str] = &["tailscale.com/app-connectors"];

fn read_app(
    c: &Ctx<'_>,
    node_attrs: bool,
    p: &Policy,
) -> Result<Vec<(String, Vec<serde_json::Value>)>, PolicyError> {
    let mut out = Vec::new();
    for (k, vc) in c.map("app")? {
        let name = k.name.trim();
        let extra: &[&str] = if node_attrs { NODE_TS_CAPS } else { &[] };
        validate_cap_name(name, extra).map_err(|e| invalid(e, &vc.path(), k.pos))?;
        let values = match &vc.node.value {
            Value::Array(a) => a.iter().map(hujson::Node::to_json).collect(),
            Value::Null => Vec::new(),
            other => {
                return Err(vc.err(format!(
                    "capability values must be an array of objects, not {}",
                    other.kind()
                )))
            }
        };
        if name == "tailscale.com/app-connectors" {
            for ac in vc.array("app connectors")? {
                check_app_connector(&ac, p)?;
            }
        }
        out.push((name.to_string(), values));
    }
    Ok(out)
}

/// Checks an app connector definition (`tailscale.com/app-connectors` in `nodeAttrs`).
fn check_app_connector(c: &Ctx<'_>, p: &Policy) -> Result<(), PolicyError> {
    let f = c.fields(
        "an app connector",
        &["name", "connectors", "domains", "routes", "presetAppID"],
        true,
    )?;
    if let Some(n) = f.present("name") {
        n.string("name")?;
    }
    if let Some(cc) = f.get("connectors") {
        for (s, sc) in cc.strings("connectors")? {
            let t = s.trim().to_ascii_lowercase();
            if t == "*" {
                continue;
            }
            if !t.starts_with("tag:") {
                return Err(sc.err(format!("connector {s:?}: connectors are tags")));
            }
            if !p.tag_owners.contains_key(&t) {
                return Err(sc.err(format!("tag not found: {s:?}")));
            }
        }
    }
    if let Some(dc) = f.get("domains") {
        for (s, sc) in dc.strings("domains")? {
            let d = s.trim();
            let bare = d.strip_prefix("*.").unwrap_or(d);
            let ok = !bare.is_empty()
                && bare.contains('.')
                && !bare.contains(['*', ' ', '/', ':'])
                && !bare.starts_with('.')
                && !bare.ends_with('.');
            if !ok {
                return Err(sc.err(format!(
                    "domain {d:?} is not valid (a wildcard is written \"*.example.com\"; top-level domains cannot be wildcarded)"
                )));
            }
        }
    }
    if let Some(rc) = f.get("routes") {
        for (s, sc) in rc.strings("routes")? {
            let t = s.trim();
            if t.parse::<IpNet>().is_err() && t.parse::<IpAddr>().is_err() {
                return Err(sc.err(format!("route {t:?} is not a CIDR prefix")));
            }
        }
    }
    if let Some(pc) = f.present("presetAppID") {
        pc.string("presetAppID")?;
    }
    Ok(())
}

/// Checks an application capability name: `{domain}/{path}`, not in tailscale.com unless it
/// is one of Tailscale's grantable capabilities (or `extra`).
fn validate_cap_name(name: &str, extra: &[&str]) -> Result<(), String> {
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
    if name.starts_with("https://") || name.chars().any(char::is_whitespace) {
        return Err("capability name must have the form {domain}/{path}".into());
    }
    let reserved = ["tailscale.com", "tailscale.io"]
        .iter()
        .any(|d| domain == *d || domain.ends_with(&format!(".{d}")));
    if reserved && !GRANTABLE_TS_CAPS.contains(&name) && !extra.contains(&name) {
        return Err("capability name must not be in the tailscale.com domain".into());
    }
    Ok(())
}

fn read_grant(c: &Ctx<'_>, p: &mut Policy) -> Result<Grant, PolicyError> {
    let f = c.fields(
        "a grant",
        &["src", "dst", "ip", "app", "via", "srcPosture"],
        true,
    )?;
    let src = match f.get("src") {
        Some(sc) => read_aliases(sc, "src", AliasContext::GrantSrc, p)?,
        None => Vec::new(),
    };
    let mut dst = Vec::new();
    if let Some(dc) = f.get("dst") {
        for (s, sc) in dc.strings("dst")? {
            let t = s.trim();
            let a = match parse_alias(t, AliasContext::GrantDst, p) {
                Ok(a) => a,
                Err(e) => {
                    // A port written on a grant destination: say where ports go.
                    if let (host, Some(ports)) = split_host_ports(t) {
                        if parse_alias(host, AliasContext::GrantDst, p).is_ok() {
                            return Err(sc.err(format!(
                                "dst {t:?}: grant destinations take no port; put the ports in \"ip\", e.g. \"ip\": [\"tcp:{ports}\"]"
                            )));
                        }
                    }
                    return Err(sc.err(e));
                }
            };
            dst.push(located(a, t, &sc));
        }
    }
    let mut ip = Vec::new();
    if let Some(ic) = f.get("ip") {
        for (s, sc) in ic.strings("ip")? {
            ip.push(parse_ip_spec(s).map_err(|e| sc.err(e))?);
        }
    }
    let app = match f.present("app") {
        Some(ac) => read_app(ac, false, p)?,
        None => Vec::new(),
    };
    if ip.is_empty() && app.is_empty() {
        return Err(c.err("ip and app can not both be empty"));
    }
    let mut via = Vec::new();
    if let Some(vc) = f.get("via") {
        for (s, sc) in vc.strings("via")? {
            let t = s.trim();
            if !t.to_ascii_lowercase().starts_with("tag:") {
                return Err(sc.err(format!("via {t:?}: via must be a tag")));
            }
            let tag = t.to_ascii_lowercase();
            if !p.tag_owners.contains_key(&tag) {
                return Err(sc.err(format!("tag {t:?} not found")));
            }
            via.push(tag);
        }
    }
    let src_posture = match f.get("srcPosture") {
        Some(pc) => read_posture_refs(pc, "srcPosture", p)?,
        None => Vec::new(),
    };
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
    if src.is_empty() || dst.is_empty() {
        p.warnings.push(PolicyWarning {
            message: format!(
                "this grant has no {}: it grants nothing",
                if src.is_empty() { "src" } else { "dst" }
            ),
            path: c.path().into_owned(),
            pos: c.node.pos,
        });
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

/// Parses a Go `time.Duration` string (`1h30m`, `90s`, `-1m`, `1.5h`, `300ms`) into
/// nanoseconds, with Go's grammar and error words. (No crate implements Go's exact grammar —
/// fractions on every unit, `µs`, a bare `0`, the 2^63 ns limit — and the service's messages
/// quote Go's, so this stays hand-written.)
fn parse_go_duration(s: &str) -> Result<i128, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let int = &rest[..int_end];
        rest = &rest[int_end..];
        let mut frac = "";
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            frac = &r[..end];
            rest = &r[end..];
            if int.is_empty() && frac.is_empty() {
                return Err(bad());
            }
        } else if int.is_empty() {
            return Err(bad());
        }
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit: i128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("time: missing unit in duration {s:?}")),
            u => return Err(format!("time: unknown unit {u:?} in duration {s:?}")),
        };
        rest = &rest[unit_end..];
        let whole: i128 = if int.is_empty() {
            0
        } else {
            int.parse::<i128>()
                .ok()
                .filter(|v| *v < 1 << 63)
                .ok_or_else(bad)?
        };
        let mut v = whole.checked_mul(unit).ok_or_else(bad)?;
        if !frac.is_empty() {
            // Digits past nanosecond precision do not count.
            let digits = &frac[..frac.len().min(18)];
            let f: i128 = digits.parse().map_err(|_| bad())?;
            v += f * unit / 10i128.pow(digits.len() as u32);
        }
        total = total.checked_add(v).ok_or_else(bad)?;
        if total >= 1 << 63 {
            return Err(bad());
        }
    }
    Ok(if neg { -total } else { total })
}

/// Formats nanoseconds the way Go prints a `time.Duration` (`1h0m0s`, `-1m0s`, `1.5s`,
/// `300ms`).
pub fn go_duration(ns: i128) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    let frac = |v: u128, scale: u128| -> String {
        let (w, f) = (v / scale, v % scale);
        if f == 0 {
            return w.to_string();
        }
        let digits = scale.to_string().len() - 1;
        let f = format!("{f:0digits$}");
        format!("{w}.{}", f.trim_end_matches('0'))
    };
    if u < 1_000_000_000 {
        let (scale, unit) = match u {
            0..1_000 => (1, "ns"),
            1_000..1_000_000 => (1_000, "µs"),
            _ => (1_000_000, "ms"),
        };
        return format!("{sign}{}{unit}", frac(u, scale));
    }
    let secs_ns = u % 60_000_000_000;
    let mins = u / 60_000_000_000;
    let (h, m) = (mins / 60, mins % 60);
    let sec = frac(secs_ns, 1_000_000_000);
    if h > 0 {
        format!("{sign}{h}h{m}m{sec}s")
    } else if m > 0 {
        format!("{sign}{m}m{sec}s")
    } else {
        format!("{sign}{sec}s")
    }
}

/// The longest `checkPeriod` Tailscale documents: one week.
const MAX_CHECK_PERIOD_NS: i128 = 168 * 3_600_000_000_000;

fn read_ssh(c: &Ctx<'_>, p: &mut Policy) -> Result<SshRule, PolicyError> {
    let f = c.fields(
        "an SSH rule",
        &[
            "action",
            "src",
            "dst",
            "users",
            "checkPeriod",
            "acceptEnv",
            "srcPosture",
            "recorder",
            "enforceRecorder",
        ],
        true,
    )?;
    let action = match f.present("action") {
        None => return Err(c.err("action must be specified")),
        Some(ac) => match ac.string("action")?.trim() {
            "accept" => SshAction::Accept,
            "check" => SshAction::Check,
            "" => return Err(ac.err("action must be specified")),
            other => return Err(ac.err(format!("{other:?} is not a valid action"))),
        },
    };
    let src = match f.get("src") {
        Some(sc) => read_aliases(sc, "src", AliasContext::SshSrc, p)?,
        None => Vec::new(),
    };
    let dst = match f.get("dst") {
        Some(dc) => read_aliases(dc, "dst", AliasContext::SshDst, p)?,
        None => Vec::new(),
    };
    let mut users = Vec::new();
    let uc = f.get("users");
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
    let check_period_secs = match f.present("checkPeriod") {
        Some(cc) => {
            let s = cc.string("checkPeriod")?.trim();
            let secs = if s.is_empty() {
                None
            } else if s.eq_ignore_ascii_case("always") {
                Some(0)
            } else {
                let ns = parse_go_duration(s).map_err(|e| cc.err(e))?;
                if ns <= 0 {
                    return Err(cc.err(format!(
                        "checkPeriod {} must be a positive duration",
                        go_duration(ns)
                    )));
                }
                if ns > MAX_CHECK_PERIOD_NS {
                    return Err(cc.err(format!(
                        "checkPeriod {} is longer than the maximum of {} (one week)",
                        go_duration(ns),
                        go_duration(MAX_CHECK_PERIOD_NS)
                    )));
                }
                // Whole seconds, rounded up: a positive period never becomes 0 (`always`).
                u64::try_from((ns + 999_999_999) / 1_000_000_000).ok()
            };
            // A period only means something for check rules.
            secs.filter(|_| action == SshAction::Check)
        }
        None => None,
    };
    let mut accept_env = Vec::new();
    if let Some(ec) = f.get("acceptEnv") {
        for (s, sc) in ec.strings("acceptEnv")? {
            if s.trim().is_empty() {
                return Err(sc.err("acceptEnv values cannot be empty"));
            }
            accept_env.push(s.to_string());
        }
    }
    let src_posture = match f.get("srcPosture") {
        Some(pc) => read_posture_refs(pc, "srcPosture", p)?,
        None => Vec::new(),
    };
    let mut recorder = Vec::new();
    if let Some(rc) = f.get("recorder") {
        for (s, sc) in rc.strings("recorder")? {
            let t = s.trim().to_ascii_lowercase();
            if !t.starts_with("tag:") {
                return Err(sc.err(format!(
                    "recorder {s:?}: recorders are named by tag, e.g. \"tag:recorder\""
                )));
            }
            if !p.tag_owners.contains_key(&t) {
                return Err(sc.err(format!("tag not found: {s:?}")));
            }
            recorder.push(t);
        }
    }
    let enforce_recorder = match f.get("enforceRecorder") {
        Some(ec) => ec.bool("enforceRecorder")?,
        None => false,
    };
    if enforce_recorder && recorder.is_empty() {
        p.warnings.push(PolicyWarning {
            message: "enforceRecorder is set but the rule names no recorder".into(),
            path: c.path().into_owned(),
            pos: c.node.pos,
        });
    }
    crate::selector::check_self_sources(&src, &dst)?;
    check_ssh_pairs(&src, &dst, action, c)?;
    Ok(SshRule {
        action,
        src,
        dst,
        users,
        check_period_secs,
        accept_env,
        src_posture,
        recorder,
        enforce_recorder,
    })
}

/// Tailscale SSH's allowed pairs: a user's devices are reached only by that user (a named user
/// as destination needs that user alone as source); tagged sources reach only tagged
/// destinations and never through `check`.
fn check_ssh_pairs(
    src: &[Located<Alias>],
    dst: &[Located<Alias>],
    action: SshAction,
    c: &Ctx<'_>,
) -> Result<(), PolicyError> {
    let tagged_src = src
        .iter()
        .find(|s| matches!(s.value, Alias::Tag(_) | Alias::AutoGroup(AutoGroup::Tagged)));
    for d in dst {
        if let Alias::User(u) = &d.value {
            let only_that_user = !src.is_empty()
                && src
                    .iter()
                    .all(|s| matches!(&s.value, Alias::User(x) if x == u));
            if !only_that_user {
                return Err(invalid(
                    format!(
                        "invalid dst {:?}: a user's devices can be the destination only of rules whose source is that user alone (use autogroup:self)",
                        d.text
                    ),
                    &d.path,
                    d.pos,
                ));
            }
        }
    }
    if let Some(t) = tagged_src {
        if let Some(d) = dst.iter().find(|d| matches!(d.value, Alias::User(_))) {
            return Err(invalid(
                format!(
                    "invalid dst {:?}: tagged sources ({}) can only reach tagged destinations",
                    d.text, t.text
                ),
                &d.path,
                d.pos,
            ));
        }
        if action == SshAction::Check {
            return Err(c.err(format!(
                "action \"check\" cannot be used with tagged sources ({}): tagged devices cannot re-authenticate",
                t.text
            )));
        }
    }
    Ok(())
}

fn read_auto_approvers(c: &Ctx<'_>, p: &mut Policy) -> Result<(), PolicyError> {
    let f = c.fields("autoApprovers", &["routes", "exitNode", "services"], true)?;
    let mut aa = AutoApprovers::default();
    if let Some(rc) = f.get("routes") {
        for (k, vc) in rc.map("routes")? {
            let t = k.name.trim();
            let net = t
                .parse::<IpNet>()
                .ok()
                .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
                .ok_or_else(|| {
                    invalid(
                        format!("autoApprovers.routes: {:?}: invalid prefix", k.name),
                        &vc.path(),
                        k.pos,
                    )
                })?;
            let who = read_aliases(&vc, "approvers", AliasContext::Approver, p)?;
            aa.routes.push((net.trunc(), who));
        }
    }
    if let Some(ec) = f.get("exitNode") {
        aa.exit_node = read_aliases(ec, "exitNode", AliasContext::Approver, p)?;
    }
    if let Some(sc) = f.get("services") {
        for (k, vc) in sc.map("services")? {
            let t = k.name.trim();
            let ok = match t.strip_prefix("svc:") {
                Some(name) => !name.is_empty(),
                None => {
                    let tag = t.to_ascii_lowercase();
                    tag.starts_with("tag:") && p.tag_owners.contains_key(&tag)
                }
            };
            if !ok {
                return Err(invalid(
                    format!(
                        "autoApprovers.services: {t:?}: keys are services (\"svc:NAME\") or defined tags"
                    ),
                    &vc.path(),
                    k.pos,
                ));
            }
            let who = read_aliases(&vc, "approvers", AliasContext::Approver, p)?;
            aa.services.push((t.to_string(), who));
        }
    }
    p.auto_approvers = aa;
    Ok(())
}

/// Blocks of the CGNAT range that Tailscale reserves (no node addresses come from them).
const RESERVED_POOLS: &[&str] = &["100.100.0.0/24", "100.100.100.0/24", "100.115.92.0/23"];

fn read_node_attr(c: &Ctx<'_>, p: &mut Policy) -> Result<NodeAttr, PolicyError> {
    let f = c.fields(
        "a nodeAttrs entry",
        &["target", "attr", "app", "ipPool"],
        true,
    )?;
    let target = match f.get("target") {
        Some(tc) => read_aliases(tc, "target", AliasContext::NodeAttrTarget, p)?,
        None => Vec::new(),
    };
    let mut attr = Vec::new();
    if let Some(ac) = f.get("attr") {
        for (s, sc) in ac.strings("attr")? {
            if s.trim().is_empty() {
                return Err(sc.err("attr values cannot be empty"));
            }
            attr.push(s.to_string());
        }
    }
    let app = match f.present("app") {
        Some(ac) => read_app(ac, true, p)?,
        None => Vec::new(),
    };
    let mut ip_pool = Vec::new();
    if let Some(ic) = f.get("ipPool") {
        for (s, sc) in ic.strings("ipPool")? {
            let net: IpNet = s
                .trim()
                .parse()
                .map_err(|_| sc.err(format!("{s:?}: invalid prefix")))?;
            let net = net.trunc();
            let cgnat: Option<IpNet> = "100.64.0.0/10".parse().ok();
            if !cgnat.is_some_and(|g| g.contains(&net)) {
                return Err(sc.err(format!("IPPool({net}): network not within 100.64.0.0/10")));
            }
            let reserved = RESERVED_POOLS
                .iter()
                .filter_map(|r| r.parse::<IpNet>().ok())
                .any(|r| r.contains(&net));
            if reserved {
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

fn read_posture_attrs(c: &Ctx<'_>) -> Result<PostureAttrs, PolicyError> {
    let mut out = PostureAttrs::new();
    for (k, vc) in c.map("srcPostureAttrs")? {
        crate::posture::check_attr_name(&k.name).map_err(|e| invalid(e, &vc.path(), k.pos))?;
        let v = match &vc.node.value {
            Value::String(s) => PostureValue::String(s.clone()),
            Value::Bool(b) => PostureValue::Bool(*b),
            Value::Number(n) => match serde_json::from_str::<serde_json::Number>(n) {
                Ok(n) => PostureValue::Number(n),
                Err(_) => return Err(vc.err(format!("{n} is not a number"))),
            },
            other => {
                return Err(vc.err(format!(
                    "posture attribute values are strings, numbers or bools, not {}",
                    other.kind()
                )))
            }
        };
        out.insert(k.name.clone(), v);
    }
    Ok(out)
}

/// Parses a test source: one identity (a user, group, tag, host, IP or autogroup).
fn read_test_src(
    c: Option<&Ctx<'_>>,
    entry: &Ctx<'_>,
    ctx: AliasContext,
    p: &Policy,
) -> Result<Located<Alias>, PolicyError> {
    let Some(sc) = c else {
        return Err(entry.err("a test needs a src"));
    };
    let s = sc.string_or_empty("src")?.trim();
    if s.is_empty() {
        return Err(sc.err("a test needs a src"));
    }
    let host = bare_ip(s).map_or_else(|| s.to_string(), |ip| ip.to_string());
    let a = parse_alias(&host, ctx, p).map_err(|e| sc.err(format!("src {s:?}: {e}")))?;
    Ok(located(a, s, sc))
}

fn read_test(c: &Ctx<'_>, p: &Policy) -> Result<AclTest, PolicyError> {
    let f = c.fields(
        "a test",
        &[
            "src",
            "user",
            "srcPostureAttrs",
            "proto",
            "accept",
            "allow",
            "deny",
        ],
        true,
    )?;
    if let (Some(_), Some(u)) = (f.get("src"), f.get("user")) {
        return Err(u.err("src and user (its old name) cannot both be given; use src"));
    }
    if let (Some(_), Some(a)) = (f.get("accept"), f.get("allow")) {
        return Err(a.err("accept and allow (its old name) cannot both be given; use accept"));
    }
    let src = read_test_src(f.get("src").or(f.get("user")), c, AliasContext::TestSrc, p)?;
    let proto = match f.present("proto") {
        Some(pc) => {
            let s = pc.string("proto")?.trim();
            if s.is_empty() {
                None
            } else {
                Some(parse_proto(s).map_err(|e| pc.err(e))?)
            }
        }
        None => None,
    };
    let read_dsts = |dc: Option<&Ctx<'_>>| -> Result<Vec<Located<TestDst>>, PolicyError> {
        let Some(dc) = dc else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (s, sc) in dc.strings("a test destination")? {
            let t = s.trim();
            out.push(located(
                read_test_dst(t, proto, p).map_err(|e| sc.err(e))?,
                t,
                &sc,
            ));
        }
        Ok(out)
    };
    let accept = read_dsts(f.get("accept").or(f.get("allow")))?;
    let deny = read_dsts(f.get("deny"))?;
    if accept.is_empty() && deny.is_empty() {
        return Err(c.err("a test needs accept or deny destinations"));
    }
    let src_posture_attrs = match f.present("srcPostureAttrs") {
        Some(ac) => read_posture_attrs(ac)?,
        None => PostureAttrs::new(),
    };
    Ok(AclTest {
        src,
        proto,
        accept,
        deny,
        src_posture_attrs,
        pos: c.node.pos,
    })
}

/// Parses a `tests` destination `host:port`: one host, one port.
fn read_test_dst(t: &str, proto: Option<u8>, p: &Policy) -> Result<TestDst, String> {
    if let Some(ip) = bare_ip(t) {
        let host = parse_alias(&ip.to_string(), AliasContext::TestDst, p)
            .map_err(|e| format!("dst {t:?}: {e}"))?;
        return Ok(TestDst { host, port: None });
    }
    let (host, port) = split_host_ports(t);
    let Some(port) = port else {
        let host = parse_alias(t, AliasContext::TestDst, p).map_err(|e| {
            format!("dst {t:?}: {e} (a test destination is host:port, e.g. \"tag:server:22\")")
        })?;
        return Ok(TestDst { host, port: None });
    };
    if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "dst {t:?}: port {port:?} is not a port number (tests take a single port: no ranges, lists or *)"
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("dst {t:?}: port {port} is out of range (0-65535)"))?;
    let portless = proto.is_some_and(|n| !proto_has_ports(n));
    if port == 0 && !portless {
        return Err(format!(
            "dst {t:?}: port 0 is only for protocols without ports (\"proto\": \"icmp\")"
        ));
    }
    if host.is_empty() {
        return Err(format!("dst {t:?}: the host is empty"));
    }
    let host =
        parse_alias(host, AliasContext::TestDst, p).map_err(|e| format!("dst {t:?}: {e}"))?;
    Ok(TestDst {
        host,
        port: Some(port),
    })
}

fn read_ssh_test(c: &Ctx<'_>, p: &Policy) -> Result<SshTest, PolicyError> {
    let f = c.fields(
        "an SSH test",
        &["src", "srcPostureAttrs", "dst", "accept", "check", "deny"],
        true,
    )?;
    let src = read_test_src(f.get("src"), c, AliasContext::SshTestSrc, p)?;
    let mut dst = Vec::new();
    if let Some(dc) = f.get("dst") {
        for (d, dcx) in dc.strings("dst")? {
            let t = d.trim();
            let host = bare_ip(t).map_or_else(|| t.to_string(), |ip| ip.to_string());
            let a = parse_alias(&host, AliasContext::SshTestDst, p).map_err(|e| {
                if e.starts_with("SSH tests dst") {
                    dcx.err(e)
                } else {
                    dcx.err(format!("SSH tests dst {t:?}: {e}"))
                }
            })?;
            dst.push(located(a, t, &dcx));
        }
    }
    if dst.is_empty() {
        return Err(c.err("an SSH test needs dst"));
    }
    let users = |name: &str| -> Result<Vec<String>, PolicyError> {
        let mut out = Vec::new();
        if let Some(uc) = f.get(name) {
            for (u, ucx) in uc.strings(name)? {
                let t = u.trim();
                if t.is_empty() || t.contains(char::is_whitespace) {
                    return Err(ucx.err(format!("user {t:?} is not valid")));
                }
                out.push(t.to_string());
            }
        }
        Ok(out)
    };
    let (accept, check, deny) = (users("accept")?, users("check")?, users("deny")?);
    if accept.is_empty() && check.is_empty() && deny.is_empty() {
        return Err(c.err("an SSH test needs accept, check or deny users"));
    }
    let src_posture_attrs = match f.present("srcPostureAttrs") {
        Some(ac) => read_posture_attrs(ac)?,
        None => PostureAttrs::new(),
    };
    Ok(SshTest {
        src,
        dst,
        accept,
        check,
        deny,
        src_posture_attrs,
        pos: c.node.pos,
    })
}

/// Checks `derpMap` against the shape of Tailscale's DERP map (field names in any case).
fn check_derp_map(c: &Ctx<'_>) -> Result<(), PolicyError> {
    let f = c.fields(
        "derpMap",
        &["Regions", "OmitDefaultRegions", "HomeParams"],
        false,
    )?;
    if let Some(o) = f.get("OmitDefaultRegions") {
        o.bool("OmitDefaultRegions")?;
    }
    if let Some(h) = f.present("HomeParams") {
        let hf = h.fields("HomeParams", &["RegionScore"], false)?;
        if let Some(rs) = hf.get("RegionScore") {
            for (k, v) in rs.map("RegionScore")? {
                region_id(&k.name, &v)?;
                if !matches!(v.node.value, Value::Number(_)) {
                    return Err(v.err("region scores are numbers"));
                }
            }
        }
    }
    if let Some(r) = f.get("Regions") {
        for (k, rc) in r.map("Regions")? {
            let id = region_id(&k.name, &rc)?;
            if rc.is_null() {
                continue;
            }
            let rf = rc.fields(
                "a DERP region",
                &[
                    "RegionID",
                    "RegionCode",
                    "RegionName",
                    "Latitude",
                    "Longitude",
                    "Avoid",
                    "NoMeasureNoHome",
                    "Nodes",
                ],
                false,
            )?;
            if let Some(ric) = rf.get("RegionID") {
                if number_of(ric)? != Some(id) {
                    return Err(ric.err(format!("RegionID must be {id}, the key of its region")));
                }
            }
            for s in ["RegionCode", "RegionName"] {
                if let Some(x) = rf.present(s) {
                    x.string(s)?;
                }
            }
            for s in ["Latitude", "Longitude"] {
                if let Some(x) = rf.present(s) {
                    number_of(x)?;
                }
            }
            for s in ["Avoid", "NoMeasureNoHome"] {
                if let Some(x) = rf.get(s) {
                    x.bool(s)?;
                }
            }
            if let Some(nc) = rf.get("Nodes") {
                for n in nc.array("Nodes")? {
                    check_derp_node(&n)?;
                }
            }
        }
    }
    Ok(())
}

fn region_id(key: &str, c: &Ctx<'_>) -> Result<i64, PolicyError> {
    key.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| c.err(format!("DERP region {key:?}: region keys are numeric IDs")))
}

fn number_of(c: &Ctx<'_>) -> Result<Option<i64>, PolicyError> {
    match &c.node.value {
        Value::Number(n) => Ok(n.parse::<i64>().ok()),
        Value::Null => Ok(None),
        other => Err(c.err(format!("expected a number, not {}", other.kind()))),
    }
}

fn check_derp_node(c: &Ctx<'_>) -> Result<(), PolicyError> {
    let f = c.fields(
        "a DERP node",
        &[
            "Name",
            "RegionID",
            "HostName",
            "CertName",
            "IPv4",
            "IPv6",
            "STUNPort",
            "STUNOnly",
            "DERPPort",
            "InsecureForTests",
            "STUNTestIP",
            "CanPort80",
        ],
        false,
    )?;
    for s in ["Name", "HostName", "CertName", "STUNTestIP"] {
        if let Some(x) = f.present(s) {
            x.string(s)?;
        }
    }
    for s in ["IPv4", "IPv6"] {
        if let Some(x) = f.present(s) {
            let v = x.string(s)?.trim();
            if !(v.is_empty() || v == "none" || v.parse::<IpAddr>().is_ok()) {
                return Err(x.err(format!("{s} {v:?} is not an IP address")));
            }
        }
    }
    for s in ["RegionID", "STUNPort", "DERPPort"] {
        if let Some(x) = f.present(s) {
            number_of(x)?;
        }
    }
    for s in ["STUNOnly", "InsecureForTests", "CanPort80"] {
        if let Some(x) = f.get(s) {
            x.bool(s)?;
        }
    }
    Ok(())
}

/// Checks `attrConfig`: attribute name → `{type, allowSetByNode, broadcastToPeers}`.
fn check_attr_config(c: &Ctx<'_>) -> Result<(), PolicyError> {
    for (k, ac) in c.map("attrConfig")? {
        crate::posture::check_attr_name(&k.name).map_err(|e| invalid(e, &ac.path(), k.pos))?;
        let f = ac.fields(
            "an attrConfig entry",
            &["type", "allowSetByNode", "broadcastToPeers"],
            true,
        )?;
        if let Some(t) = f.present("type") {
            let v = t.string("type")?;
            if !matches!(v, "string" | "bool" | "number") {
                return Err(t.err(format!(
                    "type {v:?} is not valid: use \"string\", \"bool\" or \"number\""
                )));
            }
        }
        if let Some(b) = f.get("allowSetByNode") {
            b.bool("allowSetByNode")?;
        }
        if let Some(b) = f.get("broadcastToPeers") {
            b.strings("broadcastToPeers")?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn common_ends_match_a_byte_by_byte_count() {
        let naive_prefix = |a: &[u8], b: &[u8]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let naive_suffix = |a: &[u8], b: &[u8]| {
            a.iter()
                .rev()
                .zip(b.iter().rev())
                .take_while(|(x, y)| x == y)
                .count()
        };
        let base: Vec<u8> = (0..300u32)
            .map(|i| b"abcdefgh"[(i * 7 % 8) as usize])
            .collect();
        for len in [0, 1, 63, 64, 65, 128, 200, 300] {
            for at in [0, 1, 31, 63, 64, 65, 127, 128, 199, 299] {
                let a = &base[..len];
                let mut b = a.to_vec();
                if at < b.len() {
                    b[at] = b'z';
                }
                for (x, y) in [(a, &b[..]), (a, &b[..b.len() / 2]), (&b[..], a)] {
                    assert_eq!(common_prefix(x, y), naive_prefix(x, y), "{len} {at}");
                    assert_eq!(common_suffix(x, y), naive_suffix(x, y), "{len} {at}");
                }
            }
        }
    }

    #[test]
    fn durations() {
        let ns = |s: &str| parse_go_duration(s).unwrap();
        assert_eq!(ns("1h"), 3_600_000_000_000);
        assert_eq!(ns("1h30m"), 5_400_000_000_000);
        assert_eq!(ns("1.5h"), 5_400_000_000_000);
        assert_eq!(ns("-1m"), -60_000_000_000);
        assert_eq!(ns("300ms"), 300_000_000);
        assert_eq!(ns(".5s"), 500_000_000);
        assert_eq!(ns("1µs"), 1_000);
        assert_eq!(ns("0"), 0);
        assert!(parse_go_duration("abc").is_err());
        assert!(parse_go_duration("10")
            .unwrap_err()
            .contains("missing unit"));
        assert!(parse_go_duration("1d")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration(".s").is_err());
        assert!(parse_go_duration("1..5h").is_err());
        assert!(parse_go_duration("9999999999h").is_err());
        assert_eq!(go_duration(-60_000_000_000), "-1m0s");
        assert_eq!(go_duration(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration(1_500_000_000), "1.5s");
        assert_eq!(go_duration(300_000_000), "300ms");
        assert_eq!(go_duration(MAX_CHECK_PERIOD_NS), "168h0m0s");
    }

    #[test]
    fn unknown_top_level_key_is_rejected_with_position() {
        let e = parse_policy("{\n  \"acl\": []\n}").unwrap_err();
        assert_eq!(e.pos().line, 2);
        assert!(e.message().contains("unknown field"));
        assert!(e.message().contains("did you mean \"acls\""));
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
        assert!(validate_cap_name("example.com/cap/x", &[]).is_ok());
        assert!(validate_cap_name("tailscale.com/cap/relay-target", &[]).is_err());
        assert!(validate_cap_name("https://tailscale.com/cap/ingress", &[]).is_err());
        assert!(validate_cap_name("nodomain", &[]).is_err());
        assert!(validate_cap_name("tailscale.com/app-connectors", &[]).is_err());
        assert!(validate_cap_name("tailscale.com/app-connectors", NODE_TS_CAPS).is_ok());
    }
}
