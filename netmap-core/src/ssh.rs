//! SSH policy compiled per destination node into tailcfg `SSHRule`s.

use std::collections::BTreeMap;

use netmap_policy::{Alias, AutoGroup, SshAction, SshUser};

use crate::resolve::Resolver;
use crate::wire::{SshActionWire, SshPrincipal, SshRuleWire};

const CHECK_URL: &str =
    "https://unused/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER";

fn action_wire(action: SshAction, check_period_secs: Option<u64>) -> SshActionWire {
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

fn principals(r: &Resolver<'_>, nodes: &[usize]) -> Vec<SshPrincipal> {
    nodes
        .iter()
        .flat_map(|&j| r.nodes[j].addr_strings())
        .map(|node_ip| SshPrincipal { node_ip })
        .collect()
}

/// The SSH rules node `d` receives, in match order.
pub(crate) fn ssh_rules_for(r: &Resolver<'_>, d: usize) -> Vec<SshRuleWire> {
    let mut out = Vec::new();
    let dn = &r.nodes[d];
    // Check rules come before accept rules; within each, policy order.
    let ordered = r
        .policy
        .ssh
        .iter()
        .filter(|x| x.action == SshAction::Check)
        .chain(
            r.policy
                .ssh
                .iter()
                .filter(|x| x.action == SshAction::Accept),
        );
    for rule in ordered {
        let has_localpart = rule
            .users
            .iter()
            .any(|u| matches!(u, SshUser::LocalPart(_)));
        let dst = r.resolve_all(rule.dst.iter().map(|x| &x.value));
        let by_identity = dst.nodes.contains(&d) || dst.wildcard;
        let by_self = dst.self_devices && dn.is_member();
        let src = r.resolve_all(rule.src.iter().map(|x| &x.value));
        // With localpart users, every source node may also log in to itself.
        let as_own_source = has_localpart && r.src_contains(&src, d);
        if !by_identity && !by_self && !as_own_source {
            continue;
        }
        let mut srcs: Vec<usize> = (0..r.nodes.len())
            .filter(|&j| r.src_contains(&src, j))
            .filter(|&j| {
                by_identity
                    || (by_self && r.nodes[j].is_member() && r.nodes[j].email == dn.email)
                    || j == d
            })
            .collect();
        if srcs.is_empty() {
            continue;
        }
        srcs.sort_by_key(|&j| {
            let n = &r.nodes[j];
            let uid = n
                .node
                .user
                .as_ref()
                .and_then(|u| r.tailnet.users.get(u))
                .map(|u| u.id)
                .unwrap_or(u64::MAX);
            (uid, n.node.created_key(), n.name)
        });
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
        let action = action_wire(rule.action, rule.check_period_secs);
        if localparts.is_empty() {
            // autogroup:tagged expands tag by tag: a node with two tags is listed twice.
            let tagged_extra: Vec<usize> = if rule
                .src
                .iter()
                .any(|s| s.value == Alias::AutoGroup(AutoGroup::Tagged))
            {
                srcs.iter()
                    .flat_map(|&j| {
                        std::iter::repeat_n(j, r.nodes[j].node.tags.len().saturating_sub(1))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let mut all = srcs.clone();
            all.extend(tagged_extra);
            out.push(SshRuleWire {
                principals: principals(r, &all),
                ssh_users: users,
                action,
                accept_env: rule.accept_env.clone(),
            });
            continue;
        }
        for &j in &srcs {
            out.push(SshRuleWire {
                principals: principals(r, &[j]),
                ssh_users: users.clone(),
                action: action.clone(),
                accept_env: rule.accept_env.clone(),
            });
            if let Some((local, dom)) = r.nodes[j].email.and_then(|e| e.rsplit_once('@')) {
                if localparts.iter().any(|d| d == dom) {
                    out.push(SshRuleWire {
                        principals: principals(r, &[j]),
                        ssh_users: BTreeMap::from([(local.to_string(), local.to_string())]),
                        action: action.clone(),
                        accept_env: rule.accept_env.clone(),
                    });
                }
            }
        }
    }
    out
}
