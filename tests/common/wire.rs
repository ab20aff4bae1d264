//! A test host on an impaired wire: a network namespace of its own joined to
//! the test's by a pair of TUN devices, with a relay between them that
//! delays, drops at random, or drops everything (a black hole: the link
//! stays up, TCP on both sides hears nothing) what crosses, at the IP layer,
//! so both sides run the kernel's real TCP.
//!
//! This is `tc netem`'s job; this machine's kernel has no netem
//! (`CONFIG_NET_SCH_NETEM` is not set: "Specified qdisc kind is unknown"),
//! so the tests carry their own. Needs root (`ip netns`, `/dev/net/tun`).
#![allow(dead_code, clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the wire does to each packet, both ways.
#[derive(Debug, Clone, Copy, Default)]
pub struct Impair {
    /// Added to every packet, one way.
    pub delay: Duration,
    /// Chance (0..1) that a packet is dropped.
    pub loss: f64,
    /// Drop everything.
    pub black_hole: bool,
    /// Only what the test host sends is impaired; what it is sent passes.
    pub from_host_only: bool,
}

pub struct Wire {
    /// The namespace's name, for `ip netns exec`.
    pub ns: String,
    /// The address of the test host (inside the namespace).
    pub host_ip: String,
    impair: Arc<Mutex<Impair>>,
    /// Packets dropped so far (loss and black hole).
    pub dropped: Arc<AtomicUsize>,
    /// Packets carried so far.
    pub carried: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    relays: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Opens a TUN device named `name` (IFF_TUN | IFF_NO_PI), non-blocking.
fn tun(name: &str) -> File {
    const TUNSETIFF: nix::libc::c_ulong = 0x4004_54ca;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        _pad: [u8; 22],
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut req = IfReq { name: [0; 16], flags: 0x0001 | 0x1000, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, nothing else.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    // SAFETY: fcntl on a descriptor we own.
    unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_SETFL, nix::libc::O_NONBLOCK) };
    f
}

/// A small xorshift: the tests' loss is random but needs no crate.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Carries packets from `from` to `to` as `impair` says, until `stop`.
/// `to_host`: this relay carries what the test sends to the test host.
fn relay(
    mut from: File,
    mut to: File,
    to_host: bool,
    impair: Arc<Mutex<Impair>>,
    stop: Arc<AtomicBool>,
    stats: (Arc<AtomicUsize>, Arc<AtomicUsize>),
    seed: u64,
) {
    let mut rng = Rng(seed | 1);
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let wait = queue.front().map_or(10, |(due, _)| due.saturating_duration_since(Instant::now()).as_millis().min(10) as i32);
        let mut pfd = nix::libc::pollfd { fd: from.as_raw_fd(), events: nix::libc::POLLIN, revents: 0 };
        // SAFETY: poll on one descriptor we own, with a struct we own.
        unsafe { nix::libc::poll(&mut pfd, 1, wait) };
        loop {
            match from.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let mut im = *impair.lock().unwrap();
                    if im.from_host_only && to_host {
                        im = Impair::default();
                    }
                    if im.black_hole || (im.loss > 0.0 && rng.unit() < im.loss) {
                        stats.0.fetch_add(1, Ordering::Relaxed);
                    } else {
                        queue.push_back((Instant::now() + im.delay, buf[..n].to_vec()));
                    }
                }
                _ => break,
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, p) = queue.pop_front().unwrap();
            // A full queue on the far side drops the packet, as a wire would.
            let _ = to.write(&p);
            stats.1.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Wire {
    /// A fresh namespace with a point-to-point link from the test's: the
    /// test's side is `10.A.B.(4k+1)`, the host's `10.A.B.(4k+2)`.
    pub fn new() -> Wire {
        static K: AtomicUsize = AtomicUsize::new(0);
        let k = K.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() as usize;
        let tag = format!("{}x{k}", pid % 1_000_000);
        let ns = format!("hfw{tag}");
        let (outer, inner) = (format!("hfo{tag}"), format!("hfi{tag}"));
        assert!(outer.len() < 16, "interface name {outer}");
        let (a, b) = (100 + pid % 150, (pid / 150) % 256);
        let (mine, host) = (format!("10.{a}.{b}.{}", 4 * (k % 60) + 1), format!("10.{a}.{b}.{}", 4 * (k % 60) + 2));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let (t_out, t_in) = (tun(&outer), tun(&inner));
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["addr", "add", &mine, "peer", &host, "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&["netns", "exec", &ns, "ip", "addr", "add", &host, "peer", &mine, "dev", &inner]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        let impair = Arc::new(Mutex::new(Impair::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (dropped, carried) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o2, i2) = (t_out.try_clone().unwrap(), t_in.try_clone().unwrap());
        let mut relays = Vec::new();
        for (n, (from, to)) in [(t_out, i2), (t_in, o2)].into_iter().enumerate() {
            let (im, st, stats) = (impair.clone(), stop.clone(), (dropped.clone(), carried.clone()));
            let seed = (pid as u64) << 8 | (k as u64) << 1 | n as u64;
            relays.push(std::thread::spawn(move || relay(from, to, n == 0, im, st, stats, seed)));
        }
        Wire { ns, host_ip: host, impair, dropped, carried, stop, relays }
    }

    pub fn set(&self, im: Impair) {
        *self.impair.lock().unwrap() = im;
    }

    /// `program args` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for r in self.relays.drain(..) {
            let _ = r.join();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
