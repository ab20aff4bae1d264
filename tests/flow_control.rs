//! Credits bound what holdfast buffers: a WSM flooding a device that does not
//! read cannot grow holdfast's memory, and nothing is lost or reordered.
//! Also shows the WSM library used by a custom app (a Rust WSM team's view).

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
