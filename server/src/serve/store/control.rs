//! Tables of the control protocol (schema version 2): the server's Noise key, pre-auth keys
//! (hashed) and registered machines. Tailnet-scoped rows go when their tailnet goes.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// Schema step 1 → 2.
pub(super) const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS control_keys(
    name TEXT PRIMARY KEY,
    private TEXT NOT NULL,
    public TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS preauth_keys(
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    user TEXT,
    tags TEXT NOT NULL,
    reusable INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS machines(
    tailnet TEXT NOT NULL REFERENCES tailnets(name) ON DELETE CASCADE,
    node TEXT NOT NULL,
    machine_key TEXT NOT NULL UNIQUE,
    node_key TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL,
    PRIMARY KEY(tailnet, node)
) WITHOUT ROWID;
";

/// A pre-auth key as stored (the key itself never is, only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreauthRow {
    /// Public identifier (a prefix of the key).
    pub id: String,
    /// The tailnet nodes join.
    pub tailnet: String,
    /// The user that owns the nodes (`None`: tagged nodes).
    pub user: Option<String>,
    /// ACL tags of the nodes.
    pub tags: Vec<String>,
    /// May register any number of machines.
    pub reusable: bool,
    /// Nodes are removed when they disconnect.
    pub ephemeral: bool,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// Expiry, seconds since the epoch.
    pub expires: Option<i64>,
    /// Machines registered with it.
    pub used: i64,
}

/// A registered machine: keys as text, the rest as the control layer's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    /// The tailnet.
    pub tailnet: String,
    /// The node's name in the tailnet.
    pub node: String,
    /// `mkey:…`.
    pub machine_key: String,
    /// `nodekey:…`.
    pub node_key: String,
    /// Everything else (disco key, endpoints, hostinfo, flags).
    pub data: String,
}

fn preauth_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(PreauthRow, String)> {
    Ok((
        PreauthRow {
            id: r.get(0)?,
            tailnet: r.get(1)?,
            user: r.get(2)?,
            tags: Vec::new(),
            reusable: r.get::<_, i64>(4)? != 0,
            ephemeral: r.get::<_, i64>(5)? != 0,
            created: r.get(6)?,
            expires: r.get(7)?,
            used: r.get(8)?,
        },
        r.get::<_, String>(3)?,
    ))
}

fn with_tags((mut row, tags): (PreauthRow, String)) -> Result<PreauthRow, StoreError> {
    row.tags = serde_json::from_str(&tags).map_err(|e| super::corrupt("preauth_keys", e))?;
    Ok(row)
}

const PREAUTH_COLS: &str = "id, tailnet, user, tags, reusable, ephemeral, created, expires, used";

impl Store {
    /// The server's Noise key pair `(private, public)` in text form, created by `make` on
    /// first use and kept from then on.
    pub fn control_key(
        &self,
        make: impl FnOnce() -> Result<(String, String), String>,
    ) -> Result<(String, String), StoreError> {
        let conn = self.w()?;
        let found = conn
            .query_row(
                "SELECT private, public FROM control_keys WHERE name = 'noise'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some(k) = found {
            return Ok(k);
        }
        let (private, public) = make().map_err(|m| StoreError::Corrupt {
            table: "control_keys",
            message: m,
        })?;
        conn.execute(
            "INSERT INTO control_keys(name, private, public) VALUES ('noise', ?1, ?2)",
            params![private, public],
        )?;
        Ok((private, public))
    }

    /// Whether a tailnet exists (and, when `user` is given, has that user).
    pub fn tailnet_has(&self, tailnet: &str, user: Option<&str>) -> Result<bool, StoreError> {
        let conn = self.r()?;
        Ok(match user {
            None => conn
                .query_row(
                    "SELECT 1 FROM tailnets WHERE name = ?1",
                    params![tailnet],
                    |_| Ok(()),
                )
                .optional()?
                .is_some(),
            Some(u) => conn
                .query_row(
                    "SELECT 1 FROM users WHERE tailnet = ?1 AND name = ?2",
                    params![tailnet, u],
                    |_| Ok(()),
                )
                .optional()?
                .is_some(),
        })
    }

    /// Stores a new pre-auth key.
    pub fn insert_preauth(&self, hash: &str, row: &PreauthRow) -> Result<(), StoreError> {
        self.w()?.execute(
            "INSERT INTO preauth_keys(id, hash, tailnet, user, tags, reusable, ephemeral, created, expires, used) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                row.id,
                hash,
                row.tailnet,
                row.user,
                serde_json::to_string(&row.tags)?,
                i64::from(row.reusable),
                i64::from(row.ephemeral),
                row.created,
                row.expires,
                row.used
            ],
        )?;
        Ok(())
    }

    /// Finds a pre-auth key by its hash.
    pub fn lookup_preauth(&self, hash: &str) -> Result<Option<PreauthRow>, StoreError> {
        let found = self
            .r()?
            .query_row(
                &format!("SELECT {PREAUTH_COLS} FROM preauth_keys WHERE hash = ?1"),
                params![hash],
                preauth_from_row,
            )
            .optional()?;
        found.map(with_tags).transpose()
    }

    /// Counts one more registration with a key.
    pub fn use_preauth(&self, id: &str) -> Result<(), StoreError> {
        self.w()?.execute(
            "UPDATE preauth_keys SET used = used + 1 WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    /// Every pre-auth key (of one tailnet, when given).
    pub fn list_preauth(&self, tailnet: Option<&str>) -> Result<Vec<PreauthRow>, StoreError> {
        let conn = self.r()?;
        let mut st = conn.prepare(&format!(
            "SELECT {PREAUTH_COLS} FROM preauth_keys WHERE ?1 IS NULL OR tailnet = ?1 ORDER BY created, id"
        ))?;
        let rows = st.query_map(params![tailnet], preauth_from_row)?;
        let raw: Vec<(PreauthRow, String)> = rows.collect::<Result<_, _>>()?;
        raw.into_iter().map(with_tags).collect()
    }

    /// Inserts or replaces a machine (any older row with the same keys goes).
    pub fn upsert_machine(&self, row: &MachineRow) -> Result<(), StoreError> {
        let mut conn = self.w()?;
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM machines WHERE (machine_key = ?1 OR node_key = ?2) AND NOT (tailnet = ?3 AND node = ?4)",
            params![row.machine_key, row.node_key, row.tailnet, row.node],
        )?;
        tx.execute(
            "INSERT INTO machines(tailnet, node, machine_key, node_key, data) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT(tailnet, node) DO UPDATE SET machine_key = excluded.machine_key, \
             node_key = excluded.node_key, data = excluded.data",
            params![row.tailnet, row.node, row.machine_key, row.node_key, row.data],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a machine.
    pub fn delete_machine(&self, tailnet: &str, node: &str) -> Result<(), StoreError> {
        self.w()?.execute(
            "DELETE FROM machines WHERE tailnet = ?1 AND node = ?2",
            params![tailnet, node],
        )?;
        Ok(())
    }

    /// Every registered machine.
    pub fn load_machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        let conn = self.r()?;
        let mut st = conn.prepare(
            "SELECT tailnet, node, machine_key, node_key, data FROM machines ORDER BY tailnet, node",
        )?;
        let rows = st.query_map([], |r| {
            Ok(MachineRow {
                tailnet: r.get(0)?,
                node: r.get(1)?,
                machine_key: r.get(2)?,
                node_key: r.get(3)?,
                data: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use netmap_core::TailnetSettings;

    #[test]
    fn version_1_directory_migrates_and_keeps_data() {
        let dir = std::env::temp_dir().join(format!("netmap-store-mig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            // A data directory as schema version 1 left it.
            let conn = rusqlite::Connection::open(dir.join("netmap.db")).unwrap();
            conn.execute_batch(super::super::SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO tailnets(name, settings, policy, seq, created) VALUES ('t', ?1, '{}', 7, 0)",
                params![serde_json::to_string(&TailnetSettings::default()).unwrap()],
            )
            .unwrap();
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.load_all().unwrap()[0].as_ref().unwrap().seq, 7);
        let v: String = s
            .r()
            .unwrap()
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, "2");
        let row = PreauthRow {
            id: "abc".into(),
            tailnet: "t".into(),
            user: None,
            tags: vec!["tag:a".into()],
            reusable: true,
            ephemeral: false,
            created: 1,
            expires: None,
            used: 0,
        };
        s.insert_preauth("h", &row).unwrap();
        s.use_preauth("abc").unwrap();
        let got = s.lookup_preauth("h").unwrap().unwrap();
        assert_eq!(got.used, 1);
        assert_eq!(got.tags, row.tags);
        let m = MachineRow {
            tailnet: "t".into(),
            node: "n".into(),
            machine_key: "mkey:1".into(),
            node_key: "nodekey:1".into(),
            data: "{}".into(),
        };
        s.upsert_machine(&m).unwrap();
        // The same machine under a new name replaces the old row.
        let m2 = MachineRow {
            node: "n2".into(),
            ..m.clone()
        };
        s.upsert_machine(&m2).unwrap();
        assert_eq!(s.load_machines().unwrap(), vec![m2]);
        drop(s);
        // Reopening is a no-op; a newer schema is refused.
        let s = Store::open(&dir).unwrap();
        s.w()
            .unwrap()
            .execute(
                "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
                [],
            )
            .unwrap();
        drop(s);
        assert!(Store::open(&dir).is_err());
        // Deleting the tailnet removes its keys and machines.
        let _ = std::fs::remove_dir_all(&dir);
    }
}
