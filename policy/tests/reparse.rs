//! Reading an edited policy text while taking its unchanged groups from the policy before
//! the edit (`reparse_policy`) gives exactly what reading the whole text gives: the same
//! policy, the same group places, the same error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::Path;

use netmap_policy::{parse_policy_spans, reparse_policy};
use proptest::prelude::*;

/// A policy with `groups` first (as the generator and most people write it) and rules,
/// tag owners and tests that name the groups; `compact`: on one line (what follows a group
/// then has the group's last line as its own).
fn base_text(groups: &[Vec<u8>], compact: bool) -> String {
    let text = spread_text(groups);
    if !compact {
        return text;
    }
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

fn spread_text(groups: &[Vec<u8>]) -> String {
    let mut s = String::from("// a policy\n{\n  \"groups\": {\n");
    for (g, members) in groups.iter().enumerate() {
        s.push_str(&format!("    // group {g}\n    \"group:g{g}\": [\n"));
        for m in members {
            s.push_str(&format!("      \"user{m}@example.com\",\n"));
        }
        // The last group's end shares its line with the tag owners (positioned).
        s.push_str(if g + 1 < groups.len() {
            "    ],\n"
        } else {
            "    ]"
        });
    }
    s.push_str("}, \"tagOwners\": {\"tag:web\": [\"group:g0\"]},\n");
    s.push_str("  \"hosts\": {\"db\": \"10.0.0.1\"},\n  \"acls\": [\n");
    for g in 0..groups.len() {
        s.push_str(&format!(
            "    {{\"action\": \"accept\", \"src\": [\"group:g{g}\"], \"dst\": [\"tag:web:{}\"]}},\n",
            80 + g
        ));
    }
    s.push_str(
        "  ],\n  \"tests\": [{\"src\": \"user1@example.com\", \"accept\": [\"db:22\"]}],\n}\n",
    );
    s
}

/// An edit of a text: bytes `at..at+cut` replaced by `put`.
#[derive(Debug, Clone)]
struct Edit {
    at: usize,
    cut: usize,
    put: String,
}

impl Edit {
    fn apply(&self, text: &str) -> String {
        let mut at = self.at % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + self.cut).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        format!("{}{}{}", &text[..at], self.put, &text[end..])
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    let put = prop_oneof![
        Just(String::new()),
        Just("\n".to_string()),
        Just("      \"user7@example.com\",\n".to_string()),
        Just("\"user8@example.com\", ".to_string()),
        Just("// c\n".to_string()),
        Just("/* c */".to_string()),
        Just("\"group:g9\": [\"user9@example.com\"],\n".to_string()),
        Just("é".to_string()),
        "[\"\\[\\]{},:/*\\n a-z0-9@.]{1,6}",
    ];
    (0usize..4000, 0usize..40, put).prop_map(|(at, cut, put)| Edit { at, cut, put })
}

fn same_read(new: &str, old: &str) {
    let (old_policy, old_spans) = parse_policy_spans(old).unwrap();
    let whole = parse_policy_spans(new);
    let reused = reparse_policy(new, old, &old_policy, &old_spans);
    match (&whole, &reused) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.0, b.0, "policy differs for {new:?}");
            assert_eq!(a.1, b.1, "group places differ for {new:?}");
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("one read failed: whole {whole:?} reused {reused:?} for {new:?}"),
    }
}

proptest! {
    #[test]
    fn reparse_equals_parse(
        groups in prop::collection::vec(prop::collection::vec(0u8..50, 0..6), 1..6),
        edits in prop::collection::vec(edit(), 1..4),
        compact in any::<bool>(),
    ) {
        // Each edit is read against the text before it, when that text was valid.
        let mut old = base_text(&groups, compact);
        for e in &edits {
            let new = e.apply(&old);
            same_read(&new, &old);
            if parse_policy_spans(&new).is_ok() {
                old = new;
            }
        }
    }

    #[test]
    fn reparse_of_valid_fixtures_equals_parse(pick in 0usize..1000, e in edit()) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/valid");
        let mut files: Vec<_> = fs::read_dir(dir).unwrap().map(|f| f.unwrap().path()).collect();
        files.sort();
        let old = fs::read_to_string(&files[pick % files.len()]).unwrap();
        same_read(&e.apply(&old), &old);
    }
}

#[test]
fn unchanged_groups_are_taken_not_read() {
    // A member added to the middle group: the first group lies in the common start, the
    // last in the common end (moved by the edit).
    let old = base_text(&[vec![1, 2], vec![3], vec![4, 5]], false);
    let new = old.replace(
        "user3@example.com\",\n",
        "user3@example.com\",\n      \"user6@example.com\",\n",
    );
    same_read(&new, &old);
    // Taken from the policy before (marked here so that taking shows), not read again.
    let (mut before, spans) = parse_policy_spans(&old).unwrap();
    for members in before.groups.values_mut() {
        std::sync::Arc::make_mut(members).push("taken@example.com".into());
    }
    let (p, _) = reparse_policy(&new, &old, &before, &spans).unwrap();
    let taken = |g: &str| p.groups[g].iter().any(|m| m == "taken@example.com");
    assert!(taken("group:g0") && taken("group:g2"), "{:?}", p.groups);
    assert_eq!(
        *p.groups["group:g1"],
        vec!["user3@example.com", "user6@example.com"]
    );
}

#[test]
fn a_host_moved_keeps_the_rules_taken_and_reads_the_tests_again() {
    let old = r#"{
  "hosts": {"ci": "100.64.0.2", "db": "10.0.0.1"},
  "acls": [{"action": "accept", "src": ["ci"], "dst": ["db:5432"]}],
  "tests": [{"src": "ci", "accept": ["db:5432"]}]
}"#;
    // Another address for a host: the rules are taken (marked here so that taking shows).
    let moved = old.replace("100.64.0.2", "100.64.0.140");
    same_read(&moved, old);
    let (mut before, spans) = parse_policy_spans(old).unwrap();
    before.acls[0].src_posture.push("taken".into());
    let (p, _) = reparse_policy(&moved, old, &before, &spans).unwrap();
    assert_eq!(p.acls[0].src_posture, ["taken"]);
    assert_eq!(p.hosts["ci"].to_string(), "100.64.0.140/32");
    // A host a test names becomes a range: the tests are read again, and fail as reading
    // the whole text fails.
    let range = old.replace("\"10.0.0.1\"", "\"10.0.0.0/24\"");
    assert!(parse_policy_spans(&range).is_err());
    same_read(&range, old);
    // A host renamed: the rules name one that is gone, and are read again.
    same_read(&old.replace("\"db\": ", "\"db2\": "), old);
}

#[test]
fn sections_are_taken_only_where_taking_them_reads_the_same() {
    let old = r#"{
  "groups": {"group:a": ["user1@example.com"], "group:b": ["user2@example.com"]},
  "tagOwners": {"tag:web": ["group:a"]},
  "acls": [{"action": "accept", "src": ["group:b"], "dst": ["tag:web:80"]}],
  "tests": [{"src": "user1@example.com", "accept": ["tag:web:80"]}]
}"#;
    // A member added: the sections after it are taken (marked here so that taking shows),
    // not read again; on one line, their positions move along it.
    let new = old.replace(
        r#"["user1@example.com"]"#,
        r#"["user1@example.com", "user3@example.com"]"#,
    );
    same_read(&new, old);
    let (mut before, spans) = parse_policy_spans(old).unwrap();
    before.acls[0].src_posture.push("taken".into());
    let (p, _) = reparse_policy(&new, old, &before, &spans).unwrap();
    assert_eq!(p.acls[0].src_posture, ["taken"]);
    let line = old.replace('\n', " ");
    same_read(
        &line.replace(
            "user1@example.com\"]",
            "user1@example.com\", \"user3@example.com\"]",
        ),
        &line,
    );
    // A group the rules name goes: the rules are read again (and fail).
    same_read(
        &old.replace(r#", "group:b": ["user2@example.com"]"#, ""),
        old,
    );
    // The old name of autogroup:member in one section and the new one in another.
    let members = old.replace(r#""src": ["group:b"]"#, r#""src": ["autogroup:members"]"#);
    same_read(
        &members.replace(
            r#""src": "user1@example.com""#,
            r#""src": "user1@example.com", "srcPostureAttrs": {}, "deny": ["autogroup:member:22"]"#,
        ),
        &members,
    );
    // A warning in a section the edit leaves alone.
    let warned = old.replace(
        r#""dst": ["tag:web:80"]}]"#,
        r#""dst": ["tag:web:80"]}, {"action": "accept", "src": ["group:a"], "dst": []}]"#,
    );
    same_read(&warned.replace("user2@", "user4@"), &warned);
}
