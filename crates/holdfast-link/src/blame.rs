//! Who is to blame for an error, and whether trying again can help.
//!
//! Owns: the vocabulary every layer's error uses to say so ([`Blame`]), and
//! the [`Blamed`] trait that gives each error a stable metric label. Never
//! decides what to do about an error: the layer that raised it does.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

/// The party whose behaviour caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The device (its bytes, its certificate, its pace).
    Device,
    /// A WSM host (its link frames, its answers, its silence).
    Wsm,
    /// The operator's configuration or files.
    Config,
    /// holdfast itself, or the machine it runs on.
    Internal,
}

impl Blame {
    pub fn label(self) -> &'static str {
        match self {
            Blame::Device => "device",
            Blame::Wsm => "wsm",
            Blame::Config => "config",
            Blame::Internal => "internal",
        }
    }
}

/// An error that can say who caused it, whether a retry helps, and which
/// metric label it is counted under (lower-case, `_`-separated, a small
/// fixed set per error type).
pub trait Blamed {
    fn blame(&self) -> Blame;
    /// Whether doing the same again (reconnecting, re-opening) may succeed.
    fn retry_helps(&self) -> bool;
    fn label(&self) -> &'static str;
}
