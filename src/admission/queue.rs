//! The queue of devices waiting, upgrade pending, for their stream to be
//! opened on a WSM, under `admission.wsm_opens_per_sec`.
//!
//! Owns: one shard's open rate (a [`Bucket`]; none: unlimited), the FIFO of
//! waiting devices with its bound and wait limit, which of them may open
//! now and which have waited too long, and the turns re-opened (resumed)
//! streams take from the same rate. Fed `now`; never sleeps or wakes a
//! task: `shard::admit` does, as this says.
#![forbid(unsafe_code)]

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::bucket::Bucket;

/// A waiting device's place.
pub type Ticket = u64;

/// What a device that wants to open a stream is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enter {
    /// Open now.
    Now,
    /// Wait for [`OpenQueue::grant`] (or [`OpenQueue::expired`]) to name this ticket.
    Wait(Ticket),
    /// The queue is full: shed it.
    Full,
}

#[derive(Debug)]
pub struct OpenQueue {
    bucket: Option<Bucket>,
    waiting: VecDeque<(Ticket, Instant)>,
    abandoned: HashSet<Ticket>,
    cap: usize,
    wait: Duration,
    next: Ticket,
    /// Opens taken so far (new and resumed).
    pub opened: u64,
}

impl OpenQueue {
    /// `per_sec` `None`: no limit (nobody ever waits).
    pub fn new(per_sec: Option<f64>, cap: usize, wait: Duration, now: Instant) -> OpenQueue {
        OpenQueue {
            bucket: per_sec.map(|r| Bucket::new(r, now)),
            waiting: VecDeque::new(),
            abandoned: HashSet::new(),
            cap: cap.max(1),
            wait,
            next: 0,
            opened: 0,
        }
    }

    /// A reload's limits, from now on. Lifting the rate lets every waiting
    /// device open at the next [`OpenQueue::grant`].
    pub fn set_limits(&mut self, per_sec: Option<f64>, cap: usize, wait: Duration, now: Instant) {
        Bucket::retune(&mut self.bucket, per_sec, now);
        self.cap = cap.max(1);
        self.wait = wait;
    }

    /// Devices waiting.
    pub fn len(&self) -> usize {
        self.waiting.len() - self.abandoned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&mut self, now: Instant) -> bool {
        let ok = self.bucket.as_mut().is_none_or(|b| b.take(now));
        self.opened += ok as u64;
        ok
    }

    /// A device's upgrade request is in: may its stream open now? Nobody
    /// overtakes a waiting device.
    pub fn enter(&mut self, now: Instant) -> Enter {
        if self.is_empty() && self.take(now) {
            return Enter::Now;
        }
        if self.len() >= self.cap {
            return Enter::Full;
        }
        let t = self.next;
        self.next += 1;
        self.waiting.push_back((t, now));
        Enter::Wait(t)
    }

    /// A waiting device went away (its task ended): its place is freed.
    pub fn abandon(&mut self, t: Ticket) {
        if self.waiting.iter().any(|(w, _)| *w == t) {
            self.abandoned.insert(t);
        }
        self.forget_abandoned_front();
    }

    fn forget_abandoned_front(&mut self) {
        while let Some((t, _)) = self.waiting.front() {
            if !self.abandoned.remove(t) {
                break;
            }
            self.waiting.pop_front();
        }
    }

    /// The devices that may open now, oldest first.
    pub fn grant(&mut self, now: Instant) -> Vec<Ticket> {
        let mut out = Vec::new();
        loop {
            self.forget_abandoned_front();
            if self.waiting.is_empty() || !self.take(now) {
                return out;
            }
            if let Some((t, _)) = self.waiting.pop_front() {
                out.push(t);
            }
        }
    }

    /// The devices that have waited longer than the wait limit: out of the queue.
    pub fn expired(&mut self, now: Instant) -> Vec<Ticket> {
        let mut out = Vec::new();
        while let Some(&(t, at)) = self.waiting.front() {
            if self.abandoned.remove(&t) {
                self.waiting.pop_front();
                continue;
            }
            if now.saturating_duration_since(at) < self.wait {
                break;
            }
            self.waiting.pop_front();
            out.push(t);
        }
        out
    }

    /// When [`OpenQueue::grant`] or [`OpenQueue::expired`] next has
    /// something to say (`None`: nobody waits).
    pub fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        self.forget_abandoned_front();
        let &(_, oldest) = self.waiting.front()?;
        let token = self.bucket.as_mut().map_or(now, |b| b.next_at(now));
        Some(token.min(oldest + self.wait))
    }

    /// A stream re-opened elsewhere (its WSM died or went away, or it moved
    /// in an upgrade) takes a turn of the same rate. It goes before waiting
    /// devices: its device is already served, its messages held.
    pub fn take_resume(&mut self, now: Instant) -> bool {
        self.take(now)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests take a real `now` once
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(2);

    #[test]
    fn without_a_rate_everybody_opens_at_once() {
        let t = Instant::now();
        let mut q = OpenQueue::new(None, 1, WAIT, t);
        assert!((0..10_000).all(|_| q.enter(t) == Enter::Now));
        assert!(q.take_resume(t));
        assert_eq!(q.next_wake(t), None);
    }

    #[test]
    fn a_storm_waits_in_order_opens_at_the_rate_and_overflows_cleanly() {
        let t = Instant::now();
        let mut q = OpenQueue::new(Some(10.0), 5, WAIT, t);
        assert_eq!(q.enter(t), Enter::Now, "the burst of one");
        let tickets: Vec<_> = (0..5).map(|_| q.enter(t)).collect();
        assert!(tickets.iter().all(|e| matches!(e, Enter::Wait(_))));
        assert_eq!(q.enter(t), Enter::Full);
        assert_eq!(q.len(), 5);
        assert!(q.grant(t).is_empty());
        let at = q.next_wake(t).unwrap();
        assert_eq!(at, t + Duration::from_millis(100));
        assert_eq!(q.grant(at), vec![0]);
        // A device that gives up frees its place; the next one moves up.
        q.abandon(1);
        assert_eq!(q.len(), 3);
        assert_eq!(q.grant(at + Duration::from_millis(100)), vec![2]);
        assert_eq!(q.enter(at), Enter::Wait(5), "nobody overtakes a waiting device");
    }

    #[test]
    fn devices_that_wait_too_long_leave_the_queue() {
        let t = Instant::now();
        let mut q = OpenQueue::new(Some(0.1), 100, WAIT, t);
        assert_eq!(q.enter(t), Enter::Now);
        let _ = q.enter(t);
        let _ = q.enter(t + Duration::from_secs(1));
        assert_eq!(q.next_wake(t), Some(t + WAIT));
        assert!(q.expired(t + Duration::from_millis(1999)).is_empty());
        assert_eq!(q.expired(t + WAIT), vec![0]);
        assert_eq!(q.expired(t + WAIT + Duration::from_secs(1)), vec![1]);
        assert!(q.is_empty());
    }

    #[test]
    fn resumed_streams_share_the_rate() {
        let t = Instant::now();
        let mut q = OpenQueue::new(Some(20.0), 100, WAIT, t);
        assert!(q.take_resume(t) && q.take_resume(t));
        assert!(!q.take_resume(t), "the burst (a tenth of a second) is spent");
        assert!(matches!(q.enter(t), Enter::Wait(_)));
        assert_eq!(q.opened, 2);
    }

    #[test]
    fn lifting_the_rate_lets_the_waiting_open() {
        let t = Instant::now();
        let mut q = OpenQueue::new(Some(1.0), 100, WAIT, t);
        let _ = q.enter(t);
        for _ in 0..3 {
            let _ = q.enter(t);
        }
        q.set_limits(None, 100, WAIT, t);
        assert_eq!(q.grant(t), vec![0, 1, 2]);
    }

    proptest::proptest! {
        /// Whatever arrives when, and whoever gives up: opens (new and
        /// resumed) in any second never pass the rate plus the burst, the
        /// waiting open in arrival order, nobody waits past the limit
        /// unanswered, and the queue never holds more than its bound.
        #[test]
        fn the_rate_order_bound_and_wait_hold_for_any_storm(
            rate in 1u32..200,
            cap in 1usize..50,
            wait_ms in 1u64..3000,
            events in proptest::collection::vec((0u64..50, 0u8..10), 1..400),
        ) {
            let t0 = Instant::now();
            let wait = Duration::from_millis(wait_ms);
            let mut q = OpenQueue::new(Some(rate as f64), cap, wait, t0);
            let mut now = t0;
            let mut opens: Vec<Instant> = Vec::new();
            let mut waiting: std::collections::VecDeque<(Ticket, Instant)> = Default::default();
            let mut last_granted: Option<Ticket> = None;
            let settle = |q: &mut OpenQueue, now: Instant, opens: &mut Vec<Instant>, waiting: &mut std::collections::VecDeque<(Ticket, Instant)>, last: &mut Option<Ticket>| {
                for t in q.grant(now) {
                    proptest::prop_assert!(last.is_none_or(|l| t > l), "granted out of order");
                    *last = Some(t);
                    opens.push(now);
                    waiting.retain(|(w, _)| *w != t);
                }
                for t in q.expired(now) {
                    let (_, at) = waiting.iter().find(|(w, _)| *w == t).copied().unwrap();
                    proptest::prop_assert!(now.duration_since(at) >= wait);
                    waiting.retain(|(w, _)| *w != t);
                }
                for (_, at) in waiting.iter() {
                    proptest::prop_assert!(now.duration_since(*at) <= wait + Duration::from_millis(50), "waited past the limit");
                }
                proptest::prop_assert!(q.len() <= cap);
                Ok(())
            };
            for (gap, what) in events {
                let step = now + Duration::from_millis(gap);
                while now < step {
                    now = (now + Duration::from_millis(10)).min(step);
                    settle(&mut q, now, &mut opens, &mut waiting, &mut last_granted)?;
                }
                match what {
                    0..=6 => match q.enter(now) {
                        Enter::Now => opens.push(now),
                        Enter::Wait(t) => waiting.push_back((t, now)),
                        Enter::Full => proptest::prop_assert_eq!(q.len(), cap),
                    },
                    7 => {
                        if q.take_resume(now) {
                            opens.push(now);
                        }
                    }
                    _ => {
                        if let Some((t, _)) = waiting.pop_front() {
                            q.abandon(t);
                        }
                    }
                }
            }
            let burst = (rate as f64 * super::super::bucket::BURST.as_secs_f64()).max(1.0);
            for (i, t) in opens.iter().enumerate() {
                let in_second = opens[i..].iter().take_while(|u| u.duration_since(*t) < Duration::from_secs(1)).count();
                proptest::prop_assert!(in_second as f64 <= rate as f64 + burst + 1.0, "{in_second} opens in a second at {rate}/s");
            }
        }
    }
}
