//! API keys: generation, hashing, look-up with a short cache, and per-key rate limiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::store::{KeyRow, Store, StoreError};

/// Prefix of every key (lets secret scanners recognise them).
const PREFIX: &str = "nmk_";

/// How long a successful look-up is trusted before the store is asked again (so a revoked key
/// stops working within this time).
const CACHE_TTL: Duration = Duration::from_secs(5);

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's public id.
    pub key_id: String,
    /// The tailnet the key is scoped to; `None` = admin.
    pub tailnet: Option<String>,
}

impl Caller {
    /// Whether the caller may read and change tailnet `t`.
    pub fn can_access(&self, t: &str) -> bool {
        self.tailnet.as_deref().is_none_or(|s| s == t)
    }

    /// Whether the key is an admin key (all tailnets; may create and delete them).
    pub fn is_admin(&self) -> bool {
        self.tailnet.is_none()
    }
}

/// Why generating a key failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The OS random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The SHA-256 of a key, hex. Keys carry 256 random bits, so a fast hash is enough.
pub fn hash_key(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    hex(&d)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Creates and stores a key; returns the key (shown once) and its row.
pub fn create_key(
    store: &Store,
    tailnet: Option<String>,
    expires_in: Option<Duration>,
) -> Result<(String, KeyRow), KeyError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| KeyError::Random(e.to_string()))?;
    let secret = hex(&raw);
    let key = format!("{PREFIX}{secret}");
    let now = now_secs();
    let row = KeyRow {
        id: secret.chars().take(12).collect(),
        tailnet,
        created: now,
        expires: expires_in
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
    };
    store.insert_key(&hash_key(&key), &row)?;
    Ok((key, row))
}

/// Resolves bearer tokens to callers, caching recent successes.
#[derive(Debug)]
pub struct Authenticator {
    store: Arc<Store>,
    cache: Mutex<HashMap<String, (KeyRow, Instant)>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No such key.
    Unknown,
    /// The key has expired.
    Expired,
}

impl Authenticator {
    /// An authenticator over the store's keys.
    pub fn new(store: Arc<Store>) -> Authenticator {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets cached keys (after a tailnet and its scoped keys were deleted).
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    /// Checks a token (blocking: may read the store).
    pub fn check(&self, token: &str) -> Result<Result<Caller, AuthFailure>, StoreError> {
        if !token.starts_with(PREFIX) || token.len() > 128 {
            return Ok(Err(AuthFailure::Unknown));
        }
        let hash = hash_key(token);
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&hash).cloned())
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(row, _)| row);
        let row = match cached {
            Some(r) => r,
            None => match self.store.lookup_key(&hash)? {
                Some(r) => {
                    if let Ok(mut c) = self.cache.lock() {
                        if c.len() > 10_000 {
                            c.clear();
                        }
                        c.insert(hash, (r.clone(), Instant::now()));
                    }
                    r
                }
                None => return Ok(Err(AuthFailure::Unknown)),
            },
        };
        if row.expires.is_some_and(|e| e <= now_secs()) {
            return Ok(Err(AuthFailure::Expired));
        }
        Ok(Ok(Caller {
            key_id: row.id,
            tailnet: row.tailnet,
        }))
    }
}

/// Per-key token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` tokens per second, at most `burst` saved up.
    pub fn new(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`; `Err(wait)` when none is left.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let Ok(mut b) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        if b.len() > 100_000 {
            b.clear();
        }
        let (tokens, at) = b.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_refill() {
        let r = RateLimiter::new(1000.0, 2.0);
        assert!(r.take("a").is_ok());
        assert!(r.take("a").is_ok());
        assert!(r.take("a").is_err());
        assert!(r.take("b").is_ok());
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.take("a").is_ok());
    }

    #[test]
    fn scope() {
        let admin = Caller {
            key_id: "x".into(),
            tailnet: None,
        };
        let scoped = Caller {
            key_id: "y".into(),
            tailnet: Some("a".into()),
        };
        assert!(admin.can_access("a") && admin.is_admin());
        assert!(scoped.can_access("a") && !scoped.can_access("b") && !scoped.is_admin());
        assert_eq!(hash_key("k").len(), 64);
    }
}
