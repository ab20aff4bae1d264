//! The established phase of a device connection, shell side: runs the
//! sans-io tunnel (`session::tunnel`) against the device socket and the
//! tunnel's stream on a WSM link.
//!
//! Owns: which link and stream carry the tunnel ([`Live`]); its *bursts*
//! (read if the core wants it, hand the core what the device and the WSM
//! sent, perform its actions), each run by a task made for it; and between
//! bursts its *wait* for the socket, the link or a timer, kept with the
//! tunnel's state in the shard's [`IdleSet`], so an idle connection holds
//! no task, no future stack and no buffer; the shard-level parts of holding (the shard's held
//! byte bound, the resume pacer, picking a link); and the live-upgrade
//! hand-over (duplicating the socket, sending the snapshot the core made).
//! Makes no protocol decision: every one is the core's.

use std::rc::Rc;
use std::time::Instant;

use super::io::{Device, Readiness};
use super::link::{Link, OpenResult, StreamRef, notified};
use super::registry::Order;
use crate::metrics::ShardMetrics;
use crate::session::End;
use crate::session::tunnel::{Action, Count, HeldWants, OpenAnswer, Tunnel};

/// An established tunnel: the core and where its stream is.
pub(super) struct Live {
    pub core: Tunnel,
    pub(super) link: Rc<Link>,
    pub(super) stream: StreamRef,
    pub(super) sid: u32,
    /// What `holdfast_tunnel_state_bytes` counts for this tunnel.
    state_bytes: u32,
}

pub(super) enum Wake {
    Readable(std::io::Result<()>),
    /// The link or the shard's timers woke the stream.
    Notified,
}

impl Live {
    pub fn new(core: Tunnel, link: Rc<Link>, stream: StreamRef) -> Box<Live> {
        let sid = stream.borrow().stream_id;
        Box::new(Live { core, link, stream, sid, state_bytes: 0 })
    }

    /// Marks the tunnel to move at its next safe point (an upgrade began
    /// before it was established).
    pub fn request_handoff(&self) {
        self.stream.borrow_mut().handoff_requested = true;
    }

    /// Bytes of state this tunnel holds while idle: the core, this shell
    /// part and its stream's shared state.
    pub fn state_bytes(&self) -> u64 {
        self.core.state_bytes()
            + (std::mem::size_of::<Live>() - std::mem::size_of::<Tunnel>()) as u64
            + std::mem::size_of::<super::link::StreamShared>() as u64
    }
}

/// Performs the core's actions, in order. Stops at a failed device write.
async fn perform(dev: &mut Device, t: &mut Live) -> Result<(), End> {
    while let Some(a) = t.core.poll_action() {
        match a {
            Action::Write(bytes) => {
                dev.write(bytes).await?;
            }
            Action::Send { binary, data } => t.link.send_message(&mut t.stream.borrow_mut(), binary, &data),
            Action::Delivered(n) => t.link.return_credit(&mut t.stream.borrow_mut(), n),
            Action::CloseStream { reason, code, text } => t.link.close_stream(t.sid, reason, code, &text),
            Action::Handoff => {
                if !t.link.send_handoff(t.sid) {
                    t.core.end_quiesce(); // not on the link any more: nothing to wait for
                }
            }
            Action::Count(c) => count(dev, c),
        }
    }
    Ok(())
}

pub(super) fn count(dev: &Device, c: Count) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &dev.shard.metrics;
    match c {
        Count::MessageFromDevice => ShardMetrics::inc(&m.messages_from_devices_total),
        Count::MessagesToDevice(n) => {
            m.messages_to_devices_total.fetch_add(n, Relaxed);
        }
        Count::IdleTimeout => ShardMetrics::inc(&m.idle_timeouts_total),
        Count::WsError(code) => m.ws_error(code),
        Count::StreamDetached => ShardMetrics::inc(&m.streams_detached_total),
        Count::MessagesResent(n) => {
            m.messages_resent_total.fetch_add(n, Relaxed);
        }
        Count::Resumed { adopted } => ShardMetrics::inc(if adopted { &m.connections_resumed_total } else { &m.streams_resumed_total }),
        Count::ResumeFailed { adopted } => {
            ShardMetrics::inc(if adopted { &m.connections_resume_failed_total } else { &m.streams_resume_failed_total })
        }
        Count::StreamMoved => ShardMetrics::inc(&m.streams_moved_total),
        Count::Revoked(why) => m.revocation(why),
        Count::Held(true) => ShardMetrics::inc(&m.streams_held),
        Count::Held(false) => ShardMetrics::dec(&m.streams_held),
        Count::HeldBytes(n) => {
            let v = (dev.shard.held_bytes.get() as i64 + n).max(0) as u64;
            dev.shard.held_bytes.set(v);
            m.held_bytes.store(v, Relaxed);
        }
    }
}

/// A tunnel between bursts: all it needs to carry on, and no task. Its
/// wait (for the device, its link or a timer) sits in the shard's
/// [`IdleSet`]; when the wait ends a task is made for the next burst.
pub(super) struct Parked {
    dev: Device,
    t: Box<Live>,
    /// The connection's key in the shard's table.
    key: usize,
    /// The armed readiness wait, kept across wakeups from the link: it is
    /// only made again after it has fired (dropping it would cancel its poll).
    poll: Option<Readiness>,
}

/// A parked tunnel's wait: its readiness poll (while the core wants to
/// read) or a wake of its stream. A plain future (no box, no async state),
/// so the idle set holds it inline.
pub(super) struct Wait {
    p: Option<Parked>,
    can_read: bool,
}

impl std::future::Future for Wait {
    type Output = (Parked, Wake);

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<(Parked, Wake)> {
        use std::task::Poll;
        let this = &mut *self;
        let Some(p) = this.p.as_mut() else { return Poll::Pending };
        if this.can_read
            && let Some(armed) = p.poll.as_mut()
            && let Poll::Ready(r) = armed.as_mut().poll(cx)
        {
            p.poll = None;
            return match this.p.take() {
                Some(p) => Poll::Ready((p, Wake::Readable(r))),
                None => Poll::Pending,
            };
        }
        if super::link::poll_notified(&p.t.stream, cx).is_ready() {
            return match this.p.take() {
                Some(p) => Poll::Ready((p, Wake::Notified)),
                None => Poll::Pending,
            };
        }
        Poll::Pending
    }
}

/// The waits of a shard's tunnels between bursts, polled by one shard task
/// ([`run_idle`]) instead of a task per connection: an idle connection
/// costs its state and one wait here, no task and no future stack.
pub struct IdleSet {
    waits: std::cell::RefCell<futures_util::stream::FuturesUnordered<Wait>>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
    /// `holdfast_tunnels_parked` is kept here.
    metrics: std::sync::Arc<crate::metrics::ShardMetrics>,
}

impl IdleSet {
    pub fn new(metrics: std::sync::Arc<crate::metrics::ShardMetrics>) -> IdleSet {
        IdleSet { waits: Default::default(), waker: Default::default(), metrics }
    }

    fn push(&self, w: Wait) {
        crate::metrics::ShardMetrics::inc(&self.metrics.tunnels_parked);
        self.waits.borrow_mut().push(w);
        if let Some(k) = self.waker.take() {
            k.wake();
        }
    }

    /// Tunnels waiting now.
    pub fn len(&self) -> usize {
        self.waits.borrow().len()
    }

    fn poll_next(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<(Parked, Wake)> {
        use futures_util::StreamExt;
        match self.waits.borrow_mut().poll_next_unpin(cx) {
            std::task::Poll::Ready(Some(done)) => {
                crate::metrics::ShardMetrics::dec(&self.metrics.tunnels_parked);
                std::task::Poll::Ready(done)
            }
            _ => {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        }
    }
}

/// Runs on each shard: a task for the next burst of every tunnel whose wait ended.
pub async fn run_idle(ctx: Rc<super::ShardCtx>) {
    loop {
        let (p, wake) = std::future::poll_fn(|cx| ctx.idle.poll_next(cx)).await;
        monoio::spawn(drive(p, wake));
    }
}

/// Starts an established tunnel: its first burst (with the bytes that came
/// with the upgrade), then its bursts and waits ([`run`]).
pub(super) async fn start(dev: Device, t: Box<Live>, early: Vec<u8>, key: usize) {
    let mut t = t;
    t.state_bytes = t.state_bytes().min(u32::MAX as u64) as u32;
    dev.shard.metrics.tunnel_state_bytes.fetch_add(t.state_bytes as u64, std::sync::atomic::Ordering::Relaxed);
    run(Parked { dev, t, key, poll: None }, false, Some(early)).await
}

/// The task made when a parked tunnel's wait ends.
async fn drive(p: Parked, wake: Wake) {
    match wake {
        Wake::Notified => run(p, false, None).await,
        Wake::Readable(Ok(())) => run(p, true, None).await,
        Wake::Readable(Err(e)) => finish(p, e.into()).await,
    }
}

/// Bursts and waits. While the tunnel is busy (a message within the core's
/// cooling time) the task waits for its next burst itself, so a device
/// that talks pays no task or idle-set entry per message; once it has been
/// quiet that long (the core's deadline wakes it to cool its keys), the
/// tunnel parks in the shard's idle set and the task ends.
async fn run(mut p: Parked, mut readable: bool, mut early: Option<Vec<u8>>) {
    loop {
        if let Some(end) = burst(&mut p, readable, early.take()).await {
            return finish(p, end).await;
        }
        let can_read = prepare_wait(&mut p);
        let wait = Wait { p: Some(p), can_read };
        let hot = wait.p.as_ref().is_some_and(|p| p.t.core.is_hot(Instant::now()));
        if !hot {
            let shard = wait.p.as_ref().map(|p| p.dev.shard.clone());
            if let Some(shard) = shard {
                shard.idle.push(wait);
            }
            return;
        }
        let (q, wake) = wait.await;
        p = q;
        readable = match wake {
            Wake::Notified => false,
            Wake::Readable(Ok(())) => true,
            Wake::Readable(Err(e)) => return finish(p, e.into()).await,
        };
    }
}

/// The tunnel ended: the core's CLOSE for the stream (unless the WSM or the
/// link ended it), the TLS goodbye, the log line and the close.
async fn finish(mut p: Parked, end: End) {
    let Parked { dev, t, .. } = &mut p;
    // What the core queued before it ended (a close frame) goes out first.
    let _ = perform(dev, t).await;
    t.core.end(&end);
    let _ = perform(dev, t).await;
    dev.shard.metrics.tunnel_state_bytes.fetch_sub(t.state_bytes as u64, std::sync::atomic::Ordering::Relaxed);
    if matches!(end, End::HandedOver) {
        // The armed wait is parked, not dropped: dropping would cancel its
        // poll, one hash-chain walk per moving tunnel (see `ShardCtx::park`).
        if let Some(w) = p.poll.take() {
            p.dev.shard.park(w);
        }
    } else {
        Box::pin(p.dev.finish(&end, &mut p.t.core.rl)).await;
    }
    p.dev.close(end, p.key).await;
}

/// One round of work at a safe point: an eviction, a hand-over or a move
/// asked for, then a burst. `Some` ends the tunnel.
async fn burst(p: &mut Parked, readable: bool, early: Option<Vec<u8>>) -> Option<End> {
    let Parked { dev, t, key, .. } = p;
    let key = *key;
    match dev.shard.due_order(key, Instant::now()) {
        Some(Order::Kick(code)) => {
            ShardMetrics::inc(&dev.shard.metrics.connections_kicked_total);
            tracing::info!(conn = %dev.id, code, "closed by the operator");
            return Some(t.core.kicked(code));
        }
        Some(Order::Revoke { why, .. }) => {
            tracing::info!(conn = %dev.id, reason = why.label(), "closing: no longer allowed by the policy");
            return Some(t.core.revoked(why));
        }
        Some(Order::Close { code, why, .. }) => {
            dev.shard.metrics.paced_close(why);
            tracing::debug!(conn = %dev.id, code, reason = why.label(), "closing at its paced moment");
            return Some(t.core.paced(why, code));
        }
        None => {}
    }
    let cur = dev.shard.current();
    if t.core.limits().generation != cur.generation {
        let max = t.core.limits().max_message;
        let lim = if max == cur.limits.max_message { cur.limits.clone() } else { Rc::new(super::limits(&cur.cfg, max, cur.generation)) };
        t.core.set_limits(lim);
    }
    drop(cur);
    let evict = t.stream.borrow_mut().evict_partial.take();
    if let Some(len) = evict.map(std::num::NonZeroU64::get) {
        dev.shard.partials.evicted(len);
        tracing::debug!(conn = %dev.id, bytes = len, "closing: held one of the shard's oldest partial records");
        return Some(t.core.evicted());
    }
    if t.stream.borrow().handoff_requested
        && let Some(end) = Box::pin(hand_over(dev, t)).await
    {
        return Some(end);
    }
    if t.stream.borrow().move_requested
        && let Some(end) = Box::pin(move_by_plan(dev, t)).await
    {
        return Some(end);
    }
    if let Err(end) = Box::pin(step(dev, t, readable, early)).await {
        return Some(end);
    }
    if !dev.shard.reaches(key, &t.stream) {
        dev.shard.reach(key, &t.stream, &t.link, t.core.resume());
    }
    dev.park_rx(Some(&t.stream));
    None
}

/// Readies the tunnel's wait: for the device socket (only while the core
/// wants to read; the readiness poll is armed here if it is not already),
/// or a wake from the link or the shard's timers (armed here for the
/// core's next deadline). Returns whether the socket is waited for.
fn prepare_wait(p: &mut Parked) -> bool {
    let can_read = p.t.core.wants_read(p.t.link.can_send(&p.t.stream.borrow()), shard_held_room(&p.dev));
    if let Some(at) = p.t.core.deadline(Instant::now()) {
        p.dev.shard.timers.arm(&p.t.stream, at);
    }
    if let Some(at) = p.dev.shard.order_at(p.key) {
        p.dev.shard.timers.arm(&p.t.stream, at);
    }
    if can_read && p.poll.is_none() {
        p.poll = Some(Box::pin(p.dev.readable()));
    }
    can_read
}

/// One burst: what the device sent (if readable), what the WSM sent, the
/// held stream's progress, the timers. Everything it allocates is freed
/// when it returns.
async fn step(dev: &mut Device, t: &mut Live, readable: bool, early: Option<Vec<u8>>) -> Result<(), End> {
    let now = Instant::now();
    if let Some(e) = early {
        t.core.on_early(now, &e)?;
    }
    if readable {
        read(dev, t).await?;
    }
    perform(dev, t).await?;
    deliver(dev, t).await?;
    if t.core.is_held() {
        held_step(dev, t)?;
        perform(dev, t).await?;
    }
    t.core.on_tick(Instant::now())?;
    perform(dev, t).await
}

/// Whether the shard's held bytes (with reads in flight) are under its bound.
fn shard_held_room(dev: &Device) -> bool {
    dev.shard.held_bytes.get() + dev.shard.held_reserved.get() < dev.shard.current().cfg.upstream.held_bytes_per_shard
}

/// Reads what the device sent and hands it to the core.
async fn read(dev: &mut Device, t: &mut Live) -> Result<(), End> {
    let mut reserved = 0;
    if t.core.is_held() && !t.core.accepted() {
        // A held tunnel checks its bounds right before reading (other
        // tunnels of the shard may have filled the shard's share since it
        // began to wait), again after waiting for a pool buffer, and
        // reserves what this read may bring until it is counted.
        if !t.core.wants_read(false, shard_held_room(dev)) {
            return Ok(());
        }
        dev.take_rx().await;
        if !t.core.wants_read(false, shard_held_room(dev)) {
            dev.release_if_empty();
            return Ok(());
        }
        reserved = dev.shard.current().cfg.buffers.size as u64;
        dev.shard.held_reserved.set(dev.shard.held_reserved.get() + reserved);
    }
    let got = dev.read_now().await;
    dev.shard.held_reserved.set(dev.shard.held_reserved.get() - reserved);
    got?;
    let res = match dev.rx.as_mut() {
        // Plaintext is decoded in place, straight from the pool buffer.
        Some(rx) => t.core.on_ciphertext(Instant::now(), rx.vec()),
        None => Ok(()),
    };
    dev.release_if_empty();
    res
}

/// Hands the core what the WSM sent (messages, a close, a lost link).
async fn deliver(dev: &mut Device, t: &mut Live) -> Result<(), End> {
    let (msgs, wsm_close, lost) = {
        let mut s = t.stream.borrow_mut();
        (std::mem::take(&mut s.inbox), s.wsm_close.take(), s.link_lost)
    };
    let now = Instant::now();
    t.core.on_wsm_messages(now, msgs)?;
    if let Some(c) = wsm_close {
        return Err(t.core.on_wsm_close(c.0, &c.1));
    }
    if lost && t.core.has_stream() {
        // The WSM is gone; the device stays. Its stream resumes elsewhere.
        let unacked = std::mem::take(&mut t.stream.borrow_mut().unacked);
        let spread = dev.shard.current().cfg.upstream.close_spread.as_millis() as u32;
        let jitter = std::time::Duration::from_millis(monoio::utils::thread_rng_n(spread.max(1)) as u64);
        t.core.detach(now, unacked, false, jitter);
    }
    perform(dev, t).await
}

/// Moves a held tunnel on: the answer to its resumed OPEN, its held
/// messages as credit allows, or a new OPEN when the shard grants a turn.
fn held_step(dev: &Device, t: &mut Live) -> Result<(), End> {
    let now = Instant::now();
    if t.core.has_stream() && !t.core.accepted() {
        let answer = {
            let mut s = t.stream.borrow_mut();
            // Taken: an established stream keeps no box for its answer.
            match s.opened.take().map(|b| *b) {
                Some(OpenResult::Accepted(_)) => Some(OpenAnswer::Accepted { max_frame: t.link.peer_max_frame() }),
                Some(OpenResult::Refused(status, reason)) => {
                    tracing::debug!(conn = %dev.id, status, %reason, "resumed stream refused; trying another WSM");
                    Some(OpenAnswer::Refused)
                }
                None if s.link_lost || s.wsm_close.is_some() => Some(OpenAnswer::Gone),
                None => None,
            }
        };
        if let Some(a) = answer {
            t.core.on_open_answer(a);
        }
    }
    if t.core.accepted() {
        let (link, stream) = (t.link.clone(), t.stream.clone());
        return t.core.flush_held(&mut |binary, data| {
            let mut s = stream.borrow_mut();
            if !link.can_send(&s) {
                return false;
            }
            link.send_message(&mut s, binary, data);
            true
        });
    }
    match t.core.held_wants(now, dev.shard.handoff.borrow().is_some())? {
        HeldWants::Nothing => {}
        HeldWants::HandOver => {
            let mut s = t.stream.borrow_mut();
            s.handoff_requested = true;
            s.wake();
        }
        HeldWants::Reopen { paced } => {
            if paced && !dev.shard.resumes.try_take(now) {
                return Ok(());
            }
            // Resumed streams count against `admission.wsm_opens_per_sec` too.
            if dev.shard.pick_link().is_none() || !dev.shard.admit.resume_turn() {
                return Ok(());
            }
            // What the core queued for the old stream was performed before
            // this step (`step`, `move_by_plan`): the stream changes now.
            debug_assert!(!t.core.has_actions());
            let Some(link) = dev.shard.pick_link() else { return Ok(()) };
            let Some(mut open) = t.core.resumed_open(dev.id, dev.addr) else { return Err(t.core.identity_lost()) };
            // The labels as they are now (a reload may have changed them).
            open.labels = dev.shard.current().tls.labels.of(&open.device.chain);
            let Some(stream) = link.open_stream(open) else { return Ok(()) };
            t.sid = stream.borrow().stream_id;
            t.stream = stream;
            t.link = link;
            t.core.reopening(now);
        }
    }
    Ok(())
}

/// Sends HANDOFF and delivers what the WSM sent until its HANDOFF_ACK (or
/// the core's deadline): afterwards the WSM sends nothing more on the
/// stream and has processed everything sent on it. Ok(false) if there was
/// no stream to quiesce.
async fn quiesce(dev: &mut Device, t: &mut Live) -> Result<bool, End> {
    if !t.core.begin_quiesce(Instant::now()) {
        return Ok(false);
    }
    perform(dev, t).await?;
    loop {
        deliver(dev, t).await?;
        let Some(deadline) = t.core.quiesce_deadline() else { break };
        let done = {
            let s = t.stream.borrow();
            s.handoff_acked || s.link_lost
        };
        if done {
            break;
        }
        if monoio::time::timeout_at(deadline.into(), notified(&t.stream)).await.is_err() {
            tracing::warn!(conn = %dev.id, "WSM did not acknowledge HANDOFF in time; moving anyway");
            break;
        }
    }
    t.core.end_quiesce();
    deliver(dev, t).await?;
    Ok(true)
}

/// Goaway: moves this tunnel's stream to another WSM by plan. The WSM stops
/// sending and acknowledges (what it sent first reaches the device), the
/// stream closes as "handed elsewhere", and the tunnel re-opens elsewhere.
async fn move_by_plan(dev: &mut Device, t: &mut Live) -> Option<End> {
    t.stream.borrow_mut().move_requested = false;
    // Stay put unless another WSM can take the stream now: a lone WSM that
    // drains keeps its streams until it really goes.
    if t.core.is_held() || !t.link.going_away() || dev.shard.pick_link().is_none() {
        return None;
    }
    if let Err(end) = quiesce(dev, t).await {
        return Some(end);
    }
    if t.core.has_stream() {
        t.stream.borrow_mut().unacked.clear();
        t.core.leave_quiesced(Instant::now(), true);
    }
    // The CLOSE goes to the old stream before the tunnel re-opens elsewhere.
    if let Err(end) = perform(dev, t).await {
        return Some(end);
    }
    let res = held_step(dev, t);
    if let Err(end) = res {
        return Some(end);
    }
    perform(dev, t).await.err()
}

/// Live upgrade: moves this tunnel to the new process at this safe point.
/// `None` if no upgrade is under way (the request is dropped) or the move
/// failed (the connection carries on here, unchanged).
async fn hand_over(dev: &mut Device, t: &mut Live) -> Option<End> {
    t.stream.borrow_mut().handoff_requested = false;
    let (sink, flight) = dev.shard.handoff.borrow().clone()?;
    // 1. The WSM stops sending and acknowledges; what it sent before arrives
    //    first (the link is ordered) and goes to the device now. The device
    //    is not read meanwhile: its bytes wait in the socket, which moves.
    let quiesced = match quiesce(dev, t).await {
        Ok(q) => q && t.core.has_stream(),
        Err(end) => return Some(end),
    };
    // A KeyUpdate the device asked for and holdfast has not yet answered
    // goes now: the snapshot does not carry the debt.
    if let Err(end) = t.core.answer_key_update() {
        return Some(end);
    }
    if let Err(end) = perform(dev, t).await {
        return Some(end);
    }
    // 2. Snapshot (copies: the connection is changed only once it is sent).
    let rx = match (dev.rx.as_mut(), &dev.parked) {
        (Some(b), _) => b.vec().clone(),
        (None, Some(p)) => p.bytes.to_vec(),
        (None, None) => Vec::new(),
    };
    let snap = t.core.snapshot(dev.id, dev.addr.to_string(), rx, Instant::now());
    // 3. The socket: a duplicate goes to the new process; ours is closed
    //    without a FIN (the socket stays open there).
    let failed = match dev.dup_fd() {
        Ok(fd) => sink.send((snap, fd)).err().map(|_| "upgrade channel gone".to_string()),
        Err(e) => Some(format!("cannot duplicate the device socket: {e}")),
    };
    if let Some(why) = failed {
        tracing::error!(conn = %dev.id, why, "hand-over failed; keeping the connection");
        if quiesced {
            // The WSM sends nothing more on the quiesced stream: re-open it.
            t.stream.borrow_mut().unacked.clear();
            t.core.leave_quiesced(Instant::now(), false);
        }
        return perform(dev, t).await.err();
    }
    // Committed: what the snapshot carries now lives in the new process.
    let end = t.core.handed_over();
    let _ = perform(dev, t).await;
    dev.rx = None;
    dev.parked = None;
    flight.released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(end)
}

#[cfg(test)]
mod tests {
    /// What an idle connection keeps stays within the allocator's size
    /// classes it was fitted to (mimalloc: 448 B for `Live`, its key
    /// material inline, 160 B for the
    /// stream's shared state with its `Rc`, 224 B for the idle-set node with
    /// its `Wait`): one field more in the wrong place costs every idle
    /// connection the next class up (bench/RESULTS.md, "Idle memory").
    #[test]
    fn idle_state_fits_its_size_classes() {
        let live = std::mem::size_of::<super::Live>();
        let shared = std::mem::size_of::<super::super::link::StreamShared>() + 24;
        let wait = std::mem::size_of::<super::Wait>();
        assert!(live <= 448, "Live is {live} B");
        assert!(shared <= 160, "StreamShared with Rc and RefCell is {shared} B");
        assert!(wait <= 160, "Wait is {wait} B (the idle-set node adds about 64)");
    }
}
