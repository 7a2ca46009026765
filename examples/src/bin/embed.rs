//! Embedding the netmap engine in a control plane.
//!
//! A control plane keeps one [`Engine`] per tailnet. Each event (a node connects or leaves,
//! an administrator saves the policy) becomes a [`Change`]; `apply` returns a [`ChangeSet`]
//! naming exactly the nodes whose view changed and what changed for each, so the control
//! plane pushes an update to those nodes only. Readers (an API, a netmap stream) take
//! [`Engine::snapshot`]s, which are O(1) and never block the writer.
//!
//! ```text
//! cargo run -p netmap-examples --bin embed [POLICY STATE]
//! ```
//!
//! Without arguments it loads `examples/policy.hujson` and `examples/state.json` when they
//! exist, else a small tailnet written below.

use std::error::Error;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::ExitCode;

use netmap_core::{Change, ChangeSet, Engine, Node, NodeDelta, Snapshot, Tailnet};

/// Used when `examples/policy.hujson` / `examples/state.json` are absent.
const INLINE_POLICY: &str = r#"{
  "groups": {"group:admins": ["ann@example.com"]},
  "tagOwners": {"tag:server": ["group:admins"]},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "tag:server:443"]},
    {"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"]},
  ],
}"#;
const INLINE_STATE: &str = r#"{
  "users": [
    {"id": 1, "name": "ann", "email": "ann@example.com"},
    {"id": 2, "name": "ben", "email": "ben@example.com"}
  ],
  "nodes": {
    "ann-laptop": {"hostname": "ann-laptop", "user": "ann", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1", "created": "2026-01-01T09:00:00Z"},
    "ben-laptop": {"hostname": "ben-laptop", "user": "ben", "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2", "created": "2026-01-01T09:05:00Z"},
    "server-1": {"hostname": "server-1", "tags": ["tag:server"], "ipv4": "100.64.0.3", "ipv6": "fd7a:115c:a1e0::3", "created": "2026-01-01T09:10:00Z"}
  },
  "tailnet": {"name": "example.com"}
}"#;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let (policy, state) = load_inputs()?;
    let tailnet = Tailnet::from_state_json(&state)?;
    let mut cp = ControlPlane {
        engine: Engine::new(&policy, tailnet)?,
    };
    cp.send_full_netmaps();

    let snap = cp.engine.snapshot();
    let nodes = &snap.tailnet().nodes;
    // A user's device goes to sleep, then wakes up.
    if let Some((name, _)) = nodes.iter().find(|(_, n)| n.user.is_some()) {
        cp.handle(&format!("{name} disconnects"), set_online(name, false));
        cp.handle(&format!("{name} reconnects"), set_online(name, true));
    }
    // A subnet router drops off: its routes fail over to another router if there is one.
    let subnet_router = nodes
        .iter()
        .find(|(_, n)| n.routable_ips.iter().any(|r| r.prefix_len() > 0));
    if let Some((name, _)) = subnet_router {
        cp.handle(
            &format!("router {name} disconnects"),
            set_online(name, false),
        );
        cp.handle(&format!("router {name} reconnects"), set_online(name, true));
    }
    // A user registers a new device.
    if let Some(owner) = snap.tailnet().users.values().next() {
        let name = format!("{}-new-phone", owner.name);
        let value = new_device(&snap, &name, &owner.name);
        cp.handle(
            &format!("{name} registers"),
            Change::UpsertNode {
                node: name.clone(),
                value,
            },
        );
        // The administrator lets that user SSH everywhere; the policy's tests decide.
        if let Some(edited) = with_extra_rule(snap.policy_text(), &owner.email)? {
            cp.handle(
                &format!("policy edit: {} may reach *:22", owner.email),
                Change::SetPolicy { policy: edited },
            );
        }
        cp.handle(
            "policy edit with a typo",
            Change::SetPolicy {
                policy: "{\"acls\": [{\"action\": \"acept\"}]}".into(),
            },
        );
        cp.handle(
            &format!("{name} is removed"),
            Change::RemoveNode { node: name },
        );
    }
    Ok(())
}

/// The policy and state texts: command-line paths, the bundled example, or the inline one.
fn load_inputs() -> Result<(String, String), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    if let [policy, state] = args.as_slice() {
        return Ok((read(Path::new(policy))?, read(Path::new(state))?));
    }
    if !args.is_empty() {
        return Err("usage: embed [POLICY STATE]".into());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (policy, state) = (dir.join("policy.hujson"), dir.join("state.json"));
    if policy.is_file() && state.is_file() {
        println!("tailnet: {} + {}", policy.display(), state.display());
        Ok((read(&policy)?, read(&state)?))
    } else {
        println!("tailnet: the inline example");
        Ok((INLINE_POLICY.to_string(), INLINE_STATE.to_string()))
    }
}

/// The control plane's side: an engine and (here, printed) connections to nodes.
struct ControlPlane {
    engine: Engine,
}

impl ControlPlane {
    /// On connect, a node gets its whole view; afterwards only deltas.
    fn send_full_netmaps(&self) {
        let snap = self.engine.snapshot();
        println!("\n== initial netmaps ({} nodes)", snap.node_count());
        for name in snap.node_names() {
            println!("  -> {name}: full netmap, {}", view_size(&snap, name));
        }
    }

    /// Applies one event and pushes each affected node its delta. A rejected change (an
    /// invalid policy, a policy whose tests fail, an unknown node) leaves the engine as it was
    /// and reaches no node.
    fn handle(&mut self, event: &str, change: Change) {
        println!("\n== {event}");
        match self.engine.apply(change) {
            Err(e) => println!("  rejected, nothing pushed: {e}"),
            Ok(cs) => self.push(&cs),
        }
    }

    fn push(&self, cs: &ChangeSet) {
        if cs.is_empty() {
            println!("  no view changed, nothing pushed");
            return;
        }
        let snap = self.engine.snapshot();
        for (name, delta) in cs.iter() {
            println!("  -> {name}: {}", describe(delta, &snap, name));
        }
    }
}

/// One line per pushed delta.
fn describe(d: &NodeDelta, snap: &Snapshot, name: &str) -> String {
    if d.removed {
        return "removed: close its session".into();
    }
    let mut parts = Vec::new();
    if d.added {
        parts.push("new node: full netmap".to_string());
    }
    for (sign, peers) in [
        ("+", &d.peers_added),
        ("-", &d.peers_removed),
        ("~", &d.peers_changed),
    ] {
        if !peers.is_empty() {
            parts.push(format!("peers {sign}[{}]", peers.join(", ")));
        }
    }
    for (changed, what) in [
        (d.filter_changed, "packet filter"),
        (d.ssh_changed, "SSH rules"),
        (d.self_changed, "self view"),
    ] {
        if changed {
            parts.push(format!("{what} changed"));
        }
    }
    format!("{}; now {}", parts.join(", "), view_size(snap, name))
}

fn view_size(snap: &Snapshot, name: &str) -> String {
    match snap.view(name) {
        Some(v) => format!(
            "{} peers, {} filter rules, {} SSH rules",
            v.peers.len(),
            v.packet_filter.len(),
            v.ssh_rules.len()
        ),
        None => "no view".into(),
    }
}

fn set_online(node: &str, online: bool) -> Change {
    Change::SetOnline {
        node: node.to_string(),
        online,
    }
}

/// A device for `owner` with the addresses after the highest in use.
fn new_device(snap: &Snapshot, name: &str, owner: &str) -> Node {
    let nodes = || snap.tailnet().nodes.values();
    let v4 = nodes().filter_map(|n| n.ipv4).map(u32::from).max();
    let v6 = nodes().filter_map(|n| n.ipv6).map(u128::from).max();
    Node {
        hostname: name.to_string(),
        user: Some(owner.to_string()),
        ipv4: Some(Ipv4Addr::from(v4.unwrap_or(0x6440_0000) + 1)),
        ipv6: Some(Ipv6Addr::from(
            v6.unwrap_or(0xfd7a_115c_a1e0_u128 << 80) + 1,
        )),
        created: "2026-06-01T12:00:00Z".into(),
        online: true,
        ..Node::default()
    }
}

/// The policy with one more ACL: `email` may reach every node on port 22. HuJSON comments
/// are not kept (a real control plane edits the text the administrator saved).
fn with_extra_rule(policy: &str, email: &str) -> Result<Option<String>, Box<dyn Error>> {
    let mut doc = netmap_policy::hujson::parse(policy)
        .map_err(|e| format!("policy: {e}"))?
        .to_json();
    let Some(acls) = doc.get_mut("acls").and_then(|a| a.as_array_mut()) else {
        return Ok(None);
    };
    acls.push(serde_json::json!({"action": "accept", "src": [email], "dst": ["*:22"]}));
    Ok(Some(serde_json::to_string_pretty(&doc)?))
}
