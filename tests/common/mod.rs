//! Test harness: starts the real `holdfast` and `holdfast-wsm` binaries on
//! loopback (port 0), with a dev PKI made for each test, and stops them on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use holdfast::device::DeviceOptions;

pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        holdfast::pki::generate(dir.path()).unwrap();
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A child process stopped when dropped: SIGINT (holdfast closes what it
/// still holds at once, with close frames, where SIGTERM would drain over
/// `drain.stop_over_ms`), then SIGKILL.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub stderr_log: PathBuf,
    /// Later stdout lines (from this process and any it starts).
    pub lines: std::sync::mpsc::Receiver<String>,
    pub config: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a binary and waits for its first stdout line that starts with
/// `prefix`; returns the process and that line.
fn spawn_until(mut cmd: Command, prefix: &str, log: PathBuf) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let errf = std::fs::File::create(&log).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(errf).stdin(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(line.clone());
            line.clear();
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return (child, l.trim().to_string(), rx),
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                panic!("process did not print '{prefix}'; stderr: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        }
    }
}

/// The reference WSM binary (package `holdfast-wsm-ref`), next to
/// holdfast's own in the target directory. `cargo nextest run --workspace`
/// builds it; a test run of this package alone builds it here, once.
pub fn wsm_exe() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    workspace_exe("holdfast-wsm", "holdfast-wsm-ref", &BUILT)
}

/// The fleet blocklist follower, built like [`wsm_exe`].
pub fn blocklist_sync_exe() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    workspace_exe("holdfast-blocklist-sync", "holdfast-blocklist-sync", &BUILT)
}

/// A binary of another workspace package, beside holdfast's; built once if
/// missing.
fn workspace_exe(bin: &str, package: &str, built: &std::sync::Once) -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_holdfast")).with_file_name(bin);
    built.call_once(|| {
        if !exe.exists() {
            let profile = if exe.parent().is_some_and(|d| d.ends_with("release")) { vec!["--release"] } else { vec![] };
            let st = Command::new(env!("CARGO"))
                .args(["build", "-p", package])
                .args(profile)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap_or_else(|e| panic!("cargo build -p {package}: {e}"));
            assert!(st.success(), "cargo build -p {package} failed");
        }
    });
    exe
}

pub fn start_wsm(tmp: &Path, name: &str) -> Proc {
    start_wsm_args(tmp, name, &[])
}

/// Starts the reference WSM from a command made elsewhere (e.g. inside a
/// test host's network namespace), once it says where it listens.
pub fn start_wsm_cmd(tmp: &Path, name: &str, cmd: Command) -> Proc {
    let (child, line, lines) = spawn_until(cmd, "holdfast-wsm listening on ", tmp.join(format!("{name}.log")));
    let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
    Proc { child, addr, metrics: None, stderr_log: tmp.join(format!("{name}.log")), lines, config: None }
}

/// Starts the reference WSM with extra arguments (e.g. `--store`).
pub fn start_wsm_args(tmp: &Path, name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(wsm_exe());
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--node", name]).args(args);
    start_wsm_cmd(tmp, name, cmd)
}

/// A Redis server of the test's own (Debian's `redis-server`), on a free
/// port, nothing saved to disk; stopped when dropped.
pub struct RedisServer {
    pub child: Child,
    pub url: String,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_redis(tmp: &Path) -> RedisServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(tmp.join(format!("redis-{port}.log"))).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(tmp)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server; .ci/run installs it)");
    let url = format!("redis://127.0.0.1:{port}/");
    let r = RedisServer { child, url };
    let client = redis::Client::open(r.url.as_str()).unwrap();
    eventually(10, "redis to answer", || client.get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_ok());
    r
}

/// Writes a config for the dev PKI and starts `holdfast run`. `extra` is
/// TOML appended to the sections by name (e.g. websocket keys).
pub fn start_proxy(pki: &Pki, wsm: &[SocketAddr], shards: usize, tls_extra: &str, ws_extra: &str) -> Proc {
    start_proxy_env(pki, wsm, shards, tls_extra, ws_extra, &[])
}

/// As [`start_proxy`], with extra environment variables for holdfast.
pub fn start_proxy_env(pki: &Pki, wsm: &[SocketAddr], shards: usize, tls_extra: &str, ws_extra: &str, env: &[(&str, &str)]) -> Proc {
    start_proxy_full(pki, wsm, shards, tls_extra, ws_extra, "", env)
}

/// As [`start_proxy_env`], with extra `[upstream]` keys too.
pub fn start_proxy_full(
    pki: &Pki,
    wsm: &[SocketAddr],
    shards: usize,
    tls_extra: &str,
    ws_extra: &str,
    upstream_extra: &str,
    env: &[(&str, &str)],
) -> Proc {
    let extra = Extra { tls: tls_extra, ws: ws_extra, upstream: upstream_extra, buffers: "", tables: "" };
    start_proxy_extra(pki, wsm, shards, &extra, env)
}

/// Extra keys for each section of the test config.
#[derive(Default)]
pub struct Extra<'a> {
    pub tls: &'a str,
    pub ws: &'a str,
    pub upstream: &'a str,
    pub buffers: &'a str,
    /// Whole tables added at the end (e.g. "[reload]\nclose_spread_ms = 3000").
    pub tables: &'a str,
}

/// Writes a config for the dev PKI with `extra` keys and starts `holdfast run`.
pub fn start_proxy_extra(pki: &Pki, wsm: &[SocketAddr], shards: usize, extra: &Extra, env: &[(&str, &str)]) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wsm: Vec<String> = wsm.iter().map(|a| format!("\"{a}\"")).collect();
    let Extra { tls: tls_extra, ws: ws_extra, upstream: upstream_extra, buffers: buffers_extra, tables } = extra;
    let cfg = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
shards = {shards}

[tls]
cert_chain = "server-chain.pem"
key = "server.key"
blocklist = "blocklist.txt"
{tls_extra}

[[tls.client_ca]]
file = "fleet-2019.pem"
ignore_validity = true

[[tls.client_ca]]
file = "fleet-2024.pem"

[websocket]
{ws_extra}

[upstream]
wsm = [{}]
links_per_shard = 1
connect_timeout_ms = 500
{upstream_extra}

[buffers]
per_shard = 64
{buffers_extra}

[metrics]
addr = "127.0.0.1:0"

[control]
socket = "control-{pid}-{id}.sock"

{tables}
"#,
        wsm.join(", "),
        pid = std::process::id(),
        id = id,
    );
    let path = pki.path().join(format!("holdfast-{}-{id}.toml", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    start_holdfast_config(pki, &path, env)
}

/// Starts `holdfast run` on a config file already written.
pub fn start_holdfast_config(pki: &Pki, path: &Path, env: &[(&str, &str)]) -> Proc {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = path.to_path_buf();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    cmd.args(["run", "--config"]).arg(&path).env("HOLDFAST_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let log = pki.path().join(format!("holdfast-run-{id}.log"));
    let (child, line, lines) = spawn_until(cmd, "holdfast ready on ", log.clone());
    // "holdfast ready on ADDR shards=N metrics=ADDR"
    let parts: Vec<&str> = line.split_whitespace().collect();
    let addr = parts[3].parse().unwrap();
    let metrics = parts[5].strip_prefix("metrics=").and_then(|m| m.parse().ok());
    Proc { child, addr, metrics, stderr_log: log, lines, config: Some(path) }
}

pub fn opts(pki: &Pki, proxy: &Proc, device: &str) -> DeviceOptions {
    opts_at(pki, proxy.addr, device)
}

/// As [`opts`], for a proxy known by its address only.
pub fn opts_at(pki: &Pki, addr: SocketAddr, device: &str) -> DeviceOptions {
    DeviceOptions {
        addr,
        server_name: "localhost".into(),
        server_ca: pki.path().join("server-ca.pem"),
        cert: pki.path().join(format!("devices/{device}.pem")),
        key: pki.path().join(format!("devices/{device}.key")),
        path: "/".into(),
        subprotocols: vec![],
        version: None,
        suite: None,
        timeout: Duration::from_secs(10),
    }
}

/// Reads the proxy's Prometheus text.
pub fn metrics(proxy: &Proc) -> String {
    metrics_at(proxy.metrics.expect("metrics enabled"))
}

/// The metrics text from an endpoint address (usable from any thread).
pub fn metrics_at(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A metric without labels (`holdfast_config_generation 2`).
pub fn single(proxy: &Proc, name: &str) -> i64 {
    metrics(proxy)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .unwrap_or_else(|| panic!("no {name}"))
}

/// Sum of a metric over all its series whose labels contain `label` (may be "").
pub fn metric(proxy: &Proc, name: &str, label: &str) -> u64 {
    metrics(proxy)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `holdfast ctl --config CONFIG ARGS...`: whether it succeeded, and all it printed.
pub fn ctl(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("ctl").arg("--config").arg(config).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A loopback port free a moment ago (for tests that need a fixed port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls until `f` is true or panics after `secs`.
pub fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// Kills a process the test did not spawn directly (a holdfast started by a
/// live upgrade) when dropped: SIGTERM, then SIGKILL.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}
