//! The handshake driver and record layer against a real rustls client, in
//! memory: no sockets, bytes moved by hand.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;
use crate::config::TlsConfig;
use crate::tls::record::{Opened, RecordLayer};
use crate::tls::server::TlsContext;

pub(crate) fn setup(dir: &std::path::Path) -> TlsContext {
    crate::pki::generate(dir).unwrap();
    let c = TlsConfig {
        cert_chain: dir.join("server-chain.pem"),
        key: dir.join("server.key"),
        blocklist: Some(dir.join("blocklist.txt")),
        labels: None,
        client_cas: vec![(dir.join("fleet-2019.pem"), true), (dir.join("fleet-2024.pem"), false)],
        handshake_timeout: std::time::Duration::from_secs(1),
        key_update_after: 0,
        tls12: true,
        tls13: true,
        cipher_suites: vec![],
    };
    TlsContext::load(&c).unwrap()
}

pub(crate) fn client(dir: &std::path::Path, device: &str, suite: &str) -> ClientConnection {
    ClientConnection::new(client_config(dir, device, suite), "localhost".try_into().unwrap()).unwrap()
}

/// A device's client config; connections made from one config resume its
/// sessions (rustls keeps them in the config's in-memory store).
pub(crate) fn client_config(dir: &std::path::Path, device: &str, suite: &str) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|s| format!("{:?}", s.suite()) == suite);
    let version: &'static rustls::SupportedProtocolVersion =
        if suite.starts_with("TLS13") { &rustls::version::TLS13 } else { &rustls::version::TLS12 };
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("server-ca.pem")).unwrap()).unwrap();
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("devices/{device}.pem"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("devices/{device}.key"))).unwrap();
    let cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

/// Runs the handshake; returns the established state or the refusal.
fn handshake(ctx: &TlsContext, c: &mut ClientConnection) -> Result<Established, HandshakeError> {
    let mut hs = Handshake::new(ctx.server.clone(), ctx.key_update_after, Some((ctx.verifier.clone(), crate::timefmt::unix_now())))?;
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        let mut to_client = Vec::new();
        let p = hs.feed(&to_server, &mut to_client);
        if !to_client.is_empty() {
            c.read_tls(&mut &to_client[..]).unwrap();
            let _ = c.process_new_packets();
        }
        if p? == Progress::Finished {
            return hs.finish();
        }
    }
    panic!("handshake did not finish");
}

/// Opens every record in `wire` with the server layer; returns plaintext and replies.
fn server_open(rl: &mut RecordLayer, mut wire: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let (mut data, mut reply) = (Vec::new(), Vec::new());
    loop {
        match rl.open(&mut wire, &mut reply).unwrap() {
            Opened::NeedMore => break,
            Opened::Data { consumed, start, end } => {
                data.extend_from_slice(&wire[start..end]);
                wire.drain(..consumed);
            }
            Opened::Control { consumed } | Opened::CloseNotify { consumed } => {
                wire.drain(..consumed);
            }
        }
    }
    (data, reply)
}

fn client_read(c: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
    let mut rd = wire;
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
    let mut out = Vec::new();
    let _ = c.reader().read_to_end(&mut out);
    out
}

const SUITES: [&str; 6] = [
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
];

#[test]
fn record_layer_takes_over_from_rustls_for_every_suite() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    for suite in SUITES {
        let mut c = client(dir.path(), "oven-1", suite);
        let est = handshake(&ctx, &mut c).unwrap_or_else(|e| panic!("{suite}: {e}"));
        assert_eq!(est.chain.len(), 1);
        let mut rl = RecordLayer::new(est.record).unwrap();
        let mut leftover = est.leftover;
        // Client -> holdfast, including bytes that arrived with the last handshake record.
        c.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        while c.wants_write() {
            c.write_tls(&mut leftover).unwrap();
        }
        let (data, reply) = server_open(&mut rl, leftover);
        assert_eq!(data, b"GET / HTTP/1.1\r\n\r\n", "{suite}");
        assert!(reply.is_empty());
        // holdfast -> client.
        let mut out = Vec::new();
        rl.seal(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut out).unwrap();
        assert_eq!(client_read(&mut c, &out), b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "{suite}");
        if suite.starts_with("TLS13") {
            // KeyUpdate from the client: holdfast answers and both keep talking.
            c.refresh_traffic_keys().unwrap();
            c.writer().write_all(b"after client update").unwrap();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let (data, reply) = server_open(&mut rl, wire);
            assert_eq!(data, b"after client update");
            let mut out = reply;
            // And from holdfast.
            rl.send_key_update(true, &mut out).unwrap();
            rl.seal(b"after holdfast update", &mut out).unwrap();
            assert_eq!(client_read(&mut c, &out), b"after holdfast update");
            let mut wire = Vec::new();
            c.writer().write_all(b"still in step").unwrap();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            assert_eq!(server_open(&mut rl, wire).0, b"still in step");
            assert_eq!(rl.key_updates(), (2, 2));
        }
        // close_notify reaches the client.
        let mut out = Vec::new();
        rl.close_notify(&mut out).unwrap();
        let mut rd = &out[..];
        c.read_tls(&mut rd).unwrap();
        assert!(c.process_new_packets().unwrap().peer_has_closed());
    }
}

#[test]
fn refusals_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    for (device, reason) in [("rogue-1", Refusal::UnknownCa), ("hood-expired", Refusal::Expired), ("fridge-blocked", Refusal::Blocked)] {
        let mut c = client(dir.path(), device, "TLS13_AES_128_GCM_SHA256");
        match handshake(&ctx, &mut c) {
            Err(e) => assert_eq!(e.reason, reason, "{device}: {e}"),
            Ok(_) => panic!("{device} accepted"),
        }
    }
    let mut c = client(dir.path(), "thermostat-2019", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256");
    assert!(handshake(&ctx, &mut c).is_ok(), "expired under an ignore_validity CA");
}

#[test]
fn garbage_is_a_bad_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
    let mut out = Vec::new();
    let e = hs.feed(&[0x16, 3, 1, 0, 4, 1, 0, 0, 0], &mut out).err().unwrap();
    assert_eq!(e.reason, Refusal::BadHandshake);
    let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
    let e = hs.feed(&[0x16, 3, 1, 0xff, 0xff], &mut out).err().unwrap();
    assert_eq!(e.reason, Refusal::BadHandshake, "oversized record refused before it arrives");
}

#[test]
fn a_resumed_session_is_judged_as_a_full_handshake_would_be_now() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let leaf = CertificateDer::from_pem_file(dir.path().join("devices/oven-1.pem")).unwrap();
    let fp: String = crate::identity::sha256(leaf.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
    for suite in ["TLS13_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"] {
        ctx.verifier.set_blocklist(Default::default());
        let cfg = client_config(dir.path(), "oven-1", suite);
        let connect = || ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut first = connect();
        handshake(&ctx, &mut first).unwrap_or_else(|e| panic!("{suite}: {e}"));
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        // Not blocked: the session resumes.
        let mut again = connect();
        handshake(&ctx, &mut again).unwrap_or_else(|e| panic!("{suite}: {e}"));
        assert_eq!(again.handshake_kind(), Some(rustls::HandshakeKind::Resumed), "{suite}");
        // Blocked since: the resumption is refused with certificate_revoked,
        // before any flight (and so before any new ticket) is sent.
        ctx.verifier.set_blocklist(crate::tls::blocklist::Blocklist::parse(&fp).unwrap());
        let mut blocked = connect();
        let mut hs = Handshake::new(ctx.server.clone(), 0, Some((ctx.verifier.clone(), crate::timefmt::unix_now()))).unwrap();
        let mut hello = Vec::new();
        while blocked.wants_write() {
            blocked.write_tls(&mut hello).unwrap();
        }
        let mut out = Vec::new();
        let e = hs.feed(&hello, &mut out).err().unwrap_or_else(|| panic!("{suite}: a blocked device resumed"));
        assert_eq!(e.reason, Refusal::Blocked, "{suite}: {e}");
        assert_eq!(out, [0x15, 3, 3, 0, 2, 2, 44], "{suite}: only the alert goes out");
        assert!(e.presented.is_some());
        blocked.read_tls(&mut &out[..]).unwrap();
        let err = blocked.process_new_packets().unwrap_err();
        assert!(err.to_string().contains("CertificateRevoked"), "{suite}: {err}");
        // And a full handshake is refused the same way.
        let mut full = client(dir.path(), "oven-1", suite);
        assert_eq!(handshake(&ctx, &mut full).err().map(|e| e.reason), Some(Refusal::Blocked), "{suite}");
    }
}

#[test]
fn a_resumed_session_needs_its_issuer_still_configured_and_validity_unless_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let chain = |d: &str| vec![CertificateDer::from_pem_file(dir.path().join(format!("devices/{d}.pem"))).unwrap().to_vec()];
    let now = crate::timefmt::unix_now();
    assert_eq!(ctx.verifier.admits_resumed(&chain("oven-1"), now), Ok(()));
    assert_eq!(ctx.verifier.admits_resumed(&chain("rogue-1"), now), Err(Refusal::UnknownCa));
    // Expired, under the 2019 CA that ignores validity: still in.
    assert_eq!(ctx.verifier.admits_resumed(&chain("thermostat-2019"), now), Ok(()));
    // oven-1 (2024 CA, validity checked) long after its end.
    assert_eq!(ctx.verifier.admits_resumed(&chain("oven-1"), now + 100 * 365 * 86_400), Err(Refusal::Expired));
    assert_eq!(ctx.verifier.admits_resumed(&[], now), Err(Refusal::NoCertificate));
}

/// The first alert record in `out`, if `out` is a plaintext alert record.
fn plain_alert_in(out: &[u8]) -> Option<u8> {
    (out.len() >= 7 && out[0] == 21 && out[3..5] == [0, 2]).then(|| out[6])
}

/// A client config with no client certificate, for one version.
fn anonymous_client(dir: &std::path::Path, v13: bool) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(dir.join("server-ca.pem")).unwrap()).unwrap();
    let version: &'static rustls::SupportedProtocolVersion = if v13 { &rustls::version::TLS13 } else { &rustls::version::TLS12 };
    let cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap()
}

#[test]
fn no_client_certificate_is_handshake_failure_in_tls12_and_certificate_required_in_tls13() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    // TLS 1.2 (RFC 5246 7.4.6): handshake_failure, in the clear.
    let mut c = anonymous_client(dir.path(), false);
    let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
    let mut last = Vec::new();
    let mut refused = None;
    for _ in 0..10 {
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        let mut to_client = Vec::new();
        match hs.feed(&to_server, &mut to_client) {
            Err(e) => {
                refused = Some(e);
                last = to_client;
                break;
            }
            Ok(_) => {
                c.read_tls(&mut &to_client[..]).unwrap();
                c.process_new_packets().unwrap();
            }
        }
    }
    assert_eq!(refused.map(|e| e.reason), Some(Refusal::NoCertificate));
    assert_eq!(plain_alert_in(&last), Some(40), "{last:?}");
    c.read_tls(&mut &last[..]).unwrap();
    assert!(matches!(c.process_new_packets(), Err(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure))));
    // TLS 1.3: certificate_required (RFC 8446 4.4.2.4), under the handshake keys.
    let mut c = anonymous_client(dir.path(), true);
    let e = handshake(&ctx, &mut c).err().expect("refused");
    assert_eq!(e.reason, Refusal::NoCertificate);
}

#[test]
fn what_is_not_a_tls12_or_13_hello_is_refused_at_once_with_the_right_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let feed = |bytes: &[u8]| {
        let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
        let mut out = Vec::new();
        let r = hs.feed(bytes, &mut out);
        (r.map(|_| ()), out)
    };
    for (what, bytes, alert) in [
        ("TLS 1.0 only (RFC 8996)", crate::tls::hello::tests::hello(0x0301, None), 70),
        ("TLS 1.1 only (RFC 8996)", crate::tls::hello::tests::hello(0x0302, None), 70),
        ("SSL 2.0 hello", vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15], 70),
        ("random bytes", vec![0x5a, 0x11, 0xe3, 0x07, 0x99, 0x01], 10),
        ("application data first", vec![23, 3, 3, 0, 10], 10),
    ] {
        let (r, out) = feed(&bytes);
        let e = r.err().unwrap_or_else(|| panic!("{what}: not refused at once"));
        assert_eq!(e.reason, Refusal::BadHandshake, "{what}");
        assert_eq!(plain_alert_in(&out), Some(alert), "{what}: {out:?}");
    }
    let (r, out) = feed(b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n");
    assert!(r.is_err());
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400 "), "plain HTTP is told so in HTTP");
    // Four bytes are enough to know.
    let (r, _) = feed(b"POST");
    assert!(r.is_err());
}

/// `hello` (one record holding one ClientHello) with a padding extension
/// (RFC 7685) of `pad` bytes appended to its extensions.
fn padded_hello(hello: &[u8], pad: usize) -> Vec<u8> {
    let body = &hello[9..];
    let sid = 34;
    let suites = sid + 1 + body[sid] as usize;
    let comp = suites + 2 + u16::from_be_bytes([body[suites], body[suites + 1]]) as usize;
    let ext = comp + 1 + body[comp] as usize;
    let ext_len = u16::from_be_bytes([body[ext], body[ext + 1]]) as usize + 4 + pad;
    let mut b = body[..ext].to_vec();
    b.extend_from_slice(&(ext_len as u16).to_be_bytes());
    b.extend_from_slice(&body[ext + 2..]);
    b.extend_from_slice(&[0, 21]);
    b.extend_from_slice(&(pad as u16).to_be_bytes());
    b.resize(b.len() + pad, 0);
    let mut rec = vec![22, hello[1], hello[2]];
    rec.extend_from_slice(&((b.len() + 4) as u16).to_be_bytes());
    rec.push(1);
    rec.extend_from_slice(&(b.len() as u32).to_be_bytes()[1..]);
    rec.extend_from_slice(&b);
    rec
}

/// A record longer than rustls takes in one `read_tls` (4 KiB) is given
/// to it whole: a large ClientHello (many extensions, a big padding) is
/// answered instead of left hanging until the handshake timeout.
#[test]
fn a_handshake_record_larger_than_4_kib_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    for (suite, pad) in [("TLS13_AES_128_GCM_SHA256", 6000), ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 16000)] {
        let mut c = client(dir.path(), "oven-1", suite);
        let mut hello = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        let big = padded_hello(&hello, pad);
        assert!(big.len() > 4096 + 5);
        let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
        let mut out = Vec::new();
        assert_eq!(hs.feed(&big, &mut out).unwrap(), Progress::Continue, "{suite}");
        assert_eq!(out.first(), Some(&22), "{suite}: a ServerHello flight, not silence: {out:?}");
    }
}

/// A ClientHello split over two records with a zero-length application
/// data record between them is unexpected_message (RFC 8446 5.1: handshake
/// messages are not interleaved with other record types), told in the clear.
#[test]
fn application_data_between_the_records_of_a_client_hello_is_unexpected_message() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let mut c = client(dir.path(), "oven-1", "TLS13_AES_128_GCM_SHA256");
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).unwrap();
    }
    let body = &hello[5..];
    let (a, b) = body.split_at(body.len() / 2);
    let rec = |t: u8, p: &[u8]| {
        let mut r = vec![t, 3, 1];
        r.extend_from_slice(&(p.len() as u16).to_be_bytes());
        r.extend_from_slice(p);
        r
    };
    let mut wire = rec(22, a);
    wire.extend(rec(23, &[]));
    wire.extend(rec(22, b));
    let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
    let mut out = Vec::new();
    assert!(hs.feed(&wire, &mut out).is_err());
    assert_eq!(plain_alert_in(&out), Some(10), "{out:?}");
}

/// A verifier that trusts any server and offers only the signature schemes
/// it is given: a ClientHello whose signature_algorithms holdfast's key
/// cannot sign with.
#[derive(Debug)]
struct OnlySchemes(Vec<rustls::SignatureScheme>);

impl rustls::client::danger::ServerCertVerifier for OnlySchemes {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

/// RFC 8446 4.1.1: a server that cannot negotiate acceptable parameters
/// aborts with handshake_failure. A TLS 1.3 ClientHello offering only
/// signature schemes holdfast's key cannot make (tlsfuzzer's "only legacy
/// sigalgs") got a ServerHello and its whole flight, and only then an
/// encrypted alert, when rustls found no scheme for the CertificateVerify.
/// Now nothing of the flight goes: handshake_failure, in the clear.
#[test]
fn a_hello_whose_signature_schemes_the_key_cannot_make_gets_handshake_failure_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = setup(dir.path());
    let only = OnlySchemes(vec![rustls::SignatureScheme::RSA_PKCS1_SHA512, rustls::SignatureScheme::RSA_PKCS1_SHA1]);
    let cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(only))
        .with_no_client_auth();
    let mut c = ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).unwrap();
    }
    let mut hs = Handshake::new(ctx.server.clone(), 0, None).unwrap();
    let mut out = Vec::new();
    let e = hs.feed(&hello, &mut out).expect_err("refused");
    assert!(e.detail.contains("NoSignatureSchemesInCommon"), "{e}");
    assert_eq!(plain_alert_in(&out), Some(40), "handshake_failure and nothing else: {out:?}");
    assert_eq!(out.len(), 7, "no ServerHello before it");
}
