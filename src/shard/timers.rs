//! The shard's coarse timer for idle and ping deadlines of tunnels.
//!
//! Owns: one heap of (deadline, stream) entries per shard and a ticker task
//! that wakes streams whose deadline has passed. A per-connection runtime
//! sleep costs 640 bytes in every idle connection; an entry here costs about
//! 32. A stream keeps at most one live entry: it registers again only when
//! its deadline moves earlier or after its entry fired; stale entries are
//! skipped when they come due. Resolution is [`TICK`]; idle and ping
//! deadlines are seconds apart, so that is plenty.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use super::link::StreamShared;

pub const TICK: Duration = Duration::from_millis(250);

struct Entry {
    at: Instant,
    stream: Weak<RefCell<StreamShared>>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        self.at.cmp(&o.at)
    }
}

#[derive(Default)]
pub struct Timers {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
}

impl Timers {
    /// Makes sure `stream` is woken at or after `at` (at most [`TICK`] late).
    pub fn arm(&self, stream: &Rc<RefCell<StreamShared>>, at: Instant) {
        let mut s = stream.borrow_mut();
        if s.timer_at.is_some_and(|r| r <= at) {
            return; // an earlier entry will wake it; it re-arms then
        }
        s.timer_at = Some(at);
        self.heap.borrow_mut().push(Reverse(Entry { at, stream: Rc::downgrade(stream) }));
    }

    /// Wakes every stream whose deadline is `now` or earlier.
    pub fn fire(&self, now: Instant) -> usize {
        let mut woke = 0;
        loop {
            let entry = {
                let mut heap = self.heap.borrow_mut();
                match heap.peek() {
                    Some(Reverse(e)) if e.at <= now => heap.pop().map(|Reverse(e)| e),
                    _ => None,
                }
            };
            let Some(e) = entry else { return woke };
            if let Some(s) = e.stream.upgrade() {
                let mut s = s.borrow_mut();
                if s.timer_at == Some(e.at) {
                    s.timer_at = None;
                    s.wake();
                    woke += 1;
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.heap.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs the shard's ticker forever.
pub async fn tick(timers: Rc<Timers>) {
    loop {
        monoio::time::sleep(TICK).await;
        timers.fire(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Rc<RefCell<StreamShared>> {
        Rc::new(RefCell::new(StreamShared::default()))
    }

    #[test]
    fn fires_due_entries_once_and_skips_stale_ones() {
        let t = Timers::default();
        let now = Instant::now();
        let (a, b) = (stream(), stream());
        t.arm(&a, now + Duration::from_secs(10));
        t.arm(&a, now + Duration::from_secs(5)); // earlier: replaces
        t.arm(&a, now + Duration::from_secs(20)); // later: kept as is
        t.arm(&b, now + Duration::from_secs(30));
        assert_eq!(t.len(), 3);
        assert_eq!(t.fire(now + Duration::from_secs(6)), 1);
        assert_eq!(a.borrow().timer_at, None);
        assert_eq!(t.fire(now + Duration::from_secs(11)), 0, "the replaced entry is stale");
        drop(b);
        assert_eq!(t.fire(now + Duration::from_secs(31)), 0, "a closed stream is skipped");
        assert!(t.is_empty());
    }
}
