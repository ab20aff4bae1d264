//! Live upgrade by SIGUSR2, stage one: the listening sockets move to a new
//! process with no refused connection; the old process keeps the
//! connections it holds and exits when they are gone; a failed upgrade
//! leaves the old process serving.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::time::{Duration, Instant};

use common::*;
use holdfast::device::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn echo(d: &mut Device, m: &str) {
    d.send_text(m).unwrap();
    assert_eq!(d.recv_text().unwrap_or_else(|e| panic!("{m}: {e}")), m);
}

/// Waits for a "holdfast ready" line from a process other than `old`.
fn new_ready_pid(p: &Proc, old: u32, secs: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(l) = p.lines.recv_timeout(Duration::from_millis(100))
            && let Some(pid) =
                l.strip_prefix("holdfast ready on ").and_then(|r| r.rsplit("pid=").next()).and_then(|x| x.trim().parse::<i32>().ok())
            && pid as u32 != old
        {
            return pid;
        }
    }
    panic!("no ready line from a new process; log: {}", std::fs::read_to_string(&p.stderr_log).unwrap_or_default());
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn whoami(d: &mut Device) -> serde_json::Value {
    d.send_text("whoami").unwrap();
    serde_json::from_str(&d.recv_text().unwrap()).unwrap()
}

const SUITES: [(&str, &str); 4] = [
    ("1.3", "TLS13_AES_128_GCM_SHA256"),
    ("1.3", "TLS13_CHACHA20_POLY1305_SHA256"),
    ("1.2", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ("1.2", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
];

#[test]
fn sigusr2_moves_established_connections_without_a_reconnect() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let old = proxy.child.id();
    let log = proxy.stderr_log.clone();
    let fail = |what: &str| -> ! { panic!("{what}; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()) };
    // Devices over every version and a mix of suites; each keeps its one TCP
    // connection (the client would fail on any reconnect or renegotiation).
    let mut held: Vec<(Device, String)> = (0..12)
        .map(|i| {
            let mut o = opts(&pki, &proxy, "oven-1");
            let (v, suite) = SUITES[i % SUITES.len()];
            o.version = Some(v.into());
            o.suite = Some(suite.into());
            let mut d = Device::connect(&o).unwrap();
            let id = whoami(&mut d)["connection_id"].as_str().unwrap().to_string();
            (d, id)
        })
        .collect();

    // Devices keep connecting while the upgrade runs: none may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (o, s2) = (opts(&pki, &proxy, "oven-1"), stop.clone());
    let hammer = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let mut d = Device::connect(&o).map_err(|e| format!("connect: {e}"))?;
            d.send_text("during").map_err(|e| format!("send: {e}"))?;
            let r = d.recv_text().map_err(|e| format!("recv: {e}"))?;
            if r != "during" {
                return Err(format!("echo {r}"));
            }
            n += 1;
        }
        Ok::<_, String>(n)
    });
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);

    // The old process moves everything and exits 0 while the devices stay connected.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = proxy.child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            fail("old process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    match hammer.join().unwrap() {
        Ok(n) => assert!(n > 0),
        Err(e) => fail(&format!("a connection during the upgrade failed: {e}")),
    }
    for (i, (d, id)) in held.iter_mut().enumerate() {
        for k in 0..3 {
            let m = format!("device {i} message {k} after the upgrade");
            d.send_text(&m).unwrap_or_else(|e| fail(&format!("device {i}: {e}")));
            match d.recv_text() {
                Ok(r) => assert_eq!(r, m),
                Err(e) => fail(&format!("device {i}: {e}")),
            }
        }
        let w = whoami(d);
        assert_eq!(w["connection_id"].as_str().unwrap(), id, "same connection ID");
        assert_eq!(w["resumed"], true, "the WSM saw a resumed stream");
    }
    // A TLS 1.3 KeyUpdate after the move works both ways.
    for (d, _) in held.iter_mut().filter(|(d, _)| d.tls_info().0.contains("TLSv1_3")) {
        d.key_update().unwrap();
        d.send_text("after key update").unwrap();
        assert_eq!(d.recv_text().unwrap(), "after key update");
    }
    // And a second upgrade moves them again.
    kill(Pid::from_raw(new), Signal::SIGUSR2).unwrap();
    let newer = new_ready_pid(&proxy, new as u32, 20);
    let _guard2 = KillOnDrop(newer);
    eventually(15, "the second old process to exit", || !alive(new));
    for (i, (d, id)) in held.iter_mut().enumerate() {
        let w = whoami(d);
        assert_eq!(w["connection_id"].as_str().unwrap(), id, "device {i} after the second upgrade");
    }
    let mut fresh = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut fresh, "newest process");
}

#[test]
fn session_tickets_from_the_old_process_resume_in_the_new_one() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let old = proxy.child.id();
    let mut devices = Vec::new();
    for version in ["1.3", "1.2"] {
        let mut o = opts(&pki, &proxy, "oven-1");
        o.version = Some(version.into());
        let cfg = std::sync::Arc::new(holdfast::device::client_config(&o).unwrap());
        let mut first = Device::connect_with(&o, cfg.clone()).unwrap();
        assert!(!first.resumed(), "TLS {version}: a first connection is a full handshake");
        echo(&mut first, "a ticket arrives with this");
        // The old process resumes its own tickets (and issues fresh ones).
        let mut again = Device::connect_with(&o, cfg.clone()).unwrap();
        assert!(again.resumed(), "TLS {version}: resumed against the old process");
        echo(&mut again, "resumed");
        devices.push((version, o, cfg, first));
    }
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    eventually(15, "the old process to exit", || proxy.child.try_wait().unwrap().is_some());
    for (version, o, cfg, first) in &mut devices {
        // The moved connection carries on, and a reconnect resumes with a
        // ticket the old process issued.
        echo(first, "moved");
        let mut d = Device::connect_with(o, cfg.clone()).unwrap();
        assert!(d.resumed(), "TLS {version}: the new process resumed a ticket of the old one");
        echo(&mut d, "resumed after the upgrade");
    }
}

#[test]
fn an_upgrade_that_changes_the_device_cas_does_not_resume_earlier_sessions() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let old = proxy.child.id();
    let o = opts(&pki, &proxy, "oven-1");
    let cfg = std::sync::Arc::new(holdfast::device::client_config(&o).unwrap());
    let mut first = Device::connect_with(&o, cfg.clone()).unwrap();
    echo(&mut first, "a ticket arrives with this");
    assert!(Device::connect_with(&o, cfg.clone()).unwrap().resumed(), "resumes against the old process");
    // The new process's config trusts one CA fewer (oven-1's stays).
    let config = proxy.config.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[[tls.client_ca]]\nfile = \"fleet-2019.pem\"\nignore_validity = true\n", "")).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    eventually(15, "the old process to exit", || proxy.child.try_wait().unwrap().is_some());
    echo(&mut first, "moved");
    let mut d = Device::connect_with(&o, cfg.clone()).unwrap();
    assert!(!d.resumed(), "a session verified under other CAs does not resume");
    echo(&mut d, "full handshake after the upgrade");
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let old = proxy.child.id();
    let config = proxy.config.clone().unwrap();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("shards = 1", "shards = 0")).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    eventually(10, "the failure to be logged", || {
        std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default().contains("upgrade failed")
    });
    let log = std::fs::read_to_string(&proxy.stderr_log).unwrap();
    assert!(log.contains("listen.shards"), "the reason is reported: {log}");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut d, "old still serves");
    // Fixed config: the next attempt works.
    std::fs::write(&config, good).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    let mut e = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut e, "after the second attempt");
    echo(&mut d, "held by the old one");
}

#[test]
fn if_the_new_process_dies_the_old_one_accepts_again() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "handshake_timeout_ms = 20000", "");
    let old = proxy.child.id();
    // A device stuck before its handshake cannot move yet, so the old
    // process is still there when the new one dies.
    let _stuck = std::net::TcpStream::connect(proxy.addr).unwrap();
    // Established devices move to the new process and die with it.
    let mut moved: Vec<Device> = (0..3).map(|_| Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap()).collect();
    for (i, d) in moved.iter_mut().enumerate() {
        echo(d, &format!("before {i}"));
    }
    std::thread::sleep(Duration::from_millis(100));
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let log = || std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default();
    eventually(10, "the old process to stop accepting", || log().contains("stopped accepting"));
    eventually(10, "the established devices to move", || log().matches("adopting connections").count() >= 1);
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(new), Signal::SIGKILL).unwrap();
    eventually(10, "the old process to accept again", || log().contains("accepting again"));
    // The old process kept its share of each moved socket (so as not to
    // cancel a poll per connection); it lets go when the upgrade fails, so
    // these devices see their connection end instead of hanging on it.
    for (i, d) in moved.iter_mut().enumerate() {
        let started = Instant::now();
        match d.recv() {
            Err(holdfast::device::DeviceError::Io(e)) => assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "device {i}: still connected {:?} after the new process died",
                started.elapsed()
            ),
            other => panic!("device {i}: expected the connection to end, got {other:?}"),
        }
    }
    for i in 0..8 {
        let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        echo(&mut d, &format!("back to the old process {i}"));
    }
    assert!(alive(old as i32));
}

#[test]
fn a_partial_record_and_a_partial_frame_survive_the_handoff_and_shards_may_change() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let old = proxy.child.id();
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut d, "before");
    // The first 10 bytes of a frame in a whole record (a partial frame in
    // holdfast's decoder), then half of the record with the rest.
    let msg = "split across two processes: ".repeat(20);
    let frame = d.masked_frame(holdfast::ws::frame::op::TEXT, msg.as_bytes());
    d.send_raw(&frame[..10]).unwrap();
    let rest = d.send_partial_record(&frame[10..], 40).unwrap();
    assert!(!rest.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    // The new process runs one shard instead of two.
    let config = proxy.config.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("shards = 2", "shards = 1")).unwrap();
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    eventually(15, "the old process to exit", || proxy.child.try_wait().unwrap().is_some());
    d.send_ciphertext(&rest).unwrap();
    assert_eq!(d.recv_text().unwrap(), msg, "the message completed in the new process");
    echo(&mut d, "after");
    let w: serde_json::Value = {
        d.send_text("whoami").unwrap();
        serde_json::from_str(&d.recv_text().unwrap()).unwrap()
    };
    assert_eq!(w["resumed"], true);
    assert_eq!(w["holdfast"]["shard"], 0, "one shard now");
}

#[test]
fn holdfast_upgrade_reports_the_outcome() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "[upgrade]\npid_file = \"holdfast.pid\"");
    let pid_file = pki.path().join("holdfast.pid");
    eventually(5, "the pid file", || std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == proxy.child.id().to_string()));
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut d, "before");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["upgrade", "--pid-file"]).arg(&pid_file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 connections moved"), "{stdout}");
    let new: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let _guard = KillOnDrop(new);
    assert_ne!(new as u32, proxy.child.id());
    echo(&mut d, "after");
    // A failing upgrade is reported with its reason and a non-zero exit.
    let config = proxy.config.clone().unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("shards = 1", "shards = 0")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast")).args(["upgrade", "--pid-file"]).arg(&pid_file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upgrade failed") && stderr.contains("listen.shards") && stderr.contains("keeps serving 1"), "{stderr}");
    echo(&mut d, "still served");
}

#[test]
fn systemd_is_told_ready_and_follows_the_new_main_pid() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let sock_path = pki.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let proxy = start_proxy_env(&pki, &[wsm.addr], 1, "", "", &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let old = proxy.child.id();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first.contains("READY=1") && first.contains(&format!("MAINPID={old}")), "{first}");
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    let new = new_ready_pid(&proxy, old, 20);
    let _guard = KillOnDrop(new);
    let n = notify.recv(&mut buf).unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(second.contains("READY=1") && second.contains(&format!("MAINPID={new}")), "{second}");
}

#[test]
fn a_new_binary_that_crashes_before_ready_changes_nothing() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    // A "new binary" that dies at once (SIGABRT) instead of saying Ready.
    let crash = pki.path().join("crash.sh");
    std::fs::write(&crash, "#!/bin/sh\nkill -ABRT $$\n").unwrap();
    std::fs::set_permissions(&crash, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let proxy = start_proxy_env(&pki, &[wsm.addr], 1, "", "", &[("HOLDFAST_UPGRADE_EXE", crash.to_str().unwrap())]);
    let old = proxy.child.id();
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut d, "before");
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
    eventually(10, "the failure to be logged", || {
        let log = std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default();
        log.contains("upgrade failed") && log.contains("exited before it was ready")
    });
    echo(&mut d, "still here");
    let mut e = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    echo(&mut e, "new connections too");
    assert!(alive(old as i32));
}
