//! The `netmap` command.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod control;
mod serve;

/// mimalloc instead of the system allocator: the engine allocates and frees many small,
/// short-lived values per change, and glibc's fastbin consolidation made their cost erratic.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    cli::run(args)
}
