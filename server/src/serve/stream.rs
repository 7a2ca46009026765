//! `GET .../nodes/{id}/netmap?stream=true`: an NDJSON stream of one node's view.
//!
//! Lines (one JSON object each):
//! - `{"type":"full","seq":N,"view":{...}}` first, and again when the reader fell behind
//!   (`"resync":true`) or the tailnet was replaced by an import;
//! - `{"type":"delta","seq":N,"delta":{...},"peers":[...],"packet_filter"?,"ssh_rules"?,"cap_map"?}`
//!   for every committed write that changed this node's view: `delta` is the engine's node delta
//!   (peer names added/removed/changed, which parts changed), `peers` the new value of every
//!   added or changed peer, and the changed parts in full;
//! - `{"type":"keepalive","seq":N}` when nothing else was sent for the keep-alive interval;
//! - `{"type":"removed","seq":N}` (node removed), `{"type":"deleted"}` (tailnet deleted) or
//!   `{"type":"unauthorized","error":"API key revoked"}` (the key was revoked or expired: within
//!   about a second, see [`Authenticator::poll`](super::keys::Authenticator::poll)), after which
//!   the stream ends.
//!
//! Each stream reads the tailnet's bounded broadcast of committed writes; a stream that falls
//! more than the buffer behind (a slow reader) skips to a fresh full view instead of holding the
//! writer or other streams back.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use netmap_core::wire::{NodeView, Peer};
use netmap_core::NodeDelta;
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use super::error::ApiError;
use super::keys::KeyEnd;
use super::limits::CapGuard;
use super::metrics::Metrics;
use super::net::ActiveGuard;
use super::tailnets::{Event, EventKind, TailnetHandle};

/// Counts open streams against the cap; releases the slot on drop.
#[derive(Debug)]
pub struct StreamSlot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl StreamSlot {
    /// Takes a slot, or `None` at the cap.
    pub fn take(open: &Arc<AtomicUsize>, cap: usize, metrics: &Arc<Metrics>) -> Option<StreamSlot> {
        let prev = open.fetch_add(1, Ordering::AcqRel);
        if prev >= cap {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics.streams.inc();
        Some(StreamSlot {
            open: open.clone(),
            metrics: metrics.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.streams.dec();
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    b.push(b'\n');
    Bytes::from(b)
}

fn full_line(seq: u64, view: &NodeView, resync: bool) -> Bytes {
    let mut v = json!({"type": "full", "seq": seq, "view": view});
    if resync {
        v["resync"] = Value::Bool(true);
    }
    line(&v)
}

/// The delta line for one node after one write.
pub fn delta_line(seq: u64, d: &NodeDelta, view: &NodeView) -> Bytes {
    let mut m = Map::new();
    m.insert("type".into(), json!("delta"));
    m.insert("seq".into(), json!(seq));
    m.insert("delta".into(), json!(d));
    let peers: Vec<&Arc<Peer>> = d
        .peers_added
        .iter()
        .chain(d.peers_changed.iter())
        .filter_map(|n| view.peers.get(n))
        .collect();
    if !peers.is_empty() {
        m.insert("peers".into(), json!(peers));
    }
    if d.filter_changed {
        m.insert("packet_filter".into(), json!(view.packet_filter));
    }
    if d.ssh_changed {
        m.insert("ssh_rules".into(), json!(view.ssh_rules));
    }
    if d.self_changed {
        m.insert("cap_map".into(), json!(view.cap_map));
    }
    line(&Value::Object(m))
}

struct State {
    rx: broadcast::Receiver<Arc<Event>>,
    handle: Arc<TailnetHandle>,
    node: String,
    seq: u64,
    keepalive: tokio::time::Interval,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    done: bool,
    /// Turns `Some(reason)` when the stream's API key is revoked or expires.
    key_end: Option<watch::Receiver<KeyEnd>>,
    _slot: StreamSlot,
    _per_key: Option<CapGuard<String>>,
    _per_ip: Option<CapGuard<IpAddr>>,
    _active: Option<ActiveGuard>,
}

enum Step {
    Send(Bytes),
    End(Option<Bytes>),
    Skip,
}

impl State {
    fn on_event(&mut self, ev: &Event) -> Step {
        if ev.seq <= self.seq && !matches!(ev.kind, EventKind::Deleted) {
            return Step::Skip;
        }
        self.seq = ev.seq;
        match &ev.kind {
            EventKind::Changes(cs) => {
                let Some(d) = cs.get(self.node.as_str()) else {
                    return Step::Skip;
                };
                match ev.snapshot.view(&self.node) {
                    Some(view) if !d.removed => Step::Send(delta_line(ev.seq, d, &view)),
                    _ => Step::End(Some(line(&json!({"type": "removed", "seq": ev.seq})))),
                }
            }
            EventKind::Reset => match ev.snapshot.view(&self.node) {
                Some(view) => Step::Send(full_line(ev.seq, &view, false)),
                None => Step::End(Some(line(&json!({"type": "removed", "seq": ev.seq})))),
            },
            EventKind::Deleted => Step::End(Some(line(&json!({"type": "deleted"})))),
        }
    }

    fn resync(&mut self) -> Step {
        self.metrics.stream_resyncs.inc();
        // Drop the stale backlog: start from the newest write, then read the state (writes in
        // between are skipped by seq).
        self.rx = self.rx.resubscribe();
        let cur = self.handle.current();
        self.seq = cur.seq;
        match cur.snapshot.view(&self.node) {
            Some(view) => Step::Send(full_line(cur.seq, &view, true)),
            None => Step::End(Some(line(&json!({"type": "removed", "seq": cur.seq})))),
        }
    }

    async fn next_line(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let step = tokio::select! {
                biased;
                _ = self.shutdown.changed() => Step::End(None),
                r = key_end(&mut self.key_end) => match r {
                    Some(why) => {
                        self.metrics.streams_revoked.inc();
                        Step::End(Some(line(&json!({"type": "unauthorized", "error": why}))))
                    }
                    // The watch went away without a reason: stop watching.
                    None => {
                        self.key_end = None;
                        Step::Skip
                    }
                },
                r = self.rx.recv() => match r {
                    Ok(ev) => self.on_event(&ev),
                    Err(RecvError::Lagged(_)) => self.resync(),
                    Err(RecvError::Closed) => Step::End(None),
                },
                _ = self.keepalive.tick() => {
                    Step::Send(line(&json!({"type": "keepalive", "seq": self.seq})))
                }
            };
            match step {
                Step::Skip => continue,
                Step::Send(b) => {
                    self.keepalive.reset();
                    return Some(b);
                }
                Step::End(b) => {
                    self.done = true;
                    return b;
                }
            }
        }
    }
}

/// Waits until the key's watch says why it ended; `None` if the watch closed without a reason.
/// Never resolves without a watch.
async fn key_end(w: &mut Option<watch::Receiver<KeyEnd>>) -> Option<&'static str> {
    let Some(rx) = w.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        if let Some(why) = *rx.borrow_and_update() {
            return Some(why);
        }
        if rx.changed().await.is_err() {
            return *rx.borrow();
        }
    }
}

/// Parameters of one stream.
pub struct Open {
    /// The tailnet.
    pub handle: Arc<TailnetHandle>,
    /// The node.
    pub node: String,
    /// The stream-count slot.
    pub slot: StreamSlot,
    /// The slot among the API key's streams.
    pub per_key: Option<CapGuard<String>>,
    /// The slot among the client IP's streams.
    pub per_ip: Option<CapGuard<IpAddr>>,
    /// The API key's revocation watch.
    pub key_end: Option<watch::Receiver<KeyEnd>>,
    /// Marks the connection busy while the stream is open (no idle cut-off).
    pub active: Option<ActiveGuard>,
    /// Keep-alive interval.
    pub keepalive: Duration,
    /// Ends the stream on server shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Starts a stream: the full view now, then deltas.
pub fn open(o: Open) -> Result<Response, ApiError> {
    // Subscribe first, then read the state: writes in between arrive and are skipped by seq.
    let rx = o.handle.subscribe();
    let cur = o.handle.current();
    let view = cur
        .snapshot
        .view(&o.node)
        .ok_or_else(|| ApiError::NotFound(format!("node {:?} not found", o.node)))?;
    let first = full_line(cur.seq, &view, false);
    let start = tokio::time::Instant::now() + o.keepalive;
    let mut keepalive = tokio::time::interval_at(start, o.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        rx,
        handle: o.handle,
        node: o.node,
        seq: cur.seq,
        keepalive,
        shutdown: o.shutdown,
        metrics: o.metrics,
        done: false,
        key_end: o.key_end,
        _slot: o.slot,
        _per_key: o.per_key,
        _per_ip: o.per_ip,
        _active: o.active,
    };
    let rest = stream::unfold(state, |mut st| async move {
        st.next_line().await.map(|b| (b, st))
    });
    let body = stream::once(async move { first })
        .chain(rest)
        .map(Ok::<Bytes, std::io::Error>);
    let mut resp = (StatusCode::OK, Body::from_stream(body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::serve::store::Store;
    use crate::serve::tailnets::{Registry, WriteOp};
    use futures_util::TryStreamExt;

    fn json_body<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_gets_a_fresh_full_view() {
        let dir = std::env::temp_dir().join(format!("netmap-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(Store::open(&dir).unwrap());
        let metrics = Arc::new(Metrics::default());
        // A buffer of 4 change sets.
        let reg = Registry::load(
            store,
            metrics.clone(),
            crate::serve::tailnets::RegistryLimits {
                stream_buffer: 4,
                write_queue: 64,
                max_nodes: 1000,
            },
        )
        .unwrap();
        assert!(reg.create("t", Default::default()).unwrap());
        let h = reg.get("t").unwrap();
        let allow = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;
        h.write(WriteOp::SetPolicy(allow.into())).await.unwrap();
        h.write(WriteOp::PutUser(
            "u".into(),
            json_body(json!({"email": "u@t.example"})),
        ))
        .await
        .unwrap();
        let node = |_: usize| json_body(json!({"user": "u"}));
        h.write(WriteOp::PutNode("n".into(), node(0)))
            .await
            .unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let open_streams = Arc::new(AtomicUsize::new(0));
        let resp = open(Open {
            handle: h.clone(),
            node: "n".into(),
            slot: StreamSlot::take(&open_streams, 10, &metrics).unwrap(),
            per_key: None,
            per_ip: None,
            key_end: None,
            active: None,
            keepalive: Duration::from_secs(30),
            shutdown,
            metrics: metrics.clone(),
        })
        .unwrap();
        let mut body = resp.into_body().into_data_stream();
        let next = |b: Bytes| -> Value { serde_json::from_slice(&b).unwrap() };
        let first = next(body.try_next().await.unwrap().unwrap());
        assert_eq!(
            (first["type"].as_str(), first["seq"].as_u64()),
            (Some("full"), Some(3))
        );
        // The reader does not read while 10 writes that change its view are committed.
        for i in 0..10 {
            h.write(WriteOp::PutNode(format!("p{i}"), node(i)))
                .await
                .unwrap();
        }
        let line = next(body.try_next().await.unwrap().unwrap());
        assert_eq!(line["type"], "full", "{line}");
        assert_eq!(line["resync"], true);
        assert_eq!(line["seq"], 13);
        assert_eq!(line["view"]["peers"].as_array().unwrap().len(), 10);
        assert_eq!(metrics.stream_resyncs.get(), 1);
        // Then deltas again.
        h.write(WriteOp::DeleteNode("p0".into())).await.unwrap();
        let line = next(body.try_next().await.unwrap().unwrap());
        assert_eq!(line["type"], "delta", "{line}");
        assert_eq!(line["seq"], 14);
        assert_eq!(line["delta"]["peers_removed"], json!(["p0"]));
        drop(body);
        assert_eq!(open_streams.load(Ordering::Relaxed), 0, "slot released");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
