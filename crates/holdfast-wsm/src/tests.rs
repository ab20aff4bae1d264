//! The WSM library against a hand-driven holdfast side: raw link frames over
//! loopback, no holdfast process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use holdfast_link::testing::sample_open;

/// Replies to "burst N" with N messages "r0".."r{N-1}" of 40 bytes each.
struct Burst;

impl App for Burst {
    fn open(&self, _: &StreamInfo) -> Decision {
        Decision::Accept { subprotocol: None }
    }
    fn message(&self, _: &StreamInfo, _binary: bool, data: &[u8], out: &mut Replies) {
        let n: usize = std::str::from_utf8(data).ok().and_then(|s| s.strip_prefix("burst ")).and_then(|n| n.parse().ok()).unwrap_or(0);
        for i in 0..n {
            out.text(format!("r{i:<38}|"));
        }
    }
}

struct Peer {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    fn connect(addr: SocketAddr, stream_window: u32) -> Peer {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut p = Peer { s, buf: Vec::new() };
        p.send(&Frame::Hello(Hello {
            version: codec::VERSION,
            role: 0,
            node: "test".into(),
            shard: 0,
            stream_window,
            link_window: 1 << 20,
            max_frame: codec::DEFAULT_MAX_FRAME,
        }));
        assert!(matches!(p.recv(), Frame::Hello(h) if h.role == 1));
        p
    }
    fn send(&mut self, f: &Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.s.write_all(&b).unwrap();
    }
    fn recv(&mut self) -> Frame {
        loop {
            if let Some((f, n)) = Frame::decode(&self.buf, codec::DEFAULT_MAX_FRAME).unwrap() {
                self.buf.drain(..n);
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).unwrap();
            assert!(n > 0, "WSM closed the link");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    /// Frames until (and including) one matching `stop`, credits skipped.
    fn until(&mut self, stop: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.recv();
            let done = stop(&f);
            if !matches!(f, Frame::Credit { .. }) {
                out.push(f);
            }
            if done {
                return out;
            }
        }
    }
}

fn texts(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Message { data, .. } => Some(String::from_utf8_lossy(&data[..2]).trim().to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn handoff_moves_a_stream_with_nothing_lost_or_repeated() {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Burst), "wsm".into()).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());

    // Old holdfast: a window of 100 bytes lets the WSM send 3 of 6 replies.
    let mut old = Peer::connect(addr, 100);
    let open = sample_open(false);
    let id = open.connection_id;
    old.send(&Frame::Open { stream: 1, open: Box::new(open.clone()) });
    assert!(matches!(old.recv(), Frame::Accept { stream: 1, .. }));
    old.send(&Frame::Message { stream: 1, binary: false, data: b"burst 6".to_vec() });
    let first = old.until(|f| matches!(f, Frame::Message { .. }));
    std::thread::sleep(Duration::from_millis(100));
    old.send(&Frame::Handoff { stream: 1 });
    let mut got = first;
    got.extend(old.until(|f| matches!(f, Frame::HandoffAck { stream: 1 })));
    assert!(matches!(got.last(), Some(Frame::HandoffAck { stream: 1 })));
    let before = texts(&got);
    assert!(!before.is_empty() && before.len() < 6, "some replies held back: {before:?}");
    // Credit now would release more, but the stream is handed over: nothing more comes here.
    old.send(&Frame::Credit { stream: 1, bytes: 10_000 });
    old.send(&Frame::Close { stream: 1, reason: CloseReason::HandedElsewhere, code: 1000, text: String::new() });
    old.send(&Frame::Ping(7));
    let after_ack = old.until(|f| matches!(f, Frame::Pong(7)));
    assert_eq!(texts(&after_ack), Vec::<String>::new());

    // New holdfast: the resumed stream gets the rest, in order.
    let mut new = Peer::connect(addr, 1 << 16);
    let mut resumed = open;
    resumed.resumed = true;
    assert_eq!(resumed.connection_id, id);
    new.send(&Frame::Open { stream: 1, open: Box::new(resumed) });
    let mut rest = Vec::new();
    while texts(&rest).len() + before.len() < 6 {
        rest.extend(new.until(|f| matches!(f, Frame::Message { .. })));
    }
    let all: Vec<String> = before.into_iter().chain(texts(&rest)).collect();
    assert_eq!(all, (0..6).map(|i| format!("r{i}")).collect::<Vec<_>>());
}
