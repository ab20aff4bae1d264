//! The core data path end to end: real binaries, real certificates, loopback.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use holdfast::device::{Device, DeviceError, tls_stream};
use holdfast::ws::frame::op;

const SUITES: [(&str, &str); 6] = [
    ("1.3", "TLS13_AES_128_GCM_SHA256"),
    ("1.3", "TLS13_AES_256_GCM_SHA384"),
    ("1.3", "TLS13_CHACHA20_POLY1305_SHA256"),
    ("1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    ("1.2", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    ("1.2", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
];

#[test]
fn echo_over_every_suite_and_version() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    for (version, suite) in SUITES {
        let mut o = opts(&pki, &proxy, "oven-1");
        o.version = Some(version.into());
        o.suite = Some(suite.into());
        let mut d = Device::connect(&o).unwrap_or_else(|e| panic!("{suite}: {e}"));
        let (v, s) = d.tls_info();
        assert_eq!(s, suite);
        assert!(v.contains(if version == "1.3" { "TLSv1_3" } else { "TLSv1_2" }), "{v}");
        d.send_text(&format!("hello over {suite}")).unwrap();
        assert_eq!(d.recv_text().unwrap(), format!("hello over {suite}"));
        // Larger than one TLS record and one WebSocket length class.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        d.send_binary(&big).unwrap();
        assert_eq!(d.recv_message().unwrap(), (false, big));
        d.close(1000).unwrap();
        assert_eq!(d.recv_close().unwrap(), Some(1000));
    }
}

#[test]
fn whoami_reports_identity_and_distinct_connection_ids() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        d.send_text("whoami").unwrap();
        let v: serde_json::Value = serde_json::from_str(&d.recv_text().unwrap()).unwrap();
        assert_eq!(v["resumed"], false);
        assert_eq!(v["device"]["subject"], "O=Acme Devices, CN=oven-1");
        assert_eq!(v["device"]["issuer"], "O=holdfast dev PKI, CN=Fleet 2024 CA");
        assert_eq!(v["device"]["serial"], "1000");
        assert_eq!(v["device"]["sans"], serde_json::json!(["DNS:oven-1.devices.local"]));
        let pem = std::fs::read(pki.path().join("devices/oven-1.pem")).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).map(|c: rustls::pki_types::CertificateDer| c.to_vec()).unwrap();
        assert_eq!(v["device"]["sha256"], holdfast::identity::hex(&holdfast::identity::sha256(&der)));
        assert!(v["device"]["address"].as_str().unwrap().starts_with("127.0.0.1:"));
        let id = v["connection_id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 32);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "connection IDs must differ");
}

fn refused(pki: &Pki, proxy: &Proc, device: &str) -> String {
    match Device::connect(&opts(pki, proxy, device)) {
        Ok(_) => panic!("{device} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn certificate_policy_unknown_ca_expired_ignore_validity_blocklist() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    assert!(refused(&pki, &proxy, "rogue-1").contains("UnknownCA"));
    assert!(refused(&pki, &proxy, "hood-expired").contains("CertificateExpired"));
    assert!(refused(&pki, &proxy, "fridge-blocked").contains("CertificateRevoked"));
    // Expired, but its CA is configured with ignore_validity.
    let mut d = Device::connect(&opts(&pki, &proxy, "thermostat-2019")).unwrap();
    d.send_text("still here").unwrap();
    assert_eq!(d.recv_text().unwrap(), "still here");
    for reason in ["unknown_ca", "expired", "blocked"] {
        assert_eq!(metric(&proxy, "holdfast_handshake_refused_total", &format!("reason=\"{reason}\"")), 1, "{reason}");
    }
    let log = std::fs::read_to_string(&proxy.stderr_log).unwrap();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("handshake refused")).collect();
    assert_eq!(refusals.len(), 3, "each refusal logged once: {refusals:?}");
    for reason in ["unknown_ca", "expired", "blocked"] {
        assert!(refusals.iter().any(|l| l.contains(&format!("reason=\"{reason}\""))), "{reason} in {refusals:?}");
    }
    assert!(refusals.iter().all(|l| l.contains("device=127.0.0.1:")), "logged with the device address");
}

#[test]
fn malformed_upgrade_gets_400_and_wrong_method_405() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    for (req, status) in [
        ("GARBAGE / NOPE\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("POST / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ] {
        let mut s = tls_stream(&opts(&pki, &proxy, "oven-1")).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let resp = holdfast::device::read_response(&mut s).unwrap();
        assert_eq!(resp.status, status, "{req:?}");
    }
    assert_eq!(metric(&proxy, "holdfast_ws_upgrades_rejected_total", ""), 3);
}

#[test]
fn oversize_message_gets_1009_and_invalid_utf8_gets_1007() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "max_message_bytes = 1024");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_binary(&[1u8; 1024]).unwrap();
    assert_eq!(d.recv_message().unwrap().1.len(), 1024, "exactly the limit passes");
    d.send_binary(&[1u8; 5000]).unwrap();
    assert_eq!(d.recv_close().unwrap(), Some(1009));

    // Fragmented: each frame is small, the message is not.
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut raw = Vec::new();
    holdfast::ws::frame::encode(&mut raw, op::BINARY, &[0; 700], Some([1, 2, 3, 4]));
    raw[0] &= 0x7f; // not final
    holdfast::ws::frame::encode(&mut raw, op::CONT, &[0; 700], Some([1, 2, 3, 4]));
    d.send_raw(&raw).unwrap();
    assert_eq!(d.recv_close().unwrap(), Some(1009));

    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_frame(op::TEXT, &[b'o', b'k', 0xff, 0xfe]).unwrap();
    assert_eq!(d.recv_close().unwrap(), Some(1007));

    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_raw(&[0x81, 0x05, b'h', b'e', b'l', b'l', b'o']).unwrap(); // unmasked
    assert_eq!(d.recv_close().unwrap(), Some(1002));
    assert_eq!(metric(&proxy, "holdfast_ws_error_closes_total", "code=\"1009\""), 2);
    assert_eq!(metric(&proxy, "holdfast_ws_error_closes_total", "code=\"1007\""), 1);
    assert_eq!(metric(&proxy, "holdfast_ws_error_closes_total", "code=\"1002\""), 1);
}

#[test]
fn no_reachable_wsm_gets_503() {
    let pki = Pki::new();
    // Reserve a port, then free it: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = start_proxy(&pki, &[dead], 1, "", "");
    match Device::connect(&opts(&pki, &proxy, "oven-1")) {
        Err(DeviceError::Http(503)) => {}
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(metric(&proxy, "holdfast_wsm_unavailable_total", ""), 1);
}

#[test]
fn wsm_refusal_status_reaches_device() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let mut o = opts(&pki, &proxy, "oven-1");
    o.path = "/refuse/403".into();
    assert!(matches!(Device::connect(&o), Err(DeviceError::Http(403))));
    o.path = "/chat".into();
    o.subprotocols = vec!["v2.iot".into(), "v1.iot".into()];
    let d = Device::connect(&o).unwrap();
    assert_eq!(d.subprotocol.as_deref(), Some("v2.iot"));
}

#[test]
fn key_update_initiated_by_device() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    for suite in ["TLS13_AES_128_GCM_SHA256", "TLS13_AES_256_GCM_SHA384", "TLS13_CHACHA20_POLY1305_SHA256"] {
        let mut o = opts(&pki, &proxy, "oven-1");
        o.suite = Some(suite.into());
        let mut d = Device::connect(&o).unwrap();
        for round in 0..3 {
            d.key_update().unwrap();
            let m = format!("after update {round} on {suite}");
            d.send_text(&m).unwrap();
            assert_eq!(d.recv_text().unwrap(), m);
        }
    }
    // Each device KeyUpdate requests one back; counters land at close.
    eventually(5, "key update counters", || metric(&proxy, "holdfast_key_updates_received_total", "") == 9);
    assert_eq!(metric(&proxy, "holdfast_key_updates_sent_total", ""), 9);
}

#[test]
fn key_update_initiated_by_holdfast() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "key_update_after_records = 3", "");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    for i in 0..20 {
        let m = format!("message {i}");
        d.send_text(&m).unwrap();
        assert_eq!(d.recv_text().unwrap(), m);
    }
    d.close(1000).unwrap();
    assert_eq!(d.recv_close().unwrap(), Some(1000));
    eventually(5, "holdfast-initiated key updates", || metric(&proxy, "holdfast_key_updates_sent_total", "") >= 5);
    // holdfast asks the device to update too; rustls answers.
    assert!(metric(&proxy, "holdfast_key_updates_received_total", "") >= 5);
}

#[test]
fn two_shards_both_take_connections() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let mut held = Vec::new();
    let mut shards = std::collections::HashSet::new();
    for _ in 0..24 {
        let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        d.send_text("whoami").unwrap();
        let v: serde_json::Value = serde_json::from_str(&d.recv_text().unwrap()).unwrap();
        shards.insert(v["holdfast"]["shard"].as_u64().unwrap());
        held.push(d);
    }
    assert_eq!(shards.len(), 2, "SO_REUSEPORT spread 24 connections over both shards");
    assert!(metric(&proxy, "holdfast_connections_accepted_total", "shard=\"0\"") > 0);
    assert!(metric(&proxy, "holdfast_connections_accepted_total", "shard=\"1\"") > 0);
    assert_eq!(metric(&proxy, "holdfast_connections_active", ""), 24);
}

#[test]
fn bad_input_from_one_device_does_not_touch_another() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "max_message_bytes = 4096");
    let mut good = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut check = |n: usize| {
        let m = format!("still fine {n}");
        good.send_text(&m).unwrap();
        assert_eq!(good.recv_text().unwrap(), m);
    };
    check(0);
    // Garbage instead of a ClientHello.
    let mut raw = TcpStream::connect(proxy.addr).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).unwrap();
    let mut sink = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read_to_end(&mut sink);
    check(1);
    // A corrupted TLS record after the handshake.
    let mut s = tls_stream(&opts(&pki, &proxy, "oven-1")).unwrap();
    s.sock.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20]).unwrap();
    s.sock.write_all(&[0xaa; 0x20]).unwrap();
    let _ = s.sock.read_to_end(&mut sink);
    check(2);
    // A WebSocket protocol violation, an oversize message, and a vanished peer.
    let mut bad = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    bad.send_raw(&[0x8f, 0x80, 0, 0, 0, 0]).unwrap();
    assert_eq!(bad.recv_close().unwrap(), Some(1002));
    let mut big = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    big.send_binary(&[0; 10_000]).unwrap();
    assert_eq!(big.recv_close().unwrap(), Some(1009));
    let gone = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    drop(gone);
    check(3);
    assert!(metric(&proxy, "holdfast_tls_record_errors_total", "reason=\"bad_record_mac\"") >= 1);
    assert!(metric(&proxy, "holdfast_handshake_refused_total", "reason=\"bad_handshake\"") >= 1);
}

#[test]
fn idle_connections_hold_no_io_buffer() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 2, "", "");
    let mut held = Vec::new();
    for i in 0..20 {
        let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
        d.send_text(&format!("warm {i}")).unwrap();
        d.recv_text().unwrap();
        held.push(d);
    }
    eventually(5, "all buffers back in the pools", || metric(&proxy, "holdfast_buffers_in_use", "") == 0);
    assert_eq!(metric(&proxy, "holdfast_connections_active", ""), 20);
    // Quiet for the cooling time, every tunnel parks: no task of its own.
    eventually(10, "every quiet tunnel parked", || metric(&proxy, "holdfast_tunnels_parked", "") == 20);
    // And they still work.
    for d in held.iter_mut() {
        d.send_text("after idle").unwrap();
        assert_eq!(d.recv_text().unwrap(), "after idle");
    }
}

#[test]
fn handshake_timeout_is_refused_and_counted() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "handshake_timeout_ms = 300", "");
    let mut silent = TcpStream::connect(proxy.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink);
    assert!(start.elapsed() < Duration::from_secs(3), "closed after the timeout");
    eventually(5, "timeout refusal", || metric(&proxy, "holdfast_handshake_refused_total", "reason=\"timeout\"") == 1);
    // A device that does handshake is unaffected.
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_text("ok").unwrap();
    assert_eq!(d.recv_text().unwrap(), "ok");
}

#[test]
fn pings_are_answered_at_the_edge_and_idle_devices_are_pinged_then_closed() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "idle_timeout_secs = 3\nping_interval_secs = 1");
    let mut d = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    d.send_frame(op::PING, b"are you there").unwrap();
    assert_eq!(d.recv().unwrap(), holdfast::ws::frame::Event::Pong(b"are you there".to_vec()));
    // Quiet device: holdfast pings it after ~1 s ...
    let start = std::time::Instant::now();
    assert_eq!(d.recv().unwrap(), holdfast::ws::frame::Event::Ping(vec![]));
    assert!(start.elapsed() >= Duration::from_millis(800));
    // ... and, since the device never answers or sends, closes it after ~3 s.
    assert_eq!(d.recv_close().unwrap(), Some(1001));
    assert!(start.elapsed() >= Duration::from_millis(2500));
    assert_eq!(metric(&proxy, "holdfast_idle_timeouts_total", ""), 1);
    // The WSM saw no ping: only the one echo-able message type reaches it.
    assert_eq!(metric(&proxy, "holdfast_messages_from_devices_total", ""), 0);
}
