//! `netmap preauthkey`: create and list pre-auth keys of `netmap serve` (works on the data
//! directory, with or without the server running).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::control::preauth::{self, PreauthError, PreauthSpec};
use crate::serve::store::Store;

/// `netmap preauthkey` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PreauthkeyCommand {
    /// Create a key and print it once on stdout (only its hash is stored).
    Create {
        /// Data directory of the server.
        #[arg(long, env = "NETMAP_DATA")]
        data: PathBuf,
        /// The tailnet the machines join.
        #[arg(long)]
        tailnet: String,
        /// The user that owns the machines' nodes.
        #[arg(long, conflicts_with = "tags", required_unless_present = "tags")]
        user: Option<String>,
        /// ACL tags of the nodes, comma-separated (`tag:a,tag:b`).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// The key registers any number of machines (default: one).
        #[arg(long)]
        reusable: bool,
        /// Nodes are removed when they disconnect.
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime, e.g. 1h, 90d (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (ids, scopes, use counts; never the keys) as JSON lines.
    List {
        /// Data directory of the server.
        #[arg(long, env = "NETMAP_DATA")]
        data: PathBuf,
        /// Only this tailnet's keys.
        #[arg(long)]
        tailnet: Option<String>,
    },
}

fn open(data: &std::path::Path) -> Result<Store, ExitCode> {
    Store::open(data).map_err(|e| {
        errln!("netmap preauthkey: {e}");
        ExitCode::from(1)
    })
}

/// Runs a subcommand.
pub fn run(cmd: &PreauthkeyCommand) -> ExitCode {
    use std::io::Write;
    match cmd {
        PreauthkeyCommand::Create {
            data,
            tailnet,
            user,
            tags,
            reusable,
            ephemeral,
            expires,
        } => {
            let store = match open(data) {
                Ok(s) => s,
                Err(c) => return c,
            };
            let spec = PreauthSpec {
                user: user.clone(),
                tags: tags.clone(),
                reusable: *reusable,
                ephemeral: *ephemeral,
                expires: expires.clone(),
            };
            match preauth::create(&store, tailnet, &spec) {
                Ok((key, _)) => {
                    let _ = writeln!(std::io::stdout(), "{key}");
                    ExitCode::SUCCESS
                }
                Err(PreauthError::Invalid(m)) => {
                    errln!("netmap preauthkey: {m}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    errln!("netmap preauthkey: {e}");
                    ExitCode::from(1)
                }
            }
        }
        PreauthkeyCommand::List { data, tailnet } => {
            let store = match open(data) {
                Ok(s) => s,
                Err(c) => return c,
            };
            match store.list_preauth(tailnet.as_deref()) {
                Ok(rows) => {
                    let mut out = std::io::stdout().lock();
                    for r in rows {
                        if writeln!(out, "{}", preauth::row_json(&r)).is_err() {
                            break;
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    errln!("netmap preauthkey: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
