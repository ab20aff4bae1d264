//! One device connection on a shard, from accept to close.
//!
//! Owns: the set-up of a connection (handshake, upgrade, stream open, each
//! under its timeout, with the answers `session::setup` decides), adopting
//! a connection from a previous process, starting its tunnel, and the log
//! line and close at its end. Socket I/O is `shard::io`'s; the established
//! phase is `shard::tunnel`'s. Never parses bytes itself.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use monoio::net::TcpStream;

use super::ShardCtx;
use super::io::Device;
use super::link::{Link, OpenResult, StreamRef, notified};
use super::tunnel::{self, Live};
use crate::identity::DeviceIdentity;
use crate::link::codec::{CloseReason, Open};
use crate::metrics::ShardMetrics;
use crate::session::End;
use crate::session::setup::{self, OpenOutcome, Refuse, SetupCount};
use crate::session::tunnel::{Limits, Tunnel};
use crate::tls::handshake::{Established, Handshake, HandshakeError, Progress, Refusal};
use crate::tls::record::RecordLayer;
use crate::upgrade::snapshot::Resume;
use crate::ws::frame::close;
use crate::ws::upgrade::{self, UpgradeRequest};

pub async fn serve(shard: Rc<ShardCtx>, tcp: TcpStream, addr: SocketAddr) {
    ShardMetrics::inc(&shard.metrics.connections_accepted_total);
    ShardMetrics::inc(&shard.metrics.connections_active);
    let _ = tcp.set_nodelay(true);
    let id = shard.ids.borrow_mut().next_id();
    let key = shard.conns.borrow_mut().insert(id);
    let mut dev = Device::new(shard, tcp, addr, id);
    // Set-up and close-down are boxed: their state (rustls included) is freed
    // when they end, and does not size the future an idle connection keeps.
    match Box::pin(dev.establish()).await {
        Ok((t, early)) => live(dev, t, early, key).await,
        Err(end) => dev.close(end, key).await,
    }
}

/// Live upgrade, new side: takes over a connection another process held.
pub async fn adopt(shard: Rc<ShardCtx>, snap: crate::upgrade::snapshot::ConnSnapshot, fd: std::os::fd::OwnedFd) {
    let std_tcp = std::net::TcpStream::from(fd);
    // Blocking, as accepted sockets are: io_uring waits for room or data.
    let _ = std_tcp.set_nonblocking(false);
    let tcp = match TcpStream::from_std(std_tcp) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(conn = %snap.id, error = %e, "cannot adopt a connection");
            return;
        }
    };
    ShardMetrics::inc(&shard.metrics.connections_adopted_total);
    ShardMetrics::inc(&shard.metrics.connections_active);
    let key = shard.conns.borrow_mut().insert(snap.id);
    let addr = snap.addr.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut dev = Device::new(shard, tcp, addr, snap.id);
    match Box::pin(dev.resume(snap)).await {
        // Counted as resumed once its stream is accepted (`reattach`).
        Ok(t) => live(dev, t, Vec::new(), key).await,
        Err(end) => {
            ShardMetrics::inc(&dev.shard.metrics.connections_resume_failed_total);
            dev.close(end, key).await
        }
    }
}

/// The established phase: the tunnel's first burst, then it waits in the
/// shard's idle set with no task of its own.
async fn live(dev: Device, t: Box<Live>, early: Vec<u8>, key: usize) {
    if dev.shard.handoff.borrow().is_some() {
        t.request_handoff(); // an upgrade began while this one was setting up
    }
    tunnel::start(dev, t, early, key).await;
}

/// The tunnel core's limits, from the config.
pub(super) fn limits(cfg: &crate::config::Config, max_message: u32) -> Limits {
    Limits {
        max_message,
        idle_timeout: cfg.ws.idle_timeout,
        ping_interval: cfg.ws.ping_interval,
        resume_timeout: cfg.upstream.resume_timeout,
        open_timeout: cfg.upstream.open_timeout,
        held_bytes_per_connection: cfg.upstream.held_bytes_per_connection,
    }
}

impl Device {
    /// Rebuilds a moved connection; its tunnel re-opens the stream (resumed).
    async fn resume(&mut self, mut snap: crate::upgrade::snapshot::ConnSnapshot) -> Result<Box<Live>, End> {
        let mut rl = RecordLayer::new(snap.record.clone()).map_err(End::Record)?;
        if !snap.rx.is_empty() {
            let mut b = self.shard.pool.take().await;
            b.vec().extend_from_slice(&snap.rx);
            self.rx = Some(b);
        }
        // The tunnel starts without a stream and re-opens one itself (as after
        // a WSM loss), reading the device meanwhile; any link stands in until
        // then. With no WSM at all the device is told to come back later.
        let Some(placeholder) = self.shard.links.borrow().first().cloned() else {
            self.send_close(&mut rl, close::TRY_AGAIN, "no WSM configured").await;
            self.finish(&End::NoWsm, &mut rl).await;
            return Err(End::NoWsm);
        };
        let none = Rc::new(std::cell::RefCell::new(super::link::StreamShared::default()));
        let lim = if snap.max_message == self.shard.limits.max_message {
            self.shard.limits.clone()
        } else {
            Rc::new(limits(&self.shard.cfg, snap.max_message))
        };
        let core = Tunnel::adopted(rl, &mut snap, &self.shard.resume_dicts, lim, std::time::Instant::now());
        let mut t = Live::new(core, placeholder, none);
        // What the core counted (the held bytes it took over).
        while let Some(a) = t.core.poll_action() {
            if let crate::session::tunnel::Action::Count(crate::session::tunnel::Count::HeldBytes(n)) = a {
                let v = (self.shard.held_bytes.get() as i64 + n).max(0) as u64;
                self.shard.held_bytes.set(v);
                self.shard.metrics.held_bytes.store(v, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(t)
    }

    /// Handshake, upgrade and stream open, each under its timeout. On
    /// failure the device has been told (alert, HTTP status) and the TLS
    /// session closed.
    async fn establish(&mut self) -> Result<(Box<Live>, Vec<u8>), End> {
        let m = self.shard.metrics.clone();
        let timeout = self.shard.cfg.tls.handshake_timeout;
        let started = std::time::Instant::now();
        let est = match monoio::time::timeout(timeout, self.handshake()).await {
            Ok(Ok(est)) => est,
            Ok(Err(End::Refused(e))) => {
                m.refusal(e.reason);
                return Err(End::Refused(e));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                m.refusal(Refusal::Timeout);
                return Err(End::Refused(Box::new(HandshakeError::new(Refusal::Timeout, format!("no handshake within {timeout:?}")))));
            }
        };
        ShardMetrics::inc(&m.handshakes_completed_total);
        m.handshake_seconds.observe(started.elapsed());
        let Established { record, chain, leftover } = *est;
        if let Some((ca, validity_ignored)) = self.shard.tls.verifier.issuing_ca(&chain, crate::timefmt::unix_now()) {
            m.accepted_under(ca, validity_ignored);
        }
        let mut rl = match RecordLayer::new(record) {
            Ok(rl) => rl,
            Err(e) => return Err(End::Record(e)),
        };
        if !leftover.is_empty() {
            let mut b = self.shard.pool.take().await;
            b.vec().extend_from_slice(&leftover);
            self.rx = Some(b);
        }
        let leaf = chain.first().cloned();
        let opened = match crate::identity::from_chain(chain, self.addr) {
            Some(identity) => self.open_tunnel(&mut rl, identity).await,
            None => {
                let e =
                    HandshakeError { presented: leaf, ..HandshakeError::new(Refusal::BadHandshake, "device certificate does not parse") };
                Err(End::Refused(Box::new(e)))
            }
        };
        match opened {
            Ok((link, stream, early, resume)) => {
                let core = Tunnel::attached(
                    rl,
                    &resume,
                    &self.shard.resume_dicts,
                    self.shard.limits.clone(),
                    link.peer_max_frame(),
                    Instant::now(),
                );
                Ok((Live::new(core, link, stream), early))
            }
            Err(end) => {
                self.finish(&end, &mut rl).await;
                Err(end)
            }
        }
    }

    /// Reads the upgrade, opens a stream on a WSM link, answers 101.
    async fn open_tunnel(
        &mut self,
        rl: &mut RecordLayer,
        identity: DeviceIdentity,
    ) -> Result<(Rc<Link>, StreamRef, Vec<u8>, Box<Resume>), End> {
        let m = self.shard.metrics.clone();
        let upgrade_timeout = self.shard.cfg.ws.upgrade_timeout;
        let (request, early) = match monoio::time::timeout(upgrade_timeout, self.read_upgrade(rl)).await {
            Ok(Ok(r)) => r,
            Ok(Err(End::BadUpgrade(status, reason))) => return Err(self.refuse(rl, setup::bad_upgrade(status, reason), None).await),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(self.refuse(rl, setup::upgrade_timeout(), None).await),
        };
        let key = request.key.clone();
        let mut resume = Box::new(Resume {
            chain: identity.chain.clone(),
            request: UpgradeRequest { key: String::new(), ..request.clone() },
            subprotocol: None,
        });
        let open = Open { resumed: false, connection_id: self.id, device: identity, request };
        let Some((link, stream)) = self.pick_link().and_then(|l| l.open_stream(open).map(|s| (l, s))) else {
            return Err(self.refuse(rl, setup::no_wsm(), None).await);
        };
        let sid = stream.borrow().stream_id;
        let wait_open = wait_opened(&stream);
        let opening = std::time::Instant::now();
        let answer = monoio::time::timeout(self.shard.cfg.upstream.open_timeout, wait_open).await;
        if let Ok(Some(_)) = &answer {
            link.metrics.open_seconds.observe(opening.elapsed());
        }
        let outcome = match answer {
            Ok(Some(OpenResult::Accepted(sub))) => OpenOutcome::Accepted(sub),
            Ok(Some(OpenResult::Refused(status, reason))) => OpenOutcome::Refused(status, reason),
            Ok(None) => OpenOutcome::Gone,
            Err(_) => OpenOutcome::Timeout,
        };
        let subprotocol = match setup::answer_open(outcome, &resume.request.subprotocols) {
            Ok(sub) => sub,
            Err(r) => {
                if r.count == SetupCount::WsmBadAccept {
                    tracing::warn!(conn = %self.id, host = %link.host, why = %r.reason, "WSM accept refused");
                }
                return Err(self.refuse(rl, r, Some((&link, sid))).await);
            }
        };
        if let Err(e) = self.send(rl, &upgrade::response_101(&key, subprotocol.as_deref())).await {
            link.close_stream(sid, CloseReason::DeviceGone, 1006, "write failed");
            return Err(e);
        }
        ShardMetrics::inc(&m.ws_upgrades_completed_total);
        resume.subprotocol = subprotocol;
        Ok((link, stream, early, resume))
    }

    /// Answers a refused set-up: counts it, closes the stream it left on a
    /// link, and sends the HTTP error.
    async fn refuse(&mut self, rl: &mut RecordLayer, r: Refuse, stream: Option<(&Rc<Link>, u32)>) -> End {
        let m = &self.shard.metrics;
        ShardMetrics::inc(match r.count {
            SetupCount::UpgradeRejected => &m.ws_upgrades_rejected_total,
            SetupCount::WsmUnavailable => &m.wsm_unavailable_total,
            SetupCount::WsmRefused => &m.wsm_refused_total,
            SetupCount::WsmOpenTimeout => &m.wsm_open_timeouts_total,
            SetupCount::WsmBadAccept => &m.wsm_bad_accepts_total,
        });
        if let (Some((link, sid)), Some((reason, code, text))) = (stream, &r.close_stream) {
            link.close_stream(sid, *reason, *code, text);
        }
        let _ = self.send(rl, &r.response()).await;
        r.end
    }

    async fn handshake(&mut self) -> Result<Box<Established>, End> {
        let tls = &self.shard.tls;
        let mut hs = Handshake::new(tls.server.clone(), tls.key_update_after).map_err(|e| End::Refused(Box::new(e)))?;
        loop {
            self.read_more().await?;
            let mut out = Vec::new();
            let progress = {
                let rx = self.rx.as_mut().map(|b| b.vec());
                let input: &[u8] = rx.as_deref().map(|v| v.as_slice()).unwrap_or(&[]);
                let p = hs.feed(input, &mut out);
                if let Some(b) = self.rx.as_mut() {
                    b.vec().clear();
                }
                p
            };
            self.release_if_empty();
            match progress {
                Ok(p) => {
                    self.write(out).await?;
                    if p == Progress::Finished {
                        return hs.finish().map(Box::new).map_err(|e| End::Refused(Box::new(e)));
                    }
                }
                Err(e) => {
                    let _ = self.write(out).await; // the alert
                    return Err(End::Refused(Box::new(e)));
                }
            }
        }
    }

    async fn read_upgrade(&mut self, rl: &mut RecordLayer) -> Result<(UpgradeRequest, Vec<u8>), End> {
        let ws = &self.shard.cfg.ws;
        let (max, forward) = (ws.max_request_bytes, ws.forward_headers.clone());
        let mut req: Vec<u8> = Vec::new();
        let mut replies = Vec::new();
        loop {
            let closed = self.open_records(rl, &mut replies, &mut |p| req.extend_from_slice(p))?;
            if !replies.is_empty() {
                let r = std::mem::take(&mut replies);
                self.write(r).await?;
            }
            match upgrade::parse(&req, max, &forward) {
                Ok(Some((r, used))) => return Ok((r, req.split_off(used))),
                Ok(None) if closed => return Err(End::DeviceClosed),
                Ok(None) => {}
                Err(e) => return Err(End::BadUpgrade(e.status, e.reason)),
            }
            self.read_more().await?;
        }
    }

    fn pick_link(&self) -> Option<Rc<Link>> {
        self.shard.pick_link()
    }
}

/// Waits for the WSM's ACCEPT or REFUSE (`None` if the link or stream went
/// away). Takes the answer, so an established stream keeps no box for it.
async fn wait_opened(stream: &StreamRef) -> Option<OpenResult> {
    loop {
        {
            let mut s = stream.borrow_mut();
            if let Some(r) = s.opened.take() {
                return Some(*r);
            }
            if s.link_lost || s.wsm_close.is_some() {
                return None;
            }
        }
        notified(stream).await;
    }
}
