//! Re-attaching a tunnel to another WSM when its own goes away.
//!
//! Owns: the state of a tunnel whose stream has no WSM ([`Held`]): the
//! device messages kept for it, in order, until another WSM takes the
//! stream; re-opening the stream elsewhere with the `resumed` flag and the
//! same connection ID; and giving up with 1013 once `resume_timeout` (plus
//! a random share of `close_spread`) has passed. Three ways in: a link that
//! dies (reset, or silent past the liveness timeout), where the messages the
//! dead WSM had not acknowledged with credit are sent again, first; a WSM's
//! goaway or its address leaving the DNS pool, where each stream is moved by
//! plan (HANDOFF, its ack, then a CLOSE "handed elsewhere") at the shard's
//! paced rate, so nothing is lost or sent twice; and a connection adopted
//! in a live upgrade, which starts here and re-opens at once. Re-opens after
//! a failure are paced per shard ([`Pacer`]) so a surviving WSM is not
//! stormed. Never reads or writes the device itself: the tunnel loop keeps
//! doing that, holding messages here instead of sending them.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::ShardCtx;
use super::conn::{Device, End};
use super::link::OpenResult;
use super::tunnel::Tunnel;
use crate::identity::DeviceIdentity;
use crate::link::codec::{CloseReason, Open};
use crate::metrics::ShardMetrics;
use crate::ws::frame::close;

/// Where a held tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No stream: waiting for a link and a turn.
    Waiting,
    /// OPEN (resumed) sent at this time; waiting for ACCEPT.
    Opening(Instant),
    /// Accepted: sending the held messages as credit allows.
    Flushing,
}

/// A tunnel without a (working) WSM stream.
pub struct Held {
    msgs: VecDeque<(bool, Vec<u8>)>,
    bytes: usize,
    phase: Phase,
    /// When the device is told 1013 if no WSM has taken the stream.
    close_at: Instant,
    /// Moved by plan: the move itself was paced, re-open without a turn.
    planned: bool,
    /// Adopted in a live upgrade: its acceptance is what the old process
    /// waits for (`connections_resumed_total`).
    adopted: bool,
}

impl Held {
    /// Whether the tunnel's current stream exists on a link (opening or
    /// accepted), so ending the tunnel must close it there.
    pub fn has_stream(&self) -> bool {
        !matches!(self.phase, Phase::Waiting)
    }

    /// Whether the tunnel's current stream has been accepted by a WSM.
    pub fn accepted(&self) -> bool {
        self.phase == Phase::Flushing
    }
}

/// Re-opens allowed per second on one shard, as a token bucket holding at
/// most a quarter of a second's worth (the shard's timers tick every 250 ms).
pub struct Pacer {
    per_sec: f64,
    tokens: Cell<f64>,
    last: Cell<Instant>,
}

impl Pacer {
    pub fn new(per_sec: u32) -> Pacer {
        let per_sec = per_sec.max(1) as f64;
        Pacer { per_sec, tokens: Cell::new(per_sec / 4.0), last: Cell::new(Instant::now()) }
    }

    pub fn try_take(&self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last.get()).as_secs_f64() * self.per_sec;
        let tokens = (self.tokens.get() + refill).min((self.per_sec / 4.0).max(1.0));
        self.last.set(now);
        if tokens >= 1.0 {
            self.tokens.set(tokens - 1.0);
            true
        } else {
            self.tokens.set(tokens);
            false
        }
    }
}

/// The stream's WSM is gone (`planned`: it moved by plan and everything sent
/// was processed). Keeps what the WSM may not have processed, to send again.
pub fn detach(dev: &Device, t: &mut Tunnel, planned: bool) {
    let cfg = &dev.shard.cfg.upstream;
    let spread = cfg.close_spread.as_millis() as u32;
    let jitter = Duration::from_millis(monoio::utils::thread_rng_n(spread.max(1)) as u64);
    let now = Instant::now();
    let unacked = std::mem::take(&mut t.stream.borrow_mut().unacked);
    let mut h = match t.held.take() {
        // Lost again while re-opening or flushing: keep the deadline.
        Some(mut h) => {
            h.phase = Phase::Waiting;
            h
        }
        None => {
            ShardMetrics::inc(&dev.shard.metrics.streams_detached_total);
            Box::new(Held {
                msgs: VecDeque::new(),
                bytes: 0,
                phase: Phase::Waiting,
                close_at: now + cfg.resume_timeout + jitter,
                planned,
                adopted: false,
            })
        }
    };
    if !planned && !unacked.is_empty() {
        // Oldest first, ahead of anything held since.
        let n: usize = unacked.iter().map(|(_, m)| m.len()).sum();
        dev.shard.metrics.messages_resent_total.fetch_add(unacked.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for m in unacked.into_iter().rev() {
            h.msgs.push_front(m);
        }
        h.bytes += n;
        add_held(&dev.shard, n as i64);
    }
    t.held = Some(h);
}

/// Holds a device message for a tunnel with no WSM.
pub fn hold(dev: &Device, h: &mut Held, binary: bool, data: Vec<u8>) {
    h.bytes += data.len();
    add_held(&dev.shard, data.len() as i64);
    h.msgs.push_back((binary, data));
}

/// Whether a held tunnel may read more from its device: within its own and
/// the shard's bound. Beyond them the device waits (TCP backpressure).
pub fn can_read(dev: &Device, h: &Held) -> bool {
    let cfg = &dev.shard.cfg.upstream;
    h.bytes < cfg.held_bytes_per_connection && dev.shard.held_bytes.get() + dev.shard.held_reserved.get() < cfg.held_bytes_per_shard
}

/// When the tunnel should look again (a turn, an open timeout, the 1013).
pub fn next_wake(dev: &Device, h: &Held) -> Instant {
    let now = Instant::now();
    match h.phase {
        Phase::Opening(at) => (at + dev.shard.cfg.upstream.open_timeout).min(h.close_at),
        Phase::Flushing => now + Duration::from_secs(3600),
        Phase::Waiting => (now + super::timers::TICK).min(h.close_at),
    }
}

fn add_held(shard: &ShardCtx, n: i64) {
    let v = (shard.held_bytes.get() as i64 + n).max(0) as u64;
    shard.held_bytes.set(v);
    shard.metrics.held_bytes.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Forgets whatever a tunnel still holds (it is ending).
pub fn release(dev: &Device, t: &mut Tunnel) {
    if let Some(h) = t.held.take() {
        add_held(&dev.shard, -(h.bytes as i64));
    }
}

/// Moves a held tunnel on: finishes an open, sends held messages, opens on
/// another link when it is this tunnel's turn, or gives up with 1013.
pub async fn step(dev: &mut Device, t: &mut Tunnel) -> Option<End> {
    let now = Instant::now();
    let h = t.held.as_mut()?;
    if h.phase != Phase::Flushing && dev.shard.handoff.borrow().is_some() {
        // A live upgrade is under way and this tunnel is on no link, so the
        // upgrade's pacing cannot reach it: it moves as it is, held messages
        // and all.
        let mut s = t.stream.borrow_mut();
        s.handoff_requested = true;
        s.wake();
        return None;
    }
    if let Phase::Opening(sent) = h.phase {
        let (opened, gone) = {
            let s = t.stream.borrow();
            (s.opened.clone(), s.link_lost || s.wsm_close.is_some())
        };
        match opened {
            Some(OpenResult::Accepted(_)) => h.phase = Phase::Flushing,
            Some(OpenResult::Refused(status, reason)) => {
                tracing::debug!(conn = %dev.id, status, %reason, "resumed stream refused; trying another WSM");
                h.phase = Phase::Waiting;
            }
            None if gone => h.phase = Phase::Waiting,
            None if now >= sent + dev.shard.cfg.upstream.open_timeout => {
                t.link.close_stream(t.sid, CloseReason::Error, close::INTERNAL, "resume timeout");
                h.phase = Phase::Waiting;
            }
            None => return None,
        }
    }
    if h.phase == Phase::Flushing {
        while t.link.can_send(&t.stream.borrow()) {
            let Some((binary, m)) = h.msgs.pop_front() else { break };
            h.bytes -= m.len();
            add_held(&dev.shard, -(m.len() as i64));
            // The new WSM may take smaller frames than the one that died.
            if !t.link.fits(m.len()) {
                dev.shard.metrics.ws_error(close::TOO_BIG);
                dev.send_close(&mut t.rl, close::TOO_BIG, "message too big for the WSM").await;
                return Some(End::Ws(crate::ws::frame::WsError { code: close::TOO_BIG, reason: "message too big for the WSM" }));
            }
            t.link.send_message(&mut t.stream.borrow_mut(), binary, &m);
        }
        if h.msgs.is_empty() {
            let m = &dev.shard.metrics;
            ShardMetrics::inc(if h.adopted { &m.connections_resumed_total } else { &m.streams_resumed_total });
            t.held = None;
        }
        return None;
    }
    if now >= h.close_at {
        let m = &dev.shard.metrics;
        ShardMetrics::inc(if h.adopted { &m.connections_resume_failed_total } else { &m.streams_resume_failed_total });
        dev.send_close(&mut t.rl, close::TRY_AGAIN, "no WSM available").await;
        return Some(End::NoWsm);
    }
    if !h.planned && !dev.shard.resumes.try_take(now) {
        return None;
    }
    let link = dev.shard.pick_link()?;
    let Some(device) = DeviceIdentity::from_chain(t.resume.chain.clone(), dev.addr) else {
        dev.send_close(&mut t.rl, close::INTERNAL, "identity lost").await;
        return Some(End::NoWsm);
    };
    let open = Open { resumed: true, connection_id: dev.id, device, request: t.resume.request.clone() };
    let stream = link.open_stream(open)?;
    t.sid = stream.borrow().stream_id;
    t.stream = stream;
    t.link = link;
    h.phase = Phase::Opening(now);
    None
}

/// Goaway: moves this tunnel's stream to another WSM by plan. The WSM stops
/// sending and acknowledges (what it sent first reaches the device), the
/// stream closes as "handed elsewhere", and the tunnel re-opens elsewhere.
pub async fn move_by_plan(dev: &mut Device, t: &mut Tunnel) -> Option<End> {
    t.stream.borrow_mut().move_requested = false;
    // Stay put unless another WSM can take the stream now: a lone WSM that
    // drains keeps its streams until it really goes.
    if t.held.is_some() || !t.link.going_away() || dev.shard.pick_link().is_none() {
        return None;
    }
    if let Some(end) = super::tunnel::quiesce(dev, t).await {
        return Some(end);
    }
    ShardMetrics::inc(&dev.shard.metrics.streams_moved_total);
    leave_quiesced(dev, t);
    step(dev, t).await
}

/// After a HANDOFF was acknowledged: the WSM has processed everything sent
/// before it and sends nothing more, so the stream is closed as handed
/// elsewhere and re-opened (resumed, paced) on a link.
pub fn leave_quiesced(dev: &Device, t: &mut Tunnel) {
    t.stream.borrow_mut().unacked.clear();
    t.link.close_stream(t.sid, CloseReason::HandedElsewhere, 1000, "");
    detach(dev, t, true);
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

/// A connection adopted from a previous process (live upgrade): it starts
/// without a stream, with the messages the old process held for it, and
/// re-opens at once (the upgrade paced itself); the device is read from
/// now on, its messages held until the WSM accepts.
pub fn adopt(dev: &Device, t: &mut Tunnel, msgs: Vec<(bool, Vec<u8>)>) {
    let bytes = msgs.iter().map(|(_, m)| m.len()).sum();
    add_held(&dev.shard, bytes as i64);
    let close_at = Instant::now() + dev.shard.cfg.upstream.resume_timeout;
    t.held = Some(Box::new(Held { msgs: msgs.into(), bytes, phase: Phase::Waiting, close_at, planned: true, adopted: true }));
}

/// For a snapshot: a copy of the held messages. Nothing changes until the
/// snapshot is sent ([`handed_over`]): a hand-over that fails keeps them.
pub fn held_for_snapshot(t: &Tunnel) -> Vec<(bool, Vec<u8>)> {
    t.held.as_ref().map(|h| h.msgs.iter().cloned().collect()).unwrap_or_default()
}

/// After the snapshot went to the new process: lets go of the held messages
/// (they travel with it) and of a stream still being opened.
pub fn handed_over(dev: &Device, t: &mut Tunnel) {
    if let Some(h) = t.held.take() {
        add_held(&dev.shard, -(h.bytes as i64));
        if let Phase::Opening(_) = h.phase {
            t.link.close_stream(t.sid, CloseReason::HandedElsewhere, 1000, "");
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
