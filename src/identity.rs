//! Typed device identity: who a connection is, as a value.
//!
//! Owns: the connection ID and the facts taken from a validated device
//! certificate (issuer, subject, serial, SANs, SHA-256 fingerprint, chain) plus
//! the device's address. Passed to routing, the link protocol and logs as a
//! value. Never validates anything itself: the TLS verifier has done that.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use x509_parser::extensions::GeneralName;

pub use holdfast_link::types::{ConnectionId, DeviceIdentity, hex};

/// Makes connection IDs that are unique across shards, processes and nodes:
/// 64 random bits drawn when the generator is made, then the shard number and
/// a per-shard counter.
pub struct IdGenerator {
    prefix: u64,
    shard: u16,
    next: u64,
}

impl IdGenerator {
    pub fn new(shard: u16) -> Self {
        let mut r = [0u8; 8];
        // getrandom only fails on kernels without it; fall back to time + pid.
        let prefix = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r) {
            Ok(()) => u64::from_be_bytes(r),
            Err(_) => {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
                t ^ ((std::process::id() as u64) << 32)
            }
        };
        IdGenerator { prefix, shard, next: 0 }
    }

    pub fn next_id(&mut self) -> ConnectionId {
        self.next += 1;
        let low = ((self.shard as u64) << 48) | (self.next & 0xffff_ffff_ffff);
        ConnectionId(((self.prefix as u128) << 64) | low as u128)
    }
}

/// Reads identity fields from the leaf of a chain that rustls has already
/// validated. Returns `None` if the leaf does not parse (it did for the
/// verifier, so this means an internal mismatch).
pub fn from_chain(chain: Vec<Vec<u8>>, addr: SocketAddr) -> Option<DeviceIdentity> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                GeneralName::RFC822Name(e) => sans.push(format!("email:{e}")),
                GeneralName::URI(u) => sans.push(format!("URI:{u}")),
                GeneralName::IPAddress(ip) => sans.push(format!("IP:{}", ip_string(ip))),
                _ => {}
            }
        }
    }
    let fingerprint = sha256(leaf);
    Some(DeviceIdentity {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: serial_hex(cert.raw_serial()),
        sans,
        fingerprint,
        addr: addr.to_string(),
        chain,
    })
}

/// What an operator searches a refusal log for: a presented certificate's
/// names, serial, fingerprint and dates (RFC 3339). Never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    /// SHA-256 of the certificate's DER, lowercase hex (as the blocklist).
    pub sha256: String,
    pub not_before: String,
    pub not_after: String,
}

impl CertFacts {
    /// Reads a certificate that may not be valid at all (it was refused).
    pub fn of(der: &[u8]) -> Option<CertFacts> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertFacts {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: serial_hex(cert.raw_serial()),
            sha256: hex(&sha256(der)),
            not_before: crate::timefmt::rfc3339(cert.validity().not_before.timestamp()),
            not_after: crate::timefmt::rfc3339(cert.validity().not_after.timestamp()),
        })
    }
}

fn ip_string(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => hex(b),
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Serial as lowercase hex with leading zero bytes removed ("00" for zero).
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed: &[u8] = match raw.iter().position(|&b| b != 0) {
        Some(i) => &raw[i..],
        None => &[0],
    };
    hex(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_carry_shard() {
        let mut a = IdGenerator::new(1);
        let mut b = IdGenerator::new(2);
        let (x, y, z) = (a.next_id(), a.next_id(), b.next_id());
        assert_ne!(x, y);
        assert_ne!(x, z);
        assert_eq!((x.0 >> 48) as u16, 1);
        assert_eq!(x.to_string().len(), 32);
    }

    #[test]
    fn connection_id_roundtrips_as_hex() {
        let id = ConnectionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, "\"0123456789abcdef0011223344556677\"");
        assert_eq!(serde_json::from_str::<ConnectionId>(&j).unwrap(), id);
        assert!(serde_json::from_str::<ConnectionId>("\"zz\"").is_err());
        let b = postcard::to_allocvec(&id).unwrap();
        assert!(b.len() <= 19, "a varint u128, not 32 hex digits");
        assert_eq!(postcard::from_bytes::<ConnectionId>(&b).unwrap(), id);
    }

    #[test]
    fn serial_hex_trims_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0, 0x1f, 0x02]), "1f02");
        assert_eq!(serial_hex(&[0, 0]), "00");
    }
}
