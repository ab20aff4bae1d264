//! A connection's set-up (`session::connection`) past its handshake under
//! any mix of device bytes (sealed, so they reach the request parser, or
//! raw), the OPEN placed or not, the WSM's answers, I/O errors and time.
#![no_main]

use std::rc::Rc;
use std::time::{Duration, Instant};

use holdfast::session::connection::{Setup, SetupAction, SetupLimits, Stage};
use holdfast::session::setup::OpenOutcome;
use holdfast::tls::keys::Suite;
use holdfast::tls::record::{Version, testing};
use libfuzzer_sys::fuzz_target;

const REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v1\r\n";

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let (mut dev, rl) = testing::pair(Version::Tls13, Suite::Aes128Gcm);
    let limits = Rc::new(SetupLimits {
        handshake_timeout: Duration::from_secs(1),
        upgrade_timeout: Duration::from_secs(2),
        open_timeout: Duration::from_secs(1),
        max_request_bytes: 2048,
        forward_headers: vec!["user-agent".into()],
        key_update_after: 0,
    });
    let identity = holdfast::link::testing::sample_open(false).device;
    let mut s = Setup::after_handshake(rl, identity, limits, now);
    let mut rx = Vec::new();
    let mut last = s.stage();
    for op in data.chunks(3) {
        let (a, b) = (op[0], *op.get(1).unwrap_or(&0));
        let payload = op.get(2..).unwrap_or(&[]);
        match a % 9 {
            0 => {
                // Part of a well-formed request, then what the input says.
                let at = (b as usize) % REQUEST.len();
                let _ = dev.seal(&REQUEST[..at], &mut rx);
                s.on_bytes(now, &mut rx);
            }
            1 => {
                let _ = dev.seal(&[REQUEST, payload, b"\r\n"].concat(), &mut rx);
                s.on_bytes(now, &mut rx);
            }
            2 => {
                let _ = dev.seal(payload, &mut rx);
                s.on_bytes(now, &mut rx);
            }
            3 => {
                rx.extend_from_slice(payload);
                s.on_bytes(now, &mut rx);
            }
            4 => s.on_open_sent(now, b & 1 == 1),
            5 => s.on_open_answer(match b % 4 {
                0 => OpenOutcome::Accepted(None),
                1 => OpenOutcome::Accepted(Some(String::from_utf8_lossy(payload).into_owned())),
                2 => OpenOutcome::Refused(u16::from(b) * 3, String::from_utf8_lossy(payload).into_owned()),
                _ => OpenOutcome::Gone,
            }),
            6 => {
                now += Duration::from_millis(u64::from(b) * 20);
                s.on_timeout(now);
            }
            7 => s.on_io_error(holdfast::session::End::DeviceClosed),
            _ => {
                let _ = dev.close_notify(&mut rx);
                s.on_bytes(now, &mut rx);
            }
        }
        let mut ended = false;
        while let Some(a) = s.poll_action() {
            if matches!(a, SetupAction::Ended(_) | SetupAction::Established(_)) {
                ended = true;
            }
        }
        assert!(s.stage() >= last, "stages only move forward");
        last = s.stage();
        if ended {
            assert!(s.stage() >= Stage::Streaming);
            break;
        }
    }
});
