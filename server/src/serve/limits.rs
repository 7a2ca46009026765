//! Limits shared by the accept loop and the API: counted caps per key (API key id, client IP)
//! with guards that release on drop, and request-body reading with a size limit, a deadline and
//! a minimum rate.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;

use super::error::ApiError;

/// How many things (connections, streams, requests) each key holds, against a cap.
#[derive(Debug)]
pub struct Caps<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    cap: usize,
}

impl<K: Hash + Eq + Clone> Caps<K> {
    /// At most `cap` per key.
    pub fn new(cap: usize) -> Caps<K> {
        Caps {
            counts: Arc::new(Mutex::new(HashMap::new())),
            cap,
        }
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Takes one for `key`, or `None` when it holds `cap` already.
    pub fn try_take(&self, key: &K) -> Option<CapGuard<K>> {
        let mut m = self.counts.lock().ok()?;
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(CapGuard {
            counts: self.counts.clone(),
            key: key.clone(),
        })
    }

    /// How many `key` holds.
    #[cfg(test)]
    pub fn held(&self, key: &K) -> usize {
        self.counts
            .lock()
            .map(|m| m.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One unit held against a [`Caps`]; released on drop.
#[derive(Debug)]
pub struct CapGuard<K: Hash + Eq + Clone> {
    counts: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for CapGuard<K> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// How a request body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body in bytes.
    pub max_bytes: usize,
    /// Time allowed for the body, before the allowance for its size.
    pub timeout: Duration,
    /// Bytes per second: every `min_rate` bytes received extend the deadline by a second.
    pub min_rate: u64,
}

/// Reads a whole request body within `l`: larger than `max_bytes` is 413; not complete by
/// `timeout + received / min_rate` after the start (a client that trickles) is 408.
pub async fn read_body(
    body: Body,
    l: BodyLimits,
    declared: Option<u64>,
) -> Result<Bytes, ApiError> {
    if declared.is_some_and(|n| n > l.max_bytes as u64) {
        return Err(ApiError::TooLarge(l.max_bytes));
    }
    let start = tokio::time::Instant::now();
    let cap = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0).min(l.max_bytes));
    let mut buf: Vec<u8> = Vec::with_capacity(cap);
    let mut stream = body.into_data_stream();
    let rate = l.min_rate.max(1) as f64;
    loop {
        let allowance = l.timeout + Duration::from_secs_f64(buf.len() as f64 / rate);
        match tokio::time::timeout_at(start + allowance, stream.next()).await {
            Err(_) => {
                return Err(ApiError::BodyTimeout(format!(
                    "request body not received in time ({} of {} bytes after {:.1} s; send at \
                     least {} bytes/s after the first {} s)",
                    buf.len(),
                    declared.map_or("?".to_string(), |n| n.to_string()),
                    start.elapsed().as_secs_f64(),
                    l.min_rate,
                    l.timeout.as_secs()
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::BadRequest(format!(
                    "could not read request body: {e}"
                )))
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > l.max_bytes {
                    return Err(ApiError::TooLarge(l.max_bytes));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_release_on_drop() {
        let c: Caps<&str> = Caps::new(2);
        let a = c.try_take(&"k").unwrap();
        let _b = c.try_take(&"k").unwrap();
        assert!(c.try_take(&"k").is_none());
        assert!(c.try_take(&"other").is_some());
        drop(a);
        assert_eq!(c.held(&"k"), 1);
        assert!(c.try_take(&"k").is_some());
    }

    #[tokio::test]
    async fn bodies_have_a_deadline_and_a_size() {
        let l = BodyLimits {
            max_bytes: 10,
            timeout: Duration::from_millis(100),
            min_rate: 1000,
        };
        let b = read_body(Body::from("hello"), l, Some(5)).await.unwrap();
        assert_eq!(&b[..], b"hello");
        assert!(matches!(
            read_body(Body::from("x".repeat(11)), l, None).await,
            Err(ApiError::TooLarge(10))
        ));
        // One byte, then nothing: cut after ~100 ms.
        let s = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from("x")) })
            .chain(futures_util::stream::pending());
        let t0 = std::time::Instant::now();
        let r = read_body(Body::from_stream(s), l, Some(10)).await;
        assert!(matches!(r, Err(ApiError::BodyTimeout(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
