//! `kill -9` of `netmap serve` during a burst of writes: after a restart every acknowledged write
//! is there, and every node's view equals a from-scratch `compute_all` over the reloaded state
//! (with its recorded MagicDNS names and primary routers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netmap_core::Tailnet;
use serde_json::{json, Value};
use serve_common::*;

const POLICY: &str = r#"{
  "groups": {"group:eng": ["alice@acme.example"]},
  "tagOwners": {"tag:web": ["group:eng"], "tag:router": ["group:eng"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["*:*"]},
    {"action": "accept", "src": ["bob@acme.example"], "dst": ["tag:web:443", "10.1.0.0/16:22"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:web:8080"]},
  ],
  "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}},
  "ssh": [{"action": "accept", "src": ["group:eng"], "dst": ["tag:web"], "users": ["root"]}],
}"#;

/// What a client knows about a node after its acknowledged writes.
#[derive(Debug, Clone)]
enum Known {
    /// Last acknowledged: this PUT/PATCH (expected fields).
    Present(Value),
    /// Last acknowledged: DELETE.
    Absent,
    /// A write was in flight when the server died: either outcome is fine.
    Unknown,
}

fn body_for(i: usize, j: usize) -> Value {
    match j % 4 {
        0 => json!({"hostname": format!("laptop-{i}"), "user": "alice"}),
        1 => json!({"hostname": format!("phone-{i}"), "user": "bob"}),
        2 => json!({"hostname": format!("web-{j}"), "tags": ["tag:web"]}),
        _ => json!({"hostname": "router", "tags": ["tag:router"], "routable_ips": ["10.1.0.0/16"]}),
    }
}

fn writer(
    addr: std::net::SocketAddr,
    key: String,
    i: usize,
    acks: Arc<AtomicUsize>,
    known: Arc<Mutex<BTreeMap<String, Known>>>,
    stop: Arc<AtomicBool>,
) {
    let mut mine: Vec<String> = Vec::new();
    for j in 0.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // Mostly new nodes; now and then delete or take offline an earlier one.
        let (method, name, body, expect) = if j % 5 == 4 && !mine.is_empty() {
            let victim = mine.remove(j % mine.len());
            ("DELETE", victim, None, Known::Absent)
        } else if j % 7 == 6 && !mine.is_empty() {
            let n = mine[j % mine.len()].clone();
            let prev = known.lock().unwrap().get(&n).cloned();
            let Some(Known::Present(mut v)) = prev else {
                continue;
            };
            v["online"] = json!(false);
            (
                "PATCH",
                n,
                Some(json!({"online": false}).to_string()),
                Known::Present(v),
            )
        } else {
            let n = format!("n{i}-{j}");
            let b = body_for(i, j);
            mine.push(n.clone());
            ("PUT", n, Some(b.to_string()), Known::Present(b))
        };
        known.lock().unwrap().insert(name.clone(), Known::Unknown);
        let path = format!("/v1/tailnets/acme/nodes/{name}");
        match try_request(
            addr,
            method,
            &path,
            Some(&key),
            body.as_deref().map(str::as_bytes),
        ) {
            Ok(r) if r.status < 300 => {
                known.lock().unwrap().insert(name, expect);
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r) => panic!("{method} {path}: {} {}", r.status, r.text()),
            // The server is gone: the write stays Unknown.
            Err(_) => return,
        }
    }
}

#[test]
fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = TempDir::new("durability");
    let admin = create_key(&dir.0, None, None);
    let mut s = Server::start(&dir.0, &[]);
    let k = Some(admin.as_str());
    assert_eq!(
        s.req(
            "PUT",
            "/v1/tailnets/acme",
            k,
            Some(r#"{"domain":"acme.example"}"#)
        )
        .status,
        201
    );
    for (u, e) in [("alice", "alice@acme.example"), ("bob", "bob@acme.example")] {
        let b = json!({"email": e}).to_string();
        assert_eq!(
            s.req("PUT", &format!("/v1/tailnets/acme/users/{u}"), k, Some(&b))
                .status,
            201
        );
    }
    let r = s.req("PUT", "/v1/tailnets/acme/policy", k, Some(POLICY));
    assert_eq!(r.status, 200, "{}", r.text());

    let acks = Arc::new(AtomicUsize::new(0));
    let known = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (acks, known, stop, key) =
                (acks.clone(), known.clone(), stop.clone(), admin.clone());
            let addr = s.addr;
            std::thread::spawn(move || writer(addr, key, i, acks, known, stop))
        })
        .collect();
    let t0 = Instant::now();
    while acks.load(Ordering::SeqCst) < 150 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    s.kill9();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acks.load(Ordering::SeqCst);
    assert!(
        acked >= 50,
        "only {acked} writes acknowledged before the kill"
    );

    // Restart on the same data directory.
    let s = Server::start(&dir.0, &[]);
    let st = s.req("GET", "/v1/tailnets/acme/state", k, None);
    assert_eq!(st.status, 200);
    let st = st.json();
    assert_eq!(st["policy"], POLICY);
    assert!(st["seq"].as_u64().unwrap() >= acked as u64 + 3);
    let nodes = st["nodes"].as_object().unwrap();
    let mut checked = 0;
    for (name, k) in known.lock().unwrap().iter() {
        match k {
            Known::Unknown => {}
            Known::Absent => {
                assert!(
                    !nodes.contains_key(name),
                    "{name} was deleted (acknowledged) but is back"
                );
                checked += 1;
            }
            Known::Present(want) => {
                let got = nodes
                    .get(name)
                    .unwrap_or_else(|| panic!("acknowledged {name} lost"));
                for f in ["hostname", "user", "tags", "routable_ips", "online"] {
                    if let Some(w) = want.get(f) {
                        assert_eq!(&got[f], w, "{name}.{f}");
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= acked.min(50), "checked {checked}");
    eprintln!("{acked} writes acknowledged before kill -9, {checked} nodes checked");

    // Every view equals a from-scratch computation over the reloaded state.
    let state_doc = json!({"users": st["users"], "nodes": st["nodes"], "tailnet": st["tailnet"]});
    let mut tailnet = Tailnet::from_state_json(&state_doc.to_string()).unwrap();
    tailnet.dns_names = Default::default();
    tailnet.dns_holders = Default::default();
    for (node, name) in st["dns_names"].as_object().unwrap() {
        let name = name.as_str().unwrap().to_string();
        tailnet.dns_holders.insert(name.clone(), node.clone());
        tailnet.dns_names.insert(node.clone(), name);
    }
    for (prefix, node) in st["primaries"].as_object().unwrap() {
        tailnet
            .primaries
            .insert(prefix.parse().unwrap(), node.as_str().unwrap().to_string());
    }
    let policy = netmap_policy::parse_policy(POLICY).unwrap();
    let computed = netmap_core::compute_all(&policy, &tailnet);
    assert_eq!(computed.views.len(), nodes.len());
    assert_eq!(
        computed.primaries, tailnet.primaries,
        "primaries are stable across restart"
    );
    assert!(
        !tailnet.primaries.is_empty(),
        "the burst elected a primary router"
    );
    for (name, view) in &computed.views {
        let r = s.req(
            "GET",
            &format!("/v1/tailnets/acme/nodes/{name}/netmap"),
            k,
            None,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.json(), json!(view), "view of {name} after restart");
        let n = s
            .req("GET", &format!("/v1/tailnets/acme/nodes/{name}"), k, None)
            .json();
        assert_eq!(n["dns_name"], st["dns_names"][name]);
    }
}
