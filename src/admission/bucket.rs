//! A token bucket: a rate with a small burst, fed `now`.
//!
//! Owns: the arithmetic of one rate limit (tokens refilled at `per_sec`,
//! at most `burst` saved up) and when the next token comes. Never sleeps.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// The burst a bucket saves up: a tenth of a second's worth, at least one.
pub const BURST: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Bucket {
    per_sec: f64,
    tokens: f64,
    last: Instant,
    /// How much of a second's worth it saves up.
    burst: Duration,
}

impl Bucket {
    /// A bucket that starts full, saving up [`BURST`].
    pub fn new(per_sec: f64, now: Instant) -> Bucket {
        Bucket::with_burst(per_sec, BURST, now)
    }

    /// A bucket that starts full and saves up `burst` worth of tokens (at least one).
    pub fn with_burst(per_sec: f64, burst: Duration, now: Instant) -> Bucket {
        let mut b = Bucket { per_sec: per_sec.max(0.001), tokens: 0.0, last: now, burst };
        b.tokens = b.burst();
        b
    }

    fn burst(&self) -> f64 {
        (self.per_sec * self.burst.as_secs_f64()).max(1.0)
    }

    /// A new rate from now on (a reload).
    pub fn set_rate(&mut self, per_sec: f64, now: Instant) {
        self.refill(now);
        self.per_sec = per_sec.max(0.001);
        self.tokens = self.tokens.min(self.burst());
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst());
        self.last = self.last.max(now);
    }

    /// An optional rate (`None`: no limit) set to `per_sec` from now on:
    /// a bucket kept (its tokens with it), made, or dropped.
    pub fn retune(bucket: &mut Option<Bucket>, per_sec: Option<f64>, now: Instant) {
        match (bucket.as_mut(), per_sec) {
            (Some(b), Some(r)) => b.set_rate(r, now),
            (_, r) => *bucket = r.map(|r| Bucket::new(r, now)),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there (`now` if it already is).
    pub fn next_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            return now;
        }
        now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests take a real `now` once
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t = Instant::now();
        let mut b = Bucket::new(100.0, t);
        assert_eq!((0..50).filter(|_| b.take(t)).count(), 10, "a tenth of a second's worth at once");
        let at = b.next_at(t);
        assert!(at > t && at <= t + Duration::from_millis(11), "{:?}", at - t);
        let later = t + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(later)).count(), 10, "saved up no more than the burst");
        // Over ten simulated seconds, taken as fast as allowed: the rate.
        let mut now = later;
        let mut n = 0;
        while now < later + Duration::from_secs(10) {
            if b.take(now) {
                n += 1;
            }
            now += Duration::from_micros(500);
        }
        assert!((999..=1001).contains(&n), "{n}");
    }

    #[test]
    fn a_slow_rate_still_gives_one_at_a_time() {
        let t = Instant::now();
        let mut b = Bucket::new(2.0, t);
        assert!(b.take(t));
        assert!(!b.take(t));
        assert_eq!(b.next_at(t), t + Duration::from_millis(500));
        assert!(b.take(t + Duration::from_millis(500)));
        b.set_rate(1000.0, t + Duration::from_millis(600));
        assert!(b.take(t + Duration::from_millis(601)));
    }
}
