//! WSM failover: when a WSM dies, stops answering, or drains with goaway,
//! its streams resume on another WSM with the same connection ID and the
//! device never notices; when no WSM is left, devices get 1013, spread out.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::time::{Duration, Instant};

use common::*;
use holdfast::device::Device;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const FAST: &str = "ping_interval_ms = 200\nliveness_timeout_ms = 1000\nresume_timeout_ms = 5000\nclose_spread_ms = 1000";

/// WSM instances "wsm-a" and "wsm-b" (memory store) and holdfast (one
/// shard, fast liveness) in front of both.
fn two_wsms_and_holdfast(pki: &Pki) -> (Proc, Proc, Proc) {
    let a = start_wsm(pki.path(), "wsm-a");
    let b = start_wsm(pki.path(), "wsm-b");
    let proxy = start_proxy_full(pki, &[a.addr, b.addr], 1, "", "", FAST, &[]);
    (a, b, proxy)
}

fn whoami(d: &mut Device) -> serde_json::Value {
    d.send_text("whoami").unwrap();
    serde_json::from_str(&d.recv_text().unwrap()).unwrap()
}

fn echo(d: &mut Device, m: &str) -> Result<(), String> {
    d.send_text(m).map_err(|e| format!("send {m}: {e}"))?;
    match d.recv_text() {
        Ok(r) if r == m => Ok(()),
        Ok(r) => Err(format!("sent {m}, got {r}")),
        Err(e) => Err(format!("{m}: {e}")),
    }
}

/// Devices spread over two WSMs, with the node and connection ID each is on.
fn connect_devices(pki: &Pki, proxy: &Proc, n: usize) -> Vec<(Device, String, String)> {
    (0..n)
        .map(|_| {
            let mut d = Device::connect(&opts(pki, proxy, "oven-1")).unwrap();
            let w = whoami(&mut d);
            let (node, id) = (w["wsm"].as_str().unwrap().to_string(), w["connection_id"].as_str().unwrap().to_string());
            (d, node, id)
        })
        .collect()
}

fn metric_sum(proxy: &Proc, name: &str) -> u64 {
    metric(proxy, name, "")
}

fn check_all_moved_to(devices: &mut [(Device, String, String)], survivor: &str, log: &std::path::Path) {
    for (i, (d, node, id)) in devices.iter_mut().enumerate() {
        for k in 0..3 {
            if let Err(e) = echo(d, &format!("device {i} after {k}")) {
                panic!("device {i} (was on {node}): {e}; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
        }
        let w = whoami(d);
        assert_eq!(w["connection_id"].as_str().unwrap(), id, "device {i} keeps its connection ID");
        assert_eq!(w["wsm"].as_str().unwrap(), survivor, "device {i} is served by the survivor");
        if node != survivor {
            assert_eq!(w["resumed"], true, "device {i}: the survivor saw a resumed stream");
        }
    }
}

#[test]
fn a_killed_wsm_s_streams_resume_on_the_other_with_no_device_disconnect() {
    let pki = Pki::new();
    let (mut a, b, proxy) = two_wsms_and_holdfast(&pki);
    let mut devices = connect_devices(&pki, &proxy, 30);
    let on_a = devices.iter().filter(|(_, n, _)| n == "wsm-a").count();
    assert!(on_a > 5 && on_a < 25, "streams spread over both WSMs: {on_a} of 30 on wsm-a");
    // Messages in flight when the WSM dies: sent, not yet answered.
    for (i, (d, _, _)) in devices.iter_mut().enumerate() {
        d.send_text(&format!("in flight {i}")).unwrap();
    }
    a.child.kill().unwrap(); // SIGKILL
    let _ = a.child.wait();
    // Every message sent before the kill is answered once, by one WSM or the
    // other: the dead one's unacknowledged ones are sent again.
    for (i, (d, node, _)) in devices.iter_mut().enumerate() {
        match d.recv_text() {
            Ok(r) => assert_eq!(r, format!("in flight {i}")),
            Err(e) => panic!("device {i} on {node}: {e}; log:\n{}", std::fs::read_to_string(&proxy.stderr_log).unwrap_or_default()),
        }
    }
    check_all_moved_to(&mut devices, "wsm-b", &proxy.stderr_log);
    assert!(metric_sum(&proxy, "holdfast_streams_detached_total") >= on_a as u64);
    assert!(metric_sum(&proxy, "holdfast_streams_resumed_total") >= on_a as u64);
    assert_eq!(metric_sum(&proxy, "holdfast_streams_resume_failed_total"), 0);
    drop(b);
}

#[test]
fn a_wsm_that_stops_answering_is_found_by_liveness_and_left() {
    let pki = Pki::new();
    let (a, b, proxy) = two_wsms_and_holdfast(&pki);
    let mut devices = connect_devices(&pki, &proxy, 20);
    let a_pid = Pid::from_raw(a.child.id() as i32);
    // Frozen, not dead: its sockets stay open and silent.
    kill(a_pid, Signal::SIGSTOP).unwrap();
    let start = Instant::now();
    check_all_moved_to(&mut devices, "wsm-b", &proxy.stderr_log);
    assert!(start.elapsed() < Duration::from_secs(8), "found within the liveness timeout: {:?}", start.elapsed());
    assert!(metric_sum(&proxy, "holdfast_link_liveness_failures_total") >= 1);
    kill(a_pid, Signal::SIGCONT).unwrap();
    drop(b);
}

#[test]
fn with_every_wsm_gone_devices_get_1013_spread_over_the_window() {
    let pki = Pki::new();
    let mut a = start_wsm(pki.path(), "wsm-a");
    let extra = "ping_interval_ms = 200\nliveness_timeout_ms = 1000\nresume_timeout_ms = 1000\nclose_spread_ms = 1500\n\
                 held_bytes_per_connection = 4096";
    let proxy = start_proxy_full(&pki, &[a.addr], 1, "", "", extra, &[]);
    let mut devices = connect_devices(&pki, &proxy, 16);
    a.child.kill().unwrap();
    let _ = a.child.wait();
    let killed = Instant::now();
    // Devices keep sending meanwhile: held, not dropped, not a disconnect;
    // one sends far more than its bound, and is paused by backpressure.
    for (d, _, _) in devices.iter_mut() {
        d.send_text("held while no WSM is up").unwrap();
    }
    let kib = "x".repeat(1024);
    for _ in 0..40 {
        devices[0].0.send_text(&kib).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = metric_sum(&proxy, "holdfast_held_bytes");
    assert!(held > 4096, "the flooding device's messages are held: {held}");
    assert!(held <= 16 * (4096 + 1024), "within the per-connection bound (plus one message each): {held}");
    // One reader per device, so each close is timed when it arrives.
    let readers: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(i, (mut d, _, _))| {
            std::thread::spawn(move || match d.recv_close() {
                Ok(code) => {
                    assert_eq!(code, Some(1013), "device {i}");
                    killed.elapsed()
                }
                Err(e) => panic!("device {i}: {e}"),
            })
        })
        .collect();
    let mut closed_after: Vec<Duration> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    closed_after.sort();
    let (first, last) = (closed_after[0], closed_after[closed_after.len() - 1]);
    assert!(first >= Duration::from_millis(900), "not before resume_timeout: {first:?}");
    assert!(last - first >= Duration::from_millis(300), "spread out, not all at once: {closed_after:?}");
    assert!(last < Duration::from_secs(5), "{closed_after:?}");
    assert_eq!(metric_sum(&proxy, "holdfast_streams_resume_failed_total"), 16);
    assert_eq!(metric_sum(&proxy, "holdfast_held_bytes"), 0, "held messages were released");
}

#[test]
fn goaway_moves_every_stream_and_the_draining_wsm_exits() {
    let pki = Pki::new();
    let (mut a, b, proxy) = two_wsms_and_holdfast(&pki);
    let mut devices = connect_devices(&pki, &proxy, 30);
    let on_a = devices.iter().filter(|(_, n, _)| n == "wsm-a").count();
    assert!(on_a > 0);
    // Messages in flight when the drain starts, and during it.
    for (i, (d, _, _)) in devices.iter_mut().enumerate() {
        d.send_text(&format!("before {i}")).unwrap();
    }
    kill(Pid::from_raw(a.child.id() as i32), Signal::SIGTERM).unwrap();
    for (i, (d, _, _)) in devices.iter_mut().enumerate() {
        d.send_text(&format!("during {i}")).unwrap();
    }
    for (i, (d, node, _)) in devices.iter_mut().enumerate() {
        for m in [format!("before {i}"), format!("during {i}")] {
            match d.recv_text() {
                Ok(r) => assert_eq!(r, m, "device {i} on {node}: nothing lost, repeated or reordered"),
                Err(e) => panic!("device {i} on {node}: {e}"),
            }
        }
    }
    // The draining WSM exits by itself, cleanly, once its streams are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the draining WSM did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    check_all_moved_to(&mut devices, "wsm-b", &proxy.stderr_log);
    assert!(metric_sum(&proxy, "holdfast_streams_moved_total") >= on_a as u64);
    assert_eq!(metric_sum(&proxy, "holdfast_messages_resent_total"), 0, "a planned move sends nothing twice");
    drop(b);
}

fn redis_get(url: &str, key: &str) -> Option<String> {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("GET").arg(key).query(&mut c).unwrap()
}

#[test]
fn with_redis_the_survivor_finds_the_session_the_dead_wsm_stored() {
    let pki = Pki::new();
    let redis = start_redis(pki.path());
    let mut a = start_wsm_args(pki.path(), "wsm-a", &["--store", &redis.url]);
    let b = start_wsm_args(pki.path(), "wsm-b", &["--store", &redis.url]);
    let proxy = start_proxy_full(&pki, &[a.addr, b.addr], 1, "", "", FAST, &[]);
    let mut devices = connect_devices(&pki, &proxy, 12);
    for (i, (d, _, _)) in devices.iter_mut().enumerate() {
        for k in 0..3 {
            echo(d, &format!("device {i} message {k}")).unwrap();
        }
    }
    a.child.kill().unwrap();
    let _ = a.child.wait();
    for (i, (d, node, id)) in devices.iter_mut().enumerate() {
        let w = whoami(d);
        assert_eq!(w["wsm"], "wsm-b");
        assert_eq!(w["connection_id"].as_str().unwrap(), id);
        // whoami, three messages, this whoami: counted across both instances.
        assert_eq!(w["session"]["messages"], 5, "device {i}: {w}");
        assert_eq!(w["session"]["first_wsm"].as_str().unwrap(), node, "device {i}: the session the first instance stored");
        let p = redis_get(&redis.url, &format!("holdfast:presence:{id}")).expect("present");
        assert!(p.contains("wsm-b"), "presence names the instance that holds it now: {p}");
    }
    drop(b);
}

#[test]
fn presence_lapses_by_itself_when_holdfast_is_killed() {
    let pki = Pki::new();
    let redis = start_redis(pki.path());
    let args = ["--store", redis.url.as_str(), "--presence-interval-ms", "200", "--presence-ttl-ms", "700"];
    let _a = start_wsm_args(pki.path(), "wsm-a", &args);
    let mut proxy = start_proxy_full(&pki, &[_a.addr], 1, "", "", FAST, &[]);
    let mut devices = connect_devices(&pki, &proxy, 8);
    let keys: Vec<String> = devices.iter().map(|(_, _, id)| format!("holdfast:presence:{id}")).collect();
    // Kept present by the heartbeat well past one time to live.
    std::thread::sleep(Duration::from_millis(1500));
    for k in &keys {
        assert!(redis_get(&redis.url, k).is_some(), "{k} present while connected");
    }
    // A device that leaves cleanly is gone at once.
    let (mut leaver, _, leaver_id) = devices.pop().unwrap();
    leaver.close(1000).unwrap();
    let leaver_key = format!("holdfast:presence:{leaver_id}");
    eventually(3, "the leaving device to be absent", || redis_get(&redis.url, &leaver_key).is_none());
    // Killed holdfast: no one says goodbye; the keys expire on their own.
    proxy.child.kill().unwrap();
    let _ = proxy.child.wait();
    let killed = Instant::now();
    eventually(5, "presence to lapse", || keys[..keys.len() - 1].iter().all(|k| redis_get(&redis.url, k).is_none()));
    assert!(killed.elapsed() < Duration::from_millis(700 + 200 + 1000), "within the TTL and one interval: {:?}", killed.elapsed());
}

#[test]
fn the_wsm_pool_follows_dns_and_a_departed_address_gives_its_streams_away() {
    let pki = Pki::new();
    // Two WSMs on one port at two loopback addresses, behind one name.
    let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    let (la, lb) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let a = start_wsm_args(pki.path(), "wsm-a", &["--listen", &la]);
    let b = start_wsm_args(pki.path(), "wsm-b", &["--listen", &lb]);
    let hosts = pki.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 wsm.pool\n").unwrap();
    let upstream = format!("{FAST}\ndns_refresh_ms = 200");
    let wsm: std::net::SocketAddr = la.parse().unwrap();
    // `wsm` only sizes the list; the config names the pool instead.
    let proxy = {
        let p = start_proxy_full(&pki, &[wsm], 1, "", "", &upstream, &[("HOLDFAST_HOSTS", hosts.to_str().unwrap())]);
        let cfg =
            std::fs::read_to_string(p.config.as_ref().unwrap()).unwrap().replace(&format!("\"{la}\""), &format!("\"wsm.pool:{port}\""));
        drop(p);
        let path = pki.path().join("pool.toml");
        std::fs::write(&path, cfg).unwrap();
        start_holdfast_config(&pki, &path, &[("HOLDFAST_HOSTS", hosts.to_str().unwrap())])
    };
    let mut devices = connect_devices(&pki, &proxy, 10);
    assert!(devices.iter().all(|(_, n, _)| n == "wsm-a"), "one address in the pool");
    // The pool grows: links to the new address come up, new streams use it.
    std::fs::write(&hosts, "127.0.0.2 wsm.pool\n127.0.0.3 wsm.pool\n").unwrap();
    eventually(10, "links to the second WSM", || metric(&proxy, "holdfast_links_up", "") == 2);
    let more = connect_devices(&pki, &proxy, 10);
    assert!(more.iter().any(|(_, n, _)| n == "wsm-b"), "new streams reach the new WSM");
    // The pool shrinks: the departed address's streams move, by plan.
    std::fs::write(&hosts, "127.0.0.3 wsm.pool\n").unwrap();
    eventually(10, "streams to move off the departed address", || metric_sum(&proxy, "holdfast_streams_moved_total") >= 10);
    check_all_moved_to(&mut devices, "wsm-b", &proxy.stderr_log);
    eventually(10, "the departed WSM's link to close", || metric(&proxy, "holdfast_links_up", "") == 1);
    assert_eq!(metric_sum(&proxy, "holdfast_messages_resent_total"), 0, "moved by plan: nothing sent twice");
    drop((a, b));
}

#[test]
fn a_lone_draining_wsm_keeps_its_streams_while_no_other_can_take_them() {
    let pki = Pki::new();
    let a = start_wsm_args(pki.path(), "wsm-a", &["--drain-timeout", "30"]);
    let proxy = start_proxy_full(&pki, &[a.addr], 1, "", "", FAST, &[]);
    let mut devices = connect_devices(&pki, &proxy, 5);
    kill(Pid::from_raw(a.child.id() as i32), Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    // Nowhere to move them: they stay on the draining WSM and keep working.
    for (i, (d, _, _)) in devices.iter_mut().enumerate() {
        echo(d, &format!("still here {i}")).unwrap();
        assert_eq!(whoami(d)["wsm"], "wsm-a");
    }
    assert_eq!(metric_sum(&proxy, "holdfast_streams_moved_total"), 0);
    assert_eq!(metric_sum(&proxy, "holdfast_streams_detached_total"), 0);
}
