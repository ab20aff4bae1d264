//! The link protocol between holdfast and WSM hosts, with no I/O and no
//! runtime: a WSM team (or holdfast itself) depends on this crate alone.
//!
//! * [`codec`]: every frame of `docs/link-protocol.md`, encoded and decoded.
//! * [`credit`]: the arithmetic of flow-control credit, both directions.
//! * [`session`]: one link connection, holdfast's side, as a state machine
//!   fed bytes and `now` (HELLO, streams, credit, unacknowledged messages,
//!   HANDOFF, goaway, pings and liveness).
//! * [`streams`]: maps keyed by stream ID.
//! * [`types`]: the values a stream's OPEN carries about the device.
//! * [`blame`]: who an error is to blame on, whether a retry helps.
//! * [`testing`]: sample values for tests of code built on this crate.
//!
//! How a WSM uses it: `docs/wsm-guide.md`.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

pub mod blame;
pub mod codec;
pub mod credit;
pub mod session;
pub mod streams;
pub mod testing;
pub mod types;
