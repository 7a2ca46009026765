//! Pre-auth keys: a machine that presents one registers without interaction, as a node of the
//! key's tailnet owned by the key's user or carrying its tags. Keys are stored hashed; a
//! single-use key is spent by its first registration; an ephemeral key's nodes are removed
//! when they disconnect.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::serve::keys::{hash_key, now_secs};
use crate::serve::store::{PreauthRow, Store, StoreError};

/// Prefix of every pre-auth key.
pub const PREFIX: &str = "nmauth_";

/// What a new key grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreauthSpec {
    /// The user that owns the nodes (exclusive with `tags`).
    #[serde(default)]
    pub user: Option<String>,
    /// ACL tags of the nodes (exclusive with `user`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// May register any number of machines.
    #[serde(default)]
    pub reusable: bool,
    /// Nodes are removed when they disconnect.
    #[serde(default)]
    pub ephemeral: bool,
    /// Lifetime (`1h`, `90d`); none = no expiry.
    #[serde(default)]
    pub expires: Option<String>,
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PreauthError {
    /// The request is wrong (what and why).
    #[error("{0}")]
    Invalid(String),
    /// The tailnet or user does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness.
    #[error("no randomness available: {0}")]
    Random(String),
}

/// Checks a spec; returns the lifetime.
fn check(spec: &PreauthSpec) -> Result<Option<Duration>, PreauthError> {
    match (&spec.user, spec.tags.is_empty()) {
        (Some(_), false) => {
            return Err(PreauthError::Invalid(
                "give either a user or tags, not both".into(),
            ))
        }
        (None, true) => {
            return Err(PreauthError::Invalid(
                "a pre-auth key needs a user or at least one tag".into(),
            ))
        }
        _ => {}
    }
    for t in &spec.tags {
        if !t.starts_with("tag:") || t.len() <= 4 {
            return Err(PreauthError::Invalid(format!(
                "tags: {t:?} must look like \"tag:NAME\""
            )));
        }
    }
    spec.expires
        .as_deref()
        .map(crate::serve::config::parse_duration)
        .transpose()
        .map_err(|e| PreauthError::Invalid(format!("expires: {e}")))
}

/// Creates a key for `tailnet` (blocking: writes the store). Returns the key, shown once.
pub fn create(
    store: &Store,
    tailnet: &str,
    spec: &PreauthSpec,
) -> Result<(String, PreauthRow), PreauthError> {
    let lifetime = check(spec)?;
    if !store.tailnet_has(tailnet, None)? {
        return Err(PreauthError::NotFound(format!(
            "tailnet {tailnet:?} not found"
        )));
    }
    if let Some(u) = &spec.user {
        if !store.tailnet_has(tailnet, Some(u))? {
            return Err(PreauthError::NotFound(format!(
                "user {u:?} not found in tailnet {tailnet:?}; create it first"
            )));
        }
    }
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| PreauthError::Random(e.to_string()))?;
    let secret = netmap_control::keys::to_hex(&raw);
    let key = format!("{PREFIX}{secret}");
    let now = now_secs();
    let row = PreauthRow {
        id: secret.chars().take(12).collect(),
        tailnet: tailnet.to_string(),
        user: spec.user.clone(),
        tags: spec.tags.clone(),
        reusable: spec.reusable,
        ephemeral: spec.ephemeral,
        created: now,
        expires: lifetime
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        used: 0,
    };
    store.insert_preauth(&hash_key(&key), &row)?;
    Ok((key, row))
}

/// A key row as the API and CLI show it (never the key).
pub fn row_json(row: &PreauthRow) -> Value {
    json!({
        "id": row.id,
        "tailnet": row.tailnet,
        "user": row.user,
        "tags": row.tags,
        "reusable": row.reusable,
        "ephemeral": row.ephemeral,
        "created": row.created,
        "expires": row.expires,
        "used": row.used,
    })
}

/// Why a presented key is refused (the text the client shows).
pub fn refusal(row: Option<&PreauthRow>, now: i64) -> Option<&'static str> {
    match row {
        None => Some("invalid pre-auth key"),
        Some(r) if r.expires.is_some_and(|e| e <= now) => Some("pre-auth key expired"),
        Some(r) if !r.reusable && r.used > 0 => Some("pre-auth key already used"),
        Some(_) => None,
    }
}

/// Looks a presented key up (blocking).
pub fn lookup(store: &Store, key: &str) -> Result<Option<PreauthRow>, StoreError> {
    if !key.starts_with(PREFIX) || key.len() > 128 {
        return Ok(None);
    }
    store.lookup_preauth(&hash_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_and_keys_refused_when_spent_or_expired() {
        let user_and_tags = PreauthSpec {
            user: Some("a".into()),
            tags: vec!["tag:x".into()],
            ..PreauthSpec::default()
        };
        assert!(check(&user_and_tags).is_err());
        assert!(check(&PreauthSpec::default()).is_err());
        let bad_tag = PreauthSpec {
            tags: vec!["x".into()],
            ..PreauthSpec::default()
        };
        assert!(check(&bad_tag).is_err());
        let bad_exp = PreauthSpec {
            user: Some("a".into()),
            expires: Some("soon".into()),
            ..PreauthSpec::default()
        };
        assert!(check(&bad_exp).is_err());
        let mut row = PreauthRow {
            id: "i".into(),
            tailnet: "t".into(),
            user: Some("a".into()),
            tags: vec![],
            reusable: false,
            ephemeral: false,
            created: 0,
            expires: Some(100),
            used: 0,
        };
        assert_eq!(refusal(Some(&row), 50), None);
        assert_eq!(refusal(Some(&row), 100), Some("pre-auth key expired"));
        row.used = 1;
        assert_eq!(refusal(Some(&row), 50), Some("pre-auth key already used"));
        row.reusable = true;
        assert_eq!(refusal(Some(&row), 50), None);
        assert_eq!(refusal(None, 0), Some("invalid pre-auth key"));
    }
}
