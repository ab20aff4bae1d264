//! The record layer with keys both ends share, so inputs get past the MAC
//! check: the input is a script for the peer (seal data, send raw or
//! corrupted bytes, close_notify, an alert), and holdfast's end opens all
//! of it. Nothing may panic; data must come out as it went in until the
//! first error.
#![no_main]

use holdfast::tls::keys::Suite;
use holdfast::tls::record::{Opened, Version, testing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else { return };
    let version = if first & 1 == 0 { Version::Tls13 } else { Version::Tls12 };
    let suite = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305][(first as usize >> 1) % 3];
    let (mut peer, mut ours) = testing::pair(version, suite);
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    let mut clean = true;
    while let [op, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        match op % 6 {
            0 | 1 => {
                let _ = peer.seal(chunk, &mut wire);
                sent.extend_from_slice(chunk);
            }
            2 => {
                wire.extend_from_slice(chunk);
                clean = false;
            }
            3 => {
                if let Some(b) = wire.get_mut(n) {
                    *b ^= chunk.first().copied().unwrap_or(1) | 1;
                    clean = false;
                }
            }
            4 => {
                let _ = peer.close_notify(&mut wire);
            }
            _ => {
                let _ = peer.fatal_alert(chunk.first().copied().unwrap_or(0), &mut wire);
            }
        }
    }
    let mut got = Vec::new();
    let mut replies = Vec::new();
    let mut off = 0;
    loop {
        match ours.open(&mut wire[off..], &mut replies) {
            Ok(Opened::Data { consumed, start, end }) => {
                got.extend_from_slice(&wire[off + start..off + end]);
                off += consumed;
            }
            Ok(Opened::Control { consumed }) => off += consumed,
            Ok(Opened::CloseNotify { .. }) | Ok(Opened::NeedMore) | Err(_) => break,
        }
    }
    if clean {
        assert!(sent.starts_with(&got), "data came out other than it went in");
    }
});
