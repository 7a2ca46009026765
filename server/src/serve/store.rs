//! The durable store: one SQLite database (WAL, `synchronous=FULL`) in the data directory with
//! tailnets, their policy text, users, nodes, the history-dependent state (MagicDNS names and
//! primary routers) and API keys (hashed).

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
        Ok(Store {
            write: Mutex::new(write),
            read: Mutex::new(read),
            path,
        })
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
        let n = self.w()?.execute(
            "INSERT OR IGNORE INTO tailnets(name, settings, policy, seq, created) VALUES (?1, ?2, ?3, 0, ?4)",
            params![name, settings, policy, now],
        )?;
        Ok(n == 1)
    }

    /// Deletes a tailnet, everything in it and the API keys scoped to it.
    pub fn delete_tailnet(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM api_keys WHERE tailnet = ?1", params![name])?;
        let n = tx.execute("DELETE FROM tailnets WHERE name = ?1", params![name])?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// Loads every tailnet.
    pub fn load_all(&self) -> Result<Vec<StoredTailnet>, StoreError> {
        let conn = self.r()?;
        let mut out = Vec::new();
        let mut st =
            conn.prepare("SELECT name, settings, policy, seq FROM tailnets ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let heads: Vec<(String, String, String, i64)> = rows.collect::<Result<_, _>>()?;
        for (name, settings, policy, seq) in heads {
            let settings: TailnetSettings =
                serde_json::from_str(&settings).map_err(|e| corrupt("tailnets", e))?;
            let mut t = Tailnet {
                settings,
                ..Tailnet::default()
            };
            let pairs = |sql: &str| -> Result<Vec<(String, String)>, StoreError> {
                let mut st = conn.prepare(sql)?;
                let rows = st.query_map(params![name], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            };
            for (_, data) in pairs("SELECT name, data FROM users WHERE tailnet = ?1")? {
                let u: User = serde_json::from_str(&data).map_err(|e| corrupt("users", e))?;
                t.users.insert(u.name.clone(), u);
            }
            for (key, data) in pairs("SELECT name, data FROM nodes WHERE tailnet = ?1")? {
                let n: Node = serde_json::from_str(&data).map_err(|e| corrupt("nodes", e))?;
                t.nodes.insert(key, std::sync::Arc::new(n));
            }
            for (node, dns) in pairs("SELECT node, name FROM dns_names WHERE tailnet = ?1")? {
                t.dns_holders.insert(dns.clone(), node.clone());
                t.dns_names.insert(node, dns);
            }
            for (prefix, node) in pairs("SELECT prefix, node FROM primaries WHERE tailnet = ?1")? {
                let p: IpNet = prefix.parse().map_err(|e| corrupt("primaries", e))?;
                t.primaries.insert(p, node);
            }
            out.push(StoredTailnet {
                name,
                policy,
                seq: u64::try_from(seq).unwrap_or(0),
                tailnet: t,
            });
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
        if old.settings != new.settings {
            tx.execute(
                "UPDATE tailnets SET settings = ?2 WHERE name = ?1",
                params![name, serde_json::to_string(&new.settings)?],
            )?;
        }
        sync_map(&tx, name, "users", &old.users, &new.users, |u| {
            serde_json::to_string(u)
        })?;
        sync_map(&tx, name, "nodes", &old.nodes, &new.nodes, |n| {
            serde_json::to_string(n)
        })?;
        sync_map(
            &tx,
            name,
            "dns_names",
            &old.dns_names,
            &new.dns_names,
            |s| Ok(s.clone()),
        )?;
        sync_map(
            &tx,
            name,
            "primaries",
            &old.primaries,
            &new.primaries,
            |s| Ok(s.clone()),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Stores a new API key.
    pub fn insert_key(&self, hash: &str, row: &KeyRow) -> Result<(), StoreError> {
        self.w()?.execute(
            "INSERT INTO api_keys(id, hash, tailnet, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![row.id, hash, row.tailnet, row.created, row.expires],
        )?;
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
        Ok(self
            .w()?
            .execute("DELETE FROM api_keys WHERE id = ?1", params![id])?
            == 1)
    }
}

/// Column names of the two key/value tables (key column, value column).
fn columns(table: &str) -> (&'static str, &'static str) {
    match table {
        "dns_names" => ("node", "name"),
        "primaries" => ("prefix", "node"),
        _ => ("name", "data"),
    }
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
        assert_eq!(all[0].seq, 5);
        assert_eq!(all[0].policy, "{\"acls\":[]}");
        assert_eq!(all[0].tailnet, new);
        assert!(s.delete_tailnet("t").unwrap());
        assert!(s.load_all().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
