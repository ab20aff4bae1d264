//! Starting and stopping the whole proxy: listeners, shards, metrics.
//!
//! Owns: binding every shard's SO_REUSEPORT socket before any shard runs (so
//! a bad address fails at start, not later), starting one pinned shard per
//! configured CPU, waiting until each reports ready, and shutdown over the
//! shards' control channels. Never handles connections itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::metrics::{self, ShardMetrics};
use crate::shard::{self, Control, ShardHandle};
use crate::tls::server::TlsContext;

pub struct Running {
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub shards: Vec<ShardHandle>,
}

pub fn start(cfg: Config) -> Result<Running, Vec<String>> {
    let tls = TlsContext::load(&cfg.tls)
        .map_err(|es| es.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let cfg = Arc::new(cfg);
    let mut addr = cfg.listen;
    let mut listeners = Vec::new();
    for i in 0..cfg.shard_cpus.len() {
        let l = shard::bind_listener(addr, cfg.backlog).map_err(|e| {
            vec![format!(
                "listen.addr: cannot listen on {addr} (shard {i}): {e}"
            )]
        })?;
        if addr.port() == 0 {
            addr = l.local_addr().map_err(|e| vec![e.to_string()])?;
        }
        listeners.push(l);
    }
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut shards = Vec::new();
    for (i, (l, cpu)) in listeners.into_iter().zip(cfg.shard_cpus.iter()).enumerate() {
        let h = shard::start(
            i as u16,
            *cpu,
            cfg.clone(),
            tls.clone(),
            l,
            ready_tx.clone(),
        )
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
    let metrics_addr = match cfg.metrics {
        Some(a) => {
            let all: Vec<Arc<ShardMetrics>> = shards.iter().map(|s| s.metrics.clone()).collect();
            Some(metrics::serve(a, all).map_err(|e| vec![format!("metrics.addr: {a}: {e}")])?)
        }
        None => None,
    };
    Ok(Running {
        listen: addr,
        metrics_addr,
        shards,
    })
}

impl Running {
    pub fn metrics_text(&self) -> String {
        let all: Vec<Arc<ShardMetrics>> = self.shards.iter().map(|s| s.metrics.clone()).collect();
        metrics::render(&all)
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

/// Blocks SIGINT and SIGTERM in this thread (and threads it starts later)
/// and returns a function that waits for one of them.
pub fn block_signals() -> impl FnOnce() -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    move || set.wait().ok()
}
