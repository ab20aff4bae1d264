//! Maps keyed by stream ID, with a hash fit for them.
//!
//! Owns: [`StreamMap`], a `HashMap<u32, V>` hashed by one multiplication
//! instead of SipHash. Stream IDs are chosen by holdfast (counting up from
//! 1 on each link), so a peer cannot pick keys that collide: the WSM can
//! only name IDs in frames, which look entries up but never insert. On the
//! link's hot path (every MESSAGE, CREDIT and HANDOFF_ACK finds its
//! stream) SipHash was a visible share of a live upgrade's CPU.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiplicative (Fibonacci) hashing of a `u32` key.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used for u32 keys; kept correct for any other.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Values by stream ID.
pub type StreamMap<V> = HashMap<u32, V, BuildHasherDefault<StreamIdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_and_every_entry_is_found() {
        let mut m: StreamMap<u32> = StreamMap::default();
        for i in 1..=20_000u32 {
            m.insert(i, i * 2);
        }
        assert!((1..=20_000u32).all(|i| m.get(&i) == Some(&(i * 2))));
        assert_eq!(m.get(&0), None);
        // The high bits hashbrown groups by differ between neighbours.
        let h = |n: u32| {
            let mut s = StreamIdHasher::default();
            s.write_u32(n);
            s.finish() >> 57
        };
        assert!((1..64u32).map(h).collect::<std::collections::HashSet<_>>().len() > 40);
    }
}
