//! Issue 5's acceptance tests at scale: 1,000 devices stream numbered
//! messages through two WSM instances sharing Redis. One instance is killed
//! (SIGKILL) or drained (SIGTERM, goaway); no device disconnects (the client
//! has no reconnect: any close is an error), every message is echoed, in
//! order, after a bounded gap, and the survivor serves every stream.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device_async::WsClient;
use holdfast::ws::frame::op;

const DEVICES: usize = 1000;
const EVERY: Duration = Duration::from_millis(300);

struct Outcome {
    errors: Vec<String>,
    /// Messages each device had answered.
    answered: Vec<u64>,
    /// Echoes of a message that had already been answered (at-least-once).
    duplicates: u64,
    /// The longest any device waited for an answer.
    max_gap: Duration,
}

/// Runs the devices on this thread; `operator` runs beside them once all are
/// connected and talking, and returns when they may stop.
fn swarm(pki: &Pki, proxy: &Proc, operator: impl FnOnce() + Send) -> Outcome {
    let addr = proxy.addr;
    let mut cfg = holdfast::device::client_config(&opts(pki, proxy, "oven-1")).unwrap();
    cfg.resumption = rustls::client::Resumption::disabled();
    let cfg = Arc::new(cfg);
    let connected = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let (c2, s2) = (connected.clone(), stop.clone());
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while c2.load(Ordering::Relaxed) < DEVICES && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(1000));
            operator();
            s2.store(true, Ordering::Relaxed);
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).enable_timer().build().unwrap();
        rt.block_on(async {
            let errors: Rc<RefCell<Vec<String>>> = Rc::default();
            let answered: Rc<RefCell<Vec<u64>>> = Rc::new(RefCell::new(vec![0; DEVICES]));
            let dups: Rc<RefCell<u64>> = Rc::default();
            let gap: Rc<RefCell<Duration>> = Rc::default();
            let mut tasks = Vec::new();
            for dev in 0..DEVICES {
                let (cfg, errors, answered, dups, gap, connected, stop) =
                    (cfg.clone(), errors.clone(), answered.clone(), dups.clone(), gap.clone(), connected.clone(), stop.clone());
                if dev % 50 == 49 {
                    monoio::time::sleep(Duration::from_millis(20)).await;
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
                    monoio::time::sleep(Duration::from_millis((dev % 300) as u64)).await;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = format!("d{dev}:{i}");
                        let prev = (i > 0).then(|| format!("d{dev}:{}", i - 1));
                        let sent_at = Instant::now();
                        if let Err(f) = c.send(op::TEXT, m.as_bytes()).await {
                            errors.borrow_mut().push(format!("device {dev} send {i}: {}", f.1));
                            return;
                        }
                        loop {
                            match c.recv().await {
                                Ok(r) if r == m.as_bytes() => break,
                                // The previous message again: its first echo came,
                                // its credit did not, before its WSM died.
                                Ok(r) if prev.as_deref().is_some_and(|p| r == p.as_bytes()) => *dups.borrow_mut() += 1,
                                Ok(r) => {
                                    errors.borrow_mut().push(format!("device {dev} got {:?} for {m}", String::from_utf8_lossy(&r)));
                                    return;
                                }
                                Err(f) => {
                                    errors.borrow_mut().push(format!("device {dev} recv {i}: {}", f.1));
                                    return;
                                }
                            }
                        }
                        let waited = sent_at.elapsed();
                        if waited > *gap.borrow() {
                            *gap.borrow_mut() = waited;
                        }
                        i += 1;
                        answered.borrow_mut()[dev] = i;
                        monoio::time::sleep(EVERY).await;
                    }
                    c.close().await;
                }));
            }
            for t in tasks {
                t.await;
            }
            Outcome {
                errors: errors.borrow().clone(),
                answered: answered.borrow().clone(),
                duplicates: *dups.borrow(),
                max_gap: *gap.borrow(),
            }
        })
    })
}

fn stats(pki: &Pki, proxy: &Proc) -> serde_json::Value {
    let mut d = holdfast::device::Device::connect(&opts(pki, proxy, "oven-1")).unwrap();
    d.send_text("stats").unwrap();
    serde_json::from_str(&d.recv_text().unwrap()).unwrap()
}

fn log(p: &Proc) -> String {
    std::fs::read_to_string(&p.stderr_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("DEBUG"))
        .take(40)
        .collect::<Vec<_>>()
        .join("\n")
}

const UPSTREAM: &str = "ping_interval_ms = 300\nliveness_timeout_ms = 1500\nresume_timeout_ms = 10000\nresume_per_sec = 2000";

#[test]
fn a_thousand_devices_carry_on_when_a_wsm_is_killed() {
    let pki = Pki::new();
    let redis = start_redis(pki.path());
    let mut a = start_wsm_args(pki.path(), "wsm-a", &["--store", &redis.url]);
    let b = start_wsm_args(pki.path(), "wsm-b", &["--store", &redis.url]);
    let proxy = start_proxy_full(&pki, &[a.addr, b.addr], 2, "", "idle_timeout_secs = 0", UPSTREAM, &[]);
    let killed_at = std::sync::Mutex::new(None);
    let out = swarm(&pki, &proxy, || {
        a.child.kill().unwrap();
        let _ = a.child.wait();
        *killed_at.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(Duration::from_secs(4));
    });
    assert!(
        out.errors.is_empty(),
        "{} device errors, first: {:?}; log:\n{}",
        out.errors.len(),
        &out.errors[..out.errors.len().min(5)],
        log(&proxy)
    );
    let min = out.answered.iter().min().copied().unwrap_or(0);
    assert!(min >= 10, "every device talked before and after: the least answered {min}");
    assert!(out.max_gap < Duration::from_secs(3), "bounded gap: {:?}", out.max_gap);
    let st = stats(&pki, &proxy);
    assert!(st["resumed"].as_u64().unwrap() >= 400, "the survivor took the dead one's streams (about half): {st}");
    assert_eq!(metric(&proxy, "holdfast_streams_resume_failed_total", ""), 0);
    eprintln!("kill -9: longest gap {:?}, {} duplicate echoes, survivor {st}", out.max_gap, out.duplicates);
    drop(b);
}

#[test]
fn a_thousand_devices_move_off_a_draining_wsm_with_nothing_lost_or_repeated() {
    let pki = Pki::new();
    let redis = start_redis(pki.path());
    let mut a = start_wsm_args(pki.path(), "wsm-a", &["--store", &redis.url]);
    let b = start_wsm_args(pki.path(), "wsm-b", &["--store", &redis.url]);
    let proxy = start_proxy_full(&pki, &[a.addr, b.addr], 2, "", "idle_timeout_secs = 0", UPSTREAM, &[]);
    let status = std::sync::Mutex::new(None);
    let out = swarm(&pki, &proxy, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(s) = a.child.try_wait().unwrap() {
                *status.lock().unwrap() = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    assert!(
        out.errors.is_empty(),
        "{} device errors, first: {:?}; log:\n{}",
        out.errors.len(),
        &out.errors[..out.errors.len().min(5)],
        log(&proxy)
    );
    assert_eq!(out.duplicates, 0, "a planned move repeats nothing");
    let min = out.answered.iter().min().copied().unwrap_or(0);
    assert!(min >= 8, "the least answered {min}");
    let s = status.lock().unwrap().expect("the draining WSM exited by itself");
    assert!(s.success(), "{s}");
    let st = stats(&pki, &proxy);
    assert!(st["resumed"].as_u64().unwrap() >= 400, "{st}");
    assert_eq!(metric(&proxy, "holdfast_messages_resent_total", ""), 0);
    eprintln!("goaway: longest gap {:?}, survivor {st}", out.max_gap);
    drop(b);
}
