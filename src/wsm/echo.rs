//! The reference WSM behaviour: echo, plus `whoami`.
//!
//! Owns: the default app of `holdfast-wsm`. Every message is echoed back as
//! it came; the text message `whoami` is answered with a JSON object
//! describing the stream (connection ID, resumed flag, device identity);
//! `stats` with this WSM's counters (opens, resumed opens, closes by reason).
//! Paths starting `/refuse/<status>` are refused with that status, so
//! operators can see refusals end to end. The first offered subprotocol is
//! accepted.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{App, Decision, Replies, StreamInfo};
use crate::identity::hex;
use crate::link::codec::CloseReason;

#[derive(Default)]
pub struct Echo {
    pub opened: AtomicU64,
    /// Opens with the resumed flag (a stream moved here).
    pub resumed: AtomicU64,
    pub closed: AtomicU64,
    /// Closes that mean the device went away (never for a moved stream).
    pub device_gone: AtomicU64,
    pub handed_elsewhere: AtomicU64,
    pub messages: AtomicU64,
}

impl Echo {
    pub fn stats(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "opened": g(&self.opened),
            "resumed": g(&self.resumed),
            "closed": g(&self.closed),
            "device_gone": g(&self.device_gone),
            "handed_elsewhere": g(&self.handed_elsewhere),
            "messages": g(&self.messages),
        })
    }
}

pub fn whoami(info: &StreamInfo) -> serde_json::Value {
    let d = &info.open.device;
    serde_json::json!({
        "connection_id": info.open.connection_id.to_string(),
        "resumed": info.open.resumed,
        "device": {
            "subject": d.subject,
            "issuer": d.issuer,
            "serial": d.serial,
            "sans": d.sans,
            "sha256": hex(&d.fingerprint),
            "address": d.addr,
        },
        "path": info.open.request.path,
        "holdfast": { "node": info.node, "shard": info.shard },
        "wsm": info.wsm,
    })
}

impl App for Echo {
    fn open(&self, info: &StreamInfo) -> Decision {
        if let Some(s) = info.open.request.path.strip_prefix("/refuse/") {
            let status = s.parse().unwrap_or(403);
            return Decision::Refuse { status, reason: "refused by reference WSM".into() };
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        if info.open.resumed {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        Decision::Accept { subprotocol: info.open.request.subprotocols.first().cloned() }
    }

    fn message(&self, info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        if !binary && data == b"whoami" {
            out.text(whoami(info).to_string());
        } else if !binary && data == b"stats" {
            out.text(self.stats().to_string());
        } else if !binary && data == b"bye" {
            out.close(1000, "bye");
        } else if binary {
            out.binary(data.to_vec());
        } else {
            out.text(String::from_utf8_lossy(data).into_owned());
        }
    }

    fn closed(&self, _info: &StreamInfo, reason: CloseReason, _code: u16) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        match reason {
            CloseReason::DeviceGone => self.device_gone.fetch_add(1, Ordering::Relaxed),
            CloseReason::HandedElsewhere => self.handed_elsewhere.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}
