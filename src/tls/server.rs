//! Builds the rustls server configuration from the validated TLS config.
//!
//! Owns: loading the server chain, key, device CAs and blocklist from PEM and
//! text files, and the rustls settings holdfast relies on (AEAD suites only,
//! mandatory client certificates, secret extraction, the key log that feeds
//! the record layer, a shared session ticketer). Never touches sockets.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::blocklist::Blocklist;
use super::handshake::SecretCapture;
use super::tickets::Ticketer;
use super::verify::{CaGroup, DeviceVerifier};
use crate::config::{ConfigError, TlsConfig, err};

/// Everything a shard needs to run handshakes.
#[derive(Clone)]
pub struct TlsContext {
    pub server: Arc<ServerConfig>,
    pub verifier: Arc<DeviceVerifier>,
    pub key_update_after: u64,
    /// Device labels, sent to the WSM in each OPEN.
    pub labels: Arc<super::labels::Labels>,
    /// Session-ticket keys (shared by the shards, handed to a successor).
    pub tickets: Arc<Ticketer>,
    /// The server certificate's end of validity (Unix seconds), for the
    /// expiry gauge and alerts.
    pub server_not_after: i64,
    /// SHA-256 of the server certificate (DER), to tell a rotation.
    pub server_fingerprint: [u8; 32],
    /// Problems that do not stop holdfast but need an operator soon (a
    /// server certificate that expires within [`EXPIRY_WARNING_DAYS`]).
    pub warnings: Vec<ConfigError>,
}

/// A server certificate closer than this to its end gets a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Checks the server certificate's dates against `now`: an error if it is
/// not valid now (every device would refuse it), a warning if it ends
/// within [`EXPIRY_WARNING_DAYS`]. Returns its end of validity.
pub fn check_server_dates(leaf: &[u8], now: i64, errs: &mut Vec<ConfigError>, warnings: &mut Vec<ConfigError>) -> i64 {
    use crate::timefmt::rfc3339;
    let cert = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, c)) => c,
        Err(e) => {
            errs.push(err("tls.cert_chain", format!("the server certificate does not parse: {e}")));
            return 0;
        }
    };
    let (nb, na) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
    let who = cert.subject().to_string();
    if now < nb {
        errs.push(err(
            "tls.cert_chain",
            format!("the server certificate ({who}) is not valid until {}; every device would refuse it", rfc3339(nb)),
        ));
    } else if now > na {
        errs.push(err(
            "tls.cert_chain",
            format!("the server certificate ({who}) expired at {}; every device would refuse it", rfc3339(na)),
        ));
    } else if na - now < EXPIRY_WARNING_DAYS * 86_400 {
        warnings.push(err(
            "tls.cert_chain",
            format!("the server certificate ({who}) expires at {}, in {} day(s): renew it", rfc3339(na), (na - now) / 86_400),
        ));
    }
    na
}

pub fn provider() -> Arc<CryptoProvider> {
    // Every suite the ring provider offers for TLS 1.2 and 1.3 is an AEAD
    // (AES-GCM or ChaCha20-Poly1305) with ECDHE; nothing else is enabled.
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_blocklist(path: &std::path::Path) -> Result<Blocklist, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| err("tls.blocklist", format!("cannot read {}: {e}", path.display())))?;
    Blocklist::parse(&text).map_err(|e| err("tls.blocklist", e.to_string()))
}

impl TlsContext {
    pub fn load(c: &TlsConfig) -> Result<TlsContext, Vec<ConfigError>> {
        TlsContext::load_with(c, None)
    }

    /// As [`TlsContext::load`], sealing session tickets with `tickets`
    /// (a predecessor's keys) instead of fresh ones.
    pub fn load_with(c: &TlsConfig, tickets: Option<Arc<Ticketer>>) -> Result<TlsContext, Vec<ConfigError>> {
        TlsContext::build(c, tickets, None)
    }

    /// A live reload's context, following `running`. Sessions made under
    /// the running one go on resuming (same ticket keys, same session
    /// cache) only if the device CAs are the same (same certificates, same
    /// `ignore_validity`): a changed CA set gets fresh ticket keys and an
    /// empty cache, so no session verified under other CAs resumes. (A
    /// resumed session is still judged against the blocklist and validity
    /// on every handshake: `DeviceVerifier::admits_resumed`.)
    pub fn load_next(c: &TlsConfig, running: &TlsContext) -> Result<TlsContext, Vec<ConfigError>> {
        TlsContext::build(c, None, Some(running))
    }

    /// Whether a full handshake under `self` and under `other` decides the
    /// same for every device, the blocklist aside.
    pub fn same_cas(&self, other: &TlsContext) -> bool {
        self.verifier.ca_digest() == other.verifier.ca_digest()
    }

    fn build(c: &TlsConfig, tickets: Option<Arc<Ticketer>>, running: Option<&TlsContext>) -> Result<TlsContext, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let known: Vec<String> = provider().cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
        for (i, name) in c.cipher_suites.iter().enumerate() {
            if !known.contains(name) {
                errs.push(err(&format!("tls.cipher_suites[{i}]"), format!("unknown suite '{name}'; known: {}", known.join(", "))));
            }
        }
        let mut p = rustls::crypto::ring::default_provider();
        if !c.cipher_suites.is_empty() {
            p.cipher_suites.retain(|s| c.cipher_suites.contains(&format!("{:?}", s.suite())));
        }
        let provider = Arc::new(p);
        let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(&c.cert_chain) {
            Ok(it) => it.filter_map(|r| r.map_err(|e| errs.push(err("tls.cert_chain", e.to_string()))).ok()).collect(),
            Err(e) => {
                errs.push(err("tls.cert_chain", format!("{}: {e}", c.cert_chain.display())));
                Vec::new()
            }
        };
        if chain.is_empty() && errs.is_empty() {
            errs.push(err("tls.cert_chain", format!("{}: no certificate in file", c.cert_chain.display())));
        }
        let mut warnings = Vec::new();
        let server_not_after =
            chain.first().map(|leaf| check_server_dates(leaf.as_ref(), crate::timefmt::unix_now(), &mut errs, &mut warnings)).unwrap_or(0);
        let server_fingerprint = chain.first().map(|leaf| crate::identity::sha256(leaf.as_ref())).unwrap_or_default();
        let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| errs.push(err("tls.key", format!("{}: {e}", c.key.display())))).ok();
        let mut groups = Vec::new();
        for (i, (path, ignore)) in c.client_cas.iter().enumerate() {
            let key = format!("tls.client_ca[{i}].file");
            let certs: Vec<_> = match CertificateDer::pem_file_iter(path) {
                Ok(it) => it.filter_map(Result::ok).collect(),
                Err(e) => {
                    errs.push(err(&key, format!("{}: {e}", path.display())));
                    continue;
                }
            };
            match CaGroup::new(path.display().to_string(), certs, *ignore, provider.clone()) {
                Ok(g) => groups.push(g),
                Err(m) => errs.push(err(&key, m)),
            }
        }
        let blocklist = match &c.blocklist {
            Some(p) => load_blocklist(p).map_err(|e| errs.push(e)).unwrap_or_default(),
            None => Blocklist::default(),
        };
        let labels = match &c.labels {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => super::labels::Labels::parse(&t)
                    .map_err(|m| errs.push(err("tls.labels", format!("{}: {m}", p.display()))))
                    .unwrap_or_default(),
                Err(e) => {
                    errs.push(err("tls.labels", format!("cannot read {}: {e}", p.display())));
                    Default::default()
                }
            },
            None => Default::default(),
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let verifier = Arc::new(DeviceVerifier::new(groups, blocklist, provider.clone()));
        let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
        if c.tls13 {
            versions.push(&rustls::version::TLS13);
        }
        if c.tls12 {
            versions.push(&rustls::version::TLS12);
        }
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| vec![err("tls.versions", e.to_string())])?;
        let key = key.ok_or_else(|| vec![err("tls.key", "missing")])?;
        let mut server = builder
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain, key)
            .map_err(|e| vec![err("tls.key", format!("does not match the certificate chain or is unusable: {e}"))])?;
        server.enable_secret_extraction = true;
        server.key_log = Arc::new(SecretCapture);
        server.send_tls13_tickets = 1;
        let keep = running.filter(|r| r.verifier.ca_digest() == verifier.ca_digest());
        if let Some(r) = keep {
            server.session_storage = r.server.session_storage.clone();
        }
        let tickets = match (tickets, keep) {
            (Some(t), _) => t,
            (None, Some(r)) => r.tickets.clone(),
            (None, None) => Ticketer::generate().map_err(|e| vec![err("tls", format!("session ticketer: {e}"))])?,
        };
        server.ticketer = tickets.clone();
        Ok(TlsContext {
            server: Arc::new(server),
            verifier,
            labels: Arc::new(labels),
            key_update_after: c.key_update_after,
            tickets,
            server_not_after,
            server_fingerprint,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: i64, not_after: i64) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    const NOW: i64 = 1_796_173_323; // 2026-12-02T01:02:03Z
    const DAY: i64 = 86_400;

    fn check(nb: i64, na: i64) -> (Vec<ConfigError>, Vec<ConfigError>) {
        let (mut errs, mut warns) = (Vec::new(), Vec::new());
        let end = check_server_dates(&cert(nb, na), NOW, &mut errs, &mut warns);
        assert_eq!(end, na);
        (errs, warns)
    }

    #[test]
    fn a_current_certificate_passes_quietly() {
        assert_eq!(check(NOW - DAY, NOW + 365 * DAY), (vec![], vec![]));
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_errors_with_rfc3339_dates() {
        let (e, _) = check(NOW - 400 * DAY, NOW - DAY);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "tls.cert_chain");
        assert!(e[0].msg.contains("expired at 2026-12-01T01:02:03Z"), "{e:?}");
        let (e, _) = check(NOW + DAY, NOW + 400 * DAY);
        assert!(e[0].msg.contains("not valid until 2026-12-03T01:02:03Z"), "{e:?}");
    }

    #[test]
    fn a_certificate_ending_within_30_days_is_a_warning() {
        let (e, w) = check(NOW - DAY, NOW + 10 * DAY);
        assert!(e.is_empty());
        assert_eq!(w.len(), 1);
        assert!(w[0].msg.contains("in 10 day(s)"), "{w:?}");
        let (_, w) = check(NOW - DAY, NOW + 31 * DAY);
        assert!(w.is_empty());
    }
}
