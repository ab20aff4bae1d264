//! Hostile devices against the real binary, while well-behaved devices keep
//! exchanging messages: a flood of connections that send nothing, slow
//! handshakes and slow upgrade headers, ping floods whose pongs are never
//! read, devices that never read while their echoes pile up, partial
//! records and half-finished messages left hanging, and resets at every
//! stage. Each attacker gets its outcome (closed by the right timeout or
//! limit); the well-behaved devices see no error and no stall; afterwards
//! holdfast holds no connection, stream, descriptor or memory more than it
//! did before (issue 14).
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use holdfast::device::Device;
use holdfast::ws::frame::op;

fn proc_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Raw bytes of the RST-on-close kind: SO_LINGER 0, then drop.
fn reset(s: TcpStream) {
    let s = socket2::Socket::from(s);
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// Well-behaved devices, each a round trip every 50 ms, the longest noted,
/// while the attacks run.
struct Talkers {
    stop: Arc<AtomicBool>,
    worst_us: Arc<AtomicU64>,
    trips: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Talkers {
    /// `n` devices, talking once this returns.
    fn start(o: &holdfast::device::DeviceOptions, n: usize) -> Talkers {
        let stop = Arc::new(AtomicBool::new(false));
        let worst_us = Arc::new(AtomicU64::new(0));
        let trips = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|i| {
                let (o, stop, worst, trips) = (o.clone(), stop.clone(), worst_us.clone(), trips.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let mut d = Device::connect(&o).map_err(|e| format!("good {i} connect: {e}"))?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let m = format!("good {i} {n}");
                        let t = Instant::now();
                        d.send_text(&m).map_err(|e| format!("good {i} send {n}: {e}"))?;
                        let r = d.recv_text().map_err(|e| format!("good {i} recv {n}: {e}"))?;
                        if r != m {
                            return Err(format!("good {i}: got {r:?} for {m:?}"));
                        }
                        worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                        trips.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = d.close(1000);
                    Ok(())
                })
            })
            .collect();
        let t = Talkers { stop, worst_us, trips, threads };
        eventually(10, "the well-behaved devices to talk", || t.trips.load(Ordering::Relaxed) > 2 * n as u64);
        t
    }

    /// They go on talking after the attacks, never failed, never stalled.
    fn finish(self) {
        let before = self.trips.load(Ordering::Relaxed);
        let n = self.threads.len() as u64;
        eventually(5, "the well-behaved devices to keep talking", || self.trips.load(Ordering::Relaxed) > before + 2 * n);
        self.stop.store(true, Ordering::Relaxed);
        for g in self.threads {
            g.join().unwrap().unwrap();
        }
        let worst = Duration::from_micros(self.worst_us.load(Ordering::Relaxed));
        assert!(worst < Duration::from_millis(500), "a well-behaved round trip took {worst:?} meanwhile");
    }
}

/// Nothing left behind: no connection, held stream, partial record, lent
/// buffer or descriptor more than before, RSS within 64 MiB of `rss0`.
fn left_nothing(p: &Proc, fds0: usize, rss0: u64) {
    let pid = p.child.id();
    eventually(15, "every connection to be gone", || metric(p, "holdfast_connections_active", "") == 0);
    assert_eq!(metric(p, "holdfast_handshaking", ""), 0);
    assert_eq!(metric(p, "holdfast_streams_held", ""), 0);
    assert_eq!(metric(p, "holdfast_partial_bytes", ""), 0);
    assert_eq!(metric(p, "holdfast_buffers_in_use", ""), 0);
    eventually(10, "descriptors back to where they were", || proc_fds(pid) <= fds0);
    let rss1 = rss_kib(pid);
    assert!(rss1 < rss0 + 64 * 1024, "RSS {rss0} KiB before, {rss1} KiB after the attack");
}

#[test]
fn hostile_devices_get_their_outcome_and_well_behaved_ones_do_not_notice() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let extra = Extra {
        tls: "handshake_timeout_ms = 1500",
        ws: "upgrade_timeout_ms = 1500\nwrite_stall_timeout_secs = 2\nidle_timeout_secs = 0",
        ..Default::default()
    };
    let p = start_proxy_extra(&pki, &[wsm.addr], 2, &extra, &[("HOLDFAST_LOG", "warn")]);
    let pid = p.child.id();
    let o = opts(&pki, &p, "oven-1");

    let talkers = Talkers::start(&o, 16);
    std::thread::sleep(Duration::from_millis(500));
    let fds0 = proc_fds(pid);
    let rss0 = rss_kib(pid);
    let t0 = Instant::now();

    // 1. A flood of connections that send nothing: closed at the handshake timeout.
    let silent: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(p.addr).unwrap()).collect();
    // 2. Slow handshakes: a ClientHello a byte at a time, too slowly.
    let slow_hs = std::thread::spawn({
        let addr = p.addr;
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let hello = [0x16u8, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
            for b in hello {
                if s.write_all(&[b]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            let mut buf = [0u8; 16];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            matches!(s.read(&mut buf), Ok(0) | Err(_))
        }
    });
    // 3. Slow upgrade headers after a good handshake: 408 at the upgrade timeout.
    let slow_hdr = std::thread::spawn({
        let o = o.clone();
        move || {
            let mut s = holdfast::device::tls_stream(&o).unwrap();
            s.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let req = b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n";
            for b in req.iter().take(20) {
                let _ = s.write_all(&[*b]);
                let _ = s.flush();
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408")
        }
    });
    // 4. A ping flood whose pongs are never read, 5. a device that never reads
    //    its echoes: closed once they stall (write_stall_timeout_secs).
    let mut pinger = Device::connect(&o).unwrap();
    let mut deaf = Device::connect(&o).unwrap();
    let floods = std::thread::spawn(move || {
        let big = vec![b'x'; 60_000];
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut ping_ok, mut deaf_ok) = (true, true);
        while (ping_ok || deaf_ok) && Instant::now() < deadline {
            if ping_ok {
                ping_ok = pinger.send_frame(op::PING, &[7; 125]).is_ok();
            }
            if deaf_ok {
                deaf_ok = deaf.send_binary(&big).is_ok();
            }
        }
        (!ping_ok, !deaf_ok)
    });
    // 6. A partial record, 7. half a message, left hanging; 8. resets at every stage.
    let mut partial = Device::connect(&o).unwrap();
    let _ = partial.send_partial_record(b"\x81\x85abcd", 4);
    let mut half = Device::connect(&o).unwrap();
    let f = half.masked_frame(op::TEXT, b"first half");
    let mut f0 = f.clone();
    f0[0] &= 0x7f; // FIN cleared: the message never ends
    half.send_raw(&f0).unwrap();
    for stage in 0..3 {
        for _ in 0..20 {
            match stage {
                0 => reset(TcpStream::connect(p.addr).unwrap()),
                1 => {
                    let mut s = TcpStream::connect(p.addr).unwrap();
                    let _ = s.write_all(&[0x16, 3, 1, 0, 200, 1, 0, 0]);
                    reset(s);
                }
                _ => {
                    let mut d = holdfast::device::tls_stream(&o).unwrap();
                    let _ = d.write_all(b"GET / HTTP/1.1\r\nHost");
                    let _ = d.flush();
                    reset(d.sock);
                }
            }
        }
    }
    let d = Device::connect(&o).unwrap();
    drop(d); // an established one, dropped without a close

    // The outcomes.
    assert!(slow_hs.join().unwrap(), "a slow handshake is closed at the handshake timeout");
    assert!(slow_hdr.join().unwrap(), "slow upgrade headers get 408 at the upgrade timeout");
    let (ping_cut, deaf_cut) = floods.join().unwrap();
    assert!(ping_cut, "a ping flood that never reads its pongs is closed");
    assert!(deaf_cut, "a device that never reads is closed");
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "a silent connection is closed");
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    drop(partial);
    drop(half);

    talkers.finish();
    left_nothing(&p, fds0, rss0);
    assert!(metric(&p, "holdfast_handshake_refused_total", "") >= 400, "the silent ones were counted as refused (timeout)");
}

/// The upgrade response to `req`, sent raw after a good handshake.
fn upgrade_status(o: &holdfast::device::DeviceOptions, req: &[u8]) -> String {
    let mut s = holdfast::device::tls_stream(o).unwrap();
    s.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(req);
    let _ = s.flush();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).lines().next().unwrap_or("").to_string()
}

/// Builds one abusive frame for a device.
type MakeFrame = Box<dyn Fn(&mut Device) -> Vec<u8> + Send>;

/// An unmasked frame (devices must mask: RFC 6455 5.1).
fn unmasked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

#[test]
fn header_frame_and_key_update_abuse_in_volume_is_refused_counted_and_harmless() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let extra = Extra { ws: "write_stall_timeout_secs = 2\nidle_timeout_secs = 0", ..Default::default() };
    let p = start_proxy_extra(&pki, &[wsm.addr], 2, &extra, &[("HOLDFAST_LOG", "warn")]);
    let pid = p.child.id();
    let o = opts(&pki, &p, "oven-1");
    let talkers = Talkers::start(&o, 8);
    std::thread::sleep(Duration::from_millis(300));
    let fds0 = proc_fds(pid);
    let rss0 = rss_kib(pid);
    let rejected0 = metric(&p, "holdfast_ws_upgrades_rejected_total", "");

    // Header abuse, 10 of each, four at a time: a huge header, thousands of
    // headers, a request that is not HTTP, the wrong WebSocket version.
    let huge = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n", "a".repeat(64 * 1024));
    let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{}\r\n", "X-A: b\r\n".repeat(2000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a 64 KiB header", huge.into_bytes(), "HTTP/1.1 431"),
        ("2000 headers", many.into_bytes(), "HTTP/1.1 431"),
        ("not HTTP", b"\x00\x01\x02 GET\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            "version 8",
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".to_vec(),
            "HTTP/1.1 426",
        ),
    ];
    let headers: Vec<_> = cases
        .into_iter()
        .map(|(what, req, want)| {
            let o = o.clone();
            std::thread::spawn(move || {
                for k in 0..10 {
                    let got = upgrade_status(&o, &req);
                    assert!(got.starts_with(want), "{what} #{k}: {got:?}, wanted {want}");
                }
            })
        })
        .collect();

    // Frame abuse: each bad frame gets its close code (RFC 6455 7.4.1).
    let frames: Vec<(&str, MakeFrame, u16)> = vec![
        ("unmasked", Box::new(|_| unmasked(op::TEXT, b"hi")), 1002),
        (
            "reserved bit",
            Box::new(|d| {
                let mut f = d.masked_frame(op::TEXT, b"hi");
                f[0] |= 0x40;
                f
            }),
            1002,
        ),
        ("opcode 3", Box::new(|d| d.masked_frame(3, b"hi")), 1002),
        ("a 126-byte ping", Box::new(|d| d.masked_frame(op::PING, &[0; 126])), 1002),
        (
            "a fragmented ping",
            Box::new(|d| {
                let mut f = d.masked_frame(op::PING, b"p");
                f[0] &= 0x7f;
                f
            }),
            1002,
        ),
        ("a continuation first", Box::new(|d| d.masked_frame(op::CONT, b"x")), 1002),
        ("close code 999", Box::new(|d| d.masked_frame(op::CLOSE, &999u16.to_be_bytes())), 1002),
        ("invalid UTF-8", Box::new(|d| d.masked_frame(op::TEXT, &[0xce, 0xba, 0xff])), 1007),
        // Its header says 2 MiB: refused there, so only a first KiB is sent
        // (writing the rest to a closed connection would race the close).
        (
            "a 2 MiB message",
            Box::new(|d| {
                let mut f = d.masked_frame(op::BINARY, &vec![1; 2 << 20]);
                f.truncate(1024);
                f
            }),
            1009,
        ),
    ];
    let before_1002 = metric(&p, "holdfast_ws_error_closes_total", "code=\"1002\"");
    for (what, make, code) in &frames {
        for k in 0..5 {
            let mut d = Device::connect(&o).unwrap();
            let f = make(&mut d);
            d.send_raw(&f).unwrap();
            let got = loop {
                match d.recv() {
                    Ok(holdfast::ws::frame::Event::Close { code, .. }) => break code,
                    Ok(_) => continue,
                    Err(e) => panic!("{what} #{k}: no close frame: {e}"),
                }
            };
            assert_eq!(got, Some(*code), "{what} #{k}");
        }
    }
    assert!(metric(&p, "holdfast_ws_error_closes_total", "code=\"1002\"") >= before_1002 + 35, "every 1002 counted");

    // A KeyUpdate flood, never reading the answers: every request counted,
    // one answer for all those that came while the flooder kept talking
    // (RFC 8446 4.6.3; the answer waits for the device to be quiet
    // 200 ms, tls::record::KEY_UPDATE_QUIET), and no harm to anyone else.
    let ku0 = metric(&p, "holdfast_key_updates_received_total", "");
    let sent0 = metric(&p, "holdfast_key_updates_sent_total", "");
    let mut flooder = Device::connect(&o).unwrap();
    for k in 0..20_000 {
        if let Err(e) = flooder.key_update() {
            panic!("KeyUpdate {k}: {e}");
        }
    }
    // holdfast reads what it can answer (it stops reading a device whose
    // answers it cannot write); the rest dies with the connection.
    std::thread::sleep(Duration::from_millis(500));
    drop(flooder);
    eventually(10, "the flooder's end to be counted", || metric(&p, "holdfast_key_updates_received_total", "") > ku0);
    let received = metric(&p, "holdfast_key_updates_received_total", "") - ku0;
    let sent = metric(&p, "holdfast_key_updates_sent_total", "") - sent0;
    assert!(received >= 1000, "{received} KeyUpdates read");
    assert!(sent * 10 < received, "answers coalesce: {sent} sent for {received} requests read");
    for h in headers {
        h.join().unwrap();
    }
    assert!(metric(&p, "holdfast_ws_upgrades_rejected_total", "") >= rejected0 + 40, "every refused upgrade counted");

    talkers.finish();
    left_nothing(&p, fds0, rss0);
}
