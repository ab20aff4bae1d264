//! Issue 12's acceptance tests: live reload under 2,000 devices that stream
//! numbered messages (each device has its own certificate; even ones from
//! the 2024 fleet CA, odd ones from the 2019 CA). Each change is a file
//! edit followed by SIGHUP (or `holdfast reload` / `holdfast ctl`); the
//! devices have no reconnect, so any close they were not meant to get is
//! an error, and every echo must be the message just sent.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device_async::WsClient;
use holdfast::ws::frame::op;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const DEVICES: usize = 2000;
const EVERY: Duration = Duration::from_millis(1000);
const SPREAD_MS: u64 = 3000;

/// How a device was closed: its close code, and when.
type Closed = Option<(Option<u16>, Instant)>;

/// What the devices saw, shared with the operator thread.
struct Seen {
    answered: Vec<AtomicU64>,
    /// Close code and when, for devices holdfast closed.
    closed: Mutex<Vec<Closed>>,
    errors: Mutex<Vec<String>>,
    connected: AtomicUsize,
}

impl Seen {
    fn new() -> Arc<Seen> {
        Arc::new(Seen {
            answered: (0..DEVICES).map(|_| AtomicU64::new(0)).collect(),
            closed: Mutex::new(vec![None; DEVICES]),
            errors: Mutex::default(),
            connected: AtomicUsize::new(0),
        })
    }

    fn closed(&self) -> Vec<(usize, Option<u16>, Instant)> {
        self.closed.lock().unwrap().iter().enumerate().filter_map(|(i, c)| c.map(|(code, at)| (i, code, at))).collect()
    }

    fn answered(&self) -> Vec<u64> {
        self.answered.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }
}

fn fleet_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    holdfast::pki::generate_with_fleet(dir.path(), DEVICES).unwrap();
    Pki { dir }
}

/// What the operator thread needs of the proxy (a `Proc` is not `Sync`).
#[derive(Clone)]
struct Node {
    pid: i32,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    log: PathBuf,
}

impl Node {
    fn of(p: &Proc) -> Node {
        Node { pid: p.child.id() as i32, addr: p.addr, metrics: p.metrics.unwrap(), log: p.stderr_log.clone() }
    }

    fn single(&self, name: &str) -> i64 {
        metrics_at(self.metrics)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map(|v| v as i64)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn sum(&self, name: &str, label: &str) -> u64 {
        metrics_at(self.metrics)
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

fn fleet_opts(pki: &Pki, proxy: &Node, i: usize) -> holdfast::device::DeviceOptions {
    let mut o = opts_at(pki, proxy.addr, "oven-1");
    o.cert = pki.path().join(format!("devices/fleet/{i:05}.pem"));
    o.key = pki.path().join(format!("devices/fleet/{i:05}.key"));
    o
}

fn fingerprint(pem: &Path) -> String {
    let der = CertificateDer::from_pem_file(pem).unwrap();
    holdfast::identity::sha256(der.as_ref()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The test's config: the two fleet CAs (or only the 2024 one), the WSMs
/// given, closes of revoked devices spread over [`SPREAD_MS`].
fn config_text(wsm: &[std::net::SocketAddr], with_2019: bool, ws_extra: &str) -> String {
    let wsm: Vec<String> = wsm.iter().map(|a| format!("\"{a}\"")).collect();
    let ca_2019 = if with_2019 { "[[tls.client_ca]]\nfile = \"fleet-2019.pem\"\nignore_validity = true\n" } else { "" };
    format!(
        r#"[listen]
addr = "127.0.0.1:0"
shards = 2

[tls]
cert_chain = "server-chain.pem"
key = "server.key"
blocklist = "blocklist.txt"

{ca_2019}
[[tls.client_ca]]
file = "fleet-2024.pem"

[websocket]
idle_timeout_secs = 0
{ws_extra}

[upstream]
wsm = [{}]
links_per_shard = 1
connect_timeout_ms = 500

[buffers]
per_shard = 256

[metrics]
addr = "127.0.0.1:0"

[control]
socket = "control.sock"

[reload]
close_spread_ms = {SPREAD_MS}
"#,
        wsm.join(", ")
    )
}

fn hup(p: &Node) {
    kill(Pid::from_raw(p.pid), Signal::SIGHUP).unwrap();
}

fn wait_generation(p: &Node, n: i64) {
    eventually(10, &format!("generation {n}"), || p.single("holdfast_config_generation") >= n);
}

/// Runs the devices on this thread; `operator` runs beside them once all
/// are connected, and they stop when it returns.
fn swarm(pki: &Pki, proxy: &Node, seen: Arc<Seen>, operator: impl FnOnce() + Send) {
    let stop = Arc::new(AtomicBool::new(false));
    let cfgs: Vec<Arc<rustls::ClientConfig>> = (0..DEVICES)
        .map(|i| {
            let mut c = holdfast::device::client_config(&fleet_opts(pki, proxy, i)).unwrap();
            c.resumption = rustls::client::Resumption::disabled();
            Arc::new(c)
        })
        .collect();
    let addr = proxy.addr;
    std::thread::scope(|scope| {
        let (s2, stop2) = (seen.clone(), stop.clone());
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while s2.connected.load(Ordering::Relaxed) < DEVICES && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            // The devices stop however the operator ends (a failed check too).
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(operator));
            stop2.store(true, Ordering::Relaxed);
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(8192).enable_timer().build().unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for (dev, cfg) in cfgs.into_iter().enumerate() {
                let (seen, stop) = (seen.clone(), stop.clone());
                if dev % 50 == 49 {
                    monoio::time::sleep(Duration::from_millis(25)).await;
                }
                tasks.push(monoio::spawn(async move {
                    let err = |e: String| seen.errors.lock().unwrap().push(e);
                    let mut c = match WsClient::connect(cfg, None, addr, "/").await {
                        Ok(c) => c,
                        Err(f) => return err(format!("device {dev} connect: {}", f.1)),
                    };
                    seen.connected.fetch_add(1, Ordering::Relaxed);
                    monoio::time::sleep(Duration::from_millis((dev % 1000) as u64)).await;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = format!("d{dev}:{i}");
                        if let Err(f) = c.send(op::TEXT, m.as_bytes()).await {
                            return err(format!("device {dev} send {i}: {}", f.1));
                        }
                        match c.recv().await {
                            Ok(r) if r == m.as_bytes() => {}
                            Ok(r) => return err(format!("device {dev} got {:?} for {m}", String::from_utf8_lossy(&r))),
                            Err(f) => match c.closed_with {
                                Some(code) => {
                                    seen.closed.lock().unwrap()[dev] = Some((code, Instant::now()));
                                    return;
                                }
                                None => return err(format!("device {dev} recv {i}: {}", f.1)),
                            },
                        }
                        i += 1;
                        seen.answered[dev].store(i, Ordering::Relaxed);
                        monoio::time::sleep(EVERY).await;
                    }
                    c.close().await;
                }));
            }
            for t in tasks {
                t.await;
            }
        })
    });
}

/// Every device not in `gone` answers again within a few seconds.
fn all_still_talking(seen: &Seen, gone: &dyn Fn(usize) -> bool, what: &str) {
    let before = seen.answered();
    eventually(15, &format!("{what}: every remaining device answered again"), || {
        let now = seen.answered();
        (0..DEVICES).all(|i| gone(i) || now[i] > before[i])
    });
}

/// Closes that happened: all 1008, none before `from`, spread over the
/// window (not all at once), and all within it (with slack).
fn spread_1008(closes: &[(usize, Option<u16>, Instant)], from: Instant, what: &str) {
    assert!(!closes.is_empty(), "{what}: nothing closed");
    for (i, code, at) in closes {
        assert_eq!(*code, Some(1008), "{what}: device {i}");
        assert!(*at >= from, "{what}: device {i} closed before the change");
        assert!(at.duration_since(from) < Duration::from_millis(SPREAD_MS + 2500), "{what}: device {i} closed after the window");
    }
    let first = closes.iter().map(|c| c.2).min().unwrap();
    let last = closes.iter().map(|c| c.2).max().unwrap();
    assert!(last.duration_since(first) >= Duration::from_millis(SPREAD_MS / 3), "{what}: all at once ({:?})", last.duration_since(first));
    // Not bunched: no tenth of the window holds more than a third of them.
    let tenth = Duration::from_millis(SPREAD_MS / 10);
    for (_, _, t) in closes {
        let near = closes.iter().filter(|c| c.2 >= *t && c.2 < *t + tenth).count();
        assert!(near * 3 <= closes.len().max(9), "{what}: {near} of {} closed within {tenth:?}", closes.len());
    }
}

fn reload_cli(config: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast")).arg("reload").arg("--config").arg(config).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A new server certificate (from a new CA) in place of the old files;
/// returns the new CA's path and the new leaf (DER).
fn rotate_server_certificate(dir: &Path) -> (PathBuf, Vec<u8>) {
    use holdfast::pki::{Validity, make_ca, make_leaf};
    let ca = make_ca("holdfast dev server CA, rotated").unwrap();
    let leaf = make_leaf(&ca, "localhost", vec!["localhost".into(), "127.0.0.1".into()], true, Validity::Current, 2).unwrap();
    std::fs::write(dir.join("server-ca-2.pem"), &ca.pem).unwrap();
    std::fs::write(dir.join("server-chain.pem.new"), format!("{}{}", leaf.cert_pem, ca.pem)).unwrap();
    std::fs::write(dir.join("server.key.new"), &leaf.key_pem).unwrap();
    std::fs::rename(dir.join("server-chain.pem.new"), dir.join("server-chain.pem")).unwrap();
    std::fs::rename(dir.join("server.key.new"), dir.join("server.key")).unwrap();
    // Devices made from now on trust both (the old CA for connections that
    // were never touched, the new one for new handshakes).
    let both = format!("{}{}", std::fs::read_to_string(dir.join("server-ca.pem")).unwrap(), ca.pem);
    std::fs::write(dir.join("server-ca.pem"), both).unwrap();
    (dir.join("server-ca-2.pem"), leaf.der)
}

/// The server certificate a fresh handshake is given (trusting `ca`).
fn presented_certificate(pki: &Pki, proxy: &Node, ca: &Path) -> Vec<u8> {
    let mut o = opts_at(pki, proxy.addr, "oven-1");
    o.server_ca = ca.to_path_buf();
    let cfg = Arc::new(holdfast::device::client_config(&o).unwrap());
    let mut conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(proxy.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// A device's client config for one TLS version, keeping its sessions.
fn resuming(pki: &Pki, proxy: &Node, i: usize, v: &str) -> Arc<rustls::ClientConfig> {
    let mut o = fleet_opts(pki, proxy, i);
    o.version = Some(v.into());
    Arc::new(holdfast::device::client_config(&o).unwrap())
}

async fn connect(cfg: Arc<rustls::ClientConfig>, proxy: std::net::SocketAddr) -> Result<bool, String> {
    let c = WsClient::connect(cfg, None, proxy, "/").await.map_err(|f| f.1)?;
    let resumed = c.resumed();
    c.close().await;
    Ok(resumed)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().unwrap().block_on(f)
}

#[test]
fn two_thousand_devices_ride_out_rotation_refusal_blocklist_ca_removal_wsm_change_and_ctl_block() {
    let pki = fleet_pki();
    let a = start_wsm(pki.path(), "wsm-a");
    let b = start_wsm(pki.path(), "wsm-b");
    let config = pki.path().join("holdfast.toml");
    let write = |text: String| {
        std::fs::write(config.with_extension("tmp"), text).unwrap();
        std::fs::rename(config.with_extension("tmp"), &config).unwrap();
    };
    write(config_text(&[a.addr], true, ""));
    let proc_ = start_holdfast_config(&pki, &config, &[("HOLDFAST_LOG", "info")]);
    let proxy = Node::of(&proc_);
    let blocklist_before = proxy.single("holdfast_blocklist_entries") as usize;
    // Sessions to resume later, of the device that will be blocked.
    let blocked_dev = 40;
    let (tls12, tls13) = (resuming(&pki, &proxy, blocked_dev, "1.2"), resuming(&pki, &proxy, blocked_dev, "1.3"));
    for cfg in [&tls12, &tls13] {
        assert_eq!(block_on(connect(cfg.clone(), proxy.addr)), Ok(false));
        assert_eq!(block_on(connect(cfg.clone(), proxy.addr)), Ok(true), "the session resumes while allowed");
    }
    let seen = Seen::new();
    let s = seen.clone();
    let blocked: Vec<usize> = (0..DEVICES).filter(|i| i % 40 == 0).collect();
    swarm(&pki, &proxy, seen.clone(), || {
        let seen = s;
        assert!(seen.errors.lock().unwrap().is_empty(), "{:?}", seen.errors.lock().unwrap().first());
        // (a) A server certificate rotation touches no connection; a new
        // handshake gets the new certificate.
        let (new_ca, new_leaf) = rotate_server_certificate(pki.path());
        hup(&proxy);
        wait_generation(&proxy, 2);
        assert_eq!(presented_certificate(&pki, &proxy, &new_ca), new_leaf, "a new handshake sees the new certificate");
        all_still_talking(&seen, &|_| false, "rotation");
        assert!(seen.closed().is_empty(), "rotation closed {:?}", seen.closed().first());

        // (d) An invalid config is refused whole, naming the key; nothing changes.
        write(config_text(&[b.addr], false, "ping_interval_secs = \"often\""));
        let (ok, out) = reload_cli(&config);
        assert!(!ok, "refused: {out}");
        assert!(out.contains("websocket.ping_interval_secs"), "the error names the key: {out}");
        hup(&proxy);
        eventually(5, "the refusal in the log", || std::fs::read_to_string(&proxy.log).unwrap_or_default().contains("reload refused"));
        assert_eq!(proxy.single("holdfast_config_generation"), 2, "nothing changed");
        assert_eq!(proxy.single("holdfast_config_last_reload_success"), 0);
        write(config_text(&[a.addr], true, ""));

        // (b) A blocklist addition closes only the blocked devices, with
        // 1008, spread; their full and resumed handshakes are refused.
        let mut list = std::fs::read_to_string(pki.path().join("blocklist.txt")).unwrap();
        for &i in &blocked {
            list.push_str(&format!("{}\n", fingerprint(&pki.path().join(format!("devices/fleet/{i:05}.pem")))));
        }
        std::fs::write(pki.path().join("blocklist.txt"), list).unwrap();
        let t0 = Instant::now();
        hup(&proxy);
        wait_generation(&proxy, 3);
        eventually(15, "every blocked device closed", || seen.closed().len() >= blocked.len());
        let closes = seen.closed();
        assert!(
            closes.iter().all(|(i, _, _)| blocked.contains(i)),
            "only blocked devices: {:?}",
            closes.iter().find(|c| !blocked.contains(&c.0))
        );
        spread_1008(&closes, t0, "blocklist");
        assert_eq!(proxy.sum("holdfast_connections_revoked_total", "reason=\"blocked\""), blocked.len() as u64);
        for (v, cfg) in [("TLS 1.2", &tls12), ("TLS 1.3", &tls13)] {
            assert!(block_on(connect(cfg.clone(), proxy.addr)).is_err(), "{v}: a blocked device's session does not resume");
        }
        let mut fresh = resuming(&pki, &proxy, blocked_dev, "1.3");
        Arc::make_mut(&mut fresh).resumption = rustls::client::Resumption::disabled();
        assert!(block_on(connect(fresh, proxy.addr)).is_err(), "nor does a full handshake pass");
        all_still_talking(&seen, &|i| blocked.contains(&i), "blocklist");

        // (c) Removing a client CA closes only its devices (the odd ones), spread.
        write(config_text(&[a.addr], false, ""));
        let t1 = Instant::now();
        hup(&proxy);
        wait_generation(&proxy, 4);
        let gone = |i: usize| blocked.contains(&i) || i % 2 == 1;
        eventually(15, "every 2019 device closed", || seen.closed().len() >= blocked.len() + DEVICES / 2);
        let closes: Vec<_> = seen.closed().into_iter().filter(|(i, _, _)| !blocked.contains(i)).collect();
        assert!(closes.iter().all(|(i, _, _)| i % 2 == 1), "only the removed CA's devices");
        spread_1008(&closes, t1, "CA removal");
        assert_eq!(proxy.sum("holdfast_connections_revoked_total", "reason=\"unknown_ca\""), (DEVICES / 2) as u64);
        all_still_talking(&seen, &gone, "CA removal");

        // (e) A changed WSM list moves the streams by plan, nothing lost.
        write(config_text(&[b.addr], false, ""));
        hup(&proxy);
        wait_generation(&proxy, 5);
        let left = (0..DEVICES).filter(|&i| !gone(i)).count() as u64;
        eventually(20, "every stream moved to wsm-b", || proxy.sum("holdfast_streams_moved_total", "") >= left);
        all_still_talking(&seen, &gone, "WSM change");
        assert_eq!(proxy.sum("holdfast_messages_resent_total", ""), 0, "a planned move sends nothing twice");
        let mut d = holdfast::device::Device::connect(&fleet_opts(&pki, &proxy, 2)).unwrap();
        d.send_text("whoami").unwrap();
        assert!(d.recv_text().unwrap().contains("wsm-b"), "new devices go to the new WSM");
        drop(d);

        // (f) `holdfast ctl block` under traffic closes that device within the window.
        let target = 6;
        let fp = fingerprint(&pki.path().join(format!("devices/fleet/{target:05}.pem")));
        let t2 = Instant::now();
        let (ok, out) = ctl(&config, &["block", &fp]);
        assert!(ok, "{out}");
        eventually(10, "the device blocked by ctl closed", || seen.closed().iter().any(|c| c.0 == target));
        let c = seen.closed().into_iter().find(|c| c.0 == target).unwrap();
        assert_eq!(c.1, Some(1008));
        assert!(c.2.duration_since(t2) < Duration::from_millis(SPREAD_MS + 2500));
        assert!(std::fs::read_to_string(pki.path().join("blocklist.txt")).unwrap().contains(&fp), "written to the file");
        let (ok, out) = ctl(&config, &["status", "--json"]);
        assert!(ok, "{out}");
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["status"]["generation"], 6, "{st}");
        assert_eq!(st["status"]["blocklist_entries"].as_u64().unwrap() as usize, blocklist_before + blocked.len() + 1, "{st}");
        all_still_talking(&seen, &|i| gone(i) || i == target, "ctl block");
    });
    let errors = seen.errors.lock().unwrap();
    assert!(errors.is_empty(), "{} device errors, first: {:?}", errors.len(), errors.first());
    drop((a, b, proc_));
}

#[test]
fn ctl_lists_connections_by_identity_and_kicks_one_with_its_code() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy_full(&pki, &[wsm.addr], 2, "", "", "", &[]);
    let config = proxy.config.clone().unwrap();
    let mut oven = holdfast::device::Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut thermo = holdfast::device::Device::connect(&opts(&pki, &proxy, "thermostat-2019")).unwrap();
    oven.send_text("whoami").unwrap();
    let who: serde_json::Value = serde_json::from_str(&oven.recv_text().unwrap()).unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out) = ctl(&config, args);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap()
    };
    let all = json(&["connections", "--json"]);
    assert_eq!(all["connections"]["count"], 2, "{all}");
    let mine = json(&["connections", "--subject", "oven-1", "--json"]);
    assert_eq!(mine["connections"]["count"], 1, "{mine}");
    let seen = &mine["connections"]["sample"][0];
    assert_eq!(seen["id"], who["connection_id"], "{seen}");
    assert_eq!(seen["ca"], "fleet-2024.pem", "{seen}");
    let by_ca = json(&["connections", "--ca", "fleet-2019.pem", "--json"]);
    assert_eq!(by_ca["connections"]["count"], 1);
    assert_eq!(json(&["connections", "--wsm", &wsm.addr.to_string(), "--json"])["connections"]["count"], 2);
    let (ok, out) = ctl(&config, &["kick", seen["id"].as_str().unwrap(), "--code", "4001"]);
    assert!(ok, "{out}");
    assert_eq!(oven.recv_close().unwrap(), Some(4001), "kicked with its code");
    thermo.send_text("still here").unwrap();
    assert_eq!(thermo.recv_text().unwrap(), "still here", "no one else");
    let (ok, out) = ctl(&config, &["kick", "00000000000000000000000000000000"]);
    assert!(!ok && out.contains("no connection"), "{out}");
    eventually(5, "one connection left", || metric(&proxy, "holdfast_connections_active", "") == 1);
    assert_eq!(metric(&proxy, "holdfast_connections_kicked_total", ""), 1);
}

#[test]
fn the_control_socket_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy_full(&pki, &[wsm.addr], 1, "", "", "", &[]);
    let text = std::fs::read_to_string(proxy.config.as_ref().unwrap()).unwrap();
    let name = text.lines().find_map(|l| l.strip_prefix("socket = \"")).unwrap().trim_end_matches('"').to_string();
    let mode = std::fs::metadata(pki.path().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn unblock_lets_a_device_back_in_and_both_are_in_the_file() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy_full(&pki, &[wsm.addr], 1, "", "", "", &[]);
    let config = proxy.config.clone().unwrap();
    let fp = fingerprint(&pki.path().join("devices/oven-1.pem"));
    let (ok, out) = ctl(&config, &["block", &fp]);
    assert!(ok, "{out}");
    assert!(holdfast::device::Device::connect(&opts(&pki, &proxy, "oven-1")).is_err(), "blocked");
    let (ok, out) = ctl(&config, &["block", &fp]);
    assert!(ok && out.contains("already blocked"), "{out}");
    let (ok, out) = ctl(&config, &["unblock", &fp]);
    assert!(ok, "{out}");
    assert!(!std::fs::read_to_string(pki.path().join("blocklist.txt")).unwrap().contains(&fp), "gone from the file");
    let mut d = holdfast::device::Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_text("back").unwrap();
    assert_eq!(d.recv_text().unwrap(), "back");
    // The file's other entries were kept; a reload agrees with it.
    assert!(holdfast::device::Device::connect(&opts(&pki, &proxy, "fridge-blocked")).is_err());
    let (ok, out) = reload_cli(&config);
    assert!(ok && out.contains("nothing changed"), "{out}");
    let (ok, out) = ctl(&config, &["block", "nothex"]);
    assert!(!ok && out.contains("not a hex"), "{out}");
}

#[test]
fn another_user_is_refused_by_the_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy_full(&pki, &[wsm.addr], 1, "", "", "", &[]);
    let text = std::fs::read_to_string(proxy.config.as_ref().unwrap()).unwrap();
    let name = text.lines().find_map(|l| l.strip_prefix("socket = \"")).unwrap().trim_end_matches('"').to_string();
    let sock = pki.path().join(name);
    // Open the file modes wide, so only the peer check stands in the way.
    std::fs::set_permissions(pki.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["ctl", "--socket"])
        .arg(&sock)
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody got an answer");
    assert!(err.contains("not allowed"), "{err}");
    eventually(5, "the refusal logged", || std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default().contains("refused a peer"));
}
