//! The shard's preallocated I/O buffer pool.
//!
//! Owns: a fixed number of equal buffers allocated once at shard start. A
//! connection takes a buffer only while bytes are in flight and gives it back
//! after; an idle connection holds none. When the pool is empty, callers wait
//! (the shard stops reading), so memory never grows past the configured size.
//! Never shared across threads.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use crate::metrics::ShardMetrics;

/// Smallest buffer that holds one whole TLS record (5 + 2^14 + 2048).
pub use crate::config::MIN_BUFFER;

struct Inner {
    free: Vec<Vec<u8>>,
    size: usize,
    total: usize,
    waiters: VecDeque<Waker>,
    exhausted_events: u64,
    metrics: Arc<ShardMetrics>,
}

#[derive(Clone)]
pub struct Pool(Rc<RefCell<Inner>>);

/// A buffer on loan from the pool; returns itself when dropped.
pub struct PoolBuf {
    buf: Option<Vec<u8>>,
    pool: Pool,
}

impl Pool {
    /// Allocates and touches every buffer now, so the pool's memory is a
    /// fixed, visible cost from the start (not page faults under load).
    pub fn new(count: usize, size: usize, metrics: Arc<ShardMetrics>) -> Pool {
        let free = (0..count)
            .map(|_| {
                let mut v = vec![0u8; size];
                v.clear();
                v
            })
            .collect();
        Pool(Rc::new(RefCell::new(Inner { free, size, total: count, waiters: VecDeque::new(), exhausted_events: 0, metrics })))
    }

    pub fn size(&self) -> usize {
        self.0.borrow().size
    }

    pub fn available(&self) -> usize {
        self.0.borrow().free.len()
    }

    pub fn total(&self) -> usize {
        self.0.borrow().total
    }

    pub fn exhausted_events(&self) -> u64 {
        self.0.borrow().exhausted_events
    }

    pub fn try_take(&self) -> Option<PoolBuf> {
        let mut inner = self.0.borrow_mut();
        let buf = inner.free.pop()?;
        ShardMetrics::inc(&inner.metrics.buffers_in_use);
        drop(inner);
        Some(PoolBuf { buf: Some(buf), pool: self.clone() })
    }

    /// Takes a buffer, waiting for one to come back if the pool is empty.
    pub async fn take(&self) -> PoolBuf {
        let mut counted = false;
        std::future::poll_fn(|cx| {
            if let Some(b) = self.try_take() {
                return Poll::Ready(b);
            }
            let mut inner = self.0.borrow_mut();
            if !counted {
                inner.exhausted_events += 1;
                ShardMetrics::inc(&inner.metrics.pool_exhausted_total);
                counted = true;
            }
            inner.waiters.push_back(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl PoolBuf {
    pub fn vec(&mut self) -> &mut Vec<u8> {
        let size = self.pool.size();
        self.buf.get_or_insert_with(|| Vec::with_capacity(size))
    }

    /// Moves the Vec out (for an owned-buffer I/O call); give it back with `restore`.
    pub fn lend(&mut self) -> Vec<u8> {
        let size = self.pool.size();
        self.buf.take().unwrap_or_else(|| Vec::with_capacity(size))
    }

    /// Gives back what `lend` took. A Vec smaller than a pool buffer (the
    /// real one was lost to a cancelled I/O call) is not taken: the pool
    /// must only ever hold full-size buffers, or a later read into it would
    /// find no room.
    pub fn restore(&mut self, v: Vec<u8>) {
        self.buf = (v.capacity() >= self.pool.size()).then_some(v);
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let mut inner = self.pool.0.borrow_mut();
        // A buffer lent to an I/O call that never gave it back is replaced, so
        // the pool keeps its size.
        let size = inner.size;
        let mut b = self.buf.take().filter(|b| b.capacity() >= size).unwrap_or_else(|| Vec::with_capacity(size));
        b.clear();
        if b.capacity() > inner.size * 2 {
            b.shrink_to(inner.size);
        }
        inner.free.push(b);
        ShardMetrics::dec(&inner.metrics.buffers_in_use);
        if let Some(w) = inner.waiters.pop_front() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_return() {
        let m = Arc::new(ShardMetrics::default());
        let p = Pool::new(2, MIN_BUFFER, m.clone());
        let a = p.try_take().unwrap();
        let _b = p.try_take().unwrap();
        assert!(p.try_take().is_none());
        assert_eq!(m.buffers_in_use.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(p.available(), 1);
        assert_eq!(m.buffers_in_use.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(p.try_take().unwrap().buf.as_ref().unwrap().capacity() >= MIN_BUFFER);
        // A buffer lent out and lost (a failed I/O call) is replaced.
        let mut c = p.try_take().unwrap();
        drop(c.lend());
        drop(c);
        assert_eq!(p.available(), 1, "one back, `_b` still lent");
        assert_eq!(m.buffers_in_use.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// A cancelled write (a device that stopped reading) gives back an
    /// empty Vec in place of its buffer: the pool must not keep it, or the
    /// next connection to take it could not read at all.
    #[test]
    fn a_buffer_lost_to_a_cancelled_call_is_replaced_full_size() {
        let m = Arc::new(ShardMetrics::default());
        let p = Pool::new(1, MIN_BUFFER, m);
        let mut a = p.try_take().unwrap();
        let _lost = a.lend();
        a.restore(Vec::new());
        assert!(a.vec().capacity() >= MIN_BUFFER);
        a.restore(Vec::new());
        drop(a);
        let mut b = p.try_take().unwrap();
        assert!(b.vec().capacity() >= MIN_BUFFER, "a zero-capacity buffer went back into the pool");
    }
}
