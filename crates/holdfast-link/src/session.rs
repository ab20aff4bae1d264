//! One connection of a WSM link, holdfast's side, as a sans-io machine
//! (`docs/link-protocol.md`).
//!
//! Owns: the HELLO exchange, stream IDs and each stream's phase, both
//! levels of flow-control credit ([`crate::link::credit`]), the messages
//! each stream sent that the WSM has not yet acknowledged with credit (sent
//! again elsewhere if the link dies), HANDOFF, goaway, and the link's own
//! timers (pings when holdfast has sent nothing for a while, failure when
//! the WSM has sent nothing for the liveness time). It is fed bytes read
//! from the WSM and `now`, and calls from device streams; it produces bytes
//! to write ([`LinkSession::take_out`]) and [`Event`]s for the streams.
//! Never does I/O, never reads the clock, never knows about devices beyond
//! the OPEN it is given: the shell (`shard::link`) connects, reads, writes,
//! and delivers events. One session per connection: a reconnected link
//! starts a new session, so nothing of an old connection's credit or
//! stream numbering can leak into the new one.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::codec::{self, CloseReason, Frame, Hello, Open};
use super::credit::{LinkCredit, StreamCredit};
use crate::blame::{Blame, Blamed};

/// What holdfast announces and enforces on a link connection.
#[derive(Debug, Clone)]
pub struct Params {
    pub node: String,
    pub shard: u16,
    /// Credit granted to the WSM on each stream.
    pub stream_window: u32,
    /// Credit granted to the WSM for the whole link.
    pub link_window: u32,
    /// Largest frame accepted from the WSM.
    pub max_frame: u32,
    /// A PING goes out when holdfast has written nothing for this long.
    pub ping_interval: Duration,
    /// The link fails when the WSM has sent nothing for this long.
    pub liveness_timeout: Duration,
    /// The protocol version offered in HELLO (`codec::VERSION`, or lower
    /// after a WSM refused it: [`Failure::VersionRefused`]).
    pub version: u16,
}

/// Why a link connection failed. The shell's own failures (connecting,
/// reading) are here too, so that `link_failures_total{reason}` has one
/// label set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("connect: {0}")]
    Connect(std::io::ErrorKind),
    #[error("connect timeout")]
    ConnectTimeout,
    #[error("read: {0}")]
    Read(std::io::ErrorKind),
    #[error("WSM closed the link")]
    PeerClosed,
    #[error("nothing from the WSM for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error("protocol: {0}")]
    Decode(codec::LinkError),
    #[error("first frame is not HELLO")]
    NotHello,
    #[error("second HELLO")]
    SecondHello,
    #[error("WSM speaks version {version} role {role}")]
    Version { version: u16, role: u8 },
    /// The WSM answered the HELLO with GOAWAY code 1: it does not speak
    /// the version offered. The next connection offers an older one.
    #[error("WSM refused protocol version {offered}: {text}")]
    VersionRefused { offered: u16, text: String },
    #[error("{0} from the WSM")]
    Unexpected(&'static str),
    #[error("link closed by holdfast")]
    Retired,
}

impl Blamed for Failure {
    fn blame(&self) -> Blame {
        match self {
            Failure::Connect(_) | Failure::ConnectTimeout | Failure::Read(_) => Blame::Wsm,
            Failure::Retired => Blame::Config,
            _ => Blame::Wsm,
        }
    }

    fn retry_helps(&self) -> bool {
        // A WSM that speaks another version will not change by reconnecting
        // soon, but it may be replaced (a rolling deploy): keep trying, with
        // backoff. Only a retired link is not tried again.
        !matches!(self, Failure::Retired)
    }

    fn label(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Read(_) => "read",
            Failure::PeerClosed => "peer_closed",
            Failure::Silent(_) => "liveness",
            Failure::Decode(_) => "protocol",
            Failure::NotHello | Failure::SecondHello | Failure::Unexpected(_) => "protocol",
            Failure::Version { .. } | Failure::VersionRefused { .. } => "version",
            Failure::Retired => "retired",
        }
    }
}

/// Every label [`Failure::label`] can give (pre-registered in metrics).
pub const FAILURE_LABELS: &[&str] = &["connect", "connect_timeout", "read", "peer_closed", "liveness", "protocol", "version", "retired"];

/// What happened on the link that a stream (or the shell) must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The WSM's HELLO arrived: streams may be opened.
    Up {
        node: String,
    },
    Accepted {
        stream: u32,
        subprotocol: Option<String>,
    },
    /// The stream is gone from the link.
    Refused {
        stream: u32,
        status: u16,
        reason: String,
    },
    Message {
        stream: u32,
        binary: bool,
        data: Vec<u8>,
    },
    /// The WSM closed the stream; it is gone from the link.
    Closed {
        stream: u32,
        code: u16,
        text: String,
    },
    /// The stream was blocked on its own credit and may send again.
    Writable {
        stream: u32,
    },
    /// The link was blocked on link credit and every stream may send again.
    LinkWritable,
    /// The WSM processed everything sent on the stream and sends nothing more.
    HandoffAcked {
        stream: u32,
    },
    /// No new streams on this connection.
    GoAway {
        code: u8,
        text: String,
    },
}

/// Device messages (binary?, payload) in the order they were sent.
pub type Messages = VecDeque<(bool, Vec<u8>)>;

/// A stream's phase on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Open,
    /// HANDOFF sent, waiting for its ack.
    Quiescing,
    /// HANDOFF acknowledged.
    Quiesced,
}

#[derive(Debug)]
struct Stream {
    phase: Phase,
    credit: StreamCredit,
    /// Sent messages whose stream credit has not come back (oldest first);
    /// made on the first message and dropped once all are acknowledged (a
    /// quiet stream keeps 8 bytes for it).
    unacked: Option<Box<Messages>>,
    /// Credit returned beyond the whole messages taken off `unacked` (less
    /// than the oldest message, so it fits 32 bits).
    acked_carry: u32,
}

impl Stream {
    #[cfg(test)]
    fn credit_owed(&self) -> u32 {
        self.credit.owed()
    }

    fn ack(&mut self, bytes: u32) {
        let Some(unacked) = self.unacked.as_mut() else { return };
        self.acked_carry = self.acked_carry.saturating_add(bytes);
        while let Some((_, m)) = unacked.front() {
            if m.len() as u64 > self.acked_carry as u64 {
                break;
            }
            self.acked_carry -= m.len() as u32;
            unacked.pop_front();
        }
        if unacked.is_empty() {
            // All acknowledged: a stream that went quiet keeps nothing for it.
            self.acked_carry = 0;
            self.unacked = None;
        }
    }
}

/// One link connection's state.
#[derive(Debug)]
pub struct LinkSession {
    params: Params,
    /// The WSM's HELLO, once it came.
    peer: Option<Hello>,
    goaway: bool,
    next_stream: u32,
    streams: crate::streams::StreamMap<Stream>,
    credit: LinkCredit,
    out: Vec<u8>,
    events: VecDeque<Event>,
    last_rx: Instant,
    last_tx: Instant,
    pings: u64,
}

impl LinkSession {
    /// A connection just made: holdfast's HELLO is queued to write.
    pub fn new(params: Params, now: Instant) -> LinkSession {
        let mut out = Vec::new();
        Frame::Hello(Hello {
            version: params.version,
            role: 0,
            node: params.node.clone(),
            shard: params.shard,
            stream_window: params.stream_window,
            link_window: params.link_window,
            max_frame: params.max_frame,
        })
        .encode(&mut out);
        LinkSession {
            params,
            peer: None,
            goaway: false,
            next_stream: 0,
            streams: Default::default(),
            credit: LinkCredit::default(),
            out,
            events: VecDeque::new(),
            last_rx: now,
            last_tx: now,
            pings: 0,
        }
    }

    /// Past both HELLOs.
    pub fn is_up(&self) -> bool {
        self.peer.is_some()
    }

    /// Up and not told to go away: new streams may be opened.
    pub fn accepts_streams(&self) -> bool {
        self.is_up() && !self.goaway && self.next_stream < u32::MAX
    }

    pub fn going_away(&self) -> bool {
        self.goaway
    }

    /// Streams on the link (opening, open or moving).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn stream_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.streams.keys().copied()
    }

    pub fn has_stream(&self, stream: u32) -> bool {
        self.streams.contains_key(&stream)
    }

    /// The WSM's largest frame (its HELLO), or the protocol default before it.
    pub fn peer_max_frame(&self) -> u32 {
        self.peer.as_ref().map_or(codec::DEFAULT_MAX_FRAME, |h| h.max_frame)
    }

    /// The credit the WSM has for sending on this link, as holdfast counts it.
    pub fn peer_available(&self) -> i64 {
        if self.is_up() { self.credit.peer_available() } else { 0 }
    }

    /// Bytes queued for the WSM.
    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    /// Takes the bytes to write (leaving `spare`, emptied, in their place).
    pub fn take_out(&mut self, now: Instant, mut spare: Vec<u8>) -> Vec<u8> {
        if !self.out.is_empty() {
            self.last_tx = now;
        }
        spare.clear();
        std::mem::replace(&mut self.out, spare)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Feeds bytes read from the WSM; returns how many were used (whole
    /// frames). Errors fail the connection.
    pub fn on_bytes(&mut self, now: Instant, buf: &[u8]) -> Result<usize, Failure> {
        self.last_rx = now;
        let mut off = 0;
        while let Some((frame, used)) = Frame::decode(&buf[off..], self.params.max_frame).map_err(Failure::Decode)? {
            off += used;
            self.on_frame(frame)?;
        }
        Ok(off)
    }

    /// After each read: queues the link credit of the messages it carried
    /// (they left the link for their streams, or were dropped). Returns the
    /// bytes returned, if any.
    pub fn after_read(&mut self) -> Option<u32> {
        if !self.is_up() {
            return None;
        }
        let bytes = self.credit.flush_link()?;
        Frame::Credit { stream: 0, bytes }.encode(&mut self.out);
        Some(bytes)
    }

    /// When [`LinkSession::on_tick`] must run next.
    pub fn deadline(&self) -> Instant {
        match self.ping_at() {
            Some(p) => p.min(self.silent_at()),
            None => self.silent_at(),
        }
    }

    /// When the link fails if nothing arrives before.
    pub fn silent_at(&self) -> Instant {
        self.last_rx + self.params.liveness_timeout
    }

    /// When a PING is due if nothing is written before (once up).
    pub fn ping_at(&self) -> Option<Instant> {
        self.is_up().then(|| self.last_tx + self.params.ping_interval)
    }

    /// Timers: a PING if holdfast has been quiet, failure if the WSM has.
    /// Returns true if a PING was queued.
    pub fn on_tick(&mut self, now: Instant) -> Result<bool, Failure> {
        if now >= self.last_rx + self.params.liveness_timeout {
            return Err(Failure::Silent(self.params.liveness_timeout));
        }
        if self.is_up() && now >= self.last_tx + self.params.ping_interval && self.out.is_empty() {
            self.pings += 1;
            Frame::Ping(self.pings).encode(&mut self.out);
            // Counted as sent from now, so a slow writer is not pinged twice.
            self.last_tx = now;
            return Ok(true);
        }
        Ok(false)
    }

    /// Opens a stream (OPEN queued); `None` if the link takes no new streams.
    /// The protocol version of this connection (once up).
    pub fn version(&self) -> Option<u16> {
        self.peer.as_ref().map(|h| h.version)
    }

    fn labels_spoken(&self) -> bool {
        self.version().is_some_and(|v| v >= codec::LABELS_VERSION)
    }

    pub fn open(&mut self, mut open: Open) -> Option<u32> {
        if !self.accepts_streams() {
            return None;
        }
        if !self.labels_spoken() {
            open.labels.clear(); // a version 1 WSM gets no labels
        }
        self.next_stream += 1;
        let id = self.next_stream;
        let credit = self.credit.open();
        self.streams.insert(id, Stream { phase: Phase::Opening, credit, unacked: None, acked_carry: 0 });
        Frame::Open { stream: id, open: Box::new(open) }.encode(&mut self.out);
        Some(id)
    }

    /// Tells the WSM a stream's device labels changed (version 2; nothing
    /// on a version 1 link or for a stream not on it). True if sent.
    pub fn labels(&mut self, stream: u32, labels: &[String]) -> bool {
        if !self.labels_spoken() || !self.streams.get(&stream).is_some_and(|s| matches!(s.phase, Phase::Opening | Phase::Open)) {
            return false;
        }
        Frame::Labels { stream, labels: labels.to_vec() }.encode(&mut self.out);
        true
    }

    /// Whether a device message of `len` bytes fits the WSM's frame limit
    /// (a larger one would make the WSM drop the whole link).
    pub fn fits(&self, len: usize) -> bool {
        codec::message_fits(len, self.peer_max_frame())
    }

    /// Whether `stream` may send a message now (both credits above zero).
    pub fn may_send(&self, stream: u32) -> bool {
        self.streams.get(&stream).is_some_and(|s| matches!(s.phase, Phase::Opening | Phase::Open) && self.credit.may_send(&s.credit))
    }

    /// Queues a device message on `stream` and spends its credit. False if
    /// the stream is not on this link (the message is not sent).
    pub fn send(&mut self, stream: u32, binary: bool, data: &[u8]) -> bool {
        let Some(s) = self.streams.get_mut(&stream).filter(|s| matches!(s.phase, Phase::Opening | Phase::Open)) else {
            return false;
        };
        codec::message_header(&mut self.out, stream, binary, data.len());
        self.out.extend_from_slice(data);
        s.unacked.get_or_insert_with(Default::default).push_back((binary, data.to_vec()));
        self.credit.sent(&mut s.credit, data.len());
        true
    }

    /// `n` bytes of `stream`'s messages reached the device: stream credit
    /// goes back once a quarter window is owed. Returns the bytes returned.
    pub fn delivered(&mut self, stream: u32, n: usize) -> Option<u32> {
        let s = self.streams.get_mut(&stream)?;
        let bytes = self.credit.delivered(&mut s.credit, n)?;
        Frame::Credit { stream, bytes }.encode(&mut self.out);
        Some(bytes)
    }

    /// Sends HANDOFF on `stream`: the WSM stops sending and acknowledges.
    pub fn handoff(&mut self, stream: u32) -> bool {
        let Some(s) = self.streams.get_mut(&stream) else { return false };
        s.phase = Phase::Quiescing;
        Frame::Handoff { stream }.encode(&mut self.out);
        true
    }

    /// Ends `stream` from holdfast's side (CLOSE queued if it was on the link).
    pub fn close(&mut self, stream: u32, reason: CloseReason, code: u16, text: &str) {
        if self.streams.remove(&stream).is_some() {
            Frame::Close { stream, reason, code, text: text.to_string() }.encode(&mut self.out);
        }
    }

    /// The connection is gone: every stream's unacknowledged messages, to
    /// send again, oldest first, on the streams that replace them.
    pub fn fail(&mut self) -> Vec<(u32, Messages)> {
        self.peer = None;
        self.out.clear();
        self.events.clear();
        self.credit = LinkCredit::default();
        self.streams.drain().map(|(id, s)| (id, s.unacked.map(|u| *u).unwrap_or_default())).collect()
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), Failure> {
        if self.peer.is_none() {
            let h = match f {
                Frame::Hello(h) => h,
                Frame::GoAway { code: 1, text } => return Err(Failure::VersionRefused { offered: self.params.version, text }),
                _ => return Err(Failure::NotHello),
            };
            // The WSM answers with the version it chose: ours or an older one we speak.
            if !(codec::MIN_VERSION..=self.params.version).contains(&h.version) || h.role != 1 {
                return Err(Failure::Version { version: h.version, role: h.role });
            }
            self.credit = LinkCredit::new(h.stream_window, h.link_window, self.params.stream_window, self.params.link_window);
            self.events.push_back(Event::Up { node: h.node.clone() });
            self.peer = Some(h);
            return Ok(());
        }
        match f {
            Frame::Hello(_) => return Err(Failure::SecondHello),
            Frame::Open { .. } => return Err(Failure::Unexpected("OPEN")),
            Frame::Handoff { .. } => return Err(Failure::Unexpected("HANDOFF")),
            Frame::Labels { .. } => return Err(Failure::Unexpected("LABELS")),
            Frame::Accept { stream, subprotocol } => {
                if let Some(s) = self.streams.get_mut(&stream)
                    && s.phase == Phase::Opening
                {
                    s.phase = Phase::Open;
                    self.events.push_back(Event::Accepted { stream, subprotocol });
                }
            }
            Frame::Refuse { stream, status, reason } => {
                if self.streams.remove(&stream).is_some() {
                    self.events.push_back(Event::Refused { stream, status, reason });
                }
            }
            Frame::Message { stream, binary, data } => {
                // The bytes leave the link now (for their stream, or dropped
                // in a race with CLOSE): their link credit goes back after
                // this read.
                self.credit.received(data.len());
                if self.streams.contains_key(&stream) {
                    self.events.push_back(Event::Message { stream, binary, data });
                }
            }
            Frame::Close { stream, code, text, .. } => {
                if self.streams.remove(&stream).is_some() {
                    self.events.push_back(Event::Closed { stream, code, text });
                }
            }
            Frame::Credit { stream: 0, bytes } => {
                if self.credit.link_credit(bytes) {
                    self.events.push_back(Event::LinkWritable);
                }
            }
            Frame::Credit { stream, bytes } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    let unblocked = self.credit.stream_credit(&mut s.credit, bytes);
                    s.ack(bytes);
                    if unblocked {
                        self.events.push_back(Event::Writable { stream });
                    }
                }
            }
            Frame::Ping(v) => Frame::Pong(v).encode(&mut self.out),
            Frame::Pong(_) => {}
            Frame::GoAway { code, text } => {
                self.goaway = true;
                self.events.push_back(Event::GoAway { code, text });
            }
            Frame::HandoffAck { stream } => {
                if let Some(s) = self.streams.get_mut(&stream)
                    && s.phase == Phase::Quiescing
                {
                    s.phase = Phase::Quiesced;
                    s.unacked = None;
                    self.events.push_back(Event::HandoffAcked { stream });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
