//! `netmap policy check` and `netmap policy test`.

use std::path::Path;
use std::process::ExitCode;

use netmap_core::{CoreError, Tailnet, TestReport};

use super::{read_input, Failed};

/// Output format of `policy test`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// A line per check, for people.
    Text,
    /// The report as JSON.
    Json,
}

/// Reads, validates and (with a state) tests a policy; returns the policy and tailnet. An
/// unreadable file is a usage error (exit 2); a rejected policy or state exits 1.
pub(crate) fn load_checked(
    policy_path: &Path,
    state_path: Option<&Path>,
) -> Result<(netmap_policy::Policy, Option<Tailnet>, TestReport), Failed> {
    let text = read_input(policy_path)?;
    let state_text = state_path.map(read_input).transpose()?;
    let policy = netmap_policy::parse_policy(&text)
        .map_err(|e| Failed::invalid(format!("{}: {e}", policy_path.display())))?;
    let (Some(sp), Some(state_text)) = (state_path, state_text) else {
        return Ok((policy, None, TestReport::default()));
    };
    let tailnet = Tailnet::from_state_json(&state_text)
        .map_err(|e| Failed::invalid(format!("{}: {e}", sp.display())))?;
    netmap_core::check_policy_for_tailnet(&policy, &tailnet)
        .map_err(|e| Failed::invalid(format!("{}: {e}", policy_path.display())))?;
    let report = netmap_core::run_tests(&policy, &tailnet);
    Ok((policy, Some(tailnet), report))
}

fn print_report(report: &TestReport) {
    for o in &report.outcomes {
        let status = if o.passed { "PASS" } else { "FAIL" };
        outln!("{status} {o}");
    }
    let failed = report.outcomes.iter().filter(|o| !o.passed).count();
    outln!(
        "{} passed, {} failed",
        report.outcomes.len() - failed,
        failed
    );
}

pub fn check(policy: &Path, state: Option<&Path>) -> ExitCode {
    match load_checked(policy, state) {
        Err(f) => f.report(),
        Ok((_, _, report)) if !report.passed() => {
            errln!(
                "{}: {}",
                policy.display(),
                CoreError::TestsFailed(report.clone())
            );
            print_report(&report);
            ExitCode::from(1)
        }
        Ok((p, _, _)) => {
            print_warnings(policy, &p);
            outln!("{}: valid", policy.display());
            ExitCode::SUCCESS
        }
    }
}

/// Accepted-but-odd points of a valid policy, on stderr.
fn print_warnings(path: &Path, p: &netmap_policy::Policy) {
    for w in &p.warnings {
        errln!(
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
        Err(f) => f.report(),
        Ok((_, _, report)) => {
            match format {
                Format::Text => print_report(&report),
                Format::Json => match serde_json::to_string_pretty(&report) {
                    Ok(s) => outln!("{s}"),
                    Err(e) => errln!("{e}"),
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
