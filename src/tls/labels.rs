//! Device labels: what holdfast tells the WSM about a device besides its
//! identity (e.g. `quarantine`), keyed like the blocklist.
//!
//! Owns: parsing the labels file and answering "which labels does this
//! certificate chain have?". The file is TOML, one entry a line: a quoted
//! device key (a SHA-256 fingerprint, `serial:<hex>`, or `serial:<hex>
//! issuer:<DN>`, as in the blocklist) and its labels:
//!
//! ```toml
//! "serial:1f" = ["quarantine"]
//! "4f0c...e1" = ["quarantine", "beta"]
//! ```
//!
//! A label is 1-64 characters of `a-z 0-9 _ . -`. A device has the union
//! of the labels of every entry naming it, sorted. Never decides what a
//! label means: the WSM does (`holdfast_wsm::quarantine`).
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use super::certmap::{CertKey, CertMap};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Labels {
    entries: CertMap<Vec<String>>,
}

fn valid_label(l: &str) -> bool {
    (1..=64).contains(&l.len()) && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c))
}

impl Labels {
    /// Parses the file's text; an error names the entry (its key).
    pub fn parse(text: &str) -> Result<Labels, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_string())?;
        let mut entries = Vec::new();
        for (key, value) in table {
            let k = CertKey::parse(&key).map_err(|m| format!("\"{key}\": {m}"))?;
            let arr = value.as_array().ok_or_else(|| format!("\"{key}\": labels are an array of strings, e.g. [\"quarantine\"]"))?;
            let mut labels = Vec::new();
            for v in arr {
                match v.as_str() {
                    Some(l) if valid_label(l) => labels.push(l.to_string()),
                    _ => return Err(format!("\"{key}\": {v} is not a label (1-64 of a-z 0-9 _ . -)")),
                }
            }
            entries.push((k, labels));
        }
        Ok(Labels { entries: CertMap::build(entries, |a, b| a.extend(b)) })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The labels of the device presenting `chain` (leaf first), sorted.
    pub fn of(&self, chain: &[Vec<u8>]) -> Vec<String> {
        let Some(leaf) = chain.first() else { return Vec::new() };
        if self.entries.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<String> = self.entries.matching(leaf).into_iter().flatten().cloned().collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_every_entry_naming_the_device() {
        let ca = crate::pki::make_ca("Fleet CA").unwrap();
        let leaf = crate::pki::make_leaf(&ca, "oven", vec![], false, crate::pki::Validity::Current, 0x1f).unwrap();
        let fp = crate::identity::hex(&crate::identity::sha256(&leaf.der));
        let l =
            Labels::parse(&format!("\"serial:1f\" = [\"quarantine\"]\n\"{fp}\" = [\"beta\", \"quarantine\"]\n\"serial:99\" = [\"x\"]\n"))
                .unwrap();
        assert_eq!(l.of(std::slice::from_ref(&leaf.der)), vec!["beta", "quarantine"]);
        let other = crate::pki::make_leaf(&ca, "hood", vec![], false, crate::pki::Validity::Current, 0x20).unwrap();
        assert!(l.of(&[other.der]).is_empty());
        assert!(l.of(&[]).is_empty());
    }

    #[test]
    fn bad_entries_name_their_key() {
        assert!(Labels::parse("\"nothex\" = [\"a\"]").unwrap_err().contains("\"nothex\""));
        assert!(Labels::parse("\"serial:1\" = \"quarantine\"").unwrap_err().contains("array"));
        assert!(Labels::parse("\"serial:1\" = [\"Quarantine!\"]").unwrap_err().contains("not a label"));
        assert!(Labels::parse("not toml").is_err());
    }
}
