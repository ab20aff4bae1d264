//! The WSM link protocol (see `docs/link-protocol.md`).
pub mod codec;
