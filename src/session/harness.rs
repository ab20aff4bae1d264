//! An in-memory, virtual-time harness: a device, holdfast's tunnel core and
//! link session, and a WSM, joined without sockets (after quinn's `Pair`).
//!
//! Owns: the simulated device (its own record layer, masked frames out, a
//! decoder for what it receives), the simulated WSM (HELLO, ACCEPT when
//! asked, every frame it got), the glue the shell would be (performing the
//! core's actions on the link session, handing link events to the core),
//! and the clock. Tests drive it step by step and look at both ends. Never
//! opens a socket and never reads the real clock after its origin.
#![allow(clippy::disallowed_methods)] // one origin instant; time moves by hand
#![allow(dead_code, clippy::new_without_default)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::End;
use super::tunnel::{Action, Count, HeldWants, Limits, OpenAnswer, Tunnel};
use crate::identity::ConnectionId;
use crate::link::codec::{self, Frame, Hello, Open};
use crate::link::session::{Event as LinkEvent, LinkSession, Params};
use crate::tls::keys::Suite;
use crate::tls::record::{Opened, RecordLayer, Version, testing};
use crate::upgrade::snapshot::Resume;
use crate::ws::frame::{self, Decoder, Event, op};
use crate::ws::upgrade::UpgradeRequest;

pub const STREAM_WINDOW: u32 = 4096;
pub const LINK_WINDOW: u32 = 16384;

/// The default limits of a harnessed tunnel.
pub fn limits() -> Limits {
    Limits {
        max_message: 1 << 20,
        idle_timeout: Some(Duration::from_secs(300)),
        ping_interval: Some(Duration::from_secs(30)),
        resume_timeout: Duration::from_secs(20),
        open_timeout: Duration::from_secs(5),
        held_bytes_per_connection: 64 * 1024,
        generation: 1,
    }
}

/// A device certificate chain that parses (for re-opening streams).
fn device_chain() -> Vec<Vec<u8>> {
    let ca = crate::pki::make_ca("Harness CA").expect("CA");
    let leaf = crate::pki::make_leaf(&ca, "oven-1", vec!["oven-1".into()], false, crate::pki::Validity::Current, 7).expect("leaf");
    vec![leaf.der]
}

/// The simulated WSM at the far end of one link connection.
#[derive(Default)]
pub struct Wsm {
    /// Frames holdfast sent, in order.
    pub got: Vec<Frame>,
    unread: Vec<u8>,
    pub auto_accept: bool,
    pub max_frame: u32,
}

/// One link: holdfast's session and the WSM behind it.
pub struct LinkEnd {
    pub session: LinkSession,
    pub wsm: Wsm,
}

impl LinkEnd {
    fn new(now: Instant, max_frame: u32) -> LinkEnd {
        let params = Params {
            node: "edge".into(),
            shard: 0,
            stream_window: STREAM_WINDOW,
            link_window: LINK_WINDOW,
            max_frame: codec::DEFAULT_MAX_FRAME,
            ping_interval: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(30),
            version: codec::VERSION,
        };
        let mut l = LinkEnd { session: LinkSession::new(params, now), wsm: Wsm { auto_accept: true, max_frame, ..Default::default() } };
        let mut hello = Vec::new();
        Frame::Hello(Hello {
            version: codec::VERSION,
            role: 1,
            node: "wsm".into(),
            shard: 0,
            stream_window: STREAM_WINDOW,
            link_window: LINK_WINDOW,
            max_frame,
        })
        .encode(&mut hello);
        l.session.on_bytes(now, &hello).expect("HELLO");
        let _ = l.session.take_out(now, Vec::new()); // holdfast's HELLO
        l
    }
}

/// A device, its tunnel, and the link its stream is on.
pub struct Pair {
    pub now: Instant,
    pub id: ConnectionId,
    pub core: Tunnel,
    /// The device's record layer and what it has received.
    dev_rl: RecordLayer,
    dev_dec: Decoder,
    pub dev_events: Vec<Event>,
    /// The device got close_notify or an alert.
    pub dev_tls_closed: bool,
    /// Ciphertext from the device not yet taken by the core.
    pub to_core: Vec<u8>,
    /// Links by index; the tunnel's stream is `(link, stream id)`.
    pub links: Vec<LinkEnd>,
    pub stream: Option<(usize, u32)>,
    /// WSM messages that arrived for the tunnel and wait for delivery.
    inbox: VecDeque<(bool, Vec<u8>)>,
    handoff_acked: bool,
    pub counts: Vec<Count>,
    /// The shard's held-bytes count as the core's actions moved it, and its
    /// value when the device first saw a close frame.
    pub held: i64,
    pub held_at_close: Option<i64>,
    pub end: Option<End>,
}

impl Pair {
    /// A tunnel attached to a stream the WSM accepted, on one link.
    pub fn new() -> Pair {
        Pair::with(limits(), codec::DEFAULT_MAX_FRAME)
    }

    pub fn with(limits: Limits, wsm_max_frame: u32) -> Pair {
        let now = Instant::now();
        let (dev_rl, core_rl) = testing::pair(Version::Tls13, Suite::Aes128Gcm);
        let resume = Box::new(Resume {
            chain: device_chain(),
            request: UpgradeRequest { path: "/ws".into(), ..Default::default() },
            subprotocol: None,
        });
        let mut link = LinkEnd::new(now, wsm_max_frame);
        let _ = link.session.poll_event();
        let id = ConnectionId(0x1234);
        let open = Open {
            resumed: false,
            connection_id: id,
            device: crate::identity::from_chain(resume.chain.clone(), "127.0.0.1:4000".parse().expect("addr")).expect("identity"),
            request: resume.request.clone(),
            labels: Vec::new(),
        };
        let sid = link.session.open(open).expect("stream");
        let mut accept = Vec::new();
        Frame::Accept { stream: sid, subprotocol: None }.encode(&mut accept);
        link.session.on_bytes(now, &accept).expect("ACCEPT");
        let _ = link.session.poll_event();
        let core = Tunnel::attached(core_rl, &resume, &Default::default(), std::rc::Rc::new(limits), link.session.peer_max_frame(), now);
        let mut p = Pair {
            now,
            id,
            core,
            dev_rl,
            dev_dec: Decoder::new(usize::MAX >> 1, false),
            dev_events: Vec::new(),
            dev_tls_closed: false,
            to_core: Vec::new(),
            links: vec![link],
            stream: Some((0, sid)),
            inbox: VecDeque::new(),
            handoff_acked: false,
            counts: Vec::new(),
            held: 0,
            held_at_close: None,
            end: None,
        };
        p.settle();
        p.links[0].wsm.got.clear();
        p
    }

    /// The device sends a frame (masked, as a client must), sealed.
    pub fn device_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut f = Vec::new();
        frame::encode(&mut f, opcode, payload, Some([1, 2, 3, 4]));
        self.device_plain(&f);
    }

    pub fn device_text(&mut self, text: &str) {
        self.device_frame(op::TEXT, text.as_bytes());
    }

    /// The device sends raw plaintext (already framed), sealed.
    pub fn device_plain(&mut self, plain: &[u8]) {
        self.dev_rl.seal(plain, &mut self.to_core).expect("seal");
    }

    /// The device sends raw bytes on TCP (not sealed).
    pub fn device_raw(&mut self, bytes: &[u8]) {
        self.to_core.extend_from_slice(bytes);
    }

    /// The device starts a KeyUpdate and asks holdfast for one back.
    pub fn device_key_update(&mut self) {
        self.dev_rl.send_key_update(true, &mut self.to_core).expect("key update");
    }

    /// KeyUpdates the device has (sent, received).
    pub fn device_key_updates(&self) -> (u64, u64) {
        self.dev_rl.key_updates()
    }

    pub fn device_close_notify(&mut self) {
        self.dev_rl.close_notify(&mut self.to_core).expect("close_notify");
    }

    /// The WSM sends a frame to holdfast on link `i`.
    pub fn wsm_frame(&mut self, i: usize, f: Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        let now = self.now;
        self.links[i].session.on_bytes(now, &b).expect("WSM frame");
        self.links[i].session.after_read();
        self.settle();
    }

    /// The WSM sends a message on the tunnel's stream.
    pub fn wsm_message(&mut self, data: &[u8]) {
        let (i, stream) = self.stream.expect("stream");
        self.wsm_frame(i, Frame::Message { stream, binary: false, data: data.to_vec() });
    }

    /// Moves the clock forward and runs every timer.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.end.is_none() {
            let r = self.core.on_tick(self.now);
            self.result(r);
        }
        self.settle();
    }

    /// Link `i` dies: its session fails and hands back what was unacknowledged.
    pub fn kill_link(&mut self, i: usize) {
        let lost = self.links[i].session.fail();
        if let Some((li, sid)) = self.stream
            && li == i
        {
            let unacked = lost.into_iter().find(|(s, _)| *s == sid).map(|(_, u)| u).unwrap_or_default();
            self.stream = None;
            self.core.detach(self.now, unacked, false, Duration::ZERO);
        }
        self.settle();
    }

    /// A new link to another WSM.
    pub fn add_link(&mut self, max_frame: u32) -> usize {
        let mut l = LinkEnd::new(self.now, max_frame);
        let _ = l.session.poll_event();
        self.links.push(l);
        self.links.len() - 1
    }

    /// The tunnel moves by plan (goaway): HANDOFF, the WSM's ack, CLOSE.
    pub fn begin_move(&mut self) -> bool {
        let started = self.core.begin_quiesce(self.now);
        self.settle();
        started
    }

    /// The WSM acknowledges a HANDOFF.
    pub fn wsm_handoff_ack(&mut self) {
        let (i, stream) = self.stream.expect("stream");
        self.wsm_frame(i, Frame::HandoffAck { stream });
    }

    /// Everything the WSM of link `i` got since the last look.
    pub fn wsm_got(&mut self, i: usize) -> Vec<Frame> {
        std::mem::take(&mut self.links[i].wsm.got)
    }

    /// Everything the device got since the last look.
    pub fn device_got(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.dev_events)
    }

    /// The core ended the tunnel by a call made outside the harness (as the
    /// shell does, e.g. an eviction): finish it and settle.
    pub fn end_with(&mut self, e: End) {
        self.result(Err(e));
        self.settle();
    }

    fn result(&mut self, r: Result<(), End>) {
        if let Err(e) = r
            && self.end.is_none()
        {
            self.core.end(&e);
            let bye = self.core.goodbye(&e);
            self.deliver_to_device(&bye);
            self.end = Some(e);
        }
    }

    fn deliver_to_device(&mut self, wire: &[u8]) {
        let mut buf = wire.to_vec();
        let mut reply = Vec::new();
        loop {
            match self.dev_rl.open(&mut buf, &mut reply) {
                Ok(Opened::Data { consumed, start, end }) => {
                    let plain = buf[start..end].to_vec();
                    buf.drain(..consumed);
                    let _ = self.dev_dec.feed(&plain, &mut self.dev_events);
                    if self.held_at_close.is_none() && self.dev_events.iter().any(|e| matches!(e, Event::Close { .. })) {
                        self.held_at_close = Some(self.held);
                    }
                }
                Ok(Opened::Control { consumed }) => {
                    buf.drain(..consumed);
                }
                Ok(Opened::CloseNotify { consumed }) => {
                    buf.drain(..consumed);
                    self.dev_tls_closed = true;
                }
                Ok(Opened::NeedMore) => break,
                Err(_) => {
                    self.dev_tls_closed = true;
                    break;
                }
            }
        }
    }

    /// Runs everything to quiescence: the device's bytes into the core (if
    /// it wants to read), the core's actions, the link sessions' output to
    /// their WSMs, link events back to the core, held-stream progress.
    pub fn settle(&mut self) {
        for _ in 0..64 {
            let mut moved = false;
            // Device -> core.
            if self.end.is_none() && !self.to_core.is_empty() {
                let may_send = self.stream.is_some_and(|(i, s)| self.links[i].session.may_send(s));
                if self.core.wants_read(may_send, true) {
                    let mut rx = std::mem::take(&mut self.to_core);
                    let before = rx.len();
                    let r = self.core.on_ciphertext(self.now, &mut rx);
                    moved |= rx.len() != before;
                    self.to_core = rx;
                    self.result(r);
                }
            }
            moved |= self.perform();
            // Link -> WSM, and the WSM's automatic answers.
            for i in 0..self.links.len() {
                let out = self.links[i].session.take_out(self.now, Vec::new());
                if out.is_empty() {
                    continue;
                }
                moved = true;
                self.links[i].wsm.unread.extend_from_slice(&out);
                let mut off = 0;
                let mut answers = Vec::new();
                let unread = std::mem::take(&mut self.links[i].wsm.unread);
                while let Ok(Some((f, used))) = Frame::decode(&unread[off..], codec::LARGEST_FRAME) {
                    off += used;
                    if let (Frame::Open { stream, .. }, true) = (&f, self.links[i].wsm.auto_accept) {
                        answers.push(Frame::Accept { stream: *stream, subprotocol: None });
                    }
                    self.links[i].wsm.got.push(f);
                }
                self.links[i].wsm.unread = unread[off..].to_vec();
                for a in answers {
                    let mut b = Vec::new();
                    a.encode(&mut b);
                    let now = self.now;
                    self.links[i].session.on_bytes(now, &b).expect("answer");
                }
            }
            // Link events -> the tunnel.
            for i in 0..self.links.len() {
                while let Some(ev) = self.links[i].session.poll_event() {
                    moved = true;
                    let ours = |s: u32| self.stream == Some((i, s));
                    match ev {
                        LinkEvent::Message { stream, binary, data } if ours(stream) => self.inbox.push_back((binary, data)),
                        LinkEvent::Closed { stream, code, text } if ours(stream) && self.end.is_none() => {
                            self.stream = None;
                            let e = self.core.on_wsm_close(code, &text);
                            self.result(Err(e));
                        }
                        LinkEvent::Accepted { stream, .. } if ours(stream) => {
                            let max_frame = self.links[i].session.peer_max_frame();
                            self.core.on_open_answer(OpenAnswer::Accepted { max_frame });
                        }
                        LinkEvent::Refused { stream, .. } if ours(stream) => {
                            self.stream = None;
                            self.core.on_open_answer(OpenAnswer::Refused);
                        }
                        LinkEvent::HandoffAcked { stream } if ours(stream) => self.handoff_acked = true,
                        _ => {}
                    }
                }
            }
            if self.end.is_none() && !self.inbox.is_empty() {
                let msgs = std::mem::take(&mut self.inbox);
                let r = self.core.on_wsm_messages(self.now, msgs);
                self.result(r);
                moved = true;
            }
            if self.handoff_acked && self.end.is_none() {
                self.handoff_acked = false;
                self.core.end_quiesce();
                self.core.leave_quiesced(self.now, true);
                moved |= self.perform();
            }
            if self.end.is_none() && self.core.is_held() {
                moved |= self.held_step();
            }
            if !moved {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    /// The shell's part of holding: flush, or re-open on the last link.
    fn held_step(&mut self) -> bool {
        if self.core.accepted() {
            let Some((i, sid)) = self.stream else { return false };
            let session = &mut self.links[i].session;
            let r = self.core.flush_held(&mut |binary, data| session.may_send(sid) && session.send(sid, binary, data));
            self.result(r);
            return self.perform();
        }
        if self.core.has_stream() {
            return false;
        }
        match self.core.held_wants(self.now, false) {
            Err(e) => {
                self.result(Err(e));
                true
            }
            Ok(HeldWants::Reopen { .. }) => {
                let Some(i) = (0..self.links.len()).rev().find(|&i| self.links[i].session.accepts_streams()) else { return false };
                let open = self.core.resumed_open(self.id, "127.0.0.1:4000".parse().expect("addr")).expect("identity");
                let Some(sid) = self.links[i].session.open(open) else { return false };
                self.stream = Some((i, sid));
                self.core.reopening(self.now);
                true
            }
            Ok(_) => false,
        }
    }

    /// Performs the core's actions as the shell would; true if any.
    fn perform(&mut self) -> bool {
        let mut any = false;
        while let Some(a) = self.core.poll_action() {
            any = true;
            match a {
                Action::Write(b) => self.deliver_to_device(&b),
                Action::Send { binary, data } => {
                    if let Some((i, s)) = self.stream {
                        self.links[i].session.send(s, binary, &data);
                    }
                }
                Action::Delivered(n) => {
                    if let Some((i, s)) = self.stream {
                        self.links[i].session.delivered(s, n);
                    }
                }
                Action::CloseStream { reason, code, text } => {
                    if let Some((i, s)) = self.stream.take() {
                        self.links[i].session.close(s, reason, code, &text);
                    }
                }
                Action::Handoff => {
                    if let Some((i, s)) = self.stream {
                        self.links[i].session.handoff(s);
                    }
                }
                Action::Count(c) => {
                    if let Count::HeldBytes(n) = c {
                        self.held += n;
                    }
                    self.counts.push(c);
                }
            }
        }
        any
    }
}
