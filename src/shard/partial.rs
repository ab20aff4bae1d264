//! Partial TLS records parked off the buffer pool while their connection
//! waits, under a per-shard byte budget.
//!
//! Owns: the bytes of a record that has only partly arrived, copied out of
//! the pool buffer into an allocation of their own before the connection
//! waits (so a device that sends half a record and stops pins no shared
//! buffer, and no number of such devices can stall the shard's reads), the
//! shard's count of such bytes against `buffers.partial_bytes_per_shard`,
//! and, when a park takes the shard past it, asking the oldest holders to
//! close (their streams are woken with `evict_partial` set). Never closes a
//! connection itself and never reads a socket.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use super::link::StreamShared;
use crate::metrics::ShardMetrics;

/// The shard's parked bytes and their holders, oldest first.
pub struct Partials {
    budget: u64,
    /// `partial_bytes` and `partial_record_evictions_total` are kept here.
    metrics: std::sync::Arc<ShardMetrics>,
    bytes: Cell<u64>,
    /// Parked now (entries in `holders` may be stale).
    live: Cell<usize>,
    /// Bytes of holders already asked to close (not yet gone).
    evicting: Cell<u64>,
    holders: RefCell<VecDeque<Holder>>,
}

struct Holder {
    /// Dead once the bytes are taken back or the connection ends.
    parked: Weak<()>,
    /// The holder's stream, to wake it (none before the WebSocket upgrade:
    /// such a holder is bounded by the upgrade timeout instead).
    stream: Option<Weak<RefCell<StreamShared>>>,
    len: u64,
}

/// One connection's parked bytes; gives its share of the budget back when
/// dropped, however the connection ends.
pub struct Parked {
    pub bytes: Box<[u8]>,
    /// Alive while parked: the shard's holder entry watches it.
    _token: Rc<()>,
    shard: Rc<Partials>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        let s = &self.shard;
        s.bytes.set(s.bytes.get() - self.bytes.len() as u64);
        s.live.set(s.live.get() - 1);
        s.publish();
    }
}

impl Partials {
    pub fn new(budget: u64, metrics: std::sync::Arc<ShardMetrics>) -> Rc<Partials> {
        Rc::new(Partials {
            budget,
            metrics,
            bytes: Cell::new(0),
            live: Cell::new(0),
            evicting: Cell::new(0),
            holders: RefCell::new(VecDeque::new()),
        })
    }

    fn publish(&self) {
        self.metrics.partial_bytes.store(self.bytes.get(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Parked bytes of the whole shard.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Parks `bytes` for a connection. If that takes the shard past its
    /// budget, the oldest holders with a stream are asked to close (at least
    /// as many bytes as the excess); returns how many were asked.
    pub fn park(self: &Rc<Self>, bytes: &[u8], stream: Option<&Rc<RefCell<StreamShared>>>) -> (Parked, usize) {
        let token = Rc::new(());
        let len = bytes.len() as u64;
        self.bytes.set(self.bytes.get() + len);
        self.live.set(self.live.get() + 1);
        {
            let mut h = self.holders.borrow_mut();
            h.push_back(Holder { parked: Rc::downgrade(&token), stream: stream.map(Rc::downgrade), len });
            // Stale entries (taken back, or gone) are dropped now and then.
            if h.len() > 2 * self.live.get() + 64 {
                h.retain(|x| x.parked.strong_count() > 0);
            }
        }
        let parked = Parked { bytes: bytes.into(), _token: token, shard: self.clone() };
        let asked = self.evict_over_budget();
        self.metrics.partial_record_evictions_total.fetch_add(asked as u64, std::sync::atomic::Ordering::Relaxed);
        self.publish();
        (parked, asked)
    }

    fn evict_over_budget(&self) -> usize {
        let mut asked = 0;
        let mut h = self.holders.borrow_mut();
        let mut skipped = Vec::new();
        while self.bytes.get().saturating_sub(self.evicting.get()) > self.budget {
            let Some(x) = h.pop_front() else { break };
            if x.parked.strong_count() == 0 {
                continue;
            }
            match x.stream.as_ref().and_then(Weak::upgrade) {
                Some(s) => {
                    let mut s = s.borrow_mut();
                    // A parked record is never empty.
                    s.evict_partial = std::num::NonZeroU64::new(x.len.max(1));
                    s.wake();
                    self.evicting.set(self.evicting.get() + x.len);
                    asked += 1;
                }
                None => skipped.push(x),
            }
        }
        for x in skipped.into_iter().rev() {
            h.push_front(x);
        }
        asked
    }

    /// A holder asked to close (with `evict_partial = Some(len)`) acted on
    /// it; its bytes went when its [`Parked`] was dropped.
    pub fn evicted(&self, len: u64) {
        self.evicting.set(self.evicting.get().saturating_sub(len));
    }
}

impl Parked {
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Rc<RefCell<StreamShared>> {
        Rc::new(RefCell::new(StreamShared::default()))
    }

    #[test]
    fn parked_bytes_are_counted_until_dropped() {
        let p = Partials::new(1000, Default::default());
        let (a, asked) = p.park(&[1; 300], None);
        assert_eq!((p.bytes(), asked), (300, 0));
        assert_eq!(a.len(), 300);
        assert_eq!(p.metrics.partial_bytes.load(std::sync::atomic::Ordering::Relaxed), 300);
        drop(a);
        assert_eq!(p.bytes(), 0);
        assert_eq!(p.metrics.partial_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn past_the_budget_the_oldest_holders_with_a_stream_are_asked_to_close() {
        let p = Partials::new(1000, Default::default());
        let (s1, s2, s3) = (stream(), stream(), stream());
        let (_a, _) = p.park(&[0; 400], Some(&s1));
        let (_pre, _) = p.park(&[0; 100], None);
        let (_b, _) = p.park(&[0; 400], Some(&s2));
        assert!(s1.borrow().evict_partial.is_none());
        // 1,200 > 1,000: the oldest with a stream (s1) goes, s2 stays.
        let (_c, asked) = p.park(&[0; 300], Some(&s3));
        assert_eq!(asked, 1);
        assert_eq!(p.metrics.partial_record_evictions_total.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(s1.borrow().evict_partial.is_some());
        assert!(s2.borrow().evict_partial.is_none() && s3.borrow().evict_partial.is_none());
        // Until s1 is gone its bytes count, but it is not asked twice.
        let (_d, asked) = p.park(&[0; 10], Some(&stream()));
        assert_eq!(asked, 0);
        p.evicted(400);
        drop(_a);
        assert_eq!(p.bytes(), 810);
    }

    #[test]
    fn taken_back_bytes_are_never_evicted() {
        let p = Partials::new(100, Default::default());
        let s1 = stream();
        let (a, _) = p.park(&[0; 90], Some(&s1));
        drop(a); // read again: the record completed
        let s2 = stream();
        let (_b, asked) = p.park(&[0; 90], Some(&s2));
        assert_eq!(asked, 0);
        assert!(s1.borrow().evict_partial.is_none());
        let (_c, asked) = p.park(&[0; 90], Some(&stream()));
        assert_eq!(asked, 1);
        assert!(s2.borrow().evict_partial.is_some());
    }

    #[test]
    fn stale_entries_do_not_pile_up() {
        let p = Partials::new(1 << 30, Default::default());
        for _ in 0..10_000 {
            let (a, _) = p.park(&[0; 10], Some(&stream()));
            drop(a);
        }
        assert!(p.holders.borrow().len() <= 2 * p.live.get() + 65);
    }
}
