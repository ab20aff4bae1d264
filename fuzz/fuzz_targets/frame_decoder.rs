//! The WebSocket frame decoder, fed in arbitrary pieces, masked and not.
#![no_main]

use holdfast::ws::frame::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, rest)) = data.split_first() else { return };
    let max = [125usize, 4096, 1 << 20][cfg as usize % 3];
    let mut d = Decoder::new(max, cfg & 0x80 == 0);
    let mut events = Vec::new();
    let step = (cfg as usize & 0x0f) + 1;
    for chunk in rest.chunks(step) {
        if d.feed(chunk, &mut events).is_err() {
            break;
        }
    }
    for e in &events {
        if let holdfast::ws::frame::Event::Message { data, .. } = e {
            assert!(data.len() <= max, "a message above the limit");
        }
    }
});
