//! SSH policy compiled per destination node into tailcfg `SSHRule`s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use netmap_policy::{Alias, AutoGroup, Policy, SshAction, SshRule, SshUser};

use crate::resolve::{Resolved, Resolver};
use crate::wire::{SshActionWire, SshPrincipal, SshRecorderFailureAction, SshRuleWire};

const CHECK_URL: &str =
    "https://unused/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER";

/// The recorders of a rule: every address of every node carrying a recorder tag, port 80
/// (where a session recorder listens on the tailnet), in join order.
fn recorders(r: &Resolver, tags: &[String]) -> Vec<String> {
    let mut nodes: Vec<usize> = r
        .live_slots()
        .filter(|&i| r.nodes[i].node.tags.iter().any(|t| tags.contains(t)))
        .collect();
    nodes.sort_by_cached_key(|&i| (r.nodes[i].node.created_key(), r.nodes[i].name.clone()));
    nodes
        .iter()
        .flat_map(|&i| r.nodes[i].addrs.iter())
        .map(|a| std::net::SocketAddr::new(*a, 80).to_string())
        .collect()
}

fn action_wire(r: &Resolver, rule: &netmap_policy::SshRule) -> SshActionWire {
    let mut a = base_action(rule.action, rule.check_period_secs);
    if !rule.recorder.is_empty() {
        a.recorders = recorders(r, &rule.recorder);
        if rule.enforce_recorder {
            a.on_recording_failure = Some(SshRecorderFailureAction {
                reject_session_with_message:
                    "# Session recording is required, but no recorder could be reached. The session was refused."
                        .into(),
                terminate_session_with_message:
                    "# Session recording is required, and it failed. The session was ended."
                        .into(),
            });
        }
    }
    a
}

fn base_action(action: SshAction, check_period_secs: Option<u64>) -> SshActionWire {
    match action {
        SshAction::Accept => SshActionWire {
            accept: true,
            allow_agent_forwarding: true,
            allow_local_port_forwarding: true,
            allow_remote_port_forwarding: true,
            ..SshActionWire::default()
        },
        SshAction::Check => SshActionWire {
            hold_and_delegate: Some(CHECK_URL.to_string()),
            session_duration: check_period_secs
                .filter(|_| false)
                .map(|s| s * 1_000_000_000),
            ..SshActionWire::default()
        },
    }
}

fn principals(r: &Resolver, nodes: &[usize]) -> Arc<Vec<SshPrincipal>> {
    Arc::new(
        nodes
            .iter()
            .flat_map(|&j| r.nodes[j].addr_texts().iter().cloned())
            .map(|node_ip| SshPrincipal { node_ip })
            .collect(),
    )
}

/// One SSH rule with its selectors resolved and its shared parts built once.
struct PlannedRule {
    has_localpart: bool,
    localparts: Vec<String>,
    dst: Resolved,
    src: Resolved,
    /// Source nodes in principal order (owner's user id, join time, name).
    srcs: Vec<usize>,
    tagged_src: bool,
    users: BTreeMap<String, String>,
    action: SshActionWire,
    accept_env: Vec<String>,
}

/// The SSH policy compiled once per tailnet state; `rules_for` builds a node's rules.
pub(crate) struct SshPlan {
    rules: Vec<PlannedRule>,
    /// Tags of session recorders some rule names: a node carrying one changes rules'
    /// actions (its addresses are listed in them).
    pub(crate) recorder_tags: Vec<String>,
    /// Per rule, the principals of destinations named by identity (all sources); views
    /// bind their entries to this table instead of holding a copy.
    pub(crate) principals: imbl::Vector<Arc<Vec<SshPrincipal>>>,
}

/// An SSH rule of a node's view; `Some(k)` = its principals are rule `k`'s current
/// identity principals (in [`SshPlan::principals`]), not the stored ones.
pub(crate) type BoundSshRule = (SshRuleWire, Option<usize>);

/// How one SSH rule's identity principals changed: (rule, before, after).
pub(crate) type PrincipalsSwap = (usize, Arc<Vec<SshPrincipal>>, Arc<Vec<SshPrincipal>>);

/// How a new policy's SSH rules differ from the ones in force.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) enum SshEdit {
    /// The same rules, resolving the same way.
    #[default]
    Same,
    /// The same rules; these (by match order) name a group, host or ipset defined
    /// differently now.
    Redefined(Vec<usize>),
    /// Different rules.
    Rebuild,
}

/// Check rules come before accept rules; within each, policy order.
fn match_order(p: &Policy) -> impl Iterator<Item = &SshRule> + '_ {
    p.ssh
        .iter()
        .filter(|x| x.action == SshAction::Check)
        .chain(p.ssh.iter().filter(|x| x.action == SshAction::Accept))
}

/// Whether two SSH rules are the same as written (positions aside).
fn same_as_written(x: &SshRule, y: &SshRule) -> bool {
    // Every field, so that a new one cannot be left out of the comparison.
    let SshRule {
        action,
        src,
        dst,
        users,
        check_period_secs,
        accept_env,
        src_posture,
        recorder,
        enforce_recorder,
    } = x;
    let same_aliases = |a: &[netmap_policy::Located<netmap_policy::Alias>],
                        b: &[netmap_policy::Located<netmap_policy::Alias>]| {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.value == b.value)
    };
    *action == y.action
        && same_aliases(src, &y.src)
        && same_aliases(dst, &y.dst)
        && *users == y.users
        && *check_period_secs == y.check_period_secs
        && *accept_env == y.accept_env
        && *src_posture == y.src_posture
        && *recorder == y.recorder
        && *enforce_recorder == y.enforce_recorder
}

impl SshPlan {
    /// How `new`'s SSH rules differ from `old`'s.
    pub(crate) fn edit(old: &Policy, new: &Policy) -> SshEdit {
        let (a, b): (Vec<&SshRule>, Vec<&SshRule>) =
            (match_order(old).collect(), match_order(new).collect());
        if a.len() != b.len() || a.iter().zip(&b).any(|(x, y)| !same_as_written(x, y)) {
            return SshEdit::Rebuild;
        }
        let redefined: Vec<usize> = b
            .iter()
            .enumerate()
            .filter(|(_, rule)| {
                rule.src
                    .iter()
                    .chain(rule.dst.iter())
                    .any(|a| crate::rules::redefined(old, new, &a.value))
                    || rule
                        .src_posture
                        .iter()
                        .any(|p| crate::rules::posture_redefined(old, new, p))
            })
            .map(|(k, _)| k)
            .collect();
        if redefined.is_empty() {
            SshEdit::Same
        } else {
            SshEdit::Redefined(redefined)
        }
    }

    /// Resolves rule `k`'s selectors again (the policy redefined one; `old` is the policy
    /// they were resolved under, when known). Returns how its identity principals changed,
    /// for the views that bind them, and the nodes whose SSH rules must be recomputed
    /// (`None`: every node).
    pub(crate) fn redefine(
        &mut self,
        r: &Resolver,
        old: Option<&Policy>,
        k: usize,
    ) -> (Option<PrincipalsSwap>, Option<Vec<usize>>) {
        let Some(rule) = match_order(&r.policy).nth(k) else {
            return (None, None);
        };
        let Some(planned) = self.rules.get_mut(k) else {
            return (None, None);
        };
        // Only a set naming what the edit redefined resolves differently, and a group
        // member added or dropped is judged at that member's devices alone (as the rules'
        // sets are, see `NetRule::resolve_stale`).
        let again = |set: &Resolved, postures: &[String]| match old {
            Some(old) if !crate::rules::set_redefined(old, &r.policy, set, postures) => set.clone(),
            _ => r.resolve_again(set, postures, old, None),
        };
        let dst = again(&planned.dst, &[]);
        let src = again(&planned.src, &rule.src_posture);
        let mut recompute: BTreeSet<usize> = BTreeSet::new();
        let same_flags = |a: &Resolved, b: &Resolved| {
            a.wildcard == b.wildcard && a.self_devices == b.self_devices && a.nets == b.nets
        };
        if !same_flags(&planned.dst, &dst) {
            planned.dst = dst;
            planned.src = src;
            planned.srcs = (0..r.nodes.len())
                .filter(|&j| r.src_contains(&planned.src, j))
                .collect();
            sort_principal_order(r, &mut planned.srcs);
            let after = principals(r, &with_tag_repeats(r, &planned.srcs, planned.tagged_src));
            self.principals.set(k, after);
            return (None, None);
        }
        recompute.extend(planned.dst.nodes.symmetric_difference(&dst.nodes).copied());
        planned.dst = dst;
        let srcs = if planned.src.same_but_nodes(&src) {
            // Only nodes moved: edit the ordered sources at them.
            let moved: BTreeSet<usize> = planned
                .src
                .nodes
                .symmetric_difference(&src.nodes)
                .copied()
                .collect();
            let mut srcs = planned.srcs.clone();
            srcs.retain(|j| !moved.contains(j) || r.src_contains(&src, *j));
            for &j in &moved {
                if r.src_contains(&src, j) {
                    let key = principal_key(r, j);
                    let at = srcs.partition_point(|&x| principal_key(r, x) < key);
                    if srcs.get(at) != Some(&j) {
                        srcs.insert(at, j);
                    }
                }
            }
            srcs
        } else {
            let mut srcs: Vec<usize> = (0..r.nodes.len())
                .filter(|&j| r.src_contains(&src, j))
                .collect();
            sort_principal_order(r, &mut srcs);
            srcs
        };
        planned.src = src;
        if srcs == planned.srcs {
            return (None, Some(recompute.into_iter().collect()));
        }
        if planned.has_localpart || planned.dst.self_devices {
            // Entries that are not bound to the rule's principals: every node it reaches.
            if planned.dst.wildcard || planned.dst.self_devices {
                planned.srcs = srcs;
                let after = principals(r, &with_tag_repeats(r, &planned.srcs, planned.tagged_src));
                self.principals.set(k, after);
                return (None, None);
            }
            recompute.extend(planned.dst.nodes.iter().copied());
            recompute.extend(planned.srcs.iter().copied());
            recompute.extend(srcs.iter().copied());
        }
        planned.srcs = srcs;
        let before = self.principals[k].clone();
        let after = principals(r, &with_tag_repeats(r, &planned.srcs, planned.tagged_src));
        self.principals.set(k, after.clone());
        (
            Some((k, before, after)),
            Some(recompute.into_iter().collect()),
        )
    }

    pub(crate) fn new(r: &Resolver) -> SshPlan {
        let ordered = match_order(&r.policy);
        let mut rules = Vec::new();
        let mut all = imbl::Vector::new();
        for rule in ordered {
            let dst = r.resolve_all(rule.dst.iter().map(|x| &x.value));
            let src = r.with_postures(
                r.resolve_all(rule.src.iter().map(|x| &x.value)),
                &rule.src_posture,
            );
            let mut srcs: Vec<usize> = (0..r.nodes.len())
                .filter(|&j| r.src_contains(&src, j))
                .collect();
            sort_principal_order(r, &mut srcs);
            let mut users: BTreeMap<String, String> = BTreeMap::new();
            let mut localparts = Vec::new();
            for u in &rule.users {
                match u {
                    SshUser::Root => {
                        users.insert("root".into(), "root".into());
                    }
                    SshUser::NonRoot => {
                        users.insert("*".into(), "=".into());
                    }
                    SshUser::Named(n) => {
                        users.insert(n.clone(), n.clone());
                    }
                    SshUser::LocalPart(dom) => localparts.push(dom.clone()),
                }
            }
            users.entry("root".into()).or_default();
            let tagged_src = rule
                .src
                .iter()
                .any(|s| s.value == Alias::AutoGroup(AutoGroup::Tagged));
            all.push_back(principals(r, &with_tag_repeats(r, &srcs, tagged_src)));
            rules.push(PlannedRule {
                has_localpart: !localparts.is_empty(),
                localparts,
                dst,
                src,
                srcs,
                tagged_src,
                users,
                action: action_wire(r, rule),
                accept_env: rule.accept_env.clone(),
            });
        }
        let mut recorder_tags: Vec<String> = r
            .policy
            .ssh
            .iter()
            .flat_map(|x| x.recorder.iter().cloned())
            .collect();
        recorder_tags.sort();
        recorder_tags.dedup();
        SshPlan {
            rules,
            recorder_tags,
            principals: all,
        }
    }

    /// The SSH rules node `d` receives, in match order. Entries whose principals are a
    /// rule's identity principals are bound to it and carry `unbound` principals instead.
    pub(crate) fn rules_for(
        &self,
        r: &Resolver,
        d: usize,
        unbound: &Arc<Vec<SshPrincipal>>,
    ) -> Vec<BoundSshRule> {
        let mut out = Vec::new();
        let dn = &r.nodes[d];
        for (k, rule) in self.rules.iter().enumerate() {
            let by_identity = rule.dst.nodes.contains(&d) || rule.dst.wildcard;
            let by_self = rule.dst.self_devices && dn.is_member();
            // With localpart users, every source node may also log in to itself.
            let as_own_source = rule.has_localpart && r.src_contains(&rule.src, d);
            if !by_identity && !by_self && !as_own_source {
                continue;
            }
            let own_srcs: Vec<usize>;
            let srcs: &[usize] = if by_identity {
                &rule.srcs
            } else {
                // The destination's owner's devices (and the destination itself) among the
                // sources, in principal order.
                let mut own: Vec<usize> = if by_self {
                    dn.email
                        .as_ref()
                        .and_then(|e| r.by_email.get(e))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                if !own.contains(&d) {
                    own.push(d);
                }
                own.retain(|&j| (j == d || r.nodes[j].is_member()) && r.src_contains(&rule.src, j));
                sort_principal_order(r, &mut own);
                own_srcs = own;
                &own_srcs
            };
            if srcs.is_empty() {
                continue;
            }
            if !rule.has_localpart {
                let (principals, bound) = if by_identity {
                    (unbound.clone(), Some(k))
                } else {
                    (
                        principals(r, &with_tag_repeats(r, srcs, rule.tagged_src)),
                        None,
                    )
                };
                out.push((
                    SshRuleWire {
                        principals,
                        ssh_users: rule.users.clone(),
                        action: rule.action.clone(),
                        accept_env: rule.accept_env.clone(),
                    },
                    bound,
                ));
                continue;
            }
            for &j in srcs {
                let own = principals(r, &[j]);
                out.push((
                    SshRuleWire {
                        principals: own.clone(),
                        ssh_users: rule.users.clone(),
                        action: rule.action.clone(),
                        accept_env: rule.accept_env.clone(),
                    },
                    None,
                ));
                if let Some((local, dom)) =
                    r.nodes[j].email.as_deref().and_then(|e| e.rsplit_once('@'))
                {
                    if rule.localparts.iter().any(|d| d == dom) {
                        out.push((
                            SshRuleWire {
                                principals: own,
                                ssh_users: BTreeMap::from([(local.to_string(), local.to_string())]),
                                action: rule.action.clone(),
                                accept_env: rule.accept_env.clone(),
                            },
                            None,
                        ));
                    }
                }
            }
        }
        out
    }
}

impl SshPlan {
    /// Brings the plan up to date after node `x` changed (it has no routes); `ident_changed`
    /// says its addresses, tags or owner changed. Returns the rules whose principals may have
    /// changed, with their identity principals before and after.
    pub(crate) fn refresh_node(
        &mut self,
        r: &Resolver,
        x: usize,
        ident_changed: bool,
    ) -> Vec<PrincipalsSwap> {
        let mut changed = Vec::new();
        for (k, rule) in self.rules.iter_mut().enumerate() {
            r.refresh(&mut rule.dst, x);
            let was = rule.srcs.contains(&x);
            r.refresh(&mut rule.src, x);
            let now = r.src_contains(&rule.src, x);
            if !was && !now {
                continue;
            }
            // Owner, join time or addresses may have moved it in principal order.
            let before = self.principals[k].clone();
            rule.srcs.retain(|&j| j != x);
            if now {
                // The others stay in order; x goes where its key puts it.
                let key = principal_key(r, x);
                let at = rule.srcs.partition_point(|&j| principal_key(r, j) < key);
                rule.srcs.insert(at, x);
            }
            let after = principals(r, &with_tag_repeats(r, &rule.srcs, rule.tagged_src));
            self.principals.set(k, after.clone());
            if was != now || ident_changed || before != after {
                changed.push((k, before, after));
            }
        }
        changed
    }

    /// Recomputes the actions of rules that list session recorders (after nodes carrying a
    /// recorder tag changed). Returns the rules whose action changed.
    pub(crate) fn refresh_recorders(&mut self, r: &Resolver) -> Vec<usize> {
        let mut changed = Vec::new();
        for (k, rule) in match_order(&r.policy).enumerate() {
            if rule.recorder.is_empty() {
                continue;
            }
            let action = action_wire(r, rule);
            if let Some(planned) = self.rules.get_mut(k) {
                if planned.action != action {
                    planned.action = action;
                    changed.push(k);
                }
            }
        }
        changed
    }

    /// Whether node `x`'s record (tags) makes it a session recorder of some rule.
    pub(crate) fn is_recorder(&self, x: &crate::tailnet::Node) -> bool {
        x.tags.iter().any(|t| self.recorder_tags.contains(t))
    }

    /// The nodes that may receive rule `k` (`None`: any node).
    pub(crate) fn receivers(&self, k: usize) -> Option<Vec<usize>> {
        let rule = self.rules.get(k)?;
        if rule.dst.wildcard || rule.dst.self_devices {
            return None;
        }
        let mut out: Vec<usize> = rule.dst.nodes.iter().copied().collect();
        if rule.has_localpart {
            out.extend(rule.srcs.iter().copied());
        }
        Some(out)
    }

    /// The nodes that receive rule `k` by identity (all nodes when it names `*`).
    pub(crate) fn identity_dsts(&self, k: usize) -> (bool, Vec<usize>) {
        let d = &self.rules[k].dst;
        (d.wildcard, d.nodes.iter().copied().collect())
    }

    /// Whether the entries rule `k` gives destinations named by identity are bound to its
    /// identity principals (no per-source `localpart` entries).
    pub(crate) fn binds(&self, k: usize) -> bool {
        !self.rules[k].has_localpart
    }
}

/// Principal order: the owner's user id, then join time, then name.
fn principal_key(r: &Resolver, j: usize) -> (u64, (i64, u32), &str) {
    let n = &r.nodes[j];
    let uid = n
        .node
        .user
        .as_ref()
        .and_then(|u| r.tailnet.users.get(u))
        .map(|u| u.id)
        .unwrap_or(u64::MAX);
    (uid, n.node.created_key(), n.name.as_str())
}

fn sort_principal_order(r: &Resolver, srcs: &mut [usize]) {
    srcs.sort_by_cached_key(|&j| principal_key(r, j));
}

/// `autogroup:tagged` expands tag by tag: a node with two tags is listed twice.
fn with_tag_repeats(r: &Resolver, srcs: &[usize], tagged_src: bool) -> Vec<usize> {
    let mut all = srcs.to_vec();
    if tagged_src {
        for &j in srcs {
            let extra = r.nodes[j].node.tags.len().saturating_sub(1);
            all.extend(std::iter::repeat_n(j, extra));
        }
    }
    all
}

/// The SSH rules node `d` receives (plans the whole SSH policy; prefer [`SshPlan`] for many
/// nodes).
#[allow(dead_code)]
pub(crate) fn ssh_rules_for(r: &Resolver, d: usize) -> Vec<SshRuleWire> {
    let plan = SshPlan::new(r);
    plan.rules_for(r, d, &Arc::default())
        .into_iter()
        .map(|(mut rule, bound)| {
            if let Some(k) = bound {
                rule.principals = plan.principals[k].clone();
            }
            rule
        })
        .collect()
}
