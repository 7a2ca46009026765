//! Registered machines and connections: which node key belongs to which node of which
//! tailnet, the keys, endpoints and hostinfo peers need, and how many map streams each node
//! has open. Persisted in the store's `machines` table; the server's Noise key in
//! `control_keys`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use netmap_control::keys::{DiscoPublic, MachineKeyPair, MachinePublic, NodePublic};
use netmap_core::Snapshot;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::serve::store::{MachineRow, Store, StoreError};
use crate::serve::tailnets::{NodePatch, Registry, WriteOp};

/// What the control layer keeps about a machine besides its keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineData {
    /// Disco key (zero until the first map request).
    #[serde(default)]
    pub disco_key: DiscoPublic,
    /// UDP endpoints the client reported.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The client's last Hostinfo.
    #[serde(default)]
    pub hostinfo: Value,
    /// Remove the node when it disconnects.
    #[serde(default)]
    pub ephemeral: bool,
    /// The engine node's `created` at registration: tells this registration apart from a
    /// later node that reuses the name.
    pub created: String,
    /// The client's capability version.
    #[serde(default)]
    pub cap: i64,
}

/// A registered machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Its tailnet.
    pub tailnet: String,
    /// Its node's name in the tailnet.
    pub node: String,
    /// Noise static key.
    pub machine_key: MachinePublic,
    /// WireGuard key.
    pub node_key: NodePublic,
    /// The rest.
    pub data: MachineData,
}

impl Machine {
    /// Whether the engine still has the node this machine registered as.
    pub fn is_current(&self, snap: &Snapshot) -> bool {
        snap.tailnet()
            .nodes
            .get(&self.node)
            .is_some_and(|n| n.created == self.data.created)
    }

    fn row(&self) -> Result<MachineRow, serde_json::Error> {
        Ok(MachineRow {
            tailnet: self.tailnet.clone(),
            node: self.node.clone(),
            machine_key: self.machine_key.to_string(),
            node_key: self.node_key.to_string(),
            data: serde_json::to_string(&self.data)?,
        })
    }

    fn from_row(r: &MachineRow) -> Result<Machine, String> {
        Ok(Machine {
            tailnet: r.tailnet.clone(),
            node: r.node.clone(),
            machine_key: MachinePublic::parse(&r.machine_key).map_err(|e| e.to_string())?,
            node_key: NodePublic::parse(&r.node_key).map_err(|e| e.to_string())?,
            data: serde_json::from_str(&r.data).map_err(|e| e.to_string())?,
        })
    }
}

/// A change to one peer that map streams pass on as a patch.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// The node.
    pub node: String,
    /// New online state.
    pub online: Option<bool>,
    /// New endpoints.
    pub endpoints: Option<Vec<String>>,
    /// New disco key.
    pub disco_key: Option<DiscoPublic>,
    /// New node key.
    pub key: Option<NodePublic>,
}

#[derive(Default)]
struct Inner {
    by_node_key: HashMap<NodePublic, Arc<Machine>>,
    by_name: HashMap<(String, String), Arc<Machine>>,
    connected: HashMap<(String, String), usize>,
}

/// The control protocol's state, shared by connections.
pub struct Control {
    /// The server's Noise key.
    pub key: MachineKeyPair,
    /// The tailnets.
    pub registry: Arc<Registry>,
    store: Arc<Store>,
    inner: RwLock<Inner>,
    patches: Mutex<HashMap<String, broadcast::Sender<Arc<Patch>>>>,
    /// Interval of keep-alive messages on map streams.
    pub keepalive: Duration,
    /// How long an ephemeral node may stay disconnected before it is removed.
    pub ephemeral_grace: Duration,
    /// Turns true on shutdown.
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("key", &self.key.public)
            .finish_non_exhaustive()
    }
}

/// Why the control state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ControlStateError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored server key is unreadable.
    #[error("control key: {0}")]
    Key(String),
}

fn lock_err<T>(p: std::sync::PoisonError<T>) -> T {
    p.into_inner()
}

impl Control {
    /// Loads (or creates) the server key and every registered machine (blocking).
    pub fn load(
        store: Arc<Store>,
        registry: Arc<Registry>,
        keepalive: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Control, ControlStateError> {
        let (private, public) = store.control_key(|| {
            let k = MachineKeyPair::generate().map_err(|e| e.to_string())?;
            Ok((k.private_text(), k.public.to_string()))
        })?;
        let key = MachineKeyPair::from_text(&private, &public)
            .map_err(|e| ControlStateError::Key(e.to_string()))?;
        let mut inner = Inner::default();
        for row in store.load_machines()? {
            match Machine::from_row(&row) {
                Ok(m) => {
                    let m = Arc::new(m);
                    inner.by_node_key.insert(m.node_key, m.clone());
                    inner.by_name.insert((m.tailnet.clone(), m.node.clone()), m);
                }
                Err(e) => {
                    tracing::error!(tailnet = %row.tailnet, node = %row.node, error = %e, "machine not loaded")
                }
            }
        }
        Ok(Control {
            key,
            registry,
            store,
            inner: RwLock::new(inner),
            patches: Mutex::new(HashMap::new()),
            keepalive: keepalive.min(Duration::from_secs(60)),
            ephemeral_grace: Duration::from_secs(30),
            shutdown,
        })
    }

    /// Registered machines.
    pub fn machine_count(&self) -> usize {
        self.inner.read().unwrap_or_else(lock_err).by_node_key.len()
    }

    /// The machine that registered `key`.
    pub fn by_node_key(&self, key: &NodePublic) -> Option<Arc<Machine>> {
        self.inner
            .read()
            .unwrap_or_else(lock_err)
            .by_node_key
            .get(key)
            .cloned()
    }

    /// The machine with this machine key, in any tailnet.
    pub fn by_machine_key(&self, key: &MachinePublic) -> Option<Arc<Machine>> {
        self.inner
            .read()
            .unwrap_or_else(lock_err)
            .by_name
            .values()
            .find(|m| m.machine_key == *key)
            .cloned()
    }

    /// The machine registered as node `node` of `tailnet`, if it is still that node.
    pub fn machine_of(&self, tailnet: &str, node: &str, snap: &Snapshot) -> Option<Arc<Machine>> {
        let m = self
            .inner
            .read()
            .unwrap_or_else(lock_err)
            .by_name
            .get(&(tailnet.to_string(), node.to_string()))
            .cloned()?;
        m.is_current(snap).then_some(m)
    }

    /// Whether a machine (other than one with `except` as machine key) holds the name.
    pub fn name_taken(&self, tailnet: &str, node: &str, except: &MachinePublic) -> bool {
        self.inner
            .read()
            .unwrap_or_else(lock_err)
            .by_name
            .get(&(tailnet.to_string(), node.to_string()))
            .is_some_and(|m| m.machine_key != *except)
    }

    /// Records a machine (replacing any with the same name, machine key or node key) and
    /// persists it.
    pub async fn save(&self, m: Machine) -> Result<Arc<Machine>, StoreError> {
        let row = m.row()?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.upsert_machine(&row))
            .await
            .map_err(|e| StoreError::Corrupt {
                table: "machines",
                message: format!("write task: {e}"),
            })??;
        let m = Arc::new(m);
        let mut g = self.inner.write().unwrap_or_else(lock_err);
        let stale: Vec<Arc<Machine>> = g
            .by_name
            .values()
            .filter(|o| {
                (o.machine_key == m.machine_key || o.node_key == m.node_key)
                    && (o.tailnet != m.tailnet || o.node != m.node)
            })
            .cloned()
            .collect();
        for o in stale {
            g.by_name.remove(&(o.tailnet.clone(), o.node.clone()));
            g.by_node_key.remove(&o.node_key);
        }
        if let Some(old) = g
            .by_name
            .insert((m.tailnet.clone(), m.node.clone()), m.clone())
        {
            g.by_node_key.remove(&old.node_key);
        }
        g.by_node_key.insert(m.node_key, m.clone());
        Ok(m)
    }

    /// Forgets a machine (memory and store).
    pub async fn forget(&self, tailnet: &str, node: &str) {
        {
            let mut g = self.inner.write().unwrap_or_else(lock_err);
            if let Some(m) = g.by_name.remove(&(tailnet.to_string(), node.to_string())) {
                g.by_node_key.remove(&m.node_key);
            }
        }
        let (store, t, n) = (self.store.clone(), tailnet.to_string(), node.to_string());
        let r = tokio::task::spawn_blocking(move || store.delete_machine(&t, &n)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(%tailnet, %node, error = %e, "could not delete machine");
        }
    }

    /// Subscribes to peer patches of a tailnet.
    pub fn subscribe(&self, tailnet: &str) -> broadcast::Receiver<Arc<Patch>> {
        let mut g = self.patches.lock().unwrap_or_else(lock_err);
        g.entry(tailnet.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    /// Sends a patch to the tailnet's map streams.
    pub fn emit(&self, tailnet: &str, patch: Patch) {
        let g = self.patches.lock().unwrap_or_else(lock_err);
        if let Some(tx) = g.get(tailnet) {
            let _ = tx.send(Arc::new(patch));
        }
    }

    /// Counts a new map stream; true when it is the node's first.
    pub fn connect(&self, tailnet: &str, node: &str) -> bool {
        let mut g = self.inner.write().unwrap_or_else(lock_err);
        let c = g
            .connected
            .entry((tailnet.to_string(), node.to_string()))
            .or_insert(0);
        *c += 1;
        *c == 1
    }

    /// Counts a closed map stream; true when it was the node's last.
    pub fn disconnect(&self, tailnet: &str, node: &str) -> bool {
        let mut g = self.inner.write().unwrap_or_else(lock_err);
        let key = (tailnet.to_string(), node.to_string());
        match g.connected.get_mut(&key) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                g.connected.remove(&key);
                true
            }
            None => false,
        }
    }

    /// Whether a node has a map stream open.
    pub fn is_connected(&self, tailnet: &str, node: &str) -> bool {
        self.inner
            .read()
            .unwrap_or_else(lock_err)
            .connected
            .contains_key(&(tailnet.to_string(), node.to_string()))
    }

    /// Marks every registered node offline (at start-up: nobody is connected yet; clients
    /// that reconnect come back online).
    pub async fn mark_all_offline(&self) {
        let nodes: Vec<(String, String)> = self
            .inner
            .read()
            .unwrap_or_else(lock_err)
            .by_name
            .keys()
            .cloned()
            .collect();
        for (t, n) in nodes {
            let Some(h) = self.registry.get(&t) else {
                continue;
            };
            let online = h
                .current()
                .snapshot
                .tailnet()
                .nodes
                .get(&n)
                .is_some_and(|x| x.online);
            if online {
                let patch = NodePatch {
                    online: Some(false),
                    ..NodePatch::default()
                };
                if let Err(e) = h.write(WriteOp::PatchNode(n.clone(), patch)).await {
                    tracing::warn!(tailnet = %t, node = %n, error = %e, "could not mark offline");
                }
            }
        }
    }
}
