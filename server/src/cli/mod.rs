//! Command-line interface.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

/// `println!` that never panics: once the reader of stdout has gone (`netmap compute | head`),
/// further output is dropped and the command finishes with its usual exit code.
macro_rules! outln {
    () => {
        $crate::cli::write_line(false, format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::cli::write_line(false, format_args!($($t)*))
    };
}

/// `eprintln!` that never panics (a closed stderr drops the message).
macro_rules! errln {
    ($($t:tt)*) => {
        $crate::cli::write_line(true, format_args!($($t)*))
    };
}

mod apikey;
mod backup;
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
    /// Copy the server's database to a file while the server runs (SQLite online backup).
    Backup(backup::BackupArgs),
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
        Command::Backup(args) => backup::run(&args),
        Command::Apikey { command } => apikey::run(&command),
        Command::Preauthkey { command } => preauthkey::run(&command),
    }
}

/// Set once stdout's reader has gone.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout (or stderr) without panicking: a closed pipe ends output quietly.
pub(crate) fn write_line(to_stderr: bool, args: std::fmt::Arguments<'_>) {
    if to_stderr {
        let mut e = std::io::stderr().lock();
        let _ = e.write_fmt(args).and_then(|()| e.write_all(b"\n"));
        return;
    }
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush());
    if r.is_err() {
        // EPIPE or any other write failure: nobody reads what follows.
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Why a command could not do its work, with its exit code.
#[derive(Debug)]
pub(crate) struct Failed {
    /// 2 for usage errors (bad arguments, missing or unreadable files), 1 for invalid input
    /// (a policy or state that is rejected) and failed checks.
    pub code: u8,
    /// The message for stderr.
    pub message: String,
}

impl Failed {
    /// An invalid input (exit 1).
    pub(crate) fn invalid(message: String) -> Failed {
        Failed { code: 1, message }
    }

    /// Prints the message and gives the exit code.
    pub(crate) fn report(self) -> ExitCode {
        errln!("{}", self.message);
        ExitCode::from(self.code)
    }
}

/// Reads an input file; failing to read it is a usage error (exit 2) naming the file.
pub(crate) fn read_input(path: &std::path::Path) -> Result<String, Failed> {
    read_file(path).map_err(|message| Failed { code: 2, message })
}

/// Reads a file, mapping errors to a message naming the file.
pub(crate) fn read_file(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
