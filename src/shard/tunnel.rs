//! The established phase of a device connection: the WebSocket tunnel.
//!
//! Owns: the state an established connection keeps ([`Tunnel`]: record-layer
//! state, frame decoder, its stream on a WSM link, timers) and the loop that
//! moves messages both ways. The loop alternates a *burst*, boxed so that its
//! futures are freed when it ends, with a small *wait* for the socket, the
//! link or a timer; before waiting the record layer drops its expanded keys.
//! So an idle connection keeps only [`Tunnel`], the wait, and no I/O buffer.
//! Never parses bytes itself and never blocks on one device for another.

use std::rc::Rc;
use std::time::Instant;

use super::conn::{Device, End, Readiness};
use super::link::{Link, StreamRef, notified};
use super::reattach;
use crate::link::codec::CloseReason;
use crate::metrics::ShardMetrics;
use crate::tls::record::RecordLayer;
use crate::upgrade::snapshot::Resume;
use crate::ws::frame::{self, Decoder, Event, WsError, close, op};

pub(super) struct Tunnel {
    pub rl: RecordLayer,
    pub(super) link: Rc<Link>,
    pub(super) stream: StreamRef,
    pub(super) sid: u32,
    /// Present while the stream has no working WSM (`reattach`).
    pub(super) held: Option<Box<reattach::Held>>,
    /// Frame decoder, present only while a frame or message is partial.
    dec: Option<Box<Decoder>>,
    /// What a successor process (or another WSM) needs to re-open the stream.
    pub(super) resume: Box<Resume>,
    max_message: u32,
    last_rx: Instant,
    last_ping: Instant,
    /// Last message either way; expanded keys are dropped [`COOL_AFTER`] later.
    last_active: Instant,
}

/// How long a tunnel keeps its expanded AEAD keys after its last message: a
/// device that talks every few hundred milliseconds would otherwise pay the
/// key schedule on every message; one that idles gives the memory back.
const COOL_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// What one burst works on; dropped when the burst ends.
#[derive(Default)]
struct Work {
    /// Decoded device events.
    events: Vec<Event>,
    /// Record-layer replies (KeyUpdate answers) to write.
    replies: Vec<u8>,
    /// A WebSocket error found while decoding; acted on after the events before it.
    pending_err: Option<WsError>,
}

enum Wake {
    Readable(std::io::Result<()>),
    /// The link or the shard's timers woke the stream.
    Notified,
}

impl Tunnel {
    pub fn new(rl: RecordLayer, link: Rc<Link>, stream: StreamRef, max_message: usize, resume: Box<Resume>) -> Box<Tunnel> {
        let sid = stream.borrow().stream_id;
        let now = Instant::now();
        Box::new(Tunnel {
            rl,
            link,
            stream,
            sid,
            held: None,
            dec: None,
            resume,
            max_message: max_message.min(u32::MAX as usize) as u32,
            last_rx: now,
            last_ping: now,
            last_active: now,
        })
    }

    /// Marks the tunnel to move at its next safe point (an upgrade began
    /// before it was established).
    pub fn request_handoff(&self) {
        self.stream.borrow_mut().handoff_requested = true;
    }

    /// Restores a partial frame and the device's last activity (adoption).
    pub fn restore(&mut self, dec: Option<Decoder>, idle_ms: u64) {
        self.dec = dec.map(Box::new);
        let now = Instant::now();
        self.last_rx = now.checked_sub(std::time::Duration::from_millis(idle_ms)).unwrap_or(now);
    }

    /// Bytes of state this tunnel holds while idle: itself, its stream's
    /// shared state, the record layer's key material and what a resumed
    /// OPEN needs (certificate chain, request), on the heap.
    pub fn state_bytes(&self) -> u64 {
        let st = self.rl.state();
        let keys =
            st.rx.secret.capacity() + st.rx.key.capacity() + st.tx.secret.capacity() + st.tx.key.capacity() + st.handshake_buf.capacity();
        let r = &self.resume;
        let resume = std::mem::size_of::<Resume>()
            + r.chain.iter().map(|c| c.capacity() + 24).sum::<usize>()
            + r.request.path.capacity()
            + r.request.query.capacity()
            + r.request.headers.iter().map(|(k, v)| k.capacity() + v.capacity() + 48).sum::<usize>()
            + r.request.subprotocols.iter().map(|p| p.capacity() + 24).sum::<usize>();
        (std::mem::size_of::<Tunnel>() + std::mem::size_of::<super::link::StreamShared>() + keys + resume) as u64
    }
}

/// Decodes device plaintext into events, creating the decoder on demand;
/// after an error nothing more is decoded.
fn decode(dec: &mut Option<Box<Decoder>>, max_message: u32, events: &mut Vec<Event>, pending_err: &mut Option<WsError>, plain: &[u8]) {
    if pending_err.is_some() {
        return;
    }
    let d = dec.get_or_insert_with(|| Box::new(Decoder::new(max_message as usize, true)));
    *pending_err = d.feed(plain, events).err();
}

/// Runs the tunnel until either side ends it; tells the WSM unless the WSM
/// (or the link) ended it.
pub(super) async fn run(dev: &mut Device, t: &mut Tunnel, early: Vec<u8>) -> End {
    let end = run_loop(dev, t, early).await;
    // A tunnel waiting for a WSM has no stream to close (its old stream ID
    // may already name another device's stream on a reconnected link).
    let has_stream = t.held.as_ref().is_none_or(|h| h.has_stream());
    reattach::release(dev, t);
    if !has_stream {
        return end;
    }
    let (code, text): (u16, String) = match &end {
        End::WsmClosed | End::LinkLost | End::HandedOver => return end,
        End::DeviceClosed => (dev.device_close_code, String::new()),
        End::Ws(e) => (e.code, e.reason.to_string()),
        End::Idle => (close::GOING_AWAY, "idle timeout".into()),
        _ => (1006, String::new()),
    };
    t.link.close_stream(t.sid, CloseReason::DeviceGone, code, &text);
    end
}

async fn run_loop(dev: &mut Device, t: &mut Tunnel, early: Vec<u8>) -> End {
    let mut early = Some(early);
    let mut readable = false;
    let mut poll: Option<Readiness> = None;
    loop {
        // The shard's budget for partial records ran out and this tunnel
        // holds one of the oldest: it goes, so that none is stalled.
        let evict = t.stream.borrow_mut().evict_partial.take();
        if let Some(len) = evict {
            dev.shard.partials.evicted(len);
            tracing::debug!(conn = %dev.id, bytes = len, "closing: held one of the shard's oldest partial records");
            dev.send_close(&mut t.rl, close::POLICY, "partial record held too long").await;
            return End::PartialEvicted;
        }
        if t.stream.borrow().handoff_requested
            && let Some(end) = Box::pin(hand_over(dev, t)).await
        {
            // The armed wait is parked, not dropped: dropping would cancel
            // its poll, one hash-chain walk per moving tunnel (see `park`).
            if matches!(end, End::HandedOver)
                && let Some(p) = poll.take()
            {
                dev.shard.park(p);
            }
            return end;
        }
        if t.stream.borrow().move_requested
            && let Some(end) = Box::pin(reattach::move_by_plan(dev, t)).await
        {
            return end;
        }
        if let Some(end) = Box::pin(step(dev, t, readable, early.take())).await {
            return end;
        }
        let now = Instant::now();
        if now >= t.last_active + COOL_AFTER {
            t.rl.cool();
        } else {
            dev.shard.timers.arm(&t.stream, t.last_active + COOL_AFTER);
        }
        dev.park_rx(Some(&t.stream));
        readable = match wait(dev, t, &mut poll).await {
            Wake::Notified => false,
            Wake::Readable(Err(e)) => return End::Io(e),
            Wake::Readable(Ok(())) => true,
        };
    }
}

/// One burst: read what the device sent (if readable), then act on it and on
/// what the WSM sent. Everything it allocates is freed when it returns.
async fn step(dev: &mut Device, t: &mut Tunnel, readable: bool, early: Option<Vec<u8>>) -> Option<End> {
    let mut w = Work::default();
    if let Some(e) = early.filter(|e| !e.is_empty()) {
        decode(&mut t.dec, t.max_message, &mut w.events, &mut w.pending_err, &e);
    }
    if readable && let Some(end) = read(dev, t, &mut w).await {
        return Some(end);
    }
    if t.dec.as_ref().is_some_and(|d| !d.in_progress()) {
        t.dec = None;
    }
    burst(dev, t, &mut w).await
}

/// Waits for the device socket (only while the stream may send), or a wake
/// from the link or the shard's timers (armed here for the next idle or ping
/// deadline). The socket wait in `poll` survives a wake from the link: it
/// is only made again after it has fired.
async fn wait(dev: &Device, t: &Tunnel, poll: &mut Option<Readiness>) -> Wake {
    let ws = &dev.shard.cfg.ws;
    let can_read = match &t.held {
        Some(h) if !h.accepted() => reattach::can_read(dev, h),
        _ => t.link.can_send(&t.stream.borrow()),
    };
    if let Some(h) = &t.held {
        dev.shard.timers.arm(&t.stream, reattach::next_wake(dev, h));
    }
    let idle_at = ws.idle_timeout.map(|d| t.last_rx + d);
    let ping_at = ws.ping_interval.map(|p| t.last_rx.max(t.last_ping) + p);
    if let Some(at) = idle_at.into_iter().chain(ping_at).min() {
        dev.shard.timers.arm(&t.stream, at);
    }
    if !can_read {
        notified(&t.stream).await;
        return Wake::Notified;
    }
    let armed = poll.get_or_insert_with(|| Box::pin(dev.readable()));
    let wake = monoio::select! {
        r = armed => Wake::Readable(r),
        _ = notified(&t.stream) => Wake::Notified,
    };
    if matches!(wake, Wake::Readable(_)) {
        *poll = None;
    }
    wake
}

/// Reads what the device sent and decodes it into events.
async fn read(dev: &mut Device, t: &mut Tunnel, w: &mut Work) -> Option<End> {
    let mut reserved = 0;
    if let Some(h) = t.held.as_ref().filter(|h| !h.accepted()) {
        // A held tunnel checks its bounds right before reading (other
        // tunnels of the shard may have filled the shard's share since it
        // began to wait), again after waiting for a pool buffer, and
        // reserves what this read may bring until it is counted.
        if !reattach::can_read(dev, h) {
            return None;
        }
        dev.take_rx().await;
        if !reattach::can_read(dev, h) {
            dev.release_if_empty();
            return None;
        }
        reserved = dev.shard.cfg.buffers.size as u64;
        dev.shard.held_reserved.set(dev.shard.held_reserved.get() + reserved);
    }
    let got = dev.read_now().await;
    dev.shard.held_reserved.set(dev.shard.held_reserved.get() - reserved);
    if let Err(e) = got {
        return Some(e);
    }
    t.last_rx = Instant::now();
    let Tunnel { rl, dec, max_message, .. } = t;
    let Work { events, replies, pending_err } = w;
    // Plaintext is decoded in place, straight from the pool buffer.
    let closed = dev.open_records(rl, replies, &mut |p| {
        decode(dec, *max_message, events, pending_err, p);
        Ok(())
    });
    match closed {
        Ok(true) => Some(End::Eof),
        Ok(false) => None,
        Err(e) => Some(e),
    }
}

/// One round of work: device events to the WSM, WSM messages to the device,
/// closes and timers. `Some` ends the tunnel.
async fn burst(dev: &mut Device, t: &mut Tunnel, w: &mut Work) -> Option<End> {
    let m = dev.shard.metrics.clone();
    let ws = dev.shard.cfg.ws.clone();

    // 1. What the device sent.
    let mut plain = Vec::new();
    for ev in std::mem::take(&mut w.events) {
        match ev {
            Event::Message { text, data } => {
                // A message the WSM cannot take in one frame would make it
                // drop the link (every device on it): only this device is
                // told, with 1009.
                if t.held.is_none() && !t.link.fits(data.len()) {
                    w.pending_err = Some(WsError { code: close::TOO_BIG, reason: "message too big for the WSM" });
                    break;
                }
                match t.held.as_mut() {
                    Some(h) => reattach::hold(dev, h, !text, data),
                    None => t.link.send_message(&mut t.stream.borrow_mut(), !text, &data),
                }
                ShardMetrics::inc(&m.messages_from_devices_total);
            }
            Event::Ping(p) => frame::encode(&mut plain, op::PONG, &p, None),
            Event::Pong(_) => {}
            Event::Close { code, reason } => {
                dev.device_close_code = code.unwrap_or(1005);
                match code {
                    Some(c) => frame::encode_close(&mut plain, c, "", None),
                    None => frame::encode(&mut plain, op::CLOSE, &[], None),
                }
                let _ = dev.send(&mut t.rl, &plain).await;
                tracing::debug!(conn = %dev.id, code = ?code, %reason, "device closed the WebSocket");
                return Some(End::DeviceClosed);
            }
        }
    }
    if let Some(e) = w.pending_err.take() {
        m.ws_error(e.code);
        if !plain.is_empty() {
            let _ = dev.send(&mut t.rl, &plain).await;
        }
        dev.send_close(&mut t.rl, e.code, e.reason).await;
        return Some(End::Ws(e));
    }
    if !w.replies.is_empty()
        && let Err(e) = dev.write(std::mem::take(&mut w.replies)).await
    {
        return Some(e);
    }
    if !plain.is_empty()
        && let Err(e) = dev.send(&mut t.rl, &plain).await
    {
        return Some(e);
    }

    // 2. What the WSM sent.
    if let Some(end) = deliver(dev, t).await {
        return Some(end);
    }
    // 2b. No WSM: find another one, or send what was held.
    if t.held.is_some()
        && let Some(end) = reattach::step(dev, t).await
    {
        return Some(end);
    }

    // 3. Timers.
    let now = Instant::now();
    if ws.idle_timeout.is_some_and(|d| now >= t.last_rx + d) {
        ShardMetrics::inc(&m.idle_timeouts_total);
        dev.send_close(&mut t.rl, close::GOING_AWAY, "idle timeout").await;
        return Some(End::Idle);
    }
    if ws.ping_interval.is_some_and(|p| now >= t.last_rx.max(t.last_ping) + p) {
        let mut f = Vec::new();
        frame::encode(&mut f, op::PING, b"", None);
        if let Err(e) = dev.send(&mut t.rl, &f).await {
            return Some(e);
        }
        t.last_ping = now;
    }
    None
}

/// Writes what the WSM sent to the device and returns credit; acts on a
/// close from the WSM or a lost link.
async fn deliver(dev: &mut Device, t: &mut Tunnel) -> Option<End> {
    let (msgs, wsm_close, lost) = {
        let mut s = t.stream.borrow_mut();
        (std::mem::take(&mut s.inbox), s.wsm_close.take(), s.link_lost)
    };
    if !msgs.is_empty() {
        t.last_active = Instant::now();
        let mut out = Vec::new();
        let mut bytes = 0;
        for (binary, data) in &msgs {
            frame::encode(&mut out, if *binary { op::BINARY } else { op::TEXT }, data, None);
            bytes += data.len();
        }
        if let Err(e) = dev.send(&mut t.rl, &out).await {
            return Some(e);
        }
        dev.shard.metrics.messages_to_devices_total.fetch_add(msgs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        t.link.return_credit(&mut t.stream.borrow_mut(), bytes);
    }
    if let Some((code, text)) = wsm_close {
        let code = if frame::valid_close_code(code) { code } else { close::NORMAL };
        dev.send_close(&mut t.rl, code, &text).await;
        return Some(End::WsmClosed);
    }
    if lost && t.held.as_ref().is_none_or(|h| h.has_stream()) {
        // The WSM is gone; the device stays. Its stream resumes elsewhere.
        reattach::detach(dev, t, false);
    }
    None
}

/// Sends HANDOFF and delivers what the WSM sent until its HANDOFF_ACK (or
/// [`HANDOFF_ACK_TIMEOUT`]): afterwards the WSM sends nothing more on the
/// stream and has processed everything sent on it.
pub(super) async fn quiesce(dev: &mut Device, t: &mut Tunnel) -> Option<End> {
    if !t.link.send_handoff(t.sid) {
        return None;
    }
    let deadline = Instant::now() + HANDOFF_ACK_TIMEOUT;
    loop {
        if let Some(end) = deliver(dev, t).await {
            return Some(end);
        }
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
    deliver(dev, t).await
}

/// How long a WSM has to acknowledge a HANDOFF before the tunnel moves anyway.
const HANDOFF_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A hand-over that failed after its stream was quiesced: the WSM sends
/// nothing more on it, so the stream is re-opened (the connection itself,
/// with everything it held, was never changed).
fn keep_after_failed_handover(dev: &Device, t: &mut Tunnel, quiesced: bool) {
    if quiesced {
        reattach::leave_quiesced(dev, t);
    }
}

/// Live upgrade: moves this tunnel to the new process at this safe point.
/// `None` if no upgrade is under way (the request is dropped).
async fn hand_over(dev: &mut Device, t: &mut Tunnel) -> Option<End> {
    t.stream.borrow_mut().handoff_requested = false;
    let (sink, flight) = dev.shard.handoff.borrow().clone()?;
    // 1. The WSM stops sending and acknowledges; what it sent before arrives
    //    first (the link is ordered) and goes to the device now. The device
    //    is not read meanwhile: its bytes wait in the socket, which moves.
    //    A tunnel without an accepted stream has nothing to quiesce.
    if t.held.as_ref().is_none_or(|h| h.accepted())
        && let Some(end) = quiesce(dev, t).await
    {
        return Some(end);
    }
    let accepted_stream = t.held.as_ref().is_none_or(|h| h.accepted());
    // 2. Snapshot: record layer, unprocessed ciphertext, partial frame, held
    //    messages. Copies: the connection is changed only once the snapshot
    //    is sent, so a hand-over that fails keeps everything.
    let snap = crate::upgrade::snapshot::ConnSnapshot {
        id: dev.id,
        addr: dev.addr.to_string(),
        record: t.rl.state().clone(),
        decoder: t.dec.as_deref().cloned(),
        max_message: t.max_message,
        rx: match (dev.rx.as_mut(), &dev.parked) {
            (Some(b), _) => b.vec().clone(),
            (None, Some(p)) => p.bytes.to_vec(),
            (None, None) => Vec::new(),
        },
        resume: (*t.resume).clone(),
        idle_ms: t.last_rx.elapsed().as_millis() as u64,
        held: reattach::held_for_snapshot(t),
    };
    // 3. The socket: a duplicate goes to the new process; ours is closed
    //    without a FIN (the socket stays open there).
    // SAFETY: the descriptor is open and owned by `dev.tcp` for this call.
    let fd = match unsafe { std::os::fd::BorrowedFd::borrow_raw(dev.raw_fd()) }.try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(conn = %dev.id, error = %e, "cannot duplicate the device socket; keeping the connection");
            keep_after_failed_handover(dev, t, accepted_stream);
            return None;
        }
    };
    if sink.send((snap, fd)).is_err() {
        tracing::error!(conn = %dev.id, "upgrade channel gone; keeping the connection");
        keep_after_failed_handover(dev, t, accepted_stream);
        return None;
    }
    // Committed: what the snapshot carries now lives in the new process.
    reattach::handed_over(dev, t);
    dev.rx = None;
    dev.parked = None;
    t.dec = None;
    flight.released.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if accepted_stream {
        t.link.close_stream(t.sid, CloseReason::HandedElsewhere, 1000, "");
    }
    Some(End::HandedOver)
}
