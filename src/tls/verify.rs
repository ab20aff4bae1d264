//! Device certificate verification for mutual TLS.
//!
//! Owns: the decision whether a device certificate is acceptable: it must
//! chain to one of the configured CAs, must not be blocklisted, and must be
//! within its validity period unless its CA is marked `ignore_validity`. For
//! those CAs only the clock check is skipped; signatures, chain, key usage and
//! everything else are still verified by webpki. Never counts or logs: the
//! handshake driver classifies the error it returns, and takes the refused
//! certificate (for the log line) from a thread-local slot.
#![deny(clippy::disallowed_methods)]

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use super::blocklist::Blocklist;

thread_local! {
    /// The leaf certificate of the last refused device on this thread, for
    /// the refusal's log line. rustls calls the verifier synchronously from
    /// `process_new_packets`, and the handshake driver takes the slot right
    /// after that call fails, so it never outlives one handshake step.
    static REFUSED_LEAF: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// Takes the certificate the verifier last refused on this thread.
pub fn take_refused_leaf() -> Option<Vec<u8>> {
    REFUSED_LEAF.with(|s| s.borrow_mut().take())
}

fn note_refused(leaf: &[u8]) {
    REFUSED_LEAF.with(|s| *s.borrow_mut() = Some(leaf.to_vec()));
}

/// One configured issuing CA (or bundle of CAs from one file).
pub struct CaGroup {
    pub name: String,
    pub ignore_validity: bool,
    verifier: Arc<dyn ClientCertVerifier>,
    /// DER subjects of this group's CA certificates.
    subjects: Vec<Vec<u8>>,
    /// SHA-256 over the group's CA certificates (DER), in file order.
    roots_digest: [u8; 32],
}

impl std::fmt::Debug for CaGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaGroup({}, ignore_validity={})", self.name, self.ignore_validity)
    }
}

impl CaGroup {
    /// Its CA certificates and `ignore_validity`, as one digest.
    fn digest(&self) -> [u8; 32] {
        let mut b = self.roots_digest.to_vec();
        b.push(u8::from(self.ignore_validity));
        crate::identity::sha256(&b)
    }

    pub fn new(
        name: String,
        roots: Vec<CertificateDer<'static>>,
        ignore_validity: bool,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let mut store = RootCertStore::empty();
        let roots_digest = crate::identity::sha256(&roots.iter().flat_map(|c| c.as_ref().iter().copied()).collect::<Vec<u8>>());
        for c in roots {
            store.add(c).map_err(|e| format!("{name}: not a usable CA certificate: {e}"))?;
        }
        if store.is_empty() {
            return Err(format!("{name}: no CA certificate found"));
        }
        let subjects = store.subjects().iter().map(|d| d.as_ref().to_vec()).collect();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider).build().map_err(|e| format!("{name}: {e}"))?;
        Ok(CaGroup { name, ignore_validity, verifier, subjects, roots_digest })
    }
}

#[derive(Debug)]
pub struct DeviceVerifier {
    groups: Vec<CaGroup>,
    hints: Vec<DistinguishedName>,
    blocklist: RwLock<Arc<Blocklist>>,
    provider: Arc<CryptoProvider>,
}

/// A moment inside the leaf's validity period, used as "now" for CAs whose
/// certificates are accepted regardless of the clock.
fn time_inside_validity(der: &[u8], now: UnixTime) -> UnixTime {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return now;
    };
    let v = cert.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now_s = now.as_secs() as i64;
    if nb <= now_s && now_s <= na {
        return now;
    }
    let mid = nb + (na - nb) / 2;
    UnixTime::since_unix_epoch(Duration::from_secs(mid.max(0) as u64))
}

fn is_validity_error(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidCertificate(
            CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }
        )
    )
}

impl DeviceVerifier {
    pub fn new(groups: Vec<CaGroup>, blocklist: Blocklist, provider: Arc<CryptoProvider>) -> Self {
        let hints = groups.iter().flat_map(|g| g.verifier.root_hint_subjects().to_vec()).collect();
        DeviceVerifier { groups, hints, blocklist: RwLock::new(Arc::new(blocklist)), provider }
    }

    /// Replaces the blocklist; handshakes from now on use the new one.
    pub fn set_blocklist(&self, bl: Blocklist) {
        if let Ok(mut g) = self.blocklist.write() {
            *g = Arc::new(bl);
        }
    }

    /// Which configured CA group issued an accepted chain (leaf first), and
    /// whether the leaf is outside its validity period at `now` (Unix
    /// seconds), i.e. let in only by that group's `ignore_validity`. Found
    /// by issuer name, so it works for resumed sessions too (rustls does not
    /// verify the chain again then).
    pub fn issuing_ca(&self, chain: &[Vec<u8>], now: i64) -> Option<(usize, bool)> {
        let certs: Vec<_> = chain.iter().filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, c)| c)).collect();
        let leaf = certs.first()?;
        let v = leaf.validity();
        let outside = now < v.not_before.timestamp() || now > v.not_after.timestamp();
        for cert in &certs {
            let issuer = cert.issuer().as_raw();
            if let Some(i) = self.groups.iter().position(|g| g.subjects.iter().any(|s| s.as_slice() == issuer)) {
                return Some((i, outside));
            }
        }
        None
    }

    /// The configured CA file (its name) whose CA issued this chain, for
    /// logs: "none" when no configured CA did (an unknown issuer).
    pub fn ca_name(&self, chain: &[Vec<u8>]) -> String {
        self.issuing_ca(chain, 0).map(|(i, _)| self.group_file_name(i)).unwrap_or_else(|| "none".into())
    }

    /// Group `i`'s CA file name (its `ca` metric label).
    pub fn group_file_name(&self, i: usize) -> String {
        self.groups
            .get(i)
            .map(|g| std::path::Path::new(&g.name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| g.name.clone()))
            .unwrap_or_else(|| "none".into())
    }

    /// Whether a device resuming an earlier TLS session would pass a full
    /// handshake now (rustls does not run the verifier on resumption): its
    /// leaf must not be blocklisted, its issuer must still be a configured
    /// CA, and its leaf must be valid at `now` (Unix seconds) unless that
    /// CA ignores validity. What this does not re-check (the signatures) is
    /// covered by session tickets: a change of the CA set replaces the
    /// ticket keys and the session cache, so no session made under other
    /// CAs resumes (`tls::server`, docs/reload.md).
    pub fn admits_resumed(&self, chain: &[Vec<u8>], now: i64) -> Result<(), super::refusal::Refusal> {
        use super::refusal::Refusal;
        let leaf = chain.first().ok_or(Refusal::NoCertificate)?;
        if self.blocklist().blocks(leaf) {
            note_refused(leaf);
            return Err(Refusal::Blocked);
        }
        let refused = |r| {
            note_refused(leaf);
            Err(r)
        };
        match self.issuing_ca(chain, now) {
            None => refused(Refusal::UnknownCa),
            Some((i, outside)) if outside && !self.groups.get(i).is_some_and(|g| g.ignore_validity) => refused(Refusal::Expired),
            Some(_) => Ok(()),
        }
    }

    /// The digest of the configured CA group that issued this chain (its
    /// CA certificates and `ignore_validity`), `None` if none did.
    pub fn group_digest(&self, chain: &[Vec<u8>]) -> Option<[u8; 32]> {
        let (i, _) = self.issuing_ca(chain, 0)?;
        self.groups.get(i).map(CaGroup::digest)
    }

    /// Every group's digest (see [`DeviceVerifier::group_digest`]).
    pub fn group_digests(&self) -> Vec<[u8; 32]> {
        self.groups.iter().map(CaGroup::digest).collect()
    }

    /// The full check of a handshake (chain, signatures, validity as its CA
    /// wants, blocklist) for a chain already presented, at `now` (Unix
    /// seconds): what an established connection is judged by when its CA
    /// changed.
    pub fn verify_chain(&self, chain: &[Vec<u8>], now: i64) -> Result<(), super::refusal::Refusal> {
        use super::refusal::Refusal;
        let leaf = chain.first().ok_or(Refusal::NoCertificate)?;
        let end = CertificateDer::from(leaf.as_slice());
        let rest: Vec<CertificateDer<'_>> = chain[1..].iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let at = UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64));
        let r = self.verify_client_cert(&end, &rest, at).map(|_| ()).map_err(|e| super::refusal::Refusal::of(&e));
        let _ = take_refused_leaf();
        r
    }

    /// A digest of the CA set (each group's CA certificates and its
    /// `ignore_validity`): equal digests mean a full handshake decides the
    /// same way under both, blocklist aside.
    pub fn ca_digest(&self) -> [u8; 32] {
        let mut all = Vec::new();
        for g in &self.groups {
            all.push(u8::from(g.ignore_validity));
            for s in &g.subjects {
                all.extend_from_slice(&(s.len() as u32).to_be_bytes());
                all.extend_from_slice(s);
            }
            all.extend_from_slice(&g.roots_digest);
        }
        crate::identity::sha256(&all)
    }

    pub fn blocklist(&self) -> Arc<Blocklist> {
        match self.blocklist.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl ClientCertVerifier for DeviceVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if self.blocklist().blocks(end_entity.as_ref()) {
            note_refused(end_entity.as_ref());
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        // Prefer the most specific failure: "expired" (chain matched a CA)
        // over "unknown issuer" (no CA matched).
        let mut best = Error::InvalidCertificate(CertificateError::UnknownIssuer);
        for g in &self.groups {
            let at = if g.ignore_validity { time_inside_validity(end_entity.as_ref(), now) } else { now };
            match g.verifier.verify_client_cert(end_entity, intermediates, at) {
                Ok(v) => return Ok(v),
                Err(e) if is_validity_error(&e) => best = e,
                Err(e) if !matches!(e, Error::InvalidCertificate(CertificateError::UnknownIssuer)) && !is_validity_error(&best) => best = e,
                Err(_) => {}
            }
        }
        note_refused(end_entity.as_ref());
        Err(best)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
