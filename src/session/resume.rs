//! What a resumed OPEN needs of an established connection ([`Resume`]: the
//! device's certificate chain, its request and the chosen subprotocol),
//! packed small: an idle connection keeps it for its whole life and reads it
//! only when its stream re-opens or the connection moves.
//!
//! Owns: packing (postcard, then LZ4 against a dictionary shared by the
//! shard's connections from the same issuing CA) and unpacking. Devices of
//! one CA share most of their certificate bytes (issuer name, algorithm and
//! extension identifiers, validity layout) and their requests share paths
//! and headers, so the dictionary for an issuer is simply the first resume
//! packed from it; what is left per device is mostly its key, signature,
//! serial and name. Dictionaries are per shard ([`Dictionaries`], shared
//! nothing across threads), at most [`MAX_DICTIONARIES`] of them (one per
//! issuer; a shard past that packs without one) and each at most
//! [`MAX_DICTIONARY`] bytes. Never does I/O, never decides anything about
//! the protocol.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::upgrade::snapshot::Resume;

/// Issuers a shard keeps a dictionary for (a fleet has about ten CAs).
pub const MAX_DICTIONARIES: usize = 64;

/// Largest dictionary kept (a longer first resume is cut to this).
pub const MAX_DICTIONARY: usize = 4096;

/// The bytes a packed resume was compressed against.
pub struct Dictionary(Box<[u8]>);

/// A shard's dictionaries, by the raw issuer name of the leaf certificate.
#[derive(Default)]
pub struct Dictionaries {
    by_issuer: RefCell<HashMap<Box<[u8]>, Rc<Dictionary>>>,
}

impl Dictionaries {
    /// The dictionary for the issuer of `r`'s leaf; made from `plain` (the
    /// resume's own packed bytes) if this is the issuer's first device.
    fn for_resume(&self, r: &Resume, plain: &[u8]) -> Option<Rc<Dictionary>> {
        let issuer = issuer_of(r.chain.first()?)?;
        let mut map = self.by_issuer.borrow_mut();
        if let Some(d) = map.get(issuer) {
            return Some(d.clone());
        }
        if map.len() >= MAX_DICTIONARIES {
            return None;
        }
        let d = Rc::new(Dictionary(plain[..plain.len().min(MAX_DICTIONARY)].into()));
        map.insert(issuer.into(), d.clone());
        Some(d)
    }

    /// Issuers with a dictionary now.
    pub fn len(&self) -> usize {
        self.by_issuer.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The issuer name's DER contents in a certificate, found by walking the
/// first elements of the TBSCertificate (RFC 5280 4.1: an optional [0]
/// version, the serial number, the signature algorithm, then the issuer)
/// without parsing the rest: it runs for every connection.
fn issuer_of(cert: &[u8]) -> Option<&[u8]> {
    use x509_parser::asn1_rs::{Any, Class, FromDer, Tag};
    let (_, cert) = Any::from_der(cert).ok()?;
    let (_, tbs) = Any::from_der(cert.data).ok()?;
    // `first` is the optional version, or else already the serial number.
    let (mut rest, first) = Any::from_der(tbs.data).ok()?;
    if first.class() == Class::ContextSpecific && first.tag() == Tag(0) {
        rest = Any::from_der(rest).ok()?.0; // the serial number
    }
    rest = Any::from_der(rest).ok()?.0; // the signature algorithm
    let (_, issuer) = Any::from_der(rest).ok()?;
    (issuer.tag() == Tag::Sequence).then_some(issuer.data)
}

/// A [`Resume`], packed. 24 bytes inline; the packed bytes on the heap,
/// shared by clones (the tunnel and the shard's registry hold one each).
#[derive(Clone)]
pub struct PackedResume {
    /// `Some`: `bytes` is LZ4 (size-prefixed) against this dictionary.
    /// `None`: `bytes` is the plain postcard encoding.
    dict: Option<Rc<Dictionary>>,
    bytes: Rc<[u8]>,
}

impl PackedResume {
    /// Packs `r`, against its issuer's dictionary when that is smaller.
    pub fn of(r: &Resume, dicts: &Dictionaries) -> PackedResume {
        let plain = postcard::to_allocvec(r).unwrap_or_default();
        if let Some(dict) = dicts.for_resume(r, &plain) {
            let packed = lz4_flex::block::compress_prepend_size_with_dict(&plain, &dict.0);
            if packed.len() < plain.len() {
                return PackedResume { dict: Some(dict), bytes: packed.into() };
            }
        }
        PackedResume { dict: None, bytes: plain.into() }
    }

    /// The resume data (`None` only if packing had failed: an internal error).
    pub fn unpack(&self) -> Option<Resume> {
        match &self.dict {
            None => postcard::from_bytes(&self.bytes).ok(),
            Some(d) => {
                let plain = lz4_flex::block::decompress_size_prepended_with_dict(&self.bytes, &d.0).ok()?;
                postcard::from_bytes(&plain).ok()
            }
        }
    }

    /// Heap bytes this connection alone holds for it (the shared dictionary
    /// not counted): the bytes and their counts.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len() + 16
    }

    /// Whether it was packed against a dictionary.
    pub fn uses_dictionary(&self) -> bool {
        self.dict.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::upgrade::UpgradeRequest;

    fn device(ca: &crate::pki::Ca, cn: &str, serial: u64) -> Vec<u8> {
        let sans = vec![format!("{cn}.devices.local")];
        crate::pki::make_leaf(ca, cn, sans, false, crate::pki::Validity::Current, serial).unwrap().der
    }

    fn resume(leaf: Vec<u8>) -> Resume {
        Resume {
            chain: vec![leaf],
            request: UpgradeRequest {
                path: "/ws".into(),
                headers: vec![("host".into(), "edge.example".into()), ("user-agent".into(), "acme-fw/4.2".into())],
                ..Default::default()
            },
            subprotocol: Some("acme.v1".into()),
        }
    }

    #[test]
    fn round_trips_and_distinct_devices_of_one_ca_pack_small() {
        let ca = crate::pki::make_ca("Fleet CA").unwrap();
        let dicts = Dictionaries::default();
        let first = resume(device(&ca, "oven-1", 1));
        let p = PackedResume::of(&first, &dicts);
        assert!(p.uses_dictionary());
        assert_eq!(p.unpack().unwrap(), first);
        let plain_len = postcard::to_allocvec(&first).unwrap().len();
        let mut total = 0;
        for i in 2..20u64 {
            let r = resume(device(&ca, &format!("oven-{i}"), i * 7919));
            let p = PackedResume::of(&r, &dicts);
            assert_eq!(p.unpack().unwrap(), r, "device {i}");
            total += p.heap_bytes();
        }
        let avg = total / 18;
        // Each device has its own key (65 B), signature (~71 B), serial and
        // name; the rest comes from the dictionary.
        assert!(avg * 100 < plain_len * 65, "packed {avg} B of {plain_len} B");
        assert_eq!(dicts.len(), 1);
    }

    #[test]
    fn one_dictionary_per_issuer_and_a_bound_on_them() {
        let dicts = Dictionaries::default();
        let a = crate::pki::make_ca("CA a").unwrap();
        let b = crate::pki::make_ca("CA b").unwrap();
        let ra = resume(device(&a, "x", 1));
        let rb = resume(device(&b, "x", 1));
        assert_eq!(PackedResume::of(&ra, &dicts).unpack().unwrap(), ra);
        assert_eq!(PackedResume::of(&rb, &dicts).unpack().unwrap(), rb);
        assert_eq!(dicts.len(), 2);
        for i in 0..MAX_DICTIONARIES {
            let ca = crate::pki::make_ca(&format!("CA {i}")).unwrap();
            let r = resume(device(&ca, "y", 2));
            assert_eq!(PackedResume::of(&r, &dicts).unpack().unwrap(), r);
        }
        assert_eq!(dicts.len(), MAX_DICTIONARIES);
    }

    #[test]
    fn the_issuer_walk_agrees_with_a_full_parse() {
        let ca = crate::pki::make_ca("Fleet 2030 CA").unwrap();
        let leaf = device(&ca, "hood-9", 99);
        let (_, full) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let raw = full.tbs_certificate.issuer.as_raw();
        // `as_raw` includes the SEQUENCE header; the walk gives its contents.
        assert!(raw.ends_with(issuer_of(&leaf).unwrap()));
        assert_eq!(issuer_of(&leaf).unwrap().len() + 2, raw.len());
        assert!(issuer_of(&leaf[..40]).is_none());
        assert!(issuer_of(b"").is_none());
    }

    #[test]
    fn a_resume_without_a_parsable_leaf_is_kept_plain() {
        let dicts = Dictionaries::default();
        let r = resume(b"not a certificate".to_vec());
        let p = PackedResume::of(&r, &dicts);
        assert!(!p.uses_dictionary());
        assert_eq!(p.unpack().unwrap(), r);
        assert!(dicts.is_empty());
    }
}
