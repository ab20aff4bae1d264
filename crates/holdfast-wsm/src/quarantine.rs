//! Quarantine: what a device labelled `quarantine` by holdfast may send.
//!
//! Owns: [`Quarantine`], an [`App`] wrapper. A stream whose device labels
//! (the OPEN's, or the latest LABELS frame's) include `quarantine` has each
//! message checked before the wrapped app sees it: a text message that is a
//! JSON object whose `type` is in the allowlist passes; anything else
//! (another type, no type, not JSON, binary) is held back and answered with
//! `{"error":"quarantined","type":...}`. Other devices are not touched.
//! The labels come from holdfast's `[tls] labels` file (docs/reload.md);
//! the decision of what a quarantined device may do is the WSM's, here.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{App, Decision, Replies, StreamInfo};
use holdfast_link::codec::CloseReason;

/// The label that restricts a device.
pub const LABEL: &str = "quarantine";

pub struct Quarantine<A: App> {
    inner: A,
    allowed: HashSet<String>,
    /// Whole text messages that pass as they are (diagnostics such as the
    /// reference WSM's `whoami`).
    texts: HashSet<String>,
    /// Messages of quarantined devices held back.
    pub refused: AtomicU64,
}

impl<A: App> Quarantine<A> {
    /// `inner`, with quarantined devices limited to messages of these types.
    pub fn new(inner: A, allowed_types: impl IntoIterator<Item = String>) -> Quarantine<A> {
        Quarantine { inner, allowed: allowed_types.into_iter().collect(), texts: HashSet::new(), refused: AtomicU64::new(0) }
    }

    /// Also lets these exact text messages through (e.g. `whoami`).
    pub fn allow_texts(mut self, texts: impl IntoIterator<Item = String>) -> Quarantine<A> {
        self.texts.extend(texts);
        self
    }

    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// Whether this stream's device is quarantined.
    pub fn quarantined(info: &StreamInfo) -> bool {
        info.open.labels.iter().any(|l| l == LABEL)
    }

    /// The message's type, if it is a JSON object with a string `type`.
    fn type_of(binary: bool, data: &[u8]) -> Option<String> {
        if binary {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(data).ok()?;
        v.get("type")?.as_str().map(str::to_string)
    }
}

impl<A: App> App for Quarantine<A> {
    fn open(&self, info: &StreamInfo) -> Decision {
        self.inner.open(info)
    }

    fn message(&self, info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        let diagnostic = !binary && std::str::from_utf8(data).is_ok_and(|t| self.texts.contains(t));
        if Self::quarantined(info) && !diagnostic {
            let t = Self::type_of(binary, data);
            if !t.as_ref().is_some_and(|t| self.allowed.contains(t)) {
                self.refused.fetch_add(1, Ordering::Relaxed);
                out.text(serde_json::json!({ "error": "quarantined", "type": t }).to_string());
                return;
            }
        }
        self.inner.message(info, binary, data, out)
    }

    fn closed(&self, info: &StreamInfo, reason: CloseReason, code: u16) {
        self.inner.closed(info, reason, code)
    }

    fn labels_changed(&self, info: &StreamInfo) {
        self.inner.labels_changed(info)
    }
}
