//! The `[admission]` and `[drain]` tables and the connection-age keys of
//! `[websocket]`: how many devices a node takes, how fast, how fast the
//! WSMs see them, and how connections end when they must.
//!
//! Owns: these tables' shape as written (one serde struct each, a doc
//! comment on every key, defaults) and their validation into
//! [`Admission`], [`Drain`] and [`Age`]. Never enforces anything: the
//! shards do (`admission` decides, `shard::admit` performs).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, err};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionFile {
    /// TLS handshakes the node starts per second (each shard an equal
    /// share); beyond it new connections wait in the kernel's accept queue
    /// (`listen.backlog`), and past the backlog the kernel refuses them.
    /// 0: no limit.
    pub handshakes_per_sec: u32,
    /// TLS handshakes in progress at once on the node (each shard an equal
    /// share); beyond it new connections wait in the accept queue. 0: no limit.
    pub max_handshaking: u32,
    /// Device connections the node holds; beyond it new devices are
    /// answered 503 with a jittered Retry-After. Established connections
    /// are never touched. 0: no limit.
    pub max_connections: u64,
    /// Resident memory of the process, in MiB; above it new devices are
    /// answered 503 as for `max_connections`. 0: no limit.
    pub max_memory_mb: u64,
    /// Streams the node opens on WSMs per second, new and resumed together
    /// (each shard an equal share). A device beyond it waits, its upgrade
    /// pending, in a bounded queue. 0: no limit.
    pub wsm_opens_per_sec: u32,
    /// Devices that may wait for an open (node-wide, each shard an equal
    /// share); beyond it they are answered 503.
    pub wsm_open_queue: u32,
    /// Milliseconds a device may wait in that queue; then 503.
    pub wsm_open_wait_ms: u64,
    /// Every 503 of admission control carries `Retry-After`, drawn at random
    /// for each device from `retry_after_secs` to `retry_after_secs +
    /// retry_after_jitter_secs`, so refused devices do not come back together.
    pub retry_after_secs: u32,
    pub retry_after_jitter_secs: u32,
}

impl Default for AdmissionFile {
    fn default() -> Self {
        AdmissionFile {
            handshakes_per_sec: 0,
            max_handshaking: 0,
            max_connections: 0,
            max_memory_mb: 0,
            wsm_opens_per_sec: 0,
            wsm_open_queue: 10_000,
            wsm_open_wait_ms: 30_000,
            retry_after_secs: 5,
            retry_after_jitter_secs: 25,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainFile {
    /// SIGTERM (and `systemctl stop`) closes every device with 1001 at a
    /// random moment within this many milliseconds, then exits 0; a second
    /// SIGTERM, or SIGINT, closes the rest at once (with close frames).
    pub stop_over_ms: u64,
}

impl Default for DrainFile {
    fn default() -> Self {
        DrainFile { stop_over_ms: 30_000 }
    }
}

/// Validated `[admission]`: node-wide figures (`None`: no limit).
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub handshakes_per_sec: Option<u32>,
    pub max_handshaking: Option<u32>,
    pub max_connections: Option<u64>,
    pub max_memory_bytes: Option<u64>,
    pub wsm_opens_per_sec: Option<u32>,
    pub wsm_open_queue: u32,
    pub wsm_open_wait: Duration,
    pub retry_after_secs: u32,
    pub retry_after_jitter_secs: u32,
}

/// Validated connection age (`websocket.max_age_secs`): each connection
/// draws its own from `min` to `min + jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age {
    pub min: Duration,
    pub jitter: Duration,
}

/// Validated `[drain]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    pub stop_over: Duration,
}

fn limit<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

pub fn admission(a: &AdmissionFile, errs: &mut Vec<ConfigError>) -> Admission {
    if a.wsm_open_queue == 0 {
        errs.push(err("admission.wsm_open_queue", "must be at least 1"));
    }
    if a.wsm_open_wait_ms == 0 || a.wsm_open_wait_ms > 600_000 {
        errs.push(err("admission.wsm_open_wait_ms", "must be between 1 and 600000 (ten minutes)"));
    }
    if a.retry_after_secs == 0 || a.retry_after_secs > 86_400 {
        errs.push(err("admission.retry_after_secs", "must be between 1 and 86400"));
    }
    if a.retry_after_jitter_secs > 86_400 {
        errs.push(err("admission.retry_after_jitter_secs", "at most 86400"));
    }
    if a.max_memory_mb > (1 << 30) {
        errs.push(err("admission.max_memory_mb", "at most 1073741824 (1 PiB)"));
    }
    Admission {
        handshakes_per_sec: limit(a.handshakes_per_sec),
        max_handshaking: limit(a.max_handshaking),
        max_connections: limit(a.max_connections),
        max_memory_bytes: limit(a.max_memory_mb).map(|mb| mb << 20),
        wsm_opens_per_sec: limit(a.wsm_opens_per_sec),
        wsm_open_queue: a.wsm_open_queue.max(1),
        wsm_open_wait: Duration::from_millis(a.wsm_open_wait_ms.max(1)),
        retry_after_secs: a.retry_after_secs.max(1),
        retry_after_jitter_secs: a.retry_after_jitter_secs,
    }
}

pub fn drain(d: &DrainFile, errs: &mut Vec<ConfigError>) -> Drain {
    if d.stop_over_ms > 24 * 3_600_000 {
        errs.push(err("drain.stop_over_ms", "at most one day (86400000)"));
    }
    Drain { stop_over: Duration::from_millis(d.stop_over_ms) }
}

/// `websocket.max_age_secs` and `max_age_jitter_secs` (`None`: off).
pub fn age(max_age_secs: u64, jitter_secs: u64, errs: &mut Vec<ConfigError>) -> Option<Age> {
    const YEAR: u64 = 366 * 86_400;
    if max_age_secs > YEAR {
        errs.push(err("websocket.max_age_secs", "at most a year (31622400)"));
    }
    if jitter_secs > YEAR {
        errs.push(err("websocket.max_age_jitter_secs", "at most a year (31622400)"));
    }
    if max_age_secs == 0 && jitter_secs > 0 {
        errs.push(err("websocket.max_age_jitter_secs", "set, but websocket.max_age_secs is 0 (off): set both"));
    }
    (max_age_secs > 0).then(|| Age { min: Duration::from_secs(max_age_secs), jitter: Duration::from_secs(jitter_secs) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit_and_bad_values_are_named() {
        let mut errs = Vec::new();
        let a = admission(&AdmissionFile::default(), &mut errs);
        assert!(errs.is_empty());
        assert_eq!((a.handshakes_per_sec, a.max_connections, a.wsm_opens_per_sec), (None, None, None));
        let f = AdmissionFile { max_memory_mb: 512, wsm_opens_per_sec: 100, wsm_open_queue: 0, retry_after_secs: 0, ..Default::default() };
        let a = admission(&f, &mut errs);
        assert_eq!((a.max_memory_bytes, a.wsm_opens_per_sec), (Some(512 << 20), Some(100)));
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["admission.wsm_open_queue", "admission.retry_after_secs"]);
    }

    #[test]
    fn an_age_needs_its_minimum_and_a_jitter_alone_is_an_error() {
        let mut errs = Vec::new();
        assert_eq!(age(0, 0, &mut errs), None);
        assert_eq!(age(3600, 600, &mut errs), Some(Age { min: Duration::from_secs(3600), jitter: Duration::from_secs(600) }));
        assert!(errs.is_empty());
        assert_eq!(age(0, 60, &mut errs), None);
        assert_eq!(errs[0].key, "websocket.max_age_jitter_secs");
    }
}
