//! Entries keyed by a device certificate, compact enough for a million.
//!
//! Owns: [`CertKey`] (how an operator names a device: the SHA-256
//! fingerprint of its certificate, its serial under any issuer, or its
//! serial under one issuer), parsing it, and [`CertMap`], sorted vectors
//! looked up by binary search: 32 bytes per fingerprint entry plus its
//! value, no hash table overhead, built once per (re)load. The blocklist
//! and the device labels are both a `CertMap`. Never reads files.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use crate::identity::serial_hex;

/// How a device is named in the blocklist or the label list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertKey {
    /// SHA-256 of the certificate DER.
    Fingerprint([u8; 32]),
    /// Any certificate with this serial (lowercase hex, no leading zero bytes).
    Serial(Box<str>),
    /// This serial under this issuer (the DN as `whoami` prints it).
    SerialIssuer(Box<str>, Box<str>),
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Hex digits (colons allowed between them) into bytes; an odd count is
/// read with a leading zero (`serial:1` is serial 01).
fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let mut digits: Vec<u8> = s.bytes().filter(|&c| c != b':').collect();
    if digits.is_empty() {
        return None;
    }
    if !digits.len().is_multiple_of(2) {
        digits.insert(0, b'0');
    }
    digits.chunks(2).map(|p| Some(hex_nibble(p[0])? << 4 | hex_nibble(p[1])?)).collect()
}

/// 64 hex digits (colons allowed) into a fingerprint, without allocating.
fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let mut n = 0;
    let mut hi: Option<u8> = None;
    for c in s.bytes() {
        if c == b':' {
            continue;
        }
        let v = hex_nibble(c)?;
        match hi.take() {
            None => hi = Some(v),
            Some(h) => {
                *out.get_mut(n)? = h << 4 | v;
                n += 1;
            }
        }
    }
    (n == 32 && hi.is_none()).then_some(out)
}

impl CertKey {
    /// `<64 hex digits>`, `serial:<hex>` or `serial:<hex> issuer:<DN>`.
    pub fn parse(s: &str) -> Result<CertKey, &'static str> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("serial:") {
            let (serial, issuer) = match rest.split_once(" issuer:") {
                Some((s, iss)) => (s.trim(), Some(iss.trim())),
                None => (rest.trim(), None),
            };
            let serial: Box<str> = serial_hex(&parse_hex(serial).ok_or("serial is not hex")?).into();
            return match issuer {
                Some("") => Err("empty issuer"),
                Some(iss) => Ok(CertKey::SerialIssuer(serial, iss.into())),
                None => Ok(CertKey::Serial(serial)),
            };
        }
        match parse_fingerprint(s) {
            Some(fp) => Ok(CertKey::Fingerprint(fp)),
            None if parse_hex(s).is_some() => Err("a SHA-256 fingerprint has 64 hex digits"),
            None => Err("not a hex SHA-256 fingerprint or serial:<hex>"),
        }
    }
}

/// A serial and the issuer it is blocked or labelled under.
type SerialIssuer = (Box<str>, Box<str>);

/// Values by certificate key, sorted for binary search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertMap<V> {
    fingerprints: Vec<([u8; 32], V)>,
    serials: Vec<(Box<str>, V)>,
    by_issuer: Vec<(SerialIssuer, V)>,
}

impl<V> Default for CertMap<V> {
    fn default() -> Self {
        CertMap { fingerprints: Vec::new(), serials: Vec::new(), by_issuer: Vec::new() }
    }
}

/// Sorts by key in place and merges the values of equal keys into the
/// first of them (no second vector: a million entries need no more memory
/// than they take).
fn sorted<K: Ord, V: Default>(mut v: Vec<(K, V)>, merge: &impl Fn(&mut V, V)) -> Vec<(K, V)> {
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    v.dedup_by(|later, kept| {
        if later.0 == kept.0 {
            merge(&mut kept.1, std::mem::take(&mut later.1));
            true
        } else {
            false
        }
    });
    v.shrink_to_fit();
    v
}

/// Entries gathered one at a time, then made a [`CertMap`].
pub struct Builder<V> {
    fps: Vec<([u8; 32], V)>,
    serials: Vec<(Box<str>, V)>,
    by_issuer: Vec<(SerialIssuer, V)>,
}

impl<V: Default> Builder<V> {
    pub fn new() -> Builder<V> {
        Builder::with_fingerprints(0)
    }

    /// Room for `n` fingerprint entries from the start (a big list then
    /// never holds twice its size while it grows).
    pub fn with_fingerprints(n: usize) -> Builder<V> {
        Builder { fps: Vec::with_capacity(n), serials: Vec::new(), by_issuer: Vec::new() }
    }

    pub fn push(&mut self, k: CertKey, v: V) {
        match k {
            CertKey::Fingerprint(f) => self.fps.push((f, v)),
            CertKey::Serial(s) => self.serials.push((s, v)),
            CertKey::SerialIssuer(s, i) => self.by_issuer.push(((s, i), v)),
        }
    }

    /// The map; values under the same key are merged with `merge`.
    pub fn build(self, merge: impl Fn(&mut V, V)) -> CertMap<V> {
        CertMap { fingerprints: sorted(self.fps, &merge), serials: sorted(self.serials, &merge), by_issuer: sorted(self.by_issuer, &merge) }
    }
}

impl<V: Default> Default for Builder<V> {
    fn default() -> Self {
        Builder::new()
    }
}

impl<V: Default> CertMap<V> {
    /// A map of `entries`; values under the same key are merged with `merge`.
    pub fn build(entries: Vec<(CertKey, V)>, merge: impl Fn(&mut V, V)) -> CertMap<V> {
        let mut b = Builder::new();
        for (k, v) in entries {
            b.push(k, v);
        }
        b.build(merge)
    }
}

impl<V> CertMap<V> {
    pub fn len(&self) -> usize {
        self.fingerprints.len() + self.serials.len() + self.by_issuer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the map holds (entries, and the strings of serial entries),
    /// not counting what the values own.
    pub fn heap_bytes(&self) -> usize {
        let strings: usize = self.serials.iter().map(|(s, _)| s.len()).sum::<usize>()
            + self.by_issuer.iter().map(|((s, i), _)| s.len() + i.len()).sum::<usize>();
        self.fingerprints.capacity() * std::mem::size_of::<([u8; 32], V)>()
            + self.serials.capacity() * std::mem::size_of::<(Box<str>, V)>()
            + self.by_issuer.capacity() * std::mem::size_of::<(SerialIssuer, V)>()
            + strings
    }

    /// Every key and its value.
    pub fn entries(&self) -> impl Iterator<Item = (CertKey, &V)> {
        let f = self.fingerprints.iter().map(|(k, v)| (CertKey::Fingerprint(*k), v));
        let s = self.serials.iter().map(|(k, v)| (CertKey::Serial(k.clone()), v));
        let i = self.by_issuer.iter().map(|((k, iss), v)| (CertKey::SerialIssuer(k.clone(), iss.clone()), v));
        f.chain(s).chain(i)
    }

    /// The value under exactly this key.
    pub fn get(&self, key: &CertKey) -> Option<&V> {
        match key {
            CertKey::Fingerprint(f) => self.fingerprints.binary_search_by(|e| e.0.cmp(f)).ok().map(|i| &self.fingerprints[i].1),
            CertKey::Serial(s) => self.serials.binary_search_by(|e| e.0.cmp(s)).ok().map(|i| &self.serials[i].1),
            CertKey::SerialIssuer(s, iss) => {
                self.by_issuer.binary_search_by(|e| (&*e.0.0, &*e.0.1).cmp(&(&**s, &**iss))).ok().map(|i| &self.by_issuer[i].1)
            }
        }
    }

    /// Every value whose key names the certificate with this DER (its
    /// fingerprint, its serial, its serial under its issuer).
    pub fn matching(&self, der: &[u8]) -> Vec<&V> {
        let mut out = Vec::new();
        if !self.fingerprints.is_empty()
            && let Some(v) = self.get(&CertKey::Fingerprint(crate::identity::sha256(der)))
        {
            out.push(v);
        }
        if self.serials.is_empty() && self.by_issuer.is_empty() {
            return out;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return out };
        let serial: Box<str> = serial_hex(cert.raw_serial()).into();
        if let Some(v) = self.get(&CertKey::Serial(serial.clone())) {
            out.push(v);
        }
        if !self.by_issuer.is_empty()
            && let Some(v) = self.get(&CertKey::SerialIssuer(serial, cert.issuer().to_string().into()))
        {
            out.push(v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_normalize() {
        let fp = "AB:".repeat(31) + "ab";
        assert_eq!(CertKey::parse(&fp), Ok(CertKey::Fingerprint([0xab; 32])));
        assert_eq!(CertKey::parse("serial:00:1F"), Ok(CertKey::Serial("1f".into())));
        assert_eq!(CertKey::parse("serial:1"), Ok(CertKey::Serial("01".into())));
        assert_eq!(CertKey::parse("serial:2a issuer:CN=Fleet CA"), Ok(CertKey::SerialIssuer("2a".into(), "CN=Fleet CA".into())));
        assert!(CertKey::parse("abcd").unwrap_err().contains("64 hex"));
        assert!(CertKey::parse("nothex").is_err());
        assert!(CertKey::parse(&"ab".repeat(33)).is_err());
        assert!(CertKey::parse("serial:zz").is_err());
        assert!(CertKey::parse("serial:1 issuer:").is_err());
    }

    #[test]
    fn lookups_find_every_kind_of_key_and_merge_duplicates() {
        let ca = crate::pki::make_ca("Fleet CA").unwrap();
        let leaf = crate::pki::make_leaf(&ca, "oven", vec![], false, crate::pki::Validity::Current, 0x1f).unwrap();
        let fp = CertKey::Fingerprint(crate::identity::sha256(&leaf.der));
        let m = CertMap::build(
            vec![
                (fp.clone(), vec!["a"]),
                (CertKey::Serial("1f".into()), vec!["b"]),
                (CertKey::SerialIssuer("1f".into(), "CN=Fleet CA, O=Acme Devices".into()), vec!["c"]),
                (fp, vec!["d"]),
                (CertKey::Serial("20".into()), vec!["x"]),
            ],
            |a, b| a.extend(b),
        );
        assert_eq!(m.len(), 4, "the two fingerprint entries merged");
        let got: Vec<_> = m.matching(&leaf.der).into_iter().flatten().copied().collect();
        assert!(got.contains(&"a") && got.contains(&"d") && got.contains(&"b"), "{got:?}");
        let other = crate::pki::make_leaf(&ca, "hood", vec![], false, crate::pki::Validity::Current, 0x21).unwrap();
        assert!(m.matching(&other.der).is_empty());
    }

    #[test]
    fn a_million_fingerprints_take_32_bytes_each() {
        let entries: Vec<(CertKey, ())> =
            (0..1_000_000u32).map(|i| (CertKey::Fingerprint(crate::identity::sha256(&i.to_be_bytes())), ())).collect();
        let m = CertMap::build(entries, |_, _| {});
        assert_eq!(m.len(), 1_000_000);
        assert_eq!(m.heap_bytes(), 32_000_000);
        assert!(m.get(&CertKey::Fingerprint(crate::identity::sha256(&7u32.to_be_bytes()))).is_some());
        assert!(m.get(&CertKey::Fingerprint([0; 32])).is_none());
    }
}
