//! The HTTP upgrade parser under its size limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let forward = vec!["user-agent".to_string(), "x-device".to_string()];
    if let Ok(Some((req, used))) = holdfast::ws::upgrade::parse(data, 8192, &forward) {
        assert!(used <= data.len());
        let _ = holdfast::ws::upgrade::response_101(&req.key, req.subprotocols.first().map(String::as_str));
    }
});
