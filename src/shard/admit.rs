//! Admission control, shard side: performing what `admission` decides.
//!
//! Owns: the shard's handshake rate and count (the accept loop waits for a
//! turn, leaving connections in the kernel's accept queue), the node-wide
//! count of connections against `admission.max_connections` and the
//! process's resident memory against `max_memory_mb` (read at most every
//! [`MEMORY_EVERY`]), the shard's open queue and the task that hands out
//! its turns and wakes the devices waiting for them, and the open turns of
//! resumed streams. Never parses or answers a device: the set-up machine
//! answers a shed device (`Setup::on_shed`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::admission::bucket::Bucket;
use crate::admission::queue::{Enter, OpenQueue, Ticket};
use crate::admission::{Share, Shed};
use crate::config::admission::Admission;
use crate::metrics::ShardMetrics;

/// How stale the memory reading may be.
pub const MEMORY_EVERY: Duration = Duration::from_millis(100);
/// How often an accept loop waiting for a handshake slot looks again.
const SLOT_POLL: Duration = Duration::from_millis(2);

/// What every shard of the node shares: the count of connections held
/// (admitted ones, set-up and established), one atomic.
#[derive(Debug, Default)]
pub struct Node {
    pub connections: AtomicU64,
}

/// A waiting device's turn: `None` while it waits, then whether it may open.
#[derive(Default)]
struct Slot {
    outcome: Cell<Option<bool>>,
    waker: Cell<Option<Waker>>,
}

pub struct Admit {
    limits: RefCell<(Admission, Share)>,
    handshakes: RefCell<Option<Bucket>>,
    handshaking: Cell<u32>,
    node: Arc<Node>,
    memory: Cell<(u64, Option<Instant>)>,
    opens: RefCell<OpenQueue>,
    slots: RefCell<HashMap<Ticket, Rc<Slot>>>,
    dispatching: Cell<bool>,
    metrics: Arc<ShardMetrics>,
}

impl Admit {
    pub fn new(a: &Admission, shards: usize, node: Arc<Node>, metrics: Arc<ShardMetrics>) -> Admit {
        let now = Instant::now();
        let share = Share::of(a, shards);
        Admit {
            handshakes: RefCell::new(share.handshakes_per_sec.map(|r| Bucket::new(r, now))),
            opens: RefCell::new(OpenQueue::new(share.wsm_opens_per_sec, share.wsm_open_queue, a.wsm_open_wait, now)),
            limits: RefCell::new((a.clone(), share)),
            handshaking: Cell::new(0),
            node,
            memory: Cell::new((0, None)),
            slots: RefCell::default(),
            dispatching: Cell::new(false),
            metrics,
        }
    }

    /// A reload's limits, from now on.
    pub fn set_limits(&self, a: &Admission, shards: usize) {
        let now = Instant::now();
        let share = Share::of(a, shards);
        Bucket::retune(&mut self.handshakes.borrow_mut(), share.handshakes_per_sec, now);
        self.opens.borrow_mut().set_limits(share.wsm_opens_per_sec, share.wsm_open_queue, a.wsm_open_wait, now);
        *self.limits.borrow_mut() = (a.clone(), share);
    }

    /// Waits until the shard may start another handshake: a token of its
    /// handshake rate and a free handshake slot. Meanwhile connections stay
    /// in the kernel's accept queue. `stop` ends the wait early.
    pub async fn accept_turn(&self, stop: &Cell<bool>) {
        let mut counted = false;
        loop {
            let max = self.limits.borrow().1.max_handshaking;
            let now = Instant::now();
            let wait = if max.is_some_and(|m| self.handshaking.get() >= m) {
                Some(now + SLOT_POLL)
            } else {
                self.handshakes.borrow_mut().as_mut().map(|b| b.next_at(now)).filter(|at| *at > now)
            };
            let Some(until) = wait else { return };
            if !counted {
                ShardMetrics::inc(&self.metrics.accepts_deferred_total);
                counted = true;
            }
            if stop.get() {
                return;
            }
            monoio::time::sleep_until(until.into()).await;
        }
    }

    /// A connection was accepted: it takes its handshake token and slot.
    pub fn handshake_started(&self) {
        if let Some(b) = self.handshakes.borrow_mut().as_mut() {
            b.take(Instant::now());
        }
        self.handshaking.set(self.handshaking.get() + 1);
        ShardMetrics::inc(&self.metrics.handshaking);
    }

    /// Its handshake is over (done or failed): the slot is free.
    pub fn handshake_ended(&self) {
        self.handshaking.set(self.handshaking.get().saturating_sub(1));
        ShardMetrics::dec(&self.metrics.handshaking);
    }

    /// A new connection: counted for the node, or shed if the node is at
    /// its connection limit or memory budget (`Err`: not counted).
    pub fn admit(&self) -> Result<(), Shed> {
        let (max, budget) = {
            let l = self.limits.borrow();
            (l.0.max_connections, l.0.max_memory_bytes)
        };
        if let Some(b) = budget
            && self.memory_now() > b
        {
            return Err(Shed::Memory);
        }
        let before = self.node.connections.fetch_add(1, Relaxed);
        if max.is_some_and(|m| before >= m) {
            self.node.connections.fetch_sub(1, Relaxed);
            return Err(Shed::MaxConnections);
        }
        Ok(())
    }

    /// A connection counted without a check (adopted from a previous process).
    pub fn count(&self) {
        self.node.connections.fetch_add(1, Relaxed);
    }

    /// A counted connection ended.
    pub fn release(&self) {
        self.node.connections.fetch_sub(1, Relaxed);
    }

    fn memory_now(&self) -> u64 {
        let now = Instant::now();
        match self.memory.get() {
            (bytes, Some(at)) if now.duration_since(at) < MEMORY_EVERY => bytes,
            _ => {
                let bytes = resident_bytes();
                self.memory.set((bytes, Some(now)));
                bytes
            }
        }
    }

    /// The `Retry-After` for a shed device (jittered per device).
    pub fn retry_after(&self) -> u32 {
        crate::admission::retry_after(&self.limits.borrow().0, rand())
    }

    /// Waits for a turn to open a new stream on a WSM (the device waits,
    /// its upgrade pending). `Err`: shed (the queue is full or the wait too
    /// long).
    pub async fn open_turn(self: &Rc<Self>) -> Result<(), Shed> {
        let ticket = match self.opens.borrow_mut().enter(Instant::now()) {
            Enter::Now => {
                ShardMetrics::inc(&self.metrics.wsm_opens_total);
                return Ok(());
            }
            Enter::Full => return Err(Shed::QueueFull),
            Enter::Wait(t) => t,
        };
        let slot = Rc::new(Slot::default());
        self.slots.borrow_mut().insert(ticket, slot.clone());
        self.metrics.wsm_open_queue.store(self.opens.borrow().len() as u64, Relaxed);
        if !self.dispatching.replace(true) {
            monoio::spawn(dispatch(self.clone()));
        }
        let waiting = Waiting { admit: self, ticket, slot: slot.clone() };
        let granted = std::future::poll_fn(|cx| match slot.outcome.get() {
            Some(ok) => Poll::Ready(ok),
            None => {
                slot.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
        drop(waiting);
        if granted {
            ShardMetrics::inc(&self.metrics.wsm_opens_total);
            ShardMetrics::inc(&self.metrics.wsm_open_waited_total);
            Ok(())
        } else {
            Err(Shed::WaitExpired)
        }
    }

    /// A resumed stream's turn (it goes before waiting devices; `false`:
    /// try again at the tunnel's next tick).
    pub fn resume_turn(&self) -> bool {
        let ok = self.opens.borrow_mut().take_resume(Instant::now());
        if ok {
            ShardMetrics::inc(&self.metrics.wsm_opens_total);
        }
        ok
    }
}

/// A device's place in the open queue while its task waits; a task that
/// ends while waiting gives its place up.
struct Waiting<'a> {
    admit: &'a Admit,
    ticket: Ticket,
    slot: Rc<Slot>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.slot.outcome.get().is_none() {
            self.admit.opens.borrow_mut().abandon(self.ticket);
            self.admit.slots.borrow_mut().remove(&self.ticket);
            self.admit.metrics.wsm_open_queue.store(self.admit.opens.borrow().len() as u64, Relaxed);
        }
    }
}

/// Runs while devices wait: hands out turns as the rate allows, sheds
/// those that waited too long, and sleeps until the next of either.
async fn dispatch(admit: Rc<Admit>) {
    loop {
        let now = Instant::now();
        let (granted, expired, next) = {
            let mut q = admit.opens.borrow_mut();
            let g = q.grant(now);
            let e = q.expired(now);
            (g, e, q.next_wake(now))
        };
        for (list, ok) in [(granted, true), (expired, false)] {
            for t in list {
                if let Some(slot) = admit.slots.borrow_mut().remove(&t) {
                    slot.outcome.set(Some(ok));
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                }
            }
        }
        admit.metrics.wsm_open_queue.store(admit.opens.borrow().len() as u64, Relaxed);
        match next {
            Some(at) => monoio::time::sleep_until(at.max(now + Duration::from_micros(100)).into()).await,
            None => {
                admit.dispatching.set(false);
                return;
            }
        }
    }
}

/// Uniform in `0..u32::MAX`.
fn rand() -> u32 {
    monoio::utils::thread_rng_n(u32::MAX)
}

/// The process's resident memory (`/proc/self/statm`), 0 if unreadable.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    pages * page
}
