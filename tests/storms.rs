//! Issue 13's acceptance tests, with the real binaries: admission control
//! (the WSM sees opens at no more than `wsm_opens_per_sec` while every
//! device of a storm is served; `max_connections` and the open queue shed
//! with 503 and a jittered Retry-After, touching no established device;
//! handshakes wait in the accept queue), and departures (SIGTERM closes
//! every device with 1001 and close_notify spread over `stop_over_ms`, then
//! exits; a second signal closes the rest at once; `ctl drain` and
//! `--cancel`; `max_age_secs` spread over its jitter; `reload
//! --migrate-over` after a certificate rotation).
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device_async::WsClient;
use holdfast::ws::frame::op;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What became of one device.
#[derive(Debug, Clone, Default)]
struct Fate {
    /// When its upgrade was answered 101.
    connected: Option<Instant>,
    /// Why it was not (the status line and Retry-After).
    refused: Option<String>,
    /// The close code holdfast sent, when, and whether close_notify followed.
    closed: Option<(Option<u16>, Instant, bool)>,
    error: Option<String>,
}

/// Devices that connect at once, echo a message every `every`, and record
/// how they end; they stop (closing themselves) when `stop` is set.
struct Swarm {
    fates: Arc<Mutex<Vec<Fate>>>,
    stop: Arc<AtomicBool>,
    answered: Arc<Vec<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swarm {
    fn start(pki: &Pki, addr: SocketAddr, n: usize, every: Duration) -> Swarm {
        let mut c = holdfast::device::client_config(&opts_at(pki, addr, "oven-1")).unwrap();
        c.resumption = rustls::client::Resumption::disabled();
        let cfg = Arc::new(c);
        let fates = Arc::new(Mutex::new(vec![Fate::default(); n]));
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let (f2, s2, a2) = (fates.clone(), stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).enable_timer().build().unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for dev in 0..n {
                    let (cfg, fates, stop, answered) = (cfg.clone(), f2.clone(), s2.clone(), a2.clone());
                    tasks.push(monoio::spawn(async move {
                        let set = |f: &dyn Fn(&mut Fate)| f(&mut fates.lock().unwrap()[dev]);
                        let mut c = match WsClient::connect(cfg, None, addr, "/").await {
                            Ok(c) => c,
                            Err(f) => return set(&|x| x.refused = Some(f.1.clone())),
                        };
                        let now = Instant::now();
                        set(&|x| x.connected = Some(now));
                        let mut i = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let m = format!("d{dev}:{i}");
                            if let Err(f) = c.send(op::TEXT, m.as_bytes()).await {
                                return set(&|x| x.error = Some(format!("send {i}: {}", f.1)));
                            }
                            match c.recv().await {
                                Ok(r) if r == m.as_bytes() => {}
                                Ok(r) => return set(&|x| x.error = Some(format!("got {:?} for {m}", String::from_utf8_lossy(&r)))),
                                Err(f) => match c.closed_with {
                                    Some(code) => {
                                        let at = Instant::now();
                                        // After the close frame: close_notify (rustls reads
                                        // it as the end), not a bare TCP close (an error).
                                        let notify = matches!(c.recv().await, Err(e) if e.1 == "TLS closed");
                                        return set(&|x| x.closed = Some((code, at, notify)));
                                    }
                                    None => return set(&|x| x.error = Some(format!("recv {i}: {}", f.1))),
                                },
                            }
                            i += 1;
                            answered[dev].store(i, Ordering::Relaxed);
                            let until = Instant::now() + every;
                            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                                monoio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        c.close().await;
                    }));
                }
                for t in tasks {
                    t.await;
                }
            })
        });
        Swarm { fates, stop, answered, thread: Some(thread) }
    }

    fn fates(&self) -> Vec<Fate> {
        self.fates.lock().unwrap().clone()
    }

    fn settled(&self) -> usize {
        self.fates().iter().filter(|f| f.connected.is_some() || f.refused.is_some() || f.error.is_some()).count()
    }

    fn wait_settled(&self, secs: u64) {
        let n = self.fates().len();
        eventually(secs, "every device connected or refused", || self.settled() == n);
    }

    fn answered(&self) -> Vec<u64> {
        self.answered.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    /// Every connected device that was not closed answers again.
    fn still_talking(&self, what: &str) {
        let before = self.answered();
        let fates = self.fates();
        eventually(15, &format!("{what}: every open device answered again"), || {
            let now = self.answered();
            fates.iter().enumerate().all(|(i, f)| f.connected.is_none() || f.closed.is_some() || now[i] > before[i])
        });
        let errors: Vec<_> = self.fates().iter().filter_map(|f| f.error.clone()).collect();
        assert!(errors.is_empty(), "{what}: {errors:?}");
    }

    fn finish(mut self) -> Vec<Fate> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.fates()
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tables(admission: &str, more: &str) -> String {
    format!("[admission]\n{admission}\n{more}")
}

fn proxy(pki: &Pki, wsm: SocketAddr, shards: usize, ws: &str, tables: &str) -> Proc {
    let extra = Extra { ws, tables, ..Default::default() };
    start_proxy_extra(pki, &[wsm], shards, &extra, &[])
}

/// The Retry-After of a refusal like "HTTP/1.1 503 Service Unavailable; Retry-After: 17".
fn retry_after(refused: &str) -> Option<u32> {
    refused.split("Retry-After:").nth(1)?.trim().parse().ok()
}

/// The closes of a swarm: all `code` with close_notify after, none before
/// `from` or after `from + window` (with slack), spread over the window
/// and not bunched.
fn spread(fates: &[Fate], from: Instant, window: Duration, code: u16, what: &str) -> Vec<Instant> {
    let closes: Vec<Instant> = fates
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let (c, at, notify) = f.closed?;
            assert_eq!(c, Some(code), "{what}: device {i}");
            assert!(notify, "{what}: device {i} got no close_notify after its close frame");
            assert!(at >= from, "{what}: device {i} closed before");
            assert!(at.duration_since(from) <= window + Duration::from_millis(1500), "{what}: device {i} closed {:?} after", at - from);
            Some(at)
        })
        .collect();
    assert!(!closes.is_empty(), "{what}: nothing closed");
    let first = *closes.iter().min().unwrap();
    let last = *closes.iter().max().unwrap();
    assert!(last.duration_since(first) >= window / 2, "{what}: all within {:?}, not spread over {window:?}", last - first);
    let tenth = window / 10;
    for t in &closes {
        let near = closes.iter().filter(|c| **c >= *t && **c < *t + tenth).count();
        assert!(near * 4 <= closes.len().max(12), "{what}: {near} of {} closed within {tenth:?}", closes.len());
    }
    closes
}

#[test]
fn a_storm_reaches_the_wsm_at_the_open_rate_and_every_device_is_served() {
    const DEVICES: usize = 300;
    const RATE: usize = 100;
    let pki = Pki::new();
    let log = pki.path().join("opens.log");
    let wsm = start_wsm_args(pki.path(), "wsm-a", &["--open-log", log.to_str().unwrap()]);
    let p = proxy(&pki, wsm.addr, 2, "", &tables(&format!("wsm_opens_per_sec = {RATE}\nwsm_open_wait_ms = 30000"), ""));
    let t0 = Instant::now();
    let swarm = Swarm::start(&pki, p.addr, DEVICES, Duration::from_millis(500));
    swarm.wait_settled(60);
    let took = t0.elapsed();
    let fates = swarm.fates();
    let refused: Vec<_> = fates.iter().filter_map(|f| f.refused.clone()).collect();
    assert!(refused.is_empty(), "every device of the storm is served: {refused:?}");
    swarm.still_talking("after the storm");
    let (ms, per_sec) = holdfast_wsm::openlog::per_second(&std::fs::read_to_string(&log).unwrap());
    assert_eq!(ms.len(), DEVICES, "one OPEN per device");
    // The burst is a tenth of a second's worth per shard (2 x 5).
    let peak = holdfast_wsm::openlog::peak_in(&ms, 1000);
    assert!(peak <= RATE + 15, "at most {RATE}/s (and a small burst) reached the WSM: {peak} in one second; per second {per_sec:?}");
    assert!(took >= Duration::from_secs_f64((DEVICES - 20) as f64 / RATE as f64), "the storm took {took:?}: not paced");
    assert!(metric(&p, "holdfast_wsm_opens_total", "") >= DEVICES as u64);
    assert!(metric(&p, "holdfast_wsm_open_waited_total", "") > 0, "devices waited their turn");
    assert_eq!(metric(&p, "holdfast_admission_shed_total", ""), 0);
    let (ok, status) = ctl(p.config.as_ref().unwrap(), &["status", "--json"]);
    assert!(ok, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["status"]["admission"]["wsm_opens_per_sec"], RATE);
    assert!(v["status"]["admission"]["wsm_opens_total"].as_u64().unwrap() >= DEVICES as u64);
    swarm.finish();
}

#[test]
fn max_connections_sheds_the_excess_with_a_jittered_retry_after_and_touches_no_established_device() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "", &tables("max_connections = 20\nretry_after_secs = 5\nretry_after_jitter_secs = 25", ""));
    let held = Swarm::start(&pki, p.addr, 20, Duration::from_millis(300));
    held.wait_settled(30);
    assert!(held.fates().iter().all(|f| f.connected.is_some()), "{:?}", held.fates());
    let extra = Swarm::start(&pki, p.addr, 30, Duration::from_millis(300));
    extra.wait_settled(30);
    let fates = extra.fates();
    let mut afters = Vec::new();
    for f in &fates {
        let r = f.refused.as_deref().unwrap_or_else(|| panic!("beyond max_connections a device is refused: {f:?}"));
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        let s = retry_after(r).unwrap_or_else(|| panic!("no Retry-After: {r}"));
        assert!((5..=30).contains(&s), "{r}");
        afters.push(s);
    }
    afters.sort_unstable();
    afters.dedup();
    assert!(afters.len() >= 5, "Retry-After is jittered per device: {afters:?}");
    assert_eq!(metric(&p, "holdfast_admission_shed_total", "limit=\"max_connections\""), 30);
    held.still_talking("while the excess was refused");
    assert!(held.fates().iter().all(|f| f.closed.is_none()), "no established device was touched");
    // Room again once some leave.
    let fates = held.finish();
    assert!(fates.iter().all(|f| f.error.is_none() && f.closed.is_none()), "{fates:?}");
    // Their closes reach holdfast a moment after the devices are done.
    eventually(10, "the departed devices to be released", || metric(&p, "holdfast_connections_active", "") == 0);
    let again = Swarm::start(&pki, p.addr, 10, Duration::from_millis(300));
    again.wait_settled(30);
    assert!(again.fates().iter().all(|f| f.connected.is_some()), "{:?}", again.fates());
    again.finish();
}

#[test]
fn the_open_queue_sheds_when_full_or_waited_too_long() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    // One shard: one open per second, two places, 1.5 s of waiting.
    let p = proxy(&pki, wsm.addr, 1, "", &tables("wsm_opens_per_sec = 1\nwsm_open_queue = 2\nwsm_open_wait_ms = 1500", ""));
    let s = Swarm::start(&pki, p.addr, 5, Duration::from_millis(300));
    s.wait_settled(30);
    let fates = s.fates();
    let ok = fates.iter().filter(|f| f.connected.is_some()).count();
    let refused: Vec<&str> = fates.iter().filter_map(|f| f.refused.as_deref()).collect();
    assert!(refused.iter().all(|r| r.starts_with("HTTP/1.1 503 ") && retry_after(r).is_some()), "{refused:?}");
    assert_eq!(ok + refused.len(), 5, "{fates:?}");
    assert_eq!(ok, 2, "the burst and the first in the queue: {fates:?}");
    assert_eq!(metric(&p, "holdfast_admission_shed_total", "limit=\"wsm_open_queue\""), 2);
    assert_eq!(metric(&p, "holdfast_admission_shed_total", "limit=\"wsm_open_wait\""), 1);
    s.still_talking("after the queue shed the rest");
    s.finish();
}

#[test]
fn handshakes_beyond_their_rate_wait_in_the_accept_queue_and_are_all_served() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 1, "", &tables("handshakes_per_sec = 20\nmax_handshaking = 4", ""));
    let t0 = Instant::now();
    let s = Swarm::start(&pki, p.addr, 60, Duration::from_millis(500));
    s.wait_settled(60);
    let took = t0.elapsed();
    assert!(s.fates().iter().all(|f| f.connected.is_some()), "{:?}", s.fates());
    assert!(took >= Duration::from_millis(2400), "60 handshakes at 20/s took {took:?}");
    assert!(metric(&p, "holdfast_accepts_deferred_total", "") > 0);
    let times: Vec<Instant> = s.fates().iter().filter_map(|f| f.connected).collect();
    let peak = times.iter().map(|t| times.iter().filter(|u| **u >= *t && **u < *t + Duration::from_secs(1)).count()).max().unwrap();
    assert!(peak <= 20 + 4, "{peak} handshakes in one second");
    s.finish();
}

#[test]
fn sigterm_closes_every_device_with_1001_spread_over_stop_over_ms_then_exits() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let mut p = proxy(&pki, wsm.addr, 2, "", "[drain]\nstop_over_ms = 3000\n");
    let s = Swarm::start(&pki, p.addr, 200, Duration::from_millis(400));
    s.wait_settled(30);
    assert!(s.fates().iter().all(|f| f.connected.is_some()));
    let t0 = Instant::now();
    kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM).unwrap();
    // Not accepting any more (the listeners are closed).
    eventually(5, "the listeners to close", || std::net::TcpStream::connect(p.addr).is_err());
    let mut status = None;
    eventually(15, "holdfast to exit after the drain", || {
        status = p.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "exit 0");
    let exited = t0.elapsed();
    let fates = s.finish();
    assert!(fates.iter().all(|f| f.error.is_none()), "{fates:?}");
    assert!(fates.iter().all(|f| f.closed.is_some()), "every device was closed with a close frame");
    spread(&fates, t0, Duration::from_millis(3000), 1001, "SIGTERM");
    assert!(exited >= Duration::from_millis(1500) && exited < Duration::from_secs(10), "exited after {exited:?}");
}

#[test]
fn a_second_signal_closes_the_rest_at_once_still_with_close_frames() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let mut p = proxy(&pki, wsm.addr, 2, "", "[drain]\nstop_over_ms = 600000\n");
    let s = Swarm::start(&pki, p.addr, 100, Duration::from_millis(400));
    s.wait_settled(30);
    let pid = Pid::from_raw(p.child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    kill(pid, Signal::SIGINT).unwrap();
    let mut status = None;
    eventually(10, "holdfast to exit", || {
        status = p.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(t1.elapsed() < Duration::from_secs(5));
    let fates = s.finish();
    for (i, f) in fates.iter().enumerate() {
        let (code, _, notify) = f.closed.unwrap_or_else(|| panic!("device {i}: {f:?}"));
        assert_eq!(code, Some(1001), "device {i}");
        assert!(notify, "device {i}: close_notify");
    }
}

#[test]
fn ctl_drain_closes_spread_out_and_cancel_keeps_the_rest_and_accepts_again() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "", "");
    let cfg = p.config.clone().unwrap();
    let s = Swarm::start(&pki, p.addr, 120, Duration::from_millis(400));
    s.wait_settled(30);
    let t0 = Instant::now();
    let (ok, out) = ctl(&cfg, &["drain", "--over", "6s", "--code", "1012"]);
    assert!(ok && out.contains("draining"), "{out}");
    eventually(5, "the listeners to close", || std::net::TcpStream::connect(p.addr).is_err());
    assert_eq!(single(&p, "holdfast_draining"), 1);
    let (ok, status) = ctl(&cfg, &["status", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["status"]["drain"]["code"], 1012, "{status}");
    assert_eq!(v["status"]["drain"]["connections_at_start"], 120, "{status}");
    std::thread::sleep(Duration::from_millis(2000).saturating_sub(t0.elapsed()));
    let (ok, out) = ctl(&cfg, &["drain", "--cancel"]);
    assert!(ok, "{out}");
    // Each shard counts a paced close when it carries it out, on its own
    // thread, before it answers the cancel: so this count is final, however
    // late the devices (on a loaded machine) notice their closes.
    let at_cancel = metric(&p, "holdfast_connections_paced_close_total", "reason=\"drain\"");
    assert_eq!(single(&p, "holdfast_draining"), 0);
    // Accepting again, and what was not closed stays, past the old window.
    let (ok, out) = ctl(&cfg, &["drain", "--cancel"]);
    assert!(!ok && out.contains("no drain"), "{out}");
    let mut dev = holdfast::device::Device::connect(&opts(&pki, &p, "oven-1")).expect("accepting again after --cancel");
    dev.send_text("back").unwrap();
    assert_eq!(dev.recv_text().unwrap(), "back");
    std::thread::sleep(Duration::from_millis(6000).saturating_sub(t0.elapsed()) + Duration::from_millis(500));
    s.still_talking("after the cancelled drain's window");
    let fates = s.finish();
    let closed: Vec<_> = fates.iter().filter_map(|f| f.closed).collect();
    assert!(!closed.is_empty() && closed.len() < 100, "about a third closed before the cancel: {}", closed.len());
    for (code, _, notify) in &closed {
        assert_eq!(*code, Some(1012));
        assert!(*notify);
    }
    assert_eq!(closed.len() as u64, at_cancel, "none closed after the cancel");
    assert_eq!(metric(&p, "holdfast_connections_paced_close_total", "reason=\"drain\""), at_cancel);
}

#[test]
fn a_drain_over_its_whole_window_empties_the_node_evenly() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "", "");
    let s = Swarm::start(&pki, p.addr, 150, Duration::from_millis(400));
    s.wait_settled(30);
    let t0 = Instant::now();
    let (ok, out) = ctl(p.config.as_ref().unwrap(), &["drain", "--over", "3s"]);
    assert!(ok, "{out}");
    eventually(10, "every connection to close", || s.fates().iter().all(|f| f.closed.is_some()));
    let fates = s.finish();
    spread(&fates, t0, Duration::from_secs(3), 1001, "ctl drain");
    eventually(5, "the node to hold nothing", || metric(&p, "holdfast_connections_active", "") == 0);
}

#[test]
fn max_age_closes_connections_spread_over_the_jitter_window() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "max_age_secs = 2\nmax_age_jitter_secs = 3", "");
    let s = Swarm::start(&pki, p.addr, 120, Duration::from_millis(300));
    s.wait_settled(30);
    eventually(15, "every connection to age out", || s.fates().iter().all(|f| f.closed.is_some()));
    let fates = s.finish();
    let mut ages = Vec::new();
    for (i, f) in fates.iter().enumerate() {
        let (code, at, notify) = f.closed.unwrap();
        assert_eq!(code, Some(1001), "device {i}");
        assert!(notify, "device {i}");
        let age = at.duration_since(f.connected.unwrap());
        assert!(age >= Duration::from_millis(1900) && age <= Duration::from_millis(5600), "device {i} closed at age {age:?}");
        ages.push(age);
    }
    let (lo, hi) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
    assert!(*hi - *lo >= Duration::from_millis(1800), "ages {lo:?}..{hi:?}: not spread over the jitter");
    assert_eq!(metric(&p, "holdfast_connections_paced_close_total", "reason=\"max_age\""), 120);
}

#[test]
fn reload_migrate_over_moves_devices_of_the_old_certificate_only() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "", "");
    let cfg = p.config.clone().unwrap();
    let old = Swarm::start(&pki, p.addr, 60, Duration::from_millis(300));
    old.wait_settled(30);
    // A new server certificate from a new CA; devices made from now on trust both.
    use holdfast::pki::{Validity, make_ca, make_leaf};
    let ca = make_ca("holdfast dev server CA, rotated").unwrap();
    let leaf = make_leaf(&ca, "localhost", vec!["localhost".into(), "127.0.0.1".into()], true, Validity::Current, 9).unwrap();
    std::fs::write(pki.path().join("server-chain.pem"), format!("{}{}", leaf.cert_pem, ca.pem)).unwrap();
    std::fs::write(pki.path().join("server.key"), &leaf.key_pem).unwrap();
    let both = format!("{}{}", std::fs::read_to_string(pki.path().join("server-ca.pem")).unwrap(), ca.pem);
    std::fs::write(pki.path().join("server-ca.pem"), both).unwrap();
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["reload", "--config"])
        .arg(&cfg)
        .args(["--migrate-over", "3s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server certificate"), "{}", String::from_utf8_lossy(&out.stdout));
    let new = Swarm::start(&pki, p.addr, 20, Duration::from_millis(300));
    new.wait_settled(30);
    eventually(10, "the old devices to be migrated", || old.fates().iter().all(|f| f.closed.is_some()));
    let fates = old.finish();
    spread(&fates, t0, Duration::from_secs(3), 1001, "migration");
    new.still_talking("devices on the new certificate");
    assert!(new.finish().iter().all(|f| f.closed.is_none()), "new handshakes are not migrated");
    assert_eq!(metric(&p, "holdfast_connections_paced_close_total", "reason=\"migrate\""), 60);
}

#[test]
fn above_the_memory_budget_set_by_a_reload_new_devices_are_shed_and_established_ones_stay() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = proxy(&pki, wsm.addr, 2, "", "");
    let held = Swarm::start(&pki, p.addr, 10, Duration::from_millis(300));
    held.wait_settled(30);
    assert!(held.fates().iter().all(|f| f.connected.is_some()));
    // A budget every process is above: 1 MiB.
    let cfg = p.config.clone().unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap() + "\n[admission]\nmax_memory_mb = 1\n";
    std::fs::write(&cfg, text).unwrap();
    kill(Pid::from_raw(p.child.id() as i32), Signal::SIGHUP).unwrap();
    eventually(10, "the reload", || single(&p, "holdfast_config_generation") >= 2);
    let extra = Swarm::start(&pki, p.addr, 5, Duration::from_millis(300));
    extra.wait_settled(30);
    for f in extra.fates() {
        let r = f.refused.clone().unwrap_or_else(|| panic!("above the budget a device is refused: {f:?}"));
        assert!(r.starts_with("HTTP/1.1 503 ") && retry_after(&r).is_some(), "{r}");
    }
    assert_eq!(metric(&p, "holdfast_admission_shed_total", "limit=\"memory\""), 5);
    held.still_talking("above the memory budget");
    assert!(held.finish().iter().all(|f| f.closed.is_none() && f.error.is_none()));
}
