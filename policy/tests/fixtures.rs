//! Handwritten policy files in the shapes people write (`tests/policies/valid`) must be
//! accepted; each file of `tests/policies/invalid` must be refused with the words its first
//! line names (`// expect: ...`) and a position inside the file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/policies")
        .join(dir);
    let mut v: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hujson"))
        .collect();
    v.sort();
    assert!(v.len() >= 8, "too few fixtures in {}", root.display());
    v
}

#[test]
fn valid_policies_are_accepted() {
    for f in files("valid") {
        let text = fs::read_to_string(&f).unwrap();
        if let Err(e) = netmap_policy::parse_policy(&text) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn invalid_policies_are_refused_with_their_reason() {
    let mut failures = Vec::new();
    for f in files("invalid") {
        let text = fs::read_to_string(&f).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("// expect: "))
            .unwrap_or_else(|| panic!("{}: no // expect: line", f.display()));
        match netmap_policy::parse_policy(&text) {
            Ok(_) => failures.push(format!("{}: accepted, want {want:?}", f.display())),
            Err(e) => {
                let msg = e.to_string();
                let lines = text.lines().count() as u32;
                if !msg.contains(want) {
                    failures.push(format!("{}: {msg}\n  want: {want}", f.display()));
                } else if !(1..=lines).contains(&e.pos().line) {
                    failures.push(format!("{}: position {:?} outside", f.display(), e.pos()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
