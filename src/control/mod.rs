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
    Reload,
    Block { entry: String },
    Unblock { entry: String },
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
}

fn default_sample() -> usize {
    20
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
}

impl Response {
    pub fn failed(error: impl Into<String>) -> Response {
        Response { ok: false, error: Some(error.into()), status: None, outcome: None, connections: None, kicked: None }
    }

    pub fn done() -> Response {
        Response { ok: true, error: None, status: None, outcome: None, connections: None, kicked: None }
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
    pub upgrade_in_progress: bool,
    pub shards: Vec<ShardStatus>,
    pub wsms: Vec<WsmStatus>,
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

/// `ctl connections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connections {
    pub count: u64,
    pub sample: Vec<Seen>,
}
