//! holdfast's own TLS record layer, used after rustls has finished the handshake.
//!
//! Owns: record framing, AEAD protection (AES-128-GCM, AES-256-GCM,
//! ChaCha20-Poly1305) in the TLS 1.3 and TLS 1.2 record formats, sequence
//! numbers, alerts (close_notify included), and TLS 1.3 KeyUpdate in both
//! directions. Its whole state is [`RecordState`], plain serializable data, so a
//! live upgrade can move it to a new process.
//!
//! Never does I/O, never reads the clock, never logs key material; ciphertext
//! comes in as a byte slice, protected bytes go out appended to a `Vec`.
#![deny(clippy::disallowed_methods)]

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::keys::{Key, Secret, Suite, derive_key_iv, next_secret};

pub const HEADER_LEN: usize = 5;
/// How long a peer that asked for a KeyUpdate must have sent nothing before
/// holdfast answers it without data to carry it: a peer waiting for the
/// answer gets it this soon, and a flood of requests in one burst gets one
/// answer (RFC 8446 4.6.3: "multiple KeyUpdates while it is silent").
pub const KEY_UPDATE_QUIET: std::time::Duration = std::time::Duration::from_millis(200);
const MAX_PLAINTEXT: usize = 1 << 14;
const TAG_LEN: usize = 16;
const GCM12_EXPLICIT: usize = 8;
/// Largest post-handshake handshake message we buffer (KeyUpdate is 5 bytes).
const MAX_HANDSHAKE_BUF: usize = 1 << 14;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;

const HS_CLIENT_HELLO: u8 = 1;
const HS_HELLO_REQUEST: u8 = 0;
const HS_KEY_UPDATE: u8 = 24;

/// Alert descriptions holdfast sends or recognises.
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const HANDSHAKE_FAILURE: u8 = 40;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const PROTOCOL_VERSION: u8 = 70;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const USER_CANCELED: u8 = 90;
    pub const NO_RENEGOTIATION: u8 = 100;

    /// A fatal alert as a plaintext record (before any key is in use).
    pub fn plaintext(description: u8) -> [u8; 7] {
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    Tls12,
    Tls13,
}

/// Errors of the record layer. All but `Internal` are the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("record failed authentication")]
    BadRecordMac,
    #[error("record longer than the protocol allows")]
    RecordOverflow,
    #[error("unexpected message (content type {0})")]
    UnexpectedMessage(u8),
    #[error("malformed record or message")]
    Decode,
    /// A field with a value the protocol does not allow (a KeyUpdate whose
    /// request_update is neither 0 nor 1).
    #[error("illegal parameter")]
    IllegalParameter,
    #[error("peer sent fatal alert {0}")]
    PeerAlert(u8),
    #[error("data after close_notify")]
    AfterClose,
    #[error("sequence number exhausted")]
    SeqExhausted,
    #[error("bad key material: {0}")]
    Internal(&'static str),
}

impl RecordError {
    /// Every label [`Blamed::label`] gives, in a fixed order (metrics).
    pub const LABELS: [&'static str; 9] = [
        "bad_record_mac",
        "record_overflow",
        "unexpected_message",
        "decode_error",
        "illegal_parameter",
        "peer_alert",
        "after_close",
        "seq_exhausted",
        "internal",
    ];

    /// The alert to send the peer before closing, if any.
    pub fn alert(&self) -> Option<u8> {
        match self {
            RecordError::BadRecordMac => Some(alert::BAD_RECORD_MAC),
            RecordError::RecordOverflow => Some(alert::RECORD_OVERFLOW),
            RecordError::UnexpectedMessage(_) | RecordError::AfterClose => Some(alert::UNEXPECTED_MESSAGE),
            RecordError::Decode => Some(alert::DECODE_ERROR),
            RecordError::IllegalParameter => Some(alert::ILLEGAL_PARAMETER),
            RecordError::PeerAlert(_) => None,
            RecordError::SeqExhausted | RecordError::Internal(_) => Some(alert::INTERNAL_ERROR),
        }
    }
}

/// Keys and counter of one direction.
#[derive(Clone, Serialize, Deserialize, Zeroize)]
#[zeroize(drop)]
pub struct DirectionState {
    /// TLS 1.3: the current application traffic secret (KeyUpdate derives the
    /// next one from it). Empty for TLS 1.2.
    pub secret: Secret,
    pub key: Key,
    /// TLS 1.3 and ChaCha20 in 1.2: the static IV. AES-GCM in 1.2: the 4-byte
    /// salt followed by 8 bytes the sender XORs with the sequence number.
    pub iv: [u8; 12],
    /// Sequence number of the next record.
    pub seq: u64,
}

impl std::fmt::Debug for DirectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectionState {{ seq: {}, .. }}", self.seq)
    }
}

impl DirectionState {
    /// A TLS 1.3 direction from its traffic secret.
    pub fn from_secret(suite: Suite, secret: Secret, seq: u64) -> Self {
        let (key, iv) = derive_key_iv(suite, &secret);
        DirectionState { secret, key, iv, seq }
    }

    fn rotate(&mut self, suite: Suite) {
        let next = next_secret(suite, &self.secret);
        *self = DirectionState::from_secret(suite, next, 0);
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

/// The complete state of the record layer: plain data, serializable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordState {
    pub version: Version,
    pub suite: Suite,
    pub rx: DirectionState,
    pub tx: DirectionState,
    pub received_close_notify: bool,
    pub sent_close_notify: bool,
    /// TLS 1.3: after this many records under one key holdfast starts a
    /// KeyUpdate of its own (0 = never).
    pub key_update_after: u64,
    /// Bytes of a post-handshake handshake message split across records.
    pub handshake_buf: Vec<u8>,
}

/// What [`RecordLayer::open`] found at the start of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Not a whole record yet; read more.
    NeedMore,
    /// Application data, decrypted in place at `input[start..end]`.
    Data { consumed: usize, start: usize, end: usize },
    /// A record handled inside the layer (KeyUpdate, warning alert, empty record).
    Control { consumed: usize },
    /// The peer sent close_notify; holdfast should answer with its own and close.
    CloseNotify { consumed: usize },
}

/// Expanded AEAD keys (AES key schedule, GHASH table): about 1.1 KB, so
/// they are built on first use and dropped by [`RecordLayer::cool`] while the
/// connection is idle; the raw keys in [`RecordState`] are all that is kept.
struct Keys {
    rx: LessSafeKey,
    tx: LessSafeKey,
}

/// The live record layer: [`RecordState`] plus, while active, expanded keys.
pub struct RecordLayer {
    state: RecordState,
    keys: Option<Box<Keys>>,
    /// Counters since the last key change (not needed across an upgrade: a
    /// fresh count only delays the next automatic KeyUpdate).
    tx_records_this_key: u32,
    key_updates_sent: u32,
    key_updates_received: u32,
    /// The peer asked for a KeyUpdate not yet answered: answered once,
    /// before the next application data (RFC 8446 4.6.3), or once the peer
    /// has been quiet for [`KEY_UPDATE_QUIET`] (its owner's timer), however
    /// many requests came meanwhile. Not in [`RecordState`]: a hand-over
    /// answers it first ([`RecordLayer::answer_key_update`]).
    key_update_owed: bool,
}

fn make_key(suite: Suite, key: &[u8]) -> Result<LessSafeKey, RecordError> {
    UnboundKey::new(suite.aead(), key).map(LessSafeKey::new).map_err(|_| RecordError::Internal("key length does not match suite"))
}

impl RecordLayer {
    pub fn new(state: RecordState) -> Result<Self, RecordError> {
        if state.version == Version::Tls13
            && (state.rx.secret.len() != state.suite.hash_len() || state.tx.secret.len() != state.suite.hash_len())
        {
            return Err(RecordError::Internal("TLS 1.3 state without traffic secrets"));
        }
        let keys = Some(Box::new(Keys { rx: make_key(state.suite, &state.rx.key)?, tx: make_key(state.suite, &state.tx.key)? }));
        Ok(RecordLayer { keys, state, tx_records_this_key: 0, key_updates_sent: 0, key_updates_received: 0, key_update_owed: false })
    }

    pub fn state(&self) -> &RecordState {
        &self.state
    }

    /// Drops the expanded keys; the next record rebuilds them from the state.
    pub fn cool(&mut self) {
        self.keys = None;
    }

    fn keys(&mut self) -> Result<&Keys, RecordError> {
        if self.keys.is_none() {
            let s = &self.state;
            self.keys = Some(Box::new(Keys { rx: make_key(s.suite, &s.rx.key)?, tx: make_key(s.suite, &s.tx.key)? }));
        }
        self.keys.as_deref().ok_or(RecordError::Internal("keys"))
    }

    pub fn into_state(self) -> RecordState {
        self.state
    }

    pub fn version(&self) -> Version {
        self.state.version
    }

    pub fn suite(&self) -> Suite {
        self.state.suite
    }

    /// When the KeyUpdate the peer asked for (if one is owed) goes out with
    /// no data of holdfast's to carry it: [`KEY_UPDATE_QUIET`] after the
    /// peer last sent anything (`last_rx`, its owner's clock). The owner
    /// arms a timer for it and then calls [`RecordLayer::answer_key_update`].
    pub fn key_update_due(&self, last_rx: std::time::Instant) -> Option<std::time::Instant> {
        self.key_update_owed.then_some(last_rx + KEY_UPDATE_QUIET)
    }

    pub fn key_updates(&self) -> (u64, u64) {
        (self.key_updates_sent as u64, self.key_updates_received as u64)
    }

    /// Bytes of ciphertext needed before the first record in `input` is whole
    /// (0 if it is whole already). Lets the caller size its read.
    pub fn record_len(input: &[u8]) -> Option<usize> {
        if input.len() < HEADER_LEN {
            return None;
        }
        Some(HEADER_LEN + u16::from_be_bytes([input[3], input[4]]) as usize)
    }

    fn max_ciphertext(&self) -> usize {
        match self.state.version {
            Version::Tls13 => MAX_PLAINTEXT + 256,
            Version::Tls12 => MAX_PLAINTEXT + 2048,
        }
    }

    /// Decrypts the first record of `input` in place. Any bytes the layer must
    /// send in reply (a no_renegotiation alert) are appended to `out`; a
    /// KeyUpdate the peer requests is answered before the next application
    /// data sealed (or by [`RecordLayer::answer_key_update`]).
    pub fn open(&mut self, input: &mut [u8], out: &mut Vec<u8>) -> Result<Opened, RecordError> {
        let Some(total) = Self::record_len(input) else {
            return Ok(Opened::NeedMore);
        };
        let ctype = input[0];
        // TLS 1.2 puts 03 03 on every record after the handshake and its AAD
        // does not cover these bytes, so they are checked here. TLS 1.3's
        // legacy_record_version "MUST be ignored for all purposes" (RFC 8446
        // 5.1; the AAD covers the bytes as sent).
        if self.state.version == Version::Tls12 && input[1..3] != [3, 3] {
            return Err(RecordError::Decode);
        }
        if total - HEADER_LEN > self.max_ciphertext() {
            return Err(RecordError::RecordOverflow);
        }
        if input.len() < total {
            return Ok(Opened::NeedMore);
        }
        if self.state.received_close_notify {
            return Err(RecordError::AfterClose);
        }
        if self.state.rx.seq == u64::MAX {
            return Err(RecordError::SeqExhausted);
        }
        let (inner_type, start, end) = match self.state.version {
            Version::Tls13 => self.open13(ctype, &mut input[..total])?,
            Version::Tls12 => self.open12(ctype, &mut input[..total])?,
        };
        self.state.rx.seq += 1;
        // A handshake message split over records has nothing between its
        // records (RFC 8446 5.1).
        if inner_type != CT_HANDSHAKE && !self.state.handshake_buf.is_empty() {
            return Err(RecordError::UnexpectedMessage(inner_type));
        }
        match inner_type {
            CT_APPDATA if start == end => Ok(Opened::Control { consumed: total }),
            CT_APPDATA => Ok(Opened::Data { consumed: total, start, end }),
            CT_ALERT => self.on_alert(&input[start..end], total),
            CT_HANDSHAKE => {
                self.on_handshake(&input[start..end], out)?;
                Ok(Opened::Control { consumed: total })
            }
            other => Err(RecordError::UnexpectedMessage(other)),
        }
    }

    fn open13(&mut self, ctype: u8, rec: &mut [u8]) -> Result<(u8, usize, usize), RecordError> {
        if ctype != CT_APPDATA {
            return Err(RecordError::UnexpectedMessage(ctype));
        }
        if rec.len() < HEADER_LEN + TAG_LEN + 1 {
            return Err(RecordError::Decode);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&rec[..HEADER_LEN]);
        let nonce = Nonce::assume_unique_for_key(self.state.rx.nonce());
        let plain =
            self.keys()?.rx.open_in_place(nonce, Aad::from(header), &mut rec[HEADER_LEN..]).map_err(|_| RecordError::BadRecordMac)?;
        // The whole TLSInnerPlaintext, padding and all, is at most 2^14 + 1
        // bytes (RFC 8446 5.4).
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::RecordOverflow);
        }
        // Strip zero padding; the last non-zero byte is the real content type.
        let Some(pos) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::UnexpectedMessage(0));
        };
        if pos > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow);
        }
        Ok((plain[pos], HEADER_LEN, HEADER_LEN + pos))
    }

    fn open12(&mut self, ctype: u8, rec: &mut [u8]) -> Result<(u8, usize, usize), RecordError> {
        if !matches!(ctype, CT_APPDATA | CT_ALERT | CT_HANDSHAKE) {
            return Err(RecordError::UnexpectedMessage(ctype));
        }
        let explicit = match self.state.suite {
            Suite::Chacha20Poly1305 => 0,
            _ => GCM12_EXPLICIT,
        };
        let body = rec.len() - HEADER_LEN;
        if body < explicit + TAG_LEN {
            return Err(RecordError::Decode);
        }
        let plain_len = body - explicit - TAG_LEN;
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow);
        }
        let nonce = if explicit == 0 {
            self.state.rx.nonce()
        } else {
            let mut n = [0u8; 12];
            n[..4].copy_from_slice(&self.state.rx.iv[..4]);
            n[4..].copy_from_slice(&rec[HEADER_LEN..HEADER_LEN + GCM12_EXPLICIT]);
            n
        };
        let aad = aad12(self.state.rx.seq, ctype, plain_len);
        let start = HEADER_LEN + explicit;
        self.keys()?
            .rx
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut rec[start..])
            .map_err(|_| RecordError::BadRecordMac)?;
        Ok((ctype, start, start + plain_len))
    }

    fn on_alert(&mut self, body: &[u8], consumed: usize) -> Result<Opened, RecordError> {
        if body.len() != 2 {
            return Err(RecordError::Decode);
        }
        let (level, desc) = (body[0], body[1]);
        if desc == alert::CLOSE_NOTIFY {
            self.state.received_close_notify = true;
            return Ok(Opened::CloseNotify { consumed });
        }
        // TLS 1.2 warnings (and 1.3 user_canceled) are informational.
        let warning = level == 1 && (self.state.version == Version::Tls12 || desc == alert::USER_CANCELED);
        if warning { Ok(Opened::Control { consumed }) } else { Err(RecordError::PeerAlert(desc)) }
    }

    fn on_handshake(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.handshake_buf.len() + body.len() > MAX_HANDSHAKE_BUF {
            return Err(RecordError::Decode);
        }
        self.state.handshake_buf.extend_from_slice(body);
        loop {
            let buf = &self.state.handshake_buf;
            if buf.len() < 4 {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                return Ok(());
            }
            let msg: Vec<u8> = self.state.handshake_buf.drain(..4 + len).collect();
            self.on_handshake_message(msg[0], &msg[4..], out)?;
        }
    }

    fn on_handshake_message(&mut self, typ: u8, body: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        match (self.state.version, typ) {
            (Version::Tls13, HS_KEY_UPDATE) => {
                // RFC 8446 4.6.3: request_update is 0 or 1; any other value
                // is an illegal_parameter, a wrong length a decode_error.
                let request = match body {
                    [0] => false,
                    [1] => true,
                    [_] => return Err(RecordError::IllegalParameter),
                    _ => return Err(RecordError::Decode),
                };
                // A KeyUpdate must end its record: data after it would be
                // under the old key.
                if !self.state.handshake_buf.is_empty() {
                    return Err(RecordError::UnexpectedMessage(CT_HANDSHAKE));
                }
                let suite = self.state.suite;
                self.state.rx.rotate(suite);
                self.keys = None;
                self.key_updates_received = self.key_updates_received.saturating_add(1);
                self.key_update_owed |= request;
                Ok(())
            }
            (Version::Tls12, HS_CLIENT_HELLO) | (Version::Tls12, HS_HELLO_REQUEST) => {
                // Renegotiation is not supported: refuse politely (RFC 5246 7.2.2).
                self.seal_record(CT_ALERT, &[1, alert::NO_RENEGOTIATION], out)
            }
            _ => Err(RecordError::UnexpectedMessage(CT_HANDSHAKE)),
        }
    }

    /// Starts a TLS 1.3 KeyUpdate from holdfast's side; with `request_peer`
    /// the peer must update its sending key too. No-op for TLS 1.2.
    pub fn send_key_update(&mut self, request_peer: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.version != Version::Tls13 {
            return Ok(());
        }
        let msg = [HS_KEY_UPDATE, 0, 0, 1, request_peer as u8];
        self.seal_record(CT_HANDSHAKE, &msg, out)?;
        let suite = self.state.suite;
        self.state.tx.rotate(suite);
        self.keys = None;
        self.tx_records_this_key = 0;
        self.key_updates_sent = self.key_updates_sent.saturating_add(1);
        Ok(())
    }

    /// The KeyUpdate the peer's requests are owed, if any, into `out`: one
    /// for any number of requests (RFC 8446 4.6.3: "an implementation which
    /// receives multiple KeyUpdates while it is silent [responds] with a
    /// single update"), so a flood of them costs holdfast one key change.
    /// [`RecordLayer::seal`] calls it; a hand-over calls it before taking
    /// its snapshot.
    pub fn answer_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if std::mem::take(&mut self.key_update_owed) {
            self.send_key_update(false, out)?;
        }
        Ok(())
    }

    /// Protects application data, split into records of at most 16 KiB.
    pub fn seal(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.sent_close_notify {
            return Err(RecordError::AfterClose);
        }
        if !data.is_empty() {
            self.answer_key_update(out)?;
        }
        while !data.is_empty() {
            let n = data.len().min(MAX_PLAINTEXT);
            let due = self.state.key_update_after;
            if self.state.version == Version::Tls13 && due > 0 && u64::from(self.tx_records_this_key) >= due {
                self.send_key_update(true, out)?;
            }
            self.seal_record(CT_APPDATA, &data[..n], out)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Appends a close_notify alert; nothing may be sealed after it.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.sent_close_notify {
            return Ok(());
        }
        self.seal_record(CT_ALERT, &[1, alert::CLOSE_NOTIFY], out)?;
        self.state.sent_close_notify = true;
        Ok(())
    }

    /// Appends a fatal alert; nothing may be sealed after it.
    pub fn fatal_alert(&mut self, desc: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.state.sent_close_notify {
            return Ok(());
        }
        self.seal_record(CT_ALERT, &[2, desc], out)?;
        self.state.sent_close_notify = true;
        Ok(())
    }

    /// Bytes of ciphertext `len` bytes of application data become, at most.
    pub fn sealed_len(len: usize) -> usize {
        let records = len.div_ceil(MAX_PLAINTEXT).max(1);
        len + records * (HEADER_LEN + 1 + GCM12_EXPLICIT + TAG_LEN) + 64
    }

    fn seal_record(&mut self, ctype: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_padded(ctype, data, out, [3, 3], 0)
    }

    /// As `seal_record`, with this TLS 1.3 legacy_record_version and `pad`
    /// zero bytes after the content type (RFC 8446 5.1, 5.4; holdfast sends
    /// 03 03 and no padding; tests send a 03 01 the receiver must ignore,
    /// and padding).
    fn seal_padded(&mut self, ctype: u8, data: &[u8], out: &mut Vec<u8>, legacy: [u8; 2], pad: usize) -> Result<(), RecordError> {
        if self.state.tx.seq == u64::MAX {
            return Err(RecordError::SeqExhausted);
        }
        let nonce = self.state.tx.nonce();
        match self.state.version {
            Version::Tls13 => {
                let len = data.len() + 1 + pad + TAG_LEN;
                let header = [CT_APPDATA, legacy[0], legacy[1], (len >> 8) as u8, len as u8];
                out.extend_from_slice(&header);
                let start = out.len();
                out.extend_from_slice(data);
                out.push(ctype);
                out.resize(out.len() + pad, 0);
                let tag = self
                    .keys()?
                    .tx
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header), &mut out[start..])
                    .map_err(|_| RecordError::Internal("seal failed"))?;
                out.extend_from_slice(tag.as_ref());
            }
            Version::Tls12 => {
                let explicit = match self.state.suite {
                    Suite::Chacha20Poly1305 => 0,
                    _ => GCM12_EXPLICIT,
                };
                let len = explicit + data.len() + TAG_LEN;
                out.extend_from_slice(&[ctype, 3, 3, (len >> 8) as u8, len as u8]);
                out.extend_from_slice(&nonce[12 - explicit..]);
                let start = out.len();
                out.extend_from_slice(data);
                let aad = aad12(self.state.tx.seq, ctype, data.len());
                let tag = self
                    .keys()?
                    .tx
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
                    .map_err(|_| RecordError::Internal("seal failed"))?;
                out.extend_from_slice(tag.as_ref());
            }
        }
        self.state.tx.seq += 1;
        self.tx_records_this_key = self.tx_records_this_key.saturating_add(1);
        Ok(())
    }
}

fn aad12(seq: u64, ctype: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = ctype;
    aad[9] = 3;
    aad[10] = 3;
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// Compile-time check that the algorithm table matches ring.
const _: () = assert!(aead::MAX_TAG_LEN == TAG_LEN);

impl crate::blame::Blamed for RecordError {
    fn blame(&self) -> crate::blame::Blame {
        match self {
            RecordError::SeqExhausted | RecordError::Internal(_) => crate::blame::Blame::Internal,
            _ => crate::blame::Blame::Device,
        }
    }

    /// A device that sent a bad record may well connect again and do better
    /// (a flaky network, a firmware bug that is not hit every time).
    fn retry_helps(&self) -> bool {
        true
    }

    fn label(&self) -> &'static str {
        match self {
            RecordError::BadRecordMac => Self::LABELS[0],
            RecordError::RecordOverflow => Self::LABELS[1],
            RecordError::UnexpectedMessage(_) => Self::LABELS[2],
            RecordError::Decode => Self::LABELS[3],
            RecordError::IllegalParameter => Self::LABELS[4],
            RecordError::PeerAlert(_) => Self::LABELS[5],
            RecordError::AfterClose => Self::LABELS[6],
            RecordError::SeqExhausted => Self::LABELS[7],
            RecordError::Internal(_) => Self::LABELS[8],
        }
    }
}

impl RecordLayer {
    /// Opens every whole record at the front of `buf`, handing each one's
    /// application data to `sink` (KeyUpdate answers go to `out`), and
    /// drains what was used, also on an error. Returns true on
    /// close_notify (nothing after it is opened).
    pub fn open_all(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>, sink: &mut dyn FnMut(&[u8])) -> Result<bool, RecordError> {
        let mut off = 0;
        let res = loop {
            match self.open(&mut buf[off..], out) {
                Ok(Opened::NeedMore) => break Ok(false),
                Ok(Opened::Data { consumed, start, end }) => {
                    sink(&buf[off + start..off + end]);
                    off += consumed;
                }
                Ok(Opened::Control { consumed }) => off += consumed,
                Ok(Opened::CloseNotify { consumed }) => {
                    off += consumed;
                    break Ok(true);
                }
                Err(e) => break Err(e),
            }
        };
        buf.drain(..off);
        res
    }
}

/// Record layers with fixed keys, for tests, the in-memory harness and the
/// fuzz targets: inputs sealed by one end get past the other's MAC check.
pub mod testing {
    use super::*;

    fn direction(version: Version, suite: Suite, seed: u8) -> DirectionState {
        match version {
            Version::Tls13 => DirectionState::from_secret(suite, Secret::new(&vec![seed; suite.hash_len()]).unwrap(), 0),
            Version::Tls12 => DirectionState {
                secret: Secret::default(),
                key: Key::new(&vec![seed; suite.key_len()]).unwrap(),
                iv: [seed ^ 0x5a; 12],
                seq: 0,
            },
        }
    }

    /// The two ends of one connection: the first's tx is the second's rx.
    pub fn pair(version: Version, suite: Suite) -> (RecordLayer, RecordLayer) {
        let mk = |rx, tx| RecordState {
            version,
            suite,
            rx: direction(version, suite, rx),
            tx: direction(version, suite, tx),
            received_close_notify: false,
            sent_close_notify: false,
            key_update_after: 0,
            handshake_buf: Vec::new(),
        };
        match (RecordLayer::new(mk(1, 2)), RecordLayer::new(mk(2, 1))) {
            (Ok(a), Ok(b)) => (a, b),
            _ => unreachable!("fixed keys of the right lengths"),
        }
    }
}

#[cfg(test)]
mod tests;
