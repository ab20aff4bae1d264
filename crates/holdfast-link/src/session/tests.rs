//! Virtual time: each test reads the clock once for an origin and moves it
//! forward by hand.
#![allow(clippy::disallowed_methods)]

use super::*;
use crate::testing::sample_open;
use proptest::prelude::*;

const SW: u32 = 1000; // holdfast's stream window for the WSM
const LW: u32 = 4000; // holdfast's link window for the WSM
const PEER_SW: u32 = 800; // the WSM's stream window for holdfast
const PEER_LW: u32 = 2000; // the WSM's link window for holdfast

fn params() -> Params {
    Params {
        node: "edge-1".into(),
        shard: 3,
        stream_window: SW,
        link_window: LW,
        max_frame: 1 << 20,
        ping_interval: Duration::from_secs(10),
        liveness_timeout: Duration::from_secs(30),
        version: codec::VERSION,
    }
}

fn wsm_hello(max_frame: u32) -> Vec<u8> {
    let mut b = Vec::new();
    Frame::Hello(Hello {
        version: codec::VERSION,
        role: 1,
        node: "wsm-a".into(),
        shard: 0,
        stream_window: PEER_SW,
        link_window: PEER_LW,
        max_frame,
    })
    .encode(&mut b);
    b
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some((f, used)) = Frame::decode(&bytes[off..], codec::LARGEST_FRAME).unwrap() {
        out.push(f);
        off += used;
    }
    assert_eq!(off, bytes.len(), "trailing bytes in holdfast's output");
    out
}

fn enc(f: Frame) -> Vec<u8> {
    let mut b = Vec::new();
    f.encode(&mut b);
    b
}

fn up(t0: Instant) -> LinkSession {
    let mut s = LinkSession::new(params(), t0);
    let out = s.take_out(t0, Vec::new());
    match frames(&out).as_slice() {
        [Frame::Hello(h)] => {
            assert_eq!((h.role, h.shard, h.stream_window, h.link_window), (0, 3, SW, LW));
        }
        other => panic!("expected HELLO, got {other:?}"),
    }
    let hello = wsm_hello(1 << 20);
    assert_eq!(s.on_bytes(t0, &hello), Ok(hello.len()));
    assert_eq!(s.poll_event(), Some(Event::Up { node: "wsm-a".into() }));
    s
}

#[test]
fn no_stream_before_hello_and_a_stream_after() {
    let t0 = Instant::now();
    let mut s = LinkSession::new(params(), t0);
    assert!(s.open(sample_open(false)).is_none());
    let mut s = up(t0);
    let id = s.open(sample_open(false)).unwrap();
    assert_eq!(id, 1);
    assert!(matches!(frames(&s.take_out(t0, Vec::new())).as_slice(), [Frame::Open { stream: 1, .. }]));
    s.on_bytes(t0, &enc(Frame::Accept { stream: 1, subprotocol: Some("v1".into()) })).unwrap();
    assert_eq!(s.poll_event(), Some(Event::Accepted { stream: 1, subprotocol: Some("v1".into()) }));
    // A second ACCEPT for the same stream is not a second event.
    s.on_bytes(t0, &enc(Frame::Accept { stream: 1, subprotocol: None })).unwrap();
    assert_eq!(s.poll_event(), None);
}

#[test]
fn a_first_frame_other_than_hello_or_a_bad_version_fails_the_link() {
    let t0 = Instant::now();
    let mut s = LinkSession::new(params(), t0);
    assert_eq!(s.on_bytes(t0, &enc(Frame::Ping(1))), Err(Failure::NotHello));
    let mut s = LinkSession::new(params(), t0);
    let mut h = Vec::new();
    Frame::Hello(Hello { version: 9, role: 1, node: "x".into(), shard: 0, stream_window: 1, link_window: 1, max_frame: 1 << 20 })
        .encode(&mut h);
    assert_eq!(s.on_bytes(t0, &h), Err(Failure::Version { version: 9, role: 1 }));
    let mut s = up(t0);
    assert_eq!(s.on_bytes(t0, &wsm_hello(1 << 20)), Err(Failure::SecondHello));
    let mut s = up(t0);
    assert_eq!(s.on_bytes(t0, &enc(Frame::Handoff { stream: 1 })), Err(Failure::Unexpected("HANDOFF")));
    for f in [Failure::NotHello, Failure::Silent(Duration::from_secs(1)), Failure::Read(std::io::ErrorKind::BrokenPipe)] {
        assert_eq!(f.blame(), Blame::Wsm);
        assert!(f.retry_helps());
        assert!(FAILURE_LABELS.contains(&f.label()));
    }
}

#[test]
fn a_frame_above_holdfasts_limit_fails_the_link_and_a_partial_frame_waits() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let big = enc(Frame::Message { stream: 1, binary: true, data: vec![0; 2 << 20] });
    assert!(matches!(s.on_bytes(t0, &big), Err(Failure::Decode(codec::LinkError::TooLarge(_)))));
    let mut s = up(t0);
    let ping = enc(Frame::Ping(7));
    assert_eq!(s.on_bytes(t0, &ping[..5]), Ok(0));
    assert_eq!(s.on_bytes(t0, &ping), Ok(ping.len()));
    assert_eq!(frames(&s.take_out(t0, Vec::new())), vec![Frame::Pong(7)]);
}

#[test]
fn messages_wait_for_credit_at_both_levels_and_credit_acknowledges_oldest_first() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    s.on_bytes(t0, &enc(Frame::Accept { stream: a, subprotocol: None })).unwrap();
    let _ = s.poll_event();
    assert!(s.may_send(a));
    assert!(s.send(a, true, &[1; 500]));
    assert!(s.send(a, true, &[2; 400])); // may overshoot by one message
    assert!(!s.may_send(a));
    s.on_bytes(t0, &enc(Frame::Credit { stream: a, bytes: 500 })).unwrap();
    assert_eq!(s.poll_event(), Some(Event::Writable { stream: a }));
    // The first message is acknowledged: if the link fails now, only the
    // second is sent again.
    let lost = s.fail();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].0, a);
    assert_eq!(lost[0].1, VecDeque::from(vec![(true, vec![2; 400])]));
    assert!(!s.is_up());
}

#[test]
fn link_credit_blocks_every_stream_and_its_return_unblocks_them() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    let b = s.open(sample_open(false)).unwrap();
    for id in [a, b] {
        s.on_bytes(t0, &enc(Frame::Accept { stream: id, subprotocol: None })).unwrap();
    }
    while s.poll_event().is_some() {}
    for _ in 0..3 {
        s.send(a, true, &[0; 700]);
    }
    assert!(!s.may_send(b), "the link window (2000) is spent");
    s.on_bytes(t0, &enc(Frame::Credit { stream: 0, bytes: 1000 })).unwrap();
    assert_eq!(s.poll_event(), Some(Event::LinkWritable));
    assert!(s.may_send(b));
    // Saturating: credit without end does not wrap.
    for _ in 0..10 {
        s.on_bytes(t0, &enc(Frame::Credit { stream: 0, bytes: u32::MAX })).unwrap();
    }
    assert!(s.may_send(b));
}

#[test]
fn link_credit_goes_back_after_each_read_even_for_a_closed_stream() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let _ = s.take_out(t0, Vec::new());
    let a = s.open(sample_open(false)).unwrap();
    s.close(a, CloseReason::DeviceGone, 1000, "");
    let _ = s.take_out(t0, Vec::new());
    // Messages for a stream holdfast closed (a race with CLOSE) still leave the link.
    s.on_bytes(t0, &enc(Frame::Message { stream: a, binary: false, data: vec![b'x'; 300] })).unwrap();
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.peer_available(), LW as i64 - 300);
    assert_eq!(s.after_read(), Some(300));
    assert_eq!(s.peer_available(), LW as i64);
    assert_eq!(frames(&s.take_out(t0, Vec::new())), vec![Frame::Credit { stream: 0, bytes: 300 }]);
    assert_eq!(s.after_read(), None);
}

#[test]
fn stream_credit_goes_back_by_the_quarter_window_as_messages_are_delivered() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    let _ = s.take_out(t0, Vec::new());
    assert_eq!(s.delivered(a, 100), None);
    assert_eq!(s.delivered(a, 200), Some(300));
    assert_eq!(frames(&s.take_out(t0, Vec::new())), vec![Frame::Credit { stream: a, bytes: 300 }]);
    assert_eq!(s.delivered(99, 1000), None, "nothing for a stream not on the link");
}

#[test]
fn wsm_close_and_refuse_remove_the_stream() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    let b = s.open(sample_open(false)).unwrap();
    s.on_bytes(t0, &enc(Frame::Refuse { stream: a, status: 403, reason: "no".into() })).unwrap();
    s.on_bytes(t0, &enc(Frame::Close { stream: b, reason: CloseReason::WsmClosed, code: 1000, text: "bye".into() })).unwrap();
    assert_eq!(s.poll_event(), Some(Event::Refused { stream: a, status: 403, reason: "no".into() }));
    assert_eq!(s.poll_event(), Some(Event::Closed { stream: b, code: 1000, text: "bye".into() }));
    assert_eq!(s.stream_count(), 0);
    assert!(!s.send(a, true, b"x"));
    let _ = s.take_out(t0, Vec::new());
    s.close(b, CloseReason::DeviceGone, 1000, "");
    assert!(s.take_out(t0, Vec::new()).is_empty(), "no CLOSE for a stream already gone");
}

#[test]
fn handoff_stops_sending_and_its_ack_clears_the_unacknowledged() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    s.on_bytes(t0, &enc(Frame::Accept { stream: a, subprotocol: None })).unwrap();
    s.send(a, false, b"hello");
    assert!(s.handoff(a));
    assert!(!s.may_send(a));
    assert!(!s.send(a, false, b"late"));
    let _ = s.take_out(t0, Vec::new());
    s.on_bytes(t0, &enc(Frame::HandoffAck { stream: a })).unwrap();
    while let Some(e) = s.poll_event() {
        if e == (Event::HandoffAcked { stream: a }) {
            assert_eq!(s.fail(), vec![(a, VecDeque::new())]);
            return;
        }
    }
    panic!("no HandoffAcked");
}

#[test]
fn goaway_stops_new_streams_only() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    s.on_bytes(t0, &enc(Frame::GoAway { code: 1, text: "deploy".into() })).unwrap();
    while s.poll_event().is_some() {}
    assert!(s.going_away());
    assert!(s.open(sample_open(false)).is_none());
    assert!(s.has_stream(a));
}

#[test]
fn pings_when_quiet_and_fails_when_the_wsm_is_silent() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let _ = s.take_out(t0, Vec::new());
    assert_eq!(s.deadline(), t0 + Duration::from_secs(10));
    assert_eq!(s.on_tick(t0 + Duration::from_secs(9)), Ok(false));
    assert_eq!(s.on_tick(t0 + Duration::from_secs(10)), Ok(true));
    assert_eq!(frames(&s.take_out(t0 + Duration::from_secs(10), Vec::new())), vec![Frame::Ping(1)]);
    assert_eq!(s.on_tick(t0 + Duration::from_secs(11)), Ok(false), "just pinged");
    // The WSM answers: it is alive.
    s.on_bytes(t0 + Duration::from_secs(12), &enc(Frame::Pong(1))).unwrap();
    assert_eq!(s.deadline(), t0 + Duration::from_secs(20));
    assert_eq!(s.on_tick(t0 + Duration::from_secs(42)), Err(Failure::Silent(Duration::from_secs(30))));
}

#[test]
fn a_message_above_the_wsms_frame_limit_does_not_fit() {
    let t0 = Instant::now();
    let mut s = LinkSession::new(params(), t0);
    s.on_bytes(t0, &wsm_hello(1000)).unwrap();
    assert!(s.fits(1000 - codec::MESSAGE_OVERHEAD as usize));
    assert!(!s.fits(1000 - codec::MESSAGE_OVERHEAD as usize + 1));
}

/// One operation on the link, from either side.
#[derive(Debug, Clone)]
enum Op {
    Open,
    DeviceSends(usize, u16),
    /// The WSM sends on a stream it knows of (it may have been closed by
    /// holdfast in a CLOSE the WSM has not read yet).
    WsmSends(usize, u16),
    /// The WSM reads what holdfast wrote so far.
    WsmReads,
    DeviceReads(usize),
    WsmReturnsCredit(usize),
    DeviceCloses(usize),
    WsmCloses(usize),
    Handoff(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Open),
        3 => (any::<usize>(), 1u16..900).prop_map(|(s, n)| Op::DeviceSends(s, n)),
        4 => (any::<usize>(), 1u16..900).prop_map(|(s, n)| Op::WsmSends(s, n)),
        3 => Just(Op::WsmReads),
        3 => any::<usize>().prop_map(Op::DeviceReads),
        3 => any::<usize>().prop_map(Op::WsmReturnsCredit),
        1 => any::<usize>().prop_map(Op::DeviceCloses),
        1 => any::<usize>().prop_map(Op::WsmCloses),
        1 => any::<usize>().prop_map(Op::Handoff),
    ]
}

/// The WSM as the protocol describes it: it sends within the credit
/// holdfast grants and returns credit for what it processed.
#[derive(Default)]
struct WsmModel {
    link_credit: i64,
    /// Per stream: (its credit for sending, bytes received not yet returned).
    streams: std::collections::BTreeMap<u32, (i64, u64)>,
    received_link: u64,
    /// What holdfast wrote that the WSM has not read yet.
    unread: Vec<u8>,
}

impl WsmModel {
    /// Reads holdfast's output: credit it returned, streams it opened or closed.
    fn read(&mut self) {
        for f in frames(&std::mem::take(&mut self.unread)) {
            match f {
                Frame::Open { stream, .. } => {
                    self.streams.insert(stream, (SW as i64, 0));
                }
                Frame::Credit { stream: 0, bytes } => self.link_credit += bytes as i64,
                Frame::Credit { stream, bytes } => {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.0 += bytes as i64;
                    }
                }
                Frame::Message { stream, data, .. } => {
                    self.received_link += data.len() as u64;
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.1 += data.len() as u64;
                    }
                }
                Frame::Close { stream, .. } => {
                    self.streams.remove(&stream);
                }
                _ => {}
            }
        }
    }
}

proptest! {
    /// Credit conservation under any interleaving, with the WSM reading
    /// holdfast's output late (so it sends on streams holdfast has closed):
    /// whenever the WSM has read everything, its link credit is the whole
    /// window (holdfast returns link credit after every read, whatever
    /// became of the stream), and per stream its credit plus what holdfast
    /// owes (undelivered, or delivered and not yet returned) is the stream
    /// window. holdfast never sends more than the WSM granted, plus one
    /// message per stream.
    #[test]
    fn credit_is_conserved(ops in proptest::collection::vec(op(), 1..300)) {
        let t0 = Instant::now();
        let mut s = up(t0);
        let mut w = WsmModel { link_credit: LW as i64, ..Default::default() };
        // Device side: per stream, messages received from the WSM not yet delivered.
        let mut inbox: std::collections::HashMap<u32, VecDeque<usize>> = std::collections::HashMap::new();
        let mut open: Vec<u32> = Vec::new();
        let mut sent_link: i64 = 0;
        for op in ops.into_iter().chain([Op::WsmReads]) {
            let pick = |i: usize| (!open.is_empty()).then(|| open[i % open.len()]);
            let wsm_pick = |i: usize| (!w.streams.is_empty()).then(|| *w.streams.keys().nth(i % w.streams.len()).unwrap());
            match op {
                Op::Open => {
                    if let Some(id) = s.open(sample_open(false)) {
                        open.push(id);
                        inbox.insert(id, VecDeque::new());
                        let acc = enc(Frame::Accept { stream: id, subprotocol: None });
                        s.on_bytes(t0, &acc).unwrap();
                    }
                }
                Op::DeviceSends(i, n) => if let Some(id) = pick(i)
                    && s.may_send(id)
                    && s.send(id, true, &vec![0; n as usize])
                {
                    sent_link += n as i64;
                },
                Op::WsmSends(i, n) => if let Some(id) = wsm_pick(i) {
                    let n = n as i64;
                    let cr = w.streams[&id].0;
                    if w.link_credit >= n && cr >= n {
                        w.link_credit -= n;
                        if let Some(c) = w.streams.get_mut(&id) { c.0 -= n; }
                        s.on_bytes(t0, &enc(Frame::Message { stream: id, binary: true, data: vec![7; n as usize] })).unwrap();
                        s.after_read();
                    }
                },
                Op::WsmReads => w.read(),
                Op::DeviceReads(i) => if let Some(id) = pick(i)
                    && let Some(q) = inbox.get_mut(&id)
                {
                    while let Some(n) = q.pop_front() { s.delivered(id, n); }
                },
                Op::WsmReturnsCredit(i) => {
                    if let Some(id) = wsm_pick(i)
                        && let Some(c) = w.streams.get_mut(&id)
                    {
                        let b = std::mem::take(&mut c.1);
                        if b > 0 {
                            s.on_bytes(t0, &enc(Frame::Credit { stream: id, bytes: b as u32 })).unwrap();
                        }
                    }
                    let b = std::mem::take(&mut w.received_link);
                    if b > 0 {
                        s.on_bytes(t0, &enc(Frame::Credit { stream: 0, bytes: b as u32 })).unwrap();
                        sent_link -= b as i64;
                    }
                }
                Op::DeviceCloses(i) => if let Some(id) = pick(i) {
                    s.close(id, CloseReason::DeviceGone, 1000, "");
                    open.retain(|&x| x != id);
                    inbox.remove(&id);
                },
                Op::WsmCloses(i) => if let Some(id) = wsm_pick(i) {
                    s.on_bytes(t0, &enc(Frame::Close { stream: id, reason: CloseReason::WsmClosed, code: 1000, text: String::new() })).unwrap();
                    w.streams.remove(&id);
                },
                Op::Handoff(i) => if let Some(id) = pick(i) {
                    s.handoff(id);
                },
            }
            while let Some(e) = s.poll_event() {
                match e {
                    Event::Message { stream, data, .. } => inbox.entry(stream).or_default().push_back(data.len()),
                    Event::Closed { stream, .. } | Event::Refused { stream, .. } => {
                        open.retain(|&x| x != stream);
                        inbox.remove(&stream);
                    }
                    _ => {}
                }
            }
            let out = s.take_out(t0, Vec::new());
            w.unread.extend_from_slice(&out);
            prop_assert_eq!(s.peer_available(), LW as i64, "link credit is queued after every read");
            if w.unread.is_empty() {
                // The link: the WSM's credit is the whole window again.
                prop_assert_eq!(w.link_credit, LW as i64);
                // Each stream both sides still know.
                for (id, (credit, _)) in &w.streams {
                    if let Some(q) = inbox.get(id) {
                        let undelivered: usize = q.iter().sum();
                        let owed = s.streams.get(id).map_or(0, |st| st.credit_owed());
                        prop_assert_eq!(*credit + undelivered as i64 + owed as i64, SW as i64, "stream {}", id);
                    }
                }
            }
            // Holdfast's sending: within the WSM's link grant, plus one message per stream.
            prop_assert!(sent_link <= PEER_LW as i64 + 900 * open.len().max(1) as i64);
        }
    }
}

#[test]
fn a_failed_link_hands_back_every_streams_unacknowledged_messages_in_order() {
    let t0 = Instant::now();
    let mut s = up(t0);
    let a = s.open(sample_open(false)).unwrap();
    let b = s.open(sample_open(false)).unwrap();
    for (i, id) in [a, b, a, b, a].into_iter().enumerate() {
        s.send(id, true, &[i as u8; 10]);
    }
    s.on_bytes(t0, &enc(Frame::Credit { stream: a, bytes: 10 })).unwrap();
    let mut lost = s.fail();
    lost.sort();
    assert_eq!(
        lost,
        vec![
            (a, VecDeque::from(vec![(true, vec![2; 10]), (true, vec![4; 10])])),
            (b, VecDeque::from(vec![(true, vec![1; 10]), (true, vec![3; 10])]))
        ]
    );
    assert_eq!(s.stream_count(), 0);
    assert!(s.take_out(t0, Vec::new()).is_empty());
}
