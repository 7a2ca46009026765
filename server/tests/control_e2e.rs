//! End to end with real Tailscale clients (tailscaled + tailscale v1.102.5, userspace
//! networking, in-memory state, sockets in a temp dir, login server on 127.0.0.1): two clients
//! join with pre-auth keys (one from the API for a user, one from `netmap preauthkey create`
//! with a tag); each one's `tailscale debug netmap` equals netmap's own view of it (packet
//! filter, peers and addresses, SSH policy); a policy change reaches both (latency printed); a
//! removed node vanishes from both; after a server restart both reconnect and hold the same
//! netmap; a killed client shows offline to the other.
//!
//! The client binaries come from `NETMAP_TAILSCALE_BIN` (a directory), else
//! `$NETMAP_CACHE_DIR/tailscale-v1.102.5/bin` (default cache `~/.cache/netmap-ci`), where
//! `.ci/run` builds them. Without them the test prints a notice and passes, except under
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::{create_key, Server, TempDir};

const VERSION: &str = "v1.102.5";

fn client_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("NETMAP_TAILSCALE_BIN") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("NETMAP_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/netmap-ci"))
                })?;
            cache.join(format!("tailscale-{VERSION}")).join("bin")
        }
    };
    (dir.join("tailscaled").is_file() && dir.join("tailscale").is_file()).then_some(dir)
}

/// One tailscaled with its socket and state in a temp dir.
struct Client {
    name: String,
    bin: PathBuf,
    dir: PathBuf,
    daemon: Child,
    up: Option<Child>,
}

impl Client {
    fn start(bin: &Path, root: &Path, name: &str) -> Client {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("tailscaled.log")).unwrap();
        let daemon = Command::new(bin.join("tailscaled"))
            .arg("--tun=userspace-networking")
            .arg("--state=mem:")
            .arg(format!("--statedir={}", dir.display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg("--port=0")
            .arg("--no-logs-no-support")
            .env("TS_LOGS_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Client {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            dir,
            daemon,
            up: None,
        }
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(self.bin.join("tailscale"));
        c.arg(format!("--socket={}", self.dir.join("sock").display()));
        c.stdin(Stdio::null());
        c
    }

    /// `tailscale up` in the background (it waits for a relay or a live peer to call itself
    /// running, which a control-plane test has neither of; the netmap is what matters).
    fn up(&mut self, server: &str, authkey: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // The daemon's socket appears a moment after it starts.
        while !self.dir.join("sock").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let child = self
            .cli()
            .args([
                "up",
                &format!("--login-server={server}"),
                &format!("--authkey={authkey}"),
            ])
            .arg(format!("--hostname={}", self.name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.up = Some(child);
    }

    /// `tailscale debug netmap`, or None while the client has none.
    fn netmap(&self) -> Option<Value> {
        let out = self.cli().args(["debug", "netmap"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.get("SelfNode").filter(|n| !n.is_null())?;
        Some(v)
    }

    fn kill(&mut self) {
        if let Some(mut u) = self.up.take() {
            let _ = u.kill();
            let _ = u.wait();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Drops nulls, empty lists/maps and `false`, so that Go's and netmap's JSON compare.
fn canon(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            // Sorted keys: Go and serde (preserve_order) print fields in different orders.
            let sorted: std::collections::BTreeMap<&String, &Value> = m.iter().collect();
            Value::Object(
                sorted
                    .into_iter()
                    .filter(|(_, x)| {
                        !matches!(x, Value::Null | Value::Bool(false))
                            && **x != json!([])
                            && **x != json!({})
                    })
                    .map(|(k, x)| (k.clone(), canon(x)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canon).collect()),
        other => other.clone(),
    }
}

fn rule_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| a.iter().map(|r| canon(r).to_string()).collect())
        .unwrap_or_default()
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What the client holds, in comparable form: filter rules, peers (name, addresses, allowed
/// IPs), SSH rules.
fn client_side(nm: &Value) -> (BTreeSet<String>, BTreeSet<String>, Value) {
    let peers = nm["Peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    format!(
                        "{} {:?} {:?}",
                        p["StableID"].as_str().unwrap_or(""),
                        sorted(&p["Addresses"]),
                        sorted(&p["AllowedIPs"])
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let ssh = canon(nm["SSHPolicy"].get("rules").unwrap_or(&json!([])));
    (rule_set(&nm["PacketFilterRules"]), peers, ssh)
}

/// The same from netmap's own view of the node.
fn server_side(view: &Value) -> (BTreeSet<String>, BTreeSet<String>, Value) {
    let host = |a: &Value| -> Value {
        Value::Array(
            a.as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    let s = x.as_str().unwrap();
                    Value::String(if s.contains('/') {
                        s.to_string()
                    } else if s.contains(':') {
                        format!("{s}/128")
                    } else {
                        format!("{s}/32")
                    })
                })
                .collect(),
        )
    };
    let peers = view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {:?} {:?}",
                p["name"].as_str().unwrap(),
                sorted(&host(&p["addresses"])),
                sorted(&host(&p["allowed_ips"]))
            )
        })
        .collect();
    (
        rule_set(&view["packet_filter"]),
        peers,
        canon(&view["ssh_rules"]),
    )
}

fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const POLICY_1: &str = r#"{
  "tagOwners": {"tag:server": ["alice@acme.example"]},
  "acls": [
    {"action": "accept", "src": ["alice@acme.example"], "dst": ["*:*"]},
    {"action": "accept", "src": ["tag:server"], "dst": ["alice@acme.example:22"]}
  ],
  "ssh": [
    {"action": "accept", "src": ["alice@acme.example"], "dst": ["tag:server"], "users": ["root", "autogroup:nonroot"]}
  ]
}"#;

const POLICY_2: &str = r#"{
  "tagOwners": {"tag:server": ["alice@acme.example"]},
  "acls": [
    {"action": "accept", "src": ["alice@acme.example"], "dst": ["*:*"]},
    {"action": "accept", "src": ["tag:server"], "dst": ["alice@acme.example:443"]}
  ],
  "ssh": [
    {"action": "check", "src": ["alice@acme.example"], "dst": ["tag:server"], "users": ["root"]}
  ]
}"#;

#[test]
fn real_tailscale_clients_join_and_follow_changes() {
    let Some(bin) = client_dir() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Tailscale client binaries {VERSION} not found (NETMAP_TAILSCALE_BIN or the netmap-ci cache); .ci/run builds them");
        }
        eprintln!("control_e2e: Tailscale client binaries {VERSION} not found; skipping (set NETMAP_TAILSCALE_BIN, or run .ci/run once)");
        return;
    };
    let tmp = TempDir::new("control-e2e");
    let data = tmp.0.join("data");
    let key = create_key(&data, None, None);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_at(&data, &listen, &[]);
    let login = format!("http://{listen}");
    let k = Some(key.as_str());
    assert_eq!(
        server
            .req(
                "PUT",
                "/v1/tailnets/acme",
                k,
                Some(r#"{"domain":"acme.example"}"#)
            )
            .status,
        201
    );
    assert_eq!(
        server
            .req(
                "PUT",
                "/v1/tailnets/acme/users/alice",
                k,
                Some(r#"{"email":"alice@acme.example"}"#)
            )
            .status,
        201
    );
    assert_eq!(
        server
            .req("PUT", "/v1/tailnets/acme/policy", k, Some(POLICY_1))
            .status,
        200
    );
    // One key from the API (user), one from the CLI (tag).
    let r = server.req(
        "POST",
        "/v1/tailnets/acme/preauthkeys",
        k,
        Some(r#"{"user":"alice","reusable":true}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let user_key = r.json()["key"].as_str().unwrap().to_string();
    let out = Command::new(serve_common::bin())
        .args(["preauthkey", "create", "--data"])
        .arg(&data)
        .args(["--tailnet", "acme", "--tags", "tag:server"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tag_key = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let mut a = Client::start(&bin, &tmp.0, "laptop");
    let mut b = Client::start(&bin, &tmp.0, "server");
    a.up(&login, &user_key);
    b.up(&login, &tag_key);

    let view = |server: &Server, node: &str| -> Value {
        let r = server.req(
            "GET",
            &format!("/v1/tailnets/acme/nodes/{node}/netmap"),
            k,
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // Both joined: each sees the other, and holds exactly netmap's view.
    let matches = |server: &Server, c: &Client| -> Option<()> {
        let nm = c.netmap()?;
        let (got, want) = (client_side(&nm), server_side(&view(server, &c.name)));
        if got != want && std::env::var_os("NETMAP_E2E_DEBUG").is_some() {
            eprintln!("{}: client {got:?}\n   netmap {want:?}", c.name);
        }
        (got == want).then_some(())
    };
    let check_both = |server: &Server, a: &Client, b: &Client, what: &str| -> Duration {
        let t0 = Instant::now();
        wait_for(what, Duration::from_secs(60), || {
            matches(server, a)?;
            matches(server, b)
        });
        t0.elapsed()
    };
    check_both(&server, &a, &b, "both clients to hold netmap's view");
    let nodes = server.req("GET", "/v1/tailnets/acme/nodes", k, None).json();
    let names: BTreeSet<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["laptop", "server"]));
    let nm_a = a.netmap().unwrap();
    assert_eq!(nm_a["Peers"].as_array().unwrap().len(), 1);
    assert!(
        !rule_set(&nm_a["PacketFilterRules"]).is_empty(),
        "laptop has a filter"
    );
    let nm_b = b.netmap().unwrap();
    assert_eq!(
        nm_b["SSHPolicy"]["rules"].as_array().map_or(0, Vec::len),
        1,
        "server has the SSH rule"
    );
    assert_eq!(nm_b["SelfNode"]["Tags"], json!(["tag:server"]));

    // A policy change reaches both; latency = PUT answered → client shows the new filter.
    let expect_a = server_side(&view(&server, "laptop"));
    let t0 = Instant::now();
    assert_eq!(
        server
            .req("PUT", "/v1/tailnets/acme/policy", k, Some(POLICY_2))
            .status,
        200
    );
    let put_done = t0.elapsed();
    let (new_a, new_b) = (
        server_side(&view(&server, "laptop")),
        server_side(&view(&server, "server")),
    );
    assert_ne!(
        new_a, expect_a,
        "the policy change changes the laptop's view"
    );
    let mut lat = [None, None];
    let t1 = Instant::now();
    wait_for(
        "the policy change at both clients",
        Duration::from_secs(30),
        || {
            for (i, (c, want)) in [(&a, &new_a), (&b, &new_b)].into_iter().enumerate() {
                if lat[i].is_none() && c.netmap().is_some_and(|nm| client_side(&nm) == *want) {
                    lat[i] = Some(t1.elapsed() + put_done);
                }
            }
            (lat[0].is_some() && lat[1].is_some()).then_some(())
        },
    );
    eprintln!(
        "control_e2e: policy change visible at laptop after {} ms, at server after {} ms (including the {} ms PUT; polled with `tailscale debug netmap`)",
        lat[0].unwrap().as_millis(),
        lat[1].unwrap().as_millis(),
        put_done.as_millis()
    );

    // A node added through the API appears at both; removed, it vanishes from both.
    let r = server.req(
        "PUT",
        "/v1/tailnets/acme/nodes/printer",
        k,
        Some(r#"{"user":"alice"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let has_printer = |c: &Client| {
        c.netmap().map(|nm| {
            nm["Peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["StableID"] == "printer")
        })
    };
    wait_for("printer at both", Duration::from_secs(30), || {
        (has_printer(&a)? && has_printer(&b)?).then_some(())
    });
    check_both(&server, &a, &b, "views with the printer");
    assert_eq!(
        server
            .req("DELETE", "/v1/tailnets/acme/nodes/printer", k, None)
            .status,
        204
    );
    wait_for("printer gone at both", Duration::from_secs(30), || {
        (!has_printer(&a)? && !has_printer(&b)?).then_some(())
    });

    // Restart the server: both reconnect (online again) and hold the same netmap.
    let before = (
        a.netmap().map(|nm| client_side(&nm)),
        b.netmap().map(|nm| client_side(&nm)),
    );
    assert!(
        server.terminate(Duration::from_secs(20)).is_some(),
        "server stops on SIGTERM"
    );
    drop(server);
    let server = Server::start_at(&data, &listen, &[]);
    let online = |n: &str| {
        server
            .req("GET", &format!("/v1/tailnets/acme/nodes/{n}"), k, None)
            .json()["online"]
            == json!(true)
    };
    let t2 = Instant::now();
    wait_for(
        "both clients to reconnect",
        Duration::from_secs(120),
        || (online("laptop") && online("server")).then_some(()),
    );
    eprintln!(
        "control_e2e: both clients reconnected {} ms after the restart",
        t2.elapsed().as_millis()
    );
    check_both(&server, &a, &b, "the same netmap after the restart");
    assert_eq!(
        (
            a.netmap().map(|nm| client_side(&nm)),
            b.netmap().map(|nm| client_side(&nm))
        ),
        before
    );

    // Kill the tagged client: the laptop sees it offline.
    b.kill();
    wait_for(
        "server offline at the laptop",
        Duration::from_secs(60),
        || {
            let nm = a.netmap()?;
            let p = nm["Peers"]
                .as_array()?
                .iter()
                .find(|p| p["StableID"] == "server")?
                .clone();
            (p["Online"] == json!(false)).then_some(())
        },
    );
    assert_eq!(
        server
            .req("GET", "/v1/tailnets/acme/nodes/server", k, None)
            .json()["online"],
        json!(false)
    );
    a.kill();
}
