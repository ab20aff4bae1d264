//! The established phase of one device connection, as a sans-io machine:
//! the WebSocket tunnel between a device and its WSM stream.
//!
//! Owns: every decision of that phase. Opening the device's TLS records
//! and decoding its frames; what each device frame means (a message for
//! the WSM, a pong, a close echoed back, a protocol error and its close
//! code, a message too big for the WSM: 1009 for that device only); what
//! each WSM event means (messages sealed for the device and their credit
//! returned, a close passed on with a valid code); idle and ping deadlines;
//! the stream's attachment: attached to a WSM, or *held* while it has none
//! (device messages kept in order, the unacknowledged ones of a dead WSM
//! first, a resumed OPEN when the shell grants a turn, the held messages
//! flushed as credit allows, 1013 once the resume time is up); the HANDOFF
//! quiesce before a move; and what the stream's CLOSE and the TLS goodbye
//! say when the tunnel ends. It is fed ciphertext, WSM events and `now` and
//! queues [`Action`]s. Never does I/O, never reads the clock, never knows
//! which link or stream ID carries it: the shell (`shard::tunnel`) does.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::end::{End, TlsGoodbye};
pub use super::resume::{Dictionaries, PackedResume};
use crate::identity::ConnectionId;
use crate::link::codec::{self, CloseReason, Open};
use crate::tls::record::RecordLayer;
use crate::upgrade::snapshot::{ConnSnapshot, Resume};
use crate::ws::frame::{self, Decoder, Event, WsError, close, op};

/// How long a tunnel keeps its expanded AEAD keys after its last message: a
/// device that talks every few hundred milliseconds would otherwise pay the
/// key schedule on every message; one that idles gives the memory back.
pub const COOL_AFTER: Duration = Duration::from_secs(2);

/// How long a WSM has to acknowledge a HANDOFF before the tunnel moves anyway.
pub const HANDOFF_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration a tunnel decides by (from `websocket` and `upstream`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: u32,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    /// How long a stream without a WSM waits for one before 1013.
    pub resume_timeout: Duration,
    /// How long a resumed OPEN may wait for its answer.
    pub open_timeout: Duration,
    /// The most device bytes held for one tunnel without a WSM.
    pub held_bytes_per_connection: usize,
    /// The config generation these come from (a reload makes a new one).
    pub generation: u64,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Bytes (TLS records) for the device.
    Write(Vec<u8>),
    /// A device message for the tunnel's stream.
    Send { binary: bool, data: Vec<u8> },
    /// `n` bytes of the stream's messages reached the device (stream credit).
    Delivered(usize),
    /// End the tunnel's current stream on its link.
    CloseStream { reason: CloseReason, code: u16, text: String },
    /// Send HANDOFF on the stream (the WSM stops sending and acknowledges).
    Handoff,
    /// Something to count.
    Count(Count),
}

/// What the shell counts for the tunnel (shard metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    MessageFromDevice,
    MessagesToDevice(u64),
    IdleTimeout,
    /// A close holdfast sent for bad device input, by code.
    WsError(u16),
    StreamDetached,
    MessagesResent(u64),
    /// A held stream was taken by a WSM and its held messages sent
    /// (`adopted`: it came from a live upgrade).
    Resumed {
        adopted: bool,
    },
    ResumeFailed {
        adopted: bool,
    },
    StreamMoved,
    /// The shard's total of held device bytes changes by this much.
    HeldBytes(i64),
    /// Closed because its identity is no longer allowed.
    Revoked(crate::tls::handshake::Refusal),
    /// The tunnel began (`true`) or stopped (`false`) holding for want of a WSM.
    Held(bool),
}

/// Where a held tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No stream: waiting for a link and a turn.
    Waiting,
    /// OPEN (resumed) sent at this time; waiting for ACCEPT.
    Opening(Instant),
    /// Accepted: sending the held messages as credit allows.
    Flushing { max_frame: u32 },
}

/// A tunnel without a (working) WSM stream.
#[derive(Debug)]
struct Held {
    msgs: VecDeque<(bool, Vec<u8>)>,
    bytes: usize,
    phase: Phase,
    /// When the device is told 1013 if no WSM has taken the stream.
    close_at: Instant,
    /// Moved by plan: the move itself was paced, re-open without a turn.
    planned: bool,
    /// Adopted in a live upgrade: its acceptance is what the old process
    /// waits for.
    adopted: bool,
    /// The resume data as the snapshot brought it, for the first resumed
    /// OPEN (so an adopted tunnel does not unpack what it just packed).
    fresh: Option<Box<Resume>>,
}

#[derive(Debug)]
enum Attachment {
    /// On a WSM stream that was accepted; the WSM takes frames up to `max_frame`.
    Attached {
        max_frame: u32,
    },
    Held(Box<Held>),
}

/// How a resumed OPEN was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenAnswer {
    Accepted {
        max_frame: u32,
    },
    Refused,
    /// The link or the stream went away first.
    Gone,
}

/// What a held tunnel asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldWants {
    Nothing,
    /// An OPEN on some link; `paced`: only when the shard's resume pacer
    /// grants a turn (a stream moved by plan or adopted was paced already).
    Reopen {
        paced: bool,
    },
    /// A live upgrade is under way and this tunnel is on no link: it moves
    /// as it is, held messages and all.
    HandOver,
}

/// The established tunnel's state.
pub struct Tunnel {
    pub rl: RecordLayer,
    /// Frame decoder, present only while a frame or message is partial.
    dec: Option<Box<Decoder>>,
    /// What a successor process (or another WSM) needs to re-open the stream.
    resume: PackedResume,
    attachment: Attachment,
    /// Shared by the shard's tunnels.
    limits: Rc<Limits>,
    last_rx: Instant,
    last_ping: Instant,
    /// Last message either way; expanded keys are dropped [`COOL_AFTER`] later.
    last_active: Instant,
    /// Close code from the device's close frame (1006 until one arrives).
    device_close_code: u16,
    /// HANDOFF sent: the ack is awaited until then.
    quiesce_until: Option<Instant>,
    /// Queued for the shell, oldest first (a handful at a time).
    actions: Vec<Action>,
}

/// What one read produced, before it is acted on.
#[derive(Default)]
struct Work {
    events: Vec<Event>,
    /// Record-layer replies (KeyUpdate answers), already sealed.
    replies: Vec<u8>,
    /// A WebSocket error found while decoding; acted on after the events before it.
    pending_err: Option<WsError>,
}

impl Tunnel {
    /// A tunnel whose stream the WSM just accepted.
    pub fn attached(rl: RecordLayer, resume: &Resume, dicts: &Dictionaries, limits: Rc<Limits>, max_frame: u32, now: Instant) -> Tunnel {
        Tunnel {
            rl,
            dec: None,
            resume: PackedResume::of(resume, dicts),
            attachment: Attachment::Attached { max_frame },
            limits,
            last_rx: now,
            last_ping: now,
            last_active: now,
            device_close_code: 1006,
            quiesce_until: None,
            actions: Vec::new(),
        }
    }

    /// A connection adopted in a live upgrade: no stream yet, the messages
    /// the old process held, its partial frame and the device's idle age.
    pub fn adopted(rl: RecordLayer, snap: &mut ConnSnapshot, dicts: &Dictionaries, limits: Rc<Limits>, now: Instant) -> Tunnel {
        let msgs: VecDeque<(bool, Vec<u8>)> = std::mem::take(&mut snap.held).into();
        let bytes = msgs.iter().map(|(_, m)| m.len()).sum();
        let resume_timeout = limits.resume_timeout;
        let mut t = Tunnel::attached(rl, &snap.resume, dicts, limits, codec::DEFAULT_MAX_FRAME, now);
        t.dec = snap.decoder.take().map(Box::new);
        t.last_rx = now.checked_sub(Duration::from_millis(snap.idle_ms)).unwrap_or(now);
        t.attachment = Attachment::Held(Box::new(Held {
            msgs,
            bytes,
            phase: Phase::Waiting,
            close_at: now + resume_timeout,
            planned: true,
            adopted: true,
            fresh: Some(Box::new(std::mem::replace(
                &mut snap.resume,
                Resume { chain: Vec::new(), request: Default::default(), subprotocol: None },
            ))),
        }));
        t.count(Count::HeldBytes(bytes as i64));
        t.count(Count::Held(true));
        t
    }

    /// Whether the tunnel carried a message within [`COOL_AFTER`]: a busy
    /// tunnel keeps its expanded keys (and the shell its task) until then.
    pub fn is_hot(&self, now: Instant) -> bool {
        now < self.last_active + COOL_AFTER
    }

    /// Whether actions are queued that the shell has not taken yet.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            // Give the memory back: an idle tunnel keeps no action buffer.
            self.actions = Vec::new();
            return None;
        }
        Some(self.actions.remove(0))
    }

    fn count(&mut self, c: Count) {
        self.actions.push(Action::Count(c));
    }

    /// Answers the KeyUpdate the device asked for, if holdfast still owes it
    /// (the answer waits for holdfast's next data or the device's quiet,
    /// RFC 8446 4.6.3): on that timer, and before a hand-over's snapshot,
    /// so the new process owes nothing it cannot know.
    pub fn answer_key_update(&mut self) -> Result<(), End> {
        let mut out = Vec::new();
        self.rl.answer_key_update(&mut out).map_err(End::Record)?;
        if !out.is_empty() {
            self.actions.push(Action::Write(out));
        }
        Ok(())
    }

    /// Seals `plain` for the device.
    fn seal(&mut self, plain: &[u8]) -> Result<(), End> {
        let mut out = Vec::with_capacity(RecordLayer::sealed_len(plain.len()));
        self.rl.seal(plain, &mut out).map_err(End::Record)?;
        self.actions.push(Action::Write(out));
        Ok(())
    }

    /// Sends a WebSocket close to the device.
    /// Every path that closes the device ends the tunnel, so what it held
    /// is given back first: the shard's count agrees before the device
    /// sees the close.
    fn send_close(&mut self, code: u16, reason: &str) {
        self.drop_held();
        let mut f = Vec::new();
        frame::encode_close(&mut f, code, reason, None);
        let _ = self.seal(&f);
    }

    /// Drops the held messages (the tunnel is ending or they live elsewhere
    /// now) and gives their bytes back to the shard's count.
    fn drop_held(&mut self) {
        let n = match &mut self.attachment {
            Attachment::Held(h) if h.bytes > 0 || !h.msgs.is_empty() => {
                h.msgs.clear();
                std::mem::take(&mut h.bytes) as i64
            }
            _ => return,
        };
        self.count(Count::HeldBytes(-n));
    }

    /// Whether the tunnel is on a WSM stream that exists on its link
    /// (opening or accepted), so ending the tunnel must close it there.
    pub fn has_stream(&self) -> bool {
        match &self.attachment {
            Attachment::Attached { .. } => true,
            Attachment::Held(h) => !matches!(h.phase, Phase::Waiting),
        }
    }

    /// Whether the tunnel's stream was accepted by a WSM (attached, or
    /// flushing what it held).
    pub fn accepted(&self) -> bool {
        match &self.attachment {
            Attachment::Attached { .. } => true,
            Attachment::Held(h) => matches!(h.phase, Phase::Flushing { .. }),
        }
    }

    /// Whether the tunnel holds messages for want of a WSM.
    pub fn is_held(&self) -> bool {
        matches!(self.attachment, Attachment::Held(_))
    }

    /// Whether the device may be read now. `stream_may_send`: the stream has
    /// credit on its link; `shard_held_room`: the shard's held bytes are
    /// under its bound. A held tunnel reads while it may hold more.
    pub fn wants_read(&self, stream_may_send: bool, shard_held_room: bool) -> bool {
        if self.quiesce_until.is_some() {
            return false; // the device's bytes wait in the socket (it may move)
        }
        match &self.attachment {
            Attachment::Held(h) if !matches!(h.phase, Phase::Flushing { .. }) => {
                h.bytes < self.limits.held_bytes_per_connection && shard_held_room
            }
            _ => stream_may_send,
        }
    }

    /// Ciphertext from the device: opens every whole record (the bytes used
    /// are drained from `rx`), decodes the frames and acts on them.
    pub fn on_ciphertext(&mut self, now: Instant, rx: &mut Vec<u8>) -> Result<(), End> {
        self.last_rx = now;
        let mut w = Work::default();
        let Work { events, replies, pending_err } = &mut w;
        let (max, dec) = (self.limits.max_message as usize, &mut self.dec);
        let opened = self.rl.open_all(rx, replies, &mut |plain| {
            if pending_err.is_none() {
                let d = dec.get_or_insert_with(|| Box::new(Decoder::new(max, true)));
                *pending_err = d.feed(plain, events).err();
            }
        });
        if self.dec.as_ref().is_some_and(|d| !d.in_progress()) {
            self.dec = None;
        }
        let closed = opened.map_err(End::Record)?;
        self.act(now, w)?;
        // close_notify: answered with one, the stream closed as device gone.
        if closed { Err(End::CloseNotify) } else { Ok(()) }
    }

    /// Bytes received before the tunnel began (plaintext after the upgrade
    /// request, in the same records).
    pub fn on_early(&mut self, now: Instant, plain: &[u8]) -> Result<(), End> {
        if plain.is_empty() {
            return Ok(());
        }
        let mut w = Work::default();
        let max = self.limits.max_message as usize;
        let d = self.dec.get_or_insert_with(|| Box::new(Decoder::new(max, true)));
        w.pending_err = d.feed(plain, &mut w.events).err();
        if self.dec.as_ref().is_some_and(|d| !d.in_progress()) {
            self.dec = None;
        }
        self.act(now, w)
    }

    /// Acts on what the device sent.
    fn act(&mut self, now: Instant, mut w: Work) -> Result<(), End> {
        if !w.replies.is_empty() {
            self.actions.push(Action::Write(std::mem::take(&mut w.replies)));
        }
        let mut plain = Vec::new();
        for ev in std::mem::take(&mut w.events) {
            match ev {
                Event::Message { text, data } => {
                    self.last_active = now;
                    match &mut self.attachment {
                        Attachment::Attached { max_frame } => {
                            // A message the WSM cannot take in one frame would
                            // make it drop the link (every device on it): only
                            // this device is told, with 1009.
                            if !codec::message_fits(data.len(), *max_frame) {
                                w.pending_err = Some(WsError { code: close::TOO_BIG, reason: "message too big for the WSM" });
                                break;
                            }
                            self.actions.push(Action::Send { binary: !text, data });
                        }
                        Attachment::Held(h) => {
                            h.bytes += data.len();
                            let n = data.len() as i64;
                            h.msgs.push_back((!text, data));
                            self.count(Count::HeldBytes(n));
                        }
                    }
                    self.count(Count::MessageFromDevice);
                }
                Event::Ping(p) => frame::encode(&mut plain, op::PONG, &p, None),
                Event::Pong(_) => {}
                Event::Close { code, .. } => {
                    self.device_close_code = code.unwrap_or(1005);
                    match code {
                        Some(c) => frame::encode_close(&mut plain, c, "", None),
                        None => frame::encode(&mut plain, op::CLOSE, &[], None),
                    }
                    let _ = self.seal(&plain);
                    return Err(End::DeviceClosed);
                }
            }
        }
        if !plain.is_empty() {
            self.seal(&plain)?;
        }
        if let Some(e) = w.pending_err.take() {
            self.count(Count::WsError(e.code));
            self.send_close(e.code, e.reason);
            return Err(End::Ws(e));
        }
        Ok(())
    }

    /// Messages the WSM sent on the stream: sealed for the device, their
    /// stream credit returned once written.
    pub fn on_wsm_messages(&mut self, now: Instant, msgs: VecDeque<(bool, Vec<u8>)>) -> Result<(), End> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.last_active = now;
        let mut out = Vec::new();
        let mut bytes = 0;
        for (binary, data) in &msgs {
            frame::encode(&mut out, if *binary { op::BINARY } else { op::TEXT }, data, None);
            bytes += data.len();
        }
        self.seal(&out)?;
        self.count(Count::MessagesToDevice(msgs.len() as u64));
        self.actions.push(Action::Delivered(bytes));
        Ok(())
    }

    /// The WSM closed the stream: the device gets its code (if valid).
    pub fn on_wsm_close(&mut self, code: u16, text: &str) -> End {
        let code = if frame::valid_close_code(code) { code } else { close::NORMAL };
        self.send_close(code, text);
        End::WsmClosed
    }

    /// The stream's WSM is gone (`planned`: it moved by plan and everything
    /// sent was processed; otherwise `unacked` is what the WSM may not have
    /// processed, sent again first). `jitter` spreads the 1013 deadline.
    pub fn detach(&mut self, now: Instant, unacked: VecDeque<(bool, Vec<u8>)>, planned: bool, jitter: Duration) {
        let mut h = match std::mem::replace(&mut self.attachment, Attachment::Attached { max_frame: 0 }) {
            // Lost again while re-opening or flushing: keep the deadline.
            Attachment::Held(mut h) => {
                h.phase = Phase::Waiting;
                h
            }
            Attachment::Attached { .. } => {
                self.count(Count::StreamDetached);
                self.count(Count::Held(true));
                Box::new(Held {
                    msgs: VecDeque::new(),
                    bytes: 0,
                    phase: Phase::Waiting,
                    close_at: now + self.limits.resume_timeout + jitter,
                    planned,
                    adopted: false,
                    fresh: None,
                })
            }
        };
        if !planned && !unacked.is_empty() {
            // Oldest first, ahead of anything held since.
            let n: usize = unacked.iter().map(|(_, m)| m.len()).sum();
            self.actions.push(Action::Count(Count::MessagesResent(unacked.len() as u64)));
            for m in unacked.into_iter().rev() {
                h.msgs.push_front(m);
            }
            h.bytes += n;
            self.actions.push(Action::Count(Count::HeldBytes(n as i64)));
        }
        self.quiesce_until = None;
        self.attachment = Attachment::Held(h);
    }

    /// What a held tunnel needs now (`upgrade`: a live upgrade is under way).
    /// Gives up with 1013 once the resume time is over.
    pub fn held_wants(&mut self, now: Instant, upgrade: bool) -> Result<HeldWants, End> {
        let Attachment::Held(h) = &self.attachment else { return Ok(HeldWants::Nothing) };
        if upgrade && !matches!(h.phase, Phase::Flushing { .. }) {
            return Ok(HeldWants::HandOver);
        }
        if h.phase != Phase::Waiting {
            return Ok(HeldWants::Nothing);
        }
        if now >= h.close_at {
            let adopted = h.adopted;
            self.count(Count::ResumeFailed { adopted });
            self.send_close(close::TRY_AGAIN, "no WSM available");
            return Err(End::NoWsm);
        }
        Ok(HeldWants::Reopen { paced: !h.planned })
    }

    /// The OPEN that resumes the stream elsewhere (same connection ID, the
    /// identity it was first opened with). `None` if the identity cannot be
    /// rebuilt (then the tunnel must end: [`Tunnel::identity_lost`]).
    pub fn resumed_open(&mut self, id: ConnectionId, addr: std::net::SocketAddr) -> Option<Open> {
        let fresh = match &mut self.attachment {
            Attachment::Held(h) => h.fresh.take(),
            Attachment::Attached { .. } => None,
        };
        let r = match fresh {
            Some(r) => *r,
            None => self.resume.unpack()?,
        };
        let device = crate::identity::from_chain(r.chain, addr)?;
        Some(Open { resumed: true, connection_id: id, device, request: r.request, labels: Vec::new() })
    }

    /// The shard's budget for partial records ran out and this tunnel holds
    /// one of the oldest: it goes (1008), so that no other device stalls.
    pub fn evicted(&mut self) -> End {
        self.send_close(close::POLICY, "partial record held too long");
        End::PartialEvicted
    }

    pub fn identity_lost(&mut self) -> End {
        self.send_close(close::INTERNAL, "identity lost");
        End::NoWsm
    }

    /// The resumed OPEN went out on a link.
    pub fn reopening(&mut self, now: Instant) {
        if let Attachment::Held(h) = &mut self.attachment {
            h.phase = Phase::Opening(now);
        }
    }

    /// The resumed OPEN was answered.
    pub fn on_open_answer(&mut self, answer: OpenAnswer) {
        let Attachment::Held(h) = &mut self.attachment else { return };
        if !matches!(h.phase, Phase::Opening(_)) {
            return;
        }
        h.phase = match answer {
            OpenAnswer::Accepted { max_frame } => Phase::Flushing { max_frame },
            OpenAnswer::Refused | OpenAnswer::Gone => Phase::Waiting,
        };
    }

    /// Sends held messages while the stream has credit: `send` sends one
    /// message if the stream may send now and says whether it did. Once all
    /// are sent the tunnel is attached again.
    pub fn flush_held(&mut self, send: &mut dyn FnMut(bool, &[u8]) -> bool) -> Result<(), End> {
        let Attachment::Held(h) = &mut self.attachment else { return Ok(()) };
        let Phase::Flushing { max_frame } = h.phase else { return Ok(()) };
        while let Some((binary, m)) = h.msgs.front() {
            // The new WSM may take smaller frames than the one that died.
            if !codec::message_fits(m.len(), max_frame) {
                self.actions.push(Action::Count(Count::WsError(close::TOO_BIG)));
                self.send_close(close::TOO_BIG, "message too big for the WSM");
                return Err(End::Ws(WsError { code: close::TOO_BIG, reason: "message too big for the WSM" }));
            }
            if !send(*binary, m) {
                break;
            }
            let Some((_, m)) = h.msgs.pop_front() else { break };
            h.bytes -= m.len();
            self.actions.push(Action::Count(Count::HeldBytes(-(m.len() as i64))));
        }
        if h.msgs.is_empty() {
            let adopted = h.adopted;
            self.attachment = Attachment::Attached { max_frame };
            self.count(Count::Held(false));
            self.count(Count::Resumed { adopted });
        }
        Ok(())
    }

    /// Starts moving the stream: HANDOFF, then wait for its ack (at most
    /// [`HANDOFF_ACK_TIMEOUT`]). False if there is no accepted stream.
    pub fn begin_quiesce(&mut self, now: Instant) -> bool {
        if !self.accepted() || !self.has_stream() {
            return false;
        }
        self.actions.push(Action::Handoff);
        self.quiesce_until = Some(now + HANDOFF_ACK_TIMEOUT);
        true
    }

    /// Until when the HANDOFF ack is awaited.
    pub fn quiesce_deadline(&self) -> Option<Instant> {
        self.quiesce_until
    }

    /// The quiesce is over (acked, link lost, or timed out).
    pub fn end_quiesce(&mut self) {
        self.quiesce_until = None;
    }

    /// After a HANDOFF ack: the WSM processed everything sent and sends
    /// nothing more, so the stream is closed as handed elsewhere and the
    /// tunnel re-opens (by plan) elsewhere.
    pub fn leave_quiesced(&mut self, now: Instant, moved: bool) {
        self.quiesce_until = None;
        self.actions.push(Action::CloseStream { reason: CloseReason::HandedElsewhere, code: 1000, text: String::new() });
        if moved {
            self.count(Count::StreamMoved);
        }
        self.detach(now, VecDeque::new(), true, Duration::ZERO);
    }

    /// A snapshot for a live upgrade: copies, so a hand-over that fails
    /// keeps everything; [`Tunnel::handed_over`] commits it.
    pub fn snapshot(&self, id: ConnectionId, addr: String, rx: Vec<u8>, now: Instant) -> ConnSnapshot {
        let held = match &self.attachment {
            Attachment::Held(h) => h.msgs.iter().cloned().collect(),
            Attachment::Attached { .. } => Vec::new(),
        };
        ConnSnapshot {
            id,
            addr,
            record: self.rl.state().clone(),
            decoder: self.dec.as_deref().cloned(),
            max_message: self.limits.max_message,
            rx,
            resume: self.resume.unpack().unwrap_or_else(|| Resume { chain: Vec::new(), request: Default::default(), subprotocol: None }),
            idle_ms: now.saturating_duration_since(self.last_rx).as_millis() as u64,
            held,
        }
    }

    /// The identity and request it re-opens its stream with.
    pub fn resume(&self) -> &PackedResume {
        &self.resume
    }

    pub fn limits(&self) -> &Rc<Limits> {
        &self.limits
    }

    /// A reload changed the limits: deadlines follow from the next call on.
    pub fn set_limits(&mut self, limits: Rc<Limits>) {
        self.limits = limits;
    }

    /// The device's identity is no longer allowed (a reload or `ctl block`
    /// changed the blocklist or the CAs): close 1008, counted by `why`.
    pub fn revoked(&mut self, why: crate::tls::handshake::Refusal) -> End {
        self.count(Count::Revoked(why));
        let text = match why {
            crate::tls::handshake::Refusal::Blocked => "certificate blocked",
            crate::tls::handshake::Refusal::Expired => "certificate expired",
            _ => "issuer no longer trusted",
        };
        self.send_close(close::POLICY, text);
        End::Revoked(why)
    }

    /// An operator closes this connection (`ctl kick`) with `code` (an
    /// invalid close code becomes 1008).
    pub fn kicked(&mut self, code: u16) -> End {
        let code = if frame::valid_close_code(code) { code } else { close::POLICY };
        self.send_close(code, "closed by the operator");
        End::Kicked(code)
    }

    /// holdfast closes this connection at a moment of its choosing (a
    /// drain, the graceful stop, its age, a migration): a close frame with
    /// `code` (an invalid one becomes 1001), then close_notify.
    pub fn paced(&mut self, why: super::end::Paced, code: u16) -> End {
        let code = if frame::valid_close_code(code) { code } else { close::GOING_AWAY };
        self.send_close(code, why.text());
        End::Paced(why, code)
    }

    /// The snapshot went to the new process: what it carries lives there now.
    pub fn handed_over(&mut self) -> End {
        let close = self.has_stream();
        self.drop_held();
        if self.is_held() {
            self.count(Count::Held(false));
        }
        self.attachment = Attachment::Attached { max_frame: 0 };
        self.dec = None;
        if close {
            self.actions.push(Action::CloseStream { reason: CloseReason::HandedElsewhere, code: 1000, text: String::new() });
        }
        End::HandedOver
    }

    /// Timers: the idle close, a ping, a resumed OPEN left unanswered, a
    /// KeyUpdate the device asked for and has waited for, and dropping
    /// expanded keys of a quiet tunnel.
    pub fn on_tick(&mut self, now: Instant) -> Result<(), End> {
        if let Attachment::Held(h) = &mut self.attachment
            && let Phase::Opening(at) = h.phase
            && now >= at + self.limits.open_timeout
        {
            h.phase = Phase::Waiting;
            self.actions.push(Action::CloseStream { reason: CloseReason::Error, code: close::INTERNAL, text: "resume timeout".into() });
        }
        if self.limits.idle_timeout.is_some_and(|d| now >= self.last_rx + d) {
            self.count(Count::IdleTimeout);
            self.send_close(close::GOING_AWAY, "idle timeout");
            return Err(End::Idle);
        }
        if self.limits.ping_interval.is_some_and(|p| now >= self.last_rx.max(self.last_ping) + p) {
            let mut f = Vec::new();
            frame::encode(&mut f, op::PING, b"", None);
            self.seal(&f)?;
            self.last_ping = now;
        }
        if self.key_update_due().is_some_and(|due| now >= due) {
            self.answer_key_update()?;
        }
        if now >= self.last_active + COOL_AFTER {
            self.rl.cool();
        }
        Ok(())
    }

    /// When [`Tunnel::on_tick`] (or [`Tunnel::held_wants`]) must run next.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let idle = self.limits.idle_timeout.map(|d| self.last_rx + d);
        let ping = self.limits.ping_interval.map(|p| self.last_rx.max(self.last_ping) + p);
        let cool = (now < self.last_active + COOL_AFTER).then_some(self.last_active + COOL_AFTER);
        let held = match &self.attachment {
            Attachment::Held(h) => match h.phase {
                Phase::Opening(at) => Some((at + self.limits.open_timeout).min(h.close_at)),
                Phase::Flushing { .. } => None,
                // Looks for a link and a turn on the shard's next tick.
                Phase::Waiting => Some(h.close_at.min(now + Duration::from_millis(250))),
            },
            Attachment::Attached { .. } => None,
        };
        [idle, ping, cool, held, self.quiesce_until, self.key_update_due()].into_iter().flatten().min()
    }

    /// When the KeyUpdate the device asked for goes out with no data to
    /// carry it (`tls::record::KEY_UPDATE_QUIET` after the device's last
    /// bytes): a device waiting for it gets it, a burst of requests (a
    /// flood included) one answer.
    fn key_update_due(&self) -> Option<Instant> {
        self.rl.key_update_due(self.last_rx)
    }

    /// The tunnel ends: the CLOSE its stream needs (if it has one and the
    /// WSM did not end it), and the shard's held bytes given back.
    pub fn end(&mut self, end: &End) {
        if self.has_stream()
            && let Some((reason, code, text)) = end.stream_close(self.device_close_code)
        {
            self.actions.push(Action::CloseStream { reason, code, text });
        }
        self.drop_held();
        if self.is_held() {
            self.count(Count::Held(false));
        }
        self.attachment = Attachment::Attached { max_frame: 0 };
    }

    /// The TLS goodbye bytes for this end (alert, close_notify, or none).
    pub fn goodbye(&mut self, end: &End) -> Vec<u8> {
        goodbye(&mut self.rl, end)
    }

    /// Bytes of state this tunnel holds while idle (itself and what it owns
    /// on the heap: key material, what a resumed OPEN needs).
    pub fn state_bytes(&self) -> u64 {
        let st = self.rl.state();
        (std::mem::size_of::<Tunnel>() + st.handshake_buf.capacity() + self.resume.heap_bytes()) as u64
    }
}

/// The TLS goodbye bytes for `end` on a record layer.
pub fn goodbye(rl: &mut RecordLayer, end: &End) -> Vec<u8> {
    let mut out = Vec::new();
    match end.tls_goodbye() {
        TlsGoodbye::Alert(a) => {
            let _ = rl.fatal_alert(a, &mut out);
        }
        TlsGoodbye::CloseNotify => {
            let _ = rl.close_notify(&mut out);
        }
        TlsGoodbye::Nothing => {}
    }
    out
}

#[cfg(test)]
mod tests;
