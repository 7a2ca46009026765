//! `netmap conformance DIR`: runs every corpus case in-process and judges it exactly as
//! `conformance/judge.py` does (`compare` and `judge_case`), so both agree case for case.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use netmap_core::{CoreError, Tailnet};
use serde_json::{Map, Value};

/// Arguments of `netmap conformance`.
#[derive(Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Directory of corpus cases (`*.json`).
    dir: PathBuf,
    /// Only run the cases of this category (acl, grant, routes, ssh, nodeattrs, ...).
    #[arg(long)]
    category: Option<String>,
    /// Print every mismatch of a failing case, not only the first.
    #[arg(long)]
    verbose: bool,
}

/// The names `judge.py` gives the files it writes; used in error messages so that they read
/// the same as those of `netmap compute` run by the judge.
const POLICY_NAME: &str = "policy.hujson";
const STATE_NAME: &str = "state.json";

/// Capabilities the reference control plane adds to every node regardless of policy.
const DEFAULT_CAPS: &[&str] = &[
    "https://tailscale.com/cap/file-sharing",
    "https://tailscale.com/cap/is-owner",
    "https://tailscale.com/cap/is-admin",
    "https://tailscale.com/cap/ssh",
    "https://tailscale.com/cap/tailnet-lock",
    "probe-udp-lifetime",
    "ssh-behavior-v1",
    "ssh-env-vars",
    "store-appc-routes",
    "tailnet-display-name",
    "default-auto-update",
];

/// Wire fields that Go omits when empty, so empty and absent are the same.
const OMITTABLE: &[&str] = &[
    "SrcIPs",
    "SrcBits",
    "DstPorts",
    "IPProto",
    "CapGrant",
    "Bits",
    "ruleExpires",
    "principals",
    "sshUsers",
    "acceptEnv",
    "message",
    "reject",
    "accept",
    "sessionDuration",
    "allowAgentForwarding",
    "holdAndDelegate",
    "allowLocalPortForwarding",
    "allowRemotePortForwarding",
    "recorders",
    "onRecordingFailure",
    "node",
    "nodeIP",
    "userLogin",
    "any",
    "pubKeys",
];

/// Runs `netmap conformance`.
pub fn run(a: &ConformanceArgs) -> ExitCode {
    let files = match case_files(&a.dir) {
        Ok(f) => f,
        Err(e) => {
            errln!("{e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut summary = Summary::default();
    for file in &files {
        let case = match read_case(file) {
            Ok(c) => c,
            Err(e) => {
                // judge.py stops on an unreadable case; we count it as a failure and go on.
                summary.failed += 1;
                let _ = writeln!(out, "FAIL {}: unreadable case: {e}", file.display());
                continue;
            }
        };
        let category = str_of(case.get("category")).to_owned();
        if a.category.as_deref().is_some_and(|c| c != category) {
            continue;
        }
        let fails = judge_case(&case, &mut summary);
        *summary.total.entry(category.clone()).or_default() += 1;
        let id = str_of(case.get("id"));
        if let Some(first) = fails.first() {
            summary.failed += 1;
            let more = if fails.len() > 1 {
                format!(" (+{} more)", fails.len() - 1)
            } else {
                String::new()
            };
            let _ = writeln!(out, "FAIL {id}: {first}{more}");
            if a.verbose {
                for f in &fails[1..] {
                    let _ = writeln!(out, "     {f}");
                }
            }
        } else {
            summary.passed += 1;
            *summary.per.entry(category).or_default() += 1;
        }
    }
    if files.is_empty() {
        errln!("{}: no *.json cases found", a.dir.display());
    }
    if summary.rejected > 0 {
        let _ = writeln!(
            out,
            "error messages containing the reference text: {}/{}",
            summary.worded, summary.rejected
        );
    }
    let by_cat: Vec<String> = summary
        .total
        .iter()
        .map(|(c, t)| format!("{c} {}/{t}", summary.per.get(c).copied().unwrap_or(0)))
        .collect();
    let _ = writeln!(out, "by category: {}", by_cat.join(", "));
    let _ = writeln!(out, "{} passed, {} failed", summary.passed, summary.failed);
    let _ = out.flush();
    if summary.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[derive(Default)]
struct Summary {
    passed: usize,
    failed: usize,
    /// Cases judged, by category.
    total: BTreeMap<String, usize>,
    /// Cases passed, by category.
    per: BTreeMap<String, usize>,
    /// Rejected cases that we rejected too.
    rejected: usize,
    /// ... whose error message contains the reference message.
    worded: usize,
}

/// The `*.json` files of DIR, sorted by path (as `sorted(glob(DIR/*.json))`).
fn case_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort_by(|a, b| a.to_string_lossy().cmp(&b.to_string_lossy()));
    Ok(files)
}

fn read_case(path: &Path) -> Result<Value, String> {
    let text = super::read_file(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    Ok(v)
}

fn str_of(v: Option<&Value>) -> &str {
    v.and_then(Value::as_str).unwrap_or("")
}

/// What running the CLI on a case would give: `compute`'s JSON output (or its stderr when it
/// exits non-zero), and whether `policy test` exits 0.
struct CaseRun {
    compute: Result<Value, String>,
    tests_pass: bool,
}

/// Runs what `netmap compute` and `netmap policy test` run, on a case's policy and state.
fn run_case(policy_text: &str, state_text: &str) -> CaseRun {
    let fail = |msg: String| CaseRun {
        compute: Err(msg),
        tests_pass: false,
    };
    let policy = match netmap_policy::parse_policy(policy_text) {
        Ok(p) => p,
        Err(e) => return fail(format!("{POLICY_NAME}: {e}")),
    };
    let tailnet = match Tailnet::from_state_json(state_text) {
        Ok(t) => t,
        Err(e) => return fail(format!("{STATE_NAME}: {e}")),
    };
    if let Err(e) = netmap_core::check_policy_for_tailnet(&policy, &tailnet) {
        return fail(format!("{POLICY_NAME}: {e}"));
    }
    let report = netmap_core::run_tests(&policy, &tailnet);
    if !report.passed() {
        return fail(format!("{POLICY_NAME}: {}", CoreError::TestsFailed(report)));
    }
    // The views come from the engine, as `netmap compute` gets them.
    let engine = match netmap_core::Engine::restore(policy_text, tailnet) {
        Ok(e) => e,
        Err(e) => return fail(format!("{POLICY_NAME}: {e}")),
    };
    let snapshot = engine.snapshot();
    let mut nodes = Map::new();
    for (name, view) in snapshot.views() {
        match serde_json::to_value(view) {
            Ok(v) => {
                nodes.insert(name.to_string(), v);
            }
            Err(e) => {
                return CaseRun {
                    compute: Err(e.to_string()),
                    tests_pass: true,
                }
            }
        }
    }
    let mut doc = Map::new();
    doc.insert("nodes".into(), Value::Object(nodes));
    CaseRun {
        compute: Ok(Value::Object(doc)),
        tests_pass: true,
    }
}

/// `run_case`, with a panic turned into a failed run (a panicking CLI exits non-zero).
fn run_case_caught(policy_text: &str, state_text: &str) -> CaseRun {
    match catch_unwind(AssertUnwindSafe(|| run_case(policy_text, state_text))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            CaseRun {
                compute: Err(format!("thread 'main' panicked: {msg}")),
                tests_pass: false,
            }
        }
    }
}

/// Judges one case; returns the mismatches (empty = pass). Mirrors `judge.py`'s `judge_case`.
fn judge_case(case: &Value, summary: &mut Summary) -> Vec<String> {
    let policy_text = str_of(case.get("policy"));
    let tailnet = match case.get("tailnet") {
        Some(t) if truthy(t) => t.clone(),
        _ => Value::Object(Map::new()),
    };
    let mut state = Map::new();
    state.insert(
        "users".into(),
        case.get("users").cloned().unwrap_or(Value::Null),
    );
    state.insert(
        "nodes".into(),
        case.get("nodes").cloned().unwrap_or(Value::Null),
    );
    state.insert("tailnet".into(), tailnet);
    let state_text = Value::Object(state).to_string();

    let expect = case.get("expect");
    let error = expect.and_then(|e| e.get("error")).filter(|e| !e.is_null());
    let want_err = error.is_some();
    let ref_message = str_of(error.and_then(|e| e.get("message")));
    let category = str_of(case.get("category"));

    let run = run_case_caught(policy_text, &state_text);
    let mut fails = match (&run.compute, want_err) {
        (Ok(_), true) => vec![format!(
            "accepted a policy the reference rejects: {ref_message}"
        )],
        (Err(stderr), true) => {
            summary.rejected += 1;
            if stderr.to_lowercase().contains(&ref_message.to_lowercase()) {
                summary.worded += 1;
            }
            Vec::new()
        }
        (Err(stderr), false) => {
            let s: String = stderr.trim().chars().take(160).collect();
            return vec![format!("rejected a valid policy: {s}")];
        }
        (Ok(out), false) => compare(case, out),
    };
    if category == "policytest" || category == "sshtest" {
        let test_failed = want_err && ref_message.contains("test");
        if test_failed && run.tests_pass {
            fails.push("policy test passed, reference says test(s) failed".into());
        }
        if !want_err && !run.tests_pass {
            fails.push("policy test failed, reference says all tests pass".into());
        }
    }
    fails
}

/// Compares `compute`'s output with the reference. Mirrors `judge.py`'s `compare`.
fn compare(case: &Value, out: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let empty = Map::new();
    let got_nodes = out
        .get("nodes")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let exp_nodes = case
        .get("expect")
        .and_then(|e| e.get("nodes"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let category = str_of(case.get("category"));
    for (name, exp) in exp_nodes {
        let Some(got) = got_nodes.get(name) else {
            diffs.push(format!("{name}: node missing from output"));
            continue;
        };
        if let Some(pf) = exp.get("packet_filter") {
            if canon(pf) != canon(&or_empty_list(got.get("packet_filter"))) {
                diffs.push(format!("{name}: packet_filter differs"));
            }
        }
        if let Some(peers) = exp.get("peers") {
            let e = sorted_peers(peers);
            let g = sorted_peers(&or_empty_list(got.get("peers")));
            if e != g {
                let en: BTreeSet<Option<&str>> = e.iter().map(|p| p.name.as_str()).collect();
                let gn: BTreeSet<Option<&str>> = g.iter().map(|p| p.name.as_str()).collect();
                if en != gn {
                    let missing: Vec<Option<&str>> = en.difference(&gn).copied().collect();
                    let extra: Vec<Option<&str>> = gn.difference(&en).copied().collect();
                    diffs.push(format!(
                        "{name}: peers differ (missing {}, extra {})",
                        py_list(&missing),
                        py_list(&extra)
                    ));
                } else {
                    diffs.push(format!("{name}: peer routes/allowed_ips differ"));
                }
            }
        }
        // SSH rules are matched first to last on the client, so their order counts.
        if let Some(rules) = exp.get("ssh_rules") {
            if canon_each(rules) != canon_each(&or_empty_list(got.get("ssh_rules"))) {
                diffs.push(format!("{name}: ssh_rules differ"));
            }
        }
        if category == "nodeattrs" {
            if let Some(self_) = exp.get("self") {
                if policy_caps(self_.get("cap_map")) != policy_caps(got.get("cap_map")) {
                    diffs.push(format!("{name}: cap_map differs"));
                }
            }
        }
    }
    diffs
}

/// Python truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `v or []`.
fn or_empty_list(v: Option<&Value>) -> Value {
    match v {
        Some(x) if truthy(x) => x.clone(),
        _ => Value::Array(Vec::new()),
    }
}

/// `v in (None, [], {}, False, 0, "")`: exactly the falsy values.
fn is_empty_value(v: &Value) -> bool {
    !truthy(v)
}

/// `json.dumps(v, sort_keys=True)`-like text: a canonical string for ordering list items.
fn sorted_dump(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    sorted_dump(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                sorted_dump(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn dump_key(v: &Value) -> String {
    let mut s = String::new();
    sorted_dump(v, &mut s);
    s
}

/// Order-insensitive canonical form: lists become sorted lists of canonical items, and
/// omittable wire fields holding an empty value are dropped.
fn canon(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, x)| !(OMITTABLE.contains(&k.as_str()) && is_empty_value(x)))
                .map(|(k, x)| (k.clone(), canon(x)))
                .collect(),
        ),
        Value::Array(a) => {
            let mut items: Vec<(String, Value)> = a
                .iter()
                .map(|x| {
                    let c = canon(x);
                    (dump_key(&c), c)
                })
                .collect();
            items.sort_by(|x, y| x.0.cmp(&y.0));
            Value::Array(items.into_iter().map(|(_, c)| c).collect())
        }
        other => other.clone(),
    }
}

/// `[canon(r) for r in v]` (the outer order kept).
fn canon_each(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.iter().map(canon).collect(),
        other => vec![canon(other)],
    }
}

/// `canon({k: v for k, v in (cm or {}).items() if k not in DEFAULT_CAPS})`.
fn policy_caps(cm: Option<&Value>) -> Value {
    let Some(Value::Object(m)) = cm else {
        return Value::Object(Map::new());
    };
    let kept: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| !DEFAULT_CAPS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    canon(&Value::Object(kept))
}

/// A peer reduced to what is judged.
#[derive(Debug, PartialEq)]
struct NormPeer {
    name: Value,
    allowed_ips: Vec<Value>,
    primary_routes: Vec<Value>,
}

fn sorted_values(v: Option<&Value>) -> Vec<Value> {
    let mut items = match or_empty_list(v) {
        Value::Array(a) => a,
        other => vec![other],
    };
    items.sort_by_cached_key(|x| match x {
        Value::String(s) => s.clone(),
        other => dump_key(other),
    });
    items
}

/// Peers normalised and sorted by name (stable, as Python's `sorted`).
fn sorted_peers(peers: &Value) -> Vec<NormPeer> {
    let list: &[Value] = match peers {
        Value::Array(a) => a,
        _ => &[],
    };
    let mut out: Vec<NormPeer> = list
        .iter()
        .map(|p| NormPeer {
            name: p.get("name").cloned().unwrap_or(Value::Null),
            allowed_ips: sorted_values(p.get("allowed_ips")),
            primary_routes: sorted_values(p.get("primary_routes")),
        })
        .collect();
    out.sort_by(|a, b| str_of(Some(&a.name)).cmp(str_of(Some(&b.name))));
    out
}

/// Python's `repr` of a list of names: `['a', 'b']`.
fn py_list(items: &[Option<&str>]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Some(s) => py_str(s),
            None => "None".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canon_ignores_order_and_empty_omittables() {
        let a = json!([{"SrcIPs": ["b", "a"], "DstPorts": [], "IPProto": [6, 17]}]);
        let b = json!([{"IPProto": [17, 6], "SrcIPs": ["a", "b"]}]);
        assert_eq!(canon(&a), canon(&b));
        // A capability with a null value is not omittable.
        assert_ne!(canon(&json!({"cap": null})), canon(&json!({})));
    }

    #[test]
    fn ssh_rules_order_counts() {
        let a = json!([{"action": {"accept": true}}, {"action": {"reject": true}}]);
        let b = json!([{"action": {"reject": true}}, {"action": {"accept": true}}]);
        assert_ne!(canon_each(&a), canon_each(&b));
    }

    #[test]
    fn peers_compare_by_name_and_routes() {
        let a = json!([{"name": "b", "allowed_ips": ["2", "1"]}, {"name": "a"}]);
        let b = json!([{"name": "a", "allowed_ips": [], "primary_routes": null},
                       {"name": "b", "allowed_ips": ["1", "2"], "tags": ["x"]}]);
        assert_eq!(sorted_peers(&a), sorted_peers(&b));
    }

    #[test]
    fn python_repr_of_names() {
        assert_eq!(py_list(&[Some("a"), Some("it's")]), r#"['a', "it's"]"#);
        assert_eq!(py_list(&[]), "[]");
    }
}
