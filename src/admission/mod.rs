//! Admission control, decided without I/O: how many devices a shard lets
//! in, how fast, how fast its WSMs see streams open, and what a device is
//! told when it must come back later.
//!
//! Owns: each shard's equal share of the node-wide limits ([`Share`]), the
//! token bucket the rates use ([`bucket`]), the bounded queue of devices
//! waiting, upgrade pending, for a WSM open ([`queue`]), why a device is
//! shed ([`Shed`]) and its jittered `Retry-After`, and the random moments of
//! paced closes (drains, connection ages). Fed `now` and random numbers;
//! never reads the clock, sleeps or touches a socket: the shard shell
//! (`shard::admit`) does.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

pub mod bucket;
pub mod queue;

use std::time::{Duration, Instant};

use crate::config::admission::{Admission, Age};

/// One shard's part of the node-wide `[admission]` limits: rates divided
/// equally, counts rounded up (so the node's sum is never below its limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub handshakes_per_sec: Option<f64>,
    pub max_handshaking: Option<u32>,
    pub wsm_opens_per_sec: Option<f64>,
    pub wsm_open_queue: usize,
}

impl Share {
    pub fn of(a: &Admission, shards: usize) -> Share {
        let n = shards.max(1);
        Share {
            handshakes_per_sec: a.handshakes_per_sec.map(|r| r as f64 / n as f64),
            max_handshaking: a.max_handshaking.map(|m| m.div_ceil(n as u32).max(1)),
            wsm_opens_per_sec: a.wsm_opens_per_sec.map(|r| r as f64 / n as f64),
            wsm_open_queue: (a.wsm_open_queue as usize).div_ceil(n).max(1),
        }
    }
}

/// Why a device is answered 503 before its tunnel opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The node holds `admission.max_connections` already.
    MaxConnections,
    /// The process is above `admission.max_memory_mb`.
    Memory,
    /// The open queue is full.
    QueueFull,
    /// The device waited `admission.wsm_open_wait_ms` for an open.
    WaitExpired,
}

impl Shed {
    pub const ALL: [Shed; 4] = [Shed::MaxConnections, Shed::Memory, Shed::QueueFull, Shed::WaitExpired];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Shed::MaxConnections => "max_connections",
            Shed::Memory => "memory",
            Shed::QueueFull => "wsm_open_queue",
            Shed::WaitExpired => "wsm_open_wait",
        }
    }

    /// The text of the 503's body.
    pub fn reason(self) -> &'static str {
        match self {
            Shed::MaxConnections => "node at its connection limit",
            Shed::Memory => "node at its memory budget",
            Shed::QueueFull => "too many devices waiting for a WSM",
            Shed::WaitExpired => "waited too long for a WSM",
        }
    }

    pub fn index(self) -> usize {
        Shed::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// The `Retry-After` seconds for one shed device: from `retry_after_secs`
/// to `retry_after_secs + retry_after_jitter_secs`, drawn with `rand`
/// (uniform in `0..u32::MAX`).
pub fn retry_after(a: &Admission, rand: u32) -> u32 {
    let span = a.retry_after_jitter_secs as u64 + 1;
    a.retry_after_secs + ((rand as u64 * span) >> 32) as u32
}

/// A moment uniform in `[now, now + over)`, drawn with `rand` (uniform in
/// `0..u32::MAX`): where a paced close falls.
pub fn within(now: Instant, over: Duration, rand: u32) -> Instant {
    let nanos = over.as_nanos().min(u64::MAX as u128) as u64;
    now + Duration::from_nanos(((nanos as u128 * rand as u128) >> 32) as u64)
}

/// When a connection that started at `since` reaches its own age.
pub fn aged_at(since: Instant, age: Age, rand: u32) -> Instant {
    within(since + age.min, age.jitter, rand)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests take a real `now` once
mod tests {
    use super::*;

    fn admission() -> Admission {
        let mut errs = Vec::new();
        crate::config::admission::admission(&Default::default(), &mut errs)
    }

    #[test]
    fn a_shard_gets_an_equal_share_and_counts_round_up() {
        let a = Admission { handshakes_per_sec: Some(1000), max_handshaking: Some(101), wsm_opens_per_sec: Some(3), ..admission() };
        let s = Share::of(&a, 2);
        assert_eq!(s.handshakes_per_sec, Some(500.0));
        assert_eq!(s.max_handshaking, Some(51));
        assert_eq!(s.wsm_opens_per_sec, Some(1.5));
        assert_eq!(s.wsm_open_queue, 5_000);
        assert_eq!(Share::of(&admission(), 4).handshakes_per_sec, None);
    }

    #[test]
    fn retry_after_spans_its_whole_range() {
        let a = Admission { retry_after_secs: 5, retry_after_jitter_secs: 25, ..admission() };
        assert_eq!(retry_after(&a, 0), 5);
        assert_eq!(retry_after(&a, u32::MAX), 30);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000u32 {
            seen.insert(retry_after(&a, i.wrapping_mul(2_654_435_761)));
        }
        assert_eq!(seen.len(), 26, "every second from 5 to 30 is drawn: {seen:?}");
    }

    #[test]
    fn moments_fall_inside_their_window() {
        let t = Instant::now();
        let over = Duration::from_secs(30);
        assert_eq!(within(t, over, 0), t);
        assert!(within(t, over, u32::MAX) < t + over);
        assert_eq!(within(t, Duration::ZERO, 12345), t);
        let age = Age { min: Duration::from_secs(60), jitter: Duration::from_secs(10) };
        let at = aged_at(t, age, u32::MAX / 2);
        assert!(at >= t + Duration::from_secs(64) && at <= t + Duration::from_secs(66));
    }
}
