//! Issue 4's acceptance test: 2,000 devices (TLS 1.3 and 1.2, several
//! suites) each send a numbered message every 500 ms through a SIGUSR2 live
//! upgrade. Every device keeps its original connection (the client has no
//! reconnect: any close is an error), every message is echoed exactly once
//! and in order, the old process exits 0, and the reference WSM saw resumed
//! streams and no device disconnect.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device_async::WsClient;
use holdfast::ws::frame::op;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const DEVICES: usize = 2000;

#[test]
fn two_thousand_devices_keep_their_connections_through_sigusr2() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let mut proxy = start_proxy(&pki, &[wsm.addr], 2, "", "idle_timeout_secs = 0");
    let old = proxy.child.id();
    let addr = proxy.addr;
    let configs: Vec<_> = [
        "TLS13_AES_128_GCM_SHA256",
        "TLS13_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ]
    .iter()
    .map(|s| {
        let mut o = opts(&pki, &proxy, "oven-1");
        o.suite = Some(s.to_string());
        let mut cfg = holdfast::device::client_config(&o).unwrap();
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    })
    .collect();
    let connected = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let new_pid = std::sync::Mutex::new(0i32);

    let (errors, sent) = std::thread::scope(|scope| {
        // The operator: once every device is connected and talking, SIGUSR2.
        let (c2, s2) = (connected.clone(), stop.clone());
        let proxy_ref = &mut proxy;
        let new_pid_ref = &new_pid;
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while c2.load(Ordering::Relaxed) < DEVICES && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(1500));
            kill(Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
            let new = loop {
                match proxy_ref.lines.recv_timeout(Duration::from_secs(30)) {
                    Ok(l) if l.starts_with("holdfast ready on") && !l.ends_with(&format!("pid={old}")) => {
                        break l.rsplit("pid=").next().unwrap().trim().parse::<i32>().unwrap();
                    }
                    Ok(_) => {}
                    Err(_) => break 0,
                }
            };
            *new_pid_ref.lock().unwrap() = new;
            let deadline = Instant::now() + Duration::from_secs(60);
            while proxy_ref.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(2000));
            s2.store(true, Ordering::Relaxed);
        });

        // The devices, all on this thread.
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(8192).enable_timer().build().unwrap();
        rt.block_on(async {
            let errors: Rc<RefCell<Vec<String>>> = Rc::default();
            let sent: Rc<RefCell<Vec<u64>>> = Rc::new(RefCell::new(vec![0; DEVICES]));
            let mut tasks = Vec::new();
            for dev in 0..DEVICES {
                let (cfg, errors, sent, connected, stop) =
                    (configs[dev % configs.len()].clone(), errors.clone(), sent.clone(), connected.clone(), stop.clone());
                if dev % 50 == 49 {
                    monoio::time::sleep(Duration::from_millis(20)).await; // connect at about 2,500/s
                }
                tasks.push(monoio::spawn(async move {
                    let mut c = match WsClient::connect(cfg, None, addr, "/").await {
                        Ok(c) => c,
                        Err(f) => {
                            errors.borrow_mut().push(format!("device {dev} connect: {}", f.1));
                            return;
                        }
                    };
                    connected.fetch_add(1, Ordering::Relaxed);
                    monoio::time::sleep(Duration::from_millis((dev % 500) as u64)).await;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = format!("d{dev}:{i}");
                        if let Err(f) = c.send(op::TEXT, m.as_bytes()).await {
                            errors.borrow_mut().push(format!("device {dev} send {i}: {}", f.1));
                            return;
                        }
                        match c.recv().await {
                            Ok(r) if r == m.as_bytes() => {}
                            Ok(r) => {
                                errors.borrow_mut().push(format!("device {dev} got {:?} for {m}", String::from_utf8_lossy(&r)));
                                return;
                            }
                            Err(f) => {
                                errors.borrow_mut().push(format!("device {dev} recv {i}: {}", f.1));
                                return;
                            }
                        }
                        i += 1;
                        sent.borrow_mut()[dev] = i;
                        monoio::time::sleep(Duration::from_millis(500)).await;
                    }
                    c.close().await;
                }));
            }
            for t in tasks {
                t.await;
            }
            let e = errors.borrow().clone();
            let s = sent.borrow().clone();
            (e, s)
        })
    });
    let new = *new_pid.lock().unwrap();
    let _guard = KillOnDrop(new);
    let log = || {
        std::fs::read_to_string(&proxy.stderr_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(new > 0, "no new process; log:\n{}", log());
    assert!(errors.is_empty(), "{} device errors, first: {:?}; log:\n{}", errors.len(), &errors[..errors.len().min(5)], log());
    let status = proxy.child.try_wait().unwrap().expect("old process exited");
    assert!(status.success(), "{status}");
    // Every device talked before and after the upgrade (at least 6 rounds).
    let min = sent.iter().min().copied().unwrap_or(0);
    assert!(min >= 6, "a device sent only {min} messages");
    // The WSM saw every stream resumed, and each device leave exactly once:
    // at the end, when it closed (none during the upgrade).
    let stats = || {
        let mut d = holdfast::device::Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        d.send_text("stats").unwrap();
        serde_json::from_str::<serde_json::Value>(&d.recv_text().unwrap()).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut st = stats();
    while st["device_gone"].as_u64().unwrap_or(0) < DEVICES as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        st = stats();
    }
    assert_eq!(st["resumed"].as_u64().unwrap() as usize, DEVICES, "{st}");
    assert_eq!(st["handed_elsewhere"].as_u64().unwrap() as usize, DEVICES, "{st}");
    // Each stats probe is a device too and leaves before the next probe.
    let probes = st["opened"].as_u64().unwrap() as usize - 2 * DEVICES;
    assert_eq!(st["device_gone"].as_u64().unwrap() as usize, DEVICES + probes - 1, "{st}");
}
