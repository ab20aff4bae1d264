//! The device blocklist: certificates refused during the handshake.
//!
//! Owns: parsing the blocklist file and answering "is this certificate
//! blocked?". File format, one entry a line, `#` starts a comment:
//! - 64 hex digits (colons allowed): SHA-256 fingerprint of the certificate DER;
//! - `serial:<hex>`: any certificate with this serial number;
//! - `serial:<hex> issuer:<DN>`: that serial only under that issuer (the DN as
//!   `whoami` prints it, e.g. `CN=Fleet 2019 CA`).
//!
//! Never reads files on the handshake path: it is built once per (re)load.
#![deny(clippy::disallowed_methods)]

use super::certmap::{CertKey, CertMap};

/// Sorted, deduplicated entries (so two lists with the same entries are
/// equal, whatever their order in the file): about 32 bytes per
/// fingerprint, a million of them in about 32 MB.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Blocklist {
    entries: CertMap<()>,
}

#[derive(Debug, thiserror::Error)]
#[error("blocklist line {line}: {msg}")]
pub struct BlocklistError {
    pub line: usize,
    pub msg: String,
}

impl Blocklist {
    pub fn parse(text: &str) -> Result<Self, BlocklistError> {
        // A fingerprint line is 65 bytes: about this many entries.
        let mut b = super::certmap::Builder::with_fingerprints(text.len() / 65 + 1);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let key = CertKey::parse(line).map_err(|m| BlocklistError { line: i + 1, msg: m.to_string() })?;
            b.push(key, ());
        }
        Ok(Blocklist { entries: b.build(|_, _| {}) })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the certificate with this DER is blocked.
    pub fn blocks(&self, der: &[u8]) -> bool {
        !self.entries.matching(der).is_empty()
    }

    /// This list and `more` together.
    pub fn union(&self, more: &[CertKey]) -> Blocklist {
        let mut b = super::certmap::Builder::new();
        for k in self.entries.entries().map(|(k, _)| k).chain(more.iter().cloned()) {
            b.push(k, ());
        }
        Blocklist { entries: b.build(|_, _| {}) }
    }

    /// Whether this entry is in the list.
    pub fn contains(&self, key: &CertKey) -> bool {
        self.entries.get(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_comments() {
        let fp = "ab".repeat(32);
        let text = format!("# comment\n{fp}  # trailing\n\nserial:00:1F\nserial:2a issuer:CN=Fleet CA\n");
        let bl = Blocklist::parse(&text).unwrap();
        assert_eq!(bl.len(), 3);
        assert!(bl.contains(&CertKey::Serial("1f".into())));
        assert!(bl.contains(&CertKey::Fingerprint([0xab; 32])));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let e = Blocklist::parse("# ok\nnothex\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Blocklist::parse("abcd\n").unwrap_err();
        assert!(e.msg.contains("64 hex"));
    }
}
