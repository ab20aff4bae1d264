//! A device connection before its tunnel, as a sans-io machine: the
//! forward-only stages *handshaking* -> *upgrading* -> *opening*, after which
//! the connection either becomes its [`Tunnel`](super::tunnel::Tunnel)
//! (streaming, attached to a link or held) or ends (closing).
//!
//! Owns: every decision of set-up. The TLS handshake (fed the device's
//! bytes; its replies and alerts queued to write), the device's identity
//! from its validated chain, opening the device's records and parsing its
//! upgrade request, the OPEN for the WSM and what its answer means (the
//! 101 with a checked subprotocol, or an HTTP error with the stream closed
//! where it is left open, via [`super::setup`]), each stage's deadline and
//! what its expiry means (a refused handshake, 408, 504), and what is kept
//! to resume the stream later. Fed bytes, the OPEN's fate and `now`;
//! queues [`SetupAction`]s. Never does I/O, never reads the clock, never
//! picks a link: the shell (`shard::conn`) does, and tells it what became
//! of the OPEN.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::end::End;
use super::setup::{self, OpenOutcome, Refuse, SetupCount};
use crate::identity::{ConnectionId, DeviceIdentity};
use crate::link::codec::{CloseReason, Open};
use crate::tls::handshake::{Handshake, HandshakeError, Progress, Refusal};
use crate::tls::record::RecordLayer;
use crate::upgrade::snapshot::Resume;
use crate::ws::upgrade::{self, UpgradeRequest};

/// What set-up decides by (from `tls`, `websocket` and `upstream`).
#[derive(Debug, Clone)]
pub struct SetupLimits {
    pub handshake_timeout: Duration,
    pub upgrade_timeout: Duration,
    pub open_timeout: Duration,
    pub max_request_bytes: usize,
    /// Request headers passed on to the WSM (lowercase names).
    pub forward_headers: Vec<String>,
    /// Records under one TLS 1.3 key before holdfast updates it.
    pub key_update_after: u64,
}

/// Where a connection is. Stages only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The TLS handshake, until the device's certificate is validated.
    Handshaking,
    /// Waiting for the device's WebSocket upgrade request.
    Upgrading,
    /// The stream's OPEN is out; waiting for the WSM's answer.
    Opening,
    /// Set up: the connection is its tunnel now.
    Streaming,
    /// Ending: the device has been told why, if it could be.
    Closing,
}

/// What the shell waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Bytes from the device (or the deadline).
    Read,
    /// To be told where the OPEN went ([`Setup::on_open_sent`]).
    Link,
    /// The WSM's answer to the OPEN (or the deadline).
    OpenAnswer,
    /// Nothing: set-up is over.
    Nothing,
}

/// The connection is set up: what its tunnel starts from.
pub struct Ready {
    pub rl: RecordLayer,
    pub resume: Box<Resume>,
    /// Device bytes that came after the upgrade request (its first frames).
    pub early: Vec<u8>,
}

/// The connection ends. `rl` is there once the handshake was done (the
/// shell says its TLS goodbye with it).
pub struct Ended {
    pub end: End,
    pub rl: Option<RecordLayer>,
}

/// What the shell must do, in order.
pub enum SetupAction {
    /// Bytes for the device (handshake records, alerts, a sealed HTTP response).
    Write(Vec<u8>),
    /// The handshake is done and this validated chain (leaf first) was
    /// presented (for the shell's handshake metrics).
    Handshaken(Vec<Vec<u8>>),
    /// Open a stream on a WSM link; then call [`Setup::on_open_sent`].
    Open(Box<Open>),
    /// Close the stream the OPEN made (the WSM still has it).
    CloseStream { reason: CloseReason, code: u16, text: String },
    /// Set-up was refused with an HTTP error: count it (and log `reason`).
    Refused { count: SetupCount, reason: String },
    /// The 101 went out: the connection is its tunnel now.
    Established(Box<Ready>),
    /// The connection ends.
    Ended(Box<Ended>),
}

enum State {
    Handshaking(Box<Handshake>),
    Upgrading {
        rl: RecordLayer,
        identity: Box<DeviceIdentity>,
        request: Vec<u8>,
    },
    /// The OPEN is being placed (`Want::Link`) or is out (`Want::OpenAnswer`).
    Opening {
        rl: RecordLayer,
        resume: Box<Resume>,
        key: String,
        early: Vec<u8>,
        sent: bool,
    },
    Done,
}

/// One connection's set-up.
pub struct Setup {
    stage: Stage,
    state: State,
    id: ConnectionId,
    addr: SocketAddr,
    limits: std::rc::Rc<SetupLimits>,
    deadline: Instant,
    /// When the device last sent bytes: a KeyUpdate it asked for is
    /// answered once it has been quiet a while (`RecordLayer::key_update_due`).
    last_rx: Instant,
    /// The write in flight is the refusal's response (its failure changes nothing).
    refusing: bool,
    actions: VecDeque<SetupAction>,
}

impl Setup {
    /// A connection just accepted: the handshake starts.
    /// `admit`: who judges a resumed TLS session and the wall clock (Unix
    /// seconds) to judge at (see `tls::handshake::Handshake::new`).
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        admit: Option<(Arc<crate::tls::verify::DeviceVerifier>, i64)>,
        limits: std::rc::Rc<SetupLimits>,
        id: ConnectionId,
        addr: SocketAddr,
        now: Instant,
    ) -> Setup {
        let deadline = now + limits.handshake_timeout;
        let mut s = Setup::blank(id, addr, limits, now, deadline);
        match Handshake::new(tls, s.limits.key_update_after, admit) {
            Ok(hs) => s.state = State::Handshaking(Box::new(hs)),
            Err(e) => s.end(End::Refused(Box::new(e)), None),
        }
        s
    }

    /// A connection whose handshake is done, for tests and fuzzing (with
    /// record layers of fixed keys, `tls::record::testing::pair`).
    pub fn after_handshake(rl: RecordLayer, identity: DeviceIdentity, limits: std::rc::Rc<SetupLimits>, now: Instant) -> Setup {
        let addr = identity.addr.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1)));
        let mut s = Setup::blank(ConnectionId(1), addr, limits, now, now);
        s.enter(Stage::Upgrading, now);
        s.state = State::Upgrading { rl, identity: Box::new(identity), request: Vec::new() };
        s
    }

    /// At the start, with no state yet.
    fn blank(id: ConnectionId, addr: SocketAddr, limits: std::rc::Rc<SetupLimits>, now: Instant, deadline: Instant) -> Setup {
        Setup {
            stage: Stage::Handshaking,
            state: State::Done,
            id,
            addr,
            limits,
            deadline,
            last_rx: now,
            refusing: false,
            actions: VecDeque::new(),
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// When [`Setup::on_timeout`] must run: the current stage's timeout,
    /// or sooner a KeyUpdate answer falling due.
    pub fn deadline(&self) -> Instant {
        match self.key_update_due() {
            Some(due) => due.min(self.deadline),
            None => self.deadline,
        }
    }

    /// When the KeyUpdate the device asked for goes out with no data to
    /// carry it (RFC 8446 4.6.3): once the device has been quiet a while,
    /// so a device waiting for it is not left waiting and a burst of
    /// requests gets one answer.
    fn key_update_due(&self) -> Option<Instant> {
        match &self.state {
            State::Upgrading { rl, .. } => rl.key_update_due(self.last_rx),
            _ => None,
        }
    }

    pub fn wants(&self) -> Want {
        match &self.state {
            State::Handshaking(_) | State::Upgrading { .. } => Want::Read,
            State::Opening { sent: false, .. } => Want::Link,
            State::Opening { sent: true, .. } => Want::OpenAnswer,
            State::Done => Want::Nothing,
        }
    }

    pub fn poll_action(&mut self) -> Option<SetupAction> {
        self.actions.pop_front()
    }

    fn enter(&mut self, next: Stage, now: Instant) {
        debug_assert!(next > self.stage, "stages only move forward: {:?} -> {next:?}", self.stage);
        self.stage = next;
        // The open timeout starts when a link takes the OPEN (`on_open_sent`).
        if next == Stage::Upgrading {
            self.deadline = now + self.limits.upgrade_timeout;
        }
    }

    fn end(&mut self, end: End, rl: Option<RecordLayer>) {
        self.stage = Stage::Closing;
        self.state = State::Done;
        self.actions.push_back(SetupAction::Ended(Box::new(Ended { end, rl })));
    }

    /// Answers with an HTTP error and ends.
    fn refuse(&mut self, mut rl: RecordLayer, r: Refuse, stream_open: bool) {
        self.actions.push_back(SetupAction::Refused { count: r.count, reason: r.reason.clone() });
        if stream_open && let Some((reason, code, text)) = &r.close_stream {
            self.actions.push_back(SetupAction::CloseStream { reason: *reason, code: *code, text: text.clone() });
        }
        let mut out = Vec::new();
        if rl.seal(&r.response(), &mut out).is_ok() {
            self.actions.push_back(SetupAction::Write(out));
            self.refusing = true;
        }
        self.end(r.end, Some(rl));
    }

    /// Bytes from the device, at the front of `buf`: what is used is drained
    /// (a partial record stays for the next read).
    pub fn on_bytes(&mut self, now: Instant, buf: &mut Vec<u8>) {
        self.last_rx = now;
        match std::mem::replace(&mut self.state, State::Done) {
            State::Handshaking(mut hs) => {
                let mut out = Vec::new();
                let progress = hs.feed(buf, &mut out);
                buf.clear();
                if !out.is_empty() {
                    self.actions.push_back(SetupAction::Write(out));
                }
                match progress {
                    Ok(Progress::Continue) => self.state = State::Handshaking(hs),
                    Ok(Progress::Finished) => self.handshaken(now, *hs, buf),
                    Err(e) => self.end(End::Refused(Box::new(e)), None),
                }
            }
            State::Upgrading { rl, identity, request } => self.upgrading(now, rl, identity, request, buf),
            other => self.state = other,
        }
    }

    fn handshaken(&mut self, now: Instant, hs: Handshake, buf: &mut Vec<u8>) {
        let est = match hs.finish() {
            Ok(est) => est,
            Err(e) => return self.end(End::Refused(Box::new(e)), None),
        };
        let rl = match RecordLayer::new(est.record) {
            Ok(rl) => rl,
            Err(e) => return self.end(End::Record(e), None),
        };
        self.actions.push_back(SetupAction::Handshaken(est.chain.clone()));
        let leaf = est.chain.first().cloned();
        let Some(identity) = crate::identity::from_chain(est.chain, self.addr) else {
            let e = HandshakeError { presented: leaf, ..HandshakeError::new(Refusal::BadHandshake, "device certificate does not parse") };
            return self.end(End::Refused(Box::new(e)), Some(rl));
        };
        self.enter(Stage::Upgrading, now);
        // What came after the handshake's last record is the upgrade's start.
        buf.extend_from_slice(&est.leftover);
        self.upgrading(now, rl, Box::new(identity), Vec::new(), buf);
    }

    fn upgrading(&mut self, now: Instant, mut rl: RecordLayer, identity: Box<DeviceIdentity>, mut request: Vec<u8>, buf: &mut Vec<u8>) {
        let mut replies = Vec::new();
        let closed = match rl.open_all(buf, &mut replies, &mut |p| request.extend_from_slice(p)) {
            Ok(c) => c,
            Err(e) => return self.end(End::Record(e), Some(rl)),
        };
        if !replies.is_empty() {
            self.actions.push_back(SetupAction::Write(replies));
        }
        let l = &self.limits;
        match upgrade::parse(&request, l.max_request_bytes, &l.forward_headers) {
            Ok(Some((r, used))) => {
                let early = request.split_off(used);
                self.open(now, rl, *identity, r, early);
            }
            Ok(None) if closed => self.end(End::CloseNotify, Some(rl)),
            Ok(None) => self.state = State::Upgrading { rl, identity, request },
            Err(e) => self.refuse(rl, setup::bad_upgrade(e.status, e.reason), false),
        }
    }

    fn open(&mut self, now: Instant, rl: RecordLayer, identity: DeviceIdentity, request: UpgradeRequest, early: Vec<u8>) {
        let key = request.key.clone();
        let resume = Box::new(Resume {
            chain: identity.chain.clone(),
            request: UpgradeRequest { key: String::new(), ..request.clone() },
            subprotocol: None,
        });
        self.enter(Stage::Opening, now);
        self.actions.push_back(SetupAction::Open(Box::new(Open {
            resumed: false,
            connection_id: self.id,
            device: identity,
            request,
            labels: Vec::new(),
        })));
        self.state = State::Opening { rl, resume, key, early, sent: false };
    }

    /// Where the OPEN went: `true` if a link took it (its answer is awaited
    /// until the deadline), `false` if no link could.
    pub fn on_open_sent(&mut self, now: Instant, taken: bool) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Opening { rl, resume, key, early, sent: false } => {
                if taken {
                    self.deadline = now + self.limits.open_timeout;
                    self.state = State::Opening { rl, resume, key, early, sent: true };
                } else {
                    self.refuse(rl, setup::no_wsm(), false);
                }
            }
            other => self.state = other,
        }
    }

    /// Admission control sheds the device instead of opening its stream
    /// (the OPEN was not placed): 503 with `Retry-After: retry_after`.
    pub fn on_shed(&mut self, why: crate::admission::Shed, retry_after: u32) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Opening { rl, sent: false, .. } => self.refuse(rl, setup::shed(why, retry_after), false),
            other => self.state = other,
        }
    }

    /// The WSM's answer to the OPEN (or that none will come).
    pub fn on_open_answer(&mut self, outcome: OpenOutcome) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Opening { mut rl, mut resume, key, early, sent: true } => {
                match setup::answer_open(outcome, &resume.request.subprotocols) {
                    Ok(subprotocol) => {
                        let mut out = Vec::new();
                        if let Err(e) = rl.seal(&upgrade::response_101(&key, subprotocol.as_deref()), &mut out) {
                            self.actions.push_back(SetupAction::CloseStream {
                                reason: CloseReason::Error,
                                code: crate::ws::frame::close::INTERNAL,
                                text: "internal error".into(),
                            });
                            return self.end(End::Record(e), Some(rl));
                        }
                        self.actions.push_back(SetupAction::Write(out));
                        resume.subprotocol = subprotocol;
                        self.stage = Stage::Streaming;
                        self.actions.push_back(SetupAction::Established(Box::new(Ready { rl, resume, early })));
                    }
                    Err(r) => self.refuse(rl, r, true),
                }
            }
            other => self.state = other,
        }
    }

    /// The device connection failed or closed (a read or a write).
    pub fn on_io_error(&mut self, end: End) {
        if self.refusing {
            return; // the refusal ends the connection anyway
        }
        // A 101 that could not be written leaves the WSM's stream open.
        let failed_101 = self.stage == Stage::Streaming;
        let rl = match std::mem::replace(&mut self.state, State::Done) {
            State::Upgrading { rl, .. } | State::Opening { rl, .. } => Some(rl),
            _ => None,
        };
        let rl = rl.or_else(|| {
            self.actions.drain(..).find_map(|a| match a {
                SetupAction::Established(r) => Some(r.rl),
                SetupAction::Ended(e) => e.rl,
                _ => None,
            })
        });
        self.actions.clear();
        if failed_101 {
            self.actions.push_back(SetupAction::CloseStream { reason: CloseReason::DeviceGone, code: 1006, text: "write failed".into() });
        }
        self.end(end, rl);
    }

    fn answer_key_update(&mut self) {
        let State::Upgrading { rl, .. } = &mut self.state else { return };
        let mut out = Vec::new();
        match rl.answer_key_update(&mut out) {
            Ok(()) => self.actions.push_back(SetupAction::Write(out)),
            Err(e) => {
                if let State::Upgrading { rl, .. } = std::mem::replace(&mut self.state, State::Done) {
                    self.end(End::Record(e), Some(rl));
                }
            }
        }
    }

    /// [`Setup::deadline`] passed: the stage times out, or a KeyUpdate
    /// answer is due.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.key_update_due().is_some_and(|due| now >= due) {
            self.answer_key_update();
        }
        if now < self.deadline {
            return;
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::Handshaking(_) => {
                let t = self.limits.handshake_timeout;
                let e = HandshakeError::new(Refusal::Timeout, format!("no handshake within {t:?}"));
                self.end(End::Refused(Box::new(e)), None);
            }
            State::Upgrading { rl, .. } => self.refuse(rl, setup::upgrade_timeout(), false),
            State::Opening { rl, resume, key, early, sent: true } => {
                self.state = State::Opening { rl, resume, key, early, sent: true };
                self.on_open_answer(OpenOutcome::Timeout);
            }
            other => self.state = other,
        }
    }
}

#[cfg(test)]
mod tests;
