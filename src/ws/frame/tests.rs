use super::*;
use proptest::prelude::*;

const M: Option<[u8; 4]> = Some([1, 2, 3, 4]);

fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Event>, WsError> {
    let mut d = Decoder::new(max, true);
    let mut ev = Vec::new();
    d.feed(bytes, &mut ev)?;
    Ok(ev)
}

#[test]
fn rfc6455_masked_hello() {
    // RFC 6455 5.7: a single-frame masked text message "Hello".
    let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    assert_eq!(decode_all(&wire, 100).unwrap(), vec![Event::Message { text: true, data: b"Hello".to_vec() }]);
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    // RFC 6455 5.7 fragments, masked, with a ping between them.
    let mut w = Vec::new();
    w.extend_from_slice(&[0x01, 0x83, 0, 0, 0, 0]);
    w.extend_from_slice(b"Hel");
    encode(&mut w, op::PING, b"p", M);
    w.extend_from_slice(&[0x80, 0x82, 0, 0, 0, 0]);
    w.extend_from_slice(b"lo");
    let ev = decode_all(&w, 100).unwrap();
    assert_eq!(ev, vec![Event::Ping(b"p".to_vec()), Event::Message { text: true, data: b"Hello".to_vec() }]);
}

#[test]
fn byte_at_a_time_equals_whole() {
    let mut w = Vec::new();
    encode(&mut w, op::BINARY, &vec![9u8; 70_000], M);
    encode(&mut w, op::TEXT, "héllo".as_bytes(), M);
    encode_close(&mut w, 1000, "bye", M);
    let whole = decode_all(&w, 1 << 20).unwrap();
    let mut d = Decoder::new(1 << 20, true);
    let mut ev = Vec::new();
    for b in &w {
        d.feed(std::slice::from_ref(b), &mut ev).unwrap();
    }
    assert_eq!(ev, whole);
    assert_eq!(whole.len(), 3);
    assert_eq!(whole[2], Event::Close { code: Some(1000), reason: "bye".into() });
}

#[test]
fn limits_and_violations_map_to_close_codes() {
    let mut big = Vec::new();
    encode(&mut big, op::BINARY, &[0; 200], M);
    assert_eq!(decode_all(&big, 100).unwrap_err().code, close::TOO_BIG);

    let mut frag = vec![0x02, 0x80 | 60, 0, 0, 0, 0];
    frag.extend_from_slice(&[0; 60]);
    frag.extend_from_slice(&[0x80, 0x80 | 60, 0, 0, 0, 0]);
    frag.extend_from_slice(&[0; 60]);
    assert_eq!(decode_all(&frag, 100).unwrap_err().code, close::TOO_BIG, "limit applies to the reassembled message");

    let mut bad_utf8 = Vec::new();
    encode(&mut bad_utf8, op::TEXT, &[0xff, 0xfe], M);
    assert_eq!(decode_all(&bad_utf8, 100).unwrap_err().code, close::INVALID_DATA);

    let mut unmasked = Vec::new();
    encode(&mut unmasked, op::TEXT, b"x", None);
    assert_eq!(decode_all(&unmasked, 100).unwrap_err().code, close::PROTOCOL_ERROR);

    let rsv = [0xc1, 0x80, 0, 0, 0, 0];
    assert_eq!(decode_all(&rsv, 100).unwrap_err().code, close::PROTOCOL_ERROR);
    let cont = [0x80, 0x80, 0, 0, 0, 0];
    assert_eq!(decode_all(&cont, 100).unwrap_err().code, close::PROTOCOL_ERROR);
    let long_ping = [0x89, 0x80 | 126, 0, 200, 0, 0, 0, 0];
    assert_eq!(decode_all(&long_ping, 1000).unwrap_err().code, close::PROTOCOL_ERROR);
    let mut bad_close = Vec::new();
    encode(&mut bad_close, op::CLOSE, &[0x03, 0xed], M); // 1005 may not be sent
    assert_eq!(decode_all(&bad_close, 100).unwrap_err().code, close::PROTOCOL_ERROR);
}

#[test]
fn server_frames_roundtrip_unmasked() {
    let mut w = Vec::new();
    encode(&mut w, op::TEXT, b"hi", None);
    let mut d = Decoder::new(100, false);
    let mut ev = Vec::new();
    d.feed(&w, &mut ev).unwrap();
    assert_eq!(ev, vec![Event::Message { text: true, data: b"hi".to_vec() }]);
}

#[test]
fn decoder_state_moves_mid_frame() {
    let mut wire = Vec::new();
    encode(&mut wire, op::TEXT, "first half | second half".as_bytes(), M);
    let mut frag = Vec::new();
    encode(&mut frag, op::BINARY, &[7u8; 300], M);
    frag[0] &= 0x7f; // a fragmented message, cut inside its first frame below
    wire.extend_from_slice(&frag);
    encode(&mut wire, op::CONT, &[8u8; 10], M);
    for cut in 1..wire.len() {
        let mut d = Decoder::new(4096, true);
        let mut ev = Vec::new();
        d.feed(&wire[..cut], &mut ev).unwrap();
        let moved: Decoder = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(moved, d);
        let mut d = moved;
        d.feed(&wire[cut..], &mut ev).unwrap();
        assert_eq!(ev.len(), 2, "cut at {cut}");
        assert_eq!(ev[1], Event::Message { text: false, data: [vec![7u8; 300], vec![8u8; 10]].concat() });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..400), split in any::<usize>()) {
        let mut d = Decoder::new(256, true);
        let mut ev = Vec::new();
        let at = if input.is_empty() { 0 } else { split % input.len() };
        if d.feed(&input[..at], &mut ev).is_ok() {
            let _ = d.feed(&input[at..], &mut ev);
        }
    }

    /// Any sequence of messages, cut anywhere, decodes to exactly those messages.
    #[test]
    fn messages_survive_any_split(msgs in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..6), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (text, data) in &msgs {
            let data = if *text { String::from_utf8_lossy(data).into_owned().into_bytes() } else { data.clone() };
            encode(&mut wire, if *text { op::TEXT } else { op::BINARY }, &data, Some([7, 1, 9, 3]));
            want.push(Event::Message { text: *text, data });
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        points.sort();
        let mut d = Decoder::new(4096, true);
        let mut ev = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([wire.len()]) {
            d.feed(&wire[last..p], &mut ev).unwrap();
            last = p;
        }
        prop_assert_eq!(ev, want);
    }

    /// Truncated input yields only the messages that were wholly sent.
    #[test]
    fn truncation_yields_no_partial_message(data in proptest::collection::vec(any::<u8>(), 1..300), cut in any::<usize>()) {
        let mut wire = Vec::new();
        encode(&mut wire, op::BINARY, &data, M);
        let cut = cut % wire.len();
        let ev = decode_all(&wire[..cut], 4096).unwrap();
        prop_assert!(ev.is_empty());
    }
}

/// A header declaring a huge message reserves nothing like it before the
/// payload arrives (a device could otherwise make holdfast allocate
/// max_message_bytes per connection with 14 bytes).
#[test]
fn a_declared_length_is_not_reserved_before_its_payload_arrives() {
    let mut d = Decoder::new(64 << 20, true);
    let mut ev = Vec::new();
    let mut hdr = vec![0x82, 0xff];
    hdr.extend_from_slice(&(60u64 << 20).to_be_bytes());
    hdr.extend_from_slice(&[0, 0, 0, 0]);
    d.feed(&hdr, &mut ev).unwrap();
    let reserved = d.msg.as_ref().map(|(_, m)| m.capacity()).unwrap();
    assert!(reserved <= INITIAL_RESERVE, "{reserved} bytes reserved for a header");
    // The payload still assembles whole.
    let mut d = Decoder::new(1 << 20, true);
    let mut w = Vec::new();
    let data = vec![9u8; 300_000];
    encode(&mut w, op::BINARY, &data, M);
    for chunk in w.chunks(7777) {
        d.feed(chunk, &mut ev).unwrap();
    }
    assert_eq!(ev, vec![Event::Message { text: false, data }]);
}

/// A decoder rebuilt from a corrupt live-upgrade snapshot (found by the
/// handoff_decode fuzz target: a header longer than its own length field
/// says) is refused when fed, never a panic or an unbounded buffer.
#[test]
fn a_decoder_rebuilt_from_a_corrupt_snapshot_errs_instead_of_panicking() {
    let mut d = Decoder::new(1024, true);
    d.hdr_len = 9;
    assert!(!d.consistent());
    assert_eq!(d.feed(b"abc", &mut Vec::new()).unwrap_err().code, close::INTERNAL);
    let mut d = Decoder::new(1024, true);
    d.frame = Some(Frame { fin: true, opcode: op::PING, mask: None, remaining: 1 << 40, pos: 0 });
    assert!(d.feed(b"abc", &mut Vec::new()).is_err());
    let mut d = Decoder::new(1024, true);
    d.frame = Some(Frame { fin: false, opcode: op::TEXT, mask: None, remaining: 10, pos: 0 });
    assert!(d.feed(b"abc", &mut Vec::new()).is_err(), "a data frame with no message");
    // Every state a real feed leaves is consistent.
    let mut d = Decoder::new(1024, true);
    let mut f = Vec::new();
    encode(&mut f, op::TEXT, b"hello there", Some([1, 2, 3, 4]));
    for b in &f[..f.len() - 1] {
        d.feed(std::slice::from_ref(b), &mut Vec::new()).unwrap();
        assert!(d.consistent());
    }
}

/// A masked frame with FIN set or not.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    encode(&mut w, opcode, payload, M);
    if !fin {
        w[0] &= 0x7f;
    }
    w
}

#[test]
fn invalid_utf8_in_a_fragmented_text_fails_at_its_first_bad_byte() {
    // Autobahn 6.4.1: valid first fragment, then one that makes it invalid
    // (U+10FFFF + 1 = F4 90 ...), then the rest, which never comes.
    let mut d = Decoder::new(1 << 20, true);
    let mut ev = Vec::new();
    d.feed(&frame(false, op::TEXT, "κόσμε".as_bytes()), &mut ev).unwrap();
    let e = d.feed(&frame(false, op::CONT, &[0xf4, 0x90, 0x80, 0x80]), &mut ev).unwrap_err();
    assert_eq!(e.code, close::INVALID_DATA, "failed before the message ended");
    // Autobahn 6.4.3/6.4.4: the bad byte arrives in a chunk of a frame.
    let mut d = Decoder::new(1 << 20, true);
    let mut w = frame(true, op::TEXT, &[b'a', b'b', 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xf4, 0x90, 0x80, 0x80, b'z', b'z']);
    w.truncate(2 + 4 + 9); // the rest of the frame never comes
    assert!(d.feed(&w, &mut ev).is_err(), "the first seven payload bytes and F4 90: invalid already");
}

#[test]
fn a_character_split_across_fragments_and_chunks_is_valid() {
    let text = "aκόσμε€𝄞z";
    let bytes = text.as_bytes();
    // Every split of the payload into two fragments, each fed a byte at a time.
    for cut in 0..=bytes.len() {
        let mut w = frame(false, op::TEXT, &bytes[..cut]);
        w.extend(frame(true, op::CONT, &bytes[cut..]));
        let mut d = Decoder::new(1 << 20, true);
        let mut ev = Vec::new();
        for b in &w {
            d.feed(std::slice::from_ref(b), &mut ev).unwrap_or_else(|e| panic!("cut {cut}: {e:?}"));
        }
        assert_eq!(ev, vec![Event::Message { text: true, data: bytes.to_vec() }], "cut {cut}");
    }
    // A message that ends inside a character is invalid at its end.
    let e = decode_all(&frame(true, op::TEXT, &bytes[..2]), 100).unwrap_err();
    assert_eq!(e.code, close::INVALID_DATA);
}
