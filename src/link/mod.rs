//! The WSM link protocol (see `docs/link-protocol.md`).
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]
pub mod codec;
pub mod credit;
pub mod session;
