//! A record of when streams opened: one line per OPEN, for operators and
//! benchmarks that must show how fast a WSM was asked to take devices.
//!
//! Owns: [`OpenLog`], an [`App`] wrapper that appends `<unix ms> <new|resumed>
//! <connection id>` to a file for every OPEN before the wrapped app decides
//! on it, and [`per_second`], which turns such a file into opens per
//! second. Never decides anything about a stream.

use std::io::Write;
use std::sync::Mutex;

use super::{App, Decision, Replies, StreamInfo};
use holdfast_link::codec::CloseReason;

pub struct OpenLog<A: App> {
    inner: A,
    out: Mutex<std::fs::File>,
}

impl<A: App> OpenLog<A> {
    /// `inner`, with every OPEN appended to `path` (created or truncated).
    pub fn create(inner: A, path: &std::path::Path) -> std::io::Result<OpenLog<A>> {
        Ok(OpenLog { inner, out: Mutex::new(std::fs::File::create(path)?) })
    }
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

impl<A: App> App for OpenLog<A> {
    fn open(&self, info: &StreamInfo) -> Decision {
        let line = format!("{} {} {}\n", unix_ms(), if info.open.resumed { "resumed" } else { "new" }, info.open.connection_id);
        if let Ok(mut f) = self.out.lock() {
            let _ = f.write_all(line.as_bytes());
        }
        self.inner.open(info)
    }

    fn message(&self, info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        self.inner.message(info, binary, data, out)
    }

    fn closed(&self, info: &StreamInfo, reason: CloseReason, code: u16) {
        self.inner.closed(info, reason, code)
    }

    fn labels_changed(&self, info: &StreamInfo) {
        self.inner.labels_changed(info)
    }
}

/// Opens in each whole second of an open log's text, from its first open:
/// `(unix ms of each open, per-second counts)`. Lines that do not parse are skipped.
pub fn per_second(text: &str) -> (Vec<u64>, Vec<u64>) {
    let mut ms: Vec<u64> = text.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    ms.sort_unstable();
    let Some(&first) = ms.first() else { return (ms, Vec::new()) };
    let mut counts = Vec::new();
    for t in &ms {
        let i = ((t - first) / 1000) as usize;
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += 1;
    }
    (ms, counts)
}

/// The most opens in any window of `window_ms` (sliding), from sorted times.
pub fn peak_in(ms: &[u64], window_ms: u64) -> usize {
    let mut start = 0;
    let mut best = 0;
    for (end, t) in ms.iter().enumerate() {
        while ms[start] + window_ms <= *t {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_counts_per_second_and_its_sliding_peak() {
        let text = "1000 new a\n1100 new b\n1999 resumed c\n2000 new d\nnot a line\n3500 new e\n";
        let (ms, counts) = per_second(text);
        assert_eq!(counts, vec![3, 1, 1]);
        assert_eq!(peak_in(&ms, 1000), 3);
        assert_eq!(peak_in(&ms, 1), 1);
        assert_eq!(peak_in(&[], 1000), 0);
    }
}
