//! The live upgrade's channel messages as the new process decodes them,
//! and the connections they carry rebuilt as it would (record layer,
//! frame decoder): a corrupt batch is an error, never a panic.
#![no_main]

use holdfast::upgrade::handoff::{Msg, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Msg::Conns { conns }) = decode(data) {
        for c in conns {
            let _ = holdfast::tls::record::RecordLayer::new(c.record.clone());
            if let Some(mut d) = c.decoder.clone() {
                let mut ev = Vec::new();
                let _ = d.feed(&c.rx, &mut ev);
            }
        }
    }
});
