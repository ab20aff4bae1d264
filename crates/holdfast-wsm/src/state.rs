//! Where the reference WSM keeps per-connection session state and device
//! presence: in memory (the default, one instance) or in a shared store
//! such as Redis (the reference WSM binary's `redis_store`: shared by every
//! WSM instance, so a stream resumed on another instance finds its session,
//! and presence outlives any one server).
//!
//! Owns: the [`Store`] trait and the in-memory store, the key layout
//! (`holdfast:session:<connection id>` holds a JSON [`Session`];
//! `holdfast:presence:<connection id>` says which WSM and holdfast node hold
//! the device, with an expiry), and the presence heartbeat: every
//! `interval` each instance re-sets the presence keys of the streams it
//! holds, with a time to live longer than the interval, so a device whose
//! servers crash (no one left to say "gone") falls out of presence by
//! itself, and a hiccup shorter than the TTL makes no one flicker offline.
//! Never decides what a message means: the app does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use holdfast_link::types::ConnectionId;

/// What the reference app remembers of a connection across streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Messages the device has sent, over every stream of this connection.
    pub messages: u64,
    /// The WSM instance that opened the connection's first stream.
    pub first_wsm: String,
}

/// Who holds a present device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub wsm: String,
    pub holdfast: String,
}

pub trait Store: Send + Sync {
    fn load(&self, id: ConnectionId) -> Option<Session>;
    fn save(&self, id: ConnectionId, s: &Session);
    /// Forgets a connection whose device has gone (its session and presence).
    fn forget(&self, id: ConnectionId);
    /// Marks these devices present for `ttl`.
    fn refresh(&self, present: &[(ConnectionId, Presence)], ttl: Duration);
    /// Whether a device is present now (for tests and tools).
    fn present(&self, id: ConnectionId) -> Option<Presence>;
}

/// Keys of one connection.
pub fn session_key(id: ConnectionId) -> String {
    format!("holdfast:session:{id}")
}

pub fn presence_key(id: ConnectionId) -> String {
    format!("holdfast:presence:{id}")
}

/// Sessions live this long after their last write (a connection that
/// resumes later than this starts afresh).
pub const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);

/// One instance's memory; what a single WSM needs, and the quickstart's.
#[derive(Default)]
pub struct Memory {
    sessions: Mutex<HashMap<ConnectionId, Session>>,
    presence: Mutex<HashMap<ConnectionId, (Presence, Instant)>>,
    /// When expired presence was last dropped (at most once a second: a
    /// scan per refresh is quadratic when thousands of streams open at once).
    purged: Mutex<Option<Instant>>,
}

impl Store for Memory {
    fn load(&self, id: ConnectionId) -> Option<Session> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }
    fn save(&self, id: ConnectionId, s: &Session) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).insert(id, s.clone());
    }
    fn forget(&self, id: ConnectionId) {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.presence.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
    fn refresh(&self, present: &[(ConnectionId, Presence)], ttl: Duration) {
        let now = Instant::now();
        let until = now + ttl;
        let mut p = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        let mut purged = self.purged.lock().unwrap_or_else(|e| e.into_inner());
        if purged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            p.retain(|_, (_, t)| *t > now);
            *purged = Some(now);
        }
        for (id, who) in present {
            p.insert(*id, (who.clone(), until));
        }
    }
    fn present(&self, id: ConnectionId) -> Option<Presence> {
        let p = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        p.get(&id).filter(|(_, t)| *t > Instant::now()).map(|(w, _)| w.clone())
    }
}

/// Re-sets the presence of every device in `held` every `interval`, with a
/// time to live of `ttl`, until the process ends.
pub fn heartbeat(store: Arc<dyn Store>, held: Arc<Mutex<HashMap<ConnectionId, Presence>>>, interval: Duration, ttl: Duration) {
    let _ = std::thread::Builder::new().name("wsm-presence".into()).spawn(move || {
        loop {
            let now: Vec<(ConnectionId, Presence)> =
                held.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, v.clone())).collect();
            store.refresh(&now, ttl);
            std::thread::sleep(interval);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sessions_and_expiring_presence() {
        let m = Memory::default();
        let id = ConnectionId(7);
        assert!(m.load(id).is_none());
        let s = Session { messages: 3, first_wsm: "a".into() };
        m.save(id, &s);
        assert_eq!(m.load(id), Some(s));
        let who = Presence { wsm: "a".into(), holdfast: "edge-1".into() };
        m.refresh(&[(id, who.clone())], Duration::from_millis(50));
        assert_eq!(m.present(id), Some(who));
        std::thread::sleep(Duration::from_millis(80));
        assert!(m.present(id).is_none(), "expires when nobody refreshes it");
        m.forget(id);
        assert!(m.load(id).is_none());
    }

    #[test]
    fn keys_are_documented_names() {
        let id = ConnectionId(0xab);
        assert_eq!(session_key(id), "holdfast:session:000000000000000000000000000000ab");
        assert_eq!(presence_key(id), "holdfast:presence:000000000000000000000000000000ab");
    }
}
