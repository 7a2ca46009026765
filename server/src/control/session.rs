//! One map stream: the full map first, then, for every committed write that changed this
//! node's view, a delta built from the engine's change set (peers changed or removed, the
//! packet filter and SSH policy only when they changed, the self node when it changed); peer
//! patches (online, endpoints, keys) as `PeersChangedPatch`; a keep-alive when idle. A stream
//! that falls behind the tailnet's event buffer gets a fresh full map.
//!
//! While a node has a stream open it is online; when its last stream closes it goes offline,
//! and an ephemeral node is removed after a grace period.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use netmap_control::codec::encode_frame;
use netmap_control::tailcfg::{MapResponse, PeerChange, SshPolicy};
use netmap_core::wire::NodeView;
use netmap_core::{NodeDelta, Snapshot};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::mapper::{node_id, MapCtx};
use super::state::{Control, Machine, Patch};
use crate::serve::tailnets::{Event, EventKind, NodePatch, TailnetHandle, WriteOp};

/// Frames queued per stream before the session waits for the client.
const QUEUE: usize = 8;

/// Opens a stream for `machine`; returns the response body.
pub fn open(
    ctl: Arc<Control>,
    handle: Arc<TailnetHandle>,
    machine: Arc<Machine>,
    zstd: bool,
) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let s = Session {
        events: handle.subscribe(),
        patches: ctl.subscribe(&machine.tailnet),
        ctl,
        handle,
        machine,
        zstd,
        tx,
    };
    tokio::spawn(s.run());
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Body::from_stream(stream)
}

/// One complete map for a non-streaming request.
pub fn single(
    ctl: &Control,
    handle: &TailnetHandle,
    machine: &Machine,
    zstd: bool,
) -> Option<Bytes> {
    let p = handle.current();
    let view = p.snapshot.view(&machine.node)?;
    let ctx = MapCtx {
        ctl,
        tailnet: &machine.tailnet,
        snap: &p.snapshot,
    };
    let msg = ctx.full(&machine.node, &view, true)?;
    encode_frame(&msg, zstd).ok()
}

struct Session {
    ctl: Arc<Control>,
    handle: Arc<TailnetHandle>,
    machine: Arc<Machine>,
    zstd: bool,
    tx: mpsc::Sender<Bytes>,
    events: tokio::sync::broadcast::Receiver<Arc<Event>>,
    patches: tokio::sync::broadcast::Receiver<Arc<Patch>>,
}

/// What the stream has sent so far.
struct Sent {
    seq: u64,
    snapshot: Snapshot,
    view: NodeView,
    self_node: Option<Arc<netmap_core::Node>>,
}

enum End {
    /// The client went away or the node was removed.
    Closed,
    /// The server is stopping: leave the node's state as it is.
    Shutdown,
}

impl Session {
    async fn send(&self, msg: &MapResponse) -> Result<(), End> {
        let frame = encode_frame(msg, self.zstd).map_err(|e| {
            tracing::warn!(error = %e, "map frame encoding failed");
            End::Closed
        })?;
        self.tx.send(frame).await.map_err(|_| End::Closed)
    }

    fn ctx<'a>(&'a self, snap: &'a Snapshot) -> MapCtx<'a> {
        MapCtx {
            ctl: &self.ctl,
            tailnet: &self.machine.tailnet,
            snap,
        }
    }

    async fn full(&self, first: bool) -> Result<Sent, End> {
        let p = self.handle.current();
        let node = &self.machine.node;
        let view = p.snapshot.view(node).ok_or(End::Closed)?;
        let msg = self
            .ctx(&p.snapshot)
            .full(node, &view, first)
            .ok_or(End::Closed)?;
        self.send(&msg).await?;
        Ok(Sent {
            seq: p.seq,
            self_node: p.snapshot.tailnet().nodes.get(node).cloned(),
            snapshot: p.snapshot.clone(),
            view,
        })
    }

    async fn run(mut self) {
        let (t, n) = (self.machine.tailnet.clone(), self.machine.node.clone());
        if self.ctl.connect(&t, &n) {
            self.set_online(true).await;
        }
        let end = self.stream().await;
        if self.ctl.disconnect(&t, &n) && matches!(end, End::Closed) {
            self.went_away().await;
        }
    }

    async fn set_online(&self, online: bool) {
        let (t, n) = (&self.machine.tailnet, &self.machine.node);
        let patch = NodePatch {
            online: Some(online),
            ..NodePatch::default()
        };
        match self
            .handle
            .write(WriteOp::PatchNode(n.clone(), patch))
            .await
        {
            Ok(_) => self.ctl.emit(
                t,
                Patch {
                    node: n.clone(),
                    online: Some(online),
                    ..Patch::default()
                },
            ),
            Err(e) => {
                tracing::debug!(tailnet = %t, node = %n, error = %e, "online state not recorded")
            }
        }
    }

    /// The node's last stream closed: offline, and an ephemeral node goes after the grace.
    async fn went_away(&self) {
        let (t, n) = (self.machine.tailnet.clone(), self.machine.node.clone());
        let alive = self.machine.is_current(&self.handle.current().snapshot);
        if !alive {
            return;
        }
        self.set_online(false).await;
        if self.machine.data.ephemeral {
            let (ctl, handle, m) = (self.ctl.clone(), self.handle.clone(), self.machine.clone());
            tokio::spawn(async move {
                tokio::time::sleep(ctl.ephemeral_grace).await;
                if ctl.is_connected(&t, &n) || !m.is_current(&handle.current().snapshot) {
                    return;
                }
                tracing::info!(tailnet = %t, node = %n, "ephemeral node disconnected; removing it");
                if let Err(e) = handle.write(WriteOp::DeleteNode(n.clone())).await {
                    tracing::warn!(tailnet = %t, node = %n, error = %e, "ephemeral node not removed");
                }
                ctl.forget(&t, &n).await;
            });
        }
    }

    async fn stream(&mut self) -> End {
        let mut sent = match self.full(true).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut shutdown = self.ctl.shutdown.clone();
        if *shutdown.borrow() {
            return End::Shutdown;
        }
        let mut tick = tokio::time::interval(self.ctl.keepalive);
        tick.reset();
        loop {
            let step = tokio::select! {
                ev = self.events.recv() => match ev {
                    Ok(ev) => self.event(&mut sent, &ev).await,
                    Err(RecvError::Lagged(_)) => match self.full(false).await {
                        Ok(s) => { sent = s; Ok(()) }
                        Err(e) => Err(e),
                    },
                    Err(RecvError::Closed) => Err(End::Closed),
                },
                p = self.patches.recv() => match p {
                    Ok(p) => self.patch(&sent, &p).await,
                    Err(RecvError::Lagged(_)) => match self.full(false).await {
                        Ok(s) => { sent = s; Ok(()) }
                        Err(e) => Err(e),
                    },
                    Err(RecvError::Closed) => Err(End::Closed),
                },
                _ = tick.tick() => self.send(&MapResponse { keep_alive: true, ..MapResponse::default() }).await,
                _ = self.tx.closed() => Err(End::Closed),
                _ = shutdown.changed() => Err(End::Shutdown),
            };
            if let Err(e) = step {
                return e;
            }
        }
    }

    async fn event(&self, sent: &mut Sent, ev: &Event) -> Result<(), End> {
        if ev.seq <= sent.seq {
            return Ok(());
        }
        let node = &self.machine.node;
        match &ev.kind {
            EventKind::Deleted => return Err(End::Closed),
            EventKind::Reset => {
                *sent = self.full(false).await?;
                return Ok(());
            }
            EventKind::Changes(cs) => {
                sent.seq = ev.seq;
                sent.snapshot = ev.snapshot.clone();
                let new_self = ev.snapshot.tailnet().nodes.get(node).cloned();
                let Some(delta) = cs.get(node.as_str()) else {
                    if !same_node(&sent.self_node, &new_self) {
                        sent.self_node = new_self;
                        return self.self_update(sent).await;
                    }
                    return Ok(());
                };
                if delta.removed || new_self.is_none() {
                    return Err(End::Closed);
                }
                let view = ev.snapshot.view(node).ok_or(End::Closed)?;
                let self_changed = delta.self_changed || !same_node(&sent.self_node, &new_self);
                sent.self_node = new_self;
                sent.view = view;
                let msg = self.delta(sent, delta, self_changed);
                if msg != MapResponse::default() {
                    self.send(&msg).await?;
                }
            }
        }
        Ok(())
    }

    async fn self_update(&self, sent: &Sent) -> Result<(), End> {
        let ctx = self.ctx(&sent.snapshot);
        if let Some(n) = ctx.self_node(&self.machine.node, &sent.view) {
            self.send(&MapResponse {
                node: Some(n),
                ..MapResponse::default()
            })
            .await?;
        }
        Ok(())
    }

    fn delta(&self, sent: &Sent, d: &NodeDelta, self_changed: bool) -> MapResponse {
        let ctx = self.ctx(&sent.snapshot);
        let node = &self.machine.node;
        let mut msg = MapResponse::default();
        for name in d.peers_added.iter().chain(d.peers_changed.iter()) {
            if let Some(p) = sent.view.peers.get(name).and_then(|p| ctx.peer(p)) {
                msg.peers_changed.push(p);
            }
        }
        msg.peers_removed = d
            .peers_removed
            .iter()
            .map(|n| node_id(&self.machine.tailnet, n))
            .collect();
        if d.filter_changed {
            msg.packet_filter = Some(sent.view.packet_filter.clone());
        }
        if d.ssh_changed {
            msg.ssh_policy = Some(SshPolicy {
                rules: sent.view.ssh_rules.clone(),
            });
        }
        if self_changed {
            msg.node = ctx.self_node(node, &sent.view);
        }
        if !msg.peers_changed.is_empty() {
            msg.user_profiles = ctx.profiles(
                std::iter::once(node.as_str()).chain(
                    d.peers_added
                        .iter()
                        .chain(d.peers_changed.iter())
                        .map(|n| &**n),
                ),
            );
        }
        msg
    }

    async fn patch(&self, sent: &Sent, p: &Patch) -> Result<(), End> {
        if p.node == self.machine.node || sent.view.peers.get(&p.node).is_none() {
            return Ok(());
        }
        let change = PeerChange {
            node_id: node_id(&self.machine.tailnet, &p.node),
            endpoints: p.endpoints.clone().unwrap_or_default(),
            key: p.key,
            disco_key: p.disco_key,
            online: p.online,
        };
        self.send(&MapResponse {
            peers_changed_patch: vec![change],
            ..MapResponse::default()
        })
        .await
    }
}

fn same_node(a: &Option<Arc<netmap_core::Node>>, b: &Option<Arc<netmap_core::Node>>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y) || x == y,
        (None, None) => true,
        _ => false,
    }
}
