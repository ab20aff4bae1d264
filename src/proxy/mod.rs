//! Starting and stopping the whole proxy: listeners, shards, metrics.
//!
//! Owns: binding every shard's SO_REUSEPORT socket before any shard runs (so
//! a bad address fails at start, not later), starting one pinned shard per
//! configured CPU, waiting until each reports ready, and shutdown over the
//! shards' control channels. Never handles connections itself.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod drain;
mod reconfigure;
pub use drain::{DrainStatus, Draining};
pub use reconfigure::BlockChange;

use crate::config::Config;
use crate::metrics;
use crate::shard::{self, Control, ShardHandle};
use crate::tls::server::TlsContext;
use crate::tls::tickets::Ticketer;

pub struct Running {
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// What the metrics endpoint reads.
    pub sources: metrics::export::Sources,
    pub shards: Vec<ShardHandle>,
    /// Duplicates of every listening socket, for a live upgrade to hand over.
    pub listeners: Vec<std::os::fd::OwnedFd>,
    pub pid_file: Option<std::path::PathBuf>,
    /// Connections a live upgrade keeps in flight at once (all shards).
    pub upgrade_window: u64,
    /// Session-ticket keys, for a live upgrade's successor.
    pub tickets: Arc<Ticketer>,
    /// The config generation every shard runs by.
    pub generation: Arc<crate::reload::Generation>,
    /// The WSM pool the resolver thread keeps (a reload replaces its entries).
    pub pool: crate::resolve::SharedPool,
    /// The last reload's outcome (`ctl status`).
    pub last_reload: Option<crate::reload::Outcome>,
    /// The log filter given at start (`--log`), in force while the config
    /// sets no `log.level`.
    pub base_log: String,
    /// When the proxy started (for `ctl status`).
    pub started: std::time::Instant,
    /// The blocklist as the current generation's file says (without the
    /// shared entries).
    pub file_blocklist: Arc<crate::tls::blocklist::Blocklist>,
    /// The fleet-wide entries a follower (`holdfast-blocklist-sync`) keeps
    /// here, and their version; in force besides the file's.
    pub shared: Option<(u64, Vec<crate::tls::certmap::CertKey>)>,
    /// The drain under way (`ctl drain`, the graceful stop).
    pub draining: Option<Draining>,
    /// What the shards count together (admission control).
    pub node: Arc<shard::admit::Node>,
}

/// Where the listening sockets come from.
pub enum Listeners {
    /// Bind one SO_REUSEPORT socket per shard.
    Bind,
    /// Sockets handed over by the process being upgraded (any number);
    /// shards beyond their count bind their own in the same reuseport group.
    Inherited(Vec<std::os::fd::OwnedFd>),
}

pub fn start(cfg: Config) -> Result<Running, Vec<String>> {
    start_with(cfg, Listeners::Bind, None)
}

/// Starts the proxy on `from`; `tickets` are a predecessor's session-ticket
/// keys (a live upgrade), else fresh ones are made.
pub fn start_with(cfg: Config, from: Listeners, tickets: Option<Arc<Ticketer>>) -> Result<Running, Vec<String>> {
    let tls = TlsContext::load_with(&cfg.tls, tickets).map_err(|es| es.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    for w in &tls.warnings {
        tracing::warn!(key = %w.key, "{}", w.msg);
    }
    let ticketer = tls.tickets.clone();
    let server_not_after = tls.server_not_after;
    let cfg = Arc::new(cfg);
    let shard_count = cfg.shard_cpus.len();
    let mut addr = cfg.listen;
    let mut sockets: Vec<std::net::TcpListener> = match from {
        Listeners::Bind => {
            // A second instance would join the first one's SO_REUSEPORT
            // group and split devices and scrapes between the two.
            refuse_if_in_use("listen.addr", cfg.listen, cfg.pid_file.as_deref())?;
            if let Some(m) = cfg.metrics {
                refuse_if_in_use("metrics.addr", m, cfg.pid_file.as_deref())?;
            }
            Vec::new()
        }
        Listeners::Inherited(fds) => fds.into_iter().map(std::net::TcpListener::from).collect(),
    };
    if let Some(first) = sockets.first() {
        addr = first.local_addr().map_err(|e| vec![e.to_string()])?;
    }
    while sockets.len() < shard_count {
        let l = shard::bind_listener(addr, cfg.backlog)
            .map_err(|e| vec![format!("listen.addr: cannot listen on {addr} (shard {}): {e}", sockets.len())])?;
        if addr.port() == 0 {
            addr = l.local_addr().map_err(|e| vec![e.to_string()])?;
        }
        sockets.push(l);
    }
    let mut dups = Vec::new();
    for l in &sockets {
        l.set_nonblocking(true).map_err(|e| vec![e.to_string()])?;
        dups.push(std::os::fd::OwnedFd::from(l.try_clone().map_err(|e| vec![e.to_string()])?));
    }
    // Shard i takes socket i, i + shards, ...: every inherited socket is
    // accepted from, so nothing waiting in an accept queue is lost.
    let per_shard = round_robin(sockets, shard_count);
    // The WSM pool: every entry resolved now, and again every
    // `dns_refresh_ms` (shards follow the changes).
    let wsms = crate::resolve::resolve_all(&cfg.upstream.wsm, &[]);
    if wsms.is_empty() {
        tracing::warn!("no WSM address resolves yet; devices get 503 until one does");
    }
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut shards = Vec::new();
    let counts = Arc::new(shard::admit::Node::default());
    for (i, (l, cpu)) in per_shard.into_iter().zip(cfg.shard_cpus.iter()).enumerate() {
        let h = shard::start(i as u16, *cpu, (1, cfg.clone(), tls.clone()), l, ready_tx.clone(), (wsms.clone(), counts.clone()))
            .map_err(|e| vec![format!("shard {i}: {e}")])?;
        shards.push(h);
    }
    let wait = cfg.upstream.connect_timeout + Duration::from_secs(5);
    for _ in 0..shards.len() {
        match ready_rx.recv_timeout(wait) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(vec![e]),
            Err(_) => return Err(vec!["a shard did not start in time".into()]),
        }
    }
    // The resolver thread follows the pool's entries (a reload may change
    // them, or the refresh interval).
    let pool = Arc::new(std::sync::Mutex::new(crate::resolve::Pool {
        entries: cfg.upstream.wsm.clone(),
        every: cfg.upstream.dns_refresh,
        current: wsms.clone(),
    }));
    let ctls: Vec<_> = shards.iter().map(|s| s.ctl.clone()).collect();
    crate::resolve::refresh(pool.clone(), move |now| {
        for c in &ctls {
            let _ = c.send(Control::WsmSet(now.clone()));
        }
    });
    let node = Arc::new(metrics::NodeMetrics::default());
    node.server_cert_not_after.store(server_not_after, std::sync::atomic::Ordering::Relaxed);
    let generation = Arc::new(crate::reload::Generation {
        number: 1,
        cfg: cfg.clone(),
        tls: tls.clone(),
        wsms,
        hash: crate::reload::hash_inputs(&cfg),
        recheck: crate::reload::Recheck::Nothing,
        wake: false,
        relabel: None,
        migrate: None,
    });
    reconfigure::publish(&node, &generation);
    node.last_reload_success.store(1, std::sync::atomic::Ordering::Relaxed);
    let sources = metrics::export::Sources { shards: shards.iter().map(|s| s.metrics.clone()).collect(), node };
    let metrics_addr = match cfg.metrics {
        Some(a) => Some(metrics::http::serve(a, sources.clone()).map_err(|e| vec![format!("metrics.addr: {a}: {e}")])?),
        None => None,
    };
    let upgrade_window = (shards.len() * cfg.upgrade_moving_per_shard) as u64;
    let file_blocklist = generation.tls.verifier.blocklist();
    Ok(Running {
        listen: addr,
        metrics_addr,
        sources,
        shards,
        listeners: dups,
        pid_file: cfg.pid_file.clone(),
        upgrade_window,
        tickets: ticketer,
        generation,
        pool,
        last_reload: None,
        base_log: String::from("info"),
        started: std::time::Instant::now(),
        file_blocklist,
        shared: None,
        draining: None,
        node: counts,
    })
}

/// Fails when something already listens on `addr`. A plain bind (with
/// SO_REUSEADDR, so connections in TIME_WAIT do not count, and without
/// SO_REUSEPORT, so it cannot join an existing group) fails exactly then.
/// An upgrade's successor never gets here: it inherits the sockets.
fn refuse_if_in_use(key: &str, addr: SocketAddr, pid_file: Option<&std::path::Path>) -> Result<(), Vec<String>> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(|e| vec![e.to_string()])?;
    probe.set_reuse_address(true).map_err(|e| vec![e.to_string()])?;
    match probe.bind(&addr.into()) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let who = pid_file
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| t.trim().parse::<i32>().ok())
                .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
                .map(|pid| format!("holdfast pid {pid} (from the pid file)"))
                .unwrap_or_else(|| "another process (a running holdfast?)".into());
            Err(vec![format!(
                "{key}: {addr} is already in use by {who}; refusing to start a second instance beside it, \
                 which would split devices between the two. To replace a running holdfast without dropping a device, \
                 use `holdfast upgrade --pid-file ...` (or SIGUSR2); to run another instance, give it another address"
            )])
        }
        _ => Ok(()),
    }
}

impl Running {
    pub fn metrics_text(&self) -> String {
        metrics::export::render(&self.sources)
    }

    /// Stops accepting: a new process owns the listening sockets now. The
    /// connections already held are still served.
    pub fn stop_accepting(&mut self) {
        for s in &self.shards {
            let _ = s.ctl.send(Control::StopAccepting);
        }
    }

    /// Accepts again on the listening sockets (after a new process that had
    /// taken them over went away), spread over the shards as at start.
    pub fn resume_accepting(&mut self) {
        let sockets = self.listeners.iter().filter_map(|fd| match fd.try_clone() {
            Ok(fd) => Some(std::net::TcpListener::from(fd)),
            Err(e) => {
                tracing::error!(error = %e, "cannot duplicate a listening socket");
                None
            }
        });
        for (s, ls) in self.shards.iter().zip(round_robin(sockets, self.shards.len())) {
            let _ = s.ctl.send(Control::Accept(ls));
        }
    }

    /// Live upgrade, old side: every shard moves its tunnels, sending each
    /// snapshot and socket to `sink`.
    pub fn hand_off(&self, sink: crossbeam_channel::Sender<shard::Handed>, flight: Arc<shard::pace::Flight>) {
        for s in &self.shards {
            let _ = s.ctl.send(Control::HandOff(sink.clone(), flight.clone()));
        }
    }

    /// Control senders of the shards (for a thread that adopts connections).
    pub fn adopter(&self) -> Adopter {
        Adopter { ctls: self.shards.iter().map(|s| s.ctl.clone()).collect() }
    }

    /// Accept loops still running (0 once every shard stopped accepting).
    pub fn accepting(&self) -> u64 {
        self.shards.iter().map(|s| s.metrics.accept_loops.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Connections handed to a new process so far (all shards, ever).
    pub fn handed_over(&self) -> u64 {
        self.shards.iter().map(|s| s.metrics.connections_handed_over_total.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Connections this process still holds.
    pub fn connections(&self) -> u64 {
        self.shards.iter().map(|s| s.metrics.connections_active.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }

    /// Stops accepting and ends every shard's loop (connections are closed).
    pub fn shutdown(self) {
        for s in &self.shards {
            let _ = s.ctl.send(Control::Shutdown);
        }
        for s in self.shards {
            let _ = s.thread.join();
        }
    }
}

/// Spreads moved connections over the shards from any thread.
#[derive(Clone)]
pub struct Adopter {
    ctls: Vec<shard::ControlTx>,
}

impl Adopter {
    pub fn adopt(&self, conns: Vec<shard::Handed>) {
        for (ctl, batch) in self.ctls.iter().zip(round_robin(conns, self.ctls.len())) {
            if !batch.is_empty() {
                let _ = ctl.send(Control::Adopt(batch));
            }
        }
    }
}

/// Deals `items` over `n` buckets: item i goes to bucket i mod n.
fn round_robin<T>(items: impl IntoIterator<Item = T>, n: usize) -> Vec<Vec<T>> {
    let n = n.max(1);
    let mut out: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        out[i % n].push(item);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_robin_deals_in_turn() {
        assert_eq!(super::round_robin(0..5, 2), vec![vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(super::round_robin(0..2, 0), vec![vec![0, 1]]);
    }
}
