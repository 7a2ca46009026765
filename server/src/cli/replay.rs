//! `netmap replay`: loads a tailnet, applies a stream of changes through the engine and times
//! each one against a full build of the same tailnet. With `--verify`, every step is checked
//! against the from-scratch computation and against the change set the engine returned.
//!
//! Exit codes: 0 done (no divergence), 1 divergence found, 2 input could not be loaded
//! (unreadable file, bad change line, initial policy rejected).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netmap_core::wire::{FilterRule, NodeView, PeerList, SshRuleWire};
use netmap_core::{compute_all, diff_views, Change, ChangeSet, Engine, NodeDelta, Snapshot};
use serde_json::json;

use super::read_file;

/// Arguments of `netmap replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The policy file (HuJSON).
    #[arg(long)]
    policy: PathBuf,
    /// The tailnet state file.
    #[arg(long)]
    state: PathBuf,
    /// The changes, one JSON object per line (`{"op": "set_online", ...}`).
    #[arg(long)]
    changes: PathBuf,
    /// Check every step against the from-scratch computation and the returned change set;
    /// exit 1 on the first divergence.
    #[arg(long)]
    verify: bool,
    /// Output format: `text` prints a line per change and a summary table; `json` prints only
    /// the summary.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Output format of `replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A line per change, then a summary table.
    Text,
    /// The summary as one JSON object.
    Json,
}

/// One change of the input, with where it came from.
struct Step {
    line: usize,
    change: Change,
}

/// How many full builds are timed.
const BUILDS: usize = 3;

/// Times of the full build: the first (cold) and the median of [`BUILDS`].
struct BuildTimes {
    first: Duration,
    median: Duration,
}

/// Every applied change, whatever its op.
fn all_ops(stats: &BTreeMap<&'static str, OpStats>) -> OpStats {
    OpStats {
        applied: stats
            .values()
            .flat_map(|s| s.applied.iter().copied())
            .collect(),
        rejected: stats.values().map(|s| s.rejected).sum(),
    }
}

/// Timings of one op type.
#[derive(Default)]
struct OpStats {
    /// Applied changes: time of `apply`, number of affected nodes.
    applied: Vec<(Duration, usize)>,
    /// Changes the engine rejected.
    rejected: usize,
}

/// The first place where the engine disagrees with the reference.
struct Divergence {
    index: usize,
    line: usize,
    op: &'static str,
    node: String,
    what: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.index == 0 {
            write!(f, "divergence after the full build: ")?;
        } else {
            write!(
                f,
                "divergence at change #{} (line {}, {}): ",
                self.index, self.line, self.op
            )?;
        }
        if self.node.is_empty() {
            write!(f, "{}", self.what)
        } else {
            write!(f, "node {:?}: {}", self.node, self.what)
        }
    }
}

pub fn run(a: &ReplayArgs) -> ExitCode {
    let (policy_text, tailnet, steps) = match load(a) {
        Ok(x) => x,
        Err(e) => {
            errln!("{e}");
            return ExitCode::from(2);
        }
    };
    let nodes = tailnet.nodes.len();
    // The changes are timed in a warm process, so the build they are compared with is too:
    // the median of a few builds. The first (cold: fresh memory) is reported beside it.
    let mut builds = Vec::with_capacity(BUILDS);
    let mut built = None;
    for _ in 0..BUILDS {
        drop(built.take());
        let t = Instant::now();
        let result = Engine::new(&policy_text, tailnet.clone());
        builds.push(t.elapsed());
        match result {
            Ok(e) => built = Some(e),
            Err(e) => {
                errln!("{}: {e}", a.policy.display());
                return ExitCode::from(2);
            }
        }
    }
    let Some(mut engine) = built else {
        return ExitCode::from(2);
    };
    let first = builds[0];
    builds.sort_unstable();
    let build = BuildTimes {
        first,
        median: percentile(&builds, 0.5).unwrap_or(first),
    };
    let text = a.format == Format::Text;
    if text {
        outln!(
            "full build: {nodes} nodes in {} (median of {BUILDS}; first {})",
            fmt_dur(build.median),
            fmt_dur(build.first)
        );
    }

    let mut stats: BTreeMap<&'static str, OpStats> = BTreeMap::new();
    let mut divergence = None;
    // Only with --verify: a snapshot held across `apply` makes the engine copy what it
    // shares with it instead of updating in place, which is not what is being timed.
    let mut prev = a.verify.then(|| engine.snapshot());
    if let Some(p) = &prev {
        divergence = check_reference(p).map(|(node, what)| Divergence {
            index: 0,
            line: 0,
            op: "build",
            node,
            what,
        });
    }
    for (i, step) in steps.into_iter().enumerate() {
        if divergence.is_some() {
            break;
        }
        let index = i + 1;
        let op = step.change.op();
        let subject = subject(&step.change);
        let t = Instant::now();
        let result = engine.apply(step.change);
        let dt = t.elapsed();
        let entry = stats.entry(op).or_default();
        let found = match result {
            Err(e) => {
                entry.rejected += 1;
                if text {
                    outln!("#{index} {op} {subject}: rejected in {}: {e}", fmt_dur(dt));
                }
                prev.as_ref()
                    .and_then(|p| check_unchanged(p, &engine.snapshot()))
            }
            Ok(cs) => {
                entry.applied.push((dt, cs.len()));
                if text {
                    outln!(
                        "#{index} {op} {subject}: {} affected in {}",
                        cs.len(),
                        fmt_dur(dt)
                    );
                }
                match prev.as_mut() {
                    Some(p) => {
                        let now = engine.snapshot();
                        let found =
                            check_change_set(p, &now, &cs).or_else(|| check_reference(&now));
                        *p = now;
                        found
                    }
                    None => None,
                }
            }
        };
        divergence = found.map(|(node, what)| Divergence {
            index,
            line: step.line,
            op,
            node,
            what,
        });
    }

    let divergences = usize::from(divergence.is_some());
    if text {
        print_table(nodes, &build, &stats, a.verify, divergences);
    } else {
        print_json(nodes, &build, &stats, divergences);
    }
    match divergence {
        Some(d) => {
            errln!("{d}");
            ExitCode::from(1)
        }
        None => ExitCode::SUCCESS,
    }
}

/// Reads the policy text, the tailnet and every change line (errors name the file and line).
fn load(a: &ReplayArgs) -> Result<(String, netmap_core::Tailnet, Vec<Step>), String> {
    let policy_text = read_file(&a.policy)?;
    let tailnet = netmap_core::Tailnet::from_state_json(&read_file(&a.state)?)
        .map_err(|e| format!("{}: {e}", a.state.display()))?;
    let steps = parse_changes(&a.changes, &read_file(&a.changes)?)?;
    Ok((policy_text, tailnet, steps))
}

/// Parses NDJSON change lines; blank lines are skipped.
fn parse_changes(path: &Path, text: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let change: Change = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: invalid change: {e}", path.display(), i + 1))?;
        steps.push(Step {
            line: i + 1,
            change,
        });
    }
    Ok(steps)
}

/// The node or user a change is about, for the per-change line.
fn subject(c: &Change) -> String {
    match c {
        Change::UpsertNode { node, .. }
        | Change::RemoveNode { node }
        | Change::ApproveRoutes { node, .. } => node.clone(),
        Change::SetOnline { node, online } => format!("{node}={online}"),
        Change::UpsertUser { user } => user.name.clone(),
        Change::RemoveUser { name } => name.clone(),
        Change::SetPolicy { policy } => format!("({} bytes)", policy.len()),
    }
}

/// Describes what differs between two views of a node ("packet filter, peers (added: a)").
fn describe(d: &NodeDelta) -> String {
    fn names(label: &str, v: &[Arc<str>]) -> Option<String> {
        const SHOWN: usize = 5;
        if v.is_empty() {
            return None;
        }
        let shown: Vec<&str> = v.iter().take(SHOWN).map(|n| &**n).collect();
        let mut s = format!("{label}: {}", shown.join(", "));
        if v.len() > SHOWN {
            s.push_str(&format!(" and {} more", v.len() - SHOWN));
        }
        Some(s)
    }
    if d.added {
        return "present only in the second view".into();
    }
    if d.removed {
        return "present only in the first view".into();
    }
    let mut parts = Vec::new();
    if d.filter_changed {
        parts.push("packet filter".to_string());
    }
    let peers: Vec<String> = [
        names("added", &d.peers_added),
        names("removed", &d.peers_removed),
        names("changed", &d.peers_changed),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !peers.is_empty() {
        parts.push(format!("peers ({})", peers.join("; ")));
    }
    if d.ssh_changed {
        parts.push("SSH rules".to_string());
    }
    if d.self_changed {
        parts.push("self view (capabilities)".to_string());
    }
    if parts.is_empty() {
        "views differ".into()
    } else {
        parts.join(", ")
    }
}

/// Compares every view of a snapshot with the from-scratch computation over the snapshot's
/// policy and tailnet; returns the first node that differs and how.
fn check_reference(snap: &Snapshot) -> Option<(String, String)> {
    let reference = compute_all(snap.policy(), snap.tailnet());
    let mut same = Comparer::default();
    for (name, want) in &reference.views {
        match snap.view(name) {
            None => return Some((name.clone(), "missing from the engine's views".into())),
            Some(got) if !same.view(&got, want) => {
                let d = diff_views(Some(want), Some(&got));
                return Some((
                    name.clone(),
                    format!(
                        "engine view differs from the from-scratch computation in {} \
                         (peer names: added/removed relative to the reference)",
                        describe(&d)
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(name) = snap
        .node_names()
        .find(|k| !reference.views.contains_key(*k))
    {
        return Some((
            name.to_string(),
            "in the engine's views but not in the from-scratch computation".into(),
        ));
    }
    if reference.primaries != snap.tailnet().primaries {
        let routes: BTreeSet<String> = reference
            .primaries
            .iter()
            .chain(snap.tailnet().primaries.iter())
            .filter(|(r, n)| {
                reference.primaries.get(*r) != Some(*n)
                    || snap.tailnet().primaries.get(*r) != Some(*n)
            })
            .map(|(r, _)| r.to_string())
            .collect();
        return Some((
            String::new(),
            format!(
                "primary routers recorded in the snapshot differ from the from-scratch \
                 election for routes {}",
                routes.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    None
}

/// Compares views, comparing each pair of shared parts (filters, source lists, SSH rules,
/// capabilities, shared peer lists) once: views of a tailnet share most of their parts, and a
/// plain `==` would compare N peer lists of N peers. Only a `true` answer takes a shortcut;
/// when the shortcut does not apply the full `==` decides.
///
/// The memo is keyed by address, so the comparer keeps every view it compared alive: views
/// are materialised on demand, and a freed allocation's address may be reused by the next.
#[derive(Default)]
struct Comparer {
    memo: HashMap<(usize, usize), bool>,
    compared: Vec<NodeView>,
}

impl Comparer {
    /// `a == b`, remembered per pair of allocations (both stay alive while the comparer does).
    fn arc<T: PartialEq>(&mut self, a: &Arc<T>, b: &Arc<T>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let key = (Arc::as_ptr(a) as usize, Arc::as_ptr(b) as usize);
        *self.memo.entry(key).or_insert_with(|| **a == **b)
    }

    fn filters(&mut self, a: &Arc<Vec<FilterRule>>, b: &Arc<Vec<FilterRule>>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let key = (Arc::as_ptr(a) as usize, Arc::as_ptr(b) as usize);
        if let Some(v) = self.memo.get(&key) {
            return *v;
        }
        let v = a.len() == b.len()
            && a.iter().zip(b.iter()).all(|(x, y)| {
                // Destructured so that a new field is a compile error here, not a blind spot.
                let FilterRule {
                    src_ips,
                    dst_ports,
                    ip_proto,
                    cap_grant,
                } = x;
                self.arc(src_ips, &y.src_ips)
                    && self.arc(dst_ports, &y.dst_ports)
                    && *ip_proto == y.ip_proto
                    && *cap_grant == y.cap_grant
            });
        self.memo.insert(key, v);
        v
    }

    fn ssh(&mut self, a: &Arc<Vec<SshRuleWire>>, b: &Arc<Vec<SshRuleWire>>) -> bool {
        if Arc::ptr_eq(a, b) {
            return true;
        }
        let key = (Arc::as_ptr(a) as usize, Arc::as_ptr(b) as usize);
        if let Some(v) = self.memo.get(&key) {
            return *v;
        }
        let v = a.len() == b.len()
            && a.iter().zip(b.iter()).all(|(x, y)| {
                let SshRuleWire {
                    principals,
                    ssh_users,
                    action,
                    accept_env,
                } = x;
                self.arc(principals, &y.principals)
                    && *ssh_users == y.ssh_users
                    && *action == y.action
                    && *accept_env == y.accept_env
            });
        self.memo.insert(key, v);
        v
    }

    /// A node's peers are its class's shared list minus itself plus its extras: equal shared
    /// lists and equal extras mean equal peers.
    fn peers(&mut self, a: &PeerList, b: &PeerList) -> bool {
        (a.extra() == b.extra() && self.arc(a.shared(), b.shared())) || a == b
    }

    fn view(&mut self, a: &NodeView, b: &NodeView) -> bool {
        let NodeView {
            packet_filter,
            peers,
            ssh_rules,
            cap_map,
        } = a;
        let same = self.filters(packet_filter, &b.packet_filter)
            && self.ssh(ssh_rules, &b.ssh_rules)
            && self.arc(cap_map, &b.cap_map)
            && self.peers(peers, &b.peers);
        self.compared.push(a.clone());
        self.compared.push(b.clone());
        same
    }
}

/// Checks that the change set names exactly the nodes whose view differs between the two
/// snapshots, each with the delta the views show.
fn check_change_set(prev: &Snapshot, now: &Snapshot, cs: &ChangeSet) -> Option<(String, String)> {
    let names: BTreeSet<&str> = prev.node_names().chain(now.node_names()).collect();
    let mut same = Comparer::default();
    for name in names {
        let want = match (prev.view(name), now.view(name)) {
            (Some(a), Some(b)) if same.view(&a, &b) => NodeDelta::default(),
            (a, b) => diff_views(a.as_ref(), b.as_ref()),
        };
        match cs.get(name) {
            None if want.is_empty() => {}
            None => {
                return Some((
                    name.to_string(),
                    format!(
                        "view changed ({}) but the change set does not name it",
                        describe(&want)
                    ),
                ))
            }
            Some(_) if want.is_empty() => {
                return Some((
                    name.to_string(),
                    "named in the change set but its view did not change".into(),
                ))
            }
            Some(got) if *got != want => {
                return Some((
                    name.to_string(),
                    format!(
                        "change set delta {} differs from the views' delta {}",
                        delta_json(got),
                        delta_json(&want)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some((name, _)) = cs
        .iter()
        .find(|(k, _)| !prev.contains(k) && !now.contains(k))
    {
        return Some((
            name.to_string(),
            "named in the change set but in neither snapshot".into(),
        ));
    }
    None
}

/// After a rejected change, the engine must be as it was.
fn check_unchanged(prev: &Snapshot, now: &Snapshot) -> Option<(String, String)> {
    if prev.policy_text() != now.policy_text() {
        return Some((String::new(), "rejected change replaced the policy".into()));
    }
    if prev.node_count() != now.node_count() {
        return Some((
            String::new(),
            "rejected change added or removed views".into(),
        ));
    }
    for ((name, a), (other, b)) in prev.views().zip(now.views()) {
        if name != other {
            return Some((name.to_string(), "rejected change removed the view".into()));
        }
        if a != b {
            return Some((
                name.to_string(),
                format!(
                    "rejected change modified the view: {}",
                    describe(&diff_views(Some(&a), Some(&b)))
                ),
            ));
        }
    }
    None
}

fn delta_json(d: &NodeDelta) -> String {
    serde_json::to_string(d).unwrap_or_else(|e| e.to_string())
}

/// The nearest-rank percentile `p` (0..=1) of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Median, p99 and median affected of one op's applied changes.
fn summarize(s: &OpStats) -> (Option<Duration>, Option<Duration>, Option<usize>) {
    let mut times: Vec<Duration> = s.applied.iter().map(|(t, _)| *t).collect();
    times.sort_unstable();
    let mut affected: Vec<usize> = s.applied.iter().map(|(_, n)| *n).collect();
    affected.sort_unstable();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        percentile(&affected, 0.5),
    )
}

fn micros(d: Duration) -> f64 {
    // Three decimals: sub-microsecond changes must not round to zero.
    (d.as_secs_f64() * 1e9).round() / 1e3
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn print_json(
    nodes: usize,
    build: &BuildTimes,
    stats: &BTreeMap<&'static str, OpStats>,
    divergences: usize,
) {
    let summary = |s: &OpStats| {
        let (median, p99, affected) = summarize(s);
        json!({
            "count": s.applied.len() + s.rejected,
            "median_us": median.map(micros),
            "p99_us": p99.map(micros),
            "median_affected": affected,
            "rejected": s.rejected,
        })
    };
    let ops: serde_json::Map<String, serde_json::Value> = stats
        .iter()
        .map(|(op, s)| ((*op).to_string(), summary(s)))
        .collect();
    let doc = json!({
        "nodes": nodes,
        "full_build_us": micros(build.median),
        "first_build_us": micros(build.first),
        "ops": ops,
        "all_ops": summary(&all_ops(stats)),
        "divergences": divergences,
    });
    outln!("{doc}");
}

fn print_table(
    nodes: usize,
    build: &BuildTimes,
    stats: &BTreeMap<&'static str, OpStats>,
    verified: bool,
    divergences: usize,
) {
    outln!();
    outln!(
        "nodes: {nodes}, full build: {} (median of {BUILDS}; first {})",
        fmt_dur(build.median),
        fmt_dur(build.first)
    );
    let full_build = build.median;
    let all = all_ops(stats);
    outln!(
        "{:<14} {:>6} {:>8} {:>11} {:>11} {:>9} {:>14}",
        "op",
        "count",
        "rejected",
        "median",
        "p99",
        "affected",
        "build/median"
    );
    let rows = stats.iter().map(|(op, s)| (*op, s));
    for (op, s) in rows.chain([("(all)", &all)]) {
        let (median, p99, affected) = summarize(s);
        let dash = || "-".to_string();
        let ratio = median.filter(|m| !m.is_zero()).map(|m| {
            let r = full_build.as_secs_f64() / m.as_secs_f64();
            if r < 10.0 {
                format!("{r:.1}x")
            } else {
                format!("{r:.0}x")
            }
        });
        outln!(
            "{:<14} {:>6} {:>8} {:>11} {:>11} {:>9} {:>14}",
            op,
            s.applied.len() + s.rejected,
            s.rejected,
            median.map(fmt_dur).unwrap_or_else(dash),
            p99.map(fmt_dur).unwrap_or_else(dash),
            affected.map(|n| n.to_string()).unwrap_or_else(dash),
            ratio.unwrap_or_else(dash),
        );
    }
    if verified {
        outln!("verified: {divergences} divergence(s)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[7u32], 0.99), Some(7));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn bad_change_lines_name_the_line() {
        let text = "{\"op\":\"set_online\",\"node\":\"a\",\"online\":true}\n\n{\"op\":\"nope\"}\n";
        let err = parse_changes(Path::new("c.ndjson"), text).err();
        assert!(err.is_some_and(|e| e.starts_with("c.ndjson:3: invalid change")));
    }

    fn small_engine() -> Engine {
        let state = r#"{"users": [{"id": 1, "name": "u", "email": "u@x"}], "nodes": {
            "a": {"hostname": "a", "user": "u", "ipv4": "100.64.0.1", "created": "2026-01-01T00:00:00Z"},
            "b": {"hostname": "b", "tags": ["tag:x"], "ipv4": "100.64.0.2", "created": "2026-01-01T00:00:01Z"}
        }, "tailnet": {}}"#;
        let policy = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
        Engine::new(
            policy,
            netmap_core::Tailnet::from_state_json(state).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_change_set_missing_or_naming_extra_nodes_is_a_divergence() {
        let mut engine = small_engine();
        let prev = engine.snapshot();
        assert!(check_reference(&prev).is_none());
        let cs = engine
            .apply(Change::RemoveNode { node: "a".into() })
            .unwrap();
        let now = engine.snapshot();
        assert!(check_change_set(&prev, &now, &cs).is_none());
        assert!(check_reference(&now).is_none());

        let mut missing = cs.clone();
        missing.remove("b");
        let d = check_change_set(&prev, &now, &missing).unwrap();
        assert_eq!(d.0, "b");
        assert!(d.1.contains("does not name it"), "{}", d.1);

        let mut extra = ChangeSet::default();
        extra.insert("b".into(), NodeDelta::default());
        let d = check_change_set(&now, &now, &extra).unwrap();
        assert!(d.1.contains("did not change"), "{}", d.1);

        let mut wrong = cs;
        if let Some(mut delta) = wrong.remove("b") {
            delta.ssh_changed = !delta.ssh_changed;
            wrong.insert("b".into(), delta);
        }
        let d = check_change_set(&prev, &now, &wrong).unwrap();
        assert!(d.1.contains("differs from the views' delta"), "{}", d.1);
    }

    #[test]
    fn generator_change_shapes_parse() {
        let lines = [
            r#"{"op": "set_online", "node": "node1", "online": false}"#,
            r#"{"op": "remove_node", "node": "node2"}"#,
            r#"{"op": "upsert_user", "user": {"id": 7, "name": "user6", "email": "user6@example.com"}}"#,
            r#"{"op": "set_policy", "policy": "{\"acls\": []}"}"#,
            r#"{"op": "upsert_node", "node": "node9", "value": {"hostname": "node9", "tags": ["tag:dev", "tag:web"], "ipv4": "100.64.0.12", "ipv6": "fd7a:115c:a1e0::c", "routable_ips": ["10.0.3.0/24"], "approved_routes": [], "created": "2026-01-01T00:00:12Z"}}"#,
        ];
        let steps = parse_changes(Path::new("c"), &lines.join("\n"));
        assert_eq!(steps.map(|s| s.len()).ok(), Some(5));
    }
}
