//! One persistent, multiplexed link from a shard to a WSM host.
//!
//! Owns: connecting (and reconnecting with backoff), the HELLO exchange, the
//! link's outgoing byte queue and writer task, dispatching incoming frames to
//! device streams, and both levels of flow-control credit. Never touches a
//! device socket: it talks to device tasks only through [`StreamShared`].
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use crate::config::Config;
use crate::link::codec::{self, CloseReason, Frame, Hello, Open};
use crate::link::credit::{LinkCredit, StreamCredit};
use crate::metrics::ShardMetrics;

/// Credit holdfast grants a WSM for the whole link.
pub const LINK_WINDOW: u32 = 16 << 20;

/// How a stream's open ended.
#[derive(Debug, Clone)]
pub enum OpenResult {
    Accepted(Option<String>),
    Refused(u16, String),
}

/// State shared between a device task and the link carrying its stream.
#[derive(Default)]
pub struct StreamShared {
    pub stream_id: u32,
    /// The link connection (generation) the stream was opened on: credit is
    /// only ever returned to that one (a reconnected link numbers its
    /// streams afresh).
    generation: u64,
    pub opened: Option<OpenResult>,
    /// Messages from the WSM waiting to be written to the device.
    pub inbox: VecDeque<(bool, Vec<u8>)>,
    /// This stream's flow-control credit (`link::credit`).
    credit: StreamCredit,
    /// The WSM closed the stream: close the device with this code and text.
    pub wsm_close: Option<(u16, String)>,
    /// The link carrying this stream failed.
    pub link_lost: bool,
    /// Deadline registered with the shard's timers, if any.
    pub timer_at: Option<std::time::Instant>,
    /// The WSM acknowledged a HANDOFF: nothing more will come on this stream.
    pub handoff_acked: bool,
    /// The shard asked this stream's tunnel to move to a new process.
    pub handoff_requested: bool,
    /// The WSM sent goaway: the tunnel should move its stream to another WSM.
    pub move_requested: bool,
    /// Device messages sent on this stream whose credit has not come back:
    /// the WSM may not have processed them. If the link dies they are sent
    /// again, first, on the stream that replaces this one.
    pub unacked: VecDeque<(bool, Vec<u8>)>,
    /// Credit returned beyond the whole messages taken off `unacked`.
    acked_carry: u64,
    /// The shard's partial-record budget ran out and this tunnel is one of
    /// the oldest holders: it closes (`Some(bytes it held)`, see `partial`).
    pub evict_partial: Option<u64>,
    notified: bool,
    waker: Option<Waker>,
}

pub type StreamRef = Rc<RefCell<StreamShared>>;

impl StreamShared {
    /// The WSM returned `bytes` of credit: that much of what was sent has
    /// been processed (or discarded), oldest first.
    fn ack(&mut self, bytes: u32) {
        self.acked_carry += bytes as u64;
        while let Some((_, m)) = self.unacked.front() {
            if m.len() as u64 > self.acked_carry {
                break;
            }
            self.acked_carry -= m.len() as u64;
            self.unacked.pop_front();
        }
        if self.unacked.is_empty() {
            self.acked_carry = 0;
            self.unacked.shrink_to(0);
        }
    }

    pub fn wake(&mut self) {
        self.notified = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Waits until the stream is woken by its link.
pub async fn notified(s: &StreamRef) {
    std::future::poll_fn(|cx| {
        let mut st = s.borrow_mut();
        if st.notified {
            st.notified = false;
            Poll::Ready(())
        } else {
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// A shard-wide flag its links raise when one of them must be emptied
/// (goaway, retirement), so the shard's watcher sleeps until then instead of
/// polling every link.
#[derive(Default)]
pub struct Attention {
    raised: std::cell::Cell<bool>,
    waker: std::cell::Cell<Option<Waker>>,
}

impl Attention {
    pub fn raise(&self) {
        self.raised.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Waits until raised (and lowers the flag).
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

#[derive(Default)]
struct LinkState {
    up: bool,
    goaway: bool,
    /// Incremented on every (re)connect; the writer of an old connection stops.
    generation: u64,
    out: Vec<u8>,
    spare: Vec<u8>,
    writer: Option<Waker>,
    next_stream: u32,
    streams: HashMap<u32, StreamRef>,
    peer_max_frame: u32,
    /// The link's flow-control credit (`link::credit`). holdfast returns
    /// link credit as soon as a message leaves the link for its stream (at
    /// the end of each read), so devices that stop reading hold only their
    /// own stream's window, never the link's (6.3).
    credit: LinkCredit,
}

pub struct Link {
    /// The configured entry this link's WSM came from and its address.
    pub host: String,
    pub addr: std::net::SocketAddr,
    pub index: u32,
    /// The address left the WSM pool: move the streams off, then close.
    retired: std::cell::Cell<bool>,
    /// Credit holdfast grants the WSM per stream (config `stream_window`).
    stream_window: u32,
    /// Raised when this link must be emptied.
    attention: Rc<Attention>,
    /// This shard's counters for this link's WSM address.
    pub metrics: Arc<crate::metrics::WsmMetrics>,
    st: RefCell<LinkState>,
}

impl Link {
    pub fn new(
        host: String,
        addr: std::net::SocketAddr,
        index: u32,
        stream_window: u32,
        attention: Rc<Attention>,
        metrics: Arc<crate::metrics::WsmMetrics>,
    ) -> Rc<Link> {
        Rc::new(Link {
            host,
            addr,
            index,
            retired: std::cell::Cell::new(false),
            stream_window,
            attention,
            metrics,
            st: RefCell::new(LinkState::default()),
        })
    }

    /// Takes the link out of the pool: no new streams, its streams move to
    /// other WSMs (as for a goaway), and once none is left it closes for good.
    pub fn retire(&self) {
        self.retired.set(true);
        self.attention.raise();
    }

    pub fn retired(&self) -> bool {
        self.retired.get()
    }

    /// Closes a retired link's connection once its streams are gone (the
    /// writer ends; dropping its half shuts the socket down, and the WSM
    /// closes its side). Returns true when the link can be forgotten.
    pub fn close_if_done(&self) -> bool {
        if !self.retired.get() {
            return false;
        }
        let mut st = self.st.borrow_mut();
        if !st.streams.is_empty() {
            return false;
        }
        if st.up {
            st.generation += 1;
            if let Some(w) = st.writer.take() {
                w.wake();
            }
        }
        true
    }

    /// Counts the link's connections (a new one after every reconnect).
    pub fn generation(&self) -> u64 {
        self.st.borrow().generation
    }

    /// Whether the WSM sent goaway on this link's current connection.
    pub fn going_away(&self) -> bool {
        let s = self.st.borrow();
        s.up && (s.goaway || self.retired.get())
    }

    /// Up, past HELLO, and not told to go away.
    pub fn usable(&self) -> bool {
        let s = self.st.borrow();
        s.up && !s.goaway && !self.retired.get()
    }

    pub fn load(&self) -> usize {
        self.st.borrow().streams.len()
    }

    fn push(&self, st: &mut LinkState, f: &Frame) {
        f.encode(&mut st.out);
        if let Some(w) = st.writer.take() {
            w.wake();
        }
    }

    /// Opens a stream for a device; `None` if the link is not usable.
    pub fn open_stream(&self, open: Open) -> Option<StreamRef> {
        let mut st = self.st.borrow_mut();
        if !st.up || st.goaway || st.next_stream == u32::MAX {
            return None;
        }
        st.next_stream += 1;
        let id = st.next_stream;
        let shared = Rc::new(RefCell::new(StreamShared {
            stream_id: id,
            generation: st.generation,
            credit: st.credit.open(),
            ..Default::default()
        }));
        st.streams.insert(id, shared.clone());
        self.push(&mut st, &Frame::Open { stream: id, open: Box::new(open) });
        Some(shared)
    }

    /// Whether a device message of `len` bytes fits the WSM's announced
    /// frame limit (a larger one would make the WSM drop the whole link).
    pub fn fits(&self, len: usize) -> bool {
        codec::message_fits(len, self.st.borrow().peer_max_frame)
    }

    /// Whether the device side of this stream may send now (both credits > 0).
    pub fn can_send(&self, s: &StreamShared) -> bool {
        let st = self.st.borrow();
        st.up && st.credit.may_send(&s.credit)
    }

    /// Queues a device message to the WSM and spends credit for it.
    pub fn send_message(&self, s: &mut StreamShared, binary: bool, data: &[u8]) {
        let mut st = self.st.borrow_mut();
        if !st.up || !st.streams.contains_key(&s.stream_id) {
            // The link died before the tunnel noticed: keep the message to
            // send again on the stream that replaces this one.
            if s.link_lost {
                s.unacked.push_back((binary, data.to_vec()));
            }
            return;
        }
        codec::message_header(&mut st.out, s.stream_id, binary, data.len());
        st.out.extend_from_slice(data);
        s.unacked.push_back((binary, data.to_vec()));
        st.credit.sent(&mut s.credit, data.len());
        if let Some(w) = st.writer.take() {
            w.wake();
        }
    }

    /// Returns stream credit for `n` bytes the device has been sent. Credit
    /// goes back in batches, once a quarter of a window is owed: the WSM
    /// always keeps at least three quarters of its window, so it never
    /// stalls, and a small message costs no extra link write. (Link credit
    /// went back when the bytes left the link.) Nothing is returned to a
    /// stream of another link connection, nor to a closed stream.
    pub fn return_credit(&self, s: &mut StreamShared, n: usize) {
        let mut st = self.st.borrow_mut();
        if n == 0 || !st.up || s.generation != st.generation || !st.streams.contains_key(&s.stream_id) {
            return;
        }
        if let Some(bytes) = st.credit.delivered(&mut s.credit, n) {
            self.push(&mut st, &Frame::Credit { stream: s.stream_id, bytes });
        }
    }

    /// Returns the link credit of everything read so far (called after each
    /// read from the WSM; see the comment inside for when it is written).
    fn flush_link_credit(&self) {
        let mut st = self.st.borrow_mut();
        if !st.up {
            return;
        }
        if let Some(bytes) = st.credit.flush_link() {
            // Queued with whatever the writer sends next (a message, a ping
            // within ping_interval_ms); the writer is woken for it alone only
            // past a quarter window, so a busy link pays no extra write per
            // read and the WSM never runs short.
            Frame::Credit { stream: 0, bytes }.encode(&mut st.out);
            if bytes >= LINK_WINDOW / 4
                && let Some(w) = st.writer.take()
            {
                w.wake();
            }
            self.metrics.peer_credit.fetch_add(bytes as i64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Every stream on this link, weakly (a live upgrade asks their tunnels
    /// to move a few at a time).
    pub fn stream_refs(&self) -> Vec<std::rc::Weak<RefCell<StreamShared>>> {
        self.st.borrow().streams.values().map(Rc::downgrade).collect()
    }

    /// Sends HANDOFF: the WSM stops sending on the stream and acknowledges.
    pub fn send_handoff(&self, stream: u32) -> bool {
        let mut st = self.st.borrow_mut();
        if !st.up || !st.streams.contains_key(&stream) {
            return false;
        }
        self.push(&mut st, &Frame::Handoff { stream });
        true
    }

    /// Ends a stream from holdfast's side.
    pub fn close_stream(&self, stream: u32, reason: CloseReason, code: u16, text: &str) {
        let mut st = self.st.borrow_mut();
        if st.streams.remove(&stream).is_some() && st.up {
            self.push(&mut st, &Frame::Close { stream, reason, code, text: text.to_string() });
        }
    }

    fn on_frame(&self, f: Frame) -> Result<(), String> {
        let mut st = self.st.borrow_mut();
        match f {
            Frame::Hello(_) => return Err("second HELLO".into()),
            Frame::Accept { stream, subprotocol } => {
                if let Some(s) = st.streams.get(&stream) {
                    let mut s = s.borrow_mut();
                    s.opened = Some(OpenResult::Accepted(subprotocol));
                    s.wake();
                }
            }
            Frame::Refuse { stream, status, reason } => {
                if let Some(s) = st.streams.remove(&stream) {
                    let mut s = s.borrow_mut();
                    s.opened = Some(OpenResult::Refused(status, reason));
                    s.wake();
                }
            }
            Frame::Message { stream, binary, data } => {
                // The bytes leave the link now (for their stream, or dropped
                // in a race with CLOSE): their link credit goes back after
                // this read.
                st.credit.received(data.len());
                self.metrics.peer_credit.fetch_sub(data.len() as i64, std::sync::atomic::Ordering::Relaxed);
                if let Some(s) = st.streams.get(&stream) {
                    let mut s = s.borrow_mut();
                    s.inbox.push_back((binary, data));
                    s.wake();
                }
            }
            Frame::Close { stream, code, text, .. } => {
                if let Some(s) = st.streams.remove(&stream) {
                    let mut s = s.borrow_mut();
                    s.wsm_close = Some((code, text));
                    s.wake();
                }
            }
            Frame::Credit { stream: 0, bytes } => {
                // Saturating: a WSM sending credit without end cannot wrap it.
                if st.credit.link_credit(bytes) {
                    for s in st.streams.values() {
                        s.borrow_mut().wake();
                    }
                }
            }
            Frame::Credit { stream, bytes } => {
                if let Some(s) = st.streams.get(&stream) {
                    let mut s = s.borrow_mut();
                    let unblocked = st.credit.stream_credit(&mut s.credit, bytes);
                    s.ack(bytes);
                    if unblocked {
                        s.wake();
                    }
                }
            }
            Frame::Ping(v) => self.push(&mut st, &Frame::Pong(v)),
            Frame::Pong(_) => {}
            Frame::GoAway { code, text } => {
                tracing::info!(host = %self.host, code, text = %text, "WSM sent goaway; no new streams on this link");
                st.goaway = true;
                self.attention.raise();
            }
            Frame::HandoffAck { stream } => {
                if let Some(s) = st.streams.get(&stream) {
                    let mut s = s.borrow_mut();
                    s.handoff_acked = true;
                    s.wake();
                }
            }
            Frame::Open { .. } => return Err("OPEN from WSM".into()),
            Frame::Handoff { .. } => return Err("HANDOFF from WSM".into()),
        }
        Ok(())
    }

    /// Marks the link down and tells every stream on it.
    fn fail(&self) {
        let mut st = self.st.borrow_mut();
        if st.up {
            ShardMetrics::dec(&self.metrics.links_up);
            self.metrics.peer_credit.fetch_sub(st.credit.peer_available(), std::sync::atomic::Ordering::Relaxed);
            st.credit = LinkCredit::default();
        }
        st.up = false;
        st.generation += 1;
        st.out.clear();
        if let Some(w) = st.writer.take() {
            w.wake();
        }
        for (_, s) in st.streams.drain() {
            let mut s = s.borrow_mut();
            s.link_lost = true;
            s.wake();
        }
    }
}

/// The largest frame holdfast accepts from a WSM (and says so in HELLO): a
/// message of `websocket.max_message_bytes` with its header, at least the
/// protocol's default.
fn own_max_frame(cfg: &Config) -> u32 {
    let m = (cfg.ws.max_message_bytes as u64 + codec::MESSAGE_OVERHEAD as u64).min(u32::MAX as u64) as u32;
    m.max(codec::DEFAULT_MAX_FRAME)
}

/// Keeps one link connected for the life of the shard.
pub async fn run_link(link: Rc<Link>, cfg: Arc<Config>, shard: u16, first_attempt: Rc<RefCell<usize>>) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    while !link.retired() {
        let res = connect_and_serve(&link, &cfg, shard, &mut first, &first_attempt).await;
        if first {
            first = false;
            *first_attempt.borrow_mut() += 1;
        }
        match res {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(_) if link.retired() => break,
            Err(e) => {
                ShardMetrics::inc(&link.metrics.link_failures_total);
                tracing::warn!(host = %link.host, addr = %link.addr, link = link.index, shard, error = %e, "WSM link down");
            }
        }
        let jitter = monoio::utils::thread_rng_n(backoff.as_millis() as u32 / 2 + 1) as u64;
        monoio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect_and_serve(
    link: &Rc<Link>,
    cfg: &Config,
    shard: u16,
    first: &mut bool,
    first_attempt: &Rc<RefCell<usize>>,
) -> Result<(), String> {
    let addr = link.addr;
    let tcp = monoio::time::timeout(cfg.upstream.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut rd, wr) = tcp.into_split();
    let hello = Frame::Hello(Hello {
        version: codec::VERSION,
        role: 0,
        node: cfg.upstream.node.clone(),
        shard,
        stream_window: cfg.upstream.stream_window,
        link_window: LINK_WINDOW,
        max_frame: own_max_frame(cfg),
    });
    let generation = {
        let mut st = link.st.borrow_mut();
        st.out.clear();
        hello.encode(&mut st.out);
        st.generation
    };
    let writer = monoio::spawn(write_loop(link.clone(), wr, generation, cfg.upstream.ping_interval));
    let res = read_loop(link, &mut rd, shard, first, first_attempt, cfg.upstream.liveness_timeout, own_max_frame(cfg)).await;
    // Stop the writer of this connection before the next attempt.
    link.fail();
    writer.await;
    res
}

async fn read_loop<R: AsyncReadRent>(
    link: &Rc<Link>,
    rd: &mut R,
    shard: u16,
    first: &mut bool,
    first_attempt: &Rc<RefCell<usize>>,
    liveness: Duration,
    max_frame: u32,
) -> Result<(), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut hello_seen = false;
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        let (len, cap) = (buf.len(), buf.capacity());
        // A healthy WSM answers the writer's pings, so silence this long
        // means a dead peer (or a partitioned one): fail the link.
        let Ok((res, slice)) = monoio::time::timeout(liveness, rd.read(buf.slice_mut(len..cap))).await else {
            ShardMetrics::inc(&link.metrics.link_liveness_failures_total);
            return Err(format!("nothing from the WSM for {} ms", liveness.as_millis()));
        };
        buf = slice.into_inner();
        let n = res.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("WSM closed the link".into());
        }
        let mut off = 0;
        while let Some((frame, used)) = Frame::decode(&buf[off..], max_frame).map_err(|e| format!("protocol: {e}"))? {
            off += used;
            if hello_seen {
                link.on_frame(frame)?;
                continue;
            }
            let Frame::Hello(h) = frame else {
                return Err("first frame is not HELLO".into());
            };
            if h.version != codec::VERSION || h.role != 1 {
                return Err(format!("WSM speaks version {} role {}", h.version, h.role));
            }
            hello_seen = true;
            {
                let mut st = link.st.borrow_mut();
                st.up = true;
                st.goaway = false;
                st.next_stream = 0;
                st.credit = LinkCredit::new(h.stream_window, h.link_window, link.stream_window, LINK_WINDOW);
                st.peer_max_frame = h.max_frame;
            }
            ShardMetrics::inc(&link.metrics.links_up);
            ShardMetrics::inc(&link.metrics.link_connects_total);
            link.metrics.peer_credit.fetch_add(LINK_WINDOW as i64, std::sync::atomic::Ordering::Relaxed);
            if *first {
                *first = false;
                *first_attempt.borrow_mut() += 1;
            }
            tracing::info!(host = %link.host, link = link.index, shard, node = %h.node, "WSM link up");
        }
        buf.drain(..off);
        link.flush_link_credit();
    }
}

/// Takes the queued bytes of this connection generation, waiting for some.
async fn take_out(link: &Link, generation: u64) -> Option<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut st = link.st.borrow_mut();
        if st.generation != generation {
            return Poll::Ready(None);
        }
        if !st.out.is_empty() {
            let spare = std::mem::take(&mut st.spare);
            return Poll::Ready(Some(std::mem::replace(&mut st.out, spare)));
        }
        st.writer = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

async fn write_loop<W: monoio::io::AsyncWriteRent>(link: Rc<Link>, mut wr: W, generation: u64, ping: Duration) {
    let mut pings = 0u64;
    loop {
        let data = monoio::select! {
            d = take_out(&link, generation) => d,
            _ = monoio::time::sleep(ping) => {
                let mut st = link.st.borrow_mut();
                if st.generation == generation && st.up {
                    pings += 1;
                    link.push(&mut st, &Frame::Ping(pings));
                }
                continue;
            }
        };
        let Some(data) = data else { return };
        let (res, mut data) = wr.write_all(data).await;
        if res.is_err() {
            return; // the reader sees the broken socket and fails the link
        }
        data.clear();
        let mut st = link.st.borrow_mut();
        if st.spare.capacity() < data.capacity() && data.capacity() <= 1 << 20 {
            st.spare = data;
        }
    }
}
