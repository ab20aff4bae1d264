//! TLS cipher suites and the TLS 1.3 key schedule pieces the record layer needs.
//!
//! Owns: the mapping from a negotiated suite to its AEAD, hash and key sizes,
//! HKDF-Expand-Label, and deriving key + IV (and the next-generation secret for
//! KeyUpdate) from a TLS 1.3 traffic secret. Never does I/O, never logs secrets.
#![deny(clippy::disallowed_methods)]

use ring::{aead, hkdf};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// A traffic secret (up to 48 bytes: SHA-384).
pub type Secret = Material<48>;
/// An AEAD key (up to 32 bytes).
pub type Key = Material<32>;

/// Key material of at most `N` bytes, held inline (no allocation: an idle
/// connection keeps four of them). Serialized exactly as a `Vec<u8>` would
/// be, so snapshots of earlier builds still decode. Wiped when dropped;
/// never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Material<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> std::fmt::Debug for Material<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Material({} bytes)", self.len) // never the bytes
    }
}

impl<const N: usize> Default for Material<N> {
    fn default() -> Self {
        Material { len: 0, bytes: [0; N] }
    }
}

impl<const N: usize> Material<N> {
    /// `None` if `b` is longer than `N`.
    pub fn new(b: &[u8]) -> Option<Self> {
        let mut m = Self::default();
        m.bytes.get_mut(..b.len())?.copy_from_slice(b);
        m.len = b.len() as u8;
        Some(m)
    }

    fn zeroed(len: usize) -> Self {
        Material { len: len.min(N) as u8, bytes: [0; N] }
    }
}

impl<const N: usize> std::ops::Deref for Material<N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl<const N: usize> std::ops::DerefMut for Material<N> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len as usize]
    }
}

impl<const N: usize> Zeroize for Material<N> {
    fn zeroize(&mut self) {
        self.bytes.zeroize();
        self.len = 0;
    }
}

impl<const N: usize> Drop for Material<N> {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl<const N: usize> Serialize for Material<N> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As a sequence of u8, which is how `Vec<u8>` serializes.
        (**self).serialize(s)
    }
}

impl<'de, const N: usize> Deserialize<'de> for Material<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut v = Vec::<u8>::deserialize(d)?;
        let m = Self::new(&v);
        v.zeroize();
        m.ok_or_else(|| serde::de::Error::invalid_length(N + 1, &"no more key material than the suite uses"))
    }
}

/// The AEAD suites holdfast speaks after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    pub fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// The hash of the TLS 1.3 suite (SHA-384 only for AES-256-GCM).
    pub fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Suite::Aes256Gcm => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    pub fn key_len(self) -> usize {
        self.aead().key_len()
    }

    pub fn hash_len(self) -> usize {
        match self {
            Suite::Aes256Gcm => 48,
            _ => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "AES_128_GCM",
            Suite::Aes256Gcm => "AES_256_GCM",
            Suite::Chacha20Poly1305 => "CHACHA20_POLY1305",
        }
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446 section 7.1) with an empty context.
pub fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let ctx_len = [0u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &ctx_len];
    // Lengths here are fixed by the suite and always within HKDF's limit
    // (255 * hash length), so expand cannot fail.
    let okm = prk.expand(&info, Len(out.len())).expect("HKDF output length within limit");
    okm.fill(out).expect("HKDF fill length matches");
}

/// Key and IV for one direction, derived from a TLS 1.3 traffic secret.
pub fn derive_key_iv(suite: Suite, secret: &[u8]) -> (Key, [u8; 12]) {
    let mut key = Key::zeroed(suite.key_len());
    expand_label(suite.hkdf(), secret, b"key", &mut key);
    let mut iv = [0u8; 12];
    expand_label(suite.hkdf(), secret, b"iv", &mut iv);
    (key, iv)
}

/// The next application traffic secret (RFC 8446 section 7.2).
pub fn next_secret(suite: Suite, secret: &[u8]) -> Secret {
    let mut out = Secret::zeroed(suite.hash_len());
    expand_label(suite.hkdf(), secret, b"traffic upd", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 8448 section 3 (simple 1-RTT handshake): the server application
    /// traffic secret and the key and IV derived from it.
    #[test]
    fn rfc8448_server_application_keys() {
        let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
        let (key, iv) = derive_key_iv(Suite::Aes128Gcm, &secret);
        assert_eq!(*key, *hex("9f02283b6c9c07efc26bb9f2ac92e356"));
        assert_eq!(iv.to_vec(), hex("cf782b88dd83549aadf1e984"));
    }

    #[test]
    fn next_secret_changes_and_is_deterministic() {
        let s = vec![7u8; 48];
        let a = next_secret(Suite::Aes256Gcm, &s);
        assert_eq!(a.len(), 48);
        assert_ne!(*a, *s);
        assert_eq!(a, next_secret(Suite::Aes256Gcm, &s));
    }

    /// Key material encodes exactly as the `Vec<u8>` it replaced, so a live
    /// upgrade from a build that kept it in vectors decodes its snapshot.
    #[test]
    fn material_encodes_as_a_byte_vector_did() {
        let bytes: Vec<u8> = (0..48).map(|i| (i * 37) as u8).collect();
        let m = Secret::new(&bytes).unwrap();
        let as_vec = postcard::to_allocvec(&bytes).unwrap();
        assert_eq!(postcard::to_allocvec(&m).unwrap(), as_vec);
        assert_eq!(*postcard::from_bytes::<Secret>(&as_vec).unwrap(), *bytes);
        let long = postcard::to_allocvec(&vec![1u8; 33]).unwrap();
        assert!(postcard::from_bytes::<Key>(&long).is_err(), "more than a key holds");
        assert!(Key::new(&[0; 33]).is_none());
        assert_eq!(format!("{m:?}"), "Material(48 bytes)");
    }
}
