//! Configuration of `netmap serve`: defaults, then the TOML file, then `NETMAP_*` environment
//! variables, then command-line flags (each overriding the one before).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting has an invalid value.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        /// The setting (file key or environment variable).
        key: String,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No data directory was given.
    #[error("no data directory: pass --data DIR, set NETMAP_DATA or `data` in the config file")]
    NoData,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Resource limits and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A client must send a request's complete headers within this time (slowloris cut-off);
    /// it also bounds the wait for the next request on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request body in bytes (except policies and imports).
    pub max_body_bytes: usize,
    /// Largest policy body in bytes.
    pub max_policy_bytes: usize,
    /// Largest bulk import (`PUT .../state`) body in bytes.
    pub max_import_bytes: usize,
    /// Requests handled at once (server-wide); others wait up to `queue_timeout`, then 503.
    pub max_concurrency: usize,
    /// How long a request may wait for a concurrency slot.
    pub queue_timeout: Duration,
    /// Open TCP connections; further connections are closed at once.
    pub max_connections: usize,
    /// Sustained requests per second per API key (token bucket refill rate).
    pub rate_per_sec: f64,
    /// Burst size per API key (token bucket capacity).
    pub rate_burst: f64,
    /// Open netmap streams (server-wide, below `max_connections`); further stream requests get
    /// 503.
    pub max_streams: usize,
    /// Time a request body may take before `body_min_rate` allowances (else 408).
    pub body_read_timeout: Duration,
    /// Bytes per second a request body must keep up: each `body_min_rate` bytes received
    /// extend its deadline by a second.
    pub body_min_rate: u64,
    /// Open TCP connections per client IP; further connections are closed at once. (This and
    /// the per-IP and per-key stream caps are lowered to the server-wide caps.)
    pub max_connections_per_ip: usize,
    /// Open netmap streams per client IP (429 beyond).
    pub max_streams_per_ip: usize,
    /// Open netmap streams per API key (429 beyond).
    pub max_streams_per_key: usize,
    /// Requests of one API key in progress at once, bodies being read included (429 beyond).
    pub max_requests_per_key: usize,
    /// Look-ups of API keys that are not cached (new, unknown, invalid) per client IP and
    /// second ...
    pub auth_rate_per_ip: f64,
    /// ... and their burst; beyond that 429 without a look-up.
    pub auth_burst_per_ip: f64,
    /// Most nodes one tailnet may hold (node PUT 409, import 400 beyond).
    pub max_nodes_per_tailnet: usize,
    /// Change sets buffered per tailnet for streams; a stream further behind is resynced with a
    /// fresh full view.
    pub stream_buffer: usize,
    /// Keep-alive line interval on streams (at most 30 s).
    pub stream_keepalive: Duration,
    /// Writes queued per tailnet before new writes get 503.
    pub write_queue: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            max_policy_bytes: 1024 * 1024,
            max_import_bytes: 64 * 1024 * 1024,
            max_concurrency: 512,
            queue_timeout: Duration::from_secs(5),
            max_connections: 4096,
            rate_per_sec: 100.0,
            rate_burst: 200.0,
            max_streams: 2048,
            body_read_timeout: Duration::from_secs(10),
            body_min_rate: 16 * 1024,
            max_connections_per_ip: 1024,
            max_streams_per_ip: 1024,
            max_streams_per_key: 1024,
            max_requests_per_key: 64,
            auth_rate_per_ip: 10.0,
            auth_burst_per_ip: 50.0,
            max_nodes_per_tailnet: 100_000,
            stream_buffer: 256,
            stream_keepalive: Duration::from_secs(15),
            write_queue: 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory (holds `netmap.db`).
    pub data: PathBuf,
    /// Log filter (`info`, `debug`, `netmap=debug,warn`, ...).
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Start even when the database holds fewer commits than were acknowledged (after the
    /// operator decided to go on with what it holds); flag only.
    pub accept_data_loss: bool,
}

/// The config file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_body_bytes: Option<usize>,
    max_policy_bytes: Option<usize>,
    max_import_bytes: Option<usize>,
    max_concurrency: Option<usize>,
    queue_timeout: Option<String>,
    max_connections: Option<usize>,
    rate_per_sec: Option<f64>,
    rate_burst: Option<f64>,
    max_streams: Option<usize>,
    body_read_timeout: Option<String>,
    body_min_rate: Option<u64>,
    max_connections_per_ip: Option<usize>,
    max_streams_per_ip: Option<usize>,
    max_streams_per_key: Option<usize>,
    max_requests_per_key: Option<usize>,
    auth_rate_per_ip: Option<f64>,
    auth_burst_per_ip: Option<f64>,
    max_nodes_per_tailnet: Option<usize>,
    stream_buffer: Option<usize>,
    stream_keepalive: Option<String>,
    write_queue: Option<usize>,
    drain_timeout: Option<String>,
}

/// Settings given on the command line (highest precedence; clap also fills these from
/// `NETMAP_LISTEN`, `NETMAP_DATA`, `NETMAP_LOG_LEVEL` and `NETMAP_LOG_FORMAT`).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--accept-data-loss`.
    pub accept_data_loss: bool,
}

/// Parses a duration with `humantime`: `500ms`, `10s`, `5m`, `2h`, `90d`, `1w`, `1h 30m`; a
/// bare whole number is seconds. At most 100 years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s:?}: {e}"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("{s:?}: {e} (write e.g. 500ms, 10s, 5m, 2h, 90d)"))?
    };
    if d > Duration::from_secs(100 * 365 * 86_400) {
        return Err(format!("{s:?}: longer than 100 years"));
    }
    Ok(d)
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn dur(key: &str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).map_err(|e| invalid(key, v, e))
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| invalid(key, v, "not a valid number"))
}

impl Config {
    /// Loads the configuration: defaults < `file` < environment (`env`, e.g. `std::env::vars`)
    /// < `overrides`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: Overrides,
    ) -> Result<Config, ConfigError> {
        let fc = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let mut listen = fc.listen.unwrap_or_else(|| "127.0.0.1:8080".to_string());
        let mut data = fc.data;
        let mut log_level = fc.log_level.unwrap_or_else(|| "info".to_string());
        let mut log_format = fc.log_format.unwrap_or(LogFormat::Text);
        let mut l = Limits::default();
        let fl = fc.limits;
        macro_rules! file_dur {
            ($f:ident) => {
                if let Some(v) = &fl.$f {
                    l.$f = dur(concat!("limits.", stringify!($f)), v)?;
                }
            };
        }
        macro_rules! file_val {
            ($f:ident) => {
                if let Some(v) = fl.$f {
                    l.$f = v;
                }
            };
        }
        file_dur!(header_read_timeout);
        file_dur!(idle_timeout);
        file_dur!(queue_timeout);
        file_dur!(stream_keepalive);
        file_dur!(drain_timeout);
        file_dur!(body_read_timeout);
        file_val!(body_min_rate);
        file_val!(max_connections_per_ip);
        file_val!(max_streams_per_ip);
        file_val!(max_streams_per_key);
        file_val!(max_requests_per_key);
        file_val!(auth_rate_per_ip);
        file_val!(auth_burst_per_ip);
        file_val!(max_nodes_per_tailnet);
        file_val!(max_body_bytes);
        file_val!(max_policy_bytes);
        file_val!(max_import_bytes);
        file_val!(max_concurrency);
        file_val!(max_connections);
        file_val!(rate_per_sec);
        file_val!(rate_burst);
        file_val!(max_streams);
        file_val!(stream_buffer);
        file_val!(write_queue);

        for (k, v) in env {
            let Some(name) = k.strip_prefix("NETMAP_") else {
                continue;
            };
            match name {
                "LISTEN" => listen = v,
                "DATA" => data = Some(PathBuf::from(v)),
                "LOG_LEVEL" => log_level = v,
                "LOG_FORMAT" => {
                    log_format = match v.as_str() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        _ => return Err(invalid(&k, &v, "expected text or json")),
                    }
                }
                "HEADER_READ_TIMEOUT" => l.header_read_timeout = dur(&k, &v)?,
                "IDLE_TIMEOUT" => l.idle_timeout = dur(&k, &v)?,
                "QUEUE_TIMEOUT" => l.queue_timeout = dur(&k, &v)?,
                "STREAM_KEEPALIVE" => l.stream_keepalive = dur(&k, &v)?,
                "DRAIN_TIMEOUT" => l.drain_timeout = dur(&k, &v)?,
                "MAX_BODY_BYTES" => l.max_body_bytes = num(&k, &v)?,
                "MAX_POLICY_BYTES" => l.max_policy_bytes = num(&k, &v)?,
                "MAX_IMPORT_BYTES" => l.max_import_bytes = num(&k, &v)?,
                "MAX_CONCURRENCY" => l.max_concurrency = num(&k, &v)?,
                "MAX_CONNECTIONS" => l.max_connections = num(&k, &v)?,
                "RATE_PER_SEC" => l.rate_per_sec = num(&k, &v)?,
                "RATE_BURST" => l.rate_burst = num(&k, &v)?,
                "MAX_STREAMS" => l.max_streams = num(&k, &v)?,
                "STREAM_BUFFER" => l.stream_buffer = num(&k, &v)?,
                "WRITE_QUEUE" => l.write_queue = num(&k, &v)?,
                "BODY_READ_TIMEOUT" => l.body_read_timeout = dur(&k, &v)?,
                "BODY_MIN_RATE" => l.body_min_rate = num(&k, &v)?,
                "MAX_CONNECTIONS_PER_IP" => l.max_connections_per_ip = num(&k, &v)?,
                "MAX_STREAMS_PER_IP" => l.max_streams_per_ip = num(&k, &v)?,
                "MAX_STREAMS_PER_KEY" => l.max_streams_per_key = num(&k, &v)?,
                "MAX_REQUESTS_PER_KEY" => l.max_requests_per_key = num(&k, &v)?,
                "AUTH_RATE_PER_IP" => l.auth_rate_per_ip = num(&k, &v)?,
                "AUTH_BURST_PER_IP" => l.auth_burst_per_ip = num(&k, &v)?,
                "MAX_NODES_PER_TAILNET" => l.max_nodes_per_tailnet = num(&k, &v)?,
                _ => {}
            }
        }
        if let Some(v) = overrides.listen {
            listen = v;
        }
        if let Some(v) = overrides.data {
            data = Some(v);
        }
        if let Some(v) = overrides.log_level {
            log_level = v;
        }
        if let Some(v) = overrides.log_format {
            log_format = v;
        }
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| invalid("listen", &listen, "expected HOST:PORT, e.g. 127.0.0.1:8080"))?;
        let data = data.ok_or(ConfigError::NoData)?;
        // Per-client caps never exceed the server-wide ones.
        l.max_connections_per_ip = l.max_connections_per_ip.min(l.max_connections);
        l.max_streams_per_ip = l.max_streams_per_ip.min(l.max_streams);
        l.max_streams_per_key = l.max_streams_per_key.min(l.max_streams);
        l.validate()?;
        Ok(Config {
            listen,
            data,
            log_level,
            log_format,
            limits: l,
            accept_data_loss: overrides.accept_data_loss,
        })
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_policy_bytes", self.max_policy_bytes),
            ("max_import_bytes", self.max_import_bytes),
            ("max_concurrency", self.max_concurrency),
            ("max_connections", self.max_connections),
            ("max_streams", self.max_streams),
            ("stream_buffer", self.stream_buffer),
            ("write_queue", self.write_queue),
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("max_streams_per_ip", self.max_streams_per_ip),
            ("max_streams_per_key", self.max_streams_per_key),
            ("max_requests_per_key", self.max_requests_per_key),
            ("max_nodes_per_tailnet", self.max_nodes_per_tailnet),
            (
                "body_min_rate",
                usize::try_from(self.body_min_rate).unwrap_or(usize::MAX),
            ),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(invalid(k, "0", "must be at least 1"));
            }
        }
        // A stream holds a connection: streams alone must not be able to take every one.
        if self.max_streams >= self.max_connections {
            return Err(invalid(
                "max_streams",
                &self.max_streams.to_string(),
                format!(
                    "must be below max_connections ({}), so that API calls still get a connection",
                    self.max_connections
                ),
            ));
        }
        if !(self.auth_rate_per_ip > 0.0 && self.auth_burst_per_ip >= 1.0) {
            return Err(invalid(
                "auth_rate_per_ip/auth_burst_per_ip",
                &format!("{}/{}", self.auth_rate_per_ip, self.auth_burst_per_ip),
                "rate must be > 0 and burst >= 1",
            ));
        }
        if self.body_read_timeout.is_zero() {
            return Err(invalid("body_read_timeout", "0", "must be positive"));
        }
        if self.rate_per_sec.is_nan()
            || self.rate_per_sec <= 0.0
            || self.rate_burst.is_nan()
            || self.rate_burst < 1.0
        {
            return Err(invalid(
                "rate_per_sec/rate_burst",
                &format!("{}/{}", self.rate_per_sec, self.rate_burst),
                "rate must be > 0 and burst >= 1",
            ));
        }
        if self.stream_keepalive.is_zero() || self.stream_keepalive > Duration::from_secs(30) {
            return Err(invalid(
                "stream_keepalive",
                &format!("{:?}", self.stream_keepalive),
                "must be between 1ms and 30s",
            ));
        }
        if self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(invalid(
                "header_read_timeout/idle_timeout",
                "0",
                "must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("1w").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        for bad in [
            "10 parsecs",
            "",
            "-5s",
            "1e400s",
            "99999999999999999999d",
            "5 s s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn precedence_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("netmap-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1\"\ndata = \"/a\"\n[limits]\nheader_read_timeout = \"3s\"\nmax_streams = 5\n",
        )
        .unwrap();
        let env = vec![
            ("NETMAP_MAX_STREAMS".to_string(), "7".to_string()),
            ("NETMAP_DATA".to_string(), "/b".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let c = Config::load(
            Some(&f),
            env,
            Overrides {
                listen: Some("127.0.0.1:2".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data, PathBuf::from("/b"));
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.limits.max_streams, 7);
        let too_many = vec![("NETMAP_MAX_STREAMS".to_string(), "5000".to_string())];
        let e = Config::load(
            None,
            too_many,
            Overrides {
                data: Some("/d".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        std::fs::write(&f, "bogus = 1\n").unwrap();
        assert!(Config::load(Some(&f), vec![], Overrides::default()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
