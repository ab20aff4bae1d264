//! The first bytes of a connection, before rustls sees them: are they a
//! TLS ClientHello holdfast can answer at all?
//!
//! Owns: telling apart, from as few bytes as possible, a TLS handshake
//! record that opens with a ClientHello offering TLS 1.2 or 1.3 (handed on
//! to rustls), one that offers only older versions (refused with
//! protocol_version, RFC 8996), an SSL 2.0-format hello, a plain HTTP
//! request sent to the TLS port, and anything else that is not TLS, so
//! that these are refused at once instead of waiting out the handshake
//! timeout; and what each is told. Never parses more of the hello than the
//! version fields, and never decides anything rustls decides: a hello it
//! cannot read to the end (split over records) goes on to rustls.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use super::record::alert;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// Not enough bytes to tell yet.
    NeedMore,
    /// A TLS handshake record: for rustls.
    Tls,
    /// A ClientHello offering only versions before TLS 1.2, or with a
    /// legacy_version of SSL 3.0 or below.
    OldVersion,
    /// An SSL 2.0-format ClientHello (RFC 6176: never answered as SSL 2.0).
    Sslv2,
    /// A plain HTTP request on the TLS port.
    Http,
    /// Not TLS: a first record that is not a handshake, a version that is
    /// not 3.x, a first handshake message that is not a ClientHello.
    NotTls,
    /// A first record longer than a plaintext record may be (2^14 bytes).
    Oversized,
}

/// The longest body of a plaintext record, as the first (the ClientHello)
/// is: 2^14 bytes (RFC 8446 5.1, RFC 5246 6.2.1); longer is record_overflow.
const MAX_RECORD_BODY: usize = 1 << 14;

const CT_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const TLS12: u16 = 0x0303;

const METHODS: [&[u8]; 9] = [b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC", b"TRAC"];

/// Looks at the first bytes of a connection (as many as have come).
pub fn screen(buf: &[u8]) -> First {
    let Some(&b0) = buf.first() else { return First::NeedMore };
    if b0.is_ascii_uppercase() {
        let n = buf.len().min(4);
        if METHODS.iter().any(|m| m[..n] == buf[..n]) {
            return if n == 4 { First::Http } else { First::NeedMore };
        }
        return First::NotTls;
    }
    if b0 & 0x80 != 0 {
        // SSL 2.0 record header (two bytes, high bit set), message type 1.
        return match buf.get(2) {
            None => First::NeedMore,
            Some(&HS_CLIENT_HELLO) => First::Sslv2,
            Some(_) => First::NotTls,
        };
    }
    if b0 != CT_HANDSHAKE {
        return First::NotTls;
    }
    match buf.get(1) {
        None => return First::NeedMore,
        Some(3) => {}
        Some(_) => return First::NotTls,
    }
    if buf.len() >= 5 && u16::from_be_bytes([buf[3], buf[4]]) as usize > MAX_RECORD_BODY {
        return First::Oversized;
    }
    if buf.len() < 6 {
        return First::NeedMore;
    }
    if buf[5] != HS_CLIENT_HELLO {
        return First::NotTls;
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    let body = &buf[5..buf.len().min(5 + record_len)];
    match offers_tls12_or_later(body) {
        Some(true) => First::Tls,
        Some(false) => First::OldVersion,
        // Not all of it here yet (or split over records): wait for the
        // whole record, and leave a split hello to rustls.
        None if buf.len() < 5 + record_len => First::NeedMore,
        None => First::Tls,
    }
}

/// SSL 3.0's version number.
const SSL30: u16 = 0x0300;

/// Whether a ClientHello handshake message (from its type byte) offers TLS
/// 1.2 or later: its legacy version, or its supported_versions extension;
/// never if its legacy version is SSL 3.0 or below.
/// `None` if the message does not fit in `msg`.
fn offers_tls12_or_later(msg: &[u8]) -> Option<bool> {
    let mut r = Reader(msg);
    r.skip(1)?; // msg_type
    let len = r.u24()? as usize;
    let mut r = Reader(r.0.get(..len)?);
    let legacy = r.u16()?;
    if legacy <= SSL30 {
        // RFC 8446 D.5: a ClientHello.legacy_version of 0x0300 or below is
        // refused with protocol_version, whatever supported_versions says.
        return Some(false);
    }
    r.skip(32)?; // random
    let sid = r.u8()? as usize;
    r.skip(sid)?;
    let suites = r.u16()? as usize;
    r.skip(suites)?;
    let comp = r.u8()? as usize;
    r.skip(comp)?;
    if r.0.is_empty() {
        return Some(legacy >= TLS12); // no extensions
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.0.get(..ext_len)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let n = exts.u16()? as usize;
        let data = exts.take(n)?;
        if typ == EXT_SUPPORTED_VERSIONS {
            let mut v = Reader(data);
            let list = v.u8()? as usize;
            let mut versions = Reader(v.take(list)?);
            let mut any = false;
            while !versions.0.is_empty() {
                any |= versions.u16()? >= TLS12;
            }
            // With supported_versions, the legacy field does not count (RFC 8446 4.2.1).
            return Some(any);
        }
    }
    Some(legacy >= TLS12)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<u32> {
        self.take(3).map(|b| u32::from_be_bytes([0, b[0], b[1], b[2]]))
    }
}

impl First {
    /// What the peer is sent before the connection closes, and why it was
    /// refused (for the log); `None` for `NeedMore` and `Tls`.
    pub fn refusal(self) -> Option<(Vec<u8>, &'static str)> {
        let alert = |d: u8| alert::plaintext(d).to_vec();
        Some(match self {
            First::NeedMore | First::Tls => return None,
            First::OldVersion => (
                alert(alert::PROTOCOL_VERSION),
                "ClientHello offers only TLS 1.1 or older (RFC 8996), or its legacy_version is SSL 3.0 or below (RFC 8446 D.5)",
            ),
            First::Sslv2 => (alert(alert::PROTOCOL_VERSION), "SSL 2.0 ClientHello"),
            First::Http => {
                let body = "This port speaks TLS with client certificates, not plain HTTP\n";
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                ((head + body).into_bytes(), "plain HTTP sent to the TLS port")
            }
            First::NotTls => (alert(alert::UNEXPECTED_MESSAGE), "not a TLS ClientHello"),
            First::Oversized => (alert(alert::RECORD_OVERFLOW), "oversized handshake record"),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello record: legacy version, optional supported_versions.
    pub(crate) fn hello(legacy: u16, versions: Option<&[u16]>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&legacy.to_be_bytes());
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0, 10, 0, 4, 0, 2, 0, 29]); // supported_groups
        if let Some(vs) = versions {
            exts.extend_from_slice(&EXT_SUPPORTED_VERSIONS.to_be_bytes());
            exts.extend_from_slice(&((1 + 2 * vs.len()) as u16).to_be_bytes());
            exts.push((2 * vs.len()) as u8);
            for v in vs {
                exts.extend_from_slice(&v.to_be_bytes());
            }
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut msg = vec![HS_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        let mut rec = vec![CT_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend(msg);
        rec
    }

    #[test]
    fn hellos_offering_tls12_or_13_go_to_rustls_older_ones_get_protocol_version() {
        assert_eq!(screen(&hello(0x0303, None)), First::Tls);
        assert_eq!(screen(&hello(0x0303, Some(&[0x0304, 0x0303]))), First::Tls);
        assert_eq!(screen(&hello(0x0303, Some(&[0x0304]))), First::Tls);
        assert_eq!(screen(&hello(0x0301, None)), First::OldVersion, "TLS 1.0");
        assert_eq!(screen(&hello(0x0302, None)), First::OldVersion, "TLS 1.1");
        assert_eq!(screen(&hello(0x0303, Some(&[0x0302, 0x0301]))), First::OldVersion, "supported_versions decides");
        for legacy in [0x0300, 0x0000, 0x0200, 0x0002, 0x0100, 0x0103] {
            assert_eq!(screen(&hello(legacy, Some(&[0x0304]))), First::OldVersion, "legacy_version {legacy:#06x} (RFC 8446 D.5)");
        }
        assert_eq!(First::OldVersion.refusal().unwrap().0, vec![21, 3, 3, 0, 2, 2, 70]);
    }

    #[test]
    fn a_hello_is_judged_only_once_its_record_is_here() {
        let h = hello(0x0301, None);
        for n in 0..h.len() {
            assert_eq!(screen(&h[..n]), First::NeedMore, "{n} bytes");
        }
        assert_eq!(screen(&h), First::OldVersion);
    }

    #[test]
    fn what_is_not_tls_is_told_at_once() {
        assert_eq!(screen(b"GET / HTTP/1.1\r\n"), First::Http);
        assert_eq!(screen(b"GE"), First::NeedMore);
        assert_eq!(screen(b"GEX"), First::NotTls);
        assert!(String::from_utf8(First::Http.refusal().unwrap().0).unwrap().starts_with("HTTP/1.1 400 "));
        assert_eq!(screen(&[0x80, 0x2e, 0x01, 0x03, 0x01]), First::Sslv2);
        assert_eq!(screen(&[0x17, 3, 3, 0, 5]), First::NotTls, "application data first");
        assert_eq!(screen(&[0x16, 2, 0]), First::NotTls, "version 2.x");
        assert_eq!(screen(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), First::NotTls, "a ServerHello");
        assert_eq!(screen(&[0x00, 0x11]), First::NotTls);
        assert_eq!(screen(b"\x16"), First::NeedMore);
        assert_eq!(screen(&[0x16, 3, 1, 0xff, 0xff]), First::Oversized, "refused before it arrives");
        assert_eq!(screen(&[0x16, 3, 1, 0x40, 0x01]), First::Oversized, "2^14 + 1: one byte too long for a plaintext record");
        assert_eq!(screen(&[0x16, 3, 1, 0x40, 0x00, 1]), First::NeedMore, "2^14 is allowed");
    }

    #[test]
    fn a_hello_split_over_records_is_left_to_rustls() {
        let mut h = hello(0x0303, Some(&[0x0304]));
        // Claim a longer message than the record holds: rustls reassembles.
        let msg_len = u32::from_be_bytes([0, h[6], h[7], h[8]]) + 100;
        h[6..9].copy_from_slice(&msg_len.to_be_bytes()[1..]);
        assert_eq!(screen(&h), First::Tls);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_screened_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = screen(&bytes);
        }
    }
}
