//! A server-side library of the WSM link protocol, and the reference WSM.
//!
//! Owns: accepting links from holdfast, the HELLO exchange, per-stream and
//! per-link credit on the WSM side (it never sends past its credit and returns
//! credit for every message it has processed), and calling an [`App`] for
//! opens, messages and closes. Rust WSM teams can build on it: implement
//! [`App`] and call [`Server::serve`]. Uses blocking I/O, one thread per link
//! (a WSM has few links, each carrying many streams). A planned stop is a
//! drain ([`Drain`]): GOAWAY on every link, so holdfast moves the streams to
//! other WSMs, then the process may exit once no stream is left. Never sees
//! device TLS. The guide: `docs/wsm-guide.md`; an example:
//! `examples/uppercase.rs`.
#![forbid(unsafe_code)]
// A blocking server, not a sans-io machine: it reads the clock itself.
#![allow(clippy::disallowed_methods)]

pub mod echo;
pub mod openlog;
pub mod quarantine;
pub mod state;

use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast_link::codec::{self, CloseReason, Frame, Hello, Open};
use holdfast_link::types::ConnectionId;

/// How long messages of a handed-over stream wait for its resumed OPEN.
const PARK_FOR: Duration = Duration::from_secs(60);

thread_local! {
    /// When this link thread last dropped expired parked messages.
    static PURGED: std::cell::Cell<Instant> = std::cell::Cell::new(Instant::now());
}

/// Messages of streams that were handed over (HANDOFF) and not yet resumed,
/// by connection ID; shared by all links, since the resumed OPEN arrives on
/// another one.
type Parked = Arc<Mutex<HashMap<ConnectionId, (Instant, VecDeque<(bool, Vec<u8>)>)>>>;

/// Credit the WSM grants holdfast per stream and per link.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub const LINK_WINDOW: u32 = 16 << 20;

/// What the app decides about a new stream.
pub enum Decision {
    Accept { subprotocol: Option<String> },
    Refuse { status: u16, reason: String },
}

/// One stream as the app sees it.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub stream: u32,
    pub open: Open,
    /// The holdfast node and shard the link comes from.
    pub node: String,
    pub shard: u16,
    /// This WSM's own node name.
    pub wsm: String,
}

/// What the app wants sent on a stream.
#[derive(Default)]
pub struct Replies {
    pub(crate) msgs: Vec<(bool, Vec<u8>)>,
    pub(crate) close: Option<(u16, String)>,
}

impl Replies {
    pub fn text(&mut self, s: impl Into<String>) {
        self.msgs.push((false, s.into().into_bytes()));
    }
    pub fn binary(&mut self, b: Vec<u8>) {
        self.msgs.push((true, b));
    }
    /// Closes the device's WebSocket with this code after the messages.
    pub fn close(&mut self, code: u16, text: impl Into<String>) {
        self.close = Some((code, text.into()));
    }
}

pub trait App: Send + Sync + 'static {
    fn open(&self, info: &StreamInfo) -> Decision;
    fn message(&self, info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies);
    fn closed(&self, _info: &StreamInfo, _reason: CloseReason, _code: u16) {}
    /// holdfast changed the device's labels (`info.open.labels` is the new set).
    fn labels_changed(&self, _info: &StreamInfo) {}
}

pub struct Server {
    listener: TcpListener,
    app: Arc<dyn App>,
    node: String,
    parked: Parked,
    shared: Arc<Shared>,
    /// The largest frame this WSM accepts (and announces in its HELLO).
    max_frame: u32,
    /// The newest protocol version it answers with.
    max_version: u16,
}

/// What every link thread of one server shares.
#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// Streams open on all links.
    streams: AtomicUsize,
}

/// How often an idle link thread looks at the drain flag.
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// A handle to drain a running server from another thread.
#[derive(Clone)]
pub struct Drain(Arc<Shared>);

impl Drain {
    /// Sends GOAWAY on every link (within [`DRAIN_CHECK`]), and on every link
    /// that connects from now on: holdfast opens no stream here any more and
    /// moves the open ones elsewhere.
    pub fn start(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// Streams still open on this server.
    pub fn streams(&self) -> usize {
        self.0.streams.load(Ordering::SeqCst)
    }
}

impl Server {
    pub fn bind(addr: SocketAddr, app: Arc<dyn App>, node: String) -> std::io::Result<Server> {
        Ok(Server {
            listener: TcpListener::bind(addr)?,
            app,
            node,
            parked: Parked::default(),
            shared: Arc::default(),
            max_frame: codec::LARGEST_FRAME,
            max_version: codec::VERSION,
        })
    }

    /// Speaks protocol versions up to `v` only (a WSM pinned to an older
    /// version; holdfast then falls back to it, and sends no labels below 2).
    pub fn with_max_version(mut self, v: u16) -> Server {
        self.max_version = v.clamp(codec::MIN_VERSION, codec::VERSION);
        self
    }

    /// Announces and accepts frames of at most `max_frame` bytes instead of
    /// [`codec::LARGEST_FRAME`] (the largest any holdfast sends). holdfast
    /// then closes a device whose message would not fit with 1009, and the
    /// link stays up.
    pub fn with_max_frame(mut self, max_frame: u32) -> Server {
        self.max_frame = max_frame;
        self
    }

    pub fn drain_handle(&self) -> Drain {
        Drain(self.shared.clone())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts links forever, one thread each.
    pub fn serve(self) -> std::io::Result<()> {
        for s in self.listener.incoming() {
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let (app, node, parked, shared) = (self.app.clone(), self.node.clone(), self.parked.clone(), self.shared.clone());
            let (max_frame, max_version) = (self.max_frame, self.max_version);
            std::thread::spawn(move || {
                let peer = s.peer_addr().ok();
                match serve_link(s, app, node, parked, shared, (max_frame, max_version)) {
                    Ok(()) => tracing::info!(?peer, "link closed"),
                    Err(e) => tracing::warn!(?peer, error = %e, "link ended"),
                }
            });
        }
        Ok(())
    }
}

struct StreamState {
    info: StreamInfo,
    credit: i64,
    pending: VecDeque<(bool, Vec<u8>)>,
    close_after: Option<(u16, String)>,
    /// holdfast sent HANDOFF: send nothing more here; park instead.
    handed: bool,
    /// In `LinkConn::link_waiting`.
    link_waiting: bool,
}

struct LinkConn {
    /// This WSM's node name.
    node: String,
    parked: Parked,
    out: BufWriter<TcpStream>,
    /// Boxed: when the map grows it moves pointers, not whole states. (With
    /// 15,000 states inline, the copy at one growth stalled the link for
    /// about 30 ms while holdfast moved streams to it in an upgrade.)
    streams: holdfast_link::streams::StreamMap<Box<StreamState>>,
    link_credit: i64,
    /// Streams with messages held back by the link's credit alone, oldest
    /// first (each once: `StreamState::link_waiting`). Link credit flushes
    /// these, not every stream: a scan of all streams per link CREDIT was
    /// quadratic, and in a live upgrade moving 15,000 streams it was most
    /// of this WSM's time.
    link_waiting: VecDeque<u32>,
    peer: Option<Hello>,
}

impl LinkConn {
    fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.out.write_all(&b)
    }

    /// Sends what credit allows for one stream; closes it when asked and drained.
    fn flush_stream(&mut self, id: u32, app: &dyn App) -> std::io::Result<()> {
        let mut frames = Vec::new();
        let mut done = None;
        if let Some(s) = self.streams.get_mut(&id) {
            if s.handed {
                // Kept for the resumed stream, in order.
                if !s.pending.is_empty() {
                    let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
                    let e = p.entry(s.info.open.connection_id).or_insert_with(|| (Instant::now(), VecDeque::new()));
                    e.1.extend(s.pending.drain(..));
                }
                return Ok(());
            }
            while s.credit > 0 && self.link_credit > 0 {
                let Some((binary, data)) = s.pending.pop_front() else {
                    break;
                };
                s.credit -= data.len() as i64;
                self.link_credit -= data.len() as i64;
                frames.push(Frame::Message { stream: id, binary, data });
            }
            if !s.pending.is_empty() && s.credit > 0 && !s.link_waiting {
                s.link_waiting = true;
                self.link_waiting.push_back(id);
            }
            if s.pending.is_empty()
                && let Some((code, text)) = s.close_after.take()
            {
                frames.push(Frame::Close { stream: id, reason: CloseReason::WsmClosed, code, text });
                done = Some(code);
            }
        }
        for f in &frames {
            self.send(f)?;
        }
        if let Some(code) = done
            && let Some(s) = self.streams.remove(&id)
        {
            app.closed(&s.info, CloseReason::WsmClosed, code);
        }
        Ok(())
    }

    fn handle(&mut self, f: Frame, app: &dyn App) -> std::io::Result<()> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let Some(peer) = self.peer.clone() else {
            return Err(bad("frame before HELLO"));
        };
        match f {
            Frame::Open { stream, open } => {
                let info = StreamInfo { stream, open: *open, node: peer.node.clone(), shard: peer.shard, wsm: self.node.clone() };
                let id = info.open.connection_id;
                let resumed = info.open.resumed;
                match app.open(&info) {
                    Decision::Accept { subprotocol } => {
                        self.send(&Frame::Accept { stream, subprotocol })?;
                        // A resumed stream first gets what was parked for it.
                        let pending = if resumed {
                            let mut p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
                            // Expired entries are dropped at most once a
                            // second: a scan per resumed OPEN would be
                            // quadratic when thousands resume at once.
                            if PURGED.with(|t| t.get().elapsed() > Duration::from_secs(1)) {
                                p.retain(|_, (at, _)| at.elapsed() < PARK_FOR);
                                PURGED.with(|t| t.set(Instant::now()));
                            }
                            p.remove(&id).map(|(_, q)| q).unwrap_or_default()
                        } else {
                            VecDeque::new()
                        };
                        self.streams.insert(
                            stream,
                            Box::new(StreamState {
                                info,
                                credit: peer.stream_window as i64,
                                pending,
                                close_after: None,
                                handed: false,
                                link_waiting: false,
                            }),
                        );
                        self.flush_stream(stream, app)?;
                    }
                    Decision::Refuse { status, reason } => self.send(&Frame::Refuse { stream, status, reason })?,
                }
            }
            Frame::Message { stream, binary, data } => {
                let n = data.len() as u32;
                if let Some(s) = self.streams.get_mut(&stream) {
                    let mut r = Replies::default();
                    app.message(&s.info, binary, &data, &mut r);
                    s.pending.extend(r.msgs);
                    if r.close.is_some() {
                        s.close_after = r.close;
                    }
                    // The reply goes out before the credit that says "processed":
                    // a WSM that dies between the two leaves holdfast to send the
                    // message again, not a reply that never comes.
                    self.flush_stream(stream, app)?;
                    self.send(&Frame::Credit { stream, bytes: n })?;
                }
                self.send(&Frame::Credit { stream: 0, bytes: n })?;
            }
            Frame::Close { stream, reason, code, .. } => {
                if let Some(s) = self.streams.remove(&stream) {
                    app.closed(&s.info, reason, code);
                }
            }
            Frame::Credit { stream: 0, bytes } => {
                self.link_credit += bytes as i64;
                // Those waiting for it, in turn, while it lasts; the ones it
                // does not reach queue again at the back.
                let mut n = self.link_waiting.len();
                while n > 0 && self.link_credit > 0 {
                    n -= 1;
                    let Some(id) = self.link_waiting.pop_front() else { break };
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.link_waiting = false;
                        self.flush_stream(id, app)?;
                    }
                }
            }
            Frame::Credit { stream, bytes } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.credit += bytes as i64;
                }
                self.flush_stream(stream, app)?;
            }
            Frame::Handoff { stream } => {
                // Everything sent on this stream so far precedes the ack on
                // the link; what is still pending waits for the resumed OPEN.
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.handed = true;
                }
                self.flush_stream(stream, app)?;
                self.send(&Frame::HandoffAck { stream })?;
            }
            Frame::Labels { stream, labels } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.info.open.labels = labels;
                    app.labels_changed(&s.info);
                }
            }
            Frame::Ping(v) => self.send(&Frame::Pong(v))?,
            Frame::Pong(_) | Frame::GoAway { .. } => {}
            Frame::Hello(_) | Frame::Accept { .. } | Frame::Refuse { .. } | Frame::HandoffAck { .. } => {
                return Err(bad("unexpected frame from holdfast"));
            }
        }
        Ok(())
    }
}

fn serve_link(
    s: TcpStream,
    app: Arc<dyn App>,
    node: String,
    parked: Parked,
    shared: Arc<Shared>,
    (max_frame, max_version): (u32, u16),
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut rd = s.try_clone()?;
    rd.set_read_timeout(Some(DRAIN_CHECK))?;
    let mut counted = 0usize;
    let mut goaway_sent = false;
    let mut link = LinkConn {
        node: node.clone(),
        parked,
        out: BufWriter::with_capacity(64 * 1024, s),
        streams: Default::default(),
        link_credit: 0,
        link_waiting: VecDeque::new(),
        peer: None,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    let result = loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match rd.read(&mut buf[have..]) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => 0,
            Err(e) => break Err(e),
        };
        have += n;
        let mut off = 0;
        let step = loop {
            match Frame::decode(&buf[off..have], max_frame) {
                Ok(Some((f, used))) => {
                    off += used;
                    if link.peer.is_none() {
                        let Frame::Hello(h) = f else {
                            break Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "first frame is not HELLO"));
                        };
                        // holdfast offers its newest version; the answer is
                        // the newest both speak.
                        // A WSM pinned to version 1 behaves as one did: only
                        // its own version.
                        if h.version < codec::MIN_VERSION || (max_version == codec::MIN_VERSION && h.version != max_version) {
                            let _ = link.send(&Frame::GoAway { code: 1, text: format!("version {} not supported", h.version) });
                            let _ = link.out.flush();
                            break Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unsupported version"));
                        }
                        let version = h.version.min(max_version);
                        link.link_credit = h.link_window as i64;
                        tracing::info!(node = %h.node, shard = h.shard, "holdfast link up");
                        link.peer = Some(h);
                        let hello = Frame::Hello(Hello {
                            version,
                            role: 1,
                            node: node.clone(),
                            shard: 0,
                            stream_window: STREAM_WINDOW,
                            link_window: LINK_WINDOW,
                            max_frame,
                        });
                        if let Err(e) = link.send(&hello) {
                            break Err(e);
                        }
                        continue;
                    }
                    if let Err(e) = link.handle(f, app.as_ref()) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    let _ = link.send(&Frame::GoAway { code: 2, text: e.to_string() });
                    let _ = link.out.flush();
                    break Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()));
                }
            }
        };
        step?;
        buf.copy_within(off..have, 0);
        have -= off;
        if link.peer.is_some() && !goaway_sent && shared.draining.load(Ordering::SeqCst) {
            link.send(&Frame::GoAway { code: 0, text: "draining".into() })?;
            goaway_sent = true;
            tracing::info!("draining: goaway sent");
        }
        link.out.flush()?;
        // Keep the server-wide count of open streams current.
        let now = link.streams.len();
        if now > counted {
            shared.streams.fetch_add(now - counted, Ordering::SeqCst);
        } else {
            shared.streams.fetch_sub(counted - now, Ordering::SeqCst);
        }
        counted = now;
    };
    shared.streams.fetch_sub(counted, Ordering::SeqCst);
    for (_, s) in link.streams.drain() {
        app.closed(&s.info, CloseReason::Error, 1006);
    }
    result
}

#[cfg(test)]
mod tests;
