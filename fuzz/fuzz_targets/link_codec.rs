//! The link codec: any bytes decode without panic, and whatever decodes
//! encodes back to the same bytes and decodes to the same frame.
#![no_main]

use holdfast_link::codec::{Frame, LARGEST_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut off = 0;
    while let Ok(Some((f, used))) = Frame::decode(&data[off..], LARGEST_FRAME) {
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(&again[..], &data[off..off + used], "re-encoding differs");
        assert_eq!(Frame::decode(&again, LARGEST_FRAME).ok().flatten().map(|(g, _)| g), Some(f));
        off += used;
    }
});
