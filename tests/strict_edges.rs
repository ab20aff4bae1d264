//! Issue 14's protocol deviations, against the real binaries on loopback:
//! what is not TLS (or too old a TLS) is refused at once with the right
//! answer, a TLS 1.2 device without a certificate gets handshake_failure, a
//! device's close_notify is answered with close_notify, a header that must
//! be single given twice is a 400, and an absolute-form target is accepted.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Sends `bytes`, returns what came back before the close and how long the close took.
fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t = Instant::now();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (got, t.elapsed())
}

/// A ClientHello record offering only `legacy` (no supported_versions).
fn old_hello(legacy: u16) -> Vec<u8> {
    let mut body = legacy.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x42; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 4, 0x00, 0x2f, 0x00, 0x35]);
    body.extend_from_slice(&[1, 0]);
    let mut msg = vec![1];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    rec.extend(msg);
    rec
}

#[test]
fn bytes_that_are_not_a_tls12_or_13_hello_are_refused_at_once() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    // A handshake timeout far above what a refusal may take.
    let p = start_proxy(&pki, &[wsm.addr], 1, "handshake_timeout_ms = 10000", "");
    for (what, bytes, want) in [
        ("TLS 1.0 only", old_hello(0x0301), vec![21, 3, 3, 0, 2, 2, 70]),
        ("TLS 1.1 only", old_hello(0x0302), vec![21, 3, 3, 0, 2, 2, 70]),
        ("SSL 2.0 hello", vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0, 0, 0, 0x10], vec![21, 3, 3, 0, 2, 2, 70]),
        ("random bytes", vec![0x5a, 0x11, 0xe3, 0x07, 0x99, 0x01, 0x02, 0x03], vec![21, 3, 3, 0, 2, 2, 10]),
    ] {
        let (got, took) = exchange(p.addr, &bytes);
        assert_eq!(got, want, "{what}");
        assert!(took < Duration::from_secs(2), "{what}: refused after {took:?}, not at once");
    }
    let (got, took) = exchange(p.addr, b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(took < Duration::from_secs(2));
    assert!(metric(&p, "holdfast_handshake_refused_total", "reason=\"bad_handshake\"") >= 5);
}

#[test]
fn a_tls12_device_without_a_certificate_gets_handshake_failure() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(pki.path().join("server-ca.pem")).unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut tcp = TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut err = None;
    for _ in 0..20 {
        match conn.complete_io(&mut tcp) {
            Err(e) => {
                err = Some(e);
                break;
            }
            Ok(_) if !conn.is_handshaking() => break,
            Ok(_) => {}
        }
    }
    let e = err.expect("refused");
    assert!(e.to_string().contains("HandshakeFailure"), "RFC 5246 7.4.6: handshake_failure, not certificate_required: {e}");
}

/// An upgraded device connection, by hand: the TLS stream and the reply head.
fn upgrade(pki: &Pki, p: &Proc, request: &str) -> (rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String) {
    let cfg = holdfast::device::client_config(&opts(pki, p, "oven-1")).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

const REQ: &str = "GET {target} HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n";

#[test]
fn a_devices_close_notify_is_answered_with_close_notify() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let (mut s, head) = upgrade(&pki, &p, &REQ.replace("{target}", "/").replace("{extra}", ""));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.conn.send_close_notify();
    s.flush().unwrap();
    let mut rest = Vec::new();
    // rustls ends the stream cleanly (Ok) on close_notify, and with an
    // UnexpectedEof error on a bare TCP close.
    let r = s.read_to_end(&mut rest);
    assert!(r.is_ok(), "holdfast answered with a bare TCP close: {r:?}");
    eventually(5, "the stream to be closed", || metric(&p, "holdfast_connections_active", "") == 0);
}

#[test]
fn single_headers_given_twice_are_a_400_and_an_absolute_form_target_is_accepted() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let p = start_proxy(&pki, &[wsm.addr], 1, "", "");
    for extra in ["Host: other\r\n", "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n", "Sec-WebSocket-Version: 13\r\n"] {
        let (_, head) = upgrade(&pki, &p, &REQ.replace("{target}", "/").replace("{extra}", extra));
        assert!(head.starts_with("HTTP/1.1 400 "), "{extra:?} twice: {head}");
    }
    let (mut s, head) = upgrade(&pki, &p, &REQ.replace("{target}", "https://edge:443/dev?x=1").replace("{extra}", ""));
    assert!(head.starts_with("HTTP/1.1 101"), "RFC 9112 3.2.2: absolute form accepted: {head}");
    // And the tunnel works: a masked text frame "hi" echoes.
    s.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]).unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).unwrap();
    assert_eq!(f, [0x81, 2, b'h', b'i']);
}
