//! The reference WSM behaviour: echo, plus `whoami`.
//!
//! Owns: the default app of `holdfast-wsm`. Every message is echoed back as
//! it came; the text message `whoami` is answered with a JSON object
//! describing the stream (connection ID, resumed flag, device identity);
//! `stats` with this WSM's counters (opens, resumed opens, closes by reason).
//! Paths starting `/refuse/<status>` are refused with that status, so
//! operators can see refusals end to end. The first offered subprotocol is
//! accepted. Each connection has a [`Session`] (messages counted over all
//! its streams, the instance that first opened it) in the [`Store`], read
//! back when its stream resumes, here or on another instance; `whoami`
//! shows it. Devices are kept present in the store while their streams are
//! open here, and forgotten when the device goes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::state::{Memory, Presence, Session, Store};
use super::{App, Decision, Replies, StreamInfo};
use holdfast_link::codec::CloseReason;
use holdfast_link::types::{ConnectionId, hex};

pub struct Echo {
    store: Arc<dyn Store>,
    /// Open streams' sessions, written through to the store.
    sessions: Mutex<HashMap<ConnectionId, Session>>,
    /// Devices present here, for the presence heartbeat.
    pub held: Arc<Mutex<HashMap<ConnectionId, Presence>>>,
    presence_ttl: Duration,
    pub opened: AtomicU64,
    /// Opens with the resumed flag (a stream moved here).
    pub resumed: AtomicU64,
    pub closed: AtomicU64,
    /// Closes that mean the device went away (never for a moved stream).
    pub device_gone: AtomicU64,
    pub handed_elsewhere: AtomicU64,
    pub messages: AtomicU64,
}

impl Default for Echo {
    fn default() -> Self {
        Echo::with_store(Arc::new(Memory::default()), Duration::from_secs(3))
    }
}

impl Echo {
    /// An echo app keeping sessions and presence in `store`; presence is set
    /// with `presence_ttl` (the heartbeat re-sets it, see `state::heartbeat`).
    pub fn with_store(store: Arc<dyn Store>, presence_ttl: Duration) -> Echo {
        Echo {
            store,
            sessions: Mutex::default(),
            held: Arc::default(),
            presence_ttl,
            opened: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            device_gone: AtomicU64::new(0),
            handed_elsewhere: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }

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

pub fn whoami(info: &StreamInfo, session: Option<&Session>) -> serde_json::Value {
    let d = &info.open.device;
    serde_json::json!({
        "session": session,
        "connection_id": info.open.connection_id.to_string(),
        "resumed": info.open.resumed,
        "labels": info.open.labels,
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
        let id = info.open.connection_id;
        if info.open.resumed {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        // A resumed stream carries on with what another stream (maybe on
        // another instance) stored; a new one starts afresh.
        let stored = if info.open.resumed { self.store.load(id) } else { None };
        let session = stored.unwrap_or_else(|| {
            let s = Session { messages: 0, first_wsm: info.wsm.clone() };
            self.store.save(id, &s);
            s
        });
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(id, session);
        let who = Presence { wsm: info.wsm.clone(), holdfast: info.node.clone() };
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, who.clone());
        self.store.refresh(&[(id, who)], self.presence_ttl);
        Decision::Accept { subprotocol: info.open.request.subprotocols.first().cloned() }
    }

    fn message(&self, info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        let id = info.open.connection_id;
        let session = {
            let mut all = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let s = all.entry(id).or_default();
            s.messages += 1;
            s.clone()
        };
        self.store.save(id, &session);
        if !binary && data == b"whoami" {
            out.text(whoami(info, Some(&session)).to_string());
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

    fn closed(&self, info: &StreamInfo, reason: CloseReason, _code: u16) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        let id = info.open.connection_id;
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        // The device left: it is gone from presence now. A stream moved to
        // another instance keeps both; one whose link broke keeps its
        // session, and its presence lapses unless another instance resumes it.
        if matches!(reason, CloseReason::DeviceGone | CloseReason::WsmClosed) {
            self.store.forget(id);
        }
        match reason {
            CloseReason::DeviceGone => self.device_gone.fetch_add(1, Ordering::Relaxed),
            CloseReason::HandedElsewhere => self.handed_elsewhere.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}
