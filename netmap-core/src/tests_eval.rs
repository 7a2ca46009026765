//! Evaluation of the policy's `tests` and `sshTests`, and checks that need the tailnet.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use netmap_policy::{
    AclTest, Alias, AutoGroup, Located, Policy, PortRange, Posture, PostureAttrs, SshAction,
    SshTest, SshUser, TestDst,
};
use serde::Serialize;

use crate::addr;
use crate::bits::{bit, ones, or_into, set_bit};
use crate::error::CoreError;
use crate::resolve::{Resolved, Resolver};
use crate::tailnet::Tailnet;

/// The outcome of one test entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestOutcome {
    /// `tests` or `sshTests`.
    pub kind: String,
    /// Index of the entry in its block.
    pub index: usize,
    /// Source as written.
    pub src: String,
    /// Destination (`host:port`, or SSH destination) as written.
    pub dst: String,
    /// Port/protocol or SSH user.
    pub what: String,
    /// `accept`, `deny` or `check`: what the test expects.
    pub expect: String,
    /// Whether the expectation holds.
    pub passed: bool,
    /// Why it failed (or which rule decided), for a person to act on.
    pub reason: String,
    /// The rule that decided (`acls[2]`, `grants[0]`, `ssh[1]`): the one that allows what
    /// should be denied, or the one that allows what should be allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Where the entry is in the policy file (`line:column`).
    pub pos: String,
}

impl std::fmt::Display for TestOutcome {
    /// One line: `tests[0] src=alice@example.com accept tag:web:443 tcp/443: reason`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}] src={} {} {} {}: {}",
            self.kind, self.index, self.src, self.expect, self.dst, self.what, self.reason
        )
    }
}

/// The outcome of every test of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct TestReport {
    /// Every check, in order.
    pub outcomes: Vec<TestOutcome>,
}

impl TestReport {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.passed)
    }
}

/// Checks that need the tailnet: `user:*@domain` and `localpart:*@domain` must name the
/// tailnet's own domains.
pub fn check_policy_for_tailnet(policy: &Policy, tailnet: &Tailnet) -> Result<(), CoreError> {
    let own = tailnet.settings.domain();
    let check = |dom: &str, ssh: bool| -> Result<(), CoreError> {
        if Some(dom) == own {
            return Ok(());
        }
        Err(CoreError::PolicyForTailnet(format!(
            "{}{dom} is not associated with this Tailnet and cannot be used in user:*@<domain> expressions",
            if ssh { "[ssh] " } else { "" }
        )))
    };
    for rule in &policy.ssh {
        for s in &rule.src {
            if let Alias::UserDomain(d) = &s.value {
                check(d, true)?;
            }
        }
        for u in &rule.users {
            if let netmap_policy::SshUser::LocalPart(d) = u {
                check(d, false)?;
            }
        }
    }
    let acl_dsts = policy
        .acls
        .iter()
        .flat_map(|a| a.dst.iter().map(|d| &d.value.0));
    let others = policy
        .acls
        .iter()
        .flat_map(|a| a.src.iter())
        .chain(
            policy
                .grants
                .iter()
                .flat_map(|g| g.src.iter().chain(&g.dst)),
        )
        .chain(policy.node_attrs.iter().flat_map(|n| n.target.iter()))
        .chain(policy.tag_owners.values().flatten())
        .chain(
            policy
                .auto_approvers
                .routes
                .iter()
                .flat_map(|(_, w)| w.iter()),
        )
        .chain(policy.auto_approvers.exit_node.iter())
        .map(|l| &l.value);
    for a in acl_dsts.chain(others) {
        if let Alias::UserDomain(d) = a {
            check(d, false)?;
        }
    }
    Ok(())
}

/// Runs the `tests` and `sshTests` blocks against the tailnet.
///
/// `tests`: every device of `src` must (`accept`) or must not (`deny`) reach every device of
/// each `host:port` through the `acls` and `grants` (capability-only grants carry no traffic),
/// for `proto` (default TCP). The port is a single number; the host names devices or a single
/// address (a tag, user, group, host alias, IP, `autogroup:self`, `*`), not a range.
///
/// `sshTests`: for every device of `src` and of each `dst`, the first matching SSH rule
/// (check rules before accept rules, as the client sees them) must accept each user of
/// `accept`, must require a check for each user of `check`, and no rule may let in a user of
/// `deny`.
///
/// Malformed entries are failing outcomes with the reason, never a panic.
pub fn run_tests(policy: &Policy, tailnet: &Tailnet) -> TestReport {
    if policy.tests.is_empty() && policy.ssh_tests.is_empty() {
        return TestReport::default();
    }
    run_tests_with(&Resolver::new(Arc::new(policy.clone()), tailnet))
}

/// [`run_tests`] against a prepared resolver (the engine's), whose policy is the one tested.
pub(crate) fn run_tests_with(r: &Resolver) -> TestReport {
    run_tests_naming(r).0
}

/// What a run of the `tests` read of the tailnet, besides the policy: the devices they
/// named as sources or destinations (the devices of `autogroup:self` destinations too), as a
/// bitmap over slots, and whether they read the tailnet's subnet routes. The verdicts read
/// the rules only at those devices (and at addresses, which only rules' prefixes name), and
/// a device's records only at those devices.
#[derive(Debug, Clone, Default)]
pub(crate) struct TestsRead {
    pub devices: Vec<u64>,
    pub routes: bool,
}

/// [`run_tests_with`], with what the `tests` read of the tailnet.
pub(crate) fn run_tests_naming(r: &Resolver) -> (TestReport, TestsRead) {
    run_tests_toward(r, None)
}

/// [`run_tests_naming`], judging only the pairs of a source and a destination one of which
/// is among the devices `only` (a bitmap over slots), when given. That is the whole verdict
/// when every other pair is judged as it was when the tests last passed: the same `tests`,
/// on devices whose records, and rules' sets at them, are as they were then. A test whose
/// source names one of `only` is judged whole. The devices read are then those the run
/// named among `only`, and all of a test's sources; a failing report may lack outcomes
/// (run the whole tests for the report). `sshTests` are always judged whole.
pub(crate) fn run_tests_toward(r: &Resolver, only: Option<&[u64]>) -> (TestReport, TestsRead) {
    let mut report = TestReport::default();
    let policy = &r.policy;
    if policy.tests.is_empty() && policy.ssh_tests.is_empty() {
        return (report, TestsRead::default());
    }
    let ev = Evaluator::new(r);
    // As long as the evaluator's bitmaps (narrowing destinations word by word).
    let only = only.map(|o| {
        let mut o = o.to_vec();
        o.resize(ev.words(), 0);
        o
    });
    let ev = Evaluator { only, ..ev };
    for (i, t) in policy.tests.iter().enumerate() {
        ev.acl_test(i, t, &mut report.outcomes);
    }
    for (i, t) in policy.ssh_tests.iter().enumerate() {
        ev.ssh_test(i, t, &mut report.outcomes);
    }
    let routes = ev.routes.get().is_some();
    let read = TestsRead {
        devices: ev.named.into_inner(),
        routes,
    };
    (report, read)
}

/// Whether the `tests` (not the `sshTests`) could name node `i` as a source or a
/// destination, judged by its record alone: an alias of a test names it by identity, is `*`,
/// or holds an address in its range, or a test's destination is `autogroup:self` and the node
/// is a user's device. Over-approximates what a run would name (a range names no device as a
/// source), never under.
pub(crate) fn tests_may_name(r: &Resolver, i: usize) -> bool {
    let Some(n) = r.nodes.get(i).filter(|n| n.alive) else {
        return false;
    };
    let names = |a: &Alias| {
        if *a == Alias::AutoGroup(AutoGroup::SelfDevices) {
            return n.is_member();
        }
        if r.alias_names(a, i) {
            return true;
        }
        let shape = r.resolve_shape(a);
        shape.wildcard
            || shape
                .nets
                .iter()
                .any(|net| n.addrs.iter().any(|ip| net.contains(ip)))
    };
    r.policy.tests.iter().any(|t| {
        names(&t.src.value) || t.accept.iter().chain(&t.deny).any(|d| names(&d.value.host))
    })
}

/// Who a test entry speaks for: a device, or an address that is no device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Principal {
    Node(usize),
    Addr(IpAddr),
    Net(IpNet),
}

/// What a test entry's destination names: a device, or one address (maybe a device's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Node(usize),
    Addr { ip: IpAddr, node: Option<usize> },
}

/// A destination host as parsed: fixed devices/addresses, or the source's own devices.
enum DstHost {
    Fixed(Vec<Target>),
    SelfDevices,
}

/// A `tests` destination as judged: its host, whether it names any device or address
/// (its fixed targets may be only those `toward` some devices), and those devices.
struct Targets<'t> {
    host: &'t DstHost,
    any: bool,
    toward: Option<&'t [u64]>,
}

/// A rule's selector: its flags and prefixes as resolved (`set.nodes` stays empty), and
/// its nodes as a bitmap over slots, built when a test first asks about a destination in
/// it (tests ask "is this device in it" once per device pair and rule). Whether a test's
/// source device is in it is answered alias by alias, without the bitmap: most rules are
/// never asked more.
struct Sel<'a> {
    set: Resolved,
    aliases: Vec<&'a Alias>,
    bits: OnceCell<Vec<u64>>,
}

/// One `acls`/`grants` entry with its selectors resolved.
struct NetRuleEval<'a> {
    label: String,
    src: Sel<'a>,
    /// Postures the sources must satisfy (any of them); empty: none.
    postures: Vec<Posture>,
    /// (destination, protocols (empty = default set), ports).
    entries: Vec<(Sel<'a>, Vec<u8>, Vec<PortRange>)>,
}

/// One `ssh` entry with its selectors resolved.
struct SshRuleEval<'a> {
    label: String,
    action: SshAction,
    src: Sel<'a>,
    postures: Vec<Posture>,
    dst: Sel<'a>,
    users: Vec<SshUser>,
    has_localpart: bool,
}

/// How a pair (source device, destination) fared for one check.
struct PairResult {
    ok: bool,
    rule: Option<String>,
    reason: String,
}

/// The identifying part of an outcome.
struct EntryId<'a> {
    kind: &'static str,
    index: usize,
    src: &'a str,
    pos: String,
}

impl EntryId<'_> {
    fn outcome(&self, dst: &str, what: &str, expect: &str, res: PairResult) -> TestOutcome {
        TestOutcome {
            kind: self.kind.to_string(),
            index: self.index,
            src: self.src.to_string(),
            dst: dst.to_string(),
            what: what.to_string(),
            expect: expect.to_string(),
            passed: res.ok,
            reason: res.reason,
            rule: res.rule,
            pos: self.pos.clone(),
        }
    }

    fn malformed(&self, dst: &str, what: &str, expect: &str, reason: String) -> TestOutcome {
        self.outcome(
            dst,
            what,
            expect,
            PairResult {
                ok: false,
                rule: None,
                reason: format!("invalid test: {reason}"),
            },
        )
    }
}

const DEFAULT_POLICY: &str = "the default policy (no acls or grants: everything is allowed)";

struct Evaluator<'a> {
    r: &'a Resolver,
    net_rules: Vec<NetRuleEval<'a>>,
    /// Check rules first, then accept rules, each in policy order.
    ssh_rules: Vec<SshRuleEval<'a>>,
    /// Every approved subnet route of a live node (gathered when first asked for: only
    /// address principals and targets ask).
    routes: OnceCell<Vec<IpNet>>,
    /// The nodes of each alias a destination bitmap was built from.
    alias_bits: RefCell<HashMap<&'a Alias, Rc<Vec<u64>>>>,
    /// Whether a destination of some network rule is `autogroup:self` (what a rule lets
    /// a device reach then depends on the device, not only on the rules it is a source of).
    self_dst: bool,
    /// The devices the `tests` named as sources or destinations so far (a bitmap over slots).
    named: RefCell<Vec<u64>>,
    /// When set, the devices (a bitmap over slots) whose pairs are judged: the others' are
    /// as they were when the tests last passed (see [`run_tests_toward`]).
    only: Option<Vec<u64>>,
}

/// Resolves selectors' shapes for the evaluator, each distinct alias once.
struct SelCache<'a> {
    r: &'a Resolver,
    memo: HashMap<&'a Alias, Resolved>,
}

impl<'a> SelCache<'a> {
    /// The union of `aliases` (its nodes resolved later, if asked for).
    fn sel_all(&mut self, aliases: impl IntoIterator<Item = &'a Alias>) -> Sel<'a> {
        let r = self.r;
        let mut set = Resolved::default();
        let mut list = Vec::new();
        for a in aliases {
            list.push(a);
            let one = self.memo.entry(a).or_insert_with(|| r.resolve_shape(a));
            set.wildcard |= one.wildcard;
            set.danger_all |= one.danger_all;
            set.self_devices |= one.self_devices;
            set.internet |= one.internet;
            for n in &one.nets {
                if !set.nets.contains(n) {
                    set.nets.push(*n);
                }
            }
        }
        Sel {
            set,
            aliases: list,
            bits: OnceCell::new(),
        }
    }

    fn sel(&mut self, a: &'a Alias) -> Sel<'a> {
        self.sel_all(std::iter::once(a))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        2 => "igmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        n => format!("proto {n}"),
    }
}

/// Up to how many open destination devices [`Evaluator::first_rules`] judges a rule's
/// destinations device by device instead of building their bitmaps. A run judging only
/// the pairs toward the devices a change touched has a handful of them.
const FEW_OPEN: usize = 8;

/// Whether a protocol carries ports (others match a rule whatever its ports).
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// Whether `ip` is in `autogroup:internet` (public IPv4, global unicast IPv6).
fn is_internet(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(o[0] == 10
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 169 && o[1] == 254)
                || (o[0] == 172 && (16..32).contains(&o[1]))
                || (o[0] == 192 && o[1] == 168))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xe000) == 0x2000,
    }
}

impl<'a> Evaluator<'a> {
    fn new(r: &'a Resolver) -> Evaluator<'a> {
        let p = &*r.policy;
        let postures = |names: &[String]| -> Vec<Posture> {
            names
                .iter()
                .filter_map(|n| p.postures.get(n).cloned())
                .collect()
        };
        let mut cache = SelCache {
            r,
            memo: HashMap::new(),
        };
        let mut net_rules = Vec::new();
        for (i, acl) in p.acls.iter().enumerate() {
            net_rules.push(NetRuleEval {
                label: format!("acls[{i}]"),
                src: cache.sel_all(acl.src.iter().map(|s| &s.value)),
                postures: postures(p.rule_postures(&acl.src_posture)),
                entries: acl
                    .dst
                    .iter()
                    .map(|d| {
                        let sel = cache.sel(&d.value.0);
                        (sel, acl.protos.clone(), d.value.1.clone())
                    })
                    .collect(),
            });
        }
        for (i, g) in p.grants.iter().enumerate() {
            if g.ip.is_empty() {
                continue;
            }
            let mut entries = Vec::new();
            for d in &g.dst {
                for spec in &g.ip {
                    let sel = cache.sel(&d.value);
                    entries.push((sel, spec.protos.clone(), spec.ports.clone()));
                }
            }
            net_rules.push(NetRuleEval {
                label: format!("grants[{i}]"),
                src: cache.sel_all(g.src.iter().map(|s| &s.value)),
                postures: postures(p.rule_postures(&g.src_posture)),
                entries,
            });
        }
        let ordered = p
            .ssh
            .iter()
            .enumerate()
            .filter(|(_, x)| x.action == SshAction::Check)
            .chain(
                p.ssh
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.action == SshAction::Accept),
            );
        let ssh_rules = ordered
            .map(|(i, rule)| SshRuleEval {
                label: format!("ssh[{i}]"),
                action: rule.action,
                src: cache.sel_all(rule.src.iter().map(|x| &x.value)),
                postures: postures(&rule.src_posture),
                dst: cache.sel_all(rule.dst.iter().map(|x| &x.value)),
                users: rule.users.clone(),
                has_localpart: rule
                    .users
                    .iter()
                    .any(|u| matches!(u, SshUser::LocalPart(_))),
            })
            .collect();
        let self_dst = net_rules
            .iter()
            .any(|rule| rule.entries.iter().any(|(d, _, _)| d.set.self_devices));
        Evaluator {
            r,
            net_rules,
            ssh_rules,
            routes: OnceCell::new(),
            alias_bits: RefCell::new(HashMap::new()),
            self_dst,
            named: RefCell::new(vec![0; r.nodes.len().div_ceil(64)]),
            only: None,
        }
    }

    /// Words in a bitmap over slots.
    fn words(&self) -> usize {
        self.r.nodes.len().div_ceil(64)
    }

    /// The nodes of `sel` as a bitmap over slots (built on first use).
    fn sel_bits<'s>(&self, sel: &'s Sel<'a>) -> &'s [u64] {
        sel.bits.get_or_init(|| {
            let words = self.words();
            let mut bits = vec![0u64; words];
            for &a in &sel.aliases {
                let one = self
                    .alias_bits
                    .borrow_mut()
                    .entry(a)
                    .or_insert_with(|| Rc::new(self.r.resolve_bits(a, words).1))
                    .clone();
                or_into(&mut bits, &one);
            }
            bits
        })
    }

    /// Whether node `i` is among the nodes of `sel`.
    fn sel_has(&self, sel: &Sel<'a>, i: usize) -> bool {
        bit(self.sel_bits(sel), i)
    }

    /// [`Evaluator::sel_has`] for a source device: alias by alias while the bitmap is not
    /// built.
    fn sel_names(&self, sel: &Sel<'a>, i: usize) -> bool {
        if let Some(bits) = sel.bits.get() {
            return bit(bits, i);
        }
        sel.aliases.iter().any(|a| self.r.alias_names(a, i))
    }

    fn policy(&self) -> &Policy {
        &self.r.policy
    }

    fn alive_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.r.live_slots()
    }

    fn node_by_addr(&self, ip: &IpAddr) -> Option<usize> {
        self.alive_nodes()
            .find(|&i| self.r.nodes[i].addrs.contains(ip))
    }

    fn node_name(&self, i: usize) -> String {
        let n = &self.r.nodes[i];
        match n.addrs.first() {
            Some(a) => format!("{} ({a})", n.name),
            None => n.name.clone(),
        }
    }

    fn principal_name(&self, p: Principal) -> String {
        match p {
            Principal::Node(i) => self.node_name(i),
            Principal::Addr(ip) => ip.to_string(),
            Principal::Net(n) => n.to_string(),
        }
    }

    fn target_name(&self, t: Target) -> String {
        match t {
            Target::Node(i) => self.node_name(i),
            Target::Addr { ip, node: Some(i) } => {
                format!("{ip} ({})", self.r.nodes[i].name)
            }
            Target::Addr { ip, node: None } => ip.to_string(),
        }
    }

    /// Whether a range lies inside an approved subnet route.
    fn in_routes(&self, n: &IpNet) -> bool {
        let routes = self.routes.get_or_init(|| {
            self.r
                .nodes
                .iter()
                .filter(|x| x.alive)
                .flat_map(|x| x.routes.iter().copied())
                .collect()
        });
        routes.iter().any(|rt| rt.contains(n))
    }

    /// Whether a range lies in what `*` means as a source: the tailnet's own ranges and
    /// every approved subnet route.
    fn in_tailnet_space(&self, n: &IpNet) -> bool {
        let excluded =
            IpNet::V4(Ipv4Net::new(Ipv4Addr::new(100, 115, 92, 0), 23).unwrap_or_default());
        (addr::cgnat().contains(n) && !addr::overlaps(&excluded, n))
            || addr::tailnet_v6().contains(n)
            || self.in_routes(n)
    }

    /// Whether `p` is a source of a rule with sources `s` and postures `postures`; a device's
    /// posture is `attrs` when the test gives `srcPostureAttrs`, else its own.
    fn src_matches(
        &self,
        sel: &Sel<'a>,
        postures: &[Posture],
        p: Principal,
        attrs: Option<&PostureAttrs>,
    ) -> bool {
        let posture_ok = |i: usize| {
            let a = attrs.unwrap_or(&self.r.nodes[i].node.posture);
            postures.is_empty() || postures.iter().any(|x| x.matches(a))
        };
        // `*` under a posture keeps its routes but names devices only through the posture.
        let wildcard_space = |x: &IpNet| {
            if postures.is_empty() {
                self.in_tailnet_space(x)
            } else {
                self.in_routes(x)
            }
        };
        let s = &sel.set;
        match p {
            Principal::Node(i) => {
                let n = &self.r.nodes[i];
                s.danger_all
                    || ((s.wildcard || self.sel_names(sel, i)) && posture_ok(i))
                    || s.nets
                        .iter()
                        .any(|net| n.addrs.iter().any(|a| net.contains(a)))
            }
            Principal::Addr(ip) => {
                s.danger_all
                    || (s.wildcard && wildcard_space(&IpNet::from(ip)))
                    || s.nets.iter().any(|net| net.contains(&ip))
            }
            Principal::Net(x) => {
                s.danger_all
                    || (s.wildcard && wildcard_space(&x))
                    || s.nets.iter().any(|net| net.contains(&x))
            }
        }
    }

    /// Whether `p` and node `j` are untagged devices of the same user.
    fn same_user(&self, p: Principal, j: usize) -> bool {
        let Principal::Node(i) = p else {
            return false;
        };
        let (a, b) = (&self.r.nodes[i], &self.r.nodes[j]);
        a.is_member() && b.is_member() && a.email == b.email
    }

    fn dst_covers(&self, sel: &Sel<'a>, t: Target, p: Principal) -> bool {
        let d = &sel.set;
        if d.wildcard {
            return true;
        }
        match t {
            Target::Node(j) => {
                self.sel_has(sel, j)
                    || (d.self_devices && self.same_user(p, j))
                    || d.nets
                        .iter()
                        .any(|n| self.r.nodes[j].addrs.iter().any(|a| n.contains(a)))
            }
            Target::Addr { ip, node } => {
                d.nets.iter().any(|n| n.contains(&ip))
                    || node.is_some_and(|j| {
                        self.sel_has(sel, j) || (d.self_devices && self.same_user(p, j))
                    })
                    || (d.internet && node.is_none() && is_internet(&ip))
            }
        }
    }

    /// Which network rules have `p` among their sources (by rule index).
    fn net_sources(&self, p: Principal, attrs: Option<&PostureAttrs>) -> Vec<bool> {
        self.net_rules
            .iter()
            .map(|rule| self.src_matches(&rule.src, &rule.postures, p, attrs))
            .collect()
    }

    /// Whether a rule's destination entry with protocols `rule_protos` (empty: the default
    /// set) and `ports` admits one of `protos` on `port`.
    fn entry_admits(
        rule_protos: &[u8],
        ports: &[PortRange],
        protos: &[u8],
        port: Option<u16>,
    ) -> bool {
        protos.iter().any(|&proto| {
            let proto_ok = if rule_protos.is_empty() {
                matches!(proto, 1 | 6 | 17 | 58)
            } else {
                rule_protos.contains(&proto)
            };
            proto_ok
                && (!has_ports(proto) || ports.iter().any(|r| port.is_none_or(|p| r.contains(p))))
        })
    }

    /// Whether network rule `rule` lets `p` (one of its sources) reach `t`.
    fn rule_allows(
        &self,
        rule: &NetRuleEval<'a>,
        p: Principal,
        t: Target,
        protos: &[u8],
        port: Option<u16>,
    ) -> bool {
        rule.entries.iter().any(|(d, rule_protos, ports)| {
            Self::entry_admits(rule_protos, ports, protos, port) && self.dst_covers(d, t, p)
        })
    }

    /// For each of `targets`, the first network rule (index into `net_rules`) letting `p`
    /// reach it on `port` with one of `protos`; `sources` is [`Evaluator::net_sources`] of
    /// `p`. Device targets are settled a rule at a time on bitmaps (a test names hundreds of
    /// devices, and a rule covers or misses most of them alike); address targets one by one.
    fn first_rules(
        &self,
        p: Principal,
        sources: &[bool],
        targets: &[Target],
        protos: &[u8],
        port: Option<u16>,
    ) -> Vec<Option<usize>> {
        let words = self.r.nodes.len().div_ceil(64);
        let mut open = vec![0u64; words];
        let mut open_nodes = 0usize;
        for t in targets {
            if let Target::Node(j) = *t {
                if set_bit(&mut open, j) {
                    open_nodes += 1;
                }
            }
        }
        let mut out: Vec<Option<usize>> = vec![None; targets.len()];
        let mut open_addrs = targets.len()
            - targets
                .iter()
                .filter(|t| matches!(t, Target::Node(_)))
                .count();
        let mut own: Option<Vec<u64>> = None;
        let mut cover = vec![0u64; words];
        // The rules that reached devices first, each with the devices it reached first
        // (few rules: a slot-long table would cost more to clear than to search these).
        let mut firsts: Vec<(usize, Vec<u64>)> = Vec::new();
        for (ri, (rule, _)) in self
            .net_rules
            .iter()
            .zip(sources)
            .enumerate()
            .filter(|(_, (_, &source))| source)
        {
            if open_nodes == 0 && open_addrs == 0 {
                break;
            }
            if open_nodes > 0 {
                cover.iter_mut().for_each(|w| *w = 0);
                let mut all = false;
                for (d, rule_protos, ports) in &rule.entries {
                    if !Self::entry_admits(rule_protos, ports, protos, port) {
                        continue;
                    }
                    if d.set.wildcard {
                        all = true;
                        break;
                    }
                    if open_nodes <= FEW_OPEN && d.bits.get().is_none() {
                        // A few devices are judged alias by alias (a bitmap is built by a
                        // pass over every node).
                        for j in ones(&open) {
                            if self.sel_names(d, j) {
                                set_bit(&mut cover, j);
                            }
                        }
                    } else {
                        or_into(&mut cover, self.sel_bits(d));
                    }
                    if d.set.self_devices {
                        let own = own.get_or_insert_with(|| self.own_bits(p, words));
                        or_into(&mut cover, own);
                    }
                    if !d.set.nets.is_empty() {
                        for j in ones(&open) {
                            if self.r.nodes[j]
                                .addrs
                                .iter()
                                .any(|a| d.set.nets.iter().any(|n| n.contains(a)))
                            {
                                set_bit(&mut cover, j);
                            }
                        }
                    }
                }
                if all {
                    cover.copy_from_slice(&open);
                }
                for (w, c) in open.iter_mut().zip(cover.iter_mut()) {
                    *c &= *w;
                    *w &= !*c;
                }
                let reached = ones(&cover).count();
                if reached > 0 {
                    open_nodes -= reached;
                    firsts.push((ri, cover.clone()));
                }
            }
            if open_addrs > 0 {
                for (k, t) in targets.iter().enumerate() {
                    if matches!(t, Target::Addr { .. })
                        && out[k].is_none()
                        && self.rule_allows(rule, p, *t, protos, port)
                    {
                        out[k] = Some(ri);
                        open_addrs -= 1;
                    }
                }
            }
        }
        for (k, t) in targets.iter().enumerate() {
            if let Target::Node(j) = *t {
                out[k] = firsts
                    .iter()
                    .find(|(_, reached)| bit(reached, j))
                    .map(|&(ri, _)| ri);
            }
        }
        out
    }

    /// Whether one of the devices in `bits` is a device of `p`'s user (which
    /// `autogroup:self` destinations let `p` reach).
    fn owns_any(&self, p: Principal, bits: &[u64]) -> bool {
        let Principal::Node(i) = p else {
            return false;
        };
        let n = &self.r.nodes[i];
        n.is_member()
            && n.email.as_ref().is_some_and(|e| {
                self.r
                    .by_email
                    .get(e)
                    .into_iter()
                    .flatten()
                    .any(|&j| bit(bits, j) && self.same_user(p, j))
            })
    }

    /// The devices of `p`'s user as a bitmap over slots (empty unless `p` is a user's
    /// device): the nodes [`Evaluator::same_user`] holds for.
    fn own_bits(&self, p: Principal, words: usize) -> Vec<u64> {
        let mut bits = vec![0u64; words];
        if let Principal::Node(i) = p {
            if let Some(email) = self.r.nodes[i]
                .email
                .as_ref()
                .filter(|_| self.r.nodes[i].is_member())
            {
                for &j in self.r.by_email.get(email).into_iter().flatten() {
                    if self.same_user(p, j) {
                        set_bit(&mut bits, j);
                    }
                }
            }
        }
        bits
    }

    /// The devices (or addresses) a test source names.
    fn src_principals(&self, src: &Located<Alias>) -> Result<Vec<Principal>, String> {
        let (res, bits) = self.r.resolve_bits(&src.value, self.words());
        let mut out: Vec<Principal> = Vec::new();
        if res.wildcard {
            out.extend(self.alive_nodes().map(Principal::Node));
        }
        out.extend(ones(&bits).map(Principal::Node));
        for n in &res.nets {
            if n.prefix_len() == n.max_prefix_len() {
                let ip = n.addr();
                out.push(match self.node_by_addr(&ip) {
                    Some(i) => Principal::Node(i),
                    None => Principal::Addr(ip),
                });
            } else {
                out.push(Principal::Net(*n));
            }
        }
        let mut seen = Vec::with_capacity(out.len());
        out.retain(|p| {
            let new = !seen.contains(p);
            if new {
                seen.push(*p);
            }
            new
        });
        if out.is_empty() {
            return Err(format!(
                "src {:?} matches no devices in the tailnet",
                src.text
            ));
        }
        Ok(out)
    }

    /// The devices or addresses a `tests` destination names, only those among `toward`
    /// when given, and whether it names any at all.
    fn acl_dst(
        &self,
        dst: &Located<TestDst>,
        toward: Option<&[u64]>,
    ) -> Result<(DstHost, bool), String> {
        let d = &dst.text;
        match &dst.value.host {
            Alias::AutoGroup(AutoGroup::SelfDevices) => return Ok((DstHost::SelfDevices, true)),
            Alias::AutoGroup(AutoGroup::Internet) => {
                let hint = "test a public IP address instead";
                return Err(format!(
                    "dst {d:?}: autogroup:internet cannot be tested; {hint}"
                ));
            }
            _ => {}
        }
        let (res, mut bits) = self.r.resolve_bits(&dst.value.host, self.words());
        let mut any = !res.nets.is_empty() || bits.iter().any(|&w| w != 0);
        let mut targets: Vec<Target> = Vec::new();
        if res.wildcard {
            let mut alive = self.alive_nodes().peekable();
            any |= alive.peek().is_some();
            targets.extend(
                alive
                    .filter(|&j| toward.is_none_or(|o| bit(o, j)))
                    .map(Target::Node),
            );
        }
        if let Some(o) = toward {
            bits.iter_mut().zip(o).for_each(|(w, m)| *w &= m);
        }
        targets.extend(ones(&bits).map(Target::Node));
        for n in &res.nets {
            if n.prefix_len() != n.max_prefix_len() {
                return Err(format!(
                    "dst {d:?}: {n} is a range; a test destination must be a single address"
                ));
            }
            let ip = n.addr();
            let node = self.node_by_addr(&ip);
            // An address no device holds is a pair with a source only.
            if toward.is_none_or(|o| node.is_some_and(|j| bit(o, j))) {
                targets.push(Target::Addr { ip, node });
            }
        }
        Ok((DstHost::Fixed(targets), any))
    }

    /// The devices of `p`'s user (for `autogroup:self`).
    fn own_devices(&self, p: Principal) -> Result<Vec<usize>, String> {
        match p {
            Principal::Node(i) if self.r.nodes[i].is_member() => Ok(self
                .alive_nodes()
                .filter(|&j| self.same_user(p, j))
                .collect()),
            _ => Err(format!(
                "autogroup:self needs a source that is a user's device, and {} is not",
                self.principal_name(p)
            )),
        }
    }

    fn acl_test(&self, index: usize, t: &AclTest, out: &mut Vec<TestOutcome>) {
        let id = EntryId {
            kind: "tests",
            index,
            src: &t.src.text,
            pos: t.pos.to_string(),
        };
        let principals = match self.src_principals(&t.src) {
            Ok(p) => p,
            Err(e) => {
                out.push(id.malformed("", "", "", e));
                return;
            }
        };
        // Under `only`, a test none of whose sources is among those devices is judged toward
        // them alone (its other pairs are as they were when the tests last passed).
        let toward = self.only.as_deref().filter(|o| {
            !principals
                .iter()
                .any(|&p| matches!(p, Principal::Node(i) if bit(o, i)))
        });
        // Without a proto, a test is about TCP and UDP: an accept needs one of them to
        // work, a deny needs both to be blocked.
        let protos = match t.proto {
            Some(p) => vec![p],
            None => vec![6, 17],
        };
        let attrs = (!t.src_posture_attrs.is_empty()).then_some(&t.src_posture_attrs);
        let checks = t
            .accept
            .iter()
            .map(|d| (d, true))
            .chain(t.deny.iter().map(|d| (d, false)));
        for (dst, accept) in checks {
            let expect = if accept { "accept" } else { "deny" };
            let port = dst.value.port;
            let names: Vec<String> = protos.iter().map(|&p| proto_name(p)).collect();
            let what = match port {
                Some(port) if protos.iter().any(|&p| has_ports(p)) => {
                    format!("{}/{port}", names.join(","))
                }
                Some(_) => names.join(","),
                None => format!("{} (any port)", names.join(",")),
            };
            let (host, any) = match self.acl_dst(dst, toward) {
                Ok(x) => x,
                Err(e) => {
                    out.push(id.malformed(&dst.text, &what, expect, e));
                    continue;
                }
            };
            self.note_named(&principals, &host);
            let targets = Targets {
                host: &host,
                any,
                toward,
            };
            let res =
                self.eval_acl_pairs(&principals, attrs, &targets, &protos, port, accept, &what);
            out.push(id.outcome(&dst.text, &what, expect, res));
        }
    }

    /// Records the devices a test's sources and one of its fixed destinations name (the
    /// devices of an `autogroup:self` destination are recorded where they are looked up).
    fn note_named(&self, principals: &[Principal], host: &DstHost) {
        let mut named = self.named.borrow_mut();
        for &p in principals {
            if let Principal::Node(i) = p {
                set_bit(&mut named, i);
            }
        }
        if let DstHost::Fixed(targets) = host {
            for t in targets {
                if let Target::Node(j) | Target::Addr { node: Some(j), .. } = *t {
                    set_bit(&mut named, j);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn eval_acl_pairs(
        &self,
        principals: &[Principal],
        attrs: Option<&PostureAttrs>,
        dst: &Targets,
        protos: &[u8],
        port: Option<u16>,
        accept: bool,
        what: &str,
    ) -> PairResult {
        // The rules that let sources reach targets, in the order first met (`usize::MAX`:
        // the default policy).
        let mut used: Vec<usize> = Vec::new();
        let label = |ri: usize| -> &str {
            self.net_rules
                .get(ri)
                .map_or(DEFAULT_POLICY, |r| r.label.as_str())
        };
        // The source patterns (the rules a device is a source of) already settled for the
        // fixed targets: a device with one of them reaches them alike.
        let mut settled: Vec<Vec<bool>> = Vec::new();
        let host = dst.host;
        // The devices fixed targets name.
        let target_bits = match host {
            DstHost::Fixed(targets) => {
                let mut bits = vec![0u64; self.words()];
                for t in targets {
                    match *t {
                        Target::Node(j) | Target::Addr { node: Some(j), .. } => {
                            set_bit(&mut bits, j);
                        }
                        Target::Addr { node: None, .. } => {}
                    }
                }
                Some(bits)
            }
            DstHost::SelfDevices => None,
        };
        for &p in principals {
            let own: Vec<Target>;
            // Whether the destination names any device for `p` (its fixed targets, or its
            // own devices, before they are narrowed to `dst.toward`).
            let mut names_any = dst.any;
            let targets: &[Target] = match host {
                DstHost::Fixed(t) => t,
                DstHost::SelfDevices => match self.own_devices(p) {
                    Ok(v) => {
                        names_any = !v.is_empty();
                        let mut named = self.named.borrow_mut();
                        own = v
                            .into_iter()
                            .filter(|&j| dst.toward.is_none_or(|o| bit(o, j)))
                            .inspect(|&j| {
                                set_bit(&mut named, j);
                            })
                            .map(Target::Node)
                            .collect();
                        &own
                    }
                    Err(e) => {
                        return PairResult {
                            ok: false,
                            rule: None,
                            reason: format!("invalid test: {e}"),
                        }
                    }
                },
            };
            if targets.is_empty() && accept && !names_any {
                return PairResult {
                    ok: false,
                    rule: None,
                    reason: format!(
                        "the destination matches no devices that {} could reach",
                        self.principal_name(p)
                    ),
                };
            }
            let firsts: Vec<Option<usize>> = if self.policy().has_rules {
                let sources = self.net_sources(p, attrs);
                // Devices that are sources of the same rules reach the same fixed targets
                // alike (unless a rule reaches a device's own devices): a pattern settled
                // before (every check passed, or the test would have ended) passes again.
                let shared = target_bits
                    .as_ref()
                    .is_some_and(|bits| !self.self_dst || !self.owns_any(p, bits));
                if shared && settled.contains(&sources) {
                    continue;
                }
                let firsts = self.first_rules(p, &sources, targets, protos, port);
                if shared {
                    settled.push(sources);
                }
                firsts
            } else {
                vec![Some(usize::MAX); targets.len()]
            };
            for (t, first) in targets.iter().zip(firsts) {
                match (first, accept) {
                    (Some(ri), true) => {
                        if !used.contains(&ri) {
                            used.push(ri);
                        }
                    }
                    (None, true) => {
                        return PairResult {
                            ok: false,
                            rule: None,
                            reason: format!(
                                "{} cannot reach {} on {what}: no rule in acls or grants allows it",
                                self.principal_name(p),
                                self.target_name(*t)
                            ),
                        }
                    }
                    (Some(ri), false) => {
                        let label = label(ri);
                        return PairResult {
                            ok: false,
                            rule: Some(label.to_string()),
                            reason: format!(
                                "{} can reach {} on {what}: allowed by {label}",
                                self.principal_name(p),
                                self.target_name(*t)
                            ),
                        };
                    }
                    (None, false) => {}
                }
            }
        }
        if accept {
            let rules: Vec<&str> = used.iter().map(|&ri| label(ri)).collect();
            PairResult {
                ok: true,
                reason: format!("allowed by {}", rules.join(", ")),
                rule: rules.first().map(|r| r.to_string()),
            }
        } else {
            PairResult {
                ok: true,
                rule: None,
                reason: "no rule allows it".into(),
            }
        }
    }

    /// The devices an `sshTests` destination names.
    fn ssh_dst(&self, dst: &Located<Alias>) -> Result<DstHost, String> {
        let d = &dst.text;
        let single_ip = match &dst.value {
            Alias::Prefix(n) if n.prefix_len() == n.max_prefix_len() => Some(n.addr()),
            Alias::Host(h) => self
                .policy()
                .hosts
                .get(h)
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(IpNet::addr),
            _ => None,
        };
        if let Some(ip) = single_ip {
            if ip.is_ipv6() {
                return Err(format!(
                    "dst {d:?}: an IPv6 address is not a valid sshTests destination; use the device's IPv4 address, tag or user"
                ));
            }
            return match self.node_by_addr(&ip) {
                Some(i) => Ok(DstHost::Fixed(vec![Target::Node(i)])),
                None => Err(format!("dst {d:?}: no device has the address {ip}")),
            };
        }
        if dst.value == Alias::AutoGroup(AutoGroup::SelfDevices) {
            return Ok(DstHost::SelfDevices);
        }
        let (res, bits) = self.r.resolve_bits(&dst.value, self.words());
        let mut nodes: Vec<usize> = Vec::new();
        if res.wildcard {
            nodes.extend(self.alive_nodes());
        }
        nodes.extend(ones(&bits));
        for n in &res.nets {
            nodes.extend(
                self.alive_nodes()
                    .filter(|&i| self.r.nodes[i].addrs.iter().any(|a| n.contains(a))),
            );
        }
        nodes.sort_unstable();
        nodes.dedup();
        Ok(DstHost::Fixed(
            nodes.into_iter().map(Target::Node).collect(),
        ))
    }

    /// Which SSH rules (in client order) have `p` among their sources.
    fn ssh_sources(&self, p: Principal, attrs: Option<&PostureAttrs>) -> Vec<bool> {
        self.ssh_rules
            .iter()
            .map(|rule| self.src_matches(&rule.src, &rule.postures, p, attrs))
            .collect()
    }

    /// The first SSH rule (in client order) letting `p` log in to node `d` as `user`;
    /// `sources` is [`Evaluator::ssh_sources`] of `p`.
    fn ssh_verdict(
        &self,
        p: Principal,
        sources: &[bool],
        d: usize,
        user: &str,
    ) -> Option<&SshRuleEval<'a>> {
        let localpart = match p {
            Principal::Node(i) if self.r.nodes[i].is_member() => self.r.nodes[i]
                .email
                .as_deref()
                .and_then(|e| e.rsplit_once('@')),
            _ => None,
        };
        let rules = self.ssh_rules.iter().zip(sources);
        rules
            .filter(|(_, &s)| s)
            .map(|(rule, _)| rule)
            .find(|rule| {
                let dn = &self.r.nodes[d];
                let dst_ok = rule.dst.set.wildcard
                || self.sel_has(&rule.dst, d)
                || (rule.dst.set.self_devices && self.same_user(p, d))
                || rule
                    .dst
                    .set
                    .nets
                    .iter()
                    .any(|n| dn.addrs.iter().any(|a| n.contains(a)))
                // With localpart users, a source device may also log in to itself.
                || (rule.has_localpart && p == Principal::Node(d));
                if !dst_ok {
                    return false;
                }
                if user == "root" {
                    return rule.users.contains(&SshUser::Root);
                }
                rule.users.iter().any(|u| match u {
                    SshUser::Root => false,
                    SshUser::NonRoot => true,
                    SshUser::Named(n) => n == user,
                    SshUser::LocalPart(dom) => {
                        localpart.is_some_and(|(local, ed)| local == user && ed == dom)
                    }
                })
            })
    }

    fn ssh_test(&self, index: usize, t: &SshTest, out: &mut Vec<TestOutcome>) {
        let id = EntryId {
            kind: "sshTests",
            index,
            src: &t.src.text,
            pos: t.pos.to_string(),
        };
        let all_dst = || t.dst.iter().map(|d| &*d.text).collect::<Vec<_>>().join(",");
        let principals = match self.src_principals(&t.src) {
            Ok(p) => p,
            Err(e) => {
                out.push(id.malformed(&all_dst(), "", "", e));
                return;
            }
        };
        let attrs = (!t.src_posture_attrs.is_empty()).then_some(&t.src_posture_attrs);
        for dst in &t.dst {
            let host = match self.ssh_dst(dst) {
                Ok(h) => h,
                Err(e) => {
                    out.push(id.malformed(&dst.text, "", "", e));
                    continue;
                }
            };
            let checks = t
                .accept
                .iter()
                .map(|u| (u, "accept"))
                .chain(t.check.iter().map(|u| (u, "check")))
                .chain(t.deny.iter().map(|u| (u, "deny")));
            for (user, expect) in checks {
                let res = self.eval_ssh_pairs(&principals, attrs, &host, user, expect);
                out.push(id.outcome(&dst.text, user, expect, res));
            }
        }
    }

    fn eval_ssh_pairs(
        &self,
        principals: &[Principal],
        attrs: Option<&PostureAttrs>,
        host: &DstHost,
        user: &str,
        expect: &str,
    ) -> PairResult {
        let fail = |rule: Option<&SshRuleEval>, reason: String| PairResult {
            ok: false,
            rule: rule.map(|r| r.label.clone()),
            reason,
        };
        let mut rules: Vec<String> = Vec::new();
        for &p in principals {
            let sources = self.ssh_sources(p, attrs);
            let targets: Vec<usize> = match host {
                DstHost::Fixed(t) => t
                    .iter()
                    .filter_map(|t| match t {
                        Target::Node(i) | Target::Addr { node: Some(i), .. } => Some(*i),
                        Target::Addr { node: None, .. } => None,
                    })
                    .collect(),
                DstHost::SelfDevices => match self.own_devices(p) {
                    Ok(v) => v,
                    Err(e) => return fail(None, format!("invalid test: {e}")),
                },
            };
            if targets.is_empty() && expect != "deny" {
                return fail(None, "the destination matches no devices".into());
            }
            for d in targets {
                let who = format!(
                    "{} log in to {} as {user:?}",
                    self.principal_name(p),
                    self.node_name(d)
                );
                let v = self.ssh_verdict(p, &sources, d, user);
                let (ok, reason) = match (expect, v) {
                    ("deny", None) => (true, String::new()),
                    ("deny", Some(rule)) => (
                        false,
                        format!(
                            "{} lets {who}{}",
                            rule.label,
                            if rule.action == SshAction::Check {
                                " (after a check)"
                            } else {
                                ""
                            }
                        ),
                    ),
                    (_, None) => (false, format!("no ssh rule lets {who}")),
                    ("check", Some(rule)) if rule.action == SshAction::Accept => (
                        false,
                        format!(
                            "{} lets {who} without a check (list the user under accept)",
                            rule.label
                        ),
                    ),
                    ("accept", Some(rule)) if rule.action == SshAction::Check => (
                        false,
                        format!(
                            "{} lets {who} only after a check (list the user under check)",
                            rule.label
                        ),
                    ),
                    (_, Some(rule)) => {
                        if !rules.contains(&rule.label) {
                            rules.push(rule.label.clone());
                        }
                        (true, String::new())
                    }
                };
                if !ok {
                    return fail(v, reason);
                }
            }
        }
        if expect == "deny" {
            PairResult {
                ok: true,
                rule: None,
                reason: "no ssh rule lets it in".into(),
            }
        } else {
            PairResult {
                ok: true,
                reason: format!("allowed by {}", rules.join(", ")),
                rule: rules.into_iter().next(),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const STATE: &str = r#"{
      "users": [
        {"id": 1, "name": "odin", "email": "odin@example.com"},
        {"id": 2, "name": "thor", "email": "thor@example.org"},
        {"id": 3, "name": "loki", "email": "loki@example.com"}
      ],
      "nodes": {
        "odin-laptop": {"hostname": "odin-laptop", "user": "odin", "ipv4": "100.64.0.1",
                        "ipv6": "fd7a:115c:a1e0::1", "created": "2024-01-01T00:00:00Z"},
        "odin-phone": {"hostname": "odin-phone", "user": "odin", "ipv4": "100.64.0.2",
                       "ipv6": "fd7a:115c:a1e0::2", "created": "2024-01-01T00:00:01Z"},
        "thor-laptop": {"hostname": "thor-laptop", "user": "thor", "ipv4": "100.64.0.3",
                        "ipv6": "fd7a:115c:a1e0::3", "created": "2024-01-01T00:00:02Z"},
        "server": {"hostname": "server", "tags": ["tag:server"], "ipv4": "100.64.0.10",
                   "ipv6": "fd7a:115c:a1e0::a", "created": "2024-01-01T00:00:03Z"},
        "client": {"hostname": "client", "tags": ["tag:client"], "ipv4": "100.64.0.11",
                   "ipv6": "fd7a:115c:a1e0::b", "created": "2024-01-01T00:00:04Z"},
        "router": {"hostname": "router", "tags": ["tag:router"], "ipv4": "100.64.0.12",
                   "ipv6": "fd7a:115c:a1e0::c", "routable_ips": ["10.33.0.0/16"],
                   "approved_routes": ["10.33.0.0/16"], "created": "2024-01-01T00:00:05Z"}
      },
      "tailnet": {"name": "odin@example.com"}
    }"#;

    const HEAD: &str = r#"
      "groups": {"group:dev": ["odin@example.com", "thor@example.org"], "group:none": []},
      "tagOwners": {"tag:server": ["odin@example.com"], "tag:client": ["odin@example.com"],
                    "tag:router": ["odin@example.com"], "tag:unused": ["odin@example.com"]},
      "hosts": {"web": "100.64.0.10", "lan": "10.33.0.0/16", "printer": "10.33.1.5"},
    "#;

    fn run(body: &str) -> TestReport {
        let policy = netmap_policy::parse_policy(&format!("{{{HEAD}{body}}}")).unwrap();
        let tailnet = Tailnet::from_state_json(STATE).unwrap();
        run_tests(&policy, &tailnet)
    }

    /// (passed, reason, rule) of every outcome.
    fn outcomes(body: &str) -> Vec<(bool, String, Option<String>)> {
        run(body)
            .outcomes
            .into_iter()
            .map(|o| (o.passed, o.reason, o.rule))
            .collect()
    }

    fn passes(body: &str) -> bool {
        let r = run(body);
        assert!(!r.outcomes.is_empty(), "no outcome for {body}");
        r.passed()
    }

    #[test]
    fn no_tests_no_outcomes() {
        assert!(run(r#""acls": []"#).outcomes.is_empty());
    }

    #[test]
    fn accept_and_deny_name_the_rule() {
        let body = r#""acls": [
            {"action": "accept", "src": ["tag:client"], "dst": ["web:80"]},
            {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]}
          ],
          "tests": [
            {"src": "thor@example.org", "accept": ["tag:server:22", "web:22"], "deny": ["web:80"]},
            {"src": "thor@example.org", "deny": ["tag:server:22"]},
            {"src": "tag:client", "accept": ["tag:server:443"]}
          ]"#;
        let o = outcomes(body);
        assert_eq!(o.len(), 5);
        assert!(o[0].0 && o[1].0 && o[2].0, "{o:?}");
        assert_eq!(o[0].2.as_deref(), Some("acls[1]"));
        assert!(!o[3].0);
        assert_eq!(o[3].2.as_deref(), Some("acls[1]"));
        assert!(
            o[3].1.contains("thor-laptop") && o[3].1.contains("acls[1]"),
            "{}",
            o[3].1
        );
        assert!(!o[4].0);
        assert!(o[4].1.contains("no rule"), "{}", o[4].1);
        assert_eq!(o[4].2, None);
        let r = run(body);
        assert_eq!(r.outcomes[4].what, "tcp,udp/443");
        assert_eq!(r.outcomes[4].index, 2);
        assert_eq!(r.outcomes[3].expect, "deny");
    }

    #[test]
    fn every_source_device_must_reach() {
        // Only thor is allowed; the group test must fail naming odin's device.
        let body = r#""acls": [{"action": "accept", "src": ["thor@example.org"], "dst": ["web:80"]}],
          "tests": [{"src": "group:dev", "accept": ["web:80"]}]"#;
        let o = outcomes(body);
        assert!(!o[0].0);
        assert!(o[0].1.contains("odin-"), "{}", o[0].1);
        // A deny passes only when no device gets through.
        assert!(!passes(
            r#""acls": [{"action": "accept", "src": ["thor@example.org"], "dst": ["web:80"]}],
              "tests": [{"src": "group:dev", "deny": ["web:80"]}]"#
        ));
    }

    #[test]
    fn grants_count_but_capability_grants_do_not() {
        let body = r#""grants": [
            {"src": ["tag:client"], "dst": ["tag:server"], "ip": ["tcp:443"]},
            {"src": ["thor@example.org"], "dst": ["tag:server"], "app": {"example.com/cap/x": [{}]}}
          ],
          "tests": [
            {"src": "tag:client", "accept": ["100.64.0.10:443"], "deny": ["web:80"]},
            {"src": "thor@example.org", "deny": ["tag:server:443"]}
          ]"#;
        let o = outcomes(body);
        assert!(o.iter().all(|x| x.0), "{o:?}");
        assert_eq!(o[0].2.as_deref(), Some("grants[0]"));
        let fail = outcomes(
            r#""grants": [{"src": ["tag:client"], "dst": ["tag:server"], "ip": ["tcp:443"]}],
              "tests": [{"src": "tag:client", "deny": ["tag:server:443"]}]"#,
        );
        assert_eq!(fail[0].2.as_deref(), Some("grants[0]"));
    }

    /// The policy's error, for entries the policy reader refuses.
    fn rejected(body: &str) -> String {
        match netmap_policy::parse_policy(&format!("{{{HEAD}{body}}}")) {
            Ok(_) => panic!("accepted: {body}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn protocols() {
        let acls = r#""acls": [
            {"action": "accept", "src": ["tag:client"], "dst": ["web:53"], "proto": "udp"},
            {"action": "accept", "src": ["tag:client"], "dst": ["web:80"]}
          ],"#;
        // No proto in a test means TCP or UDP: an accept needs one, a deny needs both blocked.
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:53"]}}]"#
        )));
        assert!(!passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "deny": ["web:53"]}}]"#
        )));
        assert!(!passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:53"], "proto": "tcp"}}]"#
        )));
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:53"], "proto": "udp"}}]"#
        )));
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:53"], "proto": "17"}}]"#
        )));
        // A rule without proto allows TCP, UDP and ICMP; ICMP ignores ports.
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:80"], "proto": "icmp"}}]"#
        )));
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:0"], "proto": "icmp"}}]"#
        )));
        assert!(!passes(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:80"], "proto": "sctp"}}]"#
        )));
        let bad = rejected(&format!(
            r#"{acls} "tests": [{{"src": "tag:client", "accept": ["web:80"], "proto": "bogus"}}]"#
        ));
        assert!(
            bad.contains("test(s) failed") && bad.contains("bogus"),
            "{bad}"
        );
    }

    #[test]
    fn malformed_entries_are_rejected_with_a_reason() {
        let acl = r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],"#;
        for (t, needle) in [
            (r#"{"src": "", "accept": ["web:80"]}"#, "needs a src"),
            (r#"{"accept": ["web:80"]}"#, "needs a src"),
            (r#"{"src": "thor@example.org"}"#, "accept or deny"),
            (
                r#"{"src": "group:nope", "accept": ["web:80"]}"#,
                "group:nope",
            ),
            (r#"{"src": "tag:nope", "accept": ["web:80"]}"#, "tag:nope"),
            (
                r#"{"src": "autogroup:bogus", "accept": ["web:80"]}"#,
                "autogroup:bogus",
            ),
            (r#"{"src": "nohost", "accept": ["web:80"]}"#, "nohost"),
            (r#"{"src": "*", "accept": ["web:80"]}"#, "\"*\""),
            (r#"{"src": "10.0.0.0/8", "accept": ["web:80"]}"#, "range"),
            (
                r#"{"src": "autogroup:self", "accept": ["web:80"]}"#,
                "tests src",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["webx"]}"#,
                "host:port",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:notaport"]}"#,
                "notaport",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:-1"]}"#,
                "\"-1\"",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:99999"]}"#,
                "out of range",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:0"]}"#,
                "port 0",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:80-90"]}"#,
                "single port",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["web:*"]}"#,
                "single port",
            ),
            (
                r#"{"src": "thor@example.org", "deny": ["web:22,23"]}"#,
                "single port",
            ),
            (r#"{"src": "thor@example.org", "accept": [":80"]}"#, "host"),
            (
                r#"{"src": "thor@example.org", "accept": ["nohost:80"]}"#,
                "nohost",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["group:nope:80"]}"#,
                "group:nope",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["tag:nope:80"]}"#,
                "tag:nope",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["autogroup:bogus:80"]}"#,
                "bogus",
            ),
            (
                r#"{"src": "thor@example.org", "deny": ["10.0.0.0/8:22"]}"#,
                "range",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["lan:22"]}"#,
                "range",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["*:22"]}"#,
                "\"*\"",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["web:22"]}"#,
                "unknown field \"dst\"",
            ),
            (
                r#"{"src": "a@x.io", "user": "b@x.io", "accept": ["web:22"]}"#,
                "old name",
            ),
        ] {
            let e = rejected(&format!(r#"{acl} "tests": [{t}]"#));
            assert!(
                e.contains("test(s) failed") || e.contains("unknown field"),
                "{t}: {e}"
            );
            assert!(e.contains(needle), "{t}: {e}");
            assert!(e.contains("tests[0]"), "{t}: {e}");
        }
    }

    #[test]
    fn unsatisfiable_entries_fail_with_a_reason() {
        let acl = r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],"#;
        for (t, needle) in [
            (
                r#"{"src": "group:none", "accept": ["web:80"]}"#,
                "no devices",
            ),
            (
                r#"{"src": "thor@example.org", "accept": ["autogroup:internet:443"]}"#,
                "internet",
            ),
            (
                r#"{"src": "tag:client", "accept": ["autogroup:self:22"]}"#,
                "autogroup:self",
            ),
        ] {
            let r = run(&format!(r#"{acl} "tests": [{t}]"#));
            assert!(!r.passed(), "{t} passed");
            let o = r.outcomes.iter().find(|o| !o.passed).unwrap();
            assert!(o.reason.contains(needle), "{t}: {}", o.reason);
        }
        // A bare host (Tailscale's default policy writes them) is reachable on some port.
        let rules =
            r#""acls": [{"action": "accept", "src": ["tag:client"], "dst": ["tag:server:443"]}],"#;
        assert!(passes(&format!(
            r#"{rules} "tests": [{{"src": "tag:client", "accept": ["tag:server", "web", "100.64.0.10"]}}]"#
        )));
        assert!(!passes(&format!(
            r#"{rules} "tests": [{{"src": "tag:client", "deny": ["tag:server"]}}]"#
        )));
        assert!(passes(&format!(
            r#"{rules} "tests": [{{"src": "thor@example.org", "deny": ["tag:server"]}}]"#
        )));
        // The legacy names still work.
        assert!(passes(&format!(
            r#"{acl} "tests": [{{"user": "thor@example.org", "allow": ["web:80"]}}]"#
        )));
    }

    #[test]
    fn destinations() {
        let body = r#""acls": [
            {"action": "accept", "src": ["thor@example.org"], "dst": ["autogroup:self:22"]},
            {"action": "accept", "src": ["tag:client"], "dst": ["lan:443", "100.64.0.10:80"]}
          ],
          "tests": [
            {"src": "thor@example.org", "accept": ["autogroup:self:22", "100.64.0.3:22"]},
            {"src": "odin@example.com", "deny": ["autogroup:self:22"]},
            {"src": "tag:client", "accept": ["printer:443", "10.33.9.9:443", "web:80", "tag:server:80"]},
            {"src": "tag:client", "deny": ["printer:80", "[fd7a:115c:a1e0::a]:80"]}
          ]"#;
        let r = run(body);
        let failed: Vec<&TestOutcome> = r.outcomes.iter().filter(|o| !o.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
        // A device name is no host alias.
        assert!(rejected(
            r#""tests": [{"src": "thor@example.org", "accept": ["thor-laptop:22"]}]"#
        )
        .contains("thor-laptop"));
        // Self: thor reaches his own device, not odin's.
        assert!(!passes(
            r#""acls": [{"action": "accept", "src": ["group:dev"], "dst": ["autogroup:self:22"]}],
              "tests": [{"src": "thor@example.org", "accept": ["odin@example.com:22"]}]"#
        ));
        // An empty destination cannot be reached, and is trivially denied.
        assert!(!passes(
            r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
              "tests": [{"src": "tag:client", "accept": ["tag:unused:22"]}]"#
        ));
        assert!(passes(
            r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
              "tests": [{"src": "tag:client", "deny": ["tag:unused:22"]}]"#
        ));
    }

    #[test]
    fn sources() {
        let acls = r#""acls": [{"action": "accept", "src": ["100.64.0.3", "10.33.0.0/16"], "dst": ["web:22"]}],"#;
        // An IP source is the device with that address (or the address itself).
        assert!(passes(&format!(
            r#"{acls} "tests": [{{"src": "thor@example.org", "accept": ["web:22"]}},
                               {{"src": "10.33.4.4", "accept": ["web:22"]}},
                               {{"src": "100.64.0.1", "deny": ["web:22"]}}]"#
        )));
        // `*` as a rule source covers the tailnet and its routes, not the internet.
        let star = r#""acls": [{"action": "accept", "src": ["*"], "dst": ["web:22"]}],"#;
        assert!(passes(&format!(
            r#"{star} "tests": [{{"src": "10.33.1.1", "accept": ["web:22"]}},
                               {{"src": "8.8.8.8", "deny": ["web:22"]}}]"#
        )));
    }

    /// The bitmap evaluation picks, for every principal and target, the rule a scan of the
    /// rules one target at a time picks: rules with `*`, `autogroup:self`, addresses and
    /// prefixes as destinations, protocols and ports, wildcard and address sources; with
    /// the destinations' bitmaps built and not.
    #[test]
    fn first_rules_agree_with_a_rule_by_rule_scan() {
        let acls = r#""acls": [
            {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:443", "printer:*"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]},
            {"action": "accept", "src": ["*"], "dst": ["100.64.0.0/30:80", "lan:53"], "proto": "udp"},
            {"action": "accept", "src": ["odin@example.com"], "dst": ["*:8080"]},
            {"action": "accept", "src": ["10.33.0.0/16"], "dst": ["web:22", "tag:client:*"]},
            {"action": "accept", "src": ["tag:client"], "dst": ["100.64.0.3:22", "tag:router:*"]}
        ]"#;
        let policy = netmap_policy::parse_policy(&format!("{{{HEAD}{acls}}}")).unwrap();
        let tailnet = Tailnet::from_state_json(STATE).unwrap();
        let r = Resolver::new(Arc::new(policy), &tailnet);
        // A few open devices are judged alias by alias, unless the bitmaps are built: both.
        for built in [false, true] {
            let ev = Evaluator::new(&r);
            if built {
                for rule in &ev.net_rules {
                    for (d, _, _) in &rule.entries {
                        ev.sel_bits(d);
                    }
                }
            }
            first_rules_agree_on(&ev);
        }
    }

    fn first_rules_agree_on(ev: &Evaluator<'_>) {
        let mut principals: Vec<Principal> = ev.alive_nodes().map(Principal::Node).collect();
        principals.push(Principal::Addr("10.33.1.7".parse().unwrap()));
        principals.push(Principal::Net("10.33.0.0/24".parse().unwrap()));
        let mut targets: Vec<Target> = ev.alive_nodes().map(Target::Node).collect();
        targets.push(Target::Node(0));
        for ip in ["100.64.0.10", "10.33.1.5", "10.33.9.9", "8.8.8.8"] {
            let ip: IpAddr = ip.parse().unwrap();
            targets.push(Target::Addr {
                ip,
                node: ev.node_by_addr(&ip),
            });
        }
        let mut checked = 0;
        for &p in &principals {
            let sources = ev.net_sources(p, None);
            for protos in [vec![6], vec![17], vec![6, 17], vec![1]] {
                for port in [None, Some(22), Some(53), Some(80), Some(443), Some(8080)] {
                    let got = ev.first_rules(p, &sources, &targets, &protos, port);
                    let want: Vec<Option<usize>> = targets
                        .iter()
                        .map(|&t| {
                            (0..ev.net_rules.len()).find(|&ri| {
                                sources[ri]
                                    && ev.rule_allows(&ev.net_rules[ri], p, t, &protos, port)
                            })
                        })
                        .collect();
                    assert_eq!(got, want, "{p:?} {protos:?} {port:?}");
                    checked += want.iter().filter(|x| x.is_some()).count();
                }
            }
        }
        // Not vacuous: many pairs are allowed, by several different rules.
        assert!(checked > 100, "{checked}");
    }

    #[test]
    fn default_policy_allows_everything() {
        let o = outcomes(r#""tests": [{"src": "tag:client", "accept": ["tag:server:5432"]}]"#);
        assert!(o[0].0);
        assert!(o[0].1.contains("default policy"));
        // An explicit empty acls denies everything.
        assert!(!passes(
            r#""acls": [], "tests": [{"src": "tag:client", "accept": ["tag:server:5432"]}]"#
        ));
    }

    #[test]
    fn ssh_actions_and_users() {
        let ssh = r#""ssh": [
            {"action": "accept", "src": ["thor@example.org"], "dst": ["tag:server"], "users": ["autogroup:nonroot"]},
            {"action": "check", "src": ["group:dev"], "dst": ["tag:server"], "users": ["root", "admin"]},
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]},
            {"action": "accept", "src": ["odin@example.com"], "dst": ["tag:server"], "users": ["localpart:*@example.com"]}
          ],"#;
        let ok = format!(
            r#"{ssh} "sshTests": [
              {{"src": "thor@example.org", "dst": ["tag:server", "100.64.0.10"], "accept": ["alice", "ubuntu"], "check": ["root", "admin"]}},
              {{"src": "thor@example.org", "dst": ["thor@example.org"], "accept": ["root"], "deny": ["alice"]}},
              {{"src": "thor@example.org", "dst": ["odin@example.com"], "deny": ["root", "thor"]}},
              {{"src": "odin@example.com", "dst": ["tag:server"], "accept": ["odin"], "check": ["root"], "deny": ["thor", "alice"]}},
              {{"src": "100.64.0.3", "dst": ["tag:server"], "accept": ["bob"]}},
              {{"src": "tag:client", "dst": ["tag:server"], "deny": ["root", "alice"]}}
            ]"#
        );
        let r = run(&ok);
        let failed: Vec<&TestOutcome> = r.outcomes.iter().filter(|o| !o.passed).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        // The check rule comes first for admin: accept is not enough, and the accept rule
        // does not satisfy a check.
        let o = outcomes(&format!(
            r#"{ssh} "sshTests": [
              {{"src": "thor@example.org", "dst": ["tag:server"], "accept": ["admin"]}},
              {{"src": "thor@example.org", "dst": ["tag:server"], "check": ["alice"]}},
              {{"src": "thor@example.org", "dst": ["tag:server"], "deny": ["root"]}},
              {{"src": "thor@example.org", "dst": ["tag:server"], "accept": ["thor"], "deny": ["bob"]}}
            ]"#
        ));
        assert!(!o[0].0 && o[0].1.contains("check"), "{o:?}");
        assert_eq!(o[0].2.as_deref(), Some("ssh[1]"));
        assert!(!o[1].0 && o[1].2.as_deref() == Some("ssh[0]"), "{o:?}");
        assert!(!o[2].0 && o[2].2.as_deref() == Some("ssh[1]"), "{o:?}");
        assert!(o[3].0, "{o:?}");
        assert!(!o[4].0 && o[4].2.as_deref() == Some("ssh[0]"), "{o:?}");
    }

    #[test]
    fn ssh_malformed() {
        let ssh = r#""ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server"], "users": ["root"]}],"#;
        for (t, needle) in [
            (
                r#"{"src": "thor@example.org", "dst": ["tag:server"], "accept": [""]}"#,
                "user \"\" is not valid",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["tag:nope"], "accept": ["root"]}"#,
                "tag:nope",
            ),
            (
                r#"{"src": "thor@example.org", "dst": [], "accept": ["root"]}"#,
                "dst",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["tag:server"]}"#,
                "accept, check or deny",
            ),
            (
                r#"{"src": "", "dst": ["tag:server"], "accept": ["root"]}"#,
                "src",
            ),
            (
                r#"{"src": "group:nope", "dst": ["tag:server"], "accept": ["root"]}"#,
                "group:nope",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["10.0.0.0/8"], "accept": ["root"]}"#,
                "SSH tests dst contains disallowed element",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["autogroup:internet"], "accept": ["root"]}"#,
                "SSH tests dst contains disallowed element",
            ),
        ] {
            let e = rejected(&format!(r#"{ssh} "sshTests": [{t}]"#));
            assert!(e.contains(needle), "{t}: {e}");
        }
        for (t, needle) in [
            (
                r#"{"src": "thor@example.org", "dst": ["fd7a:115c:a1e0::a"], "accept": ["root"]}"#,
                "IPv6",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["100.99.9.9"], "accept": ["root"]}"#,
                "no device",
            ),
            (
                r#"{"src": "thor@example.org", "dst": ["tag:unused"], "accept": ["root"]}"#,
                "no devices",
            ),
            (
                r#"{"src": "tag:client", "dst": ["autogroup:self"], "accept": ["root"]}"#,
                "autogroup:self",
            ),
        ] {
            let r = run(&format!(r#"{ssh} "sshTests": [{t}]"#));
            assert!(!r.passed(), "{t} passed");
            let o = r.outcomes.iter().find(|o| !o.passed).unwrap();
            assert!(o.reason.contains(needle), "{t}: {}", o.reason);
        }
        // A host alias names the device with its address.
        assert!(passes(&format!(
            r#"{ssh} "sshTests": [{{"src": "thor@example.org", "dst": ["web"], "accept": ["root"]}}]"#
        )));
    }

    /// The direct evaluation agrees with the compiled per-node SSH rules the client matches
    /// (first rule whose principal is the source and whose `sshUsers` maps the user).
    #[test]
    fn ssh_verdicts_match_compiled_rules() {
        let text = format!(
            r#"{{{HEAD} "ssh": [
              {{"action": "accept", "src": ["thor@example.org"], "dst": ["tag:server"], "users": ["autogroup:nonroot"]}},
              {{"action": "check", "src": ["group:dev"], "dst": ["tag:server", "tag:router"], "users": ["root", "admin"]}},
              {{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root", "ubuntu"]}},
              {{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server"], "users": ["localpart:*@example.com"]}},
              {{"action": "accept", "src": ["tag:client"], "dst": ["autogroup:tagged"], "users": ["root"]}}
            ]}}"#
        );
        let policy = Arc::new(netmap_policy::parse_policy(&text).unwrap());
        let tailnet = Tailnet::from_state_json(STATE).unwrap();
        let r = Resolver::new(policy, &tailnet);
        let ev = Evaluator::new(&r);
        let users = ["root", "admin", "ubuntu", "alice", "odin", "loki", "thor"];
        let mut checked = 0;
        for d in 0..r.nodes.len() {
            let compiled = crate::ssh::ssh_rules_for(&r, d);
            for s in 0..r.nodes.len() {
                let ips: Vec<String> = r.nodes[s].addr_strings().collect();
                for user in users {
                    let want = compiled.iter().find_map(|rule| {
                        if !rule
                            .principals
                            .iter()
                            .any(|p| ips.iter().any(|i| **i == *p.node_ip))
                        {
                            return None;
                        }
                        let local = rule
                            .ssh_users
                            .get(user)
                            .or_else(|| rule.ssh_users.get("*"))?;
                        if local.is_empty() {
                            return None;
                        }
                        Some(if rule.action.accept {
                            SshAction::Accept
                        } else {
                            SshAction::Check
                        })
                    });
                    let got = ev
                        .ssh_verdict(
                            Principal::Node(s),
                            &ev.ssh_sources(Principal::Node(s), None),
                            d,
                            user,
                        )
                        .map(|x| x.action);
                    assert_eq!(
                        got, want,
                        "{} -> {} as {user}",
                        r.nodes[s].name, r.nodes[d].name
                    );
                    checked += usize::from(got.is_some());
                }
            }
        }
        assert!(checked > 10, "too few allowed pairs: {checked}");
    }

    #[test]
    fn report_serializes() {
        let r = run(
            r#""acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
              "tests": [{"src": "tag:client", "deny": ["web:22"]}]"#,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcomes"][0]["rule"], "acls[0]");
        assert_eq!(v["outcomes"][0]["passed"], false);
        assert!(v["outcomes"][0]["pos"].as_str().unwrap().contains(':'));
    }
}
