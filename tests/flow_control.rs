//! Credits bound what holdfast buffers: a WSM flooding a device that does not
//! read cannot grow holdfast's memory, and nothing is lost or reordered.
//! Also shows the WSM library used by a custom app (a Rust WSM team's view).
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use holdfast::device::Device;
use holdfast::wsm::{App, Decision, Replies, Server, StreamInfo};

const MSG: usize = 64 * 1024;
const COUNT: u32 = 400; // 25.6 MB towards one device

struct Flood {
    sent: AtomicU64,
}

impl App for Flood {
    fn open(&self, _: &StreamInfo) -> Decision {
        Decision::Accept { subprotocol: None }
    }
    fn message(&self, _: &StreamInfo, _binary: bool, _data: &[u8], out: &mut Replies) {
        for i in 0..COUNT {
            let mut m = vec![(i % 251) as u8; MSG];
            m[..4].copy_from_slice(&i.to_be_bytes());
            out.binary(m);
        }
        self.sent.fetch_add(COUNT as u64, Ordering::Relaxed);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

#[test]
fn slow_device_cannot_make_holdfast_buffer_what_the_wsm_sends() {
    let pki = Pki::new();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Flood { sent: AtomicU64::new(0) }), "flood".into()).unwrap();
    let wsm: SocketAddr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    let proxy = start_proxy(&pki, &[wsm], 1, "", "max_message_bytes = 65536");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let before = rss_kib(proxy.child.id());
    d.send_text("flood me").unwrap();
    // The device reads nothing for a while; holdfast may hold at most one
    // stream window (256 KiB) plus a message, whatever the kernel buffers.
    std::thread::sleep(Duration::from_secs(2));
    let during = rss_kib(proxy.child.id());
    assert!(during.saturating_sub(before) < 8 * 1024, "holdfast grew {} KiB while the device did not read", during - before);
    // Now the device reads: every message arrives, whole and in order.
    for i in 0..COUNT {
        let (text, m) = d.recv_message().unwrap();
        assert!(!text);
        assert_eq!(m.len(), MSG);
        assert_eq!(u32::from_be_bytes([m[0], m[1], m[2], m[3]]), i, "order");
        assert!(m[4..].iter().all(|&b| b == (i % 251) as u8));
    }
    assert_eq!(metric(&proxy, "holdfast_messages_to_devices_total", ""), COUNT as u64);
}

/// A WSM that floods a device on request ("flood") and echoes everything else.
struct FloodOnRequest {
    floods: AtomicU64,
}

const FLOOD_MSGS: usize = 16; // 16 x 64 KiB = 1 MiB per stalled device

impl App for FloodOnRequest {
    fn open(&self, _: &StreamInfo) -> Decision {
        Decision::Accept { subprotocol: None }
    }
    fn message(&self, _: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        if data == b"flood" {
            for _ in 0..FLOOD_MSGS {
                out.binary(vec![7u8; MSG]);
            }
            self.floods.fetch_add(1, Ordering::Relaxed);
        } else if binary {
            out.binary(data.to_vec());
        } else {
            out.text(String::from_utf8_lossy(data).into_owned());
        }
    }
}

/// A device whose socket has a tiny receive buffer and an Ethernet-sized
/// segment (on loopback the MSS is 64 KiB, and holdfast's send buffer would
/// grow with it to megabytes): once it stops reading, what holdfast sends
/// it backs up at once.
fn stalled_device(pki: &Pki, proxy: &Proc) -> Device {
    let o = opts(pki, proxy, "oven-1");
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_tcp_mss(1400).unwrap();
    s.connect(&o.addr.into()).unwrap();
    let config = Arc::new(holdfast::device::client_config(&o).unwrap());
    Device::connect_on(&o, config, s.into()).unwrap()
}

fn exchange(d: &mut Device, tag: &str, n: usize) {
    for i in 0..n {
        let m = format!("{tag}-{i}");
        d.send_text(&m).unwrap();
        assert_eq!(d.recv_text().unwrap(), m, "lost or reordered");
    }
}

/// Hundreds of devices that stop reading, and then disconnect, hold up no
/// other device on their shard: a stalled stream holds its own window, never
/// the link's, and the link's credit is whole again afterwards.
#[test]
fn devices_that_stop_reading_and_leave_hold_up_no_other_device() {
    const STALLED: usize = 200; // 200 x 256 KiB stream windows = 50 MiB > the 16 MiB link window
    let pki = Pki::new();
    let app = Arc::new(FloodOnRequest { floods: AtomicU64::new(0) });
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), app.clone(), "flood".into()).unwrap();
    let wsm: SocketAddr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    let proxy = start_proxy(&pki, &[wsm], 1, "", "max_message_bytes = 65536");
    let credit = |p: &Proc| metric(p, "holdfast_link_peer_credit_bytes", "");
    eventually(10, "the link up with its whole window", || credit(&proxy) == 16 << 20);

    let mut healthy: Vec<Device> = (0..10).map(|_| Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap()).collect();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut d = stalled_device(&pki, &proxy);
        d.send_text("flood").unwrap();
        stalled.push(d);
    }
    eventually(30, "every flood sent", || app.floods.load(Ordering::Relaxed) == STALLED as u64);
    // Give holdfast time to fill every stalled stream's window.
    std::thread::sleep(Duration::from_millis(500));

    // The other devices on the shard still talk, nothing lost or reordered.
    let threads: Vec<_> = healthy
        .drain(..)
        .enumerate()
        .map(|(i, mut d)| {
            std::thread::spawn(move || {
                exchange(&mut d, &format!("healthy-{i}"), 20);
                d
            })
        })
        .collect();
    let joined: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    if joined.iter().any(|j| j.is_err()) {
        let log = std::fs::read_to_string(&proxy.stderr_log).unwrap();
        let ends: Vec<&str> = log.lines().filter(|l| l.contains("ended") || l.contains("WARN") || l.contains("ERROR")).take(40).collect();
        panic!("a healthy device was held up; holdfast log:\n{}", ends.join("\n"));
    }
    let mut healthy: Vec<Device> = joined.into_iter().map(|j| j.unwrap()).collect();

    // The stalled devices leave; every byte of credit comes back.
    drop(stalled);
    eventually(20, "the stalled devices gone", || metric(&proxy, "holdfast_connections_active", "") == healthy.len() as u64);
    eventually(10, "the link's credit whole again", || credit(&proxy) == 16 << 20);
    for (i, d) in healthy.iter_mut().enumerate() {
        exchange(d, &format!("after-{i}"), 5);
    }
    let mut fresh = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    exchange(&mut fresh, "fresh", 5);
}

/// A device that reads nothing while holdfast has bytes for it is closed
/// after `write_stall_timeout_secs`, counted; others are untouched.
#[test]
fn a_device_that_stops_reading_is_closed_after_the_write_stall_time() {
    let pki = Pki::new();
    let app = Arc::new(FloodOnRequest { floods: AtomicU64::new(0) });
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), app.clone(), "flood".into()).unwrap();
    let wsm: SocketAddr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    let proxy = start_proxy(&pki, &[wsm], 1, "", "max_message_bytes = 65536\nwrite_stall_timeout_secs = 1");
    let mut healthy = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut stalled = stalled_device(&pki, &proxy);
    stalled.send_text("flood").unwrap();
    eventually(10, "the stalled device closed", || metric(&proxy, "holdfast_write_stall_closes_total", "") == 1);
    eventually(5, "only the healthy device left", || metric(&proxy, "holdfast_connections_active", "") == 1);
    exchange(&mut healthy, "still here", 5);
    eventually(10, "the link's credit whole again", || metric(&proxy, "holdfast_link_peer_credit_bytes", "") == 16 << 20);
}

/// An echo WSM, for the frame-limit test.
struct Echo;

impl App for Echo {
    fn open(&self, _: &StreamInfo) -> Decision {
        Decision::Accept { subprotocol: None }
    }
    fn message(&self, _: &StreamInfo, _binary: bool, data: &[u8], out: &mut Replies) {
        out.binary(data.to_vec());
    }
}

/// A device message larger than the WSM's announced frame limit closes only
/// that device, with 1009; the link (and every other device on it) stays.
#[test]
fn a_message_above_the_wsm_frame_limit_closes_only_its_device() {
    let pki = Pki::new();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Echo), "small-frames".into()).unwrap().with_max_frame(1 << 20);
    let wsm: SocketAddr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    let proxy = start_proxy(&pki, &[wsm], 1, "", "max_message_bytes = 4194304");
    let mut other = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    exchange(&mut other, "before", 3);
    let mut big = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    // Just fits: 1 MiB minus the 6-byte header.
    let fits = vec![1u8; (1 << 20) - 6];
    big.send_binary(&fits).unwrap();
    assert_eq!(big.recv_message().unwrap(), (false, fits));
    big.send_binary(&vec![2u8; 2 << 20]).unwrap();
    assert_eq!(big.recv_close().unwrap(), Some(1009));
    exchange(&mut other, "after", 3);
    assert_eq!(metric(&proxy, "holdfast_link_connects_total", ""), 1, "the link was never lost");
    assert_eq!(metric(&proxy, "holdfast_link_failures_total", ""), 0);
    assert_eq!(metric(&proxy, "holdfast_ws_error_closes_total", "code=\"1009\""), 1);
    assert_eq!(metric(&proxy, "holdfast_wsm_unavailable_total", ""), 0);
}

/// holdfast's largest message reaches a default WSM whole, both ways.
#[test]
fn the_largest_message_holdfast_allows_passes_a_default_wsm() {
    let pki = Pki::new();
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Echo), "echo".into()).unwrap();
    let wsm: SocketAddr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    let proxy = start_proxy(&pki, &[wsm], 1, "", "max_message_bytes = 16777216");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let m: Vec<u8> = (0..16_777_216u32).map(|i| (i % 253) as u8).collect();
    d.send_binary(&m).unwrap();
    let (text, back) = d.recv_message().unwrap();
    assert!(!text && back == m, "not echoed whole");
    assert_eq!(metric(&proxy, "holdfast_link_connects_total", ""), 1);
}
