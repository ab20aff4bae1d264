//! One persistent, multiplexed link from a shard to a WSM host.
//!
//! Owns: connecting (and reconnecting with backoff), reading and writing
//! the link's socket, the link's timers, and handing the events of its
//! protocol machine (`link::session`: HELLO, streams, credit, handoff) to
//! the device tasks through [`StreamShared`]. Makes no protocol decision
//! itself and never touches a device socket.
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

use crate::blame::Blamed;
use crate::config::Config;
use crate::link::codec::{self, CloseReason, Open};
use crate::link::session::{Event, Failure, LinkSession, Params};
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
    /// streams afresh). The low 32 bits of the link's count: only equality
    /// matters.
    generation: u32,
    /// Boxed: set once, and most of a stream's life it is not looked at.
    pub opened: Option<Box<OpenResult>>,
    /// Messages from the WSM waiting to be written to the device.
    pub inbox: VecDeque<(bool, Vec<u8>)>,
    /// The WSM closed the stream: close the device with this code and text.
    pub wsm_close: Option<Box<(u16, String)>>,
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
    /// After the link died: the messages sent on this stream that the WSM
    /// had not acknowledged with credit (it may not have processed them),
    /// to send again, first, on the stream that replaces this one.
    pub unacked: VecDeque<(bool, Vec<u8>)>,
    /// The shard's partial-record budget ran out and this tunnel is one of
    /// the oldest holders: it closes (`Some(bytes it held)`, see `partial`).
    pub evict_partial: Option<std::num::NonZeroU64>,
    notified: bool,
    waker: Option<Waker>,
}

pub type StreamRef = Rc<RefCell<StreamShared>>;

impl StreamShared {
    pub fn wake(&mut self) {
        self.notified = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Polls for a wake of the stream by its link (or the shard's timers).
pub fn poll_notified(s: &StreamRef, cx: &mut std::task::Context<'_>) -> Poll<()> {
    let mut st = s.borrow_mut();
    if st.notified {
        st.notified = false;
        Poll::Ready(())
    } else {
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Waits until the stream is woken by its link.
pub async fn notified(s: &StreamRef) {
    std::future::poll_fn(|cx| poll_notified(s, cx)).await
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
    /// The protocol state of the current connection (`link::session`);
    /// `None` between connections.
    session: Option<LinkSession>,
    /// Incremented on every (re)connect and failure; the writer of an old
    /// connection stops, and streams of an old connection are told apart.
    generation: u64,
    spare: Vec<u8>,
    writer: Option<Waker>,
    /// The device side of every stream on the link.
    streams: crate::link::streams::StreamMap<StreamRef>,
    /// The WSM's credit last reported to `holdfast_link_peer_credit_bytes`.
    reported_peer_credit: i64,
    /// The writer should look at the session's timers again.
    writer_rethink: bool,
}

impl LinkState {
    /// The session of the current connection, if it is past both HELLOs.
    fn up(&mut self) -> Option<&mut LinkSession> {
        self.session.as_mut().filter(|s| s.is_up())
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
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
    /// The protocol version the next connection offers: the newest, until
    /// this WSM refuses it (then one older, for as long as the link lives).
    offer: std::cell::Cell<u16>,
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
            offer: std::cell::Cell::new(codec::VERSION),
            st: RefCell::new(LinkState::default()),
        })
    }

    /// Tells the WSM the device labels of `stream` changed (a version 2
    /// link only; a version 1 WSM hears of them at the next OPEN it gets).
    pub fn send_labels(&self, stream: u32, labels: &[String]) -> bool {
        let mut st = self.st.borrow_mut();
        let sent = st.streams.contains_key(&stream) && st.up().is_some_and(|l| l.labels(stream, labels));
        if sent {
            st.wake_writer();
        }
        sent
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
        if st.session.is_some() {
            st.generation += 1;
            st.wake_writer();
        }
        true
    }

    /// Counts the link's connections (a new one after every reconnect).
    pub fn generation(&self) -> u64 {
        self.st.borrow().generation
    }

    /// Whether the WSM sent goaway on this link's current connection.
    pub fn going_away(&self) -> bool {
        let mut s = self.st.borrow_mut();
        s.up().is_some_and(|l| l.going_away() || self.retired.get())
    }

    /// Up, past HELLO, and not told to go away.
    pub fn usable(&self) -> bool {
        let mut s = self.st.borrow_mut();
        !self.retired.get() && s.up().is_some_and(|l| l.accepts_streams())
    }

    pub fn load(&self) -> usize {
        self.st.borrow().streams.len()
    }

    /// Opens a stream for a device; `None` if the link is not usable.
    pub fn open_stream(&self, open: Open) -> Option<StreamRef> {
        let mut st = self.st.borrow_mut();
        let generation = st.generation;
        let id = st.up()?.open(open)?;
        let shared = Rc::new(RefCell::new(StreamShared { stream_id: id, generation: generation as u32, ..Default::default() }));
        st.streams.insert(id, shared.clone());
        st.wake_writer();
        Some(shared)
    }

    /// Whether a device message of `len` bytes fits the WSM's announced
    /// frame limit (a larger one would make the WSM drop the whole link).
    pub fn fits(&self, len: usize) -> bool {
        let st = self.st.borrow();
        match &st.session {
            Some(l) => l.fits(len),
            None => codec::message_fits(len, codec::DEFAULT_MAX_FRAME),
        }
    }

    /// The WSM's largest frame on the current connection.
    pub fn peer_max_frame(&self) -> u32 {
        self.st.borrow().session.as_ref().map_or(codec::DEFAULT_MAX_FRAME, |l| l.peer_max_frame())
    }

    /// Whether the device side of this stream may send now (both credits > 0).
    pub fn can_send(&self, s: &StreamShared) -> bool {
        let mut st = self.st.borrow_mut();
        let generation = st.generation;
        s.generation == generation as u32 && st.up().is_some_and(|l| l.may_send(s.stream_id))
    }

    /// Queues a device message to the WSM and spends credit for it.
    pub fn send_message(&self, s: &mut StreamShared, binary: bool, data: &[u8]) {
        let mut st = self.st.borrow_mut();
        let generation = st.generation;
        let sent = s.generation == generation as u32 && st.up().is_some_and(|l| l.send(s.stream_id, binary, data));
        if sent {
            st.wake_writer();
        } else if s.link_lost {
            // The link died before the tunnel noticed: keep the message to
            // send again on the stream that replaces this one.
            s.unacked.push_back((binary, data.to_vec()));
        }
    }

    /// Returns stream credit for `n` bytes the device has been sent (in
    /// batches, see `LinkSession::delivered`). Link credit went back when
    /// the bytes left the link. Nothing goes to a stream of another link
    /// connection, nor to a closed stream.
    pub fn return_credit(&self, s: &mut StreamShared, n: usize) {
        let mut st = self.st.borrow_mut();
        if n == 0 || s.generation != st.generation as u32 {
            return;
        }
        if st.up().and_then(|l| l.delivered(s.stream_id, n)).is_some() {
            st.wake_writer();
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
        let sent = st.up().is_some_and(|l| l.handoff(stream));
        if sent {
            st.wake_writer();
        }
        sent
    }

    /// Ends a stream from holdfast's side.
    pub fn close_stream(&self, stream: u32, reason: CloseReason, code: u16, text: &str) {
        let mut st = self.st.borrow_mut();
        if st.streams.remove(&stream).is_some()
            && let Some(l) = st.up()
        {
            l.close(stream, reason, code, text);
            st.wake_writer();
        }
    }

    /// Feeds what was read to the session and hands its events to the
    /// streams. Returns the WSM's node name when its HELLO arrived.
    fn on_read(&self, now: std::time::Instant, buf: &[u8]) -> Result<(usize, Option<String>), Failure> {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let Some(l) = st.session.as_mut() else { return Err(Failure::Retired) };
        let used = l.on_bytes(now, buf)?;
        let mut up = None;
        while let Some(ev) = l.poll_event() {
            let stream = |id: u32| st.streams.get(&id);
            match ev {
                Event::Up { node } => up = Some(node),
                Event::Accepted { stream: id, subprotocol } => {
                    if let Some(s) = stream(id) {
                        let mut s = s.borrow_mut();
                        s.opened = Some(Box::new(OpenResult::Accepted(subprotocol)));
                        s.wake();
                    }
                }
                Event::Refused { stream: id, status, reason } => {
                    if let Some(s) = st.streams.remove(&id) {
                        let mut s = s.borrow_mut();
                        s.opened = Some(Box::new(OpenResult::Refused(status, reason)));
                        s.wake();
                    }
                }
                Event::Message { stream: id, binary, data } => {
                    if let Some(s) = stream(id) {
                        let mut s = s.borrow_mut();
                        s.inbox.push_back((binary, data));
                        s.wake();
                    }
                }
                Event::Closed { stream: id, code, text } => {
                    if let Some(s) = st.streams.remove(&id) {
                        let mut s = s.borrow_mut();
                        s.wsm_close = Some(Box::new((code, text)));
                        s.wake();
                    }
                }
                Event::Writable { stream: id } => {
                    if let Some(s) = stream(id) {
                        s.borrow_mut().wake();
                    }
                }
                Event::LinkWritable => {
                    for s in st.streams.values() {
                        s.borrow_mut().wake();
                    }
                }
                Event::HandoffAcked { stream: id } => {
                    if let Some(s) = stream(id) {
                        let mut s = s.borrow_mut();
                        s.handoff_acked = true;
                        s.wake();
                    }
                }
                Event::GoAway { code, text } => {
                    tracing::info!(host = %self.host, code, text = %text, "WSM sent goaway; no new streams on this link");
                    self.attention.raise();
                }
            }
        }
        // The messages of this read left the link: their link credit is
        // queued with whatever the writer sends next (a message, a ping);
        // the writer is woken for it alone only past a quarter window, so a
        // busy link pays no extra write per read and the WSM never runs short.
        let credit_due = l.after_read().is_some_and(|b| b >= LINK_WINDOW / 4);
        if up.is_some() {
            // The writer starts its ping timer now.
            st.writer_rethink = true;
        }
        if credit_due || up.is_some() {
            st.wake_writer();
        }
        self.report_peer_credit(st);
        Ok((used, up))
    }

    /// Brings `holdfast_link_peer_credit_bytes` up to date with the session.
    fn report_peer_credit(&self, st: &mut LinkState) {
        let now = st.session.as_ref().map_or(0, |l| l.peer_available());
        let delta = now - std::mem::replace(&mut st.reported_peer_credit, now);
        if delta != 0 {
            self.metrics.peer_credit.fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The link's timers fired (see `LinkSession::on_tick`); true if a
    /// PING was queued.
    fn on_timer(&self, now: std::time::Instant) -> Result<bool, Failure> {
        let mut st = self.st.borrow_mut();
        let Some(l) = st.session.as_mut() else { return Err(Failure::Retired) };
        l.on_tick(now)
    }

    /// When the session fails the link if the WSM stays silent.
    fn silent_at(&self) -> Option<std::time::Instant> {
        self.st.borrow().session.as_ref().map(|l| l.silent_at())
    }

    /// When the session wants a PING written (`None` before HELLO).
    fn ping_at(&self, generation: u64) -> Option<std::time::Instant> {
        let st = self.st.borrow();
        st.session.as_ref().filter(|_| st.generation == generation).and_then(|l| l.ping_at())
    }

    /// Marks the link down and tells every stream on it, handing each the
    /// messages the WSM had not acknowledged.
    fn fail(&self) {
        let mut st = self.st.borrow_mut();
        let was_up = st.session.as_ref().is_some_and(|l| l.is_up());
        let lost = st.session.take().map(|mut l| l.fail()).unwrap_or_default();
        if was_up {
            ShardMetrics::dec(&self.metrics.links_up);
        }
        self.report_peer_credit(&mut st);
        st.generation += 1;
        st.wake_writer();
        let mut unacked: HashMap<u32, crate::link::session::Messages> = lost.into_iter().collect();
        for (id, s) in st.streams.drain() {
            let mut s = s.borrow_mut();
            if let Some(mut u) = unacked.remove(&id) {
                s.unacked.append(&mut u);
            }
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

fn link_shard(ctx: &std::rc::Weak<super::ShardCtx>) -> u16 {
    ctx.upgrade().map(|c| c.index).unwrap_or_default()
}

/// Keeps one link connected for the life of the shard (or until it is
/// retired). Each connection takes the shard's config as it is then: a
/// reload's link timeouts apply from the link's next connection.
pub async fn run_link(link: Rc<Link>, ctx: std::rc::Weak<super::ShardCtx>, first_attempt: Rc<RefCell<usize>>) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    while !link.retired() {
        let Some((cfg, shard)) = ctx.upgrade().map(|c| (c.current().cfg.clone(), c.index)) else { return };
        let res = connect_and_serve(&link, &cfg, shard, &mut first, &first_attempt).await;
        if let Err(Failure::VersionRefused { offered, text }) = &res
            && *offered > codec::MIN_VERSION
        {
            // An older WSM: offer the version before, at once.
            tracing::info!(host = %link.host, addr = %link.addr, offered, answer = %text, "the WSM refused the protocol version; offering the one before");
            link.offer.set(offered - 1);
            continue;
        }
        if first {
            first = false;
            *first_attempt.borrow_mut() += 1;
        }
        match res {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(_) if link.retired() => break,
            Err(e) => {
                link.metrics.link_failed(&e);
                tracing::warn!(host = %link.host, addr = %link.addr, link = link.index, shard = link_shard(&ctx), reason = e.label(), blame = e.blame().label(), error = %e, "WSM link down");
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
) -> Result<(), Failure> {
    let addr = link.addr;
    let tcp = monoio::time::timeout(cfg.upstream.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::ConnectTimeout)?
        .map_err(|e| Failure::Connect(e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let (mut rd, wr) = tcp.into_split();
    let params = Params {
        node: cfg.upstream.node.clone(),
        shard,
        stream_window: link.stream_window,
        link_window: LINK_WINDOW,
        max_frame: own_max_frame(cfg),
        ping_interval: cfg.upstream.ping_interval,
        liveness_timeout: cfg.upstream.liveness_timeout,
        version: link.offer.get(),
    };
    let generation = {
        let mut st = link.st.borrow_mut();
        st.generation += 1;
        st.session = Some(LinkSession::new(params, std::time::Instant::now()));
        st.generation
    };
    let writer = monoio::spawn(write_loop(link.clone(), wr, generation));
    let res = read_loop(link, &mut rd, shard, first, first_attempt).await;
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
) -> Result<(), Failure> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let Some(silent_at) = link.silent_at() else { return Err(Failure::Retired) };
        // The session's liveness: a healthy WSM answers the writer's pings,
        // so silence this long means a dead or partitioned peer. (The read
        // and its buffer are given up: the link fails.)
        let Ok((res, slice)) = monoio::time::timeout_at(silent_at.into(), rd.read(buf.slice_mut(len..cap))).await else {
            let e = link.on_timer(std::time::Instant::now()).err().unwrap_or(Failure::Silent(Duration::ZERO));
            if matches!(e, Failure::Silent(_)) {
                ShardMetrics::inc(&link.metrics.link_liveness_failures_total);
            }
            return Err(e);
        };
        buf = slice.into_inner();
        let n = res.map_err(|e| Failure::Read(e.kind()))?;
        if n == 0 {
            return Err(Failure::PeerClosed);
        }
        let (used, up) = link.on_read(std::time::Instant::now(), &buf)?;
        buf.drain(..used);
        if let Some(node) = up {
            ShardMetrics::inc(&link.metrics.links_up);
            ShardMetrics::inc(&link.metrics.link_connects_total);
            if *first {
                *first = false;
                *first_attempt.borrow_mut() += 1;
            }
            tracing::info!(host = %link.host, link = link.index, shard, node = %node, "WSM link up");
        }
    }
}

/// Takes the queued bytes of this connection generation, waiting for some.
async fn take_out(link: &Link, generation: u64) -> Option<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut st = link.st.borrow_mut();
        let st = &mut *st;
        if st.generation != generation {
            return Poll::Ready(None);
        }
        let Some(l) = st.session.as_mut() else { return Poll::Ready(None) };
        if l.pending_out() > 0 || std::mem::take(&mut st.writer_rethink) {
            let spare = std::mem::take(&mut st.spare);
            return Poll::Ready(Some(l.take_out(std::time::Instant::now(), spare)));
        }
        st.writer = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

async fn write_loop<W: monoio::io::AsyncWriteRent>(link: Rc<Link>, mut wr: W, generation: u64) {
    loop {
        // Waits for bytes to write, or for the session's ping time.
        let ping_at = link.ping_at(generation);
        let data = match ping_at {
            None => take_out(&link, generation).await,
            Some(at) => monoio::select! {
                d = take_out(&link, generation) => d,
                _ = monoio::time::sleep_until(at.into()) => {
                    // Liveness is the reader's: its failure comes from there.
                    let _ = link.on_timer(std::time::Instant::now());
                    continue;
                }
            },
        };
        let Some(data) = data else { return };
        if data.is_empty() {
            link.st.borrow_mut().spare = data;
            continue;
        }
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
