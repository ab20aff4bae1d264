//! A device connection's socket, shell side: reading and writing it.
//!
//! Owns: the device socket (shared with a readiness wait that stays armed
//! across wakeups), reads into a buffer lent by the shard pool for just
//! that long, parking a partial record off the pool before the connection
//! waits, writes bounded by the write-stall time, sealing and writing a
//! WebSocket close, and the lingering half-close at the end. Never decides
//! anything about the protocol.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;

use super::ShardCtx;
use super::link::StreamRef;
use super::pool::PoolBuf;
use crate::identity::ConnectionId;
use crate::metrics::ShardMetrics;
use crate::session::End;
use crate::tls::record::{RecordError, RecordLayer};
use crate::ws::frame;

pub(super) struct Device {
    pub(super) shard: Rc<ShardCtx>,
    /// The socket, shared so that a wait for readability can own its share
    /// and outlive a burst of writes (see [`Device::readable`]). Not split
    /// with monoio's `into_split`: its write half shuts the socket down when
    /// dropped, which would end a connection handed to a new process.
    tcp: Socket,
    pub(super) addr: SocketAddr,
    pub(super) id: ConnectionId,
    /// Received bytes not yet processed; present only while bytes are pending.
    pub(super) rx: Option<PoolBuf>,
    /// A partial record parked off the pool while the connection waits.
    /// Boxed: rare, and an idle connection keeps the field.
    pub(super) parked: Option<Box<super::partial::Parked>>,
    /// Counted against the node's `admission.max_connections` (released at close).
    pub(super) counted: bool,
}

/// A wait for the device socket that stays armed across wakeups (it owns
/// its share of the socket: see [`Device::readable`]).
pub(super) type Readiness = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>>>>;

/// A device socket shared between its task and that task's readiness wait.
struct Socket(Rc<std::cell::UnsafeCell<TcpStream>>);

impl Socket {
    /// The socket for a read, a write or a shutdown.
    pub(super) fn io(&mut self) -> &mut TcpStream {
        // SAFETY: monoio marks TcpStream `Split`: one read, one write and
        // readiness waits may be in flight on it at once. The task runs one
        // of its own reads or writes at a time (`&mut self`); the only other
        // holder is a readiness wait (`Device::readable`).
        unsafe { &mut *self.0.get() }
    }
}

impl Device {
    pub(super) fn new(shard: Rc<ShardCtx>, tcp: TcpStream, addr: SocketAddr, id: ConnectionId) -> Device {
        Device { shard, tcp: Socket(Rc::new(std::cell::UnsafeCell::new(tcp))), addr, id, rx: None, parked: None, counted: false }
    }

    /// Waits for the socket to be readable. The future owns its share of the
    /// socket, so a tunnel keeps one armed across wakeups from its link
    /// instead of dropping it: dropping an io_uring poll cancels it, and the
    /// kernel finds the poll to cancel by walking a hash chain that grows
    /// with the connections on the ring (256 buckets at most).
    pub(super) fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + 'static {
        let socket = self.tcp.0.clone();
        // SAFETY: monoio marks TcpStream `Split`: a readiness wait may run
        // beside reads and writes on the same socket; the Rc keeps it alive.
        async move { unsafe { &*socket.get() }.readable(false).await }
    }

    /// A duplicate of the device socket (for a live upgrade).
    pub(super) fn dup_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        // SAFETY: a shared borrow for a plain getter (see `readable`); the
        // descriptor is open and owned by `self.tcp` for this call.
        let fd = std::os::fd::AsRawFd::as_raw_fd(unsafe { &*self.tcp.0.get() });
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
    }

    /// Waits for the socket to be readable, then reads into a pool buffer.
    pub(super) async fn read_more(&mut self) -> Result<usize, End> {
        self.park_rx(None);
        self.readable().await?;
        self.read_now().await
    }

    /// Before the connection waits: gives its pool buffer back, and moves a
    /// partial record in it to an allocation of its own (see `partial`), so
    /// that no shared buffer is pinned by a device that stops mid-record.
    /// `stream` lets the shard ask this tunnel to close if the budget for
    /// such bytes runs out and it holds one of the oldest.
    pub(super) fn park_rx(&mut self, stream: Option<&StreamRef>) {
        let Some(mut b) = self.rx.take() else { return };
        if b.vec().is_empty() {
            return;
        }
        self.parked = Some(Box::new(self.shard.partials.park(b.vec(), stream).0));
    }

    /// Takes a pool buffer for rx if there is none (waiting, counted, when
    /// the pool is empty: backpressure), with any parked bytes back in front.
    pub(super) async fn take_rx(&mut self) {
        if self.rx.is_some() {
            return;
        }
        let mut buf = self.shard.pool.take().await;
        if let Some(p) = self.parked.take() {
            buf.vec().extend_from_slice(&p.bytes);
        }
        self.rx = Some(buf);
    }

    /// Reads what the socket has into the rx buffer (taking one from the pool).
    pub(super) async fn read_now(&mut self) -> Result<usize, End> {
        self.take_rx().await;
        let Some(rx) = self.rx.as_mut() else {
            return Ok(0);
        };
        let mut v = rx.lend();
        let (len, cap) = (v.len(), v.capacity());
        if len == cap {
            rx.restore(v);
            return Err(End::Record(RecordError::RecordOverflow));
        }
        let (res, slice) = self.tcp.io().read(v.slice_mut(len..cap)).await;
        v = slice.into_inner();
        rx.restore(v);
        let n = res?;
        if n == 0 {
            return Err(End::Eof);
        }
        Ok(n)
    }

    /// Gives the rx buffer back to the pool if everything in it was used.
    pub(super) fn release_if_empty(&mut self) {
        if self.rx.as_mut().is_some_and(|b| b.vec().is_empty()) {
            self.rx = None;
        }
    }

    pub(super) async fn write(&mut self, data: Vec<u8>) -> Result<Vec<u8>, End> {
        if data.is_empty() {
            return Ok(data);
        }
        let (res, data) = self.write_all(data).await;
        res?;
        Ok(data)
    }

    /// Writes all of `data`. Each write that makes no progress for
    /// `websocket.write_stall_timeout_secs` ends the connection
    /// ([`End::WriteStall`], counted): a device that stopped reading holds
    /// its stream's window and a pool buffer for that long at most. The
    /// buffer comes back unless the stall cancelled its write.
    pub(super) async fn write_all(&mut self, mut data: Vec<u8>) -> (Result<(), End>, Vec<u8>) {
        use monoio::buf::IoBuf;
        let stall = self.shard.current().cfg.ws.write_stall_timeout;
        let mut off = 0;
        while off < data.len() {
            let write = self.tcp.io().write(data.slice(off..));
            let (res, slice) = match stall {
                None => write.await,
                Some(t) => match monoio::time::timeout(t, write).await {
                    Ok(done) => done,
                    Err(_) => {
                        ShardMetrics::inc(&self.shard.metrics.write_stall_closes_total);
                        return (Err(End::WriteStall), Vec::new());
                    }
                },
            };
            data = slice.into_inner();
            match res {
                Ok(0) => return (Err(End::Io(std::io::ErrorKind::WriteZero)), data),
                Ok(n) => off += n,
                Err(e) => return (Err(e.into()), data),
            }
        }
        (Ok(()), data)
    }

    /// Seals `plain` and writes it to the device.
    /// Seals `plain` into a buffer of its own and writes it. Not a pool
    /// buffer: a device that stops reading keeps its write pending until the
    /// write-stall time, and its bytes must not hold a buffer other devices
    /// need to be read (the pool is for reads). What it holds meanwhile is
    /// bounded by its stream's window.
    pub(super) async fn send(&mut self, rl: &mut RecordLayer, plain: &[u8]) -> Result<(), End> {
        let mut out = Vec::with_capacity(RecordLayer::sealed_len(plain.len()));
        rl.seal(plain, &mut out).map_err(End::Record)?;
        self.write_all(out).await.0
    }

    pub(super) async fn send_close(&mut self, rl: &mut RecordLayer, code: u16, reason: &str) {
        let mut f = Vec::new();
        frame::encode_close(&mut f, code, reason, None);
        let _ = self.send(rl, &f).await;
    }

    /// Half-closes, then drains what the device still sends for a moment, so
    /// the kernel does not reset the connection over our last bytes.
    pub(super) async fn linger(&mut self) {
        let _ = self.tcp.io().shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; 4096];
        let mut total = 0;
        while total < 1 << 20 {
            match monoio::time::timeout_at(deadline.into(), self.tcp.io().read(buf)).await {
                Ok((Ok(n), b)) if n > 0 => {
                    buf = b;
                    total += n;
                }
                _ => break,
            }
        }
    }

    /// Counts what the record layer did and says goodbye at the TLS level.
    pub(super) async fn finish(&mut self, end: &End, rl: &mut RecordLayer) {
        let (sent, received) = rl.key_updates();
        let m = &self.shard.metrics;
        m.key_updates_sent_total.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        m.key_updates_received_total.fetch_add(received, std::sync::atomic::Ordering::Relaxed);
        if let End::Record(e) = end {
            m.tls_record_error(e);
        }
        let out = crate::session::tunnel::goodbye(rl, end);
        let _ = self.write(out).await;
    }

    /// Logs how the connection ended and closes it, unless it moved to a new
    /// process: then the socket is only released here (no FIN, no linger).
    pub(super) async fn close(mut self, end: End, key: usize) {
        match &end {
            End::Refused(e) => match e.presented.as_ref().and_then(|leaf| Some((leaf, crate::identity::CertFacts::of(leaf)?))) {
                Some((leaf, f)) => tracing::info!(
                    device = %self.addr,
                    conn = %self.id,
                    reason = e.reason.label(),
                    subject = %f.subject,
                    serial = %f.serial,
                    sha256 = %f.sha256,
                    issuer = %f.issuer,
                    ca = %self.shard.current().tls.verifier.ca_name(std::slice::from_ref(leaf)),
                    not_before = %f.not_before,
                    not_after = %f.not_after,
                    detail = %e.detail,
                    "handshake refused"
                ),
                None => {
                    tracing::info!(device = %self.addr, conn = %self.id, reason = e.reason.label(), detail = %e.detail, "handshake refused")
                }
            },
            End::Eof | End::DeviceClosed | End::CloseNotify => tracing::debug!(device = %self.addr, conn = %self.id, "device closed"),
            End::HandedOver => {
                ShardMetrics::inc(&self.shard.metrics.connections_handed_over_total);
                tracing::debug!(device = %self.addr, conn = %self.id, "handed over to the new process")
            }
            other => tracing::debug!(device = %self.addr, conn = %self.id, end = ?other, "connection ended"),
        }
        self.rx = None;
        if !matches!(end, End::HandedOver) {
            Box::pin(self.linger()).await;
        }
        self.shard.forget(key);
        if self.counted {
            self.shard.admit.release();
        }
        ShardMetrics::dec(&self.shard.metrics.connections_active);
    }
}
