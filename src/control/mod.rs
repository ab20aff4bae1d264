//! The operators' control socket: `holdfast ctl` and `holdfast reload`.
//!
//! Owns: the request and answer types of the control protocol (one JSON
//! object a line each way, one request per connection; `docs/control.md`
//! documents them), the socket's server thread ([`server`]: a Unix socket,
//! mode 0600, each peer checked with SO_PEERCRED), the client ([`client`])
//! and what each request does to a running proxy ([`handle`], run by the
//! serve loop, which owns the proxy). Never touches a connection itself:
//! requests become shard control messages.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod handle;
pub mod server;

use serde::{Deserialize, Serialize};

pub use crate::shard::registry::{Filter, Seen};

/// What an operator asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload {
        /// After a server certificate rotation, connections made under an
        /// older certificate close (1001) spread over this many ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migrate_over_ms: Option<u64>,
    },
    /// Stop accepting and close every connection spread over `over_ms`
    /// (or, with `cancel`, stop the drain and accept again).
    Drain {
        #[serde(default)]
        over_ms: u64,
        #[serde(default = "default_drain_code")]
        code: u16,
        #[serde(default)]
        cancel: bool,
    },
    Block {
        entry: String,
    },
    Unblock {
        entry: String,
    },
    Connections {
        #[serde(default)]
        filter: Filter,
        #[serde(default = "default_sample")]
        sample: usize,
    },
    Kick {
        id: String,
        #[serde(default = "default_kick_code")]
        code: u16,
    },
    /// From `holdfast-blocklist-sync`: the fleet-wide blocklist entries,
    /// the whole set at `version` (`entries`), or the step to `version`
    /// (`add`, `remove`) from `base` (refused unless this node has `base`).
    SharedBlocklist {
        version: u64,
        #[serde(default)]
        base: Option<u64>,
        #[serde(default)]
        entries: Option<Vec<String>>,
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        remove: Vec<String>,
    },
}

fn default_sample() -> usize {
    20
}

fn default_drain_code() -> u16 {
    1001
}

fn default_kick_code() -> u16 {
    1008
}

/// The answer: `ok` and the request's result, or `ok: false` and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<crate::reload::Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kicked: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<crate::proxy::DrainStatus>,
}

impl Response {
    pub fn failed(error: impl Into<String>) -> Response {
        Response { ok: false, error: Some(error.into()), status: None, outcome: None, connections: None, kicked: None, drain: None }
    }

    pub fn done() -> Response {
        Response { ok: true, error: None, status: None, outcome: None, connections: None, kicked: None, drain: None }
    }
}

/// `ctl status` (schema in `docs/control.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub generation: u64,
    pub config_hash: String,
    pub config_path: String,
    pub last_reload: Option<crate::reload::Outcome>,
    pub connections: u64,
    pub handshakes_per_sec: f64,
    pub held_streams: u64,
    pub blocklist_entries: u64,
    pub revocations_pending: u64,
    /// The fleet-wide blocklist's version and size here, if a follower keeps one.
    pub shared_blocklist: Option<SharedStatus>,
    pub upgrade_in_progress: bool,
    /// The limits of `[admission]` and what they did.
    pub admission: AdmissionStatus,
    /// The drain under way (`ctl drain`, the graceful stop), if any.
    pub drain: Option<crate::proxy::DrainStatus>,
    pub shards: Vec<ShardStatus>,
    pub wsms: Vec<WsmStatus>,
}

/// `[admission]` as configured (`null`: no limit) and its counts.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct AdmissionStatus {
    pub handshakes_per_sec: Option<u32>,
    pub max_handshaking: Option<u32>,
    pub max_connections: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub wsm_opens_per_sec: Option<u32>,
    pub wsm_open_queue: u32,
    pub wsm_open_wait_ms: u64,
    /// Connections the node counts against `max_connections`.
    pub connections: u64,
    pub handshaking: u64,
    /// Devices waiting, upgrade pending, for a turn to open.
    pub waiting_for_open: u64,
    pub accepts_deferred_total: u64,
    pub wsm_opens_total: u64,
    pub wsm_open_waited_total: u64,
    /// Devices answered 503, by the limit: max_connections, memory,
    /// wsm_open_queue, wsm_open_wait.
    pub shed_total: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardStatus {
    pub index: usize,
    pub alive: bool,
    pub connections: u64,
    pub held_streams: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WsmStatus {
    /// The WSM's address.
    pub wsm: String,
    pub links_up: u64,
    /// `upstream.links_per_shard` x shards.
    pub links_expected: u64,
    /// "up" (all links), "degraded" (some) or "down" (none).
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedStatus {
    pub version: u64,
    pub entries: u64,
}

/// `ctl connections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connections {
    pub count: u64,
    pub sample: Vec<Seen>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_str(r#"{"cmd":"connections","filter":{"ca":"fleet-2024.pem"}}"#).unwrap();
        assert_eq!(r, Request::Connections { filter: Filter { ca: Some("fleet-2024.pem".into()), ..Filter::default() }, sample: 20 });
        let r: Request = serde_json::from_str(r#"{"cmd":"kick","id":"00"}"#).unwrap();
        assert_eq!(r, Request::Kick { id: "00".into(), code: 1008 });
        let r: Request = serde_json::from_str(r#"{"cmd":"shared_blocklist","version":9,"base":7,"add":["serial:20"]}"#).unwrap();
        assert_eq!(r, Request::SharedBlocklist { version: 9, base: Some(7), entries: None, add: vec!["serial:20".into()], remove: vec![] });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format_disk"}"#).is_err());
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"cmd":"status"}"#);
    }
}
