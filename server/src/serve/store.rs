//! The durable store: one SQLite database (WAL, `synchronous=FULL`) in the data directory with
//! tailnets, their policy text, users, nodes, the history-dependent state (MagicDNS names and
//! primary routers) and API keys (hashed).
//!
//! Beside the database:
//! - `netmap.lock`: held (an exclusive OS file lock) by the one server using the directory; it
//!   names its holder (pid, host, start time).
//! - `netmap.commits`: the number of the last acknowledged commit, rewritten after every commit
//!   (no fsync: it survives a crash of the process, not always one of the machine). On start the
//!   server compares it with the counter inside the database: a database that holds fewer
//!   commits than were acknowledged lost them (a deleted or truncated `netmap.db-wal`, an old
//!   copy of `netmap.db`), and the server says so instead of starting without them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use imbl::ordmap::DiffItem;
use imbl::OrdMap;
use ipnet::IpNet;
use netmap_core::{Node, Tailnet, TailnetSettings, User};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

mod control;
pub use control::{MachineRow, PreauthRow};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored row could not be decoded.
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The data directory could not be created.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A lock was poisoned by a panicking thread.
    #[error("store lock poisoned")]
    Poisoned,
    /// A value could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// Another server holds the data directory.
    #[error("data directory {dir} is in use by another netmap server ({holder}); stop it first or use another --data")]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error("{path}: cannot lock: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database holds fewer commits than were acknowledged.
    #[error("{db} holds {found} commits but {recorded} were acknowledged (recorded in {marker}): the last {} are missing. {wal}. Restore the data directory from a backup (`netmap backup`), or start with --accept-data-loss to continue with what the database holds", recorded - found)]
    LostCommits {
        /// The database file.
        db: PathBuf,
        /// Commits in the database.
        found: u64,
        /// Commits acknowledged.
        recorded: u64,
        /// The commit marker file.
        marker: PathBuf,
        /// What can be seen of the WAL file.
        wal: String,
    },
    /// The database does not exist (backup of a directory without one).
    #[error("{0}: no database here")]
    Missing(PathBuf),
}

/// A tailnet whose stored rows cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenRow {
    /// The tailnet.
    pub tailnet: String,
    /// The table of the first unreadable row.
    pub table: &'static str,
    /// The row's key (node or user name, prefix, ...).
    pub row: String,
    /// What is wrong with it.
    pub message: String,
    /// The tailnet's write counter, when its head row could be read.
    pub seq: u64,
    /// The tailnet's policy text, when its head row could be read.
    pub policy: Option<String>,
}

impl std::fmt::Display for BrokenRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "row {:?} of table {} cannot be read: {}",
            self.row, self.table, self.message
        )
    }
}

/// The exclusive lock on a data directory, held while the value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (creating it), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("netmap.lock");
        let lock_err = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "holder unknown".to_string()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = netmap_core::format_rfc3339(i64::try_from(now.as_secs()).unwrap_or(0), 0);
        let text = format!("pid {} on host {host}, since {since}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(lock_err)?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `netmap backup` copied.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// Tailnets in the copy.
    pub tailnets: u64,
    /// API keys in the copy.
    pub keys: u64,
    /// The commit counter of the copy.
    pub commits: u64,
    /// Size of the copy in bytes.
    pub bytes: u64,
}

/// A tailnet as stored.
#[derive(Debug, Clone)]
pub struct StoredTailnet {
    /// The tailnet's name (URL identifier).
    pub name: String,
    /// The policy text in force.
    pub policy: String,
    /// Writes applied so far.
    pub seq: u64,
    /// Users, nodes, settings, MagicDNS names and primaries.
    pub tailnet: Tailnet,
}

/// An API key as stored (the key itself is never stored, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// Short public identifier (a prefix of the key).
    pub id: String,
    /// The tailnet the key is scoped to; `None` for an admin key.
    pub tailnet: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// Expiry, seconds since the epoch.
    pub expires: Option<i64>,
}

/// The store. Writes go through one connection; key look-ups use a second one so that they do
/// not wait for a long write transaction (WAL lets them read concurrently).
#[derive(Debug)]
pub struct Store {
    write: Mutex<Connection>,
    read: Mutex<Connection>,
    path: PathBuf,
    /// `netmap.commits`, rewritten (under the write lock) after every commit.
    marker: Mutex<Option<File>>,
    marker_path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tailnets(
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    policy TEXT NOT NULL,
    seq INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS users(
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY(tailnet, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes(
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY(tailnet, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dns_names(
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY(tailnet, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS primaries(
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    prefix TEXT NOT NULL,
    node TEXT NOT NULL,
    PRIMARY KEY(tailnet, prefix)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_keys(
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tailnet TEXT,
    created INTEGER NOT NULL,
    expires INTEGER
);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1');
";

/// The schema version this build writes; `migrate` brings older data directories up to it.
const SCHEMA_VERSION: i64 = 2;

/// Upgrades the schema step by step (each step in one transaction), refusing a data directory
/// written by a newer netmap.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )?
        .parse()
        .map_err(|e| corrupt("meta", format!("schema_version: {e}")))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt {
            table: "meta",
            message: format!(
                "schema version {version} is newer than this netmap understands ({SCHEMA_VERSION}); use a newer netmap"
            ),
        });
    }
    if version < 2 {
        let tx = conn.transaction()?;
        tx.execute_batch(control::SCHEMA_V2)?;
        tx.execute(
            "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
            [],
        )?;
        tx.commit()?;
    }
    Ok(())
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn read_marker(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_commits(conn: &Connection) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'commits'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        message: e.to_string(),
    }
}

impl Store {
    /// Opens (creating when needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("netmap.db");
        let mut write = open_conn(&path)?;
        write.execute_batch(SCHEMA)?;
        migrate(&mut write)?;
        let read = open_conn(&path)?;
        let marker_path = dir.join("netmap.commits");
        let marker = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&marker_path)
            .map_err(|source| StoreError::Dir {
                path: marker_path.clone(),
                source,
            })?;
        Ok(Store {
            write: Mutex::new(write),
            read: Mutex::new(read),
            path,
            marker: Mutex::new(Some(marker)),
            marker_path,
        })
    }

    /// The commit counter inside the database.
    #[cfg(test)]
    pub fn commits(&self) -> Result<u64, StoreError> {
        read_commits(&*self.r()?)
    }

    /// The commit counter last written to `netmap.commits` (0 when there is none).
    #[cfg(test)]
    pub fn recorded_commits(&self) -> u64 {
        read_marker(&self.marker_path)
    }

    /// Compares the acknowledged commits (`netmap.commits`) with the database in `dir`, reading
    /// it without changing anything (call before [`open`](Self::open), with the directory
    /// locked): a shortfall is [`StoreError::LostCommits`], and the WAL is left as it is.
    pub fn check_commits(dir: &Path) -> Result<(), StoreError> {
        let db = dir.join("netmap.db");
        let marker = dir.join("netmap.commits");
        // The marker first: it is written after the database, so a commit made in between
        // cannot look lost.
        let recorded = read_marker(&marker);
        if recorded == 0 {
            return Ok(());
        }
        // What the WAL looks like before SQLite touches it (opening the database may create an
        // empty one).
        let wal_path = PathBuf::from(format!("{}-wal", db.display()));
        let wal_len = std::fs::metadata(&wal_path).map(|m| m.len()).ok();
        let found = if db.is_file() {
            let conn = Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            let has_meta: bool = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'meta'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)?;
            if has_meta {
                read_commits(&conn)?
            } else {
                0
            }
        } else {
            0
        };
        if recorded <= found {
            return Ok(());
        }
        let wal = if !db.is_file() {
            format!("{} does not exist", db.display())
        } else {
            match wal_len {
                Some(0) => format!("{} is empty", wal_path.display()),
                Some(n) => format!(
                    "{} has {n} bytes but not those commits (truncated, or from another copy?)",
                    wal_path.display()
                ),
                None => format!("{} does not exist (deleted?)", wal_path.display()),
            }
        };
        Err(StoreError::LostCommits {
            db,
            found,
            recorded,
            marker,
            wal,
        })
    }

    /// After the operator accepted a shortfall (`--accept-data-loss`): the marker restarts
    /// from the database's counter.
    pub fn reset_marker(&self) -> Result<(), StoreError> {
        let conn = self.w()?;
        let found = read_commits(&conn)?;
        self.write_marker(found);
        drop(conn);
        Ok(())
    }

    /// Bumps the commit counter inside transaction `tx`; returns the new value.
    fn bump(tx: &Transaction<'_>) -> Result<u64, StoreError> {
        let n: i64 = tx.query_row(
            "INSERT INTO meta(key, value) VALUES ('commits', '1') \
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1 \
             RETURNING CAST(value AS INTEGER)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Rewrites `netmap.commits` (call with the write connection locked, after the commit).
    fn write_marker(&self, n: u64) {
        let Ok(mut g) = self.marker.lock() else {
            return;
        };
        let Some(f) = g.as_mut() else { return };
        let text = format!("{n:<20}\n");
        let r = f
            .seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(text.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(error = %e, path = %self.marker_path.display(), "cannot record the commit counter");
        }
    }

    /// Checkpoints the WAL into the database file and syncs the commit marker (on shutdown).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let conn = self.w()?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        if let Ok(g) = self.marker.lock() {
            if let Some(f) = g.as_ref() {
                let _ = f.sync_all();
            }
        }
        Ok(())
    }

    /// Copies the database at `dir` to `out` while a server may be writing to it (SQLite's
    /// online backup: a consistent snapshot), then checks the copy.
    pub fn backup(dir: &Path, out: &Path) -> Result<BackupInfo, StoreError> {
        let src_path = dir.join("netmap.db");
        if !src_path.is_file() {
            return Err(StoreError::Missing(src_path));
        }
        let src = open_conn(&src_path)?;
        let tmp = PathBuf::from(format!("{}.partial", out.display()));
        let _ = std::fs::remove_file(&tmp);
        let io = |source| StoreError::Dir {
            path: out.to_path_buf(),
            source,
        };
        {
            let mut dst = Connection::open(&tmp)?;
            let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
            b.run_to_completion(1024, std::time::Duration::from_millis(5), None)?;
        }
        let dst = Connection::open(&tmp)?;
        // A single-file copy: no WAL beside it.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(corrupt("backup", format!("integrity check: {check}")));
        }
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = dst.query_row(sql, [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        let info = BackupInfo {
            tailnets: count("SELECT count(*) FROM tailnets")?,
            keys: count("SELECT count(*) FROM api_keys")?,
            commits: read_commits(&dst)?,
            bytes: 0,
        };
        drop(dst);
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, out).map_err(io)?;
        let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        Ok(BackupInfo { bytes, ..info })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn w(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.write.lock().map_err(|_| StoreError::Poisoned)
    }

    fn r(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.read.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Creates a tailnet; `false` when it already exists (nothing changes then).
    pub fn create_tailnet(
        &self,
        name: &str,
        settings: &TailnetSettings,
        policy: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let settings = serde_json::to_string(settings)?;
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO tailnets(name, settings, policy, seq, created) VALUES (?1, ?2, ?3, 0, ?4)",
            params![name, settings, policy, now],
        )?;
        if n == 0 {
            return Ok(false);
        }
        let c = Self::bump(&tx)?;
        tx.commit()?;
        self.write_marker(c);
        Ok(true)
    }

    /// Deletes a tailnet, everything in it and the API keys scoped to it.
    pub fn delete_tailnet(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM api_keys WHERE tailnet = ?1", params![name])?;
        let n = tx.execute("DELETE FROM tailnets WHERE name = ?1", params![name])?;
        let c = Self::bump(&tx)?;
        tx.commit()?;
        self.write_marker(c);
        Ok(n == 1)
    }

    /// Loads every tailnet. A tailnet with an unreadable row comes back as a [`BrokenRow`]
    /// naming it; the others load.
    pub fn load_all(&self) -> Result<Vec<Result<StoredTailnet, BrokenRow>>, StoreError> {
        let conn = self.r()?;
        let mut st =
            conn.prepare("SELECT name, settings, policy, seq FROM tailnets ORDER BY name")?;
        let mut rows = st.query([])?;
        let mut heads = Vec::new();
        while let Some(r) = rows.next()? {
            let name = text_of(r, 0);
            let head = (|| -> Result<(String, String, i64), rusqlite::Error> {
                Ok((r.get(1)?, r.get(2)?, r.get(3)?))
            })();
            heads.push((name, head));
        }
        drop(rows);
        drop(st);
        let mut out = Vec::new();
        for (name, head) in heads {
            let loaded = match head {
                Err(e) => Err(BrokenRow {
                    tailnet: name.clone(),
                    table: "tailnets",
                    row: name.clone(),
                    message: e.to_string(),
                    seq: 0,
                    policy: None,
                }),
                Ok((settings, policy, seq)) => {
                    let seq = u64::try_from(seq).unwrap_or(0);
                    match load_one(&conn, &name, &settings) {
                        Ok(tailnet) => Ok(StoredTailnet {
                            name: name.clone(),
                            policy,
                            seq,
                            tailnet,
                        }),
                        Err(b) => Err(BrokenRow {
                            seq,
                            policy: Some(policy),
                            ..b
                        }),
                    }
                }
            };
            out.push(loaded);
        }
        Ok(out)
    }

    /// Records, in one durable transaction, everything that differs between `old` and `new`
    /// (users, nodes, settings, MagicDNS names, primaries), the policy text when it changed, and
    /// the write counter.
    pub fn commit(
        &self,
        name: &str,
        old: &Tailnet,
        new: &Tailnet,
        policy: Option<&str>,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.write(name, Some(old), new, policy, seq)
    }

    /// Replaces everything stored for tailnet `name` (users, nodes, settings, MagicDNS names,
    /// primaries, the policy when given, the write counter) in one durable transaction: a bulk
    /// import, or the repair of a tailnet whose rows could not be read.
    pub fn replace(
        &self,
        name: &str,
        new: &Tailnet,
        policy: Option<&str>,
        seq: u64,
    ) -> Result<(), StoreError> {
        self.write(name, None, new, policy, seq)
    }

    /// [`Store::commit`] when `old` (what is stored) is given: only the differences are
    /// written; [`Store::replace`] when not: the tailnet's rows are deleted and written anew.
    fn write(
        &self,
        name: &str,
        old: Option<&Tailnet>,
        new: &Tailnet,
        policy: Option<&str>,
        seq: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let n = tx.execute(
            "UPDATE tailnets SET seq = ?2 WHERE name = ?1",
            params![name, seq],
        )?;
        if n != 1 {
            return Err(StoreError::Sql(rusqlite::Error::QueryReturnedNoRows));
        }
        if let Some(p) = policy {
            tx.execute(
                "UPDATE tailnets SET policy = ?2 WHERE name = ?1",
                params![name, p],
            )?;
        }
        if old.is_none_or(|o| o.settings != new.settings) {
            tx.execute(
                "UPDATE tailnets SET settings = ?2 WHERE name = ?1",
                params![name, serde_json::to_string(&new.settings)?],
            )?;
        }
        let empty = Tailnet::default();
        let old = match old {
            Some(o) => o,
            None => {
                for table in ["users", "nodes", "dns_names", "primaries"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE tailnet = ?1"),
                        params![name],
                    )?;
                }
                &empty
            }
        };
        sync_tailnet(&tx, name, old, new)?;
        let c = Self::bump(&tx)?;
        tx.commit()?;
        self.write_marker(c);
        Ok(())
    }

    /// Stores a new API key.
    pub fn insert_key(&self, hash: &str, row: &KeyRow) -> Result<(), StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO api_keys(id, hash, tailnet, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.id, hash, row.tailnet, row.created, row.expires],
        )?;
        let c = Self::bump(&tx)?;
        tx.commit()?;
        self.write_marker(c);
        Ok(())
    }

    /// Finds a key by its hash.
    pub fn lookup_key(&self, hash: &str) -> Result<Option<KeyRow>, StoreError> {
        Ok(self
            .r()?
            .query_row(
                "SELECT id, tailnet, created, expires FROM api_keys WHERE hash = ?1",
                params![hash],
                |r| {
                    Ok(KeyRow {
                        id: r.get(0)?,
                        tailnet: r.get(1)?,
                        created: r.get(2)?,
                        expires: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every key (without hashes).
    pub fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let conn = self.r()?;
        let mut st = conn
            .prepare("SELECT id, tailnet, created, expires FROM api_keys ORDER BY created, id")?;
        let rows = st.query_map([], |r| {
            Ok(KeyRow {
                id: r.get(0)?,
                tailnet: r.get(1)?,
                created: r.get(2)?,
                expires: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a key by id; `false` when there was none.
    pub fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM api_keys WHERE id = ?1", params![id])?;
        let c = Self::bump(&tx)?;
        tx.commit()?;
        self.write_marker(c);
        Ok(n == 1)
    }
}

/// Column `i` as text for naming a row (whatever its type).
fn text_of(r: &rusqlite::Row<'_>, i: usize) -> String {
    use rusqlite::types::ValueRef;
    match r.get_ref(i) {
        Ok(ValueRef::Text(t) | ValueRef::Blob(t)) => String::from_utf8_lossy(t).into_owned(),
        Ok(ValueRef::Integer(n)) => n.to_string(),
        Ok(ValueRef::Real(x)) => x.to_string(),
        Ok(ValueRef::Null) => "NULL".to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Reads one tailnet's rows; the first unreadable row makes it a [`BrokenRow`].
fn load_one(conn: &Connection, name: &str, settings: &str) -> Result<Tailnet, BrokenRow> {
    let broken = |table: &'static str, row: String, e: &dyn std::fmt::Display| BrokenRow {
        tailnet: name.to_string(),
        table,
        row,
        message: e.to_string(),
        seq: 0,
        policy: None,
    };
    let settings: TailnetSettings = serde_json::from_str(settings)
        .map_err(|e| broken("tailnets", format!("{name} (settings)"), &e))?;
    let mut t = Tailnet {
        settings,
        ..Tailnet::default()
    };
    // Each (key, value) pair of a table, decoded by `f`; the first failure names its row.
    let each = |table: &'static str,
                sql: &str,
                f: &mut dyn FnMut(String, String) -> Result<(), String>|
     -> Result<(), BrokenRow> {
        let sql_err = |e: rusqlite::Error| broken(table, "(query)".to_string(), &e);
        let mut st = conn.prepare(sql).map_err(sql_err)?;
        let mut rows = st.query(params![name]).map_err(sql_err)?;
        while let Some(r) = rows.next().map_err(sql_err)? {
            let key = text_of(r, 0);
            let value: String = r.get(1).map_err(|e| broken(table, key.clone(), &e))?;
            f(key.clone(), value).map_err(|e| broken(table, key, &e))?;
        }
        Ok(())
    };
    each(
        "users",
        "SELECT name, data FROM users WHERE tailnet = ?1",
        &mut |key, data| {
            let u: User = serde_json::from_str(&data).map_err(|e| e.to_string())?;
            if u.name != key {
                return Err(format!("user name {:?} differs from its key", u.name));
            }
            t.users.insert(key, u);
            Ok(())
        },
    )?;
    each(
        "nodes",
        "SELECT name, data FROM nodes WHERE tailnet = ?1",
        &mut |key, data| {
            let n: Node = serde_json::from_str(&data).map_err(|e| e.to_string())?;
            t.nodes.insert(key, std::sync::Arc::new(n));
            Ok(())
        },
    )?;
    each(
        "dns_names",
        "SELECT node, name FROM dns_names WHERE tailnet = ?1",
        &mut |node, dns| {
            t.dns_holders.insert(dns.clone(), node.clone());
            t.dns_names.insert(node, dns);
            Ok(())
        },
    )?;
    each(
        "primaries",
        "SELECT prefix, node FROM primaries WHERE tailnet = ?1",
        &mut |prefix, node| {
            let p: IpNet = prefix.parse().map_err(|e| format!("prefix: {e}"))?;
            t.primaries.insert(p, node);
            Ok(())
        },
    )?;
    Ok(t)
}

/// Column names of the two key/value tables (key column, value column).
fn columns(table: &str) -> (&'static str, &'static str) {
    match table {
        "dns_names" => ("node", "name"),
        "primaries" => ("prefix", "node"),
        _ => ("name", "data"),
    }
}

/// Writes the rows of tailnet `name` that differ between `old` (what is stored) and `new`:
/// users, nodes, MagicDNS names and primaries.
fn sync_tailnet(
    tx: &Transaction<'_>,
    name: &str,
    old: &Tailnet,
    new: &Tailnet,
) -> Result<(), StoreError> {
    sync_map(tx, name, "users", &old.users, &new.users, |u| {
        serde_json::to_string(u)
    })?;
    sync_map(tx, name, "nodes", &old.nodes, &new.nodes, |n| {
        serde_json::to_string(n)
    })?;
    sync_map(tx, name, "dns_names", &old.dns_names, &new.dns_names, |s| {
        Ok(s.clone())
    })?;
    sync_map(tx, name, "primaries", &old.primaries, &new.primaries, |s| {
        Ok(s.clone())
    })
}

fn sync_map<K, V>(
    tx: &Transaction<'_>,
    tailnet: &str,
    table: &'static str,
    old: &OrdMap<K, V>,
    new: &OrdMap<K, V>,
    encode: impl Fn(&V) -> Result<String, serde_json::Error>,
) -> Result<(), StoreError>
where
    K: Ord + Clone + std::fmt::Display,
    V: Clone + PartialEq,
{
    let (kc, vc) = columns(table);
    let upsert = format!(
        "INSERT INTO {table}(tailnet, {kc}, {vc}) VALUES (?1, ?2, ?3) \
         ON CONFLICT(tailnet, {kc}) DO UPDATE SET {vc} = excluded.{vc}"
    );
    let delete = format!("DELETE FROM {table} WHERE tailnet = ?1 AND {kc} = ?2");
    let mut up = tx.prepare_cached(&upsert)?;
    let mut del = tx.prepare_cached(&delete)?;
    for item in old.diff(new) {
        match item {
            DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => {
                up.execute(params![tailnet, k.to_string(), encode(v)?])?;
            }
            DiffItem::Remove(k, _) => {
                del.execute(params![tailnet, k.to_string()])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_diff() {
        let dir = std::env::temp_dir().join(format!("netmap-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir).unwrap();
        let settings = TailnetSettings::default();
        assert!(s.create_tailnet("t", &settings, "{}", 1).unwrap());
        assert!(!s.create_tailnet("t", &settings, "{}", 1).unwrap());
        let old = Tailnet::default();
        let mut new = old.clone();
        new.users.insert(
            "a".into(),
            User {
                id: 1,
                name: "a".into(),
                email: "a@x.example".into(),
                role: None,
            },
        );
        new.nodes.insert(
            "n1".into(),
            std::sync::Arc::new(Node {
                hostname: "n1".into(),
                ..Node::default()
            }),
        );
        new.assign_dns_name("n1", "n1");
        new.primaries
            .insert("10.0.0.0/8".parse().unwrap(), "n1".into());
        s.commit("t", &old, &new, Some("{\"acls\":[]}"), 3).unwrap();
        let mut newer = new.clone();
        newer.nodes.remove("n1");
        newer.release_dns_name("n1");
        newer.primaries = OrdMap::new();
        s.commit("t", &new, &newer, None, 4).unwrap();
        s.commit("t", &newer, &new, None, 5).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        let t = all[0].as_ref().unwrap();
        assert_eq!(t.seq, 5);
        assert_eq!(t.policy, "{\"acls\":[]}");
        assert_eq!(t.tailnet, new);
        // create + 3 commits, each counted in the database and in netmap.commits.
        assert_eq!(s.commits().unwrap(), 4);
        assert_eq!(s.recorded_commits(), 4);
        Store::check_commits(&dir).unwrap();

        // A corrupt row breaks its tailnet only, and names the row.
        assert!(s.create_tailnet("u", &settings, "{}", 1).unwrap());
        s.w()
            .unwrap()
            .execute(
                "INSERT INTO nodes(tailnet, name, data) VALUES ('t', 'bad', '{\"hostname\":')",
                [],
            )
            .unwrap();
        let all = s.load_all().unwrap();
        let b = all[0].as_ref().unwrap_err();
        assert_eq!(
            (b.tailnet.as_str(), b.table, b.row.as_str()),
            ("t", "nodes", "bad")
        );
        assert!(all[1].is_ok());
        // Replacing the tailnet repairs it.
        s.replace("t", &new, Some("{}"), 9).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all[0].as_ref().unwrap().tailnet, new);
        assert_eq!(all[0].as_ref().unwrap().seq, 9);

        // Online backup.
        let out = dir.join("copy.db");
        let info = Store::backup(&dir, &out).unwrap();
        assert_eq!((info.tailnets, info.commits), (2, s.commits().unwrap()));

        // Lost commits: the database holds fewer than were acknowledged.
        std::fs::write(dir.join("netmap.commits"), "999\n").unwrap();
        let e = Store::check_commits(&dir).unwrap_err().to_string();
        assert!(e.contains("999 were acknowledged"), "{e}");
        s.reset_marker().unwrap();
        Store::check_commits(&dir).unwrap();

        assert!(s.delete_tailnet("t").unwrap());
        assert_eq!(s.load_all().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_holder_per_directory() {
        let dir = std::env::temp_dir().join(format!("netmap-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = DirLock::acquire(&dir).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        DirLock::acquire(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
