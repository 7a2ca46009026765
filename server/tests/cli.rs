//! End-to-end tests of the `netmap` binary: exit codes, the bundled example, and the
//! conformance corpus (read from `../shared/conformance/cases` or `NETMAP_CONFORMANCE_DIR`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

/// `netmap conformance` on the shared corpus must pass at least this many cases. Raise it as
/// cases start to pass; never lower it to make a change land.
const CONFORMANCE_FLOOR: usize = 653;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary under test (`NETMAP_TEST_BIN` runs the tests against another build).
fn bin() -> String {
    std::env::var("NETMAP_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_netmap").to_string())
}

fn netmap(args: &[&str]) -> Run {
    let out: Output = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run netmap");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn example(name: &str) -> String {
    workspace_root()
        .join("examples")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli-tests")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// True when `s` holds "line L, column C" or "L:C" with numbers.
fn has_line_column(s: &str) -> bool {
    let digits_after = |rest: &str| rest.chars().next().is_some_and(|c| c.is_ascii_digit());
    s.match_indices("line ").any(|(i, m)| {
        let rest = &s[i + m.len()..];
        let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !n.is_empty() && rest[n.len()..].starts_with(", column ") && {
            digits_after(&rest[n.len() + ", column ".len()..])
        }
    }) || s
        .split(|c: char| !(c.is_ascii_digit() || c == ':'))
        .any(|w| {
            let mut parts = w.split(':');
            matches!((parts.next(), parts.next(), parts.next()),
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty())
        })
}

const INVALID_POLICY: &str = r#"{
  // tag:nope is not in tagOwners
  "acls": [
    {"action": "accept", "src": ["tag:nope"], "dst": ["*:*"]},
  ],
}
"#;

#[test]
fn policy_check_valid_example_exits_0() {
    let r = netmap(&["policy", "check", &example("policy.hujson")]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert!(r.stdout.contains("valid"), "stdout: {}", r.stdout);
}

#[test]
fn policy_check_with_state_runs_tests() {
    let r = netmap(&[
        "policy",
        "check",
        &example("policy.hujson"),
        "--state",
        &example("state.json"),
    ]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
}

#[test]
fn policy_check_invalid_exits_1_with_line_and_column() {
    let dir = scratch("invalid");
    let p = write(&dir.join("bad.hujson"), INVALID_POLICY);
    let r = netmap(&["policy", "check", &p]);
    assert_eq!(r.code, 1, "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("tag:nope"), "stderr: {}", r.stderr);
    assert!(has_line_column(&r.stderr), "no line:column in {}", r.stderr);
    // The position is that of the offending element: line 4.
    assert!(
        r.stderr.contains("line 4") || r.stderr.contains(":4:"),
        "stderr: {}",
        r.stderr
    );
}

#[test]
fn policy_check_syntax_error_exits_1_with_line_and_column() {
    let dir = scratch("syntax");
    let p = write(
        &dir.join("bad.hujson"),
        "{\n  \"acls\": [\n    {,\n  ]\n}\n",
    );
    let r = netmap(&["policy", "check", &p]);
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    assert!(has_line_column(&r.stderr), "no line:column in {}", r.stderr);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["policy", "check"][..],
        &["policy", "test", "x.hujson"][..],
        &["compute", "--policy", "x.hujson"][..],
        &["conformance"][..],
        &["no-such-command"][..],
        &["policy", "check", "x.hujson", "--no-such-flag"][..],
    ] {
        let r = netmap(args);
        assert_eq!(r.code, 2, "{args:?}: stderr: {}", r.stderr);
        assert!(!r.stderr.is_empty(), "{args:?}: no usage message");
    }
}

#[test]
fn help_exits_0() {
    for args in [
        &["--help"][..],
        &["policy", "check", "--help"][..],
        &["policy", "test", "--help"][..],
        &["compute", "--help"][..],
        &["conformance", "--help"][..],
    ] {
        let r = netmap(args);
        assert_eq!(r.code, 0, "{args:?}: stderr: {}", r.stderr);
        assert!(r.stdout.contains("Usage"), "{args:?}: {}", r.stdout);
    }
}

#[test]
fn policy_test_example_passes() {
    let r = netmap(&[
        "policy",
        "test",
        &example("policy.hujson"),
        "--state",
        &example("state.json"),
    ]);
    assert_eq!(r.code, 0, "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(r.stdout.contains(" passed, 0 failed"), "{}", r.stdout);

    let r = netmap(&[
        "policy",
        "test",
        &example("policy.hujson"),
        "--state",
        &example("state.json"),
        "--format",
        "json",
    ]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).expect("policy test --format json");
    assert!(v.is_object());
}

#[test]
fn policy_test_invalid_policy_exits_1() {
    let dir = scratch("test-invalid");
    let p = write(&dir.join("bad.hujson"), INVALID_POLICY);
    let r = netmap(&["policy", "test", &p, "--state", &example("state.json")]);
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
}

#[test]
fn failing_tests_reject_the_policy() {
    let dir = scratch("failing-tests");
    let policy = std::fs::read_to_string(example("policy.hujson")).unwrap();
    // carol is not a developer: she may not reach the database.
    let policy = policy.replacen(
        r#""tests": ["#,
        r#""tests": [
    {"src": "carol@acme.example", "accept": ["tag:db:5432"]},"#,
        1,
    );
    let p = write(&dir.join("failing.hujson"), &policy);
    let state = example("state.json");

    let r = netmap(&["policy", "test", &p, "--state", &state]);
    assert_eq!(r.code, 1, "stdout: {} stderr: {}", r.stdout, r.stderr);
    let fail = r
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line in {}", r.stdout));
    assert!(
        fail.contains("carol@acme.example") && fail.contains("5432"),
        "{fail}"
    );
    assert!(r.stdout.contains(" failed"), "{}", r.stdout);

    let r = netmap(&["policy", "check", &p, "--state", &state]);
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    // Without a state there is nothing to test against: the policy itself is valid.
    let r = netmap(&["policy", "check", &p]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);

    let r = netmap(&["compute", "--policy", &p, "--state", &state]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("test"), "stderr: {}", r.stderr);
}

fn run_compute_example(extra: &[&str]) -> Value {
    let policy = example("policy.hujson");
    let state = example("state.json");
    let mut args = vec!["compute", "--policy", &policy, "--state", &state];
    args.extend_from_slice(extra);
    let r = netmap(&args);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    serde_json::from_str(&r.stdout).expect("compute prints JSON")
}

fn peer_names(view: &Value) -> Vec<&str> {
    view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect()
}

fn peer<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name}"))
}

#[test]
fn compute_example() {
    let out = run_compute_example(&[]);
    let nodes = out["nodes"].as_object().unwrap();
    assert_eq!(nodes.len(), 10);
    for (name, view) in nodes {
        for key in ["packet_filter", "peers", "ssh_rules", "cap_map"] {
            assert!(view.get(key).is_some(), "{name}: no {key}");
        }
    }
    // bob sees the servers he may reach, the routers, his own phone; not carol.
    let bob = &out["nodes"]["bob-laptop"];
    let names = peer_names(bob);
    for n in ["web-1", "db-1", "bob-phone", "exit-fra"] {
        assert!(names.contains(&n), "bob-laptop should see {n}: {names:?}");
    }
    assert!(!names.contains(&"carol-desktop"), "{names:?}");
    assert!(!names.contains(&"bob-laptop"), "a node is not its own peer");
    // The exit node carries the default routes; the office router is primary for the LAN.
    let exit = peer(bob, "exit-fra");
    let allowed: Vec<&str> = exit["allowed_ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(allowed.contains(&"0.0.0.0/0") && allowed.contains(&"::/0"));
    let carol = &out["nodes"]["carol-desktop"];
    let router = peer(carol, "office-router");
    assert_eq!(router["primary_routes"], json!(["192.168.10.0/24"]));
    // The database accepts 5432 from the web tier.
    let db_filter = out["nodes"]["db-1"]["packet_filter"].to_string();
    assert!(db_filter.contains("100.101.1.1"), "{db_filter}");
    assert!(db_filter.contains("5432"), "{db_filter}");
    // SSH: web-1 lets alice in as root.
    let web_ssh = out["nodes"]["web-1"]["ssh_rules"].to_string();
    assert!(web_ssh.contains("100.101.0.1") && web_ssh.contains("root"));
}

#[test]
fn compute_node_filter_and_summary() {
    let out = run_compute_example(&["--node", "web-1", "--node", "db-1"]);
    let nodes = out["nodes"].as_object().unwrap();
    let mut names: Vec<&String> = nodes.keys().collect();
    names.sort();
    assert_eq!(names, ["db-1", "web-1"]);

    let out = run_compute_example(&["--summary"]);
    let web = &out["nodes"]["web-1"];
    assert!(web["peers"].as_u64().unwrap() > 0, "{web}");
}

#[test]
fn compute_rejected_policy_exits_nonzero() {
    let dir = scratch("compute-invalid");
    let p = write(&dir.join("bad.hujson"), INVALID_POLICY);
    let r = netmap(&["compute", "--policy", &p, "--state", &example("state.json")]);
    assert_ne!(r.code, 0);
    assert!(r.stdout.trim().is_empty(), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("tag:nope"), "stderr: {}", r.stderr);
}

/// A case in the corpus shape built from the example and the binary's own output.
fn example_case(id: &str, expect_nodes: Value) -> Value {
    let policy = std::fs::read_to_string(example("policy.hujson")).unwrap();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(example("state.json")).unwrap()).unwrap();
    json!({
        "id": id,
        "category": "acl",
        "description": "the bundled example",
        "policy": policy,
        "tailnet": state["tailnet"],
        "users": state["users"],
        "nodes": state["nodes"],
        "expect": {"error": null, "nodes": expect_nodes},
    })
}

fn expect_from_output(out: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for (name, v) in out["nodes"].as_object().unwrap() {
        m.insert(
            name.clone(),
            json!({
                "packet_filter": v["packet_filter"],
                "peers": v["peers"],
                "ssh_rules": v["ssh_rules"],
                "self": {"cap_map": v["cap_map"]},
            }),
        );
    }
    Value::Object(m)
}

fn write_case(dir: &Path, case: &Value) {
    let id = case["id"].as_str().unwrap();
    write(&dir.join(format!("{id}.json")), &case.to_string());
}

#[test]
fn conformance_judges_cases() {
    let dir = scratch("conformance");
    let out = run_compute_example(&[]);
    let expect = expect_from_output(&out);
    write_case(&dir, &example_case("example-a-same", expect.clone()));

    // Order of rules and of list items does not count; empty omittable fields are absent.
    let mut reordered = expect.clone();
    for v in reordered.as_object_mut().unwrap().values_mut() {
        v["packet_filter"].as_array_mut().unwrap().reverse();
        v["peers"].as_array_mut().unwrap().reverse();
    }
    write_case(&dir, &example_case("example-b-reordered", reordered));

    // The reference lacks a peer that we compute.
    let mut fewer = expect.clone();
    fewer["bob-laptop"]["peers"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["name"] != "web-1");
    write_case(&dir, &example_case("example-c-peers", fewer));

    // SSH rules are order-sensitive.
    let mut swapped = expect.clone();
    swapped["alice-laptop"]["ssh_rules"]
        .as_array_mut()
        .unwrap()
        .reverse();
    write_case(&dir, &example_case("example-d-ssh", swapped));

    // A policy the reference rejects, and that we reject too.
    let mut rejected = example_case("example-e-rejected", json!({}));
    rejected["policy"] = json!(INVALID_POLICY);
    rejected["expect"]["error"] = json!({"status": 400, "message": "tag:nope"});
    write_case(&dir, &rejected);

    // A non-case file is ignored.
    write(&dir.join("README.md"), "not a case");

    let d = dir.to_string_lossy().into_owned();
    let r = netmap(&["conformance", &d]);
    assert_eq!(r.code, 1, "stdout: {} stderr: {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines.contains(
            &"FAIL example-c-peers: bob-laptop: peers differ (missing [], extra ['web-1'])"
        ),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&"FAIL example-d-ssh: alice-laptop: ssh_rules differ"),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&"error messages containing the reference text: 1/1"),
        "{}",
        r.stdout
    );
    assert_eq!(lines.last(), Some(&"3 passed, 2 failed"), "{}", r.stdout);

    // --category filters; with nothing failing the exit code is 0.
    std::fs::remove_file(dir.join("example-c-peers.json")).unwrap();
    std::fs::remove_file(dir.join("example-d-ssh.json")).unwrap();
    let r = netmap(&["conformance", &d, "--category", "acl"]);
    assert_eq!(r.code, 0, "stdout: {}", r.stdout);
    assert_eq!(r.stdout.lines().last(), Some("3 passed, 0 failed"));
    let r = netmap(&["conformance", &d, "--category", "ssh"]);
    assert_eq!(r.stdout.lines().last(), Some("0 passed, 0 failed"));
}

#[test]
fn conformance_missing_dir_is_a_usage_error() {
    let r = netmap(&["conformance", "/nonexistent/netmap/cases"]);
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
}

/// Where the shared corpus is: `NETMAP_CONFORMANCE_DIR`, else `../shared/conformance/cases`
/// beside the workspace.
fn conformance_dir() -> (PathBuf, bool) {
    match std::env::var_os("NETMAP_CONFORMANCE_DIR") {
        Some(d) if !d.is_empty() => (PathBuf::from(d), true),
        _ => (
            workspace_root()
                .join("..")
                .join("shared")
                .join("conformance")
                .join("cases"),
            false,
        ),
    }
}

#[test]
fn conformance_corpus() {
    let (dir, explicit) = conformance_dir();
    if !dir.is_dir() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci && !explicit,
            "conformance corpus not found at {} (CI={}, NETMAP_CONFORMANCE_DIR {})",
            dir.display(),
            std::env::var("CI").unwrap_or_default(),
            if explicit { "set" } else { "unset" },
        );
        eprintln!(
            "NOTICE: conformance corpus not found at {}; skipping (set NETMAP_CONFORMANCE_DIR)",
            dir.display()
        );
        return;
    }
    let d = dir.to_string_lossy().into_owned();
    let r = netmap(&["conformance", &d]);
    assert!(r.code == 0 || r.code == 1, "stderr: {}", r.stderr);
    let summary = r.stdout.lines().last().unwrap_or_default().to_owned();
    let by_category = r
        .stdout
        .lines()
        .find(|l| l.starts_with("by category: "))
        .unwrap_or_default();
    // Written to the stderr handle directly so that it shows even when the test passes
    // (the test harness captures only the print macros).
    let _ = writeln!(
        std::io::stderr(),
        "netmap conformance ({}): {summary}; {by_category}",
        dir.display()
    );
    let mut words = summary.split_whitespace();
    let passed: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(
        summary.ends_with(" failed") && summary.contains(" passed, "),
        "unexpected summary line {summary:?}\n{}",
        r.stdout
    );
    if r.code == 0 {
        assert!(summary.ends_with(", 0 failed"), "{summary}");
    }
    assert!(
        passed >= CONFORMANCE_FLOOR,
        "conformance dropped below the floor: {summary} (floor {CONFORMANCE_FLOOR})\n{}",
        r.stdout
    );
}

#[test]
fn missing_input_files_are_usage_errors() {
    let policy = example("policy.hujson");
    let state = example("state.json");
    for args in [
        &["policy", "check", "/nonexistent/p.hujson"][..],
        &["policy", "check", &policy, "--state", "/nonexistent/s.json"][..],
        &["policy", "test", &policy, "--state", "/nonexistent/s.json"][..],
        &[
            "compute",
            "--policy",
            "/nonexistent/p.hujson",
            "--state",
            &state,
        ][..],
        &[
            "compute",
            "--policy",
            &policy,
            "--state",
            "/nonexistent/s.json",
        ][..],
        &[
            "compute", "--policy", &policy, "--state", &state, "--node", "nope",
        ][..],
    ] {
        let r = netmap(args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("nonexistent") || r.stderr.contains("nope"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn state_file_errors_name_the_node_field_and_value() {
    let dir = scratch("state-errors");
    let policy = example("policy.hujson");
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(example("state.json")).unwrap()).unwrap();
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "missing user",
            json!("nobody"),
            &["node \"alice-laptop\"", "user", "nobody"],
        ),
        (
            "bad address",
            json!({"ipv4": "1.2.3"}),
            &["node \"alice-laptop\"", "line"],
        ),
    ];
    for (what, v, needles) in cases {
        let mut s = st.clone();
        if v.is_string() {
            s["nodes"]["alice-laptop"]["user"] = v;
        } else {
            s["nodes"]["alice-laptop"]["ipv4"] = v["ipv4"].clone();
        }
        let file = write(&dir.join("s.json"), &s.to_string());
        for args in [
            &["compute", "--policy", &policy, "--state", &file][..],
            &["policy", "test", &policy, "--state", &file][..],
            &["policy", "check", &policy, "--state", &file][..],
        ] {
            let r = netmap(args);
            assert_eq!(r.code, 1, "{what}: {args:?}: {}", r.stderr);
            assert!(r.stdout.is_empty(), "{what}: {}", r.stdout);
            for n in needles {
                assert!(r.stderr.contains(n), "{what}: {:?} lacks {n:?}", r.stderr);
            }
        }
    }
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    // A tailnet whose compute output is far larger than a pipe's buffer.
    let dir = scratch("pipe");
    let mut nodes = serde_json::Map::new();
    for i in 0..300 {
        nodes.insert(
            format!("n{i}"),
            json!({"tags": ["tag:a"], "ipv4": format!("100.64.{}.{}", i / 200, i % 200 + 1)}),
        );
    }
    let state = write(&dir.join("s.json"), &json!({"nodes": nodes}).to_string());
    let policy = write(&dir.join("p.hujson"), "{}");
    for args in [
        &["compute", "--policy", &policy, "--state", &state][..],
        &["policy", "test", &policy, "--state", &state][..],
    ] {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read a little, then hang up, like `| head -c 100`.
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 100];
        let _ = std::io::Read::read(&mut out, &mut buf);
        drop(out);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    }
    // Writing into a closed pipe: nothing at all is read.
    let mut child = Command::new(bin())
        .args(["compute", "--policy", &policy, "--state", &state])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::io::stdout().flush();
}
