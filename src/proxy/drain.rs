//! Emptying the node: paced drains, their cancel, the graceful stop.
//!
//! Owns: what a drain does node-wide (every shard told to close its
//! connections at random moments of the window, the node's own copies of
//! the listening sockets closed so that nothing accepts any more, and, on
//! cancel, fresh listeners bound and handed to the shards), and the
//! drain's progress for `ctl status` and the metrics. Never closes a
//! connection itself: each tunnel does, at its moment (`shard::registry`).
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::Running;
use crate::session::end::Paced;
use crate::shard::{self, Control};

/// A drain under way.
#[derive(Debug, Clone)]
pub struct Draining {
    pub why: Paced,
    pub code: u16,
    pub started: Instant,
    /// When the window ends (the earliest of every drain asked for).
    pub ends: Instant,
    pub at_start: u64,
}

/// A drain's progress (`ctl status`, `ctl drain`; `docs/control.md`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DrainStatus {
    /// "drain" (`ctl drain`) or "stop" (SIGTERM).
    pub reason: String,
    pub code: u16,
    pub over_ms: u64,
    pub elapsed_ms: u64,
    pub remaining_ms: u64,
    pub connections_at_start: u64,
    pub connections_left: u64,
}

impl Running {
    /// Starts (or hastens) a drain: stop accepting, then every connection
    /// closes with `code` at a random moment within `over`. A drain already
    /// under way keeps its end if that comes sooner.
    pub fn drain(&mut self, over: Duration, code: u16, why: Paced) -> DrainStatus {
        let now = Instant::now();
        let ends = now + over;
        let d = match self.draining.take() {
            Some(mut d) => {
                if ends < d.ends {
                    d.ends = ends;
                    d.code = code;
                    d.why = why;
                }
                d
            }
            None => Draining { why, code, started: now, ends, at_start: self.connections() },
        };
        let over = d.ends.saturating_duration_since(now);
        for s in &self.shards {
            let _ = s.ctl.send(Control::Drain { over, code: d.code, why: d.why });
        }
        // The shards' accept loops close their listeners; these copies
        // (kept for a live upgrade) go too, so the port stops accepting and a
        // load balancer or DNS sends new devices elsewhere.
        self.listeners.clear();
        let node = &self.sources.node;
        node.draining.store(1, Relaxed);
        node.drain_deadline.store(crate::timefmt::unix_now() + over.as_secs() as i64, Relaxed);
        tracing::info!(
            over_ms = over.as_millis() as u64,
            code = d.code,
            reason = d.why.label(),
            connections = d.at_start,
            "drain started: not accepting; closing every connection spread over the window"
        );
        let status = self.status_of(&d);
        self.draining = Some(d);
        status
    }

    /// Stops the drain: connections not yet closed stay, and the node
    /// accepts again on freshly bound listeners.
    pub fn cancel_drain(&mut self) -> Result<(), String> {
        match &self.draining {
            None => return Err("no drain is under way".into()),
            Some(d) if d.why == Paced::Stop => return Err("the node is stopping (SIGTERM): a stop cannot be cancelled".into()),
            Some(_) => {}
        }
        let cfg = self.generation.cfg.clone();
        let mut sockets = Vec::new();
        for i in 0..self.shards.len() {
            let l = shard::bind_listener(self.listen, cfg.backlog)
                .map_err(|e| format!("cannot listen on {} again (shard {i}): {e}", self.listen))?;
            sockets.push(l);
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let n = self.shards.iter().filter(|s| s.ctl.send(Control::DrainCancel(tx.clone())).is_ok()).count();
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..n {
            if rx.recv_deadline(deadline).is_err() {
                return Err("a shard did not answer in time".into());
            }
        }
        let mut dups = Vec::new();
        for l in &sockets {
            dups.push(std::os::fd::OwnedFd::from(l.try_clone().map_err(|e| e.to_string())?));
        }
        self.listeners = dups;
        for (s, l) in self.shards.iter().zip(sockets) {
            let _ = s.ctl.send(Control::Accept(vec![l]));
        }
        self.draining = None;
        self.sources.node.draining.store(0, Relaxed);
        self.sources.node.drain_deadline.store(0, Relaxed);
        tracing::info!(connections = self.connections(), "drain cancelled: accepting again");
        Ok(())
    }

    /// The drain under way, if any.
    pub fn drain_status(&self) -> Option<DrainStatus> {
        self.draining.as_ref().map(|d| self.status_of(d))
    }

    fn status_of(&self, d: &Draining) -> DrainStatus {
        let now = Instant::now();
        DrainStatus {
            reason: d.why.label().into(),
            code: d.code,
            over_ms: d.ends.saturating_duration_since(d.started).as_millis() as u64,
            elapsed_ms: now.saturating_duration_since(d.started).as_millis() as u64,
            remaining_ms: d.ends.saturating_duration_since(now).as_millis() as u64,
            connections_at_start: d.at_start,
            connections_left: self.connections(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_some()
    }
}
