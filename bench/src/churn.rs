//! The soak's devices (`hf-bench swarm --mode soak`): one monoio thread of
//! devices that connect, exchange messages, leave and come back, for hours.
//!
//! Half the devices (the even ones) stay connected the whole run; the others
//! each stay for a random time up to `--churn-secs`, close cleanly (close
//! frame and close_notify), wait up to two seconds and connect again. Every
//! device sends `--msg-rate` messages per second, each the next only once the
//! previous one's echo is back; latency is measured from the scheduled send
//! time. Every `--sample-secs` the process prints one `SAMPLE {json}` line of
//! what happened in that interval, and at the end one `REPORT {json}` of the
//! whole run. This module only drives devices and counts; what the runner
//! does to the node meanwhile (upgrades, WSM kills, reloads) is `soak`'s.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use holdfast::device_async::WsClient;
use holdfast::ws::frame::op;
use serde::{Deserialize, Serialize};

use crate::report::Hist;
use crate::swarm::{Fleet, SwarmArgs, wall_us};

/// One interval's counts (a `SAMPLE` line), or the whole run's (`REPORT`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    /// Wall-clock end of the interval, Unix ms.
    pub at_ms: u64,
    /// Messages whose echo came back, byte for byte.
    pub messages: u64,
    /// Round trips, microseconds, from the scheduled send time.
    pub rtt_us: Hist,
    /// Handshakes completed (first connects and returns).
    pub connects: u64,
    /// Connection attempts that failed (refused, reset, timed out, 503).
    pub failed_connects: u64,
    /// Connections the device itself ended (its lifetime was up).
    pub left: u64,
    /// Connections that ended without the device asking: close frame,
    /// close_notify, reset or EOF from the node.
    pub cut: u64,
    /// Messages sent whose echo never came, or came different.
    pub lost: u64,
    /// The first reason a connection was cut or refused in the interval.
    pub first_problem: Option<String>,
}

impl Tally {
    /// Adds `o`'s counts (not its time or round trips) to these; the first
    /// problem stays the first.
    pub fn absorb(&mut self, o: &Tally) {
        self.messages += o.messages;
        self.connects += o.connects;
        self.failed_connects += o.failed_connects;
        self.left += o.left;
        self.cut += o.cut;
        self.lost += o.lost;
        if self.first_problem.is_none() {
            self.first_problem = o.first_problem.clone();
        }
    }
}

/// Counts while they accumulate.
struct Counts {
    rtt: Histogram<u64>,
    t: Tally,
}

impl Counts {
    fn new() -> Counts {
        Counts { rtt: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds"), t: Tally::default() }
    }

    fn problem(&mut self, what: String) {
        if self.t.first_problem.is_none() {
            self.t.first_problem = Some(what);
        }
    }

    /// The tally so far, stamped now.
    fn tally(&self) -> Tally {
        Tally { at_ms: wall_us() / 1000, rtt_us: Hist::from(&self.rtt), ..self.t.clone() }
    }

    fn add(&mut self, o: &Counts) {
        let _ = self.rtt.add(&o.rtt);
        self.t.absorb(&o.t);
    }
}

/// The interval's counts and the run's.
struct Books {
    interval: Counts,
    total: Counts,
}

type Shared = Rc<RefCell<Books>>;

fn rand_unit() -> f64 {
    monoio::utils::thread_rng_n(1_000_000) as f64 / 1e6
}

/// How long device `i` stays connected this time: the whole run if it is a
/// steady one (even), else up to `churn_secs` (at least a tenth of it).
pub fn lifetime(i: usize, churn_secs: f64, u: f64) -> Option<Duration> {
    (i % 2 == 1 && churn_secs > 0.0).then(|| Duration::from_secs_f64(churn_secs * (0.1 + 0.9 * u)))
}

async fn device(cfgs: Fleet, a: Rc<SwarmArgs>, i: usize, books: Shared, end: Instant) {
    let src = (!a.src.is_empty()).then(|| a.src[i % a.src.len()]);
    let cfg = cfgs[i % cfgs.len()].clone();
    let period = Duration::from_secs_f64(1.0 / a.msg_rate.max(0.001));
    let base = Instant::now();
    while Instant::now() < end {
        let mut c = match WsClient::connect(cfg.clone(), src, a.target, "/soak").await {
            Ok(c) => c,
            Err(f) => {
                {
                    let mut b = books.borrow_mut();
                    b.interval.t.failed_connects += 1;
                    b.interval.problem(format!("connect: {:?} {}", f.0, f.1));
                }
                let after = f.1.split("Retry-After:").nth(1).and_then(|s| s.trim().parse::<f64>().ok());
                monoio::time::sleep(Duration::from_secs_f64(after.unwrap_or(1.0 + rand_unit()))).await;
                continue;
            }
        };
        books.borrow_mut().interval.t.connects += 1;
        let leave = lifetime(i, a.churn_secs, rand_unit()).map_or(end, |l| (Instant::now() + l).min(end));
        let mut next = Instant::now() + period.mul_f64(rand_unit());
        let mut cut = None;
        while next < leave {
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                monoio::time::sleep(d).await;
            }
            let mut p = vec![b'x'; a.msg_size.max(16)];
            p[..8].copy_from_slice(&(next.duration_since(base).as_nanos() as u64).to_be_bytes());
            p[8..16].copy_from_slice(&(i as u64).to_be_bytes());
            if let Err(f) = c.send(op::BINARY, &p).await {
                cut = Some(format!("send: {:?} {}", f.0, f.1));
                break;
            }
            match c.recv().await {
                Ok(echo) if echo == p => {
                    let mut b = books.borrow_mut();
                    let _ = b.interval.rtt.record(next.elapsed().as_micros().max(1) as u64);
                    b.interval.t.messages += 1;
                }
                Ok(_) => {
                    books.borrow_mut().interval.t.lost += 1;
                    cut = Some("the echo differs from the message sent".into());
                    break;
                }
                Err(f) => {
                    books.borrow_mut().interval.t.lost += 1;
                    cut = Some(format!("recv: {:?} {} (close {:?})", f.0, f.1, c.closed_with));
                    break;
                }
            }
            next += period;
            // A device that fell behind (the node paused it) does not burst
            // to catch up: its schedule moves on, the late one still counts.
            if next + period < Instant::now() {
                next = Instant::now();
            }
        }
        match cut {
            None => {
                c.close().await;
                books.borrow_mut().interval.t.left += 1;
                if Instant::now() < end {
                    monoio::time::sleep(Duration::from_secs_f64(2.0 * rand_unit())).await;
                }
            }
            Some(why) => {
                {
                    let mut b = books.borrow_mut();
                    b.interval.t.cut += 1;
                    b.interval.problem(why);
                }
                monoio::time::sleep(Duration::from_secs_f64(1.0 + rand_unit())).await;
            }
        }
    }
}

/// Prints the interval's tally and folds it into the run's.
fn sample(books: &Shared) {
    let mut b = books.borrow_mut();
    let line = b.interval.tally();
    let iv = std::mem::replace(&mut b.interval, Counts::new());
    b.total.add(&iv);
    println!("SAMPLE {}", serde_json::to_string(&line).unwrap_or_default());
}

pub fn run(a: SwarmArgs) -> Result<(), String> {
    let cfgs = crate::swarm::client_configs(&a)?;
    let mut rt =
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(8192).enable_timer().build().map_err(|e| e.to_string())?;
    let total = rt.block_on(async move {
        let a = Rc::new(a);
        let books: Shared = Rc::new(RefCell::new(Books { interval: Counts::new(), total: Counts::new() }));
        let stdin = crate::swarm::stdin_line();
        println!("READY {}", a.conns);
        crate::swarm::wait_line(&stdin).await;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(a.duration);
        let every = Duration::from_secs_f64(a.sample_secs.max(1.0));
        let b = books.clone();
        let sampler = monoio::spawn(async move {
            let mut next = start + every;
            while next < end {
                monoio::time::sleep(next.saturating_duration_since(Instant::now())).await;
                sample(&b);
                next += every;
            }
        });
        let mut hs = Vec::with_capacity(a.conns);
        for i in 0..a.conns {
            if a.rate > 0 {
                let due = start + Duration::from_secs_f64(i as f64 / a.rate as f64);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    monoio::time::sleep(d).await;
                }
            }
            hs.push(monoio::spawn(device(cfgs.clone(), a.clone(), i, books.clone(), end)));
        }
        for h in hs {
            h.await;
        }
        sampler.await;
        sample(&books);
        books.borrow().total.tally()
    });
    println!("REPORT {}", serde_json::to_string(&total).map_err(|e| e.to_string())?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_devices_stay_and_odd_ones_churn_within_the_range() {
        assert_eq!(lifetime(0, 300.0, 0.5), None);
        assert_eq!(lifetime(1, 0.0, 0.5), None, "no churn asked for");
        assert_eq!(lifetime(1, 300.0, 0.0), Some(Duration::from_secs(30)));
        assert_eq!(lifetime(3, 300.0, 1.0), Some(Duration::from_secs(300)));
    }

    #[test]
    fn intervals_fold_into_the_total() {
        let mut total = Counts::new();
        let mut iv = Counts::new();
        iv.t.messages = 3;
        iv.t.cut = 1;
        iv.problem("first".into());
        iv.problem("second".into());
        let _ = iv.rtt.record(1500);
        total.add(&iv);
        total.add(&iv);
        let t = total.tally();
        assert_eq!((t.messages, t.cut, t.rtt_us.count), (6, 2, 2));
        assert_eq!(t.first_problem.as_deref(), Some("first"));
    }
}
