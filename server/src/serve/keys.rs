//! API keys: generation, hashing, look-up with a short cache, revocation watched for open
//! streams, per-key rate limiting, and a per-client-IP limit on look-ups of unknown keys.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::store::{KeyRow, Store, StoreError};

/// Prefix of every key (lets secret scanners recognise them).
const PREFIX: &str = "nmk_";

/// How long a successful look-up is trusted before the store is asked again. Revocations are
/// also found by [`Authenticator::poll`] (every second), which evicts revoked keys from the
/// cache and ends their streams.
const CACHE_TTL: Duration = Duration::from_secs(5);

/// Why a key stopped being valid, as sent to its open streams.
pub type KeyEnd = Option<&'static str>;

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
    /// Look-ups that miss the cache (new, unknown or malformed keys), per client IP.
    lookups: Option<RateLimiter<IpAddr>>,
    /// Open streams' keys: a key's channel turns `Some(reason)` when it is revoked or expires.
    watched: Mutex<HashMap<String, watch::Sender<KeyEnd>>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No such key.
    Unknown,
    /// The key has expired.
    Expired,
    /// Too many look-ups of unknown keys from this client; retry after the duration.
    Limited(Duration),
}

impl Authenticator {
    /// An authenticator over the store's keys; `lookups_per_ip` = (rate per second, burst) of
    /// look-ups that miss the cache, per client IP.
    pub fn new(store: Arc<Store>, lookups_per_ip: Option<(f64, f64)>) -> Authenticator {
        Authenticator {
            store,
            cache: Mutex::new(HashMap::new()),
            lookups: lookups_per_ip.map(|(rate, burst)| RateLimiter::new(rate, burst)),
            watched: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets cached keys (after a tailnet and its scoped keys were deleted).
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
    }

    /// Checks a token from `client` (blocking: may read the store). A token not in the cache
    /// costs a look-up, which is rate limited per client IP.
    pub fn check(
        &self,
        token: &str,
        client: Option<IpAddr>,
    ) -> Result<Result<Caller, AuthFailure>, StoreError> {
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
            None => {
                if let (Some(l), Some(ip)) = (&self.lookups, client) {
                    if let Err(wait) = l.take(&ip) {
                        return Ok(Err(AuthFailure::Limited(wait)));
                    }
                }
                if !token.starts_with(PREFIX) || token.len() > 128 {
                    return Ok(Err(AuthFailure::Unknown));
                }
                match self.store.lookup_key(&hash)? {
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
                }
            }
        };
        if row.expires.is_some_and(|e| e <= now_secs()) {
            return Ok(Err(AuthFailure::Expired));
        }
        Ok(Ok(Caller {
            key_id: row.id,
            tailnet: row.tailnet,
        }))
    }

    /// A channel that turns `Some(reason)` when key `id` is revoked or expires (see
    /// [`poll`](Self::poll)).
    pub fn watch(&self, id: &str) -> watch::Receiver<KeyEnd> {
        let Ok(mut w) = self.watched.lock() else {
            return watch::channel(None).1;
        };
        w.entry(id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Reads the keys from the store (blocking): revoked or expired keys leave the cache and
    /// their watchers learn why. Run it every second or so.
    pub fn poll(&self) -> Result<(), StoreError> {
        let rows = self.store.list_keys()?;
        let now = now_secs();
        let live: HashMap<&str, Option<i64>> =
            rows.iter().map(|r| (r.id.as_str(), r.expires)).collect();
        let end = |id: &str| -> KeyEnd {
            match live.get(id) {
                None => Some("API key revoked"),
                Some(Some(e)) if *e <= now => Some("API key expired"),
                Some(_) => None,
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|_, (row, _)| end(&row.id).is_none());
        }
        if let Ok(mut w) = self.watched.lock() {
            w.retain(|id, tx| {
                if tx.receiver_count() == 0 {
                    return false;
                }
                match end(id) {
                    Some(why) => {
                        tx.send_replace(Some(why));
                        false
                    }
                    None => true,
                }
            });
        }
        if let Some(l) = &self.lookups {
            l.forget_idle();
        }
        Ok(())
    }
}

/// Keyed GCRA rate limits (governor): `rate` per second sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimiter<K: Clone + std::hash::Hash + Eq> {
    inner: DefaultKeyedRateLimiter<K>,
}

impl<K: Clone + std::hash::Hash + Eq> RateLimiter<K> {
    /// `rate` requests per second, at most `burst` at once (both are clamped to sane ranges).
    pub fn new(rate: f64, burst: f64) -> RateLimiter<K> {
        let period = Duration::from_secs_f64(1.0 / rate.clamp(1e-6, 1e9));
        let burst = NonZeroU32::new(burst.clamp(1.0, f64::from(u32::MAX)) as u32)
            .unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        RateLimiter {
            inner: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// Takes one for `key`; `Err(wait)` when none is left.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        self.inner
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Drops the state of keys that are back at their full burst (bounds memory).
    pub fn forget_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_refill() {
        let r = RateLimiter::new(1000.0, 2.0);
        assert!(r.take(&"a").is_ok());
        assert!(r.take(&"a").is_ok());
        let wait = r.take(&"a").unwrap_err();
        assert!(wait <= Duration::from_millis(1), "{wait:?}");
        assert!(r.take(&"b").is_ok());
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.take(&"a").is_ok());
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
