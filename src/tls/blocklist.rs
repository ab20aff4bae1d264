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

use std::collections::HashSet;

use crate::identity::serial_hex;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Blocklist {
    fingerprints: HashSet<[u8; 32]>,
    serials_any_issuer: HashSet<String>,
    serials_by_issuer: HashSet<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("blocklist line {line}: {msg}")]
pub struct BlocklistError {
    pub line: usize,
    pub msg: String,
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|&c| c != ':').collect();
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Blocklist {
    pub fn parse(text: &str) -> Result<Self, BlocklistError> {
        let mut bl = Blocklist::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |msg: &str| BlocklistError { line: i + 1, msg: msg.to_string() };
            if let Some(rest) = line.strip_prefix("serial:") {
                let (serial, issuer) = match rest.split_once(" issuer:") {
                    Some((s, iss)) => (s.trim(), Some(iss.trim().to_string())),
                    None => (rest.trim(), None),
                };
                let bytes = parse_hex(serial).ok_or_else(|| err("serial is not hex"))?;
                let serial = serial_hex(&bytes);
                match issuer {
                    Some(iss) if iss.is_empty() => return Err(err("empty issuer")),
                    Some(iss) => bl.serials_by_issuer.insert((serial, iss)),
                    None => bl.serials_any_issuer.insert(serial),
                };
            } else {
                let bytes = parse_hex(line).ok_or_else(|| err("not a hex SHA-256 fingerprint or serial:<hex>"))?;
                let fp: [u8; 32] = bytes.try_into().map_err(|_| err("a SHA-256 fingerprint has 64 hex digits"))?;
                bl.fingerprints.insert(fp);
            }
        }
        Ok(bl)
    }

    pub fn len(&self) -> usize {
        self.fingerprints.len() + self.serials_any_issuer.len() + self.serials_by_issuer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the certificate with this DER is blocked.
    pub fn blocks(&self, der: &[u8]) -> bool {
        if self.fingerprints.contains(&crate::identity::sha256(der)) {
            return true;
        }
        if self.serials_any_issuer.is_empty() && self.serials_by_issuer.is_empty() {
            return false;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return false;
        };
        let serial = serial_hex(cert.raw_serial());
        self.serials_any_issuer.contains(&serial) || self.serials_by_issuer.contains(&(serial, cert.issuer().to_string()))
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
        assert!(bl.serials_any_issuer.contains("1f"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let e = Blocklist::parse("# ok\nnothex\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = Blocklist::parse("abcd\n").unwrap_err();
        assert!(e.msg.contains("64 hex"));
    }
}
