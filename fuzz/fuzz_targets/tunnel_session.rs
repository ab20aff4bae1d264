//! The tunnel core (one established connection) under any mix of device
//! frames (sealed, so they reach the frame logic), raw bytes, WSM messages
//! and closes, link losses, resumes, ticks and hand-over snapshots.
#![no_main]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use holdfast::session::tunnel::{Limits, OpenAnswer, Tunnel};
use holdfast::tls::keys::Suite;
use holdfast::tls::record::{Version, testing};
use holdfast::upgrade::snapshot::Resume;
use holdfast::ws::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let (mut dev, rl) = testing::pair(Version::Tls13, Suite::Chacha20Poly1305);
    let limits = Limits {
        max_message: 4096,
        idle_timeout: Some(Duration::from_secs(60)),
        ping_interval: Some(Duration::from_secs(10)),
        resume_timeout: Duration::from_secs(5),
        open_timeout: Duration::from_secs(1),
        held_bytes_per_connection: 8192,
        generation: 1,
    };
    let resume = Resume { chain: vec![], request: Default::default(), subprotocol: None };
    let mut t = Tunnel::attached(rl, &resume, &Default::default(), std::rc::Rc::new(limits), 1 << 16, now);
    let mut rx = Vec::new();
    for op in data.chunks(4) {
        let (a, b) = (op[0], *op.get(1).unwrap_or(&0));
        let payload = op.get(2..).unwrap_or(&[]);
        let r = match a % 12 {
            0..=3 => {
                let mut f = Vec::new();
                let opcode = [frame::op::TEXT, frame::op::BINARY, frame::op::PING, frame::op::CLOSE, 0x0, frame::op::PONG][b as usize % 6];
                let mut p = payload.to_vec();
                p.resize(b as usize % 64, b);
                if b & 0x40 != 0 {
                    // A fragment: FIN clear.
                    frame::encode(&mut f, opcode, &p, Some([1, 2, 3, 4]));
                    f[0] &= 0x7f;
                } else {
                    frame::encode(&mut f, opcode, &p, if b & 0x80 == 0 { Some([b, 1, 2, 3]) } else { None });
                }
                let _ = dev.seal(&f, &mut rx);
                t.on_ciphertext(now, &mut rx)
            }
            4 => {
                rx.extend_from_slice(payload);
                t.on_ciphertext(now, &mut rx)
            }
            5 => t.on_wsm_messages(now, VecDeque::from(vec![(b & 1 == 1, payload.to_vec())])),
            6 => Err(t.on_wsm_close(u16::from_be_bytes([b, *payload.first().unwrap_or(&0)]), "")),
            7 => {
                t.detach(now, VecDeque::from(vec![(true, payload.to_vec())]), b & 1 == 1, Duration::ZERO);
                Ok(())
            }
            8 => t.held_wants(now, b & 1 == 1).map(|_| {
                t.reopening(now);
                t.on_open_answer(if b & 2 == 0 { OpenAnswer::Accepted { max_frame: 1 << 16 } } else { OpenAnswer::Refused });
            }),
            9 => t.flush_held(&mut |_, _| b & 4 == 0),
            10 => {
                now += Duration::from_millis(b as u64 * 100);
                t.on_tick(now)
            }
            _ => {
                let _ = t.snapshot(holdfast::identity::ConnectionId(1), String::new(), rx.clone(), now);
                if b & 1 == 1 {
                    t.begin_quiesce(now);
                    t.leave_quiesced(now, true);
                }
                Ok(())
            }
        };
        while t.poll_action().is_some() {}
        if let Err(e) = r {
            t.end(&e);
            let _ = t.goodbye(&e);
            return;
        }
    }
});
