//! Counters, gauges and histograms of each shard, and of each WSM a shard
//! links to.
//!
//! Owns: one block of relaxed atomics per shard (written only by its
//! shard's thread, read by the exporter), the same per WSM address, and
//! lock-free fixed-bucket histograms. Never blocks a shard and never
//! formats text: [`export`] turns these into the OpenMetrics exposition,
//! [`http`] serves it, [`process`] reads the process's own figures.
#![forbid(unsafe_code)]

pub mod export;
pub mod http;
pub mod process;

use crate::blame::Blamed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::tls::handshake::Refusal;

/// Declares the plain per-shard counters and gauges: the field, its kind and
/// its help text. Counter fields end in `_total` (the exposition name).
macro_rules! shard_series {
    ($( $name:ident : $kind:ident, $help:literal; )*) => {
        /// Per-shard counters and gauges.
        #[derive(Default, Debug)]
        pub struct Series {
            $( pub $name: AtomicU64, )*
        }

        impl Series {
            /// (exposition name, kind, help, field) of every series.
            pub fn each(&self) -> Vec<(&'static str, Kind, &'static str, &AtomicU64)> {
                vec![$( (concat!("holdfast_", stringify!($name)), Kind::$kind, $help, &self.$name), )*]
            }
        }
    };
}

/// How a series is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

shard_series! {
    connections_accepted_total: Counter, "TCP connections accepted";
    connections_active: Gauge, "device connections currently held";
    connections_handed_over_total: Counter, "connections moved to a new process by a live upgrade";
    connections_adopted_total: Counter, "connections taken over from the previous process by a live upgrade";
    connections_resumed_total: Counter, "adopted connections serving again (stream re-opened on a WSM)";
    connections_resume_failed_total: Counter, "adopted connections that could not re-open a stream (closed with 1013)";
    handshakes_completed_total: Counter, "mutual TLS handshakes completed";
    ws_upgrades_completed_total: Counter, "WebSocket upgrade requests answered 101 (device tunnels opened)";
    ws_upgrades_rejected_total: Counter, "WebSocket upgrade requests answered 4xx";
    wsm_unavailable_total: Counter, "devices answered 503 because no WSM link was up";
    wsm_refused_total: Counter, "streams refused by a WSM";
    wsm_open_timeouts_total: Counter, "streams the WSM did not answer in time";
    wsm_bad_accepts_total: Counter, "streams a WSM accepted with a subprotocol the device did not offer (device answered 502)";
    messages_from_devices_total: Counter, "WebSocket messages forwarded to WSMs";
    messages_to_devices_total: Counter, "WebSocket messages delivered to devices";
    key_updates_sent_total: Counter, "TLS 1.3 KeyUpdates sent by holdfast";
    key_updates_received_total: Counter, "TLS 1.3 KeyUpdates received from devices";
    idle_timeouts_total: Counter, "connections closed for inactivity";
    partial_record_evictions_total: Counter, "connections closed (1008) because the shard's partial-record budget ran out and they held the oldest partial records";
    partial_bytes: Gauge, "bytes of partial TLS records parked off the buffer pool";
    write_stall_closes_total: Counter, "connections closed because the device read nothing for websocket.write_stall_timeout_secs";
    streams_detached_total: Counter, "streams whose WSM went away (link lost or goaway), to be resumed elsewhere";
    streams_moved_total: Counter, "streams moved off a WSM that sent goaway (HANDOFF, ack, close)";
    streams_resumed_total: Counter, "detached streams re-opened on another WSM with their held messages sent";
    streams_resume_failed_total: Counter, "detached streams no WSM took within resume_timeout (device closed with 1013)";
    messages_resent_total: Counter, "device messages sent again after their WSM died before acknowledging them";
    held_bytes: Gauge, "bytes of device messages held for streams without a WSM";
    pool_exhausted_total: Counter, "times a connection waited for an I/O buffer";
    buffers_in_use: Gauge, "I/O buffers currently lent out";
    accept_loops: Gauge, "listening sockets this shard is accepting on";
    tunnels_parked: Gauge, "established tunnels waiting with no task of their own (in the shard's idle set: quiet for 2 s)";
    tunnel_state_bytes: Gauge, "bytes of per-connection state held by established tunnels (Tunnel, StreamShared, key material; not runtime or kernel)";
    streams_held: Gauge, "tunnels holding their device for want of a WSM (messages kept until a WSM takes the stream, or 1013)";
    identities_rechecked_total: Counter, "established identities checked again after a policy change (blocklist or CA set)";
    connections_kicked_total: Counter, "connections closed by an operator (holdfast ctl kick)";
    revocations_pending: Gauge, "established connections no longer allowed by the policy, waiting for their spread-out close";
    handshaking: Gauge, "connections in their TLS handshake (admission.max_handshaking counts these)";
    accepts_deferred_total: Counter, "times the accept loop left connections in the kernel's accept queue (admission.handshakes_per_sec or max_handshaking reached)";
    wsm_opens_total: Counter, "streams opened on WSMs, new and resumed (admission.wsm_opens_per_sec counts these)";
    wsm_open_queue: Gauge, "devices waiting, upgrade pending, for a turn to open their stream (admission.wsm_opens_per_sec)";
    wsm_open_waited_total: Counter, "devices that waited in the open queue and then opened their stream";
    paced_closes_pending: Gauge, "established connections with a close scheduled by a drain, a stop, their age or a migration";
}

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A fixed-bucket histogram of durations, lock-free: one writer (its shard)
/// adds with relaxed atomics; the exporter reads a near-consistent view.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with +Inf last). The
    /// counts are not cumulative (prometheus-client accumulates them when it
    /// writes), and +Inf is written as `f64::MAX`, as prometheus-client
    /// expects.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> =
            self.counts.iter().enumerate().map(|(i, c)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX), c.load(Relaxed))).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (self.sum_micros.load(Relaxed) as f64 / 1e6, count, buckets)
    }
}

/// What one shard counts about one WSM address.
#[derive(Debug)]
pub struct WsmMetrics {
    /// The WSM's address, the `wsm` label.
    pub wsm: String,
    pub links_up: AtomicU64,
    pub link_connects_total: AtomicU64,
    /// Link connections that failed, indexed like `link::session::FAILURE_LABELS`.
    pub link_failures: [AtomicU64; 8],
    pub link_liveness_failures_total: AtomicU64,
    /// Credit the WSM has for sending to holdfast on this shard's links to it
    /// (their windows less what holdfast has not returned yet): back to
    /// `links x 16 MiB` whenever holdfast has caught up.
    pub peer_credit: AtomicI64,
    /// From OPEN sent to ACCEPT or REFUSE received.
    pub open_seconds: Histogram,
}

impl WsmMetrics {
    pub fn link_failed(&self, f: &crate::link::session::Failure) {
        if let Some(i) = crate::link::session::FAILURE_LABELS.iter().position(|l| *l == f.label()) {
            self.link_failures[i].fetch_add(1, Relaxed);
        }
    }
}

/// Devices accepted under one configured client CA.
#[derive(Debug)]
pub struct CaAccepted {
    /// The CA file's name as configured, the `ca` label.
    pub ca: String,
    /// Inside their validity period.
    pub current: AtomicU64,
    /// Outside it, let in only because the CA has `ignore_validity`.
    pub validity_ignored: AtomicU64,
}

/// Everything one shard counts.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    pub s: Series,
    /// Handshake refusals, indexed like `Refusal::ALL`.
    pub refused: [AtomicU64; 6],
    /// Established connections closed (1008) after a policy change, by
    /// why they are no longer allowed, indexed like `Refusal::ALL`.
    pub revoked: [AtomicU64; 6],
    /// Devices answered 503 by admission control, indexed like `Shed::ALL`.
    pub shed: [AtomicU64; 4],
    /// Connections holdfast closed at a moment it chose, indexed like `Paced::ALL`.
    pub paced: [AtomicU64; 4],
    /// Connections closed for a bad TLS record, indexed like `RecordError::LABELS`.
    pub tls_record_errors: [AtomicU64; 9],
    /// WebSocket closes holdfast sent for bad device input, by close code.
    pub ws_closed_1002: AtomicU64,
    pub ws_closed_1007: AtomicU64,
    pub ws_closed_1009: AtomicU64,
    /// From accept to the finished mutual TLS handshake.
    pub handshake_seconds: Histogram,
    /// By CA name: the configured ones from the start, one more for each
    /// CA a reload adds (added rarely, under the lock; kept when a CA is
    /// removed, so its counters never go back).
    ca_accepted: Mutex<Vec<Arc<CaAccepted>>>,
    /// One entry per WSM address this shard has had a link to; added when a
    /// link is made (rare), read by the exporter.
    wsms: Mutex<Vec<Arc<WsmMetrics>>>,
    /// False once the shard's thread has ended (for `/healthz`).
    pub alive: AtomicBool,
}

impl std::ops::Deref for ShardMetrics {
    type Target = Series;
    fn deref(&self) -> &Series {
        &self.s
    }
}

impl ShardMetrics {
    /// Metrics for a shard whose devices come from these client CAs (named
    /// as configured).
    pub fn new(ca_names: &[String]) -> ShardMetrics {
        ShardMetrics {
            ca_accepted: Mutex::new(
                ca_names
                    .iter()
                    .map(|n| Arc::new(CaAccepted { ca: n.clone(), current: AtomicU64::new(0), validity_ignored: AtomicU64::new(0) }))
                    .collect(),
            ),
            alive: AtomicBool::new(true),
            ..ShardMetrics::default()
        }
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }

    pub fn refusal(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
            Self::inc(&self.refused[i]);
        }
    }

    pub fn revocation(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r) {
            Self::inc(&self.revoked[i]);
        }
    }

    pub fn shed(&self, s: crate::admission::Shed) {
        Self::inc(&self.shed[s.index()]);
    }

    pub fn paced_close(&self, p: crate::session::end::Paced) {
        Self::inc(&self.paced[p.index()]);
    }

    pub fn tls_record_error(&self, e: &crate::tls::record::RecordError) {
        if let Some(i) = crate::tls::record::RecordError::LABELS.iter().position(|l| *l == e.label()) {
            Self::inc(&self.tls_record_errors[i]);
        }
    }

    pub fn ws_error(&self, code: u16) {
        match code {
            1002 => Self::inc(&self.ws_closed_1002),
            1007 => Self::inc(&self.ws_closed_1007),
            1009 => Self::inc(&self.ws_closed_1009),
            _ => {}
        }
    }

    /// Counts a device accepted under the CA of this (file) name.
    pub fn accepted_under(&self, ca: &str, validity_ignored: bool) {
        let c = {
            let mut all = self.ca_accepted.lock().unwrap_or_else(|p| p.into_inner());
            match all.iter().find(|c| c.ca == ca) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(CaAccepted { ca: ca.to_string(), current: AtomicU64::new(0), validity_ignored: AtomicU64::new(0) });
                    all.push(c.clone());
                    c
                }
            }
        };
        Self::inc(if validity_ignored { &c.validity_ignored } else { &c.current });
    }

    /// The per-CA counters (a copy of the list).
    pub fn ca_accepted(&self) -> Vec<Arc<CaAccepted>> {
        self.ca_accepted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The counters of WSM address `wsm`, made on first use.
    pub fn wsm(&self, wsm: &str) -> Arc<WsmMetrics> {
        let mut all = self.wsms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = all.iter().find(|w| w.wsm == wsm) {
            return w.clone();
        }
        let w = Arc::new(WsmMetrics {
            wsm: wsm.to_string(),
            links_up: AtomicU64::new(0),
            link_connects_total: AtomicU64::new(0),
            link_failures: Default::default(),
            link_liveness_failures_total: AtomicU64::new(0),
            peer_credit: AtomicI64::new(0),
            open_seconds: Histogram::default(),
        });
        all.push(w.clone());
        w
    }

    /// Every WSM's counters (a copy of the list). Entries no link holds any
    /// more (the address left the pool and its links are gone) are dropped
    /// here, so a departed WSM's series end instead of showing 0 forever.
    pub fn wsms(&self) -> Vec<Arc<WsmMetrics>> {
        let mut all = self.wsms.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| Arc::strong_count(w) > 1);
        all.clone()
    }

    /// Links up on this shard, over every WSM.
    pub fn links_up(&self) -> u64 {
        self.wsms().iter().map(|w| w.links_up.load(Relaxed)).sum()
    }
}

/// Facts about the whole node, not one shard.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// The server certificate's end of validity (Unix seconds).
    pub server_cert_not_after: AtomicI64,
    /// The config generation serving (1 at start, +1 per applied change).
    pub config_generation: AtomicU64,
    /// 1 if the last reload was applied, 0 if it was refused (1 before any).
    pub last_reload_success: AtomicU64,
    /// When the last reload was tried (Unix seconds; 0: none yet).
    pub last_reload_timestamp: AtomicI64,
    /// Entries in the blocklist serving now.
    pub blocklist_entries: AtomicU64,
    /// 1 while a drain (`ctl drain`, or the graceful stop) is under way.
    pub draining: AtomicU64,
    /// When the running drain's window ends (Unix seconds; 0: none).
    pub drain_deadline: AtomicI64,
}

/// Marks a shard's metrics dead when its thread ends, however it ends.
pub struct AliveGuard(pub Arc<ShardMetrics>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_range_with_inf_last() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_micros(300));
        h.observe(std::time::Duration::from_millis(20));
        h.observe(std::time::Duration::from_secs(60));
        let (sum, count, b) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0203).abs() < 1e-6, "{sum}");
        assert_eq!(b[0], (0.0005, 1));
        assert_eq!(b.iter().find(|(le, _)| *le == 0.025).unwrap().1, 1);
        assert_eq!(*b.last().unwrap(), (f64::MAX, 1));
    }

    #[test]
    fn wsm_entries_are_made_once_and_dropped_with_their_last_link() {
        let m = ShardMetrics::new(&["a.pem".into()]);
        let a = m.wsm("10.0.0.1:9000");
        ShardMetrics::inc(&a.links_up);
        let a2 = m.wsm("10.0.0.1:9000");
        ShardMetrics::inc(&a2.links_up);
        let b = m.wsm("10.0.0.2:9000");
        ShardMetrics::inc(&b.links_up);
        assert_eq!(m.wsms().len(), 2);
        assert_eq!(m.links_up(), 3);
        drop(b);
        assert_eq!(m.wsms().len(), 1, "10.0.0.2 has no link any more");
        drop(a);
        assert_eq!(m.wsms().len(), 1, "10.0.0.1 still has one");
        m.accepted_under("a.pem", true);
        m.accepted_under("added-by-reload.pem", false);
        let cas = m.ca_accepted();
        assert_eq!(cas[0].validity_ignored.load(Relaxed), 1);
        assert_eq!((cas[1].ca.as_str(), cas[1].current.load(Relaxed)), ("added-by-reload.pem", 1), "a new CA gets its own series");
    }
}
