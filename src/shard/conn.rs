//! One device connection on a shard, from accept to close.
//!
//! Owns: performing the set-up of a connection (reads under the stage's
//! deadline, writes, placing the OPEN on a link and waiting for its answer)
//! for the set-up machine `session::connection`, which decides everything
//! about it; adopting
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
use crate::metrics::ShardMetrics;
use crate::session::End;
use crate::session::connection::{Ended, Ready, Setup, SetupAction, Want};
use crate::session::setup::{OpenOutcome, SetupCount};
use crate::session::tunnel::Tunnel;
use crate::tls::record::RecordLayer;
use crate::ws::frame::close;

pub async fn serve(shard: Rc<ShardCtx>, tcp: TcpStream, addr: SocketAddr) {
    ShardMetrics::inc(&shard.metrics.connections_accepted_total);
    ShardMetrics::inc(&shard.metrics.connections_active);
    let _ = tcp.set_nodelay(true);
    let id = shard.ids.borrow_mut().next_id();
    let key = shard.conns.borrow_mut().insert(super::registry::Entry::new(id, shard.cert_epoch.get()));
    let admitted = shard.admit.admit();
    let mut dev = Device::new(shard, tcp, addr, id);
    dev.counted = admitted.is_ok();
    if let Err(why) = admitted {
        tracing::debug!(conn = %id, device = %addr, limit = why.label(), "node full: this device will be answered 503");
    }
    // Set-up and close-down are boxed: their state (rustls included) is freed
    // when they end, and does not size the future an idle connection keeps.
    match Box::pin(dev.establish(admitted.err())).await {
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
    // Taken as made under the certificate serving now (an upgrade keeps it).
    let key = shard.conns.borrow_mut().insert(super::registry::Entry::new(snap.id, shard.cert_epoch.get()));
    let addr = snap.addr.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // Already held by the node: counted, never shed.
    shard.admit.count();
    let mut dev = Device::new(shard, tcp, addr, snap.id);
    dev.counted = true;
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
        let cur = self.shard.current();
        let lim = if snap.max_message == cur.limits.max_message {
            cur.limits.clone()
        } else {
            Rc::new(super::limits(&cur.cfg, snap.max_message, cur.generation))
        };
        let core = Tunnel::adopted(rl, &mut snap, &self.shard.resume_dicts, lim, std::time::Instant::now());
        let mut t = Live::new(core, placeholder, none);
        // What the core counted (the held bytes it took over, that it holds).
        while let Some(a) = t.core.poll_action() {
            if let crate::session::tunnel::Action::Count(c) = a {
                super::tunnel::count(self, c);
            }
        }
        Ok(t)
    }

    /// Set-up: performs what the connection's set-up machine
    /// (`session::connection`) asks and feeds it the device's bytes, the
    /// OPEN's fate and its deadlines until it is a tunnel or ends. On
    /// failure the device has been told (alert, HTTP status) and the TLS
    /// session closed.
    async fn establish(&mut self, shed: Option<crate::admission::Shed>) -> Result<(Box<Live>, Vec<u8>), End> {
        let m = self.shard.metrics.clone();
        let started = Instant::now();
        // Holds the handshake slot the accept loop took until the handshake is over.
        let mut handshaking = Some(Handshaking(self.shard.admit.clone()));
        // The generation current now decides this connection's set-up.
        let cur = self.shard.current();
        let admit = Some((cur.tls.verifier.clone(), crate::timefmt::unix_now()));
        let mut s = Setup::new(cur.tls.server.clone(), admit, cur.setup_limits.clone(), self.id, self.addr, started);
        let mut opened: Option<(Rc<Link>, StreamRef)> = None;
        let mut opening = started;
        loop {
            while let Some(a) = s.poll_action() {
                match a {
                    SetupAction::Write(bytes) => {
                        if let Err(e) = self.write_all(bytes).await.0 {
                            s.on_io_error(e);
                        }
                    }
                    SetupAction::Handshaken(chain) => {
                        drop(handshaking.take());
                        ShardMetrics::inc(&m.handshakes_completed_total);
                        m.handshake_seconds.observe(started.elapsed());
                        if let Some((ca, validity_ignored)) = cur.tls.verifier.issuing_ca(&chain, crate::timefmt::unix_now()) {
                            m.accepted_under(&cur.tls.verifier.group_file_name(ca), validity_ignored);
                        }
                    }
                    SetupAction::Open(mut open) => {
                        // Admission: a full node sheds the device; otherwise
                        // it waits for an open turn, its upgrade pending.
                        let turn = match shed {
                            Some(why) => Err(why),
                            None => self.shard.admit.open_turn().await,
                        };
                        if let Err(why) = turn {
                            m.shed(why);
                            s.on_shed(why, self.shard.admit.retry_after());
                            continue;
                        }
                        open.labels = cur.tls.labels.of(&open.device.chain);
                        opened = self.pick_link().and_then(|l| l.open_stream(*open).map(|st| (l, st)));
                        opening = Instant::now();
                        s.on_open_sent(opening, opened.is_some());
                    }
                    SetupAction::CloseStream { reason, code, text } => {
                        if let Some((link, stream)) = &opened {
                            link.close_stream(stream.borrow().stream_id, reason, code, &text);
                        }
                    }
                    SetupAction::Refused { count, reason } => {
                        ShardMetrics::inc(match count {
                            SetupCount::UpgradeRejected => &m.ws_upgrades_rejected_total,
                            SetupCount::WsmUnavailable => &m.wsm_unavailable_total,
                            SetupCount::WsmRefused => &m.wsm_refused_total,
                            SetupCount::WsmOpenTimeout => &m.wsm_open_timeouts_total,
                            SetupCount::WsmBadAccept => &m.wsm_bad_accepts_total,
                            SetupCount::Shed(_) => &m.ws_upgrades_rejected_total,
                        });
                        if count == SetupCount::WsmBadAccept {
                            let host = opened.as_ref().map(|(l, _)| l.host.clone()).unwrap_or_default();
                            tracing::warn!(conn = %self.id, host = %host, why = %reason, "WSM accept refused");
                        }
                    }
                    SetupAction::Established(r) => {
                        ShardMetrics::inc(&m.ws_upgrades_completed_total);
                        let Some((link, stream)) = opened.take() else {
                            s.on_io_error(End::NoWsm); // cannot happen: established means opened
                            continue;
                        };
                        let Ready { rl, resume, early } = *r;
                        let dicts = &self.shard.resume_dicts;
                        let core = Tunnel::attached(rl, &resume, dicts, cur.limits.clone(), link.peer_max_frame(), Instant::now());
                        return Ok((Live::new(core, link, stream), early));
                    }
                    SetupAction::Ended(e) => {
                        let Ended { end, rl } = *e;
                        if let End::Refused(h) = &end {
                            m.refusal(h.reason);
                        }
                        if let Some(mut rl) = rl {
                            self.finish(&end, &mut rl).await;
                        }
                        return Err(end);
                    }
                }
            }
            let deadline = s.deadline();
            match s.wants() {
                Want::Read => match monoio::time::timeout_at(deadline.into(), self.read_more()).await {
                    Ok(Ok(_)) => {
                        if let Some(b) = self.rx.as_mut() {
                            s.on_bytes(Instant::now(), b.vec());
                        }
                        self.release_if_empty();
                    }
                    Ok(Err(e)) => s.on_io_error(e),
                    Err(_) => s.on_timeout(Instant::now()),
                },
                Want::OpenAnswer => {
                    let answer = match &opened {
                        Some((_, stream)) => monoio::time::timeout_at(deadline.into(), wait_opened(stream)).await,
                        None => Ok(None),
                    };
                    if let (Ok(Some(_)), Some((link, _))) = (&answer, &opened) {
                        link.metrics.open_seconds.observe(opening.elapsed());
                    }
                    match answer {
                        Ok(Some(OpenResult::Accepted(sub))) => s.on_open_answer(OpenOutcome::Accepted(sub)),
                        Ok(Some(OpenResult::Refused(status, reason))) => s.on_open_answer(OpenOutcome::Refused(status, reason)),
                        Ok(None) => s.on_open_answer(OpenOutcome::Gone),
                        Err(_) => s.on_timeout(Instant::now()),
                    }
                }
                // Nothing queued and nothing to wait for: the machine always
                // ends with `Established` or `Ended`, so this is not reached.
                Want::Link | Want::Nothing => s.on_io_error(End::NoWsm),
            }
        }
    }

    fn pick_link(&self) -> Option<Rc<Link>> {
        self.shard.pick_link()
    }
}

/// One of the shard's handshake slots, taken by the accept loop and held
/// until the handshake is done or the connection ends.
struct Handshaking(Rc<super::admit::Admit>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.handshake_ended();
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
