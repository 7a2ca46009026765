//! Helpers for the `netmap serve` tests: spawn the server on 127.0.0.1 with an ephemeral port,
//! create keys with `netmap apikey create`, and a tiny HTTP/1.1 client (plain std sockets, so
//! the tests control every byte for the slowloris and stream cases).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test (`NETMAP_TEST_BIN` runs the tests against another build, e.g. an
/// older one to see a test fail on the bug it covers).
pub fn bin() -> String {
    std::env::var("NETMAP_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_netmap").to_string())
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.2, ...), so that one
/// test can act as several client IPs.
pub fn connect_from(from: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let local: SocketAddr = format!("{from}:0").parse().map_err(std::io::Error::other)?;
    sock.bind(&local.into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// One request on a fresh connection from loopback address `from`.
pub fn request_from(
    from: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    exchange(connect_from(from, addr)?, method, path, key, body)
}

/// Revokes a key with the CLI (its id is the 12 characters after `nmk_`).
pub fn revoke_key(data: &Path, key: &str) {
    let out = Command::new(bin())
        .args(["apikey", "revoke", "--data"])
        .arg(data)
        .arg(&key[4..16])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `netmap serve` on `data` expecting it to exit (not to listen); returns its exit code and
/// stderr, or `None` if it was still running after `within` (it is killed then).
pub fn serve_expecting_exit(
    data: &Path,
    extra: &[&str],
    within: Duration,
) -> Option<(i32, String)> {
    serve_expecting_exit_with(data, extra, &[], within)
}

/// [`serve_expecting_exit`] with environment variables instead of arguments.
pub fn serve_expecting_exit_env(
    data: &Path,
    env: &[(&str, &str)],
    within: Duration,
) -> Option<(i32, String)> {
    serve_expecting_exit_with(data, &[], env, within)
}

/// `netmap serve --listen LISTEN --data DATA ARGS...` with ENV, warnings-only logging and
/// no standard input; the caller sets stdout and stderr.
fn serve_command(data: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--listen", listen, "--data"])
        .arg(data)
        .args(args)
        .env("NETMAP_LOG_LEVEL", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn serve_expecting_exit_with(
    data: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> Option<(i32, String)> {
    let mut child = serve_command(data, "127.0.0.1:0", extra, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return Some((st.code().unwrap_or(-1), err));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!(
            "netmap-serve-test-{}-{name}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates an API key with the CLI.
pub fn create_key(data: &Path, tailnet: Option<&str>, expires: Option<&str>) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["apikey", "create", "--data"]).arg(data);
    if let Some(t) = tailnet {
        cmd.args(["--tailnet", t]);
    }
    if let Some(e) = expires {
        cmd.args(["--expires", e]);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running `netmap serve`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts the server on `data` with extra environment variables; waits until it listens.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_full(data, "127.0.0.1:0", env, &[])
    }

    /// Starts the server listening on `listen` (a fixed port survives a restart).
    pub fn start_at(data: &Path, listen: &str, env: &[(&str, &str)]) -> Server {
        Server::start_full(data, listen, env, &[])
    }

    /// Like [`start`](Self::start), with extra command-line arguments.
    pub fn start_with_args(data: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::start_full(data, "127.0.0.1:0", env, args)
    }

    /// Starts the server on `listen` with extra environment variables and arguments.
    pub fn start_full(data: &Path, listen: &str, env: &[(&str, &str)], args: &[&str]) -> Server {
        let mut child = serve_command(data, listen, args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server did not start");
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Server { child, addr }
    }

    pub fn req(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Resp {
        request(self.addr, method, path, key, body.map(str::as_bytes))
    }

    /// Sends SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status (None on timeout).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn seq(&self) -> u64 {
        self.header("x-netmap-seq").unwrap().parse().unwrap()
    }
}

pub fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
    close: bool,
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    let body = body.unwrap_or(b"");
    if !body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

/// Reads a response head: status and headers.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before the response",
        ));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads one chunk of a chunked body; `None` at the end.
pub fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(size);
    Ok(Some(buf))
}

fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> std::io::Result<Vec<u8>> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        while let Some(c) = read_chunk(r)? {
            out.extend(c);
        }
        Ok(out)
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut out = vec![0; n];
        r.read_exact(&mut out)?;
        Ok(out)
    } else {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }
}

/// One request on a fresh connection (`Connection: close`); panics on transport errors.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> Resp {
    try_request(addr, method, path, key, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request on a fresh connection; transport errors are returned.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    exchange(s, method, path, key, body)
}

/// One request and its whole response on a connected socket (60 s read timeout).
fn exchange(
    mut s: TcpStream,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    // A server may answer before it has read the whole body (413 on the declared length) and
    // close: the write then fails, but the answer is there to read, as for any HTTP client.
    let sent = write_request(&mut s, method, path, key, body, true);
    let mut r = BufReader::new(s);
    let (status, headers) = match (read_head(&mut r), sent) {
        (Ok(head), _) => head,
        (Err(_), Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(e),
    };
    let body = read_body(&mut r, &headers)?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// An open NDJSON stream.
pub struct Stream {
    r: BufReader<TcpStream>,
    pending: Vec<u8>,
}

impl Stream {
    pub fn open(addr: SocketAddr, path: &str, key: &str) -> Result<Stream, Resp> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write_request(&mut s, "GET", path, Some(key), None, false).unwrap();
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r).unwrap();
        if status != 200 {
            let body = read_body(&mut r, &headers).unwrap_or_default();
            return Err(Resp {
                status,
                headers,
                body,
            });
        }
        Ok(Stream {
            r,
            pending: Vec::new(),
        })
    }

    pub fn set_timeout(&self, d: Duration) {
        self.r.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    /// The next line as JSON; `None` when the stream ended.
    pub fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).unwrap());
            }
            match read_chunk(&mut self.r).unwrap() {
                Some(c) => self.pending.extend(c),
                None => return None,
            }
        }
    }

    /// The next line that is not a keep-alive.
    pub fn next_event(&mut self) -> Option<Value> {
        loop {
            let v = self.next()?;
            if v["type"] != "keepalive" {
                return Some(v);
            }
        }
    }
}

/// Starts a server with an admin key; returns (server, data dir, admin key).
pub fn start_with_admin(name: &str, env: &[(&str, &str)]) -> (Server, TempDir, String) {
    let dir = TempDir::new(name);
    let admin = create_key(&dir.0, None, None);
    let s = Server::start(&dir.0, env);
    (s, dir, admin)
}

/// A benchmark knob from the environment, or its default.
pub fn env_or(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The `p` quantile (0..=1) of sorted latencies; zero for none.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A process's peak RSS (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
