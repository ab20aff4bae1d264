use super::*;
use proptest::prelude::*;

const SUITES: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305];

use super::testing::pair;

/// Opens every record in `wire`, returning the application data and any reply bytes.
fn drain(rl: &mut RecordLayer, mut wire: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>, bool), RecordError> {
    let (mut data, mut reply, mut closed) = (Vec::new(), Vec::new(), false);
    loop {
        match rl.open(&mut wire, &mut reply)? {
            Opened::NeedMore => break,
            Opened::Data { consumed, start, end } => {
                data.extend_from_slice(&wire[start..end]);
                wire.drain(..consumed);
            }
            Opened::Control { consumed } => {
                wire.drain(..consumed);
            }
            Opened::CloseNotify { consumed } => {
                closed = true;
                wire.drain(..consumed);
            }
        }
    }
    assert!(wire.is_empty(), "leftover bytes");
    Ok((data, reply, closed))
}

#[test]
fn roundtrip_every_suite_and_version() {
    for version in [Version::Tls12, Version::Tls13] {
        for suite in SUITES {
            let (mut a, mut b) = pair(version, suite);
            let mut wire = Vec::new();
            a.seal(b"hello", &mut wire).unwrap();
            let big = vec![0xabu8; 40_000];
            a.seal(&big, &mut wire).unwrap();
            let (data, reply, closed) = drain(&mut b, wire).unwrap();
            assert_eq!(&data[..5], b"hello");
            assert_eq!(&data[5..], &big[..]);
            assert!(reply.is_empty() && !closed);
            assert_eq!(b.state().rx.seq, 4); // "hello" + 40,000 bytes in 3 records of 16 KiB max
        }
    }
}

#[test]
fn tampered_record_is_rejected() {
    for version in [Version::Tls12, Version::Tls13] {
        for suite in SUITES {
            let (mut a, mut b) = pair(version, suite);
            let mut wire = Vec::new();
            a.seal(b"secret", &mut wire).unwrap();
            let last = wire.len() - 1;
            wire[last] ^= 1;
            assert_eq!(drain(&mut b, wire).unwrap_err(), RecordError::BadRecordMac);
        }
    }
}

#[test]
fn replayed_record_is_rejected() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    a.seal(b"once", &mut wire).unwrap();
    let mut twice = wire.clone();
    twice.extend_from_slice(&wire);
    assert_eq!(drain(&mut b, twice).unwrap_err(), RecordError::BadRecordMac);
}

#[test]
fn truncated_record_needs_more() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Chacha20Poly1305);
    let mut wire = Vec::new();
    a.seal(b"partial", &mut wire).unwrap();
    for cut in 0..wire.len() {
        let mut part = wire[..cut].to_vec();
        assert_eq!(b.open(&mut part, &mut Vec::new()).unwrap(), Opened::NeedMore);
    }
}

#[test]
fn key_update_requested_by_peer_rotates_both_directions() {
    for suite in SUITES {
        let (mut a, mut b) = pair(Version::Tls13, suite);
        let mut wire = Vec::new();
        a.send_key_update(true, &mut wire).unwrap();
        a.seal(b"after update", &mut wire).unwrap();
        let (data, reply, _) = drain(&mut b, wire).unwrap();
        assert_eq!(data, b"after update");
        assert!(reply.is_empty(), "the answer waits for b's next data");
        assert_eq!(b.key_updates(), (0, 1));
        // b's answer goes first, under its old key; its data under the new one.
        let mut wire = reply;
        b.seal(b"from b", &mut wire).unwrap();
        assert_eq!(b.key_updates(), (1, 1));
        let (data, reply, _) = drain(&mut a, wire).unwrap();
        assert_eq!(data, b"from b");
        assert!(reply.is_empty(), "update_not_requested needs no answer");
        assert_eq!(a.key_updates(), (1, 1));
    }
}

#[test]
fn automatic_key_update_after_n_records() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes256Gcm);
    let mut st = a.into_state();
    st.key_update_after = 2;
    a = RecordLayer::new(st).unwrap();
    let mut wire = Vec::new();
    for i in 0..5u8 {
        a.seal(&[i], &mut wire).unwrap();
    }
    let (data, reply, _) = drain(&mut b, wire).unwrap();
    assert_eq!(data, vec![0, 1, 2, 3, 4]);
    assert_eq!(a.key_updates().0, 2);
    assert_eq!(b.key_updates().1, 2);
    drain(&mut a, reply).unwrap();
}

#[test]
fn close_notify_is_reported_and_data_after_it_refused() {
    for version in [Version::Tls12, Version::Tls13] {
        let (mut a, mut b) = pair(version, Suite::Aes128Gcm);
        let mut wire = Vec::new();
        a.seal(b"bye", &mut wire).unwrap();
        a.close_notify(&mut wire).unwrap();
        assert_eq!(a.seal(b"more", &mut Vec::new()), Err(RecordError::AfterClose));
        let (data, _, closed) = drain(&mut b, wire).unwrap();
        assert_eq!(data, b"bye");
        assert!(closed);
    }
}

#[test]
fn fatal_alert_from_peer_is_an_error() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    a.fatal_alert(alert::DECODE_ERROR, &mut wire).unwrap();
    assert_eq!(drain(&mut b, wire).unwrap_err(), RecordError::PeerAlert(alert::DECODE_ERROR));
}

#[test]
fn tls12_renegotiation_is_refused_with_warning() {
    let (mut a, mut b) = pair(Version::Tls12, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    a.seal_record(CT_HANDSHAKE, &[HS_CLIENT_HELLO, 0, 0, 0], &mut wire).unwrap();
    let (_, reply, _) = drain(&mut b, wire).unwrap();
    assert!(!reply.is_empty());
    // a sees a warning alert, which is not fatal in TLS 1.2.
    let (data, _, closed) = drain(&mut a, reply).unwrap();
    assert!(data.is_empty() && !closed);
}

#[test]
fn oversize_length_is_overflow_before_waiting_for_bytes() {
    let (_, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let mut wire = vec![CT_APPDATA, 3, 3, 0xff, 0xff];
    assert_eq!(b.open(&mut wire, &mut Vec::new()), Err(RecordError::RecordOverflow));
}

#[test]
fn cooled_layer_rebuilds_its_keys() {
    for version in [Version::Tls12, Version::Tls13] {
        let (mut a, mut b) = pair(version, Suite::Aes128Gcm);
        let mut wire = Vec::new();
        a.seal(b"one", &mut wire).unwrap();
        a.cool();
        b.cool();
        a.seal(b"two", &mut wire).unwrap();
        let (data, _, _) = drain(&mut b, wire).unwrap();
        assert_eq!(data, b"onetwo");
    }
}

#[test]
fn state_survives_serialization_mid_stream() {
    let (mut a, b) = pair(Version::Tls13, Suite::Chacha20Poly1305);
    let mut wire = Vec::new();
    a.seal(b"one", &mut wire).unwrap();
    let json = serde_json::to_string(b.state()).unwrap();
    let mut b2 = RecordLayer::new(serde_json::from_str(&json).unwrap()).unwrap();
    a.seal(b"two", &mut wire).unwrap();
    let (data, _, _) = drain(&mut b2, wire).unwrap();
    assert_eq!(data, b"onetwo");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Records with a well-formed header (so they reach the AEAD, not just
    /// the header check) and a random body never authenticate, never
    /// panic, and never decrypt to data nobody sealed.
    #[test]
    fn well_framed_random_records_never_authenticate(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 1..4),
        ctype in prop_oneof![Just(23u8), Just(21u8), Just(22u8), any::<u8>()],
        v13 in any::<bool>(),
        s in 0usize..3,
    ) {
        let version = if v13 { Version::Tls13 } else { Version::Tls12 };
        let (_, mut b) = pair(version, SUITES[s]);
        let mut input = Vec::new();
        for body in &bodies {
            input.extend_from_slice(&[ctype, 3, 3]);
            input.extend_from_slice(&(body.len() as u16).to_be_bytes());
            input.extend_from_slice(body);
        }
        let mut off = 0;
        loop {
            match b.open(&mut input[off..], &mut Vec::new()) {
                Ok(Opened::Data { .. }) => prop_assert!(false, "random bytes authenticated"),
                Ok(Opened::Control { consumed }) if consumed > 0 => off += consumed,
                _ => break,
            }
        }
    }

    /// Any single bit flip in a sealed stream is caught; the data before it survives.
    #[test]
    fn bit_flips_are_caught(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..5), flip in any::<usize>(), v13 in any::<bool>(), s in 0usize..3) {
        let version = if v13 { Version::Tls13 } else { Version::Tls12 };
        let (mut a, mut b) = pair(version, SUITES[s]);
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        for m in &msgs { a.seal(m, &mut wire).unwrap(); sent.extend_from_slice(m); }
        prop_assume!(!wire.is_empty());
        let bit = flip % (wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        let mut got = Vec::new();
        let mut buf = wire;
        loop {
            match b.open(&mut buf, &mut Vec::new()) {
                Ok(Opened::Data { consumed, start, end }) => { got.extend_from_slice(&buf[start..end]); buf.drain(..consumed); }
                Ok(Opened::Control { consumed }) | Ok(Opened::CloseNotify { consumed }) => { buf.drain(..consumed); }
                Ok(Opened::NeedMore) | Err(_) => break,
            }
        }
        prop_assert!(sent.starts_with(&got), "only sealed bytes come out, in order");
        prop_assert!(got.len() < sent.len(), "the damaged record yields nothing");
    }
}

#[test]
fn tls13_ignores_the_legacy_record_version_and_tls12_checks_it() {
    // RFC 8446 5.1: legacy_record_version MUST be ignored for all purposes.
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    a.seal_padded(CT_APPDATA, b"from a TLS 1.0-minded stack", &mut wire, [3, 1], 0).unwrap();
    assert_eq!(&wire[..3], &[CT_APPDATA, 3, 1]);
    let (data, _, _) = drain(&mut b, wire).unwrap();
    assert_eq!(data, b"from a TLS 1.0-minded stack");
    // TLS 1.2 records carry 03 03 (its AAD does not cover them): checked.
    let (mut a, mut b) = pair(Version::Tls12, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    a.seal(b"x", &mut wire).unwrap();
    wire[2] = 1;
    assert_eq!(drain(&mut b, wire).unwrap_err(), RecordError::Decode);
}

#[test]
fn a_key_update_whose_request_update_is_not_0_or_1_is_an_illegal_parameter() {
    // RFC 8446 4.6.3: illegal_parameter (47); a wrong length is a decode_error.
    for (body, want) in
        [(vec![2u8], RecordError::IllegalParameter), (vec![0xff], RecordError::IllegalParameter), (vec![0, 0], RecordError::Decode)]
    {
        let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
        let mut msg = vec![HS_KEY_UPDATE, 0, 0, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut wire = Vec::new();
        a.seal_record(CT_HANDSHAKE, &msg, &mut wire).unwrap();
        let e = drain(&mut b, wire).unwrap_err();
        assert_eq!(e, want, "{body:?}");
    }
    assert_eq!(RecordError::IllegalParameter.alert(), Some(alert::ILLEGAL_PARAMETER));
    assert_eq!(alert::ILLEGAL_PARAMETER, 47);
}

/// RFC 8446 5.4: padding does not lift the limit; content, type and
/// padding together are at most 2^14 + 1 bytes, else record_overflow.
#[test]
fn tls13_padding_counts_toward_the_record_limit() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let data = vec![7u8; (1 << 14) - 8];
    let mut wire = Vec::new();
    a.seal_padded(CT_APPDATA, &data, &mut wire, [3, 3], 8).unwrap();
    let (got, _, _) = drain(&mut b, wire).unwrap();
    assert_eq!(got, data, "2^14 - 8 + 1 + 8 = 2^14 + 1: allowed");
    let mut wire = Vec::new();
    a.seal_padded(CT_APPDATA, &data, &mut wire, [3, 3], 9).unwrap();
    assert_eq!(drain(&mut b, wire).unwrap_err(), RecordError::RecordOverflow, "one byte more");
}

/// RFC 8446 5.1: nothing between the records of a split handshake message;
/// application data there is unexpected_message, not data.
#[test]
fn application_data_inside_a_split_key_update_is_unexpected() {
    for version in [Version::Tls13, Version::Tls12] {
        let (mut a, mut b) = pair(version, Suite::Aes128Gcm);
        let mut wire = Vec::new();
        a.seal_record(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0], &mut wire).unwrap();
        a.seal(b"between", &mut wire).unwrap();
        assert_eq!(drain(&mut b, wire).unwrap_err(), RecordError::UnexpectedMessage(CT_APPDATA), "{version:?}");
    }
}

/// RFC 8446 4.6.3: many requests while holdfast is silent get one answer;
/// a flood of them costs one key change, not one each.
#[test]
fn key_update_requests_read_together_get_one_answer() {
    let (mut a, mut b) = pair(Version::Tls13, Suite::Aes128Gcm);
    let mut wire = Vec::new();
    for _ in 0..1000 {
        a.send_key_update(true, &mut wire).unwrap();
    }
    a.seal(b"after the flood", &mut wire).unwrap();
    // However the flood is cut into reads.
    let mut got = Vec::new();
    let mut reply = Vec::new();
    let rest = wire.split_off(wire.len() / 3);
    b.open_all(&mut wire, &mut reply, &mut |p| got.extend_from_slice(p)).unwrap();
    wire.extend(rest); // after what was left of a record cut in two
    b.open_all(&mut wire, &mut reply, &mut |p| got.extend_from_slice(p)).unwrap();
    assert_eq!(got, b"after the flood");
    assert_eq!(b.key_updates(), (0, 1000), "nothing sent yet");
    b.seal(b"from b", &mut reply).unwrap();
    assert_eq!(b.key_updates(), (1, 1000), "one answer for 1000 requests, before b's data");
    // The answer is good: a reads it, then b's data under the new key.
    let (data, _, _) = drain(&mut a, reply).unwrap();
    assert_eq!(data, b"from b");
    assert_eq!(a.key_updates(), (1000, 1));
}
