//! `netmap backup`: a consistent copy of a server's database, taken while it runs.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::serve::store::Store;

/// Arguments of `netmap backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Data directory of the server (holds netmap.db).
    #[arg(long, env = "NETMAP_DATA")]
    data: PathBuf,
    /// The file to write (replaced atomically when the copy is complete and checked).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: &BackupArgs) -> ExitCode {
    match Store::backup(&a.data, &a.out) {
        Ok(info) => {
            outln!(
                "{}: {} tailnets, {} API keys, commit {}, {} bytes; integrity ok",
                a.out.display(),
                info.tailnets,
                info.keys,
                info.commits,
                info.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("netmap backup: {e}");
            ExitCode::from(1)
        }
    }
}
