//! Why a device is refused: at its handshake, or later when a policy
//! change no longer allows an established connection.
//!
//! Owns: [`Refusal`], its metric label, the TLS alert that tells it, and
//! which refusal a rustls verification error stands for. Never decides a
//! refusal: the verifier and the handshake driver do.
#![forbid(unsafe_code)]

use rustls::{CertificateError, Error};

/// Why a device was refused during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    UnknownCa,
    Expired,
    Blocked,
    NoCertificate,
    BadHandshake,
    Timeout,
}

impl Refusal {
    pub const ALL: [Refusal; 6] =
        [Refusal::UnknownCa, Refusal::Expired, Refusal::Blocked, Refusal::NoCertificate, Refusal::BadHandshake, Refusal::Timeout];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::Blocked => "blocked",
            Refusal::NoCertificate => "no_certificate",
            Refusal::BadHandshake => "bad_handshake",
            Refusal::Timeout => "timeout",
        }
    }

    /// The refusal a verifier's error stands for.
    pub fn of(e: &Error) -> Refusal {
        Refusal::classify(e)
    }

    fn classify(e: &Error) -> Refusal {
        match e {
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => Refusal::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Refusal::Expired,
            Error::InvalidCertificate(CertificateError::Revoked) => Refusal::Blocked,
            Error::NoCertificatesPresented => Refusal::NoCertificate,
            _ => Refusal::BadHandshake,
        }
    }
}

impl Refusal {
    /// The alert a refusal of this kind is told with (RFC 8446 6.2, as
    /// rustls sends for the same refusal in a full handshake).
    pub fn alert(self) -> u8 {
        match self {
            Refusal::Blocked => 44,                         // certificate_revoked
            Refusal::Expired => 45,                         // certificate_expired
            Refusal::UnknownCa => 48,                       // unknown_ca
            Refusal::NoCertificate => 116,                  // certificate_required
            Refusal::BadHandshake | Refusal::Timeout => 40, // handshake_failure
        }
    }
}
