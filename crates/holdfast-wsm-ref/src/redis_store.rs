//! The reference WSM's Redis store: sessions and presence shared by every
//! WSM instance (`holdfast_wsm::state` has the key layout and the trait).
//!
//! Owns: one Redis connection (re-made after an error) and the commands
//! behind each [`Store`] call. Never decides what is stored: the app does.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_link::types::ConnectionId;
use holdfast_wsm::state::{Presence, SESSION_TTL, Session, Store, presence_key, session_key};

/// Redis, shared by every WSM instance. One connection, reopened after an
/// error; a failed write is logged and counted, never fatal to a stream
/// (the app carries on from what it has in memory).
pub struct Redis {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    pub errors: std::sync::atomic::AtomicU64,
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`); fails if Redis does not
    /// answer, so a misconfigured WSM stops at start, not at the first device.
    pub fn connect(url: &str) -> Result<Arc<Redis>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| format!("{url}: {e}"))?;
        redis::cmd("PING").query::<String>(&mut conn).map_err(|e| format!("{url}: {e}"))?;
        Ok(Arc::new(Redis { client, conn: Mutex::new(Some(conn)), errors: Default::default() }))
    }

    fn with<T>(&self, what: &str, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> Option<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = self.client.get_connection_with_timeout(Duration::from_secs(2)).ok();
        }
        let conn = guard.as_mut()?;
        match f(conn) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, what, "redis");
                *guard = None;
                None
            }
        }
    }
}

impl Store for Redis {
    fn load(&self, id: ConnectionId) -> Option<Session> {
        let v: Option<String> = self.with("load", |c| redis::cmd("GET").arg(session_key(id)).query(c))?;
        serde_json::from_str(&v?).ok()
    }
    fn save(&self, id: ConnectionId, s: &Session) {
        let Ok(json) = serde_json::to_string(s) else { return };
        self.with("save", |c| {
            redis::cmd("SET").arg(session_key(id)).arg(json).arg("PX").arg(SESSION_TTL.as_millis() as u64).query::<()>(c)
        });
    }
    fn forget(&self, id: ConnectionId) {
        self.with("forget", |c| redis::cmd("DEL").arg(session_key(id)).arg(presence_key(id)).query::<()>(c));
    }
    fn refresh(&self, present: &[(ConnectionId, Presence)], ttl: Duration) {
        for chunk in present.chunks(1000) {
            let mut p = redis::pipe();
            for (id, who) in chunk {
                let Ok(json) = serde_json::to_string(who) else { continue };
                p.cmd("SET").arg(presence_key(*id)).arg(json).arg("PX").arg(ttl.as_millis() as u64).ignore();
            }
            self.with("presence", |c| p.query::<()>(c));
        }
    }
    fn present(&self, id: ConnectionId) -> Option<Presence> {
        let v: Option<String> = self.with("present", |c| redis::cmd("GET").arg(presence_key(id)).query(c))?;
        serde_json::from_str(&v?).ok()
    }
}
