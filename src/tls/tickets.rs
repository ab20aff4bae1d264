//! Session-ticket keys that survive a live upgrade.
//!
//! Owns: the AEAD keys that seal TLS session tickets (AES-256-GCM, a random
//! 16-byte key ID, a random nonce per ticket), their rotation (a new key
//! every [`ROTATE`], the one before it still accepted, so a ticket is good
//! for its whole [`LIFETIME`] and no longer), and exporting them to a live
//! upgrade's successor so that tickets issued by the old process resume in
//! the new one: a device that reconnects after an upgrade pays an
//! abbreviated handshake, not a full one. rustls's own ticketer keeps its
//! keys to itself, hence this one. Keys are secrets: they travel only over
//! the private upgrade channel and are zeroed when dropped. Never logs a key.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// How long a ticket may be used, told to clients.
pub const LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// A new key this often; the previous one is kept for as long again.
pub const ROTATE: Duration = LIFETIME;
const ID_LEN: usize = 16;
const KEY_LEN: usize = 32;

struct Key {
    id: [u8; ID_LEN],
    secret: [u8; KEY_LEN],
    aead: LessSafeKey,
    made: Instant,
}

impl Drop for Key {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl Key {
    fn new(id: [u8; ID_LEN], secret: [u8; KEY_LEN], made: Instant) -> Option<Key> {
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(Key { id, secret, aead, made })
    }

    fn random(rng: &SystemRandom, made: Instant) -> Option<Key> {
        let (mut id, mut secret) = ([0u8; ID_LEN], [0u8; KEY_LEN]);
        rng.fill(&mut id).ok()?;
        rng.fill(&mut secret).ok()?;
        let k = Key::new(id, secret, made);
        secret.zeroize();
        k
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// The ticketer one process's shards share (behind the rustls config).
pub struct Ticketer {
    keys: RwLock<Keys>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticketer")
    }
}

/// One key as it travels to a successor: hex, and its age so that rotation
/// carries on from where it was.
#[derive(Clone, Serialize, Deserialize)]
pub struct ExportedKey {
    pub id: String,
    pub secret: String,
    pub age_secs: u64,
}

impl Drop for ExportedKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl std::fmt::Debug for ExportedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExportedKey({}, {} s old)", self.id, self.age_secs)
    }
}

impl Ticketer {
    /// A ticketer with a fresh random key.
    pub fn generate() -> Result<Arc<Ticketer>, String> {
        let rng = SystemRandom::new();
        let current = Key::random(&rng, Instant::now()).ok_or("no randomness for a ticket key")?;
        Ok(Arc::new(Ticketer { keys: RwLock::new(Keys { current, previous: None }), rng }))
    }

    /// The keys in use, newest first, for a successor.
    pub fn export(&self) -> Vec<ExportedKey> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        std::iter::once(&keys.current)
            .chain(keys.previous.as_ref())
            .map(|k| ExportedKey {
                id: crate::identity::hex(&k.id),
                secret: crate::identity::hex(&k.secret),
                age_secs: k.made.elapsed().as_secs(),
            })
            .collect()
    }

    /// A ticketer that uses a predecessor's keys (newest first).
    pub fn import(keys: &[ExportedKey]) -> Result<Arc<Ticketer>, String> {
        let now = Instant::now();
        let mut parsed = keys.iter().map(|k| {
            let mut id = [0u8; ID_LEN];
            let mut secret = [0u8; KEY_LEN];
            let ok = unhex(&k.id, &mut id) && unhex(&k.secret, &mut secret);
            let made = now.checked_sub(Duration::from_secs(k.age_secs)).unwrap_or(now);
            let key = if ok { Key::new(id, secret, made) } else { None };
            secret.zeroize();
            key.ok_or_else(|| format!("ticket key {} is malformed", k.id))
        });
        let current = parsed.next().ok_or("no ticket key")??;
        let previous = parsed.next().transpose()?;
        Ok(Arc::new(Ticketer { keys: RwLock::new(Keys { current, previous }), rng: SystemRandom::new() }))
    }

    /// Rotates if the current key is older than [`ROTATE`] (checked as
    /// tickets are made, so no timer is needed).
    fn rotate_if_due(&self) {
        let due = self.keys.read().map(|k| k.current.made.elapsed() >= ROTATE).unwrap_or(false);
        if !due {
            return;
        }
        let Ok(mut keys) = self.keys.write() else { return };
        if keys.current.made.elapsed() < ROTATE {
            return; // another thread rotated first
        }
        if let Some(new) = Key::random(&self.rng, Instant::now()) {
            let old = std::mem::replace(&mut keys.current, new);
            keys.previous = Some(old);
        }
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let keys = self.keys.read().ok()?;
        let k = &keys.current;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&k.id);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        k.aead.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&k.id), &mut body).ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < ID_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (id, rest) = cipher.split_at(ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().ok()?;
        // A key older than two rotations is gone, and so are its tickets.
        let k = std::iter::once(&keys.current).chain(keys.previous.as_ref()).find(|k| k.id == id)?;
        if k.made.elapsed() >= ROTATE + LIFETIME {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = k.aead.open_in_place(nonce, Aad::from(id), &mut body).ok()?;
        Some(plain.to_vec())
    }
}

fn unhex(s: &str, out: &mut [u8]) -> bool {
    if s.len() != out.len() * 2 || !s.is_ascii() {
        return false;
    }
    for (i, o) in out.iter_mut().enumerate() {
        match u8::from_str_radix(&s[2 * i..2 * i + 2], 16) {
            Ok(b) => *o = b,
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_roundtrip_and_reject_tampering() {
        let t = Ticketer::generate().unwrap();
        let c = t.encrypt(b"session state").unwrap();
        assert_eq!(t.decrypt(&c).unwrap(), b"session state");
        for i in [0, ID_LEN, ID_LEN + NONCE_LEN, c.len() - 1] {
            let mut bad = c.clone();
            bad[i] ^= 1;
            assert!(t.decrypt(&bad).is_none(), "flipped byte {i}");
        }
        assert!(t.decrypt(&c[..10]).is_none());
        assert!(t.decrypt(&[]).is_none());
        assert!(Ticketer::generate().unwrap().decrypt(&c).is_none(), "another process's key");
    }

    #[test]
    fn a_successor_resumes_the_predecessors_tickets() {
        let old = Ticketer::generate().unwrap();
        let ticket = old.encrypt(b"resume me").unwrap();
        let exported = old.export();
        assert_eq!(exported.len(), 1);
        assert!(!format!("{exported:?}").contains(&exported[0].secret), "never printed");
        let new = Ticketer::import(&exported).unwrap();
        assert_eq!(new.decrypt(&ticket).unwrap(), b"resume me");
        // And the other way round: the successor's tickets use the same key.
        assert_eq!(old.decrypt(&new.encrypt(b"x").unwrap()).unwrap(), b"x");
    }

    #[test]
    fn rotation_keeps_the_previous_key_and_drops_older_ones() {
        let t = Ticketer::generate().unwrap();
        let first = t.encrypt(b"1").unwrap();
        // Age the current key past its rotation, as an imported one would be.
        let mut e = t.export();
        e[0].age_secs = ROTATE.as_secs();
        let t = Ticketer::import(&e).unwrap();
        let second = t.encrypt(b"2").unwrap();
        assert_eq!(t.export().len(), 2, "rotated, previous kept");
        assert_eq!(t.decrypt(&first).unwrap(), b"1", "the previous key still opens its tickets");
        assert_eq!(t.decrypt(&second).unwrap(), b"2");
        // A previous key older than rotation + lifetime opens nothing.
        let mut e = t.export();
        e[1].age_secs = (ROTATE + LIFETIME).as_secs();
        let t = Ticketer::import(&e).unwrap();
        assert!(t.decrypt(&first).is_none());
        assert_eq!(t.decrypt(&second).unwrap(), b"2");
    }

    #[test]
    fn malformed_exports_are_refused() {
        let mut e = Ticketer::generate().unwrap().export();
        e[0].secret = "zz".into();
        assert!(Ticketer::import(&e).is_err());
        assert!(Ticketer::import(&[]).is_err());
    }
}
