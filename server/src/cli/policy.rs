//! `netmap policy check` and `netmap policy test`.

use std::path::Path;
use std::process::ExitCode;

use netmap_core::{CoreError, Tailnet, TestReport};

use super::read_file;

/// Output format of `policy test`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// A line per check, for people.
    Text,
    /// The report as JSON.
    Json,
}

/// Reads, validates and (with a state) tests a policy; returns the policy and tailnet.
pub(crate) fn load_checked(
    policy_path: &Path,
    state_path: Option<&Path>,
) -> Result<(netmap_policy::Policy, Option<Tailnet>, TestReport), String> {
    let text = read_file(policy_path)?;
    let policy = netmap_policy::parse_policy(&text)
        .map_err(|e| format!("{}: {e}", policy_path.display()))?;
    let Some(sp) = state_path else {
        return Ok((policy, None, TestReport::default()));
    };
    let tailnet =
        Tailnet::from_state_json(&read_file(sp)?).map_err(|e| format!("{}: {e}", sp.display()))?;
    netmap_core::check_policy_for_tailnet(&policy, &tailnet)
        .map_err(|e| format!("{}: {e}", policy_path.display()))?;
    let report = netmap_core::run_tests(&policy, &tailnet);
    Ok((policy, Some(tailnet), report))
}

fn print_report(report: &TestReport) {
    for o in &report.outcomes {
        let status = if o.passed { "PASS" } else { "FAIL" };
        println!(
            "{status} {}[{}] src={} {} {} {}: {}",
            o.kind, o.index, o.src, o.expect, o.dst, o.what, o.reason
        );
    }
    let failed = report.outcomes.iter().filter(|o| !o.passed).count();
    println!(
        "{} passed, {} failed",
        report.outcomes.len() - failed,
        failed
    );
}

pub fn check(policy: &Path, state: Option<&Path>) -> ExitCode {
    match load_checked(policy, state) {
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Ok((_, _, report)) if !report.passed() => {
            eprintln!(
                "{}: {}",
                policy.display(),
                CoreError::TestsFailed(report.clone())
            );
            print_report(&report);
            ExitCode::from(1)
        }
        Ok((p, _, _)) => {
            print_warnings(policy, &p);
            println!("{}: valid", policy.display());
            ExitCode::SUCCESS
        }
    }
}

/// Accepted-but-odd points of a valid policy, on stderr.
fn print_warnings(path: &Path, p: &netmap_policy::Policy) {
    for w in &p.warnings {
        eprintln!(
            "{}: warning: {} (at {}, line {}, column {})",
            path.display(),
            w.message,
            w.path,
            w.pos.line,
            w.pos.column
        );
    }
}

pub fn test(policy: &Path, state: &Path, format: Format) -> ExitCode {
    match load_checked(policy, Some(state)) {
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Ok((_, _, report)) => {
            match format {
                Format::Text => print_report(&report),
                Format::Json => match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("{e}"),
                },
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
