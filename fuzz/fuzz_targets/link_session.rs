//! The link session under any sequence of operations from both sides, with
//! WSM frames built from the input (so they are well formed and reach the
//! session's logic, not just the codec). Nothing may panic, and the credit
//! holdfast says the WSM has never exceeds the window it granted.
#![no_main]

use std::time::{Duration, Instant};

use holdfast_link::codec::{self, CloseReason, Frame, Hello};
use holdfast_link::session::{LinkSession, Params};
use holdfast_link::testing::sample_open;
use libfuzzer_sys::fuzz_target;

const LW: u32 = 8192;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let params = Params {
        node: "edge".into(),
        shard: 0,
        stream_window: 2048,
        link_window: LW,
        max_frame: 1 << 16,
        ping_interval: Duration::from_secs(1),
        liveness_timeout: Duration::from_secs(3),
        version: codec::VERSION,
    };
    let mut s = LinkSession::new(params, now);
    let mut hello = Vec::new();
    Frame::Hello(Hello {
        version: codec::VERSION,
        role: 1,
        node: "w".into(),
        shard: 0,
        stream_window: 1024,
        link_window: 4096,
        max_frame: 1 << 16,
    })
    .encode(&mut hello);
    if s.on_bytes(now, &hello).is_err() {
        return;
    }
    let mut streams: Vec<u32> = Vec::new();
    for op in data.chunks(3) {
        let (a, b, c) = (op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0));
        let pick = streams.get(b as usize % streams.len().max(1)).copied().unwrap_or(b as u32);
        let n = (c as usize) * 8;
        let mut wsm = Vec::new();
        match a % 14 {
            0 => streams.extend(s.open(sample_open(false))),
            1 => {
                let _ = s.send(pick, c & 1 == 1, &vec![0; n]);
            }
            2 => {
                let _ = s.delivered(pick, n);
            }
            3 => s.close(pick, CloseReason::DeviceGone, 1000, ""),
            4 => {
                let _ = s.handoff(pick);
            }
            5 => Frame::Accept { stream: pick, subprotocol: None }.encode(&mut wsm),
            6 => Frame::Message { stream: pick, binary: true, data: vec![c; n] }.encode(&mut wsm),
            7 => Frame::Credit { stream: if c & 1 == 0 { 0 } else { pick }, bytes: (b as u32) << (c % 24) }.encode(&mut wsm),
            8 => Frame::Close { stream: pick, reason: CloseReason::WsmClosed, code: 1000, text: String::new() }.encode(&mut wsm),
            9 => Frame::Refuse { stream: pick, status: 403, reason: "no".into() }.encode(&mut wsm),
            10 => Frame::HandoffAck { stream: pick }.encode(&mut wsm),
            11 => Frame::GoAway { code: c, text: String::new() }.encode(&mut wsm),
            12 => {
                now += Duration::from_millis(c as u64 * 20);
                if s.on_tick(now).is_err() {
                    return;
                }
            }
            _ => wsm.extend_from_slice(op),
        }
        if !wsm.is_empty() {
            if s.on_bytes(now, &wsm).is_err() {
                return;
            }
            s.after_read();
        }
        while s.poll_event().is_some() {}
        let _ = s.take_out(now, Vec::new());
        assert!(s.peer_available() <= LW as i64, "the WSM has more credit than holdfast granted");
        assert!(s.peer_available() == LW as i64, "link credit is returned after every read");
    }
    let _ = s.fail();
});
