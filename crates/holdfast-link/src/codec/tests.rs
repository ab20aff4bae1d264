use super::*;
use crate::testing::sample_open;
use proptest::prelude::*;

/// The frames behind the named examples in docs/link-protocol.md.
fn example(name: &str) -> Frame {
    match name {
        "hello" => Frame::Hello(Hello {
            version: 1,
            role: 0,
            node: "edge-1".into(),
            shard: 0,
            stream_window: 262_144,
            link_window: 16 << 20,
            max_frame: 16 << 20,
        }),
        "open" => Frame::Open { stream: 1, open: Box::new(sample_open(false)) },
        "open_labels" => {
            let mut o = sample_open(false);
            o.labels = vec!["quarantine".into()];
            Frame::Open { stream: 1, open: Box::new(o) }
        }
        "labels" => Frame::Labels { stream: 1, labels: vec!["quarantine".into()] },
        "accept" => Frame::Accept { stream: 1, subprotocol: Some("v1".into()) },
        "refuse" => Frame::Refuse { stream: 2, status: 403, reason: "blocked".into() },
        "message" => Frame::Message { stream: 1, binary: false, data: b"hi".to_vec() },
        "close" => Frame::Close { stream: 1, reason: CloseReason::DeviceGone, code: 1000, text: "".into() },
        "credit" => Frame::Credit { stream: 7, bytes: 65_536 },
        "ping" => Frame::Ping(1),
        "handoff" => Frame::Handoff { stream: 5 },
        "handoff_ack" => Frame::HandoffAck { stream: 5 },
        "goaway" => Frame::GoAway { code: 0, text: "restart".into() },
        other => panic!("no example frame named {other}"),
    }
}

/// Every `<!-- example: NAME -->` block in the spec encodes and decodes exactly.
#[test]
fn spec_examples_match_the_codec() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/link-protocol.md")).unwrap();
    let mut seen = 0;
    for part in doc.split("<!-- example: ").skip(1) {
        let name = &part[..part.find(" -->").unwrap()];
        let block = part.split("```").nth(1).unwrap();
        let hex: String = block.lines().skip(1).map(|l| l.split('#').next().unwrap()).collect::<Vec<_>>().join(" ");
        let bytes: Vec<u8> =
            hex.split_whitespace().map(|h| u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{name}: bad hex {h}"))).collect();
        let frame = example(name);
        let mut enc = Vec::new();
        frame.encode(&mut enc);
        assert_eq!(enc, bytes, "example {name}: encoding differs from the spec");
        let (dec, used) = Frame::decode(&bytes, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!((dec, used), (frame, bytes.len()), "example {name}");
        seen += 1;
    }
    assert!(seen >= 13, "spec has {seen} examples");
}

#[test]
fn rejects_trailing_bytes_bad_streams_and_flags() {
    let mut b = Vec::new();
    Frame::Ping(5).encode(&mut b);
    b[3] += 1;
    b.push(0);
    assert_eq!(Frame::decode(&b, DEFAULT_MAX_FRAME), Err(LinkError::Malformed("PING")));

    let mut b = Vec::new();
    Frame::Message { stream: 0, binary: true, data: vec![1] }.encode(&mut b);
    assert_eq!(Frame::decode(&b, DEFAULT_MAX_FRAME), Err(LinkError::BadStream(0)));

    let mut b = Vec::new();
    Frame::Credit { stream: 1, bytes: 1 }.encode(&mut b);
    b[5] = 0x80;
    assert!(Frame::decode(&b, DEFAULT_MAX_FRAME).is_err());

    assert_eq!(Frame::decode(&[0, 0, 1, 0], 100), Err(LinkError::TooLarge(256)));
    assert_eq!(Frame::decode(&[0, 0, 0, 6, 0x7f, 0, 0, 0, 0, 0], 100), Err(LinkError::UnknownType(0x7f)));
}

#[test]
fn a_labeled_open_with_no_labels_is_malformed() {
    // Found by the link_codec fuzz target: flag 0x02 with an empty list
    // decoded, and encoded back without the flag.
    let mut o = sample_open(false);
    o.labels = vec!["x".into()];
    let mut b = Vec::new();
    Frame::Open { stream: 1, open: Box::new(o) }.encode(&mut b);
    // Replace the labels list (00 01 00 01 78) by an empty one (00 00).
    b.truncate(b.len() - 5);
    b.extend_from_slice(&[0, 0]);
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(Frame::decode(&b, DEFAULT_MAX_FRAME), Err(LinkError::Malformed("OPEN")));
}

#[test]
fn incomplete_frames_wait() {
    let mut b = Vec::new();
    Frame::Open { stream: 3, open: Box::new(sample_open(true)) }.encode(&mut b);
    for cut in 0..b.len() {
        assert_eq!(Frame::decode(&b[..cut], DEFAULT_MAX_FRAME), Ok(None));
    }
    let (f, n) = Frame::decode(&b, DEFAULT_MAX_FRAME).unwrap().unwrap();
    assert_eq!(n, b.len());
    assert!(matches!(f, Frame::Open { stream: 3, open } if open.resumed));
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let s = "[a-z0-9 =/]{0,20}";
    prop_oneof![
        (1u32..9, any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(stream, binary, data)| Frame::Message {
            stream,
            binary,
            data
        }),
        (0u32..9, any::<u32>()).prop_map(|(stream, bytes)| Frame::Credit { stream, bytes }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (1u32..9, any::<u16>(), s).prop_map(|(stream, status, reason)| Frame::Refuse { stream, status, reason }),
        (1u32..9, 0u8..4, any::<u16>(), s).prop_map(|(stream, r, code, text)| Frame::Close {
            stream,
            reason: CloseReason::from_u8(r).unwrap(),
            code,
            text
        }),
        (1u32..9, any::<bool>(), proptest::collection::vec("[a-z]{1,8}", 0..3)).prop_map(|(stream, resumed, labels)| {
            let mut o = sample_open(resumed);
            o.labels = labels;
            Frame::Open { stream, open: Box::new(o) }
        }),
        (1u32..9, proptest::collection::vec("[a-z]{0,8}", 0..3)).prop_map(|(stream, labels)| Frame::Labels { stream, labels }),
        (any::<u8>(), s).prop_map(|(code, text)| Frame::GoAway { code, text }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Frames with a valid length, a known type and a random body reach
    /// every frame type's body parser (random bytes would almost never
    /// get past the length): they decode or fail, never panic, and what
    /// decodes encodes back to the same bytes.
    #[test]
    fn well_framed_random_bodies_never_panic(
        kind in 1u8..=0x0d,
        flags in any::<u8>(),
        stream in prop_oneof![Just(0u32), Just(1u32), any::<u32>()],
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = Vec::new();
        b.extend_from_slice(&((HEADER_LEN - 4 + body.len()) as u32).to_be_bytes());
        b.push(kind);
        b.push(flags);
        b.extend_from_slice(&stream.to_be_bytes());
        b.extend_from_slice(&body);
        if let Ok(Some((f, used))) = Frame::decode(&b, 1 << 16) {
            prop_assert_eq!(used, b.len());
            let mut again = Vec::new();
            f.encode(&mut again);
            prop_assert_eq!(Frame::decode(&again, 1 << 16).unwrap().map(|(g, _)| g), Some(f));
        }
    }

    /// A stream of frames, truncated anywhere, decodes to a prefix of what was sent.
    #[test]
    fn roundtrip_and_truncation(frames in proptest::collection::vec(arb_frame(), 1..8), cut in any::<usize>()) {
        let mut wire = Vec::new();
        for f in &frames { f.encode(&mut wire); }
        let cut = cut % (wire.len() + 1);
        let mut buf = &wire[..cut];
        let mut got = Vec::new();
        while let Some((f, n)) = Frame::decode(buf, DEFAULT_MAX_FRAME).unwrap() {
            got.push(f);
            buf = &buf[n..];
        }
        prop_assert!(got.len() <= frames.len());
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        if cut == wire.len() { prop_assert_eq!(got.len(), frames.len()); }
    }
}
