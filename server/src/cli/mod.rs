//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apikey;
mod compute;
mod conformance;
mod policy;
mod preauthkey;
mod replay;
mod serve;

/// netmap: compute what every node of a Tailscale tailnet receives from a policy file.
#[derive(Debug, Parser)]
#[command(name = "netmap", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and test policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Compute every node's view (packet filter, peers, SSH rules, capabilities) as JSON.
    Compute(compute::ComputeArgs),
    /// Judge every conformance case in DIR as judge.py does; print `N passed, M failed`.
    Conformance(conformance::ConformanceArgs),
    /// Apply a change stream (NDJSON) through the engine, timing each change against a full
    /// build; --verify checks every step. Exit 0 ok, 1 divergence, 2 bad input.
    Replay(replay::ReplayArgs),
    /// Run the HTTP server: many tailnets, durable store, netmap streams (see docs/serve.md).
    Serve(serve::ServeArgs),
    /// Manage API keys of `netmap serve`.
    Apikey {
        #[command(subcommand)]
        command: apikey::ApikeyCommand,
    },
    /// Manage pre-auth keys with which Tailscale clients join a tailnet of `netmap serve`.
    Preauthkey {
        #[command(subcommand)]
        command: preauthkey::PreauthkeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy; with --state, also run its tests. Exit 0 valid, 1 invalid, 2 usage.
    Check {
        /// The policy file (HuJSON).
        policy: PathBuf,
        /// A tailnet state file (users, nodes, tailnet) to run the tests against.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Run the policy's `tests` and `sshTests`. Exit 0 all pass, 1 a test failed or invalid.
    Test {
        /// The policy file (HuJSON).
        policy: PathBuf,
        /// The tailnet state file.
        #[arg(long)]
        state: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = policy::Format::Text)]
        format: policy::Format,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Policy { command } => match command {
            PolicyCommand::Check { policy, state } => policy::check(&policy, state.as_deref()),
            PolicyCommand::Test {
                policy,
                state,
                format,
            } => policy::test(&policy, &state, format),
        },
        Command::Compute(args) => compute::run(&args),
        Command::Conformance(args) => conformance::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Apikey { command } => apikey::run(&command),
        Command::Preauthkey { command } => preauthkey::run(&command),
    }
}

/// Reads a file, mapping errors to a message naming the file.
pub(crate) fn read_file(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
