//! Flow-control credit of one link connection, both directions, as plain
//! data (`docs/link-protocol.md` 6).
//!
//! Owns: the arithmetic of credit: what this side may still send (per
//! stream and per link, granted by the peer), what the peer has sent that
//! this side has not yet given back, and when to give it back (link credit
//! after each read, stream credit once a quarter window is delivered).
//! Conservation holds for every stream and the link: every byte received
//! is, at any moment, either returned or still owed, and a stream's owed
//! bytes are released when it ends, however it ends. Never does I/O, never
//! reads the clock; the shell sends the CREDIT frames it returns.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

/// The most credit a peer can give this side on a stream or a link: more
/// than any window, far from overflow however often it sends CREDIT.
pub const MAX_CREDIT: i64 = 1 << 40;

/// One stream's credit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamCredit {
    /// What this side may still send on the stream (may go below zero by
    /// one message, 6.2).
    pub send: i64,
    /// Bytes received on the stream and delivered, whose stream credit is
    /// not yet returned (batched).
    delivered_owed: u32,
}

/// The link's credit, and the peer's view of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkCredit {
    /// What this side may still send on the whole link.
    pub send: i64,
    /// The stream window the peer granted (each new stream starts with it).
    pub peer_stream_window: i64,
    /// This side's stream window for the peer (batching threshold).
    own_stream_window: u32,
    /// This side's link window for the peer.
    own_link_window: u32,
    /// Bytes received whose link credit is not yet returned.
    link_owed: u64,
}

impl StreamCredit {
    /// Bytes delivered whose stream credit is not yet returned.
    pub fn owed(&self) -> u32 {
        self.delivered_owed
    }
}

impl LinkCredit {
    /// After both HELLOs: the peer's windows for this side's sending, and
    /// this side's windows for the peer's.
    pub fn new(peer_stream_window: u32, peer_link_window: u32, own_stream_window: u32, own_link_window: u32) -> LinkCredit {
        LinkCredit {
            send: peer_link_window as i64,
            peer_stream_window: peer_stream_window as i64,
            own_stream_window,
            own_link_window,
            link_owed: 0,
        }
    }

    /// A new stream's credit.
    pub fn open(&self) -> StreamCredit {
        StreamCredit { send: self.peer_stream_window, delivered_owed: 0 }
    }

    /// Whether a message may be sent on `s` now (both credits above zero).
    pub fn may_send(&self, s: &StreamCredit) -> bool {
        s.send > 0 && self.send > 0
    }

    /// A message of `n` bytes was sent on `s`.
    pub fn sent(&mut self, s: &mut StreamCredit, n: usize) {
        s.send -= n as i64;
        self.send -= n as i64;
    }

    /// The peer returned `n` bytes of link credit. True if sending was
    /// blocked at link level and is not any more.
    pub fn link_credit(&mut self, n: u32) -> bool {
        let was = self.send <= 0;
        self.send = self.send.saturating_add(n as i64).min(MAX_CREDIT);
        was && self.send > 0
    }

    /// The peer returned `n` bytes of credit on `s`. True if `s` was
    /// blocked and is not any more.
    pub fn stream_credit(&self, s: &mut StreamCredit, n: u32) -> bool {
        let was = s.send <= 0;
        s.send = s.send.saturating_add(n as i64).min(MAX_CREDIT);
        was && s.send > 0
    }

    /// `n` bytes of MESSAGE arrived (for a stream, or for none: dropped).
    pub fn received(&mut self, n: usize) {
        self.link_owed += n as u64;
    }

    /// After each read: the link credit to return now, if any (the bytes
    /// left the link for their stream's buffer, or were dropped).
    pub fn flush_link(&mut self) -> Option<u32> {
        (self.link_owed > 0).then(|| std::mem::take(&mut self.link_owed).min(u32::MAX as u64) as u32)
    }

    /// `n` bytes of `s` were delivered: the stream credit to return now, if
    /// a quarter window is owed (the peer always keeps three quarters).
    pub fn delivered(&self, s: &mut StreamCredit, n: usize) -> Option<u32> {
        s.delivered_owed = s.delivered_owed.saturating_add(n.min(u32::MAX as usize) as u32);
        (s.delivered_owed >= (self.own_stream_window / 4).max(1)).then(|| std::mem::take(&mut s.delivered_owed))
    }

    /// The credit the peer has for sending on this link, as this side
    /// counts it: the window less what is not yet returned.
    pub fn peer_available(&self) -> i64 {
        self.own_link_window as i64 - self.link_owed as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn link_credit_goes_back_after_each_read_and_stream_credit_by_the_quarter() {
        let mut l = LinkCredit::new(1000, 4000, 1000, 4000);
        let mut s = l.open();
        l.received(300);
        l.received(200);
        assert_eq!(l.peer_available(), 3500);
        assert_eq!(l.flush_link(), Some(500));
        assert_eq!(l.flush_link(), None);
        assert_eq!(l.peer_available(), 4000);
        assert_eq!(l.delivered(&mut s, 200), None);
        assert_eq!(l.delivered(&mut s, 100), Some(300));
    }

    #[test]
    fn sending_may_go_below_zero_by_one_message_then_waits() {
        let mut l = LinkCredit::new(100, 10_000, 100, 10_000);
        let mut s = l.open();
        assert!(l.may_send(&s));
        l.sent(&mut s, 150);
        assert!(!l.may_send(&s));
        assert!(!l.stream_credit(&mut s, 40), "still at -10");
        assert!(l.stream_credit(&mut s, 20));
        assert!(l.may_send(&s));
    }

    #[test]
    fn endless_credit_saturates() {
        let mut l = LinkCredit::new(100, 100, 100, 100);
        let mut s = l.open();
        for _ in 0..1_000_000 {
            l.link_credit(u32::MAX);
            l.stream_credit(&mut s, u32::MAX);
        }
        assert_eq!((l.send, s.send), (MAX_CREDIT, MAX_CREDIT));
    }

    /// What can happen to a link, in any order.
    #[derive(Debug, Clone)]
    enum Op {
        Open,
        /// A message for stream i (mod open streams), or for a gone stream.
        Receive(usize, u16),
        /// A read ends.
        Read,
        /// Stream i delivers what it holds (some of it).
        Deliver(usize, u16),
        /// Stream i ends, whatever it still holds.
        End(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => Just(Op::Open),
            4 => (any::<usize>(), 1u16..5000).prop_map(|(i, n)| Op::Receive(i, n)),
            2 => Just(Op::Read),
            3 => (any::<usize>(), 1u16..5000).prop_map(|(i, n)| Op::Deliver(i, n)),
            1 => any::<usize>().prop_map(Op::End),
        ]
    }

    proptest! {
        /// Conservation: every byte the peer sent is returned at link level
        /// or still owed, and once reads and streams end nothing is owed:
        /// the peer's whole window is back, however streams ended.
        #[test]
        fn every_received_byte_is_returned_or_owed_and_all_of_it_comes_back(ops in proptest::collection::vec(op(), 1..300)) {
            const WINDOW: u32 = 64 * 1024;
            let mut l = LinkCredit::new(WINDOW, 16 * WINDOW, WINDOW, 16 * WINDOW);
            // Each open stream: its credit and the bytes it holds undelivered.
            let mut streams: Vec<(StreamCredit, u64)> = Vec::new();
            let (mut received, mut link_returned) = (0u64, 0u64);
            let mut stream_returned = 0u64;
            let mut delivered = 0u64;
            for op in ops {
                match op {
                    Op::Open => streams.push((l.open(), 0)),
                    Op::Receive(i, n) => {
                        l.received(n as usize);
                        received += n as u64;
                        if !streams.is_empty() {
                            let k = i % streams.len();
                            streams[k].1 += n as u64;
                        }
                    }
                    Op::Read => link_returned += l.flush_link().unwrap_or(0) as u64,
                    Op::Deliver(i, n) => {
                        if !streams.is_empty() {
                            let k = i % streams.len();
                            let n = (n as u64).min(streams[k].1);
                            streams[k].1 -= n;
                            delivered += n;
                            stream_returned += l.delivered(&mut streams[k].0, n as usize).unwrap_or(0) as u64;
                        }
                    }
                    Op::End(i) => {
                        if !streams.is_empty() {
                            let k = i % streams.len();
                            streams.swap_remove(k);
                        }
                    }
                }
                prop_assert_eq!(received, link_returned + (16 * WINDOW) as u64 - l.peer_available() as u64);
                prop_assert!(stream_returned <= delivered);
            }
            link_returned += l.flush_link().unwrap_or(0) as u64;
            prop_assert_eq!(received, link_returned, "every byte's link credit came back");
            prop_assert_eq!(l.peer_available(), (16 * WINDOW) as i64, "the whole window is back");
        }
    }
}
