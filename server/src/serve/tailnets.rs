//! Tailnets held by the server: one engine per tailnet owned by a writer thread that applies
//! writes in order, commits them to the store, and only then publishes the new snapshot to
//! readers and the change sets to streams. Readers never wait for the writer.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ipnet::IpNet;
pub use netmap_core::valid_name;
use netmap_core::{
    is_ipv6_only, Change, ChangeSet, CoreError, Engine, Node, PostureValue, Snapshot, StateIndex,
    Tailnet, TailnetSettings, User,
};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot};

use super::error::ApiError;
use super::metrics::Metrics;
use super::store::{BrokenRow, Store, StoredTailnet};

/// The policy of a new tailnet: nothing is allowed until a policy is set. (`{}` would allow
/// everything: a policy without `acls` and `grants` is allow-all.)
pub const DEFAULT_POLICY: &str =
    "// Default policy of a new tailnet: deny everything until a policy is set.\n{\"acls\": []}\n";

/// What readers see: the last committed state.
#[derive(Debug)]
pub struct Published {
    /// Writes applied and committed so far.
    pub seq: u64,
    /// The engine's snapshot at `seq`.
    pub snapshot: Snapshot,
    /// The policy text in force, as the client sent it.
    pub policy_text: Arc<str>,
}

/// What a stream learns after a committed write.
#[derive(Debug)]
pub enum EventKind {
    /// One change and what it did to each node.
    Changes(ChangeSet),
    /// The whole tailnet was replaced (bulk import): every stream resends a full view.
    Reset,
    /// The tailnet was deleted: streams end.
    Deleted,
}

/// A committed write, broadcast to the tailnet's streams.
#[derive(Debug)]
pub struct Event {
    /// The write counter after this write.
    pub seq: u64,
    /// The state right after this write.
    pub snapshot: Snapshot,
    /// What happened.
    pub kind: EventKind,
}

/// `Option<Option<T>>` that tells an absent field (outer `None`) from `null` (`Some(None)`).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Body of `PUT .../nodes/{id}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeBody {
    /// Hostname (defaults to the node id).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Owning user's name (omit for tagged nodes).
    #[serde(default)]
    pub user: Option<String>,
    /// ACL tags (`tag:...`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// IPv4 address: omitted = keep or allocate, `null` = none.
    #[serde(default, deserialize_with = "double_option")]
    pub ipv4: Option<Option<Ipv4Addr>>,
    /// IPv6 address: omitted = keep or allocate, `null` = none.
    #[serde(default, deserialize_with = "double_option")]
    pub ipv6: Option<Option<Ipv6Addr>>,
    /// Advertised routes.
    #[serde(default)]
    pub routable_ips: Vec<IpNet>,
    /// Routes approved by hand (omitted = keep).
    #[serde(default)]
    pub approved_routes: Option<Vec<IpNet>>,
    /// Connected (omitted = keep, new nodes are online).
    #[serde(default)]
    pub online: Option<bool>,
    /// Join time, RFC 3339 (omitted = keep, new nodes get the current time).
    #[serde(default)]
    pub created: Option<String>,
    /// Device posture attributes (omitted = keep).
    #[serde(default)]
    pub posture: Option<BTreeMap<String, PostureValue>>,
}

/// Body of `PATCH .../nodes/{id}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePatch {
    /// Connected.
    #[serde(default)]
    pub online: Option<bool>,
    /// Routes approved by hand.
    #[serde(default)]
    pub approved_routes: Option<Vec<IpNet>>,
    /// Advertised routes.
    #[serde(default)]
    pub routable_ips: Option<Vec<IpNet>>,
    /// ACL tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Device posture attributes (replaces them all).
    #[serde(default)]
    pub posture: Option<BTreeMap<String, PostureValue>>,
}

/// Body of `PUT .../users/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    /// Email (what policies name).
    pub email: String,
    /// Role in the tailnet (`owner`, `admin`, `member`, ...).
    #[serde(default)]
    pub role: Option<String>,
}

/// A write to one tailnet.
#[derive(Debug)]
pub enum WriteOp {
    /// Create or replace a node.
    PutNode(String, NodeBody),
    /// Change some fields of a node.
    PatchNode(String, NodePatch),
    /// Remove a node.
    DeleteNode(String),
    /// Create or replace a user.
    PutUser(String, UserBody),
    /// Remove a user.
    DeleteUser(String),
    /// Replace the policy.
    SetPolicy(String),
    /// Replace users, nodes and settings (and the policy when given) at once.
    Import {
        /// The new policy text, if any.
        policy: Option<String>,
        /// The new state.
        tailnet: Box<Tailnet>,
    },
    /// Delete the tailnet.
    DeleteTailnet,
}

/// The result of a committed write.
#[derive(Debug)]
pub struct Outcome {
    /// The write created something new (201).
    pub created: bool,
    /// The state after the write (possibly later writes of the same batch too).
    pub published: Arc<Published>,
}

type Reply = oneshot::Sender<Result<Outcome, ApiError>>;

struct Job {
    op: WriteOp,
    reply: Reply,
}

struct Shared {
    state: RwLock<Arc<Published>>,
    events: broadcast::Sender<Arc<Event>>,
}

/// A tailnet held by the server.
pub struct TailnetHandle {
    name: String,
    shared: Arc<Shared>,
    jobs: SyncSender<Job>,
}

impl std::fmt::Debug for TailnetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailnetHandle")
            .field("name", &self.name)
            .finish()
    }
}

impl TailnetHandle {
    /// The tailnet's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last committed state (never waits for the writer).
    pub fn current(&self) -> Arc<Published> {
        match self.shared.state.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Subscribes to committed writes (call before [`current`](Self::current) so that nothing is
    /// missed in between).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.shared.events.subscribe()
    }

    /// Queues a write and waits until it is applied and durable (or rejected).
    pub async fn write(&self, op: WriteOp) -> Result<Outcome, ApiError> {
        let (tx, rx) = oneshot::channel();
        match self.jobs.try_send(Job { op, reply: tx }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::Unavailable(format!(
                    "write queue of tailnet {:?} is full; retry later",
                    self.name
                )))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::NotFound(format!(
                    "tailnet {:?} not found",
                    self.name
                )))
            }
        }
        rx.await
            .map_err(|_| ApiError::NotFound(format!("tailnet {:?} not found", self.name)))?
    }
}

/// Whether a tailnet's settings make it IPv6-only.
pub fn ipv6_only(s: &TailnetSettings) -> bool {
    is_ipv6_only(s)
}

/// Builds an engine for state loaded from the store. The policy's `tests` and the tailnet
/// checks gated the write that set the policy, not restarts: a node a test names may have gone
/// since, and the stored tailnet must still come up.
pub fn restore_engine(policy: &str, tailnet: Tailnet) -> Result<Engine, CoreError> {
    Engine::restore(policy, tailnet)
}

/// RFC 3339 in UTC with nanoseconds, for `created`.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(0);
    netmap_core::format_rfc3339(secs, d.subsec_nanos())
}

/// What is in use in the tailnet (the core validator's index, kept in step with every write)
/// and where address allocation goes on from.
#[derive(Debug, Default)]
struct AddrIndex {
    index: StateIndex,
    next_v4: u32,
    next_v6: u128,
}

const V4_FIRST: u32 = 0x6440_0001; // 100.64.0.1
const V4_LAST: u32 = 0x647f_fffe; // 100.127.255.254
const V6_BASE: u128 = 0xfd7a_115c_a1e0_u128 << 80; // fd7a:115c:a1e0::/48
const V6_LAST: u128 = (1u128 << 80) - 2;

fn v4_reserved(a: u32) -> bool {
    let last = a & 0xff;
    // 100.100.100.0/24 (Tailscale's service addresses), 100.115.92.0/23 (not in the tailnet
    // range), and .0 / .255 (look like network/broadcast addresses to some tools).
    (a & 0xffff_ff00) == 0x6464_6400
        || (a & 0xffff_fe00) == 0x6473_5c00
        || last == 0
        || last == 0xff
}

fn v6_reserved(off: u128) -> bool {
    // ::53 is Tailscale's DNS service; fd7a:115c:a1e0:b1a::/64 holds 4via6 routes.
    off == 0x53 || (off >> 64) == 0xb1a
}

impl AddrIndex {
    fn build(t: &Tailnet) -> AddrIndex {
        AddrIndex {
            index: StateIndex::new(t),
            ..AddrIndex::default()
        }
    }

    fn alloc_v4(&mut self) -> Option<Ipv4Addr> {
        let span = V4_LAST - V4_FIRST + 1;
        for i in 0..span {
            let a = V4_FIRST + (self.next_v4.wrapping_add(i) % span);
            let addr = Ipv4Addr::from(a);
            if !v4_reserved(a) && self.index.v4_holder(addr).is_none() {
                self.next_v4 = a - V4_FIRST + 1;
                return Some(addr);
            }
        }
        None
    }

    fn alloc_v6(&mut self) -> Option<Ipv6Addr> {
        // The space is 2^80 addresses: a linear probe from the cursor always ends quickly.
        let used = self.index.address_counts().1 as u128;
        for i in 0..(used + 3) {
            let off = (self.next_v6.wrapping_add(i) % V6_LAST) + 1;
            let addr = Ipv6Addr::from(V6_BASE | off);
            if !v6_reserved(off) && self.index.v6_holder(addr).is_none() {
                self.next_v6 = off;
                return Some(addr);
            }
        }
        None
    }
}

struct Writer {
    name: String,
    /// Most nodes the tailnet may hold.
    max_nodes: usize,
    /// At most this many writes per commit (half the stream buffer, so that one batch cannot
    /// push a reading stream out of the buffer).
    max_batch: usize,
    engine: Engine,
    policy_text: Arc<str>,
    seq: u64,
    addrs: AddrIndex,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
}

/// What applying one op did (before commit).
struct Applied {
    created: bool,
    kind: EventKind,
    policy_changed: bool,
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::BadRequest(m.into())
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            if self.process(batch) {
                return;
            }
        }
    }

    /// Applies a batch, commits once, publishes, replies. Returns true when the tailnet is gone.
    fn process(&mut self, batch: Vec<Job>) -> bool {
        let before = self.engine.snapshot();
        let before_seq = self.seq;
        let mut policy_changed = false;
        let mut events = Vec::new();
        let mut replies: Vec<(Reply, Result<bool, ApiError>)> = Vec::new();
        let mut delete = None;
        let mut jobs = batch.into_iter();
        for job in jobs.by_ref() {
            if let WriteOp::DeleteTailnet = job.op {
                delete = Some(job.reply);
                break;
            }
            let t0 = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(job.op)))
                .unwrap_or_else(|_| Err(ApiError::Internal("engine panicked".to_string())));
            self.metrics.observe_apply(t0.elapsed());
            match r {
                Ok(a) => {
                    self.seq += 1;
                    policy_changed |= a.policy_changed;
                    events.push(Event {
                        seq: self.seq,
                        snapshot: self.engine.snapshot(),
                        kind: a.kind,
                    });
                    replies.push((job.reply, Ok(a.created)));
                }
                Err(ApiError::Internal(m)) => {
                    // The engine may be inconsistent after a panic: rebuild from what is committed.
                    replies.push((job.reply, Err(ApiError::Internal(m))));
                    self.rebuild_from(&before, before_seq);
                    events.clear();
                    for (_, r) in replies.iter_mut() {
                        if r.is_ok() {
                            *r = Err(ApiError::Unavailable(
                                "write aborted by a failing write in the same batch; retry".into(),
                            ));
                        }
                    }
                    policy_changed = false;
                }
                Err(e) => replies.push((job.reply, Err(e))),
            }
        }
        if self.seq > before_seq {
            let after = self.engine.snapshot();
            let t0 = Instant::now();
            let res = self.store.commit(
                &self.name,
                before.tailnet(),
                after.tailnet(),
                policy_changed.then_some(&*self.policy_text),
                self.seq,
            );
            self.metrics.observe_commit(t0.elapsed());
            match res {
                Ok(()) => {
                    let published = Arc::new(Published {
                        seq: self.seq,
                        snapshot: after,
                        policy_text: self.policy_text.clone(),
                    });
                    self.publish(published.clone());
                    for ev in events {
                        let _ = self.shared.events.send(Arc::new(ev));
                    }
                    for (reply, r) in replies {
                        let _ = reply.send(r.map(|created| Outcome {
                            created,
                            published: published.clone(),
                        }));
                    }
                }
                Err(e) => {
                    tracing::error!(tailnet = %self.name, error = %e, "commit failed; writes rejected");
                    self.rebuild_from(&before, before_seq);
                    for (reply, r) in replies {
                        let _ = reply.send(r.and(Err(ApiError::Internal(format!("commit: {e}")))));
                    }
                }
            }
        } else {
            let published = self.current();
            for (reply, r) in replies {
                let _ = reply.send(r.map(|created| Outcome {
                    created,
                    published: published.clone(),
                }));
            }
        }
        if let Some(reply) = delete {
            match self.store.delete_tailnet(&self.name) {
                Ok(_) => {
                    let _ = self.shared.events.send(Arc::new(Event {
                        seq: self.seq,
                        snapshot: self.engine.snapshot(),
                        kind: EventKind::Deleted,
                    }));
                    let _ = reply.send(Ok(Outcome {
                        created: false,
                        published: self.current(),
                    }));
                    // Writes queued behind the delete see their reply channel dropped: 404.
                    drop(jobs);
                    return true;
                }
                Err(e) => {
                    let _ = reply.send(Err(ApiError::Internal(format!("delete: {e}"))));
                }
            }
            // Jobs after a failed delete are retried by their clients.
            for job in jobs {
                let _ = job.reply.send(Err(ApiError::Unavailable(
                    "tailnet delete failed; retry".into(),
                )));
            }
        }
        false
    }

    fn current(&self) -> Arc<Published> {
        match self.shared.state.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn publish(&self, p: Arc<Published>) {
        match self.shared.state.write() {
            Ok(mut g) => *g = p,
            Err(poisoned) => *poisoned.into_inner() = p,
        }
    }

    /// Goes back to the last committed state after a failed commit or a panic.
    fn rebuild_from(&mut self, before: &Snapshot, seq: u64) {
        let published = self.current();
        self.policy_text = published.policy_text.clone();
        self.seq = seq;
        match restore_engine(&published.policy_text, before.tailnet().clone()) {
            Ok(e) => self.engine = e,
            Err(e) => tracing::error!(tailnet = %self.name, error = %e, "could not rebuild engine"),
        }
        self.addrs = AddrIndex::build(self.engine.snapshot().tailnet());
    }

    /// Checks node `name` as it would be after the write and applies it through the engine.
    fn upsert_node(
        &mut self,
        name: String,
        node: Node,
        existing: Option<&Node>,
    ) -> Result<ChangeSet, ApiError> {
        let snap = self.engine.snapshot();
        let t = snap.tailnet();
        if existing.is_none() && t.nodes.len() >= self.max_nodes {
            return Err(ApiError::Conflict(format!(
                "tailnet {:?} has {} nodes, its limit (max_nodes_per_tailnet)",
                self.name,
                t.nodes.len()
            )));
        }
        self.addrs.index.check_node(&name, &node, &t.users)?;
        let cs = self.engine.apply(Change::UpsertNode {
            node: name.clone(),
            value: node.clone(),
        })?;
        if let Some(old) = existing {
            self.addrs.index.remove_node(&name, old);
        }
        self.addrs.index.insert_node(&name, &node);
        Ok(cs)
    }

    fn apply(&mut self, op: WriteOp) -> Result<Applied, ApiError> {
        let changes = |cs: ChangeSet| EventKind::Changes(cs);
        match op {
            WriteOp::PutNode(name, body) => {
                let snap = self.engine.snapshot();
                let existing = snap.tailnet().nodes.get(&name).cloned();
                let node = self.node_from_body(&name, body, existing.as_deref(), snap.tailnet())?;
                let cs = self.upsert_node(name, node, existing.as_deref())?;
                Ok(Applied {
                    created: existing.is_none(),
                    kind: changes(cs),
                    policy_changed: false,
                })
            }
            WriteOp::PatchNode(name, p) => {
                let snap = self.engine.snapshot();
                let Some(old) = snap.tailnet().nodes.get(&name).cloned() else {
                    return Err(ApiError::NotFound(format!("node {name:?} not found")));
                };
                if p.online.is_none()
                    && p.approved_routes.is_none()
                    && p.routable_ips.is_none()
                    && p.tags.is_none()
                    && p.posture.is_none()
                {
                    return Err(bad(
                        "empty patch: give online, approved_routes, routable_ips, tags or posture",
                    ));
                }
                let mut n = (*old).clone();
                if let Some(o) = p.online {
                    n.online = o;
                }
                if let Some(r) = p.approved_routes {
                    n.approved_routes = r;
                }
                if let Some(r) = p.routable_ips {
                    n.routable_ips = r;
                }
                if let Some(t) = p.tags {
                    // As in Tailscale: a tagged node belongs to its tags, not to a user.
                    if !t.is_empty() {
                        n.user = None;
                    }
                    n.tags = t;
                }
                if let Some(a) = p.posture {
                    n.posture = a;
                }
                // The cheaper engine changes when only the online flag or the approvals moved.
                let only = |same: bool| same && n != *old;
                let change = if only(
                    Node {
                        online: old.online,
                        ..n.clone()
                    } == *old,
                ) {
                    Change::SetOnline {
                        node: name.clone(),
                        online: n.online,
                    }
                } else if only(
                    Node {
                        approved_routes: old.approved_routes.clone(),
                        ..n.clone()
                    } == *old,
                ) {
                    self.addrs
                        .index
                        .check_node(&name, &n, &snap.tailnet().users)?;
                    Change::ApproveRoutes {
                        node: name.clone(),
                        routes: n.approved_routes.clone(),
                    }
                } else {
                    let cs = self.upsert_node(name, n, Some(&old))?;
                    return Ok(Applied {
                        created: false,
                        kind: changes(cs),
                        policy_changed: false,
                    });
                };
                let cs = self.engine.apply(change)?;
                Ok(Applied {
                    created: false,
                    kind: changes(cs),
                    policy_changed: false,
                })
            }
            WriteOp::DeleteNode(name) => {
                let old = self.engine.snapshot().tailnet().nodes.get(&name).cloned();
                let Some(old) = old else {
                    return Err(ApiError::NotFound(format!("node {name:?} not found")));
                };
                let cs = self
                    .engine
                    .apply(Change::RemoveNode { node: name.clone() })?;
                self.addrs.index.remove_node(&name, &old);
                Ok(Applied {
                    created: false,
                    kind: changes(cs),
                    policy_changed: false,
                })
            }
            WriteOp::PutUser(name, body) => {
                let snap = self.engine.snapshot();
                let users = &snap.tailnet().users;
                let existing = users.get(&name).cloned();
                let id = match &existing {
                    Some(u) => u.id,
                    None => users.values().map(|u| u.id).max().unwrap_or(0) + 1,
                };
                let user = User {
                    id,
                    name,
                    email: body.email,
                    role: body.role,
                };
                self.addrs.index.check_user(&user)?;
                let cs = self
                    .engine
                    .apply(Change::UpsertUser { user: user.clone() })?;
                self.addrs.index.insert_user(&user, existing.as_ref());
                Ok(Applied {
                    created: existing.is_none(),
                    kind: changes(cs),
                    policy_changed: false,
                })
            }
            WriteOp::DeleteUser(name) => {
                let Some(old) = self.engine.snapshot().tailnet().users.get(&name).cloned() else {
                    return Err(ApiError::NotFound(format!("user {name:?} not found")));
                };
                self.addrs.index.check_remove_user(&name)?;
                let cs = self.engine.apply(Change::RemoveUser { name })?;
                self.addrs.index.remove_user(&old);
                Ok(Applied {
                    created: false,
                    kind: changes(cs),
                    policy_changed: false,
                })
            }
            WriteOp::SetPolicy(text) => {
                let cs = self.engine.apply(Change::SetPolicy {
                    policy: text.clone(),
                })?;
                self.policy_text = Arc::from(text);
                Ok(Applied {
                    created: false,
                    kind: changes(cs),
                    policy_changed: true,
                })
            }
            WriteOp::Import { policy, tailnet } => {
                // The handler checked the state with the validator (validate_tailnet).
                if tailnet.nodes.len() > self.max_nodes {
                    return Err(bad(format!(
                        "{} nodes: more than the limit of {} per tailnet",
                        tailnet.nodes.len(),
                        self.max_nodes
                    )));
                }
                let text: Arc<str> = match &policy {
                    Some(p) => Arc::from(p.as_str()),
                    None => self.policy_text.clone(),
                };
                let engine = Engine::new(&text, *tailnet)?;
                self.engine = engine;
                self.policy_text = text;
                self.addrs = AddrIndex::build(self.engine.snapshot().tailnet());
                Ok(Applied {
                    created: false,
                    kind: EventKind::Reset,
                    policy_changed: policy.is_some(),
                })
            }
            WriteOp::DeleteTailnet => Err(ApiError::Internal("delete handled by the batch".into())),
        }
    }

    /// The node a `PUT` body describes (addresses allocated when omitted); the validator checks
    /// it before it is applied.
    fn node_from_body(
        &mut self,
        name: &str,
        b: NodeBody,
        existing: Option<&Node>,
        t: &Tailnet,
    ) -> Result<Node, ApiError> {
        let v6_only = is_ipv6_only(&t.settings);
        let ipv4 = match b.ipv4 {
            Some(a) => a,
            None => match existing {
                Some(e) => e.ipv4,
                None if v6_only => None,
                None => Some(
                    self.addrs
                        .alloc_v4()
                        .ok_or_else(|| ApiError::Conflict("no free IPv4 address".into()))?,
                ),
            },
        };
        let ipv6 = match b.ipv6 {
            Some(a) => a,
            None => match existing {
                Some(e) => e.ipv6,
                None => Some(
                    self.addrs
                        .alloc_v6()
                        .ok_or_else(|| ApiError::Conflict("no free IPv6 address".into()))?,
                ),
            },
        };
        Ok(Node {
            hostname: b.hostname.unwrap_or_else(|| name.to_string()),
            user: b.user,
            tags: b.tags,
            ipv4,
            ipv6,
            routable_ips: b.routable_ips,
            approved_routes: b
                .approved_routes
                .or_else(|| existing.map(|e| e.approved_routes.clone()))
                .unwrap_or_default(),
            created: b
                .created
                .or_else(|| existing.map(|e| e.created.clone()))
                .unwrap_or_else(now_rfc3339),
            online: b.online.or(existing.map(|e| e.online)).unwrap_or(true),
            posture: b
                .posture
                .or_else(|| existing.map(|e| e.posture.clone()))
                .unwrap_or_default(),
        })
    }
}

/// A node as the API shows it.
pub fn node_json(snap: &Snapshot, name: &str) -> Option<Value> {
    let n = snap.tailnet().nodes.get(name)?;
    let addresses: Vec<String> = n.addrs().map(|a| a.to_string()).collect();
    let primary: Vec<String> = snap
        .tailnet()
        .primaries
        .iter()
        .filter(|(_, k)| k.as_str() == name)
        .map(|(p, _)| p.to_string())
        .collect();
    Some(json!({
        "id": name,
        "hostname": n.hostname,
        "dns_name": snap.dns_name(name),
        "user": n.user,
        "tags": n.tags,
        "ipv4": n.ipv4,
        "ipv6": n.ipv6,
        "addresses": addresses,
        "routable_ips": n.routable_ips,
        "approved_routes": n.approved_routes,
        "primary_routes": primary,
        "online": n.online,
        "created": n.created,
    }))
}

/// A tailnet whose stored state could not be loaded: its routes answer 503 naming the problem
/// until it is repaired (`PUT .../state`, or `PUT .../policy` when only the policy is bad) or
/// deleted.
#[derive(Debug, Clone)]
pub struct BrokenTailnet {
    /// Why it is broken (the row or the policy error).
    pub reason: String,
    /// Writes committed before it broke.
    pub seq: u64,
    /// The stored policy text, when readable.
    pub policy: Option<String>,
    /// The stored state, when every row could be read (only the policy is bad).
    pub tailnet: Option<Tailnet>,
}

/// A tailnet as the registry knows it.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Loaded and serving.
    Ready(Arc<TailnetHandle>),
    /// Stored but unreadable.
    Broken(Arc<BrokenTailnet>),
    /// No such tailnet.
    Missing,
}

/// Limits the registry applies to every tailnet.
#[derive(Debug, Clone, Copy)]
pub struct RegistryLimits {
    /// Change sets buffered per tailnet for streams.
    pub stream_buffer: usize,
    /// Writes queued per tailnet.
    pub write_queue: usize,
    /// Most nodes per tailnet.
    pub max_nodes: usize,
}

/// Every tailnet the server holds.
pub struct Registry {
    tailnets: RwLock<BTreeMap<String, Arc<TailnetHandle>>>,
    broken: RwLock<BTreeMap<String, Arc<BrokenTailnet>>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    limits: RegistryLimits,
    /// Serialises creation, deletion and repair.
    pub lifecycle: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// Why loading the stored tailnets failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
}

impl Registry {
    /// Loads every stored tailnet and starts its writer (blocking; seconds for large tailnets).
    /// A tailnet whose rows or policy cannot be read is kept aside as broken (logged with the
    /// tailnet and the row, counted in `netmap_tailnets_broken`); the others are served.
    pub fn load(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        limits: RegistryLimits,
    ) -> Result<Registry, LoadError> {
        let reg = Registry {
            tailnets: RwLock::new(BTreeMap::new()),
            broken: RwLock::new(BTreeMap::new()),
            store: store.clone(),
            metrics,
            limits,
            lifecycle: tokio::sync::Mutex::new(()),
        };
        for loaded in store.load_all()? {
            let st = match loaded {
                Ok(st) => st,
                Err(b) => {
                    let known = BrokenTailnet {
                        reason: String::new(),
                        seq: b.seq,
                        policy: b.policy.clone(),
                        tailnet: None,
                    };
                    reg.mark_broken(&b.tailnet.clone(), &b, Some(known));
                    continue;
                }
            };
            let StoredTailnet {
                name,
                policy,
                seq,
                tailnet,
            } = st;
            let t0 = Instant::now();
            let engine = match restore_engine(&policy, tailnet.clone()) {
                Ok(e) => e,
                Err(e) => {
                    let row = BrokenRow {
                        tailnet: name.clone(),
                        table: "tailnets",
                        row: format!("{name} (policy)"),
                        message: e.to_string(),
                        seq,
                        policy: None,
                    };
                    reg.mark_broken(
                        &name,
                        &row,
                        Some(BrokenTailnet {
                            reason: String::new(),
                            seq,
                            policy: Some(policy),
                            tailnet: Some(tailnet),
                        }),
                    );
                    continue;
                }
            };
            tracing::info!(tailnet = %name, nodes = engine.snapshot().tailnet().nodes.len(), seq, elapsed_ms = t0.elapsed().as_millis() as u64, "tailnet loaded");
            reg.start(name, engine, Arc::from(policy), seq);
        }
        Ok(reg)
    }

    fn mark_broken(&self, name: &str, row: &BrokenRow, known: Option<BrokenTailnet>) {
        tracing::error!(tailnet = %name, table = row.table, row = %row.row, error = %row.message, "tailnet not loaded: its stored state cannot be read; repair it with PUT /v1/tailnets/{name}/state (or /policy) or delete it");
        let mut b = known.unwrap_or(BrokenTailnet {
            reason: String::new(),
            seq: 0,
            policy: None,
            tailnet: None,
        });
        b.reason = row.to_string();
        if let Ok(mut m) = self.broken.write() {
            m.insert(name.to_string(), Arc::new(b));
            self.metrics.set_broken(m.len());
        }
    }

    fn start(
        &self,
        name: String,
        engine: Engine,
        policy_text: Arc<str>,
        seq: u64,
    ) -> Arc<TailnetHandle> {
        let (events, _) = broadcast::channel(self.limits.stream_buffer);
        let shared = Arc::new(Shared {
            state: RwLock::new(Arc::new(Published {
                seq,
                snapshot: engine.snapshot(),
                policy_text: policy_text.clone(),
            })),
            events,
        });
        let (tx, rx) = mpsc::sync_channel(self.limits.write_queue);
        let writer = Writer {
            name: name.clone(),
            max_nodes: self.limits.max_nodes,
            max_batch: (self.limits.stream_buffer / 2).clamp(1, 256),
            addrs: AddrIndex::build(engine.snapshot().tailnet()),
            engine,
            policy_text,
            seq,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            shared: shared.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("tailnet-{name}"))
            .spawn(move || writer.run(rx));
        if let Err(e) = spawned {
            tracing::error!(tailnet = %name, error = %e, "cannot start writer thread");
        }
        let h = Arc::new(TailnetHandle {
            name: name.clone(),
            shared,
            jobs: tx,
        });
        if let Ok(mut m) = self.tailnets.write() {
            m.insert(name, h.clone());
        }
        h
    }

    /// The store the tailnets are kept in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A tailnet by name.
    pub fn get(&self, name: &str) -> Option<Arc<TailnetHandle>> {
        self.tailnets.read().ok()?.get(name).cloned()
    }

    /// A tailnet by name, broken ones included.
    pub fn lookup(&self, name: &str) -> Lookup {
        if let Some(h) = self.get(name) {
            return Lookup::Ready(h);
        }
        match self.broken.read().ok().and_then(|m| m.get(name).cloned()) {
            Some(b) => Lookup::Broken(b),
            None => Lookup::Missing,
        }
    }

    /// Every tailnet, by name.
    pub fn list(&self) -> Vec<Arc<TailnetHandle>> {
        self.tailnets
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every broken tailnet, by name.
    pub fn list_broken(&self) -> Vec<(String, Arc<BrokenTailnet>)> {
        self.broken
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Creates a tailnet (blocking: writes the store). `Ok(false)` when it exists with the same
    /// settings; `Conflict` when it exists with others.
    pub fn create(&self, name: &str, settings: TailnetSettings) -> Result<bool, ApiError> {
        match self.lookup(name) {
            Lookup::Ready(h) => {
                return if h.current().snapshot.tailnet().settings == settings {
                    Ok(false)
                } else {
                    Err(ApiError::Conflict(format!(
                        "tailnet {name:?} exists with other settings"
                    )))
                };
            }
            Lookup::Broken(b) => {
                return Err(ApiError::Conflict(format!(
                    "tailnet {name:?} exists but is broken ({}); repair it with PUT .../state or delete it",
                    b.reason
                )))
            }
            Lookup::Missing => {}
        }
        let tailnet = Tailnet {
            settings: settings.clone(),
            ..Tailnet::default()
        };
        let engine = Engine::new(DEFAULT_POLICY, tailnet)?;
        let created = self
            .store
            .create_tailnet(name, &settings, DEFAULT_POLICY, super::keys::now_secs())
            .map_err(|e| ApiError::Internal(format!("create tailnet: {e}")))?;
        if !created {
            return Err(ApiError::Conflict(format!("tailnet {name:?} exists")));
        }
        self.start(name.to_string(), engine, Arc::from(DEFAULT_POLICY), 0);
        Ok(true)
    }

    /// Repairs a broken tailnet (blocking): builds it from `tailnet` (or the stored state when
    /// only the policy was bad) and `policy` (or the stored one), checks it as a new write
    /// would be checked, replaces everything stored for it and starts serving it. Returns the
    /// handle.
    pub fn repair(
        &self,
        name: &str,
        policy: Option<String>,
        tailnet: Option<Tailnet>,
    ) -> Result<Arc<TailnetHandle>, ApiError> {
        let Lookup::Broken(b) = self.lookup(name) else {
            return Err(ApiError::Conflict(format!(
                "tailnet {name:?} is not broken"
            )));
        };
        let tailnet = tailnet.or_else(|| b.tailnet.clone()).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "tailnet {name:?} is broken ({}): send the whole state with PUT .../state",
                b.reason
            ))
        })?;
        let policy = policy.or_else(|| b.policy.clone()).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "tailnet {name:?} is broken ({}) and its policy cannot be read: include \"policy\"",
                b.reason
            ))
        })?;
        let engine = Engine::new(&policy, tailnet)?;
        let seq = b.seq + 1;
        self.store
            .replace(name, engine.snapshot().tailnet(), Some(&policy), seq)
            .map_err(|e| ApiError::Internal(format!("repair tailnet: {e}")))?;
        tracing::warn!(tailnet = %name, seq, "broken tailnet repaired");
        if let Ok(mut m) = self.broken.write() {
            m.remove(name);
            self.metrics.set_broken(m.len());
        }
        Ok(self.start(name.to_string(), engine, Arc::from(policy), seq))
    }

    /// Deletes a broken tailnet from the store (blocking).
    pub fn delete_broken(&self, name: &str) -> Result<(), ApiError> {
        self.store
            .delete_tailnet(name)
            .map_err(|e| ApiError::Internal(format!("delete: {e}")))?;
        if let Ok(mut m) = self.broken.write() {
            m.remove(name);
            self.metrics.set_broken(m.len());
        }
        Ok(())
    }

    /// Forgets a deleted tailnet.
    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.tailnets.write() {
            m.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn restart_does_not_rerun_policy_tests() {
        // The tests passed when the policy was set; the node they name went away since.
        let policy = r#"{
          "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
          "tests": [{"src": "a@x.example", "accept": ["100.64.0.1:22"]}],
        }"#;
        let t = Tailnet::default();
        assert!(matches!(
            Engine::new(policy, t.clone()),
            Err(CoreError::TestsFailed(_))
        ));
        let e = restore_engine(policy, t).unwrap();
        assert!(e.snapshot().node_count() == 0);
        // Invalid policies still fail.
        assert!(restore_engine("{\"acls\": 3}", Tailnet::default()).is_err());
    }

    #[test]
    fn allocation_skips_used_and_reserved_addresses() {
        let mut ix = AddrIndex::default();
        let a = ix.alloc_v4().unwrap();
        assert_eq!(a, Ipv4Addr::new(100, 64, 0, 1));
        ix.index.insert_node(
            "x",
            &Node {
                ipv4: Some(Ipv4Addr::new(100, 64, 0, 2)),
                ..Node::default()
            },
        );
        assert_eq!(ix.alloc_v4().unwrap(), Ipv4Addr::new(100, 64, 0, 3));
        assert!(v4_reserved(u32::from(Ipv4Addr::new(100, 100, 100, 100))));
        assert!(v4_reserved(u32::from(Ipv4Addr::new(100, 100, 100, 7))));
        assert!(v6_reserved(0x53));
        assert!(v4_reserved(u32::from(Ipv4Addr::new(100, 115, 93, 7))));
        assert!(!v4_reserved(u32::from(Ipv4Addr::new(100, 115, 94, 7))));
        let six = ix.alloc_v6().unwrap();
        assert_eq!(six, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().unwrap());
        assert!(now_rfc3339().ends_with('Z'));
        assert!(netmap_core::parse_rfc3339(&now_rfc3339()).is_some());
    }
}
