//! The WSM link protocol (see `docs/link-protocol.md`).
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]
pub use holdfast_link::{codec, credit, session, streams, testing};
