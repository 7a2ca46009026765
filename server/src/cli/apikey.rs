//! `netmap apikey`: create, list and revoke API keys of `netmap serve`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::serve::config::parse_duration;
use crate::serve::keys::create_key;
use crate::serve::store::Store;

/// `netmap apikey` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ApikeyCommand {
    /// Create a key and print it once (only its hash is stored).
    Create {
        /// Data directory of the server.
        #[arg(long, env = "NETMAP_DATA")]
        data: PathBuf,
        /// Scope the key to this tailnet (default: an admin key for every tailnet).
        #[arg(long)]
        tailnet: Option<String>,
        /// Lifetime, e.g. 90d, 12h (default: no expiry).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List keys (ids, scopes, expiry; never the keys).
    List {
        /// Data directory of the server.
        #[arg(long, env = "NETMAP_DATA")]
        data: PathBuf,
    },
    /// Revoke a key by id (takes effect within 5 s on a running server).
    Revoke {
        /// Data directory of the server.
        #[arg(long, env = "NETMAP_DATA")]
        data: PathBuf,
        /// The key id (as `list` prints it).
        id: String,
    },
}

fn open(data: &std::path::Path) -> Result<Store, ExitCode> {
    Store::open(data).map_err(|e| {
        errln!("netmap apikey: {e}");
        ExitCode::from(1)
    })
}

pub fn run(cmd: &ApikeyCommand) -> ExitCode {
    match cmd {
        ApikeyCommand::Create {
            data,
            tailnet,
            expires,
        } => {
            let expires = match expires.as_deref().map(parse_duration).transpose() {
                Ok(d) => d,
                Err(e) => {
                    errln!("netmap apikey: --expires: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(t) = tailnet {
                if !crate::serve::tailnets::valid_name(t) {
                    errln!("netmap apikey: invalid tailnet name {t:?}");
                    return ExitCode::from(2);
                }
            }
            let store = match open(data) {
                Ok(s) => s,
                Err(c) => return c,
            };
            match create_key(&store, tailnet.clone(), expires) {
                Ok((key, row)) => {
                    let scope = row.tailnet.as_deref().unwrap_or("admin (all tailnets)");
                    errln!("created key {} for {scope}; it is shown only once:", row.id);
                    outln!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    errln!("netmap apikey: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ApikeyCommand::List { data } => {
            let store = match open(data) {
                Ok(s) => s,
                Err(c) => return c,
            };
            match store.list_keys() {
                Ok(keys) => {
                    for k in keys {
                        outln!(
                            "{}\t{}\tcreated={}\texpires={}",
                            k.id,
                            k.tailnet.as_deref().unwrap_or("admin"),
                            k.created,
                            k.expires.map_or("never".to_string(), |e| e.to_string())
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    errln!("netmap apikey: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ApikeyCommand::Revoke { data, id } => {
            let store = match open(data) {
                Ok(s) => s,
                Err(c) => return c,
            };
            match store.revoke_key(id) {
                Ok(true) => {
                    errln!("revoked key {id}");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    errln!("netmap apikey: no key {id:?}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    errln!("netmap apikey: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
