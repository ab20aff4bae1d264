//! Pacing a live upgrade's hand-over on one shard.
//!
//! Owns: asking the shard's tunnels to move to the new process a window at
//! a time (`upgrade.moving_per_shard`). A tunnel stops reading its device
//! from the moment it is asked until the new process serves it, so asking
//! all of them at once would make every device wait for the whole upgrade;
//! a window keeps each device's pause to about its size divided by the move
//! rate, while the pipeline (WSM acknowledgements, snapshots, the channel,
//! adoption) stays full. A tunnel that takes longer than [`SLOW`] (a device
//! that does not read, a WSM that does not acknowledge) stops holding its
//! place in the window, so it cannot stall the rest. Never moves a tunnel
//! itself: each tunnel does that at its own safe point.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use super::ShardCtx;
use super::link::StreamShared;

/// After this long a moving tunnel no longer counts against the window.
const SLOW: Duration = Duration::from_millis(100);
/// How often the window is topped up.
const STEP: Duration = Duration::from_millis(1);

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
        // A stream is gone once its tunnel and its link have let go of it.
        self.moving.retain(|(s, at)| s.strong_count() > 0 && now.duration_since(*at) < SLOW);
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

    /// Every tunnel has been asked and none is still moving.
    pub fn done(&self) -> bool {
        self.queue.is_empty() && self.moving.is_empty()
    }
}

/// Runs on the shard during an upgrade: asks its tunnels to move, a window
/// at a time, until all have been asked and have moved, or the upgrade is
/// called off (the new process went away).
pub async fn hand_over_all(ctx: Rc<ShardCtx>) {
    let streams: Vec<Stream> = ctx.links.iter().flat_map(|l| l.stream_refs()).collect();
    let total = streams.len();
    let started = Instant::now();
    let mut w = Window::new(streams, ctx.cfg.upgrade_moving_per_shard);
    tracing::info!(shard = ctx.index, tunnels = total, window = w.size, "handing connections over");
    while ctx.handoff.borrow().is_some() {
        w.top_up(Instant::now());
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
