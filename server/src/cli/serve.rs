//! `netmap serve`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::serve::config::{Config, LogFormat, Overrides};

/// Arguments of `netmap serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free port).
    #[arg(long, env = "NETMAP_LISTEN")]
    listen: Option<String>,
    /// Data directory (the SQLite store `netmap.db` lives there).
    #[arg(long, env = "NETMAP_DATA")]
    data: Option<PathBuf>,
    /// TOML config file (see docs/serve.md); flags and NETMAP_* variables override it.
    #[arg(long, env = "NETMAP_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or tracing directives.
    #[arg(long, env = "NETMAP_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "NETMAP_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Start although the database holds fewer commits than were acknowledged (a deleted or
    /// truncated WAL, an old copy of netmap.db): go on with what it holds.
    #[arg(long)]
    accept_data_loss: bool,
}

pub fn run(a: &ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: a.listen.clone(),
        data: a.data.clone(),
        log_level: a.log_level.clone(),
        log_format: a.log_format,
        accept_data_loss: a.accept_data_loss,
    };
    let cfg = match Config::load(a.config.as_deref(), std::env::vars(), overrides) {
        Ok(c) => c,
        Err(e) => {
            errln!("netmap serve: {e}");
            return ExitCode::from(2);
        }
    };
    match crate::serve::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("netmap serve: {e}");
            ExitCode::from(1)
        }
    }
}
