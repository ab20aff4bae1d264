//! Re-attaching tunnels to other WSMs, shard side: pacing and goaway.
//!
//! Owns: the shard's resume pacer ([`Pacer`]: re-opens after a failure are
//! paced per shard so a surviving WSM is not stormed), and the watcher
//! that, when a link's WSM sends goaway or its address leaves the DNS pool,
//! asks that link's tunnels to move by plan at the shard's paced rate and
//! forgets retired links once their streams are gone. What a held tunnel
//! keeps and when it gives up is the tunnel core's (`session::tunnel`);
//! the tunnel shell asks for a turn here. Never reads or writes a device.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::ShardCtx;
use crate::admission::bucket::Bucket;

/// Re-opens allowed per second on one shard, as a token bucket holding at
/// most a quarter of a second's worth (the shard's timers tick every 250 ms).
pub struct Pacer(RefCell<Bucket>);

/// What the pacer saves up.
const PACER_BURST: Duration = Duration::from_millis(250);

impl Pacer {
    pub fn new(per_sec: u32) -> Pacer {
        Pacer(RefCell::new(Bucket::with_burst(per_sec.max(1) as f64, PACER_BURST, Instant::now())))
    }

    /// A reload's new rate, from now on.
    pub fn set_rate(&self, per_sec: u32) {
        self.0.borrow_mut().set_rate(per_sec.max(1) as f64, Instant::now());
    }

    pub fn try_take(&self, now: Instant) -> bool {
        self.0.borrow_mut().take(now)
    }
}

/// Runs on each shard: when a link's WSM sends goaway (or its address left
/// the pool), asks that link's tunnels to move, at the shard's re-open rate;
/// closes and forgets retired links once their streams are gone. Looks
/// every 20 ms while some link is being emptied; otherwise it sleeps until
/// a link raises the shard's attention flag.
pub async fn watch_goaway(ctx: Rc<ShardCtx>) {
    // Links being emptied, by identity and connection generation.
    let mut moving: Vec<(*const super::link::Link, u64)> = Vec::new();
    loop {
        let busy = !moving.is_empty() || ctx.links.borrow().iter().any(|l| l.retired() || l.going_away());
        if busy {
            monoio::time::sleep(Duration::from_millis(20)).await;
        } else {
            ctx.link_attention.wait().await;
        }
        let links: Vec<_> = ctx.links.borrow().clone();
        for link in &links {
            let key = (Rc::as_ptr(link), link.generation());
            if link.going_away() && !moving.contains(&key) {
                moving.push(key);
                monoio::spawn(move_streams(ctx.clone(), link.clone()));
            }
        }
        moving.retain(|(p, g)| links.iter().any(|l| Rc::as_ptr(l) == *p && l.generation() == *g));
        ctx.links.borrow_mut().retain(|l| !l.close_if_done());
    }
}

async fn move_streams(ctx: Rc<ShardCtx>, link: Rc<super::link::Link>) {
    let streams = link.stream_refs();
    tracing::info!(shard = ctx.index, host = %link.host, streams = streams.len(), "WSM going away: moving its streams");
    for w in streams {
        loop {
            if !link.going_away() {
                return;
            }
            if ctx.pick_link().is_none() {
                // Nowhere to go yet: wait for another WSM.
                monoio::time::sleep(Duration::from_millis(100)).await;
            } else if ctx.resumes.try_take(Instant::now()) {
                break;
            } else {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if !link.going_away() {
            return; // the link went down (streams resume as lost) or came back
        }
        if let Some(s) = w.upgrade() {
            let mut s = s.borrow_mut();
            s.move_requested = true;
            s.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_allows_its_rate_and_no_burst_beyond_a_quarter_second() {
        let p = Pacer::new(400);
        let t0 = Instant::now();
        let first = (0..1000).filter(|_| p.try_take(t0)).count();
        assert_eq!(first, 100, "a quarter of a second's worth at once");
        assert!(!p.try_take(t0));
        let later = (0..1000).filter(|_| p.try_take(t0 + Duration::from_millis(50))).count();
        assert_eq!(later, 20, "then 400 per second");
        assert!(Pacer::new(0).try_take(t0 + Duration::from_secs(1)), "at least one per second");
    }
}
