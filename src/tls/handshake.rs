//! Sans-io driver of the server handshake: rustls up to Finished, then hand-off.
//!
//! Owns: feeding rustls whole records one at a time (so it never swallows the
//! first application data), capturing the TLS 1.3 traffic secrets through the
//! key log, and turning the finished rustls connection into a [`RecordState`]
//! for holdfast's own record layer plus the device's certificate chain.
//! Classifies every refusal into a [`Refusal`] for metrics. Never does I/O,
//! never reads the clock (rustls reads it for certificate checks), never logs
//! key material.
#![deny(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::sync::Arc;

use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConfig, ServerConnection};
use zeroize::Zeroize;

use super::keys::{Key, Secret, Suite};
use super::record::{DirectionState, RecordLayer, RecordState, Version, alert};
use super::verify::DeviceVerifier;

/// The content type of a handshake record (a ServerHello's).
const CT_HANDSHAKE: u8 = 22;

/// Largest handshake record we accept (TLS 1.2 ciphertext limit).
const MAX_RECORD: usize = 5 + (1 << 14) + 2048;

pub use super::refusal::Refusal;

#[derive(Debug, thiserror::Error)]
#[error("handshake refused ({}): {detail}", reason.label())]
pub struct HandshakeError {
    pub reason: Refusal,
    pub detail: String,
    /// The device's leaf certificate (DER), when the refusal is about it:
    /// for the log line an operator searches (subject, serial, fingerprint).
    pub presented: Option<Vec<u8>>,
}

impl HandshakeError {
    pub fn new(reason: Refusal, detail: impl Into<String>) -> Self {
        HandshakeError { reason, detail: detail.into(), presented: None }
    }
}

/// TLS 1.3 application traffic secrets, caught from rustls's key log.
#[derive(Default, Zeroize)]
#[zeroize(drop)]
struct Captured {
    client: Vec<u8>,
    server: Vec<u8>,
}

thread_local! {
    /// The slot of the connection whose records rustls is processing on this
    /// thread right now. rustls calls the key log synchronously from
    /// `process_new_packets`, so the slot is set just around that call.
    static CAPTURE: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// The rustls key log that routes traffic secrets into [`CAPTURE`].
#[derive(Debug)]
pub struct SecretCapture;

impl rustls::KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAPTURE.with(|c| {
            if let Some(cap) = c.borrow_mut().as_mut() {
                match label {
                    "CLIENT_TRAFFIC_SECRET_0" => cap.client = secret.to_vec(),
                    "SERVER_TRAFFIC_SECRET_0" => cap.server = secret.to_vec(),
                    _ => {}
                }
            }
        });
    }
}

/// A finished handshake, ready for the record layer.
pub struct Established {
    pub record: RecordState,
    /// The device's certificate chain, leaf first (validated by the verifier).
    pub chain: Vec<Vec<u8>>,
    /// Ciphertext received after the handshake's last record.
    pub leftover: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for more bytes from the device.
    Continue,
    /// The handshake is complete: call [`Handshake::finish`].
    Finished,
}

pub struct Handshake {
    conn: ServerConnection,
    captured: Captured,
    inbuf: Vec<u8>,
    key_update_after: u64,
    /// Who judges a resumed session, and the wall clock (Unix seconds) it
    /// judges validity at.
    admit: Option<(Arc<DeviceVerifier>, i64)>,
    /// The first bytes were screened (`tls::hello`): a ClientHello rustls may answer.
    screened: bool,
    /// rustls has written something (a ServerHello): alerts are its to send.
    wrote: bool,
}

/// The alert for a refusal rustls sent none for: a message that does not
/// parse is decode_error, anything else out of place unexpected_message.
fn silent_alert(e: &rustls::Error) -> u8 {
    match e {
        rustls::Error::InvalidMessage(_) => alert::DECODE_ERROR,
        _ => alert::UNEXPECTED_MESSAGE,
    }
}

impl Handshake {
    /// A handshake under `config`. `admit`: the verifier that also judges
    /// resumed sessions (which rustls lets in without running it) and the
    /// wall clock to judge at; `None` lets every resumption rustls accepts in.
    pub fn new(
        config: Arc<ServerConfig>,
        key_update_after: u64,
        admit: Option<(Arc<DeviceVerifier>, i64)>,
    ) -> Result<Self, HandshakeError> {
        let conn = ServerConnection::new(config).map_err(|e| HandshakeError::new(Refusal::BadHandshake, e.to_string()))?;
        Ok(Handshake { conn, captured: Captured::default(), inbuf: Vec::new(), key_update_after, admit, screened: false, wrote: false })
    }

    /// Once rustls has accepted a resumption (it knows the session's
    /// certificates as soon as it has read the ClientHello, before anything
    /// is sent back), the device is judged as a full handshake would judge
    /// it now. A refusal sends a plaintext alert in place of rustls's
    /// flight, so the device gets neither a session nor a new ticket.
    fn judge_resumption(&mut self, out: &mut Vec<u8>) -> Result<(), HandshakeError> {
        if self.conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
            return Ok(());
        }
        let Some((verifier, now)) = self.admit.take() else { return Ok(()) };
        let chain: Vec<Vec<u8>> =
            self.conn.peer_certificates().map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect()).unwrap_or_default();
        match verifier.admits_resumed(&chain, now) {
            Ok(()) => Ok(()),
            Err(reason) => {
                out.extend_from_slice(&alert::plaintext(reason.alert()));
                Err(HandshakeError {
                    reason,
                    detail: "a resumed session of a device that a full handshake would refuse now".into(),
                    presented: super::verify::take_refused_leaf(),
                })
            }
        }
    }

    /// Feeds received bytes; bytes to send are appended to `out` (including
    /// the alert that explains a refusal).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<Progress, HandshakeError> {
        self.inbuf.extend_from_slice(bytes);
        if !self.screened {
            // Not TLS, or too old a TLS: told at once, not at the timeout.
            match super::hello::screen(&self.inbuf) {
                super::hello::First::NeedMore => return Ok(Progress::Continue),
                super::hello::First::Tls => self.screened = true,
                other => {
                    let (reply, why) = other.refusal().unwrap_or_default();
                    out.extend_from_slice(&reply);
                    return Err(HandshakeError::new(Refusal::BadHandshake, why));
                }
            }
        }
        while self.conn.is_handshaking() {
            let Some(len) = RecordLayer::record_len(&self.inbuf) else {
                break;
            };
            if len > MAX_RECORD {
                return Err(self.fail(Refusal::BadHandshake, "oversized handshake record".into(), out));
            }
            if self.inbuf.len() < len {
                break;
            }
            // rustls takes at most 4 KiB per `read_tls`: give it the whole
            // record, however many calls that takes.
            let mut rec = &self.inbuf[..len];
            while !rec.is_empty() {
                match self.conn.read_tls(&mut rec) {
                    Ok(0) => return Err(HandshakeError::new(Refusal::BadHandshake, "rustls took none of a handshake record")),
                    Ok(_) => {}
                    Err(e) => return Err(self.fail(Refusal::BadHandshake, e.to_string(), out)),
                }
            }
            self.inbuf.drain(..len);
            let captured = std::mem::take(&mut self.captured);
            CAPTURE.with(|c| *c.borrow_mut() = Some(captured));
            let res = self.conn.process_new_packets();
            self.captured = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
            if let Err(e) = res {
                let reason = Refusal::of(&e);
                if reason == Refusal::NoCertificate && self.conn.protocol_version() == Some(ProtocolVersion::TLSv1_2) {
                    // rustls says certificate_required, a TLS 1.3 alert; TLS 1.2
                    // has handshake_failure for it (RFC 5246 7.4.6). The
                    // server has not changed cipher spec yet: in the clear.
                    out.extend_from_slice(&alert::plaintext(alert::HANDSHAKE_FAILURE));
                    return Err(HandshakeError { reason, detail: e.to_string(), presented: super::verify::take_refused_leaf() });
                }
                let (wrote, before) = (self.wrote, out.len());
                let err = self.fail(reason, e.to_string(), out);
                if !wrote {
                    // Before its first flight went out, holdfast tells the
                    // device in the clear where rustls would not: rustls
                    // ends some handshakes without a word (a record of
                    // another type between a ClientHello's records: RFC
                    // 8446 5.1); and it answers some ClientHellos, then
                    // finds it cannot go on (no signature scheme the key can
                    // make for the CertificateVerify), so its flight and an
                    // alert under keys the device never gets to use would go
                    // (RFC 8446 4.1.1: handshake_failure).
                    let abandoned = out.get(before) == Some(&CT_HANDSHAKE) && matches!(e, rustls::Error::PeerIncompatible(_));
                    if abandoned {
                        out.truncate(before);
                        out.extend_from_slice(&alert::plaintext(alert::HANDSHAKE_FAILURE));
                    } else if out.len() == before {
                        out.extend_from_slice(&alert::plaintext(silent_alert(&e)));
                    }
                }
                return Err(err);
            }
            self.judge_resumption(out)?;
            self.drain_out(out);
        }
        self.drain_out(out);
        Ok(if self.conn.is_handshaking() { Progress::Continue } else { Progress::Finished })
    }

    fn drain_out(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            match self.conn.write_tls(out) {
                Ok(n) if n > 0 => self.wrote = true,
                _ => break,
            }
        }
    }

    fn fail(&mut self, reason: Refusal, detail: String, out: &mut Vec<u8>) -> HandshakeError {
        self.drain_out(out); // rustls queued the alert for the device
        HandshakeError { reason, detail, presented: super::verify::take_refused_leaf() }
    }

    /// Turns the finished handshake into record-layer state.
    pub fn finish(mut self) -> Result<Established, HandshakeError> {
        let internal = |d: &str| HandshakeError::new(Refusal::BadHandshake, d);
        let chain: Vec<Vec<u8>> =
            self.conn.peer_certificates().map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect()).unwrap_or_default();
        if chain.is_empty() {
            return Err(HandshakeError::new(Refusal::NoCertificate, "no client certificate"));
        }
        let version = match self.conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => Version::Tls13,
            Some(ProtocolVersion::TLSv1_2) => Version::Tls12,
            _ => return Err(internal("unsupported protocol version")),
        };
        if self.conn.is_handshaking() {
            return Err(internal("handshake not finished"));
        }
        let secrets = self.conn.dangerous_extract_secrets().map_err(|e| internal(&e.to_string()))?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (suite, tx_key, tx_iv) = split(tx).ok_or_else(|| internal("unsupported suite"))?;
        let (_, rx_key, rx_iv) = split(rx).ok_or_else(|| internal("unsupported suite"))?;
        let (rx_state, tx_state) = match version {
            Version::Tls13 => {
                let secret = |v: &mut Vec<u8>| {
                    let m = Secret::new(v);
                    v.zeroize();
                    m.ok_or_else(|| internal("traffic secret longer than any suite's"))
                };
                let rx = DirectionState::from_secret(suite, secret(&mut self.captured.client)?, rx_seq);
                let tx = DirectionState::from_secret(suite, secret(&mut self.captured.server)?, tx_seq);
                // Our key schedule must agree with rustls's.
                if *rx.key != *rx_key || rx.iv != rx_iv || *tx.key != *tx_key || tx.iv != tx_iv {
                    return Err(internal("traffic secrets do not match extracted keys"));
                }
                (rx, tx)
            }
            Version::Tls12 => (
                DirectionState { secret: Secret::default(), key: rx_key, iv: rx_iv, seq: rx_seq },
                DirectionState { secret: Secret::default(), key: tx_key, iv: tx_iv, seq: tx_seq },
            ),
        };
        let record = RecordState {
            version,
            suite,
            rx: rx_state,
            tx: tx_state,
            received_close_notify: false,
            sent_close_notify: false,
            key_update_after: self.key_update_after,
            handshake_buf: Vec::new(),
        };
        Ok(Established { record, chain, leftover: std::mem::take(&mut self.inbuf) })
    }
}

fn split(s: ConnectionTrafficSecrets) -> Option<(Suite, Key, [u8; 12])> {
    let (suite, key, iv) = match &s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Suite::Chacha20Poly1305, key, iv),
        _ => return None,
    };
    let mut ivb = [0u8; 12];
    ivb.copy_from_slice(iv.as_ref());
    Some((suite, Key::new(key.as_ref())?, ivb))
}

#[cfg(test)]
pub(crate) mod tests;
