//! A shard: one thread pinned to one CPU running its own io_uring event loop.
//!
//! Owns: the shard's SO_REUSEPORT listener, its slab of connections, its
//! preallocated buffer pool, its links to every WSM host, and the control
//! channel other threads use to reach it. Shards share nothing mutable;
//! counters are the shard's own atomics, read by the metrics exporter.

pub mod admit;
pub mod conn;
pub mod control;
mod io;
pub mod link;
pub mod pace;
pub mod partial;
pub mod pool;
mod reattach;
pub mod registry;
pub mod timers;
mod tunnel;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use slab::Slab;

use crate::config::Config;
use crate::identity::IdGenerator;
use crate::metrics::ShardMetrics;
use crate::tls::server::TlsContext;
pub use control::{Control, ControlTx};
use link::Link;
use pool::Pool;

/// What a shard runs by: one config generation, whole. A reload replaces
/// it at once; a connection takes what is current when it needs it.
pub struct Current {
    pub generation: u64,
    pub cfg: Arc<Config>,
    pub tls: TlsContext,
    /// The tunnel core's limits, shared by the shard's tunnels.
    pub limits: Rc<crate::session::tunnel::Limits>,
    /// What the set-up of the shard's connections decides by.
    pub setup_limits: Rc<crate::session::connection::SetupLimits>,
}

impl Current {
    pub fn new(generation: u64, cfg: Arc<Config>, tls: TlsContext) -> Current {
        let max = cfg.ws.max_message_bytes.min(u32::MAX as usize) as u32;
        Current { generation, limits: Rc::new(limits(&cfg, max, generation)), setup_limits: Rc::new(setup_limits(&cfg, &tls)), cfg, tls }
    }
}

/// The set-up machine's limits, from the config.
pub(crate) fn setup_limits(cfg: &crate::config::Config, tls: &crate::tls::server::TlsContext) -> crate::session::connection::SetupLimits {
    crate::session::connection::SetupLimits {
        handshake_timeout: cfg.tls.handshake_timeout,
        upgrade_timeout: cfg.ws.upgrade_timeout,
        open_timeout: cfg.upstream.open_timeout,
        max_request_bytes: cfg.ws.max_request_bytes,
        forward_headers: cfg.ws.forward_headers.clone(),
        key_update_after: tls.key_update_after,
    }
}

/// The tunnel core's limits, from the config.
pub(crate) fn limits(cfg: &crate::config::Config, max_message: u32, generation: u64) -> crate::session::tunnel::Limits {
    crate::session::tunnel::Limits {
        generation,
        max_message,
        idle_timeout: cfg.ws.idle_timeout,
        ping_interval: cfg.ws.ping_interval,
        resume_timeout: cfg.upstream.resume_timeout,
        open_timeout: cfg.upstream.open_timeout,
        held_bytes_per_connection: cfg.upstream.held_bytes_per_connection,
    }
}

/// Everything one shard's tasks share (single-threaded).
pub struct ShardCtx {
    pub index: u16,
    current: RefCell<Rc<Current>>,
    pub pool: Pool,
    pub ids: RefCell<IdGenerator>,
    /// Links to every WSM in the pool (it changes as DNS does).
    pub links: RefCell<Vec<Rc<Link>>>,
    /// Raised by a link that must be emptied (see `reattach::watch_goaway`).
    pub link_attention: Rc<link::Attention>,
    /// Counts link tasks' first attempts (start-up waits for them).
    attempted: Rc<RefCell<usize>>,
    /// Connections held by this shard (`registry`).
    pub conns: RefCell<Slab<registry::Entry>>,
    /// Idle and ping deadlines of this shard's tunnels.
    pub timers: Rc<timers::Timers>,
    /// Bytes of device messages held by tunnels without a WSM.
    pub held_bytes: std::cell::Cell<u64>,
    /// Partial TLS records parked off the pool while their connections wait.
    pub partials: Rc<partial::Partials>,
    /// Bytes that held tunnels' reads in flight may add (counted against
    /// the shard's bound before the read, so concurrent reads cannot pass it).
    pub held_reserved: std::cell::Cell<u64>,
    /// Paces re-opening streams on other WSMs.
    pub resumes: reattach::Pacer,
    /// Admission control: handshake and open turns, the node's counts.
    pub admit: Rc<admit::Admit>,
    /// Set when a new process has taken over the listening sockets, or a
    /// drain closed them.
    pub stop_accepting: std::cell::Cell<bool>,
    /// Which server certificate new handshakes get: +1 each time a reload
    /// changes it (connections remember theirs, for `--migrate-over`).
    pub cert_epoch: std::cell::Cell<u32>,
    /// The drain under way, if any (`ctl drain`, the graceful stop).
    pub drain: std::cell::Cell<Option<DrainPlan>>,
    /// Set during a live upgrade: where tunnels send themselves, and the
    /// count of connections between here and serving in the new process.
    pub handoff: RefCell<Option<(Sender<Handed>, Arc<pace::Flight>)>>,
    /// What the shard's tunnels pack their resume data against (one per issuer).
    pub resume_dicts: crate::session::resume::Dictionaries,
    /// The waits of established tunnels between bursts (`tunnel::IdleSet`).
    pub(crate) idle: tunnel::IdleSet,
    /// Readiness waits of connections handed to a new process (see `park`).
    parked: RefCell<Vec<io::Readiness>>,
    pub metrics: Arc<ShardMetrics>,
}

/// A drain under way on a shard: every connection closes with `code` by `ends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    pub ends: std::time::Instant,
    pub code: u16,
    pub why: crate::session::end::Paced,
}

/// One connection on its way to another process.
pub type Handed = (crate::upgrade::snapshot::ConnSnapshot, std::os::fd::OwnedFd);

pub struct ShardHandle {
    pub thread: std::thread::JoinHandle<()>,
    pub ctl: ControlTx,
    pub metrics: Arc<ShardMetrics>,
}

/// Binds one shard's listening socket with SO_REUSEPORT.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Starts a shard thread; it reports on `ready` once its links have made
/// their first attempt and it is accepting.
pub fn start(
    index: u16,
    cpu: usize,
    (generation, cfg, tls): (u64, Arc<Config>, TlsContext),
    listeners: Vec<std::net::TcpListener>,
    ready: Sender<Result<u16, String>>,
    (wsms, node): (Vec<crate::resolve::Wsm>, Arc<admit::Node>),
) -> std::io::Result<ShardHandle> {
    let metrics = Arc::new(ShardMetrics::new(&cfg.tls.ca_names()));
    let (ctl, ctl_rx) = control::channel()?;
    let m = metrics.clone();
    let thread = std::thread::Builder::new().name(format!("holdfast-shard-{index}")).spawn(move || {
        let _alive = crate::metrics::AliveGuard(m.clone());
        if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
            tracing::warn!(shard = index, cpu, error = ?e, "could not pin shard to CPU");
        }
        let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).enable_timer().build();
        let mut rt = match rt {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("shard {index}: io_uring runtime: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            match ctl_rx.into_waiter() {
                Ok(ctl) => run(index, (generation, cfg, tls), m, ctl, Sockets { listeners, wsms, node }, ready).await,
                Err(e) => {
                    let _ = ready.send(Err(format!("shard {index}: control channel: {e}")));
                }
            }
        });
    })?;
    Ok(ShardHandle { thread, ctl, metrics })
}

/// Where a shard's connections come from and go to, at start.
struct Sockets {
    listeners: Vec<std::net::TcpListener>,
    wsms: Vec<crate::resolve::Wsm>,
    /// What the node's shards count together.
    node: Arc<admit::Node>,
}

async fn run(
    index: u16,
    (generation, cfg, tls): (u64, Arc<Config>, TlsContext),
    metrics: Arc<ShardMetrics>,
    ctl: control::ControlWaiter,
    Sockets { listeners, wsms, node }: Sockets,
    ready: Sender<Result<u16, String>>,
) {
    let attempted = Rc::new(RefCell::new(0usize));
    let ctx = Rc::new(ShardCtx {
        index,
        pool: Pool::new(cfg.buffers.per_shard, cfg.buffers.size, metrics.clone()),
        ids: RefCell::new(IdGenerator::new(index)),
        links: RefCell::new(Vec::new()),
        link_attention: Rc::default(),
        attempted: attempted.clone(),
        conns: RefCell::new(Slab::with_capacity(1024)),
        timers: Rc::new(timers::Timers::default()),
        stop_accepting: std::cell::Cell::new(false),
        drain: std::cell::Cell::new(None),
        cert_epoch: std::cell::Cell::new(1),
        held_bytes: std::cell::Cell::new(0),
        partials: partial::Partials::new(cfg.buffers.partial_bytes_per_shard, metrics.clone()),
        held_reserved: std::cell::Cell::new(0),
        resumes: reattach::Pacer::new(cfg.upstream.resume_per_sec),
        admit: Rc::new(admit::Admit::new(&cfg.admission, cfg.shard_cpus.len(), node, metrics.clone())),
        handoff: RefCell::new(None),
        parked: RefCell::new(Vec::new()),
        idle: tunnel::IdleSet::new(metrics.clone()),
        resume_dicts: Default::default(),
        current: RefCell::new(Rc::new(Current::new(generation, cfg.clone(), tls))),
        metrics: metrics.clone(),
    });
    monoio::spawn(timers::tick(ctx.timers.clone()));
    monoio::spawn(reattach::watch_goaway(ctx.clone()));
    monoio::spawn(tunnel::run_idle(ctx.clone()));
    set_wsms(&ctx, wsms);
    let n_links = ctx.links.borrow().len();
    // Give links one attempt before accepting, so early devices find a WSM.
    let wait = cfg.upstream.connect_timeout + Duration::from_millis(200);
    let start = std::time::Instant::now();
    while *attempted.borrow() < n_links && start.elapsed() < wait {
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut accepting = Vec::new();
    for l in listeners {
        match monoio::net::TcpListener::from_std(l) {
            Ok(l) => accepting.push(l),
            Err(e) => {
                let _ = ready.send(Err(format!("shard {index}: listener: {e}")));
                return;
            }
        }
    }
    let _ = ready.send(Ok(index));
    // The accept loops end within 100 ms of `stop_accepting` (they accept by
    // readiness, so stopping never drops a connection).
    for l in accepting {
        monoio::spawn(accept_loop(ctx.clone(), l));
    }
    loop {
        match ctl.recv().await {
            Some(Control::Shutdown) | None => {
                // The process is ending: its exit closes what was parked,
                // with no cancel per connection on the way out.
                std::mem::forget(ctx.parked.take());
                break;
            }
            Some(Control::StopAccepting) => {
                ctx.stop_accepting.set(true);
                tracing::info!(shard = index, "stopped accepting; the listeners belong to the new process");
            }
            Some(Control::Accept(ls)) => {
                ctx.stop_accepting.set(false);
                *ctx.handoff.borrow_mut() = None;
                // The upgrade failed: what went to the new process went with
                // it, so our share of those sockets closes now.
                drop(ctx.parked.take());
                for l in ls {
                    match monoio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            monoio::spawn(accept_loop(ctx.clone(), l));
                        }
                        Err(e) => {
                            tracing::error!(shard = index, error = %e, "cannot accept on a listener again")
                        }
                    }
                }
                tracing::info!(shard = index, "accepting again");
            }
            Some(Control::HandOff(sink, flight)) => {
                ctx.stop_accepting.set(true);
                *ctx.handoff.borrow_mut() = Some((sink, flight.clone()));
                monoio::spawn(pace::hand_over_all(ctx.clone(), flight));
            }
            Some(Control::WsmSet(wsms)) => set_wsms(&ctx, wsms),
            Some(Control::Drain { over, code, why }) => {
                // The accept loops end within 100 ms and close their
                // listeners (the node closes its own copies).
                ctx.stop_accepting.set(true);
                // The node sends what is left of the earliest window asked for.
                let now = std::time::Instant::now();
                let plan = DrainPlan { ends: now + over, code, why };
                ctx.drain.set(Some(plan));
                let n = ctx.pace_all(plan.code, plan.why, |r| crate::admission::within(now, plan.ends.saturating_duration_since(now), r));
                tracing::info!(
                    shard = index,
                    connections = n,
                    over_ms = plan.ends.saturating_duration_since(now).as_millis() as u64,
                    code = plan.code,
                    reason = plan.why.label(),
                    "draining: every connection closes at a random moment of the window"
                );
            }
            Some(Control::DrainCancel(done)) => {
                ctx.drain.set(None);
                let n = ctx.cancel_paced(&[crate::session::end::Paced::Drain, crate::session::end::Paced::Stop]);
                let aged = ctx.age_all();
                tracing::info!(shard = index, kept = n, aged, "drain cancelled: the connections not yet closed stay");
                let _ = done.send(index);
            }
            Some(Control::Reload(generation, done)) => {
                apply(&ctx, &generation);
                let _ = done.send(index);
            }
            Some(Control::Query(filter, sample, answer)) => {
                let _ = answer.send(registry::query(&ctx, &filter, sample));
            }
            Some(Control::Kick(id, code, answer)) => {
                let found = registry::find(&ctx, id).is_some_and(|k| ctx.give_order(k, registry::Order::Kick(code)));
                let _ = answer.send(found);
            }
            Some(Control::Adopt(conns)) => {
                tracing::info!(shard = index, connections = conns.len(), "adopting connections");
                for (snap, fd) in conns {
                    monoio::spawn(conn::adopt(ctx.clone(), snap, fd));
                }
            }
        }
    }
    tracing::info!(shard = index, connections = ctx.conns.borrow().len(), waiting = ctx.idle.len(), "shard stopping");
}

/// Switches the shard to a new config generation: what new connections
/// and every tunnel's next burst decide by, the rates, the WSM links; and,
/// if the policy changed, the re-check of every established identity.
fn apply(ctx: &Rc<ShardCtx>, g: &crate::reload::Generation) {
    use crate::reload::Recheck;
    if ctx.current().tls.server_fingerprint != g.tls.server_fingerprint {
        ctx.cert_epoch.set(ctx.cert_epoch.get() + 1);
    }
    *ctx.current.borrow_mut() = Rc::new(Current::new(g.number, g.cfg.clone(), g.tls.clone()));
    ctx.resumes.set_rate(g.cfg.upstream.resume_per_sec);
    ctx.admit.set_limits(&g.cfg.admission, g.cfg.shard_cpus.len());
    set_wsms(ctx, g.wsms.clone());
    if g.wake {
        ctx.wake_all();
    }
    if g.cfg.ws.max_age.is_some() && ctx.drain.get().is_none() {
        // An age set (or changed) by this reload: tunnels without one draw theirs.
        ctx.age_all();
    }
    if let Some(over) = g.migrate {
        let now = std::time::Instant::now();
        let epoch = ctx.cert_epoch.get();
        let n = ctx.pace_where(
            crate::ws::frame::close::GOING_AWAY,
            crate::session::end::Paced::Migrate,
            |r| crate::admission::within(now, over, r),
            |e| e.cert_epoch < epoch,
        );
        tracing::info!(
            shard = ctx.index,
            connections = n,
            over_ms = over.as_millis() as u64,
            "migrating connections made under the old server certificate to new handshakes"
        );
    }
    if let Some(before) = &g.relabel {
        let (c, before, after) = (ctx.clone(), before.clone(), g.tls.labels.clone());
        monoio::spawn(async move {
            let n = registry::relabel(c.clone(), &before, &after).await;
            if n > 0 {
                tracing::info!(shard = c.index, streams = n, "device labels changed: WSMs told");
            }
        });
    }
    let verifier = g.tls.verifier.clone();
    let spread = g.cfg.reload_close_spread;
    let now = crate::timefmt::unix_now();
    // What did not change is not judged again: an identity admitted under
    // a CA group that is as it was needs only the blocklist (a certificate
    // that expired during its connection is not closed by an unrelated
    // reload); one whose group changed is verified again in full.
    let blocklist = verifier.blocklist();
    let blocked = move |chain: &[Vec<u8>]| match chain.first() {
        Some(leaf) if blocklist.blocks(leaf) => Err(crate::tls::handshake::Refusal::Blocked),
        _ => Ok(()),
    };
    let judge: Box<registry::Judge> = match &g.recheck {
        Recheck::Nothing => return,
        Recheck::Blocklist => Box::new(blocked),
        Recheck::Cas { before } => {
            let before = before.clone();
            Box::new(move |chain| match verifier.group_digest(chain) {
                Some(d) if before.contains(&d) => blocked(chain),
                _ => verifier.verify_chain(chain, now),
            })
        }
    };
    let (c, index, number) = (ctx.clone(), ctx.index, g.number);
    monoio::spawn(async move {
        let n = registry::recheck(c, judge, spread).await;
        if n > 0 {
            tracing::info!(
                shard = index,
                generation = number,
                revoked = n,
                spread_ms = spread.as_millis() as u64,
                "connections no longer allowed: closing them spread out"
            );
        }
    });
}

impl ShardCtx {
    /// The generation the shard runs by now.
    pub fn current(&self) -> Rc<Current> {
        self.current.borrow().clone()
    }

    /// Keeps the armed readiness wait of a connection handed to a new
    /// process, and with it this process's share of the socket. Dropping
    /// the wait would cancel its io_uring poll, and the kernel finds a poll
    /// to cancel by walking one of at most 256 hash chains, each about
    /// connections/256 long: at 15,000 connections that was a tenth of the
    /// old shard's time during an upgrade. A parked poll that fires (the
    /// device wrote to its new process) wakes a finished task, which does
    /// nothing. Parked waits are forgotten when the process ends after the
    /// upgrade, or dropped (cancelled, sockets closed) if it failed.
    pub(crate) fn park(&self, wait: io::Readiness) {
        if self.handoff.borrow().is_none() {
            return; // the upgrade already failed: close our share now
        }
        self.parked.borrow_mut().push(wait);
    }

    /// The least-loaded link that may take a new stream.
    pub fn pick_link(&self) -> Option<Rc<Link>> {
        self.links.borrow().iter().filter(|l| l.usable()).min_by_key(|l| l.load()).cloned()
    }
}

/// Makes the shard's links match the WSM pool: links to new addresses,
/// retirement (streams moved off, then closed) for addresses that left.
fn set_wsms(ctx: &Rc<ShardCtx>, wsms: Vec<crate::resolve::Wsm>) {
    let cfg = ctx.current().cfg.clone();
    let per = cfg.upstream.links_per_shard;
    let mut links = ctx.links.borrow_mut();
    for l in links.iter() {
        if !l.retired() && !wsms.iter().any(|(_, a)| *a == l.addr) {
            tracing::info!(shard = ctx.index, host = %l.host, addr = %l.addr, "WSM left the pool: moving its streams, then closing");
            l.retire();
        } else if !l.retired() && l.index >= per {
            tracing::info!(shard = ctx.index, host = %l.host, addr = %l.addr, link = l.index, "fewer links per WSM: moving this link's streams, then closing it");
            l.retire();
        }
    }
    for (host, addr) in wsms {
        for i in 0..per {
            if links.iter().any(|l| l.addr == addr && l.index == i && !l.retired()) {
                continue;
            }
            let l = Link::new(
                host.clone(),
                addr,
                i,
                cfg.upstream.stream_window,
                ctx.link_attention.clone(),
                ctx.metrics.wsm(&addr.to_string()),
            );
            monoio::spawn(link::run_link(l.clone(), Rc::downgrade(ctx), ctx.attempted.clone()));
            links.push(l);
        }
    }
}

/// Accepts by readiness: wait until the socket is readable (a poll owns
/// nothing, so it can always be dropped safely), then take what is queued
/// with non-blocking accept4. An io_uring accept, by contrast, dequeues a
/// connection when it completes and loses it if the operation is cancelled
/// or the process exits at that moment. Another shard or process may win
/// the race for a connection; that is EAGAIN here, not an error.
async fn accept_loop(ctx: Rc<ShardCtx>, listener: monoio::net::TcpListener) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the listener outlives this loop, which owns it.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    ShardMetrics::inc(&ctx.metrics.accept_loops);
    while !ctx.stop_accepting.get() {
        match monoio::time::timeout(Duration::from_millis(100), listener.readable(false)).await {
            Err(_) => continue, // re-check the stop flag
            Ok(Err(e)) => {
                tracing::warn!(shard = ctx.index, error = %e, "listener poll failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Ok(Ok(())) => {}
        }
        loop {
            use nix::sys::socket::{SockFlag, accept4};
            // A handshake turn first: beyond the rate or the slots, the
            // connection waits in the kernel's accept queue.
            ctx.admit.accept_turn(&ctx.stop_accepting).await;
            if ctx.stop_accepting.get() {
                break;
            }
            // The listener is non-blocking (EAGAIN when another acceptor won);
            // the accepted socket is left blocking: io_uring then waits for
            // room or data itself, where a non-blocking socket would have a
            // full send buffer surface as EAGAIN.
            match accept4(fd, SockFlag::SOCK_CLOEXEC) {
                Ok(owned) => {
                    // Its handshake token and slot are taken now, before the
                    // next accept (the slot is freed by the connection's set-up).
                    ctx.admit.handshake_started();
                    let std_tcp = std::net::TcpStream::from(owned);
                    let addr = std_tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    match monoio::net::TcpStream::from_std(std_tcp) {
                        Ok(tcp) => {
                            monoio::spawn(conn::serve(ctx.clone(), tcp, addr));
                        }
                        Err(e) => {
                            ctx.admit.handshake_ended();
                            tracing::warn!(shard = ctx.index, error = %e, "cannot register an accepted socket")
                        }
                    }
                }
                Err(nix::Error::EAGAIN) => break,
                Err(nix::Error::EINTR | nix::Error::ECONNABORTED) => continue,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(shard = ctx.index, error = %e, "accept failed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
    }
    ShardMetrics::dec(&ctx.metrics.accept_loops);
}
