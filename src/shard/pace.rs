//! Pacing a live upgrade's hand-over on one shard.
//!
//! Owns: asking the shard's tunnels to move to the new process a window at
//! a time (`upgrade.moving_per_shard`), and [`Flight`], the process-wide
//! count of connections released here but not yet serving in the new
//! process. A tunnel stops reading its device from the moment it is asked
//! until the new process serves it, so asking all of them at once would
//! make every device wait for the whole upgrade; a window keeps each
//! device's pause to about its size divided by the move rate, while the
//! pipeline (WSM acknowledgements, snapshots, the channel, adoption) stays
//! full. The flight gate extends the window across the process boundary:
//! when the new process adopts more slowly than this one releases, no more
//! tunnels are asked until it catches up, so its backlog cannot lengthen
//! the pause either. A tunnel that takes longer than [`SLOW`] (a device that
//! does not read, a WSM that does not acknowledge) stops holding its place,
//! so it cannot stall the rest; a new process that reports no progress for
//! [`STALLED`] stops holding the gate. Never moves a tunnel itself: each
//! tunnel does that at its own safe point.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ShardCtx;
use super::link::StreamShared;

/// After this long a moving tunnel no longer counts against the window.
const SLOW: Duration = Duration::from_millis(100);
/// How often the window is topped up.
const STEP: Duration = Duration::from_millis(1);
/// A closed flight gate opens anyway after this long without progress.
const STALLED: Duration = Duration::from_secs(1);

/// Connections between this process and serving in the new one, shared by
/// the shards (which release) and the upgrade coordinator (which hears how
/// many the new process has adopted).
#[derive(Debug)]
pub struct Flight {
    /// Sent towards the new process by this process's tunnels.
    pub released: AtomicU64,
    /// Serving (or failed to resume) in the new process, as it reports.
    pub adopted: AtomicU64,
    /// Most connections in flight at once.
    pub limit: u64,
}

impl Flight {
    pub fn new(limit: u64) -> Flight {
        Flight { released: AtomicU64::new(0), adopted: AtomicU64::new(0), limit: limit.max(1) }
    }

    pub fn in_flight(&self) -> u64 {
        self.released.load(Ordering::Relaxed).saturating_sub(self.adopted.load(Ordering::Relaxed))
    }
}

/// The flight gate as one shard sees it.
struct Gate {
    flight: std::sync::Arc<Flight>,
    last_adopted: u64,
    last_progress: Instant,
    forced: bool,
}

impl Gate {
    fn open(&mut self, now: Instant) -> bool {
        let adopted = self.flight.adopted.load(Ordering::Relaxed);
        if adopted != self.last_adopted {
            self.last_adopted = adopted;
            self.last_progress = now;
        }
        if self.flight.in_flight() < self.flight.limit {
            return true;
        }
        if now.duration_since(self.last_progress) >= STALLED {
            if !self.forced {
                tracing::warn!(
                    in_flight = self.flight.in_flight(),
                    "the new process reports no progress; moving on without waiting for it"
                );
                self.forced = true;
            }
            return true;
        }
        false
    }
}

type Stream = Weak<RefCell<StreamShared>>;

/// The window itself, without the runtime: which tunnels to ask next.
pub struct Window {
    queue: VecDeque<Stream>,
    moving: Vec<(Stream, Instant)>,
    size: usize,
}

impl Window {
    pub fn new(streams: impl IntoIterator<Item = Stream>, size: usize) -> Window {
        Window { queue: streams.into_iter().collect(), moving: Vec::new(), size: size.max(1) }
    }

    /// Forgets tunnels that have moved (or ended) and asks more, up to the
    /// window. Returns how many were asked.
    pub fn top_up(&mut self, now: Instant) -> usize {
        self.forget_moved(now);
        let mut asked = 0;
        while self.moving.len() < self.size {
            let Some(w) = self.queue.pop_front() else { break };
            let Some(s) = w.upgrade() else { continue };
            let mut st = s.borrow_mut();
            st.handoff_requested = true;
            st.wake();
            drop(st);
            self.moving.push((w, now));
            asked += 1;
        }
        asked
    }

    /// Forgets tunnels that have moved (or ended, or are slow).
    pub fn forget_moved(&mut self, now: Instant) {
        // A stream is gone once its tunnel and its link have let go of it.
        self.moving.retain(|(s, at)| s.strong_count() > 0 && now.duration_since(*at) < SLOW);
    }

    /// Every tunnel has been asked and none is still moving.
    pub fn done(&self) -> bool {
        self.queue.is_empty() && self.moving.is_empty()
    }
}

/// Runs on the shard during an upgrade: asks its tunnels to move, a window
/// at a time, until all have been asked and have moved, or the upgrade is
/// called off (the new process went away).
pub async fn hand_over_all(ctx: Rc<ShardCtx>, flight: std::sync::Arc<Flight>) {
    let streams: Vec<Stream> = ctx.links.borrow().iter().flat_map(|l| l.stream_refs()).collect();
    let total = streams.len();
    let started = Instant::now();
    let mut w = Window::new(streams, ctx.current().cfg.upgrade_moving_per_shard);
    let mut gate = Gate { flight, last_adopted: 0, last_progress: started, forced: false };
    tracing::info!(shard = ctx.index, tunnels = total, window = w.size, "handing connections over");
    while ctx.handoff.borrow().is_some() {
        let now = Instant::now();
        if gate.open(now) {
            w.top_up(now);
        } else {
            w.forget_moved(now);
        }
        if w.done() {
            tracing::info!(
                shard = ctx.index,
                tunnels = total,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "every tunnel asked to move"
            );
            return;
        }
        monoio::time::sleep(STEP).await;
    }
    tracing::warn!(shard = ctx.index, "upgrade called off; the remaining tunnels stay here");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Rc<RefCell<StreamShared>> {
        Rc::new(RefCell::new(StreamShared::default()))
    }

    #[test]
    fn asks_a_window_at_a_time_and_refills_as_tunnels_move() {
        let mut held: Vec<_> = (0..5).map(|_| Some(stream())).collect();
        let mut w = Window::new(held.iter().flatten().map(Rc::downgrade), 2);
        let t0 = Instant::now();
        assert_eq!(w.top_up(t0), 2);
        assert!(held[0].as_ref().unwrap().borrow().handoff_requested);
        assert!(!held[2].as_ref().unwrap().borrow().handoff_requested);
        assert_eq!(w.top_up(t0), 0, "the window is full");
        held[0] = None; // moved: its tunnel and link let go
        assert_eq!(w.top_up(t0), 1);
        assert!(held[2].as_ref().unwrap().borrow().handoff_requested);
        // A stream that ended before its turn is skipped.
        held[3] = None;
        held[1] = None;
        assert_eq!(w.top_up(t0), 1);
        assert!(held[4].as_ref().unwrap().borrow().handoff_requested);
        held[2] = None;
        held[4] = None;
        w.top_up(t0);
        assert!(w.done());
    }

    #[test]
    fn the_gate_closes_while_the_new_process_lags_and_opens_when_it_stalls() {
        let flight = std::sync::Arc::new(Flight::new(2));
        let t0 = Instant::now();
        let mut g = Gate { flight: flight.clone(), last_adopted: 0, last_progress: t0, forced: false };
        assert!(g.open(t0));
        flight.released.store(2, Ordering::Relaxed);
        assert!(!g.open(t0), "two in flight: wait for the new process");
        flight.adopted.store(1, Ordering::Relaxed);
        assert!(g.open(t0 + Duration::from_millis(5)));
        flight.released.store(3, Ordering::Relaxed);
        assert!(!g.open(t0 + Duration::from_millis(500)));
        assert!(g.open(t0 + Duration::from_millis(5) + STALLED), "no progress for a second: go on regardless");
    }

    #[test]
    fn a_slow_tunnel_stops_holding_its_place() {
        let held: Vec<_> = (0..3).map(|_| stream()).collect();
        let mut w = Window::new(held.iter().map(Rc::downgrade), 1);
        let t0 = Instant::now();
        assert_eq!(w.top_up(t0), 1);
        assert_eq!(w.top_up(t0 + SLOW / 2), 0);
        assert_eq!(w.top_up(t0 + SLOW), 1, "the stuck one no longer blocks the next");
        assert!(held[1].borrow().handoff_requested);
        assert!(!w.done());
    }
}
