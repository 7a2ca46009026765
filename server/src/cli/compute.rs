//! `netmap compute`.

use std::path::PathBuf;
use std::process::ExitCode;

use netmap_core::CoreError;

/// Arguments of `netmap compute`.
#[derive(Debug, clap::Args)]
pub struct ComputeArgs {
    /// The policy file (HuJSON).
    #[arg(long)]
    policy: PathBuf,
    /// The tailnet state file.
    #[arg(long)]
    state: PathBuf,
    /// Only these nodes (repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Print per-node counts instead of the views.
    #[arg(long)]
    summary: bool,
}

pub fn run(a: &ComputeArgs) -> ExitCode {
    let (policy, tailnet, report) = match super::policy::load_checked(&a.policy, Some(&a.state)) {
        Ok((p, Some(t), r)) => (p, t, r),
        Ok(_) => return ExitCode::from(2),
        Err(f) => return f.report(),
    };
    if !report.passed() {
        errln!("{}: {}", a.policy.display(), CoreError::TestsFailed(report));
        return ExitCode::from(1);
    }
    for n in &a.nodes {
        if !tailnet.nodes.contains_key(n) {
            errln!("--node {n:?}: no such node in {}", a.state.display());
            return ExitCode::from(2);
        }
    }
    drop(policy);
    // The views come from the engine (the policy was checked above, tests included).
    let engine = match super::read_file(&a.policy)
        .and_then(|text| netmap_core::Engine::restore(&text, tailnet).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(e) => {
            errln!("{}: {e}", a.policy.display());
            return ExitCode::from(1);
        }
    };
    let snapshot = engine.snapshot();
    let mut out = serde_json::Map::new();
    for (name, view) in snapshot.views() {
        if !a.nodes.is_empty() && !a.nodes.iter().any(|n| n == name) {
            continue;
        }
        let v = if a.summary {
            serde_json::json!({
                "packet_filter_rules": view.packet_filter.len(),
                "peers": view.peers.len(),
                "ssh_rules": view.ssh_rules.len(),
                "cap_map": view.cap_map.len(),
            })
        } else {
            match serde_json::to_value(view) {
                Ok(v) => v,
                Err(e) => {
                    errln!("{e}");
                    return ExitCode::from(1);
                }
            }
        };
        out.insert(name.to_string(), v);
    }
    let doc = serde_json::json!({ "nodes": out });
    outln!("{doc}");
    ExitCode::SUCCESS
}
