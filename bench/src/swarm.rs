//! One swarm process: many devices on one monoio thread.
//!
//! Modes: `idle` (connect, one echo each, hold), `handshake` (full or resumed
//! handshakes in a loop), `message` (messages at a fixed rate, or closed loop
//! when the rate is 0), `storm` (connect, then all drop and reconnect at
//! once). The orchestrator talks to it over stdin/stdout: the swarm prints
//! `READY` when its devices are connected, waits for a line on stdin to start
//! the measured phase (or to end, for `idle`), and prints one JSON report.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use holdfast::ws::frame::op;

use crate::report::{Hist, SwarmReport};
use holdfast::device_async::{ErrorKind, WsClient};

#[derive(Debug, Clone, clap::Args)]
pub struct SwarmArgs {
    /// Address of the proxy under test.
    #[arg(long)]
    pub target: SocketAddr,
    /// CA that signed the proxy's server certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Device certificate (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Device private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// A directory of distinct device certificates (NNNNN.pem with
    /// NNNNN.key, as `holdfast quickstart --fleet` writes): device `i`
    /// presents the `i mod n`th, instead of every device `--cert`.
    #[arg(long)]
    pub fleet: Option<PathBuf>,
    /// idle | handshake | message | storm | drain | upgrade | soak
    #[arg(long)]
    pub mode: String,
    /// Devices (idle, message, storm) or concurrent handshakers (handshake).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Source addresses, comma separated (default: the kernel's choice).
    #[arg(long, value_delimiter = ',')]
    pub src: Vec<IpAddr>,
    /// New connections per second while connecting (0 = all at once).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// "1.3" or "1.2".
    #[arg(long, default_value = "1.3")]
    pub tls: String,
    /// Resume TLS sessions (tickets) on reconnects.
    #[arg(long)]
    pub resume: bool,
    /// Bytes of each device message.
    #[arg(long, default_value_t = 64)]
    pub msg_size: usize,
    /// Messages per second per device (message mode; 0 = closed loop).
    #[arg(long, default_value_t = 1.0)]
    pub msg_rate: f64,
    /// Seconds of the measured phase (handshake, message).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Soak: the longest a churning device (every odd one) stays before it
    /// leaves and comes back (0: nobody churns).
    #[arg(long, default_value_t = 0.0)]
    pub churn_secs: f64,
    /// Soak: seconds between the `SAMPLE` lines.
    #[arg(long, default_value_t = 10.0)]
    pub sample_secs: f64,
}

/// The client configs devices use, one per certificate they present.
pub type Fleet = Rc<Vec<Arc<rustls::ClientConfig>>>;

/// One client config per device certificate (`--fleet`), or the one of `--cert`.
pub fn client_configs(a: &SwarmArgs) -> Result<Fleet, String> {
    let Some(dir) = &a.fleet else { return Ok(Rc::new(vec![client_config(a, &a.cert, &a.key)?])) };
    let mut certs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    certs.sort();
    if certs.is_empty() {
        return Err(format!("{}: no device certificates", dir.display()));
    }
    let cfgs = certs.iter().map(|c| client_config(a, c, &c.with_extension("key"))).collect::<Result<Vec<_>, _>>()?;
    Ok(Rc::new(cfgs))
}

pub fn client_config(a: &SwarmArgs, cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let o = holdfast::device::DeviceOptions {
        addr: a.target,
        server_name: "localhost".into(),
        server_ca: a.ca.clone(),
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        path: "/".into(),
        subprotocols: Vec::new(),
        version: Some(if a.tls == "1.2" { "1.2".into() } else { "1.3".into() }),
        suite: None,
        timeout: Duration::from_secs(10),
    };
    let mut cfg = holdfast::device::client_config(&o).map_err(|e| e.to_string())?;
    cfg.resumption = if a.resume { rustls::client::Resumption::in_memory_sessions(4096) } else { rustls::client::Resumption::disabled() };
    Ok(Arc::new(cfg))
}

struct Stats {
    errors: BTreeMap<ErrorKind, u64>,
    first_error: Option<String>,
    connect: Histogram<u64>,
    rtt: Histogram<u64>,
    handshakes: u64,
    resumed: u64,
    messages: u64,
    /// Per device, its longest round trip (upgrade scenario: the pause).
    pause: Histogram<u64>,
    /// Per device that had a round trip overlapping the event window (the
    /// upgrade or failover, as the runner reports it), its longest such one.
    pause_window: Histogram<u64>,
    mismatched_bytes: u64,
    retries: u64,
    close_ms: Vec<u64>,
    close_codes: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            errors: BTreeMap::new(),
            first_error: None,
            connect: Histogram::new(3).expect("histogram"),
            rtt: Histogram::new(3).expect("histogram"),
            pause: Histogram::new(3).expect("histogram"),
            pause_window: Histogram::new(3).expect("histogram"),
            mismatched_bytes: 0,
            retries: 0,
            close_ms: Vec::new(),
            close_codes: BTreeMap::new(),
            handshakes: 0,
            resumed: 0,
            messages: 0,
        }
    }
    fn error(&mut self, kind: ErrorKind, msg: String) {
        *self.errors.entry(kind).or_default() += 1;
        self.first_error.get_or_insert(msg);
    }
}

type Shared = Rc<RefCell<Stats>>;

/// Blocks (on a helper thread) until a line arrives on stdin.
pub fn stdin_line() -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        while std::io::stdin().read_line(&mut l).unwrap_or(0) > 0 {
            let _ = tx.send(l.trim().to_string());
            l.clear();
        }
        let _ = tx.send(String::new());
    });
    rx
}

pub async fn wait_line(rx: &std::sync::mpsc::Receiver<String>) -> String {
    loop {
        if let Ok(l) = rx.try_recv() {
            return l;
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect_one(cfgs: Fleet, a: &SwarmArgs, i: usize, stats: &Shared) -> Option<WsClient> {
    let src = (!a.src.is_empty()).then(|| a.src[i % a.src.len()]);
    let cfg = cfgs[i % cfgs.len()].clone();
    let t0 = Instant::now();
    match WsClient::connect(cfg, src, a.target, "/bench").await {
        Ok(c) => {
            let mut s = stats.borrow_mut();
            let _ = s.connect.record(t0.elapsed().as_micros() as u64);
            s.handshakes += 1;
            s.resumed += c.resumed() as u64;
            Some(c)
        }
        Err(f) => {
            stats.borrow_mut().error(f.0, f.1);
            None
        }
    }
}

/// Connects device `i`, trying again until `deadline` as a device would:
/// after the proxy's `Retry-After` if it gave one, else after 0.5 to 1.5 s.
async fn connect_retrying(cfgs: Fleet, a: &SwarmArgs, i: usize, stats: &Shared, deadline: Instant) -> Option<WsClient> {
    let src = (!a.src.is_empty()).then(|| a.src[i % a.src.len()]);
    let cfg = cfgs[i % cfgs.len()].clone();
    let t0 = Instant::now();
    loop {
        match WsClient::connect(cfg.clone(), src, a.target, "/bench").await {
            Ok(c) => {
                let mut s = stats.borrow_mut();
                let _ = s.connect.record(t0.elapsed().as_micros() as u64);
                s.handshakes += 1;
                s.resumed += c.resumed() as u64;
                return Some(c);
            }
            Err(f) => {
                if Instant::now() >= deadline {
                    stats.borrow_mut().error(f.0, f.1);
                    return None;
                }
                stats.borrow_mut().retries += 1;
                let after = f.1.split("Retry-After:").nth(1).and_then(|s| s.trim().parse::<f64>().ok());
                let wait = after.unwrap_or_else(|| 0.5 + monoio::utils::thread_rng_n(1000) as f64 / 1000.0);
                monoio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
        }
    }
}

/// Waits for the proxy to close the device (drain): when, and with which code.
async fn wait_closed(mut c: WsClient, stats: Shared) {
    loop {
        match c.recv().await {
            Ok(_) => continue,
            Err(_) => {
                let code = match c.closed_with {
                    Some(Some(code)) => code.to_string(),
                    _ => "none".into(),
                };
                let mut s = stats.borrow_mut();
                s.close_ms.push(wall_us() / 1000);
                *s.close_codes.entry(code).or_insert(0) += 1;
                return;
            }
        }
    }
}

/// Connects `a.conns` devices at `a.rate` per second (or all at once).
async fn connect_all(cfg: &Fleet, a: &Rc<SwarmArgs>, stats: &Shared) -> Vec<WsClient> {
    let out: Rc<RefCell<Vec<WsClient>>> = Rc::new(RefCell::new(Vec::with_capacity(a.conns)));
    let mut handles = Vec::with_capacity(a.conns);
    let start = Instant::now();
    for i in 0..a.conns {
        if a.rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / a.rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                monoio::time::sleep(d).await;
            }
        }
        let (cfg, a, stats, out) = (cfg.clone(), a.clone(), stats.clone(), out.clone());
        handles.push(monoio::spawn(async move {
            if let Some(mut c) = connect_one(cfg, &a, i, &stats).await {
                // One echo proves the path works end to end.
                let ok = c.send(op::TEXT, b"hello").await.is_ok() && c.recv().await.is_ok();
                if ok {
                    out.borrow_mut().push(c);
                } else {
                    stats.borrow_mut().error(ErrorKind::Protocol, "first echo failed".into());
                }
            }
        }));
    }
    for h in handles {
        h.await;
    }
    Rc::try_unwrap(out).map(|c| c.into_inner()).unwrap_or_default()
}

fn payload(size: usize, t: Instant, base: Instant) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(8)];
    p[..8].copy_from_slice(&(t.duration_since(base).as_nanos() as u64).to_be_bytes());
    p
}

/// The event window the runner reports (`WINDOW <start> <end>`, wall-clock
/// microseconds since the Unix epoch), once it is known.
type Window = Rc<std::cell::Cell<Option<(u64, u64)>>>;

/// Wall-clock microseconds since the Unix epoch (the runner and the swarm
/// agree on event windows in these).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Parses `WINDOW <start_us> <end_us>`.
pub fn parse_window(line: &str) -> Option<(u64, u64)> {
    let mut w = line.strip_prefix("WINDOW ")?.split_whitespace().map(|x| x.parse::<u64>().ok());
    let (start, end) = (w.next()??, w.next()??);
    (start <= end).then_some((start, end))
}

/// The longest of a device's round trips (wall-clock start, length) that
/// overlap `[start, end]`; `None` if none does.
pub fn longest_overlapping(trips: &[(u64, u64)], (start, end): (u64, u64)) -> Option<u64> {
    trips.iter().filter(|(t, rtt)| *t <= end && t + rtt >= start).map(|(_, rtt)| *rtt).max()
}

async fn message_device(
    mut c: WsClient,
    a: Rc<SwarmArgs>,
    stats: Shared,
    base: Instant,
    end: Instant,
    phase: f64,
    window: Window,
) -> Option<WsClient> {
    let mut inflight: VecDeque<Instant> = VecDeque::new();
    if a.msg_rate <= 0.0 {
        // Closed loop: next message when the echo is back.
        while Instant::now() < end {
            let t = Instant::now();
            if let Err(f) = c.send(op::BINARY, &payload(a.msg_size, t, base)).await {
                stats.borrow_mut().error(f.0, f.1);
                return None;
            }
            if let Err(f) = c.recv().await {
                stats.borrow_mut().error(f.0, f.1);
                return None;
            }
            let mut s = stats.borrow_mut();
            let _ = s.rtt.record(t.elapsed().as_micros() as u64);
            s.messages += 1;
        }
        return Some(c);
    }
    let period = Duration::from_secs_f64(1.0 / a.msg_rate);
    let mut next = Instant::now() + period.mul_f64(phase);
    // The longest round trip this device saw: its pause during an upgrade.
    let mut longest = 0u64;
    // Every round trip (wall-clock start, length), to find the longest that
    // overlaps the event once the runner says when it was.
    let mut trips: Vec<(u64, u64)> = Vec::new();
    let (wall0, inst0) = (wall_us(), Instant::now());
    while next < end {
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            monoio::time::sleep(d).await;
        }
        inflight.push_back(next);
        let sent_payload = payload(a.msg_size, next, base);
        if let Err(f) = c.send(op::BINARY, &sent_payload).await {
            stats.borrow_mut().error(f.0, f.1);
            return None;
        }
        // Echoes come back in order; latency is measured from the scheduled
        // send time, so a slow proxy cannot hide queueing (no coordinated omission).
        match c.recv().await {
            Ok(echo) if echo == sent_payload => {
                let sent = inflight.pop_front().unwrap_or(next);
                let rtt = sent.elapsed().as_micros() as u64;
                longest = longest.max(rtt);
                let sent_wall =
                    if sent >= inst0 { wall0 + (sent - inst0).as_micros() as u64 } else { wall0 - (inst0 - sent).as_micros() as u64 };
                trips.push((sent_wall, rtt));
                let mut s = stats.borrow_mut();
                let _ = s.rtt.record(rtt);
                s.messages += 1;
            }
            Ok(_) => {
                // Lost, duplicated or reordered: the echo is not what was sent.
                let mut s = stats.borrow_mut();
                s.mismatched_bytes += sent_payload.len() as u64;
                s.error(ErrorKind::Protocol, "echo differs from the message sent".into());
                return None;
            }
            Err(f) => {
                stats.borrow_mut().error(f.0, f.1);
                return None;
            }
        }
        next += period;
    }
    let mut s = stats.borrow_mut();
    let _ = s.pause.record(longest);
    if let Some(w) = window.get().and_then(|w| longest_overlapping(&trips, w)) {
        let _ = s.pause_window.record(w);
    }
    drop(s);
    Some(c)
}

fn rusage() -> (f64, f64, u64) {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime), secs(u.ru_stime), u.ru_maxrss as u64)
}

pub fn run(a: SwarmArgs) -> Result<(), String> {
    let cfg = client_configs(&a)?;
    let mut rt =
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(8192).enable_timer().build().map_err(|e| e.to_string())?;
    let report = rt.block_on(async move {
        let a = Rc::new(a);
        let stats: Shared = Rc::new(RefCell::new(Stats::new()));
        let stdin = stdin_line();
        let t0 = Instant::now();
        let mut elapsed = 0.0;
        match a.mode.as_str() {
            "idle" => {
                // Two halves, so the runner can measure the marginal cost of
                // a connection as well as the average.
                let half = Rc::new(SwarmArgs { conns: a.conns / 2, ..(*a).clone() });
                let mut held = connect_all(&cfg, &half, &stats).await;
                println!("HALF {}", held.len());
                wait_line(&stdin).await;
                let rest = Rc::new(SwarmArgs { conns: a.conns - a.conns / 2, ..(*a).clone() });
                held.extend(connect_all(&cfg, &rest, &stats).await);
                elapsed = t0.elapsed().as_secs_f64();
                println!("READY {}", held.len());
                wait_line(&stdin).await;
                drop(held);
            }
            "storm" => {
                let held = connect_all(&cfg, &a, &stats).await;
                println!("READY {}", held.len());
                wait_line(&stdin).await;
                // Everyone drops at once, then everyone comes back at once.
                drop(held);
                *stats.borrow_mut() = Stats::new();
                let t = Instant::now();
                // Each device tries again until it is back (obeying Retry-After).
                let deadline = t + Duration::from_secs_f64(a.duration.max(60.0));
                let back: Rc<RefCell<Vec<WsClient>>> = Rc::default();
                let mut hs = Vec::new();
                for i in 0..a.conns {
                    let (cfg, a, stats, back) = (cfg.clone(), a.clone(), stats.clone(), back.clone());
                    hs.push(monoio::spawn(async move {
                        if let Some(mut c) = connect_retrying(cfg, &a, i, &stats, deadline).await {
                            if c.send(op::TEXT, b"hello").await.is_ok() && c.recv().await.is_ok() {
                                back.borrow_mut().push(c);
                            } else {
                                stats.borrow_mut().error(ErrorKind::Protocol, "first echo failed".into());
                            }
                        }
                    }));
                }
                for h in hs {
                    h.await;
                }
                elapsed = t.elapsed().as_secs_f64();
                println!("BACK {}", back.borrow().len());
                wait_line(&stdin).await;
            }
            "drain" => {
                let held = connect_all(&cfg, &a, &stats).await;
                println!("READY {}", held.len());
                wait_line(&stdin).await;
                // The proxy drains: every device waits for its close.
                let t = Instant::now();
                let hs: Vec<_> = held.into_iter().map(|c| monoio::spawn(wait_closed(c, stats.clone()))).collect();
                for h in hs {
                    h.await;
                }
                elapsed = t.elapsed().as_secs_f64();
                println!("BACK 0");
                wait_line(&stdin).await;
            }
            "handshake" => {
                println!("READY 0");
                wait_line(&stdin).await;
                let t = Instant::now();
                let end = t + Duration::from_secs_f64(a.duration);
                let mut hs = Vec::new();
                for i in 0..a.conns {
                    let (cfg, a, stats) = (cfg.clone(), a.clone(), stats.clone());
                    hs.push(monoio::spawn(async move {
                        let mut k = i;
                        while Instant::now() < end {
                            if let Some(c) = connect_one(cfg.clone(), &a, k, &stats).await {
                                c.close().await;
                            }
                            k += a.conns;
                        }
                    }));
                }
                for h in hs {
                    h.await;
                }
                elapsed = t.elapsed().as_secs_f64();
            }
            "message" | "upgrade" => {
                let held = connect_all(&cfg, &a, &stats).await;
                println!("READY {}", held.len());
                wait_line(&stdin).await;
                stats.borrow_mut().rtt.reset();
                let base = Instant::now();
                let end = base + Duration::from_secs_f64(a.duration);
                let n = held.len().max(1);
                // The runner may report an event window while devices talk.
                let window: Window = Rc::default();
                let w = window.clone();
                monoio::spawn(async move {
                    loop {
                        let l = wait_line(&stdin).await;
                        if l.is_empty() {
                            break;
                        }
                        if let Some(x) = parse_window(&l) {
                            w.set(Some(x));
                        }
                    }
                });
                let mut hs = Vec::new();
                for (i, c) in held.into_iter().enumerate() {
                    hs.push(monoio::spawn(message_device(c, a.clone(), stats.clone(), base, end, i as f64 / n as f64, window.clone())));
                }
                for h in hs {
                    let _ = h.await;
                }
                elapsed = base.elapsed().as_secs_f64();
            }
            other => stats.borrow_mut().error(ErrorKind::Protocol, format!("unknown mode {other}")),
        }
        let (user, sys, rss) = rusage();
        let s = stats.borrow();
        SwarmReport {
            mode: a.mode.clone(),
            devices: a.conns as u64,
            handshakes: s.handshakes,
            resumed: s.resumed,
            messages: s.messages,
            errors: s.errors.clone(),
            first_error: s.first_error.clone(),
            elapsed_secs: elapsed,
            connect_us: Hist::from(&s.connect),
            rtt_us: Hist::from(&s.rtt),
            pause_us: Hist::from(&s.pause),
            pause_window_us: Hist::from(&s.pause_window),
            mismatched_bytes: s.mismatched_bytes,
            cpu_user_secs: user,
            cpu_sys_secs: sys,
            max_rss_kib: rss,
            retries: s.retries,
            close_ms: s.close_ms.clone(),
            close_codes: s.close_codes.clone(),
        }
    });
    println!("REPORT {}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_lines_parse() {
        assert_eq!(parse_window("WINDOW 100 250"), Some((100, 250)));
        assert_eq!(parse_window("WINDOW 250 100"), None, "end before start");
        assert_eq!(parse_window("WINDOW 100"), None);
        assert_eq!(parse_window("go"), None);
    }

    #[test]
    fn the_longest_round_trip_overlapping_the_window_counts() {
        // (start, length): one before, one spanning the start, one inside,
        // one after the window [1000, 2000].
        let trips = [(0, 500), (900, 150), (1500, 40), (2100, 900)];
        assert_eq!(longest_overlapping(&trips, (1000, 2000)), Some(150));
        assert_eq!(longest_overlapping(&trips, (600, 800)), None, "nothing in flight then");
        assert_eq!(longest_overlapping(&trips, (2000, 2100)), Some(900), "a trip starting at the window's end counts");
    }
}
